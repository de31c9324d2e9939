use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};
use serde_json::Value;

/// A host's lease as the data plane sees it: its subnet, where to reach it, and what its backend
/// published. Garbage in `backend_data` is the backend's to reject, per peer.
#[derive(Debug, Clone, PartialEq)]
pub struct Lease {
    pub subnet: Ipv4Net,
    pub public_ip: Ipv4Addr,
    /// `BackendType` of the lease ("" when the writer left it out, as flannel's udp does).
    pub backend_type: String,
    pub backend_data: Option<BackendData>,
    /// The IPv6 side of a dual-stack lease.
    pub ipv6: Option<LeaseV6>,
}

/// A lease's IPv6 side: its subnet, where to reach it (a host may publish none: then its IPv6
/// subnet is unreachable from here) and the backend's data for it (`BackendV6Data`).
#[derive(Debug, Clone, PartialEq)]
pub struct LeaseV6 {
    pub subnet: Ipv6Net,
    pub public_ip: Option<Ipv6Addr>,
    pub backend_data: Option<BackendData>,
}

/// A lease's `BackendData`, kept as JSON text and parsed by the backend that reads it, when it
/// does: a full pass holds every peer's lease at once, and a parsed JSON map costs ~400 bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendData(Box<str>);

impl BackendData {
    /// JSON text as it came, checked only when it is read ([`BackendData::value`]).
    pub fn from_json(text: &str) -> Self {
        Self(text.into())
    }

    /// The parsed value; `None` when the text is not JSON.
    pub fn value(&self) -> Option<Value> {
        serde_json::from_str(&self.0).ok()
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<&Value> for BackendData {
    fn from(v: &Value) -> Self {
        Self(v.to_string().into_boxed_str())
    }
}

impl From<Value> for BackendData {
    fn from(v: Value) -> Self {
        Self::from(&v)
    }
}
