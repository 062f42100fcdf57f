//! The command line of `imds-proxy run`, as clap parses it (flags, environment, `--config` file
//! keys spelled like the flags): one struct per argument group, and the argument types. Checked and
//! turned into a typed [`super::Config`] by `RunArgs::validate` ([`super`]).
use super::*;

/// `--runtime`: the engine whose containers get roles.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RuntimeName {
    Auto,
    Docker,
    Podman,
    /// A Kubernetes node's CRI runtime (containerd, CRI-O): pods.
    Cri,
}

impl RuntimeName {
    /// The runtime it names; `None` for `auto` (whichever answers).
    pub fn kind(self) -> Option<crate::runtime::Kind> {
        match self {
            RuntimeName::Auto => None,
            RuntimeName::Docker => Some(crate::runtime::Kind::Docker),
            RuntimeName::Podman => Some(crate::runtime::Kind::Podman),
            RuntimeName::Cri => Some(crate::runtime::Kind::Cri),
        }
    }
}

/// `--mode`: how containers' IMDS traffic is intercepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ModeName {
    /// Socket hooks on the containers' cgroups; the kernel records who connected. The default,
    /// and the stronger: identity cannot be spoofed.
    Cgroup,
    /// Packet rewrite on container interfaces (the drop-in for the iptables DNAT rule); a caller
    /// is identified by its source address through Docker.
    Tc,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The flags of `imds-proxy run`.
#[derive(Clone, Debug, Parser)]
#[command(
    name = "imds-proxy run",
    about = "Attach the redirect and serve the IMDS API to containers",
    args_override_self = true
)]
pub struct RunArgs {
    /// TOML file with any of these settings (keys spelled like the flags, e.g. `default-role`).
    #[arg(long, env = "IMDS_PROXY_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub network: NetworkArgs,
    #[command(flatten)]
    pub redirect: RedirectArgs,
    #[command(flatten)]
    pub roles: RoleArgs,
    #[command(flatten)]
    pub sts: StsArgs,
    #[command(flatten)]
    pub imds: ImdsArgs,
    #[command(flatten)]
    pub limits: LimitArgs,
    /// The container engine whose containers get roles: Docker, Podman through its
    /// Docker-compatible API (`podman system service`), or a Kubernetes node's CRI runtime
    /// (containerd, CRI-O), whose pods take their role from their annotations. `auto`: the first
    /// of their usual sockets that exists, Docker's first.
    #[arg(long, env = "IMDS_PROXY_RUNTIME", value_enum, default_value_t = RuntimeName::Auto)]
    pub runtime: RuntimeName,
    /// The engine's API socket (default: the runtime's usual one, /var/run/docker.sock or
    /// /run/podman/podman.sock).
    #[arg(long, env = "IMDS_PROXY_DOCKER_HOST")]
    pub docker_host: Option<String>,
    /// The CRI runtime's socket (default: the first that exists of
    /// /run/containerd/containerd.sock and /var/run/crio/crio.sock).
    #[arg(long, env = "IMDS_PROXY_CRI_ENDPOINT")]
    pub cri_endpoint: Option<String>,
    /// How often a CRI runtime's running containers are listed. Not for operators (hidden): the
    /// tests set it long, so that a pod is found only by asking the runtime on its first request.
    #[arg(long, hide = true, default_value = "1s", value_parser = humantime::parse_duration)]
    pub cri_poll: std::time::Duration,
    #[arg(long, env = "IMDS_PROXY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// Where the proxy listens.
#[derive(Clone, Debug, clap::Args)]
#[command(next_help_heading = "Listening")]
pub struct NetworkArgs {
    /// Listen address for redirected connections: one IPv4, optionally one IPv6. Dedicated to
    /// redirected traffic; it lives on the dummy interface.
    #[arg(long = "listen", env = "IMDS_PROXY_LISTEN", value_delimiter = ',',
          default_values = ["169.254.42.1:80", "[fd00:ec2:42::1]:80"])]
    pub listen: Vec<SocketAddr>,
    /// Operations listener: /healthz, /readyz, /metrics.
    #[arg(long, env = "IMDS_PROXY_OPS_LISTEN", default_value = "127.0.0.1:9181")]
    pub ops_listen: SocketAddr,
    /// The dummy interface that carries the listen addresses.
    #[arg(long, env = "IMDS_PROXY_INTERFACE", default_value = crate::netdev::DEFAULT_INTERFACE)]
    pub interface: String,
}

