//! Dual-stack wireguard end to end: weftd on simulated hosts with an IPv6 underlay beside the IPv4
//! one, real etcd, userspace WireGuard on TUN devices (root). As flanneld: in Mode `separate`
//! (the default) IPv6 travels on its own device `flannel-wg-v6` (ListenPortV6, between
//! PublicIPv6s) beside `flannel-wg`, one key for both; in the one-device modes `flannel-wg`
//! carries both families. And weft interoperates with a flanneld dual-stack node built by hand on
//! wireguard-go.
//!
//! Every weftd has its own key file and control sockets (`<device>.sock`) in its host's directory
//! (`wireguard::start`), where `wg show` reads them.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde_json::json;
use weft_lab::flannel;
use weft_lab::wireguard_go::{DualStack, DEV6, TOOLS};

use crate::harness::wait_for;
use crate::netns::{Topology, PREFIX};
use crate::wireguard::{
    dump_peer, key_file, key_in, ping_series, public_key, start, wg_device, wg_routes, wg_show, DEV,
};

const NET: &str = "10.252.0.0/16";
const NET6: &str = "fd00:252::/56";
const SEPARATE: &str = r#"{"Network":"10.252.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:252::/56","Backend":{"Type":"wireguard"}}"#;
const T: Duration = Duration::from_secs(30);

/// `n` dual-stack hosts of network `config`, all running weftd (`extra` flags) with their own
/// keys and control sockets, their containers wired for both families; `None` (a visible skip,
/// a failure under CI=true) without root, IPv6 or `wg`.
fn hosts(n: usize, config: &str, extra: &[&str]) -> Option<Topology> {
    let name = std::thread::current()
        .name()
        .unwrap_or("dual_stack_wireguard")
        .to_string();
    if !weft_lab::require_tools(&name, &["wg", "unshare"]) {
        return None;
    }
    let all: Vec<usize> = (0..n).collect();
    Topology::dual_stack_with(n, config, &all, |t, i| start(t, i, extra))
}

/// The routes of separate mode: each network into its family's device.
fn separate_routes() -> [String; 2] {
    [format!("{NET} {DEV}"), format!("{NET6} {DEV6}")]
}

/// Asserts that a [`wg_show`] dump has the peer `key`, dialled at `endpoint`, for exactly
/// `subnets` (in any order: the order of allowed ips is the device's).
fn assert_peer(dump: &str, key: &str, endpoint: SocketAddr, subnets: &[String]) {
    let peer = dump_peer(dump, key).unwrap_or_else(|| panic!("no peer {key}:\n{dump}"));
    assert_eq!(peer[2], endpoint.to_string(), "{key}'s endpoint:\n{dump}");
    let allowed: BTreeSet<&str> = peer[3].split(',').collect();
    let want: BTreeSet<&str> = subnets.iter().map(String::as_str).collect();
    assert_eq!(allowed, want, "{key}'s allowed ips:\n{dump}");
}

#[test]
fn three_hosts_in_separate_mode_reach_each_other_over_both_families() {
    let Some(t) = hosts(3, SEPARATE, &[]) else {
        return;
    };
    t.assert_full_mesh(&[0, 1, 2]);
    t.assert_full_mesh6(&[0, 1, 2]);
    let mut keys = Vec::new();
    for i in 0..3 {
        let h = &t.hosts[i];
        let (s4, s6) = (h.wait_subnet(), h.wait_subnet6());
        let lease = t.lease_dual(i);
        let key = public_key(&lease);
        assert_eq!(lease["BackendType"], "wireguard", "{lease}");
        assert_eq!(lease["PublicIPv6"], h.addr6().to_string(), "{lease}");
        assert_eq!(
            lease["BackendData"],
            json!({"PublicKey": key, "Port": 51820}),
            "{lease}"
        );
        assert_eq!(
            lease["BackendV6Data"],
            json!({"PublicKey": key, "Port": 51821}),
            "one key for both devices, ListenPortV6: {lease}"
        );
        assert_eq!(h.env_var("FLANNEL_MTU").as_deref(), Some("1420"));
        assert_eq!(h.env_var("FLANNEL_IPV6_NETWORK").as_deref(), Some(NET6));
        assert_eq!(
            wg_device(&t, i, DEV),
            (1420, vec![format!("{}/32", s4.network())]),
            "flannel-wg: MTU underlay-80, the lease's network address"
        );
        assert_eq!(
            wg_device(&t, i, DEV6),
            (1420, vec![format!("{}/128", s6.network())]),
            "flannel-wg-v6: MTU underlay-80, the IPv6 lease's network address"
        );
        assert_eq!(
            wg_routes(&t, i),
            separate_routes(),
            "one route per network, each into its family's device"
        );
        keys.push(key);
    }
    assert_eq!(
        keys.iter().collect::<BTreeSet<_>>().len(),
        3,
        "a key per host: {keys:?}"
    );

    // Each device of host 0 holds the two others as peers, at their address of its family and
    // its port, for their subnets of its family.
    let h0 = &t.hosts[0];
    for (dev, port) in [(DEV, 51820), (DEV6, 51821)] {
        let dump = wg_show(h0, dev);
        let own = dump.lines().next().expect("the device line");
        assert!(own.contains(&format!("\t{}\t{port}\t", keys[0])), "{dump}");
        assert_eq!(dump.lines().count(), 3, "two peers on {dev}:\n{dump}");
        for (h, key) in t.hosts.iter().zip(&keys).skip(1) {
            let (ip, subnet): (IpAddr, String) = if dev == DEV {
                (h.addr().into(), h.wait_subnet().to_string())
            } else {
                (h.addr6().into(), h.wait_subnet6().to_string())
            };
            assert_peer(&dump, key, SocketAddr::new(ip, port), &[subnet]);
        }
    }
    for i in 0..3 {
        t.hosts[i].assert_running();
    }
}

