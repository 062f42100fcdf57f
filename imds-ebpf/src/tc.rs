//! Kernel programs of imds-proxy, tc mode: the packet-level drop-in for
//! `iptables -t nat -A PREROUTING -i docker0 -d 169.254.169.254 -p tcp --dport 80 -j DNAT ...`.
//!
//! Both are attached to a container interface (docker0, `br-*`):
//! - `imds_tc_ingress` sees what containers send. A TCP segment to 169.254.169.254:80 (or
//!   [fd00:ec2::254]:80) gets the proxy's listen address and port as its destination, and the
//!   connection is noted in `IMDS_NAT` under the client's (address, port). Before rewriting, it
//!   asks the FIB whether the host would keep a packet to the listen address; if the host would
//!   forward it (the listen address is gone from the host), the packet is dropped, not sent out.
//! - `imds_tc_egress` sees what the host sends to containers. A segment from the proxy's listen
//!   address and port gets the original destination back as its source, so the client sees the
//!   address it connected to.
//!
//! - `imds_tc_source_guard` sits on each container's own port of the bridge (the host side of its
//!   veth), where the port a packet came in on is still known. A packet to IMDS (or the listen
//!   address) whose source address is not one the port's container owns (`IMDS_TC_SOURCES`, filled
//!   from Docker) is dropped: a container with NET_RAW could otherwise send with a neighbour's
//!   address and be served the neighbour's role. One that passes gets
//!   [`SOURCE_VALIDATED_MARK`]; `imds_tc_ingress` redirects only packets that carry it, so a port
//!   the guard is not attached to yet fails closed.
//! - On a routed container veth (a pod's own veth with host routes and no bridge: EKS's VPC CNI,
//!   Calico, CNI `ptp`) there is no port apart from the interface: `imds_tc_routed_ingress` checks
//!   the source against the veth's own book entries and redirects in one program, and
//!   `imds_tc_routed_egress` applies the reply guard and the reverse rewrite.
//!
//! Checksums are updated incrementally by the kernel's helpers, which handle both a full checksum
//! and CHECKSUM_PARTIAL (where only the pseudo-header part is in the field). IPv4 headers of any
//! length (options included) are rewritten. What cannot be rewritten is dropped and counted in
//! `IMDS_TC_STATS`, never passed: to or from the redirect addresses, fragments, IPv6 with
//! extension headers, non-TCP packets, TCP to another port of IMDS, malformed headers. A container
//! can set IP options or send fragments as it likes; none of it reaches the real IMDS. Everything
//! else on the interface is not looked at beyond its addresses.
use aya_ebpf::{
    bindings::{
        BPF_F_PSEUDO_HDR, BPF_FIB_LKUP_RET_FWD_DISABLED, BPF_FIB_LKUP_RET_NOT_FWDED, TC_ACT_OK,
        TC_ACT_SHOT, bpf_fib_lookup as FibLookup,
    },
    helpers::{
        bpf_ktime_get_ns,
        generated::{bpf_csum_diff, bpf_fib_lookup, bpf_skb_load_bytes_relative},
    },
    macros::{classifier, map},
    maps::{HashMap, LruHashMap, PerCpuArray},
    programs::TcContext,
};
use imds_common::{
    AF_INET, AF_INET6, ConnKey, FIN_FROM_CLIENT, FIN_FROM_PROXY, IMDS_PORT, IMDS_V4_OCTETS,
    IMDS_V6_OCTETS, MAX_NAT, MAX_TC_SOURCES, NatEntry, RawAddr, RedirectConfig,
    SOURCE_VALIDATED_MARK, SourceKey, TC_STATS, TcStat, raw_v4, raw_v6,
};

use crate::cgroup::config;

/// Connections redirected by `imds_tc_ingress`, by the client's address and port.
#[map(name = "IMDS_NAT")]
static NAT: LruHashMap<ConnKey, NatEntry> = LruHashMap::with_max_entries(MAX_NAT, 0);

