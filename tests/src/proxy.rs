//! The `imds-proxy` binary under test: started with the scene's STS and the role prefix, its log
//! collected, stopped (SIGTERM, so it detaches) on drop.
use std::{
    io::{BufRead as _, BufReader},
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use ec2sim::launch::Launch;

use crate::{http::Request, scene::Scene};

/// The dummy interface and listen addresses of proxies under test (not the defaults, so a
/// proxy run by hand is left alone).
pub const TEST_IF: &str = "imds-test0";
pub const TEST_LISTEN: [&str; 2] = ["169.254.43.1:80", "[fd00:ec2:43::1]:80"];
pub use ec2sim::launch::ROLE_ARN_PREFIX as PREFIX;

/// The `imds-proxy` binary next to the running test's directory (`cargo xtask test` builds it).
pub fn proxy_bin() -> PathBuf {
    let bin = std::env::current_exe()
        .expect("the test binary's path")
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>")
        .join("imds-proxy");
    assert!(
        bin.exists(),
        "{} not built: run `cargo xtask test` (or `cargo build -p imds-proxy`)",
        bin.display()
    );
    bin
}

/// The interception modes; tests that hold for both run in each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Cgroup,
    Tc,
}

pub const MODES: [Mode; 2] = [Mode::Cgroup, Mode::Tc];

/// One `#[test]` per mode, each running `helper(mode)`, so that a failure in one mode does not
/// hide the other's result: `per_mode! { name => helper; }` makes `name::cgroup` and `name::tc`.
#[macro_export]
macro_rules! per_mode {
    ($($name:ident => $helper:ident;)+) => {$(
        mod $name {
            #[test]
            fn cgroup() {
                super::$helper($crate::proxy::Mode::Cgroup)
            }
            #[test]
            fn tc() {
                super::$helper($crate::proxy::Mode::Tc)
            }
        }
    )+};
}

impl Mode {
    /// The proxy's flags for this mode. tc mode takes docker0 and every user-defined network's
    /// bridge, including those created after the proxy started.
    pub fn args(self) -> &'static [&'static str] {
        match self {
            Mode::Cgroup => &[],
            Mode::Tc => &[
                "--mode",
                "tc",
                "--container-iface",
                "docker0",
                "--container-iface",
                "br-*",
            ],
        }
    }
}

pub use ec2sim::http::metric_value;

/// `imds-proxy detach --pin <pin>` for a test proxy's interface; panics with its stderr when it
/// fails.
/// A bpffs directory for `--pin`, empty at first; removing it detaches what the pins hold,
/// whatever happens to the test.
pub struct Pins(pub PathBuf);

