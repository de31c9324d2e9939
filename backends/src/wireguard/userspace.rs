//! weft's userspace WireGuard, for kernels without it: a persistent multi-queue TUN device
//! (`flannel-wg`, `flannel-wg-v6`), UDP sockets on its port, and one boringtun `Tunn` per peer,
//! moved by one worker per core with the udp backend's batching (`crate::offload`).
//!
//! A device carries IPv4, IPv6 or both ([`DeviceSpec`]): a packet goes to the peer whose subnet
//! of its family holds its destination; its sockets are AF_INET, AF_INET6 V6ONLY, or AF_INET6
//! for peers of both families (IPv4 ones v4-mapped).
//!
//! Workers: each owns one TUN queue and one socket bound to the port with SO_REUSEPORT, as
//! udp's do; the kernel spreads flows over the queues and peers over the sockets. A peer's
//! sessions are shared by all workers behind one lock, taken once per run of packets for that
//! peer (a 64 KB super-packet's segments, a GRO buffer's datagrams), never per packet. Each
//! new peer list becomes a new table when it is set (so a packet sent after `set_peers`
//! returns finds its peer), handed to the workers as an `ArcSwap` snapshot read once per batch.
//! A control thread, off the hot path, answers handshakes (their Diffie-Hellman; the workers
//! hand it every handshake message once the rate limiter has passed it), ticks the protocol's
//! timers and refreshes what `wg show` reads.
//!
//! A worker writes each packet it opens through the TUN queue its flow hashes to
//! (`offload::flow`), and the kernel sends the flow's replies out through that queue: one
//! peer's datagrams all arrive at one worker, but its flows are sealed by all of them.
//!
//! TUN → peers: one read returns a TCP/UDP super-packet of up to 64 KB (IPv4 or IPv6: the TUN
//! takes TSO4/TSO6/USO4/USO6), split by tun-rs into MTU-sized packets side by side. Each is sealed by its peer's session straight into the send
//! buffer, one after the other: segments of one super-packet give datagrams of one size (boringtun
//! does not pad), so consecutive ones for one peer go out in one UDP GSO sendmsg.
//! Peers → TUN: recvmmsg with UDP GRO hands over runs of datagrams; each is opened by its
//! peer's session into one scratch buffer, and consecutive TCP segments of one flow are merged
//! back into one super-packet for the TUN (`offload::gro`, IPv4 and IPv6 alike), one write per
//! 64 KB.
//!
//! No allocation per packet once a session is up (boringtun only queues packets while a
//! handshake runs).
//!
//! A datagram is matched to its peer by the receiver index boringtun put in the session (data,
//! handshake response, cookie) or, for a handshake initiation, by the initiator's static key;
//! a decrypted packet whose source lies outside that peer's subnet of its family is dropped. Like the kernel's
//! WireGuard, a peer's endpoint follows the address its authenticated packets come from.

use std::collections::HashMap;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use rtnetlink::Handle;
use tracing::{debug, info, warn};
use tun_rs::{SyncDevice, VIRTIO_NET_HDR_LEN};

use super::config::DeviceSpec;
use super::key::{Key, PrivateKey};
use super::uapi;
use super::want::WgPeer;
use crate::offload::gro::{Coalescer, HDR_LEN};
use crate::offload::socket::{Family, Receives, Run, Socket, RX_BUF};
use crate::offload::stats::{Live, Slots};
use crate::offload::tun::{self, Reads};
use crate::udp::codec::{Counters, DropReason};
use crate::Error;

/// How often the protocol's timers (handshake retries, keepalives, session expiry) are looked
/// at, as boringtun's own device does.
const TICK: Duration = Duration::from_millis(250);

/// A data message around its packet: type, receiver index and counter (16 bytes), the tag (16).
const OVERHEAD: usize = 32;
/// boringtun's smallest output buffer (a handshake initiation).
const MIN_OUT: usize = 148;
/// The message type of a data message (the first byte; the next three are zero).
const DATA: u8 = 4;
/// Handshake messages a second (from anyone) before cookies are asked for: boringtun's device's
/// figure.
const HANDSHAKES: u64 = 100;
/// `wg show`'s view is refreshed (and the handshake count reset) every this many ticks (1 s).
const SHOW_EVERY: u32 = 4;
/// How often a failing send is reported at most.
const WARN_EVERY: Duration = Duration::from_secs(60);
/// The largest handshake message (an initiation); a response is 92 bytes, a cookie reply 64.
const HANDSHAKE_MAX: usize = 148;
/// Handshake messages waiting for the control thread; beyond, they are dropped as under load
/// (the peer retries): far more than the rate limiter lets through in a second.
const HANDSHAKE_QUEUE: usize = 1024;

/// The running data plane of one device.
pub struct Userspace {
    /// The device's index when it was opened: another index means it was recreated.
    pub index: u32,
    shared: Arc<Shared>,
    /// What `wg show` reads.
    device: Arc<Mutex<uapi::Device>>,
    /// Dropped at shutdown, after the workers' clones: the control thread sees it close.
    control_open: Option<SyncSender<Handshake>>,
    /// Written once at shutdown, never drained: every worker's poll returns.
    wake: UnixStream,
    stop: Arc<AtomicBool>,
    /// The workers, then the control thread.
    threads: Vec<JoinHandle<()>>,
    /// What the workers counted, each in its slot, published after each batch.
    slots: Arc<Slots>,
    /// How the device and sockets were set up, for the metrics.
    tun_offload: bool,
    tun_uso: bool,
    udp_gro: bool,
    /// `wg show`'s socket, if it could be had.
    _control: Option<uapi::Server>,
}

