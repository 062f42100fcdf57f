//! The simulated EC2 host: an IMDS simulator in its own network namespace, reached from the host
//! exactly as on EC2 (169.254.169.254 and fd00:ec2::254 routed to it), plus a moto server as the
//! scene's STS.
//!
//! ```text
//!  host                                   netns imds-ec2sim
//!  ┌──────────────────────────┐  veth    ┌──────────────────────────────┐
//!  │ imds-ec2sim 169.254.77.1 ├──────────┤ eth0 169.254.77.2            │
//!  │            fd00:ec2:1::1 │          │      fd00:ec2:1::2           │
//!  │ route 169.254.169.254/32 │          │ lo   169.254.169.254/32      │
//!  │   via 169.254.77.2       │          │      fd00:ec2::254/128       │
//!  │ route fd00:ec2::254/128  │          │ imds-sim listening on both,  │
//!  │   via fd00:ec2:1::2      │          │ port 80                      │
//!  └──────────────────────────┘          └──────────────────────────────┘
//! ```
//!
//! On the machines this project is developed on, 169.254.169.254 is routed off the machine. Nothing
//! here sends to it before [`ensure_imds_is_simulated`] has confirmed that the route leads to the
//! simulator, and every test that talks to the IMDS address must call it too (the [`Scene`]
//! accessors do).
//!
//! One scene exists at a time on a machine (the routes are global): [`Scene::start`] takes an
//! exclusive lock, and clears the leftovers of a scene whose owner was killed.
use std::{
    fs::{self, File},
    io::{BufRead as _, BufReader},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener},
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use nix::{
    fcntl::{Flock, FlockArg},
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::{http, sim::Credentials, sim::HttpTokens};

/// Name of the simulator's network namespace, and of the host end of the veth pair.
pub const NETNS: &str = "imds-ec2sim";
/// The host end of the veth pair.
pub const HOST_IF: &str = "imds-ec2sim";
/// The host's address on the veth link.
pub const HOST_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 77, 1);
/// The simulator namespace's address on the veth link: the next hop towards the IMDS addresses.
pub const SIM_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 77, 2);
pub const HOST_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 1, 0, 0, 0, 0, 1);
pub const SIM_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 1, 0, 0, 0, 0, 2);
/// The instance metadata service, as every AWS SDK knows it.
pub const IMDS_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
pub const IMDS_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);
/// The account of the simulated instance (moto's default account).
pub const ACCOUNT_ID: &str = "123456789012";
/// The instance profile's role.
pub const INSTANCE_ROLE: &str = "InstanceRole";
pub const INSTANCE_ID: &str = "i-0123456789abcdef0";
pub const REGION: &str = "us-east-1";

/// Where a scene keeps its lock, logs and state; one per machine.
pub const STATE_DIR: &str = "/run/imds-ec2sim";
const LOCK_FILE: &str = "/run/imds-ec2sim.lock";

/// The IMDS endpoint over IPv4, port 80.
pub fn imds_v4() -> SocketAddr {
    SocketAddr::new(IMDS_V4.into(), 80)
}

/// The IMDS endpoint over IPv6, port 80.
pub fn imds_v6() -> SocketAddr {
    SocketAddr::new(IMDS_V6.into(), 80)
}

/// How to build the scene.
#[derive(Clone, Debug)]
pub struct SceneConfig {
    /// The `imds-sim` binary (`env!("CARGO_BIN_EXE_imds-sim")` in this package's tests).
    pub sim_bin: PathBuf,
    /// `HttpPutResponseHopLimit`.
    pub hop_limit: u32,
    /// `HttpTokens`.
    pub http_tokens: HttpTokens,
    /// Start moto as the scene's STS; the instance credentials then come from an AssumeRole of
    /// the instance role there, so moto knows them.
    pub sts: bool,
    /// Address moto listens on (its port is picked free). Loopback unless containers must reach it.
    pub sts_bind: IpAddr,
    /// Start a moto of the scene's own even when the run shares one on `sts_bind`
    /// ([`SHARED_STS_ENV`]): a test that stops its STS (an outage) must not stop the others'.
    pub own_sts: bool,
    /// The Python venv that holds moto and the AWS CLI (`cargo xtask setup` makes it).
    pub venv: PathBuf,
    /// Rotate the instance credentials this often (the simulator's `--rotate-credentials-every`).
    pub rotate_credentials_every: Option<std::time::Duration>,
}

