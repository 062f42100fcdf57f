//! `cargo xtask soak`: the proxy (release build, cgroup mode) on the simulated EC2 host under
//! mixed load for `--minutes`, then a walk through the faults of its peers. Writes
//! docs/reliability.md. Not part of `cargo xtask test`.
//!
//! - Soak: four containers ask for their roles' credentials and a pass-through path in a loop
//!   (about 20 requests a second each), while containers with roles are started and removed one
//!   after the other. Every 10 s: the proxy's RSS, open file descriptors, credential cache keys
//!   and indexed containers. It fails if RSS grows by more than 16 MiB or the descriptors by more
//!   than 16 from the first sample after the warm-up minute, or if a loop request was not served.
//! - Fault walk: with a fault injector between the proxy and STS, then the upstream IMDS: for
//!   each fault, what a container sees (a role already cached, a role never fetched, a
//!   pass-through path), how long its answer took, and once the fault is lifted how long until
//!   a new role is served.
use std::{
    fmt::Write as _,
    path::Path,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use ec2sim::{
    faults::{Fault, Injector},
    images::{curl_image, docker, docker_ok},
    launch::Launch,
    scene::{SceneConfig, ensure_imds_is_simulated, imds_v4},
    sim::HttpTokens,
};

const OPS: &str = "127.0.0.1:9183";
const IMDS: &str = "http://169.254.169.254";
const CREDENTIALS: &str = "/latest/meta-data/iam/security-credentials/";

/// A container of the curl image; removed on drop.
struct Container(String);

impl Container {
    fn start(role: &str, command: &[&str]) -> anyhow::Result<Self> {
        ensure_imds_is_simulated()?;
        let label = format!("iam.amazonaws.com/role={role}");
        let mut args = vec!["run", "-d", "--label", &label, curl_image()?];
        args.extend_from_slice(command);
        Ok(Self(docker_ok(&args)?.trim().to_owned()))
    }

    fn exec(&self, script: &str) -> anyhow::Result<String> {
        ensure_imds_is_simulated()?;
        let out = docker(&["exec", &self.0, "sh", "-c", script])?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// One request with a token, as an SDK asks: (status, seconds curl measured).
    fn ask(&self, path: &str) -> anyhow::Result<(u16, f64)> {
        let out = self.exec(&format!(
            "T=$(curl -s -m 10 -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' {IMDS}/latest/api/token)
             curl -s -m 10 -o /dev/null -w '%{{http_code}} %{{time_total}}' -H \"X-aws-ec2-metadata-token: $T\" {IMDS}{path}"
        ))?;
        let mut fields = out.split_whitespace();
        let status = fields.next().context("curl status")?.parse()?;
        let seconds = fields.next().context("curl time")?.parse()?;
        Ok((status, seconds))
    }
}

impl Container {
    /// A container running a status loop (`/tmp/statuses`, until `/tmp/stop`): stop it, wait for
    /// it to exit, and read what it recorded.
    fn stop_loop(&self) -> anyhow::Result<String> {
        self.exec("touch /tmp/stop")?;
        docker_ok(&["wait", &self.0])?;
        let copy = std::env::temp_dir().join(format!("imds-soak-{}", self.0));
        docker_ok(&[
            "cp",
            &format!("{}:/tmp/statuses", self.0),
            copy.to_str().context("temp path")?,
        ])?;
        let text = std::fs::read_to_string(&copy)?;
        let _ = std::fs::remove_file(&copy);
        Ok(text)
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = docker(&["rm", "-f", &self.0]);
    }
}

fn metric(name: &str) -> anyhow::Result<u64> {
    crate::process::metric(OPS.parse()?, name).with_context(|| format!("no {name} in /metrics"))
}

/// The proxy's resources at one moment of the soak.
struct Reading {
    at: Duration,
    rss_kib: u64,
    fds: usize,
    cache_keys: u64,
    containers: u64,
}

fn sample(pid: u32, started: Instant) -> anyhow::Result<Reading> {
    let rss_kib = crate::process::rss_kib(pid)?;
    Ok(Reading {
        at: started.elapsed(),
        rss_kib,
        fds: std::fs::read_dir(format!("/proc/{pid}/fd"))?.count(),
        cache_keys: metric("imds_proxy_credential_cache_keys")?,
        containers: metric("imds_proxy_containers")?,
    })
}

/// What a container saw of one fault.
struct Walked {
    fault: &'static str,
    cached: (u16, f64),
    fresh: (u16, f64),
    passthrough: (u16, f64),
    recovery: Duration,
    /// For the process faults: a loop's requests, how many were not served, and how.
    /// and what `recovery` measured.
    loop_requests: Option<(usize, usize, &'static str, &'static str)>,
}

/// `target`: the directory of the release binaries (xtask builds them).
pub fn run(root: &Path, target: &Path, minutes: u64) -> anyhow::Result<()> {
    ensure!((1..=120).contains(&minutes), "--minutes: 1 to 120");
    let target = target.to_owned();
    let scene = SceneConfig::new(target.join("imds-sim"))
        .http_tokens(HttpTokens::Optional)
        .with_sts()
        .start()?;
    ensure_imds_is_simulated()?;
    let sts = Injector::start(scene.sts_endpoint().context("the scene's STS")?);
    let upstream = Injector::start(imds_v4());
    let (sts_url, upstream_url) = (sts.url(), upstream.url());
    let spawn = || -> anyhow::Result<std::process::Child> {
        let mut proxy = Launch::new()
            .ops(OPS.parse()?)
            .flag("pin", PIN)
            .interface(INTERFACE)
            .listen(&["169.254.44.1:80", "[fd00:ec2:44::1]:80"])
            .sts(&sts_url)
            .flag("upstream", &upstream_url)
            .command(target.join("imds-proxy"))
            .spawn()
            .context("starting imds-proxy")?;
        crate::process::wait_ready(&mut proxy, OPS.parse()?, |r| r.status == 200)?;
        Ok(proxy)
    };
    let _ = std::fs::remove_dir_all(PIN);
    let mut proxy = spawn()?;
    let result = (|| {
        let samples = soak(proxy.id(), minutes)?;
        let mut walked = walk(&sts, &upstream)?;
        walked.push(killed(&mut proxy, &spawn, &scene)?);
        walked.push(engine_restart()?);
        let report = report(minutes, &samples, &walked);
        let path = root.join("docs/reliability.md");
        std::fs::write(&path, &report)?;
        println!("\n{report}\nsoak: written to {}", path.display());
        check(&samples)
    })();
    crate::process::stop(&mut proxy);
    // Pinned: the stop left everything attached; detach removes it.
    let detached = Command::new(target.join("imds-proxy"))
        .args(["detach", "--pin", PIN, "--interface", INTERFACE])
        .status();
    if !detached.is_ok_and(|s| s.success()) {
        eprintln!("soak: imds-proxy detach --pin {PIN} failed: remove it by hand");
    }
    drop(scene);
    result
}

const PIN: &str = "/sys/fs/bpf/imds-soak";
const INTERFACE: &str = "imds-soak0";

/// A container whose own process asks for `role`'s credentials about 20 times a second until
/// stopped, one status line (`<http code> <curl exit>`) per request.
struct Loop(Container);

impl Loop {
    fn start(role: &str) -> anyhow::Result<Self> {
        let script = format!(
            "while [ ! -e /tmp/stop ]; do
               curl -s -m 5 -o /dev/null -w '%{{http_code}} %{{exitcode}}\\n' {IMDS}{CREDENTIALS}{role} >> /tmp/statuses
               sleep 0.05
             done"
        );
        Ok(Self(Container::start(role, &["sh", "-c", &script])?))
    }

    fn served(&self) -> anyhow::Result<usize> {
        Ok(self
            .0
            .exec("cat /tmp/statuses 2>/dev/null")?
            .lines()
            .filter(|l| l.starts_with("200 "))
            .count())
    }

    /// Wait until `n` more requests have been served (at most 60 s).
    fn until_more_served(&self, n: usize) -> anyhow::Result<()> {
        let start = self.served()?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.served()? < start + n {
            ensure!(Instant::now() < deadline, "the loop is not served");
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// Stop; every status line.
    fn stop(self) -> anyhow::Result<Vec<String>> {
        Ok(self.0.stop_loop()?.lines().map(str::to_owned).collect())
    }
}

/// SIGKILL under load, then a restart that adopts the pins.
fn killed(
    proxy: &mut std::process::Child,
    spawn: &dyn Fn() -> anyhow::Result<std::process::Child>,
    scene: &ec2sim::scene::Scene,
) -> anyhow::Result<Walked> {
    println!("soak: fault: the proxy SIGKILLed under load");
    let load = Loop::start("Killed")?;
    load.until_more_served(20)?;
    proxy.kill()?;
    proxy.wait()?;
    let killed = Instant::now();
    *proxy = spawn()?;
    let back = killed.elapsed();
    load.until_more_served(20)?;
    let statuses = load.stop()?;
    let lost = statuses.iter().filter(|l| !l.starts_with("200 ")).count();
    let leaked = scene
        .sim_requests()
        .iter()
        .filter(|l| l.contains("Killed"))
        .count();
    ensure!(leaked == 0, "{leaked} requests reached the instance's IMDS");
    Ok(Walked {
        fault: "the proxy SIGKILLed under load (`--pin`), restarted at once",
        cached: (0, 0.0),
        fresh: (0, 0.0),
        passthrough: (0, 0.0),
        recovery: back,
        loop_requests: Some((
            statuses.len(),
            lost,
            "refused or reset; none reached the instance's IMDS",
            "from the kill until the restarted proxy served",
        )),
    })
}

/// The Docker engine (live restore) away for 3 s under load.
fn engine_restart() -> anyhow::Result<Walked> {
    use ec2sim::images::{start_dockerd, start_dockerd_with, stop_docker};
    println!("soak: fault: the Docker engine restarted under load");
    stop_docker()?;
    start_dockerd_with(false, &["--live-restore"])?;
    let result = (|| {
        let load = Loop::start("Engine")?;
        load.until_more_served(20)?;
        stop_docker()?;
        let stopped = Instant::now();
        std::thread::sleep(Duration::from_secs(3));
        start_dockerd_with(false, &["--live-restore"])?;
        let away = stopped.elapsed();
        let fresh = Container::start("AfterEngine", &["sleep", "3600"])?;
        let fresh_answer = fresh.ask(&format!("{CREDENTIALS}AfterEngine"))?;
        load.until_more_served(20)?;
        let statuses = load.stop()?;
        let lost = statuses.iter().filter(|l| !l.starts_with("200 ")).count();
        Ok(Walked {
            fault: "the Docker engine stopped for 3 s under load (live restore), then started",
            cached: (0, 0.0),
            fresh: fresh_answer,
            passthrough: (0, 0.0),
            recovery: away,
            loop_requests: Some((statuses.len(), lost, "not served", "the engine away")),
        })
    })();
    stop_docker()?;
    start_dockerd(false)?;
    result
}

/// Mixed load for `minutes`; the samples taken every 10 s (the first minute is the warm-up).
fn soak(pid: u32, minutes: u64) -> anyhow::Result<(Vec<Reading>, usize, Vec<String>)> {
    println!("soak: {minutes} min of mixed load");
    let script = |role: &str| {
        format!(
            "while [ ! -e /tmp/stop ]; do
               curl -s -m 5 -o /dev/null -w '%{{http_code}}\\n' {IMDS}{CREDENTIALS}{role} >> /tmp/statuses
               curl -s -m 5 -o /dev/null -w '%{{http_code}}\\n' {IMDS}/latest/meta-data/instance-id >> /tmp/statuses
               sleep 0.1
             done"
        )
    };
    let loops: Vec<Container> = (0..4)
        .map(|i| {
            let role = format!("Soak{i}");
            Container::start(&role, &["sh", "-c", &script(&role)])
        })
        .collect::<anyhow::Result<_>>()?;
    let stop = Arc::new(AtomicBool::new(false));
    let churned = Arc::new(AtomicUsize::new(0));
    let churn = {
        let (stop, churned) = (stop.clone(), churned.clone());
        std::thread::spawn(move || -> anyhow::Result<()> {
            let image = curl_image()?;
            while !stop.load(Ordering::SeqCst) {
                let n = churned.fetch_add(1, Ordering::SeqCst);
                let label = format!("iam.amazonaws.com/role=Churn{}", n % 50);
                ensure_imds_is_simulated()?;
                docker_ok(&["run", "--rm", "--label", &label, image, "true"])?;
            }
            Ok(())
        })
    };
    let started = Instant::now();
    let mut samples = Vec::new();
    while started.elapsed() < Duration::from_secs(minutes * 60) {
        std::thread::sleep(Duration::from_secs(10));
        let s = sample(pid, started)?;
        println!(
            "soak: {:>4.0}s RSS {} KiB, fds {}, cache keys {}, containers {}",
            s.at.as_secs_f64(),
            s.rss_kib,
            s.fds,
            s.cache_keys,
            s.containers
        );
        samples.push(s);
    }
    stop.store(true, Ordering::SeqCst);
    churn
        .join()
        .map_err(|_| anyhow::anyhow!("churn thread panicked"))??;
    let mut failed = Vec::new();
    let mut requests = 0;
    for c in &loops {
        let text = c.stop_loop()?;
        requests += text.lines().count();
        failed.extend(text.lines().filter(|l| *l != "200").map(str::to_owned));
    }
    println!(
        "soak: {requests} loop requests, {} not served; {} containers churned",
        failed.len(),
        churned.load(Ordering::SeqCst)
    );
    Ok((samples, requests, failed))
}

/// Each fault in turn: set, observe, lift, time the recovery.
fn walk(sts: &Injector, upstream: &Injector) -> anyhow::Result<Vec<Walked>> {
    let cached = Container::start("Cached", &["sleep", "3600"])?;
    until_served(&cached, "Cached", Duration::from_secs(30))?;
    let faults: [(&'static str, &Injector, Fault); 5] = [
        ("STS accepts connections, never answers", sts, Fault::Hang),
        (
            "STS answers after 3 s",
            sts,
            Fault::Delay(Duration::from_secs(3)),
        ),
        ("STS refuses connections", sts, Fault::Refuse),
        (
            "STS answers 500 InternalFailure",
            sts,
            Fault::HttpError(500),
        ),
        (
            "the upstream IMDS accepts connections, never answers",
            upstream,
            Fault::Hang,
        ),
    ];
    let mut walked = Vec::new();
    for (i, (name, injector, fault)) in faults.into_iter().enumerate() {
        println!("soak: fault: {name}");
        injector.set(fault);
        let role = format!("Walk{i}");
        let fresh = Container::start(&role, &["sleep", "3600"])?;
        let fresh_answer = fresh.ask(&format!("{CREDENTIALS}{role}"))?;
        let cached_answer = cached.ask(&format!("{CREDENTIALS}Cached"))?;
        // A path not asked before: not in the proxy's short metadata cache.
        let passthrough = fresh.ask(&format!("/latest/meta-data/tags/instance/walk{i}"))?;
        // Five requests of the never-fetched role while the fault lasts (breakers count).
        for _ in 0..5 {
            fresh.ask(&format!("{CREDENTIALS}{role}"))?;
        }
        injector.set(Fault::Pass);
        let lifted = Instant::now();
        until_served(&fresh, &role, Duration::from_secs(120))?;
        walked.push(Walked {
            fault: name,
            cached: cached_answer,
            fresh: fresh_answer,
            passthrough,
            recovery: lifted.elapsed(),
            loop_requests: None,
        });
    }
    Ok(walked)
}

/// Ask every 100 ms until `role` is served (at most `limit`).
fn until_served(c: &Container, role: &str, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        if c.ask(&format!("{CREDENTIALS}{role}"))?.0 == 200 {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{role} not served within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// RSS and descriptors flat after the warm-up minute, every loop request served.
fn check((samples, _, failed): &(Vec<Reading>, usize, Vec<String>)) -> anyhow::Result<()> {
    ensure!(failed.is_empty(), "loop requests not served: {failed:?}");
    let warm: Vec<&Reading> = samples
        .iter()
        .filter(|s| s.at >= Duration::from_secs(60))
        .collect();
    if let (Some(first), Some(last)) = (warm.first(), warm.last()) {
        ensure!(
            last.rss_kib <= first.rss_kib + 16 * 1024,
            "RSS grew from {} to {} KiB",
            first.rss_kib,
            last.rss_kib
        );
        ensure!(
            last.fds <= first.fds + 16,
            "open descriptors grew from {} to {}",
            first.fds,
            last.fds
        );
    }
    Ok(())
}

fn status(answer: (u16, f64)) -> String {
    match answer.0 {
        0 => format!("no answer in {:.1} s", answer.1),
        status => format!("{status} in {:.0} ms", answer.1 * 1000.0),
    }
}

fn report(
    minutes: u64,
    (samples, requests, failed): &(Vec<Reading>, usize, Vec<String>),
    walked: &[Walked],
) -> String {
    let mut out = String::new();
    let date = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
    let _ = writeln!(out, "# Reliability\n");
    let _ = writeln!(
        out,
        "Command: `cargo xtask soak --minutes {minutes}` (release build, cgroup mode). Date: {date}.\n\
         Every number below was measured by that run. What each fault does is also asserted, in \
         both modes, by `tests/tests/suite/faults.rs` (part of `cargo xtask test`).\n"
    );
    let _ = writeln!(
        out,
        "## Faults of the proxy's peers\n\n\
         A fault injector sits between the proxy and STS (moto), then between the proxy and the \
         instance's IMDS (the simulator). For each fault: the answer a container got for a role \
         already cached, for a role never fetched (its container started during the fault), and \
         for a pass-through path, with the time curl measured; then, once the fault was lifted, \
         how long until the new role was served (asking every 100 ms; the time includes the \
         per-role back-off and, after five failed calls, the breaker's pause).\n"
    );
    let _ = writeln!(
        out,
        "| fault | cached role | new role | pass-through | served again after the fault |"
    );
    let _ = writeln!(out, "|---|---|---|---|---:|");
    for w in walked.iter().filter(|w| w.loop_requests.is_none()) {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {:.1} s |",
            w.fault,
            status(w.cached),
            status(w.fresh),
            status(w.passthrough),
            w.recovery.as_secs_f64()
        );
    }
    let _ = writeln!(
        out,
        "\nA 503 carries IMDS-style JSON (`Code: ServiceUnavailable`), which the SDKs retry. The \
         instance credentials rotating (every 2 s) is not walked here; the fault suite asserts \
         that STS calls keep being signed with valid ones."
    );
    let _ = writeln!(
        out,
        "\n## Faults of the proxy and of Docker\n\n\
         A container asks for its role's credentials about 20 times a second throughout.\n\n\
         | fault | its requests | not served | how long |\n|---|---:|---|---:|"
    );
    for w in walked {
        if let Some((requests, lost, how, what)) = w.loop_requests {
            let after = if w.fresh.0 == 0 {
                String::new()
            } else {
                format!(
                    "; a container started as the engine came back: {}",
                    status(w.fresh)
                )
            };
            let _ = writeln!(
                out,
                "| {} | {requests} | {lost} ({how}){after} | {:.1} s ({what}) |",
                w.fault,
                w.recovery.as_secs_f64()
            );
        }
    }
    let _ = writeln!(
        out,
        "\n## Soak\n\n\
         {minutes} min: four containers each asking for their role's credentials and for \
         `instance-id` about ten times a second, while containers with roles were started and \
         removed one after the other. {requests} loop requests, {} not served.\n",
        failed.len()
    );
    let _ = writeln!(
        out,
        "| at | RSS KiB | open fds | cache keys | indexed containers |\n|---:|---:|---:|---:|---:|"
    );
    for s in samples.iter().step_by((samples.len() / 12).max(1)) {
        let _ = writeln!(
            out,
            "| {:.0} s | {} | {} | {} | {} |",
            s.at.as_secs_f64(),
            s.rss_kib,
            s.fds,
            s.cache_keys,
            s.containers
        );
    }
    if let Some(last) = samples.last() {
        let _ = writeln!(
            out,
            "| {:.0} s | {} | {} | {} | {} |",
            last.at.as_secs_f64(),
            last.rss_kib,
            last.fds,
            last.cache_keys,
            last.containers
        );
    }
    out
}
