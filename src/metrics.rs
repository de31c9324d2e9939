//! Prometheus metrics, served as `/metrics` on the health port (flanneld has none). One registry
//! of `prometheus-client`, encoded by its text encoder (OpenMetrics text, which Prometheus
//! scrapes natively).
//!
//! The handle is a process-wide [`get`] rather than a field of the agent: the points that count
//! are spread over code that has no agent at hand (`registry::etcd`'s calls, shared with weftctl; the
//! firewall task; the health server, which encodes), and weftd runs one agent per process.
//! Unit tests build their own [`Metrics`].
//!
//! Everything is counted where it happens, never per packet: a userspace data plane's counters
//! (udp's, wireguard's) are read from its workers' published totals only when scraped
//! ([`DataPlaneCollector`]), as is the time left on the lease.

use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::time::{Duration, Instant};

use ipnet::{Ipv4Net, Ipv6Net};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use weft_backends::udp::DropReason;
use weft_backends::{Backend, Programmed, Stats, StatsSource, KINDS};

use crate::lease::Lease;
use crate::peers::Reason;

/// What `/metrics` answers with: the OpenMetrics text the encoder writes.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// One label; every label set here is small and fixed, so an array does.
type Label<V = &'static str> = [(&'static str, V); 1];

/// weftd's metrics.
pub fn get() -> &'static Metrics {
    static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);
    &METRICS
}

/// The peer BackendTypes given their own label value: every type weft knows, then `other` for
/// anything else a lease claims, so a hostile etcd cannot grow the label set.
const BACKEND_TYPES: [&str; KINDS.len() + 1] = backend_types();

const fn backend_types() -> [&'static str; KINDS.len() + 1] {
    let mut names = ["other"; KINDS.len() + 1];
    let mut i = 0;
    while i < KINDS.len() {
        names[i] = KINDS[i].name;
        i += 1;
    }
    names
}

/// Every [`Reason`] label, so each series exists (at 0) before its first rejection: those of
/// every peer, then those of each backend's identity (vxlan's VtepMAC).
fn rejection_reasons() -> impl Iterator<Item = &'static str> {
    let identities = KINDS.iter().filter_map(|k| k.identity_kind);
    [
        "unreadable",
        "outside_network",
        "wrong_length",
        "overlaps_own",
        "public_ip_not_unicast",
        "public_ip_local",
        "subnet_taken",
    ]
    .into_iter()
    .chain(identities.flat_map(|i| [i.bad_label, i.own_label, i.taken_label]))
}

pub struct Metrics {
    registry: Registry,
    lease_held: Gauge,
    /// network, subnet, on a dual-stack network ipv6_network and ipv6_subnet, backend.
    lease_info: Family<Vec<(&'static str, String)>, Gauge>,
    renewals: Counter,
    renewal_failures: Counter,
    peers: Family<Label, Gauge>,
    rejections: Family<Label, Counter>,
    reconciles: Counter,
    reconcile_failures: Counter,
    reconcile_seconds: Histogram,
    owned: Family<Label, Gauge>,
    etcd_requests: Family<Label, Counter>,
    etcd_errors: Family<Label, Counter>,
    etcd_reconnects: Counter,
    watch_events: Counter,
    resyncs: Counter,
    firewall_restores: Counter,
    scraped: Arc<Scraped>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let m = Self {
            registry: Registry::default(),
            lease_held: Gauge::default(),
            lease_info: Family::default(),
            renewals: Counter::default(),
            renewal_failures: Counter::default(),
            peers: Family::default(),
            rejections: Family::default(),
            reconciles: Counter::default(),
            reconcile_failures: Counter::default(),
            // 0.5 ms to 16 s.
            reconcile_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            owned: Family::default(),
            etcd_requests: Family::default(),
            etcd_errors: Family::default(),
            etcd_reconnects: Counter::default(),
            watch_events: Counter::default(),
            resyncs: Counter::default(),
            firewall_restores: Counter::default(),
            scraped: Arc::default(),
        };
        for t in BACKEND_TYPES {
            m.peers.get_or_create(&[("backend", t)]).set(0);
        }
        for r in rejection_reasons() {
            m.rejections.get_or_create(&[("reason", r)]).inc_by(0);
        }
        m.set_programmed(Programmed::default());
        m.register()
    }

