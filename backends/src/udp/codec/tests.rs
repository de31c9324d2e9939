//! The codec's rules, one test each. The cluster: network 10.244.0.0/16, this host 10.244.52.0/24,
//! peers 10.244.1.0/24 at 192.0.2.1:8285 and 10.244.2.0/24 at 192.0.2.2:8285.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::{Ipv4Addr, SocketAddrV4};

use ipnet::Ipv4Net;

use super::ipv4::checksum;
use super::*;

pub(super) fn net(s: &str) -> Ipv4Net {
    s.parse().expect("test network")
}

pub(super) fn ip(s: &str) -> Ipv4Addr {
    s.parse().expect("test address")
}

fn ep(s: &str) -> SocketAddrV4 {
    s.parse().expect("test endpoint")
}

fn cluster() -> PeerTable {
    PeerTable::new(
        net("10.244.0.0/16"),
        net("10.244.52.0/24"),
        [
            (net("10.244.1.0/24"), ep("192.0.2.1:8285")),
            (net("10.244.2.0/24"), ep("192.0.2.2:8285")),
        ],
    )
}

/// An IPv4 packet to build, with a correct header checksum.
#[derive(Clone, Debug)]
pub(super) struct Packet {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub ttl: u8,
    pub protocol: u8,
    pub tos: u8,
    /// Flags and fragment offset, as on the wire.
    pub frag: u16,
    pub options: Vec<u8>,
    pub payload: Vec<u8>,
}

impl Packet {
    /// A UDP-looking packet from src to dst with TTL 64 and 32 bytes of payload.
    pub fn new(src: &str, dst: &str) -> Self {
        Self {
            src: ip(src),
            dst: ip(dst),
            ttl: 64,
            protocol: 17,
            tos: 0,
            frag: 0,
            options: Vec::new(),
            payload: (0..32).collect(),
        }
    }

    pub fn build(&self) -> Vec<u8> {
        let header_len = 20 + self.options.len();
        assert_eq!(header_len % 4, 0, "options pad to 4 bytes");
        let total = (header_len + self.payload.len()) as u16;
        let mut p = vec![0x40 | (header_len / 4) as u8, self.tos];
        p.extend_from_slice(&total.to_be_bytes());
        p.extend_from_slice(&[0x12, 0x34]);
        p.extend_from_slice(&self.frag.to_be_bytes());
        p.extend_from_slice(&[self.ttl, self.protocol, 0, 0]);
        p.extend_from_slice(&self.src.octets());
        p.extend_from_slice(&self.dst.octets());
        p.extend_from_slice(&self.options);
        let c = checksum(&p);
        p[10..12].copy_from_slice(&c.to_be_bytes());
        p.extend_from_slice(&self.payload);
        p
    }
}

/// Checks that `reply` (written into a buffer of `buffer` bytes) is a well-formed ICMP error of (kind, code) from this host's lease network
/// address about `original`, quoting as much of it as fits in 576 bytes; returns nothing on
/// success so it can be used from proptests too.
pub(super) fn assert_icmp_error(
    reply: &[u8],
    buffer: usize,
    original: &[u8],
    own: Ipv4Net,
    kind: u8,
    code: u8,
) {
    assert!(reply.len() <= REPLY_LEN, "at most 576 bytes");
    assert_eq!(reply[0], 0x45, "IPv4, no options");
    assert_eq!(
        usize::from(u16::from_be_bytes([reply[2], reply[3]])),
        reply.len()
    );
    assert_eq!(checksum(&reply[..20]), 0, "IP header checksum");
    assert_eq!(reply[8], 64, "TTL");
    assert_eq!(reply[9], 1, "protocol ICMP");
    assert_eq!(
        reply[12..16],
        own.network().octets(),
        "from flannel0's address"
    );
    assert_eq!(reply[16..20], original[12..16], "to the original source");
    assert_eq!((reply[20], reply[21]), (kind, code), "type and code");
    assert_eq!(checksum(&reply[20..]), 0, "ICMP checksum");
    assert_eq!(reply[24..28], [0, 0, 0, 0], "unused word");
    let quote = &reply[28..];
    let header_len = usize::from(original[0] & 0x0f) * 4;
    assert!(
        quote.len() >= original.len().min(header_len + 8),
        "header + 8"
    );
    assert_eq!(quote, &original[..quote.len()], "quotes the original");
    let room = buffer.min(REPLY_LEN) - 28;
    assert_eq!(quote.len(), original.len().min(room), "as much as fits");
}

