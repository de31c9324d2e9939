//! Random tables and packets against a plain model of the rules: `egress` and `ingress` give
//! exactly the model's verdicts, forwarded headers still checksum, ICMP errors are valid and
//! quote the original, and nothing panics or allocates.

use std::net::{Ipv4Addr, SocketAddrV4};

use ipnet::Ipv4Net;
use proptest::prelude::*;

use super::ipv4::checksum;
use super::tests::{allocations, assert_icmp_error, Packet};
use super::*;

#[derive(Clone, Debug)]
struct Cluster {
    network: Ipv4Net,
    own: Ipv4Net,
    peers: Vec<(Ipv4Net, SocketAddrV4)>,
}

impl Cluster {
    fn table(&self) -> PeerTable {
        PeerTable::new(self.network, self.own, self.peers.iter().copied())
    }

    /// The peers a table keeps: inside the network, clear of this host's lease, first of a
    /// subnet.
    fn kept(&self) -> Vec<(Ipv4Net, SocketAddrV4)> {
        let mut kept: Vec<(Ipv4Net, SocketAddrV4)> = Vec::new();
        for &(n, e) in &self.peers {
            let n = n.trunc();
            let clear = !n.contains(&self.own) && !self.own.contains(&n);
            if self.network.contains(&n) && clear && kept.iter().all(|(k, _)| *k != n) {
                kept.push((n, e));
            }
        }
        kept
    }

    /// Longest-prefix match by scanning every kept peer.
    fn route(&self, dst: Ipv4Addr) -> Option<SocketAddrV4> {
        self.kept()
            .into_iter()
            .filter(|(n, _)| n.contains(&dst))
            .max_by_key(|(n, _)| n.prefix_len())
            .map(|(_, e)| e)
    }

    /// The address `pick` names: somewhere in a peer's subnet, this host's lease, the network,
    /// anywhere, or one of the addresses ICMP rules single out.
    fn addr(&self, pick: (u8, u32)) -> Ipv4Addr {
        let (kind, x) = pick;
        let within = |n: Ipv4Net| within(n, x);
        match kind % 6 {
            0 if !self.peers.is_empty() => within(self.peers[x as usize % self.peers.len()].0),
            1 => within(self.own),
            2 => within(self.network),
            3 => Ipv4Addr::from(x),
            4 => [
                Ipv4Addr::UNSPECIFIED,
                Ipv4Addr::LOCALHOST,
                Ipv4Addr::BROADCAST,
                Ipv4Addr::new(224, 0, 0, 5),
                Ipv4Addr::new(240, 0, 0, 1),
                self.network.broadcast(),
                self.own.broadcast(),
                self.own.network(),
            ][x as usize % 8],
            _ => within(self.own),
        }
    }
}

/// An address in `n`, its host bits taken from `x`.
fn within(n: Ipv4Net, x: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(n.network()) | (x & u32::from(n.hostmask())))
}

fn cluster() -> impl Strategy<Value = Cluster> {
    let peer = (
        any::<u32>(),
        prop_oneof![9 => Just(None), 1 => (0u8..=32).prop_map(Some)],
        0u8..8,
        prop_oneof![Just(8285u16), any::<u16>()],
        prop::bool::weighted(0.05),
    );
    (
        any::<u32>(),
        8u8..=24,
        1u8..=8,
        any::<u32>(),
        prop::collection::vec(peer, 0..40),
    )
        .prop_map(|(base, net_len, extra, own_at, peers)| {
            let network = Ipv4Net::new(Ipv4Addr::from(base), net_len)
                .expect("prefix ≤ 32")
                .trunc();
            let sub_len = (net_len + extra).min(32);
            let subnet = |x: u32, len: u8| {
                let a = u32::from(network.network()) | (x & u32::from(network.hostmask()));
                Ipv4Net::new(Ipv4Addr::from(a), len.max(net_len))
                    .expect("prefix ≤ 32")
                    .trunc()
            };
            let own = subnet(own_at, sub_len);
            let peers = peers
                .into_iter()
                .map(|(x, len, host, port, outside)| {
                    let n = if outside {
                        Ipv4Net::new(Ipv4Addr::from(x), len.unwrap_or(sub_len))
                            .expect("prefix ≤ 32")
                    } else {
                        subnet(x, len.unwrap_or(sub_len))
                    };
                    (n, SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, host), port))
                })
                .collect();
            Cluster {
                network,
                own,
                peers,
            }
        })
}

