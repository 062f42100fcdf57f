//! The fault suite: the `imds-proxy` binary on the simulated EC2 host with its real peers (moto as
//! STS, the simulated IMDS, Docker), and a fault injector ([`imds_tests::faults`]) between the
//! proxy and a peer that hangs, delays, refuses or fails the traffic on demand. Each case asserts
//! what a container sees: an answer (never a request left hanging), the right one, and recovery
//! without a restart.
//!
//! The clients give up after 10 s (curl `-m 10`), so a request the proxy never answers shows as
//! status 0 and fails the test; how long the answers take is measured by `cargo xtask soak`,
//! not asserted here.
use std::time::{Duration, Instant};

use crate::{sim_host, sim_host_config};
use imds_tests::{
    containers::{Running, answers},
    faults::{Fault, Injector},
    http::Request,
    images::{curl_image, docker_ok},
    proxy::{Mode, Proxy},
    scene::{Scene, ensure_imds_is_simulated},
    sim::HttpTokens,
};

/// The proxy with the injector in front of the scene's STS.
fn behind_faulty_sts(scene: &Scene, mode: Mode) -> (Injector, Proxy) {
    let sts = Injector::start(scene.sts_endpoint().unwrap());
    let proxy = Proxy::start_in(scene, mode, &["--sts-endpoint", &sts.url()]);
    (sts, proxy)
}

const IMDS: &str = "http://169.254.169.254";

/// What `container` gets for `path`, the SDK way (a token first), as (status, body). A status of
/// 0 is a request that got no answer in 10 s.
fn ask(container: &Running, path: &str) -> (u16, String) {
    let out = container.exec(&format!(
        "T=$(curl -s -m 10 -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' {IMDS}/latest/api/token)
         curl -s -m 10 -w '\\n== %{{http_code}}\\n' -H \"X-aws-ec2-metadata-token: $T\" {IMDS}{path}"
    ));
    answers(&out)
        .pop()
        .unwrap_or_else(|| panic!("no answer line: {out}"))
}

fn credentials(container: &Running, role: &str) -> (u16, String) {
    ask(
        container,
        &format!("/latest/meta-data/iam/security-credentials/{role}"),
    )
}

/// A container with `role` as its label.
fn with_role(role: &str) -> Running {
    Running::start(&["--label", &format!("iam.amazonaws.com/role={role}")])
}

