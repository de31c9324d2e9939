//! What vxlan puts in the kernel for each peer, and which requests take the kernel from one
//! peer's state to the next. Pure: the backend judges leases into plans and sends the requests.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::mac::Mac;
use crate::neigh::Entry;

/// The kernel state of one peer.
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
                ip: subnet.network(),
                mac,
            }),
            Self::Direct { .. } => None,
        }
    }

    fn fdb(&self) -> Option<Entry> {
        match *self {
            Self::Overlay { mac, public_ip } => Some(Entry { ip: public_ip, mac }),
            Self::Direct { .. } => None,
        }
    }
}

/// The plans of the peers in the kernel, by subnet, with their VTEP MACs indexed: a MAC may
/// stand for one peer only.
#[derive(Debug, Default)]
pub struct Plans {
    by_subnet: HashMap<Ipv4Net, Plan>,
    macs: HashMap<Mac, Ipv4Net>,
}

impl Plans {
    /// Sets (or with `None` clears) the plan of `subnet`; returns the one it replaces.
    pub fn set(&mut self, subnet: Ipv4Net, plan: Option<Plan>) -> Option<Plan> {
        let old = match plan {
            Some(p) => self.by_subnet.insert(subnet, p),
            None => self.by_subnet.remove(&subnet),
        };
        if let Some(Plan::Overlay { mac, .. }) = old {
            if self.macs.get(&mac) == Some(&subnet) {
                self.macs.remove(&mac);
            }
        }
        if let Some(Plan::Overlay { mac, .. }) = plan {
            self.macs.insert(mac, subnet);
        }
        old
    }

    pub fn get(&self, subnet: &Ipv4Net) -> Option<Plan> {
        self.by_subnet.get(subnet).copied()
    }

    /// The subnet whose peer uses `mac`, if any.
    pub fn mac_holder(&self, mac: Mac) -> Option<Ipv4Net> {
        self.macs.get(&mac).copied()
    }

    pub fn iter(&self) -> impl Iterator<Item = (Ipv4Net, Plan)> + '_ {
        self.by_subnet.iter().map(|(s, p)| (*s, *p))
    }

    /// Peers reached through the overlay (one neighbour and one FDB entry each).
    pub fn overlay(&self) -> usize {
        self.macs.len()
    }
}

/// The requests that take some peers from their old plans to new ones, in the order they run:
/// new neighbours and FDB entries first, then routes, then what is no longer wanted, so that no
/// route ever points at a missing neighbour and a changed peer is never without an entry.
#[derive(Debug, Default, PartialEq)]
pub struct Moves {
    /// Added, or replacing the entry of the same address.
    pub arp_add: Vec<Entry>,
    /// Added, or replacing the remote of the same MAC.
    pub fdb_add: Vec<Entry>,
    pub route_put: Vec<(Ipv4Net, Plan)>,
    pub route_remove: Vec<Ipv4Net>,
    pub arp_del: Vec<Entry>,
    pub fdb_del: Vec<Entry>,
}

impl Moves {
    /// Notes that the peer of `subnet` goes from `old` to `new` (`None`: not in the kernel).
    pub fn peer(&mut self, subnet: Ipv4Net, old: Option<Plan>, new: Option<Plan>) {
        if old == new {
            return;
        }
        let (old_n, new_n) = (
            old.and_then(|p| p.neighbour(subnet)),
            new.and_then(|p| p.neighbour(subnet)),
        );
        if old_n != new_n {
            match (new_n, old_n) {
                (Some(n), _) => self.arp_add.push(n),
                (None, Some(o)) => self.arp_del.push(o),
                (None, None) => {}
            }
        }
        let (old_f, new_f) = (old.and_then(|p| p.fdb()), new.and_then(|p| p.fdb()));
        if old_f != new_f {
            self.fdb_add.extend(new_f);
            self.fdb_del.extend(old_f);
        }
        match new {
            Some(p) => self.route_put.push((subnet, p)),
            None => self.route_remove.push(subnet),
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

    fn entry(ip: &str, mac: u8) -> Entry {
        Entry {
            ip: ip.parse().expect("ip"),
            mac: Mac([2, 0, 0, 0, 0, mac]),
        }
    }

    #[test]
    fn a_new_peer_gets_neighbour_fdb_and_route_and_a_leaving_one_loses_them() {
        let s = net("10.5.7.0/24");
        let mut add = Moves::default();
        add.peer(s, None, Some(overlay(1, "192.168.1.7")));
        assert_eq!(add.arp_add, [entry("10.5.7.0", 1)]);
        assert_eq!(add.fdb_add, [entry("192.168.1.7", 1)]);
        assert_eq!(add.route_put, [(s, overlay(1, "192.168.1.7"))]);
        assert!(add.arp_del.is_empty() && add.fdb_del.is_empty() && add.route_remove.is_empty());

        let mut gone = Moves::default();
        gone.peer(s, Some(overlay(1, "192.168.1.7")), None);
        assert_eq!(gone.route_remove, [s]);
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
            Some(overlay(1, "192.168.1.7")),
            Some(overlay(2, "192.168.1.7")),
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
        m.peer(s, Some(overlay(1, "192.168.1.7")), Some(direct));
        assert_eq!(m.route_put, [(s, direct)]);
        assert_eq!(m.arp_del, [entry("10.5.7.0", 1)]);
        assert_eq!(m.fdb_del, [entry("192.168.1.7", 1)]);
        assert!(m.arp_add.is_empty() && m.fdb_add.is_empty());
    }

    #[test]
    fn an_unchanged_peer_costs_nothing() {
        let mut m = Moves::default();
        let p = Some(overlay(1, "192.168.1.7"));
        m.peer(net("10.5.7.0/24"), p, p);
        m.peer(net("10.5.8.0/24"), None, None);
        assert_eq!(m, Moves::default());
    }

    #[test]
    fn plans_index_each_mac_by_the_subnet_that_holds_it() {
        let mut plans = Plans::default();
        let (a, b) = (net("10.5.1.0/24"), net("10.5.2.0/24"));
        assert_eq!(plans.set(a, Some(overlay(1, "192.168.1.1"))), None);
        assert_eq!(plans.mac_holder(Mac([2, 0, 0, 0, 0, 1])), Some(a));
        plans.set(b, Some(overlay(2, "192.168.1.2")));
        // a takes a new MAC: its old one is free again.
        plans.set(a, Some(overlay(3, "192.168.1.1")));
        assert_eq!(plans.mac_holder(Mac([2, 0, 0, 0, 0, 1])), None);
        assert_eq!(plans.overlay(), 2);
        assert_eq!(plans.set(b, None), Some(overlay(2, "192.168.1.2")));
        assert_eq!((plans.iter().count(), plans.overlay()), (1, 1));
    }
}
