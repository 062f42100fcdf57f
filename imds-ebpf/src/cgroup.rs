//! cgroup mode's programs (also attached in tc mode, for host-network containers): see the crate
//! documentation in `main.rs` for what each does and why.

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE, bpf_pidns_info, bpf_sock_addr,
    },
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid,
        generated::{
            bpf_get_netns_cookie, bpf_get_ns_current_pid_tgid, bpf_get_socket_cookie,
            bpf_skb_cgroup_id,
        },
    },
    macros::{cgroup_skb, cgroup_sock_addr, map, sock_ops},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::{SkBuffContext, SockAddrContext, SockOpsContext},
};
use aya_log_ebpf::warn;
use core::ptr::read_volatile;
use imds_common::{
    AF_INET, AF_INET6, CGROUP_HOST, ConnKey, ConnRecord, GUARD_STATS, GuardStat, IMDS_PORT,
    IMDS_V4_OCTETS, IMDS_V6_OCTETS, MAX_CONNS, MAX_FILTER_CGROUPS, RawAddr, RedirectConfig,
    V4_MAPPED_WORD, is_v4_mapped, raw_port, raw_v4, raw_v6,
};

/// Verdicts of cgroup/sock_addr programs.
const ALLOW: i32 = 1;
const REFUSE: i32 = 0; // the syscall fails with EPERM
/// `SOCK_STREAM`: only TCP is redirected.
const SOCK_STREAM: u32 = 1;

const IMDS_V4: u32 = raw_v4(IMDS_V4_OCTETS);
const IMDS_V6: RawAddr = raw_v6(IMDS_V6_OCTETS);
/// ::ffff:169.254.169.254, the IPv4 IMDS address as an AF_INET6 socket names it.
const IMDS_V4_MAPPED: RawAddr = [0, 0, V4_MAPPED_WORD, IMDS_V4];

#[map(name = "IMDS_CONFIG")]
pub(crate) static CONFIG: Array<RedirectConfig> = Array::with_max_entries(1, 0);

/// Records of redirected sockets not yet established, by socket cookie.
#[map(name = "IMDS_PENDING")]
static PENDING: LruHashMap<u64, ConnRecord> = LruHashMap::with_max_entries(MAX_CONNS, 0);

/// Records of established redirected connections, by the client's address and port.
#[map(name = "IMDS_CONNS")]
static CONNS: LruHashMap<ConnKey, ConnRecord> = LruHashMap::with_max_entries(MAX_CONNS, 0);

/// In filter mode, what each cgroup under the attach point is: container or host.
#[map(name = "IMDS_CGROUPS")]
static FILTER_CGROUPS: HashMap<u64, u8> = HashMap::with_max_entries(MAX_FILTER_CGROUPS, 0);

/// What the egress guard dropped, one counter per [`GuardStat`], per CPU.
#[map(name = "IMDS_GUARD_STATS")]
static GUARD: PerCpuArray<u64> = PerCpuArray::with_max_entries(GUARD_STATS, 0);

/// The configuration, if userspace has written one.
pub(crate) fn config() -> Option<&'static RedirectConfig> {
    match CONFIG.get(0) {
        // A zero port means the slot was never written: not configured.
        Some(config) if config.proxy_port_v4 != 0 => Some(config),
        _ => None,
    }
}

/// What to do with a connect to the IMDS address from the current task. Both families.
enum Decision {
    Redirect,
    Pass,
}

/// What to do with IMDS traffic of the sockets of `cgroup`.
#[inline(always)]
fn decide(config: &RedirectConfig, cgroup: u64) -> Decision {
    if cgroup == config.proxy_cgroup {
        // The proxy itself, fetching the instance's credentials from the real IMDS.
        return Decision::Pass;
    }
    if config.filter == 0 {
        // Everything under the attach point is a container.
        return Decision::Redirect;
    }
    match unsafe { FILTER_CGROUPS.get(cgroup) } {
        // Filter mode, a host service under the same parent.
        Some(&CGROUP_HOST) => Decision::Pass,
        // Filter mode: a container's cgroup, or one userspace has not classified yet (created
        // a moment ago; it might be a container's). To the proxy, which decides once it knows
        // and gives a cgroup that is no container's no role.
        _ => Decision::Redirect,
    }
}

