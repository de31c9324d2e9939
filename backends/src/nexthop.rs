//! Nexthop objects (Linux 5.3+): the next hop of a route as an object of its own, which routes
//! name by id (`ip route add 10.244.3.0/24 nhid 7`).
//!
//! Why weft uses them: the kernel shares one `fib_info` among routes with equal next hops and
//! finds it by a hash that leaves the gateway out. Every peer route has its own gateway (vxlan's
//! is the peer's network address, host-gw's its PublicIP), so with classic routes all of them
//! land in one hash chain and each insert walks all the others: 10,000 peer routes cost the
//! kernel 2.2 s on the development VM, 500 more into those 225 ms. A route naming a nexthop is
//! hashed by its id: 10,000 nexthops and their routes take 0.27 s, 500 more 20 ms.
//!
//! netlink-packet-route has no nexthop messages (RTM_NEWNEXTHOP and friends), so this module
//! encodes the two weft sends (a gateway nexthop on a device, and a delete by id) and decodes what
//! the kernel reports. Decoding never fails on a nexthop message: a shape weft never makes (a
//! group, a blackhole, an FDB, IPv6 or encapsulating nexthop, an attribute it cannot read) is
//! decoded as [`Nexthop::other`]. Changes travel in batches ([`crate::batch`]); dumps and events
//! on netlink-proto connections of their own.

use std::net::Ipv4Addr;

use futures::channel::mpsc::UnboundedReceiver;
use futures::StreamExt;
use rtnetlink::packet_core::{
    DecodeError, DefaultNla, Emitable, NetlinkDeserializable, NetlinkHeader, NetlinkMessage,
    NetlinkPayload, NetlinkSerializable, NlasIterator, NLA_TYPE_MASK, NLM_F_DUMP, NLM_F_REQUEST,
};
use rtnetlink::proto::ConnectionHandle;
use rtnetlink::sys::protocols::NETLINK_ROUTE;
use rtnetlink::sys::{AsyncSocket, Socket, SocketAddr};

use crate::Error;

pub const RTM_NEWNEXTHOP: u16 = 104;
pub const RTM_DELNEXTHOP: u16 = 105;
pub const RTM_GETNEXTHOP: u16 = 106;

/// The multicast group of nexthop changes.
pub const RTNLGRP_NEXTHOP: u32 = 32;

const NHA_ID: u16 = 1;
const NHA_GROUP: u16 = 2;
const NHA_BLACKHOLE: u16 = 4;
const NHA_OIF: u16 = 5;
const NHA_GATEWAY: u16 = 6;
const NHA_ENCAP: u16 = 8;
const NHA_FDB: u16 = 11;
const NHA_RES_GROUP: u16 = 12;

/// `RTNH_F_ONLINK` in `nh_flags`: the gateway is on the device's link, whatever its prefixes.
const RTNH_F_ONLINK: u32 = 4;

/// `struct nhmsg`: family, scope, protocol, a reserved byte, then 32 bits of flags.
const NHMSG_LEN: usize = 8;

const AF_INET: u8 = libc::AF_INET as u8;

/// A nexthop as weft makes it (an IPv4 gateway on a device), or as the kernel reports one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Nexthop {
    pub id: u32,
    /// `nh_protocol`, as routes' `rtm_protocol`: weft's are `RTPROT_WEFT`.
    pub protocol: u8,
    pub oif: Option<u32>,
    pub gateway: Option<Ipv4Addr>,
    pub onlink: bool,
    /// Not a shape weft makes: a group, a blackhole, an FDB, IPv6 or encapsulating nexthop, or
    /// one with an attribute that could not be read.
    pub other: bool,
}

impl Nexthop {
    /// Decodes the payload of an RTM_NEWNEXTHOP or RTM_DELNEXTHOP message (`struct nhmsg` and
    /// its attributes). Never fails: what it cannot read makes the nexthop [`Nexthop::other`].
    pub fn parse(payload: &[u8]) -> Self {
        let mut nh = Self::default();
        let Some((head, attrs)) = payload.split_at_checked(NHMSG_LEN) else {
            nh.other = true;
            return nh;
        };
        nh.other = head[0] != AF_INET;
        nh.protocol = head[2];
        let flags = u32::from_ne_bytes([head[4], head[5], head[6], head[7]]);
        nh.onlink = flags & RTNH_F_ONLINK != 0;
        for nla in NlasIterator::new(attrs) {
            let Ok(nla) = nla else {
                nh.other = true;
                break;
            };
            let value = nla.value();
            let u32_value = <[u8; 4]>::try_from(value).ok();
            match (nla.kind() & NLA_TYPE_MASK, u32_value) {
                (NHA_ID, Some(v)) => nh.id = u32::from_ne_bytes(v),
                (NHA_OIF, Some(v)) => nh.oif = Some(u32::from_ne_bytes(v)),
                // The address in network order, as in routes.
                (NHA_GATEWAY, Some(v)) => nh.gateway = Some(Ipv4Addr::from(v)),
                (NHA_ID | NHA_OIF | NHA_GATEWAY, None)
                | (NHA_GROUP | NHA_BLACKHOLE | NHA_ENCAP | NHA_FDB | NHA_RES_GROUP, _) => {
                    nh.other = true
                }
                _ => {}
            }
        }
        nh
    }

