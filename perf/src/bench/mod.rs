//! `cargo xtask bench`: the cost of the proxy and of each way of redirecting to it, measured from
//! inside a container on docker0.
//!
//! The SDK-style credential fetch (PUT a token, GET the role name, GET the credentials), N times:
//! - the lower bound: the same simulator on the host's loopback, logging off, called from the host;
//! - the docker0 floor: straight to the simulated IMDS, with hop limit 2 so a container can use it;
//! - through imds-proxy behind each of the three redirects, with a warm credential cache (one
//!   unmeasured fetch first, in the measured container):
//!   cgroup mode (connect4 rewrite), tc mode (packet rewrite on docker0), and the seed's iptables
//!   DNAT rule (`-t nat -A PREROUTING -i docker0 -d 169.254.169.254 -p tcp --dport 80 -j DNAT`)
//!   in front of the same proxy;
//! - cold start behind each: the first fetch of containers whose role was never fetched (Docker
//!   lookup and STS on the way).
//!
//! Release builds. Writes docs/benchmarks.md. Not a test: nothing here asserts a time.
use std::{fmt::Write as _, path::Path, process::Command, time::Duration};

use anyhow::{Context as _, ensure};
mod load;
pub use load::Settings as LoadSettings;

use ec2sim::{
    http::Response,
    images::{self, docker, docker_ok},
    launch::Launch,
    scene::{SceneConfig, ensure_imds_is_simulated},
    sim::HttpTokens,
};

const OPS: &str = "127.0.0.1:9182";
/// The proxy's listen addresses for the n-th measurement (n ≥ 1): a fresh pair each time. The
/// proxy closes first, so its side of every connection lingers in TIME_WAIT for 60 s; bench
/// containers all get the same address on docker0 and start with new TCP timestamps, so a SYN that
/// meets one of those (same client address and port, same listen address) is rejected by the PAWS
/// check and retried. On one shared listen address each measurement would pay for the previous
/// one's connections.
fn listen_addresses(n: usize) -> (String, String) {
    (
        format!("169.254.{}.{}:80", 42 + n / 250, n % 250 + 1),
        format!("[fd00:ec2:42::{n:x}]:80"),
    )
}
/// A tc-mode interface pattern no interface on this host has: behind the iptables rule the proxy
/// runs with no eBPF redirect of its own, and still identifies callers by source address.
const NO_INTERFACE: &str = "imds-bench-none";

#[derive(Default)]
struct Sample {
    micros: Vec<u64>,
    total: Duration,
    errors: usize,
}

impl Sample {
    fn percentile(&self, p: f64) -> f64 {
        crate::process::percentile_ms(&self.micros, p)
    }

    /// This sample and `other` as one.
    fn pool(mut self, other: Sample) -> Sample {
        self.micros.extend(other.micros);
        self.total += other.total;
        self.errors += other.errors;
        self
    }

    /// Requests per second: three requests per fetch.
    fn rps(&self) -> f64 {
        3.0 * self.micros.len() as f64 / self.total.as_secs_f64()
    }
}

/// The three ways a container's IMDS connection reaches the proxy.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Redirect {
    Cgroup,
    Tc,
    IptablesDnat,
}

impl Redirect {
    const ALL: [Redirect; 3] = [Redirect::Cgroup, Redirect::Tc, Redirect::IptablesDnat];

    fn key(self) -> &'static str {
        match self {
            Redirect::Cgroup => "cgroup",
            Redirect::Tc => "tc",
            Redirect::IptablesDnat => "iptables",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Redirect::Cgroup => "imds-proxy, cgroup mode (connect4 rewrite)",
            Redirect::Tc => "imds-proxy, tc mode (packet rewrite on docker0)",
            Redirect::IptablesDnat => "imds-proxy behind the iptables DNAT rule (baseline)",
        }
    }

    fn proxy_args(self) -> Vec<&'static str> {
        match self {
            Redirect::Cgroup => vec!["--mode", "cgroup"],
            Redirect::Tc => vec!["--mode", "tc", "--container-iface", "docker0"],
            Redirect::IptablesDnat => vec!["--mode", "tc", "--container-iface", NO_INTERFACE],
        }
    }
}

