//! The pass-through to the upstream IMDS: GET/HEAD only, with the proxy's own IMDSv2 token (never
//! shown to containers), status and body preserved, and short timeouts: an unreachable upstream is
//! a quick 502, never a hang.
//!
//! The instance's IMDS throttles per instance, and the proxy's own credentials come from it too:
//! containers' pass-through calls are capped in number at once ([`Upstream::fetch`] waits a
//! little for a place, then gives up as [`Error::Busy`], a 429), while the proxy's own token
//! and credential calls never wait for a place. Answers are kept for a few seconds
//! ([`MetadataCache`]), except for the paths that change (spot, events, ...).
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper::{Method, Request, StatusCode, header::HeaderValue};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};

const TOKEN_TTL: u64 = 21_600;
/// Whole-request budget for one upstream call.
pub(crate) const TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("too many pass-through calls to the upstream IMDS at once")]
    Busy,
    #[error("upstream IMDS {0} did not answer in time")]
    Timeout(String),
    #[error("upstream IMDS {url}: {message}")]
    Failed { url: String, message: String },
}

pub struct Upstream {
    base: String,
    /// Places for containers' pass-through calls.
    places: tokio::sync::Semaphore,
    cache: MetadataCache,
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>,
    token: tokio::sync::Mutex<Option<(String, Instant)>>,
}

/// How long a pass-through call waits for a place before it is refused.
const PLACE_WAIT: Duration = Duration::from_secs(1);

/// Paths whose answers change from one moment to the next: never cached.
const VOLATILE: [&str; 5] = [
    "meta-data/spot/",
    "meta-data/events/",
    "meta-data/rebalance-recommendation",
    "meta-data/autoscaling/",
    "meta-data/tags/",
];

/// GET answers by path, for `ttl`; at most [`MetadataCache::MAX`] paths (then it starts over:
/// paths are the containers' choice).
pub struct MetadataCache {
    ttl: Duration,
    entries: std::sync::Mutex<std::collections::HashMap<String, (Instant, Answer)>>,
}

impl MetadataCache {
    const MAX: usize = 1024;

    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            entries: Default::default(),
        }
    }

    fn cacheable(path: &str) -> bool {
        let rest = imds_policy::paths::after_version(path);
        !VOLATILE.iter().any(|v| rest.starts_with(v))
    }

    pub fn get(&self, path: &str, now: Instant) -> Option<Answer> {
        if self.ttl.is_zero() {
            return None;
        }
        let entries = self.entries.lock().expect("cache poisoned");
        let (at, answer) = entries.get(path)?;
        (now.saturating_duration_since(*at) < self.ttl).then(|| answer.clone())
    }

    pub fn put(&self, path: &str, answer: &Answer, now: Instant) {
        // Only what the upstream settled: found or not found.
        if self.ttl.is_zero()
            || !Self::cacheable(path)
            || !matches!(answer.status, StatusCode::OK | StatusCode::NOT_FOUND)
        {
            return;
        }
        let mut entries = self.entries.lock().expect("cache poisoned");
        if entries.len() >= Self::MAX {
            entries.clear();
        }
        entries.insert(path.to_owned(), (now, answer.clone()));
    }
}

/// An upstream answer.
#[derive(Clone, Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub content_type: Option<HeaderValue>,
    pub body: Bytes,
}

