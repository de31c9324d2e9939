//! Any run of packets into the coalescer that merges what peers send for the TUN: every packet
//! comes out exactly once, in order, alone and intact or in a GSO frame within the kernel's
//! limits that segments back into it (see frames.rs).
//!
//! Random bytes would almost never make two packets the coalescer may merge, so most packets are
//! built from a few bytes each, with correct checksums, in one of a few flows that continue where
//! the flow's last packet left off. Input: a mode byte (bit 0: the TUN takes UDP GSO), then
//! records until the input ends:
//! - `0kkkkkkk flow size_hi size_lo var`: a built packet. `k`: 0x01 UDP (else TCP), 0x02 PSH,
//!   0x04 DF clear, 0x08 a corrupt checksum, 0x10 TCP FIN or UDP without checksum, 0x20 IPv6
//!   (fd00::2 → fd00::34; TTL, TOS and DF become hop limit, traffic class and nothing). `flow`: bits
//!   0-1 the source port, then a different TTL (0x04), TOS (0x08), window or destination port
//!   (0x10), TCP without options (0x20), ACK number (0x40), IP's reserved flag (0x80). `size`: the
//!   payload (capped at what fits). `var`: 0 continues the flow, else its sequence number and IP
//!   ID jump by `var` as a signed byte.
//! - `10000fff len_hi len_lo bytes…`: a packet as given; `f` fixes its total length (1), header
//!   checksum (2) and TCP/UDP checksum (4).
//! - `11xxxxxx`: the end of a receive batch, where the worker flushes.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;
#[path = "frames.rs"]
mod frames;

use frames::{Checked, TCP, UDP};

/// Enough for a few 64 KB super-packets; more only slows the fuzzer down.
const MAX_BYTES: usize = 1 << 18;

#[derive(Clone, Copy, Default)]
struct Flow {
    seq: u32,
    id: u16,
}

/// One built packet: 10.244.2.2 → 10.244.52.2 (or fd00::2 → fd00::34), port 5000 + flow → 80
/// (TCP) or 5201 (UDP).
fn build(kind: u8, flow: u8, size: usize, at: &mut Flow, index: usize) -> Vec<u8> {
    let udp = kind & 0x01 != 0;
    let v6 = kind & 0x20 != 0;
    let opts: &[u8] = if udp || flow & 0x20 != 0 {
        &[]
    } else {
        &[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]
    };
    let il = if v6 { 40 } else { 20 };
    let hl = il + if udp { 8 } else { 20 + opts.len() };
    let size = size.min(65535 - hl);
    let mut p = vec![0u8; hl + size];
    if v6 {
        p[0] = 0x60;
        p[1] = if flow & 0x08 != 0 { 0x20 } else { 0 };
        // A flow label instead of IPv4's reserved flag.
        p[3] = u8::from(flow & 0x80 != 0);
        p[4..6].copy_from_slice(&((hl - il + size) as u16).to_be_bytes());
        p[6] = if udp { UDP } else { TCP };
        p[7] = if flow & 0x04 != 0 { 63 } else { 64 };
        p[8] = 0xfd;
        p[23] = 2;
        p[24] = 0xfd;
        p[39] = 0x34;
    } else {
        p[0] = 0x45;
        p[1] = if flow & 0x08 != 0 { 2 } else { 0 };
        p[2..4].copy_from_slice(&((hl + size) as u16).to_be_bytes());
        p[4..6].copy_from_slice(&at.id.to_be_bytes());
        p[6] = if kind & 0x04 != 0 { 0 } else { 0x40 } | if flow & 0x80 != 0 { 0x80 } else { 0 };
        p[8] = if flow & 0x04 != 0 { 63 } else { 64 };
        p[9] = if udp { UDP } else { TCP };
        p[12..16].copy_from_slice(&[10, 244, 2, 2]);
        p[16..20].copy_from_slice(&[10, 244, 52, 2]);
        let c = common::checksum(&p[..20]);
        p[10..12].copy_from_slice(&c.to_be_bytes());
    }
    let t = &mut p[il..];
    t[0..2].copy_from_slice(&(5000 + u16::from(flow & 3)).to_be_bytes());
    if udp {
        let port: u16 = if flow & 0x10 != 0 { 5202 } else { 5201 };
        t[2..4].copy_from_slice(&port.to_be_bytes());
        t[4..6].copy_from_slice(&((8 + size) as u16).to_be_bytes());
    } else {
        t[2..4].copy_from_slice(&80u16.to_be_bytes());
        t[4..8].copy_from_slice(&at.seq.to_be_bytes());
        let ack: u32 = if flow & 0x40 != 0 { 8 } else { 7 };
        t[8..12].copy_from_slice(&ack.to_be_bytes());
        t[12] = ((20 + opts.len()) as u8 / 4) << 4;
        t[13] =
            0x10 | if kind & 0x02 != 0 { 0x08 } else { 0 } | if kind & 0x10 != 0 { 1 } else { 0 };
        let window: u16 = if flow & 0x10 != 0 { 1024 } else { 512 };
        t[14..16].copy_from_slice(&window.to_be_bytes());
        t[20..20 + opts.len()].copy_from_slice(opts);
    }
    // Payloads differ from packet to packet, so that a lost or reordered one shows.
    for (j, b) in p[hl..].iter_mut().enumerate() {
        *b = (index.wrapping_mul(31) ^ j) as u8;
    }
    if !(udp && kind & 0x10 != 0) {
        frames::fix_transport(&mut p);
    }
    if kind & 0x08 != 0 {
        let last = p.len() - 1;
        p[last] ^= 0x5a;
    }
    at.seq = at.seq.wrapping_add(size as u32);
    at.id = at.id.wrapping_add(1);
    p
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, mut rest)) = data.split_first() else {
        return;
    };
    let mut gro = Checked::new(mode & 1 != 0);
    let mut flows = [Flow::default(); 4];
    let (mut index, mut bytes) = (0usize, 0usize);
    while let Some((&kind, tail)) = rest.split_first() {
        rest = tail;
        let pkt = match kind >> 6 {
            0 | 1 => {
                let Some((&[flow, hi, lo, var], tail)) = rest.split_first_chunk::<4>() else {
                    break;
                };
                rest = tail;
                let at = &mut flows[usize::from(flow & 3)];
                let jump = i32::from(var as i8);
                at.seq = at.seq.wrapping_add_signed(jump);
                at.id = at.id.wrapping_add_signed(jump as i16);
                build(
                    kind,
                    flow,
                    usize::from(u16::from_be_bytes([hi, lo])),
                    at,
                    index,
                )
            }
            2 => {
                let Some((&[hi, lo], tail)) = rest.split_first_chunk::<2>() else {
                    break;
                };
                let len = usize::from(u16::from_be_bytes([hi, lo])).min(tail.len());
                let (raw, tail) = tail.split_at(len);
                rest = tail;
                let mut p = raw.to_vec();
                common::fix_up(kind, &mut p);
                if kind & 4 != 0 {
                    frames::fix_transport(&mut p);
                }
                p
            }
            _ => {
                gro.flush();
                continue;
            }
        };
        gro.add(&pkt);
        index += 1;
        bytes += pkt.len();
        if bytes > MAX_BYTES {
            break;
        }
    }
    gro.flush();
});
