//! The vxlan device's neighbour table (peer network address → peer VTEP MAC) and forwarding
//! database (peer VTEP MAC → peer public IP). Both are managed only on weft's own `flannel.<VNI>`
//! device, and only their permanent entries, which are the ones weft writes; whatever the kernel
//! learns there itself is left alone. The device is the instance's own (one VNI, one device), so a
//! second weftd on the host, serving another network with another VNI, never sees these entries.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use rtnetlink::packet_core::{NLM_F_APPEND, NLM_F_CREATE};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::RouteType;
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::Handle;
use tracing::debug;

use crate::mac::Mac;
use crate::{netlink, Error, ErrorList};

/// One permanent entry: for ARP `ip → mac`, for the FDB `mac → ip` (the remote VTEP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub ip: Ipv4Addr,
    pub mac: Mac,
}

/// Which table of the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// `ip neigh … dev flannel.N nud permanent`
    Arp,
    /// `bridge fdb … dev flannel.N dst <ip> self permanent`
    Fdb,
}

impl Table {
    fn family(self) -> AddressFamily {
        match self {
            Self::Arp => AddressFamily::Inet,
            Self::Fdb => AddressFamily::Bridge,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Arp => "neighbour",
            Self::Fdb => "fdb entry",
        }
    }
}

/// Makes the permanent entries of `table` on device `ifindex` exactly `desired`.
pub async fn reconcile(
    handle: &Handle,
    table: Table,
    ifindex: u32,
    desired: &[Entry],
) -> ErrorList {
    let mut errs = ErrorList::default();
    let mut present = match list(handle, table, ifindex).await {
        Ok(p) => p,
        Err(e) => {
            errs.push(e);
            return errs;
        }
    };
    let mut missing = Vec::new();
    for want in desired {
        match present.iter().position(|p| p == want) {
            Some(i) => {
                present.swap_remove(i);
            }
            None => missing.push(*want),
        }
    }
    debug!(
        table = table.name(),
        missing = missing.len(),
        extra = present.len(),
        "neighbour diff"
    );
    // Add before deleting so that a peer whose entry changes is never left without one.
    for e in &missing {
        if let Err(source) = add(handle, table, ifindex, e).await {
            errs.push(Error::Netlink {
                context: format!("add {} {} → {}", table.name(), e.ip, e.mac),
                source,
            });
        } else {
            debug!(table = table.name(), ip = %e.ip, mac = %e.mac, "added");
        }
    }
    for e in &present {
        // An ARP replace may already have overwritten it.
        if table == Table::Arp && missing.iter().any(|m| m.ip == e.ip) {
            continue;
        }
        match delete(handle, table, ifindex, e).await {
            Ok(()) => debug!(table = table.name(), ip = %e.ip, mac = %e.mac, "removed"),
            Err(err) if netlink::is_gone(&err) => {}
            Err(source) => errs.push(Error::Netlink {
                context: format!("delete {} {} → {}", table.name(), e.ip, e.mac),
                source,
            }),
        }
    }
    errs
}

async fn list(handle: &Handle, table: Table, ifindex: u32) -> Result<Vec<Entry>, Error> {
    let msgs: Vec<NeighbourMessage> = handle
        .neighbours()
        .get()
        .set_address_family(table.family())
        .execute()
        .try_collect()
        .await
        .map_err(Error::netlink(format!("list {}s", table.name())))?;
    Ok(msgs
        .iter()
        .filter(|m| m.header.ifindex == ifindex && m.header.state == NeighbourState::Permanent)
        .filter(|m| m.header.family == table.family())
        .filter_map(|m| {
            let mut ip = None;
            let mut mac = None;
            for a in &m.attributes {
                match a {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(i)) => ip = Some(*i),
                    // AF_BRIDGE dumps are not decoded by address family: four bytes are IPv4.
                    NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => {
                        ip = <[u8; 4]>::try_from(b.as_slice()).ok().map(Ipv4Addr::from)
                    }
                    NeighbourAttribute::LinkLayerAddress(l) => mac = Mac::from_slice(l),
                    _ => {}
                }
            }
            Some(Entry { ip: ip?, mac: mac? })
        })
        .collect())
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
        .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(
            e.ip,
        )));
    m
}

async fn add(
    handle: &Handle,
    table: Table,
    ifindex: u32,
    e: &Entry,
) -> Result<(), rtnetlink::Error> {
    match table {
        Table::Arp => {
            handle
                .neighbours()
                .add(ifindex, IpAddr::V4(e.ip))
                .link_layer_address(&e.mac.0)
                .replace()
                .execute()
                .await
        }
        // APPEND adds a remote to the MAC's list (REPLACE would rewrite the first one): the
        // superseded remote is deleted right after, so traffic never lacks a destination.
        Table::Fdb => {
            let msg = RouteNetlinkMessage::NewNeighbour(message(table, ifindex, e));
            netlink::request(handle, msg, NLM_F_CREATE | NLM_F_APPEND).await
        }
    }
}

async fn delete(
    handle: &Handle,
    table: Table,
    ifindex: u32,
    e: &Entry,
) -> Result<(), rtnetlink::Error> {
    handle
        .neighbours()
        .del(message(table, ifindex, e))
        .execute()
        .await
}
