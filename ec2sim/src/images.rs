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

/// The load generator (`imds-load`).
pub const LOAD_IMAGE: &str = "imds-proxy/load:latest";

/// Build [`LOAD_IMAGE`] from the `imds-load` binary at `binary`; returns its name.
pub fn load_image(binary: &Path) -> anyhow::Result<&'static str> {
    binary_image(binary, LOAD_IMAGE)
}

/// The attacker (`imds-attack`).
pub const ATTACK_IMAGE: &str = "imds-proxy/attack:latest";

/// Build [`ATTACK_IMAGE`] from the `imds-attack` binary at `binary`; returns its name.
pub fn attack_image(binary: &Path) -> anyhow::Result<&'static str> {
    binary_image(binary, ATTACK_IMAGE)
}

/// An image holding one program (as `/program`, its command), the libraries it links and the CA
/// bundle (the SDK's TLS client loads it at start, whatever the endpoint).
/// Built once per test process (the binary does not change under a running test); the image the
/// tag named before is removed, so repeated runs leave no dangling images behind.
fn binary_image(binary: &Path, tag: &'static str) -> anyhow::Result<&'static str> {
    static BUILT: std::sync::Mutex<Vec<&'static str>> = std::sync::Mutex::new(Vec::new());
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if built.contains(&tag) {
        return Ok(tag);
    }
    let previous = docker(&["image", "inspect", "--format", "{{.Id}}", tag])?;
    let previous = String::from_utf8_lossy(&previous.stdout).trim().to_owned();
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
    if !previous.is_empty() {
        // Fails harmlessly when a container still uses it or it is the same image.
        let _ = docker(&["image", "rm", &previous]);
    }
    built.push(tag);
    Ok(tag)
}

/// A Kubernetes pod's sandbox image, as `registry.k8s.io/pause` is: one static binary that holds
/// the pod's namespaces and sleeps. Here busybox (Debian's static build) running `sleep`.
pub const PAUSE_IMAGE: &str = "imds-test/pause:1";

/// Build [`PAUSE_IMAGE`] unless Docker has it already; returns its name.
pub fn pause_image() -> anyhow::Result<&'static str> {
    if image_exists(PAUSE_IMAGE)? {
        return Ok(PAUSE_IMAGE);
    }
    let rootfs = scratch_dir("pause")?;
    fs::create_dir_all(rootfs.join("bin"))?;
    fs::copy("/bin/busybox", rootfs.join("bin/busybox"))
        .context("copying /bin/busybox (Debian busybox-static; `cargo xtask setup` installs it)")?;
    import_with(
        &rootfs,
        PAUSE_IMAGE,
        "CMD [\"/bin/busybox\", \"sleep\", \"2147483647\"]",
    )?;
    fs::remove_dir_all(&rootfs)?;
    Ok(PAUSE_IMAGE)
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

/// The AWS CLI v1 (botocore) on the venv's Python, nothing else: the interpreter and its shared
/// libraries, the standard library, and the `awscli` distribution with its dependency closure.
/// `aws` is on PATH; no credentials or config files inside.
pub const AWSCLI_IMAGE_REPO: &str = "imds-test/awscli";

/// Printed as JSON by the venv's Python: what an AWS CLI image needs from this machine.
const AWSCLI_FILES_PY: &str = r#"
import importlib.metadata as md, json, os, re, sys, sysconfig
seen, todo, files = set(), ["awscli"], []
while todo:
    name = todo.pop()
    key = re.sub(r"[-_.]+", "-", name).lower()
    if key in seen:
        continue
    seen.add(key)
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:
        continue  # a requirement whose marker excludes this interpreter
    files += [str(dist.locate_file(f)) for f in dist.files or []]
    for req in dist.requires or []:
        if "extra ==" not in req:
            todo.append(re.match(r"[A-Za-z0-9._-]+", req).group(0))
print(json.dumps({
    "version": md.version("awscli"),
    "python": os.path.realpath(sys.executable),
    "stdlib": sysconfig.get_paths()["stdlib"],
    "site": sysconfig.get_paths()["purelib"],
    "files": files,
}))
"#;

/// Build the AWS CLI image from the venv at `venv` unless Docker has it for this awscli version;
/// returns its name (`imds-test/awscli:<version>`).
pub fn awscli_image(venv: &Path) -> anyhow::Result<String> {
    #[derive(serde::Deserialize)]
    struct Found {
        version: String,
        python: PathBuf,
        stdlib: PathBuf,
        site: PathBuf,
        files: Vec<PathBuf>,
    }
    let python = venv.join("bin/python3");
    let out = Command::new(&python)
        .args(["-c", AWSCLI_FILES_PY])
        .output()
        .with_context(|| {
            format!(
                "running {}: `cargo xtask setup` makes the venv",
                python.display()
            )
        })?;
    ensure!(
        out.status.success(),
        "listing the awscli distribution: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let found: Found = serde_json::from_slice(&out.stdout)?;
    let tag = format!("{AWSCLI_IMAGE_REPO}:{}", found.version);
    if image_exists(&tag)? {
        return Ok(tag);
    }
    let rootfs = scratch_dir("awscli")?;
    for dir in ["tmp", "root", "etc", "bin"] {
        fs::create_dir_all(rootfs.join(dir))?;
    }
    fs::write(
        rootfs.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/aws\n",
    )?;
    fs::write(rootfs.join("etc/group"), "root:x:0:\n")?;
    fs::write(rootfs.join("etc/nsswitch.conf"), "hosts: files\n")?;
    copy_with_libraries(&found.python, &rootfs)?;
    // The standard library at its own path (the interpreter finds it from its own location),
    // without the test suite, the GUI bits and the interpreter's own site-packages.
    let skip = [
        "site-packages",
        "dist-packages",
        "test",
        "idlelib",
        "tkinter",
        "turtledemo",
        "ensurepip",
    ];
    copy_tree(&found.stdlib, &rootfs, &|p: &Path| {
        p.parent() == Some(found.stdlib.as_path())
            && p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| skip.contains(&n))
    })?;
    // Extension modules link libraries of their own (libssl, libffi, libz, ...).
    for entry in fs::read_dir(found.stdlib.join("lib-dynload"))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "so") {
            copy_with_libraries(&path, &rootfs)?;
        }
    }
    // The awscli closure, moved from the venv's site-packages to /opt/awscli.
    let site = Path::new("/opt/awscli");
    for file in &found.files {
        let Ok(relative) = file.strip_prefix(&found.site) else {
            continue; // console scripts under bin/: `aws` is written below
        };
        if !file.is_file() {
            continue;
        }
        let target = rootfs.join(site.strip_prefix("/")?).join(relative);
        fs::create_dir_all(target.parent().expect("a file has a parent"))?;
        fs::copy(file, &target).with_context(|| format!("copying {}", file.display()))?;
        if file.extension().is_some_and(|e| e == "so") {
            copy_with_libraries(file, &rootfs)?;
        }
    }
    let aws = rootfs.join("bin/aws");
    fs::write(
        &aws,
        format!(
            "#!{}\nimport sys\nsys.path.insert(0, '/opt/awscli')\nfrom awscli.clidriver import main\nsys.exit(main())\n",
            found.python.display()
        ),
    )?;
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(&aws, fs::Permissions::from_mode(0o755))?;
    import_with(&rootfs, &tag, "ENTRYPOINT [\"/bin/aws\"]")?;
    fs::remove_dir_all(&rootfs)?;
    Ok(tag)
}

