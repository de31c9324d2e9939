//! vxlan's IPv6 side on a dual-stack network, as flanneld has it: a second device,
//! `flannel-v6.<VNI>`, with the same VNI, port and options as `flannel.<VNI>`, whose tunnels
//! start at this host's IPv6 underlay address. Peers reach it at their PublicIPv6 and the VTEP
//! MAC of their `BackendV6Data`.

use std::net::Ipv6Addr;
use std::sync::Arc;

use ipnet::Ipv6Net;

use super::config::VxlanConfig;
use crate::conn::Conn;
use crate::mac::Mac;
use crate::Network;

/// IPv6's minimum link MTU: below it the kernel turns IPv6 off on a device, and containers
/// could not use IPv6 either.
pub const IPV6_MIN_MTU: u32 = 1280;

/// Linux's longest interface name.
const MAX_NAME: usize = 15;

/// The IPv6 device this host would have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Side {
    pub name: String,
    /// This host's IPv6 underlay address: where its tunnels start.
    pub local: Ipv6Addr,
    pub mtu: u32,
}

/// Whether this host carries IPv6 over vxlan: `Ok(None)` on an IPv4-only network; on a
/// dual-stack one, its IPv6 device, or why it can have none (it then carries IPv4 only).
pub fn side(cfg: &VxlanConfig, net: &Network) -> Result<Option<Side>, String> {
    if net.network_v6.is_none() {
        return Ok(None);
    }
    let ext = &net.external;
    let name = cfg.device_name6();
    let Some(local) = ext.iface_addr6 else {
        return Err(format!(
            "{} has no global IPv6 address for {name}'s tunnels to start at",
            ext.name
        ));
    };
    if name.len() > MAX_NAME {
        return Err(format!(
            "the device name {name} would exceed {MAX_NAME} characters (a VNI above 9999)"
        ));
    }
    let mtu = cfg.mtu6(ext.mtu);
    if mtu < IPV6_MIN_MTU {
        return Err(format!(
            "{name}'s MTU would be {mtu}, below IPv6's minimum of {IPV6_MIN_MTU} (underlay {} \
             MTU {}, config MTU {})",
            ext.name, ext.mtu, cfg.mtu
        ));
    }
    Ok(Some(Side { name, local, mtu }))
}

/// What the backend keeps of its IPv6 side.
pub struct State {
    pub name: Arc<str>,
    pub local: Ipv6Addr,
    pub mtu: u32,
    pub mac: Option<Mac>,
    /// The device's index as of the last ensure (`None`: not made yet, or it failed).
    pub index: Option<u32>,
    /// The device's own drift watch (a watch follows one device).
    pub conn: Conn,
    /// The underlay's directly connected IPv6 networks as of the last full reconcile
    /// (DirectRouting).
    pub connected: Vec<Ipv6Net>,
}

impl State {
    pub fn new(side: Side) -> Self {
        Self {
            name: side.name.into(),
            local: side.local,
            mtu: side.mtu,
            mac: None,
            index: None,
            conn: Conn::default(),
            connected: Vec::new(),
        }
    }
}

/// A locally administered unicast MAC for `flannel-v6.<VNI>`, derived only from this host's
/// IPv6 address and the VNI, as the IPv4 device's is from its PublicIP (so a host that lost its
/// device and its lease comes back with the MAC its peers know); not the IPv4 device's.
pub fn stable_mac(ip: Ipv6Addr, vni: u32) -> Mac {
    Mac::stable6(ip, vni)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BackendConfig;
    use serde_json::json;

    fn cfg(v: serde_json::Value) -> VxlanConfig {
        let map = match v {
            serde_json::Value::Object(m) => m,
            _ => Default::default(),
        };
        VxlanConfig::parse(&BackendConfig::new(map)).expect("valid")
    }

    fn net(dual: bool, addr6: Option<&str>, mtu: u32) -> Network {
        let mut net = crate::testing::network(dual, false, mtu);
        let addr6 = addr6.map(|a| a.parse().expect("addr"));
        (net.external.iface_addr6, net.external.public_ipv6) = (addr6, addr6);
        net
    }

    #[test]
    fn only_a_dual_stack_host_with_an_ipv6_underlay_address_has_an_ipv6_device() {
        let c = cfg(json!({}));
        assert_eq!(side(&c, &net(false, Some("fd00::11"), 1500)), Ok(None));
        assert_eq!(
            side(&c, &net(true, Some("fd00::11"), 1500)),
            Ok(Some(Side {
                name: "flannel-v6.1".into(),
                local: "fd00::11".parse().expect("addr"),
                mtu: 1430,
            }))
        );
        let why = side(&c, &net(true, None, 1500)).expect_err("no IPv6 address");
        assert!(why.contains("eth0 has no global IPv6 address"), "{why}");
        // 1299 - 20 < 1280.
        let small = side(
            &cfg(json!({"MTU": 1299})),
            &net(true, Some("fd00::11"), 1500),
        );
        assert!(small
            .expect_err("too small")
            .contains("below IPv6's minimum"));
        let long = side(
            &cfg(json!({"VNI": 10000})),
            &net(true, Some("fd00::11"), 1500),
        );
        assert!(long.expect_err("too long").contains("flannel-v6.10000"));
    }

    #[test]
    fn the_ipv6_vtep_mac_is_stable_local_unicast_and_not_the_ipv4_ones() {
        let ip: Ipv6Addr = "fd00:10:199::11".parse().expect("addr");
        let m = stable_mac(ip, 1);
        assert_eq!(m, stable_mac(ip, 1));
        assert_ne!(m, stable_mac(ip, 2));
        assert_ne!(m, stable_mac("fd00:10:199::12".parse().expect("addr"), 1));
        assert!(m.is_unicast());
        assert_eq!(m.0[0] & 0x03, 0x02);
        assert_ne!(m, Mac::stable("10.199.0.11".parse().expect("addr"), 1));
    }
}
