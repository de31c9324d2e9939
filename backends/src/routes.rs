//! Owned routes: the one route reconciler used by host-gw, vxlan (and its DirectRouting) and udp.
//!
//! Which routes an instance owns. Every route weft adds carries protocol [`RTPROT_WEFT`], but
//! several weftd instances may share a host (two flannel networks, each with its own etcd prefix),
//! so the protocol alone says "some weft", not "this weft". A route of the main table belongs to
//! this instance when it carries protocol 87 **and** either its destination lies inside this
//! instance's cluster network, or it leaves through this instance's own overlay device
//! (`flannel.<VNI>`, `flannel0`), see [`Owner`]. Two instances on one host must have disjoint
//! networks (an address cannot be routed into two overlays) and distinct devices, so no route is
//! owned by both; the device clause also lets an instance clean up its own routes into its device
//! after its network changed.
//!
//! Routes weft does not own are never replaced or deleted. A desired route whose destination is
//! already routed by someone else (typically the kernel's connected route of docker0 or cni0
//! when a peer's lease is the subnet of a local bridge) is not installed: it is reported as
//! [`Error::RouteConflict`] and looked at again at every reconcile, so weft's route appears once
//! the other one is gone. If weft's own route was there first, it is withdrawn: the destination
//! belongs to whoever else routes it, which on one host is the local bridge. New routes are
//! added with NLM_F_EXCL, so one that appears between the dump and the add is not overwritten.
//!
//! One exception keeps the switch from flanneld to weft seamless: a route exactly like the one
//! weft wants (same destination, gateway, device, on-link flag, metric 0, plain unicast) with
//! protocol `boot`, which is how flanneld writes its routes, is adopted: weft adds its own copy
//! ahead of it and deletes the old one. Forwarding never changes on the way; from then on the
//! route is weft's, and goes when the peer leaves, as it would have under flanneld.

use std::fmt;
use std::net::Ipv4Addr;

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use rtnetlink::packet_core::{NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE};
use rtnetlink::packet_route::link::LinkAttribute;
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
    RouteType,
};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::{Handle, RouteMessageBuilder};
use tracing::{debug, info};

use crate::{netlink, Error, ErrorList};

/// The route protocol number (`rtm_protocol`) marking routes weft created. `ip route` shows it as
/// `proto 87` (add `87 weft` to /etc/iproute2/rt_protos for a name). 87 is unassigned in the
/// kernel's and iproute2's lists; 0x57 is ASCII 'W'.
pub const RTPROT_WEFT: u8 = 0x57;

/// `RTPROT_BOOT`, the protocol of routes flanneld (Go netlink's default) and `ip route add` create.
const RTPROT_BOOT: u8 = 3;

/// Which weft routes one backend instance owns (see the module comment).
#[derive(Debug, Clone, Copy)]
pub struct Owner {
    /// The instance's cluster network: every route it creates leads into it.
    pub network: Ipv4Net,
    /// The instance's own overlay device, if it has one (host-gw has none: the underlay is shared).
    pub device: Option<u32>,
}

impl Owner {
    fn owns(&self, r: &Installed) -> bool {
        r.protocol == RTPROT_WEFT
            && (self.network.contains(&r.dst) || (r.oif.is_some() && r.oif == self.device))
    }
}

/// One desired route `dst via gateway dev <oif> [onlink]` in the main table, or `dst dev <oif>`
/// (a device route, as udp's route into flannel0) when there is no gateway.
#[derive(Debug, Clone)]
pub struct RouteSpec {
    pub dst: Ipv4Net,
    pub gateway: Option<Ipv4Addr>,
    pub oif: u32,
    /// Interface name, for messages only.
    pub dev: String,
    /// vxlan routes point at the peer's network address through the device, which no local
    /// prefix covers: the kernel must be told the gateway is on-link.
    pub onlink: bool,
}

impl RouteSpec {
    /// `dst dev <oif>`: everything for `dst` goes into the device, with no next hop.
    pub fn device(dst: Ipv4Net, oif: u32, dev: &str) -> Self {
        Self {
            dst,
            gateway: None,
            oif,
            dev: dev.to_string(),
            onlink: false,
        }
    }

    /// Whether `r` forwards exactly as this route would (whoever created it).
    fn same_as(&self, r: &Installed) -> bool {
        r.dst == self.dst
            && r.gateway == self.gateway
            && r.oif == Some(self.oif)
            && r.onlink == self.onlink
            && r.priority == 0
            && r.clean
    }
}

impl fmt::Display for RouteSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.gateway {
            Some(g) => write!(f, "{} via {g} dev {}", self.dst, self.dev)?,
            None => write!(f, "{} dev {}", self.dst, self.dev)?,
        }
        if self.onlink {
            f.write_str(" onlink")?;
        }
        Ok(())
    }
}

