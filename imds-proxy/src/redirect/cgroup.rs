//! cgroup mode's programs: `cgroup/connect4`/`connect6` rewrite connects to IMDS towards the
//! proxy, `sock_ops` records which cgroup owns each redirected connection, `getpeername4/6`
//! hide the rewrite, and the `cgroup_skb` egress guard drops whatever still goes to IMDS. Also
//! attached in tc mode, for host-network containers only. The proxy reads the records at accept
//! ([`CgroupRedirect::take_record`]).
//!
//! With a pin directory (bpffs), the maps and every link are pinned there: if the proxy dies,
//! containers' IMDS connects keep being redirected to its (dead) listen address and fail, the
//! records of those refused connects are still removed when their sockets close, and a restarted
//! proxy adopts the pinned links and maps without ever detaching them ([`super::pin`]).
use std::{
    net::{IpAddr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::AsFd as _,
    path::PathBuf,
    sync::Mutex,
};

use aya::{
    Ebpf,
    maps::{HashMap, MapData, PerCpuArray},
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr, SockOps,
        links::{FdLink, PinnedLink},
    },
};
use imds_common::{
    AF_INET6, ConnKey, ConnRecord, GuardStat, MAP_CONFIG, MAP_CONNS, MAP_CONTAINER_CGROUPS,
    MAP_GUARD_STATS, MAP_PENDING, PROG_CONNECT4, PROG_CONNECT4_COMPAT, PROG_CONNECT6,
    PROG_CONNECT6_COMPAT, PROG_EGRESS_GUARD, PROG_GETPEERNAME4, PROG_GETPEERNAME6, PROG_SOCK_OPS,
    RedirectConfig, v6_octets,
};

use super::{
    object::{
        Error, listen_config, load_configured, per_cpu_totals, program, program_fd, take_map,
    },
    pin::{Fresh, attach_or_adopt, link_pin_name, raw},
};

/// The cgroup/sock_addr programs, in the order they are attached: the connect rewrite last, so
/// that nothing is redirected before the programs that complete the picture are in place.
pub const SOCK_ADDR_PROGRAMS: [&str; 4] = [
    PROG_GETPEERNAME4,
    PROG_GETPEERNAME6,
    PROG_CONNECT4,
    PROG_CONNECT6,
];
pub const SOCK_OPS_PROGRAM: &str = PROG_SOCK_OPS;
/// The cgroup_skb egress backstop: drops whatever a container's socket still sends to an IMDS
/// address. Attached first of all.
pub const GUARD_PROGRAM: &str = PROG_EGRESS_GUARD;
/// Every cgroup mode program of the object.
pub const PROGRAMS: [&str; 6] = [
    GUARD_PROGRAM,
    SOCK_OPS_PROGRAM,
    PROG_GETPEERNAME4,
    PROG_GETPEERNAME6,
    PROG_CONNECT4,
    PROG_CONNECT6,
];
pub const MAPS: [&str; 5] = [
    MAP_CONFIG,
    MAP_PENDING,
    MAP_CONNS,
    MAP_CONTAINER_CGROUPS,
    MAP_GUARD_STATS,
];

/// Where and how to redirect.
#[derive(Clone, Debug)]
pub struct Spec {
    /// The proxy's IPv4 listen address.
    pub listen_v4: SocketAddrV4,
    /// The proxy's IPv6 listen address; without one, IPv6 IMDS connects are refused.
    pub listen_v6: Option<SocketAddrV6>,
    /// cgroup v2 directories to attach to (every socket below them is considered).
    pub cgroups: Vec<PathBuf>,
    /// Filter mode: redirect sockets of cgroups classified as containers with
    /// [`CgroupRedirect::classify_cgroup`], pass those classified as host, refuse the unclassified.
    pub filter: bool,
    /// cgroup id whose connects are never redirected: the proxy's own.
    pub own_cgroup: u64,
    /// bpffs directory to pin maps and links in.
    pub pin: Option<PathBuf>,
    /// Which sockets the connect programs act on: all of them (cgroup mode), or only those in
    /// the host's network namespace (tc mode, for host-network containers).
    pub scope: Scope,
    /// `imds-proxy gate`: refuse what would be redirected (no proxy listens yet).
    pub gate: bool,
}

/// What the cgroup programs cover.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// cgroup mode: every socket under the attach points, whatever its network namespace, with
    /// the egress guard dropping whatever goes around the connect programs.
    AllNamespaces,
    /// tc mode: only sockets in the network namespace with this cookie (the host's), that is,
    /// host-network containers; bridged containers are the tc programs' business. No egress
    /// guard: it cannot tell namespaces apart, and would drop the bridged containers' packets
    /// before the tc programs rewrite them.
    HostNamespace { netns_cookie: u64 },
    /// `imds-proxy gate` ahead of a tc-mode proxy: every socket, bridged containers' included
    /// (no tc program is attached yet), and no egress guard (the tc-mode proxy that adopts the
    /// links has none).
    AllNamespacesUnguarded,
}

