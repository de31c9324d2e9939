//! What the targets share: a realistic cluster, input fix-ups that let the fuzzer past the cheap
//! checks, and the invariants every verdict must keep.

#![allow(dead_code)] // each target uses a part

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::LazyLock;

use ipnet::Ipv4Net;
use weft_backends::udp::codec::{egress, ingress, Egress, PeerTable, REPLY_LEN};

pub fn net(a: [u8; 4], len: u8) -> Ipv4Net {
    Ipv4Net::new(Ipv4Addr::from(a), len).expect("prefix ≤ 32")
}

/// 10.244.0.0/16, this host 10.244.52.0/24, peers 10.244.N.0/24 at 192.0.2.N:8285 for N in
/// 1..=250 but 52, and mixed lengths in 10.244.251.0/24 (a /25 and two /26) at 192.0.2.251.
pub static CLUSTER: LazyLock<PeerTable> = LazyLock::new(|| {
    let peers = (1..=250u8)
        .filter(|&n| n != 52)
        .map(|n| {
            (
                net([10, 244, n, 0], 24),
                SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, n), 8285),
            )
        })
        .chain([
            (
                net([10, 244, 251, 0], 25),
                SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 251), 8285),
            ),
            (
                net([10, 244, 251, 128], 26),
                SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 251), 8285),
            ),
            (
                net([10, 244, 251, 192], 26),
                SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 252), 1),
            ),
        ]);
    PeerTable::new(net([10, 244, 0, 0], 16), net([10, 244, 52, 0], 24), peers)
});

pub fn checksum(data: &[u8]) -> u16 {
    !fold(sum(data))
}

/// The ones' complement sum of `data` as big-endian words (an odd last byte padded with zero),
/// folded, not inverted.
pub fn sum(data: &[u8]) -> u64 {
    let s: u64 = data
        .chunks(2)
        .map(|w| u64::from(w[0]) << 8 | u64::from(*w.get(1).unwrap_or(&0)))
        .sum();
    u64::from(fold(s))
}

pub fn fold(mut s: u64) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

fn header_len(pkt: &[u8]) -> usize {
    usize::from(pkt.first().map_or(0, |b| b & 0x0f)) * 4
}

/// Bits of `ctl` ask to make the total length match (1) and the header checksum right (2), so
/// the fuzzer need not find either by chance.
pub fn fix_up(ctl: u8, pkt: &mut [u8]) {
    if ctl & 1 != 0 && pkt.len() >= 4 {
        let len = (pkt.len().min(0xffff) as u16).to_be_bytes();
        pkt[2..4].copy_from_slice(&len);
    }
    let hl = header_len(pkt);
    if ctl & 2 != 0 && hl >= 20 && pkt.len() >= hl {
        pkt[10..12].fill(0);
        let c = checksum(&pkt[..hl]);
        pkt[10..12].copy_from_slice(&c.to_be_bytes());
    }
}

/// Runs `egress` and checks what it did against what it said.
pub fn check_egress(table: &PeerTable, pkt: &[u8], reply_len: usize) {
    let mut out = pkt.to_vec();
    let mut reply = vec![0u8; reply_len];
    match egress(table, &mut out, &mut reply) {
        Egress::Send(ep) => {
            assert_eq!(
                Some(ep),
                table.lookup(Ipv4Addr::from([pkt[16], pkt[17], pkt[18], pkt[19]]))
            );
            assert!(pkt[8] >= 2);
            assert_eq!(out[8], pkt[8] - 1);
            for (i, (a, b)) in out.iter().zip(pkt).enumerate() {
                assert!(a == b || matches!(i, 8 | 10 | 11), "byte {i} changed");
            }
            let hl = header_len(pkt);
            if checksum(&pkt[..hl]) == 0 {
                assert_eq!(checksum(&out[..hl]), 0, "the decremented header checksums");
            }
        }
        Egress::Reply(n) => {
            assert_eq!(out, pkt, "the original is left alone");
            assert!(n <= reply_len.min(REPLY_LEN) && n >= 28);
            let r = &reply[..n];
            assert_eq!(r[0], 0x45);
            assert_eq!(usize::from(u16::from_be_bytes([r[2], r[3]])), n);
            assert_eq!(checksum(&r[..20]), 0);
            assert_eq!(r[9], 1);
            assert_eq!(r[12..16], table.own().network().octets());
            assert_eq!(r[16..20], pkt[12..16]);
            assert!(matches!((r[20], r[21]), (3, 0) | (3, 1) | (11, 0)));
            assert_eq!(checksum(&r[20..]), 0);
            let quote = &r[28..];
            assert_eq!(quote, &pkt[..quote.len()]);
            assert!(quote.len() >= pkt.len().min(header_len(pkt) + 8));
            // Never about an ICMP error, nor a later fragment.
            assert!(pkt[9] != 1 || matches!(pkt.get(header_len(pkt)), Some(0 | 8 | 13..=18)));
            assert_eq!(u16::from_be_bytes([pkt[6], pkt[7]]) & 0x1fff, 0);
        }
        Egress::Drop(_) => assert_eq!(out, pkt, "a dropped packet is left alone"),
    }
}

/// Runs `ingress` and, when it accepts, checks every rule holds. Returns whether it accepted.
pub fn check_ingress(table: &PeerTable, from: SocketAddrV4, pkt: &[u8]) -> bool {
    let accepted = ingress(table, from, pkt).is_ok();
    if accepted {
        let hl = header_len(pkt);
        assert_eq!(pkt[0] >> 4, 4);
        assert!(hl >= 20 && hl <= pkt.len());
        assert_eq!(usize::from(u16::from_be_bytes([pkt[2], pkt[3]])), pkt.len());
        assert_eq!(checksum(&pkt[..hl]), 0);
        let src = Ipv4Addr::from([pkt[12], pkt[13], pkt[14], pkt[15]]);
        let dst = Ipv4Addr::from([pkt[16], pkt[17], pkt[18], pkt[19]]);
        assert!(table
            .sender_subnets(*from.ip())
            .iter()
            .any(|n| n.contains(&src)));
        assert!(table.own().contains(&dst));
    }
    accepted
}