/// How a packet is built: addresses picked by `Cluster::addr`, then possibly damaged.
#[derive(Clone, Debug)]
struct Spec {
    src: (u8, u32),
    dst: (u8, u32),
    ttl: u8,
    protocol: u8,
    first_payload_byte: u8,
    tos: u8,
    frag: u16,
    option_words: usize,
    payload_len: usize,
    damage: Damage,
}

#[derive(Clone, Debug)]
enum Damage {
    None,
    Flip(usize, u8),
    Cut(usize),
    Grow(usize),
    Replace(Vec<u8>),
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        (any::<u8>(), any::<u32>()),
        (any::<u8>(), any::<u32>()),
        prop_oneof![Just(0u8), Just(1), Just(2), any::<u8>()],
        prop_oneof![Just(17u8), Just(6), Just(1), any::<u8>()],
        prop_oneof![Just(0u8), Just(3), Just(8), Just(11), any::<u8>()],
        any::<u8>(),
        prop_oneof![Just(0u16), Just(0x4000), Just(0x2000), any::<u16>()],
        prop_oneof![3 => Just(0usize), 1 => 0usize..=10],
        prop_oneof![0usize..64, 0usize..1600],
        prop_oneof![
            6 => Just(Damage::None),
            1 => (any::<usize>(), 1u8..).prop_map(|(i, m)| Damage::Flip(i, m)),
            1 => any::<usize>().prop_map(Damage::Cut),
            1 => (1usize..8).prop_map(Damage::Grow),
            1 => prop::collection::vec(any::<u8>(), 0..80).prop_map(Damage::Replace),
        ],
    )
        .prop_map(
            |(
                src,
                dst,
                ttl,
                protocol,
                first_payload_byte,
                tos,
                frag,
                option_words,
                payload_len,
                damage,
            )| {
                Spec {
                    src,
                    dst,
                    ttl,
                    protocol,
                    first_payload_byte,
                    tos,
                    frag,
                    option_words,
                    payload_len,
                    damage,
                }
            },
        )
}

impl Spec {
    /// The packet, from `src` if given.
    fn build(&self, c: &Cluster, src: Option<Ipv4Addr>) -> Vec<u8> {
        let mut payload = vec![0x5a; self.payload_len];
        if let Some(b) = payload.first_mut() {
            *b = self.first_payload_byte;
        }
        let mut p = Packet {
            src: src.unwrap_or_else(|| c.addr(self.src)),
            dst: c.addr(self.dst),
            ttl: self.ttl,
            protocol: self.protocol,
            tos: self.tos,
            frag: self.frag,
            options: vec![1; self.option_words * 4],
            payload,
        }
        .build();
        match &self.damage {
            Damage::None => {}
            Damage::Flip(i, m) => {
                let i = i % p.len();
                p[i] ^= m;
            }
            Damage::Cut(n) => p.truncate(n % p.len()),
            Damage::Grow(n) => p.resize(p.len() + n, 0),
            Damage::Replace(bytes) => p.clone_from(bytes),
        }
        p
    }
}

/// The header fields the model needs, read the plain way.
struct Fields {
    header_len: usize,
    ttl: u8,
    protocol: u8,
    frag_offset: u16,
    src: Ipv4Addr,
    dst: Ipv4Addr,
}

