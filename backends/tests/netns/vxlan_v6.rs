//! vxlan on a dual-stack network: `flannel-v6.<VNI>` beside `flannel.<VNI>`, made as flanneld
//! makes it, with its neighbours, FDB entries and routes kept in line with the peers' IPv6 sides,
//! and surviving a restart like the IPv4 device.

use std::time::Duration;

use ipnet::Ipv6Net;
use rtnetlink::packet_route::neighbour::NeighbourState;
use rtnetlink::packet_route::route::RouteProtocol;
use rtnetlink::packet_route::RouteNetlinkMessage;
use serde_json::{json, Value};
use weft_backends::{
    Backend, BackendConfig, BackendData, InterfaceSelector, Lease, LeaseV6, Network, PeerChanges,
    RTPROT_WEFT,
};

use crate::harness::{messages, must, others, Host, Lab, NETWORK};

const DEV: &str = "flannel.1";
const DEV6: &str = "flannel-v6.1";
const NETWORK6: &str = "fd00:244::/48";

fn vxlan() -> Value {
    json!({"Type": "vxlan"})
}

/// Root and the kernel's IPv6, or a visible skip (a failure under CI=true).
fn ipv6_or_skip(test: &str) -> bool {
    weft_lab::require_ipv6(&format!("vxlan_v6::{test}"))
}

/// Host `n`'s IPv6 lease: fd00:244:0:<n>::/64.
fn subnet6(n: u8) -> Ipv6Net {
    format!("fd00:244:0:{n:x}::/64").parse().expect("subnet")
}

/// Builds the vxlan backend for the dual-stack network on eth0, as weftd would.
fn start_dual(h: &Host, config: Value) {
    let external = h.agent.run(|| async {
        let sel = InterfaceSelector {
            ifaces: vec!["eth0".into()],
            ..Default::default()
        };
        sel.select().await.expect("eth0")
    });
    assert_eq!(external.iface_addr6, Some(h.addr6()), "eth0's IPv6 address");
    let map = match config {
        Value::Object(m) => m,
        _ => Default::default(),
    };
    h.agent.set_backend(move || {
        let net = Network {
            network: NETWORK.parse().expect("net"),
            network_v6: Some(NETWORK6.parse().expect("net")),
            external,
        };
        Some(Backend::new(&BackendConfig::new(map), net).expect("backend"))
    });
}

fn backend_v6_data(h: &Host) -> Option<Value> {
    h.agent
        .with_backend(|b| Box::pin(async move { b.backend_v6_data() }))
}

/// The dual-stack lease `h` publishes with the data `prepare` and `backend_v6_data` returned.
fn dual_lease(h: &Host, data: Option<Value>, data6: Option<Value>) -> Lease {
    Lease {
        subnet: h.subnet,
        public_ip: h.ip(),
        backend_type: "vxlan".into(),
        backend_data: data.map(Into::into),
        ipv6: Some(LeaseV6 {
            subnet: subnet6(h.n),
            public_ip: Some(h.addr6()),
            backend_data: data6.map(Into::into),
        }),
    }
}

/// start + prepare (with `previous`) + configure, dual-stack; the container wired for both
/// families with FLANNEL_MTU.
fn up(h: &Host, previous: Option<Lease>) -> Lease {
    start_dual(h, vxlan());
    let data = h.prepare(previous);
    let lease = dual_lease(h, data, backend_v6_data(h));
    h.configure(&lease);
    let mtu = h.mtu();
    h.wire_container_dual(h.subnet, subnet6(h.n), Some(mtu));
    lease
}

/// `n` dual-stack hosts on 192.168.100.0/24 (and fd00:192:168:100::/64), all up.
fn dual_lab(n: u8) -> (Lab, Vec<Lease>) {
    let mut lab = Lab::new();
    for i in 1..=n {
        lab.add_host(i, &format!("192.168.100.{i}/24"), 1500);
    }
    let leases = lab.hosts.iter().map(|h| up(h, None)).collect();
    (lab, leases)
}

fn reconcile_all(lab: &Lab, leases: &[Lease]) {
    for (i, h) in lab.hosts.iter().enumerate() {
        h.reconcile(&others(leases, i)).expect("reconcile");
    }
}

