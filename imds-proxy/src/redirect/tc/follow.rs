//! What tc mode follows while it runs: interfaces and routes as they come and go (attaching to
//! container interfaces and uplinks), addresses the kernel announces behind container ports,
//! and the engine's containers (the source book).
use super::*;

impl TcRedirect {
    /// Follow interfaces as they come and go (rtnetlink link events) until the task is dropped.
    /// A subscription that ends (its socket overflowed under a burst of link events, or closed)
    /// is made again, and every interface looked at again, after a short back-off.
    pub async fn follow_interfaces(&self) {
        let mut backoff = std::time::Duration::from_millis(100);
        loop {
            let started = std::time::Instant::now();
            match self.watch_interfaces().await {
                Ok(()) => tracing::warn!(
                    retry_in = ?backoff,
                    "interface watch ended (its netlink socket overflowed or closed); watching \
                     again and looking at every interface"
                ),
                Err(err) => tracing::error!(
                    %err,
                    retry_in = ?backoff,
                    "cannot watch interfaces; new container interfaces are attached once the \
                     watch is back"
                ),
            }
            tokio::time::sleep(backoff).await;
            backoff = if started.elapsed() > std::time::Duration::from_secs(60) {
                std::time::Duration::from_millis(100)
            } else {
                (backoff * 2).min(std::time::Duration::from_secs(5))
            };
        }
    }

    /// One subscription to link and route events: look at every interface and every route to
    /// IMDS once subscribed (anything may have happened before), then again at each event, until
    /// the subscription ends.
    async fn watch_interfaces(&self) -> std::io::Result<()> {
        use futures_util::StreamExt as _;
        use rtnetlink::{
            constants::{RTMGRP_IPV4_ROUTE, RTMGRP_IPV6_ROUTE, RTMGRP_LINK},
            packet_core::NetlinkPayload,
            packet_route::RouteNetlinkMessage,
            sys::{AsyncSocket as _, SocketAddr},
        };
        let (mut connection, handle, mut messages) = rtnetlink::new_connection()?;
        let groups = SocketAddr::new(0, RTMGRP_LINK | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE);
        connection.socket_mut().socket_mut().bind(&groups)?;
        let connection = tokio::spawn(connection);
        self.reconcile();
        self.follow_routes(&handle).await?;
        while let Some((message, _)) = messages.next().await {
            match message.payload {
                NetlinkPayload::InnerMessage(
                    RouteNetlinkMessage::NewRoute(_) | RouteNetlinkMessage::DelRoute(_),
                ) => self.follow_routes(&handle).await?,
                // Link added, removed, renamed: look again (cheap: one sysfs listing).
                _ => {
                    self.reconcile();
                }
            }
        }
        connection.abort();
        Ok(())
    }

    /// The forward guard onto the interfaces routes to IMDS leave by now.
    async fn follow_routes(&self, handle: &rtnetlink::Handle) -> std::io::Result<()> {
        let wanted = uplinks::imds_route_interfaces(handle)
            .await
            .map_err(std::io::Error::other)?;
        self.set_uplinks(&wanted);
        Ok(())
    }

    /// Vouch for addresses as the kernel announces them behind container ports (provisional
    /// sources, [`sources`]) until the task is dropped. The announcements are read on a
    /// thread of their own.
    pub async fn follow_peer_addresses(self: std::sync::Arc<Self>) {
        use peer_addresses::{Event, host_side, watch};
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        std::thread::spawn(move || {
            if let Err(err) = watch(|event| tx.send(event).is_ok()) {
                tracing::error!(%err, "cannot hear containers' addresses as they are configured; a container's first connection to IMDS waits for Docker's report and a TCP retransmission");
            }
        });
        let handle = match rtnetlink::new_connection() {
            Ok((connection, handle, _)) => {
                tokio::spawn(connection);
                handle
            }
            Err(err) => {
                tracing::error!(%err, "cannot read interfaces; containers' addresses are vouched for when Docker reports them");
                return;
            }
        };
        while let Some(event) = rx.recv().await {
            let address = match event {
                Event::Address(address) => address,
                Event::Lost => {
                    tracing::warn!(
                        "address announcements lost (socket buffer full); those containers' addresses are vouched for when Docker reports them"
                    );
                    continue;
                }
            };
            let port = match host_side(&handle, address.nsid, address.ifindex).await {
                Ok(Some((port, master))) if self.guards(port, master) => port,
                Ok(_) => continue, // not behind a container interface we guard
                Err(err) => {
                    tracing::warn!(%err, ?address, "cannot find the host side of an announced address");
                    continue;
                }
            };
            if let Err(err) = self.observe_source(port, address.addr, address.added) {
                tracing::error!(port, %err, "recording a provisional source address failed");
            }
        }
    }

    /// Keep, for each container Docker reports, the addresses its own ports may send to IMDS
    /// from (its ports read from its network namespace, through `proc`), until the events end.
    pub async fn follow_sources(
        self: std::sync::Arc<Self>,
        mut events: tokio::sync::broadcast::Receiver<crate::runtime::Event>,
        proc: crate::process::Proc,
    ) {
        use crate::runtime::{Event, next_event};
        while let Some(event) = next_event(&mut events, "source addresses").await {
            let container = match event {
                Event::Started(container) if container.running && container.pid != 0 => container,
                Event::Started(_) | Event::Created(_) => continue,
                Event::Destroyed(container) => {
                    self.forget_sources(&container.id);
                    continue;
                }
            };
            let (id, pid, proc) = (container.id.clone(), container.pid, proc.clone());
            let ports = tokio::task::spawn_blocking(move || container_ports(&proc, &id, pid))
                .await
                .map_err(std::io::Error::other)
                .and_then(|ports| ports);
            let ports = match ports {
                Ok(ports) => ports,
                Err(err) => {
                    tracing::error!(container_id = %container.id, %err, "cannot read the container's interfaces; its IMDS traffic stays dropped");
                    continue;
                }
            };
            match self.set_sources(&container.id, &ports, &container.addresses) {
                Ok(()) => tracing::debug!(
                    container_id = %container.id,
                    ?ports,
                    addresses = ?container.addresses,
                    "container's source addresses vouched for on its ports"
                ),
                Err(err) => {
                    tracing::error!(container_id = %container.id, %err, "recording source addresses failed; its IMDS traffic stays dropped")
                }
            }
        }
    }
}
