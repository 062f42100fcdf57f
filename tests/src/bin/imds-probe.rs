//! A client for the redirect tests: opens `--count` connections to `--addr` one after the other,
//! and for each prints one JSON line with what getpeername said, the answer's status and body, or
//! the error. Exits 0 whatever happened: the test reads the lines.
//!
//! `--how` picks the way a socket reaches the address, as an attacker in a container would try
//! them: `connect` (plain), `bound` (bind to the wildcard address first), `fastopen`
//! (`sendto(MSG_FASTOPEN)` carrying the request, no connect), `udp` (a datagram, `sendto`),
//! `udp-connect` (a UDP socket connected to the address, then a datagram), `raw`
//! (a TCP SYN written on a raw IP socket). The address may be v4-mapped (`[::ffff:a.b.c.d]:80`,
//! an AF_INET6 socket talking IPv4) and may carry a scope id (`--scope-id`).
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use clap::Parser;

#[derive(Parser)]
struct Cli {
    #[arg(long, default_value = "169.254.169.254:80")]
    addr: SocketAddr,
    #[arg(long, default_value_t = 1)]
    count: usize,
    #[arg(long, default_value = "/latest/meta-data/")]
    path: String,
    #[arg(long, value_enum, default_value_t = How::Connect)]
    how: How,
    /// IPv6 only: the scope id to put in the socket address.
    #[arg(long)]
    scope_id: Option<u32>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum How {
    Connect,
    Bound,
    Fastopen,
    Udp,
    UdpConnect,
    Raw,
}

/// A blocking connect that gives up after one SYN retransmission (about 3 s). Not std's
/// `connect_timeout`: when the refusal (RST) arrives after connect(2) returned EINPROGRESS, as it
/// does across a bridge, it reported a timeout here instead of the refusal.
fn connect(addr: SocketAddr, how: How, path: &str) -> Result<TcpStream, std::io::Error> {
    use std::os::fd::AsRawFd as _;
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    if how == How::Bound {
        let any: SocketAddr = match addr {
            SocketAddr::V4(_) => "0.0.0.0:0".parse().expect("an address"),
            SocketAddr::V6(_) => "[::]:0".parse().expect("an address"),
        };
        socket.bind(&any.into())?;
    }
    let syn_retries: libc::c_int = 1;
    // SAFETY: a valid socket and a c_int option value of the right size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_SYNCNT,
            (&syn_retries as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if how == How::Fastopen {
        // No connect(2): the SYN carries the request (or a cookie request, the first time).
        let request = request(addr, path);
        socket.send_to_with_flags(request.as_bytes(), &addr.into(), libc::MSG_FASTOPEN)?;
        return Ok(socket.into());
    }
    socket.connect(&addr.into())?;
    Ok(socket.into())
}

fn request(addr: SocketAddr, path: &str) -> String {
    format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")
}

fn one(addr: SocketAddr, path: &str, how: How) -> Result<serde_json::Value, std::io::Error> {
    let timeout = Duration::from_secs(5);
    let mut stream = connect(addr, how, path)?;
    stream.set_read_timeout(Some(timeout))?;
    let peer = stream.peer_addr()?; // getpeername(2)
    let local = stream.local_addr()?;
    if how != How::Fastopen {
        stream.write_all(request(addr, path).as_bytes())?;
    }
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let response = imds_tests::http::parse(&raw, false).map_err(std::io::Error::other)?;
    Ok(serde_json::json!({
        "peer": peer.to_string(),
        "local": local.to_string(),
        "status": response.status,
        "server": response.header("server"),
        "body": response.text(),
    }))
}

/// A datagram (`udp`) or a hand-made TCP SYN on a raw IP socket (`raw`), sent without any
/// connect: neither waits for an answer (the test looks at what arrived where).
fn send_only(addr: SocketAddr, how: How) -> Result<serde_json::Value, std::io::Error> {
    let (kind, protocol) = match how {
        How::Udp => (socket2::Type::DGRAM, socket2::Protocol::UDP),
        _ => (socket2::Type::RAW, socket2::Protocol::TCP),
    };
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), kind, Some(protocol))?;
    let payload: Vec<u8> = match how {
        How::Udp => b"GET /latest/meta-data/ HTTP/1.0\r\n\r\n".to_vec(),
        _ => {
            // A TCP header: source port 40000, the address's port, SYN. The raw socket's
            // destination port field is ours to write; the kernel adds the IP header.
            let mut tcp = vec![0u8; 20];
            tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
            tcp[2..4].copy_from_slice(&addr.port().to_be_bytes());
            tcp[12] = 5 << 4;
            tcp[13] = 0x02;
            tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
            tcp
        }
    };
    let raw_addr = match (how, addr) {
        // Raw IPv6 sockets take the port field as the protocol; zero it.
        (How::Raw, SocketAddr::V6(a)) => {
            SocketAddr::V6(std::net::SocketAddrV6::new(*a.ip(), 0, 0, a.scope_id()))
        }
        (How::Raw, SocketAddr::V4(a)) => SocketAddr::new((*a.ip()).into(), 0),
        _ => addr,
    };
    let sent = socket.send_to(&payload, &raw_addr.into())?;
    Ok(serde_json::json!({ "sent": sent }))
}

/// A UDP socket connected to `addr` (the connect hooks see this one), then one datagram.
fn udp_connect(addr: SocketAddr) -> Result<serde_json::Value, std::io::Error> {
    let any: SocketAddr = match addr {
        SocketAddr::V4(_) => "0.0.0.0:0".parse().expect("an address"),
        SocketAddr::V6(_) => "[::]:0".parse().expect("an address"),
    };
    let socket = std::net::UdpSocket::bind(any)?;
    socket.connect(addr)?;
    let sent = socket.send(b"GET /latest/meta-data/ HTTP/1.0\r\n\r\n")?;
    Ok(serde_json::json!({ "sent": sent }))
}

fn main() {
    let cli = Cli::parse();
    let addr = match (cli.addr, cli.scope_id) {
        (SocketAddr::V6(a), Some(scope)) => {
            SocketAddr::V6(std::net::SocketAddrV6::new(*a.ip(), a.port(), 0, scope))
        }
        (addr, _) => addr,
    };
    for _ in 0..cli.count {
        let result = match cli.how {
            How::Udp | How::Raw => send_only(addr, cli.how),
            How::UdpConnect => udp_connect(addr),
            how => one(addr, &cli.path, how),
        };
        let line = match result {
            Ok(v) => v,
            Err(err) => {
                serde_json::json!({ "error": err.to_string(), "kind": format!("{:?}", err.kind()) })
            }
        };
        println!("{line}");
    }
}
