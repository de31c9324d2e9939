//! Lease acquisition, renewal, expiry, reservations and exhaustion against a real etcd.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::time::Duration;

use crate::harness::{wait_for, Etcd, Weftd, WeftdSpec};

const T: Duration = Duration::from_secs(30);

fn ip(n: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 99, 0, 0)) + n)
}

fn setup(config: &str) -> (Etcd, tempfile::TempDir) {
    let etcd = Etcd::start();
    etcd.put("/weft/config", config);
    (etcd, tempfile::tempdir().expect("tmp"))
}

fn agent(etcd: &Etcd, dir: &tempfile::TempDir, n: u32) -> WeftdSpec {
    WeftdSpec::new(etcd, "/weft", ip(n), &dir.path().join(format!("host{n}")))
}

#[test]
fn fifty_agents_at_once_get_distinct_subnets_inside_min_max() {
    // 60 subnets for 50 hosts: random picks collide often, so lost races must be retried.
    let (etcd, dir) = setup(
        r#"{"Network":"10.50.0.0/16","SubnetLen":24,"SubnetMin":"10.50.100.0","SubnetMax":"10.50.159.0","Backend":{"Type":"alloc"}}"#,
    );
    let agents: Vec<Weftd> = (1..=50).map(|n| agent(&etcd, &dir, n).start()).collect();
    let subnets: Vec<String> = agents
        .iter()
        .map(|a| a.wait_subnet(Duration::from_secs(90)))
        .collect();
    let distinct: HashSet<&String> = subnets.iter().collect();
    assert_eq!(distinct.len(), 50, "duplicate subnets: {subnets:?}");
    for s in &subnets {
        let third: u32 = s
            .split('.')
            .nth(2)
            .and_then(|x| x.parse().ok())
            .expect("octet");
        assert!(
            (100..=159).contains(&third),
            "{s} is outside SubnetMin..SubnetMax"
        );
        assert!(s.ends_with(".0/24"), "{s}");
    }
    let keys = etcd.list("/weft/subnets/");
    assert_eq!(keys.len(), 50);
    for a in &agents {
        a.assert_running();
    }
}

