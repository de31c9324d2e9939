//! Peer routes name nexthop objects of their own (Linux 5.3+), so that thousands of peers with
//! distinct gateways cost the kernel linear time; classic routes remain where a nexthop cannot be
//! made, and are moved over when it can.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde_json::{json, Value};
use weft_backends::{Lease, PeerChanges};

use crate::harness::{lab, must, others, root_or_skip, Host};

fn host_gw() -> Value {
    json!({"Type": "host-gw"})
}

/// The nexthop id weft gives the route to `subnet`: its network address as a number.
fn id_of(subnet: &str) -> u64 {
    let net: Ipv4Net = subnet.parse().expect("subnet");
    u64::from(u32::from(net.network()))
}

fn nexthop(h: &Host, id: u64) -> Option<Value> {
    h.ns.nexthops_json().into_iter().find(|n| n["id"] == id)
}

fn moved(lease: &Lease, public_ip: &str) -> Lease {
    Lease {
        public_ip: public_ip.parse::<Ipv4Addr>().expect("ip"),
        ..lease.clone()
    }
}

#[test]
fn each_peer_route_names_a_nexthop_of_its_own_and_a_new_gateway_replaces_it() {
    if !root_or_skip(
        "nexthops::each_peer_route_names_a_nexthop_of_its_own_and_a_new_gateway_replaces_it",
    ) {
        return;
    }
    let (lab, leases) = lab(3, host_gw());
    lab.reconcile_all(&leases);
    let h1 = &lab.hosts[0];
    for (n, dst) in [(2, "10.244.2.0/24"), (3, "10.244.3.0/24")] {
        let route = h1.ns.route(dst).expect("route");
        assert_eq!(route["nhid"], id_of(dst), "{route}");
        // iproute2 shows the nexthop's gateway with the route (nexthop_compat_mode).
        assert_eq!(route["gateway"], format!("192.168.100.{n}"));
        let nh = nexthop(h1, id_of(dst)).expect("nexthop");
        assert_eq!(nh["gateway"], format!("192.168.100.{n}"));
        assert_eq!(nh["dev"], "eth0");
        assert_eq!(nh["protocol"], "87");
    }
    assert_eq!(h1.ns.nexthops_json().len(), 2, "one nexthop per peer");
    lab.assert_full_mesh();

    // Host 2 takes another address: its nexthop is replaced; the route still names it.
    lab.hosts[1].ns.ip("addr add 192.168.100.12/24 dev eth0");
    let change = PeerChanges {
        upsert: vec![moved(&leases[1], "192.168.100.12")],
        remove: vec![],
    };
    h1.apply(&change).expect("apply");
    let nh = nexthop(h1, id_of("10.244.2.0/24")).expect("nexthop");
    assert_eq!(nh["gateway"], "192.168.100.12");
    let route = h1.ns.route("10.244.2.0/24").expect("route");
    assert_eq!(route["nhid"], id_of("10.244.2.0/24"));
    assert_eq!(route["gateway"], "192.168.100.12");
    assert!(h1.reaches(&lab.hosts[1]));

    // A peer that leaves takes its route and its nexthop with it.
    let gone = PeerChanges {
        upsert: vec![],
        remove: vec![leases[1].subnet],
    };
    h1.apply(&gone).expect("apply");
    assert!(h1.ns.route("10.244.2.0/24").is_none());
    assert!(nexthop(h1, id_of("10.244.2.0/24")).is_none());
    // And a full pass without peers leaves none of either.
    h1.reconcile(&[]).expect("reconcile");
    assert!(h1.ns.weft_routes().is_empty());
    assert!(h1.ns.nexthops_json().is_empty());
}