#[test]
fn a_peer_leaving_takes_both_of_its_wireguard_peers() {
    let Some(mut t) = hosts(3, SEPARATE, &["--subnet-lease-ttl=4s"]) else {
        return;
    };
    t.assert_full_mesh(&[0, 1, 2]);
    t.assert_full_mesh6(&[0, 1, 2]);
    let gone = public_key(&t.lease_dual(2));
    let stays = [public_key(&t.lease_dual(0)), public_key(&t.lease_dual(1))];
    for i in 0..2 {
        for dev in [DEV, DEV6] {
            let dump = wg_show(&t.hosts[i], dev);
            assert!(dump_peer(&dump, &gone).is_some(), "host {i} {dev}:\n{dump}");
        }
    }

    // A crash: its lease runs out 4 s later.
    t.hosts[2].kill();
    for i in 0..2 {
        for dev in [DEV, DEV6] {
            let dump = wait_for(&format!("host {i}'s {dev} to drop host 2"), T, || {
                t.hosts[i].assert_running();
                let dump = wg_show(&t.hosts[i], dev);
                dump_peer(&dump, &gone).is_none().then_some(dump)
            });
            let peers: Vec<&str> = dump.lines().skip(1).collect();
            assert_eq!(peers.len(), 1, "host {i} {dev}:\n{dump}");
            assert!(
                peers[0].starts_with(&stays[1 - i]),
                "the other host stays, host {i} {dev}:\n{dump}"
            );
        }
        assert_eq!(
            wg_routes(&t, i),
            separate_routes(),
            "the network routes stay"
        );
    }
    t.assert_full_mesh(&[0, 1]);
    t.assert_full_mesh6(&[0, 1]);
}

#[test]
fn a_restart_keeps_both_devices_and_the_key() {
    let Some(mut t) = hosts(2, SEPARATE, &[]) else {
        return;
    };
    t.assert_full_mesh(&[0, 1]);
    t.assert_full_mesh6(&[0, 1]);
    let index = |t: &Topology, dev: &str| t.hosts[0].ns.link(dev).map(|l| l["ifindex"].clone());
    let devices = |t: &Topology| [index(t, DEV), index(t, DEV6)];
    let before = devices(&t);
    assert!(before.iter().all(Option::is_some), "both devices exist");
    let subnets = (t.hosts[0].wait_subnet(), t.hosts[0].wait_subnet6());
    let lease = t.lease_dual(0);
    let key_text = std::fs::read(key_file(&t, 0)).expect("key file");

    // 600 pings of each family 20 ms apart (12 s), from host 0's container while weftd on host
    // 0 restarts.
    const COUNT: u32 = 600;
    let h1 = &t.hosts[1];
    let to: [IpAddr; 2] = [h1.container_ip().into(), h1.container_ip6().into()];
    let pingers = to.map(|to| ping_series(&t.hosts[0], to, COUNT));
    std::thread::sleep(Duration::from_millis(500));
    t.hosts[0].stop();
    assert_eq!(devices(&t), before, "both devices stay while no weftd runs");
    start(&mut t, 0, &[]);

    for (to, pinger) in to.iter().zip(pingers) {
        let (text, replies) = pinger.replies();
        // Traffic resumed within the series: the last pings were answered.
        let last = replies.last().map_or(0, |r| r.0);
        assert!(
            last + 10 >= COUNT,
            "to {to}: the last answered ping is icmp_seq={last} of {COUNT}:\n{text}"
        );
    }
    t.hosts[0].assert_running();
    assert_eq!(
        (t.hosts[0].wait_subnet(), t.hosts[0].wait_subnet6()),
        subnets,
        "the same subnets"
    );
    let after = t.lease_dual(0);
    assert_eq!(
        (&after["BackendData"], &after["BackendV6Data"]),
        (&lease["BackendData"], &lease["BackendV6Data"]),
        "the same key and ports"
    );
    assert_eq!(
        std::fs::read(key_file(&t, 0)).expect("key file"),
        key_text,
        "the key file is reused, not rewritten"
    );
    assert_eq!(
        devices(&t),
        before,
        "the same two devices are reopened, not recreated"
    );
    t.assert_full_mesh(&[0, 1]);
    t.assert_full_mesh6(&[0, 1]);
    t.hosts[1].assert_running();
}

