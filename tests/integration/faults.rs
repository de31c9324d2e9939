//! Faults: etcd down for a while, one member of three lost and every member restarted in turn, a
//! member without a leader, a host cut off from etcd past its TTL, weftd killed in the middle of
//! programming hundreds of peers, a stalled etcd against systemd's watchdog, an endpoint nobody
//! listens on, and `weftctl status` once this host's subnet went to another. Traffic keeps flowing
//! where nothing requires it to stop, no lease is lost that need not be, and the kernel ends
//! exactly as etcd says. The namespace tests need root; the last four do not.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixDatagram;
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use weft_lab::json::rows;
use weft_lab::probe::{udp_send, UdpProbe};
use weft_lab::Netns;

use crate::harness::{free_port, wait_for, Etcd, WeftdSpec};
use crate::netns::{require_root, Topology, PREFIX};

const T: Duration = Duration::from_secs(60);
/// Hosts lease below 10.244.200.0: the peers that exist only in etcd ([`peer_arrives`]) are
/// written above it, where they can never land on (and overwrite) a host's own lease.
const VXLAN: &str =
    r#"{"Network":"10.244.0.0/16","SubnetMax":"10.244.199.0","Backend":{"Type":"vxlan"}}"#;

/// A ping from a container for as long as it runs, 5 a second.
struct Pinger {
    child: Option<Child>,
    to: Ipv4Addr,
}

