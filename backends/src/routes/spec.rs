//! The routes weft wants ([`RouteSpec`]), and where one it put in place sends its destination
//! ([`Hop`]).

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use super::dump::Installed;
use super::owner::{nexthop_id, RTPROT_WEFT};
use crate::nexthop::Nexthop;

/// One desired route `dst via gateway dev <oif> [onlink]` in the main table, or `dst dev <oif>`
/// (a device route, as udp's route into flannel0) when there is no gateway. IPv4 or IPv6: the
/// gateway is of the destination's family.
#[derive(Debug, Clone)]
pub struct RouteSpec {
    pub dst: IpNet,
    pub gateway: Option<IpAddr>,
    pub oif: u32,
    /// Interface name, for messages only (shared: a pass may hold 10,000 routes).
    pub dev: Arc<str>,
    /// vxlan routes point at the peer's network address through the device, which no local
    /// prefix covers: the kernel must be told the gateway is on-link.
    pub onlink: bool,
    /// `scope link`: a device route whose destinations are all on the link (wireguard's, as
    /// flannel makes it); universe scope otherwise, as flannel's udp route is.
    pub scope_link: bool,
}

impl RouteSpec {
    /// `dst dev <oif>`: everything for `dst` goes into the device, with no next hop.
    pub fn device(dst: impl Into<IpNet>, oif: u32, dev: &str) -> Self {
        Self {
            dst: dst.into(),
            gateway: None,
            oif,
            dev: dev.into(),
            onlink: false,
            scope_link: false,
        }
    }

    /// `dst dev <oif> scope link`.
    pub fn link(dst: impl Into<IpNet>, oif: u32, dev: &str) -> Self {
        Self {
            scope_link: true,
            ..Self::device(dst, oif, dev)
        }
    }

    /// Whether `r` forwards exactly as this route would (whoever created it, in either form).
    pub(super) fn forwards_like(&self, r: &Installed) -> bool {
        r.dst == self.dst
            && r.gateway == self.gateway
            && r.oif == Some(self.oif)
            && r.onlink == self.onlink
            // The kernel reports every IPv6 route in universe scope, whatever it was given.
            && (r.scope_link == self.scope_link || matches!(self.dst, IpNet::V6(_)))
            && r.priority == default_metric(&self.dst)
            && r.clean
    }
}

/// The metric the kernel gives a route added without one: 0, but IPv6 makes that 1024
/// (`IP6_RT_PRIO_USER`).
pub(super) fn default_metric(dst: &IpNet) -> u32 {
    match dst {
        IpNet::V4(_) => 0,
        IpNet::V6(_) => 1024,
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
        if self.scope_link {
            f.write_str(" scope link")?;
        }
        Ok(())
    }
}

/// Where a route weft put in place sends its destination, and through which of weft's nexthop
/// objects, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Hop {
    pub(super) gateway: Option<IpAddr>,
    pub(super) oif: u32,
    pub(super) onlink: bool,
    pub(super) scope_link: bool,
    pub(super) nh: Option<u32>,
}

impl Hop {
    /// `r` in the classic form.
    pub(super) fn classic(r: &RouteSpec) -> Self {
        Self {
            gateway: r.gateway,
            oif: r.oif,
            onlink: r.onlink,
            scope_link: r.scope_link,
            nh: None,
        }
    }

    /// `r` through its own nexthop where it has a gateway and `nexthops` (the kernel has them).
    pub(super) fn of(r: &RouteSpec, nexthops: bool) -> Self {
        let nh = (nexthops && matches!(r.gateway, Some(IpAddr::V4(_))))
            .then(|| nexthop_id(r.dst))
            .flatten();
        Self {
            nh,
            ..Self::classic(r)
        }
    }

    /// The nexthop object this hop names, as weft makes it.
    pub(super) fn nexthop(&self) -> Option<Nexthop> {
        // Only an IPv4 route has an id (`nexthop_id`), so its gateway is IPv4.
        let gateway = match self.gateway {
            Some(IpAddr::V4(g)) => Some(g),
            _ => None,
        };
        self.nh.map(|id| Nexthop {
            id,
            protocol: RTPROT_WEFT,
            oif: Some(self.oif),
            gateway,
            onlink: self.onlink,
            other: false,
        })
    }
}