/// The IPv6 VTEP MAC a lease publishes in its BackendV6Data.
fn vtep6(l: &Lease) -> String {
    let data = (l.ipv6.as_ref())
        .and_then(|v6| v6.backend_data.as_ref())
        .and_then(BackendData::value);
    data.as_ref()
        .and_then(|d| d["VtepMAC"].as_str())
        .expect("BackendV6Data VtepMAC")
        .to_string()
}

/// weft's (protocol 87) IPv6 routes, as `dst gateway dev [onlink]`, sorted.
fn routes6(h: &Host) -> Vec<String> {
    let mut v: Vec<String> = (h.ns.routes6_json().iter())
        .filter(|r| r["protocol"] == "87")
        .map(|r| {
            let onlink = (r["flags"].as_array()).is_some_and(|f| f.contains(&json!("onlink")));
            let mut s = format!(
                "{} {} {}",
                r["dst"].as_str().unwrap_or(""),
                r["gateway"].as_str().unwrap_or(""),
                r["dev"].as_str().unwrap_or("")
            );
            if onlink {
                s.push_str(" onlink");
            }
            s
        })
        .collect();
    v.sort();
    v
}

/// `dst lladdr` of the permanent neighbours on `dev`.
fn neighbours(h: &Host, dev: &str) -> Vec<String> {
    weft_lab::json::rows(&Value::Array(h.ns.neighbours(dev)), &["dst", "lladdr"])
}

/// `mac dst` of the FDB entries of `dev` pointing at a remote.
fn fdb(h: &Host, dev: &str) -> Vec<String> {
    weft_lab::json::rows(&Value::Array(h.ns.fdb(dev)), &["mac", "dst"])
}

/// Everything weft could have touched on host `h`: both devices and both families.
fn snapshot(h: &Host) -> Value {
    json!({
        "v4": h.ns.kernel_dump(DEV),
        "v6": h.ns.kernel_dump(DEV6),
        "routes6": h.ns.routes6_json(),
        "addr6": global6(h),
    })
}

/// The global IPv6 addresses of `flannel-v6.1` (the kernel's link-local one is tentative for a
/// second after the device is made).
fn global6(h: &Host) -> Vec<Value> {
    let addrs = h.ns.ip_json(&format!("-6 addr show dev {DEV6}"));
    (addrs[0]["addr_info"].as_array())
        .into_iter()
        .flatten()
        .filter(|a| a["scope"] == "global")
        .cloned()
        .collect()
}

/// Reconciles and returns the change notifications the kernel emitted meanwhile that concern
/// what weft keeps: neighbours and FDB entries of its devices, weft's routes of both families,
/// links, and addresses other than the kernel's link-local ones. (IPv6 neighbour discovery on
/// the underlay changes its own entries by itself.)
fn reconcile_watching(h: &Host, peers: &[Lease]) -> (Result<(), Vec<String>>, Vec<String>) {
    let peers = peers.to_vec();
    let index = |dev: &str| {
        let link = h.ns.link(dev).expect("device");
        link["ifindex"].as_u64().expect("ifindex") as u32
    };
    let devices = [index(DEV), index(DEV6)];
    h.agent.with_backend(move |b| {
        Box::pin(async move {
            use rtnetlink::MulticastGroup as G;
            let groups = [
                G::Link,
                G::Ipv4Route,
                G::Ipv6Route,
                G::Ipv4Ifaddr,
                G::Ipv6Ifaddr,
                G::Neigh,
            ];
            let (conn, _h, mut events) =
                rtnetlink::new_multicast_connection(&groups).expect("subscribe");
            let task = tokio::spawn(conn);
            let r = b.reconcile(&peers).await.map_err(messages);
            tokio::time::sleep(Duration::from_millis(300)).await;
            let mut seen = Vec::new();
            while let Ok((m, _)) = events.try_recv() {
                if let rtnetlink::packet_core::NetlinkPayload::InnerMessage(msg) = &m.payload {
                    if concerns_weft(msg, devices) {
                        seen.push(format!("{msg:?}"));
                    }
                }
            }
            task.abort();
            (r, seen)
        })
    })
}

