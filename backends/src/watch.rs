//! Noticing owned kernel state changed behind weftd's back, from rtnetlink multicast events.
//! Coarse on purpose: any deletion touching weft's device or a weft route means "reconcile now";
//! the reconcile itself finds out what, if anything, is wrong.
//!
//! Events are judged as they arrive, by a task of their own, and folded into one flag: however
//! many arrive while weftd is busy elsewhere, what waits for it is "something changed", never a
//! queue (a busy host's links, routes and neighbours would otherwise pile up without bound).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use futures::channel::mpsc::UnboundedReceiver;
use futures::StreamExt;
use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload};
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::sys::SocketAddr;
use rtnetlink::MulticastGroup;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::debug;

use crate::nexthop::{self, NexthopMessage};
use crate::routes::RTPROT_WEFT;
use crate::Error;

/// What the running backend owns, to tell relevant events from noise.
#[derive(Debug, Clone, Default)]
pub struct Owned {
    /// The backend's device (vxlan), by name since its index changes when it is recreated.
    pub device: Option<String>,
    /// Its current index, if it exists.
    pub index: Option<u32>,
}

impl Owned {
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
    owned: Mutex<Option<Owned>>,
    /// Something owned changed since the last `drifted` returned (or `discard_pending`).
    drifted: AtomicBool,
    wake: Notify,
}

impl Shared {
    fn judge(&self, msg: &RouteNetlinkMessage) {
        let hit = match &*self.owned.lock().unwrap_or_else(PoisonError::into_inner) {
            Some(owned) => owned.touched_by(msg),
            None => Owned::may_be_touched_by(msg),
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
}

/// A multicast rtnetlink subscription (links, IPv4 routes and addresses, neighbours, nexthops).
pub struct DriftWatch {
    shared: Arc<Shared>,
    judge: JoinHandle<()>,
    judge_nexthops: Option<JoinHandle<()>>,
}

impl DriftWatch {
    /// Subscribes in the current network namespace; the socket is driven on the current runtime.
    pub fn open() -> Result<Self, Error> {
        let groups = [
            MulticastGroup::Link,
            MulticastGroup::Ipv4Route,
            MulticastGroup::Ipv4Ifaddr,
            MulticastGroup::Neigh,
        ];
        let (conn, _handle, events) = rtnetlink::new_multicast_connection(&groups)
            .map_err(Error::io("subscribe to netlink events"))?;
        tokio::spawn(conn);
        let shared = Arc::new(Shared::default());
        let judge = tokio::spawn(judge_all(events, shared.clone(), Shared::judge));
        // Without nexthop objects (Linux < 5.3), weft's routes name none.
        let judge_nexthops = match nexthop::events() {
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
        })
    }

    /// Resolves once something in `owned` changed (at once if it already has). Pends forever if
    /// the socket closed. Cancel-safe: a change is kept until a call returns for it.
    pub async fn drifted(&mut self, owned: &Owned) {
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

    /// Forgets changes seen so far, so the echoes of weft's own changes do not trigger another
    /// pass.
    pub fn discard_pending(&mut self) {
        self.shared.drifted.store(false, Ordering::Release);
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

/// Judges every event as it arrives, so none waits in a queue.
async fn judge_all<T>(mut events: Events<T>, shared: Arc<Shared>, judge: fn(&Shared, &T)) {
    while let Some((msg, _)) = events.next().await {
        if let NetlinkPayload::InnerMessage(m) = msg.payload {
            judge(&shared, &m);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
        };
        (w, shared)
    }

    /// Whether `drifted` for the vxlan device at index 7 resolves soon.
    async fn wakes(w: &mut DriftWatch) -> bool {
        let owned = Owned {
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
    async fn echoes_can_be_discarded_and_changes_before_the_first_wait_count() {
        let (mut w, shared) = watch();
        // Before the backend said what it owns, a deleted link may be its device.
        shared.judge(&del_link(7));
        assert!(wakes(&mut w).await);
        shared.judge(&del_link(7));
        w.discard_pending();
        assert!(!wakes(&mut w).await, "a discarded change does not wake");
    }
}
