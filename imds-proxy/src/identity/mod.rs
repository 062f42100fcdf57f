//! Who is calling: one place decides, for both modes, at accept ([`Attestor::identify`]); the
//! HTTP service only reads the answer ([`Peer`]).
//!
//! - **Kernel evidence** (cgroup mode; host-network containers in tc mode): the record sock_ops
//!   left for the connection names the socket's cgroup and the process that connected. The cgroup
//!   is resolved to a path; a Docker container id in the path is only a claim until it matches
//!   where Docker put that container (a directory can be named after another container).
//! - **Address evidence** (tc mode, bridged containers): the connection's source address, which
//!   the source guard vouched for on the container's own port. The container Docker's index says
//!   has it is confirmed from `/proc` (its first process alive in its cgroup, the address local
//!   in its namespace), else by asking Docker. Once per connection.
//!
//! A connection with neither (someone connecting to the listen address directly) is refused.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

pub use crate::process::{Proc, Watched};
use tokio::net::{TcpListener, TcpStream};

use crate::{
    cgroup::{self, Cgroups},
    redirect::cgroup::{CgroupRedirect, Record},
    runtime::{Container, Containers},
};

/// Who a connection is from.
#[derive(Clone, Debug)]
pub struct Caller {
    /// Its container, when it is one Docker knows (and, with kernel evidence, its cgroup is where
    /// Docker put it). A caller without one gets no role.
    pub container: Option<Arc<Container>>,
    /// What its IMDSv2 tokens are bound to: its cgroup id, or 64 bits of its container id. A
    /// token is good only for the caller it was minted for.
    pub subject: u64,
    pub evidence: Evidence,
    /// Where the client was connecting: the IMDS address.
    pub original_destination: SocketAddr,
}

/// Why the attestor believes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Evidence {
    /// The kernel's record: the socket's cgroup (its path relative to the v2 root, when it could
    /// be resolved) and the process that connected.
    Kernel {
        cgroup_id: u64,
        tgid: u32,
        cgroup: Option<String>,
    },
    /// The connection's source address, confirmed as the container's.
    Address(IpAddr),
}

/// Why a connection has no caller. Its requests are answered 403.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("connection without a kernel record (not redirected from a container)")]
    NoRecord,
    #[error("no running container has this source address")]
    NoContainerAtAddress,
}

impl Caller {
    pub fn container_id(&self) -> Option<&str> {
        self.container.as_deref().map(|c| c.id.as_str())
    }

    /// The cgroup path, with kernel evidence.
    pub fn cgroup(&self) -> Option<&str> {
        match &self.evidence {
            Evidence::Kernel { cgroup, .. } => cgroup.as_deref(),
            Evidence::Address(_) => None,
        }
    }

    /// A caller identified by its source address: container `container`.
    pub fn at_address(container: Arc<Container>, peer: SocketAddr) -> Self {
        // Container ids are 64 random hex digits: the first 16 are 64 random bits.
        let subject = container
            .id
            .get(..16)
            .and_then(|hex| u64::from_str_radix(hex, 16).ok())
            .unwrap_or_else(|| {
                use std::hash::{Hash as _, Hasher as _};
                let mut h = std::collections::hash_map::DefaultHasher::new();
                container.id.hash(&mut h);
                h.finish()
            });
        Caller {
            container: Some(container),
            subject,
            evidence: Evidence::Address(peer.ip()),
            original_destination: imds_address(peer),
        }
    }
}

/// Where a redirected client of this family was connecting: the IMDS address, port 80.
fn imds_address(peer: SocketAddr) -> SocketAddr {
    use imds_common::{IMDS_PORT, IMDS_V4_OCTETS, IMDS_V6_OCTETS};
    match peer {
        SocketAddr::V4(_) => (std::net::Ipv4Addr::from(IMDS_V4_OCTETS), IMDS_PORT).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::from(IMDS_V6_OCTETS), IMDS_PORT).into(),
    }
}

