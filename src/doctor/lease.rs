//! etcd, subnet.env, this host's lease, the leases as a whole, and Docker's view of the lease.
//! In Kubernetes mode this host's lease is the one its Node publishes (see `kube.rs`).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use ipnet::{Ipv4Net, Ipv6Net};

use super::facts::{renew_margin, Cluster, Facts, Store, Ttl};
use super::{Finding, Outcome};
use crate::lease::format_secs;
use crate::lease::Lease;
use crate::status::{self, BridgeView, EnvView, LeaseView, View};

/// This host's lease as etcd has it, judged against subnet.env.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Holding<'a> {
    /// subnet.env's subnet, leased to this host.
    Held(&'a Lease),
    /// subnet.env's subnet is leased to another host.
    OtherHost(&'a Lease),
    /// subnet.env's subnet is not leased, but another subnet is, to this host.
    Elsewhere(&'a Lease),
    Missing,
}

/// Whether `ip` is this host's PublicIP: `-public-ip` when given (NAT), else any of its
/// addresses.
pub fn is_mine(f: &Facts, ip: Ipv4Addr) -> bool {
    match f.public_ip_flag {
        Some(p) => p == ip,
        None => {
            f.kernel.as_ref().is_ok_and(|k| k.local_addrs.contains(&ip))
                || f.external.as_ref().is_ok_and(|e| e.public_ip == ip)
        }
    }
}

/// subnet.env, the cluster, and this host's lease in it; `None` when either is missing.
pub fn own<'a>(f: &'a Facts) -> Option<(&'a EnvView, &'a Cluster, Holding<'a>)> {
    let (Ok(env), Store::Read(c)) = (&f.env, &f.store) else {
        return None;
    };
    if let Some(k) = &f.kube {
        // The record of this host's Node (by name) is this host's, whatever it says.
        let subnet = env.subnet.trunc();
        let mine = (c.records.iter().find(|r| r.key == k.name)).and_then(|r| r.value.as_ref().ok());
        let own = match mine {
            Some(l) if l.subnet == subnet => Holding::Held(l),
            Some(l) => Holding::Elsewhere(l),
            None => match c.leases().find(|l| l.subnet == subnet) {
                Some(l) => Holding::OtherHost(l),
                None => Holding::Missing,
            },
        };
        return Some((env, c, own));
    }
    let key = c.lease_key(env.subnet.trunc());
    let at_key = c
        .records
        .iter()
        .find(|r| r.key == key)
        .and_then(|r| r.value.as_ref().ok());
    let own = match at_key {
        Some(l) if is_mine(f, l.attrs.public_ip) => Holding::Held(l),
        Some(l) => Holding::OtherHost(l),
        None => match c.leases().find(|l| is_mine(f, l.attrs.public_ip)) {
            Some(l) => Holding::Elsewhere(l),
            None => Holding::Missing,
        },
    };
    Some((env, c, own))
}

/// This host's lease, when subnet.env names it.
pub fn held(f: &Facts) -> Option<&Lease> {
    match own(f)?.2 {
        Holding::Held(l) => Some(l),
        _ => None,
    }
}

/// The key of this host's record, holding `subnet`: etcd's key of the subnet, or this host's
/// Node.
pub fn own_key(f: &Facts, c: &Cluster, subnet: Ipv4Net) -> String {
    match &f.kube {
        Some(k) => k.name.clone(),
        None => c.lease_key(subnet),
    }
}

/// This host's subnet: its lease's in etcd (also when subnet.env is stale), else subnet.env's.
/// In Kubernetes mode: its Node's podCIDR, else subnet.env's.
pub fn own_subnet(f: &Facts) -> Option<Ipv4Net> {
    if let Some(k) = &f.kube {
        let pod_cidr = k
            .own
            .as_ref()
            .ok()
            .and_then(|o| o.pod_cidr.clone().ok().flatten());
        return pod_cidr.or_else(|| f.env.as_ref().ok().map(|e| e.subnet.trunc()));
    }
    match (own(f), &f.store) {
        (Some((_, _, Holding::Held(l) | Holding::Elsewhere(l))), _) => Some(l.subnet),
        (None, Store::Read(c)) if f.env.is_err() => c
            .leases()
            .find(|l| is_mine(f, l.attrs.public_ip))
            .map(|l| l.subnet),
        _ => f.env.as_ref().ok().map(|e| e.subnet.trunc()),
    }
}

/// This host's IPv6 subnet on a dual-stack network: its lease's, else subnet.env's.
pub fn own_subnet6(f: &Facts) -> Option<ipnet::Ipv6Net> {
    if let Some((_, _, Holding::Held(l) | Holding::Elsewhere(l))) = own(f) {
        if let Some(s) = l.ipv6_subnet {
            return Some(s);
        }
    }
    let env = f.env.as_ref().ok()?.ipv6.as_ref()?;
    env.1.parse::<ipnet::Ipv6Net>().ok().map(|n| n.trunc())
}

/// `etcd`: reachable, and the network config usable.
pub fn etcd(f: &Facts) -> Outcome {
    match &f.store {
        Store::Failed { endpoints, error } => vec![etcd_failure(endpoints, error)].into(),
        Store::Read(c) => match &c.config {
            Ok(_) => Outcome::ok(),
            Err(e) => vec![Finding::new(
                format!("the network config cannot be used: {e}"),
                format!(
                    "store a valid one with `weftctl config set` at {} (weftd waits for it)",
                    c.config_key
                ),
            )]
            .into(),
        },
    }
}

/// Names what kind of failure talking to etcd was, so TLS and credentials are not mistaken for
/// a network problem.
fn etcd_failure(endpoints: &str, error: &str) -> Finding {
    let e = error.to_ascii_lowercase();
    let has = |words: &[&str]| words.iter().any(|w| e.contains(w));
    // Not etcd's answer at all: weft could not read its own password file.
    if has(&["etcd password file"]) {
        return Finding::new(
            format!("cannot use the etcd password: {error}"),
            "make -etcd-password-file name a readable file holding the password",
        );
    }
    if has(&[
        "tls",
        "certificate",
        "handshake",
        "x509",
        "unknownissuer",
        "ssl",
        "pem",
        "invalid peer",
    ]) {
        Finding::new(
            format!("TLS to etcd at {endpoints} fails: {error}"),
            "check -etcd-cafile (the CA that signed etcd's certificate), -etcd-certfile and \
             -etcd-keyfile (a pair etcd's --trusted-ca-file accepts), and that the endpoints \
             say https:// with a name or address the server certificate covers",
        )
    } else if has(&[
        "authentication failed",
        "permission denied",
        "invalid auth",
        "user name",
        "password",
    ]) {
        Finding::new(
            format!("etcd at {endpoints} refuses the credentials: {error}"),
            "check -etcd-username and the password (-etcd-password-file's content, or \
             -etcd-password), and the user's role on the prefix",
        )
    } else {
        Finding::new(
            format!("etcd at {endpoints} cannot be reached: {error}"),
            "check that etcd runs and that this host reaches it (-etcd-endpoints, routes, \
             firewalls); weftd keeps its lease and data path meanwhile, but its lease expires \
             if the outage outlasts it",
        )
    }
}

/// `subnet-env`: present, and matching the network config and this host's lease.
pub fn subnet_env(f: &Facts) -> Outcome {
    let env = match &f.env {
        Ok(env) => env,
        Err(e) => {
            return vec![Finding::new(
                e.clone(),
                "start weftd: it writes subnet.env once it holds a lease (if it runs with \
                 another -subnet-file, give doctor the same)",
            )]
            .into()
        }
    };
    let mut out = Vec::new();
    if let Store::Read(c) = &f.store {
        if let Ok(config) = &c.config {
            if env.network != config.network.to_string() {
                out.push(Finding::new(
                    format!(
                        "{} says FLANNEL_NETWORK={} but the network config says {}",
                        f.subnet_file, env.network, config.network
                    ),
                    "restart weftd: it leases in the new network and rewrites the file; then \
                     restart Docker and the pods",
                ));
            }
        }
    }
    if let Some((_, _, Holding::Elsewhere(l))) = own(f) {
        let lease = match &f.kube {
            Some(k) => format!("node {}'s podCIDR", k.name),
            None => "this host's lease in etcd".into(),
        };
        out.push(Finding::new(
            format!(
                "{} says FLANNEL_SUBNET={} but {lease} is {}",
                f.subnet_file, env.subnet, l.subnet
            ),
            "weftd rewrites subnet.env as soon as it holds a lease: start it (or look at its \
             log), then restart Docker and the pods for the new subnet",
        ));
    }
    if let Some((_, _, Holding::Held(l))) = own(f) {
        let env6 = (env.ipv6.as_ref())
            .and_then(|(_, s)| s.parse::<Ipv6Net>().ok())
            .map(|n| n.trunc());
        if env6 != l.ipv6_subnet {
            let show = |n: Option<Ipv6Net>| n.map_or("none".to_string(), |n| n.to_string());
            out.push(Finding::new(
                format!(
                    "{} says FLANNEL_IPV6_SUBNET={} but this host's lease has the IPv6 subnet {}",
                    f.subnet_file,
                    env.ipv6.as_ref().map_or("(none)", |(_, s)| s.as_str()),
                    show(l.ipv6_subnet)
                ),
                "weftd rewrites subnet.env with its lease: restart it (or look at its log), then \
                 restart Docker and the pods",
            ));
        }
    }
    out.into()
}

/// `lease`: this host's lease is in etcd, its own, and being renewed.
pub fn own_lease(f: &Facts) -> Outcome {
    let Some((env, c, own)) = own(f) else {
        return Outcome::skip("needs subnet.env and etcd");
    };
    let subnet = env.subnet.trunc();
    let lease = match own {
        Holding::Held(l) => l,
        // subnet-env says what to do.
        Holding::Elsewhere(_) => return Outcome::ok(),
        Holding::Missing => {
            return vec![Finding::new(
                format!(
                    "etcd has no lease for {subnet} (this host's, by subnet.env) nor any other \
                     naming this host"
                ),
                "start weftd: it leases again (the same subnet if it is still free); if it runs, \
                 its log says why it cannot",
            )]
            .into()
        }
        Holding::OtherHost(l) => {
            return vec![Finding::new(
                format!(
                    "{subnet} (this host's, by subnet.env) is leased to {} in etcd, not to this \
                     host",
                    l.attrs.public_ip
                ),
                "this host lost its subnet: restart weftd to lease another one, then restart \
                 Docker and the pods (if this host is behind NAT, give doctor weftd's -public-ip)",
            )]
            .into()
        }
    };
    let ttl = match &c.own_ttl {
        Some(Ok(t)) => *t,
        Some(Err(e)) => {
            return vec![Finding::new(
                format!("cannot read how long the lease {subnet} has left: {e}"),
                "check etcd's health (etcdctl endpoint health)",
            )]
            .into()
        }
        None => return Outcome::ok(),
    };
    expiry(lease, ttl, f.lease_ttl, f.renew_margin_minutes)
        .into_iter()
        .collect::<Vec<_>>()
        .into()
}

/// Whether the lease is closer to expiry than a renewing weftd ever lets it get.
///
/// weftd renews `margin` before expiry (a third of a TTL the margin does not fit in), so a
/// healthy lease never has less than that left; less than that minus some slack (half of it, at
/// most a minute: a renewal in flight) means weftd is not renewing. A threshold of a tenth of
/// the TTL would flag healthy hosts with flannel's defaults (24 h, renewed 1 h before expiry).
pub fn expiry(lease: &Lease, ttl: Ttl, lease_ttl: Duration, margin: u64) -> Option<Finding> {
    let due = renew_margin(lease_ttl, margin).as_secs() as i64;
    let slack = (due / 2).min(60);
    let left = match ttl {
        Ttl::Reservation => return None,
        Ttl::Expired => 0,
        Ttl::Left(s) if s < due - slack => s,
        Ttl::Left(_) => return None,
    };
    Some(Finding::new(
        format!(
            "this host's lease {} expires in {}, but weftd renews it {} before expiry: it is \
             not renewing",
            lease.subnet,
            format_secs(left),
            format_secs(due)
        ),
        "make sure weftd runs and reaches etcd before the lease expires (if weftd runs with \
         another --subnet-lease-ttl or -subnet-lease-renew-margin, give doctor the same)",
    ))
}

/// `leases`: no PublicIP and no VtepMAC in two leases.
pub fn unique(f: &Facts) -> Outcome {
    let Store::Read(c) = &f.store else {
        return Outcome::skip(format!("needs {}", f.store_name()));
    };
    match f.kube {
        Some(_) => kube_duplicates(c),
        None => duplicates(c),
    }
    .into()
}

/// Kubernetes mode's duplicates: the nodes named, and what to do there.
fn kube_duplicates(c: &Cluster) -> Vec<Finding> {
    let mut by_ip: BTreeMap<Ipv4Addr, Vec<String>> = BTreeMap::new();
    let mut by_mac: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in &c.records {
        let Ok(l) = &r.value else { continue };
        let name = format!("{} ({})", r.key, l.subnet);
        by_ip
            .entry(l.attrs.public_ip)
            .or_default()
            .push(name.clone());
        if let Ok(m) = weft_backends::mac::vtep_mac(l.attrs.backend_data.as_ref()) {
            by_mac.entry(m.to_string()).or_default().push(name);
        }
    }
    let mut out = Vec::new();
    for (ip, mut nodes) in by_ip.into_iter().filter(|(_, n)| n.len() > 1) {
        nodes.sort();
        out.push(Finding::new(
            format!("nodes {} all publish public-ip {ip}", nodes.join(", ")),
            "either one's annotations are stale (weftd publishes its own at start: restart it \
             there), or several nodes share an address behind NAT (give each its own \
             public-ip-overwrite annotation)",
        ));
    }
    for (mac, mut nodes) in by_mac.into_iter().filter(|(_, n)| n.len() > 1) {
        nodes.sort();
        out.push(Finding::new(
            format!(
                "nodes {} all publish VtepMAC {mac}: peers accept only the oldest node, so the \
                 others are unreachable over vxlan",
                nodes.join(", ")
            ),
            "on each newer node: stop weftd, delete flannel.<VNI> (`ip link del`), start weftd \
             (it derives a MAC from its PublicIP and publishes it)",
        ));
    }
    out
}

pub fn duplicates(c: &Cluster) -> Vec<Finding> {
    let mut by_ip: BTreeMap<Ipv4Addr, Vec<&Lease>> = BTreeMap::new();
    let mut by_mac: BTreeMap<String, Vec<&Lease>> = BTreeMap::new();
    for l in c.leases() {
        by_ip.entry(l.attrs.public_ip).or_default().push(l);
        if let Ok(m) = weft_backends::mac::vtep_mac(l.attrs.backend_data.as_ref()) {
            by_mac.entry(m.to_string()).or_default().push(l);
        }
    }
    let names = |ls: &[&Lease]| {
        let mut v: Vec<String> = ls.iter().map(|l| l.subnet.to_string()).collect();
        v.sort();
        v.join(", ")
    };
    let mut out = Vec::new();
    for (ip, ls) in by_ip.iter().filter(|(_, ls)| ls.len() > 1) {
        out.push(Finding::new(
            format!("leases {} all name PublicIP {ip}", names(ls)),
            "either one is stale (a host that moved to another subnet: delete its key with \
             `etcdctl del`), or several hosts share an address behind NAT (give each its own \
             -public-ip)",
        ));
    }
    for (mac, ls) in by_mac.iter().filter(|(_, ls)| ls.len() > 1) {
        out.push(Finding::new(
            format!(
                "leases {} all publish VtepMAC {mac}: peers accept only the oldest, so the \
                 others' hosts are unreachable over vxlan",
                names(ls)
            ),
            "on each newer lease's host: stop weftd, delete flannel.<VNI> (`ip link del`) and \
             its lease key (`etcdctl del`), start weftd (it derives a MAC from its PublicIP)",
        ));
    }
    out
}

/// `docker`: daemon.json and docker0 agree with the lease (`weftctl status`'s own judgement).
pub fn docker(f: &Facts) -> Outcome {
    let Ok(env) = &f.env else {
        return Outcome::skip("needs subnet.env");
    };
    let bridge = match &f.kernel {
        Err(e) => BridgeView::Unknown(e.clone()),
        Ok(k) => match k.link("docker0") {
            None => BridgeView::Absent,
            Some(l) => match l.addrs.first() {
                Some(a) => BridgeView::Addr(a.addr()),
                None => BridgeView::NoAddress,
            },
        },
    };
    let view = View {
        subnet_file: f.subnet_file.clone().into(),
        env: Ok(env.clone()),
        // The lease is the `lease` check's; here only Docker's side is judged.
        lease: LeaseView::Found {
            public_ip: Ipv4Addr::UNSPECIFIED,
            backend: String::new(),
            expires_in: None,
        },
        daemon_json_path: f.daemon_json_path.clone(),
        daemon_json: f.daemon_json.clone(),
        bridge_name: "docker0".into(),
        bridge,
        kube: None,
    };
    status::problems(&view)
        .into_iter()
        .map(|p| {
            let fix = if p.starts_with("Docker must be restarted") {
                "restart Docker (`systemctl restart docker`); its containers restart with it"
                    .to_string()
            } else if p.contains("cannot be parsed") {
                "repair the JSON; weftd then writes bip and mtu within seconds".to_string()
            } else {
                format!(
                    "make sure weftd runs with --docker-daemon-json={} (it rewrites bip and mtu), \
                     then restart Docker",
                    f.daemon_json_path
                )
            };
            Finding::new(p, fix)
        })
        .collect::<Vec<_>>()
        .into()
}

#[cfg(test)]
mod tests {
    use super::super::testing::{self, problems_of};
    use super::*;
    use crate::status::DaemonJsonView;

    #[test]
    fn etcd_failures_say_whether_tls_credentials_or_the_network_failed() {
        let tls = etcd_failure(
            "https://10.0.0.1:2379",
            "list /coreos.com/network/subnets/: transport error: invalid peer certificate: UnknownIssuer",
        );
        assert!(tls
            .problem
            .starts_with("TLS to etcd at https://10.0.0.1:2379 fails: "));
        assert!(tls.fix.contains("-etcd-cafile"));
        let auth = etcd_failure(
            "http://e:2379",
            "etcdserver: authentication failed, invalid user ID or password",
        );
        assert!(auth.problem.contains("refuses the credentials"), "{auth:?}");
        let file = etcd_failure(
            "http://e:2379",
            "read the etcd password file /etc/weft/pw: No such file or directory (os error 2)",
        );
        assert!(
            file.problem.starts_with(
                "cannot use the etcd password: read the etcd password file /etc/weft/pw"
            ),
            "{file:?}"
        );
        let down = etcd_failure(
            "http://e:2379",
            "connect to etcd: transport error: Connection refused",
        );
        assert!(down
            .problem
            .starts_with("etcd at http://e:2379 cannot be reached: "));
    }

    #[test]
    fn an_unreachable_etcd_is_one_problem_and_the_lease_checks_skip() {
        let mut f = testing::healthy();
        f.store = Store::Failed {
            endpoints: "http://10.199.0.1:1".into(),
            error: "connection refused".into(),
        };
        assert_eq!(problems_of(etcd(&f)).len(), 1);
        assert!(matches!(own_lease(&f), Outcome::Skipped(_)));
        assert!(matches!(unique(&f), Outcome::Skipped(_)));
    }

    #[test]
    fn a_missing_config_is_named_with_its_key() {
        let mut f = testing::healthy();
        testing::cluster(&mut f).config =
            Err("no network config at /coreos.com/network/config".into());
        let p = problems_of(etcd(&f));
        assert!(
            p[0].problem
                .contains("no network config at /coreos.com/network/config"),
            "{p:?}"
        );
    }

    #[test]
    fn subnet_env_missing_or_for_another_network_or_subnet() {
        let mut f = testing::healthy();
        f.env = Err(
            "no /run/flannel/subnet.env: weftd has not leased a subnet (is it running?)".into(),
        );
        assert!(problems_of(subnet_env(&f))[0]
            .problem
            .starts_with("no /run/flannel/subnet.env"));

        let mut f = testing::healthy();
        testing::env(&mut f).network = "10.9.0.0/16".into();
        let p = problems_of(subnet_env(&f));
        assert!(
            p[0].problem
                .contains("FLANNEL_NETWORK=10.9.0.0/16 but the network config says 10.244.0.0/16"),
            "{p:?}"
        );

        // subnet.env still names an old subnet; etcd has this host's new one.
        let mut f = testing::healthy();
        testing::env(&mut f).subnet = "10.244.77.1/24".parse().unwrap();
        let p = problems_of(subnet_env(&f));
        assert!(
            p[0].problem.contains(
                "FLANNEL_SUBNET=10.244.77.1/24 but this host's lease in etcd is 10.244.1.0/24"
            ),
            "{p:?}"
        );
        assert_eq!(
            problems_of(own_lease(&f)),
            vec![],
            "reported once, by subnet-env"
        );
    }

    #[test]
    fn subnet_env_without_the_leases_ipv6_subnet_or_with_another_is_named() {
        let mut f = testing::healthy();
        // This host's lease is dual-stack: under its dual key, with an IPv6 subnet.
        let key = format!("{}10.244.1.0-24", testing::PREFIX);
        for r in testing::cluster(&mut f)
            .records
            .iter_mut()
            .filter(|r| r.key == key)
        {
            r.key = format!("{key}&fd00:244:0:1::-64");
            if let Ok(l) = &mut r.value {
                l.ipv6_subnet = Some("fd00:244:0:1::/64".parse().unwrap());
            }
        }
        let p = problems_of(subnet_env(&f));
        assert!(
            p[0].problem.contains(
                "FLANNEL_IPV6_SUBNET=(none) but this host's lease has the IPv6 subnet fd00:244:0:1::/64"
            ),
            "{p:?}"
        );
        testing::env(&mut f).ipv6 = Some(("fd00:244::/48".into(), "fd00:244:0:1::1/64".into()));
        assert_eq!(problems_of(subnet_env(&f)), vec![]);
        testing::env(&mut f).ipv6 = Some(("fd00:244::/48".into(), "fd00:244:0:9::1/64".into()));
        assert_eq!(problems_of(subnet_env(&f)).len(), 1);
    }

    #[test]
    fn a_lease_missing_or_held_by_another_host() {
        let mut f = testing::healthy();
        testing::cluster(&mut f).records.remove(0);
        assert!(problems_of(own_lease(&f))[0]
            .problem
            .starts_with("etcd has no lease for 10.244.1.0/24"));

        let mut f = testing::healthy();
        testing::set_public_ip(&mut f, 0, "10.199.0.99");
        let p = problems_of(own_lease(&f));
        assert!(
            p[0].problem
                .contains("is leased to 10.199.0.99 in etcd, not to this host"),
            "{p:?}"
        );
    }

    #[test]
    fn a_lease_not_renewed_in_time_is_about_to_expire() {
        let l = testing::lease("10.244.1.0/24", "10.199.0.11", None);
        let day = Duration::from_secs(86400);
        // flannel's defaults: renewed an hour before expiry; up to that, all is well.
        assert_eq!(expiry(&l, Ttl::Left(86_000), day, 60), None);
        assert_eq!(expiry(&l, Ttl::Left(3_600), day, 60), None);
        assert_eq!(
            expiry(&l, Ttl::Left(3_550), day, 60),
            None,
            "a renewal in flight"
        );
        let f = expiry(&l, Ttl::Left(3_000), day, 60).expect("overdue");
        assert!(
            f.problem
                .contains("expires in 50m0s, but weftd renews it 1h0m0s before expiry"),
            "{f:?}"
        );
        assert!(expiry(&l, Ttl::Expired, day, 60).is_some());
        assert_eq!(expiry(&l, Ttl::Reservation, day, 60), None);
        // A short TTL is renewed at a third of it: 20 s leaves 14 s when due.
        let short = Duration::from_secs(20);
        assert_eq!(expiry(&l, Ttl::Left(12), short, 60), None);
        assert!(expiry(&l, Ttl::Left(4), short, 60).is_some());
    }

    #[test]
    fn duplicate_public_ips_and_vtep_macs_are_named() {
        let mut f = testing::healthy();
        let c = testing::cluster(&mut f);
        c.records.push(testing::record(
            "10.244.9.0/24",
            "10.199.0.12",
            Some("0e:00:00:00:00:02"),
            99,
        ));
        let p = duplicates(c);
        assert_eq!(p.len(), 2, "{p:?}");
        assert_eq!(
            p[0].problem,
            "leases 10.244.2.0/24, 10.244.9.0/24 all name PublicIP 10.199.0.12"
        );
        assert!(
            p[1].problem.starts_with(
                "leases 10.244.2.0/24, 10.244.9.0/24 all publish VtepMAC 0e:00:00:00:00:02"
            ),
            "{p:?}"
        );
    }

    #[test]
    fn docker_problems_are_status_problems() {
        let mut f = testing::healthy();
        f.daemon_json = DaemonJsonView::Found {
            bip: Some("172.17.0.1/16".into()),
            mtu: Some(1450),
        };
        testing::kernel(&mut f).links.push(testing::link(
            40,
            "docker0",
            "bridge",
            1500,
            None,
            &["10.244.1.1/24"],
        ));
        let p = problems_of(docker(&f));
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0]
            .problem
            .contains("has bip 172.17.0.1/16 but the lease needs 10.244.1.1/24"));
        testing::kernel(&mut f).links.last_mut().unwrap().addrs =
            vec!["172.17.0.1/16".parse().unwrap()];
        let p = problems_of(docker(&f));
        assert!(
            p.iter()
                .any(|p| p.problem.starts_with("Docker must be restarted")
                    && p.fix.contains("systemctl restart docker")),
            "{p:?}"
        );
    }
}
