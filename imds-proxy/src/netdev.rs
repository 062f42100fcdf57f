//! The proxy's dedicated listen addresses, on a dummy interface imds-proxy creates and removes.
//! Only redirected traffic uses them: a connection that arrives without a kernel record is refused.
use std::{net::IpAddr, process::Command};

#[derive(Debug, thiserror::Error)]
#[error("{command}: {reason}")]
pub struct Error {
    command: String,
    reason: String,
}

/// Default name of the dummy interface.
pub const DEFAULT_INTERFACE: &str = "imds-proxy0";

fn ip(args: &[&str]) -> Result<String, Error> {
    let command = format!("ip {}", args.join(" "));
    let out = Command::new("ip").args(args).output().map_err(|e| Error {
        command: command.clone(),
        reason: format!("cannot run iproute2's ip: {e}"),
    })?;
    if !out.status.success() {
        return Err(Error {
            command,
            reason: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn exists(interface: &str) -> bool {
    std::path::Path::new("/sys/class/net")
        .join(interface)
        .exists()
}

/// Create the dummy interface (or reuse the one a previous run left) with these addresses.
///
/// On a kernel built without the dummy driver, an `ifb` device stands in: like a dummy it has no
/// link partner and no ARP, and addresses on it are local addresses of the host.
pub fn ensure(interface: &str, addresses: &[IpAddr]) -> Result<(), Error> {
    if !exists(interface)
        && let Err(dummy) = ip(&["link", "add", interface, "type", "dummy"])
    {
        ip(&["link", "add", interface, "type", "ifb"]).map_err(|ifb| Error {
            command: format!("creating interface {interface}"),
            reason: format!(
                "no dummy ({}) and no ifb ({}) link type",
                dummy.reason, ifb.reason
            ),
        })?;
        tracing::info!(
            interface,
            "this kernel has no dummy link type; using an ifb device for the listen addresses"
        );
    }
    for addr in addresses {
        let prefix = match addr {
            IpAddr::V4(a) => format!("{a}/32"),
            IpAddr::V6(a) => format!("{a}/128"),
        };
        // `replace` is idempotent; nodad makes an IPv6 address usable at once.
        let mut args = vec!["addr", "replace", &prefix, "dev", interface];
        if addr.is_ipv6() {
            args.push("nodad");
        }
        ip(&args)?;
    }
    ip(&["link", "set", interface, "up"])?;
    Ok(())
}

/// Remove the dummy interface, if present.
pub fn remove(interface: &str) -> Result<bool, Error> {
    if !exists(interface) {
        return Ok(false);
    }
    ip(&["link", "del", interface])?;
    Ok(true)
}
