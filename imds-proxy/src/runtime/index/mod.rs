//! The index of containers over one [`Source`]: kept from the source's [`Change`]s (one
//! reconcile, [`Index::apply`]), asked directly on a miss ([`Index::get`],
//! [`Index::ask_by_address`]) within [`MISS_BUDGET`], and announcing what changed ([`Event`]) to
//! the credential prefetch and the tc sources. When the source's changes end or fail (the runtime
//! restarted), the index asks for them again and reconciles from the full list.
use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use futures_util::{StreamExt as _, future::BoxFuture};
use tokio::{sync::broadcast, time::Instant};

use super::{
    Container, Containers, Error, Event,
    source::{Change, Description, Source, SourceError},
};

/// How long a miss may spend asking the runtime: well inside the SDKs' 1 s metadata timeout.
pub const MISS_BUDGET: Duration = Duration::from_millis(600);

/// A failed inspect on a miss is tried again after this, while the budget lasts.
const MISS_RETRY: Duration = Duration::from_millis(50);

pub struct Index {
    source: Box<dyn Source>,
    /// The runtime's socket, for logs.
    endpoint: String,
    /// What the source said it is, at connect.
    described: Description,
    containers: RwLock<HashMap<String, Arc<Container>>>,
    connected: AtomicBool,
    events: broadcast::Sender<Event>,
    /// Containers a caller named before the index held them (found by asking the runtime).
    found_before_indexed: AtomicU64,
    /// Containers a change named that could not be inspected (skipped; tried again at the next
    /// change naming them), and the ids already logged, so that one broken container is one log
    /// line, not one a second.
    skipped: AtomicU64,
    skipped_logged: Mutex<HashSet<String>>,
}

impl Index {
    /// The index over `source`, once it says what it is (the runtime answers).
    pub async fn new(source: Box<dyn Source>, endpoint: &str) -> Result<Arc<Self>, Error> {
        let described = source.describe().await.map_err(|cause| Error {
            host: endpoint.to_owned(),
            cause,
        })?;
        let (events, _) = broadcast::channel(1024);
        Ok(Arc::new(Self {
            source,
            endpoint: endpoint.to_owned(),
            described,
            containers: RwLock::new(HashMap::new()),
            connected: AtomicBool::new(false),
            events,
            found_before_indexed: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            skipped_logged: Mutex::default(),
        }))
    }

    /// What the runtime is (its kind, name, version and cgroup driver).
    pub fn runtime(&self) -> &Description {
        &self.described
    }

    /// How many times a container a change named could not be inspected.
    pub fn skipped(&self) -> u64 {
        self.skipped.load(Ordering::Relaxed)
    }

    /// How many containers a caller named before the index held them: each such request came
    /// before the runtime reported its container, and was answered by asking the runtime.
    pub fn found_before_indexed(&self) -> u64 {
        self.found_before_indexed.load(Ordering::Relaxed)
    }

