//! What wireguard wants, judged from the config, this host's lease and the peers' alone (pure):
//! the device `flannel-wg` with the lease's network address /32 on it, one route for the whole
//! network through it, and one WireGuard peer per remote lease; on a dual-stack network the
//! same for IPv6, on `flannel-wg-v6` (separate mode) or on `flannel-wg` itself (a one-device
//! mode). The kernel path, the userspace data plane and `weftctl doctor` all work from it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::config::{Mode, WgConfig};
pub use super::config::{DEVICE, DEVICE_V6};
use super::data;
use super::key::{self, Key};
use crate::routes::RouteSpec;
use crate::{peer, DataPlane, Error, Lease, Network, PeerChanges};

/// The devices' places in [`Slots`]: `flannel-wg`, and `flannel-wg-v6` (separate mode with IPv6).
pub const WG: usize = 0;
pub const WG6: usize = 1;

/// One value per device slot ([`WG`], [`WG6`]).
pub type Slots<T> = [T; 2];

/// One WireGuard peer as a device must hold it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WgPeer {
    /// The lease it stands for.
    pub subnet: Ipv4Net,
    pub public_key: Key,
    /// Where it is dialled: its PublicIP (or PublicIPv6) and Port (ours when it publishes none).
    pub endpoint: SocketAddr,
    /// Its IPv4 subnet, when this device carries IPv4: what it may send from and what goes to it.
    pub allowed_ip: Option<Ipv4Net>,
    /// Its IPv6 subnet, when this device carries IPv6 and the peer has one.
    pub allowed_ip6: Option<Ipv6Net>,
    pub psk: Option<Key>,
    pub keepalive: Option<u16>,
}

impl WgPeer {
    /// Its AllowedIPs, IPv4 first.
    pub fn allowed_ips(&self) -> impl Iterator<Item = IpNet> + '_ {
        (self.allowed_ip.map(IpNet::V4).into_iter()).chain(self.allowed_ip6.map(IpNet::V6))
    }
}

/// Everything the backend wants for a lease and its peers.
#[derive(Debug, Default)]
pub struct Want {
    /// The lease's network address, /32, on `flannel-wg` (as flannel's `Configure(lease.Subnet.IP)`).
    #[allow(dead_code)] // the data paths configure it from the lease
    pub address: Option<Ipv4Net>,
    /// The whole network into `flannel-wg`, and the IPv6 network into the device carrying IPv6.
    /// flannel adds them with scope link.
    pub routes: Vec<RouteSpec>,
    /// Each device's peers.
    pub peers: Slots<Vec<WgPeer>>,
    /// Peers it programs nothing for, and why.
    pub refused: Vec<(Ipv4Net, Error)>,
}

/// What this host publishes as its own key, read back from its lease: no peer may hold it.
pub fn own_key(own: &Lease) -> Option<Key> {
    let v = own.backend_data.as_ref()?.value()?;
    data::read(Some(&v)).ok().map(|d| d.public_key)
}

/// Whether an address is private in flannel's sense (`ip.IsPrivate`: RFC 1918, and fc00::/7).
fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => a.is_private(),
        IpAddr::V6(a) => (a.segments()[0] & 0xfe00) == 0xfc00,
    }
}

/// Auto mode's choice, flannel's rule: the peer's PublicIP unless it is private and both the
/// peer's and this host's IPv6 addresses are public.
fn auto_picks_ipv6(net: &Network, ip4: Ipv4Addr, ip6: Ipv6Addr) -> bool {
    let ours6 = net.external.public_ipv6.or(net.external.iface_addr6);
    if !is_private(IpAddr::V4(ip4)) {
        return false;
    }
    !is_private(IpAddr::V6(ip6)) && ours6.is_some_and(|o| !is_private(IpAddr::V6(o)))
}

