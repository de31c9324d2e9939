//! What vxlan wants in the kernel for one peer, judged from its lease and this host alone
//! (pure): the backend's reconcile and `weftctl doctor` both work from it.

use std::sync::Arc;

use ipnet::Ipv4Net;
use serde_json::Value;

use super::plan::Plan;
use super::VxlanConfig;
use crate::mac::Mac;
use crate::peer;
use crate::plane::{Desired, Host};
use crate::routes::RouteSpec;
use crate::{DataPlane, Error, Lease, Network};

/// Where `p` goes: directly on the underlay (DirectRouting, a peer on a connected network), or
/// through the overlay to its VTEP MAC; or why it is no peer.
pub fn judge(
    cfg: &VxlanConfig,
    net: &Network,
    own: Option<&Lease>,
    connected: &[Ipv4Net],
    p: &Lease,
) -> Result<Plan, Error> {
    peer::check(net, own, p)?;
    if connected.iter().any(|n| n.contains(&p.public_ip)) {
        return Ok(Plan::Direct {
            public_ip: p.public_ip,
        });
    }
    Ok(Plan::Overlay {
        mac: mac(cfg, p)?,
        public_ip: p.public_ip,
    })
}

/// The route of a peer: into the device (`index`, name) through the overlay, or on the
/// underlay.
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

/// Everything vxlan wants for `peers` on `host`: per overlay peer a neighbour, an FDB entry
/// and a route through the device; per direct peer a route on the underlay.
pub fn desired(cfg: &VxlanConfig, host: &Host<'_>, peers: &[Lease]) -> Result<Desired, Error> {
    let name: Arc<str> = cfg.device_name().into();
    let index = host
        .device
        .ok_or_else(|| Error::NoInterface(name.to_string()))?;
    let ext = &host.net.external;
    let underlay: Arc<str> = ext.name.as_str().into();
    let connected = if cfg.direct_routing {
        host.connected
    } else {
        &[]
    };
    let mut want = Desired::default();
    for p in peers
        .iter()
        .filter(|p| peer::same_type(p, super::Vxlan::TYPE))
    {
        let plan = match judge(cfg, host.net, Some(host.own), connected, p) {
            Ok(plan) => plan,
            Err(e) => {
                want.refused.push((p.subnet, e));
                continue;
            }
        };
        if let Plan::Overlay { mac, public_ip } = plan {
            want.neighbours.push((p.subnet, p.subnet.network(), mac));
            want.fdb.push((p.subnet, mac, public_ip));
        }
        let r = route(p.subnet, plan, (index, &name), (ext.index, &underlay));
        want.routes.push((Some(p.subnet), r));
    }
    Ok(want)
}

/// The VTEP MAC a vxlan lease publishes, if its BackendData is sound for the VNI of `cfg`.
pub fn mac(cfg: &VxlanConfig, p: &Lease) -> Result<Mac, Error> {
    let data = p
        .backend_data
        .as_ref()
        .ok_or_else(|| bad(p, "no BackendData".into()))?
        .value()
        .ok_or_else(|| bad(p, "BackendData is not JSON".into()))?;
    let vni = data.get("VNI").and_then(Value::as_u64);
    if vni != Some(u64::from(cfg.vni)) {
        return Err(bad(
            p,
            format!("BackendData VNI {vni:?}, this network uses {}", cfg.vni),
        ));
    }
    let mac = data
        .get("VtepMAC")
        .and_then(Value::as_str)
        .ok_or_else(|| bad(p, "BackendData has no VtepMAC".into()))?;
    let mac: Mac = mac.parse().map_err(|e| bad(p, format!("{e}")))?;
    if !mac.is_unicast() {
        return Err(bad(p, format!("VtepMAC {mac} is not a unicast address")));
    }
    Ok(mac)
}

pub fn bad(p: &Lease, reason: String) -> Error {
    Error::BadPeer {
        subnet: p.subnet.to_string(),
        reason,
    }
}
