//! `udp`: flannel's default data plane, in userspace. A TUN device `flannel0` carries this host's
//! traffic for the cluster network; each inner IPv4 packet travels alone in one UDP datagram
//! (port 8285) to the peer that holds the destination's subnet.
//!
//! Split as boringtun is: `codec` decides what to do with one packet and does no I/O; `worker`
//! owns the descriptors and moves batches; `device` and `socket` open them; this module is the
//! control side (the `Backend` methods), which swaps the peer table the workers read.

pub mod codec;
mod config;
mod worker;

/// The udp backend's device, flannel's `flannel0`.
pub const DEVICE: &str = "flannel0";

use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::net::SocketAddrV4;
use std::os::unix::net::UnixStream;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;

use ipnet::Ipv4Net;
use serde_json::Value;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::time::{sleep_until, Duration, Instant};
use tracing::{debug, info};

pub use crate::plane::Stats;
pub use codec::{Counters, DropReason};
pub use config::UdpConfig;

use crate::conn::Conn;
use crate::netlink;
use crate::offload::socket::Socket;
use crate::offload::stats::{Live, StatsCell};
use crate::offload::tun;
use crate::plane::StatsSource;
use crate::routes::{self, RouteSpec};
use crate::watch::Watched;
use crate::{
    peer, BackendConfig, DataPlane, Desired, Error, ErrorList, Event, Host, Lease, Network,
    PeerChanges, Programmed,
};
use codec::PeerTable;
use worker::{Shared, Worker};

pub struct Udp {
    net: Network,
    cfg: UdpConfig,
    own: Option<Lease>,
    /// The peers of the last reconcile and applies since, for the table the workers read and
    /// for one rebuilt when they restart.
    peers: BTreeMap<Ipv4Net, SocketAddrV4>,
    conn: Conn,
    running: Option<Running>,
    stats: StatsCell,
    failed_tx: UnboundedSender<String>,
    failed: UnboundedReceiver<String>,
    /// A full reconcile ran since the backend was built, its lease changed or drift was seen.
    synced: bool,
    /// When the workers last got a table, and whether `peers` changed since (see
    /// [`PUBLISH_EVERY`]).
    published: Option<Instant>,
    unpublished: bool,
}

/// Tables are built at most this often: building one is O(peers), so 500 leases written one by
/// one in a burst must not each build a table of 10,000. A change waits this long at most.
const PUBLISH_EVERY: Duration = Duration::from_millis(10);

/// The open device and the workers moving its packets.
struct Running {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    /// Written once to wake every worker out of poll for shutdown.
    wake: UnixStream,
    /// flannel0's index when its queues were opened: another index means it was recreated.
    index: u32,
}