/// Copy the regular files and symlinks under `dir` into `rootfs` at their own paths, except the
/// entries `skip` says to leave out (and what is below them).
fn copy_tree(dir: &Path, rootfs: &Path, skip: &dyn Fn(&Path) -> bool) -> anyhow::Result<()> {
    let target = rootfs.join(dir.strip_prefix("/")?);
    fs::create_dir_all(&target)?;
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let path = entry.path();
        if skip(&path) {
            continue;
        }
        let kind = entry.file_type()?;
        if kind.is_dir() {
            copy_tree(&path, rootfs, skip)?;
        } else if kind.is_symlink() {
            symlink(fs::read_link(&path)?, target.join(entry.file_name()))?;
        } else if kind.is_file() {
            fs::copy(&path, target.join(entry.file_name()))
                .with_context(|| format!("copying {}", path.display()))?;
        }
    }
    Ok(())
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

/// Where a `dockerd` started by `cargo xtask setup` or by the tests writes its output.
pub const DOCKERD_LOG: &str = "/var/log/imds-proxy-dockerd.log";

/// Start `dockerd` in its own process group (so it outlives the command that started it) and wait
/// up to 60 s until it answers. Returns the engine's version.
pub fn start_dockerd(truncate_log: bool) -> anyhow::Result<String> {
    start_dockerd_with(truncate_log, &[])
}