impl Pinger {
    fn start(from: &Netns, to: Ipv4Addr) -> Self {
        let child = from
            .command("ping")
            .args(["-q", "-i", "0.2", "-W", "1", &to.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn ping");
        Self {
            child: Some(child),
            to,
        }
    }

    /// Stops it (SIGINT: ping prints its summary) and returns (sent, lost).
    fn stop(mut self) -> (u32, u32) {
        let mut child = self.child.take().expect("running");
        let pid = libc::pid_t::try_from(child.id()).expect("pid");
        // SAFETY: a signal to our own child, by PID (`ip netns exec` execs ping in place).
        unsafe { libc::kill(pid, libc::SIGINT) };
        let status = wait_for("ping to print its summary", Duration::from_secs(10), || {
            child.try_wait().ok().flatten()
        });
        let mut out = String::new();
        if let Some(mut s) = child.stdout.take() {
            let _ = s.read_to_string(&mut out);
        }
        // "25 packets transmitted, 25 received, 0% packet loss, time 4806ms"
        let stats = out
            .lines()
            .find(|l| l.contains("packets transmitted"))
            .unwrap_or_else(|| panic!("no summary from ping ({status}): {out}"));
        let n = |word: &str| -> u32 {
            let words: Vec<&str> = stats.split([' ', ',']).filter(|w| !w.is_empty()).collect();
            let at = words.iter().position(|w| *w == word).expect("field");
            words[at - 1].parse().expect("count")
        };
        let (sent, received) = (n("packets"), n("received"));
        eprintln!("ping to {}: {sent} sent, {} lost", self.to, sent - received);
        (sent, sent - received)
    }
}

impl Drop for Pinger {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// weft-owned (protocol 87) routes on host `i`, as "dst gateway dev".
fn owned_routes(t: &Topology, i: usize) -> Vec<String> {
    rows(
        &t.hosts[i].ns.ip_json("route show proto 87"),
        &["dst", "gateway", "dev"],
    )
}

fn has_route(t: &Topology, i: usize, subnet: &str) -> bool {
    owned_routes(t, i).iter().any(|r| r.starts_with(subnet))
}

/// Each host's lease as (etcd key, etcd lease id): the same pair later means it was neither
/// lost nor taken again.
fn leases(t: &Topology) -> Vec<(String, i64)> {
    let all = t.etcd().list(&format!("{PREFIX}/subnets/"));
    t.hosts
        .iter()
        .map(|h| {
            let ip = format!("\"PublicIP\":\"{}\"", h.addr());
            all.iter()
                .find(|(_, v, _)| v.contains(&ip))
                .map(|(k, _, id)| (k.clone(), *id))
                .unwrap_or_else(|| panic!("no lease for {} in {all:?}", h.addr()))
        })
        .collect()
}

fn key(subnet: Ipv4Net) -> String {
    format!("{PREFIX}/subnets/{}", subnet.to_string().replace('/', "-"))
}

/// A peer's lease as a vxlan flanneld writes it.
fn vxlan_lease(public_ip: Ipv4Addr, mac: &str) -> String {
    format!(
        r#"{{"PublicIP":"{public_ip}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}"#
    )
}

/// Writes a host that exists only in etcd (no machine behind it), once etcd takes writes, and
/// waits until every weftd in `hosts` routes to it; how long that took after the write.
fn peer_arrives(t: &Topology, hosts: &[usize], n: u8) -> Duration {
    let subnet = format!("10.244.{}.0/24", 200 + n);
    let lease = vxlan_lease(
        Ipv4Addr::new(10, 199, 0, 200 + n),
        &format!("02:00:00:00:00:{n:02x}"),
    );
    wait_for("etcd to take the peer's lease", T, || {
        let put = t
            .etcd()
            .ctl(&["put", &key(subnet.parse().expect("subnet")), &lease]);
        put.status.success().then_some(())
    });
    let written = Instant::now();
    for &i in hosts {
        wait_for(&format!("host {i} to route to {subnet}"), T, || {
            // A weftd that exited routes nothing: said at once, not after the minute.
            t.hosts[i].assert_running();
            has_route(t, i, &subnet).then_some(())
        });
    }
    written.elapsed()
}

fn mesh(hosts: usize, extra: &[&str]) -> Topology {
    let mut t = Topology::new(hosts, 1500);
    t.set_config(VXLAN);
    for i in 0..hosts {
        t.start(i, extra);
    }
    for i in 0..hosts {
        t.wire_container(i);
    }
    t.assert_full_mesh(&(0..hosts).collect::<Vec<_>>());
    t
}

/// Pings between every pair of containers, in both directions.
fn ping_all(t: &Topology) -> Vec<Pinger> {
    let n = t.hosts.len();
    (0..n)
        .flat_map(|a| (0..n).filter(move |b| *b != a).map(move |b| (a, b)))
        .map(|(a, b)| Pinger::start(&t.hosts[a].container, t.hosts[b].container_ip()))
        .collect()
}

/// Stops the pingers; none may have lost more than `allowed` packets.
fn assert_pings(pingers: Vec<Pinger>, allowed: u32) {
    for p in pingers {
        let to = p.to;
        let (sent, lost) = p.stop();
        assert!(sent >= 10, "ping to {to} hardly ran ({sent} sent)");
        assert!(lost <= allowed, "ping to {to} lost {lost} of {sent}");
    }
}

#[test]
fn etcd_down_for_less_than_the_ttl_costs_no_ping_and_no_lease_and_peers_catch_up() {
    if !require_root(
        "etcd_down_for_less_than_the_ttl_costs_no_ping_and_no_lease_and_peers_catch_up",
    ) {
        return;
    }
    let mut t = mesh(3, &["--subnet-lease-ttl=10s"]);
    let before = leases(&t);
    let pingers = ping_all(&t);

    t.etcd_mut().kill_member(0);
    for h in &t.hosts {
        wait_for("weftd to notice etcd is gone", T, || {
            h.log().contains("etcd watch broken").then_some(())
        });
    }
    std::thread::sleep(Duration::from_secs(4));
    t.etcd_mut().start_member(0);

    // A host that leased while etcd was back but weftd was still backing off is seen.
    let caught_up = peer_arrives(&t, &[0, 1, 2], 1);
    eprintln!("etcd back: the new peer routed everywhere after {caught_up:?}");
    assert!(
        caught_up < Duration::from_secs(20),
        "the backoff is capped: {caught_up:?}"
    );
    assert_eq!(leases(&t), before, "same subnets, same etcd leases");
    assert_pings(pingers, 2);
    for h in &t.hosts {
        h.assert_running();
        assert!(h.log().contains("etcd watch re-established"));
        assert!(!h.log().contains("leasing again"), "{}", h.log());
    }
}

/// Waits until every member answers again (a restarted member has rejoined).
fn wait_all_healthy(t: &Topology) {
    wait_for("every etcd member to be healthy", T, || {
        t.etcd()
            .ctl(&["endpoint", "health"])
            .status
            .success()
            .then_some(())
    });
}

#[test]
fn three_etcd_members_losing_the_one_in_use_and_restarting_each_cost_nothing() {
    if !require_root("three_etcd_members_losing_the_one_in_use_and_restarting_each_cost_nothing") {
        return;
    }
    let mut t = Topology::new(2, 1500);
    t.start_etcd(3);
    assert_eq!(t.etcd_ips().len(), 3, "weftd is given all three endpoints");
    t.set_config(VXLAN);
    // Host 0 alone first, to see which member holds its watch.
    t.start(0, &["--subnet-lease-ttl=10s"]);
    t.hosts[0].wait_subnet();
    let watched = wait_for("host 0's watch on a member", T, || {
        (0..3).find(|m| t.etcd().watchers(*m).unwrap_or(0) > 0)
    });
    t.start(1, &["--subnet-lease-ttl=10s"]);
    for i in 0..2 {
        t.wire_container(i);
    }
    t.assert_full_mesh(&[0, 1]);
    let before = leases(&t);
    let pingers = ping_all(&t);

    t.etcd_mut().kill_member(watched);
    let failover = peer_arrives(&t, &[0, 1], 1);
    eprintln!("member {watched} (host 0's watch) killed: a new peer routed on both hosts {failover:?} after it was written");
    assert!(failover < Duration::from_secs(15), "{failover:?}");
    t.etcd_mut().start_member(watched);
    wait_all_healthy(&t);

    // A rolling restart: each member down in turn, and back, while peers keep arriving.
    for m in 0..3 {
        t.etcd_mut().kill_member(m);
        let took = peer_arrives(&t, &[0, 1], 2 + m as u8);
        eprintln!("member {m} down: a new peer routed on both hosts {took:?} after it was written");
        t.etcd_mut().start_member(m);
        wait_all_healthy(&t);
    }
    assert_eq!(leases(&t), before, "no lease lost or taken again");
    assert_pings(pingers, 0);
    for h in &t.hosts {
        h.assert_running();
        assert!(!h.log().contains("leasing again"), "{}", h.log());
    }
    assert!(
        t.hosts[0].log().contains("etcd watch re-established"),
        "host 0's watch moved to another member"
    );
}

#[test]
fn a_member_without_a_leader_does_not_leave_weftd_deaf() {
    if !require_root("a_member_without_a_leader_does_not_leave_weftd_deaf") {
        return;
    }
    let mut t = Topology::new(1, 1500);
    t.start_etcd(3);
    t.set_config(VXLAN);
    // weftd knows only member 0, which then loses the other two: it is alive, but has no
    // leader and so no news. Without require-leader its watch would stay open and silent.
    let only = t.etcd().member_endpoint(0).to_string();
    let h = &t.hosts[0];
    let mut spec = WeftdSpec::on_host(&only, PREFIX, &h.ns.name, &h.dir);
    // A TTL long enough that no renewal falls in the test: only the watch can say "no leader".
    spec.args = vec!["--subnet-lease-ttl=120s".into()];
    let weftd = spec.start();
    weftd.wait_subnet(T);
    weftd.wait_log("kernel state matches", T);
    t.etcd_mut().kill_member(1);
    t.etcd_mut().kill_member(2);
    wait_for("the watch to be cancelled for want of a leader", T, || {
        weftd
            .log()
            .lines()
            .any(|l| l.contains("etcd watch broken") && l.contains("no leader"))
            .then_some(())
    });

    t.etcd_mut().start_member(1);
    t.etcd_mut().start_member(2);
    wait_all_healthy(&t);
    peer_arrives(&t, &[0], 1);
    weftd.assert_running();
}

#[test]
fn a_host_cut_off_from_etcd_past_its_ttl_is_dropped_by_the_others_and_rejoins() {
    if !require_root("a_host_cut_off_from_etcd_past_its_ttl_is_dropped_by_the_others_and_rejoins") {
        return;
    }
    let t = mesh(3, &["--subnet-lease-ttl=4s"]);
    let subnet0 = t.hosts[0].wait_subnet();
    let gone = subnet0.to_string();
    let etcd = t.etcd_ips();

    t.hosts[0].cut_off(&etcd);
    wait_for("host 0's lease to expire", T, || {
        t.etcd().get(&key(subnet0)).is_none().then_some(())
    });
    for i in 1..3 {
        wait_for("the others to drop host 0's route", T, || {
            (!has_route(&t, i, &gone)).then_some(())
        });
    }
    // Host 0 knows nothing of that: it still routes to both peers, and its packets still
    // arrive (the answers cannot come back: the others no longer route to it).
    assert_eq!(owned_routes(&t, 0).len(), 2, "{:?}", owned_routes(&t, 0));
    let probe = UdpProbe::listen(&t.hosts[1].container, 7777);
    udp_send(
        &t.hosts[0].container,
        (t.hosts[1].container_ip(), 7777).into(),
    );
    assert_eq!(
        probe.source().map(|s| s.ip()),
        Some(t.hosts[0].container_ip().into()),
        "host 0's container still reaches a peer it knows"
    );
    t.hosts[0].assert_running();

    t.hosts[0].reconnect(&etcd);
    wait_for("host 0 to lease its subnet again", T, || {
        t.etcd()
            .get(&key(subnet0))
            .filter(|v| v.contains(&format!("\"PublicIP\":\"{}\"", t.hosts[0].addr())))
    });
    assert_eq!(
        t.hosts[0].wait_subnet(),
        subnet0,
        "the same subnet: it was free"
    );
    t.assert_full_mesh(&[0, 1, 2]);
    for i in 0..3 {
        assert_eq!(owned_routes(&t, i).len(), 2, "{:?}", owned_routes(&t, i));
    }
}

/// Writes `kvs` (no etcd lease: peers that stay) in transactions of 100, from inside the
/// switch namespace where etcd listens.
fn put_many(t: &Topology, kvs: &[(String, String)]) {
    let endpoint = t.etcd().endpoint.clone();
    t.switch.run_in(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let mut c = etcd_client::Client::connect([endpoint], None)
                .await
                .expect("connect to etcd");
            for chunk in kvs.chunks(100) {
                let ops: Vec<etcd_client::TxnOp> = chunk
                    .iter()
                    .map(|(k, v)| etcd_client::TxnOp::put(k.as_str(), v.as_str(), None))
                    .collect();
                c.txn(etcd_client::Txn::new().and_then(ops))
                    .await
                    .expect("txn");
            }
        });
    });
}

