//! weft's data planes. A backend is told "this is my lease, these are my peers" and makes the kernel
//! agree; it knows nothing of etcd. Backends reconcile declaratively: `reconcile` is given the whole
//! desired peer set each time, so a restart, a missed event and a stale leftover are the same case.
//! Between such full passes (which dump the kernel's tables), `apply` is given only what changed
//! and sends one request per object concerned, working from the backend's own record of what it
//! put in place: a change costs the same with 10 peers or 10,000.
//!
//! Two kinds of data plane: vxlan and host-gw program the kernel, which forwards; udp (and
//! wireguard where the kernel has no WireGuard) forwards in userspace, with worker threads that
//! own a TUN device and sockets. Both kinds report through
//! `event` (drift of owned kernel state, or a data plane that cannot go on), stop through
//! `shutdown`, and say what they leave in the kernel for the next weftd (`survives_restart`).
//!
//! Layout: `vxlan/`, `host_gw`, `udp/` and `wireguard/` are the data planes; `offload/` is what
//! the userspace ones share (TUN device, UDP socket, batches, coalescer, counters); `routes`
//! (owned routes, shared by all), `neigh` (vxlan neighbours and FDB), `batch` (many netlink requests per datagram) and
//! `watch` (drift events) are what they are built from; `firewall` holds flannel's
//! masquerade/forward rules, applied by the agent.

mod alloc;
#[macro_use]
mod backends;
pub mod batch;
mod conn;
mod error;
pub mod firewall;
mod host_gw;
pub mod iface;
mod lease;
pub mod mac;
mod neigh;
mod netlink;
pub mod nexthop;
pub mod offload;
mod peer;
mod plane;
mod routes;
#[cfg(test)]
mod testing;
pub mod udp;
mod vxlan;
mod watch;
mod wireguard;
// The wireguard data plane's lookups, for the fuzz target in backends/fuzz; not an API.
#[doc(hidden)]
pub use wireguard::fuzz_lookups as wireguard_fuzz_lookups;
// The userspace WireGuard data plane, for the netns tests; not an API.
/// The userspace WireGuard's control socket (`wg show`), which `weftctl doctor` reads too.
pub use wireguard::uapi as wireguard_uapi;
#[doc(hidden)]
pub use wireguard::userspace_for_tests as wireguard_userspace;

use std::net::Ipv4Addr;

use ipnet::{Ipv4Net, Ipv6Net};
use serde_json::Value;

pub use error::{Error, ErrorList};
pub use iface::{ExternalInterface, InterfaceSelector};
pub use lease::{BackendData, Lease, LeaseV6};
pub use neigh::permanent_entry as permanent_neighbour;
pub use plane::{DataPlane, Desired, Host, Identity, IdentityKind, Kind, Stats, StatsSource};
pub use routes::owner::RTPROT_WEFT;
pub use routes::{route_table, RouteSpec};
// The route reconciler itself, for the netns tests (backends/tests/netns); not an API.
#[doc(hidden)]
pub use routes::{Owner, RouteTable};
pub use vxlan::ethtool;

/// A backend option that cannot be used, and why.
pub(crate) fn invalid_option(option: &str, reason: &str) -> Error {
    Error::InvalidOption {
        option: option.to_string(),
        reason: reason.to_string(),
    }
}

/// The backend options of the network config (`Backend` object), keys matched case-insensitively as
/// flannel's Go decoder does.
#[derive(Debug, Clone, Default)]
pub struct BackendConfig(serde_json::Map<String, Value>);

impl BackendConfig {
    pub fn new(map: serde_json::Map<String, Value>) -> Self {
        Self(map)
    }

    /// The options as written in the config.
    pub fn as_map(&self) -> &serde_json::Map<String, Value> {
        &self.0
    }

