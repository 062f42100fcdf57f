//! Looking inside a container's network namespace: its veths' host-side partners.

/// The ports of container `id` (whose first process Docker says is `pid`, in the host's pid
/// namespace, which the proxy must share): the host-side interface indexes of the veths of that
/// process's network namespace, i.e. for each interface there whose link partner is in another
/// namespace, its partner's index (as the host numbers it). Read over rtnetlink from inside that
/// namespace ([`crate::process::in_netns`]); blocking.
pub fn container_ports(
    proc: &crate::process::Proc,
    id: &str,
    pid: u32,
) -> std::io::Result<Vec<u32>> {
    use futures_util::TryStreamExt as _;
    use rtnetlink::packet_route::link::LinkAttribute;
    if !proc.in_container(pid, id) {
        return Err(std::io::Error::other(format!(
            "process {pid} is not in container {id}'s cgroup: the proxy does not see the host's \
             processes (tc mode needs the host's pid namespace: run its container with --pid host)"
        )));
    }
    let netns = std::fs::File::open(proc.netns(pid))?;
    crate::process::in_netns(netns, move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async {
            let (connection, handle, _) = rtnetlink::new_connection()?;
            tokio::spawn(connection);
            let mut links = handle.link().get().execute();
            let mut ports = Vec::new();
            while let Some(link) = links.try_next().await.map_err(std::io::Error::other)? {
                let mut partner = None;
                let mut elsewhere = false;
                for attribute in &link.attributes {
                    match attribute {
                        LinkAttribute::Link(index) => partner = Some(*index),
                        LinkAttribute::LinkNetNsId(_) => elsewhere = true,
                        _ => {}
                    }
                }
                if let (Some(index), true) = (partner, elsewhere) {
                    ports.push(index);
                }
            }
            Ok(ports)
        })
    })
}
