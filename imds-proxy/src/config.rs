//! Configuration of `imds-proxy run`: command-line flags, each also settable by an environment
//! variable `IMDS_PROXY_<FLAG>` and by a TOML file (`--config FILE`, keys spelled like the flags).
//! Flags override the environment, which overrides the file. Invalid configuration is one error
//! naming the key and the reason, raised before anything is attached.
use std::{
    ffi::OsString,
    net::{IpAddr, SocketAddr, SocketAddrV4, SocketAddrV6},
    path::{Path, PathBuf},
    time::Duration,
};

use clap::{ArgMatches, CommandFactory as _, FromArgMatches as _, Parser, parser::ValueSource};

use crate::roles::{self, Glob, RoleName};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid configuration: {key}: {reason}")]
pub struct ConfigError {
    pub key: String,
    pub reason: String,
}

fn invalid(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.to_owned(),
        reason: reason.into(),
    }
}

/// `--runtime`: the engine whose containers get roles.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RuntimeName {
    Auto,
    Docker,
    Podman,
    /// A Kubernetes node's CRI runtime (containerd, CRI-O): pods.
    Cri,
}

/// The two APIs the proxy speaks to a runtime.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuntimeApi {
    /// Docker's (Docker, Podman's compatible service): `--docker-host`.
    Docker,
    /// The Kubernetes CRI (containerd, CRI-O): `--cri-endpoint`.
    Cri,
}

/// The usual API sockets, in the order `auto` looks for them: Docker's before containerd's (a
/// host with Docker has a containerd socket too, whose containers are Docker's).
pub const RUNTIME_SOCKETS: [(RuntimeName, &str); 4] = [
    (RuntimeName::Docker, "unix:///var/run/docker.sock"),
    (RuntimeName::Podman, "unix:///run/podman/podman.sock"),
    (RuntimeName::Cri, "unix:///run/containerd/containerd.sock"),
    (RuntimeName::Cri, "unix:///var/run/crio/crio.sock"),
];

impl RunArgs {
    /// The runtime's API and socket: `--docker-host` or `--cri-endpoint`, else the runtime's
    /// usual one, else (`auto`) the first usual one that `exists`.
    pub fn engine_socket(
        &self,
        exists: impl Fn(&str) -> bool,
    ) -> Result<(RuntimeApi, String), ConfigError> {
        let api = |runtime| match runtime {
            RuntimeName::Cri => RuntimeApi::Cri,
            _ => RuntimeApi::Docker,
        };
        let first_existing = |wanted: &dyn Fn(RuntimeName) -> bool| {
            RUNTIME_SOCKETS
                .iter()
                .filter(|(r, _)| wanted(*r))
                .find(|(_, socket)| exists(socket.trim_start_matches("unix://")))
                .map(|(r, socket)| (api(*r), (*socket).to_owned()))
        };
        let usual = |runtime: RuntimeName| {
            RUNTIME_SOCKETS
                .iter()
                .filter(|(r, _)| *r == runtime)
                .map(|(_, s)| *s)
                .collect::<Vec<_>>()
                .join(", ")
        };
        match (self.runtime, &self.docker_host, &self.cri_endpoint) {
            (_, Some(_), Some(_)) => Err(invalid(
                "cri-endpoint",
                "give --docker-host or --cri-endpoint, not both: the proxy follows one runtime",
            )),
            (RuntimeName::Cri, Some(_), None) => Err(invalid(
                "docker-host",
                "--runtime cri reads --cri-endpoint, not --docker-host",
            )),
            (RuntimeName::Docker | RuntimeName::Podman, None, Some(_)) => Err(invalid(
                "cri-endpoint",
                "--cri-endpoint is for --runtime cri (or auto)",
            )),
            (_, Some(host), None) => Ok((RuntimeApi::Docker, host.clone())),
            (_, None, Some(endpoint)) => Ok((RuntimeApi::Cri, endpoint.clone())),
            (RuntimeName::Auto, None, None) => first_existing(&|_| true).ok_or_else(|| {
                invalid(
                    "runtime",
                    format!(
                        "auto: none of the usual sockets exists ({}); start Docker, `podman \
                         system service` or containerd, or give --docker-host or --cri-endpoint",
                        RUNTIME_SOCKETS.map(|(_, s)| s).join(", ")
                    ),
                )
            }),
            (RuntimeName::Cri, None, None) => first_existing(&|r| r == RuntimeName::Cri)
                .ok_or_else(|| {
                    invalid(
                        "runtime",
                        format!(
                            "cri: none of the usual CRI sockets exists ({}); give --cri-endpoint",
                            usual(RuntimeName::Cri)
                        ),
                    )
                }),
            (runtime, None, None) => Ok((RuntimeApi::Docker, usual(runtime))),
        }
    }
}