/// The addresses each container port may send to IMDS from; filled by userspace from Docker.
#[map(name = "IMDS_TC_SOURCES")]
static SOURCES: HashMap<SourceKey, u8> = HashMap::with_max_entries(MAX_TC_SOURCES, 0);

/// One counter per [`TcStat`], per CPU; userspace sums them.
#[map(name = "IMDS_TC_STATS")]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(TC_STATS, 0);

const IMDS_V4: u32 = raw_v4(IMDS_V4_OCTETS);
const IMDS_V6: RawAddr = raw_v6(IMDS_V6_OCTETS);
/// The IMDS port as it sits in a TCP header (network order).
const IMDS_PORT_BE: u16 = IMDS_PORT.to_be();

const PASS: i32 = TC_ACT_OK;
const DROP: i32 = TC_ACT_SHOT;

// Offsets, from the start of the Ethernet frame.
const ETH_HLEN: usize = 14;
const ETH_PROTO: usize = 12;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IP4_VER_IHL: usize = ETH_HLEN;
const IP4_FRAG: usize = ETH_HLEN + 6;
const IP4_PROTO: usize = ETH_HLEN + 9;
const IP4_CSUM: usize = ETH_HLEN + 10;
const IP4_SRC: usize = ETH_HLEN + 12;
const IP4_DST: usize = ETH_HLEN + 16;
/// The shortest IPv4 header (IHL 5), in 32-bit words; options make it up to 15.
const IP4_MIN_IHL: u8 = 5;
const IP6_VER: usize = ETH_HLEN;
const IP6_NEXT: usize = ETH_HLEN + 6;
const IP6_SRC: usize = ETH_HLEN + 8;
const IP6_DST: usize = ETH_HLEN + 24;
/// The TCP header of an IPv6 packet without extension headers.
const TCP6: usize = ETH_HLEN + 40;
const IPPROTO_TCP: u8 = 6;
// Offsets inside the TCP header.
const TCP_SPORT: usize = 0;
const TCP_DPORT: usize = 2;
const TCP_FLAGS: usize = 13;
const TCP_CSUM: usize = 16;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
/// The IPv4 "more fragments" flag and fragment offset bits.
const IP4_FRAGMENTED: u16 = 0x3fff;

#[inline(always)]
fn count(stat: TcStat) {
    if let Some(slot) = STATS.get_ptr_mut(stat as u32) {
        // Per-CPU slot: no other writer while this program runs on this CPU.
        unsafe { *slot += 1 };
    }
}

/// Which way a packet crosses the container interface.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Way {
    /// From a container: maybe a request to IMDS, whose source was checked as [`Vouch`] says.
    Ingress(Vouch),
    /// To a container: maybe the proxy's answer.
    Egress,
}

/// Where a request's source address is checked against the container's own addresses
/// (`IMDS_TC_SOURCES`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Vouch {
    /// On a bridge: by the guard on the container's own port, which marked the packet
    /// ([`SOURCE_VALIDATED_MARK`]); what is not marked is dropped.
    ByPortMark,
    /// On a routed veth (the container's own interface, no bridge): by this program, against the
    /// interface it runs on.
    Here,
}

/// What a packet is to the programs.
enum Parsed {
    /// Neither to nor from the redirect addresses: not looked at further.
    NotOurs,
    /// To or from the redirect addresses, but not something they can rewrite: dropped, counted.
    Drop(TcStat),
    /// A TCP segment to rewrite.
    Segment(Segment),
}

/// The TCP segment the programs act on: an IPv4 header (any length) or a plain IPv6 header,
/// followed by TCP.
struct Segment {
    family: u16,
    src: RawAddr,
    dst: RawAddr,
    /// Offset of the TCP header.
    tcp: usize,
    /// Ports as in the header (network order).
    sport: u16,
    dport: u16,
    flags: u8,
}

#[classifier]
pub fn imds_tc_ingress(ctx: TcContext) -> i32 {
    handle(&ctx, Way::Ingress(Vouch::ByPortMark))
}

#[classifier]
pub fn imds_tc_egress(ctx: TcContext) -> i32 {
    handle(&ctx, Way::Egress)
}

