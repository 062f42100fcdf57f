//! A container's first process, read from `/proc`, and a watch on it: tc mode's confirmation of a
//! source address from the kernel instead of Docker (the identity module's), and the way into a
//! container's network namespace (the redirect's source book). A leaf: it knows nothing of the
//! proxy's other modules.
//!
//! The confirmation, from the kernel instead of Docker: the container
//! Docker's index says has the address is the caller if its first process is alive in its cgroup
//! and that process's network namespace holds the address as a local one, now. Read from a
//! `/proc` of the host's pid namespace (a directory of test files in unit tests).
//!
//! A confirmation is then **watched** ([`Watch`]), so that the next connections from the address
//! need no `/proc` reads: a pidfd of that first process (readable once it exits) and a netlink
//! socket inside its network namespace, subscribed to its link and address changes (readable once
//! any address or link there changes: the address deleted, the interface gone with a `docker
//! network disconnect`). While neither has anything to say, the namespace holds the address as it
//! did, and the process is the container's. Anything at all on either, or an error, ends the watch
//! and the next connection is confirmed from `/proc` again.
use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

/// A `/proc` to read.
#[derive(Clone, Debug)]
pub struct Proc(PathBuf);

impl Default for Proc {
    fn default() -> Self {
        Self(PathBuf::from("/proc"))
    }
}

impl Proc {
    pub fn at(path: impl Into<PathBuf>) -> Self {
        Self(path.into())
    }

    fn process(&self, pid: u32) -> PathBuf {
        self.0.join(pid.to_string())
    }

    /// Whether process `pid` (a container's first process, as Docker reported it) is alive in
    /// container `container_id`'s cgroup and its network namespace holds `ip` as a local
    /// address. `false` whenever anything cannot be read or does not match (the process is gone,
    /// its pid went to another process, the proxy does not share the host's pid namespace, the
    /// address was taken off it): the caller then asks Docker. Blocking.
    pub fn holds(&self, pid: u32, container_id: &str, ip: IpAddr) -> bool {
        if !self.in_container(pid, container_id) {
            return false;
        }
        let dir = self.process(pid);
        match ip {
            IpAddr::V4(ip) => read(&dir, "net/fib_trie").is_some_and(|trie| local_v4(&trie, ip)),
            IpAddr::V6(ip) => read(&dir, "net/if_inet6").is_some_and(|list| local_v6(&list, ip)),
        }
    }

    /// Whether process `pid` is in container `container_id`'s cgroup (cgroupfs `/docker/<id>`,
    /// systemd `docker-<id>.scope`): false when it is gone, its pid went to another process, or
    /// the proxy does not share the host's pid namespace. Blocking.
    pub fn in_container(&self, pid: u32, container_id: &str) -> bool {
        pid != 0
            && container_id.len() >= 12
            && read(&self.process(pid), "cgroup").is_some_and(|c| c.contains(container_id))
    }

    /// Process `pid`'s network namespace file.
    pub fn netns(&self, pid: u32) -> PathBuf {
        self.process(pid).join("ns/net")
    }

    /// [`Proc::holds`], and when it does, a [`Watch`] that stays quiet for as long as it goes on
    /// holding (none when the watch cannot be set up: a `/proc` of test files, no pidfd support;
    /// the answer is then good for this connection only). Blocking.
    pub fn holds_watched(&self, pid: u32, container_id: &str, ip: IpAddr) -> (bool, Option<Watch>) {
        // Watch first, then check: a change after the check is seen by the watch. A pid reused
        // before the pidfd was opened is caught by the check (not in the container's cgroup) or,
        // reused after it, by the pidfd (the process it names exited).
        let watch = Watch::open(pid, &self.netns(pid), container_id);
        if !self.holds(pid, container_id, ip) {
            return (false, None);
        }
        (true, watch.filter(Watch::quiet))
    }
}

/// What keeps a confirmation true: see the module's documentation.
#[derive(Debug)]
pub struct Watch {
    container_id: Arc<str>,
    pidfd: OwnedFd,
    netlink: OwnedFd,
}

impl Watch {
    fn open(pid: u32, netns: &Path, container_id: &str) -> Option<Self> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if pidfd < 0 {
            return None;
        }
        // SAFETY: a descriptor just returned to us, owned by nothing else.
        let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
        let netns = std::fs::File::open(netns).ok()?;
        Some(Self {
            container_id: container_id.into(),
            pidfd,
            netlink: netlink_in(netns)?,
        })
    }

    /// Whether nothing happened: the process alive, no link or address change in its namespace,
    /// no error on either. One `poll` with a zero timeout; does not block.
    pub fn quiet(&self) -> bool {
        let mut fds = [
            libc::pollfd {
                fd: self.pidfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.netlink.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfd structs, descriptors owned by self.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 0) };
        n == 0
    }
}