fn concerns_weft(msg: &RouteNetlinkMessage, devices: [u32; 2]) -> bool {
    use rtnetlink::packet_route::address::AddressAttribute;
    match msg {
        RouteNetlinkMessage::NewNeighbour(n) | RouteNetlinkMessage::DelNeighbour(n) => {
            n.header.state == NeighbourState::Permanent || devices.contains(&n.header.ifindex)
        }
        RouteNetlinkMessage::NewRoute(r) | RouteNetlinkMessage::DelRoute(r) => {
            r.header.protocol == RouteProtocol::Other(RTPROT_WEFT)
        }
        RouteNetlinkMessage::NewAddress(a) | RouteNetlinkMessage::DelAddress(a) => {
            !a.attributes.iter().any(|x| {
                matches!(x, AddressAttribute::Address(std::net::IpAddr::V6(ip))
                    if ip.segments()[0] & 0xffc0 == 0xfe80)
            })
        }
        _ => true,
    }
}

/// Whether `from`'s container reaches `to`'s over IPv6 (a few tries: neighbour discovery
/// between the container and cni0 takes a moment).
fn reaches6(from: &Host, to: &Host) -> bool {
    let ip = weft_lab::topology::container_ip6(subnet6(to.n));
    (0..5).any(|_| from.ping6(ip))
}

fn assert_full_mesh6(lab: &Lab) {
    for a in &lab.hosts {
        for b in &lab.hosts {
            if a.n != b.n {
                assert!(reaches6(a, b), "c{} -> c{} over IPv6", a.n, b.n);
            }
        }
    }
}

#[test]
fn the_ipv6_device_is_flannels_with_every_peers_entries_and_containers_reach_each_other() {
    if !ipv6_or_skip(
        "the_ipv6_device_is_flannels_with_every_peers_entries_and_containers_reach_each_other",
    ) {
        return;
    }
    let (lab, leases) = dual_lab(3);
    reconcile_all(&lab, &leases);

    // BackendV6Data: flannel's shape, a MAC of its own.
    let data6 = (leases[0].ipv6.as_ref())
        .and_then(|v6| v6.backend_data.as_ref())
        .expect("BackendV6Data");
    assert_eq!(
        data6.as_str(),
        format!("{{\"VNI\":1,\"VtepMAC\":\"{}\"}}", vtep6(&leases[0]))
    );
    let data4 = leases[0].backend_data.as_ref().expect("BackendData");
    assert!(
        !data4.as_str().contains(&vtep6(&leases[0])),
        "one MAC per device"
    );

    let h1 = &lab.hosts[0];
    let link = h1.ns.link(DEV6).expect("flannel-v6.1 exists");
    let info = &link["linkinfo"]["info_data"];
    assert_eq!(link["linkinfo"]["info_kind"], "vxlan");
    assert_eq!(info["id"], 1);
    assert_eq!(info["port"], 8472);
    assert_eq!(info["learning"], false);
    assert_eq!(info["local6"], h1.addr6().to_string());
    assert_eq!(info["link"], "eth0");
    assert_eq!(link["mtu"], 1430, "underlay 1500 - 70");
    assert_eq!(link["address"], vtep6(&leases[0]).as_str());
    assert!(
        (link["flags"].as_array()).is_some_and(|f| f.contains(&json!("UP"))),
        "{link}"
    );
    // FLANNEL_MTU is the IPv6 device's, and flannel.1 agrees with it.
    assert_eq!(h1.mtu(), 1430);
    assert_eq!(h1.ns.link(DEV).expect("flannel.1")["mtu"], 1430);
    assert_eq!(
        h1.ns
            .exec(&["cat", "/proc/sys/net/ipv6/conf/flannel-v6.1/accept_ra"])
            .1
            .trim(),
        "0",
        "as flanneld sets it"
    );
    // The IPv6 lease's network address /128, and nothing else but the kernel's link-local.
    let addrs = h1.ns.ip_json(&format!("-6 addr show dev {DEV6}"));
    let global: Vec<(Option<&str>, Option<u64>)> = (addrs[0]["addr_info"].as_array())
        .into_iter()
        .flatten()
        .filter(|a| a["scope"] == "global")
        .map(|a| (a["local"].as_str(), a["prefixlen"].as_u64()))
        .collect();
    assert_eq!(global, [(Some("fd00:244:0:1::"), Some(128))]);

    for (peer, l) in [(2u8, &leases[1]), (3, &leases[2])] {
        let net = subnet6(peer).network();
        assert!(
            neighbours(h1, DEV6).contains(&format!("{net} {}", vtep6(l))),
            "{:?}",
            neighbours(h1, DEV6)
        );
        assert!(
            fdb(h1, DEV6).contains(&format!(
                "{} {}",
                vtep6(l),
                lab.hosts[peer as usize - 1].addr6()
            )),
            "{:?}",
            fdb(h1, DEV6)
        );
    }
    assert_eq!(
        routes6(h1),
        [
            format!("fd00:244:0:2::/64 fd00:244:0:2:: {DEV6} onlink"),
            format!("fd00:244:0:3::/64 fd00:244:0:3:: {DEV6} onlink"),
        ]
    );
    assert_eq!((neighbours(h1, DEV6).len(), fdb(h1, DEV6).len()), (2, 2));
    // The IPv4 device is as without IPv6.
    assert_eq!((neighbours(h1, DEV).len(), fdb(h1, DEV).len()), (2, 2));
    assert_eq!(h1.ns.weft_routes().len(), 2);

    lab.assert_full_mesh();
    assert_full_mesh6(&lab);
}