impl SceneConfig {
    pub fn new(sim_bin: impl Into<PathBuf>) -> Self {
        Self {
            sim_bin: sim_bin.into(),
            hop_limit: 1,
            http_tokens: HttpTokens::Optional,
            sts: false,
            sts_bind: Ipv4Addr::LOCALHOST.into(),
            own_sts: false,
            venv: default_venv(),
            rotate_credentials_every: None,
        }
    }

    /// The instance's credentials rotate every `every` (each set valid for three periods).
    pub fn rotate_credentials_every(mut self, every: std::time::Duration) -> Self {
        self.rotate_credentials_every = Some(every);
        self
    }

    pub fn hop_limit(mut self, hop_limit: u32) -> Self {
        self.hop_limit = hop_limit;
        self
    }

    pub fn http_tokens(mut self, http_tokens: HttpTokens) -> Self {
        self.http_tokens = http_tokens;
        self
    }

    pub fn with_sts(mut self) -> Self {
        self.sts = true;
        self
    }

    /// Where moto listens: an address containers can reach (the docker0 gateway) when they must
    /// talk to STS themselves. Never all interfaces.
    pub fn sts_bind(mut self, addr: IpAddr) -> Self {
        self.sts_bind = addr;
        self
    }

    /// A moto of the scene's own, never the run's shared one: for a test that stops its STS.
    pub fn own_sts(mut self) -> Self {
        self.own_sts = true;
        self
    }

    pub fn start(self) -> anyhow::Result<Scene> {
        Scene::start(self)
    }
}

/// The STS peers a whole test run shares (`cargo xtask test` starts them): comma-separated
/// `address:port`. A scene whose STS would listen on one of these addresses resets that moto
/// (`/moto-api/reset`, a few milliseconds) and uses it, instead of starting its own (a second or
/// more of Python imports, about ninety times a run), unless it asked for its own
/// ([`SceneConfig::own_sts`]). Tests run one at a time, so a reset never meets another test.
pub const SHARED_STS_ENV: &str = "IMDS_TEST_STS";

/// The run's shared STS on `bind`, if [`SHARED_STS_ENV`] names one.
fn shared_sts(bind: IpAddr) -> Option<SocketAddr> {
    std::env::var(SHARED_STS_ENV)
        .ok()?
        .split(',')
        .filter_map(|a| a.trim().parse::<SocketAddr>().ok())
        .find(|a| a.ip() == bind)
}

/// A moto server for a whole test run, on `bind` and a free port, stopped when dropped. Its
/// address goes into [`SHARED_STS_ENV`] for the tests.
pub struct SharedSts {
    child: Option<Child>,
    endpoint: SocketAddr,
}

impl SharedSts {
    pub fn start(venv: &Path, bind: IpAddr, log: &Path) -> anyhow::Result<Self> {
        let port = free_port(bind)?;
        let child = spawn_moto(venv, bind, port, log)?;
        let sts = SharedSts {
            child: Some(child),
            endpoint: SocketAddr::new(bind, port),
        };
        wait_for_moto(sts.endpoint)?;
        Ok(sts)
    }

    pub fn endpoint(&self) -> SocketAddr {
        self.endpoint
    }
}

impl Drop for SharedSts {
    fn drop(&mut self) {
        if let Some(child) = self.child.take()
            && let Err(err) = stop(child)
        {
            eprintln!("stopping the shared STS: {err:#}");
        }
    }
}

