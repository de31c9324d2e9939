//! Choosing the underlay interface the way flanneld does: -iface (name or address, first match wins),
//! else -iface-regex (matched against names and addresses), else -iface-can-reach (the interface
//! and source address of the kernel's route to that address), else the interface of the default
//! route.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt;
use regex::Regex;
use rtnetlink::packet_route::address::{AddressAttribute, AddressHeaderFlags, AddressScope};
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::packet_route::route::RouteAttribute;
use rtnetlink::Handle;

use crate::Error;

/// The chosen underlay: where peers send this host's traffic.
#[derive(Debug, Clone, PartialEq)]
pub struct ExternalInterface {
    pub name: String,
    pub index: u32,
    /// The interface's own IPv4 address (the source of encapsulated traffic).
    pub iface_addr: Ipv4Addr,
    /// The address peers use to reach this host: -public-ip, else `iface_addr`.
    pub public_ip: Ipv4Addr,
    /// The interface's first global IPv6 address, if it has one.
    pub iface_addr6: Option<Ipv6Addr>,
    /// Where peers reach this host's IPv6 subnet: -public-ipv6, else `iface_addr6`.
    pub public_ipv6: Option<Ipv6Addr>,
    pub mtu: u32,
}

/// The -iface, -iface-regex, -iface-can-reach and -public-ip flags.
#[derive(Debug, Clone, Default)]
pub struct InterfaceSelector {
    pub ifaces: Vec<String>,
    pub regexes: Vec<Regex>,
    pub can_reach: Option<Ipv4Addr>,
    pub public_ip: Option<Ipv4Addr>,
    pub public_ipv6: Option<Ipv6Addr>,
}

struct Link {
    name: String,
    index: u32,
    mtu: u32,
    addrs: Vec<Ipv4Addr>,
    /// Global-scope IPv6 addresses (not link-local, not failed duplicate detection).
    addrs6: Vec<Ipv6Addr>,
}

impl InterfaceSelector {
    /// Finds the interface in the current network namespace.
    pub async fn select(&self) -> Result<ExternalInterface, Error> {
        let handle = crate::netlink::connect()?;
        let links = list_links(&handle).await?;
        let (link, addr) = self.choose(&links, &handle).await?;
        let addr6 = link.addrs6.first().copied();
        Ok(ExternalInterface {
            name: link.name.clone(),
            index: link.index,
            iface_addr: addr,
            public_ip: self.public_ip.unwrap_or(addr),
            iface_addr6: addr6,
            public_ipv6: self.public_ipv6.or(addr6),
            mtu: link.mtu,
        })
    }

    async fn choose<'a>(
        &self,
        links: &'a [Link],
        handle: &Handle,
    ) -> Result<(&'a Link, Ipv4Addr), Error> {
        for want in &self.ifaces {
            if let Ok(ip) = want.parse::<Ipv4Addr>() {
                if let Some(l) = links.iter().find(|l| l.addrs.contains(&ip)) {
                    return Ok((l, ip));
                }
            } else if let Ok(ip) = want.parse::<Ipv6Addr>() {
                // As flanneld: an IPv6 address names its interface, whose IPv4 address is used.
                if let Some(l) = links.iter().find(|l| l.addrs6.contains(&ip)) {
                    return Ok((l, first_addr(l)?));
                }
            } else if let Some(l) = links.iter().find(|l| &l.name == want) {
                return Ok((l, first_addr(l)?));
            }
        }
        if !self.ifaces.is_empty() {
            return Err(Error::NoInterface(format!(
                "-iface {}",
                self.ifaces.join(",")
            )));
        }
        for re in &self.regexes {
            for l in links {
                if re.is_match(&l.name) {
                    if let Ok(a) = first_addr(l) {
                        return Ok((l, a));
                    }
                }
                if let Some(a) = l.addrs.iter().find(|a| re.is_match(&a.to_string())) {
                    return Ok((l, *a));
                }
            }
        }
        if !self.regexes.is_empty() {
            let pats: Vec<&str> = self.regexes.iter().map(Regex::as_str).collect();
            return Err(Error::NoInterface(format!(
                "-iface-regex {}",
                pats.join(",")
            )));
        }
        if let Some(target) = self.can_reach {
            let what = || format!("-iface-can-reach {target}");
            let (index, src) = route_to(handle, target).await?;
            let l = links
                .iter()
                .find(|l| l.index == index)
                .ok_or_else(|| Error::NoInterface(what()))?;
            // The route's preferred source, as flanneld takes it; else the link's first address.
            let addr = match src {
                Some(a) if l.addrs.contains(&a) => a,
                _ => first_addr(l)?,
            };
            return Ok((l, addr));
        }
        let index = default_route_link(handle).await?;
        let l = links
            .iter()
            .find(|l| l.index == index)
            .ok_or_else(|| Error::NoInterface("the default route".into()))?;
        Ok((l, first_addr(l)?))
    }
}