#[test]
fn classic_routes_of_an_earlier_weft_move_to_nexthops() {
    if !root_or_skip("nexthops::classic_routes_of_an_earlier_weft_move_to_nexthops") {
        return;
    }
    let (lab, leases) = lab(2, host_gw());
    let h1 = &lab.hosts[0];
    h1.ns
        .ip("route add 10.244.2.0/24 via 192.168.100.2 dev eth0 proto 87");
    h1.reconcile(&others(&leases, 0)).expect("reconcile");
    let routes: Vec<Value> = (h1.ns.routes_json().into_iter())
        .filter(|r| r["dst"] == "10.244.2.0/24")
        .collect();
    assert_eq!(routes.len(), 1, "{routes:#?}");
    assert_eq!(routes[0]["nhid"], id_of("10.244.2.0/24"));
    lab.hosts[1]
        .reconcile(&others(&leases, 1))
        .expect("reconcile");
    assert!(h1.reaches(&lab.hosts[1]));
}

#[test]
fn a_nexthop_id_another_program_holds_keeps_that_route_classic_and_the_nexthop_untouched() {
    if !root_or_skip(
        "nexthops::a_nexthop_id_another_program_holds_keeps_that_route_classic_and_the_nexthop_untouched",
    ) {
        return;
    }
    let (lab, leases) = lab(3, host_gw());
    let h1 = &lab.hosts[0];
    let taken = id_of("10.244.2.0/24");
    h1.ns.ip(&format!(
        "nexthop add id {taken} via 192.168.100.3 dev eth0"
    ));
    let theirs = nexthop(h1, taken).expect("their nexthop");
    let peers = others(&leases, 0);
    h1.reconcile(&peers).expect("reconcile");
    let classic = h1.ns.route("10.244.2.0/24").expect("route");
    assert_eq!(classic.get("nhid"), None, "{classic}");
    assert_eq!(classic["gateway"], "192.168.100.2");
    assert_eq!(
        h1.ns.route("10.244.3.0/24").expect("route")["nhid"],
        id_of("10.244.3.0/24")
    );
    h1.assert_reconcile_is_a_no_op(
        &peers,
        || json!({"routes": h1.ns.routes_json(), "nexthops": h1.ns.nexthops_json()}),
    );

    // A targeted change of that peer keeps the classic form and the other program's nexthop.
    lab.hosts[1].ns.ip("addr add 192.168.100.12/24 dev eth0");
    let change = PeerChanges {
        upsert: vec![moved(&leases[1], "192.168.100.12")],
        remove: vec![],
    };
    h1.apply(&change).expect("apply");
    let classic = h1.ns.route("10.244.2.0/24").expect("route");
    assert_eq!(classic.get("nhid"), None, "{classic}");
    assert_eq!(classic["gateway"], "192.168.100.12");
    assert_eq!(nexthop(h1, taken), Some(theirs));

    // Once the id is free, the next full pass moves the route to a nexthop of weft's.
    h1.ns.ip(&format!("nexthop del id {taken}"));
    h1.reconcile(&[moved(&leases[1], "192.168.100.12"), leases[2].clone()])
        .expect("reconcile");
    assert_eq!(h1.ns.route("10.244.2.0/24").expect("route")["nhid"], taken);
    assert_eq!(nexthop(h1, taken).expect("nexthop")["protocol"], "87");
}

#[test]
fn a_deleted_nexthop_is_noticed_and_its_route_put_back() {
    if !root_or_skip("nexthops::a_deleted_nexthop_is_noticed_and_its_route_put_back") {
        return;
    }
    let (lab, leases) = lab(2, host_gw());
    let h1 = &lab.hosts[0];
    let peers = others(&leases, 0);
    h1.reconcile(&peers).expect("reconcile");
    let before = h1.ns.routes_json();
    // The kernel deletes the route with the nexthop and reports only the nexthop's deletion.
    let ns = h1.ns.name.clone();
    let id = id_of("10.244.2.0/24");
    let noticed = h1.agent.with_backend(move |b| {
        Box::pin(async move {
            must(&["ip", "-n", &ns, "nexthop", "del", "id", &id.to_string()]);
            tokio::time::timeout(std::time::Duration::from_secs(5), b.event())
                .await
                .is_ok()
        })
    });
    assert!(
        noticed,
        "event() did not resolve after weft's nexthop was deleted"
    );
    assert!(h1.ns.route("10.244.2.0/24").is_none());
    h1.reconcile(&peers).expect("reconcile");
    assert_eq!(before, h1.ns.routes_json());
}
