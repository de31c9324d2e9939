//! Docker bootstrap with a real dockerd (Debian's docker.io) per simulated host: weftd writes
//! daemon.json, dockerd starts from it, containers on different hosts reach each other; the
//! operator's keys survive; `weftctl docker-opts` flags give the same docker0; a lease change is
//! written and `weftctl status` says Docker must be restarted; a dual-stack lease gives docker0
//! and containers IPv6 from it. Also `weftctl status` against etcd without Docker, and the
//! examples in config/.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use weft_lab::dockerd::{require_docker, Dockerd};
use weft_lab::{require_ipv6, Netns};

use crate::harness::{wait_for, weftctl, Etcd, WeftdSpec};
use crate::netns::{Topology, SWITCH_IP};

const VXLAN: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
const HOST_GW: &str = r#"{"Network":"10.245.0.0/16","Backend":{"Type":"host-gw"}}"#;
const UDP: &str = r#"{"Network":"10.247.0.0/16","Backend":{"Type":"udp"}}"#;
const DUAL_ALLOC: &str = r#"{"Network":"10.246.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:246::/48","Backend":{"Type":"alloc"}}"#;
const T: Duration = Duration::from_secs(30);

/// An operator's daemon.json: the keys weftd must leave alone. "hosts" names the test's socket,
/// so dockerd is started without -H.
fn operator_daemon_json(d: &Dockerd) -> String {
    format!(
        r#"{{
  "registry-mirrors": ["https://mirror.weft-test.invalid:5000"],
  "hosts": ["{}"],
  "insecure-registries": ["registry.weft-test.invalid:5000"]
}}
"#,
        d.host_uri()
    )
}

/// docker0's IPv4 address with prefix length in `ns`, if it has one.
fn docker0(ns: &Netns) -> Option<String> {
    let v = ns.ip_json("addr show dev docker0");
    v.as_array()?.first()?["addr_info"]
        .as_array()?
        .iter()
        .find(|a| a["family"] == "inet")
        .map(|a| format!("{}/{}", a["local"].as_str().unwrap_or(""), a["prefixlen"]))
}

/// docker0's global IPv6 addresses with prefix lengths in `ns` (`ip -6 -j addr show docker0`).
fn docker0_v6(ns: &Netns) -> Vec<String> {
    let v = ns.ip_json("-6 addr show dev docker0");
    let addrs = v
        .as_array()
        .and_then(|links| links.first()?["addr_info"].as_array());
    addrs
        .into_iter()
        .flatten()
        .filter(|a| a["family"] == "inet6" && a["scope"] == "global")
        .map(|a| format!("{}/{}", a["local"].as_str().unwrap_or(""), a["prefixlen"]))
        .collect()
}

/// daemon.json once weftd has put a bip in it.
fn wait_daemon_json(path: &Path, bip: &str) -> String {
    wait_for(&format!("bip {bip} in {}", path.display()), T, || {
        std::fs::read_to_string(path)
            .ok()
            .filter(|t| t.contains(&format!("\"bip\": \"{bip}\"")))
    })
}