fn first_addr(l: &Link) -> Result<Ipv4Addr, Error> {
    l.addrs.first().copied().ok_or_else(|| Error::NoAddress {
        name: l.name.clone(),
    })
}

async fn list_links(handle: &Handle) -> Result<Vec<Link>, Error> {
    let msgs: Vec<LinkMessage> = handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(Error::netlink("list links"))?;
    let mut links: Vec<Link> = msgs
        .iter()
        .map(|m| Link {
            index: m.header.index,
            name: m
                .attributes
                .iter()
                .find_map(|a| match a {
                    LinkAttribute::IfName(n) => Some(n.clone()),
                    _ => None,
                })
                .unwrap_or_default(),
            mtu: m
                .attributes
                .iter()
                .find_map(|a| match a {
                    LinkAttribute::Mtu(n) => Some(*n),
                    _ => None,
                })
                .unwrap_or(1500),
            addrs: Vec::new(),
            addrs6: Vec::new(),
        })
        .collect();
    let mut addrs = handle.address().get().execute();
    while let Some(m) = addrs
        .try_next()
        .await
        .map_err(Error::netlink("list addresses"))?
    {
        let Some(link) = links.iter_mut().find(|l| l.index == m.header.index) else {
            continue;
        };
        let global = m.header.scope == AddressScope::Universe
            && !m.header.flags.contains(AddressHeaderFlags::Dadfailed);
        for a in &m.attributes {
            match a {
                AddressAttribute::Local(IpAddr::V4(ip)) => link.addrs.push(*ip),
                // IPv6 addresses come as IFA_ADDRESS alone.
                AddressAttribute::Address(IpAddr::V6(ip)) if global && is_unicast_host6(*ip) => {
                    link.addrs6.push(*ip)
                }
                _ => {}
            }
        }
    }
    Ok(links)
}

/// The output interface of the IPv4 default route in the main table.
/// The kernel's answer to "how would you send to `target`" (`ip route get`): the outgoing
/// interface and the source address it would use.
async fn route_to(handle: &Handle, target: Ipv4Addr) -> Result<(u32, Option<Ipv4Addr>), Error> {
    let msg = rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(target, 32)
        .build();
    let routes: Vec<_> = handle
        .route()
        .get(msg)
        .execute()
        .try_collect()
        .await
        .map_err(Error::netlink(format!("look up the route to {target}")))?;
    let found = routes.iter().find_map(|r| {
        let oif = r.attributes.iter().find_map(|a| match a {
            RouteAttribute::Oif(i) => Some(*i),
            _ => None,
        })?;
        let src = r.attributes.iter().find_map(|a| match a {
            RouteAttribute::PrefSource(rtnetlink::packet_route::route::RouteAddress::Inet(ip)) => {
                Some(*ip)
            }
            _ => None,
        });
        Some((oif, src))
    });
    found.ok_or_else(|| Error::NoInterface(format!("-iface-can-reach {target} (no route)")))
}

