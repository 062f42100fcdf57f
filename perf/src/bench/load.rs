//! The load part of `cargo xtask bench`: many clients at once, over kept-alive and over new
//! connections, against the floors and behind each redirect; then the same with N containers
//! running (each with a role of its own, prefetched) and M of them calling at once.
//!
//! The client is `imds-load` (tests/src/bin), run in containers from the load image. For each
//! measurement: requests per second, latency percentiles, errors, the proxy's RSS and CPU over the
//! measured window, and the kernel counters that show the path taken.
use std::{
    fmt::Write as _,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, bail, ensure};
use ec2sim::images::docker;

use super::{BenchProxy, Redirect, listen_addresses, metric};

/// What the load part measures, from the command line.
#[derive(Clone, Debug)]
pub struct Settings {
    pub connections: usize,
    pub duration: Duration,
    pub rounds: usize,
    /// The largest number of running containers; 0 skips the scale part.
    pub containers: usize,
    /// How many of them call at once.
    pub calling: usize,
}

/// Kept-alive connections, or a new one per request (what SDKs do).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    KeepAlive,
    New,
}

impl Kind {
    const ALL: [Kind; 2] = [Kind::New, Kind::KeepAlive];

    fn arg(self) -> &'static str {
        match self {
            Kind::KeepAlive => "keep-alive",
            Kind::New => "new",
        }
    }
}

/// What is measured: a floor, or a redirect in front of a proxy.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Path_ {
    LowerBound,
    Floor,
    Proxy(Redirect),
}

impl Path_ {
    fn describe(self) -> &'static str {
        match self {
            Path_::LowerBound => "simulated IMDS on the host's loopback: the lower bound",
            Path_::Floor => "simulated IMDS from containers: the floor",
            Path_::Proxy(r) => r.describe(),
        }
    }

    fn key(self) -> &'static str {
        match self {
            Path_::LowerBound => "lower bound",
            Path_::Floor => "floor",
            Path_::Proxy(r) => r.key(),
        }
    }
}

/// One measurement: the clients' pooled results and the proxy's costs.
#[derive(Default)]
pub struct Load {
    micros: Vec<u32>,
    errors: u64,
    error_samples: Vec<String>,
    /// Sum over clients of requests / their measured seconds.
    rps: f64,
    /// Each round's requests per second, before pooling.
    rounds_rps: Vec<f64>,
    /// The proxy's resident memory at the end, and its CPU over the measured window (1.0 = one
    /// core).
    rss_kib: Option<u64>,
    cpu: Option<f64>,
    evidence: String,
    /// Measurements pooled into this one.
    pooled: u32,
}

impl Load {
    fn percentile(&self, p: f64) -> f64 {
        crate::process::percentile_ms(&self.micros, p)
    }

    fn add_client(&mut self, json: &str) -> anyhow::Result<()> {
        let json: serde_json::Value =
            serde_json::from_str(json.trim()).context("load client output")?;
        let micros = json["micros"].as_array().context("micros")?;
        self.micros
            .extend(micros.iter().filter_map(|v| v.as_u64()).map(|v| v as u32));
        self.errors += json["errors"].as_u64().unwrap_or(0);
        if let Some(samples) = json["error_samples"].as_array() {
            self.error_samples
                .extend(samples.iter().filter_map(|s| s.as_str()).map(str::to_owned));
        }
        let seconds = json["seconds"].as_f64().context("seconds")?;
        self.rps += micros.len() as f64 / seconds;
        self.rounds_rps = vec![self.rps];
        Ok(())
    }

    fn pool(&mut self, other: Load) {
        // Rounds: requests per second averaged, the rest pooled.
        let n = f64::from(self.pooled);
        self.rps = (self.rps * n + other.rps) / (n + 1.0);
        self.pooled += 1;
        self.rounds_rps.extend(other.rounds_rps);
        self.micros.extend(other.micros);
        self.errors += other.errors;
        self.error_samples.extend(other.error_samples);
        self.rss_kib = self.rss_kib.max(other.rss_kib);
        self.cpu = match (self.cpu, other.cpu) {
            (Some(a), Some(b)) => Some((a + b) / 2.0),
            (a, b) => a.or(b),
        };
        if self.evidence.is_empty() {
            self.evidence = other.evidence;
        }
    }
}

