//! `imds-proxy explain`: why a workload gets the credentials it gets, or none, in plain words.
//!
//! Contract: [`facts`] gathers, for each container an operator names (an id or a prefix, a
//! name, or `<namespace>/<pod>`), what the running proxy would do with a credentials request
//! from it now: the container and cgroup it knows, the rule that names its role (or why none),
//! whether the allow-lists accept it, the session name, tags and source identity, what the cache
//! holds, and STS's state; [`render`] turns that into text, a pure function unit-tested for each
//! branch. Nothing here changes state: no STS call, no cache entry made.
//!
//! The ops listener serves it (`/explain?who=`) only to a caller that presents the token the
//! proxy wrote at start to a root-only file ([`Token`]): the listener is on the host's loopback,
//! which containers on the host's network share, and what a pod's role and tags are is not
//! theirs to read.
use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use crate::{
    credentials::{self, Cache, Failure, KeyStatus, Refusal, breaker},
    roles::{self, Policy, Resolved, RoleError},
    runtime::Container,
};

/// What the proxy knows and would do for one container.
pub struct Facts {
    pub container: Arc<Container>,
    /// Whether callers are known by their cgroup (cgroup mode): a pod's containers then have
    /// roles of their own.
    pub told_apart: bool,
    pub role: Result<Option<Resolved>, RoleError>,
    pub key: Option<credentials::Key>,
    pub cache: Option<KeyStatus>,
    pub breaker: breaker::Status,
    pub now: SystemTime,
}

/// The verdict: whether a credentials request from it would be served now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Its role's session is cached, or STS would be asked and nothing says it will fail.
    Served,
    /// No role, or a role the rules refuse.
    NoRole,
    /// A role, but STS refused it or is failing: no credentials until that changes.
    Failing,
}

impl Verdict {
    pub fn word(self) -> &'static str {
        match self {
            Verdict::Served => "served",
            Verdict::NoRole => "no-role",
            Verdict::Failing => "failing",
        }
    }
}

/// The facts for every container `who` names.
pub fn facts(
    who: &str,
    index: &crate::runtime::Index,
    policy: &Policy,
    cache: &Cache,
    told_apart: bool,
) -> Vec<Facts> {
    index
        .find(who)
        .into_iter()
        .map(|container| {
            let role = policy.resolve_for(container.subject(told_apart));
            let key = match &role {
                Ok(Some(role)) => Some(cache.key(&container, role)),
                _ => None,
            };
            Facts {
                cache: key.as_ref().and_then(|k| cache.status(k)),
                key,
                role,
                told_apart,
                breaker: cache.breaker(),
                now: SystemTime::now(),
                container,
            }
        })
        .collect()
}

/// The explanation of one container, and its verdict.
pub fn render(f: &Facts) -> (Verdict, String) {
    let mut out = String::new();
    describe_container(&mut out, &f.container);
    let verdict = match &f.role {
        Ok(None) => {
            let _ = writeln!(
                out,
                "role: none: {}",
                why_no_role(&f.container, f.told_apart)
            );
            Verdict::NoRole
        }
        Err(err) => {
            let _ = writeln!(out, "role: refused: {}", role_error_in_words(err));
            Verdict::NoRole
        }
        Ok(Some(role)) => {
            let _ = writeln!(out, "role: {} (from {})", role.arn, role.source.describe());
            let _ = writeln!(
                out,
                "allowed: yes (--role-arn-prefix, --allowed-roles and the namespace's allow-list \
                 accept it)"
            );
            if let Some(key) = &f.key {
                describe_session(&mut out, key);
            }
            describe_cache(&mut out, f)
        }
    };
    let _ = writeln!(out, "sts: {}", breaker_in_words(f.breaker));
    let _ = writeln!(
        out,
        "verdict: {}",
        match verdict {
            Verdict::Served => "a credentials request from it is served",
            Verdict::NoRole => "a credentials request from it gets 404 (no role)",
            Verdict::Failing => "a credentials request from it gets 503 until STS serves the role",
        }
    );
    (verdict, out)
}

