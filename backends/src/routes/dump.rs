//! Reading the kernel's main table: its routes as weft judges them ([`Installed`]), the networks
//! connected to an interface, and a route described as `ip route` prints it.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use rtnetlink::packet_route::link::LinkAttribute;
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
    RouteType,
};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, RouteMessageBuilder};

use crate::nexthop::Nexthop;
use crate::Error;

/// A route of the main table as the kernel reports it. A route naming a nexthop has that
/// nexthop's gateway, device and on-link flag here.
#[derive(Debug, Clone)]
pub(super) struct Installed {
    pub(super) dst: IpNet,
    pub(super) gateway: Option<IpAddr>,
    pub(super) oif: Option<u32>,
    pub(super) onlink: bool,
    pub(super) scope_link: bool,
    pub(super) priority: u32,
    pub(super) protocol: u8,
    /// The nexthop object the route names, if any.
    pub(super) nh: Option<u32>,
    /// Plain unicast, universe or link scope, no TOS, one plain next hop: the only shapes weft
    /// creates.
    pub(super) clean: bool,
    /// Several next hops. IPv6 merges routes of one destination and metric added without
    /// NLM_F_EXCL into one such route, whose siblings may each be another program's.
    pub(super) multipath: bool,
    pub(super) msg: RouteMessage,
}

/// The context of a failed route dump, so a pass that could not read the table says so.
pub(super) const LIST_ROUTES: &str = "list routes";

/// `r` as `ip route` would print it, for a conflict message: which route holds the destination.
pub(super) async fn describe(handle: &Handle, r: &Installed) -> String {
    let h = &r.msg.header;
    let mut s = String::new();
    if h.kind != RouteType::Unicast {
        s.push_str(&format!("{} ", lower(format!("{:?}", h.kind))));
    }
    s.push_str(&r.dst.to_string());
    if let Some(g) = r.gateway {
        s.push_str(&format!(" via {g}"));
    }
    if let Some(i) = r.oif {
        s.push_str(&format!(" dev {}", link_name(handle, i).await));
    }
    let proto = match h.protocol {
        RouteProtocol::Other(n) => n.to_string(),
        p => lower(format!("{p:?}")),
    };
    s.push_str(&format!(" proto {proto}"));
    if h.scope != RouteScope::Universe {
        s.push_str(&format!(" scope {}", lower(format!("{:?}", h.scope))));
    }
    if r.priority != 0 {
        s.push_str(&format!(" metric {}", r.priority));
    }
    s
}

fn lower(s: String) -> String {
    s.to_ascii_lowercase()
}

/// The name of interface `index`, or `#<index>` when it cannot be looked up.
async fn link_name(handle: &Handle, index: u32) -> String {
    let found = handle
        .link()
        .get()
        .match_index(index)
        .execute()
        .try_next()
        .await;
    found
        .ok()
        .flatten()
        .and_then(|m| {
            m.attributes.into_iter().find_map(|a| match a {
                LinkAttribute::IfName(n) => Some(n),
                _ => None,
            })
        })
        .unwrap_or_else(|| format!("#{index}"))
}

/// All IPv4 routes of the main table.
pub(crate) async fn list_main(handle: &Handle) -> Result<Vec<RouteMessage>, Error> {
    let mut all = Vec::new();
    each_main(handle, false, |m| all.push(m)).await?;
    Ok(all)
}

/// Hands `f` each IPv4 route of the main table, then with `v6` each IPv6 one, as the dumps
/// stream in, so that none of the table need be held (it may hold 10,000 peer routes).
pub(super) async fn each_main(
    handle: &Handle,
    v6: bool,
    mut f: impl FnMut(RouteMessage),
) -> Result<(), Error> {
    let v4 = RouteMessageBuilder::<Ipv4Addr>::new().build();
    let v6 = v6.then(|| RouteMessageBuilder::<Ipv6Addr>::new().build());
    for request in std::iter::once(v4).chain(v6) {
        let mut dump = handle.route().get(request).execute();
        while let Some(m) = dump.try_next().await.map_err(Error::netlink(LIST_ROUTES))? {
            if table(&m) == u32::from(RouteHeader::RT_TABLE_MAIN) {
                f(m);
            }
        }
    }
    Ok(())
}

/// The routing table a route is in (the attribute, which holds tables above 255, else the
/// header's).
pub fn table(m: &RouteMessage) -> u32 {
    m.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(m.header.table))
}

/// A route's destination (a default route has no attribute: the family's `/0`).
fn dst(m: &RouteMessage) -> IpNet {
    let addr = m.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet(a)) => Some(IpAddr::V4(*a)),
        RouteAttribute::Destination(RouteAddress::Inet6(a)) => Some(IpAddr::V6(*a)),
        _ => None,
    });
    let addr = addr.unwrap_or(match m.header.address_family {
        AddressFamily::Inet6 => Ipv6Addr::UNSPECIFIED.into(),
        _ => Ipv4Addr::UNSPECIFIED.into(),
    });
    let len = m.header.destination_prefix_length;
    IpNet::new(addr, len).unwrap_or_else(|_| IpNet::from(Ipv4Net::default()))
}

