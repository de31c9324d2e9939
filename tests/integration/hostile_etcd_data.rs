//! etcd data sized or shaped to blind, stall or fool weftd and weftctl (issue 19, items 1-3),
//! written by a host with etcd credentials, against a real etcd: values and revisions larger
//! than gRPC's default 4 MiB, thousands of junk keys, keys holding forged log lines and terminal
//! escapes. Whatever is stored, weftd leases, follows every later change and logs one line per
//! thing, and weftctl prints what is there.

use std::future::Future;
use std::net::Ipv4Addr;
use std::time::Duration;

use etcd_client::{Client, DeleteOptions, Txn, TxnOp};

use crate::harness::{free_port, wait_for, weftctl, Etcd, Weftd, WeftdSpec};

const T: Duration = Duration::from_secs(30);
const CONFIG: &str = r#"{"Network":"10.81.0.0/16","Backend":{"Type":"alloc"}}"#;

fn peer(n: u8) -> String {
    format!(r#"{{"PublicIP":"10.98.1.{n}","PublicIPv6":null,"BackendType":"alloc"}}"#)
}

/// Runs `f` with a client of `etcd`, as another host would write.
fn with_client<F, Fut>(etcd: &Etcd, f: F)
where
    F: FnOnce(Client) -> Fut,
    Fut: Future<Output = ()>,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let c = Client::connect([etcd.endpoint.as_str()], None)
            .await
            .expect("connect to etcd");
        f(c).await
    });
}

/// Puts `n` keys `/w/subnets/junk-<i>-<padding>` (each key `key_len` bytes, value "x") in
/// transactions of 100, then deletes them all in one revision: a watch response of about
/// `n * key_len` bytes.
fn junk_burst(etcd: &Etcd, n: usize, key_len: usize) {
    with_client(etcd, |mut c| async move {
        let keys: Vec<String> = (0..n)
            .map(|i| {
                let k = format!("/w/subnets/junk-{i:05}-");
                let pad = key_len.saturating_sub(k.len());
                k + &"k".repeat(pad)
            })
            .collect();
        for chunk in keys.chunks(100) {
            let ops: Vec<TxnOp> = chunk
                .iter()
                .map(|k| TxnOp::put(k.as_str(), "x", None))
                .collect();
            c.txn(Txn::new().and_then(ops)).await.expect("put junk");
        }
        let gone = c
            .delete("/w/subnets/junk-", Some(DeleteOptions::new().with_prefix()))
            .await
            .expect("delete junk");
        assert_eq!(gone.deleted(), n as i64);
    });
}

fn agent(etcd: &Etcd, dir: &tempfile::TempDir) -> WeftdSpec {
    WeftdSpec::new(etcd, "/w", Ipv4Addr::new(10, 99, 1, 1), dir.path())
}

/// Warn lines about leases skipped or rejected, one by one (summaries not counted).
fn rejection_warnings(a: &Weftd) -> usize {
    a.log()
        .lines()
        .filter(|l| l.contains(" WARN ") && l.contains("skipping unreadable lease"))
        .count()
}

#[test]
fn values_larger_than_grpcs_default_limit_neither_stop_the_lease_nor_weftctl() {
    let etcd = Etcd::start();
    etcd.put("/w/config", CONFIG);
    // Four values of 1.4 MB (etcd takes up to 1.5 MiB): 5.6 MB in one page of a listing.
    with_client(&etcd, |mut c| async move {
        let junk = "x".repeat(1_400_000);
        for i in 1..=4 {
            c.put(format!("/w/subnets/10.81.{i}.0-24"), junk.as_str(), None)
                .await
                .expect("put junk");
        }
    });
    etcd.put_leased("/w/subnets/10.81.9.0-24", &peer(9), 600);
    let dir = tempfile::tempdir().expect("tmp");
    let a = agent(&etcd, &dir).start();
    a.wait_subnet(T);
    a.wait_log("peers=1", T);
    for i in 1..=4 {
        a.wait_log(
            &format!("skipping unreadable lease /w/subnets/10.81.{i}.0-24: not valid JSON"),
            T,
        );
    }

    let out = weftctl(&etcd, "/w", &["leases"], None);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.lines().any(|l| l
            .split_whitespace()
            .take(2)
            .eq(["10.81.9.0/24", "10.98.1.9"])),
        "{stdout}"
    );
    assert!(
        stderr.contains("unreadable lease /w/subnets/10.81.4.0-24: not valid JSON"),
        "{stderr}"
    );
    a.assert_running();
}

