//! The outer UDP socket, one per worker on the same port (SO_REUSEPORT: the kernel spreads
//! peers over the workers by their address hash).
//!
//! quinn-udp does the system calls: UDP GSO (UDP_SEGMENT) on send, UDP GRO on receive, batched
//! recvmmsg, and GSO turned off for good when the kernel or driver refuses it with EIO/EINVAL (as
//! wireguard-go does). It sends one sendmsg per run of segments (it has no sendmmsg on Linux): a
//! run is up to 64 packets, so batching across runs would save little.

use std::io::{self, IoSliceMut};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};

use nix::sys::socket::{setsockopt, sockopt};
use quinn_udp::{RecvMeta, Transmit, UdpSockRef, UdpSocketState};
use socket2::{Domain, Protocol, Type};
use tracing::debug;

use crate::Error;

/// Socket buffers: deep enough to absorb a burst of 64 KB GSO/GRO batches while a worker is
/// busy with the other direction. The default (rmem_max, ~200 KB) drops under bulk transfers.
const BUFFER_BYTES: usize = 4 << 20;

/// At most 64 segments per UDP GSO send (UDP_MAX_SEGMENTS in the kernel).
const MAX_SEGMENTS: usize = 64;

/// The largest UDP payload over IPv4 (65535 − IP 20 − UDP 8): the bound on a GSO send's total.
pub const MAX_PAYLOAD: usize = 65507;

pub struct Socket {
    sock: UdpSocket,
    state: UdpSocketState,
    /// Whether GSO may be used (the Offload option); quinn-udp may still turn it off.
    gso: bool,
}

impl Socket {
    /// Binds 0.0.0.0:`port` with SO_REUSEPORT, non-blocking. `offload` false turns UDP GRO off
    /// and never asks for GSO.
    pub fn bind(port: u16, offload: bool) -> Result<Self, Error> {
        let ctx = || format!("UDP socket on port {port}");
        let s = socket2::Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))
            .map_err(Error::io(ctx()))?;
        s.set_reuse_port(true).map_err(Error::io(ctx()))?;
        s.bind(&SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port).into())
            .map_err(Error::io(format!("bind {}", ctx())))?;
        let sock: UdpSocket = s.into();
        // *BUFFORCE needs CAP_NET_ADMIN, which weftd has; without it, take what rmem_max allows.
        if setsockopt(&sock, sockopt::RcvBufForce, &BUFFER_BYTES).is_err() {
            let _ = socket2::SockRef::from(&sock).set_recv_buffer_size(BUFFER_BYTES);
        }
        if setsockopt(&sock, sockopt::SndBufForce, &BUFFER_BYTES).is_err() {
            let _ = socket2::SockRef::from(&sock).set_send_buffer_size(BUFFER_BYTES);
        }
        let state = UdpSocketState::new(UdpSockRef::from(&sock)).map_err(Error::io(ctx()))?;
        if !offload && state.gro_segments() > 1 {
            setsockopt(&sock, sockopt::UdpGroSegment, &false)
                .map_err(|e| Error::io(ctx())(e.into()))?;
        }
        debug!(
            port,
            gso = offload && state.max_gso_segments() > 1,
            gro = offload && state.gro_segments() > 1,
            "UDP socket bound"
        );
        Ok(Self {
            sock,
            state,
            gso: offload,
        })
    }

    /// How many segments of `seg` bytes one send may carry now (1 = no GSO).
    pub fn max_segments(&self, seg: usize) -> usize {
        if !self.gso {
            return 1;
        }
        self.state
            .max_gso_segments()
            .min(MAX_SEGMENTS)
            .min(MAX_PAYLOAD / seg.max(1))
            .max(1)
    }

    /// Whether GRO may hand over several datagrams in one buffer.
    pub fn gro(&self) -> bool {
        self.gso && self.state.gro_segments() > 1
    }

    /// Whether GSO is still in use (quinn-udp turns it off when the kernel refuses it).
    pub fn gso(&self) -> bool {
        self.max_segments(1) > 1
    }

    /// Sends `contents` to `to`: one datagram, or with `seg` set, datagrams of `seg` bytes (the
    /// last may be shorter) in one system call.
    pub fn send(&self, to: SocketAddrV4, contents: &[u8], seg: Option<usize>) -> io::Result<()> {
        let t = Transmit {
            destination: SocketAddr::V4(to),
            ecn: None,
            contents,
            segment_size: seg,
            src_ip: None,
        };
        self.state.try_send(UdpSockRef::from(&self.sock), &t)
    }

    /// recvmmsg into `bufs`; `meta[i]` describes `bufs[i]` (several datagrams of `stride` bytes
    /// when GRO merged them).
    pub fn recv(&self, bufs: &mut [IoSliceMut<'_>], meta: &mut [RecvMeta]) -> io::Result<usize> {
        self.state.recv(UdpSockRef::from(&self.sock), bufs, meta)
    }

    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.sock)
    }
}
