//! udp through weftd: flannel's default data plane on simulated hosts. Needs root.

use std::io::Write;
use std::time::{Duration, Instant};

use weft_lab::json::rows;

use crate::harness::wait_for;
use crate::netns::{require_root, Topology, PREFIX};

const UDP: &str = r#"{"Network":"10.247.0.0/16","Backend":{"Type":"udp"}}"#;
/// The classic Docker set-up's config: no Backend at all, which flannel runs as udp.
const CLASSIC: &str = r#"{"Network":"172.20.0.0/16"}"#;
const T: Duration = Duration::from_secs(30);

fn hosts(n: usize, config: &str) -> Topology {
    let mut t = Topology::new(n, 1500);
    t.set_config(config);
    for i in 0..n {
        t.start(i, &[]);
    }
    for i in 0..n {
        t.wire_container(i);
    }
    t
}

fn lease_json(t: &Topology, i: usize) -> serde_json::Value {
    let subnet = t.hosts[i].wait_subnet();
    let text = t
        .etcd()
        .get(&weft_lab::flannel::lease_key(PREFIX, subnet))
        .expect("lease");
    serde_json::from_str(&text).expect("lease JSON")
}

/// flannel0 on host `i` as (mtu, addresses, owned routes "dst dev").
fn flannel0(t: &Topology, i: usize) -> (u64, Vec<String>, Vec<String>) {
    let ns = &t.hosts[i].ns;
    let link = ns.link("flannel0").expect("flannel0 exists");
    let addrs = ns.ip_json("-4 addr show dev flannel0");
    let addrs = addrs[0]["addr_info"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| format!("{}/{}", a["local"].as_str().unwrap_or(""), a["prefixlen"]))
        .collect();
    let routes = rows(&ns.ip_json("route show proto 87"), &["dst", "dev"]);
    (link["mtu"].as_u64().unwrap_or(0), addrs, routes)
}

/// Sends `count` pings at `interval` from host `from`'s container; returns ping's output.
fn ping_series(t: &Topology, from: usize, to: &str, count: u32, interval: &str) -> String {
    let secs = Duration::from_secs(u64::from(count) / 5 + 20);
    let (_, out, err) = t.hosts[from].container.exec_for(
        &[
            "ping",
            "-c",
            &count.to_string(),
            "-i",
            interval,
            "-W",
            "1",
            to,
        ],
        secs,
    );
    format!("{out}{err}")
}

#[test]
fn udp_three_hosts_reach_each_other_and_peers_come_and_go() {
    if !require_root("udp_three_hosts_reach_each_other_and_peers_come_and_go") {
        return;
    }
    let mut t = hosts(3, UDP);
    t.assert_full_mesh(&[0, 1, 2]);
    for i in 0..3 {
        let subnet = t.hosts[i].wait_subnet();
        let lease = lease_json(&t, i);
        assert_eq!(lease["BackendType"], "udp");
        assert!(
            lease.get("BackendData").is_none(),
            "no BackendData: {lease}"
        );
        assert_eq!(t.hosts[i].env_var("FLANNEL_MTU").as_deref(), Some("1472"));
        assert_eq!(
            flannel0(&t, i),
            (
                1472,
                vec![format!("{}/32", subnet.network())],
                vec!["10.247.0.0/16 flannel0".to_string()]
            ),
            "flannel0: MTU underlay-28, the lease's network address, the whole network"
        );
    }

    // A peer that leaves: the others answer for its subnet with ICMP unreachable.
    let gone = t.hosts[2].wait_subnet();
    let gone_ip = t.hosts[2].container_ip().to_string();
    t.hosts[2].kill();
    t.etcd().del(&weft_lab::flannel::lease_key(PREFIX, gone));
    wait_for("host 0 to answer for the gone peer", T, || {
        ping_series(&t, 0, &gone_ip, 1, "1")
            .contains("Unreachable")
            .then_some(())
    });
    t.assert_full_mesh(&[0, 1]);

    // It comes back; nobody restarts.
    t.start(2, &[]);
    t.wire_container(2);
    t.assert_full_mesh(&[0, 1, 2]);
}

#[test]
fn the_classic_config_with_no_backend_runs_udp() {
    if !require_root("the_classic_config_with_no_backend_runs_udp") {
        return;
    }
    let t = hosts(2, CLASSIC);
    t.assert_full_mesh(&[0, 1]);
    assert_eq!(lease_json(&t, 0)["BackendType"], "udp");
    assert_eq!(t.hosts[1].env_var("FLANNEL_MTU").as_deref(), Some("1472"));
}

#[test]
fn a_restart_keeps_flannel0_and_loses_only_the_packets_of_the_gap() {
    if !require_root("a_restart_keeps_flannel0_and_loses_only_the_packets_of_the_gap") {
        return;
    }
    let mut t = hosts(2, UDP);
    t.assert_full_mesh(&[0, 1]);
    let index = |t: &Topology| t.hosts[0].ns.link("flannel0").map(|l| l["ifindex"].clone());
    let before = index(&t);
    let to = t.hosts[1].container_ip().to_string();
    // 200 pings 20 ms apart (4 s) from host 0's container while weftd on host 0 restarts.
    let pinger = t.hosts[0]
        .container
        .command("ping")
        .args(["-c", "200", "-i", "0.02", "-W", "1", &to])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("ping");
    std::thread::sleep(Duration::from_millis(500));
    let stopped = Instant::now();
    t.hosts[0].stop();
    assert_eq!(index(&t), before, "flannel0 stays while no weftd runs");
    let logged = t.hosts[0].log().len();
    t.start(0, &[]);
    wait_for("weftd to take flannel0 again", T, || {
        let log = t.hosts[0].log();
        log.get(logged..)?
            .contains("kernel state matches all 1 peers")
            .then_some(())
    });
    let restart = stopped.elapsed();
    let out = pinger.wait_with_output().expect("ping");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let received: u32 = text
        .split(", ")
        .find_map(|p| p.strip_suffix(" received"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("ping summary: {text}"));
    let lost = 200 - received;
    let _ = writeln!(
        std::io::stderr(),
        "udp restart: {lost} of 200 pings (20 ms apart) lost; SIGTERM to peers programmed again \
         took {restart:?}"
    );
    assert_eq!(
        index(&t),
        before,
        "the same flannel0 is reopened, not recreated"
    );
    // Every ping but those sent while no weftd ran got through.
    let gap = u32::try_from(restart.as_millis() / 20).unwrap_or(u32::MAX) + 2;
    assert!(
        lost <= gap,
        "{lost} lost, more than the restart gap of {gap} allows:\n{text}"
    );
    t.assert_full_mesh(&[0, 1]);
}

#[test]
fn flannel0_deleted_behind_weftds_back_is_rebuilt_and_traffic_resumes() {
    if !require_root("flannel0_deleted_behind_weftds_back_is_rebuilt_and_traffic_resumes") {
        return;
    }
    let t = hosts(2, UDP);
    t.assert_full_mesh(&[0, 1]);
    let before = flannel0(&t, 0);
    t.hosts[0].ns.ip("link del flannel0");
    wait_for("flannel0 to be rebuilt as it was", T, || {
        (t.hosts[0].ns.link("flannel0").is_some() && flannel0(&t, 0) == before).then_some(())
    });
    t.assert_full_mesh(&[0, 1]);
    t.hosts[0].assert_running();
    let log = t.hosts[0].log();
    assert!(
        log.contains("data plane failed") && log.contains("data plane rebuilt"),
        "{log}"
    );
}
