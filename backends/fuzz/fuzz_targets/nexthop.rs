//! Any bytes as a nexthop message from the kernel (a dump's answer, or an event anyone in the
//! namespace can cause): decoding never panics, and what it reads as weft's own shape encodes
//! back to the same nexthop.

#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_backends::nexthop::{Nexthop, NexthopMessage};

fuzz_target!(|payload: &[u8]| {
    let nh = Nexthop::parse(payload);
    if !nh.other {
        assert_eq!(Nexthop::parse(&NexthopMessage::New(nh).to_bytes()), nh);
    }
});
