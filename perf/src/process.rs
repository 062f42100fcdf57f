//! The processes a measurement runs: waiting for the proxy to be ready, stopping it, its
//! resident set. (`cargo xtask run` uses them too.)
use std::{
    net::SocketAddr,
    process::Child,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use ec2sim::http::{Request, Response};
use nix::sys::signal::Signal;

/// Wait (at most 60 s) until `ready` accepts the proxy's `/readyz` answer on `ops`; the proxy
/// exiting first is an error.
pub fn wait_ready(
    proxy: &mut Child,
    ops: SocketAddr,
    ready: impl Fn(&Response) -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = proxy.try_wait()? {
            bail!("imds-proxy exited with {status} before it was ready");
        }
        let answer = Request::get("/readyz")
            .timeout(Duration::from_secs(2))
            .send(ops);
        if answer.as_ref().is_ok_and(&ready) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("imds-proxy not ready after 60 s: {answer:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// SIGTERM (the proxy detaches), then reap it.
pub fn stop(proxy: &mut Child) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(proxy.id() as i32),
        Signal::SIGTERM,
    );
    let _ = proxy.wait();
}

/// A process's resident set (VmRSS), KiB.
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("VmRSS in /proc/<pid>/status")
}

/// One counter or gauge from the proxy's `/metrics` at `ops`; `None` when it cannot be read.
pub fn metric(ops: std::net::SocketAddr, name: &str) -> Option<u64> {
    let body = Request::get("/metrics").send(ops).ok()?.text();
    ec2sim::http::metric_value(&body, name)
}

/// The `p`th percentile of latencies in microseconds, in milliseconds (NaN for none).
pub fn percentile_ms<T: Copy + Into<u64>>(micros: &[T], p: f64) -> f64 {
    let mut sorted: Vec<u64> = micros.iter().map(|&m| m.into()).collect();
    sorted.sort_unstable();
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i] as f64 / 1000.0
}
