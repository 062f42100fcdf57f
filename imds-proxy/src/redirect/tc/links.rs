//! Interfaces and their links: what is present, which are bridges, their ports and routed veths, detaching
//! what went away (and the clsact qdisc netlink attach left), name patterns.
use super::*;

/// Detach and forget what `attached` holds for interfaces no longer `present` (by index and
/// name: an index taken by another interface counts as gone); their names.
pub(super) fn detach_gone(
    ebpf: &mut Ebpf,
    attached: &mut BTreeMap<u32, Interface>,
    present: &BTreeMap<u32, String>,
) -> Vec<(u32, String)> {
    let gone: Vec<u32> = attached
        .iter()
        .filter(|(index, i)| present.get(index) != Some(&i.name))
        .map(|(index, _)| *index)
        .collect();
    gone.into_iter()
        .filter_map(|index| Some((index, attached.remove(&index)?)))
        .map(|(index, interface)| {
            let name = interface.name.clone();
            detach_interface(ebpf, interface, true);
            (index, name)
        })
        .collect()
}

/// Detach one interface's links. `remove_pins`: the interface is gone, so are its pins' reasons.
pub(super) fn detach_interface(ebpf: &mut Ebpf, interface: Interface, remove_pins: bool) {
    for link in interface.links {
        match link {
            Link::Owned { program: name, id } => {
                if let Ok(prog) = program::<SchedClassifier>(ebpf, name)
                    && let Err(err) = prog.detach(id)
                {
                    // The interface may be gone already, taking its attachments with it.
                    tracing::debug!(interface = %interface.name, program = name, %err, "detach");
                }
            }
            Link::Pinned { path, .. } if remove_pins => {
                let _ = std::fs::remove_file(&path);
            }
            Link::Pinned { .. } => {}
        }
    }
    if interface.created_clsact
        && let Err(err) = remove_clsact(&interface.name)
    {
        tracing::warn!(interface = %interface.name, %err, "removing the clsact qdisc we added");
    }
}

/// Remove the clsact qdisc of an interface (netlink mode, when this process added it).
pub(super) fn remove_clsact(name: &str) -> std::io::Result<()> {
    let Ok(index) = std::fs::read_to_string(format!("/sys/class/net/{name}/ifindex")) else {
        return Ok(()); // gone, and its qdiscs with it
    };
    let index: i32 = index.trim().parse().map_err(std::io::Error::other)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::scope(|s| {
        s.spawn(|| {
            runtime.block_on(async {
                let (connection, handle, _) = rtnetlink::new_connection()?;
                tokio::spawn(connection);
                let mut request = handle.qdisc().del(index);
                let header = &mut request.message_mut().header;
                header.parent = rtnetlink::packet_route::tc::TcHandle::CLSACT;
                header.handle = rtnetlink::packet_route::tc::TcHandle::from(0xffff_0000);
                request.execute().await.map_err(std::io::Error::other)
            })
        })
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("qdisc removal panicked")))
    })
}

/// What an interface that a `--container-iface` pattern names is to tc mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Shape {
    /// A bridge: the redirect on it, the guards on its ports.
    Bridge,
    /// A port of a bridge: its bridge decides (guarded when the bridge is named).
    BridgePort,
    /// The loopback: no container sends from behind it; never attached.
    Loopback,
    /// Anything else: a container's own routed veth (EKS's VPC CNI `eni*`, Calico `cali*`, CNI
    /// `ptp`'s `veth*`), with host routes and no bridge. Guards and redirect on it.
    Routed,
}

/// [`Shape`] of interface `name`, from sysfs.
pub(super) fn shape(name: &str) -> Shape {
    /// `IFF_LOOPBACK` in `/sys/class/net/<name>/flags`.
    const IFF_LOOPBACK: u32 = 0x8;
    if is_bridge_named(name) {
        return Shape::Bridge;
    }
    if master(name).is_some_and(|m| is_bridge_named(&m)) {
        return Shape::BridgePort;
    }
    let flags = std::fs::read_to_string(format!("/sys/class/net/{name}/flags"))
        .ok()
        .and_then(|f| u32::from_str_radix(f.trim().trim_start_matches("0x"), 16).ok())
        .unwrap_or(0);
    if flags & IFF_LOOPBACK != 0 {
        return Shape::Loopback;
    }
    Shape::Routed
}

/// Whether interface `name` is a bridge (`/sys/class/net/<name>/bridge/`).
pub(super) fn is_bridge_named(name: &str) -> bool {
    std::path::Path::new(&format!("/sys/class/net/{name}/bridge")).is_dir()
}

/// Whether `name` is a bridge with at least one port (`/sys/class/net/<name>/brif/`).
pub(super) fn has_ports(name: &str) -> bool {
    std::fs::read_dir(format!("/sys/class/net/{name}/brif"))
        .is_ok_and(|mut ports| ports.next().is_some())
}

/// The bridge an interface is a port of, if any (`/sys/class/net/<name>/master`).
pub(super) fn master(name: &str) -> Option<String> {
    let link = std::fs::read_link(format!("/sys/class/net/{name}/master")).ok()?;
    Some(link.file_name()?.to_string_lossy().into_owned())
}

/// Interfaces present now: index → name.
pub(super) fn present_interfaces() -> BTreeMap<u32, String> {
    let mut found = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir("/sys/class/net") else {
        return found;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Ok(index) = std::fs::read_to_string(entry.path().join("ifindex"))
            && let Ok(index) = index.trim().parse()
        {
            found.insert(index, name);
        }
    }
    found
}

/// Shell-style match of an interface name: `*` any run, `?` any one character.
pub fn matches(pattern: &str, name: &str) -> bool {
    crate::roles::wildcard_match(pattern.as_bytes(), name.as_bytes())
}
