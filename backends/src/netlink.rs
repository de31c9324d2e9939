//! One place that opens rtnetlink connections, and the plain requests on a device a backend
//! needs (its deletion, its address).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressHeaderFlags, AddressMessage};
use rtnetlink::Handle;

use tracing::info;

use crate::error::is_gone;
use crate::Error;

/// Opens a route-netlink socket in the current network namespace and drives it on the runtime.
pub fn connect() -> Result<Handle, Error> {
    let (conn, handle, _) =
        rtnetlink::new_connection().map_err(Error::io("open netlink socket"))?;
    tokio::spawn(conn);
    Ok(handle)
}

/// Deletes the link called `name` if there is one (its addresses, routes, neighbours and FDB
/// entries go with it). For a backend's own device only: callers name what they created.
pub async fn delete_link(name: &str) -> Result<bool, Error> {
    let handle = connect()?;
    let mut found = handle.link().get().match_name(name.to_string()).execute();
    let index = match found.try_next().await {
        Ok(Some(m)) => m.header.index,
        Ok(None) => return Ok(false),
        Err(e) if is_gone(&e) => return Ok(false),
        Err(e) => return Err(Error::netlink(format!("look up {name}"))(e)),
    };
    match handle.link().del(index).execute().await {
        Ok(()) => {
            info!(device = name, "device removed");
            Ok(true)
        }
        Err(e) if is_gone(&e) => Ok(false),
        Err(e) => Err(Error::netlink(format!("delete {name}"))(e)),
    }
}

/// Makes `addr`/32 the only IPv4 address of device `index` (`name` for messages): flannel gives
/// its vxlan and udp devices the lease's network address.
pub async fn ensure_address(
    handle: &Handle,
    index: u32,
    name: &str,
    addr: Ipv4Addr,
) -> Result<(), Error> {
    ensure_only(handle, index, name, Family::V4, Some(IpAddr::V4(addr))).await
}

/// Makes `addr`/128 the only global IPv6 address of device `index` (`name` for messages), or with
/// `None` leaves it none: flannel gives its IPv6 vxlan device the IPv6 lease's network address.
/// Link-local addresses are the kernel's and stay.
pub async fn ensure_address6(
    handle: &Handle,
    index: u32,
    name: &str,
    addr: Option<Ipv6Addr>,
) -> Result<(), Error> {
    ensure_only(handle, index, name, Family::V6, addr.map(IpAddr::V6)).await
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

/// Makes `want` (a host address: /32, /128) the only address of `family` on device `index`,
/// IPv6's link-local ones aside.
async fn ensure_only(
    handle: &Handle,
    index: u32,
    name: &str,
    family: Family,
    want: Option<IpAddr>,
) -> Result<(), Error> {
    let msgs: Vec<AddressMessage> = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await
        .map_err(Error::netlink(format!("list addresses of {name}")))?;
    let full = if family == Family::V4 { 32 } else { 128 };
    let mut have = false;
    for m in msgs {
        // IPv4 addresses are read from IFA_LOCAL; IPv6 ones come as IFA_ADDRESS alone.
        let local = m.attributes.iter().find_map(|a| match (family, a) {
            (Family::V4, AddressAttribute::Local(ip @ IpAddr::V4(_))) => Some(*ip),
            (Family::V6, AddressAttribute::Address(ip @ IpAddr::V6(v6)))
                if v6.segments()[0] & 0xffc0 != 0xfe80 =>
            {
                Some(*ip)
            }
            _ => None,
        });
        let Some(local) = local else { continue };
        if Some(local) == want && m.header.prefix_len == full {
            have = true;
            continue;
        }
        info!(device = name, address = %local, "removing stale address");
        handle
            .address()
            .del(m)
            .execute()
            .await
            .map_err(Error::netlink(format!("delete {local} from {name}")))?;
    }
    if let (false, Some(addr)) = (have, want) {
        let mut add = handle.address().add(index, addr, full);
        if family == Family::V6 {
            // Duplicate detection has no one to ask on a device whose multicast goes nowhere
            // (no all-zeros FDB entry): it would only keep the address tentative for a second.
            add.message_mut().header.flags |= AddressHeaderFlags::Nodad;
        }
        add.execute()
            .await
            .map_err(Error::netlink(format!("add {addr}/{full} to {name}")))?;
        info!(device = name, address = %addr, "address set");
    }
    Ok(())
}
