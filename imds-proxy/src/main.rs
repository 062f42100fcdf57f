use std::{
    net::{SocketAddr, SocketAddrV4, SocketAddrV6},
    path::PathBuf,
    sync::Arc,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use imds_proxy::{
    ebpf::{self, Redirect, Spec},
    identity::{self, AttestedListener, Cgroups, Peer},
    imds, netdev,
};

/// Per-container IAM credentials on EC2: eBPF redirect of IMDS traffic to a host proxy.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Attach the redirect and serve the IMDS API to containers.
    Run(RunArgs),
    /// Remove everything a pinned run left: links (detaching the programs), maps, pins, and the
    /// dummy interface.
    Detach {
        /// The pin directory the proxy ran with.
        #[arg(long)]
        pin: Option<PathBuf>,
        #[arg(long, default_value = netdev::DEFAULT_INTERFACE)]
        interface: String,
    },
    /// Load the embedded eBPF programs and report them, without attaching anything.
    Check,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Listen address for redirected connections (repeatable: one IPv4, optionally one IPv6).
    /// Dedicated to redirected traffic; it lives on the dummy interface.
    #[arg(long = "listen", default_values = ["169.254.42.1:80", "[fd00:ec2:42::1]:80"])]
    listen: Vec<SocketAddr>,
    /// cgroup v2 directory whose sockets are redirected (repeatable). Default: Docker's parent
    /// cgroup.
    #[arg(long = "cgroup")]
    cgroups: Vec<PathBuf>,
    /// bpffs directory to pin programs' links and maps in: if the proxy dies, containers stay
    /// redirected (to nothing) instead of reaching the instance's credentials.
    #[arg(long)]
    pin: Option<PathBuf>,
    /// The dummy interface that carries the listen addresses.
    #[arg(long, default_value = netdev::DEFAULT_INTERFACE)]
    interface: String,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    match Cli::parse().command {
        Command::Run(args) => run(args),
        Command::Detach { pin, interface } => detach(pin, &interface),
        Command::Check => {
            let mut bpf = ebpf::load()?;
            for (name, program) in bpf.programs_mut() {
                tracing::info!(program = name, kind = ?program.prog_type(), "found program");
            }
            Ok(())
        }
    }
}

fn detach(pin: Option<PathBuf>, interface: &str) -> anyhow::Result<()> {
    if let Some(pin) = pin {
        let removed = ebpf::unpin(&pin)?;
        tracing::info!(pin = %pin.display(), ?removed, "unpinned (pinned links detach with their pins)");
    }
    if netdev::remove(interface)? {
        tracing::info!(interface, "removed the dummy interface");
    }
    Ok(())
}

fn listen_addresses(listen: &[SocketAddr]) -> anyhow::Result<(SocketAddrV4, Option<SocketAddrV6>)> {
    let mut v4 = None;
    let mut v6 = None;
    for addr in listen {
        match addr {
            SocketAddr::V4(a) if v4.is_none() => v4 = Some(*a),
            SocketAddr::V6(a) if v6.is_none() => v6 = Some(*a),
            _ => bail!("--listen: at most one IPv4 and one IPv6 address ({addr} is one too many)"),
        }
    }
    let v4 = v4.context("--listen: an IPv4 address is required")?;
    for ip in [
        Some(std::net::IpAddr::V4(*v4.ip())),
        v6.map(|a| (*a.ip()).into()),
    ]
    .into_iter()
    .flatten()
    {
        if ip.is_unspecified() || ip.is_loopback() {
            bail!(
                "--listen: {ip} cannot be a dedicated listen address (use a link-local or ULA address of its own)"
            );
        }
    }
    Ok((v4, v6))
}

/// Docker's parent cgroup on the v2 hierarchy (cgroupfs driver): `<root>/docker`.
fn docker_parent_cgroup(root: &std::path::Path) -> anyhow::Result<PathBuf> {
    let systemd_scopes = std::fs::read_dir(root.join("system.slice"))
        .map(|entries| {
            entries
                .flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("docker-"))
        })
        .unwrap_or(false);
    if systemd_scopes {
        bail!(
            "Docker uses the systemd cgroup driver here (docker-<id>.scope under system.slice, \
             beside host services): pass the container cgroups to redirect with --cgroup"
        );
    }
    let parent = root.join("docker");
    // runc creates it with the first container; creating it first is what runc would do.
    std::fs::create_dir_all(&parent)
        .with_context(|| format!("creating Docker's parent cgroup {}", parent.display()))?;
    Ok(parent)
}

#[tokio::main]
async fn run(args: RunArgs) -> anyhow::Result<()> {
    let (listen_v4, listen_v6) = listen_addresses(&args.listen)?;
    let root = identity::cgroup2_root()?;
    let cgroups = if args.cgroups.is_empty() {
        vec![docker_parent_cgroup(&root)?]
    } else {
        args.cgroups.clone()
    };
    let own_path = identity::own_cgroup_path()?;
    let own_cgroup = ebpf::cgroup_id(&root.join(own_path.trim_start_matches('/')))
        .with_context(|| format!("the proxy's own cgroup {own_path}"))?;

    let mut addresses = vec![(*listen_v4.ip()).into()];
    addresses.extend(listen_v6.map(|a| std::net::IpAddr::V6(*a.ip())));
    netdev::ensure(&args.interface, &addresses)?;
    // Listen before attaching: a redirected connect must find a listener.
    let listener_v4 = tokio::net::TcpListener::bind(listen_v4)
        .await
        .with_context(|| format!("binding {listen_v4}"))?;
    let listener_v6 = match listen_v6 {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding {addr}"))?,
        ),
        None => None,
    };

    let spec = Spec {
        listen_v4,
        listen_v6,
        cgroups: cgroups.clone(),
        filter: false,
        own_cgroup,
        pin: args.pin.clone(),
    };
    let redirect = Arc::new(Redirect::attach(&spec)?);
    tracing::info!(
        cgroups = ?cgroups,
        listen = ?args.listen,
        pin = ?args.pin,
        adopted_links = redirect.adopted_links(),
        own_cgroup = %own_path,
        "redirect attached; serving"
    );
    let resolver = Arc::new(Cgroups::new(root));
    let logs = redirect.clone();
    tokio::spawn(async move { logs.forward_kernel_logs().await });

    let app = imds::router().into_make_service_with_connect_info::<Peer>();
    let mut servers = tokio::task::JoinSet::new();
    for listener in [Some(listener_v4), listener_v6].into_iter().flatten() {
        let listener = AttestedListener::new(listener, redirect.clone(), resolver.clone());
        let app = app.clone();
        servers.spawn(async move { axum::serve(listener, app).await });
    }

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT"),
        _ = term.recv() => tracing::info!("SIGTERM"),
        Some(result) = servers.join_next() => {
            result??;
            bail!("a listener stopped");
        }
    }
    servers.abort_all();
    drop(redirect);
    if args.pin.is_some() {
        tracing::info!(
            "stopping; the pinned redirect stays attached (containers fail closed until a proxy \
             runs again; `imds-proxy detach --pin DIR` removes it)"
        );
    } else {
        netdev::remove(&args.interface)?;
        tracing::info!("stopped; programs detached and dummy interface removed");
    }
    Ok(())
}
