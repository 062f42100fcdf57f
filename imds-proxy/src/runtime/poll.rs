//! A CRI runtime's containers, polled: containerd 1.6 has no CRI event stream.
use super::*;

impl Index {
    /// A CRI runtime has no event stream (containerd 1.6): list the running containers every
    /// `poll` ([`crate::runtime::cri::POLL`]); a new one is indexed and announced, one gone is forgotten
    /// and announced. A request from a container not listed yet finds it by [`Index::get`].
    pub(super) async fn poll(
        &self,
        cri: &crate::runtime::cri::Cri,
        poll: Duration,
    ) -> Result<(), SourceError> {
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
    async fn resync_quietly(&self, cri: &crate::runtime::cri::Cri) -> Result<(), SourceError> {
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
