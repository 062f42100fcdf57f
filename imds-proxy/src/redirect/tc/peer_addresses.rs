//! Addresses configured in other network namespaces, as the kernel announces them: an rtnetlink
//! socket with `NETLINK_LISTEN_ALL_NSID` hears `RTM_NEWADDR`/`RTM_DELADDR` from every namespace
//! that has an id in the proxy's (a container's does, once its veth's partner is in the host),
//! each tagged with that id. tc mode uses it to vouch for a container's address on its port the
//! moment Docker configures it, before the container's first process runs
//! ([`super::sources`]).
use std::{io, net::IpAddr, os::fd::AsRawFd as _};

use rtnetlink::{
    packet_core::{NetlinkMessage, NetlinkPayload},
    packet_route::{
        RouteNetlinkMessage,
        address::{AddressAttribute, AddressMessage},
    },
    sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE},
};

const RTNLGRP_IPV4_IFADDR: u32 = 5;
const RTNLGRP_IPV6_IFADDR: u32 = 9;

/// An address added to or removed from interface `ifindex` of the namespace the proxy knows as
/// `nsid`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerAddress {
    pub nsid: i32,
    pub ifindex: u32,
    pub addr: IpAddr,
    pub added: bool,
}

/// What [`watch`] reports.
#[derive(Debug)]
pub enum Event {
    Address(PeerAddress),
    /// The socket's buffer overflowed: announcements were lost.
    Lost,
}

/// Subscribe; then hand every announcement from another namespace to `each` until it returns
/// `false` or the socket fails. Blocking: run it on a thread of its own.
pub fn watch(mut each: impl FnMut(Event) -> bool) -> io::Result<()> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind(&SocketAddr::new(0, 0))?;
    socket.add_membership(RTNLGRP_IPV4_IFADDR)?;
    socket.add_membership(RTNLGRP_IPV6_IFADDR)?;
    socket.set_listen_all_namespaces(true)?;
    let fd = socket.as_raw_fd();
    let mut buf = vec![0u8; 64 * 1024];
    // u64s: cmsg headers need their alignment.
    let mut control = [0u64; 16];
    loop {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: all-zero is a valid msghdr; the pointers set below outlive the call.
        let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
        header.msg_iov = &mut iov;
        header.msg_iovlen = 1;
        header.msg_control = control.as_mut_ptr().cast();
        // (usize on glibc, u32 on musl)
        header.msg_controllen = std::mem::size_of_val(&control) as _;
        // SAFETY: fd is open for the socket's lifetime; header points at live buffers.
        let n = unsafe { libc::recvmsg(fd, &mut header, 0) };
        if n < 0 {
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::ENOBUFS) => {
                    if !each(Event::Lost) {
                        return Ok(());
                    }
                    continue;
                }
                _ => return Err(err),
            }
        }
        // No namespace id: an announcement from the proxy's own namespace.
        let Some(nsid) = namespace_id(&header) else {
            continue;
        };
        for message in messages(&buf[..n as usize]) {
            if let Some(address) = peer_address(nsid, message)
                && !each(Event::Address(address))
            {
                return Ok(());
            }
        }
    }
}

/// The `NETLINK_LISTEN_ALL_NSID` control message's namespace id.
fn namespace_id(header: &libc::msghdr) -> Option<i32> {
    // SAFETY: header was filled by recvmsg; the CMSG macros stay within msg_controllen.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(header);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_NETLINK
                && (*cmsg).cmsg_type == libc::NETLINK_LISTEN_ALL_NSID
            {
                return Some(std::ptr::read_unaligned(
                    libc::CMSG_DATA(cmsg).cast::<i32>(),
                ));
            }
            cmsg = libc::CMSG_NXTHDR(header, cmsg);
        }
    }
    None
}

