//! The container runtimes, behind one index: what the proxy knows of a container
//! ([`container`]), kept from a full list at start and the engine's events after (start, die,
//! destroy, rename, update), or polls for a CRI runtime ([`poll`], [`cri`]), with a direct inspect
//! on a miss: a request can arrive in the first milliseconds of a container's life, before its
//! start event. When the engine goes away (restart), the index reconnects and lists again.
//!
//! One index, two kinds of source ([`Source`]): a Docker-API engine (Docker, or Podman's
//! compatible service) followed by its events, and a Kubernetes node's CRI runtime (containerd,
//! CRI-O), listed every second. Image-set roles are taken out here ([`image_roles`]).
use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bollard::{
    Docker,
    query_parameters::{EventsOptions, InspectContainerOptions, ListContainersOptions},
};
use futures_util::StreamExt as _;
use tokio::sync::broadcast;

use crate::cgroup::Engine;

pub mod container;
pub mod cri;
mod image_roles;
mod poll;

use image_roles::{ImageConfig, ROLE_LABELS, without_image_roles};

pub use container::{Container, Pod};

/// Changes the rest of the proxy reacts to.
#[derive(Clone, Debug)]
pub enum Event {
    /// A container was created (not started yet, so not indexed): its credentials can be
    /// fetched ahead while Docker sets it up, so that its first request finds them.
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

/// What asking a source can fail with.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Docker(#[from] bollard::errors::Error),
    #[error(transparent)]
    Cri(#[from] crate::runtime::cri::CriError),
}

/// Where containers come from.
enum Source {
    /// Docker, or Podman's Docker-compatible service: events.
    Docker(Docker),
    /// A CRI runtime (containerd, CRI-O): polled.
    Cri {
        cri: crate::runtime::cri::Cri,
        /// How often its running containers are listed.
        poll: Duration,
    },
}

pub struct Index {
    source: Source,
    host: String,
    containers: RwLock<HashMap<String, Arc<Container>>>,
    connected: AtomicBool,
    events: broadcast::Sender<Event>,
    /// `--trust-image-role`: role settings an image carries count as the container's own.
    trust_image_role: bool,
    /// Images' own labels and environment, by image id (immutable for an id).
    images: RwLock<HashMap<String, Arc<ImageConfig>>>,
    /// The engine behind the API (Docker or Podman) and its cgroup driver, asked once.
    driver: tokio::sync::OnceCell<(Engine, String)>,
    /// Containers a caller named before the index held them (found by asking Docker).
    found_before_indexed: AtomicU64,
    /// CRI: containers a poll could not inspect (skipped; the poll goes on), and the ids already
    /// logged, so that one broken container is one log line, not one a second.
    skipped: AtomicU64,
    skipped_logged: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// Image configurations kept before the cache starts over.
const IMAGE_CACHE_LIMIT: usize = 4096;

/// How long a miss may spend asking Docker: well inside the SDKs' 1 s metadata timeout.
const MISS_BUDGET: Duration = Duration::from_millis(600);

/// A container's addresses on every network it is attached to, as inspect and list report them.
fn addresses(networks: Option<HashMap<String, bollard::models::EndpointSettings>>) -> Vec<IpAddr> {
    networks
        .unwrap_or_default()
        .into_values()
        .flat_map(|n| [n.ip_address, n.global_ipv6_address])
        .flatten()
        // Empty when the network gives none of that family.
        .filter_map(|addr| addr.parse().ok())
        .collect()
}

impl Index {
    /// Connect to the daemon at `host` (`unix:///var/run/docker.sock`). With `trust_image_role`,
    /// role settings from a container's image count as its own.
    pub async fn connect(host: &str, trust_image_role: bool) -> Result<Arc<Self>, Error> {
        let err = |source: bollard::errors::Error| Error {
            host: host.to_owned(),
            cause: source.into(),
        };
        let path = host.trim_start_matches("unix://");
        let docker = Docker::connect_with_unix(path, 10, bollard::API_DEFAULT_VERSION)
            .map_err(err)?
            .negotiate_version()
            .await
            .map_err(err)?;
        Ok(Self::with_source(
            Source::Docker(docker),
            host,
            trust_image_role,
        ))
    }

