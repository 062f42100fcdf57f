//! `cargo xtask run`: imds-proxy on this host. On an EC2 instance, the real thing; anywhere else
//! (or with `--simulate-ec2`), on a simulated EC2 host: IMDS simulator (hop limit 1, IMDSv2
//! required), moto as STS, instance role `InstanceRole` in account 123456789012.
use std::{net::SocketAddr, os::unix::process::CommandExt as _, path::Path, process::Command};

use anyhow::{Context as _, bail};
use ec2sim::{
    images,
    launch::Launch,
    scene::{ACCOUNT_ID, SceneConfig},
    sim::HttpTokens,
};
use nix::sys::signal::{SigSet, Signal};
use perf::process::{stop, wait_ready};

/// Is this an EC2 instance? From DMI, as cloud-init decides it — never by asking 169.254.169.254.
fn ec2_from_dmi() -> (bool, String) {
    let read = |f: &str| {
        std::fs::read_to_string(Path::new("/sys/class/dmi/id").join(f))
            .map(|s| s.trim().to_owned())
            .unwrap_or_default()
    };
    let (board, sys, uuid) = (
        read("board_vendor"),
        read("sys_vendor"),
        read("product_uuid"),
    );
    let ec2 = board == "Amazon EC2"
        || sys == "Amazon EC2"
        || uuid.to_ascii_lowercase().starts_with("ec2");
    (
        ec2,
        format!(
            "board_vendor={board:?} sys_vendor={sys:?} product_uuid={}",
            if uuid.is_empty() { "\"\"" } else { "…" }
        ),
    )
}

pub fn run(root: &Path, simulate: bool, proxy_args: &[String]) -> anyhow::Result<()> {
    crate::setup::run(root)?;
    let target = crate::binaries(root, false)?;
    let (ec2, dmi) = ec2_from_dmi();
    if ec2 && !simulate {
        println!(
            "xtask run: this host is an EC2 instance ({dmi}): running imds-proxy against the real IMDS"
        );
        let err = Command::new(target.join("imds-proxy"))
            .arg("run")
            .args(proxy_args)
            .exec();
        bail!("running imds-proxy: {err}");
    }
    if ec2 {
        println!(
            "xtask run: --simulate-ec2 on an EC2 instance: this host's IMDS is rerouted to the simulator until you stop"
        );
    } else {
        println!(
            "xtask run: this host is not an EC2 instance ({dmi}); simulating one (as with --simulate-ec2)"
        );
    }

    // Signals are waited for, not handled: block them before any thread exists.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals.thread_block()?;

    let gateway = images::docker0_gateway()?;
    let scene = SceneConfig::new(target.join("imds-sim"))
        .hop_limit(1)
        .http_tokens(HttpTokens::Required)
        .with_sts()
        .sts_bind(gateway)
        .start()?;
    let sts = scene.sts_endpoint().expect("the scene has an STS");
    println!(
        "xtask run: simulated EC2 host up: IMDS 169.254.169.254 (hop limit 1, IMDSv2 required), instance role InstanceRole, account {ACCOUNT_ID}"
    );
    println!(
        "xtask run: AWS_ENDPOINT_URL_STS=http://{sts} (the scene's STS, on the docker0 gateway)"
    );
    let image = images::whoami_image(&target.join("imds-whoami"))?;

    let ops = ops_listen(proxy_args);
    let mut proxy = Launch::new()
        .sts(&sts.to_string())
        .flag("default-role", "DefaultRole")
        .args(proxy_args)
        // The operator's own filter, else the proxy's default (info).
        .env(
            "RUST_LOG",
            &std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned()),
        )
        .command(target.join("imds-proxy"));
    // SAFETY: sigprocmask is async-signal-safe; the child starts with no signal blocked.
    unsafe {
        proxy.pre_exec(|| {
            SigSet::empty()
                .thread_set_mask()
                .map_err(std::io::Error::from)
        });
    }
    let mut proxy = proxy.spawn().context("starting imds-proxy")?;
    let ready = wait_ready(&mut proxy, ops, |r| r.status == 200);
    if let Err(err) = ready {
        stop(&mut proxy);
        return Err(err);
    }
    println!(
        "\nxtask run: ready. In another terminal, see a container get its own role:\n\n  \
         docker run --rm -e AWS_ENDPOINT_URL_STS=http://{sts} --label iam.amazonaws.com/role=Demo {image}\n\n\
         It prints arn:aws:sts::{ACCOUNT_ID}:assumed-role/Demo/<container name>. Without the label: DefaultRole.\n\
         Health: curl http://{ops}/readyz   Metrics: curl http://{ops}/metrics   Stop: Ctrl-C\n"
    );

    let status = loop {
        if let Some(status) = proxy.try_wait()? {
            break Some(status);
        }
        let timeout = libc::timespec {
            tv_sec: 0,
            tv_nsec: 200_000_000,
        };
        // SAFETY: a valid signal set and timeout; the signals are blocked in every thread.
        let signal =
            unsafe { libc::sigtimedwait(signals.as_ref(), std::ptr::null_mut(), &timeout) };
        if signal > 0 {
            println!(
                "xtask run: {}: stopping",
                Signal::try_from(signal)
                    .map(|s| s.as_str())
                    .unwrap_or("signal")
            );
            break None;
        }
    };
    if status.is_none() {
        stop(&mut proxy);
    }
    drop(scene);
    println!("xtask run: the simulated EC2 host is torn down");
    match status {
        Some(status) if !status.success() => bail!("imds-proxy exited with {status}"),
        _ => Ok(()),
    }
}

/// The proxy's ops listener, from its arguments (the last one given) or the default.
fn ops_listen(args: &[String]) -> SocketAddr {
    let mut value = None;
    for (i, arg) in args.iter().enumerate() {
        if arg == "--ops-listen" {
            value = args.get(i + 1).map(String::as_str);
        } else if let Some(v) = arg.strip_prefix("--ops-listen=") {
            value = Some(v);
        }
    }
    value
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| "127.0.0.1:9181".parse().expect("a socket address"))
}
