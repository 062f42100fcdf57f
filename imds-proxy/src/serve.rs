//! The listener side of the IMDS API: every connection attested, admitted against connection
//! caps, and served as HTTP/1.1 with bounded header reads.
//!
//! What a hostile caller could otherwise do, and what stops it:
//! - hold connections open with a half-sent request (slowloris) or an idle keep-alive: the
//!   header-read timer runs from the moment the server waits for a request head until the head is
//!   complete, so it bounds both ([`Limits::header_timeout`]);
//! - send a huge head: the read buffer is capped ([`MAX_HEAD_BYTES`]), beyond it hyper answers 431
//!   and closes;
//! - open thousands of connections: each caller (container, or source address when there is no
//!   kernel record) has a cap, and so has the whole server; beyond them a connection is closed at
//!   once and counted;
//! - speak HTTP/2 (h2c) or anything else: only HTTP/1 is served;
//! - exhaust file descriptors: the soft limit is raised to the hard one at start
//!   ([`raise_fd_limit`]), and accept errors back off instead of spinning.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioIo, TokioTimer};
use tower::ServiceExt as _;

use crate::{identity::AttestedListener, metrics::Metrics};

/// The largest request head (request line and headers) read: SDK requests carry a few hundred
/// bytes. hyper's floor is 8 KiB.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;

#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// From waiting for a request head (a new connection, or an idle keep-alive one) to having it
    /// whole.
    pub header_timeout: Duration,
    pub max_connections: usize,
    pub max_connections_per_caller: usize,
}

pub use crate::identity::CallerKey;

/// Why a connection was closed without being served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    PerCaller,
    Total,
}

impl Refusal {
    pub fn name(self) -> &'static str {
        match self {
            Refusal::PerCaller => "per_caller_limit",
            Refusal::Total => "total_limit",
        }
    }
}

/// Open connections, in all and per caller.
pub struct Admission {
    max_total: usize,
    max_per_caller: usize,
    open: Mutex<(usize, HashMap<CallerKey, usize>)>,
}

/// An admitted connection; dropping it gives its place back.
pub struct Ticket {
    admission: Arc<Admission>,
    key: CallerKey,
}

impl Admission {
    pub fn new(max_total: usize, max_per_caller: usize) -> Arc<Self> {
        Arc::new(Self {
            max_total,
            max_per_caller,
            open: Mutex::new((0, HashMap::new())),
        })
    }

    pub fn admit(self: &Arc<Self>, key: CallerKey) -> Result<Ticket, Refusal> {
        let mut open = self.open.lock().expect("admission poisoned");
        let (total, per) = &mut *open;
        let mine = per.get(&key).copied().unwrap_or(0);
        // The caller's own cap first: a caller at its cap is told so even when the server is full.
        if mine >= self.max_per_caller {
            return Err(Refusal::PerCaller);
        }
        if *total >= self.max_total {
            return Err(Refusal::Total);
        }
        *total += 1;
        per.insert(key.clone(), mine + 1);
        Ok(Ticket {
            admission: self.clone(),
            key,
        })
    }

    pub fn open(&self) -> usize {
        self.open.lock().expect("admission poisoned").0
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut open = self.admission.open.lock().expect("admission poisoned");
        let (total, per) = &mut *open;
        *total -= 1;
        if let Some(n) = per.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                per.remove(&self.key);
            }
        }
    }
}

/// Raise the soft file-descriptor limit to the hard one (no privilege needed); the limit in force.
pub fn raise_fd_limit() -> std::io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write and read only the struct passed.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        limit = raised;
    }
    Ok(limit.rlim_cur)
}

/// Back-off after failed accepts: 5 ms doubling to 1 s, back to the start after a success.
#[derive(Default)]
struct Backoff(u32);

impl Backoff {
    fn next(&mut self) -> Duration {
        let delay = Duration::from_millis(5u64 << self.0.min(8)).min(Duration::from_secs(1));
        self.0 += 1;
        delay
    }
}

