//! Hand-made "containers" for tests: a cgroup v2 directory and a network namespace joined to the
//! host by a veth pair, and a way to start a process inside both. Everything is removed on drop.
use std::{
    fs::{self, File},
    net::{Ipv4Addr, Ipv6Addr},
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};

use crate::scene::ip;

/// The cgroup v2 mount point, found as the proxy finds it.
pub fn cgroup2_root() -> anyhow::Result<PathBuf> {
    imds_proxy::cgroup::cgroup2_root().context("run `cargo xtask setup`")
}

/// A cgroup v2 directory that is removed (after killing what is left in it) on drop.
pub struct TestCgroup {
    path: PathBuf,
}

impl TestCgroup {
    /// `<v2 root>/<name>`.
    pub fn new(name: &str) -> anyhow::Result<Self> {
        Self::at(cgroup2_root()?.join(name))
    }

    /// A child of this cgroup.
    pub fn child(&self, name: &str) -> anyhow::Result<Self> {
        Self::at(self.path.join(name))
    }

    fn at(path: PathBuf) -> anyhow::Result<Self> {
        if path.exists() {
            remove_cgroup_tree(&path)?;
        }
        fs::create_dir(&path).with_context(|| format!("creating cgroup {}", path.display()))?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path relative to the v2 root, as `/proc/<pid>/cgroup` writes it.
    pub fn relative(&self) -> String {
        let root = cgroup2_root().expect("a cgroup v2 root");
        format!(
            "/{}",
            self.path
                .strip_prefix(root)
                .expect("under the root")
                .display()
        )
    }

    /// The cgroup id (the directory's inode number).
    pub fn id(&self) -> u64 {
        imds_proxy::cgroup::id(&self.path).expect("cgroup exists")
    }
}

/// A cgroup at a given path under the v2 root (a runtime's layout: `/docker/buildkit/<id>`,
/// `/system.slice/<unit>`), made with whatever parents were missing. On drop the directories it
/// made are removed as [`TestCgroup`]s are (processes in them killed); those that existed before
/// (Docker's `/docker`, say) are left alone.
pub struct RootCgroup {
    path: PathBuf,
    // The topmost made directory first: dropping it removes everything made below it.
    _made: Vec<TestCgroup>,
}

impl RootCgroup {
    /// `relative`, a path under the v2 root starting with `/`.
    pub fn new(relative: &str) -> anyhow::Result<Self> {
        let mut path = cgroup2_root()?;
        let mut made = Vec::new();
        for segment in relative.trim_start_matches('/').split('/') {
            path.push(segment);
            if !path.exists() {
                made.push(TestCgroup::at(path.clone())?);
            }
        }
        Ok(Self { path, _made: made })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        if let Err(err) = remove_cgroup_tree(&self.path) {
            eprintln!("removing cgroup {}: {err:#}", self.path.display());
        }
    }
}

/// Kill every process in a cgroup tree and remove its directories, deepest first.
fn remove_cgroup_tree(path: &Path) -> anyhow::Result<()> {
    if !path.exists() {
        return Ok(());
    }
    for entry in fs::read_dir(path)?.flatten() {
        if entry.file_type()?.is_dir() {
            remove_cgroup_tree(&entry.path())?;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let procs = fs::read_to_string(path.join("cgroup.procs")).unwrap_or_default();
        if procs.trim().is_empty() {
            break;
        }
        for pid in procs.split_whitespace().filter_map(|p| p.parse().ok()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        ensure!(
            Instant::now() < deadline,
            "processes left in {}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    fs::remove_dir(path).with_context(|| format!("removing cgroup {}", path.display()))
}

/// A network namespace with a veth to the host: the namespace has `client_v4`/`client_v6` and
/// default routes via the host end (`host_v4`/`host_v6`).
pub struct TestNetns {
    pub name: String,
    host_if: String,
    pub host_v4: Ipv4Addr,
    pub client_v4: Ipv4Addr,
    pub host_v6: Ipv6Addr,
    pub client_v6: Ipv6Addr,
}

impl TestNetns {
    /// Namespace `imds-tns<n>`, addresses 10.213.<n>.0/24 and fd00:ec2:213:<n>::/64.
    pub fn new(n: u8) -> anyhow::Result<Self> {
        let this = Self {
            name: format!("imds-tns{n}"),
            host_if: format!("imds-tns{n}"),
            host_v4: Ipv4Addr::new(10, 213, n, 1),
            client_v4: Ipv4Addr::new(10, 213, n, 2),
            host_v6: Ipv6Addr::new(0xfd00, 0xec2, 0x213, n.into(), 0, 0, 0, 1),
            client_v6: Ipv6Addr::new(0xfd00, 0xec2, 0x213, n.into(), 0, 0, 0, 2),
        };
        this.remove();
        let ns = |args: &[&str]| {
            let mut full = vec!["-n", this.name.as_str()];
            full.extend_from_slice(args);
            ip(&full)
        };
        ip(&["netns", "add", &this.name])?;
        ip(&[
            "link",
            "add",
            &this.host_if,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &this.name,
        ])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/24", this.host_v4),
            "dev",
            &this.host_if,
        ])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/64", this.host_v6),
            "dev",
            &this.host_if,
            "nodad",
        ])?;
        ip(&["link", "set", &this.host_if, "up"])?;
        ns(&["link", "set", "lo", "up"])?;
        ns(&[
            "addr",
            "add",
            &format!("{}/24", this.client_v4),
            "dev",
            "eth0",
        ])?;
        ns(&[
            "addr",
            "add",
            &format!("{}/64", this.client_v6),
            "dev",
            "eth0",
            "nodad",
        ])?;
        ns(&["link", "set", "eth0", "up"])?;
        ns(&["route", "add", "default", "via", &this.host_v4.to_string()])?;
        ns(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            &this.host_v6.to_string(),
        ])?;
        Ok(this)
    }

