//! The load generator of `cargo xtask bench --load`, run inside containers (and on the host for
//! the lower bound).
//!
//! `imds-load run`: fetch a token and the role name once, then GET the credentials document from
//! `--connections` concurrent clients for `--duration`, either over one kept-alive connection each
//! (`--connection keep-alive`) or over a new connection for every request (`--connection new`,
//! what SDKs do: each request says `Connection: close`, so the server closes first and its side
//! keeps the TIME_WAIT). Prints one JSON object: every request's latency in microseconds (connect
//! included for new connections), the errors, and the measured wall time. A request that fails
//! counts as an error and its latency is not recorded; the client goes on with a new connection.
//!
//! `imds-load idle`: wait to be killed (the N-container bench keeps its containers running with
//! it and `docker exec`s the load into M of them).
use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use clap::{Parser, Subcommand, ValueEnum};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Run(Load),
    Idle,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Connection {
    KeepAlive,
    New,
}

#[derive(clap::Args)]
struct Load {
    #[arg(long, default_value = "169.254.169.254:80")]
    addr: SocketAddr,
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Worker threads of the client.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    #[arg(long, default_value = "8s", value_parser = humantime::parse_duration)]
    duration: Duration,
    #[arg(long, value_enum, default_value = "new")]
    connection: Connection,
    /// Seconds of load before the measured duration (not recorded).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Start measuring at this time (milliseconds since the Unix epoch) instead of after
    /// `--warmup`: clients in several containers, started one after the other, measure the same
    /// window. The load runs from the start.
    #[arg(long)]
    start_at_ms: Option<u64>,
}

/// How long one request may take before it counts as an error.
const REQUEST_LIMIT: Duration = Duration::from_secs(5);

/// One answer: status and body.
struct Answer {
    status: u16,
    body: Vec<u8>,
}

/// Read one HTTP/1.1 answer with a Content-Length (all the IMDS answers have one) from `stream`;
/// `buf` keeps what was read past it.
async fn read_answer(stream: &mut TcpStream, buf: &mut Vec<u8>) -> anyhow::Result<Answer> {
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        ensure!(buf.len() < 64 * 1024, "answer head too large");
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await?;
        ensure!(n > 0, "connection closed before the answer");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = std::str::from_utf8(&buf[..head_end]).context("answer head")?;
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("status line")?;
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .context("no Content-Length")?;
    while buf.len() < head_end + length {
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await?;
        ensure!(n > 0, "connection closed in the body");
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = buf[head_end..head_end + length].to_vec();
    buf.drain(..head_end + length);
    Ok(Answer { status, body })
}

/// One request over a new connection, closed by the server after the answer.
async fn once(addr: SocketAddr, request: &[u8]) -> anyhow::Result<Answer> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    stream.write_all(request).await?;
    read_answer(&mut stream, &mut Vec::new()).await
}

fn request(method: &str, path: &str, headers: &[(&str, &str)], close: bool) -> Vec<u8> {
    let mut r = format!("{method} {path} HTTP/1.1\r\nHost: 169.254.169.254\r\n");
    for (name, value) in headers {
        r.push_str(&format!("{name}: {value}\r\n"));
    }
    if close {
        r.push_str("Connection: close\r\n");
    }
    r.push_str("Content-Length: 0\r\n\r\n");
    r.into_bytes()
}

/// The GET of the credentials document, as this client will send it.
async fn prepare(addr: SocketAddr, close: bool) -> anyhow::Result<Vec<u8>> {
    let token = once(
        addr,
        &request(
            "PUT",
            "/latest/api/token",
            &[("X-aws-ec2-metadata-token-ttl-seconds", "21600")],
            true,
        ),
    )
    .await
    .context("token")?;
    ensure!(token.status == 200, "token: {}", token.status);
    let token = String::from_utf8(token.body)?;
    let path = "/latest/meta-data/iam/security-credentials/";
    let role = once(
        addr,
        &request("GET", path, &[("X-aws-ec2-metadata-token", &token)], true),
    )
    .await
    .context("role name")?;
    ensure!(role.status == 200, "role name: {}", role.status);
    let role = String::from_utf8(role.body)?;
    let get = request(
        "GET",
        &format!("{path}{}", role.trim()),
        &[("X-aws-ec2-metadata-token", &token)],
        close,
    );
    // Once, to check it is a credentials document.
    let creds = once(addr, &request_with_close(&get, close)).await?;
    ensure!(creds.status == 200, "credentials: {}", creds.status);
    ensure!(
        creds.body.windows(13).any(|w| w == b"\"AccessKeyId\""),
        "not a credentials document"
    );
    Ok(get)
}

