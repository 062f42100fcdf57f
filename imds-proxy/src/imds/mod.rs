//! The IMDS API as a container sees it.
//!
//! Every connection is attested at accept time ([`crate::identity::Attestor`]); the handler reads
//! the answer. A connection with no caller (someone connecting to the listen address directly,
//! from the host or the network; in tc mode, a source address no running container has) is
//! refused with 403 and never gets anything else.
//!
//! - `PUT /latest/api/token`: a token of the proxy's own, bound to the caller's container.
//! - The container's role under `iam/`; never the instance's.
//! - Denied (404): `identity-credentials/`, any other role, `user-data` and the signed identity
//!   documents (`dynamic/instance-identity/{pkcs7,signature,rsa2048}`) unless allowed.
//! - Everything else: passed through to the upstream with the proxy's own token, GET/HEAD only.
use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use axum::{
    Router,
    body::Body,
    extract::{ConnectInfo, State},
    http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header},
    response::{IntoResponse, Response},
};
use tracing::Instrument as _;

pub use imds_policy::paths::Exposure;
use imds_policy::paths::{Route, checked, route};

use crate::{
    credentials,
    identity::{Caller, Peer},
    metrics::Metrics,
    roles::{self, Resolved},
    runtime,
    tokens::{self, Tokens},
    upstream::Upstream,
};

pub const TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";
pub const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
/// Header bytes a request may carry; SDK requests carry a few hundred. The server loop enforces
/// the same bound on the whole head while reading it; this holds for the router however served.
const MAX_HEADER_BYTES: usize = crate::serve::MAX_HEAD_BYTES;
/// Body bytes a request may announce. No IMDS request has a body; clients send none or an empty
/// one. A body is never read, and a connection whose body is left unread is closed after the
/// answer.
const MAX_BODY_BYTES: u64 = 1024;

pub struct App {
    pub tokens: Tokens,
    pub roles: roles::Policy,
    pub credentials: Arc<credentials::Cache>,
    pub upstream: Upstream,
    pub metrics: Arc<Metrics>,
    /// Whether a request without a token is refused (401); set at start and kept in step with the
    /// upstream's setting unless configured ([`learn_upstream_imdsv2`]).
    pub require_imdsv2: std::sync::atomic::AtomicBool,
    pub exposure: Exposure,
    /// Requests a second per caller (a container, else a cgroup or source address).
    pub rate: crate::limits::PerKey<crate::identity::CallerKey>,
    /// What a container's requests make the proxy log, bounded ([`App::quietly`]).
    pub quiet: crate::identity::Quiet,
}

impl App {
    /// Whether a line about `reason` for this caller is written now: `Some(repeats)` (the lines
    /// kept quiet since the last one), or `None` (kept quiet, and counted).
    fn quietly(&self, key: &crate::identity::CallerKey, reason: &'static str) -> Option<u64> {
        let admitted = self
            .quiet
            .admit((key.clone(), reason), std::time::Instant::now());
        if admitted.is_none() {
            self.metrics.log_line_suppressed();
        }
        admitted
    }
}

pub fn router(app: Arc<App>) -> Router {
    Router::new().fallback(handle).with_state(app)
}

fn text(status: StatusCode, body: impl Into<String>) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "text/plain"),
            (header::SERVER, "imds-proxy"),
        ],
        body.into(),
    )
        .into_response()
}

/// An error in the IMDS style: JSON with `Code` and `Message`.
fn json_error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = serde_json::json!({
        "Code": code,
        "Message": message,
        "LastUpdated": rfc3339(SystemTime::now()),
    });
    (
        status,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::SERVER, "imds-proxy"),
        ],
        body.to_string(),
    )
        .into_response()
}

/// UTC, seconds precision.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// The credentials document, laid out as IMDS lays it out.
pub fn credentials_document(session: &credentials::Session) -> String {
    let q = |s: &str| serde_json::to_string(s).expect("strings serialise");
    format!(
        "{{\n  \"Code\" : \"Success\",\n  \"LastUpdated\" : {},\n  \"Type\" : \"AWS-HMAC\",\n  \"AccessKeyId\" : {},\n  \"SecretAccessKey\" : {},\n  \"Token\" : {},\n  \"Expiration\" : {}\n}}",
        q(&rfc3339(session.last_updated)),
        q(&session.access_key_id),
        q(&session.secret_access_key),
        q(&session.session_token),
        q(&rfc3339(session.expiration)),
    )
}