/// A Kubernetes namespace name (an RFC 1123 label).
fn is_namespace_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
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
    /// (docker-<id>.scope, docker/<id>), pass the others, refuse those not classified yet.
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
    #[arg(long, env = "IMDS_PROXY_TC_ATTACH", value_enum, default_value_t = crate::redirect::tc::TcAttach::Auto)]
    pub tc_attach: crate::redirect::tc::TcAttach,
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

/// The validated configuration: what the flags said, and what they mean, typed.
#[derive(Clone, Debug)]
pub struct Config {
    pub args: RunArgs,
    pub roles: roles::Policy,
    /// Which cgroups are the host's (filter mode).
    pub hosts: imds_policy::cgroups::HostCgroups,
    pub listen: Listen,
    pub mode: Mode,
}

/// The dedicated listen addresses: one IPv4, at most one IPv6.
#[derive(Clone, Copy, Debug)]
pub struct Listen {
    pub v4: SocketAddrV4,
    pub v6: Option<SocketAddrV6>,
}

impl Listen {
    pub fn addresses(&self) -> Vec<IpAddr> {
        let mut addresses = vec![IpAddr::V4(*self.v4.ip())];
        addresses.extend(self.v6.map(|a| IpAddr::V6(*a.ip())));
        addresses
    }
}

/// The mode and its settings.
#[derive(Clone, Debug)]
pub enum Mode {
    /// Socket hooks at `cgroups` (empty: the v2 root, in filter mode); `filter`: classify the
    /// cgroups below them and redirect containers' only.
    Cgroup { cgroups: Vec<PathBuf>, filter: bool },
    /// Packet rewrite on the interfaces matching `interfaces` (default docker0), with the
    /// operator's static sources for clients that are not Docker containers.
    Tc {
        interfaces: Vec<String>,
        attach: crate::redirect::tc::TcAttach,
        static_sources: Vec<(String, IpAddr)>,
    },
}