/// How containers' IMDS traffic reaches the proxy.
#[derive(Clone, Debug, clap::Args)]
#[command(next_help_heading = "Redirect")]
pub struct RedirectArgs {
    /// Interception mode: `cgroup` (kernel-attested identity; the stronger) or `tc` (packet
    /// rewrite on container interfaces; identity by source address).
    #[arg(long, env = "IMDS_PROXY_MODE", value_enum, default_value_t = ModeName::Cgroup)]
    pub mode: ModeName,
    /// cgroup v2 directory whose sockets are redirected (repeatable). Default: the v2 root, in
    /// filter mode (every container, wherever its cgroup is).
    #[arg(long = "cgroup", env = "IMDS_PROXY_CGROUP", value_delimiter = ',')]
    pub cgroups: Vec<PathBuf>,
    /// With --cgroup: the attach points also hold host services; redirect only container cgroups
    /// (`docker-<id>.scope`, `docker/<id>`), pass the others, refuse those not classified yet.
    /// Automatic with Docker's systemd cgroup driver.
    #[arg(long, env = "IMDS_PROXY_CGROUP_FILTER")]
    pub cgroup_filter: bool,
    /// Filter mode (and tc mode's host-network hooks): a cgroup path (relative to the v2 root,
    /// `*` and `?` wildcards) whose processes are host services that reach the instance's IMDS
    /// directly (repeatable). Built in: `/`, `/init.scope`, and systemd units under
    /// `/system.slice` and `/user.slice` whose names carry no container marker. Everything else
    /// is a container's; no glob makes a path with a container marker the host's.
    #[arg(
        long = "host-cgroup",
        env = "IMDS_PROXY_HOST_CGROUP",
        value_delimiter = ','
    )]
    pub host_cgroups: Vec<String>,
    /// tc mode: container interface to attach to (repeatable or comma-separated; `*` and `?`
    /// wildcards, e.g. `br-*`). Default: docker0. Interfaces that appear later are attached too.
    #[arg(
        long = "container-iface",
        env = "IMDS_PROXY_CONTAINER_IFACE",
        value_delimiter = ','
    )]
    pub container_ifaces: Vec<String>,
    /// tc mode: an address a bridge port (by interface name) may send to IMDS from, for clients
    /// that are not Docker containers (VMs, namespaces of your own): `IFACE=ADDR`, repeatable.
    /// Docker containers' ports and addresses are found by themselves.
    #[arg(
        long = "tc-static-source",
        env = "IMDS_PROXY_TC_STATIC_SOURCE",
        value_delimiter = ','
    )]
    pub tc_static_sources: Vec<String>,
    /// tc mode: attach with TCX links (kernel 6.6+, pinnable) or netlink clsact filters.
    #[arg(long, env = "IMDS_PROXY_TC_ATTACH", value_enum, default_value_t = TcAttach::Auto)]
    pub tc_attach: TcAttach,
    /// bpffs directory to pin links and maps in: if the proxy dies, containers fail closed.
    #[arg(long, env = "IMDS_PROXY_PIN")]
    pub pin: Option<PathBuf>,
}

