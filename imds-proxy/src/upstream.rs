//! The pass-through to the upstream IMDS: GET/HEAD only, with the proxy's own IMDSv2 token (never
//! shown to containers), status and body preserved, and short timeouts: an unreachable upstream is
//! a quick 502, never a hang.
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper::{Method, Request, StatusCode, header::HeaderValue};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};

const TOKEN_TTL: u64 = 21_600;
/// Whole-request budget for one upstream call.
const TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("upstream IMDS {0} did not answer in time")]
    Timeout(String),
    #[error("upstream IMDS {url}: {message}")]
    Failed { url: String, message: String },
}

pub struct Upstream {
    base: String,
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>,
    token: tokio::sync::Mutex<Option<(String, Instant)>>,
}

/// An upstream answer.
pub struct Answer {
    pub status: StatusCode,
    pub content_type: Option<HeaderValue>,
    pub body: Bytes,
}

impl Upstream {
    pub fn new(base: &str) -> Self {
        let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_millis(500)));
        Self {
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

    /// The proxy's own session token, fetched again when close to expiry or when `stale`.
    async fn token(&self, stale: bool) -> Result<String, Error> {
        let mut cached = self.token.lock().await;
        if let Some((token, expiry)) = cached.as_ref()
            && !stale
            && *expiry > Instant::now() + Duration::from_secs(60)
        {
            return Ok(token.clone());
        }
        let request = Request::builder()
            .method(Method::PUT)
            .uri(format!("{}/latest/api/token", self.base))
            .header("x-aws-ec2-metadata-token-ttl-seconds", TOKEN_TTL)
            .body(Empty::new())
            .expect("a valid request");
        let answer = self.send(request).await?;
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

    /// GET or HEAD `path` (already checked by the caller) upstream.
    pub async fn fetch(&self, method: &Method, path: &str) -> Result<Answer, Error> {
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

    /// Whether the upstream answers a token request now (for /readyz).
    pub async fn ready(&self) -> bool {
        self.token(false).await.is_ok()
    }
}
