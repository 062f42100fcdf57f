//! Addresses: a container's first milliseconds, reused and taken addresses, IPv6 end to end, and a
//! host without IPv6.
use super::*;

imds_tests::per_mode! { the_first_milliseconds_of_a_container_and_ip_reuse => the_first_milliseconds_of_a_container_and_ip_reuse_in; }

fn the_first_milliseconds_of_a_container_and_ip_reuse_in(mode: Mode) {
    let scene = sim_host(HttpTokens::Optional);
    let _proxy = Proxy::start_in(&scene, mode, &[]);
    // The very first thing the container does is ask: no start event has been processed yet.
    let first = r#"curl -s -w '\n== %{http_code}\n' http://169.254.169.254/latest/meta-data/iam/security-credentials/; hostname -i"#;
    let (id_a, _, out_a) = in_container(&["--label", "iam.amazonaws.com/role=RoleA"], first);
    assert_eq!(answers(&out_a)[0], (200, "RoleA".to_owned()), "{out_a}");
    // B starts right after A is gone and gets A's address on docker0 (Docker reuses it at once).
    let (id_b, _, out_b) = in_container(&["--label", "iam.amazonaws.com/role=RoleB"], first);
    assert_ne!(id_a, id_b);
    // The premise: B really has the address A had.
    let address = |out: &str| out.lines().last().unwrap_or_default().trim().to_owned();
    assert!(
        address(&out_a).parse::<std::net::Ipv4Addr>().is_ok(),
        "A's address: {out_a}"
    );
    assert_eq!(address(&out_a), address(&out_b), "B got A's address");
    assert_eq!(
        answers(&out_b)[0],
        (200, "RoleB".to_owned()),
        "never A's role: {out_b}"
    );
}

imds_tests::per_mode! { a_program_that_asks_before_docker_reports_it_running => a_program_that_asks_before_docker_reports_it_running_in; }

/// A static binary as the container's first process asks at once: sooner than a shell and curl,
/// and before Docker has finished marking the container running (its list still says "created",
/// with no address). It must get its role, not a refusal.
fn a_program_that_asks_before_docker_reports_it_running_in(mode: Mode) {
    let scene = sim_host(HttpTokens::Optional);
    let proxy = Proxy::start_in(&scene, mode, &[]);
    let image = bench_image(env!("CARGO_BIN_EXE_imds-bench").as_ref()).unwrap();
    ensure_imds_is_simulated().unwrap();
    for i in 0..10 {
        let out = docker_ok(&[
            "run",
            "--rm",
            "--label",
            "iam.amazonaws.com/role=Early",
            image,
            "/program",
            "--runs",
            "1",
        ])
        .unwrap();
        let json: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(
            json["errors"],
            serde_json::json!([]),
            "{mode:?}, container {i}: {out}"
        );
    }
    // The premise: some of these containers asked before the index held them (Docker had not
    // reported them yet), and were answered all the same.
    if mode == Mode::Tc {
        // 30 connections: each container's later ones are confirmed by the kernel (its first
        // process alive in its cgroup, the address in its namespace; then by the watch on that
        // confirmation), without asking Docker; a first one that came before Docker's report
        // needed Docker.
        let by = |how: &str| {
            proxy.metric(&format!(
                "imds_proxy_tc_address_confirmations_total{{by=\"{how}\"}}"
            ))
        };
        let (watch, kernel, docker) = (by("watch"), by("kernel"), by("runtime"));
        eprintln!("confirmed by a watch {watch}, by the kernel {kernel}, by Docker {docker}");
        assert_eq!(
            watch + kernel + docker,
            30,
            "watch {watch}, kernel {kernel}, docker {docker}"
        );
        assert!(
            watch + kernel >= 20,
            "watch {watch}, kernel {kernel}, docker {docker}"
        );
        assert!(docker >= 1, "no container asked before Docker reported it");
    } else {
        let early = proxy.metric("imds_proxy_containers_found_before_indexed_total");
        eprintln!("found before indexed: {early} of 10");
        assert!(early >= 1, "no container asked before Docker reported it");
    }
}