/// Run `work` on a thread of its own that enters the network namespace `netns` and ends with the
/// work (a thread's namespace dies with it): no thread of the proxy is ever left in a container's
/// namespace. Blocking. The one way the proxy works inside another namespace (the identity's
/// watches, tc mode's port lookup).
pub fn in_netns<T: Send + 'static>(
    netns: std::fs::File,
    work: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    std::thread::spawn(move || {
        nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(std::io::Error::from)?;
        work()
    })
    .join()
    .unwrap_or_else(|_| {
        Err(std::io::Error::other(
            "work in another network namespace panicked",
        ))
    })
}

/// A netlink route socket created inside the network namespace `netns`, subscribed to its link
/// and address changes ([`in_netns`]).
fn netlink_in(netns: std::fs::File) -> Option<OwnedFd> {
    in_netns(netns, || {
        // SAFETY: socket(2) with constant arguments.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a descriptor just returned to us.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_nl is plain data; zeroed is a valid value.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        addr.nl_groups =
            (libc::RTMGRP_LINK | libc::RTMGRP_IPV4_IFADDR | libc::RTMGRP_IPV6_IFADDR) as u32;
        // SAFETY: addr is a sockaddr_nl of the size given.
        let bound = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if bound != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(fd)
    })
    .ok()
}

/// The watched confirmations, by source address. Bounded: beyond [`Watched::LIMIT`] entries (two
/// descriptors each) the ones no longer quiet are dropped, and when all are, nothing new is
/// watched (those addresses are confirmed from `/proc` on every connection, as before). Watches
/// of containers gone are dropped when next looked at, or by [`Watched::sweep`].
#[derive(Debug, Default)]
pub struct Watched(Mutex<HashMap<IpAddr, Watch>>);

impl Watched {
    pub const LIMIT: usize = 4096;

    /// Drop every watch that is no longer quiet (its process exited, its namespace changed);
    /// how many were dropped.
    pub fn sweep(&self) -> usize {
        let mut watched = self.0.lock().expect("watched poisoned");
        let before = watched.len();
        watched.retain(|_, w| w.quiet());
        before - watched.len()
    }

    /// Whether `ip` is confirmed as container `container_id`'s by a watch that is still quiet.
    /// A watch that is not (or is another container's) is dropped. Does not block.
    pub fn confirms(&self, ip: IpAddr, container_id: &str) -> bool {
        let mut watched = self.0.lock().expect("watched poisoned");
        match watched.get(&ip) {
            None => false,
            Some(w) if &*w.container_id == container_id && w.quiet() => true,
            Some(_) => {
                watched.remove(&ip);
                false
            }
        }
    }

    pub fn insert(&self, ip: IpAddr, watch: Watch) {
        let mut watched = self.0.lock().expect("watched poisoned");
        if watched.len() >= Self::LIMIT {
            watched.retain(|_, w| w.quiet());
            if watched.len() >= Self::LIMIT {
                return;
            }
        }
        watched.insert(ip, watch);
    }

