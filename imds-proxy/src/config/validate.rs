//! Each argument group checks its own settings and gives its typed value; [`RunArgs::validate`]
//! puts them together. The first problem is the error, naming its key; nothing is attached before.
use super::*;

impl RunArgs {
    /// Check every setting, group by group; the first problem, naming its key.
    pub fn validate(self) -> Result<Config, ConfigError> {
        let network = self.network.validate()?;
        let redirect = self.redirect.validate()?;
        let roles = self.roles.validate()?;
        let sts = self.sts.validate()?;
        let imds = self.imds.validate()?;
        let limits = self.limits.validate()?;
        let runtime = Runtime {
            name: self.runtime,
            docker_host: unix_socket("docker-host", self.docker_host)?,
            cri_endpoint: unix_socket("cri-endpoint", self.cri_endpoint)?,
            cri_poll: self.cri_poll,
        };
        // A conflict between the runtime flags is the operator's to fix: said now, not waited on.
        runtime.endpoint(|_| true)?;
        Ok(Config {
            network,
            redirect,
            roles,
            runtime,
            sts,
            imds,
            limits,
            log_format: self.log_format,
        })
    }
}

impl NetworkArgs {
    fn validate(self) -> Result<Network, ConfigError> {
        let (mut v4, mut v6): (Vec<SocketAddrV4>, Vec<SocketAddrV6>) = (Vec::new(), Vec::new());
        for addr in &self.listen {
            if addr.ip().is_unspecified() || addr.ip().is_loopback() {
                return Err(invalid(
                    "listen",
                    format!(
                        "{addr} cannot be a dedicated listen address (use a link-local or ULA \
                         address of its own)"
                    ),
                ));
            }
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
        if self.interface.is_empty() || self.interface.len() > 15 {
            return Err(invalid("interface", "interface names are 1–15 characters"));
        }
        Ok(Network {
            listen,
            ops_listen: self.ops_listen,
            interface: self.interface,
        })
    }
}

impl RedirectArgs {
    fn validate(self) -> Result<Redirection, ConfigError> {
        let mode = match self.mode {
            ModeName::Cgroup => self.cgroup_mode()?,
            ModeName::Tc => self.tc_mode()?,
        };
        let hosts =
            imds_policy::cgroups::HostCgroups::parse(self.host_cgroups.iter().map(String::as_str))
                .map_err(|reason| invalid("host-cgroup", reason))?;
        Ok(Redirection {
            mode,
            hosts,
            pin: self.pin,
        })
    }

    fn cgroup_mode(&self) -> Result<Mode, ConfigError> {
        if !self.container_ifaces.is_empty() {
            return Err(invalid("container-iface", "applies to --mode tc only"));
        }
        if !self.tc_static_sources.is_empty() {
            return Err(invalid("tc-static-source", "applies to --mode tc only"));
        }
        Ok(Mode::Cgroup {
            cgroups: self.cgroups.clone(),
            filter: self.cgroup_filter,
        })
    }

    fn tc_mode(&self) -> Result<Mode, ConfigError> {
        if !self.cgroups.is_empty() || self.cgroup_filter {
            let key = if self.cgroup_filter {
                "cgroup-filter"
            } else {
                "cgroup"
            };
            return Err(invalid(key, "applies to --mode cgroup only"));
        }
        if let Some(bad) = self.container_ifaces.iter().find(|p| p.ends_with('+')) {
            // kube2iam's and kiam's `--host-interface eni+` is iptables' wildcard.
            return Err(invalid(
                "container-iface",
                format!(
                    "{bad:?}: '+' is iptables' wildcard; here it is '*' ({:?})",
                    format!("{}*", bad.trim_end_matches('+'))
                ),
            ));
        }
        if let Some(bad) = self.container_ifaces.iter().find(|p| !valid_pattern(p)) {
            return Err(invalid(
                "container-iface",
                format!(
                    "{bad:?} is not an interface name or pattern (at most 15 characters, no \
                     spaces, '/' or ':')"
                ),
            ));
        }
        let static_sources = self
            .tc_static_sources
            .iter()
            .map(|source| parse_static_source(source))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|reason| invalid("tc-static-source", reason))?;
        let attach = self.tc_attach.resolve();
        if self.pin.is_some() && attach != TcAttach::Tcx {
            return Err(invalid(
                "pin",
                "pinning in tc mode needs TCX links (--tc-attach tcx, or auto on kernel 6.6+)",
            ));
        }
        Ok(Mode::Tc {
            interfaces: if self.container_ifaces.is_empty() {
                vec!["docker0".to_owned()]
            } else {
                self.container_ifaces.clone()
            },
            attach,
            static_sources,
        })
    }
}

impl RoleArgs {
    fn validate(self) -> Result<Roles, ConfigError> {
        let prefix = self
            .role_arn_prefix
            .as_deref()
            .map(roles::ArnPrefix::parse)
            .transpose()
            .map_err(|reason| invalid("role-arn-prefix", reason))?;
        let allowed = self
            .allowed_roles
            .iter()
            .map(|g| Glob::parse(g))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|reason| invalid("allowed-roles", reason))?;
        let default_role = self
            .default_role
            .as_deref()
            .map(RoleName::parse)
            .transpose()
            .map_err(|reason| invalid("default-role", reason))?;
        let policy = roles::Policy {
            prefix,
            allowed,
            default_role,
            namespaces: namespace_allowed_roles(&self.namespace_allowed_roles)?,
        };
        if let Some(default) = &policy.default_role {
            policy
                .arn_for(default)
                .map_err(|e| invalid("default-role", e.to_string()))?;
        }
        Ok(Roles {
            policy,
            trust_image_role: self.trust_image_role,
        })
    }
}

