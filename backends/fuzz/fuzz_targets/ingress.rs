//! Any datagram from anyone: `ingress` never panics, and accepts only what the rules allow.
#![no_main]

use std::net::{Ipv4Addr, SocketAddrV4};

use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let Some((&[ctl, host], rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    // Bit 2: from any address (the next four bytes) rather than 192.0.2.<host>, where peers are.
    let (from, rest) = match rest.split_first_chunk::<4>() {
        Some((a, rest)) if ctl & 4 != 0 => (Ipv4Addr::from(*a), rest),
        _ => (Ipv4Addr::new(192, 0, 2, host), rest),
    };
    let mut pkt = rest.to_vec();
    common::fix_up(ctl, &mut pkt);
    common::check_ingress(
        &common::CLUSTER,
        SocketAddrV4::new(from, u16::from(ctl)),
        &pkt,
    );
});