impl Userspace {
    /// Opens (or creates) `spec.name` as a persistent TUN device with offloads and `mtu`, up,
    /// with one queue per worker, binds `spec.port` for the families it carries (a socket per
    /// worker), and starts the workers and the control thread with no peer; `socket`: where
    /// `wg show` asks.
    pub async fn start(
        handle: &Handle,
        spec: DeviceSpec,
        private: &PrivateKey,
        mtu: u32,
        socket: PathBuf,
    ) -> Result<Self, Error> {
        let (name, port) = (spec.name, spec.port);
        let dev = tun::open(handle, name, crate::offload::workers(), true).await?;
        // Before it goes up; and a device reopened for IPv6 may have had it off.
        if spec.v6 {
            tun::ensure_ipv6_on(name);
        } else {
            tun::ensure_ipv6_off(name);
        }
        tun::ensure_link(handle, name, mtu, tun::READ_SLOTS as u32).await?;
        let family = match (spec.v4, spec.v6) {
            (_, false) => Family::V4,
            (false, true) => Family::V6Only,
            (true, true) => Family::Dual,
        };
        let sockets = (dev.queues.iter())
            .map(|_| Socket::bind_family(port, family, true).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        let Some(first) = sockets.first().cloned() else {
            return Err(Error::Other(format!("{name}: no queue opened")));
        };
        let (gso, sock_v6) = (first.gso(), first.is_v6());
        let gro = sockets.iter().all(|s| s.gro());
        let (wake, woken) = UnixStream::pair().map_err(Error::io("make a wake-up pair"))?;
        let secret = StaticSecret::from(*private.bytes());
        let public = PublicKey::from(&secret);
        let shared = Arc::new(Shared {
            table: ArcSwap::from_pointee(Table::new(spec)),
            limiter: RateLimiter::new(&public, HANDSHAKES),
            secret,
            public,
        });
        let n = sockets.len();
        // The control thread counts what it does with handshakes in the slot after the workers'.
        let slots = Arc::new(Slots::with_helpers(n, 1));
        let (to_control, handshakes) = sync_channel(HANDSHAKE_QUEUE);
        let device = Arc::new(Mutex::new(uapi::Device {
            private_key: *private.bytes(),
            listen_port: port,
            peers: Vec::new(),
        }));
        // Whole before any thread starts: a failure below drops it, and its Drop stops what did.
        let mut u = Self {
            index: dev.index,
            shared,
            device,
            control_open: Some(to_control.clone()),
            wake,
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::with_capacity(n + 1),
            slots,
            tun_offload: dev.vnet_hdr,
            tun_uso: dev.vnet_hdr && dev.uso,
            udp_gro: gro,
            _control: None,
        };
        let queues: Arc<[SyncDevice]> = dev.queues.into();
        for (id, sock) in sockets.into_iter().enumerate() {
            let woken = (woken.try_clone()).map_err(Error::io("clone the wake-up socket"))?;
            let w = Worker::new(
                id,
                (u.shared.clone(), u.stop.clone(), u.slots.clone()),
                (queues.clone(), u.tun_offload, dev.uso),
                mtu as usize,
                (sock, woken, to_control.clone()),
            );
            let t = std::thread::Builder::new()
                .name(uapi::thread_name(name, &format!("-{id}")))
                .spawn(move || w.run())
                .map_err(Error::io("start a WireGuard worker"))?;
            u.threads.push(t);
        }
        let control = Control {
            shared: u.shared.clone(),
            sock: first,
            handshakes,
            device: u.device.clone(),
            out: vec![0; RX_BUF + OVERHEAD],
            scratch: vec![0; RX_BUF + OVERHEAD],
            ticks: 0,
            counters: Counters::default(),
            slots: u.slots.clone(),
            id: n,
        };
        let t = std::thread::Builder::new()
            .name(uapi::thread_name(name, "-ctl"))
            .spawn(move || control.run())
            .map_err(Error::io("start the WireGuard control thread"))?;
        u.threads.push(t);
        u._control = uapi::Server::start(socket, name, u.device.clone());
        info!(
            device = name,
            port,
            ipv4 = spec.v4,
            ipv6 = spec.v6,
            socket_ipv6 = sock_v6,
            mtu,
            workers = n,
            tun_offload = u.tun_offload,
            udp_gso = gso,
            udp_gro = gro,
            "userspace WireGuard running"
        );
        Ok(u)
    }

    /// Takes `peers` as the whole peer list: the workers route by it from their next batch on
    /// (a peer whose key, PSK and keepalive are unchanged keeps its sessions). Built here, not
    /// on a worker, so no packet waits for a new peer's static Diffie-Hellman (boringtun does
    /// one per peer it is given, tens of µs each).
    pub fn set_peers(&mut self, peers: Vec<WgPeer>) -> Result<(), Error> {
        let next = self.shared.table.load().next(&self.shared.secret, peers);
        self.shared.table.store(Arc::new(next));
        show(&self.shared, &self.device);
        Ok(())
    }

    /// What the workers have counted so far: packets and bytes each way (inner packets), and
    /// drops by reason.
    pub fn counters(&self) -> Counters {
        self.slots.counters()
    }

    /// The workers for the metrics: where they publish, how they run.
    pub fn live(&self) -> Live {
        Live {
            slots: self.slots.clone(),
            tun_offload: self.tun_offload,
            tun_uso: self.tun_uso,
            udp_gro: self.udp_gro,
        }
    }

    /// Whether every worker and the control thread still run.
    pub fn alive(&self) -> bool {
        !self.threads.is_empty() && self.threads.iter().all(|t| !t.is_finished())
    }
}

impl Drop for Userspace {
    /// The threads stop and the workers close their TUN queues; the device (persistent) keeps
    /// its address and route for the next weftd.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.wake.write(&[1]);
        // With the workers' ends (they go as the workers are joined), the control thread sees
        // its channel close.
        self.control_open = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// What the workers and the control thread share.
struct Shared {
    secret: StaticSecret,
    public: PublicKey,
    /// The current peers: replaced whole by `set_peers`, read once per batch.
    table: ArcSwap<Table>,
    /// Handshakes this host answers a second before it asks for cookies (all peers, all
    /// workers).
    limiter: RateLimiter,
}

/// A peer as the lease gives it, fixed for one table; its sessions live on across tables.
struct Peer {
    key: Key,
    psk: Option<Key>,
    keepalive: Option<u16>,
    /// Its subnets of the families the device carries: what it may send from, what goes to it.
    allowed: Option<Ipv4Net>,
    allowed6: Option<Ipv6Net>,
    /// The index boringtun puts (shifted) in this peer's sessions.
    index: u32,
    session: Arc<Mutex<Session>>,
}

/// What changes as a peer's packets move, shared by the workers: taken once per run of packets.
struct Session {
    tunn: Tunn,
    /// Where its packets go: its lease's PublicIP(v6):Port, then where it last spoke from.
    endpoint: SocketAddr,
    /// When a handshake last completed (boringtun forgets it with the session).
    last_handshake: Option<SystemTime>,
}

impl Peer {
    /// Whether an opened packet from `src` may come from this peer: inside its subnet of that
    /// family (none where the device does not carry the family or the peer has no such lease).
    fn admits(&self, src: IpAddr) -> bool {
        match src {
            IpAddr::V4(a) => self.allowed.is_some_and(|n| n.contains(&a)),
            IpAddr::V6(a) => self.allowed6.is_some_and(|n| n.contains(&a)),
        }
    }