/// Asks as an SDK retries (every 250 ms) until 200; every answer before it must be the 503
/// an SDK retries. The session's access key id.
fn until_served(container: &Running, role: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = credentials(container, role);
        if status == 200 {
            let creds: serde_json::Value = serde_json::from_str(&body).unwrap();
            return creds["AccessKeyId"].as_str().unwrap().to_owned();
        }
        assert_unavailable(status, &body);
        assert!(Instant::now() < deadline, "{role} not served: {body}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The IMDS-style 503 the SDKs retry.
fn assert_unavailable(status: u16, body: &str) {
    assert_eq!(status, 503, "{body}");
    let error: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(error["Code"], "ServiceUnavailable", "{body}");
    assert!(
        error["Message"].as_str().unwrap().contains("retry"),
        "{body}"
    );
}

fn readyz(proxy: &Proxy) -> (u16, String) {
    let answer = Request::get("/readyz").send(proxy.ops).unwrap();
    (answer.status, answer.text())
}

fn healthz(proxy: &Proxy) -> u16 {
    Request::get("/healthz").send(proxy.ops).unwrap().status
}

/// Polls /readyz until it answers `status` (at most 20 s); its body.
fn until_readyz(proxy: &Proxy, status: u16) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (got, body) = readyz(proxy);
        if got == status {
            return body;
        }
        assert!(Instant::now() < deadline, "readyz never {status}: {body}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Cached roles, served before the fault, are served through it (the same session).
fn cached_role_before(container: &Running, role: &str) -> String {
    until_served(container, role)
}

imds_tests::per_mode! { sts_hangs => sts_hangs_in; }

/// STS accepts connections and never answers (a stopped process): cached roles are served, a new
/// role gets a 503 in bounded time (as often as it asks), and is served once STS answers again.
/// The call itself is bounded (README: per attempt, and in all): it ends, as a timeout, after more
/// than one attempt (one attempt does not eat the whole budget). Asserted from the counters and
/// the injector, not the clock.
fn sts_hangs_in(mode: Mode) {
    let scene = sim_host(HttpTokens::Optional);
    let (sts, proxy) = behind_faulty_sts(&scene, mode);
    let steady = with_role("Steady");
    let key = cached_role_before(&steady, "Steady");

    sts.set(Fault::Hang);
    let requests_before = sts.requests();
    let fresh = with_role("Fresh");
    for _ in 0..3 {
        let (status, body) = credentials(&fresh, "Fresh");
        assert_unavailable(status, &body);
        let (status, body) = credentials(&steady, "Steady");
        assert_eq!(status, 200, "{body}");
        assert!(body.contains(&key), "the cached session: {body}");
    }
    assert!(proxy.metric("imds_proxy_sts_answers_pending_total") >= 1);
    let timed_out = || proxy.counted("imds_proxy_sts_errors_total{reason=\"sts_timeout\"}");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while timed_out() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "a call against a hanging STS never ended"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let attempts = sts.requests() - requests_before;
    assert!(
        attempts >= 2,
        "{attempts} attempt(s) before the call timed out: each attempt is bounded on its own"
    );

    sts.set(Fault::Pass);
    until_served(&fresh, "Fresh");
}

imds_tests::per_mode! { sts_is_slow => sts_is_slow_in; }

/// STS answers slowly. 100 ms: well within the answer budget (900 ms: a ninefold margin on two
/// loaded cores), a new role is served on its first request, by a call it waited for. 3 s: the
/// first request gets a 503, the call goes on, and the next request after it
/// ended is served from the cache, with no second call.
fn sts_is_slow_in(mode: Mode) {
    let scene = sim_host(HttpTokens::Optional);
    let (sts, proxy) = behind_faulty_sts(&scene, mode);
    // Roles are asked for when their container starts; start them with the injector passing
    // so that the delays meet the requests, not the prefetch. (The prefetch of the first
    // container is the proxy's only call before that.)
    sts.set(Fault::Delay(Duration::from_millis(100)));
    let a = with_role("SlowA");
    let (status, body) = credentials(&a, "SlowA");
    assert_eq!(status, 200, "100 ms is inside the budget: {body}");
    // The premise: the delay met a call (the prefetch, or the request's own), and no answer was
    // given before STS's.
    assert!(sts.requests() >= 1, "STS was asked through the injector");
    assert_eq!(
        proxy.metric("imds_proxy_sts_answers_pending_total"),
        0,
        "nothing answered 503 for want of STS's answer"
    );

    sts.set(Fault::Delay(Duration::from_secs(3)));
    let calls = proxy.metric("imds_proxy_sts_calls_total");
    let b = with_role("SlowB");
    let (status, body) = credentials(&b, "SlowB");
    assert_unavailable(status, &body);
    until_served(&b, "SlowB");
    assert_eq!(
        proxy.metric("imds_proxy_sts_calls_total"),
        calls + 1,
        "one call, finished in the background"
    );
}

imds_tests::per_mode! { sts_refuses_then_recovers => sts_refuses_then_recovers_in; }

/// STS refuses connections: new roles get a 503 at once, after five failed calls the breaker
/// opens (readyz says so, with the reason), cached roles are still served, and once STS is back a
/// trial call closes it and new roles are served, with no restart.
fn sts_refuses_then_recovers_in(mode: Mode) {
    let scene = sim_host(HttpTokens::Optional);
    let (sts, proxy) = behind_faulty_sts(&scene, mode);
    let steady = with_role("Steady");
    let key = cached_role_before(&steady, "Steady");

    sts.set(Fault::Refuse);
    let fresh: Vec<Running> = (0..5).map(|i| with_role(&format!("Fresh{i}"))).collect();
    for (i, c) in fresh.iter().enumerate() {
        let (status, body) = credentials(c, &format!("Fresh{i}"));
        assert_unavailable(status, &body);
    }
    // The fifth call may still be ending (the requests' answers are bounded, not the calls).
    let body = until_readyz(&proxy, 503);
    assert!(body.contains("sts: not answering"), "{body}");
    assert_eq!(healthz(&proxy), 200, "alive, if not ready");
    assert_eq!(proxy.metric("imds_proxy_sts_breaker_open"), 1);
    // A role not cached (its prefetch at start, then its request) is answered with no call. A
    // refused call ends within the request's wait, so a call made would be counted by now.
    let calls = proxy.metric("imds_proxy_sts_calls_total");
    let avoided = proxy.metric("imds_proxy_sts_calls_avoided_total");
    let late = with_role("Late");
    let (status, body) = credentials(&late, "Late");
    assert_unavailable(status, &body);
    assert_eq!(
        proxy.metric("imds_proxy_sts_calls_total"),
        calls,
        "no call while the breaker is open"
    );
    assert!(proxy.metric("imds_proxy_sts_calls_avoided_total") > avoided);
    let (status, body) = credentials(&steady, "Steady");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(&key));

    sts.set(Fault::Pass);
    until_served(&late, "Late");
    let (status, body) = readyz(&proxy);
    assert_eq!(status, 200, "{body}");
    assert_eq!(proxy.metric("imds_proxy_sts_breaker_open"), 0);
}

imds_tests::per_mode! { sts_answers_errors => sts_answers_errors_in; }

/// STS answers 500 (InternalFailure): counted as STS's own failure, like a refused connection; a
/// 403 would be a refusal of the role and is not (unit-tested). Recovery as above.
fn sts_answers_errors_in(mode: Mode) {
    let scene = sim_host(HttpTokens::Optional);
    let (sts, proxy) = behind_faulty_sts(&scene, mode);
    sts.set(Fault::HttpError(500));
    let first = with_role("Broken");
    let (status, body) = credentials(&first, "Broken");
    assert_unavailable(status, &body);
    assert!(sts.requests() >= 1, "STS was asked");
    assert!(
        proxy.metric("imds_proxy_sts_errors_total{reason=\"sts_unavailable\"}") >= 1,
        "a 500 is STS's own failure"
    );
    sts.set(Fault::Pass);
    until_served(&first, "Broken");
}

imds_tests::per_mode! { the_upstream_imds_hangs => the_upstream_imds_hangs_in; }

/// The instance's IMDS accepts and never answers: cached roles are served, a new role is still
/// assumed (the instance credentials are cached), pass-through paths get a 502 in bounded time,
/// and readyz says the upstream is not answering, until it answers again.
fn the_upstream_imds_hangs_in(mode: Mode) {
    let scene = sim_host(HttpTokens::Optional);
    ensure_imds_is_simulated().unwrap();
    let upstream = Injector::start(scene.imds_v4().unwrap());
    let proxy = Proxy::start_in(&scene, mode, &["--upstream", &upstream.url()]);
    let steady = with_role("Steady");
    let key = cached_role_before(&steady, "Steady");

    upstream.set(Fault::Hang);
    let (status, body) = credentials(&steady, "Steady");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(&key));
    let fresh = with_role("Fresh");
    until_served(&fresh, "Fresh");
    let (status, body) = ask(&steady, "/latest/meta-data/placement/availability-zone");
    assert_eq!(status, 502, "{body}");
    assert_eq!(
        proxy.metric("imds_proxy_upstream_errors_total{kind=\"timeout\"}"),
        1
    );
    let (status, body) = readyz(&proxy);
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("upstream IMDS: not answering"), "{body}");
    assert_eq!(healthz(&proxy), 200, "alive, if not ready");

    upstream.set(Fault::Pass);
    let (status, body) = ask(&steady, "/latest/meta-data/placement/availability-zone");
    assert_eq!((status, body.as_str()), (200, "us-east-1a"));
    let (status, body) = readyz(&proxy);
    assert_eq!(status, 200, "{body}");
}

