//! tc mode: the packet-level redirect on container interfaces (`--mode tc --container-iface
//! docker0`, repeatable, `*` and `?` wildcards). Loads `imds_tc_ingress` / `imds_tc_egress` from
//! the same object as cgroup mode, attaches them to every interface whose name matches (TCX links
//! on kernels that have them, else a clsact qdisc with netlink filters), follows interfaces as
//! they come and go, and reaps NAT entries by age.
//!
//! With `--pin DIR` (TCX only) the links and maps are pinned: if the proxy dies, containers' IMDS
//! packets keep being rewritten to its (dead) listen address and are refused, never passed to the
//! instance's IMDS; a restarted proxy adopts the pinned links.
//!
//! tc mode has no kernel record of who connected: the proxy identifies a caller by its source
//! address through Docker. So that a source address cannot be borrowed (a container has NET_RAW
//! by default and can send with its neighbour's address), `imds_tc_source_guard` is attached to
//! every port of a matching bridge (the host side of each container's veth) and checks packets to
//! IMDS against the addresses of the container behind that port ([`TcRedirect::set_sources`], fed
//! from Docker and the container's network namespace); the bridge's program redirects only what a
//! port vouched for. A matching interface that is neither a bridge nor a bridge's port is a
//! routed container veth (a pod's own, with a host route: EKS's VPC CNI, Calico, CNI `ptp`): it
//! gets the routed programs, which check the source against that veth's own entries and redirect
//! in one program each way. cgroup mode is still the stronger of the two.
use std::{
    collections::BTreeMap,
    net::{SocketAddrV4, SocketAddrV6},
    path::PathBuf,
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use aya::{
    Ebpf,
    maps::{HashMap, MapData, PerCpuArray},
    programs::{
        LinkOrder, SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::{NlOptions, SchedClassifierLinkId, TcAttachOptions},
    },
    util::KernelVersion,
};
use imds_common::{
    AF_INET, AF_INET6, ConnKey, MAP_CONFIG, MAP_NAT, MAP_TC_SOURCES, MAP_TC_STATS, NatEntry,
    SourceKey, TcStat, raw_v6,
};

mod follow;
mod links;
mod nat;
mod netns;
mod peer_addresses;
mod sources;
pub mod uplinks;

pub use links::matches;
use links::{
    Shape, detach_gone, detach_interface, has_ports, is_bridge_named, master, present_interfaces,
    shape,
};
pub use nat::{monotonic_ns, reap_idle};
pub use netns::container_ports;

use sources::{Refusal, Source, SourceBook};

use super::{
    object::{
        Error, listen_config, load_configured, per_cpu_totals, program, program_fd, take_map,
    },
    pin::{Fresh, attach_or_adopt, link_pin_name, remove_gone_interface_links},
};

pub const INGRESS_PROGRAM: &str = imds_common::PROG_TC_INGRESS;
pub const EGRESS_PROGRAM: &str = imds_common::PROG_TC_EGRESS;
pub const GUARD_PROGRAM: &str = imds_common::PROG_TC_SOURCE_GUARD;
pub const FORWARD_PROGRAM: &str = imds_common::PROG_TC_FORWARD_GUARD;
pub const REPLY_PROGRAM: &str = imds_common::PROG_TC_REPLY_GUARD;
pub const ROUTED_INGRESS_PROGRAM: &str = imds_common::PROG_TC_ROUTED_INGRESS;
pub const ROUTED_EGRESS_PROGRAM: &str = imds_common::PROG_TC_ROUTED_EGRESS;
pub use crate::config::{TcAttach, parse_static_source, valid_pattern};

/// Maps pinned with `--pin` in tc mode.
pub const MAPS: [&str; 4] = [MAP_CONFIG, MAP_NAT, MAP_TC_STATS, MAP_TC_SOURCES];

/// The programs on a container interface (the bridge), egress first: replies must be rewritten
/// back before any request is redirected.
const BRIDGE_PROGRAMS: [(&str, TcAttachType); 2] = [
    (EGRESS_PROGRAM, TcAttachType::Egress),
    (INGRESS_PROGRAM, TcAttachType::Ingress),
];
/// The programs on each port of such a bridge: what the container sends to IMDS must be from its
/// own address, and the proxy's answers must be for it.
const PORT_PROGRAMS: [(&str, TcAttachType); 2] = [
    (GUARD_PROGRAM, TcAttachType::Ingress),
    (REPLY_PROGRAM, TcAttachType::Egress),
];
/// The programs on a routed container veth (no bridge: the pod's own veth is its port), egress
/// first for the same reason as on a bridge. Each holds its guard: one link per direction.
const ROUTED_PROGRAMS: [(&str, TcAttachType); 2] = [
    (ROUTED_EGRESS_PROGRAM, TcAttachType::Egress),
    (ROUTED_INGRESS_PROGRAM, TcAttachType::Ingress),
];
/// cgroup mode's programs on each port of every bridge: the socket hooks attest the callers, so
/// only the answers' destination is checked.
const REPLY_ONLY: [(&str, TcAttachType); 1] = [(REPLY_PROGRAM, TcAttachType::Egress)];
/// The program on each interface a route to IMDS leaves by ([`uplinks`]).
const UPLINK_PROGRAMS: [(&str, TcAttachType); 1] = [(FORWARD_PROGRAM, TcAttachType::Egress)];

/// Where and how to redirect.
#[derive(Clone, Debug)]
pub struct TcSpec {
    pub listen_v4: SocketAddrV4,
    pub listen_v6: Option<SocketAddrV6>,
    /// Interface names or patterns (`*`, `?`).
    pub interfaces: Vec<String>,
    pub attach: TcAttach,
    pub pin: Option<PathBuf>,
    /// Addresses bridge ports (by interface name) may send from, besides Docker containers'.
    pub static_sources: Vec<(String, std::net::IpAddr)>,
    /// cgroup mode: no container interface is rewritten (`interfaces` is empty), and the ports
    /// of **every** bridge get the reply guard alone. tc mode: the ports of the matching bridges
    /// get the source guard and the reply guard.
    pub every_bridge: bool,
}

impl TcAttach {
    /// What `Auto` means on this kernel.
    pub fn resolve(self) -> TcAttach {
        match self {
            TcAttach::Auto
                if KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0)) =>
            {
                TcAttach::Tcx
            }
            TcAttach::Auto => TcAttach::Netlink,
            other => other,
        }
    }
}

