//! `device`, `peers` and `routes`: the kernel state weftd keeps, compared with what it should
//! be. The desired peers come from the leases through the same pure peer set weftd uses
//! ([`crate::peers::PeerSet`]), and each backend's objects per peer are computed as the backend
//! computes them, so a healthy host reads exactly as weftd left it.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr};

use ipnet::{IpNet, Ipv4Net};
use weft_backends::mac::Mac;
use weft_backends::{ExternalInterface, Host, Network, RouteSpec, RTPROT_WEFT};

use super::facts::{
    device6_name, device_name, network, network6, Cluster, Facts, Kernel, Route, Store,
};
use super::lease::{held, own_key, own_subnet};
use super::{Finding, Outcome};
use crate::config::NetworkConfig;
use crate::lease::Lease;
use crate::peers::{Ipv6Scope, Own, PeerSet};
use crate::status::EnvView;

const RTPROT_KERNEL: u8 = 2;
const RTPROT_BOOT: u8 = 3;

/// What the kernel-state checks need.
pub(super) struct Ctx<'a> {
    pub(super) k: &'a Kernel,
    pub(super) config: &'a NetworkConfig,
    cluster: &'a Cluster,
    env: &'a EnvView,
    ext: &'a ExternalInterface,
    pub(super) backend: String,
}

pub(super) fn ctx(f: &Facts) -> Result<Ctx<'_>, Outcome> {
    let Ok(k) = &f.kernel else {
        return Err(Outcome::skip("needs netlink"));
    };
    let Store::Read(cluster) = &f.store else {
        return Err(Outcome::skip(format!("needs {}", f.store_name())));
    };
    let Ok(config) = &cluster.config else {
        return Err(Outcome::skip("needs the network config"));
    };
    let Ok(env) = &f.env else {
        return Err(Outcome::skip("needs subnet.env"));
    };
    let Ok(ext) = &f.external else {
        return Err(Outcome::skip("needs the underlay interface"));
    };
    Ok(Ctx {
        k,
        config,
        cluster,
        env,
        ext,
        backend: config.backend.type_name(),
    })
}

const RECONCILE: &str = "weftd programs it at every reconcile (within 30 s): make sure weftd \
                         runs, and look for `reconcile:` errors in its log";

/// `device`: the backend's device exists, is up and has the lease's network address.
pub fn device(f: &Facts) -> Outcome {
    let c = match ctx(f) {
        Ok(c) => c,
        Err(o) => return o,
    };
    let Some(dev) = device_name(c.config) else {
        return Outcome::skip(format!("the backend {} has no device", c.backend));
    };
    let Some(link) = c.k.link(&dev) else {
        return vec![Finding::new(
            format!("{dev} does not exist: nothing carries traffic to the other hosts"),
            "start weftd (it creates the device), and look at its log if it runs",
        )]
        .into();
    };
    let mut out = Vec::new();
    let kinds = weft_backends::kind(&c.backend).map_or(&[][..], |k| k.device_kinds);
    if !kinds.is_empty() && !kinds.contains(&link.kind.as_str()) {
        out.push(Finding::new(
            format!(
                "{dev} is a {} device, not {}",
                or_dash(&link.kind),
                kinds.join(" or ")
            ),
            format!("delete it (`ip link del {dev}`) and restart weftd, which creates its own"),
        ));
    }
    if !link.up {
        out.push(Finding::new(format!("{dev} is down"), RECONCILE));
    }
    let subnet = own_subnet(f).unwrap_or(c.env.subnet);
    let addr = Ipv4Net::new(subnet.network(), 32).unwrap_or_default();
    if !link.addrs.contains(&addr) {
        out.push(Finding::new(
            format!("{dev} lacks the address {addr} (its lease's network address)"),
            RECONCILE,
        ));
    }
    out.into()
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() {
        "plain"
    } else {
        s
    }
}