/// Decides who each connection is from.
pub struct Attestor {
    /// The kernel's records (none in a unit test).
    records: Option<Arc<CgroupRedirect>>,
    cgroups: Arc<Cgroups>,
    containers: Arc<dyn Containers>,
    proc: Proc,
    /// tc mode: a connection without a record is identified by its source address.
    by_address: bool,
    /// tc mode: confirmations the kernel still vouches for (see [`address`]).
    watched: Watched,
    confirmed_by_watch: AtomicU64,
    confirmed_by_kernel: AtomicU64,
    confirmed_by_runtime: AtomicU64,
    /// Connections identified by a kernel record; connections refused for want of any evidence.
    by_record: AtomicU64,
    refused: AtomicU64,
    /// Lines about a caller's cgroup (what a container controls): one per cgroup a minute.
    quiet: imds_policy::quiet::Quiet<(u64, &'static str)>,
}

impl Attestor {
    /// Whether a line about this cgroup's `reason` is written now (see [`imds_policy::quiet`]).
    fn quietly(&self, cgroup_id: u64, reason: &'static str) -> Option<u64> {
        self.quiet
            .admit((cgroup_id, reason), std::time::Instant::now())
    }

    /// Lines about callers kept quiet so far.
    pub fn lines_suppressed(&self) -> u64 {
        self.quiet.suppressed()
    }

    pub fn new(
        records: Option<Arc<CgroupRedirect>>,
        cgroups: Arc<Cgroups>,
        containers: Arc<dyn Containers>,
        proc: Proc,
        by_address: bool,
    ) -> Self {
        Self {
            records,
            cgroups,
            containers,
            proc,
            by_address,
            watched: Watched::default(),
            confirmed_by_watch: AtomicU64::new(0),
            confirmed_by_kernel: AtomicU64::new(0),
            confirmed_by_runtime: AtomicU64::new(0),
            by_record: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            quiet: imds_policy::quiet::Quiet::new(
                std::time::Duration::from_secs(60),
                20.0,
                50.0,
                16_384,
                std::time::Instant::now(),
            ),
        }
    }

    /// Take (read and delete) the kernel's record of the connection from `peer`: at accept,
    /// before anything else, so that the same address and port never vouch twice.
    pub fn take_record(&self, peer: SocketAddr) -> Option<Record> {
        self.records.as_ref()?.take_record(peer)
    }

