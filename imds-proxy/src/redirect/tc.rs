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
//! port vouched for. cgroup mode is still the stronger of the two.
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

mod peer_addresses;
mod sources;
pub mod uplinks;

use sources::{Refusal, Source, SourceBook};

use super::{
    object::{
        Error, listen_config, load_configured, per_cpu_totals, program, program_fd, take_map,
    },
    pin::{Fresh, attach_or_adopt, link_pin_name},
};

pub const INGRESS_PROGRAM: &str = imds_common::PROG_TC_INGRESS;
pub const EGRESS_PROGRAM: &str = imds_common::PROG_TC_EGRESS;
pub const GUARD_PROGRAM: &str = imds_common::PROG_TC_SOURCE_GUARD;
pub const FORWARD_PROGRAM: &str = imds_common::PROG_TC_FORWARD_GUARD;
pub const REPLY_PROGRAM: &str = imds_common::PROG_TC_REPLY_GUARD;
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
/// cgroup mode's programs on each port of every bridge: the socket hooks attest the callers, so
/// only the answers' destination is checked.
const REPLY_ONLY: [(&str, TcAttachType); 1] = [(REPLY_PROGRAM, TcAttachType::Egress)];
/// The program on each interface a route to IMDS leaves by ([`uplinks`]).
const UPLINK_PROGRAMS: [(&str, TcAttachType); 1] = [(FORWARD_PROGRAM, TcAttachType::Egress)];

/// How an interface's programs are attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TcAttach {
    /// TCX links where the kernel has them (6.6+), else netlink.
    Auto,
    /// TCX links (kernel 6.6+); they can be pinned.
    Tcx,
    /// A clsact qdisc (created if absent) with direct-action filters.
    Netlink,
}

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

