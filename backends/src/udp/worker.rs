//! The I/O loop: one plain thread per TUN queue, each with its own UDP socket, polling both (and
//! a wake-up socket for shutdown). Buffers are allocated once per worker; per packet there is no
//! allocation and no lock: the peer table is read through an `ArcSwap` snapshot once per batch,
//! counters are plain integers published once per batch.
//!
//! TUN → peers: with offloads, one read returns a TCP/UDP super-packet of up to 64 KB that tun-rs
//! splits into MTU-sized IP packets, written side by side into `tx`, one slot of `stride`
//! (= MTU) bytes each. Full-sized segments therefore already lie back to back, which is exactly
//! what a UDP GSO send wants: consecutive packets for the same peer of the same size (the last
//! may be shorter) go out in one sendmsg, and the kernel cuts them into one datagram each, so a
//! flannel peer still sees one IP packet per datagram. Shorter packets are moved together first.
//!
//! Peers → TUN: recvmmsg with UDP GRO hands over runs of datagrams in one buffer; each is
//! checked by the codec where it lies, consecutive TCP segments of one flow are merged into one
//! super-packet (`gro`), and that goes to the TUN behind its virtio-net header in one writev of
//! up to 64 KB. Anything else is written as it lies; without offloads, one write per packet.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use tracing::warn;
use tun_rs::{SyncDevice, VIRTIO_NET_HDR_LEN};

use super::codec::{self, Counters, DropReason, Egress, IcmpRateLimiter, PeerTable};
use crate::offload::gro::{Coalescer, HDR_LEN};
use crate::offload::socket::{Receives, Run, Socket};
use crate::offload::stats::Slots;
use crate::offload::tun::{self, Reads};

/// Linux's ICMP error rate limit (net.ipv4.icmp_msgs_per_sec and icmp_msgs_burst): weft, a
/// router in userspace, sends its errors at the rate the kernel would, whatever it is set to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IcmpRate {
    pub per_sec: u32,
    pub burst: u32,
}

/// A count sysctl's text: a number from 0 (no errors beyond a burst, as in the kernel; the rate
/// limiter allows one a second) up.
fn sysctl_count(text: &str) -> Option<u32> {
    let v = text.trim().parse::<i64>().ok()?;
    (v >= 0).then(|| u32::try_from(v).unwrap_or(u32::MAX))
}

impl IcmpRate {
    /// The kernel's defaults.
    pub const DEFAULT: Self = Self {
        per_sec: 1000,
        burst: 50,
    };

    /// The rate set in this network namespace's sysctls; a setting that cannot be read or is
    /// not a number keeps the default.
    pub fn of_this_namespace() -> Self {
        let read = |name: &str| {
            let path = format!("/proc/sys/net/ipv4/{name}");
            sysctl_count(&std::fs::read_to_string(path).ok()?)
        };
        let d = Self::DEFAULT;
        Self {
            per_sec: read("icmp_msgs_per_sec").unwrap_or(d.per_sec),
            burst: read("icmp_msgs_burst").unwrap_or(d.burst),
        }
    }
}
/// At most one warning per worker in this interval about failing sends.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// What the workers share with `Udp`.
pub struct Shared {
    pub table: ArcSwap<PeerTable>,
    pub stop: AtomicBool,
    /// What each worker counted, for the metrics.
    pub slots: Arc<Slots>,
    /// The host's ICMP error rate, which the workers split between them.
    pub icmp: IcmpRate,
}

impl Shared {
    pub fn new(table: PeerTable, workers: usize, icmp: IcmpRate) -> Self {
        Self {
            icmp,
            table: ArcSwap::from_pointee(table),
            stop: AtomicBool::new(false),
            slots: Arc::new(Slots::new(workers)),
        }
    }
}

pub struct Worker {
    id: usize,
    tun: SyncDevice,
    /// Length of the virtio-net header in front of every TUN packet (0 without offloads).
    hdr: usize,
    sock: Socket,
    wake: UnixStream,
    shared: Arc<Shared>,
    counters: Counters,
    tun_read_errors: u64,
    icmp: IcmpRateLimiter,
    started: Instant,
    last_warn: Option<Instant>,
    /// TUN reads, split (and the sends built where they lie).
    reads: Reads,
    /// An ICMP error for the TUN, behind a zeroed virtio-net header.
    reply: Vec<u8>,
    rx: Receives,
    /// Merges TCP segments for the TUN (with offloads).
    gro: Coalescer,
}