/// Whether the kernel's route `r` is `want` as weft installs it (a `RouteSpec` prints as
/// `ip route` writes it).
fn matches(want: &RouteSpec, r: &Route) -> bool {
    // The kernel gives an IPv6 route without a metric 1024.
    let metric = if r.dst.addr().is_ipv6() { 1024 } else { 0 };
    r.dst == want.dst
        && r.gateway == want.gateway
        && r.oif == Some(want.oif)
        && r.onlink == want.onlink
        && r.unicast
        && r.metric == metric
}

/// Whether `dst` lies inside the network `c` configures, of its family.
fn inside(c: &crate::config::NetworkConfig, dst: IpNet) -> bool {
    match dst {
        IpNet::V4(d) => c.network.contains(&d),
        IpNet::V6(d) => c.ipv6.is_some_and(|p| p.network.contains(&d)),
    }
}

/// `r` as `ip route` prints it.
fn describe(k: &Kernel, r: &Route) -> String {
    let mut s = String::new();
    if !r.unicast {
        s.push_str("(not unicast) ");
    }
    s.push_str(&r.dst.to_string());
    if let Some(g) = r.gateway {
        s.push_str(&format!(" via {g}"));
    }
    if r.oif.is_some() {
        s.push_str(&format!(" dev {}", k.name_of(r.oif)));
    }
    if r.onlink {
        s.push_str(" onlink");
    }
    let proto = match r.protocol {
        RTPROT_KERNEL => "kernel".to_string(),
        RTPROT_BOOT => "boot".to_string(),
        p => p.to_string(),
    };
    s.push_str(&format!(" proto {proto}"));
    if r.metric != 0 {
        s.push_str(&format!(" metric {}", r.metric));
    }
    s
}

/// The peers weftd would program: the leases its peer set accepts.
pub(super) fn desired_peers(f: &Facts, c: &Ctx<'_>, own: &Lease) -> Vec<Lease> {
    let own = Own {
        ipv6_subnet: own.ipv6_subnet,
        key: own_key(f, c.cluster, own.subnet),
        subnet: own.subnet,
        identity: own.identity(),
        identity6: own.identity6(),
    };
    let mut local: HashSet<Ipv4Addr> = c.k.local_addrs.clone();
    local.extend([c.ext.public_ip, c.ext.iface_addr]);
    if let Some(p) = f.public_ip_flag {
        local.insert(p);
    }
    let local = local.into_iter().map(IpAddr::V4).collect();
    let scope = c.config.ipv6.map(|p| Ipv6Scope {
        network: p.network,
        subnet_len: p.subnet_len,
    });
    let mut set = PeerSet::new(c.config.network, c.config.subnet_len, own, local).with_ipv6(scope);
    set.replace_all(c.cluster.records.iter().cloned());
    set.peers().map(|(_, l)| l.clone()).collect()
}

