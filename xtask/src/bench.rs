//! `cargo xtask bench`: the cost of the proxy, measured from inside a container.
//!
//! The SDK-style credential fetch (PUT a token, GET the role name, GET the credentials), N times:
//! - the floor: straight to the simulated IMDS, with hop limit 2 so a container can use it;
//! - through imds-proxy (cgroup mode) with a warm credential cache;
//! - cold start: the first fetch of containers whose role was never fetched (STS on the way).
//!
//! Release builds. Writes docs/benchmarks.md. Not a test: nothing here asserts a time.
use std::{fmt::Write as _, path::Path, process::Command, time::Duration};

use anyhow::{Context as _, bail, ensure};
use imds_tests::{
    http::Request,
    images::{self, docker, docker_ok},
    scene::{SceneConfig, ensure_imds_is_simulated},
    sim::HttpTokens,
};

const PREFIX: &str = "arn:aws:iam::123456789012:role/containers/";
const OPS: &str = "127.0.0.1:9182";

struct Sample {
    micros: Vec<u64>,
    total: Duration,
    errors: usize,
}

impl Sample {
    fn percentile(&self, p: f64) -> f64 {
        let mut sorted = self.micros.clone();
        sorted.sort_unstable();
        let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
        sorted[i] as f64 / 1000.0
    }

    /// Requests per second: three requests per fetch.
    fn rps(&self) -> f64 {
        3.0 * self.micros.len() as f64 / self.total.as_secs_f64()
    }
}

/// Run the bench client in a fresh container; `labels` become `--label`s.
fn in_container(image: &str, labels: &[String], runs: usize) -> anyhow::Result<Sample> {
    ensure_imds_is_simulated()?;
    let mut args = vec!["run".to_owned(), "--rm".to_owned()];
    for label in labels {
        args.extend(["--label".to_owned(), label.clone()]);
    }
    args.extend([
        image.to_owned(),
        "/program".to_owned(),
        "--runs".to_owned(),
        runs.to_string(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = docker_ok(&args)?;
    let json: serde_json::Value =
        serde_json::from_str(out.trim()).context("bench client output")?;
    let micros: Vec<u64> = json["micros"]
        .as_array()
        .context("micros")?
        .iter()
        .filter_map(|v| v.as_u64())
        .collect();
    let errors = json["errors"].as_array().map(Vec::len).unwrap_or(0);
    if micros.is_empty() {
        bail!("every fetch failed: {}", json["errors"]);
    }
    Ok(Sample {
        micros,
        total: Duration::from_micros(json["total_micros"].as_u64().unwrap_or(1)),
        errors,
    })
}

pub fn run(root: &Path, runs: usize) -> anyhow::Result<()> {
    ensure!(
        runs >= 10,
        "--runs: at least 10 for percentiles to mean something"
    );
    crate::setup::run(root)?;
    crate::cargo(
        root,
        &[
            "build",
            "--release",
            "--package",
            "imds-proxy",
            "--package",
            "imds-tests",
            "--bins",
        ],
    )?;
    let target = root.join("target/release");
    let image = images::bench_image(&target.join("imds-bench"))?;
    let scene = SceneConfig::new(target.join("imds-sim"))
        .hop_limit(2)
        .http_tokens(HttpTokens::Required)
        .with_sts()
        .start()?;
    let sts = scene.sts_endpoint().expect("the scene has an STS");

    println!("bench: floor (simulated IMDS directly, hop limit 2), {runs} fetches");
    let floor = in_container(image, &[], runs)?;

    let mut proxy = Command::new(target.join("imds-proxy"))
        .args(["run", "--ops-listen", OPS])
        .args([
            "--sts-endpoint",
            &format!("http://{sts}"),
            "--region",
            "us-east-1",
        ])
        .args(["--role-arn-prefix", PREFIX])
        .env("RUST_LOG", "warn")
        .spawn()
        .context("starting imds-proxy")?;
    let result = (|| {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !Request::get("/readyz")
            .send(OPS.parse()?)
            .is_ok_and(|r| r.status == 200)
        {
            ensure!(std::time::Instant::now() < deadline, "imds-proxy not ready");
            std::thread::sleep(Duration::from_millis(200));
        }
        println!("bench: through imds-proxy, warm cache, {runs} fetches");
        // One fetch first, so the measured ones find the role's session cached.
        in_container(image, &["iam.amazonaws.com/role=Bench".into()], 1)?;
        let warm = in_container(image, &["iam.amazonaws.com/role=Bench".into()], runs)?;
        println!("bench: cold start, 5 containers with roles never fetched");
        let cold: Vec<f64> = (0..5)
            .map(|i| {
                in_container(image, &[format!("iam.amazonaws.com/role=Cold{i}")], 1)
                    .map(|s| s.micros[0] as f64 / 1000.0)
            })
            .collect::<anyhow::Result<_>>()?;
        Ok((warm, cold))
    })();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(proxy.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = proxy.wait();
    drop(scene);
    let (warm, cold) = result?;
    let _ = docker(&["rmi", image]);

    let report = report(runs, &floor, &warm, &cold);
    println!("\n{report}");
    let path = root.join("docs/benchmarks.md");
    std::fs::create_dir_all(root.join("docs"))?;
    std::fs::write(&path, report)?;
    println!("bench: written to {}", path.display());
    Ok(())
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let kernel = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    format!("{cpu}, {cores} cores, kernel {kernel}")
}

fn report(runs: usize, floor: &Sample, warm: &Sample, cold: &[f64]) -> String {
    let mut out = String::new();
    let date = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
    let _ = writeln!(out, "# Benchmarks\n");
    let _ = writeln!(
        out,
        "Command: `cargo xtask bench --runs {runs}` (release builds). Date: {date}."
    );
    let _ = writeln!(out, "Machine: {}.\n", machine());
    let _ = writeln!(
        out,
        "One fetch = what an SDK does for credentials: PUT a token, GET the role name, GET the \
         credentials; {runs} fetches one after the other, from inside a container on docker0, \
         over new connections each time.\n"
    );
    let _ = writeln!(
        out,
        "| path | p50 ms | p90 ms | p99 ms | requests/s | errors |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|");
    for (name, s) in [
        ("simulated IMDS directly (hop limit 2): the floor", floor),
        ("imds-proxy, cgroup mode, warm cache", warm),
    ] {
        let _ = writeln!(
            out,
            "| {name} | {:.2} | {:.2} | {:.2} | {:.0} | {} |",
            s.percentile(50.0),
            s.percentile(90.0),
            s.percentile(99.0),
            s.rps(),
            s.errors
        );
    }
    let _ = writeln!(
        out,
        "\nRatio proxy / floor: p50 {:.2}×, p99 {:.2}×, throughput {:.2}×.\n",
        warm.percentile(50.0) / floor.percentile(50.0),
        warm.percentile(99.0) / floor.percentile(99.0),
        warm.rps() / floor.rps()
    );
    let _ = writeln!(
        out,
        "Cold start (first fetch of a container whose role was never fetched: Docker lookup and \
         STS AssumeRole, against the local moto STS), five containers: {} ms.",
        cold.iter()
            .map(|c| format!("{c:.1}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    out
}