/// Peer `n` of many: subnet 10.96.0.0/12's n-th /24, an address outside every namespace, a MAC.
fn many_peer(n: u32, generation: u32) -> (Ipv4Net, String) {
    let subnet = Ipv4Net::new(Ipv4Addr::from(0x0a60_0000 + (n << 8)), 24).expect("subnet");
    let octet = |v: u32| u8::try_from(v).expect("octet");
    let ip = Ipv4Addr::new(
        172,
        octet(16 + generation),
        octet(n / 200),
        octet(n % 200 + 1),
    );
    let mac = format!("02:00:{generation:02x}:00:{:02x}:{:02x}", n >> 8, n & 0xff);
    (subnet, vxlan_lease(ip, &mac))
}

/// The kernel's vxlan entries on host 0: routes, neighbours, FDB, each as sorted rows.
fn vxlan_state(t: &Topology) -> (BTreeSet<String>, BTreeSet<String>, BTreeSet<String>) {
    let ns = &t.hosts[0].ns;
    let routes = rows(
        &ns.ip_json("route show proto 87"),
        &["dst", "gateway", "dev"],
    );
    let onlink = ns
        .routes_json()
        .iter()
        .filter(|r| r["protocol"] == "87")
        .all(|r| r["flags"].to_string().contains("onlink"));
    assert!(onlink, "every weft route is onlink");
    let neigh = rows(
        &serde_json::Value::Array(ns.neighbours("flannel.1")),
        &["dst", "lladdr"],
    );
    let fdb = rows(
        &serde_json::Value::Array(ns.fdb("flannel.1")),
        &["mac", "dst"],
    );
    (
        routes.into_iter().collect(),
        neigh.into_iter().collect(),
        fdb.into_iter().collect(),
    )
}

