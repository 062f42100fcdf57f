//! tc mode's programs on crafted packets, run by the kernel itself (BPF_PROG_TEST_RUN through
//! aya's `TestRun`): the rewrite and the reverse rewrite, with checksums verified by an
//! independent implementation here; IPv4 options rewritten around; fragments, extension headers,
//! non-TCP and other ports of IMDS dropped and counted; unrelated traffic passed byte for byte. (The kernel hands test runs a full checksum; the
//! CHECKSUM_PARTIAL case is what veths produce, covered by the live tests.)
//!
//! Test runs happen inside a network namespace of the test's own, because the ingress program asks
//! the kernel's FIB whether the host keeps a packet sent to the listen address: there, the listen
//! addresses are on `lo` (as on a host running the proxy), or missing with a route that would
//! carry them away (the proxy's interface deleted under pinned programs).
use std::{
    fs::File,
    net::{Ipv4Addr, Ipv6Addr},
};

use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{SchedClassifier, TestRun, TestRunOptions},
};
use imds_common::{
    AF_INET, AF_INET6, ConnKey, MAP_CONFIG, MAP_NAT, MAP_TC_SOURCES, MAP_TC_STATS, NatEntry,
    RedirectConfig, SOURCE_VALIDATED_MARK, SourceKey, TcStat, raw_port, raw_v4, raw_v6,
};

const PASS: u32 = 0; // TC_ACT_OK
const DROP: u32 = 2; // TC_ACT_SHOT
const PROXY_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 43, 1);
const PROXY_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0x43, 0, 0, 0, 0, 1);
const PROXY_PORT: u16 = 8080;
const IMDS_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
const IMDS_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);
const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(172, 17, 0, 2);
const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xd0c, 0, 0, 0, 0, 0, 2);
/// Another container's addresses: a neighbour of the client's, whose source the client may spoof.
const NEIGHBOUR_V4: Ipv4Addr = Ipv4Addr::new(172, 17, 0, 3);
const NEIGHBOUR_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xd0c, 0, 0, 0, 0, 0, 3);

/// `struct __sk_buff` (uapi/linux/bpf.h): its size and where `mark` is.
const SK_BUFF_SIZE: usize = 192;
const SK_BUFF_MARK: usize = 8;

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const FIN: u8 = 0x01;
const RST: u8 = 0x04;

/// What the test's network namespace looks like to the FIB lookup in the ingress program.
#[derive(Clone, Copy)]
enum Host {
    /// The listen addresses are local (on `lo`), forwarding on: a host running the proxy.
    ListenLocal,
    /// The listen addresses are nowhere on the host and a default route leads out through a veth
    /// (both ends in the namespace): what a pinned program meets when the proxy's interface is
    /// deleted. `forwarding` is the host's IP forwarding switch.
    ListenGone { forwarding: bool },
}

fn ip(args: &str) {
    let args: Vec<&str> = args.split_whitespace().collect();
    imds_tests::scene::ip(&args).unwrap();
}

/// A network namespace set up as `host`, held open by its file descriptor. Built on a thread of
/// its own: `unshare` moves only the calling thread, and the commands it runs inherit its
/// namespace.
fn netns(host: Host) -> File {
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
        ip("link set lo up");
        let forwarding = match host {
            Host::ListenLocal => {
                ip(&format!("addr add {PROXY_V4}/32 dev lo"));
                ip(&format!("-6 addr add {PROXY_V6}/128 dev lo"));
                true
            }
            Host::ListenGone { forwarding } => {
                ip("link add imds-out type veth peer name imds-peer");
                ip("addr add 192.0.2.1/24 dev imds-out");
                ip("-6 addr add 2001:db8::1/64 dev imds-out nodad");
                ip("link set imds-out up");
                ip("link set imds-peer up");
                ip("route add default via 192.0.2.2");
                ip("-6 route add default via 2001:db8::2");
                forwarding
            }
        };
        // /proc/sys/net is the namespace of whoever opens it: this thread's.
        let on = if forwarding { "1" } else { "0" };
        std::fs::write("/proc/sys/net/ipv4/ip_forward", on).expect("ip_forward");
        std::fs::write("/proc/sys/net/ipv6/conf/all/forwarding", on).expect("ipv6 forwarding");
        File::open("/proc/thread-self/ns/net").expect("the namespace's fd")
    })
    .join()
    .expect("setting up the namespace")
}

struct Programs {
    ebpf: Ebpf,
    netns: File,
}

impl Programs {
    fn load(configured: bool) -> Self {
        Self::load_on(configured, Host::ListenLocal)
    }