/// The netlink messages in one datagram; what does not parse ends the walk.
fn messages(mut bytes: &[u8]) -> Vec<RouteNetlinkMessage> {
    let mut found = Vec::new();
    while bytes.len() >= 16 {
        let length = u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
        if length < 16 || length > bytes.len() {
            break;
        }
        if let Ok(message) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&bytes[..length])
            && let NetlinkPayload::InnerMessage(inner) = message.payload
        {
            found.push(inner);
        }
        bytes = &bytes[length.next_multiple_of(4).min(bytes.len())..];
    }
    found
}

fn peer_address(nsid: i32, message: RouteNetlinkMessage) -> Option<PeerAddress> {
    let (message, added) = match message {
        RouteNetlinkMessage::NewAddress(m) => (m, true),
        RouteNetlinkMessage::DelAddress(m) => (m, false),
        _ => return None,
    };
    Some(PeerAddress {
        nsid,
        ifindex: message.header.index,
        addr: local_address(&message)?,
        added,
    })
}

/// IPv4's local address is `IFA_LOCAL` (`IFA_ADDRESS` is the peer's on point-to-point links);
/// IPv6 has `IFA_ADDRESS` only.
fn local_address(message: &AddressMessage) -> Option<IpAddr> {
    let mut address = None;
    for attribute in &message.attributes {
        match attribute {
            AddressAttribute::Local(addr) => return Some(*addr),
            AddressAttribute::Address(addr) => address = Some(*addr),
            _ => {}
        }
    }
    address
}

/// The host-side interface (index) whose veth partner is interface `ifindex` of namespace `nsid`,
/// with the index of the bridge it is a port of, if any.
pub async fn host_side(
    handle: &rtnetlink::Handle,
    nsid: i32,
    ifindex: u32,
) -> io::Result<Option<(u32, Option<u32>)>> {
    use futures_util::TryStreamExt as _;
    use rtnetlink::packet_route::link::LinkAttribute;
    let mut links = handle.link().get().execute();
    while let Some(link) = links.try_next().await.map_err(io::Error::other)? {
        let (mut partner, mut netns, mut master) = (None, None, None);
        for attribute in &link.attributes {
            match attribute {
                LinkAttribute::Link(index) => partner = Some(*index),
                LinkAttribute::LinkNetNsId(id) => netns = Some(*id),
                LinkAttribute::Controller(index) => master = Some(*index),
                _ => {}
            }
        }
        if partner == Some(ifindex) && netns == Some(nsid) {
            return Ok(Some((link.header.index, master)));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An `RTM_NEWADDR` for 172.17.0.2/16 on interface 11, as the kernel sends it.
    const NEWADDR: [u8; 60] = [
        60, 0, 0, 0, 20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, // nlmsghdr: len 60, RTM_NEWADDR
        2, 16, 128, 0, 11, 0, 0, 0, // ifaddrmsg: AF_INET, /16, permanent, scope 0, index 11
        8, 0, 1, 0, 172, 17, 0, 2, // IFA_ADDRESS
        8, 0, 2, 0, 172, 17, 0, 2, // IFA_LOCAL
        8, 0, 4, 0, 172, 17, 255, 255, // IFA_BROADCAST
        9, 0, 3, 0, b'e', b't', b'h', b'0', 0, 0, 0, 0, // IFA_LABEL "eth0", padded
    ];

    #[test]
    fn an_announcement_gives_its_interface_and_local_address() {
        let parsed = messages(&NEWADDR);
        assert_eq!(parsed.len(), 1, "{parsed:?}");
        let address = peer_address(3, parsed.into_iter().next().unwrap()).unwrap();
        assert_eq!(
            address,
            PeerAddress {
                nsid: 3,
                ifindex: 11,
                addr: "172.17.0.2".parse().unwrap(),
                added: true
            }
        );
    }

    #[test]
    fn a_truncated_datagram_yields_nothing() {
        assert!(messages(&NEWADDR[..30]).is_empty());
        assert!(messages(&[]).is_empty());
    }
}