/// [`start_dockerd`] with more daemon flags (`--live-restore`).
pub fn start_dockerd_with(truncate_log: bool, flags: &[&str]) -> anyhow::Result<String> {
    use std::os::unix::process::CommandExt as _;
    use std::time::{Duration, Instant};
    let log = fs::File::options()
        .create(true)
        .write(true)
        .append(!truncate_log)
        .truncate(truncate_log)
        .open(DOCKERD_LOG)
        .with_context(|| format!("opening {DOCKERD_LOG}"))?;
    Command::new("dockerd")
        .args(flags)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .context("starting dockerd")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = docker(&["version", "--format", "{{.Server.Version}}"])?;
        if out.status.success() {
            return Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned());
        }
        ensure!(
            Instant::now() < deadline,
            "dockerd did not answer on /var/run/docker.sock within 60 s; see {DOCKERD_LOG}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether `pid` is a running process. A zombie is not: on a machine whose pid 1 does not reap
/// orphans (a micro-VM's init, a container's shell), an exited daemon stays a zombie forever.
fn running(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // "pid (comm) S ...": the state follows the last ')' (comm may hold parentheses).
        Ok(stat) => stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Stop the Docker engine (SIGTERM, as systemd would) and start it again; returns once it answers.
/// Containers are left as the engine leaves them (`--live-restore` is not set here: they stop).
pub fn restart_docker() -> anyhow::Result<()> {
    stop_docker()?;
    // A killed daemon leaves its pid file; a new one refuses to start over a live pid only.
    start_dockerd(false)?;
    Ok(())
}

/// Stop the Docker engine (SIGTERM, SIGKILL after 30 s) and wait until it is gone. Start it again
/// with [`start_dockerd`].
pub fn stop_docker() -> anyhow::Result<()> {
    use std::time::{Duration, Instant};
    // The pid file names the live daemon; `pidof` would also list zombies of earlier ones.
    let pid: i32 = fs::read_to_string("/var/run/docker.pid")
        .context("reading /var/run/docker.pid: is dockerd running?")?
        .trim()
        .parse()
        .context("/var/run/docker.pid")?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .with_context(|| format!("signalling dockerd {pid}"))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while running(pid) {
        if Instant::now() > deadline {
            // What the test needs is a restarted engine, not a graceful stop: say what was seen
            // and kill it.
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let wchan = fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default();
            eprintln!(
                "stop_docker: dockerd {pid} still running 30 s after SIGTERM \
                 (stat: {stat:.80} wchan: {wchan}); sending SIGKILL"
            );
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            )?;
            let deadline = Instant::now() + Duration::from_secs(10);
            while running(pid) {
                ensure!(Instant::now() < deadline, "dockerd {pid} survived SIGKILL");
                std::thread::sleep(Duration::from_millis(50));
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
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