/// A route of the main table as the kernel reports it.
#[derive(Debug)]
struct Installed {
    dst: Ipv4Net,
    gateway: Option<Ipv4Addr>,
    oif: Option<u32>,
    onlink: bool,
    priority: u32,
    protocol: u8,
    /// Plain unicast, universe scope, no TOS: the only shape weft creates.
    clean: bool,
    msg: RouteMessage,
}

/// Makes the routes `owner` owns exactly `desired`: adds what is missing, replaces its own
/// routes that differ, deletes its own routes no peer wants, and leaves every other route alone
/// (a desired route whose destination another route holds is a [`Error::RouteConflict`]).
/// Every failure is collected, none stops the pass.
pub async fn reconcile_owned(handle: &Handle, owner: &Owner, desired: &[RouteSpec]) -> ErrorList {
    let mut errs = ErrorList::default();
    let (mut owned, foreign): (Vec<Installed>, Vec<Installed>) = match list_main(handle).await {
        Ok(all) => all.into_iter().map(parse).partition(|r| owner.owns(r)),
        Err(e) => {
            errs.push(e);
            return errs;
        }
    };
    let mut missing = Vec::new();
    let mut adopt = Vec::new();
    for want in desired {
        let held: Vec<&Installed> = foreign.iter().filter(|r| r.dst == want.dst).collect();
        match held.as_slice() {
            [] => {}
            [theirs] if theirs.protocol == RTPROT_BOOT && want.same_as(theirs) => {
                adopt.push(*theirs);
            }
            [theirs, ..] => {
                // Weft's own routes to this destination stay in `owned` and are withdrawn below.
                errs.push(Error::RouteConflict {
                    wanted: want.to_string(),
                    existing: describe(handle, theirs).await,
                });
                continue;
            }
        }
        match owned.iter().position(|r| want.same_as(r)) {
            Some(i) => {
                owned.swap_remove(i);
            }
            None => missing.push(want),
        }
    }
    debug!(
        missing = missing.len(),
        extra = owned.len(),
        adopt = adopt.len(),
        "route diff"
    );
    let mut failed = Vec::new();
    for want in missing {
        let ours_there = owned.iter().any(|r| r.dst == want.dst);
        let adopting = adopt.iter().any(|r| r.dst == want.dst);
        // Replace only a route of our own. Adding next to flanneld's copy needs neither flag:
        // the kernel puts the new route ahead of it (they differ in protocol).
        let flags = if ours_there && !adopting {
            NLM_F_CREATE | NLM_F_REPLACE
        } else if adopting {
            NLM_F_CREATE
        } else {
            NLM_F_CREATE | NLM_F_EXCL
        };
        match add(handle, want, flags).await {
            Ok(()) if ours_there => info!(route = %want, "route replaced"),
            Ok(()) => info!(route = %want, "route added"),
            Err(source) => {
                failed.push(want.dst);
                errs.push(Error::Netlink {
                    context: format!("add route {want}"),
                    source,
                })
            }
        }
    }
    for theirs in adopt {
        // Only once weft's copy is in: traffic for the peer never lacks a route.
        if failed.contains(&theirs.dst) {
            continue;
        }
        match delete(handle, theirs).await {
            Ok(()) => {
                info!(dst = %theirs.dst, gateway = ?theirs.gateway, "flanneld's route adopted")
            }
            Err(e) if netlink::is_gone(&e) => {}
            Err(source) => errs.push(Error::Netlink {
                context: format!(
                    "adopt route {} via {:?} (proto boot)",
                    theirs.dst, theirs.gateway
                ),
                source,
            }),
        }
    }
    for r in owned {
        // Replacing may already have removed it (same dst and metric): ESRCH is fine then.
        let wanted = desired.iter().any(|d| d.dst == r.dst);
        let yielded = foreign.iter().any(|f| f.dst == r.dst);
        match delete(handle, &r).await {
            Ok(()) if yielded => {
                info!(dst = %r.dst, gateway = ?r.gateway, "route withdrawn: another route holds its destination")
            }
            Ok(()) if wanted => debug!(dst = %r.dst, "stale route variant removed"),
            Ok(()) => info!(dst = %r.dst, gateway = ?r.gateway, "route removed"),
            Err(e) if netlink::is_gone(&e) => {}
            Err(source) => errs.push(Error::Netlink {
                context: format!("delete route {} via {:?}", r.dst, r.gateway),
                source,
            }),
        }
    }
    errs
}

async fn add(handle: &Handle, r: &RouteSpec, flags: u16) -> Result<(), rtnetlink::Error> {
    let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(r.dst.network(), r.dst.prefix_len())
        .output_interface(r.oif)
        .protocol(RouteProtocol::Other(RTPROT_WEFT));
    // A device route keeps universe scope, as flannel's udp backend creates it.
    if let Some(g) = r.gateway {
        b = b.gateway(g);
    }
    if r.onlink {
        b = b.onlink();
    }
    let msg = RouteNetlinkMessage::NewRoute(b.build());
    netlink::request(handle, msg, flags).await
}

