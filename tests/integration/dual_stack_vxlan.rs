//! Dual-stack vxlan end to end: weftd on simulated hosts with an IPv6 underlay beside the IPv4
//! one, real etcd, real kernels (root). Each host carries IPv6 through `flannel-v6.1` beside
//! `flannel.1`, as flanneld does, and interoperates with a flanneld node built by hand.

use std::time::Duration;

use weft_lab::flannel;
use weft_lab::json::rows;

use crate::harness::wait_for;
use crate::netns::{Topology, PREFIX};

const VXLAN: &str = r#"{"Network":"10.250.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:250::/48","Backend":{"Type":"vxlan"}}"#;
const T: Duration = Duration::from_secs(30);
const DEV6: &str = "flannel-v6.1";

/// weft's IPv4 routes on host `i`, as "dst gateway dev".
fn routes(t: &Topology, i: usize) -> Vec<String> {
    rows(
        &t.hosts[i].ns.ip_json("route show proto 87"),
        &["dst", "gateway", "dev"],
    )
}

/// The permanent neighbours of `flannel-v6.1` on host `i`, as "dst lladdr".
fn neighbours6(t: &Topology, i: usize) -> Vec<String> {
    let v = t.hosts[i]
        .ns
        .ip_json(&format!("-6 neigh show dev {DEV6} nud permanent"));
    rows(&v, &["dst", "lladdr"])
}

/// The FDB entries of `flannel-v6.1` on host `i`, as "mac dst".
fn fdb6(t: &Topology, i: usize) -> Vec<String> {
    rows(
        &serde_json::Value::Array(t.hosts[i].ns.fdb(DEV6)),
        &["mac", "dst"],
    )
}

/// Everything of host `i`'s IPv6 side weft keeps.
fn v6_state(t: &Topology, i: usize) -> (Vec<String>, Vec<String>, Vec<String>) {
    (t.routes6(i), neighbours6(t, i), fdb6(t, i))
}

/// The IPv6 VTEP MAC host `i` publishes.
fn vtep6(t: &Topology, i: usize) -> String {
    t.lease_dual(i)["BackendV6Data"]["VtepMAC"]
        .as_str()
        .unwrap_or_else(|| panic!("host {i} publishes no BackendV6Data VtepMAC"))
        .to_string()
}

#[test]
fn vxlan_dual_stack_containers_reach_each_other_over_both_families() {
    let Some(t) = Topology::dual_stack(3, VXLAN, &[0, 1, 2], &[]) else {
        return;
    };
    t.assert_full_mesh(&[0, 1, 2]);
    t.assert_full_mesh6(&[0, 1, 2]);
    for i in 0..3 {
        let h = &t.hosts[i];
        // VXLAN over IPv6 costs 20 bytes more: FLANNEL_MTU is the IPv6 device's.
        assert_eq!(h.env_var("FLANNEL_MTU").as_deref(), Some("1430"));
        let link = h.ns.link(DEV6).expect("flannel-v6.1");
        let info = &link["linkinfo"]["info_data"];
        assert_eq!(
            (
                info["id"].as_u64(),
                info["local6"].as_str(),
                info["port"].as_u64(),
                info["learning"].as_bool(),
                link["mtu"].as_u64()
            ),
            (
                Some(1),
                Some(h.addr6().to_string().as_str()),
                Some(8472),
                Some(false),
                Some(1430)
            ),
            "{link}"
        );
        let lease = t.lease_dual(i);
        assert_eq!(lease["PublicIPv6"], h.addr6().to_string());
        assert_eq!(lease["BackendV6Data"]["VNI"], 1);
        assert_eq!(lease["BackendV6Data"]["VtepMAC"], link["address"]);
        assert_ne!(
            lease["BackendV6Data"]["VtepMAC"],
            lease["BackendData"]["VtepMAC"]
        );

        let (r6, n6, f6) = v6_state(&t, i);
        assert_eq!(
            (r6.len(), n6.len(), f6.len()),
            (2, 2, 2),
            "{r6:?} {n6:?} {f6:?}"
        );
        for j in (0..3).filter(|j| *j != i) {
            let s6 = t.hosts[j].wait_subnet6();
            let net = s6.network();
            let mac = vtep6(&t, j);
            assert!(r6.contains(&format!("{s6} {net} {DEV6}")), "{r6:?}");
            assert!(n6.contains(&format!("{net} {mac}")), "{n6:?}");
            assert!(
                f6.contains(&format!("{mac} {}", t.hosts[j].addr6())),
                "{f6:?}"
            );
        }
    }
}

