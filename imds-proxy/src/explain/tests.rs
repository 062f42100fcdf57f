//! Unit tests of [`super`]: each branch of the explanation, from facts made by hand.
use std::collections::HashMap;

use super::*;
use crate::{
    credentials::{Error, FailureStatus, Key, SessionStatus},
    roles::Source,
    runtime::Pod,
};

const ARN: &str = "arn:aws:iam::123456789012:role/Web";

fn container() -> Container {
    Container {
        id: "c0ffee".repeat(10),
        name: "web-1".into(),
        labels: HashMap::from([(roles::ROLE_LABEL.to_owned(), "Web".to_owned())]),
        running: true,
        cgroup: "/docker/c0ffee".into(),
        addresses: vec!["172.17.0.2".parse().unwrap()],
        ..Default::default()
    }
}

fn resolved() -> Resolved {
    Resolved {
        arn: ARN.into(),
        name: "Web".into(),
        source: Source::Label,
        external_id: None,
    }
}

fn facts(role: Result<Option<Resolved>, RoleError>, cache: Option<KeyStatus>) -> Facts {
    let key = role.as_ref().ok().and_then(Option::as_ref).map(|r| Key {
        role_arn: r.arn.clone(),
        session_name: "web-1".into(),
        external_id: None,
        tags: Default::default(),
    });
    Facts {
        container: Arc::new(container()),
        told_apart: true,
        role,
        key,
        cache,
        breaker: breaker::Status::Closed,
        now: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
    }
}

fn failed(failure: Failure, message: &str) -> Option<KeyStatus> {
    Some(KeyStatus {
        session: None,
        calling: false,
        failure: Some(FailureStatus {
            error: Error::Sts {
                role_arn: ARN.into(),
                message: message.into(),
                failure,
            },
            in_a_row: 2,
            retry_in: Duration::from_millis(1500),
        }),
    })
}

fn says(f: &Facts, verdict: Verdict, words: &[&str]) {
    let (got, text) = render(f);
    assert_eq!(got, verdict, "{text}");
    for w in words {
        assert!(text.contains(w), "{w:?} not in:\n{text}");
    }
}

#[test]
fn a_role_not_fetched_yet_is_served_by_the_next_request() {
    says(
        &facts(Ok(Some(resolved())), None),
        Verdict::Served,
        &[
            "container: c0ffee",
            "cgroup: /docker/c0ffee | addresses: 172.17.0.2 | running: yes",
            "role: arn:aws:iam::123456789012:role/Web (from label iam.amazonaws.com/role)",
            "session name: web-1",
            "session tags: none",
            "cache: nothing yet",
            "sts: answering",
            "verdict: a credentials request from it is served",
        ],
    );
}

#[test]
fn a_cached_session_is_shown_with_its_expiry() {
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let cache = Some(KeyStatus {
        session: Some(SessionStatus {
            access_key_id: "ASIAEXAMPLE".into(),
            expiration: now + Duration::from_secs(3000),
            expired: false,
            due: false,
        }),
        calling: false,
        failure: None,
    });
    says(
        &facts(Ok(Some(resolved())), cache),
        Verdict::Served,
        &["a session (ASIAEXAMPLE) valid until", "(in 50m)"],
    );
}

#[test]
fn no_role_says_which_settings_are_missing() {
    says(
        &facts(Ok(None), None),
        Verdict::NoRole,
        &[
            "role: none: no label iam.amazonaws.com/role, no IAM_ROLE",
            "gets 404",
        ],
    );
    let mut f = facts(Ok(None), None);
    let mut pod = container();
    pod.labels = HashMap::from([(roles::container_role_key("sidecar"), "none".to_owned())]);
    pod.pod = Some(Pod {
        namespace: "team-a".into(),
        name: "web".into(),
        uid: "u-1".into(),
        sandbox_id: "s".into(),
        container: "sidecar".into(),
    });
    f.container = Arc::new(pod);
    says(
        &f,
        Verdict::NoRole,
        &[
            "pod: team-a/web (uid u-1), container \"sidecar\" in it",
            "role: none: pod annotation iam.amazonaws.com/role.sidecar is none",
        ],
    );
}

