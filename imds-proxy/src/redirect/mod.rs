//! The redirect, one way through the daemon for both modes: [`Redirect`] attaches what the mode
//! needs (adopting pinned links), runs its background work, reports readiness and counters, and
//! stops. One file per mode ([`cgroup`], [`tc`]), the object they share ([`object`]) and the
//! pinning both use ([`pin`]).
pub mod cgroup;
pub mod error;
pub mod object;
pub mod pin;
pub mod tc;

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
pub use object::{Error, OBJECT, load};
pub use pin::unpin;

use crate::{
    config::{Config, Mode},
    process::Proc,
    runtime,
};
use cgroup::{CgroupRedirect, Scope, Spec};
use tc::{TcRedirect, TcSpec};

/// The attached programs of the configured mode.
pub enum Redirect {
    /// Every container through the socket hooks; the kernel records who connected.
    Cgroup {
        hooks: Arc<CgroupRedirect>,
        /// The attach points (v2 directories) and whether the filter classifies below them.
        cgroups: Vec<PathBuf>,
        filter: bool,
        /// Two of tc mode's programs, and the source book they read: the forward guard on the
        /// host's uplinks (what no socket hook sees, a bridged container's frames built with
        /// `AF_PACKET`, and the host forwards to IMDS is dropped where it leaves) and the reply
        /// guard on every bridge's ports (the proxy's answers leave only by the port of the
        /// container they are for).
        forward: Arc<TcRedirect>,
    },
    /// Bridged containers through the packet programs on their interfaces (identified by source
    /// address); host-network containers through the socket hooks at the v2 root, acting on the
    /// host's network namespace only.
    Tc {
        hooks: Arc<CgroupRedirect>,
        tc: Arc<TcRedirect>,
        root: PathBuf,
    },
}

/// Where the proxy is in the cgroup v2 hierarchy.
pub struct Place {
    /// The v2 root.
    pub root: PathBuf,
    /// The proxy's own cgroup id and path (relative to the root): its connects are never
    /// redirected.
    pub own_cgroup: u64,
    pub own_path: String,
}

impl Redirect {
    /// Attach as `config` says.
    pub fn attach(config: &Config, place: &Place) -> anyhow::Result<Self> {
        let (listen_v4, listen_v6) = (config.network.listen.v4, config.network.listen.v6);
        let hooks = |cgroups: Vec<PathBuf>, filter: bool, scope: Scope| -> anyhow::Result<_> {
            let spec = Spec {
                listen_v4,
                listen_v6,
                cgroups,
                filter,
                own_cgroup: place.own_cgroup,
                pin: config.redirect.pin.clone(),
                scope,
                gate: false,
            };
            Ok(Arc::new(CgroupRedirect::attach(&spec)?))
        };
        let redirect = match &config.redirect.mode {
            Mode::Cgroup { cgroups, filter } => {
                let (cgroups, filter) = if cgroups.is_empty() {
                    // A container's cgroup is wherever its runner put it (`--cgroup-parent`, a
                    // daemon-wide cgroup-parent, BuildKit's steps), not only under Docker's
                    // default parent: attach at the v2 root, and let the filter tell
                    // containers' cgroups from the host's.
                    tracing::info!(
                        root = %place.root.display(),
                        "attaching at the cgroup v2 root in filter mode: containers are \
                         redirected wherever their cgroup is; host cgroups pass"
                    );
                    (vec![place.root.clone()], true)
                } else {
                    (cgroups.clone(), *filter)
                };
                // Before the socket hooks, so that the configuration they share when pinned
                // ends as the hooks need it.
                let forward = Arc::new(TcRedirect::attach(&TcSpec {
                    listen_v4,
                    listen_v6,
                    interfaces: Vec::new(),
                    attach: tc::TcAttach::Auto,
                    pin: config.redirect.pin.clone(),
                    static_sources: Vec::new(),
                    every_bridge: true,
                })?);
                Redirect::Cgroup {
                    hooks: hooks(cgroups.clone(), filter, Scope::AllNamespaces)?,
                    cgroups,
                    filter,
                    forward,
                }
            }
            Mode::Tc {
                interfaces,
                attach,
                static_sources,
            } => {
                // The interface programs first, so that the shared configuration ends as the
                // cgroup programs need it (the tc programs read only the listen addresses).
                let tc = Arc::new(TcRedirect::attach(&TcSpec {
                    listen_v4,
                    listen_v6,
                    interfaces: interfaces.clone(),
                    attach: *attach,
                    pin: config.redirect.pin.clone(),
                    static_sources: static_sources.clone(),
                    every_bridge: false,
                })?);
                tracing::info!(
                    attach = ?tc.attach_mode(),
                    patterns = ?interfaces,
                    interfaces = ?tc.interfaces(),
                    adopted_links = tc.adopted_links(),
                    "tc programs attached to container interfaces (bridged containers, \
                     identified by source address)"
                );
                let netns_cookie = object::own_netns_cookie().context(
                    "the host network namespace's cookie (SO_NETNS_COOKIE, Linux 5.14+)",
                )?;
                Redirect::Tc {
                    hooks: hooks(
                        vec![place.root.clone()],
                        true,
                        Scope::HostNamespace { netns_cookie },
                    )?,
                    tc,
                    root: place.root.clone(),
                }
            }
        };
        tracing::info!(
            mode = redirect.name(),
            cgroups = ?redirect.cgroups(),
            covers = match redirect {
                Redirect::Cgroup { .. } => "every container (kernel-attested)",
                Redirect::Tc { .. } =>
                    "host-network containers (kernel-attested); bridged ones through the tc programs",
            },
            listen = %config.network.listen,
            pin = ?config.redirect.pin,
            adopted_links = redirect.hooks().adopted_links(),
            own_cgroup = %place.own_path,
            "redirect attached; serving"
        );
        Ok(redirect)
    }

