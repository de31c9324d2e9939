//! Who owns which subnet: the immutable snapshot the workers read on every packet.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher, RandomState};
use std::net::{Ipv4Addr, SocketAddrV4};

use ipnet::Ipv4Net;

/// Immutable snapshot of who owns which subnet; swapped whole on reconcile (readers never lock).
///
/// What `new` keeps: only peers whose subnet lies inside the network and does not overlap this
/// host's lease. Others would route this host's or foreign traffic into the tunnel, so they are
/// left out (their datagrams then count as `UnknownSender`). Of two peers with the same subnet the
/// first one given wins; of overlapping subnets of different lengths the longest prefix wins, as
/// in a routing table.
#[derive(Clone, Debug)]
pub struct PeerTable {
    network: Ipv4Net,
    own: Ipv4Net,
    /// One level per prefix length, longest first. All peers share flannel's SubnetLen in a
    /// normal cluster, so a lookup is one hash probe.
    levels: Vec<Level>,
    /// PublicIP → its range in `sender_nets`.
    senders: HashMap<u32, (u32, u32), SeededHash>,
    /// The kept peers' subnets, grouped by PublicIP, each group in ascending order.
    sender_nets: Vec<Ipv4Net>,
}

#[derive(Clone, Debug)]
struct Level {
    mask: u32,
    /// Masked network address → endpoint.
    routes: HashMap<u32, SocketAddrV4, SeededHash>,
}

impl PeerTable {
    /// network: the cluster network; own: this host's lease subnet; peers: (peer subnet,
    /// endpoint = peer PublicIP:port). Peers whose subnets overlap `own` or each other, or lie
    /// outside the network, are the caller's business to have rejected; this never panics on
    /// them (see the type's doc for what is kept).
    pub fn new(
        network: Ipv4Net,
        own: Ipv4Net,
        peers: impl IntoIterator<Item = (Ipv4Net, SocketAddrV4)>,
    ) -> Self {
        let network = network.trunc();
        let own = own.trunc();
        let hash = SeededHash::new();
        let mut levels: Vec<(u8, Level)> = Vec::new();
        let mut kept: Vec<(u32, Ipv4Net)> = Vec::new();
        for (subnet, endpoint) in peers {
            let subnet = subnet.trunc();
            if !network.contains(&subnet) || subnet.contains(&own) || own.contains(&subnet) {
                continue;
            }
            let len = subnet.prefix_len();
            let i = match levels.iter().position(|(l, _)| *l == len) {
                Some(i) => i,
                None => {
                    levels.push((
                        len,
                        Level {
                            mask: u32::from(subnet.netmask()),
                            routes: HashMap::with_hasher(hash),
                        },
                    ));
                    levels.len() - 1
                }
            };
            let routes = &mut levels[i].1.routes;
            let key = u32::from(subnet.network());
            if routes.contains_key(&key) {
                continue;
            }
            routes.insert(key, endpoint);
            kept.push((u32::from(*endpoint.ip()), subnet));
        }
        levels.sort_by_key(|(len, _)| std::cmp::Reverse(*len));

        kept.sort_unstable();
        let mut senders = HashMap::with_capacity_and_hasher(kept.len(), hash);
        let mut start = 0;
        for group in kept.chunk_by(|a, b| a.0 == b.0) {
            // At most u32::MAX peers: more than IPv4 has subnets, so the casts cannot truncate.
            senders.insert(group[0].0, (start as u32, group.len() as u32));
            start += group.len();
        }
        Self {
            network,
            own,
            levels: levels.into_iter().map(|(_, l)| l).collect(),
            senders,
            sender_nets: kept.into_iter().map(|(_, n)| n).collect(),
        }
    }

    /// A table with no peers.
    pub fn empty(network: Ipv4Net, own: Ipv4Net) -> Self {
        Self::new(network, own, [])
    }

    /// The endpoint whose subnet holds dst (longest prefix first). One hash probe per distinct
    /// peer prefix length: one in a normal cluster, whatever its size.
    pub fn lookup(&self, dst: Ipv4Addr) -> Option<SocketAddrV4> {
        let dst = u32::from(dst);
        self.levels
            .iter()
            .find_map(|l| l.routes.get(&(dst & l.mask)).copied())
    }

