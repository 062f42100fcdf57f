//! The Kubernetes node side: a CRI runtime (containerd, CRI-O) asked over its unix socket with the
//! CRI's own API, as the kubelet asks it. No API server is involved: a node's proxy reads its own
//! pods from its own runtime.
//!
//! A pod's container becomes a [`Container`] whose role settings are the **pod's annotations**
//! (`iam.amazonaws.com/role`, `iam.amazonaws.com/external-id`: the kubelet hands a pod's
//! annotations to the runtime with its sandbox), whose name is `<namespace>.<pod>` (the STS
//! session name), whose addresses are the sandbox's (every container of a pod shares them), and
//! whose cgroup is the one its OCI runtime spec names (`linux.cgroupsPath`), so that a kernel
//! record is checked against where the runtime really put it. Neither a container's labels nor its
//! environment nor its image count: only what the pod's author wrote in its metadata.
//!
//! containerd 1.6 has no CRI event stream: the index lists the running containers every
//! [`POLL`] and asks directly on a miss (a request in a container's first second).
use std::{collections::HashMap, net::IpAddr, time::Duration};

use hyper_util::rt::TokioIo;
use k8s_cri::v1::{
    self as cri, ContainerFilter, ContainerState, ContainerStateValue, ListContainersRequest,
    NamespaceMode, PodSandboxState, runtime_service_client::RuntimeServiceClient,
};
use tonic::transport::{Channel, Endpoint, Uri};

use futures_util::{FutureExt as _, StreamExt as _, future::BoxFuture, stream::BoxStream};

use super::{
    Kind,
    container::{Container, Pod},
    source::{Change, Description, Source, SourceError},
};

/// How often the running containers are listed (unless `--cri-poll` says otherwise).
pub const POLL: Duration = Duration::from_secs(1);
/// How long one call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// A CRI runtime's client, and how often its containers are listed.
#[derive(Clone)]
pub struct Cri {
    client: RuntimeServiceClient<Channel>,
    poll: Duration,
}

impl Cri {
    /// A client of the runtime at `endpoint` (`unix:///run/containerd/containerd.sock`), whose
    /// running containers are listed every `poll` ([`POLL`]). The connection is made on first
    /// use and remade after a failure (the runtime restarted).
    pub fn connect(endpoint: &str, poll: Duration) -> Self {
        let path = endpoint.trim_start_matches("unix://").to_owned();
        // The URI is a placeholder: the connector below dials the socket.
        let channel = Endpoint::from_static("http://[::1]:50051")
            .connect_timeout(CALL_TIMEOUT)
            .timeout(CALL_TIMEOUT)
            .connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            }));
        Self {
            client: RuntimeServiceClient::new(channel),
            poll,
        }
    }

    /// The runtime's name and version (`containerd`, `1.6.20`).
    pub async fn version(&self) -> Result<(String, String), SourceError> {
        let v = self
            .client
            .clone()
            .version(cri::VersionRequest {
                version: "v1".into(),
            })
            .await?
            .into_inner();
        Ok((v.runtime_name, v.runtime_version))
    }

    /// The ids of the running containers.
    pub async fn running(&self) -> Result<Vec<String>, SourceError> {
        Ok(self
            .client
            .clone()
            .list_containers(ListContainersRequest {
                filter: Some(ContainerFilter {
                    state: Some(ContainerStateValue {
                        state: ContainerState::ContainerRunning as i32,
                    }),
                    ..Default::default()
                }),
            })
            .await?
            .into_inner()
            .containers
            .into_iter()
            .map(|c| c.id)
            .collect())
    }

    /// Container `id` and its pod, now; `Ok(None)` when the runtime has no such container, or it
    /// belongs to no pod the runtime knows.
    pub async fn inspect(&self, id: &str) -> Result<Option<Container>, SourceError> {
        let mut client = self.client.clone();
        let response = match client
            .container_status(cri::ContainerStatusRequest {
                container_id: id.to_owned(),
                verbose: true,
            })
            .await
        {
            Ok(r) => r.into_inner(),
            Err(status) if status.code() == tonic::Code::NotFound => return Ok(None),
            Err(status) => return Err(status.into()),
        };
        let Some(status) = response.status else {
            return Ok(None);
        };
        let runtime = RuntimeInfo::parse(&response.info);
        let sandbox_id = match runtime.sandbox_id.clone() {
            Some(sandbox) => sandbox,
            // Not in the verbose answer (a runtime that gives none): the list says it.
            None => match client
                .list_containers(ListContainersRequest {
                    filter: Some(ContainerFilter {
                        id: status.id.clone(),
                        ..Default::default()
                    }),
                })
                .await?
                .into_inner()
                .containers
                .into_iter()
                .next()
            {
                Some(c) => c.pod_sandbox_id,
                None => return Ok(None),
            },
        };
        let sandbox = match client
            .pod_sandbox_status(cri::PodSandboxStatusRequest {
                pod_sandbox_id: sandbox_id,
                verbose: false,
            })
            .await
        {
            Ok(r) => r.into_inner().status,
            Err(status) if status.code() == tonic::Code::NotFound => return Ok(None),
            Err(status) => return Err(status.into()),
        };
        Ok(sandbox.and_then(|sandbox| pod_container(&status, &runtime, &sandbox)))
    }
}