/// A process's CPU time (user + system) and resident memory, from /proc.
fn usage(pid: u32) -> anyhow::Result<(Duration, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command (which may hold spaces): state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')').context("stat")? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok((
        Duration::from_millis(ticks * 1000 / hz),
        crate::process::rss_kib(pid)?,
    ))
}

/// With `IMDS_BENCH_PERF=<dir>`: `perf record` of process `pid` for `duration`, into a file of
/// its own in that directory (call graphs, 999 Hz).
fn profile(pid: u32, duration: Duration) -> anyhow::Result<Option<Child>> {
    let Some(dir) = std::env::var_os("IMDS_BENCH_PERF") else {
        return Ok(None);
    };
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    std::fs::create_dir_all(&dir)?;
    let out = Path::new(&dir).join(format!("proxy-{n}.data"));
    println!("bench: perf record into {}", out.display());
    Command::new("perf")
        .args(["record", "-F", "999", "-g", "-p", &pid.to_string(), "-o"])
        .arg(&out)
        .args(["--", "sleep", &format!("{}", duration.as_secs_f64())])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(Some)
        .context("starting perf (Debian linux-perf)")
}

/// Milliseconds since the epoch, `after` from now.
fn epoch_ms_in(after: Duration) -> u64 {
    (SystemTime::now() + after)
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

/// The client's arguments.
fn client_args(
    kind: Kind,
    connections: usize,
    duration: Duration,
    start_at_ms: u64,
) -> Vec<String> {
    vec![
        "run".into(),
        "--connection".into(),
        kind.arg().into(),
        "--connections".into(),
        connections.to_string(),
        "--duration".into(),
        format!("{}ms", duration.as_millis()),
        "--start-at-ms".into(),
        start_at_ms.to_string(),
    ]
}

/// The widest local port range for a load client's container (its own network namespace, so
/// nothing of the host's changes): over new connections a client opens thousands a second, and
/// with the default range (32768–60999) it soon reuses a port whose previous connection the
/// server side still holds in TIME_WAIT, where PAWS turns its SYN away and the connect stalls.
const WIDE_PORTS: [&str; 2] = ["--sysctl", "net.ipv4.ip_local_port_range=1024 65535"];

/// Where the clients run.
enum Clients<'a> {
    /// The host, against this address.
    Host(&'a Path, &'a str),
    /// A fresh container per client (`docker run --rm`), with these labels.
    Fresh(&'a str, Vec<String>),
    /// Running containers (`docker exec`).
    Running(&'a [String]),
}

/// Forget the kernel's connection-tracking entries of IMDS connections. A connection whose
/// addresses and ports match an entry still there (TIME_WAIT lasts two minutes in conntrack) gets
/// that entry's NAT decision: a container that called the floor (no NAT) and then opens a
/// connection from the same port behind the DNAT rule bypasses the rule and reaches the
/// simulated IMDS itself. The eBPF redirects decide per socket (connect4) or per packet (tc), so
/// only the baseline needs this; it is done before every measurement all the same.
fn forget_conntrack() -> anyhow::Result<()> {
    // Exit status 1 when there was nothing to delete.
    let out = Command::new("conntrack")
        .args([
            "-D",
            "-p",
            "tcp",
            "--orig-dst",
            "169.254.169.254",
            "--orig-port-dst",
            "80",
        ])
        .output()
        .context("running conntrack (Debian conntrack; `cargo xtask setup` installs it)")?;
    ensure!(
        out.status.code().is_some_and(|c| c <= 1),
        "conntrack -D: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    // Every closed TCP connection's entry too: new connections at 25k a second leave more entries
    // in TIME_WAIT within two minutes than the table holds (nf_conntrack_max, 262144 here), and a
    // full table drops new connections' SYNs (the next measurement's requests then time out).
    let out = Command::new("conntrack")
        .args(["-D", "-p", "tcp", "--state", "TIME_WAIT"])
        .output()
        .context("running conntrack")?;
    ensure!(
        out.status.code().is_some_and(|c| c <= 1),
        "conntrack -D --state TIME_WAIT: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// No TIME_WAIT sockets in the simulated host's namespace while the scale part runs (restored
/// after, panics included). Its containers reach the simulator through Docker's masquerade, so
/// the simulator sees all of them at one address, each with its own TCP timestamp clock: a SYN
/// whose translated ports meet another container's connection in TIME_WAIT fails the PAWS check
/// (`TcpExtPAWSTimewait` in the simulator's namespace rose by 2,100 in one 10-container floor)
/// and is retried after 1 and 3 s; the floor at 10, 100 and 1000 containers fell to 600–4,600
/// requests a second with a p99 of 1–2 s. The real IMDS is no Linux TCP stack with TIME_WAIT.
pub struct NoTimeWaitInSimulator {
    before: String,
}

const TW_BUCKETS: &str = "net.ipv4.tcp_max_tw_buckets";

fn sim_sysctl(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", ec2sim::scene::NETNS, "sysctl", "-n"])
        .args(args)
        .output()
        .context("running sysctl in the simulator's namespace")?;
    ensure!(
        out.status.success(),
        "sysctl {args:?} in {}: {}",
        ec2sim::scene::NETNS,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

impl NoTimeWaitInSimulator {
    pub fn make() -> anyhow::Result<Self> {
        let before = sim_sysctl(&[TW_BUCKETS])?;
        sim_sysctl(&["-w", &format!("{TW_BUCKETS}=0")])?;
        Ok(Self { before })
    }
}

impl Drop for NoTimeWaitInSimulator {
    fn drop(&mut self) {
        if let Err(err) = sim_sysctl(&["-w", &format!("{TW_BUCKETS}={}", self.before)]) {
            eprintln!("bench: could not restore {TW_BUCKETS} in the simulator: {err:#}");
        }
    }
}

/// The kernel's connection-tracking table, made large enough for one measurement's connections
/// for as long as this lives, and given back its size when dropped (a panic included): one
/// measurement over new connections opens 30k connections a second for nine seconds, each kept
/// two minutes in TIME_WAIT, more than the default 262144 entries, and a full table drops SYNs.
pub struct ConntrackRoom {
    before: Option<u64>,
}

const CONNTRACK_MAX: &str = "/proc/sys/net/netfilter/nf_conntrack_max";

impl ConntrackRoom {
    pub fn make(at_least: u64) -> anyhow::Result<Self> {
        let now: u64 = std::fs::read_to_string(CONNTRACK_MAX)
            .with_context(|| format!("reading {CONNTRACK_MAX}"))?
            .trim()
            .parse()
            .with_context(|| format!("parsing {CONNTRACK_MAX}"))?;
        if now >= at_least {
            return Ok(Self { before: None });
        }
        std::fs::write(CONNTRACK_MAX, at_least.to_string())
            .with_context(|| format!("raising {CONNTRACK_MAX} to {at_least}"))?;
        println!("bench: conntrack table raised from {now} to {at_least} entries for the run");
        Ok(Self { before: Some(now) })
    }
}

impl Drop for ConntrackRoom {
    fn drop(&mut self) {
        if let Some(before) = self.before
            && let Err(err) = std::fs::write(CONNTRACK_MAX, before.to_string())
        {
            eprintln!("bench: could not restore {CONNTRACK_MAX} to {before}: {err}");
        }
    }
}

/// Run the clients at once, measuring the same window; CPU and memory of `proxy` over it.
fn drive(
    clients: &Clients,
    kind: Kind,
    connections: usize,
    duration: Duration,
    proxy: Option<u32>,
) -> anyhow::Result<Load> {
    let count = match clients {
        Clients::Running(ids) => ids.len(),
        _ => 1,
    };
    // Time for every client to start (a docker exec takes a while with 2 cores busy), and a
    // second of load before measuring.
    forget_conntrack()?;
    let lead = Duration::from_millis(1500 + 120 * count as u64);
    let start_at = epoch_ms_in(lead);
    let args = client_args(kind, connections, duration, start_at);
    let started = Instant::now();
    let spawn = |cmd: &mut Command| -> anyhow::Result<Child> {
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting the load client")
    };
    let children: Vec<Child> = match clients {
        Clients::Host(bin, addr) => {
            vec![spawn(Command::new(bin).args(&args).args(["--addr", addr]))?]
        }
        Clients::Fresh(image, labels) => {
            let mut cmd = Command::new("docker");
            cmd.args(["run", "--rm"]).args(WIDE_PORTS);
            for label in labels {
                cmd.args(["--label", label]);
            }
            vec![spawn(cmd.args([image, "/program"]).args(&args))?]
        }
        Clients::Running(ids) => ids
            .iter()
            .map(|id| {
                spawn(
                    Command::new("docker")
                        .args(["exec", id, "/program"])
                        .args(&args),
                )
            })
            .collect::<anyhow::Result<_>>()?,
    };
    let mut load = Load::default();
    if let Some(pid) = proxy {
        std::thread::sleep(lead.saturating_sub(started.elapsed()));
        let (cpu0, _) = usage(pid)?;
        let t0 = Instant::now();
        let perf = profile(pid, duration)?;
        std::thread::sleep(duration);
        let (cpu1, rss) = usage(pid)?;
        if let Some(mut perf) = perf {
            let _ = perf.wait();
        }
        load.cpu = Some((cpu1 - cpu0).as_secs_f64() / t0.elapsed().as_secs_f64());
        load.rss_kib = Some(rss);
    }
    for child in children {
        let out = child.wait_with_output()?;
        ensure!(
            out.status.success(),
            "load client: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        load.add_client(&String::from_utf8_lossy(&out.stdout))?;
    }
    Ok(load)
}

/// The lower bound: the simulator on the host's loopback, logging off, the client on the host.
fn lower_bound(target: &Path, kind: Kind, s: &Settings) -> anyhow::Result<Load> {
    let (mut sim, addr) = super::loopback_sim(target)?;
    let result = drive(
        &Clients::Host(&target.join("imds-load"), &addr),
        kind,
        s.connections,
        s.duration,
        None,
    );
    crate::process::stop(&mut sim);
    result
}

/// The measurements of the load part, one per path and kind.
pub struct Measured {
    pub rows: Vec<(Path_, Kind, Load)>,
}

/// The load part: `rounds` rounds, each: both floors, then each redirect with a fresh proxy;
/// each over new connections, then kept-alive ones. Listen addresses from `first_listen` on.
pub fn concurrent(
    target: &Path,
    sts: &str,
    image: &str,
    s: &Settings,
    first_listen: usize,
) -> anyhow::Result<Measured> {
    let mut rows: Vec<(Path_, Kind, Load)> = Vec::new();
    let mut add = |path: Path_, kind: Kind, load: Load| -> anyhow::Result<()> {
        ensure!(
            load.errors == 0,
            "{} ({}): {} requests failed, e.g. {:?}",
            path.describe(),
            kind.arg(),
            load.errors,
            load.error_samples.first()
        );
        // Every round pools into an empty measurement: pooling into the first round's own would
        // weigh it as nothing (its mean of zero rounds).
        match rows.iter_mut().find(|(p, k, _)| *p == path && *k == kind) {
            Some((_, _, pooled)) => pooled.pool(load),
            None => {
                let mut pooled = Load::default();
                pooled.pool(load);
                rows.push((path, kind, pooled));
            }
        }
        Ok(())
    };
    let mut listen = first_listen;
    for round in 1..=s.rounds {
        for kind in Kind::ALL {
            println!(
                "bench: load round {round} of {}, {} connections, {}: floors",
                s.rounds,
                s.connections,
                kind.arg()
            );
            add(Path_::LowerBound, kind, lower_bound(target, kind, s)?)?;
            let floor = drive(
                &Clients::Fresh(image, Vec::new()),
                kind,
                s.connections,
                s.duration,
                None,
            )?;
            add(Path_::Floor, kind, floor)?;
            for redirect in Redirect::ALL {
                println!(
                    "bench: load round {round}, {}: {}",
                    kind.arg(),
                    redirect.describe()
                );
                let proxy = BenchProxy::start(target, sts, redirect, listen_addresses(listen))?;
                listen += 1;
                let label = format!("iam.amazonaws.com/role=Load-{}", redirect.key());
                let mut load = drive(
                    &Clients::Fresh(image, vec![label]),
                    kind,
                    s.connections,
                    s.duration,
                    Some(proxy.pid()),
                )?;
                load.evidence = proxy.evidence()?;
                drop(proxy);
                add(Path_::Proxy(redirect), kind, load)?;
            }
        }
    }
    Ok(Measured { rows })
}

/// Running containers for the scale part, removed when dropped.
struct Fleet {
    image: String,
    ids: Vec<String>,
}

impl Fleet {
    /// Grow to `n` running containers, each with a role of its own; a few `docker run`s at once.
    fn grow_to(&mut self, n: usize) -> anyhow::Result<()> {
        let started = Instant::now();
        let from = self.ids.len();
        let mut next = from;
        while next < n {
            let batch: Vec<usize> = (next..n.min(next + 8)).collect();
            next += batch.len();
            let children: Vec<Child> = batch
                .iter()
                .map(|i| {
                    Command::new("docker")
                        .args(["run", "-d"])
                        .args(WIDE_PORTS)
                        .args(["--label", FLEET_LABEL, "--label"])
                        .arg(format!("iam.amazonaws.com/role=Fleet-{i}"))
                        .args([&self.image, "/program", "idle"])
                        .stdout(Stdio::piped())
                        .stderr(Stdio::piped())
                        .spawn()
                        .map_err(anyhow::Error::from)
                })
                .collect::<anyhow::Result<_>>()?;
            for child in children {
                let out = child.wait_with_output()?;
                ensure!(
                    out.status.success(),
                    "docker run: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
                self.ids
                    .push(String::from_utf8_lossy(&out.stdout).trim().to_owned());
            }
        }
        println!(
            "bench: {} containers running ({} started in {:.0?})",
            self.ids.len(),
            n - from,
            started.elapsed()
        );
        Ok(())
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        // Killed, then removed in one prune: `docker rm -f` of a thousand running containers
        // takes dockerd minutes (and once hung it here).
        let started = Instant::now();
        for chunk in self.ids.chunks(100) {
            let mut args = vec!["kill"];
            args.extend(chunk.iter().map(String::as_str));
            let _ = docker(&args);
        }
        let filter = format!("label={FLEET_LABEL}");
        let _ = docker(&["container", "prune", "-f", "--filter", &filter]);
        println!(
            "bench: {} containers removed in {:.0?}",
            self.ids.len(),
            started.elapsed()
        );
    }
}

/// The label of the scale part's containers (what the cleanup removes).
const FLEET_LABEL: &str = "imds-proxy-bench-fleet";

/// One step of the scale part: `containers` running, `calling` of them at once.
pub struct Step {
    pub containers: usize,
    pub calling: usize,
    pub rows: Vec<(Path_, Load)>,
    /// The proxies' RSS once every container's credentials were cached, before the load.
    pub idle_rss_kib: Vec<(Redirect, u64)>,
}

/// Wait until the proxy has credentials cached for at least `n` sessions.
fn wait_cached(n: usize) -> anyhow::Result<Duration> {
    let started = Instant::now();
    loop {
        let cached = metric("imds_proxy_credential_cache_sessions").unwrap_or(0) as usize;
        if cached >= n {
            return Ok(started.elapsed());
        }
        if started.elapsed() > Duration::from_secs(300) {
            bail!("{cached} of {n} containers' credentials cached after 300 s");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The container counts measured: 1, 10, 100, ... up to `max`, and `max`.
fn steps(max: usize) -> Vec<usize> {
    let mut steps: Vec<usize> = std::iter::successors(Some(1usize), |n| n.checked_mul(10))
        .take_while(|n| *n < max)
        .collect();
    steps.push(max);
    steps
}

/// The scale part: for each step, grow the fleet; the floor, then each redirect with a fresh
/// proxy that first caches every container's credentials; the last `calling` containers call
/// at once over new connections, one connection each (at least `calling` connections in all).
pub fn scale(
    target: &Path,
    sts: &str,
    image: &str,
    s: &Settings,
    first_listen: usize,
) -> anyhow::Result<Vec<Step>> {
    let mut fleet = Fleet {
        image: image.to_owned(),
        ids: Vec::new(),
    };
    let mut listen = first_listen;
    let mut out = Vec::new();
    let _no_time_wait = NoTimeWaitInSimulator::make()?;
    for n in steps(s.containers) {
        fleet.grow_to(n)?;
        let calling = s.calling.min(n);
        let connections = s.calling.div_ceil(calling);
        let callers = &fleet.ids[n - calling..];
        println!(
            "bench: {n} containers, {calling} calling with {connections} connections each: floor"
        );
        let mut step = Step {
            containers: n,
            calling,
            rows: Vec::new(),
            idle_rss_kib: Vec::new(),
        };
        let floor = drive(
            &Clients::Running(callers),
            Kind::New,
            connections,
            s.duration,
            None,
        )?;
        ensure!(
            floor.few_errors(),
            "floor at {n}: {} failed, e.g. {:?}",
            floor.errors,
            floor.error_samples.first()
        );
        step.rows.push((Path_::Floor, floor));
        for redirect in Redirect::ALL {
            println!("bench: {n} containers: {}", redirect.describe());
            let proxy = BenchProxy::start(target, sts, redirect, listen_addresses(listen))?;
            listen += 1;
            let took = wait_cached(n)?;
            let (_, idle_rss) = usage(proxy.pid())?;
            println!(
                "bench: {n} containers' credentials cached in {took:.1?}; proxy RSS {idle_rss} KiB"
            );
            step.idle_rss_kib.push((redirect, idle_rss));
            let mut load = drive(
                &Clients::Running(callers),
                Kind::New,
                connections,
                s.duration,
                Some(proxy.pid()),
            )?;
            load.evidence = proxy.evidence()?;
            drop(proxy);
            ensure!(
                load.few_errors(),
                "{} at {n}: {} failed, e.g. {:?}",
                redirect.describe(),
                load.errors,
                load.error_samples.first()
            );
            step.rows.push((Path_::Proxy(redirect), load));
        }
        out.push(step);
    }
    drop(fleet);
    Ok(out)
}

/// In the scale part, a measurement may lose one request in this many and still be reported (with
/// its errors counted in the table): a hundred or a thousand containers opening thousands of
/// connections a second on two cores lose the odd connection (no answer within 5 s), the floor
/// with no proxy as well (1 of ~180k at 100 containers, 1 in a few thousand at 1000). More fails
/// the bench.
const TOLERATED_ERRORS_PER: u64 = 1_000;

/// Rounds whose requests per second differ by more than this are not reported: the machine was
/// busy with something else in one of them (or the new-connection path stalled on TIME_WAIT and
/// PAWS), and their mean would say nothing.
pub const MAX_SPREAD: f64 = 1.5;

impl Load {
    /// The largest round's requests per second over the smallest's (1 for one round).
    pub fn spread(&self) -> f64 {
        let max = self.rounds_rps.iter().copied().fold(f64::MIN, f64::max);
        let min = self.rounds_rps.iter().copied().fold(f64::MAX, f64::min);
        if self.rounds_rps.is_empty() || min <= 0.0 {
            return 1.0;
        }
        max / min
    }

    /// Whether its failed requests are few enough to report it (they are, in its errors column).
    fn few_errors(&self) -> bool {
        let all = self.micros.len() as u64 + self.errors;
        self.errors * TOLERATED_ERRORS_PER <= all
    }

    /// Whether its rounds agree well enough to be reported.
    pub fn stable(&self) -> bool {
        self.spread() <= MAX_SPREAD
    }
}

/// The proxy's RSS (MiB), CPU (% of a core) and CPU per request (µs), as table cells.
fn cost(load: &Load) -> String {
    match (load.rss_kib, load.cpu) {
        (Some(rss), Some(cpu)) => format!(
            "{:.1} | {:.0}% | {:.0}",
            rss as f64 / 1024.0,
            cpu * 100.0,
            cpu * 1e6 / load.rps
        ),
        _ => "– | – | –".to_owned(),
    }
}

/// The report's load sections (markdown); `plot` is the SVG's file name, beside the report.
pub fn report(s: &Settings, measured: &Measured, steps: &[Step], plot: Option<&str>) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n## Under load\n\n{} clients at once for {:.0?} a measurement (after a second of \
         unmeasured load), GET of the credentials document with a token fetched once; {} rounds, \
         pooled (requests per second: their mean). Over **new connections** every request opens \
         its own connection and asks the server to close it, as SDKs do; over **kept-alive** \
         connections each client sends its requests one after the other on one connection. \
         Proxy RSS at the end of the measurement, proxy CPU over it (100% = one core of two; the \
         client and the simulator share the same two cores). The lower bound runs client and \
         simulator on the host's loopback; every other row runs the client in a container on \
         docker0.\n",
        s.connections, s.duration, s.rounds
    );
    let floor = |kind: Kind| {
        measured
            .rows
            .iter()
            .find(|(p, k, _)| *p == Path_::Floor && *k == kind)
            .map(|(_, _, l)| l)
    };
    for kind in Kind::ALL {
        let _ = writeln!(
            out,
            "### {}\n\n| path | req/s | rounds' spread | × floor | p50 ms | p90 ms | p99 ms | max ms \
             | p99 × floor | errors | proxy RSS MiB | proxy CPU | proxy CPU µs/request |\n|---|---:\
             |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            match kind {
                Kind::New => "New connection per request",
                Kind::KeepAlive => "Kept-alive connections",
            }
        );
        let floor = floor(kind);
        for (path, _, load) in measured.rows.iter().filter(|(_, k, _)| *k == kind) {
            if !load.stable() || floor.is_some_and(|f| !f.stable()) {
                let _ = writeln!(
                    out,
                    "| {} | not reported: its rounds ({}) or the floor's differ by more than \
                     {MAX_SPREAD}× | {:.2}× | | | | | | | | | | |",
                    path.describe(),
                    load.rounds_rps
                        .iter()
                        .map(|r| format!("{r:.0}"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    load.spread(),
                );
                continue;
            }
            let ratio = |f: &dyn Fn(&Load) -> f64| {
                floor.map_or_else(|| "–".to_owned(), |fl| format!("{:.2}", f(load) / f(fl)))
            };
            let _ = writeln!(
                out,
                "| {} | {:.0} | {:.2}× | {} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} | {} |",
                path.describe(),
                load.rps,
                load.spread(),
                ratio(&|l| l.rps),
                load.percentile(50.0),
                load.percentile(90.0),
                load.percentile(99.0),
                load.percentile(100.0),
                ratio(&|l| l.percentile(99.0)),
                load.errors,
                cost(load)
            );
        }
        let _ = writeln!(out);
    }
    let _ = writeln!(
        out,
        "Before every measurement the bench deletes the kernel's connection-tracking entries of \
         IMDS connections (`conntrack -D --orig-dst 169.254.169.254`). Behind the DNAT rule, a new \
         connection whose addresses and ports match an entry left by an earlier connection that \
         was not rewritten (conntrack keeps TIME_WAIT entries for two minutes) inherits that \
         entry's absence of NAT and reaches the instance's IMDS itself: in a first version of \
         this bench the floor's entries let most of the DNAT row's requests through to the \
         simulator (answered 401, its token being the proxy's). The seed's rule can be bypassed \
         that way; the eBPF redirects decide per socket (connect4) or per packet (tc) and keep \
         no such state. It also deletes every TCP entry in TIME_WAIT, and raises the table's size \
         (`nf_conntrack_max`) to 1048576 entries for the run: at tens of thousands of new \
         connections a second, two minutes of them fill the default 262144, and a full table \
         drops new connections' SYNs.\n"
    );
    let _ = writeln!(
        out,
        "What shows the path taken (kernel counters, first round):\n"
    );
    for (path, kind, load) in &measured.rows {
        if !load.evidence.is_empty() && *kind == Kind::New {
            let _ = writeln!(out, "- {}: {}.", path.key(), load.evidence);
        }
    }
    if steps.is_empty() {
        return out;
    }
    let _ = writeln!(
        out,
        "\n## With many containers\n\nN containers running, each with a role of its own; every \
         proxy is started fresh and first caches every container's credentials (prefetch at \
         start). Then {} of them (fewer when fewer run) call at once for {:.0?}, new connection \
         per request, {} connections in all. Proxy RSS before the load is with every \
         container's credentials cached. A row may have lost at most one request in \
         {TOLERATED_ERRORS_PER} (its errors column; the floor's too), or the bench fails.\n",
        s.calling, s.duration, s.calling
    );
    if let Some(plot) = plot {
        let _ = writeln!(out, "![latency against containers]({plot})\n");
    }
    let _ = writeln!(
        out,
        "| containers | calling | path | req/s | × floor | p50 ms | p99 ms | p99 × floor | max ms \
         | errors | proxy RSS MiB (idle) | proxy RSS MiB | proxy CPU | proxy CPU µs/request |\n\
         |---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for step in steps {
        let floor = step
            .rows
            .iter()
            .find(|(p, _)| *p == Path_::Floor)
            .map(|(_, l)| l);
        for (path, load) in &step.rows {
            let idle = match path {
                Path_::Proxy(r) => step
                    .idle_rss_kib
                    .iter()
                    .find(|(x, _)| x == r)
                    .map_or("–".to_owned(), |(_, k)| {
                        format!("{:.1}", *k as f64 / 1024.0)
                    }),
                _ => "–".to_owned(),
            };
            let ratio = |f: &dyn Fn(&Load) -> f64| {
                floor.map_or_else(|| "–".to_owned(), |fl| format!("{:.2}", f(load) / f(fl)))
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {:.0} | {} | {:.2} | {:.2} | {} | {:.2} | {} | {idle} | {} |",
                step.containers,
                step.calling,
                path.key(),
                load.rps,
                ratio(&|l| l.rps),
                load.percentile(50.0),
                load.percentile(99.0),
                ratio(&|l| l.percentile(99.0)),
                load.percentile(100.0),
                load.errors,
                cost(load)
            );
        }
    }
    let _ = writeln!(out, "\nWhat shows the path taken at the largest step:\n");
    if let Some(step) = steps.last() {
        for (path, load) in &step.rows {
            if !load.evidence.is_empty() {
                let _ = writeln!(out, "- {}: {}.", path.key(), load.evidence);
            }
        }
    }
    out
}

/// Latency percentiles (p50 solid, p99 dashed) against running containers, one colour a path.
pub fn plot(steps: &[Step], to: &Path) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let root = SVGBackend::new(to, (900, 520)).into_drawing_area();
    let draw = || -> Result<(), Box<dyn std::error::Error + '_>> {
        root.fill(&WHITE)?;
        let max_n = steps.last().map_or(1, |s| s.containers) as f64;
        let max_ms = steps
            .iter()
            .flat_map(|s| s.rows.iter().map(|(_, l)| l.percentile(99.0)))
            .fold(0.0f64, f64::max)
            * 1.15;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "Latency against running containers (new connection per request)",
                ("sans-serif", 20),
            )
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(60)
            .build_cartesian_2d((1f64..max_n.max(10.0)).log_scale(), 0f64..max_ms.max(0.1))?;
        chart
            .configure_mesh()
            .x_desc("containers running")
            .y_desc("latency, ms")
            .draw()?;
        let paths = [
            Path_::Floor,
            Path_::Proxy(Redirect::Cgroup),
            Path_::Proxy(Redirect::Tc),
            Path_::Proxy(Redirect::IptablesDnat),
        ];
        for (i, path) in paths.into_iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            for (p, dashed) in [(50.0, false), (99.0, true)] {
                let points: Vec<(f64, f64)> = steps
                    .iter()
                    .filter_map(|s| {
                        let (_, l) = s.rows.iter().find(|(x, _)| *x == path)?;
                        Some((s.containers as f64, l.percentile(p)))
                    })
                    .collect();
                let style = ShapeStyle::from(color).stroke_width(2);
                let label = format!("{} p{p}", path.key());
                if dashed {
                    chart
                        .draw_series(DashedLineSeries::new(points.clone(), 6, 4, style))?
                        .label(label)
                        .legend(move |(x, y)| {
                            PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(1))
                        });
                } else {
                    chart
                        .draw_series(LineSeries::new(points.clone(), style))?
                        .label(label)
                        .legend(move |(x, y)| {
                            PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
                        });
                }
                chart.draw_series(
                    points
                        .iter()
                        .map(|&(x, y)| Circle::new((x, y), 3, color.filled())),
                )?;
            }
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| anyhow::anyhow!("drawing {}: {e}", to.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_powers_of_ten_then_the_largest() {
        assert_eq!(steps(1000), vec![1, 10, 100, 1000]);
        assert_eq!(steps(250), vec![1, 10, 100, 250]);
        assert_eq!(steps(1), vec![1]);
    }

    #[test]
    fn clients_pool_and_rounds_average() {
        let mut a = Load::default();
        a.add_client(r#"{"micros":[100,200,300],"errors":0,"error_samples":[],"seconds":1.0}"#)
            .unwrap();
        a.add_client(r#"{"micros":[400],"errors":1,"error_samples":["x"],"seconds":2.0}"#)
            .unwrap();
        assert_eq!(a.rps, 3.5);
        assert_eq!(a.errors, 1);
        assert_eq!(a.percentile(100.0), 0.4);
        let mut pooled = Load::default();
        pooled.pool(a);
        let mut b = Load::default();
        b.add_client(r#"{"micros":[1],"errors":0,"seconds":1.0}"#)
            .unwrap();
        pooled.pool(b);
        assert_eq!(pooled.rps, (3.5 + 1.0) / 2.0);
        assert_eq!(pooled.micros.len(), 5);
        // Rounds of 3.5 and 1 request a second: 3.5× apart, not reported.
        assert_eq!(pooled.rounds_rps, [3.5, 1.0]);
        assert_eq!(pooled.spread(), 3.5);
        assert!(!pooled.stable());
    }

    #[test]
    fn a_row_may_lose_one_request_in_a_thousand() {
        let mut load = Load {
            micros: vec![100; 999],
            errors: 1,
            ..Load::default()
        };
        assert!(load.few_errors());
        load.errors = 2;
        assert!(!load.few_errors());
    }
}