    /// The subnet of the peer whose PublicIP is `ip` (for receive checks). When one PublicIP
    /// holds several leases (hosts sharing an address), this is the lowest of them; `ingress`
    /// accepts a source in any of them (`sender_subnets`).
    pub fn sender_subnet(&self, ip: Ipv4Addr) -> Option<Ipv4Net> {
        self.sender_subnets(ip).first().copied()
    }

    /// Every subnet held by the peer(s) at PublicIP `ip`, in ascending order; empty for a stranger.
    pub fn sender_subnets(&self, ip: Ipv4Addr) -> &[Ipv4Net] {
        match self.senders.get(&u32::from(ip)) {
            Some(&(start, len)) => {
                let start = start as usize;
                self.sender_nets
                    .get(start..start + len as usize)
                    .unwrap_or_default()
            }
            None => &[],
        }
    }

    /// How many peers the table routes to.
    pub fn len(&self) -> usize {
        self.sender_nets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sender_nets.is_empty()
    }

    /// This host's lease subnet.
    pub fn own(&self) -> Ipv4Net {
        self.own
    }

    /// The cluster network.
    pub fn network(&self) -> Ipv4Net {
        self.network
    }
}

/// Hashes the u32 keys of the table with a seeded 64-bit finaliser (MurmurHash3's fmix64): a few
/// multiplies where SipHash costs ~20 ns a packet, while the per-table random seed keeps anyone
/// who can write leases from lining all subnets up in one bucket. Not worth a crate (rustc-hash,
/// ahash) for one integer mixer.
#[derive(Clone, Copy, Debug)]
struct SeededHash(u64);

impl SeededHash {
    fn new() -> Self {
        Self(RandomState::new().hash_one(0x5eed_u64))
    }
}

impl BuildHasher for SeededHash {
    type Hasher = U32Hasher;
    fn build_hasher(&self) -> U32Hasher {
        U32Hasher(self.0)
    }
}

struct U32Hasher(u64);

impl Hasher for U32Hasher {
    fn write(&mut self, bytes: &[u8]) {
        // Only u32 keys are hashed; this keeps the trait whole without being on any path.
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.0 ^= u64::from(n);
    }

    fn finish(&self) -> u64 {
        let mut h = self.0;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^ (h >> 33)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().expect("test network")
    }

    fn ep(s: &str) -> SocketAddrV4 {
        s.parse().expect("test endpoint")
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().expect("test address")
    }

    fn table(peers: &[(&str, &str)]) -> PeerTable {
        PeerTable::new(
            net("10.244.0.0/16"),
            net("10.244.52.0/24"),
            peers.iter().map(|(n, e)| (net(n), ep(e))),
        )
    }

