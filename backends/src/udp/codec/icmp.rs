//! ICMP errors as a router sends them (RFC 1812 4.3.2, RFC 1122 3.2.2), and a rate limiter for
//! the I/O layer.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use super::drop_reason::DropReason;
use super::ipv4::{self, Header, HEADER_LEN, PROTO_ICMP};

/// The largest ICMP error sent: RFC 1812 4.3.2.3 quotes as much of the datagram as fits in 576
/// bytes. A reply buffer of this size always gets the full quote.
pub const REPLY_LEN: usize = 576;

/// IPv4 header plus the 8-byte ICMP header.
const PREFIX_LEN: usize = HEADER_LEN + 8;

pub const DEST_UNREACHABLE: u8 = 3;
pub const NET_UNREACHABLE: u8 = 0;
pub const HOST_UNREACHABLE: u8 = 1;
pub const TIME_EXCEEDED: u8 = 11;
pub const TTL_EXCEEDED_IN_TRANSIT: u8 = 0;

/// Writes an ICMP error (`kind`, `code`) about `pkt` (whose header is `hdr`) into `reply`, from
/// `own`'s network address (flannel0's address), and returns its length; `None` when no error
/// may be sent about this packet or `reply` cannot hold the IP header and 8 bytes of it.
pub fn error(
    reply: &mut [u8],
    pkt: &[u8],
    hdr: &Header,
    network: Ipv4Net,
    own: Ipv4Net,
    kind: u8,
    code: u8,
) -> Option<usize> {
    if !may_answer(pkt, hdr, network, own) {
        return None;
    }
    // RFC 792 asks for the header and 64 bits of data; RFC 1812 for as much as fits in 576.
    let room = reply.len().min(REPLY_LEN).checked_sub(PREFIX_LEN)?;
    let quote = pkt.len().min(room);
    if quote < pkt.len().min(hdr.header_len + 8) {
        return None;
    }
    let total = PREFIX_LEN + quote;
    let reply = reply.get_mut(..total)?;
    let (prefix, body) = reply.split_at_mut(PREFIX_LEN);
    let (ip, icmp) = prefix.split_at_mut(HEADER_LEN);
    body.copy_from_slice(pkt.get(..quote)?);

    // RFC 1812 4.3.2.5: errors go at precedence 6 (internetwork control), as Linux sends them.
    let tos = 0xc0 | (hdr.tos & 0x1e);
    let len = (total as u16).to_be_bytes();
    // DF with ID 0: an atomic datagram (RFC 6864), never fragmented at ≤ 576 bytes.
    ip.copy_from_slice(&[
        0x45, tos, len[0], len[1], 0, 0, 0x40, 0, 64, PROTO_ICMP, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ]);
    ip[12..16].copy_from_slice(&own.network().octets());
    ip[16..20].copy_from_slice(&hdr.src.octets());
    let c = ipv4::checksum(ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());

    // Type, code, checksum, and 4 unused bytes (no next-hop MTU, no RFC 4884 length).
    icmp.copy_from_slice(&[kind, code, 0, 0, 0, 0, 0, 0]);
    let c = !fold2(ipv4::sum(icmp), ipv4::sum(body));
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    Some(total)
}

/// Ones' complement addition of two folded sums (the ICMP header is even-length, so the body's
/// words line up).
fn fold2(a: u16, b: u16) -> u16 {
    let (s, carry) = a.overflowing_add(b);
    s + u16::from(carry)
}

/// RFC 1812 4.3.2.7 / RFC 1122 3.2.2: no error about a non-first fragment, an ICMP error, a
/// datagram to a broadcast or multicast address, or one whose source is not a single host.
fn may_answer(pkt: &[u8], hdr: &Header, network: Ipv4Net, own: Ipv4Net) -> bool {
    if hdr.fragment_offset != 0 {
        return false;
    }
    if hdr.protocol == PROTO_ICMP {
        // Only about queries (echo, timestamp, information, address mask and their replies);
        // every other type counts as an error, as in Linux (icmp_pointers[].error). A packet too
        // short to have a type gets nothing either.
        match pkt.get(hdr.header_len) {
            Some(0 | 8 | 13..=18) => {}
            _ => return false,
        }
    }
    !is_broadcast(hdr.dst, network, own) && single_host(hdr.src, network, own)
}

