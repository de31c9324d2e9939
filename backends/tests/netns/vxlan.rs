//! vxlan backend: flannel's device, neighbours, FDB and routes, kept exactly in line with the peers.

use serde_json::{json, Value};
use weft_backends::{BackendData, Lease};

use crate::harness::{lab, must, others, root_or_skip, Lab};

const DEV: &str = "flannel.1";

fn vxlan() -> Value {
    json!({"Type": "vxlan"})
}

/// A lab of `n` vxlan hosts on 192.168.100.0/24, all up; returns their leases.
fn vtep(l: &Lease) -> String {
    let data = l.backend_data.as_ref().and_then(|d| d.value());
    data.as_ref()
        .and_then(|d| d["VtepMAC"].as_str())
        .expect("VtepMAC")
        .to_string()
}

#[test]
fn three_hosts_every_container_reaches_every_other() {
    if !root_or_skip("vxlan::three_hosts_every_container_reaches_every_other") {
        return;
    }
    let (lab, leases) = lab(3, vxlan());
    lab.reconcile_all(&leases);

    // The published BackendData, byte for byte as flannel writes it.
    let data = leases[0].backend_data.as_ref().expect("data").as_str();
    assert_eq!(
        data,
        format!("{{\"VNI\":1,\"VtepMAC\":\"{}\"}}", vtep(&leases[0]))
    );

    // Host 1's kernel state, as flannel programs it.
    let h1 = &lab.hosts[0].ns;
    let link = h1.link(DEV).expect("flannel.1 exists");
    let info = &link["linkinfo"]["info_data"];
    assert_eq!(link["linkinfo"]["info_kind"], "vxlan");
    assert_eq!(info["id"], 1);
    assert_eq!(info["port"], 8472);
    assert_eq!(info["learning"], false);
    assert_eq!(info["local"], "192.168.100.1");
    assert_eq!(info["link"], "eth0");
    assert_eq!(link["mtu"], 1450);
    assert_eq!(link["address"], vtep(&leases[0]).as_str());
    let addrs = h1.ip_json(&format!("-4 addr show dev {DEV}"));
    let a = &addrs[0]["addr_info"];
    assert_eq!(
        (
            a[0]["local"].as_str(),
            a[0]["prefixlen"].as_u64(),
            a.as_array().map(Vec::len)
        ),
        (Some("10.244.1.0"), Some(32), Some(1))
    );
    for (peer, l) in [(2, &leases[1]), (3, &leases[2])] {
        let r = h1.route(&format!("10.244.{peer}.0/24")).expect("route");
        assert_eq!(r["gateway"], format!("10.244.{peer}.0"));
        assert_eq!(r["dev"], DEV);
        assert_eq!(r["protocol"], "87");
        assert!(
            r["flags"]
                .as_array()
                .is_some_and(|f| f.contains(&json!("onlink"))),
            "{r}"
        );
        let n = h1.neighbours(DEV);
        assert!(
            n.iter()
                .any(|n| n["dst"] == format!("10.244.{peer}.0") && n["lladdr"] == vtep(l).as_str()),
            "{n:?}"
        );
        let f = h1.fdb(DEV);
        assert!(
            f.iter()
                .any(|e| e["mac"] == vtep(l).as_str() && e["dst"] == format!("192.168.100.{peer}")),
            "{f:?}"
        );
    }
    assert_eq!(h1.neighbours(DEV).len(), 2);
    assert_eq!(h1.fdb(DEV).len(), 2);

    lab.assert_full_mesh();
}

#[test]
fn removing_a_peer_removes_its_route_neighbour_and_fdb_entry() {
    if !root_or_skip("vxlan::removing_a_peer_removes_its_route_neighbour_and_fdb_entry") {
        return;
    }
    let (lab, leases) = lab(3, vxlan());
    lab.reconcile_all(&leases);
    let h1 = &lab.hosts[0];
    h1.reconcile(&[leases[1].clone()]).expect("reconcile");

    assert!(h1.ns.route("10.244.3.0/24").is_none());
    assert!(h1.ns.route("10.244.2.0/24").is_some());
    let n = h1.ns.neighbours(DEV);
    assert_eq!(n.len(), 1, "{n:?}");
    assert_eq!(n[0]["dst"], "10.244.2.0");
    let f = h1.ns.fdb(DEV);
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(f[0]["mac"], vtep(&leases[1]).as_str());
    assert!(h1.reaches(&lab.hosts[1]));
    assert!(!h1.reaches(&lab.hosts[2]));
}