/// Whether the current task is in the host's PID namespace (always, when the configuration
/// names none). A task anywhere else is in a container, whatever its cgroup is called: a host
/// cgroup's pass is for the host's own processes only.
#[inline(always)]
fn in_host_pidns(config: &RedirectConfig) -> bool {
    if config.host_pidns_ino == 0 {
        return true;
    }
    let mut info = bpf_pidns_info { pid: 0, tgid: 0 };
    // SAFETY: a stack buffer of the size given; the helper fails (non-zero) when the current
    // task's PID namespace is not the one named.
    let rc = unsafe {
        bpf_get_ns_current_pid_tgid(
            config.host_pidns_dev,
            config.host_pidns_ino,
            &mut info,
            core::mem::size_of::<bpf_pidns_info>() as u32,
        )
    };
    rc == 0
}

/// For a connect to the IMDS address, either family: the configuration to redirect it with,
/// or the verdict to return instead. Inlined: as a bpf-to-bpf call returning through the
/// stack, the verifier loses the verdict's range ("R0 ... should have been in [0, 1]").
/// `PIDNS`: whether the host-PID-namespace wall is built in (it needs
/// `bpf_get_ns_current_pid_tgid` in this program type, Linux 6.10+; the `_compat` programs go
/// without it on older kernels).
#[inline(always)]
fn gate<const PIDNS: bool>(ctx: &SockAddrContext) -> Result<&'static RedirectConfig, i32> {
    let Some(config) = config() else {
        // Attached but not configured: fail closed rather than let the container reach IMDS.
        warn!(ctx, "IMDS connect refused: redirect not configured");
        return Err(REFUSE);
    };
    if config.netns_cookie != 0
        && unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) } != config.netns_cookie
    {
        // tc mode: a socket outside the host's network namespace (a bridged container). Its
        // packets cross a container interface, where the tc programs rewrite them.
        return Err(ALLOW);
    }
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    match decide(config, cgroup) {
        Decision::Redirect => redirect_or_refuse(config),
        // A host service's cgroup, but a task in a PID namespace of its own: a container's.
        Decision::Pass if PIDNS && cgroup != config.proxy_cgroup && !in_host_pidns(config) => {
            redirect_or_refuse(config)
        }
        // The proxy itself, or a host service in filter mode: the connect goes through as is.
        Decision::Pass => Err(ALLOW),
    }
}

