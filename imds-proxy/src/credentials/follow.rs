//! The cache following the container engine: sessions fetched ahead for containers created or
//! started with a role, and forgotten with them.
use super::*;

impl Cache {
    /// Until the events end: fetch ahead the session of every container that is created or
    /// starts with a role (under the same key the handler uses), forget destroyed containers'
    /// sessions. Fetching at create gives the STS call a head start over the container's first
    /// request (the time Docker takes to set up its network and start it); at start it is
    /// single-flight with any call already under way. The proxy's
    /// own container (when it runs as one) is never asked for. `told_apart`: whether callers are
    /// known by their cgroup (cgroup mode), so that a pod's containers may have roles of their own.
    pub async fn follow_containers(
        self: Arc<Self>,
        policy: crate::roles::Policy,
        mut events: tokio::sync::broadcast::Receiver<crate::runtime::Event>,
        own_container: Option<String>,
        told_apart: bool,
    ) {
        use crate::runtime::{Event, next_event};
        while let Some(event) = next_event(&mut events, "roles").await {
            match event {
                Event::Created(container) | Event::Started(container)
                    if Some(&container.id) == own_container.as_ref() => {}
                Event::Created(container) | Event::Started(container) => {
                    match policy.resolve_for(container.subject(told_apart)) {
                        Ok(Some(role)) => self.prefetch(self.key(&container, &role)),
                        Ok(None) => {}
                        Err(err) => tracing::warn!(
                            container_id = %container.id,
                            container = %container.name,
                            %err,
                            "role refused; no STS call made"
                        ),
                    }
                }
                Event::Destroyed(container) => self.forget_session(&crate::roles::session_name(
                    Some(&container.name),
                    &container.id,
                )),
            }
        }
    }
}
