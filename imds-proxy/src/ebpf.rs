//! Loading, attaching and pinning the kernel programs built from `imds-ebpf`, and reading the
//! connection records they leave for the proxy.
//!
//! With a pin directory (bpffs), the maps and every link are pinned there: if the proxy dies,
//! containers' IMDS connects keep being redirected to its (dead) listen address and fail, the
//! records of those refused connects are still removed when their sockets close, and a restarted
//! proxy adopts the pinned links and maps without ever detaching them. (aya 0.14 cannot pin a
//! sock_ops link; [`raw`] creates and pins that one with bpf(2) directly.)
use std::{
    fs::File,
    net::{IpAddr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::AsFd as _,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::PerCpuArray,
    maps::{Array, HashMap, MapData},
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr, SockOps,
        links::{FdLink, PinnedLink},
    },
};
use imds_common::{
    AF_INET, AF_INET6, ConnKey, ConnRecord, GuardStat, MAP_CONFIG, MAP_CONNS,
    MAP_CONTAINER_CGROUPS, MAP_GUARD_STATS, MAP_PENDING, RedirectConfig, raw_port, raw_v4, raw_v6,
    v6_octets,
};

/// The eBPF object built from `imds-ebpf` by build.rs, embedded at compile time.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/imds-ebpf"));

/// The cgroup/sock_addr programs, in the order they are attached: the connect rewrite last, so
/// that nothing is redirected before the programs that complete the picture are in place.
pub const SOCK_ADDR_PROGRAMS: [&str; 4] = [
    "imds_getpeername4",
    "imds_getpeername6",
    "imds_connect4",
    "imds_connect6",
];
pub const SOCK_OPS_PROGRAM: &str = "imds_sock_ops";
/// The cgroup_skb egress backstop: drops whatever a container's socket still sends to an IMDS
/// address. Attached first of all.
pub const GUARD_PROGRAM: &str = "imds_egress_guard";
/// Every cgroup mode program of the object.
pub const PROGRAMS: [&str; 6] = [
    GUARD_PROGRAM,
    SOCK_OPS_PROGRAM,
    "imds_getpeername4",
    "imds_getpeername6",
    "imds_connect4",
    "imds_connect6",
];
pub const MAPS: [&str; 5] = [
    MAP_CONFIG,
    MAP_PENDING,
    MAP_CONNS,
    MAP_CONTAINER_CGROUPS,
    MAP_GUARD_STATS,
];

