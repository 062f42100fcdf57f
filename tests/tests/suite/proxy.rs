//! The proxy's IMDS API, end to end: the `imds-proxy` binary on the simulated EC2 host, in cgroup
//! mode and in tc mode, moto as STS, real Docker containers asking with curl. Every check asserts
//! the exact status and body a container gets.
use std::{process::Command, time::Duration};

use crate::{sim_host, sim_host_config};
use imds_proxy::netdev;
use imds_tests::{
    containers::{Running, answers, caller_arn, in_container, rand_suffix},
    faults::{Fault, Injector},
    http::Request,
    images::{bench_image, curl_image, docker, docker_ok},
    kernel::{TestCgroup, place},
    proxy::{Mode, PREFIX, Proxy, TEST_IF, proxy_bin},
    scene::{ACCOUNT_ID, INSTANCE_ROLE, Scene, ensure_imds_is_simulated},
    sim::HttpTokens,
};

/// The seed's flow: PUT a token, GET the role name, GET the credentials. Prints each status and
/// body as `== <status>` lines.
const SDK_FLOW: &str = r#"
T=$(curl -s -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' http://169.254.169.254/latest/api/token)
R=$(curl -s -H "X-aws-ec2-metadata-token: $T" http://169.254.169.254/latest/meta-data/iam/security-credentials/)
curl -s -w '\n== %{http_code}\n' -H "X-aws-ec2-metadata-token: $T" http://169.254.169.254/latest/meta-data/iam/security-credentials/
curl -s -w '\n== %{http_code}\n' -H "X-aws-ec2-metadata-token: $T" "http://169.254.169.254/latest/meta-data/iam/security-credentials/$R"
"#;

/// The SDK flow against the IPv4 IMDS in its v4-mapped form, as a dual-stack client (the JVM)
/// reaches it: an AF_INET6 socket talking IPv4.
fn sdk_flow_v4_mapped() -> String {
    SDK_FLOW
        .replace("curl -s", "curl -g -s")
        .replace("http://169.254.169.254", "http://[::ffff:169.254.169.254]")
}

/// Run the SDK flow in a container; assert it got `role`; return the credentials.
fn assert_gets_role(scene: &Scene, docker_args: &[&str], role: &str) -> serde_json::Value {
    assert_gets_role_with(scene, docker_args, role, SDK_FLOW)
}

/// [`assert_gets_role`] with another flow script.
fn assert_gets_role_with(
    scene: &Scene,
    docker_args: &[&str],
    role: &str,
    flow: &str,
) -> serde_json::Value {
    let (_, name, out) = in_container(docker_args, flow);
    let got = answers(&out);
    assert_eq!(got.len(), 2, "{out}");
    assert_eq!(got[0], (200, role.to_owned()), "{out}");
    assert_eq!(got[1].0, 200, "{out}");
    let creds: serde_json::Value = serde_json::from_str(&got[1].1).unwrap();
    assert_eq!(creds["Code"], "Success");
    assert_eq!(creds["Type"], "AWS-HMAC");
    assert_eq!(
        caller_arn(scene, &creds),
        format!("arn:aws:sts::{ACCOUNT_ID}:assumed-role/{role}/{name}"),
        "the session is the container's role, named after the container"
    );
    creds
}

imds_tests::per_mode! { label_env_and_default_roles => label_env_and_default_roles_in; }

fn label_env_and_default_roles_in(mode: Mode) {
    let scene = sim_host(HttpTokens::Optional);
    let proxy = Proxy::start_in(&scene, mode, &["--default-role", "DefaultRole"]);
    assert_gets_role(&scene, &["--label", "iam.amazonaws.com/role=Web"], "Web");
    assert_gets_role(&scene, &["--env", "IAM_ROLE=Worker"], "Worker");
    assert_gets_role(
        &scene,
        &[
            "--label",
            "iam.amazonaws.com/role=Web",
            "--env",
            "IAM_ROLE=Worker",
        ],
        "Web",
    );
    assert_gets_role(&scene, &[], "DefaultRole");
    // A full ARN under the prefix.
    assert_gets_role(
        &scene,
        &["--label", &format!("iam.amazonaws.com/role={PREFIX}Api")],
        "Api",
    );
    let vends = proxy
        .log()
        .iter()
        .filter(|l| l.contains("credentials vended") && l.contains("access_key_id=ASIA"))
        .count();
    assert_eq!(vends, 5, "one audit line per vend: {:#?}", proxy.log());
}

/// A host-network container's IMDS traffic never crosses a container interface: cgroup mode
/// redirects it like any other; tc mode covers it with the cgroup programs in the host's network
/// namespace. Either way it gets its own role, never the instance's, in both address forms.
fn a_host_network_container_gets_its_own_role_in(mode: Mode) {
    let scene = sim_host(HttpTokens::Optional);
    let _proxy = Proxy::start_in(&scene, mode, &[]);
    let host = [
        "--network",
        "host",
        "--label",
        "iam.amazonaws.com/role=HostNet",
    ];
    assert_gets_role(&scene, &host, "HostNet");
    assert_gets_role_with(&scene, &host, "HostNet", &sdk_flow_v4_mapped());
    // A bridged one through the v4-mapped form as well.
    let bridged = ["--label", "iam.amazonaws.com/role=Bridged"];
    assert_gets_role_with(&scene, &bridged, "Bridged", &sdk_flow_v4_mapped());
}

#[test]
fn a_host_network_container_gets_its_own_role_in_cgroup_mode() {
    a_host_network_container_gets_its_own_role_in(Mode::Cgroup);
}

#[test]
fn a_host_network_container_gets_its_own_role_in_tc_mode() {
    a_host_network_container_gets_its_own_role_in(Mode::Tc);
}

/// An image that names a role for itself: `LABEL iam.amazonaws.com/role=Admin`,
/// `ENV IAM_ROLE=Admin`, built locally from the curl image.
fn self_naming_image() -> &'static str {
    const TAG: &str = "imds-test/self-naming:1";
    let dockerfile = format!(
        "FROM {}\nLABEL iam.amazonaws.com/role=Admin\nENV IAM_ROLE=Admin\n",
        curl_image().unwrap()
    );
    let mut child = Command::new("docker")
        .args(["build", "--quiet", "--tag", TAG, "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(dockerfile.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "docker build: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    TAG
}

/// Run the SDK flow in a container of `image`; (name, answers).
fn flow_in_image(image: &str, docker_args: &[&str]) -> (String, Vec<(u16, String)>) {
    ensure_imds_is_simulated().unwrap();
    let name = format!("imds-test-{}", rand_suffix());
    let mut args = vec!["run", "-d", "--name", &name];
    args.extend_from_slice(docker_args);
    args.extend_from_slice(&[image, "sh", "-c", SDK_FLOW]);
    let id = docker_ok(&args).unwrap().trim().to_owned();
    docker_ok(&["wait", &id]).unwrap();
    let logs = docker(&["logs", &id]).unwrap();
    docker_ok(&["rm", "-f", &id]).unwrap();
    (name, answers(&String::from_utf8_lossy(&logs.stdout)))
}

/// A container whose runner put its cgroup outside Docker's default parent
/// (`--cgroup-parent=/elsewhere`) is still redirected and gets its own role: by default the
/// programs attach at the v2 root. With a narrower attach point given by hand, such a container
/// is reported (an error and a count) as soon as it starts.
#[test]
fn a_container_outside_dockers_parent_cgroup_is_covered() {
    let scene = sim_host(HttpTokens::Optional);
    let elsewhere = [
        "--cgroup-parent",
        "/imds-test-elsewhere",
        "--label",
        "iam.amazonaws.com/role=Elsewhere",
    ];
    {
        let proxy = Proxy::start(&scene, &[]);
        assert_gets_role(&scene, &elsewhere, "Elsewhere");
        assert_eq!(proxy.metric("imds_proxy_uncovered_containers_total"), 0);
    }
    let root = imds_tests::kernel::cgroup2_root().unwrap();
    let docker_parent = root.join("docker");
    std::fs::create_dir_all(&docker_parent).unwrap();
    let proxy = Proxy::start(&scene, &["--cgroup", docker_parent.to_str().unwrap()]);
    let name = format!("imds-test-{}", rand_suffix());
    let mut run = vec!["run", "-d", "--name", &name];
    run.extend_from_slice(&elsewhere);
    run.extend_from_slice(&[curl_image().unwrap(), "sleep", "60"]);
    docker_ok(&run).unwrap();
    proxy.wait_for_log(&["outside every attach point", "imds-test-elsewhere"]);
    assert_eq!(proxy.metric("imds_proxy_uncovered_containers_total"), 1);
    docker_ok(&["rm", "-f", &name]).unwrap();
}

/// Docker's systemd driver puts containers beside the host's own services
/// (`system.slice/docker-<id>.scope` next to `sshd.service`). Attached at such a slice,
/// `--cgroup-filter` redirects the containers and leaves the services alone. Through the binary,
/// with the same layout built with the cgroupfs driver (`--cgroup-parent` a slice; systemd is
/// not PID 1 on these machines, so Docker cannot run its systemd driver here): a container and a
/// host service share one slice.
#[test]
fn a_slice_shared_by_containers_and_host_services_is_filtered() {
    let scene = sim_host(HttpTokens::Optional);
    let slice = TestCgroup::new("imds-test.slice").unwrap();
    let service = slice.child("host-daemon.service").unwrap();
    let attach = slice.path().to_str().unwrap();
    let in_slice = [
        "--cgroup-parent",
        "/imds-test.slice",
        "--label",
        "iam.amazonaws.com/role=Sliced",
    ];
    // What the host service gets for the instance's role name.
    let service_asks = || -> serde_json::Value {
        ensure_imds_is_simulated().unwrap();
        let mut probe = Command::new(env!("CARGO_BIN_EXE_imds-probe"));
        probe.args(["--path", "/latest/meta-data/iam/security-credentials/"]);
        place(&mut probe, service.path(), None).unwrap();
        let out = probe.output().unwrap();
        let line = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(line.lines().next().unwrap_or_default())
            .unwrap_or_else(|e| panic!("{e}: {line}"))
    };
    {
        let proxy = Proxy::start(
            &scene,
            &[
                "--cgroup",
                attach,
                "--cgroup-filter",
                "--host-cgroup",
                "/imds-test.slice/*.service",
            ],
        );
        assert_gets_role(&scene, &in_slice, "Sliced");
        let answer = service_asks();
        assert_eq!(
            (&answer["status"], &answer["body"], &answer["server"]),
            (
                &serde_json::json!(200),
                &serde_json::json!("InstanceRole"),
                &serde_json::Value::Null
            ),
            "the host service reaches the instance's IMDS itself: {answer}"
        );
        proxy.wait_for_log(&["filter mode: cgroups classified", "imds-test.slice"]);
    }
    // Without the filter every socket below the attach point is a container's: the host service
    // is redirected too, and (no container) has no role.
    let _proxy = Proxy::start(&scene, &["--cgroup", attach]);
    let answer = service_asks();
    assert_eq!(answer["server"], "imds-proxy", "{answer}");
    assert_eq!(answer["status"], 404, "{answer}");
}

#[test]
fn an_image_does_not_choose_its_own_role() {
    let scene = sim_host(HttpTokens::Optional);
    let image = self_naming_image();
    // The image's own Admin is ignored: the default role applies, and the log says why.
    let proxy = Proxy::start(&scene, &["--default-role", "DefaultRole"]);
    let (name, got) = flow_in_image(image, &[]);
    assert_eq!(got[0], (200, "DefaultRole".to_owned()), "{got:?}");
    proxy.wait_for_log(&[&name, "come from the container's image", "IAM_ROLE=Admin"]);
    // Without a default role it has none at all.
    drop(proxy);
    let proxy = Proxy::start(&scene, &[]);
    let (_, got) = flow_in_image(image, &[]);
    assert_eq!(got[0], (404, "Not Found".to_owned()), "{got:?}");
    // What its runner sets counts, label or env, even over the image's own.
    let (_, got) = flow_in_image(image, &["--label", "iam.amazonaws.com/role=Web"]);
    assert_eq!(got[0], (200, "Web".to_owned()), "{got:?}");
    let (_, got) = flow_in_image(image, &["--env", "IAM_ROLE=Worker"]);
    assert_eq!(got[0], (200, "Worker".to_owned()), "{got:?}");
    // --trust-image-role restores the image's say.
    drop(proxy);
    let _proxy = Proxy::start(&scene, &["--trust-image-role"]);
    let (_, got) = flow_in_image(image, &[]);
    assert_eq!(got[0], (200, "Admin".to_owned()), "{got:?}");
}

imds_tests::per_mode! { no_role_means_404_and_never_the_instance_role => no_role_means_404_and_never_the_instance_role_in; }

fn no_role_means_404_and_never_the_instance_role_in(mode: Mode) {
    let scene = sim_host(HttpTokens::Optional);
    let proxy = Proxy::start_in(&scene, mode, &[]);
    let script = r#"
T=$(curl -s -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' http://169.254.169.254/latest/api/token)
for p in iam/security-credentials/ iam/security-credentials/InstanceRole iam/security-credentials/InstanceRole/ iam/info iam/ identity-credentials/ec2/security-credentials/ec2-instance; do
  curl -s -w '\n== %{http_code}\n' -H "X-aws-ec2-metadata-token: $T" "http://169.254.169.254/latest/meta-data/$p"
done
curl -s -w '\n== %{http_code}\n' -H "X-aws-ec2-metadata-token: $T" http://169.254.169.254/2021-03-23/meta-data/iam/security-credentials/InstanceRole
curl -s -w '\n== %{http_code}\n' -H "X-aws-ec2-metadata-token: $T" http://169.254.169.254/latest/user-data
curl -s -w '\n== %{http_code}\n' -H "X-aws-ec2-metadata-token: $T" http://169.254.169.254/latest/meta-data/instance-id
"#;
    let (_, _, out) = in_container(&[], script);
    let got = answers(&out);
    let not_found = (404, "Not Found".to_owned());
    assert_eq!(got.len(), 9, "{out}");
    for answer in &got[..8] {
        assert_eq!(answer, &not_found, "{out}");
    }
    assert_eq!(
        got[8],
        (200, "i-0123456789abcdef0".to_owned()),
        "passed through"
    );
    assert!(!out.contains(INSTANCE_ROLE), "{out}");
    // Denied by the proxy, not by a simulator that lacks the path: it serves the dated tree too,
    // and heard none of these.
    let asked: Vec<String> = scene
        .sim_requests()
        .into_iter()
        .filter(|l| {
            l.contains("/iam/") || l.contains("user-data") || l.contains("identity-credentials")
        })
        .collect();
    assert!(asked.is_empty(), "{mode:?}: {asked:#?}");
    assert!(
        proxy.log().iter().any(|l| l.contains("no role: no label")),
        "the log says why: {:#?}",
        proxy.log()
    );
    assert_eq!(proxy.metric("imds_proxy_sts_calls_total"), 0);
}

#[test]
fn roles_outside_the_prefix_or_the_allow_list_are_refused_without_sts() {
    let scene = sim_host(HttpTokens::Optional);
    let proxy = Proxy::start(
        &scene,
        &[
            "--allowed-roles",
            "arn:aws:iam::123456789012:role/containers/web-*",
        ],
    );
    for label in [
        "iam.amazonaws.com/role=arn:aws:iam::123456789012:role/Admin",
        "iam.amazonaws.com/role=db",
    ] {
        let name = label.rsplit(['/', '=']).next().unwrap();
        let script = format!(
            "curl -s -w '\\n== %{{http_code}}\\n' http://169.254.169.254/latest/meta-data/iam/security-credentials/; \
             curl -s -w '\\n== %{{http_code}}\\n' http://169.254.169.254/latest/meta-data/iam/security-credentials/{name}"
        );
        let (_, _, out) = in_container(&["--label", label], &script);
        let got = answers(&out);
        assert_eq!(got[0], (404, "Not Found".to_owned()), "{label}: {out}");
        assert_eq!(got[1], (404, "Not Found".to_owned()), "{label}: {out}");
    }
    let refused = proxy
        .log()
        .iter()
        .filter(|l| l.contains("role refused; no STS call made"))
        .count();
    assert!(refused >= 2, "{:#?}", proxy.log());
    assert!(
        proxy
            .log()
            .iter()
            .any(|l| l.contains("is not under the role ARN prefix"))
    );
    assert!(
        proxy
            .log()
            .iter()
            .any(|l| l.contains("is not in --allowed-roles"))
    );
    assert_eq!(proxy.metric("imds_proxy_sts_calls_total"), 0);
    assert_gets_role(
        &scene,
        &["--label", "iam.amazonaws.com/role=web-api"],
        "web-api",
    );
}

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

/// By default a container needs a token exactly when the instance does (its HttpTokens
/// setting); `--require-imdsv2=true|false` overrides it either way.
#[test]
fn imdsv2_is_required_as_the_instance_requires_it() {
    let plain_get = "curl -s -w '\\n== %{http_code}\\n' http://169.254.169.254/latest/meta-data/iam/security-credentials/";
    let role = ["--label", "iam.amazonaws.com/role=Web"];
    for (tokens, flags, expected, log) in [
        (
            HttpTokens::Required,
            &[][..],
            401,
            "required as on the instance",
        ),
        (
            HttpTokens::Optional,
            &[][..],
            200,
            "optional as on the instance",
        ),
        (
            HttpTokens::Required,
            &["--require-imdsv2=false"][..],
            200,
            "as configured",
        ),
        (
            HttpTokens::Optional,
            &["--require-imdsv2"][..],
            401,
            "as configured",
        ),
    ] {
        let scene = sim_host_config(tokens).start().unwrap();
        let proxy = Proxy::start(&scene, flags);
        proxy.wait_for_log(&["IMDSv2 tokens", log]);
        let (_, _, out) = in_container(&role, plain_get);
        assert_eq!(answers(&out)[0].0, expected, "{tokens:?} {flags:?}: {out}");
    }
}

imds_tests::per_mode! { tokens_are_bound_to_their_container_and_v2_can_be_required => tokens_are_bound_to_their_container_and_v2_can_be_required_in; }

fn tokens_are_bound_to_their_container_and_v2_can_be_required_in(mode: Mode) {
    let scene = sim_host(HttpTokens::Optional);
    let _proxy = Proxy::start_in(&scene, mode, &["--require-imdsv2"]);
    let mint = "curl -s -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' http://169.254.169.254/latest/api/token";
    let (_, _, token_a) = in_container(&["--label", "iam.amazonaws.com/role=RoleA"], mint);
    assert!(token_a.len() > 40, "{token_a}");
    let use_a = format!(
        "curl -s -w '\\n== %{{http_code}}\\n' -H 'X-aws-ec2-metadata-token: {}' http://169.254.169.254/latest/meta-data/iam/security-credentials/; \
         curl -s -w '\\n== %{{http_code}}\\n' http://169.254.169.254/latest/meta-data/iam/security-credentials/; \
         curl -s -w '\\n== %{{http_code}}\\n' -H 'X-aws-ec2-metadata-token: garbage' http://169.254.169.254/latest/meta-data/instance-id",
        token_a.trim()
    );
    let (_, _, out) = in_container(&["--label", "iam.amazonaws.com/role=RoleB"], &use_a);
    let unauthorized = (401, "Unauthorized".to_owned());
    assert_eq!(
        answers(&out),
        vec![unauthorized.clone(), unauthorized.clone(), unauthorized],
        "{out}"
    );
    // Token requests: TTL bounds and the anti-SSRF rule, as IMDS answers them.
    let puts = r#"
for ttl in 0 1 21600 21601 x; do curl -s -o /dev/null -w '== %{http_code}\n' -X PUT -H "X-aws-ec2-metadata-token-ttl-seconds: $ttl" http://169.254.169.254/latest/api/token; done
curl -s -o /dev/null -w '== %{http_code}\n' -X PUT http://169.254.169.254/latest/api/token
curl -s -o /dev/null -w '== %{http_code}\n' -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' -H 'X-Forwarded-For: 1.2.3.4' http://169.254.169.254/latest/api/token
curl -s -D - -o /dev/null -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 77' http://169.254.169.254/latest/api/token | grep -i ttl
"#;
    let (_, _, out) = in_container(&[], puts);
    let statuses: Vec<u16> = answers(&out).iter().map(|(s, _)| *s).collect();
    assert_eq!(statuses, [400, 200, 200, 400, 400, 400, 403], "{out}");
    assert!(
        out.to_ascii_lowercase()
            .contains("x-aws-ec2-metadata-token-ttl-seconds: 77"),
        "{out}"
    );
}

/// Through the binary: the prefetch at start and fifty concurrent requests make one STS call
/// between them, whichever comes first. (Whether the requests meet the call in flight depends on
/// timing here; `credentials::tests::concurrent_requests_for_one_key_make_one_sts_call` holds the
/// call open and proves the single flight itself.)
#[test]
fn fifty_concurrent_first_requests_make_one_sts_call() {
    let scene = sim_host(HttpTokens::Optional);
    // STS answers after 2 s, so the container's requests come while the first call (the
    // prefetch at its start, or the first request's) is still under way: the single flight is
    // what they meet, not a session already cached. The answer budget is longer still, so that
    // each request waits for that call's answer instead of a 503.
    let sts = Injector::start(scene.sts_endpoint().unwrap());
    sts.set(Fault::Delay(Duration::from_secs(2)));
    let proxy = Proxy::start(
        &scene,
        &["--sts-endpoint", &sts.url(), "--answer-within", "4s"],
    );
    let script = r#"
for i in $(seq 50); do
  curl -s -o /dev/null -w '== %{http_code}\n' http://169.254.169.254/latest/meta-data/iam/security-credentials/Burst &
done
wait
"#;
    let (_, _, out) = in_container(&["--label", "iam.amazonaws.com/role=Burst"], script);
    let statuses: Vec<u16> = answers(&out).iter().map(|(s, _)| *s).collect();
    assert_eq!(statuses, vec![200; 50], "{out}");
    assert_eq!(proxy.metric("imds_proxy_sts_calls_total"), 1);
    assert_eq!(proxy.metric("imds_proxy_credentials_vended_total"), 50);
    // The premise: requests did wait on the call under way.
    let joined = proxy.metric("imds_proxy_sts_calls_joined_total");
    eprintln!("{joined} of 50 requests met the STS call under way");
    assert!(joined >= 1, "no request met the STS call under way");
}

#[test]
fn bad_input_gets_clean_4xx_and_never_reaches_upstream_raw() {
    let scene = sim_host(HttpTokens::Optional);
    let proxy = Proxy::start(&scene, &[]);
    let script = r#"
U=http://169.254.169.254
curl -s -o /dev/null -w '== %{http_code}\n' --path-as-is "$U/latest/meta-data/../meta-data/iam/security-credentials/"
curl -s -o /dev/null -w '== %{http_code}\n' --path-as-is "$U/latest/meta-data/%2e%2e/user-data"
curl -s -o /dev/null -w '== %{http_code}\n' --path-as-is "$U/latest//user-data"
curl -s -o /dev/null -w '== %{http_code}\n' --path-as-is "$U/latest/meta-data/$(printf '\377\376')"
curl -s -o /dev/null -w '== %{http_code}\n' -X POST "$U/latest/meta-data/"
curl -s -o /dev/null -w '== %{http_code}\n' -X DELETE "$U/latest/api/token"
curl -s -o /dev/null -w '== %{http_code}\n' -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' "$U/2021-03-23/api/token"
curl -s -o /dev/null -w '== %{http_code}\n' -H "X-Big: $(head -c 70000 /dev/zero | tr '\0' a)" "$U/latest/meta-data/"
curl -s -o /dev/null -w '== %{http_code}\n' "$U/latest/meta-data/ami-id"
"#;
    let (_, _, out) = in_container(&[], script);
    let statuses: Vec<u16> = answers(&out).iter().map(|(s, _)| *s).collect();
    assert_eq!(statuses.len(), 9, "{out}");
    for (i, status) in statuses[..8].iter().enumerate() {
        assert!((400..500).contains(status), "request {i}: {status}: {out}");
    }
    assert_eq!(statuses[0], 400);
    assert_eq!(statuses[4], 405);
    assert_eq!(statuses[5], 405);
    assert_eq!(statuses[6], 403);
    assert_eq!(statuses[8], 200, "still serving after all that");
    // The only path that reached the simulator (besides the proxy's own token, region, and its
    // token-less probe of whether the instance requires IMDSv2) is the valid one.
    let upstream: Vec<String> = scene
        .sim_requests()
        .into_iter()
        .filter(|l| !l.contains("/latest/api/token") && !l.contains("placement/region"))
        .filter(|l| !(l.contains("path=\"/latest/meta-data/\"") && l.contains("token=\"none\"")))
        .collect();
    assert_eq!(upstream.len(), 1, "{upstream:#?}");
    assert!(
        upstream[0].contains("path=\"/latest/meta-data/ami-id\""),
        "{upstream:#?}"
    );
    assert!(
        proxy
            .log()
            .iter()
            .any(|l| l.contains("refused: malformed path")),
        "{:#?}",
        proxy.log()
    );
}

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
    proxy.wait_for_log(&["--runtime Podman, but unix:///var/run/docker.sock is Docker's API"]);
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

/// `docker run --cgroup-parent=/docker/<victim>` puts a new container's cgroup inside the
/// victim's (`/docker/<victim>/<new>`): it is identified as itself, never as the victim. And a
/// container cannot pass for another by its cgroup's name alone: the id must be where Docker put
/// that container.
#[test]
fn a_container_inside_another_ones_cgroup_is_not_that_one() {
    let scene = sim_host(HttpTokens::Optional);
    let _proxy = Proxy::start(&scene, &["--default-role", "DefaultRole"]);
    let victim = Running::start(&["--label", "iam.amazonaws.com/role=Victim"]);
    assert_eq!(
        get_credentials(&victim, "Victim").0,
        200,
        "the victim's own role"
    );
    let parent = format!("--cgroup-parent=/docker/{}", victim.0);
    let intruder = Running::start(&[&parent]);
    // The premise: the intruder's cgroup is inside the victim's.
    let cgroup = intruder.exec("cat /proc/self/cgroup");
    assert!(
        cgroup.contains(&format!("0::/docker/{}/{}", victim.0, intruder.0)),
        "{cgroup}"
    );
    let role = intruder.exec(
        "curl -s -w '\n== %{http_code}\n' http://169.254.169.254/latest/meta-data/iam/security-credentials/",
    );
    assert_eq!(
        answers(&role).pop(),
        Some((200, "DefaultRole".to_owned())),
        "its own (default) role, not the victim's: {role}"
    );
    assert_eq!(get_credentials(&intruder, "Victim").0, 404);
}

/// A user-defined Docker network `name` on `subnet`, created anew (one left by a failed run is
/// removed first).
fn fresh_network(name: &str, subnet: &str) {
    let _ = docker(&["network", "rm", name]);
    docker_ok(&["network", "create", "--subnet", subnet, name]).unwrap();
}

fn get_credentials(container: &Running, role: &str) -> (u16, String) {
    let out = container.exec(&format!(
        "curl -s -w '\\n== %{{http_code}}\\n' http://169.254.169.254/latest/meta-data/iam/security-credentials/{role}"
    ));
    answers(&out).pop().unwrap_or_else(|| panic!("{out}"))
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

#[test]
fn an_sts_outage_serves_cached_credentials_and_recovers() {
    // Its own STS: this test stops it.
    let mut scene = sim_host_config(HttpTokens::Optional)
        .own_sts()
        .start()
        .expect("the simulated EC2 host starts");
    let _proxy = Proxy::start(&scene, &[]);
    let cached = Running::start(&["--label", "iam.amazonaws.com/role=Steady"]);
    let (status, first) = get_credentials(&cached, "Steady");
    assert_eq!(status, 200, "{first}");
    let first: serde_json::Value = serde_json::from_str(&first).unwrap();

    scene.stop_sts().unwrap();
    let (status, during) = get_credentials(&cached, "Steady");
    assert_eq!(
        status, 200,
        "the cached session is served through the outage: {during}"
    );
    let during: serde_json::Value = serde_json::from_str(&during).unwrap();
    assert_eq!(during["AccessKeyId"], first["AccessKeyId"]);
    // A role never fetched: nothing to serve, an error the SDKs retry (5xx, IMDS-style JSON).
    let fresh = Running::start(&["--label", "iam.amazonaws.com/role=Fresh"]);
    let (status, body) = get_credentials(&fresh, "Fresh");
    assert_eq!(status, 503, "{body}");
    let error: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(error["Code"], "ServiceUnavailable");
    assert!(error["Message"].as_str().unwrap().contains("retry"));

    scene.start_sts().unwrap();
    // The failure is remembered for a back-off (1 s doubling, at most a minute) so that a
    // failing role is not an STS call per request: asked again, as an SDK retries, until served.
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let (status, body) = get_credentials(&fresh, "Fresh");
        if status == 200 {
            break;
        }
        assert_eq!(status, 503, "{body}");
        assert!(
            std::time::Instant::now() < deadline,
            "not recovered: {body}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
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

/// `--allow-user-data` passes the instance's user data through (denied without it: the no-role
/// test); nothing else about the container changes.
#[test]
fn user_data_is_passed_through_only_when_allowed() {
    let scene = sim_host(HttpTokens::Optional);
    let _proxy = Proxy::start(&scene, &["--allow-user-data"]);
    let script = r#"
T=$(curl -s -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' http://169.254.169.254/latest/api/token)
curl -s -w '\n== %{http_code}\n' -H "X-aws-ec2-metadata-token: $T" http://169.254.169.254/latest/user-data
curl -s -w '\n== %{http_code}\n' -H "X-aws-ec2-metadata-token: $T" http://169.254.169.254/latest/meta-data/iam/security-credentials/InstanceRole
"#;
    let (_, _, out) = in_container(&[], script);
    let got = answers(&out);
    assert_eq!(got.len(), 2, "{out}");
    assert_eq!(got[0].0, 200, "{out}");
    assert!(got[0].1.contains("imds-sim user-data"), "{out}");
    assert_eq!(
        got[1],
        (404, "Not Found".to_owned()),
        "still never the instance role"
    );
    assert!(
        scene
            .sim_requests()
            .iter()
            .any(|l| l.contains("path=\"/latest/user-data\"") && l.contains("status=200")),
        "asked of the upstream: {:#?}",
        scene.sim_requests()
    );
}

/// A container that starts with a role has its session fetched before it asks (the start event's
/// prefetch): its first request is served from the cache, with no STS call of its own.
#[test]
fn a_role_is_fetched_when_its_container_starts() {
    let scene = sim_host(HttpTokens::Optional);
    let proxy = Proxy::start(&scene, &[]);
    let container = Running::start(&["--label", "iam.amazonaws.com/role=Early"]);
    proxy.wait_for_log(&["assumed role", "role/containers/Early"]);
    assert_eq!(proxy.metric("imds_proxy_sts_calls_total"), 1, "prefetched");
    assert_eq!(
        proxy.metric("imds_proxy_cache_hits_total"),
        0,
        "nothing asked yet"
    );
    let out = container.exec(
        r#"T=$(curl -s -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' http://169.254.169.254/latest/api/token)
curl -s -o /dev/null -w '== %{http_code}\n' -H "X-aws-ec2-metadata-token: $T" http://169.254.169.254/latest/meta-data/iam/security-credentials/Early"#,
    );
    assert_eq!(answers(&out).first().map(|a| a.0), Some(200), "{out}");
    assert_eq!(
        proxy.metric("imds_proxy_sts_calls_total"),
        1,
        "no call of its own"
    );
    assert_eq!(
        proxy.metric("imds_proxy_cache_hits_total"),
        1,
        "served from the prefetch"
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

/// A container's credentials are fetched when Docker reports it created, before it starts: its
/// first request, the moment it starts, makes no STS call of its own.
#[test]
fn a_container_s_credentials_are_fetched_when_it_is_created() {
    let scene = sim_host(HttpTokens::Optional);
    let proxy = Proxy::start(&scene, &[]);
    let calls = proxy.metric("imds_proxy_sts_calls_total");
    let id = docker_ok(&[
        "create",
        "--label",
        "iam.amazonaws.com/role=Early",
        curl_image().unwrap(),
        "sleep",
        "600",
    ])
    .unwrap()
    .trim()
    .to_owned();
    let created = Running(id);
    // Bounded wait for the prefetch: the container has not started.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while proxy.metric("imds_proxy_credential_cache_sessions") == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no session fetched for a created container: {:#?}",
            proxy.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(proxy.metric("imds_proxy_sts_calls_total"), calls + 1);
    let state = docker_ok(&["inspect", "-f", "{{.State.Status}}", &created.0]).unwrap();
    assert_eq!(state.trim(), "created", "fetched before it started");
    docker_ok(&["start", &created.0]).unwrap();
    let (status, body) = get_credentials(&created, "Early");
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        proxy.metric("imds_proxy_sts_calls_total"),
        calls + 1,
        "the first request found the session fetched at create"
    );
}

/// The proxy's STS client is configured as any AWS tool is: `AWS_ENDPOINT_URL_STS` names the
/// endpoint when `--sts-endpoint` does not (before, the SDK's public endpoint was used anyway),
/// and `AWS_MAX_ATTEMPTS` sets the attempts per call. But it signs only with the instance's
/// credentials: never with `AWS_ACCESS_KEY_ID` nor a profile's keys, both set here. The injector
/// in front of moto notes the key id of every signed request, and counts the attempts.
#[test]
fn the_sts_endpoint_can_come_from_the_standard_environment() {
    let scene = sim_host(HttpTokens::Optional);
    let sts = Injector::start(scene.sts_endpoint().unwrap());
    let endpoint = sts.url();
    let dir = std::env::temp_dir().join(format!("imds-test-aws-{}", rand_suffix()));
    std::fs::create_dir_all(&dir).unwrap();
    let credentials_file = dir.join("credentials");
    std::fs::write(
        &credentials_file,
        "[leaky]\naws_access_key_id = AKIAPROFILEKEY000000\naws_secret_access_key = profile\n",
    )
    .unwrap();
    let config_file = dir.join("config");
    std::fs::write(&config_file, "[profile leaky]\nregion = us-east-1\n").unwrap();
    let proxy = Proxy::start_with_env(
        &scene,
        Mode::Cgroup,
        &[],
        &[
            ("AWS_ENDPOINT_URL_STS", &endpoint),
            ("AWS_MAX_ATTEMPTS", "2"),
            ("AWS_ACCESS_KEY_ID", "AKIAENVIRONMENTKEY00"),
            ("AWS_SECRET_ACCESS_KEY", "environment"),
            ("AWS_PROFILE", "leaky"),
            (
                "AWS_SHARED_CREDENTIALS_FILE",
                credentials_file.to_str().unwrap(),
            ),
            ("AWS_CONFIG_FILE", config_file.to_str().unwrap()),
        ],
    );
    proxy.wait_for_log(&["STS client configured", &endpoint, "from the environment"]);
    let container = Running::start(&["--label", "iam.amazonaws.com/role=FromEnv"]);
    let (status, body) = get_credentials(&container, "FromEnv");
    assert_eq!(status, 200, "{body}");
    let creds: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(caller_arn(&scene, &creds).contains(":assumed-role/FromEnv/"));

    // Signed with the instance's key, every time (the premise: STS was asked through the
    // injector, signed).
    let instance_key = &scene.instance_credentials().unwrap().access_key_id;
    let signed: Vec<String> = sts.signed_with().into_iter().map(|(_, key)| key).collect();
    assert!(!signed.is_empty(), "STS was asked through the injector");
    assert!(
        signed.iter().all(|key| key == instance_key),
        "signed with {signed:?}, not only the instance's {instance_key}"
    );

    // Two attempts per call: with STS failing, every settled call made exactly two requests.
    let (calls_before, requests_before) =
        (proxy.metric("imds_proxy_sts_calls_total"), sts.requests());
    sts.set(Fault::HttpError(500));
    let broken = Running::start(&["--label", "iam.amazonaws.com/role=Broken"]);
    let (status, body) = get_credentials(&broken, "Broken");
    assert_eq!(status, 503, "{body}");
    let (calls, requests) = settled_sts_calls(&proxy, &sts);
    assert!(calls > calls_before, "a call for Broken was made");
    assert_eq!(
        requests - requests_before,
        2 * (calls - calls_before),
        "AWS_MAX_ATTEMPTS=2: two attempts per call"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The proxy's STS call count and the injector's request count at a moment when no call is under
/// way (every call counted has finished: `imds_proxy_sts_call_seconds_count` caught up), read
/// twice the same around the injector's count.
fn settled_sts_calls(proxy: &Proxy, sts: &Injector) -> (u64, u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let read = || {
            (
                proxy.metric("imds_proxy_sts_calls_total"),
                proxy.metric("imds_proxy_sts_call_seconds_count"),
            )
        };
        let (started, finished) = read();
        let requests = sts.requests();
        if started == finished && read() == (started, finished) {
            return (started, requests);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "STS calls never settled: {started} started, {finished} finished"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `deploy/systemd/imds-proxy.service`, as shipped.
fn systemd_unit() -> String {
    deployed("systemd/imds-proxy.service")
}

/// A file of `deploy/`, as shipped.
fn deployed(path: &str) -> String {
    let full = format!("{}/../deploy/{path}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&full).unwrap_or_else(|err| panic!("{full}: {err}"))
}

/// The one value of `key=` in the unit.
fn unit_value(unit: &str, key: &str) -> String {
    let values: Vec<&str> = unit
        .lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .collect();
    assert_eq!(values.len(), 1, "{key}= in the unit: {values:?}");
    values[0].trim().to_owned()
}

/// systemd's own check of the units: no unknown key, no key in the wrong section, a valid
/// command line. The binary they name is the one built here (the check wants it to exist). The
/// proxy's unit starts before the runtimes and says when it is ready (it attaches before it asks
/// the engine anything); the gate's runs before them too, and pins where the DaemonSet's proxy
/// pins, so that the proxy adopts what the gate attached.
#[test]
fn the_systemd_units_verify() {
    let unit = systemd_unit();
    assert_eq!(
        unit_value(&unit, "ExecStart"),
        "/usr/local/bin/imds-proxy run --config /etc/imds-proxy/config.toml"
    );
    let gate = deployed("systemd/imds-proxy-gate.service");
    assert_eq!(
        unit_value(&gate, "ExecStart"),
        "/usr/local/bin/imds-proxy gate --pin /sys/fs/bpf/imds-proxy"
    );
    assert!(deployed("kubernetes/daemonset.yaml").contains("- --pin=/sys/fs/bpf/imds-proxy\n"));
    // Fail closed across stops and crashes (README): restarted after a second, forever; pinned by
    // its config; nothing run at stop that could detach; room for every container's connections.
    assert_eq!(unit_value(&unit, "Restart"), "always");
    assert_eq!(unit_value(&unit, "RestartSec"), "1");
    assert_eq!(unit_value(&unit, "StartLimitIntervalSec"), "0");
    let at_stop: Vec<&str> = unit
        .lines()
        .filter(|l| l.trim_start().starts_with("ExecStop"))
        .collect();
    assert!(at_stop.is_empty(), "nothing runs at stop: {at_stop:?}");
    assert!(
        unit_value(&unit, "LimitNOFILE").parse::<u64>().unwrap() >= 65536,
        "LimitNOFILE"
    );
    assert!(
        deployed("systemd/config.toml")
            .lines()
            .any(|l| l.trim() == r#"pin = "/sys/fs/bpf/imds-proxy""#),
        "the unit's config pins the redirect"
    );
    for unit in [&unit, &gate] {
        assert_eq!(unit_value(unit, "Type"), "notify");
        let before = unit_value(unit, "Before");
        for runtime in ["docker.service", "containerd.service", "kubelet.service"] {
            assert!(before.split_whitespace().any(|u| u == runtime), "{before}");
        }
    }
    let dir = std::env::temp_dir().join(format!("imds-test-unit-{}", rand_suffix()));
    std::fs::create_dir_all(&dir).unwrap();
    let files = [
        ("imds-proxy.service", &unit),
        ("imds-proxy-gate.service", &gate),
    ]
    .map(|(name, text)| {
        let file = dir.join(name);
        std::fs::write(
            &file,
            text.replace("/usr/local/bin/imds-proxy", proxy_bin().to_str().unwrap()),
        )
        .unwrap();
        file
    });
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(&files)
        .current_dir(&dir)
        .output()
        .expect("systemd-analyze (setup installs systemd)");
    std::fs::remove_dir_all(&dir).unwrap();
    let said =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    // Lines about the host's own units (none is running here) are not the units'.
    let about_ours: Vec<&str> = said.lines().filter(|l| l.contains("imds-proxy")).collect();
    assert!(
        out.status.success() && about_ours.is_empty(),
        "systemd-analyze verify: {:?}\n{said}",
        out.status
    );
}

imds_tests::per_mode! { the_systemd_unit_s_capabilities_are_enough => the_systemd_unit_s_capabilities_are_enough_in; }

/// The unit's `CapabilityBoundingSet=` and `NoNewPrivileges=`, applied with `setpriv` as systemd
/// would: the proxy runs with those capabilities and no others, and a container gets its role.
fn the_systemd_unit_s_capabilities_are_enough_in(mode: Mode) {
    let unit = systemd_unit();
    assert_eq!(unit_value(&unit, "NoNewPrivileges"), "yes");
    let caps: Vec<String> = unit_value(&unit, "CapabilityBoundingSet")
        .split_whitespace()
        .map(|c| {
            c.strip_prefix("CAP_")
                .unwrap_or_else(|| panic!("{c}"))
                .to_lowercase()
        })
        .collect();
    assert!(!caps.is_empty());
    let bounding = format!(
        "-all,{}",
        caps.iter()
            .map(|c| format!("+{c}"))
            .collect::<Vec<_>>()
            .join(",")
    );
    let scene = sim_host(HttpTokens::Optional);
    let proxy = Proxy::start_wrapped(
        &scene,
        mode,
        &[],
        &[],
        &[
            "setpriv",
            "--no-new-privs",
            "--inh-caps=-all",
            "--bounding-set",
            &bounding,
            "--",
        ],
    );
    // The premise: it runs confined, with exactly as many capabilities as the unit names.
    let status = std::fs::read_to_string(format!("/proc/{}/status", proxy.pid())).unwrap();
    let field = |name: &str| {
        let hex = status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("{name} in {status}"));
        u64::from_str_radix(hex.trim(), 16).unwrap()
    };
    assert_eq!(
        field("CapBnd:").count_ones() as usize,
        caps.len(),
        "{status}"
    );
    assert_eq!(field("CapEff:"), field("CapBnd:"), "{status}");
    assert_eq!(field("NoNewPrivs:"), 1, "{status}");

    let container = Running::start(&["--label", "iam.amazonaws.com/role=Confined"]);
    let (status, body) = get_credentials(&container, "Confined");
    assert_eq!(status, 200, "{body}\n{:#?}", proxy.log());
    let creds: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(caller_arn(&scene, &creds).contains(":assumed-role/Confined/"));
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
