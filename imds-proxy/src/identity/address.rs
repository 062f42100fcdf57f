//! tc mode's confirmation of a source address, from the kernel instead of Docker: the container
//! Docker's index says has the address is the caller if its first process is alive in its cgroup
//! and that process's network namespace holds the address as a local one, now. Read from a
//! `/proc` of the host's pid namespace (a directory of test files in unit tests).
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
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
