//! The kernel WireGuard device's generic netlink messages (the `wireguard` family, what `wg
//! set` sends), built from [`WgPeer`]s; and a small blocking socket that resolves the family and
//! sends them. netlink-packet-wireguard describes the attributes; the `genetlink` crate is not
//! used because it pulls a second netlink-proto (0.13, rtnetlink's is 0.14) for what is three
//! request/answer exchanges.
//!
//! Peers are set declaratively: each carries its endpoint, its AllowedIPs with
//! WGPEER_F_REPLACE_ALLOWEDIPS, its PSK (zeros when none, which clears one) and its keepalive (0
//! when none), so one message makes a peer whatever it was. A full pass removes the peers the
//! device holds and no lease wants, by key, rather than WGDEVICE_F_REPLACE_PEERS, which would
//! drop every session (a handshake per peer at every pass).

use std::io;
use std::net::SocketAddr;

use ipnet::IpNet;

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_generic::ctrl::nlas::GenlCtrlAttrs;
use netlink_packet_generic::ctrl::{GenlCtrl, GenlCtrlCmd};
use netlink_packet_generic::GenlMessage;
use netlink_packet_wireguard::{
    WireguardAddressFamily, WireguardAllowedIp, WireguardAllowedIpAttr, WireguardAttribute,
    WireguardCmd, WireguardMessage, WireguardPeer, WireguardPeerAttribute, WireguardPeerFlags,
};
use netlink_sys::{protocols::NETLINK_GENERIC, Socket};

use super::key::{Key, PrivateKey};
use super::want::WgPeer;
use crate::Error;

/// The generic netlink family of WireGuard devices.
pub const FAMILY: &str = "wireguard";

/// Attribute bytes per message: peers are split over several messages, as wg(8) does, so that
/// 10,000 of them never make one message larger than the socket takes.
const MESSAGE_BUDGET: usize = 16 * 1024;

/// The device's own settings: its private key and port.
pub fn set_device(device: &str, private: &PrivateKey, listen_port: u16) -> WireguardMessage {
    WireguardMessage {
        cmd: WireguardCmd::SetDevice,
        attributes: vec![
            WireguardAttribute::IfName(device.to_string()),
            WireguardAttribute::PrivateKey(*private.bytes()),
            WireguardAttribute::ListenPort(listen_port),
        ],
    }
}

/// One peer, declaratively: endpoint, AllowedIPs replaced, PSK (zeros: none) and keepalive (0:
/// off) always set.
pub fn peer(p: &WgPeer) -> WireguardPeer {
    let allowed = p.allowed_ips().map(|net| {
        let family = match net {
            IpNet::V4(_) => WireguardAddressFamily::Ipv4,
            IpNet::V6(_) => WireguardAddressFamily::Ipv6,
        };
        WireguardAllowedIp(vec![
            WireguardAllowedIpAttr::Family(family),
            WireguardAllowedIpAttr::IpAddr(net.network()),
            WireguardAllowedIpAttr::Cidr(net.prefix_len()),
        ])
    });
    WireguardPeer(vec![
        WireguardPeerAttribute::PublicKey(p.public_key),
        WireguardPeerAttribute::Flags(WireguardPeerFlags::ReplaceAllowedIps),
        WireguardPeerAttribute::Endpoint(p.endpoint),
        WireguardPeerAttribute::PresharedKey(p.psk.unwrap_or([0; 32])),
        WireguardPeerAttribute::PersistentKeepalive(p.keepalive.unwrap_or(0)),
        WireguardPeerAttribute::AllowedIps(allowed.collect()),
    ])
}

/// A peer to remove, by key (its sessions go with it).
pub fn removal(key: &Key) -> WireguardPeer {
    WireguardPeer(vec![
        WireguardPeerAttribute::PublicKey(*key),
        WireguardPeerAttribute::Flags(WireguardPeerFlags::RemoveMe),
    ])
}