    /// The value of `key`, whatever its case in the config.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.0
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v)
    }

    /// `key` as an integer from 0 to `max`, if given (`null` counts as not given).
    pub fn uint(&self, key: &str, max: u64) -> Result<Option<u64>, Error> {
        match self.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_u64().filter(|n| *n <= max).map(Some).ok_or_else(|| {
                invalid_option(key, &format!("want an integer from 0 to {max}, got {v}"))
            }),
        }
    }

    /// `Type`, defaulting to `udp` like flannel when absent.
    pub fn type_name(&self) -> String {
        self.get("Type")
            .and_then(Value::as_str)
            .unwrap_or("udp")
            .to_ascii_lowercase()
    }
}

/// What every backend needs to know about the cluster network and this host, fixed for its life.
#[derive(Debug, Clone)]
pub struct Network {
    /// The whole cluster network (`Network` in the config).
    pub network: Ipv4Net,
    /// The cluster's IPv6 network on a dual-stack network (`IPv6Network`).
    pub network_v6: Option<Ipv6Net>,
    /// The underlay interface chosen by -iface/-iface-regex/default route.
    pub external: ExternalInterface,
}

/// What a running backend reports to the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Watched kernel state may have drifted (a device, address or route removed behind weftd's
    /// back): reconcile now.
    Drift,
    /// The data plane cannot go on (a udp worker died, with why): log it, report unhealthy, and
    /// build the backend again.
    Failed(String),
}

/// The kernel entries a backend's last reconcile put or kept in place, for metrics: what it
/// wanted, which is exactly what the kernel holds when that reconcile succeeded (a failed one
/// reports its errors, and these numbers count what it aimed for).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Programmed {
    pub routes: usize,
    /// vxlan's permanent neighbours (peer network address → VTEP MAC).
    pub neighbours: usize,
    /// vxlan's FDB entries (VTEP MAC → peer PublicIP).
    pub fdb: usize,
}

/// How the desired peer set changed, for [`Backend::apply`]. Peers are keyed by subnet: the agent
/// accepts one peer per subnet.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PeerChanges {
    /// New peers, and peers whose lease changed (the new lease).
    pub upsert: Vec<Lease>,
    /// The subnets of peers that left.
    pub remove: Vec<Ipv4Net>,
}

impl PeerChanges {
    pub fn is_empty(&self) -> bool {
        self.upsert.is_empty() && self.remove.is_empty()
    }

    pub fn len(&self) -> usize {
        self.upsert.len() + self.remove.len()
    }
}

backends! {
    // flannel's default first: the order of the known types in messages and metrics.
    Udp(udp::Udp),
    Vxlan(vxlan::Vxlan),
    HostGw(host_gw::HostGw),
    Alloc(alloc::Alloc),
    Wireguard(wireguard::Wireguard),
}

impl Backend {
    /// Builds the backend the config names. Fails on an unknown type or invalid options.
    pub fn new(config: &BackendConfig, net: Network) -> Result<Self, Error> {
        Self::build(&config.type_name(), config, net)
    }

    /// Takes down what this backend set up, for when the network config changed and another
    /// network or backend takes over: its routes to peers, then its own device (`flannel.<VNI>`,
    /// `flannel0`) with the address, route, neighbours and FDB entries on it; udp's workers are
    /// stopped first. The firewall rules and the lease are the agent's to remove.
    pub async fn remove(mut self) -> Result<(), ErrorList> {
        let mut errs = self
            .reconcile(&[] as &[Lease])
            .await
            .err()
            .unwrap_or_default();
        let devices = self.device_names();
        self.shutdown().await;
        for name in devices {
            if let Err(e) = netlink::delete_link(&name).await {
                errs.push(e);
            }
        }
        errs.into_result()
    }