#[test]
fn a_second_reconcile_changes_nothing_on_either_device() {
    if !ipv6_or_skip("a_second_reconcile_changes_nothing_on_either_device") {
        return;
    }
    let (lab, leases) = dual_lab(3);
    reconcile_all(&lab, &leases);
    let h1 = &lab.hosts[0];
    // The watch sees real changes (so an empty one below means something).
    let (result, events) = reconcile_watching(h1, &[leases[1].clone()]);
    result.expect("reconcile");
    assert!(
        events.len() >= 6,
        "both families' route, neighbour and fdb removals expected: {events:#?}"
    );
    h1.reconcile(&others(&leases, 0)).expect("reconcile");

    let before = snapshot(h1);
    let (result, events) = reconcile_watching(h1, &others(&leases, 0));
    result.expect("reconcile");
    assert_eq!(before, snapshot(h1));
    assert!(
        events.is_empty(),
        "second reconcile changed the kernel: {events:#?}"
    );
}

#[test]
fn a_peer_that_leaves_loses_its_ipv6_entries_in_a_full_pass_and_in_a_targeted_one() {
    if !ipv6_or_skip(
        "a_peer_that_leaves_loses_its_ipv6_entries_in_a_full_pass_and_in_a_targeted_one",
    ) {
        return;
    }
    let (lab, leases) = dual_lab(3);
    reconcile_all(&lab, &leases);
    let h1 = &lab.hosts[0];

    // A full pass without host 3.
    h1.reconcile(&[leases[1].clone()]).expect("reconcile");
    assert_eq!(
        routes6(h1),
        [format!("fd00:244:0:2::/64 fd00:244:0:2:: {DEV6} onlink")]
    );
    assert_eq!(
        neighbours(h1, DEV6),
        [format!("fd00:244:0:2:: {}", vtep6(&leases[1]))]
    );
    assert_eq!(
        fdb(h1, DEV6),
        [format!("{} {}", vtep6(&leases[1]), lab.hosts[1].addr6())]
    );
    assert!(reaches6(h1, &lab.hosts[1]));
    assert!(!reaches6(h1, &lab.hosts[2]));

    // Back, then gone again, by targeted changes.
    let back = PeerChanges {
        upsert: vec![leases[2].clone()],
        remove: vec![],
    };
    h1.apply(&back).expect("apply");
    assert_eq!(routes6(h1).len(), 2);
    assert_eq!((neighbours(h1, DEV6).len(), fdb(h1, DEV6).len()), (2, 2));
    assert!(reaches6(h1, &lab.hosts[2]));
    let gone = PeerChanges {
        upsert: vec![],
        remove: vec![leases[2].subnet],
    };
    h1.apply(&gone).expect("apply");
    assert_eq!(routes6(h1).len(), 1);
    assert_eq!((neighbours(h1, DEV6).len(), fdb(h1, DEV6).len()), (1, 1));
    assert!(h1.ns.route("10.244.3.0/24").is_none());
    assert!(
        !h1.needs_reconcile(),
        "targeted changes kept the backend's record exact"
    );

    // Its IPv6 side dropped alone (no PublicIPv6 any more): the IPv4 side stays.
    let mut v4_only = leases[1].clone();
    if let Some(v6) = v4_only.ipv6.as_mut() {
        v6.public_ip = None;
    }
    let changed = PeerChanges {
        upsert: vec![v4_only],
        remove: vec![],
    };
    h1.apply(&changed).expect("apply");
    assert!(routes6(h1).is_empty());
    assert!(neighbours(h1, DEV6).is_empty() && fdb(h1, DEV6).is_empty());
    assert!(h1.ns.route("10.244.2.0/24").is_some());
    assert!(h1.reaches(&lab.hosts[1]));
}

