//! The proxy deployed DaemonSet-style: as a privileged container itself (host network, the host's
//! cgroup hierarchy, bpffs and Docker socket), from the project's own `Dockerfile`. Containers get
//! their roles through it, and its own requests to IMDS are not redirected. In both modes; in
//! cgroup mode in a private cgroup namespace, as a Kubernetes pod is.
use std::time::{Duration, Instant};

use ec2sim::launch::Launch;

use imds_tests::{
    containers::containers_scene,
    http::Request,
    images::{curl_image, docker, docker_ok, whoami_image},
    proxy::{Mode, TEST_IF, TEST_LISTEN},
    scene::{ACCOUNT_ID, ensure_imds_is_simulated},
};

const IMAGE: &str = "imds-proxy:latest";
const NAME: &str = "imds-proxy-daemonset-test";
/// Pinned as the README runs it (`--pin /sys/fs/bpf/imds-proxy`), in a directory of the test's.
const PIN: &str = "/sys/fs/bpf/imds-test-daemonset";

/// `--privileged` on a real host. This machine withholds CAP_SYS_RESOURCE from everything, so
/// runc cannot grant all capabilities: grant all but that one and let bpf(2) through seccomp,
/// which is what --privileged amounts to for the proxy.
const PRIVILEGED: [&str; 8] = [
    "--cap-add",
    "ALL",
    "--cap-drop",
    "SYS_RESOURCE",
    "--security-opt",
    "seccomp=unconfined",
    "--security-opt",
    "apparmor=unconfined",
];

/// A proxy container (`name`, pinned in `pin`, its listen interface `interface`); on drop its log
/// is shown if the test failed, it is stopped (SIGTERM: it detaches) and removed, and its pinned
/// links (which outlive the container) are detached.
struct Daemon {
    name: &'static str,
    pin: String,
    interface: &'static str,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Ok(logs) = docker(&["logs", self.name])
        {
            eprintln!("{}", String::from_utf8_lossy(&logs.stderr));
        }
        let _ = docker(&["stop", "-t", "10", self.name]);
        let _ = docker(&["rm", "-f", self.name]);
        let _ = std::process::Command::new(imds_tests::proxy::proxy_bin())
            .args(["detach", "--pin", &self.pin, "--interface", self.interface])
            .output();
        let _ = imds_tests::scene::ip(&["link", "del", self.interface]);
    }
}

#[test]
fn the_proxy_runs_as_a_privileged_container_from_the_dockerfile_in_cgroup_mode() {
    daemonset(Mode::Cgroup);
}

#[test]
fn the_proxy_runs_as_a_privileged_container_from_the_dockerfile_in_tc_mode() {
    daemonset(Mode::Tc);
}

