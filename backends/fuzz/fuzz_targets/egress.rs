//! Any bytes from the TUN: `egress` never panics, and every verdict keeps its promises.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_backends::udp::codec::REPLY_LEN;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, rest)) = data.split_first() else {
        return;
    };
    let mut pkt = rest.to_vec();
    common::fix_up(ctl, &mut pkt);
    // Bit 2 asks for a reply buffer of (ctl >> 3) * 20 bytes instead of a full one.
    let reply_len = if ctl & 4 != 0 {
        usize::from(ctl >> 3) * 20
    } else {
        REPLY_LEN
    };
    common::check_egress(&common::CLUSTER, &pkt, reply_len);
});