/// `statfs` magic numbers.
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cgroup {path}: {reason}")]
    Cgroup { path: PathBuf, reason: String },
    #[error("pin directory {path}: {reason}")]
    PinDir { path: PathBuf, reason: String },
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("pinning {path}: {source}")]
    Pin {
        path: PathBuf,
        source: aya::pin::PinError,
    },
    #[error("link of program {name}: {source}")]
    Link {
        name: &'static str,
        source: aya::programs::links::LinkError,
    },
    #[error("adopting pinned link {path}: {source}")]
    Adopt {
        path: PathBuf,
        source: aya::programs::links::LinkError,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

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
    /// [`Redirect::classify_cgroup`], pass those classified as host, refuse the unclassified.
    pub filter: bool,
    /// cgroup id whose connects are never redirected: the proxy's own.
    pub own_cgroup: u64,
    /// bpffs directory to pin maps and links in.
    pub pin: Option<PathBuf>,
    /// Which sockets the connect programs act on: all of them (cgroup mode), or only those in
    /// the host's network namespace (tc mode, for host-network containers).
    pub scope: Scope,
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
pub struct Redirect {
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

impl Redirect {
    /// Load the programs, configure them, and attach them to every cgroup of `spec` (adopting
    /// links already pinned there).
    pub fn attach(spec: &Spec) -> Result<Self, Error> {
        let cgroups = spec
            .cgroups
            .iter()
            .map(|path| open_cgroup(path).map(|(file, id)| (path, file, id)))
            .collect::<Result<Vec<_>, _>>()?;
        // Configured before anything is attached: an unconfigured connect program refuses.
        let mut ebpf = load_configured(spec.pin.as_deref(), &MAPS, redirect_config(spec))?;
        // The kernel programs' rare events (refused rewrites, full maps). The logger owns the log
        // map: it must live as long as the programs.
        let logger = aya_log::EbpfLogger::init(&mut ebpf)
            .map_err(|err| tracing::warn!(%err, "no eBPF log channel"))
            .ok();

        let mut pinned = Vec::new();
        let mut adopted = 0;
        // The backstop first: from here on nothing a container sends reaches IMDS unrewritten.
        let guard: &mut CgroupSkb = program(&mut ebpf, GUARD_PROGRAM)?;
        guard.load().map_err(|source| Error::Program {
            name: GUARD_PROGRAM,
            source,
        })?;
        let guarded = if spec.scope == Scope::AllNamespaces {
            cgroups.as_slice()
        } else {
            &[]
        };
        for (_, file, id) in guarded {
            attach_or_adopt(
                GUARD_PROGRAM,
                spec.pin.as_deref(),
                *id,
                &mut pinned,
                &mut adopted,
                || {
                    let link_id = guard
                        .attach(file, CgroupSkbAttachType::Egress, CgroupAttachMode::Single)
                        .map_err(|source| Error::Program {
                            name: GUARD_PROGRAM,
                            source,
                        })?;
                    if spec.pin.is_none() {
                        return Ok(None);
                    }
                    let link = guard.take_link(link_id).map_err(|source| Error::Program {
                        name: GUARD_PROGRAM,
                        source,
                    })?;
                    Ok(Some(FdLink::try_from(link).map_err(|source| {
                        Error::Link {
                            name: GUARD_PROGRAM,
                            source,
                        }
                    })?))
                },
            )?;
        }
        let sock_ops: &mut SockOps = program(&mut ebpf, SOCK_OPS_PROGRAM)?;
        sock_ops.load().map_err(|source| Error::Program {
            name: SOCK_OPS_PROGRAM,
            source,
        })?;
        for (_, file, id) in &cgroups {
            let Some(dir) = &spec.pin else {
                sock_ops
                    .attach(file, CgroupAttachMode::Single)
                    .map_err(|source| Error::Program {
                        name: SOCK_OPS_PROGRAM,
                        source,
                    })?;
                continue;
            };
            // aya 0.14 cannot pin a sock_ops link: create and pin it with bpf(2) directly, so
            // that records of refused connects are still cleaned up while the proxy is down.
            let pin_path = dir.join(link_pin_name(SOCK_OPS_PROGRAM, *id));
            if !pin_path.exists() {
                let prog_fd = sock_ops.fd().map_err(|source| Error::Program {
                    name: SOCK_OPS_PROGRAM,
                    source,
                })?;
                let link =
                    raw::link_create(prog_fd.as_fd(), file.as_fd(), raw::BPF_CGROUP_SOCK_OPS)?;
                raw::obj_pin(link.as_fd(), &pin_path)?;
            } else {
                adopted += 1;
            }
            pinned.push(
                PinnedLink::from_pin(&pin_path).map_err(|source| Error::Adopt {
                    path: pin_path.clone(),
                    source,
                })?,
            );
        }

        for name in SOCK_ADDR_PROGRAMS {
            let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            prog.load()
                .map_err(|source| Error::Program { name, source })?;
            for (path, file, id) in &cgroups {
                attach_or_adopt(
                    name,
                    spec.pin.as_deref(),
                    *id,
                    &mut pinned,
                    &mut adopted,
                    || {
                        let link_id = prog
                            .attach(file, CgroupAttachMode::Single)
                            .map_err(|source| Error::Program { name, source })?;
                        tracing::debug!(program = name, cgroup = %path.display(), "attached");
                        if spec.pin.is_none() {
                            return Ok(None);
                        }
                        let link = prog
                            .take_link(link_id)
                            .map_err(|source| Error::Program { name, source })?;
                        Ok(Some(
                            FdLink::try_from(link)
                                .map_err(|source| Error::Link { name, source })?,
                        ))
                    },
                )?;
            }
        }

        let conns =
            HashMap::try_from(ebpf.take_map(MAP_CONNS).expect("defined")).map_err(|source| {
                Error::Map {
                    name: MAP_CONNS,
                    source,
                }
            })?;
        let containers = HashMap::try_from(ebpf.take_map(MAP_CONTAINER_CGROUPS).expect("defined"))
            .map_err(|source| Error::Map {
                name: MAP_CONTAINER_CGROUPS,
                source,
            })?;
        let guard = PerCpuArray::try_from(ebpf.take_map(MAP_GUARD_STATS).expect("defined"))
            .map_err(|source| Error::Map {
                name: MAP_GUARD_STATS,
                source,
            })?;
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
    /// dropped. Once per `Redirect`; later calls return at once.
    pub async fn forward_kernel_logs(&self) {
        let Some(logger) = self.logger.lock().expect("logger lock poisoned").take() else {
            return;
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
        let key = conn_key(peer);
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

    /// Filter mode: forget a removed cgroup (ids are never reused).
    pub fn forget_cgroup(&self, cgroup_id: u64) {
        let _ = self
            .containers
            .lock()
            .expect("containers lock poisoned")
            .remove(&cgroup_id);
    }
}

/// The counters of a per-CPU array, one per slot of `stats`, summed over CPUs (0 when unreadable).
pub(crate) fn per_cpu_totals<S: Copy>(
    map: &PerCpuArray<MapData, u64>,
    stats: &[S],
    slot: impl Fn(S) -> u32,
) -> Vec<(S, u64)> {
    stats
        .iter()
        .map(|&stat| {
            let total = map
                .get(&slot(stat), 0)
                .map(|values| values.iter().sum())
                .unwrap_or(0);
            (stat, total)
        })
        .collect()
}

/// The two bpf(2) commands aya 0.14 does not offer for sock_ops links.
mod raw {
    use std::{
        ffi::CString,
        os::{
            fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
            unix::ffi::OsStrExt as _,
        },
        path::Path,
    };

    const BPF_OBJ_PIN: libc::c_long = 6;
    const BPF_LINK_CREATE: libc::c_long = 28;
    /// `enum bpf_attach_type`: BPF_CGROUP_SOCK_OPS.
    pub const BPF_CGROUP_SOCK_OPS: u32 = 3;

    /// The `link_create` member of `union bpf_attr` (the fields used here, then zeroes).
    #[repr(C)]
    struct LinkCreate {
        prog_fd: u32,
        target_fd: u32,
        attach_type: u32,
        flags: u32,
        rest: [u64; 4],
    }

    /// The `obj_pin` member of `union bpf_attr`.
    #[repr(C)]
    struct ObjPin {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        pad: u32,
    }

    fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
        // SAFETY: attr is a live, correctly laid out prefix of union bpf_attr; the kernel reads
        // size_of::<T>() bytes of it and zero-extends the rest.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                attr as *mut T,
                std::mem::size_of::<T>() as libc::c_uint,
            )
        };
        if ret < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(ret)
        }
    }

    /// BPF_LINK_CREATE of program `prog` on cgroup `target` (single attachment).
    pub fn link_create(
        prog: BorrowedFd<'_>,
        target: BorrowedFd<'_>,
        attach_type: u32,
    ) -> std::io::Result<OwnedFd> {
        let mut attr = LinkCreate {
            prog_fd: prog.as_raw_fd() as u32,
            target_fd: target.as_raw_fd() as u32,
            attach_type,
            flags: 0,
            rest: [0; 4],
        };
        let fd = bpf(BPF_LINK_CREATE, &mut attr)?;
        // SAFETY: the kernel returned a new file descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }

    /// BPF_OBJ_PIN of `fd` at `path` on a bpffs.
    pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> std::io::Result<()> {
        let c_path = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::other("pin path contains a NUL byte"))?;
        let mut attr = ObjPin {
            pathname: c_path.as_ptr() as u64,
            bpf_fd: fd.as_raw_fd() as u32,
            file_flags: 0,
            path_fd: 0,
            pad: 0,
        };
        bpf(BPF_OBJ_PIN, &mut attr).map(|_| ())
    }
}

/// Remove everything `--pin DIR` left: pinned links (which detaches them), programs and maps.
/// Returns the names of what was removed.
pub fn unpin(dir: &Path) -> Result<Vec<String>, Error> {
    let mut removed = Vec::new();
    if !dir.exists() {
        return Ok(removed);
    }
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        std::fs::remove_file(entry.path())?;
        removed.push(entry.file_name().to_string_lossy().into_owned());
    }
    std::fs::remove_dir(dir)?;
    removed.sort();
    Ok(removed)
}