impl RunArgs {
    /// Parse `argv` (without the program and subcommand names), the environment and the file
    /// named by `--config` / `IMDS_PROXY_CONFIG`, with flags > environment > file.
    pub fn parse_layered<I, T>(argv: I) -> Result<RunArgs, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let argv: Vec<OsString> = std::iter::once(OsString::from("run"))
            .chain(argv.into_iter().map(Into::into))
            .collect();
        let matches = RunArgs::command()
            .try_get_matches_from(&argv)
            .map_err(|e| clap_error(&e))?;
        let first = RunArgs::from_arg_matches(&matches).map_err(|e| clap_error(&e))?;
        let Some(file) = &first.config else {
            return Ok(first);
        };
        // The file's settings, as flags, for every key neither a flag nor the environment set;
        // then the command line again, so flags still win.
        let mut layered = vec![OsString::from("run")];
        layered.extend(file_args(file, &matches)?);
        layered.extend(argv.into_iter().skip(1));
        let matches = RunArgs::command()
            .try_get_matches_from(&layered)
            .map_err(|e| clap_error(&e))?;
        RunArgs::from_arg_matches(&matches).map_err(|e| clap_error(&e))
    }

    /// Check every setting; the first problem, naming its key.
    pub fn validate(self) -> Result<Config, ConfigError> {
        let (mut v4, mut v6): (Vec<SocketAddrV4>, Vec<SocketAddrV6>) = (Vec::new(), Vec::new());
        for addr in &self.network.listen {
            match addr {
                SocketAddr::V4(a) => v4.push(*a),
                SocketAddr::V6(a) => v6.push(*a),
            }
        }
        let listen = match (v4.as_slice(), v6.as_slice()) {
            ([v4], []) => Listen { v4: *v4, v6: None },
            ([v4], [v6]) => Listen {
                v4: *v4,
                v6: Some(*v6),
            },
            _ => {
                return Err(invalid(
                    "listen",
                    "give exactly one IPv4 and at most one IPv6 address",
                ));
            }
        };
        for addr in &self.network.listen {
            if addr.ip().is_unspecified() || addr.ip().is_loopback() {
                return Err(invalid(
                    "listen",
                    format!(
                        "{addr} cannot be a dedicated listen address (use a link-local or ULA address of its own)"
                    ),
                ));
            }
        }
        let mode = match self.redirect.mode {
            ModeName::Cgroup => {
                if !self.redirect.container_ifaces.is_empty() {
                    return Err(invalid("container-iface", "applies to --mode tc only"));
                }
                if !self.redirect.tc_static_sources.is_empty() {
                    return Err(invalid("tc-static-source", "applies to --mode tc only"));
                }
                Mode::Cgroup {
                    cgroups: self.redirect.cgroups.clone(),
                    filter: self.redirect.cgroup_filter,
                }
            }
            ModeName::Tc => {
                if !self.redirect.cgroups.is_empty() || self.redirect.cgroup_filter {
                    return Err(invalid(
                        if self.redirect.cgroup_filter {
                            "cgroup-filter"
                        } else {
                            "cgroup"
                        },
                        "applies to --mode cgroup only",
                    ));
                }
                if let Some(bad) = self
                    .redirect
                    .container_ifaces
                    .iter()
                    .find(|p| !crate::redirect::tc::valid_pattern(p))
                {
                    return Err(invalid(
                        "container-iface",
                        format!(
                            "{bad:?} is not an interface name or pattern (at most 15 characters, no spaces, '/' or ':')"
                        ),
                    ));
                }
                let static_sources = self
                    .redirect
                    .tc_static_sources
                    .iter()
                    .map(|source| crate::redirect::tc::parse_static_source(source))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|reason| invalid("tc-static-source", reason))?;
                let attach = self.redirect.tc_attach.resolve();
                if self.redirect.pin.is_some() && attach != crate::redirect::tc::TcAttach::Tcx {
                    return Err(invalid(
                        "pin",
                        "pinning in tc mode needs TCX links (--tc-attach tcx, or auto on kernel 6.6+)",
                    ));
                }
                Mode::Tc {
                    interfaces: if self.redirect.container_ifaces.is_empty() {
                        vec!["docker0".to_owned()]
                    } else {
                        self.redirect.container_ifaces.clone()
                    },
                    attach,
                    static_sources,
                }
            }
        };
        check_http_url("upstream", &self.imds.upstream)?;
        if let Some(endpoint) = &self.sts.sts_endpoint {
            check_url("sts-endpoint", endpoint)?;
        }
        if let Some(region) = &self.sts.region
            && (region.is_empty()
                || !region
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'))
        {
            return Err(invalid(
                "region",
                format!("{region:?} is not a region name"),
            ));
        }
        if !(900..=43_200).contains(&self.sts.session_duration) {
            return Err(invalid(
                "session-duration",
                format!(
                    "{} is outside 900–43200 seconds (STS limits)",
                    self.sts.session_duration
                ),
            ));
        }
        if self.sts.answer_within.is_zero() || self.sts.answer_within > Duration::from_secs(10) {
            return Err(invalid(
                "answer-within",
                format!(
                    "{} is not between 1ms and 10s",
                    humantime::format_duration(self.sts.answer_within)
                ),
            ));
        }
        if self.sts.refresh_before >= Duration::from_secs(self.sts.session_duration.into()) {
            return Err(invalid(
                "refresh-before",
                format!(
                    "{} is not shorter than the session duration ({} s)",
                    humantime::format_duration(self.sts.refresh_before),
                    self.sts.session_duration
                ),
            ));
        }
        let prefix = self
            .roles
            .role_arn_prefix
            .as_deref()
            .map(roles::ArnPrefix::parse)
            .transpose()
            .map_err(|reason| invalid("role-arn-prefix", reason))?;
        let allowed = self
            .roles
            .allowed_roles
            .iter()
            .map(|g| Glob::parse(g))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|reason| invalid("allowed-roles", reason))?;
        let default_role = self
            .roles
            .default_role
            .as_deref()
            .map(RoleName::parse)
            .transpose()
            .map_err(|reason| invalid("default-role", reason))?;
        let mut namespaces = std::collections::BTreeMap::<String, Vec<Glob>>::new();
        for entry in &self.roles.namespace_allowed_roles {
            let (namespace, glob) = entry
                .split_once('=')
                .filter(|(ns, _)| is_namespace_name(ns))
                .ok_or_else(|| {
                    invalid(
                        "namespace-allowed-roles",
                        format!(
                            "{entry:?}: give <namespace>=<glob>, a Kubernetes namespace name \
                             (lowercase letters, digits, '-'; at most 63) and a glob on role ARNs"
                        ),
                    )
                })?;
            let glob = Glob::parse(glob).map_err(|reason| {
                invalid("namespace-allowed-roles", format!("{entry:?}: {reason}"))
            })?;
            namespaces
                .entry(namespace.to_owned())
                .or_default()
                .push(glob);
        }
        let policy = roles::Policy {
            prefix,
            allowed,
            default_role,
            namespaces,
        };
        if let Some(default) = &policy.default_role {
            policy
                .arn_for(default)
                .map_err(|e| invalid("default-role", e.to_string()))?;
        }
        for (key, socket) in [
            ("docker-host", &self.docker_host),
            ("cri-endpoint", &self.cri_endpoint),
        ] {
            if let Some(socket) = socket
                && !socket.starts_with("unix://")
            {
                return Err(invalid(
                    key,
                    format!("{socket:?}: only unix:// sockets are supported"),
                ));
            }
        }
        if self.limits.header_timeout < Duration::from_millis(100)
            || self.limits.header_timeout > Duration::from_secs(300)
        {
            return Err(invalid("header-timeout", "give 100ms–300s"));
        }
        if !(self.limits.requests_per_second.is_finite() && self.limits.requests_per_second > 0.0) {
            return Err(invalid("requests-per-second", "must be a positive number"));
        }
        if !(self.limits.request_burst.is_finite() && self.limits.request_burst >= 1.0) {
            return Err(invalid("request-burst", "must be at least 1"));
        }
        if self.imds.upstream_concurrency == 0 {
            return Err(invalid("upstream-concurrency", "must be at least 1"));
        }
        if self.imds.metadata_cache_ttl > Duration::from_secs(3600) {
            return Err(invalid("metadata-cache-ttl", "at most 1h"));
        }
        if self.limits.max_connections == 0 {
            return Err(invalid("max-connections", "must be at least 1"));
        }
        if self.limits.max_connections_per_caller == 0
            || self.limits.max_connections_per_caller > self.limits.max_connections
        {
            return Err(invalid(
                "max-connections-per-caller",
                format!(
                    "must be 1–{} (--max-connections)",
                    self.limits.max_connections
                ),
            ));
        }
        if self.network.interface.is_empty() || self.network.interface.len() > 15 {
            return Err(invalid("interface", "interface names are 1–15 characters"));
        }
        let hosts = imds_policy::cgroups::HostCgroups::parse(
            self.redirect.host_cgroups.iter().map(String::as_str),
        )
        .map_err(|reason| invalid("host-cgroup", reason))?;
        Ok(Config {
            hosts,
            roles: policy,
            listen,
            mode,
            args: self,
        })
    }
}

