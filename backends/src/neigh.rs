//! The vxlan devices' neighbour tables (peer network address → peer VTEP MAC) and forwarding
//! databases (peer VTEP MAC → peer public IP). Both are managed only on weft's own devices
//! (`flannel.<VNI>`, with IPv4 neighbours and remotes; `flannel-v6.<VNI>` on a dual-stack host, with
//! IPv6 ones), and only their permanent entries, which are the ones weft writes; whatever the
//! kernel learns there itself is left alone. The devices are the instance's own (one VNI, one
//! device per family), so a second weftd on the host, serving another network with another VNI,
//! never sees these entries.

use std::collections::HashSet;
use std::net::IpAddr;

use futures::TryStreamExt;
use rtnetlink::packet_core::{NLM_F_CREATE, NLM_F_REPLACE};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::RouteType;
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::Handle;
use tracing::debug;

use crate::batch::Batch;
use crate::error::is_gone;
use crate::mac::Mac;
use crate::{Error, ErrorList};

/// One permanent entry: for ARP and NDP `ip → mac`, for the FDB `mac → ip` (the remote VTEP).
/// The address is of the device's family: IPv4 on `flannel.<VNI>`, IPv6 on `flannel-v6.<VNI>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Entry {
    pub ip: IpAddr,
    pub mac: Mac,
}

/// Which table of the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// `ip neigh … dev flannel.N nud permanent`
    Arp,
    /// `ip -6 neigh … dev flannel-v6.N nud permanent`
    Ndp,
    /// `bridge fdb … dev flannel.N dst <ip> self permanent` (either family's remotes)
    Fdb,
}

impl Table {
    fn family(self) -> AddressFamily {
        match self {
            Self::Arp => AddressFamily::Inet,
            Self::Ndp => AddressFamily::Inet6,
            Self::Fdb => AddressFamily::Bridge,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Arp => "neighbour",
            Self::Ndp => "IPv6 neighbour",
            Self::Fdb => "fdb entry",
        }
    }

    /// Whether entries are keyed by address (a neighbour) rather than by MAC (an FDB entry).
    fn by_address(self) -> bool {
        self != Self::Fdb
    }
}

/// Makes the permanent entries of `table` on device `ifindex` exactly `desired`.
pub async fn reconcile(
    handle: &Handle,
    batch: &Batch,
    table: Table,
    ifindex: u32,
    desired: &[Entry],
) -> ErrorList {
    let mut errs = ErrorList::default();
    let present: HashSet<Entry> = match list(handle, table, ifindex).await {
        Ok(p) => p.into_iter().collect(),
        Err(e) => {
            errs.push(e);
            return errs;
        }
    };
    let wanted: HashSet<Entry> = desired.iter().copied().collect();
    let missing: Vec<Entry> = wanted.difference(&present).copied().collect();
    // A replace overwrites the entry of the same key (ARP: the address; FDB: the MAC): no
    // delete needed for it.
    let key = |e: &Entry| match table.by_address() {
        true => (Some(e.ip), None),
        false => (None, Some(e.mac)),
    };
    let replaced: HashSet<_> = missing.iter().map(key).collect();
    let extra: Vec<Entry> = present
        .difference(&wanted)
        .filter(|e| !replaced.contains(&key(e)))
        .copied()
        .collect();
    debug!(
        table = table.name(),
        missing = missing.len(),
        extra = extra.len(),
        "neighbour diff"
    );
    // Add before deleting so that a peer whose entry changes is never left without one.
    errs.0
        .extend(add_all(batch, table, ifindex, &missing).await.0);
    errs.0
        .extend(delete_all(batch, table, ifindex, &extra).await.0);
    errs
}

/// Adds or replaces `entries`. A replace points an FDB entry's MAC at its new remote in one
/// step, so traffic never lacks a destination. (APPEND adds remotes only to the all-zeros and
/// multicast entries; on a unicast MAC it is a no-op, and deleting the old remote then removed
/// the entry.)
pub async fn add_all(batch: &Batch, table: Table, ifindex: u32, entries: &[Entry]) -> ErrorList {
    send_all(batch, table, ifindex, entries, true).await
}

/// Deletes `entries` (those already gone are fine).
pub async fn delete_all(batch: &Batch, table: Table, ifindex: u32, entries: &[Entry]) -> ErrorList {
    send_all(batch, table, ifindex, entries, false).await
}

/// Adds (or replaces) or deletes `entries`, one request each.
async fn send_all(
    batch: &Batch,
    table: Table,
    ifindex: u32,
    entries: &[Entry],
    add: bool,
) -> ErrorList {
    let requests = entries.iter().map(|e| {
        let m = message(table, ifindex, e);
        Some(match add {
            true => (
                RouteNetlinkMessage::NewNeighbour(m),
                NLM_F_CREATE | NLM_F_REPLACE,
            ),
            false => (RouteNetlinkMessage::DelNeighbour(m), 0),
        })
    });
    let (done, verb) = if add {
        ("added", "add")
    } else {
        ("removed", "delete")
    };
    let mut errs = ErrorList::default();
    for (e, r) in entries.iter().zip(batch.send(requests).await) {
        match r {
            Ok(()) => debug!(table = table.name(), ip = %e.ip, mac = %e.mac, "{done}"),
            Err(err) if !add && is_gone(&err) => {}
            Err(source) => errs.push(Error::Netlink {
                context: format!("{verb} {} {} → {}", table.name(), e.ip, e.mac),
                source,
            }),
        }
    }
    errs
}

