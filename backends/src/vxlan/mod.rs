//! `vxlan`: flannel's default data plane. One `flannel.<VNI>` device; per peer a permanent
//! neighbour (peer network address → peer VTEP MAC), an FDB entry (VTEP MAC → peer public IP) and
//! a route `peer-subnet via peer-network-address dev flannel.<VNI> onlink`. With DirectRouting,
//! peers on a directly connected network get a plain host-gw route instead.
//!
//! Dual-stack as flannel (`v6`): a second device, `flannel-v6.<VNI>`, whose tunnels start at this
//! host's IPv6 underlay address, carries IPv6 the same way, with the same three entries per peer
//! for its IPv6 subnet, PublicIPv6 and BackendV6Data's VTEP MAC (or, with DirectRouting, a route
//! via its PublicIPv6 on a connected IPv6 network). A host without an IPv6 underlay address has
//! no such device and carries IPv4 only.
//!
//! Unlike flanneld, the VTEP MACs survive restarts (flannel #1795): an existing good device keeps
//! its MAC, else the previous lease's `VtepMAC` (its `BackendV6Data`'s for the IPv6 device) is
//! reused, else one is derived from the public IP (the IPv6 address) and VNI.

mod config;
mod device;
pub mod ethtool;
mod plan;
mod v6;
mod want;

use std::borrow::Borrow;
use std::collections::HashSet;
use std::sync::Arc;

use ipnet::Ipv4Net;
use serde_json::{json, Value};
use tracing::{debug, warn};

pub use config::VxlanConfig;

use crate::conn::Conn;
use crate::mac::{vtep_mac, Mac};
use crate::neigh::{self, Entry, Table};
use crate::netlink;
use crate::peer;
use crate::routes::{self, Owner, RouteSpec, RouteTable};
use crate::watch::Watched;
use crate::{
    BackendConfig, DataPlane, Desired, Error, ErrorList, Event, Host, Identity, IdentityKind,
    Lease, Network, PeerChanges, Programmed,
};
use device::Underlay;
use plan::{Admitted, Moves, PeerPlan, Plan, Plans};

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
    /// `flannel-v6.<VNI>`, on a dual-stack network when this host can carry IPv6 (boxed: the
    /// `Backend` enum is as large as its largest backend).
    v6: Option<Box<v6::State>>,
    /// Why a dual-stack network gets IPv4 only on this host, until `prepare` has said it.
    v4_only: Option<String>,
    /// IPv6 VTEP MACs some peer was refused for because another held them: when one is freed
    /// (its holder left or changed), only a full reconcile can give it to the refused peer.
    contended6: HashSet<Mac>,
}

impl DataPlane for Vxlan {
    const TYPE: &'static str = "vxlan";
    const SURVIVES_RESTART: &'static str =
        "the vxlan device (and flannel-v6.<VNI> on a dual-stack host) with its address, \
         neighbours, FDB entries, routes and nexthops; the kernel keeps forwarding";
    const DUAL_STACK: bool = true;
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
    fn device6(config: &BackendConfig) -> Option<String> {
        VxlanConfig::parse(config).ok().map(|c| c.device_name6())
    }

    fn desired(
        config: &BackendConfig,
        host: &Host<'_>,
        peers: &[Lease],
    ) -> Result<Option<Desired>, Error> {
        want::desired(&VxlanConfig::parse(config)?, host, peers).map(Some)
    }

    fn device_names(&self) -> Vec<String> {
        // The IPv6 device's name whether or not it was made: deleting one that is absent is
        // no error, and one left from an earlier dual-stack run goes too.
        vec![self.name.to_string(), self.cfg.device_name6()]
    }

    async fn event(&mut self) -> Event {
        self.drifted().await;
        Event::Drift
    }