#[test]
fn second_reconcile_changes_nothing() {
    if !root_or_skip("vxlan::second_reconcile_changes_nothing") {
        return;
    }
    let (lab, leases) = lab(3, vxlan());
    lab.reconcile_all(&leases);
    let h1 = &lab.hosts[0];
    // The watch sees real changes (so an empty one below means something).
    let (result, events) = h1.reconcile_watching(&[leases[1].clone()]);
    result.expect("reconcile");
    assert!(
        events.len() >= 3,
        "route, neighbour and fdb removals expected: {events:#?}"
    );
    h1.reconcile(&others(&leases, 0)).expect("reconcile");

    h1.assert_reconcile_is_a_no_op(&others(&leases, 0), || h1.ns.kernel_dump(DEV));
}

#[test]
fn restart_keeps_the_vtep_mac_and_drops_peers_gone_while_down() {
    if !root_or_skip("vxlan::restart_keeps_the_vtep_mac_and_drops_peers_gone_while_down") {
        return;
    }
    let (lab, leases) = lab(3, vxlan());
    lab.reconcile_all(&leases);
    let h1 = &lab.hosts[0];
    h1.stop();
    // State weft does not own, which must survive.
    h1.ns
        .ip("route add 10.99.0.0/24 via 192.168.100.2 dev eth0");
    h1.ns
        .ip("neigh add 192.168.100.99 lladdr 02:00:00:00:00:99 dev eth0 nud permanent");

    // Host 3 left while weftd was down (flannel #2554).
    h1.start(vxlan());
    let data = h1.prepare(Some(leases[0].clone()));
    assert_eq!(
        data.map(BackendData::from),
        leases[0].backend_data,
        "VTEP MAC changed across restart"
    );
    h1.configure(&leases[0]);
    h1.reconcile(&[leases[1].clone()]).expect("reconcile");

    assert!(h1.ns.route("10.244.3.0/24").is_none());
    assert_eq!(h1.ns.neighbours(DEV).len(), 1);
    assert_eq!(h1.ns.fdb(DEV).len(), 1);
    assert!(
        h1.ns.route("10.99.0.0/24").is_some(),
        "foreign route removed"
    );
    assert_eq!(
        h1.ns.neighbours("eth0").len(),
        1,
        "foreign neighbour removed"
    );
    assert!(h1.reaches(&lab.hosts[1]));
}

#[test]
fn deleted_device_is_noticed_and_recreated_with_everything_on_it() {
    if !root_or_skip("vxlan::deleted_device_is_noticed_and_recreated_with_everything_on_it") {
        return;
    }
    let (lab, leases) = lab(2, vxlan());
    lab.reconcile_all(&leases);
    let h1 = &lab.hosts[0];
    let ns = h1.ns.name.clone();
    let noticed = h1.agent.with_backend(move |b| {
        Box::pin(async move {
            must(&["ip", "-n", &ns, "link", "del", DEV]);
            tokio::time::timeout(std::time::Duration::from_secs(5), b.event())
                .await
                .is_ok()
        })
    });
    assert!(
        noticed,
        "event() did not resolve after the device was deleted"
    );
    assert!(h1.ns.link(DEV).is_none());

    h1.reconcile(&others(&leases, 0)).expect("reconcile");
    let link = h1.ns.link(DEV).expect("recreated");
    assert_eq!(link["address"], vtep(&leases[0]).as_str());
    assert!(h1.ns.route("10.244.2.0/24").is_some());
    assert_eq!(h1.ns.neighbours(DEV).len(), 1);
    assert_eq!(h1.ns.fdb(DEV).len(), 1);
    assert!(h1.reaches(&lab.hosts[1]));
}

#[test]
fn vtep_mac_comes_from_the_previous_lease_when_the_device_is_gone() {
    if !root_or_skip("vxlan::vtep_mac_comes_from_the_previous_lease_when_the_device_is_gone") {
        return;
    }
    let mut lab = Lab::new();
    let h = lab.add_host(1, "192.168.100.1/24", 1500);
    let first = h.up(vxlan());
    h.stop();
    h.ns.ip(&format!("link del {DEV}"));

    // Reboot: no device, the lease in etcd still names the old MAC.
    let mut previous = first.clone();
    previous.backend_data = Some(json!({"VNI": 1, "VtepMAC": "0a:00:00:00:00:2a"}).into());
    h.start(vxlan());
    let data = h.prepare(Some(previous.clone()));
    assert_eq!(data.map(BackendData::from), previous.backend_data);
    assert_eq!(
        h.ns.link(DEV).expect("device")["address"],
        "0a:00:00:00:00:2a"
    );

    // No device and no lease: the derived MAC, the same one as the very first start.
    h.stop();
    h.ns.ip(&format!("link del {DEV}"));
    h.start(vxlan());
    assert_eq!(h.prepare(None).map(BackendData::from), first.backend_data);
}

