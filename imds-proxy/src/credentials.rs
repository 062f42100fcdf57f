//! Role credentials: STS AssumeRole with the instance's own credentials (from the upstream IMDS via
//! aws-config), cached by (role ARN, session name, external id).
//!
//! - Single flight: any number of concurrent requests for one key make one STS call.
//! - Refresh in the background when less than `refresh_before` of the lifetime remains; until the
//!   new session arrives the current one is served.
//! - Through an STS outage the cached session is served until it expires; after that the caller
//!   gets an error (which the API turns into a 5xx the SDKs retry).
//! - A failed call is remembered: until a back-off (1 s, doubling to 60 s) has passed, callers of
//!   that key get the same error without another STS call, so a container asking for a role STS
//!   refuses cannot turn each of its requests into an STS call.
//!
//! STS and the clock are behind [`AssumeRole`] and [`Clock`], so all of this is unit-tested
//! without a network (see the tests below).
use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use aws_config::{BehaviorVersion, Region, imds};
use aws_sdk_sts::config::SharedCredentialsProvider;

use crate::{limits::Backoff, metrics::Metrics};

/// What a session is cached under.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Key {
    pub role_arn: String,
    pub session_name: String,
    pub external_id: Option<String>,
}

impl Key {
    /// The one key a container's credentials for `role` are cached under: the handler and the
    /// prefetch at container start both use it, so they cannot drift apart.
    pub fn session(container: &crate::docker::Container, role: &crate::roles::Resolved) -> Self {
        Key {
            role_arn: role.arn.clone(),
            session_name: crate::roles::session_name(Some(&container.name), &container.id),
            external_id: role.external_id.clone(),
        }
    }
}

/// A role session.
#[derive(Clone, Debug)]
pub struct Session {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: String,
    pub expiration: SystemTime,
    pub last_updated: SystemTime,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("STS AssumeRole {role_arn} failed: {message}")]
    Sts { role_arn: String, message: String },
}

/// A future an [`AssumeRole`] returns.
pub type Assumed<'a> = Pin<Box<dyn Future<Output = Result<Assumption, Error>> + Send + 'a>>;

/// What STS answered: the session's secrets and when it expires.
#[derive(Clone, Debug)]
pub struct Assumption {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: String,
    pub expiration: SystemTime,
}

/// Turns a key into a session: STS AssumeRole in the daemon ([`Sts`]), a fake in unit tests.
pub trait AssumeRole: Send + Sync + 'static {
    fn assume<'a>(&'a self, key: &'a Key, duration: Duration) -> Assumed<'a>;
}

/// Wall-clock time (sessions' expirations) and monotonic time (back-offs), injected so that
/// refresh and expiry are tested without waiting.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> SystemTime;
    fn instant(&self) -> Instant;
}

/// The real clocks.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
    fn instant(&self) -> Instant {
        Instant::now()
    }
}

/// STS AssumeRole through the SDK.
pub struct Sts(pub aws_sdk_sts::Client);

impl AssumeRole for Sts {
    fn assume<'a>(&'a self, key: &'a Key, duration: Duration) -> Assumed<'a> {
        Box::pin(async move {
            let sts_error = |message: String| Error::Sts {
                role_arn: key.role_arn.clone(),
                message,
            };
            let output = self
                .0
                .assume_role()
                .role_arn(&key.role_arn)
                .role_session_name(&key.session_name)
                .duration_seconds(duration.as_secs() as i32)
                .set_external_id(key.external_id.clone())
                .send()
                .await
                .map_err(|e| sts_error(aws_sdk_sts::error::DisplayErrorContext(&e).to_string()))?;
            let creds = output
                .credentials()
                .ok_or_else(|| sts_error("answer without credentials".into()))?;
            let expiration = SystemTime::try_from(*creds.expiration())
                .map_err(|e| sts_error(format!("bad expiration: {e}")))?;
            Ok(Assumption {
                access_key_id: creds.access_key_id().to_owned(),
                secret_access_key: creds.secret_access_key().to_owned(),
                session_token: creds.session_token().to_owned(),
                expiration,
            })
        })
    }
}

#[derive(Default)]
struct Entry {
    session: Mutex<Option<Session>>,
    /// Held while an STS call for this key is under way.
    flight: tokio::sync::Mutex<()>,
    /// The last failure in a row, if the last call failed.
    failure: Mutex<(Backoff, Option<Error>)>,
}

/// Back-off after a failed STS call for one key.
const FAILURE_FIRST: Duration = Duration::from_secs(1);
const FAILURE_CAP: Duration = Duration::from_secs(60);

