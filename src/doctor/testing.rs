//! Facts of a healthy vxlan host, written by hand, for the checks' unit tests to break one at a
//! time: this host 10.199.0.11 on eth0 (MTU 1500) with lease 10.244.1.0/24, one peer 10.244.2.0/24
//! at 10.199.0.12, a container behind cni0, Docker's FORWARD policy DROP with weft's rules.

use std::time::Duration;

use super::facts::Ttl;
use super::facts::{
    Cluster, Facts, Fdb, Iptables, Kernel, KubeNode, Link, Neighbour, Route, Store,
};
use super::{Finding, Outcome};
use crate::config::NetworkConfig;
use crate::lease::{Lease, Record};
use crate::registry::kube::inspect::{self, OwnNode};
use crate::registry::kube::node::{self, Annotations, Condition, Node};
use crate::registry::Names;
use crate::status::{DaemonJsonView, EnvView};
use weft_backends::ExternalInterface;

pub const PREFIX: &str = "/coreos.com/network/subnets/";
pub const MAC1: &str = "0e:00:00:00:00:01";
pub const MAC2: &str = "0e:00:00:00:00:02";

/// The findings of a check that ran (a skipped check fails the test).
pub fn problems_of(o: Outcome) -> Vec<Finding> {
    match o {
        Outcome::Ran(v) => v,
        Outcome::Skipped(why) => panic!("skipped: {why}"),
    }
}