/// One line from a clap error, with the key it is about. `--help` prints and exits here.
fn clap_error(err: &clap::Error) -> ConfigError {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if matches!(
        err.kind(),
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
    ) {
        err.exit();
    }
    let key = match err.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(arg)) => arg
            .split_whitespace()
            .next()
            .unwrap_or(arg)
            .trim_start_matches('-')
            .to_owned(),
        _ => "command line".to_owned(),
    };
    let text = err.to_string();
    let reason = text
        .lines()
        .next()
        .unwrap_or_default()
        .trim_start_matches("error: ")
        .to_owned();
    ConfigError { key, reason }
}

/// The file's settings as command-line arguments, for the keys not set by flag or environment.
fn file_args(path: &Path, matches: &ArgMatches) -> Result<Vec<OsString>, ConfigError> {
    let key = format!("config ({})", path.display());
    let text = std::fs::read_to_string(path).map_err(|e| invalid(&key, e.to_string()))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| invalid(&key, e.message().to_owned()))?;
    let command = RunArgs::command();
    let mut args = Vec::new();
    for (name, value) in table {
        let Some(arg) = command
            .get_arguments()
            .find(|a| a.get_long() == Some(name.as_str()))
        else {
            return Err(invalid(&name, format!("unknown key in {}", path.display())));
        };
        if name == "config" {
            return Err(invalid(&name, "a config file cannot name another"));
        }
        let id = arg.get_id().as_str();
        if matches!(
            matches.value_source(id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        ) {
            continue; // a flag or the environment set it: they win
        }
        let flag = format!("--{name}");
        let scalar = |v: &toml::Value| -> Result<String, ConfigError> {
            match v {
                toml::Value::String(s) => Ok(s.clone()),
                toml::Value::Integer(i) => Ok(i.to_string()),
                other => Err(invalid(
                    &name,
                    format!("expected a string or a number, found {}", other.type_str()),
                )),
            }
        };
        match &value {
            // A switch that takes a value (`--require-imdsv2=false`) is given it either way.
            toml::Value::Boolean(b) if arg.get_num_args().is_some_and(|n| n.max_values() > 0) => {
                args.push(format!("{flag}={b}").into());
            }
            toml::Value::Boolean(true) => args.push(flag.into()),
            toml::Value::Boolean(false) => {}
            toml::Value::Array(items) => {
                for item in items {
                    args.push(flag.clone().into());
                    args.push(scalar(item)?.into());
                }
            }
            other => {
                args.push(flag.into());
                args.push(scalar(other)?.into());
            }
        }
    }
    Ok(args)
}