    fn id_only(id: u32) -> Vec<DefaultNla> {
        vec![DefaultNla::new(NHA_ID, id.to_ne_bytes().to_vec())]
    }

    fn attributes(&self) -> Vec<DefaultNla> {
        // In iproute2's order.
        let mut nlas = Self::id_only(self.id);
        if let Some(g) = self.gateway {
            nlas.push(DefaultNla::new(NHA_GATEWAY, g.octets().to_vec()));
        }
        if let Some(oif) = self.oif {
            nlas.push(DefaultNla::new(NHA_OIF, oif.to_ne_bytes().to_vec()));
        }
        nlas
    }
}

/// The nexthop messages weft sends and receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NexthopMessage {
    /// Add or replace (by the request's flags) a nexthop; also what a dump reports.
    New(Nexthop),
    /// Delete the nexthop of this id (a request names nothing else) and the routes that name
    /// it; also the kernel's event.
    Del(Nexthop),
    /// A dump request: every nexthop.
    Get,
}

impl NetlinkSerializable for NexthopMessage {
    fn message_type(&self) -> u16 {
        match self {
            Self::New(_) => RTM_NEWNEXTHOP,
            Self::Del(_) => RTM_DELNEXTHOP,
            Self::Get => RTM_GETNEXTHOP,
        }
    }

    fn buffer_len(&self) -> usize {
        NHMSG_LEN
            + match self {
                Self::New(nh) => nh.attributes().as_slice().buffer_len(),
                Self::Del(nh) => Nexthop::id_only(nh.id).as_slice().buffer_len(),
                Self::Get => 0,
            }
    }

    fn serialize(&self, buffer: &mut [u8]) {
        let Some((head, rest)) = buffer.split_at_mut_checked(NHMSG_LEN) else {
            return;
        };
        // A delete and a dump must have an all-zero header (the kernel refuses anything else).
        head.fill(0);
        match self {
            Self::New(nh) => {
                head[0] = AF_INET;
                head[2] = nh.protocol;
                let flags = if nh.onlink { RTNH_F_ONLINK } else { 0 };
                head[4..8].copy_from_slice(&flags.to_ne_bytes());
                nh.attributes().as_slice().emit(rest);
            }
            Self::Del(nh) => Nexthop::id_only(nh.id).as_slice().emit(rest),
            Self::Get => {}
        }
    }
}

impl NexthopMessage {
    /// The message's payload (`struct nhmsg` and attributes), as sent.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut buf = vec![0; self.buffer_len()];
        self.serialize(&mut buf);
        buf
    }
}

impl NetlinkDeserializable for NexthopMessage {
    type Error = DecodeError;

    fn deserialize(header: &NetlinkHeader, payload: &[u8]) -> Result<Self, DecodeError> {
        match header.message_type {
            RTM_NEWNEXTHOP => Ok(Self::New(Nexthop::parse(payload))),
            RTM_DELNEXTHOP => Ok(Self::Del(Nexthop::parse(payload))),
            RTM_GETNEXTHOP => Ok(Self::Get),
            t => Err(DecodeError::from(format!(
                "message type {t} is not a nexthop message"
            ))),
        }
    }
}

/// A connection carrying nexthop messages.
pub type Handle = ConnectionHandle<NexthopMessage>;

/// Opens a route-netlink socket for nexthop messages in the current network namespace and
/// drives it on the runtime.
pub fn connect() -> Result<Handle, Error> {
    let (conn, handle, _) = rtnetlink::proto::new_connection::<NexthopMessage>(NETLINK_ROUTE)
        .map_err(Error::io("open netlink socket for nexthops"))?;
    tokio::spawn(conn);
    Ok(handle)
}

/// The kernel's nexthop changes, as they happen: subscribes a socket of its own, driven on the
/// runtime, once `prepare` had it bound but not yet subscribed (to attach a filter, say). Fails
/// on a kernel without nexthop objects (it has no such group).
pub fn events(
    prepare: impl FnOnce(&Socket),
) -> Result<UnboundedReceiver<(NetlinkMessage<NexthopMessage>, SocketAddr)>, Error> {
    let (mut conn, _, events) = rtnetlink::proto::new_connection::<NexthopMessage>(NETLINK_ROUTE)
        .map_err(Error::io("open netlink socket for nexthop events"))?;
    let socket = conn.socket_mut().socket_mut();
    socket
        .bind_auto()
        .map_err(Error::io("open netlink socket for nexthop events"))?;
    prepare(socket);
    (socket.add_membership(RTNLGRP_NEXTHOP)).map_err(Error::io("subscribe to nexthop events"))?;
    tokio::spawn(conn);
    Ok(events)
}