/// `peers`: every peer's route (and, for vxlan, neighbour and FDB entry; its IPv6 side's on
/// flannel-v6.<VNI>) as weft programs it, and nothing of weft's left for a peer that is gone. What the backend wants comes from the
/// backend itself ([`weft_backends::DataPlane::desired`]), as its reconcile computes it.
pub fn peers(f: &Facts) -> Outcome {
    let c = match ctx(f) {
        Ok(c) => c,
        Err(o) => return o,
    };
    let Some(own) = held(f) else {
        return Outcome::skip("needs this host's lease (see `lease`)");
    };
    let Some(kind) = weft_backends::kind(&c.backend) else {
        return Outcome::skip(format!("the backend {} is unknown", c.backend));
    };
    let peers = desired_peers(f, &c, own);
    let mut out = other_types(&c, &peers);
    let k = c.k;
    let dev = device_name(c.config);
    let dev_index = dev.as_ref().and_then(|d| k.link(d)).map(|l| l.index);
    if let (Some(d), None) = (&dev, dev_index) {
        return Outcome::skip(format!("no {d} (see `device`)"));
    }
    let net = Network {
        network: c.config.network,
        network_v6: c.config.ipv6.map(|p| p.network),
        external: c.ext.clone(),
    };
    let (connected, connected6) = (k.connected(c.ext.index), k.connected6(c.ext.index));
    let own = own.to_backend();
    // A dual-stack backend's IPv6 device (vxlan's flannel-v6.<VNI>).
    let dev6 = device6_name(c.config);
    let dev6_index = dev6.as_ref().and_then(|d| k.link(d)).map(|l| l.index);
    let host = Host {
        net: &net,
        own: &own,
        device: dev_index,
        device6: dev6_index,
        connected: &connected,
        connected6: &connected6,
    };
    let peers: Vec<_> = peers.iter().map(Lease::to_backend).collect();
    let want = match (kind.desired)(&c.config.backend, &host, &peers) {
        Ok(Some(want)) => want,
        Ok(None) => return Outcome::skip(format!("the backend {} programs no peers", c.backend)),
        Err(e) => return Outcome::skip(format!("what the backend wants: {e}")),
    };
    let label = |subnet: Option<Ipv4Net>| match subnet {
        None => "the network".to_string(),
        Some(s) => {
            let ip = peers.iter().find(|p| p.subnet == s).map(|p| p.public_ip);
            ip.map_or_else(|| format!("peer {s}"), |ip| format!("peer {s} ({ip})"))
        }
    };
    for (subnet, e) in &want.refused {
        let why = match e {
            weft_backends::Error::BadPeer { reason, .. } => reason.clone(),
            other => other.to_string(),
        };
        out.push(Finding::new(
            format!(
                "{}: weft programs nothing for it: {why}",
                label(Some(*subnet))
            ),
            "every host of a network must run its backend with the same options: restart the \
             agent on that host (the network config changed while it ran?)",
        ));
    }
    let routes: Vec<(String, &RouteSpec)> =
        (want.routes.iter()).map(|(s, r)| (label(*s), r)).collect();
    // Each device holds the entries of its family: flannel.<VNI> IPv4 ones, flannel-v6.<VNI>
    // IPv6 ones.
    for (v6, dev, index) in [(false, &dev, dev_index), (true, &dev6, dev6_index)] {
        let neigh: Vec<_> = (want.neighbours.iter())
            .filter(|(_, ip, _)| ip.is_ipv6() == v6)
            .map(|(s, ip, mac)| (label(Some(*s)), *ip, *mac))
            .collect();
        let fdb: Vec<_> = (want.fdb.iter())
            .filter(|(_, _, ip)| ip.is_ipv6() == v6)
            .map(|(s, mac, ip)| (label(Some(*s)), *mac, *ip))
            .collect();
        match (index, dev) {
            (Some(index), Some(dev)) => {
                compare_neighbours(k, (index, dev, v6), &neigh, &fdb, &mut out);
            }
            // Only the IPv6 device can be missing here: without the IPv4 one the check skipped.
            (None, Some(dev)) if !neigh.is_empty() => out.push(Finding::new(
                format!(
                    "{dev} does not exist: the peers' IPv6 subnets are unreachable through the \
                     overlay"
                ),
                "start weftd (it creates the device when the underlay has a global IPv6 \
                 address), and look at its log if it runs",
            )),
            _ => {}
        }
    }
    compare_routes(k, &c, dev_index, &routes, &mut out);
    out.into()
}

