//! Noticing owned kernel state changed behind weftd's back, from rtnetlink multicast events.
//! Coarse on purpose: any deletion touching weft's device or a weft route means "reconcile now";
//! the reconcile itself finds out what, if anything, is wrong.

use futures::channel::mpsc::UnboundedReceiver;
use futures::StreamExt;
use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload};
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::sys::SocketAddr;
use rtnetlink::MulticastGroup;
use tracing::debug;

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
}

type Events = UnboundedReceiver<(NetlinkMessage<RouteNetlinkMessage>, SocketAddr)>;

/// A multicast rtnetlink subscription (links, IPv4 routes and addresses, neighbours).
pub struct DriftWatch {
    events: Events,
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
        Ok(Self { events })
    }

    /// Resolves at the first event touching `owned`. Pends forever if the socket closed.
    pub async fn drifted(&mut self, owned: &Owned) {
        while let Some((msg, _)) = self.events.next().await {
            if let NetlinkPayload::InnerMessage(m) = msg.payload {
                if owned.touched_by(&m) {
                    debug!(event = ?m.message_type(), "owned kernel state changed");
                    return;
                }
            }
        }
        std::future::pending::<()>().await
    }

    /// Drops queued events, so the echoes of weft's own changes do not trigger another pass.
    pub fn discard_pending(&mut self) {
        while self.events.try_recv().is_ok() {}
    }
}
