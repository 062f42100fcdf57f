//! Unit tests of [`super`].
use super::*;

#[test]
fn credentials_document_format() {
    let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_000_000);
    let doc = credentials_document(&credentials::Session::new(
        credentials::Assumption {
            access_key_id: "ASIAEXAMPLE".into(),
            secret_access_key: "se\"cret".into(),
            session_token: "tok".into(),
            expiration: at + Duration::from_millis(3_600_500),
        },
        at,
    ));
    let v: serde_json::Value = serde_json::from_str(&doc).unwrap();
    assert_eq!(v["Code"], "Success");
    assert_eq!(v["Type"], "AWS-HMAC");
    assert_eq!(v["SecretAccessKey"], "se\"cret");
    assert_eq!(v["LastUpdated"], "2026-11-18T11:06:40Z");
    assert_eq!(v["Expiration"], "2026-11-18T12:06:40Z", "seconds precision");
    assert_eq!(v.as_object().unwrap().len(), 7);
}

/// The API as a container sees it, without a network: the router driven directly, callers
/// as the attestor would hand them over, STS a fake.
mod routing {
    use axum::body::Body;
    use tower::ServiceExt as _;

    use super::*;
    use crate::{
        credentials::tests::{FakeClock, FakeSts, cache},
        identity::{Caller, Peer, Refusal},
    };

    const WEB: &str = "aaaaaaaaaaaaaaaa0000000000000000aaaaaaaaaaaaaaaa0000000000000000";
    const PLAIN: &str = "bbbbbbbbbbbbbbbb0000000000000000bbbbbbbbbbbbbbbb0000000000000000";
    const RECREATED: &str = "cccccccccccccccc0000000000000000cccccccccccccccc0000000000000000";

    fn app(sts: &Arc<FakeSts>, clock: &Arc<FakeClock>) -> Arc<App> {
        Arc::new(App {
            tokens: Tokens::new(),
            roles: roles::Policy {
                prefix: Some(
                    roles::ArnPrefix::parse("arn:aws:iam::123456789012:role/containers/").unwrap(),
                ),
                allowed: vec![],
                default_role: None,
                namespaces: Default::default(),
            },
            credentials: cache(sts, clock),
            // Never reached by these routes; nothing listens there.
            upstream: Upstream::new("http://127.0.0.1:9", 1, Duration::ZERO),
            metrics: Arc::new(Metrics::default()),
            require_imdsv2: std::sync::atomic::AtomicBool::new(true),
            exposure: Exposure::default(),
            rate: crate::limits::PerKey::new(1000.0, 1000.0, 16),
            quiet: crate::identity::quiet(),
        })
    }

    fn caller(id: &str, labels: &[(&str, &str)], last: u8) -> Peer {
        let container = runtime::Container {
            id: id.to_owned(),
            name: format!("c{last}"),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            running: true,
            ..Default::default()
        };
        let addr = std::net::SocketAddr::from(([172, 17, 0, last], 40000));
        Peer::new(addr, Ok(Caller::at_address(Arc::new(container), addr)))
    }