impl Upstream {
    /// `places`: pass-through calls at once; `cache_ttl`: how long answers are kept (zero: not).
    pub fn new(base: &str, places: usize, cache_ttl: Duration) -> Self {
        let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_millis(500)));
        Self {
            places: tokio::sync::Semaphore::new(places),
            cache: MetadataCache::new(cache_ttl),
            base: base.trim_end_matches('/').to_owned(),
            client: Client::builder(TokioExecutor::new()).build(connector),
            token: tokio::sync::Mutex::new(None),
        }
    }

    async fn send(&self, request: Request<Empty<Bytes>>) -> Result<Answer, Error> {
        let url = request.uri().to_string();
        let fut = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| Error::Failed {
                    url: url.clone(),
                    message: e.to_string(),
                })?;
            let status = response.status();
            let content_type = response.headers().get(hyper::header::CONTENT_TYPE).cloned();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| Error::Failed {
                    url: url.clone(),
                    message: e.to_string(),
                })?
                .to_bytes();
            Ok(Answer {
                status,
                content_type,
                body,
            })
        };
        tokio::time::timeout(TIMEOUT, fut)
            .await
            .map_err(|_| Error::Timeout(url.clone()))?
    }

    /// A request for a session token of the proxy's own.
    fn token_request(&self) -> Request<Empty<Bytes>> {
        Request::builder()
            .method(Method::PUT)
            .uri(format!("{}/latest/api/token", self.base))
            .header("x-aws-ec2-metadata-token-ttl-seconds", TOKEN_TTL)
            .body(Empty::new())
            .expect("a valid request")
    }

    /// The proxy's own session token, fetched again when close to expiry or when `stale`.
    async fn token(&self, stale: bool) -> Result<String, Error> {
        let mut cached = self.token.lock().await;
        if let Some((token, expiry)) = cached.as_ref()
            && !stale
            && *expiry > Instant::now() + Duration::from_secs(60)
        {
            return Ok(token.clone());
        }
        let answer = self.send(self.token_request()).await?;
        if answer.status != StatusCode::OK {
            return Err(Error::Failed {
                url: format!("{}/latest/api/token", self.base),
                message: format!("token request answered {}", answer.status),
            });
        }
        let token = String::from_utf8_lossy(&answer.body).trim().to_owned();
        *cached = Some((
            token.clone(),
            Instant::now() + Duration::from_secs(TOKEN_TTL),
        ));
        Ok(token)
    }

    /// GET or HEAD `path` (already checked by the caller) for a container: from the cache, or
    /// upstream once a place is free; (answer, whether it came from the cache).
    pub async fn fetch(&self, method: &Method, path: &str) -> Result<(Answer, bool), Error> {
        if let Some(answer) = self.cache.get(path, Instant::now()) {
            return Ok((answer, true));
        }
        let _place = tokio::time::timeout(PLACE_WAIT, self.places.acquire())
            .await
            .map_err(|_| Error::Busy)?
            .expect("the semaphore is never closed");
        let answer = self.fetch_now(method, path).await?;
        if *method == Method::GET {
            self.cache.put(path, &answer, Instant::now());
        }
        Ok((answer, false))
    }

    async fn fetch_now(&self, method: &Method, path: &str) -> Result<Answer, Error> {
        let mut stale = false;
        loop {
            let token = self.token(stale).await?;
            let request = Request::builder()
                .method(method.clone())
                .uri(format!("{}{path}", self.base))
                .header("x-aws-ec2-metadata-token", token)
                .body(Empty::new())
                .expect("a checked path makes a valid request");
            let answer = self.send(request).await?;
            if answer.status == StatusCode::UNAUTHORIZED && !stale {
                stale = true; // the upstream forgot our token (restart): one more try
                continue;
            }
            return Ok(answer);
        }
    }

    /// The instance's id (`i-…`), as the upstream says it.
    pub async fn instance_id(&self) -> Result<String, Error> {
        const PATH: &str = "/latest/meta-data/instance-id";
        let answer = self.fetch_now(&Method::GET, PATH).await?;
        let id = String::from_utf8_lossy(&answer.body).trim().to_owned();
        let well_formed = id.strip_prefix("i-").is_some_and(|hex| {
            (8..=17).contains(&hex.len()) && hex.bytes().all(|b| b.is_ascii_hexdigit())
        });
        if answer.status != StatusCode::OK || !well_formed {
            return Err(Error::Failed {
                url: format!("{}{PATH}", self.base),
                message: format!(
                    "answered {} {:?}",
                    answer.status,
                    id.chars().take(40).collect::<String>()
                ),
            });
        }
        Ok(id)
    }

    /// Whether the upstream requires IMDSv2 tokens (`HttpTokens=required`): a token-less GET is
    /// answered 401 there, 200 where tokens are optional.
    pub async fn requires_tokens(&self) -> Result<bool, Error> {
        let url = format!("{}/latest/meta-data/", self.base);
        let request = Request::builder()
            .method(Method::GET)
            .uri(&url)
            .body(Empty::new())
            .expect("a valid request");
        let answer = self.send(request).await?;
        match answer.status {
            StatusCode::UNAUTHORIZED => Ok(true),
            status if status.is_success() => Ok(false),
            status => Err(Error::Failed {
                url,
                message: format!("a token-less GET answered {status}"),
            }),
        }
    }

    /// Whether the upstream answers a token request now (for /readyz).
    /// Asked of the upstream each time, not answered from the cached token: a token fetched
    /// before (at start, for the instance id) says nothing of the upstream now.
    pub async fn ready(&self) -> bool {
        matches!(self.send(self.token_request()).await, Ok(answer) if answer.status == StatusCode::OK)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: StatusCode) -> Answer {
        Answer {
            status,
            content_type: None,
            body: Bytes::from_static(b"x"),
        }
    }

    #[test]
    fn the_metadata_cache_keeps_settled_answers_for_its_ttl() {
        let t0 = Instant::now();
        let cache = MetadataCache::new(Duration::from_secs(10));
        cache.put("/latest/meta-data/ami-id", &answer(StatusCode::OK), t0);
        cache.put("/latest/meta-data/nope", &answer(StatusCode::NOT_FOUND), t0);
        cache.put("/latest/meta-data/x", &answer(StatusCode::BAD_GATEWAY), t0);
        cache.put(
            "/latest/meta-data/spot/instance-action",
            &answer(StatusCode::OK),
            t0,
        );
        cache.put(
            "/latest/meta-data/events/maintenance/scheduled",
            &answer(StatusCode::OK),
            t0,
        );
        let at = t0 + Duration::from_secs(9);
        assert!(cache.get("/latest/meta-data/ami-id", at).is_some());
        assert!(cache.get("/latest/meta-data/nope", at).is_some());
        assert!(
            cache.get("/latest/meta-data/x", at).is_none(),
            "not settled"
        );
        assert!(
            cache
                .get("/latest/meta-data/spot/instance-action", at)
                .is_none(),
            "volatile"
        );
        assert!(
            cache
                .get("/latest/meta-data/events/maintenance/scheduled", at)
                .is_none()
        );
        assert!(
            cache
                .get("/latest/meta-data/ami-id", t0 + Duration::from_secs(10))
                .is_none(),
            "expired"
        );
        let off = MetadataCache::new(Duration::ZERO);
        off.put("/latest/meta-data/ami-id", &answer(StatusCode::OK), t0);
        assert!(off.get("/latest/meta-data/ami-id", t0).is_none());
    }

    #[test]
    fn the_metadata_cache_is_bounded() {
        let t0 = Instant::now();
        let cache = MetadataCache::new(Duration::from_secs(10));
        for i in 0..(MetadataCache::MAX + 10) {
            cache.put(
                &format!("/latest/meta-data/p{i}"),
                &answer(StatusCode::NOT_FOUND),
                t0,
            );
        }
        assert!(cache.entries.lock().unwrap().len() <= MetadataCache::MAX);
    }
}
