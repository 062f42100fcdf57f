//! The IMDS API's edges: bad input gets a clean 4xx and never reaches the upstream, user data only
//! when allowed.
use super::*;

#[test]
fn bad_input_gets_clean_4xx_and_never_reaches_upstream_raw() {
    let scene = sim_host(HttpTokens::Optional);
    let proxy = Proxy::start(&scene, &[]);
    let script = r#"
U=http://169.254.169.254
curl -s -o /dev/null -w '== %{http_code}\n' --path-as-is "$U/latest/meta-data/../meta-data/iam/security-credentials/"
curl -s -o /dev/null -w '== %{http_code}\n' --path-as-is "$U/latest/meta-data/%2e%2e/user-data"
curl -s -o /dev/null -w '== %{http_code}\n' --path-as-is "$U/latest//user-data"
curl -s -o /dev/null -w '== %{http_code}\n' --path-as-is "$U/latest/meta-data/$(printf '\377\376')"
curl -s -o /dev/null -w '== %{http_code}\n' -X POST "$U/latest/meta-data/"
curl -s -o /dev/null -w '== %{http_code}\n' -X DELETE "$U/latest/api/token"
curl -s -o /dev/null -w '== %{http_code}\n' -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' "$U/2021-03-23/api/token"
curl -s -o /dev/null -w '== %{http_code}\n' -H "X-Big: $(head -c 70000 /dev/zero | tr '\0' a)" "$U/latest/meta-data/"
curl -s -o /dev/null -w '== %{http_code}\n' "$U/latest/meta-data/ami-id"
"#;
    let (_, _, out) = in_container(&[], script);
    let statuses: Vec<u16> = answers(&out).iter().map(|(s, _)| *s).collect();
    assert_eq!(statuses.len(), 9, "{out}");
    for (i, status) in statuses[..8].iter().enumerate() {
        assert!((400..500).contains(status), "request {i}: {status}: {out}");
    }
    assert_eq!(statuses[0], 400);
    assert_eq!(statuses[4], 405);
    assert_eq!(statuses[5], 405);
    assert_eq!(statuses[6], 403);
    assert_eq!(statuses[8], 200, "still serving after all that");
    // The only path that reached the simulator (besides the proxy's own token, region, instance
    // id, and its token-less probe of whether the instance requires IMDSv2) is the valid one.
    let upstream: Vec<String> = scene
        .sim_requests()
        .into_iter()
        .filter(|l| !l.contains("/latest/api/token") && !l.contains("placement/region"))
        .filter(|l| !l.contains("path=\"/latest/meta-data/instance-id\""))
        .filter(|l| !(l.contains("path=\"/latest/meta-data/\"") && l.contains("token=\"none\"")))
        .collect();
    assert_eq!(upstream.len(), 1, "{upstream:#?}");
    assert!(
        upstream[0].contains("path=\"/latest/meta-data/ami-id\""),
        "{upstream:#?}"
    );
    assert!(
        proxy
            .log()
            .iter()
            .any(|l| l.contains("refused: malformed path")),
        "{:#?}",
        proxy.log()
    );
}

/// `--allow-user-data` passes the instance's user data through (denied without it: the no-role
/// test); nothing else about the container changes.
#[test]
fn user_data_is_passed_through_only_when_allowed() {
    let scene = sim_host(HttpTokens::Optional);
    let _proxy = Proxy::start(&scene, &["--allow-user-data"]);
    let script = r#"
T=$(curl -s -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' http://169.254.169.254/latest/api/token)
curl -s -w '\n== %{http_code}\n' -H "X-aws-ec2-metadata-token: $T" http://169.254.169.254/latest/user-data
curl -s -w '\n== %{http_code}\n' -H "X-aws-ec2-metadata-token: $T" http://169.254.169.254/latest/meta-data/iam/security-credentials/InstanceRole
"#;
    let (_, _, out) = in_container(&[], script);
    let got = answers(&out);
    assert_eq!(got.len(), 2, "{out}");
    assert_eq!(got[0].0, 200, "{out}");
    assert!(got[0].1.contains("imds-sim user-data"), "{out}");
    assert_eq!(
        got[1],
        (404, "Not Found".to_owned()),
        "still never the instance role"
    );
    assert!(
        scene
            .sim_requests()
            .iter()
            .any(|l| l.contains("path=\"/latest/user-data\"") && l.contains("status=200")),
        "asked of the upstream: {:#?}",
        scene.sim_requests()
    );
}
