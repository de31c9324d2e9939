use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde_json::Value;

/// A host's lease as the data plane sees it: its subnet, where to reach it, and what its backend
/// published. Garbage in `backend_data` is the backend's to reject, per peer.
#[derive(Debug, Clone, PartialEq)]
pub struct Lease {
    pub subnet: Ipv4Net,
    pub public_ip: Ipv4Addr,
    /// `BackendType` of the lease ("" when the writer left it out, as flannel's udp does).
    pub backend_type: String,
    pub backend_data: Option<Value>,
}