fn is_broadcast(a: Ipv4Addr, network: Ipv4Net, own: Ipv4Net) -> bool {
    a.is_broadcast() || a.is_multicast() || subnet_broadcast(a, network) || subnet_broadcast(a, own)
}

/// Whether `a` may be the source of one host: not 0.0.0.0/8, loopback, multicast, class E
/// (which holds 255.255.255.255), nor the broadcast address of the network or this host's lease.
fn single_host(a: Ipv4Addr, network: Ipv4Net, own: Ipv4Net) -> bool {
    let first = a.octets()[0];
    first != 0
        && !a.is_loopback()
        && !a.is_multicast()
        && first < 240
        && !subnet_broadcast(a, network)
        && !subnet_broadcast(a, own)
}

/// /31 and /32 have no broadcast address (RFC 3021).
fn subnet_broadcast(a: Ipv4Addr, net: Ipv4Net) -> bool {
    net.prefix_len() < 31 && a == net.broadcast()
}

/// A token bucket for the ICMP errors `egress` builds, for the I/O layer (the codec has no
/// clock). Each worker keeps its own; Linux's defaults are 1000 a second with a burst of 50
/// (net.ipv4.icmp_msgs_per_sec / icmp_msgs_burst), so divide the rate by the worker count to
/// match them host-wide.
#[derive(Clone, Debug)]
pub struct IcmpRateLimiter {
    /// Nanoseconds between two errors at the steady rate.
    interval: u64,
    /// The most credit that can pile up: `burst` intervals.
    cap: u64,
    /// Credit in nanoseconds; one error spends `interval`.
    credit: u64,
    last: u64,
}

impl IcmpRateLimiter {
    /// `per_sec` errors a second on average (at least 1), bursts of up to `burst` (at least 1).
    pub fn new(per_sec: u32, burst: u32) -> Self {
        let interval = 1_000_000_000 / u64::from(per_sec.max(1));
        let cap = interval.saturating_mul(u64::from(burst.max(1)));
        Self {
            interval,
            cap,
            credit: cap,
            last: 0,
        }
    }

    /// Whether one more error may go out at `now_nanos` (any monotonic clock, e.g. nanoseconds
    /// since the worker started); spends it if so. A clock that steps back counts as no time.
    pub fn allow(&mut self, now_nanos: u64) -> bool {
        let elapsed = now_nanos.saturating_sub(self.last);
        self.last = self.last.max(now_nanos);
        self.credit = self.credit.saturating_add(elapsed).min(self.cap);
        if self.credit >= self.interval {
            self.credit -= self.interval;
            true
        } else {
            false
        }
    }
}

impl Default for IcmpRateLimiter {
    fn default() -> Self {
        Self::new(1000, 50)
    }
}

/// The reason behind an ICMP error `egress` wrote into `reply`.
pub fn reason_of_reply(reply: &[u8]) -> DropReason {
    match reply.get(20..22) {
        Some([TIME_EXCEEDED, _]) => DropReason::TtlExceeded,
        Some([DEST_UNREACHABLE, HOST_UNREACHABLE]) => DropReason::LocalDestination,
        _ => DropReason::NoRoute,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_limiter_allows_a_burst_then_the_steady_rate() {
        let mut l = IcmpRateLimiter::new(10, 3);
        let t0 = 5_000_000_000;
        assert_eq!((0..5).filter(|_| l.allow(t0)).count(), 3, "the burst");
        assert!(!l.allow(t0 + 50_000_000), "half an interval later");
        assert!(l.allow(t0 + 100_000_000), "one interval later");
        assert!(!l.allow(t0 + 100_000_000));
        assert_eq!(
            (0..10).filter(|_| l.allow(t0 + 10_000_000_000)).count(),
            3,
            "a long pause refills only the burst"
        );
    }

    #[test]
    fn the_rate_limiter_survives_a_clock_stepping_back_and_zero_settings() {
        let mut l = IcmpRateLimiter::new(0, 0);
        assert!(l.allow(u64::MAX));
        assert!(!l.allow(0));
        assert!(!l.allow(u64::MAX));
    }
}