impl Worker {
    pub fn new(
        id: usize,
        tun: SyncDevice,
        (vnet_hdr, uso): (bool, bool),
        mtu: usize,
        sock: Socket,
        wake: UnixStream,
        shared: Arc<Shared>,
    ) -> Self {
        // The rate is the host's: shared by the workers.
        let workers = shared.slots.workers().max(1) as u32;
        let icmp = shared.icmp;
        let icmp_per_sec = icmp.per_sec / workers;
        let hdr = if vnet_hdr { VIRTIO_NET_HDR_LEN } else { 0 };
        Self {
            id,
            tun,
            hdr,
            sock,
            wake,
            shared,
            counters: Counters::default(),
            tun_read_errors: 0,
            icmp: IcmpRateLimiter::new(icmp_per_sec, icmp.burst),
            started: Instant::now(),
            last_warn: None,
            reads: Reads::new(mtu),
            reply: vec![0; hdr + codec::REPLY_LEN],
            rx: Receives::default(),
            gro: Coalescer::new(vnet_hdr && uso),
        }
    }

    /// Runs until told to stop. Err: the data plane cannot go on (the TUN queue is gone).
    pub fn run(&mut self) -> Result<(), String> {
        self.publish();
        while !self.shared.stop.load(Ordering::Relaxed) {
            let sent = self.tun_to_peers()?;
            let received = self.peers_to_tun()?;
            if sent || received {
                self.publish();
            } else {
                self.wait()?;
            }
        }
        self.publish();
        Ok(())
    }

    fn publish(&self) {
        let gso = self.sock.gso();
        (self.shared.slots).publish(self.id, &self.counters, self.tun_read_errors, gso);
    }

