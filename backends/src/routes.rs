//! Owned routes: the one route reconciler used by host-gw, vxlan and vxlan's DirectRouting.
//!
//! Ownership is the route protocol: weft marks every route it adds with [`RTPROT_WEFT`] and only
//! ever lists or deletes routes of the main table carrying it, so routes of the administrator, of
//! DHCP or of other agents are never touched. Adding uses NLM_F_REPLACE so that a route flanneld
//! left for the same peer subnet (protocol `boot`) is taken over instead of failing with EEXIST:
//! a route to a peer's subnet is weft's by definition.

use std::fmt;
use std::net::Ipv4Addr;

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use rtnetlink::packet_core::{NLM_F_CREATE, NLM_F_REPLACE};
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

/// An owned route as the kernel reports it.
#[derive(Debug)]
struct Installed {
    dst: Ipv4Net,
    gateway: Option<Ipv4Addr>,
    oif: Option<u32>,
    onlink: bool,
    priority: u32,
    /// Plain unicast, universe scope, no TOS: the only shape weft creates.
    clean: bool,
    msg: RouteMessage,
}

/// Makes the owned routes of the main table exactly `desired`: adds (replaces) what is missing or
/// different, deletes owned routes no peer wants. Every failure is collected, none stops the pass.
pub async fn reconcile(handle: &Handle, desired: &[RouteSpec]) -> ErrorList {
    let mut errs = ErrorList::default();
    let mut installed = match list_owned(handle).await {
        Ok(r) => r,
        Err(e) => {
            errs.push(e);
            return errs;
        }
    };
    let mut missing = Vec::new();
    for want in desired {
        match installed.iter().position(|r| want.same_as(r)) {
            Some(i) => {
                installed.swap_remove(i);
            }
            None => missing.push(want),
        }
    }
    debug!(
        missing = missing.len(),
        extra = installed.len(),
        "route diff"
    );
    for want in missing {
        let changed = installed.iter().any(|r| r.dst == want.dst);
        match add(handle, want).await {
            Ok(()) if changed => info!(route = %want, "route replaced"),
            Ok(()) => info!(route = %want, "route added"),
            Err(source) => errs.push(Error::Netlink {
                context: format!("add route {want}"),
                source,
            }),
        }
    }
    for r in installed {
        // Replacing may already have removed it (same dst and metric): ESRCH is fine then.
        match delete(handle, &r).await {
            Ok(()) if desired.iter().any(|d| d.dst == r.dst) => {
                debug!(dst = %r.dst, "stale route variant removed")
            }
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

async fn add(handle: &Handle, r: &RouteSpec) -> Result<(), rtnetlink::Error> {
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
    netlink::request(handle, msg, NLM_F_CREATE | NLM_F_REPLACE).await
}

async fn delete(handle: &Handle, r: &Installed) -> Result<(), rtnetlink::Error> {
    // Keep only what identifies the route; the dump's cache info and metrics are not for deletes.
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

async fn list_owned(handle: &Handle) -> Result<Vec<Installed>, Error> {
    Ok(list_main(handle)
        .await?
        .into_iter()
        .filter(|m| u8::from(m.header.protocol) == RTPROT_WEFT)
        .map(parse)
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
