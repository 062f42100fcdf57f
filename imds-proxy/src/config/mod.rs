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

use crate::{
    roles::{self, Glob, RoleName},
    runtime::Endpoint,
};

mod args;
pub use args::*;

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
    pub fn engine_socket(&self, exists: impl Fn(&str) -> bool) -> Result<Endpoint, ConfigError> {
        let api = |runtime, socket: &str| match runtime {
            RuntimeName::Cri => Endpoint::Cri(socket.to_owned()),
            _ => Endpoint::DockerApi(socket.to_owned()),
        };
        let first_existing = |wanted: &dyn Fn(RuntimeName) -> bool| {
            RUNTIME_SOCKETS
                .iter()
                .filter(|(r, _)| wanted(*r))
                .find(|(_, socket)| exists(socket.trim_start_matches("unix://")))
                .map(|(r, socket)| api(*r, socket))
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
            (_, Some(host), None) => Ok(Endpoint::DockerApi(host.clone())),
            (_, None, Some(endpoint)) => Ok(Endpoint::Cri(endpoint.clone())),
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
            (runtime, None, None) => Ok(Endpoint::DockerApi(usual(runtime))),
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
        attach: TcAttach,
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
                    .find(|p| !valid_pattern(p))
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
                    .map(|source| parse_static_source(source))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|reason| invalid("tc-static-source", reason))?;
                let attach = self.redirect.tc_attach.resolve();
                if self.redirect.pin.is_some() && attach != TcAttach::Tcx {
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
mod tests;
