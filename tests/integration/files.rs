//! What weftd writes for CNI and Docker: subnet.env, daemon.json, sd_notify, docker-opts.

use std::net::Ipv4Addr;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use crate::harness::{free_port, wait_for, weftctl, Etcd, WeftdSpec};

const T: Duration = Duration::from_secs(30);

fn setup() -> (Etcd, tempfile::TempDir) {
    let etcd = Etcd::start();
    // One possible subnet, so the expected bytes are known.
    etcd.put(
        "/f/config",
        r#"{"Network":"10.70.0.0/16","SubnetMin":"10.70.52.0","SubnetMax":"10.70.52.0","Backend":{"Type":"alloc"}}"#,
    );
    (etcd, tempfile::tempdir().expect("tmp"))
}

fn spec(etcd: &Etcd, dir: &tempfile::TempDir) -> WeftdSpec {
    WeftdSpec::new(etcd, "/f", Ipv4Addr::new(10, 99, 0, 1), dir.path())
}

/// The MTU of loopback, which the alloc backend passes through.
fn lo_mtu() -> u32 {
    std::fs::read_to_string("/sys/class/net/lo/mtu")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .expect("lo mtu")
}

#[test]
fn subnet_env_is_byte_for_byte_flannels_format_and_mode_0644() {
    let (etcd, dir) = setup();
    let a = spec(&etcd, &dir).arg("-ip-masq").start();
    a.wait_subnet(T);
    let expected = format!(
        "FLANNEL_NETWORK=10.70.0.0/16\nFLANNEL_SUBNET=10.70.52.1/24\nFLANNEL_MTU={}\nFLANNEL_IPMASQ=true\n",
        lo_mtu()
    );
    assert_eq!(a.subnet_env().expect("subnet.env"), expected);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(a.subnet_env_path())
        .expect("stat")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o644);
}

#[test]
fn daemon_json_gets_bip_and_mtu_and_keeps_the_operators_keys() {
    let (etcd, dir) = setup();
    let operator = r#"{
  "registry-mirrors": ["https://mirror.gcr.io"],
  "hosts": ["unix:///var/run/docker.sock", "tcp://0.0.0.0:2375"],
  "insecure-registries": ["registry.local:5000"]
}
"#;
    std::fs::write(dir.path().join("daemon.json"), operator).expect("write");
    let a = spec(&etcd, &dir).start();
    a.wait_subnet(T);
    let text = wait_for("daemon.json", T, || {
        std::fs::read_to_string(a.daemon_json_path())
            .ok()
            .filter(|t| t.contains("bip"))
    });
    let expected = operator.replace(
        "[\"registry.local:5000\"]\n}",
        &format!(
            "[\"registry.local:5000\"],\n  \"bip\": \"10.70.52.1/24\",\n  \"mtu\": {}\n}}",
            lo_mtu()
        ),
    );
    assert_eq!(text, expected);
}

#[test]
fn an_unparseable_daemon_json_costs_neither_the_lease_nor_its_renewal() {
    let (etcd, dir) = setup();
    let broken = "{\"bip\": \"172.17.0.1/16\",, }\n";
    let json = dir.path().join("daemon.json");
    std::fs::write(&json, broken).expect("write");
    let port = free_port();
    let a = spec(&etcd, &dir)
        .arg("--subnet-lease-ttl=3s")
        .arg("-healthz-ip=127.0.0.1")
        .arg(format!("-healthz-port={port}"))
        .start();
    assert_eq!(a.wait_subnet(T), "10.70.52.0/24");
    let leases = etcd.list("/f/subnets/");
    assert_eq!(leases.len(), 1, "{leases:?}");
    let etcd_lease = leases[0].2;
    assert_ne!(etcd_lease, 0, "a lease, not a reservation");

    // Leased and serving, but not ready: /readyz names the file and the parse error.
    let (status, body) = wait_for("/readyz with the reason", T, || {
        crate::health::get_with_body(port, "/readyz").filter(|(_, b)| b != "not ready\n")
    });
    assert_eq!(status, "HTTP/1.1 503 Service Unavailable");
    assert!(body.contains("daemon.json cannot be parsed"), "{body}");
    assert!(
        body.contains("at line 1 column"),
        "the parse error is named: {body}"
    );

    // Three TTLs later: the same etcd lease, so it was renewed all along and never lost.
    std::thread::sleep(Duration::from_secs(9));
    a.assert_running();
    let leases = etcd.list("/f/subnets/");
    assert_eq!(leases.len(), 1, "{leases:?}");
    assert_eq!(
        leases[0].2, etcd_lease,
        "the lease was lost and taken again"
    );
    assert_eq!(std::fs::read_to_string(&json).expect("read"), broken);
    let log = a.log();
    assert_eq!(
        log.matches("daemon.json cannot be parsed").count(),
        1,
        "reported once, not at every retry:\n{log}"
    );

    // `weftctl status` says the same.
    let out = weftctl(
        &etcd,
        "/f",
        &[
            "status",
            "-f",
            &a.subnet_env_path().display().to_string(),
            "--docker-daemon-json",
            &json.display().to_string(),
            "--bridge",
            "weftnobridge0",
        ],
        None,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(
        stdout.contains("cannot be parsed (not valid JSON:") && stdout.contains("left untouched"),
        "{stdout}"
    );

    // Fixed by the operator: written within seconds, and ready.
    std::fs::write(&json, "{\"debug\": true}\n").expect("write");
    wait_for("/readyz 200", T, || {
        (crate::health::get_with_body(port, "/readyz")?.0 == "HTTP/1.1 200 OK").then_some(())
    });
    assert_eq!(
        std::fs::read_to_string(&json).expect("read"),
        format!(
            "{{\"debug\": true,\n  \"bip\": \"10.70.52.1/24\",\n  \"mtu\": {}}}\n",
            lo_mtu()
        )
    );
}

#[test]
fn daemon_json_is_written_through_its_symlink_keeping_bom_owner_and_mode() {
    if !weft_lab::require_root(
        "daemon_json_is_written_through_its_symlink_keeping_bom_owner_and_mode",
    ) {
        return;
    }
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let (etcd, dir) = setup();
    let real_dir = dir.path().join("etc-docker");
    std::fs::create_dir(&real_dir).expect("mkdir");
    let real = real_dir.join("daemon.json");
    std::fs::write(&real, "\u{feff}{\n  \"debug\": true\n}\n").expect("write");
    std::os::unix::fs::chown(&real, Some(4321), Some(8765)).expect("chown");
    std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    std::os::unix::fs::symlink("etc-docker/daemon.json", dir.path().join("daemon.json"))
        .expect("symlink");

    let a = spec(&etcd, &dir).start();
    a.wait_subnet(T);
    let text = wait_for("bip in the link's target", T, || {
        std::fs::read_to_string(&real)
            .ok()
            .filter(|t| t.contains("bip"))
    });
    assert_eq!(
        text,
        format!(
            "\u{feff}{{\n  \"debug\": true,\n  \"bip\": \"10.70.52.1/24\",\n  \"mtu\": {}\n}}\n",
            lo_mtu()
        )
    );
    let link = std::fs::symlink_metadata(a.daemon_json_path()).expect("lstat");
    assert!(
        link.file_type().is_symlink(),
        "the link was replaced by a file"
    );
    let m = std::fs::metadata(&real).expect("stat");
    assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (4321, 8765, 0o640));
    assert_eq!(
        std::fs::read_dir(&real_dir).expect("ls").count(),
        1,
        "no temporary file left behind"
    );
}

