//! The benchmark client, run inside a container: the SDK-style credential fetch (PUT a token, GET
//! the role name, GET the credentials) `--runs` times, one after the other, after `--warmup`
//! unmeasured ones. Prints one JSON object: the duration of every measured fetch in
//! microseconds, and the errors of all (a failed warm-up fetch included).
use std::{net::SocketAddr, time::Instant};

use clap::Parser;
use imds_tests::http::Request;

#[derive(Parser)]
struct Cli {
    #[arg(long, default_value = "169.254.169.254:80")]
    addr: SocketAddr,
    #[arg(long, default_value_t = 100)]
    runs: usize,
    /// Fetches made first and not measured (they fill the proxy's cache for this container).
    #[arg(long, default_value_t = 0)]
    warmup: usize,
}

fn fetch(addr: SocketAddr) -> anyhow::Result<()> {
    let token = Request::put("/latest/api/token")
        .header("X-aws-ec2-metadata-token-ttl-seconds", "21600")
        .send(addr)?;
    anyhow::ensure!(token.status == 200, "token: {}", token.status);
    let token = token.text();
    let role = Request::get("/latest/meta-data/iam/security-credentials/")
        .header("X-aws-ec2-metadata-token", token.as_str())
        .send(addr)?;
    anyhow::ensure!(role.status == 200, "role name: {}", role.status);
    let creds = Request::get(&format!(
        "/latest/meta-data/iam/security-credentials/{}",
        role.text().trim()
    ))
    .header("X-aws-ec2-metadata-token", token.as_str())
    .send(addr)?;
    anyhow::ensure!(creds.status == 200, "credentials: {}", creds.status);
    anyhow::ensure!(
        creds.text().contains("\"AccessKeyId\""),
        "not a credentials document"
    );
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    let mut errors = Vec::new();
    for _ in 0..cli.warmup {
        if let Err(err) = fetch(cli.addr) {
            errors.push(format!("warm-up: {err}"));
        }
    }
    let started = Instant::now();
    let mut micros = Vec::with_capacity(cli.runs);
    for _ in 0..cli.runs {
        let t = Instant::now();
        match fetch(cli.addr) {
            Ok(()) => micros.push(t.elapsed().as_micros() as u64),
            Err(err) => errors.push(err.to_string()),
        }
    }
    println!(
        "{}",
        serde_json::json!({
            "micros": micros,
            "errors": errors,
            "total_micros": started.elapsed().as_micros() as u64,
        })
    );
}