    /// Who the connection from `peer` is, from its `record` or (tc mode) its address.
    pub async fn identify(
        &self,
        peer: SocketAddr,
        record: Option<Record>,
    ) -> Result<Caller, Refusal> {
        let caller = match record {
            Some(record) => {
                self.by_record.fetch_add(1, Ordering::Relaxed);
                Ok(self.by_kernel(record).await)
            }
            None if self.by_address => self.by_source(peer).await,
            None => Err(Refusal::NoRecord),
        };
        if caller.is_err() {
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
        caller
    }

    async fn by_kernel(&self, record: Record) -> Caller {
        // Cgroup ids are never reused, so a path resolved once is good for good. Resolving a new
        // one may read /proc and walk the cgroup tree: off the async workers.
        let cgroup = match self.cgroups.cached(record.cgroup_id) {
            Some(path) => Some(path),
            None => {
                let cgroups = self.cgroups.clone();
                tokio::task::spawn_blocking(move || cgroups.resolve(record.cgroup_id, record.tgid))
                    .await
                    .ok()
                    .flatten()
            }
        };
        let container = match cgroup.as_deref().and_then(cgroup::container_id) {
            None => None,
            Some(id) => match self.containers.get(&id).await {
                None => {
                    if let Some(repeats) = self.quietly(record.cgroup_id, "unknown_container") {
                        tracing::warn!(
                            container_id = id,
                            repeats,
                            "container unknown to the runtime: no role"
                        );
                    }
                    None
                }
                Some(container)
                    if !cgroup::within(
                        cgroup.as_deref().unwrap_or_default(),
                        &container.cgroup,
                    ) =>
                {
                    if let Some(repeats) = self.quietly(record.cgroup_id, "cgroup_mismatch") {
                        tracing::warn!(
                            container_id = id,
                            caller_cgroup = cgroup.as_deref().unwrap_or_default(),
                            runtime_cgroup = %container.cgroup,
                            repeats,
                            "refused: the caller's cgroup is not where the runtime put the \
                             container it names; no role"
                        );
                    }
                    None
                }
                Some(container) => Some(container),
            },
        };
        Caller {
            container,
            subject: record.cgroup_id,
            evidence: Evidence::Kernel {
                cgroup_id: record.cgroup_id,
                tgid: record.tgid,
                cgroup,
            },
            original_destination: record.original_destination,
        }
    }

    async fn by_source(&self, peer: SocketAddr) -> Result<Caller, Refusal> {
        let ip = peer.ip();
        let candidate = self.containers.indexed_with_address(ip);
        if let Some(container) = &candidate {
            // Confirmed before, and nothing changed since: no /proc reads, no blocking.
            if self.watched.confirms(ip, &container.id) {
                self.confirmed_by_watch.fetch_add(1, Ordering::Relaxed);
                return Ok(Caller::at_address(container.clone(), peer));
            }
            let (proc, pid, id) = (self.proc.clone(), container.pid, container.id.clone());
            let (held, watch) =
                tokio::task::spawn_blocking(move || proc.holds_watched(pid, &id, ip))
                    .await
                    .unwrap_or((false, None));
            if held {
                if let Some(watch) = watch {
                    self.watched.insert(ip, watch);
                }
                self.confirmed_by_kernel.fetch_add(1, Ordering::Relaxed);
                return Ok(Caller::at_address(container.clone(), peer));
            }
        }
        self.confirmed_by_runtime.fetch_add(1, Ordering::Relaxed);
        let candidate_id = candidate.as_ref().map(|c| c.id.as_str());
        match self.containers.ask_by_address(ip, candidate_id).await {
            Some(container) => Ok(Caller::at_address(container, peer)),
            None => Err(Refusal::NoContainerAtAddress),
        }
    }

    /// Connections identified by a kernel record, and connections refused (no evidence).
    pub fn attested(&self) -> (u64, u64) {
        (
            self.by_record.load(Ordering::Relaxed),
            self.refused.load(Ordering::Relaxed),
        )
    }

    /// tc mode: how many source addresses a watch still vouched for, how many the kernel
    /// confirmed from /proc, and how many needed Docker.
    pub fn address_confirmations(&self) -> (u64, u64, u64) {
        (
            self.confirmed_by_watch.load(Ordering::Relaxed),
            self.confirmed_by_kernel.load(Ordering::Relaxed),
            self.confirmed_by_runtime.load(Ordering::Relaxed),
        )
    }

    /// tc mode: addresses whose confirmation is watched.
    pub fn watched_addresses(&self) -> usize {
        self.watched.len()
    }

    /// tc mode: drop the watches that ended (containers gone); how many.
    pub fn sweep_watches(&self) -> usize {
        self.watched.sweep()
    }
}

/// The log gate of container-caused lines: one line per caller and reason a minute (the next one
/// says how many were kept quiet), 20 lines a second over all of them (bursts of 50).
pub type Quiet = imds_policy::quiet::Quiet<(CallerKey, &'static str)>;

/// [`Quiet`] as the daemon sets it.
pub fn quiet() -> Quiet {
    Quiet::new(
        std::time::Duration::from_secs(60),
        20.0,
        50.0,
        16_384,
        std::time::Instant::now(),
    )
}

/// Who a connection counts against: its container, else its cgroup, else (no caller) its source
/// address.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum CallerKey {
    Container(Arc<str>),
    Cgroup(u64),
    Address(IpAddr),
}

impl CallerKey {
    /// An identified caller: its container, else its cgroup (else its address).
    pub fn of_caller(caller: &crate::identity::Caller) -> Self {
        match (caller.container_id(), &caller.evidence) {
            (Some(id), _) => CallerKey::Container(id.into()),
            (None, Evidence::Kernel { cgroup_id, .. }) => CallerKey::Cgroup(*cgroup_id),
            (None, Evidence::Address(ip)) => CallerKey::Address(*ip),
        }
    }
}

/// An accepted peer, who it is, and what it counts against (decided once per connection).
#[derive(Clone, Debug)]
pub struct Peer {
    pub addr: SocketAddr,
    pub caller: Result<Caller, Refusal>,
    pub key: CallerKey,
}

impl Peer {
    pub fn new(addr: SocketAddr, caller: Result<Caller, Refusal>) -> Self {
        let key = match &caller {
            Ok(caller) => CallerKey::of_caller(caller),
            Err(_) => CallerKey::Address(addr.ip()),
        };
        Self { addr, caller, key }
    }
}

/// A TCP listener that takes, for every accepted connection, the kernel's record of who opened
/// it, at accept time, before any byte of the request is read.
pub struct AttestedListener {
    inner: TcpListener,
    attestor: Arc<Attestor>,
}

/// An accepted connection whose record is taken but whose caller is not decided yet
/// ([`Pending::attest`]).
pub struct Pending {
    addr: SocketAddr,
    record: Option<Record>,
    attestor: Arc<Attestor>,
}

impl Pending {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Who the peer is.
    pub async fn attest(self) -> Peer {
        let caller = self.attestor.identify(self.addr, self.record).await;
        Peer::new(self.addr, caller)
    }
}

impl AttestedListener {
    pub fn new(inner: TcpListener, attestor: Arc<Attestor>) -> Self {
        Self { inner, attestor }
    }