    /// Steps down for `next`, a backend of the same type and options on the same IPv4 network
    /// whose IPv6 side differs (IPv6 turned on, off, or onto another network): what both want
    /// stays in the kernel for `next` to adopt, as across a restart, so IPv4 traffic never
    /// stops; what only this one has goes: its devices `next` has none of (`flannel-v6.<VNI>`,
    /// `flannel-wg-v6`) and, when its IPv6 network goes, weft's routes inside it that lead
    /// elsewhere (host-gw's and DirectRouting's via the underlay; a deleted device takes its
    /// own).
    pub async fn hand_over(self, next: &Backend, old_network6: Option<Ipv6Net>) -> ErrorList {
        let mut errs = ErrorList::default();
        let keep = next.device_names();
        let gone: Vec<String> = (self.device_names().into_iter())
            .filter(|d| !keep.contains(d))
            .collect();
        self.shutdown().await;
        for name in gone {
            if let Err(e) = netlink::delete_link(&name).await {
                errs.push(e);
            }
        }
        if let Some(network6) = old_network6 {
            let (handle, batch) = match (netlink::connect(), batch::Batch::open()) {
                (Ok(h), Ok(b)) => (h, b),
                (Err(e), _) | (_, Err(e)) => {
                    errs.push(e);
                    return errs;
                }
            };
            // Owner of IPv6's routes alone: the IPv4 broadcast address is no route's network.
            let owner = routes::Owner {
                network: Ipv4Net::from(Ipv4Addr::BROADCAST),
                network_v6: Some(network6),
                device: None,
            };
            errs.0.extend(
                routes::reconcile_owned(&handle, &batch, &owner, &[])
                    .await
                    .0,
            );
        }
        errs
    }
}

/// The backend type named `name` (as in a config's `Type` or a lease's `BackendType`).
pub fn kind(name: &str) -> Option<&'static Kind> {
    KINDS.iter().find(|k| k.name == name)
}

/// The largest underlay MTU Linux gives an interface (loopback's): the bound used when the host's
/// underlay is unknown, so that only what no host could accept is refused.
const LARGEST_UNDERLAY_MTU: u32 = 65536;

/// Checks the backend options exactly as [`Backend::new`] does, without building anything.
///
/// `underlay_mtu` is this host's underlay MTU (weftd); `None` (weftctl, which knows no host)
/// checks only what holds on every host, so an option that depends on the underlay (udp's `MTU`)
/// is judged against the largest one possible.
pub fn validate(config: &BackendConfig, underlay_mtu: Option<u32>) -> Result<(), Error> {
    let name = config.type_name();
    let kind = kind(&name).ok_or_else(|| Error::unknown_backend(&name))?;
    (kind.check)(config, underlay_mtu.unwrap_or(LARGEST_UNDERLAY_MTU))
}

/// The lease's first host address: the address of the bridge (docker0, cni0) and FLANNEL_SUBNET.
pub fn gateway_address(subnet: Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(subnet.network()).saturating_add(1))
}

#[cfg(test)]
mod tests {
    /// The agent drives the backend from spawned tasks.
    #[test]
    fn backend_is_send() {
        fn send<T: Send>() {}
        send::<super::Backend>();
    }

    fn options(v: serde_json::Value) -> super::BackendConfig {
        match v {
            serde_json::Value::Object(m) => super::BackendConfig::new(m),
            _ => super::BackendConfig::default(),
        }
    }

    /// weftd waits on a config `validate` refuses instead of building the backend; a config it
    /// passes that `new` then refuses would rebuild in a loop. So the two must agree.
    #[test]
    fn validate_refuses_exactly_what_new_refuses_on_that_host() {
        let net = super::Network {
            network: "10.5.0.0/16".parse().expect("net"),
            network_v6: None,
            external: super::ExternalInterface {
                name: "eth0".into(),
                index: 2,
                iface_addr: "192.168.1.2".parse().expect("addr"),
                public_ip: "192.168.1.2".parse().expect("addr"),
                mtu: 1500,
                iface_addr6: None,
                public_ipv6: None,
            },
        };
        let cases = [
            serde_json::json!({}),
            serde_json::json!({"Type": "udp", "MTU": 1472}),
            serde_json::json!({"Type": "udp", "MTU": 1473}),
            serde_json::json!({"Type": "udp", "Port": 70000}),
            serde_json::json!({"Type": "vxlan", "VNI": 99999999}),
            serde_json::json!({"Type": "vxlan", "VNI": 4096, "DirectRouting": true}),
            serde_json::json!({"type": "VXLAN", "vni": "1"}),
            serde_json::json!({"Type": "host-gw"}),
            serde_json::json!({"Type": "alloc"}),
            serde_json::json!({"Type": "wireguard"}),
            serde_json::json!({"Type": "wireguard", "Mode": "auto"}),
            serde_json::json!({"Type": "wireguard", "PSK": "short"}),
            serde_json::json!({"Type": "warp-drive"}),
        ];
        for c in cases {
            let opts = options(c.clone());
            let built = super::Backend::new(&opts, net.clone()).map(drop);
            let checked = super::validate(&opts, Some(1500));
            assert_eq!(
                built.map_err(|e| e.to_string()),
                checked.map_err(|e| e.to_string()),
                "{c}"
            );
        }
    }

