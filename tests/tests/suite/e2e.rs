//! End to end, the way a user meets the product: real Docker containers running real AWS clients
//! with no credentials of their own, on the simulated EC2 host at hop limit 1 with IMDSv2
//! required. Every scenario runs with both clients:
//! - the AWS CLI v1 (botocore), `aws sts get-caller-identity`;
//! - a Rust SDK client (aws-config's default credential chain + STS, `imds-whoami`).
use imds_tests::{
    containers::{assumed_role, containers_scene},
    images::{awscli_image, docker, docker_ok, whoami_image},
    proxy::{Mode, Proxy},
    scene::{INSTANCE_ROLE, Scene, default_venv, ensure_imds_is_simulated},
};

fn scene() -> Scene {
    containers_scene(env!("CARGO_BIN_EXE_imds-sim"))
}

#[derive(Clone, Copy, Debug)]
enum Client {
    Cli,
    Sdk,
}

const CLIENTS: [Client; 2] = [Client::Cli, Client::Sdk];

impl Client {
    /// Image and arguments after it: each prints the caller's ARN alone on stdout.
    fn image_and_command(self) -> (String, Vec<&'static str>) {
        match self {
            Client::Cli => (
                awscli_image(&default_venv()).unwrap(),
                vec![
                    "sts",
                    "get-caller-identity",
                    "--query",
                    "Arn",
                    "--output",
                    "text",
                ],
            ),
            Client::Sdk => (
                whoami_image(env!("CARGO_BIN_EXE_imds-whoami").as_ref())
                    .unwrap()
                    .to_owned(),
                vec![],
            ),
        }
    }

    /// What the client says on stderr when its default chain found nothing.
    fn no_credentials(self) -> &'static str {
        match self {
            Client::Cli => "Unable to locate credentials",
            Client::Sdk => "no credentials found in chain",
        }
    }
}

/// Start a client in a container (detached); its id and name.
fn start_client(scene: &Scene, client: Client, docker_args: &[&str]) -> (String, String) {
    ensure_imds_is_simulated().expect("IMDS is the simulator before a container talks to it");
    let (image, command) = client.image_and_command();
    let endpoint = format!(
        "AWS_ENDPOINT_URL_STS=http://{}",
        scene.sts_endpoint().unwrap()
    );
    // The CLI takes no region from IMDS; the SDK client does (through the proxy's pass-through).
    let mut args = vec!["run", "-d", "-e", &endpoint];
    if let Client::Cli = client {
        args.extend(["-e", "AWS_DEFAULT_REGION=us-east-1"]);
    }
    args.extend_from_slice(docker_args);
    args.push(&image);
    args.extend(command);
    let id = docker_ok(&args).unwrap().trim().to_owned();
    let name = docker_ok(&["inspect", "-f", "{{.Name}}", &id])
        .unwrap()
        .trim()
        .trim_start_matches('/')
        .to_owned();
    (id, name)
}

/// Wait for the client; (exit code, stdout, stderr).
fn finish(id: &str) -> (i32, String, String) {
    let code: i32 = docker_ok(&["wait", id]).unwrap().trim().parse().unwrap();
    let logs = docker(&["logs", id]).unwrap();
    docker_ok(&["rm", "-f", id]).unwrap();
    (
        code,
        String::from_utf8_lossy(&logs.stdout).trim().to_owned(),
        String::from_utf8_lossy(&logs.stderr).into_owned(),
    )
}

/// Run a client to the end; (exit code, stdout, stderr, container name).
fn run(scene: &Scene, client: Client, docker_args: &[&str]) -> (i32, String, String, String) {
    let (id, name) = start_client(scene, client, docker_args);
    let (code, out, err) = finish(&id);
    (code, out, err, name)
}

#[test]
fn without_imds_proxy_a_client_in_a_container_finds_no_credentials() {
    let scene = scene();
    for client in CLIENTS {
        let (code, out, err, _) = run(&scene, client, &["--label", "iam.amazonaws.com/role=Web"]);
        assert_ne!(code, 0, "{client:?}: {out}{err}");
        assert!(err.contains(client.no_credentials()), "{client:?}: {err}");
        assert!(!out.contains("arn:"), "{client:?}: {out}");
    }
    // They did reach IMDS: the token was answered, and died on the way back (hop limit 1).
    let answered = scene
        .sim_requests()
        .iter()
        .filter(|l| l.contains("method=PUT") && l.contains("status=200"))
        .count();
    assert!(answered >= CLIENTS.len(), "{:#?}", scene.sim_requests());
}

imds_tests::per_mode! { with_imds_proxy_each_container_gets_its_own_role => with_imds_proxy_each_container_gets_its_own_role_in; }

fn with_imds_proxy_each_container_gets_its_own_role_in(mode: Mode) {
    let scene = scene();
    let _proxy = Proxy::start_in(&scene, mode, &["--default-role", "DefaultRole"]);
    for client in CLIENTS {
        // Two containers with different roles at the same time.
        let web = start_client(&scene, client, &["--label", "iam.amazonaws.com/role=Web"]);
        let batch = start_client(&scene, client, &["--label", "iam.amazonaws.com/role=Batch"]);
        for ((id, name), role) in [(web, "Web"), (batch, "Batch")] {
            let (code, out, err) = finish(&id);
            assert_eq!(
                (code, out.as_str()),
                (0, assumed_role(role, &name).as_str()),
                "{client:?}: {err}"
            );
        }
        let (code, out, err, name) = run(&scene, client, &[]);
        assert_eq!(
            (code, out.as_str()),
            (0, assumed_role("DefaultRole", &name).as_str()),
            "{client:?}: {err}"
        );
        let (code, out, err, name) = run(&scene, client, &["--env", "IAM_ROLE=Worker"]);
        assert_eq!(
            (code, out.as_str()),
            (0, assumed_role("Worker", &name).as_str()),
            "{client:?}: {err}"
        );
    }
}

imds_tests::per_mode! { no_role_and_no_default_means_no_credentials_never_the_instance_role => no_role_and_no_default_means_no_credentials_never_the_instance_role_in; }

fn no_role_and_no_default_means_no_credentials_never_the_instance_role_in(mode: Mode) {
    let scene = scene();
    let proxy = Proxy::start_in(&scene, mode, &[]);
    for client in CLIENTS {
        let (code, out, err, name) = run(&scene, client, &[]);
        assert_ne!(code, 0, "{client:?}: {out}");
        assert!(err.contains(client.no_credentials()), "{client:?}: {err}");
        assert!(
            !out.contains(INSTANCE_ROLE) && !err.contains(INSTANCE_ROLE),
            "{client:?}: {out}{err}"
        );
        assert!(
            proxy
                .log()
                .iter()
                .any(|l| l.contains("no role: no label") && l.contains(&name)),
            "{client:?}: the proxy log says why: {:#?}",
            proxy.log()
        );
    }
    // The SDK's message carries IMDS's answer: a 404 for the role list, no credentials.
    let (_, _, err, _) = run(&scene, Client::Sdk, &[]);
    assert!(err.contains("404"), "{err}");
}
