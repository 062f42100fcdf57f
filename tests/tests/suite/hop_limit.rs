//! The seed's problem, reproduced: with the EC2 default hop limit of 1, a container on docker0
//! never receives its IMDSv2 token (the host drops the forwarded answer when its TTL runs out),
//! while the host itself gets it. With hop limit 2 the container gets it too.
use imds_tests::{
    http::Request,
    images::{curl_image, docker},
    scene::{Scene, SceneConfig, ensure_imds_is_simulated},
    sim::HttpTokens,
};

fn scene(hop_limit: u32) -> Scene {
    SceneConfig::new(env!("CARGO_BIN_EXE_imds-sim"))
        .hop_limit(hop_limit)
        .http_tokens(HttpTokens::Required)
        .start()
        .expect("the simulated EC2 host starts")
}

/// `curl -X PUT` a token from a fresh container on docker0: (curl's exit code, its output).
fn token_from_container() -> (i32, String) {
    ensure_imds_is_simulated().expect("IMDS is the simulator before a container talks to it");
    let out = docker(&[
        "run",
        "--rm",
        "--network",
        "bridge",
        curl_image().unwrap(),
        "curl",
        "--silent",
        "--show-error",
        "--max-time",
        "3",
        "-X",
        "PUT",
        "-H",
        "X-aws-ec2-metadata-token-ttl-seconds: 60",
        "http://169.254.169.254/latest/api/token",
    ])
    .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn token_from_host(scene: &Scene) -> u16 {
    Request::put("/latest/api/token")
        .header("X-aws-ec2-metadata-token-ttl-seconds", "60")
        .send(scene.imds_v4().unwrap())
        .unwrap()
        .status
}

#[test]
fn hop_limit_1_starves_containers_but_not_the_host() {
    let scene = scene(1);
    assert_eq!(token_from_host(&scene), 200);
    let (code, output) = token_from_container();
    // curl exit 28: operation timed out. The simulator did answer: it logged a 200.
    assert_eq!(code, 28, "{output}");
    assert!(output.contains("timed out"), "{output}");
    let answered = scene
        .sim_requests()
        .iter()
        .filter(|l| l.contains("method=PUT") && l.contains("status=200"))
        .count();
    assert_eq!(
        answered,
        2,
        "host and container were both answered: {:#?}",
        scene.sim_requests()
    );
}

#[test]
fn hop_limit_2_reaches_containers() {
    let scene = scene(2);
    let (code, token) = token_from_container();
    assert_eq!(code, 0, "{token}");
    assert!(token.len() >= 40, "a token: {token:?}");
    assert_eq!(token_from_host(&scene), 200);
}
