//! Nodes as weft reads and writes them: a Node object of the API, cut down to what weft needs
//! (its name, age, podCIDRs and flannel's annotations), turned into a lease record; and the
//! patches weft sends for its own node, in flanneld's exact format.
//!
//! Pure: no I/O, so every rule here is unit-tested and fuzzed (a Node is another host's data).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::lease::{Hold, Lease, LeaseAttrs, Record, Unreadable};

/// flanneld's annotation prefix.
pub const DEFAULT_PREFIX: &str = "flannel.alpha.coreos.com";

/// The annotations of flannel's kube subnet manager, under one prefix (`--kube-annotation-prefix`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Annotations {
    prefix: String,
}

impl Annotations {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.trim_end_matches('/').to_string(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `<prefix>/<name>`.
    pub fn key(&self, name: &str) -> String {
        format!("{}/{name}", self.prefix)
    }

    fn get<'a>(&self, node: &'a Node, name: &str) -> Option<&'a str> {
        let annotations = node.metadata.annotations.as_ref()?;
        // Looked up without building the key: this runs for every node event.
        annotations
            .iter()
            .find(|(k, _)| {
                k.strip_prefix(self.prefix.as_str())
                    .and_then(|rest| rest.strip_prefix('/'))
                    == Some(name)
            })
            .map(|(_, v)| v.as_str())
    }
}

/// A Node object, cut down to what weft uses; every other field of the API's answer is skipped
/// while parsing, never held.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Node {
    #[serde(default, deserialize_with = "nullable")]
    pub metadata: Meta,
    #[serde(default, deserialize_with = "nullable")]
    pub spec: Spec,
    #[serde(default, deserialize_with = "nullable")]
    pub status: Status,
}

