//! What doctor knows about the host: plain data, read once by [`gather`] (nothing is changed),
//! and written by hand in the checks' unit tests.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result};
use ipnet::Ipv4Net;
use regex::Regex;
use tokio::process::Command;
use weft_backends::mac::Mac;
use weft_backends::{ethtool, ExternalInterface, InterfaceSelector};

use super::kernel;
use super::lease::Ttl;
use super::DoctorArgs;
use crate::config::NetworkConfig;
use crate::flags::EtcdArgs;
use crate::lease::{subnet_key, Lease, Record};
use crate::status::{self, DaemonJsonView, EnvView};
use crate::store::Store;

/// Everything the checks judge.
#[derive(Debug, Clone)]
pub struct Facts {
    pub subnet_file: String,
    /// subnet.env, or why it cannot be used.
    pub env: Result<EnvView, String>,
    pub etcd: Etcd,
    /// The kernel's network state, or why it could not be read.
    pub kernel: Result<Kernel, String>,
    /// The underlay, chosen as weftd chooses it, or why none could be.
    pub external: Result<ExternalInterface, String>,
    /// `-public-ip` as given to doctor.
    pub public_ip_flag: Option<Ipv4Addr>,
    pub daemon_json_path: String,
    pub daemon_json: DaemonJsonView,
    /// `iptables-save` of the filter and nat tables, or why it failed.
    pub iptables: Result<Iptables, String>,
    /// `uname -r`.
    pub kernel_release: String,
    /// weftd's --subnet-lease-ttl and -subnet-lease-renew-margin.
    pub lease_ttl: Duration,
    pub renew_margin_minutes: u64,
}

/// What etcd said.
#[derive(Debug, Clone)]
pub enum Etcd {
    /// Nothing could be read: the error with its causes.
    Failed {
        endpoints: String,
        error: String,
    },
    Read(Box<Cluster>),
}

/// The network config and every lease.
#[derive(Debug, Clone)]
pub struct Cluster {
    pub config_key: String,
    /// `Err`: absent or invalid, worded as weftd logs it.
    pub config: Result<NetworkConfig, String>,
    /// `<prefix>/subnets/`.
    pub subnets_prefix: String,
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

    pub fn lease_key(&self, subnet: Ipv4Net) -> String {
        format!("{}{}", self.subnets_prefix, subnet_key(subnet))
    }
}