    /// Its sessions, for one run of packets. Poisoned by a worker's panic, they are taken
    /// anyway: the backend sees the worker gone (`alive`) and starts the data plane afresh.
    fn lock(&self) -> MutexGuard<'_, Session> {
        self.session.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The lock of one peer's sessions that a worker holds over a run of packets for that peer.
struct Held<'a> {
    at: usize,
    session: MutexGuard<'a, Session>,
}

/// `held` as the lock of peer `at` of `table`: kept if it already is, else the other one is let
/// go first (a worker holds one peer at a time, so workers never wait on each other in a cycle).
fn hold<'a, 'h>(
    held: &'h mut Option<Held<'a>>,
    table: &'a Table,
    at: usize,
) -> Option<&'h mut Session> {
    if held.as_ref().is_none_or(|h| h.at != at) {
        *held = None;
        *held = table.peers.get(at).map(|p| Held {
            at,
            session: p.lock(),
        });
    }
    held.as_mut().map(|h| &mut *h.session)
}

struct Worker {
    id: usize,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    slots: Arc<Slots>,
    /// Every worker's TUN queue: this one reads `queues[id]` and writes each flow through the
    /// queue it hashes to, which is where the flow's replies are then read.
    queues: Arc<[SyncDevice]>,
    /// Length of the virtio-net header in front of every TUN packet (0 without offloads).
    hdr: usize,
    sock: Arc<Socket>,
    woken: UnixStream,
    /// Handshake messages go to the control thread.
    to_control: SyncSender<Handshake>,
    counters: Counters,
    tun_read_errors: u64,
    last_warn: Option<Instant>,
    /// TUN reads, split.
    reads: Reads,
    /// Sealed datagrams, back to back, sent in GSO runs.
    out: Vec<u8>,
    /// Handshake messages and packets queued during a handshake.
    scratch: Vec<u8>,
    rx: Receives,
    /// One opened packet.
    plain: Vec<u8>,
    /// Merges TCP segments for the TUN (with offloads).
    gro: Coalescer,
}

impl Worker {
    fn new(
        id: usize,
        (shared, stop, slots): (Arc<Shared>, Arc<AtomicBool>, Arc<Slots>),
        (queues, vnet_hdr, uso): (Arc<[SyncDevice]>, bool, bool),
        mtu: usize,
        (sock, woken, to_control): (Arc<Socket>, UnixStream, SyncSender<Handshake>),
    ) -> Self {
        let stride = mtu.max(MIN_OUT);
        Self {
            id,
            shared,
            stop,
            slots,
            queues,
            hdr: if vnet_hdr { VIRTIO_NET_HDR_LEN } else { 0 },
            sock,
            woken,
            to_control,
            counters: Counters::default(),
            tun_read_errors: 0,
            last_warn: None,
            reads: Reads::new(stride),
            out: vec![0; tun::SLOTS * (stride + OVERHEAD) + MIN_OUT],
            scratch: vec![0; RX_BUF + OVERHEAD],
            rx: Receives::default(),
            plain: vec![0; RX_BUF],
            gro: Coalescer::new(vnet_hdr && uso),
        }
    }

    fn run(mut self) {
        self.publish();
        while !self.stop.load(Ordering::Relaxed) {
            let moved = match (self.tun_to_peers(), self.peers_to_tun()) {
                (Ok(a), Ok(b)) => a || b,
                (Err(why), _) | (_, Err(why)) => {
                    warn!(worker = self.id, "WireGuard worker: {why}; stopping");
                    break;
                }
            };
            if moved {
                self.publish();
            } else if let Err(why) = self.wait() {
                warn!(worker = self.id, "WireGuard worker: {why}; stopping");
                break;
            }
        }
        self.publish();
    }

    fn publish(&self) {
        let c = &self.counters;
        (self.slots).publish(self.id, c, self.tun_read_errors, self.sock.gso());
    }

    /// Sleeps until the TUN queue or the socket has something, or shutdown.
    fn wait(&self) -> Result<(), String> {
        let Some(tun) = self.queues.get(self.id) else {
            return Err("no TUN queue of its own".into());
        };
        let mut fds = [
            PollFd::new(tun.as_fd(), PollFlags::POLLIN),
            PollFd::new(self.sock.as_fd(), PollFlags::POLLIN),
            PollFd::new(self.woken.as_fd(), PollFlags::POLLIN),
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
        let Some(tun) = self.queues.get(self.id) else {
            return Err("no TUN queue of its own".into());
        };
        let filled = self.reads.fill(tun, &mut self.tun_read_errors)?;
        if filled == 0 {
            return Ok(false);
        }
        self.seal_and_send(filled);
        Ok(true)
    }

    /// Seals the `n` packets in `tx` for their peers into `out`, back to back, and sends them in
    /// GSO runs: consecutive datagrams for one peer of one size (the last may be shorter).
    fn seal_and_send(&mut self, n: usize) {
        let shared = self.shared.clone();
        let table = shared.table.load();
        let mut held = None;
        let mut run: Option<Run> = None;
        let mut pos = 0;
        for i in 0..n {
            let pkt = self.reads.packet(i);
            let len = pkt.len();
            let Some(at) = table.route(pkt, &mut self.counters) else {
                continue;
            };
            let Some(s) = hold(&mut held, &table, at) else {
                continue;
            };
            let to = s.endpoint;
            let room = self.out.get_mut(pos..).unwrap_or_default();
            let sealed = match s.tunn.encapsulate(pkt, room) {
                TunnResult::WriteToNetwork(b) => Some((b.len(), b.first() == Some(&DATA))),
                TunnResult::Err(e) => {
                    debug!(error = ?e, "WireGuard: sealing failed");
                    self.counters.count_drop(DropReason::SendFailed);
                    None
                }
                // Queued until the handshake it started completes.
                _ => None,
            };
            let Some((size, data)) = sealed else {
                continue;
            };
            if !data {
                // A handshake initiation (the packet waits for the session): alone, in order.
                if let Some(r) = run.take() {
                    self.send_run(r);
                }
                // Not a packet of the counters': a lost one is retried by the timers.
                if let Some(init) = self.out.get(pos..pos + size) {
                    let _ = self.sock.send(to, init, None);
                }
                continue;
            }
            self.counters.tx_packets += 1;
            self.counters.tx_bytes += len as u64;
            if let Some(r) = &mut run {
                if r.start + r.len == pos && r.takes(to, size, self.sock.max_segments(r.seg)) {
                    r.add(size);
                    pos += size;
                    continue;
                }
                let done = *r;
                self.send_run(done);
            }
            run = Some(Run::new(to, pos, size));
            pos += size;
        }
        drop(held);
        if let Some(r) = run {
            self.send_run(r);
        }
    }

    /// Sends one run of `out`; failures are counted, never fatal.
    fn send_run(&mut self, r: Run) {
        let Some(contents) = self.out.get(r.start..r.start + r.len) else {
            return;
        };
        let seg = (r.count > 1).then_some(r.seg);
        if let Err(e) = self.sock.send_run(self.woken.as_fd(), r.to, contents, seg) {
            // Counted as sent when sealed; they are drops (each datagram is its packet + 32).
            let c = &mut self.counters;
            c.tx_packets = c.tx_packets.saturating_sub(r.count as u64);
            c.tx_bytes = (c.tx_bytes).saturating_sub((r.len - r.count * OVERHEAD) as u64);
            for _ in 0..r.count {
                self.counters.count_drop(DropReason::SendFailed);
            }
            if self.last_warn.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
                self.last_warn = Some(Instant::now());
                warn!(peer = %r.to, error = %e,
                      dropped_so_far = self.counters.drop_count(DropReason::SendFailed),
                      "WireGuard send failing; packets dropped (next report in a minute at the earliest)");
            }
        }
    }

