//! Choosing the underlay interface the way flanneld does: -iface (name or address, first match wins),
//! else -iface-regex (matched against names and addresses), else -iface-can-reach (the interface
//! and source address of the kernel's route to that address), else the interface of the default
//! route.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use regex::Regex;
use rtnetlink::packet_route::address::AddressAttribute;
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
    pub mtu: u32,
}

/// The -iface, -iface-regex, -iface-can-reach and -public-ip flags.
#[derive(Debug, Clone, Default)]
pub struct InterfaceSelector {
    pub ifaces: Vec<String>,
    pub regexes: Vec<Regex>,
    pub can_reach: Option<Ipv4Addr>,
    pub public_ip: Option<Ipv4Addr>,
}

struct Link {
    name: String,
    index: u32,
    mtu: u32,
    addrs: Vec<Ipv4Addr>,
}

impl InterfaceSelector {
    /// Finds the interface in the current network namespace.
    pub async fn select(&self) -> Result<ExternalInterface, Error> {
        let handle = crate::netlink::connect()?;
        let links = list_links(&handle).await?;
        let (link, addr) = self.choose(&links, &handle).await?;
        Ok(ExternalInterface {
            name: link.name.clone(),
            index: link.index,
            iface_addr: addr,
            public_ip: self.public_ip.unwrap_or(addr),
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
        for a in &m.attributes {
            if let AddressAttribute::Local(IpAddr::V4(ip)) = a {
                link.addrs.push(*ip);
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

/// Every IPv4 address of every interface in this network namespace: a peer lease whose PublicIP
/// is one of them would route this host's traffic back to itself.
pub async fn local_ipv4_addrs() -> Result<HashSet<Ipv4Addr>, Error> {
    let handle = crate::netlink::connect()?;
    let mut addrs = handle.address().get().execute();
    let mut out = HashSet::new();
    while let Some(m) = addrs
        .try_next()
        .await
        .map_err(Error::netlink("list addresses"))?
    {
        for a in &m.attributes {
            if let AddressAttribute::Local(IpAddr::V4(ip)) = a {
                out.insert(*ip);
            }
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
}
