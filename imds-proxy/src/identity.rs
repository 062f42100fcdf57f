//! Who is calling: the kernel's record of an accepted connection, resolved to a cgroup path and,
//! for Docker containers, a container id.
//!
//! A cgroup id is the inode number of the cgroup's directory on the v2 hierarchy; ids are not
//! reused while the machine is up, so a resolved id → path pair stays true. The path is found
//! from the recorded process (`/proc/<tgid>/cgroup`, checked against the id, since the process may
//! be gone and its pid reused) or, failing that, by a walk of the hierarchy.
use std::{
    collections::HashMap,
    net::SocketAddr,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use tokio::net::{TcpListener, TcpStream};

use crate::ebpf::{Record, Redirect};

/// A caller: in cgroup mode, the kernel vouched for it; in tc mode, it is the running container
/// that Docker says has the connection's source address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// What its IMDSv2 tokens are bound to: its cgroup id (cgroup mode), or 64 bits of its
    /// container id (tc mode). A token is good only for the caller it was minted for.
    pub token_subject: u64,
    /// 0 in tc mode.
    pub cgroup_id: u64,
    pub tgid: u32,
    /// The cgroup's path relative to the v2 root (`/docker/<id>`), when it could be resolved.
    pub cgroup: Option<String>,
    /// The Docker container id, when the cgroup is a container's.
    pub container_id: Option<String>,
    pub original_destination: SocketAddr,
}

/// tc mode's fast confirmation, from the kernel instead of Docker: whether process `pid` (a
/// container's first process, as Docker reported it) is alive in container `container_id`'s cgroup
/// and its network namespace holds `ip` as a local address, now. `false` whenever anything cannot
/// be read or does not match (the process is gone, its pid went to another process, the proxy does
/// not share the host's pid namespace, the address was taken off it): the caller then asks Docker.
pub fn process_holds(pid: u32, container_id: &str, ip: std::net::IpAddr) -> bool {
    if !process_in_container(pid, container_id) {
        return false;
    }
    let proc_dir = Path::new("/proc").join(pid.to_string());
    match ip {
        std::net::IpAddr::V4(ip) => std::fs::read_to_string(proc_dir.join("net/fib_trie"))
            .is_ok_and(|trie| local_v4(&trie, ip)),
        std::net::IpAddr::V6(ip) => std::fs::read_to_string(proc_dir.join("net/if_inet6"))
            .is_ok_and(|list| local_v6(&list, ip)),
    }
}

/// Whether process `pid`, as the proxy sees it in `/proc`, is in container `container_id`'s cgroup
/// (cgroupfs `/docker/<id>`, systemd `docker-<id>.scope`): false when it is gone, its pid went to
/// another process, or the proxy does not share the host's pid namespace. Blocking.
pub fn process_in_container(pid: u32, container_id: &str) -> bool {
    pid != 0
        && container_id.len() >= 12
        && std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .is_ok_and(|cgroups| cgroups.contains(container_id))
}

