//! Noticing owned kernel state changed behind weftd's back, from rtnetlink multicast events.
//! Coarse on purpose: any deletion touching weft's device or a weft route means "reconcile now";
//! the reconcile itself finds out what, if anything, is wrong.
//!
//! Events are judged as they arrive, by a task of their own, and folded into one flag: however
//! many arrive while weftd is busy elsewhere, what waits for it is "something changed", never a
//! queue (a busy host's links, routes and neighbours would otherwise pile up without bound).
//!
//! The kernel itself drops the notifications no judge acts on (additions, mostly the echoes of
//! weft's own: 40,000 at a cold start with 10,000 peers) with a socket filter, so they are never
//! queued, read or parsed, and cannot fill the socket's buffer so that a deletion is lost.

use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::channel::mpsc::UnboundedReceiver;
use futures::StreamExt;
use nix::sys::socket::sockopt;
use rtnetlink::packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLMSG_DONE, NLMSG_ERROR, NLMSG_NOOP,
    NLMSG_OVERRUN,
};
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::sys::protocols::NETLINK_ROUTE;
use rtnetlink::sys::{AsyncSocket, Socket, SocketAddr};
use rtnetlink::MulticastGroup;
use socket2::{SockFilter, SockRef};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::{debug, info};

use crate::nexthop::{self, NexthopMessage};
use crate::routes::owner::RTPROT_WEFT;
use crate::Error;

/// What the running backend owns, to tell relevant events from noise.
#[derive(Debug, Clone, Default)]
pub struct Watched {
    /// The backend's device (vxlan), by name since its index changes when it is recreated.
    pub device: Option<String>,
    /// Its current index, if it exists.
    pub index: Option<u32>,
}

impl Watched {
    /// Whether `msg` says something weft owns was removed or disabled.
    fn touched_by(&self, msg: &RouteNetlinkMessage) -> bool {
        let ours = |i: u32| self.index == Some(i);
        match msg {
            RouteNetlinkMessage::DelRoute(r) => u8::from(r.header.protocol) == RTPROT_WEFT,
            RouteNetlinkMessage::DelLink(l) => ours(l.header.index)
                || l.attributes.iter().any(
                    |a| matches!(a, LinkAttribute::IfName(n) if Some(n) == self.device.as_ref()),
                ),
            RouteNetlinkMessage::NewLink(l) => {
                ours(l.header.index) && !l.header.flags.contains(LinkFlags::Up)
            }
            RouteNetlinkMessage::DelNeighbour(n) => ours(n.header.ifindex),
            RouteNetlinkMessage::DelAddress(a) => ours(a.header.index),
            _ => false,
        }
    }

    /// Whether `msg` could touch what a backend owns, before it has said what that is.
    fn may_be_touched_by(msg: &RouteNetlinkMessage) -> bool {
        match msg {
            RouteNetlinkMessage::DelRoute(r) => u8::from(r.header.protocol) == RTPROT_WEFT,
            RouteNetlinkMessage::NewLink(l) => !l.header.flags.contains(LinkFlags::Up),
            RouteNetlinkMessage::DelLink(_)
            | RouteNetlinkMessage::DelNeighbour(_)
            | RouteNetlinkMessage::DelAddress(_) => true,
            _ => false,
        }
    }
}

type Events<T> = UnboundedReceiver<(NetlinkMessage<T>, SocketAddr)>;

/// What the judging task and the waiter share.
#[derive(Default)]
struct Shared {
    /// What to judge against: the last `drifted` caller's (None before the first call: events
    /// that may concern any device count, so none is lost before the backend says what it owns).
    owned: Mutex<Option<Watched>>,
    /// Something owned changed since the last `drifted` returned (or `settle`).
    drifted: AtomicBool,
    wake: Notify,
    /// The sequence number of the marker `settle` waits for (0: none), the port it comes from,
    /// and how many of the watch's sockets have passed it.
    marker: AtomicU32,
    marker_port: u32,
    markers_seen: AtomicUsize,
    settled: Notify,
}

