//! `cargo xtask setup`: everything building and testing imds-proxy needs, installed and started
//! idempotently. Each step prints one line saying what it found or did; an unsupported system
//! stops with a message that names the missing piece and how to provide it.
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, ensure};

/// Versions of the Python tools in the venv, pinned so every machine tests against the same peers.
const PYTHON_PACKAGES: &[&str] = &["moto[server]==5.2.5", "awscli==1.46.3", "boto3==1.44.5"];
/// The cargo-fuzz release that runs the fuzz targets (`fuzz/`).
const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// The bpf-linker release that links aya 0.14 programs.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Where the Docker engine's output goes when setup starts it.
use ec2sim::images::DOCKERD_LOG;

/// What later steps need to know about the set-up machine.
pub struct Env {
    pub venv: PathBuf,
    #[allow(dead_code)] // Read by the cgroup-mode tests through their own discovery.
    pub cgroup2: PathBuf,
}

pub fn run(root: &Path) -> anyhow::Result<Env> {
    let started = Instant::now();
    system()?;
    let llvm = rust_src_and_llvm_version()?;
    apt_packages(&[
        &format!("llvm-{llvm}-dev"),
        "docker.io",
        "busybox-static",
        "ca-certificates",
        "curl",
        "iproute2",
        "iptables",
        // The bench clears connection-tracking entries between measurements.
        "conntrack",
        "musl-tools",
        // The systemd unit's tests: `systemd-analyze verify`, and `setpriv` (util-linux) to run
        // the proxy with the unit's capabilities.
        "systemd",
        "util-linux",
        // The Podman tests: `podman system service` and its CNI bridge.
        "podman",
        "containernetworking-plugins",
        // The CRI client's code is generated from the CRI's protobuf definitions at build time;
        // the CRI tests run a containerd of their own.
        "protobuf-compiler",
        "containerd",
    ])?;
    bpf_linker(llvm)?;
    cargo_fuzz()?;
    cargo_nextest()?;
    musl_target()?;
    docker()?;
    bpffs()?;
    let cgroup2 = cgroup2()?;
    let venv = venv(root)?;
    say("done", format!("in {:.1?}", started.elapsed()));
    Ok(Env { venv, cgroup2 })
}

fn say(step: &str, what: impl std::fmt::Display) {
    println!("setup: {step:<10} {what}");
}

fn system() -> anyhow::Result<()> {
    ensure!(
        nix::unistd::geteuid().is_root(),
        "setup must run as root: it installs packages, starts dockerd and mounts bpffs \
         (try `sudo -E cargo xtask setup`)"
    );
    let os_release = fs::read_to_string("/etc/os-release").unwrap_or_default();
    let field = |key: &str| {
        os_release
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .map(|v| v.trim_matches('"').to_owned())
            .unwrap_or_default()
    };
    let (id, like) = (field("ID"), field("ID_LIKE"));
    ensure!(
        id == "debian" || id == "ubuntu" || like.split(' ').any(|l| l == "debian"),
        "unsupported system {:?}: setup installs with apt on Debian or Ubuntu; elsewhere install \
         LLVM's development package matching `rustc +nightly -vV`, bpf-linker {BPF_LINKER_VERSION}, \
         a Docker engine, iproute2 and busybox (static) by hand",
        field("PRETTY_NAME")
    );
    ensure!(
        Path::new("/sys/kernel/btf/vmlinux").exists(),
        "the kernel has no BTF (/sys/kernel/btf/vmlinux): imds-proxy needs a kernel built with \
         CONFIG_DEBUG_INFO_BTF"
    );
    say(
        "system",
        format!(
            "{}, kernel {}, root",
            field("PRETTY_NAME"),
            nix::sys::utsname::uname()?.release().to_string_lossy()
        ),
    );
    Ok(())
}

/// Ensure rust-src for nightly and return the major version of nightly's LLVM, which bpf-linker
/// must be built against.
fn rust_src_and_llvm_version() -> anyhow::Result<u32> {
    let version = output(Command::new("rustc").args(["+nightly", "-vV"])).context(
        "no nightly toolchain: the eBPF programs build with nightly (`rustup toolchain install nightly`)",
    )?;
    let llvm: u32 = version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no LLVM version in `rustc +nightly -vV`:\n{version}"))?;
    let release = version
        .lines()
        .find_map(|l| l.strip_prefix("release: "))
        .unwrap_or("?");
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        say(
            "rust-src",
            format!("present for nightly {release} (LLVM {llvm})"),
        );
    } else {
        exec(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
        say(
            "rust-src",
            format!("installed for nightly {release} (LLVM {llvm})"),
        );
    }
    Ok(llvm)
}

