//! Session tags: what an AssumeRole is tagged with, from what the proxy knows of its caller (the
//! container or pod the kernel or the runtime vouched for) and the operator's static tags, under
//! STS's rules for tags. Pods get EKS Pod Identity's keys, so that policies written for it
//! (`${aws:PrincipalTag/kubernetes-namespace}`) move unchanged.
//!
//! Contract: [`Tags::for_caller`] never fails and never returns a tag STS would refuse: a value
//! the proxy did not choose (a container's name) is cleaned to STS's characters and length, and
//! the keys are fixed. The operator's tags are checked once, at start ([`Tags::new`]), and may
//! not take a key the proxy sets itself: a static `kubernetes-namespace` would let one setting
//! speak for every pod.

use std::fmt;

/// STS: at most 50 session tags, keys of 1–128 characters, values of 0–256.
pub const MAX_TAGS: usize = 50;
pub const MAX_KEY_CHARS: usize = 128;
pub const MAX_VALUE_CHARS: usize = 256;

/// A pod's keys, as EKS Pod Identity sets them.
pub const POD_NAMESPACE: &str = "kubernetes-namespace";
pub const POD_NAME: &str = "kubernetes-pod-name";
pub const POD_UID: &str = "kubernetes-pod-uid";
/// A Docker or Podman container's keys.
pub const CONTAINER_NAME: &str = "container-name";
pub const CONTAINER_ID: &str = "container-id";
/// Every caller's: the image it runs (its digest or id) and the instance.
pub const IMAGE: &str = "container-image";
pub const INSTANCE_ID: &str = "ec2-instance-id";

/// The keys the proxy sets from what it knows; an operator's static tag may not use them.
pub const ATTESTED_KEYS: [&str; 7] = [
    POD_NAMESPACE,
    POD_NAME,
    POD_UID,
    CONTAINER_NAME,
    CONTAINER_ID,
    IMAGE,
    INSTANCE_ID,
];

/// One session tag.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag {
    pub key: String,
    pub value: String,
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.key, self.value)
    }
}

/// Why the operator's tags cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TagError {
    #[error("{0:?} is not KEY=VALUE")]
    NotKeyValue(String),
    #[error(
        "tag key {0:?}: 1 to 128 of letters, digits, spaces and _.:/=+-@, not starting with aws:"
    )]
    BadKey(String),
    #[error("tag {key:?}: its value must be at most 256 of letters, digits, spaces and _.:/=+-@")]
    BadValue { key: String },
    #[error("tag key {0:?} is one the proxy sets from what it knows of the caller")]
    Attested(String),
    #[error("tag key {0:?} is given twice (STS keys are case-insensitive)")]
    Duplicate(String),
    #[error("transitive tag key {0:?} is not a tag the proxy sets")]
    UnknownTransitive(String),
    #[error("{0} static tags: with the proxy's own at most {MAX_TAGS} in all")]
    TooMany(usize),
}

/// What STS accepts in tag keys and values: letters, digits, spaces and `_.:/=+-@`.
fn allowed(c: char) -> bool {
    c.is_alphanumeric() || c == ' ' || "_.:/=+-@".contains(c)
}

fn check_key(key: &str) -> Result<(), TagError> {
    let chars = key.chars().count();
    if (1..=MAX_KEY_CHARS).contains(&chars)
        && key.chars().all(allowed)
        && !key.to_ascii_lowercase().starts_with("aws:")
    {
        Ok(())
    } else {
        Err(TagError::BadKey(key.to_owned()))
    }
}

/// `KEY=VALUE`, as `--session-tag` takes it.
pub fn parse_static(arg: &str) -> Result<Tag, TagError> {
    let (key, value) = arg
        .split_once('=')
        .ok_or_else(|| TagError::NotKeyValue(arg.to_owned()))?;
    check_key(key)?;
    if value.chars().count() > MAX_VALUE_CHARS || !value.chars().all(allowed) {
        return Err(TagError::BadValue {
            key: key.to_owned(),
        });
    }
    Ok(Tag {
        key: key.to_owned(),
        value: value.to_owned(),
    })
}

/// A value the proxy did not choose, made one STS accepts: other characters become `-`, and it
/// is cut at 256 characters.
pub fn clean_value(value: &str) -> String {
    value
        .chars()
        .map(|c| if allowed(c) { c } else { '-' })
        .take(MAX_VALUE_CHARS)
        .collect()
}

