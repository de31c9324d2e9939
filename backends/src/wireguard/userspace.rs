//! weft's userspace WireGuard, for kernels without it: a persistent TUN device `flannel-wg`, a
//! UDP socket on ListenPort, and one boringtun `Tunn` per peer, moved by one worker thread.
//!
//! A skeleton of the data plane issue 22 asks for: one packet per system call, no offloads, one
//! worker. What it already has of the final shape: buffers owned by the worker and reused (no
//! allocation per packet once a session is up), no lock on the packet path (the control side
//! hands the worker a new peer list through a channel and a wake-up), and the protocol's timers
//! ticked on their own schedule, not per packet.
//!
//! A datagram is matched to its peer by the receiver index boringtun put in the session (data,
//! handshake response, cookie) or, for a handshake initiation, by the initiator's static key;
//! a decrypted packet whose source lies outside that peer's subnet is dropped. Like the kernel's
//! WireGuard, a peer's endpoint follows the address its authenticated packets come from.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use ipnet::Ipv4Net;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use rtnetlink::{Handle, LinkUnspec};
use tracing::{debug, info, warn};
use tun_rs::{DeviceBuilder, SyncDevice};

use super::kernel;
use super::key::{Key, PrivateKey};
use super::want::{WgPeer, DEVICE};
use crate::udp::codec::{Counters, DropReason, SharedCounters};
use crate::Error;

/// How often the protocol's timers (handshake retries, keepalives, session expiry) are looked
/// at, as boringtun's own device does.
const TICK: Duration = Duration::from_millis(250);

/// Packets moved each way per wake-up before the worker looks at the other direction.
const BURST: usize = 64;

/// The running data plane.
pub struct Userspace {
    /// flannel-wg's index when it was opened: another index means it was recreated.
    pub index: u32,
    peers: Sender<Vec<WgPeer>>,
    wake: UnixStream,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// What the worker counted, published after each round.
    counters: Arc<SharedCounters>,
}

