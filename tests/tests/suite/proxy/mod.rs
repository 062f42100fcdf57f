//! The proxy's IMDS API, end to end: the `imds-proxy` binary on the simulated EC2 host, in cgroup
//! mode and in tc mode, moto as STS, real Docker containers asking with curl. Every check asserts
//! the exact status and body a container gets. One module per concern; the helpers every one
//! uses are here.
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

mod addresses;
mod api;
mod audit;
mod credentials;
mod explain;
mod lifecycle;
mod placement;
mod roles;
mod systemd;
mod tags;
mod tokens;

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
