//! The `flannel.<VNI>` device, and `flannel-v6.<VNI>` on a dual-stack host: created with exactly
//! the attributes flanneld sets (VNI, underlay device, local address of the device's family, port
//! if configured, learning, GBP), so the kernel's defaults for checksums, offloads and GRO are the
//! same as under flanneld. A device with other settings is replaced; one with the right settings
//! is kept, with its MAC.

use std::net::IpAddr;

use futures::TryStreamExt;
use rtnetlink::packet_route::link::{
    InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use rtnetlink::{Handle, LinkUnspec, LinkVxlan};
use tracing::{debug, info, warn};

use super::config::VxlanConfig;
use super::ethtool;
use crate::error::errno;
use crate::mac::Mac;
use crate::Error;

/// Where a device's tunnels start: the underlay's index and this host's address on it, IPv4
/// for `flannel.<VNI>`, IPv6 for `flannel-v6.<VNI>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Underlay {
    pub index: u32,
    pub local: IpAddr,
}

/// What the kernel says about an existing device of our name.
#[derive(Debug)]
pub struct Existing {
    pub index: u32,
    pub mac: Option<Mac>,
    pub mtu: Option<u32>,
    pub up: bool,
    /// Whether it is a vxlan device with the settings we would create.
    pub compatible: bool,
}

/// The device weft wants.
pub struct Spec<'a> {
    pub name: String,
    pub cfg: &'a VxlanConfig,
    pub underlay: Underlay,
    pub mac: Mac,
    pub mtu: u32,
}

/// Looks the device up by name.
pub async fn find(
    handle: &Handle,
    name: &str,
    cfg: &VxlanConfig,
    underlay: Underlay,
) -> Result<Option<Existing>, Error> {
    let mut req = handle.link().get().match_name(name).execute();
    let msg = match req.try_next().await {
        Ok(m) => m,
        Err(e) if errno(&e) == Some(libc::ENODEV) => None,
        Err(e) => {
            return Err(Error::Netlink {
                context: format!("look up {name}"),
                source: e,
            })
        }
    };
    Ok(msg.map(|m| describe(&m, cfg, underlay)))
}

fn describe(m: &LinkMessage, cfg: &VxlanConfig, underlay: Underlay) -> Existing {
    let mut e = Existing {
        index: m.header.index,
        mac: None,
        mtu: None,
        up: m.header.flags.contains(LinkFlags::Up),
        compatible: false,
    };
    let mut vxlan: Option<&[InfoVxlan]> = None;
    for a in &m.attributes {
        match a {
            LinkAttribute::Address(b) => e.mac = Mac::from_slice(b),
            LinkAttribute::Mtu(n) => e.mtu = Some(*n),
            LinkAttribute::LinkInfo(infos) => {
                let is_vxlan = infos
                    .iter()
                    .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Vxlan)));
                for i in infos {
                    if let (true, LinkInfo::Data(InfoData::Vxlan(d))) = (is_vxlan, i) {
                        vxlan = Some(d);
                    }
                }
            }
            _ => {}
        }
    }
    if let Some(d) = vxlan {
        let has = |want: &InfoVxlan| d.contains(want);
        let local = match underlay.local {
            IpAddr::V4(a) => InfoVxlan::Local(a),
            IpAddr::V6(a) => InfoVxlan::Local6(a),
        };
        e.compatible = has(&InfoVxlan::Id(cfg.vni))
            && has(&InfoVxlan::Link(underlay.index))
            && has(&local)
            && has(&InfoVxlan::Port(cfg.effective_port()))
            && has(&InfoVxlan::Learning(cfg.learning))
            && d.iter().any(|i| matches!(i, InfoVxlan::Gbp)) == cfg.gbp
            && !d
                .iter()
                .any(|i| matches!(i, InfoVxlan::CollectMetadata(true)));
    }
    e
}

/// Makes the device exist, with `spec`'s settings, MAC and MTU, up, and with the checksum
/// offload the config asks for. Returns its index.
pub async fn ensure(handle: &Handle, spec: &Spec<'_>) -> Result<u32, Error> {
    let index = ensure_link(handle, spec).await?;
    ensure_tx_checksum(spec)?;
    if spec.underlay.local.is_ipv6() {
        no_router_advertisements(&spec.name);
    }
    Ok(index)
}