impl Shared {
    fn judge(&self, msg: &RouteNetlinkMessage) {
        let hit = match &*self.owned.lock().unwrap_or_else(PoisonError::into_inner) {
            Some(owned) => owned.touched_by(msg),
            None => Watched::may_be_touched_by(msg),
        };
        if hit {
            debug!(event = ?msg.message_type(), "owned kernel state changed");
            self.drifted();
        }
    }

    /// A deleted weft nexthop took its routes with it, which the kernel does not report as
    /// route deletions.
    fn judge_nexthop(&self, msg: &NexthopMessage) {
        if let NexthopMessage::Del(nh) = msg {
            if nh.protocol == RTPROT_WEFT {
                debug!(id = nh.id, "weft's nexthop deleted");
                self.drifted();
            }
        }
    }

    fn drifted(&self) {
        self.drifted.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    /// Whether `header` from `source` is the marker `settle` waits for.
    fn is_marker(&self, header: &NetlinkHeader, source: &SocketAddr) -> bool {
        let seq = self.marker.load(Ordering::Acquire);
        seq != 0 && header.sequence_number == seq && source.port_number() == self.marker_port
    }
}

/// A multicast rtnetlink subscription (links, routes and addresses of both families, neighbours,
/// nexthops).
pub struct DriftWatch {
    shared: Arc<Shared>,
    judge: JoinHandle<()>,
    judge_nexthops: Option<JoinHandle<()>>,
    /// Sends `settle`'s markers, to the ports of the subscribed sockets.
    markers: Option<Socket>,
    ports: Vec<u32>,
    /// The sequence number of the last marker sent.
    last_marker: u32,
}

impl DriftWatch {
    /// Subscribes in the current network namespace; the socket is driven on the current runtime.
    pub fn open() -> Result<Self, Error> {
        // IPv6 routes and addresses too: a dual-stack backend's (deletions only pass the filter,
        // and the kernel's own IPv6 route churn is judged no drift: not protocol 87).
        let groups = [
            MulticastGroup::Link,
            MulticastGroup::Ipv4Route,
            MulticastGroup::Ipv4Ifaddr,
            MulticastGroup::Ipv6Route,
            MulticastGroup::Ipv6Ifaddr,
            MulticastGroup::Neigh,
        ];
        let (mut conn, _handle, events) = rtnetlink::new_multicast_connection(&groups)
            .map_err(Error::io("subscribe to netlink events"))?;
        let mut ports = Vec::new();
        let socket = conn.socket_mut().socket_ref();
        pass_only(socket, &ROUTE_EVENTS, "route");
        ports.extend(port_of(socket));
        tokio::spawn(conn);
        let markers = marker_socket()
            .inspect_err(|e| debug!(error = %e, "no markers: echoes are told by timing only"))
            .ok();
        let shared = Arc::new(Shared {
            marker_port: markers.as_ref().map_or(0, |(_, port)| *port),
            ..Shared::default()
        });
        let judge = tokio::spawn(judge_all(events, shared.clone(), Shared::judge));
        // Without nexthop objects (Linux < 5.3), weft's routes name none.
        let nexthop_events = nexthop::events(|s| {
            pass_only(s, &NEXTHOP_EVENTS, "nexthop");
            ports.extend(port_of(s));
        });
        let judge_nexthops = match nexthop_events {
            Ok(events) => Some(tokio::spawn(judge_all(
                events,
                shared.clone(),
                Shared::judge_nexthop,
            ))),
            Err(e) => {
                debug!(error = %e, "no nexthop events");
                None
            }
        };
        Ok(Self {
            shared,
            judge,
            judge_nexthops,
            markers: markers.map(|(s, _)| s),
            ports,
            last_marker: 0,
        })
    }

    /// Resolves once something in `owned` changed (at once if it already has). Pends forever if
    /// the socket closed. Cancel-safe: a change is kept until a call returns for it.
    pub async fn drifted(&mut self, owned: &Watched) {
        *self
            .shared
            .owned
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(owned.clone());
        loop {
            let woken = self.shared.wake.notified();
            if self.shared.drifted.swap(false, Ordering::AcqRel) {
                return;
            }
            woken.await;
        }
    }

