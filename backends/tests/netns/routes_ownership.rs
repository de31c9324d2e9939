//! Which kernel objects a backend owns: never a route it did not create (a local bridge's
//! connected route, another weftd's routes), never another instance's firewall rules.

use serde_json::{json, Value};
use weft_backends::firewall::Firewall;
use weft_backends::Lease;

use crate::harness::{lab, messages, root_or_skip, Agent, Host};

fn host_gw() -> Value {
    json!({"Type": "host-gw"})
}

fn lease(subnet: &str, public_ip: &str, backend_type: &str, data: Option<Value>) -> Lease {
    Lease {
        subnet: subnet.parse().expect("subnet"),
        public_ip: public_ip.parse().expect("ip"),
        backend_type: backend_type.into(),
        backend_data: data.map(Into::into),
        ipv6: None,
    }
}

/// Every route of the main table to `dst`.
fn routes_to(h: &Host, dst: &str) -> Vec<Value> {
    h.ns.routes_json()
        .into_iter()
        .filter(|r| r["dst"] == dst)
        .collect()
}

/// A second weftd on the same host: its own agent (backend) in the host's namespace, serving
/// `network` and holding `own`.
fn second_instance(h: &Host, network: &str, config: Value, own: &Lease) -> Agent {
    let agent = Agent::spawn(&h.ns);
    agent.start_backend(network, config).expect("backend");
    let own = own.clone();
    agent
        .with_backend(move |b| {
            Box::pin(async move {
                b.prepare(None).await.map_err(|e| e.to_string())?;
                b.configure(&own).await.map_err(|e| e.to_string())
            })
        })
        .expect("prepare and configure");
    agent
}

fn reconcile(agent: &Agent, peers: &[Lease]) -> Result<(), Vec<String>> {
    let peers = peers.to_vec();
    agent
        .with_backend(move |b| Box::pin(async move { b.reconcile(&peers).await.map_err(messages) }))
}

/// What a vxlan instance programs on its device: routes through it, neighbours, FDB entries.
fn device_state(h: &Host, dev: &str) -> Value {
    let routes: Vec<Value> =
        h.ns.routes_json()
            .into_iter()
            .filter(|r| r["dev"] == dev)
            .collect();
    json!({"routes": routes, "neigh": h.ns.neighbours(dev), "fdb": h.ns.fdb(dev)})
}

fn sync(h: &Host, fw: &Firewall) -> bool {
    let fw = fw.clone();
    h.agent
        .run(move || async move { fw.sync().await.map_err(|e| e.to_string()) })
        .expect("sync")
}

fn firewall(network: &str, subnet: &str) -> Firewall {
    Firewall {
        network: network.parse().expect("network"),
        subnet: subnet.parse().expect("subnet"),
        ipv6: None,
        masquerade: true,
        forward: true,
        fully_random: true,
    }
}

/// The rules of both flannel chains, without counters.
fn flannel_rules(h: &Host) -> Vec<String> {
    let out = h.ns.must(&["iptables-save"]);
    out.lines()
        .filter(|l| l.starts_with("-A FLANNEL-") || l.contains("-j FLANNEL-"))
        .map(str::to_string)
        .collect()
}

