//! `weftctl doctor` on simulated hosts running weftd with vxlan: a healthy host (with and without
//! Docker) has no problem and exits 0; each broken state, made by hand the way it happens in the
//! field, is named by its check, with exit status 1.
//!
//! Most tests stop weftd (SIGTERM keeps its lease and kernel state) before breaking something, so
//! its reconcile does not repair the damage before doctor looks.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use weft_lab::dockerd::{require_docker, Dockerd};

use crate::harness::{free_port, wait_for, weftctl_with};
use crate::netns::{require_root, Topology, PREFIX};

const VXLAN: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
const T: Duration = Duration::from_secs(30);

/// What one doctor run printed.
struct Doctor {
    ok: bool,
    out: String,
}

impl Doctor {
    fn from(o: Output) -> Self {
        Self {
            ok: o.status.success(),
            out: format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        }
    }

    /// The problem lines of check `id`.
    fn problems(&self, id: &str) -> Vec<&str> {
        let prefix = format!("problem {id}: ");
        self.out
            .lines()
            .filter(|l| l.starts_with(&prefix))
            .collect()
    }

    /// The ids of every check that found a problem, each once, in order.
    fn ids(&self) -> Vec<&str> {
        let mut ids: Vec<&str> = self
            .out
            .lines()
            .filter_map(|l| l.strip_prefix("problem "))
            .filter_map(|l| l.split(':').next())
            .collect();
        ids.dedup();
        ids
    }

    /// Exit 1, and exactly the checks `ids` (in the order doctor runs them) found problems.
    fn assert_problems(&self, ids: &[&str]) {
        assert!(!self.ok, "doctor exited 0:\n{}", self.out);
        assert_eq!(self.ids(), ids, "{}", self.out);
    }

    /// The problem line of `id` containing `needle`.
    fn assert_names(&self, id: &str, needle: &str) {
        assert!(
            self.problems(id).iter().any(|l| l.contains(needle)),
            "no `problem {id}:` line with {needle:?}:\n{}",
            self.out
        );
    }
}

/// `weftctl doctor` inside host `i`, with that host's files and weftd's flags.
fn doctor(t: &Topology, i: usize, extra: &[&str]) -> Doctor {
    let h = &t.hosts[i];
    Doctor::from(weft_lab::cmd::output(
        h.ns.command(env!("CARGO_BIN_EXE_weftctl"))
            .env_remove("FLANNELD_PUBLIC_IP")
            .arg(format!("-etcd-endpoints={}", t.etcd().endpoint))
            .arg(format!("-etcd-prefix={PREFIX}"))
            .arg("doctor")
            .arg(format!(
                "-subnet-file={}",
                h.dir.join("subnet.env").display()
            ))
            .arg(format!(
                "--docker-daemon-json={}",
                h.dir.join("daemon.json").display()
            ))
            .args(extra),
        Duration::from_secs(60),
    ))
}

/// `n` vxlan hosts running weftd with `flags`, each with a container behind cni0, and doctor
/// finding nothing wrong on any of them.
fn healthy(n: usize, flags: &[&str]) -> Topology {
    let mut t = Topology::new(n, 1500);
    t.set_config(VXLAN);
    for i in 0..n {
        t.start(i, flags);
    }
    for i in 0..n {
        t.wire_container(i);
    }
    settle(&t, &(0..n).collect::<Vec<_>>(), &[]);
    t
}

/// Waits until doctor is clean on `hosts` (weftd converges within a reconcile).
fn settle(t: &Topology, hosts: &[usize], extra: &[&str]) {
    for &i in hosts {
        let mut last = String::new();
        let clean = (0..60).any(|_| {
            let d = doctor(t, i, extra);
            last = d.out;
            d.ok || {
                std::thread::sleep(Duration::from_millis(500));
                false
            }
        });
        assert!(
            clean,
            "host {i} never became healthy:\n{last}\nweftd log:\n{}",
            t.hosts[i].log()
        );
    }
}

fn ns_must(t: &Topology, i: usize, args: &[&str]) -> String {
    t.hosts[i].ns.must(args)
}

