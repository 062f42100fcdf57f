//! Kubernetes nodes (`--runtime cri`): the proxy reads pods from a real containerd through the
//! CRI, as the kubelet runs them (sandbox with the pod's annotations, cgroups under `kubepods`,
//! CNI bridge), and each pod gets the role its annotation `iam.amazonaws.com/role` names, within
//! what its namespace allows, in both modes: through the seed's curl flow, the AWS CLI and the
//! Rust SDK client. A pod whose namespace does not allow its role gets none; a pod run again
//! under a new sandbox gets its role again.
use imds_tests::{
    containers::{assert_own_role_only, assumed_role, containers_scene, own_role_flow},
    cri::{self, Containerd},
    faults::Injector,
    images::{attack_image, awscli_image, curl_image, whoami_image},
    proxy::{Mode, PREFIX, Proxy},
    scene::{INSTANCE_ID, default_venv, ensure_imds_is_simulated},
};

const ROLE: &str = "iam.amazonaws.com/role";

/// The listing's status with a token: 200 when the caller has a role.
const LISTING: &str = r#"
T=$(curl -s -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' http://169.254.169.254/latest/api/token)
curl -s -o /dev/null -w '%{http_code}' -H "X-aws-ec2-metadata-token: $T" http://169.254.169.254/latest/meta-data/iam/security-credentials/
"#;

imds_tests::per_mode! { pods_get_their_annotated_roles_within_their_namespaces => pods_get_their_annotated_roles_in; }

fn pods_get_their_annotated_roles_in(mode: Mode) {
    let scene = containers_scene(env!("CARGO_BIN_EXE_imds-sim"));
    let containerd = Containerd::start();
    let curl = containerd.import(curl_image().unwrap());
    let whoami =
        containerd.import(whoami_image(env!("CARGO_BIN_EXE_imds-whoami").as_ref()).unwrap());
    let awscli = containerd.import(&awscli_image(&default_venv()).unwrap());
    let proxy = cri_proxy(&scene, mode);

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
        let out = containerd.exec(&pod.container, &own_role_flow(other));
        assert_own_role_only(&scene, &out, own, other, &pod.session(), &|| proxy.log());
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
    // Each session a pod was handed is in the audit trail once (the pod that came back under the
    // same name is a new holder, audited on its own). A pod's containers share its session when
    // their session tags are the same: in cgroup mode each container's image is one of them, so
    // the SDK's and the CLI's containers (images of their own) have sessions of their own; in tc
    // mode a pod's containers cannot be told apart and the image is not tagged.
    let log = proxy.log();
    let audited = |what: &str| {
        log.iter()
            .filter(|l| l.contains("credentials vended") && l.contains(what))
            .count()
    };
    let own_image = usize::from(mode == Mode::Cgroup);
    assert_eq!(audited("session=team-a.web"), 2 + own_image, "{log:#?}");
    assert_eq!(audited("session=team-b.db"), 1 + own_image, "{log:#?}");
    for pod in [&web, &again, &db] {
        assert_eq!(audited(&pod.container), 1, "{}: {log:#?}", pod.session());
    }
}

/// The proxy on a Kubernetes node: containerd's CRI, team-a's pods allowed `TeamA*` roles and
/// team-b's `TeamB*`; in tc mode on the CNI bridge. Started and synchronised.
fn cri_proxy(scene: &imds_tests::scene::Scene, mode: Mode) -> Proxy {
    cri_proxy_with(scene, mode, &[])
}

/// [`cri_proxy`] with more arguments.
fn cri_proxy_with(scene: &imds_tests::scene::Scene, mode: Mode, more: &[&str]) -> Proxy {
    cri_proxy_on(scene, mode, cri::BRIDGE, more)
}

/// [`cri_proxy_with`], in tc mode on the container interfaces `iface` names.
fn cri_proxy_on(scene: &imds_tests::scene::Scene, mode: Mode, iface: &str, more: &[&str]) -> Proxy {
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
        extra.extend(["--container-iface", iface]);
    }
    extra.extend_from_slice(more);
    let proxy = Proxy::start_in(scene, mode, &extra);
    proxy.wait_for_log(&["container runtime", "runtime=cri", "name=containerd"]);
    proxy.wait_for_log(&["container index synchronised", "runtime=containerd"]);
    proxy
}

