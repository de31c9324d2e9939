//! Facts of a healthy vxlan host, written by hand, for the checks' unit tests to break one at a
//! time: this host 10.199.0.11 on eth0 (MTU 1500) with lease 10.244.1.0/24, one peer 10.244.2.0/24
//! at 10.199.0.12, a container behind cni0, Docker's FORWARD policy DROP with weft's rules.

use std::time::Duration;

use super::facts::Ttl;
use super::facts::{Cluster, Etcd, Facts, Fdb, Iptables, Kernel, Link, Neighbour, Route};
use super::{Finding, Outcome};
use crate::config::NetworkConfig;
use crate::lease::{Lease, Record};
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
    };
    let config = NetworkConfig::parse(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#)
        .expect("config");
    Facts {
        subnet_file: "/run/flannel/subnet.env".into(),
        env: Ok(EnvView {
            network: "10.244.0.0/16".into(),
            subnet: "10.244.1.1/24".parse().expect("subnet"),
            mtu: Some(1450),
            ip_masq: "true".into(),
        }),
        etcd: Etcd::Read(Box::new(Cluster {
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
        }),
        public_ip_flag: None,
        daemon_json_path: "/etc/docker/daemon.json".into(),
        daemon_json: DaemonJsonView::Missing,
        iptables: Ok(Iptables {
            filter: FILTER.into(),
            nat: NAT.into(),
        }),
        kernel_release: "6.1.0-18-amd64".into(),
        lease_ttl: Duration::from_secs(86400),
        renew_margin_minutes: 60,
    }
}

pub fn cluster(f: &mut Facts) -> &mut Cluster {
    match &mut f.etcd {
        Etcd::Read(c) => c,
        Etcd::Failed { .. } => panic!("no cluster"),
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
