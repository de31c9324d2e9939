//! The udp data plane's packet codec: no I/O, caller-owned buffers.
//!
//! The I/O layer reads a packet from the TUN and asks `egress` what to do with it (send it to a
//! peer, write an ICMP error back, or drop it); it receives a datagram and asks `ingress` whether
//! it may go to the TUN. Both read an immutable `PeerTable` the I/O layer swaps whole on
//! reconcile. Neither allocates nor panics, whatever the bytes (fuzzed in `backends/fuzz/`).
//!
//! What the I/O layer must know:
//! - The reply buffer: `REPLY_LEN` (576) bytes gives RFC 1812's full quote; a smaller one gives a
//!   shorter quote, and none below 28 + the packet's header + 8 bytes (at most 96).
//! - ICMP errors come from this host's lease network address, flannel0's own address, as from a
//!   router's interface. Linux drops a packet arriving with a local source as a martian unless
//!   `accept_local` is set on the receiving device, so flannel0 needs
//!   `net.ipv4.conf.flannel0.accept_local=1` (checked on kernel 6.18 with rp_filter 0, 1 and 2;
//!   without it the errors vanish, as flannel's own did). `ingress` keeps that safe: a peer can
//!   never deliver a packet with a source in this host's lease.
//! - Rate-limit ICMP errors before writing them (`IcmpRateLimiter`, one per worker).
//! - `egress` and `ingress` take exactly one IPv4 packet: split GSO/GRO batches first.

mod counters;
mod drop_reason;
mod icmp;
mod ipv4;
mod table;

#[cfg(test)]
mod bench;
#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;

use std::net::SocketAddrV4;

pub use counters::{Counters, SharedCounters};
pub use drop_reason::DropReason;
pub use icmp::{IcmpRateLimiter, REPLY_LEN};
pub use table::PeerTable;

/// What to do with a packet read from the TUN device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Egress {
    /// Send the (TTL-decremented, checksum-fixed in place) packet to this endpoint.
    Send(SocketAddrV4),
    /// An ICMP error of this many bytes was written into `reply`: write it back to the TUN.
    Reply(usize),
    Drop(DropReason),
}

/// Decides what to do with one IPv4 packet read from the TUN (`pkt` is exactly the packet), as a
/// router would:
/// - a destination outside the cluster network is dropped (the kernel routes only the network
///   here);
/// - one in this host's own lease gets ICMP host unreachable: the kernel should have delivered
///   it locally (docker0/cni0 is down or lacks the address), and sending it to a peer would loop;
/// - one no peer holds gets ICMP net unreachable, as RFC 1812 5.2.7.1 asks of a router with no
///   route;
/// - otherwise a TTL of 1 or 0 gets ICMP time exceeded; any other TTL is decremented, the header
///   checksum fixed incrementally, and the packet goes to the peer.
///
/// The header checksum is not verified: the kernel made it. The source is not checked either;
/// the receiving peer checks it against this host's lease.
pub fn egress(table: &PeerTable, pkt: &mut [u8], reply: &mut [u8]) -> Egress {
    let hdr = match ipv4::parse(pkt) {
        Ok(h) => h,
        Err(r) => return Egress::Drop(r),
    };
    let answer = |reply: &mut [u8], kind, code, reason| match icmp::error(
        reply,
        pkt,
        &hdr,
        table.network(),
        table.own(),
        kind,
        code,
    ) {
        Some(n) => Egress::Reply(n),
        None => Egress::Drop(reason),
    };
    if !table.network().contains(&hdr.dst) {
        return Egress::Drop(DropReason::OutsideNetwork);
    }
    if table.own().contains(&hdr.dst) {
        return answer(
            reply,
            icmp::DEST_UNREACHABLE,
            icmp::HOST_UNREACHABLE,
            DropReason::LocalDestination,
        );
    }
    let Some(endpoint) = table.lookup(hdr.dst) else {
        return answer(
            reply,
            icmp::DEST_UNREACHABLE,
            icmp::NET_UNREACHABLE,
            DropReason::NoRoute,
        );
    };
    if hdr.ttl <= 1 {
        return answer(
            reply,
            icmp::TIME_EXCEEDED,
            icmp::TTL_EXCEEDED_IN_TRANSIT,
            DropReason::TtlExceeded,
        );
    }
    ipv4::decrement_ttl(pkt);
    Egress::Send(endpoint)
}

/// Checks one datagram received from `from` (the outer source) before it is written to the TUN:
/// it must come from a current peer's PublicIP (any source port: flannel sends from 8285 but NAT
/// may change it), hold one well-formed IPv4 packet whose total length equals the datagram
/// length, whose source lies in that peer's lease (any of them, if the address holds several)
/// and whose destination lies in this host's lease.
///
/// The header checksum is verified too: the kernel would drop a bad one after the write anyway,
/// and here it is counted. The TTL is left alone; the kernel decrements it when it forwards the
/// packet on to the container.
pub fn ingress(table: &PeerTable, from: SocketAddrV4, pkt: &[u8]) -> Result<(), DropReason> {
    // Strangers first: the cheapest check, and what a flood would be.
    let leases = table.sender_subnets(*from.ip());
    if leases.is_empty() {
        return Err(DropReason::UnknownSender);
    }
    let hdr = ipv4::parse(pkt)?;
    if pkt
        .get(..hdr.header_len)
        .is_none_or(|h| ipv4::checksum(h) != 0)
    {
        return Err(DropReason::BadChecksum);
    }
    if !leases.iter().any(|n| n.contains(&hdr.src)) {
        return Err(DropReason::SourceNotInSenderLease);
    }
    if !table.own().contains(&hdr.dst) {
        return Err(DropReason::DestinationNotLocal);
    }
    Ok(())
}