#[test]
fn a_peer_lease_for_a_local_bridges_subnet_leaves_the_connected_route_alone() {
    if !root_or_skip(
        "routes_ownership::a_peer_lease_for_a_local_bridges_subnet_leaves_the_connected_route_alone",
    ) {
        return;
    }
    let (lab, leases) = lab(2, host_gw());
    let h1 = &lab.hosts[0];
    // docker0 still holds this host's old subnet, which another host has leased since.
    h1.ns.ip("link add docker0 type bridge");
    h1.ns.ip("addr add 10.244.5.1/24 dev docker0");
    h1.ns.ip("link set docker0 up");
    let connected = routes_to(h1, "10.244.5.0/24");
    assert_eq!(connected.len(), 1, "{connected:?}");
    assert_eq!(connected[0]["protocol"], "kernel");
    assert_eq!(connected[0]["scope"], "link");
    assert_eq!(connected[0]["dev"], "docker0");
    let taker = lease("10.244.5.0/24", "192.168.100.2", "host-gw", None);
    let peers = [leases[1].clone(), taker.clone()];

    // A conflict, named in one line; the connected route is untouched; other peers are served.
    let errs = h1.reconcile(&peers).expect_err("conflict");
    assert_eq!(errs.len(), 1, "{errs:?}");
    let conflict = &errs[0];
    assert!(
        conflict.contains("10.244.5.0/24 via 192.168.100.2 dev eth0")
            && conflict.contains("dev docker0 proto kernel scope link")
            && !conflict.contains('\n'),
        "{conflict}"
    );
    assert_eq!(routes_to(h1, "10.244.5.0/24"), connected);
    assert_eq!(
        h1.ns.route("10.244.2.0/24").expect("peer route")["protocol"],
        "87"
    );
    // The same words every pass, so the agent logs it once.
    assert_eq!(h1.reconcile(&peers).expect_err("conflict"), errs);
    assert_eq!(routes_to(h1, "10.244.5.0/24"), connected);

    // The peer goes: the connected route stays.
    h1.reconcile(&[leases[1].clone()])
        .expect("no conflict left");
    assert_eq!(routes_to(h1, "10.244.5.0/24"), connected);

    // The bridge gives the subnet up: the next reconcile installs weft's route.
    h1.reconcile(&peers).expect_err("conflict again");
    h1.ns.ip("addr del 10.244.5.1/24 dev docker0");
    assert!(routes_to(h1, "10.244.5.0/24").is_empty());
    h1.reconcile(&peers).expect("route installed");
    let ours = routes_to(h1, "10.244.5.0/24");
    assert_eq!(ours.len(), 1, "{ours:?}");
    assert_eq!(ours[0]["gateway"], "192.168.100.2");
    assert_eq!(ours[0]["protocol"], "87");

    // The bridge takes it back (the kernel adds its route beside weft's): weft withdraws its
    // own route and reports the conflict; the connected route is the only one left.
    h1.ns.ip("addr add 10.244.5.1/24 dev docker0");
    h1.reconcile(&peers).expect_err("conflict");
    assert_eq!(routes_to(h1, "10.244.5.0/24"), connected);
    h1.reconcile(&[leases[1].clone()])
        .expect("no conflict left");
    assert_eq!(routes_to(h1, "10.244.5.0/24"), connected);
}

#[test]
fn two_host_gw_instances_with_different_networks_leave_each_others_routes_and_rules_alone() {
    if !root_or_skip(
        "routes_ownership::two_host_gw_instances_with_different_networks_leave_each_others_routes_and_rules_alone",
    ) {
        return;
    }
    let (lab, leases) = lab(2, host_gw());
    let h1 = &lab.hosts[0];
    let own_b = lease("10.245.1.0/24", "192.168.100.1", "host-gw", None);
    let b = second_instance(h1, "10.245.0.0/16", host_gw(), &own_b);
    let peer_b = lease("10.245.2.0/24", "192.168.100.2", "host-gw", None);
    h1.reconcile(&[leases[1].clone()]).expect("reconcile a");
    reconcile(&b, &[peer_b]).expect("reconcile b");
    let route_b = h1.ns.route("10.245.2.0/24").expect("b's route");
    assert_eq!(route_b["protocol"], "87");

    let (fw_a, fw_b) = (
        firewall("10.244.0.0/16", "10.244.1.0/24"),
        firewall("10.245.0.0/16", "10.245.1.0/24"),
    );
    assert!(sync(h1, &fw_a));
    assert!(sync(h1, &fw_b));
    let rules = flannel_rules(h1);
    assert!(!sync(h1, &fw_a), "a rewrote rules: b's were in its way");
    assert!(!sync(h1, &fw_b), "b rewrote rules: a's were in its way");
    assert_eq!(flannel_rules(h1), rules);
    for net in ["10.244.0.0/16", "10.245.0.0/16"] {
        let n = rules.iter().filter(|r| r.contains(net)).count();
        assert_eq!(
            n, 7,
            "5 masquerade and 2 forward rules for {net}: {rules:#?}"
        );
    }

    // a's peers all leave: b's route stays.
    h1.reconcile(&[]).expect("reconcile a");
    assert!(h1.ns.route("10.244.2.0/24").is_none());
    assert_eq!(h1.ns.route("10.245.2.0/24"), Some(route_b));
    // And the other way round.
    h1.reconcile(&[leases[1].clone()]).expect("reconcile a");
    reconcile(&b, &[]).expect("reconcile b");
    assert!(h1.ns.route("10.245.2.0/24").is_none());
    assert_eq!(
        h1.ns.route("10.244.2.0/24").expect("a's route")["protocol"],
        "87"
    );

    // a's network is replaced: its rules go, b's stay as they were.
    let b_rules: Vec<String> = rules
        .iter()
        .filter(|r| !r.contains("10.244."))
        .cloned()
        .collect();
    let fw = fw_a.clone();
    let removed = h1
        .agent
        .run(move || async move { fw.remove().await.map_err(|e| e.to_string()) })
        .expect("remove");
    assert!(removed);
    assert_eq!(flannel_rules(h1), b_rules);
    assert!(!sync(h1, &fw_b));
}

