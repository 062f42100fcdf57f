//! `imds-proxy explain` against the running proxy (README "Why a workload gets what it gets"):
//! the binary asks the ops listener with the token the proxy wrote, and prints, in both modes,
//! the role and its rule for a container that is served, the allow-list that refuses another,
//! the missing settings of one with no role, STS's refusal in words, and nothing for a caller
//! without the token. Each branch of the text: `explain::tests`.
use super::*;

/// `imds-proxy explain <who>` against `proxy`: (exit code, stdout, stderr).
pub(super) fn explain(proxy: &Proxy, who: &str) -> (i32, String, String) {
    let out = Command::new(proxy_bin())
        .args(["explain", who, "--ops", &proxy.ops.to_string()])
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub(super) fn says(got: &(i32, String, String), code: i32, words: &[&str]) {
    let (status, out, err) = got;
    assert_eq!(*status, code, "{out}{err}");
    for w in words {
        assert!(
            out.contains(w) || err.contains(w),
            "{w:?} not in:\n{out}{err}"
        );
    }
}

imds_tests::per_mode! { explain_says_why_a_workload_gets_what_it_gets => explain_says_why_a_workload_gets_what_it_gets_in; }

fn explain_says_why_a_workload_gets_what_it_gets_in(mode: Mode) {
    let scene = sim_host(HttpTokens::Optional);
    let sts = Injector::start(scene.sts_endpoint().unwrap());
    let allowed = format!("{PREFIX}Ok*");
    let proxy = Proxy::start_in(
        &scene,
        mode,
        &["--sts-endpoint", &sts.url(), "--allowed-roles", &allowed],
    );
    let served = Running::start(&["--label", "iam.amazonaws.com/role=OkServed"]);
    let (status, body) = get_credentials(&served, "OkServed");
    assert_eq!(status, 200, "{body}");
    says(
        &explain(&proxy, &served.0[..12]),
        0,
        &[
            &format!("container: {}", served.0),
            &format!("role: {PREFIX}OkServed (from label iam.amazonaws.com/role)"),
            "session tags: container-id=",
            "cache: a session (",
            "sts: answering",
            "verdict: a credentials request from it is served",
        ],
    );

    let name = format!("imds-explain-{}", rand_suffix());
    let _listed = Running::start(&["--name", &name, "--label", "iam.amazonaws.com/role=Other"]);
    says(
        &explain(&proxy, &name),
        1,
        &[
            "role: refused:",
            "is not matched by any --allowed-roles glob",
            "gets 404",
        ],
    );
    let bare = Running::start(&[]);
    says(
        &explain(&proxy, &bare.0),
        1,
        &["role: none: no label iam.amazonaws.com/role, no IAM_ROLE"],
    );

    sts.set(Fault::HttpError(403));
    let refused = Running::start(&["--label", "iam.amazonaws.com/role=OkRefused"]);
    let (status, body) = get_credentials(&refused, "OkRefused");
    assert_eq!(status, 503, "{body}");
    says(
        &explain(&proxy, &refused.0),
        1,
        &[
            "last STS call failed",
            "STS refused: the role does not exist, or its trust policy does not allow",
            "gets 503",
        ],
    );

    says(
        &explain(&proxy, "no-such-container"),
        2,
        &["no container known as"],
    );
    // Without the token: refused, and nothing of any container said.
    let answer = Request::get("/explain")
        .header("x-imds-proxy-explain-who", served.0.as_str())
        .send(proxy.ops)
        .unwrap();
    assert_eq!(answer.status, 403);
    assert!(!answer.text().contains(&served.0));
}
