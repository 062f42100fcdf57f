//! Types shared by the kernel programs (`imds-ebpf`) and userspace (`imds-proxy`).
//!
//! Everything here is `no_std` and `#[repr(C)]` with explicit padding, because the same bytes are
//! written by one side of a BPF map and read by the other. Addresses are kept as the kernel keeps
//! them in `bpf_sock_addr` / `bpf_sock_ops`: 32-bit words whose memory bytes are the address in
//! network order. Ports are noted per field, because the kernel is not consistent about them.
#![no_std]

/// The IPv4 address of the EC2 instance metadata service, 169.254.169.254.
pub const IMDS_V4_OCTETS: [u8; 4] = [169, 254, 169, 254];

/// The IPv6 address of the EC2 instance metadata service, fd00:ec2::254.
pub const IMDS_V6_OCTETS: [u8; 16] = [
    0xfd, 0x00, 0x0e, 0xc2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x02, 0x54,
];

/// The TCP port of the instance metadata service.
pub const IMDS_PORT: u16 = 80;

/// `AF_INET` and `AF_INET6`, as the kernel numbers them.
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Names of the programs: their function names in `imds-ebpf`, which the loader looks up in the
/// object (and part of their links' pin names under `--pin DIR`).
pub const PROG_CONNECT4: &str = "imds_connect4";
pub const PROG_CONNECT6: &str = "imds_connect6";
/// The connect programs without the host-PID-namespace wall, for kernels before 6.10 (whose
/// cgroup programs cannot call `bpf_get_ns_current_pid_tgid`).
pub const PROG_CONNECT4_COMPAT: &str = "imds_connect4_compat";
pub const PROG_CONNECT6_COMPAT: &str = "imds_connect6_compat";
pub const PROG_GETPEERNAME4: &str = "imds_getpeername4";
pub const PROG_GETPEERNAME6: &str = "imds_getpeername6";
pub const PROG_SOCK_OPS: &str = "imds_sock_ops";
pub const PROG_EGRESS_GUARD: &str = "imds_egress_guard";
pub const PROG_TC_INGRESS: &str = "imds_tc_ingress";
pub const PROG_TC_EGRESS: &str = "imds_tc_egress";
pub const PROG_TC_SOURCE_GUARD: &str = "imds_tc_source_guard";
pub const PROG_TC_FORWARD_GUARD: &str = "imds_tc_forward_guard";
pub const PROG_TC_REPLY_GUARD: &str = "imds_tc_reply_guard";
pub const PROG_TC_ROUTED_INGRESS: &str = "imds_tc_routed_ingress";
pub const PROG_TC_ROUTED_EGRESS: &str = "imds_tc_routed_egress";

/// Names of the maps, which are also their pin names under `--pin DIR`.
pub const MAP_CONFIG: &str = "IMDS_CONFIG";
pub const MAP_PENDING: &str = "IMDS_PENDING";
pub const MAP_CONNS: &str = "IMDS_CONNS";
pub const MAP_CONTAINER_CGROUPS: &str = "IMDS_CGROUPS";
pub const MAP_GUARD_STATS: &str = "IMDS_GUARD_STATS";

/// What the egress guard counted, one slot each in the per-CPU array `IMDS_GUARD_STATS`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuardStat {
    /// Packets to an IMDS address from a container's socket (it went around the connect
    /// hooks: a raw socket, UDP, ...): dropped.
    Dropped = 0,
    /// Packets to an IMDS address while the programs were not configured: dropped.
    DroppedUnconfigured,
}

impl GuardStat {
    pub const ALL: [GuardStat; 2] = [GuardStat::Dropped, GuardStat::DroppedUnconfigured];

    /// Its name in metrics and logs.
    pub const fn name(self) -> &'static str {
        match self {
            GuardStat::Dropped => "dropped",
            GuardStat::DroppedUnconfigured => "dropped_unconfigured",
        }
    }
}

/// Slots in `IMDS_GUARD_STATS`.
pub const GUARD_STATS: u32 = GuardStat::ALL.len() as u32;

/// Capacity of the connection record maps (LRU: the oldest record goes when full).
pub const MAX_CONNS: u32 = 16_384;
/// Capacity of the cgroup classification used in filter mode.
pub const MAX_FILTER_CGROUPS: u32 = 65_536;