    async fn ask(
        app: &Arc<App>,
        peer: &Peer,
        method: &str,
        path: &str,
        token: Option<&str>,
    ) -> (u16, String) {
        let mut request = axum::http::Request::builder().method(method).uri(path);
        if method == "PUT" {
            request = request.header(TTL_HEADER, "60");
        }
        if let Some(token) = token {
            request = request.header(TOKEN_HEADER, token);
        }
        let mut request = request.body(Body::empty()).unwrap();
        request
            .extensions_mut()
            .insert(ConnectInfo(Arc::new(peer.clone())));
        let response = router(app.clone()).oneshot(request).await.unwrap();
        let status = response.status().as_u16();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    /// Credentials of role `Web` fetched once by each of `callers` (a token, then the document);
    /// the documents served.
    async fn fetch_web(app: &Arc<App>, callers: &[(&str, u8)]) -> Vec<String> {
        let path = "/latest/meta-data/iam/security-credentials/Web";
        let mut docs = Vec::new();
        for (id, last) in callers {
            let who = caller(id, &[("iam.amazonaws.com/role", "Web")], *last);
            let (_, token) = ask(app, &who, "PUT", "/latest/api/token", None).await;
            let (status, doc) = ask(app, &who, "GET", path, Some(&token)).await;
            assert_eq!(status, 200, "{doc}");
            docs.push(doc);
        }
        docs
    }

    /// `imds_proxy_credentials_served_total` is `first` and `repeat`.
    fn assert_served(app: &App, first: u64, repeat: u64) {
        let metrics = app.metrics.render();
        for (serve, n) in [("first", first), ("repeat", repeat)] {
            assert!(
                metrics.contains(&format!(
                    "imds_proxy_credentials_served_total{{serve=\"{serve}\"}} {n}\n"
                )),
                "{metrics}"
            );
        }
    }

    /// One audit line per session: the first serve is audited, the repeats only counted, and
    /// every serve gets the same bytes; another container's session is audited on its own.
    #[tokio::test]
    async fn a_session_is_audited_once_and_its_repeats_are_counted() {
        let clock = FakeClock::new();
        let sts = FakeSts::new(&clock);
        let app = app(&sts, &clock);
        let docs = fetch_web(&app, &[(WEB, 2), (WEB, 2), (WEB, 2), (PLAIN, 3)]).await;
        assert_eq!(docs[0], docs[1]);
        assert_eq!(docs[1], docs[2]);
        assert_ne!(docs[0], docs[3], "the other container's session is its own");
        assert_served(&app, 2, 2);
    }

    /// A container recreated under the same name has the same session key, so it may be served
    /// the session its predecessor had: that handing out is audited too, once (the trail names
    /// every holder an access key id went to).
    #[tokio::test]
    async fn a_session_served_to_a_new_holder_is_audited_for_it() {
        let clock = FakeClock::new();
        let sts = FakeSts::new(&clock);
        let app = app(&sts, &clock);
        let docs = fetch_web(&app, &[(WEB, 2), (RECREATED, 2), (RECREATED, 2), (WEB, 2)]).await;
        // The premise: one session, served to both.
        assert!(docs.iter().all(|d| *d == docs[0]), "{docs:?}");
        assert_served(&app, 2, 2);
    }

    /// A container's refusals make one line per reason a minute; the rest is counted.
    #[tokio::test]
    async fn refusals_are_logged_once_per_caller_and_reason_and_counted() {
        let clock = FakeClock::new();
        let sts = FakeSts::new(&clock);
        let app = app(&sts, &clock);
        let web = caller(WEB, &[("iam.amazonaws.com/role", "Web")], 2);
        let (_, token) = ask(&app, &web, "PUT", "/latest/api/token", None).await;
        for _ in 0..10 {
            let path = "/latest/meta-data/iam/security-credentials/Admin";
            assert_eq!(ask(&app, &web, "GET", path, Some(&token)).await.0, 404);
        }
        assert!(
            app.metrics
                .render()
                .contains("imds_proxy_log_lines_suppressed_total 9\n"),
            "{}",
            app.metrics.render()
        );
    }

    #[tokio::test]
    async fn a_container_gets_its_own_role_and_nothing_else() {
        let clock = FakeClock::new();
        let sts = FakeSts::new(&clock);
        let app = app(&sts, &clock);
        let web = caller(WEB, &[("iam.amazonaws.com/role", "Web")], 2);
        let (status, token) = ask(&app, &web, "PUT", "/latest/api/token", None).await;
        assert_eq!(status, 200);
        let get = |path: &'static str| {
            let (app, web, token) = (app.clone(), web.clone(), token.clone());
            async move { ask(&app, &web, "GET", path, Some(&token)).await }
        };
        assert_eq!(
            get("/latest/meta-data/iam/security-credentials/").await,
            (200, "Web".to_owned())
        );
        let (status, doc) = get("/latest/meta-data/iam/security-credentials/Web").await;
        assert_eq!(status, 200, "{doc}");
        let doc: serde_json::Value = serde_json::from_str(&doc).unwrap();
        assert_eq!(doc["AccessKeyId"], "AKID1");
        // Another role, the instance's, user-data: not found. Without a token: 401.
        for path in [
            "/latest/meta-data/iam/security-credentials/Admin",
            "/latest/meta-data/iam/security-credentials/InstanceRole",
            "/latest/user-data",
            "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
        ] {
            assert_eq!(get(path).await.0, 404, "{path}");
        }
        let (status, _) = ask(
            &app,
            &web,
            "GET",
            "/latest/meta-data/iam/security-credentials/Web",
            None,
        )
        .await;
        assert_eq!(status, 401);
        assert_eq!(sts.calls(), 1);
    }