    /// Every metric with its name and help, in one list so the exposition reads as written here
    /// (longer than most functions: each entry is one metric, and splitting them up would only
    /// scatter the list).
    fn register(mut self) -> Self {
        let r = &mut self.registry;
        r.register(
            "weft_lease_held",
            "1 while this host holds its subnet lease, else 0",
            self.lease_held.clone(),
        );
        r.register(
            "weft_lease_info",
            "This host's lease (1, with the network, subnet and backend as labels)",
            self.lease_info.clone(),
        );
        r.register(
            "weft_lease_renewals",
            "Renewals of this host's lease",
            self.renewals.clone(),
        );
        r.register(
            "weft_lease_renewal_failures",
            "Renewals of this host's lease that failed (etcd unreachable, or the lease gone)",
            self.renewal_failures.clone(),
        );
        r.register(
            "weft_peers",
            "Peers in the desired state, by the BackendType their lease names",
            self.peers.clone(),
        );
        r.register(
            "weft_peer_rejections",
            "Stored leases that became rejected as peers (or rejected for another reason), by reason",
            self.rejections.clone(),
        );
        r.register(
            "weft_reconciles",
            "Reconcile passes of the data plane",
            self.reconciles.clone(),
        );
        r.register(
            "weft_reconcile_failures",
            "Reconcile passes that reported at least one error",
            self.reconcile_failures.clone(),
        );
        r.register(
            "weft_reconcile_duration_seconds",
            "Time a reconcile pass of the data plane took",
            self.reconcile_seconds.clone(),
        );
        r.register(
            "weft_owned_kernel_objects",
            "Kernel entries weft keeps for its peers after the last reconcile, by kind",
            self.owned.clone(),
        );
        r.register(
            "weft_etcd_requests",
            "etcd requests, by operation",
            self.etcd_requests.clone(),
        );
        r.register(
            "weft_etcd_request_errors",
            "etcd requests that failed or got no answer in time, by operation",
            self.etcd_errors.clone(),
        );
        r.register(
            "weft_etcd_reconnects",
            "Times the etcd watch was re-established after it broke",
            self.etcd_reconnects.clone(),
        );
        r.register(
            "weft_watch_events",
            "etcd watch events received",
            self.watch_events.clone(),
        );
        r.register(
            "weft_watch_resyncs",
            "Full listings of the leases (start, watch behind compaction, lease taken again)",
            self.resyncs.clone(),
        );
        r.register(
            "weft_firewall_restores",
            "Times the firewall check found rules missing or different and wrote them",
            self.firewall_restores.clone(),
        );
        r.register_collector(Box::new(LeaseExpiryCollector(self.scraped.clone())));
        r.register_collector(Box::new(DataPlaneCollector(self.scraped.clone())));
        self
    }

    /// The registry in the text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail, and no metric here refuses to encode.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// This host holds `lease` of `network` for `backend`; it expires after `ttl` unless it is a
    /// reservation.
    pub fn leased(
        &self,
        (network, network6): (Ipv4Net, Option<Ipv6Net>),
        lease: &Lease,
        backend: &str,
        ttl: Duration,
    ) {
        self.lease_held.set(1);
        self.lease_info.clear();
        let mut labels = vec![
            ("network", network.to_string()),
            ("subnet", lease.subnet.to_string()),
        ];
        if let (Some(n), Some(s)) = (network6, lease.ipv6_subnet) {
            labels.extend([
                ("ipv6_network", n.to_string()),
                ("ipv6_subnet", s.to_string()),
            ]);
        }
        labels.push(("backend", backend.to_string()));
        self.lease_info.get_or_create(&labels).set(1);
        let expires = (!lease.is_reservation()).then(|| Instant::now() + ttl);
        self.scraped.lock().lease_expires = expires;
    }

    /// This host's lease is gone (expired, deleted, taken over) until it is leased again.
    pub fn lease_lost(&self) {
        self.lease_held.set(0);
        self.lease_info.clear();
        self.scraped.lock().lease_expires = None;
    }

    /// A renewal worked: the lease is good for `ttl` from now.
    pub fn renewed(&self, ttl: Duration) {
        self.renewals.inc();
        let mut s = self.scraped.lock();
        if s.lease_expires.is_some() {
            s.lease_expires = Some(Instant::now() + ttl);
        }
    }