fn run_egress(table: &PeerTable, pkt: &mut [u8]) -> (Egress, Vec<u8>) {
    let mut reply = vec![0u8; REPLY_LEN];
    let verdict = egress(table, pkt, &mut reply);
    if let Egress::Reply(n) = verdict {
        reply.truncate(n);
    }
    (verdict, reply)
}

// ---- egress: forwarding ----

#[test]
fn a_packet_for_a_peers_subnet_goes_to_that_peer_with_ttl_one_less() {
    let original = Packet::new("10.244.52.7", "10.244.2.9").build();
    let mut pkt = original.clone();
    let (verdict, _) = run_egress(&cluster(), &mut pkt);
    assert_eq!(verdict, Egress::Send(ep("192.0.2.2:8285")));
    assert_eq!(pkt[8], 63, "TTL decremented");
    assert_eq!(checksum(&pkt[..20]), 0, "header checksum fixed");
    let untouched = |p: &[u8]| [&p[..8], &p[12..]].concat();
    assert_eq!(
        untouched(&pkt),
        untouched(&original),
        "nothing else changes"
    );
}

#[test]
fn a_packet_with_ip_options_is_forwarded_and_its_checksum_fixed() {
    let mut p = Packet::new("10.244.52.7", "10.244.1.9");
    p.options = vec![1, 1, 1, 0]; // NOP, NOP, NOP, end of options
    let mut pkt = p.build();
    assert_eq!(
        run_egress(&cluster(), &mut pkt).0,
        Egress::Send(ep("192.0.2.1:8285"))
    );
    assert_eq!(checksum(&pkt[..24]), 0);
}

#[test]
fn a_ttl_of_two_is_still_forwarded() {
    let mut p = Packet::new("10.244.52.7", "10.244.1.9");
    p.ttl = 2;
    let mut pkt = p.build();
    assert!(matches!(
        run_egress(&cluster(), &mut pkt).0,
        Egress::Send(_)
    ));
    assert_eq!(pkt[8], 1);
}

#[test]
fn fragments_are_forwarded_like_any_packet() {
    let mut p = Packet::new("10.244.52.7", "10.244.1.9");
    p.frag = 0x2000 | 100; // MF, offset 800
    let mut pkt = p.build();
    assert!(matches!(
        run_egress(&cluster(), &mut pkt).0,
        Egress::Send(_)
    ));
}

#[test]
fn a_packet_for_outside_the_network_is_dropped_untouched() {
    let original = Packet::new("10.244.52.7", "8.8.8.8").build();
    let mut pkt = original.clone();
    assert_eq!(
        run_egress(&cluster(), &mut pkt).0,
        Egress::Drop(DropReason::OutsideNetwork)
    );
    assert_eq!(pkt, original);
}

// ---- egress: ICMP errors ----

#[test]
fn a_packet_no_peer_holds_gets_icmp_net_unreachable() {
    let original = Packet::new("10.244.52.7", "10.244.99.1").build();
    let mut pkt = original.clone();
    let (verdict, reply) = run_egress(&cluster(), &mut pkt);
    assert_eq!(verdict, Egress::Reply(28 + original.len()));
    assert_icmp_error(&reply, REPLY_LEN, &original, net("10.244.52.0/24"), 3, 0);
    assert_eq!(reply[12..16], [10, 244, 52, 0]);
    assert_eq!(reply[16..20], [10, 244, 52, 7]);
    assert_eq!(pkt, original, "the original is left alone");
}