    /// One batch from the peers to the TUN. Returns whether anything was received.
    fn peers_to_tun(&mut self) -> Result<bool, String> {
        let Some(n) = self.rx.fill(&self.sock) else {
            return Ok(false);
        };
        let vnet = self.hdr != 0;
        let Self {
            shared,
            queues,
            sock,
            to_control,
            counters,
            rx,
            plain,
            scratch,
            gro,
            ..
        } = self;
        let table = shared.table.load();
        let mut held = None;
        let mut writer = tun::Writer::new(queues, vnet);
        let mut write = |hdr: &[u8; HDR_LEN], pkt: &[u8], n: usize| writer.write(hdr, pkt, n);
        for i in 0..n {
            let Some((from, datagrams)) = rx.buffer(i) else {
                continue;
            };
            for dgram in datagrams {
                // Handshakes' MAC1 checked, and past HANDSHAKES a second a cookie asked for,
                // before any Diffie-Hellman is spent on them (as WireGuard does under load).
                let packet = match shared
                    .limiter
                    .verify_packet(Some(from.ip()), dgram, scratch)
                {
                    Ok(packet) => packet,
                    Err(TunnResult::WriteToNetwork(cookie)) => {
                        let _ = sock.send(from, cookie, None);
                        counters.count_drop(DropReason::UnderLoad);
                        continue;
                    }
                    Err(TunnResult::Err(e)) => {
                        counters.count_drop(drop_reason(&e));
                        continue;
                    }
                    Err(_) => continue,
                };
                let Packet::PacketData(data) = packet else {
                    // A handshake or a cookie: a Diffie-Hellman or two, not the workers'.
                    match to_control.try_send(Handshake::new(from, dgram)) {
                        Ok(()) | Err(TrySendError::Disconnected(_)) => {}
                        Err(TrySendError::Full(_)) => counters.count_drop(DropReason::UnderLoad),
                    }
                    continue;
                };
                let sender = table.for_receiver(data.receiver_idx);
                let Some((at, s)) = sender.and_then(|at| Some((at, hold(&mut held, &table, at)?)))
                else {
                    counters.count_drop(DropReason::UnknownSender);
                    continue;
                };
                let (pkt, src) = match s.tunn.decapsulate(Some(from.ip()), dgram, plain) {
                    TunnResult::WriteToTunnelV4(pkt, src) => (pkt, IpAddr::V4(src)),
                    TunnResult::WriteToTunnelV6(pkt, src) => (pkt, IpAddr::V6(src)),
                    TunnResult::Err(e) => {
                        debug!(error = ?e, %from, "WireGuard: datagram dropped");
                        counters.count_drop(drop_reason(&e));
                        continue;
                    }
                    // A keepalive (a data message is never answered).
                    TunnResult::Done | TunnResult::WriteToNetwork(_) => {
                        s.endpoint = from;
                        continue;
                    }
                };
                // Authenticated: the peer is where it came from, whatever it carries.
                s.endpoint = from;
                if !table.peers.get(at).is_some_and(|p| p.admits(src)) {
                    counters.count_drop(DropReason::SourceNotInSenderLease);
                    continue;
                }
                counters.rx_packets += 1;
                counters.rx_bytes += pkt.len() as u64;
                if vnet {
                    gro.add(pkt, &mut write);
                } else {
                    write(&[0; HDR_LEN], pkt, 1);
                }
            }
        }
        drop(held);
        gro.flush(&mut write);
        writer.finish(counters)?;
        Ok(true)
    }
}

/// A handshake message (initiation, response, cookie reply) a worker took in, for the control
/// thread; no allocation (verified as one of those, so at most [`HANDSHAKE_MAX`] bytes).
struct Handshake {
    from: SocketAddr,
    len: usize,
    buf: [u8; HANDSHAKE_MAX],
}

impl Handshake {
    fn new(from: SocketAddr, dgram: &[u8]) -> Self {
        let mut buf = [0u8; HANDSHAKE_MAX];
        let len = dgram.len().min(HANDSHAKE_MAX);
        buf[..len].copy_from_slice(&dgram[..len]);
        Self { from, len, buf }
    }
}

/// The control thread, off the hot path: handshakes answered (the Diffie-Hellman of each), the
/// protocol's timers ticked, and `wg show`'s view refreshed.
struct Control {
    shared: Arc<Shared>,
    /// Worker 0's socket, for what it sends (handshakes, keepalives, packets that waited for a
    /// session): one port.
    sock: Arc<Socket>,
    /// From the workers; closes when `Userspace` and the workers are gone.
    handshakes: Receiver<Handshake>,
    /// What `wg show` reads, refreshed every [`SHOW_EVERY`] ticks and with each new table.
    device: Arc<Mutex<uapi::Device>>,
    /// A session's answer to a handshake message.
    out: Vec<u8>,
    /// The packets that waited for a session; the timers' messages.
    scratch: Vec<u8>,
    ticks: u32,
    /// What it counted (handshakes from no peer, refused, packets sent once a session came),
    /// published in slot `id`, after the workers'.
    counters: Counters,
    slots: Arc<Slots>,
    id: usize,
}

impl Control {
    /// Until `Userspace` is dropped (the channel closes).
    fn run(mut self) {
        let mut next_tick = Instant::now() + TICK;
        loop {
            let wait = next_tick.saturating_duration_since(Instant::now());
            match self.handshakes.recv_timeout(wait) {
                Ok(h) => self.answer(&h),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            if Instant::now() >= next_tick {
                self.tick();
                next_tick = Instant::now() + TICK;
            }
            self.slots.publish(self.id, &self.counters, 0, false);
        }
    }

    /// A handshake message, through its peer's session: an answer goes back, and the packets
    /// that waited for the session follow.
    fn answer(&mut self, h: &Handshake) {
        let Some(dgram) = h.buf.get(..h.len) else {
            return;
        };
        let table = self.shared.table.load();
        let shared = &self.shared;
        let peer = Tunn::parse_incoming_packet(dgram)
            .ok()
            .and_then(|packet| table.sender(packet, &shared.secret, &shared.public))
            .and_then(|at| table.peers.get(at));
        let Some(peer) = peer else {
            self.counters.count_drop(DropReason::UnknownSender);
            return;
        };
        let mut s = peer.lock();
        let s = &mut *s;
        match s.tunn.decapsulate(Some(h.from.ip()), dgram, &mut self.out) {
            // Its answer goes back, and the packets that waited for the session follow.
            TunnResult::WriteToNetwork(b) => {
                s.endpoint = h.from;
                let _ = self.sock.send(h.from, b, None);
                while let TunnResult::WriteToNetwork(b) =
                    s.tunn.decapsulate(None, &[], &mut self.scratch)
                {
                    match self.sock.send(s.endpoint, b, None) {
                        Ok(()) => self.counters.tx_packets += 1,
                        Err(_) => self.counters.count_drop(DropReason::SendFailed),
                    }
                }
            }
            TunnResult::Err(e) => {
                debug!(error = ?e, from = %h.from, "WireGuard: handshake message dropped");
                self.counters.count_drop(drop_reason(&e));
            }
            // A cookie taken.
            TunnResult::Done => s.endpoint = h.from,
            _ => {}
        }
    }

    /// The protocol's timers: handshakes started or retried, keepalives sent; now and then
    /// what `wg show` reads.
    fn tick(&mut self) {
        let table = self.shared.table.load();
        for p in &table.peers {
            let mut s = p.lock();
            let s = &mut *s;
            if let TunnResult::WriteToNetwork(b) = s.tunn.update_timers(&mut self.scratch) {
                let _ = self.sock.send(s.endpoint, b, None);
            }
        }
        self.ticks = self.ticks.wrapping_add(1);
        if self.ticks % SHOW_EVERY == 0 {
            self.shared.limiter.reset_count();
            show(&self.shared, &self.device);
        }
    }
}

/// Refreshes what `wg show` reads from the current table (a lock per peer, each second and with
/// each new table; none per packet).
fn show(shared: &Shared, device: &Mutex<uapi::Device>) {
    let now = SystemTime::now();
    let table = shared.table.load();
    let peers = (table.peers.iter())
        .map(|p| {
            let mut s = p.lock();
            let (since, tx, rx, _, _) = s.tunn.stats();
            if let Some(d) = since {
                s.last_handshake = now.checked_sub(d);
            }
            let v4 = p.allowed.map(IpNet::V4);
            uapi::Peer {
                public_key: p.key,
                psk: p.psk,
                endpoint: s.endpoint,
                allowed_ips: v4.into_iter().chain(p.allowed6.map(IpNet::V6)).collect(),
                keepalive: p.keepalive,
                last_handshake: s.last_handshake,
                rx_bytes: rx as u64,
                tx_bytes: tx as u64,
            }
        })
        .collect();
    device.lock().unwrap_or_else(PoisonError::into_inner).peers = peers;
}

/// Why boringtun refused a datagram, as a drop reason.
fn drop_reason(e: &WireGuardError) -> DropReason {
    match e {
        WireGuardError::DuplicateCounter | WireGuardError::InvalidCounter => DropReason::Replayed,
        WireGuardError::UnderLoad => DropReason::UnderLoad,
        // Not a WireGuard message, or for no session of ours: from no peer we know.
        WireGuardError::WrongIndex
        | WireGuardError::NoCurrentSession
        | WireGuardError::IncorrectPacketLength
        | WireGuardError::InvalidPacket
        | WireGuardError::WrongPacketType => DropReason::UnknownSender,
        _ => DropReason::BadAuthentication,
    }
}

/// The peers, found by destination address, by session index and by key: built whole by the
/// control thread, read by the workers.
struct Table {
    /// The families the device carries: a peer's subnet of another is not looked at.
    v4: bool,
    v6: bool,
    peers: Vec<Peer>,
    by_key: HashMap<Key, usize>,
    by_index: HashMap<u32, usize>,
    by_subnet: HashMap<Ipv4Net, usize>,
    by_subnet6: HashMap<Ipv6Net, usize>,
    /// The prefix lengths of the peers' subnets of each family, longest first, for lookups by
    /// address (with one lease size, one each).
    prefixes: Vec<u8>,
    prefixes6: Vec<u8>,
    /// The last session index given to a peer (24 bits: boringtun shifts it by 8).
    last_index: u32,
}

/// An IPv4 header's length, where its destination ends (16..20).
const IPV4_HDR: usize = 20;
/// An IPv6 header's length; its destination is bytes 24..40.
const IPV6_HDR: usize = 40;

impl Table {
    /// An empty table for a device carrying `spec`'s families.
    fn new(spec: DeviceSpec) -> Self {
        Self {
            v4: spec.v4,
            v6: spec.v6,
            peers: Vec::new(),
            by_key: HashMap::new(),
            by_index: HashMap::new(),
            by_subnet: HashMap::new(),
            by_subnet6: HashMap::new(),
            prefixes: Vec::new(),
            prefixes6: Vec::new(),
            last_index: 0,
        }
    }

