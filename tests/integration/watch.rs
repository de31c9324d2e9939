//! Watching other hosts' leases: additions, removals, garbage, and surviving etcd compaction.

use std::net::Ipv4Addr;
use std::time::Duration;

use crate::harness::{weftctl, Etcd, Proxy, WeftdSpec};

const T: Duration = Duration::from_secs(30);
const CONFIG: &str = r#"{"Network":"10.80.0.0/16","Backend":{"Type":"alloc"}}"#;

fn peer(n: u8) -> String {
    format!(r#"{{"PublicIP":"10.98.0.{n}","PublicIPv6":null,"BackendType":"alloc"}}"#)
}

#[test]
fn peers_coming_and_going_are_seen_and_garbage_is_skipped() {
    let etcd = Etcd::start();
    etcd.put("/w/config", CONFIG);
    // Garbage present before start: a bad key and a bad value.
    etcd.put("/w/subnets/not-a-subnet", &peer(1));
    etcd.put("/w/subnets/10.80.7.0-24", "{\"PublicIP\": 12");
    etcd.put_leased("/w/subnets/10.80.5.0-24", &peer(5), 600);
    let dir = tempfile::tempdir().expect("tmp");
    let a = WeftdSpec::new(&etcd, "/w", Ipv4Addr::new(10, 99, 0, 1), dir.path()).start();
    a.wait_subnet(T);
    a.wait_log(
        "skipping unreadable lease /w/subnets/not-a-subnet: key \"not-a-subnet\" is not a subnet",
        T,
    );
    a.wait_log(
        "skipping unreadable lease /w/subnets/10.80.7.0-24: not valid JSON",
        T,
    );
    a.wait_log("peers=1", T);

    etcd.put_leased("/w/subnets/10.80.6.0-24", &peer(6), 600);
    a.wait_log(
        "peer added or changed subnet=10.80.6.0/24 public_ip=10.98.0.6",
        T,
    );
    // Garbage arriving by watch, followed by a good lease in the same stream.
    etcd.put("/w/subnets/10.80.8.0-24", "[]");
    etcd.put_leased("/w/subnets/10.80.9.0-24", &peer(9), 600);
    a.wait_log("peer added or changed subnet=10.80.9.0/24", T);
    a.wait_log(
        "skipping unreadable lease /w/subnets/10.80.8.0-24: not a JSON object",
        T,
    );
    etcd.del("/w/subnets/10.80.5.0-24");
    a.wait_log("peer removed subnet=10.80.5.0/24", T);
    a.assert_running();
}

#[test]
fn a_watch_that_falls_behind_compaction_lists_again_and_catches_up() {
    let etcd = Etcd::start();
    etcd.put("/w/config", CONFIG);
    etcd.put_leased("/w/subnets/10.80.20.0-24", &peer(20), 600);
    let proxy = Proxy::start(etcd.port);
    let dir = tempfile::tempdir().expect("tmp");
    let mut spec = WeftdSpec::new(&etcd, "/w", Ipv4Addr::new(10, 99, 0, 1), dir.path());
    spec.endpoint = proxy.endpoint();
    let a = spec.start();
    a.wait_subnet(T);
    a.wait_log("peers=1", T);

    // While the agent is cut off: one peer leaves, one arrives, and history is compacted away.
    proxy.cut();
    a.wait_log("etcd watch broken", T);
    etcd.del("/w/subnets/10.80.20.0-24");
    etcd.put_leased("/w/subnets/10.80.21.0-24", &peer(21), 600);
    for i in 0..5 {
        etcd.put("/w/unrelated", &i.to_string());
    }
    etcd.compact();
    proxy.restore();

    a.wait_log("watch fell behind etcd compaction", T);
    a.wait_log("peer removed subnet=10.80.20.0/24", T);
    a.wait_log("peer added or changed subnet=10.80.21.0/24", T);
    a.assert_running();
}

#[test]
fn weftctl_leases_lists_subnets_ips_backends_and_expiry() {
    let etcd = Etcd::start();
    etcd.put("/w/config", CONFIG);
    etcd.put_leased("/w/subnets/10.80.30.0-24", &peer(30), 3600);
    etcd.put(
        "/w/subnets/10.80.31.0-24",
        r#"{"PublicIP":"10.98.0.31","PublicIPv6":null}"#,
    );
    // Listed in address order, not etcd's text order ("10.80.30" < "10.80.4").
    etcd.put("/w/subnets/10.80.4.0-24", &peer(4));
    let out = weftctl(&etcd, "/w", &["leases"], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "SUBNET         PUBLIC-IP   BACKEND  EXPIRES-IN");
    assert_eq!(lines[1], "10.80.4.0/24   10.98.0.4   alloc    reserved");
    assert!(
        lines[2].starts_with("10.80.30.0/24  10.98.0.30  alloc    59m")
            || lines[2] == "10.80.30.0/24  10.98.0.30  alloc    1h0m0s",
        "{}",
        lines[2]
    );
    assert_eq!(lines[3], "10.80.31.0/24  10.98.0.31  -        reserved");
}
