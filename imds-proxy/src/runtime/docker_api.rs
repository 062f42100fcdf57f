//! The Docker API as a [`Source`]: Docker itself, or Podman's Docker-compatible service (`podman
//! system service`), told apart by the components its version names. Changes come from the
//! engine's event stream; a container's cgroup is where its engine and cgroup driver put it
//! ([`Kind::cgroup_of`]); role settings its image carries are taken out unless the operator
//! trusts images ([`super::image_roles`]).
use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use bollard::{
    Docker,
    query_parameters::{EventsOptions, InspectContainerOptions, ListContainersOptions},
};
use futures_util::{FutureExt as _, StreamExt as _, future::BoxFuture, stream::BoxStream};

use super::{
    Container, Kind,
    image_roles::{ImageConfig, ROLE_LABELS, without_image_roles},
    source::{Change, Description, Source, SourceError},
};

/// Image configurations kept before the cache starts over.
const IMAGE_CACHE_LIMIT: usize = 4096;

/// How far back the event stream starts: it is opened after the list it follows, and what
/// happened in between is replayed from here (applying an event twice is harmless).
const EVENTS_OVERLAP: Duration = Duration::from_secs(2);

/// A Docker-API engine's containers.
pub struct DockerApi {
    docker: Docker,
    /// `--trust-image-role`: role settings an image carries count as the container's own.
    trust_image_role: bool,
    /// Images' own labels and environment, by image id (immutable for an id).
    images: RwLock<HashMap<String, Arc<ImageConfig>>>,
    /// What the engine is, asked once: a container's cgroup depends on it.
    described: tokio::sync::OnceCell<Description>,
}

impl DockerApi {
    /// Connect to the engine at `host` (`unix:///var/run/docker.sock`) and agree on an API
    /// version. With `trust_image_role`, role settings from a container's image count as its own.
    pub async fn connect(host: &str, trust_image_role: bool) -> Result<Self, SourceError> {
        let path = host.trim_start_matches("unix://");
        let docker = Docker::connect_with_unix(path, 10, bollard::API_DEFAULT_VERSION)?
            .negotiate_version()
            .await?;
        Ok(Self {
            docker,
            trust_image_role,
            images: RwLock::new(HashMap::new()),
            described: tokio::sync::OnceCell::new(),
        })
    }

    async fn described(&self) -> Result<&Description, SourceError> {
        self.described
            .get_or_try_init(|| async {
                let info = self.docker.info().await?;
                let version = self.docker.version().await?;
                // Podman's service names itself among the version's components.
                let podman = version
                    .components
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.name.to_ascii_lowercase().contains("podman"));
                let kind = if podman { Kind::Podman } else { Kind::Docker };
                Ok::<_, SourceError>(Description {
                    kind,
                    name: kind.name().to_owned(),
                    version: version.version.unwrap_or_default(),
                    cgroup_driver: info
                        .cgroup_driver
                        .map(|d| d.to_string())
                        .unwrap_or_default(),
                })
            })
            .await
    }

    async fn inspect_now(&self, id: &str) -> Result<Option<Container>, SourceError> {
        let info = match self
            .docker
            .inspect_container(id, None::<InspectContainerOptions>)
            .await
        {
            Ok(info) => info,
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => return Ok(None),
            Err(err) => return Err(err.into()),
        };
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
            // Fail closed: without the image's configuration, a role setting might be the
            // image's; the inspect fails and is retried.
            let image = self
                .image_config(info.image.as_deref().unwrap_or_default())
                .await?;
            let ignored = without_image_roles(&mut labels, &mut env, &image.labels, &image.env);
            if !ignored.is_empty() {
                tracing::warn!(
                    container_id = %id,
                    container = %name,
                    ignored = ?ignored,
                    "role settings that come from the container's image are ignored (an image \
                     does not choose its own role; set them on the container, or run the proxy \
                     with --trust-image-role)"
                );
            }
        }
        let cgroup_parent = info
            .host_config
            .and_then(|h| h.cgroup_parent)
            .unwrap_or_default();
        let described = self.described().await?;
        let cgroup = described
            .kind
            .cgroup_of(&described.cgroup_driver, &cgroup_parent, &id);
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
            image: info.image.unwrap_or_default(),
            session_tags: Default::default(),
        }))
    }

    /// An image's own labels and environment, by its id; cached (an id's configuration never
    /// changes).
    async fn image_config(&self, image: &str) -> Result<Arc<ImageConfig>, bollard::errors::Error> {
        if let Some(found) = self.images.read().expect("images poisoned").get(image) {
            return Ok(found.clone());
        }
        let config = self
            .docker
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

    /// Running containers with `ip` first, then the "created" ones with no address yet. A
    /// container's first process can connect before the engine has finished starting it: the
    /// list then still says "created", with no address, and its inspect answers once the start
    /// is done (the engine holds the container while starting it). Either way it is the inspect
    /// that decides: running, with this address, now.
    async fn candidates_now(&self, ip: IpAddr) -> Result<Vec<String>, SourceError> {
        let options = ListContainersOptions {
            all: true,
            filters: Some(HashMap::from([(
                "status".to_owned(),
                vec!["running".to_owned(), "created".to_owned()],
            )])),
            ..Default::default()
        };
        let mut holding = Vec::new();
        let mut starting = Vec::new();
        for summary in self.docker.list_containers(Some(options)).await? {
            let Some(id) = summary.id else { continue };
            let held = addresses(summary.network_settings.and_then(|n| n.networks));
            if held.contains(&ip) {
                holding.push(id);
            } else if held.is_empty() {
                starting.push(id);
            }
        }
        holding.extend(starting);
        Ok(holding)
    }
}

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