async fn handle(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<Arc<Peer>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let caller = match &peer.caller {
        Ok(caller) => caller,
        Err(refusal) => {
            if let Some(repeats) = app.quietly(&peer.key, "unattested") {
                tracing::warn!(
                    peer = %peer.addr,
                    %method,
                    path = uri.path(),
                    repeats,
                    "refused: {refusal}"
                );
            }
            app.metrics.request("unattested", 403);
            return text(StatusCode::FORBIDDEN, "Forbidden");
        }
    };
    // One caller's burst spends its own budget only (IMDS answers 429 when throttled too). Keyed
    // by container, not address: a container that gets a throttled one's address starts afresh.
    let key = &peer.key;
    if !app.rate.allow(key, std::time::Instant::now()) {
        app.metrics.throttled("per_caller");
        app.metrics.request("throttled", 429);
        tracing::debug!(caller = ?key, %method, path = uri.path(), "throttled");
        return text(StatusCode::TOO_MANY_REQUESTS, "Too Many Requests");
    }
    // Debug only: at info a request costs no span (the audit line carries what was handed out).
    let span = tracing::debug_span!(
        "request",
        container_id = caller.container_id().unwrap_or("-"),
        cgroup = caller.cgroup().unwrap_or("?"),
        role = tracing::field::Empty,
    );
    let serving = app.serve(caller, key, &method, uri.path(), &headers);
    let (route, response) = if span.is_disabled() {
        serving.await
    } else {
        serving.instrument(span.clone()).await
    };
    let status = response.status().as_u16();
    if !span.is_disabled() {
        span.in_scope(|| {
            tracing::debug!(%method, path = uri.path(), status, route, "answered");
        });
    }
    app.metrics.request(route, status);
    if method == Method::HEAD {
        let (parts, _) = response.into_parts();
        return Response::from_parts(parts, Body::empty());
    }
    response
}

impl App {
    async fn serve(
        &self,
        caller: &Caller,
        key: &crate::identity::CallerKey,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
    ) -> (&'static str, Response) {
        let header_bytes: usize = headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + 4)
            .sum();
        if header_bytes > MAX_HEADER_BYTES {
            if let Some(repeats) = self.quietly(key, "oversized_headers") {
                tracing::warn!(header_bytes, repeats, "refused: oversized headers");
            }
            return (
                "bad-request",
                text(
                    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    "Request Header Fields Too Large",
                ),
            );
        }
        let body_bytes = headers
            .get(header::CONTENT_LENGTH)
            .map(|v| v.to_str().ok().and_then(|v| v.parse::<u64>().ok()));
        if headers.contains_key(header::TRANSFER_ENCODING)
            || body_bytes.is_some_and(|n| n.is_none_or(|n| n > MAX_BODY_BYTES))
        {
            if let Some(repeats) = self.quietly(key, "request_body") {
                tracing::warn!(?body_bytes, repeats, "refused: request body");
            }
            return (
                "bad-request",
                text(StatusCode::PAYLOAD_TOO_LARGE, "Payload Too Large"),
            );
        }
        let Some(path) = checked(path) else {
            if let Some(repeats) = self.quietly(key, "malformed_path") {
                tracing::warn!(path, repeats, "refused: malformed path");
            }
            return ("bad-path", text(StatusCode::BAD_REQUEST, "Bad Request"));
        };
        match *method {
            Method::PUT => ("token", self.token(caller, path, headers)),
            Method::GET | Method::HEAD => {
                if let Some(refusal) = self.refuse_token(caller, key, headers) {
                    return ("unauthorized", refusal);
                }
                self.get(caller, key, method, path).await
            }
            _ => (
                "method",
                text(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed"),
            ),
        }
    }

