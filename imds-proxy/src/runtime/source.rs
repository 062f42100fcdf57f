//! The one small interface every way of getting containers implements ([`Source`]): the Docker
//! API ([`super::docker_api`], Docker and Podman) and the CRI ([`super::cri`]); a table in the
//! index's tests. A source answers questions about the runtime *now* and reports changes as a
//! stream of [`Change`]s; the index ([`super::index`]) keeps what it learns and decides what to
//! announce. A source keeps no index of its own.
use std::net::IpAddr;

use futures_util::{future::BoxFuture, stream::BoxStream};

use super::{Container, Kind};

/// What asking a source can fail with.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Docker(#[from] bollard::errors::Error),
    /// A CRI call's status, in one readable line.
    #[error("CRI call failed ({code}): {message}")]
    Cri { code: tonic::Code, message: String },
    /// A fake's failure (tests).
    #[cfg(test)]
    #[error("{0}")]
    Fake(String),
}

impl From<tonic::Status> for SourceError {
    fn from(status: tonic::Status) -> Self {
        SourceError::Cri {
            code: status.code(),
            message: status.message().to_owned(),
        }
    }
}

/// What a source says of the runtime behind it, once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Description {
    pub kind: Kind,
    /// The runtime's own name and version (`docker 20.10.24`, `containerd 1.6.20`).
    pub name: String,
    pub version: String,
    /// Its cgroup driver (`cgroupfs`, `systemd`), or how containers' cgroups are learnt.
    pub cgroup_driver: String,
}

/// A change the source saw. Ids are the runtime's container ids.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Everything running now. What the index holds and this does not name is gone; with
    /// `all_again`, every container named is inspected again and announced (the first list after
    /// (re)connecting: anything may have changed while no one listened), else only the new ones
    /// (a periodic poll).
    Running { ids: Vec<String>, all_again: bool },
    /// Created, not started yet: announced (for prefetching), not indexed.
    Created(String),
    /// Started, renamed or updated: inspected again, indexed and announced.
    Started(String),
    /// Destroyed; `name` is what the event said (the container may never have been indexed).
    Destroyed { id: String, name: String },
}

/// A way of getting containers.
pub trait Source: Send + Sync + 'static {
    /// What the runtime is; asked once.
    fn describe(&self) -> BoxFuture<'_, Result<Description, SourceError>>;
    /// Whether the runtime answers now.
    fn ping(&self) -> BoxFuture<'_, bool>;
    /// Container `id` now; `Ok(None)` when the runtime has no such container.
    fn inspect<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<Container>, SourceError>>;
    /// The ids worth inspecting to find who holds `ip` now, the likeliest first.
    fn candidates(&self, ip: IpAddr) -> BoxFuture<'_, Result<Vec<String>, SourceError>>;
    /// The changes from now on, starting with a [`Change::Running`]; the stream ends or fails when
    /// the runtime goes away, and the index asks again.
    fn changes(&self) -> BoxStream<'static, Result<Change, SourceError>>;
}
