//! The outer UDP socket, one per worker on the same port (SO_REUSEPORT: the kernel spreads
//! peers over the workers by their address hash). IPv4 (udp, flannel-wg), IPv6 only
//! (flannel-wg-v6), or one IPv6 socket taking both families (a flannel-wg carrying both): there
//! IPv4 peers are v4-mapped addresses on the wire of the API, and plain IPv4 ones everywhere else.
//!
//! quinn-udp does the system calls: UDP GSO (UDP_SEGMENT) on send, UDP GRO on receive, batched
//! recvmmsg, and GSO turned off for good when the kernel or driver refuses it with EIO/EINVAL (as
//! wireguard-go does). It sends one sendmsg per run of segments (it has no sendmmsg on Linux): a
//! run is up to 64 packets, so batching across runs would save little.

use std::io::{self, IoSliceMut};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};

use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{setsockopt, sockopt};
use quinn_udp::{RecvMeta, Transmit, UdpSockRef, UdpSocketState};
use socket2::{Domain, Protocol, Type};
use tracing::debug;

use crate::Error;

/// Socket buffers: deep enough to absorb a burst of 64 KB GSO/GRO batches while a worker is
/// busy with the other direction. The default (rmem_max, ~200 KB) drops under bulk transfers.
const BUFFER_BYTES: usize = 4 << 20;

/// How long a send may wait for room in a full socket buffer before its packets are dropped.
const SEND_WAIT: Duration = Duration::from_millis(100);

/// At most 64 segments per UDP GSO send (UDP_MAX_SEGMENTS in the kernel).
const MAX_SEGMENTS: usize = 64;

/// The largest UDP payload over IPv4 (65535 − IP 20 − UDP 8): the bound on a GSO send's total
/// (IPv6 allows 20 bytes more; one bound for both keeps runs alike).
pub const MAX_PAYLOAD: usize = 65507;

/// The addresses a socket is bound for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// AF_INET, 0.0.0.0.
    V4,
    /// AF_INET6, [::] with IPV6_V6ONLY.
    V6Only,
    /// AF_INET6, [::] without IPV6_V6ONLY: IPv4 peers too. Where the kernel has no IPv6, AF_INET.
    Dual,
}

pub struct Socket {
    sock: UdpSocket,
    state: UdpSocketState,
    /// Whether GSO may be used (the Offload option); quinn-udp may still turn it off.
    gso: bool,
    /// AF_INET6: IPv4 destinations go as v4-mapped addresses.
    v6: bool,
}

impl Socket {
    /// Binds 0.0.0.0:`port` with SO_REUSEPORT, non-blocking. `offload` false turns UDP GRO off
    /// and never asks for GSO.
    pub fn bind(port: u16, offload: bool) -> Result<Self, Error> {
        Self::bind_family(port, Family::V4, offload)
    }