    fn token(&self, caller: &Caller, path: &str, headers: &HeaderMap) -> Response {
        if path != "/latest/api/token" {
            return if path.ends_with("/api/token") {
                text(StatusCode::FORBIDDEN, "Forbidden")
            } else {
                text(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed")
            };
        }
        if headers.contains_key("x-forwarded-for") {
            return text(StatusCode::FORBIDDEN, "Forbidden");
        }
        let Some(ttl) = headers
            .get(TTL_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|ttl| tokens::TTL_RANGE.contains(ttl))
        else {
            return text(StatusCode::BAD_REQUEST, "Bad Request");
        };
        let token = self
            .tokens
            .mint(caller.subject, Duration::from_secs(ttl), SystemTime::now());
        let mut response = text(StatusCode::OK, token);
        response
            .headers_mut()
            .insert(TTL_HEADER, HeaderValue::from(ttl));
        response
    }

    /// The 401 for a request whose token is bad, or missing when v2 is required.
    fn refuse_token(
        &self,
        caller: &Caller,
        key: &crate::identity::CallerKey,
        headers: &HeaderMap,
    ) -> Option<Response> {
        match headers.get(TOKEN_HEADER) {
            Some(token) => {
                let token = token.to_str().unwrap_or_default();
                let err = self
                    .tokens
                    .verify(token, caller.subject, SystemTime::now())
                    .err()?;
                if let Some(repeats) = self.quietly(key, "token") {
                    tracing::info!(%err, repeats, "token refused");
                }
                Some(text(StatusCode::UNAUTHORIZED, "Unauthorized"))
            }
            None if self
                .require_imdsv2
                .load(std::sync::atomic::Ordering::Relaxed) =>
            {
                Some(text(StatusCode::UNAUTHORIZED, "Unauthorized"))
            }
            None => None,
        }
    }

    /// The caller's container and role, if any. A role the rules refuse is logged and is none.
    async fn role(
        &self,
        caller: &Caller,
        key: &crate::identity::CallerKey,
    ) -> Option<(Arc<runtime::Container>, Resolved)> {
        let container = caller.container.clone()?;
        // Only the kernel's record tells a pod's containers apart (they share its address).
        let told_apart = matches!(caller.evidence, crate::identity::Evidence::Kernel { .. });
        match self.roles.resolve_for(container.subject(told_apart)) {
            Ok(Some(role)) => {
                if tracing::enabled!(tracing::Level::DEBUG) {
                    tracing::Span::current().record("role", role.arn.as_str());
                }
                Some((container, role))
            }
            Ok(None) => {
                let repeats = self.quietly(key, "no_role")?;
                if let Some(pod) = &container.pod
                    && container
                        .labels
                        .get(&roles::container_role_key(&pod.container))
                        .is_some_and(|v| v.trim() == roles::NO_ROLE)
                {
                    tracing::info!(
                        pod = %container.name,
                        container = %pod.container,
                        repeats,
                        "no role: pod annotation iam.amazonaws.com/role.{} is none",
                        pod.container
                    );
                } else if container.pod.is_some() {
                    tracing::info!(
                        pod = %container.name,
                        repeats,
                        "no role: no pod annotation iam.amazonaws.com/role, no --default-role"
                    );
                } else {
                    tracing::info!(
                        container = %container.name,
                        repeats,
                        "no role: no label iam.amazonaws.com/role, no env IAM_ROLE, no --default-role"
                    );
                }
                None
            }
            Err(err) => {
                if let Some(repeats) = self.quietly(key, "role_refused") {
                    tracing::warn!(container = %container.name, %err, repeats, "role refused; no STS call made");
                }
                None
            }
        }
    }

    async fn get(
        &self,
        caller: &Caller,
        key: &crate::identity::CallerKey,
        method: &Method,
        path: &str,
    ) -> (&'static str, Response) {
        let not_found = || text(StatusCode::NOT_FOUND, "Not Found");
        match route(path, self.exposure) {
            Route::Denied => ("denied", not_found()),
            Route::IamListing => match self.role(caller, key).await {
                Some(_) => ("iam", text(StatusCode::OK, "info\nsecurity-credentials/")),
                None => ("iam", not_found()),
            },
            Route::RoleList => match self.role(caller, key).await {
                Some((_, role)) => ("role-name", text(StatusCode::OK, role.name)),
                None => ("role-name", not_found()),
            },
            Route::IamInfo => match self.role(caller, key).await {
                Some((container, role)) => {
                    let body = serde_json::json!({
                        "Code": "Success",
                        "LastUpdated": rfc3339(SystemTime::now()),
                        "InstanceProfileArn": role.arn,
                        "InstanceProfileId": roles::session_name(Some(&container.name), &container.id),
                    });
                    (
                        "iam-info",
                        text(
                            StatusCode::OK,
                            serde_json::to_string_pretty(&body).expect("json"),
                        ),
                    )
                }
                None => ("iam-info", not_found()),
            },
            Route::RoleCredentials(name) => match self.role(caller, key).await {
                Some((container, role)) if role.name == name => (
                    "credentials",
                    self.credentials(key, &container, &role).await,
                ),
                Some((_, role)) => {
                    if let Some(repeats) = self.quietly(key, "another_role") {
                        tracing::warn!(asked = name, role = %role.arn, repeats, "credentials of another role asked for");
                    }
                    ("credentials", not_found())
                }
                None => ("credentials", not_found()),
            },
            Route::PassThrough => match self.upstream.fetch(method, path).await {
                Ok((answer, cached)) => {
                    if cached {
                        self.metrics.metadata_cache_hit();
                    }
                    let mut response = Response::new(Body::from(answer.body));
                    *response.status_mut() = answer.status;
                    let headers = response.headers_mut();
                    headers.insert(
                        header::CONTENT_TYPE,
                        answer
                            .content_type
                            .unwrap_or(HeaderValue::from_static("text/plain")),
                    );
                    headers.insert(header::SERVER, HeaderValue::from_static("imds-proxy"));
                    ("passthrough", response)
                }
                Err(crate::upstream::Error::Busy) => {
                    self.metrics.throttled("upstream");
                    if let Some(repeats) = self.quietly(key, "upstream_busy") {
                        tracing::warn!(
                            path,
                            repeats,
                            "pass-through refused: the upstream's places are all taken"
                        );
                    }
                    (
                        "passthrough",
                        text(StatusCode::TOO_MANY_REQUESTS, "Too Many Requests"),
                    )
                }
                Err(err) => {
                    self.metrics.upstream_error(match err {
                        crate::upstream::Error::Timeout(_) => "timeout",
                        _ => "failed",
                    });
                    if let Some(repeats) = self.quietly(key, "upstream_unavailable") {
                        tracing::warn!(%err, path, repeats, "upstream unavailable");
                    }
                    ("passthrough", text(StatusCode::BAD_GATEWAY, "Bad Gateway"))
                }
            },
        }
    }

    /// The role's credentials document for the container. The audit trail records each session
    /// once per holder (pod or container), when it is first handed out (every access key id a
    /// holder receives, with the first time); serving it again is counted (`imds_proxy_credentials_served_total`), and its bytes
    /// are the ones rendered the first time.
    async fn credentials(
        &self,
        caller: &crate::identity::CallerKey,
        container: &runtime::Container,
        role: &Resolved,
    ) -> Response {
        let key = self.credentials.key(container, role);
        match self.credentials.get(&key).await {
            Ok(session) => {
                let first = session.first_served(container.holder());
                self.metrics.vend(first);
                if first {
                    tracing::info!(
                        target: "audit",
                        container_id = %container.id,
                        container = %container.name,
                        role_arn = %role.arn,
                        session = %key.session_name,
                        access_key_id = %session.access_key_id,
                        expiration = %rfc3339(session.expiration),
                        "credentials vended"
                    );
                }
                let document = session
                    .document
                    .get_or_init(|| credentials_document(&session).into())
                    .clone();
                let mut response = Response::new(Body::from(document));
                let headers = response.headers_mut();
                headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
                headers.insert(header::SERVER, HeaderValue::from_static("imds-proxy"));
                response
            }
            Err(err) => {
                if let Some(repeats) = self.quietly(caller, err.reason()) {
                    tracing::error!(
                        %err,
                        container_id = %container.id,
                        container = %container.name,
                        role_arn = %role.arn,
                        reason = err.reason(),
                        repeats,
                        "no credentials to serve"
                    );
                }
                let message = match err {
                    crate::credentials::Error::Pending { .. } => {
                        "role credentials are still being obtained; retry"
                    }
                    crate::credentials::Error::BreakerOpen { .. } => {
                        "STS is unavailable; retry later"
                    }
                    crate::credentials::Error::Sts { .. } => {
                        "temporary failure obtaining role credentials; retry"
                    }
                };
                json_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "ServiceUnavailable",
                    message,
                )
            }
        }
    }
}