imds_tests::per_mode! { a_pods_containers_get_the_roles_their_annotations_name => a_pods_containers_get_their_own_roles_in; }

/// A pod whose annotations give its containers roles of their own
/// (`iam.amazonaws.com/role.<container>`): in cgroup mode each container gets what its
/// annotation says (`none`: no role at all), the others the pod's, all within the namespace's
/// allow-list. In tc mode the pod's containers share its address, so such a pod gets no role at
/// all (said in the log), while a pod without them is served as before.
fn a_pods_containers_get_their_own_roles_in(mode: Mode) {
    let scene = containers_scene(env!("CARGO_BIN_EXE_imds-sim"));
    let containerd = Containerd::start();
    let curl = containerd.import(curl_image().unwrap());
    let proxy = cri_proxy(&scene, mode);
    ensure_imds_is_simulated().unwrap();
    let sleep = ["sleep", "3600"];
    let own = |c: &str| format!("{ROLE}.{c}");
    let (worker, sidecar, rogue) = (own("worker"), own("sidecar"), own("rogue"));
    let annotations = [
        (ROLE, "TeamAWeb"),
        (worker.as_str(), "TeamAWorker"),
        (sidecar.as_str(), "none"),
        (rogue.as_str(), "TeamBDb"),
    ];
    let web = containerd.run_pod("team-a", "web", 0, &annotations, &curl, &sleep);
    let plain = containerd.run_pod("team-a", "plain", 0, &[(ROLE, "TeamAWeb")], &curl, &sleep);
    let in_pod = |name| containerd.add_container(&web, name, &curl, &sleep, &[]);
    let (worker, sidecar, rogue) = (in_pod("worker"), in_pod("sidecar"), in_pod("rogue"));
    if mode == Mode::Tc {
        proxy.wait_for_log(&["redirect attached to container interface", cri::BRIDGE]);
    }
    let check = |container: &str, own: &str, other: &str| {
        let out = containerd.exec(container, &own_role_flow(other));
        assert_own_role_only(&scene, &out, own, other, "team-a.web", &|| proxy.log());
    };
    let listing = |container: &str| containerd.exec(container, LISTING);
    // The premise: a pod that does not tell its containers apart is served in both modes.
    let out = containerd.exec(&plain.container, &own_role_flow("TeamAWorker"));
    assert_own_role_only(
        &scene,
        &out,
        "TeamAWeb",
        "TeamAWorker",
        "team-a.plain",
        &|| proxy.log(),
    );
    match mode {
        Mode::Cgroup => {
            check(&web.container, "TeamAWeb", "TeamAWorker");
            check(&worker, "TeamAWorker", "TeamAWeb");
            assert_eq!(listing(&sidecar), "404", "{:#?}", proxy.log());
            proxy.wait_for_log(&["no role: pod annotation iam.amazonaws.com/role.sidecar is none"]);
            assert_eq!(listing(&rogue), "404", "{:#?}", proxy.log());
            proxy.wait_for_log(&["not allowed in namespace", "TeamBDb"]);
            // `imds-proxy explain <namespace>/<pod>` says it of each of the pod's containers.
            let out = std::process::Command::new(imds_tests::proxy::proxy_bin())
                .args(["explain", "team-a/web", "--ops", &proxy.ops.to_string()])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert_eq!(
                out.status.code(),
                Some(1),
                "one of them is not served: {text}"
            );
            for words in [
                "container \"worker\" in it",
                &format!(
                    "role: {PREFIX}TeamAWorker (from pod annotation iam.amazonaws.com/role.<container>)"
                ),
                "role: none: pod annotation iam.amazonaws.com/role.sidecar is none",
                "is not among the roles namespace \"team-a\" may assume",
            ] {
                assert!(text.contains(words), "{words:?} not in:\n{text}");
            }
        }
        Mode::Tc => {
            for container in [&web.container, &worker, &sidecar, &rogue] {
                assert_eq!(listing(container), "404", "{:#?}", proxy.log());
            }
            proxy.wait_for_log(&["role refused", "only cgroup mode can tell apart"]);
        }
    }
}

