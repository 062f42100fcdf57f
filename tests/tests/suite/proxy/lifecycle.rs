//! The proxy's life: a runtime that does not match, invalid configuration, the runtime
//! restarting, readiness, and nothing left behind once stopped.
use super::*;

/// README: "a `--runtime` that does not match what answers stops the proxy". `--runtime podman`
/// with Docker's socket: the proxy attaches, asks the engine what it is, says why in one line and
/// exits non-zero (its containers would be read the wrong way: cgroups, events).
#[test]
fn a_runtime_that_does_not_match_the_engine_stops_the_proxy() {
    let scene = sim_host(HttpTokens::Optional);
    let mut proxy = Proxy::start_until(
        &scene,
        Mode::Cgroup,
        &[
            "--runtime",
            "podman",
            "--docker-host",
            "unix:///var/run/docker.sock",
        ],
        &[],
        &[],
        "name the other runtime",
    );
    let status = proxy.wait();
    assert!(!status.success(), "{status}");
    proxy.wait_for_log(&["--runtime podman, but unix:///var/run/docker.sock is docker's API"]);
}

#[test]
fn invalid_configuration_exits_before_attaching() {
    let out = Command::new(proxy_bin())
        .args([
            "run",
            "--role-arn-prefix",
            "arn:aws:iam::123:role/",
            "--interface",
            TEST_IF,
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.trim(),
        "imds-proxy: invalid configuration: role-arn-prefix: \"arn:aws:iam::123:role/\": the account must be 12 digits"
    );
    assert!(!netdev::exists(TEST_IF), "nothing was set up");
}

#[test]
fn the_docker_index_recovers_from_a_daemon_restart() {
    let scene = sim_host(HttpTokens::Optional);
    let proxy = Proxy::start(&scene, &[]);
    // While the engine is down the proxy is not ready, and says why.
    imds_tests::images::stop_docker().unwrap();
    let down = Request::get("/readyz").send(proxy.ops);
    imds_tests::images::start_dockerd(false).unwrap();
    let down = down.unwrap();
    assert_eq!(down.status, 503, "{}", down.text());
    assert!(
        down.text()
            .contains("container runtime docker: not answering"),
        "{}",
        down.text()
    );
    // The proxy notices and lists again (bounded wait for its own log line).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while proxy
        .log()
        .iter()
        .filter(|l| l.contains("container index synchronised") && l.contains("runtime=docker"))
        .count()
        < 2
    {
        assert!(std::time::Instant::now() < deadline, "{:#?}", proxy.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_gets_role(
        &scene,
        &["--label", "iam.amazonaws.com/role=AfterRestart"],
        "AfterRestart",
    );
    let ready = Request::get("/readyz").send(proxy.ops).unwrap();
    assert_eq!(ready.status, 200, "{}", ready.text());
}

imds_tests::per_mode! { a_stopped_proxy_leaves_nothing_behind => a_stopped_proxy_leaves_nothing_behind_in; }

/// The proxy's own cleanup, checked before the harness removes anything: SIGTERM and SIGINT
/// detach every program and remove the listen interface, and the exit is clean; SIGKILL (no
/// `--pin`) leaves no program attached either, since the links die with the process.
fn a_stopped_proxy_leaves_nothing_behind_in(mode: Mode) {
    use imds_tests::kernel::{KernelObjects, kernel_objects_since, wait_kernel_objects_gone};
    use nix::sys::signal::Signal;
    let scene = sim_host(HttpTokens::Optional);
    let before = KernelObjects::now();
    let interface = std::path::Path::new("/sys/class/net").join(TEST_IF);
    for signal in [Signal::SIGTERM, Signal::SIGINT] {
        let mut proxy = Proxy::start_in(&scene, mode, &[]);
        assert!(
            !kernel_objects_since(&before).is_empty(),
            "{mode:?}: attached"
        );
        assert!(interface.exists(), "{mode:?}: the listen interface is up");
        // A dummy interface, or (a kernel without the dummy driver, as here) an ifb device, and
        // the log says which.
        let details = String::from_utf8(
            Command::new("ip")
                .args(["-d", "-o", "link", "show", TEST_IF])
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap();
        let fell_back = proxy
            .log()
            .iter()
            .any(|l| l.contains("no dummy link type; using an ifb device"));
        let kind = if fell_back { " ifb " } else { " dummy " };
        assert!(
            details.contains(kind),
            "{mode:?}: expected{kind}: {details}"
        );
        let status = proxy.stop_with(signal);
        assert!(status.success(), "{mode:?} {signal}: {status}");
        assert_eq!(
            wait_kernel_objects_gone(&before),
            Vec::<String>::new(),
            "{mode:?} {signal}: every program and map is gone"
        );
        assert!(
            !interface.exists(),
            "{mode:?} {signal}: the proxy removed its interface"
        );
        assert!(
            proxy
                .log()
                .iter()
                .any(|l| l.contains("stopped; programs detached and dummy interface removed")),
            "{mode:?} {signal}: {:#?}",
            proxy.log()
        );
    }
    let mut proxy = Proxy::start_in(&scene, mode, &[]);
    assert!(
        !kernel_objects_since(&before).is_empty(),
        "{mode:?}: attached"
    );
    proxy.kill();
    assert_eq!(
        wait_kernel_objects_gone(&before),
        Vec::<String>::new(),
        "{mode:?}: after SIGKILL without --pin, nothing stays attached"
    );
}

/// `/readyz` is 503 while the upstream IMDS does not answer, and 200 once everything does.
#[test]
fn readyz_is_503_while_the_upstream_does_not_answer() {
    let scene = sim_host(HttpTokens::Optional);
    let silent = Proxy::start(
        &scene,
        &["--upstream", "http://127.0.0.1:9", "--require-imdsv2"],
    );
    let ready = Request::get("/readyz").send(silent.ops).unwrap();
    assert_eq!(ready.status, 503, "{}", ready.text());
    assert!(
        ready.text().contains("upstream IMDS: not answering"),
        "{}",
        ready.text()
    );
    assert!(
        ready.text().contains("container runtime docker: answering"),
        "{}",
        ready.text()
    );
    drop(silent);
    let proxy = Proxy::start(&scene, &[]);
    let ready = Request::get("/readyz").send(proxy.ops).unwrap();
    assert_eq!(ready.status, 200, "{}", ready.text());
    // Every background task runs, and none has stopped (supervisor::tests make one stop).
    assert!(
        ready.text().contains("background tasks: running"),
        "{}",
        ready.text()
    );
    assert_eq!(
        proxy.counted("imds_proxy_background_tasks_stopped_total{task=\"container index\"}"),
        0
    );
    assert!(
        !proxy
            .log()
            .iter()
            .any(|l| l.contains("background task stopped")),
        "{:#?}",
        proxy.log()
    );
}
