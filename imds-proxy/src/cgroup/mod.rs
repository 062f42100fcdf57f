//! cgroup v2, as the proxy needs it: where the hierarchy is, a cgroup's id (the inode number of
//! its directory) and path both ways, which Docker container a path names and where Docker puts
//! a container, and ([`filter`]) the classification of cgroups as containers' or the host's.
//!
//! Ids are not reused while the machine is up, so a resolved id → path pair stays true. A path is
//! found from the recorded process (`/proc/<tgid>/cgroup`, checked against the id, since the
//! process may be gone and its pid reused) or, failing that, by a walk of the hierarchy.
pub mod filter;

use std::{
    collections::HashMap,
    fs::File,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::Mutex,
};

/// `statfs` magic of cgroup2.
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// Open a cgroup v2 directory; its file and its cgroup id (the directory's inode number).
pub fn open(path: &Path) -> std::io::Result<(File, u64)> {
    let fs = nix::sys::statfs::statfs(path)?.filesystem_type().0 as i64;
    if fs != CGROUP2_SUPER_MAGIC {
        return Err(std::io::Error::other(
            "not on a cgroup v2 hierarchy (programs attach to cgroup v2 only; on a hybrid host \
             it is usually mounted at /sys/fs/cgroup/unified)",
        ));
    }
    let file = File::open(path)?;
    let id = file.metadata()?.ino();
    Ok((file, id))
}

/// The cgroup id of a cgroup v2 directory.
pub fn id(path: &Path) -> std::io::Result<u64> {
    open(path).map(|(_, id)| id)
}

/// Resolves cgroup ids to paths, with a cache.
pub struct Cgroups {
    root: PathBuf,
    /// Where `/proc` is (another directory in unit tests).
    proc: PathBuf,
    cache: Mutex<HashMap<u64, String>>,
}

/// Entries kept before the cache starts over (ids of removed cgroups are never asked again).
const CACHE_LIMIT: usize = 65_536;
/// How deep a walk of the hierarchy goes looking for an id.
const WALK_DEPTH: usize = 8;

impl Cgroups {
    /// A resolver under the v2 root `root`, reading processes' cgroups from `/proc`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self::with_proc(root, "/proc")
    }

    /// The same, with `/proc` at `proc`.
    pub fn with_proc(root: impl Into<PathBuf>, proc: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            proc: proc.into(),
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The v2 root this resolver works under.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The path of the cgroup with this id if it was resolved before. Does not block.
    pub fn cached(&self, cgroup_id: u64) -> Option<String> {
        self.cache
            .lock()
            .expect("cache poisoned")
            .get(&cgroup_id)
            .cloned()
    }

    /// The path (relative to the v2 root, starting with `/`) of the cgroup with this id.
    pub fn resolve(&self, cgroup_id: u64, tgid: u32) -> Option<String> {
        if let Some(path) = self.cache.lock().expect("cache poisoned").get(&cgroup_id) {
            return Some(path.clone());
        }
        let path = self
            .via_proc(cgroup_id, tgid)
            .or_else(|| self.walk(&self.root, cgroup_id, WALK_DEPTH))?;
        let mut cache = self.cache.lock().expect("cache poisoned");
        if cache.len() >= CACHE_LIMIT {
            cache.clear();
        }
        cache.insert(cgroup_id, path.clone());
        Some(path)
    }

    fn id_of(&self, relative: &str) -> Option<u64> {
        let full = self.root.join(relative.trim_start_matches('/'));
        std::fs::metadata(full).ok().map(|m| m.ino())
    }

    fn via_proc(&self, cgroup_id: u64, tgid: u32) -> Option<String> {
        let text = std::fs::read_to_string(self.proc.join(tgid.to_string()).join("cgroup")).ok()?;
        let path = v2_path(&text)?;
        // The pid may have been reused by then: believe the path only if it is that cgroup.
        (self.id_of(path) == Some(cgroup_id)).then(|| path.to_owned())
    }

    fn walk(&self, dir: &Path, cgroup_id: u64, depth: usize) -> Option<String> {
        let entries = std::fs::read_dir(dir).ok()?;
        let mut subdirs = Vec::new();
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if !meta.is_dir() {
                continue;
            }
            if meta.ino() == cgroup_id {
                let rel = entry.path();
                let rel = rel.strip_prefix(&self.root).ok()?;
                return Some(format!("/{}", rel.display()));
            }
            subdirs.push(entry.path());
        }
        if depth == 0 {
            return None;
        }
        subdirs
            .iter()
            .find_map(|sub| self.walk(sub, cgroup_id, depth - 1))
    }
}

