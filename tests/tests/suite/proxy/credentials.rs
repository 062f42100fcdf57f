//! Credentials and STS: one call for fifty first requests, an outage served from the cache,
//! prefetch when a container is created and started, and STS named the standard way.
use super::*;

/// Through the binary: the prefetch at start and fifty concurrent requests make one STS call
/// between them, whichever comes first. (Whether the requests meet the call in flight depends on
/// timing here; `credentials::tests::concurrent_requests_for_one_key_make_one_sts_call` holds the
/// call open and proves the single flight itself.)
#[test]
fn fifty_concurrent_first_requests_make_one_sts_call() {
    let scene = sim_host(HttpTokens::Optional);
    // STS answers after 2 s, so the container's requests come while the first call (the
    // prefetch at its start, or the first request's) is still under way: the single flight is
    // what they meet, not a session already cached. The answer budget is longer still, so that
    // each request waits for that call's answer instead of a 503.
    let sts = Injector::start(scene.sts_endpoint().unwrap());
    sts.set(Fault::Delay(Duration::from_secs(2)));
    let proxy = Proxy::start(
        &scene,
        &["--sts-endpoint", &sts.url(), "--answer-within", "4s"],
    );
    let script = r#"
for i in $(seq 50); do
  curl -s -o /dev/null -w '== %{http_code}\n' http://169.254.169.254/latest/meta-data/iam/security-credentials/Burst &
done
wait
"#;
    let (_, _, out) = in_container(&["--label", "iam.amazonaws.com/role=Burst"], script);
    let statuses: Vec<u16> = answers(&out).iter().map(|(s, _)| *s).collect();
    assert_eq!(statuses, vec![200; 50], "{out}");
    assert_eq!(proxy.metric("imds_proxy_sts_calls_total"), 1);
    assert_eq!(proxy.metric("imds_proxy_credentials_vended_total"), 50);
    // The premise: requests did wait on the call under way.
    let joined = proxy.metric("imds_proxy_sts_calls_joined_total");
    eprintln!("{joined} of 50 requests met the STS call under way");
    assert!(joined >= 1, "no request met the STS call under way");
}