fn describe_container(out: &mut String, c: &Container) {
    let _ = writeln!(out, "container: {} ({})", c.id, c.name);
    if let Some(pod) = &c.pod {
        let _ = writeln!(
            out,
            "pod: {}/{} (uid {}), container {:?} in it",
            pod.namespace, pod.name, pod.uid, pod.container
        );
    }
    let addresses: Vec<String> = c.addresses.iter().map(ToString::to_string).collect();
    let _ = writeln!(
        out,
        "cgroup: {} | addresses: {} | running: {}",
        if c.cgroup.is_empty() { "-" } else { &c.cgroup },
        if addresses.is_empty() {
            "-".to_owned()
        } else {
            addresses.join(", ")
        },
        if c.running { "yes" } else { "no" }
    );
}

/// Why a container has no role, when the rules found none.
fn why_no_role(c: &Container, told_apart: bool) -> String {
    match &c.pod {
        Some(pod) => {
            let own = roles::container_role_key(&pod.container);
            if told_apart && c.labels.get(&own).map(|v| v.trim()) == Some(roles::NO_ROLE) {
                format!("pod annotation {own} is {}", roles::NO_ROLE)
            } else {
                format!(
                    "the pod has no annotation {} (nor {own}) and there is no --default-role",
                    roles::ROLE_LABEL
                )
            }
        }
        None => format!(
            "no label {}, no {} in its environment, and no --default-role",
            roles::ROLE_LABEL,
            roles::ROLE_ENV
        ),
    }
}

fn role_error_in_words(err: &RoleError) -> String {
    match err {
        RoleError::NotAllowed(arn) => {
            format!("{arn} is not matched by any --allowed-roles glob")
        }
        RoleError::NotAllowedInNamespace { arn, namespace } => format!(
            "{arn} is not among the roles namespace {namespace:?} may assume \
             (--namespace-allowed-roles)"
        ),
        other => other.to_string(),
    }
}

fn describe_session(out: &mut String, key: &credentials::Key) {
    let _ = writeln!(out, "session name: {}", key.session_name);
    let tags: Vec<String> = key.tags.tags.iter().map(ToString::to_string).collect();
    let _ = writeln!(
        out,
        "session tags: {}",
        if tags.is_empty() {
            "none".to_owned()
        } else {
            tags.join(", ")
        }
    );
    if !key.tags.transitive.is_empty() {
        let _ = writeln!(
            out,
            "transitive tag keys: {}",
            key.tags.transitive.join(", ")
        );
    }
    if let Some(identity) = &key.tags.source_identity {
        let _ = writeln!(out, "source identity: {identity}");
    }
}

/// What the cache holds for the role, and the verdict that follows.
fn describe_cache(out: &mut String, f: &Facts) -> Verdict {
    let Some(status) = &f.cache else {
        let _ = writeln!(
            out,
            "cache: nothing yet: its next credentials request makes the STS call"
        );
        return match f.breaker {
            breaker::Status::Open { .. } => Verdict::Failing,
            _ => Verdict::Served,
        };
    };
    let valid = match &status.session {
        Some(s) if !s.expired => {
            let left = s.expiration.duration_since(f.now).unwrap_or_default();
            let _ = writeln!(
                out,
                "cache: a session ({}) valid until {} (in {}){}",
                s.access_key_id,
                crate::imds::rfc3339(s.expiration),
                humantime::format_duration(whole_seconds(left)),
                if s.due { "; a refresh is due" } else { "" }
            );
            true
        }
        Some(s) => {
            let _ = writeln!(
                out,
                "cache: its session ({}) expired at {}",
                s.access_key_id,
                crate::imds::rfc3339(s.expiration)
            );
            false
        }
        None => {
            let _ = writeln!(out, "cache: no session");
            false
        }
    };
    if status.calling {
        let _ = writeln!(out, "an STS call for it is under way");
    }
    match &status.failure {
        Some(failure) => {
            let _ = writeln!(
                out,
                "last STS call failed ({} in a row): {}",
                failure.in_a_row,
                sts_error_in_words(&failure.error)
            );
            let _ = writeln!(
                out,
                "next call: {}",
                if failure.retry_in.is_zero() {
                    "with its next request".to_owned()
                } else {
                    format!(
                        "not before {} from now",
                        humantime::format_duration(whole_seconds(failure.retry_in))
                    )
                }
            );
            if valid {
                Verdict::Served
            } else {
                Verdict::Failing
            }
        }
        None if valid || !matches!(f.breaker, breaker::Status::Open { .. }) => Verdict::Served,
        None => Verdict::Failing,
    }
}