impl DataPlane for Udp {
    const TYPE: &'static str = "udp";
    const SURVIVES_RESTART: &'static str =
        "flannel0 (a persistent TUN device) with its address and route; packets are \
         dropped until the next weftd reopens it";
    const DEVICE_KINDS: &'static [&'static str] = &["tun"];
    const MTU_OVERHEAD: u32 = config::OVERHEAD;

    fn check(config: &BackendConfig, underlay_mtu: u32) -> Result<(), Error> {
        UdpConfig::parse(config, underlay_mtu).map(drop)
    }

    fn device(_config: &BackendConfig) -> Option<String> {
        Some(DEVICE.to_string())
    }

    fn device_names(&self) -> Vec<String> {
        vec![DEVICE.to_string()]
    }

    /// One route, the whole network into flannel0; the peers live in the workers' table.
    fn desired(
        _config: &BackendConfig,
        host: &Host<'_>,
        _peers: &[Lease],
    ) -> Result<Option<Desired>, Error> {
        let index = host
            .device
            .ok_or_else(|| Error::NoInterface(DEVICE.to_string()))?;
        let route = network_route(host.net.network, index);
        Ok(Some(Desired {
            routes: vec![(None, route)],
            ..Desired::default()
        }))
    }

    /// What the workers have counted, over this backend's life, readable from elsewhere for as
    /// long as this backend lives.
    fn stats(&self) -> Option<StatsSource> {
        Some(self.stats.source())
    }

    fn new(config: &BackendConfig, net: Network) -> Result<Self, Error> {
        let cfg = UdpConfig::parse(config, net.external.mtu)?;
        let (failed_tx, failed) = unbounded_channel();
        Ok(Self {
            net,
            cfg,
            own: None,
            peers: BTreeMap::new(),
            conn: Conn::default(),
            running: None,
            stats: StatsCell::new("udp"),
            failed_tx,
            failed,
            synced: false,
            published: None,
            unpublished: false,
        })
    }

    async fn prepare(&mut self, _previous: Option<&Lease>) -> Result<Option<Value>, Error> {
        self.conn.subscribe()?;
        // flannel's udp publishes no BackendData.
        Ok(None)
    }

    fn mtu(&self) -> u32 {
        self.cfg.mtu
    }

    async fn configure(&mut self, own: &Lease) -> Result<(), Error> {
        // Which peers are acceptable depends on this host's lease.
        self.synced &= self.own.as_ref() == Some(own);
        self.own = Some(own.clone());
        let index = self.ensure_device().await?;
        self.publish_table();
        let errs = self.ensure_route(index).await;
        self.conn.settle().await;
        errs.into_first()
    }

    async fn reconcile<P: Borrow<Lease>>(
        &mut self,
        peers: impl IntoIterator<Item = P>,
    ) -> Result<(), ErrorList> {
        if self.own.is_none() {
            return Err(Error::Other(
                "udp: reconcile before this host's lease is configured".into(),
            )
            .into());
        }
        let mut errs = ErrorList::default();
        let index = self.ensure_device().await?;
        let mut desired = BTreeMap::new();
        // flannel's udp writes no BackendType, so "" is a flannel udp node.
        for p in peers {
            let p = p.borrow();
            if !ours(p) {
                continue;
            }
            match self.endpoint(p, &desired) {
                Ok(at) => {
                    desired.insert(p.subnet, at);
                }
                Err(e) => errs.push(e),
            }
        }
        // The agent logs peers coming and going; the table itself is only worth a debug line.
        for (n, at) in desired
            .iter()
            .filter(|(n, at)| self.peers.get(n) != Some(at))
        {
            debug!(subnet = %n, endpoint = %at, "peer in the udp table");
        }
        for (n, at) in self.peers.iter().filter(|(n, _)| !desired.contains_key(n)) {
            debug!(subnet = %n, endpoint = %at, "peer out of the udp table");
        }
        self.peers = desired;
        self.publish_table();
        let route = self.ensure_route(index).await;
        self.synced = route.0.is_empty();
        errs.0.extend(route.0);
        self.conn.settle().await;
        errs.into_result()
    }

    /// [`crate::Backend::apply`]: the peers in `changes` go into (or out of) the table, which
    /// the workers get anew only if it changed. No netlink request: udp's peers live in
    /// userspace.
    async fn apply(&mut self, changes: &PeerChanges) -> Result<(), ErrorList> {
        let mut errs = ErrorList::default();
        let mut changed = false;
        for subnet in &changes.remove {
            if let Some(at) = self.peers.remove(subnet) {
                debug!(%subnet, endpoint = %at, "peer out of the udp table");
                changed = true;
            }
        }
        for p in &changes.upsert {
            let old = self.peers.remove(&p.subnet);
            let new = match ours(p).then(|| self.endpoint(p, &self.peers)) {
                Some(Ok(at)) => Some(at),
                Some(Err(e)) => {
                    errs.push(e);
                    None
                }
                None => None,
            };
            if let Some(at) = new {
                self.peers.insert(p.subnet, at);
            }
            if old != new {
                match new {
                    Some(at) => debug!(subnet = %p.subnet, endpoint = %at, "peer in the udp table"),
                    None => debug!(subnet = %p.subnet, "peer out of the udp table"),
                }
                changed = true;
            }
        }
        if changed {
            if self.published.is_some_and(|t| t.elapsed() < PUBLISH_EVERY) {
                // Published by `event` when the interval is over (the agent always waits on it).
                self.unpublished = true;
            } else {
                self.publish_table();
            }
        }
        errs.into_result()
    }

    /// udp keeps no kernel state per peer: a full reconcile is needed only to repair flannel0
    /// (drift and worker failures come through `event`, which the agent answers with one).
    fn needs_reconcile(&self) -> bool {
        !self.synced || self.running.is_none()
    }

    /// The one route `ensure_route` keeps; peers live in the workers' table, not the kernel.
    fn programmed(&self) -> Programmed {
        Programmed {
            routes: usize::from(self.own.is_some()),
            ..Programmed::default()
        }
    }

    /// A worker failed, or flannel0 (its link state, address or route) changed behind weft's back.
    /// Meanwhile, publishes a table that `apply` held back.
    async fn event(&mut self) -> Event {
        let owned = Watched {
            device: Some(DEVICE.to_string()),
            index: self.running.as_ref().map(|r| r.index),
        };
        loop {
            let publish_at = (self.published)
                .filter(|_| self.unpublished)
                .map(|t| t + PUBLISH_EVERY);
            let event = tokio::select! {
                Some(why) = self.failed.recv() => Event::Failed(why),
                () = self.conn.drifted(&owned) => Event::Drift,
                () = sleep_until(publish_at.unwrap_or_else(Instant::now)), if publish_at.is_some() => {
                    self.publish_table();
                    continue;
                }
            };
            // flannel0 needs repairing: only a full reconcile does that.
            self.synced &= event != Event::Drift;
            return event;
        }
    }

    /// Stops the workers and closes the queues; flannel0 stays, with its address and route.
    async fn shutdown(mut self) {
        self.stop_workers();
    }
}

