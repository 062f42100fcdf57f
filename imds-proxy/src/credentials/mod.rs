//! Role credentials: STS AssumeRole with the instance's own credentials (from the upstream IMDS via
//! aws-config), cached by (role ARN, session name, external id).
//!
//! - Single flight: any number of concurrent requests for one key make one STS call.
//! - A bounded answer: a request waits at most `answer_within` (900 ms by default, inside the
//!   SDKs' 1 s IMDS budget) for a call under way; then it gets [`Error::Pending`] (a 503 the SDKs
//!   retry) while the call goes on in the background and its result is cached for the next one.
//! - Every call is bounded: the SDK's connect, attempt and operation timeouts, three attempts
//!   with jittered back-off, and [`CALL_LIMIT`] around all of it.
//! - A circuit breaker ([`breaker`]): after STS failed five calls in a row for reasons of its
//!   own, roles not cached are answered at once, with no call, until a trial call succeeds.
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
pub mod breaker;

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use aws_config::{BehaviorVersion, Region, imds};
use aws_sdk_sts::config::{retry::RetryConfig, timeout::TimeoutConfig};
use tokio::sync::watch;

use crate::{limits::Backoff, metrics::Metrics};
use breaker::Breaker;

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
    /// STS failed or refused; `failure` says which.
    #[error("STS AssumeRole {role_arn} failed: {message}")]
    Sts {
        role_arn: String,
        message: String,
        failure: Failure,
    },
    /// The call is still under way after the answer budget; it goes on in the background.
    #[error(
        "STS has not answered for {role_arn} within {waited:?}; the call goes on in the background"
    )]
    Pending { role_arn: String, waited: Duration },
    /// The breaker is open: no call made.
    #[error("STS failed {failures} calls in a row; breaker open, no call made for {role_arn}")]
    BreakerOpen { role_arn: String, failures: u32 },
}

/// How an STS call failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// STS refused this role (AccessDenied, a malformed ARN): nothing wrong with STS.
    Refused,
    /// STS's own failure: a connection that failed, a 5xx, throttling, an unreadable answer, no
    /// instance credentials to sign with. Counts toward the breaker.
    Unavailable,
    /// No answer in time (an attempt, the operation, or the call limit). Counts toward the
    /// breaker.
    TimedOut,
}

impl Failure {
    /// Whether STS itself is at fault (the breaker counts these).
    pub fn unusable(self) -> bool {
        self != Failure::Refused
    }
}

impl Error {
    /// A short reason for the metrics and the container's error message.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Sts {
                failure: Failure::Refused,
                ..
            } => "sts_refused",
            Error::Sts {
                failure: Failure::Unavailable,
                ..
            } => "sts_unavailable",
            Error::Sts {
                failure: Failure::TimedOut,
                ..
            } => "sts_timeout",
            Error::Pending { .. } => "pending",
            Error::BreakerOpen { .. } => "breaker_open",
        }
    }
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

/// Error codes with which STS says it is unusable right now (rather than refusing the role).
const UNUSABLE_CODES: &[&str] = &[
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "ServiceUnavailable",
    "InternalFailure",
    "InternalError",
];

