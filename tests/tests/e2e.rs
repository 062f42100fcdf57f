//! End to end, the way a user meets the product: real Docker containers running a real AWS SDK
//! client (aws-config's default credential chain + STS, `imds-whoami`) with no credentials of
//! their own, on the simulated EC2 host at hop limit 1 with IMDSv2 required.
use imds_tests::{
    images::{docker, docker_ok, whoami_image},
    proxy::Proxy,
    scene::{ACCOUNT_ID, INSTANCE_ROLE, Scene, SceneConfig, ensure_imds_is_simulated},
    sim::HttpTokens,
};

fn scene() -> Scene {
    SceneConfig::new(env!("CARGO_BIN_EXE_imds-sim"))
        .hop_limit(1)
        .http_tokens(HttpTokens::Required)
        .with_sts()
        .sts_bind(imds_tests::images::docker0_gateway().unwrap())
        .start()
        .expect("the simulated EC2 host starts")
}

/// Start the SDK client in a container (detached); its id and name.
fn start_client(scene: &Scene, docker_args: &[&str]) -> (String, String) {
    ensure_imds_is_simulated().expect("IMDS is the simulator before a container talks to it");
    let image = whoami_image(env!("CARGO_BIN_EXE_imds-whoami").as_ref()).unwrap();
    let endpoint = format!(
        "AWS_ENDPOINT_URL_STS=http://{}",
        scene.sts_endpoint().unwrap()
    );
    let mut args = vec!["run", "-d", "-e", &endpoint];
    args.extend_from_slice(docker_args);
    args.push(image);
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

fn whoami(scene: &Scene, docker_args: &[&str]) -> (i32, String, String, String) {
    let (id, name) = start_client(scene, docker_args);
    let (code, out, err) = finish(&id);
    (code, out, err, name)
}

#[test]
fn without_imds_proxy_the_sdk_in_a_container_finds_no_credentials() {
    let scene = scene();
    let (code, out, err, _) = whoami(&scene, &["--label", "iam.amazonaws.com/role=Web"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("no credentials found in chain"), "{err}");
    // It did reach IMDS: the token was answered, and died on the way back (hop limit 1).
    assert!(
        scene
            .sim_requests()
            .iter()
            .any(|l| l.contains("method=PUT") && l.contains("status=200")),
        "{:#?}",
        scene.sim_requests()
    );
}

#[test]
fn with_imds_proxy_each_container_gets_its_own_role() {
    let scene = scene();
    let _proxy = Proxy::start(&scene, &["--default-role", "DefaultRole"]);
    // Two containers with different roles at the same time.
    let (web, web_name) = start_client(&scene, &["--label", "iam.amazonaws.com/role=Web"]);
    let (batch, batch_name) = start_client(&scene, &["--label", "iam.amazonaws.com/role=Batch"]);
    for (id, name, role) in [(web, web_name, "Web"), (batch, batch_name, "Batch")] {
        let (code, out, err) = finish(&id);
        assert_eq!(code, 0, "{err}");
        assert_eq!(
            out,
            format!("arn:aws:sts::{ACCOUNT_ID}:assumed-role/{role}/{name}")
        );
    }
    let (code, out, err, name) = whoami(&scene, &[]);
    assert_eq!(
        (code, out.as_str()),
        (
            0,
            format!("arn:aws:sts::{ACCOUNT_ID}:assumed-role/DefaultRole/{name}").as_str()
        ),
        "{err}"
    );
    let (code, out, err, name) = whoami(&scene, &["--env", "IAM_ROLE=Worker"]);
    assert_eq!(
        (code, out.as_str()),
        (
            0,
            format!("arn:aws:sts::{ACCOUNT_ID}:assumed-role/Worker/{name}").as_str()
        ),
        "{err}"
    );
}

#[test]
fn no_role_and_no_default_means_no_credentials_never_the_instance_role() {
    let scene = scene();
    let proxy = Proxy::start(&scene, &[]);
    let (code, out, err, name) = whoami(&scene, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(err.contains("no credentials found in chain"), "{err}");
    assert!(err.contains("404"), "IMDS answered 404: {err}");
    assert!(!out.contains(INSTANCE_ROLE) && !err.contains(INSTANCE_ROLE));
    assert!(
        proxy
            .log()
            .iter()
            .any(|l| l.contains("no role: no label") && l.contains(&name)),
        "the proxy log says why: {:#?}",
        proxy.log()
    );
}
