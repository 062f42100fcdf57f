//! A client for the redirect tests: opens `--count` connections to `--addr` one after the other,
//! and for each prints one JSON line with what getpeername said, the answer's status and body, or
//! the error. Exits 0 whatever happened: the test reads the lines.
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
}

/// A blocking connect that gives up after one SYN retransmission (about 3 s). Not std's
/// `connect_timeout`: when the refusal (RST) arrives after connect(2) returned EINPROGRESS, as it
/// does across a bridge, it reported a timeout here instead of the refusal.
fn connect(addr: SocketAddr) -> Result<TcpStream, std::io::Error> {
    use std::os::fd::AsRawFd as _;
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
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
    socket.connect(&addr.into())?;
    Ok(socket.into())
}

fn one(addr: SocketAddr, path: &str) -> Result<serde_json::Value, std::io::Error> {
    let timeout = Duration::from_secs(5);
    let mut stream = connect(addr)?;
    stream.set_read_timeout(Some(timeout))?;
    let peer = stream.peer_addr()?; // getpeername(2)
    let local = stream.local_addr()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
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

fn main() {
    let cli = Cli::parse();
    for _ in 0..cli.count {
        let line = match one(cli.addr, &cli.path) {
            Ok(v) => v,
            Err(err) => {
                serde_json::json!({ "error": err.to_string(), "kind": format!("{:?}", err.kind()) })
            }
        };
        println!("{line}");
    }
}