#[test]
fn two_vxlan_instances_with_different_vnis_leave_each_others_state_alone() {
    if !root_or_skip(
        "routes_ownership::two_vxlan_instances_with_different_vnis_leave_each_others_state_alone",
    ) {
        return;
    }
    let vxlan = |vni: u32| json!({"Type": "vxlan", "VNI": vni});
    let (lab, leases) = lab(2, vxlan(1));
    let h1 = &lab.hosts[0];
    let own_b = lease("10.245.1.0/24", "192.168.100.1", "vxlan", None);
    let b = second_instance(h1, "10.245.0.0/16", vxlan(2), &own_b);
    let peer_b = lease(
        "10.245.2.0/24",
        "192.168.100.2",
        "vxlan",
        Some(json!({"VNI": 2, "VtepMAC": "02:00:00:00:02:02"})),
    );
    lab.reconcile_all(&leases);
    reconcile(&b, std::slice::from_ref(&peer_b)).expect("reconcile b");
    let state_b = device_state(h1, "flannel.2");
    assert_eq!(
        h1.ns.route("10.245.2.0/24").expect("b's route")["dev"],
        "flannel.2"
    );

    h1.reconcile(&[]).expect("reconcile a");
    assert!(h1.ns.route("10.244.2.0/24").is_none());
    assert!(h1.ns.neighbours("flannel.1").is_empty());
    assert!(h1.ns.fdb("flannel.1").is_empty());
    assert_eq!(device_state(h1, "flannel.2"), state_b);

    h1.reconcile(&[leases[1].clone()]).expect("reconcile a");
    let state_a = device_state(h1, "flannel.1");
    reconcile(&b, &[]).expect("reconcile b");
    assert!(h1.ns.route("10.245.2.0/24").is_none());
    assert!(h1.ns.fdb("flannel.2").is_empty());
    assert_eq!(device_state(h1, "flannel.1"), state_a);
    assert!(h1.reaches(&lab.hosts[1]));
}

#[test]
fn a_weft_route_outside_this_instances_network_is_left_alone() {
    if !root_or_skip("routes_ownership::a_weft_route_outside_this_instances_network_is_left_alone")
    {
        return;
    }
    let (lab, leases) = lab(2, host_gw());
    let h1 = &lab.hosts[0];
    // Another weftd's route (protocol 87 too), into its own network 10.99.0.0/16.
    h1.ns
        .ip("route add 10.99.2.0/24 via 192.168.100.2 dev eth0 proto 87");
    let theirs = h1.ns.route("10.99.2.0/24").expect("route");
    h1.reconcile(&[leases[1].clone()]).expect("reconcile");
    h1.reconcile(&[]).expect("reconcile");
    assert_eq!(h1.ns.route("10.99.2.0/24"), Some(theirs));
    assert!(h1
        .ns
        .weft_routes()
        .iter()
        .all(|r| r["dst"] == "10.99.2.0/24"));
}