    /// Accept one connection and take its record (a map lookup and delete).
    pub async fn accept_pending(&mut self) -> std::io::Result<(TcpStream, Pending)> {
        let (stream, addr) = self.inner.accept().await?;
        let record = self.attestor.take_record(addr);
        Ok((
            stream,
            Pending {
                addr,
                record,
                attestor: self.attestor.clone(),
            },
        ))
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::{collections::HashMap, sync::Mutex};

    use super::*;
    use crate::process::tests::*;
    use futures_util::future::BoxFuture;

    /// Docker as a table: by id, and who answers for an address when asked.
    #[derive(Default)]
    pub struct Table {
        pub by_id: Mutex<HashMap<String, Arc<Container>>>,
        pub asked: AtomicU64,
    }

    impl Table {
        pub fn with(containers: &[Container]) -> Arc<Self> {
            let table = Self::default();
            for c in containers {
                table
                    .by_id
                    .lock()
                    .unwrap()
                    .insert(c.id.clone(), Arc::new(c.clone()));
            }
            Arc::new(table)
        }
    }

    impl Containers for Table {
        fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Option<Arc<Container>>> {
            Box::pin(async move { self.by_id.lock().unwrap().get(id).cloned() })
        }
        fn indexed_with_address(&self, ip: IpAddr) -> Option<Arc<Container>> {
            let by_id = self.by_id.lock().unwrap();
            by_id.values().find(|c| c.addresses.contains(&ip)).cloned()
        }
        fn ask_by_address<'a>(
            &'a self,
            ip: IpAddr,
            _candidate: Option<&'a str>,
        ) -> BoxFuture<'a, Option<Arc<Container>>> {
            Box::pin(async move {
                self.asked.fetch_add(1, Ordering::Relaxed);
                let by_id = self.by_id.lock().unwrap();
                by_id
                    .values()
                    .find(|c| c.running && c.addresses.contains(&ip))
                    .cloned()
            })
        }
    }

    pub fn container(id: &str, pid: u32, addr: &str) -> Container {
        Container {
            id: id.to_owned(),
            name: format!("c-{}", &id[..4]),
            running: true,
            pid,
            addresses: vec![addr.parse().unwrap()],
            cgroup: format!("/docker/{id}"),
            ..Container::default()
        }
    }

    /// An attestor in address mode over `table`, reading the fake `/proc` in `dir` (also its
    /// cgroup root: no kernel records here).
    fn address_attestor(table: Arc<Table>, dir: &TempDir) -> Attestor {
        Attestor::new(
            None,
            Arc::new(Cgroups::with_proc(&dir.0, "/nonexistent")),
            table,
            Proc::at(&dir.0),
            true,
        )
    }

