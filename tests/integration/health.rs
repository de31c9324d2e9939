//! -healthz-port: /healthz answers while weftd runs, /readyz only once the lease is held.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::time::Duration;

use crate::harness::{free_port, wait_for, Etcd, WeftdSpec};

fn get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.lines().next().map(str::to_string)
}

#[test]
fn readyz_turns_200_only_once_a_subnet_is_leased() {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().expect("tmp");
    let port = free_port();
    let a = WeftdSpec::new(&etcd, "/h", Ipv4Addr::new(10, 99, 0, 1), dir.path())
        .arg("-healthz-ip=127.0.0.1")
        .arg(format!("-healthz-port={port}"))
        .start();
    // No config yet: alive but not ready.
    let status = wait_for("healthz to answer", Duration::from_secs(20), || {
        get(port, "/healthz")
    });
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(
        get(port, "/readyz").as_deref(),
        Some("HTTP/1.1 503 Service Unavailable")
    );

    etcd.put(
        "/h/config",
        r#"{"Network":"10.90.0.0/16","Backend":{"Type":"alloc"}}"#,
    );
    a.wait_subnet(Duration::from_secs(30));
    wait_for("readyz 200", Duration::from_secs(10), || {
        (get(port, "/readyz").as_deref() == Some("HTTP/1.1 200 OK")).then_some(())
    });
    assert_eq!(
        get(port, "/nope").as_deref(),
        Some("HTTP/1.1 404 Not Found")
    );
}
