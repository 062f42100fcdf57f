//! The operations listener: `/healthz`, `/readyz` (programs attached, upstream IMDS and the
//! container runtime answering, the STS breaker closed, every background task running),
//! `/metrics` (Prometheus text) and `/explain` (for `imds-proxy explain`, to a caller with the
//! token: [`crate::explain`]).
use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use crate::{identity::Attestor, imds, redirect::Redirect, runtime};

/// What the ops endpoints look at.
pub struct Ops {
    pub app: Arc<imds::App>,
    pub index: Arc<runtime::Index>,
    pub redirect: Arc<Redirect>,
    pub attestor: Arc<Attestor>,
    /// Cleared when the proxy starts to stop.
    pub attached: Arc<AtomicBool>,
    /// The background tasks: one that stopped makes the proxy unready.
    pub supervisor: Arc<crate::supervisor::Supervisor>,
    /// What `/explain` callers must present; `None`: it could not be written, `/explain` is off.
    pub explain_token: Option<crate::explain::Token>,
    /// Whether callers are known by their cgroup (cgroup mode).
    pub told_apart: bool,
}

/// `/explain`: the explanation of the containers the `who` header names, to a caller that
/// presents the token.
fn explain(
    ops: &Ops,
    headers: &axum::http::HeaderMap,
) -> (
    axum::http::StatusCode,
    [(&'static str, &'static str); 1],
    String,
) {
    use crate::explain::{self, TOKEN_HEADER, VERDICT_HEADER, Verdict, WHO_HEADER};
    use axum::http::StatusCode;
    let presented = headers
        .get(TOKEN_HEADER)
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    if !ops
        .explain_token
        .as_ref()
        .is_some_and(|t| t.accepts(presented))
    {
        return (
            StatusCode::FORBIDDEN,
            [(VERDICT_HEADER, "forbidden")],
            "explain: the token the proxy wrote under /run/imds-proxy/ is needed (run imds-proxy explain as root on the host)\n".to_owned(),
        );
    }
    let who = headers
        .get(WHO_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let found = explain::facts(
        who,
        &ops.index,
        &ops.app.roles,
        &ops.app.credentials,
        ops.told_apart,
    );
    if found.is_empty() {
        return (
            StatusCode::NOT_FOUND,
            [(VERDICT_HEADER, "not-found")],
            format!(
                "no container known as {who:?}: give a container id (or at least 4 characters of it), a name, or <namespace>/<pod>\n"
            ),
        );
    }
    let mut verdict = Verdict::Served;
    let mut body = String::new();
    for facts in &found {
        let (v, text) = explain::render(facts);
        if verdict == Verdict::Served {
            verdict = v;
        }
        if !body.is_empty() {
            body.push('\n');
        }
        body.push_str(&text);
    }
    (StatusCode::OK, [(VERDICT_HEADER, verdict.word())], body)
}

pub fn router(ops: Ops) -> axum::Router {
    use axum::{http::StatusCode, routing::get};
    let ops = Arc::new(ops);
    let metrics_ops = ops.clone();
    let explain_ops = ops.clone();
    axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/explain",
            get(move |headers: axum::http::HeaderMap| {
                let ops = explain_ops.clone();
                async move { explain(&ops, &headers) }
            }),
        )
        .route(
            "/readyz",
            get(move || {
                let ops = ops.clone();
                async move {
                    // tc mode: attached means attached to at least one container interface.
                    let programs = ops.attached.load(Ordering::Relaxed) && ops.redirect.ready();
                    let (upstream, runtime) =
                        tokio::join!(ops.app.upstream.ready(), ops.index.ping());
                    let sts = ops.app.credentials.breaker();
                    let sts_usable =
                        !matches!(sts, crate::credentials::breaker::Status::Open { .. });
                    let (background, background_line) = ops.supervisor.readiness();
                    let body = format!(
                        "programs attached: {programs}\nupstream IMDS: {}\ncontainer runtime {}: {}\nsts: {}\n{background_line}\n",
                        if upstream {
                            "answering"
                        } else {
                            "not answering"
                        },
                        ops.index.runtime().name,
                        if runtime { "answering" } else { "not answering" },
                        match sts {
                            crate::credentials::breaker::Status::Closed => "answering".to_owned(),
                            crate::credentials::breaker::Status::HalfOpen =>
                                "trial call allowed after failures".to_owned(),
                            crate::credentials::breaker::Status::Open { failures } => format!(
                                "not answering ({failures} failed calls in a row; breaker open)"
                            ),
                        },
                    );
                    let status = if programs && upstream && runtime && sts_usable && background {
                        StatusCode::OK
                    } else {
                        StatusCode::SERVICE_UNAVAILABLE
                    };
                    (status, body)
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let ops = metrics_ops.clone();
                async move {
                    let mut body = ops.app.metrics.render();
                    body.push_str(&crate::metrics::render_index(
                        ops.index.runtime(),
                        ops.index.found_before_indexed(),
                        ops.index.skipped(),
                    ));
                    body.push_str(&crate::metrics::render_cache(
                        ops.app.credentials.len(),
                        ops.app.credentials.sessions(),
                        matches!(
                            ops.app.credentials.breaker(),
                            crate::credentials::breaker::Status::Open { .. }
                        ),
                    ));
                    body.push_str(&crate::metrics::render_attested(
                        ops.attestor.attested(),
                        ops.attestor.lines_suppressed(),
                    ));
                    body.push_str(&ops.supervisor.render());
                    body.push_str(&ops.redirect.render_metrics(
                        ops.attestor.address_confirmations(),
                        ops.attestor.watched_addresses(),
                    ));
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4",
                        )],
                        body,
                    )
                }
            }),
        )
}
