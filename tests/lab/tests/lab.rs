//! The lab's own parts that later suites build on: a host cut off from etcd, a multi-member
//! etcd that survives losing one member, and the IPv6 underlay dual-stack tests build on (every
//! host and the switch have an IPv6 address beside the IPv4 one, and a container can be wired for
//! both families), and the hand-made flanneld wireguard node. Needs root.

use std::net::Ipv6Addr;
use std::time::Duration;

use ipnet::{Ipv4Net, Ipv6Net};
use weft_lab::topology::{container_ip, container_ip6, gateway6, wait_port};
use weft_lab::wireguard_go::{self, DualStack, DEV6};
use weft_lab::{require_ipv6, require_root, require_tools, wait_for, Lab, Netns, SWITCH_IP6};

#[test]
fn a_cut_off_host_cannot_reach_etcd_but_still_reaches_the_other_hosts() {
    if !require_root("a_cut_off_host_cannot_reach_etcd_but_still_reaches_the_other_hosts") {
        return;
    }
    let lab = Lab::with_hosts(2, 1500);
    let etcd = lab.etcd_ips();
    let (h0, h1) = (&lab.hosts[0], &lab.hosts[1]);
    let short = Duration::from_secs(1);
    assert!(wait_port(&h0.ns, etcd[0], 2379, short), "etcd reachable");

    h0.cut_off(&etcd);
    assert!(!wait_port(&h0.ns, etcd[0], 2379, short), "etcd cut off");
    assert!(
        h0.ns
            .exec(&["ping", "-c1", "-W1", &h1.addr().to_string()])
            .0,
        "the other host still answers"
    );

    h0.reconnect(&etcd);
    assert!(
        wait_port(&h0.ns, etcd[0], 2379, short),
        "etcd reachable again"
    );
}

#[test]
fn a_three_member_etcd_keeps_serving_with_one_member_down() {
    if !require_root("a_three_member_etcd_keeps_serving_with_one_member_down") {
        return;
    }
    let mut lab = Lab::with_hosts(0, 1500);
    lab.start_etcd(3);
    assert_eq!(lab.etcd_ips().len(), 3);
    lab.etcd().put("/k", "before");

    // Losing a member (perhaps the leader) costs at most an election; then the two left serve.
    lab.etcd_mut().kill_member(0);
    wait_for(
        "the two members left to take a write",
        Duration::from_secs(30),
        || {
            lab.etcd()
                .ctl(&["put", "/k", "during"])
                .status
                .success()
                .then_some(())
        },
    );
    wait_for("the write to be read back", Duration::from_secs(30), || {
        (lab.etcd().get("/k").as_deref() == Some("during")).then_some(())
    });

    lab.etcd_mut().start_member(0);
    lab.etcd().put("/k", "after");
    assert_eq!(lab.etcd().get("/k").as_deref(), Some("after"));
}

fn ping6(from: &Netns, to: Ipv6Addr) -> bool {
    from.exec(&["ping", "-6", "-c1", "-W1", &to.to_string()]).0
}

#[test]
fn lab_hosts_reach_each_other_and_the_switch_over_ipv6() {
    if !require_ipv6("lab_hosts_reach_each_other_and_the_switch_over_ipv6") {
        return;
    }
    let lab = Lab::with_hosts(2, 1500);
    let (h0, h1) = (&lab.hosts[0], &lab.hosts[1]);
    let want: Ipv6Addr = "fd00:10:199::11".parse().expect("v6");
    assert_eq!(h0.addr6(), want, "read like 10.199.0.11");

    assert!(ping6(&h0.ns, h1.addr6()), "h0 -> h1");
    assert!(ping6(&h1.ns, h0.addr6()), "h1 -> h0");
    for h in &lab.hosts {
        assert!(ping6(&h.ns, SWITCH_IP6), "{} -> switch", h.ns.name);
        let routes = h.ns.routes6_json();
        assert!(
            routes
                .iter()
                .any(|r| r["dst"] == "default" && r["gateway"] == SWITCH_IP6.to_string()),
            "{}: no IPv6 default route via the switch: {routes:?}",
            h.ns.name
        );
        let fwd = h.ns.must(&["sysctl", "-n", "net.ipv6.conf.all.forwarding"]);
        assert_eq!(fwd.trim(), "1", "{} forwards IPv6", h.ns.name);
    }
    // IPv4 is as before.
    assert!(
        h0.ns
            .exec(&["ping", "-c1", "-W1", &h1.addr().to_string()])
            .0
    );
}