    /// Forgets the changes made so far, so the echoes of weft's own do not trigger another
    /// pass. The kernel queued every echo of a request before answering it, but the judges read
    /// them when the runtime gets to it: a marker sent to each subscribed socket now, queued
    /// behind those echoes, says when they are all judged. Waits for that, briefly; if a marker
    /// is lost (a socket closed, events overrun), nothing is forgotten.
    pub async fn settle(&mut self) {
        // Never 0 ("none"), and never the last one's, which may still be on its way.
        self.last_marker = self.last_marker.wrapping_add(1).max(1);
        let seq = self.last_marker;
        self.shared.markers_seen.store(0, Ordering::Release);
        self.shared.marker.store(seq, Ordering::Release);
        let sent = match &self.markers {
            Some(socket) => (self.ports.iter())
                .filter(|&&port| send_marker(socket, port, seq).is_ok())
                .count(),
            None => 0,
        };
        let all_seen = async {
            loop {
                let seen = self.shared.settled.notified();
                if self.shared.markers_seen.load(Ordering::Acquire) >= sent {
                    return;
                }
                seen.await;
            }
        };
        let seen = tokio::time::timeout(SETTLE_LIMIT, all_seen).await.is_ok();
        self.shared.marker.store(0, Ordering::Release);
        if seen {
            self.shared.drifted.store(false, Ordering::Release);
        } else {
            // Lost with events, most likely (an overrun): what was judged stands, at worst one
            // more full pass.
            debug!("drift markers not seen in time");
        }
    }
}

impl Drop for DriftWatch {
    fn drop(&mut self) {
        self.judge.abort();
        if let Some(j) = &self.judge_nexthops {
            j.abort();
        }
    }
}

/// How long `settle` waits for its markers: they are queued behind events already there, read
/// within a turn of the runtime.
const SETTLE_LIMIT: Duration = Duration::from_secs(1);

/// Judges every event as it arrives, so none waits in a queue.
async fn judge_all<T>(mut events: Events<T>, shared: Arc<Shared>, judge: fn(&Shared, &T)) {
    while let Some((msg, source)) = events.next().await {
        match msg.payload {
            NetlinkPayload::InnerMessage(m) => judge(&shared, &m),
            NetlinkPayload::Noop if shared.is_marker(&msg.header, &source) => {
                shared.markers_seen.fetch_add(1, Ordering::AcqRel);
                shared.settled.notify_one();
            }
            // The socket's buffer was full (netlink-proto's stand-in for ENOBUFS) and the kernel
            // dropped events: any of them may have been a deletion.
            NetlinkPayload::Overrun(_) => {
                info!("netlink events lost to a full socket buffer: counted as drift");
                shared.drifted();
            }
            _ => {}
        }
    }
}

/// What the route socket lets through: the messages `Watched::touched_by` can act on (a link set
/// down comes as RTM_NEWLINK), and netlink's own control messages (`settle`'s markers are
/// NLMSG_NOOP).
const ROUTE_EVENTS: [u16; 9] = [
    libc::RTM_NEWLINK,
    libc::RTM_DELLINK,
    libc::RTM_DELADDR,
    libc::RTM_DELROUTE,
    libc::RTM_DELNEIGH,
    NLMSG_NOOP,
    NLMSG_ERROR,
    NLMSG_DONE,
    NLMSG_OVERRUN,
];

/// What the nexthop socket lets through: deletions, and netlink's own control messages.
const NEXTHOP_EVENTS: [u16; 5] = [
    nexthop::RTM_DELNEXTHOP,
    NLMSG_NOOP,
    NLMSG_ERROR,
    NLMSG_DONE,
    NLMSG_OVERRUN,
];

/// The netlink port of `socket`, if it has one.
fn port_of(socket: &Socket) -> Option<u32> {
    let mut addr = SocketAddr::new(0, 0);
    socket.get_address(&mut addr).ok()?;
    Some(addr.port_number()).filter(|&p| p != 0)
}

/// A socket to send `settle`'s markers from, and its port.
fn marker_socket() -> std::io::Result<(Socket, u32)> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    let port = socket.bind_auto()?.port_number();
    Ok((socket, port))
}