/// The WireGuard peers `p` makes under `cfg`, one per device slot, or why it makes none.
/// `own_key` is this host's public key, when known. A peer without an IPv6 side (or without
/// BackendV6Data) is an IPv4 peer; a bad IPv6 side refuses it whole, as vxlan does.
pub fn judge(
    cfg: &WgConfig,
    net: &Network,
    own: Option<&Lease>,
    own_key: Option<&Key>,
    p: &Lease,
) -> Result<Slots<Option<WgPeer>>, Error> {
    peer::check(net, own, p)?;
    let bad = |reason: String| Error::BadPeer {
        subnet: p.subnet.to_string(),
        reason,
    };
    let read = |d: Option<&crate::BackendData>, what: &str| {
        let value = match d {
            Some(d) => Some(
                d.value()
                    .ok_or_else(|| bad(format!("{what} is not JSON")))?,
            ),
            None => None,
        };
        let d = data::read(value.as_ref())
            .map_err(|why| bad(why.replacen("BackendData", what, 1)))?;
        if own_key == Some(&d.public_key) {
            return Err(bad(format!(
                "PublicKey {} is this host's",
                key::show(&d.public_key)
            )));
        }
        Ok(d)
    };
    let d4 = read(p.backend_data.as_ref(), "BackendData")?;
    let v4 = WgPeer {
        subnet: p.subnet,
        public_key: d4.public_key,
        endpoint: SocketAddr::new(p.public_ip.into(), d4.port_or(cfg.listen_port)),
        allowed_ip: Some(p.subnet),
        allowed_ip6: None,
        psk: cfg.psk,
        keepalive: cfg.keepalive,
    };
    let six = match peer::check_v6(net, own, p)? {
        Some(side) => match p.ipv6.as_ref().and_then(|v6| v6.backend_data.as_ref()) {
            Some(d) => Some((side, read(Some(d), "BackendV6Data")?)),
            None => {
                tracing::debug!(subnet = %p.subnet, "no BackendV6Data: reached over IPv4 only");
                None
            }
        },
        None => None,
    };
    let Some(((subnet6, ip6), d6)) = six else {
        return Ok([Some(v4), None]);
    };
    if cfg.mode == Mode::Separate {
        let v6 = WgPeer {
            public_key: d6.public_key,
            endpoint: SocketAddr::new(ip6.into(), d6.port_or(cfg.listen_port_v6)),
            allowed_ip: None,
            allowed_ip6: Some(subnet6),
            ..v4.clone()
        };
        return Ok([Some(v4), Some(v6)]);
    }
    // One device carries both: one key for both families.
    if d6.public_key != d4.public_key {
        return Err(bad(format!(
            "BackendV6Data PublicKey {} is not BackendData's {} (one device, one key)",
            key::show(&d6.public_key),
            key::show(&d4.public_key)
        )));
    }
    let over6 = match cfg.mode {
        Mode::Ipv6 => true,
        Mode::Auto => auto_picks_ipv6(net, p.public_ip, ip6),
        Mode::Ipv4 | Mode::Separate => false,
    };
    // The peer's one device listens on its ListenPort, BackendData's Port, whichever family
    // reaches it (flannel dials BackendV6Data's Port, which flanneld sets to ListenPortV6).
    let endpoint = if over6 {
        SocketAddr::new(ip6.into(), v4.endpoint.port())
    } else {
        v4.endpoint
    };
    Ok([
        Some(WgPeer {
            endpoint,
            allowed_ip6: Some(subnet6),
            ..v4
        }),
        None,
    ])
}

/// The routes of the whole networks: IPv4's into `flannel-wg` (`index[WG]`), IPv6's into the
/// device carrying it, when the devices exist.
pub fn routes(cfg: &WgConfig, net: &Network, index: Slots<Option<u32>>) -> Vec<RouteSpec> {
    let mut routes: Vec<RouteSpec> = index[WG]
        .map(|i| RouteSpec::link(net.network, i, DEVICE))
        .into_iter()
        .collect();
    if let Some(network6) = net.network_v6 {
        let (slot, name) = match cfg.mode {
            Mode::Separate => (WG6, DEVICE_V6),
            Mode::Auto | Mode::Ipv4 | Mode::Ipv6 => (WG, DEVICE),
        };
        if let Some(i) = index[slot] {
            routes.push(RouteSpec::link(network6, i, name));
        }
    }
    routes
}

