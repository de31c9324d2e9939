//! What doctor knows about the host: plain data, read once by `gather` (nothing is changed),
//! and written by hand in the checks' unit tests.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use weft_backends::mac::Mac;
use weft_backends::ExternalInterface;

use crate::config::NetworkConfig;
use crate::lease::{Lease, Record};
use crate::registry::kube::inspect::OwnNode;
use crate::registry::Names;
use crate::status::{DaemonJsonView, EnvView};

/// Everything the checks judge.
#[derive(Debug, Clone)]
pub struct Facts {
    pub subnet_file: String,
    /// subnet.env, or why it cannot be used.
    pub env: Result<EnvView, String>,
    pub store: Store,
    /// Kubernetes mode (`-kube-subnet-mgr`): this host's Node. `None`: etcd mode.
    pub kube: Option<KubeNode>,
    /// The kernel's network state, or why it could not be read.
    pub kernel: Result<Kernel, String>,
    /// The underlay, chosen as weftd chooses it, or why none could be.
    pub external: Result<ExternalInterface, String>,
    /// `-public-ip` as given to doctor (kube mode: else the Node's `node-public-ip`, as weftd).
    pub public_ip_flag: Option<Ipv4Addr>,
    pub daemon_json_path: String,
    pub daemon_json: DaemonJsonView,
    /// `iptables-save` of the filter and nat tables, or why it failed.
    pub iptables: Result<Iptables, String>,
    /// `ip6tables-save`'s, read on a dual-stack network only (weftd writes flannel's chains in
    /// ip6tables for its IPv6 network).
    pub ip6tables: Option<Result<Iptables, String>>,
    /// `uname -r`.
    pub kernel_release: String,
    /// weftd's --subnet-lease-ttl and -subnet-lease-renew-margin.
    pub lease_ttl: Duration,
    pub renew_margin_minutes: u64,
}

/// What the lease store (etcd, or the Kubernetes API) said.
#[derive(Debug, Clone)]
pub enum Store {
    /// Nothing could be read: the error with its causes.
    Failed {
        /// etcd's endpoints, or which Kubernetes API.
        endpoints: String,
        error: String,
    },
    Read(Box<Cluster>),
}

/// Kubernetes mode: this host's Node.
#[derive(Debug, Clone)]
pub struct KubeNode {
    /// Its name (empty when not known: the store failed, and says why).
    pub name: String,
    /// The Node as flannel sees it, or why it could not be read.
    pub own: Result<OwnNode, String>,
    /// The annotation prefix (`flannel.alpha.coreos.com`).
    pub prefix: String,
    /// `--set-node-network-unavailable` as doctor was given it (weftd's own cannot be known).
    pub set_network_unavailable: bool,
}

impl KubeNode {
    /// The lease its annotations publish, when they publish a readable one.
    pub fn lease(&self) -> Option<&Lease> {
        self.own.as_ref().ok()?.lease.as_ref()?.as_ref().ok()
    }
}

impl Facts {
    /// The lease store, for messages: `etcd` or `the Kubernetes API`.
    pub fn store_name(&self) -> &'static str {
        match self.kube {
            Some(_) => "the Kubernetes API",
            None => "etcd",
        }
    }
}

/// The network config and every lease.
#[derive(Debug, Clone)]
pub struct Cluster {
    pub config_key: String,
    /// `Err`: absent or invalid, worded as weftd logs it.
    pub config: Result<NetworkConfig, String>,
    /// How the store names records.
    pub names: Names,
    pub records: Vec<Record>,
    /// How long this host's lease has left; `None` when there is no lease of this host's to
    /// ask about.
    pub own_ttl: Option<Result<Ttl, String>>,
}