impl Pins {
    pub fn new(path: &str) -> Self {
        let path = PathBuf::from(path);
        let _ = std::fs::remove_dir_all(&path);
        Self(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn detach(pin: &Path) {
    let out = Command::new(proxy_bin())
        .args(["detach", "--pin"])
        .arg(pin)
        .args(["--interface", TEST_IF])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "imds-proxy detach: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `imds-proxy run` with the scene's STS and the role prefix, plus `extra` flags.
pub struct Proxy {
    child: Child,
    mode: Mode,
    log: Arc<Mutex<Vec<String>>>,
    pub ops: SocketAddr,
}

impl Proxy {
    /// In cgroup mode (the default).
    pub fn start(scene: &Scene, extra: &[&str]) -> Self {
        Self::start_in(scene, Mode::Cgroup, extra)
    }

    pub fn start_in(scene: &Scene, mode: Mode, extra: &[&str]) -> Self {
        Self::start_with_env(scene, mode, extra, &[])
    }

    /// With these environment variables too. The scene's STS is given with `--sts-endpoint`
    /// unless `extra` names one or the environment does (`AWS_ENDPOINT_URL_STS`).
    pub fn start_with_env(scene: &Scene, mode: Mode, extra: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start_wrapped(scene, mode, extra, env, &[])
    }

    /// Run by `wrapper` (a command that ends by executing its arguments, e.g. `setpriv ... --`),
    /// so the proxy runs as that command leaves it.
    pub fn start_wrapped(
        scene: &Scene,
        mode: Mode,
        extra: &[&str],
        env: &[(&str, &str)],
        wrapper: &[&str],
    ) -> Self {
        Self::start_until(scene, mode, extra, env, wrapper, "index synchronised")
    }

    /// Started as [`Proxy::start_wrapped`], and returned once a log line contains `ready`
    /// ("container index synchronised", naming the runtime).
    pub fn start_until(
        scene: &Scene,
        mode: Mode,
        extra: &[&str],
        env: &[(&str, &str)],
        wrapper: &[&str],
        ready: &str,
    ) -> Self {
        let ready = ready.to_owned();
        let ops = SocketAddr::from((
            Ipv4Addr::LOCALHOST,
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port(),
        ));
        let mut launch = Launch::new()
            .listen(&TEST_LISTEN)
            .interface(TEST_IF)
            .ops(ops)
            .env("RUST_LOG", "info,imds_proxy=debug")
            .env("NO_COLOR", "1");
        for (key, value) in env {
            launch = launch.env(key, value);
        }
        // Unless the test puts something (a fault injector) in front of the scene's STS, or
        // names it the standard way.
        if !launch.clone().args(extra).names_sts() {
            launch = launch.sts(&scene.sts_endpoint().unwrap().to_string());
        }
        let launch = launch.args(mode.args()).args(extra);
        let bin = proxy_bin();
        let program: Vec<&std::ffi::OsStr> = wrapper
            .iter()
            .map(std::ffi::OsStr::new)
            .chain([bin.as_os_str()])
            .collect();
        let mut child = launch
            .wrapped(&program)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = log.clone();
        let stderr = BufReader::new(child.stderr.take().unwrap());
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                // Record first, then signal: the test reads the log as soon as it is signalled.
                let is_ready = line.contains(&ready);
                sink.lock().unwrap().push(line);
                if is_ready {
                    let _ = tx.send(());
                }
            }
        });
        if rx.recv_timeout(Duration::from_secs(30)).is_err() {
            let _ = child.kill();
            panic!(
                "imds-proxy did not start ({mode:?} mode): {:#?}",
                log.lock().unwrap()
            );
        }
        Self {
            child,
            mode,
            log,
            ops,
        }
    }

    /// SIGTERM and wait: the proxy's own graceful stop. The test's cleanup of the interface
    /// waits for drop.
    pub fn stop(&mut self) {
        self.stop_with(nix::sys::signal::Signal::SIGTERM);
    }

    /// `signal` (SIGTERM, SIGINT) and wait; its exit status.
    pub fn stop_with(&mut self, signal: nix::sys::signal::Signal) -> std::process::ExitStatus {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), signal);
        self.child.wait().expect("the proxy is our child")
    }

    /// Wait for the proxy to exit on its own; its exit status.
    pub fn wait(&mut self) -> std::process::ExitStatus {
        self.child.wait().expect("the proxy is our child")
    }

    /// The proxy's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The process's resident set (VmRSS), KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/<pid>/status")
    }

    /// Open file descriptors of the process.
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .unwrap()
            .count()
    }

    /// SIGKILL: the proxy gets no chance to clean anything up.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Wait (bounded, 20 s) until a log line contains every one of `parts`; that line.
    pub fn wait_for_log(&self, parts: &[&str]) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(line) = self
                .log()
                .into_iter()
                .find(|l| parts.iter().all(|p| l.contains(p)))
            {
                return line;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no log line with {parts:?}: {:#?}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// A counter from /metrics.
    pub fn metric(&self, name: &str) -> u64 {
        let text = Request::get("/metrics").send(self.ops).unwrap().text();
        metric_value(&text, name).unwrap_or_else(|| panic!("no {name} in {text}"))
    }

    /// A labelled counter, 0 while its label has not been counted yet (a label is rendered once
    /// counted). Only for a value the test then sees grow: a misspelt name stays 0.
    pub fn counted(&self, name: &str) -> u64 {
        let text = Request::get("/metrics").send(self.ops).unwrap().text();
        metric_value(&text, name).unwrap_or(0)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
        let _ = crate::scene::ip(&["link", "del", TEST_IF]);
        if std::thread::panicking() {
            eprintln!("proxy ran in {:?} mode", self.mode);
            for line in self.log() {
                eprintln!("proxy: {line}");
            }
        }
    }
}