#[test]
fn a_packet_for_this_hosts_own_lease_gets_icmp_host_unreachable() {
    let original = Packet::new("10.244.52.7", "10.244.52.8").build();
    let (verdict, reply) = run_egress(&cluster(), &mut original.clone());
    assert!(matches!(verdict, Egress::Reply(_)));
    assert_icmp_error(&reply, REPLY_LEN, &original, net("10.244.52.0/24"), 3, 1);
}

#[test]
fn this_hosts_own_lease_is_never_sent_to_a_peer_claiming_it() {
    let t = PeerTable::new(
        net("10.244.0.0/16"),
        net("10.244.52.0/24"),
        [(net("10.244.52.0/24"), ep("192.0.2.9:8285"))],
    );
    let mut pkt = Packet::new("10.244.52.7", "10.244.52.8").build();
    assert!(matches!(run_egress(&t, &mut pkt).0, Egress::Reply(_)));
}

#[test]
fn a_packet_whose_ttl_runs_out_gets_icmp_time_exceeded() {
    for ttl in [1, 0] {
        let mut p = Packet::new("10.244.52.7", "10.244.1.9");
        p.ttl = ttl;
        let original = p.build();
        let mut pkt = original.clone();
        let (verdict, reply) = run_egress(&cluster(), &mut pkt);
        assert!(matches!(verdict, Egress::Reply(_)), "TTL {ttl}");
        assert_icmp_error(&reply, REPLY_LEN, &original, net("10.244.52.0/24"), 11, 0);
        assert_eq!(pkt, original, "TTL {ttl}: quoted as it came");
    }
}

#[test]
fn no_route_is_reported_before_the_ttl_as_linux_routes_before_it_forwards() {
    let mut p = Packet::new("10.244.52.7", "10.244.99.1");
    p.ttl = 1;
    let original = p.build();
    let (_, reply) = run_egress(&cluster(), &mut original.clone());
    assert_icmp_error(&reply, REPLY_LEN, &original, net("10.244.52.0/24"), 3, 0);
}

#[test]
fn the_quote_stops_where_the_error_reaches_576_bytes() {
    let mut p = Packet::new("10.244.52.7", "10.244.99.1");
    p.payload = vec![0xab; 1400];
    let original = p.build();
    let (verdict, reply) = run_egress(&cluster(), &mut original.clone());
    assert_eq!(verdict, Egress::Reply(576));
    assert_icmp_error(&reply, REPLY_LEN, &original, net("10.244.52.0/24"), 3, 0);
}

#[test]
fn a_small_reply_buffer_gets_a_shorter_quote_but_never_less_than_header_and_8_bytes() {
    let original = Packet::new("10.244.52.7", "10.244.99.1").build();
    let mut reply = [0u8; 28 + 20 + 8];
    assert_eq!(
        egress(&cluster(), &mut original.clone(), &mut reply),
        Egress::Reply(56)
    );
    assert_icmp_error(&reply, 56, &original, net("10.244.52.0/24"), 3, 0);

    let mut reply = [0u8; 28 + 20 + 7];
    assert_eq!(
        egress(&cluster(), &mut original.clone(), &mut reply),
        Egress::Drop(DropReason::NoRoute)
    );
}

#[test]
fn the_error_keeps_the_tos_bits_at_internetwork_control_precedence() {
    let mut p = Packet::new("10.244.52.7", "10.244.99.1");
    p.tos = 0x2b; // precedence 1, TOS bits 0x0a, ECN 3
    let (_, reply) = run_egress(&cluster(), &mut p.build());
    assert_eq!(reply[1], 0xc0 | 0x0a);
}