#[test]
fn a_healthy_host_has_no_problem_with_or_without_docker() {
    if !require_docker("doctor::a_healthy_host_has_no_problem_with_or_without_docker") {
        return;
    }
    let mut t = Topology::new(2, 1500);
    t.set_config(VXLAN);
    // Host 0 runs Docker from the daemon.json weftd writes; host 1 a CNI-style container.
    let mut d = Dockerd::new();
    let json = t.hosts[0].dir.join("daemon.json");
    std::fs::write(&json, format!("{{\"hosts\": [\"{}\"]}}\n", d.host_uri())).expect("json");
    t.start(0, &[]);
    t.start(1, &[]);
    let bip = t.hosts[0].wait_subnet();
    wait_for("bip in daemon.json", T, || {
        std::fs::read_to_string(&json)
            .ok()
            .filter(|j| j.contains("\"bip\""))
    });
    d.start(&t.hosts[0].ns, &json, false, &[]);
    d.import_busybox();
    let pod = d.run_busybox("pod");
    assert!(bip.contains(&pod), "{pod} outside {bip}");
    t.wire_container(1);
    // Docker sets FORWARD's policy to DROP where it turns forwarding on itself (the lab's hosts
    // forward already): as on such a host, only weft's rules let pod traffic through.
    ns_must(&t, 0, &["iptables", "-P", "FORWARD", "DROP"]);
    let peer = t.hosts[1].container_ip();
    wait_for("the Docker container to reach the other host's", T, || {
        d.docker(&["exec", "pod", "ping", "-c1", "-W1", &peer.to_string()])
            .status
            .success()
            .then_some(())
    });
    assert!(
        t.ping(1, pod),
        "host 1's container reaches the Docker container"
    );

    for i in [0, 1] {
        let r = doctor(&t, i, &[]);
        assert!(r.ok, "host {i}:\n{}", r.out);
        assert!(r.out.ends_with("no problem found\n"), "{}", r.out);
        assert!(r.ids().is_empty(), "{}", r.out);
        for id in ["etcd", "lease", "docker", "mtu", "peers", "forward"] {
            assert!(r.out.contains(&format!("ok {id}\n")), "{id}: {}", r.out);
        }
    }
    d.stop();
}

#[test]
fn healthy_host_gw_and_udp_hosts_have_no_problem() {
    if !require_root("doctor::healthy_host_gw_and_udp_hosts_have_no_problem") {
        return;
    }
    for config in [
        r#"{"Network":"10.245.0.0/16","Backend":{"Type":"host-gw"}}"#,
        r#"{"Network":"10.247.0.0/16","Backend":{"Type":"udp"}}"#,
    ] {
        let mut t = Topology::new(2, 1500);
        t.set_config(config);
        t.start(0, &[]);
        t.start(1, &[]);
        t.wire_container(0);
        t.wire_container(1);
        t.assert_full_mesh(&[0, 1]);
        settle(&t, &[0, 1], &[]);
        let r = doctor(&t, 0, &[]);
        assert!(r.out.contains("ok peers\n"), "{config}: {}", r.out);
    }
}

#[test]
fn the_flannel_device_without_its_address_or_gone_is_named() {
    if !require_root("doctor::the_flannel_device_without_its_address_or_gone_is_named") {
        return;
    }
    let mut t = healthy(2, &[]);
    t.hosts[0].stop();
    let subnet = t.hosts[0].wait_subnet();
    t.hosts[0].ns.ip("addr flush dev flannel.1");
    let r = doctor(&t, 0, &[]);
    // The kernel drops the neighbours and routes through the device with its last address.
    r.assert_problems(&["device", "peers"]);
    r.assert_names(
        "device",
        &format!("flannel.1 lacks the address {}/32", subnet.network()),
    );
    t.hosts[0].ns.ip("link del flannel.1");
    let r = doctor(&t, 0, &[]);
    r.assert_problems(&["device"]);
    r.assert_names("device", "flannel.1 does not exist");
}

#[test]
fn mtu_too_large_on_a_veth_or_for_the_underlay_is_named() {
    if !require_root("doctor::mtu_too_large_on_a_veth_or_for_the_underlay_is_named") {
        return;
    }
    let mut t = healthy(1, &[]);
    t.hosts[0].stop();
    // A container started before FLANNEL_MTU was known: its veth has the default 1500.
    t.hosts[0].ns.ip("link set vc mtu 1500");
    let r = doctor(&t, 0, &[]);
    r.assert_problems(&["mtu"]);
    r.assert_names(
        "mtu",
        "vc (a container's interface on cni0) has MTU 1500, above FLANNEL_MTU 1450",
    );
    t.hosts[0].ns.ip("link set vc mtu 1450");

    // The underlay shrank under a running overlay (a cloud NIC moved from 9001 to 1500 …).
    t.hosts[0].ns.ip("link set eth0 mtu 1400");
    let r = doctor(&t, 0, &[]);
    r.assert_problems(&["mtu"]);
    r.assert_names(
        "mtu",
        "FLANNEL_MTU 1450 plus vxlan's 50 bytes exceeds the underlay eth0's MTU 1400",
    );
}