impl Cluster {
    /// The readable leases.
    pub fn leases(&self) -> impl Iterator<Item = &Lease> + '_ {
        self.records.iter().filter_map(|r| r.value.as_ref().ok())
    }

    /// The key of a lease of `subnet`: the stored lease's, if there is one, else the IPv4-only
    /// key.
    pub fn lease_key(&self, subnet: Ipv4Net) -> String {
        let ipv6 = (self.leases())
            .find(|l| l.subnet == subnet)
            .and_then(|l| l.ipv6_subnet);
        self.names.lease(subnet, ipv6)
    }
}

/// The kernel's network state in this namespace.
#[derive(Debug, Clone, Default)]
pub struct Kernel {
    pub links: Vec<Link>,
    /// The main table's routes, IPv4 and IPv6.
    pub routes: Vec<Route>,
    /// Permanent neighbours, IPv4 and IPv6.
    pub neighbours: Vec<Neighbour>,
    /// Permanent FDB entries with a remote (`dst`) of either family.
    pub fdb: Vec<Fdb>,
    /// Every IPv4 address of this host.
    pub local_addrs: HashSet<Ipv4Addr>,
    /// The flannel vxlan device's `tx-checksum-ip-generic`, when the backend is vxlan and the
    /// device exists.
    pub tx_checksum: Option<Result<bool, String>>,
    /// The underlay's driver (`ethtool -i`), when it has one.
    pub underlay_driver: Option<String>,
    /// When the backend is wireguard, the peers of each of its devices that exists as a
    /// WireGuard device (weft's userspace TUN, or the kernel's): flannel-wg, and flannel-wg-v6
    /// in separate mode on a dual-stack network.
    pub wireguard: Vec<WgDevice>,
    /// `net.ipv4.ip_forward` and `net.ipv6.conf.all.forwarding` (`None`: unreadable, or no
    /// IPv6 in this kernel).
    pub ipv4_forwarding: Option<bool>,
    pub ipv6_forwarding: Option<bool>,
}

/// One WireGuard device's peers as `wg show` reads them, or why they could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WgDevice {
    pub name: String,
    pub peers: Result<Vec<WgPeer>, String>,
}

/// A peer of a WireGuard device as its control socket (or generic netlink) reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WgPeer {
    /// Its public key in hex, as the control socket writes it.
    pub public_key_hex: String,
    pub endpoint: String,
    /// When its last handshake completed, in seconds since the epoch; 0: never.
    pub last_handshake: u64,
}

impl Kernel {
    pub fn link(&self, name: &str) -> Option<&Link> {
        self.links.iter().find(|l| l.name == name)
    }

    pub fn link_by_index(&self, index: u32) -> Option<&Link> {
        self.links.iter().find(|l| l.index == index)
    }

    /// A device's name, or `#<index>` when it is unknown.
    pub fn name_of(&self, index: Option<u32>) -> String {
        match index {
            Some(i) => self
                .link_by_index(i)
                .map_or_else(|| format!("#{i}"), |l| l.name.clone()),
            None => "-".into(),
        }
    }

