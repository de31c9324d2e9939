//! Reading what doctor judges, once, changing nothing: subnet.env, daemon.json, the store (etcd,
//! or the Kubernetes API's Nodes and the net-conf.json file), netlink, ethtool, iptables-save
//! (and ip6tables-save on a dual-stack network), WireGuard's devices.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result};
use regex::Regex;
use tokio::process::Command;
use weft_backends::{ethtool, InterfaceSelector};

use super::facts::{
    device6_name, device_name, network6, Cluster, Facts, Iptables, KubeNode, Store, Ttl, WgDevice,
    WgPeer,
};
use super::{kernel, DoctorArgs};
use crate::config::NetworkConfig;
use crate::flags::EtcdArgs;
use crate::registry::kube::inspect;
use crate::registry::Registry;
use crate::status::{self, Kube};

/// Reads everything. Only a bad flag fails; whatever cannot be read becomes part of the facts.
pub async fn gather(store_args: status::Store<'_>, args: &DoctorArgs) -> Result<Facts> {
    let regexes = args
        .iface_regex
        .iter()
        .map(|r| Regex::new(r).with_context(|| format!("-iface-regex {r:?}")))
        .collect::<Result<Vec<_>>>()?;
    let (read, store, kube) = match store_args {
        status::Store::Etcd(etcd) => {
            let (read, store) = read_etcd(etcd).await;
            (read, store, None)
        }
        status::Store::Kube(k) => {
            let (read, node) = read_kube(&k).await;
            (read, None, Some(node))
        }
    };
    // In kube mode weftd takes its Node's `<prefix>/node-public-ip` and `node-public-ipv6` as
    // -public-ip and -public-ipv6 (as flanneld).
    let own_node = (kube.as_ref()).and_then(|k| k.own.as_ref().ok());
    let public_ip = args.public_ip.or(own_node.and_then(|o| o.node_public_ip()));
    let public_ipv6 = own_node.and_then(|o| o.node_public_ipv6());
    let selector = InterfaceSelector {
        ifaces: args.iface.clone(),
        regexes,
        can_reach: args.iface_can_reach,
        public_ip,
        public_ipv6,
    };
    let env = status::read_env(&args.subnet_file);
    let external = selector.select().await.map_err(|e| e.to_string());
    let mut kernel = kernel::read().await.map_err(|e| format!("{e:#}"));
    let vxlan_device = match &read {
        Store::Read(c) => c
            .config
            .as_ref()
            .ok()
            .filter(|c| c.backend.type_name() == "vxlan")
            .and_then(device_name),
        Store::Failed { .. } => None,
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
    let wireguard = match &read {
        Store::Read(c) => (c.config.as_ref().ok()).filter(|c| c.backend.type_name() == "wireguard"),
        Store::Failed { .. } => None,
    };
    if let (Ok(k), Some(config)) = (&mut kernel, wireguard) {
        // flannel-wg, and flannel-wg-v6 beside it in separate mode on a dual-stack network.
        let devices = device_name(config).into_iter().chain(device6_name(config));
        for name in devices {
            // As `wg show` reads them: weft's userspace WireGuard (a TUN device) from its
            // control socket, the kernel's over generic netlink.
            let peers = match k.link(&name).map(|l| l.kind.as_str()) {
                Some("tun") => read_wireguard(&name).await,
                Some("wireguard") => read_kernel_wireguard(&name).await,
                _ => continue,
            };
            k.wireguard.push(WgDevice { name, peers });
        }
    }
    if let (Ok(k), Ok(ext)) = (&mut kernel, &external) {
        // Loopback and virtual devices without a driver answer EOPNOTSUPP: no driver to judge.
        k.underlay_driver = ethtool::driver(&ext.name).ok();
    }
    let mut facts = Facts {
        subnet_file: args.subnet_file.display().to_string(),
        env,
        store: read,
        kube,
        kernel,
        external,
        public_ip_flag: public_ip,
        daemon_json_path: args.docker_daemon_json.clone(),
        daemon_json: status::read_daemon_json(&args.docker_daemon_json),
        iptables: read_iptables(IPTABLES).await,
        ip6tables: None,
        kernel_release: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
        lease_ttl: args.subnet_lease_ttl,
        renew_margin_minutes: args.subnet_lease_renew_margin,
    };
    // weftd writes flannel's chains in ip6tables only for a dual-stack network's IPv6 side.
    if network6(&facts).is_some() {
        facts.ip6tables = Some(read_iptables(IP6TABLES).await);
    }
    // The lease's time left: one more call, for this host's lease only (etcd's: a podCIDR has
    // no expiry).
    if let (Some(store), Some(own)) = (store, super::lease::held(&facts).cloned()) {
        let ttl = if own.is_reservation() {
            Ok(Ttl::Reservation)
        } else {
            match store.time_left(&own).await {
                Ok(Some(s)) => Ok(Ttl::Left(s)),
                Ok(None) => Ok(Ttl::Expired),
                Err(e) => Err(format!("{e:#}")),
            }
        };
        if let Store::Read(c) = &mut facts.store {
            c.own_ttl = Some(ttl);
        }
    }
    Ok(facts)
}

/// A userspace WireGuard device's peers from weftd's control socket for it
/// (`WIREGUARD_SOCKET_DIR`, as weftd's).
async fn read_wireguard(device: &str) -> Result<Vec<WgPeer>, String> {
    use weft_backends::wireguard_uapi as uapi;
    let path = uapi::socket_path(device);
    let shown = path.display().to_string();
    let text = tokio::task::spawn_blocking(move || uapi::query(&path, Duration::from_secs(2)))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("{shown}: {e}"))?;
    let peers = uapi::parse_get(&text).map_err(|e| format!("{shown}: {e}"))?;
    Ok(peers.into_iter().map(wg_peer).collect())
}