/// `get` as a request that asks the server to close (for the one-off check).
fn request_with_close(get: &[u8], close: bool) -> Vec<u8> {
    if close {
        return get.to_vec();
    }
    let text = String::from_utf8_lossy(get);
    text.replacen(
        "Content-Length: 0\r\n",
        "Connection: close\r\nContent-Length: 0\r\n",
        1,
    )
    .into_bytes()
}

#[derive(Default)]
struct Tally {
    micros: Vec<u32>,
    errors: Vec<String>,
}

impl Tally {
    fn error(&mut self, err: anyhow::Error) {
        // A sample of the errors is enough to say what went wrong; all are counted.
        if self.errors.len() < 20 {
            self.errors.push(format!("{err:#}"));
        } else {
            self.errors.push(String::new());
        }
    }
}

/// One client until `stop`; records only while `measuring`.
async fn client(
    addr: SocketAddr,
    get: Arc<Vec<u8>>,
    connection: Connection,
    measuring: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) -> Tally {
    let mut tally = Tally::default();
    let mut kept: Option<(TcpStream, Vec<u8>)> = None;
    while !stop.load(Ordering::Relaxed) {
        let t = Instant::now();
        let exchange = async {
            match connection {
                Connection::New => once(addr, &get).await,
                Connection::KeepAlive => {
                    async {
                        if kept.is_none() {
                            let stream = TcpStream::connect(addr).await?;
                            stream.set_nodelay(true)?;
                            kept = Some((stream, Vec::new()));
                        }
                        let (stream, buf) = kept.as_mut().expect("just set");
                        stream.write_all(&get).await?;
                        read_answer(stream, buf).await
                    }
                    .await
                }
            }
        };
        // A request that never ends is an error, not a stalled client.
        let result = tokio::time::timeout(REQUEST_LIMIT, exchange)
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within {REQUEST_LIMIT:?}")));
        let elapsed = t.elapsed();
        let result = result.and_then(|a| match a.status {
            200 => Ok(()),
            status => bail!("status {status}"),
        });
        if result.is_err() {
            kept = None;
        }
        if measuring.load(Ordering::Relaxed) && !stop.load(Ordering::Relaxed) {
            match result {
                Ok(()) => tally
                    .micros
                    .push(u32::try_from(elapsed.as_micros()).unwrap_or(u32::MAX)),
                Err(err) => tally.error(err),
            }
        }
    }
    tally
}

fn run(load: Load) -> anyhow::Result<()> {
    ensure!(load.connections > 0, "--connections: at least one");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(load.threads.max(1))
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let get = Arc::new(prepare(load.addr, load.connection == Connection::New).await?);
        let measuring = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let clients: Vec<_> = (0..load.connections)
            .map(|_| {
                tokio::spawn(client(
                    load.addr,
                    get.clone(),
                    load.connection,
                    measuring.clone(),
                    stop.clone(),
                ))
            })
            .collect();
        let warmup = match load.start_at_ms {
            Some(ms) => (std::time::UNIX_EPOCH + Duration::from_millis(ms))
                .duration_since(std::time::SystemTime::now())
                .unwrap_or_default(),
            None => load.warmup,
        };
        tokio::time::sleep(warmup).await;
        measuring.store(true, Ordering::Relaxed);
        let started = Instant::now();
        tokio::time::sleep(load.duration).await;
        stop.store(true, Ordering::Relaxed);
        let seconds = started.elapsed().as_secs_f64();
        let mut all = Tally::default();
        for c in clients {
            let t = c.await?;
            all.micros.extend(t.micros);
            all.errors.extend(t.errors);
        }
        let error_count = all.errors.len();
        all.errors.retain(|e| !e.is_empty());
        println!(
            "{}",
            serde_json::json!({
                "micros": all.micros,
                "errors": error_count,
                "error_samples": all.errors,
                "seconds": seconds,
            })
        );
        Ok(())
    })
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Run(load) => run(load),
        Command::Idle => loop {
            std::thread::park();
        },
    }
}
