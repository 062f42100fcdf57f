//! Podman (`--runtime podman`): the proxy follows a real `podman system service` through its
//! Docker-compatible API, and Podman's containers (cgroups `libpod_parent/libpod-<id>`, the CNI
//! bridge `cni-podman0`) get their own roles in both modes: a Rust SDK client and the seed's
//! curl flow, with the role from a label or from `IAM_ROLE`, and never another container's.
use imds_tests::{
    containers::{answers, caller_arn},
    images::{curl_image, whoami_image},
    podman::{self, Container, Service, podman},
    proxy::{Mode, Proxy},
    scene::{ACCOUNT_ID, Scene, SceneConfig, ensure_imds_is_simulated},
    sim::HttpTokens,
};

/// As on EC2 by default: IMDSv2 required, hop limit 1 (the proxy answers tokens itself). STS on
/// the docker0 gateway, a host address Podman's containers reach too.
fn scene() -> Scene {
    SceneConfig::new(env!("CARGO_BIN_EXE_imds-sim"))
        .hop_limit(1)
        .http_tokens(HttpTokens::Required)
        .with_sts()
        .sts_bind(imds_tests::images::docker0_gateway().unwrap())
        .start()
        .expect("the simulated EC2 host starts")
}

fn assumed_role(role: &str, session: &str) -> String {
    format!("arn:aws:sts::{ACCOUNT_ID}:assumed-role/{role}/{session}")
}

/// The seed's flow with a token, then the other container's role: `== <status>` after each.
fn flow(other: &str) -> String {
    format!(
        r#"
T=$(curl -s -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' http://169.254.169.254/latest/api/token)
R=$(curl -s -H "X-aws-ec2-metadata-token: $T" http://169.254.169.254/latest/meta-data/iam/security-credentials/)
echo "$R"; echo "== 0"
curl -s -w '\n== %{{http_code}}\n' -H "X-aws-ec2-metadata-token: $T" "http://169.254.169.254/latest/meta-data/iam/security-credentials/$R"
curl -s -w '\n== %{{http_code}}\n' -H "X-aws-ec2-metadata-token: $T" "http://169.254.169.254/latest/meta-data/iam/security-credentials/{other}"
"#
    )
}

imds_tests::per_mode! { podman_containers_get_their_own_roles => podman_containers_get_their_own_roles_in; }

fn podman_containers_get_their_own_roles_in(mode: Mode) {
    let scene = scene();
    let _service = Service::start();
    let curl = podman::image_from_docker(curl_image().unwrap());
    let whoami = podman::image_from_docker(
        whoami_image(env!("CARGO_BIN_EXE_imds-whoami").as_ref()).unwrap(),
    );
    let host = podman::host();
    let mut extra = vec!["--runtime", "podman", "--docker-host", &host];
    if mode == Mode::Tc {
        extra.extend(["--container-iface", "cni-podman0"]);
    }
    let proxy = Proxy::start_in(&scene, mode, &extra);
    proxy.wait_for_log(&["container engine", "Podman", "cgroupfs"]);

    // Two containers: the role from a label, and from the environment.
    let a = Container::start(&curl, &["--label", "iam.amazonaws.com/role=PodmanA"]);
    let b = Container::start(&curl, &["-e", "IAM_ROLE=PodmanB"]);
    if mode == Mode::Tc {
        // Podman makes its bridge with its first container; it is attached when it appears.
        proxy.wait_for_log(&["redirect attached to container interface", "cni-podman0"]);
    }
    for (container, own, other) in [(&a, "PodmanA", "PodmanB"), (&b, "PodmanB", "PodmanA")] {
        let out = container.exec(&flow(other));
        let got = answers(&out);
        assert_eq!(got.len(), 3, "{own}: {out}\n{:#?}", proxy.log());
        assert_eq!(got[0].1, own, "{own}: the role listed: {out}");
        assert_eq!(got[1].0, 200, "{own}: {out}");
        assert_eq!(got[2].0, 404, "{own} asking for {other}'s role: {out}");
        let creds: serde_json::Value = serde_json::from_str(&got[1].1).unwrap();
        assert_eq!(
            caller_arn(&scene, &creds),
            assumed_role(own, &container.name())
        );
    }

    // A real SDK client (aws-config's default chain, then STS).
    ensure_imds_is_simulated().unwrap();
    let endpoint = format!(
        "AWS_ENDPOINT_URL_STS=http://{}",
        scene.sts_endpoint().unwrap()
    );
    let mut args = vec!["run", "--rm", "--name", "imds-podman-sdk"];
    args.extend(podman::LIMITS);
    args.extend([
        "-e",
        &endpoint,
        "--label",
        "iam.amazonaws.com/role=PodmanSdk",
        &whoami,
    ]);
    let out = podman(&args);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        assumed_role("PodmanSdk", "imds-podman-sdk"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The premise: the proxy saw these callers as Podman's containers (kernel records in cgroup
    // mode, addresses on Podman's bridge in tc mode), through its Docker-compatible API.
    let vended = proxy
        .log()
        .iter()
        .filter(|l| l.contains("credentials vended"))
        .count();
    assert!(vended >= 3, "{:#?}", proxy.log());
}