#[test]
fn a_restarted_agent_keeps_its_subnet_even_without_subnet_env() {
    let (etcd, dir) = setup(r#"{"Network":"10.51.0.0/16","Backend":{"Type":"alloc"}}"#);
    let mut a = agent(&etcd, &dir, 1).start();
    let first = a.wait_subnet(T);
    assert!(a.terminate().success(), "SIGTERM must exit 0");
    // The lease stays in etcd after a clean exit.
    let key = format!("/weft/subnets/{}", first.replace('/', "-"));
    assert!(etcd.get(&key).is_some(), "lease kept after SIGTERM");
    std::fs::remove_file(a.subnet_env_path()).expect("remove subnet.env");

    let b = agent(&etcd, &dir, 1).start();
    assert_eq!(b.wait_subnet(T), first, "same PublicIP, same subnet");
    assert_eq!(etcd.list("/weft/subnets/").len(), 1, "no second lease");
}

#[test]
fn the_previous_subnet_env_is_reused_when_free() {
    let (etcd, dir) = setup(r#"{"Network":"10.52.0.0/16","Backend":{"Type":"alloc"}}"#);
    let spec = agent(&etcd, &dir, 1);
    std::fs::create_dir_all(&spec.dir).expect("dir");
    std::fs::write(
        spec.dir.join("subnet.env"),
        "FLANNEL_NETWORK=10.52.0.0/16\nFLANNEL_SUBNET=10.52.77.1/24\nFLANNEL_MTU=1500\nFLANNEL_IPMASQ=false\n",
    )
    .expect("write");
    let a = spec.start();
    a.wait_log("acquired lease", T);
    assert_eq!(a.wait_subnet(T), "10.52.77.0/24");
}

#[test]
fn an_expired_lease_frees_its_subnet_and_a_full_network_waits_for_it() {
    // Exactly one subnet: the second host must wait for the first one's lease to expire.
    let (etcd, dir) = setup(
        r#"{"Network":"10.53.0.0/16","SubnetMin":"10.53.9.0","SubnetMax":"10.53.9.0","Backend":{"Type":"alloc"}}"#,
    );
    let mut a = agent(&etcd, &dir, 1).arg("--subnet-lease-ttl=3s").start();
    assert_eq!(a.wait_subnet(T), "10.53.9.0/24");
    a.kill(); // no renewal from now on

    let b = agent(&etcd, &dir, 2).arg("--subnet-lease-ttl=3s").start();
    b.wait_log("no free subnet in 10.53.0.0/16: 1 of 1 leased", T);
    assert!(
        b.subnet_env().is_none(),
        "no subnet.env while the network is full"
    );
    assert_eq!(b.wait_subnet(T), "10.53.9.0/24", "taken over after expiry");
    let leases = etcd.list("/weft/subnets/");
    assert_eq!(leases.len(), 1);
    assert!(leases[0].1.contains(&ip(2).to_string()));
}

#[test]
fn exhaustion_is_reported_clearly_and_ends_when_a_lease_expires() {
    let (etcd, dir) = setup(r#"{"Network":"10.10.0.0/22","Backend":{"Type":"alloc"}}"#);
    // Three hosts fill 10.10.1-3.0/24 (10.10.0.0/24 is never handed out).
    for n in 1..=3 {
        let key = format!("/weft/subnets/10.10.{n}.0-24");
        etcd.put_leased(
            &key,
            &format!(r#"{{"PublicIP":"{}","PublicIPv6":null}}"#, ip(10 + n)),
            4,
        );
    }
    let d = agent(&etcd, &dir, 4).start();
    d.wait_log("no free subnet in 10.10.0.0/22: 3 of 3 leased", T);
    d.assert_running();
    let got = d.wait_subnet(T);
    assert!(
        ["10.10.1.0/24", "10.10.2.0/24", "10.10.3.0/24"].contains(&got.as_str()),
        "{got}"
    );
}

#[test]
fn a_lease_is_renewed_before_it_expires() {
    let (etcd, dir) = setup(r#"{"Network":"10.54.0.0/16","Backend":{"Type":"alloc"}}"#);
    let a = agent(&etcd, &dir, 1).arg("--subnet-lease-ttl=2s").start();
    let s = a.wait_subnet(T);
    std::thread::sleep(Duration::from_secs(7));
    let key = format!("/weft/subnets/{}", s.replace('/', "-"));
    assert!(etcd.get(&key).is_some(), "lease outlived three TTLs");
    a.assert_running();
}

#[test]
fn a_reservation_is_used_and_never_given_an_expiry() {
    let (etcd, dir) = setup(r#"{"Network":"10.55.0.0/16","Backend":{"Type":"alloc"}}"#);
    etcd.put(
        "/weft/subnets/10.55.200.0-24",
        &format!(r#"{{"PublicIP":"{}","PublicIPv6":null}}"#, ip(1)),
    );
    let a = agent(&etcd, &dir, 1).arg("--subnet-lease-ttl=2s").start();
    assert_eq!(a.wait_subnet(T), "10.55.200.0/24");
    a.wait_log("acquired reservation", T);
    std::thread::sleep(Duration::from_secs(4));
    let all = etcd.list("/weft/subnets/");
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].2, 0, "a reservation stays without an etcd lease");
    assert!(
        all[0].1.contains(r#""BackendType":"alloc""#),
        "{}",
        all[0].1
    );
}

#[test]
fn a_deleted_lease_is_acquired_again_without_exiting() {
    let (etcd, dir) = setup(r#"{"Network":"10.56.0.0/16","Backend":{"Type":"alloc"}}"#);
    let a = agent(&etcd, &dir, 1).start();
    let s = a.wait_subnet(T);
    let key = format!("/weft/subnets/{}", s.replace('/', "-"));
    etcd.del(&key);
    wait_for("the lease to come back", T, || etcd.get(&key));
    a.assert_running();
    a.wait_log("leasing again", T);
    assert_eq!(a.wait_subnet(T), s, "same subnet when free");
}

#[test]
fn lease_value_is_flannels_json() {
    let (etcd, dir) = setup(r#"{"Network":"10.57.0.0/16","Backend":{"Type":"alloc"}}"#);
    let a = agent(&etcd, &dir, 7).start();
    let s = a.wait_subnet(T);
    let v = etcd
        .get(&format!("/weft/subnets/{}", s.replace('/', "-")))
        .expect("lease");
    assert_eq!(
        v,
        r#"{"PublicIP":"10.99.0.7","PublicIPv6":null,"BackendType":"alloc"}"#
    );
}

#[test]
fn an_etcd_outage_longer_than_the_ttl_ends_with_the_same_subnet_leased_again() {
    let (etcd, dir) = setup(r#"{"Network":"10.58.0.0/16","Backend":{"Type":"alloc"}}"#);
    let proxy = crate::harness::Proxy::start(etcd.port);
    let mut spec = agent(&etcd, &dir, 1).arg("--subnet-lease-ttl=2s");
    spec.endpoint = proxy.endpoint();
    let a = spec.start();
    let s = a.wait_subnet(T);
    let key = format!("/weft/subnets/{}", s.replace('/', "-"));

    proxy.cut();
    wait_for("the lease to expire during the outage", T, || {
        etcd.get(&key).is_none().then_some(())
    });
    std::thread::sleep(Duration::from_secs(1));
    a.assert_running();
    proxy.restore();

    wait_for("the lease to be taken again", T, || etcd.get(&key));
    a.wait_log("leasing again", T);
    assert_eq!(a.wait_subnet(T), s, "same subnet after the outage");
    a.assert_running();
}
