//! Which role a container gets.
//!
//! The label `iam.amazonaws.com/role`, else the env `IAM_ROLE` (ec2metaproxy / metadataproxy
//! compatibility), else `--default-role`, else none. A value is a role name, appended to
//! `--role-arn-prefix`, or a full ARN, which must lie under the prefix. Either must match
//! `--allowed-roles` when given. The instance's own role is never a container's: the proxy only
//! ever hands out sessions it assumed itself for the resolved ARN.
//!
//! A Kubernetes pod's container (CRI runtimes) names its role with the pod's annotation of the
//! same key, `iam.amazonaws.com/role` (kube2iam's); its namespace may further restrict the roles
//! it can take (`--namespace-allowed-roles`): once any namespace is listed, a pod in a namespace
//! not listed gets no role at all.
use std::fmt;

/// Container label naming the role.
pub const ROLE_LABEL: &str = "iam.amazonaws.com/role";
/// Optional container label with the external id for AssumeRole.
pub const EXTERNAL_ID_LABEL: &str = "iam.amazonaws.com/external-id";
/// Pod annotations giving one of its containers a role of its own:
/// `iam.amazonaws.com/role.<container name>` (cgroup mode only: only a cgroup tells a pod's
/// containers apart).
pub const CONTAINER_ROLE_PREFIX: &str = "iam.amazonaws.com/role.";
/// The value of a per-container annotation that gives its container no role at all (not the
/// pod's, not the default).
pub const NO_ROLE: &str = "none";

/// The pod annotation naming `container`'s own role.
pub fn container_role_key(container: &str) -> String {
    format!("{CONTAINER_ROLE_PREFIX}{container}")
}
/// Container environment variable naming the role.
pub const ROLE_ENV: &str = "IAM_ROLE";

/// What follows `arn:` in its five fields: partition, service, region, account, resource (the
/// resource keeps any further `:`); missing fields are empty.
fn arn_fields(rest: &str) -> (&str, &str, &str, &str, &str) {
    let mut parts = rest.splitn(5, ':');
    let mut next = || parts.next().unwrap_or_default();
    (next(), next(), next(), next(), next())
}

/// `arn:<partition>:iam::<12 digits>:role/<path>`, ending in `/`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArnPrefix(String);

impl ArnPrefix {
    pub fn parse(prefix: &str) -> Result<Self, String> {
        let rest = prefix
            .strip_prefix("arn:")
            .ok_or_else(|| format!("{prefix:?} does not start with arn:"))?;
        let (partition, service, region, account, resource) = arn_fields(rest);
        if partition.is_empty() || service != "iam" || !region.is_empty() {
            return Err(format!(
                "{prefix:?} is not an IAM role ARN prefix (arn:aws:iam::<account>:role/...)"
            ));
        }
        if account.len() != 12 || !account.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("{prefix:?}: the account must be 12 digits"));
        }
        if !resource.starts_with("role/") {
            return Err(format!("{prefix:?}: the resource must start with role/"));
        }
        let mut prefix = prefix.to_owned();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        Ok(Self(prefix))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A role as a container names it: a bare name or a full ARN.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RoleName {
    Name(String),
    Arn(String),
}

/// IAM's limits: a role name is 1–64 of `[A-Za-z0-9+=,.@_-]`; a path is at most 512 characters.
const MAX_NAME: usize = 64;
const MAX_PATH: usize = 512;

/// `[path/]name` as IAM spells a role after `role/`: path segments of visible ASCII, never empty,
/// `.` or `..`; a name in IAM's alphabet.
fn check_path_and_name(value: &str) -> Result<(), String> {
    let (path, name) = value.rsplit_once('/').unwrap_or(("", value));
    if name.is_empty()
        || name == "."
        || name == ".."
        || name.len() > MAX_NAME
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+=,.@_-".contains(&b))
    {
        return Err(format!(
            "{value:?}: a role name is 1–{MAX_NAME} letters, digits or +=,.@_-"
        ));
    }
    if path.len() + 2 > MAX_PATH {
        return Err(format!(
            "{value:?}: the role path is over {MAX_PATH} characters"
        ));
    }
    if !path.is_empty()
        && path.split('/').any(|seg| {
            seg.is_empty()
                || seg == "."
                || seg == ".."
                || !seg.bytes().all(|b| b.is_ascii_graphic())
        })
    {
        return Err(format!(
            "{value:?}: the role path has an empty, `.` or `..` segment or a character outside visible ASCII"
        ));
    }
    Ok(())
}