impl Udp {
    /// Where `p`'s packets go, unless it must not be a peer: refused by the checks every data
    /// plane applies, or overlapping a peer already in `table`.
    fn endpoint(
        &self,
        p: &Lease,
        table: &BTreeMap<Ipv4Net, SocketAddrV4>,
    ) -> Result<SocketAddrV4, Error> {
        peer::check(&self.net, self.own.as_ref(), p)?;
        if let Some((n, other)) = overlapping(table, p.subnet) {
            return Err(Error::BadPeer {
                subnet: p.subnet.to_string(),
                reason: format!("overlaps {n} of the peer at {}", other.ip()),
            });
        }
        Ok(SocketAddrV4::new(p.public_ip, self.cfg.port))
    }

    /// The table the workers read, from the current lease and peers.
    fn publish_table(&mut self) {
        self.published = Some(Instant::now());
        self.unpublished = false;
        let (Some(own), Some(r)) = (&self.own, &self.running) else {
            return;
        };
        let peers = self.peers.iter().map(|(n, at)| (*n, *at));
        let table = PeerTable::new(self.net.network, own.subnet, peers);
        r.shared.table.store(Arc::new(table));
    }

    /// flannel0 up with its MTU and address, and workers attached to it: opened (or reopened
    /// after it was deleted, or after a worker died) as needed. Returns its index.
    async fn ensure_device(&mut self) -> Result<u32, Error> {
        let handle = self.conn.handle()?;
        let existing = tun::find(&handle, DEVICE).await?;
        let healthy = match (&self.running, &existing) {
            (Some(r), Some(e)) => r.index == e.index && r.threads.iter().all(|t| !t.is_finished()),
            _ => false,
        };
        if !healthy {
            let restart = self.running.is_some();
            if restart {
                info!(
                    device = DEVICE,
                    "device recreated or a worker stopped; restarting the workers"
                );
            }
            self.stop_workers();
            self.start_workers(&handle, restart).await?;
        }
        // Before the link goes up, so IPv6 never starts on it.
        tun::ensure_ipv6_off(DEVICE);
        let index = tun::ensure_link(&handle, DEVICE, self.cfg.mtu, tun::READ_SLOTS as u32).await?;
        tun::ensure_accept_local(&handle, DEVICE, index).await?;
        if let Some(own) = &self.own {
            netlink::ensure_address(&handle, index, DEVICE, own.subnet.network()).await?;
        }
        Ok(index)
    }

