//! A config weftd cannot run (here a VNI out of range) is refused in one place: weftd logs it once
//! and waits for the key to change, with a handful of etcd requests rather than thousands, and
//! `weftctl config set` refuses it with the same words. Flags that cannot work stop weftd at start,
//! cleanly.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::time::Duration;

use crate::harness::{weftctl, Etcd, WeftdSpec};

const T: Duration = Duration::from_secs(30);

/// The config of the report: weftd once spun on it, ~3,200 etcd requests in 3 s.
const VNI_TOO_BIG: &str = r#"{"Network":"10.5.0.0/16","Backend":{"VNI":99999999,"Type":"vxlan"}}"#;

/// gRPC calls etcd has started so far (unary calls and streams), from its metrics endpoint.
fn etcd_requests(etcd: &Etcd) -> u64 {
    let mut conn = TcpStream::connect(("127.0.0.1", etcd.port)).expect("connect to etcd metrics");
    conn.set_read_timeout(Some(T)).expect("timeout");
    conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .expect("ask for metrics");
    let mut body = String::new();
    conn.read_to_string(&mut body).expect("read metrics");
    let total = body
        .lines()
        .filter(|l| l.starts_with("grpc_server_started_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>();
    assert!(
        body.contains("grpc_server_started_total"),
        "etcd has no gRPC metrics:\n{body}"
    );
    total as u64
}

#[test]
fn weftd_waits_quietly_on_a_backend_it_cannot_build_then_leases_once_fixed() {
    let etcd = Etcd::start();
    etcd.put("/bad/config", VNI_TOO_BIG);
    let dir = tempfile::tempdir().expect("tmp");
    let before = etcd_requests(&etcd);
    let a = WeftdSpec::new(&etcd, "/bad", Ipv4Addr::new(10, 99, 0, 1), dir.path()).start();
    let problem = "invalid network config at /bad/config: Backend: invalid backend option VNI: \
                   want an integer from 0 to 16777215, got 99999999";
    a.wait_log(problem, T);
    // Long enough for the old loop to make thousands of requests.
    std::thread::sleep(Duration::from_secs(4));
    let made = etcd_requests(&etcd) - before;
    println!("etcd requests by weftd facing a bad backend config over ~4 s: {made}");
    // Connect, read the config, watch the key: a handful, whatever the client adds.
    assert!(
        made <= 10,
        "{made} etcd requests while waiting; log:\n{}",
        a.log()
    );
    let log = a.log();
    assert_eq!(
        log.matches("invalid network config").count(),
        1,
        "logged once:\n{log}"
    );
    a.assert_running();
    assert!(a.subnet_env().is_none(), "no lease on a bad config");

    etcd.put(
        "/bad/config",
        r#"{"Network":"10.5.0.0/16","Backend":{"Type":"alloc"}}"#,
    );
    assert!(a.wait_subnet(T).starts_with("10.5."));
}

#[test]
fn weftctl_refuses_what_weftd_refuses_in_the_same_words() {
    let etcd = Etcd::start();
    let out = weftctl(&etcd, "/bad", &["config", "set", "-"], Some(VNI_TOO_BIG));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.trim_end(),
        "weftctl: invalid network config at /bad/config: Backend: invalid backend option VNI: \
         want an integer from 0 to 16777215, got 99999999"
    );
    assert_eq!(etcd.get("/bad/config"), None, "nothing written");

    // What weftctl refuses, weftd refuses too: put it behind weftctl's back.
    for (config, problem) in [
        (
            r#"{"Network":"0.0.0.0/0"}"#,
            "Network: 0.0.0.0/0 is too large",
        ),
        (
            r#"{"Network":"10.5.0.0/16","Backend":{"Type":"udp","Port":70000}}"#,
            "Backend: invalid backend option Port",
        ),
    ] {
        let out = weftctl(&etcd, "/bad", &["config", "set", "-"], Some(config));
        assert!(!out.status.success(), "{config}");
        let err = String::from_utf8_lossy(&out.stderr);
        let said = format!("invalid network config at /bad/config: {problem}");
        assert!(err.contains(&said), "{config}: {err}");

        etcd.put("/bad/config", config);
        let dir = tempfile::tempdir().expect("tmp");
        let a = WeftdSpec::new(&etcd, "/bad", Ipv4Addr::new(10, 99, 0, 1), dir.path()).start();
        a.wait_log(&said, T);
        a.assert_running();
    }
}

#[test]
fn flags_that_cannot_work_stop_weftd_at_start_without_a_panic() {
    for (args, says) in [
        (
            &["--subnet-lease-ttl=99999999999999999999h"][..],
            "too long a duration",
        ),
        (&["--subnet-lease-ttl=0s"][..], "etcd's minimum lease TTL"),
        (
            &["--subnet-lease-ttl=1h", "--subnet-lease-renew-margin=60"][..],
            "must be less than --subnet-lease-ttl",
        ),
        (
            &["-etcd-keyfile=/nonexistent/key.pem"][..],
            "--etcd-certfile",
        ),
        (&["-etcd-username=weft"][..], "--etcd-password"),
    ] {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_weftd"));
        for (k, _) in std::env::vars() {
            if k.starts_with("FLANNELD_") {
                cmd.env_remove(k);
            }
        }
        cmd.args(args).arg("-etcd-endpoints=http://127.0.0.1:1");
        let out = weft_lab::cmd::output(&mut cmd, T);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: a usage error\n{err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
}
