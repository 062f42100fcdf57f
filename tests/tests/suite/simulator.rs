//! The IMDS simulator behaves as the EC2 user guide says IMDS does, reached from the host through
//! the simulated EC2 host's routes. Each test asserts exact statuses and bodies.
use std::{
    net::SocketAddr,
    process::Command,
    time::{Duration, Instant},
};

use imds_tests::{
    http::{Request, Response},
    scene::{ACCOUNT_ID, INSTANCE_ID, INSTANCE_ROLE, Scene, SceneConfig},
    sim::HttpTokens,
};

const TTL: &str = "X-aws-ec2-metadata-token-ttl-seconds";
const TOKEN: &str = "X-aws-ec2-metadata-token";

fn scene(http_tokens: HttpTokens) -> Scene {
    SceneConfig::new(env!("CARGO_BIN_EXE_imds-sim"))
        .http_tokens(http_tokens)
        .start()
        .expect("the simulated EC2 host starts")
}

fn send(addr: SocketAddr, request: Request) -> Response {
    request.send(addr).expect("IMDS answers")
}

fn token(addr: SocketAddr, ttl: &str) -> String {
    let r = send(addr, Request::put("/latest/api/token").header(TTL, ttl));
    assert_eq!(r.status, 200, "{}", r.text());
    r.text()
}

#[test]
fn token_ttl_bounds_and_echo() {
    let scene = scene(HttpTokens::Optional);
    let imds = scene.imds_v4().unwrap();
    for (ttl, status) in [
        ("0", 400),
        ("1", 200),
        ("21600", 200),
        ("21601", 400),
        ("-1", 400),
        ("sixty", 400),
        ("", 400),
    ] {
        let r = send(imds, Request::put("/latest/api/token").header(TTL, ttl));
        assert_eq!(r.status, status, "TTL {ttl:?}: {}", r.text());
        assert_eq!(r.header("content-type"), Some("text/plain"));
        if status == 200 {
            assert_eq!(r.header(TTL), Some(ttl), "the TTL is echoed");
            assert!(r.body.len() >= 40, "a token: {:?}", r.text());
        }
    }
    let missing = send(imds, Request::put("/latest/api/token"));
    assert_eq!(missing.status, 400);
}

#[test]
fn token_requests_through_a_proxy_and_on_other_paths_are_refused() {
    let scene = scene(HttpTokens::Optional);
    let imds = scene.imds_v4().unwrap();
    let forwarded = send(
        imds,
        Request::put("/latest/api/token")
            .header(TTL, "60")
            .header("X-Forwarded-For", "10.0.0.1"),
    );
    assert_eq!(forwarded.status, 403);
    let versioned = send(
        imds,
        Request::put("/2021-03-23/api/token").header(TTL, "60"),
    );
    assert_eq!(versioned.status, 403);
    let elsewhere = send(imds, Request::put("/latest/meta-data/").header(TTL, "60"));
    assert_eq!(elsewhere.status, 405);
    for method in ["POST", "DELETE", "PATCH", "OPTIONS"] {
        let r = send(imds, Request::new(method, "/latest/meta-data/"));
        assert_eq!(r.status, 405, "{method}");
    }
}

#[test]
fn tokens_optional_answers_v1_and_rejects_bad_tokens() {
    let scene = scene(HttpTokens::Optional);
    let imds = scene.imds_v4().unwrap();
    let v1 = send(imds, Request::get("/latest/meta-data/instance-id"));
    assert_eq!((v1.status, v1.text().as_str()), (200, INSTANCE_ID));
    let bad = send(
        imds,
        Request::get("/latest/meta-data/instance-id").header(TOKEN, "not-a-token"),
    );
    assert_eq!(bad.status, 401);
    let t = token(imds, "60");
    let v2 = send(
        imds,
        Request::get("/latest/meta-data/instance-id").header(TOKEN, t),
    );
    assert_eq!((v2.status, v2.text().as_str()), (200, INSTANCE_ID));
}

#[test]
fn tokens_required_rejects_v1() {
    let scene = scene(HttpTokens::Required);
    let imds = scene.imds_v4().unwrap();
    let v1 = send(imds, Request::get("/latest/meta-data/instance-id"));
    assert_eq!(v1.status, 401);
    let head_v1 = send(imds, Request::new("HEAD", "/latest/meta-data/instance-id"));
    assert_eq!(head_v1.status, 401);
    let t = token(imds, "60");
    let v2 = send(
        imds,
        Request::get("/latest/meta-data/instance-id").header(TOKEN, t.clone()),
    );
    assert_eq!((v2.status, v2.text().as_str()), (200, INSTANCE_ID));
    let head = send(
        imds,
        Request::new("HEAD", "/latest/meta-data/instance-id").header(TOKEN, t),
    );
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), Some("19"));
}