/// Ask the upstream once whether it requires tokens and mirror it into `app.require_imdsv2`: what
/// the instance's owner chose for the instance holds for its containers. While the upstream
/// cannot be asked, tokens stay required (the safe side). The daemon does this once before it
/// serves, so a container is not refused (401) a token-less request
/// the instance would answer, merely because the proxy has just started.
pub async fn learn_upstream_imdsv2(app: &App, known: &mut Option<bool>) {
    use std::sync::atomic::Ordering;
    let required = match app.upstream.requires_tokens().await {
        Ok(required) => required,
        Err(err) => {
            if *known != Some(true) {
                tracing::warn!(%err, "cannot tell whether the instance requires IMDSv2; requiring it");
            }
            true
        }
    };
    if *known != Some(required) {
        tracing::info!(
            require_imdsv2 = required,
            "IMDSv2 tokens {} as on the instance's own IMDS",
            if required { "required" } else { "optional" }
        );
    }
    *known = Some(required);
    app.require_imdsv2.store(required, Ordering::Relaxed);
}

/// How often the daemon asks the upstream again whether it requires tokens (README: every five
/// minutes): an instance's `HttpTokens` can be changed while it runs.
pub const FOLLOW_UPSTREAM_IMDSV2_EVERY: Duration = Duration::from_secs(300);

/// [`learn_upstream_imdsv2`] every `every`, after a first answer `known`.
pub async fn follow_upstream_imdsv2_from(app: Arc<App>, every: Duration, mut known: Option<bool>) {
    loop {
        tokio::time::sleep(every).await;
        learn_upstream_imdsv2(&app, &mut known).await;
    }
}

#[cfg(test)]
mod tests;