/// The kernel's network state in this namespace.
#[derive(Debug, Clone, Default)]
pub struct Kernel {
    pub links: Vec<Link>,
    /// The main table's IPv4 routes.
    pub routes: Vec<Route>,
    /// Permanent IPv4 neighbours.
    pub neighbours: Vec<Neighbour>,
    /// Permanent FDB entries with a remote (`dst`).
    pub fdb: Vec<Fdb>,
    /// Every IPv4 address of this host.
    pub local_addrs: HashSet<Ipv4Addr>,
    /// The flannel vxlan device's `tx-checksum-ip-generic`, when the backend is vxlan and the
    /// device exists.
    pub tx_checksum: Option<Result<bool, String>>,
    /// The underlay's driver (`ethtool -i`), when it has one.
    pub underlay_driver: Option<String>,
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
            .filter(|r| r.dst.prefix_len() > 0)
            .map(|r| r.dst)
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
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub dst: Ipv4Net,
    pub gateway: Option<Ipv4Addr>,
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
    pub ip: Ipv4Addr,
    pub mac: Mac,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fdb {
    pub ifindex: u32,
    pub mac: Mac,
    pub dst: Ipv4Addr,
}

/// `iptables-save -t filter` and `-t nat`.
#[derive(Debug, Clone, Default)]
pub struct Iptables {
    pub filter: String,
    pub nat: String,
}

/// The cluster network: the config's, else subnet.env's FLANNEL_NETWORK (etcd unreachable).
pub fn network(f: &Facts) -> Option<Ipv4Net> {
    match &f.etcd {
        Etcd::Read(c) if c.config.is_ok() => c.config.as_ref().ok().map(|c| c.network),
        _ => f.env.as_ref().ok().and_then(|e| e.network.parse().ok()),
    }
}

/// The backend's device name (`flannel.<VNI>`, `flannel0`), if it has one.
pub fn device_name(config: &NetworkConfig) -> Option<String> {
    match config.backend.type_name().as_str() {
        "vxlan" => Some(format!("flannel.{}", vxlan_vni(config))),
        "udp" => Some("flannel0".into()),
        _ => None,
    }
}

/// The config's VNI (validated with the config: weftd would have refused anything else).
pub fn vxlan_vni(config: &NetworkConfig) -> u64 {
    config
        .backend
        .get("VNI")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(1)
}

/// A boolean backend option (validated with the config).
pub fn backend_flag(config: &NetworkConfig, key: &str) -> Option<bool> {
    config.backend.get(key).and_then(serde_json::Value::as_bool)
}

/// How much time weftd leaves before expiry when it renews, by [`crate::agent::renew_interval`].
pub fn renew_margin(ttl: Duration, margin_minutes: u64) -> Duration {
    ttl.saturating_sub(crate::agent::renew_interval(ttl, margin_minutes))
}

/// Reads everything. Only a bad flag fails; whatever cannot be read becomes part of the facts.
pub async fn gather(etcd_args: &EtcdArgs, args: &DoctorArgs) -> Result<Facts> {
    let regexes = args
        .iface_regex
        .iter()
        .map(|r| Regex::new(r).with_context(|| format!("-iface-regex {r:?}")))
        .collect::<Result<Vec<_>>>()?;
    let selector = InterfaceSelector {
        ifaces: args.iface.clone(),
        regexes,
        can_reach: args.iface_can_reach,
        public_ip: args.public_ip,
    };
    let env = status::read_env(&args.subnet_file);
    let external = selector.select().await.map_err(|e| e.to_string());
    let mut kernel = kernel::read().await.map_err(|e| format!("{e:#}"));
    let (etcd, store) = read_etcd(etcd_args).await;
    let vxlan_device = match &etcd {
        Etcd::Read(c) => c
            .config
            .as_ref()
            .ok()
            .filter(|c| c.backend.type_name() == "vxlan")
            .and_then(device_name),
        Etcd::Failed { .. } => None,
    };
    if let (Ok(k), Some(dev)) = (&mut kernel, vxlan_device) {
        if k.link(&dev).is_some() {
            k.tx_checksum = Some(
                ethtool::feature(&dev, ethtool::TX_CHECKSUM_IP_GENERIC)
                    .map_err(|e| e.to_string())
                    .and_then(|f| f.ok_or_else(|| format!("{dev} has no such feature"))),
            );
        }
    }
    if let (Ok(k), Ok(ext)) = (&mut kernel, &external) {
        // Loopback and virtual devices without a driver answer EOPNOTSUPP: no driver to judge.
        k.underlay_driver = ethtool::driver(&ext.name).ok();
    }
    let mut facts = Facts {
        subnet_file: args.subnet_file.display().to_string(),
        env,
        etcd,
        kernel,
        external,
        public_ip_flag: args.public_ip,
        daemon_json_path: args.docker_daemon_json.clone(),
        daemon_json: status::read_daemon_json(&args.docker_daemon_json),
        iptables: read_iptables().await,
        kernel_release: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
        lease_ttl: args.subnet_lease_ttl,
        renew_margin_minutes: args.subnet_lease_renew_margin,
    };
    // The lease's time left: one more call, for this host's lease only.
    if let (Some(store), Some(own)) = (store, super::lease::held(&facts).map(|l| l.etcd_lease)) {
        let ttl = if own == 0 {
            Ok(Ttl::Reservation)
        } else {
            match store.time_to_live(own).await {
                Ok(Some(s)) => Ok(Ttl::Left(s)),
                Ok(None) => Ok(Ttl::Expired),
                Err(e) => Err(format!("{e:#}")),
            }
        };
        if let Etcd::Read(c) = &mut facts.etcd {
            c.own_ttl = Some(ttl);
        }
    }
    Ok(facts)
}

async fn read_etcd(args: &EtcdArgs) -> (Etcd, Option<Store>) {
    let failed = |e: anyhow::Error| Etcd::Failed {
        endpoints: args.etcd_endpoints.join(","),
        error: format!("{e:#}"),
    };
    let store = match Store::connect(args).await {
        Ok(s) => s,
        Err(e) => return (failed(e), None),
    };
    let key = store.config_key();
    let config = match store.get_config().await {
        Ok((Some(text), _)) => NetworkConfig::parse_at(&text, &key).map_err(|e| e.to_string()),
        Ok((None, _)) => Err(format!("no network config at {key}")),
        Err(e) => return (failed(e), None),
    };
    let listing = match store.list().await {
        Ok(l) => l,
        Err(e) => return (failed(e), None),
    };
    let cluster = Cluster {
        config_key: key,
        config,
        subnets_prefix: store.subnets_prefix(),
        records: listing.records,
        own_ttl: None,
    };
    (Etcd::Read(Box::new(cluster)), Some(store))
}

/// How long `iptables-save` may take (it may wait for the xtables lock).
const IPTABLES_TIMEOUT: Duration = Duration::from_secs(30);

async fn read_iptables() -> Result<Iptables, String> {
    Ok(Iptables {
        filter: iptables_save("filter").await?,
        nat: iptables_save("nat").await?,
    })
}

async fn iptables_save(table: &str) -> Result<String, String> {
    let what = format!("iptables-save -t {table}");
    let run = Command::new("iptables-save")
        .args(["-t", table])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(IPTABLES_TIMEOUT, run)
        .await
        .map_err(|_| format!("{what}: no answer within {IPTABLES_TIMEOUT:?}"))?
        .map_err(|e| format!("{what}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{what}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