/// `peers` (made by [`peer`] or [`removal`]) set on `device`, split into messages that each
/// stay within [`MESSAGE_BUDGET`].
pub fn set_peers(device: &str, peers: Vec<WireguardPeer>) -> Vec<WireguardMessage> {
    use netlink_packet_core::Emitable;
    let mut out = Vec::new();
    let mut chunk: Vec<WireguardPeer> = Vec::new();
    let mut size = 0;
    for p in peers {
        let len = std::slice::from_ref(&p).buffer_len();
        if !chunk.is_empty() && size + len > MESSAGE_BUDGET {
            out.push(peers_message(device, std::mem::take(&mut chunk)));
            size = 0;
        }
        size += len;
        chunk.push(p);
    }
    if !chunk.is_empty() {
        out.push(peers_message(device, chunk));
    }
    out
}

fn peers_message(device: &str, peers: Vec<WireguardPeer>) -> WireguardMessage {
    WireguardMessage {
        cmd: WireguardCmd::SetDevice,
        attributes: vec![
            WireguardAttribute::IfName(device.to_string()),
            WireguardAttribute::Peers(peers),
        ],
    }
}

/// The request reading the device (its peers), a dump.
pub fn get_device(device: &str) -> WireguardMessage {
    WireguardMessage {
        cmd: WireguardCmd::GetDevice,
        attributes: vec![WireguardAttribute::IfName(device.to_string())],
    }
}

/// The public keys of the peers in a device's (dumped) answers.
pub fn peer_keys(answers: &[WireguardMessage]) -> Vec<Key> {
    peer_states(answers).into_iter().map(|(k, ..)| k).collect()
}

/// Each peer of a device's (dumped) answers as `wg show` prints it: its key, its endpoint (none
/// until it is known) and when its last handshake completed (seconds since the epoch; 0: never).
pub fn peer_states(answers: &[WireguardMessage]) -> Vec<(Key, Option<SocketAddr>, u64)> {
    let peers = answers.iter().flat_map(|m| &m.attributes);
    let peers = peers.filter_map(|a| match a {
        WireguardAttribute::Peers(p) => Some(p),
        _ => None,
    });
    peers
        .flatten()
        .filter_map(|p| {
            let (mut key, mut endpoint, mut shake) = (None, None, 0);
            for a in &p.0 {
                match a {
                    WireguardPeerAttribute::PublicKey(k) => key = Some(*k),
                    WireguardPeerAttribute::Endpoint(e) => endpoint = Some(*e),
                    WireguardPeerAttribute::LastHandshake(t) => {
                        shake = u64::try_from(t.seconds).unwrap_or(0);
                    }
                    _ => {}
                }
            }
            Some((key?, endpoint, shake))
        })
        .collect()
}

/// `msg` as bytes for the family `family_id`, a request asking for an answer (an ack, or a
/// dump).
pub fn encode(msg: WireguardMessage, family_id: u16, seq: u32) -> Vec<u8> {
    let dump = msg.cmd == WireguardCmd::GetDevice;
    let mut genl = GenlMessage::from_payload(msg);
    genl.set_resolved_family_id(family_id);
    request(genl, seq, dump)
}

fn request<F>(payload: GenlMessage<F>, seq: u32, dump: bool) -> Vec<u8>
where
    GenlMessage<F>: netlink_packet_core::NetlinkSerializable,
    F: std::fmt::Debug,
{
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | if dump { NLM_F_DUMP } else { NLM_F_ACK };
    header.sequence_number = seq;
    let mut m = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(payload));
    m.finalize();
    let mut buf = vec![0; m.buffer_len()];
    m.serialize(&mut buf);
    buf
}

/// The request asking the kernel for the WireGuard family's id.
pub fn family_request(seq: u32) -> Vec<u8> {
    let ctrl = GenlCtrl {
        cmd: GenlCtrlCmd::GetFamily,
        nlas: vec![GenlCtrlAttrs::FamilyName(FAMILY.to_string())],
    };
    request(GenlMessage::from_payload(ctrl), seq, false)
}

/// A blocking generic netlink socket to the kernel's WireGuard family. Its requests are few
/// and short (the device, a batch of peers), so the backend makes them in place.
pub struct Genl {
    socket: Socket,
    family: u16,
    seq: u32,
}