#[test]
fn no_icmp_error_is_sent_about_an_icmp_error() {
    for kind in [3, 4, 5, 11, 12] {
        let mut p = Packet::new("10.244.52.7", "10.244.99.1");
        p.protocol = 1;
        p.payload[0] = kind;
        assert_eq!(
            run_egress(&cluster(), &mut p.build()).0,
            Egress::Drop(DropReason::NoRoute),
            "ICMP type {kind}"
        );
    }
}

#[test]
fn icmp_queries_do_get_errors() {
    for kind in [0, 8, 13] {
        let mut p = Packet::new("10.244.52.7", "10.244.99.1");
        p.protocol = 1;
        p.payload[0] = kind;
        assert!(
            matches!(run_egress(&cluster(), &mut p.build()).0, Egress::Reply(_)),
            "ICMP type {kind}"
        );
    }
}

#[test]
fn an_icmp_packet_too_short_to_have_a_type_gets_no_error() {
    let mut p = Packet::new("10.244.52.7", "10.244.99.1");
    p.protocol = 1;
    p.payload.clear();
    assert_eq!(
        run_egress(&cluster(), &mut p.build()).0,
        Egress::Drop(DropReason::NoRoute)
    );
}

#[test]
fn only_the_first_fragment_gets_an_error() {
    let mut p = Packet::new("10.244.52.7", "10.244.99.1");
    p.frag = 0x2000; // MF, offset 0
    assert!(matches!(
        run_egress(&cluster(), &mut p.build()).0,
        Egress::Reply(_)
    ));
    p.frag = 0x2000 | 185;
    assert_eq!(
        run_egress(&cluster(), &mut p.build()).0,
        Egress::Drop(DropReason::NoRoute)
    );
    p.frag = 185; // the last fragment
    p.ttl = 1;
    p.dst = ip("10.244.1.9");
    assert_eq!(
        run_egress(&cluster(), &mut p.build()).0,
        Egress::Drop(DropReason::TtlExceeded)
    );
}

#[test]
fn no_error_goes_to_a_source_that_is_not_a_single_host() {
    for src in [
        "0.0.0.0",
        "0.1.2.3",
        "127.0.0.1",
        "224.0.0.5",
        "239.1.1.1",
        "240.0.0.1",
        "255.255.255.255",
        "10.244.255.255", // the network's broadcast
        "10.244.52.255",  // this host's lease's broadcast
    ] {
        let pkt = &mut Packet::new(src, "10.244.99.1").build();
        assert_eq!(
            run_egress(&cluster(), pkt).0,
            Egress::Drop(DropReason::NoRoute),
            "{src}"
        );
        let pkt = &mut Packet::new(src, "10.244.52.9").build();
        assert_eq!(
            run_egress(&cluster(), pkt).0,
            Egress::Drop(DropReason::LocalDestination),
            "{src}"
        );
    }
}

#[test]
fn sources_outside_the_network_do_get_errors() {
    let original = Packet::new("192.168.1.5", "10.244.99.1").build();
    let (_, reply) = run_egress(&cluster(), &mut original.clone());
    assert_icmp_error(&reply, REPLY_LEN, &original, net("10.244.52.0/24"), 3, 0);
}

#[test]
fn no_error_is_sent_about_a_packet_to_a_broadcast_address() {
    for dst in ["10.244.255.255", "10.244.52.255"] {
        let pkt = &mut Packet::new("10.244.52.7", dst).build();
        assert!(
            matches!(run_egress(&cluster(), pkt).0, Egress::Drop(_)),
            "{dst}"
        );
    }
}

#[test]
fn a_packet_to_a_peers_broadcast_address_goes_to_that_peer() {
    let pkt = &mut Packet::new("10.244.52.7", "10.244.1.255").build();
    assert_eq!(
        run_egress(&cluster(), pkt).0,
        Egress::Send(ep("192.0.2.1:8285"))
    );
}

