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
//! without a network (`tests.rs`). The real STS client is `sts.rs`; following the engine's
//! containers, `follow.rs`.
pub mod breaker;
mod follow;
mod sts;

pub use sts::{Sts, sts_client};

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
use imds_policy::tags::{SessionTags, Tags};

/// What a session is cached under: the role, the session name, and everything else the
/// AssumeRole carries (external id, tags, source identity), so that two callers whose calls
/// would differ never share a session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Key {
    pub role_arn: String,
    pub session_name: String,
    pub external_id: Option<String>,
    /// Shared by every key of one container (computed once for it).
    pub tags: Arc<SessionTags>,
}

/// Hashed without its tags (a few hundred bytes every request would hash again): keys that
/// differ only in their tags share a bucket and are told apart by equality, which compares the
/// tags (at once when they are the same `Arc`, as a container's keys are).
impl std::hash::Hash for Key {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.role_arn.hash(state);
        self.session_name.hash(state);
        self.external_id.hash(state);
    }
}

impl Key {
    /// The one key a container's credentials for `role` are cached under: the handler and the
    /// prefetch at container start both use it (through [`Cache::key`]), so they cannot drift
    /// apart.
    pub fn session(
        container: &crate::runtime::Container,
        role: &crate::roles::Resolved,
        tagging: &Tagging,
    ) -> Self {
        Key {
            role_arn: role.arn.clone(),
            session_name: crate::roles::session_name(Some(&container.name), &container.id),
            external_id: role.external_id.clone(),
            tags: container
                .session_tags
                .get_or_init(|| Arc::new(tagging.of(container)))
                .clone(),
        }
    }
}

/// How sessions are tagged: the operator's settings and the instance's id.
#[derive(Clone, Debug, Default)]
pub struct Tagging {
    pub tags: Tags,
    /// `ec2-instance-id`, when the upstream said it.
    pub instance_id: Option<String>,
    /// Whether a caller is known to be the very container it is taken for (cgroup mode: the
    /// kernel's record names its cgroup). In tc mode a pod's containers share its address, so the
    /// one the index names may not be the caller, and its image is not put in a tag.
    pub told_apart: bool,
}

impl Tagging {
    /// What `container`'s AssumeRoles carry: its image only when it is known to be the caller
    /// (a pod's container in tc mode is not).
    pub fn of(&self, container: &crate::runtime::Container) -> SessionTags {
        let attested = self.told_apart || container.pod.is_none();
        self.tags.session(
            container.caller(),
            Some(container.image.as_str()).filter(|i| attested && !i.is_empty()),
            self.instance_id.as_deref(),
        )
    }
}

/// A role session, shared by every request that serves it (the cache hands out `Arc`s: no copy
/// of its secrets per request).
#[derive(Debug)]
pub struct Session {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: String,
    pub expiration: SystemTime,
    pub last_updated: SystemTime,
    /// The document served for it, rendered by the first request that serves it
    /// (IMDS's credentials format) and kept: the same bytes for every request after.
    pub document: std::sync::OnceLock<bytes::Bytes>,
    /// To whom its handing out has been written to the audit trail: the first holder (a pod or a
    /// container, [`crate::runtime::Container::holder`]) and, rarely, later ones (a container
    /// recreated under the same name is served the same session by its key). Each access key id a
    /// holder receives is recorded once, when it is first served ([`Session::first_served`]).
    audited: std::sync::OnceLock<Box<str>>,
    audited_later: std::sync::Mutex<Vec<Box<str>>>,
}

