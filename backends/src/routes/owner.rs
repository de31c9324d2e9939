//! Which routes and nexthops are weft's, and which weft instance's (see [`super`]): the protocol
//! weft marks them with, and [`Owner`].

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use super::dump::Installed;
use crate::nexthop::Nexthop;

/// The route protocol number (`rtm_protocol`) marking routes weft created. `ip route` shows it as
/// `proto 87` (add `87 weft` to /etc/iproute2/rt_protos for a name). 87 is unassigned in the
/// kernel's and iproute2's lists; 0x57 is ASCII 'W'.
pub const RTPROT_WEFT: u8 = 0x57;

/// `RTPROT_BOOT`, the protocol of routes flanneld (Go netlink's default) and `ip route add` create.
pub(super) const RTPROT_BOOT: u8 = 3;

/// Which weft routes one backend instance owns (see the module comment).
#[derive(Debug, Clone, Copy)]
pub struct Owner {
    /// The instance's cluster network: every route it creates leads into it.
    pub network: Ipv4Net,
    /// The instance's own overlay device, if it has one (host-gw has none: the underlay is shared).
    pub device: Option<u32>,
}

impl Owner {
    pub(super) fn owns(&self, r: &Installed) -> bool {
        r.protocol == RTPROT_WEFT
            && (self.network.contains(&r.dst) || (r.oif.is_some() && r.oif == self.device))
    }

    /// The same rule for a nexthop, whose id is its route's destination address.
    pub(super) fn owns_nexthop(&self, nh: &Nexthop) -> bool {
        nh.protocol == RTPROT_WEFT
            && (self.network.contains(&Ipv4Addr::from(nh.id))
                || (nh.oif.is_some() && nh.oif == self.device))
    }
}

/// The id of weft's nexthop for the route to `dst`: its network address as a number. Derived,
/// not allocated, so a restarted weftd finds its nexthops with no record of them, and no two of
/// an instance's routes share one. Another program's nexthop may hold the id (FRR's zebra
/// counts up from 1, far below any cluster network's addresses): that route stays classic.
pub fn nexthop_id(dst: Ipv4Net) -> Option<u32> {
    Some(u32::from(dst.network())).filter(|&id| id != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(dst: &str, protocol: u8, oif: u32) -> Installed {
        Installed::plain(dst, None, oif, protocol)
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
