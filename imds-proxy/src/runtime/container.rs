//! What the proxy knows of a container, whichever runtime reported it: the Docker API (Docker,
//! Podman) or a Kubernetes node's CRI runtime. A leaf: the sources ([`crate::runtime`],
//! [`crate::runtime::cri`]) fill it in, the attestor and the cache read it.
use std::{collections::HashMap, net::IpAddr};

/// What the proxy needs to know about a container.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Container {
    pub id: String,
    /// Without the leading `/`.
    pub name: String,
    pub labels: HashMap<String, String>,
    pub env: Vec<String>,
    /// Its addresses on every network it is attached to (tc mode identifies callers by them).
    pub addresses: Vec<IpAddr>,
    /// Whether it was running when Docker was last asked.
    pub running: bool,
    /// Its first process, in Docker's pid namespace, when it was running (else 0).
    pub pid: u32,
    /// The cgroup (relative to the v2 root) Docker put it in, from its cgroup driver and
    /// `--cgroup-parent`: a kernel record's cgroup must be this one or inside it.
    pub cgroup: String,
    /// The pod it belongs to (CRI runtimes); its name is then `<namespace>.<pod>` and its labels
    /// are the pod's role annotations.
    pub pod: Option<Pod>,
    /// The image it runs, as its runtime names it: Docker's and Podman's image id
    /// (`sha256:…`), a CRI runtime's image reference (its digest). Empty when not told.
    pub image: String,
    /// Its session tags, computed by the first request that needs them (they depend only on
    /// the fields above and the proxy's settings): no work per request after.
    pub session_tags: Memo<std::sync::Arc<imds_policy::tags::SessionTags>>,
}

/// A value derived from the rest of a struct, computed once: not part of its identity (equal
/// whatever it holds, and a clone starts empty), so that two reports of one container compare
/// by what the runtime said.
#[derive(Default)]
pub struct Memo<T>(std::sync::OnceLock<T>);

impl<T> Memo<T> {
    pub fn get_or_init(&self, f: impl FnOnce() -> T) -> &T {
        self.0.get_or_init(f)
    }
}

impl<T> Clone for Memo<T> {
    fn clone(&self) -> Self {
        Self(std::sync::OnceLock::new())
    }
}

impl<T> PartialEq for Memo<T> {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl<T> Eq for Memo<T> {}

impl<T> std::fmt::Debug for Memo<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Memo")
    }
}

/// A Kubernetes pod, as its sandbox tells it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub sandbox_id: String,
    /// This container's name in the pod (its spec's `name`): the key of its own role annotation.
    pub container: String,
}

impl Container {
    /// Who it is, for its session tags and source identity: its pod, or itself.
    pub fn caller(&self) -> imds_policy::tags::Caller<'_> {
        match &self.pod {
            Some(pod) => imds_policy::tags::Caller::Pod {
                namespace: &pod.namespace,
                name: &pod.name,
                uid: &pod.uid,
            },
            None => imds_policy::tags::Caller::Container {
                name: &self.name,
                id: &self.id,
            },
        }
    }

    /// Who holds the sessions it is served: its pod (whose containers share one session) or
    /// the container itself. The audit trail records each session once per holder.
    pub fn holder(&self) -> &str {
        match &self.pod {
            Some(pod) if !pod.uid.is_empty() => &pod.uid,
            _ => &self.id,
        }
    }

    /// Whose role settings these are, for [`crate::roles::Policy::resolve_for`]. `told_apart`:
    /// whether the caller is known to be this very container (the kernel's record of its
    /// cgroup), not only one of its pod's (the pod's address, which they share).
    pub fn subject(&self, told_apart: bool) -> crate::roles::Subject<'_> {
        match &self.pod {
            Some(pod) => crate::roles::Subject::Pod {
                annotations: &self.labels,
                namespace: &pod.namespace,
                container: if told_apart {
                    crate::roles::InPod::Named(&pod.container)
                } else {
                    crate::roles::InPod::Unknown
                },
            },
            None => crate::roles::Subject::Container {
                labels: &self.labels,
                env: &self.env,
            },
        }
    }
}