/// A connect that goes to the proxy: redirected, or refused while only `imds-proxy gate` is
/// attached (no proxy listens yet; the caller's SDK retries and finds it once it runs).
#[inline(always)]
fn redirect_or_refuse(config: &'static RedirectConfig) -> Result<&'static RedirectConfig, i32> {
    if config.gate != 0 {
        return Err(REFUSE);
    }
    Ok(config)
}

fn record(family: u16, orig_addr: RawAddr) -> ConnRecord {
    ConnRecord {
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        // The upper half of pid_tgid is the tgid.
        tgid: (bpf_get_current_pid_tgid() >> 32) as u32,
        family,
        orig_port: IMDS_PORT,
        orig_addr,
    }
}

fn cookie(sa: *mut bpf_sock_addr) -> u64 {
    unsafe { bpf_get_socket_cookie(sa as *mut _) }
}

/// Record who is connecting, under the socket's cookie, before its destination is rewritten.
/// `false` when the record cannot be stored: no record, no identity, so the connect must be
/// refused (the proxy would refuse the connection anyway; this says so where it happens).
#[inline(always)]
fn pend(ctx: &SockAddrContext, sa: *mut bpf_sock_addr, family: u16, orig: RawAddr) -> bool {
    if PENDING.insert(cookie(sa), record(family, orig), 0).is_err() {
        warn!(ctx, "IMDS connect refused: cannot record it (IMDS_PENDING)");
        return false;
    }
    true
}

#[cgroup_sock_addr(connect4)]
pub fn imds_connect4(ctx: SockAddrContext) -> i32 {
    connect4::<true>(ctx)
}

/// [`imds_connect4`] without the PID-namespace wall, for kernels before 6.10.
#[cgroup_sock_addr(connect4)]
pub fn imds_connect4_compat(ctx: SockAddrContext) -> i32 {
    connect4::<false>(ctx)
}

#[cgroup_sock_addr(connect6)]
pub fn imds_connect6(ctx: SockAddrContext) -> i32 {
    connect6::<true>(ctx)
}

/// [`imds_connect6`] without the PID-namespace wall, for kernels before 6.10.
#[cgroup_sock_addr(connect6)]
pub fn imds_connect6_compat(ctx: SockAddrContext) -> i32 {
    connect6::<false>(ctx)
}

#[inline(always)]
fn connect4<const PIDNS: bool>(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: the kernel hands a valid bpf_sock_addr to this program type.
    let (type_, ip, port) = unsafe { ((*sa).type_, (*sa).user_ip4, (*sa).user_port) };
    if ip != IMDS_V4 {
        // Not to the IMDS address: none of our business.
        return ALLOW;
    }
    let config = match gate::<PIDNS>(&ctx) {
        Ok(config) => config,
        Err(verdict) => return verdict,
    };
    if type_ != SOCK_STREAM || port != raw_port(IMDS_PORT) {
        // A container's UDP, or TCP to another port of IMDS: nothing the proxy serves, and
        // it must not reach the real IMDS. Refused here; the egress guard would drop it.
        return REFUSE;
    }
    if !pend(&ctx, sa, AF_INET, [IMDS_V4, 0, 0, 0]) {
        return REFUSE;
    }
    // SAFETY: as above; user_ip4 and user_port are writable in connect4.
    unsafe {
        (*sa).user_ip4 = config.proxy_v4;
        (*sa).user_port = config.proxy_port_v4;
    }
    ALLOW
}

#[inline(always)]
fn connect6<const PIDNS: bool>(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: the kernel hands a valid bpf_sock_addr to this program type.
    let (type_, ip, port) = unsafe { ((*sa).type_, (*sa).user_ip6, (*sa).user_port) };
    // ::ffff:169.254.169.254: the IPv4 IMDS through a dual-stack socket. The kernel connects
    // it over IPv4 without running connect4, so it is handled here.
    let mapped = ip == IMDS_V4_MAPPED;
    if ip != IMDS_V6 && !mapped {
        // Not to an IMDS address: none of our business.
        return ALLOW;
    }
    let config = match gate::<PIDNS>(&ctx) {
        Ok(config) => config,
        Err(verdict) => return verdict,
    };
    if type_ != SOCK_STREAM || port != raw_port(IMDS_PORT) {
        // Not TCP to port 80: nothing the proxy serves, and it must not reach IMDS.
        return REFUSE;
    }
    let (family, orig, to, to_port) = if mapped {
        // To the IPv4 listen address, in the same v4-mapped form; IPv4 on the wire, so the
        // record says IPv4 (sock_ops keys it by the IPv4 client address the proxy sees).
        (
            AF_INET,
            [IMDS_V4, 0, 0, 0],
            [0, 0, V4_MAPPED_WORD, config.proxy_v4],
            config.proxy_port_v4,
        )
    } else if config.proxy_port_v6 == 0 {
        // To be redirected, but the proxy has no IPv6 listener: refuse, never let it through.
        warn!(&ctx, "IMDS IPv6 connect refused: no IPv6 listen address");
        return REFUSE;
    } else {
        (AF_INET6, IMDS_V6, config.proxy_v6, config.proxy_port_v6)
    };
    if !pend(&ctx, sa, family, orig) {
        return REFUSE;
    }
    // SAFETY: user_ip6 (word by word) and user_port are writable in connect6.
    unsafe {
        (*sa).user_ip6[0] = to[0];
        (*sa).user_ip6[1] = to[1];
        (*sa).user_ip6[2] = to[2];
        (*sa).user_ip6[3] = to[3];
        (*sa).user_port = to_port;
    }
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn imds_getpeername4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    let Some(config) = config() else {
        return ALLOW;
    };
    // SAFETY: user_ip4/user_port hold the peer and are writable in getpeername4.
    unsafe {
        if (*sa).user_ip4 == config.proxy_v4 && (*sa).user_port == config.proxy_port_v4 {
            // A redirected socket (the listen address serves nothing else): show IMDS.
            (*sa).user_ip4 = IMDS_V4;
            (*sa).user_port = raw_port(IMDS_PORT);
        }
    }
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn imds_getpeername6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    let Some(config) = config() else {
        return ALLOW;
    };
    // SAFETY: as in getpeername4, for the IPv6 fields.
    unsafe {
        let peer = (*sa).user_ip6;
        if peer == [0, 0, V4_MAPPED_WORD, config.proxy_v4]
            && (*sa).user_port == config.proxy_port_v4
        {
            // A v4-mapped redirected socket: show the v4-mapped IMDS address.
            (*sa).user_ip6[3] = IMDS_V4;
            (*sa).user_port = raw_port(IMDS_PORT);
        } else if config.proxy_port_v6 != 0
            && (*sa).user_ip6 == config.proxy_v6
            && (*sa).user_port == config.proxy_port_v6
        {
            (*sa).user_ip6[0] = IMDS_V6[0];
            (*sa).user_ip6[1] = IMDS_V6[1];
            (*sa).user_ip6[2] = IMDS_V6[2];
            (*sa).user_ip6[3] = IMDS_V6[3];
            (*sa).user_port = raw_port(IMDS_PORT);
        }
    }
    ALLOW
}

/// The client's side of the connection, as the proxy will see its peer.
fn local_key(ctx: &SockOpsContext) -> ConnKey {
    // Volatile loads, all of them, before choosing: otherwise LLVM sinks a load into the
    // branch that uses it through a ctx pointer moved by the field offset, which the
    // verifier rejects ("dereference of modified ctx ptr").
    let ops = ctx.ops;
    // SAFETY: the kernel hands a valid bpf_sock_ops to this program type; these fields are
    // readable in every callback.
    let (family, ip4, ip6, port) = unsafe {
        (
            read_volatile(&raw const (*ops).family),
            read_volatile(&raw const (*ops).local_ip4),
            [
                read_volatile(&raw const (*ops).local_ip6[0]),
                read_volatile(&raw const (*ops).local_ip6[1]),
                read_volatile(&raw const (*ops).local_ip6[2]),
                read_volatile(&raw const (*ops).local_ip6[3]),
            ],
            // bpf_sock_ops.local_port is in host order.
            read_volatile(&raw const (*ops).local_port),
        )
    };
    if family == AF_INET6 as u32 && !is_v4_mapped(&ip6) {
        ConnKey {
            addr: ip6,
            port,
            family,
        }
    } else {
        // IPv4, or an AF_INET6 socket talking IPv4 (v4-mapped): the proxy's IPv4 listener
        // sees an IPv4 peer.
        ConnKey {
            addr: [ip4, 0, 0, 0],
            port,
            family: AF_INET as u32,
        }
    }
}

#[sock_ops]
pub fn imds_sock_ops(ctx: SockOpsContext) -> u32 {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops as *mut _) };
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => {
            // A redirected socket is about to send its SYN: ask for state changes, so its
            // records are dropped however the connection ends (refused, reset, closed).
            if unsafe { PENDING.get(cookie) }.is_some() {
                let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
            }
        }
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            // The client side is established; the proxy cannot have accepted yet (the ACK
            // that completes its side leaves after this callback). Re-key the record.
            if let Some(record) = unsafe { PENDING.get(cookie) } {
                let record = *record;
                if CONNS.insert(local_key(&ctx), record, 0).is_err() {
                    warn!(
                        &ctx,
                        "cannot record an established IMDS connection (IMDS_CONNS)"
                    );
                }
                let _ = PENDING.remove(cookie);
            }
        }
        // arg 1 is the new state. Only sockets that asked for state changes (ours) get here.
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => {
            let _ = PENDING.remove(cookie);
            let _ = CONNS.remove(local_key(&ctx));
        }
        _ => {
            // Every other callback (and state changes short of closed): nothing to do.
        }
    }
    // sock_ops programs return 1 for "handled"; the value matters only to a few ops.
    1
}