/// `tx-checksum-ip-generic` of flannel.1 in host `i`.
fn tx_checksum(t: &Topology, i: usize) -> String {
    let out = ns_must(t, i, &["ethtool", "-k", "flannel.1"]);
    out.lines()
        .find_map(|l| l.trim().strip_prefix("tx-checksum-ip-generic: "))
        .and_then(|v| v.split_whitespace().next())
        .unwrap_or_default()
        .to_string()
}

#[test]
fn the_checksum_offload_trap_behind_nat_is_named_and_the_backend_option_fixes_it() {
    if !require_root(
        "doctor::the_checksum_offload_trap_behind_nat_is_named_and_the_backend_option_fixes_it",
    ) {
        return;
    }
    // The host's PublicIP is an address NAT translates to it (flannel's troubleshooting case).
    let nat = ["-public-ip=10.199.0.211"];
    let mut t = Topology::new(1, 1500);
    t.set_config(VXLAN);
    t.start(0, &nat);
    t.wire_container(0);
    let r = wait_for("doctor to name the offload", T, || {
        let r = doctor(&t, 0, &nat);
        (!r.problems("checksum-offload").is_empty()).then_some(r)
    });
    r.assert_problems(&["checksum-offload"]);
    r.assert_names(
        "checksum-offload",
        "flannel.1 has tx-checksum-ip-generic on and the PublicIP 10.199.0.211 is not an address of this host",
    );
    r.assert_names("checksum-offload", "\"TxChecksumOffload\": false");
    assert_eq!(tx_checksum(&t, 0), "on");

    // The fix doctor names: the backend option, picked up by weftd.
    t.hosts[0].stop();
    t.set_config(
        r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","TxChecksumOffload":false}}"#,
    );
    t.start(0, &nat);
    wait_for("weftd to turn the offload off", T, || {
        (tx_checksum(&t, 0) == "off").then_some(())
    });
    settle(&t, &[0], &nat);
}

/// Host 0's view of host 1: (its subnet, its VTEP MAC, its PublicIP).
fn peer_of(t: &Topology) -> (String, String, String) {
    let subnet = t.hosts[1].wait_subnet().to_string();
    let lease = t
        .etcd()
        .get(&format!("{PREFIX}/subnets/{}", subnet.replace('/', "-")))
        .expect("host 1's lease");
    let v: serde_json::Value = serde_json::from_str(&lease).expect("lease json");
    (
        subnet,
        v["BackendData"]["VtepMAC"]
            .as_str()
            .expect("mac")
            .to_string(),
        v["PublicIP"].as_str().expect("ip").to_string(),
    )
}

#[test]
fn a_peers_missing_or_wrong_route_neighbour_and_fdb_entry_are_named() {
    if !require_root("doctor::a_peers_missing_or_wrong_route_neighbour_and_fdb_entry_are_named") {
        return;
    }
    let mut t = healthy(2, &[]);
    t.hosts[0].stop();
    let (subnet, mac, ip) = peer_of(&t);
    let gw = subnet.split('/').next().expect("net").to_string();
    let h = &t.hosts[0].ns;
    h.ip(&format!("route del {subnet}"));
    h.ip(&format!(
        "neigh replace {gw} lladdr 0e:00:00:00:00:99 dev flannel.1 nud permanent"
    ));
    h.must(&["bridge", "fdb", "del", &mac, "dev", "flannel.1", "dst", &ip]);
    let r = doctor(&t, 0, &[]);
    r.assert_problems(&["peers"]);
    let peer = format!("peer {subnet} ({ip})");
    r.assert_names(
        "peers",
        &format!("{peer}: no route to {subnet} (want `{subnet} via {gw} dev flannel.1 onlink`)"),
    );
    r.assert_names(
        "peers",
        &format!(
            "{peer}: the neighbour {gw} on flannel.1 is 0e:00:00:00:00:99, not its VtepMAC {mac}"
        ),
    );
    r.assert_names(
        "peers",
        &format!("{peer}: no FDB entry {mac} → {ip} on flannel.1"),
    );
    assert_eq!(r.problems("peers").len(), 3, "{}", r.out);

    // weftd repairs all of it.
    t.start(0, &[]);
    settle(&t, &[0], &[]);
}

