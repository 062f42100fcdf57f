//! The container runtimes, behind one index. A newcomer's map, bottom-up:
//!
//! - [`container`]: what the proxy knows of a container (and its pod), whichever runtime said it;
//! - [`kind`]: which runtime it is ([`Kind`]), and where each runtime puts containers' cgroups;
//! - [`source`]: the one small interface a way of getting containers implements ([`Source`]);
//! - [`docker_api`]: Docker, and Podman's compatible service, followed by their events;
//!   [`image_roles`]: role settings an image carries do not count;
//! - [`cri`]: a Kubernetes node's CRI runtime (containerd, CRI-O), listed every second;
//! - [`index`]: the one index over a source: one reconcile, a direct inspect on a miss (a request
//!   can arrive in a container's first milliseconds, before the runtime reports it), and the
//!   [`Event`]s the rest of the proxy reacts to.
//!
//! The attestor asks the index through [`Containers`]; a new runtime is a new [`Source`].
use std::{net::IpAddr, sync::Arc, time::Duration};

use futures_util::future::BoxFuture;
use tokio::sync::broadcast;

pub mod container;
pub mod cri;
pub mod docker_api;
#[cfg(test)]
mod fake;
mod image_roles;
pub mod index;
pub mod kind;
pub mod source;

pub use container::{Container, Pod};
pub use index::Index;
pub use kind::Kind;
pub use source::{Description, Source, SourceError};

/// Changes the rest of the proxy reacts to.
#[derive(Clone, Debug)]
pub enum Event {
    /// A container was created (not started yet, so not indexed): its credentials can be
    /// fetched ahead while the runtime sets it up, so that its first request finds them.
    Created(Arc<Container>),
    /// A container started (or was renamed or updated): prefetch its credentials.
    Started(Arc<Container>),
    /// A container was destroyed: forget it and its credentials.
    Destroyed(Arc<Container>),
}

/// One readable line: the runtime's socket and what went wrong.
#[derive(Debug, thiserror::Error)]
#[error("container runtime at {host}: {cause}")]
pub struct Error {
    host: String,
    cause: SourceError,
}

/// What the attestor needs of the runtime: [`Index`] in the daemon, a table in tests.
pub trait Containers: Send + Sync + 'static {
    /// The container with this id: the index's, else the runtime's (bounded wait).
    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Option<Arc<Container>>>;
    /// The indexed running container that has `ip`, unconfirmed.
    fn indexed_with_address(&self, ip: IpAddr) -> Option<Arc<Container>>;
    /// Ask the runtime which running container has `ip` now (`candidate` first); bounded wait.
    fn ask_by_address<'a>(
        &'a self,
        ip: IpAddr,
        candidate: Option<&'a str>,
    ) -> BoxFuture<'a, Option<Arc<Container>>>;
}

/// Which API a runtime is spoken to with, at which socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// Docker's (Docker, Podman's compatible service): `--docker-host`.
    DockerApi(String),
    /// The Kubernetes CRI (containerd, CRI-O): `--cri-endpoint`.
    Cri(String),
}

impl Endpoint {
    /// The socket (`unix:///var/run/docker.sock`).
    pub fn socket(&self) -> &str {
        match self {
            Endpoint::DockerApi(socket) | Endpoint::Cri(socket) => socket,
        }
    }

    /// The index over this runtime, once it answers. With `trust_image_role`, role settings from
    /// a Docker-API container's image count as its own; a CRI runtime is listed every `cri_poll`.
    pub async fn connect(
        &self,
        trust_image_role: bool,
        cri_poll: Duration,
    ) -> Result<Arc<Index>, Error> {
        let socket = self.socket();
        let source: Box<dyn Source> = match self {
            Endpoint::DockerApi(_) => Box::new(
                docker_api::DockerApi::connect(socket, trust_image_role)
                    .await
                    .map_err(|cause| Error {
                        host: socket.to_owned(),
                        cause,
                    })?,
            ),
            Endpoint::Cri(_) => Box::new(cri::Cri::connect(socket, cri_poll)),
        };
        Index::new(source, socket).await
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.socket())
    }
}

/// The next container event; missed ones are logged (for `who`), `None` when the index is gone.
pub async fn next_event(events: &mut broadcast::Receiver<Event>, who: &str) -> Option<Event> {
    loop {
        match events.recv().await {
            Ok(event) => return Some(event),
            Err(broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(missed = n, who, "container events missed");
            }
            Err(broadcast::error::RecvError::Closed) => return None,
        }
    }
}