impl Genl {
    /// Opens a socket and resolves the family; an error when the kernel has no WireGuard.
    pub fn open() -> Result<Self, Error> {
        let ctx = "generic netlink socket for WireGuard";
        let mut socket = Socket::new(NETLINK_GENERIC).map_err(Error::io(ctx))?;
        socket.bind_auto().map_err(Error::io(ctx))?;
        socket
            .connect(&netlink_sys::SocketAddr::new(0, 0))
            .map_err(Error::io(ctx))?;
        let mut g = Self {
            socket,
            family: 0,
            seq: 0,
        };
        let answers = g
            .exchange(family_request(1))
            .map_err(Error::io("resolve the kernel's wireguard netlink family"))?;
        g.family = answers
            .iter()
            .find_map(|b| family_id(b))
            .ok_or_else(|| Error::Other("the kernel named no wireguard family id".into()))?;
        Ok(g)
    }

    /// Sends `msgs` in order; the first the kernel refuses ends it.
    pub fn send(&mut self, msgs: Vec<WireguardMessage>) -> io::Result<()> {
        for m in msgs {
            self.seq = self.seq.wrapping_add(1);
            self.exchange(encode(m, self.family, self.seq))?;
        }
        Ok(())
    }

    /// The keys of the peers `device` holds.
    pub fn peers(&mut self, device: &str) -> io::Result<Vec<Key>> {
        Ok(peer_keys(&self.dump(device)?))
    }

    /// `device`'s peers as `wg show` prints them (see [`peer_states`]).
    pub fn peer_states(&mut self, device: &str) -> io::Result<Vec<(Key, Option<SocketAddr>, u64)>> {
        Ok(peer_states(&self.dump(device)?))
    }

    /// `device` as the kernel dumps it.
    fn dump(&mut self, device: &str) -> io::Result<Vec<WireguardMessage>> {
        self.seq = self.seq.wrapping_add(1);
        let answers = self.exchange(encode(get_device(device), self.family, self.seq))?;
        Ok(answers
            .iter()
            .filter_map(|b| NetlinkMessage::<GenlMessage<WireguardMessage>>::deserialize(b).ok())
            .filter_map(|m| match m.payload {
                NetlinkPayload::InnerMessage(g) => Some(g.payload),
                _ => None,
            })
            .collect())
    }

    /// Sends one request and collects the raw answers until its ack or the dump's end.
    fn exchange(&mut self, req: Vec<u8>) -> io::Result<Vec<Vec<u8>>> {
        self.socket.send(&req, 0)?;
        let mut out = Vec::new();
        loop {
            let (buf, _) = self.socket.recv_from_full()?;
            let mut at = 0;
            while at + 16 <= buf.len() {
                let len =
                    u32::from_ne_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]) as usize;
                let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
                if len < 16 || at + len > buf.len() {
                    return Err(io::Error::other("truncated netlink answer"));
                }
                let msg = &buf[at..at + len];
                match kind {
                    // NLMSG_ERROR: an ack (0) or the error.
                    2 => {
                        if len < 20 {
                            return Err(io::Error::other("truncated netlink error"));
                        }
                        let code = i32::from_ne_bytes([msg[16], msg[17], msg[18], msg[19]]);
                        if code != 0 {
                            return Err(io::Error::from_raw_os_error(-code));
                        }
                        return Ok(out);
                    }
                    // NLMSG_DONE: the end of a dump.
                    3 => return Ok(out),
                    _ => out.push(msg.to_vec()),
                }
                at += (len + 3) & !3;
            }
        }
    }
}