/// A field the API may send as `null`, read as its default.
fn nullable<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Option::unwrap_or_default)
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Meta {
    #[serde(default, deserialize_with = "nullable")]
    pub name: String,
    #[serde(default, rename = "resourceVersion", deserialize_with = "nullable")]
    pub resource_version: String,
    #[serde(default, rename = "creationTimestamp")]
    pub creation_timestamp: Option<String>,
    /// `None` as the API may send it: flanneld v0.22 crashed on a node without annotations.
    #[serde(default)]
    pub annotations: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Spec {
    #[serde(default, rename = "podCIDR")]
    pub pod_cidr: Option<String>,
    #[serde(default, rename = "podCIDRs")]
    pub pod_cidrs: Option<Vec<String>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Status {
    #[serde(default)]
    pub conditions: Option<Vec<Condition>>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
pub struct Condition {
    #[serde(default, rename = "type", deserialize_with = "nullable")]
    pub kind: String,
    #[serde(default, deserialize_with = "nullable")]
    pub status: String,
    #[serde(default)]
    pub reason: Option<String>,
}

impl Node {
    /// Its IPv4 pod subnet: the IPv4 entry of `spec.podCIDRs`, else `spec.podCIDR`. `Ok(None)`:
    /// none assigned yet; `Err`: what is assigned is no IPv4 subnet weft can use.
    pub fn pod_cidr_v4(&self) -> Result<Option<Ipv4Net>, String> {
        let listed = self.spec.pod_cidrs.iter().flatten();
        let all: Vec<&String> = listed.chain(self.spec.pod_cidr.as_ref()).collect();
        if all.is_empty() {
            return Ok(None);
        }
        let mut found = None;
        for text in &all {
            match text.parse::<IpNet>() {
                Ok(IpNet::V4(net)) => {
                    found = Some((text, net));
                    break;
                }
                Ok(IpNet::V6(_)) => {}
                Err(_) => return Err(format!("podCIDR {text:?} is not a CIDR")),
            }
        }
        let Some((text, net)) = found else {
            return Err(format!(
                "no IPv4 podCIDR (has {}): IPv6-only nodes are not supported",
                all.iter()
                    .map(|s| format!("{s:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        };
        if net.trunc() != net {
            return Err(format!(
                "podCIDR {text:?} is not a network address (it would be {})",
                net.trunc()
            ));
        }
        Ok(Some(net))
    }

    /// Its IPv6 pod subnet on a dual-stack cluster: the IPv6 entry of `spec.podCIDRs`.
    /// `Ok(None)`: none; `Err`: one that is not a network address.
    pub fn pod_cidr_v6(&self) -> Result<Option<Ipv6Net>, String> {
        let listed = self.spec.pod_cidrs.iter().flatten();
        for text in listed.chain(self.spec.pod_cidr.as_ref()) {
            if let Ok(IpNet::V6(net)) = text.parse::<IpNet>() {
                if net.trunc() != net {
                    return Err(format!(
                        "podCIDR {text:?} is not a network address (it would be {})",
                        net.trunc()
                    ));
                }
                return Ok(Some(net));
            }
        }
        Ok(None)
    }

    /// The value of condition `kind`, if the node reports it.
    pub fn condition(&self, kind: &str) -> Option<&Condition> {
        (self.status.conditions.iter().flatten()).find(|c| c.kind == kind)
    }

    /// Seconds since the epoch it was created at (0 when unknown): the lease's rank, so that
    /// of two nodes claiming one subnet (or one VTEP MAC) the older keeps it.
    pub fn created(&self) -> i64 {
        (self.metadata.creation_timestamp.as_deref())
            .and_then(|t| t.parse::<jiff::Timestamp>().ok())
            .map_or(0, |t| t.as_second())
    }
}

/// What a node amounts to for the peer set.
#[derive(Debug, Clone, PartialEq)]
// Transient, one per event and moved along: boxing would cost an allocation each.
#[allow(clippy::large_enum_variant)]
pub enum Seen {
    /// A lease record (readable or not), under the node's name.
    Lease(Record),
    /// Not a lease: not run by a flannel-compatible agent, or no podCIDR yet. Why, at debug.
    NotLease(&'static str),
}

/// The lease a node publishes, as flanneld's kube subnet manager reads it: the node's podCIDR
/// and its `<prefix>/public-ip`, `backend-type` and `backend-data` annotations, for nodes whose
/// `<prefix>/kube-subnet-manager` is "true".
pub fn seen(node: &Node, names: &Annotations) -> Seen {
    if names.get(node, "kube-subnet-manager") != Some("true") {
        return Seen::NotLease("no kube-subnet-manager annotation");
    }
    let subnet = match node.pod_cidr_v4() {
        Ok(Some(s)) => s,
        Ok(None) => return Seen::NotLease("no podCIDR yet"),
        Err(e) => return Seen::Lease(record(node, Err(Unreadable::Value(e)))),
    };
    let ipv6_subnet = match node.pod_cidr_v6() {
        Ok(s) => s,
        Err(e) => return Seen::Lease(record(node, Err(Unreadable::Value(e)))),
    };
    Seen::Lease(record(
        node,
        attrs(node, names).map(|attrs| Lease {
            subnet,
            ipv6_subnet,
            attrs,
            hold: Hold::Reserved,
            // Unused: weft changes no other node, and its own without a precondition.
            version: 0,
        }),
    ))
}

fn record(node: &Node, value: Result<Lease, Unreadable>) -> Record {
    Record {
        key: node.metadata.name.clone(),
        rank: node.created(),
        value,
    }
}

fn attrs(node: &Node, names: &Annotations) -> Result<LeaseAttrs, Unreadable> {
    let bad = |e: String| Unreadable::Value(e);
    let public_ip = match names.get(node, "public-ip") {
        Some(s) => s.parse::<Ipv4Addr>().map_err(|_| {
            bad(format!(
                "annotation {} {s:?} is not an IPv4 address",
                names.key("public-ip")
            ))
        })?,
        None => {
            return Err(bad(format!(
                "annotation {} is missing",
                names.key("public-ip")
            )))
        }
    };
    let json = |name: &str| match names.get(node, name) {
        None => Ok(None),
        Some(text) => match serde_json::from_str::<Value>(text) {
            Ok(Value::Null) => Ok(None),
            Ok(v) => Ok(Some(v)),
            Err(e) => Err(bad(format!(
                "annotation {} is not JSON: {e}",
                names.key(name)
            ))),
        },
    };
    Ok(LeaseAttrs {
        public_ip,
        public_ipv6: annotation_ip(node, names, "public-ipv6").map_err(bad)?,
        backend_type: names
            .get(node, "backend-type")
            .unwrap_or_default()
            .to_owned(),
        backend_data: json("backend-data")?,
        backend_v6_data: json("backend-v6-data")?,
    })
}

/// The PublicIP an operator set for this node (`<prefix>/public-ip-overwrite`), published
/// instead of the detected one (as flanneld does: a node behind NAT).
pub fn public_ip_overwrite(node: &Node, names: &Annotations) -> Result<Option<Ipv4Addr>, String> {
    annotation_ip(node, names, "public-ip-overwrite")
}

/// The PublicIPv6 an operator set for this node (`<prefix>/public-ipv6-overwrite`).
pub fn public_ipv6_overwrite(
    node: &Node,
    names: &Annotations,
) -> Result<Option<std::net::Ipv6Addr>, String> {
    annotation_ip(node, names, "public-ipv6-overwrite")
}

/// An optional address in annotation `<prefix>/<name>` ("" counts as none): IPv4, or IPv6.
pub fn annotation_ip<A: std::str::FromStr>(
    node: &Node,
    names: &Annotations,
    name: &str,
) -> Result<Option<A>, String> {
    let family = if name.ends_with("ipv6") {
        "IPv6"
    } else {
        "IPv4"
    };
    names
        .get(node, name)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse().map_err(|_| {
                format!(
                    "annotation {} {s:?} is not an {family} address",
                    names.key(name)
                )
            })
        })
        .transpose()
}

/// The lease this node published before (its annotations), read back so that its backend keeps
/// its identity (vxlan's VTEP MAC) across restarts.
pub fn previous(node: &Node, names: &Annotations) -> Option<Lease> {
    match seen(node, names) {
        Seen::Lease(Record { value: Ok(l), .. }) => Some(l),
        _ => None,
    }
}

/// The patch of `nodes/<name>/status` that publishes this host's lease, as flanneld writes it:
/// the BackendData as compact JSON text (`null` when there is none), every value a string.
pub fn publish_patch(names: &Annotations, attrs: &LeaseAttrs) -> Value {
    let data = attrs.backend_data.as_ref().unwrap_or(&Value::Null);
    let mut annotations = serde_json::Map::new();
    let mut put = |name: &str, value: String| {
        annotations.insert(names.key(name), Value::String(value));
    };
    put("backend-data", data.to_string());
    put("backend-type", attrs.backend_type.clone());
    put("kube-subnet-manager", "true".into());
    put("public-ip", attrs.public_ip.to_string());
    // As flanneld: the IPv6 side only with a PublicIPv6, its data as JSON text or "null".
    if let Some(v6) = &attrs.public_ipv6 {
        let data6 = attrs.backend_v6_data.as_ref().unwrap_or(&Value::Null);
        put("backend-v6-data", data6.to_string());
        put("public-ipv6", v6.to_string());
    }
    json!({ "metadata": { "annotations": annotations } })
}

/// Whether `node` already carries what [`publish_patch`] would write.
pub fn publishes(node: &Node, names: &Annotations, attrs: &LeaseAttrs) -> bool {
    let Value::Object(patch) = &publish_patch(names, attrs)["metadata"]["annotations"] else {
        return false;
    };
    let have = node.metadata.annotations.as_ref();
    patch
        .iter()
        .all(|(k, v)| have.and_then(|a| a.get(k)).map(String::as_str) == v.as_str())
}

/// The patch of `nodes/<name>/status` that says the node's network is up, as flanneld sends
/// it once its data plane runs (with `--set-node-network-unavailable`). Reason and message are
/// flanneld's, for tools that look for them.
pub fn network_available_patch(now: &str) -> Value {
    json!({ "status": { "conditions": [{
        "type": "NetworkUnavailable",
        "status": "False",
        "reason": "FlannelIsUp",
        "message": "Flannel is running on this node",
        "lastTransitionTime": now,
        "lastHeartbeatTime": now,
    }]}})
}

#[cfg(test)]
mod tests;