fn apt_packages(packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .map(|s| s.trim() != "install ok installed")
                .unwrap_or(true)
        })
        .collect();
    if missing.is_empty() {
        say("apt", format!("present: {}", packages.join(" ")));
        return Ok(());
    }
    exec(Command::new("apt-get").arg("update").stdout(Stdio::null()))
        .context("apt-get update failed: the Debian package archive must be reachable")?;
    exec(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null()),
    )
    .with_context(|| format!("installing {} with apt-get", missing.join(" ")))?;
    say("apt", format!("installed: {}", missing.join(" ")));
    Ok(())
}

fn bpf_linker(llvm: u32) -> anyhow::Result<()> {
    let present = output(Command::new("bpf-linker").arg("--version"))
        .ok()
        .is_some_and(|v| v.trim() == format!("bpf-linker {BPF_LINKER_VERSION}"));
    let linked_llvm = which("bpf-linker")
        .and_then(|path| output(Command::new("ldd").arg(path)).ok())
        .is_some_and(|ldd| ldd.contains(&format!("libLLVM.so.{llvm}")));
    if present && linked_llvm {
        say(
            "bpf-linker",
            format!("{BPF_LINKER_VERSION} against LLVM {llvm} present"),
        );
        return Ok(());
    }
    let prefix = format!("/usr/lib/llvm-{llvm}");
    exec(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--locked",
                "--force",
                "--no-default-features",
                "--features",
                &format!("llvm-{llvm}"),
            ])
            .env("LLVM_PREFIX", &prefix)
            .env(format!("LLVM_SYS_{llvm}1_PREFIX"), &prefix),
    )
    .with_context(|| format!("building bpf-linker {BPF_LINKER_VERSION} against {prefix}"))?;
    say(
        "bpf-linker",
        format!("{BPF_LINKER_VERSION} built against LLVM {llvm}"),
    );
    Ok(())
}

/// cargo-fuzz, for the bounded fuzzing run of `cargo xtask test`.
fn cargo_fuzz() -> anyhow::Result<()> {
    let present = output(Command::new("cargo").args(["fuzz", "--version"]))
        .ok()
        .is_some_and(|v| v.trim() == format!("cargo-fuzz {CARGO_FUZZ_VERSION}"));
    if present {
        say("cargo-fuzz", format!("{CARGO_FUZZ_VERSION} present"));
        return Ok(());
    }
    exec(Command::new("cargo").args([
        "install",
        "cargo-fuzz",
        "--version",
        CARGO_FUZZ_VERSION,
        "--locked",
        "--force",
    ]))
    .with_context(|| format!("installing cargo-fuzz {CARGO_FUZZ_VERSION}"))?;
    say("cargo-fuzz", format!("{CARGO_FUZZ_VERSION} installed"));
    Ok(())
}

/// cargo-nextest, which runs the integration tests (`.config/nextest.toml`): any release the
/// machine has, else this one.
fn cargo_nextest() -> anyhow::Result<()> {
    const VERSION: &str = "0.9.143";
    if let Ok(version) = output(Command::new("cargo").args(["nextest", "--version"])) {
        say("nextest", version.lines().next().unwrap_or_default().trim());
        return Ok(());
    }
    exec(Command::new("cargo").args([
        "install",
        "cargo-nextest",
        "--version",
        VERSION,
        "--locked",
    ]))
    .with_context(|| format!("installing cargo-nextest {VERSION}"))?;
    say("nextest", format!("{VERSION} installed"));
    Ok(())
}

/// The static target of the container image's binary.
fn musl_target() -> anyhow::Result<()> {
    const TARGET: &str = "x86_64-unknown-linux-musl";
    let installed = output(Command::new("rustup").args(["target", "list", "--installed"]))?;
    if installed.lines().any(|l| l.trim() == TARGET) {
        say("musl", format!("target {TARGET} present"));
        return Ok(());
    }
    exec(Command::new("rustup").args(["target", "add", TARGET]))
        .with_context(|| format!("adding the {TARGET} target"))?;
    say("musl", format!("target {TARGET} installed"));
    Ok(())
}

