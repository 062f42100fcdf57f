//! The operations listener: `/healthz`, `/readyz` (programs attached, upstream IMDS and Docker
//! answering) and `/metrics` (Prometheus text).
use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use crate::{ebpf::Redirect, imds, tc::TcRedirect};

pub fn router(
    app: Arc<imds::App>,
    attached: Arc<AtomicBool>,
    redirect: Option<Arc<Redirect>>,
    tc: Option<Arc<TcRedirect>>,
) -> axum::Router {
    use axum::{http::StatusCode, routing::get};
    let metrics = app.metrics.clone();
    let tc_metrics = tc.clone();
    let docker = app.docker.clone();
    axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let app = app.clone();
                let attached = attached.clone();
                let tc = tc.clone();
                async move {
                    // tc mode: attached means attached to at least one container interface.
                    let programs = attached.load(Ordering::Relaxed)
                        && tc.as_ref().is_none_or(|tc| !tc.interfaces().is_empty());
                    let (upstream, docker) = tokio::join!(app.upstream.ready(), app.docker.ping());
                    let body = format!(
                        "programs attached: {programs}\nupstream IMDS: {}\ndocker: {}\n",
                        if upstream {
                            "answering"
                        } else {
                            "not answering"
                        },
                        if docker { "answering" } else { "not answering" },
                    );
                    let status = if programs && upstream && docker {
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
                let metrics = metrics.clone();
                let tc = tc_metrics.clone();
                let docker = docker.clone();
                let redirect = redirect.clone();
                async move {
                    let mut body = metrics.render();
                    if let Some(redirect) = redirect {
                        body.push_str(&crate::metrics::render_guard(&redirect.guard_stats()));
                    }
                    if let Some(tc) = tc {
                        body.push_str(&crate::metrics::render_tc(
                            &tc.stats(),
                            tc.nat_entries(),
                            tc.interfaces().len(),
                            docker.address_confirmations(),
                        ));
                    }
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
