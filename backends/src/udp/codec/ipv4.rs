//! The few IPv4 header fields the codec reads or writes, at their fixed offsets.
//!
//! Hand-written rather than etherparse or smoltcp: the codec touches six fields of one header and
//! must rewrite TTL and checksum in place; a parser crate would still need this code around it,
//! and fixed offsets keep the no-panic, no-allocation property easy to see.

use std::net::Ipv4Addr;

use super::drop_reason::DropReason;

/// Length of an IPv4 header without options.
pub const HEADER_LEN: usize = 20;

pub const PROTO_ICMP: u8 = 1;

/// The fields of a header that `parse` has checked against the buffer it came from.
#[derive(Clone, Copy, Debug)]
pub struct Header {
    /// IHL in bytes, at least `HEADER_LEN` and at most the packet's length.
    pub header_len: usize,
    pub tos: u8,
    pub ttl: u8,
    pub protocol: u8,
    /// The fragment offset in 8-byte units (flags masked off).
    pub fragment_offset: u16,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
}

/// Reads the header of `pkt`, which must be exactly one IPv4 packet: version 4, IHL ≥ 5, total
/// length equal to `pkt.len()`, the header inside it. The checksum is not checked here.
pub fn parse(pkt: &[u8]) -> Result<Header, DropReason> {
    let Some(&first) = pkt.first() else {
        return Err(DropReason::Truncated);
    };
    if first >> 4 != 4 {
        return Err(DropReason::NotIpv4);
    }
    let Some(h) = pkt.first_chunk::<HEADER_LEN>() else {
        return Err(DropReason::Truncated);
    };
    let header_len = usize::from(first & 0x0f) * 4;
    if header_len < HEADER_LEN {
        return Err(DropReason::BadHeader);
    }
    if usize::from(u16::from_be_bytes([h[2], h[3]])) != pkt.len() {
        return Err(DropReason::BadLength);
    }
    if header_len > pkt.len() {
        return Err(DropReason::BadHeader);
    }
    Ok(Header {
        header_len,
        tos: h[1],
        ttl: h[8],
        protocol: h[9],
        fragment_offset: u16::from_be_bytes([h[6], h[7]]) & 0x1fff,
        src: Ipv4Addr::new(h[12], h[13], h[14], h[15]),
        dst: Ipv4Addr::new(h[16], h[17], h[18], h[19]),
    })
}

/// The ones' complement sum of `data` as 16-bit big-endian words (RFC 1071), folded, not
/// inverted. An odd last byte is padded with zero.
pub fn sum(data: &[u8]) -> u16 {
    let mut words = data.chunks_exact(2);
    let mut acc: u64 = words
        .by_ref()
        .map(|w| u64::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    if let [last] = words.remainder() {
        acc += u64::from(*last) << 8;
    }
    fold(acc)
}

/// The Internet checksum of `data` (checksum field zeroed), or, over data that carries its
/// checksum, zero exactly when that checksum is right.
pub fn checksum(data: &[u8]) -> u16 {
    !sum(data)
}

fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// Decrements the TTL of a packet `parse` accepted (so the header is there) and fixes the header
/// checksum incrementally (RFC 1624), m being the TTL/protocol word.
pub fn decrement_ttl(pkt: &mut [u8]) {
    let Some(h) = pkt.first_chunk_mut::<HEADER_LEN>() else {
        return;
    };
    let old = u16::from_be_bytes([h[8], h[9]]);
    h[8] = h[8].wrapping_sub(1);
    let new = u16::from_be_bytes([h[8], h[9]]);
    let hc = u16::from_be_bytes([h[10], h[11]]);
    h[10..12].copy_from_slice(&update(hc, old, new).to_be_bytes());
}

/// The checksum `hc` after one 16-bit word changed from `old` to `new` (RFC 1624 eqn. 3).
fn update(hc: u16, old: u16, new: u16) -> u16 {
    !fold(u64::from(!hc) + u64::from(!old) + u64::from(new))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 1071's worked example: the sum of 00 01 f2 03 f4 f5 f6 f7 is ddf2.
    #[test]
    fn sum_matches_the_rfc_1071_example() {
        assert_eq!(
            sum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
            0xddf2
        );
    }

    #[test]
    fn an_odd_last_byte_counts_as_the_high_byte_of_a_word() {
        assert_eq!(sum(&[0x12, 0x34, 0x56]), 0x1234 + 0x5600);
    }

    /// RFC 1624 section 4: m 0x5555 → 0x3285 under HC 0xDD2F gives 0x0000 (eqn. 2 gave 0xFFFF).
    #[test]
    fn incremental_update_gives_the_rfc_1624_example() {
        assert_eq!(update(0xdd2f, 0x5555, 0x3285), 0x0000);
    }

    #[test]
    fn ttl_decrement_keeps_the_header_checksum_right() {
        let mut hdr = [0u8; HEADER_LEN];
        hdr[0] = 0x45;
        hdr[3] = 20;
        hdr[8] = 1;
        hdr[9] = 1;
        let c = checksum(&hdr);
        hdr[10..12].copy_from_slice(&c.to_be_bytes());
        decrement_ttl(&mut hdr);
        assert_eq!(hdr[8], 0);
        assert_eq!(checksum(&hdr), 0);
    }
}
