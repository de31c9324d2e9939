//! A micro benchmark of the hot path; prints a table, asserts nothing about speed. Run it with
//! `cargo test -p weft-backends --release --lib udp::codec::bench -- --ignored --nocapture`.

use std::hint::black_box;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;

use super::tests::{ip, net, Packet};
use super::*;

/// A /8 cluster of `peers` /24 peers (`mixed`: every tenth a /25 instead, forcing a second level).
fn cluster(peers: u32, mixed: bool) -> PeerTable {
    let peers = (0..peers).map(|i| {
        let len = if mixed && i % 10 == 0 { 25 } else { 24 };
        let subnet =
            Ipv4Net::new(Ipv4Addr::from(0x0a00_0000 | ((i + 1) << 8)), len).expect("a /24 or /25");
        (
            subnet,
            SocketAddrV4::new(Ipv4Addr::from(0xc000_0000 | i), 8285),
        )
    });
    PeerTable::new(net("10.0.0.0/8"), net("10.0.0.0/24"), peers)
}

/// Nanoseconds per call of `f`, the best of 5 runs of about 50 ms.
fn time(mut f: impl FnMut(u32)) -> f64 {
    let mut n: u32 = 1000;
    loop {
        let t = Instant::now();
        for i in 0..n {
            f(i);
        }
        if t.elapsed() > Duration::from_millis(50) {
            break;
        }
        n *= 4;
    }
    (0..5)
        .map(|_| {
            let t = Instant::now();
            for i in 0..n {
                f(i);
            }
            t.elapsed().as_nanos() as f64 / f64::from(n)
        })
        .fold(f64::INFINITY, f64::min)
}

#[test]
#[ignore = "a benchmark: run in release with --ignored --nocapture"]
fn bench() {
    println!("{:<44} {:>10}", "operation", "ns/op");
    for (peers, mixed) in [(10, false), (10_000, false), (10_000, true)] {
        let t = cluster(peers, mixed);
        // Spread over every peer so the lookups miss the cache as a busy host's would.
        let ns = time(|i| {
            let dst = Ipv4Addr::from(0x0a00_0000 | (((i % peers) + 1) << 8) | 7);
            black_box(t.lookup(black_box(dst)));
        });
        let kind = if mixed { "/24 and /25" } else { "/24" };
        println!(
            "{:<44} {:>10.1}",
            format!("lookup, {peers} peers, {kind}"),
            ns
        );
    }

    let t = cluster(10_000, false);
    let mut reply = vec![0u8; REPLY_LEN];
    for size in [64usize, 1400] {
        let mut p = Packet::new("10.0.0.7", "10.0.9.9");
        p.payload = vec![0; size - 20];
        let pkt = p.build();
        let mut buf = pkt.clone();
        let ns = time(|_| {
            buf[8] = 64; // a fresh TTL each time; the checksum drifts, which egress ignores
            black_box(egress(&t, black_box(&mut buf), &mut reply));
        });
        println!("{:<44} {:>10.1}", format!("egress → send, {size} B"), ns);

        let mut p = Packet::new("10.0.9.7", "10.0.0.9");
        p.payload = vec![0; size - 20];
        let pkt = p.build();
        let from = SocketAddrV4::new(Ipv4Addr::from(0xc000_0000 | 8), 8285);
        assert_eq!(ingress(&t, from, &pkt), Ok(()));
        let ns = time(|_| {
            black_box(ingress(&t, black_box(from), black_box(&pkt))).ok();
        });
        println!("{:<44} {:>10.1}", format!("ingress → accept, {size} B"), ns);
    }

    let mut p = Packet::new("10.0.0.7", "10.200.0.1");
    p.payload = vec![0; 1380];
    let mut pkt = p.build();
    let ns = time(|_| {
        black_box(egress(&t, &mut pkt, &mut reply));
    });
    println!(
        "{:<44} {:>10.1}",
        "egress → ICMP net unreachable, 576 B", ns
    );

    let stranger = SocketAddrV4::new(ip("203.0.113.1"), 8285);
    let ns = time(|_| {
        black_box(ingress(&t, black_box(stranger), &pkt)).ok();
    });
    println!("{:<44} {:>10.1}", "ingress → unknown sender", ns);
}