    pub fn name(&self) -> &'static str {
        match self {
            Redirect::Cgroup { .. } => "cgroup",
            Redirect::Tc { .. } => "tc",
        }
    }

    /// The socket hooks: their records are the kernel's evidence of who connected.
    pub fn hooks(&self) -> &Arc<CgroupRedirect> {
        match self {
            Redirect::Cgroup { hooks, .. } | Redirect::Tc { hooks, .. } => hooks,
        }
    }

    /// The packet programs: tc mode's, or cgroup mode's forward and reply guards.
    fn packets(&self) -> &Arc<TcRedirect> {
        match self {
            Redirect::Cgroup { forward, .. } => forward,
            Redirect::Tc { tc, .. } => tc,
        }
    }

    /// Whether a connection without a kernel record is identified by its source address.
    pub fn identifies_by_address(&self) -> bool {
        matches!(self, Redirect::Tc { .. })
    }

    /// Where the socket hooks are attached.
    pub fn cgroups(&self) -> Vec<PathBuf> {
        match self {
            Redirect::Cgroup { cgroups, .. } => cgroups.clone(),
            Redirect::Tc { root, .. } => vec![root.clone()],
        }
    }

    fn filtered(&self) -> bool {
        match self {
            Redirect::Cgroup { filter, .. } => *filter,
            Redirect::Tc { .. } => true,
        }
    }

    /// The attach points relative to the v2 `root` (`/` for the root itself).
    pub fn attach_points(&self, root: &Path) -> Vec<String> {
        self.cgroups()
            .iter()
            .filter_map(|c| c.strip_prefix(root).ok())
            .map(|rel| format!("/{}", rel.display()))
            .collect()
    }

    /// Start the mode's own background work, which needs no container engine: the cgroup
    /// classification feed (filter mode), the kernel log forwarder, and the packet programs'
    /// interface, route and address watches, NAT reaper and source expiry (both modes), each
    /// under `supervisor`.
    pub fn start(
        &self,
        hosts: &imds_policy::cgroups::HostCgroups,
        root: &Path,
        supervisor: &Arc<crate::supervisor::Supervisor>,
    ) -> anyhow::Result<()> {
        if self.filtered() {
            let mut feeds = Vec::new();
            for parent in self.cgroups() {
                let feed = crate::cgroup::filter::Feed::start(
                    self.hooks().clone(),
                    hosts.clone(),
                    root,
                    &parent,
                )
                .with_context(|| format!("classifying the cgroups under {}", parent.display()))?;
                feeds.push(feed);
            }
            // Before the watches run (their events wait in inotify): entries a pinned map kept
            // for cgroups removed while no proxy ran are dropped.
            let live: std::collections::HashSet<u64> =
                feeds.iter().flat_map(|feed| feed.ids()).collect();
            let swept = self.hooks().sweep_classified(&live);
            if swept > 0 {
                tracing::info!(
                    swept,
                    "filter mode: classifications of removed cgroups dropped"
                );
            }
            for feed in feeds {
                let supervisor = supervisor.clone();
                std::thread::spawn(move || {
                    let why = match feed.run() {
                        // Unclassified cgroups go to the proxy, which gives them no role:
                        // closed, and loud.
                        Err(err) => format!(
                            "failed: {err}; new cgroups' IMDS connects go to the proxy (no role)"
                        ),
                        Ok(()) => "ended".to_owned(),
                    };
                    supervisor.stopped("cgroup watch", why);
                });
            }
        }
        let logs = self.hooks().clone();
        supervisor.spawn("kernel log forwarder", async move {
            logs.forward_kernel_logs().await
        });
        let packets = self.packets();
        let follow = packets.clone();
        supervisor.spawn("interface watch", async move {
            follow.follow_interfaces().await
        });
        supervisor.spawn(
            "peer address watch",
            packets.clone().follow_peer_addresses(),
        );
        // Every 5 s: idle NAT entries (tc mode's; cgroup mode's table stays empty) and provisional
        // sources the runtime never confirmed.
        let reaper = packets.clone();
        supervisor.spawn("NAT reaper and source expiry", async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                let reaped = reaper.reap(tc::NAT_IDLE);
                if reaped > 0 {
                    tracing::debug!(reaped, "idle NAT entries removed");
                }
                reaper.expire_sources();
            }
        });
        Ok(())
    }

    /// The containers' addresses on their ports, from the engine's events (subscribed now:
    /// every container, those running already included, once the index starts): what tc mode's
    /// source guard and both modes' reply guard check against.
    pub fn follow_containers(
        &self,
        docker: &runtime::Index,
        proc: Proc,
        supervisor: &Arc<crate::supervisor::Supervisor>,
    ) {
        supervisor.spawn(
            "container sources",
            self.packets()
                .clone()
                .follow_sources(docker.subscribe(), proc),
        );
    }

    /// Ready to redirect: in tc mode, attached to at least one container interface.
    pub fn ready(&self) -> bool {
        match self {
            Redirect::Cgroup { .. } => true,
            Redirect::Tc { tc, .. } => !tc.interfaces().is_empty(),
        }
    }

    /// The programs' counters, as metrics text.
    pub fn render_metrics(&self, address_confirmations: (u64, u64, u64), watched: usize) -> String {
        let mut body = crate::metrics::render_guard(&self.hooks().guard_stats());
        if let Redirect::Cgroup { forward, .. } = self {
            body.push_str(&crate::metrics::render_tc_guards(
                &forward.stats(),
                forward.source_entries(),
            ));
        }
        if let Redirect::Tc { tc, .. } = self {
            body.push_str(&crate::metrics::render_tc(
                &tc.stats(),
                tc.nat_entries(),
                tc.source_entries(),
                tc.interfaces().len(),
                address_confirmations,
                watched,
            ));
        }
        body
    }

    /// A graceful stop: without pins, detach everything now (the interface programs first,
    /// including qdiscs this process added); with pins, leave it all attached.
    pub fn stop(&self, pinned: bool) {
        if pinned {
            return;
        }
        match self {
            Redirect::Tc { tc, .. } => tc.detach_all(),
            Redirect::Cgroup { forward, .. } => forward.detach_all(),
        }
    }
}