    /// weftctl knows no host: it refuses what no host could accept, and leaves what depends on
    /// the host's underlay to weftd.
    #[test]
    fn without_an_underlay_only_what_fails_everywhere_is_refused() {
        let ok = |v: serde_json::Value| super::validate(&options(v), None).is_ok();
        assert!(ok(serde_json::json!({"Type": "udp", "MTU": 8972})));
        assert!(!ok(serde_json::json!({"Type": "udp", "MTU": 67})));
        assert!(!ok(serde_json::json!({"Type": "udp", "MTU": 70000})));
        assert!(!ok(serde_json::json!({"Type": "vxlan", "VNI": 99999999})));
        let e = super::validate(&options(serde_json::json!({"Type": "geneve"})), None)
            .expect_err("unknown type");
        assert!(
            e.to_string().contains("unknown backend type \"geneve\""),
            "{e}"
        );
    }

    /// One list names the backends: the error text, the kinds, the enum all follow it.
    #[test]
    fn the_backends_are_listed_once_flannels_default_first() {
        let names: Vec<&str> = super::KINDS.iter().map(|k| k.name).collect();
        assert_eq!(names, ["udp", "vxlan", "host-gw", "alloc", "wireguard"]);
        let e = super::validate(&options(serde_json::json!({"Type": "geneve"})), None)
            .expect_err("unknown type");
        assert!(
            e.to_string()
                .ends_with("(known: udp, vxlan, host-gw, alloc, wireguard)"),
            "{e}"
        );
        let vxlan = super::kind("vxlan").expect("vxlan");
        assert_eq!(vxlan.device_kinds, ["vxlan"]);
        assert_eq!(vxlan.mtu_overhead, 50);
        let flannel_1 = options(serde_json::json!({"Type": "vxlan"}));
        assert_eq!((vxlan.device)(&flannel_1).as_deref(), Some("flannel.1"));
        let udp = super::kind("udp").expect("udp");
        assert_eq!((udp.device)(&flannel_1).as_deref(), Some("flannel0"));
        assert_eq!(super::kind("alloc").and_then(|k| k.identity_kind), None);
    }

    /// vxlan's identity is the VTEP MAC: written as flannel writes it, and refused as the peer
    /// set refuses it (missing, not unicast).
    #[test]
    fn a_vxlan_peers_identity_is_its_vtep_mac() {
        let vxlan = super::kind("vxlan").expect("vxlan");
        let data = serde_json::json!({"VNI": 1, "VtepMAC": "02:00:00:00:00:09"});
        let id = (vxlan.identity)(Some(&data))
            .expect("a MAC")
            .expect("vxlan has one");
        assert_eq!(id.to_string(), "VtepMAC 02:00:00:00:00:09");
        let same = (vxlan.identity)(Some(&data)).expect("a MAC");
        assert_eq!(Some(id), same);
        let none = (vxlan.identity)(Some(&serde_json::json!({"VNI": 1})));
        assert_eq!(none.expect_err("no MAC"), "BackendData has no VtepMAC");
        let multicast = serde_json::json!({"VtepMAC": "01:00:5e:00:00:01"});
        assert!((vxlan.identity)(Some(&multicast)).is_err());
        let udp = super::kind("udp").expect("udp");
        assert_eq!((udp.identity)(None), Ok(None), "udp peers have no identity");
    }
}