/// Peers of another backend type than this network's: weft (like flannel) sends them nothing.
fn other_types(c: &Ctx<'_>, peers: &[Lease]) -> Vec<Finding> {
    let label = |p: &Lease| format!("peer {} ({})", p.subnet, p.attrs.public_ip);
    let same_type = |p: &Lease| {
        let t = &p.attrs.backend_type;
        *t == c.backend || (c.backend == "udp" && t.is_empty())
    };
    (peers.iter().filter(|p| !same_type(p)))
        .map(|p| {
            Finding::new(
                format!(
                    "{} runs backend {}, this network {}: weft (like flannel) sends it nothing",
                    label(p),
                    or_dash(&p.attrs.backend_type),
                    c.backend
                ),
                "every host of a network must run its backend: restart the agent on that host \
                 (the network config changed while it ran?)",
            )
        })
        .collect()
}

fn compare_routes(
    k: &Kernel,
    c: &Ctx<'_>,
    dev_index: Option<u32>,
    routes: &[(String, &RouteSpec)],
    out: &mut Vec<Finding>,
) {
    for (label, want) in routes {
        let have: Vec<&Route> = k.routes.iter().filter(|r| r.dst == want.dst).collect();
        if have.iter().any(|r| matches(want, r)) {
            continue;
        }
        let problem = match have.first() {
            None => format!("{label}: no route to {} (want `{want}`)", want.dst),
            Some(r) => format!(
                "{label}: the route to {} is `{}`, not `{want}`",
                want.dst,
                describe(k, r)
            ),
        };
        out.push(Finding::new(problem, RECONCILE));
    }
    // weft's own routes (protocol 87 into its network or its device) that no peer wants.
    for r in &k.routes {
        let owned = r.protocol == RTPROT_WEFT
            && (inside(c.config, r.dst) || (r.oif.is_some() && r.oif == dev_index));
        if owned && !routes.iter().any(|(_, w)| w.dst == r.dst) {
            out.push(Finding::new(
                format!("route `{}` is weft's but no peer wants it", describe(k, r)),
                "weftd removes it at its next reconcile: make sure it runs",
            ));
        }
    }
}

/// The permanent neighbours of family `v6` and the FDB entries on one vxlan device (its index
/// and name) against what is wanted there.
fn compare_neighbours(
    k: &Kernel,
    (index, dev, v6): (u32, &str, bool),
    neigh: &[(String, IpAddr, Mac)],
    fdb: &[(String, Mac, IpAddr)],
    out: &mut Vec<Finding>,
) {
    // weftd keeps only its device's family's table (ARP on flannel.<VNI>, NDP on
    // flannel-v6.<VNI>): a permanent entry of the other family there is not its own.
    let have_neigh: Vec<_> = (k.neighbours.iter())
        .filter(|n| n.ifindex == index && n.ip.is_ipv6() == v6)
        .collect();
    for (label, ip, mac) in neigh {
        match have_neigh.iter().find(|n| n.ip == *ip) {
            Some(n) if n.mac == *mac => {}
            Some(n) => out.push(Finding::new(
                format!(
                    "{label}: the neighbour {ip} on {dev} is {}, not its VtepMAC {mac}",
                    n.mac
                ),
                RECONCILE,
            )),
            None => out.push(Finding::new(
                format!("{label}: no neighbour {ip} → {mac} on {dev}"),
                RECONCILE,
            )),
        }
    }
    for n in &have_neigh {
        if !neigh.iter().any(|(_, ip, _)| *ip == n.ip) {
            out.push(Finding::new(
                format!(
                    "neighbour {} → {} on {dev} is weft's but no peer wants it",
                    n.ip, n.mac
                ),
                "weftd removes it at its next reconcile: make sure it runs",
            ));
        }
    }
    let have_fdb: Vec<_> = k.fdb.iter().filter(|e| e.ifindex == index).collect();
    for (label, mac, ip) in fdb {
        let of_mac: Vec<_> = have_fdb.iter().filter(|e| e.mac == *mac).collect();
        if of_mac.iter().any(|e| e.dst == *ip) {
            continue;
        }
        let problem = match of_mac.first() {
            None => format!("{label}: no FDB entry {mac} → {ip} on {dev}"),
            Some(e) => format!(
                "{label}: the FDB entry of {mac} on {dev} sends to {}, not {ip}",
                e.dst
            ),
        };
        out.push(Finding::new(problem, RECONCILE));
    }
    for e in &have_fdb {
        if !fdb.iter().any(|(_, mac, _)| *mac == e.mac) {
            out.push(Finding::new(
                format!(
                    "FDB entry {} → {} on {dev} is weft's but no peer wants it",
                    e.mac, e.dst
                ),
                "weftd removes it at its next reconcile: make sure it runs",
            ));
        }
    }
}