/// Filter mode: the value of a cgroup in `IMDS_CGROUPS`. A cgroup that is absent is not yet
/// classified, and its IMDS connects are refused: fail closed until userspace knows it.
pub const CGROUP_CONTAINER: u8 = 1;
/// Filter mode: a host service's cgroup; its IMDS connects go to IMDS untouched.
pub const CGROUP_HOST: u8 = 2;

/// An address as the kernel's socket hooks carry it: 4 words, each holding 4 bytes of the address
/// in network order. IPv4 uses the first word only.
pub type RawAddr = [u32; 4];

/// The third word of a v4-mapped IPv6 address (`::ffff:a.b.c.d`) in raw form; the fourth word
/// is the IPv4 address.
pub const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// Whether a raw IPv6 address is v4-mapped (`::ffff:a.b.c.d`): an AF_INET6 socket talking IPv4.
pub const fn is_v4_mapped(raw: &RawAddr) -> bool {
    raw[0] == 0 && raw[1] == 0 && raw[2] == V4_MAPPED_WORD
}

/// The IPv4 address in the kernel's `user_ip4` / `local_ip4` form.
pub const fn raw_v4(octets: [u8; 4]) -> u32 {
    u32::from_ne_bytes(octets)
}

/// The IPv6 address in the kernel's `user_ip6` / `local_ip6` form.
pub const fn raw_v6(o: [u8; 16]) -> RawAddr {
    [
        u32::from_ne_bytes([o[0], o[1], o[2], o[3]]),
        u32::from_ne_bytes([o[4], o[5], o[6], o[7]]),
        u32::from_ne_bytes([o[8], o[9], o[10], o[11]]),
        u32::from_ne_bytes([o[12], o[13], o[14], o[15]]),
    ]
}

/// The octets of a raw IPv6 address.
pub const fn v6_octets(raw: RawAddr) -> [u8; 16] {
    let [a, b, c, d] = [
        raw[0].to_ne_bytes(),
        raw[1].to_ne_bytes(),
        raw[2].to_ne_bytes(),
        raw[3].to_ne_bytes(),
    ];
    [
        a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2],
        d[3],
    ]
}

/// A port in the kernel's `user_port` form: network byte order in the low 16 bits of a u32.
pub const fn raw_port(port: u16) -> u32 {
    port.to_be() as u32
}

/// What the redirect programs need to know, set by userspace in the single slot of `IMDS_CONFIG`.
/// A zero `proxy_port` means "not configured": the programs then refuse IMDS connects.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RedirectConfig {
    /// The proxy's IPv4 listen address (`user_ip4` form).
    pub proxy_v4: u32,
    /// The proxy's IPv6 listen address (`user_ip6` form); all zero when there is none.
    pub proxy_v6: RawAddr,
    /// The proxy's IPv4 listen port (`user_port` form: network order).
    pub proxy_port_v4: u32,
    /// The proxy's IPv6 listen port (`user_port` form: network order).
    pub proxy_port_v6: u32,
    /// Non-zero (filter mode, for a parent that also holds host services): redirect sockets of
    /// cgroups marked [`CGROUP_CONTAINER`] in `IMDS_CGROUPS` and those not classified yet, pass
    /// those marked [`CGROUP_HOST`] (from a task in the host's PID namespace only). Zero: redirect
    /// every socket under the attach point.
    pub filter: u32,
    /// The proxy's own cgroup: its connects (to the real IMDS) are never rewritten.
    pub proxy_cgroup: u64,
    /// Non-zero (tc mode): the connect programs act only on sockets in the network namespace
    /// with this cookie, the host's: host-network containers, whose IMDS traffic never crosses a
    /// container interface. Sockets in other namespaces (bridged containers) are left to the tc
    /// programs. Zero (cgroup mode): every namespace.
    pub netns_cookie: u64,
    /// The host's (the initial) PID namespace, as `bpf_get_ns_current_pid_tgid` takes it: the
    /// nsfs device (kernel `dev_t` encoding) and the namespace's inode. A connect from a task in
    /// any other PID namespace is a container's, whatever its cgroup is called. Zero: no such
    /// check (unit tests; a configuration never written).
    pub host_pidns_dev: u64,
    pub host_pidns_ino: u64,
    /// Non-zero: written by `imds-proxy gate`, which attaches before any proxy runs. What would
    /// be redirected is refused instead (`EPERM`: nothing listens yet); host cgroups pass as in
    /// filter mode. The proxy that adopts the gate's pins writes zero.
    pub gate: u32,
    pub _reserved: u32,
}