    /// [`Socket::bind`] for `family`.
    pub fn bind_family(port: u16, family: Family, offload: bool) -> Result<Self, Error> {
        let ctx = || format!("UDP socket on port {port}");
        let domain = match family {
            Family::V4 => Domain::IPV4,
            Family::V6Only | Family::Dual => Domain::IPV6,
        };
        let s = match socket2::Socket::new(domain, Type::DGRAM, Some(Protocol::UDP)) {
            Err(e) if family == Family::Dual && e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
                debug!(port, "no IPv6 in this kernel: an IPv4 socket");
                return Self::bind_family(port, Family::V4, offload);
            }
            s => s.map_err(Error::io(ctx()))?,
        };
        s.set_reuse_port(true).map_err(Error::io(ctx()))?;
        let any = match family {
            Family::V4 => SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)),
            Family::V6Only | Family::Dual => {
                s.set_only_v6(family == Family::V6Only)
                    .map_err(Error::io(ctx()))?;
                SocketAddr::from((Ipv6Addr::UNSPECIFIED, port))
            }
        };
        s.bind(&any.into())
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
            ?family,
            gso = offload && state.max_gso_segments() > 1,
            gro = offload && state.gro_segments() > 1,
            "UDP socket bound"
        );
        Ok(Self {
            sock,
            state,
            gso: offload,
            v6: domain == Domain::IPV6,
        })
    }

    /// Whether it is an AF_INET6 socket (IPv6 peers; IPv4 ones too unless V6ONLY).
    pub fn is_v6(&self) -> bool {
        self.v6
    }

    /// `to` as this socket's family writes it: an IPv4 address v4-mapped on an AF_INET6 socket,
    /// a v4-mapped one plain on an AF_INET socket; an IPv6 one there cannot be reached.
    fn destination(&self, to: SocketAddr) -> io::Result<SocketAddr> {
        match (to, self.v6) {
            (SocketAddr::V4(a), true) => Ok(SocketAddr::V6(SocketAddrV6::new(
                a.ip().to_ipv6_mapped(),
                a.port(),
                0,
                0,
            ))),
            (SocketAddr::V6(a), false) => match a.ip().to_ipv4_mapped() {
                Some(ip) => Ok(SocketAddr::V4(SocketAddrV4::new(ip, a.port()))),
                None => Err(io::Error::from_raw_os_error(libc::EAFNOSUPPORT)),
            },
            _ => Ok(to),
        }
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
    pub fn send(&self, to: SocketAddr, contents: &[u8], seg: Option<usize>) -> io::Result<()> {
        let t = Transmit {
            destination: self.destination(to)?,
            ecn: None,
            contents,
            segment_size: seg,
            src_ip: None,
        };
        self.state.try_send(UdpSockRef::from(&self.sock), &t)
    }

    /// Sends a run of datagrams (`seg` bytes each but the last, one system call with GSO),
    /// waiting a little for room when the socket buffer is full (`wake` readable ends the
    /// wait). Where the kernel refuses GSO (quinn-udp has then turned it off), sends them one by
    /// one.
    pub fn send_run(
        &self,
        wake: BorrowedFd<'_>,
        to: SocketAddr,
        contents: &[u8],
        seg: Option<usize>,
    ) -> io::Result<()> {
        let result = self.send_waiting(wake, to, contents, seg);
        let Some(seg) = seg else {
            return result;
        };
        match &result {
            Err(e) if matches!(e.raw_os_error(), Some(libc::EIO | libc::EINVAL)) => {
                let mut result = Ok(());
                for c in contents.chunks(seg.max(1)) {
                    if let Err(e) = self.send_waiting(wake, to, c, None) {
                        result = Err(e);
                    }
                }
                result
            }
            _ => result,
        }
    }

    fn send_waiting(
        &self,
        wake: BorrowedFd<'_>,
        to: SocketAddr,
        contents: &[u8],
        seg: Option<usize>,
    ) -> io::Result<()> {
        let deadline = Instant::now() + SEND_WAIT;
        loop {
            match self.send(to, contents, seg) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(e);
                    }
                    let mut fds = [
                        PollFd::new(self.as_fd(), PollFlags::POLLOUT),
                        PollFd::new(wake, PollFlags::POLLIN),
                    ];
                    let ms = u16::try_from(left.as_millis().max(1)).unwrap_or(u16::MAX);
                    let _ = poll(&mut fds, PollTimeout::from(ms));
                    if fds[1].revents().is_some_and(|r| !r.is_empty()) {
                        return Err(e);
                    }
                }
                other => return other,
            }
        }
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

/// The datagrams in one receive buffer. With UDP GRO the kernel glues datagrams of `stride`
/// bytes (the last may be shorter) into one buffer; without it `stride` is the buffer's length.
/// The stride is not trusted: 0 gives the buffer whole, one beyond it the same. An empty buffer
/// is one empty datagram, still a (malformed) packet to count. No allocation: the hot path.
pub fn split_gro(data: &[u8], stride: usize) -> impl Iterator<Item = &[u8]> {
    const ONE_EMPTY: &[&[u8]] = &[&[]];
    let stride = if stride == 0 { data.len() } else { stride };
    let empty = if data.is_empty() { ONE_EMPTY } else { &[] };
    data.chunks(stride.max(1)).chain(empty.iter().copied())
}

/// Consecutive packets for one peer of `seg` bytes each but the last: one GSO send.
#[derive(Clone, Copy)]
pub struct Run {
    pub to: SocketAddr,
    /// Byte offset in the buffer the run lies in.
    pub start: usize,
    pub seg: usize,
    pub len: usize,
    pub count: usize,
    /// A shorter packet ended it.
    closed: bool,
}

impl Run {
    pub fn new(to: SocketAddr, start: usize, len: usize) -> Self {
        Self {
            to,
            start,
            seg: len,
            len,
            count: 1,
            closed: false,
        }
    }

    /// Whether a packet of `len` bytes to `to` may join the run.
    pub fn takes(&self, to: SocketAddr, len: usize, max_segments: usize) -> bool {
        to == self.to
            && !self.closed
            && len <= self.seg
            && self.count < max_segments
            && self.len + len <= MAX_PAYLOAD
    }

    pub fn add(&mut self, len: usize) {
        self.len += len;
        self.count += 1;
        self.closed = len < self.seg;
    }
}

/// recvmmsg batch.
pub const RX_MSGS: usize = 16;
/// One receive buffer: a whole GRO run (or the largest datagram).
pub const RX_BUF: usize = 1 << 16;