/// On a routed container veth (the host side of a pod's own veth, no bridge: EKS's VPC CNI,
/// Calico, CNI `ptp`), ingress: the source guard and the redirect in one program, so no order of
/// links and no moment between two attachments decides anything. A request to the redirect
/// addresses is redirected only when its source is an address of the container behind this
/// veth; anything else to them is dropped and counted.
#[classifier]
pub fn imds_tc_routed_ingress(ctx: TcContext) -> i32 {
    handle(&ctx, Way::Ingress(Vouch::Here))
}

/// On a routed container veth, egress: the reply guard, then the reverse rewrite. An answer of
/// the proxy (from its listen address, or IMDS's) goes only to an address of the container
/// behind this veth.
#[classifier]
pub fn imds_tc_routed_egress(ctx: TcContext) -> i32 {
    if reply_guard(&ctx) == DROP {
        return DROP;
    }
    handle(&ctx, Way::Egress)
}

/// A frame's IP family and addresses, as a container port sees it: `None` for what is not IP
/// (ARP and the rest: not addressed to IMDS, no answer of the proxy) or too short to hold the
/// addresses (the IP stack drops it; the bridge program too).
#[inline(always)]
fn port_addresses(ctx: &TcContext) -> Option<(u16, RawAddr, RawAddr)> {
    let proto = ctx.load::<u16>(ETH_PROTO).ok()?;
    match u16::from_be(proto) {
        ETH_P_IP => match (ctx.load::<u32>(IP4_SRC), ctx.load::<u32>(IP4_DST)) {
            (Ok(src), Ok(dst)) => Some((AF_INET, [src, 0, 0, 0], [dst, 0, 0, 0])),
            _ => None,
        },
        ETH_P_IPV6 => match (ctx.load::<RawAddr>(IP6_SRC), ctx.load::<RawAddr>(IP6_DST)) {
            (Ok(src), Ok(dst)) => Some((AF_INET6, src, dst)),
            _ => None,
        },
        _ => None,
    }
}

/// Whether `addr` is the IMDS address of its family.
#[inline(always)]
fn is_imds(family: u16, addr: &RawAddr) -> bool {
    if family == AF_INET {
        addr[0] == IMDS_V4
    } else {
        *addr == IMDS_V6
    }
}

/// Whether `addr` is vouched for as an address of the container behind this port (the interface
/// the program runs on), in `IMDS_TC_SOURCES`.
#[inline(always)]
fn owned_here(ctx: &TcContext, family: u16, addr: RawAddr) -> bool {
    let key = SourceKey {
        ifindex: unsafe { (*ctx.skb.skb).ifindex },
        family: family as u32,
        addr,
    };
    unsafe { SOURCES.get(key) }.is_some()
}

/// On a container's port (ingress: what the container sends): packets to the redirect addresses
/// must come from an address of this port's container.
#[classifier]
pub fn imds_tc_source_guard(ctx: TcContext) -> i32 {
    let config = config();
    let Some((family, src, dst)) = port_addresses(&ctx) else {
        return PASS;
    };
    if !ours(config, Way::Ingress(Vouch::ByPortMark), family, &src, &dst) {
        // Not to the redirect addresses: not this program's business.
        return PASS;
    }
    if !owned_here(&ctx, family, src) {
        // Not an address of this port's container (spoofed), or the container is not known yet:
        // its IMDS traffic waits until it is (SYNs are retried).
        count(TcStat::DroppedSpoofed);
        return DROP;
    }
    let mark = unsafe { (*ctx.skb.skb).mark };
    ctx.set_mark(mark | SOURCE_VALIDATED_MARK);
    PASS
}

/// On each container's port (egress: what the host sends to that container): an answer of the
/// proxy — from its listen address, or from IMDS once tc mode has rewritten it back — goes only
/// to an address this port's container owns (`IMDS_TC_SOURCES`, the same book the source guard
/// reads). A neighbour that claimed the victim's address (unsolicited ARP replies or neighbour
/// advertisements: the host then resolves the victim's address to the neighbour's MAC) or the
/// victim's MAC (the bridge then switches the victim's frames to its port) gets the victim's
/// answers on its own port: they are dropped here, never delivered.
#[classifier]
pub fn imds_tc_reply_guard(ctx: TcContext) -> i32 {
    reply_guard(&ctx)
}

