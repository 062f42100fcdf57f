//! The standing attack suite: what a hostile process inside a real container tries against the
//! proxy, in both modes, from a bridged container and from a host-network one. Each attack states
//! the answer a correct proxy gives; none of them may ever see the instance role.
//!
//! The attacker is `imds-attack` (raw bytes on a socket) or curl, inside containers of locally
//! built images; the proxy is the real binary on the simulated EC2 host, with moto as STS.
use crate::{sim_host, sim_host_config};
use imds_tests::{
    containers::{answers, fields, in_container, run_in},
    faults::{Fault, Injector},
    images::{attack_image, docker, docker_ok},
    kernel::RootCgroup,
    proxy::{Mode, Proxy},
    scene::{INSTANCE_ROLE, ensure_imds_is_simulated},
    sim::HttpTokens,
};

/// The two ways a container reaches IMDS: across a container interface, and from the host's own
/// network namespace.
const NETWORKS: [(&str, &[&str]); 2] = [("bridged", &[]), ("host-network", &["--network", "host"])];

const ROLE: &str = "Web";
const ROLE_LABEL: &str = "iam.amazonaws.com/role=Web";

fn with_role<'a>(network: &'a [&'a str]) -> Vec<&'a str> {
    let mut args = network.to_vec();
    args.extend_from_slice(&["--label", ROLE_LABEL]);
    args
}

/// `imds-attack` in a fresh container; its `key=value` lines and its whole output.
fn attack(
    docker_args: &[&str],
    command: &[&str],
) -> (std::collections::HashMap<String, String>, String) {
    let image = attack_image(env!("CARGO_BIN_EXE_imds-attack").as_ref()).unwrap();
    let mut cmd = vec!["/program"];
    cmd.extend_from_slice(command);
    let (_, _, out) = run_in(image, docker_args, &cmd);
    assert!(!out.contains(INSTANCE_ROLE), "{out}");
    (fields(&out), out)
}

const IMDS: &str = "169.254.169.254:80";

/// A token, then the instance id with it.
const TOKEN_AND_INSTANCE_ID: &str = r#"
T=$(curl -s -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' http://169.254.169.254/latest/api/token)
curl -s -w '\n== %{http_code}\n' -H "X-aws-ec2-metadata-token: $T" http://169.254.169.254/latest/meta-data/instance-id
"#;

/// Every way to spell the IMDS address in a URL reaches the proxy (the container's own role),
/// never the instance's. The IPv6 forms are answered by the proxy from the host's network (the
/// host routes fd00:ec2::254, as a Nitro instance does); Docker's bridge has no IPv6
/// here, so a bridged container's IPv6 connect fails (status 0), and reaches nothing.
fn address_forms_in(mode: Mode) {
    let scene = sim_host(HttpTokens::Required);
    let _proxy = Proxy::start_in(&scene, mode, &[]);
    let v4_forms = [
        "169.254.169.254",
        "2852039166",
        "0xa9fea9fe",
        "0251.0376.0251.0376",
        "169.254.43518",
        "0xA9.0xFE.0xA9.0xFE",
        "[::ffff:169.254.169.254]",
        "[::ffff:a9fe:a9fe]",
    ];
    let v6_forms = ["[fd00:ec2::254]", "[fd00:ec2:0:0:0:0:0:254]"];
    let mut script = String::from(
        "T=$(curl -s -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' http://169.254.169.254/latest/api/token)\n",
    );
    for form in v4_forms.iter().chain(&v6_forms) {
        script.push_str(&format!(
            "curl -g -s -m 10 -w '\\n== %{{http_code}}\\n' -H \"X-aws-ec2-metadata-token: $T\" http://{form}/latest/meta-data/iam/security-credentials/\n"
        ));
    }
    // TCP fast open: the request rides on the SYN (`sendto(MSG_FASTOPEN)`), no connect(2).
    script.push_str(
        "curl --tcp-fastopen -s -m 10 -w '\\n== %{http_code}\\n' -H \"X-aws-ec2-metadata-token: $T\" http://169.254.169.254/latest/meta-data/iam/security-credentials/\n",
    );
    for (network, args) in NETWORKS {
        let (_, _, out) = in_container(&with_role(args), &script);
        let got = answers(&out);
        assert_eq!(
            got.len(),
            v4_forms.len() + v6_forms.len() + 1,
            "{network}: {out}"
        );
        assert_eq!(
            got.last(),
            Some(&(200, ROLE.to_owned())),
            "{network}: fast open: {out}"
        );
        for (form, answer) in v4_forms.iter().zip(&got) {
            assert_eq!(answer, &(200, ROLE.to_owned()), "{network} {form}: {out}");
        }
        let v6_answer = match network {
            "host-network" => (200, ROLE.to_owned()),
            _ => (0, String::new()),
        };
        for (form, answer) in v6_forms.iter().zip(&got[v4_forms.len()..]) {
            assert_eq!(answer, &v6_answer, "{network} {form}: {out}");
        }
        assert!(!out.contains(INSTANCE_ROLE), "{network}: {out}");
    }
}

#[test]
fn address_forms_in_cgroup_mode() {
    address_forms_in(Mode::Cgroup);
}

#[test]
fn address_forms_in_tc_mode() {
    address_forms_in(Mode::Tc);
}

/// Spellings of denied paths: each is refused as malformed (400) or not found (404); the
/// container's own role is the control.
fn deny_path_spellings_in(mode: Mode) {
    let scene = sim_host(HttpTokens::Required);
    let _proxy = Proxy::start_in(&scene, mode, &[]);
    let cases: &[(&str, u16)] = &[
        ("/latest/meta-data/iam/security-credentials/Web", 200),
        (
            "/latest/meta-data/iam/security-credentials/InstanceRole",
            404,
        ),
        (
            "/latest/meta-data/iam/security-credentials/InstanceRole/",
            404,
        ),
        (
            "/latest/meta-data/iam/security-credentials/InstanceRole?x=1",
            404,
        ),
        (
            "/latest/meta-data/iam/security-credentials/../security-credentials/InstanceRole",
            400,
        ),
        (
            "/latest/meta-data/iam/security-credentials/./InstanceRole",
            400,
        ),
        (
            "/latest/meta-data/iam//security-credentials/InstanceRole",
            400,
        ),
        (
            "/latest//meta-data/iam/security-credentials/InstanceRole",
            400,
        ),
        (
            "/latest/meta-data/iam/security-credentials/%49nstanceRole",
            400,
        ),
        ("/latest/meta-data/%69am/security-credentials/", 400),
        (
            "/latest/meta-data/iam/security-credentials%2fInstanceRole",
            400,
        ),
        (
            "/latest/meta-data/IAM/security-credentials/InstanceRole",
            404,
        ),
        (
            "/LATEST/meta-data/iam/security-credentials/InstanceRole",
            404,
        ),
        (
            "/2021-03-23/meta-data/iam/security-credentials/InstanceRole",
            404,
        ),
        ("/1.0/meta-data/iam/security-credentials/", 404),
        (
            "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
            404,
        ),
        ("/latest/meta-data/identity-credentials/", 404),
        ("/latest/user-data", 404),
        ("/latest/user-data/", 404),
        ("/latest/dynamic/instance-identity/pkcs7", 404),
        ("/latest/dynamic/instance-identity/signature", 404),
        ("/latest/dynamic/instance-identity/rsa2048", 404),
        ("/2021-03-23/dynamic/instance-identity/pkcs7", 404),
    ];
    let mut script = String::from(
        "T=$(curl -s -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' http://169.254.169.254/latest/api/token)\n",
    );
    for (path, _) in cases {
        script.push_str(&format!(
            "curl --path-as-is -s -o /dev/null -w '\\n== %{{http_code}}\\n' -H \"X-aws-ec2-metadata-token: $T\" 'http://169.254.169.254{path}'\n"
        ));
    }
    // Host tricks change nothing: the caller is who the kernel says.
    for host in ["127.0.0.1", "169.254.169.254:8080", "localhost"] {
        script.push_str(&format!(
            "curl -s -w '\\n== %{{http_code}}\\n' -H 'Host: {host}' -H \"X-aws-ec2-metadata-token: $T\" http://169.254.169.254/latest/meta-data/iam/security-credentials/\n"
        ));
    }
    for (network, args) in NETWORKS {
        let (_, _, out) = in_container(&with_role(args), &script);
        let got = answers(&out);
        assert_eq!(got.len(), cases.len() + 3, "{network}: {out}");
        for ((path, status), (got_status, _)) in cases.iter().zip(&got) {
            assert_eq!(got_status, status, "{network} {path}: {out}");
        }
        for answer in &got[cases.len()..] {
            assert_eq!(answer, &(200, ROLE.to_owned()), "{network}: {out}");
        }
    }
}

#[test]
fn deny_path_spellings_in_cgroup_mode() {
    deny_path_spellings_in(Mode::Cgroup);
}

#[test]
fn deny_path_spellings_in_tc_mode() {
    deny_path_spellings_in(Mode::Tc);
}

/// A token is good only for the container it was minted for: another container replaying it, or
/// anyone forging one, gets 401. Out-of-range TTLs and forwarded token requests are refused.
fn tokens_cannot_be_forged_or_replayed_in(mode: Mode) {
    let scene = sim_host(HttpTokens::Required);
    let _proxy = Proxy::start_in(&scene, mode, &[]);
    for (network, args) in NETWORKS {
        let (_, _, out) = in_container(
            &with_role(args),
            "curl -s -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 300' http://169.254.169.254/latest/api/token",
        );
        let stolen = out.trim().to_owned();
        assert!(stolen.len() > 20, "{network}: a token: {out}");
        let mut forged = stolen.clone().into_bytes();
        let last = forged.len() - 3;
        forged[last] = if forged[last] == b'A' { b'B' } else { b'A' };
        let forged = String::from_utf8(forged).unwrap();
        let script = format!(
            r#"
for t in '{stolen}' '{forged}' 'AAAA' ''; do
  curl -s -o /dev/null -w '\n== %{{http_code}}\n' -H "X-aws-ec2-metadata-token: $t" http://169.254.169.254/latest/meta-data/iam/security-credentials/
done
for ttl in 0 21601 -1 abc; do
  curl -s -o /dev/null -w '\n== %{{http_code}}\n' -X PUT -H "X-aws-ec2-metadata-token-ttl-seconds: $ttl" http://169.254.169.254/latest/api/token
done
curl -s -o /dev/null -w '\n== %{{http_code}}\n' -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' -H 'X-Forwarded-For: 10.0.0.1' http://169.254.169.254/latest/api/token
"#
        );
        // Another container with the same role: the token is still not its own.
        let (_, _, out) = in_container(&with_role(args), &script);
        let statuses: Vec<u16> = answers(&out).into_iter().map(|(s, _)| s).collect();
        assert_eq!(
            statuses,
            [401, 401, 401, 401, 400, 400, 400, 400, 403],
            "{network}: {out}"
        );
    }
}

#[test]
fn tokens_cannot_be_forged_or_replayed_in_cgroup_mode() {
    tokens_cannot_be_forged_or_replayed_in(Mode::Cgroup);
}

#[test]
fn tokens_cannot_be_forged_or_replayed_in_tc_mode() {
    tokens_cannot_be_forged_or_replayed_in(Mode::Tc);
}

/// Requests no client sends: each gets the answer stated, and never more than one response for
/// one request (nothing smuggled through).
fn malformed_and_smuggled_requests_in(mode: Mode) {
    let scene = sim_host(HttpTokens::Required);
    // A short head timeout: an answered keep-alive connection is closed a second later, not five.
    let _proxy = Proxy::start_in(
        &scene,
        mode,
        &["--require-imdsv2", "true", "--header-timeout", "1s"],
    );
    let big = "a".repeat(20_000);
    let oversized =
        format!("GET /latest/meta-data/ HTTP/1.1\\r\\nHost: x\\r\\nX-Big: {big}\\r\\n\\r\\n");
    // (what, request, the status a correct proxy answers: one each, as README states them)
    let cases: Vec<(&str, String, &[&str])> = vec![
        (
            "absolute-form target for the instance role",
            "GET http://169.254.169.254/latest/meta-data/iam/security-credentials/InstanceRole HTTP/1.1\\r\\nHost: 169.254.169.254\\r\\nX-aws-ec2-metadata-token: {TOKEN}\\r\\nConnection: close\\r\\n\\r\\n".into(),
            &["404"],
        ),
        (
            "Content-Length and Transfer-Encoding together, a request smuggled in the body",
            "GET /latest/meta-data/ HTTP/1.1\\r\\nHost: x\\r\\nX-aws-ec2-metadata-token: {TOKEN}\\r\\nContent-Length: 4\\r\\nTransfer-Encoding: chunked\\r\\n\\r\\n0\\r\\n\\r\\nGET /latest/meta-data/iam/security-credentials/InstanceRole HTTP/1.1\\r\\nHost: x\\r\\nX-aws-ec2-metadata-token: {TOKEN}\\r\\n\\r\\n".into(),
            // A chunked body is refused before it is read (README: "chunked 413").
            &["413"],
        ),
        (
            "two different Content-Lengths",
            "GET /latest/meta-data/ HTTP/1.1\\r\\nHost: x\\r\\nContent-Length: 0\\r\\nContent-Length: 70\\r\\n\\r\\n".into(),
            &["400"],
        ),
        (
            "a body on a token request",
            "PUT /latest/api/token HTTP/1.1\\r\\nHost: x\\r\\nX-aws-ec2-metadata-token-ttl-seconds: 60\\r\\nContent-Length: 5000\\r\\n\\r\\n".into(),
            &["413"],
        ),
        (
            "a chunked body",
            "PUT /latest/api/token HTTP/1.1\\r\\nHost: x\\r\\nX-aws-ec2-metadata-token-ttl-seconds: 60\\r\\nTransfer-Encoding: chunked\\r\\n\\r\\n5\\r\\nhello\\r\\n0\\r\\n\\r\\n".into(),
            &["413"],
        ),
        (
            "an obsolete folded header",
            "GET /latest/meta-data/ HTTP/1.1\\r\\nHost: x\\r\\nX-aws-ec2-metadata-token: {TOKEN}\\r\\n continued\\r\\n\\r\\n".into(),
            &["400"],
        ),
        ("a 20 KB header", oversized, &["431"]),
        (
            "a byte outside ASCII in the path",
            "GET /latest/meta-data/\\xff HTTP/1.1\\r\\nHost: x\\r\\nX-aws-ec2-metadata-token: {TOKEN}\\r\\n\\r\\n".into(),
            &["400"],
        ),
        (
            "an asterisk target",
            "GET * HTTP/1.1\\r\\nHost: x\\r\\nX-aws-ec2-metadata-token: {TOKEN}\\r\\n\\r\\n".into(),
            &["400"],
        ),
        (
            "HTTP/2 with prior knowledge (h2c)",
            "PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n".into(),
            // HTTP/1.1 only: the connection is closed without an answer.
            &["none"],
        ),
        (
            "an upgrade to h2c",
            "GET /latest/meta-data/ HTTP/1.1\\r\\nHost: x\\r\\nX-aws-ec2-metadata-token: {TOKEN}\\r\\nConnection: Upgrade, HTTP2-Settings\\r\\nUpgrade: h2c\\r\\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\\r\\n\\r\\n".into(),
            &["200"],
        ),
        (
            "a method IMDS does not serve",
            "POST /latest/api/token HTTP/1.1\\r\\nHost: x\\r\\nX-aws-ec2-metadata-token-ttl-seconds: 60\\r\\nContent-Length: 0\\r\\n\\r\\n".into(),
            &["405"],
        ),
        (
            "no token where IMDSv2 is required",
            "GET /latest/meta-data/iam/security-credentials/ HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n".into(),
            &["401"],
        ),
    ];
    // One attacker container per network sends every case, each on a connection of its own.
    for (network, args) in NETWORKS {
        let mut command = vec!["raws", IMDS];
        command.extend(cases.iter().map(|(_, request, _)| request.as_str()));
        let (got, out) = attack(&with_role(args), &command);
        for (i, (what, _, allowed)) in cases.iter().enumerate() {
            let field = |name: &str| {
                got.get(&format!("{name}.{i}"))
                    .unwrap_or_else(|| panic!("{network}, {what}: no {name}.{i}: {out}"))
                    .as_str()
            };
            assert!(
                allowed.contains(&field("status")),
                "{network}, {what}: {out}"
            );
            assert!(
                field("responses").parse::<u32>().unwrap() <= 1,
                "{network}, {what}: one response at most: {out}"
            );
        }
    }
}

#[test]
fn malformed_and_smuggled_requests_in_cgroup_mode() {
    malformed_and_smuggled_requests_in(Mode::Cgroup);
}

#[test]
fn malformed_and_smuggled_requests_in_tc_mode() {
    malformed_and_smuggled_requests_in(Mode::Tc);
}

/// Slowloris: a request head that never completes, and a keep-alive connection left idle, are
/// closed by the server (header timeout 1 s here), and counted.
fn slow_and_idle_connections_are_closed_in(mode: Mode) {
    let scene = sim_host(HttpTokens::Required);
    let proxy = Proxy::start_in(&scene, mode, &["--header-timeout", "1s"]);
    for (network, args) in NETWORKS {
        let (got, out) = attack(&with_role(args), &["slow", IMDS]);
        assert_eq!(got["closed"], "true", "{network}: {out}");
        // Closed without an answer: no status line at all (not a 408, not a late 200).
        assert_eq!(got["status"], "none", "{network}: {out}");
        let (got, out) = attack(&with_role(args), &["idle", IMDS]);
        assert_eq!(
            got["first"], "401",
            "{network}: answered first (no token): {out}"
        );
        assert_eq!(got["closed"], "true", "{network}: then closed: {out}");
    }
    assert!(
        proxy.metric("imds_proxy_connections_refused_total{reason=\"header_timeout\"}") >= 4,
        "counted"
    );
}

#[test]
fn slow_and_idle_connections_are_closed_in_cgroup_mode() {
    slow_and_idle_connections_are_closed_in(Mode::Cgroup);
}

#[test]
fn slow_and_idle_connections_are_closed_in_tc_mode() {
    slow_and_idle_connections_are_closed_in(Mode::Tc);
}

/// One container holding connections open cannot take them from the others: of 12 half-sent
/// requests it holds 8 (its cap), the other 4 are closed unserved, and another container is
/// served meanwhile.
fn one_container_cannot_take_every_connection_in(mode: Mode) {
    let scene = sim_host(HttpTokens::Required);
    let proxy = Proxy::start_in(
        &scene,
        mode,
        &[
            "--max-connections-per-caller",
            "8",
            "--header-timeout",
            "120s",
        ],
    );
    ensure_imds_is_simulated().unwrap();
    let image = attack_image(env!("CARGO_BIN_EXE_imds-attack").as_ref()).unwrap();
    for (network, args) in NETWORKS {
        let name = format!("imds-test-hold-{}", imds_tests::containers::rand_suffix());
        let mut run = vec!["run", "-d", "--name", &name];
        run.extend_from_slice(args);
        run.extend_from_slice(&[image, "/program", "hold", IMDS, "12", "300"]);
        docker_ok(&run).unwrap();
        // Until the attacker says it holds its connections (bounded).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let out = loop {
            let logs = docker(&["logs", &name]).unwrap();
            let out = String::from_utf8_lossy(&logs.stdout).into_owned();
            if out.contains("held=") {
                break out;
            }
            assert!(std::time::Instant::now() < deadline, "{network}: {out}");
            std::thread::sleep(std::time::Duration::from_millis(100));
        };
        let got = fields(&out);
        assert_eq!(got["held"], "8", "{network}: its cap: {out}");
        assert_eq!(
            got["closed"], "4",
            "{network}: the rest closed unserved: {out}"
        );
        // Meanwhile another container is served.
        let (_, _, other) = in_container(&with_role(args), TOKEN_AND_INSTANCE_ID);
        assert_eq!(answers(&other)[0].0, 200, "{network}: {other}");
        docker_ok(&["rm", "-f", &name]).unwrap();
    }
    assert!(proxy.metric("imds_proxy_connections_refused_total{reason=\"per_caller_limit\"}") == 8);
}

#[test]
fn one_container_cannot_take_every_connection_in_cgroup_mode() {
    one_container_cannot_take_every_connection_in(Mode::Cgroup);
}

#[test]
fn one_container_cannot_take_every_connection_in_tc_mode() {
    one_container_cannot_take_every_connection_in(Mode::Tc);
}

/// A burst from one container is throttled (429, as IMDS answers) by its own budget, and
/// another container is still served.
fn bursts_are_throttled_per_container_in(mode: Mode) {
    let scene = sim_host(HttpTokens::Required);
    let proxy = Proxy::start_in(
        &scene,
        mode,
        &["--requests-per-second", "1", "--request-burst", "5"],
    );
    for (network, args) in NETWORKS {
        let (got, out) = attack(
            &with_role(args),
            &["burst", IMDS, "30", "/latest/meta-data/instance-id"],
        );
        let count = |status: &str| {
            got.get(&format!("status_{status}"))
                .map_or(0, |n| n.parse::<u32>().unwrap())
        };
        assert!(count("429") >= 10, "{network}: throttled: {out}");
        assert!(
            count("200") >= 1,
            "{network}: served within its budget: {out}"
        );
        assert_eq!(count("200") + count("429"), 30, "{network}: {out}");
        let (_, _, other) = in_container(&with_role(args), TOKEN_AND_INSTANCE_ID);
        assert_eq!(
            answers(&other)[0].0,
            200,
            "{network}: another container: {other}"
        );
    }
    assert!(proxy.metric("imds_proxy_throttled_total{limit=\"per_caller\"}") >= 20);
}

#[test]
fn bursts_are_throttled_per_container_in_cgroup_mode() {
    bursts_are_throttled_per_container_in(Mode::Cgroup);
}

#[test]
fn bursts_are_throttled_per_container_in_tc_mode() {
    bursts_are_throttled_per_container_in(Mode::Tc);
}

imds_tests::per_mode! {
    a_role_sts_refuses_does_not_make_an_sts_call_per_request =>
        a_role_sts_refuses_does_not_make_an_sts_call_per_request_in;
}

/// A role STS refuses (a 403 `AccessDenied`, answered by the injector in front of moto) does not
/// turn every request into an STS call: the refusal is remembered with a back-off (1 s,
/// doubling), so ten quick requests make a few calls at most. A refusal says nothing about STS's
/// health: it is counted as `sts_refused` and never opens the breaker.
fn a_role_sts_refuses_does_not_make_an_sts_call_per_request_in(mode: Mode) {
    let scene = sim_host(HttpTokens::Required);
    let sts = Injector::start(scene.sts_endpoint().unwrap());
    sts.set(Fault::HttpError(403));
    let proxy = Proxy::start_in(&scene, mode, &["--sts-endpoint", &sts.url()]);
    let script = r#"
T=$(curl -s -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' http://169.254.169.254/latest/api/token)
for i in 1 2 3 4 5 6 7 8 9 10; do
  curl -s -o /dev/null -w '\n== %{http_code}\n' -H "X-aws-ec2-metadata-token: $T" http://169.254.169.254/latest/meta-data/iam/security-credentials/Web
done
"#;
    let (_, _, out) = in_container(&with_role(&[]), script);
    let statuses: Vec<u16> = answers(&out).into_iter().map(|(s, _)| s).collect();
    assert_eq!(statuses, [503; 10], "{out}");
    // The premise: STS was asked and refused the role (not a connection that failed).
    let asked = sts.requests();
    assert!(asked >= 1, "STS was never asked");
    assert!(
        proxy.metric("imds_proxy_sts_errors_total{reason=\"sts_refused\"}") >= 1,
        "the 403 is counted as a refusal of the role"
    );
    assert!(
        asked <= 4,
        "{asked} STS requests for 10 requests (and a prefetch)"
    );
    let avoided = proxy.metric("imds_proxy_sts_calls_avoided_total");
    assert!(
        avoided >= 7,
        "{avoided} answered from the remembered refusal"
    );
    assert_eq!(
        proxy.metric("imds_proxy_sts_breaker_open"),
        0,
        "a refused role says nothing about STS"
    );
    proxy.wait_for_log(&["not asking again", "Web"]);
}

/// tc mode identifies a caller by its source address, and a container has NET_RAW by default:
/// it can send a SYN with its neighbour's address. The guard on its own bridge port drops it
/// (counted), so nothing spoofed is ever redirected to the proxy.
#[test]
fn a_spoofed_source_address_is_dropped_in_tc_mode() {
    let scene = sim_host(HttpTokens::Required);
    let proxy = Proxy::start_in(&scene, Mode::Tc, &[]);
    let victim =
        imds_tests::containers::Running::start(&["--label", "iam.amazonaws.com/role=Victim"]);
    let victim_ip = victim.address();
    let spoofed = || proxy.metric("imds_proxy_tc_packets_total{event=\"dropped_spoofed\"}");
    let redirected = || proxy.metric("imds_proxy_tc_packets_total{event=\"redirected\"}");
    let (spoofed_before, redirected_before) = (spoofed(), redirected());
    let (got, out) = attack(&[], &["spoof", IMDS, &victim_ip, "3"]);
    assert_eq!(got["sent"], "3", "{out}");
    assert_eq!(
        spoofed() - spoofed_before,
        3,
        "each spoofed SYN dropped at the attacker's port"
    );
    assert_eq!(redirected(), redirected_before, "none of them redirected");
    // The victim itself is served as ever, from its own port.
    let out = victim.exec(TOKEN_AND_INSTANCE_ID);
    assert_eq!(answers(&out)[0].0, 200, "{out}");
}

/// The guard must not cost a starting container its first connection. Docker reports a container
/// only once its process runs; a SYN dropped for want of a vouched address is retried a second
/// later, as long as an SDK waits for IMDS (the AWS CLI then finds no credentials). The proxy
/// vouches for the address as Docker configures it, before the process starts: nothing a fresh
/// container sends first is dropped.
#[test]
fn a_starting_container_is_served_from_its_first_packet_in_tc_mode() {
    let scene = sim_host(HttpTokens::Required);
    let proxy = Proxy::start_in(&scene, Mode::Tc, &[]);
    let dropped = || proxy.metric("imds_proxy_tc_packets_total{event=\"dropped_spoofed\"}");
    let before = dropped();
    for _ in 0..3 {
        let (_, _, out) = in_container(&with_role(&[]), TOKEN_AND_INSTANCE_ID);
        assert_eq!(answers(&out).first().map(|a| a.0), Some(200), "{out}");
    }
    assert_eq!(dropped() - before, 0, "no first SYN dropped at its port");
    proxy.wait_for_log(&["vouched for until Docker reports its container"]);
}

/// The IMDSv2 flow with curl on the host's network namespace: each answer as `== <status>
/// <server>` after its body.
const HOST_FLOW: &str = r#"
T=$(curl -s -m 5 -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' http://169.254.169.254/latest/api/token)
curl -s -m 5 -w '\n== %{http_code} %header{server}\n' -H "X-aws-ec2-metadata-token: $T" http://169.254.169.254/latest/meta-data/iam/security-credentials/
"#;

/// [`HOST_FLOW`] from a process placed in `cgroup` (host network), optionally in a PID namespace
/// of its own; the `(status, server)` of the role listing and the whole output.
fn host_flow(cgroup: &std::path::Path, own_pidns: bool) -> ((u16, String), String) {
    ensure_imds_is_simulated().unwrap();
    let mut cmd = if own_pidns {
        let mut cmd = std::process::Command::new("unshare");
        cmd.args(["--pid", "--fork", "--", "sh", "-c", HOST_FLOW]);
        cmd
    } else {
        let mut cmd = std::process::Command::new("sh");
        cmd.args(["-c", HOST_FLOW]);
        cmd
    };
    imds_tests::kernel::place(&mut cmd, cgroup, None).unwrap();
    let out = cmd.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let status = text
        .lines()
        .find_map(|l| l.strip_prefix("== "))
        .unwrap_or_else(|| panic!("no answer from {}: {text}", cgroup.display()));
    let (code, server) = status.split_once(' ').unwrap_or((status, ""));
    ((code.parse().unwrap_or(0), server.trim().to_owned()), text)
}

/// The flow from `cgroup` is redirected to the proxy and gets no role, never the instance's.
fn assert_no_role(cgroup: &RootCgroup, own_pidns: bool, why: &str) {
    let (answer, out) = host_flow(cgroup.path(), own_pidns);
    assert!(!out.contains(INSTANCE_ROLE), "{why}: {out}");
    assert_eq!(
        answer,
        (404, "imds-proxy".to_owned()),
        "{why}: redirected to the proxy, no role: {out}"
    );
}

/// The flow from `cgroup` reaches the instance's IMDS itself (the simulator: no proxy's server
/// header) and gets the instance's role.
fn assert_reaches_instance(cgroup: &RootCgroup, own_pidns: bool, why: &str) {
    let (answer, out) = host_flow(cgroup.path(), own_pidns);
    assert_eq!(answer, (200, String::new()), "{why}: {out}");
    assert!(out.contains(INSTANCE_ROLE), "{why}: {out}");
}

/// Every cgroup layout a runtime may use that the proxy does not name, and every name it never
/// heard of, is a container's (default deny): a process there, on the host's network namespace,
/// is redirected and gets no role — never the instance's. So is a process in a PID namespace of
/// its own in a cgroup named like a host service (the kernel's second wall). A host service in
/// `system.slice` still reaches the instance's IMDS itself, and so does one the operator names
/// with `--host-cgroup`.
fn unrecognised_cgroup_layouts_get_no_role_in(mode: Mode) {
    let scene = sim_host(HttpTokens::Required);
    let hex = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";
    let layouts = [
        // BuildKit's RUN steps: under Docker's parent, and with the systemd driver.
        "/docker/buildkit/k7x2q9m4n8p1r5t3v6w0y2z4a".to_owned(),
        "/system.slice/docker-k7x2q9m4n8p1r5t3v6w0y2z4b.scope".to_owned(),
        "/buildkit/k7x2q9m4n8p1r5t3v6w0y2z4c".to_owned(),
        // Podman Quadlet / --cgroups=split, nerdctl with systemd, ctr run, LXC, nspawn.
        format!("/system.slice/imds-test-quadlet.service/libpod-payload-{hex}"),
        format!("/system.slice/nerdctl-{hex}.scope"),
        "/imds-test-ns/web".to_owned(),
        "/lxc.payload.imds-test".to_owned(),
        "/machine.slice/machine-imds-test.scope".to_owned(),
        // A name nobody ever used.
        "/imds-test-whatever/x".to_owned(),
    ];
    let cgroups: Vec<RootCgroup> = layouts
        .iter()
        .map(|l| RootCgroup::new(l).unwrap())
        .collect();
    let host_service = RootCgroup::new("/system.slice/imds-test-host.service").unwrap();
    let disguised = RootCgroup::new("/system.slice/imds-test-disguised.service").unwrap();
    let operators = RootCgroup::new("/imds-test-agents/ssm").unwrap();
    let proxy = Proxy::start_in(&scene, mode, &["--host-cgroup", "/imds-test-agents/*"]);
    proxy.wait_for_log(&["filter mode: cgroups classified"]);
    for (layout, cgroup) in layouts.iter().zip(&cgroups) {
        assert_no_role(cgroup, false, layout);
    }
    assert_no_role(
        &disguised,
        true,
        "a PID namespace of its own is a container's",
    );
    // The premise of the walls above: the same cgroup, from the host's PID namespace, passes.
    for (what, cgroup) in [
        ("system.slice service", &host_service),
        ("disguised, host pidns", &disguised),
        ("--host-cgroup", &operators),
    ] {
        assert_reaches_instance(cgroup, false, what);
    }
}

#[test]
fn unrecognised_cgroup_layouts_get_no_role_in_cgroup_mode() {
    unrecognised_cgroup_layouts_get_no_role_in(Mode::Cgroup)
}

#[test]
fn unrecognised_cgroup_layouts_get_no_role_in_tc_mode() {
    unrecognised_cgroup_layouts_get_no_role_in(Mode::Tc)
}

/// A map of another layout, pinned at `path`: what an older or newer build leaves there.
fn pin_foreign_map(path: &std::path::Path) {
    use std::os::fd::{FromRawFd as _, OwnedFd};
    /// The `map_create` member of `union bpf_attr` (the fields used here, then zeroes).
    #[repr(C)]
    struct MapCreate {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        rest: [u32; 14],
    }
    let mut attr = MapCreate {
        map_type: 2, // BPF_MAP_TYPE_ARRAY
        key_size: 4,
        value_size: 8,
        max_entries: 1,
        rest: [0; 14],
    };
    // SAFETY: a correctly laid out prefix of union bpf_attr, and its size.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            0, // BPF_MAP_CREATE
            &mut attr as *mut MapCreate,
            std::mem::size_of::<MapCreate>() as libc::c_uint,
        )
    };
    assert!(fd >= 0, "{}", std::io::Error::last_os_error());
    // SAFETY: a new descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let _ = std::fs::remove_file(path);
    imds_proxy::redirect::pin::raw::obj_pin(std::os::fd::AsFd::as_fd(&fd), path).unwrap();
}

/// An upgrade (a restart with `--pin`) never leaves a previous build's programs running, nor
/// crash-loops on a previous build's maps: every adopted link is switched to this build's program
/// (`BPF_LINK_UPDATE`, atomic), and a pinned map of another layout is replaced. The "previous
/// build" here is a connect program without the PID-namespace wall; its premise is asserted: while
/// it runs, a process in a private PID namespace in a host-shaped cgroup reaches the instance.
#[test]
fn an_upgrade_replaces_the_pinned_programs_and_maps() {
    use std::os::fd::AsFd as _;
    let scene = sim_host(HttpTokens::Required);
    let disguised = RootCgroup::new("/system.slice/imds-test-upgrade.service").unwrap();
    let pins = imds_tests::proxy::Pins::new("/sys/fs/bpf/imds-test-upgrade");
    let pin = pins.path().to_str().unwrap().to_owned();
    let mut proxy = Proxy::start_in(&scene, Mode::Cgroup, &["--pin", &pin]);
    assert_no_role(&disguised, true, "this build's program, before the kill");
    proxy.kill();

    // The previous build: its connect4 behind the pinned link, a config map of its own layout.
    let link = std::fs::read_dir(pins.path())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("link_imds_connect4_cg")
        })
        .expect("the connect4 link is pinned");
    // Loaded on the pinned maps, as the previous build's programs were.
    let mut loader = aya::EbpfLoader::new();
    for name in imds_proxy::redirect::cgroup::MAPS {
        loader.map_pin_path(name, pins.path().join(name));
    }
    let mut object = loader.load(imds_proxy::redirect::OBJECT).unwrap();
    let old: &mut aya::programs::CgroupSockAddr = object
        .program_mut(imds_common::PROG_CONNECT4_COMPAT)
        .unwrap()
        .try_into()
        .unwrap();
    old.load().unwrap();
    imds_proxy::redirect::pin::raw::link_update_at(&link, old.fd().unwrap().as_fd()).unwrap();
    pin_foreign_map(&pins.path().join(imds_common::MAP_CONFIG));
    assert_reaches_instance(
        &disguised,
        true,
        "premise: the previous build's program runs (the wall is not there)",
    );

    let proxy = Proxy::start_in(&scene, Mode::Cgroup, &["--pin", &pin]);
    proxy.wait_for_log(&["a pinned map has another layout", imds_common::MAP_CONFIG]);
    assert_no_role(
        &disguised,
        true,
        "the adopted link runs this build's program",
    );
    assert_reaches_instance(&disguised, false, "the host service still passes");
    drop(proxy);
}