    fn load_on(configured: bool, host: Host) -> Self {
        let mut ebpf = Ebpf::load(imds_proxy::redirect::OBJECT).expect("the object loads");
        if configured {
            let mut config: Array<_, RedirectConfig> =
                Array::try_from(ebpf.map_mut(MAP_CONFIG).unwrap()).unwrap();
            config
                .set(
                    0,
                    RedirectConfig {
                        proxy_v4: raw_v4(PROXY_V4.octets()),
                        proxy_v6: raw_v6(PROXY_V6.octets()),
                        proxy_port_v4: raw_port(PROXY_PORT),
                        proxy_port_v6: raw_port(PROXY_PORT),
                        filter: 0,
                        proxy_cgroup: 0,
                        netns_cookie: 0,
                        ..Default::default()
                    },
                    0,
                )
                .unwrap();
        }
        for name in [
            "imds_tc_ingress",
            "imds_tc_egress",
            "imds_tc_source_guard",
            "imds_tc_reply_guard",
            "imds_tc_routed_ingress",
            "imds_tc_routed_egress",
        ] {
            let prog: &mut SchedClassifier = ebpf.program_mut(name).unwrap().try_into().unwrap();
            prog.load()
                .unwrap_or_else(|e| panic!("{name} loads: {e:?}"));
        }
        Self {
            ebpf,
            netns: netns(host),
        }
    }

    /// Run a program on a frame inside the test's namespace (the kernel runs it on that
    /// namespace's `lo`, index 1), the packet carrying `mark`; (verdict, the frame as it left,
    /// its mark then).
    fn run_marked(&self, program: &str, frame: &[u8], mark: u32) -> (u32, Vec<u8>, u32) {
        let prog: &SchedClassifier = self.ebpf.program(program).unwrap().try_into().unwrap();
        // A `struct __sk_buff` for the test run: all zero but `mark` (offset 8).
        let mut ctx_in = [0u8; SK_BUFF_SIZE];
        ctx_in[SK_BUFF_MARK..SK_BUFF_MARK + 4].copy_from_slice(&mark.to_ne_bytes());
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    nix::sched::setns(&self.netns, nix::sched::CloneFlags::CLONE_NEWNET)
                        .expect("setns");
                    let mut out = vec![0u8; frame.len() + 64];
                    let mut ctx_out = [0u8; SK_BUFF_SIZE];
                    let result = prog
                        .test_run(TestRunOptions {
                            data_in: Some(frame),
                            data_out: Some(&mut out),
                            ctx_in: Some(&ctx_in),
                            ctx_out: Some(&mut ctx_out),
                            ..Default::default()
                        })
                        .unwrap_or_else(|e| {
                            panic!("test run of {program} on {} bytes: {e:?}", frame.len())
                        });
                    out.truncate(result.data_size_out as usize);
                    let mark = u32::from_ne_bytes(
                        ctx_out[SK_BUFF_MARK..SK_BUFF_MARK + 4].try_into().unwrap(),
                    );
                    (result.return_value, out, mark)
                })
                .join()
        })
        .expect("the test run's thread")
    }

    fn run(&self, program: &str, frame: &[u8], mark: u32) -> (u32, Vec<u8>) {
        let (verdict, out, _) = self.run_marked(program, frame, mark);
        (verdict, out)
    }

    /// The bridge's ingress program on a packet a guarded container port vouched for.
    fn ingress(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        self.run("imds_tc_ingress", frame, SOURCE_VALIDATED_MARK)
    }

    fn egress(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        self.run("imds_tc_egress", frame, 0)
    }

    /// The source guard of a container port (here `lo`, index 1), on what the container sends.
    fn guard(&self, frame: &[u8]) -> (u32, Vec<u8>, u32) {
        self.run_marked("imds_tc_source_guard", frame, 0)
    }

    /// Configured, the client ([`CLIENT_V4`], [`CLIENT_V6`]) vouched for behind `lo` (index 1,
    /// where the test runs put packets): a container port, or a routed veth, with its container.
    fn with_client_behind_lo() -> Self {
        const LO: u32 = 1;
        let mut p = Self::load(true);
        p.own(LO, CLIENT_V4.into());
        p.own(LO, CLIENT_V6.into());
        p
    }

    /// The container behind port `ifindex` owns `addr`.
    fn own(&mut self, ifindex: u32, addr: std::net::IpAddr) {
        let mut sources: HashMap<&mut MapData, SourceKey, u8> =
            HashMap::try_from(self.ebpf.map_mut(MAP_TC_SOURCES).unwrap()).unwrap();
        let key = match addr {
            std::net::IpAddr::V4(v4) => SourceKey {
                ifindex,
                family: AF_INET as u32,
                addr: [raw_v4(v4.octets()), 0, 0, 0],
            },
            std::net::IpAddr::V6(v6) => SourceKey {
                ifindex,
                family: AF_INET6 as u32,
                addr: raw_v6(v6.octets()),
            },
        };
        sources.insert(key, 1, 0).unwrap();
    }

    fn stat(&self, stat: TcStat) -> u64 {
        let stats: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(self.ebpf.map(MAP_TC_STATS).unwrap()).unwrap();
        stats.get(&(stat as u32), 0).unwrap().iter().sum()
    }

    fn nat(&self) -> Vec<(ConnKey, NatEntry)> {
        let nat: HashMap<&MapData, ConnKey, NatEntry> =
            HashMap::try_from(self.ebpf.map(MAP_NAT).unwrap()).unwrap();
        nat.iter().map(Result::unwrap).collect()
    }
}

