//! This host's lease in Kubernetes: its Node's podCIDR, once the controller manager assigned
//! one inside the network, published with flannel's annotations on the Node.

use std::net::Ipv4Addr;

use ipnet::{Ipv4Net, Ipv6Net};
use std::time::Duration;

use tracing::info;

use super::node::{self, Node};
use super::KubeStore;
use crate::escape::Escaped;
use crate::lease::{Hold, Lease, LeaseAttrs};
use crate::registry::{Claim, ClaimRead, Claiming, LeaseRequest};
use crate::retry::{retry, Backoff};

/// How often a Node without a usable podCIDR is looked at again.
const RECHECK: Duration = Duration::from_secs(5);

impl KubeStore {
    /// Reads this host's Node (retrying until the API answers): what it published before.
    pub async fn begin_claim(&self, public_ip: Ipv4Addr) -> Claim {
        let node = retry("read this host's node", || self.get_node()).await;
        Claim {
            public_ip,
            previous: node::previous(&node, &self.annotations),
            read: ClaimRead::Kube(Box::new(node)),
        }
    }

    /// Waits until the Node has a podCIDR inside the network, then publishes `req`'s attributes
    /// on it (the operator's `public-ip-overwrite` winning over the detected PublicIP).
    pub async fn claim(
        &self,
        claim: Claim,
        req: &LeaseRequest<'_>,
        progress: &mut dyn FnMut(Claiming<'_>),
    ) -> Lease {
        // Begun by another store (never): read afresh.
        let mut node = match claim.read {
            ClaimRead::Kube(n) => Some(*n),
            ClaimRead::Etcd(_) => None,
        };
        let mut backoff = Backoff::new("publish this host's lease on its node");
        loop {
            let n = match node.take() {
                Some(n) => n,
                None => retry("read this host's node", || self.get_node()).await,
            };
            match self.usable(&n, req) {
                Err(why) => {
                    progress(Claiming::Waiting(&why));
                    crate::notify::pause(RECHECK).await;
                }
                Ok(((subnet, ipv6), attrs)) => {
                    if node::publishes(&n, &self.annotations, &attrs) {
                        return lease(subnet, ipv6, attrs);
                    }
                    let patch = node::publish_patch(&self.annotations, &attrs);
                    match self.patch_status(&patch).await {
                        Ok(()) => {
                            backoff.succeeded();
                            info!(node = %Escaped(&self.node), %subnet, "published this host's lease on its node");
                            return lease(subnet, ipv6, attrs);
                        }
                        Err(e) => backoff.failed(&format!("{e:#}")).await,
                    }
                }
            }
        }
    }

    /// The subnet and attributes this host can lease from `n`, or why not yet.
    fn usable(
        &self,
        n: &Node,
        req: &LeaseRequest<'_>,
    ) -> Result<((Ipv4Net, Option<Ipv6Net>), LeaseAttrs), String> {
        let name = Escaped(&self.node);
        let network = req.config.network;
        let subnet = match n.pod_cidr_v4() {
            Ok(Some(s)) => s,
            Ok(None) => {
                return Err(format!(
                    "node {name} has no podCIDR yet; waiting for the controller manager to assign one (--allocate-node-cidrs)"
                ))
            }
            Err(e) => return Err(format!("node {name}: {}; waiting for a usable one", Escaped(&e))),
        };
        if !network.contains(&subnet) {
            return Err(format!(
                "node {name}'s podCIDR {subnet} is outside the network {network} (--net-config-path); waiting for one inside it"
            ));
        }
        // Dual-stack: the IPv6 entry of podCIDRs, inside IPv6Network.
        let ipv6 = match req.config.ipv6 {
            None => None,
            Some(pool) => match n.pod_cidr_v6() {
                Ok(Some(s)) if pool.network.contains(&s) => Some(s),
                Ok(Some(s)) => {
                    return Err(format!(
                        "node {name}'s IPv6 podCIDR {s} is outside IPv6Network {} (--net-config-path); waiting for one inside it",
                        pool.network
                    ))
                }
                Ok(None) => {
                    return Err(format!(
                        "node {name} has no IPv6 podCIDR yet and the network is dual-stack; waiting for the controller manager to assign one (a dual-stack --cluster-cidr)"
                    ))
                }
                Err(e) => {
                    return Err(format!("node {name}: {}; waiting for a usable one", Escaped(&e)))
                }
            },
        };
        let mut attrs = req.attrs.clone();
        match node::public_ip_overwrite(n, &self.annotations) {
            Ok(Some(ip)) => attrs.public_ip = ip,
            Ok(None) => {}
            Err(e) => return Err(format!("node {name}: {}", Escaped(&e))),
        }
        match node::public_ipv6_overwrite(n, &self.annotations) {
            Ok(Some(ip)) if ipv6.is_some() => attrs.public_ipv6 = Some(ip),
            Ok(_) => {}
            Err(e) => return Err(format!("node {name}: {}", Escaped(&e))),
        }
        Ok(((subnet, ipv6), attrs))
    }
}

fn lease(subnet: Ipv4Net, ipv6_subnet: Option<Ipv6Net>, attrs: LeaseAttrs) -> Lease {
    Lease {
        subnet,
        ipv6_subnet,
        attrs,
        hold: Hold::Reserved,
        version: 0,
    }
}
