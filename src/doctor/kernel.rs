//! Reads links, addresses, main-table routes, permanent neighbours (IPv4 and IPv6) and FDB
//! entries through rtnetlink, as the backends do (never by running `ip`).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};

use anyhow::{Context, Result};
use futures::TryStreamExt;
use ipnet::{IpNet, Ipv4Net};
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use rtnetlink::packet_route::neighbour::NeighbourMessage;
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteScope, RouteType,
};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, RouteMessageBuilder};
use weft_backends::mac::Mac;
use weft_backends::nexthop::{self, Nexthop};
use weft_backends::route_table;

use super::facts::{Fdb, Kernel, Link, Neighbour, Route};

/// The kernel's state in this network namespace (offload and driver are filled in later).
pub async fn read() -> Result<Kernel> {
    let (conn, handle, _) = rtnetlink::new_connection().context("open netlink socket")?;
    let task = tokio::spawn(conn);
    let kernel = read_with(&handle).await;
    task.abort();
    kernel
}

async fn read_with(handle: &Handle) -> Result<Kernel> {
    let msgs: Vec<LinkMessage> = handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .context("list links")?;
    let mut links: Vec<Link> = msgs.iter().map(link).collect();
    let mut k = Kernel::default();
    // This namespace's (/proc/sys/net follows the reader's network namespace).
    let sysctl = |path: &str| std::fs::read_to_string(path).ok().map(|v| v.trim() != "0");
    k.ipv4_forwarding = sysctl("/proc/sys/net/ipv4/ip_forward");
    k.ipv6_forwarding = sysctl("/proc/sys/net/ipv6/conf/all/forwarding");
    let addrs: Vec<_> = handle
        .address()
        .get()
        .execute()
        .try_collect()
        .await
        .context("list addresses")?;
    for m in addrs {
        let local = m.attributes.iter().find_map(|a| match a {
            AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
            _ => None,
        });
        let Some(ip) = local else { continue };
        k.local_addrs.insert(ip);
        if let (Some(l), Ok(net)) = (
            links.iter_mut().find(|l| l.index == m.header.index),
            Ipv4Net::new(ip, m.header.prefix_len),
        ) {
            l.addrs.push(net);
        }
    }
    k.links = links;
    // Where routes name nexthop objects, the kernel reports their gateway and device with them
    // only in nexthop_compat_mode; read from the nexthops, it does not matter. None on a kernel
    // without them.
    let nexthops: HashMap<u32, Nexthop> = match nexthop::connect() {
        Ok(nh) => nexthop::dump(&nh).await.unwrap_or_default(),
        Err(_) => Vec::new(),
    }
    .into_iter()
    .map(|n| (n.id, n))
    .collect();
    let mut routes: Vec<RouteMessage> = Vec::new();
    for req in [
        RouteMessageBuilder::<Ipv4Addr>::new().build(),
        RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
    ] {
        let family: Vec<RouteMessage> = handle
            .route()
            .get(req)
            .execute()
            .try_collect()
            .await
            .context("list routes")?;
        routes.extend(family);
    }
    k.routes = routes
        .iter()
        .filter(|m| route_table(m) == u32::from(RouteHeader::RT_TABLE_MAIN))
        .map(|m| route(m, &nexthops))
        .collect();
    // IPv6 ones for vxlan's flannel-v6.<VNI> on a dual-stack network.
    for family in [AddressFamily::Inet, AddressFamily::Inet6] {
        let found = neighbours(handle, family).await?.into_iter();
        k.neighbours
            .extend(found.map(|(ifindex, ip, mac)| Neighbour { ifindex, ip, mac }));
    }
    k.fdb = neighbours(handle, AddressFamily::Bridge)
        .await?
        .into_iter()
        .map(|(ifindex, dst, mac)| Fdb { ifindex, mac, dst })
        .collect();
    Ok(k)
}

fn link(m: &LinkMessage) -> Link {
    let mut l = Link {
        name: String::new(),
        index: m.header.index,
        mtu: 0,
        up: m.header.flags.contains(LinkFlags::Up),
        kind: String::new(),
        master: None,
        addrs: Vec::new(),
        mac: None,
    };
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => l.name = n.clone(),
            LinkAttribute::Mtu(n) => l.mtu = *n,
            LinkAttribute::Address(a) => l.mac = Mac::from_slice(a),
            LinkAttribute::Controller(i) => l.master = Some(*i),
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    if let LinkInfo::Kind(k) = i {
                        l.kind = k.to_string();
                    }
                }
            }
            _ => {}
        }
    }
    l
}

fn route(m: &RouteMessage, nexthops: &HashMap<u32, Nexthop>) -> Route {
    let mut r = Route {
        dst: IpNet::default(),
        gateway: None,
        oif: None,
        onlink: m.header.flags.contains(RouteFlags::Onlink),
        protocol: u8::from(m.header.protocol),
        scope_link: m.header.scope == RouteScope::Link,
        unicast: m.header.kind == RouteType::Unicast,
        metric: 0,
    };
    let v6 = m.header.address_family == rtnetlink::packet_route::AddressFamily::Inet6;
    let mut dst = if v6 {
        IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
    } else {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    };
    for a in &m.attributes {
        match a {
            RouteAttribute::Destination(RouteAddress::Inet(d)) => dst = IpAddr::V4(*d),
            RouteAttribute::Destination(RouteAddress::Inet6(d)) => dst = IpAddr::V6(*d),
            RouteAttribute::Gateway(RouteAddress::Inet(g)) => r.gateway = Some(IpAddr::V4(*g)),
            RouteAttribute::Gateway(RouteAddress::Inet6(g)) => r.gateway = Some(IpAddr::V6(*g)),
            RouteAttribute::Oif(i) => r.oif = Some(*i),
            RouteAttribute::Priority(p) => r.metric = *p,
            RouteAttribute::NhId(id) => {
                if let Some(n) = nexthops.get(id) {
                    r.gateway = n.gateway.map(IpAddr::V4);
                    r.oif = n.oif;
                    r.onlink = n.onlink;
                }
            }
            _ => {}
        }
    }
    r.dst = IpNet::new(dst, m.header.destination_prefix_length).unwrap_or_default();
    r
}

/// Permanent entries of one family (for the FDB: of either remote's): `(ifindex, address,
/// MAC)`.
async fn neighbours(handle: &Handle, family: AddressFamily) -> Result<Vec<(u32, IpAddr, Mac)>> {
    let msgs: Vec<NeighbourMessage> = handle
        .neighbours()
        .get()
        .set_address_family(family)
        .execute()
        .try_collect()
        .await
        .with_context(|| format!("list {family:?} neighbours"))?;
    Ok(msgs
        .iter()
        .filter(|m| m.header.family == family)
        .filter_map(weft_backends::permanent_neighbour)
        .collect())
}
