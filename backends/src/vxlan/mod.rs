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
mod plan;
mod want;

use ipnet::Ipv4Net;
use serde_json::{json, Value};
use std::borrow::Borrow;
use std::sync::Arc;
use tracing::debug;

pub use config::VxlanConfig;

use crate::conn::Conn;
use crate::mac::{vtep_mac, Mac};
use crate::neigh::{self, Table};
use crate::netlink;
use crate::peer;
use crate::routes::{self, Owner, RouteSpec, RouteTable};
use crate::watch::Watched;
use crate::{
    BackendConfig, DataPlane, Desired, Error, ErrorList, Event, Host, Identity, IdentityKind,
    Lease, Network, PeerChanges, Programmed,
};
use plan::{Moves, Plan, Plans};

/// Two peers behind one VTEP MAC would each get the other's traffic: the older lease keeps it.
pub static VTEP_MAC: IdentityKind = IdentityKind {
    name: "VtepMAC",
    len: 6,
    bad_label: "bad_vtep_mac",
    own_label: "vtep_mac_own",
    taken_label: "vtep_mac_taken",
    show: |b, f| match Mac::from_slice(b) {
        Some(m) => write!(f, "{m}"),
        None => write!(f, "{b:02x?}"),
    },
};

pub struct Vxlan {
    net: Network,
    cfg: VxlanConfig,
    name: Arc<str>,
    /// The underlay's name (DirectRouting routes leave through it).
    underlay: Arc<str>,
    mac: Option<Mac>,
    own: Option<Lease>,
    /// The device's index as of the last ensure, for recognising drift events.
    index: Option<u32>,
    conn: Conn,
    /// What each peer has in the kernel, for targeted changes (`apply`).
    plans: Plans,
    routes: RouteTable,
    /// The underlay's directly connected networks as of the last full reconcile (DirectRouting).
    connected: Vec<Ipv4Net>,
    /// A full reconcile ran since the backend was built, its lease changed, drift was seen or a
    /// neighbour request failed.
    synced: bool,
}