/// Which role a container gets.
#[derive(Clone, Debug, clap::Args)]
#[command(next_help_heading = "Roles")]
pub struct RoleArgs {
    /// Role for containers that name none (a role name under --role-arn-prefix, or an ARN).
    #[arg(long, env = "IMDS_PROXY_DEFAULT_ROLE")]
    pub default_role: Option<String>,
    /// Prefix role names are appended to, e.g. arn:aws:iam::123456789012:role/containers/. Full
    /// ARNs must lie under it.
    #[arg(long, env = "IMDS_PROXY_ROLE_ARN_PREFIX")]
    pub role_arn_prefix: Option<String>,
    /// Globs on role ARNs a container may assume (comma-separated or repeated); all when empty.
    #[arg(long, env = "IMDS_PROXY_ALLOWED_ROLES", value_delimiter = ',')]
    pub allowed_roles: Vec<String>,
    /// Let a container's image choose its role: role labels and IAM_ROLE set by the image's own
    /// LABEL/ENV count. By default only those set on the container itself do (an image's value is
    /// ignored and logged), so that running an image never grants a role its runner did not give.
    #[arg(long, env = "IMDS_PROXY_TRUST_IMAGE_ROLE")]
    pub trust_image_role: bool,
    /// Kubernetes pods (`--runtime cri`): `<namespace>=<glob>` on the role ARNs a namespace's
    /// pods may assume (comma-separated or repeated; a namespace may be given several globs).
    /// Once any is given, a pod in a namespace not listed gets no role. The node-local
    /// equivalent of kube2iam's `iam.amazonaws.com/allowed-roles` namespace annotation.
    #[arg(
        long,
        env = "IMDS_PROXY_NAMESPACE_ALLOWED_ROLES",
        value_delimiter = ','
    )]
    pub namespace_allowed_roles: Vec<String>,
}

/// How roles are assumed.
#[derive(Clone, Debug, clap::Args)]
#[command(next_help_heading = "STS")]
pub struct StsArgs {
    /// STS endpoint URL (default: the regional endpoint).
    #[arg(long, env = "IMDS_PROXY_STS_ENDPOINT")]
    pub sts_endpoint: Option<String>,
    /// AWS region for STS (default: the instance's, from IMDS).
    #[arg(long, env = "IMDS_PROXY_REGION")]
    pub region: Option<String>,
    /// Lifetime of assumed-role sessions, seconds (900–43200).
    #[arg(long, env = "IMDS_PROXY_SESSION_DURATION", default_value_t = 3600)]
    pub session_duration: u32,
    /// Refresh credentials in the background when less than this remains (e.g. 5m, 300s).
    #[arg(long, env = "IMDS_PROXY_REFRESH_BEFORE", default_value = "5m", value_parser = humantime::parse_duration)]
    pub refresh_before: Duration,
    /// How long a container's request for a role not cached waits for STS before it is answered
    /// 503 (the call goes on, and its result is cached for the next request). Keep it inside the
    /// SDKs' 1 s IMDS budget.
    #[arg(long, env = "IMDS_PROXY_ANSWER_WITHIN", default_value = "900ms", value_parser = humantime::parse_duration)]
    pub answer_within: Duration,
    /// Tag every session with what the proxy knows of its caller (a pod's namespace, name and uid
    /// under EKS Pod Identity's keys; a container's name and id; its image; the instance id) and
    /// the --session-tag tags. Roles must allow sts:TagSession in their trust policy; `off` for
    /// roles that do not.
    #[arg(long, env = "IMDS_PROXY_SESSION_TAGS", value_enum, default_value_t = OnOff::On)]
    pub session_tags: OnOff,
    /// A static session tag KEY=VALUE on every session (repeated or comma-separated).
    #[arg(long, env = "IMDS_PROXY_SESSION_TAG", value_delimiter = ',')]
    pub session_tag: Vec<String>,
    /// Session tag keys that are transitive: they follow the session into roles it assumes in
    /// turn (repeated or comma-separated; a --session-tag key or one the proxy sets).
    #[arg(long, env = "IMDS_PROXY_TRANSITIVE_TAG_KEY", value_delimiter = ',')]
    pub transitive_tag_key: Vec<String>,
    /// Set each session's SourceIdentity to its pod (`<namespace>.<name>`) or container (its
    /// name): it survives the workload's own role chaining. Roles must allow
    /// sts:SetSourceIdentity.
    #[arg(long, env = "IMDS_PROXY_SOURCE_IDENTITY", value_enum, default_value_t = OnOff::Off)]
    pub source_identity: OnOff,
}

/// A switch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