/// An engine event as a change; `None` for what changes nothing ("die": a stopped container
/// makes no requests, and stays indexed until destroyed, as it may be started again).
fn change(event: bollard::models::EventMessage) -> Option<Change> {
    let actor = event.actor?;
    let id = actor.id?;
    match event.action.as_deref()? {
        "start" | "rename" | "update" => Some(Change::Started(id)),
        "create" => Some(Change::Created(id)),
        // Podman says "remove" where Docker says "destroy".
        "destroy" | "remove" => Some(Change::Destroyed {
            name: actor
                .attributes
                .and_then(|a| a.get("name").cloned())
                .unwrap_or_default(),
            id,
        }),
        _ => None,
    }
}

impl Source for DockerApi {
    fn describe(&self) -> BoxFuture<'_, Result<Description, SourceError>> {
        async move { self.described().await.cloned() }.boxed()
    }

    fn ping(&self) -> BoxFuture<'_, bool> {
        async move { self.docker.ping().await.is_ok() }.boxed()
    }

    fn inspect<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<Container>, SourceError>> {
        self.inspect_now(id).boxed()
    }

    fn candidates(&self, ip: IpAddr) -> BoxFuture<'_, Result<Vec<String>, SourceError>> {
        self.candidates_now(ip).boxed()
    }

    /// The running containers, then the events from a little before the list on.
    fn changes(&self) -> BoxStream<'static, Result<Change, SourceError>> {
        let since = SystemTime::now()
            .checked_sub(EVENTS_OVERLAP)
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map(|t| t.as_secs().to_string());
        let filters = HashMap::from([
            ("type".to_owned(), vec!["container".to_owned()]),
            (
                "event".to_owned(),
                [
                    "create", "start", "die", "destroy", "remove", "rename", "update",
                ]
                .map(str::to_owned)
                .to_vec(),
            ),
        ]);
        let docker = self.docker.clone();
        let list = async move {
            let ids = docker
                .list_containers(None::<ListContainersOptions>)
                .await?
                .into_iter()
                .filter_map(|summary| summary.id)
                .collect();
            Ok(Change::Running {
                ids,
                all_again: true,
            })
        };
        let events = self
            .docker
            .events(Some(EventsOptions {
                since,
                filters: Some(filters),
                ..Default::default()
            }))
            .filter_map(|event| async move {
                match event {
                    Ok(event) => change(event).map(Ok),
                    Err(err) => Some(Err(err.into())),
                }
            });
        futures_util::stream::once(list).chain(events).boxed()
    }
}