impl DataPlane for Vxlan {
    const TYPE: &'static str = "vxlan";
    const SURVIVES_RESTART: &'static str =
        "the vxlan device with its address, neighbours, FDB entries, routes and \
         nexthops; the kernel keeps forwarding";
    const DEVICE_KINDS: &'static [&'static str] = &["vxlan"];
    const MTU_OVERHEAD: u32 = config::OVERHEAD;
    const IDENTITY: Option<&'static IdentityKind> = Some(&VTEP_MAC);

    fn check(config: &BackendConfig, _underlay_mtu: u32) -> Result<(), Error> {
        VxlanConfig::parse(config).map(drop)
    }

    fn device(config: &BackendConfig) -> Option<String> {
        VxlanConfig::parse(config).ok().map(|c| c.device_name())
    }

    fn identity(backend_data: Option<&Value>) -> Result<Option<Identity>, String> {
        let mac = vtep_mac(backend_data).map_err(|e| e.to_string())?;
        Ok(Some(Identity::new(&VTEP_MAC, &mac.0)))
    }

    /// `flannel.<VNI>`.
    fn desired(
        config: &BackendConfig,
        host: &Host<'_>,
        peers: &[Lease],
    ) -> Result<Option<Desired>, Error> {
        want::desired(&VxlanConfig::parse(config)?, host, peers).map(Some)
    }

    fn device_name(&self) -> Option<String> {
        Some(self.name.to_string())
    }

    async fn event(&mut self) -> Event {
        self.drifted().await;
        Event::Drift
    }

    fn new(config: &BackendConfig, net: Network) -> Result<Self, Error> {
        let cfg = VxlanConfig::parse(config)?;
        Ok(Self {
            name: cfg.device_name().into(),
            underlay: net.external.name.as_str().into(),
            net,
            cfg,
            mac: None,
            own: None,
            index: None,
            conn: Conn::default(),
            plans: Plans::default(),
            routes: RouteTable::default(),
            connected: Vec::new(),
            synced: false,
        })
    }

    async fn prepare(&mut self, previous: Option<&Lease>) -> Result<Option<Value>, Error> {
        self.conn.subscribe()?;
        let mac = self.choose_mac(previous).await?;
        self.mac = Some(mac);
        self.ensure_device().await?;
        // Key names and order exactly as flannel writes them.
        Ok(Some(
            json!({"VNI": self.cfg.vni, "VtepMAC": mac.to_string()}),
        ))
    }

    fn mtu(&self) -> u32 {
        if self.cfg.mtu != 0 {
            self.cfg.mtu
        } else {
            self.net.external.mtu.saturating_sub(config::OVERHEAD)
        }
    }

    async fn configure(&mut self, own: &Lease) -> Result<(), Error> {
        // Which peers are acceptable depends on this host's lease.
        self.synced &= self.own.as_ref() == Some(own);
        self.own = Some(own.clone());
        let index = self.ensure_device().await?;
        let handle = self.conn.handle()?;
        netlink::ensure_address(&handle, index, &self.name, own.subnet.network()).await
    }

    async fn reconcile<P: Borrow<Lease>>(
        &mut self,
        peers: impl IntoIterator<Item = P>,
    ) -> Result<(), ErrorList> {
        // The device may have been deleted behind our back: everything hangs off it.
        let index = self.ensure_device().await?;
        let handle = self.conn.handle()?;
        let batch = self.conn.batch()?;
        let mut errs = ErrorList::default();
        if let Some(own) = &self.own {
            if let Err(e) =
                netlink::ensure_address(&handle, index, &self.name, own.subnet.network()).await
            {
                errs.push(e);
            }
        }
        let ext = &self.net.external;
        self.connected = if self.cfg.direct_routing {
            routes::connected_networks(&handle, ext.index).await?
        } else {
            Vec::new()
        };
        let mut plans = Plans::default();
        for p in peers {
            let p = p.borrow();
            if !peer::same_type(p, Self::TYPE) {
                continue;
            }
            if plans.get(&p.subnet).is_some() {
                errs.push(want::bad(p, "another peer has this subnet".into()));
                continue;
            }
            match self.plan(p, |m| plans.mac_holder(m).is_some()) {
                Ok(plan) => {
                    plans.set(p.subnet, Some(plan));
                }
                Err(e) => errs.push(e),
            }
        }
        // Everything each peer needs, as if from nothing.
        let mut all = Moves::default();
        for (subnet, plan) in plans.iter() {
            all.peer(subnet, None, Some(plan));
        }
        let routes: Vec<RouteSpec> = (all.route_put.iter())
            .map(|(subnet, plan)| self.route(*subnet, *plan, index))
            .collect();
        // flannel's order per peer: neighbour, FDB, route.
        errs.0.extend(
            neigh::reconcile(&handle, &batch, Table::Arp, index, &all.arp_add)
                .await
                .0,
        );
        errs.0.extend(
            neigh::reconcile(&handle, &batch, Table::Fdb, index, &all.fdb_add)
                .await
                .0,
        );
        let owner = Owner {
            network: self.net.network,
            network_v6: None,
            device: Some(index),
        };
        errs.0.extend(
            self.routes
                .reconcile(&handle, &batch, &owner, &routes)
                .await
                .0,
        );
        self.plans = plans;
        self.synced = !errs.0.iter().any(kernel_unknown);
        self.conn.settle().await;
        errs.into_result()
    }

    /// [`crate::Backend::apply`]: only the peers in `changes`, each moved from its old plan to
    /// its new one with targeted requests.
    async fn apply(&mut self, changes: &PeerChanges) -> Result<(), ErrorList> {
        let Some(index) = self.index else {
            self.synced = false;
            return Err(Error::Other("vxlan: apply before the first reconcile".into()).into());
        };
        let batch = self.conn.batch()?;
        let mut errs = ErrorList::default();
        if changes.is_empty() {
            errs.0.extend(self.routes.retry(&batch).await.0);
        }
        let mut moves = Moves::default();
        // Removals first: a MAC they free may be taken by a peer added in the same batch.
        for subnet in &changes.remove {
            let old = self.plans.set(*subnet, None);
            moves.peer(*subnet, old, None);
        }
        // Every changed peer leaves its old plan before any takes its new one, so a MAC that
        // passes from one peer to another within the batch is free whatever their order.
        let olds: Vec<Option<Plan>> = (changes.upsert.iter())
            .map(|p| self.plans.set(p.subnet, None))
            .collect();
        for (p, old) in changes.upsert.iter().zip(olds) {
            let new = if peer::same_type(p, Self::TYPE) {
                match self.plan(p, |m| self.plans.mac_holder(m).is_some()) {
                    Ok(plan) => Some(plan),
                    Err(e) => {
                        errs.push(e);
                        None
                    }
                }
            } else {
                None
            };
            self.plans.set(p.subnet, new);
            moves.peer(p.subnet, old, new);
        }
        // A failed neighbour request leaves the tables unknown: the next check compares them.
        let mut neigh_ok = true;
        for (table, entries) in [(Table::Arp, &moves.arp_add), (Table::Fdb, &moves.fdb_add)] {
            let more = neigh::add_all(&batch, table, index, entries).await;
            neigh_ok &= more.0.is_empty();
            errs.0.extend(more.0);
        }
        let put: Vec<RouteSpec> = (moves.route_put.iter())
            .map(|(subnet, plan)| self.route(*subnet, *plan, index))
            .collect();
        errs.0
            .extend(self.routes.apply(&batch, &moves.route_remove, &put).await.0);
        for (table, entries) in [(Table::Arp, &moves.arp_del), (Table::Fdb, &moves.fdb_del)] {
            let more = neigh::delete_all(&batch, table, index, entries).await;
            neigh_ok &= more.0.is_empty();
            errs.0.extend(more.0);
        }
        self.synced &= neigh_ok;
        self.conn.settle().await;
        errs.into_result()
    }

    /// Whether only a full reconcile can bring the kernel in line.
    fn needs_reconcile(&self) -> bool {
        !self.synced || self.routes.stale()
    }

    /// Every peer in the plans has its route (in place or blocked); each overlay peer a
    /// neighbour and an FDB entry.
    fn programmed(&self) -> Programmed {
        Programmed {
            routes: self.routes.wanted(),
            neighbours: self.plans.overlay(),
            fdb: self.plans.overlay(),
        }
    }
}