    fn remove(&self) {
        let _ = ip(&["link", "del", &self.host_if]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Make `cmd` start inside `cgroup` and, when given, the network namespace `netns`, before it
/// executes: no moment of its life is spent elsewhere.
pub fn place(cmd: &mut Command, cgroup: &Path, netns: Option<&str>) -> anyhow::Result<()> {
    let procs = File::options()
        .write(true)
        .open(cgroup.join("cgroup.procs"))
        .with_context(|| format!("opening {}/cgroup.procs", cgroup.display()))?;
    let netns = netns
        .map(|name| {
            File::open(Path::new("/run/netns").join(name)).with_context(|| {
                let present: Vec<String> = fs::read_dir("/run/netns")
                    .map(|d| {
                        d.flatten()
                            .map(|e| e.file_name().to_string_lossy().into_owned())
                            .collect()
                    })
                    .unwrap_or_default();
                format!("opening network namespace {name} (/run/netns holds {present:?})")
            })
        })
        .transpose()?;
    let procs_fd = procs.as_raw_fd();
    let netns_fd = netns.as_ref().map(|f| f.as_raw_fd());
    // The files must stay open until spawn; the closure keeps them alive.
    let keep = (procs, netns);
    // SAFETY: only async-signal-safe calls (write, setns, prctl) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let _ = &keep;
            // Writing "0" moves the writing process itself.
            if libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(fd) = netns_fd
                && libc::setns(fd, libc::CLONE_NEWNET) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

/// Programs and maps of imds-proxy the kernel holds at one moment, by kernel id (names are cut
/// at 15 characters). A test compares against what it found before it started, so a program of
/// anyone else's on the machine (a developer's `cargo xtask run`, a bench) is none of its business.
#[derive(Clone, Debug, Default)]
pub struct KernelObjects(std::collections::BTreeMap<(&'static str, u32), String>);

impl KernelObjects {
    pub fn now() -> Self {
        let mut found = std::collections::BTreeMap::new();
        for program in aya::programs::loaded_programs().filter_map(Result::ok) {
            if let Some(name) = program.name_as_str().filter(|n| n.starts_with("imds_")) {
                found.insert(("program", program.id()), name.to_owned());
            }
        }
        for map in aya::maps::loaded_maps().filter_map(Result::ok) {
            if let Some(name) = map.name_as_str().filter(|n| n.starts_with("IMDS_")) {
                found.insert(("map", map.id()), name.to_owned());
            }
        }
        KernelObjects(found)
    }

    /// What is here that was not in `before`, as `program <name> (id <id>)`.
    pub fn since(&self, before: &KernelObjects) -> Vec<String> {
        self.0
            .iter()
            .filter(|(key, _)| !before.0.contains_key(key))
            .map(|((kind, id), name)| format!("{kind} {name} (id {id})"))
            .collect()
    }
}

/// imds-proxy's programs and maps loaded since `before`.
pub fn kernel_objects_since(before: &KernelObjects) -> Vec<String> {
    KernelObjects::now().since(before)
}

/// Wait (bounded: the kernel frees detached programs and maps asynchronously) until none of
/// imds-proxy's programs and maps loaded since `before` is left; what is left otherwise.
pub fn wait_kernel_objects_gone(before: &KernelObjects) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = kernel_objects_since(before);
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A host-wide sysctl set for a test and restored on drop, panics included.
pub struct Sysctl {
    path: PathBuf,
    before: String,
}

impl Sysctl {
    /// Set `/proc/sys/<name>` (dots or slashes) to `value`.
    pub fn set(name: &str, value: &str) -> anyhow::Result<Self> {
        let path = Path::new("/proc/sys").join(name.replace('.', "/"));
        let before = fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?
            .trim()
            .to_owned();
        fs::write(&path, value).with_context(|| format!("writing {}", path.display()))?;
        Ok(Self { path, before })
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        if let Err(err) = fs::write(&self.path, &self.before) {
            eprintln!("restoring {}: {err}", self.path.display());
        }
    }
}
