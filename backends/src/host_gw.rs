//! `host-gw`: no encapsulation; each peer subnet is routed via the peer's public IP on the
//! underlay interface. Needs every peer on a directly connected network (L2 adjacency).

use serde_json::Value;

use crate::netlink::Conn;
use crate::routes::{self, Owner, RouteSpec};
use crate::watch::Owned;
use crate::{peer, Error, ErrorList, Lease, Network, OwnedCounts};

pub const TYPE: &str = "host-gw";

pub struct HostGw {
    net: Network,
    own: Option<Lease>,
    conn: Conn,
    owned: OwnedCounts,
}

impl HostGw {
    pub fn new(net: Network) -> Self {
        Self {
            net,
            own: None,
            conn: Conn::default(),
            owned: OwnedCounts::default(),
        }
    }

    pub async fn prepare(&mut self, _previous: Option<&Lease>) -> Result<Option<Value>, Error> {
        self.conn.subscribe()?;
        // flannel's host-gw publishes no BackendData.
        Ok(None)
    }

    pub fn mtu(&self) -> u32 {
        self.net.external.mtu
    }

    pub async fn configure(&mut self, own: &Lease) -> Result<(), Error> {
        self.own = Some(own.clone());
        Ok(())
    }

    pub async fn reconcile(&mut self, peers: &[Lease]) -> Result<(), ErrorList> {
        let handle = self.conn.handle()?;
        let ext = &self.net.external;
        let connected = routes::connected_networks(&handle, ext.index).await?;
        let mut errs = ErrorList::default();
        let mut desired = Vec::new();
        for p in peers.iter().filter(|p| peer::same_type(p, TYPE)) {
            if let Err(e) = peer::check(&self.net, self.own.as_ref(), p) {
                errs.push(e);
                continue;
            }
            if !connected.iter().any(|n| n.contains(&p.public_ip)) {
                errs.push(Error::BadPeer {
                    subnet: p.subnet.to_string(),
                    reason: format!(
                        "public IP {} is not on a network directly connected to {}; host-gw \
                         needs the peers on the same L2 network (use vxlan)",
                        p.public_ip, ext.name
                    ),
                });
                continue;
            }
            desired.push(RouteSpec {
                dst: p.subnet,
                gateway: Some(p.public_ip),
                oif: ext.index,
                dev: ext.name.clone(),
                onlink: false,
            });
        }
        // The underlay is shared: host-gw owns its routes by network only.
        let owner = Owner {
            network: self.net.network,
            device: None,
        };
        errs.0
            .extend(routes::reconcile_owned(&handle, &owner, &desired).await.0);
        self.owned.routes = desired.len();
        self.conn.settle();
        errs.into_result()
    }

    pub fn owned(&self) -> OwnedCounts {
        self.owned
    }

    pub async fn drifted(&mut self) {
        self.conn.drifted(&Owned::default()).await
    }
}