/// A link of one program on one interface.
enum Link {
    /// Held by the program: detached when it is detached or the program dropped.
    Owned {
        program: &'static str,
        id: SchedClassifierLinkId,
    },
    /// Pinned on bpffs: stays attached after this process, until the pin is removed.
    Pinned { _link: PinnedLink, path: PathBuf },
}

struct Interface {
    name: String,
    links: Vec<Link>,
    /// Netlink mode: the clsact qdisc was created by us (removed again on detach).
    created_clsact: bool,
}

struct Inner {
    ebpf: Ebpf,
    /// Container interfaces (bridges), by interface index.
    attached: BTreeMap<u32, Interface>,
    /// Their ports (containers' veths), by interface index.
    ports: BTreeMap<u32, Interface>,
    /// Routed container veths (matching, neither a bridge nor a bridge's port), by index.
    routed: BTreeMap<u32, Interface>,
    /// The interfaces routes to IMDS leave by, with the forward guard, by interface index.
    uplinks: BTreeMap<u32, Interface>,
    /// Bridges with ports that no pattern names, said once each.
    unlisted: std::collections::BTreeSet<String>,
    /// Detached for good ([`TcRedirect::detach_all`]): the interface watch attaches nothing more.
    stopped: bool,
}

/// `IMDS_TC_SOURCES`, and the book it is kept from.
struct Sources {
    map: HashMap<MapData, SourceKey, u8>,
    book: SourceBook,
}

impl Sources {
    /// Make the map say what the book says for each of `touched`.
    fn apply(&mut self, touched: std::collections::BTreeSet<Source>) -> Result<(), Error> {
        for source in touched {
            let key = source_key(source);
            if self.book.vouched(source) {
                self.map.insert(key, 1, 0).map_err(|source| Error::Map {
                    name: MAP_TC_SOURCES,
                    source,
                })?;
            } else {
                let _ = self.map.remove(&key);
            }
        }
        Ok(())
    }
}

