//! What a userspace data plane (udp, wireguard's userspace path) needs to move packets in batches
//! rather than one per system call: the TUN device with its virtio-net header (TSO/USO super-
//! packets in and out), the UDP socket with GSO and GRO, and the coalescer that builds
//! super-packets for the TUN. No backend logic: the backends decide what each packet is.

pub mod flow;
pub mod gro;
pub mod socket;
pub mod stats;
pub mod tun;

/// One worker per core (at most 16): the kernel spreads flows over the TUN queues and peers
/// over the sockets (SO_REUSEPORT hashes each peer's address to one).
pub fn workers() -> usize {
    std::thread::available_parallelism()
        .map(usize::from)
        .unwrap_or(1)
        .clamp(1, 16)
}
