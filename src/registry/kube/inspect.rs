//! What weftctl (`status`, `doctor`) reads of the Kubernetes API: this host's Node as flannel
//! sees it, and every Node sorted into lease records, nodes waiting for a podCIDR, and the rest.
//! Read-only: gets and lists of Nodes (RBAC: nodes get/list), never a write.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::Result;
use ipnet::Ipv4Net;

use super::node::{self, Annotations, Condition, Node, Seen};
use super::KubeStore;
use crate::escape::Escaped;
use crate::flags::KubeArgs;
use crate::lease::{Lease, Record};

/// The condition weftd sets False once its data plane is up (as flanneld does).
pub const NETWORK_UNAVAILABLE: &str = "NetworkUnavailable";

/// This host's Node as weftctl shows and judges it: what flannel reads and writes of it.
#[derive(Debug, Clone, PartialEq)]
pub struct OwnNode {
    pub name: String,
    /// Its IPv4 podCIDR: `Ok(None)` none assigned yet; `Err`: what is assigned is unusable.
    pub pod_cidr: Result<Option<Ipv4Net>, String>,
    /// The annotations under the prefix, by name without it (`backend-type`, …), as stored.
    pub annotations: BTreeMap<String, String>,
    /// The lease they publish, read as a peer reads it: `None` when the node publishes none
    /// (no `kube-subnet-manager: "true"`, or no podCIDR), `Err` when it cannot be read.
    pub lease: Option<Result<Lease, String>>,
    /// `<prefix>/public-ip-overwrite`, the operator's PublicIP for this node.
    pub public_ip_overwrite: Result<Option<Ipv4Addr>, String>,
    /// Its `NetworkUnavailable` condition, if it has one.
    pub network_unavailable: Option<Condition>,
}

impl OwnNode {
    /// `<prefix>/node-public-ip`, which weftd (as flanneld) takes as -public-ip when it has
    /// none; `None` when absent or not an IPv4 address.
    pub fn node_public_ip(&self) -> Option<Ipv4Addr> {
        self.annotations.get("node-public-ip")?.parse().ok()
    }

    /// `<prefix>/node-public-ipv6`, taken as -public-ipv6 the same way.
    pub fn node_public_ipv6(&self) -> Option<Ipv6Addr> {
        self.annotations.get("node-public-ipv6")?.parse().ok()
    }
}

/// What `node` amounts to for weftctl, under `names`.
pub fn own_node(node: &Node, names: &Annotations) -> OwnNode {
    let prefix = format!("{}/", names.prefix());
    let annotations = (node.metadata.annotations.iter().flatten())
        .filter_map(|(k, v)| Some((k.strip_prefix(&prefix)?.to_string(), v.clone())))
        .collect();
    let lease = match node::seen(node, names) {
        Seen::Lease(r) => Some(r.value.map_err(|e| e.to_string())),
        Seen::NotLease(_) => None,
    };
    OwnNode {
        name: node.metadata.name.clone(),
        pod_cidr: node.pod_cidr_v4(),
        annotations,
        lease,
        public_ip_overwrite: node::public_ip_overwrite(node, names),
        network_unavailable: node.condition(NETWORK_UNAVAILABLE).cloned(),
    }
}

/// Every Node, sorted as weftctl shows them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeList {
    /// The nodes that publish a lease (this host's too), as the agent lists them.
    pub records: Vec<Record>,
    /// Nodes run by a flannel-compatible agent but without a podCIDR yet, by name.
    pub waiting: Vec<String>,
    /// Nodes without flannel's annotations (or that the API sent in a form weft cannot read).
    pub others: usize,
}

impl NodeList {
    /// Sorts one node in.
    pub fn add(&mut self, node: &Node, names: &Annotations) {
        match node::seen(node, names) {
            Seen::Lease(r) => self.records.push(r),
            Seen::NotLease(_) if names_it(node, names) => {
                self.waiting.push(node.metadata.name.clone())
            }
            Seen::NotLease(_) => self.others += 1,
        }
    }
}

/// Whether `node` says a flannel-compatible agent runs it.
fn names_it(node: &Node, names: &Annotations) -> bool {
    let key = names.key("kube-subnet-manager");
    (node.metadata.annotations.as_ref())
        .and_then(|a| a.get(&key))
        .map(String::as_str)
        == Some("true")
}

impl KubeStore {
    /// The annotations weft reads and writes.
    pub fn annotations(&self) -> &Annotations {
        &self.annotations
    }