impl AssumeRole for Sts {
    fn assume<'a>(&'a self, key: &'a Key, duration: Duration) -> Assumed<'a> {
        Box::pin(async move {
            let sts_error = |message: String, failure: Failure| Error::Sts {
                role_arn: key.role_arn.clone(),
                message,
                failure,
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
                .map_err(|e| {
                    use aws_sdk_sts::error::{ProvideErrorMetadata as _, SdkError};
                    let failure = match &e {
                        SdkError::ServiceError(service)
                            if service.raw().status().as_u16() >= 500
                                || e.code().is_some_and(|c| UNUSABLE_CODES.contains(&c)) =>
                        {
                            Failure::Unavailable
                        }
                        SdkError::ServiceError(_) => Failure::Refused,
                        SdkError::TimeoutError(_) => Failure::TimedOut,
                        // A failed connection, an unreadable answer, or no instance
                        // credentials to sign with: nothing to do with the role.
                        _ => Failure::Unavailable,
                    };
                    let message = match (e.code(), e.message()) {
                        // STS's own answer: its code and message say it all.
                        (Some(code), Some(message)) => format!("{code}: {message}"),
                        (Some(code), None) => code.to_owned(),
                        _ => one_line(&e),
                    };
                    sts_error(message, failure)
                })?;
            let creds = output.credentials().ok_or_else(|| {
                sts_error("answer without credentials".into(), Failure::Unavailable)
            })?;
            let expiration = SystemTime::try_from(*creds.expiration())
                .map_err(|e| sts_error(format!("bad expiration: {e}"), Failure::Unavailable))?;
            Ok(Assumption {
                access_key_id: creds.access_key_id().to_owned(),
                secret_access_key: creds.secret_access_key().to_owned(),
                session_token: creds.session_token().to_owned(),
                expiration,
            })
        })
    }
}

/// The STS client's bounds. Each attempt: 1 s to connect, 5 s for the answer (an STS slow by
/// seconds is still usable); three attempts with the SDK's jittered exponential back-off (from
/// 100 ms, at most 1 s apart); 12 s in all.
const STS_CONNECT: Duration = Duration::from_secs(1);
const STS_ATTEMPT: Duration = Duration::from_secs(5);
const STS_OPERATION: Duration = Duration::from_secs(12);
const STS_ATTEMPTS: u32 = 3;
/// Around a whole call, whatever the SDK does (it may also be fetching instance credentials).
pub const CALL_LIMIT: Duration = Duration::from_secs(15);
/// Instance credentials are refreshed this long before they expire.
const INSTANCE_CREDENTIALS_AHEAD: Duration = Duration::from_secs(5 * 60);

/// The STS client, configured as any AWS tool is: `aws_config` loads the environment and the
/// shared config files (`AWS_ENDPOINT_URL_STS`/`AWS_ENDPOINT_URL`, `AWS_USE_FIPS_ENDPOINT`,
/// `AWS_USE_DUALSTACK_ENDPOINT`, `AWS_PROFILE`, `AWS_MAX_ATTEMPTS`/`AWS_RETRY_MODE`, ...), and the
/// proxy's flags win over them. Two things are never taken from there:
/// - the credentials: always the instance's, from the upstream IMDS (never `AWS_ACCESS_KEY_ID`
///   or a profile's keys: the proxy assumes roles as the instance);
/// - the timeouts: the bounds below, which every answer of the proxy relies on.
///
/// Region: `--region`, else `AWS_REGION`/`AWS_DEFAULT_REGION` or the profile's, else the
/// instance's (from the upstream IMDS). Retries: the bounds below unless `AWS_MAX_ATTEMPTS` or
/// `AWS_RETRY_MODE` is set.
pub async fn sts_client(
    upstream: &str,
    region: Option<&str>,
    endpoint: Option<&str>,
) -> anyhow::Result<aws_sdk_sts::Client> {
    use aws_config::meta::region::RegionProviderChain;
    // The IMDS client's own bounds (1 s to connect, 1 s to answer, 3 attempts) hold for the
    // region and the instance credentials.
    let imds_client = imds::Client::builder()
        .endpoint(upstream)
        .map_err(|e| anyhow::anyhow!("upstream {upstream}: {e}"))?
        .build();
    let region_chain = RegionProviderChain::first_try(region.map(|r| Region::new(r.to_owned())))
        .or_else(aws_config::environment::EnvironmentVariableRegionProvider::new())
        .or_else(aws_config::profile::ProfileFileRegionProvider::builder().build())
        .or_else(
            imds::region::ImdsRegionProvider::builder()
                .imds_client(imds_client.clone())
                .build(),
        );
    let region = region_chain.region().await.ok_or_else(|| {
        anyhow::anyhow!(
            "no region: no --region, no AWS_REGION or profile region, and the upstream IMDS did \
             not say one"
        )
    })?;
    let provider = imds::credentials::ImdsCredentialsProvider::builder()
        .imds_client(imds_client)
        .build();
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .region(region)
        .credentials_provider(provider)
        // Instance credentials are fetched again well before they expire, so a rotation on the
        // instance is picked up before the old ones stop working.
        .identity_cache(
            aws_sdk_sts::config::IdentityCache::lazy()
                .buffer_time(INSTANCE_CREDENTIALS_AHEAD)
                .build(),
        )
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(STS_CONNECT)
                .read_timeout(STS_ATTEMPT)
                .operation_attempt_timeout(STS_ATTEMPT)
                .operation_timeout(STS_OPERATION)
                .build(),
        );
    let retries_from_environment = ["AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE"]
        .iter()
        .any(|v| std::env::var_os(v).is_some());
    if !retries_from_environment {
        loader = loader.retry_config(
            RetryConfig::standard()
                .with_max_attempts(STS_ATTEMPTS)
                .with_initial_backoff(Duration::from_millis(100))
                .with_max_backoff(Duration::from_secs(1)),
        );
    }
    if let Some(endpoint) = endpoint {
        loader = loader.endpoint_url(endpoint);
    }
    let shared = loader.load().await;
    tracing::info!(
        region = %shared.region().map(|r| r.to_string()).unwrap_or_default(),
        endpoint = endpoint
            .map(str::to_owned)
            .or_else(|| std::env::var("AWS_ENDPOINT_URL_STS").ok())
            .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok())
            .unwrap_or_else(|| "the regional endpoint".to_owned()),
        fips = shared.use_fips().unwrap_or(false),
        retries = if retries_from_environment { "from the environment" } else { "3 attempts" },
        "STS client configured"
    );
    Ok(aws_sdk_sts::Client::new(&shared))
}