// ---- An independent packet builder and checksum, RFC 1071 / 793 / 8200. ----

fn ones_complement_sum(chunks: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in chunks {
        for pair in chunk.chunks(2) {
            let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
            sum += u32::from(word);
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn tcp_header(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&dport.to_be_bytes());
    tcp[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = flags;
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    tcp
}

const PAYLOAD: &[u8] = b"GET /latest/meta-data/ HTTP/1.1\r\n\r\n";

fn ethernet(ethertype: u16) -> Vec<u8> {
    let mut eth = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
    eth.extend_from_slice(&ethertype.to_be_bytes());
    eth
}

/// An IPv4 frame: `options` words of IP options, `frag` the flags+offset field.
fn v4_frame(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    l4: &[u8],
    options: usize,
    frag: u16,
) -> Vec<u8> {
    let ihl = 5 + options;
    let mut ip = vec![0u8; ihl * 4];
    ip[0] = 0x40 | ihl as u8;
    ip[2..4].copy_from_slice(&((ihl * 4 + l4.len()) as u16).to_be_bytes());
    ip[6..8].copy_from_slice(&frag.to_be_bytes());
    ip[8] = 64;
    ip[9] = proto;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    for byte in &mut ip[20..] {
        *byte = 1; // NOP options
    }
    let csum = ones_complement_sum(&[&ip]);
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    let mut frame = ethernet(0x0800);
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(l4);
    frame
}

fn v4_tcp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), flags: u8) -> Vec<u8> {
    v4_tcp_with_options(src, dst, flags, 0)
}

/// An IPv4 TCP frame whose IP header carries `options` words of options.
fn v4_tcp_with_options(
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    flags: u8,
    options: usize,
) -> Vec<u8> {
    let mut tcp = tcp_header(src.1, dst.1, flags);
    tcp.extend_from_slice(PAYLOAD);
    let csum = v4_tcp_checksum(src.0, dst.0, &tcp);
    tcp[16..18].copy_from_slice(&csum.to_be_bytes());
    v4_frame(src.0, dst.0, 6, &tcp, options, 0)
}

fn v4_tcp_checksum(src: Ipv4Addr, dst: Ipv4Addr, tcp: &[u8]) -> u16 {
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&(tcp.len() as u16).to_be_bytes());
    let mut zeroed = tcp.to_vec();
    zeroed[16..18].copy_from_slice(&[0, 0]);
    ones_complement_sum(&[&pseudo, &zeroed])
}

fn v6_frame(src: Ipv6Addr, dst: Ipv6Addr, next: u8, l4: &[u8]) -> Vec<u8> {
    let mut ip = vec![0u8; 40];
    ip[0] = 0x60;
    ip[4..6].copy_from_slice(&(l4.len() as u16).to_be_bytes());
    ip[6] = next;
    ip[7] = 64;
    ip[8..24].copy_from_slice(&src.octets());
    ip[24..40].copy_from_slice(&dst.octets());
    let mut frame = ethernet(0x86dd);
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(l4);
    frame
}

fn v6_tcp_checksum(src: Ipv6Addr, dst: Ipv6Addr, tcp: &[u8]) -> u16 {
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&(tcp.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 6]);
    let mut zeroed = tcp.to_vec();
    zeroed[16..18].copy_from_slice(&[0, 0]);
    ones_complement_sum(&[&pseudo, &zeroed])
}

fn v6_tcp(src: (Ipv6Addr, u16), dst: (Ipv6Addr, u16), flags: u8) -> Vec<u8> {
    let mut tcp = tcp_header(src.1, dst.1, flags);
    tcp.extend_from_slice(PAYLOAD);
    let csum = v6_tcp_checksum(src.0, dst.0, &tcp);
    tcp[16..18].copy_from_slice(&csum.to_be_bytes());
    v6_frame(src.0, dst.0, 6, &tcp)
}

/// What an IPv4 TCP frame says: (src, sport, dst, dport), after checking both checksums.
fn read_v4(frame: &[u8]) -> (Ipv4Addr, u16, Ipv4Addr, u16) {
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    let ip = &frame[14..14 + ihl];
    assert_eq!(ones_complement_sum(&[ip]), 0, "IPv4 header checksum");
    let src = Ipv4Addr::from(<[u8; 4]>::try_from(&ip[12..16]).unwrap());
    let dst = Ipv4Addr::from(<[u8; 4]>::try_from(&ip[16..20]).unwrap());
    let tcp = &frame[14 + ihl..];
    let stored = u16::from_be_bytes([tcp[16], tcp[17]]);
    assert_eq!(stored, v4_tcp_checksum(src, dst, tcp), "TCP checksum");
    let port = |i: usize| u16::from_be_bytes([tcp[i], tcp[i + 1]]);
    assert_eq!(&tcp[20..], PAYLOAD, "payload untouched");
    (src, port(0), dst, port(2))
}