/// The inode number of the initial PID namespace (`PROC_PID_INIT_INO`), the same on every
/// Linux system.
pub const HOST_PIDNS_INO: u64 = 0xEFFF_FFFC;

/// Who opened a redirected connection, and where it was going.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnRecord {
    /// cgroup v2 id of the task that called connect (the inode number of its cgroup directory).
    pub cgroup_id: u64,
    /// Process (thread group) id of that task, in the initial pid namespace.
    pub tgid: u32,
    /// `AF_INET` or `AF_INET6`.
    pub family: u16,
    /// The original destination port, host order.
    pub orig_port: u16,
    /// The original destination address (raw form).
    pub orig_addr: RawAddr,
}

/// A redirected connection as the proxy sees it: the client's address and port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// Client address (raw form; IPv4 in the first word, the rest zero).
    pub addr: RawAddr,
    /// Client port, host order (as `bpf_sock_ops.local_port` carries it).
    pub port: u32,
    /// `AF_INET` or `AF_INET6`.
    pub family: u32,
}

impl From<core::net::SocketAddr> for ConnKey {
    /// The key of the connection whose client is this address and port (the proxy's accepted
    /// peer).
    fn from(peer: core::net::SocketAddr) -> Self {
        match peer {
            core::net::SocketAddr::V4(a) => ConnKey {
                addr: [raw_v4(a.ip().octets()), 0, 0, 0],
                port: a.port() as u32,
                family: AF_INET as u32,
            },
            core::net::SocketAddr::V6(a) => ConnKey {
                addr: raw_v6(a.ip().octets()),
                port: a.port() as u32,
                family: AF_INET6 as u32,
            },
        }
    }
}

/// tc mode: names of its maps (also their pin names).
pub const MAP_NAT: &str = "IMDS_NAT";
pub const MAP_TC_STATS: &str = "IMDS_TC_STATS";
/// tc mode: capacity of the NAT table (LRU: the least recently used entry goes when full).
pub const MAX_NAT: u32 = 16_384;

/// [`NatEntry::fin`] bits: which side has sent its FIN.
pub const FIN_FROM_CLIENT: u8 = 1;
pub const FIN_FROM_PROXY: u8 = 2;

/// tc mode: one redirected connection, under the client's [`ConnKey`] in `IMDS_NAT`. Created by
/// the ingress program on the client's SYN, used by the egress program to restore the original
/// destination as the source of the replies, removed on RST, after both FINs, or by age.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatEntry {
    /// The original destination (raw form; IPv4 in the first word).
    pub orig_addr: RawAddr,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) of the last packet seen either way.
    pub last_seen_ns: u64,
    /// The interface the client's packets arrive on.
    pub ifindex: u32,
    /// The original destination port, network order.
    pub orig_port: u16,
    /// [`FIN_FROM_CLIENT`] | [`FIN_FROM_PROXY`].
    pub fin: u8,
    pub _pad: u8,
}