    pub fn renewal_failed(&self) {
        self.renewal_failures.inc();
    }

    /// Leases newly rejected as peers.
    pub fn rejected<'a>(&self, reasons: impl IntoIterator<Item = &'a Reason>) {
        for r in reasons {
            self.rejections
                .get_or_create(&[("reason", reason_label(r))])
                .inc();
        }
    }

    /// A pass bringing the kernel in line (the full compare or a targeted change) took `took`
    /// and worked or not; `owned` is what the backend then holds.
    pub fn reconciled(&self, took: Duration, ok: bool, owned: Programmed) {
        self.reconciles.inc();
        if !ok {
            self.reconcile_failures.inc();
        }
        self.reconcile_seconds.observe(took.as_secs_f64());
        self.set_programmed(owned);
    }

    /// The peers accepted, by BackendType ("" is flannel's udp).
    pub fn peers_known<'a>(&self, by_type: impl IntoIterator<Item = (&'a str, usize)>) {
        let mut counts = [0i64; BACKEND_TYPES.len()];
        for (t, n) in by_type {
            counts[backend_index(t)] += i64::try_from(n).unwrap_or(i64::MAX);
        }
        for (t, n) in BACKEND_TYPES.iter().zip(counts) {
            self.peers.get_or_create(&[("backend", *t)]).set(n);
        }
    }

    fn set_programmed(&self, owned: Programmed) {
        let kinds = [
            ("route", owned.routes),
            ("neighbour", owned.neighbours),
            ("fdb", owned.fdb),
        ];
        for (kind, n) in kinds {
            let n = i64::try_from(n).unwrap_or(i64::MAX);
            self.owned.get_or_create(&[("kind", kind)]).set(n);
        }
    }

    /// One etcd call named `op`, successful or not.
    pub fn etcd_op(&self, op: &'static str, ok: bool) {
        self.etcd_requests.get_or_create(&[("op", op)]).inc();
        if !ok {
            self.etcd_errors.get_or_create(&[("op", op)]).inc();
        }
    }

    pub fn etcd_reconnected(&self) {
        self.etcd_reconnects.inc();
    }

    pub fn watch_events(&self, n: usize) {
        self.watch_events.inc_by(n as u64);
    }

    pub fn resynced(&self) {
        self.resyncs.inc();
    }

    /// A firewall check ran; `written`: it had to write rules.
    pub fn firewall_synced(&self, written: bool) {
        if written {
            self.firewall_restores.inc();
        }
    }

    /// The data plane now in use (built for a network, or rebuilt after it failed): a userspace
    /// one's counters are read from it from now on, added to those of the ones of its type
    /// before it.
    pub fn backend(&self, backend: &Backend, rebuilt: bool) {
        let mut s = self.scraped.lock();
        let new = backend.stats();
        let kind = new.as_ref().map(|n| n.read().data_plane);
        if let Some(old) = s.plane.take() {
            let old = old.read();
            if Some(old.data_plane) == kind {
                s.before.counters += &old.counters;
                s.before.worker_restarts += old.worker_restarts;
            } else {
                s.before = Stats::default();
            }
        }
        // A rebuilt data plane is a restart of its workers too.
        if rebuilt && s.before.data_plane == kind.unwrap_or_default() && new.is_some() {
            s.before.worker_restarts += 1;
        }
        s.before.data_plane = kind.unwrap_or_default();
        s.plane = new;
    }
}

/// The label of a peer's BackendType; flannel's udp writes none.
fn backend_index(backend_type: &str) -> usize {
    let t = if backend_type.is_empty() {
        "udp"
    } else {
        backend_type
    };
    let known = &BACKEND_TYPES[..BACKEND_TYPES.len() - 1];
    (known.iter().position(|k| k.eq_ignore_ascii_case(t))).unwrap_or(BACKEND_TYPES.len() - 1)
}

