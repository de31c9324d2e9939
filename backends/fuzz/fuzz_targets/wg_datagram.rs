//! Any bytes as weft's userspace WireGuard worker first looks at them, before boringtun's own
//! checks: as a packet from a device carrying both families and from flannel-wg-v6 (routed to
//! the peer whose IPv4 or IPv6 subnet holds its destination, or counted as a drop exactly once);
//! as the source of an opened packet (admitted only inside the sender's subnet of its family);
//! and as a datagram from an IPv4 or IPv6 address (matched to a peer by its receiver index or,
//! for a handshake initiation, its static key; then opened by that peer's session, which has
//! none here, so nothing may come out for the TUN); and as a packet written to the TUN, through
//! the queue its flow hashes to (in range, and the same for its flow's other direction).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    weft_backends::wireguard_fuzz_lookups(data);
});