#[test]
fn a_bad_backend_v6_data_refuses_the_peer_and_a_shared_ipv6_mac_goes_to_the_lower_subnet() {
    if !ipv6_or_skip(
        "a_bad_backend_v6_data_refuses_the_peer_and_a_shared_ipv6_mac_goes_to_the_lower_subnet",
    ) {
        return;
    }
    let (lab, leases) = dual_lab(3);
    let h1 = &lab.hosts[0];
    let mut bad = leases[1].clone();
    if let Some(v6) = bad.ipv6.as_mut() {
        v6.backend_data = Some(json!({"VNI": 1, "VtepMAC": "01:00:5e:00:00:01"}).into());
    }
    let errs = h1
        .reconcile(&[bad, leases[2].clone()])
        .expect_err("refused");
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(errs[0].contains("10.244.2.0/24"), "{errs:?}");
    assert!(h1.ns.route("10.244.2.0/24").is_none(), "refused as a whole");
    assert_eq!(routes6(h1).len(), 1);

    // Host 3 publishes host 2's IPv6 VTEP MAC: host 2 (the lower subnet) keeps it.
    let mut copy = leases[2].clone();
    if let Some(v6) = copy.ipv6.as_mut() {
        v6.backend_data = leases[1].ipv6.as_ref().and_then(|v| v.backend_data.clone());
    }
    let errs = h1
        .reconcile(&[copy.clone(), leases[1].clone()])
        .expect_err("refused");
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(errs[0].starts_with("peer 10.244.3.0/24:"), "{errs:?}");
    assert_eq!(
        fdb(h1, DEV6),
        [format!("{} {}", vtep6(&leases[1]), lab.hosts[1].addr6())]
    );
    // The same when it arrives by a targeted change, after host 3 held it alone.
    h1.reconcile(&[copy.clone()]).expect("alone, it is a peer");
    let errs = h1
        .apply(&PeerChanges {
            upsert: vec![leases[1].clone()],
            remove: vec![],
        })
        .expect_err("host 3 loses it");
    assert!(errs[0].starts_with("peer 10.244.3.0/24:"), "{errs:?}");
    assert_eq!(
        fdb(h1, DEV6),
        [format!("{} {}", vtep6(&leases[1]), lab.hosts[1].addr6())]
    );
    assert!(h1.ns.route("10.244.3.0/24").is_none());
    assert!(h1.ns.route("10.244.2.0/24").is_some());
    assert!(!h1.needs_reconcile());

    // Host 2 leaves: the MAC is free, which only a full pass can give host 3 again.
    h1.apply(&PeerChanges {
        upsert: vec![],
        remove: vec![leases[1].subnet],
    })
    .expect("apply");
    assert!(
        h1.needs_reconcile(),
        "a freed contended MAC asks for a full pass"
    );
    h1.reconcile(&[copy]).expect("reconcile");
    assert_eq!(
        fdb(h1, DEV6),
        [format!("{} {}", vtep6(&leases[1]), lab.hosts[2].addr6())]
    );
    assert!(h1.ns.route("10.244.3.0/24").is_some());
}