#[test]
fn ready_is_signalled_only_after_subnet_env_is_written() {
    let (etcd, dir) = setup();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("bind notify socket");
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let a = spec(&etcd, &dir)
        .env("NOTIFY_SOCKET", sock_path.display().to_string())
        .env("WATCHDOG_USEC", "400000")
        .start();
    let env_path = a.subnet_env_path();
    let json_path = a.daemon_json_path();
    let mut buf = [0u8; 4096];
    let mut ready_seen = false;
    let mut watchdogs = 0;
    wait_for("READY=1 and then WATCHDOG=1 three times", T, || {
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            if msg.lines().any(|l| l == "READY=1") {
                assert!(env_path.exists(), "READY=1 before subnet.env was written");
                assert!(json_path.exists(), "READY=1 before daemon.json was written");
                ready_seen = true;
            }
            if msg.lines().any(|l| l == "WATCHDOG=1") && ready_seen {
                watchdogs += 1;
            }
        }
        (ready_seen && watchdogs >= 3).then_some(())
    });
}

#[test]
fn docker_opts_matches_mk_docker_opts_byte_for_byte() {
    let (etcd, dir) = setup();
    let a = spec(&etcd, &dir).start();
    a.wait_subnet(T);
    let out = dir.path().join("docker_opts.env");
    let run = weft_lab::cmd::output(
        std::process::Command::new(env!("CARGO_BIN_EXE_weftctl"))
            .args(["docker-opts", "-f"])
            .arg(a.subnet_env_path())
            .arg("-d")
            .arg(&out)
            .env_remove("DOCKER_OPTS"),
        T,
    );
    assert!(run.status.success());
    let mtu = lo_mtu();
    assert_eq!(
        std::fs::read_to_string(&out).expect("read"),
        format!(
            "DOCKER_OPT_BIP=\"--bip=10.70.52.1/24\"\nDOCKER_OPT_IPMASQ=\"--ip-masq=true\"\nDOCKER_OPT_MTU=\"--mtu={mtu}\"\nDOCKER_OPTS=\" --bip=10.70.52.1/24 --ip-masq=true --mtu={mtu}\"\n"
        )
    );
}

/// Counts WATCHDOG=1 messages arriving on `sock` during `window`.
fn watchdogs_during(sock: &UnixDatagram, window: Duration) -> usize {
    let end = std::time::Instant::now() + window;
    let mut buf = [0u8; 4096];
    let mut n = 0;
    while std::time::Instant::now() < end {
        if let Ok(len) = sock.recv(&mut buf) {
            n += String::from_utf8_lossy(&buf[..len])
                .lines()
                .filter(|l| *l == "WATCHDOG=1")
                .count();
        }
    }
    n
}

#[test]
fn the_watchdog_is_fed_while_etcd_is_unreachable() {
    let (etcd, dir) = setup();
    let proxy = crate::harness::Proxy::start(etcd.port);
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("bind notify socket");
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    let mut s = spec(&etcd, &dir)
        .env("NOTIFY_SOCKET", sock_path.display().to_string())
        .env("WATCHDOG_USEC", "400000");
    s.endpoint = proxy.endpoint();

    // Unreachable from the start: retrying, not ready, but alive.
    proxy.cut();
    let a = s.start();
    assert!(
        watchdogs_during(&sock, Duration::from_secs(2)) >= 3,
        "no watchdog while retrying at start"
    );
    assert!(a.subnet_env().is_none());

    proxy.restore();
    a.wait_subnet(T);
    // Cut off after READY: the main loop keeps feeding the watchdog.
    proxy.cut();
    assert!(
        watchdogs_during(&sock, Duration::from_secs(2)) >= 3,
        "no watchdog during an outage"
    );
    a.assert_running();
}