#[test]
fn mtu_is_underlay_minus_50_or_as_configured() {
    if !root_or_skip("vxlan::mtu_is_underlay_minus_50_or_as_configured") {
        return;
    }
    let mut lab = Lab::new();
    lab.add_host(1, "192.168.100.1/24", 9000);
    let h = &lab.hosts[0];
    h.up(vxlan());
    assert_eq!(h.mtu(), 8950);
    assert_eq!(h.ns.link(DEV).expect("device")["mtu"], 8950);

    h.up(json!({"Type": "vxlan", "MTU": 1400}));
    assert_eq!(h.mtu(), 1400);
    assert_eq!(h.ns.link(DEV).expect("device")["mtu"], 1400);
}

#[test]
fn peers_with_garbage_backend_data_are_skipped_with_errors() {
    if !root_or_skip("vxlan::peers_with_garbage_backend_data_are_skipped_with_errors") {
        return;
    }
    let (lab, leases) = lab(2, vxlan());
    let bogus = |n: u8, data: Option<Value>| Lease {
        subnet: format!("10.244.{n}.0/24").parse().expect("subnet"),
        public_ip: format!("192.168.100.{n}").parse().expect("ip"),
        backend_type: "vxlan".into(),
        backend_data: data.map(BackendData::from),
        ipv6: None,
    };
    let mut peers = vec![
        bogus(7, None),
        bogus(8, Some(json!({"VNI": 1, "VtepMAC": "zz:00:00:00:00:01"}))),
        bogus(9, Some(json!({"VNI": 2, "VtepMAC": "0a:00:00:00:00:09"}))),
        bogus(10, Some(json!({"VNI": 1}))),
        bogus(11, Some(json!({"VNI": 1, "VtepMAC": vtep(&leases[1])}))),
        Lease {
            backend_type: "host-gw".into(),
            ..bogus(12, None)
        },
        Lease {
            backend_data: Some(BackendData::from_json("{\"VNI\": 1, \"VtepMAC\"")),
            ..bogus(13, None)
        },
    ];
    peers.insert(2, leases[1].clone());
    let errs = lab.hosts[0]
        .reconcile(&peers)
        .expect_err("garbage reported");
    assert_eq!(errs.len(), 6, "{errs:?}");
    for n in [7, 8, 9, 10, 11, 13] {
        assert!(
            errs.iter().any(|e| e.contains(&format!("10.244.{n}.0/24"))),
            "{n}: {errs:?}"
        );
    }
    let h1 = &lab.hosts[0];
    assert_eq!(h1.ns.weft_routes().len(), 1);
    assert!(h1.ns.route("10.244.2.0/24").is_some());
    lab.hosts[1]
        .reconcile(&[leases[0].clone()])
        .expect("reconcile");
    assert!(h1.reaches(&lab.hosts[1]));
}

#[test]
fn device_with_other_settings_is_replaced_and_created_like_flannels() {
    if !root_or_skip("vxlan::device_with_other_settings_is_replaced_and_created_like_flannels") {
        return;
    }
    let mut lab = Lab::new();
    lab.add_host(1, "192.168.100.1/24", 1500);
    lab.add_host(2, "192.168.100.2/24", 1500);
    let (h1, h2) = (&lab.hosts[0], &lab.hosts[1]);
    h1.ns.ip(&format!(
        "link add {DEV} type vxlan id 1 dev eth0 local 192.168.100.1 dstport 4789 learning"
    ));
    h1.up(vxlan());
    let ours = h1.ns.link(DEV).expect("device");
    assert_eq!(ours["linkinfo"]["info_data"]["port"], 8472);
    assert_eq!(ours["linkinfo"]["info_data"]["learning"], false);

    // What flanneld's netlink call amounts to, made by iproute2: weft must not differ from it
    // (checksum, offload or GRO-relevant settings included).
    h2.ns.ip(&format!(
        "link add {DEV} type vxlan id 1 dev eth0 local 192.168.100.2 dstport 8472 nolearning"
    ));
    let reference = h2.ns.link(DEV).expect("reference");
    let strip = |v: &Value| {
        let mut v = v.clone();
        for k in [
            "ifindex",
            "address",
            "mtu",
            "flags",
            "operstate",
            "qdisc",
            "link_index",
        ] {
            v.as_object_mut().map(|o| o.remove(k));
        }
        v["linkinfo"]["info_data"]
            .as_object_mut()
            .map(|o| o.remove("local"));
        v
    };
    assert_eq!(strip(&ours), strip(&reference));
}

