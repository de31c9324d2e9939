//! What vxlan wants in the kernel for one peer, judged from its lease and this host alone
//! (pure): the backend's reconcile and `weftctl doctor` both work from it.

use std::sync::Arc;

use ipnet::{Ipv4Net, Ipv6Net};
use serde_json::Value;
use tracing::debug;

use super::plan::{PeerPlan, Plan, Plan6};
use super::VxlanConfig;
use crate::lease::BackendData;
use crate::mac::Mac;
use crate::peer;
use crate::plane::{Desired, Host};
use crate::routes::RouteSpec;
use crate::{DataPlane, Error, Lease, Network};

/// What judging a peer takes of this host besides its lease: the underlay's directly connected
/// networks (DirectRouting; empty without it) and whether it carries IPv6 (its
/// `flannel-v6.<VNI>` is up).
#[derive(Debug, Clone, Copy, Default)]
pub struct Local<'a> {
    pub connected: &'a [Ipv4Net],
    pub connected6: &'a [Ipv6Net],
    pub v6: bool,
}

/// Where `p` goes: directly on the underlay (DirectRouting, a peer on a connected network), or
/// through the overlay to its VTEP MAC; over IPv4, and over IPv6 too when both hosts carry it;
/// or why it is no peer. A peer whose IPv6 side is unusable (outside the IPv6 network, a bad
/// PublicIPv6 or BackendV6Data) is refused as a whole, as host-gw refuses one (and as flanneld
/// skips the lease): programming half a peer would hide the problem.
pub fn judge(
    cfg: &VxlanConfig,
    net: &Network,
    own: Option<&Lease>,
    local: &Local<'_>,
    p: &Lease,
) -> Result<PeerPlan, Error> {
    peer::check(net, own, p)?;
    let v4 = if local.connected.iter().any(|n| n.contains(&p.public_ip)) {
        Plan::Direct {
            public_ip: p.public_ip,
        }
    } else {
        Plan::Overlay {
            mac: mac(cfg, p)?,
            public_ip: p.public_ip,
        }
    };
    let v6 = match local.v6 {
        true => judge6(cfg, net, own, local.connected6, p)?,
        false => None,
    };
    Ok(PeerPlan { v4, v6 })
}

/// The IPv6 side of `p`: none when it has no IPv6 subnet, no PublicIPv6 or no BackendV6Data
/// (an IPv4 peer: a weft host whose underlay has no IPv6 address publishes a PublicIPv6 given by
/// flag, but no BackendV6Data).
fn judge6(
    cfg: &VxlanConfig,
    net: &Network,
    own: Option<&Lease>,
    connected6: &[Ipv6Net],
    p: &Lease,
) -> Result<Option<Plan6>, Error> {
    let Some((subnet, public_ip)) = peer::check_v6(net, own, p)? else {
        return Ok(None);
    };
    if connected6.iter().any(|n| n.contains(&public_ip)) {
        return Ok(Some(Plan6::Direct { subnet, public_ip }));
    }
    let data = p.ipv6.as_ref().and_then(|v6| v6.backend_data.as_ref());
    let Some(data) = data else {
        debug!(subnet = %p.subnet, %public_ip, "no BackendV6Data: reached over IPv4 only");
        return Ok(None);
    };
    Ok(Some(Plan6::Overlay {
        subnet,
        mac: vtep_mac(cfg, p, Some(data), "BackendV6Data")?,
        public_ip,
    }))
}

/// The route of a peer's IPv4 side: into the device (`index`, name) through the overlay, or on
/// the underlay.
pub fn route(
    subnet: Ipv4Net,
    plan: Plan,
    device: (u32, &Arc<str>),
    underlay: (u32, &Arc<str>),
) -> RouteSpec {
    match plan {
        Plan::Overlay { .. } => RouteSpec {
            dst: subnet.into(),
            gateway: Some(subnet.network().into()),
            oif: device.0,
            dev: device.1.clone(),
            onlink: true,
            scope_link: false,
        },
        Plan::Direct { public_ip } => RouteSpec {
            dst: subnet.into(),
            gateway: Some(public_ip.into()),
            oif: underlay.0,
            dev: underlay.1.clone(),
            onlink: false,
            scope_link: false,
        },
    }
}

/// The route of a peer's IPv6 side: `subnet via subnet-network-address dev flannel-v6.<VNI>
/// onlink` (`device`), or via its PublicIPv6 on the underlay.
pub fn route6(plan: Plan6, device: (u32, &Arc<str>), underlay: (u32, &Arc<str>)) -> RouteSpec {
    let subnet = plan.subnet();
    let (gateway, (oif, dev), onlink) = match plan {
        Plan6::Overlay { .. } => (subnet.network(), device, true),
        Plan6::Direct { public_ip, .. } => (public_ip, underlay, false),
    };
    RouteSpec {
        dst: subnet.into(),
        gateway: Some(gateway.into()),
        oif,
        dev: dev.clone(),
        onlink,
        scope_link: false,
    }
}