/// The source identity of `caller`'s sessions (it survives the workload's own role chaining, and
/// CloudTrail shows it on every call): a pod's `<namespace>.<name>`, a container's name, when
/// that is 2–64 characters STS allows; else the pod's uid or the container's id, which are (a
/// name is never cut: two cut names could be one).
pub fn source_identity(caller: Caller<'_>) -> String {
    let (name, fallback) = match caller {
        Caller::Pod {
            namespace,
            name,
            uid,
        } => (format!("{namespace}.{name}"), uid),
        Caller::Container { name, id } => (name.to_owned(), id),
    };
    let fits = |s: &str| {
        SOURCE_IDENTITY_CHARS.contains(&s.chars().count())
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "_+=,.@-".contains(c))
    };
    if fits(&name) {
        name
    } else if fits(fallback) {
        fallback.to_owned()
    } else {
        // Neither fits (an id from no runtime the proxy knows): its allowed characters, cut.
        let cleaned: String = fallback
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || "_+=,.@-".contains(*c))
            .take(*SOURCE_IDENTITY_CHARS.end())
            .collect();
        format!("{cleaned:_<2}")
    }
}

/// Who asks, as the proxy knows it.
#[derive(Clone, Copy, Debug)]
pub enum Caller<'a> {
    Pod {
        namespace: &'a str,
        name: &'a str,
        uid: &'a str,
    },
    Container {
        name: &'a str,
        id: &'a str,
    },
}

/// STS: a source identity is 2–64 of letters, digits and `_+=,.@-`.
pub const SOURCE_IDENTITY_CHARS: std::ops::RangeInclusive<usize> = 2..=64;

/// What one AssumeRole carries besides the role and session name: part of what a session is
/// cached under, so callers with different tags never share a session.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct SessionTags {
    /// Sorted by key.
    pub tags: Vec<Tag>,
    /// The keys among `tags` that follow the session into the roles it assumes in turn.
    pub transitive: Vec<String>,
    pub source_identity: Option<String>,
}

/// The operator's tag settings, checked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tags {
    /// Off: no tags at all (roles whose trust policy does not allow `sts:TagSession`).
    pub enabled: bool,
    /// Set the session's source identity (needs `sts:SetSourceIdentity` in the trust policy).
    pub source_identity: bool,
    static_tags: Vec<Tag>,
    transitive: Vec<String>,
}

impl Tags {
    /// Tags off.
    pub fn off() -> Self {
        Self::default()
    }

    /// Tags on, with the operator's static tags and the keys (static or the proxy's own) that
    /// are transitive (they follow the session into the roles it assumes in turn).
    pub fn new(static_tags: Vec<Tag>, transitive: Vec<String>) -> Result<Self, TagError> {
        let mut seen = std::collections::HashSet::new();
        for tag in &static_tags {
            check_key(&tag.key)?;
            let lower = tag.key.to_ascii_lowercase();
            if ATTESTED_KEYS.contains(&lower.as_str()) {
                return Err(TagError::Attested(tag.key.clone()));
            }
            if !seen.insert(lower) {
                return Err(TagError::Duplicate(tag.key.clone()));
            }
        }
        if static_tags.len() + ATTESTED_KEYS.len() > MAX_TAGS {
            return Err(TagError::TooMany(static_tags.len()));
        }
        for key in &transitive {
            let lower = key.to_ascii_lowercase();
            if !seen.contains(&lower) && !ATTESTED_KEYS.contains(&lower.as_str()) {
                return Err(TagError::UnknownTransitive(key.clone()));
            }
        }
        Ok(Self {
            enabled: true,
            source_identity: false,
            static_tags,
            transitive,
        })
    }

    /// Everything `caller`'s AssumeRole carries: [`Tags::for_caller`], the transitive keys
    /// among them, and the source identity when it is on.
    pub fn session(
        &self,
        caller: Caller<'_>,
        image: Option<&str>,
        instance_id: Option<&str>,
    ) -> SessionTags {
        let tags = self.for_caller(caller, image, instance_id);
        SessionTags {
            transitive: self.transitive_of(&tags),
            tags,
            source_identity: self.source_identity.then(|| source_identity(caller)),
        }
    }

    /// The tags of `caller`'s sessions, sorted by key (so equal callers give equal lists): what
    /// the proxy knows of it, then the operator's. Empty when tags are off.
    pub fn for_caller(
        &self,
        caller: Caller<'_>,
        image: Option<&str>,
        instance_id: Option<&str>,
    ) -> Vec<Tag> {
        if !self.enabled {
            return Vec::new();
        }
        let known: Vec<(&str, &str)> = match caller {
            Caller::Pod {
                namespace,
                name,
                uid,
            } => vec![(POD_NAMESPACE, namespace), (POD_NAME, name), (POD_UID, uid)],
            Caller::Container { name, id } => vec![(CONTAINER_NAME, name), (CONTAINER_ID, id)],
        };
        let mut tags: Vec<Tag> = known
            .into_iter()
            .chain(image.map(|i| (IMAGE, i)))
            .chain(instance_id.map(|i| (INSTANCE_ID, i)))
            .filter(|(_, value)| !value.is_empty())
            .map(|(key, value)| Tag {
                key: key.to_owned(),
                value: clean_value(value),
            })
            .chain(self.static_tags.iter().cloned())
            .collect();
        tags.sort();
        tags
    }