/// Start `moto_server` from `venv` on `bind:port`, its output appended to `log`.
fn spawn_moto(venv: &Path, bind: IpAddr, port: u16, log: &Path) -> anyhow::Result<Child> {
    let moto_server = venv.join("bin/moto_server");
    ensure!(
        moto_server.exists(),
        "{} not found: run `cargo xtask setup` (it makes the venv with moto)",
        moto_server.display()
    );
    let log = File::options().create(true).append(true).open(log)?;
    Command::new(&moto_server)
        .args(["-H", &bind.to_string(), "-p", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .child_hygiene()
        .spawn()
        .with_context(|| format!("starting {}", moto_server.display()))
}

/// Forget everything a shared moto was told (roles assumed, sessions).
fn reset_moto(endpoint: SocketAddr) -> anyhow::Result<()> {
    let answer = http::Request::new("POST", "/moto-api/reset")
        .timeout(Duration::from_secs(10))
        .send(endpoint)
        .with_context(|| format!("resetting the shared STS on {endpoint}"))?;
    ensure!(
        answer.status == 200,
        "resetting the shared STS on {endpoint}: HTTP {}",
        answer.status
    );
    Ok(())
}

/// The venv `cargo xtask setup` creates: `$IMDS_VENV`, else `<workspace>/target/venv`.
pub fn default_venv() -> PathBuf {
    std::env::var_os("IMDS_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/venv"))
}

/// A running simulated EC2 host. Dropping it tears everything down.
pub struct Scene {
    config: SceneConfig,
    sim: Option<Child>,
    moto: Option<Child>,
    sts_endpoint: Option<SocketAddr>,
    /// The STS is the run's shared one ([`SHARED_STS_ENV`]): never stopped by this scene.
    shared_sts: bool,
    credentials: Option<Credentials>,
    _lock: Flock<File>,
}

impl Scene {
    pub fn start(config: SceneConfig) -> anyhow::Result<Self> {
        ensure!(
            nix::unistd::geteuid().is_root(),
            "the simulated EC2 host needs root (network namespaces, routes): run `cargo xtask test`"
        );
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(LOCK_FILE)
            .with_context(|| format!("opening {LOCK_FILE}"))?;
        let lock = Flock::lock(lock, FlockArg::LockExclusive)
            .map_err(|(_, errno)| errno)
            .with_context(|| format!("locking {LOCK_FILE}"))?;
        clear_leftovers()?;
        fs::create_dir_all(STATE_DIR).with_context(|| format!("creating {STATE_DIR}"))?;

        let mut scene = Scene {
            config,
            sim: None,
            moto: None,
            sts_endpoint: None,
            shared_sts: false,
            credentials: None,
            _lock: lock,
        };
        // From here on, Drop cleans up whatever part was built.
        scene.build()?;
        Ok(scene)
    }

    fn build(&mut self) -> anyhow::Result<()> {
        if self.config.sts {
            self.start_moto()?;
        }
        build_network()?;
        ensure_imds_is_simulated()?;
        self.start_sim()
    }

    /// Stop the scene's STS (an outage); [`Scene::start_sts`] brings it back on the same port.
    pub fn stop_sts(&mut self) -> anyhow::Result<()> {
        ensure!(
            !self.shared_sts,
            "this scene shares the run's STS ({SHARED_STS_ENV}): a test that stops it asks for \
             its own (SceneConfig::own_sts)"
        );
        if let Some(moto) = self.moto.take() {
            stop(moto)?;
        }
        let _ = fs::remove_file(Path::new(STATE_DIR).join("moto.pid"));
        Ok(())
    }

    /// Start the scene's STS again after [`Scene::stop_sts`], on the same address.
    pub fn start_sts(&mut self) -> anyhow::Result<()> {
        let endpoint = self.sts_endpoint.context("the scene has no STS")?;
        ensure!(self.moto.is_none(), "the STS is running");
        self.spawn_moto(endpoint.port())?;
        wait_for_moto(endpoint)
    }

    fn spawn_moto(&mut self, port: u16) -> anyhow::Result<()> {
        let child = spawn_moto(
            &self.config.venv,
            self.config.sts_bind,
            port,
            &Path::new(STATE_DIR).join("moto.log"),
        )?;
        fs::write(
            Path::new(STATE_DIR).join("moto.pid"),
            child.id().to_string(),
        )?;
        self.moto = Some(child);
        Ok(())
    }

    fn start_moto(&mut self) -> anyhow::Result<()> {
        let shared = (!self.config.own_sts)
            .then(|| shared_sts(self.config.sts_bind))
            .flatten();
        let endpoint = match shared {
            Some(endpoint) => {
                reset_moto(endpoint)?;
                self.shared_sts = true;
                endpoint
            }
            None => {
                let port = free_port(self.config.sts_bind)?;
                self.spawn_moto(port)?;
                let endpoint = SocketAddr::new(self.config.sts_bind, port);
                wait_for_moto(endpoint)?;
                endpoint
            }
        };
        self.sts_endpoint = Some(endpoint);

        // The instance profile's credentials are an assumed-role session of the instance role,
        // as on EC2, so that STS knows them when the proxy assumes container roles with them.
        let credentials = assume_role(
            endpoint,
            &format!("arn:aws:iam::{ACCOUNT_ID}:role/{INSTANCE_ROLE}"),
            INSTANCE_ID,
        )?;
        fs::write(
            Path::new(STATE_DIR).join("instance-credentials.json"),
            serde_json::to_string(&credentials)?,
        )?;
        self.credentials = Some(credentials);
        Ok(())
    }

    fn start_sim(&mut self) -> anyhow::Result<()> {
        let log = File::create(self.sim_log_path())?;
        let netns = File::open(Path::new("/run/netns").join(NETNS))
            .with_context(|| format!("opening network namespace {NETNS}"))?;
        let mut cmd = Command::new(&self.config.sim_bin);
        cmd.args(["--listen", &imds_v4().to_string()])
            .args(["--listen", &imds_v6().to_string()])
            .args(["--hop-limit", &self.config.hop_limit.to_string()])
            .args([
                "--http-tokens",
                match self.config.http_tokens {
                    HttpTokens::Optional => "optional",
                    HttpTokens::Required => "required",
                },
            ])
            .args(["--role-name", INSTANCE_ROLE])
            .args(["--account-id", ACCOUNT_ID])
            .args(["--instance-id", INSTANCE_ID])
            .args(["--region", REGION])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .child_hygiene();
        // Enter the namespace between fork and exec, so the child is the simulator itself (`ip
        // netns exec` would fork again and leave its own process in between).
        let netns_fd = netns.as_raw_fd();
        // SAFETY: setns is async-signal-safe; the fd stays open in the parent until after spawn.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(netns_fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        if let Some(every) = self.config.rotate_credentials_every {
            cmd.args([
                "--rotate-credentials-every",
                &humantime::format_duration(every).to_string(),
            ]);
        }
        if self.credentials.is_some() {
            cmd.arg("--credentials")
                .arg(Path::new(STATE_DIR).join("instance-credentials.json"));
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", self.config.sim_bin.display()))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        self.sim = Some(child);

        // The simulator prints `ready` once its listeners are bound.
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = tx.send(BufReader::new(stdout).read_line(&mut line).map(|_| line));
        });
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(Ok(line)) if line.trim() == "ready" => Ok(()),
            Ok(Ok(line)) => bail!(
                "imds-sim did not start (said {line:?}); its log:\n{}",
                self.sim_log()
            ),
            Ok(Err(err)) => Err(err).context("reading imds-sim's stdout"),
            Err(_) => bail!(
                "imds-sim not ready after 20 s; its log:\n{}",
                self.sim_log()
            ),
        }
    }

    /// The simulator's log: one line per request (peer, method, path, token, status).
    pub fn sim_log(&self) -> String {
        fs::read_to_string(self.sim_log_path()).unwrap_or_default()
    }

    pub fn sim_log_path(&self) -> PathBuf {
        Path::new(STATE_DIR).join("imds-sim.log")
    }

    /// The request lines of the simulator's log.
    pub fn sim_requests(&self) -> Vec<String> {
        self.sim_log()
            .lines()
            .filter(|l| l.contains(" request "))
            .map(str::to_owned)
            .collect()
    }

    /// The IMDS endpoint over IPv4, after checking that it is routed to the simulator.
    pub fn imds_v4(&self) -> anyhow::Result<SocketAddr> {
        ensure_imds_is_simulated()?;
        Ok(imds_v4())
    }

    /// The IMDS endpoint over IPv6, after checking that it is routed to the simulator.
    pub fn imds_v6(&self) -> anyhow::Result<SocketAddr> {
        ensure_imds_is_simulated()?;
        Ok(imds_v6())
    }

    /// The scene's STS (moto), when started with one.
    pub fn sts_endpoint(&self) -> Option<SocketAddr> {
        self.sts_endpoint
    }

    /// The instance role's credentials, when the scene has an STS.
    pub fn instance_credentials(&self) -> Option<&Credentials> {
        self.credentials.as_ref()
    }

    pub fn config(&self) -> &SceneConfig {
        &self.config
    }

    fn teardown(&mut self) -> Vec<String> {
        let mut errors = Vec::new();
        for child in [self.sim.take(), self.moto.take()].into_iter().flatten() {
            if let Err(err) = stop(child) {
                errors.push(format!("{err:#}"));
            }
        }
        let _ = fs::remove_file(Path::new(STATE_DIR).join("moto.pid"));
        if let Err(err) = remove_network() {
            errors.push(format!("{err:#}"));
        }
        errors
    }
}