/// Everything vxlan wants for `peers` on `host`: per overlay peer a neighbour, an FDB entry
/// and a route through the device; per direct peer a route on the underlay; the same for a
/// peer's IPv6 side, through `flannel-v6.<VNI>` (its entries are told apart by their IPv6
/// addresses). Peers are judged on both sides, so one refused for its IPv6 side is refused here
/// too.
pub fn desired(cfg: &VxlanConfig, host: &Host<'_>, peers: &[Lease]) -> Result<Desired, Error> {
    let name: Arc<str> = cfg.device_name().into();
    let name6: Arc<str> = cfg.device_name6().into();
    let index = host
        .device
        .ok_or_else(|| Error::NoInterface(name.to_string()))?;
    let ext = &host.net.external;
    let underlay: Arc<str> = ext.name.as_str().into();
    let local = Local {
        connected: if cfg.direct_routing {
            host.connected
        } else {
            &[]
        },
        connected6: if cfg.direct_routing {
            host.connected6
        } else {
            &[]
        },
        v6: matches!(super::v6::side(cfg, host.net), Ok(Some(_))),
    };
    let mut want = Desired::default();
    for p in peers
        .iter()
        .filter(|p| peer::same_type(p, super::Vxlan::TYPE))
    {
        let plans = match judge(cfg, host.net, Some(host.own), &local, p) {
            Ok(plans) => plans,
            Err(e) => {
                want.refused.push((p.subnet, e));
                continue;
            }
        };
        if let Plan::Overlay { mac, public_ip } = plans.v4 {
            want.neighbours
                .push((p.subnet, p.subnet.network().into(), mac));
            want.fdb.push((p.subnet, mac, public_ip.into()));
        }
        let r = route(p.subnet, plans.v4, (index, &name), (ext.index, &underlay));
        want.routes.push((Some(p.subnet), r));
        // The IPv6 side: its route through flannel-v6.<VNI> when it exists, or on the
        // underlay; its neighbour and FDB entry whether the device exists or not (they are
        // what the device must hold, and a missing device is worth naming).
        let dev6 = (host.device6, &name6);
        match plans.v6 {
            Some(plan6 @ Plan6::Direct { .. }) => {
                let r = route6(plan6, (0, &name6), (ext.index, &underlay));
                want.routes.push((Some(p.subnet), r));
            }
            Some(
                plan6 @ Plan6::Overlay {
                    subnet,
                    mac,
                    public_ip,
                },
            ) => {
                want.neighbours
                    .push((p.subnet, subnet.network().into(), mac));
                want.fdb.push((p.subnet, mac, public_ip.into()));
                if let (Some(i6), n6) = dev6 {
                    let r = route6(plan6, (i6, n6), (ext.index, &underlay));
                    want.routes.push((Some(p.subnet), r));
                }
            }
            None => {}
        }
    }
    Ok(want)
}

/// The VTEP MAC a vxlan lease publishes, if its BackendData is sound for the VNI of `cfg`.
pub fn mac(cfg: &VxlanConfig, p: &Lease) -> Result<Mac, Error> {
    vtep_mac(cfg, p, p.backend_data.as_ref(), "BackendData")
}

/// The VTEP MAC of `flannel-v6.<VNI>` a dual-stack vxlan lease publishes, if its BackendV6Data
/// is there and sound for the VNI of `cfg`.
pub fn mac6(cfg: &VxlanConfig, p: &Lease) -> Result<Mac, Error> {
    let data = p.ipv6.as_ref().and_then(|v6| v6.backend_data.as_ref());
    vtep_mac(cfg, p, data, "BackendV6Data")
}

/// `data` (the lease's `field`), flannel's `{"VNI":…,"VtepMAC":"…"}`, read for the VNI of `cfg`.
fn vtep_mac(
    cfg: &VxlanConfig,
    p: &Lease,
    data: Option<&BackendData>,
    field: &str,
) -> Result<Mac, Error> {
    let data = data
        .ok_or_else(|| bad(p, format!("no {field}")))?
        .value()
        .ok_or_else(|| bad(p, format!("{field} is not JSON")))?;
    let vni = data.get("VNI").and_then(Value::as_u64);
    if vni != Some(u64::from(cfg.vni)) {
        return Err(bad(
            p,
            format!("{field} VNI {vni:?}, this network uses {}", cfg.vni),
        ));
    }
    let mac = data
        .get("VtepMAC")
        .and_then(Value::as_str)
        .ok_or_else(|| bad(p, format!("{field} has no VtepMAC")))?;
    let mac: Mac = mac.parse().map_err(|e| bad(p, format!("{field}: {e}")))?;
    if !mac.is_unicast() {
        return Err(bad(
            p,
            format!("{field} VtepMAC {mac} is not a unicast address"),
        ));
    }
    Ok(mac)
}

