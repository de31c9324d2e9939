//! Which WireGuard runs a device (`flannel-wg`, `flannel-wg-v6`): the kernel's, when `ip link
//! add type wireguard` works; weft's userspace one (a TUN device) when the kernel has no
//! WireGuard.

use futures::TryStreamExt;
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use rtnetlink::{Handle, LinkUnspec, LinkWireguard};
use tracing::info;

use crate::error::errno;
use crate::Error;

/// What `flannel-wg` is, if it exists.
#[derive(Debug, PartialEq, Eq)]
pub struct Existing {
    pub index: u32,
    pub kind: Option<InfoKind>,
    pub mtu: Option<u32>,
    pub up: bool,
}

/// The data path a host can have.
#[derive(Debug, PartialEq, Eq)]
pub enum Found {
    /// A kernel WireGuard device, with its index.
    Kernel(u32),
    /// The kernel has no WireGuard, or `flannel-wg` is weft's userspace TUN device (its index,
    /// when it exists).
    Userspace(Option<u32>),
}

/// Whether the kernel's answer to creating a link of kind `wireguard` means it has no WireGuard:
/// no module for the kind (EOPNOTSUPP, as `ip link add type wireguard` reports "Unknown device
/// type"), or a kernel without the family at all.
pub fn lacks_wireguard(errno: i32) -> bool {
    matches!(
        errno,
        libc::EOPNOTSUPP | libc::ENODEV | libc::EAFNOSUPPORT | libc::EPROTONOSUPPORT
    )
}

/// Looks the device `name` up.
pub async fn find(handle: &Handle, name: &str) -> Result<Option<Existing>, Error> {
    let mut req = handle.link().get().match_name(name.to_string()).execute();
    match req.try_next().await {
        Ok(m) => Ok(m.map(|m| describe(&m))),
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
        Err(source) => Err(Error::Netlink {
            context: format!("look up {name}"),
            source,
        }),
    }
}

fn describe(m: &LinkMessage) -> Existing {
    let mut e = Existing {
        index: m.header.index,
        kind: None,
        mtu: None,
        up: m.header.flags.contains(LinkFlags::Up),
    };
    for a in &m.attributes {
        match a {
            LinkAttribute::Mtu(n) => e.mtu = Some(*n),
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    if let LinkInfo::Kind(k) = i {
                        e.kind = Some(k.clone());
                    }
                }
            }
            _ => {}
        }
    }
    e
}

/// Which path an existing device `name` stands for, or why weft cannot use it.
pub fn judge(name: &str, e: &Existing) -> Result<Found, Error> {
    match &e.kind {
        Some(InfoKind::Wireguard) => Ok(Found::Kernel(e.index)),
        Some(InfoKind::Tun) => Ok(Found::Userspace(Some(e.index))),
        other => Err(Error::Other(format!(
            "{name} already exists and is a {} device, neither WireGuard nor TUN; weft leaves \
             it alone: remove it (`ip link del {name}`) or stop what owns it",
            other
                .as_ref()
                .map_or("plain".to_string(), |k| k.to_string())
        ))),
    }
}

/// Finds or makes the kernel's device `name` with `mtu`, up; [`Found::Userspace`] when the
/// kernel cannot make one.
pub async fn ensure(handle: &Handle, name: &str, mtu: u32) -> Result<Found, Error> {
    let existing = match find(handle, name).await? {
        Some(e) => e,
        None => {
            let msg = LinkWireguard::new(name).mtu(mtu).up().build();
            match handle.link().add(msg).execute().await {
                Ok(()) => info!(device = name, mtu, "kernel WireGuard device created"),
                Err(e) if errno(&e).is_some_and(lacks_wireguard) => {
                    info!(device = name, error = %e,
                          "the kernel has no WireGuard: using weft's userspace WireGuard");
                    return Ok(Found::Userspace(None));
                }
                Err(source) => {
                    return Err(Error::Netlink {
                        context: format!("create {name} (type wireguard)"),
                        source,
                    })
                }
            }
            find(handle, name)
                .await?
                .ok_or_else(|| Error::Other(format!("{name} vanished right after creation")))?
        }
    };
    let found = judge(name, &existing)?;
    if found == Found::Kernel(existing.index) && (existing.mtu != Some(mtu) || !existing.up) {
        let set = LinkUnspec::new_with_index(existing.index).mtu(mtu).up();
        handle
            .link()
            .set(set.build())
            .execute()
            .await
            .map_err(Error::netlink(format!("set {name} up with MTU {mtu}")))?;
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kernel_without_wireguard_means_userspace() {
        assert!(lacks_wireguard(libc::EOPNOTSUPP));
        assert!(lacks_wireguard(libc::ENODEV));
        assert!(
            !lacks_wireguard(libc::EPERM),
            "no permission is an error, not a fallback"
        );
        assert!(!lacks_wireguard(libc::EEXIST));
    }

    #[test]
    fn an_existing_device_is_used_by_its_kind() {
        let e = |kind| Existing {
            index: 9,
            kind,
            mtu: Some(1420),
            up: true,
        };
        assert_eq!(
            judge("flannel-wg", &e(Some(InfoKind::Wireguard))).ok(),
            Some(Found::Kernel(9))
        );
        assert_eq!(
            judge("flannel-wg", &e(Some(InfoKind::Tun))).ok(),
            Some(Found::Userspace(Some(9)))
        );
        let err = judge("flannel-wg", &e(Some(InfoKind::Dummy))).expect_err("not ours");
        assert!(err.to_string().contains("ip link del flannel-wg"), "{err}");
        assert!(judge("flannel-wg", &e(None)).is_err());
    }
}