fn source_key((ifindex, addr): Source) -> SourceKey {
    match addr {
        std::net::IpAddr::V4(v4) => SourceKey {
            ifindex,
            family: AF_INET as u32,
            addr: [u32::from_ne_bytes(v4.octets()), 0, 0, 0],
        },
        std::net::IpAddr::V6(v6) => SourceKey {
            ifindex,
            family: AF_INET6 as u32,
            addr: raw_v6(v6.octets()),
        },
    }
}

/// The tc programs and their attachments. Dropping it detaches what is not pinned.
pub struct TcRedirect {
    inner: Mutex<Inner>,
    nat: Mutex<HashMap<MapData, ConnKey, NatEntry>>,
    sources: Mutex<Sources>,
    stats: PerCpuArray<MapData, u64>,
    spec: TcSpec,
    attach: TcAttach,
    adopted: AtomicUsize,
}

/// NAT entries idle this long are removed (a connection to IMDS lives for a few requests).
pub const NAT_IDLE: Duration = Duration::from_secs(120);

impl TcRedirect {
    /// Load and configure the programs; attach them to every matching interface present now.
    pub fn attach(spec: &TcSpec) -> Result<Self, Error> {
        // Resolved, and checked against pinning, by the configuration.
        let attach = spec.attach.resolve();
        // Configured before anything is attached: unconfigured, the ingress program drops.
        let mut ebpf = load_configured(
            spec.pin.as_deref(),
            &MAPS,
            listen_config(spec.listen_v4, spec.listen_v6),
        )?;
        for name in [
            EGRESS_PROGRAM,
            INGRESS_PROGRAM,
            GUARD_PROGRAM,
            FORWARD_PROGRAM,
            REPLY_PROGRAM,
            ROUTED_EGRESS_PROGRAM,
            ROUTED_INGRESS_PROGRAM,
        ] {
            let prog: &mut SchedClassifier = program(&mut ebpf, name)?;
            prog.load()
                .map_err(|source| Error::Program { name, source })?;
        }
        if let Some(dir) = &spec.pin {
            let present = present_interfaces();
            let removed = remove_gone_interface_links(dir, |index| present.contains_key(&index))?;
            if !removed.is_empty() {
                tracing::info!(pins = ?removed, "removed the pinned links of interfaces gone while no proxy ran");
            }
        }
        let nat = take_map(&mut ebpf, MAP_NAT)?;
        let sources = take_map(&mut ebpf, MAP_TC_SOURCES)?;
        let stats = take_map(&mut ebpf, MAP_TC_STATS)?;
        let this = Self {
            inner: Mutex::new(Inner {
                ebpf,
                attached: BTreeMap::new(),
                ports: BTreeMap::new(),
                routed: BTreeMap::new(),
                uplinks: BTreeMap::new(),
                unlisted: Default::default(),
                stopped: false,
            }),
            nat: Mutex::new(nat),
            sources: Mutex::new(Sources {
                map: sources,
                book: SourceBook::default(),
            }),
            stats,
            spec: spec.clone(),
            attach,
            adopted: AtomicUsize::new(0),
        };
        this.reconcile();
        Ok(this)
    }

    /// TCX or netlink, as resolved on this kernel.
    pub fn attach_mode(&self) -> TcAttach {
        self.attach
    }

    /// Links adopted from pins of a previous run.
    pub fn adopted_links(&self) -> usize {
        self.adopted.load(Ordering::Relaxed)
    }

    /// Names of the container interfaces the programs are attached to now: bridges, then routed
    /// veths.
    pub fn interfaces(&self) -> Vec<String> {
        let inner = self.inner.lock().expect("tc lock poisoned");
        inner
            .attached
            .values()
            .chain(inner.routed.values())
            .map(|i| i.name.clone())
            .collect()
    }

    /// Attach to matching interfaces not attached yet; forget those that are gone. Returns
    /// whether anything changed. Failures are logged per interface (and retried at the next
    /// reconcile): one bad interface does not stop the others.
    ///
    /// A matching interface is handled by what it is ([`Shape`]): a bridge gets the redirect and
    /// each of its ports the guards; a routed veth (neither a bridge nor a bridge's port) gets
    /// the guards and the redirect itself; a bridge's port is its bridge's business (named or
    /// not: a port never gets the redirect of its own, so two programs never rewrite one packet).
    pub fn reconcile(&self) -> bool {
        let present = present_interfaces();
        let mut guard = self.inner.lock().expect("tc lock poisoned");
        let inner = &mut *guard;
        if inner.stopped {
            return false;
        }
        for (_, name) in detach_gone(&mut inner.ebpf, &mut inner.uplinks, &present) {
            tracing::info!(interface = %name, "uplink gone; forward guard detached");
        }
        // Routed veths before ports: a veth made a bridge's port since the last look leaves the
        // routed programs before it gets a port's.
        let mut changed = self.reconcile_bridges(inner, &present);
        changed |= self.reconcile_routed(inner, &present);
        changed |= self.reconcile_ports(inner, &present);
        changed
    }