/// [`imds_tc_reply_guard`]'s decision: `PASS` or `DROP`.
#[inline(always)]
fn reply_guard(ctx: &TcContext) -> i32 {
    let config = config();
    let Some((family, src, dst)) = port_addresses(ctx) else {
        return PASS;
    };
    if !is_imds(family, &src) && !is_proxy(config, family, &src) {
        return PASS;
    }
    if !owned_here(ctx, family, dst) {
        count(TcStat::DroppedMisdelivered);
        return DROP;
    }
    PASS
}

/// No verdict (`TC_ACT_UNSPEC`, TCX's "next"): the next program on the hook, or the default,
/// decides. The forward guard shares the host's uplinks with whatever else runs there.
const NEXT: i32 = -1;
/// `bpf_skb_load_bytes_relative`: offsets from the network header, whatever the link layer.
const BPF_HDR_START_NET: u32 = 1;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
/// The destination address's offset in an IPv4 and an IPv6 header.
const NET_IP4_DST: u32 = 16;
const NET_IP6_DST: u32 = 24;

/// The forward-path backstop, on the egress of each interface a route to IMDS leaves by (the
/// host's uplinks, in every routing table): a packet the host **forwarded** (it arrived on an
/// interface: `ingress_ifindex` is set) that still goes to an IMDS address was rewritten by no
/// program. It came from a bridge no `--container-iface` names, or was built by hand
/// (`AF_PACKET`) where no socket hook sees it: dropped and counted. The host's own packets
/// (`ingress_ifindex` 0: the proxy's, host services', host-network containers', which the cgroup
/// programs decide) and everything not addressed to IMDS are left to the next program. A
/// forwarded frame it cannot read (a VLAN tag on a routed uplink, headers shorter than they
/// claim) is dropped: it cannot tell that it is not for IMDS.
#[classifier]
pub fn imds_tc_forward_guard(ctx: TcContext) -> i32 {
    // SAFETY: the kernel hands a valid __sk_buff to this program type; both fields are readable.
    let (ingress, protocol) = unsafe { ((*ctx.skb.skb).ingress_ifindex, (*ctx.skb.skb).protocol) };
    if ingress == 0 {
        return NEXT;
    }
    let to_imds = match u16::from_be(protocol as u16) {
        ETH_P_IP => load_net::<u32>(&ctx, NET_IP4_DST).map(|dst| dst == IMDS_V4),
        ETH_P_IPV6 => load_net::<RawAddr>(&ctx, NET_IP6_DST).map(|dst| dst == IMDS_V6),
        ETH_P_8021Q | ETH_P_8021AD => Err(()),
        // ARP and the rest: not IP, nothing IMDS answers.
        _ => Ok(false),
    };
    match to_imds {
        Ok(false) => NEXT,
        Ok(true) => {
            count(TcStat::DroppedForwarded);
            DROP
        }
        Err(()) => {
            count(TcStat::DroppedForwardedUnreadable);
            DROP
        }
    }
}

/// `size_of::<T>()` bytes at `offset` from the network header.
#[inline(always)]
fn load_net<T: Copy>(ctx: &TcContext, offset: u32) -> Result<T, ()> {
    let mut value = core::mem::MaybeUninit::<T>::uninit();
    // SAFETY: a stack buffer of the size given; the helper fills it or fails.
    let rc = unsafe {
        bpf_skb_load_bytes_relative(
            ctx.skb.skb as *const _,
            offset,
            value.as_mut_ptr() as *mut _,
            core::mem::size_of::<T>() as u32,
            BPF_HDR_START_NET,
        )
    };
    if rc != 0 {
        return Err(());
    }
    // SAFETY: filled by the helper.
    Ok(unsafe { value.assume_init() })
}

