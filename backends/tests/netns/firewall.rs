//! flannel's masquerade and forward rules, run inside a namespace (iptables is per namespace).

use std::net::SocketAddr;

use weft_backends::firewall::Firewall;

use crate::harness::{root_or_skip, udp_send, Host, Lab, UdpProbe};

fn firewall(subnet: &str) -> Firewall {
    Firewall {
        network: "10.244.0.0/16".parse().expect("network"),
        subnet: subnet.parse().expect("subnet"),
        ipv6: None,
        masquerade: true,
        forward: true,
        fully_random: true,
    }
}

fn sync(h: &Host, fw: &Firewall) -> bool {
    let fw = fw.clone();
    h.agent
        .run(move || async move { fw.sync().await.map_err(|e| e.to_string()) })
        .expect("sync")
}

fn rules(h: &Host) -> String {
    let (ok, out, err) = h.ns.exec(&["iptables-save"]);
    assert!(ok, "{err}");
    // Drop comments (timestamps) and counters.
    out.lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with(':'))
        .collect::<Vec<_>>()
        .join("\n")
}

fn count(haystack: &str, line: &str) -> usize {
    haystack.lines().filter(|l| *l == line).count()
}

#[test]
fn sync_is_idempotent_restores_rules_and_replaces_an_old_subnet() {
    if !root_or_skip("firewall::sync_is_idempotent_restores_rules_and_replaces_an_old_subnet") {
        return;
    }
    let mut lab = Lab::new();
    lab.add_host(1, "192.168.100.1/24", 1500);
    let h = &lab.hosts[0];
    h.ns.exec(&[
        "iptables",
        "-t",
        "nat",
        "-A",
        "POSTROUTING",
        "-s",
        "172.17.0.0/16",
        "-j",
        "MASQUERADE",
    ]);

    let old = firewall("10.244.1.0/24");
    assert!(sync(h, &old));
    let first = rules(h);
    assert!(!sync(h, &old), "second sync rewrote rules");
    assert_eq!(first, rules(h));
    assert!(first.contains(
        "-A FLANNEL-POSTRTG -s 10.244.1.0/24 -d 10.244.0.0/16 -m comment --comment \"flanneld masq\" -j RETURN"
    ));
    assert!(first.contains(
        "-A FLANNEL-FWD -d 10.244.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT"
    ));

    // Removed behind our back: restored.
    h.ns.exec(&["iptables", "-t", "nat", "-F", "FLANNEL-POSTRTG"]);
    h.ns.exec(&[
        "iptables",
        "-D",
        "FORWARD",
        "-m",
        "comment",
        "--comment",
        "flanneld forward",
        "-j",
        "FLANNEL-FWD",
    ]);
    assert!(sync(h, &old));
    assert_eq!(first, rules(h));

    // A new lease: the old subnet's rules go, nothing is duplicated, foreign rules stay.
    assert!(sync(h, &firewall("10.244.7.0/24")));
    let now = rules(h);
    assert!(!now.contains("10.244.1.0/24"), "{now}");
    assert!(now.contains("-s 10.244.7.0/24 -d 10.244.0.0/16"));
    assert_eq!(
        count(
            &now,
            "-A POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG"
        ),
        1
    );
    assert_eq!(
        count(
            &now,
            "-A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD"
        ),
        1
    );
    assert_eq!(
        count(&now, "-A POSTROUTING -s 172.17.0.0/16 -j MASQUERADE"),
        1
    );
}