    #[tokio::test]
    async fn a_containers_external_id_reaches_sts() {
        let clock = FakeClock::new();
        let sts = FakeSts::new(&clock);
        let app = app(&sts, &clock);
        let web = caller(
            WEB,
            &[
                ("iam.amazonaws.com/role", "Web"),
                ("iam.amazonaws.com/external-id", "tenant-7"),
            ],
            2,
        );
        let (_, token) = ask(&app, &web, "PUT", "/latest/api/token", None).await;
        let (status, doc) = ask(
            &app,
            &web,
            "GET",
            "/latest/meta-data/iam/security-credentials/Web",
            Some(&token),
        )
        .await;
        assert_eq!(status, 200, "{doc}");
        let asked = sts.asked.lock().unwrap().clone();
        assert_eq!(asked.len(), 1);
        assert_eq!(asked[0].external_id.as_deref(), Some("tenant-7"));
        assert_eq!(
            asked[0].role_arn,
            "arn:aws:iam::123456789012:role/containers/Web"
        );
        assert_eq!(asked[0].session_name, "c2", "the container's name");
    }

    #[tokio::test]
    async fn tokens_and_roles_do_not_cross_containers() {
        let clock = FakeClock::new();
        let sts = FakeSts::new(&clock);
        let app = app(&sts, &clock);
        let web = caller(WEB, &[("iam.amazonaws.com/role", "Web")], 2);
        let plain = caller(PLAIN, &[], 3);
        let (_, web_token) = ask(&app, &web, "PUT", "/latest/api/token", None).await;
        // Web's token is no good from another container.
        let (status, _) = ask(
            &app,
            &plain,
            "GET",
            "/latest/meta-data/iam/security-credentials/",
            Some(&web_token),
        )
        .await;
        assert_eq!(status, 401);
        // A container without a role (and no default) has none, never anyone else's.
        let (_, token) = ask(&app, &plain, "PUT", "/latest/api/token", None).await;
        for path in [
            "/latest/meta-data/iam/security-credentials/",
            "/latest/meta-data/iam/security-credentials/Web",
            "/latest/meta-data/iam/info",
        ] {
            assert_eq!(
                ask(&app, &plain, "GET", path, Some(&token)).await.0,
                404,
                "{path}"
            );
        }
        assert_eq!(sts.calls(), 0);
    }

