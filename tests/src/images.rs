//! Container images for the tests, built locally: no registry is reachable here, so each image is
//! a root filesystem assembled from this machine's own binaries and loaded with `docker import`.
use std::{
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

use anyhow::{Context as _, bail, ensure};

/// busybox (shell and tools) plus Debian's curl with the shared libraries it links: the seed's
/// manual `curl` flow runs in it unchanged. No AWS credentials anywhere inside.
pub const CURL_IMAGE: &str = "imds-test/curl:1";

/// The busybox applets linked into the image.
const APPLETS: &[&str] = &[
    "sh", "cat", "echo", "printf", "sleep", "timeout", "grep", "sed", "env", "ls", "true", "false",
];

/// The Rust SDK client (`imds-whoami`: aws-config's default chain + STS GetCallerIdentity) and the
/// libraries it links. Rebuilt from the given binary every time: it changes with the code.
pub const WHOAMI_IMAGE: &str = "imds-proxy/whoami:latest";

/// Build [`WHOAMI_IMAGE`] from the `imds-whoami` binary at `binary`; returns its name.
pub fn whoami_image(binary: &Path) -> anyhow::Result<&'static str> {
    binary_image(binary, WHOAMI_IMAGE)
}

/// The benchmark client (`imds-bench`).
pub const BENCH_IMAGE: &str = "imds-proxy/bench:latest";

/// Build [`BENCH_IMAGE`] from the `imds-bench` binary at `binary`; returns its name.
pub fn bench_image(binary: &Path) -> anyhow::Result<&'static str> {
    binary_image(binary, BENCH_IMAGE)
}

/// An image holding one program (as `/program`, its command), the libraries it links and the CA
/// bundle (the SDK's TLS client loads it at start, whatever the endpoint).
fn binary_image(binary: &Path, tag: &'static str) -> anyhow::Result<&'static str> {
    let name = binary
        .file_name()
        .and_then(|n| n.to_str())
        .context("a binary's file name")?;
    let rootfs = scratch_dir(name)?;
    fs::create_dir_all(rootfs.join("tmp"))?;
    fs::create_dir_all(rootfs.join("etc/ssl/certs"))?;
    fs::write(rootfs.join("etc/passwd"), "root:x:0:0:root:/:/program\n")?;
    fs::copy(
        "/etc/ssl/certs/ca-certificates.crt",
        rootfs.join("etc/ssl/certs/ca-certificates.crt"),
    )
    .context("copying the CA bundle (Debian ca-certificates)")?;
    copy_with_libraries(binary, &rootfs)?;
    fs::rename(
        rootfs.join(binary.strip_prefix("/")?),
        rootfs.join("program"),
    )?;
    import_with(&rootfs, tag, "CMD [\"/program\"]")?;
    fs::remove_dir_all(&rootfs)?;
    Ok(tag)
}

/// Build [`CURL_IMAGE`] unless Docker has it already; returns its name.
pub fn curl_image() -> anyhow::Result<&'static str> {
    if image_exists(CURL_IMAGE)? {
        return Ok(CURL_IMAGE);
    }
    let rootfs = scratch_dir("curl")?;
    let bin = rootfs.join("bin");
    fs::create_dir_all(&bin)?;
    fs::create_dir_all(rootfs.join("tmp"))?;
    fs::create_dir_all(rootfs.join("etc"))?;
    fs::copy("/bin/busybox", bin.join("busybox"))
        .context("copying /bin/busybox (Debian busybox-static; `cargo xtask setup` installs it)")?;
    for applet in APPLETS {
        symlink("busybox", bin.join(applet))?;
    }
    copy_with_libraries(Path::new("/usr/bin/curl"), &rootfs)?;
    // Name resolution is not needed (everything is addressed by IP), but libc wants these.
    fs::write(rootfs.join("etc/passwd"), "root:x:0:0:root:/:/bin/sh\n")?;
    fs::write(rootfs.join("etc/group"), "root:x:0:\n")?;
    fs::write(rootfs.join("etc/nsswitch.conf"), "hosts: files\n")?;
    import(&rootfs, CURL_IMAGE)?;
    fs::remove_dir_all(&rootfs)?;
    Ok(CURL_IMAGE)
}

