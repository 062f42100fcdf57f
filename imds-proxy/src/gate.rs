//! `imds-proxy gate`: the redirect's early-boot half, for hosts where the proxy starts after the
//! container runtime (a Kubernetes node's DaemonSet). Pins do not survive a reboot; without a
//! gate, containers restarted by their runtime at boot would reach the instance's IMDS until the
//! proxy runs.
//!
//! Run by a unit ordered before the runtimes and the kubelet, it attaches the cgroup programs
//! at the v2 root, pinned under `--pin`, configured to **refuse** every IMDS connect that a proxy
//! would be given (nothing listens yet: `EPERM`, which the SDKs retry) and to pass the host's
//! services, which it classifies exactly as the proxy does (a walk, then inotify, with
//! [`imds_policy::cgroups::HostCgroups`]). It then tells the service manager it is ready, and
//! exits once a proxy has adopted the pins: the pinned configuration is then the proxy's
//! (`gate` zero), every link having been switched to the proxy's programs atomically
//! ([`crate::redirect::pin`]). Killed before that, it leaves the refusing programs attached:
//! closed. Started where a proxy's configuration is pinned already, it changes nothing.
use std::{
    net::{SocketAddrV4, SocketAddrV6},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;

use crate::{
    cgroup,
    redirect::{
        cgroup::{CgroupRedirect, Scope, Spec},
        object::pinned_config,
    },
};

/// Which proxy will adopt the gate's pins: tc mode has no egress guard, and its connect programs
/// leave bridged containers to the interface programs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum GateMode {
    Cgroup,
    Tc,
}

#[derive(Clone, Debug, clap::Args)]
pub struct GateArgs {
    /// The bpffs directory the proxy will run with (its `--pin`).
    #[arg(long, env = "IMDS_PROXY_PIN")]
    pub pin: PathBuf,
    /// The mode of the proxy that will adopt the pins (its `--mode`).
    #[arg(long, env = "IMDS_PROXY_MODE", value_enum, default_value_t = GateMode::Cgroup)]
    pub mode: GateMode,
    /// A cgroup glob that is the host's, as the proxy's `--host-cgroup` (give the same ones).
    #[arg(
        long = "host-cgroup",
        env = "IMDS_PROXY_HOST_CGROUP",
        value_delimiter = ','
    )]
    pub host_cgroups: Vec<String>,
}

/// How often the gate looks at the pinned configuration for a proxy's.
const ADOPTION_POLL: Duration = Duration::from_millis(200);

/// The configuration's listen address: never connected to (the gate refuses instead of
/// redirecting), but a configuration without a port is "not configured", which refuses the
/// host's services too. Loopback, so that even a rewrite would stay on the caller's own host
/// (and find nothing listening there) rather than follow a default route.
const UNUSED_V4: SocketAddrV4 = SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 1);

pub fn run(args: &GateArgs) -> anyhow::Result<()> {
    let hosts =
        imds_policy::cgroups::HostCgroups::parse(args.host_cgroups.iter().map(String::as_str))
            .map_err(|reason| anyhow::anyhow!("--host-cgroup: {reason}"))?;
    if let Some(config) = pinned_config(&args.pin)?
        && config.gate == 0
        && config.proxy_port_v4 != 0
    {
        tracing::info!(
            pin = %args.pin.display(),
            "a proxy's configuration is pinned here already: nothing for the gate to do"
        );
        crate::notify::ready("a proxy's redirect is pinned already");
        return Ok(());
    }
    let root = cgroup::cgroup2_root().context("the cgroup v2 hierarchy")?;
    let hooks = Arc::new(CgroupRedirect::attach(&Spec {
        listen_v4: UNUSED_V4,
        listen_v6: None::<SocketAddrV6>,
        cgroups: vec![root.clone()],
        filter: true,
        // No cgroup is exempt: the gate itself never connects to IMDS.
        own_cgroup: 0,
        pin: Some(args.pin.clone()),
        scope: match args.mode {
            GateMode::Cgroup => Scope::AllNamespaces,
            GateMode::Tc => Scope::AllNamespacesUnguarded,
        },
        gate: true,
    })?);
    let feed = cgroup::filter::Feed::start(hooks.clone(), hosts, &root, &root)
        .context("classifying the cgroups under the v2 root")?;
    let live: std::collections::HashSet<u64> = feed.ids().collect();
    hooks.sweep_classified(&live);
    let watch = std::thread::spawn(move || feed.run());
    tracing::info!(
        pin = %args.pin.display(),
        mode = ?args.mode,
        "gate attached: containers' IMDS connects are refused, host services pass, until a \
         proxy adopts these pins"
    );
    crate::notify::ready("gate attached; waiting for a proxy to adopt it");
    loop {
        std::thread::sleep(ADOPTION_POLL);
        if watch.is_finished() {
            // The classification stopped: new host services would be refused, containers still
            // are. Closed; said, and the unit fails so that the operator sees it.
            let result = watch.join();
            anyhow::bail!("the cgroup watch ended ({result:?}); the gate stays attached");
        }
        match pinned_config(&args.pin)? {
            Some(config) if config.gate != 0 => continue,
            Some(_) => {
                tracing::info!("a proxy adopted the gate's pins; the gate's work is done");
                return Ok(());
            }
            None => {
                tracing::warn!(
                    pin = %args.pin.display(),
                    "the gate's configuration is no longer pinned (detached by hand?); exiting"
                );
                return Ok(());
            }
        }
    }
}