fn daemonset(mode: Mode) {
    let scene = containers_scene(env!("CARGO_BIN_EXE_imds-sim"));
    let before = imds_tests::kernel::KernelObjects::now();
    // `cargo xtask test` builds the image from the Dockerfile first, as `cargo xtask build --image`.
    let id = docker_ok(&["image", "inspect", "--format", "{{.Id}}", IMAGE]);
    assert!(
        id.is_ok(),
        "{IMAGE} missing: run `cargo xtask build --image` (xtask test does)"
    );
    let _ = docker(&["rm", "-f", NAME]);
    let ops = "127.0.0.1:9199";
    ensure_imds_is_simulated().unwrap();
    // The container's command: the same launcher as every proxy under test.
    let launch = Launch::new()
        .flag("pin", PIN)
        .listen(&TEST_LISTEN)
        .interface(TEST_IF)
        .ops(ops.parse().unwrap())
        .sts(&scene.sts_endpoint().unwrap().to_string())
        .flag("default-role", "DefaultRole")
        .args(mode.args());
    let proxy_args = launch.arguments();
    docker_ok(
        &["run", "-d", "--name", NAME]
            .into_iter()
            .chain(PRIVILEGED)
            .chain([
                "-e",
                "NO_COLOR=1",
                "--network",
                "host",
                // As the README runs it (tc mode), and as a Kubernetes pod is (cgroup mode): in a
                // cgroup namespace of its own, which the proxy leaves for the host's (hostPID).
                "--cgroupns",
                if mode == Mode::Tc { "host" } else { "private" },
                // tc mode reads each container's interfaces through its first process.
                "--pid",
                "host",
                "-v",
                "/sys/fs/cgroup:/sys/fs/cgroup",
                "-v",
                "/sys/fs/bpf:/sys/fs/bpf",
                "-v",
                "/var/run/docker.sock:/var/run/docker.sock",
                IMAGE,
            ])
            .chain(proxy_args.iter().map(String::as_str))
            .collect::<Vec<_>>(),
    )
    .unwrap();
    let _daemon = Daemon {
        name: NAME,
        pin: PIN.to_owned(),
        interface: TEST_IF,
    };
    // Ready means: programs attached, upstream IMDS and Docker answering (bounded wait).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = Request::get("/readyz").send(ops.parse().unwrap());
        if ready.as_ref().is_ok_and(|r| r.status == 200) {
            break;
        }
        assert!(Instant::now() < deadline, "not ready: {ready:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Its upstream requests reached the simulator: not redirected to itself, although its
    // cgroup (/docker/<id>) is under the attach point.
    let upstream = scene.sim_requests();
    assert!(
        upstream
            .iter()
            .any(|l| l.contains("method=PUT") && l.contains("status=200")),
        "{upstream:#?}"
    );
    let logs = docker(&["logs", NAME]).unwrap();
    let logs = String::from_utf8_lossy(&logs.stderr).into_owned();
    // In both modes it knows its own cgroup, whose connects the cgroup programs leave alone (tc
    // mode attaches them too, for host-network containers, such as the proxy itself).
    assert!(logs.contains("own_cgroup=/docker/"), "{logs}");
    // In a private cgroup namespace (cgroup mode here, as a pod): the host's joined through PID
    // 1, or (where PID 1's namespace is not readable, as on these machines) its own cgroup found
    // from a cgroup2 mounted inside the namespace.
    assert_eq!(
        logs.contains("joined the host's cgroup namespace")
            || logs.contains("in a private cgroup namespace"),
        mode == Mode::Cgroup,
        "{logs}"
    );
    if mode == Mode::Tc {
        // Attached to docker0, found on the host's network from inside its container.
        assert!(
            logs.contains("tc programs attached to container interfaces")
                && logs.contains("interfaces=[\"docker0\"]"),
            "{logs}"
        );
    }

    // A real SDK client in a container gets its role through the containerised proxy.
    let whoami = whoami_image(env!("CARGO_BIN_EXE_imds-whoami").as_ref()).unwrap();
    let endpoint = format!(
        "AWS_ENDPOINT_URL_STS=http://{}",
        scene.sts_endpoint().unwrap()
    );
    let out = docker(&[
        "run",
        "--rm",
        "--name",
        "imds-daemonset-client",
        "-e",
        &endpoint,
        "--label",
        "iam.amazonaws.com/role=Web",
        whoami,
    ])
    .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("arn:aws:sts::{ACCOUNT_ID}:assumed-role/Web/imds-daemonset-client"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The seed's manual flow from busybox + curl.
    let flow = r#"
T=$(curl -s -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' http://169.254.169.254/latest/api/token)
R=$(curl -s -H "X-aws-ec2-metadata-token: $T" http://169.254.169.254/latest/meta-data/iam/security-credentials/)
echo "role=$R"
curl -s -H "X-aws-ec2-metadata-token: $T" "http://169.254.169.254/latest/meta-data/iam/security-credentials/$R"
"#;
    let out = docker(&["run", "--rm", curl_image().unwrap(), "sh", "-c", flow]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (first, json) = text.split_once('\n').unwrap();
    assert_eq!(first, "role=DefaultRole", "{text}");
    let creds: serde_json::Value = serde_json::from_str(json).unwrap();
    assert_eq!(creds["Code"], "Success");
    assert!(
        creds["AccessKeyId"].as_str().unwrap().starts_with("ASIA"),
        "{text}"
    );
    // Stopped, the pinned redirect stays: containers fail closed until a proxy runs again. The
    // host's `imds-proxy detach --pin` removes it all.
    docker_ok(&["stop", "-t", "10", NAME]).unwrap();
    assert!(
        std::fs::read_dir(PIN).unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with("link_")),
        "links pinned in {PIN}"
    );
    assert!(
        !imds_tests::kernel::kernel_objects_since(&before).is_empty(),
        "still attached"
    );
    imds_tests::proxy::detach(PIN.as_ref());
    assert_eq!(
        imds_tests::kernel::wait_kernel_objects_gone(&before),
        Vec::<String>::new(),
        "detached"
    );
}

/// The Kubernetes manifest (`deploy/kubernetes/daemonset.yaml`) as shipped: its container's own
/// arguments (`--runtime=cri`, its CRI endpoint, pin path, role prefix, namespace policy, ops
/// address, JSON logs) and its mounts, run from the Dockerfile's image against the test's
/// containerd, whose socket is mounted where the manifest mounts the node's. Only what differs
/// on this machine is given apart, never as an argument: the STS endpoint (moto, through the
/// standard environment) and where the manifest's bpffs volume comes from (a directory of the
/// test's, so a developer's own pins are not touched). A pod in `default` gets the role its
/// annotation names within `default-*`; one naming a role outside it gets none.
#[test]
fn the_manifest_s_own_arguments_run_against_containerd() {
    use imds_tests::{
        containers::{assert_own_role_only, own_role_flow},
        cri::{self, Containerd},
    };
    const NAME: &str = "imds-proxy-manifest-test";
    const BPFFS: &str = "/sys/fs/bpf/imds-test-manifest";
    let manifest: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/kubernetes/daemonset.yaml"
        ))
        .unwrap(),
    )
    .unwrap();
    let pod = &manifest["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["hostPID"], true);
    let container = &pod["containers"][0];
    let args: Vec<String> = container["args"]
        .as_sequence()
        .expect("the container's args")
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect();
    assert!(args.contains(&"--runtime=cri".to_owned()), "{args:?}");
    let ops: std::net::SocketAddr = args
        .iter()
        .find_map(|a| a.strip_prefix("--ops-listen="))
        .expect("--ops-listen")
        .parse()
        .unwrap();
    // The manifest's volumes, each mounted from where this machine has it.
    let test_socket = cri::endpoint().trim_start_matches("unix://").to_owned();
    let mut volumes = Vec::new();
    for mount in container["volumeMounts"].as_sequence().unwrap() {
        let path = mount["mountPath"].as_str().unwrap();
        let from = match path {
            "/run/containerd/containerd.sock" => test_socket.clone(),
            "/sys/fs/bpf" => BPFFS.to_owned(),
            "/sys/fs/cgroup" => path.to_owned(),
            other => panic!("a volume the test does not know how to mount: {other}"),
        };
        volumes.extend(["-v".to_owned(), format!("{from}:{path}")]);
    }

    let scene = containers_scene(env!("CARGO_BIN_EXE_imds-sim"));
    let containerd = Containerd::start();
    let curl = containerd.import(curl_image().unwrap());
    let sts = format!(
        "AWS_ENDPOINT_URL_STS=http://{}",
        scene.sts_endpoint().unwrap()
    );
    let _ = docker(&["rm", "-f", NAME]);
    std::fs::create_dir_all(BPFFS).unwrap();
    ensure_imds_is_simulated().unwrap();
    let mut run: Vec<String> = ["run", "-d", "--name", NAME]
        .into_iter()
        // privileged: true, as far as this machine allows.
        .chain(PRIVILEGED)
        .chain([
            "--network",
            "host",
            "--pid",
            "host",
            // A pod's own cgroup namespace.
            "--cgroupns",
            "private",
            "-e",
            &sts,
        ])
        .map(str::to_owned)
        .collect();
    run.extend(volumes);
    run.push(IMAGE.to_owned());
    run.extend(args);
    docker_ok(&run.iter().map(String::as_str).collect::<Vec<_>>()).unwrap();
    // The manifest's bpffs volume is a directory of the test's, removed with its pins.
    struct Bpffs;
    impl Drop for Bpffs {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(BPFFS);
        }
    }
    let _bpffs = Bpffs;
    let _daemon = Daemon {
        name: NAME,
        pin: format!("{BPFFS}/imds-proxy"),
        interface: imds_proxy::netdev::DEFAULT_INTERFACE,
    };
    let logs = || {
        docker(&["logs", NAME])
            .map(|o| {
                String::from_utf8_lossy(&o.stderr)
                    .lines()
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = Request::get("/readyz").send(ops);
        if ready.as_ref().is_ok_and(|r| r.status == 200) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not ready: {ready:?}\n{:#?}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Ready is the programs, the upstream and the runtime answering; the first listing of the
    // runtime's containers may end just after.
    while !logs()
        .iter()
        .any(|l| l.contains("container index synchronised"))
    {
        assert!(
            Instant::now() < deadline,
            "never synchronised: {:#?}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let sleep = ["sleep", "3600"];
    let role = "iam.amazonaws.com/role";
    let web = containerd.run_pod("default", "web", 0, &[(role, "default-web")], &curl, &sleep);
    let rogue = containerd.run_pod("default", "rogue", 0, &[(role, "admin")], &curl, &sleep);
    let out = containerd.exec(&web.container, &own_role_flow("admin"));
    assert_own_role_only(&scene, &out, "default-web", "admin", &web.session(), &logs);
    // The audit line (README: "container id and name, role ARN, access key id, expiry"), in the
    // manifest's JSON logs, for what the pod was handed.
    let served: serde_json::Value =
        serde_json::from_str(&imds_tests::containers::answers(&out)[1].1).unwrap();
    let audit: Vec<serde_json::Value> = logs()
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["fields"]["access_key_id"] == served["AccessKeyId"])
        .collect();
    assert_eq!(audit.len(), 1, "one audit line for the vend: {:#?}", logs());
    let audit = &audit[0];
    assert_eq!(audit["target"], "audit", "{audit}");
    let fields = &audit["fields"];
    assert_eq!(fields["message"], "credentials vended", "{audit}");
    assert_eq!(fields["container_id"], web.container.as_str(), "{audit}");
    assert!(
        fields["container"]
            .as_str()
            .is_some_and(|n| n.contains("web")),
        "{audit}"
    );
    assert_eq!(
        fields["role_arn"],
        format!("arn:aws:iam::{ACCOUNT_ID}:role/pods/default-web"),
        "{audit}"
    );
    assert_eq!(fields["session"], web.session().as_str(), "{audit}");
    assert_eq!(fields["expiration"], served["Expiration"], "{audit}");
    let listing = containerd.exec(
        &rogue.container,
        r#"
T=$(curl -s -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' http://169.254.169.254/latest/api/token)
curl -s -o /dev/null -w '%{http_code}' -H "X-aws-ec2-metadata-token: $T" http://169.254.169.254/latest/meta-data/iam/security-credentials/
"#,
    );
    assert_eq!(listing, "404", "{:#?}", logs());
    containerd.remove_pod(&web);
    containerd.remove_pod(&rogue);
}