impl Session {
    /// A session as STS gave it, fetched at `last_updated`.
    pub fn new(assumed: Assumption, last_updated: SystemTime) -> Self {
        Self {
            access_key_id: assumed.access_key_id,
            secret_access_key: assumed.secret_access_key,
            session_token: assumed.session_token,
            expiration: assumed.expiration,
            last_updated,
            document: std::sync::OnceLock::new(),
            audited: std::sync::OnceLock::new(),
            audited_later: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// True exactly once per holder: for the first request that serves this session to it. The
    /// common case (its first holder again) is one comparison, no lock.
    pub fn first_served(&self, holder: &str) -> bool {
        let mut first = false;
        let audited = self.audited.get_or_init(|| {
            first = true;
            holder.into()
        });
        if first || **audited == *holder {
            return first;
        }
        let mut later = self
            .audited_later
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if later.iter().any(|h| **h == *holder) {
            return false;
        }
        later.push(holder.into());
        true
    }
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
    /// STS refused the call (AccessDenied, a malformed ARN): nothing wrong with STS. What it
    /// refused, as far as its answer tells.
    Refused(Refusal),
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
        !matches!(self, Failure::Refused(_))
    }
}

/// What STS refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The role or the request: the role does not exist, its trust policy does not allow the
    /// instance's role, its ARN or the session name is invalid (STS does not always say which).
    Role,
    /// The session tags the proxy adds: the trust policy does not allow `sts:TagSession`.
    SessionTags,
    /// The source identity the proxy sets: the trust policy does not allow
    /// `sts:SetSourceIdentity`.
    SourceIdentity,
}

impl Refusal {
    /// What STS's refusal (`code: message`) was about: it names the action it did not allow.
    pub fn of(message: &str) -> Self {
        if message.contains("sts:TagSession") {
            Refusal::SessionTags
        } else if message.contains("sts:SetSourceIdentity") {
            Refusal::SourceIdentity
        } else {
            Refusal::Role
        }
    }

    /// When STS refused what the proxy adds to a call (session tags, a source identity) rather
    /// than the role itself, the operator's way out, in words: the role's trust policy lacks the
    /// permission. Never a silent retry without them: a role's policy may depend on its tags.
    pub fn way_out(self) -> Option<&'static str> {
        match self {
            Refusal::Role => None,
            Refusal::SessionTags => Some(
                "the role refused session tags: its trust policy does not allow sts:TagSession \
                 for the instance's role (allow it, or run the proxy with --session-tags off)",
            ),
            Refusal::SourceIdentity => Some(
                "the role refused a source identity: its trust policy does not allow \
                 sts:SetSourceIdentity for the instance's role (allow it, or run the proxy with \
                 --source-identity off)",
            ),
        }
    }
}

impl Error {
    /// A short reason for the metrics and the container's error message.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Sts {
                failure: Failure::Refused(_),
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

/// Around a whole call, whatever the SDK does (it may also be fetching instance credentials).
pub const CALL_LIMIT: Duration = Duration::from_secs(15);

/// One key's state: its session, whether a call is under way, the last failure.
#[derive(Default)]
struct State {
    session: Option<Arc<Session>>,
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
    /// What sessions are tagged with.
    pub tagging: Tagging,
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

/// One key's state, as [`Cache::status`] reports it.
#[derive(Clone, Debug)]
pub struct KeyStatus {
    pub session: Option<SessionStatus>,
    /// An STS call for it is under way.
    pub calling: bool,
    /// The last call failed.
    pub failure: Option<FailureStatus>,
}

#[derive(Clone, Debug)]
pub struct SessionStatus {
    pub access_key_id: String,
    pub expiration: SystemTime,
    pub expired: bool,
    /// Less than `refresh_before` left: a refresh is due.
    pub due: bool,
}

#[derive(Clone, Debug)]
pub struct FailureStatus {
    pub error: Error,
    /// Failed calls in a row.
    pub in_a_row: u32,
    /// Until another call may be made (zero: the next request makes one).
    pub retry_in: Duration,
}

/// Calls made ahead of requests, at most at once. A proxy that starts (or resynchronises with
/// Docker) on a host running a thousand containers with roles would otherwise make a thousand
/// STS calls at once: a burst STS throttles, and whose buffers the allocator keeps as resident
/// memory. A request never waits for a permit: it joins the call under way or starts its own.
pub const PREFETCH_AT_ONCE: usize = 8;

/// How many times a prefetch is tried when STS fails for its own reasons (with back-offs of 1,
/// 2, 4 and 8 s between them: about 15 s of trying before the first request is left to it).
pub const PREFETCH_ATTEMPTS: usize = 5;

/// What one prefetch attempt leaves to do.
enum Prefetched {
    Done,
    /// STS failed for its own reasons: try again after this long.
    Retry(Duration),
}

/// What a request found when it looked.
enum Look {
    Ready(Result<Arc<Session>, Error>),
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

    /// The key `container`'s credentials for `role` are cached under ([`Key::session`]).
    pub fn key(&self, container: &crate::runtime::Container, role: &crate::roles::Resolved) -> Key {
        Key::session(container, role, &self.settings.tagging)
    }