impl Source for Cri {
    fn describe(&self) -> BoxFuture<'_, Result<Description, SourceError>> {
        async move {
            let (name, version) = self.version().await?;
            Ok(Description {
                kind: Kind::Cri,
                name,
                version,
                // Each container's cgroup is read from its runtime spec, whatever the driver.
                cgroup_driver: "per container (OCI runtime spec)".to_owned(),
            })
        }
        .boxed()
    }

    fn ping(&self) -> BoxFuture<'_, bool> {
        async move { self.version().await.is_ok() }.boxed()
    }

    fn inspect<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<Container>, SourceError>> {
        Cri::inspect(self, id).boxed()
    }

    /// Every running container: the sandbox's addresses are the runtime's answer now.
    fn candidates(&self, _ip: IpAddr) -> BoxFuture<'_, Result<Vec<String>, SourceError>> {
        self.running().boxed()
    }

    /// No event stream (containerd 1.6): the running containers, listed every `poll`.
    fn changes(&self) -> BoxStream<'static, Result<Change, SourceError>> {
        let cri = self.clone();
        let mut every = tokio::time::interval(self.poll);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        futures_util::stream::unfold((cri, every, true), |(cri, mut every, first)| async move {
            every.tick().await;
            let listed = cri.running().await;
            let change = listed.map(|ids| Change::Running {
                ids,
                all_again: first,
            });
            Some((change, (cri, every, false)))
        })
        .boxed()
    }
}

/// What a runtime's verbose container status says (containerd and CRI-O both answer a JSON
/// document under `info`): the sandbox, the first process, the OCI spec's cgroups path.
#[derive(Debug, Default, PartialEq, Eq)]
struct RuntimeInfo {
    sandbox_id: Option<String>,
    pid: u32,
    cgroups_path: Option<String>,
}

impl RuntimeInfo {
    fn parse(info: &HashMap<String, String>) -> Self {
        let Some(doc) = info
            .get("info")
            .and_then(|text| serde_json::from_str::<serde_json::Value>(text).ok())
        else {
            return Self::default();
        };
        Self {
            sandbox_id: doc
                .get("sandboxID")
                .and_then(|v| v.as_str())
                .filter(|s| !s.is_empty())
                .map(str::to_owned),
            pid: doc
                .get("pid")
                .and_then(|v| v.as_u64())
                .and_then(|p| u32::try_from(p).ok())
                .unwrap_or(0),
            cgroups_path: doc
                .pointer("/runtimeSpec/linux/cgroupsPath")
                .and_then(|v| v.as_str())
                .map(str::to_owned),
        }
    }
}

/// The cgroup no caller is ever in: what a container whose runtime spec names none is expected
/// in, so that a kernel record never matches it (fail closed; its callers are refused).
pub const UNKNOWN_CGROUP: &str = "/\u{0}unknown";