fn check_url(key: &str, url: &str) -> Result<(), ConfigError> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| invalid(key, format!("{url:?} is not an http:// or https:// URL")))?;
    if rest.is_empty() || rest.starts_with('/') {
        return Err(invalid(key, format!("{url:?} has no host")));
    }
    Ok(())
}

fn check_http_url(key: &str, url: &str) -> Result<(), ConfigError> {
    check_url(key, url)?;
    if !url.starts_with("http://") {
        return Err(invalid(key, format!("{url:?}: IMDS is plain http://")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tests read the process environment, and one of them sets it: one at a time.
    static ENV: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn parse(args: &[&str]) -> Result<Config, ConfigError> {
        RunArgs::parse_layered(args.iter().copied()).and_then(RunArgs::validate)
    }

    #[test]
    fn defaults_are_documented_values() {
        let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
        let c = parse(&[]).unwrap().args;
        assert_eq!(c.network.ops_listen.to_string(), "127.0.0.1:9181");
        assert_eq!(c.imds.upstream, "http://169.254.169.254");
        assert_eq!(c.sts.session_duration, 3600);
        assert_eq!(c.sts.refresh_before, Duration::from_secs(300));
        assert!(
            c.imds.require_imdsv2.is_none() && !c.imds.allow_user_data,
            "IMDSv2 as upstream"
        );
        assert_eq!(c.network.listen.len(), 2);
    }

    #[test]
    fn errors_name_the_key() {
        let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
        let err = |args: &[&str]| parse(args).unwrap_err();
        assert_eq!(err(&["--session-duration", "60"]).key, "session-duration");
        assert_eq!(err(&["--session-duration", "abc"]).key, "session-duration");
        assert_eq!(err(&["--refresh-before", "2h"]).key, "refresh-before");
        assert_eq!(err(&["--upstream", "ftp://x"]).key, "upstream");
        assert_eq!(
            err(&["--role-arn-prefix", "arn:aws:s3:::bucket"]).key,
            "role-arn-prefix"
        );
        assert_eq!(err(&["--allowed-roles", ""]).key, "allowed-roles");
        assert_eq!(err(&["--listen", "127.0.0.1:80"]).key, "listen");
        assert_eq!(err(&["--region", "US East"]).key, "region");
        assert_eq!(err(&["--docker-host", "tcp://x:2375"]).key, "docker-host");
        assert_eq!(err(&["--no-such-flag"]).key, "no-such-flag");
        // Netlink filters cannot be adopted by a restarted proxy: pinning needs TCX.
        let netlink_pin = err(&[
            "--mode",
            "tc",
            "--tc-attach",
            "netlink",
            "--pin",
            "/sys/fs/bpf/x",
        ]);
        assert_eq!(netlink_pin.key, "pin", "{netlink_pin}");
        assert_eq!(
            err(&["--mode", "tc", "--cgroup", "/sys/fs/cgroup"]).key,
            "cgroup"
        );
        assert_eq!(
            err(&["--container-iface", "docker0"]).key,
            "container-iface"
        );
        let outside = err(&[
            "--role-arn-prefix",
            "arn:aws:iam::123456789012:role/containers/",
            "--default-role",
            "arn:aws:iam::123456789012:role/admin",
        ]);
        assert_eq!(outside.key, "default-role");
        assert!(outside.reason.contains("not under"), "{outside}");
    }

    #[test]
    fn the_engine_socket_is_given_or_the_runtime_s_usual_one() {
        let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
        let args = |a: &[&str]| parse(a).unwrap().args;
        let none = |_: &str| false;
        let podman_only = |p: &str| p == "/run/podman/podman.sock";
        let containerd_only = |p: &str| p == "/run/containerd/containerd.sock";
        let crio_only = |p: &str| p == "/var/run/crio/crio.sock";
        let both = |_: &str| true;
        let docker = |s: &str| Ok((RuntimeApi::Docker, s.to_owned()));
        let cri = |s: &str| Ok((RuntimeApi::Cri, s.to_owned()));
        assert_eq!(
            args(&["--docker-host", "unix:///x.sock"]).engine_socket(none),
            docker("unix:///x.sock")
        );
        assert_eq!(
            args(&["--runtime", "podman"]).engine_socket(none),
            docker("unix:///run/podman/podman.sock")
        );
        assert_eq!(
            args(&["--runtime", "docker"]).engine_socket(none),
            docker("unix:///var/run/docker.sock")
        );
        // auto: Docker's first, then Podman's, then the CRI runtimes'; none is a clear error.
        assert_eq!(
            args(&[]).engine_socket(both),
            docker("unix:///var/run/docker.sock")
        );
        assert_eq!(
            args(&[]).engine_socket(podman_only),
            docker("unix:///run/podman/podman.sock")
        );
        assert_eq!(
            args(&[]).engine_socket(containerd_only),
            cri("unix:///run/containerd/containerd.sock")
        );
        let err = args(&[]).engine_socket(none).unwrap_err();
        assert_eq!(err.key, "runtime");
        assert!(err.reason.contains("/run/podman/podman.sock"), "{err}");
        assert!(err.reason.contains("crio.sock"), "{err}");
        // cri: the endpoint, else containerd's or CRI-O's usual socket.
        assert_eq!(
            args(&["--cri-endpoint", "unix:///c.sock"]).engine_socket(none),
            cri("unix:///c.sock")
        );
        assert_eq!(
            args(&["--runtime", "cri"]).engine_socket(crio_only),
            cri("unix:///var/run/crio/crio.sock")
        );
        assert_eq!(
            args(&["--runtime", "cri"])
                .engine_socket(none)
                .unwrap_err()
                .key,
            "runtime"
        );
        // One runtime at a time, and each flag for its own API.
        for (a, key) in [
            (
                &["--docker-host", "unix:///a", "--cri-endpoint", "unix:///b"][..],
                "cri-endpoint",
            ),
            (
                &["--runtime", "cri", "--docker-host", "unix:///a"],
                "docker-host",
            ),
            (
                &["--runtime", "docker", "--cri-endpoint", "unix:///b"],
                "cri-endpoint",
            ),
        ] {
            assert_eq!(args(a).engine_socket(both).unwrap_err().key, key, "{a:?}");
        }
        assert_eq!(
            parse(&["--cri-endpoint", "/run/containerd/containerd.sock"])
                .unwrap_err()
                .key,
            "cri-endpoint"
        );
        assert_eq!(parse(&["--runtime", "cri-o"]).unwrap_err().key, "runtime");
    }

    #[test]
    fn namespace_allowed_roles_are_namespace_equals_glob() {
        let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
        let c = parse(&[
            "--namespace-allowed-roles",
            "team-a=arn:aws:iam::*:role/a-*,team-a=arn:aws:iam::*:role/shared",
            "--namespace-allowed-roles",
            "team-b=*",
        ])
        .unwrap();
        assert_eq!(c.roles.namespaces.len(), 2);
        assert_eq!(c.roles.namespaces["team-a"].len(), 2);
        for bad in ["team-a", "=x", "Team=x", "-a=x", "a=", "a b=x"] {
            let err = parse(&[&format!("--namespace-allowed-roles={bad}")]).unwrap_err();
            assert_eq!(err.key, "namespace-allowed-roles", "{bad:?}");
        }
    }

    /// `deploy/systemd/config.toml` is a valid configuration as shipped, and so is its tc variant
    /// (the commented tc lines uncommented): pinned, with the prefix and the allow-list.
    #[test]
    fn the_shipped_config_file_is_valid() {
        let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
        let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/systemd/config.toml");
        let c = parse(&["--config", shipped]).unwrap().args;
        assert_eq!(
            c.redirect.pin.as_deref(),
            Some(std::path::Path::new("/sys/fs/bpf/imds-proxy"))
        );
        assert_eq!(
            c.roles.role_arn_prefix.as_deref(),
            Some("arn:aws:iam::123456789012:role/containers/")
        );
        assert_eq!(c.roles.allowed_roles.len(), 1);
        assert_eq!(c.redirect.mode, ModeName::Cgroup);

        let text = std::fs::read_to_string(shipped).unwrap();
        let tc_lines = ["# mode = \"tc\"", "# container-iface = [\"docker0\"]"];
        for line in tc_lines {
            assert!(text.contains(line), "the tc example: {line}");
        }
        let tc = tc_lines
            .iter()
            .fold(text.clone(), |t, line| t.replace(line, &line[2..]));
        let dir = std::env::temp_dir().join(format!("imds-proxy-shipped-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("config.toml");
        std::fs::write(&file, tc).unwrap();
        let c = parse(&["--config", file.to_str().unwrap()]).unwrap().args;
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(c.redirect.mode, ModeName::Tc);
        assert_eq!(c.redirect.container_ifaces, ["docker0"]);
    }

    #[test]
    fn flags_override_environment_override_file() {
        let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
        let dir = std::env::temp_dir().join(format!("imds-proxy-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("config.toml");
        std::fs::write(
            &file,
            "default-role = \"FromFile\"\nregion = \"eu-west-1\"\nsession-duration = 1800\n\
             role-arn-prefix = \"arn:aws:iam::123456789012:role/c/\"\n\
             require-imdsv2 = true\nallowed-roles = [\"arn:aws:iam::*:role/c/*\", \"arn:aws:iam::*:role/b\"]\n",
        )
        .unwrap();
        let file_arg = file.to_str().unwrap();
        // SAFETY: the ENV lock keeps every other test that reads the environment waiting.
        unsafe {
            std::env::set_var("IMDS_PROXY_REGION", "us-west-2");
            std::env::set_var("IMDS_PROXY_SESSION_DURATION", "2400");
        }
        let c = parse(&["--config", file_arg, "--session-duration", "1200"]);
        unsafe {
            std::env::remove_var("IMDS_PROXY_REGION");
            std::env::remove_var("IMDS_PROXY_SESSION_DURATION");
        }
        let c = c.unwrap().args;
        assert_eq!(
            c.roles.default_role.as_deref(),
            Some("FromFile"),
            "file only"
        );
        assert_eq!(c.sts.region.as_deref(), Some("us-west-2"), "env over file");
        assert_eq!(c.sts.session_duration, 1200, "flag over env and file");
        assert_eq!(c.imds.require_imdsv2, Some(true));
        assert_eq!(c.roles.allowed_roles.len(), 2);
        std::fs::write(&file, "require-imdsv2 = false\n").unwrap();
        let c = parse(&["--config", file_arg]).unwrap().args;
        assert_eq!(
            c.imds.require_imdsv2,
            Some(false),
            "false in a file is not the default"
        );
        assert_eq!(
            parse(&["--require-imdsv2"])
                .unwrap()
                .args
                .imds
                .require_imdsv2,
            Some(true)
        );
        assert_eq!(
            parse(&["--require-imdsv2", "false"])
                .unwrap()
                .args
                .imds
                .require_imdsv2,
            Some(false)
        );
        assert_eq!(
            parse(&["--require-imdsv2=maybe"]).unwrap_err().key,
            "require-imdsv2"
        );

        std::fs::write(&file, "defualt-role = \"typo\"\n").unwrap();
        let typo = parse(&["--config", file_arg]).unwrap_err();
        assert_eq!(typo.key, "defualt-role");
        std::fs::write(&file, "session-duration = [1]\n").unwrap();
        assert_eq!(
            parse(&["--config", file_arg]).unwrap_err().key,
            "session-duration"
        );
        std::fs::write(&file, "not toml = = =\n").unwrap();
        assert!(
            parse(&["--config", file_arg])
                .unwrap_err()
                .key
                .starts_with("config")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