impl RoleName {
    /// A container's, or the operator's, role value. Surrounding white space is ignored; anything
    /// else outside IAM's grammar is refused before any use.
    pub fn parse(value: &str) -> Result<Self, String> {
        // Spaces around a value are a typo; any other white space or control character is refused.
        let value = value.trim_matches(' ');
        if value.len() > 2048 {
            return Err(format!("a role value of {} characters", value.len()));
        }
        if let Some(rest) = value.strip_prefix("arn:") {
            // arn:<partition>:iam::<account>:role/<path/>name
            let (partition, service, region, account, resource) = arn_fields(rest);
            let role = resource.strip_prefix("role/");
            if partition.is_empty()
                || partition.len() > 32
                || !partition
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b == b'-')
                || service != "iam"
                || !region.is_empty()
                || account.len() != 12
                || !account.bytes().all(|b| b.is_ascii_digit())
                || role.is_none()
            {
                return Err(format!(
                    "{value:?} is not a role ARN (arn:<partition>:iam::<12 digits>:role/<name>)"
                ));
            }
            check_path_and_name(role.unwrap_or_default())?;
            Ok(Self::Arn(value.to_owned()))
        } else {
            if value.starts_with('/') {
                return Err(format!("{value:?} is not a role name (no leading /)"));
            }
            check_path_and_name(value)?;
            Ok(Self::Name(value.to_owned()))
        }
    }
}

/// A `*`/`?` glob on ARNs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Glob(String);

impl Glob {
    pub fn parse(glob: &str) -> Result<Self, String> {
        if glob.trim().is_empty() {
            return Err("an empty pattern matches nothing".into());
        }
        Ok(Self(glob.trim().to_owned()))
    }

    pub fn matches(&self, text: &str) -> bool {
        wildcard_match(self.0.as_bytes(), text.as_bytes())
    }
}

/// `*` (any run, empty included) and `?` (any one byte) against `text`, in O(pattern × text) at
/// worst with no recursion: on a mismatch only the last `*` is moved on, one byte at a time. (A
/// backtracking matcher takes exponential time on patterns with several stars, and the proxy
/// matches container-supplied ARNs against operator globs.)
pub fn wildcard_match(pattern: &[u8], text: &[u8]) -> bool {
    wildcard_match_counted(pattern, text).0
}

/// [`wildcard_match`], and the steps it took (turns of its loop), which its tests bound.
fn wildcard_match_counted(pattern: &[u8], text: &[u8]) -> (bool, usize) {
    let (mut p, mut t) = (0, 0);
    let mut steps = 0;
    // Where the last `*` was, and the text position it is currently standing for up to.
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        steps += 1;
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(&c) if c == b'?' || c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match star {
                // Let the last star swallow one more byte and try again after it.
                Some((sp, st)) => {
                    star = Some((sp, st + 1));
                    p = sp + 1;
                    t = st + 1;
                }
                None => return (false, steps),
            },
        }
    }
    (pattern[p..].iter().all(|&c| c == b'*'), steps)
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RoleError {
    #[error("role {0:?} is a name but no --role-arn-prefix is configured")]
    NoPrefix(String),
    #[error("role {arn} is not under the role ARN prefix {prefix}")]
    OutsidePrefix { arn: String, prefix: String },
    #[error("role {0} is not in --allowed-roles")]
    NotAllowed(String),
    #[error("role {arn} is not allowed in namespace {namespace:?} (--namespace-allowed-roles)")]
    NotAllowedInNamespace { arn: String, namespace: String },
    #[error(
        "the pod gives its containers roles of their own (pod annotations \
         iam.amazonaws.com/role.<container>), which only cgroup mode can tell apart (in tc mode \
         its containers share the pod's address): no role for any of them"
    )]
    PerContainerNeedsCgroupMode,
    #[error("{source_name} value is invalid: {reason}")]
    Invalid {
        source_name: &'static str,
        reason: String,
    },
}

