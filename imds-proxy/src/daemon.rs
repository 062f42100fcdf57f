//! `imds-proxy run`: build the parts from the validated configuration, attach, serve, stop.
//! **The redirect goes in first**: what fails for reasons of this host alone (the cgroup
//! hierarchy, the listen interface and listeners) fails before anything is attached, then the
//! programs are attached and the service manager told (`Type=notify`: the runtimes' units are
//! ordered after this one), and only then is the container engine waited for. Until it answers,
//! redirected connects wait in the listeners' queues: nothing reaches the instance's IMDS.
use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::{
    cgroup::{self, Cgroups},
    config::Config,
    credentials,
    identity::{AttestedListener, Attestor, Proc},
    imds,
    metrics::Metrics,
    netdev,
    redirect::{Place, Redirect},
    runtime, serve,
    supervisor::Supervisor,
    tokens::Tokens,
    upstream::Upstream,
};

/// `imds-proxy run`, as a list of steps; each is a function below, in this order.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let config = serve_ipv4_only_without_ipv6(config);
    let host = prepare_host(&config).await?;
    let supervisor = Supervisor::new();
    let redirect = attach(&config, &host, &supervisor)?;
    let index = connect_and_check_engine(&config).await?;
    let parts = build_parts(&config, &host, &redirect, index, &supervisor).await?;
    start_background_work(&config, &host, &redirect, &parts, &supervisor);
    let (servers, attached) = serve(
        &config,
        host.listeners,
        host.ops_listener,
        parts,
        &redirect,
        supervisor,
    );
    wait_for_a_stop(servers).await?;
    stop(&config, &redirect, &attached).await
}

/// With IPv6 disabled on the host, the IPv6 listen address is dropped (IPv6 IMDS connects are
/// then refused by the kernel programs).
fn serve_ipv4_only_without_ipv6(mut config: Config) -> Config {
    if config.network.listen.v6.is_some() && !netdev::ipv6_enabled() {
        tracing::warn!(
            listen_v6 = ?config.network.listen.v6,
            "IPv6 is disabled on this host (net.ipv6.conf.{{all,default}}.disable_ipv6, or no \
             IPv6 at all): serving IPv4 only; IPv6 IMDS connects are refused"
        );
        config.network.listen.v6 = None;
    }
    config
}

/// What this host alone decides, done before anything is attached.
struct Host {
    root: std::path::PathBuf,
    own_path: String,
    place: Place,
    metrics: Arc<Metrics>,
    ops_listener: tokio::net::TcpListener,
    listeners: Vec<tokio::net::TcpListener>,
}

/// The checks and local work that can fail for reasons of this host alone: the cgroup v2
/// hierarchy and the proxy's place in it, the descriptor limit,
/// the ops listener, the listen interface and the listeners (a redirected connect must find one).
async fn prepare_host(config: &Config) -> anyhow::Result<Host> {
    // Both modes attach the cgroup programs (tc mode for host-network containers): both need the
    // v2 hierarchy and the proxy's place in it.
    let root = cgroup::cgroup2_root().context("the cgroup v2 hierarchy")?;
    let (own_path, own_cgroup) = cgroup::own_cgroup(&root).context("the proxy's own cgroup")?;
    let place = Place {
        own_cgroup,
        own_path: own_path.clone(),
        root: root.clone(),
    };
    fd_limit(config.limits.max_connections);
    let ops_listener = tokio::net::TcpListener::bind(config.network.ops_listen)
        .await
        .with_context(|| format!("binding the ops listener {}", config.network.ops_listen))?;
    netdev::ensure(
        &config.network.interface,
        &config.network.listen.addresses(),
    )
    .await?;
    let mut listeners = Vec::new();
    for addr in [
        Some(SocketAddr::V4(config.network.listen.v4)),
        config.network.listen.v6.map(SocketAddr::V6),
    ]
    .into_iter()
    .flatten()
    {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        listeners.push(listener);
    }
    Ok(Host {
        root,
        own_path,
        place,
        metrics: Arc::new(Metrics::default()),
        ops_listener,
        listeners,
    })
}

/// Attach the redirect, start the mode's own background work (none of it needs the engine), and
/// tell the service manager the proxy is ready: the runtimes' units are ordered after it.
fn attach(
    config: &Config,
    host: &Host,
    supervisor: &Arc<Supervisor>,
) -> anyhow::Result<Arc<Redirect>> {
    let redirect = Arc::new(Redirect::attach(config, &host.place)?);
    redirect.start(&config.redirect.hosts, &host.root, supervisor)?;
    crate::notify::ready("redirect attached; connecting to the container engine");
    Ok(redirect)
}

