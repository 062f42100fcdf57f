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
use std::{
    collections::HashMap,
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
    sts: aws_sdk_sts::Client,
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
        sts: aws_sdk_sts::Client,
        duration: Duration,
        refresh_before: Duration,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            sts,
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
        let now = SystemTime::now();
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
        let _flight = entry.flight.lock().await;
        let now = SystemTime::now();
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
                .waiting(Instant::now())
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
                        let retry_in = failure.0.failed(Instant::now(), FAILURE_FIRST, FAILURE_CAP);
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
                    Some(session) if session.expiration > SystemTime::now() => {
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

    /// Forget every session with this session name (its container was destroyed).
    pub fn forget_session(&self, session_name: &str) {
        self.entries
            .lock()
            .expect("cache poisoned")
            .retain(|key, _| key.session_name != session_name);
    }

    async fn assume(&self, key: &Key) -> Result<Session, Error> {
        let started = Instant::now();
        let result = self
            .sts
            .assume_role()
            .role_arn(&key.role_arn)
            .role_session_name(&key.session_name)
            .duration_seconds(self.duration.as_secs() as i32)
            .set_external_id(key.external_id.clone())
            .send()
            .await;
        self.metrics.sts_call(started.elapsed(), result.is_ok());
        let output = result.map_err(|e| Error::Sts {
            role_arn: key.role_arn.clone(),
            message: aws_sdk_sts::error::DisplayErrorContext(&e).to_string(),
        })?;
        let creds = output.credentials().ok_or_else(|| Error::Sts {
            role_arn: key.role_arn.clone(),
            message: "answer without credentials".into(),
        })?;
        let expiration = SystemTime::try_from(*creds.expiration()).map_err(|e| Error::Sts {
            role_arn: key.role_arn.clone(),
            message: format!("bad expiration: {e}"),
        })?;
        tracing::info!(role_arn = %key.role_arn, session = %key.session_name, "assumed role");
        Ok(Session {
            access_key_id: creds.access_key_id().to_owned(),
            secret_access_key: creds.secret_access_key().to_owned(),
            session_token: creds.session_token().to_owned(),
            expiration,
            last_updated: SystemTime::now(),
        })
    }
}
