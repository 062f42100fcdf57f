//! Podman's Docker-compatible API service (`podman system service`), started by a test on a
//! socket of its own, and containers run through it.
use std::{
    path::Path,
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use crate::{images::docker, scene::ensure_imds_is_simulated};

/// The test service's socket (never Podman's usual one: a host's own service is left alone).
pub const SOCKET: &str = "/run/imds-test-podman.sock";

/// `--docker-host` for the proxy.
pub fn host() -> String {
    format!("unix://{SOCKET}")
}

/// The service; stopped, with every container it ran removed, on drop.
pub struct Service {
    child: Child,
}

impl Service {
    pub fn start() -> Self {
        let _ = std::fs::remove_file(SOCKET);
        let child = Command::new("podman")
            .args(["system", "service", "--time=0", &host()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("podman (cargo xtask setup installs it)");
        let service = Self { child };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !(Path::new(SOCKET).exists() && podman(&["version"]).status.success()) {
            assert!(
                Instant::now() < deadline,
                "podman system service did not answer on {SOCKET}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        service
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = podman(&["rm", "-a", "-f", "-t", "0"]);
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(SOCKET);
    }
}

/// The podman CLI against the test's service.
pub fn podman(args: &[&str]) -> Output {
    Command::new("podman")
        .arg("--url")
        .arg(host())
        .args(args)
        .output()
        .expect("podman (cargo xtask setup installs it)")
}

/// Its stdout; an error with its stderr when it fails.
pub fn podman_ok(args: &[&str]) -> anyhow::Result<String> {
    let out = podman(args);
    anyhow::ensure!(
        out.status.success(),
        "podman {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A Docker image (built locally by the tests) copied into Podman's storage; its Podman name.
pub fn image_from_docker(image: &str) -> String {
    let saved = docker(&["save", image]).expect("docker save");
    assert!(saved.status.success(), "docker save {image}");
    let mut load = Command::new("podman")
        .arg("--url")
        .arg(host())
        .args(["load"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write as _;
        load.stdin.take().unwrap().write_all(&saved.stdout).unwrap();
    }
    let out = load.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "podman load: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    format!("localhost/{image}")
}

/// `podman run` flags every test container needs here: this machine gives no
/// CAP_SYS_RESOURCE, and Podman (as root) would raise a container's open-files and processes
/// limits above the current ones, which fails; these keep them low.
pub const LIMITS: [&str; 4] = [
    "--ulimit",
    "nofile=1024:1024",
    "--ulimit",
    "nproc=1024:1024",
];

/// A container running `sleep` through the service, to run scripts in; removed on drop.
pub struct Container(pub String);

impl Container {
    pub fn start(image: &str, podman_args: &[&str]) -> Self {
        ensure_imds_is_simulated().unwrap();
        let mut args = vec!["run", "-d"];
        args.extend(LIMITS);
        args.extend_from_slice(podman_args);
        args.extend_from_slice(&[image, "sleep", "600"]);
        Self(podman_ok(&args).unwrap().trim().to_owned())
    }

    pub fn name(&self) -> String {
        podman_ok(&["inspect", "--format", "{{.Name}}", &self.0])
            .unwrap()
            .trim()
            .trim_start_matches('/')
            .to_owned()
    }

    pub fn exec(&self, script: &str) -> String {
        ensure_imds_is_simulated().unwrap();
        let out = podman(&["exec", &self.0, "sh", "-c", script]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = podman(&["rm", "-f", "-t", "0", &self.0]);
    }
}
