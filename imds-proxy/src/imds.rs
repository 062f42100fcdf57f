//! The HTTP service behind the redirect.
//!
//! Every connection is attested at accept time ([`crate::identity::AttestedListener`]). One that
//! arrives without a kernel record (someone connecting to the listen address directly, from the
//! host or the network) is refused with 403 and never gets anything else.
use axum::{
    Router,
    extract::ConnectInfo,
    http::{Method, StatusCode, Uri, header},
    response::{IntoResponse, Response},
};

use crate::identity::Peer;

pub fn router() -> Router {
    Router::new().fallback(handle)
}

async fn handle(ConnectInfo(peer): ConnectInfo<Peer>, method: Method, uri: Uri) -> Response {
    let Some(caller) = peer.caller else {
        tracing::warn!(
            peer = %peer.addr,
            %method,
            path = uri.path(),
            "refused: connection without a kernel record (not redirected from a container)"
        );
        return text(StatusCode::FORBIDDEN, "Forbidden");
    };
    tracing::info!(
        peer = %peer.addr,
        cgroup_id = caller.cgroup_id,
        cgroup = caller.cgroup.as_deref().unwrap_or("?"),
        container_id = caller.container_id.as_deref().unwrap_or("-"),
        %method,
        path = uri.path(),
        "request"
    );
    text(StatusCode::NOT_FOUND, "Not Found")
}

fn text(status: StatusCode, body: &'static str) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "text/plain"),
            (header::SERVER, "imds-proxy"),
        ],
        body,
    )
        .into_response()
}
