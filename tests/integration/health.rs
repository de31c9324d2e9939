//! -healthz-port: /healthz answers while weftd runs, /readyz only once the lease is held; a flood
//! of idle connections neither silences them nor runs weftd out of file descriptors.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::harness::{free_port, wait_for, Etcd, Weftd, WeftdSpec};

/// The status line and body of `GET path`, or `None` when nothing answered in time.
pub fn get_with_body(port: u16, path: &str) -> Option<(String, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.lines().next()?.to_string();
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((status, body))
}

fn get(port: u16, path: &str) -> Option<String> {
    get_with_body(port, path).map(|(status, _)| status)
}

fn with_healthz(spec: WeftdSpec, port: u16) -> WeftdSpec {
    spec.arg("-healthz-ip=127.0.0.1")
        .arg(format!("-healthz-port={port}"))
}

#[test]
fn readyz_turns_200_only_once_a_subnet_is_leased() {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().expect("tmp");
    let port = free_port();
    let a = with_healthz(
        WeftdSpec::new(&etcd, "/h", Ipv4Addr::new(10, 99, 0, 1), dir.path()),
        port,
    )
    .start();
    // No config yet: alive but not ready.
    let status = wait_for("healthz to answer", Duration::from_secs(20), || {
        get(port, "/healthz")
    });
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(
        get_with_body(port, "/readyz"),
        Some((
            "HTTP/1.1 503 Service Unavailable".into(),
            "not ready\n".into()
        ))
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
        get_with_body(port, "/healthz"),
        Some(("HTTP/1.1 200 OK".into(), "ok\n".into()))
    );
    assert_eq!(
        get(port, "/nope").as_deref(),
        Some("HTTP/1.1 404 Not Found")
    );
}

/// The weftd whose subnet file lies in `dir` (each test has its own), found by its command line.
pub fn pid_of(dir: &Path) -> u32 {
    let needle = format!("-subnet-file={}", dir.join("subnet.env").display());
    wait_for("weftd's pid", Duration::from_secs(10), || {
        std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            cmdline
                .split(|b| *b == 0)
                .any(|arg| arg == needle.as_bytes())
                .then_some(pid)
        })
    })
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// User plus system CPU time of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after ") ".
    fields
        .get(11..13)
        .map(|f| f.iter().filter_map(|v| v.parse::<u64>().ok()).sum())
        .unwrap_or(0)
}

/// Lets this test process hold thousands of sockets (its soft limit may be 1024).
fn raise_own_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).expect("setrlimit");
}

/// Opens `n` connections that never send a byte.
fn idle_connections(port: u16, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|i| {
            TcpStream::connect(("127.0.0.1", port))
                .unwrap_or_else(|e| panic!("idle connection {i}: {e}"))
        })
        .collect()
}

fn start_leased(etcd: &Etcd, dir: &Path, port: u16) -> Weftd {
    etcd.put(
        "/h/config",
        r#"{"Network":"10.90.0.0/16","Backend":{"Type":"alloc"}}"#,
    );
    let a = with_healthz(
        WeftdSpec::new(etcd, "/h", Ipv4Addr::new(10, 99, 0, 1), dir),
        port,
    )
    .start();
    a.wait_subnet(Duration::from_secs(30));
    wait_for("readyz 200", Duration::from_secs(10), || {
        (get(port, "/readyz").as_deref() == Some("HTTP/1.1 200 OK")).then_some(())
    });
    a
}

#[test]
fn two_thousand_idle_connections_neither_silence_healthz_nor_exhaust_fds() {
    raise_own_fd_limit();
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().expect("tmp");
    let port = free_port();
    let a = start_leased(&etcd, dir.path(), port);
    let pid = pid_of(dir.path());
    let baseline = open_fds(pid);

    let flood_started = Instant::now();
    let idle = idle_connections(port, 2000);
    let flood_took = flood_started.elapsed();
    // Every one of them still open on this side, none has sent a byte.
    let asked = Instant::now();
    let answer = wait_for("healthz during the flood", Duration::from_secs(5), || {
        get_with_body(port, "/healthz")
    });
    let answered_in = asked.elapsed();
    assert_eq!(answer, ("HTTP/1.1 200 OK".into(), "ok\n".into()));
    assert_eq!(get(port, "/readyz").as_deref(), Some("HTTP/1.1 200 OK"));
    let during = open_fds(pid);
    eprintln!(
        "2000 idle connections opened in {flood_took:?}; weftd fds {baseline} before, {during} \
         during; /healthz answered in {answered_in:?}"
    );
    // At most the connection cap (64), plus the one being admitted, above what weftd had, with a
    // little room for etcd and the periodic netlink sockets.
    assert!(
        during <= baseline + 64 + 1 + 8,
        "weftd holds {during} fds during the flood, {baseline} before"
    );
    a.assert_running();
    drop(idle);
    wait_for(
        "fds back near the baseline",
        Duration::from_secs(10),
        || (open_fds(pid) <= baseline + 8).then_some(()),
    );
}

#[test]
fn accept_errors_back_off_and_are_logged_once() {
    raise_own_fd_limit();
    if !weft_lab::require_tools("accept_errors_back_off_and_are_logged_once", &["prlimit"]) {
        return;
    }
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().expect("tmp");
    let port = free_port();
    let a = start_leased(&etcd, dir.path(), port);
    let pid = pid_of(dir.path());
    // Room for a few connections only, well below the cap: accept fails with EMFILE.
    let limit = open_fds(pid) + 4;
    let set = weft_lab::cmd::output(
        std::process::Command::new("prlimit").args([
            "--pid",
            &pid.to_string(),
            &format!("--nofile={limit}:{limit}"),
        ]),
        Duration::from_secs(10),
    );
    assert!(set.status.success(), "prlimit: {set:?}");

    let idle = idle_connections(port, 200);
    let ticks_before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(3));
    let spent = cpu_ticks(pid) - ticks_before;
    eprintln!("weftd at its fd limit: {spent} CPU ticks in 3 s");
    // A retry loop without backoff burns a whole core (~300 ticks at 100 Hz).
    assert!(
        spent < 100,
        "weftd spun on accept errors: {spent} ticks in 3 s"
    );
    a.assert_running();
    let log = a.log();
    assert_eq!(
        // The health server's own line; other parts of weftd meeting the same limit (a netlink
        // socket for the periodic address read) say so once each, in their own words.
        log.matches("accept: Too many open files").count(),
        1,
        "one line for a repeated accept error:\n{log}"
    );

    // Once the flood is gone, health checks get in again.
    drop(idle);
    let status = wait_for("healthz after the flood", Duration::from_secs(20), || {
        get(port, "/healthz")
    });
    assert_eq!(status, "HTTP/1.1 200 OK");
}
