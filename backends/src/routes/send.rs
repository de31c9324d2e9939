//! The requests that put weft's routes and nexthops in place and take them away, in batches.

use std::collections::HashSet;
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use rtnetlink::packet_core::{NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope,
};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::RouteMessageBuilder;
use tracing::debug;

use super::dump::Installed;
use super::owner::RTPROT_WEFT;
use super::put::Put;
use super::spec::Hop;
use crate::batch::{Batch, Request};
use crate::error::is_gone;
use crate::nexthop::{Nexthop, NexthopMessage};
use crate::{Error, ErrorList};

/// Sends the nexthop requests, then the route requests, so a route names only a nexthop that
/// exists. A route whose nexthop the kernel refused (the id another program's, a device without
/// carrier) goes in the classic form instead. Nexthops the batch leaves unused (added for a
/// route that was refused, named by a route now classic) are deleted. Each put is left with the
/// hop now in place, or why its route is not ([`Put::result`]).
pub(super) async fn put_all(batch: &Batch, puts: &mut [Put<'_>], errs: &mut ErrorList) {
    let requests = (puts.iter()).map(|p| match (p.nh_flags, p.hop.nexthop()) {
        (Some(flags), Some(n)) => Some((NexthopMessage::New(n), flags)),
        _ => None,
    });
    let nh_results = batch.send(requests).await;
    let mut fresh = HashSet::new();
    for (p, r) in puts.iter_mut().zip(nh_results) {
        let Some(flags) = p.nh_flags else { continue };
        match r {
            Ok(()) if flags & NLM_F_EXCL != 0 => fresh.extend(p.hop.nh),
            Ok(()) => {}
            Err(e) => {
                debug!(route = %p.want, error = %e, "nexthop refused: the route names its gateway");
                p.hop.nh = None;
                p.nh_flags = None;
                p.route_flags.get_or_insert(NLM_F_CREATE | NLM_F_REPLACE);
            }
        }
    }
    let requests =
        (puts.iter()).map(|p| (p.route_flags).map(|flags| (new_route(p.want.dst, p.hop), flags)));
    let results = batch.send(requests).await;
    let mut unused = Vec::new();
    for (p, r) in puts.iter_mut().zip(results) {
        match r {
            Ok(()) => unused.extend(
                p.previous
                    .and_then(|h| h.nh)
                    .filter(|&id| p.hop.nh != Some(id)),
            ),
            Err(e) => {
                unused.extend(p.hop.nh.filter(|id| fresh.contains(id)));
                p.failed = Some(Box::new(e));
            }
        }
    }
    errs.0.extend(delete_nexthops(batch, &unused).await.0);
}

/// Deletes weft's nexthops `ids`.
pub(super) async fn delete_nexthops(batch: &Batch, ids: &[u32]) -> ErrorList {
    let mut errs = ErrorList::default();
    let requests = ids.iter().map(|&id| {
        let nh = Nexthop {
            id,
            ..Nexthop::default()
        };
        Some((NexthopMessage::Del(nh), 0))
    });
    for (id, r) in ids.iter().zip(batch.send(requests).await) {
        match r {
            Ok(()) => debug!(id, "nexthop removed"),
            Err(e) if is_gone(&e) => {}
            Err(source) => errs.push(Error::Netlink {
                context: format!("delete nexthop {id}"),
                source,
            }),
        }
    }
    errs
}

/// A route request for `dst` through `hop`: naming its nexthop, or its gateway and device.
fn route_message(dst: IpNet, hop: Hop) -> RouteMessage {
    match dst {
        IpNet::V4(d) => through(
            RouteMessageBuilder::<Ipv4Addr>::new().destination_prefix(d.network(), d.prefix_len()),
            hop,
        ),
        IpNet::V6(d) => through(
            RouteMessageBuilder::<Ipv6Addr>::new().destination_prefix(d.network(), d.prefix_len()),
            hop,
        ),
    }
}

/// The route request `b` (its family and destination set) through `hop`.
fn through<T>(b: RouteMessageBuilder<T>, hop: Hop) -> RouteMessage {
    let b = b.protocol(RouteProtocol::Other(RTPROT_WEFT));
    if let Some(id) = hop.nh {
        let mut msg = b.build();
        msg.attributes.push(RouteAttribute::NhId(id));
        return msg;
    }
    // A device route keeps universe scope, as flannel's udp backend creates it, unless asked
    // for link scope (wireguard's, as flannel's).
    let mut b = b.output_interface(hop.oif);
    if hop.scope_link {
        b = b.scope(RouteScope::Link);
    }
    if let Some(g) = hop.gateway {
        // Of the destination's family (`RouteSpec`), as the typed builder's `gateway` writes it.
        (b.get_mut().attributes).push(RouteAttribute::Gateway(RouteAddress::from(g)));
    }
    if hop.onlink {
        b = b.onlink();
    }
    b.build()
}

/// The request adding (or, by `flags`, replacing) the route to `dst` through `hop`.
pub(super) fn new_route(dst: IpNet, hop: Hop) -> RouteNetlinkMessage {
    RouteNetlinkMessage::NewRoute(route_message(dst, hop))
}

/// The request deleting weft's route to `dst` exactly as it was added (protocol, and nexthop or
/// gateway and device): the kernel matches every field given, so no other route to `dst` can go
/// instead.
pub(super) fn delete_exact(dst: IpNet, hop: Hop) -> Request<RouteNetlinkMessage> {
    (RouteNetlinkMessage::DelRoute(route_message(dst, hop)), 0)
}

/// The request deleting the route `r` of a dump.
pub(super) fn delete(r: &Installed) -> Request<RouteNetlinkMessage> {
    // Keep only what identifies the route; the dump's cache info and metrics are not for deletes.
    // The header stays, protocol included, so the kernel deletes this very route and not another
    // one to the same destination. A route naming a nexthop is matched by its id: given a
    // gateway or device too, the kernel would match none.
    let mut msg = r.msg.clone();
    msg.attributes.retain(|a| match a {
        RouteAttribute::Destination(_)
        | RouteAttribute::Priority(_)
        | RouteAttribute::Table(_)
        | RouteAttribute::NhId(_) => true,
        RouteAttribute::Gateway(_) | RouteAttribute::Oif(_) => r.nh.is_none(),
        _ => false,
    });
    (RouteNetlinkMessage::DelRoute(msg), 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::RouteSpec;

    #[test]
    fn a_device_route_is_universe_scope_unless_asked_for_link_scope() {
        let net: IpNet = "10.244.0.0/16".parse().expect("net");
        let device = route_message(net, Hop::classic(&RouteSpec::device(net, 7, "flannel0")));
        assert_eq!(device.header.scope, RouteScope::Universe);
        let link = route_message(net, Hop::classic(&RouteSpec::link(net, 7, "flannel-wg")));
        assert_eq!(link.header.scope, RouteScope::Link);
        assert!(link.attributes.contains(&RouteAttribute::Oif(7)));
    }

    #[test]
    fn an_ipv6_route_is_an_inet6_message_with_ipv6_addresses() {
        use rtnetlink::packet_route::AddressFamily;
        let want = RouteSpec {
            gateway: Some("fd00:1::2".parse().expect("gateway")),
            onlink: true,
            ..RouteSpec::device("fd00:10::/64".parse::<IpNet>().expect("net"), 7, "eth0")
        };
        let msg = route_message(want.dst, Hop::of(&want, true));
        assert_eq!(msg.header.address_family, AddressFamily::Inet6);
        assert_eq!(msg.header.destination_prefix_length, 64);
        let dst = RouteAddress::Inet6("fd00:10::".parse().expect("addr"));
        let gw = RouteAddress::Inet6("fd00:1::2".parse().expect("addr"));
        assert!(msg.attributes.contains(&RouteAttribute::Destination(dst)));
        assert!(msg.attributes.contains(&RouteAttribute::Gateway(gw)));
        assert!(msg.attributes.contains(&RouteAttribute::Oif(7)));
        // Classic even where the kernel has nexthops.
        assert!(!(msg.attributes.iter()).any(|a| matches!(a, RouteAttribute::NhId(_))));
        assert_eq!(msg.header.protocol, RouteProtocol::Other(RTPROT_WEFT));
    }
}