pub struct Cache {
    sts: Arc<dyn AssumeRole>,
    clock: Arc<dyn Clock>,
    duration: Duration,
    refresh_before: Duration,
    entries: Mutex<HashMap<Key, Arc<Entry>>>,
    metrics: Arc<Metrics>,
}

/// The STS client: instance credentials from the upstream IMDS, region from the flag or from IMDS.
pub async fn sts_client(
    upstream: &str,
    region: Option<&str>,
    endpoint: Option<&str>,
) -> anyhow::Result<aws_sdk_sts::Client> {
    let imds_client = imds::Client::builder()
        .endpoint(upstream)
        .map_err(|e| anyhow::anyhow!("upstream {upstream}: {e}"))?
        .build();
    let region = match region {
        Some(region) => Region::new(region.to_owned()),
        None => imds::region::ImdsRegionProvider::builder()
            .imds_client(imds_client.clone())
            .build()
            .region()
            .await
            .ok_or_else(|| {
                anyhow::anyhow!("no --region given and the upstream IMDS did not say one")
            })?,
    };
    let provider = imds::credentials::ImdsCredentialsProvider::builder()
        .imds_client(imds_client)
        .build();
    let mut config = aws_sdk_sts::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(region)
        .credentials_provider(SharedCredentialsProvider::new(provider));
    if let Some(endpoint) = endpoint {
        config = config.endpoint_url(endpoint);
    }
    Ok(aws_sdk_sts::Client::from_conf(config.build()))
}