    /// Whether a pattern names interface `name`.
    fn named(&self, name: &str) -> bool {
        self.spec.interfaces.iter().any(|p| matches(p, name))
    }

    /// The matching bridges: attach the redirect to new ones, detach it from gone ones; say once
    /// about each bridge with ports that no pattern names.
    fn reconcile_bridges(&self, inner: &mut Inner, present: &BTreeMap<u32, String>) -> bool {
        let Inner {
            ebpf,
            attached,
            unlisted,
            ..
        } = inner;
        let gone = detach_gone(ebpf, attached, present);
        for (_, name) in &gone {
            tracing::info!(interface = %name, "container interface gone; programs detached");
        }
        let mut changed = !gone.is_empty();
        for (&index, name) in present {
            if attached.contains_key(&index) {
                continue;
            }
            if !self.named(name) {
                // (cgroup mode names no interface: its socket hooks cover every bridge.) Only a
                // bridge has ports: no other interface is looked at further.
                if !self.spec.interfaces.is_empty()
                    && has_ports(name)
                    && unlisted.insert(name.clone())
                {
                    tracing::warn!(
                        interface = %name,
                        patterns = ?self.spec.interfaces,
                        "a bridge with ports that no --container-iface names: its containers' IMDS \
                         traffic is not redirected (the forward guard drops it where it leaves \
                         the host); add it to --container-iface"
                    );
                }
                continue;
            }
            if !is_bridge_named(name) {
                // Named but not a bridge: a routed veth or a bridge's port (`reconcile_routed`).
                continue;
            }
            match self.attach_interface(ebpf, name, index, &BRIDGE_PROGRAMS) {
                Ok(interface) => {
                    tracing::info!(interface = %name, mode = ?self.attach, "redirect attached to container interface");
                    attached.insert(index, interface);
                    changed = true;
                }
                Err(err) => {
                    tracing::error!(interface = %name, %err, "attaching to container interface failed; its containers' IMDS traffic is not redirected")
                }
            }
        }
        changed
    }

    /// The ports of the matching bridges (cgroup mode: of every bridge), each container's own
    /// interface: the guards onto new ones, gone ones' sources forgotten.
    fn reconcile_ports(&self, inner: &mut Inner, present: &BTreeMap<u32, String>) -> bool {
        let Inner {
            ebpf,
            attached,
            ports,
            ..
        } = inner;
        let bridges: Vec<&String> = attached.values().map(|i| &i.name).collect();
        let every_bridge = self.spec.every_bridge;
        let present_ports: BTreeMap<u32, String> = present
            .iter()
            .filter(|(_, name)| {
                master(name)
                    .is_some_and(|m| bridges.contains(&&m) || (every_bridge && is_bridge_named(&m)))
            })
            .map(|(index, name)| (*index, name.clone()))
            .collect();
        let gone = detach_gone(ebpf, ports, &present_ports);
        for (index, name) in &gone {
            tracing::debug!(interface = %name, "container port gone");
            self.port_gone(*index, name);
        }
        let mut changed = !gone.is_empty();
        for (index, name) in present_ports {
            if ports.contains_key(&index) {
                continue;
            }
            let programs: &[(&str, TcAttachType)] = if every_bridge {
                &REPLY_ONLY
            } else {
                &PORT_PROGRAMS
            };
            match self.attach_interface(ebpf, &name, index, programs) {
                Ok(port) => {
                    tracing::debug!(interface = %name, "source guard attached to container port");
                    ports.insert(index, port);
                    changed = true;
                    self.vouch_static_sources(index, &name);
                }
                Err(err) => tracing::error!(
                    interface = %name,
                    %err,
                    "attaching the source guard to a container port failed; its container's IMDS \
                     traffic is dropped"
                ),
            }
        }
        changed
    }