/// Every nexthop of the namespace. Fails (EOPNOTSUPP) on a kernel without nexthop objects.
pub async fn dump(handle: &Handle) -> Result<Vec<Nexthop>, rtnetlink::Error> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let req = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(NexthopMessage::Get));
    let mut resp = (handle.clone())
        .request(req, SocketAddr::new(0, 0))
        .map_err(|_| rtnetlink::Error::RequestFailed)?;
    let mut all = Vec::new();
    while let Some(m) = resp.next().await {
        match m.payload {
            NetlinkPayload::InnerMessage(NexthopMessage::New(nh)) => all.push(nh),
            NetlinkPayload::Error(e) if e.code.is_some() => {
                return Err(rtnetlink::Error::NetlinkError(e))
            }
            _ => {}
        }
    }
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The bytes the kernel sends for `nh` (the same layout weft sends).
    fn encode(nh: Nexthop) -> Vec<u8> {
        NexthopMessage::New(nh).to_bytes()
    }

    #[test]
    fn a_gateway_nexthop_is_encoded_as_iproute2_encodes_it() {
        // `ip nexthop add id 258 via 10.244.3.0 dev #7 onlink proto 87`, as strace shows iproute2
        // sending it.
        let nh = Nexthop {
            id: 258,
            protocol: 87,
            oif: Some(7),
            gateway: Some(Ipv4Addr::new(10, 244, 3, 0)),
            onlink: true,
            other: false,
        };
        let mut want = vec![2, 0, 87, 0];
        want.extend(4u32.to_ne_bytes());
        want.extend([8, 0, 1, 0]);
        want.extend(258u32.to_ne_bytes());
        want.extend([8, 0, 6, 0, 10, 244, 3, 0]);
        want.extend([8, 0, 5, 0]);
        want.extend(7u32.to_ne_bytes());
        assert_eq!(encode(nh), want);
        assert_eq!(Nexthop::parse(&want), nh);
    }

    #[test]
    fn a_delete_names_only_the_id_under_an_all_zero_header() {
        let msg = NexthopMessage::Del(Nexthop {
            id: 9,
            protocol: 87,
            gateway: Some(Ipv4Addr::new(10, 0, 0, 1)),
            ..Nexthop::default()
        });
        let buf = msg.to_bytes();
        let mut want = vec![0; 8];
        want.extend([8, 0, 1, 0]);
        want.extend(9u32.to_ne_bytes());
        assert_eq!(buf, want);
    }

    #[test]
    fn shapes_weft_never_makes_are_other() {
        let plain = encode(Nexthop {
            id: 1,
            protocol: 87,
            oif: Some(2),
            gateway: Some(Ipv4Addr::new(192, 168, 1, 1)),
            ..Nexthop::default()
        });
        assert!(!Nexthop::parse(&plain).other);
        let with = |kind: u16, value: &[u8]| {
            let mut m = plain.clone();
            m.extend(((4 + value.len()) as u16).to_ne_bytes());
            m.extend(kind.to_ne_bytes());
            m.extend(value);
            m.resize(m.len().next_multiple_of(4), 0);
            Nexthop::parse(&m)
        };
        assert!(with(NHA_BLACKHOLE, &[]).other, "a blackhole");
        assert!(with(NHA_FDB, &[]).other, "an FDB nexthop");
        assert!(with(NHA_GROUP, &[1, 0, 0, 0, 0, 0, 0, 0]).other, "a group");
        assert!(with(NHA_GATEWAY, &[0; 16]).other, "an IPv6 gateway");
        assert!(
            !with(99, &[1, 2, 3, 4]).other,
            "an attribute of a later kernel"
        );
        let mut v6 = plain.clone();
        v6[0] = libc::AF_INET6 as u8;
        assert!(Nexthop::parse(&v6).other, "an IPv6 nexthop");
        assert!(Nexthop::parse(&plain[..5]).other, "a short header");
        assert!(
            Nexthop::parse(&plain[..plain.len() - 2]).other,
            "a cut attribute"
        );
    }

    proptest! {
        #[test]
        fn any_bytes_decode_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..96)) {
            let _ = Nexthop::parse(&bytes);
        }

        #[test]
        fn what_weft_encodes_decodes_to_itself(
            id in any::<u32>(),
            protocol in any::<u8>(),
            oif in proptest::option::of(any::<u32>()),
            gateway in proptest::option::of(any::<u32>()),
            onlink in any::<bool>(),
        ) {
            let nh = Nexthop { id, protocol, oif, gateway: gateway.map(Ipv4Addr::from), onlink, other: false };
            prop_assert_eq!(Nexthop::parse(&encode(nh)), nh);
        }
    }
}
