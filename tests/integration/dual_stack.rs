//! Dual-stack leases against a real etcd: flannel's keys (`10.60.5.0-24&fd00:60:0:5::-64`), lease
//! JSON (`PublicIPv6`) and subnet.env lines, distinct subnets of both families, and a host's IPv4
//! subnet kept when IPv6 is turned on or off. The alloc backend: no data plane, no privileges.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::time::Duration;

use crate::harness::{Etcd, Weftd, WeftdSpec};

const T: Duration = Duration::from_secs(30);

const DUAL: &str = r#"{"Network":"10.60.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:60::/48","Backend":{"Type":"alloc"}}"#;
const V4: &str = r#"{"Network":"10.60.0.0/16","Backend":{"Type":"alloc"}}"#;

fn setup(config: &str) -> (Etcd, tempfile::TempDir) {
    let etcd = Etcd::start();
    etcd.put("/weft/config", config);
    (etcd, tempfile::tempdir().expect("tmp"))
}

fn agent(etcd: &Etcd, dir: &tempfile::TempDir, n: u32) -> WeftdSpec {
    let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 99, 0, 0)) + n);
    WeftdSpec::new(etcd, "/weft", ip, &dir.path().join(format!("host{n}")))
        .arg(format!("--public-ipv6=fd00:99::{n}"))
}

/// subnet.env's value of `var`, once the file has it.
fn env_var(a: &Weftd, var: &str) -> String {
    crate::harness::wait_for(var, T, || {
        a.assert_running();
        let env = a.subnet_env()?;
        let line = env.lines().find(|l| l.starts_with(&format!("{var}=")))?;
        Some(line[var.len() + 1..].to_string())
    })
}

/// The lease keys under the prefix, names only.
fn keys(etcd: &Etcd) -> Vec<String> {
    let mut k: Vec<String> = (etcd.list("/weft/subnets/").into_iter())
        .map(|(k, _, _)| k.trim_start_matches("/weft/subnets/").to_string())
        .collect();
    k.sort();
    k
}

#[test]
fn a_dual_stack_lease_is_flannels_key_json_and_subnet_env() {
    let (etcd, dir) = setup(DUAL);
    let a = agent(&etcd, &dir, 7).start();
    let v4 = a.wait_subnet(T);
    let v6 = env_var(&a, "FLANNEL_IPV6_SUBNET");
    // The IPv6 subnet at the IPv4 one's place in its range: 10.60.N.0/24 with fd00:60:0:N::/64.
    let n: u8 = v4
        .split('.')
        .nth(2)
        .and_then(|x| x.parse().ok())
        .expect("octet");
    assert_eq!(v6, format!("fd00:60:0:{n:x}::1/64"));
    assert_eq!(
        keys(&etcd),
        [format!("10.60.{n}.0-24&fd00:60:0:{n:x}::-64")]
    );
    let value = etcd
        .get(&format!("/weft/subnets/{}", keys(&etcd)[0]))
        .expect("lease");
    assert_eq!(
        value,
        r#"{"PublicIP":"10.99.0.7","PublicIPv6":"fd00:99::7","BackendType":"alloc"}"#
    );
    let env = a.subnet_env().expect("subnet.env");
    let names: Vec<&str> = env.lines().filter_map(|l| l.split('=').next()).collect();
    assert_eq!(
        names,
        [
            "FLANNEL_NETWORK",
            "FLANNEL_SUBNET",
            "FLANNEL_IPV6_NETWORK",
            "FLANNEL_IPV6_SUBNET",
            "FLANNEL_MTU",
            "FLANNEL_IPMASQ"
        ],
        "flannel's order:\n{env}"
    );
    assert!(env.contains("FLANNEL_IPV6_NETWORK=fd00:60::/48\n"), "{env}");
    // weftctl lists both subnets and both addresses, as Kubernetes writes podCIDRs.
    let out = crate::harness::weftctl(&etcd, "/weft", &["leases"], None);
    let text = String::from_utf8_lossy(&out.stdout);
    let row = format!("10.60.{n}.0/24,fd00:60:0:{n:x}::/64  10.99.0.7,fd00:99::7  alloc");
    assert!(text.contains(&row), "{row} in\n{text}");
}

