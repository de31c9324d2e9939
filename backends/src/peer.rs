//! Checks every data plane applies to a peer lease before programming anything for it.

use std::net::Ipv6Addr;

use ipnet::Ipv6Net;

use crate::iface::{is_unicast_host, is_unicast_host6};
use crate::{Error, Lease, Network};

/// Rejects a peer lease weft must not route to: outside the cluster network, overlapping this
/// host's subnet (a longer prefix inside it would capture local traffic), a PublicIP that is not a
/// unicast host address, or this host's own address (the route would loop back here).
///
/// The agent's peer set (weft's `peers` module) already applies these rules and more (the
/// network's SubnetLen, all of this host's addresses, duplicates); this is the data plane's own
/// guard for whatever it is handed.
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
    if let Some(o) =
        own.filter(|o| o.subnet.contains(&peer.subnet) || peer.subnet.contains(&o.subnet))
    {
        return Err(bad(format!("overlaps this host's subnet {}", o.subnet)));
    }
    if !is_unicast_host(peer.public_ip) {
        return Err(bad(format!(
            "public IP {} is not a unicast host address",
            peer.public_ip
        )));
    }
    let ext = &net.external;
    if peer.public_ip == ext.public_ip || peer.public_ip == ext.iface_addr {
        return Err(bad(format!("public IP {} is this host's", peer.public_ip)));
    }
    Ok(())
}

/// The peer's IPv6 side the data plane can route to: its subnet and PublicIPv6, when the network,
/// this host and the peer are all dual-stack and the peer publishes a PublicIPv6; `Ok(None)`
/// otherwise (it is then an IPv4 peer). The same guard as [`check`]'s, for IPv6.
pub fn check_v6(
    net: &Network,
    own: Option<&Lease>,
    peer: &Lease,
) -> Result<Option<(Ipv6Net, Ipv6Addr)>, Error> {
    let (Some(network), Some(own), Some(v6)) = (
        net.network_v6,
        own.and_then(|o| o.ipv6.as_ref()),
        peer.ipv6.as_ref(),
    ) else {
        return Ok(None);
    };
    let Some(ip) = v6.public_ip else {
        return Ok(None);
    };
    let bad = |reason: String| Error::BadPeer {
        subnet: v6.subnet.to_string(),
        reason,
    };
    if !network.contains(&v6.subnet) {
        return Err(bad(format!("not inside the cluster network {network}")));
    }
    if own.subnet.contains(&v6.subnet) || v6.subnet.contains(&own.subnet) {
        return Err(bad(format!("overlaps this host's subnet {}", own.subnet)));
    }
    if !is_unicast_host6(ip) {
        return Err(bad(format!(
            "public IPv6 {ip} is not a unicast host address"
        )));
    }
    let ext = &net.external;
    if Some(ip) == ext.public_ipv6 || Some(ip) == ext.iface_addr6 {
        return Err(bad(format!("public IPv6 {ip} is this host's")));
    }
    Ok(Some((v6.subnet, ip)))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ExternalInterface;

    fn net() -> Network {
        Network {
            network: "10.60.0.0/16".parse().expect("net"),
            network_v6: None,
            external: ExternalInterface {
                name: "eth0".into(),
                index: 2,
                iface_addr: "10.199.0.11".parse().expect("addr"),
                public_ip: "10.199.0.11".parse().expect("addr"),
                mtu: 1500,
                iface_addr6: None,
                public_ipv6: None,
            },
        }
    }

    fn lease(subnet: &str, ip: &str) -> Lease {
        Lease {
            subnet: subnet.parse().expect("subnet"),
            public_ip: ip.parse().expect("ip"),
            backend_type: "vxlan".into(),
            backend_data: None,
            ipv6: None,
        }
    }

    #[test]
    fn the_data_plane_refuses_peers_that_would_capture_or_misdirect_traffic() {
        let own = lease("10.60.52.0/24", "10.199.0.11");
        let ok = |p: &Lease| check(&net(), Some(&own), p).is_ok();
        assert!(ok(&lease("10.60.7.0/24", "10.199.0.12")));
        // Inside this host's subnet: would beat the bridge's connected route.
        assert!(!ok(&lease("10.60.52.128/25", "10.199.0.12")));
        assert!(!ok(&lease("10.60.52.0/24", "10.199.0.12")));
        assert!(!ok(&lease("10.60.0.0/17", "10.199.0.12")));
        assert!(!ok(&lease("10.61.7.0/24", "10.199.0.12")));
        for ip in [
            "255.255.255.255",
            "0.0.0.0",
            "127.0.0.1",
            "224.0.0.1",
            "10.199.0.11",
        ] {
            assert!(!ok(&lease("10.60.7.0/24", ip)), "{ip}");
        }
    }
}