/// The cgroup v2 path in the text of a `/proc/<pid>/cgroup` file (the `0::` line).
pub fn v2_path(proc_cgroup: &str) -> Option<&str> {
    proc_cgroup.lines().find_map(|l| l.strip_prefix("0::"))
}

/// The container id a cgroup path names, for both cgroup drivers of Docker, of Podman and of the
/// kubelet's CRI runtimes: cgroupfs (Docker `<parent>/<64 hex>`, `/docker/<id>` by default;
/// Podman `<parent>/libpod-<64 hex>`, `/libpod_parent/libpod-<id>` by default; a pod's container
/// `/kubepods/<qos>/pod<uid>/<id>`) and systemd (`.../docker-<64 hex>.scope`,
/// `.../libpod-<64 hex>.scope`, `kubepods.slice/.../cri-containerd-<id>.scope` or `crio-<id>.scope`).
/// The deepest such segment counts: a container started with `--cgroup-parent` inside another
/// container's cgroup (`/docker/<a>/<b>`) is `b`, not `a`, and cgroups nested inside a
/// container's (`/docker/<id>/init.scope`) belong to it. The id alone is only a claim: the caller
/// checks it against the cgroup its runtime reports for that container (the runtime's layout,
/// above this module), so a directory named after another container inside one's own cgroup
/// proves nothing.
pub fn container_id(cgroup_path: &str) -> Option<String> {
    let is_id = |s: &str| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit());
    cgroup_path
        .split('/')
        .filter(|s| !s.is_empty())
        .filter_map(|s| {
            if is_id(s) {
                return Some(s);
            }
            if let Some(id) = s.strip_prefix("libpod-")
                && is_id(id)
            {
                return Some(id);
            }
            ["docker-", "libpod-", "cri-containerd-", "crio-"]
                .iter()
                .find_map(|prefix| s.strip_prefix(prefix))
                .and_then(|rest| rest.strip_suffix(".scope"))
                .filter(|id| is_id(id))
        })
        .next_back()
        .map(str::to_owned)
}

/// Where a systemd slice lives: `a-b.slice` at `/a.slice/a-b.slice`.
pub fn slice_path(slice: &str) -> String {
    let Some(name) = slice.strip_suffix(".slice") else {
        return format!("/{}", slice.trim_matches('/'));
    };
    let parts: Vec<&str> = name.split('-').collect();
    let mut path = String::new();
    for end in 1..=parts.len() {
        path.push('/');
        path.push_str(&parts[..end].join("-"));
        path.push_str(".slice");
    }
    path
}

/// The cgroup (relative to the v2 root) of an OCI runtime spec's `linux.cgroupsPath`, as a CRI
/// runtime writes it for each cgroup driver: a path (cgroupfs, `/kubepods/<qos>/pod<uid>/<id>`)
/// or `<slice>:<prefix>:<name>` (systemd, `kubepods-...-pod<uid>.slice:cri-containerd:<id>` is
/// `.../kubepods-...-pod<uid>.slice/cri-containerd-<id>.scope`). `None` for anything else.
pub fn from_cgroups_path(cgroups_path: &str) -> Option<String> {
    let path = cgroups_path.trim();
    if path.is_empty() || path.contains("..") {
        return None;
    }
    match path.split(':').collect::<Vec<_>>()[..] {
        [single] if single.starts_with('/') => Some(single.trim_end_matches('/').to_owned()),
        [slice, prefix, name]
            if slice.ends_with(".slice") && !prefix.is_empty() && !name.is_empty() =>
        {
            Some(format!("{}/{prefix}-{name}.scope", slice_path(slice)))
        }
        _ => None,
    }
}

/// Whether a cgroup path (relative or absolute) is the kubelet's, at or below `kubepods`
/// (cgroupfs) or `kubepods.slice` (systemd): everything there is a pod's, even where no
/// container id can be read from it.
pub fn is_pod_cgroup(cgroup_path: &str) -> bool {
    cgroup_path
        .split('/')
        .any(|s| matches!(s, "kubepods" | "kubepods.slice"))
}