/// The runtime's index once it answers ([`connect_engine`]), checked against `--runtime`.
async fn connect_and_check_engine(config: &Config) -> anyhow::Result<Arc<runtime::Index>> {
    let (index, endpoint) = connect_engine(config).await;
    let found = index.runtime();
    if let Some(wanted) = config.runtime.name.kind()
        && wanted != found.kind
    {
        anyhow::bail!(
            "--runtime {wanted}, but {endpoint} is {}'s API: name the other runtime or its socket \
             (--docker-host)",
            found.kind
        );
    }
    if found.kind != runtime::Kind::Cri && !config.roles.policy.namespaces.is_empty() {
        tracing::warn!(
            runtime = %found.kind,
            "--namespace-allowed-roles applies to Kubernetes pods only (--runtime cri); this \
             runtime's containers are not restricted by it"
        );
    }
    tracing::info!(
        runtime = %found.kind,
        name = %found.name,
        version = %found.version,
        cgroup_driver = %found.cgroup_driver,
        %endpoint,
        "container runtime"
    );
    Ok(index)
}

/// The parts that answer requests, wired together.
struct Parts {
    index: Arc<runtime::Index>,
    cache: Arc<credentials::Cache>,
    attestor: Arc<Attestor>,
    app: Arc<imds::App>,
}

/// The STS client and credential cache, the attestor and the IMDS application; the instance's
/// `HttpTokens` learnt before the first request is served, and followed after.
async fn build_parts(
    config: &Config,
    host: &Host,
    redirect: &Arc<Redirect>,
    index: Arc<runtime::Index>,
    supervisor: &Arc<Supervisor>,
) -> anyhow::Result<Parts> {
    let metrics = &host.metrics;
    let sts = credentials::sts_client(
        &config.imds.upstream,
        config.sts.region.as_deref(),
        config.sts.endpoint.as_deref(),
    )
    .await?;
    let upstream = Upstream::new(
        &config.imds.upstream,
        config.imds.upstream_concurrency,
        config.imds.metadata_cache_ttl,
    );
    let cache = credentials::Cache::new(
        Arc::new(credentials::Sts(sts)),
        Arc::new(credentials::SystemClock),
        credentials::Settings {
            duration: config.sts.session_duration,
            refresh_before: config.sts.refresh_before,
            answer_within: config.sts.answer_within,
            tagging: tagging(
                &config.sts.tags,
                &upstream,
                matches!(config.redirect.mode, crate::config::Mode::Cgroup { .. }),
            )
            .await,
        },
        metrics.clone(),
    );
    let proc = Proc::default();
    redirect.follow_containers(&index, proc.clone(), supervisor);
    let attestor = Arc::new(Attestor::new(
        Some(redirect.hooks().clone()),
        Arc::new(Cgroups::new(host.root.clone())),
        index.clone(),
        proc,
        redirect.identifies_by_address(),
    ));
    let app = Arc::new(imds::App {
        tokens: Tokens::new(),
        roles: config.roles.policy.clone(),
        credentials: cache.clone(),
        upstream,
        rate: crate::limits::PerKey::new(
            config.limits.requests_per_second,
            config.limits.request_burst,
            65_536,
        ),
        quiet: crate::identity::quiet(),
        metrics: metrics.clone(),
        // Until the upstream is asked (when not configured): required.
        require_imdsv2: AtomicBool::new(config.imds.require_imdsv2.unwrap_or(true)),
        exposure: imds::Exposure {
            user_data: config.imds.allow_user_data,
            identity_signatures: config.imds.allow_identity_signatures,
        },
    });
    match config.imds.require_imdsv2 {
        Some(required) => tracing::info!(require_imdsv2 = required, "IMDSv2 tokens as configured"),
        None => {
            // Known before the first request is served; followed after.
            let mut known = None;
            imds::learn_upstream_imdsv2(&app, &mut known).await;
            supervisor.spawn(
                "upstream HttpTokens follower",
                imds::follow_upstream_imdsv2_from(
                    app.clone(),
                    imds::FOLLOW_UPSTREAM_IMDSV2_EVERY,
                    known,
                ),
            );
        }
    }
    Ok(Parts {
        index,
        cache,
        attestor,
        app,
    })
}