/// README: "at most `--upstream-concurrency` containers' calls at once (then 429 after a
/// second's wait; the proxy's own token and credential calls never wait behind them)". With the
/// instance's IMDS hanging and two places, six pass-through calls at once: two take the places
/// (and get 502 when the upstream times out), the others wait a second and get 429, counted as
/// the upstream limit. Meanwhile the container's role credentials are served: a vend takes no
/// place. (Not about the redirect: cgroup mode only.)
#[test]
fn pass_through_calls_are_capped_and_credentials_never_wait_behind_them() {
    let scene = sim_host(HttpTokens::Optional);
    ensure_imds_is_simulated().unwrap();
    let upstream = Injector::start(scene.imds_v4().unwrap());
    let proxy = Proxy::start_in(
        &scene,
        Mode::Cgroup,
        &["--upstream", &upstream.url(), "--upstream-concurrency", "2"],
    );
    let steady = with_role("Steady");
    let key = cached_role_before(&steady, "Steady");
    upstream.set(Fault::Hang);
    let paths = [
        "ami-id",
        "instance-id",
        "hostname",
        "local-ipv4",
        "mac",
        "instance-type",
    ];
    let mut script = String::from(
        "T=$(curl -s -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' http://169.254.169.254/latest/api/token)\n",
    );
    for path in paths {
        script.push_str(&format!(
            "curl -s -o /dev/null -m 20 -w '== %{{http_code}}\\n' -H \"X-aws-ec2-metadata-token: $T\" http://169.254.169.254/latest/meta-data/{path} > /tmp/{path} &\n"
        ));
    }
    // While they are out: the role's credentials, from the cache, no place needed.
    script.push_str(
        "curl -s -m 20 -w '\\n== %{http_code}\\n' -H \"X-aws-ec2-metadata-token: $T\" http://169.254.169.254/latest/meta-data/iam/security-credentials/Steady > /tmp/creds\n\
         wait\n\
         cat /tmp/creds\n",
    );
    for path in paths {
        script.push_str(&format!("cat /tmp/{path}\n"));
    }
    let out = steady.exec(&script);
    let got = imds_tests::containers::answers(&out);
    assert_eq!(got.len(), 1 + paths.len(), "{out}");
    assert_eq!(
        got[0].0, 200,
        "credentials while the places are taken: {out}"
    );
    assert!(got[0].1.contains(&key), "{out}");
    let statuses: Vec<u16> = got[1..].iter().map(|(s, _)| *s).collect();
    let count = |status| statuses.iter().filter(|s| **s == status).count();
    assert_eq!(
        count(502),
        2,
        "two places, each timed out upstream: {statuses:?}"
    );
    assert_eq!(
        count(429),
        4,
        "the others refused after a wait: {statuses:?}"
    );
    assert_eq!(
        proxy.metric("imds_proxy_throttled_total{limit=\"upstream\"}"),
        4
    );
    upstream.set(Fault::Pass);
}

