//! The eBPF object built from `imds-ebpf`: loading it, configuring it before anything is
//! attached, and the pieces both modes share (map keys, per-CPU counters; the errors are [`super::error`]'s).
use std::{
    net::{SocketAddrV4, SocketAddrV6},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, MapData, PerCpuArray},
};
use imds_common::{MAP_CONFIG, RedirectConfig, raw_port, raw_v4, raw_v6};

/// The eBPF object built from `imds-ebpf` by build.rs, embedded at compile time.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/imds-ebpf"));

pub use super::error::Error;

pub(crate) fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, Error>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .expect("the object defines every program this module names")
        .try_into()
        .map_err(|source| Error::Program { name, source })
}

/// An owned copy of a loaded program's descriptor (for `BPF_LINK_UPDATE` of adopted links).
pub(crate) fn program_fd(
    fd: Result<&aya::programs::ProgramFd, aya::programs::ProgramError>,
    name: &'static str,
) -> Result<std::os::fd::OwnedFd, Error> {
    let fd = fd.map_err(|source| Error::Program { name, source })?;
    Ok(std::os::fd::AsFd::as_fd(fd).try_clone_to_owned()?)
}

/// Take map `name` out of the loaded object as the typed map `M` (the object defines every map
/// the modes name).
pub(crate) fn take_map<M>(ebpf: &mut Ebpf, name: &'static str) -> Result<M, Error>
where
    M: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    M::try_from(
        ebpf.take_map(name)
            .expect("the object defines every map this module names"),
    )
    .map_err(|source| Error::Map { name, source })
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
        host_pidns_dev: 0,
        host_pidns_ino: 0,
        gate: 0,
        _reserved: 0,
    }
}

/// The host's PID namespace as the kernel's `bpf_get_ns_current_pid_tgid` names it: the nsfs
/// device of this process's PID namespace file (every namespace file is on the one nsfs) in the
/// kernel's `dev_t` encoding, and the initial namespace's fixed inode. Right wherever the proxy
/// runs (the host's PID namespace or a container's).
pub fn host_pidns() -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    let dev = std::fs::metadata("/proc/self/ns/pid")?.dev();
    // Userspace's st_dev to the kernel's MKDEV(major, minor) = major << 20 | minor.
    let kernel_dev = (libc::major(dev) as u64) << 20 | libc::minor(dev) as u64;
    Ok((kernel_dev, imds_common::HOST_PIDNS_INO))
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
            super::pin::prepare_pin_dir(dir)?;
            super::pin::replace_incompatible_maps(dir, maps, OBJECT)?;
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

/// The configuration pinned in `dir` by whoever runs there (a proxy, or `imds-proxy gate`);
/// `None` when nothing is pinned there, or the pinned map is of another layout (another build's).
pub fn pinned_config(dir: &Path) -> Result<Option<RedirectConfig>, Error> {
    let path = dir.join(MAP_CONFIG);
    if !path.exists() {
        return Ok(None);
    }
    let err = |source| Error::Map {
        name: MAP_CONFIG,
        source,
    };
    let data = MapData::from_pin(&path).map_err(err)?;
    let Ok(slot) = Array::<_, RedirectConfig>::try_from(aya::maps::Map::Array(data)) else {
        return Ok(None);
    };
    slot.get(&0, 0).map(Some).map_err(err)
}

/// Parse the embedded object and load its programs into the kernel, without attaching them.
pub fn load() -> Result<Ebpf, aya::EbpfError> {
    Ebpf::load(OBJECT)
}
