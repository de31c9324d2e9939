//! `host-gw`: no encapsulation; each peer subnet is routed via the peer's public IP on the
//! underlay interface. Needs every peer on a directly connected network (L2 adjacency).
//! Dual-stack as flannel: a peer's IPv6 subnet is routed via its PublicIPv6, on an IPv6 network
//! directly connected to the underlay.

use std::collections::HashMap;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde_json::Value;
use std::borrow::Borrow;
use std::net::IpAddr;
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
    connected6: Vec<Ipv6Net>,
    /// The IPv6 subnet routed for each peer (by its IPv4 subnet), so that a peer that leaves
    /// loses both routes.
    routed6: HashMap<Ipv4Net, Ipv6Net>,
    /// A full reconcile ran since the backend was built, its lease changed or drift was seen.
    synced: bool,
}

impl DataPlane for HostGw {
    const TYPE: &'static str = "host-gw";
    const SURVIVES_RESTART: &'static str =
        "the routes to the peers and their nexthops; the kernel keeps forwarding";
    const DUAL_STACK: bool = true;

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
        let connected = (host.connected, host.connected6);
        for p in peers.iter().filter(|p| peer::same_type(p, Self::TYPE)) {
            match routes_to(host.net, Some(host.own), connected, &dev, p) {
                Ok(rs) => want
                    .routes
                    .extend(rs.into_iter().map(|r| (Some(p.subnet), r))),
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
        if self.net.network_v6.is_some() {
            self.connected6 = routes::connected_networks_v6(&handle, ext.index).await?;
        }
        let mut errs = ErrorList::default();
        let mut desired = Vec::new();
        self.routed6.clear();
        for p in peers {
            let p = p.borrow();
            if !peer::same_type(p, Self::TYPE) {
                continue;
            }
            match self.routes_to(p) {
                Ok(rs) => desired.extend(rs),
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
        let mut remove: Vec<IpNet> = Vec::new();
        for s in &changes.remove {
            remove.push((*s).into());
            remove.extend(self.routed6.remove(s).map(IpNet::V6));
        }
        let mut upsert = Vec::new();
        for p in &changes.upsert {
            // A peer that is refused (or changed to another backend type) loses its routes; one
            // whose IPv6 side changed loses the old IPv6 route.
            remove.extend(self.routed6.remove(&p.subnet).map(IpNet::V6));
            match peer::same_type(p, Self::TYPE).then(|| self.routes_to(p)) {
                Some(Ok(rs)) => upsert.extend(rs),
                Some(Err(e)) => {
                    errs.push(e);
                    remove.push(p.subnet.into());
                }
                None => remove.push(p.subnet.into()),
            }
        }
        // What is upserted is not removed.
        remove.retain(|r| !upsert.iter().any(|u: &RouteSpec| u.dst == *r));
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
            connected6: Vec::new(),
            routed6: HashMap::new(),
            synced: false,
        }
    }

    /// The routes to `p` (IPv4, and IPv6 where it can have one), noting its IPv6 subnet.
    fn routes_to(&mut self, p: &Lease) -> Result<Vec<RouteSpec>, Error> {
        let connected = (&self.connected[..], &self.connected6[..]);
        let rs = routes_to(&self.net, self.own.as_ref(), connected, &self.dev, p)?;
        for r in &rs {
            if let IpNet::V6(n) = r.dst {
                self.routed6.insert(p.subnet, n);
            }
        }
        Ok(rs)
    }

    /// The underlay is shared: host-gw owns its routes by network only.
    fn owner(&self) -> Owner {
        Owner {
            network: self.net.network,
            network_v6: self.net.network_v6,
            device: None,
        }
    }

    pub async fn drifted(&mut self) {
        self.conn.drifted(&Watched::default()).await;
        self.synced = false;
    }
}

/// The routes to `p` via its PublicIP (and PublicIPv6) on the underlay (named `dev`), if it can
/// have them: only a peer on a directly connected network can. A peer whose IPv6 side cannot be
/// routed is refused as a whole, as one whose IPv4 side cannot. Pure: `weftctl doctor` asks the
/// same.
fn routes_to(
    net: &Network,
    own: Option<&Lease>,
    (connected, connected6): (&[Ipv4Net], &[Ipv6Net]),
    dev: &Arc<str>,
    p: &Lease,
) -> Result<Vec<RouteSpec>, Error> {
    peer::check(net, own, p)?;
    let v6 = peer::check_v6(net, own, p)?;
    let ext = &net.external;
    let unreachable = |ip: IpAddr| Error::BadPeer {
        subnet: p.subnet.to_string(),
        reason: format!(
            "public IP {ip} is not on a network directly connected to {}; host-gw \
             needs the peers on the same L2 network (use vxlan)",
            ext.name
        ),
    };
    if !connected.iter().any(|n| n.contains(&p.public_ip)) {
        return Err(unreachable(p.public_ip.into()));
    }
    let via = |dst: IpNet, gateway: IpAddr| RouteSpec {
        dst,
        gateway: Some(gateway),
        oif: ext.index,
        dev: dev.clone(),
        onlink: false,
        scope_link: false,
    };
    let mut rs = vec![via(p.subnet.into(), p.public_ip.into())];
    if let Some((subnet, ip)) = v6 {
        if !connected6.iter().any(|n| n.contains(&ip)) {
            return Err(unreachable(ip.into()));
        }
        rs.push(via(subnet.into(), ip.into()));
    }
    Ok(rs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LeaseV6;

    fn net(dual: bool) -> Network {
        crate::testing::network(dual, true, 1500)
    }

    fn lease(n: u8, v6: Option<&str>) -> Lease {
        Lease {
            subnet: format!("10.60.{n}.0/24").parse().expect("subnet"),
            public_ip: format!("10.199.0.{n}").parse().expect("ip"),
            backend_type: "host-gw".into(),
            backend_data: None,
            ipv6: Some(LeaseV6 {
                subnet: format!("fd00:60:0:{n:x}::/64").parse().expect("subnet"),
                public_ip: v6.map(|a| a.parse().expect("ip")),
                backend_data: None,
            }),
        }
    }

    fn routes(net: &Network, own: &Lease, p: &Lease) -> Result<Vec<String>, Error> {
        let connected: Vec<Ipv4Net> = vec!["10.199.0.0/24".parse().expect("net")];
        let connected6: Vec<Ipv6Net> = vec!["fd00:199::/64".parse().expect("net")];
        let dev: Arc<str> = "eth0".into();
        let rs = routes_to(net, Some(own), (&connected, &connected6), &dev, p)?;
        Ok(rs.iter().map(ToString::to_string).collect())
    }

    #[test]
    fn a_dual_stack_peer_is_routed_via_its_public_ip_and_its_public_ipv6() {
        let own = lease(11, Some("fd00:199::11"));
        assert_eq!(
            routes(&net(true), &own, &lease(12, Some("fd00:199::12"))).expect("routes"),
            [
                "10.60.12.0/24 via 10.199.0.12 dev eth0",
                "fd00:60:0:c::/64 via fd00:199::12 dev eth0"
            ]
        );
    }

    #[test]
    fn without_every_part_of_the_ipv6_side_a_peer_is_routed_over_ipv4_alone() {
        let own = lease(11, Some("fd00:199::11"));
        let v4_only = ["10.60.12.0/24 via 10.199.0.12 dev eth0"];
        // An IPv4-only network ignores leases' IPv6 sides.
        let p = lease(12, Some("fd00:199::12"));
        assert_eq!(routes(&net(false), &own, &p).expect("routes"), v4_only);
        // A peer with no PublicIPv6, or no IPv6 subnet at all.
        assert_eq!(
            routes(&net(true), &own, &lease(12, None)).expect("routes"),
            v4_only
        );
        let bare = Lease {
            ipv6: None,
            ..p.clone()
        };
        assert_eq!(routes(&net(true), &own, &bare).expect("routes"), v4_only);
        // This host without an IPv6 subnet routes none.
        let own4 = Lease { ipv6: None, ..own };
        assert_eq!(routes(&net(true), &own4, &p).expect("routes"), v4_only);
    }

    #[test]
    fn an_ipv6_side_that_cannot_be_routed_refuses_the_peer() {
        let own = lease(11, Some("fd00:199::11"));
        for bad in ["fd00:200::12", "fe80::12", "fd00:199::11"] {
            let e = routes(&net(true), &own, &lease(12, Some(bad))).expect_err(bad);
            assert!(matches!(e, Error::BadPeer { .. }), "{bad}: {e}");
        }
        let mut outside = lease(12, Some("fd00:199::12"));
        if let Some(v6) = outside.ipv6.as_mut() {
            v6.subnet = "fd00:61:0:c::/64".parse().expect("subnet");
        }
        assert!(routes(&net(true), &own, &outside).is_err());
    }
}