/// Where a container's role came from, for logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Label,
    /// A pod's annotation (CRI runtimes).
    Annotation,
    /// A pod's annotation for this one of its containers (cgroup mode).
    ContainerAnnotation,
    Env,
    Default,
}

impl Source {
    /// Where the role was named, in the words logs and errors use.
    pub fn describe(self) -> &'static str {
        match self {
            Source::Label => "label iam.amazonaws.com/role",
            Source::Annotation => "pod annotation iam.amazonaws.com/role",
            Source::ContainerAnnotation => "pod annotation iam.amazonaws.com/role.<container>",
            Source::Env => "env IAM_ROLE",
            Source::Default => "--default-role",
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe())
    }
}

/// A container's resolved role.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    pub arn: String,
    /// The last path segment of the ARN: what IMDS lists under security-credentials/.
    pub name: String,
    pub source: Source,
    pub external_id: Option<String>,
}

/// The operator's rules.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    pub prefix: Option<ArnPrefix>,
    pub allowed: Vec<Glob>,
    pub default_role: Option<RoleName>,
    /// Per Kubernetes namespace, the globs its pods' roles must match. Empty: no per-namespace
    /// restriction. Not empty: a pod in a namespace not listed gets no role.
    pub namespaces: std::collections::BTreeMap<String, Vec<Glob>>,
}

/// Whose settings are resolved: a container's labels and environment, or a pod's annotations.
#[derive(Clone, Copy, Debug)]
pub enum Subject<'a> {
    /// A container of a Docker-API engine (Docker, Podman).
    Container {
        labels: &'a std::collections::HashMap<String, String>,
        env: &'a [String],
    },
    /// A Kubernetes pod's container: the pod's annotations, its namespace, and which of its
    /// containers asks, when that can be told.
    Pod {
        annotations: &'a std::collections::HashMap<String, String>,
        namespace: &'a str,
        container: InPod<'a>,
    },
}

/// Which of a pod's containers is asking.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InPod<'a> {
    /// This one, by its name in the pod (the kernel's record names its cgroup).
    Named(&'a str),
    /// Any of them (identified by the pod's address, which they share): a pod that gives its
    /// containers roles of their own gets none.
    Unknown,
}

impl Policy {
    /// The ARN a role name stands for under these rules.
    pub fn arn_for(&self, role: &RoleName) -> Result<String, RoleError> {
        let arn = match role {
            RoleName::Name(name) => {
                let prefix = self
                    .prefix
                    .as_ref()
                    .ok_or_else(|| RoleError::NoPrefix(name.clone()))?;
                format!("{}{name}", prefix.as_str())
            }
            RoleName::Arn(arn) => {
                if let Some(prefix) = &self.prefix
                    && !arn.starts_with(prefix.as_str())
                {
                    return Err(RoleError::OutsidePrefix {
                        arn: arn.clone(),
                        prefix: prefix.as_str().to_owned(),
                    });
                }
                arn.clone()
            }
        };
        if !self.allowed.is_empty() && !self.allowed.iter().any(|g| g.matches(&arn)) {
            return Err(RoleError::NotAllowed(arn));
        }
        Ok(arn)
    }

    /// The role of a container with these labels and environment; `Ok(None)` when it has none.
    pub fn resolve(
        &self,
        labels: &std::collections::HashMap<String, String>,
        env: &[String],
    ) -> Result<Option<Resolved>, RoleError> {
        self.resolve_for(Subject::Container { labels, env })
    }

