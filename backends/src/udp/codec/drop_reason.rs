//! Why packets were dropped: a fixed set, each counted separately.

/// Why a packet was dropped: a fixed set, each counted separately.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Shorter than an IPv4 header (or empty).
    Truncated,
    /// IP version other than 4.
    NotIpv4,
    /// IHL below 5, or a header longer than the packet.
    BadHeader,
    /// Total length differs from the length of the buffer or datagram.
    BadLength,
    /// Received: the inner header checksum is wrong (the kernel would drop it after the write).
    BadChecksum,
    /// Sent: the destination lies outside the cluster network.
    OutsideNetwork,
    /// Sent: no peer holds the destination (ICMP net unreachable went back, unless not allowed).
    NoRoute,
    /// Sent: the destination is in this host's own lease, which the kernel should have delivered
    /// locally (ICMP host unreachable went back, unless not allowed).
    LocalDestination,
    /// Sent: TTL ran out here (ICMP time exceeded went back, unless not allowed).
    TtlExceeded,
    /// Received from an address that is no current peer's PublicIP.
    UnknownSender,
    /// Received: the inner source lies outside the sending peer's lease.
    SourceNotInSenderLease,
    /// Received: the inner destination lies outside this host's lease.
    DestinationNotLocal,
    /// Counted by the I/O layer: the UDP send failed.
    SendFailed,
    /// Counted by the I/O layer: the write to the TUN failed.
    TunWriteFailed,
    /// Received (wireguard): a counter this session has already seen, a replay.
    Replayed,
    /// Received (wireguard): for a current session but failing its authentication (a forged or
    /// corrupted datagram, a handshake that does not verify).
    BadAuthentication,
    /// Received (wireguard): a handshake beyond the rate this host answers; a cookie went back,
    /// with which the sender may try again.
    UnderLoad,
}

impl DropReason {
    pub const COUNT: usize = 17;

    /// Every reason, in `index` order.
    pub const ALL: [DropReason; Self::COUNT] = [
        Self::Truncated,
        Self::NotIpv4,
        Self::BadHeader,
        Self::BadLength,
        Self::BadChecksum,
        Self::OutsideNetwork,
        Self::NoRoute,
        Self::LocalDestination,
        Self::TtlExceeded,
        Self::UnknownSender,
        Self::SourceNotInSenderLease,
        Self::DestinationNotLocal,
        Self::SendFailed,
        Self::TunWriteFailed,
        Self::Replayed,
        Self::BadAuthentication,
        Self::UnderLoad,
    ];

    /// A dense index in `0..COUNT`, for arrays of counters.
    pub fn index(self) -> usize {
        self as usize
    }

    /// A stable snake_case name, for metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Truncated => "truncated",
            Self::NotIpv4 => "not_ipv4",
            Self::BadHeader => "bad_header",
            Self::BadLength => "bad_length",
            Self::BadChecksum => "bad_checksum",
            Self::OutsideNetwork => "outside_network",
            Self::NoRoute => "no_route",
            Self::LocalDestination => "local_destination",
            Self::TtlExceeded => "ttl_exceeded",
            Self::UnknownSender => "unknown_sender",
            Self::SourceNotInSenderLease => "source_not_in_sender_lease",
            Self::DestinationNotLocal => "destination_not_local",
            Self::SendFailed => "send_failed",
            Self::TunWriteFailed => "tun_write_failed",
            Self::Replayed => "replayed",
            Self::BadAuthentication => "bad_authentication",
            Self::UnderLoad => "under_load",
        }
    }
}

impl std::fmt::Display for DropReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