    /// The instance's `HttpTokens` followed: asked at start, then every period (here 20 ms
    /// instead of five minutes), mirrored into `require_imdsv2`; required while the upstream
    /// cannot be asked (the safe side), and optional again once it says so. The upstream is
    /// the project's IMDS simulator, on loopback, restarted with another `HttpTokens` on the
    /// same port.
    #[tokio::test]
    async fn the_instance_s_http_tokens_are_followed_and_required_while_unknown() {
        use clap::Parser as _;
        use std::sync::atomic::Ordering;
        #[derive(clap::Parser)]
        struct Sim {
            #[command(flatten)]
            config: ec2sim::sim::Config,
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let simulator = |tokens: &str| {
            let Sim { config } = Sim::parse_from([
                "imds-sim",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--http-tokens",
                tokens,
            ]);
            tokio::spawn(ec2sim::sim::run(config))
        };
        // An aborted simulator's listener closes once its tasks are dropped, which the runtime
        // does when it next runs: until then the port cannot be bound again.
        let port_free = || async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            while std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "port {port} never freed"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        let clock = FakeClock::new();
        let sts = FakeSts::new(&clock);
        let mut app = Arc::into_inner(app(&sts, &clock)).unwrap();
        app.upstream = Upstream::new(&format!("http://127.0.0.1:{port}"), 1, Duration::ZERO);
        let app = Arc::new(app);
        let required = || app.require_imdsv2.load(Ordering::Relaxed);
        let until = |want: bool, what: &'static str| {
            let app = app.clone();
            async move {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
                while app.require_imdsv2.load(Ordering::Relaxed) != want {
                    assert!(tokio::time::Instant::now() < deadline, "{what}");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        };

        // Asked at start: required there, required here.
        let strict = simulator("required");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the simulator never listened"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut known = None;
        learn_upstream_imdsv2(&app, &mut known).await;
        assert_eq!(known, Some(true));
        assert!(required());
        let follow = tokio::spawn(follow_upstream_imdsv2_from(
            app.clone(),
            Duration::from_millis(20),
            known,
        ));
        // The instance's owner makes tokens optional: asked again, followed.
        strict.abort();
        let _ = strict.await;
        port_free().await;
        let optional = simulator("optional");
        until(false, "optional once the instance says so").await;
        // Gone: required while it cannot be asked.
        optional.abort();
        let _ = optional.await;
        until(true, "required while the upstream cannot be asked").await;
        // Back: followed again.
        port_free().await;
        let optional = simulator("optional");
        until(false, "optional again once the upstream answers").await;
        follow.abort();
        optional.abort();
        assert_eq!(FOLLOW_UPSTREAM_IMDSV2_EVERY, Duration::from_secs(300));
    }

    /// An upstream that takes the connection and never answers: 502 once the upstream
    /// timeout has passed (on the test's paused clock, so exactly then, however loaded the
    /// machine), never a request left hanging.
    #[tokio::test(start_paused = true)]
    async fn a_silent_upstream_is_a_502_after_the_upstream_timeout() {
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let clock = FakeClock::new();
        let sts = FakeSts::new(&clock);
        let mut app = Arc::into_inner(app(&sts, &clock)).unwrap();
        app.upstream = Upstream::new(
            &format!("http://{}", silent.local_addr().unwrap()),
            1,
            Duration::ZERO,
        );
        app.require_imdsv2 = std::sync::atomic::AtomicBool::new(false);
        let app = Arc::new(app);
        let web = caller(WEB, &[], 2);
        let started = tokio::time::Instant::now();
        let answered = tokio::time::timeout(
            Duration::from_secs(60),
            ask(&app, &web, "GET", "/latest/meta-data/instance-id", None),
        )
        .await;
        let (status, _) = answered.expect("answered, not left hanging");
        assert_eq!(status, 502);
        let waited = started.elapsed();
        assert!(
            waited >= crate::upstream::TIMEOUT && waited < 2 * crate::upstream::TIMEOUT,
            "{waited:?}"
        );
    }

    #[tokio::test]
    async fn a_connection_without_a_caller_gets_403_for_everything() {
        let clock = FakeClock::new();
        let sts = FakeSts::new(&clock);
        let app = app(&sts, &clock);
        let nobody = Peer::new("10.0.0.9:5000".parse().unwrap(), Err(Refusal::NoRecord));
        assert_eq!(
            ask(&app, &nobody, "PUT", "/latest/api/token", None).await.0,
            403
        );
        assert_eq!(
            ask(
                &app,
                &nobody,
                "GET",
                "/latest/meta-data/iam/security-credentials/",
                None
            )
            .await
            .0,
            403
        );
    }
}