/// Sends the marker `seq` (an NLMSG_NOOP, header only) to the socket at `port`. Needs
/// CAP_NET_ADMIN, as everything weftd does.
fn send_marker(socket: &Socket, port: u32, seq: u32) -> std::io::Result<()> {
    let mut header = NetlinkHeader::default();
    header.message_type = NLMSG_NOOP;
    header.sequence_number = seq;
    let mut msg = NetlinkMessage::<RouteNetlinkMessage>::new(header, NetlinkPayload::Noop);
    msg.finalize();
    let mut buf = [0; 16];
    msg.serialize(&mut buf);
    socket.send_to(&buf, &SocketAddr::new(port, 0), 0)?;
    Ok(())
}

/// Has the kernel drop every message for `socket` but those of `types`. Where it refuses (no
/// socket filters in that kernel or sandbox) the watch goes on unfiltered: slower, not wrong.
/// Also makes the socket's buffer room for [`EVENT_BUFFER`]: the deletions of a burst of
/// peers leaving (route, neighbour, FDB entry each) arrive faster than they are read while weft
/// sends its own requests, and an overrun would lose someone else's deletion among them.
fn pass_only(socket: &impl AsFd, types: &[u16], name: &str) {
    if let Err(e) = SockRef::from(socket).attach_filter(&type_filter(types)) {
        debug!(socket = name, error = %e, "netlink events unfiltered");
    }
    let force = nix::sys::socket::setsockopt(socket, sockopt::RcvBufForce, &EVENT_BUFFER);
    if let Err(e) = force {
        // Without CAP_NET_ADMIN: as much as net.core.rmem_max allows.
        let _ = nix::sys::socket::setsockopt(socket, sockopt::RcvBuf, &EVENT_BUFFER);
        debug!(socket = name, error = %e, "netlink event buffer not enlarged past rmem_max");
    }
}

/// Receive buffer of the event sockets: ~5,000 deletion notifications (~800 bytes of buffer
/// each). Memory is only taken while events wait to be read.
const EVENT_BUFFER: usize = 4 << 20;