    fn new(config: &BackendConfig, net: Network) -> Result<Self, Error> {
        let cfg = VxlanConfig::parse(config)?;
        let (v6, v4_only) = match v6::side(&cfg, &net) {
            Ok(side) => (side.map(|s| Box::new(v6::State::new(s))), None),
            Err(why) => (None, Some(why)),
        };
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
            v6,
            v4_only,
            contended6: HashSet::new(),
        })
    }

    async fn prepare(&mut self, previous: Option<&Lease>) -> Result<Option<Value>, Error> {
        self.conn.subscribe()?;
        let mac = self.choose_mac(previous).await?;
        self.mac = Some(mac);
        self.ensure_device().await?;
        self.prepare6(previous).await?;
        // Key names and order exactly as flannel writes them.
        Ok(Some(
            json!({"VNI": self.cfg.vni, "VtepMAC": mac.to_string()}),
        ))
    }

    /// flannel's `{"VNI":…,"VtepMAC":"…"}` for `flannel-v6.<VNI>`, on a host that has one.
    fn backend_v6_data(&self) -> Option<Value> {
        let mac = self.v6.as_ref()?.mac?;
        Some(json!({"VNI": self.cfg.vni, "VtepMAC": mac.to_string()}))
    }

    /// FLANNEL_MTU, which `flannel.<VNI>` gets too. On a host carrying IPv6 it is
    /// `flannel-v6.<VNI>`'s MTU, the smaller: VXLAN over IPv6 costs 70 bytes against IPv4's 50,
    /// so 20 below the IPv4 figure (underlay − 70, or the config's MTU − 20). Containers then
    /// never send an IPv6 packet the IPv6 device must drop, and every overlay device agrees with
    /// FLANNEL_MTU. This differs from flanneld, which gives both devices and FLANNEL_MTU the
    /// IPv4 figure.
    fn mtu(&self) -> u32 {
        let mtu4 = self.cfg.mtu4(self.net.external.mtu);
        match &self.v6 {
            Some(v6) => mtu4.min(v6.mtu),
            None => mtu4,
        }
    }

    async fn configure(&mut self, own: &Lease) -> Result<(), Error> {
        // Which peers are acceptable depends on this host's lease.
        self.synced &= self.own.as_ref() == Some(own);
        self.own = Some(own.clone());
        let index = self.ensure_device().await?;
        let handle = self.conn.handle()?;
        netlink::ensure_address(&handle, index, &self.name, own.subnet.network()).await?;
        // IPv4 never waits for the IPv6 side: every reconcile tries it again, and says why.
        if let Err(e) = self.configure6().await {
            warn!(error = %e, "the IPv6 vxlan device is not ready yet");
            self.synced = false;
        }
        Ok(())
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
        // Without its device this pass, the IPv6 side is left out (its routes go with it) and
        // the error makes the next check a full pass again.
        let index6 = match self.v6.is_some() {
            true => match self.ensure_device6().await {
                Ok(i) => {
                    if let Err(e) = self.ensure_address6(i).await {
                        errs.push(e);
                    }
                    Some(i)
                }
                Err(e) => {
                    errs.push(e);
                    None
                }
            },
            false => None,
        };
        let ext = &self.net.external;
        self.connected = if self.cfg.direct_routing {
            routes::connected_networks(&handle, ext.index).await?
        } else {
            Vec::new()
        };
        let ext_index = ext.index;
        if let Some(v6) = self.v6.as_mut() {
            v6.connected = if self.cfg.direct_routing && index6.is_some() {
                routes::connected_networks_v6(&handle, ext_index).await?
            } else {
                Vec::new()
            };
        }
        let mut plans = Plans::default();
        let mut contended6 = HashSet::new();
        for p in peers {
            let p = p.borrow();
            if !peer::same_type(p, Self::TYPE) {
                continue;
            }
            if plans.get(&p.subnet).is_some() {
                errs.push(want::bad(p, "another peer has this subnet".into()));
                continue;
            }
            match self.plan(p, &plans, index6.is_some()) {
                Ok(plan) => {
                    let admitted = plans.admit(p.subnet, plan);
                    errs.0.extend(contest(p.subnet, admitted, &mut contended6));
                }
                Err(e) => errs.push(e),
            }
        }
        // Everything each peer needs, as if from nothing.
        let mut all = Moves::default();
        for (subnet, plan) in plans.iter() {
            all.peer(subnet, None, Some(plan));
        }
        let routes = self.routes_of(&all, index, index6);
        // flannel's order per peer: neighbour, FDB, route.
        let (tables, _) = table_moves(&all, index, index6);
        for (table, ifindex, entries) in tables {
            let more = neigh::reconcile(&handle, &batch, table, ifindex, entries).await;
            errs.0.extend(more.0);
        }
        let owner = Owner {
            network: self.net.network,
            network_v6: self.net.network_v6,
            device: Some(index),
        };
        errs.0.extend(
            self.routes
                .reconcile(&handle, &batch, &owner, &routes)
                .await
                .0,
        );
        self.plans = plans;
        self.contended6 = contended6;
        self.synced = !errs.0.iter().any(kernel_unknown);
        self.settle().await;
        errs.into_result()
    }

    /// [`crate::Backend::apply`]: only the peers in `changes`, each moved from its old plan to
    /// its new one with targeted requests.
    async fn apply(&mut self, changes: &PeerChanges) -> Result<(), ErrorList> {
        let Some(index) = self.index else {
            self.synced = false;
            return Err(Error::Other("vxlan: apply before the first reconcile".into()).into());
        };
        let index6 = match &self.v6 {
            None => None,
            Some(v6) => match v6.index {
                Some(i) => Some(i),
                None => {
                    self.synced = false;
                    let e = format!("vxlan: apply while {} is not in place", v6.name);
                    return Err(Error::Other(e).into());
                }
            },
        };
        self.apply_with(changes, index, index6).await
    }

    /// Whether only a full reconcile can bring the kernel in line.
    fn needs_reconcile(&self) -> bool {
        !self.synced || self.routes.stale()
    }

    /// Every peer in the plans has its routes (in place or blocked); each overlay peer a
    /// neighbour and an FDB entry per family it is reached through the overlay by.
    fn programmed(&self) -> Programmed {
        let overlay = self.plans.overlay() + self.plans.overlay6();
        Programmed {
            routes: self.routes.wanted(),
            neighbours: overlay,
            fdb: overlay,
        }
    }
}