    /// The role of a container or a pod; `Ok(None)` when it has none.
    pub fn resolve_for(&self, subject: Subject<'_>) -> Result<Option<Resolved>, RoleError> {
        let (labels, env, namespace, own) = match subject {
            Subject::Container { labels, env } => (labels, env, None, None),
            // A pod's role is its annotation's, or its container's own; its containers'
            // environment is not read.
            Subject::Pod {
                annotations,
                namespace,
                container,
            } => {
                let own = match container {
                    InPod::Named(name) => annotations
                        .get(&container_role_key(name))
                        .map(|v| v.trim())
                        .filter(|v| !v.is_empty()),
                    InPod::Unknown
                        if annotations
                            .keys()
                            .any(|k| k.starts_with(CONTAINER_ROLE_PREFIX)) =>
                    {
                        return Err(RoleError::PerContainerNeedsCgroupMode);
                    }
                    InPod::Unknown => None,
                };
                if own == Some(NO_ROLE) {
                    return Ok(None);
                }
                (annotations, &[][..], Some(namespace), own)
            }
        };
        let from_env = env
            .iter()
            .find_map(|e| e.strip_prefix(&format!("{ROLE_ENV}=")))
            .filter(|v| !v.trim().is_empty());
        let named = match (own, namespace) {
            (Some(own), _) => Some((own, Source::ContainerAnnotation)),
            (None, Some(_)) => labels
                .get(ROLE_LABEL)
                .filter(|v| !v.trim().is_empty())
                .map(|v| (v.as_str(), Source::Annotation)),
            (None, None) => labels
                .get(ROLE_LABEL)
                .filter(|v| !v.trim().is_empty())
                .map(|v| (v.as_str(), Source::Label)),
        };
        let (role, source) = match (named, from_env) {
            (Some((value, source)), _) => (
                RoleName::parse(value).map_err(|reason| RoleError::Invalid {
                    source_name: source.describe(),
                    reason,
                })?,
                source,
            ),
            (None, Some(env)) => (
                RoleName::parse(env).map_err(|reason| RoleError::Invalid {
                    source_name: "env IAM_ROLE",
                    reason,
                })?,
                Source::Env,
            ),
            (None, None) => match &self.default_role {
                Some(role) => (role.clone(), Source::Default),
                None => return Ok(None),
            },
        };
        let external_id = match labels.get(EXTERNAL_ID_LABEL).filter(|v| !v.is_empty()) {
            Some(id) => Some(check_external_id(id).map_err(|reason| RoleError::Invalid {
                source_name: "label iam.amazonaws.com/external-id",
                reason,
            })?),
            None => None,
        };
        let arn = self.arn_for(&role)?;
        if let Some(namespace) = namespace
            && !self.namespaces.is_empty()
            && !self
                .namespaces
                .get(namespace)
                .is_some_and(|globs| globs.iter().any(|g| g.matches(&arn)))
        {
            return Err(RoleError::NotAllowedInNamespace {
                arn,
                namespace: namespace.to_owned(),
            });
        }
        let name = arn.rsplit('/').next().unwrap_or(&arn).to_owned();
        Ok(Some(Resolved {
            name,
            arn,
            source,
            external_id,
        }))
    }
}

/// STS's ExternalId: 2–1224 characters of `[\w+=,.@:/-]`.
fn check_external_id(id: &str) -> Result<String, String> {
    if (2..=1224).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_+=,.@:/-".contains(&b))
    {
        Ok(id.to_owned())
    } else {
        Err(format!(
            "an external id is 2–1224 letters, digits or _+=,.@:/- ({} characters given)",
            id.len()
        ))
    }
}

