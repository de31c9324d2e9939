//! `vxlan`: flannel's default data plane. One `flannel.<VNI>` device; per peer a permanent
//! neighbour (peer network address → peer VTEP MAC), an FDB entry (VTEP MAC → peer public IP) and
//! a route `peer-subnet via peer-network-address dev flannel.<VNI> onlink`. With DirectRouting,
//! peers on a directly connected network get a plain host-gw route instead.
//!
//! Unlike flanneld, the VTEP MAC survives restarts (flannel #1795): an existing good device keeps
//! its MAC, else the previous lease's `VtepMAC` is reused, else one is derived from the public IP
//! and VNI.

mod config;
mod device;
pub mod ethtool;

use std::collections::HashSet;

use serde_json::{json, Value};
use tracing::debug;

pub use config::VxlanConfig;

use crate::mac::Mac;
use crate::neigh::{self, Entry, Table};
use crate::netlink::{self, Conn};
use crate::routes::{self, Owner, RouteSpec};
use crate::watch::Owned;
use crate::{peer, BackendConfig, Error, ErrorList, Lease, Network, OwnedCounts};

pub const TYPE: &str = "vxlan";

pub struct Vxlan {
    net: Network,
    cfg: VxlanConfig,
    name: String,
    mac: Option<Mac>,
    own: Option<Lease>,
    /// The device's index as of the last ensure, for recognising drift events.
    index: Option<u32>,
    conn: Conn,
    owned: OwnedCounts,
}

impl Vxlan {
    pub fn new(config: &BackendConfig, net: Network) -> Result<Self, Error> {
        let cfg = VxlanConfig::parse(config)?;
        Ok(Self {
            name: cfg.device_name(),
            net,
            cfg,
            mac: None,
            own: None,
            index: None,
            conn: Conn::default(),
            owned: OwnedCounts::default(),
        })
    }

    pub async fn prepare(&mut self, previous: Option<&Lease>) -> Result<Option<Value>, Error> {
        self.conn.subscribe()?;
        let mac = self.choose_mac(previous).await?;
        self.mac = Some(mac);
        self.ensure_device().await?;
        // Key names and order exactly as flannel writes them.
        Ok(Some(
            json!({"VNI": self.cfg.vni, "VtepMAC": mac.to_string()}),
        ))
    }

    /// `flannel.<VNI>`.
    pub fn device_name(&self) -> &str {
        &self.name
    }

    pub fn mtu(&self) -> u32 {
        if self.cfg.mtu != 0 {
            self.cfg.mtu
        } else {
            self.net.external.mtu.saturating_sub(config::OVERHEAD)
        }
    }

    pub async fn configure(&mut self, own: &Lease) -> Result<(), Error> {
        self.own = Some(own.clone());
        let index = self.ensure_device().await?;
        let handle = self.conn.handle()?;
        netlink::ensure_address(&handle, index, &self.name, own.subnet.network()).await
    }