fn read_v6(frame: &[u8]) -> (Ipv6Addr, u16, Ipv6Addr, u16) {
    let ip = &frame[14..54];
    let src = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[8..24]).unwrap());
    let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[24..40]).unwrap());
    let tcp = &frame[54..];
    let stored = u16::from_be_bytes([tcp[16], tcp[17]]);
    assert_eq!(stored, v6_tcp_checksum(src, dst, tcp), "TCP checksum");
    let port = |i: usize| u16::from_be_bytes([tcp[i], tcp[i + 1]]);
    assert_eq!(&tcp[20..], PAYLOAD, "payload untouched");
    (src, port(0), dst, port(2))
}

#[test]
fn ipv4_request_is_redirected_and_the_reply_restored_with_valid_checksums() {
    let p = Programs::load(true);
    let syn = v4_tcp((CLIENT_V4, 40000), (IMDS_V4, 80), SYN);
    let (verdict, out) = p.ingress(&syn);
    assert_eq!(verdict, PASS);
    assert_eq!(read_v4(&out), (CLIENT_V4, 40000, PROXY_V4, PROXY_PORT));
    assert_eq!(out[..14], syn[..14], "Ethernet header untouched");
    let nat = p.nat();
    assert_eq!(nat.len(), 1, "{nat:?}");
    assert_eq!(nat[0].0.addr[0], raw_v4(CLIENT_V4.octets()));
    assert_eq!(nat[0].0.port, 40000);
    assert_eq!(nat[0].1.orig_addr[0], raw_v4(IMDS_V4.octets()));
    assert_eq!(u16::from_be(nat[0].1.orig_port), 80);

    let reply = v4_tcp((PROXY_V4, PROXY_PORT), (CLIENT_V4, 40000), SYN | ACK);
    let (verdict, out) = p.egress(&reply);
    assert_eq!(verdict, PASS);
    assert_eq!(read_v4(&out), (IMDS_V4, 80, CLIENT_V4, 40000));
    assert_eq!(p.stat(TcStat::Redirected), 1);
    assert_eq!(p.stat(TcStat::Reversed), 1);
    assert_eq!(p.stat(TcStat::ReversedWithoutState), 0);

    // A reply for a connection the table does not hold (evicted): still restored, and counted.
    let orphan = v4_tcp((PROXY_V4, PROXY_PORT), (CLIENT_V4, 40001), ACK);
    let (verdict, out) = p.egress(&orphan);
    assert_eq!(verdict, PASS);
    assert_eq!(read_v4(&out), (IMDS_V4, 80, CLIENT_V4, 40001));
    assert_eq!(p.stat(TcStat::ReversedWithoutState), 1);
}

#[test]
fn ipv6_request_is_redirected_and_the_reply_restored_with_valid_checksums() {
    let p = Programs::load(true);
    let (verdict, out) = p.ingress(&v6_tcp((CLIENT_V6, 40000), (IMDS_V6, 80), SYN));
    assert_eq!(verdict, PASS);
    assert_eq!(read_v6(&out), (CLIENT_V6, 40000, PROXY_V6, PROXY_PORT));
    let (verdict, out) = p.egress(&v6_tcp(
        (PROXY_V6, PROXY_PORT),
        (CLIENT_V6, 40000),
        SYN | ACK,
    ));
    assert_eq!(verdict, PASS);
    assert_eq!(read_v6(&out), (IMDS_V6, 80, CLIENT_V6, 40000));
    assert_eq!(
        p.stat(TcStat::ReversedWithoutState),
        0,
        "the entry was found"
    );
}

#[test]
fn ipv4_with_options_is_redirected_around_them_and_restored() {
    // Any process may set IP_OPTIONS: its packets are rewritten like any other, the options left
    // as they are, the TCP header found after them.
    let p = Programs::load(true);
    for (port, options) in [(40100u16, 1usize), (40101, 3), (40102, 10)] {
        let syn = v4_tcp_with_options((CLIENT_V4, port), (IMDS_V4, 80), SYN, options);
        let (verdict, out) = p.ingress(&syn);
        assert_eq!(verdict, PASS, "{options} option words");
        assert_eq!(
            read_v4(&out),
            (CLIENT_V4, port, PROXY_V4, PROXY_PORT),
            "{options} option words"
        );
        let ihl = 20 + options * 4;
        assert_eq!(out[34..14 + ihl], syn[34..14 + ihl], "options untouched");
        let reply = v4_tcp_with_options(
            (PROXY_V4, PROXY_PORT),
            (CLIENT_V4, port),
            SYN | ACK,
            options,
        );
        let (verdict, out) = p.egress(&reply);
        assert_eq!(verdict, PASS);
        assert_eq!(read_v4(&out), (IMDS_V4, 80, CLIENT_V4, port));
    }
    assert_eq!(p.stat(TcStat::Redirected), 3);
    assert_eq!(p.stat(TcStat::Reversed), 3);
}