/// The permanent entries of `table` on device `ifindex`. Read as the dump streams in: only
/// the entries are kept, never the whole dump's messages (30,000 of them at 10,000 peers).
async fn list(handle: &Handle, table: Table, ifindex: u32) -> Result<Vec<Entry>, Error> {
    handle
        .neighbours()
        .get()
        .set_address_family(table.family())
        .execute()
        .try_filter_map(|m| async move { Ok(entry(&m, table, ifindex)) })
        .try_collect()
        .await
        .map_err(Error::netlink(format!("list {}s", table.name())))
}

/// `m` as an entry of `table` on `ifindex`, if it is a permanent one there.
fn entry(m: &NeighbourMessage, table: Table, ifindex: u32) -> Option<Entry> {
    let h = &m.header;
    if h.ifindex != ifindex || h.family != table.family() {
        return None;
    }
    let (_, ip, mac) = permanent_entry(m)?;
    Some(Entry { ip, mac })
}

/// A permanent neighbour (ARP or NDP) or FDB entry of a dump, as `(ifindex, address, MAC)`; for
/// the FDB the address is the remote VTEP's (IPv4 on `flannel.<VNI>`, IPv6 on
/// `flannel-v6.<VNI>`). Anything else (learned, incomplete): `None`.
pub fn permanent_entry(m: &NeighbourMessage) -> Option<(u32, IpAddr, Mac)> {
    if m.header.state != NeighbourState::Permanent {
        return None;
    }
    let mut ip = None;
    let mut mac = None;
    for a in &m.attributes {
        match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(i)) => ip = Some((*i).into()),
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(i)) => ip = Some((*i).into()),
            // AF_BRIDGE dumps are not decoded by address family: the length tells.
            NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => {
                ip = match b.len() {
                    4 => <[u8; 4]>::try_from(b.as_slice()).ok().map(IpAddr::from),
                    16 => <[u8; 16]>::try_from(b.as_slice()).ok().map(IpAddr::from),
                    _ => None,
                }
            }
            NeighbourAttribute::LinkLayerAddress(l) => mac = Mac::from_slice(l),
            _ => {}
        }
    }
    Some((m.header.ifindex, ip?, mac?))
}

fn message(table: Table, ifindex: u32, e: &Entry) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = table.family();
    m.header.ifindex = ifindex;
    m.header.state = NeighbourState::Permanent;
    m.header.kind = RouteType::Unspec;
    if table == Table::Fdb {
        // NTF_SELF: the entry belongs to the vxlan device itself, not to a bridge above it.
        m.header.flags = NeighbourFlags::Own;
    }
    m.attributes
        .push(NeighbourAttribute::LinkLayerAddress(e.mac.0.to_vec()));
    m.attributes
        .push(NeighbourAttribute::Destination(e.ip.into()));
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dumped(family: AddressFamily, dst: NeighbourAddress) -> NeighbourMessage {
        let mut m = NeighbourMessage::default();
        m.header.family = family;
        m.header.ifindex = 7;
        m.header.state = NeighbourState::Permanent;
        m.attributes.push(NeighbourAttribute::Destination(dst));
        m.attributes
            .push(NeighbourAttribute::LinkLayerAddress(vec![2, 0, 0, 0, 0, 9]));
        m
    }

    #[test]
    fn entries_of_both_families_are_read_for_the_backend_and_for_doctor() {
        let mac = Mac([2, 0, 0, 0, 0, 9]);
        let v6: std::net::Ipv6Addr = "fd00:10:199::12".parse().expect("ip");
        let ndp = dumped(AddressFamily::Inet6, NeighbourAddress::Inet6(v6));
        assert_eq!(
            entry(&ndp, Table::Ndp, 7),
            Some(Entry { ip: v6.into(), mac })
        );
        assert_eq!(entry(&ndp, Table::Arp, 7), None, "another family's table");
        // An FDB entry with an IPv6 remote: sixteen undecoded bytes.
        let fdb = dumped(
            AddressFamily::Bridge,
            NeighbourAddress::Other(v6.octets().to_vec()),
        );
        assert_eq!(
            entry(&fdb, Table::Fdb, 7),
            Some(Entry { ip: v6.into(), mac })
        );
        assert_eq!(entry(&fdb, Table::Fdb, 8), None, "another device's");
        assert_eq!(permanent_entry(&fdb), Some((7, v6.into(), mac)));
        assert_eq!(permanent_entry(&ndp), Some((7, v6.into(), mac)));
        let v4 = dumped(
            AddressFamily::Bridge,
            NeighbourAddress::Other(vec![10, 0, 0, 1]),
        );
        assert_eq!(
            permanent_entry(&v4),
            Some((7, std::net::Ipv4Addr::new(10, 0, 0, 1).into(), mac))
        );
    }

    #[test]
    fn a_request_names_the_entrys_own_family() {
        let e = Entry {
            ip: "fd00::1".parse().expect("ip"),
            mac: Mac([2, 0, 0, 0, 0, 1]),
        };
        let m = message(Table::Fdb, 3, &e);
        assert!(m
            .attributes
            .contains(&NeighbourAttribute::Destination(NeighbourAddress::Inet6(
                "fd00::1".parse().expect("ip")
            ))));
        assert_eq!(
            message(Table::Ndp, 3, &e).header.family,
            AddressFamily::Inet6
        );
    }
}
