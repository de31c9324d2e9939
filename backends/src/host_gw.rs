//! `host-gw`: no encapsulation; each peer subnet is routed via the peer's public IP on the
//! underlay interface. Needs every peer on a directly connected network (L2 adjacency).

use ipnet::Ipv4Net;
use serde_json::Value;
use std::borrow::Borrow;
use std::sync::Arc;

use crate::conn::Conn;
use crate::routes::{self, Owner, RouteSpec, RouteTable};
use crate::watch::Watched;
use crate::{
    peer, BackendConfig, DataPlane, Desired, Error, ErrorList, Event, Host, Lease, Network,
    PeerChanges, Programmed,
};

pub struct HostGw {
    net: Network,
    /// The underlay's name, which the routes name in messages.
    dev: Arc<str>,
    own: Option<Lease>,
    conn: Conn,
    /// The peer routes in place, for targeted changes (`apply`).
    routes: RouteTable,
    /// The underlay's directly connected networks as of the last full reconcile.
    connected: Vec<Ipv4Net>,
    /// A full reconcile ran since the backend was built, its lease changed or drift was seen.
    synced: bool,
}

impl DataPlane for HostGw {
    const TYPE: &'static str = "host-gw";
    const SURVIVES_RESTART: &'static str =
        "the routes to the peers and their nexthops; the kernel keeps forwarding";

    fn new(_config: &BackendConfig, net: Network) -> Result<Self, Error> {
        Ok(Self::build(net))
    }

    /// Per peer on a connected network, a route via its PublicIP.
    fn desired(
        _config: &BackendConfig,
        host: &Host<'_>,
        peers: &[Lease],
    ) -> Result<Option<Desired>, Error> {
        let dev: Arc<str> = host.net.external.name.as_str().into();
        let mut want = Desired::default();
        for p in peers.iter().filter(|p| peer::same_type(p, Self::TYPE)) {
            match route(host.net, Some(host.own), host.connected, &dev, p) {
                Ok(r) => want.routes.push((Some(p.subnet), r)),
                Err(e) => want.refused.push((p.subnet, e)),
            }
        }
        Ok(Some(want))
    }

    async fn event(&mut self) -> Event {
        self.drifted().await;
        Event::Drift
    }

    async fn prepare(&mut self, _previous: Option<&Lease>) -> Result<Option<Value>, Error> {
        self.conn.subscribe()?;
        // flannel's host-gw publishes no BackendData.
        Ok(None)
    }

    fn mtu(&self) -> u32 {
        self.net.external.mtu
    }

    async fn configure(&mut self, own: &Lease) -> Result<(), Error> {
        // Which peers are acceptable depends on this host's lease.
        self.synced &= self.own.as_ref() == Some(own);
        self.own = Some(own.clone());
        Ok(())
    }

    async fn reconcile<P: Borrow<Lease>>(
        &mut self,
        peers: impl IntoIterator<Item = P>,
    ) -> Result<(), ErrorList> {
        let handle = self.conn.handle()?;
        let batch = self.conn.batch()?;
        let ext = &self.net.external;
        self.connected = routes::connected_networks(&handle, ext.index).await?;
        let mut errs = ErrorList::default();
        let mut desired = Vec::new();
        for p in peers {
            let p = p.borrow();
            if !peer::same_type(p, Self::TYPE) {
                continue;
            }
            match self.route(p) {
                Ok(r) => desired.push(r),
                Err(e) => errs.push(e),
            }
        }
        errs.0.extend(
            self.routes
                .reconcile(&handle, &batch, &self.owner(), &desired)
                .await
                .0,
        );
        self.synced = true;
        self.conn.settle().await;
        errs.into_result()
    }

    /// [`crate::Backend::apply`]: each peer's route added, replaced or deleted on its own.
    async fn apply(&mut self, changes: &PeerChanges) -> Result<(), ErrorList> {
        let batch = self.conn.batch()?;
        let mut errs = ErrorList::default();
        if changes.is_empty() {
            errs.0.extend(self.routes.retry(&batch).await.0);
        }
        let mut remove = changes.remove.clone();
        let mut upsert = Vec::new();
        for p in &changes.upsert {
            // A peer that is refused (or changed to another backend type) loses its route.
            match peer::same_type(p, Self::TYPE).then(|| self.route(p)) {
                Some(Ok(r)) => upsert.push(r),
                Some(Err(e)) => {
                    errs.push(e);
                    remove.push(p.subnet);
                }
                None => remove.push(p.subnet),
            }
        }
        errs.0
            .extend(self.routes.apply(&batch, &remove, &upsert).await.0);
        self.conn.settle().await;
        errs.into_result()
    }

    /// Whether only a full reconcile can bring the kernel in line.
    fn needs_reconcile(&self) -> bool {
        !self.synced || self.routes.stale()
    }

    fn programmed(&self) -> Programmed {
        Programmed {
            routes: self.routes.wanted(),
            ..Programmed::default()
        }
    }
}

impl HostGw {
    fn build(net: Network) -> Self {
        Self {
            dev: net.external.name.as_str().into(),
            net,
            own: None,
            conn: Conn::default(),
            routes: RouteTable::default(),
            connected: Vec::new(),
            synced: false,
        }
    }

    /// The route to `p`, if it can have one.
    fn route(&self, p: &Lease) -> Result<RouteSpec, Error> {
        route(&self.net, self.own.as_ref(), &self.connected, &self.dev, p)
    }

    /// The underlay is shared: host-gw owns its routes by network only.
    fn owner(&self) -> Owner {
        Owner {
            network: self.net.network,
            network_v6: None,
            device: None,
        }
    }

    pub async fn drifted(&mut self) {
        self.conn.drifted(&Watched::default()).await;
        self.synced = false;
    }
}

/// The route to `p` via its PublicIP on the underlay (named `dev`), if it can have one: only a
/// peer on a directly connected network can. Pure: `weftctl doctor` asks the same.
fn route(
    net: &Network,
    own: Option<&Lease>,
    connected: &[Ipv4Net],
    dev: &Arc<str>,
    p: &Lease,
) -> Result<RouteSpec, Error> {
    peer::check(net, own, p)?;
    let ext = &net.external;
    if !connected.iter().any(|n| n.contains(&p.public_ip)) {
        return Err(Error::BadPeer {
            subnet: p.subnet.to_string(),
            reason: format!(
                "public IP {} is not on a network directly connected to {}; host-gw \
                 needs the peers on the same L2 network (use vxlan)",
                p.public_ip, ext.name
            ),
        });
    }
    Ok(RouteSpec {
        dst: p.subnet.into(),
        gateway: Some(p.public_ip.into()),
        oif: ext.index,
        dev: dev.clone(),
        onlink: false,
        scope_link: false,
    })
}