#[test]
fn a_reply_counts_as_a_drop_for_its_reason() {
    let mut c = Counters::default();
    for (dst, ttl) in [("10.244.99.1", 64), ("10.244.52.9", 64), ("10.244.1.9", 1)] {
        let mut p = Packet::new("10.244.52.7", dst);
        p.ttl = ttl;
        let mut pkt = p.build();
        let (verdict, reply) = run_egress(&cluster(), &mut pkt);
        c.record_egress(&verdict, pkt.len(), &reply);
    }
    let mut pkt = Packet::new("10.244.52.7", "10.244.1.9").build();
    let (verdict, reply) = run_egress(&cluster(), &mut pkt);
    c.record_egress(&verdict, pkt.len(), &reply);
    assert_eq!(c.drop_count(DropReason::NoRoute), 1);
    assert_eq!(c.drop_count(DropReason::LocalDestination), 1);
    assert_eq!(c.drop_count(DropReason::TtlExceeded), 1);
    assert_eq!((c.tx_packets, c.tx_bytes), (1, 52));
}

// ---- egress and ingress: malformed packets ----

/// (what is wrong, the bytes, the reason) for both directions.
fn malformed() -> Vec<(&'static str, Vec<u8>, DropReason)> {
    let good = Packet::new("10.244.1.7", "10.244.52.9").build();
    let with = |i: usize, v: u8| {
        let mut p = good.clone();
        p[i] = v;
        p
    };
    let mut long = good.clone();
    long.push(0);
    let mut ipv6 = vec![0x60; 40];
    ipv6[4..6].copy_from_slice(&0u16.to_be_bytes());
    vec![
        ("empty", vec![], DropReason::Truncated),
        ("19 bytes", good[..19].to_vec(), DropReason::Truncated),
        ("IPv6", ipv6, DropReason::NotIpv4),
        ("version 5", with(0, 0x55), DropReason::NotIpv4),
        ("a lone version nibble", vec![0x40], DropReason::Truncated),
        ("IHL 4", with(0, 0x44), DropReason::BadHeader),
        ("IHL 0", with(0, 0x40), DropReason::BadHeader),
        ("IHL past the end", with(0, 0x4f), DropReason::BadHeader),
        ("cut short", good[..40].to_vec(), DropReason::BadLength),
        ("a byte too many", long, DropReason::BadLength),
        ("total length 0", with(3, 0), DropReason::BadLength),
    ]
}

#[test]
fn malformed_packets_from_the_tun_are_dropped_by_reason() {
    for (what, mut pkt, reason) in malformed() {
        let before = pkt.clone();
        assert_eq!(
            run_egress(&cluster(), &mut pkt).0,
            Egress::Drop(reason),
            "{what}"
        );
        assert_eq!(pkt, before, "{what}: untouched");
    }
}

// ---- ingress ----

#[test]
fn a_datagram_from_a_peer_for_this_host_is_accepted_from_any_port() {
    let pkt = Packet::new("10.244.1.7", "10.244.52.9").build();
    for port in [8285, 40_123] {
        let from = SocketAddrV4::new(ip("192.0.2.1"), port);
        assert_eq!(ingress(&cluster(), from, &pkt), Ok(()));
    }
}

#[test]
fn a_datagram_from_a_stranger_is_dropped_whatever_it_holds() {
    let from = ep("192.0.2.77:8285");
    let pkt = Packet::new("10.244.1.7", "10.244.52.9").build();
    assert_eq!(
        ingress(&cluster(), from, &pkt),
        Err(DropReason::UnknownSender)
    );
    assert_eq!(
        ingress(&cluster(), from, &[]),
        Err(DropReason::UnknownSender)
    );
}

#[test]
fn a_source_outside_the_senders_lease_is_dropped() {
    for src in ["10.244.2.7", "10.244.52.1", "192.168.0.1"] {
        let pkt = Packet::new(src, "10.244.52.9").build();
        assert_eq!(
            ingress(&cluster(), ep("192.0.2.1:8285"), &pkt),
            Err(DropReason::SourceNotInSenderLease),
            "{src}"
        );
    }
}

