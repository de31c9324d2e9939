//! What vxlan puts in the kernel for each peer, and which requests take the kernel from one
//! peer's state to the next. Pure: the backend judges leases into plans and sends the requests.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::mac::Mac;
use crate::neigh::Entry;

/// The kernel state of one peer's IPv4 side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Through the overlay: neighbour (the peer's network address → its VTEP MAC), FDB entry
    /// (VTEP MAC → PublicIP), route `subnet via network-address dev flannel.<VNI> onlink`.
    Overlay { mac: Mac, public_ip: Ipv4Addr },
    /// DirectRouting, the peer on a directly connected network: a plain route via its PublicIP
    /// on the underlay.
    Direct { public_ip: Ipv4Addr },
}

impl Plan {
    fn neighbour(&self, subnet: Ipv4Net) -> Option<Entry> {
        match *self {
            Self::Overlay { mac, .. } => Some(Entry {
                ip: subnet.network().into(),
                mac,
            }),
            Self::Direct { .. } => None,
        }
    }

    fn fdb(&self) -> Option<Entry> {
        match *self {
            Self::Overlay { mac, public_ip } => Some(Entry {
                ip: public_ip.into(),
                mac,
            }),
            Self::Direct { .. } => None,
        }
    }
}

/// The kernel state of a peer's IPv6 side, on a dual-stack host: the same two ways, for its IPv6
/// subnet, through `flannel-v6.<VNI>` (its BackendV6Data's VTEP MAC, its PublicIPv6) or directly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan6 {
    Overlay {
        subnet: Ipv6Net,
        mac: Mac,
        public_ip: Ipv6Addr,
    },
    Direct {
        subnet: Ipv6Net,
        public_ip: Ipv6Addr,
    },
}

impl Plan6 {
    pub fn subnet(&self) -> Ipv6Net {
        match *self {
            Self::Overlay { subnet, .. } | Self::Direct { subnet, .. } => subnet,
        }
    }

    /// The VTEP MAC of `flannel-v6.<VNI>` it uses, if it goes through the overlay.
    pub fn mac(&self) -> Option<Mac> {
        match *self {
            Self::Overlay { mac, .. } => Some(mac),
            Self::Direct { .. } => None,
        }
    }

    fn neighbour(&self) -> Option<Entry> {
        match *self {
            Self::Overlay { subnet, mac, .. } => Some(Entry {
                ip: subnet.network().into(),
                mac,
            }),
            Self::Direct { .. } => None,
        }
    }

    fn fdb(&self) -> Option<Entry> {
        match *self {
            Self::Overlay { mac, public_ip, .. } => Some(Entry {
                ip: public_ip.into(),
                mac,
            }),
            Self::Direct { .. } => None,
        }
    }
}

/// Everything one peer has in the kernel: its IPv4 side, and its IPv6 side when both hosts are
/// dual-stack and it publishes one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerPlan {
    pub v4: Plan,
    pub v6: Option<Plan6>,
}

impl From<Plan> for PeerPlan {
    fn from(v4: Plan) -> Self {
        Self { v4, v6: None }
    }
}

impl PeerPlan {
    fn mac6(&self) -> Option<Mac> {
        self.v6.and_then(|p| p.mac())
    }
}

/// How [`Plans::admit`] settled a peer whose IPv6 VTEP MAC another peer publishes too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admitted {
    /// In, with nobody in its way.
    In,
    /// In, and the peer of `loser` (a higher subnet) out: its plan was `old`.
    Displacing {
        loser: Ipv4Net,
        old: PeerPlan,
        mac: Mac,
    },
    /// Out: the peer of `holder` (a lower subnet) keeps `mac`.
    Refused { holder: Ipv4Net, mac: Mac },
}

/// The plans of the peers in the kernel, by subnet, with their VTEP MACs indexed (one index per
/// device): a MAC may stand for one peer only.
#[derive(Debug, Default)]
pub struct Plans {
    by_subnet: HashMap<Ipv4Net, PeerPlan>,
    macs: HashMap<Mac, Ipv4Net>,
    macs6: HashMap<Mac, Ipv4Net>,
}