#[test]
fn a_dual_stack_vxlan_peer_that_leaves_takes_its_ipv6_entries_with_it() {
    let Some(mut t) = Topology::dual_stack(3, VXLAN, &[0, 1, 2], &["--subnet-lease-ttl=4s"]) else {
        return;
    };
    t.assert_full_mesh6(&[0, 1, 2]);
    let (gone4, gone6) = (t.hosts[2].wait_subnet(), t.hosts[2].wait_subnet6());
    let (mac6, addr6) = (vtep6(&t, 2), t.hosts[2].addr6());
    t.hosts[2].kill();
    for i in 0..2 {
        wait_for("the expired peer's IPv6 route to go", T, || {
            (t.routes6(i).len() == 1).then_some(())
        });
        let (r6, n6, f6) = v6_state(&t, i);
        assert!(
            !r6.iter().any(|r| r.starts_with(&gone6.to_string())),
            "{r6:?}"
        );
        assert!(!n6.iter().any(|n| n.ends_with(&mac6)), "{n6:?}");
        assert!(!f6.contains(&format!("{mac6} {addr6}")), "{f6:?}");
        assert_eq!((n6.len(), f6.len()), (1, 1));
        assert!(!routes(&t, i)
            .iter()
            .any(|r| r.starts_with(&gone4.to_string())));
    }
    t.assert_full_mesh6(&[0, 1]);
    t.assert_full_mesh(&[0, 1]);
}

#[test]
fn restart_keeps_the_ipv6_vtep_mac_and_the_others_ipv6_traffic_flows() {
    let Some(mut t) = Topology::dual_stack(3, VXLAN, &[0, 1, 2], &[]) else {
        return;
    };
    t.assert_full_mesh6(&[0, 1, 2]);
    let (subnet, subnet6) = (t.hosts[0].wait_subnet(), t.hosts[0].wait_subnet6());
    let mac6 = vtep6(&t, 0);
    let before = v6_state(&t, 0);
    let peer_view = (neighbours6(&t, 1), fdb6(&t, 1));

    // Continuous IPv6 traffic between the other two hosts while host 0 restarts.
    let ip2 = t.hosts[2].container_ip6().to_string();
    let pinger = std::process::Command::new("ip")
        .args(["netns", "exec", &t.hosts[1].container.name])
        .args(["ping", "-6", "-q", "-c", "40", "-i", "0.1", "-W", "1", &ip2])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("ping");
    t.hosts[0].stop();
    assert_eq!(
        v6_state(&t, 0),
        before,
        "weftd's exit leaves the IPv6 side in place"
    );
    let logged = t.hosts[0].log().len();
    t.start(0, &[]);
    assert_eq!(t.hosts[0].wait_subnet(), subnet);
    assert_eq!(t.hosts[0].wait_subnet6(), subnet6);
    wait_for("weftd to settle after restart", T, || {
        let log = t.hosts[0].log();
        log.get(logged..)?
            .contains("kernel state matches all 2 peers")
            .then_some(())
    });
    let out = pinger.wait_with_output().expect("pinger");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "IPv6 traffic between other hosts was cut: {text}"
    );
    assert!(text.contains(" 0% packet loss"), "{text}");

    assert_eq!(vtep6(&t, 0), mac6, "IPv6 VTEP MAC kept");
    assert_eq!(v6_state(&t, 0), before, "same IPv6 entries, no duplicates");
    assert_eq!(
        (neighbours6(&t, 1), fdb6(&t, 1)),
        peer_view,
        "peers need no update"
    );
    t.assert_full_mesh6(&[0, 1, 2]);
    t.assert_full_mesh(&[0, 1, 2]);
}