/// The upstream IMDS and what of it containers see.
#[derive(Clone, Debug, clap::Args)]
#[command(next_help_heading = "IMDS")]
pub struct ImdsArgs {
    /// The instance metadata service the proxy itself uses.
    #[arg(
        long,
        env = "IMDS_PROXY_UPSTREAM",
        default_value = "http://169.254.169.254"
    )]
    pub upstream: String,
    /// Answer 401 to requests without an IMDSv2 token: `true`, `false`, or (the default) as the
    /// instance's own IMDS does (its HttpTokens setting, checked at start and every few minutes;
    /// required while it cannot be checked). `--require-imdsv2` alone means `true`.
    #[arg(long, env = "IMDS_PROXY_REQUIRE_IMDSV2", num_args = 0..=1, default_missing_value = "true",
          value_parser = clap::builder::BoolishValueParser::new())]
    pub require_imdsv2: Option<bool>,
    /// Containers' pass-through calls to the upstream IMDS at once (the proxy's own calls do not
    /// count against it); beyond, a call waits up to a second, then gets 429.
    #[arg(long, env = "IMDS_PROXY_UPSTREAM_CONCURRENCY", default_value_t = 16)]
    pub upstream_concurrency: usize,
    /// How long pass-through answers are kept (0s: not at all); spot, events, rebalance,
    /// autoscaling and tags are never kept.
    #[arg(long, env = "IMDS_PROXY_METADATA_CACHE_TTL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub metadata_cache_ttl: Duration,
    /// Pass /latest/user-data through (denied by default: it often holds secrets).
    #[arg(long, env = "IMDS_PROXY_ALLOW_USER_DATA")]
    pub allow_user_data: bool,
    /// Pass the signed instance identity documents through (`dynamic/instance-identity/pkcs7`,
    /// `signature`, `rsa2048`). Denied by default: they prove to Vault, SPIRE and the like that
    /// the caller is the instance itself.
    #[arg(long, env = "IMDS_PROXY_ALLOW_IDENTITY_SIGNATURES")]
    pub allow_identity_signatures: bool,
}

/// What one caller may take.
#[derive(Clone, Debug, clap::Args)]
#[command(next_help_heading = "Limits")]
pub struct LimitArgs {
    /// Longest wait for a request head, on a new connection or an idle keep-alive one; then the
    /// connection is closed (e.g. 5s, 500ms).
    #[arg(long, env = "IMDS_PROXY_HEADER_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub header_timeout: Duration,
    /// Connections served at once, in all; beyond it new ones are closed unserved.
    #[arg(long, env = "IMDS_PROXY_MAX_CONNECTIONS", default_value_t = 4096)]
    pub max_connections: usize,
    /// Connections one caller (a container) may hold open at once.
    #[arg(
        long,
        env = "IMDS_PROXY_MAX_CONNECTIONS_PER_CALLER",
        default_value_t = 64
    )]
    pub max_connections_per_caller: usize,
    /// Requests a second one container may make on average (beyond: 429, as IMDS throttles).
    #[arg(long, env = "IMDS_PROXY_REQUESTS_PER_SECOND", default_value_t = 50.0)]
    pub requests_per_second: f64,
    /// Requests one container may make at once before --requests-per-second applies.
    #[arg(long, env = "IMDS_PROXY_REQUEST_BURST", default_value_t = 100.0)]
    pub request_burst: f64,
}

// tc mode's argument types and parsers (the redirect reads them from here).

/// How an interface's programs are attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TcAttach {
    /// TCX links where the kernel has them (6.6+), else netlink.
    Auto,
    /// TCX links (kernel 6.6+); they can be pinned.
    Tcx,
    /// A clsact qdisc (created if absent) with direct-action filters.
    Netlink,
}

/// `IFACE=ADDR` of `--tc-static-source`.
pub fn parse_static_source(text: &str) -> Result<(String, std::net::IpAddr), String> {
    let (iface, addr) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not IFACE=ADDR"))?;
    if !valid_pattern(iface) || iface.contains(['*', '?']) {
        return Err(format!("{iface:?} is not an interface name"));
    }
    let addr = addr
        .parse()
        .map_err(|_| format!("{addr:?} is not an IP address"))?;
    Ok((iface.to_owned(), addr))
}

/// Whether a `--container-iface` value is acceptable: an interface name (at most 15 bytes, no
/// `/`, whitespace or `:`) in which `*` and `?` may stand for characters.
pub fn valid_pattern(pattern: &str) -> bool {
    !pattern.is_empty()
        && pattern.len() <= 15
        && pattern
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':')
}