/// Serve `router` on `listener` until the listener fails for good (it does not: accept errors
/// are retried).
pub async fn serve(
    mut listener: AttestedListener,
    router: axum::Router,
    limits: Limits,
    admission: Arc<Admission>,
    metrics: Arc<Metrics>,
) -> std::io::Result<()> {
    let mut backoff = Backoff::default();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MAX_HEAD_BYTES)
        .max_headers(64)
        .keep_alive(true);
    // Connections refused for a caller: one line per caller a minute, the rest counted.
    let quiet = Arc::new(crate::identity::quiet());
    loop {
        let (stream, pending) = match listener.accept_pending().await {
            Ok(accepted) => {
                backoff = Backoff::default();
                accepted
            }
            Err(err) => {
                // EMFILE, ENFILE, ENOBUFS...: wait for connections to close instead of spinning.
                let delay = backoff.next();
                tracing::error!(%err, retry_in = ?delay, "accept failed");
                metrics.refused_connection("accept_error");
                tokio::time::sleep(delay).await;
                continue;
            }
        };
        let router = router.clone();
        let admission = admission.clone();
        let metrics = metrics.clone();
        let http = http.clone();
        let quiet = quiet.clone();
        tokio::spawn(async move {
            // Who it is, once for the connection (the kernel's record was taken at accept).
            // Shared by the connection's requests: nothing of it is copied per request.
            let peer = Arc::new(pending.attest().await);
            let key = peer.key.clone();
            let ticket = match admission.admit(key.clone()) {
                Ok(ticket) => ticket,
                Err(refusal) => {
                    metrics.refused_connection(refusal.name());
                    match quiet.admit((key.clone(), refusal.name()), std::time::Instant::now()) {
                        Some(repeats) => tracing::warn!(
                            peer = %peer.addr,
                            caller = ?key,
                            reason = refusal.name(),
                            repeats,
                            "connection closed unserved: too many open"
                        ),
                        None => metrics.log_line_suppressed(),
                    }
                    return;
                }
            };
            metrics.set_open_connections(admission.open());
            let service = hyper::service::service_fn(move |mut request: hyper::Request<_>| {
                request.extensions_mut().insert(ConnectInfo(peer.clone()));
                router.clone().oneshot(request.map(axum::body::Body::new))
            });
            if let Err(err) = http.serve_connection(TokioIo::new(stream), service).await {
                if err.is_timeout() {
                    metrics.refused_connection("header_timeout");
                }
                tracing::debug!(%err, caller = ?key, "connection ended with an error");
            }
            drop(ticket);
            metrics.set_open_connections(admission.open());
        });
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::identity::Peer;

    fn address(last: u8) -> CallerKey {
        CallerKey::Address(IpAddr::from([10, 0, 0, last]))
    }

    #[test]
    fn each_caller_has_its_own_cap_and_places_come_back() {
        let admission = Admission::new(10, 2);
        let a1 = admission.admit(address(1)).unwrap();
        let _a2 = admission.admit(address(1)).unwrap();
        assert_eq!(
            admission.admit(address(1)).err(),
            Some(Refusal::PerCaller),
            "a third from the same caller"
        );
        // Another caller is not affected by the first one's cap.
        let _b1 = admission.admit(address(2)).unwrap();
        assert_eq!(admission.open(), 3);
        drop(a1);
        assert_eq!(admission.open(), 2);
        let _a3 = admission.admit(address(1)).expect("a place came back");
    }

    #[test]
    fn the_server_has_a_cap_of_its_own() {
        let admission = Admission::new(3, 2);
        let tickets: Vec<_> = (1..=3)
            .map(|i| admission.admit(address(i)).unwrap())
            .collect();
        assert_eq!(admission.admit(address(9)).err(), Some(Refusal::Total));
        drop(tickets);
        assert_eq!(admission.open(), 0);
        assert!(admission.admit(address(9)).is_ok());
    }

    #[test]
    fn callers_are_keyed_by_container_then_cgroup_then_address() {
        use crate::identity::{Caller, Evidence, Refusal};
        let addr: std::net::SocketAddr = "10.0.0.1:5000".parse().unwrap();
        let unattested = Peer::new(addr, Err(Refusal::NoRecord));
        assert_eq!(unattested.key, address(1));
        let container = crate::runtime::Container {
            id: "ab".repeat(32),
            ..Default::default()
        };
        let caller = Caller::at_address(Arc::new(container), addr);
        let in_container = Peer::new(addr, Ok(caller.clone()));
        assert_eq!(
            in_container.key,
            CallerKey::Container("ab".repeat(32).into())
        );
        let host = Peer::new(
            addr,
            Ok(Caller {
                container: None,
                evidence: Evidence::Kernel {
                    cgroup_id: 77,
                    tgid: 1,
                    cgroup: None,
                },
                ..caller
            }),
        );
        assert_eq!(host.key, CallerKey::Cgroup(77));
    }

    #[test]
    fn accept_backoff_grows_to_a_second() {
        let mut b = Backoff::default();
        assert_eq!(b.next(), Duration::from_millis(5));
        assert_eq!(b.next(), Duration::from_millis(10));
        for _ in 0..20 {
            b.next();
        }
        assert_eq!(b.next(), Duration::from_secs(1));
    }
}