#[test]
fn dual_stack_hosts_starting_at_once_get_distinct_subnets_of_both_families() {
    // 12 IPv4 subnets, 12 IPv6 ones for 10 hosts: races are lost and retried on both sides.
    let (etcd, dir) = setup(
        r#"{"Network":"10.61.0.0/16","SubnetMin":"10.61.10.0","SubnetMax":"10.61.21.0","EnableIPv6":true,"IPv6Network":"fd00:61::/48","IPv6SubnetMin":"fd00:61:0:100::","IPv6SubnetMax":"fd00:61:0:10b::","Backend":{"Type":"alloc"}}"#,
    );
    let agents: Vec<Weftd> = (1..=10).map(|n| agent(&etcd, &dir, n).start()).collect();
    let mut v4 = HashSet::new();
    let mut v6 = HashSet::new();
    for a in &agents {
        v4.insert(a.wait_subnet(Duration::from_secs(90)));
        let s = env_var(a, "FLANNEL_IPV6_SUBNET");
        let net: ipnet::Ipv6Net = s.parse().expect("IPv6 subnet");
        let first = u128::from(net.network());
        let (min, max) = (
            0xfd00_0061_0000_0100u128 << 64,
            0xfd00_0061_0000_010bu128 << 64,
        );
        assert!(
            (min..=max).contains(&first),
            "{s} outside IPv6SubnetMin..Max"
        );
        v6.insert(s);
    }
    assert_eq!((v4.len(), v6.len()), (10, 10), "{v4:?} {v6:?}");
    assert_eq!(keys(&etcd).len(), 10, "one key each: {:?}", keys(&etcd));
}

#[test]
fn turning_ipv6_on_and_off_keeps_a_hosts_ipv4_subnet_under_a_new_key() {
    let (etcd, dir) = setup(V4);
    let mut a = agent(&etcd, &dir, 3).start();
    let first = a.wait_subnet(T);
    let n: u8 = first
        .split('.')
        .nth(2)
        .and_then(|x| x.parse().ok())
        .expect("octet");
    assert!(a.terminate().success());
    std::fs::remove_file(a.subnet_env_path()).expect("no hint: the lease alone decides");

    // Restarted under a dual-stack config while its IPv4-only lease is still there.
    etcd.put("/weft/config", DUAL);
    let mut b = agent(&etcd, &dir, 3).start();
    assert_eq!(b.wait_subnet(T), first, "the same IPv4 subnet");
    b.wait_log("under a new key", T);
    assert_eq!(
        keys(&etcd),
        [format!("10.60.{n}.0-24&fd00:60:0:{n:x}::-64")]
    );
    assert!(b.terminate().success());
    std::fs::remove_file(b.subnet_env_path()).expect("remove");

    // And back.
    etcd.put("/weft/config", V4);
    let c = agent(&etcd, &dir, 3).start();
    assert_eq!(c.wait_subnet(T), first);
    c.wait_log("under a new key", T);
    assert_eq!(keys(&etcd), [format!("10.60.{n}.0-24")]);
    let env = c.subnet_env().expect("subnet.env");
    assert!(
        !env.contains("IPV6"),
        "an IPv4 network writes no IPv6 lines:\n{env}"
    );
}

#[test]
fn a_running_host_takes_an_ipv6_subnet_when_the_config_turns_it_on() {
    let (etcd, dir) = setup(V4);
    let a = agent(&etcd, &dir, 4).start();
    let first = a.wait_subnet(T);
    etcd.put("/weft/config", DUAL);
    let v6 = env_var(&a, "FLANNEL_IPV6_SUBNET");
    assert!(v6.starts_with("fd00:60:"), "{v6}");
    assert_eq!(
        a.wait_subnet(T),
        first,
        "its IPv4 subnet is kept (the previous one is free)"
    );
    let k = keys(&etcd);
    assert_eq!(k.len(), 1, "the old lease is given back: {k:?}");
    assert!(k[0].contains('&'), "{k:?}");
}