/// A pod's container as the proxy sees it, from the runtime's answers; `None` when the sandbox
/// has no pod metadata.
fn pod_container(
    status: &cri::ContainerStatus,
    runtime: &RuntimeInfo,
    sandbox: &cri::PodSandboxStatus,
) -> Option<Container> {
    let meta = sandbox.metadata.as_ref()?;
    let running = status.state == ContainerState::ContainerRunning as i32
        && sandbox.state == PodSandboxState::SandboxReady as i32;
    // A pod on the node's network has the node's addresses: they are nobody's in particular, and
    // such a pod is identified by its kernel record only.
    let host_network = sandbox
        .linux
        .as_ref()
        .and_then(|l| l.namespaces.as_ref())
        .and_then(|n| n.options.as_ref())
        .is_some_and(|o| o.network == NamespaceMode::Node as i32);
    let addresses = match (&sandbox.network, host_network) {
        (Some(net), false) => std::iter::once(net.ip.as_str())
            .chain(net.additional_ips.iter().map(|ip| ip.ip.as_str()))
            .filter_map(|ip| ip.parse::<IpAddr>().ok())
            .collect(),
        _ => Vec::new(),
    };
    // Only the role settings, and only from the pod's annotations: the pod's role, its external
    // id, this container's own role, and one other container's (whether the pod tells its
    // containers apart at all: a caller known only by the pod's address then gets nothing).
    let container_name = status
        .metadata
        .as_ref()
        .map(|m| m.name.clone())
        .unwrap_or_default();
    let own_key = crate::roles::container_role_key(&container_name);
    let another = sandbox
        .annotations
        .keys()
        .find(|k| k.starts_with(crate::roles::CONTAINER_ROLE_PREFIX) && **k != own_key);
    let labels = [
        Some(crate::roles::ROLE_LABEL),
        Some(crate::roles::EXTERNAL_ID_LABEL),
        Some(own_key.as_str()),
        another.map(String::as_str),
    ]
    .into_iter()
    .flatten()
    .filter_map(|key| {
        sandbox
            .annotations
            .get(key)
            .map(|v| (key.to_owned(), v.clone()))
    })
    .collect();
    Some(Container {
        id: status.id.clone(),
        name: format!("{}.{}", meta.namespace, meta.name),
        labels,
        env: Vec::new(),
        addresses,
        running,
        pid: if running { runtime.pid } else { 0 },
        cgroup: runtime
            .cgroups_path
            .as_deref()
            .and_then(crate::cgroup::from_cgroups_path)
            .unwrap_or_else(|| UNKNOWN_CGROUP.to_owned()),
        pod: Some(Pod {
            namespace: meta.namespace.clone(),
            name: meta.name.clone(),
            uid: meta.uid.clone(),
            sandbox_id: sandbox.id.clone(),
            container: container_name,
        }),
        // The digest the runtime resolved the image to, when it says one; else its name.
        image: if status.image_ref.is_empty() {
            status
                .image
                .as_ref()
                .map(|i| i.image.clone())
                .unwrap_or_default()
        } else {
            status.image_ref.clone()
        },
        session_tags: Default::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "5a2ba51e7b118ff00bfbb27ae5cea5ccd19c073019eba99867022d6424f472ab";

    fn sandbox(annotations: &[(&str, &str)], network: NamespaceMode) -> cri::PodSandboxStatus {
        cri::PodSandboxStatus {
            id: "sandbox".into(),
            metadata: Some(cri::PodSandboxMetadata {
                name: "web-0".into(),
                uid: "uid-1".into(),
                namespace: "team-a".into(),
                attempt: 0,
            }),
            state: PodSandboxState::SandboxReady as i32,
            network: Some(cri::PodSandboxNetworkStatus {
                ip: "10.22.0.5".into(),
                additional_ips: vec![cri::PodIp {
                    ip: "fd00:22::5".into(),
                }],
            }),
            linux: Some(cri::LinuxPodSandboxStatus {
                namespaces: Some(cri::Namespace {
                    options: Some(cri::NamespaceOption {
                        network: network as i32,
                        ..Default::default()
                    }),
                }),
            }),
            annotations: annotations
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ..Default::default()
        }
    }

    fn status(labels: &[(&str, &str)]) -> cri::ContainerStatus {
        cri::ContainerStatus {
            id: ID.into(),
            state: ContainerState::ContainerRunning as i32,
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ..Default::default()
        }
    }

    fn runtime() -> RuntimeInfo {
        let info = serde_json::json!({
            "sandboxID": "sandbox",
            "pid": 4242,
            "runtimeSpec": {"linux": {"cgroupsPath": format!("/kubepods/besteffort/poduid-1/{ID}")}},
        });
        RuntimeInfo::parse(&HashMap::from([("info".to_owned(), info.to_string())]))
    }

    #[test]
    fn the_runtime_s_verbose_answer() {
        let r = runtime();
        assert_eq!(r.sandbox_id.as_deref(), Some("sandbox"));
        assert_eq!(r.pid, 4242);
        assert_eq!(
            r.cgroups_path.as_deref(),
            Some(format!("/kubepods/besteffort/poduid-1/{ID}").as_str())
        );
        // No verbose answer, or not JSON: nothing known.
        assert_eq!(RuntimeInfo::parse(&HashMap::new()), RuntimeInfo::default());
        assert_eq!(
            RuntimeInfo::parse(&HashMap::from([("info".into(), "{".into())])),
            RuntimeInfo::default()
        );
    }

    /// A container of a pod keeps its own role annotation (by its name in the pod) and one
    /// other container's, so that the policy can tell whether the pod gives its containers roles
    /// of their own; the rest of the pod's annotations are not kept.
    #[test]
    fn a_pod_s_container_keeps_its_own_role_annotation_and_whether_others_have_one() {
        let mut named = status(&[]);
        named.metadata = Some(cri::ContainerMetadata {
            name: "sidecar".into(),
            attempt: 0,
        });
        let many: Vec<(String, String)> = (0..50)
            .map(|i| (format!("iam.amazonaws.com/role.worker-{i}"), "W".to_owned()))
            .collect();
        let mut annotations: Vec<(&str, &str)> =
            many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        annotations.extend([
            ("iam.amazonaws.com/role", "Web"),
            ("iam.amazonaws.com/role.sidecar", "none"),
        ]);
        let c = pod_container(
            &named,
            &runtime(),
            &sandbox(&annotations, NamespaceMode::Pod),
        )
        .unwrap();
        assert_eq!(c.pod.as_ref().unwrap().container, "sidecar");
        assert_eq!(c.labels["iam.amazonaws.com/role.sidecar"], "none");
        assert_eq!(c.labels.len(), 3, "{:?}", c.labels);
        assert_eq!(
            crate::roles::Policy::default().resolve_for(c.subject(true)),
            Ok(None)
        );
        assert_eq!(
            crate::roles::Policy::default().resolve_for(c.subject(false)),
            Err(crate::roles::RoleError::PerContainerNeedsCgroupMode)
        );
        // Only its own: a pod whose only per-container annotation is this container's still
        // tells its containers apart.
        let own_only = [("iam.amazonaws.com/role.sidecar", "none")];
        let c = pod_container(&named, &runtime(), &sandbox(&own_only, NamespaceMode::Pod)).unwrap();
        assert_eq!(
            crate::roles::Policy::default().resolve_for(c.subject(false)),
            Err(crate::roles::RoleError::PerContainerNeedsCgroupMode)
        );
    }

    #[test]
    fn a_pod_s_container_takes_the_pod_s_annotations_only() {
        let annotations = [
            ("iam.amazonaws.com/role", "Web"),
            ("iam.amazonaws.com/external-id", "ext-1"),
            ("unrelated", "x"),
        ];
        // The container's own labels (which its image or its runner might set) do not count.
        let c = pod_container(
            &status(&[("iam.amazonaws.com/role", "Admin")]),
            &runtime(),
            &sandbox(&annotations, NamespaceMode::Pod),
        )
        .unwrap();
        assert_eq!(c.labels.len(), 2);
        assert_eq!(c.labels["iam.amazonaws.com/role"], "Web");
        assert_eq!(c.labels["iam.amazonaws.com/external-id"], "ext-1");
        assert!(c.env.is_empty());
        assert_eq!(c.name, "team-a.web-0");
        assert_eq!(
            crate::roles::session_name(Some(&c.name), &c.id),
            "team-a.web-0"
        );
        assert_eq!(c.pod.as_ref().unwrap().namespace, "team-a");
        assert_eq!(
            c.addresses,
            vec![
                "10.22.0.5".parse::<IpAddr>().unwrap(),
                "fd00:22::5".parse().unwrap()
            ]
        );
        assert!(c.running);
        assert_eq!(c.pid, 4242);
        assert_eq!(c.cgroup, format!("/kubepods/besteffort/poduid-1/{ID}"));
        // A pod without the annotation names no role.
        let c = pod_container(&status(&[]), &runtime(), &sandbox(&[], NamespaceMode::Pod)).unwrap();
        assert!(c.labels.is_empty());
    }

    #[test]
    fn what_cannot_be_known_fails_closed() {
        // A host-network pod's addresses are the node's: none are the pod's.
        let c =
            pod_container(&status(&[]), &runtime(), &sandbox(&[], NamespaceMode::Node)).unwrap();
        assert!(c.addresses.is_empty());
        // No cgroups path in the runtime's answer: no kernel record matches the expected cgroup.
        let c = pod_container(
            &status(&[]),
            &RuntimeInfo::default(),
            &sandbox(&[], NamespaceMode::Pod),
        )
        .unwrap();
        assert_eq!(c.cgroup, UNKNOWN_CGROUP);
        assert!(!crate::cgroup::within(
            &format!("/kubepods/besteffort/poduid-1/{ID}"),
            &c.cgroup
        ));
        assert_eq!(c.pid, 0);
        // A sandbox that is not ready: its containers are not running.
        let mut gone = sandbox(&[], NamespaceMode::Pod);
        gone.state = PodSandboxState::SandboxNotready as i32;
        assert!(
            !pod_container(&status(&[]), &runtime(), &gone)
                .unwrap()
                .running
        );
        // A sandbox without pod metadata: not a pod.
        let mut anonymous = sandbox(&[], NamespaceMode::Pod);
        anonymous.metadata = None;
        assert!(pod_container(&status(&[]), &runtime(), &anonymous).is_none());
    }
}
