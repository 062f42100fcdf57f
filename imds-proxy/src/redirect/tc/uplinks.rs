//! The host's uplinks as the forward guard needs them: every interface a route to an IMDS
//! address (169.254.169.254, fd00:ec2::254) leaves by, **in any routing table**. Policy routing
//! sends containers' traffic through tables of its own (the VPC CNI gives each ENI one), so the
//! main table's answer alone would leave those paths open. A unicast route whose destination
//! covers the address, default routes included, counts, with each of its next hops; local,
//! blackhole and unreachable routes do not (nothing leaves by them). Routes through nexthop
//! objects (`ip nexthop`) name no interface here and are not followed.
use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use rtnetlink::packet_route::{
    AddressFamily,
    route::{RouteAddress, RouteAttribute, RouteMessage, RouteType},
};

const IMDS_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
const IMDS_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);

/// Whether the prefix `dest/len` (no destination: the default route) holds `addr`.
pub fn covers(dest: Option<IpAddr>, len: u8, addr: IpAddr) -> bool {
    match (dest, addr) {
        (None, _) => len == 0,
        (Some(IpAddr::V4(net)), IpAddr::V4(addr)) if len <= 32 => {
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            u32::from(net) & mask == u32::from(addr) & mask
        }
        (Some(IpAddr::V6(net)), IpAddr::V6(addr)) if len <= 128 => {
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            u128::from(net) & mask == u128::from(addr) & mask
        }
        _ => false,
    }
}

/// The interfaces (by index) route `route` sends IMDS-bound packets out of; none when it does
/// not cover an IMDS address or sends nothing out.
pub fn route_interfaces(route: &RouteMessage) -> Vec<u32> {
    if route.header.kind != RouteType::Unicast {
        return Vec::new();
    }
    let dest = route.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet(v4)) => Some(IpAddr::V4(*v4)),
        RouteAttribute::Destination(RouteAddress::Inet6(v6)) => Some(IpAddr::V6(*v6)),
        _ => None,
    });
    let len = route.header.destination_prefix_length;
    if !covers(dest, len, IMDS_V4.into()) && !covers(dest, len, IMDS_V6.into()) {
        return Vec::new();
    }
    let mut out = Vec::new();
    for attribute in &route.attributes {
        match attribute {
            RouteAttribute::Oif(index) => out.push(*index),
            RouteAttribute::MultiPath(hops) => {
                out.extend(hops.iter().map(|hop| hop.interface_index));
            }
            _ => {}
        }
    }
    out
}

/// Every interface a route to IMDS leaves by, in every table, both families.
pub async fn imds_route_interfaces(
    handle: &rtnetlink::Handle,
) -> Result<BTreeSet<u32>, rtnetlink::Error> {
    use futures_util::TryStreamExt as _;
    let mut found = BTreeSet::new();
    for family in [AddressFamily::Inet, AddressFamily::Inet6] {
        // No table, no destination: a dump of every table (without strict checking, which
        // this socket does not ask for, the kernel filters on the family only).
        let mut query = RouteMessage::default();
        query.header.address_family = family;
        let mut routes = handle.route().get(query).execute();
        while let Some(route) = routes.try_next().await? {
            found.extend(route_interfaces(&route));
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_cover_what_they_hold() {
        let imds: IpAddr = IMDS_V4.into();
        assert!(covers(None, 0, imds));
        assert!(covers(Some("169.254.0.0".parse().unwrap()), 16, imds));
        assert!(covers(Some("169.254.169.254".parse().unwrap()), 32, imds));
        assert!(!covers(Some("169.254.169.253".parse().unwrap()), 32, imds));
        assert!(!covers(Some("172.17.0.0".parse().unwrap()), 16, imds));
        assert!(covers(Some("0.0.0.0".parse().unwrap()), 0, imds));
        let v6: IpAddr = IMDS_V6.into();
        assert!(covers(Some("fd00:ec2::".parse().unwrap()), 32, v6));
        assert!(covers(Some("::".parse().unwrap()), 0, v6));
        assert!(!covers(Some("fd00:ec3::".parse().unwrap()), 32, v6));
        // Families do not mix; nonsense lengths cover nothing.
        assert!(!covers(Some("169.254.0.0".parse().unwrap()), 16, v6));
        assert!(!covers(Some("169.254.0.0".parse().unwrap()), 33, imds));
        assert!(!covers(None, 8, imds));
    }

    #[test]
    fn only_unicast_routes_covering_imds_count_with_every_next_hop() {
        use rtnetlink::packet_route::route::RouteNextHop;
        let route = |kind, dest: Option<(Ipv4Addr, u8)>, attrs: Vec<RouteAttribute>| {
            let mut m = RouteMessage::default();
            m.header.kind = kind;
            if let Some((addr, len)) = dest {
                m.header.destination_prefix_length = len;
                m.attributes
                    .push(RouteAttribute::Destination(RouteAddress::Inet(addr)));
            }
            m.attributes.extend(attrs);
            m
        };
        let default = route(RouteType::Unicast, None, vec![RouteAttribute::Oif(2)]);
        assert_eq!(route_interfaces(&default), [2]);
        let host = route(
            RouteType::Unicast,
            Some((IMDS_V4, 32)),
            vec![RouteAttribute::Oif(7)],
        );
        assert_eq!(route_interfaces(&host), [7]);
        let bridge = route(
            RouteType::Unicast,
            Some((Ipv4Addr::new(172, 17, 0, 0), 16)),
            vec![RouteAttribute::Oif(3)],
        );
        assert!(route_interfaces(&bridge).is_empty());
        let blackhole = route(RouteType::BlackHole, None, vec![RouteAttribute::Oif(2)]);
        assert!(route_interfaces(&blackhole).is_empty());
        let mut a = RouteNextHop::default();
        a.interface_index = 4;
        let mut b = RouteNextHop::default();
        b.interface_index = 5;
        let multipath = route(
            RouteType::Unicast,
            None,
            vec![RouteAttribute::MultiPath(vec![a, b])],
        );
        assert_eq!(route_interfaces(&multipath), [4, 5]);
    }
}