    #[test]
    fn lookup_finds_the_peer_whose_subnet_holds_the_address() {
        let t = table(&[
            ("10.244.1.0/24", "192.0.2.1:8285"),
            ("10.244.2.0/24", "192.0.2.2:8285"),
        ]);
        assert_eq!(t.lookup(ip("10.244.1.0")), Some(ep("192.0.2.1:8285")));
        assert_eq!(t.lookup(ip("10.244.2.77")), Some(ep("192.0.2.2:8285")));
        assert_eq!(t.lookup(ip("10.244.2.255")), Some(ep("192.0.2.2:8285")));
        assert_eq!(t.lookup(ip("10.244.3.1")), None);
        assert_eq!(t.lookup(ip("10.245.1.1")), None);
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn with_mixed_prefix_lengths_the_longest_prefix_wins() {
        let t = table(&[
            ("10.244.0.0/20", "192.0.2.1:8285"),
            ("10.244.1.0/24", "192.0.2.2:8285"),
            ("10.244.1.128/25", "192.0.2.3:8285"),
        ]);
        assert_eq!(t.lookup(ip("10.244.1.200")), Some(ep("192.0.2.3:8285")));
        assert_eq!(t.lookup(ip("10.244.1.100")), Some(ep("192.0.2.2:8285")));
        assert_eq!(t.lookup(ip("10.244.7.1")), Some(ep("192.0.2.1:8285")));
        assert_eq!(t.lookup(ip("10.244.16.1")), None);
    }

    #[test]
    fn peers_outside_the_network_or_overlapping_this_host_are_left_out() {
        let t = table(&[
            ("10.245.1.0/24", "192.0.2.1:8285"),  // outside the network
            ("10.244.52.0/24", "192.0.2.2:8285"), // this host's own subnet
            ("10.244.52.0/25", "192.0.2.3:8285"), // inside it
            ("10.244.48.0/20", "192.0.2.4:8285"), // around it
            ("0.0.0.0/0", "192.0.2.5:8285"),      // everything
            ("10.244.9.0/24", "192.0.2.6:8285"),  // fine
        ]);
        assert_eq!(t.len(), 1);
        assert_eq!(t.lookup(ip("10.244.52.7")), None);
        assert_eq!(t.lookup(ip("10.244.49.1")), None);
        assert_eq!(t.lookup(ip("10.245.1.1")), None);
        for s in [
            "192.0.2.1",
            "192.0.2.2",
            "192.0.2.3",
            "192.0.2.4",
            "192.0.2.5",
        ] {
            assert_eq!(t.sender_subnet(ip(s)), None, "{s}");
        }
        assert_eq!(t.sender_subnet(ip("192.0.2.6")), Some(net("10.244.9.0/24")));
    }

    #[test]
    fn of_two_peers_with_one_subnet_the_first_wins() {
        let t = table(&[
            ("10.244.1.0/24", "192.0.2.1:8285"),
            ("10.244.1.0/24", "192.0.2.2:8285"),
        ]);
        assert_eq!(t.len(), 1);
        assert_eq!(t.lookup(ip("10.244.1.1")), Some(ep("192.0.2.1:8285")));
        assert_eq!(t.sender_subnet(ip("192.0.2.2")), None);
    }

    #[test]
    fn host_bits_in_a_subnet_are_ignored() {
        let t = table(&[("10.244.1.9/24", "192.0.2.1:8285")]);
        assert_eq!(t.lookup(ip("10.244.1.200")), Some(ep("192.0.2.1:8285")));
        assert_eq!(t.sender_subnet(ip("192.0.2.1")), Some(net("10.244.1.0/24")));
    }

    #[test]
    fn sender_subnet_names_the_lease_of_a_public_ip_whatever_the_port() {
        let t = table(&[
            ("10.244.1.0/24", "192.0.2.1:8285"),
            ("10.244.2.0/24", "192.0.2.2:9999"),
        ]);
        assert_eq!(t.sender_subnet(ip("192.0.2.2")), Some(net("10.244.2.0/24")));
        assert_eq!(t.sender_subnet(ip("192.0.2.3")), None);
    }

    #[test]
    fn a_public_ip_with_several_leases_lists_them_all_lowest_first() {
        let t = table(&[
            ("10.244.7.0/24", "192.0.2.1:8285"),
            ("10.244.3.0/24", "192.0.2.1:8285"),
            ("10.244.5.0/24", "192.0.2.9:8285"),
        ]);
        assert_eq!(
            t.sender_subnets(ip("192.0.2.1")),
            [net("10.244.3.0/24"), net("10.244.7.0/24")]
        );
        assert_eq!(t.sender_subnet(ip("192.0.2.1")), Some(net("10.244.3.0/24")));
        assert_eq!(t.sender_subnets(ip("192.0.2.9")), [net("10.244.5.0/24")]);
        assert!(t.sender_subnets(ip("192.0.2.8")).is_empty());
    }

    #[test]
    fn an_empty_table_routes_nothing() {
        let t = PeerTable::empty(net("10.244.0.0/16"), net("10.244.52.0/24"));
        assert!(t.is_empty());
        assert_eq!(t.lookup(ip("10.244.1.1")), None);
        assert_eq!(t.network(), net("10.244.0.0/16"));
        assert_eq!(t.own(), net("10.244.52.0/24"));
    }

    #[test]
    fn ten_thousand_peers_on_one_prefix_length_make_one_level() {
        let peers = (0..10_000u32).map(|i| {
            let subnet =
                Ipv4Net::new(Ipv4Addr::from(0x0a00_0000 | ((i + 1) << 8)), 24).expect("a /24");
            (
                subnet,
                SocketAddrV4::new(Ipv4Addr::from(0xc000_0000 | i), 8285),
            )
        });
        let t = PeerTable::new(net("10.0.0.0/8"), net("10.0.0.0/24"), peers);
        assert_eq!(t.len(), 10_000);
        assert_eq!(t.levels.len(), 1);
        assert_eq!(
            t.lookup(ip("10.39.16.5")),
            Some(SocketAddrV4::new(Ipv4Addr::from(0xc000_0000 | 9999), 8285))
        );
    }
}
