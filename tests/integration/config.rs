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
fn net_config_path_reads_the_config_from_a_file_and_ignores_etcds() {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("net-conf.json");
    // etcd's key says otherwise: the file wins, and a change of the key is not followed.
    etcd.put(
        "/weft/config",
        r#"{"Network":"10.61.0.0/16","Backend":{"Type":"alloc"}}"#,
    );
    let a = WeftdSpec::new(&etcd, "/weft", Ipv4Addr::new(10, 99, 0, 1), dir.path())
        .arg(format!("-net-config-path={}", file.display()))
        .start();
    a.wait_log(&format!("no network config file {}", file.display()), T);
    std::fs::write(&file, r#"{"Network":"10.62.0.0/16","SubnetLen":40}"#).expect("write");
    a.wait_log(
        &format!("invalid network config at {}: SubnetLen", file.display()),
        T,
    );
    std::fs::write(
        &file,
        r#"{"Network":"10.62.0.0/16","Backend":{"Type":"alloc"}}"#,
    )
    .expect("write");
    assert!(a.wait_subnet(T).starts_with("10.62."));
    etcd.put(
        "/weft/config",
        r#"{"Network":"10.63.0.0/16","Backend":{"Type":"alloc"}}"#,
    );
    std::thread::sleep(Duration::from_secs(2));
    a.assert_running();
    assert!(a
        .subnet_env()
        .expect("subnet.env")
        .contains("FLANNEL_NETWORK=10.62.0.0/16"));
    assert!(!a.log().contains("network config changed"), "{}", a.log());
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

    // A dual-stack config is said to be one.
    let dual = r#"{"Network":"10.62.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:62::/56","Backend":{"Type":"vxlan"}}"#;
    let out = weftctl(&etcd, "/c", &["config", "set", "-"], Some(dual));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("network 10.62.0.0/16 (/24 subnets 10.62.1.0..10.62.255.0) and IPv6 network fd00:62::/56 (/64 subnets fd00:62:0:1::..fd00:62:0:ff::), backend vxlan, stored at /c/config"),
        "{said}"
    );
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

#[test]
fn config_set_if_absent_stores_exactly_one_of_twenty_racing_writers() {
    let etcd = Etcd::start();
    // Every node's init step at once, each with its own config (as if the ConfigMap changed
    // mid-rollout): one transaction wins, the others keep it, and nobody fails.
    let configs: Vec<String> = (0..20)
        .map(|i| {
            format!(
                r#"{{"Network":"10.{}.0.0/16","Backend":{{"Type":"vxlan"}}}}"#,
                100 + i
            )
        })
        .collect();
    let outs: Vec<std::process::Output> = std::thread::scope(|s| {
        let runs: Vec<_> = configs
            .iter()
            .map(|c| {
                s.spawn(|| {
                    weftctl(
                        &etcd,
                        "/race",
                        &["config", "set", "--if-absent", "-"],
                        Some(c),
                    )
                })
            })
            .collect();
        runs.into_iter()
            .map(|r| r.join().expect("weftctl thread"))
            .collect()
    });
    let stored = etcd.get("/race/config").expect("a config was stored");
    assert!(
        configs.contains(&stored),
        "stored one of the given: {stored}"
    );
    let mut stored_by = 0;
    for (c, o) in configs.iter().zip(&outs) {
        let stdout = String::from_utf8_lossy(&o.stdout);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(
            o.status.success(),
            "exit 0 for every writer: {stdout}{stderr}"
        );
        if *c == stored {
            assert!(stdout.contains("stored at /race/config"), "{stdout}");
            stored_by += 1;
        } else {
            assert!(
                stdout.contains("network config at /race/config exists: kept it"),
                "{stdout}"
            );
            assert!(
                stderr.contains("differs from the one given"),
                "a loser with another config is told: {stderr}"
            );
        }
    }
    assert_eq!(stored_by, 1, "exactly one writer stored its config");
}

#[test]
fn config_set_if_absent_never_overwrites_and_still_validates() {
    let etcd = Etcd::start();
    let existing = r#"{"Network":"10.64.0.0/16","Backend":{"Type":"host-gw"}}"#;
    etcd.put("/keep/config", existing);

    // Invalid input is refused before etcd is asked, as without --if-absent.
    let bad = weftctl(
        &etcd,
        "/keep",
        &["config", "set", "--if-absent", "-"],
        Some(r#"{"Network":"10.65.0.0/16","SubnetLen":31}"#),
    );
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("SubnetLen: 31 is more than 30"));

    // The same config, laid out differently (and the flag in Go's one-dash form): kept, and no
    // warning.
    let same = weftctl(
        &etcd,
        "/keep",
        &["config", "set", "-if-absent", "-"],
        Some("{ \"Network\": \"10.64.0.0/16\", \"Backend\": { \"Type\": \"host-gw\" } }\n"),
    );
    assert!(
        same.status.success(),
        "{}",
        String::from_utf8_lossy(&same.stderr)
    );
    assert!(String::from_utf8_lossy(&same.stdout).contains("exists: kept it"));
    assert_eq!(String::from_utf8_lossy(&same.stderr), "");

    // A different one: kept the existing, exit 0, and says they differ.
    let other = weftctl(
        &etcd,
        "/keep",
        &["config", "set", "--if-absent", "-"],
        Some(r#"{"Network":"10.66.0.0/16"}"#),
    );
    assert!(other.status.success());
    let err = String::from_utf8_lossy(&other.stderr);
    assert!(
        err.contains("existing config differs from the one given; kept: ")
            && err.contains(existing),
        "{err}"
    );
    assert_eq!(etcd.get("/keep/config").as_deref(), Some(existing));

    // Plain `config set` still replaces.
    let replace = weftctl(
        &etcd,
        "/keep",
        &["config", "set", "-"],
        Some(r#"{"Network":"10.66.0.0/16"}"#),
    );
    assert!(replace.status.success());
    assert_eq!(
        etcd.get("/keep/config").as_deref(),
        Some(r#"{"Network":"10.66.0.0/16"}"#)
    );
}