#[test]
fn a_route_from_something_else_inside_the_network_is_named() {
    if !require_root("doctor::a_route_from_something_else_inside_the_network_is_named") {
        return;
    }
    let t = healthy(1, &[]);
    // Any subnet of the network but the host's own (whose bridge route is there).
    let own = t.hosts[0].wait_subnet().to_string();
    let other = ["10.244.250.0/24", "10.244.251.0/24"]
        .into_iter()
        .find(|s| *s != own)
        .expect("one of two");
    t.hosts[0]
        .ns
        .ip(&format!("route add {other} via 10.199.0.1"));
    let r = doctor(&t, 0, &[]);
    r.assert_problems(&["routes"]);
    r.assert_names(
        "routes",
        &format!("route `{other} via 10.199.0.1 dev eth0 proto boot` (not weft's) lies inside the cluster network 10.244.0.0/16"),
    );
}

#[test]
fn forward_policy_drop_or_an_early_reject_is_named() {
    if !require_root("doctor::forward_policy_drop_or_an_early_reject_is_named") {
        return;
    }
    // Without weft's forward rules, Docker's policy DROP drops pod traffic (flannel #699).
    let t = healthy(1, &["-iptables-forward-rules=false"]);
    ns_must(&t, 0, &["iptables", "-P", "FORWARD", "DROP"]);
    let r = doctor(&t, 0, &[]);
    r.assert_problems(&["forward"]);
    r.assert_names("forward", "FORWARD's policy is DROP");
    r.assert_names("forward", "-iptables-forward-rules=true");
    drop(t);

    // With them, a REJECT ahead of weft's jump (RHEL's default rules) still drops it (#2116).
    let t = healthy(1, &[]);
    ns_must(
        &t,
        0,
        &[
            "iptables",
            "-I",
            "FORWARD",
            "1",
            "-j",
            "REJECT",
            "--reject-with",
            "icmp-host-prohibited",
        ],
    );
    let r = doctor(&t, 0, &[]);
    r.assert_problems(&["forward"]);
    r.assert_names(
        "forward",
        "FORWARD rule 1 `-A FORWARD -j REJECT --reject-with icmp-host-prohibited` drops pod traffic",
    );
}

#[test]
fn a_second_agent_writing_flannels_chains_is_named() {
    if !require_root("doctor::a_second_agent_writing_flannels_chains_is_named") {
        return;
    }
    let mut t = healthy(1, &["-ip-masq"]);
    t.hosts[0].stop();
    // What a flanneld with another lease of the same network appends beside weft's rules.
    let c = "flanneld masq";
    for rule in [
        &[
            "-A",
            "FLANNEL-POSTRTG",
            "-s",
            "10.244.99.0/24",
            "-d",
            "10.244.0.0/16",
        ][..],
        &[
            "-A",
            "FLANNEL-POSTRTG",
            "-s",
            "10.244.0.0/16",
            "-d",
            "10.244.99.0/24",
        ],
    ] {
        let mut args = vec!["iptables", "-t", "nat"];
        args.extend_from_slice(rule);
        args.extend_from_slice(&["-m", "comment", "--comment", c, "-j", "RETURN"]);
        ns_must(&t, 0, &args);
    }
    ns_must(
        &t,
        0,
        &[
            "iptables",
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-m",
            "comment",
            "--comment",
            c,
            "-j",
            "FLANNEL-POSTRTG",
        ],
    );
    let r = doctor(&t, 0, &[]);
    r.assert_problems(&["agents"]);
    r.assert_names("agents", "POSTROUTING jumps to FLANNEL-POSTRTG 2 times");
    r.assert_names(
        "agents",
        "FLANNEL-POSTRTG has rules for 10.244.99.0/24 of 10.244.0.0/16, but this host's lease is",
    );
    r.assert_names("agents", "systemctl disable --now flanneld");
}