pub fn bad(p: &Lease, reason: String) -> Error {
    bad_subnet(p.subnet, reason)
}

pub fn bad_subnet(subnet: Ipv4Net, reason: String) -> Error {
    Error::BadPeer {
        subnet: subnet.to_string(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BackendConfig, LeaseV6};
    use serde_json::json;

    fn cfg(v: Value) -> VxlanConfig {
        let map = match v {
            Value::Object(m) => m,
            _ => Default::default(),
        };
        VxlanConfig::parse(&BackendConfig::new(map)).expect("valid")
    }

    fn net() -> Network {
        crate::testing::network(true, true, 1500)
    }

    /// Host `n`'s dual-stack vxlan lease: VTEP MACs 02::n (IPv4) and 06::n (IPv6).
    fn lease(n: u8) -> Lease {
        let data = |b: u8| json!({"VNI": 1, "VtepMAC": format!("0{b}:00:00:00:00:{n:02x}")});
        Lease {
            subnet: format!("10.60.{n}.0/24").parse().expect("subnet"),
            public_ip: format!("10.199.0.{n}").parse().expect("ip"),
            backend_type: "vxlan".into(),
            backend_data: Some(data(2).into()),
            ipv6: Some(LeaseV6 {
                subnet: format!("fd00:60:0:{n:x}::/64").parse().expect("subnet"),
                public_ip: Some(format!("fd00:199::{n:x}").parse().expect("ip")),
                backend_data: Some(data(6).into()),
            }),
        }
    }

    fn mac(b: u8, n: u8) -> Mac {
        Mac([b, 0, 0, 0, 0, n])
    }

    const V6: Local<'static> = Local {
        connected: &[],
        connected6: &[],
        v6: true,
    };

    fn judged(p: &Lease, local: &Local<'_>) -> Result<PeerPlan, Error> {
        judge(&cfg(json!({})), &net(), Some(&lease(11)), local, p)
    }

    #[test]
    fn a_dual_stack_peer_is_reached_through_both_devices() {
        let plan = judged(&lease(12), &V6).expect("a peer");
        let six = Plan6::Overlay {
            subnet: "fd00:60:0:c::/64".parse().expect("subnet"),
            mac: mac(6, 12),
            public_ip: "fd00:199::c".parse().expect("ip"),
        };
        assert_eq!(
            plan,
            PeerPlan {
                v4: Plan::Overlay {
                    mac: mac(2, 12),
                    public_ip: "10.199.0.12".parse().expect("ip"),
                },
                v6: Some(six),
            }
        );
        let (dev, dev6, eth0): (Arc<str>, Arc<str>, Arc<str>) =
            ("flannel.1".into(), "flannel-v6.1".into(), "eth0".into());
        let r4 = route(lease(12).subnet, plan.v4, (7, &dev), (2, &eth0));
        let r6 = route6(six, (8, &dev6), (2, &eth0));
        assert_eq!(
            [r4.to_string(), r6.to_string()],
            [
                "10.60.12.0/24 via 10.60.12.0 dev flannel.1 onlink",
                "fd00:60:0:c::/64 via fd00:60:0:c:: dev flannel-v6.1 onlink"
            ]
        );
        assert_eq!((r6.oif, r6.dst.to_string()), (8, "fd00:60:0:c::/64".into()));
    }

    #[test]
    fn a_dual_stack_peers_ipv6_neighbour_and_fdb_entry_are_wanted_beside_its_ipv4_ones() {
        let (net, own, peers) = (net(), lease(11), [lease(12)]);
        let subnet = peers[0].subnet;
        let host = Host {
            net: &net,
            own: &own,
            device: Some(7),
            device6: Some(8),
            connected: &[],
            connected6: &[],
        };
        let ip = |s: &str| s.parse::<std::net::IpAddr>().expect("ip");
        let want = desired(&cfg(json!({})), &host, &peers).expect("desired");
        assert_eq!(
            want.neighbours,
            [
                (subnet, ip("10.60.12.0"), mac(2, 12)),
                (subnet, ip("fd00:60:0:c::"), mac(6, 12)),
            ]
        );
        assert_eq!(
            want.fdb,
            [
                (subnet, mac(2, 12), ip("10.199.0.12")),
                (subnet, mac(6, 12), ip("fd00:199::c")),
            ]
        );
        assert_eq!(want.routes.len(), 2);
        // Without flannel-v6.1 there is no IPv6 route into it, but what it must hold is the same.
        let host = Host {
            device6: None,
            ..host
        };
        let want = desired(&cfg(json!({})), &host, &peers).expect("desired");
        assert_eq!((want.neighbours.len(), want.fdb.len()), (2, 2));
        assert_eq!(want.routes.len(), 1);
    }

    #[test]
    fn without_every_part_of_the_ipv6_side_a_peer_is_reached_over_ipv4_alone() {
        let v4_only = |p: &Lease, local: &Local<'_>| judged(p, local).expect("a peer").v6;
        // This host carries no IPv6 (no IPv6 underlay address).
        assert_eq!(v4_only(&lease(12), &Local::default()), None);
        // An IPv4-only lease.
        let bare = Lease {
            ipv6: None,
            ..lease(12)
        };
        assert_eq!(v4_only(&bare, &V6), None);
        // No PublicIPv6: its IPv6 subnet is unreachable from here.
        let mut no_ip = lease(12);
        if let Some(v6) = no_ip.ipv6.as_mut() {
            v6.public_ip = None;
        }
        assert_eq!(v4_only(&no_ip, &V6), None);
        // A PublicIPv6 but no BackendV6Data (a weft host with no IPv6 underlay address).
        let mut no_data = lease(12);
        if let Some(v6) = no_data.ipv6.as_mut() {
            v6.backend_data = None;
        }
        assert_eq!(v4_only(&no_data, &V6), None);
    }

    #[test]
    fn a_bad_ipv6_side_refuses_the_whole_peer() {
        let with_data = |d: BackendData| {
            let mut p = lease(12);
            if let Some(v6) = p.ipv6.as_mut() {
                v6.backend_data = Some(d);
            }
            p
        };
        for (data, why) in [
            (
                json!({"VNI": 2, "VtepMAC": "06:00:00:00:00:0c"}),
                "BackendV6Data VNI",
            ),
            (json!({"VNI": 1}), "BackendV6Data has no VtepMAC"),
            (
                json!({"VNI": 1, "VtepMAC": "zz"}),
                "BackendV6Data: invalid MAC",
            ),
            (
                json!({"VNI": 1, "VtepMAC": "01:00:5e:00:00:01"}),
                "not a unicast",
            ),
        ] {
            let e = judged(&with_data(data.into()), &V6).expect_err(why);
            assert!(
                matches!(&e, Error::BadPeer { subnet, .. } if subnet == "10.60.12.0/24"),
                "{e}"
            );
            assert!(e.to_string().contains(why), "{why}: {e}");
        }
        let e = judged(&with_data(BackendData::from_json("{\"VNI\"")), &V6).expect_err("junk");
        assert!(e.to_string().contains("BackendV6Data is not JSON"), "{e}");
        // peer::check_v6's rules: outside the IPv6 network, this host's own PublicIPv6.
        let mut outside = lease(12);
        if let Some(v6) = outside.ipv6.as_mut() {
            v6.subnet = "fd00:61:0:c::/64".parse().expect("subnet");
        }
        assert!(judged(&outside, &V6).is_err());
        let mut mine = lease(12);
        if let Some(v6) = mine.ipv6.as_mut() {
            v6.public_ip = Some("fd00:199::11".parse().expect("ip"));
        }
        assert!(judged(&mine, &V6).is_err());
        // With IPv6 off on this host, the IPv6 side is not looked at.
        assert!(judged(&with_data(json!({"VNI": 2}).into()), &Local::default()).is_ok());
    }

    #[test]
    fn direct_routing_reaches_a_peer_on_a_connected_ipv6_network_via_its_public_ipv6() {
        let connected6: Vec<Ipv6Net> = vec!["fd00:199::/64".parse().expect("net")];
        let local = Local {
            connected6: &connected6,
            ..V6
        };
        let plan = judged(&lease(12), &local).expect("a peer");
        // Each family on its own: IPv4's network is not connected here.
        assert!(matches!(plan.v4, Plan::Overlay { .. }), "{plan:?}");
        let six = plan.v6.expect("an IPv6 side");
        assert!(matches!(six, Plan6::Direct { .. }), "{six:?}");
        let (dev6, eth0): (Arc<str>, Arc<str>) = ("flannel-v6.1".into(), "eth0".into());
        assert_eq!(
            route6(six, (8, &dev6), (2, &eth0)).to_string(),
            "fd00:60:0:c::/64 via fd00:199::c dev eth0"
        );
        // Direct needs no BackendV6Data, as direct IPv4 needs no BackendData.
        let mut no_data = lease(12);
        if let Some(v6) = no_data.ipv6.as_mut() {
            v6.backend_data = Some(json!({}).into());
        }
        assert!(judged(&no_data, &local).is_ok());
    }
}
