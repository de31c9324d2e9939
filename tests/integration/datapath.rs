//! End to end through weftd: simulated hosts in network namespaces, real etcd, real kernel data
//! planes. Needs root.

use std::net::Ipv4Addr;
use std::time::Duration;

use crate::harness::wait_for;
use weft_lab::flannel;
use weft_lab::json::rows;
use weft_lab::probe::source_seen;

use crate::netns::{require_root, Topology, PREFIX, SWITCH_IP};

const VXLAN: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
const HOST_GW: &str = r#"{"Network":"10.245.0.0/16","Backend":{"Type":"host-gw"}}"#;
const T: Duration = Duration::from_secs(30);

fn three_hosts(config: &str, extra: &[&str]) -> Topology {
    let mut t = Topology::new(3, 1500);
    t.set_config(config);
    for i in 0..3 {
        t.start(i, extra);
    }
    for i in 0..3 {
        t.wire_container(i);
    }
    t
}

/// weft-owned (protocol 87) routes on host `i`, as "dst gateway dev".
fn owned_routes(t: &Topology, i: usize) -> Vec<String> {
    let v = t.hosts[i].ns.ip_json("route show proto 87");
    rows(&v, &["dst", "gateway", "dev"])
}

fn neighbours(t: &Topology, i: usize) -> Vec<String> {
    let v = t.hosts[i]
        .ns
        .ip_json("neigh show dev flannel.1 nud permanent");
    rows(&v, &["dst", "lladdr"])
}

fn fdb(t: &Topology, i: usize) -> Vec<String> {
    let v = serde_json::Value::Array(t.hosts[i].ns.fdb("flannel.1"));
    rows(&v, &["mac", "dst"])
}

fn lease_json(t: &Topology, i: usize) -> serde_json::Value {
    let key = format!(
        "{PREFIX}/subnets/{}",
        t.hosts[i].wait_subnet().to_string().replace('/', "-")
    );
    let text = t.etcdctl(&["get", "--print-value-only", &key]);
    serde_json::from_str(text.trim()).unwrap_or_default()
}

#[test]
fn vxlan_three_hosts_every_container_reaches_every_other() {
    if !require_root("vxlan_three_hosts_every_container_reaches_every_other") {
        return;
    }
    let t = three_hosts(VXLAN, &[]);
    t.assert_full_mesh(&[0, 1, 2]);
    for i in 0..3 {
        assert_eq!(t.hosts[i].env_var("FLANNEL_MTU").as_deref(), Some("1450"));
        assert_eq!(owned_routes(&t, i).len(), 2, "{:?}", owned_routes(&t, i));
        assert_eq!(neighbours(&t, i).len(), 2);
        assert_eq!(fdb(&t, i).len(), 2);
        let lease = lease_json(&t, i);
        assert_eq!(lease["BackendType"], "vxlan");
        assert_eq!(lease["BackendData"]["VNI"], 1);
    }
}

#[test]
fn host_gw_three_hosts_every_container_reaches_every_other() {
    if !require_root("host_gw_three_hosts_every_container_reaches_every_other") {
        return;
    }
    let t = three_hosts(HOST_GW, &[]);
    t.assert_full_mesh(&[0, 1, 2]);
    for i in 0..3 {
        assert_eq!(t.hosts[i].env_var("FLANNEL_MTU").as_deref(), Some("1500"));
        let routes = owned_routes(&t, i);
        assert_eq!(routes.len(), 2);
        for (j, h) in t.hosts.iter().enumerate().filter(|(j, _)| *j != i) {
            let want = format!("{} {} eth0", t.hosts[j].wait_subnet(), h.addr());
            assert!(routes.contains(&want), "{want} missing from {routes:?}");
        }
    }
}

#[test]
fn peers_leaving_and_arriving_reprogram_the_others_without_restarts() {
    if !require_root("peers_leaving_and_arriving_reprogram_the_others_without_restarts") {
        return;
    }
    let mut t = three_hosts(VXLAN, &["--subnet-lease-ttl=4s"]);
    t.assert_full_mesh(&[0, 1, 2]);
    let gone = t.hosts[2].wait_subnet().to_string();

    // A crash: no renewals, the lease expires, the others drop its entries.
    t.hosts[2].kill();
    for i in 0..2 {
        wait_for("the expired peer's route to go", T, || {
            (!owned_routes(&t, i).iter().any(|r| r.starts_with(&gone))).then_some(())
        });
        assert_eq!(neighbours(&t, i).len(), 1);
        assert_eq!(fdb(&t, i).len(), 1);
    }
    // An operator's delete of a live peer's lease works the same way.
    let key1 = format!(
        "{PREFIX}/subnets/{}",
        t.hosts[1].wait_subnet().to_string().replace('/', "-")
    );
    t.etcdctl(&["del", &key1]);
    // host 1 leases again at once (same subnet), so host 0 keeps or regains its route.
    t.assert_full_mesh(&[0, 1]);

    // The crashed host comes back: the others add it without restarting.
    t.start(2, &["--subnet-lease-ttl=4s"]);
    t.wire_container(2);
    t.assert_full_mesh(&[0, 1, 2]);
}