/// The requests on the devices' tables that `apply` sends first (neighbours and FDB entries
/// added), or last (removed), one set per device.
type TableMoves<'a> = Vec<(Table, u32, &'a Vec<Entry>)>;

impl Vxlan {
    /// `apply` with the devices' indexes known: `index6` on a host carrying IPv6.
    async fn apply_with(
        &mut self,
        changes: &PeerChanges,
        index: u32,
        index6: Option<u32>,
    ) -> Result<(), ErrorList> {
        let batch = self.conn.batch()?;
        let mut errs = ErrorList::default();
        if changes.is_empty() {
            errs.0.extend(self.routes.retry(&batch).await.0);
        }
        // Every peer concerned leaves its plan before any takes a new one, removals first, so a
        // MAC that passes from one peer to another within the batch is free whatever their
        // order; each one's first plan is what the kernel holds.
        let mut olds = Olds::default();
        for subnet in &changes.remove {
            olds.take(&mut self.plans, *subnet);
        }
        for p in &changes.upsert {
            olds.take(&mut self.plans, p.subnet);
        }
        for p in &changes.upsert {
            if !peer::same_type(p, Self::TYPE) {
                continue;
            }
            let plan = match self.plan(p, &self.plans, index6.is_some()) {
                Ok(plan) => plan,
                Err(e) => {
                    errs.push(e);
                    continue;
                }
            };
            let admitted = self.plans.admit(p.subnet, plan);
            if let Admitted::Displacing { loser, old, .. } = admitted {
                olds.note(loser, Some(old));
            }
            errs.0
                .extend(contest(p.subnet, admitted, &mut self.contended6));
        }
        let mut moves = Moves::default();
        for (subnet, old) in olds.0 {
            moves.peer(subnet, old, self.plans.get(&subnet));
        }
        if (self.contended6.iter()).any(|m| self.plans.mac6_holder(*m).is_none()) {
            debug!("an IPv6 VTEP MAC a peer was refused for is free: a full pass will judge it");
            self.synced = false;
        }
        // A failed neighbour request leaves the tables unknown: the next check compares them.
        let mut neigh_ok = true;
        let (adds, dels) = table_moves(&moves, index, index6);
        for (table, ifindex, entries) in adds {
            let more = neigh::add_all(&batch, table, ifindex, entries).await;
            neigh_ok &= more.0.is_empty();
            errs.0.extend(more.0);
        }
        let put = self.routes_of(&moves, index, index6);
        errs.0
            .extend(self.routes.apply(&batch, &moves.route_remove, &put).await.0);
        for (table, ifindex, entries) in dels {
            let more = neigh::delete_all(&batch, table, ifindex, entries).await;
            neigh_ok &= more.0.is_empty();
            errs.0.extend(more.0);
        }
        self.synced &= neigh_ok;
        self.settle().await;
        errs.into_result()
    }