/// `routes`: nothing but weft (and the local bridge's own connected route) routes addresses
/// inside the cluster network; anything else takes traffic meant for the overlay.
pub fn foreign_routes(f: &Facts) -> Outcome {
    let Ok(k) = &f.kernel else {
        return Outcome::skip("needs netlink");
    };
    let Some(network) = network(f) else {
        return Outcome::skip(format!(
            "needs the network ({} or subnet.env)",
            f.store_name()
        ));
    };
    let own = own_subnet(f).map(IpNet::V4);
    // The IPv6 side of a dual-stack network: its network, and this host's IPv6 subnet
    // (subnet.env's, whose bridge holds its first address).
    let network6 = network6(f);
    let own6 = (f.env.as_ref().ok())
        .and_then(|e| e.ipv6.as_ref())
        .and_then(|(_, s)| s.parse::<ipnet::Ipv6Net>().ok())
        .map(|n| IpNet::V6(n.trunc()));
    let mut out = Vec::new();
    for r in &k.routes {
        let inside = match r.dst {
            IpNet::V4(d) => network.contains(&d),
            IpNet::V6(d) => network6.is_some_and(|n| n.contains(&d)),
        };
        // This host's bridge's prefix route; on IPv6 also the vxlan device's /128 in its lease.
        let own_bridge = Some(r.dst) == own || own6.is_some_and(|o| o.contains(&r.dst));
        let bridge_of_lease = own_bridge && r.protocol == RTPROT_KERNEL;
        if !inside || r.protocol == RTPROT_WEFT || bridge_of_lease {
            continue;
        }
        let dev = k.name_of(r.oif);
        let fix = if r.protocol == RTPROT_BOOT && dev.starts_with("flannel") {
            "a flanneld's route (proto boot): stop flanneld (`systemctl disable --now \
             flanneld`); weftd takes over routes identical to its own"
                .to_string()
        } else if r.protocol == RTPROT_KERNEL {
            format!(
                "{dev} still has an address in the cluster network (an old lease?): restart \
                 what owns it (Docker for docker0) or remove the address"
            )
        } else {
            format!(
                "remove it (`ip route del {}`) and whatever adds it (a VPN, a second agent, a \
                 static route)",
                r.dst
            )
        };
        out.push(Finding::new(
            format!(
                "route `{}` (not weft's) lies inside the cluster network {}: it takes traffic \
                 meant for the overlay",
                describe(k, r),
                match r.dst {
                    IpNet::V4(_) => network.to_string(),
                    IpNet::V6(_) => network6.map(|n| n.to_string()).unwrap_or_default(),
                }
            ),
            fix,
        ));
    }
    out.into()
}

#[cfg(test)]
mod tests {
    use super::super::facts::Neighbour;
    use super::super::testing::{self, kernel, problems_of, route, MAC2};
    use super::*;

    fn texts(o: Outcome) -> Vec<String> {
        problems_of(o).into_iter().map(|f| f.problem).collect()
    }

    #[test]
    fn a_healthy_host_has_each_peers_route_neighbour_and_fdb_entry() {
        let f = testing::healthy();
        assert_eq!(texts(device(&f)), Vec::<String>::new());
        assert_eq!(texts(peers(&f)), Vec::<String>::new());
        assert_eq!(texts(foreign_routes(&f)), Vec::<String>::new());
    }