/// Whether `caller_cgroup` is the container's cgroup `expected`, or nested inside it.
pub fn within(caller_cgroup: &str, expected: &str) -> bool {
    caller_cgroup == expected
        || caller_cgroup
            .strip_prefix(expected)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// Join the host's cgroup namespace when the proxy runs in a namespace of its own but sees the
/// host's processes: a Kubernetes pod (hostPID, privileged) always has a private cgroup
/// namespace, in which `/proc/*/cgroup` paths are relative to the pod's own cgroup, so the proxy
/// could neither find its own cgroup (whose connects must not be redirected to itself) nor read
/// callers' cgroups as the host's. PID 1 is then the host's init; its namespace is the host's.
/// Without the host's PID namespace (PID 1 is the proxy or its init), nothing changes. Call it
/// while the process has one thread: a namespace is joined per thread, and threads inherit it.
pub fn join_host_cgroup_namespace() -> anyhow::Result<()> {
    use anyhow::Context as _;
    let own = std::fs::read_link("/proc/self/ns/cgroup").context("reading /proc/self/ns/cgroup")?;
    let init = match std::fs::read_link("/proc/1/ns/cgroup") {
        Ok(init) => init,
        Err(err) => {
            // Not ours to read (a confined container): the proxy stays where it is; if that is
            // a private namespace, its own cgroup reads as `/` in the log that follows.
            tracing::warn!(
                %err,
                "cannot read PID 1's cgroup namespace; staying in the proxy's own (run it in the \
                 host's cgroup namespace, or unconfined with the host's PID namespace)"
            );
            return Ok(());
        }
    };
    if own == init {
        return Ok(());
    }
    let ns = File::open("/proc/1/ns/cgroup").context("opening /proc/1/ns/cgroup")?;
    nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWCGROUP).context(
        "joining the host's cgroup namespace (/proc/1/ns/cgroup): needs CAP_SYS_ADMIN; or run \
         the proxy in the host's cgroup namespace (docker run --cgroupns host)",
    )?;
    tracing::info!(
        from = %own.display(),
        to = %init.display(),
        "joined the host's cgroup namespace (the proxy's own was private, as a pod's is)"
    );
    Ok(())
}

/// This process's cgroup under the v2 `root`: its path and id. `/proc/self/cgroup` says `/` both
/// at the hierarchy's root and at the root of a private cgroup namespace (a container's, a pod's,
/// when the host's could not be joined); a cgroup2 mounted from inside the namespace is its root,
/// so its inode is the proxy's own cgroup, whose path is then found in the hierarchy.
pub fn own_cgroup(root: &Path) -> anyhow::Result<(String, u64)> {
    use anyhow::Context as _;
    let path = own_cgroup_path()?;
    let by_path = id(&root.join(path.trim_start_matches('/')))
        .with_context(|| format!("{path} under {}", root.display()))?;
    if path != "/" {
        return Ok((path, by_path));
    }
    let own = namespace_root_id().context("mounting cgroup2 to find the namespace's root")?;
    if own == by_path {
        return Ok((path, by_path));
    }
    let found = Cgroups::new(root)
        .walk(root, own, WALK_DEPTH)
        .with_context(|| {
            format!(
                "in a private cgroup namespace, the proxy's cgroup (id {own}) is not under {}",
                root.display()
            )
        })?;
    tracing::info!(
        own_cgroup = %found,
        "in a private cgroup namespace: the proxy's own cgroup found in the host's hierarchy"
    );
    Ok((found, own))
}

