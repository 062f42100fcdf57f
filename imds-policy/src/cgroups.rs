//! Whose a cgroup is: the host's or a container's, from its path alone. **Default deny**: a
//! cgroup is the host's only when its path positively has the shape of a host service; every
//! other path (an engine's parent and all below it, a layout this code has never seen, a name
//! an attacker made up) is a container's. A container's IMDS connects are redirected to the
//! proxy, which gives a cgroup it cannot match to a container no role; a host's pass to the
//! instance's IMDS. So an unknown runtime costs a host service its direct access (the operator
//! names it with `--host-cgroup`), never a container the instance's role.
//!
//! The host's shapes (paths relative to the cgroup v2 root):
//! - the root itself (`/`) and `/init.scope`;
//! - `/system.slice` and `/user.slice`, and below them any chain of systemd units (`*.slice`,
//!   `*.service`, `*.scope`) none of whose names carries a container marker;
//! - the container engines' own daemons (`docker.service`, `containerd.service`, ...) in those
//!   places: dockerd itself may need the instance's credentials (the `awslogs` log driver);
//! - whatever matches one of the operator's globs (`--host-cgroup`), as long as no segment of it
//!   carries a container marker: a glob can let a host agent in an unusual place through, but no
//!   glob, however broad, turns a container's cgroup into the host's.
//!
//! A container marker is anything a runtime puts in the names of its containers' cgroups
//! (`docker`, `libpod`, `kubepods`, `buildkit`, `lxc`, `machine`, ...) or a container id (a run
//! of 32 or more hex digits).
use crate::roles::Glob;

/// Who a cgroup belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Owner {
    /// A host service: its IMDS connects pass to the instance's IMDS.
    Host,
    /// A container's (or unknown, which is the same): redirected to the proxy.
    Container,
}

/// The host's cgroups beyond the built-in shapes (`--host-cgroup`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostCgroups {
    globs: Vec<Glob>,
}

/// Engines' daemons: host services whose unit names contain a marker.
const ENGINE_DAEMONS: [&str; 7] = [
    "docker.service",
    "docker.socket",
    "containerd.service",
    "crio.service",
    "podman.service",
    "podman.socket",
    "kubelet.service",
];

/// Substrings of a cgroup name that runtimes put in their containers' cgroups (lowercase).
const MARKERS: [&str; 16] = [
    "docker",
    "libpod",
    "podman",
    "containerd",
    "crio",
    "cri-",
    "kubepods",
    "buildkit",
    "nerdctl",
    "lxc",
    "incus",
    "machine",
    "nspawn",
    "container",
    "runc",
    "sandbox",
];

impl HostCgroups {
    /// Parse the operator's globs: each an absolute cgroup path (relative to the v2 root) with
    /// `*` and `?` wildcards.
    pub fn parse<'a>(globs: impl IntoIterator<Item = &'a str>) -> Result<Self, String> {
        let globs = globs
            .into_iter()
            .map(|glob| {
                let glob = glob.trim();
                if !glob.starts_with('/') {
                    return Err(format!(
                        "{glob:?}: a cgroup path relative to the cgroup v2 root, starting with '/'"
                    ));
                }
                if glob.split('/').any(|s| s == ".." || s == ".") {
                    return Err(format!("{glob:?}: no '.' or '..' segments"));
                }
                Glob::parse(glob)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { globs })
    }

    /// Whose the cgroup at `path` (relative to the v2 root, `/` for the root) is.
    pub fn classify(&self, path: &str) -> Owner {
        let Some(segments) = segments(path) else {
            return Owner::Container;
        };
        if segments.iter().any(|s| is_marked(s)) {
            return Owner::Container;
        }
        if is_host_shape(&segments) || self.globs.iter().any(|g| g.matches(path)) {
            Owner::Host
        } else {
            Owner::Container
        }
    }
}

/// The path's segments; `None` for anything that is not a plain absolute path.
fn segments(path: &str) -> Option<Vec<&str>> {
    let rest = path.strip_prefix('/')?;
    if rest.is_empty() {
        return Some(Vec::new());
    }
    let segments: Vec<&str> = rest.trim_end_matches('/').split('/').collect();
    segments
        .iter()
        .all(|s| {
            !s.is_empty() && *s != "." && *s != ".." && !s.bytes().any(|b| b.is_ascii_control())
        })
        .then_some(segments)
}

/// Whether a segment carries a container marker (an engine daemon's own unit does not).
fn is_marked(segment: &str) -> bool {
    if ENGINE_DAEMONS.contains(&segment) {
        return false;
    }
    let lower = segment.to_ascii_lowercase();
    MARKERS.iter().any(|m| lower.contains(m)) || has_id(&lower)
}