    pub fn len(&self) -> usize {
        self.0.lock().expect("watched poisoned").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn read(dir: &Path, file: &str) -> Option<String> {
    std::fs::read_to_string(dir.join(file)).ok()
}

/// Whether `/proc/net/fib_trie` lists `ip` as a local (host) address: a `|-- <ip>` leaf with a
/// `/32 host LOCAL` entry under it.
fn local_v4(trie: &str, ip: Ipv4Addr) -> bool {
    let mut leaf = None;
    for line in trie.lines() {
        let line = line.trim_start_matches([' ', '|', '+', '-']);
        if let Ok(addr) = line.parse::<Ipv4Addr>() {
            leaf = Some(addr);
        } else if line.split_whitespace().collect::<Vec<_>>() == ["/32", "host", "LOCAL"]
            && leaf == Some(ip)
        {
            return true;
        }
    }
    false
}

/// Whether `/proc/net/if_inet6` lists `ip` (its first column: the address in 32 hex digits).
fn local_v6(list: &str, ip: Ipv6Addr) -> bool {
    let hex: String = ip.octets().iter().map(|b| format!("{b:02x}")).collect();
    list.lines()
        .any(|line| line.split_whitespace().next() == Some(hex.as_str()))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub const ID: &str = "5a2ba51e7b118ff00bfbb27ae5cea5ccd19c073019eba99867022d6424f472ab";
    pub const TRIE: &str = "Main:\n  +-- 0.0.0.0/0 3 0 5\n     |-- 0.0.0.0\n        /0 universe UNICAST\n     \
                    +-- 172.17.0.0/16 2 0 2\n        +-- 172.17.0.0/30 2 0 2\n           |-- 172.17.0.0\n              \
                    /16 link UNICAST\n           |-- 172.17.0.2\n              /32 host LOCAL\n        \
                    |-- 172.17.255.255\n           /32 link BROADCAST\n";

    /// A `/proc` with process `pid` in container `id`'s cgroup, its namespace holding
    /// 172.17.0.2 and fd00::2.
    pub fn fake_proc(pid: u32, id: &str) -> (Proc, TempDir) {
        let dir = TempDir::new();
        let process = dir.0.join(pid.to_string());
        std::fs::create_dir_all(process.join("net")).unwrap();
        std::fs::write(process.join("cgroup"), format!("0::/docker/{id}\n")).unwrap();
        std::fs::write(process.join("net/fib_trie"), TRIE).unwrap();
        std::fs::write(
            process.join("net/if_inet6"),
            "fd000000000000000000000000000002 0b 40 00 80     eth0\n",
        )
        .unwrap();
        (Proc::at(&dir.0), dir)
    }

    /// A directory removed on drop.
    pub struct TempDir(pub PathBuf);

    impl TempDir {
        pub fn new() -> Self {
            use std::sync::atomic::{AtomicU32, Ordering};
            static N: AtomicU32 = AtomicU32::new(0);
            let path = std::env::temp_dir().join(format!(
                "imds-proxy-test-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&path).unwrap();
            Self(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn local_addresses_from_this_kernels_proc_net() {
        // The kernel's own rendering, for this process's namespace: loopback is local; the
        // loopback broadcast and 127.0.0.0/8 itself are listed, but not as /32 host LOCAL.
        let trie = std::fs::read_to_string("/proc/self/net/fib_trie").unwrap();
        assert!(local_v4(&trie, "127.0.0.1".parse().unwrap()), "{trie}");
        assert!(!local_v4(&trie, "127.255.255.255".parse().unwrap()));
        assert!(!local_v4(&trie, "127.0.0.0".parse().unwrap()));
        assert!(!local_v4(&trie, "192.0.2.77".parse().unwrap()));
        if let Ok(list) = std::fs::read_to_string("/proc/self/net/if_inet6") {
            assert!(local_v6(&list, "::1".parse().unwrap()), "{list}");
            assert!(!local_v6(&list, "2001:db8::77".parse().unwrap()));
        }
        // A process that is not in the named container never confirms it.
        let me = std::process::id();
        let proc = Proc::default();
        assert!(!proc.holds(me, ID, "127.0.0.1".parse().unwrap()));
        assert!(!proc.holds(0, ID, "127.0.0.1".parse().unwrap()));
    }

    #[test]
    fn a_watch_ends_when_its_process_exits() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let watch = Watch::open(child.id(), Path::new("/proc/self/ns/net"), ID).unwrap();
        assert!(watch.quiet());
        let watched = Watched::default();
        let ip: IpAddr = "172.17.0.2".parse().unwrap();
        watched.insert(ip, watch);
        assert!(watched.confirms(ip, ID));
        assert!(!watched.confirms(ip, &"1".repeat(64)), "another container");
        assert_eq!(watched.len(), 0, "a mismatch ends the watch");
        watched.insert(
            ip,
            Watch::open(child.id(), Path::new("/proc/self/ns/net"), ID).unwrap(),
        );
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!watched.confirms(ip, ID), "the process exited");
        assert_eq!(watched.len(), 0);
        // Unlooked-at watches of exited processes go with a sweep.
        let mut other = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let watch = Watch::open(other.id(), Path::new("/proc/self/ns/net"), ID).unwrap();
        watched.insert(ip, watch);
        assert_eq!(watched.sweep(), 0, "still quiet");
        other.kill().unwrap();
        other.wait().unwrap();
        assert_eq!(watched.sweep(), 1);
        assert!(watched.is_empty());
        assert!(
            Watch::open(child.id(), Path::new("/proc/self/ns/net"), ID).is_none(),
            "no pidfd for a reaped process"
        );
    }

    #[test]
    fn a_container_namespaces_fib_trie() {
        assert!(local_v4(TRIE, "172.17.0.2".parse().unwrap()));
        assert!(!local_v4(TRIE, "172.17.0.3".parse().unwrap()));
        assert!(!local_v4(TRIE, "172.17.255.255".parse().unwrap()));
        assert!(!local_v4(TRIE, "172.17.0.0".parse().unwrap()));
    }

    #[test]
    fn a_process_confirms_only_its_own_containers_addresses() {
        let (proc, _dir) = fake_proc(4242, ID);
        assert!(proc.holds(4242, ID, "172.17.0.2".parse().unwrap()));
        assert!(proc.holds(4242, ID, "fd00::2".parse().unwrap()));
        assert!(
            !proc.holds(4242, ID, "172.17.0.3".parse().unwrap()),
            "not its address"
        );
        let other = "1".repeat(64);
        assert!(
            !proc.holds(4242, &other, "172.17.0.2".parse().unwrap()),
            "not its container"
        );
        assert!(
            !proc.holds(4243, ID, "172.17.0.2".parse().unwrap()),
            "no such process"
        );
        assert!(
            !proc.holds(4242, &ID[..8], "172.17.0.2".parse().unwrap()),
            "a short id"
        );
    }
}