/// Mode `auto`, `ipv4` or `ipv6` (`mode`) on a dual-stack network: one device, `flannel-wg`,
/// carries both families; its peers are dialled at their PublicIPv6 when `over6`, else at their
/// PublicIP, on the port the one device listens on.
fn one_device_mode_carries_both_families(mode: &str, over6: bool) {
    let config = format!(
        r#"{{"Network":"10.253.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:253::/56","Backend":{{"Type":"wireguard","Mode":"{mode}"}}}}"#
    );
    let Some(t) = hosts(2, &config, &[]) else {
        return;
    };
    t.assert_full_mesh(&[0, 1]);
    t.assert_full_mesh6(&[0, 1]);
    let mut keys = Vec::new();
    for i in 0..2 {
        let h = &t.hosts[i];
        let (s4, s6) = (h.wait_subnet(), h.wait_subnet6());
        assert!(h.ns.link(DEV6).is_none(), "{mode}: no {DEV6} on host {i}");
        assert_eq!(
            wg_device(&t, i, DEV),
            (
                1420,
                vec![
                    format!("{}/32", s4.network()),
                    format!("{}/128", s6.network())
                ]
            ),
            "{mode}: both lease addresses on flannel-wg"
        );
        assert_eq!(
            wg_routes(&t, i),
            [
                format!("10.253.0.0/16 {DEV}"),
                format!("fd00:253::/56 {DEV}")
            ],
            "{mode}: both networks into flannel-wg"
        );
        assert_eq!(h.env_var("FLANNEL_MTU").as_deref(), Some("1420"));
        let lease = t.lease_dual(i);
        let key = public_key(&lease);
        assert_eq!(key_in(&lease, "BackendV6Data"), key, "{mode}: {lease}");
        assert_eq!(
            (
                &lease["BackendData"]["Port"],
                &lease["BackendV6Data"]["Port"]
            ),
            (&json!(51820), &json!(51820)),
            "{mode}: the port the one device listens on, in both: {lease}"
        );
        keys.push(key);
    }
    let h1 = &t.hosts[1];
    let dump = wg_show(&t.hosts[0], DEV);
    assert_eq!(dump.lines().count(), 2, "{mode}: one peer:\n{dump}");
    let ip: IpAddr = if over6 {
        h1.addr6().into()
    } else {
        h1.addr().into()
    };
    // Both of the peer's subnets, on the port its one device listens on.
    let subnets = [h1.wait_subnet().to_string(), h1.wait_subnet6().to_string()];
    assert_peer(&dump, &keys[1], SocketAddr::new(ip, 51820), &subnets);
    assert!(t.hosts[0].ns.link(DEV6).is_none());
}

/// Mode `auto` dials a peer's PublicIP unless it is private and both ends' IPv6 addresses are
/// public: in the lab (all private) over IPv4.
#[test]
fn one_device_mode_auto_carries_both_families_on_flannel_wg() {
    one_device_mode_carries_both_families("auto", false);
}

#[test]
fn one_device_mode_ipv6_carries_both_families_on_flannel_wg() {
    one_device_mode_carries_both_families("ipv6", true);
}