    /// Follow the pods of the CRI runtime at `endpoint` (`unix:///run/containerd/containerd.sock`).
    /// A CRI runtime's index, listing its running containers every `poll` ([`crate::runtime::cri::POLL`]).
    pub async fn connect_cri(endpoint: &str, poll: Duration) -> Result<Arc<Self>, Error> {
        let err = |source: crate::runtime::cri::CriError| Error {
            host: endpoint.to_owned(),
            cause: source.into(),
        };
        let cri = crate::runtime::cri::Cri::connect(endpoint);
        // Answering now, or the proxy does not start.
        cri.version().await.map_err(err)?;
        Ok(Self::with_source(
            Source::Cri { cri, poll },
            endpoint,
            false,
        ))
    }

    fn with_source(source: Source, host: &str, trust_image_role: bool) -> Arc<Self> {
        let (events, _) = broadcast::channel(1024);
        Arc::new(Self {
            source,
            host: host.to_owned(),
            containers: RwLock::new(HashMap::new()),
            connected: AtomicBool::new(false),
            events,
            trust_image_role,
            images: RwLock::new(HashMap::new()),
            driver: tokio::sync::OnceCell::new(),
            found_before_indexed: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            skipped_logged: Default::default(),
        })
    }

    /// CRI: how many times a poll skipped a container it could not inspect.
    pub fn skipped(&self) -> u64 {
        self.skipped.load(Ordering::Relaxed)
    }

    /// How many containers a caller named before the index held them: each such request came
    /// before Docker reported its container, and was answered by asking Docker.
    pub fn found_before_indexed(&self) -> u64 {
        self.found_before_indexed.load(Ordering::Relaxed)
    }