impl Vxlan {
    /// What to program for `p`; `mac_taken` says whether another peer already uses a VTEP MAC.
    fn plan(&self, p: &Lease, mac_taken: impl Fn(Mac) -> bool) -> Result<Plan, Error> {
        let plan = want::judge(&self.cfg, &self.net, self.own.as_ref(), &self.connected, p)?;
        match plan {
            Plan::Direct { .. } => debug!(subnet = %p.subnet, "direct route (DirectRouting)"),
            // Two peers behind one MAC would send one peer's traffic to both.
            Plan::Overlay { mac, .. } if self.mac == Some(mac) || mac_taken(mac) => {
                return Err(want::bad(
                    p,
                    format!("VtepMAC {mac} is already used by another host"),
                ));
            }
            Plan::Overlay { .. } => {}
        }
        Ok(plan)
    }

    /// The route of a peer: into the device `index` through the overlay, or on the underlay.
    fn route(&self, subnet: Ipv4Net, plan: Plan, index: u32) -> RouteSpec {
        let underlay = (self.net.external.index, &self.underlay);
        want::route(subnet, plan, (index, &self.name), underlay)
    }

    pub async fn drifted(&mut self) {
        let owned = Watched {
            device: Some(self.name.to_string()),
            index: self.index,
        };
        self.conn.drifted(&owned).await;
        self.synced = false;
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
        if let Some(m) = previous.and_then(|l| want::mac(&self.cfg, l).ok()) {
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
            name: self.name.to_string(),
            cfg: &self.cfg,
            ext: &self.net.external,
            mac,
            mtu: self.mtu(),
        };
        let index = device::ensure(&handle, &spec).await?;
        self.index = Some(index);
        Ok(index)
    }
}

/// Whether an error of a full reconcile leaves the kernel's state unknown (a failed request or
/// dump), rather than a peer refused or a route held by another, which the pass itself judged.
fn kernel_unknown(e: &Error) -> bool {
    matches!(
        e,
        Error::Netlink { .. } | Error::Io { .. } | Error::Other(_)
    )
}
