//! Which runtime a container source is ([`Kind`]): Docker itself, Podman's Docker-compatible
//! service, or a Kubernetes node's CRI runtime. The one enum that names a runtime: `--runtime`
//! spells it, the source reports it, the daemon checks one against the other, and the cgroup
//! layout each runtime uses is here beside it ([`Kind::cgroup_of`]).
use crate::cgroup::slice_path;

/// A container runtime, as the proxy tells them apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Docker,
    Podman,
    /// containerd or CRI-O: a container's cgroup is read from its OCI runtime spec
    /// ([`crate::cgroup::from_cgroups_path`]); its layout below is containerd's choice when the
    /// kubelet gives no parent.
    Cri,
}

impl Kind {
    /// Its name in logs, `/readyz` and metrics (`docker`, `podman`, `cri`).
    pub fn name(self) -> &'static str {
        match self {
            Kind::Docker => "docker",
            Kind::Podman => "podman",
            Kind::Cri => "cri",
        }
    }

    /// Where containers go without a `--cgroup-parent`, per cgroup driver.
    fn default_parent(self, systemd: bool) -> &'static str {
        match (self, systemd) {
            (Kind::Docker, false) => "/docker",
            (Kind::Docker, true) => "system.slice",
            (Kind::Podman, false) => "/libpod_parent",
            (Kind::Podman, true) => "machine.slice",
            (Kind::Cri, false) => "/k8s.io",
            (Kind::Cri, true) => "system.slice",
        }
    }

    /// A container's own cgroup under its parent, per cgroup driver.
    fn leaf(self, systemd: bool, id: &str) -> String {
        match (self, systemd) {
            (Kind::Docker, false) => id.to_owned(),
            (Kind::Docker, true) => format!("docker-{id}.scope"),
            (Kind::Podman, false) => format!("libpod-{id}"),
            (Kind::Podman, true) => format!("libpod-{id}.scope"),
            (Kind::Cri, false) => id.to_owned(),
            (Kind::Cri, true) => format!("cri-containerd-{id}.scope"),
        }
    }

    /// The cgroup (relative to the v2 root) this runtime puts container `id` in, for its cgroup
    /// `driver` and the container's `--cgroup-parent` (empty: the runtime's default).
    pub fn cgroup_of(self, driver: &str, cgroup_parent: &str, id: &str) -> String {
        let systemd = driver == "systemd";
        let parent = if cgroup_parent.is_empty() {
            self.default_parent(systemd)
        } else {
            cgroup_parent
        };
        let leaf = self.leaf(systemd, id);
        if systemd {
            return format!("{}/{leaf}", slice_path(parent));
        }
        format!("/{}/{leaf}", parent.trim_matches('/'))
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroup::{container_id, within};

    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn podman_s_expected_cgroups() {
        assert_eq!(
            Kind::Podman.cgroup_of("cgroupfs", "", ID),
            format!("/libpod_parent/libpod-{ID}")
        );
        assert_eq!(
            Kind::Podman.cgroup_of("cgroupfs", "/mine", ID),
            format!("/mine/libpod-{ID}")
        );
        assert_eq!(
            Kind::Podman.cgroup_of("systemd", "", ID),
            format!("/machine.slice/libpod-{ID}.scope")
        );
        // A Docker container's cgroup is not where Podman would put the same id.
        assert!(!within(
            &Kind::Docker.cgroup_of("cgroupfs", "", ID),
            &Kind::Podman.cgroup_of("cgroupfs", "", ID)
        ));
    }

    #[test]
    fn expected_cgroups_for_both_drivers_and_custom_parents() {
        assert_eq!(
            Kind::Docker.cgroup_of("cgroupfs", "", ID),
            format!("/docker/{ID}")
        );
        assert_eq!(
            Kind::Docker.cgroup_of("cgroupfs", "/docker/abc", ID),
            format!("/docker/abc/{ID}")
        );
        assert_eq!(
            Kind::Docker.cgroup_of("systemd", "", ID),
            format!("/system.slice/docker-{ID}.scope")
        );
        assert_eq!(
            Kind::Docker.cgroup_of("systemd", "a-b.slice", ID),
            format!("/a.slice/a-b.slice/docker-{ID}.scope")
        );
        // A directory named after another container inside one's own cgroup.
        let other = "1".repeat(64);
        let forged = format!("/docker/{ID}/{other}");
        let claimed = container_id(&forged).unwrap();
        assert!(!within(
            &forged,
            &Kind::Docker.cgroup_of("cgroupfs", "", &claimed)
        ));
    }
}
