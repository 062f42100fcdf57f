//! The container source: an index of running containers, kept from a full list at start and the
//! events stream after (start, die, destroy, rename, update), with a direct inspect on a miss — a
//! request can arrive in the first milliseconds of a container's life, before its start event.
//! When the daemon goes away (restart), the index reconnects and lists again.
//!
//! One index, two kinds of source ([`Source`]): a Docker-API engine (Docker, or Podman's
//! compatible service) followed by its events, and a Kubernetes node's CRI runtime
//! ([`crate::cri`]), listed every second.
//!
//! Docker merges an image's own `LABEL`s and `ENV` into the container's configuration, so an image
//! author could name a role (`LABEL iam.amazonaws.com/role=Admin`, `ENV IAM_ROLE=Admin`) that the
//! person running it never asked for. Unless `--trust-image-role` is given, the role label, the
//! external-id label and `IAM_ROLE` count only when set on the container itself: a value equal to
//! the image's own is taken out of the container's configuration here, and logged.
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
use futures_util::future::BoxFuture;
use tokio::sync::broadcast;

use crate::cgroup::Engine;

/// What the proxy needs to know about a container.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Container {
    pub id: String,
    /// Without the leading `/`.
    pub name: String,
    pub labels: HashMap<String, String>,
    pub env: Vec<String>,
    /// Its addresses on every network it is attached to (tc mode identifies callers by them).
    pub addresses: Vec<IpAddr>,
    /// Whether it was running when Docker was last asked.
    pub running: bool,
    /// Its first process, in Docker's pid namespace, when it was running (else 0).
    pub pid: u32,
    /// The cgroup (relative to the v2 root) Docker put it in, from its cgroup driver and
    /// `--cgroup-parent`: a kernel record's cgroup must be this one or inside it.
    pub cgroup: String,
    /// The pod it belongs to (CRI runtimes); its name is then `<namespace>.<pod>` and its labels
    /// are the pod's role annotations.
    pub pod: Option<Pod>,
}

/// A Kubernetes pod, as its sandbox tells it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub sandbox_id: String,
}

impl Container {
    /// Whose role settings these are, for [`crate::roles::Policy::resolve_for`].
    pub fn subject(&self) -> crate::roles::Subject<'_> {
        match &self.pod {
            Some(pod) => crate::roles::Subject::Pod {
                annotations: &self.labels,
                namespace: &pod.namespace,
            },
            None => crate::roles::Subject::Container {
                labels: &self.labels,
                env: &self.env,
            },
        }
    }
}

/// The role-bearing settings the proxy reads from a container's configuration.
const ROLE_LABELS: [&str; 2] = [crate::roles::ROLE_LABEL, crate::roles::EXTERNAL_ID_LABEL];

/// An image's own labels and environment.
#[derive(Debug, Default)]
struct ImageConfig {
    labels: HashMap<String, String>,
    env: Vec<String>,
}

/// Take out of a container's labels and environment the role settings it only has because its
/// image set them (same key, same value): an image must not choose its own role. Returns what
/// was taken out, for the log.
fn without_image_roles(
    labels: &mut HashMap<String, String>,
    env: &mut Vec<String>,
    image_labels: &HashMap<String, String>,
    image_env: &[String],
) -> Vec<String> {
    let mut ignored = Vec::new();
    for key in ROLE_LABELS {
        if let (Some(value), Some(image_value)) = (labels.get(key), image_labels.get(key))
            && value == image_value
        {
            ignored.push(format!("label {key}={value:?}"));
            labels.remove(key);
        }
    }
    let prefix = format!("{}=", crate::roles::ROLE_ENV);
    env.retain(|entry| {
        let from_image = entry.starts_with(&prefix) && image_env.iter().any(|e| e == entry);
        if from_image {
            ignored.push(format!("env {entry:?}"));
        }
        !from_image
    });
    ignored
}

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
    Cri(#[from] crate::cri::CriError),
}