/// `IFACE=ADDR` of `--tc-static-source`.
pub fn parse_static_source(text: &str) -> Result<(String, std::net::IpAddr), String> {
    let (iface, addr) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not IFACE=ADDR"))?;
    if !valid_pattern(iface) || iface.contains(['*', '?']) {
        return Err(format!("{iface:?} is not an interface name"));
    }
    let addr = addr
        .parse()
        .map_err(|_| format!("{addr:?} is not an IP address"))?;
    Ok((iface.to_owned(), addr))
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
        ] {
            let prog: &mut SchedClassifier = program(&mut ebpf, name)?;
            prog.load()
                .map_err(|source| Error::Program { name, source })?;
        }
        let nat = take_map(&mut ebpf, MAP_NAT)?;
        let sources = take_map(&mut ebpf, MAP_TC_SOURCES)?;
        let stats = take_map(&mut ebpf, MAP_TC_STATS)?;
        let this = Self {
            inner: Mutex::new(Inner {
                ebpf,
                attached: BTreeMap::new(),
                ports: BTreeMap::new(),
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

    /// Names of the interfaces the programs are attached to now.
    pub fn interfaces(&self) -> Vec<String> {
        let inner = self.inner.lock().expect("tc lock poisoned");
        inner.attached.values().map(|i| i.name.clone()).collect()
    }

    /// Attach to matching interfaces not attached yet; forget those that are gone. Returns
    /// whether anything changed. Failures are logged per interface (and retried at the next
    /// reconcile): one bad interface does not stop the others.
    pub fn reconcile(&self) -> bool {
        let present = present_interfaces();
        let mut inner = self.inner.lock().expect("tc lock poisoned");
        let Inner {
            ebpf,
            attached,
            ports,
            uplinks,
            unlisted,
            stopped,
        } = &mut *inner;
        if *stopped {
            return false;
        }
        let gone = detach_gone(ebpf, attached, &present);
        for (_, name) in &gone {
            tracing::info!(interface = %name, "container interface gone; programs detached");
        }
        for (_, name) in detach_gone(ebpf, uplinks, &present) {
            tracing::info!(interface = %name, "uplink gone; forward guard detached");
        }
        let mut changed = !gone.is_empty();
        for (&index, name) in &present {
            if attached.contains_key(&index) {
                continue;
            }
            if !self.spec.interfaces.iter().any(|p| matches(p, name)) {
                // (cgroup mode names no interface: its socket hooks cover every bridge.)
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
        // The ports of those bridges: each container's own interface.
        let bridges: Vec<&String> = attached.values().map(|i| &i.name).collect();
        let every_bridge = self.spec.every_bridge;
        let present_ports: BTreeMap<u32, String> = present
            .into_iter()
            .filter(|(_, name)| {
                master(name)
                    .is_some_and(|m| bridges.contains(&&m) || (every_bridge && is_bridge_named(&m)))
            })
            .collect();
        let gone = detach_gone(ebpf, ports, &present_ports);
        for (index, name) in &gone {
            tracing::debug!(interface = %name, "container port gone");
            let mut state = self.sources.lock().expect("sources poisoned");
            let touched = state.book.port_gone(*index);
            if let Err(err) = state.apply(touched) {
                tracing::error!(interface = %name, %err, "forgetting a gone port's source addresses failed");
            }
        }
        changed |= !gone.is_empty();
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
                    let statics: Vec<std::net::IpAddr> = self
                        .spec
                        .static_sources
                        .iter()
                        .filter(|(iface, _)| *iface == name)
                        .map(|(_, addr)| *addr)
                        .collect();
                    if !statics.is_empty() {
                        match self.set_sources(&format!("static:{name}"), &[index], &statics) {
                            Ok(()) => {
                                tracing::info!(interface = %name, addresses = ?statics, "static source addresses vouched for")
                            }
                            Err(err) => {
                                tracing::error!(interface = %name, %err, "recording static source addresses failed")
                            }
                        }
                    }
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

    /// Whether `index` is a port of a bridge the programs are attached to (by the interface's
    /// master's index).
    pub fn is_bridge(&self, index: u32) -> bool {
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

    /// Follow interfaces as they come and go (rtnetlink link events) until the task is dropped.
    /// A subscription that ends (its socket overflowed under a burst of link events, or closed)
    /// is made again, and every interface looked at again, after a short back-off.
    pub async fn follow_interfaces(&self) {
        let mut backoff = std::time::Duration::from_millis(100);
        loop {
            let started = std::time::Instant::now();
            match self.watch_interfaces().await {
                Ok(()) => tracing::warn!(
                    retry_in = ?backoff,
                    "interface watch ended (its netlink socket overflowed or closed); watching \
                     again and looking at every interface"
                ),
                Err(err) => tracing::error!(
                    %err,
                    retry_in = ?backoff,
                    "cannot watch interfaces; new container interfaces are attached once the \
                     watch is back"
                ),
            }
            tokio::time::sleep(backoff).await;
            backoff = if started.elapsed() > std::time::Duration::from_secs(60) {
                std::time::Duration::from_millis(100)
            } else {
                (backoff * 2).min(std::time::Duration::from_secs(5))
            };
        }
    }

    /// One subscription to link and route events: look at every interface and every route to
    /// IMDS once subscribed (anything may have happened before), then again at each event, until
    /// the subscription ends.
    async fn watch_interfaces(&self) -> std::io::Result<()> {
        use futures_util::StreamExt as _;
        use rtnetlink::{
            constants::{RTMGRP_IPV4_ROUTE, RTMGRP_IPV6_ROUTE, RTMGRP_LINK},
            packet_core::NetlinkPayload,
            packet_route::RouteNetlinkMessage,
            sys::{AsyncSocket as _, SocketAddr},
        };
        let (mut connection, handle, mut messages) = rtnetlink::new_connection()?;
        let groups = SocketAddr::new(0, RTMGRP_LINK | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE);
        connection.socket_mut().socket_mut().bind(&groups)?;
        let connection = tokio::spawn(connection);
        self.reconcile();
        self.follow_routes(&handle).await?;
        while let Some((message, _)) = messages.next().await {
            match message.payload {
                NetlinkPayload::InnerMessage(
                    RouteNetlinkMessage::NewRoute(_) | RouteNetlinkMessage::DelRoute(_),
                ) => self.follow_routes(&handle).await?,
                // Link added, removed, renamed: look again (cheap: one sysfs listing).
                _ => {
                    self.reconcile();
                }
            }
        }
        connection.abort();
        Ok(())
    }

    /// The forward guard onto the interfaces routes to IMDS leave by now.
    async fn follow_routes(&self, handle: &rtnetlink::Handle) -> std::io::Result<()> {
        let wanted = uplinks::imds_route_interfaces(handle)
            .await
            .map_err(std::io::Error::other)?;
        self.set_uplinks(&wanted);
        Ok(())
    }

    /// Vouch for addresses as the kernel announces them behind container ports (provisional
    /// sources, [`sources`]) until the task is dropped. The announcements are read on a
    /// thread of their own.
    pub async fn follow_peer_addresses(self: std::sync::Arc<Self>) {
        use peer_addresses::{Event, host_side, watch};
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        std::thread::spawn(move || {
            if let Err(err) = watch(|event| tx.send(event).is_ok()) {
                tracing::error!(%err, "cannot hear containers' addresses as they are configured; a container's first connection to IMDS waits for Docker's report and a TCP retransmission");
            }
        });
        let handle = match rtnetlink::new_connection() {
            Ok((connection, handle, _)) => {
                tokio::spawn(connection);
                handle
            }
            Err(err) => {
                tracing::error!(%err, "cannot read interfaces; containers' addresses are vouched for when Docker reports them");
                return;
            }
        };
        while let Some(event) = rx.recv().await {
            let address = match event {
                Event::Address(address) => address,
                Event::Lost => {
                    tracing::warn!(
                        "address announcements lost (socket buffer full); those containers' addresses are vouched for when Docker reports them"
                    );
                    continue;
                }
            };
            let port = match host_side(&handle, address.nsid, address.ifindex).await {
                Ok(Some((port, Some(master)))) if self.is_bridge(master) => port,
                Ok(_) => continue, // not behind a port of a bridge we guard
                Err(err) => {
                    tracing::warn!(%err, ?address, "cannot find the host side of an announced address");
                    continue;
                }
            };
            if let Err(err) = self.observe_source(port, address.addr, address.added) {
                tracing::error!(port, %err, "recording a provisional source address failed");
            }
        }
    }

    /// Keep, for each container Docker reports, the addresses its own ports may send to IMDS
    /// from (its ports read from its network namespace, through `proc`), until the events end.
    pub async fn follow_sources(
        self: std::sync::Arc<Self>,
        mut events: tokio::sync::broadcast::Receiver<crate::docker::Event>,
        proc: crate::identity::Proc,
    ) {
        use crate::docker::{Event, next_event};
        while let Some(event) = next_event(&mut events, "source addresses").await {
            let container = match event {
                Event::Started(container) if container.running && container.pid != 0 => container,
                Event::Started(_) | Event::Created(_) => continue,
                Event::Destroyed(container) => {
                    self.forget_sources(&container.id);
                    continue;
                }
            };
            let (id, pid, proc) = (container.id.clone(), container.pid, proc.clone());
            let ports = tokio::task::spawn_blocking(move || container_ports(&proc, &id, pid))
                .await
                .map_err(std::io::Error::other)
                .and_then(|ports| ports);
            let ports = match ports {
                Ok(ports) => ports,
                Err(err) => {
                    tracing::error!(container_id = %container.id, %err, "cannot read the container's interfaces; its IMDS traffic stays dropped");
                    continue;
                }
            };
            match self.set_sources(&container.id, &ports, &container.addresses) {
                Ok(()) => tracing::debug!(
                    container_id = %container.id,
                    ?ports,
                    addresses = ?container.addresses,
                    "container's source addresses vouched for on its ports"
                ),
                Err(err) => {
                    tracing::error!(container_id = %container.id, %err, "recording source addresses failed; its IMDS traffic stays dropped")
                }
            }
        }
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
        let uplinks = std::mem::take(&mut inner.uplinks);
        for (_, interface) in attached.into_iter().chain(ports).chain(uplinks) {
            detach_interface(&mut inner.ebpf, interface, false);
        }
    }
}

/// Detach and forget what `attached` holds for interfaces no longer `present` (by index and
/// name: an index taken by another interface counts as gone); their names.
fn detach_gone(
    ebpf: &mut Ebpf,
    attached: &mut BTreeMap<u32, Interface>,
    present: &BTreeMap<u32, String>,
) -> Vec<(u32, String)> {
    let gone: Vec<u32> = attached
        .iter()
        .filter(|(index, i)| present.get(index) != Some(&i.name))
        .map(|(index, _)| *index)
        .collect();
    gone.into_iter()
        .filter_map(|index| Some((index, attached.remove(&index)?)))
        .map(|(index, interface)| {
            let name = interface.name.clone();
            detach_interface(ebpf, interface, true);
            (index, name)
        })
        .collect()
}

/// Detach one interface's links. `remove_pins`: the interface is gone, so are its pins' reasons.
fn detach_interface(ebpf: &mut Ebpf, interface: Interface, remove_pins: bool) {
    for link in interface.links {
        match link {
            Link::Owned { program: name, id } => {
                if let Ok(prog) = program::<SchedClassifier>(ebpf, name)
                    && let Err(err) = prog.detach(id)
                {
                    // The interface may be gone already, taking its attachments with it.
                    tracing::debug!(interface = %interface.name, program = name, %err, "detach");
                }
            }
            Link::Pinned { path, .. } if remove_pins => {
                let _ = std::fs::remove_file(&path);
            }
            Link::Pinned { .. } => {}
        }
    }
    if interface.created_clsact
        && let Err(err) = remove_clsact(&interface.name)
    {
        tracing::warn!(interface = %interface.name, %err, "removing the clsact qdisc we added");
    }
}

/// Remove the clsact qdisc of an interface (netlink mode, when this process added it).
fn remove_clsact(name: &str) -> std::io::Result<()> {
    let Ok(index) = std::fs::read_to_string(format!("/sys/class/net/{name}/ifindex")) else {
        return Ok(()); // gone, and its qdiscs with it
    };
    let index: i32 = index.trim().parse().map_err(std::io::Error::other)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::scope(|s| {
        s.spawn(|| {
            runtime.block_on(async {
                let (connection, handle, _) = rtnetlink::new_connection()?;
                tokio::spawn(connection);
                let mut request = handle.qdisc().del(index);
                let header = &mut request.message_mut().header;
                header.parent = rtnetlink::packet_route::tc::TcHandle::CLSACT;
                header.handle = rtnetlink::packet_route::tc::TcHandle::from(0xffff_0000);
                request.execute().await.map_err(std::io::Error::other)
            })
        })
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("qdisc removal panicked")))
    })
}

/// Whether interface `name` is a bridge (`/sys/class/net/<name>/bridge/`).
fn is_bridge_named(name: &str) -> bool {
    std::path::Path::new(&format!("/sys/class/net/{name}/bridge")).is_dir()
}

/// Whether `name` is a bridge with at least one port (`/sys/class/net/<name>/brif/`).
fn has_ports(name: &str) -> bool {
    std::fs::read_dir(format!("/sys/class/net/{name}/brif"))
        .is_ok_and(|mut ports| ports.next().is_some())
}

/// The bridge an interface is a port of, if any (`/sys/class/net/<name>/master`).
fn master(name: &str) -> Option<String> {
    let link = std::fs::read_link(format!("/sys/class/net/{name}/master")).ok()?;
    Some(link.file_name()?.to_string_lossy().into_owned())
}

/// The ports of container `id` (whose first process Docker says is `pid`, in the host's pid
/// namespace, which the proxy must share): the host-side interface indexes of the veths of that
/// process's network namespace, i.e. for each interface there whose link partner is in another
/// namespace, its partner's index (as the host numbers it). Read over rtnetlink from a thread
/// that enters that namespace; blocking.
pub fn container_ports(
    proc: &crate::identity::Proc,
    id: &str,
    pid: u32,
) -> std::io::Result<Vec<u32>> {
    use futures_util::TryStreamExt as _;
    use rtnetlink::packet_route::link::LinkAttribute;
    if !proc.in_container(pid, id) {
        return Err(std::io::Error::other(format!(
            "process {pid} is not in container {id}'s cgroup: the proxy does not see the host's \
             processes (tc mode needs the host's pid namespace: run its container with --pid host)"
        )));
    }
    let netns = std::fs::File::open(proc.netns(pid))?;
    std::thread::spawn(move || -> std::io::Result<Vec<u32>> {
        // Only this thread changes namespace; it ends with the lookup.
        nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(std::io::Error::from)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async {
            let (connection, handle, _) = rtnetlink::new_connection()?;
            tokio::spawn(connection);
            let mut links = handle.link().get().execute();
            let mut ports = Vec::new();
            while let Some(link) = links.try_next().await.map_err(std::io::Error::other)? {
                let mut partner = None;
                let mut elsewhere = false;
                for attribute in &link.attributes {
                    match attribute {
                        LinkAttribute::Link(index) => partner = Some(*index),
                        LinkAttribute::LinkNetNsId(_) => elsewhere = true,
                        _ => {}
                    }
                }
                if let (Some(index), true) = (partner, elsewhere) {
                    ports.push(index);
                }
            }
            Ok(ports)
        })
    })
    .join()
    .unwrap_or_else(|_| Err(std::io::Error::other("the namespace lookup panicked")))
}

/// Interfaces present now: index → name.
fn present_interfaces() -> BTreeMap<u32, String> {
    let mut found = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir("/sys/class/net") else {
        return found;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Ok(index) = std::fs::read_to_string(entry.path().join("ifindex"))
            && let Ok(index) = index.trim().parse()
        {
            found.insert(index, name);
        }
    }
    found
}

/// Shell-style match of an interface name: `*` any run, `?` any one character.
pub fn matches(pattern: &str, name: &str) -> bool {
    crate::roles::wildcard_match(pattern.as_bytes(), name.as_bytes())
}

/// Whether a `--container-iface` value is acceptable: an interface name (at most 15 bytes, no
/// `/`, whitespace or `:`) in which `*` and `?` may stand for characters.
pub fn valid_pattern(pattern: &str) -> bool {
    !pattern.is_empty()
        && pattern.len() <= 15
        && pattern
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':')
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`.
/// Remove the entries of a NAT map idle for longer than `idle` at `now_ns` (`CLOCK_MONOTONIC`,
/// the clock of `bpf_ktime_get_ns`); how many.
pub fn reap_idle<T: std::borrow::BorrowMut<MapData>>(
    nat: &mut HashMap<T, ConnKey, NatEntry>,
    now_ns: u64,
    idle: Duration,
) -> usize {
    let stale: Vec<ConnKey> = nat
        .iter()
        .filter_map(Result::ok)
        .filter(|(_, entry)| now_ns.saturating_sub(entry.last_seen_ns) > idle.as_nanos() as u64)
        .map(|(key, _)| key)
        .collect();
    stale.iter().filter(|key| nat.remove(key).is_ok()).count()
}

/// Now on `CLOCK_MONOTONIC`, in nanoseconds.
pub fn monotonic_ns() -> u64 {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always available");
    now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64
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
