//! IMDSv2 tokens: required as the instance requires them, bound to their container.
use super::*;

/// By default a container needs a token exactly when the instance does (its HttpTokens
/// setting); `--require-imdsv2=true|false` overrides it either way.
#[test]
fn imdsv2_is_required_as_the_instance_requires_it() {
    let plain_get = "curl -s -w '\\n== %{http_code}\\n' http://169.254.169.254/latest/meta-data/iam/security-credentials/";
    let role = ["--label", "iam.amazonaws.com/role=Web"];
    for (tokens, flags, expected, log) in [
        (
            HttpTokens::Required,
            &[][..],
            401,
            "required as on the instance",
        ),
        (
            HttpTokens::Optional,
            &[][..],
            200,
            "optional as on the instance",
        ),
        (
            HttpTokens::Required,
            &["--require-imdsv2=false"][..],
            200,
            "as configured",
        ),
        (
            HttpTokens::Optional,
            &["--require-imdsv2"][..],
            401,
            "as configured",
        ),
    ] {
        let scene = sim_host_config(tokens).start().unwrap();
        let proxy = Proxy::start(&scene, flags);
        proxy.wait_for_log(&["IMDSv2 tokens", log]);
        let (_, _, out) = in_container(&role, plain_get);
        assert_eq!(answers(&out)[0].0, expected, "{tokens:?} {flags:?}: {out}");
    }
}

imds_tests::per_mode! { tokens_are_bound_to_their_container_and_v2_can_be_required => tokens_are_bound_to_their_container_and_v2_can_be_required_in; }

fn tokens_are_bound_to_their_container_and_v2_can_be_required_in(mode: Mode) {
    let scene = sim_host(HttpTokens::Optional);
    let _proxy = Proxy::start_in(&scene, mode, &["--require-imdsv2"]);
    let mint = "curl -s -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' http://169.254.169.254/latest/api/token";
    let (_, _, token_a) = in_container(&["--label", "iam.amazonaws.com/role=RoleA"], mint);
    assert!(token_a.len() > 40, "{token_a}");
    let use_a = format!(
        "curl -s -w '\\n== %{{http_code}}\\n' -H 'X-aws-ec2-metadata-token: {}' http://169.254.169.254/latest/meta-data/iam/security-credentials/; \
         curl -s -w '\\n== %{{http_code}}\\n' http://169.254.169.254/latest/meta-data/iam/security-credentials/; \
         curl -s -w '\\n== %{{http_code}}\\n' -H 'X-aws-ec2-metadata-token: garbage' http://169.254.169.254/latest/meta-data/instance-id",
        token_a.trim()
    );
    let (_, _, out) = in_container(&["--label", "iam.amazonaws.com/role=RoleB"], &use_a);
    let unauthorized = (401, "Unauthorized".to_owned());
    assert_eq!(
        answers(&out),
        vec![unauthorized.clone(), unauthorized.clone(), unauthorized],
        "{out}"
    );
    // Token requests: TTL bounds and the anti-SSRF rule, as IMDS answers them.
    let puts = r#"
for ttl in 0 1 21600 21601 x; do curl -s -o /dev/null -w '== %{http_code}\n' -X PUT -H "X-aws-ec2-metadata-token-ttl-seconds: $ttl" http://169.254.169.254/latest/api/token; done
curl -s -o /dev/null -w '== %{http_code}\n' -X PUT http://169.254.169.254/latest/api/token
curl -s -o /dev/null -w '== %{http_code}\n' -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' -H 'X-Forwarded-For: 1.2.3.4' http://169.254.169.254/latest/api/token
curl -s -D - -o /dev/null -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 77' http://169.254.169.254/latest/api/token | grep -i ttl
"#;
    let (_, _, out) = in_container(&[], puts);
    let statuses: Vec<u16> = answers(&out).iter().map(|(s, _)| *s).collect();
    assert_eq!(statuses, [400, 200, 200, 400, 400, 400, 403], "{out}");
    assert!(
        out.to_ascii_lowercase()
            .contains("x-aws-ec2-metadata-token-ttl-seconds: 77"),
        "{out}"
    );
}