/// A kernel WireGuard device's peers, over generic netlink.
async fn read_kernel_wireguard(device: &str) -> Result<Vec<WgPeer>, String> {
    let device = device.to_string();
    let read =
        tokio::task::spawn_blocking(move || weft_backends::wireguard_uapi::kernel_peers(&device));
    let peers = tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .map_err(|_| "no answer over netlink in 5 s".to_string())?
        .map_err(|e| e.to_string())??;
    Ok(peers.into_iter().map(wg_peer).collect())
}

fn wg_peer((public_key_hex, endpoint, last_handshake): (String, String, u64)) -> WgPeer {
    WgPeer {
        public_key_hex,
        endpoint,
        last_handshake,
    }
}

async fn read_etcd(args: &EtcdArgs) -> (Store, Option<Registry>) {
    let failed = |e: anyhow::Error| Store::Failed {
        endpoints: args.etcd_endpoints.join(","),
        error: format!("{e:#}"),
    };
    let store = match Registry::connect(args).await {
        Ok(s) => s,
        Err(e) => return (failed(e), None),
    };
    let key = store.names().config();
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
        names: store.names().clone(),
        records: listing.records,
        own_ttl: None,
    };
    (Store::Read(Box::new(cluster)), Some(store))
}

/// Kubernetes mode: the network config file, this host's Node and every Node's lease. Reading
/// only: a get and a list of Nodes.
async fn read_kube(k: &Kube<'_>) -> (Store, KubeNode) {
    let mut node = KubeNode {
        name: Kube::node_hint(),
        own: Err("not read".into()),
        prefix: (k.args.kube_annotation_prefix.trim_end_matches('/')).to_string(),
        set_network_unavailable: k.args.set_node_network_unavailable,
    };
    let failed = |e: anyhow::Error| Store::Failed {
        endpoints: inspect::server_of(k.args),
        error: format!("{e:#}"),
    };
    let store = match k.connect().await {
        Ok(s) => s,
        Err(e) => {
            node.own = Err(format!("{e:#}"));
            return (failed(e), node);
        }
    };
    node.name = store.node().to_string();
    node.own = store.own_node().await.map_err(|e| format!("{e:#}"));
    let list = match store.list_nodes().await {
        Ok(l) => l,
        Err(e) => return (failed(e), node),
    };
    let cluster = Cluster {
        config_key: k.config_path(),
        config: k.config(),
        names: store.names().clone(),
        records: list.records,
        own_ttl: None,
    };
    (Store::Read(Box::new(cluster)), node)
}

/// How long `iptables-save` may take (it may wait for the xtables lock).
const IPTABLES_TIMEOUT: Duration = Duration::from_secs(30);

const IPTABLES: &str = "iptables-save";
const IP6TABLES: &str = "ip6tables-save";

/// One family's filter and nat tables, by `save` (`iptables-save`, `ip6tables-save`).
async fn read_iptables(save: &str) -> Result<Iptables, String> {
    Ok(Iptables {
        filter: iptables_save(save, "filter").await?,
        nat: iptables_save(save, "nat").await?,
    })
}

async fn iptables_save(save: &str, table: &str) -> Result<String, String> {
    let what = format!("{save} -t {table}");
    let run = Command::new(save)
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