/// cgroup_skb verdicts.
const SKB_PASS: i32 = 1;
const SKB_DROP: i32 = 0;

#[inline(always)]
fn guard_count(stat: GuardStat) {
    if let Some(slot) = GUARD.get_ptr_mut(stat as u32) {
        // Per-CPU slot: no other writer while this program runs on this CPU.
        unsafe { *slot += 1 };
    }
}

/// The backstop: nothing a container's socket sends reaches an IMDS address. The data of a
/// cgroup_skb program starts at the IP header.
#[cgroup_skb(egress)]
pub fn imds_egress_guard(ctx: SkBuffContext) -> i32 {
    let Ok(first) = ctx.load::<u8>(0) else {
        // Nothing readable: not an IP packet of ours.
        return SKB_PASS;
    };
    let to_imds = match first >> 4 {
        // IPv4: destination at 16.
        4 => ctx.load::<u32>(16).is_ok_and(|dst| dst == IMDS_V4),
        // IPv6: destination at 24 (v4-mapped never appears on the wire).
        6 => ctx.load::<RawAddr>(24).is_ok_and(|dst| dst == IMDS_V6),
        _ => false,
    };
    if !to_imds {
        return SKB_PASS;
    }
    let Some(config) = config() else {
        // Attached but not configured: fail closed, as the connect programs do.
        guard_count(GuardStat::DroppedUnconfigured);
        return SKB_DROP;
    };
    // The socket's cgroup (0 for a packet without a socket, which no container sends from
    // here: treated like any container's).
    let cgroup = unsafe { bpf_skb_cgroup_id(ctx.skb.skb) };
    if cgroup == 0 {
        guard_count(GuardStat::Dropped);
        return SKB_DROP;
    }
    match decide(config, cgroup) {
        // The proxy itself, or a host service in filter mode.
        Decision::Pass => SKB_PASS,
        // A container, or a cgroup not classified yet: its legitimate IMDS connections were
        // rewritten at connect time, so this one went around the hooks.
        Decision::Redirect => {
            guard_count(GuardStat::Dropped);
            SKB_DROP
        }
    }
}