#[inline(always)]
fn handle(ctx: &TcContext, way: Way) -> i32 {
    match try_handle(ctx, way) {
        Ok(verdict) => verdict,
        // A packet to or from the redirect addresses whose TCP header could not be read (shorter
        // than its headers claim), or a rewrite helper failed (the rewrite may be half done).
        // Either way, do not let it through as is.
        Err(()) => {
            count(TcStat::DroppedBroken);
            DROP
        }
    }
}

#[inline(always)]
fn try_handle(ctx: &TcContext, way: Way) -> Result<i32, ()> {
    let config = config();
    let Ok(proto) = ctx.load::<u16>(ETH_PROTO) else {
        return Ok(PASS);
    };
    let proto = u16::from_be(proto);
    let parsed = match proto {
        ETH_P_IP => parse_v4(ctx, way, config)?,
        ETH_P_IPV6 => parse_v6(ctx, way, config)?,
        // ARP and the rest: nothing of ours.
        _ => return Ok(PASS),
    };
    let segment = match parsed {
        Parsed::NotOurs => return Ok(PASS),
        // To or from the redirect addresses and not rewritable: never passed on.
        Parsed::Drop(stat) => {
            count(stat);
            return Ok(DROP);
        }
        Parsed::Segment(segment) => segment,
    };
    let Some(config) = config else {
        // Attached but not configured (the proxy is starting or was never configured): a client's
        // IMDS packet must not reach the real IMDS. Fail closed. (Egress has nothing to do yet.)
        return Ok(if way == Way::Egress { PASS } else { DROP });
    };
    match way {
        Way::Ingress(vouch) => redirect(ctx, config, &segment, vouch),
        Way::Egress => reverse(ctx, config, &segment),
    }
}

/// Whether an address is the proxy's listen address of its family.
#[inline(always)]
fn is_proxy(config: Option<&RedirectConfig>, family: u16, addr: &RawAddr) -> bool {
    match config {
        Some(c) if family == AF_INET => addr[0] == c.proxy_v4,
        // An all-zero proxy_v6 (no IPv6 listener) never matches a real packet's address.
        Some(c) => *addr == c.proxy_v6 && c.proxy_v6 != [0; 4],
        None => false,
    }
}

/// Whether a packet is one of ours: to IMDS or the listen address (ingress), or from the listen
/// address (egress). Decided on the addresses alone, before anything else is parsed.
#[inline(always)]
fn ours(
    config: Option<&RedirectConfig>,
    way: Way,
    family: u16,
    src: &RawAddr,
    dst: &RawAddr,
) -> bool {
    match way {
        Way::Ingress(_) => is_imds(family, dst) || is_proxy(config, family, dst),
        Way::Egress => is_proxy(config, family, src),
    }
}

#[inline(always)]
fn parse_v4(ctx: &TcContext, way: Way, config: Option<&RedirectConfig>) -> Result<Parsed, ()> {
    // Too short to hold the addresses: not ours to judge (the IP stack drops it).
    let (Ok(src), Ok(dst)) = (ctx.load::<u32>(IP4_SRC), ctx.load::<u32>(IP4_DST)) else {
        return Ok(Parsed::NotOurs);
    };
    let (src, dst) = ([src, 0, 0, 0], [dst, 0, 0, 0]);
    if !ours(config, way, AF_INET, &src, &dst) {
        return Ok(Parsed::NotOurs);
    }
    let ver_ihl = ctx.load::<u8>(IP4_VER_IHL).map_err(|_| ())?;
    let ihl = ver_ihl & 0x0f;
    if ver_ihl >> 4 != 4 || ihl < IP4_MIN_IHL {
        // Not a well-formed IPv4 header: nothing to rewrite.
        return Ok(Parsed::Drop(TcStat::DroppedBroken));
    }
    // A fragment: only the first has the TCP header, and the checksum covers them all.
    if u16::from_be(ctx.load::<u16>(IP4_FRAG).map_err(|_| ())?) & IP4_FRAGMENTED != 0 {
        return Ok(Parsed::Drop(TcStat::DroppedFragment));
    }
    if ctx.load::<u8>(IP4_PROTO).map_err(|_| ())? != IPPROTO_TCP {
        return Ok(Parsed::Drop(TcStat::DroppedNotTcp));
    }
    // IP options (IHL above 5) only move the TCP header: 5 to 15 words after the IP header's
    // start. The rewrite touches the addresses, ports and checksums, never the options.
    let tcp = ETH_HLEN + ihl as usize * 4;
    segment(ctx, AF_INET, src, dst, tcp).map(Parsed::Segment)
}