imds_tests::per_mode! { a_reused_ip_never_carries_the_previous_owners_role => a_reused_ip_never_carries_the_previous_owners_role_in; }

fn a_reused_ip_never_carries_the_previous_owners_role_in(mode: Mode) {
    let scene = sim_host(HttpTokens::Optional);
    let _proxy = Proxy::start_in(&scene, mode, &[]);
    fresh_network("imds-test-reuse", "172.30.99.0/24");
    let net = ["--network", "imds-test-reuse", "--ip", "172.30.99.10"];
    let a = Running::start(&[&net[..], &["--label", "iam.amazonaws.com/role=RoleA"]].concat());
    assert_eq!(get_credentials(&a, "RoleA").0, 200);
    drop(a);
    let b = Running::start(&[&net[..], &["--label", "iam.amazonaws.com/role=RoleB"]].concat());
    let ip = docker_ok(&[
        "inspect",
        "-f",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
        &b.0,
    ])
    .unwrap();
    assert_eq!(ip.trim(), "172.30.99.10", "B has A's address");
    let out = b.exec("curl -s -w '\\n== %{http_code}\\n' http://169.254.169.254/latest/meta-data/iam/security-credentials/");
    assert_eq!(answers(&out), vec![(200, "RoleB".to_owned())], "{out}");
    assert_eq!(get_credentials(&b, "RoleA"), (404, "Not Found".to_owned()));
    let (status, creds) = get_credentials(&b, "RoleB");
    assert_eq!(status, 200);
    let creds: serde_json::Value = serde_json::from_str(&creds).unwrap();
    assert!(caller_arn(&scene, &creds).contains(":assumed-role/RoleB/"));
    drop(b);
    docker_ok(&["network", "rm", "imds-test-reuse"]).unwrap();
}

imds_tests::per_mode! { an_address_taken_from_a_running_container_is_not_its_identity_any_more => an_address_taken_from_a_running_container_is_not_its_identity_any_more_in; }

/// A keeps running but is disconnected from the network; B gets A's address there. B's requests
/// are B's, although A's first process is alive in A's cgroup: the address left A's namespace.
fn an_address_taken_from_a_running_container_is_not_its_identity_any_more_in(mode: Mode) {
    let scene = sim_host(HttpTokens::Optional);
    let proxy = Proxy::start_in(&scene, mode, &[]);
    fresh_network("imds-test-moved", "172.30.98.0/24");
    let net = ["--network", "imds-test-moved", "--ip", "172.30.98.10"];
    let a = Running::start(&[&net[..], &["--label", "iam.amazonaws.com/role=RoleA"]].concat());
    // Three times: the second is confirmed the fast way (tc mode: by the kernel, not Docker),
    // and the third by the watch on that confirmation.
    assert_eq!(get_credentials(&a, "RoleA").0, 200);
    assert_eq!(get_credentials(&a, "RoleA").0, 200);
    assert_eq!(get_credentials(&a, "RoleA").0, 200);
    let by = |how: &str| {
        proxy.metric(&format!(
            "imds_proxy_tc_address_confirmations_total{{by=\"{how}\"}}"
        ))
    };
    if mode == Mode::Tc {
        // The premise: A's address is confirmed by a watch when it moves (A still running).
        assert!(by("watch") >= 1, "A's third request: {}", by("watch"));
        assert_eq!(proxy.metric("imds_proxy_tc_watched_addresses"), 1);
    }
    docker_ok(&["network", "disconnect", "imds-test-moved", &a.0]).unwrap();
    let b = Running::start(&[&net[..], &["--label", "iam.amazonaws.com/role=RoleB"]].concat());
    let out = b.exec("curl -s -w '\\n== %{http_code}\\n' http://169.254.169.254/latest/meta-data/iam/security-credentials/");
    assert_eq!(answers(&out), vec![(200, "RoleB".to_owned())], "{out}");
    assert_eq!(get_credentials(&b, "RoleA"), (404, "Not Found".to_owned()));
    if mode == Mode::Tc {
        // A's second request at least: A was indexed (with its pid) by then. B's may go either
        // way (B can be indexed before it asks), so only A's is counted on.
        assert!(by("kernel") >= 1, "A's second request: {}", by("kernel"));
    }
    drop((a, b));
    docker_ok(&["network", "rm", "imds-test-moved"]).unwrap();
}