    /// What to program for `p`; `plans` holds the peers judged so far (their VTEP MACs are
    /// taken); `v6`: whether this host carries IPv6 now.
    fn plan(&self, p: &Lease, plans: &Plans, v6: bool) -> Result<PeerPlan, Error> {
        let local = want::Local {
            connected: &self.connected,
            connected6: self.v6.as_ref().map_or(&[][..], |s| &s.connected[..]),
            v6,
        };
        let plan = want::judge(&self.cfg, &self.net, self.own.as_ref(), &local, p)?;
        match plan.v4 {
            Plan::Direct { .. } => debug!(subnet = %p.subnet, "direct route (DirectRouting)"),
            // Two peers behind one MAC would send one peer's traffic to both.
            Plan::Overlay { mac, .. }
                if self.mac == Some(mac) || plans.mac_holder(mac).is_some() =>
            {
                return Err(want::bad(
                    p,
                    format!("VtepMAC {mac} is already used by another host"),
                ));
            }
            Plan::Overlay { .. } => {}
        }
        let own6 = self.v6.as_ref().and_then(|s| s.mac);
        if let Some(mac) = plan.v6.and_then(|s| s.mac()).filter(|m| Some(*m) == own6) {
            return Err(want::bad(
                p,
                format!("BackendV6Data VtepMAC {mac} is this host's"),
            ));
        }
        Ok(plan)
    }

    /// The routes `moves` puts in place, both families.
    fn routes_of(&self, moves: &Moves, index: u32, index6: Option<u32>) -> Vec<RouteSpec> {
        let underlay = (self.net.external.index, &self.underlay);
        let mut routes: Vec<RouteSpec> = (moves.route_put.iter())
            .map(|(subnet, plan)| want::route(*subnet, *plan, (index, &self.name), underlay))
            .collect();
        if let (Some(v6), Some(i6)) = (&self.v6, index6) {
            routes.extend(
                (moves.route_put6.iter()).map(|plan| want::route6(*plan, (i6, &v6.name), underlay)),
            );
        }
        routes
    }

    pub async fn drifted(&mut self) {
        let owned = Watched {
            device: Some(self.name.to_string()),
            index: self.index,
        };
        match self.v6.as_mut() {
            // One watch follows one device: the IPv6 device has its own.
            Some(v6) => {
                let owned6 = Watched {
                    device: Some(v6.name.to_string()),
                    index: v6.index,
                };
                tokio::select! {
                    () = self.conn.drifted(&owned) => {}
                    () = v6.conn.drifted(&owned6) => {}
                }
            }
            None => self.conn.drifted(&owned).await,
        }
        self.synced = false;
    }