#[inline(always)]
fn parse_v6(ctx: &TcContext, way: Way, config: Option<&RedirectConfig>) -> Result<Parsed, ()> {
    let (Ok(src), Ok(dst)) = (ctx.load::<RawAddr>(IP6_SRC), ctx.load::<RawAddr>(IP6_DST)) else {
        return Ok(Parsed::NotOurs);
    };
    if !ours(config, way, AF_INET6, &src, &dst) {
        return Ok(Parsed::NotOurs);
    }
    if ctx.load::<u8>(IP6_VER).map_err(|_| ())? >> 4 != 6 {
        return Ok(Parsed::Drop(TcStat::DroppedBroken));
    }
    // Extension headers (fragments among them) or not TCP at all: not rewritten, dropped.
    if ctx.load::<u8>(IP6_NEXT).map_err(|_| ())? != IPPROTO_TCP {
        return Ok(Parsed::Drop(TcStat::DroppedNotTcp));
    }
    segment(ctx, AF_INET6, src, dst, TCP6).map(Parsed::Segment)
}

#[inline(always)]
fn segment(
    ctx: &TcContext,
    family: u16,
    src: RawAddr,
    dst: RawAddr,
    tcp: usize,
) -> Result<Segment, ()> {
    Ok(Segment {
        family,
        src,
        dst,
        tcp,
        sport: ctx.load::<u16>(tcp + TCP_SPORT).map_err(|_| ())?,
        dport: ctx.load::<u16>(tcp + TCP_DPORT).map_err(|_| ())?,
        flags: ctx.load::<u8>(tcp + TCP_FLAGS).map_err(|_| ())?,
    })
}

/// Ingress: a client's segment to IMDS goes to the proxy.
#[inline(always)]
fn redirect(
    ctx: &TcContext,
    config: &RedirectConfig,
    s: &Segment,
    vouch: Vouch,
) -> Result<i32, ()> {
    // Only what comes from the container's own address: vouched for by its port, or checked here
    // on its own veth.
    match vouch {
        Vouch::ByPortMark => {
            let mark = unsafe { (*ctx.skb.skb).mark };
            if mark & SOURCE_VALIDATED_MARK == 0 {
                count(TcStat::DroppedUnvalidated);
                return Ok(DROP);
            }
            ctx.set_mark(mark & !SOURCE_VALIDATED_MARK);
        }
        Vouch::Here => {
            if !owned_here(ctx, s.family, s.src) {
                // Not an address of this veth's container (spoofed), or the container is not
                // known yet: dropped (a SYN is retried).
                count(TcStat::DroppedSpoofed);
                return Ok(DROP);
            }
        }
    }
    if is_proxy(Some(config), s.family, &s.dst) {
        // Addressed to the listen address directly. It is reserved for redirected traffic: a
        // direct connection could collide with a redirected one from the same client port.
        count(TcStat::DroppedDirect);
        return Ok(DROP);
    }
    if s.dport != IMDS_PORT_BE {
        // Another port of the IMDS address: nothing the proxy serves, and it must not reach
        // the real IMDS.
        count(TcStat::DroppedOtherPort);
        return Ok(DROP);
    }
    let (proxy, proxy_port) = if s.family == AF_INET {
        ([config.proxy_v4, 0, 0, 0], config.proxy_port_v4 as u16)
    } else {
        (config.proxy_v6, config.proxy_port_v6 as u16)
    };
    if s.family == AF_INET6 && proxy == [0; 4] {
        // No IPv6 listener: nowhere to send it, and it must not reach IMDS.
        count(TcStat::DroppedNoListener);
        return Ok(DROP);
    }
    if !stays_on_host(ctx, s, &proxy, proxy_port) {
        // Rewritten, this packet would be forwarded: the listen address is not on this host
        // (its interface was deleted while pinned programs stayed attached). Neither the proxy
        // nor IMDS can answer it; it must not leave the host.
        count(TcStat::DroppedNotLocal);
        return Ok(DROP);
    }
    rewrite_addr(ctx, s, IP4_DST, IP6_DST, &s.dst, &proxy)?;
    rewrite_port(ctx, s, TCP_DPORT, s.dport, proxy_port)?;
    let key = client_key(s.family, &s.src, s.sport);
    let now = unsafe { bpf_ktime_get_ns() };
    if s.flags & TCP_SYN != 0 && s.flags & TCP_ACK == 0 {
        // A new connection (or a retransmitted SYN): (re)start its entry.
        let entry = NatEntry {
            orig_addr: s.dst,
            last_seen_ns: now,
            ifindex: unsafe { (*ctx.skb.skb).ifindex },
            orig_port: s.dport,
            fin: 0,
            _pad: 0,
        };
        // Full (LRU) cannot fail; an error here would only cost the egress side its state.
        let _ = NAT.insert(key, entry, 0);
    } else {
        track(&key, s.flags, FIN_FROM_CLIENT, now);
    }
    count(TcStat::Redirected);
    Ok(PASS)
}