impl Userspace {
    /// Opens (or creates) `flannel-wg` as a persistent TUN device with `mtu`, up, binds
    /// `port`, and starts the worker with no peer.
    pub async fn start(
        handle: &Handle,
        private: &PrivateKey,
        port: u16,
        mtu: u32,
    ) -> Result<Self, Error> {
        let tun = DeviceBuilder::new()
            .name(DEVICE)
            .packet_information(false)
            .inherit_enable_state()
            .build_sync()
            .map_err(Error::io(format!("open TUN device {DEVICE}")))?;
        tun.persist()
            .map_err(Error::io(format!("make {DEVICE} persistent")))?;
        tun.set_nonblocking(true)
            .map_err(Error::io(format!("make {DEVICE} non-blocking")))?;
        let existing = kernel::find(handle)
            .await?
            .ok_or_else(|| Error::Other(format!("{DEVICE} vanished right after it was opened")))?;
        ipv6_off();
        if existing.mtu != Some(mtu) || !existing.up {
            let set = LinkUnspec::new_with_index(existing.index).mtu(mtu).up();
            handle
                .link()
                .set(set.build())
                .execute()
                .await
                .map_err(Error::netlink(format!("set {DEVICE} up with MTU {mtu}")))?;
        }
        let sock = UdpSocket::bind(("0.0.0.0", port))
            .map_err(Error::io(format!("bind WireGuard's UDP port {port}")))?;
        sock.set_nonblocking(true)
            .map_err(Error::io("make the WireGuard socket non-blocking"))?;
        let (wake, woken) = UnixStream::pair().map_err(Error::io("make a wake-up pair"))?;
        woken
            .set_nonblocking(true)
            .map_err(Error::io("make the wake-up socket non-blocking"))?;
        let (peers, rx) = channel();
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(SharedCounters::default());
        let secret = StaticSecret::from(*private.bytes());
        let worker = Worker {
            public: PublicKey::from(&secret),
            secret,
            tun,
            sock,
            woken,
            rx,
            stop: stop.clone(),
            table: Table::default(),
            counters: Counters::default(),
            shared: counters.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("weft-wg".into())
            .spawn(move || worker.run())
            .map_err(Error::io("start the WireGuard worker"))?;
        info!(device = DEVICE, port, mtu, "userspace WireGuard running");
        Ok(Self {
            index: existing.index,
            peers,
            wake,
            stop,
            thread: Some(thread),
            counters,
        })
    }

    /// Hands the worker its whole peer list.
    pub fn set_peers(&mut self, peers: Vec<WgPeer>) -> Result<(), Error> {
        self.peers
            .send(peers)
            .map_err(|_| Error::Other("the WireGuard worker is gone".into()))?;
        let _ = self.wake.write(&[1]);
        Ok(())
    }

    /// What the worker has counted so far: packets and bytes each way (inner packets), and
    /// drops by reason.
    pub fn counters(&self) -> Counters {
        self.counters.load()
    }

    /// Whether the worker still runs.
    pub fn alive(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }
}

impl Drop for Userspace {
    /// The worker stops and closes its TUN queue; flannel-wg (persistent) keeps its address
    /// and route for the next weftd.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.wake.write(&[1]);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `disable_ipv6` 1 on flannel-wg (as udp on flannel0): the data plane is IPv4-only, and the
/// kernel would otherwise send router solicitations and MLD reports into it, to be dropped. A
/// nicety: where /proc/sys is read-only or the kernel has no IPv6 it is left as it is.
fn ipv6_off() {
    let path = format!("/proc/sys/net/ipv6/conf/{DEVICE}/disable_ipv6");
    if std::fs::read_to_string(&path).is_ok_and(|now| now.trim() != "1") {
        if let Err(e) = std::fs::write(&path, "1") {
            debug!(path, error = %e, "cannot turn IPv6 off on {DEVICE}; leaving it");
        }
    }
}

struct Peer {
    tunn: Tunn,
    key: Key,
    psk: Option<Key>,
    keepalive: Option<u16>,
    /// Where its packets go: its lease's PublicIP:Port, then where it last spoke from.
    endpoint: SocketAddr,
    allowed: Ipv4Net,
    /// The index boringtun puts (shifted) in this peer's sessions.
    index: u32,
}

struct Worker {
    secret: StaticSecret,
    public: PublicKey,
    tun: SyncDevice,
    sock: UdpSocket,
    woken: UnixStream,
    rx: Receiver<Vec<WgPeer>>,
    stop: Arc<AtomicBool>,
    table: Table,
    counters: Counters,
    shared: Arc<SharedCounters>,
}

/// The worker's peers, found by destination address, by session index and by key.
#[derive(Default)]
struct Table {
    peers: Vec<Peer>,
    by_key: HashMap<Key, usize>,
    by_index: HashMap<u32, usize>,
    by_subnet: HashMap<Ipv4Net, usize>,
    /// The prefix lengths of the peers' subnets, longest first, for lookups by address.
    prefixes: Vec<u8>,
    /// The last session index given to a peer (24 bits: boringtun shifts it by 8).
    last_index: u32,
}

impl Worker {
    fn run(mut self) {
        let mut inbuf = vec![0u8; 65536];
        let mut outbuf = vec![0u8; 65536 + 148];
        let mut next_tick = Instant::now() + TICK;
        while !self.stop.load(Ordering::Relaxed) {
            let wait = next_tick.saturating_duration_since(Instant::now());
            let (tun_ready, sock_ready, woken) = {
                let mut fds = [
                    PollFd::new(self.tun.as_fd(), PollFlags::POLLIN),
                    PollFd::new(self.sock.as_fd(), PollFlags::POLLIN),
                    PollFd::new(self.woken.as_fd(), PollFlags::POLLIN),
                ];
                let ms = u16::try_from(wait.as_millis()).unwrap_or(u16::MAX);
                match poll(&mut fds, PollTimeout::from(ms)) {
                    Ok(_) => {}
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => {
                        warn!(error = %e, "WireGuard worker: poll failed; stopping");
                        return;
                    }
                }
                let ready = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
                (ready(&fds[0]), ready(&fds[1]), ready(&fds[2]))
            };
            if woken {
                let mut drain = [0u8; 64];
                while matches!((&self.woken).read(&mut drain), Ok(n) if n > 0) {}
                while let Ok(peers) = self.rx.try_recv() {
                    self.table.set(&self.secret, peers);
                }
            }
            if tun_ready {
                for _ in 0..BURST {
                    match self.tun.recv(&mut inbuf) {
                        Ok(n) => self.outgoing(&inbuf[..n], &mut outbuf),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => {
                            warn!(error = %e, "WireGuard worker: TUN read failed; stopping");
                            return;
                        }
                    }
                }
            }
            if sock_ready {
                for _ in 0..BURST {
                    match self.sock.recv_from(&mut inbuf) {
                        Ok((n, from)) => self.incoming(&inbuf[..n], from, &mut outbuf),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        // ICMP errors for earlier sends surface here; the next datagram counts.
                        Err(_) => break,
                    }
                }
            }
            if Instant::now() >= next_tick {
                self.tick(&mut outbuf);
                next_tick = Instant::now() + TICK;
            }
            self.shared.publish(&self.counters);
        }
    }