    #[test]
    fn a_missing_route_neighbour_and_fdb_entry_are_each_named() {
        let mut f = testing::healthy();
        let k = kernel(&mut f);
        k.routes.pop();
        k.neighbours.clear();
        k.fdb.clear();
        assert_eq!(
            texts(peers(&f)),
            [
                "peer 10.244.2.0/24 (10.199.0.12): no neighbour 10.244.2.0 → 0e:00:00:00:00:02 on flannel.1",
                "peer 10.244.2.0/24 (10.199.0.12): no FDB entry 0e:00:00:00:00:02 → 10.199.0.12 on flannel.1",
                "peer 10.244.2.0/24 (10.199.0.12): no route to 10.244.2.0/24 (want `10.244.2.0/24 via 10.244.2.0 dev flannel.1 onlink`)",
            ]
        );
    }

    #[test]
    fn entries_that_differ_are_named_with_what_they_are() {
        let mut f = testing::healthy();
        let k = kernel(&mut f);
        let other: Mac = "0e:00:00:00:00:99".parse().unwrap();
        k.neighbours[0].mac = other;
        k.fdb[0].dst = "10.199.0.99".parse().unwrap();
        k.routes[3].gateway = Some("10.244.2.7".parse().unwrap());
        assert_eq!(
            texts(peers(&f)),
            [
                "peer 10.244.2.0/24 (10.199.0.12): the neighbour 10.244.2.0 on flannel.1 is 0e:00:00:00:00:99, not its VtepMAC 0e:00:00:00:00:02",
                "peer 10.244.2.0/24 (10.199.0.12): the FDB entry of 0e:00:00:00:00:02 on flannel.1 sends to 10.199.0.99, not 10.199.0.12",
                "peer 10.244.2.0/24 (10.199.0.12): the route to 10.244.2.0/24 is `10.244.2.0/24 via 10.244.2.7 dev flannel.1 onlink proto 87`, not `10.244.2.0/24 via 10.244.2.0 dev flannel.1 onlink`",
            ]
        );
    }

    #[test]
    fn a_healthy_dual_stack_host_has_each_peers_ipv6_route_neighbour_and_fdb_entry() {
        let f = testing::dual_stack();
        assert_eq!(texts(device(&f)), Vec::<String>::new());
        assert_eq!(texts(peers(&f)), Vec::<String>::new());
        assert_eq!(texts(foreign_routes(&f)), Vec::<String>::new());
    }

    #[test]
    fn a_missing_ipv6_neighbour_and_fdb_entry_are_named_on_flannel_v6() {
        let mut f = testing::dual_stack();
        let k = kernel(&mut f);
        k.neighbours.retain(|n| n.ifindex != 6);
        k.fdb.retain(|e| e.ifindex != 6);
        assert_eq!(
            texts(peers(&f)),
            [
                "peer 10.244.2.0/24 (10.199.0.12): no neighbour fd00:244:0:2:: → 0e:00:00:00:06:02 on flannel-v6.1",
                "peer 10.244.2.0/24 (10.199.0.12): no FDB entry 0e:00:00:00:06:02 → fd00:199::12 on flannel-v6.1",
            ]
        );
    }

    #[test]
    fn ipv6_entries_that_differ_are_named_with_what_they_are() {
        let mut f = testing::dual_stack();
        let k = kernel(&mut f);
        k.neighbours[1].mac = "0e:00:00:00:06:99".parse().unwrap();
        k.fdb[1].dst = "fd00:199::99".parse().unwrap();
        assert_eq!(
            texts(peers(&f)),
            [
                "peer 10.244.2.0/24 (10.199.0.12): the neighbour fd00:244:0:2:: on flannel-v6.1 is 0e:00:00:00:06:99, not its VtepMAC 0e:00:00:00:06:02",
                "peer 10.244.2.0/24 (10.199.0.12): the FDB entry of 0e:00:00:00:06:02 on flannel-v6.1 sends to fd00:199::99, not fd00:199::12",
            ]
        );
    }