#[test]
fn subnet_env_and_docker_disagreeing_with_the_lease_are_named() {
    if !require_root("doctor::subnet_env_and_docker_disagreeing_with_the_lease_are_named") {
        return;
    }
    let mut t = healthy(1, &[]);
    t.hosts[0].stop();
    let dir = t.hosts[0].dir.clone();
    let env_path = dir.join("subnet.env");
    let env = std::fs::read_to_string(&env_path).expect("subnet.env");
    let subnet = t.hosts[0].wait_subnet();
    let gw = weft_lab::topology::gateway(subnet);

    // daemon.json with another bip, and a docker0 Docker made from an older lease.
    std::fs::write(dir.join("daemon.json"), "{\"bip\": \"172.17.0.1/16\"}\n").expect("json");
    let h = &t.hosts[0].ns;
    h.ip("link add docker0 type bridge");
    h.ip("addr add 172.17.0.1/16 dev docker0");
    let r = doctor(&t, 0, &[]);
    r.assert_problems(&["docker"]);
    r.assert_names(
        "docker",
        &format!("has bip 172.17.0.1/16 but the lease needs {gw}/24"),
    );
    r.assert_names(
        "docker",
        &format!("Docker must be restarted to pick up bip {gw}/24 (docker0 has 172.17.0.1)"),
    );
    h.ip("link del docker0");
    std::fs::remove_file(dir.join("daemon.json")).expect("rm daemon.json");

    // subnet.env gone (what the CNI plugin then fails on) …
    std::fs::remove_file(&env_path).expect("rm subnet.env");
    let r = doctor(&t, 0, &[]);
    r.assert_problems(&["subnet-env"]);
    r.assert_names("subnet-env", "weftd has not leased a subnet");

    // … or naming a subnet this host no longer holds.
    let stale = env.replace(&format!("{gw}/24"), "10.244.250.1/24");
    std::fs::write(&env_path, stale).expect("write subnet.env");
    let r = doctor(&t, 0, &[]);
    r.assert_problems(&["subnet-env"]);
    r.assert_names(
        "subnet-env",
        &format!("says FLANNEL_SUBNET=10.244.250.1/24 but this host's lease in etcd is {subnet}"),
    );
}

#[test]
fn a_lease_about_to_expire_is_named() {
    if !require_root("doctor::a_lease_about_to_expire_is_named") {
        return;
    }
    let mut t = healthy(1, &[]);
    t.hosts[0].stop();
    // The same lease on an etcd lease with seconds left: weftd is not renewing it.
    let subnet = t.hosts[0].wait_subnet();
    let key = format!("{PREFIX}/subnets/{}", subnet.to_string().replace('/', "-"));
    let value = t.etcd().get(&key).expect("lease");
    t.etcd().put_leased(&key, &value, 30);
    let r = doctor(&t, 0, &[]);
    r.assert_problems(&["lease"]);
    r.assert_names("lease", &format!("this host's lease {subnet} expires in"));
    r.assert_names("lease", "but weftd renews it 1h0m0s before expiry");
}

#[test]
fn duplicate_public_ips_and_vtep_macs_in_the_leases_are_named() {
    if !require_root("doctor::duplicate_public_ips_and_vtep_macs_in_the_leases_are_named") {
        return;
    }
    let t = healthy(2, &[]);
    let (subnet, mac, ip) = peer_of(&t);
    // A second lease with host 1's address and MAC (a cloned VM, a stale lease).
    t.etcd().put_leased(
        &format!("{PREFIX}/subnets/10.244.200.0-24"),
        &format!(
            r#"{{"PublicIP":"{ip}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}"#
        ),
        600,
    );
    let r = doctor(&t, 0, &[]);
    r.assert_problems(&["leases"]);
    let mut both = [subnet.as_str(), "10.244.200.0/24"];
    both.sort();
    let both = both.join(", ");
    r.assert_names("leases", &format!("leases {both} all name PublicIP {ip}"));
    r.assert_names(
        "leases",
        &format!("leases {both} all publish VtepMAC {mac}"),
    );
}

#[test]
fn etcd_unreachable_is_named() {
    if !require_root("doctor::etcd_unreachable_is_named") {
        return;
    }
    let t = healthy(1, &[]);
    let h = &t.hosts[0];
    let r = Doctor::from(weft_lab::cmd::output(
        h.ns.command(env!("CARGO_BIN_EXE_weftctl"))
            .arg("-etcd-endpoints=http://10.199.0.1:1")
            .arg("doctor")
            .arg(format!(
                "-subnet-file={}",
                h.dir.join("subnet.env").display()
            ))
            .arg("--docker-daemon-json="),
        Duration::from_secs(60),
    ));
    r.assert_problems(&["etcd"]);
    r.assert_names("etcd", "etcd at http://10.199.0.1:1 cannot be reached");
    // What needs no etcd still runs, on subnet.env's network.
    assert!(r.out.contains("ok forward\n"), "{}", r.out);
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = weft_lab::cmd::output(
        Command::new("openssl").current_dir(dir).args(args),
        Duration::from_secs(30),
    );
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A self-signed CA named `name` (`name.crt`, `name.key`).
fn ca(dir: &Path, name: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.crt"),
        ],
    );
}