/// The id of this process's cgroup namespace's root: the inode of a cgroup2 mounted (for a
/// moment) from inside it.
fn namespace_root_id() -> std::io::Result<u64> {
    use nix::mount::{MntFlags, MsFlags, mount, umount2};
    let dir = std::env::temp_dir().join(format!("imds-proxy-cgroupns-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let found = mount(
        Some("none"),
        &dir,
        Some("cgroup2"),
        MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(std::io::Error::from)
    .and_then(|()| {
        let ino = std::fs::metadata(&dir).map(|m| m.ino());
        let _ = umount2(&dir, MntFlags::MNT_DETACH);
        ino
    });
    let _ = std::fs::remove_dir(&dir);
    found
}

/// The cgroup v2 path of this process, relative to the v2 root.
pub fn own_cgroup_path() -> std::io::Result<String> {
    let text = std::fs::read_to_string("/proc/self/cgroup")?;
    v2_path(&text)
        .map(str::to_owned)
        .ok_or_else(|| std::io::Error::other("no cgroup v2 line in /proc/self/cgroup"))
}

/// Where the cgroup v2 hierarchy is mounted (the first `cgroup2` mount).
pub fn cgroup2_root() -> std::io::Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    mounts
        .lines()
        .find_map(|l| {
            let mut f = l.split(' ');
            let _source = f.next()?;
            let at = f.next()?;
            (f.next()? == "cgroup2").then(|| PathBuf::from(at))
        })
        .ok_or_else(|| {
            std::io::Error::other(
                "no cgroup v2 hierarchy is mounted (mount one: mount -t cgroup2 none /sys/fs/cgroup/unified)",
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "5a2ba51e7b118ff00bfbb27ae5cea5ccd19c073019eba99867022d6424f472ab";

    #[test]
    fn container_ids_from_both_cgroup_drivers() {
        assert_eq!(container_id(&format!("/docker/{ID}")).as_deref(), Some(ID));
        assert_eq!(
            container_id(&format!("/system.slice/docker-{ID}.scope")).as_deref(),
            Some(ID)
        );
        // A cgroup nested inside the container's belongs to the container.
        assert_eq!(
            container_id(&format!("/docker/{ID}/init.scope")).as_deref(),
            Some(ID)
        );
        assert_eq!(container_id("/docker"), None);
        assert_eq!(container_id("/system.slice/docker.service"), None);
        assert_eq!(container_id("/docker/not-an-id"), None);
        assert_eq!(container_id(&format!("/docker/{}", &ID[..63])), None);
        assert_eq!(container_id("/user.slice/user-0.slice"), None);
        // The deepest id counts: a container whose --cgroup-parent is another's cgroup.
        let other = "1".repeat(64);
        assert_eq!(
            container_id(&format!("/docker/{ID}/{other}")).as_deref(),
            Some(other.as_str())
        );
        assert_eq!(
            container_id(&format!("/docker/{ID}/docker-{other}.scope/x")).as_deref(),
            Some(other.as_str())
        );
        // With a parent of its own choosing.
        assert_eq!(
            container_id(&format!("/elsewhere/{ID}")).as_deref(),
            Some(ID)
        );
        // Podman's, both drivers; its conmon's cgroup is not a container's.
        assert_eq!(
            container_id(&format!("/libpod_parent/libpod-{ID}")).as_deref(),
            Some(ID)
        );
        assert_eq!(
            container_id(&format!("/machine.slice/libpod-{ID}.scope/container")).as_deref(),
            Some(ID)
        );
        assert_eq!(container_id("/libpod_parent/conmon"), None);
        assert_eq!(
            container_id(&format!("/machine.slice/libpod-conmon-{ID}.scope")),
            None
        );
        assert_eq!(container_id(&format!("/libpod_parent/libpod-{ID}x")), None);
    }

    #[test]
    fn within_is_the_cgroup_or_below_it() {
        let expected = format!("/docker/{ID}");
        assert!(within(&expected, &expected));
        assert!(within(&format!("{expected}/init.scope"), &expected));
        assert!(!within(&format!("{expected}0"), &expected));
        assert!(!within("/docker", &expected));
    }

    #[test]
    fn kubelet_cgroups_for_both_drivers() {
        // cgroupfs: the runtime spec's path as is; the container id is its last segment.
        let cgroupfs = format!("/kubepods/besteffort/pod0b4d6c2a-1111-2222-3333-444455556666/{ID}");
        assert_eq!(
            from_cgroups_path(&cgroupfs).as_deref(),
            Some(cgroupfs.as_str())
        );
        assert_eq!(container_id(&cgroupfs).as_deref(), Some(ID));
        // systemd: slice:prefix:name, for containerd and CRI-O.
        let slice = "kubepods-besteffort-pod0b4d6c2a_1111_2222_3333_444455556666.slice";
        let containerd = from_cgroups_path(&format!("{slice}:cri-containerd:{ID}")).unwrap();
        assert_eq!(
            containerd,
            format!("/kubepods.slice/kubepods-besteffort.slice/{slice}/cri-containerd-{ID}.scope")
        );
        assert_eq!(container_id(&containerd).as_deref(), Some(ID));
        let crio = from_cgroups_path(&format!("{slice}:crio:{ID}")).unwrap();
        assert!(crio.ends_with(&format!("/crio-{ID}.scope")), "{crio}");
        assert_eq!(container_id(&crio).as_deref(), Some(ID));
        // CRI-O's conmon is not a container.
        assert_eq!(
            container_id(&format!("/kubepods.slice/crio-conmon-{ID}.scope")),
            None
        );
        // Not a cgroups path: refused, never guessed.
        for bad in [
            "",
            "relative/path",
            "a:b",
            "kubepods.slice::x",
            "/kubepods/../docker",
        ] {
            assert_eq!(from_cgroups_path(bad), None, "{bad:?}");
        }
        assert!(is_pod_cgroup("/kubepods/besteffort/podx"));
        assert!(is_pod_cgroup("/kubepods.slice/kubepods-burstable.slice"));
        assert!(is_pod_cgroup("/sys/fs/cgroup/unified/kubepods/burstable"));
        assert!(!is_pod_cgroup("/kubepodsx"));
        assert!(!is_pod_cgroup(&format!("/docker/{ID}")));
    }

    #[test]
    fn v2_line_of_proc_cgroup() {
        let hybrid = format!("9:name=systemd:/docker/{ID}\n1:cpu:/docker/{ID}\n0::/docker/{ID}\n");
        assert_eq!(v2_path(&hybrid), Some(format!("/docker/{ID}").as_str()));
        assert_eq!(v2_path("1:cpu:/\n"), None);
    }
}