/// How sessions are tagged: the settings, and the instance's id from the upstream (asked once;
/// without it sessions carry no `ec2-instance-id` tag, which a policy that conditions on it then
/// refuses, and the log says so).
async fn tagging(
    tags: &imds_policy::tags::Tags,
    upstream: &Upstream,
    told_apart: bool,
) -> credentials::Tagging {
    let instance_id = if tags.enabled {
        match upstream.instance_id().await {
            Ok(id) => Some(id),
            Err(err) => {
                tracing::warn!(
                    %err,
                    "session tags: the upstream IMDS did not say the instance id; sessions carry no ec2-instance-id tag"
                );
                None
            }
        }
    } else {
        None
    };
    tracing::info!(
        session_tags = tags.enabled,
        source_identity = tags.source_identity,
        instance_id = instance_id.as_deref().unwrap_or("-"),
        "session tagging"
    );
    credentials::Tagging {
        tags: tags.clone(),
        instance_id,
        told_apart,
    }
}

/// The background work that follows the engine: the cache's prefetch and the coverage watch on
/// the engine's events, the sweepers, and the index itself (subscribed to first, so that every
/// container is seen, those running now included). Each under the supervisor.
fn start_background_work(
    config: &Config,
    host: &Host,
    redirect: &Arc<Redirect>,
    parts: &Parts,
    supervisor: &Arc<Supervisor>,
) {
    let (index, cache, attestor, metrics) =
        (&parts.index, &parts.cache, &parts.attestor, &host.metrics);
    let root = &host.root;
    // Run as a container itself, the proxy is one of Docker's containers: it never asks itself.
    let own_container = cgroup::container_id(&host.own_path);
    supervisor.spawn(
        "credential prefetch",
        cache.clone().follow_containers(
            config.roles.policy.clone(),
            index.subscribe(),
            own_container.clone(),
            matches!(config.redirect.mode, crate::config::Mode::Cgroup { .. }),
        ),
    );
    supervisor.spawn(
        "coverage watch",
        crate::redirect::watch_coverage(
            index.subscribe(),
            index.clone(),
            metrics.clone(),
            redirect.attach_points(root),
            own_container,
        ),
    );
    // Every minute, the watched source addresses of containers gone give their descriptors back
    // (tc mode; a watch is otherwise dropped only when its address calls again).
    {
        let attestor = attestor.clone();
        supervisor.spawn("address watch sweeper", async move {
            let mut every = tokio::time::interval(Duration::from_secs(60));
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                let dropped = attestor.sweep_watches();
                if dropped > 0 {
                    tracing::debug!(dropped, "watches of source addresses that ended dropped");
                }
            }
        });
    }
    // Subscribed before the index starts: every container, those running now included.
    supervisor.spawn("container index", index.clone().run());
    // Every minute the cache keeps only the indexed containers' sessions: a destroy event missed
    // (the subscriber lagged behind a burst of containers) leaves nothing behind for long.
    {
        let (cache, index) = (cache.clone(), index.clone());
        supervisor.spawn("credential cache sweeper", async move {
            let mut every = tokio::time::interval(Duration::from_secs(60));
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                if !index.connected() {
                    continue; // the index is not current: nothing to compare with
                }
                let dropped = cache.retain_sessions(&index.session_names());
                if dropped > 0 {
                    tracing::info!(
                        dropped,
                        "credential cache: sessions of containers no longer running dropped"
                    );
                }
            }
        });
    }
}