/// Whether the host keeps a packet once its destination is the listen address: the routing
/// decision the IP stack takes after this program, asked of the kernel's FIB for the interface the
/// packet arrived on. A local route answers "not forwarded"; so does no route at all (the stack
/// drops it). A host that does not forward from this interface keeps it too. Anything else
/// (a route via a gateway or a device, with or without a neighbour yet; an error) means the packet
/// would leave.
#[inline(always)]
fn stays_on_host(ctx: &TcContext, s: &Segment, proxy: &RawAddr, proxy_port: u16) -> bool {
    // SAFETY: a plain C struct of integers and unions of integers; all zeroes is a valid value.
    let mut fib: FibLookup = unsafe { core::mem::zeroed() };
    fib.family = s.family as u8;
    fib.l4_protocol = IPPROTO_TCP;
    fib.sport = s.sport;
    fib.dport = proxy_port;
    fib.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    if s.family == AF_INET {
        fib.__bindgen_anon_3.ipv4_src = s.src[0];
        fib.__bindgen_anon_4.ipv4_dst = proxy[0];
    } else {
        fib.__bindgen_anon_3.ipv6_src = s.src;
        fib.__bindgen_anon_4.ipv6_dst = *proxy;
    }
    // tot_len 0: no MTU check. Flags 0: an input lookup, as the stack's, on every kernel that has
    // the helper.
    let verdict = unsafe {
        bpf_fib_lookup(
            ctx.skb.skb.cast(),
            &mut fib,
            core::mem::size_of::<FibLookup>() as i32,
            0,
        )
    };
    verdict == i64::from(BPF_FIB_LKUP_RET_NOT_FWDED)
        || verdict == i64::from(BPF_FIB_LKUP_RET_FWD_DISABLED)
}

/// Egress: the proxy's segment to a client comes from where the client connected.
#[inline(always)]
fn reverse(ctx: &TcContext, config: &RedirectConfig, s: &Segment) -> Result<i32, ()> {
    let proxy_port = if s.family == AF_INET {
        config.proxy_port_v4 as u16
    } else {
        config.proxy_port_v6 as u16
    };
    if s.sport != proxy_port {
        return Ok(PASS);
    }
    let key = client_key(s.family, &s.dst, s.dport);
    let (orig, orig_port) = match unsafe { NAT.get(key) } {
        Some(entry) => (entry.orig_addr, entry.orig_port),
        None => {
            // Evicted or already reaped (the last ACK after both FINs): the listen address serves
            // redirected connections only, so the original destination can only be IMDS.
            count(TcStat::ReversedWithoutState);
            if s.family == AF_INET {
                ([IMDS_V4, 0, 0, 0], IMDS_PORT_BE)
            } else {
                (IMDS_V6, IMDS_PORT_BE)
            }
        }
    };
    rewrite_addr(ctx, s, IP4_SRC, IP6_SRC, &s.src, &orig)?;
    rewrite_port(ctx, s, TCP_SPORT, s.sport, orig_port)?;
    track(&key, s.flags, FIN_FROM_PROXY, unsafe { bpf_ktime_get_ns() });
    count(TcStat::Reversed);
    Ok(PASS)
}