    /// Sleeps until the TUN queue or the socket has something, or shutdown.
    fn wait(&self) -> Result<(), String> {
        let mut fds = [
            PollFd::new(self.tun.as_fd(), PollFlags::POLLIN),
            PollFd::new(self.sock.as_fd(), PollFlags::POLLIN),
            PollFd::new(self.wake.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(format!("poll: {e}")),
        }
        if fds[0]
            .revents()
            .is_some_and(|r| r.intersects(PollFlags::POLLERR | PollFlags::POLLNVAL))
        {
            return Err("the TUN queue reports an error (device deleted?)".into());
        }
        Ok(())
    }

    /// One batch from the TUN to the peers. Returns whether anything was read.
    fn tun_to_peers(&mut self) -> Result<bool, String> {
        let filled = self.reads.fill(&self.tun, &mut self.tun_read_errors)?;
        if filled == 0 {
            return Ok(false);
        }
        self.forward(filled)?;
        Ok(true)
    }

    /// Runs the codec over the `n` packets in `tx` and sends them, grouped into GSO runs.
    fn forward(&mut self, n: usize) -> Result<(), String> {
        let table = self.shared.table.load();
        let mut run: Option<Run> = None;
        for i in 0..n {
            let at = i * self.reads.stride;
            let len = self.reads.sizes[i].min(self.reads.stride);
            let Some(pkt) = self.reads.tx.get_mut(at..at + len) else {
                continue;
            };
            let reply = self.reply.get_mut(self.hdr..).unwrap_or_default();
            let verdict = codec::egress(&table, pkt, reply);
            self.counters.record_egress(&verdict, len, reply);
            match verdict {
                Egress::Send(to) => {
                    let to = SocketAddr::V4(to);
                    if let Some(r) = &mut run {
                        if r.takes(to, len, self.sock.max_segments(r.seg)) {
                            let dst = r.start + r.len;
                            if dst != at {
                                self.reads.tx.copy_within(at..at + len, dst);
                            }
                            r.add(len);
                            continue;
                        }
                        let done = *r;
                        self.send_run(done);
                    }
                    run = Some(Run::new(to, at, len));
                }
                Egress::Reply(m) => self.reply_to_tun(m)?,
                Egress::Drop(_) => {}
            }
        }
        if let Some(r) = run {
            self.send_run(r);
        }
        Ok(())
    }

    fn reply_to_tun(&mut self, len: usize) -> Result<(), String> {
        let now = self.started.elapsed().as_nanos() as u64;
        if !self.icmp.allow(now) {
            self.counters.icmp_rate_limited += 1;
            return Ok(());
        }
        let Some(buf) = self.reply.get(..self.hdr + len) else {
            return Ok(());
        };
        // The header stays all zero: no GSO, checksum complete.
        match self.tun.send(buf) {
            Ok(_) => self.counters.icmp_sent += 1,
            Err(e) if tun::is_gone(&e) => return Err(format!("write to the TUN: {e}")),
            Err(_) => self.counters.count_drop(DropReason::TunWriteFailed),
        }
        Ok(())
    }

    /// Sends one run; failures are counted, never fatal.
    fn send_run(&mut self, r: Run) {
        let Some(contents) = self.reads.tx.get(r.start..r.start + r.len) else {
            return;
        };
        let seg = (r.count > 1).then_some(r.seg);
        let result = self.sock.send_run(self.wake.as_fd(), r.to, contents, seg);
        if let Err(e) = result {
            // The codec counted these as sent; they are drops.
            self.counters.tx_packets = self.counters.tx_packets.saturating_sub(r.count as u64);
            self.counters.tx_bytes = self.counters.tx_bytes.saturating_sub(r.len as u64);
            for _ in 0..r.count {
                self.counters.count_drop(DropReason::SendFailed);
            }
            self.warn_send(&e, r.to);
        }
    }

    fn warn_send(&mut self, e: &io::Error, to: SocketAddr) {
        if self.last_warn.is_some_and(|t| t.elapsed() < WARN_EVERY) {
            return;
        }
        self.last_warn = Some(Instant::now());
        warn!(worker = self.id, peer = %to, error = %e,
              dropped_so_far = self.counters.drop_count(DropReason::SendFailed),
              "UDP send failing; packets dropped (next report in a minute at the earliest)");
    }

    /// One batch from the peers to the TUN. Returns whether anything was received.
    fn peers_to_tun(&mut self) -> Result<bool, String> {
        let Some(n) = self.rx.fill(&self.sock) else {
            return Ok(false);
        };
        let table = self.shared.table.load();
        let vnet = self.hdr != 0;
        // Write failures are counted after the batch; the writer only notes them.
        let mut writer = tun::Writer::new(std::slice::from_ref(&self.tun), vnet);
        let mut write = |hdr: &[u8; HDR_LEN], pkt: &[u8], n: usize| writer.write(hdr, pkt, n);
        for i in 0..n {
            let Some((from, datagrams)) = self.rx.buffer(i) else {
                continue;
            };
            for pkt in datagrams {
                let verdict = match from {
                    SocketAddr::V4(from) => codec::ingress(&table, from, pkt),
                    // flannel's udp is IPv4 only: no peer has an IPv6 PublicIP.
                    SocketAddr::V6(_) => Err(DropReason::UnknownSender),
                };
                self.counters.record_ingress(verdict, pkt.len());
                if verdict.is_err() {
                    continue;
                }
                if vnet {
                    self.gro.add(pkt, &mut write);
                } else {
                    write(&[0; HDR_LEN], pkt, 1);
                }
            }
        }
        self.gro.flush(&mut write);
        // The codec counted them as received.
        writer.finish(&mut self.counters)?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::sysctl_count;

    #[test]
    fn an_icmp_rate_sysctl_is_a_count() {
        assert_eq!(sysctl_count("1000\n"), Some(1000));
        assert_eq!(sysctl_count("0\n"), Some(0));
        assert_eq!(sysctl_count("99999999999"), Some(u32::MAX));
        assert_eq!(sysctl_count("-1"), None);
        assert_eq!(sysctl_count("fast"), None);
        assert_eq!(sysctl_count(""), None);
    }
}