/// `weftctl status` run inside host `ns` (so docker0 is that host's) against the switch's etcd.
fn status_in(ns: &Netns, dir: &Path) -> Output {
    weft_lab::cmd::output(
        ns.command(env!("CARGO_BIN_EXE_weftctl"))
            .arg(format!("-etcd-endpoints=http://{SWITCH_IP}:2379"))
            .arg("status")
            .arg("-f")
            .arg(dir.join("subnet.env"))
            .arg("--docker-daemon-json")
            .arg(dir.join("daemon.json")),
        Duration::from_secs(30),
    )
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn ping_until(d: &Dockerd, from: &str, to: Ipv4Addr, why: &str) {
    wait_for(why, Duration::from_secs(20), || {
        d.docker(&["exec", from, "ping", "-c1", "-W1", &to.to_string()])
            .status
            .success()
            .then_some(())
    });
}

/// The classic setup on two hosts: operator's daemon.json, weftd, dockerd from daemon.json,
/// a container per host, pings both ways, MTU and docker0 from the lease.
fn two_hosts_with_docker(config: &str, want_mtu: &str) {
    let mut t = Topology::new(2, 1500);
    t.set_config(config);
    let mut docker: Vec<Dockerd> = (0..2).map(|_| Dockerd::new()).collect();
    let mut before = Vec::new();
    for (i, d) in docker.iter().enumerate() {
        let json = operator_daemon_json(d);
        std::fs::write(t.hosts[i].dir.join("daemon.json"), &json).expect("daemon.json");
        before.push(json);
        t.start(i, &[]);
    }
    let mut ips = Vec::new();
    for (i, d) in docker.iter_mut().enumerate() {
        let h = &t.hosts[i];
        let subnet = h.wait_subnet();
        let bip = h.env_var("FLANNEL_SUBNET").expect("FLANNEL_SUBNET");
        assert_eq!(h.env_var("FLANNEL_MTU").as_deref(), Some(want_mtu));
        let path = h.dir.join("daemon.json");
        let after = wait_daemon_json(&path, &bip);
        // Every operator byte kept; bip and mtu appended in the file's own style.
        let expected = before[i].replace(
            "5000\"]\n}",
            &format!("5000\"],\n  \"bip\": \"{bip}\",\n  \"mtu\": {want_mtu}\n}}"),
        );
        assert_eq!(after, expected);

        d.start(&h.ns, &path, false, &[]);
        assert_eq!(
            docker0(&h.ns).as_deref(),
            Some(bip.as_str()),
            "docker0 is the lease's first address"
        );
        let mirrors = d.docker_ok(&["info", "-f", "{{json .RegistryConfig.Mirrors}}"]);
        assert!(mirrors.contains("mirror.weft-test.invalid"), "{mirrors}");
        let insecure = d.docker_ok(&["info", "-f", "{{json .RegistryConfig.IndexConfigs}}"]);
        assert!(
            insecure.contains("registry.weft-test.invalid:5000"),
            "{insecure}"
        );

        d.import_busybox();
        let ip = d.run_busybox("pod");
        assert!(
            subnet.contains(&ip),
            "container {ip} outside the lease {subnet}"
        );
        assert_eq!(d.exec_cat("pod", "/sys/class/net/eth0/mtu"), want_mtu);
        ips.push(ip);

        let st = status_in(&h.ns, &h.dir);
        assert!(st.status.success(), "weftctl status:\n{}", text(&st));
        assert!(text(&st).contains("status: consistent"), "{}", text(&st));
    }
    ping_until(
        &docker[0],
        "pod",
        ips[1],
        "host 0's container to reach host 1's",
    );
    ping_until(
        &docker[1],
        "pod",
        ips[0],
        "host 1's container to reach host 0's",
    );
    // Stop Docker before the topology goes (fields drop in order: docker was declared after t).
    for d in &mut docker {
        d.stop();
    }
}

#[test]
fn docker_vxlan_two_hosts_bip_from_lease_and_containers_ping_across() {
    if !require_docker("docker_vxlan_two_hosts_bip_from_lease_and_containers_ping_across") {
        return;
    }
    two_hosts_with_docker(VXLAN, "1450");
}

#[test]
fn docker_udp_two_hosts_bip_from_lease_and_containers_ping_across() {
    if !require_docker("docker_udp_two_hosts_bip_from_lease_and_containers_ping_across") {
        return;
    }
    two_hosts_with_docker(UDP, "1472");
}

#[test]
fn docker_host_gw_two_hosts_bip_from_lease_and_containers_ping_across() {
    if !require_docker("docker_host_gw_two_hosts_bip_from_lease_and_containers_ping_across") {
        return;
    }
    two_hosts_with_docker(HOST_GW, "1500");
}

/// docker0's address and a container's eth0 MTU under `d`.
fn docker_network_of(d: &Dockerd, ns: &Netns) -> (String, String) {
    d.import_busybox();
    d.run_busybox("probe");
    (
        docker0(ns).expect("docker0 address"),
        d.exec_cat("probe", "/sys/class/net/eth0/mtu"),
    )
}

#[test]
fn docker_opts_flags_give_the_same_docker0_as_daemon_json() {
    if !require_docker("docker_opts_flags_give_the_same_docker0_as_daemon_json") {
        return;
    }
    let mut t = Topology::new(1, 1500);
    t.set_config(VXLAN);
    t.start(0, &[]);
    let h = &t.hosts[0];
    h.wait_subnet();
    let bip = h.env_var("FLANNEL_SUBNET").expect("FLANNEL_SUBNET");
    let json = h.dir.join("daemon.json");
    wait_daemon_json(&json, &bip);

    let mut d = Dockerd::new();
    d.start(&h.ns, &json, true, &[]);
    let from_json = docker_network_of(&d, &h.ns);
    d.stop();
    assert_eq!(from_json, (bip.clone(), "1450".to_string()));

    // The flags route: a daemon.json without bip/mtu, and mk-docker-opts.sh's DOCKER_OPTS.
    h.ns.ip("link del docker0");
    let flags = docker_opts_flags(h);
    assert_eq!(
        flags,
        [
            format!("--bip={bip}"),
            "--ip-masq=true".into(),
            "--mtu=1450".into()
        ]
    );
    let empty = d.dir().join("flags-daemon.json");
    std::fs::write(&empty, "{}\n").expect("empty daemon.json");
    let mut d2 = Dockerd::new();
    d2.start(&h.ns, &empty, true, &flags);
    let from_flags = docker_network_of(&d2, &h.ns);
    d2.stop();
    assert_eq!(from_flags, from_json);
}

/// `weftctl docker-opts -c` for host `h`'s subnet.env, as dockerd flags.
fn docker_opts_flags(h: &crate::netns::Host) -> Vec<String> {
    let out = weft_lab::cmd::output(
        Command::new(env!("CARGO_BIN_EXE_weftctl"))
            .args(["docker-opts", "-f"])
            .arg(h.dir.join("subnet.env"))
            .args(["-d", "-", "-c"])
            .env_remove("DOCKER_OPTS"),
        T,
    );
    assert!(out.status.success(), "{}", text(&out));
    let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let opts = line
        .strip_prefix("DOCKER_OPTS=\"")
        .and_then(|l| l.strip_suffix('"'))
        .unwrap_or_else(|| panic!("unexpected docker-opts output {line:?}"));
    opts.split_whitespace().map(str::to_string).collect()
}

/// A dual-stack lease: weftd appends `"ipv6": true` and `"fixed-cidr-v6"` (the IPv6 lease) after
/// bip and mtu, keeping the operator's bytes; a real dockerd started from that file gives docker0
/// the IPv6 lease's first address (FLANNEL_IPV6_SUBNET) beside the bip, and a container an IPv6
/// address in the lease that reaches docker0. Debian's Docker 20.10 needs no other key for that
/// (`ip6tables` is not written: on 20.10 it needs `experimental`, and dockerd refuses to start
/// with it alone). `weftctl docker-opts`' flags give the same docker0.
#[test]
fn docker_dual_stack_daemon_json_gives_docker0_the_ipv6_lease() {
    const NAME: &str = "docker_dual_stack_daemon_json_gives_docker0_the_ipv6_lease";
    if !require_docker(NAME) || !require_ipv6(NAME) {
        return;
    }
    let mut t = Topology::new(1, 1500);
    t.set_config(DUAL_ALLOC);
    let mut d = Dockerd::new();
    let json = operator_daemon_json(&d);
    let path = t.hosts[0].dir.join("daemon.json");
    std::fs::write(&path, &json).expect("daemon.json");
    let public6 = format!("--public-ipv6={}", t.hosts[0].addr6());
    t.start(0, &[&public6]);
    let h = &t.hosts[0];
    let subnet = h.wait_subnet();
    let subnet6 = h.wait_subnet6();
    assert!(
        "fd00:246::/48"
            .parse::<ipnet::Ipv6Net>()
            .expect("net")
            .contains(&subnet6),
        "{subnet6}"
    );
    let bip = h.env_var("FLANNEL_SUBNET").expect("FLANNEL_SUBNET");
    let bridge6 = h
        .env_var("FLANNEL_IPV6_SUBNET")
        .expect("FLANNEL_IPV6_SUBNET");
    let gateway6 = weft_lab::topology::gateway6(subnet6);
    assert_eq!(bridge6, format!("{gateway6}/{}", subnet6.prefix_len()));

    let after = wait_daemon_json(&path, &bip);
    let expected = json.replace(
        "5000\"]\n}",
        &format!(
            "5000\"],\n  \"bip\": \"{bip}\",\n  \"mtu\": 1500,\n  \"ipv6\": true,\n  \
             \"fixed-cidr-v6\": \"{subnet6}\"\n}}"
        ),
    );
    assert_eq!(after, expected);

    d.start(&h.ns, &path, false, &[]);
    assert_eq!(docker0(&h.ns).as_deref(), Some(bip.as_str()));
    assert_eq!(
        docker0_v6(&h.ns),
        std::slice::from_ref(&bridge6),
        "docker0's global IPv6 addresses; dockerd log:\n{}",
        weft_lab::cmd::tail(&d.log(), 30)
    );
    d.import_busybox();
    let ip = d.run_busybox("pod");
    assert!(subnet.contains(&ip), "container {ip} outside {subnet}");
    let ip6 = d.docker_ok(&[
        "inspect",
        "-f",
        "{{.NetworkSettings.GlobalIPv6Address}}",
        "pod",
    ]);
    let ip6: Ipv6Addr = ip6
        .parse()
        .unwrap_or_else(|_| panic!("container has no IPv6 address: {ip6:?}"));
    assert!(subnet6.contains(&ip6), "container {ip6} outside {subnet6}");
    wait_for("the container to reach docker0 over IPv6", T, || {
        d.docker(&["exec", "pod", "ping", "-c1", "-W1", &gateway6.to_string()])
            .status
            .success()
            .then_some(())
    });
    let st = status_in(&h.ns, &h.dir);
    assert!(st.status.success(), "weftctl status:\n{}", text(&st));
    d.stop();

    // The flags route: mk-docker-opts.sh's DOCKER_OPTS with weft's two IPv6 options.
    h.ns.ip("link del docker0");
    let flags = docker_opts_flags(h);
    assert_eq!(
        flags,
        [
            format!("--bip={bip}"),
            format!("--fixed-cidr-v6={subnet6}"),
            "--ip-masq=true".into(),
            "--ipv6".into(),
            "--mtu=1500".into(),
        ]
    );
    let mut d2 = Dockerd::new();
    let empty = d2.dir().join("flags-daemon.json");
    std::fs::write(&empty, "{}\n").expect("empty daemon.json");
    d2.start(&h.ns, &empty, true, &flags);
    assert_eq!(docker0(&h.ns).as_deref(), Some(bip.as_str()));
    assert_eq!(docker0_v6(&h.ns), [bridge6]);
    d2.stop();

    // IPv6 turned off: the IPv4 lease stays, and daemon.json's IPv6 keys with it. weftd cannot
    // tell its own from the operator's, so it leaves them and says they look stale.
    t.set_config(r#"{"Network":"10.246.0.0/16","Backend":{"Type":"alloc"}}"#);
    wait_for("subnet.env without IPv6", T, || {
        h.subnet_env().filter(|e| !e.contains("IPV6"))
    });
    h.wait_log(
        "the network is IPv4 only but daemon.json has fixed-cidr-v6",
        T,
    );
    assert_eq!(h.wait_subnet(), subnet);
    assert_eq!(
        std::fs::read_to_string(&path).expect("daemon.json"),
        expected
    );
}

#[test]
fn docker_a_new_lease_is_written_and_status_says_docker_must_be_restarted() {
    if !require_docker("docker_a_new_lease_is_written_and_status_says_docker_must_be_restarted") {
        return;
    }
    let mut t = Topology::new(1, 1500);
    t.set_config(VXLAN);
    t.start(0, &[]);
    let h = &t.hosts[0];
    let old = h.wait_subnet();
    let old_bip = h.env_var("FLANNEL_SUBNET").expect("FLANNEL_SUBNET");
    let json = h.dir.join("daemon.json");
    wait_daemon_json(&json, &old_bip);
    let mut d = Dockerd::new();
    d.start(&h.ns, &json, true, &[]);
    let st = status_in(&h.ns, &h.dir);
    assert!(st.status.success(), "{}", text(&st));

    // A new network config: weftd leases again in the new network and rewrites both files.
    t.set_config(r#"{"Network":"10.246.0.0/16","Backend":{"Type":"vxlan"}}"#);
    let new_bip = wait_for("a lease in the new network", T, || {
        h.env_var("FLANNEL_SUBNET")
            .filter(|s| s.starts_with("10.246."))
    });
    wait_daemon_json(&json, &new_bip);
    wait_for("weftd to say Docker must be restarted", T, || {
        h.log()
            .contains("this host's subnet changed: restart Docker")
            .then_some(())
    });
    assert!(h.log().contains(&format!("old={old}")), "{}", h.log());

    // Docker still runs with the old bip: status says so and fails.
    let st = status_in(&h.ns, &h.dir);
    assert!(!st.status.success(), "{}", text(&st));
    let old_addr = old_bip.split('/').next().expect("addr");
    let want =
        format!("Docker must be restarted to pick up bip {new_bip} (docker0 has {old_addr})");
    assert!(text(&st).contains(&want), "{}", text(&st));

    // Restarting Docker (weftd never does) makes everything agree.
    d.stop();
    d.start(&h.ns, &json, true, &[]);
    assert_eq!(docker0(&h.ns), Some(new_bip.clone()));
    let st = status_in(&h.ns, &h.dir);
    assert!(st.status.success(), "{}", text(&st));
    d.stop();
}

/// `weftctl status` with etcd and weftd (alloc backend, no Docker, no root).
#[test]
fn status_shows_the_lease_and_reports_what_disagrees() {
    let etcd = Etcd::start();
    etcd.put(
        "/st/config",
        r#"{"Network":"10.71.0.0/16","SubnetMin":"10.71.9.0","SubnetMax":"10.71.9.0","Backend":{"Type":"alloc"}}"#,
    );
    let dir = tempfile::tempdir().expect("tmp");
    let mut a = WeftdSpec::new(&etcd, "/st", Ipv4Addr::new(10, 99, 0, 7), dir.path()).start();
    a.wait_subnet(T);
    wait_daemon_json(&a.daemon_json_path(), "10.71.9.1/24");
    let env = a.subnet_env_path().display().to_string();
    let json = a.daemon_json_path().display().to_string();
    let status = || {
        weftctl(
            &etcd,
            "/st",
            &[
                "status",
                "-f",
                &env,
                "--docker-daemon-json",
                &json,
                "--bridge",
                "weftnobr0",
                // weftd's -public-ip is not an address of this host: status must be told.
                "--public-ip",
                "10.99.0.7",
            ],
            None,
        )
    };

    let ok = status();
    let out = text(&ok);
    assert!(ok.status.success(), "{out}");
    for want in [
        "subnet:",
        "10.71.9.1/24",
        "lease:",
        "10.71.9.0/24 public-ip 10.99.0.7 backend alloc, expires in 23h59m",
        "bip 10.71.9.1/24",
        "weftnobr0:",
        "absent",
        "status: consistent",
    ] {
        assert!(out.contains(want), "{want:?} missing from:\n{out}");
    }

    // An operator's hand edit after weftd wrote the file.
    let edited = std::fs::read_to_string(&json)
        .expect("read")
        .replace("10.71.9.1/24", "172.17.0.1/16");
    std::fs::write(&json, edited).expect("write");
    let bad = status();
    assert_eq!(bad.status.code(), Some(1), "{}", text(&bad));
    assert!(
        text(&bad).contains("has bip 172.17.0.1/16 but the lease needs 10.71.9.1/24"),
        "{}",
        text(&bad)
    );

    // weftd gone and its lease deleted.
    a.terminate();
    etcd.del("/st/subnets/10.71.9.0-24");
    let gone = status();
    assert_eq!(gone.status.code(), Some(1));
    assert!(
        text(&gone).contains("etcd has no lease for 10.71.9.0/24"),
        "{}",
        text(&gone)
    );
}

/// The examples in config/ are what they say: valid network configs, and daemon.json.after is
/// weftd's merge of daemon.json.before.
#[test]
fn config_examples_are_valid_and_daemon_json_after_is_the_merge() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    for backend in ["vxlan", "host-gw", "udp", "alloc"] {
        let path = root.join(format!("network/{backend}.json"));
        let text = std::fs::read_to_string(&path).expect("example");
        let c = weft::config::NetworkConfig::parse(&text)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(c.backend.type_name(), backend);
    }
    let before = std::fs::read_to_string(root.join("docker/daemon.json.before")).expect("before");
    let after = std::fs::read_to_string(root.join("docker/daemon.json.after")).expect("after");
    let (merged, replaced) = weft::daemon_json::merge(&before, "172.20.59.1/24", 1472)
        .expect("merge")
        .expect("a change");
    assert!(replaced.is_empty());
    assert_eq!(merged, after);
}