    /// Forgets the echoes of this backend's own changes, on both devices' watches.
    async fn settle(&mut self) {
        self.conn.settle().await;
        if let Some(v6) = self.v6.as_mut() {
            v6.conn.settle().await;
        }
    }

    /// The VTEP MAC: kept from a good existing device, else the previous lease's, else derived.
    async fn choose_mac(&mut self, previous: Option<&Lease>) -> Result<Mac, Error> {
        let handle = self.conn.handle()?;
        let ext = &self.net.external;
        if let Some(e) = device::find(&handle, &self.name, &self.cfg, self.underlay4()).await? {
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
            underlay: self.underlay4(),
            mac,
            mtu: self.mtu(),
        };
        let index = device::ensure(&handle, &spec).await?;
        self.index = Some(index);
        Ok(index)
    }

    fn underlay4(&self) -> Underlay {
        let ext = &self.net.external;
        Underlay {
            index: ext.index,
            local: ext.iface_addr.into(),
        }
    }

    /// `prepare`'s part for IPv6: `flannel-v6.<VNI>` and its VTEP MAC on a host carrying IPv6;
    /// else why not, said once, and the device of an earlier dual-stack run removed.
    async fn prepare6(&mut self, previous: Option<&Lease>) -> Result<(), Error> {
        let Some(v6) = self.v6.as_mut() else {
            if let Some(why) = self.v4_only.take() {
                warn!(
                    "the network is dual-stack, but {why}: no {}, this host carries IPv4 only",
                    self.cfg.device_name6()
                );
            }
            // Not this configuration's (IPv6 turned off, or no IPv6 underlay address any more):
            // its address and entries would only mislead.
            let name6 = self.cfg.device_name6();
            if name6.len() <= 15 {
                if let Err(e) = netlink::delete_link(&name6).await {
                    warn!(error = %e, "a leftover {name6} could not be removed");
                }
            }
            return Ok(());
        };
        v6.conn.subscribe()?;
        let mac = self.choose_mac6(previous).await?;
        if let Some(v6) = self.v6.as_mut() {
            v6.mac = Some(mac);
        }
        // IPv4 never waits for the IPv6 side: the next reconcile tries it again, and says why.
        if let Err(e) = self.ensure_device6().await {
            warn!(error = %e, "the IPv6 vxlan device is not ready yet");
            self.synced = false;
        }
        Ok(())
    }

    /// [`Vxlan::choose_mac`] for `flannel-v6.<VNI>`: kept from a good existing device, else the
    /// previous lease's BackendV6Data's, else derived from the IPv6 address (and never the IPv4
    /// device's).
    async fn choose_mac6(&mut self, previous: Option<&Lease>) -> Result<Mac, Error> {
        let handle = self.conn.handle()?;
        let Some((name, underlay)) = self.underlay6() else {
            return Err(Error::Other("vxlan: no IPv6 side".into()));
        };
        if let Some(e) = device::find(&handle, &name, &self.cfg, underlay).await? {
            if let (true, Some(m)) = (e.compatible, e.mac) {
                debug!(device = %name, mac = %m, "keeping the existing device's VTEP MAC");
                return Ok(m);
            }
        }
        if let Some(m) = previous.and_then(|l| want::mac6(&self.cfg, l).ok()) {
            debug!(device = %name, mac = %m, "reusing the previous lease's BackendV6Data VTEP MAC");
            return Ok(m);
        }
        let ext = &self.net.external;
        let ip = match underlay.local {
            std::net::IpAddr::V6(local) => ext.public_ipv6.unwrap_or(local),
            std::net::IpAddr::V4(_) => return Err(Error::Other("vxlan: no IPv6 side".into())),
        };
        let mut mac = v6::stable_mac(ip, self.cfg.vni);
        if Some(mac) == self.mac {
            // Astronomically unlikely, but two devices with one MAC would read as one VTEP.
            mac.0[5] ^= 1;
        }
        Ok(mac)
    }