/// Attach one program to one cgroup, or adopt the link a previous run pinned there. `attach`
/// attaches and, when pinning, hands over the link to pin (without pinning it keeps the link,
/// owned by the program, and returns `None`).
fn attach_or_adopt(
    program: &'static str,
    pin: Option<&Path>,
    cgroup_id: u64,
    pinned: &mut Vec<PinnedLink>,
    adopted: &mut usize,
    attach: impl FnOnce() -> Result<Option<FdLink>, Error>,
) -> Result<(), Error> {
    let pin_path = pin.map(|dir| dir.join(link_pin_name(program, cgroup_id)));
    if let Some(pin_path) = pin_path.as_ref().filter(|p| p.exists()) {
        // A previous run's link, still attached: keep it, never detach in between.
        let link = PinnedLink::from_pin(pin_path).map_err(|source| Error::Adopt {
            path: pin_path.clone(),
            source,
        })?;
        pinned.push(link);
        *adopted += 1;
        return Ok(());
    }
    let link = attach()?;
    if let (Some(pin_path), Some(link)) = (pin_path, link) {
        pinned.push(link.pin(&pin_path).map_err(|source| Error::Pin {
            path: pin_path.clone(),
            source,
        })?);
    }
    Ok(())
}

/// The pin name of the link of program `name` on the cgroup with this id.
fn link_pin_name(program: &str, cgroup_id: u64) -> String {
    format!("link_{program}_cg{cgroup_id}")
}