    #[tokio::test]
    async fn an_address_the_kernel_confirms_needs_no_docker_call() {
        let (_, dir) = fake_proc(4242, ID);
        let table = Table::with(&[container(ID, 4242, "172.17.0.2")]);
        let attestor = address_attestor(table.clone(), &dir);
        let caller = attestor
            .identify("172.17.0.2:40000".parse().unwrap(), None)
            .await
            .unwrap();
        assert_eq!(caller.container_id(), Some(ID));
        assert_eq!(
            caller.evidence,
            Evidence::Address("172.17.0.2".parse().unwrap())
        );
        assert_eq!(
            caller.original_destination,
            "169.254.169.254:80".parse().unwrap()
        );
        assert_eq!(attestor.address_confirmations(), (0, 1, 0));
        assert_eq!(table.asked.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn an_address_the_kernel_does_not_confirm_is_docker_s_to_decide() {
        // The index says ID has the address, but its process does not hold it (gone, or the
        // address moved): Docker decides, and here nobody has it.
        let (_, dir) = fake_proc(4242, ID);
        let table = Table::with(&[container(ID, 4242, "172.17.0.9")]);
        let attestor = address_attestor(table.clone(), &dir);
        let refused = attestor
            .identify("172.17.0.7:40000".parse().unwrap(), None)
            .await;
        assert_eq!(refused.err(), Some(Refusal::NoContainerAtAddress));
        let mut stale = container(ID, 4242, "172.17.0.9");
        stale.running = false;
        let table = Table::with(&[stale]);
        let attestor = address_attestor(table.clone(), &dir);
        assert_eq!(
            attestor
                .identify("172.17.0.9:40000".parse().unwrap(), None)
                .await
                .err(),
            Some(Refusal::NoContainerAtAddress),
            "a stopped container's address is nobody's"
        );
        assert_eq!(attestor.address_confirmations(), (0, 0, 1));
        assert_eq!(table.asked.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn without_a_record_or_address_mode_a_connection_is_refused() {
        let dir = TempDir::new();
        let attestor = Attestor::new(
            None,
            Arc::new(Cgroups::new(&dir.0)),
            Table::with(&[]),
            Proc::at(&dir.0),
            false,
        );
        assert_eq!(
            attestor
                .identify("10.0.0.1:5000".parse().unwrap(), None)
                .await
                .err(),
            Some(Refusal::NoRecord)
        );
    }

    #[tokio::test]
    async fn a_kernel_record_names_a_container_only_where_docker_put_it() {
        // A v2 root with Docker's container and, inside it, a directory named after another.
        let root = TempDir::new();
        let other = "1".repeat(64);
        let own = root.0.join("docker").join(ID);
        let forged = own.join(&other);
        std::fs::create_dir_all(&forged).unwrap();
        let id_of = |p: &std::path::Path| {
            use std::os::unix::fs::MetadataExt as _;
            std::fs::metadata(p).unwrap().ino()
        };
        let table = Table::with(&[
            container(ID, 1, "172.17.0.2"),
            container(&other, 2, "172.17.0.3"),
        ]);
        let attestor = Attestor::new(
            None,
            Arc::new(Cgroups::with_proc(&root.0, "/nonexistent")),
            table,
            Proc::at("/nonexistent"),
            false,
        );
        let record = |cgroup_id| Record {
            cgroup_id,
            tgid: 1,
            original_destination: "169.254.169.254:80".parse().unwrap(),
        };
        let peer: SocketAddr = "169.254.42.1:40000".parse().unwrap();
        let caller = attestor
            .identify(peer, Some(record(id_of(&own))))
            .await
            .unwrap();
        assert_eq!(caller.container_id(), Some(ID));
        assert_eq!(caller.cgroup(), Some(format!("/docker/{ID}").as_str()));
        assert_eq!(caller.subject, id_of(&own));
        // The forged directory resolves, names `other`, and is not where Docker put `other`.
        let caller = attestor
            .identify(peer, Some(record(id_of(&forged))))
            .await
            .unwrap();
        assert_eq!(caller.container_id(), None, "no container, so no role");
        // A host cgroup: a caller without a container.
        let host = root.0.join("system.slice");
        std::fs::create_dir_all(&host).unwrap();
        let caller = attestor
            .identify(peer, Some(record(id_of(&host))))
            .await
            .unwrap();
        assert_eq!(caller.container_id(), None);
        assert_eq!(caller.cgroup(), Some("/system.slice"));
    }
}
