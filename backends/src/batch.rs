//! Many netlink requests in one datagram, the kernel answering only the ones that fail.
//!
//! Programming 10,000 peers is 40,000 requests (neighbour, FDB entry, nexthop, route). Sent one
//! per system call, each acknowledged and its acknowledgement read and matched, the round trips
//! cost as much as the kernel's work. The kernel handles a route-netlink datagram synchronously,
//! within `sendmsg`, message after message, and answers a request without `NLM_F_ACK` only if it
//! fails. So each datagram here carries up to [`PER_DATAGRAM`] requests without that flag, and
//! once `sendmsg` returns, the socket already holds every failure of it: read until empty, they
//! are all there is to read. Each request's sequence number says which it was.
//!
//! The socket is a plain blocking one, used only between awaits: a datagram's send and the
//! reading of its failures never interleave with another's, and the runtime gets a turn between
//! datagrams (each is at most a few milliseconds of kernel work).

use std::num::NonZeroI32;
use std::sync::{Arc, Mutex, PoisonError};

use rtnetlink::packet_core::{
    ErrorMessage, NetlinkDeserializable, NetlinkHeader, NetlinkMessage, NetlinkPayload,
    NetlinkSerializable, NLM_F_REQUEST,
};
use rtnetlink::sys::protocols::NETLINK_ROUTE;
use rtnetlink::sys::Socket;

use crate::Error;

/// Requests per datagram. Each failure is queued on the socket as a small datagram of its own
/// (~1 KB of receive buffer with its overhead): a datagram whose requests all fail must not
/// overrun the receive buffer before they are read.
pub const PER_DATAGRAM: usize = 128;

/// Bytes per datagram: far below the socket's send buffer, and the kernel's allocation for it.
const DATAGRAM_BYTES: usize = 32 * 1024;

/// Receive buffer asked for (the kernel caps it at `net.core.rmem_max`).
const RECEIVE_BUFFER: usize = 1 << 20;

/// One request: the message and its flags (`NLM_F_CREATE`, `NLM_F_EXCL`, `NLM_F_REPLACE`...).
pub type Request<T> = (T, u16);

/// A route-netlink socket for batches of requests. Cloning shares the socket.
#[derive(Clone)]
pub struct Batch {
    inner: Arc<Mutex<Inner>>,
}

struct Inner {
    socket: Socket,
    /// The sequence number of the next request.
    seq: u32,
    buf: Vec<u8>,
}

impl Batch {
    /// Opens the socket in the current network namespace.
    pub fn open() -> Result<Self, Error> {
        let open = || {
            let mut socket = Socket::new(NETLINK_ROUTE)?;
            socket.bind_auto()?;
            // Failures quote only the request's header, not the whole request.
            socket.set_cap_ack(true)?;
            Ok(socket)
        };
        let socket = open().map_err(Error::io("open netlink socket for batched requests"))?;
        // Best effort: the default (~200 KB) holds a datagram's worth of failures too.
        let _ = socket.set_rx_buf_sz(RECEIVE_BUFFER);
        Ok(Self {
            inner: Arc::new(Mutex::new(Inner {
                socket,
                seq: 1,
                buf: Vec::with_capacity(DATAGRAM_BYTES),
            })),
        })
    }

    /// Sends each request (`None`: none at that position), [`PER_DATAGRAM`] to a datagram, in
    /// order. The kernel's verdict on each position, in order: a position without a request
    /// succeeds.
    pub async fn send<T, I>(&self, requests: I) -> Verdicts
    where
        T: NetlinkSerializable + NetlinkDeserializable,
        I: IntoIterator<Item = Option<Request<T>>>,
    {
        let mut requests = requests.into_iter().enumerate().peekable();
        let mut failed = Vec::new();
        let mut len = 0;
        while requests.peek().is_some() {
            {
                let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
                let first_seq = inner.seq;
                // Which position each request of this datagram is, by sequence number.
                let mut positions = Vec::with_capacity(PER_DATAGRAM);
                inner.buf.clear();
                while positions.len() < PER_DATAGRAM && inner.buf.len() < DATAGRAM_BYTES {
                    let Some((i, request)) = requests.next() else {
                        break;
                    };
                    len = i + 1;
                    let Some((msg, flags)) = request else {
                        continue;
                    };
                    let seq = first_seq.wrapping_add(positions.len() as u32);
                    inner.encode(msg, flags, seq);
                    positions.push(i);
                }
                inner.seq = first_seq.wrapping_add(positions.len() as u32);
                if !positions.is_empty() {
                    inner.exchange::<T>(first_seq, &positions, &mut failed);
                }
            }
            tokio::task::yield_now().await;
        }
        Verdicts::new(failed, len)
    }
}