/// Whether a container whose cgroup is `cgroup` (relative to the v2 root, as Docker placed it) is
/// below one of the attach points `attached` (relative too).
fn covered(cgroup: &str, attached: &[String]) -> bool {
    attached
        .iter()
        .any(|parent| parent == "/" || crate::cgroup::within(cgroup, parent))
}

/// Until the events end: report each container that starts outside every attach point (its IMDS
/// connects are not redirected), and keep the containers gauge. The proxy's own container is
/// not reported.
pub async fn watch_coverage(
    mut events: tokio::sync::broadcast::Receiver<runtime::Event>,
    docker: Arc<runtime::Index>,
    metrics: Arc<crate::metrics::Metrics>,
    attached: Vec<String>,
    own_container: Option<String>,
) {
    while let Some(event) = runtime::next_event(&mut events, "coverage").await {
        metrics.set_containers(docker.len());
        metrics.container_event(match &event {
            runtime::Event::Started(_) => "started",
            runtime::Event::Created(_) => "created",
            runtime::Event::Destroyed(_) => "destroyed",
        });
        if let runtime::Event::Started(container) = event
            && Some(&container.id) != own_container.as_ref()
            && !covered(&container.cgroup, &attached)
        {
            metrics.uncovered_container();
            tracing::error!(
                container_id = %container.id,
                container = %container.name,
                cgroup = %container.cgroup,
                attach_points = ?attached,
                "a container started outside every attach point: its IMDS connects are not \
                 redirected (attach higher with --cgroup, or drop --cgroup to attach at the v2 \
                 root)"
            );
        }
    }
}