    /// This host's Node as flannel sees it (a get: RBAC nodes get).
    pub async fn own_node(&self) -> Result<OwnNode> {
        Ok(own_node(&self.get_node().await?, &self.annotations))
    }

    /// Every Node, page by page from one snapshot, sorted (a list: RBAC nodes list). Each page
    /// is read as the agent's listing reads it: its Nodes one at a time, only what weftctl
    /// shows kept.
    pub async fn list_nodes(&self) -> Result<NodeList> {
        let mut out = NodeList::default();
        // Checks the listing's position too: an API server weft cannot follow says so.
        self.each_node("", &mut |json| match serde_json::from_str::<Node>(json) {
            Ok(n) => out.add(&n, &self.annotations),
            Err(_) => out.others += 1,
        })
        .await?;
        Ok(out)
    }
}

/// Where the API server is, as the flags say, for messages.
pub fn server_of(args: &KubeArgs) -> String {
    match (&args.kube_api_url, &args.kubeconfig_file) {
        (Some(url), _) => format!("the Kubernetes API at {}", Escaped(url)),
        (None, Some(file)) => format!(
            "the Kubernetes API of {}",
            Escaped(&file.display().to_string())
        ),
        (None, None) => "the Kubernetes API (in-cluster)".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(json: &str) -> Node {
        serde_json::from_str(json).expect("node")
    }

    const P: &str = "flannel.alpha.coreos.com";

    #[test]
    fn a_published_node_shows_its_lease_annotations_and_condition() {
        let n = node(&format!(
            r#"{{"metadata":{{"name":"n0","annotations":{{
                "{P}/backend-type":"vxlan","{P}/backend-data":"{{\"VNI\":1,\"VtepMAC\":\"0e:00:00:00:00:01\"}}",
                "{P}/kube-subnet-manager":"true","{P}/public-ip":"10.199.0.11",
                "other.io/x":"y"}}}},
              "spec":{{"podCIDR":"10.244.1.0/24"}},
              "status":{{"conditions":[{{"type":"Ready","status":"True"}},
                {{"type":"NetworkUnavailable","status":"False","reason":"FlannelIsUp"}}]}}}}"#
        ));
        let own = own_node(&n, &Annotations::new(P));
        assert_eq!(own.name, "n0");
        assert_eq!(own.pod_cidr, Ok(Some("10.244.1.0/24".parse().unwrap())));
        assert_eq!(
            own.annotations.keys().collect::<Vec<_>>(),
            [
                "backend-data",
                "backend-type",
                "kube-subnet-manager",
                "public-ip"
            ],
            "only flannel's, by short name"
        );
        let lease = own.lease.expect("published").expect("readable");
        assert_eq!(lease.attrs.public_ip.to_string(), "10.199.0.11");
        assert_eq!(own.public_ip_overwrite, Ok(None));
        let c = own.network_unavailable.expect("condition");
        assert_eq!(
            (c.status.as_str(), c.reason.as_deref()),
            ("False", Some("FlannelIsUp"))
        );
    }

    #[test]
    fn a_bare_node_has_no_lease_no_podcidr_and_no_condition() {
        let own = own_node(&node(r#"{"metadata":{"name":"n1"}}"#), &Annotations::new(P));
        assert_eq!(own.pod_cidr, Ok(None));
        assert!(own.annotations.is_empty());
        assert_eq!(own.lease, None);
        assert_eq!(own.network_unavailable, None);
    }

    #[test]
    fn nodes_are_sorted_into_leases_waiting_and_others() {
        let names = Annotations::new(P);
        let mut l = NodeList::default();
        l.add(
            &node(&format!(
                r#"{{"metadata":{{"name":"a","annotations":{{"{P}/kube-subnet-manager":"true","{P}/public-ip":"10.0.0.1"}}}},"spec":{{"podCIDR":"10.244.1.0/24"}}}}"#
            )),
            &names,
        );
        l.add(
            &node(&format!(
                r#"{{"metadata":{{"name":"b","annotations":{{"{P}/kube-subnet-manager":"true"}}}}}}"#
            )),
            &names,
        );
        l.add(&node(r#"{"metadata":{"name":"c"}}"#), &names);
        assert_eq!(l.records.len(), 1);
        assert_eq!(l.records[0].key, "a");
        assert_eq!(l.waiting, ["b"]);
        assert_eq!(l.others, 1);
    }
}