    /// The matching routed veths (tc mode; [`Shape::Routed`]): the routed programs onto new ones,
    /// gone ones' sources forgotten. One line each as they come and go: a pod's start and end.
    fn reconcile_routed(&self, inner: &mut Inner, present: &BTreeMap<u32, String>) -> bool {
        let Inner { ebpf, routed, .. } = inner;
        let present_routed: BTreeMap<u32, String> = present
            .iter()
            .filter(|(_, name)| self.named(name) && shape(name) == Shape::Routed)
            .map(|(index, name)| (*index, name.clone()))
            .collect();
        let gone = detach_gone(ebpf, routed, &present_routed);
        for (index, name) in &gone {
            if present.contains_key(index) {
                // Made a bridge's port after it appeared (a runtime creates the veth, then
                // enslaves it): its bridge decides now. Its container's addresses stay its own.
                tracing::info!(interface = %name, "no longer a routed veth (a bridge's port now); its programs detached");
            } else {
                tracing::info!(interface = %name, "routed container veth gone; programs detached");
                self.port_gone(*index, name);
            }
        }
        let mut changed = !gone.is_empty();
        for (index, name) in present_routed {
            if routed.contains_key(&index) {
                continue;
            }
            match self.attach_interface(ebpf, &name, index, &ROUTED_PROGRAMS) {
                Ok(veth) => {
                    tracing::info!(interface = %name, mode = ?self.attach, "redirect and guards attached to routed container veth");
                    routed.insert(index, veth);
                    changed = true;
                    self.vouch_static_sources(index, &name);
                }
                Err(err) => tracing::error!(
                    interface = %name,
                    %err,
                    "attaching to a routed container veth failed; its container's IMDS traffic \
                     is not redirected (the forward guard drops it where it leaves the host)"
                ),
            }
        }
        changed
    }

    /// A container's own interface (a bridge port or a routed veth) is gone: the addresses
    /// vouched for on it are nobody's there any more.
    fn port_gone(&self, index: u32, name: &str) {
        let mut state = self.sources.lock().expect("sources poisoned");
        let touched = state.book.port_gone(index);
        if let Err(err) = state.apply(touched) {
            tracing::error!(interface = %name, %err, "forgetting a gone port's source addresses failed");
        }
    }

    /// `--static-source` addresses of a container interface that was just guarded.
    fn vouch_static_sources(&self, index: u32, name: &str) {
        let statics: Vec<std::net::IpAddr> = self
            .spec
            .static_sources
            .iter()
            .filter(|(iface, _)| iface == name)
            .map(|(_, addr)| *addr)
            .collect();
        if statics.is_empty() {
            return;
        }
        match self.set_sources(&format!("static:{name}"), &[index], &statics) {
            Ok(()) => {
                tracing::info!(interface = %name, addresses = ?statics, "static source addresses vouched for")
            }
            Err(err) => {
                tracing::error!(interface = %name, %err, "recording static source addresses failed")
            }
        }
    }

    /// The addresses container `id` may send to IMDS from, on each of its ports (host-side
    /// interface indexes); replaces what it had. Empty `ports` or `addresses`: it has none.
    pub fn set_sources(
        &self,
        id: &str,
        ports: &[u32],
        addresses: &[std::net::IpAddr],
    ) -> Result<(), Error> {
        let sources: Vec<Source> = ports
            .iter()
            .flat_map(|&port| addresses.iter().map(move |&addr| (port, addr)))
            .collect();
        let mut state = self.sources.lock().expect("sources poisoned");
        let touched = state.book.set(id, sources);
        state.apply(touched)
    }

    /// The kernel reports `addr` configured (`added`) or removed in the network namespace behind
    /// container port `port`: a provisional source until Docker says whose the port is (see
    /// [`sources`]).
    pub fn observe_source(
        &self,
        port: u32,
        addr: std::net::IpAddr,
        added: bool,
    ) -> Result<(), Error> {
        let mut state = self.sources.lock().expect("sources poisoned");
        let touched = if added {
            match state.book.observe((port, addr), std::time::Instant::now()) {
                Ok(touched) => {
                    tracing::debug!(port, %addr, "address behind a container port vouched for until Docker reports its container");
                    touched
                }
                Err(Refusal::PortVouched) => return Ok(()),
                Err(refusal @ Refusal::OwnedElsewhere) => {
                    tracing::warn!(port, %addr, %refusal, "address configured behind a container port not vouched for");
                    return Ok(());
                }
            }
        } else {
            state.book.unobserve((port, addr))
        };
        state.apply(touched)
    }

