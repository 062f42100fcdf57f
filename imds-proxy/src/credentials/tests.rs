//! Unit tests of [`super`], and the fakes other modules' tests use (`FakeSts`, `FakeClock`).
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use super::*;

/// A clock that moves only when told, or (`following_tokio`) with tokio's clock, which a test
/// started paused moves by exactly the sleeps it waits for.
pub struct FakeClock {
    wall: SystemTime,
    mono: Instant,
    offset: Mutex<Duration>,
    tokio_start: Option<tokio::time::Instant>,
}

impl FakeClock {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            wall: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
            mono: Instant::now(),
            offset: Mutex::new(Duration::ZERO),
            tokio_start: None,
        })
    }
    fn following_tokio() -> Arc<Self> {
        Arc::new(Self {
            tokio_start: Some(tokio::time::Instant::now()),
            ..Arc::into_inner(Self::new()).unwrap()
        })
    }
    fn advance(&self, by: Duration) {
        *self.offset.lock().unwrap() += by;
    }
    fn elapsed(&self) -> Duration {
        *self.offset.lock().unwrap() + self.tokio_start.map(|t| t.elapsed()).unwrap_or_default()
    }
}

impl Clock for FakeClock {
    fn now(&self) -> SystemTime {
        self.wall + self.elapsed()
    }
    fn instant(&self) -> Instant {
        self.mono + self.elapsed()
    }
}

/// STS as a counter: each call answers a fresh key id (`AKID<n>`) valid for the asked
/// duration from the fake clock's now, or fails while `failing`; calls wait for `gate` when
/// one is set.
pub struct FakeSts {
    clock: Arc<FakeClock>,
    calls: AtomicUsize,
    /// Every key asked for, in order.
    pub asked: Mutex<Vec<Key>>,
    failing: AtomicBool,
    /// Fail as an unreachable STS does.
    unusable: AtomicBool,
    gate: Option<Arc<tokio::sync::Semaphore>>,
}