#[test]
fn traffic_leaving_the_cluster_is_masqueraded_and_pod_traffic_is_not() {
    if !root_or_skip("firewall::traffic_leaving_the_cluster_is_masqueraded_and_pod_traffic_is_not")
    {
        return;
    }
    let mut lab = Lab::new();
    lab.add_host(1, "192.168.100.1/24", 1500);
    lab.add_host(2, "192.168.100.2/24", 1500);
    lab.add_outsider("192.168.100.200/24");
    let cfg = serde_json::json!({"Type": "host-gw"});
    let l1 = lab.hosts[0].up(cfg.clone());
    let l2 = lab.hosts[1].up(cfg);
    lab.hosts[0].reconcile(&[l2]).expect("reconcile");
    lab.hosts[1].reconcile(&[l1]).expect("reconcile");
    assert!(sync(&lab.hosts[0], &firewall("10.244.1.0/24")));

    let outside = UdpProbe::listen(&lab.outsiders[0], 7000);
    udp_send(
        &lab.hosts[0].container,
        "192.168.100.200:7000".parse::<SocketAddr>().expect("addr"),
    );
    let seen = outside.source().expect("datagram reached the outsider");
    assert_eq!(
        seen.ip().to_string(),
        "192.168.100.1",
        "not masqueraded to the host"
    );

    let pod = UdpProbe::listen(&lab.hosts[1].container, 7001);
    udp_send(
        &lab.hosts[0].container,
        "10.244.2.2:7001".parse::<SocketAddr>().expect("addr"),
    );
    let seen = pod.source().expect("datagram reached the other container");
    assert_eq!(
        seen.ip().to_string(),
        "10.244.1.2",
        "pod-to-pod traffic was masqueraded"
    );
}

#[test]
fn debians_iptables_takes_random_fully() {
    if !root_or_skip("firewall::debians_iptables_takes_random_fully") {
        return;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    assert!(rt.block_on(weft_backends::firewall::supports_random_fully()));
}

#[test]
fn a_dual_stack_host_keeps_flannels_rules_in_ip6tables_too_and_removes_them() {
    if !root_or_skip(
        "firewall::a_dual_stack_host_keeps_flannels_rules_in_ip6tables_too_and_removes_them",
    ) {
        return;
    }
    let mut lab = Lab::new();
    lab.add_host(1, "192.168.100.1/24", 1500);
    let h = &lab.hosts[0];
    let dual = Firewall {
        ipv6: Some((
            "fd00:244::/48".parse().expect("network"),
            "fd00:244:0:1::/64".parse().expect("subnet"),
        )),
        ..firewall("10.244.1.0/24")
    };
    let rules6 = || {
        let (ok, out, err) = h.ns.exec(&["ip6tables-save"]);
        assert!(ok, "{err}");
        out
    };
    assert!(sync(h, &dual), "written");
    let saved = rules6();
    for want in [
        "-A POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG",
        "-A FLANNEL-POSTRTG -s fd00:244::/48 ! -d ff00::/8 -m comment --comment \"flanneld masq\" -j MASQUERADE --random-fully",
        "-A FLANNEL-POSTRTG ! -s fd00:244::/48 -d fd00:244:0:1::/64 -m comment --comment \"flanneld masq\" -j RETURN",
        "-A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD",
        "-A FLANNEL-FWD -d fd00:244::/48 -m comment --comment \"flanneld forward\" -j ACCEPT",
    ] {
        assert_eq!(count(&saved, want), 1, "{want} in\n{saved}");
    }
    assert!(
        rules(h).contains("-s 10.244.0.0/16 ! -d 224.0.0.0/4"),
        "IPv4 beside"
    );
    assert!(!sync(h, &dual), "a second sync writes nothing");

    // Deleted behind weft's back: put back.
    h.ns.must(&["ip6tables", "-t", "nat", "-F", "FLANNEL-POSTRTG"]);
    assert!(sync(h, &dual));
    assert!(rules6().contains("! -d ff00::/8"));

    let fw = dual.clone();
    let removed = h
        .agent
        .run(move || async move { fw.remove().await.map_err(|e| e.to_string()) })
        .expect("remove");
    assert!(removed);
    let after = rules6();
    assert!(!after.contains("fd00:244::/48"), "{after}");
    assert!(!rules(h).contains("10.244.0.0/16"), "IPv4 rules gone too");
}