/// The family id in a GETFAMILY answer.
fn family_id(bytes: &[u8]) -> Option<u16> {
    let m = NetlinkMessage::<GenlMessage<GenlCtrl>>::deserialize(bytes).ok()?;
    let NetlinkPayload::InnerMessage(g) = m.payload else {
        return None;
    };
    g.payload.nlas.iter().find_map(|a| match a {
        GenlCtrlAttrs::FamilyId(id) => Some(*id),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wg_peer(n: u8, psk: Option<Key>, keepalive: Option<u16>) -> WgPeer {
        WgPeer {
            subnet: format!("10.244.{n}.0/24").parse().expect("subnet"),
            public_key: [n; 32],
            endpoint: format!("192.168.1.{n}:51820").parse().expect("endpoint"),
            allowed_ip: format!("10.244.{n}.0/24").parse().ok(),
            allowed_ip6: None,
            psk,
            keepalive,
        }
    }

    /// Encodes `msg` as the kernel receives it and reads it back.
    fn round_trip(msg: WireguardMessage, family: u16) -> (NetlinkHeader, WireguardMessage) {
        let bytes = encode(msg, family, 7);
        let m =
            NetlinkMessage::<GenlMessage<WireguardMessage>>::deserialize(&bytes).expect("parses");
        assert_eq!(m.header.length as usize, bytes.len());
        assert_eq!(m.header.message_type, family, "sent to the family's id");
        assert_eq!(m.header.sequence_number, 7);
        let NetlinkPayload::InnerMessage(g) = m.payload else {
            panic!("a generic netlink message")
        };
        (m.header, g.payload)
    }

    #[test]
    fn the_device_gets_its_private_key_and_port() {
        let private = PrivateKey::for_tests([9; 32]);
        let (h, m) = round_trip(set_device("flannel-wg", &private, 51820), 0x1c);
        assert_eq!(h.flags, NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(m.cmd, WireguardCmd::SetDevice);
        assert_eq!(
            m.attributes,
            [
                WireguardAttribute::IfName("flannel-wg".into()),
                WireguardAttribute::PrivateKey([9; 32]),
                WireguardAttribute::ListenPort(51820),
            ]
        );
    }

    #[test]
    fn a_peer_is_set_whole_endpoint_allowed_ips_psk_and_keepalive() {
        let p = wg_peer(3, Some([5; 32]), Some(25));
        let (_, m) = round_trip(set_peers("flannel-wg", vec![peer(&p)]).remove(0), 0x1c);
        let [WireguardAttribute::IfName(name), WireguardAttribute::Peers(peers)] =
            &m.attributes[..]
        else {
            panic!("{m:?}")
        };
        assert_eq!(name, "flannel-wg");
        assert_eq!(
            peers[0].0,
            [
                WireguardPeerAttribute::PublicKey([3; 32]),
                WireguardPeerAttribute::Flags(WireguardPeerFlags::ReplaceAllowedIps),
                WireguardPeerAttribute::Endpoint("192.168.1.3:51820".parse().expect("addr")),
                WireguardPeerAttribute::PresharedKey([5; 32]),
                WireguardPeerAttribute::PersistentKeepalive(25),
                WireguardPeerAttribute::AllowedIps(vec![WireguardAllowedIp(vec![
                    WireguardAllowedIpAttr::Family(WireguardAddressFamily::Ipv4),
                    WireguardAllowedIpAttr::IpAddr("10.244.3.0".parse().expect("ip")),
                    WireguardAllowedIpAttr::Cidr(24),
                ])]),
            ]
        );
    }

    #[test]
    fn a_peer_carrying_both_families_has_an_ipv6_endpoint_and_two_allowed_ips() {
        let p = WgPeer {
            endpoint: "[fd00:192:168:1::3]:51820".parse().expect("endpoint"),
            allowed_ip6: "fd00:10:244:3::/64".parse().ok(),
            ..wg_peer(3, None, None)
        };
        let attrs = peer(&p).0;
        assert!(attrs.contains(&WireguardPeerAttribute::Endpoint(p.endpoint)));
        let ip = |family, ip: &str, cidr| {
            WireguardAllowedIp(vec![
                WireguardAllowedIpAttr::Family(family),
                WireguardAllowedIpAttr::IpAddr(ip.parse().expect("ip")),
                WireguardAllowedIpAttr::Cidr(cidr),
            ])
        };
        assert!(
            attrs.contains(&WireguardPeerAttribute::AllowedIps(vec![
                ip(WireguardAddressFamily::Ipv4, "10.244.3.0", 24),
                ip(WireguardAddressFamily::Ipv6, "fd00:10:244:3::", 64),
            ])),
            "{attrs:?}"
        );
        // flannel-wg-v6's peer: IPv6 alone.
        let only6 = WgPeer {
            allowed_ip: None,
            ..p
        };
        assert!(peer(&only6)
            .0
            .contains(&WireguardPeerAttribute::AllowedIps(vec![ip(
                WireguardAddressFamily::Ipv6,
                "fd00:10:244:3::",
                64
            )])));
    }

    #[test]
    fn without_psk_or_keepalive_they_are_cleared() {
        let attrs = peer(&wg_peer(4, None, None)).0;
        assert!(attrs.contains(&WireguardPeerAttribute::PresharedKey([0; 32])));
        assert!(attrs.contains(&WireguardPeerAttribute::PersistentKeepalive(0)));
    }

    #[test]
    fn a_removed_peer_is_named_by_key_with_remove_me() {
        let (_, m) = round_trip(
            set_peers("flannel-wg", vec![removal(&[8; 32])]).remove(0),
            0x1c,
        );
        assert_eq!(
            m.attributes[1],
            WireguardAttribute::Peers(vec![WireguardPeer(vec![
                WireguardPeerAttribute::PublicKey([8; 32]),
                WireguardPeerAttribute::Flags(WireguardPeerFlags::RemoveMe),
            ])])
        );
    }

    #[test]
    fn many_peers_are_split_into_bounded_messages_keeping_every_one_in_order() {
        let peers: Vec<WireguardPeer> = (0..=255u8)
            .cycle()
            .take(2000)
            .map(|n| peer(&wg_peer(n, None, Some(25))))
            .collect();
        let msgs = set_peers("flannel-wg", peers.clone());
        assert!(msgs.len() > 1, "2000 peers do not fit one message");
        let mut back = Vec::new();
        for m in msgs {
            let bytes = encode(m.clone(), 0x1c, 1);
            assert!(
                bytes.len() <= MESSAGE_BUDGET + 1024,
                "{} bytes",
                bytes.len()
            );
            let (_, m) = round_trip(m, 0x1c);
            for a in m.attributes {
                if let WireguardAttribute::Peers(p) = a {
                    back.extend(p);
                }
            }
        }
        assert_eq!(back, peers);
    }

    #[test]
    fn a_dump_request_and_the_keys_of_its_answer() {
        let (h, m) = round_trip(get_device("flannel-wg"), 0x1c);
        assert_eq!(h.flags, NLM_F_REQUEST | NLM_F_DUMP);
        assert_eq!(m.cmd, WireguardCmd::GetDevice);
        let answer = WireguardMessage {
            cmd: WireguardCmd::GetDevice,
            attributes: vec![
                WireguardAttribute::ListenPort(51820),
                WireguardAttribute::Peers(vec![removal(&[1; 32]), peer(&wg_peer(2, None, None))]),
            ],
        };
        assert_eq!(peer_keys(std::slice::from_ref(&answer)), [[1; 32], [2; 32]]);
        // As the kernel fills them in: peer 2 with its endpoint and a handshake.
        let mut shown = answer;
        if let WireguardAttribute::Peers(p) = &mut shown.attributes[1] {
            p[1].0.push(WireguardPeerAttribute::LastHandshake(
                netlink_packet_wireguard::WireguardTimeSpec {
                    seconds: 1_700_000_000,
                    nano_seconds: 5,
                },
            ));
        }
        let endpoint = "192.168.1.2:51820".parse().ok();
        assert_eq!(
            peer_states(&[shown]),
            [([1; 32], None, 0), ([2; 32], endpoint, 1_700_000_000)]
        );
    }

    #[test]
    fn the_family_is_asked_for_by_name() {
        let bytes = family_request(1);
        let m = NetlinkMessage::<GenlMessage<GenlCtrl>>::deserialize(&bytes).expect("parses");
        assert_eq!(m.header.message_type, 0x10, "GENL_ID_CTRL");
        let NetlinkPayload::InnerMessage(g) = m.payload else {
            panic!("generic")
        };
        assert_eq!(g.payload.cmd, GenlCtrlCmd::GetFamily);
        assert_eq!(
            g.payload.nlas,
            [GenlCtrlAttrs::FamilyName("wireguard".into())]
        );
    }

    /// Against the running kernel, changing nothing: the family resolves where the module is
    /// loaded, and where it is not (this kernel) the answer says what is missing.
    #[test]
    fn resolving_the_family_answers_either_way() {
        match Genl::open() {
            Ok(g) => assert!(g.family >= 0x10, "a dynamic generic netlink id"),
            Err(e) => {
                let text = e.to_string();
                assert!(text.contains("wireguard netlink family"), "{text}");
                assert!(text.contains("No such file"), "ENOENT: {text}");
            }
        }
    }
}
