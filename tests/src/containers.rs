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