    /// Drop provisional sources Docker never confirmed in time; how many are left.
    pub fn expire_sources(&self) -> usize {
        let mut state = self.sources.lock().expect("sources poisoned");
        let touched = state.book.expire(std::time::Instant::now());
        if let Err(err) = state.apply(touched) {
            tracing::error!(%err, "removing expired source addresses failed");
        }
        state.book.provisional()
    }

    /// Whether host-side interface `port` (a port of bridge `master`, or no bridge's) is a
    /// container interface the guards are on: a port of a bridge the programs are attached to,
    /// or a routed veth.
    pub fn guards(&self, port: u32, master: Option<u32>) -> bool {
        match master {
            Some(master) => self.is_bridge(master),
            None => {
                let inner = self.inner.lock().expect("tc lock poisoned");
                inner.routed.contains_key(&port)
            }
        }
    }

    /// Whether `index` is a bridge the programs are attached to (cgroup mode: any bridge).
    fn is_bridge(&self, index: u32) -> bool {
        let inner = self.inner.lock().expect("tc lock poisoned");
        inner.attached.contains_key(&index)
            || (self.spec.every_bridge
                && present_interfaces()
                    .get(&index)
                    .is_some_and(|name| is_bridge_named(name)))
    }

    /// Container `id` is gone: its addresses are nobody's on its ports any more.
    pub fn forget_sources(&self, id: &str) {
        let _ = self.set_sources(id, &[], &[]);
    }

