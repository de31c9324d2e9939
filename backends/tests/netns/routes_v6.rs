//! The route reconciler with IPv6 routes beside IPv4 ones, against the real kernel: host-gw's
//! form (`via` a peer's address on the link) and vxlan's (`via` the peer's network address,
//! `onlink`), through a veth in a namespace of the test's own.

use std::future::Future;
use std::time::Duration;

use ipnet::IpNet;
use serde_json::{json, Value};
use weft_backends::batch::Batch;
use weft_backends::{Owner, RouteSpec, RouteTable};

use crate::harness::{messages, root_or_skip, Agent, Netns};

/// This instance's networks; host-gw's owner (no device of its own).
fn owner() -> Owner {
    Owner {
        network: "10.244.0.0/16".parse().expect("net"),
        network_v6: Some("fd00:10::/48".parse().expect("net")),
        device: None,
    }
}

/// `dst via gateway dev eth0 [onlink]`.
fn via(dst: &str, gateway: &str, oif: u32, onlink: bool) -> RouteSpec {
    RouteSpec {
        gateway: Some(gateway.parse().expect("gateway")),
        onlink,
        ..RouteSpec::device(dst.parse::<IpNet>().expect("dst"), oif, "eth0")
    }
}

/// The IPv6 routes of the main table (`ip -6 -j route`), sorted by destination and device.
fn routes6(ns: &Netns) -> Vec<Value> {
    let mut v = ns
        .ip_json("-6 route show table main")
        .as_array()
        .cloned()
        .unwrap_or_default();
    v.sort_by_key(|r| (r["dst"].to_string(), r["dev"].to_string()));
    v
}

/// Every IPv6 route of the main table to `dst`.
fn routes6_to(ns: &Netns, dst: &str) -> Vec<Value> {
    routes6(ns)
        .into_iter()
        .filter(|r| r["dst"] == dst)
        .collect()
}

/// The one IPv6 route to `dst`.
fn route6(ns: &Netns, dst: &str) -> Value {
    let mut all = routes6_to(ns, dst);
    assert_eq!(all.len(), 1, "one route to {dst}: {all:#?}");
    all.remove(0)
}

/// What a pass could change: both main tables and the nexthops.
fn snapshot(ns: &Netns) -> Value {
    json!({"v4": ns.routes_json(), "v6": routes6(ns), "nexthops": ns.nexthops_json()})
}

/// Runs `pass` and returns, with its result, the route notifications the kernel emitted
/// meanwhile (both families): a pass with nothing to do must cause none.
async fn watching<T>(pass: impl Future<Output = T>) -> (T, Vec<String>) {
    use rtnetlink::MulticastGroup as G;
    let (conn, _handle, mut events) =
        rtnetlink::new_multicast_connection(&[G::Ipv4Route, G::Ipv6Route]).expect("subscribe");
    let task = tokio::spawn(conn);
    let r = pass.await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut seen = Vec::new();
    while let Ok((m, _)) = events.try_recv() {
        seen.push(format!("{:?}", m.payload));
    }
    task.abort();
    (r, seen)
}

/// A full pass of `table` in the agent's namespace: the table back, the pass's failures, and
/// the route notifications it caused.
fn reconcile(
    agent: &Agent,
    mut table: RouteTable,
    desired: &[RouteSpec],
) -> (RouteTable, Vec<String>, Vec<String>) {
    let desired = desired.to_vec();
    agent.run(move || async move {
        let (conn, handle, _) = rtnetlink::new_connection().expect("netlink");
        tokio::spawn(conn);
        let batch = Batch::open().expect("netlink");
        let owner = owner();
        let pass = table.reconcile(&handle, &batch, &owner, &desired);
        let (errs, events) = watching(pass).await;
        (table, messages(errs), events)
    })
}

/// A targeted change of `table`: routes to `remove` deleted, `upsert` put in place.
fn apply(
    agent: &Agent,
    mut table: RouteTable,
    remove: &[IpNet],
    upsert: &[RouteSpec],
) -> (RouteTable, Vec<String>) {
    let (remove, upsert) = (remove.to_vec(), upsert.to_vec());
    agent.run(move || async move {
        let batch = Batch::open().expect("netlink");
        let errs = table.apply(&batch, &remove, &upsert).await;
        (table, messages(errs))
    })
}

