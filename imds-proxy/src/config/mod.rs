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
mod validate;
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

impl Runtime {
    /// The runtime's API and socket: `--docker-host` or `--cri-endpoint`, else the runtime's
    /// usual one, else (`auto`) the first usual one that `exists`.
    pub fn endpoint(&self, exists: impl Fn(&str) -> bool) -> Result<Endpoint, ConfigError> {
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
        match (self.name, &self.docker_host, &self.cri_endpoint) {
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

/// The validated configuration: what the flags mean, typed, one value per argument group, each
/// checked by its own group's `validate` ([`validate`]). Nothing raw is kept.
#[derive(Clone, Debug)]
pub struct Config {
    pub network: Network,
    pub redirect: Redirection,
    pub roles: Roles,
    pub runtime: Runtime,
    pub sts: Sts,
    pub imds: Imds,
    pub limits: Limits,
    pub log_format: LogFormat,
}

/// Where the proxy listens.
#[derive(Clone, Debug)]
pub struct Network {
    pub listen: Listen,
    pub ops_listen: SocketAddr,
    /// The listen interface's name (1–15 characters).
    pub interface: String,
}

/// How containers' IMDS traffic is intercepted.
#[derive(Clone, Debug)]
pub struct Redirection {
    pub mode: Mode,
    /// Which cgroups are the host's (filter mode).
    pub hosts: imds_policy::cgroups::HostCgroups,
    /// `--pin`: the links and maps stay attached across restarts, pinned here.
    pub pin: Option<PathBuf>,
}

/// Which role a container may have.
#[derive(Clone, Debug)]
pub struct Roles {
    pub policy: roles::Policy,
    /// `--trust-image-role`: role settings an image carries count as the container's own.
    pub trust_image_role: bool,
}

/// Which runtime's containers get roles, and where it is asked ([`Runtime::endpoint`]): chosen
/// when it answers, as `auto` takes the first usual socket that exists.
#[derive(Clone, Debug)]
pub struct Runtime {
    pub name: RuntimeName,
    /// `unix://` sockets only.
    pub docker_host: Option<String>,
    pub cri_endpoint: Option<String>,
    pub cri_poll: Duration,
}

/// How STS is called.
#[derive(Clone, Debug)]
pub struct Sts {
    /// An http(s) URL, or the SDK's own resolution.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// 900 s – 12 h.
    pub session_duration: Duration,
    /// Shorter than the session.
    pub refresh_before: Duration,
    /// 1 ms – 10 s.
    pub answer_within: Duration,
    /// Session tags and source identity, checked.
    pub tags: imds_policy::tags::Tags,
}

/// The IMDS API served.
#[derive(Clone, Debug)]
pub struct Imds {
    /// A plain http:// URL.
    pub upstream: String,
    /// `None`: follow the instance's `HttpTokens`.
    pub require_imdsv2: Option<bool>,
    /// At least 1.
    pub upstream_concurrency: usize,
    /// At most 1 h.
    pub metadata_cache_ttl: Duration,
    pub allow_user_data: bool,
    pub allow_identity_signatures: bool,
}

/// What one caller, and all of them, may use.
#[derive(Clone, Debug)]
pub struct Limits {
    /// 100 ms – 300 s.
    pub header_timeout: Duration,
    /// At least 1.
    pub max_connections: usize,
    /// 1 – `max_connections`.
    pub max_connections_per_caller: usize,
    /// Positive.
    pub requests_per_second: f64,
    /// At least 1.
    pub request_burst: f64,
}

/// The dedicated listen addresses: one IPv4, at most one IPv6.
#[derive(Clone, Copy, Debug)]
pub struct Listen {
    pub v4: SocketAddrV4,
    pub v6: Option<SocketAddrV6>,
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.v4)?;
        match self.v6 {
            Some(v6) => write!(f, ", {v6}"),
            None => Ok(()),
        }
    }
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

#[cfg(test)]
mod tests;
