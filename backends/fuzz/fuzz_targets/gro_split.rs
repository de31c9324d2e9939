//! Any receive batch, as the worker handles it: each buffer is split at the GRO segment size the
//! kernel reported (any size, as hostile as 0, beyond the buffer, or a negative C int read as a
//! huge usize); the pieces are whole datagrams, none longer than the segment size, all of it
//! but the last, and together the buffer. Each then goes through `ingress`, and what it accepts
//! through the coalescer, flushed at the batch's end: each accepted packet reaches the TUN
//! exactly once, in order (see frames.rs).
//!
//! Input: `ctl host`, then buffers until the input ends, each `stride_hi stride_lo len_hi len_lo
//! bytes…`. `ctl`: bits 0-2 fix each datagram's total length (1), header checksum (2) and TCP/UDP
//! checksum (4) before `ingress` sees it, so the fuzzer need not find them; 0x08 the TUN takes
//! UDP GSO; 0x10 the stride is usize::MAX minus the one given. The sender is 192.0.2.`host`.
#![no_main]

use std::net::{Ipv4Addr, SocketAddrV4};

use libfuzzer_sys::fuzz_target;
use weft_backends::offload::socket::split_gro;

#[path = "common.rs"]
mod common;
#[path = "frames.rs"]
mod frames;

/// Datagrams per recvmmsg batch in the worker (RX_MSGS).
const RX_MSGS: usize = 16;

/// Checks the split of one buffer and returns it.
fn split_checked(data: &[u8], stride: usize) -> Vec<&[u8]> {
    let parts: Vec<&[u8]> = split_gro(data, stride).collect();
    assert_eq!(parts.concat(), data, "the pieces make the buffer");
    let Some((last, whole)) = parts.split_last() else {
        panic!("no datagram at all");
    };
    if data.is_empty() {
        assert_eq!(parts.len(), 1, "an empty buffer is one empty datagram");
        return parts;
    }
    // A stride of 0 or past the end: the buffer is one datagram.
    let seg = if stride == 0 {
        data.len()
    } else {
        stride.min(data.len())
    };
    assert!(
        whole.iter().all(|p| p.len() == seg),
        "a short datagram before the last"
    );
    assert!(
        !last.is_empty() && last.len() <= seg,
        "the last: 1 to {seg} bytes"
    );
    assert_eq!(parts.len(), data.len().div_ceil(seg));
    parts
}

fuzz_target!(|data: &[u8]| {
    let Some((&[ctl, host], mut rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let from = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, host), 8285);
    let mut gro = frames::Checked::new(ctl & 0x08 != 0);
    for _ in 0..RX_MSGS {
        let Some((&[s_hi, s_lo, l_hi, l_lo], tail)) = rest.split_first_chunk::<4>() else {
            break;
        };
        let stride = usize::from(u16::from_be_bytes([s_hi, s_lo]));
        let stride = if ctl & 0x10 != 0 {
            usize::MAX - stride
        } else {
            stride
        };
        let len = usize::from(u16::from_be_bytes([l_hi, l_lo])).min(tail.len());
        let (buf, tail) = tail.split_at(len);
        rest = tail;
        for dgram in split_checked(buf, stride) {
            let mut pkt = dgram.to_vec();
            common::fix_up(ctl, &mut pkt);
            if ctl & 4 != 0 {
                frames::fix_transport(&mut pkt);
            }
            if common::check_ingress(&common::CLUSTER, from, &pkt) {
                gro.add(&pkt);
            }
        }
    }
    gro.flush();
});
