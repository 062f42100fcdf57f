//! Which role a container gets: labels, environment, the default, none (404, never the
//! instance's), the prefix and allow-list (refused without an STS call), and an image that names
//! its own role.
use super::*;

imds_tests::per_mode! { label_env_and_default_roles => label_env_and_default_roles_in; }

fn label_env_and_default_roles_in(mode: Mode) {
    let scene = sim_host(HttpTokens::Optional);
    let proxy = Proxy::start_in(&scene, mode, &["--default-role", "DefaultRole"]);
    assert_gets_role(&scene, &["--label", "iam.amazonaws.com/role=Web"], "Web");
    assert_gets_role(&scene, &["--env", "IAM_ROLE=Worker"], "Worker");
    assert_gets_role(
        &scene,
        &[
            "--label",
            "iam.amazonaws.com/role=Web",
            "--env",
            "IAM_ROLE=Worker",
        ],
        "Web",
    );
    assert_gets_role(&scene, &[], "DefaultRole");
    // A full ARN under the prefix.
    assert_gets_role(
        &scene,
        &["--label", &format!("iam.amazonaws.com/role={PREFIX}Api")],
        "Api",
    );
    let vends = proxy
        .log()
        .iter()
        .filter(|l| l.contains("credentials vended") && l.contains("access_key_id=ASIA"))
        .count();
    assert_eq!(
        vends,
        5,
        "one audit line per container's session (five containers): {:#?}",
        proxy.log()
    );
}