#[test]
fn restart_keeps_subnet_and_vtep_mac_with_no_duplicates_and_no_outage_for_others() {
    if !require_root(
        "restart_keeps_subnet_and_vtep_mac_with_no_duplicates_and_no_outage_for_others",
    ) {
        return;
    }
    let mut t = three_hosts(VXLAN, &[]);
    t.assert_full_mesh(&[0, 1, 2]);
    let subnet = t.hosts[0].wait_subnet();
    let mac = lease_json(&t, 0)["BackendData"]["VtepMAC"].clone();
    let before = (owned_routes(&t, 0), neighbours(&t, 0), fdb(&t, 0));
    let peer_view = neighbours(&t, 1);

    // Continuous traffic between the other two hosts while host 0 restarts.
    let ip2 = t.hosts[2].container_ip().to_string();
    let pinger = std::process::Command::new("ip")
        .args(["netns", "exec", &t.hosts[1].container.name])
        .args(["ping", "-q", "-c", "40", "-i", "0.1", "-W", "1", &ip2])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("ping");
    t.hosts[0].stop();
    let logged = t.hosts[0].log().len();
    t.start(0, &[]);
    assert_eq!(t.hosts[0].wait_subnet(), subnet);
    wait_for("weftd to settle after restart", T, || {
        let log = t.hosts[0].log();
        log.get(logged..)?
            .contains("kernel state matches all 2 peers")
            .then_some(())
    });
    let out = pinger.wait_with_output().expect("pinger");
    assert!(
        out.status.success(),
        "traffic between other hosts was cut: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(" 0% packet loss"));

    assert_eq!(
        lease_json(&t, 0)["BackendData"]["VtepMAC"],
        mac,
        "VTEP MAC kept"
    );
    assert_eq!(
        (owned_routes(&t, 0), neighbours(&t, 0), fdb(&t, 0)),
        before,
        "same kernel entries, no duplicates"
    );
    assert_eq!(neighbours(&t, 1), peer_view, "peers need no update");
    t.assert_full_mesh(&[0, 1, 2]);
}

#[test]
fn a_vxlan_device_deleted_behind_weftds_back_is_recreated_and_reprogrammed() {
    if !require_root("a_vxlan_device_deleted_behind_weftds_back_is_recreated_and_reprogrammed") {
        return;
    }
    let t = three_hosts(VXLAN, &[]);
    t.assert_full_mesh(&[0, 1, 2]);
    let before = (owned_routes(&t, 0), neighbours(&t, 0), fdb(&t, 0));
    t.hosts[0].ns.ip("link del flannel.1");
    wait_for("flannel.1 to be reprogrammed", T, || {
        ((owned_routes(&t, 0), neighbours(&t, 0), fdb(&t, 0)) == before).then_some(())
    });
    t.assert_full_mesh(&[0, 1, 2]);
    t.hosts[0].assert_running();
}

#[test]
fn a_peer_deleted_while_weftd_was_down_is_cleaned_up_at_start() {
    if !require_root("a_peer_deleted_while_weftd_was_down_is_cleaned_up_at_start") {
        return;
    }
    let mut t = three_hosts(VXLAN, &[]);
    t.assert_full_mesh(&[0, 1, 2]);
    let gone = t.hosts[2].wait_subnet();
    t.hosts[0].stop();
    t.hosts[2].kill();
    t.etcdctl(&[
        "del",
        &format!("{PREFIX}/subnets/{}", gone.to_string().replace('/', "-")),
    ]);
    assert_eq!(
        owned_routes(&t, 0).len(),
        2,
        "stale state left while down (as flannel #2554)"
    );

    t.start(0, &[]);
    wait_for("stale peer removed at start", T, || {
        (owned_routes(&t, 0).len() == 1).then_some(())
    });
    assert!(!owned_routes(&t, 0)
        .iter()
        .any(|r| r.starts_with(&gone.to_string())));
    assert_eq!(neighbours(&t, 0).len(), 1);
    assert_eq!(fdb(&t, 0).len(), 1);
    t.assert_full_mesh(&[0, 1]);
}

#[test]
fn a_hand_made_flannel_node_and_a_weft_node_reach_each_other() {
    if !require_root("a_hand_made_flannel_node_and_a_weft_node_reach_each_other") {
        return;
    }
    let mut t = Topology::new(2, 1500);
    t.set_config(VXLAN);
    t.start(0, &[]);
    t.wire_container(0);
    let weft_subnet = t.hosts[0].wait_subnet();
    let weft_mac = lease_json(&t, 0)["BackendData"]["VtepMAC"]
        .as_str()
        .expect("mac")
        .to_string();

    // Host 1 is "flanneld": its lease in flannel's exact JSON, its device, FDB and routes by hand.
    let flannel_mac = "c6:2b:1e:55:0d:7a";
    let flannel_subnet: ipnet::Ipv4Net = "10.244.200.0/24".parse().expect("subnet");
    let h1 = &t.hosts[1];
    t.etcd().put_leased(
        &flannel::lease_key(PREFIX, flannel_subnet),
        &flannel::vxlan_lease(h1.addr(), flannel_mac),
        600,
    );
    flannel::vxlan_device(&h1.ns, h1.addr(), flannel_mac, flannel_subnet, 1450);
    flannel::vxlan_peer(&h1.ns, weft_subnet, &weft_mac, t.hosts[0].addr());
    h1.wire_container(flannel_subnet, Some(1450));

    let flannel_container: Ipv4Addr = "10.244.200.2".parse().expect("ip");
    wait_for(
        "weft container to reach the flannel node's container",
        T,
        || t.ping(0, flannel_container).then_some(()),
    );
    assert!(t.ping(1, t.hosts[0].container_ip()), "and back");
    assert!(neighbours(&t, 0).contains(&format!("10.244.200.0 {flannel_mac}")));
}

#[test]
fn an_underlay_mtu_of_9000_gives_flannel_mtu_8950() {
    if !require_root("an_underlay_mtu_of_9000_gives_flannel_mtu_8950") {
        return;
    }
    let mut t = Topology::new(2, 9000);
    t.set_config(VXLAN);
    t.start(0, &[]);
    t.start(1, &[]);
    for i in 0..2 {
        t.wire_container(i);
        assert_eq!(t.hosts[i].env_var("FLANNEL_MTU").as_deref(), Some("8950"));
        let json =
            std::fs::read_to_string(t.hosts[i].dir.join("daemon.json")).expect("daemon.json");
        assert!(json.contains("\"mtu\": 8950"), "{json}");
    }
    t.assert_full_mesh(&[0, 1]);
    // A full-size packet crosses without fragmentation: 8950 - 28 bytes of IP and ICMP header.
    let to = t.hosts[1].container_ip().to_string();
    t.hosts[0]
        .container
        .must(&["ping", "-c1", "-W2", "-M", "do", "-s", "8922", &to]);
}

#[test]
fn ip_masq_hides_containers_from_outside_but_not_from_each_other() {
    if !require_root("ip_masq_hides_containers_from_outside_but_not_from_each_other") {
        return;
    }
    let t = three_hosts(VXLAN, &["-ip-masq"]);
    t.assert_full_mesh(&[0, 1]);
    wait_for("masquerade rules", T, || {
        t.hosts[0]
            .log()
            .contains("firewall rules in place")
            .then_some(())
    });
    let outside = source_seen(&t.hosts[0].container, &t.switch, SWITCH_IP);
    assert_eq!(
        outside,
        Some(t.hosts[0].addr()),
        "leaving the network: the host's address"
    );
    let inside = source_seen(
        &t.hosts[0].container,
        &t.hosts[1].container,
        t.hosts[1].container_ip(),
    );
    assert_eq!(
        inside,
        Some(t.hosts[0].container_ip()),
        "between containers: the container's own"
    );
    assert!(t.hosts[0].env_var("FLANNEL_IPMASQ").as_deref() == Some("true"));
}

#[test]
fn a_config_change_leaves_nothing_of_the_old_network_behind() {
    if !require_root("a_config_change_leaves_nothing_of_the_old_network_behind") {
        return;
    }
    let t = three_hosts(
        r#"{"Network":"10.246.0.0/16","Backend":{"Type":"udp"}}"#,
        &["-ip-masq"],
    );
    t.assert_full_mesh(&[0, 1]);
    let old_keys: Vec<String> = (0..3)
        .map(|i| {
            let s = t.hosts[i].wait_subnet();
            format!("{PREFIX}/subnets/{}", s.to_string().replace('/', "-"))
        })
        .collect();
    let rules = |i: usize| t.hosts[i].ns.exec(&["iptables-save"]).1;
    wait_for("the old network's masquerade rules", T, || {
        rules(0).contains("10.246.0.0/16").then_some(())
    });

    t.set_config(r#"{"Network":"10.248.0.0/16","Backend":{"Type":"vxlan"}}"#);
    for i in 0..3 {
        wait_for("a lease in the new network", T, || {
            let s = t.hosts[i].env_var("FLANNEL_NETWORK")?;
            (s == "10.248.0.0/16").then_some(())
        });
    }
    for i in 0..3 {
        let h = &t.hosts[i];
        assert!(
            h.ns.link("flannel0").is_none(),
            "host {i}: flannel0 left behind"
        );
        assert!(h.ns.link("flannel.1").is_some(), "host {i}: no flannel.1");
        wait_for("the old network's rules to go", T, || {
            (!rules(i).contains("10.246.0.0/16")).then_some(())
        });
        // (cni0 keeps the old subnet until the test wires the container again: not weft's.)
        let routes = owned_routes(&t, i);
        assert!(
            routes.iter().all(|r| !r.contains("10.246.")),
            "host {i}: a route of the old network is left: {routes:?}"
        );
        h.assert_running();
    }
    // Revoked at once (the TTL is 24 h): no key of the old network is left in etcd.
    for key in &old_keys {
        assert_eq!(
            t.etcdctl(&["get", "--print-value-only", key]).trim(),
            "",
            "{key} left"
        );
    }
    for i in 0..3 {
        t.wire_container(i);
    }
    t.assert_full_mesh(&[0, 1, 2]);
}