#[test]
fn what_cannot_be_rewritten_is_dropped_and_counted_never_passed() {
    let p = Programs::load(true);
    let mut tcp = tcp_header(40000, 80, SYN);
    tcp.extend_from_slice(PAYLOAD);
    let mut bad_version = v4_tcp((CLIENT_V4, 40000), (IMDS_V4, 80), SYN);
    bad_version[14] = 0x65; // version 6 in an IPv4 frame
    let mut short_ihl = v4_tcp((CLIENT_V4, 40000), (IMDS_V4, 80), SYN);
    short_ihl[14] = 0x44; // IHL 4: shorter than an IPv4 header
    let cases: Vec<(&str, Vec<u8>, TcStat)> = vec![
        (
            "IPv4 first fragment (MF)",
            v4_frame(CLIENT_V4, IMDS_V4, 6, &tcp, 0, 0x2000),
            TcStat::DroppedFragment,
        ),
        (
            "IPv4 later fragment (offset)",
            v4_frame(CLIENT_V4, IMDS_V4, 6, &tcp, 0, 0x0010),
            TcStat::DroppedFragment,
        ),
        (
            "IPv4 fragment with options",
            v4_frame(CLIENT_V4, IMDS_V4, 6, &tcp, 2, 0x2000),
            TcStat::DroppedFragment,
        ),
        (
            "UDP to IMDS",
            v4_frame(CLIENT_V4, IMDS_V4, 17, &tcp, 0, 0),
            TcStat::DroppedNotTcp,
        ),
        (
            "ICMP to IMDS",
            v4_frame(CLIENT_V4, IMDS_V4, 1, &tcp, 0, 0),
            TcStat::DroppedNotTcp,
        ),
        (
            "IPv6 with a hop-by-hop header",
            v6_frame(CLIENT_V6, IMDS_V6, 0, &tcp),
            TcStat::DroppedNotTcp,
        ),
        (
            "IPv6 fragment header",
            v6_frame(CLIENT_V6, IMDS_V6, 44, &tcp),
            TcStat::DroppedNotTcp,
        ),
        (
            "IPv6 routing header",
            v6_frame(CLIENT_V6, IMDS_V6, 43, &tcp),
            TcStat::DroppedNotTcp,
        ),
        (
            "another port of IMDS",
            v4_tcp((CLIENT_V4, 40000), (IMDS_V4, 443), SYN),
            TcStat::DroppedOtherPort,
        ),
        (
            "another port of IMDS, IPv6",
            v6_tcp((CLIENT_V6, 40000), (IMDS_V6, 8080), SYN),
            TcStat::DroppedOtherPort,
        ),
        (
            "IPv4 frame with version 6",
            bad_version,
            TcStat::DroppedBroken,
        ),
        (
            "IPv4 header shorter than 20 bytes",
            short_ihl,
            TcStat::DroppedBroken,
        ),
        (
            "TCP header cut short",
            v4_frame(CLIENT_V4, IMDS_V4, 6, &tcp[..4], 0, 0),
            TcStat::DroppedBroken,
        ),
    ];
    for (what, frame, stat) in cases {
        let before = p.stat(stat);
        let (verdict, _) = p.ingress(&frame);
        assert_eq!(verdict, DROP, "{what}: dropped, never passed to IMDS");
        assert_eq!(p.stat(stat), before + 1, "{what} counted as {stat:?}");
    }
    assert_eq!(p.stat(TcStat::Redirected), 0);
    assert!(p.nat().is_empty(), "no state for dropped packets");
    // Egress: non-TCP from the listen address is dropped too.
    let icmp_from_proxy = v4_frame(PROXY_V4, CLIENT_V4, 1, &tcp, 0, 0);
    assert_eq!(p.egress(&icmp_from_proxy).0, DROP);
}