    /// A packet from the TUN device: to the peer whose subnet holds its destination.
    fn outgoing(&mut self, pkt: &[u8], out: &mut [u8]) {
        let c = &mut self.counters;
        if pkt.len() < 20 {
            return c.count_drop(DropReason::Truncated);
        }
        if pkt[0] >> 4 != 4 {
            return c.count_drop(DropReason::NotIpv4);
        }
        let dst = Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19]);
        let Some(i) = self.table.for_destination(dst) else {
            return c.count_drop(DropReason::NoRoute);
        };
        let p = &mut self.table.peers[i];
        match p.tunn.encapsulate(pkt, out) {
            TunnResult::WriteToNetwork(b) => match self.sock.send_to(b, p.endpoint) {
                Ok(_) => {
                    c.tx_packets += 1;
                    c.tx_bytes += pkt.len() as u64;
                }
                Err(_) => c.count_drop(DropReason::SendFailed),
            },
            TunnResult::Err(e) => {
                debug!(error = ?e, "WireGuard: encapsulation failed");
                c.count_drop(DropReason::SendFailed);
            }
            // Queued until the handshake it started completes.
            _ => {}
        }
    }

    /// A datagram from the network: to its peer's session, then into the TUN device. What no
    /// current peer's session authenticates (an unknown key or index, a bad tag, a replayed
    /// counter) counts as from an unknown sender; a decrypted packet from outside the peer's
    /// subnet as not in its lease.
    fn incoming(&mut self, dgram: &[u8], from: SocketAddr, out: &mut [u8]) {
        let c = &mut self.counters;
        let i = match Tunn::parse_incoming_packet(dgram) {
            Ok(Packet::HandshakeInit(h)) => parse_handshake_anon(&self.secret, &self.public, &h)
                .ok()
                .and_then(|half| self.table.by_key.get(&half.peer_static_public).copied()),
            Ok(Packet::HandshakeResponse(h)) => self.table.for_receiver(h.receiver_idx),
            Ok(Packet::PacketCookieReply(c)) => self.table.for_receiver(c.receiver_idx),
            Ok(Packet::PacketData(d)) => self.table.for_receiver(d.receiver_idx),
            Err(_) => None,
        };
        let Some(i) = i else {
            return c.count_drop(DropReason::UnknownSender);
        };
        let p = &mut self.table.peers[i];
        match p.tunn.decapsulate(Some(from.ip()), dgram, out) {
            TunnResult::WriteToNetwork(b) => {
                let _ = self.sock.send_to(b, from);
                p.endpoint = from;
                // Packets queued while the handshake ran go now.
                while let TunnResult::WriteToNetwork(b) = p.tunn.decapsulate(None, &[], out) {
                    match self.sock.send_to(b, p.endpoint) {
                        Ok(_) => c.tx_packets += 1,
                        Err(_) => c.count_drop(DropReason::SendFailed),
                    }
                }
            }
            TunnResult::WriteToTunnelV4(b, src) => {
                p.endpoint = from;
                if !p.allowed.contains(&src) {
                    return c.count_drop(DropReason::SourceNotInSenderLease);
                }
                match self.tun.send(b) {
                    Ok(_) => {
                        c.rx_packets += 1;
                        c.rx_bytes += b.len() as u64;
                    }
                    Err(_) => c.count_drop(DropReason::TunWriteFailed),
                }
            }
            TunnResult::WriteToTunnelV6(..) => c.count_drop(DropReason::NotIpv4),
            TunnResult::Err(e) => {
                debug!(error = ?e, %from, "WireGuard: datagram dropped");
                c.count_drop(DropReason::UnknownSender);
            }
            // A keepalive.
            TunnResult::Done => p.endpoint = from,
        }
    }

    /// The protocol's timers: handshakes started or retried, keepalives sent.
    fn tick(&mut self, out: &mut [u8]) {
        for p in &mut self.table.peers {
            if let TunnResult::WriteToNetwork(b) = p.tunn.update_timers(out) {
                let _ = self.sock.send_to(b, p.endpoint);
            }
        }
    }
}

impl Table {
    /// The peer whose subnet holds `dst`.
    fn for_destination(&self, dst: Ipv4Addr) -> Option<usize> {
        self.prefixes.iter().find_map(|len| {
            let net = Ipv4Net::new(dst, *len).ok()?.trunc();
            self.by_subnet.get(&net).copied()
        })
    }