#[test]
fn a_destination_outside_this_hosts_lease_is_dropped() {
    for dst in ["10.244.2.7", "10.244.1.8", "8.8.8.8", "10.244.53.1"] {
        let pkt = Packet::new("10.244.1.7", dst).build();
        assert_eq!(
            ingress(&cluster(), ep("192.0.2.1:8285"), &pkt),
            Err(DropReason::DestinationNotLocal),
            "{dst}"
        );
    }
}

#[test]
fn a_bad_header_checksum_is_dropped() {
    let mut pkt = Packet::new("10.244.1.7", "10.244.52.9").build();
    pkt[10] ^= 0x01;
    assert_eq!(
        ingress(&cluster(), ep("192.0.2.1:8285"), &pkt),
        Err(DropReason::BadChecksum)
    );
}

#[test]
fn malformed_packets_from_a_peer_are_dropped_by_reason() {
    for (what, pkt, reason) in malformed() {
        assert_eq!(
            ingress(&cluster(), ep("192.0.2.1:8285"), &pkt),
            Err(reason),
            "{what}"
        );
    }
}

#[test]
fn a_public_ip_with_several_leases_may_send_from_any_of_them() {
    let t = PeerTable::new(
        net("10.244.0.0/16"),
        net("10.244.52.0/24"),
        [
            (net("10.244.1.0/24"), ep("192.0.2.1:8285")),
            (net("10.244.3.0/24"), ep("192.0.2.1:8285")),
        ],
    );
    for src in ["10.244.1.7", "10.244.3.7"] {
        let pkt = Packet::new(src, "10.244.52.9").build();
        assert_eq!(ingress(&t, ep("192.0.2.1:8285"), &pkt), Ok(()), "{src}");
    }
}

#[test]
fn a_ttl_of_zero_is_the_kernels_business_on_receive() {
    let mut p = Packet::new("10.244.1.7", "10.244.52.9");
    p.ttl = 0;
    assert_eq!(
        ingress(&cluster(), ep("192.0.2.1:8285"), &p.build()),
        Ok(())
    );
}

// ---- the hot path does not allocate ----

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

/// Counts this thread's allocations, so a test can see the hot path makes none while others run.
struct CountingAllocator;

// SAFETY: forwards every call to `System` unchanged; only counts.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        // SAFETY: the caller upholds `alloc`'s contract, which is System's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

pub(super) fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

#[test]
fn egress_ingress_and_lookup_never_allocate() {
    let t = cluster();
    let mut packets: Vec<Vec<u8>> = [
        ("10.244.52.7", "10.244.1.9", 64),
        ("10.244.52.7", "10.244.99.1", 64),
        ("10.244.52.7", "10.244.52.8", 64),
        ("10.244.52.7", "10.244.2.9", 1),
        ("10.244.52.7", "1.1.1.1", 64),
        ("10.244.1.7", "10.244.52.9", 64),
    ]
    .iter()
    .map(|&(s, d, ttl)| {
        let mut p = Packet::new(s, d);
        p.ttl = ttl;
        p.build()
    })
    .collect();
    packets.extend(malformed().into_iter().map(|(_, p, _)| p));
    let mut reply = vec![0u8; REPLY_LEN];
    let mut counters = Counters::default();

    let before = allocations();
    for pkt in &mut packets {
        let v = egress(&t, pkt, &mut reply);
        counters.record_egress(&v, pkt.len(), &reply);
        let v = ingress(&t, ep("192.0.2.1:8285"), pkt);
        counters.record_ingress(v, pkt.len());
        std::hint::black_box(t.lookup(ip("10.244.2.1")));
        std::hint::black_box(t.sender_subnet(ip("192.0.2.2")));
    }
    assert_eq!(allocations() - before, 0);
    assert!(counters.total_drops() > 0, "the packets were looked at");
}