imds_tests::per_mode! { a_pods_sessions_carry_eks_pod_identity_s_tags => a_pods_sessions_carry_eks_pod_identity_s_tags_in; }

/// A pod's session is tagged as EKS Pod Identity tags it (`kubernetes-namespace`,
/// `kubernetes-pod-name`, `kubernetes-pod-uid`), plus the instance id and, in cgroup mode, its
/// container's image digest, and its source identity is `<namespace>.<pod>`: exactly that, as STS
/// received it.
fn a_pods_sessions_carry_eks_pod_identity_s_tags_in(mode: Mode) {
    let scene = containers_scene(env!("CARGO_BIN_EXE_imds-sim"));
    let sts = Injector::start(scene.sts_endpoint().unwrap());
    let containerd = Containerd::start();
    let curl = containerd.import(curl_image().unwrap());
    let url = sts.url();
    let proxy = cri_proxy_with(
        &scene,
        mode,
        &["--sts-endpoint", &url, "--source-identity", "on"],
    );
    ensure_imds_is_simulated().unwrap();
    let sleep = ["sleep", "3600"];
    let web = containerd.run_pod("team-a", "web", 0, &[(ROLE, "TeamAWeb")], &curl, &sleep);
    if mode == Mode::Tc {
        proxy.wait_for_log(&["redirect attached to container interface", cri::BRIDGE]);
    }
    assert_eq!(containerd.exec(&web.container, LISTING), "200");
    let out = containerd.exec(&web.container, &own_role_flow("TeamBDb"));
    assert_own_role_only(&scene, &out, "TeamAWeb", "TeamBDb", "team-a.web", &|| {
        proxy.log()
    });
    let calls: Vec<_> = sts
        .assume_role_calls()
        .into_iter()
        .filter(|c| c.param("RoleArn").is_some_and(|a| a.ends_with("/TeamAWeb")))
        .collect();
    assert_eq!(
        calls.len(),
        1,
        "the premise: one call, through the injector: {calls:#?}"
    );
    let tags = calls[0].tags();
    let mut expected: std::collections::BTreeMap<String, String> = [
        ("ec2-instance-id", INSTANCE_ID),
        ("kubernetes-namespace", "team-a"),
        ("kubernetes-pod-name", "web"),
        ("kubernetes-pod-uid", web.uid()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    // The image only where the caller is known to be that container (cgroup mode): in tc mode a
    // pod's containers share its address, and the image could be another container's.
    if mode == Mode::Cgroup {
        let image = tags.get("container-image").cloned().unwrap_or_default();
        assert!(image.contains("sha256:"), "the image's digest: {tags:?}");
        expected.insert("container-image".into(), image);
    }
    assert_eq!(tags, expected);
    assert!(calls[0].transitive().is_empty());
    assert_eq!(calls[0].param("SourceIdentity"), Some("team-a.web"));
    containerd.remove_pod(&web);
}

/// A pod the runtime cannot describe to the proxy (its status is larger than a gRPC message may
/// be: 5 MiB of annotations) is skipped and counted, logged once, and every other pod is still
/// indexed and served: one broken container does not stop the poll.
#[test]
fn a_pod_the_runtime_cannot_describe_does_not_stop_the_others() {
    let scene = containers_scene(env!("CARGO_BIN_EXE_imds-sim"));
    let containerd = Containerd::start();
    let curl = containerd.import(curl_image().unwrap());
    let endpoint = cri::endpoint();
    let proxy = Proxy::start_in(
        &scene,
        Mode::Cgroup,
        &["--runtime", "cri", "--cri-endpoint", &endpoint],
    );
    proxy.wait_for_log(&["container index synchronised", "runtime=containerd"]);
    ensure_imds_is_simulated().unwrap();
    let sleep = ["sleep", "3600"];
    let bloat = "x".repeat(5 << 20);
    let bloated = containerd.run_pod(
        "team-a",
        "bloated",
        0,
        &[(ROLE, "TeamABloated"), ("imds-test/bloat", &bloat)],
        &curl,
        &sleep,
    );
    let web = containerd.run_pod("team-a", "web", 0, &[(ROLE, "TeamAWeb")], &curl, &sleep);
    // The poll indexed the pod after the broken one, and skipped the broken one at every poll.
    proxy.wait_for_log(&["indexed", &web.container]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while proxy.metric("imds_proxy_containers_skipped_total") < 3 {
        assert!(std::time::Instant::now() < deadline, "{:#?}", proxy.log());
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let warnings = proxy
        .log()
        .iter()
        .filter(|l| l.contains("cannot inspect this container") && l.contains(&bloated.container))
        .count();
    assert_eq!(warnings, 1, "logged once: {:#?}", proxy.log());
    assert_eq!(containerd.exec(&web.container, LISTING), "200");
    assert_ne!(containerd.exec(&bloated.container, LISTING), "200");
    containerd.remove_pod(&bloated);
    containerd.remove_pod(&web);
}

/// README: "`--default-role` applies to pods without the annotation". A pod with no annotation
/// gets the default role (session `<namespace>.<pod>`); an annotated pod still gets its own; in a
/// namespace whose allowed roles exclude the default, an unannotated pod gets none.
/// And README: "a request from a container not listed yet is answered by asking the runtime
/// directly": the runtime is listed once at start only (`--cri-poll 1h`), so every pod here is
/// found by asking, and counted (`imds_proxy_containers_found_before_indexed_total`).
#[test]
fn pods_not_listed_yet_are_found_by_asking_and_get_the_default_role() {
    let scene = containers_scene(env!("CARGO_BIN_EXE_imds-sim"));
    let containerd = Containerd::start();
    let curl = containerd.import(curl_image().unwrap());
    let endpoint = cri::endpoint();
    let allowed = format!("team-a={PREFIX}TeamA*,team-b={PREFIX}TeamB*");
    let proxy = Proxy::start_in(
        &scene,
        Mode::Cgroup,
        &[
            "--runtime",
            "cri",
            "--cri-endpoint",
            &endpoint,
            "--default-role",
            "TeamADefault",
            "--namespace-allowed-roles",
            &allowed,
            "--cri-poll",
            "1h",
        ],
    );
    proxy.wait_for_log(&["container index synchronised", "runtime=containerd"]);
    ensure_imds_is_simulated().unwrap();
    let sleep = ["sleep", "3600"];
    let bare = containerd.run_pod("team-a", "bare", 0, &[], &curl, &sleep);
    let web = containerd.run_pod("team-a", "web", 0, &[(ROLE, "TeamAWeb")], &curl, &sleep);
    let elsewhere = containerd.run_pod("team-b", "bare", 0, &[], &curl, &sleep);
    let check = |pod: &cri::Pod, own: &str, other: &str| {
        let out = containerd.exec(&pod.container, &own_role_flow(other));
        assert_own_role_only(&scene, &out, own, other, &pod.session(), &|| proxy.log());
    };
    check(&bare, "TeamADefault", "TeamAWeb");
    check(&web, "TeamAWeb", "TeamADefault");
    assert_eq!(
        containerd.exec(&elsewhere.container, LISTING),
        "404",
        "{:#?}",
        proxy.log()
    );
    assert_eq!(
        proxy.metric("imds_proxy_containers_found_before_indexed_total"),
        3,
        "each pod found by asking the runtime, once"
    );
    for pod in [&bare, &web, &elsewhere] {
        containerd.remove_pod(pod);
    }
}

imds_tests::per_mode! { pods_on_routed_veths_get_their_annotated_roles => pods_on_routed_veths_in; }

/// EKS's VPC CNI and Calico give each pod a veth of its own with a host route and no bridge; CNI's
/// `ptp` plugin does the same here. Each pod gets the role its annotation names, in both modes (in
/// tc mode `--container-iface` names the pods' veths: the programs and guards sit on each veth
/// itself). A neighbour pod sending SYNs to IMDS with the victim's address (NET_RAW, which
/// containerd gives by default) has them dropped and counted, none redirected: at its own veth in
/// tc mode, at its socket by the egress guard in cgroup mode.
fn pods_on_routed_veths_in(mode: Mode) {
    let scene = containers_scene(env!("CARGO_BIN_EXE_imds-sim"));
    let containerd = Containerd::start_with(cri::Network::Routed);
    let curl = containerd.import(curl_image().unwrap());
    let attack =
        containerd.import(attack_image(env!("CARGO_BIN_EXE_imds-attack").as_ref()).unwrap());
    let proxy = cri_proxy_on(&scene, mode, cri::ROUTED_VETHS, &[]);

    ensure_imds_is_simulated().unwrap();
    let sleep = ["sleep", "3600"];
    let web = containerd.run_pod("team-a", "web", 0, &[(ROLE, "TeamAWeb")], &curl, &sleep);
    let db = containerd.run_pod("team-b", "db", 0, &[(ROLE, "TeamBDb")], &curl, &sleep);
    // The premise: each pod's address is routed to a veth of its own, a port of no bridge.
    let veth = |pod: &cri::Pod| {
        let ip = containerd.pod_ip(pod).to_string();
        let route = imds_tests::scene::ip(&["-o", "route", "get", &ip]).unwrap();
        let dev = route
            .split_whitespace()
            .skip_while(|w| *w != "dev")
            .nth(1)
            .unwrap_or_else(|| panic!("no route to {ip}: {route}"))
            .to_owned();
        assert!(
            imds_proxy::redirect::tc::matches(cri::ROUTED_VETHS, &dev),
            "{ip} routed to {dev}"
        );
        assert!(
            !std::path::Path::new(&format!("/sys/class/net/{dev}/master")).exists(),
            "{dev} is a bridge port"
        );
        (ip, dev)
    };
    let (web_ip, web_veth) = veth(&web);
    let (_, db_veth) = veth(&db);
    assert_ne!(web_veth, db_veth);
    if mode == Mode::Tc {
        for dev in [&web_veth, &db_veth] {
            proxy.wait_for_log(&["redirect and guards attached to routed container veth", dev]);
        }
    }

    let check = |pod: &cri::Pod, own: &str, other: &str| {
        let out = containerd.exec(&pod.container, &own_role_flow(other));
        assert_own_role_only(&scene, &out, own, other, &pod.session(), &|| proxy.log());
    };
    check(&web, "TeamAWeb", "TeamBDb");
    check(&db, "TeamBDb", "TeamAWeb");

    // A neighbour pod sends SYNs to IMDS with the victim's address (NET_RAW). tc mode drops them
    // at the neighbour's own veth, before anything is redirected (the raw socket's sends succeed:
    // the packets leave the pod). cgroup mode's egress guard refuses them at the pod's socket
    // already (each send fails): a packet from a container's cgroup to IMDS that no connect hook
    // redirected never leaves it.
    let (metric, sent) = match mode {
        Mode::Tc => (
            "imds_proxy_tc_packets_total{event=\"dropped_spoofed\"}",
            "sent=3",
        ),
        Mode::Cgroup => (
            "imds_proxy_guard_packets_total{event=\"dropped\"}",
            "sent=0",
        ),
    };
    let dropped = || proxy.metric(metric);
    let redirected = || proxy.counted("imds_proxy_tc_packets_total{event=\"redirected\"}");
    let (dropped_before, redirected_before) = (dropped(), redirected());
    let mallory = containerd.run_pod(
        "team-b",
        "mallory",
        0,
        &[],
        &attack,
        &["/program", "spoof", "169.254.169.254:80", &web_ip, "3"],
    );
    let (code, out, err) = containerd.wait_exited(&mallory, "main", &mallory.container);
    assert_eq!(code, 0, "{err:?}");
    assert!(out.iter().any(|l| l == sent), "{out:?} {err:?}");
    assert_eq!(
        dropped() - dropped_before,
        3,
        "each spoofed SYN dropped: {metric}"
    );
    assert_eq!(redirected(), redirected_before, "none of them redirected");
    // The victim is served as ever from its own veth.
    check(&web, "TeamAWeb", "TeamBDb");
    containerd.remove_pod(&mallory);
    // Pods go: their veths go, and in tc mode the programs on them with them.
    for pod in [&web, &db] {
        containerd.remove_pod(pod);
    }
    if mode == Mode::Tc {
        for dev in [&web_veth, &db_veth] {
            proxy.wait_for_log(&["routed container veth gone", dev]);
        }
    }
}