    async fn start_workers(
        &mut self,
        handle: &rtnetlink::Handle,
        restart: bool,
    ) -> Result<(), Error> {
        let Some(own) = &self.own else {
            return Err(Error::Other("udp: no lease configured".into()));
        };
        let n = crate::offload::workers();
        let tun = tun::open(handle, DEVICE, n, self.cfg.offload).await?;
        let mut sockets = Vec::with_capacity(n);
        for _ in 0..tun.queues.len() {
            sockets.push(Socket::bind(self.cfg.port, self.cfg.offload)?);
        }
        let udp_gro = sockets.iter().all(Socket::gro);
        let (wake, wake_rx) =
            UnixStream::pair().map_err(Error::io("create the wake-up socket pair"))?;
        let peers = self.peers.iter().map(|(n, at)| (*n, *at));
        let table = PeerTable::new(self.net.network, own.subnet, peers);
        let icmp = worker::IcmpRate::of_this_namespace();
        let shared = Arc::new(Shared::new(table, tun.queues.len(), icmp));
        let mut threads = Vec::with_capacity(n);
        let mtu = self.cfg.mtu as usize;
        for (id, (queue, sock)) in tun.queues.into_iter().zip(sockets).enumerate() {
            let rx = wake_rx
                .try_clone()
                .map_err(Error::io("clone the wake-up socket"))?;
            let w = Worker::new(
                id,
                queue,
                (tun.vnet_hdr, tun.uso),
                mtu,
                sock,
                rx,
                shared.clone(),
            );
            let failed = self.failed_tx.clone();
            let t = std::thread::Builder::new()
                .name(format!("weft-udp-{id}"))
                .spawn(move || run_worker(id, w, &failed))
                .map_err(Error::io("start a udp worker thread"))?;
            threads.push(t);
        }
        info!(
            device = DEVICE,
            workers = threads.len(),
            tun_offload = tun.vnet_hdr,
            tun_uso = tun.uso,
            udp_gro,
            port = self.cfg.port,
            mtu,
            icmp_per_sec = icmp.per_sec,
            icmp_burst = icmp.burst,
            "udp data plane running"
        );
        let live = Live {
            slots: shared.slots.clone(),
            tun_offload: tun.vnet_hdr,
            tun_uso: tun.vnet_hdr && tun.uso,
            udp_gro,
        };
        self.stats.start(live, restart);
        self.running = Some(Running {
            shared,
            threads,
            wake,
            index: tun.index,
        });
        Ok(())
    }

    fn stop_workers(&mut self) {
        let Some(mut r) = self.running.take() else {
            return;
        };
        r.shared.stop.store(true, Ordering::Relaxed);
        let _ = std::io::Write::write_all(&mut r.wake, &[1]);
        for t in r.threads {
            // A worker that panicked has already reported it.
            let _ = t.join();
        }
        self.stats.stop();
        debug!(device = DEVICE, "udp workers stopped");
    }

    /// The one owned route: the whole cluster network into flannel0.
    async fn ensure_route(&mut self, index: u32) -> ErrorList {
        let (handle, batch) = match (self.conn.handle(), self.conn.batch()) {
            (Ok(h), Ok(b)) => (h, b),
            (Err(e), _) | (_, Err(e)) => return e.into(),
        };
        let want = [network_route(self.net.network, index)];
        let owner = routes::Owner {
            network: self.net.network,
            network_v6: None,
            device: Some(index),
        };
        routes::reconcile_owned(&handle, &batch, &owner, &want).await
    }
}