async fn delete(handle: &Handle, r: &Installed) -> Result<(), rtnetlink::Error> {
    // Keep only what identifies the route; the dump's cache info and metrics are not for deletes.
    // The header stays, protocol included, so the kernel deletes this very route and not another
    // one to the same destination.
    let mut msg = r.msg.clone();
    msg.attributes.retain(|a| {
        matches!(
            a,
            RouteAttribute::Destination(_)
                | RouteAttribute::Gateway(_)
                | RouteAttribute::Oif(_)
                | RouteAttribute::Priority(_)
                | RouteAttribute::Table(_)
        )
    });
    handle.route().del(msg).execute().await
}

/// `r` as `ip route` would print it, for a conflict message: which route holds the destination.
async fn describe(handle: &Handle, r: &Installed) -> String {
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
    let req = RouteMessageBuilder::<Ipv4Addr>::new().build();
    let all: Vec<RouteMessage> = handle
        .route()
        .get(req)
        .execute()
        .try_collect()
        .await
        .map_err(Error::netlink("list routes"))?;
    Ok(all
        .into_iter()
        .filter(|m| table(m) == u32::from(RouteHeader::RT_TABLE_MAIN))
        .collect())
}
fn table(m: &RouteMessage) -> u32 {
    m.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(m.header.table))
}

fn dst(m: &RouteMessage) -> Ipv4Net {
    let addr = m
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Destination(RouteAddress::Inet(a)) => Some(*a),
            _ => None,
        })
        .unwrap_or(Ipv4Addr::UNSPECIFIED);
    Ipv4Net::new(addr, m.header.destination_prefix_length).unwrap_or_default()
}

fn parse(msg: RouteMessage) -> Installed {
    let mut r = Installed {
        dst: dst(&msg),
        gateway: None,
        oif: None,
        onlink: msg.header.flags.contains(RouteFlags::Onlink),
        priority: 0,
        protocol: u8::from(msg.header.protocol),
        clean: msg.header.kind == RouteType::Unicast
            && msg.header.scope == RouteScope::Universe
            && msg.header.tos == 0,
        msg: RouteMessage::default(),
    };
    for a in &msg.attributes {
        match a {
            RouteAttribute::Gateway(RouteAddress::Inet(g)) => r.gateway = Some(*g),
            RouteAttribute::Oif(i) => r.oif = Some(*i),
            RouteAttribute::Priority(p) => r.priority = *p,
            RouteAttribute::MultiPath(_) => r.clean = false,
            _ => {}
        }
    }
    r.msg = msg;
    r
}

/// The networks directly reachable through interface `oif`: the scope-link routes of the main
/// table on it (the kernel's prefix routes of its addresses, plus any added by hand). A gateway
/// outside all of them would be rejected by the kernel, so host-gw and DirectRouting check first.
pub async fn connected_networks(handle: &Handle, oif: u32) -> Result<Vec<Ipv4Net>, Error> {
    Ok(list_main(handle)
        .await?
        .iter()
        .filter(|m| m.header.scope == RouteScope::Link && m.header.kind == RouteType::Unicast)
        .filter(|m| m.header.destination_prefix_length > 0)
        .filter(|m| {
            let mut oif_ok = false;
            for a in &m.attributes {
                match a {
                    RouteAttribute::Gateway(_) | RouteAttribute::MultiPath(_) => return false,
                    RouteAttribute::Oif(i) => oif_ok = *i == oif,
                    _ => {}
                }
            }
            oif_ok
        })
        .map(dst)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(dst: &str, protocol: u8, oif: u32) -> Installed {
        Installed {
            dst: dst.parse().expect("dst"),
            gateway: None,
            oif: Some(oif),
            onlink: false,
            priority: 0,
            protocol,
            clean: true,
            msg: RouteMessage::default(),
        }
    }

    #[test]
    fn an_instance_owns_weft_routes_into_its_network_or_through_its_device() {
        let vxlan = Owner {
            network: "10.244.0.0/16".parse().expect("net"),
            device: Some(7),
        };
        let host_gw = Owner {
            device: None,
            ..vxlan
        };
        for owner in [vxlan, host_gw] {
            assert!(owner.owns(&route("10.244.3.0/24", RTPROT_WEFT, 2)));
            assert!(owner.owns(&route("10.244.0.0/16", RTPROT_WEFT, 2)));
            // Another weftd's network on the same host.
            assert!(!owner.owns(&route("10.245.3.0/24", RTPROT_WEFT, 2)));
            // Not weft's: the kernel's connected route, flanneld's or an administrator's.
            assert!(!owner.owns(&route("10.244.3.0/24", 2, 2)));
            assert!(!owner.owns(&route("10.244.3.0/24", RTPROT_BOOT, 7)));
        }
        // Left in its own device by this instance under an earlier network.
        assert!(vxlan.owns(&route("10.9.3.0/24", RTPROT_WEFT, 7)));
        assert!(!host_gw.owns(&route("10.9.3.0/24", RTPROT_WEFT, 7)));
    }
}