/// The instance's credentials rotate every 2 s, each set valid for 6 s. STS calls made across
/// rotations keep working, and each is signed with credentials the instance's IMDS still vouched
/// for: the injector in front of moto notes the key id of every signed request, the simulator's
/// log says when each set was issued and when it expires. (The redirect plays no part: cgroup
/// mode only.)
#[test]
fn sts_calls_follow_the_instance_credentials_as_they_rotate() {
    let every = Duration::from_secs(2);
    let scene = sim_host_config(HttpTokens::Optional)
        .rotate_credentials_every(every)
        .start()
        .expect("the simulated EC2 host starts");
    let (sts, _proxy) = behind_faulty_sts(&scene, Mode::Cgroup);
    let rotations = || {
        scene
            .sim_log()
            .lines()
            .filter(|l| l.contains("instance credentials issued"))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    for i in 0..4 {
        let seen = rotations().len();
        let role = format!("Rotating{i}");
        until_served(&with_role(&role), &role);
        // The next call after the next rotation.
        let deadline = Instant::now() + Duration::from_secs(20);
        while rotations().len() == seen {
            assert!(Instant::now() < deadline, "the simulator does not rotate");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // Each set the simulator issued: key id -> expiration.
    let issued: std::collections::HashMap<String, std::time::SystemTime> = rotations()
        .iter()
        .map(|line| {
            let field = |name: &str| {
                line.split(&format!("{name}="))
                    .nth(1)
                    .unwrap()
                    .split_whitespace()
                    .next()
                    .unwrap()
                    .trim_matches('"')
                    .to_owned()
            };
            (
                field("access_key_id"),
                humantime::parse_rfc3339(&field("expiration")).unwrap(),
            )
        })
        .collect();
    let signed = sts.signed_with();
    assert!(signed.len() >= 4, "{signed:?}");
    for (at, key) in &signed {
        let expires = issued
            .get(key)
            .unwrap_or_else(|| panic!("{key}: not the instance's credentials ({issued:?})"));
        assert!(at < expires, "{key} used after it expired");
    }
    let distinct: std::collections::HashSet<&String> = signed.iter().map(|(_, k)| k).collect();
    assert!(
        distinct.len() >= 2,
        "the proxy followed the rotation: {signed:?}"
    );
}

/// A container whose own process asks for `role`'s credentials in a loop (about 20 a second,
/// under the per-container rate limit) until the test says stop, recording one line per request
/// (`<http code> <curl exit>`). Its own process, so it keeps asking while the engine restarts
/// (with live restore).
struct Loop(Running);

impl Loop {
    fn start(role: &str) -> Self {
        ensure_imds_is_simulated().unwrap();
        let script = format!(
            "while [ ! -e /tmp/stop ]; do
               curl -s -m 5 -o /dev/null -w '%{{http_code}} %{{exitcode}}\\n' \
                 {IMDS}/latest/meta-data/iam/security-credentials/{role} >> /tmp/statuses
               sleep 0.05
             done"
        );
        let id = docker_ok(&[
            "run",
            "-d",
            "--label",
            &format!("iam.amazonaws.com/role={role}"),
            curl_image().unwrap(),
            "sh",
            "-c",
            &script,
        ])
        .unwrap();
        Self(Running(id.trim().to_owned()))
    }

    fn statuses(&self) -> Vec<String> {
        self.0
            .exec("cat /tmp/statuses 2>/dev/null")
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Wait (at most 30 s) until `n` more answers of 200 have been recorded.
    fn until_more_served(&self, n: usize) {
        let served = |s: &[String]| s.iter().filter(|l| l.starts_with("200 ")).count();
        let start = served(&self.statuses());
        let deadline = Instant::now() + Duration::from_secs(30);
        while served(&self.statuses()) < start + n {
            assert!(
                Instant::now() < deadline,
                "not served: {:?}",
                self.statuses().last()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stop the loop; every status it recorded.
    fn stop(self) -> Vec<String> {
        self.0.exec("touch /tmp/stop");
        docker_ok(&["wait", &self.0.0]).unwrap();
        let copy = std::env::temp_dir().join(format!("imds-test-statuses-{}", self.0.0));
        docker_ok(&[
            "cp",
            &format!("{}:/tmp/statuses", self.0.0),
            copy.to_str().unwrap(),
        ])
        .unwrap();
        let text = std::fs::read_to_string(&copy).unwrap();
        let _ = std::fs::remove_file(&copy);
        text.lines().map(str::to_owned).collect()
    }
}

imds_tests::per_mode! { a_pinned_proxy_killed_under_load => a_pinned_proxy_killed_under_load_in; }

/// SIGKILL while a container asks in a loop, with `--pin`: the requests in the gap are refused
/// (connection refused, fail closed; none reaches the instance's IMDS), and a restarted proxy
/// adopts the pins and serves the same container again.
fn a_pinned_proxy_killed_under_load_in(mode: Mode) {
    let scene = sim_host(HttpTokens::Optional);
    let pins = imds_tests::proxy::Pins::new("/sys/fs/bpf/imds-test-faults");
    let pin = pins.path().to_owned();
    let args = ["--pin", pin.to_str().unwrap()];
    let mut first = Proxy::start_in(&scene, mode, &args);
    let load = Loop::start("Loaded");
    load.until_more_served(20);

    first.kill();
    // Some requests meet the dead listener.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !load.statuses().iter().any(|l| !l.starts_with("200 ")) {
        assert!(Instant::now() < deadline, "no request in the gap");
        std::thread::sleep(Duration::from_millis(20));
    }
    let second = Proxy::start_in(&scene, mode, &args);
    let attached = second.wait_for_log(&["redirect attached; serving"]);
    assert!(
        !attached.contains("adopted_links=0"),
        "adopted the pins: {attached}"
    );
    load.until_more_served(20);
    let statuses = load.stop();

    let failed: Vec<&String> = statuses.iter().filter(|l| !l.starts_with("200 ")).collect();
    eprintln!(
        "{mode:?}: {} requests, {} failed in the gap",
        statuses.len(),
        failed.len()
    );
    // No answer at all: curl's exit 7 (refused: nothing listens), or for the request under way
    // when the process died, 52 (empty reply) or 56 (reset).
    assert!(
        failed
            .iter()
            .all(|l| ["000 7", "000 52", "000 56"].contains(&l.as_str())),
        "every failure is a connection that got no answer: {failed:?}"
    );
    assert!(
        !scene.sim_requests().iter().any(|l| l.contains("Loaded")),
        "no request of the container reached the instance's IMDS"
    );
    drop(second);
    imds_tests::proxy::detach(&pin);
    drop(first);
}

/// The engine runs with live restore for a test (containers keep running while it restarts), and
/// without it again after, whatever happens.
struct LiveRestore;

impl LiveRestore {
    fn on() -> Self {
        imds_tests::images::stop_docker().unwrap();
        imds_tests::images::start_dockerd_with(false, &["--live-restore"]).unwrap();
        Self
    }

    /// Stop the engine until [`Away::back`], or until the returned guard is dropped (a test
    /// that fails while the engine is away still has it back before its containers are
    /// removed).
    fn stop(&self) -> Away {
        imds_tests::images::stop_docker().unwrap();
        Away(true)
    }
}

/// The engine is stopped while this lives.
struct Away(bool);

impl Away {
    fn back(mut self) {
        self.0 = false;
        imds_tests::images::start_dockerd_with(false, &["--live-restore"]).unwrap();
    }
}

impl Drop for Away {
    fn drop(&mut self) {
        if self.0 {
            let _ = imds_tests::images::start_dockerd_with(false, &["--live-restore"]);
        }
    }
}

impl Drop for LiveRestore {
    fn drop(&mut self) {
        let _ = imds_tests::images::stop_docker();
        if let Err(err) = imds_tests::images::start_dockerd(false) {
            eprintln!("restarting dockerd without live restore: {err:#}");
        }
    }
}

imds_tests::per_mode! { dockerd_restarts_under_load => dockerd_restarts_under_load_in; }

/// A request for credentials answered 200 (the proxy's debug line per request: the audit trail
/// has one line per session, not per request).
fn answered_credentials(line: &str) -> bool {
    line.contains("answered")
        && line.contains("status=200")
        && line.contains("route=\"credentials\"")
}

/// The Docker engine restarts (with live restore, so containers keep running) while a container
/// asks in a loop: every request is served, and a container started as soon as the engine
/// answers again is identified and served.
fn dockerd_restarts_under_load_in(mode: Mode) {
    let scene = sim_host(HttpTokens::Optional);
    let live = LiveRestore::on();
    let proxy = Proxy::start_in(&scene, mode, &[]);
    let load = Loop::start("Busy");
    load.until_more_served(10);
    let away = live.stop();
    // The engine stays away until the proxy has noticed and served the container ten times
    // meanwhile (from what it knew; Docker cannot be asked).
    let vends_after_loss = || {
        let log = proxy.log();
        log.iter()
            .position(|l| l.contains("the runtime's changes"))
            .map(|lost| {
                log[lost..]
                    .iter()
                    .filter(|l| answered_credentials(l))
                    .count()
            })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while vends_after_loss().unwrap_or(0) < 10 {
        assert!(
            Instant::now() < deadline,
            "not served while the engine was away: {:#?}",
            proxy.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    away.back();
    let after = with_role("AfterRestart");
    until_served(&after, "AfterRestart");
    load.until_more_served(10);
    let statuses = load.stop();
    let failed: Vec<&String> = statuses.iter().filter(|l| !l.starts_with("200 ")).collect();
    eprintln!(
        "{mode:?}: {} requests through the restart, {} not served",
        statuses.len(),
        failed.len()
    );
    assert!(failed.is_empty(), "{failed:?}");
    // The premise: the proxy lost the engine, served the container while it was away, and
    // synchronised again.
    let log = proxy.log();
    let lost = log
        .iter()
        .position(|l| l.contains("the runtime's changes"))
        .unwrap_or_else(|| panic!("the proxy never lost the engine: {log:#?}"));
    let back = log
        .iter()
        .skip(lost)
        .position(|l| l.contains("container index synchronised") && l.contains("runtime=docker"))
        .map(|i| lost + i)
        .unwrap_or_else(|| panic!("never synchronised again: {log:#?}"));
    let served_meanwhile = log[lost..back]
        .iter()
        .filter(|l| answered_credentials(l))
        .count();
    eprintln!("{mode:?}: {served_meanwhile} served while the engine was away");
    assert!(
        served_meanwhile >= 1,
        "nothing asked while the engine was away"
    );
}

/// `n` containers with a role started and destroyed (`docker run --rm`, eight at a time): each
/// one's start is followed (a prefetch, an STS call) and its destruction too.
fn churn(n: usize, role: &str) {
    ensure_imds_is_simulated().unwrap();
    let image = curl_image().unwrap().to_owned();
    let label = format!("iam.amazonaws.com/role={role}");
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                while next.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < n {
                    // Alive long enough to be inspected and prefetched for: each one is work
                    // the proxy must do, and undo.
                    docker_ok(&["run", "--rm", "--label", &label, &image, "sleep", "0.3"]).unwrap();
                }
            });
        }
    });
}

/// Containers churned by the test: 100 (the 1000-container churn is `cargo xtask soak`'s and
/// `bench`'s); `IMDS_TEST_CHURN` for more.
fn churn_size() -> usize {
    std::env::var("IMDS_TEST_CHURN")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(100)
}

/// What must come back to where it was once churned containers are gone.
fn footprint(proxy: &Proxy, mode: Mode) -> Vec<(&'static str, u64)> {
    let mut gauges = vec![
        (
            "imds_proxy_credential_cache_keys",
            proxy.metric("imds_proxy_credential_cache_keys"),
        ),
        (
            "imds_proxy_containers",
            proxy.metric("imds_proxy_containers"),
        ),
    ];
    // Both modes vouch for containers' addresses on their ports (the reply guard).
    gauges.push((
        "imds_proxy_tc_sources",
        proxy.metric("imds_proxy_tc_sources"),
    ));
    if mode == Mode::Tc {
        gauges.push((
            "imds_proxy_tc_interfaces",
            proxy.metric("imds_proxy_tc_interfaces"),
        ));
    }
    gauges
}

imds_tests::per_mode! { containers_come_and_go => containers_come_and_go_in; }

/// [`churn_size`] containers with a role are started and destroyed while another container keeps
/// asking: the proxy indexed each, prefetched its credentials and forgot it (counted); the caller
/// is served throughout, and the proxy returns to where it was (no cache entry, index entry,
/// vouched source or interface kept for a container that is gone; RSS within 16 MiB of what it
/// was after a first 100). Then a container dies while the engine is down (live restore): the
/// engine's return forgets it too.
fn containers_come_and_go_in(mode: Mode) {
    let scene = sim_host(HttpTokens::Optional);
    let live = LiveRestore::on();
    let proxy = Proxy::start_in(&scene, mode, &[]);
    let load = Loop::start("Steady");
    load.until_more_served(5);
    // Warm the allocator and the maps, then take the baseline.
    churn(100, "Churn");
    let settled = |proxy: &Proxy, baseline: &[(&'static str, u64)]| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let now = footprint(proxy, mode);
            if now == baseline {
                return;
            }
            assert!(Instant::now() < deadline, "{now:?} != {baseline:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    // The loop's container's addresses: in tc mode, one vouched source each.
    let addresses = docker_ok(&[
        "inspect",
        "-f",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{.GlobalIPv6Address}} {{end}}",
        &load.0.0,
    ])
    .unwrap()
    .split_whitespace()
    .count() as u64;
    let baseline = {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            // The loop's container alone: its cache key, its index entry (and in tc mode its
            // vouched addresses; a warm-up container's, not forgotten yet, is not the baseline).
            let now = footprint(&proxy, mode);
            if now[0].1 == 1 && now[1].1 == 1 && now.get(2).is_none_or(|s| s.1 == addresses) {
                break now;
            }
            assert!(Instant::now() < deadline, "{now:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let rss_before = proxy.rss_kib();
    let fds_before = proxy.open_fds();
    let events = |event: &str| {
        proxy.metric(&format!(
            "imds_proxy_container_events_total{{event=\"{event}\"}}"
        ))
    };
    let work_before = (
        events("created"),
        events("destroyed"),
        proxy.metric("imds_proxy_sts_calls_total"),
    );
    let n = churn_size();
    churn(n, "Churn");
    settled(&proxy, &baseline);
    // The premise of "returns to where it was": the work was done, for each container.
    let work = (
        events("created") - work_before.0,
        events("destroyed") - work_before.1,
        proxy.metric("imds_proxy_sts_calls_total") - work_before.2,
    );
    eprintln!("{mode:?}: {n} containers: (created, destroyed, STS calls) {work:?}");
    // About n of each: a container can be gone before the index inspects it (measured here:
    // 95–99 of 100 created, 100 destroyed; started would be 44), and then nothing is owed for it.
    let about = (n as u64) * 3 / 4;
    assert!(
        work.0 >= about && work.1 >= about && work.2 >= about,
        "(about) each churned container announced, prefetched for and forgotten: {work:?}"
    );
    let (rss_after, fds_after) = (proxy.rss_kib(), proxy.open_fds());
    eprintln!(
        "{mode:?}: RSS {rss_before} -> {rss_after} KiB, fds {fds_before} -> {fds_after}, \
         {} STS calls",
        proxy.metric("imds_proxy_sts_calls_total")
    );
    assert!(
        rss_after < rss_before + 16 * 1024,
        "RSS {rss_before} -> {rss_after} KiB"
    );
    assert!(
        fds_after <= fds_before + 8,
        "fds {fds_before} -> {fds_after}"
    );

    // A container that dies while the engine is away: its destroy event never comes.
    let doomed = with_role("Doomed");
    until_served(&doomed, "Doomed");
    let pid = docker_ok(&["inspect", "-f", "{{.State.Pid}}", &doomed.0]).unwrap();
    let away = live.stop();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid.trim().parse().unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    away.back();
    settled(&proxy, &baseline);
    proxy.wait_for_log(&["forgotten: not running at resync", &doomed.0]);
    let statuses = load.stop();
    let failed: Vec<&String> = statuses.iter().filter(|l| !l.starts_with("200 ")).collect();
    assert!(failed.is_empty(), "the steady caller: {failed:?}");
}