#[test]
fn restart_keeps_the_ipv6_vtep_mac_and_the_device_with_its_entries() {
    if !ipv6_or_skip("restart_keeps_the_ipv6_vtep_mac_and_the_device_with_its_entries") {
        return;
    }
    let (lab, leases) = dual_lab(2);
    reconcile_all(&lab, &leases);
    let h1 = &lab.hosts[0];
    let index = h1.ns.link(DEV6).expect("device")["ifindex"].clone();
    let before = snapshot(h1);
    h1.stop();
    assert_eq!(
        snapshot(h1),
        before,
        "weftd's exit leaves the kernel as it was"
    );
    assert!(reaches6(&lab.hosts[1], h1), "and traffic flows meanwhile");

    start_dual(h1, vxlan());
    h1.prepare(Some(leases[0].clone()));
    assert_eq!(
        backend_v6_data(h1).map(BackendData::from),
        leases[0].ipv6.as_ref().and_then(|v| v.backend_data.clone()),
        "IPv6 VTEP MAC changed across restart"
    );
    h1.configure(&leases[0]);
    h1.reconcile(&others(&leases, 0)).expect("reconcile");
    assert_eq!(
        h1.ns.link(DEV6).expect("device")["ifindex"],
        index,
        "not recreated"
    );
    assert_eq!(snapshot(h1), before);
    assert_full_mesh6(&lab);

    // Reboot: no device, the lease in etcd still names the old MAC.
    h1.stop();
    h1.ns.ip(&format!("link del {DEV6}"));
    let mut previous = leases[0].clone();
    if let Some(v6) = previous.ipv6.as_mut() {
        v6.backend_data = Some(json!({"VNI": 1, "VtepMAC": "0a:00:00:00:06:2a"}).into());
    }
    start_dual(h1, vxlan());
    h1.prepare(Some(previous));
    assert_eq!(
        h1.ns.link(DEV6).expect("device")["address"],
        "0a:00:00:00:06:2a"
    );

    // No device and no lease: the derived MAC, the same one as the very first start.
    h1.stop();
    h1.ns.ip(&format!("link del {DEV6}"));
    start_dual(h1, vxlan());
    h1.prepare(None);
    assert_eq!(
        h1.ns.link(DEV6).expect("device")["address"],
        vtep6(&leases[0]).as_str()
    );
}

#[test]
fn a_deleted_ipv6_device_is_noticed_and_recreated_with_everything_on_it() {
    if !ipv6_or_skip("a_deleted_ipv6_device_is_noticed_and_recreated_with_everything_on_it") {
        return;
    }
    let (lab, leases) = dual_lab(2);
    reconcile_all(&lab, &leases);
    let h1 = &lab.hosts[0];
    let ns = h1.ns.name.clone();
    let noticed = h1.agent.with_backend(move |b| {
        Box::pin(async move {
            must(&["ip", "-n", &ns, "link", "del", DEV6]);
            tokio::time::timeout(Duration::from_secs(5), b.event())
                .await
                .is_ok()
        })
    });
    assert!(noticed, "event() did not resolve after {DEV6} was deleted");
    assert!(h1.needs_reconcile());

    h1.reconcile(&others(&leases, 0)).expect("reconcile");
    let link = h1.ns.link(DEV6).expect("recreated");
    assert_eq!(link["address"], vtep6(&leases[0]).as_str());
    assert_eq!(routes6(h1).len(), 1);
    assert_eq!((neighbours(h1, DEV6).len(), fdb(h1, DEV6).len()), (1, 1));
    assert_full_mesh6(&lab);
}

#[test]
fn an_ipv4_only_network_removes_the_ipv6_device_of_an_earlier_dual_stack_run() {
    if !ipv6_or_skip("an_ipv4_only_network_removes_the_ipv6_device_of_an_earlier_dual_stack_run") {
        return;
    }
    let (lab, _) = dual_lab(1);
    let h = &lab.hosts[0];
    assert!(h.ns.link(DEV6).is_some());
    h.stop();
    // IPv6 turned off in the config: the harness's backend is IPv4-only.
    h.start(vxlan());
    h.prepare(None);
    assert!(h.ns.link(DEV6).is_none(), "{DEV6} left behind");
    assert!(h.ns.link(DEV).is_some());
    assert_eq!(h.mtu(), 1450, "without IPv6, FLANNEL_MTU is IPv4's");
    assert_eq!(backend_v6_data(h), None);
}