#[test]
fn an_sts_outage_serves_cached_credentials_and_recovers() {
    // Its own STS: this test stops it.
    let mut scene = sim_host_config(HttpTokens::Optional)
        .own_sts()
        .start()
        .expect("the simulated EC2 host starts");
    let _proxy = Proxy::start(&scene, &[]);
    let cached = Running::start(&["--label", "iam.amazonaws.com/role=Steady"]);
    let (status, first) = get_credentials(&cached, "Steady");
    assert_eq!(status, 200, "{first}");
    let first: serde_json::Value = serde_json::from_str(&first).unwrap();

    scene.stop_sts().unwrap();
    let (status, during) = get_credentials(&cached, "Steady");
    assert_eq!(
        status, 200,
        "the cached session is served through the outage: {during}"
    );
    let during: serde_json::Value = serde_json::from_str(&during).unwrap();
    assert_eq!(during["AccessKeyId"], first["AccessKeyId"]);
    // A role never fetched: nothing to serve, an error the SDKs retry (5xx, IMDS-style JSON).
    let fresh = Running::start(&["--label", "iam.amazonaws.com/role=Fresh"]);
    let (status, body) = get_credentials(&fresh, "Fresh");
    assert_eq!(status, 503, "{body}");
    let error: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(error["Code"], "ServiceUnavailable");
    assert!(error["Message"].as_str().unwrap().contains("retry"));

    scene.start_sts().unwrap();
    // The failure is remembered for a back-off (1 s doubling, at most a minute) so that a
    // failing role is not an STS call per request: asked again, as an SDK retries, until served.
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let (status, body) = get_credentials(&fresh, "Fresh");
        if status == 200 {
            break;
        }
        assert_eq!(status, 503, "{body}");
        assert!(
            std::time::Instant::now() < deadline,
            "not recovered: {body}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// A container that starts with a role has its session fetched before it asks (the start event's
/// prefetch): its first request is served from the cache, with no STS call of its own.
#[test]
fn a_role_is_fetched_when_its_container_starts() {
    let scene = sim_host(HttpTokens::Optional);
    let proxy = Proxy::start(&scene, &[]);
    let container = Running::start(&["--label", "iam.amazonaws.com/role=Early"]);
    proxy.wait_for_log(&["assumed role", "role/containers/Early"]);
    assert_eq!(proxy.metric("imds_proxy_sts_calls_total"), 1, "prefetched");
    assert_eq!(
        proxy.metric("imds_proxy_cache_hits_total"),
        0,
        "nothing asked yet"
    );
    let out = container.exec(
        r#"T=$(curl -s -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' http://169.254.169.254/latest/api/token)
curl -s -o /dev/null -w '== %{http_code}\n' -H "X-aws-ec2-metadata-token: $T" http://169.254.169.254/latest/meta-data/iam/security-credentials/Early"#,
    );
    assert_eq!(answers(&out).first().map(|a| a.0), Some(200), "{out}");
    assert_eq!(
        proxy.metric("imds_proxy_sts_calls_total"),
        1,
        "no call of its own"
    );
    assert_eq!(
        proxy.metric("imds_proxy_cache_hits_total"),
        1,
        "served from the prefetch"
    );
}

/// A container's credentials are fetched when Docker reports it created, before it starts: its
/// first request, the moment it starts, makes no STS call of its own.
#[test]
fn a_container_s_credentials_are_fetched_when_it_is_created() {
    let scene = sim_host(HttpTokens::Optional);
    let proxy = Proxy::start(&scene, &[]);
    let calls = proxy.metric("imds_proxy_sts_calls_total");
    let id = docker_ok(&[
        "create",
        "--label",
        "iam.amazonaws.com/role=Early",
        curl_image().unwrap(),
        "sleep",
        "600",
    ])
    .unwrap()
    .trim()
    .to_owned();
    let created = Running(id);
    // Bounded wait for the prefetch: the container has not started.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while proxy.metric("imds_proxy_credential_cache_sessions") == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no session fetched for a created container: {:#?}",
            proxy.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(proxy.metric("imds_proxy_sts_calls_total"), calls + 1);
    let state = docker_ok(&["inspect", "-f", "{{.State.Status}}", &created.0]).unwrap();
    assert_eq!(state.trim(), "created", "fetched before it started");
    docker_ok(&["start", &created.0]).unwrap();
    let (status, body) = get_credentials(&created, "Early");
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        proxy.metric("imds_proxy_sts_calls_total"),
        calls + 1,
        "the first request found the session fetched at create"
    );
}

/// The proxy's STS client is configured as any AWS tool is: `AWS_ENDPOINT_URL_STS` names the
/// endpoint when `--sts-endpoint` does not (before, the SDK's public endpoint was used anyway),
/// and `AWS_MAX_ATTEMPTS` sets the attempts per call. But it signs only with the instance's
/// credentials: never with `AWS_ACCESS_KEY_ID` nor a profile's keys, both set here. The injector
/// in front of moto notes the key id of every signed request, and counts the attempts.
#[test]
fn the_sts_endpoint_can_come_from_the_standard_environment() {
    let scene = sim_host(HttpTokens::Optional);
    let sts = Injector::start(scene.sts_endpoint().unwrap());
    let endpoint = sts.url();
    let dir = std::env::temp_dir().join(format!("imds-test-aws-{}", rand_suffix()));
    std::fs::create_dir_all(&dir).unwrap();
    let credentials_file = dir.join("credentials");
    std::fs::write(
        &credentials_file,
        "[leaky]\naws_access_key_id = AKIAPROFILEKEY000000\naws_secret_access_key = profile\n",
    )
    .unwrap();
    let config_file = dir.join("config");
    std::fs::write(&config_file, "[profile leaky]\nregion = us-east-1\n").unwrap();
    let proxy = Proxy::start_with_env(
        &scene,
        Mode::Cgroup,
        &[],
        &[
            ("AWS_ENDPOINT_URL_STS", &endpoint),
            ("AWS_MAX_ATTEMPTS", "2"),
            ("AWS_ACCESS_KEY_ID", "AKIAENVIRONMENTKEY00"),
            ("AWS_SECRET_ACCESS_KEY", "environment"),
            ("AWS_PROFILE", "leaky"),
            (
                "AWS_SHARED_CREDENTIALS_FILE",
                credentials_file.to_str().unwrap(),
            ),
            ("AWS_CONFIG_FILE", config_file.to_str().unwrap()),
        ],
    );
    proxy.wait_for_log(&["STS client configured", &endpoint, "from the environment"]);
    let container = Running::start(&["--label", "iam.amazonaws.com/role=FromEnv"]);
    let (status, body) = get_credentials(&container, "FromEnv");
    assert_eq!(status, 200, "{body}");
    let creds: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(caller_arn(&scene, &creds).contains(":assumed-role/FromEnv/"));

    // Signed with the instance's key, every time (the premise: STS was asked through the
    // injector, signed).
    let instance_key = &scene.instance_credentials().unwrap().access_key_id;
    let signed: Vec<String> = sts.signed_with().into_iter().map(|(_, key)| key).collect();
    assert!(!signed.is_empty(), "STS was asked through the injector");
    assert!(
        signed.iter().all(|key| key == instance_key),
        "signed with {signed:?}, not only the instance's {instance_key}"
    );

    // Two attempts per call: with STS failing, every settled call made exactly two requests.
    let (calls_before, requests_before) =
        (proxy.metric("imds_proxy_sts_calls_total"), sts.requests());
    sts.set(Fault::HttpError(500));
    let broken = Running::start(&["--label", "iam.amazonaws.com/role=Broken"]);
    let (status, body) = get_credentials(&broken, "Broken");
    assert_eq!(status, 503, "{body}");
    let (calls, requests) = settled_sts_calls(&proxy, &sts);
    assert!(calls > calls_before, "a call for Broken was made");
    assert_eq!(
        requests - requests_before,
        2 * (calls - calls_before),
        "AWS_MAX_ATTEMPTS=2: two attempts per call"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The proxy's STS call count and the injector's request count at a moment when no call is under
/// way (every call counted has finished: `imds_proxy_sts_call_seconds_count` caught up), read
/// twice the same around the injector's count.
fn settled_sts_calls(proxy: &Proxy, sts: &Injector) -> (u64, u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let read = || {
            (
                proxy.metric("imds_proxy_sts_calls_total"),
                proxy.metric("imds_proxy_sts_call_seconds_count"),
            )
        };
        let (started, finished) = read();
        let requests = sts.requests();
        if started == finished && read() == (started, finished) {
            return (started, requests);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "STS calls never settled: {started} started, {finished} finished"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
