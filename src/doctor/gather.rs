//! Reading what doctor judges, once, changing nothing: subnet.env, daemon.json, the store,
//! netlink, ethtool, iptables-save.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result};
use regex::Regex;
use tokio::process::Command;
use weft_backends::{ethtool, InterfaceSelector};

use super::facts::{device_name, Cluster, Etcd, Facts, Iptables, Ttl};
use super::{kernel, DoctorArgs};
use crate::config::NetworkConfig;
use crate::flags::EtcdArgs;
use crate::registry::Registry;
use crate::status;

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
        if let Etcd::Read(c) = &mut facts.etcd {
            c.own_ttl = Some(ttl);
        }
    }
    Ok(facts)
}

async fn read_etcd(args: &EtcdArgs) -> (Etcd, Option<Registry>) {
    let failed = |e: anyhow::Error| Etcd::Failed {
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