impl Plans {
    /// Sets (or with `None` clears) the plan of `subnet`; returns the one it replaces.
    pub fn set(&mut self, subnet: Ipv4Net, plan: Option<PeerPlan>) -> Option<PeerPlan> {
        let old = match plan {
            Some(p) => self.by_subnet.insert(subnet, p),
            None => self.by_subnet.remove(&subnet),
        };
        if let Some(old) = old {
            if let Plan::Overlay { mac, .. } = old.v4 {
                if self.macs.get(&mac) == Some(&subnet) {
                    self.macs.remove(&mac);
                }
            }
            if let Some(mac) = old.mac6() {
                if self.macs6.get(&mac) == Some(&subnet) {
                    self.macs6.remove(&mac);
                }
            }
        }
        if let Some(p) = plan {
            if let Plan::Overlay { mac, .. } = p.v4 {
                self.macs.insert(mac, subnet);
            }
            if let Some(mac) = p.mac6() {
                self.macs6.insert(mac, subnet);
            }
        }
        old
    }

    /// Sets the plan of `subnet` unless its IPv6 VTEP MAC is another peer's: then the lower
    /// subnet keeps it, whichever came first, so every pass and every order of arrival ends
    /// the same way. The other peer is out as a whole (as host-gw refuses a peer whose IPv6 side
    /// it cannot route): no half-programmed peers.
    pub fn admit(&mut self, subnet: Ipv4Net, plan: PeerPlan) -> Admitted {
        let holder = (plan.mac6())
            .and_then(|m| Some((self.mac6_holder(m)?, m)))
            .filter(|(h, _)| *h != subnet);
        let admitted = match holder {
            Some((holder, mac)) if holder < subnet => return Admitted::Refused { holder, mac },
            Some((loser, mac)) => match self.set(loser, None) {
                Some(old) => Admitted::Displacing { loser, old, mac },
                None => Admitted::In,
            },
            None => Admitted::In,
        };
        self.set(subnet, Some(plan));
        admitted
    }

    pub fn get(&self, subnet: &Ipv4Net) -> Option<PeerPlan> {
        self.by_subnet.get(subnet).copied()
    }

    /// The subnet whose peer uses `mac` on `flannel.<VNI>`, if any.
    pub fn mac_holder(&self, mac: Mac) -> Option<Ipv4Net> {
        self.macs.get(&mac).copied()
    }

    /// The subnet whose peer uses `mac` on `flannel-v6.<VNI>`, if any.
    pub fn mac6_holder(&self, mac: Mac) -> Option<Ipv4Net> {
        self.macs6.get(&mac).copied()
    }

    pub fn iter(&self) -> impl Iterator<Item = (Ipv4Net, PeerPlan)> + '_ {
        self.by_subnet.iter().map(|(s, p)| (*s, *p))
    }

    /// Peers reached through the overlay over IPv4 (one neighbour and one FDB entry each on
    /// `flannel.<VNI>`).
    pub fn overlay(&self) -> usize {
        self.macs.len()
    }

    /// Peers reached through the overlay over IPv6 (one of each on `flannel-v6.<VNI>`).
    pub fn overlay6(&self) -> usize {
        self.macs6.len()
    }
}

/// The requests that take some peers from their old plans to new ones, in the order they run:
/// new neighbours and FDB entries first, then routes, then what is no longer wanted, so that no
/// route ever points at a missing neighbour and a changed peer is never without an entry.
#[derive(Debug, Default, PartialEq)]
pub struct Moves {
    /// Added, or replacing the entry of the same address (`flannel.<VNI>`).
    pub arp_add: Vec<Entry>,
    /// Added, or replacing the remote of the same MAC (`flannel.<VNI>`).
    pub fdb_add: Vec<Entry>,
    /// The same two on `flannel-v6.<VNI>`.
    pub nd_add: Vec<Entry>,
    pub fdb6_add: Vec<Entry>,
    pub route_put: Vec<(Ipv4Net, Plan)>,
    pub route_put6: Vec<Plan6>,
    /// Routes of either family.
    pub route_remove: Vec<IpNet>,
    pub arp_del: Vec<Entry>,
    pub fdb_del: Vec<Entry>,
    pub nd_del: Vec<Entry>,
    pub fdb6_del: Vec<Entry>,
}

