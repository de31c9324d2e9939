//! Any table (overlapping, duplicate, outside the network, /0 to /32): building it never panics,
//! lookups agree with a longest-prefix scan, and egress/ingress keep their promises on it.
#![no_main]

use std::net::{Ipv4Addr, SocketAddrV4};

use ipnet::Ipv4Net;
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use weft_backends::udp::codec::PeerTable;

#[path = "common.rs"]
mod common;

#[derive(Arbitrary, Debug)]
struct Input {
    network: (u32, u8),
    own: (u32, u8),
    peers: Vec<((u32, u8), (u32, u16))>,
    queries: Vec<u32>,
    ctl: u8,
    from: u32,
    packet: Vec<u8>,
}

fn net((a, len): (u32, u8)) -> Ipv4Net {
    Ipv4Net::new(Ipv4Addr::from(a), len % 33).expect("prefix ≤ 32")
}

fuzz_target!(|input: Input| {
    let network = net(input.network);
    let own = net(input.own);
    let peers: Vec<(Ipv4Net, SocketAddrV4)> = input
        .peers
        .iter()
        .map(|&(n, (ip, port))| (net(n), SocketAddrV4::new(Ipv4Addr::from(ip), port)))
        .collect();
    let table = PeerTable::new(network, own, peers.iter().copied());

    // The peers a table keeps, and the longest-prefix match over them.
    let (network, own) = (network.trunc(), own.trunc());
    let mut kept: Vec<(Ipv4Net, SocketAddrV4)> = Vec::new();
    for &(n, e) in &peers {
        let n = n.trunc();
        if network.contains(&n)
            && !n.contains(&own)
            && !own.contains(&n)
            && kept.iter().all(|(k, _)| *k != n)
        {
            kept.push((n, e));
        }
    }
    assert_eq!(table.len(), kept.len());
    let lpm = |q: Ipv4Addr| {
        kept.iter()
            .filter(|(n, _)| n.contains(&q))
            .max_by_key(|(n, _)| n.prefix_len())
            .map(|(_, e)| *e)
    };
    let queries = input.queries.iter().map(|&q| Ipv4Addr::from(q));
    for q in queries.chain(kept.iter().map(|(n, _)| n.network())) {
        assert_eq!(table.lookup(q), lpm(q), "{q}");
    }
    for (n, e) in &kept {
        assert!(table.sender_subnets(*e.ip()).contains(n));
    }

    let mut pkt = input.packet;
    common::fix_up(input.ctl, &mut pkt);
    common::check_egress(&table, &pkt, usize::from(input.ctl) * 3);
    let from = match kept.get(usize::from(input.ctl) % (kept.len() + 1)) {
        Some((_, e)) => *e.ip(),
        None => Ipv4Addr::from(input.from),
    };
    common::check_ingress(&table, SocketAddrV4::new(from, 8285), &pkt);
});