/// The seed's rule, in the nat table for as long as this value lives (also on error paths).
struct DnatRule {
    spec: Vec<String>,
}

impl DnatRule {
    fn add(to: &str) -> anyhow::Result<Self> {
        let spec: Vec<String> = [
            "-i",
            "docker0",
            "-d",
            "169.254.169.254/32",
            "-p",
            "tcp",
            "--dport",
            "80",
            "-m",
            "comment",
            "--comment",
            "imds-proxy bench",
            "-j",
            "DNAT",
            "--to-destination",
            to,
        ]
        .map(str::to_owned)
        .into();
        // A bench interrupted before its cleanup left the rule behind: remove every copy.
        while Self::iptables("-D", &spec).is_ok() {}
        Self::iptables("-A", &spec).context("adding the iptables DNAT rule")?;
        Ok(Self { spec })
    }

    fn iptables(op: &str, spec: &[String]) -> anyhow::Result<()> {
        let out = Command::new("iptables")
            .args(["-w", "-t", "nat", op, "PREROUTING"])
            .args(spec)
            .output()
            .context("running iptables")?;
        ensure!(
            out.status.success(),
            "iptables {op}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    }

    /// Connections the rule has rewritten (the nat table sees each connection's first packet).
    fn connections(&self) -> anyhow::Result<u64> {
        let out = Command::new("iptables")
            .args(["-w", "-t", "nat", "-L", "PREROUTING", "-v", "-x", "-n"])
            .output()
            .context("running iptables -L")?;
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find(|l| l.contains("imds-proxy bench"))
            .and_then(|l| l.split_whitespace().next()?.parse().ok())
            .context("the DNAT rule's counter")
    }
}

impl Drop for DnatRule {
    fn drop(&mut self) {
        if let Err(err) = Self::iptables("-D", &self.spec) {
            eprintln!("bench: removing the DNAT rule: {err}");
        }
    }
}

/// Run the bench client in a fresh container; `labels` become `--label`s. It makes `warmup`
/// unmeasured fetches first, in the same container (a container's session is its own).
fn in_container(
    image: &str,
    labels: &[String],
    runs: usize,
    warmup: usize,
) -> anyhow::Result<Sample> {
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
        "--warmup".to_owned(),
        warmup.to_string(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    sample(&docker_ok(&args)?)
}

/// The simulator on the host's loopback with its request log off, ready; and its address.
fn loopback_sim(target: &Path) -> anyhow::Result<(std::process::Child, String)> {
    use std::io::BufRead as _;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut sim = Command::new(target.join("imds-sim"))
        .args(["--listen", &addr, "--http-tokens", "required"])
        .env("RUST_LOG", "off")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("starting imds-sim on loopback")?;
    let ready = (|| {
        let mut line = String::new();
        std::io::BufReader::new(sim.stdout.take().context("imds-sim stdout")?)
            .read_line(&mut line)?;
        ensure!(line.trim() == "ready", "imds-sim on loopback: {line:?}");
        Ok(())
    })();
    match ready {
        Ok(()) => Ok((sim, addr)),
        Err(err) => {
            crate::process::stop(&mut sim);
            Err(err)
        }
    }
}

/// The lower bound: the same simulator on the host's loopback with its request log off, and the
/// bench client on the host. No veth, no namespace, no logging.
fn on_loopback(target: &Path, runs: usize) -> anyhow::Result<Sample> {
    let (mut sim, addr) = loopback_sim(target)?;
    let result = (|| {
        let out = Command::new(target.join("imds-bench"))
            .args([
                "--addr",
                &addr,
                "--runs",
                &runs.to_string(),
                "--warmup",
                "1",
            ])
            .output()
            .context("running imds-bench on the host")?;
        ensure!(out.status.success(), "imds-bench: {}", out.status);
        sample(&String::from_utf8_lossy(&out.stdout))
    })();
    crate::process::stop(&mut sim);
    result
}

/// The bench client's JSON report as a sample.
fn sample(out: &str) -> anyhow::Result<Sample> {
    let json: serde_json::Value =
        serde_json::from_str(out.trim()).context("bench client output")?;
    let micros: Vec<u64> = json["micros"]
        .as_array()
        .context("micros")?
        .iter()
        .filter_map(|v| v.as_u64())
        .collect();
    let errors = json["errors"].as_array().map(Vec::len).unwrap_or(0);
    // A run with failed fetches measures something else (their errors are fast): not reported.
    ensure!(
        errors == 0 && !micros.is_empty(),
        "{errors} fetches failed, e.g. {}",
        json["errors"][0]
    );
    Ok(Sample {
        micros,
        total: Duration::from_micros(json["total_micros"].as_u64().unwrap_or(1)),
        errors,
    })
}

struct Measured {
    redirect: Redirect,
    warm: Sample,
    cold: Vec<f64>,
    /// What shows the traffic went the way this row says.
    evidence: String,
}

/// Whether the proxy serves, from its /readyz answer: ready; behind the DNAT rule, where the
/// proxy has no interface of its own attached (so /readyz says 503), Docker and the upstream
/// answering.
fn serving(redirect: Redirect, readyz: &Response) -> bool {
    match redirect {
        Redirect::IptablesDnat => {
            let body = readyz.text();
            body.contains("upstream IMDS: answering")
                && body.contains("container runtime docker: answering")
        }
        _ => readyz.status == 200,
    }
}

fn metric(name: &str) -> Option<u64> {
    crate::process::metric(OPS.parse().ok()?, name)
}

/// The proxy measured: this build's, or `IMDS_BENCH_PROXY` (another build's binary, to compare
/// two builds on the same machine with the same bench).
fn proxy_binary(target: &Path) -> std::path::PathBuf {
    match std::env::var_os("IMDS_BENCH_PROXY") {
        Some(other) => {
            println!("bench: measuring the proxy at {}", other.to_string_lossy());
            other.into()
        }
        None => target.join("imds-proxy"),
    }
}

/// A proxy started for one measurement, behind `redirect` (with the DNAT rule for the baseline);
/// stopped, and the rule removed, when dropped.
struct BenchProxy {
    redirect: Redirect,
    child: std::process::Child,
    rule: Option<DnatRule>,
}

impl BenchProxy {
    fn start(
        target: &Path,
        sts: &str,
        redirect: Redirect,
        (listen_v4, listen_v6): (String, String),
    ) -> anyhow::Result<Self> {
        let rule = match redirect {
            Redirect::IptablesDnat => Some(DnatRule::add(&listen_v4)?),
            _ => None,
        };
        let child = Launch::new()
            .ops(OPS.parse()?)
            .listen(&[&listen_v4, &listen_v6])
            .args(redirect.proxy_args())
            .sts(sts)
            // One container makes every request here, thousands a second: the per-container rate
            // limit (50/s, bursts of 100) would answer most of them 429. What is measured is the
            // path.
            .flag("requests-per-second", 1_000_000)
            .flag("request-burst", 1_000_000)
            .command(proxy_binary(target))
            .spawn()
            .context("starting imds-proxy")?;
        let mut proxy = Self {
            redirect,
            child,
            rule,
        };
        crate::process::wait_ready(&mut proxy.child, OPS.parse()?, |r| serving(redirect, r))?;
        Ok(proxy)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What shows the traffic went the way this redirect says: the kernel's counters.
    fn evidence(&self) -> anyhow::Result<String> {
        let mut evidence = match (&self.rule, self.redirect) {
            (Some(rule), _) => {
                let n = rule.connections()?;
                ensure!(n > 0, "the DNAT rule rewrote no connection");
                format!("the DNAT rule rewrote {n} connections")
            }
            (None, Redirect::Tc) => {
                let n = metric("imds_proxy_tc_packets_total{event=\"redirected\"}")
                    .context("tc redirect counter")?;
                ensure!(n > 0, "tc mode redirected no packet");
                format!("tc ingress rewrote {n} packets")
            }
            _ => {
                let n = metric("imds_proxy_connections_attested_total{by=\"kernel_record\"}")
                    .context("kernel records counter")?;
                ensure!(n > 0, "cgroup mode took no kernel record");
                format!("connect4 rewrote and sock_ops recorded {n} connections")
            }
        };
        if self.redirect != Redirect::Cgroup {
            let by = |how: &str| {
                metric(&format!(
                    "imds_proxy_tc_address_confirmations_total{{by=\"{how}\"}}"
                ))
                .map_or_else(|| "?".to_owned(), |n| n.to_string())
            };
            let _ = write!(
                evidence,
                "; source addresses confirmed by a watch {}, by the kernel {}, by the runtime {}",
                by("watch"),
                by("kernel"),
                by("runtime")
            );
        }
        Ok(evidence)
    }
}

impl Drop for BenchProxy {
    fn drop(&mut self) {
        crate::process::stop(&mut self.child);
    }
}

/// How long STS takes to answer during the cold starts (the fault injector holds each answer).
const SLOW_STS: Duration = Duration::from_millis(300);

fn measure(
    target: &Path,
    sts: &ec2sim::faults::Injector,
    image: &str,
    redirect: Redirect,
    runs: usize,
    cold_starts: usize,
    listen: (String, String),
) -> anyhow::Result<Measured> {
    let result = (|| {
        let proxy = BenchProxy::start(target, &sts.addr().to_string(), redirect, listen)?;
        println!("bench: {}, warm cache, {runs} fetches", redirect.describe());
        let role = format!("iam.amazonaws.com/role=Bench-{}", redirect.key());
        // One unmeasured fetch first, in the measured container: its session (cached per
        // container) is then there for the measured ones.
        let warm = in_container(image, &[role], runs, 1)?;
        let evidence = proxy.evidence()?;
        if cold_starts > 0 {
            println!(
                "bench: {}, cold start, {cold_starts} containers",
                redirect.describe()
            );
        }
        sts.set(ec2sim::faults::Fault::Delay(SLOW_STS));
        let cold = (0..cold_starts)
            .map(|i| {
                let label = format!("iam.amazonaws.com/role=Cold-{}-{i}", redirect.key());
                in_container(image, &[label], 1, 0).map(|s| s.micros[0] as f64 / 1000.0)
            })
            .collect::<anyhow::Result<_>>();
        sts.set(ec2sim::faults::Fault::Pass);
        let cold = cold?;
        Ok::<_, anyhow::Error>(Measured {
            redirect,
            warm,
            cold,
            evidence,
        })
    })();
    result.with_context(|| redirect.describe())
}

/// What `cargo xtask bench` measures.
pub struct Settings {
    /// Single client: fetches per measurement, and rounds.
    pub runs: usize,
    pub rounds: usize,
    /// The load and scale parts (`rounds` 0 skips the load part, `containers` 0 the scale part).
    pub load: load::Settings,
}

/// `target`: the directory of the release binaries (xtask builds them).
pub fn run(root: &Path, target: &Path, settings: &Settings) -> anyhow::Result<()> {
    let (runs, rounds) = (settings.runs, settings.rounds);
    ensure!(
        runs >= 10,
        "--runs: at least 10 for percentiles to mean something"
    );
    ensure!(
        (1..=50).contains(&rounds),
        "--rounds: 1 to 50 (each measurement takes listen addresses of its own)"
    );
    let l = &settings.load;
    ensure!(l.rounds <= 20, "--load-rounds: at most 20");
    ensure!(
        (1..=64).contains(&l.connections),
        "--connections: 1 to 64 (the proxy's per-container connection cap)"
    );
    ensure!(
        (1..=64).contains(&l.calling),
        "--calling: 1 to 64 containers at once"
    );
    ensure!(
        l.containers <= 2000,
        "--containers: at most 2000 (docker0 is a /16, and each holds a session)"
    );
    ensure!(
        l.duration >= Duration::from_secs(1),
        "--duration: at least a second"
    );
    let target = target.to_owned();
    let image = images::bench_image(&target.join("imds-bench"))?;
    let load_image = images::load_image(&target.join("imds-load"))?;
    let scene = SceneConfig::new(target.join("imds-sim"))
        .hop_limit(2)
        .http_tokens(HttpTokens::Required)
        .with_sts()
        .start()?;
    // Every proxy reaches STS through a fault injector: it passes everything, but holds each
    // answer for SLOW_STS during the cold starts.
    let injector =
        ec2sim::faults::Injector::start(scene.sts_endpoint().expect("the scene has an STS"));
    let sts = injector.addr().to_string();

    let measured = (|| {
        let mut floor = Sample::default();
        let mut lower = Sample::default();
        let mut measured: Vec<Measured> = Vec::new();
        for round in 1..=rounds {
            println!("bench: round {round} of {rounds}");
            println!("bench: lower bound (simulator on loopback, logging off), {runs} fetches");
            lower = lower.pool(on_loopback(&target, runs)?);
            println!("bench: floor (simulated IMDS directly, hop limit 2), {runs} fetches");
            floor = floor.pool(in_container(image, &[], runs, 1)?);
            for (i, redirect) in Redirect::ALL.into_iter().enumerate() {
                // Cold starts in the first round only: each needs a role never fetched.
                let cold = if round == 1 { 5 } else { 0 };
                let n = (round - 1) * Redirect::ALL.len() + i + 1;
                let m = measure(
                    &target,
                    &injector,
                    image,
                    redirect,
                    runs,
                    cold,
                    listen_addresses(n),
                )?;
                if round == 1 {
                    measured.push(m);
                } else {
                    let pooled = &mut measured[i];
                    pooled.warm = std::mem::take(&mut pooled.warm).pool(m.warm);
                }
            }
        }
        // Listen addresses after the single-client part's.
        let first = rounds * Redirect::ALL.len() + 1;
        let _room = load::ConntrackRoom::make(1 << 20)?;
        let concurrent = load::concurrent(&target, &sts, load_image, l, first)?;
        let first = first + l.rounds * 2 * Redirect::ALL.len();
        let steps = if l.containers > 0 {
            load::scale(&target, &sts, load_image, l, first)?
        } else {
            Vec::new()
        };
        Ok::<_, anyhow::Error>((lower, floor, measured, concurrent, steps))
    })();
    drop(scene);
    let (lower, floor, measured, concurrent, steps) = measured?;
    let _ = docker(&["rmi", image, load_image]);

    let plot = if steps.is_empty() {
        None
    } else {
        let name = "benchmarks-containers.svg";
        load::plot(&steps, &root.join("docs").join(name))?;
        Some(name)
    };
    let mut report = report(runs, rounds, &lower, &floor, &measured);
    report.push_str(&load::report(l, &concurrent, &steps, plot));
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

fn report(
    runs: usize,
    rounds: usize,
    lower: &Sample,
    floor: &Sample,
    measured: &[Measured],
) -> String {
    let mut out = String::new();
    let date = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
    let _ = writeln!(out, "# Benchmarks\n");
    let _ = writeln!(
        out,
        "Command: `{}` (release builds). Date: {date}.",
        std::env::args()
            .skip(1)
            .fold("cargo xtask".to_owned(), |c, a| c + " " + &a)
    );
    let _ = writeln!(out, "Machine: {}.\n", machine());
    let _ = writeln!(
        out,
        "One fetch = what an SDK does for credentials: PUT a token, GET the role name, GET the \
         credentials; {runs} fetches one after the other, over new connections each time, from \
         inside a container on docker0 (the lower bound: from the host). Each container first \
         makes one fetch that is not measured: a container's session is its own (cached under \
         its session name), so that fetch is its STS call and the measured ones find the cache \
         warm. Each redirect gets a proxy of its own, started fresh. {rounds} rounds, each \
         measuring the two floors and the three redirects in turn, so that noise on the machine \
         falls on all of them; the table pools the rounds ({} fetches a row). The proxy runs with \
         its per-container rate limit raised (one container makes all these requests), and a run \
         in which any fetch fails is not reported.\n",
        runs * rounds
    );
    let _ = writeln!(
        out,
        "Two floors. **The lower bound** is the same simulator on the host's loopback with its \
         request log off, called from the host: no veth, no network namespace, no logging; \
         nothing a container does can be faster. **The docker0 floor** is a container calling \
         the simulated IMDS directly (hop limit 2, as an instance set up for containers without \
         imds-proxy): it crosses docker0 and the simulated host's namespace, and the simulator \
         logs every request, so a redirect that answers on the host (cgroup mode) can beat it. \
         It is the path a container takes without imds-proxy; the ratios are to it.\n"
    );
    let _ = writeln!(
        out,
        "| path | p50 ms | p90 ms | p99 ms | requests/s | errors |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|");
    let rows = [
        (
            "simulated IMDS on the host's loopback, logging off: the lower bound",
            lower,
        ),
        (
            "simulated IMDS from the container (hop limit 2): the docker0 floor",
            floor,
        ),
    ]
    .into_iter()
    .chain(measured.iter().map(|m| (m.redirect.describe(), &m.warm)));
    for (name, s) in rows {
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
    let _ = writeln!(out, "\nRatio to the docker0 floor, warm cache:\n");
    for m in measured {
        let _ = writeln!(
            out,
            "- {}: p50 {:.2}×, p99 {:.2}×, throughput {:.2}× (first round: {}).",
            m.redirect.key(),
            m.warm.percentile(50.0) / floor.percentile(50.0),
            m.warm.percentile(99.0) / floor.percentile(99.0),
            m.warm.rps() / floor.rps(),
            m.evidence
        );
    }
    let _ = writeln!(
        out,
        "\nCold start: the first fetch of a container whose role was never fetched, timed from its \
         first request (its program's first instruction) to the credentials, with STS made slow \
         on purpose: a fault injector holds every STS answer {} ms. The proxy fetches a \
         container's credentials when Docker reports it created, so the STS call runs while \
         Docker sets the container up. Five containers each:\n",
        SLOW_STS.as_millis()
    );
    for m in measured {
        let _ = writeln!(
            out,
            "- {}: {} ms.",
            m.redirect.key(),
            m.cold
                .iter()
                .map(|c| format!("{c:.1}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let _ = writeln!(
        out,
        "\ntc mode and the iptables row run the same proxy code: callers identified by source \
         address, confirmed by the kernel (the container's first process alive in its cgroup, \
         the address local in its network namespace), else by a Docker inspect, and that \
         confirmation then watched (a pidfd of the process, a netlink socket in its namespace) \
         so that the next connections need no /proc reads. Their difference is the redirect alone. cgroup mode reads the kernel's record of \
         the caller's cgroup instead."
    );
    let _ = writeln!(
        out,
        "\nEach measurement gets listen addresses of its own. The proxy closes each connection \
         first, so its side waits in TIME_WAIT for 60 s; bench containers all get the same address \
         on docker0 and new TCP timestamps, and a SYN that meets such a socket (same client \
         address and port) fails the PAWS check and is retried (`TcpExtPAWSTimewait`). Sharing \
         one listen address, each measurement would pay for the previous one's connections."
    );
    out
}