pub(crate) fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, Error>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .expect("the object defines every program this module names")
        .try_into()
        .map_err(|source| Error::Program { name, source })
}

fn redirect_config(spec: &Spec) -> RedirectConfig {
    RedirectConfig {
        filter: spec.filter.into(),
        proxy_cgroup: spec.own_cgroup,
        netns_cookie: match spec.scope {
            Scope::AllNamespaces => 0,
            Scope::HostNamespace { netns_cookie } => netns_cookie,
        },
        ..listen_config(spec.listen_v4, spec.listen_v6)
    }
}

/// The configuration slot with the proxy's listen addresses (and no filter, no own cgroup).
pub(crate) fn listen_config(v4: SocketAddrV4, v6: Option<SocketAddrV6>) -> RedirectConfig {
    RedirectConfig {
        proxy_v4: raw_v4(v4.ip().octets()),
        proxy_v6: v6.map(|a| raw_v6(a.ip().octets())).unwrap_or_default(),
        proxy_port_v4: raw_port(v4.port()),
        proxy_port_v6: v6.map(|a| raw_port(a.port())).unwrap_or(0),
        filter: 0,
        proxy_cgroup: 0,
        netns_cookie: 0,
    }
}

/// The cookie of this process's network namespace (`SO_NETNS_COOKIE`, Linux 5.14+), as
/// `bpf_get_netns_cookie` reports it for sockets in the same namespace.
pub fn own_netns_cookie() -> std::io::Result<u64> {
    use std::os::fd::AsRawFd as _;
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid socket, and a u64 buffer of the length given.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

/// Load the object with `maps` pinned under `pin` (opened when a previous run pinned them, else
/// created and pinned), and write `config` into `IMDS_CONFIG` before any program is attached.
pub(crate) fn load_configured(
    pin: Option<&Path>,
    maps: &[&str],
    config: RedirectConfig,
) -> Result<Ebpf, Error> {
    let mut loader = EbpfLoader::new();
    let map_pins: Vec<(&str, PathBuf)> = match pin {
        Some(dir) => {
            prepare_pin_dir(dir)?;
            maps.iter().map(|name| (*name, dir.join(name))).collect()
        }
        None => Vec::new(),
    };
    for (name, path) in &map_pins {
        loader.map_pin_path(name, path.as_path());
    }
    let mut ebpf = loader.load(OBJECT)?;
    let err = |source| Error::Map {
        name: MAP_CONFIG,
        source,
    };
    // Borrowed, not taken: the map must stay in `ebpf` (its fd open) for the programs loaded
    // after this to refer to it.
    let mut slot: Array<_, RedirectConfig> = Array::try_from(
        ebpf.map_mut(MAP_CONFIG)
            .expect("the object defines IMDS_CONFIG"),
    )
    .map_err(err)?;
    slot.set(0, config, 0).map_err(err)?;
    Ok(ebpf)
}

/// The map key for a connection whose client is `peer`.
pub fn conn_key(peer: SocketAddr) -> ConnKey {
    match peer {
        SocketAddr::V4(a) => ConnKey {
            addr: [raw_v4(a.ip().octets()), 0, 0, 0],
            port: a.port().into(),
            family: AF_INET.into(),
        },
        SocketAddr::V6(a) => ConnKey {
            addr: raw_v6(a.ip().octets()),
            port: a.port().into(),
            family: AF_INET6.into(),
        },
    }
}

fn statfs_type(path: &Path) -> std::io::Result<i64> {
    let stat = nix::sys::statfs::statfs(path)?;
    Ok(stat.filesystem_type().0 as i64)
}

/// Open a cgroup v2 directory; its file and its cgroup id (the directory's inode number).
fn open_cgroup(path: &Path) -> Result<(File, u64), Error> {
    let err = |reason: String| Error::Cgroup {
        path: path.to_owned(),
        reason,
    };
    let fs = statfs_type(path).map_err(|e| err(e.to_string()))?;
    if fs != CGROUP2_SUPER_MAGIC {
        return Err(err(
            "not on a cgroup v2 hierarchy (programs attach to cgroup v2 only; on a hybrid host \
             it is usually mounted at /sys/fs/cgroup/unified)"
                .into(),
        ));
    }
    let file = File::open(path).map_err(|e| err(e.to_string()))?;
    let id = file.metadata().map_err(|e| err(e.to_string()))?.ino();
    Ok((file, id))
}

fn prepare_pin_dir(dir: &Path) -> Result<(), Error> {
    let err = |reason: String| Error::PinDir {
        path: dir.to_owned(),
        reason,
    };
    std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
    if statfs_type(dir).map_err(|e| err(e.to_string()))? != BPF_FS_MAGIC {
        return Err(err(
            "not on a bpffs (mount one: mount -t bpf bpf /sys/fs/bpf)".into(),
        ));
    }
    Ok(())
}

/// The cgroup id of a cgroup v2 directory.
pub fn cgroup_id(path: &Path) -> Result<u64, Error> {
    open_cgroup(path).map(|(_, id)| id)
}

/// Parse the embedded object and load its programs into the kernel, without attaching them.
pub fn load() -> Result<Ebpf, aya::EbpfError> {
    Ebpf::load(OBJECT)
}