fn reason_label(r: &Reason) -> &'static str {
    match r {
        Reason::Unreadable(_) => "unreadable",
        Reason::OutsideNetwork(_) => "outside_network",
        Reason::WrongLength { .. } => "wrong_length",
        Reason::OverlapsOwn(_) => "overlaps_own",
        Reason::PublicIpNotUnicast(_) => "public_ip_not_unicast",
        Reason::PublicIpLocal(_) => "public_ip_local",
        Reason::BadIdentity { kind, .. } => kind.map_or("bad_backend_data", |k| k.bad_label),
        Reason::IdentityOwn(i) => i.kind().own_label,
        Reason::SubnetTaken(_) => "subnet_taken",
        Reason::IdentityTaken(i) => i.kind().taken_label,
    }
}

/// What is only looked at when scraped.
#[derive(Default)]
struct Scraped(Mutex<ScrapeState>);

#[derive(Default)]
struct ScrapeState {
    lease_expires: Option<Instant>,
    /// The userspace data plane in use, if it is one.
    plane: Option<StatsSource>,
    /// The totals of the data planes of its type before it, so counters never go backwards.
    before: Stats,
}

impl Scraped {
    fn lock(&self) -> std::sync::MutexGuard<'_, ScrapeState> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl std::fmt::Debug for Scraped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Scraped")
    }
}

/// `weft_lease_expiry_seconds`, the time left when scraped.
#[derive(Debug)]
struct LeaseExpiryCollector(Arc<Scraped>);

impl Collector for LeaseExpiryCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(at) = self.0.lock().lease_expires else {
            return Ok(());
        };
        let left = at.saturating_duration_since(Instant::now()).as_secs_f64();
        let gauge = ConstGauge::new(left);
        let m = encoder.encode_descriptor(
            "weft_lease_expiry_seconds",
            "Seconds until this host's lease expires unless renewed (absent for a reservation).",
            None,
            gauge.metric_type(),
        )?;
        gauge.encode(m)
    }
}

/// A userspace data plane's counters (`weft_udp_…`, `weft_wireguard_…`), read from its workers'
/// published totals when scraped.
#[derive(Debug)]
struct DataPlaneCollector(Arc<Scraped>);

impl Collector for DataPlaneCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let (now, mut total) = {
            let s = self.0.lock();
            let Some(src) = &s.plane else {
                return Ok(());
            };
            (src.read(), s.before.clone())
        };
        let p = now.data_plane;
        total.counters += &now.counters;
        total.worker_restarts += now.worker_restarts;
        let c = &total.counters;
        let by_direction = [
            ("in", c.rx_packets, c.rx_bytes),
            ("out", c.tx_packets, c.tx_bytes),
        ];
        counter_family(
            &mut encoder,
            &format!("weft_{p}_packets"),
            &format!(
                "Packets the {p} data plane carried: in from peers to its TUN device, out from it \
                 to peers."
            ),
            by_direction.iter().map(|(d, p, _)| (("direction", *d), *p)),
        )?;
        counter_family(
            &mut encoder,
            &format!("weft_{p}_bytes"),
            &format!("Bytes of inner packets the {p} data plane carried, by direction."),
            by_direction.iter().map(|(d, _, b)| (("direction", *d), *b)),
        )?;
        counter_family(
            &mut encoder,
            &format!("weft_{p}_drops"),
            &format!("Packets the {p} data plane dropped, by reason."),
            DropReason::ALL
                .iter()
                .map(|r| (("reason", r.as_str()), c.drop_count(*r))),
        )?;
        let mut counters = vec![(
            format!("weft_{p}_worker_restarts"),
            format!(
                "Times the {p} workers were started again (their device recreated, a worker \
                 failed)."
            ),
            total.worker_restarts,
        )];
        // Only udp routes, so only udp answers with ICMP errors.
        if p == "udp" {
            counters.push((
                "weft_udp_icmp_sent".into(),
                "ICMP errors the udp data plane wrote back to flannel0.".into(),
                c.icmp_sent,
            ));
        }
        for (name, help, v) in counters {
            let counter = ConstCounter::new(v);
            counter.encode(encoder.encode_descriptor(
                &name,
                &help,
                None,
                MetricType::Counter,
            )?)?;
        }
        let workers = ConstGauge::new(i64::try_from(now.workers).unwrap_or(i64::MAX));
        let (name, help) = (
            format!("weft_{p}_workers"),
            format!("{p} worker threads running."),
        );
        let m = encoder.encode_descriptor(&name, &help, None, MetricType::Gauge)?;
        workers.encode(m)
    }
}