/// An error and its causes in one line (`a: b: c`), without the SDK's Debug dump; a cause whose
/// text the line already holds is left out.
pub fn one_line(err: &(dyn std::error::Error + 'static)) -> String {
    let mut line = String::new();
    let mut next = Some(err);
    while let Some(e) = next {
        let text = e.to_string();
        if !text.is_empty() && !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
        next = e.source();
    }
    line
}

#[derive(Default)]
struct State {
    session: Option<Session>,
    /// An STS call for this key is under way.
    flying: bool,
    /// The last failure in a row, if the last call failed.
    failure: (Backoff, Option<Error>),
}

struct Entry {
    state: Mutex<State>,
    /// Bumped each time a call for this key ends: what waiting requests wake on.
    ended: watch::Sender<u64>,
}

impl Default for Entry {
    fn default() -> Self {
        Self {
            state: Mutex::default(),
            ended: watch::channel(0).0,
        }
    }
}

impl Entry {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("entry poisoned")
    }
}

/// Back-off after a failed STS call for one key.
const FAILURE_FIRST: Duration = Duration::from_secs(1);
const FAILURE_CAP: Duration = Duration::from_secs(60);

/// What the cache needs besides STS and a clock.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The sessions' lifetime, asked of STS.
    pub duration: Duration,
    /// Refresh when less than this is left.
    pub refresh_before: Duration,
    /// How long a request waits for a call under way before it is answered 503.
    pub answer_within: Duration,
}

pub struct Cache {
    sts: Arc<dyn AssumeRole>,
    clock: Arc<dyn Clock>,
    settings: Settings,
    breaker: Breaker,
    entries: Mutex<HashMap<Key, Arc<Entry>>>,
    metrics: Arc<Metrics>,
    /// Permits for calls made ahead of requests ([`PREFETCH_AT_ONCE`]).
    prefetching: Arc<tokio::sync::Semaphore>,
}

/// Calls made ahead of requests, at most at once. A proxy that starts (or resynchronises with
/// Docker) on a host running a thousand containers with roles would otherwise make a thousand
/// STS calls at once: a burst STS throttles, and whose buffers the allocator keeps as resident
/// memory. A request never waits for a permit: it joins the call under way or starts its own.
pub const PREFETCH_AT_ONCE: usize = 8;

/// What a request found when it looked.
enum Look {
    Ready(Result<Session, Error>),
    /// Wait for the call under way.
    Wait,
}