/// An image that names a role for itself: `LABEL iam.amazonaws.com/role=Admin`,
/// `ENV IAM_ROLE=Admin`, built locally from the curl image.
fn self_naming_image() -> &'static str {
    const TAG: &str = "imds-test/self-naming:1";
    let dockerfile = format!(
        "FROM {}\nLABEL iam.amazonaws.com/role=Admin\nENV IAM_ROLE=Admin\n",
        curl_image().unwrap()
    );
    let mut child = Command::new("docker")
        .args(["build", "--quiet", "--tag", TAG, "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(dockerfile.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "docker build: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    TAG
}

/// Run the SDK flow in a container of `image`; (name, answers).
fn flow_in_image(image: &str, docker_args: &[&str]) -> (String, Vec<(u16, String)>) {
    ensure_imds_is_simulated().unwrap();
    let name = format!("imds-test-{}", rand_suffix());
    let mut args = vec!["run", "-d", "--name", &name];
    args.extend_from_slice(docker_args);
    args.extend_from_slice(&[image, "sh", "-c", SDK_FLOW]);
    let id = docker_ok(&args).unwrap().trim().to_owned();
    docker_ok(&["wait", &id]).unwrap();
    let logs = docker(&["logs", &id]).unwrap();
    docker_ok(&["rm", "-f", &id]).unwrap();
    (name, answers(&String::from_utf8_lossy(&logs.stdout)))
}

#[test]
fn an_image_does_not_choose_its_own_role() {
    let scene = sim_host(HttpTokens::Optional);
    let image = self_naming_image();
    // The image's own Admin is ignored: the default role applies, and the log says why.
    let proxy = Proxy::start(&scene, &["--default-role", "DefaultRole"]);
    let (name, got) = flow_in_image(image, &[]);
    assert_eq!(got[0], (200, "DefaultRole".to_owned()), "{got:?}");
    proxy.wait_for_log(&[&name, "come from the container's image", "IAM_ROLE=Admin"]);
    // Without a default role it has none at all.
    drop(proxy);
    let proxy = Proxy::start(&scene, &[]);
    let (_, got) = flow_in_image(image, &[]);
    assert_eq!(got[0], (404, "Not Found".to_owned()), "{got:?}");
    // What its runner sets counts, label or env, even over the image's own.
    let (_, got) = flow_in_image(image, &["--label", "iam.amazonaws.com/role=Web"]);
    assert_eq!(got[0], (200, "Web".to_owned()), "{got:?}");
    let (_, got) = flow_in_image(image, &["--env", "IAM_ROLE=Worker"]);
    assert_eq!(got[0], (200, "Worker".to_owned()), "{got:?}");
    // --trust-image-role restores the image's say.
    drop(proxy);
    let _proxy = Proxy::start(&scene, &["--trust-image-role"]);
    let (_, got) = flow_in_image(image, &[]);
    assert_eq!(got[0], (200, "Admin".to_owned()), "{got:?}");
}

imds_tests::per_mode! { no_role_means_404_and_never_the_instance_role => no_role_means_404_and_never_the_instance_role_in; }

fn no_role_means_404_and_never_the_instance_role_in(mode: Mode) {
    let scene = sim_host(HttpTokens::Optional);
    let proxy = Proxy::start_in(&scene, mode, &[]);
    let script = r#"
T=$(curl -s -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' http://169.254.169.254/latest/api/token)
for p in iam/security-credentials/ iam/security-credentials/InstanceRole iam/security-credentials/InstanceRole/ iam/info iam/ identity-credentials/ec2/security-credentials/ec2-instance; do
  curl -s -w '\n== %{http_code}\n' -H "X-aws-ec2-metadata-token: $T" "http://169.254.169.254/latest/meta-data/$p"
done
curl -s -w '\n== %{http_code}\n' -H "X-aws-ec2-metadata-token: $T" http://169.254.169.254/2021-03-23/meta-data/iam/security-credentials/InstanceRole
curl -s -w '\n== %{http_code}\n' -H "X-aws-ec2-metadata-token: $T" http://169.254.169.254/latest/user-data
curl -s -w '\n== %{http_code}\n' -H "X-aws-ec2-metadata-token: $T" http://169.254.169.254/latest/meta-data/instance-id
"#;
    let (_, _, out) = in_container(&[], script);
    let got = answers(&out);
    let not_found = (404, "Not Found".to_owned());
    assert_eq!(got.len(), 9, "{out}");
    for answer in &got[..8] {
        assert_eq!(answer, &not_found, "{out}");
    }
    assert_eq!(
        got[8],
        (200, "i-0123456789abcdef0".to_owned()),
        "passed through"
    );
    assert!(!out.contains(INSTANCE_ROLE), "{out}");
    // Denied by the proxy, not by a simulator that lacks the path: it serves the dated tree too,
    // and heard none of these.
    let asked: Vec<String> = scene
        .sim_requests()
        .into_iter()
        .filter(|l| {
            l.contains("/iam/") || l.contains("user-data") || l.contains("identity-credentials")
        })
        .collect();
    assert!(asked.is_empty(), "{mode:?}: {asked:#?}");
    assert!(
        proxy.log().iter().any(|l| l.contains("no role: no label")),
        "the log says why: {:#?}",
        proxy.log()
    );
    assert_eq!(proxy.metric("imds_proxy_sts_calls_total"), 0);
}

#[test]
fn roles_outside_the_prefix_or_the_allow_list_are_refused_without_sts() {
    let scene = sim_host(HttpTokens::Optional);
    let proxy = Proxy::start(
        &scene,
        &[
            "--allowed-roles",
            "arn:aws:iam::123456789012:role/containers/web-*",
        ],
    );
    for label in [
        "iam.amazonaws.com/role=arn:aws:iam::123456789012:role/Admin",
        "iam.amazonaws.com/role=db",
    ] {
        let name = label.rsplit(['/', '=']).next().unwrap();
        let script = format!(
            "curl -s -w '\\n== %{{http_code}}\\n' http://169.254.169.254/latest/meta-data/iam/security-credentials/; \
             curl -s -w '\\n== %{{http_code}}\\n' http://169.254.169.254/latest/meta-data/iam/security-credentials/{name}"
        );
        let (_, _, out) = in_container(&["--label", label], &script);
        let got = answers(&out);
        assert_eq!(got[0], (404, "Not Found".to_owned()), "{label}: {out}");
        assert_eq!(got[1], (404, "Not Found".to_owned()), "{label}: {out}");
    }
    let refused = proxy
        .log()
        .iter()
        .filter(|l| l.contains("role refused; no STS call made"))
        .count();
    assert!(refused >= 2, "{:#?}", proxy.log());
    assert!(
        proxy
            .log()
            .iter()
            .any(|l| l.contains("is not under the role ARN prefix"))
    );
    assert!(
        proxy
            .log()
            .iter()
            .any(|l| l.contains("is not in --allowed-roles"))
    );
    assert_eq!(proxy.metric("imds_proxy_sts_calls_total"), 0);
    assert_gets_role(
        &scene,
        &["--label", "iam.amazonaws.com/role=web-api"],
        "web-api",
    );
}