fn model_parse(p: &[u8]) -> Result<Fields, DropReason> {
    if p.is_empty() {
        return Err(DropReason::Truncated);
    }
    if p[0] >> 4 != 4 {
        return Err(DropReason::NotIpv4);
    }
    if p.len() < 20 {
        return Err(DropReason::Truncated);
    }
    let header_len = (p[0] & 15) as usize * 4;
    if header_len < 20 {
        return Err(DropReason::BadHeader);
    }
    if (p[2] as usize) << 8 | p[3] as usize != p.len() {
        return Err(DropReason::BadLength);
    }
    if header_len > p.len() {
        return Err(DropReason::BadHeader);
    }
    let addr = |i: usize| Ipv4Addr::new(p[i], p[i + 1], p[i + 2], p[i + 3]);
    Ok(Fields {
        header_len,
        ttl: p[8],
        protocol: p[9],
        frag_offset: ((p[6] as u16) << 8 | p[7] as u16) & 0x1fff,
        src: addr(12),
        dst: addr(16),
    })
}

fn single_host(a: Ipv4Addr, c: &Cluster) -> bool {
    let o = a.octets()[0];
    let bcast = |n: Ipv4Net| n.prefix_len() < 31 && a == n.broadcast();
    o != 0 && o != 127 && o < 224 && !bcast(c.network) && !bcast(c.own)
}

fn is_broadcast(a: Ipv4Addr, c: &Cluster) -> bool {
    let bcast = |n: Ipv4Net| n.prefix_len() < 31 && a == n.broadcast();
    a == Ipv4Addr::BROADCAST
        || (224..240).contains(&a.octets()[0])
        || bcast(c.network)
        || bcast(c.own)
}

/// What `egress` must answer: a verdict, or an ICMP error (type, code) of a given length.
#[derive(Debug, PartialEq)]
enum Expect {
    Send(SocketAddrV4),
    Icmp(u8, u8, usize),
    Drop(DropReason),
}

fn model_egress(c: &Cluster, p: &[u8], reply_len: usize) -> Expect {
    let f = match model_parse(p) {
        Ok(f) => f,
        Err(r) => return Expect::Drop(r),
    };
    if !c.network.contains(&f.dst) {
        return Expect::Drop(DropReason::OutsideNetwork);
    }
    let (kind, code, reason) = if c.own.contains(&f.dst) {
        (3, 1, DropReason::LocalDestination)
    } else {
        match c.route(f.dst) {
            None => (3, 0, DropReason::NoRoute),
            Some(_) if f.ttl <= 1 => (11, 0, DropReason::TtlExceeded),
            Some(e) => return Expect::Send(e),
        }
    };
    let about_error = f.protocol == 1
        && !matches!(
            p.get(f.header_len),
            Some(0 | 8 | 13 | 14 | 15 | 16 | 17 | 18)
        );
    let room = reply_len.min(576).saturating_sub(28);
    let quote = p.len().min(room);
    let fits = reply_len >= 28 && quote >= p.len().min(f.header_len + 8);
    if f.frag_offset == 0
        && !about_error
        && single_host(f.src, c)
        && !is_broadcast(f.dst, c)
        && fits
    {
        Expect::Icmp(kind, code, 28 + quote)
    } else {
        Expect::Drop(reason)
    }
}