    #[test]
    fn ipv6_leftovers_of_a_peer_that_lost_its_ipv6_side_are_stale() {
        let mut f = testing::dual_stack();
        if let Ok(l) = &mut testing::cluster(&mut f).records[1].value {
            l.attrs.backend_v6_data = None;
        }
        let p = texts(peers(&f));
        assert_eq!(
            p,
            [
                "neighbour fd00:244:0:2:: → 0e:00:00:00:06:02 on flannel-v6.1 is weft's but no peer wants it",
                "FDB entry 0e:00:00:00:06:02 → fd00:199::12 on flannel-v6.1 is weft's but no peer wants it",
                "route `fd00:244:0:2::/64 via fd00:244:0:2:: dev flannel-v6.1 onlink proto 87 metric 1024` is weft's but no peer wants it",
            ]
        );
    }

    #[test]
    fn each_device_is_judged_on_its_own_familys_neighbours() {
        let mut f = testing::dual_stack();
        // An IPv4 neighbour on flannel-v6.1 and an IPv6 one on flannel.1 are not weft's to keep
        // (weftd keeps ARP on one, NDP on the other), so not its leftovers either.
        let k = kernel(&mut f);
        let (v4, v6) = (k.neighbours[0], k.neighbours[1]);
        k.neighbours.push(Neighbour { ifindex: 6, ..v4 });
        k.neighbours.push(Neighbour { ifindex: 3, ..v6 });
        assert_eq!(texts(peers(&f)), Vec::<String>::new());
    }

    #[test]
    fn a_missing_ipv6_device_is_named_when_peers_need_it() {
        let mut f = testing::dual_stack();
        let k = kernel(&mut f);
        k.links.retain(|l| l.name != "flannel-v6.1");
        k.routes.retain(|r| r.oif != Some(6));
        assert_eq!(
            texts(peers(&f)),
            ["flannel-v6.1 does not exist: the peers' IPv6 subnets are unreachable through the overlay"]
        );
        // A host without a global IPv6 underlay address carries IPv4 alone: nothing is missing.
        if let Ok(ext) = &mut f.external {
            ext.iface_addr6 = None;
        }
        assert_eq!(texts(peers(&f)), Vec::<String>::new());
    }

    #[test]
    fn leftovers_of_a_gone_peer_are_stale() {
        let mut f = testing::healthy();
        testing::cluster(&mut f).records.pop();
        let p = texts(peers(&f));
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(p[0].starts_with(
            "neighbour 10.244.2.0 → 0e:00:00:00:00:02 on flannel.1 is weft's but no peer wants it"
        ));
        assert!(p[2].starts_with(
            "route `10.244.2.0/24 via 10.244.2.0 dev flannel.1 onlink proto 87` is weft's"
        ));
    }

    #[test]
    fn peers_the_peer_set_rejects_are_not_wanted() {
        let mut f = testing::healthy();
        // A younger lease with the peer's MAC: rejected, as weftd rejects it.
        testing::cluster(&mut f).records.push(testing::record(
            "10.244.3.0/24",
            "10.199.0.13",
            Some(MAC2),
            50,
        ));
        assert_eq!(texts(peers(&f)), Vec::<String>::new());
    }

    #[test]
    fn a_peer_of_another_backend_or_vni_is_named() {
        let mut f = testing::healthy();
        testing::cluster(&mut f).records.push(testing::record(
            "10.244.3.0/24",
            "10.199.0.13",
            None,
            50,
        ));
        let p = texts(peers(&f));
        assert_eq!(p, ["peer 10.244.3.0/24 (10.199.0.13) runs backend plain, this network vxlan: weft (like flannel) sends it nothing"]);
    }