/// Copy `binary` into `rootfs` at the same path, with every shared library `ldd` names and the
/// dynamic loader, each at its own path.
fn copy_with_libraries(binary: &Path, rootfs: &Path) -> anyhow::Result<()> {
    ensure!(binary.exists(), "{} is not installed", binary.display());
    let ldd = Command::new("ldd").arg(binary).output()?;
    ensure!(ldd.status.success(), "ldd {} failed", binary.display());
    let mut files = vec![binary.to_owned()];
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        // "libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(path) = path.filter(|p| p.starts_with('/')) {
            files.push(PathBuf::from(path));
        }
    }
    for file in files {
        let target = rootfs.join(file.strip_prefix("/")?);
        fs::create_dir_all(target.parent().expect("an absolute path has a parent"))?;
        // fs::copy follows symlinks: the image gets the library's content under the linked name.
        fs::copy(&file, &target).with_context(|| format!("copying {}", file.display()))?;
    }
    Ok(())
}

fn scratch_dir(name: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("imds-image-{name}-{}", std::process::id()));
    if dir.exists() {
        fs::remove_dir_all(&dir)?;
    }
    fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// `tar -C rootfs -c . | docker import - tag`, with a shell as the command.
fn import(rootfs: &Path, tag: &str) -> anyhow::Result<()> {
    import_with(rootfs, tag, "CMD [\"/bin/sh\"]")
}

fn import_with(rootfs: &Path, tag: &str, change: &str) -> anyhow::Result<()> {
    let mut tar = Command::new("tar")
        .arg("-C")
        .arg(rootfs)
        .args(["-c", "."])
        .stdout(Stdio::piped())
        .spawn()
        .context("running tar")?;
    let out = Command::new("docker")
        .args(["import", "--change", change, "-", tag])
        .stdin(tar.stdout.take().expect("piped"))
        .output()
        .context("running docker import")?;
    ensure!(tar.wait()?.success(), "tar of {} failed", rootfs.display());
    ensure!(
        out.status.success(),
        "docker import {tag}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn image_exists(tag: &str) -> anyhow::Result<bool> {
    Ok(docker(&["image", "inspect", "--format", "{{.Id}}", tag])?
        .status
        .success())
}

/// Run the docker CLI; its output whatever the exit status.
pub fn docker(args: &[&str]) -> anyhow::Result<Output> {
    Command::new("docker")
        .args(args)
        .output()
        .context("running docker: `cargo xtask setup` installs and starts the engine")
}

/// Run the docker CLI and return its stdout; an error with stderr when it fails.
pub fn docker_ok(args: &[&str]) -> anyhow::Result<String> {
    let out = docker(args)?;
    if !out.status.success() {
        bail!(
            "docker {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Restart the Docker engine (as `cargo xtask setup` starts it) and wait until it answers.
pub fn restart_docker() -> anyhow::Result<()> {
    use std::time::{Duration, Instant};
    let pid: i32 = String::from_utf8(Command::new("pidof").arg("dockerd").output()?.stdout)?
        .split_whitespace()
        .next()
        .context("no dockerd running")?
        .parse()?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        ensure!(Instant::now() < deadline, "dockerd {pid} did not stop");
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = fs::File::options()
        .create(true)
        .append(true)
        .open("/var/log/imds-proxy-dockerd.log")?;
    use std::os::unix::process::CommandExt as _;
    Command::new("dockerd")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .context("starting dockerd")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !docker(&["version"])?.status.success() {
        ensure!(Instant::now() < deadline, "dockerd did not come back");
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// The docker0 bridge's IPv4 address: where containers reach the host.
pub fn docker0_gateway() -> anyhow::Result<std::net::IpAddr> {
    let out = crate::scene::ip(&["-j", "-4", "addr", "show", "docker0"]).context(
        "docker0 not found: is the Docker engine running? (`cargo xtask setup` starts it)",
    )?;
    let json: serde_json::Value = serde_json::from_str(&out)?;
    json[0]["addr_info"][0]["local"]
        .as_str()
        .context("docker0 has no IPv4 address")?
        .parse()
        .context("docker0's address")
}