async fn default_route_link(handle: &Handle) -> Result<u32, Error> {
    crate::routes::list_main(handle)
        .await?
        .iter()
        .filter(|r| r.header.destination_prefix_length == 0)
        .find_map(|r| {
            r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Oif(i) => Some(*i),
                _ => None,
            })
        })
        .ok_or_else(|| Error::NoInterface("the default route (there is none)".into()))
}

/// Whether `ip` can be another host's address on the underlay: a unicast host address, so not
/// 0.0.0.0/8 ("this network"), loopback, multicast, or 240.0.0.0/4 (reserved, with the broadcast
/// address 255.255.255.255). A peer's PublicIP outside this would make weft send to everyone, to
/// nobody, or to itself.
pub fn is_unicast_host(ip: Ipv4Addr) -> bool {
    let first = ip.octets()[0];
    first != 0 && !ip.is_loopback() && !ip.is_multicast() && first < 240
}

/// Whether `ip` can be another host's IPv6 address on the underlay: not unspecified, loopback,
/// multicast, link-local (a route through it would need an interface too) or IPv4-mapped.
pub fn is_unicast_host6(ip: Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    !ip.is_unspecified()
        && !ip.is_loopback()
        && !ip.is_multicast()
        && first & 0xffc0 != 0xfe80
        && ip.to_ipv4_mapped().is_none()
}

/// Every IPv4 address of every interface in this network namespace: a peer lease whose PublicIP
/// is one of them would route this host's traffic back to itself.
pub async fn local_ipv4_addrs() -> Result<HashSet<Ipv4Addr>, Error> {
    let all = local_addrs().await?;
    Ok(all
        .into_iter()
        .filter_map(|a| match a {
            IpAddr::V4(a) => Some(a),
            IpAddr::V6(_) => None,
        })
        .collect())
}

/// Every address, IPv4 and IPv6, of every interface in this network namespace.
pub async fn local_addrs() -> Result<HashSet<IpAddr>, Error> {
    let handle = crate::netlink::connect()?;
    let mut addrs = handle.address().get().execute();
    let mut out = HashSet::new();
    while let Some(m) = addrs
        .try_next()
        .await
        .map_err(Error::netlink("list addresses"))?
    {
        for a in &m.attributes {
            match a {
                AddressAttribute::Local(ip @ IpAddr::V4(_)) => out.insert(*ip),
                AddressAttribute::Address(ip @ IpAddr::V6(_)) => out.insert(*ip),
                _ => false,
            };
        }
    }
    Ok(out)
}

#[cfg(test)]
mod unicast_tests {
    use super::is_unicast_host;

    #[test]
    fn only_unicast_host_addresses_can_be_a_peers_public_ip() {
        for good in [
            "10.199.0.12",
            "192.168.64.3",
            "1.1.1.1",
            "169.254.1.1",
            "223.255.255.254",
        ] {
            assert!(is_unicast_host(good.parse().expect("address")), "{good}");
        }
        for bad in [
            "0.0.0.0",
            "0.1.2.3",
            "127.0.0.1",
            "127.8.9.10",
            "224.0.0.1",
            "239.255.255.255",
            "240.0.0.1",
            "255.255.255.255",
        ] {
            assert!(!is_unicast_host(bad.parse().expect("address")), "{bad}");
        }
    }

    #[test]
    fn only_unicast_ipv6_host_addresses_can_be_a_peers_public_ipv6() {
        use super::is_unicast_host6;
        for good in ["fd00:199::12", "2001:db8::1", "fec0::1"] {
            assert!(is_unicast_host6(good.parse().expect("address")), "{good}");
        }
        for bad in [
            "::",
            "::1",
            "ff02::1",
            "fe80::1",
            "febf::1",
            "::ffff:10.0.0.1",
        ] {
            assert!(!is_unicast_host6(bad.parse().expect("address")), "{bad}");
        }
    }
}