#[test]
fn unrelated_traffic_passes_byte_for_byte() {
    let p = Programs::load(true);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "another destination",
            v4_tcp((CLIENT_V4, 40000), (Ipv4Addr::new(10, 0, 0, 1), 80), SYN),
        ),
        (
            "another destination, IPv6",
            v6_tcp(
                (CLIENT_V6, 40000),
                (Ipv6Addr::new(0xfd00, 0xd0c, 0, 0, 0, 0, 0, 1), 80),
                SYN,
            ),
        ),
        (
            "UDP elsewhere",
            v4_frame(CLIENT_V4, Ipv4Addr::new(10, 0, 0, 1), 17, &[0; 8], 0, 0),
        ),
        (
            "ARP",
            ethernet(0x0806).into_iter().chain([0u8; 28]).collect(),
        ),
    ];
    for (what, frame) in cases {
        assert_eq!(p.ingress(&frame), (PASS, frame.clone()), "{what}");
    }
    // Egress: the proxy's traffic from another port, and a stranger's, are left alone.
    for frame in [
        v4_tcp((PROXY_V4, 9999), (CLIENT_V4, 40000), ACK),
        v4_tcp((Ipv4Addr::new(172, 17, 0, 1), 80), (CLIENT_V4, 40000), ACK),
    ] {
        assert_eq!(p.egress(&frame), (PASS, frame));
    }
    assert_eq!(p.stat(TcStat::Redirected), 0);
    assert_eq!(p.stat(TcStat::Reversed), 0);
    assert!(p.nat().is_empty());
}

#[test]
fn the_listen_address_is_reserved_and_an_unconfigured_program_fails_closed() {
    let p = Programs::load(true);
    // A container addressing the listen address directly: dropped.
    let direct = v4_tcp((CLIENT_V4, 40000), (PROXY_V4, PROXY_PORT), SYN);
    assert_eq!(p.ingress(&direct).0, DROP);
    let direct6 = v6_tcp((CLIENT_V6, 40000), (PROXY_V6, PROXY_PORT), SYN);
    assert_eq!(p.ingress(&direct6).0, DROP);
    assert_eq!(p.stat(TcStat::DroppedDirect), 2);

    // Attached before userspace wrote the configuration: IMDS packets are dropped, not passed.
    let unconfigured = Programs::load(false);
    let syn = v4_tcp((CLIENT_V4, 40000), (IMDS_V4, 80), SYN);
    assert_eq!(unconfigured.ingress(&syn).0, DROP);
    // Everything else still flows.
    let other = v4_tcp((CLIENT_V4, 40000), (Ipv4Addr::new(10, 0, 0, 1), 80), SYN);
    assert_eq!(unconfigured.ingress(&other), (PASS, other));
}

#[test]
fn nat_entries_end_with_rst_and_after_both_fins() {
    let p = Programs::load(true);
    let client = |port, flags| v4_tcp((CLIENT_V4, port), (IMDS_V4, 80), flags);
    let proxy = |port, flags| v4_tcp((PROXY_V4, PROXY_PORT), (CLIENT_V4, port), flags);
    // Every segment of these connections is rewritten and passed: the state is the only thing
    // under test, so a dropped segment must fail here, not go unnoticed.
    let ingress = |frame: Vec<u8>| {
        let (verdict, out) = p.ingress(&frame);
        assert_eq!(verdict, PASS);
        assert_eq!(read_v4(&out).2, PROXY_V4, "redirected");
    };
    let egress = |frame: Vec<u8>| {
        let (verdict, out) = p.egress(&frame);
        assert_eq!(verdict, PASS);
        assert_eq!(read_v4(&out).0, IMDS_V4, "restored");
    };
    // Reset by the client.
    ingress(client(40000, SYN));
    assert_eq!(p.nat().len(), 1);
    ingress(client(40000, RST));
    assert!(p.nat().is_empty());
    // Reset by the proxy (nobody listening).
    ingress(client(40001, SYN));
    egress(proxy(40001, RST | ACK));
    assert!(p.nat().is_empty());
    // Client closes first: FIN, FIN+ACK, then the last ACK ends it.
    ingress(client(40002, SYN));
    egress(proxy(40002, SYN | ACK));
    ingress(client(40002, FIN | ACK));
    egress(proxy(40002, FIN | ACK));
    assert_eq!(p.nat().len(), 1, "still there until the last ACK");
    ingress(client(40002, ACK));
    assert!(p.nat().is_empty());
    // Proxy closes first.
    ingress(client(40003, SYN));
    egress(proxy(40003, FIN | ACK));
    ingress(client(40003, FIN | ACK));
    egress(proxy(40003, ACK));
    assert!(p.nat().is_empty());
    assert_eq!(p.stat(TcStat::NatClosed), 4);
}