#[test]
fn a_hand_made_flannel_dual_stack_vxlan_node_and_weft_nodes_reach_each_other() {
    // Host 2 is flanneld's, built by hand exactly as flanneld leaves it: its dual-stack lease in
    // etcd under flannel's key and JSON (with BackendV6Data), both devices, and per peer a
    // neighbour, an FDB entry and a route on each.
    let Some(t) = Topology::dual_stack(3, VXLAN, &[0, 1], &[]) else {
        return;
    };
    let f = &t.hosts[2];
    let (s4, s6): (ipnet::Ipv4Net, ipnet::Ipv6Net) = (
        "10.250.200.0/24".parse().expect("subnet"),
        "fd00:250:0:c8::/64".parse().expect("subnet"),
    );
    let (mac, mac6) = ("c6:2b:1e:55:0d:7a", "c6:2b:1e:55:0d:7b");
    t.etcd().put_leased(
        &flannel::lease_key_dual(PREFIX, s4, s6),
        &flannel::vxlan_lease_dual(f.addr(), mac, f.addr6(), mac6),
        600,
    );
    // flanneld gives both devices and the containers the IPv4 figure.
    flannel::vxlan_device(&f.ns, f.addr(), mac, s4, 1450);
    flannel::vxlan_device6(&f.ns, f.addr6(), mac6, s6, 1450);
    for i in 0..2 {
        let h = &t.hosts[i];
        let lease = t.lease_dual(i);
        let weft_mac = lease["BackendData"]["VtepMAC"].as_str().expect("mac");
        flannel::vxlan_peer(&f.ns, h.wait_subnet(), weft_mac, h.addr());
        flannel::vxlan_peer6(&f.ns, h.wait_subnet6(), &vtep6(&t, i), h.addr6());
    }
    f.wire_container_dual(s4, s6, Some(1450));
    // What flanneld's IPv6 device really gets: its containers may send IPv6 packets it drops.
    assert_eq!(f.ns.link("flannel-v6.1").expect("device")["mtu"], 1430);

    let (to4, to6) = (
        weft_lab::topology::container_ip(s4),
        weft_lab::topology::container_ip6(s6),
    );
    for i in 0..2 {
        let h = &t.hosts[i];
        wait_for("weft's container to reach flannel's over IPv4", T, || {
            h.ping(to4).then_some(())
        });
        wait_for("weft's container to reach flannel's over IPv6", T, || {
            h.ping6(to6).then_some(())
        });
        assert!(
            f.ping(h.container_ip()),
            "flannel's container to weft's over IPv4"
        );
        assert!(
            f.ping6(h.container_ip6()),
            "flannel's container to weft's over IPv6"
        );
        let net6 = s6.network();
        assert!(
            neighbours6(&t, i).contains(&format!("{net6} {mac6}")),
            "{:?}",
            neighbours6(&t, i)
        );
        assert!(
            fdb6(&t, i).contains(&format!("{mac6} {}", f.addr6())),
            "{:?}",
            fdb6(&t, i)
        );
    }
    t.assert_full_mesh6(&[0, 1]);
}

#[test]
fn a_config_change_from_dual_stack_vxlan_leaves_no_ipv6_device_or_rules_behind() {
    let Some(t) = Topology::dual_stack(2, VXLAN, &[0, 1], &["-ip-masq"]) else {
        return;
    };
    t.assert_full_mesh6(&[0, 1]);
    let rules6 = |i: usize| t.hosts[i].ns.exec(&["ip6tables-save"]).1;
    wait_for("ip6tables rules for fd00:250::/48", T, || {
        rules6(0).contains("fd00:250::/48").then_some(())
    });
    t.set_config(r#"{"Network":"10.251.0.0/16","Backend":{"Type":"host-gw"}}"#);
    for i in 0..2 {
        wait_for("a lease in the new network", T, || {
            (t.hosts[i].env_var("FLANNEL_NETWORK")? == "10.251.0.0/16").then_some(())
        });
        let h = &t.hosts[i];
        assert!(h.ns.link(DEV6).is_none(), "host {i}: {DEV6} left behind");
        assert!(
            h.ns.link("flannel.1").is_none(),
            "host {i}: flannel.1 left behind"
        );
        assert!(t.routes6(i).is_empty(), "host {i}: {:?}", t.routes6(i));
        wait_for("the old IPv6 rules to go", T, || {
            (!rules6(i).contains("fd00:250::/48")).then_some(())
        });
        assert!(
            h.env_var("FLANNEL_IPV6_SUBNET").is_none(),
            "an IPv4 network now"
        );
    }
}

#[test]
fn ipv6_turned_off_under_running_vxlan_hosts_takes_flannel_v6_alone() {
    let Some(t) = Topology::dual_stack(2, VXLAN, &[0, 1], &[]) else {
        return;
    };
    t.assert_full_mesh6(&[0, 1]);
    let before: Vec<_> = (0..2).map(|i| t.hosts[i].wait_subnet()).collect();
    let index = |i: usize| {
        t.hosts[i]
            .ns
            .link("flannel.1")
            .map(|l| l["ifindex"].clone())
    };
    let kept: Vec<_> = (0..2).map(index).collect();
    t.set_config(r#"{"Network":"10.250.0.0/16","Backend":{"Type":"vxlan"}}"#);
    for (i, h) in t.hosts.iter().enumerate() {
        wait_for("an IPv4-only subnet.env", T, || {
            h.env_var("FLANNEL_IPV6_SUBNET").is_none().then_some(())
        });
        h.wait_log("only the IPv6 side of the network changed", T);
        assert!(h.ns.link(DEV6).is_none(), "host {i}: {DEV6} left behind");
        assert_eq!(index(i), kept[i], "host {i}: flannel.1 kept, not made anew");
        assert_eq!(h.wait_subnet(), before[i], "host {i}: the same IPv4 subnet");
        wait_for("flannel.1 back at the IPv4-only MTU", T, || {
            let mtu = h.ns.link("flannel.1")?["mtu"].as_u64()?;
            (mtu == 1450).then_some(())
        });
    }
    t.assert_full_mesh(&[0, 1]);
}