/// A classic BPF program passing netlink messages of `types` (at most 255) only. A
/// notification is a datagram of one message, so its first header decides. Loads from a netlink
/// packet read in network byte order (libmnl's examples compare with htons), hence `to_be`.
fn type_filter(types: &[u16]) -> Vec<SockFilter> {
    const LOAD_HALF: u16 = (libc::BPF_LD | libc::BPF_H | libc::BPF_ABS) as u16;
    const JUMP_IF_EQUAL: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const RETURN: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    /// `nlmsg_type`, after the 32-bit `nlmsg_len`.
    const TYPE_OFFSET: u32 = 4;
    let mut prog = vec![SockFilter::new(LOAD_HALF, 0, 0, TYPE_OFFSET)];
    for (i, t) in types.iter().enumerate() {
        // A match jumps over the comparisons left and the drop, to the pass.
        let over = (types.len() - i) as u8;
        prog.push(SockFilter::new(
            JUMP_IF_EQUAL,
            over,
            0,
            u32::from(t.to_be()),
        ));
    }
    prog.push(SockFilter::new(RETURN, 0, 0, 0));
    prog.push(SockFilter::new(RETURN, 0, 0, u32::MAX));
    prog
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtnetlink::packet_core::NetlinkHeader;
    use rtnetlink::packet_route::link::LinkMessage;
    use rtnetlink::packet_route::route::{RouteMessage, RouteProtocol};
    use std::time::Duration;

    fn del_route(protocol: u8) -> RouteNetlinkMessage {
        let mut r = RouteMessage::default();
        r.header.protocol = RouteProtocol::from(protocol);
        RouteNetlinkMessage::DelRoute(r)
    }

    fn del_link(index: u32) -> RouteNetlinkMessage {
        let mut l = LinkMessage::default();
        l.header.index = index;
        RouteNetlinkMessage::DelLink(l)
    }

    /// A watch fed by hand instead of by a netlink socket.
    fn watch() -> (DriftWatch, Arc<Shared>) {
        let shared = Arc::new(Shared::default());
        let w = DriftWatch {
            shared: shared.clone(),
            judge: tokio::spawn(async {}),
            judge_nexthops: None,
            markers: None,
            ports: Vec::new(),
            last_marker: 0,
        };
        (w, shared)
    }

    /// Whether `drifted` for the vxlan device at index 7 resolves soon.
    async fn wakes(w: &mut DriftWatch) -> bool {
        let owned = Watched {
            device: Some("flannel.1".into()),
            index: Some(7),
        };
        tokio::time::timeout(Duration::from_millis(50), w.drifted(&owned))
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn any_number_of_changes_waits_as_one_and_noise_as_none() {
        let (mut w, shared) = watch();
        assert!(!wakes(&mut w).await, "nothing happened yet");
        for _ in 0..100_000 {
            shared.judge(&del_route(RTPROT_WEFT));
            shared.judge(&del_link(7));
        }
        assert!(wakes(&mut w).await);
        assert!(!wakes(&mut w).await, "200,000 changes are one drift");
        shared.judge(&del_link(9));
        shared.judge(&del_route(3));
        assert!(
            !wakes(&mut w).await,
            "another device, a kernel route: not ours"
        );
        shared.judge(&del_link(7));
        assert!(wakes(&mut w).await);
    }

    #[tokio::test]
    async fn events_lost_to_a_full_socket_buffer_count_as_drift() {
        let (mut w, shared) = watch();
        let (tx, rx) = futures::channel::mpsc::unbounded();
        let mut header = NetlinkHeader::default();
        header.message_type = NLMSG_OVERRUN;
        let overrun = NetlinkMessage::new(header, NetlinkPayload::Overrun(Vec::new()));
        tx.unbounded_send((overrun, SocketAddr::new(0, 0)))
            .expect("send");
        drop(tx);
        judge_all(rx, shared, Shared::judge).await;
        assert!(wakes(&mut w).await);
    }

    /// The message types, of all 65,536, that the kernel lets through to a socket filtered to
    /// `types`: each is sent to it from a second socket of this process.
    fn passed_by_filter(types: &[u16]) -> Vec<u16> {
        use rtnetlink::sys::{protocols::NETLINK_ROUTE, Socket};
        let mut rx = Socket::new(NETLINK_ROUTE).expect("socket");
        let to = rx.bind_auto().expect("bind");
        SockRef::from(&rx)
            .attach_filter(&type_filter(types))
            .expect("attach filter");
        let tx = Socket::new(NETLINK_ROUTE).expect("socket");
        let mut passed = Vec::new();
        let mut buf = Vec::with_capacity(64);
        for t in 0..=u16::MAX {
            let mut msg = Vec::new();
            msg.extend(16u32.to_ne_bytes());
            msg.extend(t.to_ne_bytes());
            msg.resize(16, 0);
            tx.send_to(&msg, &to, 0).expect("send");
            // Delivery between netlink sockets is done when the send returns.
            buf.clear();
            match rx.recv(&mut buf, libc::MSG_DONTWAIT) {
                Ok(_) => passed.push(t),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("recv: {e}"),
            }
        }
        passed
    }

    #[test]
    fn the_kernel_passes_exactly_the_message_types_the_judges_act_on() {
        // Netlink lets only CAP_NET_ADMIN send to another user socket.
        if !weft_lab::require_root(
            "watch::tests::the_kernel_passes_exactly_the_message_types_the_judges_act_on",
        ) {
            return;
        }
        // Link set down or deleted, address, route or neighbour deleted; netlink's own.
        assert_eq!(
            passed_by_filter(&ROUTE_EVENTS),
            [1, 2, 3, 4, 16, 17, 21, 25, 29]
        );
        // Nexthop deleted; netlink's own.
        assert_eq!(passed_by_filter(&NEXTHOP_EVENTS), [1, 2, 3, 4, 105]);
    }

    #[tokio::test]
    async fn echoes_can_be_discarded_and_changes_before_the_first_wait_count() {
        let (mut w, shared) = watch();
        // Before the backend said what it owns, a deleted link may be its device.
        shared.judge(&del_link(7));
        assert!(wakes(&mut w).await);
        shared.judge(&del_link(7));
        w.settle().await;
        assert!(!wakes(&mut w).await, "a discarded change does not wake");
    }
}