impl FakeSts {
    pub fn new(clock: &Arc<FakeClock>) -> Arc<Self> {
        Self::gated(clock, None)
    }
    pub fn gated(clock: &Arc<FakeClock>, gate: Option<Arc<tokio::sync::Semaphore>>) -> Arc<Self> {
        Arc::new(Self {
            clock: clock.clone(),
            calls: AtomicUsize::new(0),
            asked: Mutex::new(Vec::new()),
            failing: AtomicBool::new(false),
            unusable: AtomicBool::new(false),
            gate,
        })
    }
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl AssumeRole for FakeSts {
    fn assume<'a>(&'a self, key: &'a Key, duration: Duration) -> Assumed<'a> {
        Box::pin(async move {
            let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            self.asked.lock().unwrap().push(key.clone());
            if let Some(gate) = &self.gate {
                let _permit = gate.acquire().await.unwrap();
            }
            if self.failing.load(Ordering::SeqCst) {
                return Err(Error::Sts {
                    role_arn: key.role_arn.clone(),
                    message: "AccessDenied".into(),
                    failure: Failure::Refused(Refusal::Role),
                });
            }
            if self.unusable.load(Ordering::SeqCst) {
                return Err(Error::Sts {
                    role_arn: key.role_arn.clone(),
                    message: "connection refused".into(),
                    failure: Failure::Unavailable,
                });
            }
            Ok(Assumption {
                access_key_id: format!("AKID{n}"),
                secret_access_key: "secret".into(),
                session_token: "token".into(),
                expiration: self.clock.now() + duration,
            })
        })
    }
}

const HOUR: Duration = Duration::from_secs(3600);
const REFRESH_BEFORE: Duration = Duration::from_secs(15 * 60);
const ANSWER_WITHIN: Duration = Duration::from_millis(900);

pub fn cache(sts: &Arc<FakeSts>, clock: &Arc<FakeClock>) -> Arc<Cache> {
    Cache::new(
        sts.clone(),
        clock.clone(),
        Settings {
            duration: HOUR,
            refresh_before: REFRESH_BEFORE,
            answer_within: ANSWER_WITHIN,
            tagging: Tagging::default(),
        },
        Arc::new(Metrics::default()),
    )
}

fn key(role: &str) -> Key {
    Key {
        role_arn: format!("arn:aws:iam::123456789012:role/{role}"),
        session_name: "web-1".into(),
        external_id: None,
        tags: Default::default(),
    }
}

/// Let spawned tasks run until `done`, at most a bounded number of turns.
async fn until(done: impl Fn() -> bool) {
    for _ in 0..1000 {
        if done() {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("the condition never held");
}

#[test]
fn an_error_chain_is_one_line_without_repeats() {
    #[derive(Debug)]
    struct E(&'static str, Option<Box<E>>);
    impl std::fmt::Display for E {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }
    impl std::error::Error for E {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|e| e as _)
        }
    }
    let chain = E(
        "dispatch failure",
        Some(Box::new(E(
            "timeout",
            Some(Box::new(E(
                "timeout",
                Some(Box::new(E("HTTP read timeout after 5s", None))),
            ))),
        ))),
    );
    assert_eq!(
        sts::one_line(&chain),
        "dispatch failure: timeout: HTTP read timeout after 5s"
    );
}

#[tokio::test]
async fn prefetches_run_a_few_at_once_and_requests_do_not_wait_for_them() {
    let clock = FakeClock::new();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let sts = FakeSts::gated(&clock, Some(gate.clone()));
    let cache = cache(&sts, &clock);
    let keys: Vec<Key> = (0..100).map(|i| key(&format!("Fleet-{i}"))).collect();
    for k in &keys {
        cache.prefetch(k.clone());
    }
    until(|| sts.calls() == PREFETCH_AT_ONCE).await;
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    assert_eq!(sts.calls(), PREFETCH_AT_ONCE, "no more than that at once");
    // A request for a key still queued starts its own call at once.
    let asking = {
        let (cache, k) = (cache.clone(), keys[99].clone());
        tokio::spawn(async move { cache.get(&k).await })
    };
    until(|| sts.calls() == PREFETCH_AT_ONCE + 1).await;
    // Every call may now end: all keys get a session, each key one call.
    gate.add_permits(1000);
    assert!(asking.await.unwrap().is_ok());
    until(|| cache.sessions() == 100).await;
    assert_eq!(
        sts.calls(),
        100,
        "one call a key: the queued prefetch found the session"
    );
}

#[tokio::test(start_paused = true)]
async fn a_prefetch_sts_failed_for_its_own_reasons_is_tried_again_after_its_back_off() {
    let clock = FakeClock::following_tokio();
    let sts = FakeSts::new(&clock);
    let cache = cache(&sts, &clock);
    sts.unusable.store(true, Ordering::SeqCst);
    cache.prefetch(key("Busy"));
    until(|| sts.calls() == 1).await;
    // Within the first back-off (1 s): no second call.
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(sts.calls(), 1, "not before its back-off");
    sts.unusable.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(200)).await;
    until(|| cache.sessions() == 1).await;
    assert_eq!(sts.calls(), 2, "tried again once, and cached");
    // Nothing more once it has its session.
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert_eq!(sts.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_prefetch_is_tried_a_bounded_number_of_times_and_a_refusal_once() {
    let clock = FakeClock::following_tokio();
    let sts = FakeSts::new(&clock);
    let cache = cache(&sts, &clock);
    sts.unusable.store(true, Ordering::SeqCst);
    cache.prefetch(key("Down"));
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert_eq!(sts.calls(), PREFETCH_ATTEMPTS, "STS down: tried, then left");
    assert_eq!(cache.sessions(), 0);
    sts.unusable.store(false, Ordering::SeqCst);
    sts.failing.store(true, Ordering::SeqCst);
    cache.prefetch(key("Refused"));
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert_eq!(
        sts.calls(),
        PREFETCH_ATTEMPTS + 1,
        "a refusal is STS's answer: not asked again"
    );
}

#[test]
fn a_pod_s_image_is_tagged_only_where_its_container_is_told_apart() {
    let tags = |told_apart: bool, pod: bool| {
        let container = crate::runtime::Container {
            id: "c0ffee".into(),
            name: "web".into(),
            image: "sha256:abcd".into(),
            pod: pod.then(|| crate::runtime::Pod {
                namespace: "team-a".into(),
                name: "web".into(),
                uid: "u-1".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let tagging = Tagging {
            tags: Tags::new(vec![], vec![]).unwrap(),
            instance_id: None,
            told_apart,
        };
        tagging
            .of(&container)
            .tags
            .iter()
            .any(|t| t.key == imds_policy::tags::IMAGE && t.value == "sha256:abcd")
    };
    assert!(tags(true, true), "a pod's container in cgroup mode");
    assert!(
        !tags(false, true),
        "a pod's container in tc mode: could be another's"
    );
    assert!(
        tags(false, false) && tags(true, false),
        "a Docker container, its own address"
    );
}

#[tokio::test]
async fn the_tags_are_part_of_the_key() {
    let clock = FakeClock::new();
    let sts = FakeSts::new(&clock);
    let cache = cache(&sts, &clock);
    let tagged = |value: &str| Key {
        tags: Arc::new(imds_policy::tags::SessionTags {
            tags: vec![imds_policy::tags::Tag {
                key: "team".into(),
                value: value.into(),
            }],
            ..Default::default()
        }),
        ..key("Shared")
    };
    let a = cache.get(&tagged("a")).await.unwrap();
    let b = cache.get(&tagged("b")).await.unwrap();
    assert_ne!(a.access_key_id, b.access_key_id, "a session per tag set");
    assert_eq!(sts.calls(), 2);
    let again = cache.get(&tagged("a")).await.unwrap();
    assert_eq!(again.access_key_id, a.access_key_id);
    assert_eq!(sts.asked.lock().unwrap()[1].tags.tags[0].value, "b");
}

#[tokio::test]
async fn a_queued_prefetch_of_a_forgotten_container_makes_no_call_and_no_entry() {
    let clock = FakeClock::new();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let sts = FakeSts::gated(&clock, Some(gate.clone()));
    let cache = cache(&sts, &clock);
    let busy: Vec<Key> = (0..PREFETCH_AT_ONCE)
        .map(|i| Key {
            session_name: format!("busy-{i}"),
            ..key("Busy")
        })
        .collect();
    for k in &busy {
        cache.prefetch(k.clone());
    }
    until(|| sts.calls() == PREFETCH_AT_ONCE).await;
    // Queued behind them; its container is destroyed before a permit comes.
    let gone = Key {
        session_name: "gone-1".into(),
        ..key("Gone")
    };
    cache.prefetch(gone.clone());
    cache.forget_session("gone-1");
    gate.add_permits(1000);
    until(|| cache.sessions() == PREFETCH_AT_ONCE).await;
    // A released permit goes straight to a waiter: all permits free means the queued
    // prefetch has had its turn and ended.
    until(|| cache.prefetching.available_permits() == PREFETCH_AT_ONCE).await;
    assert_eq!(
        sts.calls(),
        PREFETCH_AT_ONCE,
        "no call for the forgotten container"
    );
    assert_eq!(cache.len(), PREFETCH_AT_ONCE, "and no entry left behind");
}

#[tokio::test]
async fn concurrent_requests_for_one_key_make_one_sts_call() {
    let clock = FakeClock::new();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let sts = FakeSts::gated(&clock, Some(gate.clone()));
    let cache = cache(&sts, &clock);
    let waiting: Vec<_> = (0..20)
        .map(|_| {
            let cache = cache.clone();
            tokio::spawn(async move { cache.get(&key("Web")).await })
        })
        .collect();
    until(|| sts.calls() == 1).await;
    gate.add_permits(100);
    for task in waiting {
        assert_eq!(task.await.unwrap().unwrap().access_key_id, "AKID1");
    }
    assert_eq!(sts.calls(), 1);
    // Another key is another session.
    assert_eq!(
        cache.get(&key("Batch")).await.unwrap().access_key_id,
        "AKID2"
    );
}

#[tokio::test]
async fn a_session_is_refreshed_ahead_of_expiry_while_the_old_one_is_served() {
    let clock = FakeClock::new();
    let sts = FakeSts::new(&clock);
    let cache = cache(&sts, &clock);
    assert_eq!(cache.get(&key("Web")).await.unwrap().access_key_id, "AKID1");
    // Not due yet: cached, no call.
    clock.advance(HOUR - REFRESH_BEFORE - Duration::from_secs(1));
    assert_eq!(cache.get(&key("Web")).await.unwrap().access_key_id, "AKID1");
    assert_eq!(sts.calls(), 1);
    // Due: the current session is answered at once, the new one fetched behind it.
    clock.advance(Duration::from_secs(2));
    assert_eq!(cache.get(&key("Web")).await.unwrap().access_key_id, "AKID1");
    until(|| sts.calls() == 2).await;
    until(|| {
        cache
            .entry(&key("Web"))
            .state()
            .session
            .as_ref()
            .is_some_and(|s| s.access_key_id == "AKID2")
    })
    .await;
    assert_eq!(cache.get(&key("Web")).await.unwrap().access_key_id, "AKID2");
    assert_eq!(sts.calls(), 2);
}

#[tokio::test]
async fn through_an_sts_outage_the_cached_session_is_served_until_it_expires() {
    let clock = FakeClock::new();
    let sts = FakeSts::new(&clock);
    let cache = cache(&sts, &clock);
    cache.get(&key("Web")).await.unwrap();
    sts.failing.store(true, Ordering::SeqCst);
    clock.advance(HOUR - Duration::from_secs(60));
    // Due and STS fails: still the cached session (the refresh failed behind it).
    assert_eq!(cache.get(&key("Web")).await.unwrap().access_key_id, "AKID1");
    until(|| sts.calls() == 2).await;
    // Expired: an error, never a stale session.
    clock.advance(Duration::from_secs(61));
    let err = cache.get(&key("Web")).await.unwrap_err();
    assert!(err.to_string().contains("AccessDenied"), "{err}");
}

#[tokio::test]
async fn a_failure_is_remembered_for_a_back_off_then_retried() {
    let clock = FakeClock::new();
    let sts = FakeSts::new(&clock);
    sts.failing.store(true, Ordering::SeqCst);
    let cache = cache(&sts, &clock);
    for _ in 0..5 {
        assert!(cache.get(&key("Admin")).await.is_err());
    }
    assert_eq!(sts.calls(), 1, "the failure answered four of them");
    clock.advance(FAILURE_FIRST);
    assert!(cache.get(&key("Admin")).await.is_err());
    assert_eq!(sts.calls(), 2, "asked again after the back-off");
    // The back-off doubles: one second later is not enough.
    clock.advance(FAILURE_FIRST);
    assert!(cache.get(&key("Admin")).await.is_err());
    assert_eq!(sts.calls(), 2);
    clock.advance(FAILURE_FIRST);
    sts.failing.store(false, Ordering::SeqCst);
    assert_eq!(
        cache.get(&key("Admin")).await.unwrap().access_key_id,
        "AKID3"
    );
    // Another key was never affected.
    assert!(cache.get(&key("Web")).await.is_ok());
}

#[tokio::test]
async fn the_external_id_reaches_sts_and_is_part_of_the_key() {
    let clock = FakeClock::new();
    let sts = FakeSts::new(&clock);
    let cache = cache(&sts, &clock);
    let with = Key {
        external_id: Some("tenant-7".into()),
        tags: Default::default(),
        ..key("Web")
    };
    assert_eq!(cache.get(&with).await.unwrap().access_key_id, "AKID1");
    // The same role and session without the id is another session, never the cached one.
    assert_eq!(cache.get(&key("Web")).await.unwrap().access_key_id, "AKID2");
    let asked = sts.asked.lock().unwrap().clone();
    assert_eq!(asked[0].external_id.as_deref(), Some("tenant-7"));
    assert_eq!(asked[1].external_id, None);
}

#[tokio::test]
async fn a_destroyed_containers_sessions_are_forgotten() {
    let clock = FakeClock::new();
    let sts = FakeSts::new(&clock);
    let cache = cache(&sts, &clock);
    cache.get(&key("Web")).await.unwrap();
    assert_eq!(cache.len(), 1);
    cache.forget_session("web-1");
    assert_eq!(cache.len(), 0, "nothing kept for a destroyed container");
    assert_eq!(cache.get(&key("Web")).await.unwrap().access_key_id, "AKID2");
    // What a missed destroy event left behind goes at the next reconciliation.
    let live: std::collections::HashSet<String> = ["other-1".to_owned()].into();
    assert_eq!(cache.retain_sessions(&live), 1);
    assert_eq!(cache.len(), 0);
}

/// STS hangs: the first request is answered Pending once the budget is spent, the call goes
/// on, and what it gets is there for the next request. (Paused tokio time: the budget passes
/// when every task is waiting.)
#[tokio::test(start_paused = true)]
async fn a_hanging_call_is_answered_within_the_budget_and_cached_when_it_ends() {
    let clock = FakeClock::new();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let sts = FakeSts::gated(&clock, Some(gate.clone()));
    let cache = cache(&sts, &clock);
    let started = tokio::time::Instant::now();
    let err = cache.get(&key("Web")).await.unwrap_err();
    assert!(matches!(err, Error::Pending { .. }), "{err}");
    assert_eq!(started.elapsed(), ANSWER_WITHIN);
    // A second request joins the same call: still one call, also Pending.
    assert!(matches!(
        cache.get(&key("Web")).await.unwrap_err(),
        Error::Pending { .. }
    ));
    assert_eq!(sts.calls(), 1);
    gate.add_permits(1);
    until(|| cache.entry(&key("Web")).state().session.is_some()).await;
    assert_eq!(cache.get(&key("Web")).await.unwrap().access_key_id, "AKID1");
    assert_eq!(sts.calls(), 1);
}

/// STS unreachable: after five failed calls (any roles) the breaker opens and a role not
/// cached is answered at once, without a call; cached roles are still served; after the
/// pause one trial call goes through, and its success closes the breaker.
#[tokio::test]
async fn the_breaker_opens_on_an_unusable_sts_and_a_trial_closes_it() {
    let clock = FakeClock::new();
    let sts = FakeSts::new(&clock);
    let cache = cache(&sts, &clock);
    cache.get(&key("Cached")).await.unwrap();
    sts.unusable.store(true, Ordering::SeqCst);
    for i in 0..breaker::THRESHOLD {
        let err = cache.get(&key(&format!("R{i}"))).await.unwrap_err();
        assert_eq!(err.reason(), "sts_unavailable", "{err}");
    }
    let calls = sts.calls();
    let err = cache.get(&key("Another")).await.unwrap_err();
    assert!(
        matches!(err, Error::BreakerOpen { failures: 5, .. }),
        "{err}"
    );
    assert_eq!(sts.calls(), calls, "no call while open");
    assert!(matches!(cache.breaker(), breaker::Status::Open { .. }));
    assert_eq!(
        cache.get(&key("Cached")).await.unwrap().access_key_id,
        "AKID1"
    );
    // STS is back; after the pause the trial call succeeds and closes the breaker.
    sts.unusable.store(false, Ordering::SeqCst);
    clock.advance(Duration::from_secs(5));
    assert!(cache.get(&key("Another")).await.is_ok());
    assert_eq!(cache.breaker(), breaker::Status::Closed);
}

/// A refusal of one role (AccessDenied) says nothing about STS: however many, no breaker.
#[tokio::test]
async fn refusals_do_not_open_the_breaker() {
    let clock = FakeClock::new();
    let sts = FakeSts::new(&clock);
    sts.failing.store(true, Ordering::SeqCst);
    let cache = cache(&sts, &clock);
    for i in 0..3 * breaker::THRESHOLD {
        let err = cache.get(&key(&format!("R{i}"))).await.unwrap_err();
        assert_eq!(err.reason(), "sts_refused");
    }
    assert_eq!(cache.breaker(), breaker::Status::Closed);
    assert_eq!(sts.calls() as u32, 3 * breaker::THRESHOLD);
}

#[test]
fn a_refusal_of_what_the_proxy_adds_is_told_from_a_refusal_of_the_role() {
    let of = Refusal::of;
    assert_eq!(
        of(
            "AccessDenied: User: arn:aws:sts::1:assumed-role/node/i-0 is not authorized to \
            perform: sts:TagSession on resource: arn:aws:iam::1:role/app"
        ),
        Refusal::SessionTags
    );
    assert_eq!(
        of("AccessDenied: ... not authorized to perform: sts:SetSourceIdentity on resource: x"),
        Refusal::SourceIdentity
    );
    assert_eq!(
        of("AccessDenied: ... not authorized to perform: sts:AssumeRole on resource: x"),
        Refusal::Role
    );
    assert_eq!(of("ValidationError: bad ARN"), Refusal::Role);
    // Only the proxy's additions have a way out of their own; every refusal is a refusal.
    assert!(
        Refusal::SessionTags
            .way_out()
            .unwrap()
            .contains("--session-tags off")
    );
    assert!(
        Refusal::SourceIdentity
            .way_out()
            .unwrap()
            .contains("--source-identity off")
    );
    assert_eq!(Refusal::Role.way_out(), None);
    for refusal in [Refusal::Role, Refusal::SessionTags, Refusal::SourceIdentity] {
        assert!(
            !Failure::Refused(refusal).unusable(),
            "{refusal:?} is no fault of STS"
        );
    }
}
