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

fn one(addr: SocketAddr, path: &str) -> Result<serde_json::Value, std::io::Error> {
    let timeout = Duration::from_secs(5);
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
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