/// tc mode: what the programs counted, one slot each in the per-CPU array `IMDS_TC_STATS`.
/// Anything to or from the redirect addresses that they cannot rewrite is dropped and counted
/// here, never passed on.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcStat {
    /// Client packets to the IMDS address rewritten towards the proxy.
    Redirected = 0,
    /// Proxy replies rewritten back to come from the IMDS address.
    Reversed,
    /// Replies rewritten with no NAT entry (evicted or reaped): the listen address is used only
    /// by redirected traffic, so the original destination can only be the IMDS address.
    ReversedWithoutState,
    /// TCP to the IMDS address on a port other than 80: dropped.
    DroppedOtherPort,
    /// Fragments to or from the redirect addresses: dropped (only the first carries the ports).
    DroppedFragment,
    /// Packets to or from the redirect addresses that are not plain TCP: IPv4 non-TCP, IPv6
    /// whose next header is not TCP (extension headers, fragments, ICMPv6): dropped.
    DroppedNotTcp,
    /// Packets from a container interface addressed to the proxy's listen address directly:
    /// dropped, the address is reserved for redirected traffic.
    DroppedDirect,
    /// Packets to or from the redirect addresses whose headers are malformed or could not be
    /// read (shorter than they say), or whose rewrite failed (a helper returned an error):
    /// dropped, never sent on half-rewritten.
    DroppedBroken,
    /// NAT entries removed by the programs (RST, or FIN from both sides).
    NatClosed,
    /// Client packets to IMDS that the host would forward rather than deliver locally once
    /// rewritten (the listen address is not on this host: its interface was deleted while pinned
    /// programs stayed attached): dropped, so nothing addressed to the proxy leaves the host.
    DroppedNotLocal,
    /// IPv6 packets to IMDS while the proxy has no IPv6 listen address: dropped.
    DroppedNoListener,
    /// Packets to IMDS (or the listen address) arriving on a container's host-side interface
    /// with a source address that container does not own (spoofed with a raw socket): dropped
    /// by `imds_tc_source_guard` (bridge ports) or `imds_tc_routed_ingress` (routed veths).
    DroppedSpoofed,
    /// Packets to IMDS reaching a container interface (the bridge) without having passed a
    /// guarded container port (its guard not attached yet, or not a bridge port at all):
    /// dropped, since their source address is not vouched for.
    DroppedUnvalidated,
    /// Packets the host forwarded towards an IMDS address, unrewritten (from a bridge no
    /// `--container-iface` names, or built by hand): dropped by `imds_tc_forward_guard` on the
    /// interface the route to IMDS leaves by.
    DroppedForwarded,
    /// Forwarded packets on such an interface that the guard could not read (a VLAN tag,
    /// headers shorter than they claim): dropped, since they might be for IMDS.
    DroppedForwardedUnreadable,
    /// The proxy's answers leaving by a container's port for an address that port's container
    /// does not own (a neighbour claimed the address or the MAC of the container they are for):
    /// dropped by `imds_tc_reply_guard` (bridge ports) or `imds_tc_routed_egress` (routed veths).
    DroppedMisdelivered,
}

impl TcStat {
    /// Every counter, in slot order.
    pub const ALL: [TcStat; 16] = [
        TcStat::Redirected,
        TcStat::Reversed,
        TcStat::ReversedWithoutState,
        TcStat::DroppedOtherPort,
        TcStat::DroppedFragment,
        TcStat::DroppedNotTcp,
        TcStat::DroppedDirect,
        TcStat::DroppedBroken,
        TcStat::NatClosed,
        TcStat::DroppedNotLocal,
        TcStat::DroppedNoListener,
        TcStat::DroppedSpoofed,
        TcStat::DroppedUnvalidated,
        TcStat::DroppedForwarded,
        TcStat::DroppedForwardedUnreadable,
        TcStat::DroppedMisdelivered,
    ];

    /// Its name in metrics and logs.
    pub const fn name(self) -> &'static str {
        match self {
            TcStat::Redirected => "redirected",
            TcStat::Reversed => "reversed",
            TcStat::ReversedWithoutState => "reversed_without_state",
            TcStat::DroppedOtherPort => "dropped_other_port",
            TcStat::DroppedFragment => "dropped_fragment",
            TcStat::DroppedNotTcp => "dropped_not_tcp",
            TcStat::DroppedDirect => "dropped_direct",
            TcStat::DroppedBroken => "dropped_broken",
            TcStat::NatClosed => "nat_closed",
            TcStat::DroppedNotLocal => "dropped_not_local",
            TcStat::DroppedNoListener => "dropped_no_listener",
            TcStat::DroppedSpoofed => "dropped_spoofed",
            TcStat::DroppedUnvalidated => "dropped_unvalidated",
            TcStat::DroppedForwarded => "dropped_forwarded",
            TcStat::DroppedForwardedUnreadable => "dropped_forwarded_unreadable",
            TcStat::DroppedMisdelivered => "dropped_misdelivered",
        }
    }
}

/// tc mode: the addresses each container port may send to IMDS from, in `IMDS_TC_SOURCES`.
pub const MAP_TC_SOURCES: &str = "IMDS_TC_SOURCES";
pub const MAX_TC_SOURCES: u32 = 16_384;

/// tc mode: the `skb->mark` bit `imds_tc_source_guard` sets on a packet to IMDS whose source
/// address its container port owns; the bridge's program redirects only packets carrying it (and
/// clears it). A container cannot set it: the mark is cleared when a packet leaves a network
/// namespace through a veth.
pub const SOURCE_VALIDATED_MARK: u32 = 1 << 29;

/// A container port (the host-side interface of its veth, by index) and an address its container
/// owns.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SourceKey {
    pub ifindex: u32,
    /// `AF_INET` or `AF_INET6`.
    pub family: u32,
    /// Raw form; IPv4 in the first word, the rest zero.
    pub addr: RawAddr,
}