#[test]
fn a_token_expires_after_its_ttl() {
    let scene = scene(HttpTokens::Required);
    let imds = scene.imds_v4().unwrap();
    // Three seconds: long enough that the check right after issue is always inside them, so
    // both assertions always run.
    let t = token(imds, "3");
    // The simulator issued it before this point, so it expires before `received` + 3 s.
    let received = Instant::now();
    let before = send(
        imds,
        Request::get("/latest/meta-data/instance-id").header(TOKEN, t.clone()),
    );
    assert_eq!(before.status, 200, "valid within its TTL");
    std::thread::sleep(Duration::from_millis(3100).saturating_sub(received.elapsed()));
    let after = send(
        imds,
        Request::get("/latest/meta-data/instance-id").header(TOKEN, t),
    );
    assert_eq!(after.status, 401, "expired after its TTL");
}

#[test]
fn paths_listings_and_unknown_items() {
    let scene = scene(HttpTokens::Optional);
    let imds = scene.imds_v4().unwrap();
    let get = |path: &str| send(imds, Request::get(path));
    let listing = get("/latest/meta-data/");
    assert_eq!(listing.status, 200);
    assert_eq!(listing.header("content-type"), Some("text/plain"));
    assert_eq!(
        listing.text(),
        "ami-id\nhostname\niam/\nidentity-credentials/\ninstance-id\ninstance-type\nlocal-ipv4\nplacement/"
    );
    assert_eq!(
        get("/latest/meta-data/placement/").text(),
        "availability-zone\nregion"
    );
    assert_eq!(
        get("/latest/meta-data/placement/region").text(),
        "us-east-1"
    );
    assert_eq!(
        get("/latest/meta-data/placement/availability-zone").text(),
        "us-east-1a"
    );
    assert_eq!(
        get("/latest/meta-data/iam/").text(),
        "info\nsecurity-credentials/"
    );
    assert_eq!(
        get("/latest/meta-data/iam/security-credentials/").text(),
        INSTANCE_ROLE
    );
    let info: serde_json::Value =
        serde_json::from_slice(&get("/latest/meta-data/iam/info").body).unwrap();
    assert_eq!(info["Code"], "Success");
    assert_eq!(
        info["InstanceProfileArn"],
        format!("arn:aws:iam::{ACCOUNT_ID}:instance-profile/{INSTANCE_ROLE}")
    );
    let document: serde_json::Value =
        serde_json::from_slice(&get("/latest/dynamic/instance-identity/document").body).unwrap();
    assert_eq!(document["instanceId"], INSTANCE_ID);
    assert_eq!(document["accountId"], ACCOUNT_ID);
    assert_eq!(document["region"], "us-east-1");
    let user_data = get("/latest/user-data");
    assert_eq!(user_data.status, 200);
    assert!(user_data.text().starts_with("#!/bin/sh"));
    for missing in [
        "/latest/meta-data/nope",
        "/latest/meta-data/instance-id/",
        "/latest/meta-data/iam/security-credentials/OtherRole",
        "/nope",
    ] {
        let r = get(missing);
        assert_eq!(r.status, 404, "{missing}");
        assert_eq!(r.header("content-type"), Some("text/plain"));
    }
}

/// `Code`, `LastUpdated`, `Type`, `AccessKeyId`, `SecretAccessKey`, `Token`, `Expiration`,
/// timestamps UTC with seconds precision.
fn assert_credentials_document(body: &[u8]) -> serde_json::Value {
    let doc: serde_json::Value = serde_json::from_slice(body).expect("credentials are JSON");
    let keys: Vec<&str> = doc
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        [
            "AccessKeyId",
            "Code",
            "Expiration",
            "LastUpdated",
            "SecretAccessKey",
            "Token",
            "Type"
        ]
    );
    assert_eq!(doc["Code"], "Success");
    assert_eq!(doc["Type"], "AWS-HMAC");
    for key in ["LastUpdated", "Expiration"] {
        let ts = doc[key].as_str().unwrap();
        assert!(
            ts.len() == 20 && ts.ends_with('Z') && humantime::parse_rfc3339(ts).is_ok(),
            "{key} is UTC with seconds precision: {ts:?}"
        );
    }
    assert!(doc["AccessKeyId"].as_str().unwrap().starts_with("ASIA"));
    doc
}