/// Tries the blocked routes of `table` again.
fn retry(agent: &Agent, mut table: RouteTable) -> (RouteTable, Vec<String>) {
    agent.run(move || async move {
        let batch = Batch::open().expect("netlink");
        let errs = table.retry(&batch).await;
        (table, messages(errs))
    })
}

#[test]
fn ipv6_routes_are_reconciled_beside_ipv4_ones_and_others_routes_left_alone() {
    if !root_or_skip(
        "routes_v6::ipv6_routes_are_reconciled_beside_ipv4_ones_and_others_routes_left_alone",
    ) {
        return;
    }
    let ns = Netns::new(weft_lab::netns::unique_prefix());
    for conf in ["all", "default"] {
        ns.must(&[
            "sysctl",
            "-qw",
            &format!("net.ipv6.conf.{conf}.disable_ipv6=0"),
        ]);
        // Link-local addresses too come up at once: nothing changes the table while we watch.
        ns.must(&[
            "sysctl",
            "-qw",
            &format!("net.ipv6.conf.{conf}.accept_dad=0"),
        ]);
    }
    // eth0 is the underlay; gw0, its other end, only gives it a carrier.
    ns.ip("link add eth0 type veth peer name gw0");
    ns.ip("addr add 192.168.1.1/24 dev eth0");
    ns.ip("addr add fd00:1::1/64 dev eth0 nodad");
    ns.ip("link set eth0 up");
    ns.ip("link set gw0 up");
    weft_lab::wait_for(
        "the kernel's fe80::/64 on eth0",
        Duration::from_secs(5),
        || {
            let up = routes6_to(&ns, "fe80::/64")
                .iter()
                .any(|r| r["dev"] == "eth0");
            let tentative = ns.ip("-6 addr show tentative");
            (up && tentative.trim().is_empty()).then_some(())
        },
    );
    let eth0 = ns.link("eth0").expect("eth0")["ifindex"]
        .as_u64()
        .expect("ifindex") as u32;

    // Routes weft does not own: outside its networks, another weftd's (proto 87 into its own
    // network), one holding a destination weft wants, and flanneld's as weft wants it.
    ns.ip("-6 route add fd00:99::/64 via fd00:1::9 dev eth0 proto static");
    ns.ip("-6 route add fd00:20::/64 via fd00:1::7 dev eth0 proto 87");
    ns.ip("-6 route add fd00:10:0:5::/64 via fd00:1::5 dev eth0 proto static");
    ns.ip("-6 route add fd00:10:0:4::/64 via fd00:1::4 dev eth0 proto boot");
    let kernels: Vec<Value> = (routes6(&ns).into_iter())
        .filter(|r| r["protocol"] == "kernel")
        .collect();
    assert!(
        kernels.iter().any(|r| r["dst"] == "fd00:1::/64"),
        "{kernels:#?}"
    );
    let foreign = || {
        let mut v: Vec<Value> = ["fd00:99::/64", "fd00:20::/64", "fd00:10:0:5::/64"]
            .iter()
            .flat_map(|d| routes6_to(&ns, d))
            .collect();
        v.extend(
            routes6(&ns)
                .into_iter()
                .filter(|r| r["protocol"] == "kernel"),
        );
        v
    };
    let theirs = foreign();

    let v4 = RouteSpec {
        gateway: Some("192.168.1.2".parse().expect("gateway")),
        ..RouteSpec::device("10.244.2.0/24".parse::<IpNet>().expect("dst"), eth0, "eth0")
    };
    let host_gw = via("fd00:10:0:2::/64", "fd00:1::2", eth0, false);
    let vxlan = via("fd00:10:0:3::/64", "fd00:10:0:3::", eth0, true);
    let adopted = via("fd00:10:0:4::/64", "fd00:1::4", eth0, false);
    let held = via("fd00:10:0:5::/64", "fd00:1::6", eth0, false);
    let desired = vec![
        v4.clone(),
        host_gw.clone(),
        vxlan.clone(),
        adopted.clone(),
        held.clone(),
    ];
    let agent = Agent::spawn(&ns);

    // First pass: in place, flanneld's route taken over, the held destination a conflict.
    let (table, errs, events) = reconcile(&agent, RouteTable::default(), &desired);
    assert!(!events.is_empty(), "the watch sees changes");
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert!(
        errs[0].contains("fd00:10:0:5::/64 via fd00:1::6 dev eth0")
            && errs[0].contains("fd00:10:0:5::/64 via fd00:1::5 dev eth0 proto static"),
        "{}",
        errs[0]
    );
    let r = route6(&ns, "fd00:10:0:2::/64");
    assert_eq!(
        (&r["gateway"], &r["dev"], &r["protocol"], &r["metric"]),
        (
            &json!("fd00:1::2"),
            &json!("eth0"),
            &json!("87"),
            &json!(1024)
        ),
        "{r}"
    );
    let r = route6(&ns, "fd00:10:0:3::/64");
    assert_eq!(r["gateway"], "fd00:10:0:3::", "{r}");
    assert_eq!(r["protocol"], "87", "{r}");
    assert_eq!(r["flags"], json!(["onlink"]), "{r}");
    assert!(r.get("nhid").is_none(), "IPv6 routes stay classic: {r}");
    let r = route6(&ns, "fd00:10:0:4::/64");
    assert_eq!(
        (&r["gateway"], &r["protocol"]),
        (&json!("fd00:1::4"), &json!("87"))
    );
    assert_eq!(
        ns.route("10.244.2.0/24").expect("the IPv4 route")["protocol"],
        "87"
    );
    assert_eq!(foreign(), theirs);

    // The same set again: nothing changes, in either family.
    let before = snapshot(&ns);
    let (table, again, events) = reconcile(&agent, table, &desired);
    assert_eq!(again, errs, "the same conflict, in the same words");
    assert!(
        events.is_empty(),
        "second pass changed the kernel: {events:#?}"
    );
    assert_eq!(snapshot(&ns), before);

    // A peer's gateway changes: one targeted replace, no dump.
    let moved = via("fd00:10:0:2::/64", "fd00:1::3", eth0, false);
    let (table, errs) = apply(&agent, table, &[], std::slice::from_ref(&moved));
    assert!(errs.is_empty(), "{errs:#?}");
    assert!(!table.stale());
    assert_eq!(route6(&ns, "fd00:10:0:2::/64")["gateway"], "fd00:1::3");

    // A peer leaves, told by a targeted change; another by a full pass without it.
    let (table, errs) = apply(&agent, table, &[adopted.dst], &[]);
    assert!(errs.is_empty(), "{errs:#?}");
    assert!(routes6_to(&ns, "fd00:10:0:4::/64").is_empty());
    let desired = vec![v4, moved, held];
    let (table, errs, _) = reconcile(&agent, table, &desired);
    assert_eq!(errs.len(), 1, "only the conflict: {errs:#?}");
    assert!(routes6_to(&ns, "fd00:10:0:3::/64").is_empty());
    assert_eq!(route6(&ns, "fd00:10:0:2::/64")["gateway"], "fd00:1::3");
    assert_eq!(foreign(), theirs);

    // And that set twice: the second pass changes nothing.
    let before = snapshot(&ns);
    let (table, _, events) = reconcile(&agent, table, &desired);
    assert!(
        events.is_empty(),
        "second pass changed the kernel: {events:#?}"
    );
    assert_eq!(snapshot(&ns), before);
    let weft: Vec<Value> = (routes6(&ns).into_iter())
        .filter(|r| r["protocol"] == "87")
        .map(|r| r["dst"].clone())
        .collect();
    assert_eq!(weft, [json!("fd00:10:0:2::/64"), json!("fd00:20::/64")]);

    // The other route gives the held destination up: a retry puts weft's in.
    ns.ip("-6 route del fd00:10:0:5::/64 via fd00:1::5 dev eth0 proto static");
    let (_, errs) = retry(&agent, table);
    assert!(errs.is_empty(), "{errs:#?}");
    let r = route6(&ns, "fd00:10:0:5::/64");
    assert_eq!(
        (&r["gateway"], &r["protocol"]),
        (&json!("fd00:1::6"), &json!("87"))
    );
    drop(agent);
}