/// Whether `/proc/net/fib_trie` lists `ip` as a local (host) address: a `|-- <ip>` leaf with a
/// `/32 host LOCAL` entry under it.
fn local_v4(trie: &str, ip: std::net::Ipv4Addr) -> bool {
    let mut leaf = None;
    for line in trie.lines() {
        let line = line.trim_start_matches([' ', '|', '+', '-']);
        if let Ok(addr) = line.parse::<std::net::Ipv4Addr>() {
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
fn local_v6(list: &str, ip: std::net::Ipv6Addr) -> bool {
    let hex: String = ip.octets().iter().map(|b| format!("{b:02x}")).collect();
    list.lines()
        .any(|line| line.split_whitespace().next() == Some(hex.as_str()))
}

/// Resolves cgroup ids to paths, with a cache.
pub struct Cgroups {
    root: PathBuf,
    cache: Mutex<HashMap<u64, String>>,
}

/// Entries kept before the cache starts over (ids of removed cgroups are never asked again).
const CACHE_LIMIT: usize = 65_536;
/// How deep a walk of the hierarchy goes looking for an id.
const WALK_DEPTH: usize = 8;

impl Cgroups {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The v2 root this resolver works under.
    pub fn root(&self) -> &Path {
        &self.root
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
        let text = std::fs::read_to_string(format!("/proc/{tgid}/cgroup")).ok()?;
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

    /// The caller for a kernel record.
    pub fn caller(&self, record: Record) -> Caller {
        let cgroup = self.resolve(record.cgroup_id, record.tgid);
        let container_id = cgroup.as_deref().and_then(container_id);
        Caller {
            token_subject: record.cgroup_id,
            cgroup_id: record.cgroup_id,
            tgid: record.tgid,
            cgroup,
            container_id,
            original_destination: record.original_destination,
        }
    }
}

impl Caller {
    /// tc mode: the caller is the container that has the connection's source address.
    pub fn by_address(container_id: &str, original_destination: SocketAddr) -> Self {
        // Container ids are 64 random hex digits: the first 16 are 64 random bits.
        let token_subject = container_id
            .get(..16)
            .and_then(|hex| u64::from_str_radix(hex, 16).ok())
            .unwrap_or_else(|| {
                use std::hash::{Hash as _, Hasher as _};
                let mut h = std::collections::hash_map::DefaultHasher::new();
                container_id.hash(&mut h);
                h.finish()
            });
        Caller {
            token_subject,
            cgroup_id: 0,
            tgid: 0,
            cgroup: None,
            container_id: Some(container_id.to_owned()),
            original_destination,
        }
    }
}

/// The cgroup v2 path in the text of a `/proc/<pid>/cgroup` file (the `0::` line).
pub fn v2_path(proc_cgroup: &str) -> Option<&str> {
    proc_cgroup.lines().find_map(|l| l.strip_prefix("0::"))
}

/// The Docker container id a cgroup path names, for both cgroup drivers: cgroupfs
/// (`<parent>/<64 hex>`, `/docker/<id>` by default) and systemd (`.../docker-<64 hex>.scope`).
/// The deepest such segment counts: a container started with `--cgroup-parent` inside another
/// container's cgroup (`/docker/<a>/<b>`) is `b`, not `a`, and cgroups nested inside a
/// container's (`/docker/<id>/init.scope`) belong to it. The id alone is only a claim: the caller
/// checks it against the cgroup Docker reports for that container ([`expected_cgroup`]), so a
/// directory named after another container inside one's own cgroup proves nothing.
pub fn container_id(cgroup_path: &str) -> Option<String> {
    let is_id = |s: &str| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit());
    cgroup_path
        .split('/')
        .filter(|s| !s.is_empty())
        .filter_map(|s| {
            if is_id(s) {
                return Some(s);
            }
            s.strip_prefix("docker-")
                .and_then(|rest| rest.strip_suffix(".scope"))
                .filter(|id| is_id(id))
        })
        .next_back()
        .map(str::to_owned)
}

/// The cgroup (relative to the v2 root) Docker puts container `id` in, for its cgroup `driver`
/// and the container's `--cgroup-parent` (empty: Docker's default).
pub fn expected_cgroup(driver: &str, cgroup_parent: &str, id: &str) -> String {
    if driver == "systemd" {
        // A slice name; `a-b.slice` lives at /a.slice/a-b.slice.
        let slice = if cgroup_parent.is_empty() {
            "system.slice"
        } else {
            cgroup_parent
        };
        let mut path = String::new();
        if let Some(name) = slice.strip_suffix(".slice") {
            let parts: Vec<&str> = name.split('-').collect();
            for end in 1..=parts.len() {
                path.push('/');
                path.push_str(&parts[..end].join("-"));
                path.push_str(".slice");
            }
        } else {
            path = format!("/{}", slice.trim_matches('/'));
        }
        return format!("{path}/docker-{id}.scope");
    }
    let parent = if cgroup_parent.is_empty() {
        "/docker"
    } else {
        cgroup_parent
    };
    format!("/{}/{id}", parent.trim_matches('/'))
}

/// Whether `caller_cgroup` is the container's cgroup `expected`, or nested inside it.
pub fn within(caller_cgroup: &str, expected: &str) -> bool {
    caller_cgroup == expected
        || caller_cgroup
            .strip_prefix(expected)
            .is_some_and(|rest| rest.starts_with('/'))
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

/// An accepted peer and, when the kernel redirected it, who it is.
#[derive(Clone, Debug)]
pub struct Peer {
    pub addr: SocketAddr,
    pub caller: Option<Caller>,
}

/// A TCP listener that takes, for every accepted connection, the kernel's record of who opened
/// it. The record is taken at accept time, before any byte of the request is read.
///
/// In tc mode there is no record (`redirect` is `None`): every peer comes without a caller, and
/// the service identifies it by its source address.
pub struct AttestedListener {
    inner: TcpListener,
    redirect: Option<Arc<Redirect>>,
    cgroups: Arc<Cgroups>,
}

/// An accepted connection whose record is taken but not resolved yet: resolving a cgroup id may
/// read `/proc` and walk the cgroup tree, which blocks ([`Pending::attest`]).
pub struct Pending {
    addr: SocketAddr,
    record: Option<Record>,
    cgroups: Arc<Cgroups>,
}

impl Pending {
    /// Who the peer is. Blocking: call it off the async workers.
    pub fn attest(self) -> Peer {
        let caller = self.record.map(|record| self.cgroups.caller(record));
        Peer {
            addr: self.addr,
            caller,
        }
    }
}

impl AttestedListener {
    pub fn new(inner: TcpListener, redirect: Option<Arc<Redirect>>, cgroups: Arc<Cgroups>) -> Self {
        Self {
            inner,
            redirect,
            cgroups,
        }
    }

    /// Accept one connection and take its record (a map lookup and delete).
    pub async fn accept_pending(&mut self) -> std::io::Result<(TcpStream, Pending)> {
        let (stream, addr) = self.inner.accept().await?;
        let record = self
            .redirect
            .as_ref()
            .and_then(|redirect| redirect.take_record(addr));
        Ok((
            stream,
            Pending {
                addr,
                record,
                cgroups: self.cgroups.clone(),
            },
        ))
    }

    /// Accept one connection and attest it, on this task.
    pub async fn accept_attested(&mut self) -> std::io::Result<(TcpStream, Peer)> {
        let (stream, pending) = self.accept_pending().await?;
        Ok((stream, pending.attest()))
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }
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
    }

    #[test]
    fn expected_cgroups_for_both_drivers_and_custom_parents() {
        assert_eq!(expected_cgroup("cgroupfs", "", ID), format!("/docker/{ID}"));
        assert_eq!(
            expected_cgroup("cgroupfs", "/docker/abc", ID),
            format!("/docker/abc/{ID}")
        );
        assert_eq!(
            expected_cgroup("systemd", "", ID),
            format!("/system.slice/docker-{ID}.scope")
        );
        assert_eq!(
            expected_cgroup("systemd", "a-b.slice", ID),
            format!("/a.slice/a-b.slice/docker-{ID}.scope")
        );
        let expected = format!("/docker/{ID}");
        assert!(within(&expected, &expected));
        assert!(within(&format!("{expected}/init.scope"), &expected));
        assert!(!within(&format!("{expected}0"), &expected));
        assert!(!within("/docker", &expected));
        // A directory named after another container inside one's own cgroup.
        let other = "1".repeat(64);
        let forged = format!("/docker/{ID}/{other}");
        let claimed = container_id(&forged).unwrap();
        assert!(!within(&forged, &expected_cgroup("cgroupfs", "", &claimed)));
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
        assert!(!process_holds(me, ID, "127.0.0.1".parse().unwrap()));
        assert!(!process_holds(0, ID, "127.0.0.1".parse().unwrap()));
    }

    #[test]
    fn a_container_namespaces_fib_trie() {
        let trie = "Main:\n  +-- 0.0.0.0/0 3 0 5\n     |-- 0.0.0.0\n        /0 universe UNICAST\n     \
                    +-- 172.17.0.0/16 2 0 2\n        +-- 172.17.0.0/30 2 0 2\n           |-- 172.17.0.0\n              \
                    /16 link UNICAST\n           |-- 172.17.0.2\n              /32 host LOCAL\n        \
                    |-- 172.17.255.255\n           /32 link BROADCAST\n";
        assert!(local_v4(trie, "172.17.0.2".parse().unwrap()));
        assert!(!local_v4(trie, "172.17.0.3".parse().unwrap()));
        assert!(!local_v4(trie, "172.17.255.255".parse().unwrap()));
        assert!(!local_v4(trie, "172.17.0.0".parse().unwrap()));
    }

    #[test]
    fn v2_line_of_proc_cgroup() {
        let hybrid = format!("9:name=systemd:/docker/{ID}\n1:cpu:/docker/{ID}\n0::/docker/{ID}\n");
        assert_eq!(v2_path(&hybrid), Some(format!("/docker/{ID}").as_str()));
        assert_eq!(v2_path("1:cpu:/\n"), None);
    }
}