fn model_ingress(c: &Cluster, from: Ipv4Addr, p: &[u8]) -> Result<(), DropReason> {
    let leases: Vec<Ipv4Net> = c
        .kept()
        .into_iter()
        .filter(|(_, e)| *e.ip() == from)
        .map(|(n, _)| n)
        .collect();
    if leases.is_empty() {
        return Err(DropReason::UnknownSender);
    }
    let f = model_parse(p)?;
    if checksum(&p[..f.header_len]) != 0 {
        return Err(DropReason::BadChecksum);
    }
    if !leases.iter().any(|n| n.contains(&f.src)) {
        return Err(DropReason::SourceNotInSenderLease);
    }
    if !c.own.contains(&f.dst) {
        return Err(DropReason::DestinationNotLocal);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn egress_does_exactly_what_the_rules_say(
        c in cluster(),
        s in spec(),
        reply_len in prop_oneof![4 => Just(REPLY_LEN), 1 => 0usize..700],
    ) {
        let table = c.table();
        let original = s.build(&c, None);
        let mut pkt = original.clone();
        let mut reply = vec![0u8; reply_len];
        let before = allocations();
        let verdict = egress(&table, &mut pkt, &mut reply);
        prop_assert_eq!(allocations(), before, "no allocation");

        let expected = model_egress(&c, &original, reply_len);
        match verdict {
            Egress::Send(e) => {
                prop_assert_eq!(Expect::Send(e), expected);
                prop_assert_eq!(pkt[8], original[8] - 1, "TTL one less");
                let header_len = usize::from(pkt[0] & 15) * 4;
                if checksum(&original[..header_len]) == 0 {
                    prop_assert_eq!(checksum(&pkt[..header_len]), 0, "still checksums");
                }
                prop_assert_eq!(&pkt[..8], &original[..8]);
                prop_assert_eq!(&pkt[12..], &original[12..]);
            }
            Egress::Reply(n) => {
                let (kind, code) = (reply[20], reply[21]);
                prop_assert_eq!(Expect::Icmp(kind, code, n), expected);
                assert_icmp_error(&reply[..n], reply_len, &original, c.own, kind, code);
                prop_assert_eq!(&pkt, &original, "left alone");
            }
            Egress::Drop(r) => {
                prop_assert_eq!(Expect::Drop(r), expected);
                prop_assert_eq!(&pkt, &original, "left alone");
            }
        }
    }

    #[test]
    fn ingress_accepts_exactly_what_the_rules_allow(
        c in cluster(),
        s in spec(),
        from in prop_oneof![
            3 => (0u8..8).prop_map(|h| Ipv4Addr::new(192, 0, 2, h)),
            1 => any::<u32>().prop_map(Ipv4Addr::from),
        ],
        port in any::<u16>(),
        sender in prop::option::weighted(0.7, any::<usize>()),
    ) {
        let table = c.table();
        // Mostly a peer sending from its own lease, so that the later checks get their turn.
        let (from, src) = match sender {
            Some(i) if !c.peers.is_empty() => {
                let (n, e) = c.peers[i % c.peers.len()];
                (*e.ip(), Some(within(n, s.src.1)))
            }
            _ => (from, None),
        };
        let pkt = s.build(&c, src);
        let before = allocations();
        let verdict = ingress(&table, SocketAddrV4::new(from, port), &pkt);
        prop_assert_eq!(allocations(), before, "no allocation");
        prop_assert_eq!(verdict, model_ingress(&c, from, &pkt));
    }

    #[test]
    fn lookup_is_the_longest_prefix_match_over_the_kept_peers(
        c in cluster(),
        picks in prop::collection::vec((any::<u8>(), any::<u32>()), 1..20),
    ) {
        let table = c.table();
        prop_assert_eq!(table.len(), c.kept().len());
        for pick in picks {
            let dst = c.addr(pick);
            prop_assert_eq!(table.lookup(dst), c.route(dst), "{}", dst);
        }
        for (n, e) in c.kept() {
            prop_assert!(table.sender_subnets(*e.ip()).contains(&n));
        }
    }

    #[test]
    fn random_bytes_never_panic(
        c in cluster(),
        mut bytes in prop::collection::vec(any::<u8>(), 0..200),
        from in any::<u32>(),
    ) {
        let table = c.table();
        let _ = ingress(&table, SocketAddrV4::new(Ipv4Addr::from(from), 8285), &bytes);
        let mut reply = [0u8; REPLY_LEN];
        let _ = egress(&table, &mut bytes, &mut reply);
    }
}