    #[test]
    fn host_gw_and_udp_routes() {
        let mut f = testing::healthy();
        testing::set_config(
            &mut f,
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#,
        );
        let k = kernel(&mut f);
        k.routes.pop();
        k.neighbours.clear();
        k.fdb.clear();
        for r in testing::cluster(&mut f).records.iter_mut() {
            if let Ok(l) = &mut r.value {
                l.attrs.backend_type = "host-gw".into();
                l.attrs.backend_data = None;
            }
        }
        assert_eq!(texts(peers(&f)), ["peer 10.244.2.0/24 (10.199.0.12): no route to 10.244.2.0/24 (want `10.244.2.0/24 via 10.199.0.12 dev eth0`)"]);
        kernel(&mut f)
            .routes
            .push(route("10.244.2.0/24", Some("10.199.0.12"), 2, 87));
        assert_eq!(texts(peers(&f)), Vec::<String>::new());

        testing::set_config(
            &mut f,
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"udp"}}"#,
        );
        let k = kernel(&mut f);
        k.routes.pop();
        k.links[2] = testing::link(3, "flannel0", "tun", 1472, None, &["10.244.1.0/32"]);
        for r in testing::cluster(&mut f).records.iter_mut() {
            if let Ok(l) = &mut r.value {
                l.attrs.backend_type = String::new();
            }
        }
        assert_eq!(
            texts(peers(&f)),
            ["the network: no route to 10.244.0.0/16 (want `10.244.0.0/16 dev flannel0`)"]
        );
    }

    #[test]
    fn the_device_missing_down_or_without_its_address() {
        let mut f = testing::healthy();
        kernel(&mut f).links.remove(2);
        assert!(texts(device(&f))[0].starts_with("flannel.1 does not exist"));
        assert!(matches!(peers(&f), Outcome::Skipped(_)));
        let mut f = testing::healthy();
        let l = &mut kernel(&mut f).links[2];
        l.up = false;
        l.addrs.clear();
        assert_eq!(
            texts(device(&f)),
            [
                "flannel.1 is down",
                "flannel.1 lacks the address 10.244.1.0/32 (its lease's network address)"
            ]
        );
    }

    #[test]
    fn wireguards_device_is_the_kernels_or_weft_userspace_tun_and_nothing_else() {
        let mut f = testing::healthy();
        testing::set_config(
            &mut f,
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard"}}"#,
        );
        for kind in ["tun", "wireguard"] {
            kernel(&mut f).links[2] =
                testing::link(3, "flannel-wg", kind, 1420, None, &["10.244.1.0/32"]);
            assert_eq!(texts(device(&f)), Vec::<String>::new(), "{kind}");
        }
        kernel(&mut f).links[2] =
            testing::link(3, "flannel-wg", "vxlan", 1420, None, &["10.244.1.0/32"]);
        assert_eq!(
            texts(device(&f)),
            ["flannel-wg is a vxlan device, not wireguard or tun"]
        );
    }

    #[test]
    fn routes_from_others_inside_the_network_are_named() {
        let mut f = testing::healthy();
        let k = kernel(&mut f);
        k.routes
            .push(route("10.244.250.0/24", Some("10.199.0.1"), 2, RTPROT_BOOT));
        k.routes
            .push(route("10.0.0.0/8", Some("10.199.0.1"), 2, RTPROT_BOOT));
        k.routes
            .push(route("10.244.7.0/24", None, 9, RTPROT_KERNEL));
        let p = problems_of(foreign_routes(&f));
        assert_eq!(p.len(), 2, "wider routes are no problem: {p:?}");
        assert_eq!(p[0].problem, "route `10.244.250.0/24 via 10.199.0.1 dev eth0 proto boot` (not weft's) lies inside the cluster network 10.244.0.0/16: it takes traffic meant for the overlay");
        assert!(p[0].fix.contains("ip route del 10.244.250.0/24"));
        assert!(
            p[1].fix
                .contains("#9 still has an address in the cluster network"),
            "{p:?}"
        );
    }
}
