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

use imds_tests::{
    containers::{Running, answers},
    faults::{Fault, Injector},
    http::Request,
    proxy::{Mode, Proxy},
    scene::{Scene, SceneConfig, ensure_imds_is_simulated},
    sim::HttpTokens,
};

fn scene() -> Scene {
    SceneConfig::new(env!("CARGO_BIN_EXE_imds-sim"))
        .http_tokens(HttpTokens::Optional)
        .with_sts()
        .start()
        .expect("the simulated EC2 host starts")
}

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
fn sts_hangs_in(mode: Mode) {
    let scene = scene();
    let (sts, proxy) = behind_faulty_sts(&scene, mode);
    let steady = with_role("Steady");
    let key = cached_role_before(&steady, "Steady");

    sts.set(Fault::Hang);
    let fresh = with_role("Fresh");
    for _ in 0..3 {
        let (status, body) = credentials(&fresh, "Fresh");
        assert_unavailable(status, &body);
        let (status, body) = credentials(&steady, "Steady");
        assert_eq!(status, 200, "{body}");
        assert!(body.contains(&key), "the cached session: {body}");
    }
    assert!(proxy.metric("imds_proxy_sts_answers_pending_total") >= 1);

    sts.set(Fault::Pass);
    until_served(&fresh, "Fresh");
}

imds_tests::per_mode! { sts_is_slow => sts_is_slow_in; }

/// STS answers slowly. 300 ms: within the answer budget, a new role is served on its first
/// request. 3 s: the first request gets a 503, the call goes on, and the next request after it
/// ended is served from the cache, with no second call.
fn sts_is_slow_in(mode: Mode) {
    let scene = scene();
    let (sts, proxy) = behind_faulty_sts(&scene, mode);
    // Roles are asked for when their container starts; start them with the injector passing
    // so that the delays meet the requests, not the prefetch. (The prefetch of the first
    // container is the proxy's only call before that.)
    sts.set(Fault::Delay(Duration::from_millis(300)));
    let a = with_role("SlowA");
    let (status, body) = credentials(&a, "SlowA");
    assert_eq!(status, 200, "300 ms is inside the budget: {body}");

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
    let scene = scene();
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
    let scene = scene();
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
    let scene = scene();
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
    let (status, body) = readyz(&proxy);
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("upstream IMDS: not answering"), "{body}");

    upstream.set(Fault::Pass);
    let (status, body) = ask(&steady, "/latest/meta-data/placement/availability-zone");
    assert_eq!((status, body.as_str()), (200, "us-east-1a"));
    let (status, body) = readyz(&proxy);
    assert_eq!(status, 200, "{body}");
}