    /// The peer a packet from the TUN goes to; what goes nowhere is counted, once: an IPv6
    /// packet on a device without IPv6 (IPv6 is off there; not an IPv4 packet), one no peer's
    /// subnet holds, or one of a family this device does not carry (no route here).
    fn route(&self, pkt: &[u8], c: &mut Counters) -> Option<usize> {
        if pkt.len() < IPV4_HDR {
            c.count_drop(DropReason::Truncated);
            return None;
        }
        let found = match pkt[0] >> 4 {
            4 => self.for_destination(Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19])),
            6 if self.v6 => {
                let Some(dst) = pkt.get(24..IPV6_HDR) else {
                    c.count_drop(DropReason::Truncated);
                    return None;
                };
                let mut octets = [0u8; 16];
                octets.copy_from_slice(dst);
                self.for_destination6(Ipv6Addr::from(octets))
            }
            _ => {
                c.count_drop(DropReason::NotIpv4);
                return None;
            }
        };
        if found.is_none() {
            c.count_drop(DropReason::NoRoute);
        }
        found
    }

    /// The peer a datagram (as the rate limiter parsed it, once) claims to come from: by the
    /// receiver index in a session's messages,
    /// by the static key a handshake initiation carries (which costs a Diffie-Hellman: boringtun
    /// rate-limits initiations per peer once it has one). Whether it really does is the
    /// session's to check.
    fn sender(&self, packet: Packet, secret: &StaticSecret, public: &PublicKey) -> Option<usize> {
        match packet {
            Packet::HandshakeInit(h) => parse_handshake_anon(secret, public, &h)
                .ok()
                .and_then(|half| self.by_key.get(&half.peer_static_public).copied()),
            Packet::HandshakeResponse(h) => self.for_receiver(h.receiver_idx),
            Packet::PacketCookieReply(c) => self.for_receiver(c.receiver_idx),
            Packet::PacketData(d) => self.for_receiver(d.receiver_idx),
        }
    }