/// Rounded up to whole seconds (a wait is never said shorter than it is).
fn whole_seconds(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs() + u64::from(d.subsec_nanos() > 0))
}

/// An STS failure in the words an operator acts on.
pub fn sts_error_in_words(err: &credentials::Error) -> String {
    match err {
        credentials::Error::Sts {
            failure: Failure::Refused(Refusal::SessionTags | Refusal::SourceIdentity),
            message,
            ..
        } => {
            // Already in words, with the way out (`Refusal::way_out`).
            message.clone()
        }
        credentials::Error::Sts {
            failure: Failure::Refused(Refusal::Role),
            message,
            ..
        } => {
            if message.contains("not authorized to perform: sts:AssumeRole")
                || message.starts_with("AccessDenied")
            {
                format!(
                    "STS refused: the role does not exist, or its trust policy does not allow the \
                     instance's role to assume it (STS does not say which: check both in IAM) \
                     ({message})"
                )
            } else if message.starts_with("ValidationError") {
                format!(
                    "STS found the request invalid (the role ARN, the session name or a tag) \
                     ({message})"
                )
            } else if message.starts_with("RegionDisabled") {
                format!("STS is not activated in this region ({message})")
            } else if message.starts_with("ExpiredToken") || message.starts_with("InvalidClient") {
                format!("STS refused the instance's own credentials ({message})")
            } else {
                format!("STS refused the role ({message})")
            }
        }
        credentials::Error::Sts {
            failure: Failure::Unavailable,
            message,
            ..
        } => {
            if message.contains("Throttl") || message.contains("RequestLimitExceeded") {
                format!("STS throttled the call: too many requests ({message})")
            } else {
                format!(
                    "STS could not be reached or failed on its side, or the instance's \
                     credentials could not be loaded ({message})"
                )
            }
        }
        credentials::Error::Sts {
            failure: Failure::TimedOut,
            message,
            ..
        } => format!("STS did not answer in time ({message})"),
        credentials::Error::BreakerOpen { failures, .. } => {
            format!("no call made: STS failed {failures} calls in a row and the breaker is open")
        }
        credentials::Error::Pending { .. } => "a call was still under way".to_owned(),
    }
}

fn breaker_in_words(status: breaker::Status) -> String {
    match status {
        breaker::Status::Closed => "answering".to_owned(),
        breaker::Status::HalfOpen => {
            "failing before; the next call is a trial that decides".to_owned()
        }
        breaker::Status::Open { failures } => format!(
            "not answering: {failures} calls failed in a row, the breaker is open (roles not \
             cached get 503 with no call until a trial succeeds)"
        ),
    }
}

/// The secret a caller of `/explain` presents, written at start to a file only root reads.
pub struct Token {
    value: String,
    path: PathBuf,
}

/// Where the token of the ops listener on `port` is written.
pub fn token_path(port: u16) -> PathBuf {
    PathBuf::from(format!("/run/imds-proxy/explain-{port}.token"))
}

/// The header that carries it.
pub const TOKEN_HEADER: &str = "x-imds-proxy-explain-token";
/// The header `/explain` reads the container from, and the one it answers its verdict in.
pub const WHO_HEADER: &str = "x-imds-proxy-explain-who";
pub const VERDICT_HEADER: &str = "x-imds-proxy-verdict";

impl Token {
    /// A new random token, written to `path` (its directory made root-only).
    pub fn write(path: &Path) -> std::io::Result<Self> {
        use rand::RngCore as _;
        use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        let value: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        if let Some(dir) = path.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        }
        let _ = std::fs::remove_file(path);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)?;
        std::io::Write::write_all(&mut file, value.as_bytes())?;
        Ok(Self {
            value,
            path: path.to_owned(),
        })
    }

    /// Whether `presented` is the token (compared in constant time).
    pub fn accepts(&self, presented: &[u8]) -> bool {
        presented.len() == self.value.len()
            && presented
                .iter()
                .zip(self.value.as_bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }
}

impl Drop for Token {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests;
