//! The network config in etcd: waiting for a valid one, weftctl config set/get, flags from env.

use std::net::Ipv4Addr;
use std::time::Duration;

use crate::harness::{weftctl, Etcd, WeftdSpec};

/// A short-lived command under the lab's time limit.
fn run(cmd: &mut std::process::Command) -> std::process::Output {
    weft_lab::cmd::output(cmd, Duration::from_secs(30))
}

const T: Duration = Duration::from_secs(30);

#[test]
fn weftd_waits_for_a_valid_config_naming_the_problem() {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().expect("tmp");
    let a = WeftdSpec::new(&etcd, "/weft", Ipv4Addr::new(10, 99, 0, 1), dir.path()).start();
    a.wait_log("no network config at /weft/config", T);

    etcd.put(
        "/weft/config",
        r#"{"Network":"10.60.0.0/16","SubnetLen":31}"#,
    );
    a.wait_log(
        "invalid network config at /weft/config: SubnetLen: 31 is more than 30",
        T,
    );
    etcd.put("/weft/config", "{not json");
    a.wait_log(
        "invalid network config at /weft/config: config: not valid JSON",
        T,
    );
    etcd.put(
        "/weft/config",
        r#"{"Network":"10.60.0.0/16","Backend":{"Type":"warp-drive"}}"#,
    );
    a.wait_log("unknown backend type \"warp-drive\"", T);
    a.assert_running();
    assert!(a.subnet_env().is_none());

    etcd.put(
        "/weft/config",
        r#"{"network":"10.60.0.0/16","backend":{"type":"alloc"}}"#,
    );
    assert!(a.wait_subnet(T).starts_with("10.60."));
}

#[test]
fn flags_come_from_flanneld_environment_variables() {
    let etcd = Etcd::start();
    etcd.put(
        "/env/config",
        r#"{"Network":"10.61.0.0/16","Backend":{"Type":"alloc"}}"#,
    );
    let dir = tempfile::tempdir().expect("tmp");
    let mut spec = WeftdSpec::new(&etcd, "/env", Ipv4Addr::new(10, 99, 0, 1), dir.path());
    spec.via_env = true;
    let a = spec
        .env("FLANNELD_SUBNET_LEASE_TTL", "1h")
        .env("FLANNELD_IP_MASQ", "true")
        .start();
    a.wait_subnet(T);
    assert!(a
        .subnet_env()
        .expect("env")
        .contains("FLANNEL_IPMASQ=true\n"));
}

#[test]
fn weftctl_config_set_validates_and_get_prints() {
    let etcd = Etcd::start();
    let bad = weftctl(
        &etcd,
        "/c",
        &["config", "set", "-"],
        Some(r#"{"Network":"10.0.0.0/16","SubnetMin":"10.1.0.0"}"#),
    );
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("SubnetMin: 10.1.0.0 is not inside Network 10.0.0.0/16"),
        "{err}"
    );
    assert_eq!(etcd.get("/c/config"), None, "nothing written");

    let good = r#"{"Network":"10.62.0.0/16","Backend":{"Type":"vxlan","VNI":1}}"#;
    let out = weftctl(&etcd, "/c", &["config", "set", "-"], Some(good));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = weftctl(&etcd, "/c", &["config", "get"], None);
    assert_eq!(String::from_utf8_lossy(&out.stdout), format!("{good}\n"));
}

#[test]
fn unknown_flags_are_rejected_with_their_name() {
    let out = run(std::process::Command::new(env!("CARGO_BIN_EXE_weftd"))
        .arg("-etcd-endpointz=http://127.0.0.1:1"));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--etcd-endpointz"));
    let out = run(std::process::Command::new(env!("CARGO_BIN_EXE_weftd")).arg("-version"));
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("weftd "));
}

#[test]
fn an_empty_flanneld_variable_counts_as_unset() {
    let etcd = Etcd::start();
    etcd.put(
        "/coreos.com/network/subnets/10.63.4.0-24",
        r#"{"PublicIP":"10.98.0.4","PublicIPv6":null}"#,
    );
    let out = run(std::process::Command::new(env!("CARGO_BIN_EXE_weftctl"))
        .arg("leases")
        .env("FLANNELD_ETCD_ENDPOINTS", &etcd.endpoint)
        .env("FLANNELD_ETCD_PREFIX", "")
        .env("FLANNELD_ETCD_USERNAME", ""));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("10.63.4.0/24"),
        "default prefix used"
    );
}