    /// The peer whose IPv4 subnet holds `dst`.
    fn for_destination(&self, dst: Ipv4Addr) -> Option<usize> {
        self.prefixes.iter().find_map(|len| {
            let net = Ipv4Net::new(dst, *len).ok()?.trunc();
            self.by_subnet.get(&net).copied()
        })
    }

    /// The peer whose IPv6 subnet holds `dst`.
    fn for_destination6(&self, dst: Ipv6Addr) -> Option<usize> {
        self.prefixes6.iter().find_map(|len| {
            let net = Ipv6Net::new(dst, *len).ok()?.trunc();
            self.by_subnet6.get(&net).copied()
        })
    }

    /// The peer a datagram's receiver index names.
    fn for_receiver(&self, receiver_idx: u32) -> Option<usize> {
        self.by_index.get(&(receiver_idx >> 8)).copied()
    }

    /// The table with `want` as the whole peer list: a peer whose key, PSK and keepalive are
    /// unchanged keeps its sessions (shared with this table, its endpoint reset to the lease's);
    /// the others start afresh.
    fn next(&self, secret: &StaticSecret, want: Vec<WgPeer>) -> Self {
        let mut old: HashMap<Key, &Peer> = self.peers.iter().map(|p| (p.key, p)).collect();
        let mut last_index = self.last_index;
        let mut peers = Vec::with_capacity(want.len());
        for w in want {
            let kept = old
                .remove(&w.public_key)
                .filter(|p| p.psk == w.psk && p.keepalive == w.keepalive);
            let (index, session) = match kept {
                Some(p) => {
                    p.lock().endpoint = w.endpoint;
                    (p.index, p.session.clone())
                }
                None => {
                    last_index = (last_index % 0x00ff_ffff) + 1;
                    let tunn = Tunn::new(
                        secret.clone(),
                        PublicKey::from(w.public_key),
                        w.psk,
                        w.keepalive,
                        last_index,
                        None,
                    );
                    let session = Session {
                        tunn,
                        endpoint: w.endpoint,
                        last_handshake: None,
                    };
                    (last_index, Arc::new(Mutex::new(session)))
                }
            };
            peers.push(Peer {
                key: w.public_key,
                psk: w.psk,
                keepalive: w.keepalive,
                allowed: w.allowed_ip.filter(|_| self.v4),
                allowed6: w.allowed_ip6.filter(|_| self.v6),
                index,
                session,
            });
        }
        let all = || peers.iter().enumerate();
        let by_subnet: HashMap<_, _> = all().filter_map(|(i, p)| Some((p.allowed?, i))).collect();
        let by_subnet6: HashMap<_, _> = all().filter_map(|(i, p)| Some((p.allowed6?, i))).collect();
        debug!(peers = peers.len(), "WireGuard: peer table built");
        Self {
            v4: self.v4,
            v6: self.v6,
            by_key: all().map(|(i, p)| (p.key, i)).collect(),
            by_index: all().map(|(i, p)| (p.index, i)).collect(),
            prefixes: longest_first(by_subnet.keys().map(Ipv4Net::prefix_len)),
            prefixes6: longest_first(by_subnet6.keys().map(Ipv6Net::prefix_len)),
            by_subnet,
            by_subnet6,
            peers,
            last_index,
        }
    }
}

/// The distinct prefix lengths, longest first.
fn longest_first(lens: impl Iterator<Item = u8>) -> Vec<u8> {
    let mut v: Vec<u8> = lens.collect();
    v.sort_unstable_by(|a, b| b.cmp(a));
    v.dedup();
    v
}

/// What the netns tests (backends/tests/netns/wireguard_v6.rs) drive the data plane with, not
/// an API.
#[doc(hidden)]
pub mod for_tests {
    pub use super::Userspace;
    pub use crate::wireguard::config::{DeviceSpec, DEVICE, DEVICE_V6};
    pub use crate::wireguard::key::{public, PrivateKey};
    pub use crate::wireguard::want::WgPeer;
}

