//! The proxy's dedicated listen addresses, on a dummy interface imds-proxy creates and removes,
//! over rtnetlink (no `ip` binary needed: the proxy runs from a scratch image too). Only redirected
//! traffic uses these addresses: a connection that arrives without a kernel record is refused.
use std::net::IpAddr;

use futures_util::TryStreamExt as _;
use rtnetlink::{Handle, LinkDummy, LinkIfb, LinkUnspec};

#[derive(Debug, thiserror::Error)]
#[error("interface {interface}: {what}: {reason}")]
pub struct Error {
    interface: String,
    what: &'static str,
    reason: String,
}

/// Default name of the dummy interface.
pub const DEFAULT_INTERFACE: &str = "imds-proxy0";

/// Whether the interface exists (from sysfs, no netlink needed).
pub fn exists(interface: &str) -> bool {
    std::path::Path::new("/sys/class/net")
        .join(interface)
        .exists()
}

fn connect(interface: &str) -> Result<Handle, Error> {
    let (connection, handle, _) = rtnetlink::new_connection().map_err(|e| Error {
        interface: interface.to_owned(),
        what: "opening a netlink socket",
        reason: e.to_string(),
    })?;
    tokio::spawn(connection);
    Ok(handle)
}

async fn index(handle: &Handle, interface: &str) -> Result<Option<u32>, Error> {
    match handle
        .link()
        .get()
        .match_name(interface.to_owned())
        .execute()
        .try_next()
        .await
    {
        Ok(link) => Ok(link.map(|l| l.header.index)),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(e) => Err(Error {
            interface: interface.to_owned(),
            what: "looking it up",
            reason: e.to_string(),
        }),
    }
}

/// Whether an interface this process creates can carry an IPv6 address: the kernel has IPv6,
/// and neither `all` nor `default` of `net.ipv6.conf.*.disable_ipv6` (in this network namespace)
/// says no.
pub fn ipv6_enabled() -> bool {
    let disabled = |which: &str| {
        std::fs::read_to_string(format!("/proc/sys/net/ipv6/conf/{which}/disable_ipv6"))
            .map(|v| v.trim() != "0")
            // No such file: no IPv6 in this kernel.
            .unwrap_or(true)
    };
    !disabled("all") && !disabled("default")
}

/// Create the dummy interface (or reuse the one a previous run left) with these addresses, up.
///
/// On a kernel built without the dummy driver, an `ifb` device stands in: like a dummy it has no
/// link partner and no ARP, and addresses on it are local addresses of the host.
pub async fn ensure(interface: &str, addresses: &[IpAddr]) -> Result<(), Error> {
    let err = |what: &'static str| {
        move |e: rtnetlink::Error| Error {
            interface: interface.to_owned(),
            what,
            reason: e.to_string(),
        }
    };
    let handle = connect(interface)?;
    if index(&handle, interface).await?.is_none()
        && let Err(dummy) = handle
            .link()
            .add(LinkDummy::new(interface).build())
            .execute()
            .await
    {
        handle
            .link()
            .add(LinkIfb::new(interface).build())
            .execute()
            .await
            .map_err(|ifb| Error {
                interface: interface.to_owned(),
                what: "creating it",
                reason: format!("no dummy ({dummy}) and no ifb ({ifb}) link type"),
            })?;
        tracing::info!(
            interface,
            "this kernel has no dummy link type; using an ifb device for the listen addresses"
        );
    }
    let index = index(&handle, interface).await?.ok_or_else(|| Error {
        interface: interface.to_owned(),
        what: "looking it up",
        reason: "created, then not found".into(),
    })?;
    for addr in addresses {
        let prefix = if addr.is_ipv4() { 32 } else { 128 };
        // `replace` is idempotent (a restart finds its addresses in place).
        let mut request = handle.address().add(index, *addr, prefix).replace();
        if addr.is_ipv6() {
            // IFA_F_NODAD: usable at once, no duplicate address detection on a dummy.
            request.message_mut().attributes.push(
                rtnetlink::packet_route::address::AddressAttribute::Flags(
                    rtnetlink::packet_route::address::AddressFlags::Nodad,
                ),
            );
        }
        request.execute().await.map_err(err("adding an address"))?;
    }
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(err("setting it up"))?;
    Ok(())
}

/// Remove the interface, if present. Whether there was one.
pub async fn remove(interface: &str) -> Result<bool, Error> {
    let handle = connect(interface)?;
    let Some(index) = index(&handle, interface).await? else {
        return Ok(false);
    };
    handle
        .link()
        .del(index)
        .execute()
        .await
        .map_err(|e| Error {
            interface: interface.to_owned(),
            what: "removing it",
            reason: e.to_string(),
        })?;
    Ok(true)
}