fn counter_family(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    values: impl Iterator<Item = ((&'static str, &'static str), u64)>,
) -> Result<(), std::fmt::Error> {
    let mut m = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (label, v) in values {
        let labels = [label];
        ConstCounter::new(v).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::LeaseAttrs;

    /// The value of the sample `series` (`name` or `name{labels}`, as encoded) in `text`.
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    fn lease(subnet: &str, etcd_lease: i64) -> Lease {
        Lease {
            subnet: subnet.parse().expect("subnet"),
            ipv6_subnet: None,
            attrs: LeaseAttrs {
                public_ip: "192.168.1.2".parse().expect("ip"),
                public_ipv6: None,
                backend_type: "udp".into(),
                backend_data: None,
                backend_v6_data: None,
            },
            hold: crate::registry::etcd::hold(etcd_lease),
            version: 1,
        }
    }

    #[test]
    fn a_fresh_registry_encodes_every_family_with_zeros_and_ends_in_eof() {
        let text = Metrics::new().encode();
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert_eq!(sample(&text, "weft_lease_held"), Some(0.0));
        assert_eq!(sample(&text, "weft_lease_renewals_total"), Some(0.0));
        assert_eq!(
            sample(
                &text,
                r#"weft_peer_rejections_total{reason="wrong_length"}"#
            ),
            Some(0.0)
        );
        assert_eq!(sample(&text, r#"weft_peers{backend="vxlan"}"#), Some(0.0));
        assert_eq!(
            sample(&text, r#"weft_owned_kernel_objects{kind="fdb"}"#),
            Some(0.0)
        );
        assert_eq!(
            sample(&text, "weft_reconcile_duration_seconds_count"),
            Some(0.0)
        );
        assert!(text.contains("# TYPE weft_reconcile_duration_seconds histogram"));
        // Nothing leased, no udp data plane: those series are absent rather than made up.
        assert!(!text.contains("weft_lease_expiry_seconds"), "{text}");
        assert!(!text.contains("weft_udp_"), "{text}");
        for r in rejection_reasons() {
            assert!(text.contains(&format!(r#"{{reason="{r}"}}"#)), "{r}");
        }
    }

    #[test]
    fn a_dual_stack_lease_names_its_ipv6_network_and_subnet() {
        let m = Metrics::new();
        let l = Lease {
            ipv6_subnet: Some("fd00:5:0:3::/64".parse().expect("net")),
            ..lease("10.5.3.0/24", 7)
        };
        let nets = (
            "10.5.0.0/16".parse().expect("net"),
            Some("fd00:5::/48".parse().expect("net")),
        );
        m.leased(nets, &l, "host-gw", Duration::from_secs(60));
        let text = m.encode();
        assert!(
            text.contains(
                r#"weft_lease_info{network="10.5.0.0/16",subnet="10.5.3.0/24",ipv6_network="fd00:5::/48",ipv6_subnet="fd00:5:0:3::/64",backend="host-gw"} 1"#
            ),
            "{text}"
        );
    }

    #[test]
    fn the_lease_shows_its_subnet_and_counts_down_to_expiry() {
        let m = Metrics::new();
        let network = "10.5.0.0/16".parse().expect("net");
        m.leased(
            (network, None),
            &lease("10.5.3.0/24", 7),
            "udp",
            Duration::from_secs(3600),
        );
        let text = m.encode();
        assert_eq!(sample(&text, "weft_lease_held"), Some(1.0));
        assert_eq!(
            sample(
                &text,
                r#"weft_lease_info{network="10.5.0.0/16",subnet="10.5.3.0/24",backend="udp"}"#
            ),
            Some(1.0)
        );
        let left = sample(&text, "weft_lease_expiry_seconds").expect("expiry");
        assert!(left > 3590.0 && left <= 3600.0, "{left}");

        m.renewal_failed();
        m.renewed(Duration::from_secs(7200));
        let text = m.encode();
        assert_eq!(sample(&text, "weft_lease_renewals_total"), Some(1.0));
        assert_eq!(
            sample(&text, "weft_lease_renewal_failures_total"),
            Some(1.0)
        );
        assert!(sample(&text, "weft_lease_expiry_seconds").expect("expiry") > 7000.0);

        // A new subnet replaces the old label set rather than adding to it.
        m.leased(
            (network, None),
            &lease("10.5.9.0/24", 8),
            "udp",
            Duration::from_secs(60),
        );
        let text = m.encode();
        assert_eq!(text.matches("weft_lease_info{").count(), 1, "{text}");
        assert!(text.contains(r#"subnet="10.5.9.0/24""#));

        m.lease_lost();
        let text = m.encode();
        assert_eq!(sample(&text, "weft_lease_held"), Some(0.0));
        assert!(!text.contains("weft_lease_info{"), "{text}");
        assert!(!text.contains("weft_lease_expiry_seconds "), "{text}");
    }

    #[test]
    fn a_reservation_never_expires() {
        let m = Metrics::new();
        let network = "10.5.0.0/16".parse().expect("net");
        m.leased(
            (network, None),
            &lease("10.5.3.0/24", 0),
            "vxlan",
            Duration::from_secs(60),
        );
        m.renewed(Duration::from_secs(60));
        let text = m.encode();
        assert_eq!(sample(&text, "weft_lease_held"), Some(1.0));
        assert!(!text.contains("weft_lease_expiry_seconds "), "{text}");
    }

    #[test]
    fn reconciles_count_passes_and_what_the_kernel_holds_and_peers_are_counted_by_backend() {
        let m = Metrics::new();
        let owned = Programmed {
            routes: 2,
            neighbours: 2,
            fdb: 2,
        };
        m.reconciled(Duration::from_millis(3), true, owned);
        m.reconciled(Duration::from_millis(20), false, owned);
        let text = m.encode();
        assert_eq!(sample(&text, "weft_reconciles_total"), Some(2.0));
        assert_eq!(sample(&text, "weft_reconcile_failures_total"), Some(1.0));
        assert_eq!(
            sample(&text, "weft_reconcile_duration_seconds_count"),
            Some(2.0)
        );
        let sum = sample(&text, "weft_reconcile_duration_seconds_sum").expect("sum");
        assert!((sum - 0.023).abs() < 1e-9, "{sum}");
        assert_eq!(
            sample(
                &text,
                r#"weft_reconcile_duration_seconds_bucket{le="0.004"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, r#"weft_owned_kernel_objects{kind="neighbour"}"#),
            Some(2.0)
        );

        m.peers_known([("vxlan", 1), ("", 0)]);
        let text = m.encode();
        assert_eq!(sample(&text, r#"weft_peers{backend="vxlan"}"#), Some(1.0));
        assert_eq!(sample(&text, r#"weft_peers{backend="udp"}"#), Some(0.0));
        // The last count is what counts; "" is flannel's udp, and types fold case.
        m.peers_known([
            ("vxlan", 1),
            ("VXLAN", 1),
            ("", 1),
            ("host-gw", 1),
            ("warp\"drive\n", 1),
        ]);
        let text = m.encode();
        assert_eq!(sample(&text, r#"weft_peers{backend="vxlan"}"#), Some(2.0));
        assert_eq!(sample(&text, r#"weft_peers{backend="udp"}"#), Some(1.0));
        assert_eq!(sample(&text, r#"weft_peers{backend="host-gw"}"#), Some(1.0));
        // A made-up BackendType from etcd never becomes a label value.
        assert_eq!(sample(&text, r#"weft_peers{backend="other"}"#), Some(1.0));
        assert!(!text.contains("warp"), "{text}");
    }

    #[test]
    fn rejections_are_counted_by_reason() {
        let m = Metrics::new();
        let len = Reason::WrongLength {
            len: 25,
            want: 24,
            v6: false,
        };
        let taken = Reason::SubnetTaken("10.5.3.0/24".parse().expect("net"));
        m.rejected([&len, &taken, &len]);
        let text = m.encode();
        assert_eq!(
            sample(
                &text,
                r#"weft_peer_rejections_total{reason="wrong_length"}"#
            ),
            Some(2.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"weft_peer_rejections_total{reason="subnet_taken"}"#
            ),
            Some(1.0)
        );
    }

    #[test]
    fn etcd_calls_are_counted_by_name() {
        let m = Metrics::new();
        m.etcd_op("get", true);
        m.etcd_op("get", false);
        m.etcd_op("lease_keep_alive", true);
        m.etcd_reconnected();
        m.watch_events(3);
        m.resynced();
        m.firewall_synced(false);
        m.firewall_synced(true);
        let text = m.encode();
        assert_eq!(
            sample(&text, r#"weft_etcd_requests_total{op="get"}"#),
            Some(2.0)
        );
        assert_eq!(
            sample(&text, r#"weft_etcd_request_errors_total{op="get"}"#),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, r#"weft_etcd_requests_total{op="lease_keep_alive"}"#),
            Some(1.0)
        );
        assert_eq!(sample(&text, "weft_etcd_reconnects_total"), Some(1.0));
        assert_eq!(sample(&text, "weft_watch_events_total"), Some(3.0));
        assert_eq!(sample(&text, "weft_watch_resyncs_total"), Some(1.0));
        assert_eq!(sample(&text, "weft_firewall_restores_total"), Some(1.0));
    }

    /// A host on 192.168.1.2 (eth0, MTU 1500) in 10.5.0.0/16.
    fn network() -> weft_backends::Network {
        weft_backends::Network {
            network: "10.5.0.0/16".parse().expect("net"),
            network_v6: None,
            external: weft_backends::ExternalInterface {
                name: "eth0".into(),
                index: 2,
                iface_addr: "192.168.1.2".parse().expect("addr"),
                public_ip: "192.168.1.2".parse().expect("addr"),
                mtu: 1500,
                iface_addr6: None,
                public_ipv6: None,
            },
        }
    }

    /// `{"Type": t}`.
    fn backend_config(t: &str) -> weft_backends::BackendConfig {
        weft_backends::BackendConfig::new(serde_json::Map::from_iter([(
            "Type".to_string(),
            serde_json::Value::from(t),
        )]))
    }

    #[test]
    fn a_udp_backend_is_read_when_scraped_and_survives_being_rebuilt() {
        let net = network();
        let udp = backend_config("udp");
        let m = Metrics::new();
        let backend = Backend::new(&udp, net.clone()).expect("udp backend");
        m.backend(&backend, false);
        let text = m.encode();
        // Built, not started: the families are there, at zero.
        assert_eq!(
            sample(&text, r#"weft_udp_packets_total{direction="in"}"#),
            Some(0.0)
        );
        assert_eq!(
            sample(&text, r#"weft_udp_drops_total{reason="unknown_sender"}"#),
            Some(0.0)
        );
        assert_eq!(sample(&text, "weft_udp_worker_restarts_total"), Some(0.0));
        assert_eq!(sample(&text, "weft_udp_workers"), Some(0.0));
        m.backend(&Backend::new(&udp, net.clone()).expect("udp backend"), true);
        let text = m.encode();
        assert_eq!(sample(&text, "weft_udp_worker_restarts_total"), Some(1.0));
        // Another kind of data plane: no udp series.
        let alloc = backend_config("alloc");
        m.backend(&Backend::new(&alloc, net.clone()).expect("alloc"), false);
        assert!(!m.encode().contains("weft_udp_"));
    }

    #[test]
    fn a_wireguard_backend_has_its_own_families_and_no_udp_ones() {
        let net = network();
        let m = Metrics::new();
        m.backend(
            &Backend::new(&backend_config("udp"), net.clone()).expect("udp"),
            false,
        );
        m.backend(
            &Backend::new(&backend_config("wireguard"), net).expect("wg"),
            true,
        );
        let text = m.encode();
        assert!(!text.contains("weft_udp_"), "{text}");
        for reason in ["replayed", "bad_authentication", "unknown_sender"] {
            let series = format!(r#"weft_wireguard_drops_total{{reason="{reason}"}}"#);
            assert_eq!(sample(&text, &series), Some(0.0), "{series} in {text}");
        }
        assert_eq!(
            sample(&text, r#"weft_wireguard_packets_total{direction="out"}"#),
            Some(0.0)
        );
        // The udp data plane before it was another kind: not a wireguard worker restart.
        assert_eq!(
            sample(&text, "weft_wireguard_worker_restarts_total"),
            Some(0.0)
        );
        assert!(!text.contains("icmp_sent"), "{text}");
    }
}