    /// The interfaces enslaved to `master`.
    pub fn ports(&self, master: u32) -> impl Iterator<Item = &Link> + '_ {
        self.links.iter().filter(move |l| l.master == Some(master))
    }

    /// The networks directly reachable through `oif` (its scope-link routes), as host-gw and
    /// DirectRouting judge them.
    pub fn connected(&self, oif: u32) -> Vec<Ipv4Net> {
        self.routes
            .iter()
            .filter(|r| r.oif == Some(oif) && r.scope_link && r.gateway.is_none())
            .filter_map(|r| match r.dst {
                IpNet::V4(d) if d.prefix_len() > 0 => Some(d),
                _ => None,
            })
            .collect()
    }

    /// The IPv6 networks directly reachable through `oif`: its global addresses' prefix routes
    /// (IPv6 routes have no link scope; the kernel's protocol tells them).
    pub fn connected6(&self, oif: u32) -> Vec<Ipv6Net> {
        let link_local: Ipv6Net = "fe80::/10".parse().unwrap_or_default();
        self.routes
            .iter()
            .filter(|r| r.oif == Some(oif) && r.protocol == 2 && r.gateway.is_none())
            .filter_map(|r| match r.dst {
                IpNet::V6(d) if d.prefix_len() > 0 && !link_local.contains(&d.network()) => Some(d),
                _ => None,
            })
            .collect()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub name: String,
    pub index: u32,
    pub mtu: u32,
    pub up: bool,
    /// `bridge`, `veth`, `vxlan`, `tun`, …; empty for a physical NIC.
    pub kind: String,
    /// The bridge it is a port of.
    pub master: Option<u32>,
    pub addrs: Vec<Ipv4Net>,
    /// Its hardware address, if it has one (vxlan's is its VTEP MAC).
    pub mac: Option<Mac>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub dst: IpNet,
    pub gateway: Option<IpAddr>,
    pub oif: Option<u32>,
    pub onlink: bool,
    /// `rtm_protocol`: 2 kernel, 3 boot (flanneld, `ip route add`), 87 weft.
    pub protocol: u8,
    pub scope_link: bool,
    /// Plain unicast (not blackhole, unreachable, …).
    pub unicast: bool,
    pub metric: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Neighbour {
    pub ifindex: u32,
    pub ip: IpAddr,
    pub mac: Mac,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fdb {
    pub ifindex: u32,
    pub mac: Mac,
    pub dst: IpAddr,
}

/// `iptables-save -t filter` and `-t nat`.
#[derive(Debug, Clone, Default)]
pub struct Iptables {
    pub filter: String,
    pub nat: String,
}

/// The cluster network: the config's, else subnet.env's FLANNEL_NETWORK (the store unreachable).
pub fn network(f: &Facts) -> Option<Ipv4Net> {
    match &f.store {
        Store::Read(c) if c.config.is_ok() => c.config.as_ref().ok().map(|c| c.network),
        _ => f.env.as_ref().ok().and_then(|e| e.network.parse().ok()),
    }
}

/// The IPv6 side of a dual-stack cluster network: the config's, else subnet.env's
/// FLANNEL_IPV6_NETWORK (the store unreachable).
pub fn network6(f: &Facts) -> Option<Ipv6Net> {
    match &f.store {
        Store::Read(c) if c.config.is_ok() => c.config.as_ref().ok()?.ipv6.map(|p| p.network),
        _ => f.env.as_ref().ok()?.ipv6.as_ref()?.0.parse().ok(),
    }
}

/// The backend's device name (`flannel.<VNI>`, `flannel0`), if it has one.
pub fn device_name(config: &NetworkConfig) -> Option<String> {
    let kind = weft_backends::kind(&config.backend.type_name())?;
    (kind.device)(&config.backend)
}

/// The backend's own IPv6 device on a dual-stack network (vxlan's `flannel-v6.<VNI>`,
/// wireguard's `flannel-wg-v6` in separate mode), if it has one.
pub fn device6_name(config: &NetworkConfig) -> Option<String> {
    config.ipv6?;
    let kind = weft_backends::kind(&config.backend.type_name())?;
    (kind.device6)(&config.backend)
}

/// A boolean backend option (validated with the config).
pub fn backend_flag(config: &NetworkConfig, key: &str) -> Option<bool> {
    config.backend.get(key).and_then(serde_json::Value::as_bool)
}

/// How much time weftd leaves before expiry when it renews, by [`crate::lease::renew_interval`].
pub fn renew_margin(ttl: Duration, margin_minutes: u64) -> Duration {
    ttl.saturating_sub(crate::lease::renew_interval(ttl, margin_minutes))
}

/// How long this host's lease has left, as etcd says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ttl {
    /// A reservation: no etcd lease, never expires.
    Reservation,
    Left(i64),
    /// etcd no longer knows the etcd lease: the key goes any moment.
    Expired,
}