#[test]
fn lab_container_wired_dual_stack_reaches_its_host_over_both_families() {
    if !require_ipv6("lab_container_wired_dual_stack_reaches_its_host_over_both_families") {
        return;
    }
    let mut lab = Lab::new();
    let h = lab.add_host("10.199.0.11/24", 1500);
    let subnet6 = "fd00:244:1::/64".parse().expect("v6 net");
    h.wire_container_dual("10.244.1.0/24".parse().expect("net"), subnet6, Some(1450));

    let addrs = h.container.ip_json("-6 addr show dev eth0 scope global");
    let got = addrs[0]["addr_info"][0]["local"]
        .as_str()
        .unwrap_or_default();
    assert_eq!(got, container_ip6(subnet6).to_string());
    assert!(h.ping6(gateway6(subnet6)), "container -> cni0");
    assert!(
        h.ping6(h.addr6()),
        "container -> its host's eth0, by the default route"
    );
    assert!(h.ping(h.addr()), "IPv4 still wired");

    // Wiring again (a new lease) replaces the old addresses.
    let subnet6 = "fd00:244:2::/64".parse().expect("v6 net");
    h.wire_container_dual("10.244.2.0/24".parse().expect("net"), subnet6, None);
    assert!(h.ping6(gateway6(subnet6)), "rewired container -> cni0");
}

/// The hand-made flanneld wireguard node of a dual-stack network (Mode `separate`: wireguard-go's
/// `flannel-wg` and `flannel-wg-v6`, one key) works on its own, so a failing interop test points
/// at weft: two of them carry both families between their containers, each over its own device
/// and underlay family.
#[test]
fn two_hand_made_flannel_dual_stack_wireguard_nodes_reach_each_other() {
    let name = "two_hand_made_flannel_dual_stack_wireguard_nodes_reach_each_other";
    if !require_ipv6(name) || !require_tools(name, &wireguard_go::TOOLS) {
        return;
    }
    let mut lab = Lab::new();
    for i in 0..2 {
        lab.add_host(&format!("10.199.0.{}/24", 11 + i), 1500);
    }
    let networks = (
        "10.252.0.0/16".parse().expect("net"),
        "fd00:252::/56".parse().expect("net"),
    );
    let leases: Vec<(Ipv4Net, Ipv6Net)> = (1..=2)
        .map(|n| {
            let s4 = format!("10.252.{n}.0/24").parse().expect("subnet");
            (s4, format!("fd00:252:0:{n}::/64").parse().expect("subnet"))
        })
        .collect();
    let nodes: Vec<DualStack> = (lab.hosts.iter().zip(&leases))
        .map(|(h, &lease)| {
            h.wire_container_dual(lease.0, lease.1, Some(1420));
            DualStack::new(&h.ns, &h.dir, lease, networks, 1420)
        })
        .collect();
    for (a, b) in [(0, 1), (1, 0)] {
        let h = &lab.hosts[b];
        nodes[a].add_peer(nodes[b].public_key(), (h.addr(), h.addr6()), leases[b]);
    }
    for (a, b) in [(0, 1), (1, 0)] {
        let from = &lab.hosts[a];
        let (to4, to6) = (container_ip(leases[b].0), container_ip6(leases[b].1));
        let t = Duration::from_secs(20);
        wait_for("IPv4 through flannel-wg", t, || {
            from.ping(to4).then_some(())
        });
        wait_for("IPv6 through flannel-wg-v6", t, || {
            from.ping6(to6).then_some(())
        });
        // Each family on its device, the IPv6 one dialled over the IPv6 underlay.
        let key = nodes[b].public_key();
        for go in [&nodes[a].v4, &nodes[a].v6] {
            let shake = go.latest_handshake(key);
            assert!(shake.is_some_and(|s| s > 0), "{}: {shake:?}", go.dev);
        }
        let endpoints = nodes[a].v6.must(&["show", DEV6, "endpoints"]);
        let want = format!("{key}\t[{}]:51821", lab.hosts[b].addr6());
        assert_eq!(endpoints.trim(), want);
    }
}
