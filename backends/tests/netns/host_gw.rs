//! host-gw backend: a route per peer via its public IP, only for peers on a connected network.

use serde_json::{json, Value};
use weft_backends::Lease;

use crate::harness::{lab, must, others, root_or_skip};

fn host_gw() -> Value {
    json!({"Type": "host-gw"})
}

#[test]
fn three_hosts_every_container_reaches_every_other() {
    if !root_or_skip("host_gw::three_hosts_every_container_reaches_every_other") {
        return;
    }
    let (lab, leases) = lab(3, host_gw());
    assert_eq!(
        leases[0].backend_data, None,
        "flannel's host-gw publishes no BackendData"
    );
    assert_eq!(lab.hosts[0].mtu(), 1500);
    lab.reconcile_all(&leases);
    let r = lab.hosts[0].ns.route("10.244.3.0/24").expect("route");
    assert_eq!(r["gateway"], "192.168.100.3");
    assert_eq!(r["dev"], "eth0");
    assert_eq!(r["protocol"], "87");
    lab.assert_full_mesh();

    // Idempotent, and a peer removed from the set loses its route.
    let h1 = &lab.hosts[0];
    let before = h1.ns.routes_json();
    h1.assert_reconcile_is_a_no_op(&others(&leases, 0), || {
        serde_json::Value::Array(h1.ns.routes_json())
    });

    // A route deleted behind the backend's back is noticed and put back.
    let ns = h1.ns.name.clone();
    let noticed = h1.agent.with_backend(move |b| {
        Box::pin(async move {
            must(&["ip", "-n", &ns, "route", "del", "10.244.2.0/24"]);
            tokio::time::timeout(std::time::Duration::from_secs(5), b.event())
                .await
                .is_ok()
        })
    });
    assert!(
        noticed,
        "event() did not resolve after an owned route was deleted"
    );
    h1.reconcile(&others(&leases, 0)).expect("reconcile");
    assert_eq!(before, h1.ns.routes_json());
    h1.reconcile(&[leases[1].clone()]).expect("reconcile");
    assert!(h1.ns.route("10.244.3.0/24").is_none());
    assert_eq!(h1.ns.weft_routes().len(), 1);
}

#[test]
fn peer_not_on_a_connected_network_is_an_error_and_others_still_work() {
    if !root_or_skip("host_gw::peer_not_on_a_connected_network_is_an_error_and_others_still_work") {
        return;
    }
    let (lab, leases) = lab(2, host_gw());
    let far = Lease {
        subnet: "10.244.4.0/24".parse().expect("subnet"),
        public_ip: "192.168.200.4".parse().expect("ip"),
        backend_type: "host-gw".into(),
        backend_data: None,
        ipv6: None,
    };
    let errs = lab.hosts[0]
        .reconcile(&[far, leases[1].clone()])
        .expect_err("unreachable peer");
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].contains("10.244.4.0/24") && errs[0].contains("directly connected"),
        "{errs:?}"
    );
    assert!(lab.hosts[0].ns.route("10.244.4.0/24").is_none());
    assert!(lab.hosts[0].ns.route("10.244.2.0/24").is_some());
    lab.hosts[1]
        .reconcile(&[leases[0].clone()])
        .expect("reconcile");
    assert!(lab.hosts[0].reaches(&lab.hosts[1]));
}

#[test]
fn routes_left_by_flanneld_are_taken_over_and_stale_owned_routes_removed() {
    if !root_or_skip(
        "host_gw::routes_left_by_flanneld_are_taken_over_and_stale_owned_routes_removed",
    ) {
        return;
    }
    let (lab, leases) = lab(2, host_gw());
    let h1 = &lab.hosts[0];
    // flanneld's route for a live peer (proto boot), a stale weft route for a peer that left
    // while weftd was down, and the administrator's route.
    h1.ns
        .ip("route add 10.244.2.0/24 via 192.168.100.2 dev eth0 proto boot");
    h1.ns
        .ip("route add 10.244.9.0/24 via 192.168.100.9 dev eth0 proto 87");
    h1.ns
        .ip("route add 10.99.0.0/24 via 192.168.100.2 dev eth0");
    h1.reconcile(&[leases[1].clone()]).expect("reconcile");

    let r = h1.ns.route("10.244.2.0/24").expect("route");
    assert_eq!(r["protocol"], "87");
    assert_eq!(
        h1.ns
            .routes_json()
            .iter()
            .filter(|r| r["dst"] == "10.244.2.0/24")
            .count(),
        1
    );
    assert!(h1.ns.route("10.244.9.0/24").is_none());
    let foreign = h1.ns.route("10.99.0.0/24").expect("foreign route kept");
    assert_ne!(foreign["protocol"], "87");
}
