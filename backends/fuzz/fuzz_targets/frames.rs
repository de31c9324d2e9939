//! What the TUN gets from the coalescer, checked against the packets pushed into it: every packet
//! comes out exactly once and in order, alone and byte for byte, or inside a merged frame that
//! the kernel accepts and cuts back into that very packet (Linux's GSO: `tcp_gso_segment`,
//! `__udp_gso_segment`, `inet_gso_segment`).

#![allow(dead_code)] // each target uses a part

use std::collections::VecDeque;

use weft_backends::offload::gro::{Coalescer, HDR_LEN as VNET_HDR_LEN};

use crate::common::{fold, sum};

const NEEDS_CSUM: u8 = 1;
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;
const GSO_UDP_L4: u8 = 5;
pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
const FIN: u8 = 0x01;
const PSH: u8 = 0x08;
const IP_LEN: usize = 20;
const IP6_LEN: usize = 40;
const MAX_PACKET: usize = 65535;
/// The kernel refuses a UDP_L4 frame of more (virtio_net_hdr_to_skb: UDP_MAX_SEGMENTS).
const MAX_UDP_SEGMENTS: usize = 64;

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn ne16(b: &[u8], at: usize) -> usize {
    usize::from(u16::from_ne_bytes([b[at], b[at + 1]]))
}

/// Where the transport checksum of an IPv4 packet with this protocol sits, from the header's end.
fn checksum_offset(proto: u8) -> Option<usize> {
    match proto {
        TCP => Some(16),
        UDP => Some(6),
        _ => None,
    }
}

/// Whether `pkt` is IPv6 (else IPv4).
fn is_v6(pkt: &[u8]) -> bool {
    pkt.first().is_some_and(|b| b >> 4 == 6)
}

/// The IP header's length (IPv6: without extension headers) and the transport protocol.
fn ip_header(pkt: &[u8]) -> (usize, Option<u8>) {
    if is_v6(pkt) {
        (IP6_LEN, pkt.get(6).copied())
    } else {
        let hl = usize::from(pkt.first().map_or(0, |b| b & 0x0f)) * 4;
        (hl, pkt.get(9).copied())
    }
}

/// The pseudo-header sum of `pkt` (addresses, protocol, transport length).
fn pseudo(pkt: &[u8], hl: usize) -> u64 {
    let (addresses, proto) = if is_v6(pkt) {
        (&pkt[8..40], pkt[6])
    } else {
        (&pkt[12..20], pkt[9])
    };
    sum(addresses) + u64::from(proto) + (pkt.len() - hl) as u64
}

/// Whether the TCP or UDP checksum of `pkt` is right (IPv4 UDP's 0 meaning "none" counts as
/// right).
pub fn transport_ok(pkt: &[u8]) -> bool {
    let (hl, proto) = ip_header(pkt);
    if proto == Some(UDP) && !is_v6(pkt) && pkt[hl + 6..hl + 8] == [0, 0] {
        return true;
    }
    fold(pseudo(pkt, hl) + sum(&pkt[hl..])) == 0xffff
}

/// Writes the right TCP or UDP checksum into `pkt` if it is a whole IPv4 or IPv6 packet of
/// either.
pub fn fix_transport(pkt: &mut [u8]) {
    let (hl, proto) = ip_header(pkt);
    let Some(off) = proto.and_then(checksum_offset) else {
        return;
    };
    if hl < IP_LEN || hl + off + 2 > pkt.len() || pkt.len() > MAX_PACKET {
        return;
    }
    pkt[hl + off..hl + off + 2].fill(0);
    let mut c = !fold(pseudo(pkt, hl) + sum(&pkt[hl..]));
    if proto == Some(UDP) && c == 0 {
        c = 0xffff;
    }
    pkt[hl + off..hl + off + 2].copy_from_slice(&c.to_be_bytes());
}

/// A coalescer and the packets pushed into it that have not come out yet.
pub struct Checked {
    gro: Coalescer,
    uso: bool,
    pending: VecDeque<Vec<u8>>,
    /// Frames written by the coalescer, not yet checked: (header, packet, packet count).
    written: Vec<([u8; VNET_HDR_LEN], Vec<u8>, usize)>,
}

impl Checked {
    /// `uso`: the TUN takes UDP GSO frames.
    pub fn new(uso: bool) -> Self {
        Self {
            gro: Coalescer::new(uso),
            uso,
            pending: VecDeque::new(),
            written: Vec::new(),
        }
    }

    pub fn add(&mut self, pkt: &[u8]) {
        self.pending.push_back(pkt.to_vec());
        let written = &mut self.written;
        self.gro
            .add(pkt, &mut |h, p, n| written.push((*h, p.to_vec(), n)));
        self.check_written();
    }

    /// The end of a batch: nothing may stay behind.
    pub fn flush(&mut self) {
        let written = &mut self.written;
        self.gro
            .flush(&mut |h, p, n| written.push((*h, p.to_vec(), n)));
        self.check_written();
        assert!(self.pending.is_empty(), "a flush left packets behind");
        self.gro
            .flush(&mut |_, _, _| panic!("a second flush wrote"));
    }

    fn check_written(&mut self) {
        for (hdr, frame, n) in std::mem::take(&mut self.written) {
            assert!(
                n >= 1 && n <= self.pending.len(),
                "a frame of {n} packets with {} pushed and not yet out",
                self.pending.len()
            );
            let originals: Vec<Vec<u8>> = self.pending.drain(..n).collect();
            if hdr == [0; VNET_HDR_LEN] {
                assert_eq!(n, 1, "a plain frame carries one packet");
                assert_eq!(frame, originals[0], "a plain frame is the packet as pushed");
            } else {
                check_merged(&hdr, &frame, &originals, self.uso);
            }
        }
    }
}