/// Reads a route; one naming a nexthop of `nexthops` gets that nexthop's gateway, device and
/// on-link flag (the kernel reports them with the route only in `nexthop_compat_mode`).
pub(super) fn parse(msg: RouteMessage, nexthops: &HashMap<u32, Nexthop>) -> Installed {
    let mut r = Installed {
        dst: dst(&msg),
        gateway: None,
        oif: None,
        onlink: msg.header.flags.contains(RouteFlags::Onlink),
        scope_link: msg.header.scope == RouteScope::Link,
        priority: 0,
        protocol: u8::from(msg.header.protocol),
        nh: None,
        clean: msg.header.kind == RouteType::Unicast
            && matches!(msg.header.scope, RouteScope::Universe | RouteScope::Link)
            && msg.header.tos == 0,
        multipath: false,
        msg: RouteMessage::default(),
    };
    for a in &msg.attributes {
        match a {
            RouteAttribute::Gateway(RouteAddress::Inet(g)) => r.gateway = Some((*g).into()),
            RouteAttribute::Gateway(RouteAddress::Inet6(g)) => r.gateway = Some((*g).into()),
            // A gateway of the other family: a shape weft never makes.
            RouteAttribute::Via(_) => r.clean = false,
            RouteAttribute::Oif(i) => r.oif = Some(*i),
            RouteAttribute::Priority(p) => r.priority = *p,
            RouteAttribute::MultiPath(_) => {
                r.clean = false;
                r.multipath = true;
            }
            RouteAttribute::NhId(id) => r.nh = Some(*id),
            _ => {}
        }
    }
    if let Some(n) = r.nh.and_then(|id| nexthops.get(&id)) {
        r.gateway = n.gateway.map(IpAddr::V4);
        r.oif = n.oif;
        r.onlink = n.onlink;
        r.clean &= !n.other;
    }
    r.msg = msg;
    r
}

/// The networks directly reachable through interface `oif`: the scope-link routes of the main
/// table on it (the kernel's prefix routes of its addresses, plus any added by hand). A gateway
/// outside all of them would be rejected by the kernel, so host-gw and DirectRouting check first.
pub async fn connected_networks(handle: &Handle, oif: u32) -> Result<Vec<Ipv4Net>, Error> {
    let request = RouteMessageBuilder::<Ipv4Addr>::new().build();
    let nets = connected(handle, oif, request).await?;
    Ok(nets
        .into_iter()
        .filter_map(|n| match n {
            IpNet::V4(n) => Some(n),
            IpNet::V6(_) => None,
        })
        .collect())
}

/// [`connected_networks`] for IPv6: the kernel's prefix routes of the interface's global
/// addresses. IPv6 routes carry no link scope: they are told by the kernel's protocol instead,
/// and link-local (which no peer's PublicIPv6 is) is left out.
pub async fn connected_networks_v6(handle: &Handle, oif: u32) -> Result<Vec<Ipv6Net>, Error> {
    let request = RouteMessageBuilder::<Ipv6Addr>::new().build();
    let link_local: Ipv6Net = "fe80::/10".parse().unwrap_or_default();
    let nets = connected(handle, oif, request).await?;
    Ok(nets
        .into_iter()
        .filter_map(|n| match n {
            IpNet::V6(n) if !link_local.contains(&n.network()) => Some(n),
            _ => None,
        })
        .collect())
}

/// The main table's plain unicast routes without a gateway through `oif` of the family
/// `request` dumps, filtered as the dump streams in: the table may hold 10,000 peer routes.
async fn connected(handle: &Handle, oif: u32, request: RouteMessage) -> Result<Vec<IpNet>, Error> {
    let connected = |m: RouteMessage| async move {
        let h = &m.header;
        let on_link = match dst(&m) {
            IpNet::V4(_) => h.scope == RouteScope::Link,
            IpNet::V6(_) => h.protocol == RouteProtocol::Kernel,
        };
        if !on_link || h.kind != RouteType::Unicast || h.destination_prefix_length == 0 {
            return Ok(None);
        }
        if table(&m) != u32::from(RouteHeader::RT_TABLE_MAIN) {
            return Ok(None);
        }
        let mut oif_ok = false;
        for a in &m.attributes {
            match a {
                RouteAttribute::Gateway(_) | RouteAttribute::MultiPath(_) => return Ok(None),
                RouteAttribute::Oif(i) => oif_ok = *i == oif,
                _ => {}
            }
        }
        Ok(oif_ok.then(|| dst(&m)))
    };
    handle
        .route()
        .get(request)
        .execute()
        .try_filter_map(connected)
        .try_collect()
        .await
        .map_err(Error::netlink(LIST_ROUTES))
}

#[cfg(test)]
impl Installed {
    /// `dst [via gateway] dev <oif> proto <protocol>`, plain unicast with the family's default
    /// metric, as a dump reads it.
    pub(super) fn plain(dst: &str, gateway: Option<&str>, oif: u32, protocol: u8) -> Self {
        let dst = dst.parse().expect("dst");
        Self {
            dst,
            gateway: gateway.map(|g| g.parse().expect("gateway")),
            oif: Some(oif),
            onlink: false,
            scope_link: false,
            priority: super::spec::default_metric(&dst),
            protocol,
            nh: None,
            clean: true,
            multipath: false,
            msg: RouteMessage::default(),
        }
    }
}