imds_tests::per_mode! { ipv6_credentials_end_to_end => ipv6_credentials_end_to_end_in; }

/// IPv6 through the binary: a container on an IPv6 network gets its role's credentials from
/// [fd00:ec2::254], and nothing of it reaches the simulated IMDS.
fn ipv6_credentials_end_to_end_in(mode: Mode) {
    let scene = sim_host(HttpTokens::Optional);
    let _proxy = Proxy::start_in(&scene, mode, &[]);
    /// A Docker network removed on drop, whatever happens in between.
    struct Network(String);
    impl Drop for Network {
        fn drop(&mut self) {
            let _ = docker(&["network", "rm", &self.0]);
        }
    }
    let network = Network(format!("imds-test-v6-{}", rand_suffix()));
    docker_ok(&[
        "network",
        "create",
        "--ipv6",
        "--subnet",
        "fd00:dead:beef::/64",
        &network.0,
    ])
    .unwrap();
    let script = r#"
T=$(curl -s -g -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' 'http://[fd00:ec2::254]/latest/api/token')
curl -s -g -w '\n== %{http_code}\n' -H "X-aws-ec2-metadata-token: $T" 'http://[fd00:ec2::254]/latest/meta-data/iam/security-credentials/'
curl -s -g -w '\n== %{http_code}\n' -H "X-aws-ec2-metadata-token: $T" 'http://[fd00:ec2::254]/latest/meta-data/iam/security-credentials/Six'
"#;
    let (_, _, out) = in_container(
        &[
            "--network",
            &network.0,
            "--label",
            "iam.amazonaws.com/role=Six",
        ],
        script,
    );
    drop(network);
    let got = answers(&out);
    assert_eq!(got.len(), 2, "{mode:?}: {out}");
    assert_eq!(got[0], (200, "Six".to_owned()), "{mode:?}: {out}");
    assert_eq!(got[1].0, 200, "{mode:?}: {out}");
    let doc: serde_json::Value = serde_json::from_str(&got[1].1).expect("a credentials document");
    assert!(doc["AccessKeyId"].is_string(), "{mode:?}: {doc}");
    let from_containers: Vec<String> = scene
        .sim_requests()
        .into_iter()
        .filter(|l| l.contains("peer=[fd00:dead:beef"))
        .collect();
    assert!(from_containers.is_empty(), "{mode:?}: {from_containers:#?}");
}

/// On a host whose IPv6 is disabled the proxy starts, serves IPv4 only and says so; it used to
/// exit at start (adding the IPv6 listen address: permission denied), leaving every container
/// unprotected.
#[test]
fn the_proxy_serves_on_a_host_without_ipv6() {
    let scene = sim_host(HttpTokens::Optional);
    // Restored when the test ends, panics included (before the scene goes).
    let _all = imds_tests::kernel::Sysctl::set("net.ipv6.conf.all.disable_ipv6", "1").unwrap();
    let _default =
        imds_tests::kernel::Sysctl::set("net.ipv6.conf.default.disable_ipv6", "1").unwrap();
    let proxy = Proxy::start(&scene, &[]);
    proxy.wait_for_log(&["IPv6 is disabled on this host", "serving IPv4 only"]);
    assert_gets_role(&scene, &["--label", "iam.amazonaws.com/role=Web"], "Web");
}