/// A caller as the kernel recorded it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    pub cgroup_id: u64,
    pub tgid: u32,
    /// Where the client was connecting: the IMDS address.
    pub original_destination: SocketAddr,
}

/// The attached programs. Dropping it detaches whatever is not pinned.
pub struct CgroupRedirect {
    // Keeps programs, their unpinned links and the maps alive.
    _ebpf: Ebpf,
    _pinned: Vec<PinnedLink>,
    conns: Mutex<HashMap<MapData, ConnKey, ConnRecord>>,
    containers: Mutex<HashMap<MapData, u64, u8>>,
    guard: PerCpuArray<MapData, u64>,
    adopted: usize,
    logger: Mutex<Option<KernelLogger>>,
}

type KernelLogger = aya_log::EbpfLogger<&'static dyn log::Log>;

impl CgroupRedirect {
    /// Load the programs, configure them, and attach them to every cgroup of `spec` (adopting
    /// links already pinned there).
    pub fn attach(spec: &Spec) -> Result<Self, Error> {
        let cgroups = spec
            .cgroups
            .iter()
            .map(|path| {
                crate::cgroup::open(path)
                    .map(|(file, id)| (path, file, id))
                    .map_err(|err| Error::Cgroup {
                        path: path.clone(),
                        reason: err.to_string(),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        // Configured before anything is attached: an unconfigured connect program refuses.
        let mut ebpf = load_configured(spec.pin.as_deref(), &MAPS, redirect_config(spec)?)?;
        // The kernel programs' rare events (refused rewrites, full maps). The logger owns the log
        // map: it must live as long as the programs.
        let logger = aya_log::EbpfLogger::init(&mut ebpf)
            .map_err(|err| tracing::warn!(%err, "no eBPF log channel"))
            .ok();

        let mut pinned = Vec::new();
        let mut adopted = 0;
        let pin_path = |program: &str, cgroup_id: u64| {
            spec.pin
                .as_ref()
                .map(|dir| dir.join(link_pin_name(program, &format!("cg{cgroup_id}"))))
        };
        // The backstop first: from here on nothing a container sends reaches IMDS unrewritten.
        let guard: &mut CgroupSkb = program(&mut ebpf, GUARD_PROGRAM)?;
        guard.load().map_err(|source| Error::Program {
            name: GUARD_PROGRAM,
            source,
        })?;
        let guarded = if spec.scope == Scope::AllNamespaces {
            cgroups.as_slice()
        } else {
            // A guard pinned by a run that had one (`imds-proxy gate`, a cgroup-mode proxy)
            // would drop bridged containers' IMDS packets before the tc programs rewrite them.
            for (_, _, id) in &cgroups {
                if let Some(path) = pin_path(GUARD_PROGRAM, *id)
                    && std::fs::remove_file(&path).is_ok()
                {
                    tracing::info!(pin = %path.display(), "unpinned an egress guard this mode does not use");
                }
            }
            &[]
        };
        let guard_fd = program_fd(guard.fd(), GUARD_PROGRAM)?;
        for (_, file, id) in guarded {
            let path = pin_path(GUARD_PROGRAM, *id);
            pinned.extend(attach_or_adopt(
                path.as_deref(),
                &mut adopted,
                guard_fd.as_fd(),
                |pinning| {
                    let link_id = guard
                        .attach(file, CgroupSkbAttachType::Egress, CgroupAttachMode::Single)
                        .map_err(|source| Error::Program {
                            name: GUARD_PROGRAM,
                            source,
                        })?;
                    if pinning.is_none() {
                        return Ok(Fresh::Unpinned);
                    }
                    let link = guard.take_link(link_id).map_err(|source| Error::Program {
                        name: GUARD_PROGRAM,
                        source,
                    })?;
                    FdLink::try_from(link)
                        .map(Fresh::Link)
                        .map_err(|source| Error::Link {
                            name: GUARD_PROGRAM,
                            source,
                        })
                },
            )?);
        }
        let sock_ops: &mut SockOps = program(&mut ebpf, SOCK_OPS_PROGRAM)?;
        sock_ops.load().map_err(|source| Error::Program {
            name: SOCK_OPS_PROGRAM,
            source,
        })?;
        let sock_ops_fd = program_fd(sock_ops.fd(), SOCK_OPS_PROGRAM)?;
        for (_, file, id) in &cgroups {
            let path = pin_path(SOCK_OPS_PROGRAM, *id);
            pinned.extend(attach_or_adopt(
                path.as_deref(),
                &mut adopted,
                sock_ops_fd.as_fd(),
                |pinning| {
                    let program_error = |source| Error::Program {
                        name: SOCK_OPS_PROGRAM,
                        source,
                    };
                    let Some(path) = pinning else {
                        sock_ops
                            .attach(file, CgroupAttachMode::Single)
                            .map_err(program_error)?;
                        return Ok(Fresh::Unpinned);
                    };
                    // aya 0.14 cannot pin a sock_ops link: create and pin it with bpf(2) directly,
                    // so that records of refused connects are still cleaned up while the proxy is
                    // down.
                    let link = raw::link_create(
                        sock_ops_fd.as_fd(),
                        file.as_fd(),
                        raw::BPF_CGROUP_SOCK_OPS,
                    )?;
                    raw::obj_pin(link.as_fd(), path)?;
                    Ok(Fresh::PinnedAt)
                },
            )?);
        }

        for name in SOCK_ADDR_PROGRAMS {
            let loaded = load_sock_addr(&mut ebpf, name)?;
            let prog: &mut CgroupSockAddr = program(&mut ebpf, loaded)?;
            let prog_fd = program_fd(prog.fd(), loaded)?;
            for (path, file, id) in &cgroups {
                let pin = pin_path(name, *id);
                pinned.extend(attach_or_adopt(
                    pin.as_deref(),
                    &mut adopted,
                    prog_fd.as_fd(),
                    |pinning| {
                        let link_id = prog
                            .attach(file, CgroupAttachMode::Single)
                            .map_err(|source| Error::Program { name, source })?;
                        tracing::debug!(program = name, cgroup = %path.display(), "attached");
                        if pinning.is_none() {
                            return Ok(Fresh::Unpinned);
                        }
                        let link = prog
                            .take_link(link_id)
                            .map_err(|source| Error::Program { name, source })?;
                        FdLink::try_from(link)
                            .map(Fresh::Link)
                            .map_err(|source| Error::Link { name, source })
                    },
                )?);
            }
        }

        let conns = take_map(&mut ebpf, MAP_CONNS)?;
        let containers = take_map(&mut ebpf, MAP_CONTAINER_CGROUPS)?;
        let guard = take_map(&mut ebpf, MAP_GUARD_STATS)?;
        Ok(Self {
            _ebpf: ebpf,
            _pinned: pinned,
            conns: Mutex::new(conns),
            containers: Mutex::new(containers),
            guard,
            adopted,
            logger: Mutex::new(logger),
        })
    }

    /// Forward the kernel programs' log records to this process's log until the task is
    /// dropped. Once per `CgroupRedirect`: a later call has nothing to forward and waits forever
    /// (it never ends, so its supervisor does not report it). It returns only when the log channel
    /// cannot be read.
    pub async fn forward_kernel_logs(&self) {
        let Some(logger) = self.logger.lock().expect("logger lock poisoned").take() else {
            return std::future::pending().await;
        };
        // SAFETY: the AsyncFd owns the logger, which owns the fd: it stays open while registered.
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
        };
        let mut fd = match fd {
            Ok(fd) => fd,
            Err(err) => {
                tracing::warn!(%err, "cannot watch the eBPF log channel");
                return;
            }
        };
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    }

    /// How many records the kernel holds: (pending, established). Both drain to zero when every
    /// redirected connection has been accepted or closed.
    pub fn record_counts(&self) -> (usize, usize) {
        let pending = self
            ._ebpf
            .map(MAP_PENDING)
            .and_then(|map| HashMap::<_, u64, ConnRecord>::try_from(map).ok())
            .map(|map| map.keys().count())
            .unwrap_or(0);
        let conns = self
            .conns
            .lock()
            .expect("conns lock poisoned")
            .keys()
            .count();
        (pending, conns)
    }

    /// The egress guard's counters, summed over CPUs.
    pub fn guard_stats(&self) -> Vec<(GuardStat, u64)> {
        per_cpu_totals(&self.guard, &GuardStat::ALL, |stat| stat as u32)
    }

    /// How many pinned links of a previous run were adopted instead of attached.
    pub fn adopted_links(&self) -> usize {
        self.adopted
    }

    /// Take (read and delete) the kernel's record of the connection whose client is `peer`.
    pub fn take_record(&self, peer: SocketAddr) -> Option<Record> {
        let key = imds_common::ConnKey::from(peer);
        let mut conns = self.conns.lock().expect("conns lock poisoned");
        let record = conns.get(&key, 0).ok()?;
        // Consumed: the same (address, port) must never vouch for a second connection.
        let _ = conns.remove(&key);
        let original_destination = match record.family {
            AF_INET6 => {
                SocketAddr::new(IpAddr::from(v6_octets(record.orig_addr)), record.orig_port)
            }
            _ => SocketAddr::new(
                IpAddr::from(record.orig_addr[0].to_ne_bytes()),
                record.orig_port,
            ),
        };
        Some(Record {
            cgroup_id: record.cgroup_id,
            tgid: record.tgid,
            original_destination,
        })
    }

    /// Filter mode: classify a cgroup as a container's (redirected) or a host service's (passed).
    pub fn classify_cgroup(&self, cgroup_id: u64, container: bool) -> Result<(), Error> {
        let kind = if container {
            imds_common::CGROUP_CONTAINER
        } else {
            imds_common::CGROUP_HOST
        };
        self.containers
            .lock()
            .expect("containers lock poisoned")
            .insert(cgroup_id, kind, 0)
            .map_err(|source| Error::Map {
                name: MAP_CONTAINER_CGROUPS,
                source,
            })
    }

    /// Filter mode: drop every classification whose cgroup is not in `live` (removed while no
    /// proxy ran, with a pinned map); how many.
    pub fn sweep_classified(&self, live: &std::collections::HashSet<u64>) -> usize {
        let mut containers = self.containers.lock().expect("containers lock poisoned");
        let stale: Vec<u64> = containers
            .keys()
            .filter_map(Result::ok)
            .filter(|id| !live.contains(id))
            .collect();
        for id in &stale {
            let _ = containers.remove(id);
        }
        stale.len()
    }

    /// Filter mode: how a cgroup is classified (`Some(true)`: a container's), if it is.
    pub fn classification(&self, cgroup_id: u64) -> Option<bool> {
        self.containers
            .lock()
            .expect("containers lock poisoned")
            .get(&cgroup_id, 0)
            .ok()
            .map(|kind| kind == imds_common::CGROUP_CONTAINER)
    }

    /// Filter mode: forget a removed cgroup (ids are never reused).
    pub fn forget_cgroup(&self, cgroup_id: u64) {
        let _ = self
            .containers
            .lock()
            .expect("containers lock poisoned")
            .remove(&cgroup_id);
    }
}

/// Load sock_addr program `name`; a connect program the kernel refuses (before Linux 6.10 it
/// cannot check the caller's PID namespace) is replaced by its `_compat` twin, without the
/// PID-namespace wall, and the log says so. The name of what was loaded.
fn load_sock_addr(ebpf: &mut Ebpf, name: &'static str) -> Result<&'static str, Error> {
    let prog: &mut CgroupSockAddr = program(ebpf, name)?;
    let err = match prog.load() {
        Ok(()) => return Ok(name),
        Err(err) => err,
    };
    let compat = match name {
        PROG_CONNECT4 => PROG_CONNECT4_COMPAT,
        PROG_CONNECT6 => PROG_CONNECT6_COMPAT,
        _ => return Err(Error::Program { name, source: err }),
    };
    let prog: &mut CgroupSockAddr = program(ebpf, compat)?;
    prog.load().map_err(|source| Error::Program {
        name: compat,
        source,
    })?;
    tracing::warn!(
        program = name,
        error = %err,
        "this kernel (before 6.10) cannot check a caller's PID namespace in a connect program: \
         loaded without that wall (a process in a private PID namespace in a cgroup classified \
         as the host's reaches IMDS)"
    );
    Ok(compat)
}

fn redirect_config(spec: &Spec) -> Result<RedirectConfig, Error> {
    let (host_pidns_dev, host_pidns_ino) = super::object::host_pidns()?;
    Ok(RedirectConfig {
        host_pidns_dev,
        host_pidns_ino,
        filter: spec.filter.into(),
        proxy_cgroup: spec.own_cgroup,
        netns_cookie: match spec.scope {
            Scope::AllNamespaces | Scope::AllNamespacesUnguarded => 0,
            Scope::HostNamespace { netns_cookie } => netns_cookie,
        },
        gate: spec.gate.into(),
        ..listen_config(spec.listen_v4, spec.listen_v6)
    })
}

impl crate::cgroup::filter::Classifications for CgroupRedirect {
    fn classify_cgroup(&self, cgroup_id: u64, container: bool) -> Result<(), String> {
        CgroupRedirect::classify_cgroup(self, cgroup_id, container).map_err(|err| err.to_string())
    }
    fn forget_cgroup(&self, cgroup_id: u64) {
        CgroupRedirect::forget_cgroup(self, cgroup_id)
    }
}
