//! Which routes and nexthops are weft's, and which weft instance's (see [`super`]): the protocol
//! weft marks them with, and [`Owner`].

use std::net::Ipv4Addr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

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
    /// Its IPv6 cluster network, when it is dual-stack.
    pub network_v6: Option<Ipv6Net>,
    /// The instance's own overlay device, if it has one (host-gw has none: the underlay is shared).
    pub device: Option<u32>,
}

impl Owner {
    pub(super) fn owns(&self, r: &Installed) -> bool {
        // IPv6 shows sibling routes merged as one, with the first's protocol: weft never makes
        // one, so the others are another program's, which weft must not replace.
        let merged = r.multipath && matches!(r.dst, IpNet::V6(_));
        r.protocol == RTPROT_WEFT
            && !merged
            && (self.covers(&r.dst) || (r.oif.is_some() && r.oif == self.device))
    }

    /// Whether `dst` lies inside one of the instance's networks.
    fn covers(&self, dst: &IpNet) -> bool {
        match dst {
            IpNet::V4(d) => self.network.contains(d),
            IpNet::V6(d) => self.network_v6.is_some_and(|n| n.contains(d)),
        }
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
/// IPv6 routes stay classic too: an IPv6 network address does not fit the id, and the quadratic
/// insert cost nexthops avoid is the IPv4 fib's.
pub fn nexthop_id(dst: IpNet) -> Option<u32> {
    match dst {
        IpNet::V4(d) => Some(u32::from(d.network())).filter(|&id| id != 0),
        IpNet::V6(_) => None,
    }
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
            network_v6: None,
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

    #[test]
    fn a_dual_stack_instance_owns_weft_routes_into_its_ipv6_network_too() {
        let v4_only = Owner {
            network: "10.244.0.0/16".parse().expect("net"),
            network_v6: None,
            device: None,
        };
        let dual = Owner {
            network_v6: Some("fd00:10::/56".parse().expect("net")),
            ..v4_only
        };
        assert!(dual.owns(&route("fd00:10:0:3::/64", RTPROT_WEFT, 2)));
        assert!(dual.owns(&route("fd00:10::/56", RTPROT_WEFT, 2)));
        assert!(dual.owns(&route("10.244.3.0/24", RTPROT_WEFT, 2)));
        // Another instance's IPv6 network, a v4-only instance, not weft's, the kernel's own.
        assert!(!dual.owns(&route("fd00:11::/64", RTPROT_WEFT, 2)));
        assert!(!v4_only.owns(&route("fd00:10:0:3::/64", RTPROT_WEFT, 2)));
        assert!(!dual.owns(&route("fd00:10:0:3::/64", RTPROT_BOOT, 2)));
        assert!(!dual.owns(&route("fe80::/64", 2, 2)));
        // A v4 network never covers an IPv6 destination (::/0 is not inside 0.0.0.0/0).
        let everything = Owner {
            network: "0.0.0.0/0".parse().expect("net"),
            ..v4_only
        };
        assert!(!everything.owns(&route("::/0", RTPROT_WEFT, 2)));
        // Through its own device, whatever the family.
        let vxlan = Owner {
            device: Some(7),
            ..v4_only
        };
        assert!(vxlan.owns(&route("fd00:99::/64", RTPROT_WEFT, 7)));
        // weft's IPv6 route with another's appended to it as a sibling.
        let mut merged = route("fd00:10:0:3::/64", RTPROT_WEFT, 2);
        merged.multipath = true;
        assert!(!dual.owns(&merged));
    }

    #[test]
    fn only_ipv4_routes_have_a_nexthop_id() {
        let v4: IpNet = "10.244.3.0/24".parse().expect("net");
        assert_eq!(nexthop_id(v4), Some(0x0af4_0300));
        assert_eq!(nexthop_id("0.0.0.0/0".parse().expect("net")), None);
        assert_eq!(nexthop_id("fd00:10::/64".parse().expect("net")), None);
    }
}