    pub async fn reconcile(&mut self, peers: &[Lease]) -> Result<(), ErrorList> {
        // The device may have been deleted behind our back: everything hangs off it.
        let index = self.ensure_device().await?;
        let handle = self.conn.handle()?;
        let mut errs = ErrorList::default();
        if let Some(own) = &self.own {
            if let Err(e) =
                netlink::ensure_address(&handle, index, &self.name, own.subnet.network()).await
            {
                errs.push(e);
            }
        }
        let ext = &self.net.external;
        let connected = if self.cfg.direct_routing {
            routes::connected_networks(&handle, ext.index).await?
        } else {
            Vec::new()
        };
        let mut arp = Vec::new();
        let mut fdb = Vec::new();
        let mut routes = Vec::new();
        let mut macs: HashSet<Mac> = self.mac.into_iter().collect();
        for p in peers.iter().filter(|p| peer::same_type(p, TYPE)) {
            if let Err(e) = peer::check(&self.net, self.own.as_ref(), p) {
                errs.push(e);
                continue;
            }
            if connected.iter().any(|n| n.contains(&p.public_ip)) {
                debug!(subnet = %p.subnet, "direct route (DirectRouting)");
                routes.push(RouteSpec {
                    dst: p.subnet,
                    gateway: Some(p.public_ip),
                    oif: ext.index,
                    dev: ext.name.clone(),
                    onlink: false,
                });
                continue;
            }
            let mac = match self.peer_mac(p) {
                Ok(m) => m,
                Err(e) => {
                    errs.push(e);
                    continue;
                }
            };
            // Two peers behind one MAC would send one peer's traffic to both.
            if !macs.insert(mac) {
                errs.push(bad_peer(
                    p,
                    format!("VtepMAC {mac} is already used by another host"),
                ));
                continue;
            }
            let gateway = p.subnet.network();
            arp.push(Entry { ip: gateway, mac });
            fdb.push(Entry {
                ip: p.public_ip,
                mac,
            });
            routes.push(RouteSpec {
                dst: p.subnet,
                gateway: Some(gateway),
                oif: index,
                dev: self.name.clone(),
                onlink: true,
            });
        }
        // flannel's order per peer: neighbour, FDB, route.
        errs.0
            .extend(neigh::reconcile(&handle, Table::Arp, index, &arp).await.0);
        errs.0
            .extend(neigh::reconcile(&handle, Table::Fdb, index, &fdb).await.0);
        let owner = Owner {
            network: self.net.network,
            device: Some(index),
        };
        errs.0
            .extend(routes::reconcile_owned(&handle, &owner, &routes).await.0);
        self.owned = OwnedCounts {
            routes: routes.len(),
            neighbours: arp.len(),
            fdb: fdb.len(),
        };
        self.conn.settle();
        errs.into_result()
    }

    pub fn owned(&self) -> OwnedCounts {
        self.owned
    }

    pub async fn drifted(&mut self) {
        let owned = Owned {
            device: Some(self.name.clone()),
            index: self.index,
        };
        self.conn.drifted(&owned).await
    }

    /// The VTEP MAC: kept from a good existing device, else the previous lease's, else derived.
    async fn choose_mac(&mut self, previous: Option<&Lease>) -> Result<Mac, Error> {
        let handle = self.conn.handle()?;
        let ext = &self.net.external;
        if let Some(e) = device::find(&handle, &self.name, &self.cfg, ext).await? {
            if let (true, Some(m)) = (e.compatible, e.mac) {
                debug!(mac = %m, "keeping the existing device's VTEP MAC");
                return Ok(m);
            }
        }
        if let Some(m) = previous.and_then(|l| self.peer_mac(l).ok()) {
            debug!(mac = %m, "reusing the previous lease's VTEP MAC");
            return Ok(m);
        }
        Ok(Mac::stable(ext.public_ip, self.cfg.vni))
    }

    async fn ensure_device(&mut self) -> Result<u32, Error> {
        let mac = match self.mac {
            Some(m) => m,
            None => {
                let m = self.choose_mac(None).await?;
                self.mac = Some(m);
                m
            }
        };
        let handle = self.conn.handle()?;
        let spec = device::Spec {
            name: self.name.clone(),
            cfg: &self.cfg,
            ext: &self.net.external,
            mac,
            mtu: self.mtu(),
        };
        let index = device::ensure(&handle, &spec).await?;
        self.index = Some(index);
        Ok(index)
    }

    /// The VTEP MAC a vxlan lease publishes, if its BackendData is sound for our VNI.
    fn peer_mac(&self, p: &Lease) -> Result<Mac, Error> {
        let data = p
            .backend_data
            .as_ref()
            .ok_or_else(|| bad_peer(p, "no BackendData".into()))?;
        let vni = data.get("VNI").and_then(Value::as_u64);
        if vni != Some(u64::from(self.cfg.vni)) {
            return Err(bad_peer(
                p,
                format!(
                    "BackendData VNI {vni:?}, this network uses {}",
                    self.cfg.vni
                ),
            ));
        }
        let mac = data
            .get("VtepMAC")
            .and_then(Value::as_str)
            .ok_or_else(|| bad_peer(p, "BackendData has no VtepMAC".into()))?;
        let mac: Mac = mac.parse().map_err(|e| bad_peer(p, format!("{e}")))?;
        if !mac.is_unicast() {
            return Err(bad_peer(
                p,
                format!("VtepMAC {mac} is not a unicast address"),
            ));
        }
        Ok(mac)
    }
}

fn bad_peer(p: &Lease, reason: String) -> Error {
    Error::BadPeer {
        subnet: p.subnet.to_string(),
        reason,
    }
}
