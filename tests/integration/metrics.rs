//! `/metrics` on the health port of weftd on simulated hosts (udp, so the data plane's counters
//! are there too): the values move when traffic flows and when peers come, go or are refused.
//! Needs root.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;

use crate::harness::wait_for;
use crate::health::get_with_body;
use crate::netns::{require_root, Topology, PREFIX};

const UDP: &str = r#"{"Network":"10.247.0.0/16","Backend":{"Type":"udp"}}"#;
/// Each host's own loopback: the same port on every host.
const PORT: u16 = 9464;
const T: Duration = Duration::from_secs(30);

/// The body of `/metrics` of host `i`'s weftd, once it answers 200.
fn scrape(t: &Topology, i: usize) -> String {
    wait_for(&format!("/metrics of host {i}"), T, || {
        t.hosts[i].assert_running();
        let (status, body) = t.hosts[i].ns.run_in(|| get_with_body(PORT, "/metrics"))?;
        (status == "HTTP/1.1 200 OK").then_some(body)
    })
}

/// The value of the sample `series` (`name` or `name{labels}`, exactly as encoded).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Scrapes host `i` until `series` satisfies `ok`; returns the value.
fn wait_sample(t: &Topology, i: usize, series: &str, ok: impl Fn(f64) -> bool) -> f64 {
    let deadline = Instant::now() + T;
    loop {
        let text = scrape(t, i);
        if let Some(v) = sample(&text, series).filter(|v| ok(*v)) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{series} on host {i} after {T:?}; last scrape:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn value(t: &Topology, i: usize, series: &str) -> f64 {
    let text = scrape(t, i);
    sample(&text, series).unwrap_or_else(|| panic!("no {series} in:\n{text}"))
}

/// A /24 of the network that neither host holds.
fn free_subnet(t: &Topology) -> Ipv4Net {
    let held = [t.hosts[0].wait_subnet(), t.hosts[1].wait_subnet()];
    (2..=254u8)
        .map(|n| Ipv4Net::new(Ipv4Addr::new(10, 247, n, 0), 24).expect("subnet"))
        .find(|s| !held.contains(s))
        .expect("a free subnet")
}

#[test]
fn metrics_move_with_traffic_and_with_peers() {
    if !require_root("metrics_move_with_traffic_and_with_peers") {
        return;
    }
    let mut t = Topology::new(2, 1500);
    t.set_config(UDP);
    let health = [
        "-healthz-ip=127.0.0.1".to_string(),
        format!("-healthz-port={PORT}"),
    ];
    let health: Vec<&str> = health.iter().map(String::as_str).collect();
    for i in 0..2 {
        t.start(i, &health);
    }
    for i in 0..2 {
        t.wire_container(i);
    }
    t.assert_full_mesh(&[0, 1]);

    // The lease: held, named, and not about to expire; the data plane reconciled.
    let own = t.hosts[0].wait_subnet();
    let text = scrape(&t, 0);
    assert_eq!(sample(&text, "weft_lease_held"), Some(1.0), "{text}");
    let info =
        format!(r#"weft_lease_info{{network="10.247.0.0/16",subnet="{own}",backend="udp"}}"#);
    assert_eq!(sample(&text, &info), Some(1.0), "{text}");
    let left = sample(&text, "weft_lease_expiry_seconds").expect("expiry");
    assert!(left > 0.0, "{text}");
    assert!(sample(&text, "weft_reconciles_total") > Some(0.0), "{text}");
    assert!(
        sample(&text, "weft_watch_resyncs_total") >= Some(1.0),
        "{text}"
    );
    assert!(
        sample(&text, r#"weft_etcd_requests_total{op="get"}"#) > Some(0.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, r#"weft_owned_kernel_objects{kind="route"}"#),
        Some(1.0),
        "udp owns one route, the network's into flannel0: {text}"
    );
    assert!(sample(&text, "weft_udp_workers") >= Some(1.0), "{text}");
    wait_sample(&t, 0, r#"weft_peers{backend="udp"}"#, |v| v == 1.0);

    // Traffic: pings from host 1's container in, and their replies out.
    let packets_in = r#"weft_udp_packets_total{direction="in"}"#;
    let packets_out = r#"weft_udp_packets_total{direction="out"}"#;
    let bytes_in = r#"weft_udp_bytes_total{direction="in"}"#;
    let (in0, out0, bytes0) = (
        value(&t, 0, packets_in),
        value(&t, 0, packets_out),
        value(&t, 0, bytes_in),
    );
    let to = t.hosts[0].container_ip().to_string();
    let (ok, out, err) = t.hosts[1].container.exec_for(
        &["ping", "-c", "5", "-i", "0.2", "-W", "1", &to],
        Duration::from_secs(20),
    );
    assert!(ok, "ping {to}: {out}{err}");
    wait_sample(&t, 0, packets_in, |v| v >= in0 + 5.0);
    wait_sample(&t, 0, packets_out, |v| v >= out0 + 5.0);
    // 5 echo requests of 84 bytes at least (IP header, ICMP header, 56 bytes of data).
    wait_sample(&t, 0, bytes_in, |v| v >= bytes0 + 5.0 * 84.0);

    // A peer arrives and leaves.
    let extra = free_subnet(&t);
    let key = weft_lab::flannel::lease_key(PREFIX, extra);
    t.etcd().put(
        &key,
        &weft_lab::flannel::udp_lease(Ipv4Addr::new(10, 199, 0, 99)),
    );
    wait_sample(&t, 0, r#"weft_peers{backend="udp"}"#, |v| v == 2.0);
    assert!(value(&t, 0, "weft_watch_events_total") >= 1.0);
    t.etcd().del(&key);
    wait_sample(&t, 0, r#"weft_peers{backend="udp"}"#, |v| v == 1.0);

    // A hostile lease: a /25 where the network has /24s. Refused, and counted by its reason.
    let wrong_length = r#"weft_peer_rejections_total{reason="wrong_length"}"#;
    let before = value(&t, 0, wrong_length);
    let half = Ipv4Net::new(extra.network(), 25).expect("/25");
    t.etcd().put(
        &weft_lab::flannel::lease_key(PREFIX, half),
        &weft_lab::flannel::udp_lease(Ipv4Addr::new(10, 199, 0, 98)),
    );
    wait_sample(&t, 0, wrong_length, |v| v >= before + 1.0);
    assert_eq!(value(&t, 0, r#"weft_peers{backend="udp"}"#), 1.0);

    // Both hosts serve their own view.
    let text = scrape(&t, 1);
    let own1 = t.hosts[1].wait_subnet();
    assert!(text.contains(&format!(r#"subnet="{own1}""#)), "{text}");
    assert!(text.ends_with("# EOF\n"), "{text}");
}