#[test]
fn a_tls_problem_with_etcd_is_named_as_such() {
    let dir = tempfile::tempdir().expect("tmp");
    let pki = dir.path();
    // etcd's certificate comes from one CA; doctor is given another.
    ca(pki, "ca");
    ca(pki, "other-ca");
    std::fs::write(pki.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").expect("ext");
    openssl(
        pki,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=etcd",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ],
    );
    openssl(
        pki,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            "-out",
            "server.crt",
        ],
    );
    let (port, peer) = (free_port(), free_port());
    let url = format!("https://127.0.0.1:{port}");
    let p = |f: &str| pki.join(f).display().to_string();
    let mut etcd = Command::new("etcd")
        .args(crate::harness::etcd_args(
            "tls",
            &pki.join("data"),
            &url,
            &format!("http://127.0.0.1:{peer}"),
        ))
        .args([
            "--cert-file",
            &p("server.crt"),
            "--key-file",
            &p("server.key"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("etcd");
    let ep = format!("-etcd-endpoints={url}");
    let good = format!("-etcd-cafile={}", p("ca.crt"));
    // Up: the right CA reads the (absent) config.
    wait_for("etcd over TLS", T, || {
        let o = weftctl_with(&[&ep, &good, "config", "get"], None);
        String::from_utf8_lossy(&o.stderr)
            .contains("no network config")
            .then_some(())
    });
    let bad = format!("-etcd-cafile={}", p("other-ca.crt"));
    let env = pki.join("subnet.env");
    let env = format!("-subnet-file={}", env.display());
    let r = Doctor::from(weftctl_with(
        &[&ep, &bad, "doctor", &env, "--docker-daemon-json="],
        None,
    ));
    let _ = etcd.kill();
    let _ = etcd.wait();
    assert!(!r.ok, "{}", r.out);
    r.assert_names("etcd", &format!("TLS to etcd at {url} fails"));
    r.assert_names("etcd", "-etcd-cafile");
}

#[test]
fn a_dual_stack_host_is_checked_on_both_sides() {
    for config in [
        r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:244::/48","Backend":{"Type":"host-gw"}}"#,
        r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:244::/48","Backend":{"Type":"vxlan"}}"#,
    ] {
        let Some(t) = Topology::dual_stack(2, config, &[0, 1], &[]) else {
            return;
        };
        t.assert_full_mesh6(&[0, 1]);
        settle(&t, &[0, 1], &[]);
        let r = doctor(&t, 0, &[]);
        for id in ["subnet-env", "peers", "routes", "forward"] {
            assert!(
                r.out.contains(&format!("ok {id}\n")),
                "{config}: {id}: {}",
                r.out
            );
        }
        // A peer's IPv6 route gone: named (before weftd puts it back).
        let peer6 = t.hosts[1].wait_subnet6().to_string();
        t.hosts[0].freeze(true);
        t.hosts[0].ns.ip(&format!("-6 route del {peer6}"));
        let r = doctor(&t, 0, &[]);
        t.hosts[0].freeze(false);
        r.assert_problems(&["peers"]);
        r.assert_names("peers", &format!("no route to {peer6}"));
        // vxlan: the peer's IPv6 neighbour on flannel-v6.1 gone, named the same way.
        if config.contains("vxlan") {
            let addr = t.hosts[1].wait_subnet6().network();
            t.hosts[0].freeze(true);
            t.hosts[0]
                .ns
                .ip(&format!("-6 neigh del {addr} dev flannel-v6.1"));
            let r = doctor(&t, 0, &[]);
            t.hosts[0].freeze(false);
            r.assert_problems(&["peers"]);
            r.assert_names("peers", &format!("no neighbour {addr} → "));
            r.assert_names("peers", "on flannel-v6.1");
        }
        // And IPv6 forwarding off.
        t.hosts[0]
            .ns
            .must(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=0"]);
        let r = doctor(&t, 0, &[]);
        r.assert_names("forward", "net.ipv6.conf.all.forwarding is 0");
    }
}