/// NAT entries of connections that never closed are reaped once idle for `NAT_IDLE` (120 s): the
/// proxy's own reaper, on this map, with the time injected instead of waited for.
#[test]
fn idle_nat_entries_are_reaped_after_two_minutes() {
    use imds_proxy::redirect::tc::{NAT_IDLE, monotonic_ns, reap_idle};
    let mut p = Programs::load(true);
    let (verdict, _) = p.ingress(&v4_tcp((CLIENT_V4, 40000), (IMDS_V4, 80), SYN));
    assert_eq!(verdict, PASS);
    let now = monotonic_ns();
    let mut nat: HashMap<&mut MapData, ConnKey, NatEntry> =
        HashMap::try_from(p.ebpf.map_mut(MAP_NAT).unwrap()).unwrap();
    assert_eq!(reap_idle(&mut nat, now, NAT_IDLE), 0, "fresh");
    let almost = now + NAT_IDLE.as_nanos() as u64 - 1_000_000_000;
    assert_eq!(
        reap_idle(&mut nat, almost, NAT_IDLE),
        0,
        "idle for less than two minutes"
    );
    let later = now + NAT_IDLE.as_nanos() as u64 + 1_000_000_000;
    assert_eq!(reap_idle(&mut nat, later, NAT_IDLE), 1, "idle for longer");
    assert!(p.nat().is_empty());
}

#[test]
fn nothing_rewritten_leaves_the_host_when_the_listen_address_is_gone() {
    // The proxy's interface was deleted under pinned programs: rewritten, the packets would follow
    // the default route out. They are dropped instead, and counted.
    let p = Programs::load_on(true, Host::ListenGone { forwarding: true });
    for (what, frame) in [
        ("IPv4 SYN", v4_tcp((CLIENT_V4, 40000), (IMDS_V4, 80), SYN)),
        ("IPv4 data", v4_tcp((CLIENT_V4, 40001), (IMDS_V4, 80), ACK)),
        ("IPv6 SYN", v6_tcp((CLIENT_V6, 40000), (IMDS_V6, 80), SYN)),
    ] {
        assert_eq!(p.ingress(&frame).0, DROP, "{what}");
    }
    assert_eq!(p.stat(TcStat::DroppedNotLocal), 3);
    assert_eq!(p.stat(TcStat::Redirected), 0);
    assert!(p.nat().is_empty(), "no state for dropped packets");
    // Traffic that is not ours still follows its route.
    let other = v4_tcp((CLIENT_V4, 40000), (Ipv4Addr::new(10, 0, 0, 1), 80), SYN);
    assert_eq!(p.ingress(&other), (PASS, other));

    // A host that does not forward keeps the packet whatever its routes: rewritten as usual (the
    // stack then drops it, with no listener), and nothing leaves.
    let p = Programs::load_on(true, Host::ListenGone { forwarding: false });
    let syn = v4_tcp((CLIENT_V4, 40000), (IMDS_V4, 80), SYN);
    let (verdict, out) = p.ingress(&syn);
    assert_eq!(verdict, PASS);
    assert_eq!(read_v4(&out), (CLIENT_V4, 40000, PROXY_V4, PROXY_PORT));
    assert_eq!(p.stat(TcStat::DroppedNotLocal), 0);
}

/// A container port's guard: a packet to IMDS from an address of the port's own container is
/// vouched for (the mark set, nothing else touched); from any other address (a neighbour's,
/// spoofed with a raw socket) it is dropped and counted; what is not addressed to the redirect
/// addresses passes as it is. The bridge's program redirects only what carries the mark.
#[test]
fn a_container_port_vouches_only_for_its_own_addresses() {
    let p = Programs::with_client_behind_lo();

    for own in [
        v4_tcp((CLIENT_V4, 40000), (IMDS_V4, 80), SYN),
        v6_tcp((CLIENT_V6, 40000), (IMDS_V6, 80), SYN),
    ] {
        let (verdict, out, mark) = p.guard(&own);
        assert_eq!((verdict, mark), (PASS, SOURCE_VALIDATED_MARK));
        assert_eq!(out, own, "not rewritten here");
    }
    for spoofed in [
        v4_tcp((NEIGHBOUR_V4, 40000), (IMDS_V4, 80), SYN),
        v6_tcp((NEIGHBOUR_V6, 40000), (IMDS_V6, 80), SYN),
        // Straight to the listen address with a neighbour's source: dropped too.
        v4_tcp((NEIGHBOUR_V4, 40000), (PROXY_V4, PROXY_PORT), SYN),
    ] {
        let (verdict, _, _) = p.guard(&spoofed);
        assert_eq!(verdict, DROP);
    }
    assert_eq!(p.stat(TcStat::DroppedSpoofed), 3);
    // Elsewhere, from any address: not the guard's business.
    let elsewhere = v4_tcp(
        (NEIGHBOUR_V4, 40000),
        (Ipv4Addr::new(10, 1, 2, 3), 443),
        SYN,
    );
    assert_eq!(p.guard(&elsewhere), (PASS, elsewhere.clone(), 0));

    // The bridge's program: without the mark a packet to IMDS is dropped; with it, redirected
    // and the mark taken off again.
    let syn = v4_tcp((CLIENT_V4, 40001), (IMDS_V4, 80), SYN);
    let (verdict, _) = p.run("imds_tc_ingress", &syn, 0);
    assert_eq!(verdict, DROP);
    assert_eq!(p.stat(TcStat::DroppedUnvalidated), 1);
    let (verdict, out, mark) = p.run_marked("imds_tc_ingress", &syn, SOURCE_VALIDATED_MARK | 0x7);
    assert_eq!(verdict, PASS);
    assert_eq!(read_v4(&out), (CLIENT_V4, 40001, PROXY_V4, PROXY_PORT));
    assert_eq!(mark, 0x7, "the vouching bit removed, other bits kept");
}