    fn attach_interface(
        &self,
        ebpf: &mut Ebpf,
        name: &str,
        index: u32,
        programs: &[(&'static str, TcAttachType)],
    ) -> Result<Interface, Error> {
        let mut interface = Interface {
            name: name.to_owned(),
            links: Vec::new(),
            created_clsact: false,
        };
        if self.attach == TcAttach::Netlink {
            match aya::programs::tc::qdisc_add_clsact(name) {
                Ok(()) => interface.created_clsact = true,
                Err(aya::programs::tc::TcError::IoError(e))
                    if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(aya::programs::tc::TcError::NetlinkError(e))
                    if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => {
                    return Err(Error::Io(std::io::Error::other(format!(
                        "adding a clsact qdisc: {e}"
                    ))));
                }
            }
        }
        for &(name_of_program, kind) in programs {
            let pin_path = self
                .spec
                .pin
                .as_ref()
                .map(|dir| dir.join(link_pin_name(name_of_program, &format!("if{index}"))));
            let mut adopted = 0;
            let mut owned = None;
            let prog_fd = {
                let prog: &mut SchedClassifier = program(ebpf, name_of_program)?;
                program_fd(prog.fd(), name_of_program)?
            };
            let attached = attach_or_adopt(
                pin_path.as_deref(),
                &mut adopted,
                std::os::fd::AsFd::as_fd(&prog_fd),
                |pinning| {
                    let prog: &mut SchedClassifier = program(ebpf, name_of_program)?;
                    let options = match self.attach {
                        TcAttach::Netlink => TcAttachOptions::Netlink(NlOptions::default()),
                        _ => TcAttachOptions::TcxOrder(LinkOrder::default()),
                    };
                    let program_error = |source| Error::Program {
                        name: name_of_program,
                        source,
                    };
                    let id = prog
                        .attach_with_options(name, kind, options)
                        .map_err(program_error)?;
                    if pinning.is_none() {
                        owned = Some(id);
                        return Ok(Fresh::Unpinned);
                    }
                    let link = prog.take_link(id).map_err(program_error)?;
                    FdLink::try_from(link)
                        .map(Fresh::Link)
                        .map_err(|source| Error::Link {
                            name: name_of_program,
                            source,
                        })
                },
            );
            self.adopted.fetch_add(adopted, Ordering::Relaxed);
            match (attached, pin_path) {
                (Ok(Some(link)), Some(path)) => {
                    interface.links.push(Link::Pinned { _link: link, path });
                }
                (Ok(_), _) => interface.links.push(Link::Owned {
                    program: name_of_program,
                    id: owned.expect("attached without pinning"),
                }),
                (Err(err), _) => {
                    // What this interface got so far goes too: all of its programs or none.
                    detach_interface(ebpf, interface, false);
                    return Err(err);
                }
            }
        }
        Ok(interface)
    }

    /// Remove NAT entries idle for longer than `idle`; returns how many.
    pub fn reap(&self, idle: Duration) -> usize {
        let mut nat = self.nat.lock().expect("nat lock poisoned");
        reap_idle(&mut nat, monotonic_ns(), idle)
    }

    /// Entries in `IMDS_TC_SOURCES` now: (port, address) pairs vouched for.
    pub fn source_entries(&self) -> usize {
        let state = self.sources.lock().expect("sources poisoned");
        state.map.keys().filter_map(Result::ok).count()
    }

    /// Entries in the NAT table now.
    pub fn nat_entries(&self) -> usize {
        let nat = self.nat.lock().expect("nat lock poisoned");
        nat.keys().filter_map(Result::ok).count()
    }

    /// The programs' counters, summed over CPUs.
    pub fn stats(&self) -> Vec<(TcStat, u64)> {
        per_cpu_totals(&self.stats, &TcStat::ALL, |stat| stat as u32)
    }

    /// Attach the forward guard to the interfaces in `wanted` (those routes to IMDS leave by,
    /// [`uplinks`]) that are present, and detach it from the others.
    pub fn set_uplinks(&self, wanted: &std::collections::BTreeSet<u32>) {
        let present = present_interfaces();
        let mut inner = self.inner.lock().expect("tc lock poisoned");
        let Inner {
            ebpf,
            uplinks,
            stopped,
            ..
        } = &mut *inner;
        if *stopped {
            return;
        }
        let keep: BTreeMap<u32, String> = present
            .into_iter()
            .filter(|(index, _)| wanted.contains(index))
            .collect();
        for (_, name) in detach_gone(ebpf, uplinks, &keep) {
            tracing::info!(interface = %name, "no route to IMDS leaves by this interface any more; forward guard detached");
        }
        for (index, name) in keep {
            if uplinks.contains_key(&index) {
                continue;
            }
            match self.attach_interface(ebpf, &name, index, &UPLINK_PROGRAMS) {
                Ok(uplink) => {
                    tracing::info!(interface = %name, "forward guard attached: forwarded packets to IMDS leaving by this interface are dropped");
                    uplinks.insert(index, uplink);
                }
                Err(err) => tracing::error!(
                    interface = %name,
                    %err,
                    "attaching the forward guard failed; forwarded packets to IMDS leave by this \
                     interface unchecked"
                ),
            }
        }
    }

    /// Names of the interfaces the forward guard is attached to now.
    pub fn uplinks(&self) -> Vec<String> {
        let inner = self.inner.lock().expect("tc lock poisoned");
        inner.uplinks.values().map(|i| i.name.clone()).collect()
    }

    /// Graceful shutdown without pins: detach from every interface and remove the qdiscs this
    /// process created. (With pins, links stay: dropping `self` keeps them.)
    pub fn detach_all(&self) {
        let mut inner = self.inner.lock().expect("tc lock poisoned");
        inner.stopped = true;
        let attached = std::mem::take(&mut inner.attached);
        let ports = std::mem::take(&mut inner.ports);
        let routed = std::mem::take(&mut inner.routed);
        let uplinks = std::mem::take(&mut inner.uplinks);
        for (_, interface) in attached
            .into_iter()
            .chain(ports)
            .chain(routed)
            .chain(uplinks)
        {
            detach_interface(&mut inner.ebpf, interface, false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_patterns() {
        assert!(matches("docker0", "docker0"));
        assert!(!matches("docker0", "docker01"));
        assert!(matches("br-*", "br-5a2ba51e7b11"));
        assert!(!matches("br-*", "docker0"));
        assert!(matches("veth?", "veth1"));
        assert!(!matches("veth?", "veth12"));
        assert!(matches("*", "anything"));
        assert!(valid_pattern("br-*"));
        assert!(!valid_pattern(""));
        assert!(!valid_pattern("a/b"));
        assert!(!valid_pattern("docker 0"));
        assert!(!valid_pattern("a-name-longer-than-15"));
    }
}