/// Whether a name holds a run of 32 or more hex digits: a container's id (Docker's, Podman's, a
/// CRI runtime's are 64), not a name a host service is given.
fn has_id(lower: &str) -> bool {
    lower
        .split(|c: char| !c.is_ascii_alphanumeric())
        .any(|run| run.len() >= 32 && run.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The built-in host shapes (segments already free of markers).
fn is_host_shape(segments: &[&str]) -> bool {
    let unit = |s: &str| {
        [".slice", ".service", ".scope"].iter().any(|suffix| {
            s.strip_suffix(suffix).is_some_and(|name| {
                !name.is_empty()
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.@:\\".contains(&b))
            })
        })
    };
    match segments {
        [] | ["init.scope"] => true,
        ["system.slice" | "user.slice", rest @ ..] => rest.iter().all(|s| unit(s)),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "5a2ba51e7b118ff00bfbb27ae5cea5ccd19c073019eba99867022d6424f472ab";

    fn owner(path: &str) -> Owner {
        HostCgroups::default().classify(path)
    }

    #[test]
    fn host_services_are_the_hosts() {
        for path in [
            "/",
            "/init.scope",
            "/system.slice",
            "/system.slice/sshd.service",
            "/system.slice/amazon-ssm-agent.service",
            "/system.slice/system-getty.slice/getty@tty1.service",
            "/system.slice/docker.service",
            "/system.slice/containerd.service",
            "/system.slice/kubelet.service",
            "/system.slice/run-r0123456789abcdef0123456789abcdef.scope",
            "/user.slice",
            "/user.slice/user-1000.slice/session-3.scope",
            "/user.slice/user-1000.slice/user@1000.service/app.slice/tmux.scope",
        ] {
            assert_eq!(owner(path), Owner::Host, "{path}");
        }
    }

    #[test]
    fn every_container_layout_and_everything_unknown_is_a_containers() {
        let buildkit = "k7x2q9m4n8p1r5t3v6w0y2z4a";
        for path in [
            format!("/docker/{ID}"),
            "/docker".to_owned(),
            format!("/docker/buildkit/{buildkit}"),
            format!("/system.slice/docker-{buildkit}.scope"),
            format!("/system.slice/docker-{ID}.scope"),
            format!("/system.slice/docker-{ID}.scope/init.scope"),
            format!("/buildkit/{buildkit}"),
            format!("/libpod_parent/libpod-{ID}"),
            format!("/machine.slice/libpod-{ID}.scope"),
            format!("/system.slice/myapp.service/libpod-payload-{ID}"),
            format!("/system.slice/nerdctl-{ID}.scope"),
            "/default/web".to_owned(),
            "/k8s.io/abc".to_owned(),
            "/lxc.payload.web".to_owned(),
            "/lxc.monitor.web".to_owned(),
            "/machine.slice/machine-web.scope".to_owned(),
            "/kubepods/besteffort/pod1234/x".to_owned(),
            "/kubepods.slice/kubepods-besteffort.slice".to_owned(),
            format!("/system.slice/cri-containerd-{ID}.scope"),
            "/system.slice/foo.service/payload".to_owned(),
            "/system.slice/not-a-unit".to_owned(),
            "/app.slice/foo.service".to_owned(),
            "/anything".to_owned(),
            "/user.slice/user-1000.slice/user@1000.service/user.slice/podman-123.scope".to_owned(),
            format!("/user.slice/{ID}.scope"),
            // Not a plain path.
            "".to_owned(),
            "system.slice/sshd.service".to_owned(),
            "/system.slice/../docker".to_owned(),
            "/system.slice//sshd.service".to_owned(),
            "/system.slice/a\nb.service".to_owned(),
        ] {
            assert_eq!(owner(&path), Owner::Container, "{path:?}");
        }
    }

    #[test]
    fn operator_globs_add_host_cgroups_but_never_a_containers() {
        let hosts = HostCgroups::parse(["/agents/*", "/system.slice/*"]).unwrap();
        assert_eq!(hosts.classify("/agents/ssm"), Owner::Host);
        assert_eq!(hosts.classify("/agents"), Owner::Container);
        assert_eq!(hosts.classify("/system.slice/foo.service/sub"), Owner::Host);
        assert_eq!(
            hosts.classify(&format!("/system.slice/docker-{ID}.scope")),
            Owner::Container
        );
        assert_eq!(
            hosts.classify("/agents/lxc.payload.x"),
            Owner::Container,
            "a marker wins over a glob"
        );
        for bad in ["agents/*", "/a/../b", "", "  "] {
            assert!(HostCgroups::parse([bad]).is_err(), "{bad:?}");
        }
    }
}