/// A RoleSessionName from a container name (fallback: its id), within STS's rules: 2–64
/// characters of `[\w+=,.@-]`. Unique per container: a name longer than 64 characters (a pod in
/// a long namespace, a long Deployment name) keeps its first 55 and gets `-` and 8 hex digits
/// of a hash of the whole name and the container id, so two names that share their first 64
/// characters never share a session (nor its cache entry, its access key or CloudTrail's
/// attribution).
pub fn session_name(container_name: Option<&str>, container_id: &str) -> String {
    let clean = |s: &str| -> String {
        s.trim_start_matches('/')
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "_+=,.@-".contains(c) {
                    c
                } else {
                    '-'
                }
            })
            .collect()
    };
    let name = container_name.map(clean).unwrap_or_default();
    if name.len() > 64 {
        let hash = fnv1a(&[name.as_bytes(), b"/", container_id.as_bytes()]);
        return format!("{}-{hash:08x}", &name[..55]);
    }
    if name.len() >= 2 {
        name
    } else {
        let id: String = clean(container_id).chars().take(64).collect();
        if id.len() >= 2 {
            id
        } else {
            format!("container-{id}")
        }
    }
}

/// 32-bit FNV-1a over `parts`: stable across builds and releases (a session name must not change
/// when the proxy is upgraded).
fn fnv1a(parts: &[&[u8]]) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in parts.iter().flat_map(|p| p.iter()) {
        hash ^= u32::from(*byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const PREFIX: &str = "arn:aws:iam::123456789012:role/containers/";

    #[test]
    fn long_names_get_unique_sessions() {
        // Short names are the session as they are.
        assert_eq!(session_name(Some("/web-1"), "abc"), "web-1");
        let ns = "team-payments-production-eu-west-1";
        let a = format!("{ns}.checkout-api-deployment-7f9c8d6b5-x2x4z");
        let b = format!("{ns}.checkout-api-deployment-7f9c8d6b5-q8w7e");
        assert_eq!(
            a[..64],
            b[..64],
            "premise: the names share their first 64 characters"
        );
        let (sa, sb) = (
            session_name(Some(&a), "1111"),
            session_name(Some(&b), "2222"),
        );
        assert_ne!(sa, sb);
        for s in [&sa, &sb] {
            assert_eq!(s.len(), 64, "{s}");
            assert!(s.starts_with(&a[..55]), "{s}");
            assert!(
                s.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || b"_+=,.@-".contains(&c)),
                "{s}"
            );
        }
        // Two containers of one long-named pod: one session each; and the same container always
        // gets the same one.
        assert_ne!(
            session_name(Some(&a), "1111"),
            session_name(Some(&a), "3333")
        );
        assert_eq!(session_name(Some(&a), "1111"), sa);
    }

    fn policy(default: Option<&str>, allowed: &[&str]) -> Policy {
        Policy {
            prefix: Some(ArnPrefix::parse(PREFIX).unwrap()),
            allowed: allowed.iter().map(|g| Glob::parse(g).unwrap()).collect(),
            default_role: default.map(|d| RoleName::parse(d).unwrap()),
            namespaces: Default::default(),
        }
    }

    #[test]
    fn pods_take_their_annotation_within_their_namespace_s_globs() {
        let annotations = |role: &str| HashMap::from([(ROLE_LABEL.to_owned(), role.to_owned())]);
        let pod = |a, ns| Subject::Pod {
            annotations: a,
            namespace: ns,
            container: InPod::Unknown,
        };
        let mut p = policy(Some("Fallback"), &[]);
        // No namespace listed: no per-namespace restriction.
        let web = annotations("Web");
        let got = p.resolve_for(pod(&web, "team-a")).unwrap().unwrap();
        assert_eq!(got.arn, format!("{PREFIX}Web"));
        assert_eq!(got.source, Source::Annotation);
        // A pod's containers' IAM_ROLE is not read; without an annotation: the default.
        let none = HashMap::new();
        assert_eq!(
            p.resolve_for(pod(&none, "team-a")).unwrap().unwrap().source,
            Source::Default
        );
        p.namespaces.insert(
            "team-a".into(),
            vec![Glob::parse(&format!("{PREFIX}Web*")).unwrap()],
        );
        assert!(p.resolve_for(pod(&web, "team-a")).unwrap().is_some());
        // Another namespace's role, a namespace not listed, the default outside the globs.
        let db = annotations("Db");
        assert!(matches!(
            p.resolve_for(pod(&db, "team-a")),
            Err(RoleError::NotAllowedInNamespace { .. })
        ));
        assert!(matches!(
            p.resolve_for(pod(&web, "team-b")),
            Err(RoleError::NotAllowedInNamespace { .. })
        ));
        assert!(matches!(
            p.resolve_for(pod(&none, "team-a")),
            Err(RoleError::NotAllowedInNamespace { .. })
        ));
        // A Docker container is never restricted by namespaces.
        let env = vec!["IAM_ROLE=Db".to_owned()];
        assert!(p.resolve(&none, &env).unwrap().is_some());
    }

    /// A pod's container named by its cgroup takes its own annotation (`none`: no role, not the
    /// pod's, not the default), within the namespace's globs; the others the pod's. A caller that
    /// may be any of the pod's containers gets nothing from a pod that tells them apart.
    #[test]
    fn a_pod_s_containers_take_their_own_annotations_when_they_can_be_told_apart() {
        let mut p = policy(Some("Fallback"), &[]);
        p.namespaces.insert(
            "team-a".into(),
            vec![Glob::parse(&format!("{PREFIX}Web*")).unwrap()],
        );
        let annotations = labels(&[
            (ROLE_LABEL, "Web"),
            (&container_role_key("worker"), "WebWorker"),
            (&container_role_key("sidecar"), "none"),
            (&container_role_key("rogue"), "Db"),
        ]);
        let as_ = |container| {
            p.resolve_for(Subject::Pod {
                annotations: &annotations,
                namespace: "team-a",
                container,
            })
            .map(|r| r.map(|r| (r.name, r.source)))
        };
        assert_eq!(
            as_(InPod::Named("app")),
            Ok(Some(("Web".into(), Source::Annotation)))
        );
        assert_eq!(
            as_(InPod::Named("worker")),
            Ok(Some(("WebWorker".into(), Source::ContainerAnnotation)))
        );
        assert_eq!(as_(InPod::Named("sidecar")), Ok(None));
        assert!(matches!(
            as_(InPod::Named("rogue")),
            Err(RoleError::NotAllowedInNamespace { .. })
        ));
        assert_eq!(
            as_(InPod::Unknown),
            Err(RoleError::PerContainerNeedsCgroupMode)
        );
        // A pod that does not tell its containers apart is served by its address as before.
        let plain = labels(&[(ROLE_LABEL, "Web")]);
        assert!(
            p.resolve_for(Subject::Pod {
                annotations: &plain,
                namespace: "team-a",
                container: InPod::Unknown,
            })
            .unwrap()
            .is_some()
        );
    }

    fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn resolution_table() {
        let p = policy(Some("DefaultRole"), &[]);
        let arn = |r: Result<Option<Resolved>, RoleError>| r.map(|r| r.map(|r| (r.arn, r.source)));
        // Label wins over env, env over default.
        assert_eq!(
            arn(p.resolve(&labels(&[(ROLE_LABEL, "Web")]), &["IAM_ROLE=Env".into()])),
            Ok(Some((format!("{PREFIX}Web"), Source::Label)))
        );
        assert_eq!(
            arn(p.resolve(&labels(&[]), &["PATH=/bin".into(), "IAM_ROLE=Env".into()])),
            Ok(Some((format!("{PREFIX}Env"), Source::Env)))
        );
        assert_eq!(
            arn(p.resolve(&labels(&[]), &[])),
            Ok(Some((format!("{PREFIX}DefaultRole"), Source::Default)))
        );
        // No default: none.
        assert_eq!(arn(policy(None, &[]).resolve(&labels(&[]), &[])), Ok(None));
        // A full ARN under the prefix is fine; outside it is refused.
        assert_eq!(
            arn(p.resolve(&labels(&[(ROLE_LABEL, &format!("{PREFIX}team/Api"))]), &[])),
            Ok(Some((format!("{PREFIX}team/Api"), Source::Label)))
        );
        assert_eq!(
            p.resolve(
                &labels(&[(ROLE_LABEL, "arn:aws:iam::123456789012:role/Admin")]),
                &[]
            ),
            Err(RoleError::OutsidePrefix {
                arn: "arn:aws:iam::123456789012:role/Admin".into(),
                prefix: PREFIX.into()
            })
        );
        // Another account's role with the same path is outside the prefix too.
        assert!(matches!(
            p.resolve(
                &labels(&[(ROLE_LABEL, "arn:aws:iam::999999999999:role/containers/Web")]),
                &[]
            ),
            Err(RoleError::OutsidePrefix { .. })
        ));
        // Allow-list.
        let strict = policy(None, &["arn:aws:iam::123456789012:role/containers/web-*"]);
        assert!(
            strict
                .resolve(&labels(&[(ROLE_LABEL, "web-frontend")]), &[])
                .unwrap()
                .is_some()
        );
        assert_eq!(
            strict.resolve(&labels(&[(ROLE_LABEL, "db")]), &[]),
            Err(RoleError::NotAllowed(format!("{PREFIX}db")))
        );
        // Invalid values are errors, not silently another role.
        assert!(matches!(
            p.resolve(&labels(&[(ROLE_LABEL, "bad role!")]), &[]),
            Err(RoleError::Invalid { .. })
        ));
        // A name without a prefix cannot be resolved.
        let no_prefix = Policy::default();
        assert_eq!(
            no_prefix.resolve(&labels(&[(ROLE_LABEL, "Web")]), &[]),
            Err(RoleError::NoPrefix("Web".into()))
        );
        // External id label.
        let r = p
            .resolve(
                &labels(&[(ROLE_LABEL, "Web"), (EXTERNAL_ID_LABEL, "xyz")]),
                &[],
            )
            .unwrap()
            .unwrap();
        assert_eq!(
            (r.name.as_str(), r.external_id.as_deref()),
            ("Web", Some("xyz"))
        );
    }

    #[test]
    fn role_values_follow_iams_grammar() {
        for good in [
            "Web",
            "team/Web",
            "a/b/c/Web+=,.@_-",
            "arn:aws:iam::123456789012:role/containers/Web",
            "arn:aws-us-gov:iam::123456789012:role/Web",
            "  Web  ",
        ] {
            assert!(RoleName::parse(good).is_ok(), "{good}");
        }
        let long_name = "a".repeat(65);
        let long_path = format!("{}/Web", "p".repeat(512));
        for bad in [
            "",
            "/Web",
            "Web/",
            "team//Web",
            "../Admin",
            "team/../Admin",
            "./Web",
            ".",
            "..",
            "team/..",
            "team/./Web",
            "Web\n",
            "We\u{1b}[31mb",
            "We b",
            "Wéb",
            long_name.as_str(),
            long_path.as_str(),
            "arn:aws:iam::123456789012:role/",
            "arn:aws:iam::123456789012:role/containers/../Admin",
            "arn:aws:iam::123456789012:role/a//b",
            "arn:aws:iam::123456789012:user/Web",
            "arn:aws:iam::12345678901:role/Web",
            "arn:aws:iam:us-east-1:123456789012:role/Web",
            "arn:aws:sts::123456789012:role/Web",
            "arn::iam::123456789012:role/Web",
            "arn:AWS:iam::123456789012:role/Web",
            "arn:aws:iam::123456789012:role/Web\u{0}",
        ] {
            assert!(RoleName::parse(bad).is_err(), "{bad:?}");
        }
        let p = policy(None, &[]);
        for bad in ["x", "a b", "id\n", &"e".repeat(1225)] {
            assert!(
                matches!(
                    p.resolve(
                        &labels(&[(ROLE_LABEL, "Web"), (EXTERNAL_ID_LABEL, bad)]),
                        &[]
                    ),
                    Err(RoleError::Invalid { .. })
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn prefixes_and_globs() {
        assert!(ArnPrefix::parse("arn:aws:iam::123456789012:role/").is_ok());
        assert_eq!(
            ArnPrefix::parse("arn:aws:iam::123456789012:role/x")
                .unwrap()
                .as_str(),
            "arn:aws:iam::123456789012:role/x/"
        );
        assert!(ArnPrefix::parse("arn:aws:iam::12345:role/").is_err());
        assert!(ArnPrefix::parse("arn:aws:s3:::bucket").is_err());
        assert!(ArnPrefix::parse("arn:aws:iam::123456789012:user/").is_err());
        let g = Glob::parse("arn:aws:iam::*:role/a?c*").unwrap();
        assert!(g.matches("arn:aws:iam::1:role/abc"));
        assert!(g.matches("arn:aws:iam::1:role/axcdef"));
        assert!(!g.matches("arn:aws:iam::1:role/ab"));
        assert!(Glob::parse(" ").is_err());
    }

    #[test]
    fn globs_agree_with_a_reference_matcher_and_stay_linear() {
        // The obvious recursive definition, as the reference on small cases.
        fn reference(p: &[u8], t: &[u8]) -> bool {
            match (p.first(), t.first()) {
                (None, None) => true,
                (Some(b'*'), _) => {
                    reference(&p[1..], t) || (!t.is_empty() && reference(p, &t[1..]))
                }
                (Some(b'?'), Some(_)) => reference(&p[1..], &t[1..]),
                (Some(a), Some(b)) if a == b => reference(&p[1..], &t[1..]),
                _ => false,
            }
        }
        let patterns = [
            "", "*", "**", "?", "a", "a*", "*a", "a*b", "*a*b*", "a?c", "?*?", "ab*ba", "*?a",
            "a**a", "*ab*", "b*",
        ];
        let texts = [
            "", "a", "b", "ab", "ba", "abc", "aab", "abba", "abab", "aaaa", "acb", "bab",
        ];
        for p in patterns {
            for t in texts {
                assert_eq!(
                    wildcard_match(p.as_bytes(), t.as_bytes()),
                    reference(p.as_bytes(), t.as_bytes()),
                    "{p:?} on {t:?}"
                );
            }
        }
        // The backtracking matcher took 0.2 s on this (4 stars, 200 characters): exponential in
        // the stars. Counted, not timed: at most (pattern + 1) × (text + 1) steps, and more than
        // the text's length (the premise: the stars were moved on, many times).
        let arn = format!("arn:aws:iam::123456789012:role/{}", "a".repeat(170));
        for (pattern, expected) in [
            ("*a*a*a*a*b".to_owned(), false),
            ("*a".repeat(50), true),
            (format!("{}b", "*a".repeat(50)), false),
            (format!("*{}b", "a".repeat(60)), false),
        ] {
            assert!(Glob::parse(&pattern).is_ok(), "{pattern}");
            let (matched, steps) = wildcard_match_counted(pattern.as_bytes(), arn.as_bytes());
            assert_eq!(matched, expected, "{pattern}");
            let bound = (pattern.len() + 1) * (arn.len() + 1);
            assert!(steps <= bound, "{pattern}: {steps} steps, bound {bound}");
            assert!(
                steps > arn.len(),
                "{pattern}: {steps} steps: no backtracking happened"
            );
        }
    }

    #[test]
    fn session_names_follow_sts_rules() {
        assert_eq!(session_name(Some("/web-1"), "abc"), "web-1");
        assert_eq!(session_name(Some("/my app:v2"), "abc"), "my-app-v2");
        let long = "x".repeat(100);
        assert_eq!(session_name(Some(&long), "abc").len(), 64);
        assert_eq!(
            session_name(Some("/a"), "0123456789abcdef"),
            "0123456789abcdef"
        );
        assert_eq!(session_name(None, "f"), "container-f");
        for name in [
            session_name(Some("/ünïcødé"), "abcd"),
            session_name(Some("/"), "ab"),
        ] {
            assert!((2..=64).contains(&name.len()), "{name}");
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_+=,.@-".contains(c)),
                "{name}"
            );
        }
    }
}