/// The fuzz target's entry (backends/fuzz/fuzz_targets/wg_datagram.rs), not an API: any bytes as
/// a packet from the TUN and as a datagram from the network, against tables of three peers (a
/// device carrying both families, and an IPv6-only one), as the worker looks them up before
/// boringtun's own checks (and then through them); and any bytes as the source of an opened
/// packet, admitted only inside the sender's subnet of its family.
#[doc(hidden)]
pub fn fuzz_lookups(data: &[u8]) {
    let secret = StaticSecret::from([7; 32]);
    let public = PublicKey::from(&secret);
    let spec = |v4, v6| DeviceSpec {
        name: "fuzz",
        port: 51820,
        v4,
        v6,
    };
    let peers = || {
        (1..=3u8).map(|n| {
            let subnet: Ipv4Net = format!("10.244.{n}.0/24").parse().expect("subnet");
            let endpoint: SocketAddr = if n % 2 == 0 {
                format!("[fd00::{n}]:51820").parse().expect("endpoint")
            } else {
                format!("192.0.2.{n}:51820").parse().expect("endpoint")
            };
            WgPeer {
                subnet,
                public_key: PublicKey::from(&StaticSecret::from([n; 32])).to_bytes(),
                endpoint,
                allowed_ip: Some(subnet),
                // Peer 3 has no IPv6 side.
                allowed_ip6: (n != 3).then(|| format!("fd00:244:0:{n}::/64").parse().expect("net")),
                psk: None,
                keepalive: None,
            }
        })
    };
    let mut t = Table::new(spec(true, true));
    t = t.next(&secret, peers().collect());
    let mut t6 = Table::new(spec(false, true));
    t6 = t6.next(&secret, peers().collect());
    for t in [&t, &t6] {
        let mut c = Counters::default();
        match t.route(data, &mut c) {
            Some(i) => {
                let p = &t.peers[i];
                match data.first().map(|b| b >> 4) {
                    Some(4) => {
                        assert!(t.v4 && data.len() >= IPV4_HDR, "routed a short IPv4 packet");
                        let dst = Ipv4Addr::new(data[16], data[17], data[18], data[19]);
                        assert!(p.admits(dst.into()), "routed outside the peer's subnet");
                    }
                    Some(6) => {
                        assert!(t.v6, "routed IPv6 on a device without it");
                        let mut dst = [0u8; 16];
                        dst.copy_from_slice(&data[24..IPV6_HDR]);
                        assert!(
                            p.admits(Ipv6Addr::from(dst).into()),
                            "routed outside the peer's IPv6 subnet"
                        );
                    }
                    _ => panic!("routed a packet of neither family"),
                }
                assert_eq!(c.total_drops(), 0);
            }
            None => assert_eq!(c.total_drops(), 1, "a packet going nowhere is counted once"),
        }
    }
    // An opened packet's source: admitted only inside its sender's subnet of its family.
    if let Some(src) = (data.get(..16)).and_then(|b| <[u8; 16]>::try_from(b).ok()) {
        let (v6, v4) = (
            Ipv6Addr::from(src),
            Ipv4Addr::new(src[0], src[1], src[2], src[3]),
        );
        for p in t.peers.iter().chain(&t6.peers) {
            let inside6 = p.allowed6.is_some_and(|n| n.contains(&v6));
            assert_eq!(p.admits(v6.into()), inside6);
            let inside4 = p.allowed.is_some_and(|n| n.contains(&v4));
            assert_eq!(p.admits(v4.into()), inside4);
        }
    }
    // The TUN queue an opened packet is written through, and its flow's replies read from.
    crate::offload::flow::fuzz_queue(data);
    // The worker's first look at a datagram: MAC1 of handshakes, the handshake rate.
    let mut out = vec![0; data.len().max(MIN_OUT) + OVERHEAD];
    let limiter = RateLimiter::new(&public, HANDSHAKES);
    let from = match data.first() {
        Some(b) if b & 1 == 1 => IpAddr::from([0xfd00, 0, 0, 0, 0, 0, 0, 9]),
        _ => IpAddr::from([192, 0, 2, 9]),
    };
    let packet = match limiter.verify_packet(Some(from), data, &mut out) {
        Ok(packet) => packet,
        Err(TunnResult::Err(e)) => return assert_ne!(drop_reason(&e), DropReason::Replayed),
        Err(_) => return,
    };
    if let Some(i) = t.sender(packet, &secret, &public) {
        match t.peers[i]
            .lock()
            .tunn
            .decapsulate(Some(from), data, &mut out)
        {
            TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {
                panic!("a packet opened without a session")
            }
            TunnResult::Err(e) => {
                let _ = drop_reason(&e);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOTH: DeviceSpec = DeviceSpec {
        name: "flannel-wg",
        port: 51820,
        v4: true,
        v6: true,
    };
    const V4: DeviceSpec = DeviceSpec {
        name: "flannel-wg",
        port: 51820,
        v4: true,
        v6: false,
    };
    const V6: DeviceSpec = DeviceSpec {
        name: "flannel-wg-v6",
        port: 51821,
        v4: false,
        v6: true,
    };

    /// Peer `n`: 10.244.n.0/24 at 192.168.1.n (an IPv4 device's peer).
    fn peer(n: u8, psk: Option<Key>) -> WgPeer {
        WgPeer {
            subnet: format!("10.244.{n}.0/24").parse().expect("subnet"),
            public_key: PublicKey::from(&StaticSecret::from([n; 32])).to_bytes(),
            endpoint: format!("192.168.1.{n}:51820").parse().expect("endpoint"),
            allowed_ip: Some(format!("10.244.{n}.0/24").parse().expect("subnet")),
            allowed_ip6: None,
            psk,
            keepalive: None,
        }
    }

    /// Peer `n` with its IPv6 subnet fd00:244:0:n::/64 too, at `endpoint`.
    fn dual_peer(n: u8, endpoint: &str) -> WgPeer {
        WgPeer {
            endpoint: endpoint.parse().expect("endpoint"),
            allowed_ip6: Some(format!("fd00:244:0:{n}::/64").parse().expect("subnet")),
            ..peer(n, None)
        }
    }

    /// Peer `n` of an IPv6-only device (flannel-wg-v6): its IPv6 subnet alone.
    fn v6_peer(n: u8) -> WgPeer {
        WgPeer {
            allowed_ip: None,
            ..dual_peer(n, &format!("[fd00:192:168:1::{n}]:51821"))
        }
    }

    fn index_of(t: &Table, n: u8) -> Option<u32> {
        let i = t.for_destination(format!("10.244.{n}.9").parse().expect("ip"))?;
        Some(t.peers[i].index)
    }

    /// A minimal packet of `len` bytes to `dst` (IPv4 or IPv6 by its family), from `src`.
    fn packet(src: IpAddr, dst: IpAddr, len: usize) -> Vec<u8> {
        let mut p = vec![0u8; len];
        match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                p[0] = 0x45;
                p[12..16].copy_from_slice(&s.octets());
                p[16..20].copy_from_slice(&d.octets());
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                p[0] = 0x60;
                p[8..24].copy_from_slice(&s.octets());
                p[24..40].copy_from_slice(&d.octets());
            }
            _ => panic!("one family"),
        }
        p
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    /// Where the table sends a packet to `dst`: the peer's endpoint, or the one drop it counted.
    fn route(t: &Table, dst: &str) -> Result<String, DropReason> {
        let src = if dst.contains(':') {
            "fd00:244:0:1::2"
        } else {
            "10.244.1.2"
        };
        let mut c = Counters::default();
        let found = t.route(&packet(ip(src), ip(dst), 60), &mut c);
        match found {
            Some(i) => {
                assert_eq!(c.total_drops(), 0);
                Ok(t.peers[i].lock().endpoint.to_string())
            }
            None => {
                assert_eq!(c.total_drops(), 1, "{c:?}");
                Err(*DropReason::ALL
                    .iter()
                    .find(|r| c.drop_count(**r) == 1)
                    .expect("a reason"))
            }
        }
    }

    #[test]
    fn packets_find_their_peer_by_destination_and_by_session_index() {
        let secret = StaticSecret::from([1; 32]);
        let mut t = Table::new(V4);
        t = t.next(&secret, vec![peer(2, None), peer(3, None)]);
        let i2 = index_of(&t, 2).expect("peer 2");
        let i3 = index_of(&t, 3).expect("peer 3");
        assert_ne!(i2, i3);
        assert_eq!(t.for_destination("10.244.4.1".parse().expect("ip")), None);
        assert_eq!(t.for_destination("10.245.2.1".parse().expect("ip")), None);
        // boringtun's receiver index is the peer's index shifted by 8, a session in the low byte.
        let at = t.for_receiver((i3 << 8) | 5).expect("by index");
        assert_eq!(
            t.peers[at].allowed.expect("v4").to_string(),
            "10.244.3.0/24"
        );
        assert_eq!(t.for_receiver(0xffff_ff00), None);
    }

    #[test]
    fn a_device_carrying_both_families_routes_each_by_its_subnet_of_that_family() {
        let secret = StaticSecret::from([1; 32]);
        let mut t = Table::new(BOTH);
        // Peer 2 dialled over IPv4, peer 3 over IPv6, peer 4 without an IPv6 lease.
        t = t.next(
            &secret,
            vec![
                dual_peer(2, "192.168.1.2:51820"),
                dual_peer(3, "[fd00:192:168:1::3]:51820"),
                peer(4, None),
            ],
        );
        assert_eq!(route(&t, "10.244.2.9"), Ok("192.168.1.2:51820".into()));
        assert_eq!(route(&t, "fd00:244:0:2::9"), Ok("192.168.1.2:51820".into()));
        assert_eq!(
            route(&t, "10.244.3.9"),
            Ok("[fd00:192:168:1::3]:51820".into())
        );
        assert_eq!(
            route(&t, "fd00:244:0:3:ffff::1"),
            Ok("[fd00:192:168:1::3]:51820".into())
        );
        assert_eq!(route(&t, "10.244.4.9"), Ok("192.168.1.4:51820".into()));
        assert_eq!(route(&t, "fd00:244:0:4::9"), Err(DropReason::NoRoute));
        assert_eq!(route(&t, "fd00:244:1:2::9"), Err(DropReason::NoRoute));
        assert_eq!(route(&t, "10.244.9.9"), Err(DropReason::NoRoute));
    }

    #[test]
    fn an_ipv6_only_device_routes_ipv6_and_no_ipv4() {
        let secret = StaticSecret::from([1; 32]);
        let mut t = Table::new(V6);
        // A peer's IPv4 subnet given to it anyway is not this device's to route.
        let mut stray = v6_peer(3);
        stray.allowed_ip = Some("10.244.3.0/24".parse().expect("net"));
        t = t.next(&secret, vec![v6_peer(2), stray]);
        assert_eq!(
            route(&t, "fd00:244:0:2::9"),
            Ok("[fd00:192:168:1::2]:51821".into())
        );
        assert_eq!(
            route(&t, "fd00:244:0:3::9"),
            Ok("[fd00:192:168:1::3]:51821".into())
        );
        assert_eq!(
            route(&t, "10.244.3.9"),
            Err(DropReason::NoRoute),
            "IPv4 is not carried"
        );
        let p = &t.peers[t
            .for_destination6("fd00:244:0:3::1".parse().expect("ip"))
            .expect("3")];
        assert_eq!(p.allowed, None);
        assert!(!p.admits(ip("10.244.3.9")), "nor accepted from it");
    }

    #[test]
    fn an_ipv4_device_drops_ipv6_as_not_ipv4_and_short_packets_as_truncated() {
        let secret = StaticSecret::from([1; 32]);
        let mut t = Table::new(V4);
        // Even with an IPv6 subnet given, an IPv4-only device has IPv6 off: not its to route.
        t = t.next(&secret, vec![dual_peer(2, "192.168.1.2:51820")]);
        assert_eq!(route(&t, "fd00:244:0:2::9"), Err(DropReason::NotIpv4));
        assert_eq!(route(&t, "10.244.2.9"), Ok("192.168.1.2:51820".into()));
        let mut t6 = Table::new(V6);
        t6 = t6.next(&secret, vec![v6_peer(2)]);
        for (table, pkt) in [
            (&t, vec![0x45; 19]),
            (&t6, {
                // An IPv6 header cut inside its destination address.
                let mut p = packet(ip("fd00::1"), ip("fd00:244:0:2::9"), 40);
                p.truncate(39);
                p
            }),
        ] {
            let mut c = Counters::default();
            assert_eq!(table.route(&pkt, &mut c), None);
            assert_eq!(c.drop_count(DropReason::Truncated), 1, "{c:?}");
            assert_eq!(c.total_drops(), 1, "{c:?}");
        }
    }

    #[test]
    fn an_opened_packet_is_admitted_only_from_its_senders_subnet_of_its_family() {
        let secret = StaticSecret::from([1; 32]);
        let mut t = Table::new(BOTH);
        t = t.next(
            &secret,
            vec![dual_peer(2, "[fd00::2]:51820"), peer(4, None)],
        );
        let p2 = &t.peers[0];
        assert!(p2.admits(ip("10.244.2.7")));
        assert!(p2.admits(ip("fd00:244:0:2::7")));
        assert!(
            !p2.admits(ip("fd00:244:0:3::7")),
            "another lease's IPv6 subnet"
        );
        assert!(!p2.admits(ip("10.244.3.7")), "another lease's IPv4 subnet");
        assert!(
            !p2.admits(ip("::ffff:10.244.2.7")),
            "v4-mapped is IPv6, outside its /64"
        );
        let p4 = &t.peers[1];
        assert!(p4.admits(ip("10.244.4.7")));
        assert!(
            !p4.admits(ip("fd00:244:0:4::7")),
            "no IPv6 lease: no IPv6 source"
        );
    }

    #[test]
    fn a_new_list_keeps_unchanged_peers_sessions_and_forgets_the_rest() {
        let secret = StaticSecret::from([1; 32]);
        let mut t = Table::new(V4);
        t = t.next(&secret, vec![peer(2, None), peer(3, None), peer(4, None)]);
        let (i2, i3) = (index_of(&t, 2), index_of(&t, 3));
        let mut moved = peer(2, None);
        moved.endpoint = "192.168.1.200:51999".parse().expect("endpoint");
        t = t.next(&secret, vec![moved, peer(3, Some([7; 32]))]);
        assert_eq!(index_of(&t, 2), i2, "same key: same sessions, new endpoint");
        let at = t
            .for_destination("10.244.2.1".parse().expect("ip"))
            .expect("peer 2");
        assert_eq!(
            t.peers[at].lock().endpoint.to_string(),
            "192.168.1.200:51999"
        );
        assert_ne!(index_of(&t, 3), i3, "a new PSK: a new session");
        assert_eq!(index_of(&t, 4), None, "gone");
        assert_eq!(t.peers.len(), 2);
        assert_eq!(t.by_key.len(), 2);
        assert_eq!(
            t.for_receiver(i3.expect("was there") << 8),
            None,
            "old index forgotten"
        );
    }

    #[test]
    fn a_kept_peer_gaining_an_ipv6_subnet_is_routed_there_with_its_session() {
        let secret = StaticSecret::from([1; 32]);
        let mut t = Table::new(BOTH);
        t = t.next(&secret, vec![peer(2, None)]);
        let i2 = index_of(&t, 2);
        assert_eq!(route(&t, "fd00:244:0:2::9"), Err(DropReason::NoRoute));
        t = t.next(&secret, vec![dual_peer(2, "[fd00::2]:51820")]);
        assert_eq!(index_of(&t, 2), i2, "same key: same sessions");
        assert_eq!(route(&t, "fd00:244:0:2::9"), Ok("[fd00::2]:51820".into()));
    }

    #[test]
    fn the_fuzz_entry_holds_for_packets_of_both_families() {
        let v4 = packet(ip("10.244.9.1"), ip("10.244.2.9"), 40);
        let v6 = packet(ip("fd00:244:0:9::1"), ip("fd00:244:0:2::9"), 60);
        for data in [
            &v4[..],
            &v6[..],
            &v6[..39],
            &[0x60; 20][..],
            &[],
            &[4, 0, 0, 0],
        ] {
            fuzz_lookups(data);
        }
    }
}