/// Where containers come from.
enum Source {
    /// Docker, or Podman's Docker-compatible service: events.
    Docker(Docker),
    /// A CRI runtime (containerd, CRI-O): polled.
    Cri {
        cri: crate::cri::Cri,
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
    /// A CRI runtime's index, listing its running containers every `poll` ([`crate::cri::POLL`]).
    pub async fn connect_cri(endpoint: &str, poll: Duration) -> Result<Arc<Self>, Error> {
        let err = |source: crate::cri::CriError| Error {
            host: endpoint.to_owned(),
            cause: source.into(),
        };
        let cri = crate::cri::Cri::connect(endpoint);
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
    /// another ([`crate::identity`] confirms it).
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

impl Index {
    /// A CRI runtime has no event stream (containerd 1.6): list the running containers every
    /// `poll` ([`crate::cri::POLL`]); a new one is indexed and announced, one gone is forgotten
    /// and announced. A request from a container not listed yet finds it by [`Index::get`].
    async fn poll(&self, cri: &crate::cri::Cri, poll: Duration) -> Result<(), SourceError> {
        self.resync_quietly(cri).await?;
        self.connected.store(true, Ordering::Relaxed);
        tracing::info!(containers = self.len(), "CRI index synchronised");
        let mut every = tokio::time::interval(poll);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            self.resync_quietly(cri).await?;
        }
    }

    /// One poll: index what is new, forget what is gone, and announce only those.
    async fn resync_quietly(&self, cri: &crate::cri::Cri) -> Result<(), SourceError> {
        let running: std::collections::HashSet<String> = cri.running().await?.into_iter().collect();
        let known: Vec<(String, bool)> = self
            .containers
            .read()
            .expect("index poisoned")
            .iter()
            .map(|(id, c)| (id.clone(), c.running))
            .collect();
        for (id, was_running) in &known {
            if !running.contains(id) {
                let removed = self.containers.write().expect("index poisoned").remove(id);
                if let Some(container) = removed {
                    tracing::debug!(container_id = %id, pod = %container.name, "forgotten");
                    let _ = self.events.send(Event::Destroyed(container));
                }
            } else if !was_running {
                // Indexed by a miss before it ran: look again.
                self.index_or_skip(id).await;
            }
        }
        for id in &running {
            if !known.iter().any(|(k, _)| k == id) {
                self.index_or_skip(id).await;
            }
        }
        // A skipped container that is gone is forgotten: its id is logged again if it comes back.
        self.skipped_logged
            .lock()
            .expect("skipped poisoned")
            .retain(|id| running.contains(id));
        Ok(())
    }

    /// Index one container of a poll; one that cannot be inspected (its status fails, or is
    /// larger than a gRPC message may be) is skipped and counted, and the poll goes on: the
    /// others are indexed. It is tried again at the next poll; logged once.
    async fn index_or_skip(&self, id: &str) {
        let Err(err) = self.index_and_announce(id).await else {
            self.skipped_logged
                .lock()
                .expect("skipped poisoned")
                .remove(id);
            return;
        };
        self.skipped.fetch_add(1, Ordering::Relaxed);
        if self
            .skipped_logged
            .lock()
            .expect("skipped poisoned")
            .insert(id.to_owned())
        {
            tracing::warn!(
                container_id = %id,
                %err,
                "cannot inspect this container; skipped (no role until it can be; tried again \
                 at every poll)"
            );
        }
    }

    async fn index_and_announce(&self, id: &str) -> Result<(), SourceError> {
        if let Some(container) = self.inspect(id).await? {
            let container = Arc::new(container);
            self.containers
                .write()
                .expect("index poisoned")
                .insert(id.to_owned(), container.clone());
            tracing::debug!(container_id = %id, pod = %container.name, "indexed");
            let _ = self.events.send(Event::Started(container));
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

impl crate::identity::Containers for Index {
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
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn role_settings_from_the_image_are_taken_out() {
        let image_labels = labels(&[
            ("iam.amazonaws.com/role", "Admin"),
            ("iam.amazonaws.com/external-id", "img-secret"),
            ("maintainer", "someone"),
        ]);
        let image_env = vec!["IAM_ROLE=Admin".to_owned(), "PATH=/bin".to_owned()];
        // A container that only inherited them.
        let mut l = image_labels.clone();
        let mut e = image_env.clone();
        let ignored = without_image_roles(&mut l, &mut e, &image_labels, &image_env);
        assert_eq!(l, labels(&[("maintainer", "someone")]));
        assert_eq!(e, vec!["PATH=/bin".to_owned()]);
        assert_eq!(ignored.len(), 3, "{ignored:?}");
        // A container whose runner set its own values: kept.
        let mut l = labels(&[
            ("iam.amazonaws.com/role", "Web"),
            ("iam.amazonaws.com/external-id", "mine"),
        ]);
        let mut e = vec!["IAM_ROLE=Worker".to_owned()];
        let ignored = without_image_roles(&mut l, &mut e, &image_labels, &image_env);
        assert!(ignored.is_empty());
        assert_eq!(
            l.get("iam.amazonaws.com/role").map(String::as_str),
            Some("Web")
        );
        assert_eq!(e, vec!["IAM_ROLE=Worker".to_owned()]);
        // An image without role settings takes nothing out.
        let mut l = labels(&[("iam.amazonaws.com/role", "Web")]);
        let mut e = vec!["IAM_ROLE=Web".to_owned()];
        assert!(without_image_roles(&mut l, &mut e, &HashMap::new(), &[]).is_empty());
        assert_eq!(l.len(), 1);
        assert_eq!(e.len(), 1);
    }
}