#[test]
fn credentials_documents() {
    let scene = scene(HttpTokens::Required);
    let imds = scene.imds_v4().unwrap();
    let t = token(imds, "60");
    let get = |path: &str| send(imds, Request::get(path).header(TOKEN, t.clone()));
    let role = get(&format!(
        "/latest/meta-data/iam/security-credentials/{INSTANCE_ROLE}"
    ));
    assert_eq!(role.status, 200);
    assert!(
        role.text().starts_with("{\n  \"Code\" : \"Success\",\n"),
        "laid out as IMDS lays it out: {}",
        role.text()
    );
    assert_credentials_document(&role.body);
    let identity =
        get("/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance");
    assert_eq!(identity.status, 200);
    let identity = assert_credentials_document(&identity.body);
    let role: serde_json::Value = serde_json::from_slice(&role.body).unwrap();
    assert_ne!(identity["AccessKeyId"], role["AccessKeyId"]);
}

#[test]
fn ipv6_endpoint_answers_the_same() {
    let scene = scene(HttpTokens::Required);
    let imds = scene.imds_v6().unwrap();
    let t = token(imds, "60");
    let r = send(
        imds,
        Request::get("/latest/meta-data/instance-id").header(TOKEN, t),
    );
    assert_eq!((r.status, r.text().as_str()), (200, INSTANCE_ID));
    assert_eq!(
        send(imds, Request::get("/latest/meta-data/instance-id")).status,
        401
    );
}

#[test]
fn serves_many_concurrent_clients_and_logs_every_request() {
    let scene = scene(HttpTokens::Required);
    let imds = scene.imds_v4().unwrap();
    const CLIENTS: usize = 64;
    let handles: Vec<_> = (0..CLIENTS)
        .map(|_| {
            std::thread::spawn(move || {
                let t = token(imds, "60");
                send(
                    imds,
                    Request::get("/latest/meta-data/iam/security-credentials/").header(TOKEN, t),
                )
            })
        })
        .collect();
    for handle in handles {
        let r = handle.join().unwrap();
        assert_eq!((r.status, r.text().as_str()), (200, INSTANCE_ROLE));
    }
    let unauthorized = send(imds, Request::get("/latest/meta-data/"));
    assert_eq!(unauthorized.status, 401);

    let requests = scene.sim_requests();
    let puts = requests
        .iter()
        .filter(|l| {
            l.contains("method=PUT")
                && l.contains("path=\"/latest/api/token\"")
                && l.contains("token=\"none\"")
                && l.contains("status=200")
        })
        .count();
    let gets = requests
        .iter()
        .filter(|l| {
            l.contains("method=GET")
                && l.contains("path=\"/latest/meta-data/iam/security-credentials/\"")
                && l.contains("token=\"present\"")
                && l.contains("status=200")
        })
        .count();
    assert_eq!((puts, gets), (CLIENTS, CLIENTS), "{requests:#?}");
    assert!(
        requests
            .last()
            .is_some_and(|l| l.contains("token=\"none\"") && l.contains("status=401")),
        "{requests:#?}"
    );
}

/// A real client: the AWS CLI on the host finds the instance role through the simulator (IMDSv2,
/// required) and the scene's STS accepts those credentials.
#[test]
fn aws_cli_on_the_host_gets_the_instance_role_accepted_by_sts() {
    let scene = SceneConfig::new(env!("CARGO_BIN_EXE_imds-sim"))
        .http_tokens(HttpTokens::Required)
        .with_sts()
        .start()
        .expect("the simulated EC2 host starts");
    scene.imds_v4().unwrap(); // the route check, before the CLI talks to the address
    let sts = scene.sts_endpoint().unwrap();
    let out = Command::new(scene.config().venv.join("bin/aws"))
        .args(["sts", "get-caller-identity", "--output", "json"])
        .args(["--endpoint-url", &format!("http://{sts}")])
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .env("AWS_DEFAULT_REGION", "us-east-1")
        .output()
        .expect("the AWS CLI runs");
    assert!(
        out.status.success(),
        "aws sts get-caller-identity: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let identity: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        identity["Arn"],
        format!("arn:aws:sts::{ACCOUNT_ID}:assumed-role/{INSTANCE_ROLE}/{INSTANCE_ID}")
    );
    let creds = scene.instance_credentials().unwrap();
    let user_id = identity["UserId"].as_str().unwrap();
    assert!(user_id.ends_with(&format!(":{INSTANCE_ID}")), "{user_id}");
    // The CLI used the simulator's credentials: its token request and role fetch are logged.
    let requests = scene.sim_requests();
    assert!(
        requests
            .iter()
            .any(|l| l.contains("method=PUT") && l.contains("status=200")),
        "{requests:#?}"
    );
    assert!(
        requests.iter().any(|l| l.contains(&format!(
            "path=\"/latest/meta-data/iam/security-credentials/{INSTANCE_ROLE}\""
        )) && l.contains("token=\"present\"")
            && l.contains("status=200")),
        "{requests:#?}"
    );
    assert!(creds.access_key_id.starts_with("ASIA"));
}
