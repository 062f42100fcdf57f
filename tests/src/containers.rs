//! Running a test's client inside a fresh Docker container and reading what it printed.
use crate::{
    images::{curl_image, docker, docker_ok},
    scene::ensure_imds_is_simulated,
};

/// Run `command` in a fresh container of `image` (after `docker_args`), wait for it to end;
/// (container id, name, its stdout and stderr). The container is removed.
pub fn run_in(image: &str, docker_args: &[&str], command: &[&str]) -> (String, String, String) {
    ensure_imds_is_simulated().expect("IMDS is the simulator before a container talks to it");
    let name = format!("imds-test-{}", rand_suffix());
    let mut args = vec!["run", "-d", "--name", &name];
    args.extend_from_slice(docker_args);
    args.push(image);
    args.extend_from_slice(command);
    let id = docker_ok(&args).unwrap().trim().to_owned();
    docker_ok(&["wait", &id]).unwrap();
    let logs = docker(&["logs", &id]).unwrap();
    docker_ok(&["rm", "-f", &id]).unwrap();
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&logs.stdout),
        String::from_utf8_lossy(&logs.stderr)
    );
    (id, name, out)
}

/// Run `script` with busybox sh in a fresh container of the curl image; (container id, name, its
/// output).
pub fn in_container(docker_args: &[&str], script: &str) -> (String, String, String) {
    run_in(curl_image().unwrap(), docker_args, &["sh", "-c", script])
}

/// A suffix for names that do not collide between runs.
pub fn rand_suffix() -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    format!(
        "{:x}",
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos()
            & 0xffff_ffff
    )
}

/// (status, body) pairs from output where each answer's body is followed by a `== <status>` line
/// (curl `-w '\n== %{http_code}\n'`).
pub fn answers(out: &str) -> Vec<(u16, String)> {
    let mut result = Vec::new();
    let mut body = String::new();
    for line in out.lines() {
        if let Some(status) = line.strip_prefix("== ") {
            result.push((status.trim().parse().unwrap(), body.trim_end().to_owned()));
            body.clear();
        } else {
            body.push_str(line);
            body.push('\n');
        }
    }
    result
}

/// `key=value` lines of a client's output, as a map (the last value of a key wins).
pub fn fields(out: &str) -> std::collections::HashMap<String, String> {
    out.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

/// A container of the curl image running `sleep`, to run scripts in with `docker exec`; removed
/// on drop.
pub struct Running(pub String);

impl Running {
    pub fn start(docker_args: &[&str]) -> Self {
        ensure_imds_is_simulated().unwrap();
        let mut args = vec!["run", "-d"];
        args.extend_from_slice(docker_args);
        args.extend_from_slice(&[curl_image().unwrap(), "sleep", "600"]);
        Self(docker_ok(&args).unwrap().trim().to_owned())
    }

    pub fn exec(&self, script: &str) -> String {
        ensure_imds_is_simulated().unwrap();
        let out = docker(&["exec", &self.0, "sh", "-c", script]).unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// Its IPv4 address on its (first) network.
    pub fn address(&self) -> String {
        docker_ok(&[
            "inspect",
            "--format",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}",
            &self.0,
        ])
        .unwrap()
        .split_whitespace()
        .next()
        .expect("an address")
        .to_owned()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = docker(&["rm", "-f", &self.0]);
    }
}

/// Who STS says these credentials are (the AWS CLI on the host, against the scene's STS).
pub fn caller_arn(scene: &crate::scene::Scene, creds: &serde_json::Value) -> String {
    let out = std::process::Command::new(scene.config().venv.join("bin/aws"))
        .args([
            "sts",
            "get-caller-identity",
            "--output",
            "text",
            "--query",
            "Arn",
        ])
        .args([
            "--endpoint-url",
            &format!("http://{}", scene.sts_endpoint().unwrap()),
        ])
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .env("AWS_DEFAULT_REGION", "us-east-1")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_ACCESS_KEY_ID", creds["AccessKeyId"].as_str().unwrap())
        .env(
            "AWS_SECRET_ACCESS_KEY",
            creds["SecretAccessKey"].as_str().unwrap(),
        )
        .env("AWS_SESSION_TOKEN", creds["Token"].as_str().unwrap())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The simulated EC2 host as on EC2 by default (IMDSv2 required, hop limit 1: the proxy answers
/// tokens itself), with STS on the docker0 gateway, a host address that Docker's and Podman's
/// containers and the CNI bridge's pods all reach. `sim` is the `imds-sim` binary.
pub fn containers_scene(sim: &str) -> crate::scene::Scene {
    crate::scene::SceneConfig::new(sim)
        .hop_limit(1)
        .http_tokens(crate::sim::HttpTokens::Required)
        .with_sts()
        .sts_bind(crate::images::docker0_gateway().unwrap())
        .start()
        .expect("the simulated EC2 host starts")
}

/// The ARN STS gives a session of `role` named `session`.
pub fn assumed_role(role: &str, session: &str) -> String {
    format!(
        "arn:aws:sts::{}:assumed-role/{role}/{session}",
        crate::scene::ACCOUNT_ID
    )
}

/// The seed's flow with a token, then the role `other`: `== <status>` after each. Read with
/// [`assert_own_role_only`].
pub fn own_role_flow(other: &str) -> String {
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

/// What [`own_role_flow`] printed: the role listed is `own`, its credentials are served and STS
/// says they are `own`'s session `session`, and `other`'s role is 404. `log` is shown on failure.
pub fn assert_own_role_only(
    scene: &crate::scene::Scene,
    out: &str,
    own: &str,
    other: &str,
    session: &str,
    log: &dyn Fn() -> Vec<String>,
) {
    let got = answers(out);
    assert_eq!(got.len(), 3, "{own}: {out}\n{:#?}", log());
    assert_eq!(got[0].1, own, "{own}: the role listed: {out}");
    assert_eq!(got[1].0, 200, "{own}: {out}");
    assert_eq!(got[2].0, 404, "{own} asking for {other}'s role: {out}");
    let creds: serde_json::Value = serde_json::from_str(&got[1].1).unwrap();
    assert_eq!(caller_arn(scene, &creds), assumed_role(own, session));
}
