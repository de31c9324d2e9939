//! Any bytes as weft's userspace WireGuard worker first looks at them, before boringtun's own
//! checks: as a packet from flannel-wg (routed to the peer whose subnet holds its destination,
//! or counted as a drop exactly once) and as a datagram from the network (matched to a peer by
//! its receiver index or, for a handshake initiation, its static key; then opened by that peer's
//! session, which has none here, so nothing may come out for the TUN).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    weft_backends::wireguard_fuzz_lookups(data);
});