/// `imds-proxy gate --pin`, as a node runs it at boot before its runtimes: started with a
/// service manager's notify socket, ready once it says `READY=1`; its log collected.
struct Gate {
    child: std::process::Child,
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Gate {
    fn start(pins: &imds_tests::proxy::Pins, mode: Mode) -> Self {
        use std::io::BufRead as _;
        let notify = std::env::temp_dir().join(format!(
            "imds-test-notify-{}",
            imds_tests::containers::rand_suffix()
        ));
        let _ = std::fs::remove_file(&notify);
        let socket = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
        socket
            .set_read_timeout(Some(std::time::Duration::from_secs(30)))
            .unwrap();
        let mut child = std::process::Command::new(imds_tests::proxy::proxy_bin())
            .arg("gate")
            .arg("--pin")
            .arg(pins.path())
            .args(match mode {
                Mode::Cgroup => ["--mode", "cgroup"],
                Mode::Tc => ["--mode", "tc"],
            })
            .env("NOTIFY_SOCKET", &notify)
            .env("NO_COLOR", "1")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = log.clone();
        let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let mut message = [0; 256];
        let got = socket.recv(&mut message);
        let _ = std::fs::remove_file(&notify);
        let gate = Self { child, log };
        let n =
            got.unwrap_or_else(|err| panic!("no READY from the gate ({err}): {:#?}", gate.log()));
        assert!(
            message[..n].starts_with(b"READY=1"),
            "{}",
            String::from_utf8_lossy(&message[..n])
        );
        gate
    }

    fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// Its exit status, once it has exited on its own (within 30 s).
    fn exited(&mut self) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the gate did not exit: {:#?}",
                self.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A token, then the role listing, its status after `== `.
const ROLE_LISTING: &str = r#"
T=$(curl -s -m 5 -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' http://169.254.169.254/latest/api/token)
curl -s -m 5 -w '\n== %{http_code}\n' -H "X-aws-ec2-metadata-token: $T" http://169.254.169.254/latest/meta-data/iam/security-credentials/
"#;

imds_tests::per_mode! { the_gate_refuses_containers_until_a_proxy_adopts_it => the_gate_refuses_containers_until_a_proxy_adopts_it_in; }

/// At boot no proxy runs yet and pins are gone. `imds-proxy gate` (a unit before the runtimes)
/// attaches pinned programs that refuse every container's IMDS connect at once (`EPERM`, not a
/// connection refused by an address nothing listens on) while the host's services still reach the instance; a proxy started
/// with the same `--pin` adopts them, the gate exits, and the same containers get their roles.
fn the_gate_refuses_containers_until_a_proxy_adopts_it_in(mode: Mode) {
    let scene = sim_host(HttpTokens::Required);
    let pins = imds_tests::proxy::Pins::new(&format!("/sys/fs/bpf/imds-test-gate-{mode:?}"));
    let pin = pins.path().to_str().unwrap().to_owned();
    let host_service = RootCgroup::new("/system.slice/imds-test-gate.service").unwrap();
    let mut gate = Gate::start(&pins, mode);
    for (network, args) in NETWORKS {
        let (said, out) = attack(
            &with_role(args),
            &["raw", IMDS, "GET /latest/meta-data/ HTTP/1.0\\r\\n\\r\\n"],
        );
        assert_eq!(
            said.get("error").map(String::as_str),
            Some("Operation not permitted (os error 1)"),
            "{network}: the kernel refuses the connect while only the gate is attached: {out}\n{:#?}",
            gate.log()
        );
    }
    assert_reaches_instance(&host_service, false, "the gate passes the host's services");

    let proxy = Proxy::start_in(&scene, mode, &["--pin", &pin]);
    assert!(gate.exited().success(), "{:#?}", gate.log());
    assert!(
        gate.log()
            .iter()
            .any(|l| l.contains("a proxy adopted the gate's pins")),
        "{:#?}",
        gate.log()
    );
    assert!(
        proxy
            .log()
            .iter()
            .any(|l| l.contains("adopted_links=") && !l.contains("adopted_links=0")),
        "the proxy adopted the gate's links: {:#?}",
        proxy.log()
    );
    for (network, args) in NETWORKS {
        let (_, _, out) = in_container(&with_role(args), ROLE_LISTING);
        assert_eq!(
            answers(&out).last(),
            Some(&(200, ROLE.to_owned())),
            "{network}: served once the proxy runs: {out}"
        );
    }
    assert_reaches_instance(
        &host_service,
        false,
        "host services pass under the proxy too",
    );
    drop(proxy);
}

/// The proxy attaches before anything outside the host can delay it: started while its container
/// engine does not answer (the unit runs before the runtimes' units), it attaches, tells the
/// service manager it is ready, and waits for the engine. Meanwhile a container's IMDS connects
/// wait in its listener's queue and get nothing (never the instance); once the engine answers,
/// they get the proxy's answers.
#[test]
fn the_proxy_attaches_and_is_ready_before_its_engine_answers() {
    let scene = sim_host(HttpTokens::Required);
    let container =
        RootCgroup::new("/docker/0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f1")
            .unwrap();
    let dir = std::env::temp_dir().join(format!(
        "imds-test-engine-{}",
        imds_tests::containers::rand_suffix()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let notify = dir.join("notify");
    let socket = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
    socket
        .set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let engine = dir.join("docker.sock");
    let host = format!("unix://{}", engine.display());
    let proxy = Proxy::start_until(
        &scene,
        Mode::Cgroup,
        &["--docker-host", &host],
        &[("NOTIFY_SOCKET", notify.to_str().unwrap())],
        &[],
        "waiting for the container runtime",
    );
    let mut message = [0; 256];
    let n = socket
        .recv(&mut message)
        .expect("READY before the engine answers");
    assert!(message[..n].starts_with(b"READY=1"), "{:?}", &message[..n]);
    // The premise: the engine still does not answer.
    assert!(!engine.exists());
    let (answer, out) = host_flow(container.path(), false);
    assert!(!out.contains(INSTANCE_ROLE), "{out}");
    assert_eq!(answer.0, 0, "no answer while the engine is awaited: {out}");

    std::os::unix::fs::symlink("/var/run/docker.sock", &engine).unwrap();
    proxy.wait_for_log(&["the container runtime answers"]);
    proxy.wait_for_log(&["index synchronised"]);
    assert_no_role(&container, false, "once the engine answers");
    drop(proxy);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A token, then the role listing with it (its status after `== `), then whether a token came
/// back; never hanging (5 s each).
const TOKEN_AND_ROLES: &str = r#"
T=$(curl -s -m 5 -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' http://169.254.169.254/latest/api/token)
curl -s -m 5 -w '\n== %{http_code}\n' -H "X-aws-ec2-metadata-token: $T" http://169.254.169.254/latest/meta-data/iam/security-credentials/
echo "token=${T:+yes}"
"#;

/// tc mode given docker0 only: a container on a user-defined network (its bridge `br-<id>`
/// named by no `--container-iface`) is not redirected, so its packets to IMDS are forwarded by
/// the host. The forward guard, on the interface the route to IMDS leaves by, drops them: with
/// the hop limit at 2 (as the seed's posts recommend) the container would otherwise get the
/// instance's token and role. The proxy also says which bridge it does not cover.
#[test]
fn an_unlisted_bridge_is_closed_in_tc_mode() {
    let scene = sim_host_config(HttpTokens::Required)
        .hop_limit(2)
        .start()
        .expect("the simulated EC2 host starts");
    /// A Docker network removed on drop, whatever happens in between.
    struct Network(String);
    impl Drop for Network {
        fn drop(&mut self) {
            let _ = docker(&["network", "rm", &self.0]);
        }
    }
    let network = Network(format!(
        "imds-test-unlisted-{}",
        imds_tests::containers::rand_suffix()
    ));
    let id = docker_ok(&["network", "create", &network.0]).unwrap();
    let bridge = format!("br-{}", &id.trim()[..12]);
    let proxy = Proxy::start(&scene, &["--mode", "tc", "--container-iface", "docker0"]);
    proxy.wait_for_log(&["forward guard attached"]);
    let before = proxy.metric("imds_proxy_tc_packets_total{event=\"dropped_forwarded\"}");
    let (_, _, out) = in_container(
        &["--network", &network.0, "--label", ROLE_LABEL],
        TOKEN_AND_ROLES,
    );
    assert!(!out.contains(INSTANCE_ROLE), "{out}");
    assert_eq!(
        (fields(&out).get("token").map(String::as_str), answers(&out)),
        (Some(""), vec![(0, String::new())]),
        "nothing comes back: {out}"
    );
    // The premise: the packets were forwarded towards IMDS, and the guard is what dropped them.
    let dropped = proxy.metric("imds_proxy_tc_packets_total{event=\"dropped_forwarded\"}");
    assert!(dropped > before, "dropped_forwarded {before} → {dropped}");
    proxy.wait_for_log(&["no --container-iface names", &bridge]);
}

/// cgroup mode: a bridged container (NET_RAW, Docker's default) writes TCP SYNs to IMDS as whole
/// Ethernet frames on an `AF_PACKET` socket, which no socket hook sees; the host would forward
/// them to the instance's IMDS. The forward guard on the interface the route to IMDS leaves by
/// drops them (counted), so nothing comes back.
#[test]
fn raw_frames_to_imds_from_a_bridged_container_are_dropped_in_cgroup_mode() {
    let scene = sim_host(HttpTokens::Required);
    let proxy = Proxy::start(&scene, &[]);
    proxy.wait_for_log(&["forward guard attached"]);
    let metric = "imds_proxy_tc_packets_total{event=\"dropped_forwarded\"}";
    let before = proxy.metric(metric);
    let (said, out) = attack(&[], &["frames", IMDS, "5"]);
    assert_eq!(said.get("sent").map(String::as_str), Some("5"), "{out}");
    assert_eq!(
        said.get("synacks").map(String::as_str),
        Some("0"),
        "nothing answers the frames: {out}"
    );
    // The premise: the frames were forwarded towards IMDS, and the guard dropped them.
    let dropped = proxy.metric(metric);
    assert!(dropped >= before + 5, "{metric}: {before} → {dropped}");
}

imds_tests::per_mode! { a_neighbour_claiming_a_victim_s_address_gets_none_of_its_credentials => a_neighbour_claiming_a_victim_s_address_gets_none_of_its_credentials_in; }

/// A container on the same bridge as a victim (NET_RAW, Docker's default) tells the host, with
/// unsolicited ARP replies, that the victim's address is at its own MAC, and sniffs what the host
/// then sends there, while the victim fetches its credentials in a loop. None of the victim's
/// credentials documents may reach the attacker's port.
fn a_neighbour_claiming_a_victim_s_address_gets_none_of_its_credentials_in(mode: Mode) {
    let scene = sim_host(HttpTokens::Required);
    let proxy = Proxy::start_in(&scene, mode, &[]);
    let victim =
        imds_tests::containers::Running::start(&["--label", "iam.amazonaws.com/role=Victim"]);
    let fetch = "T=$(curl -s -m 1 -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' http://169.254.169.254/latest/api/token); curl -s -m 1 -H \"X-aws-ec2-metadata-token: $T\" http://169.254.169.254/latest/meta-data/iam/security-credentials/Victim";
    // The premise: the victim gets its credentials.
    let first = victim.exec(fetch);
    assert!(first.contains("SecretAccessKey"), "{first}");
    docker_ok(&[
        "exec",
        "-d",
        &victim.0,
        "sh",
        "-c",
        &format!("for i in $(seq 150); do {fetch} >/dev/null 2>&1; sleep 0.05; done"),
    ])
    .unwrap();
    let (said, out) = attack(&[], &["poison", IMDS, &victim.address(), "8"]);
    assert_eq!(
        said.get("stolen").map(String::as_str),
        Some("0"),
        "the victim's credentials reached the attacker's port: {out}"
    );
    // The premise: the host believed the attacker, and sent the victim's answers to its port.
    let misdelivered = proxy.metric("imds_proxy_tc_packets_total{event=\"dropped_misdelivered\"}");
    assert!(misdelivered > 0, "the poisoning took: {out}");
}