/// `accept_ra` 0 on the device, as flanneld sets it: nothing on the overlay advertises routes.
/// Best effort, as flanneld's: a host without the sysctl (or a read-only /proc/sys) does without.
fn no_router_advertisements(name: &str) {
    let path = format!("/proc/sys/net/ipv6/conf/{name}/accept_ra");
    if std::fs::read_to_string(&path).is_ok_and(|v| v.trim() == "0") {
        return;
    }
    if let Err(e) = std::fs::write(&path, "0") {
        debug!(device = name, error = %e, "accept_ra left as it is");
    }
}

/// `TxChecksumOffload`: sets `tx-checksum-ip-generic` when it differs from the option. Checked
/// at every reconcile, since nothing announces an `ethtool -K` by netlink.
fn ensure_tx_checksum(spec: &Spec<'_>) -> Result<(), Error> {
    let Some(want) = spec.cfg.tx_checksum_offload else {
        return Ok(());
    };
    let feature = ethtool::TX_CHECKSUM_IP_GENERIC;
    let ctx = || format!("{feature} of {}", spec.name);
    if ethtool::feature(&spec.name, feature).map_err(Error::io(ctx()))? == Some(want) {
        return Ok(());
    }
    ethtool::set_feature(&spec.name, feature, want).map_err(Error::io(ctx()))?;
    let state = if want { "on" } else { "off" };
    info!(device = %spec.name, "{feature} turned {state} (TxChecksumOffload)");
    Ok(())
}

async fn ensure_link(handle: &Handle, spec: &Spec<'_>) -> Result<u32, Error> {
    let ctx = |what: &str| format!("{what} {}", spec.name);
    match find(handle, &spec.name, spec.cfg, spec.underlay).await? {
        Some(e) if e.compatible => {
            let mut set = LinkUnspec::new_with_index(e.index);
            let mut changed = false;
            if e.mac != Some(spec.mac) {
                set = set.address(spec.mac.0.to_vec());
                changed = true;
            }
            if e.mtu != Some(spec.mtu) {
                set = set.mtu(spec.mtu);
                changed = true;
            }
            if !e.up {
                set = set.up();
                changed = true;
            }
            if changed {
                debug!(device = %spec.name, "updating MAC/MTU/state");
                handle
                    .link()
                    .set(set.build())
                    .execute()
                    .await
                    .map_err(Error::netlink(ctx("update")))?;
            }
            Ok(e.index)
        }
        Some(e) => {
            warn!(device = %spec.name, "existing device has other vxlan settings; replacing it");
            handle
                .link()
                .del(e.index)
                .execute()
                .await
                .map_err(Error::netlink(ctx("delete incompatible")))?;
            create(handle, spec).await
        }
        None => create(handle, spec).await,
    }
}

async fn create(handle: &Handle, spec: &Spec<'_>) -> Result<u32, Error> {
    let mut b = LinkVxlan::new(&spec.name, spec.cfg.vni).dev(spec.underlay.index);
    b = match spec.underlay.local {
        IpAddr::V4(a) => b.local(a),
        IpAddr::V6(a) => b.local6(a),
    };
    b = b.learning(spec.cfg.learning);
    if spec.cfg.port != 0 {
        b = b.port(spec.cfg.port);
    }
    if spec.cfg.gbp {
        b = b.gbp();
    }
    let msg = b.mtu(spec.mtu).address(spec.mac.0.to_vec()).up().build();
    handle
        .link()
        .add(msg)
        .execute()
        .await
        .map_err(Error::netlink(format!("create {}", spec.name)))?;
    info!(device = %spec.name, vni = spec.cfg.vni, mac = %spec.mac, mtu = spec.mtu, "vxlan device created");
    find(handle, &spec.name, spec.cfg, spec.underlay)
        .await?
        .map(|e| e.index)
        .ok_or_else(|| Error::Other(format!("{} vanished right after creation", spec.name)))
}