    /// The transitive keys among `tags` (a key the caller has no value for is not sent).
    pub fn transitive_of(&self, tags: &[Tag]) -> Vec<String> {
        self.transitive
            .iter()
            .filter(|k| tags.iter().any(|t| t.key.eq_ignore_ascii_case(k)))
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(tags: &[Tag]) -> Vec<&str> {
        tags.iter().map(|t| t.key.as_str()).collect()
    }

    #[test]
    fn pods_get_eks_pod_identity_s_keys_and_containers_their_name_and_id() {
        let tags = Tags::new(vec![parse_static("team=payments").unwrap()], vec![]).unwrap();
        let pod = tags.for_caller(
            Caller::Pod {
                namespace: "team-a",
                name: "web-0",
                uid: "0b5e-uid",
            },
            Some("sha256:abcd"),
            Some("i-0123456789abcdef0"),
        );
        assert_eq!(
            keys(&pod),
            [IMAGE, INSTANCE_ID, POD_NAMESPACE, POD_NAME, POD_UID, "team"]
        );
        let container = tags.for_caller(
            Caller::Container {
                name: "web",
                id: "c0ffee",
            },
            None,
            None,
        );
        assert_eq!(keys(&container), [CONTAINER_ID, CONTAINER_NAME, "team"]);
        assert!(
            Tags::off()
                .for_caller(Caller::Container { name: "w", id: "c" }, None, None)
                .is_empty()
        );
    }

    #[test]
    fn values_the_proxy_did_not_choose_are_made_acceptable() {
        let tags = Tags::new(vec![], vec![]).unwrap();
        let long = "x".repeat(300);
        let got = tags.for_caller(
            Caller::Container {
                name: "we b;\"<>",
                id: &long,
            },
            None,
            None,
        );
        assert_eq!(got[0].value.chars().count(), MAX_VALUE_CHARS);
        assert_eq!(got[1].value, "we b----");
        assert!(got.iter().all(|t| t.value.chars().all(allowed)));
    }

    #[test]
    fn the_operator_s_tags_are_checked_once() {
        assert_eq!(
            parse_static("novalue"),
            Err(TagError::NotKeyValue("novalue".into()))
        );
        assert!(matches!(parse_static("aws:x=1"), Err(TagError::BadKey(_))));
        assert!(matches!(parse_static("=1"), Err(TagError::BadKey(_))));
        assert!(matches!(
            parse_static("k=a;b"),
            Err(TagError::BadValue { .. })
        ));
        assert_eq!(parse_static("k=").unwrap().value, "");
        let tag = |s: &str| parse_static(s).unwrap();
        assert_eq!(
            Tags::new(vec![tag("Kubernetes-Namespace=x")], vec![]),
            Err(TagError::Attested("Kubernetes-Namespace".into()))
        );
        assert_eq!(
            Tags::new(vec![tag("team=a"), tag("TEAM=b")], vec![]),
            Err(TagError::Duplicate("TEAM".into()))
        );
        assert_eq!(
            Tags::new(vec![], vec!["nope".into()]),
            Err(TagError::UnknownTransitive("nope".into()))
        );
        let many = (0..44).map(|i| tag(&format!("k{i}=v"))).collect();
        assert_eq!(Tags::new(many, vec![]), Err(TagError::TooMany(44)));
    }

    #[test]
    fn the_source_identity_is_the_name_or_when_it_does_not_fit_the_id() {
        let long = "w".repeat(60);
        let pod = |name| Caller::Pod {
            namespace: "team-a",
            name,
            uid: "0b5e6c1a-1111-2222-3333-444455556666",
        };
        assert_eq!(source_identity(pod("web-0")), "team-a.web-0");
        assert_eq!(
            source_identity(pod(&long)),
            "0b5e6c1a-1111-2222-3333-444455556666",
            "never a cut name"
        );
        let container = |name| Caller::Container {
            name,
            id: "c0ffee00c0ffee00",
        };
        assert_eq!(source_identity(container("web_1.x")), "web_1.x");
        assert_eq!(source_identity(container("w")), "c0ffee00c0ffee00");
        assert_eq!(source_identity(container("a b")), "c0ffee00c0ffee00");
        assert_eq!(
            source_identity(Caller::Container { name: "", id: "é" }),
            "__"
        );
        let mut tags = Tags::new(vec![], vec![POD_NAME.into()]).unwrap();
        let session = tags.session(pod("web-0"), None, None);
        assert_eq!(session.source_identity, None, "off unless asked for");
        assert_eq!(session.transitive, [POD_NAME]);
        tags.source_identity = true;
        assert_eq!(
            tags.session(pod("web-0"), None, None)
                .source_identity
                .as_deref(),
            Some("team-a.web-0")
        );
    }

    #[test]
    fn transitive_keys_are_those_the_session_has() {
        let tags = Tags::new(
            vec![parse_static("team=a").unwrap()],
            vec![POD_NAMESPACE.into(), "team".into()],
        )
        .unwrap();
        let container = tags.for_caller(Caller::Container { name: "w", id: "c" }, None, None);
        assert_eq!(tags.transitive_of(&container), ["team"]);
    }
}