#[test]
fn a_dual_stack_config_with_a_backend_that_carries_only_ipv4_is_refused_clearly() {
    let (etcd, dir) = setup(
        r#"{"Network":"10.62.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:62::/48","Backend":{"Type":"udp"}}"#,
    );
    let a = agent(&etcd, &dir, 5).start();
    a.wait_log("EnableIPv6: the udp backend carries IPv4 only", T);
    a.assert_running();
    assert!(
        keys(&etcd).is_empty(),
        "no lease under a config it cannot run"
    );
}

// ---- dual-stack data planes: simulated hosts, real kernels (root) ----

mod datapath {
    use std::time::Duration;

    use crate::harness::wait_for;
    use crate::netns::{Topology, PREFIX};

    const HOST_GW: &str = r#"{"Network":"10.247.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:247::/48","Backend":{"Type":"host-gw"}}"#;
    const T: Duration = Duration::from_secs(30);

    #[test]
    fn host_gw_dual_stack_containers_reach_each_other_over_both_families() {
        let Some(t) = Topology::dual_stack(3, HOST_GW, &[0, 1, 2], &["--ip-masq"]) else {
            return;
        };
        t.assert_full_mesh(&[0, 1, 2]);
        t.assert_full_mesh6(&[0, 1, 2]);
        for i in 0..3 {
            // flannel's masquerade rules for the IPv6 network, beside the IPv4 ones.
            let masq = "-A FLANNEL-POSTRTG -s fd00:247::/48 ! -d ff00::/8";
            wait_for("ip6tables rules", T, || {
                let (_, saved, _) = t.hosts[i].ns.exec(&["ip6tables-save", "-t", "nat"]);
                saved.contains(masq).then_some(())
            });
            let routes = t.routes6(i);
            assert_eq!(routes.len(), 2, "{routes:?}");
            for j in (0..3).filter(|j| *j != i) {
                let want = format!("{} {} eth0", t.hosts[j].wait_subnet6(), t.hosts[j].addr6());
                assert!(routes.contains(&want), "{want} missing from {routes:?}");
            }
            // The lease publishes the interface's IPv6 address, found without a flag.
            let key = format!(
                "{PREFIX}/subnets/{}&{}",
                t.hosts[i].wait_subnet().to_string().replace('/', "-"),
                t.hosts[i].wait_subnet6().to_string().replace('/', "-")
            );
            let value = t.etcdctl(&["get", "--print-value-only", &key]);
            let lease: serde_json::Value = serde_json::from_str(value.trim()).expect("lease");
            assert_eq!(lease["PublicIPv6"], t.hosts[i].addr6().to_string(), "{key}");
        }
    }

    #[test]
    fn a_dual_stack_peer_that_leaves_takes_both_its_routes_with_it() {
        let Some(mut t) = Topology::dual_stack(3, HOST_GW, &[0, 1, 2], &["--subnet-lease-ttl=4s"])
        else {
            return;
        };
        t.assert_full_mesh6(&[0, 1, 2]);
        let (gone4, gone6) = (t.hosts[2].wait_subnet(), t.hosts[2].wait_subnet6());
        t.hosts[2].kill();
        for i in 0..2 {
            wait_for("the expired peer's IPv6 route to go", T, || {
                (t.routes6(i).len() == 1).then_some(())
            });
            assert!(t.hosts[i].ns.route(&gone4.to_string()).is_none());
            assert!(!t
                .routes6(i)
                .iter()
                .any(|r| r.starts_with(&gone6.to_string())));
        }
        t.assert_full_mesh6(&[0, 1]);
    }

    #[test]
    fn an_ipv6_route_deleted_behind_wefts_back_is_put_back_at_once() {
        let Some(t) = Topology::dual_stack(2, HOST_GW, &[0, 1], &[]) else {
            return;
        };
        t.assert_full_mesh6(&[0, 1]);
        let peer6 = t.hosts[1].wait_subnet6().to_string();
        t.hosts[0].ns.ip(&format!("-6 route del {peer6}"));
        // Seen as drift by the watch, not left to the next full pass (10 minutes).
        wait_for("the IPv6 route back", Duration::from_secs(5), || {
            t.routes6(0)
                .iter()
                .any(|r| r.starts_with(&peer6))
                .then_some(())
        });
        t.assert_full_mesh6(&[0, 1]);
    }

