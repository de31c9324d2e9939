//! Which TUN queue a packet written to the device goes through, by its flow.
//!
//! A multi-queue TUN device sends each flow out through the queue that last wrote a packet of
//! that flow (the kernel's "automq" flow table, keyed by a hash that is the same both ways). So
//! whichever queue a worker writes a flow's incoming packets to is the queue, and the worker,
//! that then reads the flow's outgoing packets. Writing every packet through the worker's own
//! queue would put every flow of one peer on the worker that peer's datagrams arrive at (one
//! socket per peer address under SO_REUSEPORT); choosing the queue by a hash of the flow spreads
//! one peer's flows over all the workers.

/// IPv4 and IPv6 protocols whose first four bytes are a source and a destination port.
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
const PROTO_SCTP: u8 = 132;

/// The queue (of `queues`) for `pkt`, an IP packet: the same for both directions of a flow
/// (addresses and, for TCP, UDP and SCTP, ports swapped), 0 for what is too short to tell.
pub fn queue_of(pkt: &[u8], queues: usize) -> usize {
    if queues <= 1 {
        return 0;
    }
    let h = symmetric_hash(pkt);
    // Multiply-shift onto 0..queues: the high bits of a 64-bit product, as the kernel scales
    // hashes onto queues.
    ((u64::from(h) * queues as u64) >> 32) as usize
}

/// A hash of `pkt`'s flow that does not change when source and destination trade places.
fn symmetric_hash(pkt: &[u8]) -> u32 {
    let (addrs, proto, l4) = match pkt.first().map(|b| b >> 4) {
        Some(4) => {
            let Some(ihl) = pkt.first().map(|b| usize::from(b & 0x0f) * 4) else {
                return 0;
            };
            let (Some(addrs), Some(&proto)) = (pkt.get(12..20), pkt.get(9)) else {
                return 0;
            };
            // A fragment after the first carries no ports; nor does a header too short to be one.
            let first = pkt.get(6..8).is_some_and(|f| f[0] & 0x1f == 0 && f[1] == 0);
            let l4 = (first && ihl >= 20).then(|| pkt.get(ihl..)).flatten();
            (addrs, proto, l4)
        }
        Some(6) => {
            let (Some(addrs), Some(&proto)) = (pkt.get(8..40), pkt.get(6)) else {
                return 0;
            };
            (addrs, proto, pkt.get(40..))
        }
        _ => return 0,
    };
    let half = addrs.len() / 2;
    let (src, dst) = addrs.split_at(half);
    let mut h = mix(fold(src).wrapping_add(fold(dst)), u32::from(proto));
    if matches!(proto, PROTO_TCP | PROTO_UDP | PROTO_SCTP) {
        if let Some(p) = l4.and_then(|l| l.get(..4)) {
            let sport = u32::from(u16::from_be_bytes([p[0], p[1]]));
            let dport = u32::from(u16::from_be_bytes([p[2], p[3]]));
            h = mix(h, sport.wrapping_add(dport) ^ (sport ^ dport) << 16);
        }
    }
    h
}

/// An address as one word: its 32-bit words summed after mixing each.
fn fold(addr: &[u8]) -> u32 {
    addr.chunks_exact(4)
        .map(|w| u32::from_be_bytes([w[0], w[1], w[2], w[3]]))
        .fold(0u32, |acc, w| acc.wrapping_add(mix(w, 0x9e37_79b9)))
}