/// `<network> dev flannel0`: everything for the cluster network into the TUN device.
fn network_route(network: Ipv4Net, index: u32) -> RouteSpec {
    RouteSpec::device(network, index, DEVICE)
}

impl Drop for Udp {
    /// weftd exiting: the workers stop and close their queues; flannel0 (persistent) keeps its
    /// address and route, so traffic resumes when the next weftd attaches.
    fn drop(&mut self) {
        self.stop_workers();
    }
}

/// Whether `p` is a peer of this data plane: flannel's udp writes no BackendType, so "" is a
/// flannel udp node.
fn ours(p: &Lease) -> bool {
    p.backend_type.is_empty() || peer::same_type(p, Udp::TYPE)
}

/// A subnet of `table` that overlaps `subnet`, if any: the same one, one containing it (a shorter
/// prefix) or one inside it. O(prefix lengths × log n), not a scan.
fn overlapping(
    table: &BTreeMap<Ipv4Net, SocketAddrV4>,
    subnet: Ipv4Net,
) -> Option<(Ipv4Net, SocketAddrV4)> {
    let subnet = subnet.trunc();
    let containing = (0..=subnet.prefix_len()).find_map(|len| {
        let n = Ipv4Net::new(subnet.network(), len).ok()?.trunc();
        table.get_key_value(&n)
    });
    // Ipv4Net orders by address, then prefix length: everything inside `subnet` lies between.
    let lo = Ipv4Net::new(subnet.network(), 0).ok()?;
    let hi = Ipv4Net::new(subnet.broadcast(), 32).ok()?;
    let inside = || table.range(lo..=hi).find(|(n, _)| subnet.contains(*n));
    containing.or_else(inside).map(|(n, at)| (*n, *at))
}

/// Runs a worker; its failure (an error or a panic) goes to `event()`.
fn run_worker(id: usize, mut w: Worker, failed: &UnboundedSender<String>) {
    let result = catch_unwind(AssertUnwindSafe(|| w.run()));
    let why = match result {
        Ok(Ok(())) => return,
        Ok(Err(e)) => e,
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            format!("panicked: {msg}")
        }
    };
    let why = format!("udp worker {id}: {why}");
    // The agent logs the event; this line is for the thread's own context.
    debug!("{why}");
    let _ = failed.send(why);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_subnet_overlapping_a_peer_is_found_whatever_the_prefix_lengths() {
        let at = SocketAddrV4::new("192.168.1.2".parse().expect("ip"), 8285);
        let table: BTreeMap<Ipv4Net, SocketAddrV4> = ["10.5.1.0/24", "10.5.8.0/22", "10.6.0.0/16"]
            .iter()
            .map(|n| (n.parse().expect("net"), at))
            .collect();
        let hit = |n: &str| {
            overlapping(&table, n.parse().expect("net")).map(|(held, _)| held.to_string())
        };
        assert_eq!(
            hit("10.5.1.0/24").as_deref(),
            Some("10.5.1.0/24"),
            "the same"
        );
        assert_eq!(
            hit("10.5.1.128/25").as_deref(),
            Some("10.5.1.0/24"),
            "inside"
        );
        assert_eq!(hit("10.5.9.0/24").as_deref(), Some("10.5.8.0/22"), "inside");
        assert_eq!(hit("10.6.3.0/24").as_deref(), Some("10.6.0.0/16"), "inside");
        assert_eq!(hit("10.5.0.0/16").as_deref(), Some("10.5.1.0/24"), "around");
        assert_eq!(hit("10.5.2.0/24"), None);
        assert_eq!(hit("10.7.0.0/16"), None);
    }
}