impl Moves {
    /// Notes that the peer of `subnet` goes from `old` to `new` (`None`: not in the kernel).
    pub fn peer(&mut self, subnet: Ipv4Net, old: Option<PeerPlan>, new: Option<PeerPlan>) {
        if old == new {
            return;
        }
        let (old4, new4) = (old.map(|p| p.v4), new.map(|p| p.v4));
        if old4 != new4 {
            let (old_n, new_n) = (
                old4.and_then(|p| p.neighbour(subnet)),
                new4.and_then(|p| p.neighbour(subnet)),
            );
            if old_n != new_n {
                match (new_n, old_n) {
                    (Some(n), _) => self.arp_add.push(n),
                    (None, Some(o)) => self.arp_del.push(o),
                    (None, None) => {}
                }
            }
            let (old_f, new_f) = (old4.and_then(|p| p.fdb()), new4.and_then(|p| p.fdb()));
            if old_f != new_f {
                self.fdb_add.extend(new_f);
                self.fdb_del.extend(old_f);
            }
            match new4 {
                Some(p) => self.route_put.push((subnet, p)),
                None => self.route_remove.push(subnet.into()),
            }
        }
        self.peer6(old.and_then(|p| p.v6), new.and_then(|p| p.v6));
    }

    /// A peer's IPv6 side, which unlike the IPv4 one may change subnet: the old subnet's
    /// neighbour and route then go beside the new ones' arrival.
    fn peer6(&mut self, old: Option<Plan6>, new: Option<Plan6>) {
        if old == new {
            return;
        }
        let (old_n, new_n) = (
            old.and_then(|p| p.neighbour()),
            new.and_then(|p| p.neighbour()),
        );
        if old_n != new_n {
            self.nd_add.extend(new_n);
            // One of the same address is replaced by the add.
            self.nd_del
                .extend(old_n.filter(|o| new_n.map(|n| n.ip) != Some(o.ip)));
        }
        let (old_f, new_f) = (old.and_then(|p| p.fdb()), new.and_then(|p| p.fdb()));
        if old_f != new_f {
            self.fdb6_add.extend(new_f);
            self.fdb6_del.extend(old_f);
        }
        self.route_put6.extend(new);
        if let Some(o) = old.filter(|o| new.map(|n| n.subnet()) != Some(o.subnet())) {
            self.route_remove.push(o.subnet().into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().expect("subnet")
    }

    fn overlay(mac: u8, ip: &str) -> Plan {
        Plan::Overlay {
            mac: Mac([2, 0, 0, 0, 0, mac]),
            public_ip: ip.parse().expect("ip"),
        }
    }

    fn overlay6(subnet: &str, mac: u8, ip: &str) -> Plan6 {
        Plan6::Overlay {
            subnet: subnet.parse().expect("subnet"),
            mac: Mac([2, 0, 0, 0, 6, mac]),
            public_ip: ip.parse().expect("ip"),
        }
    }

    fn dual(mac: u8, ip: &str, v6: Plan6) -> Option<PeerPlan> {
        Some(PeerPlan {
            v4: overlay(mac, ip),
            v6: Some(v6),
        })
    }

    fn entry(ip: &str, mac: u8) -> Entry {
        Entry {
            ip: ip.parse().expect("ip"),
            mac: Mac([2, 0, 0, 0, 0, mac]),
        }
    }

    fn entry6(ip: &str, mac: u8) -> Entry {
        Entry {
            ip: ip.parse().expect("ip"),
            mac: Mac([2, 0, 0, 0, 6, mac]),
        }
    }

    fn v4(p: Plan) -> Option<PeerPlan> {
        Some(p.into())
    }

    #[test]
    fn a_new_peer_gets_neighbour_fdb_and_route_and_a_leaving_one_loses_them() {
        let s = net("10.5.7.0/24");
        let mut add = Moves::default();
        add.peer(s, None, v4(overlay(1, "192.168.1.7")));
        assert_eq!(add.arp_add, [entry("10.5.7.0", 1)]);
        assert_eq!(add.fdb_add, [entry("192.168.1.7", 1)]);
        assert_eq!(add.route_put, [(s, overlay(1, "192.168.1.7"))]);
        assert!(add.arp_del.is_empty() && add.fdb_del.is_empty() && add.route_remove.is_empty());

        let mut gone = Moves::default();
        gone.peer(s, v4(overlay(1, "192.168.1.7")), None);
        assert_eq!(gone.route_remove, [IpNet::from(s)]);
        assert_eq!(gone.arp_del, [entry("10.5.7.0", 1)]);
        assert_eq!(gone.fdb_del, [entry("192.168.1.7", 1)]);
        assert!(gone.arp_add.is_empty() && gone.fdb_add.is_empty() && gone.route_put.is_empty());
    }

    #[test]
    fn a_new_vtep_mac_replaces_the_neighbour_and_swaps_the_fdb_entry() {
        let s = net("10.5.7.0/24");
        let mut m = Moves::default();
        m.peer(
            s,
            v4(overlay(1, "192.168.1.7")),
            v4(overlay(2, "192.168.1.7")),
        );
        // The neighbour is replaced in place: nothing to delete.
        assert_eq!(m.arp_add, [entry("10.5.7.0", 2)]);
        assert!(m.arp_del.is_empty());
        assert_eq!(m.fdb_add, [entry("192.168.1.7", 2)]);
        assert_eq!(m.fdb_del, [entry("192.168.1.7", 1)]);
    }

    #[test]
    fn a_peer_moving_onto_a_connected_network_drops_its_overlay_entries() {
        let s = net("10.5.7.0/24");
        let direct = Plan::Direct {
            public_ip: "192.168.1.7".parse().expect("ip"),
        };
        let mut m = Moves::default();
        m.peer(s, v4(overlay(1, "192.168.1.7")), v4(direct));
        assert_eq!(m.route_put, [(s, direct)]);
        assert_eq!(m.arp_del, [entry("10.5.7.0", 1)]);
        assert_eq!(m.fdb_del, [entry("192.168.1.7", 1)]);
        assert!(m.arp_add.is_empty() && m.fdb_add.is_empty());
    }

    #[test]
    fn an_unchanged_peer_costs_nothing() {
        let mut m = Moves::default();
        let p = v4(overlay(1, "192.168.1.7"));
        m.peer(net("10.5.7.0/24"), p, p);
        m.peer(net("10.5.8.0/24"), None, None);
        let d = dual(
            1,
            "192.168.1.7",
            overlay6("fd00:5:0:7::/64", 1, "fd00:1::7"),
        );
        m.peer(net("10.5.7.0/24"), d, d);
        assert_eq!(m, Moves::default());
    }

    #[test]
    fn plans_index_each_mac_by_the_subnet_that_holds_it() {
        let mut plans = Plans::default();
        let (a, b) = (net("10.5.1.0/24"), net("10.5.2.0/24"));
        assert_eq!(plans.set(a, v4(overlay(1, "192.168.1.1"))), None);
        assert_eq!(plans.mac_holder(Mac([2, 0, 0, 0, 0, 1])), Some(a));
        plans.set(b, v4(overlay(2, "192.168.1.2")));
        // a takes a new MAC: its old one is free again.
        plans.set(a, v4(overlay(3, "192.168.1.1")));
        assert_eq!(plans.mac_holder(Mac([2, 0, 0, 0, 0, 1])), None);
        assert_eq!(plans.overlay(), 2);
        assert_eq!(plans.set(b, None), v4(overlay(2, "192.168.1.2")));
        assert_eq!((plans.iter().count(), plans.overlay()), (1, 1));
    }

    #[test]
    fn a_dual_stack_peer_gets_entries_on_both_devices_and_a_route_per_family() {
        let s = net("10.5.7.0/24");
        let six = overlay6("fd00:5:0:7::/64", 1, "fd00:1::7");
        let mut add = Moves::default();
        add.peer(s, None, dual(1, "192.168.1.7", six));
        assert_eq!(add.arp_add, [entry("10.5.7.0", 1)]);
        assert_eq!(add.fdb_add, [entry("192.168.1.7", 1)]);
        assert_eq!(add.nd_add, [entry6("fd00:5:0:7::", 1)]);
        assert_eq!(add.fdb6_add, [entry6("fd00:1::7", 1)]);
        assert_eq!(add.route_put, [(s, overlay(1, "192.168.1.7"))]);
        assert_eq!(add.route_put6, [six]);

        let mut gone = Moves::default();
        gone.peer(s, dual(1, "192.168.1.7", six), None);
        let v6: Ipv6Net = "fd00:5:0:7::/64".parse().expect("subnet");
        assert_eq!(gone.route_remove, [IpNet::from(s), IpNet::from(v6)]);
        assert_eq!(gone.nd_del, [entry6("fd00:5:0:7::", 1)]);
        assert_eq!(gone.fdb6_del, [entry6("fd00:1::7", 1)]);
        assert_eq!(gone.arp_del.len() + gone.fdb_del.len(), 2);
    }

    #[test]
    fn an_ipv6_side_that_changes_touches_only_the_ipv6_device_and_route() {
        let s = net("10.5.7.0/24");
        let old = overlay6("fd00:5:0:7::/64", 1, "fd00:1::7");
        // A new IPv6 subnet and a new PublicIPv6: the old neighbour and route go.
        let new = overlay6("fd00:5:0:8::/64", 1, "fd00:1::8");
        let mut m = Moves::default();
        m.peer(s, dual(1, "192.168.1.7", old), dual(1, "192.168.1.7", new));
        assert!(m.arp_add.is_empty() && m.fdb_add.is_empty() && m.route_put.is_empty());
        assert_eq!(m.nd_add, [entry6("fd00:5:0:8::", 1)]);
        assert_eq!(m.nd_del, [entry6("fd00:5:0:7::", 1)]);
        assert_eq!(m.fdb6_add, [entry6("fd00:1::8", 1)]);
        assert_eq!(m.fdb6_del, [entry6("fd00:1::7", 1)]);
        assert_eq!(m.route_put6, [new]);
        let v6: Ipv6Net = "fd00:5:0:7::/64".parse().expect("subnet");
        assert_eq!(m.route_remove, [IpNet::from(v6)]);

        // The IPv6 side dropped (no PublicIPv6 any more): only its entries and route go.
        let mut m = Moves::default();
        m.peer(
            s,
            dual(1, "192.168.1.7", old),
            v4(overlay(1, "192.168.1.7")),
        );
        assert_eq!(m.nd_del, [entry6("fd00:5:0:7::", 1)]);
        assert_eq!(m.fdb6_del, [entry6("fd00:1::7", 1)]);
        assert_eq!(m.route_remove, [IpNet::from(v6)]);
        assert!(m.route_put.is_empty() && m.arp_del.is_empty());
    }

    #[test]
    fn the_lower_subnet_keeps_an_ipv6_vtep_mac_whichever_came_first() {
        let (low, high) = (net("10.5.1.0/24"), net("10.5.2.0/24"));
        let p = |n: u8| {
            dual(
                n,
                "192.168.1.1",
                overlay6("fd00:5:0:1::/64", 9, "fd00:1::1"),
            )
        };
        let (pl, ph) = (p(1).expect("plan"), p(2).expect("plan"));
        let mac = Mac([2, 0, 0, 0, 6, 9]);

        let mut first_low = Plans::default();
        assert_eq!(first_low.admit(low, pl), Admitted::In);
        assert_eq!(
            first_low.admit(high, ph),
            Admitted::Refused { holder: low, mac }
        );

        let mut first_high = Plans::default();
        assert_eq!(first_high.admit(high, ph), Admitted::In);
        assert_eq!(
            first_high.admit(low, pl),
            Admitted::Displacing {
                loser: high,
                old: ph,
                mac
            }
        );
        for plans in [&first_low, &first_high] {
            assert_eq!(plans.mac6_holder(mac), Some(low));
            assert_eq!(plans.get(&high), None, "refused as a whole");
            assert_eq!((plans.overlay(), plans.overlay6()), (1, 1));
        }
        // A peer's own new plan never contends with its old one.
        assert_eq!(first_low.admit(low, pl), Admitted::In);
    }
}