    /// Container events, for prefetching and dropping credentials.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Whether the events stream is up (for /readyz).
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    pub fn len(&self) -> usize {
        self.containers.read().expect("index poisoned").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The engine (Docker, or Podman's Docker-compatible service) and its cgroup driver
    /// (`cgroupfs` or `systemd`).
    pub async fn engine(&self) -> Result<(Engine, String), Error> {
        self.driver()
            .await
            .map(|(engine, driver)| (engine, driver.to_owned()))
            .map_err(|cause| Error {
                host: self.host.clone(),
                cause,
            })
    }

    async fn driver(&self) -> Result<(Engine, &str), SourceError> {
        self.driver
            .get_or_try_init(|| async {
                let docker = match &self.source {
                    Source::Docker(docker) => docker,
                    // Each container's cgroup is read from its runtime spec, whatever the driver.
                    Source::Cri { cri, .. } => {
                        let (name, version) = cri.version().await?;
                        tracing::info!(runtime = %name, %version, "CRI runtime");
                        return Ok((Engine::Cri, "per container (OCI runtime spec)".to_owned()));
                    }
                };
                let info = docker.info().await?;
                let version = docker.version().await?;
                // Podman's service names itself among the version's components.
                let podman = version
                    .components
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.name.to_ascii_lowercase().contains("podman"));
                let engine = if podman {
                    Engine::Podman
                } else {
                    Engine::Docker
                };
                let driver = info
                    .cgroup_driver
                    .map(|d| d.to_string())
                    .unwrap_or_default();
                Ok::<_, SourceError>((engine, driver))
            })
            .await
            .map(|(engine, driver)| (*engine, driver.as_str()))
    }

    /// Answer whether the daemon answers now.
    pub async fn ping(&self) -> bool {
        match &self.source {
            Source::Docker(docker) => docker.ping().await.is_ok(),
            Source::Cri { cri, .. } => cri.version().await.is_ok(),
        }
    }

    /// The container with this id: from the index, else straight from Docker (bounded retries).
    pub async fn get(&self, id: &str) -> Option<Arc<Container>> {
        if let Some(c) = self.containers.read().expect("index poisoned").get(id) {
            return Some(c.clone());
        }
        let deadline = Instant::now() + MISS_BUDGET;
        loop {
            match tokio::time::timeout_at(deadline.into(), self.inspect(id)).await {
                Ok(Ok(Some(container))) => {
                    self.found_before_indexed.fetch_add(1, Ordering::Relaxed);
                    let container = Arc::new(container);
                    self.index_found(id, &container);
                    return Some(container);
                }
                Ok(Ok(None)) => return None, // Docker does not know it
                Ok(Err(err)) if Instant::now() + Duration::from_millis(50) < deadline => {
                    tracing::debug!(container_id = id, %err, "inspect failed; retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await;
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

    /// The indexed container that has this address, unconfirmed: an address is reused as soon
    /// as its container is gone, and a stale entry must never hand one container's role to
    /// another (the identity module confirms it).
    pub fn indexed_with_address(&self, ip: IpAddr) -> Option<Arc<Container>> {
        self.containers
            .read()
            .expect("index poisoned")
            .values()
            .find(|c| c.addresses.contains(&ip))
            .cloned()
    }

    /// Ask Docker which running container has this address now (`candidate`, the index's guess,
    /// first); the index is refreshed on the way. Bounded by the same budget as [`Index::get`].
    pub async fn ask_by_address(
        &self,
        ip: IpAddr,
        candidate: Option<&str>,
    ) -> Option<Arc<Container>> {
        let lookup = async {
            if let Some(id) = candidate
                && let Some(found) = self.confirm(id, ip).await?
            {
                return Ok(Some(found));
            }
            let docker = match &self.source {
                Source::Docker(docker) => docker,
                // Every running container, each confirmed: the sandbox's addresses are the
                // runtime's answer now.
                Source::Cri { cri, .. } => {
                    for id in cri.running().await? {
                        // One container that cannot be inspected does not hide the others.
                        if let Ok(Some(found)) = self.confirm(&id, ip).await {
                            return Ok(Some(found));
                        }
                    }
                    return Ok(None);
                }
            };
            // Not indexed yet (its first milliseconds) or the index was stale: ask Docker. A
            // container's first process can connect before Docker has finished starting it: the
            // list then still says "created", with no address. So: running containers with the
            // address first, then the "created" ones, whose inspect answers once their start is
            // done (Docker holds the container while starting it). Either way it is the inspect
            // that decides: running, with this address, now.
            let options = ListContainersOptions {
                all: true,
                filters: Some(HashMap::from([(
                    "status".to_owned(),
                    vec!["running".to_owned(), "created".to_owned()],
                )])),
                ..Default::default()
            };
            let mut starting = Vec::new();
            for summary in docker.list_containers(Some(options)).await? {
                let Some(id) = summary.id else { continue };
                let held = addresses(summary.network_settings.and_then(|n| n.networks));
                if held.contains(&ip) {
                    if let Some(found) = self.confirm(&id, ip).await? {
                        return Ok(Some(found));
                    }
                } else if held.is_empty() {
                    starting.push(id);
                }
            }
            for id in starting {
                if let Some(found) = self.confirm(&id, ip).await? {
                    return Ok(Some(found));
                }
            }
            Ok::<_, SourceError>(None)
        };
        match tokio::time::timeout(MISS_BUDGET, lookup).await {
            Ok(Ok(found)) => found,
            Ok(Err(err)) => {
                tracing::warn!(%ip, %err, "asking Docker which container has this address failed");
                None
            }
            Err(_) => {
                tracing::warn!(%ip, "asking Docker which container has this address timed out");
                None
            }
        }
    }

    /// Inspect `id` now: the container, if it is running and has `ip`; the index is refreshed.
    async fn confirm(&self, id: &str, ip: IpAddr) -> Result<Option<Arc<Container>>, SourceError> {
        let Some(container) = self.inspect(id).await? else {
            return Ok(None);
        };
        let container = Arc::new(container);
        self.index_found(id, &container);
        Ok((container.running && container.addresses.contains(&ip)).then_some(container))
    }

    /// Index a container found by asking (a caller came before the events or the poll), and
    /// announce it if it is new here: the poll never announces a container it already holds, and
    /// its subscribers (the prefetch, the ports' vouched addresses) must hear of every one.
    fn index_found(&self, id: &str, container: &Arc<Container>) {
        let previous = self
            .containers
            .write()
            .expect("index poisoned")
            .insert(id.to_owned(), container.clone());
        if previous.is_none_or(|p| !p.running && container.running) {
            let _ = self.events.send(Event::Started(container.clone()));
        }
    }

    /// `Ok(None)` when the source has no such container.
    async fn inspect(&self, id: &str) -> Result<Option<Container>, SourceError> {
        let docker = match &self.source {
            Source::Docker(docker) => docker,
            Source::Cri { cri, .. } => return Ok(cri.inspect(id).await?),
        };
        match docker
            .inspect_container(id, None::<InspectContainerOptions>)
            .await
        {
            Ok(info) => {
                let config = info.config.unwrap_or_default();
                let addresses = addresses(info.network_settings.and_then(|n| n.networks));
                let state = info.state.unwrap_or_default();
                let running = state.running.unwrap_or(false);
                let pid = if running {
                    state.pid.and_then(|p| u32::try_from(p).ok()).unwrap_or(0)
                } else {
                    0
                };
                let id = info.id.unwrap_or_else(|| id.to_owned());
                let name = info
                    .name
                    .unwrap_or_default()
                    .trim_start_matches('/')
                    .to_owned();
                let mut labels = config.labels.unwrap_or_default();
                let mut env = config.env.unwrap_or_default();
                let names_a_role = ROLE_LABELS.iter().any(|k| labels.contains_key(*k))
                    || env
                        .iter()
                        .any(|e| e.starts_with(&format!("{}=", crate::roles::ROLE_ENV)));
                if !self.trust_image_role && names_a_role {
                    // Fail closed: without the image's configuration, a role setting might be
                    // the image's; the inspect fails and is retried.
                    let image = self
                        .image_config(docker, info.image.as_deref().unwrap_or_default())
                        .await?;
                    let ignored =
                        without_image_roles(&mut labels, &mut env, &image.labels, &image.env);
                    if !ignored.is_empty() {
                        tracing::warn!(
                            container_id = %id,
                            container = %name,
                            ignored = ?ignored,
                            "role settings that come from the container's image are ignored (an \
                             image does not choose its own role; set them on the container, or run \
                             the proxy with --trust-image-role)"
                        );
                    }
                }
                let cgroup_parent = info
                    .host_config
                    .and_then(|h| h.cgroup_parent)
                    .unwrap_or_default();
                let (engine, driver) = self.driver().await?;
                let cgroup = crate::cgroup::expected_cgroup(engine, driver, &cgroup_parent, &id);
                Ok(Some(Container {
                    addresses,
                    running,
                    pid,
                    id,
                    name,
                    labels,
                    env,
                    cgroup,
                    pod: None,
                }))
            }
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(None),
            Err(err) => Err(err.into()),
        }
    }

    /// An image's own labels and environment, by its id; cached (an id's configuration never
    /// changes).
    async fn image_config(
        &self,
        docker: &Docker,
        image: &str,
    ) -> Result<Arc<ImageConfig>, bollard::errors::Error> {
        if let Some(found) = self.images.read().expect("images poisoned").get(image) {
            return Ok(found.clone());
        }
        let config = docker
            .inspect_image(image)
            .await?
            .config
            .unwrap_or_default();
        let found = Arc::new(ImageConfig {
            labels: config.labels.unwrap_or_default(),
            env: config.env.unwrap_or_default(),
        });
        let mut images = self.images.write().expect("images poisoned");
        if images.len() >= IMAGE_CACHE_LIMIT {
            images.clear();
        }
        images.insert(image.to_owned(), found.clone());
        Ok(found)
    }

    /// List the running containers and replace the index with them.
    async fn resync(&self) -> Result<(), SourceError> {
        let ids: Vec<String> = match &self.source {
            Source::Docker(docker) => docker
                .list_containers(None::<ListContainersOptions>)
                .await?
                .into_iter()
                .filter_map(|summary| summary.id)
                .collect(),
            Source::Cri { cri, .. } => cri.running().await?,
        };
        let mut fresh = HashMap::new();
        for id in ids {
            if let Some(container) = self.inspect(&id).await? {
                fresh.insert(id, Arc::new(container));
            }
        }
        let started: Vec<Arc<Container>> = fresh.values().cloned().collect();
        let old = std::mem::replace(
            &mut *self.containers.write().expect("index poisoned"),
            fresh,
        );
        // Containers that went while the events were not followed (the engine restarted, the
        // stream broke): their destroy events are lost, so they are forgotten here.
        let fresh_ids: std::collections::HashSet<String> =
            started.iter().map(|c| c.id.clone()).collect();
        for (id, container) in old {
            if !fresh_ids.contains(&id) {
                tracing::info!(container_id = %id, name = %container.name, "forgotten: not running at resync");
                let _ = self.events.send(Event::Destroyed(container));
            }
        }
        for container in started {
            let _ = self.events.send(Event::Started(container));
        }
        Ok(())
    }

    /// The session names of the indexed containers: what the credential cache may keep.
    pub fn session_names(&self) -> std::collections::HashSet<String> {
        self.containers
            .read()
            .expect("index poisoned")
            .values()
            .map(|c| crate::roles::session_name(Some(&c.name), &c.id))
            .collect()
    }

    /// Keep the index current until the task is dropped.
    pub async fn run(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(200);
        loop {
            match self.follow().await {
                Ok(()) => tracing::warn!(host = %self.host, "docker events stream ended"),
                Err(err) => tracing::warn!(host = %self.host, %err, "docker events stream failed"),
            }
            self.connected.store(false, Ordering::Relaxed);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
            if self.ping().await {
                backoff = Duration::from_millis(200);
            }
        }
    }

    /// Subscribe to events, then list (so nothing between the two is missed), then follow.
    async fn follow(&self) -> Result<(), SourceError> {
        let docker = match &self.source {
            Source::Docker(docker) => docker,
            Source::Cri { cri, poll } => return self.poll(cri, *poll).await,
        };
        let filters = HashMap::from([
            ("type".to_owned(), vec!["container".to_owned()]),
            (
                "event".to_owned(),
                // Podman says "remove" where Docker says "destroy".
                [
                    "create", "start", "die", "destroy", "remove", "rename", "update",
                ]
                .map(str::to_owned)
                .to_vec(),
            ),
        ]);
        let mut stream = docker.events(Some(EventsOptions {
            filters: Some(filters),
            ..Default::default()
        }));
        self.resync().await?;
        self.connected.store(true, Ordering::Relaxed);
        tracing::info!(containers = self.len(), "docker index synchronised");
        while let Some(event) = stream.next().await {
            let event = event?;
            let (Some(action), Some(id)) = (
                event.action.as_deref(),
                event.actor.as_ref().and_then(|a| a.id.clone()),
            ) else {
                continue;
            };
            match action {
                "start" | "rename" | "update" => {
                    if let Some(container) = self.inspect(&id).await? {
                        let container = Arc::new(container);
                        self.containers
                            .write()
                            .expect("index poisoned")
                            .insert(id.clone(), container.clone());
                        tracing::debug!(container_id = %id, name = %container.name, action, "indexed");
                        let _ = self.events.send(Event::Started(container));
                    }
                }
                // Not indexed (it runs nothing yet, so nothing can call from it); only announced.
                "create" => {
                    if let Some(container) = self.inspect(&id).await? {
                        let _ = self.events.send(Event::Created(Arc::new(container)));
                    }
                }
                // Announced even when it was never indexed: a short-lived container (`docker
                // run --rm`) can be gone before its start is inspected, yet its create was
                // announced and its credentials prefetched; they must go with it. The name
                // (what its session is called) then comes from the event.
                "destroy" | "remove" => {
                    let removed = self.containers.write().expect("index poisoned").remove(&id);
                    let container = removed.unwrap_or_else(|| {
                        let name = event
                            .actor
                            .as_ref()
                            .and_then(|a| a.attributes.as_ref())
                            .and_then(|a| a.get("name"))
                            .cloned()
                            .unwrap_or_default();
                        Arc::new(Container {
                            id: id.clone(),
                            name,
                            ..Container::default()
                        })
                    });
                    tracing::debug!(container_id = %id, "forgotten");
                    let _ = self.events.send(Event::Destroyed(container));
                }
                // "die": a stopped container makes no requests; it stays indexed until destroyed
                // (it may be started again).
                _ => {}
            }
        }
        Ok(())
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
