//! The audit trail and the log's volume: each session a container is handed is recorded once
//! (a refresh is a new session, a second container's session its own), repeat serves are only
//! counted, and what a container's requests make the proxy log is bounded.
use super::*;

/// The audit lines of the proxy's log: (session, access key id).
fn audited(proxy: &Proxy) -> Vec<(String, String)> {
    let field = |line: &str, name: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .unwrap_or_default()
            .to_owned()
    };
    proxy
        .log()
        .iter()
        .filter(|l| l.contains("credentials vended"))
        .map(|l| (field(l, "session="), field(l, "access_key_id=")))
        .collect()
}

/// `n` fetches of `role`'s credentials from inside `container`, one after the other: the
/// access key id of each answer (all of them 200).
fn fetch_n(container: &Running, role: &str, n: usize) -> Vec<String> {
    let out = container.exec(&format!(
        "for i in $(seq {n}); do curl -s -w '\\n== %{{http_code}}\\n' \
         http://169.254.169.254/latest/meta-data/iam/security-credentials/{role}; done"
    ));
    let got = answers(&out);
    assert_eq!(got.len(), n, "{out}");
    got.iter()
        .map(|(status, body)| {
            assert_eq!(*status, 200, "{body}");
            let doc: serde_json::Value = serde_json::from_str(body).unwrap();
            doc["AccessKeyId"].as_str().unwrap().to_owned()
        })
        .collect()
}

imds_tests::per_mode! { the_audit_trail_records_each_session_once => the_audit_trail_records_each_session_once_in; }

/// Twenty fetches of the same credentials are one audit line and nineteen counted repeats; a
/// second container with the same role gets its own line; a refresh (sessions here are due
/// fifteen seconds after they are issued) is a new session and a new line.
fn the_audit_trail_records_each_session_once_in(mode: Mode) {
    let scene = sim_host(HttpTokens::Optional);
    let proxy = Proxy::start_in(
        &scene,
        mode,
        &["--session-duration", "900", "--refresh-before", "885s"],
    );
    let label = ["--label", "iam.amazonaws.com/role=Audited"];
    let a = Running::start(&label);
    let b = Running::start(&label);
    let keys_a = fetch_n(&a, "Audited", 20);
    let first_key = keys_a[0].clone();
    assert!(
        keys_a.iter().all(|k| *k == first_key),
        "the premise: twenty serves of one session: {keys_a:?}"
    );
    let keys_b = fetch_n(&b, "Audited", 3);
    assert_ne!(keys_b[0], first_key, "b's session is its own");
    let trail = audited(&proxy);
    let for_key = |key: &str| trail.iter().filter(|(_, k)| k == key).count();
    assert_eq!(for_key(&first_key), 1, "{trail:?}");
    assert_eq!(for_key(&keys_b[0]), 1, "{trail:?}");
    assert_eq!(trail.len(), 2, "{trail:?}");
    let served = |how: &str| {
        proxy.metric(&format!(
            "imds_proxy_credentials_served_total{{serve=\"{how}\"}}"
        ))
    };
    assert_eq!(served("first"), 2);
    assert_eq!(served("repeat"), 21, "19 of a's and 2 of b's");

    // A refresh: once a's session is due, a request starts the new one; a later request gets it,
    // and it is recorded once.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let refreshed = loop {
        let key = fetch_n(&a, "Audited", 1).remove(0);
        if key != first_key {
            break key;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "a's session was never refreshed: {:#?}",
            proxy.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    fetch_n(&a, "Audited", 5);
    let trail = audited(&proxy);
    assert_eq!(
        trail.iter().filter(|(_, k)| *k == refreshed).count(),
        1,
        "{trail:?}"
    );
    assert_eq!(
        trail.iter().filter(|(_, k)| *k == first_key).count(),
        1,
        "{trail:?}"
    );
}

imds_tests::per_mode! { what_a_container_sends_makes_a_bounded_number_of_log_lines => what_a_container_sends_makes_a_bounded_number_of_log_lines_in; }

/// A container asking 200 times for a role it does not have, and 200 times with a malformed
/// path: one line for each reason (the rest counted), not 400, and nothing for its throttling.
fn what_a_container_sends_makes_a_bounded_number_of_log_lines_in(mode: Mode) {
    let scene = sim_host(HttpTokens::Optional);
    let proxy = Proxy::start_in(&scene, mode, &[]);
    let c = Running::start(&["--label", "iam.amazonaws.com/role=Mine"]);
    let out = c.exec(
        "for i in $(seq 200); do \
           curl -s -o /dev/null -w '%{http_code}\\n' \
             http://169.254.169.254/latest/meta-data/iam/security-credentials/NotMine; \
           curl -s -o /dev/null -w '%{http_code}\\n' --path-as-is \
             'http://169.254.169.254/latest/meta-data/../../x'; \
         done",
    );
    let statuses: Vec<&str> = out.lines().collect();
    let count = |status: &str| statuses.iter().filter(|s| **s == status).count() as u64;
    let (wrong_role, malformed, throttled) = (count("404"), count("400"), count("429"));
    // The premise: every request was made and refused, each reason many times (the container's
    // rate limit answers the rest with 429, counted and logged at debug only).
    assert_eq!(wrong_role + malformed + throttled, 400, "{out}");
    assert!(wrong_role > 10 && malformed > 10, "{out}");
    let log = proxy.log();
    let lines = |what: &str| log.iter().filter(|l| l.contains(what)).count();
    assert_eq!(
        lines("credentials of another role asked for"),
        1,
        "{log:#?}"
    );
    assert_eq!(lines("refused: malformed path"), 1, "{log:#?}");
    assert_eq!(
        proxy.metric("imds_proxy_log_lines_suppressed_total"),
        wrong_role + malformed - 2,
        "the rest counted"
    );
    assert_eq!(
        proxy.counted("imds_proxy_throttled_total{limit=\"per_caller\"}"),
        throttled
    );
}