/// A GSO frame: the kernel takes it (virtio_net_hdr_to_skb's rules) and its segments are the
/// packets that went in, but for what segmentation rewrites: the checksums, and the IP ID of a
/// packet with DF (Linux's GRO does not keep those either, RFC 6864).
fn check_merged(hdr: &[u8; VNET_HDR_LEN], frame: &[u8], originals: &[Vec<u8>], uso: bool) {
    let n = originals.len();
    assert!(n >= 2, "a GSO frame of one packet");
    assert_eq!(hdr[0], NEEDS_CSUM);
    let v6 = is_v6(frame);
    let ip_len = if v6 { IP6_LEN } else { IP_LEN };
    let (proto, csum_offset) = match hdr[1] {
        GSO_TCPV4 if !v6 => (TCP, 16),
        GSO_TCPV6 if v6 => (TCP, 16),
        GSO_UDP_L4 => {
            assert!(uso, "a UDP GSO frame to a TUN without USO");
            (UDP, 6)
        }
        t => panic!("gso_type {t} for an IPv{} frame", if v6 { 6 } else { 4 }),
    };
    let (hdr_len, gso_size) = (ne16(hdr, 2), ne16(hdr, 4));
    assert_eq!((ne16(hdr, 6), ne16(hdr, 8)), (ip_len, csum_offset));

    assert!(frame.len() <= MAX_PACKET && frame.len() > hdr_len);
    if v6 {
        assert_eq!(
            usize::from(be16(frame, 4)),
            frame.len() - IP6_LEN,
            "payload length"
        );
        assert_eq!(frame[6], proto, "an extension header merged");
    } else {
        assert_eq!(frame[0], 0x45);
        assert_eq!(usize::from(be16(frame, 2)), frame.len());
        assert_eq!(fold(sum(&frame[..IP_LEN])), 0xffff, "IP header checksum");
        assert_eq!(frame[9], proto);
        assert!(frame[6] & 0x3f == 0 && frame[7] == 0, "a fragment merged");
    }
    if proto == TCP {
        assert_eq!(hdr_len, ip_len + usize::from(frame[ip_len + 12] >> 4) * 4);
    } else {
        assert_eq!(hdr_len, ip_len + 8);
        assert_eq!(usize::from(be16(frame, ip_len + 4)), frame.len() - ip_len);
        assert!(n <= MAX_UDP_SEGMENTS);
    }
    let payload = &frame[hdr_len..];
    // More than one segment's worth, or the kernel does not treat it as GSO.
    assert!(gso_size >= 1 && payload.len() > gso_size);
    assert_eq!(payload.len().div_ceil(gso_size), n, "packets counted");
    // NEEDS_CSUM: the field holds the pseudo-header sum, which the kernel completes.
    let at = ip_len + csum_offset;
    assert_eq!(
        be16(frame, at),
        fold(pseudo(frame, ip_len)),
        "partial checksum"
    );

    for (k, (chunk, orig)) in payload.chunks(gso_size).zip(originals).enumerate() {
        assert_eq!(hdr_len + chunk.len(), orig.len(), "segment {k}'s length");
        assert!(chunk == &orig[hdr_len..], "segment {k}'s payload");
        // Checksums compared as valid, not as bytes; the ID of a packet with DF not at all.
        let masked = |h: &[u8]| {
            let mut h = h.to_vec();
            h[at..at + 2].fill(0);
            if !v6 {
                h[10..12].fill(0);
                if orig[6] & 0x40 != 0 {
                    h[4..6].fill(0);
                }
            }
            h
        };
        let head = segment_header(frame, hdr_len, gso_size, k, n, chunk.len());
        assert_eq!(
            masked(&head),
            masked(&orig[..hdr_len]),
            "segment {k}'s headers"
        );
        // The kernel computes the checksums anew: merging must not launder a corrupt packet.
        assert!(
            transport_ok(orig),
            "packet {k} had a bad checksum and was merged"
        );
    }
}

/// The headers of segment `k` of `n` as Linux cuts it from a GSO frame: the frame's, with this
/// length, the IPv4 ID counted up from the frame's, TCP's sequence number advanced and PSH and
/// FIN only on the last, UDP's length its own. Checksums left out.
fn segment_header(
    frame: &[u8],
    hdr_len: usize,
    gso_size: usize,
    k: usize,
    n: usize,
    payload: usize,
) -> Vec<u8> {
    let mut p = frame[..hdr_len].to_vec();
    let len = hdr_len + payload;
    let (ip_len, proto) = if is_v6(frame) {
        p[4..6].copy_from_slice(&((len - IP6_LEN) as u16).to_be_bytes());
        (IP6_LEN, p[6])
    } else {
        p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        let id = be16(frame, 4).wrapping_add(k as u16);
        p[4..6].copy_from_slice(&id.to_be_bytes());
        (IP_LEN, p[9])
    };
    let t = ip_len;
    if proto == TCP {
        let seq = u32::from_be_bytes([p[t + 4], p[t + 5], p[t + 6], p[t + 7]]);
        let seq = seq.wrapping_add((k * gso_size) as u32);
        p[t + 4..t + 8].copy_from_slice(&seq.to_be_bytes());
        if k + 1 < n {
            p[t + 13] &= !(PSH | FIN);
        }
    } else {
        let udp_len = (len - ip_len) as u16;
        p[t + 4..t + 6].copy_from_slice(&udp_len.to_be_bytes());
    }
    p
}