/// `--namespace-allowed-roles`: `<namespace>=<glob>` entries, by namespace.
fn namespace_allowed_roles(
    entries: &[String],
) -> Result<std::collections::BTreeMap<String, Vec<Glob>>, ConfigError> {
    let mut namespaces = std::collections::BTreeMap::<String, Vec<Glob>>::new();
    for entry in entries {
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
        let glob = Glob::parse(glob)
            .map_err(|reason| invalid("namespace-allowed-roles", format!("{entry:?}: {reason}")))?;
        namespaces
            .entry(namespace.to_owned())
            .or_default()
            .push(glob);
    }
    Ok(namespaces)
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

impl StsArgs {
    fn validate(self) -> Result<Sts, ConfigError> {
        if let Some(endpoint) = &self.sts_endpoint {
            check_url("sts-endpoint", endpoint)?;
        }
        if let Some(region) = &self.region
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
        if !(900..=43_200).contains(&self.session_duration) {
            return Err(invalid(
                "session-duration",
                format!(
                    "{} is outside 900–43200 seconds (STS limits)",
                    self.session_duration
                ),
            ));
        }
        if self.answer_within.is_zero() || self.answer_within > Duration::from_secs(10) {
            return Err(invalid(
                "answer-within",
                format!(
                    "{} is not between 1ms and 10s",
                    humantime::format_duration(self.answer_within)
                ),
            ));
        }
        let session_duration = Duration::from_secs(self.session_duration.into());
        if self.refresh_before >= session_duration {
            return Err(invalid(
                "refresh-before",
                format!(
                    "{} is not shorter than the session duration ({} s)",
                    humantime::format_duration(self.refresh_before),
                    self.session_duration
                ),
            ));
        }
        let tags = self.tags()?;
        Ok(Sts {
            endpoint: self.sts_endpoint,
            region: self.region,
            session_duration,
            refresh_before: self.refresh_before,
            answer_within: self.answer_within,
            tags,
        })
    }

    /// The session tag settings: static tags and transitive keys are checked here, once.
    fn tags(&self) -> Result<imds_policy::tags::Tags, ConfigError> {
        use imds_policy::tags::{Tags, parse_static};
        let on = self.session_tags == OnOff::On;
        let any_tag_set = !self.session_tag.is_empty() || !self.transitive_tag_key.is_empty();
        if !on && any_tag_set {
            return Err(invalid(
                "session-tag",
                "session tags are off (--session-tags off): no --session-tag or \
                 --transitive-tag-key",
            ));
        }
        let mut tags = if on {
            let statics = self
                .session_tag
                .iter()
                .map(|arg| parse_static(arg))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| invalid("session-tag", e.to_string()))?;
            Tags::new(statics, self.transitive_tag_key.clone())
                .map_err(|e| invalid("session-tag", e.to_string()))?
        } else {
            Tags::off()
        };
        tags.source_identity = self.source_identity == OnOff::On;
        Ok(tags)
    }
}

impl ImdsArgs {
    fn validate(self) -> Result<Imds, ConfigError> {
        check_url("upstream", &self.upstream)?;
        if !self.upstream.starts_with("http://") {
            return Err(invalid(
                "upstream",
                format!("{:?}: IMDS is plain http://", self.upstream),
            ));
        }
        if self.upstream_concurrency == 0 {
            return Err(invalid("upstream-concurrency", "must be at least 1"));
        }
        if self.metadata_cache_ttl > Duration::from_secs(3600) {
            return Err(invalid("metadata-cache-ttl", "at most 1h"));
        }
        Ok(Imds {
            upstream: self.upstream,
            require_imdsv2: self.require_imdsv2,
            upstream_concurrency: self.upstream_concurrency,
            metadata_cache_ttl: self.metadata_cache_ttl,
            allow_user_data: self.allow_user_data,
            allow_identity_signatures: self.allow_identity_signatures,
        })
    }
}

impl LimitArgs {
    fn validate(self) -> Result<Limits, ConfigError> {
        if self.header_timeout < Duration::from_millis(100)
            || self.header_timeout > Duration::from_secs(300)
        {
            return Err(invalid("header-timeout", "give 100ms–300s"));
        }
        if !(self.requests_per_second.is_finite() && self.requests_per_second > 0.0) {
            return Err(invalid("requests-per-second", "must be a positive number"));
        }
        if !(self.request_burst.is_finite() && self.request_burst >= 1.0) {
            return Err(invalid("request-burst", "must be at least 1"));
        }
        if self.max_connections == 0 {
            return Err(invalid("max-connections", "must be at least 1"));
        }
        if self.max_connections_per_caller == 0
            || self.max_connections_per_caller > self.max_connections
        {
            return Err(invalid(
                "max-connections-per-caller",
                format!("must be 1–{} (--max-connections)", self.max_connections),
            ));
        }
        Ok(Limits {
            header_timeout: self.header_timeout,
            max_connections: self.max_connections,
            max_connections_per_caller: self.max_connections_per_caller,
            requests_per_second: self.requests_per_second,
            request_burst: self.request_burst,
        })
    }
}

/// A runtime socket: `unix://` only.
fn unix_socket(key: &str, socket: Option<String>) -> Result<Option<String>, ConfigError> {
    match socket {
        Some(socket) if !socket.starts_with("unix://") => Err(invalid(
            key,
            format!("{socket:?}: only unix:// sockets are supported"),
        )),
        socket => Ok(socket),
    }
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