fn docker_version() -> Option<String> {
    output(
        Command::new("docker")
            .args(["version", "--format", "{{.Server.Version}}"])
            .stderr(Stdio::null()),
    )
    .ok()
    .map(|v| v.trim().to_owned())
    .filter(|v| !v.is_empty())
}

fn docker() -> anyhow::Result<()> {
    if let Some(version) = docker_version() {
        say(
            "docker",
            format!("engine {version} answering on /var/run/docker.sock"),
        );
        return Ok(());
    }
    ensure!(
        which("dockerd").is_some(),
        "no dockerd on PATH although docker.io is installed"
    );
    let version = ec2sim::images::start_dockerd(true)?;
    say(
        "docker",
        format!("started dockerd {version} (log: {DOCKERD_LOG})"),
    );
    Ok(())
}

/// (mount point, fs type) of every mount.
fn mounts() -> anyhow::Result<Vec<(String, String)>> {
    Ok(fs::read_to_string("/proc/self/mounts")?
        .lines()
        .filter_map(|l| {
            let mut f = l.split(' ');
            let _source = f.next()?;
            Some((f.next()?.to_owned(), f.next()?.to_owned()))
        })
        .collect())
}

fn bpffs() -> anyhow::Result<()> {
    const BPFFS: &str = "/sys/fs/bpf";
    if mounts()?.iter().any(|(at, ty)| at == BPFFS && ty == "bpf") {
        say("bpffs", format!("already mounted at {BPFFS}"));
        return Ok(());
    }
    fs::create_dir_all(BPFFS)?;
    exec(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]))
        .context("mounting bpffs at /sys/fs/bpf")?;
    say("bpffs", format!("mounted at {BPFFS}"));
    Ok(())
}

fn cgroup2() -> anyhow::Result<PathBuf> {
    if let Some((at, _)) = mounts()?.into_iter().find(|(_, ty)| ty == "cgroup2") {
        say("cgroup v2", format!("found at {at}"));
        return Ok(at.into());
    }
    // Hybrid or v1-only host without a unified hierarchy: add one where systemd would.
    let at = Path::new("/sys/fs/cgroup/unified");
    fs::create_dir_all(at).with_context(|| format!("creating {}", at.display()))?;
    exec(
        Command::new("mount")
            .args(["-t", "cgroup2", "none"])
            .arg(at),
    )
    .with_context(|| format!("mounting cgroup2 at {}", at.display()))?;
    say("cgroup v2", format!("mounted at {}", at.display()));
    Ok(at.into())
}

fn venv(root: &Path) -> anyhow::Result<PathBuf> {
    let venv = root.join("target/venv");
    let python = venv.join("bin/python");
    let versions = || {
        output(Command::new(&python).args([
            "-c",
            "import importlib.metadata as m; import moto, boto3, awscli, flask; \
             print(' '.join(f'{p} {m.version(p)}' for p in ('moto', 'awscli', 'boto3')))",
        ]))
        .ok()
        .map(|v| v.trim().to_owned())
    };
    let wanted = PYTHON_PACKAGES
        .iter()
        .map(|p| p.replace("[server]", "").replace("==", " "))
        .collect::<Vec<_>>()
        .join(" ");
    if versions().as_deref() == Some(wanted.as_str()) && venv.join("bin/moto_server").exists() {
        say("venv", format!("{} has {wanted}", venv.display()));
        return Ok(venv);
    }
    if !python.exists() {
        exec(Command::new("python3").arg("-m").arg("venv").arg(&venv)).context(
            "creating a Python venv (needs python3 with the venv module: Debian python3-venv)",
        )?;
    }
    exec(
        Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .args(PYTHON_PACKAGES),
    )
    .context("installing moto, awscli and boto3 into the venv")?;
    let got = versions().context("the venv's packages do not import after installing them")?;
    say("venv", format!("{}: installed {got}", venv.display()));
    Ok(venv)
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|path| path.is_file())
    })
}

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8(out.stdout)?)
}

fn exec(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    ensure!(status.success(), "{cmd:?} exited with {status}");
    Ok(())
}
