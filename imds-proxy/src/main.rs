use std::{
    net::{IpAddr, SocketAddr, SocketAddrV6},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use imds_proxy::{
    config::{Config, LogFormat, Mode, RunArgs},
    credentials, docker,
    ebpf::{self, Redirect, Spec},
    identity::{self, AttestedListener, Cgroups},
    imds,
    metrics::Metrics,
    netdev, roles,
    tc::{TcRedirect, TcSpec},
    tokens::Tokens,
    upstream::Upstream,
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
    /// Attach the redirect and serve the IMDS API to containers (`imds-proxy run --help`).
    #[command(disable_help_flag = true)]
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
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

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run { args } => {
            // Configuration errors come first, in one line, before anything is attached.
            let config = match RunArgs::parse_layered(args).and_then(RunArgs::validate) {
                Ok(config) => config,
                Err(err) => {
                    eprintln!("imds-proxy: {err}");
                    return std::process::ExitCode::from(2);
                }
            };
            init_logging(config.args.log_format);
            run(config)
        }
        Command::Detach { pin, interface } => {
            init_logging(LogFormat::Text);
            detach(pin, &interface)
        }
        Command::Check => {
            init_logging(LogFormat::Text);
            check()
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            eprintln!("imds-proxy: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn check() -> anyhow::Result<()> {
    let mut bpf = ebpf::load()?;
    for (name, program) in bpf.programs_mut() {
        tracing::info!(program = name, kind = ?program.prog_type(), "found program");
    }
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn detach(pin: Option<PathBuf>, interface: &str) -> anyhow::Result<()> {
    if let Some(pin) = pin {
        let removed = ebpf::unpin(&pin)?;
        tracing::info!(pin = %pin.display(), ?removed, "unpinned (pinned links detach with their pins)");
    }
    if netdev::remove(interface).await? {
        tracing::info!(interface, "removed the dummy interface");
    }
    Ok(())
}

/// Whether a container whose cgroup is `cgroup` (relative to the v2 root, as Docker placed it) is
/// below one of the attach points `attached` (relative too).
fn covered(cgroup: &str, attached: &[String]) -> bool {
    attached
        .iter()
        .any(|parent| parent == "/" || identity::within(cgroup, parent))
}

#[tokio::main]
async fn run(config: Config) -> anyhow::Result<()> {
    let args = &config.args;
    let listen_v4 = args
        .listen
        .iter()
        .find_map(|a| match a {
            SocketAddr::V4(a) => Some(*a),
            SocketAddr::V6(_) => None,
        })
        .expect("validated: one IPv4 listen address");
    let listen_v6: Option<SocketAddrV6> = args.listen.iter().find_map(|a| match a {
        SocketAddr::V6(a) => Some(*a),
        SocketAddr::V4(_) => None,
    });
    let tc_mode = args.mode == Mode::Tc;
    // Both modes attach the cgroup programs: cgroup mode for every container; tc mode for
    // host-network containers, whose IMDS traffic never crosses a container interface. Both need
    // the v2 hierarchy and the proxy's place in it.
    let root = identity::cgroup2_root().context(if tc_mode {
        "tc mode covers host-network containers with cgroup programs"
    } else {
        "cgroup mode"
    })?;
    let own_path = identity::own_cgroup_path()?;

    // Every connection is a descriptor: as many as the hard limit allows.
    match imds_proxy::serve::raise_fd_limit() {
        Ok(limit) => {
            if (limit as usize) < args.max_connections + 256 {
                tracing::warn!(
                    fd_limit = limit,
                    max_connections = args.max_connections,
                    "the file-descriptor limit is below --max-connections plus headroom; accepts \
                     will fail (and back off) before the connection cap is reached"
                );
            } else {
                tracing::info!(fd_limit = limit, "file-descriptor limit");
            }
        }
        Err(err) => tracing::warn!(%err, "could not raise the file-descriptor limit"),
    }
    // Everything that can fail for reasons outside the kernel, before anything is attached.
    let metrics = Arc::new(Metrics::default());
    let docker = docker::Index::connect(&args.docker_host, args.trust_image_role).await?;
    let own_cgroup = ebpf::cgroup_id(&root.join(own_path.trim_start_matches('/')))
        .with_context(|| format!("the proxy's own cgroup {own_path}"))?;
    let (cgroups, filter) = if args.cgroups.is_empty() {
        let driver = docker.cgroup_driver().await?;
        // A container's cgroup is wherever its runner put it (`--cgroup-parent`, a daemon-wide
        // cgroup-parent, BuildKit's steps), not only under Docker's default parent: attach at the
        // v2 root, and let the filter tell containers' cgroups from the host's.
        tracing::info!(
            driver,
            root = %root.display(),
            "attaching at the cgroup v2 root in filter mode: containers are redirected wherever \
             their cgroup is; host cgroups pass"
        );
        (vec![root.clone()], true)
    } else {
        (args.cgroups.clone(), args.cgroup_filter)
    };
    let scope = if tc_mode {
        ebpf::Scope::HostNamespace {
            netns_cookie: ebpf::own_netns_cookie()
                .context("the host network namespace's cookie (SO_NETNS_COOKIE, Linux 5.14+)")?,
        }
    } else {
        ebpf::Scope::AllNamespaces
    };
    let sts = credentials::sts_client(
        &args.upstream,
        args.region.as_deref(),
        args.sts_endpoint.as_deref(),
    )
    .await?;
    let cache = credentials::Cache::new(
        sts,
        Duration::from_secs(args.session_duration.into()),
        args.refresh_before,
        metrics.clone(),
    );
    let ops = tokio::net::TcpListener::bind(args.ops_listen)
        .await
        .with_context(|| format!("binding the ops listener {}", args.ops_listen))?;

    let mut addresses = vec![IpAddr::V4(*listen_v4.ip())];
    addresses.extend(listen_v6.map(|a| IpAddr::V6(*a.ip())));
    netdev::ensure(&args.interface, &addresses).await?;
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

    // tc mode: the interface programs first, so that the shared configuration ends as the cgroup
    // programs need it (the tc programs read only the listen addresses from it).
    let tc = if tc_mode {
        let interfaces = if args.container_ifaces.is_empty() {
            vec!["docker0".to_owned()]
        } else {
            args.container_ifaces.clone()
        };
        let spec = TcSpec {
            listen_v4,
            listen_v6,
            interfaces: interfaces.clone(),
            attach: args.tc_attach,
            pin: args.pin.clone(),
            static_sources: args
                .tc_static_sources
                .iter()
                .map(|s| imds_proxy::tc::parse_static_source(s).expect("validated"))
                .collect(),
        };
        let tc = Arc::new(TcRedirect::attach(&spec)?);
        tracing::info!(
            attach = ?tc.attach_mode(),
            patterns = ?interfaces,
            interfaces = ?tc.interfaces(),
            adopted_links = tc.adopted_links(),
            "tc programs attached to container interfaces (bridged containers, identified by \
             source address)"
        );
        let follow = tc.clone();
        tokio::spawn(async move { follow.follow_interfaces().await });
        tokio::spawn(tc.clone().follow_peer_addresses());
        let reaper = tc.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                let reaped = reaper.reap(imds_proxy::tc::NAT_IDLE);
                if reaped > 0 {
                    tracing::debug!(reaped, "idle NAT entries removed");
                }
                reaper.expire_sources();
            }
        });
        Some(tc)
    } else {
        None
    };
    let spec = Spec {
        listen_v4,
        listen_v6,
        cgroups: cgroups.clone(),
        filter,
        own_cgroup,
        pin: args.pin.clone(),
        scope,
    };
    let redirect = Arc::new(Redirect::attach(&spec)?);
    tracing::info!(
        mode = if tc_mode { "tc" } else { "cgroup" },
        cgroups = ?cgroups,
        covers = if tc_mode {
            "host-network containers (kernel-attested); bridged ones through the tc programs"
        } else {
            "every container (kernel-attested)"
        },
        listen = ?args.listen,
        pin = ?args.pin,
        adopted_links = redirect.adopted_links(),
        own_cgroup = %own_path,
        "redirect attached; serving"
    );
    if filter {
        for parent in &cgroups {
            let feed = imds_proxy::filter::Feed::start(redirect.clone(), parent)
                .with_context(|| format!("classifying the cgroups under {}", parent.display()))?;
            std::thread::spawn(move || {
                if let Err(err) = feed.run() {
                    // Unclassified cgroups stay refused: closed, and loud.
                    tracing::error!(%err, "cgroup watch failed; new cgroups' IMDS connects will be refused");
                }
            });
        }
    }
    let logs = redirect.clone();
    tokio::spawn(async move { logs.forward_kernel_logs().await });
    let redirect = Some(redirect);
    let attached = Arc::new(AtomicBool::new(true));
    let resolver = Arc::new(Cgroups::new(root.clone()));

    let app = Arc::new(imds::App {
        tokens: Tokens::new(),
        roles: config.roles.clone(),
        docker: docker.clone(),
        credentials: cache.clone(),
        upstream: Upstream::new(
            &args.upstream,
            args.upstream_concurrency,
            args.metadata_cache_ttl,
        ),
        rate: imds_proxy::limits::PerKey::new(args.requests_per_second, args.request_burst, 65_536),
        metrics: metrics.clone(),
        // Until the upstream is asked (when not configured): required.
        require_imdsv2: AtomicBool::new(args.require_imdsv2.unwrap_or(true)),
        exposure: imds::Exposure {
            user_data: args.allow_user_data,
            identity_signatures: args.allow_identity_signatures,
        },
        identify_by_address: tc_mode,
    });
    match args.require_imdsv2 {
        Some(required) => tracing::info!(require_imdsv2 = required, "IMDSv2 tokens as configured"),
        None => {
            tokio::spawn(imds::follow_upstream_imdsv2(
                app.clone(),
                Duration::from_secs(300),
            ));
        }
    }
    // Run as a container itself, the proxy is one of Docker's containers: it never asks itself.
    let own_container = identity::container_id(&own_path);
    let attach_points: Vec<String> = cgroups
        .iter()
        .filter_map(|c| c.strip_prefix(&root).ok())
        .map(|rel| format!("/{}", rel.display()))
        .collect();
    tokio::spawn(follow_containers(app.clone(), own_container, attach_points));
    if let Some(tc) = &tc {
        // Subscribed before the index starts: every container, those running now included.
        tokio::spawn(follow_sources(tc.clone(), docker.subscribe()));
    }
    tokio::spawn(docker.clone().run());

    let router = imds::router(app.clone());
    let limits = imds_proxy::serve::Limits {
        header_timeout: args.header_timeout,
        max_connections: args.max_connections,
        max_connections_per_caller: args.max_connections_per_caller,
    };
    let admission = imds_proxy::serve::Admission::new(
        limits.max_connections,
        limits.max_connections_per_caller,
    );
    let mut servers = tokio::task::JoinSet::new();
    for listener in [Some(listener_v4), listener_v6].into_iter().flatten() {
        let listener = AttestedListener::new(listener, redirect.clone(), resolver.clone());
        servers.spawn(imds_proxy::serve::serve(
            listener,
            router.clone(),
            limits,
            admission.clone(),
            metrics.clone(),
        ));
    }
    let ops_app =
        imds_proxy::ops::router(app.clone(), attached.clone(), redirect.clone(), tc.clone());
    servers.spawn(async move { axum::serve(ops, ops_app).await });

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
    attached.store(false, Ordering::Relaxed);
    drop(redirect);
    if let Some(tc) = tc {
        if args.pin.is_none() {
            tc.detach_all();
        }
        drop(tc);
    }
    if args.pin.is_some() {
        tracing::info!(
            "stopping; the pinned redirect stays attached (containers fail closed until a proxy \
             runs again; `imds-proxy detach --pin DIR` removes it)"
        );
    } else {
        netdev::remove(&args.interface).await?;
        tracing::info!("stopped; programs detached and dummy interface removed");
    }
    Ok(())
}

/// The next container event; missed ones are logged (for `who`), `None` when the index is gone.
async fn next_event(
    events: &mut tokio::sync::broadcast::Receiver<docker::Event>,
    who: &str,
) -> Option<docker::Event> {
    loop {
        match events.recv().await {
            Ok(event) => return Some(event),
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(missed = n, who, "container events missed");
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
        }
    }
}

/// tc mode: keep, for each container, the addresses its own ports may send to IMDS from.
async fn follow_sources(
    tc: Arc<TcRedirect>,
    mut events: tokio::sync::broadcast::Receiver<docker::Event>,
) {
    while let Some(event) = next_event(&mut events, "source addresses").await {
        match event {
            docker::Event::Started(container) if container.running && container.pid != 0 => {
                let (id, pid) = (container.id.clone(), container.pid);
                let ports =
                    tokio::task::spawn_blocking(move || imds_proxy::tc::container_ports(&id, pid))
                        .await;
                let ports = match ports {
                    Ok(Ok(ports)) => ports,
                    Ok(Err(err)) => {
                        tracing::error!(container_id = %container.id, %err, "cannot read the container's interfaces; its IMDS traffic stays dropped");
                        continue;
                    }
                    Err(err) => {
                        tracing::error!(%err, "interface lookup failed");
                        continue;
                    }
                };
                match tc.set_sources(&container.id, &ports, &container.addresses) {
                    Ok(()) => tracing::debug!(
                        container_id = %container.id,
                        ?ports,
                        addresses = ?container.addresses,
                        "container's source addresses vouched for on its ports"
                    ),
                    Err(err) => {
                        tracing::error!(container_id = %container.id, %err, "recording source addresses failed; its IMDS traffic stays dropped")
                    }
                }
            }
            docker::Event::Started(_) => {}
            docker::Event::Destroyed(container) => tc.forget_sources(&container.id),
        }
    }
}

/// Prefetch the credentials of containers that start with a role; forget those destroyed.
/// A container that starts outside every attach point is reported: its IMDS traffic is not
/// redirected (only the egress guard's attach points, if any, stop it).
async fn follow_containers(
    app: Arc<imds::App>,
    own_container: Option<String>,
    attached: Vec<String>,
) {
    let mut events = app.docker.subscribe();
    while let Some(event) = next_event(&mut events, "roles").await {
        app.metrics.set_containers(app.docker.len());
        match event {
            docker::Event::Started(container) if Some(&container.id) == own_container.as_ref() => {}
            docker::Event::Started(container) => {
                if !covered(&container.cgroup, &attached) {
                    app.metrics.uncovered_container();
                    tracing::error!(
                        container_id = %container.id,
                        container = %container.name,
                        cgroup = %container.cgroup,
                        attach_points = ?attached,
                        "a container started outside every attach point: its IMDS connects are \
                         not redirected (attach higher with --cgroup, or drop --cgroup to attach \
                         at the v2 root)"
                    );
                }
                match app.roles.resolve(&container.labels, &container.env) {
                    Ok(Some(role)) => app
                        .credentials
                        .prefetch(credentials::Key::session(&container, &role)),
                    Ok(None) => {}
                    Err(err) => tracing::warn!(
                        container_id = %container.id,
                        container = %container.name,
                        %err,
                        "role refused; no STS call made"
                    ),
                }
            }
            docker::Event::Destroyed(container) => app
                .credentials
                .forget_session(&roles::session_name(Some(&container.name), &container.id)),
        }
    }
}