impl Cache {
    pub fn new(
        sts: Arc<dyn AssumeRole>,
        clock: Arc<dyn Clock>,
        settings: Settings,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            sts,
            clock,
            settings,
            breaker: Breaker::default(),
            entries: Mutex::new(HashMap::new()),
            metrics,
            prefetching: Arc::new(tokio::sync::Semaphore::new(PREFETCH_AT_ONCE)),
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

    /// How many keys the cache holds (sessions, calls under way, remembered failures).
    pub fn len(&self) -> usize {
        self.entries.lock().expect("cache poisoned").len()
    }

    /// Keys that hold a session (fetched, expired or not).
    pub fn sessions(&self) -> usize {
        let entries: Vec<Arc<Entry>> = self
            .entries
            .lock()
            .expect("cache poisoned")
            .values()
            .cloned()
            .collect();
        entries
            .iter()
            .filter(|e| e.state().session.is_some())
            .count()
    }

    /// Whether a session is due for refresh (less than `refresh_before` left).
    fn due(&self, session: &Session, now: SystemTime) -> bool {
        session
            .expiration
            .duration_since(now)
            .map(|left| left < self.settings.refresh_before)
            .unwrap_or(true)
    }

    /// The breaker's state now, for /readyz and /metrics.
    pub fn breaker(&self) -> breaker::Status {
        self.breaker.status(self.clock.instant())
    }

    /// A valid session for `key`: cached, or fetched (once, whoever else is asking), or an
    /// error within `answer_within`.
    pub async fn get(self: &Arc<Self>, key: &Key) -> Result<Session, Error> {
        let entry = self.entry(key);
        // Subscribed before looking: a call that ends after the look wakes this request.
        let mut ended = entry.ended.subscribe();
        match self.look(&entry, key, true) {
            Look::Ready(result) => return result,
            Look::Wait => {}
        }
        let waited = self.settings.answer_within;
        match tokio::time::timeout(waited, ended.changed()).await {
            Ok(_) => match self.look(&entry, key, false) {
                Look::Ready(result) => result,
                // Another call started already (a refresh): not this request's to wait for.
                Look::Wait => Err(Error::Pending {
                    role_arn: key.role_arn.clone(),
                    waited,
                }),
            },
            Err(_) => {
                self.metrics.sts_answer_pending();
                Err(Error::Pending {
                    role_arn: key.role_arn.clone(),
                    waited,
                })
            }
        }
    }

    /// What the entry holds for a request now; on the first look of a request, start a call if
    /// one is needed and none is under way.
    fn look(self: &Arc<Self>, entry: &Arc<Entry>, key: &Key, first: bool) -> Look {
        let now = self.clock.now();
        let mut state = entry.state();
        if let Some(session) = state.session.clone()
            && session.expiration > now
        {
            if first {
                self.metrics.cache(true);
            }
            if self.due(&session, now) && !state.flying && self.may_call(key, &state).is_ok() {
                // Served now; the new session is fetched behind it.
                self.start(entry, key, &mut state);
            }
            return Look::Ready(Ok(session));
        }
        if !first {
            // The call this request waited for ended without a session.
            return Look::Ready(Err(state.failure.1.clone().unwrap_or(Error::Pending {
                role_arn: key.role_arn.clone(),
                waited: self.settings.answer_within,
            })));
        }
        self.metrics.cache(false);
        if state.flying {
            self.metrics.sts_call_joined();
            return Look::Wait;
        }
        if let Err(err) = self.may_call(key, &state) {
            self.metrics.sts_call_avoided();
            return Look::Ready(Err(err));
        }
        self.start(entry, key, &mut state);
        Look::Wait
    }

    /// Whether a call for `key` may be made now: not while its last failure's back-off runs,
    /// nor while the breaker is open (a trial call, once it may go, is taken here).
    fn may_call(&self, key: &Key, state: &State) -> Result<(), Error> {
        if state.failure.0.waiting(self.clock.instant())
            && let Some(err) = state.failure.1.clone()
        {
            return Err(err);
        }
        self.breaker
            .permit(self.clock.instant())
            .map_err(|open| Error::BreakerOpen {
                role_arn: key.role_arn.clone(),
                failures: open.failures,
            })
    }

    /// Start the STS call for `key` in the background (the caller checked none is under way).
    /// It runs to its end whoever waits for it, and stores what it got.
    fn start(self: &Arc<Self>, entry: &Arc<Entry>, key: &Key, state: &mut State) {
        state.flying = true;
        let (this, entry, key) = (self.clone(), entry.clone(), key.clone());
        tokio::spawn(async move {
            let result = this.call(&key).await;
            {
                let mut state = entry.state();
                state.flying = false;
                match result {
                    Ok(session) => {
                        state.session = Some(session);
                        state.failure = (Backoff::default(), None);
                    }
                    Err(err) => {
                        let retry_in = state.failure.0.failed(
                            this.clock.instant(),
                            FAILURE_FIRST,
                            FAILURE_CAP,
                        );
                        let serving = state
                            .session
                            .as_ref()
                            .is_some_and(|s| s.expiration > this.clock.now());
                        tracing::warn!(
                            %err,
                            role_arn = %key.role_arn,
                            session = %key.session_name,
                            failures = state.failure.0.failures(),
                            ?retry_in,
                            serving_the_cached_session = serving,
                            "STS refused or failed; not asking again for this role and container until the back-off has passed"
                        );
                        state.failure.1 = Some(err);
                    }
                }
            }
            entry.ended.send_modify(|n| *n = n.wrapping_add(1));
        });
    }

    /// Fetch ahead of the first request (a container with a role was created or started), in
    /// the background, [`PREFETCH_AT_ONCE`] at most at once; a key that has a session or a call
    /// under way by then makes no call.
    pub fn prefetch(self: &Arc<Self>, key: Key) {
        // The entry is made now, not when a permit comes: a container destroyed meanwhile has
        // its entries forgotten, and the queued prefetch, finding its entry gone, makes none.
        let entry = self.entry(&key);
        let this = self.clone();
        tokio::spawn(async move {
            let Ok(_permit) = this.prefetching.clone().acquire_owned().await else {
                return;
            };
            let current = this
                .entries
                .lock()
                .expect("cache poisoned")
                .get(&key)
                .cloned();
            if !current.is_some_and(|c| Arc::ptr_eq(&c, &entry)) {
                return;
            }
            {
                // A session still good, or a call under way (a container announced twice, at
                // create and at start; a request first): nothing to do, and no cache hit counted
                // (those are requests').
                let state = entry.state();
                let now = this.clock.now();
                if state.flying
                    || state
                        .session
                        .as_ref()
                        .is_some_and(|s| s.expiration > now && !this.due(s, now))
                {
                    return;
                }
            }
            // Subscribed before looking: the end of the call started here is not missed.
            let mut ended = entry.ended.subscribe();
            if matches!(this.look(&entry, &key, true), Look::Wait) {
                // The permit is held until the call ends (every call is bounded).
                let _ = ended.changed().await;
            }
        });
    }

    /// Until the events end: fetch ahead the session of every container that is created or
    /// starts with a role (under the same key the handler uses), forget destroyed containers'
    /// sessions. Fetching at create gives the STS call a head start over the container's first
    /// request (the time Docker takes to set up its network and start it); at start it is
    /// single-flight with any call already under way. The proxy's
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
                Event::Created(container) | Event::Started(container)
                    if Some(&container.id) == own_container.as_ref() => {}
                Event::Created(container) | Event::Started(container) => {
                    match policy.resolve_for(container.subject()) {
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

    /// Keep only the keys whose session name is in `live` (the indexed containers'): what a
    /// missed destroy event left behind goes. No entry is dropped while its call is under way.
    pub fn retain_sessions(&self, live: &std::collections::HashSet<String>) -> usize {
        let mut entries = self.entries.lock().expect("cache poisoned");
        let before = entries.len();
        entries.retain(|key, entry| live.contains(&key.session_name) || entry.state().flying);
        before - entries.len()
    }

    /// Forget every session with this session name (its container was destroyed).
    pub fn forget_session(&self, session_name: &str) {
        self.entries
            .lock()
            .expect("cache poisoned")
            .retain(|key, _| key.session_name != session_name);
    }

    /// One STS call, bounded, through the breaker.
    async fn call(&self, key: &Key) -> Result<Session, Error> {
        let started = Instant::now();
        let result =
            match tokio::time::timeout(CALL_LIMIT, self.sts.assume(key, self.settings.duration))
                .await
            {
                Ok(result) => result,
                Err(_) => Err(Error::Sts {
                    role_arn: key.role_arn.clone(),
                    message: format!("no answer within {CALL_LIMIT:?}"),
                    failure: Failure::TimedOut,
                }),
            };
        let unusable = match &result {
            Ok(_) => None,
            Err(Error::Sts { failure, .. }) => Some(failure.unusable()),
            Err(_) => Some(true),
        };
        self.breaker.record(self.clock.instant(), unusable);
        self.metrics
            .sts_call(started.elapsed(), result.as_ref().err().map(Error::reason));
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
        /// Fail as an unreachable STS does.
        unusable: AtomicBool,
        gate: Option<Arc<tokio::sync::Semaphore>>,
    }

    impl FakeSts {
        pub fn new(clock: &Arc<FakeClock>) -> Arc<Self> {
            Self::gated(clock, None)
        }
        pub fn gated(
            clock: &Arc<FakeClock>,
            gate: Option<Arc<tokio::sync::Semaphore>>,
        ) -> Arc<Self> {
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
                        failure: Failure::Refused,
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
            },
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
            one_line(&chain),
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
}