#[test]
fn direct_routing_uses_plain_routes_for_peers_on_the_same_network() {
    if !root_or_skip("vxlan::direct_routing_uses_plain_routes_for_peers_on_the_same_network") {
        return;
    }
    let mut lab = Lab::new();
    lab.add_host(1, "192.168.100.1/24", 1500);
    lab.add_host(2, "192.168.100.2/24", 1500);
    // Host 3's public IP is on another network, reached through a router (itself, here).
    lab.add_host(3, "192.168.101.3/24", 1500);
    lab.hosts[2].ns.ip("addr add 192.168.100.3/24 dev eth0");
    for h in &lab.hosts[..2] {
        h.ns.ip("route add 192.168.101.0/24 via 192.168.100.3");
    }
    let cfg = json!({"Type": "vxlan", "DirectRouting": true});
    let leases: Vec<Lease> = lab.hosts.iter().map(|h| h.up(cfg.clone())).collect();
    lab.reconcile_all(&leases);

    let h1 = &lab.hosts[0];
    let direct = h1.ns.route("10.244.2.0/24").expect("route to host 2");
    assert_eq!(
        (direct["gateway"].as_str(), direct["dev"].as_str()),
        (Some("192.168.100.2"), Some("eth0"))
    );
    let tunnel = h1.ns.route("10.244.3.0/24").expect("route to host 3");
    assert_eq!(
        (tunnel["gateway"].as_str(), tunnel["dev"].as_str()),
        (Some("10.244.3.0"), Some(DEV))
    );
    assert_eq!(h1.ns.neighbours(DEV).len(), 1);
    assert_eq!(h1.ns.fdb(DEV).len(), 1);
    lab.assert_full_mesh();
}

/// `tx-checksum-ip-generic` of flannel.1 as `ethtool -k` shows it: "on" or "off".
fn tx_checksum(h: &crate::harness::Host) -> String {
    let (ok, out, err) = h.ns.exec(&["ethtool", "-k", DEV]);
    assert!(ok, "ethtool -k {DEV}: {err}");
    out.lines()
        .find_map(|l| l.trim().strip_prefix("tx-checksum-ip-generic: "))
        .and_then(|v| v.split_whitespace().next())
        .unwrap_or_else(|| panic!("no tx-checksum-ip-generic in:\n{out}"))
        .to_string()
}

#[test]
fn tx_checksum_offload_false_turns_the_feature_off_and_keeps_it_off() {
    if !root_or_skip("vxlan::tx_checksum_offload_false_turns_the_feature_off_and_keeps_it_off") {
        return;
    }
    let mut lab = Lab::new();
    lab.add_host(1, "192.168.100.1/24", 1500);
    let h = &lab.hosts[0];
    h.up(vxlan());
    assert_eq!(
        tx_checksum(h),
        "on",
        "without the option: the kernel's default"
    );

    h.up(json!({"Type": "vxlan", "TxChecksumOffload": false}));
    assert_eq!(tx_checksum(h), "off");

    // Turned back on behind weft's back: the next reconcile turns it off again.
    h.ns.exec(&["ethtool", "-K", DEV, "tx-checksum-ip-generic", "on"]);
    assert_eq!(tx_checksum(h), "on");
    h.reconcile(&[]).expect("reconcile");
    assert_eq!(tx_checksum(h), "off");

    // A recreated device gets it too.
    h.stop();
    h.ns.ip(&format!("link del {DEV}"));
    h.up(json!({"Type": "vxlan", "TxChecksumOffload": false}));
    assert_eq!(tx_checksum(h), "off");

    // Without the option again, an operator's setting (flannel's documented `ethtool -K`
    // workaround) is left as it is.
    h.up(vxlan());
    assert_eq!(tx_checksum(h), "off");
    h.up(json!({"Type": "vxlan", "TxChecksumOffload": true}));
    assert_eq!(tx_checksum(h), "on");
}