impl Cache {
    pub fn new(
        sts: Arc<dyn AssumeRole>,
        clock: Arc<dyn Clock>,
        duration: Duration,
        refresh_before: Duration,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            sts,
            clock,
            duration,
            refresh_before,
            entries: Mutex::new(HashMap::new()),
            metrics,
        })
    }

    fn entry(&self, key: &Key) -> Arc<Entry> {
        self.entries
            .lock()
            .expect("cache poisoned")
            .entry(key.clone())
            .or_default()
            .clone()
    }

    /// Whether a session is due for refresh (less than `refresh_before` left).
    fn due(&self, session: &Session, now: SystemTime) -> bool {
        session
            .expiration
            .duration_since(now)
            .map(|left| left < self.refresh_before)
            .unwrap_or(true)
    }

    /// A valid session for `key`: cached, or fetched (once, whoever else is asking).
    pub async fn get(self: &Arc<Self>, key: &Key) -> Result<Session, Error> {
        let entry = self.entry(key);
        let now = self.clock.now();
        let cached = entry.session.lock().expect("entry poisoned").clone();
        if let Some(session) = &cached
            && session.expiration > now
        {
            self.metrics.cache(true);
            if self.due(session, now) {
                self.refresh_in_background(key.clone());
            }
            return Ok(session.clone());
        }
        self.metrics.cache(false);
        self.fetch(&entry, key).await
    }

    /// Fetch unless someone else just did; single flight per key.
    async fn fetch(&self, entry: &Entry, key: &Key) -> Result<Session, Error> {
        let _flight = match entry.flight.try_lock() {
            Ok(flight) => flight,
            Err(_) => {
                self.metrics.sts_call_joined();
                entry.flight.lock().await
            }
        };
        let now = self.clock.now();
        if let Some(session) = entry.session.lock().expect("entry poisoned").clone()
            && session.expiration > now
            && !self.due(&session, now)
        {
            return Ok(session); // fetched while we waited
        }
        let remembered = {
            let failure = entry.failure.lock().expect("entry poisoned");
            failure
                .0
                .waiting(self.clock.instant())
                .then(|| failure.1.clone())
                .flatten()
        };
        let result = match remembered {
            Some(err) => {
                self.metrics.sts_call_avoided();
                Err(err)
            }
            None => {
                let result = self.assume(key).await;
                let mut failure = entry.failure.lock().expect("entry poisoned");
                match &result {
                    Ok(_) => *failure = (Backoff::default(), None),
                    Err(err) => {
                        let retry_in =
                            failure
                                .0
                                .failed(self.clock.instant(), FAILURE_FIRST, FAILURE_CAP);
                        tracing::warn!(
                            %err,
                            role_arn = %key.role_arn,
                            failures = failure.0.failures(),
                            ?retry_in,
                            "STS refused or failed; not asking again for this role and container until the back-off has passed"
                        );
                        failure.1 = Some(err.clone());
                    }
                }
                result
            }
        };
        match result {
            Ok(session) => {
                *entry.session.lock().expect("entry poisoned") = Some(session.clone());
                Ok(session)
            }
            Err(err) => {
                // An outage: the current session, while it lasts, is better than nothing.
                let current = entry.session.lock().expect("entry poisoned").clone();
                match current {
                    Some(session) if session.expiration > self.clock.now() => {
                        tracing::warn!(%err, role_arn = %key.role_arn, "serving the cached session");
                        Ok(session)
                    }
                    _ => Err(err),
                }
            }
        }
    }

    fn refresh_in_background(self: &Arc<Self>, key: Key) {
        let entry = self.entry(&key);
        if entry.flight.try_lock().is_err() {
            return; // a fetch is already under way
        }
        let this = self.clone();
        tokio::spawn(async move {
            let _ = this.fetch(&entry, &key).await;
        });
    }

    /// Fetch ahead of the first request (a container with a role just started).
    pub fn prefetch(self: &Arc<Self>, key: Key) {
        let this = self.clone();
        tokio::spawn(async move {
            if let Err(err) = this.get(&key).await {
                tracing::warn!(%err, "prefetch failed");
            }
        });
    }

    /// Until the events end: fetch ahead the session of every container that starts with a role
    /// (under the same key the handler uses), forget destroyed containers' sessions. The proxy's
    /// own container (when it runs as one) is never asked for.
    pub async fn follow_containers(
        self: Arc<Self>,
        policy: crate::roles::Policy,
        mut events: tokio::sync::broadcast::Receiver<crate::docker::Event>,
        own_container: Option<String>,
    ) {
        use crate::docker::{Event, next_event};
        while let Some(event) = next_event(&mut events, "roles").await {
            match event {
                Event::Started(container) if Some(&container.id) == own_container.as_ref() => {}
                Event::Started(container) => {
                    match policy.resolve(&container.labels, &container.env) {
                        Ok(Some(role)) => self.prefetch(Key::session(&container, &role)),
                        Ok(None) => {}
                        Err(err) => tracing::warn!(
                            container_id = %container.id,
                            container = %container.name,
                            %err,
                            "role refused; no STS call made"
                        ),
                    }
                }
                Event::Destroyed(container) => self.forget_session(&crate::roles::session_name(
                    Some(&container.name),
                    &container.id,
                )),
            }
        }
    }

    /// Forget every session with this session name (its container was destroyed).
    pub fn forget_session(&self, session_name: &str) {
        self.entries
            .lock()
            .expect("cache poisoned")
            .retain(|key, _| key.session_name != session_name);
    }

    async fn assume(&self, key: &Key) -> Result<Session, Error> {
        let started = Instant::now();
        let result = self.sts.assume(key, self.duration).await;
        self.metrics.sts_call(started.elapsed(), result.is_ok());
        let assumed = result?;
        tracing::info!(role_arn = %key.role_arn, session = %key.session_name, "assumed role");
        Ok(Session {
            access_key_id: assumed.access_key_id,
            secret_access_key: assumed.secret_access_key,
            session_token: assumed.session_token,
            expiration: assumed.expiration,
            last_updated: self.clock.now(),
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use super::*;

    /// A clock that moves only when told.
    pub struct FakeClock {
        wall: SystemTime,
        mono: Instant,
        offset: Mutex<Duration>,
    }

    impl FakeClock {
        pub fn new() -> Arc<Self> {
            Arc::new(Self {
                wall: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
                mono: Instant::now(),
                offset: Mutex::new(Duration::ZERO),
            })
        }
        fn advance(&self, by: Duration) {
            *self.offset.lock().unwrap() += by;
        }
    }

    impl Clock for FakeClock {
        fn now(&self) -> SystemTime {
            self.wall + *self.offset.lock().unwrap()
        }
        fn instant(&self) -> Instant {
            self.mono + *self.offset.lock().unwrap()
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
        gate: Option<Arc<tokio::sync::Semaphore>>,
    }

    impl FakeSts {
        pub fn new(clock: &Arc<FakeClock>) -> Arc<Self> {
            Self::gated(clock, None)
        }
        fn gated(clock: &Arc<FakeClock>, gate: Option<Arc<tokio::sync::Semaphore>>) -> Arc<Self> {
            Arc::new(Self {
                clock: clock.clone(),
                calls: AtomicUsize::new(0),
                asked: Mutex::new(Vec::new()),
                failing: AtomicBool::new(false),
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

    pub fn cache(sts: &Arc<FakeSts>, clock: &Arc<FakeClock>) -> Arc<Cache> {
        Cache::new(
            sts.clone(),
            clock.clone(),
            HOUR,
            REFRESH_BEFORE,
            Arc::new(Metrics::default()),
        )
    }

    fn key(role: &str) -> Key {
        Key {
            role_arn: format!("arn:aws:iam::123456789012:role/{role}"),
            session_name: "web-1".into(),
            external_id: None,
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
                .session
                .lock()
                .unwrap()
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
        cache.forget_session("web-1");
        assert_eq!(cache.get(&key("Web")).await.unwrap().access_key_id, "AKID2");
    }
}