/// Host 1 is flanneld's in Mode `separate`, built by hand on wireguard-go exactly as flanneld
/// leaves it: `flannel-wg` (51820, the lease's /32, the IPv4 network's route) and `flannel-wg-v6`
/// (51821, the IPv6 lease's /128, the IPv6 network's route) with one private key, its lease in
/// etcd under flannel's dual-stack key in flannel's bytes (with a TTL, flanneld's 24 h) before
/// weftd starts on host 0, and a peer per device for weft's lease.
#[test]
fn a_hand_made_flannel_dual_stack_wireguard_node() {
    let name = "a_hand_made_flannel_dual_stack_wireguard_node";
    if !weft_lab::require_tools(name, &TOOLS) {
        return;
    }
    let Some(mut t) = Topology::dual_stack_with(2, SEPARATE, &[], |_, _| {}) else {
        return;
    };
    let (s4, s6): (ipnet::Ipv4Net, ipnet::Ipv6Net) = (
        "10.252.200.0/24".parse().expect("subnet"),
        "fd00:252:0:c8::/64".parse().expect("subnet"),
    );
    let f = &t.hosts[1];
    let networks = (NET.parse().expect("net"), NET6.parse().expect("net"));
    let go = DualStack::new(&f.ns, &f.dir, (s4, s6), networks, 1420);
    t.etcd().put_leased(
        &flannel::lease_key_dual(PREFIX, s4, s6),
        &flannel::wireguard_lease_dual(f.addr(), f.addr6(), go.public_key()),
        24 * 3600,
    );
    f.wire_container_dual(s4, s6, Some(1420));

    start(&mut t, 0, &[]);
    t.wire_container_dual(0);
    let w = &t.hosts[0];
    let (w4, w6) = (w.wait_subnet(), w.wait_subnet6());
    assert!(
        w4 != s4 && w6 != s6,
        "weft leases around flannel's lease: {w4} {w6}"
    );
    let weft_key = public_key(&t.lease_dual(0));
    go.add_peer(&weft_key, (w.addr(), w.addr6()), (w4, w6));

    let f = &t.hosts[1];
    let (to4, to6) = (
        weft_lab::topology::container_ip(s4),
        weft_lab::topology::container_ip6(s6),
    );
    wait_for("weft's container to reach flannel's over IPv4", T, || {
        w.assert_running();
        w.ping(to4).then_some(())
    });
    wait_for("weft's container to reach flannel's over IPv6", T, || {
        w.ping6(to6).then_some(())
    });
    assert!(f.ping(w.container_ip()), "flannel's container → weft's");
    assert!(
        f.ping6(w.container_ip6()),
        "flannel's container → weft's over IPv6"
    );
    for dev in [&go.v4, &go.v6] {
        let shake = dev.latest_handshake(&weft_key);
        assert!(
            shake.is_some_and(|s| s > 0),
            "wireguard-go's {} shook hands with weft's key: {shake:?}",
            dev.dev
        );
    }
    // weft's view of flannel's node: its IPv6 peer from BackendV6Data, on flannel-wg-v6.
    let dump = wg_show(w, DEV6);
    let endpoint = SocketAddr::new(f.addr6().into(), 51821);
    assert_peer(&dump, go.public_key(), endpoint, &[s6.to_string()]);
    assert_eq!(
        wg_routes(&t, 0),
        separate_routes(),
        "one route per network on weft's host"
    );
    w.assert_running();
    drop(go);
}

#[test]
fn ipv6_turned_off_under_running_hosts_takes_flannel_wg_v6_alone() {
    let Some(t) = hosts(2, SEPARATE, &[]) else {
        return;
    };
    t.assert_full_mesh6(&[0, 1]);
    let keys: Vec<_> = (0..2).map(|i| public_key(&t.lease_dual(i))).collect();
    t.set_config(&format!(
        r#"{{"Network":"{NET}","Backend":{{"Type":"wireguard"}}}}"#
    ));
    for (i, h) in t.hosts.iter().enumerate() {
        wait_for("an IPv4-only subnet.env", T, || {
            h.env_var("FLANNEL_IPV6_SUBNET").is_none().then_some(())
        });
        h.wait_log("only the IPv6 side of the network changed", T);
        assert!(h.ns.link(DEV6).is_none(), "host {i}: {DEV6} left behind");
        assert_eq!(wg_routes(&t, i), [format!("{NET} {DEV}")], "host {i}");
        let lease = crate::wireguard::lease_json(&t, i);
        assert_eq!(public_key(&lease), keys[i], "host {i}: the same key");
        assert!(lease["BackendV6Data"].is_null(), "{lease}");
    }
    t.assert_full_mesh(&[0, 1]);
}