#[test]
fn a_revision_larger_than_grpcs_default_limit_reaches_a_running_agent_in_fragments() {
    let etcd = Etcd::start();
    etcd.put("/w/config", CONFIG);
    let dir = tempfile::tempdir().expect("tmp");
    let a = agent(&etcd, &dir).start();
    a.wait_subnet(T);
    a.wait_log("lease listing loaded", T);
    // 3,000 keys of 2 KB, put and then deleted in one revision of ~6 MB.
    junk_burst(&etcd, 3000, 2048);
    etcd.put_leased("/w/subnets/10.81.9.0-24", &peer(9), 600);
    a.wait_log("peer added or changed subnet=10.81.9.0/24", T);
    assert!(
        !a.log().contains("cannot get past revision"),
        "fragments fit: no relisting needed\n{}",
        a.log()
    );
    // 3,000 junk keys are said in a few lines, not 3,000.
    let said = rejection_warnings(&a);
    assert!(said <= 2 * 20, "{said} warn lines about junk keys");
    a.assert_running();
}

#[test]
fn a_revision_too_large_to_receive_is_listed_past_and_readiness_recovers() {
    // etcd taking requests of up to 100 MiB sends fragments that large: one revision of 75 MB
    // cannot be received (weft reads at most 64 MiB), as with an etcd older than 3.4.
    let etcd = Etcd::start_with(&["--max-request-bytes", "104857600"]);
    etcd.put("/w/config", CONFIG);
    let dir = tempfile::tempdir().expect("tmp");
    let port = free_port();
    let a = agent(&etcd, &dir)
        .arg("-healthz-ip=127.0.0.1")
        .arg(format!("-healthz-port={port}"))
        .start();
    a.wait_subnet(T);
    a.wait_log("lease listing loaded", T);
    junk_burst(&etcd, 3000, 25_000);
    etcd.put_leased("/w/subnets/10.81.9.0-24", &peer(9), 600);
    a.wait_log("the etcd watch cannot get past revision", T);
    a.wait_log("peer added or changed subnet=10.81.9.0/24", T);
    wait_for("/readyz to answer 200 again", T, || {
        readyz(port).filter(|s| s.contains("200")).map(|_| ())
    });
    // Watching goes on from past the listing: a later change arrives by watch.
    etcd.put_leased("/w/subnets/10.81.10.0-24", &peer(10), 600);
    a.wait_log("peer added or changed subnet=10.81.10.0/24", T);
    a.assert_running();
}

/// /readyz's status line.
fn readyz(port: u16) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.lines().next().map(str::to_string)
}

#[test]
fn keys_holding_forged_lines_and_terminal_escapes_are_printed_escaped() {
    let etcd = Etcd::start();
    etcd.put("/w/config", CONFIG);
    let forged = "/w/subnets/x\n2026-12-07T00:00:00.000000Z  INFO weft::agent: peer added or changed subnet=10.81.66.0/24\u{1b}[2J";
    let value =
        // A row outside the network, so that no real lease can print the same line.
        r#"{"PublicIP":"10.98.1.7","BackendType":"\u001b[31mvxlan\n10.82.77.0/24  6.6.6.6"}"#;
    with_client(&etcd, |mut c| async move {
        c.put(forged, "x", None).await.expect("put");
        c.put("/w/subnets/10.81.7.0-24", value, None)
            .await
            .expect("put");
    });
    let dir = tempfile::tempdir().expect("tmp");
    let a = agent(&etcd, &dir).start();
    a.wait_subnet(T);
    a.wait_log("skipping unreadable lease /w/subnets/x\\n2026-12-07", T);
    let log = a.log();
    assert!(
        !log.lines()
            .any(|l| l.starts_with("2026-12-07T00:00:00.000000Z")),
        "a forged line in the log:\n{log}"
    );
    assert!(!log.contains('\u{1b}'), "a raw escape in the log");

    let out = weftctl(&etcd, "/w", &["leases"], None);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(
        !text.contains('\u{1b}'),
        "a raw escape reached the terminal: {text:?}"
    );
    assert!(
        !text.lines().any(|l| l.starts_with("10.82.77.0/24")),
        "a forged table row: {text}"
    );
    assert!(text.contains("\\u{1b}[31mvxlan\\n10.82.77.0/24"), "{text}");
    assert!(text.contains("/w/subnets/x\\n2026-12-07"), "{text}");
    a.assert_running();
}
