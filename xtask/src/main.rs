//! Developer commands of imds-proxy: `cargo xtask setup | build | run | test | bench | soak`.
mod run;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "imds-proxy developer tasks")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install and start what building and testing need (idempotent; root, Debian/Ubuntu).
    Setup,
    /// Run imds-proxy: on EC2 for real, elsewhere on a simulated EC2 host (`-- <proxy args>`).
    Run {
        /// Simulate an EC2 host even on one (automatic when DMI says this is not EC2).
        #[arg(long)]
        simulate_ec2: bool,
        #[arg(last = true)]
        proxy_args: Vec<String>,
    },
    /// Measure the proxy behind each redirect (cgroup, tc, iptables DNAT) from inside a container,
    /// against the floor; writes docs/benchmarks.md.
    Bench {
        /// Credential fetches per measurement.
        #[arg(long, default_value_t = 300)]
        runs: usize,
        /// Rounds: each measures the floor and every redirect once, in turn, so that noise on the
        /// machine is spread over all of them; the samples of all rounds are pooled.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Under load: clients at once (one container).
        #[arg(long, default_value_t = 16)]
        connections: usize,
        /// Under load: how long each measurement lasts.
        #[arg(long, default_value = "8s", value_parser = humantime::parse_duration)]
        duration: std::time::Duration,
        /// Under load: rounds (0: no load part).
        #[arg(long, default_value_t = 2)]
        load_rounds: usize,
        /// With many containers: the most running at once (steps 1, 10, 100, ... up to it; 0: no
        /// such part).
        #[arg(long, default_value_t = 1000)]
        containers: usize,
        /// With many containers: how many call at once.
        #[arg(long, default_value_t = 50)]
        calling: usize,
    },
    /// Mixed load on the proxy for a while, then a walk through its peers' faults; writes
    /// docs/reliability.md. Not part of `test`.
    Soak {
        /// How long the mixed load runs.
        #[arg(long, default_value_t = 10)]
        minutes: u64,
    },
    /// Build every crate, the eBPF programs included.
    Build {
        #[arg(long)]
        release: bool,
        /// Also build the container image `imds-proxy:latest` from `Dockerfile` (static binary).
        #[arg(long)]
        image: bool,
    },
    /// Setup, then format check, clippy (eBPF included), unit, integration and end-to-end tests.
    Test {
        /// Passed to the test binaries (a test name filter, `--nocapture`, ...).
        #[arg(last = true)]
        test_args: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    match cli.command {
        Task::Setup => setup::run(&root).map(|_| ()),
        Task::Bench {
            runs,
            rounds,
            connections,
            duration,
            load_rounds,
            containers,
            calling,
        } => perf::bench::run(
            &root,
            &release_binaries(&root)?,
            &perf::bench::Settings {
                runs,
                rounds,
                load: perf::bench::LoadSettings {
                    connections,
                    duration,
                    rounds: load_rounds,
                    containers,
                    calling,
                },
            },
        ),
        Task::Soak { minutes } => perf::soak::run(&root, &release_binaries(&root)?, minutes),
        Task::Run {
            simulate_ec2,
            proxy_args,
        } => run::run(&root, simulate_ec2, &proxy_args),
        Task::Build { release, image } => {
            build(&root, release)?;
            if image {
                build_image(&root, true)?;
            }
            Ok(())
        }
        Task::Test { test_args } => test(&root, &test_args),
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

fn build(root: &Path, release: bool) -> anyhow::Result<()> {
    let mut args = vec!["build", "--workspace", "--bins"];
    if release {
        args.push("--release");
    }
    cargo(root, &args)
}

/// The target of the static binary the image carries.
const MUSL: &str = "x86_64-unknown-linux-musl";
/// The image `cargo xtask build --image` makes.
pub const IMAGE: &str = "imds-proxy:latest";

/// The static binary, then `docker build -f Dockerfile` on a context of it and the CA bundle.
/// Released (`cargo xtask build --image`) or, for the tests, unoptimised: the same source and
/// Dockerfile, in a third of the build time (a release build of every dependency for the musl
/// target takes ten minutes on two cores).
fn build_image(root: &Path, release: bool) -> anyhow::Result<()> {
    let mut args = vec!["build", "--target", MUSL, "--package", "imds-proxy"];
    if release {
        args.push("--release");
    }
    cargo(root, &args)?;
    let context = root.join("target/image");
    std::fs::create_dir_all(&context)?;
    std::fs::copy(
        root.join("target")
            .join(MUSL)
            .join(if release { "release" } else { "debug" })
            .join("imds-proxy"),
        context.join("imds-proxy"),
    )?;
    std::fs::copy(
        "/etc/ssl/certs/ca-certificates.crt",
        context.join("ca-certificates.crt"),
    )
    .context("copying the CA bundle (Debian ca-certificates)")?;
    run(Command::new("docker")
        .args(["build", "--quiet", "--tag", IMAGE, "--file"])
        .arg(root.join("Dockerfile"))
        .arg(&context))?;
    println!("xtask build: image {IMAGE} built from Dockerfile");
    Ok(())
}

fn test(root: &Path, test_args: &[String]) -> anyhow::Result<()> {
    let started = Instant::now();
    let env = setup::run(root)?;
    step("format", || cargo(root, &["fmt", "--all", "--check"]))?;
    step("clippy (host crates)", || {
        cargo(
            root,
            &[
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ],
        )
    })?;
    // The kernel programs, compiled by that step's build script: every later build of this run
    // takes that object (imds-proxy/build.rs) instead of compiling them and `core` again.
    if let Some(object) = newest_ebpf_object(root) {
        println!(
            "xtask test: the later builds take the eBPF object {}",
            object.display()
        );
        // SAFETY: no other thread runs yet (the fuzzing thread starts after the builds).
        unsafe { std::env::set_var("IMDS_EBPF_OBJECT", object) };
    }
    step("clippy (eBPF crate, bpfel target)", || {
        run(Command::new("cargo")
            .current_dir(root)
            .args([
                "+nightly",
                "clippy",
                "--package",
                "imds-ebpf",
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
                "--release",
                "--",
                "-D",
                "warnings",
            ])
            .env("CARGO_TARGET_DIR", root.join("target/ebpf-clippy")))
    })?;
    // Unit tests of every crate, then the privileged integration and end-to-end tests, one at a
    // time: they share the machine's routes, cgroups and Docker engine.
    step("unit tests", || {
        cargo(
            root,
            &[
                "test",
                "--workspace",
                "--exclude",
                "imds-tests",
                "--lib",
                "--bins",
            ],
        )
    })?;
    // The tests run the daemon binary itself (kill it, restart it, detach with it), and its
    // image from the Dockerfile (unoptimised). Built first, alone: two cores are busy enough
    // with one build.
    step("builds for the integration tests", || {
        cargo(root, &["build", "--package", "imds-proxy", "--bins"])?;
        build_image(root, false)?;
        cargo(root, &["test", "--no-run", "--package", "imds-tests"])
    })?;
    // The fuzz targets run beside the integration tests (those mostly wait on the kernel, Docker
    // and the network); their output goes to a log, shown if they fail.
    let fuzzing = {
        let root = root.to_owned();
        std::thread::spawn(move || fuzz(&root))
    };
    // One STS peer (moto) per address the scenes use, for the whole run: a scene resets it
    // instead of starting its own (outage tests still start their own).
    let shared_sts = start_shared_sts(root, &env.venv)?;
    let integration = step("integration and end-to-end tests", || {
        // cargo-nextest (.config/nextest.toml): one test at a time, each in its own process and
        // killed when it hangs, with each test's time in the report.
        let mut cmd = Command::new("cargo");
        cmd.current_dir(root)
            .args([
                "nextest",
                "run",
                "--no-fail-fast",
                "--package",
                "imds-tests",
            ])
            .args(if test_args.is_empty() {
                &[][..]
            } else {
                &["--"][..]
            })
            .args(test_args)
            .env("IMDS_VENV", &env.venv)
            .env(
                ec2sim::scene::SHARED_STS_ENV,
                shared_sts
                    .iter()
                    .map(|sts| sts.endpoint().to_string())
                    .collect::<Vec<_>>()
                    .join(","),
            );
        run(&mut cmd)
    });
    drop(shared_sts);
    let fuzzed = fuzzing
        .join()
        .map_err(|_| anyhow::anyhow!("the fuzzing thread panicked"))?;
    integration?;
    fuzzed?;
    println!("xtask test: everything passed in {:.0?}", started.elapsed());
    Ok(())
}

/// moto on loopback (most scenes) and on the docker0 gateway (scenes whose containers call STS
/// themselves), each on a free port, for the scenes of one test run ([`ec2sim::scene::SharedSts`]).
fn start_shared_sts(root: &Path, venv: &Path) -> anyhow::Result<Vec<ec2sim::scene::SharedSts>> {
    let log = root.join("target/shared-sts.log");
    let mut binds = vec![std::net::IpAddr::from(std::net::Ipv4Addr::LOCALHOST)];
    binds.push(ec2sim::images::docker0_gateway()?);
    binds
        .into_iter()
        .map(|bind| {
            ec2sim::scene::SharedSts::start(venv, bind, &log)
                .with_context(|| format!("starting the run's shared STS on {bind}"))
        })
        .collect()
}

/// The cargo-fuzz targets (`fuzz/fuzz_targets`) and how long each runs in `cargo xtask test`.
const FUZZ_TARGETS: [&str; 5] = ["paths", "tokens", "roles", "glob", "cgroups"];
const FUZZ_SECONDS: u32 = 30;

/// Each fuzz target for [`FUZZ_SECONDS`], starting from the inputs kept in
/// `fuzz/regressions/<target>` (every crash found so far, replayed first), the corpus kept in
/// `fuzz/corpus/<target>` and a working corpus under `target/`. A crash stops the run and leaves its input in `fuzz/artifacts/<target>/`.
fn fuzz(root: &Path) -> anyhow::Result<()> {
    step("fuzzing (beside the integration tests)", || {
        let log_path = root.join("target/fuzz.log");
        std::fs::create_dir_all(root.join("target"))?;
        let log = std::fs::File::create(&log_path)?;
        for target in FUZZ_TARGETS {
            let corpus = root.join("target/fuzz-corpus").join(target);
            std::fs::create_dir_all(&corpus)?;
            let regressions = root.join("fuzz/regressions").join(target);
            std::fs::create_dir_all(&regressions)?;
            // A corpus kept in the repository, so a clean clone does not start from nothing.
            let seeds = root.join("fuzz/corpus").join(target);
            std::fs::create_dir_all(&seeds)?;
            let started = Instant::now();
            // Niced: the integration tests beside it wait on timers and the kernel, and must not
            // wait on a fuzzer for a core.
            let status = Command::new("nice")
                .current_dir(root.join("fuzz"))
                .args(["-n", "19", "cargo", "+nightly", "fuzz", "run", target])
                .arg(&corpus)
                .arg(&seeds)
                .arg(&regressions)
                .args([
                    "--",
                    &format!("-max_total_time={FUZZ_SECONDS}"),
                    "-max_len=4096",
                    "-print_final_stats=1",
                ])
                .env("CARGO_TARGET_DIR", root.join("target/fuzz"))
                .stdout(log.try_clone()?)
                .stderr(log.try_clone()?)
                .status()
                .context("running cargo fuzz (cargo xtask setup installs it)")?;
            if !status.success() {
                let text = std::fs::read_to_string(&log_path).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(40).collect();
                for line in tail.into_iter().rev() {
                    println!("fuzz: {line}");
                }
                bail!(
                    "fuzz target {target} failed (whole log: {}); its input is in \
                     fuzz/artifacts/{target}/: fix the bug and keep the input in \
                     fuzz/regressions/{target}/",
                    log_path.display()
                );
            }
            println!("fuzz: {target}: no failure in {:.0?}", started.elapsed());
        }
        Ok(())
    })
}

fn step(name: &str, f: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<()> {
    println!("==> {name}");
    let started = Instant::now();
    f().with_context(|| format!("{name} failed"))?;
    println!("==> {name}: ok ({:.1?})", started.elapsed());
    Ok(())
}

/// The eBPF object the last run of imds-proxy's build script made (`OUT_DIR/imds-ebpf`, in the
/// host's debug build directories).
fn newest_ebpf_object(root: &Path) -> Option<std::path::PathBuf> {
    std::fs::read_dir(root.join("target/debug/build"))
        .ok()?
        .flatten()
        .filter(|dir| dir.file_name().to_string_lossy().starts_with("imds-proxy-"))
        .map(|dir| dir.path().join("out/imds-ebpf"))
        .filter_map(|object| Some((object.metadata().ok()?.modified().ok()?, object)))
        .max()
        .map(|(_, object)| object)
}

fn cargo(root: &Path, args: &[&str]) -> anyhow::Result<()> {
    run(Command::new("cargo").current_dir(root).args(args))
}

/// The machine set up and the release binaries built, for `bench` and `soak` (crate `perf`).
fn release_binaries(root: &Path) -> anyhow::Result<PathBuf> {
    setup::run(root)?;
    binaries(root, true)
}

/// Build the proxy and the test binaries (simulator, clients), in release mode or not; their
/// directory.
fn binaries(root: &Path, release: bool) -> anyhow::Result<std::path::PathBuf> {
    let mut args = vec!["build"];
    if release {
        args.push("--release");
    }
    args.extend([
        "--package",
        "imds-proxy",
        "--package",
        "imds-tests",
        "--bins",
    ]);
    cargo(root, &args)?;
    Ok(root.join(if release {
        "target/release"
    } else {
        "target/debug"
    }))
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} exited with {status}");
    }
    Ok(())
}
