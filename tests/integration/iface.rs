//! Interface selection as flanneld does it: -iface by name or address, -iface-regex,
//! -iface-can-reach, else the default route's interface; -public-ip overrides what peers are told.
//! Needs root.

use std::time::Duration;

use crate::harness::wait_for;
use crate::netns::{require_root, Topology, PREFIX};

/// The PublicIP in the only lease in etcd, once there is one.
fn leased_public_ip(t: &Topology) -> String {
    wait_for("a lease", Duration::from_secs(30), || {
        let out = t.etcdctl(&[
            "get",
            "--prefix",
            "--print-value-only",
            &format!("{PREFIX}/subnets/"),
        ]);
        let v: serde_json::Value = serde_json::from_str(out.lines().next()?).ok()?;
        v["PublicIP"].as_str().map(str::to_string)
    })
}

fn run_with(t: &mut Topology, flags: &[&str]) -> String {
    t.etcdctl(&["del", "--prefix", &format!("{PREFIX}/subnets/")]);
    t.start(0, flags);
    let ip = leased_public_ip(t);
    t.hosts[0].stop();
    ip
}

#[test]
fn the_interface_is_chosen_like_flanneld_chooses_it() {
    if !require_root("the_interface_is_chosen_like_flanneld_chooses_it") {
        return;
    }
    let mut t = Topology::new(1, 1500);
    t.set_config(r#"{"Network":"10.91.0.0/16","Backend":{"Type":"alloc"}}"#);
    // A second interface that is not on the default route.
    let ns = &t.hosts[0].ns;
    t.switch.ip(&format!(
        "link add x0 type veth peer name eth1 netns {}",
        ns.name
    ));
    ns.ip("addr add 172.31.9.5/24 dev eth1");
    ns.ip("addr add fd00:31:9::5/64 dev eth1 nodad");
    ns.ip("link set eth1 up");

    assert_eq!(
        run_with(&mut t, &[]),
        "10.199.0.11",
        "default route's interface"
    );
    assert_eq!(run_with(&mut t, &["-iface=eth1"]), "172.31.9.5", "by name");
    assert_eq!(
        run_with(&mut t, &["-iface", "172.31.9.5"]),
        "172.31.9.5",
        "by address"
    );
    assert_eq!(
        run_with(&mut t, &["-iface=fd00:31:9::5"]),
        "172.31.9.5",
        "by IPv6 address: its interface, as flanneld"
    );
    assert_eq!(
        run_with(&mut t, &["-iface=nope", "-iface=eth1"]),
        "172.31.9.5",
        "first match wins"
    );
    assert_eq!(
        run_with(&mut t, &["-iface-regex=^eth[1-9]$"]),
        "172.31.9.5",
        "by regex on the name"
    );
    assert_eq!(
        run_with(&mut t, &["-iface-regex=^172\\.31\\."]),
        "172.31.9.5",
        "by regex on the address"
    );
    // eth1 is on 172.31.9.0/24; 172.31.9.200 is reachable only through it.
    assert_eq!(
        run_with(&mut t, &["-iface-can-reach=172.31.9.200"]),
        "172.31.9.5",
        "the interface of the route to an address"
    );
    assert_eq!(
        run_with(&mut t, &["-iface-can-reach=10.199.0.1"]),
        "10.199.0.11",
        "-iface-can-reach names the underlay's gateway"
    );
    assert_eq!(
        run_with(&mut t, &["-iface=eth0", "-iface-can-reach=172.31.9.200"]),
        "10.199.0.11",
        "-iface wins over -iface-can-reach, as in flanneld"
    );
    assert_eq!(
        run_with(&mut t, &["-public-ip=192.0.2.7"]),
        "192.0.2.7",
        "-public-ip overrides"
    );

    t.start(0, &["-iface=nope"]);
    wait_for("weftd to refuse", Duration::from_secs(10), || {
        t.hosts[0]
            .log()
            .contains("no interface matches -iface nope")
            .then_some(())
    });
}