    /// [`HOST_GW`] without its IPv6 side.
    fn host_gw_v4() -> String {
        HOST_GW.replace(r#""EnableIPv6":true,"IPv6Network":"fd00:247::/48","#, "")
    }

    #[test]
    fn ipv6_turned_on_and_off_under_running_hosts_keeps_ipv4_flowing() {
        let name = "ipv6_turned_on_and_off_under_running_hosts_keeps_ipv4_flowing";
        if !crate::netns::require_root(name) || !weft_lab::require_ipv6(name) {
            return;
        }
        let mut t = Topology::new(2, 1500);
        t.set_config(&host_gw_v4());
        for i in 0..2 {
            t.start(i, &["--ip-masq"]);
            t.wire_container(i);
        }
        t.assert_full_mesh(&[0, 1]);
        let subnets: Vec<_> = (0..2).map(|i| t.hosts[i].wait_subnet()).collect();
        // 30 s of pings 20 ms apart, IPv4, from host 0's container to host 1's.
        let series =
            crate::wireguard::ping_series(&t.hosts[0], t.hosts[1].container_ip().into(), 1500);

        t.set_config(HOST_GW);
        for (i, h) in t.hosts.iter().enumerate() {
            h.wait_log("only the IPv6 side of the network changed", T);
            let subnet6 = h.wait_subnet6();
            assert_eq!(
                h.wait_subnet(),
                subnets[i],
                "host {i} keeps its IPv4 subnet"
            );
            // The containers get their IPv6 addresses beside the IPv4 ones, which keep pinging.
            let gw = weft_lab::topology::gateway6(subnet6);
            h.ns.ip(&format!("addr add {gw}/64 dev cni0 nodad"));
            let ip = weft_lab::topology::container_ip6(subnet6);
            h.container.ip(&format!("addr add {ip}/64 dev eth0 nodad"));
            h.container.ip(&format!("-6 route add default via {gw}"));
        }
        t.assert_full_mesh6(&[0, 1]);
        let masq6 = "-A FLANNEL-POSTRTG -s fd00:247::/48 ! -d ff00::/8";
        let ip6tables = |i: usize| t.hosts[i].ns.exec(&["ip6tables-save", "-t", "nat"]).1;
        wait_for("ip6tables' masquerading", T, || {
            ip6tables(0).contains(masq6).then_some(())
        });

        // And off again: the IPv6 routes and rules go, IPv4 stays.
        t.set_config(&host_gw_v4());
        for (i, subnet) in subnets.iter().enumerate() {
            wait_for("the IPv6 routes and rules to go", T, || {
                let clean = t.routes6(i).is_empty() && !ip6tables(i).contains("fd00:247::/48");
                clean.then_some(())
            });
            wait_for("subnet.env without IPv6", T, || {
                let env = t.hosts[i].env_var("FLANNEL_IPV6_SUBNET");
                env.is_none().then_some(())
            });
            assert_eq!(t.hosts[i].wait_subnet(), *subnet);
        }
        let (text, replies) = series.replies();
        assert!(
            replies.len() >= 1495,
            "IPv4 pings lost while IPv6 came and went: {} of 1500 answered\n{text}",
            replies.len()
        );
        t.assert_full_mesh(&[0, 1]);
    }

    #[test]
    fn a_peer_whose_lease_moves_to_a_dual_stack_key_keeps_its_route() {
        // Host 1, restarted under the dual-stack config, moves its IPv4-only lease to a
        // dual-stack key in one transaction: host 0 sees the old key go and the new one come in
        // one batch, and must keep (not drop) host 1's route while gaining its IPv6 one.
        let name = "a_peer_whose_lease_moves_to_a_dual_stack_key_keeps_its_route";
        if !crate::netns::require_root(name) || !weft_lab::require_ipv6(name) {
            return;
        }
        let mut t = Topology::new(2, 1500);
        t.set_config(&host_gw_v4());
        t.start(1, &[]);
        let subnet = t.hosts[1].wait_subnet();
        t.hosts[1].stop();
        t.set_config(HOST_GW);
        t.start(0, &[]);
        t.hosts[0].wait_subnet6();
        wait_for("host 0's route to host 1's IPv4-only lease", T, || {
            t.hosts[0].ns.route(&subnet.to_string()).map(drop)
        });
        t.start(1, &[]);
        t.hosts[1].wait_log("under a new key", T);
        assert_eq!(t.hosts[1].wait_subnet(), subnet, "the same IPv4 subnet");
        let subnet6 = t.hosts[1].wait_subnet6().to_string();
        wait_for("host 0's IPv6 route to host 1", T, || {
            t.routes6(0)
                .iter()
                .any(|r| r.starts_with(&subnet6))
                .then_some(())
        });
        assert!(
            t.hosts[0].ns.route(&subnet.to_string()).is_some(),
            "host 1's IPv4 route kept"
        );
        for i in 0..2 {
            t.wire_container_dual(i);
        }
        t.assert_full_mesh(&[0, 1]);
        t.assert_full_mesh6(&[0, 1]);
    }

    #[test]
    fn a_dual_stack_restart_keeps_both_subnets_and_the_ipv6_routes_in_place() {
        let Some(mut t) = Topology::dual_stack(2, HOST_GW, &[0, 1], &[]) else {
            return;
        };
        t.assert_full_mesh6(&[0, 1]);
        let before = (
            t.hosts[0].wait_subnet(),
            t.hosts[0].wait_subnet6(),
            t.routes6(1),
        );
        t.hosts[0].stop();
        // Stopped: the kernel keeps forwarding (host-gw's routes stay).
        assert_eq!(t.routes6(0).len(), 1, "routes kept across the stop");
        assert!(t.hosts[1].ping6(t.hosts[0].container_ip6()));
        t.start(0, &[]);
        t.hosts[0].wait_log("acquired lease", T);
        assert_eq!(
            (
                t.hosts[0].wait_subnet(),
                t.hosts[0].wait_subnet6(),
                t.routes6(1)
            ),
            before,
            "the same subnets, and nothing for the peer to change"
        );
        t.assert_full_mesh6(&[0, 1]);
    }

    #[test]
    fn a_hand_made_flannel_dual_stack_host_gw_node_and_weft_nodes_reach_each_other() {
        // Host 2 is flanneld's, built by hand exactly as flanneld leaves it: its lease in etcd
        // under flannel's dual-stack key and JSON, and a route per peer subnet and family.
        let Some(t) = Topology::dual_stack(3, HOST_GW, &[0, 1], &[]) else {
            return;
        };
        let f = &t.hosts[2];
        let (s4, s6): (ipnet::Ipv4Net, ipnet::Ipv6Net) = (
            "10.247.200.0/24".parse().expect("net"),
            "fd00:247:0:c8::/64".parse().expect("net"),
        );
        t.etcd().put_leased(
            &format!("{PREFIX}/subnets/10.247.200.0-24&fd00:247:0:c8::-64"),
            &format!(
                r#"{{"PublicIP":"{}","PublicIPv6":"{}","BackendType":"host-gw"}}"#,
                f.addr(),
                f.addr6()
            ),
            600,
        );
        f.wire_container_dual(s4, s6, Some(1500));
        for i in 0..2 {
            let h = &t.hosts[i];
            f.ns.ip(&format!(
                "route add {} via {} dev eth0",
                h.wait_subnet(),
                h.addr()
            ));
            f.ns.ip(&format!(
                "-6 route add {} via {} dev eth0",
                h.wait_subnet6(),
                h.addr6()
            ));
        }
        for i in 0..2 {
            let h = &t.hosts[i];
            let (to4, to6) = (
                weft_lab::topology::container_ip(s4),
                weft_lab::topology::container_ip6(s6),
            );
            wait_for("weft's container to reach flannel's over IPv4", T, || {
                h.ping(to4).then_some(())
            });
            wait_for("weft's container to reach flannel's over IPv6", T, || {
                h.ping6(to6).then_some(())
            });
            assert!(
                f.ping(h.container_ip()),
                "flannel's container to weft's over IPv4"
            );
            assert!(
                f.ping6(h.container_ip6()),
                "flannel's container to weft's over IPv6"
            );
        }
    }
}