/// One worker's receive batch: [`RX_MSGS`] buffers of [`RX_BUF`] bytes, each a GRO run of
/// datagrams from one sender. Allocated once.
pub struct Receives {
    buf: Vec<u8>,
    meta: Vec<RecvMeta>,
}

impl Default for Receives {
    fn default() -> Self {
        Self {
            buf: vec![0; RX_MSGS * RX_BUF],
            meta: vec![RecvMeta::default(); RX_MSGS],
        }
    }
}

impl Receives {
    /// One recvmmsg: how many buffers were filled; `None` when there was nothing to receive. A
    /// failed receive (an ICMP error about an earlier send, ENOBUFS) is `Some(0)`: transient.
    pub fn fill(&mut self, sock: &Socket) -> Option<usize> {
        let mut chunks = self.buf.chunks_exact_mut(RX_BUF);
        let mut bufs: [IoSliceMut<'_>; RX_MSGS] =
            std::array::from_fn(|_| IoSliceMut::new(chunks.next().unwrap_or_default()));
        match sock.recv(&mut bufs, &mut self.meta) {
            Ok(n) => Some(n.min(RX_MSGS)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
            Err(_) => Some(0),
        }
    }

    /// Buffer `i`'s sender (an IPv4 one plain, also when it came v4-mapped) and its datagrams.
    pub fn buffer(&self, i: usize) -> Option<(SocketAddr, impl Iterator<Item = &[u8]>)> {
        let m = self.meta.get(i)?;
        let from = unmapped(m.addr);
        let start = i * RX_BUF;
        let data = self.buf.get(start..start + m.len.min(RX_BUF))?;
        Some((from, split_gro(data, m.stride)))
    }
}

/// `a` with a v4-mapped address as the IPv4 address it stands for: one peer, one address,
/// whichever socket it came through.
pub fn unmapped(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(ip) => SocketAddr::V4(SocketAddrV4::new(ip, v6.port())),
            None => a,
        },
        SocketAddr::V4(_) => a,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(data: &[u8], stride: usize) -> Vec<&[u8]> {
        split_gro(data, stride).collect()
    }

    #[test]
    fn a_gro_buffer_splits_into_datagrams_of_its_stride_the_last_maybe_shorter() {
        let data: Vec<u8> = (0..10).collect();
        assert_eq!(split(&data, 4), [&data[..4], &data[4..8], &data[8..]]);
        assert_eq!(split(&data, 5), [&data[..5], &data[5..]]);
        assert_eq!(split(&data, 10), [&data[..]], "one datagram: no GRO");
    }

    #[test]
    fn a_hostile_stride_gives_the_buffer_whole() {
        let data = [7u8; 10];
        assert_eq!(split(&data, 0), [&data[..]]);
        assert_eq!(split(&data, 11), [&data[..]]);
        // quinn-udp reads the GRO size as a C int: a negative one arrives huge.
        assert_eq!(split(&data, usize::MAX), [&data[..]]);
    }

    #[test]
    fn an_empty_datagram_is_one_packet() {
        for stride in [0, 1, 1472, usize::MAX] {
            assert_eq!(split(&[], stride), [&[] as &[u8]], "stride {stride}");
        }
    }

    #[test]
    fn a_v4_mapped_sender_is_its_ipv4_address_and_ipv6_ones_stay() {
        let mapped: SocketAddr = "[::ffff:192.168.1.2]:51820".parse().expect("addr");
        assert_eq!(unmapped(mapped), "192.168.1.2:51820".parse().expect("addr"));
        let v6: SocketAddr = "[fd00:192:168:100::2]:51821".parse().expect("addr");
        assert_eq!(unmapped(v6), v6);
        let v4: SocketAddr = "10.0.0.1:1".parse().expect("addr");
        assert_eq!(unmapped(v4), v4);
    }

    #[test]
    fn each_socket_family_writes_destinations_its_own_way() {
        let v4: SocketAddr = "192.168.1.2:51820".parse().expect("addr");
        let mapped: SocketAddr = "[::ffff:192.168.1.2]:51820".parse().expect("addr");
        let v6: SocketAddr = "[fd00::2]:51821".parse().expect("addr");
        let dual = Socket::bind_family(0, Family::Dual, false).expect("bind [::]:0");
        if dual.is_v6() {
            assert_eq!(dual.destination(v4).expect("mapped"), mapped);
            assert_eq!(dual.destination(v6).expect("as is"), v6);
        }
        let plain = Socket::bind(0, false).expect("bind 0.0.0.0:0");
        assert_eq!(plain.destination(v4).expect("as is"), v4);
        assert_eq!(plain.destination(mapped).expect("unmapped"), v4);
        let e = plain
            .destination(v6)
            .expect_err("no IPv6 on an IPv4 socket");
        assert_eq!(e.raw_os_error(), Some(libc::EAFNOSUPPORT));
    }
}