/// Slots in `IMDS_TC_STATS`.
pub const TC_STATS: u32 = TcStat::ALL.len() as u32;

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain `repr(C)` data with explicit padding; every bit pattern is valid.
    unsafe impl aya::Pod for super::RedirectConfig {}
    unsafe impl aya::Pod for super::ConnRecord {}
    unsafe impl aya::Pod for super::ConnKey {}
    unsafe impl aya::Pod for super::NatEntry {}
    unsafe impl aya::Pod for super::SourceKey {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use core::mem::{align_of, size_of};

    #[test]
    fn a_peer_address_is_the_key_sock_ops_writes() {
        let v4: core::net::SocketAddr = "172.17.0.2:40000".parse().unwrap();
        let key = ConnKey::from(v4);
        assert_eq!(key.addr, [raw_v4([172, 17, 0, 2]), 0, 0, 0]);
        assert_eq!((key.port, key.family), (40000, AF_INET as u32));
        let v6: core::net::SocketAddr = "[fd00::2]:40001".parse().unwrap();
        let key = ConnKey::from(v6);
        assert_eq!(
            v6_octets(key.addr),
            [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]
        );
        assert_eq!((key.port, key.family), (40001, AF_INET6 as u32));
    }
    use std::net::{Ipv4Addr, Ipv6Addr};

    #[test]
    fn imds_addresses_match_their_text_form() {
        assert_eq!(
            Ipv4Addr::from(IMDS_V4_OCTETS),
            "169.254.169.254".parse::<Ipv4Addr>().unwrap()
        );
        assert_eq!(
            Ipv6Addr::from(IMDS_V6_OCTETS),
            "fd00:ec2::254".parse::<Ipv6Addr>().unwrap()
        );
    }

    #[test]
    fn raw_forms_keep_network_order_in_memory() {
        // The kernel's user_ip4 holds the address bytes in network order in memory.
        assert_eq!(raw_v4(IMDS_V4_OCTETS).to_ne_bytes(), IMDS_V4_OCTETS);
        assert_eq!(v6_octets(raw_v6(IMDS_V6_OCTETS)), IMDS_V6_OCTETS);
        // user_port: network order in the low 16 bits.
        assert_eq!((raw_port(80) as u16).to_ne_bytes(), 80u16.to_be_bytes());
        assert_eq!(raw_port(0x1f90) as u16, 0x1f90u16.to_be());
    }

    #[test]
    fn v4_mapped_addresses_in_raw_form() {
        let mapped: Ipv6Addr = "::ffff:169.254.169.254".parse().unwrap();
        let raw = raw_v6(mapped.octets());
        assert!(is_v4_mapped(&raw));
        assert_eq!(raw[2], V4_MAPPED_WORD);
        assert_eq!(
            raw[3],
            raw_v4(IMDS_V4_OCTETS),
            "the last word is the IPv4 address"
        );
        assert!(!is_v4_mapped(&raw_v6(IMDS_V6_OCTETS)));
        // ::169.254.169.254 (IPv4-compatible, deprecated) is not v4-mapped.
        let compat: Ipv6Addr = "::169.254.169.254".parse().unwrap();
        assert!(!is_v4_mapped(&raw_v6(compat.octets())));
    }

    #[test]
    fn map_types_have_no_implicit_padding() {
        // Padding bytes would be uninitialised on one side and compared as keys on the other.
        assert_eq!(size_of::<ConnKey>(), 16 + 4 + 4);
        assert_eq!(size_of::<ConnRecord>(), 8 + 4 + 2 + 2 + 16);
        assert_eq!(
            size_of::<RedirectConfig>(),
            4 + 16 + 4 + 4 + 4 + 8 + 8 + 8 + 8 + 4 + 4
        );
        assert_eq!(align_of::<RedirectConfig>(), 8);
        assert_eq!(size_of::<NatEntry>(), 16 + 8 + 4 + 2 + 1 + 1);
        assert_eq!(size_of::<SourceKey>(), 4 + 4 + 16);
    }

    #[test]
    fn tc_stats_are_numbered_by_their_slot() {
        for (slot, stat) in TcStat::ALL.iter().enumerate() {
            assert_eq!(*stat as usize, slot, "{stat:?}");
        }
        let mut names: std::vec::Vec<_> = TcStat::ALL.iter().map(|s| s.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), TC_STATS as usize, "names are unique");
    }
}