/// Everything wireguard wants for `peers` on this host (lease `own`; `index` its devices', when
/// they exist). Peers of other backend types are ignored; of two peers with one subnet or one
/// public key (on one device) the first is kept (the agent's peer set hands them over oldest
/// first, and never two at once).
pub fn want(
    cfg: &WgConfig,
    net: &Network,
    own: &Lease,
    index: Slots<Option<u32>>,
    peers: &[Lease],
) -> Want {
    let own_key = own_key(own);
    let mut w = Want {
        address: Ipv4Net::new(own.subnet.network(), 32).ok(),
        routes: routes(cfg, net, index),
        ..Want::default()
    };
    let mut subnets = HashSet::new();
    let mut keys: Slots<HashMap<Key, Ipv4Net>> = Default::default();
    for p in peers
        .iter()
        .filter(|p| peer::same_type(p, super::Wireguard::TYPE))
    {
        let judged = judge(cfg, net, Some(own), own_key.as_ref(), p).and_then(|wp| {
            if !subnets.insert(p.subnet) {
                return Err(another_has_the_subnet(p.subnet));
            }
            take_keys(&mut keys, &wp)?;
            Ok(wp)
        });
        match judged {
            Ok(wp) => {
                for (slot, peer) in wp.into_iter().enumerate() {
                    w.peers[slot].extend(peer);
                }
            }
            Err(e) => w.refused.push((p.subnet, e)),
        }
    }
    w
}

fn another_has_the_subnet(subnet: Ipv4Net) -> Error {
    Error::BadPeer {
        subnet: subnet.to_string(),
        reason: "another peer has this subnet".into(),
    }
}

/// Records the keys of a lease's peers, one per device; refuses a key another lease holds on
/// the same device (then none is recorded).
fn take_keys(keys: &mut Slots<HashMap<Key, Ipv4Net>>, wp: &Slots<Option<WgPeer>>) -> Result<(), Error> {
    for (held, peer) in keys.iter().zip(wp) {
        if let Some(peer) = peer {
            if let Some(holder) = held.get(&peer.public_key) {
                return Err(Error::BadPeer {
                    subnet: peer.subnet.to_string(),
                    reason: format!("PublicKey {} is peer {holder}'s", key::show(&peer.public_key)),
                });
            }
        }
    }
    for (held, peer) in keys.iter_mut().zip(wp) {
        if let Some(peer) = peer {
            held.insert(peer.public_key, peer.subnet);
        }
    }
    Ok(())
}

/// What a change of the peer set does to one device: peers to remove (by key) and peers to
/// set, in that order.
#[derive(Debug, Default)]
pub struct Steps {
    pub remove: Vec<Key>,
    pub set: Vec<WgPeer>,
}

