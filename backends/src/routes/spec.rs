//! The routes weft wants ([`RouteSpec`]), and where one it put in place sends its destination
//! ([`Hop`]).

use std::fmt;
use std::net::Ipv4Addr;
use std::sync::Arc;

use ipnet::Ipv4Net;

use super::dump::Installed;
use super::owner::{nexthop_id, RTPROT_WEFT};
use crate::nexthop::Nexthop;

/// One desired route `dst via gateway dev <oif> [onlink]` in the main table, or `dst dev <oif>`
/// (a device route, as udp's route into flannel0) when there is no gateway.
#[derive(Debug, Clone)]
pub struct RouteSpec {
    pub dst: Ipv4Net,
    pub gateway: Option<Ipv4Addr>,
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
    pub fn device(dst: Ipv4Net, oif: u32, dev: &str) -> Self {
        Self {
            dst,
            gateway: None,
            oif,
            dev: dev.into(),
            onlink: false,
            scope_link: false,
        }
    }

    /// `dst dev <oif> scope link`.
    pub fn link(dst: Ipv4Net, oif: u32, dev: &str) -> Self {
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
            && r.scope_link == self.scope_link
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
    pub(super) gateway: Option<Ipv4Addr>,
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
        let nh = (nexthops && r.gateway.is_some())
            .then(|| nexthop_id(r.dst))
            .flatten();
        Self {
            nh,
            ..Self::classic(r)
        }
    }

    /// The nexthop object this hop names, as weft makes it.
    pub(super) fn nexthop(&self) -> Option<Nexthop> {
        self.nh.map(|id| Nexthop {
            id,
            protocol: RTPROT_WEFT,
            oif: Some(self.oif),
            gateway: self.gateway,
            onlink: self.onlink,
            other: false,
        })
    }
}
