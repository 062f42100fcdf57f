//! Session tags and source identity (README "Session tags"): what STS receives for a Docker
//! container's AssumeRole, exactly (the injector in front of moto records every AssumeRole's
//! parameters); tags off; and a role whose trust policy refuses tags, said in the log and never
//! retried without them. Pods: `cri::a_pods_sessions_carry_eks_pod_identity_s_tags`.
use std::collections::BTreeMap;

use super::*;
use imds_tests::{faults::AssumeRoleCall, scene::INSTANCE_ID};

/// The AssumeRoles STS was asked for `role` (by the end of its ARN).
fn calls_for(sts: &Injector, role: &str) -> Vec<AssumeRoleCall> {
    sts.assume_role_calls()
        .into_iter()
        .filter(|c| {
            c.param("RoleArn")
                .is_some_and(|arn| arn.ends_with(&format!("/{role}")))
        })
        .collect()
}

fn image_of(container: &Running) -> String {
    docker_ok(&["inspect", "--format", "{{.Image}}", &container.0])
        .unwrap()
        .trim()
        .to_owned()
}

imds_tests::per_mode! { sts_receives_exactly_the_tags_readme_promises => sts_receives_exactly_the_tags_readme_promises_in; }

/// A container's session is tagged with its name, its id, its image's id and the instance's id,
/// plus the operator's static tag; the transitive keys asked for, and its name as source
/// identity. Nothing else.
fn sts_receives_exactly_the_tags_readme_promises_in(mode: Mode) {
    let scene = sim_host(HttpTokens::Optional);
    let sts = Injector::start(scene.sts_endpoint().unwrap());
    let proxy = Proxy::start_in(
        &scene,
        mode,
        &[
            "--sts-endpoint",
            &sts.url(),
            "--session-tag",
            "team=payments",
            "--transitive-tag-key",
            "team,container-name",
            "--source-identity",
            "on",
        ],
    );
    proxy.wait_for_log(&["session tagging", "session_tags=true", INSTANCE_ID]);
    let name = format!("imds-tagged-{}", rand_suffix());
    let c = Running::start(&["--name", &name, "--label", "iam.amazonaws.com/role=Tagged"]);
    let (status, body) = get_credentials(&c, "Tagged");
    assert_eq!(status, 200, "{body}");
    let calls = calls_for(&sts, "Tagged");
    // The premise: the call went through the injector (prefetch or request: one session).
    assert_eq!(calls.len(), 1, "{calls:#?}");
    let call = &calls[0];
    let expected: BTreeMap<String, String> = [
        ("container-id", c.0.as_str()),
        ("container-image", image_of(&c).as_str()),
        ("container-name", name.as_str()),
        ("ec2-instance-id", INSTANCE_ID),
        ("team", "payments"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    assert!(expected["container-image"].starts_with("sha256:"));
    assert_eq!(call.tags(), expected, "{call:#?}");
    assert_eq!(call.transitive(), ["container-name", "team"], "{call:#?}");
    assert_eq!(call.param("SourceIdentity"), Some(name.as_str()));
}

/// A role whose trust policy does not allow `sts:TagSession` refuses a tagged AssumeRole: the
/// container gets a 503, the log names the role and says why and what to do, and the proxy never
/// asks again without the tags. With `--session-tags off` the same role serves, untagged.
#[test]
fn a_role_that_refuses_tags_is_named_and_tags_can_be_turned_off() {
    let scene = sim_host(HttpTokens::Optional);
    let sts = Injector::start(scene.sts_endpoint().unwrap());
    sts.set(Fault::RefuseTags);
    let c = Running::start(&["--label", "iam.amazonaws.com/role=Untaggable"]);
    {
        let proxy = Proxy::start(&scene, &["--sts-endpoint", &sts.url()]);
        let (status, body) = get_credentials(&c, "Untaggable");
        assert_eq!(status, 503, "{body}");
        proxy.wait_for_log(&[
            "role/containers/Untaggable",
            "the role refused session tags",
            "--session-tags off",
        ]);
        // `explain` says the same, not that the role does not exist or refuses the instance.
        let told = super::explain::explain(&proxy, &c.0);
        super::explain::says(
            &told,
            1,
            &["the role refused session tags", "--session-tags off"],
        );
        assert!(!told.1.contains("the role does not exist"), "{}", told.1);
        let calls = calls_for(&sts, "Untaggable");
        assert!(!calls.is_empty(), "the premise: STS was asked");
        assert!(
            calls.iter().all(AssumeRoleCall::carries_tags_or_identity),
            "never asked again without the tags: {calls:#?}"
        );
    }
    let before = calls_for(&sts, "Untaggable").len();
    let proxy = Proxy::start(
        &scene,
        &["--sts-endpoint", &sts.url(), "--session-tags", "off"],
    );
    proxy.wait_for_log(&["session tagging", "session_tags=false"]);
    let (status, body) = get_credentials(&c, "Untaggable");
    assert_eq!(status, 200, "{body}");
    let calls = calls_for(&sts, "Untaggable");
    assert!(calls.len() > before, "the premise: asked again");
    assert!(
        calls[before..]
            .iter()
            .all(|c| !c.carries_tags_or_identity()),
        "{calls:#?}"
    );
}
