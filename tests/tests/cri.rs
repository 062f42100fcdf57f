//! Kubernetes nodes (`--runtime cri`): the proxy reads pods from a real containerd through the
//! CRI, as the kubelet runs them (sandbox with the pod's annotations, cgroups under `kubepods`,
//! CNI bridge), and each pod gets the role its annotation `iam.amazonaws.com/role` names, within
//! what its namespace allows, in both modes: through the seed's curl flow, the AWS CLI and the
//! Rust SDK client. A pod whose namespace does not allow its role gets none; a pod run again
//! under a new sandbox gets its role again.
use imds_tests::{
    containers::{answers, caller_arn},
    cri::{self, Containerd},
    images::{awscli_image, curl_image, whoami_image},
    proxy::{Mode, PREFIX, Proxy},
    scene::{ACCOUNT_ID, Scene, SceneConfig, default_venv, ensure_imds_is_simulated},
    sim::HttpTokens,
};

/// As on EC2 by default: IMDSv2 required, hop limit 1. STS on the docker0 gateway, a host address
/// the pods reach through their bridge's gateway.
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

const ROLE: &str = "iam.amazonaws.com/role";

/// The seed's flow with a token, then another role: `== <status>` after each.
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

/// The listing's status with a token: 200 when the caller has a role.
const LISTING: &str = r#"
T=$(curl -s -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' http://169.254.169.254/latest/api/token)
curl -s -o /dev/null -w '%{http_code}' -H "X-aws-ec2-metadata-token: $T" http://169.254.169.254/latest/meta-data/iam/security-credentials/
"#;

imds_tests::per_mode! { pods_get_their_annotated_roles_within_their_namespaces => pods_get_their_annotated_roles_in; }

fn pods_get_their_annotated_roles_in(mode: Mode) {
    let scene = scene();
    let containerd = Containerd::start();
    let curl = containerd.import(curl_image().unwrap());
    let whoami =
        containerd.import(whoami_image(env!("CARGO_BIN_EXE_imds-whoami").as_ref()).unwrap());
    let awscli = containerd.import(&awscli_image(&default_venv()).unwrap());
    let endpoint = cri::endpoint();
    let allowed = format!("team-a={PREFIX}TeamA*,team-b={PREFIX}TeamB*");
    let mut extra = vec![
        "--runtime",
        "cri",
        "--cri-endpoint",
        &endpoint,
        "--namespace-allowed-roles",
        &allowed,
    ];
    if mode == Mode::Tc {
        extra.extend(["--container-iface", cri::BRIDGE]);
    }
    let proxy = Proxy::start_in(&scene, mode, &extra);
    proxy.wait_for_log(&["container engine", "Cri"]);
    proxy.wait_for_log(&["CRI index synchronised"]);

    ensure_imds_is_simulated().unwrap();
    let sleep = ["sleep", "3600"];
    let web = containerd.run_pod("team-a", "web", 0, &[(ROLE, "TeamAWeb")], &curl, &sleep);
    let db = containerd.run_pod("team-b", "db", 0, &[(ROLE, "TeamBDb")], &curl, &sleep);
    // A pod naming a role its namespace does not allow, and one naming none.
    let rogue = containerd.run_pod("team-b", "rogue", 0, &[(ROLE, "TeamAWeb")], &curl, &sleep);
    let bare = containerd.run_pod("team-a", "bare", 0, &[], &curl, &sleep);
    if mode == Mode::Tc {
        // The CNI plugin makes its bridge with the first pod; it is attached when it appears.
        proxy.wait_for_log(&["redirect attached to container interface", cri::BRIDGE]);
    }

    let check = |pod: &cri::Pod, own: &str, other: &str| {
        let out = containerd.exec(&pod.container, &flow(other));
        let got = answers(&out);
        assert_eq!(got.len(), 3, "{own}: {out}\n{:#?}", proxy.log());
        assert_eq!(got[0].1, own, "{own}: the role listed: {out}");
        assert_eq!(got[1].0, 200, "{own}: {out}");
        assert_eq!(got[2].0, 404, "{own} asking for {other}'s role: {out}");
        let creds: serde_json::Value = serde_json::from_str(&got[1].1).unwrap();
        assert_eq!(
            caller_arn(&scene, &creds),
            assumed_role(own, &pod.session())
        );
    };
    check(&web, "TeamAWeb", "TeamBDb");
    check(&db, "TeamBDb", "TeamAWeb");
    for pod in [&rogue, &bare] {
        assert_eq!(
            containerd.exec(&pod.container, LISTING),
            "404",
            "{}: {:#?}",
            pod.session(),
            proxy.log()
        );
    }
    proxy.wait_for_log(&["not allowed in namespace", "team-b"]);
    proxy.wait_for_log(&["no pod annotation", "team-a.bare"]);

    // Real clients in the pods: the Rust SDK (aws-config's default chain, then STS) and the AWS
    // CLI, each a container of its own started in a running pod.
    ensure_imds_is_simulated().unwrap();
    let sts = format!("http://{}", scene.sts_endpoint().unwrap());
    let sdk =
        containerd.add_container(&web, "sdk", &whoami, &[], &[("AWS_ENDPOINT_URL_STS", &sts)]);
    let (code, out, err) = containerd.wait_exited(&web, "sdk", &sdk);
    assert_eq!(code, 0, "{err:?}");
    assert_eq!(
        out.last().map(String::as_str),
        Some(assumed_role("TeamAWeb", "team-a.web").as_str()),
        "{err:?}"
    );
    let cli = containerd.add_container(
        &db,
        "cli",
        &awscli,
        &[
            "sts",
            "get-caller-identity",
            "--query",
            "Arn",
            "--output",
            "text",
        ],
        &[
            ("AWS_ENDPOINT_URL_STS", &sts),
            ("AWS_DEFAULT_REGION", "us-east-1"),
        ],
    );
    let (code, out, err) = containerd.wait_exited(&db, "cli", &cli);
    assert_eq!(code, 0, "{err:?}");
    assert_eq!(
        out.last().map(String::as_str),
        Some(assumed_role("TeamBDb", "team-b.db").as_str()),
        "{err:?}"
    );

    // The pod goes and comes back under a new sandbox (new containers, new address, new cgroup):
    // its role again, and the old one's container is forgotten.
    containerd.remove_pod(&web);
    let again = containerd.run_pod("team-a", "web", 1, &[(ROLE, "TeamAWeb")], &curl, &sleep);
    assert_ne!(again.container, web.container);
    check(&again, "TeamAWeb", "TeamBDb");
    proxy.wait_for_log(&["forgotten", &web.container]);

    // The premise: these callers were pods the proxy found through the CRI (kernel records in
    // cgroup mode, addresses on the CNI bridge in tc mode).
    let vended = proxy
        .log()
        .iter()
        .filter(|l| l.contains("credentials vended") && l.contains("team-"))
        .count();
    assert!(vended >= 5, "{:#?}", proxy.log());
}