    /// `flannel-v6.<VNI>`'s name and where its tunnels start, on a host carrying IPv6.
    fn underlay6(&self) -> Option<(Arc<str>, Underlay)> {
        let v6 = self.v6.as_ref()?;
        let u = Underlay {
            index: self.net.external.index,
            local: v6.local.into(),
        };
        Some((v6.name.clone(), u))
    }

    /// Makes `flannel-v6.<VNI>` exist with its settings, MAC and MTU, up; returns its index.
    async fn ensure_device6(&mut self) -> Result<u32, Error> {
        let Some((name, underlay)) = self.underlay6() else {
            return Err(Error::Other("vxlan: no IPv6 side".into()));
        };
        let mac = match self.v6.as_ref().and_then(|v| v.mac) {
            Some(m) => m,
            None => self.choose_mac6(None).await?,
        };
        let handle = self.conn.handle()?;
        let mtu = self.v6.as_ref().map_or(0, |v| v.mtu);
        let spec = device::Spec {
            name: name.to_string(),
            cfg: &self.cfg,
            underlay,
            mac,
            mtu,
        };
        let made = device::ensure(&handle, &spec).await;
        if let Some(v6) = self.v6.as_mut() {
            v6.mac = Some(mac);
            v6.index = made.as_ref().ok().copied();
        }
        made
    }

    /// `flannel-v6.<VNI>` made, with its address. Returns its index.
    async fn configure6(&mut self) -> Result<u32, Error> {
        let index = self.ensure_device6().await?;
        self.ensure_address6(index).await?;
        Ok(index)
    }

    /// The IPv6 lease's network address/128 on `flannel-v6.<VNI>` (device `index`), as
    /// flanneld's `ip -6 addr add`; none while this host has no IPv6 lease.
    async fn ensure_address6(&mut self, index: u32) -> Result<(), Error> {
        let handle = self.conn.handle()?;
        let name = self.v6.as_ref().map(|v| v.name.clone()).unwrap_or_default();
        let addr = (self.own.as_ref())
            .and_then(|o| o.ipv6.as_ref())
            .map(|v6| v6.subnet.network());
        netlink::ensure_address6(&handle, index, &name, addr).await
    }
}

/// The neighbour and FDB requests of `moves`, per device: those adding, those deleting.
fn table_moves(moves: &Moves, index: u32, index6: Option<u32>) -> (TableMoves<'_>, TableMoves<'_>) {
    let mut adds = vec![
        (Table::Arp, index, &moves.arp_add),
        (Table::Fdb, index, &moves.fdb_add),
    ];
    let mut dels = vec![
        (Table::Arp, index, &moves.arp_del),
        (Table::Fdb, index, &moves.fdb_del),
    ];
    if let Some(i6) = index6 {
        adds.extend([
            (Table::Ndp, i6, &moves.nd_add),
            (Table::Fdb, i6, &moves.fdb6_add),
        ]);
        dels.extend([
            (Table::Ndp, i6, &moves.nd_del),
            (Table::Fdb, i6, &moves.fdb6_del),
        ]);
    }
    (adds, dels)
}

/// The error of a peer left out because another publishes its IPv6 VTEP MAC (`subnet` arrived,
/// and was admitted as `admitted` says), noting the MAC as contended.
fn contest(subnet: Ipv4Net, admitted: Admitted, contended6: &mut HashSet<Mac>) -> Option<Error> {
    match admitted {
        Admitted::In => None,
        Admitted::Refused { holder, mac } => {
            contended6.insert(mac);
            Some(want::bad_subnet(
                subnet,
                format!(
                    "BackendV6Data VtepMAC {mac} is already used by the host of {holder}, \
                     which keeps it (the lower subnet)"
                ),
            ))
        }
        Admitted::Displacing { loser, mac, .. } => {
            contended6.insert(mac);
            Some(want::bad_subnet(
                loser,
                format!(
                    "BackendV6Data VtepMAC {mac} is also published by the host of {subnet}, \
                     which takes it (the lower subnet)"
                ),
            ))
        }
    }
}