/// The NAT key of a client: its address and port (host order), as the proxy sees its peer.
#[inline(always)]
fn client_key(family: u16, addr: &RawAddr, port_be: u16) -> ConnKey {
    ConnKey {
        addr: *addr,
        port: u16::from_be(port_be) as u32,
        family: family as u32,
    }
}

/// Keep a connection's entry up to date: RST ends it; after both FINs, the next segment without
/// FIN (the last ACK) ends it; anything else refreshes its age.
#[inline(always)]
fn track(key: &ConnKey, flags: u8, fin_bit: u8, now: u64) {
    if flags & TCP_RST != 0 {
        if NAT.remove(key).is_ok() {
            count(TcStat::NatClosed);
        }
        return;
    }
    let Some(entry) = NAT.get_ptr_mut(key) else {
        return;
    };
    // SAFETY: a pointer into the map's value; concurrent updates of these plain fields can at
    // worst lose an age refresh or a FIN bit, which the age reaping covers.
    let entry = unsafe { &mut *entry };
    if flags & TCP_FIN != 0 {
        entry.fin |= fin_bit;
    } else if entry.fin == FIN_FROM_CLIENT | FIN_FROM_PROXY {
        if NAT.remove(key).is_ok() {
            count(TcStat::NatClosed);
        }
        return;
    }
    entry.last_seen_ns = now;
}

/// Replace an address (source or destination) and fix the checksums that cover it: IPv4's header
/// checksum, and TCP's through the pseudo-header (both families).
#[inline(always)]
fn rewrite_addr(
    ctx: &TcContext,
    s: &Segment,
    off4: usize,
    off6: usize,
    from: &RawAddr,
    to: &RawAddr,
) -> Result<(), ()> {
    let tcp_csum = s.tcp + TCP_CSUM;
    if s.family == AF_INET {
        ctx.l3_csum_replace(IP4_CSUM, from[0] as u64, to[0] as u64, 4)
            .map_err(|_| ())?;
        ctx.l4_csum_replace(
            tcp_csum,
            from[0] as u64,
            to[0] as u64,
            BPF_F_PSEUDO_HDR as u64 | 4,
        )
        .map_err(|_| ())?;
        ctx.store(off4, &to[0], 0).map_err(|_| ())?;
    } else {
        // 16 bytes: the helper takes the checksum difference, computed over both addresses.
        let mut from = *from;
        let mut to = *to;
        let diff = unsafe { bpf_csum_diff(from.as_mut_ptr(), 16, to.as_mut_ptr(), 16, 0) };
        if diff < 0 {
            return Err(());
        }
        // Size 0 in the flags: `to` is a precomputed difference.
        ctx.l4_csum_replace(tcp_csum, 0, diff as u64, BPF_F_PSEUDO_HDR as u64)
            .map_err(|_| ())?;
        ctx.store(off6, &to, 0).map_err(|_| ())?;
    }
    Ok(())
}

/// Replace a TCP port and fix the TCP checksum (a plain field, not in the pseudo-header).
#[inline(always)]
fn rewrite_port(ctx: &TcContext, s: &Segment, field: usize, from: u16, to: u16) -> Result<(), ()> {
    ctx.l4_csum_replace(s.tcp + TCP_CSUM, from as u64, to as u64, 2)
        .map_err(|_| ())?;
    ctx.store(s.tcp + field, &to, 0).map_err(|_| ())
}