#[test]
fn a_role_the_rules_refuse_names_the_rule() {
    says(
        &facts(
            Err(RoleError::NotAllowedInNamespace {
                arn: ARN.into(),
                namespace: "team-b".into(),
            }),
            None,
        ),
        Verdict::NoRole,
        &[
            "role: refused:",
            "namespace \"team-b\" may assume (--namespace-allowed-roles)",
        ],
    );
    says(
        &facts(Err(RoleError::NotAllowed(ARN.into())), None),
        Verdict::NoRole,
        &["not matched by any --allowed-roles glob"],
    );
}

#[test]
fn sts_failures_are_told_apart_in_words() {
    let cases = [
        (
            Failure::Refused(Refusal::Role),
            "AccessDenied: User: x is not authorized to perform: sts:AssumeRole on resource: y",
            "the role does not exist, or its trust policy does not allow the instance's role",
        ),
        (
            Failure::Refused(Refusal::Role),
            "ValidationError: 1 validation error",
            "STS found the request invalid",
        ),
        (
            Failure::Refused(Refusal::SessionTags),
            "the role refused session tags: its trust policy does not allow sts:TagSession for \
             the instance's role (allow it, or run the proxy with --session-tags off) \
             (AccessDenied: not authorized to perform: sts:TagSession)",
            "the role refused session tags",
        ),
        (
            Failure::Unavailable,
            "Throttling: Rate exceeded",
            "STS throttled the call",
        ),
        (
            Failure::Unavailable,
            "dispatch failure: connection refused",
            "STS could not be reached",
        ),
        (
            Failure::TimedOut,
            "no answer within 15s",
            "STS did not answer in time",
        ),
    ];
    for (failure, message, words) in cases {
        says(
            &facts(Ok(Some(resolved())), failed(failure, message)),
            Verdict::Failing,
            &[
                "last STS call failed (2 in a row)",
                words,
                "next call: not before 2s from now",
                "gets 503",
            ],
        );
    }
}

/// A refusal of the tags or the source identity is said as such, with its way out: never
/// dressed up as a refusal of the role.
#[test]
fn a_refusal_of_session_tags_is_not_said_to_be_the_role_s() {
    let message = format!(
        "{} (AccessDenied: not authorized to perform: sts:TagSession)",
        Refusal::SessionTags.way_out().unwrap()
    );
    let (_, text) = render(&facts(
        Ok(Some(resolved())),
        failed(Failure::Refused(Refusal::SessionTags), &message),
    ));
    assert!(text.contains("--session-tags off"), "{text}");
    assert!(!text.contains("STS refused the role"), "{text}");
    assert!(!text.contains("the role does not exist"), "{text}");
}

#[test]
fn an_open_breaker_is_failing_for_roles_not_cached() {
    let mut f = facts(Ok(Some(resolved())), None);
    f.breaker = breaker::Status::Open { failures: 5 };
    says(
        &f,
        Verdict::Failing,
        &["sts: not answering: 5 calls failed in a row, the breaker is open"],
    );
}

#[test]
fn the_token_is_written_root_only_and_compared_whole() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = crate::process::tests::TempDir::new();
    let path = dir.0.join("sub/explain-1.token");
    let token = Token::write(&path).unwrap();
    let value = std::fs::read_to_string(&path).unwrap();
    assert_eq!(value.len(), 64);
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o700
    );
    assert!(token.accepts(value.as_bytes()));
    assert!(!token.accepts(&value.as_bytes()[..63]));
    assert!(!token.accepts(b""));
    drop(token);
    assert!(!path.exists(), "removed with the proxy");
}