/// What etcd says host 0's kernel must hold: every lease but its own, as routes, neighbours, FDB.
fn desired_state(t: &Topology) -> (BTreeSet<String>, BTreeSet<String>, BTreeSet<String>) {
    let own = key(t.hosts[0].wait_subnet());
    let mut want = (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
    for (k, v, _) in t.etcd().list(&format!("{PREFIX}/subnets/")) {
        if k == own {
            continue;
        }
        let subnet: Ipv4Net = k
            .rsplit('/')
            .next()
            .and_then(|s| s.replacen('-', "/", 1).parse().ok())
            .expect("subnet key");
        let lease: serde_json::Value = serde_json::from_str(&v).expect("lease JSON");
        let mac = lease["BackendData"]["VtepMAC"].as_str().expect("mac");
        let ip = lease["PublicIP"].as_str().expect("ip");
        let net = subnet.network();
        want.0.insert(format!("{subnet} {net} flannel.1"));
        want.1.insert(format!("{net} {mac}"));
        want.2.insert(format!("{mac} {ip}"));
    }
    want
}

/// Starts weftd on host 0 and SIGKILLs it as soon as `ip monitor <what>` shows a line with
/// `needle`; how many routes, neighbours and FDB entries it had written by then.
fn kill_at_first(t: &mut Topology, what: &str, needle: &str) -> (usize, usize, usize) {
    let mut monitor = t.hosts[0]
        .ns
        .command("ip")
        .args(["monitor", what])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("ip monitor");
    let (tx, rx) = mpsc::channel();
    let lines = BufReader::new(monitor.stdout.take().expect("stdout"));
    let wanted = needle.to_string();
    std::thread::spawn(move || {
        for line in lines.lines().map_while(Result::ok) {
            if line.contains(&wanted) {
                let _ = tx.send(line);
                break;
            }
        }
    });
    // `ip monitor` subscribes as it starts; give it that moment.
    std::thread::sleep(Duration::from_millis(300));
    t.start(0, &[]);
    let first = rx.recv_timeout(T);
    t.hosts[0].kill();
    let _ = monitor.kill();
    let _ = monitor.wait();
    first.unwrap_or_else(|_| panic!("no {what} with {needle:?} appeared"));
    let (r, n, f) = vxlan_state(t);
    (r.len(), n.len(), f.len())
}

#[test]
fn weftd_killed_while_programming_hundreds_of_peers_ends_with_exactly_the_desired_state() {
    if !require_root(
        "weftd_killed_while_programming_hundreds_of_peers_ends_with_exactly_the_desired_state",
    ) {
        return;
    }
    let mut t = Topology::new(1, 1500);
    t.set_config(r#"{"Network":"10.96.0.0/12","Backend":{"Type":"vxlan"}}"#);
    let peers: Vec<(String, String)> = (1..=300)
        .map(|n| {
            let (subnet, lease) = many_peer(n, 0);
            (key(subnet), lease)
        })
        .collect();
    put_many(&t, &peers);

    // Killed while routes go in (after the neighbours and FDB entries).
    let first = kill_at_first(&mut t, "route", "proto 87");
    eprintln!("first kill: {first:?} routes, neighbours, FDB entries of 300 peers written");
    // While it is down: 30 peers leave, 30 move to another PublicIP and MAC.
    for (k, _) in &peers[..30] {
        t.etcd().del(k);
    }
    let moved: Vec<(String, String)> = (31..=60)
        .map(|n| {
            let (subnet, lease) = many_peer(n, 1);
            (key(subnet), lease)
        })
        .collect();
    put_many(&t, &moved);

    // Killed again as it starts removing what is stale.
    let second = kill_at_first(&mut t, "neigh", "Deleted");
    eprintln!("second kill: {second:?} routes, neighbours, FDB entries (270 peers wanted)");

    t.start(0, &[]);
    let want = desired_state(&t);
    assert_eq!(want.0.len(), 270);
    wait_for(
        "the kernel to hold exactly the 270 peers in etcd",
        T,
        || (vxlan_state(&t) == want).then_some(()),
    );
    // And it stays so: nothing left over for a later pass to change.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(vxlan_state(&t), want);
    t.hosts[0].assert_running();
}

#[test]
fn a_stalled_etcd_does_not_starve_the_watchdog() {
    let etcd = Etcd::start();
    etcd.put(
        "/w/config",
        r#"{"Network":"10.81.0.0/16","Backend":{"Type":"alloc"}}"#,
    );
    let dir = tempfile::tempdir().expect("tmp");
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("bind notify socket");
    sock.set_read_timeout(Some(Duration::from_millis(50)))
        .expect("timeout");
    // WatchdogSec=2s; a renewal every second, each of which will hang on the stopped etcd.
    let a = WeftdSpec::new(&etcd, "/w", Ipv4Addr::new(10, 99, 0, 1), dir.path())
        .arg("--subnet-lease-ttl=3s")
        .env("NOTIFY_SOCKET", sock_path.display().to_string())
        .env("WATCHDOG_USEC", "2000000")
        .start();
    let mut buf = [0u8; 4096];
    wait_for("READY=1", T, || {
        let n = sock.recv(&mut buf).ok()?;
        String::from_utf8_lossy(&buf[..n])
            .lines()
            .any(|l| l == "READY=1")
            .then_some(())
    });

    etcd.pause_member(0);
    let paused = Instant::now();
    let mut last = paused;
    let mut longest = Duration::ZERO;
    while paused.elapsed() < Duration::from_secs(8) {
        if let Ok(n) = sock.recv(&mut buf) {
            if String::from_utf8_lossy(&buf[..n])
                .lines()
                .any(|l| l == "WATCHDOG=1")
            {
                longest = longest.max(last.elapsed());
                last = Instant::now();
            }
        }
    }
    longest = longest.max(last.elapsed());
    etcd.resume_member(0);
    eprintln!("etcd stopped for 8 s: longest time without WATCHDOG=1 {longest:?} (WatchdogSec=2s)");
    assert!(
        longest < Duration::from_millis(1500),
        "the watchdog starved for {longest:?}; log:\n{}",
        a.log()
    );

    // etcd back: the lease is renewed, or (expired meanwhile) taken again.
    wait_for("a lease in etcd again", T, || {
        etcd.list("/w/subnets/")
            .iter()
            .any(|(_, v, id)| v.contains("10.99.0.1") && *id != 0)
            .then_some(())
    });
    a.assert_running();
}

/// flanneld's default -etcd-endpoints name two URLs, and etcd mostly listens on one: the client
/// sends calls to the other one too (at random), where they are refused. Each must be made again
/// through the endpoint that answers, not fail: a renewal, a listing, the watch's setup.
#[test]
fn an_endpoint_nobody_listens_on_fails_no_call() {
    let etcd = Etcd::start();
    etcd.put(
        "/w/config",
        r#"{"Network":"10.82.0.0/16","Backend":{"Type":"alloc"}}"#,
    );
    let endpoints = format!("http://127.0.0.1:{},{}", free_port(), etcd.endpoint);
    let dir = tempfile::tempdir().expect("tmp");
    // A renewal a second, each as likely to be sent where nobody listens as not.
    let a = WeftdSpec::new_raw(&endpoints, "/w", Ipv4Addr::new(10, 99, 0, 2), dir.path())
        .arg("--subnet-lease-ttl=3s")
        .start();
    a.wait_subnet(T);
    for n in 1..=8u8 {
        let lease =
            format!(r#"{{"PublicIP":"10.98.1.{n}","PublicIPv6":null,"BackendType":"alloc"}}"#);
        etcd.put(&format!("/w/subnets/10.82.{n}.0-24"), &lease);
        a.wait_log(&format!("subnet=10.82.{n}.0/24"), T);
        std::thread::sleep(Duration::from_secs(1));
    }
    assert!(a.log().contains("lease renewed"), "{}", a.log());
    assert!(!a.log().contains("Connection refused"), "{}", a.log());
    a.assert_running();
}

#[test]
fn renewing_a_lease_etcd_no_longer_has_reports_it_expired() {
    use weft::registry::etcd::EtcdStore;
    use weft::registry::Renewal;
    let etcd = Etcd::start();
    let args = weft::flags::EtcdArgs {
        etcd_endpoints: vec![etcd.endpoint.clone()],
        etcd_prefix: "/w".into(),
        etcd_keyfile: None,
        etcd_certfile: None,
        etcd_cafile: None,
        etcd_username: None,
        etcd_password: None,
        etcd_password_file: None,
    };
    let hex = etcd.grant(60);
    let id = i64::from_str_radix(&hex, 16).expect("lease id");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let store = EtcdStore::connect(&args).await.expect("connect");
        assert_eq!(store.keep_alive(id).await.expect("renew"), Renewal::Renewed);
        etcd.ctl_ok(&["lease", "revoke", &hex]);
        assert_eq!(
            store.keep_alive(id).await.expect("an answer, not an error"),
            Renewal::Expired
        );
        assert_eq!(
            store.keep_alive(id ^ 0x5a5a).await.expect("never granted"),
            Renewal::Expired
        );
    });
}

/// After a long absence this host's subnet may belong to another host: `weftctl status` must not
/// take that host's lease for this one's.
#[test]
fn status_after_the_subnet_went_to_another_host_says_this_host_has_none() {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().expect("tmp");
    let env = dir.path().join("subnet.env");
    std::fs::write(
        &env,
        "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.7.1/24\nFLANNEL_MTU=1500\nFLANNEL_IPMASQ=false\n",
    )
    .expect("subnet.env");
    let env = env.display().to_string();
    let status = |extra: &[&str]| {
        let mut args = vec![
            "status",
            "-f",
            &env,
            "--docker-daemon-json=",
            "--bridge=weftnobr0",
        ];
        args.extend_from_slice(extra);
        let out = crate::harness::weftctl(&etcd, "/s", &args, None);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let lease =
        |ip: &str| format!(r#"{{"PublicIP":"{ip}","PublicIPv6":null,"BackendType":"alloc"}}"#);

    etcd.put("/s/subnets/10.5.7.0-24", &lease("10.1.2.9"));
    let (ok, out) = status(&["--public-ip=10.1.2.4"]);
    assert!(
        !ok && out.contains("etcd has no lease for 10.5.7.0/24"),
        "{out}"
    );
    let (ok, out) = status(&[]);
    assert!(!ok, "10.1.2.9 is no address of this machine:\n{out}");
    let (ok, out) = status(&["--public-ip=10.1.2.9"]);
    assert!(ok, "{out}");

    // This machine's own address needs no flag.
    etcd.put("/s/subnets/10.5.7.0-24", &lease("127.0.0.1"));
    let (ok, out) = status(&[]);
    assert!(ok && out.contains("public-ip 127.0.0.1"), "{out}");
}