pub fn record(subnet: &str, ip: &str, mac: Option<&str>, create_revision: i64) -> Record {
    let data = match mac {
        Some(m) => format!(r#","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{m}"}}"#),
        None => String::new(),
    };
    let value = format!(r#"{{"PublicIP":"{ip}"{data}}}"#);
    let key = format!("{PREFIX}{}", subnet.replace('/', "-"));
    crate::registry::etcd::decode(
        key,
        PREFIX,
        value.as_bytes(),
        create_revision,
        create_revision,
        7,
    )
}

pub fn lease(subnet: &str, ip: &str, mac: Option<&str>) -> Lease {
    record(subnet, ip, mac, 1).value.expect("lease")
}

pub fn link(
    index: u32,
    name: &str,
    kind: &str,
    mtu: u32,
    master: Option<u32>,
    addrs: &[&str],
) -> Link {
    Link {
        name: name.into(),
        index,
        mtu,
        up: true,
        kind: kind.into(),
        master,
        addrs: addrs.iter().map(|a| a.parse().expect("addr")).collect(),
        mac: None,
    }
}

/// `dst [via gw] dev oif proto protocol`.
pub fn route(dst: &str, gw: Option<&str>, oif: u32, protocol: u8) -> Route {
    Route {
        dst: dst.parse().expect("dst"),
        gateway: gw.map(|g| g.parse().expect("gw")),
        oif: Some(oif),
        onlink: false,
        protocol,
        scope_link: gw.is_none() && protocol == 2,
        unicast: true,
        metric: 0,
    }
}

pub const FILTER: &str = "*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:DOCKER-USER - [0:0]
:FLANNEL-FWD - [0:0]
-A FORWARD -j DOCKER-USER
-A FORWARD -o docker0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD
-A DOCKER-USER -j RETURN
-A FLANNEL-FWD -s 10.244.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT
-A FLANNEL-FWD -d 10.244.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT
COMMIT
";

pub const NAT: &str = "*nat
:PREROUTING ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:FLANNEL-POSTRTG - [0:0]
-A POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG
-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment \"flanneld masq\" -j RETURN
-A FLANNEL-POSTRTG -s 10.244.1.0/24 -d 10.244.0.0/16 -m comment --comment \"flanneld masq\" -j RETURN
-A FLANNEL-POSTRTG -s 10.244.0.0/16 -d 10.244.1.0/24 -m comment --comment \"flanneld masq\" -j RETURN
-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.1.0/24 -m comment --comment \"flanneld masq\" -j RETURN
-A FLANNEL-POSTRTG -s 10.244.0.0/16 ! -d 224.0.0.0/4 -m comment --comment \"flanneld masq\" -j MASQUERADE --random-fully
-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.0.0/16 -m comment --comment \"flanneld masq\" -j MASQUERADE --random-fully
COMMIT
";

pub fn healthy() -> Facts {
    let mac2 = MAC2.parse().expect("mac");
    let mut vxlan_route = route("10.244.2.0/24", Some("10.244.2.0"), 3, 87);
    vxlan_route.onlink = true;
    let mut default = route("0.0.0.0/0", Some("10.199.0.1"), 2, 3);
    default.scope_link = false;
    let kernel = Kernel {
        links: vec![
            link(1, "lo", "", 65536, None, &["127.0.0.1/8"]),
            link(2, "eth0", "veth", 1500, None, &["10.199.0.11/24"]),
            link(3, "flannel.1", "vxlan", 1450, None, &["10.244.1.0/32"]),
            link(4, "cni0", "bridge", 1450, None, &["10.244.1.1/24"]),
            link(5, "vc", "veth", 1450, Some(4), &[]),
        ],
        routes: vec![
            default,
            route("10.199.0.0/24", None, 2, 2),
            route("10.244.1.0/24", None, 4, 2),
            vxlan_route,
        ],
        neighbours: vec![Neighbour {
            ifindex: 3,
            ip: "10.244.2.0".parse().expect("ip"),
            mac: mac2,
        }],
        fdb: vec![Fdb {
            ifindex: 3,
            mac: mac2,
            dst: "10.199.0.12".parse().expect("ip"),
        }],
        local_addrs: ["127.0.0.1", "10.199.0.11", "10.244.1.0", "10.244.1.1"]
            .iter()
            .map(|a| a.parse().expect("addr"))
            .collect(),
        tx_checksum: Some(Ok(true)),
        underlay_driver: Some("veth".into()),
        wireguard: Vec::new(),
        ipv4_forwarding: Some(true),
        ipv6_forwarding: Some(true),
    };
    let config = NetworkConfig::parse(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#)
        .expect("config");
    Facts {
        subnet_file: "/run/flannel/subnet.env".into(),
        kube: None,
        env: Ok(EnvView {
            network: "10.244.0.0/16".into(),
            subnet: "10.244.1.1/24".parse().expect("subnet"),
            ipv6: None,
            mtu: Some(1450),
            ip_masq: "true".into(),
        }),
        store: Store::Read(Box::new(Cluster {
            config_key: "/coreos.com/network/config".into(),
            config: Ok(config),
            names: Names::etcd("/coreos.com/network"),
            records: vec![
                record("10.244.1.0/24", "10.199.0.11", Some(MAC1), 5),
                record("10.244.2.0/24", "10.199.0.12", Some(MAC2), 6),
            ],
            own_ttl: Some(Ok(Ttl::Left(86_000))),
        })),
        kernel: Ok(kernel),
        external: Ok(ExternalInterface {
            name: "eth0".into(),
            index: 2,
            iface_addr: "10.199.0.11".parse().expect("addr"),
            public_ip: "10.199.0.11".parse().expect("addr"),
            mtu: 1500,
            iface_addr6: None,
            public_ipv6: None,
        }),
        public_ip_flag: None,
        daemon_json_path: "/etc/docker/daemon.json".into(),
        daemon_json: DaemonJsonView::Missing,
        iptables: Ok(Iptables {
            filter: FILTER.into(),
            nat: NAT.into(),
        }),
        ip6tables: None,
        kernel_release: "6.1.0-18-amd64".into(),
        lease_ttl: Duration::from_secs(86400),
        renew_margin_minutes: 60,
    }
}

/// The dual-stack network of [`dual_stack`].
pub const DUAL_CONFIG: &str = r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:244::/48","Backend":{"Type":"vxlan"}}"#;
/// The VTEP MACs of flannel-v6.1 on this host and on the peer.
pub const MAC6_1: &str = "0e:00:00:00:06:01";
pub const MAC6_2: &str = "0e:00:00:00:06:02";

/// [`healthy`]'s host on a dual-stack vxlan network (fd00:244::/48), see [`with_ipv6`]:
/// flannel-v6.1 (index 6) holds the peer's IPv6 route, neighbour and FDB entry, FLANNEL_MTU and
/// the devices are at IPv6's 1430, and ip6tables has weft's rules for fd00:244::/48 under
/// Docker's policy DROP.
pub fn dual_stack() -> Facts {
    let mut f = healthy();
    set_config(&mut f, DUAL_CONFIG);
    with_ipv6(&mut f);
    env(&mut f).mtu = Some(1430);
    let k = kernel(&mut f);
    for l in k.links.iter_mut().filter(|l| l.mtu == 1450) {
        l.mtu = 1430;
    }
    k.links
        .push(link(6, "flannel-v6.1", "vxlan", 1430, None, &[]));
    let mut route6 = route("fd00:244:0:2::/64", Some("fd00:244:0:2::"), 6, 87);
    (route6.onlink, route6.metric) = (true, 1024);
    k.routes.push(route6);
    let mac6 = MAC6_2.parse().expect("mac");
    k.neighbours.push(Neighbour {
        ifindex: 6,
        ip: "fd00:244:0:2::".parse().expect("ip"),
        mac: mac6,
    });
    k.fdb.push(Fdb {
        ifindex: 6,
        mac: mac6,
        dst: "fd00:199::12".parse().expect("ip"),
    });
    // weftd's rules in ip6tables are IPv4's for the IPv6 network.
    let six = |t: &str| {
        (t.replace("10.244.0.0/16", "fd00:244::/48"))
            .replace("10.244.1.0/24", "fd00:244:0:1::/64")
            .replace("224.0.0.0/4", "ff00::/8")
    };
    f.ip6tables = Some(Ok(Iptables {
        filter: six(FILTER),
        nat: six(NAT),
    }));
    f
}

/// Gives the leases, subnet.env and the underlay an IPv6 side (the config is the caller's):
/// this host fd00:199::11 with fd00:244:0:1::/64, the peer fd00:199::12 with
/// fd00:244:0:2::/64, each publishing its flannel-v6.1's VTEP MAC in BackendV6Data.
pub fn with_ipv6(f: &mut Facts) {
    let records = cluster(f).records.iter_mut();
    for (r, (n, mac6)) in records.zip((1..).zip([MAC6_1, MAC6_2])) {
        r.key = format!("{}&fd00:244:0:{n}::-64", r.key);
        if let Ok(l) = &mut r.value {
            l.ipv6_subnet = Some(format!("fd00:244:0:{n}::/64").parse().expect("subnet"));
            l.attrs.public_ipv6 = Some(format!("fd00:199::1{n}").parse().expect("ip"));
            l.attrs.backend_v6_data = Some(serde_json::json!({"VNI": 1, "VtepMAC": mac6}));
        }
    }
    env(f).ipv6 = Some(("fd00:244::/48".into(), "fd00:244:0:1::1/64".into()));
    if let Ok(ext) = &mut f.external {
        let ip = Some("fd00:199::11".parse().expect("ip"));
        (ext.iface_addr6, ext.public_ipv6) = (ip, ip);
    }
}

pub fn cluster(f: &mut Facts) -> &mut Cluster {
    match &mut f.store {
        Store::Read(c) => c,
        Store::Failed { .. } => panic!("no cluster"),
    }
}

pub fn env(f: &mut Facts) -> &mut EnvView {
    f.env.as_mut().expect("env")
}

pub fn kernel(f: &mut Facts) -> &mut Kernel {
    f.kernel.as_mut().expect("kernel")
}

/// Rewrites record `i` with another PublicIP, keeping the rest.
pub fn set_public_ip(f: &mut Facts, i: usize, ip: &str) {
    let c = cluster(f);
    if let Ok(l) = &mut c.records[i].value {
        l.attrs.public_ip = ip.parse().expect("ip");
    }
}

/// The network config, replaced by `json`.
pub fn set_config(f: &mut Facts, json: &str) {
    cluster(f).config = Ok(NetworkConfig::parse(json).expect("config"));
}

/// The annotation prefix of the Kubernetes-mode facts.
pub const KUBE_PREFIX: &str = "flannel.alpha.coreos.com";
/// Where kube-flannel's config is.
pub const NET_CONF: &str = "/etc/kube-flannel/net-conf.json";

/// A Node as the API sends it: `name` with podCIDR `cidr`, published by weft with PublicIP
/// `ip` and VtepMAC `mac`, its NetworkUnavailable condition False.
pub fn kube_node(name: &str, cidr: &str, ip: &str, mac: &str) -> Node {
    let p = KUBE_PREFIX;
    let data = format!(r#"{{"VNI":1,"VtepMAC":"{mac}"}}"#);
    let json = serde_json::json!({
        "metadata": {
            "name": name,
            "creationTimestamp": "2024-01-01T00:00:00Z",
            "annotations": {
                format!("{p}/backend-data"): data,
                format!("{p}/backend-type"): "vxlan",
                format!("{p}/kube-subnet-manager"): "true",
                format!("{p}/public-ip"): ip,
            },
        },
        "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
        "status": {"conditions": [
            {"type": "NetworkUnavailable", "status": "False", "reason": "FlannelIsUp"},
        ]},
    });
    serde_json::from_value(json).expect("node")
}

/// The lease record a published node makes.
pub fn kube_record(name: &str, cidr: &str, ip: &str, mac: &str) -> Record {
    match node::seen(
        &kube_node(name, cidr, ip, mac),
        &Annotations::new(KUBE_PREFIX),
    ) {
        node::Seen::Lease(r) => r,
        node::Seen::NotLease(why) => panic!("not a lease: {why}"),
    }
}

/// [`healthy`]'s host in Kubernetes mode: Node node-1 (podCIDR 10.244.1.0/24) publishing its
/// lease, the peer node-2, the config from net-conf.json, flannel.1 with the published MAC.
pub fn kube_healthy() -> Facts {
    let mut f = healthy();
    let names = Annotations::new(KUBE_PREFIX);
    let own = kube_node("node-1", "10.244.1.0/24", "10.199.0.11", MAC1);
    let c = cluster(&mut f);
    c.config_key = NET_CONF.into();
    c.names = Names::kube(&names, Some(NET_CONF.into()));
    c.records = vec![
        kube_record("node-1", "10.244.1.0/24", "10.199.0.11", MAC1),
        kube_record("node-2", "10.244.2.0/24", "10.199.0.12", MAC2),
    ];
    c.own_ttl = None;
    kernel(&mut f).links[2].mac = Some(MAC1.parse().expect("mac"));
    f.kube = Some(KubeNode {
        name: "node-1".into(),
        own: Ok(inspect::own_node(&own, &names)),
        prefix: KUBE_PREFIX.into(),
        set_network_unavailable: true,
    });
    f
}

/// This host's Node in Kubernetes-mode facts.
pub fn kube_own(f: &mut Facts) -> &mut OwnNode {
    let k = f.kube.as_mut().expect("kube mode");
    k.own.as_mut().expect("own node")
}

/// Changes the lease this host's Node publishes, in its Node and in its record alike.
fn edit_own_lease(f: &mut Facts, edit: impl Fn(&mut Lease)) {
    if let Some(Ok(l)) = &mut kube_own(f).lease {
        edit(l);
    }
    for r in cluster(f).records.iter_mut().filter(|r| r.key == "node-1") {
        if let Ok(l) = &mut r.value {
            edit(l);
        }
    }
}

/// This host's Node publishes VtepMAC `mac` (flannel.1 keeps its own).
pub fn set_own_vtep_mac(f: &mut Facts, mac: &str) {
    let data = serde_json::json!({"VNI": 1, "VtepMAC": mac});
    edit_own_lease(f, |l| l.attrs.backend_data = Some(data.clone()));
}

/// This host's Node publishes PublicIP `ip`.
pub fn set_own_public_ip(f: &mut Facts, ip: &str) {
    let ip = ip.parse().expect("ip");
    edit_own_lease(f, |l| l.attrs.public_ip = ip);
}

/// This host's Node's NetworkUnavailable condition: `(status, reason)`, or none.
pub fn set_condition(f: &mut Facts, c: Option<(&str, Option<&str>)>) {
    kube_own(f).network_unavailable = c.map(|(status, reason)| Condition {
        kind: "NetworkUnavailable".into(),
        status: status.into(),
        reason: reason.map(Into::into),
    });
}