impl Inner {
    fn encode<T: NetlinkSerializable>(&mut self, msg: T, flags: u16, seq: u32) {
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = seq;
        let mut msg = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        msg.finalize();
        let at = self.buf.len();
        // Messages start 4-byte aligned (NLMSG_ALIGN), as the kernel steps through them.
        let len = msg.buffer_len();
        self.buf.resize(at + len.next_multiple_of(4), 0);
        msg.serialize(&mut self.buf[at..at + len]);
    }

    /// Sends the datagram in `buf` and reads its failures into `failed` (by position). If the
    /// datagram cannot be sent, or failures were lost, every request of it without a verdict
    /// read fails: the caller cannot tell what the kernel did with it.
    fn exchange<T: NetlinkDeserializable>(
        &mut self,
        first_seq: u32,
        positions: &[usize],
        failed: &mut Vec<(usize, rtnetlink::Error)>,
    ) {
        let start = failed.len();
        let mut lost = None;
        if let Err(e) = self.socket.send(&self.buf, 0) {
            lost = Some(e.raw_os_error().unwrap_or(libc::EIO));
        }
        let mut reply = Vec::with_capacity(4096);
        while lost.is_none() {
            reply.clear();
            match self.socket.recv(&mut reply, libc::MSG_DONTWAIT) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                // ENOBUFS: failures were dropped.
                Err(e) => {
                    lost = Some(e.raw_os_error().unwrap_or(libc::EIO));
                    break;
                }
            }
            let Ok(msg) = NetlinkMessage::<T>::deserialize(&reply) else {
                // Not a failure as the kernel writes them: what it says cannot be known.
                lost = Some(libc::EIO);
                break;
            };
            let k = msg.header.sequence_number.wrapping_sub(first_seq) as usize;
            match (msg.payload, positions.get(k)) {
                (NetlinkPayload::Error(e), Some(&i)) if e.code.is_some() => {
                    failed.push((i, rtnetlink::Error::NetlinkError(e)));
                }
                // Another datagram's (none should be left), or an acknowledgement.
                _ => {}
            }
        }
        if let Some(errno) = lost {
            let known: Vec<usize> = failed[start..].iter().map(|(i, _)| *i).collect();
            for &i in positions.iter().filter(|i| !known.contains(i)) {
                failed.push((i, errno_error(errno)));
            }
        }
        // In position order, as Verdicts reads them.
        failed[start..].sort_by_key(|(i, _)| *i);
    }
}

/// An error as the kernel would have answered it.
fn errno_error(errno: i32) -> rtnetlink::Error {
    let mut e = ErrorMessage::default();
    e.code = NonZeroI32::new(-errno.abs()).or(NonZeroI32::new(-libc::EIO));
    rtnetlink::Error::NetlinkError(e)
}

/// The verdict on each position of a [`Batch::send`], in order. Holds only the failures.
pub struct Verdicts {
    failed: std::iter::Peekable<std::vec::IntoIter<(usize, rtnetlink::Error)>>,
    next: usize,
    len: usize,
}

impl Verdicts {
    fn new(failed: Vec<(usize, rtnetlink::Error)>, len: usize) -> Self {
        Self {
            failed: failed.into_iter().peekable(),
            next: 0,
            len,
        }
    }
}

impl Iterator for Verdicts {
    type Item = Result<(), rtnetlink::Error>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.len {
            return None;
        }
        let i = self.next;
        self.next += 1;
        match self.failed.next_if(|(at, _)| *at == i) {
            Some((_, e)) => Some(Err(e)),
            None => Some(Ok(())),
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.len - self.next;
        (left, Some(left))
    }
}

impl ExactSizeIterator for Verdicts {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_are_dense_from_the_failures_alone() {
        let failed = vec![
            (1, errno_error(libc::EEXIST)),
            (3, errno_error(libc::ENOENT)),
        ];
        let got: Vec<Option<i32>> = Verdicts::new(failed, 5)
            .map(|r| r.err().and_then(|e| crate::error::errno(&e)))
            .collect();
        assert_eq!(
            got,
            [None, Some(libc::EEXIST), None, Some(libc::ENOENT), None]
        );
    }
}