/// Murmur3's finaliser over `a` and `b`: every input bit moves about half the output bits.
fn mix(a: u32, b: u32) -> u32 {
    let mut h = a ^ b.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// What the fuzz target (backends/fuzz/fuzz_targets/wg_datagram.rs, through the WireGuard
/// worker's entry) checks of any bytes, not an API: a queue in range for any count, and where
/// the bytes are an IPv4 or IPv6 packet, the same queue for it with its addresses (and ports)
/// swapped, its flow's other direction.
#[doc(hidden)]
pub fn fuzz_queue(pkt: &[u8]) {
    for n in [1, 2, 3, 7, 16] {
        assert!(queue_of(pkt, n) < n);
    }
    let mut back = pkt.to_vec();
    let (addrs, ports) = match pkt.first().map(|b| b >> 4) {
        Some(4) => (12..20, (usize::from(pkt[0] & 0x0f) * 4).max(20)),
        Some(6) => (8..40, 40),
        _ => return,
    };
    let Some(a) = back.get_mut(addrs) else {
        return;
    };
    let half = a.len() / 2;
    let (src, dst) = a.split_at_mut(half);
    src.swap_with_slice(dst);
    if let Some(p) = back.get_mut(ports..ports + 4) {
        let (sport, dport) = p.split_at_mut(2);
        sport.swap_with_slice(dport);
    }
    assert_eq!(queue_of(pkt, 16), queue_of(&back, 16), "{pkt:02x?}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// An IPv4 (or IPv6) packet of `proto` between `src`:`sport` and `dst`:`dport`.
    fn packet(src: &[u8], dst: &[u8], proto: u8, sport: u16, dport: u16) -> Vec<u8> {
        let mut p = if src.len() == 4 {
            let mut p = vec![0u8; 20];
            p[0] = 0x45;
            p[9] = proto;
            p[12..16].copy_from_slice(src);
            p[16..20].copy_from_slice(dst);
            p
        } else {
            let mut p = vec![0u8; 40];
            p[0] = 0x60;
            p[6] = proto;
            p[8..24].copy_from_slice(src);
            p[24..40].copy_from_slice(dst);
            p
        };
        p.extend(sport.to_be_bytes());
        p.extend(dport.to_be_bytes());
        p.extend([0u8; 16]);
        p
    }

    #[test]
    fn both_directions_of_a_flow_take_one_queue_and_flows_spread_over_all() {
        let (a, b) = ([10, 244, 1, 2], [10, 244, 2, 3]);
        let mut seen = [0usize; 4];
        for port in 40000..40400u16 {
            let out = packet(&a, &b, PROTO_TCP, port, 5201);
            let back = packet(&b, &a, PROTO_TCP, 5201, port);
            let q = queue_of(&out, 4);
            assert_eq!(q, queue_of(&back, 4), "port {port}");
            seen[q] += 1;
        }
        // 400 flows over 4 queues: each gets its share, give or take.
        assert!(seen.iter().all(|n| (60..=140).contains(n)), "{seen:?}");
    }

    #[test]
    fn ipv6_flows_hash_by_their_addresses_and_ports_too() {
        let a: Vec<u8> = (0..16).collect();
        let b: Vec<u8> = (16..32).collect();
        let qs: Vec<usize> = (0..64u16)
            .map(|p| queue_of(&packet(&a, &b, PROTO_UDP, 1000 + p, 53), 8))
            .collect();
        assert!(qs.iter().any(|q| *q != qs[0]), "ports move flows: {qs:?}");
        for p in 0..64u16 {
            let out = packet(&a, &b, PROTO_UDP, 1000 + p, 53);
            let back = packet(&b, &a, PROTO_UDP, 53, 1000 + p);
            assert_eq!(queue_of(&out, 8), queue_of(&back, 8));
        }
    }

    #[test]
    fn one_queue_short_packets_and_later_fragments_are_handled() {
        let p = packet(&[1, 2, 3, 4], &[5, 6, 7, 8], PROTO_TCP, 1, 2);
        assert_eq!(queue_of(&p, 1), 0);
        assert_eq!(queue_of(&[], 4), 0);
        assert_eq!(queue_of(&[0x45, 0, 0], 4), 0);
        // A later fragment (offset set) goes by addresses alone, as its first fragment's
        // ports are not in it: all of a fragmented datagram's pieces but the first agree.
        let mut frag = p.clone();
        frag[6] = 0x00;
        frag[7] = 0x10;
        let mut other = packet(&[1, 2, 3, 4], &[5, 6, 7, 8], PROTO_TCP, 99, 98);
        other[6] = 0x00;
        other[7] = 0x10;
        assert_eq!(queue_of(&frag, 16), queue_of(&other, 16));
    }

    #[test]
    fn the_fuzz_entry_holds_for_packets_of_both_families_and_any_bytes() {
        let v4 = packet(&[10, 244, 1, 2], &[10, 244, 2, 3], PROTO_TCP, 40000, 5201);
        let v6 = packet(&[1; 16], &[2; 16], PROTO_UDP, 53, 40000);
        for data in [
            &v4[..],
            &v6[..],
            &v4[..22],
            &v6[..41],
            &[0x4f; 30][..],
            &[],
            &[0x60],
        ] {
            fuzz_queue(data);
        }
    }

    proptest! {
        #[test]
        fn any_bytes_give_a_queue_in_range(pkt in proptest::collection::vec(any::<u8>(), 0..80),
                                           queues in 1usize..32) {
            prop_assert!(queue_of(&pkt, queues) < queues);
        }

        #[test]
        fn any_flow_is_symmetric(src in any::<[u8; 4]>(), dst in any::<[u8; 4]>(),
                                 src6 in any::<[u8; 16]>(), dst6 in any::<[u8; 16]>(),
                                 sport in any::<u16>(), dport in any::<u16>(),
                                 proto in prop_oneof![Just(PROTO_TCP), Just(PROTO_UDP), Just(1u8)]) {
            let q = |p: Vec<u8>| queue_of(&p, 7);
            prop_assert_eq!(q(packet(&src, &dst, proto, sport, dport)),
                            q(packet(&dst, &src, proto, dport, sport)));
            prop_assert_eq!(q(packet(&src6, &dst6, proto, sport, dport)),
                            q(packet(&dst6, &src6, proto, dport, sport)));
        }
    }
}