/// The listeners (redirected connections, attested) and the ops endpoints, each a task of the
/// returned set; and the flag the ops endpoints read to say the programs are attached.
fn serve(
    config: &Config,
    listeners: Vec<tokio::net::TcpListener>,
    ops_listener: tokio::net::TcpListener,
    parts: Parts,
    redirect: &Arc<Redirect>,
    supervisor: Arc<Supervisor>,
) -> (tokio::task::JoinSet<std::io::Result<()>>, Arc<AtomicBool>) {
    let Parts {
        index,
        attestor,
        app,
        ..
    } = parts;
    let metrics = app.metrics.clone();
    let router = imds::router(app.clone());
    let limits = serve::Limits {
        header_timeout: config.limits.header_timeout,
        max_connections: config.limits.max_connections,
        max_connections_per_caller: config.limits.max_connections_per_caller,
    };
    let admission =
        serve::Admission::new(limits.max_connections, limits.max_connections_per_caller);
    let mut servers = tokio::task::JoinSet::new();
    for listener in listeners {
        servers.spawn(serve::serve(
            AttestedListener::new(listener, attestor.clone()),
            router.clone(),
            limits,
            admission.clone(),
            metrics.clone(),
        ));
    }
    let attached = Arc::new(AtomicBool::new(true));
    let explain_token = ops_listener
        .local_addr()
        .map(|a| crate::explain::token_path(a.port()))
        .and_then(|path| crate::explain::Token::write(&path).map(|t| (t, path)));
    let explain_token = match explain_token {
        Ok((token, path)) => {
            tracing::info!(token_file = %path.display(), "imds-proxy explain: token written");
            Some(token)
        }
        Err(err) => {
            tracing::warn!(%err, "imds-proxy explain is off: its token cannot be written under /run/imds-proxy");
            None
        }
    };
    let ops = crate::ops::router(crate::ops::Ops {
        app,
        index,
        redirect: redirect.clone(),
        attestor,
        attached: attached.clone(),
        supervisor,
        explain_token,
        told_apart: matches!(config.redirect.mode, crate::config::Mode::Cgroup { .. }),
    });
    servers.spawn(async move { axum::serve(ops_listener, ops).await });

    (servers, attached)
}

/// Until SIGINT or SIGTERM, or a listener that stops (an error).
async fn wait_for_a_stop(
    mut servers: tokio::task::JoinSet<std::io::Result<()>>,
) -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT"),
        _ = term.recv() => tracing::info!("SIGTERM"),
        Some(result) = servers.join_next() => {
            result??;
            bail!("a listener stopped");
        }
    }
    crate::notify::stopping();
    servers.abort_all();
    Ok(())
}

/// Stop: the ops endpoints say not attached; the redirect stays pinned (fail closed) or goes with
/// the listen interface.
async fn stop(config: &Config, redirect: &Redirect, attached: &AtomicBool) -> anyhow::Result<()> {
    attached.store(false, Ordering::Relaxed);
    redirect.stop(config.redirect.pin.is_some());
    if config.redirect.pin.is_some() {
        tracing::info!(
            "stopping; the pinned redirect stays attached (containers fail closed until a proxy \
             runs again; `imds-proxy detach --pin DIR` removes it)"
        );
    } else {
        netdev::remove(&config.network.interface).await?;
        tracing::info!("stopped; programs detached and dummy interface removed");
    }
    Ok(())
}

/// The container runtime's index, once the runtime answers: with the unit ordered before the
/// runtimes, its socket may not exist yet. Said once, then retried (200 ms doubling to 5 s);
/// what it says when it answers (its kind, its driver) is checked by the caller.
async fn connect_engine(config: &Config) -> (Arc<runtime::Index>, runtime::Endpoint) {
    let mut backoff = Duration::from_millis(200);
    let mut waiting = false;
    loop {
        let attempt = async {
            let endpoint = (config.runtime).endpoint(|path| std::path::Path::new(path).exists())?;
            let index = endpoint
                .connect(config.roles.trust_image_role, config.runtime.cri_poll)
                .await?;
            anyhow::Ok((index, endpoint))
        };
        match attempt.await {
            Ok(connected) => {
                if waiting {
                    tracing::info!(endpoint = %connected.1, "the container runtime answers");
                }
                return connected;
            }
            Err(err) if !waiting => {
                tracing::warn!(
                    "waiting for the container runtime ({err:#}); containers' IMDS connects wait \
                     meanwhile"
                );
                waiting = true;
            }
            Err(err) => tracing::debug!("still waiting for the container runtime: {err:#}"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Every connection is a descriptor: as many as the hard limit allows.
fn fd_limit(max_connections: usize) {
    match serve::raise_fd_limit() {
        Ok(limit) if (limit as usize) < max_connections + 256 => tracing::warn!(
            fd_limit = limit,
            max_connections,
            "the file-descriptor limit is below --max-connections plus headroom; accepts will \
             fail (and back off) before the connection cap is reached"
        ),
        Ok(limit) => tracing::info!(fd_limit = limit, "file-descriptor limit"),
        Err(err) => tracing::warn!(%err, "could not raise the file-descriptor limit"),
    }
}