/// The plans the peers of one `apply` held before it, each peer's first (what the kernel
/// holds), in the order they were met.
#[derive(Default)]
struct Olds(Vec<(Ipv4Net, Option<PeerPlan>)>, HashSet<Ipv4Net>);

impl Olds {
    /// Clears the plan of `subnet`, noting what it was.
    fn take(&mut self, plans: &mut Plans, subnet: Ipv4Net) {
        let old = plans.set(subnet, None);
        self.note(subnet, old);
    }

    /// Notes that `subnet` held `old`, unless an earlier note says what it held before.
    fn note(&mut self, subnet: Ipv4Net, old: Option<PeerPlan>) {
        if self.1.insert(subnet) {
            self.0.push((subnet, old));
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LeaseV6;

    fn vxlan(options: Value, dual: bool, addr6: bool) -> Vxlan {
        let map = match options {
            Value::Object(m) => m,
            _ => Default::default(),
        };
        let net = crate::testing::network(dual, addr6, 1500);
        let mut v = Vxlan::new(&BackendConfig::new(map), net).expect("valid");
        v.own = Some(lease(11, 11));
        v.mac = Some(Mac([2, 0, 0, 0, 0, 11]));
        if let Some(s) = v.v6.as_mut() {
            s.mac = Some(Mac([6, 0, 0, 0, 0, 11]));
        }
        v
    }

    /// Host `n`'s dual-stack lease, publishing IPv6 VTEP MAC 06::`mac6`.
    fn lease(n: u8, mac6: u8) -> Lease {
        let data = |b: u8, m: u8| json!({"VNI": 1, "VtepMAC": format!("0{b}:00:00:00:00:{m:02x}")});
        Lease {
            subnet: format!("10.60.{n}.0/24").parse().expect("subnet"),
            public_ip: format!("10.199.0.{n}").parse().expect("ip"),
            backend_type: "vxlan".into(),
            backend_data: Some(data(2, n).into()),
            ipv6: Some(LeaseV6 {
                subnet: format!("fd00:60:0:{n:x}::/64").parse().expect("subnet"),
                public_ip: Some(format!("fd00:199::{n:x}").parse().expect("ip")),
                backend_data: Some(data(6, mac6).into()),
            }),
        }
    }

    /// A full pass's planning, without the kernel: the moves from nothing, the routes, and the
    /// refusals.
    fn pass(v: &Vxlan, peers: &[Lease]) -> (Moves, Vec<String>, Vec<String>) {
        let mut plans = Plans::default();
        let mut errs = Vec::new();
        let mut contended = HashSet::new();
        for p in peers {
            match v.plan(p, &plans, v.v6.is_some()) {
                Ok(plan) => {
                    let admitted = plans.admit(p.subnet, plan);
                    errs.extend(contest(p.subnet, admitted, &mut contended).map(|e| e.to_string()));
                }
                Err(e) => errs.push(e.to_string()),
            }
        }
        let mut all = Moves::default();
        let mut subnets: Vec<Ipv4Net> = plans.iter().map(|(s, _)| s).collect();
        subnets.sort();
        for s in subnets {
            all.peer(s, None, plans.get(&s));
        }
        let routes = v.routes_of(&all, 7, v.v6.as_ref().map(|_| 8));
        (all, routes.iter().map(ToString::to_string).collect(), errs)
    }

    #[test]
    fn a_dual_stack_peer_gets_two_routes_and_entries_on_both_devices() {
        let v = vxlan(json!({}), true, true);
        let (m, routes, errs) = pass(&v, &[lease(12, 12)]);
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(
            routes,
            [
                "10.60.12.0/24 via 10.60.12.0 dev flannel.1 onlink",
                "fd00:60:0:c::/64 via fd00:60:0:c:: dev flannel-v6.1 onlink"
            ]
        );
        let six = |ip: &str| Entry {
            ip: ip.parse().expect("ip"),
            mac: Mac([6, 0, 0, 0, 0, 12]),
        };
        assert_eq!(m.nd_add, [six("fd00:60:0:c::")]);
        assert_eq!(m.fdb6_add, [six("fd00:199::c")]);
        assert_eq!((m.arp_add.len(), m.fdb_add.len()), (1, 1));
        let (ad, de) = table_moves(&m, 7, Some(8));
        assert_eq!(ad.len(), 4, "both tables of both devices");
        assert!(ad
            .iter()
            .any(|(t, i, e)| *t == Table::Ndp && *i == 8 && e.len() == 1));
        assert_eq!(de.len(), 4);
    }

    #[test]
    fn without_an_ipv6_device_every_peer_is_an_ipv4_peer() {
        // A dual-stack network but no IPv6 address on the underlay; an IPv4-only network.
        for v in [vxlan(json!({}), true, false), vxlan(json!({}), false, true)] {
            assert!(v.v6.is_none());
            let (m, routes, errs) = pass(&v, &[lease(12, 12)]);
            assert!(errs.is_empty(), "{errs:?}");
            assert_eq!(
                routes,
                ["10.60.12.0/24 via 10.60.12.0 dev flannel.1 onlink"]
            );
            assert!(m.nd_add.is_empty() && m.fdb6_add.is_empty());
            assert_eq!(v.backend_v6_data(), None);
            assert_eq!(v.mtu(), 1450);
        }
    }

    #[test]
    fn two_peers_with_one_ipv6_vtep_mac_the_lower_subnet_keeps_it_in_any_order() {
        let v = vxlan(json!({}), true, true);
        let (low, high) = (lease(12, 40), lease(13, 40));
        for peers in [[low.clone(), high.clone()], [high.clone(), low.clone()]] {
            let (m, routes, errs) = pass(&v, &peers);
            assert_eq!(errs.len(), 1, "{errs:?}");
            assert!(
                errs[0].starts_with("peer 10.60.13.0/24: BackendV6Data VtepMAC 06:00:00:00:00:28"),
                "{errs:?}"
            );
            assert_eq!(m.fdb6_add.len(), 1);
            assert_eq!(m.fdb6_add[0].ip.to_string(), "fd00:199::c");
            assert_eq!(
                routes.len(),
                2,
                "the loser is refused as a whole: {routes:?}"
            );
        }
        // This host's own IPv6 VTEP MAC.
        let (_, routes, errs) = pass(&v, &[lease(12, 11)]);
        assert!(
            routes.is_empty() && errs[0].contains("is this host's"),
            "{errs:?}"
        );
    }

    #[test]
    fn flannel_mtu_on_a_dual_stack_host_is_the_ipv6_devices() {
        let v = vxlan(json!({}), true, true);
        assert_eq!(v.mtu(), 1430);
        assert_eq!(v.v6.as_ref().map(|s| s.mtu), Some(1430));
        let set = vxlan(json!({"MTU": 1400}), true, true);
        assert_eq!(set.mtu(), 1380);
        // flannel's BackendData shape, for the IPv6 device's MAC.
        assert_eq!(
            v.backend_v6_data().map(|d| d.to_string()),
            Some(r#"{"VNI":1,"VtepMAC":"06:00:00:00:00:0b"}"#.into())
        );
    }

    #[test]
    fn direct_routing_gives_a_connected_ipv6_peer_a_route_on_the_underlay() {
        let mut v = vxlan(json!({"DirectRouting": true}), true, true);
        if let Some(s) = v.v6.as_mut() {
            s.connected = vec!["fd00:199::/64".parse().expect("net")];
        }
        let (m, routes, errs) = pass(&v, &[lease(12, 12)]);
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(
            routes,
            [
                "10.60.12.0/24 via 10.60.12.0 dev flannel.1 onlink",
                "fd00:60:0:c::/64 via fd00:199::c dev eth0"
            ]
        );
        assert!(m.nd_add.is_empty() && m.fdb6_add.is_empty());
    }
}