    /// The peer a datagram's receiver index names.
    fn for_receiver(&self, receiver_idx: u32) -> Option<usize> {
        self.by_index.get(&(receiver_idx >> 8)).copied()
    }

    /// Takes `want` as the whole peer list: a peer whose key, PSK and keepalive are unchanged
    /// keeps its sessions; the others start afresh.
    fn set(&mut self, secret: &StaticSecret, want: Vec<WgPeer>) {
        let mut old: HashMap<Key, Peer> = self.peers.drain(..).map(|p| (p.key, p)).collect();
        for w in want {
            let endpoint = SocketAddr::V4(w.endpoint);
            let kept = old
                .remove(&w.public_key)
                .filter(|p| p.psk == w.psk && p.keepalive == w.keepalive);
            let p = match kept {
                Some(mut p) => {
                    p.allowed = w.allowed_ip;
                    p.endpoint = endpoint;
                    p
                }
                None => {
                    self.last_index = (self.last_index % 0x00ff_ffff) + 1;
                    let index = self.last_index;
                    Peer {
                        tunn: Tunn::new(
                            secret.clone(),
                            PublicKey::from(w.public_key),
                            w.psk,
                            w.keepalive,
                            index,
                            None,
                        ),
                        key: w.public_key,
                        psk: w.psk,
                        keepalive: w.keepalive,
                        endpoint,
                        allowed: w.allowed_ip,
                        index,
                    }
                }
            };
            self.peers.push(p);
        }
        let all = || self.peers.iter().enumerate();
        self.by_key = all().map(|(i, p)| (p.key, i)).collect();
        self.by_index = all().map(|(i, p)| (p.index, i)).collect();
        self.by_subnet = all().map(|(i, p)| (p.allowed, i)).collect();
        let mut prefixes: Vec<u8> = self.peers.iter().map(|p| p.allowed.prefix_len()).collect();
        prefixes.sort_unstable_by(|a, b| b.cmp(a));
        prefixes.dedup();
        self.prefixes = prefixes;
        debug!(peers = self.peers.len(), "WireGuard worker: peers set");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(n: u8, psk: Option<Key>) -> WgPeer {
        WgPeer {
            subnet: format!("10.244.{n}.0/24").parse().expect("subnet"),
            public_key: PublicKey::from(&StaticSecret::from([n; 32])).to_bytes(),
            endpoint: format!("192.168.1.{n}:51820").parse().expect("endpoint"),
            allowed_ip: format!("10.244.{n}.0/24").parse().expect("subnet"),
            psk,
            keepalive: None,
        }
    }

    fn index_of(t: &Table, n: u8) -> Option<u32> {
        let i = t.for_destination(format!("10.244.{n}.9").parse().expect("ip"))?;
        Some(t.peers[i].index)
    }

    #[test]
    fn packets_find_their_peer_by_destination_and_by_session_index() {
        let secret = StaticSecret::from([1; 32]);
        let mut t = Table::default();
        t.set(&secret, vec![peer(2, None), peer(3, None)]);
        let i2 = index_of(&t, 2).expect("peer 2");
        let i3 = index_of(&t, 3).expect("peer 3");
        assert_ne!(i2, i3);
        assert_eq!(t.for_destination("10.244.4.1".parse().expect("ip")), None);
        assert_eq!(t.for_destination("10.245.2.1".parse().expect("ip")), None);
        // boringtun's receiver index is the peer's index shifted by 8, a session in the low byte.
        let at = t.for_receiver((i3 << 8) | 5).expect("by index");
        assert_eq!(t.peers[at].allowed.to_string(), "10.244.3.0/24");
        assert_eq!(t.for_receiver(0xffff_ff00), None);
    }

    #[test]
    fn a_new_list_keeps_unchanged_peers_sessions_and_forgets_the_rest() {
        let secret = StaticSecret::from([1; 32]);
        let mut t = Table::default();
        t.set(&secret, vec![peer(2, None), peer(3, None), peer(4, None)]);
        let (i2, i3) = (index_of(&t, 2), index_of(&t, 3));
        let mut moved = peer(2, None);
        moved.endpoint = "192.168.1.200:51999".parse().expect("endpoint");
        t.set(&secret, vec![moved, peer(3, Some([7; 32]))]);
        assert_eq!(index_of(&t, 2), i2, "same key: same sessions, new endpoint");
        let at = t
            .for_destination("10.244.2.1".parse().expect("ip"))
            .expect("peer 2");
        assert_eq!(t.peers[at].endpoint.to_string(), "192.168.1.200:51999");
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
}