    /// Container events, for prefetching and dropping credentials.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Whether the source's changes are followed (for /readyz).
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the runtime answers now.
    pub async fn ping(&self) -> bool {
        self.source.ping().await
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Arc<Container>>> {
        self.containers.read().expect("index poisoned")
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Arc<Container>>> {
        self.containers.write().expect("index poisoned")
    }

    fn announce(&self, event: Event) {
        // No subscriber is no one to tell.
        let _ = self.events.send(event);
    }

    /// The container with this id: from the index, else from the runtime (failed inspects
    /// retried within [`MISS_BUDGET`]).
    pub async fn get(&self, id: &str) -> Option<Arc<Container>> {
        if let Some(c) = self.read().get(id) {
            return Some(c.clone());
        }
        let deadline = Instant::now() + MISS_BUDGET;
        loop {
            match tokio::time::timeout_at(deadline, self.source.inspect(id)).await {
                Ok(Ok(Some(container))) => {
                    self.found_before_indexed.fetch_add(1, Ordering::Relaxed);
                    let container = Arc::new(container);
                    self.index_found(&container);
                    return Some(container);
                }
                Ok(Ok(None)) => return None, // the runtime does not know it
                Ok(Err(err)) if Instant::now() + MISS_RETRY < deadline => {
                    tracing::debug!(container_id = id, %err, "inspect failed; retrying");
                    tokio::time::sleep(MISS_RETRY).await;
                }
                Ok(Err(err)) => {
                    tracing::warn!(container_id = id, %err, "inspect failed");
                    return None;
                }
                Err(_) => {
                    tracing::warn!(container_id = id, "inspect timed out");
                    return None;
                }
            }
        }
    }

    /// Indexed containers an operator named (`imds-proxy explain`): by id or a prefix of at
    /// least four characters of it, by name, or every container of a pod (`<namespace>/<pod>`).
    pub fn find(&self, who: &str) -> Vec<Arc<Container>> {
        let who = who.trim();
        let mut found: Vec<Arc<Container>> = self
            .read()
            .values()
            .filter(|c| {
                c.id == who
                    || (who.len() >= 4 && c.id.starts_with(who))
                    || c.name == who
                    || c.pod.as_ref().is_some_and(|p| {
                        who.split_once('/') == Some((p.namespace.as_str(), p.name.as_str()))
                    })
            })
            .cloned()
            .collect();
        found.sort_by(|a, b| (&a.name, &a.id).cmp(&(&b.name, &b.id)));
        found
    }

    /// The indexed container that has this address, unconfirmed: an address is reused as soon
    /// as its container is gone, and a stale entry must never hand one container's role to
    /// another (the identity module confirms it).
    pub fn indexed_with_address(&self, ip: IpAddr) -> Option<Arc<Container>> {
        self.read()
            .values()
            .find(|c| c.addresses.contains(&ip))
            .cloned()
    }

    /// Ask the runtime which running container has this address now (`candidate`, the index's
    /// guess, first); the index is refreshed on the way. Bounded by [`MISS_BUDGET`]. One
    /// container that cannot be inspected does not hide the others.
    pub async fn ask_by_address(
        &self,
        ip: IpAddr,
        candidate: Option<&str>,
    ) -> Option<Arc<Container>> {
        let lookup = async {
            if let Some(id) = candidate
                && let Ok(Some(found)) = self.confirm(id, ip).await
            {
                return Ok(Some(found));
            }
            for id in self.source.candidates(ip).await? {
                if Some(id.as_str()) == candidate {
                    continue;
                }
                if let Ok(Some(found)) = self.confirm(&id, ip).await {
                    return Ok(Some(found));
                }
            }
            Ok::<_, SourceError>(None)
        };
        let runtime = &self.described.name;
        match tokio::time::timeout(MISS_BUDGET, lookup).await {
            Ok(Ok(found)) => found,
            Ok(Err(err)) => {
                tracing::warn!(%ip, %runtime, %err, "asking the runtime which container has this address failed");
                None
            }
            Err(_) => {
                tracing::warn!(%ip, %runtime, "asking the runtime which container has this address timed out");
                None
            }
        }
    }

    /// Inspect `id` now: the container, if it is running and has `ip`; the index is refreshed.
    async fn confirm(&self, id: &str, ip: IpAddr) -> Result<Option<Arc<Container>>, SourceError> {
        let Some(container) = self.source.inspect(id).await? else {
            // Gone: its entry (and its address) is no one's any more.
            self.forget(id);
            return Ok(None);
        };
        let container = Arc::new(container);
        self.index_found(&container);
        Ok((container.running && container.addresses.contains(&ip)).then_some(container))
    }

    /// Index a container found by asking (a caller came before the changes), and announce it if
    /// it is new here or started since: a later list never announces a container the index
    /// already holds, and the subscribers (the prefetch, the ports' vouched addresses) must hear
    /// of every one.
    fn index_found(&self, container: &Arc<Container>) {
        let previous = self.write().insert(container.id.clone(), container.clone());
        if previous.is_none_or(|p| !p.running && container.running) {
            self.announce(Event::Started(container.clone()));
        }
    }

    /// Forget a container the runtime no longer has, and announce it.
    fn forget(&self, id: &str) {
        let removed = self.write().remove(id);
        if let Some(gone) = removed {
            tracing::debug!(container_id = %id, name = %gone.name, "forgotten: the runtime has no such container");
            self.announce(Event::Destroyed(gone));
        }
    }

    /// Keep the index current until the task is dropped.
    pub async fn run(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(200);
        let (runtime, endpoint) = (&self.described.name, &self.endpoint);
        loop {
            match self.follow().await {
                Ok(()) => tracing::warn!(%runtime, %endpoint, "the runtime's changes ended"),
                Err(err) => {
                    tracing::warn!(%runtime, %endpoint, %err, "the runtime's changes failed")
                }
            }
            self.connected.store(false, Ordering::Relaxed);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
            if self.ping().await {
                backoff = Duration::from_millis(200);
            }
        }
    }

    /// Apply the source's changes until they end or fail.
    async fn follow(&self) -> Result<(), SourceError> {
        let mut changes = self.source.changes();
        while let Some(change) = changes.next().await {
            let full = matches!(
                change,
                Ok(Change::Running {
                    all_again: true,
                    ..
                })
            );
            self.apply(change?).await;
            if full && !self.connected.swap(true, Ordering::Relaxed) {
                tracing::info!(
                    runtime = %self.described.name,
                    containers = self.len(),
                    "container index synchronised"
                );
            }
        }
        Ok(())
    }

    /// The one reconcile: what a change means for the index, and what is announced.
    pub(crate) async fn apply(&self, change: Change) {
        match change {
            Change::Running { ids, all_again } => self.reconcile(ids, all_again).await,
            Change::Started(id) => self.index_or_skip(&id).await,
            // Not indexed (it runs nothing yet, so nothing can call from it); only announced.
            Change::Created(id) => match self.source.inspect(&id).await {
                Ok(Some(container)) => self.announce(Event::Created(Arc::new(container))),
                Ok(None) => {}
                Err(err) => tracing::debug!(container_id = %id, %err, "created; cannot inspect"),
            },
            // Announced even when it was never indexed: a short-lived container (`docker run
            // --rm`) can be gone before its start is inspected, yet its create was announced and
            // its credentials prefetched; they must go with it. Its name (what its session is
            // called) then comes from the change.
            Change::Destroyed { id, name } => {
                let removed = self.write().remove(&id);
                let container = removed.unwrap_or_else(|| {
                    Arc::new(Container {
                        id: id.clone(),
                        name,
                        ..Container::default()
                    })
                });
                tracing::debug!(container_id = %id, "forgotten");
                self.announce(Event::Destroyed(container));
            }
        }
    }

    /// Forget what is not running any more, index what is new (or everything, `all_again`), and
    /// announce only those.
    async fn reconcile(&self, ids: Vec<String>, all_again: bool) {
        let running: HashSet<String> = ids.into_iter().collect();
        let known: Vec<(String, bool)> = self
            .read()
            .iter()
            .map(|(id, c)| (id.clone(), c.running))
            .collect();
        for (id, _) in known.iter().filter(|(id, _)| !running.contains(id)) {
            let removed = self.write().remove(id);
            if let Some(container) = removed {
                if all_again {
                    // Gone while no one listened (the runtime restarted, the stream broke):
                    // rare, and worth a line.
                    tracing::info!(container_id = %id, name = %container.name, "forgotten: not running at resync");
                } else {
                    tracing::debug!(container_id = %id, name = %container.name, "forgotten: not running");
                }
                self.announce(Event::Destroyed(container));
            }
        }
        for id in &running {
            // Indexed by a miss before it ran: look again.
            let again = all_again
                || known
                    .iter()
                    .find(|(k, _)| k == id)
                    .is_none_or(|(_, was_running)| !was_running);
            if again {
                self.index_or_skip(id).await;
            }
        }
        // A skipped container that is gone is forgotten: its id is logged again if it comes back.
        self.skipped_logged
            .lock()
            .expect("skipped poisoned")
            .retain(|id| running.contains(id));
    }

    /// Inspect one container a change named, index and announce it; one that cannot be inspected
    /// (its status fails, or is larger than a gRPC message may be) is skipped and counted, and
    /// the others go on. It is tried again when a change names it again; logged once.
    async fn index_or_skip(&self, id: &str) {
        match self.source.inspect(id).await {
            Ok(found) => {
                self.skipped_logged
                    .lock()
                    .expect("skipped poisoned")
                    .remove(id);
                let Some(container) = found else {
                    // Gone between the change and the inspect.
                    self.forget(id);
                    return;
                };
                let container = Arc::new(container);
                self.write().insert(id.to_owned(), container.clone());
                tracing::debug!(container_id = %id, name = %container.name, "indexed");
                self.announce(Event::Started(container));
            }
            Err(err) => {
                self.skipped.fetch_add(1, Ordering::Relaxed);
                let first = self
                    .skipped_logged
                    .lock()
                    .expect("skipped poisoned")
                    .insert(id.to_owned());
                if first {
                    tracing::warn!(
                        container_id = %id,
                        %err,
                        "cannot inspect this container; skipped (no role until it can be; tried \
                         again when the runtime names it again)"
                    );
                }
            }
        }
    }

    /// The session names of the indexed containers: what the credential cache may keep.
    pub fn session_names(&self) -> HashSet<String> {
        self.read()
            .values()
            .map(|c| crate::roles::session_name(Some(&c.name), &c.id))
            .collect()
    }
}

/// The daemon's: the container index.
impl Containers for Index {
    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Option<Arc<Container>>> {
        Box::pin(Index::get(self, id))
    }
    fn indexed_with_address(&self, ip: IpAddr) -> Option<Arc<Container>> {
        Index::indexed_with_address(self, ip)
    }
    fn ask_by_address<'a>(
        &'a self,
        ip: IpAddr,
        candidate: Option<&'a str>,
    ) -> BoxFuture<'a, Option<Arc<Container>>> {
        Box::pin(Index::ask_by_address(self, ip, candidate))
    }
}

#[cfg(test)]
mod tests;
