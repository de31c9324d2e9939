//! Checks every data plane applies to a peer lease before programming anything for it.

use crate::{Error, Lease, Network};

/// Rejects a peer lease weft must not route to: outside the cluster network, the same subnet as
/// this host, or this host's own public IP (the route would loop back here).
pub fn check(net: &Network, own: Option<&Lease>, peer: &Lease) -> Result<(), Error> {
    let bad = |reason: String| Error::BadPeer {
        subnet: peer.subnet.to_string(),
        reason,
    };
    if !net.network.contains(&peer.subnet) {
        return Err(bad(format!(
            "not inside the cluster network {}",
            net.network
        )));
    }
    if own.is_some_and(|o| o.subnet == peer.subnet) {
        return Err(bad("is this host's own subnet".into()));
    }
    if peer.public_ip == net.external.public_ip {
        return Err(bad(format!("public IP {} is this host's", peer.public_ip)));
    }
    Ok(())
}

/// Whether the peer runs the same backend; others are ignored, as flannel does.
pub fn same_type(peer: &Lease, type_name: &str) -> bool {
    if peer.backend_type == type_name {
        return true;
    }
    tracing::debug!(
        subnet = %peer.subnet,
        backend = %peer.backend_type,
        "ignoring peer of another backend type"
    );
    false
}