impl Drop for Scene {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // A failed test: the simulator's view of it is the first thing one wants to read.
            let log = self.sim_log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("--- imds-sim log (last {} lines) ---", tail.len());
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
        }
        for err in self.teardown() {
            eprintln!("scene teardown: {err}");
        }
    }
}

/// What a scene may leave on the machine, for tests and for `clear_leftovers`.
pub fn leftovers() -> Vec<String> {
    let mut found = Vec::new();
    if Path::new("/run/netns").join(NETNS).exists() {
        found.push(format!("network namespace {NETNS}"));
    }
    if Path::new("/sys/class/net").join(HOST_IF).exists() {
        found.push(format!("link {HOST_IF}"));
    }
    for (family, dst) in [("-4", "169.254.169.254/32"), ("-6", "fd00:ec2::254/128")] {
        if let Ok(out) = ip(&[family, "route", "show", dst, "dev", HOST_IF])
            && !out.trim().is_empty()
        {
            found.push(format!("route {dst} dev {HOST_IF}"));
        }
    }
    if let Some(pid) = moto_pid() {
        found.push(format!("moto server pid {pid}"));
    }
    found
}

/// The moto server a killed scene owner left running, if any.
fn moto_pid() -> Option<i32> {
    let pid: i32 = fs::read_to_string(Path::new(STATE_DIR).join("moto.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    String::from_utf8_lossy(&cmdline)
        .contains("moto_server")
        .then_some(pid)
}

/// Remove what a scene whose owner died (SIGKILL, crash) left behind. Called under the lock.
fn clear_leftovers() -> anyhow::Result<()> {
    if let Some(pid) = moto_pid() {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
    let _ = fs::remove_file(Path::new(STATE_DIR).join("moto.pid"));
    if Path::new("/run/netns").join(NETNS).exists() {
        // The simulator (and anything else) still running in the namespace.
        if let Ok(pids) = ip(&["netns", "pids", NETNS]) {
            for pid in pids.split_whitespace().filter_map(|p| p.parse().ok()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }
    remove_network()?;
    let left = leftovers();
    ensure!(
        left.is_empty(),
        "could not clear a previous scene's leftovers: {}",
        left.join(", ")
    );
    Ok(())
}

fn build_network() -> anyhow::Result<()> {
    let v4 = |a: Ipv4Addr, len: u8| format!("{a}/{len}");
    let v6 = |a: Ipv6Addr, len: u8| format!("{a}/{len}");
    let ns = |args: &[&str]| {
        let mut full = vec!["-n", NETNS];
        full.extend_from_slice(args);
        ip(&full)
    };
    ip(&["netns", "add", NETNS])?;
    ip(&[
        "link", "add", HOST_IF, "type", "veth", "peer", "name", "eth0", "netns", NETNS,
    ])?;
    ip(&["addr", "add", &v4(HOST_V4, 30), "dev", HOST_IF])?;
    ip(&["addr", "add", &v6(HOST_V6, 64), "dev", HOST_IF, "nodad"])?;
    ip(&["link", "set", HOST_IF, "up"])?;
    ns(&["link", "set", "lo", "up"])?;
    ns(&["addr", "add", &v4(SIM_V4, 30), "dev", "eth0"])?;
    ns(&["addr", "add", &v6(SIM_V6, 64), "dev", "eth0", "nodad"])?;
    ns(&["link", "set", "eth0", "up"])?;
    // The service addresses live on the namespace's loopback, like a host's own addresses.
    ns(&["addr", "add", &v4(IMDS_V4, 32), "dev", "lo"])?;
    ns(&["addr", "add", &v6(IMDS_V6, 128), "dev", "lo", "nodad"])?;
    // Answers to anyone (host, or containers masqueraded or forwarded by the host) go back to it.
    ns(&["route", "add", "default", "via", &HOST_V4.to_string()])?;
    ns(&["-6", "route", "add", "default", "via", &HOST_V6.to_string()])?;
    // The host routes: from here on 169.254.169.254 and fd00:ec2::254 are the simulator.
    ip(&[
        "route",
        "add",
        &v4(IMDS_V4, 32),
        "via",
        &SIM_V4.to_string(),
        "dev",
        HOST_IF,
    ])?;
    ip(&[
        "-6",
        "route",
        "add",
        &v6(IMDS_V6, 128),
        "via",
        &SIM_V6.to_string(),
        "dev",
        HOST_IF,
    ])?;
    Ok(())
}

/// Delete routes, link and namespace, whichever exist.
fn remove_network() -> anyhow::Result<()> {
    if Path::new("/sys/class/net").join(HOST_IF).exists() {
        // Deleting the link takes its routes with it; the explicit deletes keep that visible.
        let _ = ip(&["route", "del", "169.254.169.254/32", "dev", HOST_IF]);
        let _ = ip(&["-6", "route", "del", "fd00:ec2::254/128", "dev", HOST_IF]);
        ip(&["link", "del", HOST_IF])?;
    }
    if Path::new("/run/netns").join(NETNS).exists() {
        ip(&["netns", "del", NETNS])?;
    }
    Ok(())
}

/// Refuse unless 169.254.169.254 and fd00:ec2::254 are routed to the simulator's namespace.
///
/// On these machines the real address is routed off the machine; anything that sends to the IMDS
/// address must call this first.
pub fn ensure_imds_is_simulated() -> anyhow::Result<()> {
    for (addr, gateway) in [
        (IpAddr::from(IMDS_V4), IpAddr::from(SIM_V4)),
        (IMDS_V6.into(), SIM_V6.into()),
    ] {
        let out = match ip(&["-j", "route", "get", &addr.to_string()]) {
            Ok(out) => out,
            // A host whose IPv6 is disabled (a test of that) sends nothing over IPv6 at all.
            Err(_) if addr.is_ipv6() && ipv6_disabled() => continue,
            Err(err) => return Err(err.context(format!("looking up the route to {addr}"))),
        };
        let routes: serde_json::Value = serde_json::from_str(&out)
            .with_context(|| format!("parsing `ip -j route get {addr}`: {out}"))?;
        let route = &routes[0];
        let dev = route["dev"].as_str().unwrap_or_default();
        let via = route["gateway"].as_str().unwrap_or_default();
        ensure!(
            dev == HOST_IF && via.parse::<IpAddr>().ok() == Some(gateway),
            "refusing to talk to {addr}: it is routed via {via:?} dev {dev:?}, not to the IMDS \
             simulator ({gateway} dev {HOST_IF}); the real instance metadata service must never \
             be reached from tests"
        );
    }
    Ok(())
}

/// Whether IPv6 is disabled on every interface of this network namespace.
fn ipv6_disabled() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv6/conf/all/disable_ipv6")
        .map(|v| v.trim() == "1")
        .unwrap_or(true)
}

/// Run `ip` with these arguments; its stdout, or an error with its stderr.
pub fn ip(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    ensure!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// SIGTERM, then SIGKILL if it has not exited within 5 s; always reaped.
fn stop(mut child: Child) -> anyhow::Result<()> {
    let pid = Pid::from_raw(child.id() as i32);
    let _ = kill(pid, Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill()?;
    child.wait()?;
    Ok(())
}

fn free_port(ip: IpAddr) -> anyhow::Result<u16> {
    Ok(TcpListener::bind((ip, 0))?.local_addr()?.port())
}

fn wait_for_moto(endpoint: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match http::Request::get("/moto-api/")
            .timeout(Duration::from_secs(2))
            .send(endpoint)
        {
            Ok(r) if r.status == 200 => return Ok(()),
            result if Instant::now() > deadline => {
                bail!("moto on {endpoint} not ready after 60 s: {result:?}")
            }
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// AssumeRole at the scene's STS, with a syntactically valid but unsigned request (moto does not
/// check signatures; the SigV4 credential scope tells it the service).
pub fn assume_role(
    sts: SocketAddr,
    role_arn: &str,
    session_name: &str,
) -> anyhow::Result<Credentials> {
    let body = format!(
        "Action=AssumeRole&Version=2011-06-15&RoleArn={}&RoleSessionName={}&DurationSeconds=21600",
        form_escape(role_arn),
        form_escape(session_name)
    );
    let response = http::Request::new("POST", "/")
        .header(
            "Content-Type",
            "application/x-www-form-urlencoded; charset=utf-8",
        )
        .header(
            "Authorization",
            format!(
                "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20260101/{REGION}/sts/aws4_request, SignedHeaders=host, Signature=0"
            ),
        )
        .body(body)
        .send(sts)?;
    let text = response.text();
    ensure!(
        response.status == 200,
        "AssumeRole {role_arn} at {sts}: {} {text}",
        response.status
    );
    let field = |name: &str| -> anyhow::Result<String> {
        let open = format!("<{name}>");
        let close = format!("</{name}>");
        let start = text
            .find(&open)
            .with_context(|| format!("no {name} in AssumeRole answer: {text}"))?
            + open.len();
        let end = text[start..]
            .find(&close)
            .with_context(|| format!("unterminated {name}"))?;
        Ok(text[start..start + end].to_owned())
    };
    let expiration = field("Expiration")?;
    // STS answers with fractional seconds; IMDS documents carry whole seconds.
    let expiration = humantime::parse_rfc3339_weak(expiration.trim_end_matches('Z'))
        .map(crate::sim::rfc3339)
        .with_context(|| format!("bad Expiration {expiration:?}"))?;
    Ok(Credentials {
        access_key_id: field("AccessKeyId")?,
        secret_access_key: field("SecretAccessKey")?,
        token: field("SessionToken")?,
        expiration,
    })
}

fn form_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// What every child of a scene gets between fork and exec.
trait ChildHygiene {
    /// Die with the thread that started it (so a killed test leaves no processes behind; its
    /// network is cleared by the next scene), and start with no signals blocked whatever the
    /// parent blocks (a parent waiting for SIGTERM with sigwait blocks it).
    fn child_hygiene(&mut self) -> &mut Self;
}

impl ChildHygiene for Command {
    fn child_hygiene(&mut self) -> &mut Self {
        // SAFETY: prctl and sigprocmask are async-signal-safe and touch no memory of the parent.
        unsafe {
            self.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let mut none: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut none);
                if libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut()) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            })
        }
    }
}