/// Applies `changes` to `peers` (each device's WireGuard peer of each lease, as set): every
/// changed or removed lease leaves first, so a key passing from one lease to another within the
/// batch is free whatever their order; then each upsert is judged. A key no lease holds any more
/// is removed; a key still held is only set again (its sessions kept, its AllowedIPs replaced).
/// Returns each device's steps and the peers refused.
pub fn changes(
    cfg: &WgConfig,
    net: &Network,
    own: &Lease,
    peers: &mut Slots<BTreeMap<Ipv4Net, WgPeer>>,
    changes: &PeerChanges,
) -> (Slots<Steps>, Vec<Error>) {
    let own_key = own_key(own);
    let mut left: Slots<Vec<Key>> = Default::default();
    for subnet in changes
        .remove
        .iter()
        .chain(changes.upsert.iter().map(|p| &p.subnet))
    {
        for (table, left) in peers.iter_mut().zip(&mut left) {
            if let Some(old) = table.remove(subnet) {
                left.push(old.public_key);
            }
        }
    }
    let mut keys: Slots<HashMap<Key, Ipv4Net>> =
        peers.each_ref().map(|t| t.values().map(|p| (p.public_key, p.subnet)).collect());
    let mut steps: Slots<Steps> = Default::default();
    let mut refused = Vec::new();
    for p in changes
        .upsert
        .iter()
        .filter(|p| peer::same_type(p, super::Wireguard::TYPE))
    {
        let judged = judge(cfg, net, Some(own), own_key.as_ref(), p).and_then(|wp| {
            if peers[WG].contains_key(&p.subnet) {
                return Err(another_has_the_subnet(p.subnet));
            }
            take_keys(&mut keys, &wp)?;
            Ok(wp)
        });
        match judged {
            Ok(wp) => {
                for (slot, peer) in wp.into_iter().enumerate() {
                    if let Some(peer) = peer {
                        peers[slot].insert(peer.subnet, peer.clone());
                        steps[slot].set.push(peer);
                    }
                }
            }
            Err(e) => refused.push(e),
        }
    }
    for ((steps, left), keys) in steps.iter_mut().zip(left).zip(&keys) {
        let mut gone: Vec<Key> = left.into_iter().filter(|k| !keys.contains_key(k)).collect();
        gone.sort_unstable();
        gone.dedup();
        steps.remove = gone;
    }
    (steps, refused)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BackendConfig, BackendData, ExternalInterface};
    use proptest::prelude::*;
    use serde_json::json;

    const K1: &str = "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=";
    const K2: &str = "3p7bfXt9wbTTW2HC7OQ1Nz+DQ8hbeGdNrfx+FG+IK08=";
    const OWN: &str = "GJ1t8pV1dPq0i8p9tF2P0BqX4V7q5x9jH0f8dG1s2aY=";
    const OTHER: &str = "AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA=";

    fn net() -> Network {
        Network {
            network: "10.244.0.0/16".parse().expect("net"),
            network_v6: None,
            external: ExternalInterface {
                name: "eth0".into(),
                index: 2,
                iface_addr: "192.168.1.2".parse().expect("addr"),
                public_ip: "192.168.1.2".parse().expect("addr"),
                mtu: 1500,
                iface_addr6: None,
                public_ipv6: None,
            },
        }
    }

    fn lease(subnet: &str, ip: &str, data: Option<serde_json::Value>) -> Lease {
        Lease {
            subnet: subnet.parse().expect("subnet"),
            public_ip: ip.parse().expect("ip"),
            backend_type: "wireguard".into(),
            backend_data: data.map(BackendData::from),
            ipv6: None,
        }
    }

    fn cfg(v: serde_json::Value) -> WgConfig {
        let serde_json::Value::Object(m) = v else {
            panic!("an object")
        };
        WgConfig::parse(&BackendConfig::new(m), 1500).expect("valid")
    }

    fn own() -> Lease {
        lease(
            "10.244.1.0/24",
            "192.168.1.2",
            Some(json!({"PublicKey": OWN, "Port": 51820})),
        )
    }

    #[test]
    fn device_address_route_and_one_peer_per_lease() {
        let c = cfg(json!({"PSK": OWN, "PersistentKeepaliveInterval": 25, "ListenPort": 51999}));
        let peers = [
            lease(
                "10.244.2.0/24",
                "192.168.1.3",
                Some(json!({"PublicKey": K1, "Port": 51820})),
            ),
            // flannel before v0.26.6: no Port.
            lease(
                "10.244.3.0/24",
                "192.168.1.4",
                Some(json!({"PublicKey": K2})),
            ),
        ];
        let w = want(&c, &net(), &own(), Some(7), &peers);
        assert_eq!(w.address, Some("10.244.1.0/32".parse().expect("addr")));
        let r = w.route.expect("route");
        assert_eq!(r.to_string(), "10.244.0.0/16 dev flannel-wg scope link");
        assert_eq!(r.oif, 7);
        assert!(w.refused.is_empty(), "{:?}", w.refused);
        let psk = key::parse(OWN).ok();
        assert_eq!(
            w.peers,
            [
                WgPeer {
                    subnet: "10.244.2.0/24".parse().expect("subnet"),
                    public_key: key::parse(K1).expect("key"),
                    endpoint: "192.168.1.3:51820".parse().expect("endpoint"),
                    allowed_ip: "10.244.2.0/24".parse().expect("subnet"),
                    psk,
                    keepalive: Some(25),
                },
                WgPeer {
                    subnet: "10.244.3.0/24".parse().expect("subnet"),
                    public_key: key::parse(K2).expect("key"),
                    endpoint: "192.168.1.4:51999".parse().expect("endpoint"),
                    allowed_ip: "10.244.3.0/24".parse().expect("subnet"),
                    psk,
                    keepalive: Some(25),
                },
            ]
        );
        let plain = want(&cfg(json!({})), &net(), &own(), None, &peers[..1]);
        assert_eq!((plain.peers[0].psk, plain.peers[0].keepalive), (None, None));
        assert!(plain.route.is_none(), "no device, no route");
    }

    #[test]
    fn bad_peers_are_refused_one_by_one_with_their_reason() {
        let mut other = lease("10.244.9.0/24", "192.168.1.9", None);
        other.backend_type = "vxlan".into();
        let peers = [
            lease("10.244.2.0/24", "192.168.1.3", None),
            lease(
                "10.244.3.0/24",
                "192.168.1.4",
                Some(json!({"PublicKey": "x"})),
            ),
            lease(
                "10.244.4.0/24",
                "192.168.1.5",
                Some(json!({"PublicKey": OWN})),
            ),
            lease(
                "10.244.5.0/24",
                "192.168.1.6",
                Some(json!({"PublicKey": K1})),
            ),
            lease(
                "10.244.6.0/24",
                "192.168.1.7",
                Some(json!({"PublicKey": K1})),
            ),
            lease(
                "10.244.5.0/24",
                "192.168.1.8",
                Some(json!({"PublicKey": K2})),
            ),
            lease(
                "10.245.0.0/24",
                "192.168.1.8",
                Some(json!({"PublicKey": K2})),
            ),
            other,
        ];
        let w = want(&cfg(json!({})), &net(), &own(), Some(7), &peers);
        assert_eq!(w.peers.len(), 1);
        assert_eq!(w.peers[0].subnet.to_string(), "10.244.5.0/24");
        let reasons: Vec<String> = w.refused.iter().map(|(_, e)| e.to_string()).collect();
        assert_eq!(reasons.len(), 6, "{reasons:#?}");
        for (r, want) in reasons.iter().zip([
            "peer 10.244.2.0/24: no BackendData",
            "peer 10.244.3.0/24: BackendData PublicKey \"x\"",
            "peer 10.244.4.0/24: PublicKey GJ1t8pV1dPq0i8p9tF2P0BqX4V7q5x9jH0f8dG1s2aY= is this host's",
            "peer 10.244.6.0/24: PublicKey hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo= is peer 10.244.5.0/24's",
            "peer 10.244.5.0/24: another peer has this subnet",
            "peer 10.245.0.0/24: not inside the cluster network",
        ]) {
            assert!(r.starts_with(want), "{r} does not start with {want}");
        }
    }

    #[test]
    fn changes_remove_only_keys_no_lease_holds_and_let_a_key_move_within_a_batch() {
        let c = cfg(json!({}));
        let l = |subnet: &str, ip: &str, k: &str| {
            lease(subnet, ip, Some(json!({"PublicKey": k, "Port": 51820})))
        };
        let a = l("10.244.2.0/24", "192.168.1.3", K1);
        let b = l("10.244.3.0/24", "192.168.1.4", K2);
        let mut peers = BTreeMap::new();
        let all = PeerChanges {
            upsert: vec![a.clone(), b.clone()],
            remove: vec![],
        };
        let s = changes(&c, &net(), &own(), &mut peers, &all);
        assert_eq!((s.remove.len(), s.set.len(), s.refused.len()), (0, 2, 0));
        let k1 = key::parse(K1).expect("key");
        let k2 = key::parse(K2).expect("key");

        // b takes a's key and a gets a new one, b listed first: no refusal, nothing removed
        // (both keys are still held), both set again.
        let swapped = PeerChanges {
            upsert: vec![
                l("10.244.3.0/24", "192.168.1.4", K1),
                l("10.244.2.0/24", "192.168.1.3", OTHER),
            ],
            remove: vec![],
        };
        let s = changes(&c, &net(), &own(), &mut peers, &swapped);
        assert!(s.refused.is_empty(), "{:?}", s.refused);
        assert_eq!(s.remove, [k2], "K2 is no lease's any more");
        assert_eq!(s.set.len(), 2);
        assert_eq!(peers[&b.subnet].public_key, k1);

        // A lease leaving: its key goes.
        let gone = PeerChanges {
            upsert: vec![],
            remove: vec![b.subnet],
        };
        let s = changes(&c, &net(), &own(), &mut peers, &gone);
        assert_eq!((s.remove, s.set.len()), (vec![k1], 0));
        assert_eq!(peers.len(), 1);

        // A key another lease holds is refused, and the device keeps the holder.
        let taken = PeerChanges {
            upsert: vec![l("10.244.4.0/24", "192.168.1.5", OTHER)],
            remove: vec![],
        };
        let s = changes(&c, &net(), &own(), &mut peers, &taken);
        assert!(s.set.is_empty() && s.remove.is_empty());
        assert!(
            s.refused[0].to_string().contains("is peer 10.244.2.0/24's"),
            "{:?}",
            s.refused
        );

        // An upsert that is no longer a wireguard lease: its peer goes.
        let mut other = a.clone();
        other.backend_type = "vxlan".into();
        let s = changes(
            &c,
            &net(),
            &own(),
            &mut peers,
            &PeerChanges {
                upsert: vec![other],
                remove: vec![],
            },
        );
        assert_eq!(s.remove, [key::parse(OTHER).expect("key")]);
        assert!(peers.is_empty());
    }

    proptest! {
        /// Whatever the peers publish: every wireguard lease is either one peer or refused,
        /// and no two peers share a subnet or a key.
        #[test]
        fn every_lease_is_a_peer_or_refused(
            leases in prop::collection::vec(
                (0u8..8, 3u8..12, prop::option::of(0u8..4), prop::option::of(0u32..70_000)),
                0..12,
            ),
        ) {
            let keys = [K1, K2, OWN, "bad"];
            let peers: Vec<Lease> = leases.iter().map(|(s, ip, k, port)| {
                let mut d = serde_json::Map::new();
                if let Some(k) = k {
                    d.insert("PublicKey".into(), json!(keys[usize::from(*k)]));
                }
                if let Some(p) = port {
                    d.insert("Port".into(), json!(p));
                }
                lease(&format!("10.244.{s}.0/24"), &format!("192.168.1.{ip}"),
                      Some(serde_json::Value::Object(d)))
            }).collect();
            let w = want(&cfg(json!({})), &net(), &own(), Some(7), &peers);
            prop_assert_eq!(w.peers.len() + w.refused.len(), peers.len());
            let subnets: HashSet<_> = w.peers.iter().map(|p| p.subnet).collect();
            let keys: HashSet<_> = w.peers.iter().map(|p| p.public_key).collect();
            prop_assert_eq!(subnets.len(), w.peers.len());
            prop_assert_eq!(keys.len(), w.peers.len());
            for p in &w.peers {
                prop_assert!(p.endpoint.port() != 0);
                prop_assert_eq!(p.allowed_ip, p.subnet);
            }
        }
    }
}