/// A routed container veth (no bridge: the pod's own veth is its port) carries one program each
/// way. Ingress: a request from an address of the veth's own container is redirected with no mark
/// needed (the check is the program's own) and the mark left alone; from any other address (a
/// neighbour's, spoofed) it is dropped and counted, never redirected. Egress: the proxy's answer
/// to its own container is rewritten back; an answer for any other address leaving by this veth is
/// dropped and counted (the reply guard's half). Unrelated traffic passes as it is both ways.
#[test]
fn a_routed_veth_redirects_only_its_own_container_and_answers_only_it() {
    let p = Programs::with_client_behind_lo();

    let syn = v4_tcp((CLIENT_V4, 40000), (IMDS_V4, 80), SYN);
    let (verdict, out, mark) = p.run_marked("imds_tc_routed_ingress", &syn, 0x7);
    assert_eq!(verdict, PASS);
    assert_eq!(read_v4(&out), (CLIENT_V4, 40000, PROXY_V4, PROXY_PORT));
    assert_eq!(mark, 0x7, "no mark needed, none set");
    let syn6 = v6_tcp((CLIENT_V6, 40000), (IMDS_V6, 80), SYN);
    let (verdict, out, _) = p.run_marked("imds_tc_routed_ingress", &syn6, 0);
    assert_eq!(verdict, PASS);
    assert_eq!(read_v6(&out), (CLIENT_V6, 40000, PROXY_V6, PROXY_PORT));
    assert_eq!(p.stat(TcStat::Redirected), 2);

    for spoofed in [
        v4_tcp((NEIGHBOUR_V4, 40001), (IMDS_V4, 80), SYN),
        v6_tcp((NEIGHBOUR_V6, 40001), (IMDS_V6, 80), SYN),
        v4_tcp((NEIGHBOUR_V4, 40001), (PROXY_V4, PROXY_PORT), SYN),
    ] {
        // Even carrying the bridge guard's mark: a routed veth trusts no mark.
        let (verdict, _, _) =
            p.run_marked("imds_tc_routed_ingress", &spoofed, SOURCE_VALIDATED_MARK);
        assert_eq!(verdict, DROP);
    }
    assert_eq!(p.stat(TcStat::DroppedSpoofed), 3);
    assert_eq!(p.stat(TcStat::Redirected), 2, "nothing spoofed redirected");

    // The answer to the redirected SYN: back from IMDS, to its own container.
    let answer = v4_tcp((PROXY_V4, PROXY_PORT), (CLIENT_V4, 40000), SYN | ACK);
    let (verdict, out, _) = p.run_marked("imds_tc_routed_egress", &answer, 0);
    assert_eq!(verdict, PASS);
    assert_eq!(read_v4(&out), (IMDS_V4, 80, CLIENT_V4, 40000));
    assert_eq!(p.stat(TcStat::Reversed), 1);
    // An answer for a neighbour's address leaving by this veth (misrouted): dropped, not rewritten.
    for misdelivered in [
        v4_tcp((PROXY_V4, PROXY_PORT), (NEIGHBOUR_V4, 40000), SYN | ACK),
        v4_tcp((IMDS_V4, 80), (NEIGHBOUR_V4, 40000), ACK),
        v6_tcp((PROXY_V6, PROXY_PORT), (NEIGHBOUR_V6, 40000), SYN | ACK),
    ] {
        let (verdict, _, _) = p.run_marked("imds_tc_routed_egress", &misdelivered, 0);
        assert_eq!(verdict, DROP);
    }
    assert_eq!(p.stat(TcStat::DroppedMisdelivered), 3);
    assert_eq!(p.stat(TcStat::Reversed), 1);

    // Unrelated traffic, both ways, from any address: passed byte for byte.
    for (program, frame) in [
        (
            "imds_tc_routed_ingress",
            v4_tcp(
                (NEIGHBOUR_V4, 40000),
                (Ipv4Addr::new(10, 1, 2, 3), 443),
                SYN,
            ),
        ),
        (
            "imds_tc_routed_egress",
            v4_tcp(
                (Ipv4Addr::new(10, 1, 2, 3), 443),
                (NEIGHBOUR_V4, 40000),
                ACK,
            ),
        ),
    ] {
        assert_eq!(
            p.run_marked(program, &frame, 0),
            (PASS, frame.clone(), 0),
            "{program}"
        );
    }
}