    fn entry(&self, key: &Key) -> Arc<Entry> {
        let mut entries = self.entries.lock().expect("cache poisoned");
        // Found without copying the key: the key is copied once, when its entry is made.
        if let Some(entry) = entries.get(key) {
            return entry.clone();
        }
        entries.entry(key.clone()).or_default().clone()
    }

    /// How many keys the cache holds (sessions, calls under way, remembered failures).
    pub fn len(&self) -> usize {
        self.entries.lock().expect("cache poisoned").len()
    }

    /// What the cache holds for `key` now, without making an entry (for `imds-proxy explain`).
    pub fn status(&self, key: &Key) -> Option<KeyStatus> {
        let entry = self
            .entries
            .lock()
            .expect("cache poisoned")
            .get(key)
            .cloned()?;
        let state = entry.state();
        let now = self.clock.now();
        Some(KeyStatus {
            session: state.session.as_ref().map(|s| SessionStatus {
                access_key_id: s.access_key_id.clone(),
                expiration: s.expiration,
                expired: s.expiration <= now,
                due: self.due(s, now),
            }),
            calling: state.flying,
            failure: state.failure.1.clone().map(|error| FailureStatus {
                error,
                in_a_row: state.failure.0.failures(),
                retry_in: state.failure.0.remaining(self.clock.instant()),
            }),
        })
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
    pub async fn get(self: &Arc<Self>, key: &Key) -> Result<Arc<Session>, Error> {
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
                        state.session = Some(Arc::new(session));
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
    /// under way by then makes no call. A prefetch that failed for STS's own reasons (unreachable,
    /// timed out, throttled: not a refusal) is tried again after its back-off,
    /// [`PREFETCH_ATTEMPTS`] times in all, without holding a permit while it waits: a host
    /// starting a thousand containers must not leave one to pay the STS call on its first request
    /// because one call met a busy moment.
    pub fn prefetch(self: &Arc<Self>, key: Key) {
        // The entry is made now, not when a permit comes: a container destroyed meanwhile has
        // its entries forgotten, and the queued prefetch, finding its entry gone, makes none.
        let entry = self.entry(&key);
        let this = self.clone();
        tokio::spawn(async move {
            for _ in 0..PREFETCH_ATTEMPTS {
                match this.prefetch_once(&entry, &key).await {
                    Prefetched::Done => return,
                    Prefetched::Retry(after) => tokio::time::sleep(after).await,
                }
            }
        });
    }

    /// One prefetch attempt: under a permit, a call if the entry is still current and needs one.
    async fn prefetch_once(self: &Arc<Self>, entry: &Arc<Entry>, key: &Key) -> Prefetched {
        let Ok(_permit) = self.prefetching.clone().acquire_owned().await else {
            return Prefetched::Done;
        };
        let current = self
            .entries
            .lock()
            .expect("cache poisoned")
            .get(key)
            .cloned();
        if !current.is_some_and(|c| Arc::ptr_eq(&c, entry)) {
            return Prefetched::Done;
        }
        {
            // A session still good, or a call under way (a container announced twice, at create
            // and at start; a request first): nothing to do, and no cache hit counted (those
            // are requests').
            let state = entry.state();
            let now = self.clock.now();
            if state.flying
                || state
                    .session
                    .as_ref()
                    .is_some_and(|s| s.expiration > now && !self.due(s, now))
            {
                return Prefetched::Done;
            }
        }
        // Subscribed before looking: the end of the call started here is not missed.
        let mut ended = entry.ended.subscribe();
        if matches!(self.look(entry, key, true), Look::Wait) {
            // The permit is held until the call ends (every call is bounded).
            let _ = ended.changed().await;
        }
        let state = entry.state();
        match &state.failure.1 {
            _ if state.session.is_some() => Prefetched::Done,
            Some(Error::Sts {
                failure: Failure::Refused(_),
                ..
            })
            | None => Prefetched::Done,
            Some(_) => Prefetched::Retry(
                state
                    .failure
                    .0
                    .remaining(self.clock.instant())
                    .max(FAILURE_FIRST),
            ),
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
        Ok(Session::new(assumed, self.clock.now()))
    }
}

#[cfg(test)]
pub(crate) mod tests;
