//! The agent loop. Data flows one way: etcd events → desired state (own lease + peers) → a
//! reconcile pass → the kernel. A watch event costs what it changes: the peers it touched are
//! handed to the backend as changes, applied with targeted requests. Every other path (start,
//! missed events, compaction, a lost lease, drift, a periodic check) ends in the same place: a
//! fresh desired state handed whole to the backend, which compares it with the kernel.

use std::collections::{BTreeMap, HashSet};
use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use etcd_client::{EventType, WatchStream};
use ipnet::Ipv4Net;
use tokio::time::{interval, sleep, Instant, MissedTickBehavior};
use tracing::{debug, error, info, warn};
use weft_backends::firewall::Firewall;
use weft_backends::{
    Backend, ErrorList, Event, ExternalInterface, InterfaceSelector, Network, PeerChanges,
};

use crate::config::{InvalidConfig, NetworkConfig};
use crate::escape::Escaped;
use crate::flags::DaemonArgs;
use crate::health::{self, Readiness};
use crate::lease::{Lease, LeaseAttrs};
use crate::peers::{Change, Diff, Own, Peer, PeerSet, Reason};
use crate::policy::{self, Choice};
use crate::rejection_log::{Rejected, RejectionLog};
use crate::store::{self, BadLease, Renewal, Store};
use crate::subnet_env::{self, SubnetEnv};
use crate::{daemon_json, notify};

/// How often the periodic check runs: addresses read again, failed requests retried. With nothing
/// changed it costs nothing.
const RESYNC: Duration = Duration::from_secs(30);
/// How often the whole kernel state is compared with the desired one even with no sign of drift
/// (a full pass dumps every route, neighbour and FDB entry: ~0.1 s of CPU at 10,000 peers).
const FULL_RESYNC: Duration = Duration::from_secs(600);
/// A watch batch of this many changes hands freed memory back to the system afterwards.
const LARGE_BATCH: usize = 100;
/// A batch with more peer changes than this logs each at debug rather than info.
const LOUD_BATCH: usize = 20;
/// Longest pause between retries of a failing etcd call.
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// Breaks of an established watch with no event received in between after which weftd stops
/// watching from the revision it is stuck at and lists again (a break that says the response was
/// too large to receive lists again at once).
const STUCK_BREAKS: u32 = 2;

/// Runs weftd until the future is dropped (on a signal; dropping stops the data plane's workers,
/// and the kernel state it leaves is in `health.kept()`). Returns only on fatal errors.
pub async fn run(args: DaemonArgs, ready: Readiness) -> Result<()> {
    if args.kube_subnet_mgr {
        bail!("-kube-subnet-mgr is not supported: weft stores leases in etcd only");
    }
    if args.public_ipv6.is_some() {
        bail!("-public-ipv6 is not supported yet: weft leases IPv4 subnets only");
    }
    let selector = InterfaceSelector {
        ifaces: args.iface.clone(),
        can_reach: args.iface_can_reach,
        regexes: args
            .iface_regex
            .iter()
            .map(|r| regex::Regex::new(r).with_context(|| format!("-iface-regex {r:?}")))
            .collect::<Result<_>>()?,
        public_ip: args.public_ip,
    };
    let external = selector.select().await.context("choose the interface")?;
    info!(iface = %external.name, addr = %external.iface_addr, public_ip = %external.public_ip,
          mtu = external.mtu, "using interface");

    if args.healthz_port != 0 {
        health::serve((args.healthz_ip, args.healthz_port).into(), ready.clone()).await?;
    }
    let store = retry("connect to etcd", || Store::connect(&args.etcd)).await;
    // Probed once, as flanneld does: an iptables older than 1.6.2 refuses the flag.
    let random_fully = args.ip_masq
        && !args.ip_masq_fully_random_disable
        && weft_backends::firewall::supports_random_fully().await;
    if args.ip_masq && !args.ip_masq_fully_random_disable && !random_fully {
        warn!("iptables does not support --random-fully; masquerading without it");
    }
    let mut agent = Agent {
        args,
        store,
        external,
        ready,
        random_fully,
        notified: false,
        rejections: RejectionLog::default(),
    };
    let mut config = agent.wait_for_config().await;
    loop {
        match agent.run_network(&config).await? {
            Exit::ConfigChanged(next) => {
                info!(network = %next.network, "network config changed; leasing again");
                config = next;
            }
            Exit::BadConfig => config = agent.wait_for_config().await,
        }
    }
}

enum Exit {
    ConfigChanged(NetworkConfig),
    /// The config is valid JSON but the backend cannot be built from it.
    BadConfig,
}

struct Agent {
    args: DaemonArgs,
    store: Store,
    external: ExternalInterface,
    ready: Readiness,
    /// MASQUERADE with `--random-fully`: wanted, and this host's iptables takes it.
    random_fully: bool,
    notified: bool,
    /// What was said about leases that are not peers, so each is said once.
    rejections: RejectionLog,
}

/// What weftd is reconciling towards under one network config.
struct State {
    config: NetworkConfig,
    backend: Backend,
    own: Lease,
    /// Every lease stored under `subnets/`, and the peers accepted from them.
    peers: PeerSet,
    /// Next revision to watch from.
    watch_from: i64,
    /// The revision of the last full listing: watch events up to it are already in `peers`.
    listed_at: i64,
    /// When this host's addresses were last read (a peer may not use one as its PublicIP).
    addrs_read: Instant,
    /// The last reconcile's outcome ("": all well), so only changes are logged.
    last_outcome: Option<String>,
    /// Peer changes the backend has not been given yet, by subnet (`None`: the peer left),
    /// folded so that one pass takes them all, each peer once.
    pending: BTreeMap<Ipv4Net, Option<weft_backends::Lease>>,
    /// When the whole desired state is next compared with the kernel, even with nothing pointing
    /// at drift: the safety net for netlink events lost on the way.
    full_at: Instant,
}

impl State {
    /// Notes what a batch changed in the peer set, for the next pass to hand the backend.
    fn stage(&mut self, diff: &Diff) {
        for p in diff.added.iter().chain(&diff.changed) {
            let lease = self.peers.backend_peer(&p.key);
            self.pending.insert(p.subnet, lease);
        }
        for p in &diff.removed {
            self.pending.insert(p.subnet, None);
        }
    }
}

impl Agent {
    /// Reads `<prefix>/config` until it holds a config this host can run, watching the key
    /// between tries. Everything that would stop the backend from being built is checked here
    /// (the backend options too, against this host's underlay), so a bad config is logged once
    /// and waited on, never retried in a loop.
    async fn wait_for_config(&mut self) -> NetworkConfig {
        if let Some(path) = self.args.net_config_path.clone() {
            return self.wait_for_config_file(&path).await;
        }
        let key = self.store.config_key();
        let mut last = String::new();
        loop {
            let (text, rev) = retry("read the network config", || self.store.get_config()).await;
            let checked = text.as_deref().map(|t| {
                let c = NetworkConfig::parse_at(t, &key)?;
                c.check_on_host(self.external.mtu)
                    .map_err(|error| InvalidConfig {
                        at: key.clone(),
                        error,
                    })?;
                Ok::<_, InvalidConfig>(c)
            });
            let problem = match checked {
                Some(Ok(c)) => return c,
                Some(Err(e)) => e.to_string(),
                None => format!("no network config at {key}; waiting for one"),
            };
            if problem != last {
                error!("{}", Escaped(&problem));
                notify::status(&problem);
                last = problem;
            }
            self.wait_for_change(rev + 1, |k, _| k == key).await;
        }
    }

    /// -net-config-path: the config comes from a file (as kube-flannel's net-conf.json does), read
    /// until it holds a valid one; the problem is logged once per distinct problem, and the file
    /// looked at again every few seconds (it may be a ConfigMap being mounted).
    async fn wait_for_config_file(&self, path: &std::path::Path) -> NetworkConfig {
        let at = path.display().to_string();
        let mut last = String::new();
        loop {
            let problem = match crate::fsutil::read_optional(path) {
                Ok(Some(text)) => match NetworkConfig::parse_at(&text, &at).and_then(|c| {
                    c.check_on_host(self.external.mtu)
                        .map_err(|error| InvalidConfig {
                            at: at.clone(),
                            error,
                        })?;
                    Ok(c)
                }) {
                    Ok(c) => return c,
                    Err(e) => e.to_string(),
                },
                Ok(None) => format!("no network config file {at}; waiting for one"),
                Err(e) => format!("read the network config file {at}: {e:#}"),
            };
            if problem != last {
                error!("{}", Escaped(&problem));
                notify::status(&problem);
                last = problem;
            }
            let _ = notify::bounded(Duration::from_secs(10), sleep(Duration::from_secs(5))).await;
        }
    }

    /// Blocks until an event under the prefix matches `pred`, or a minute passes.
    async fn wait_for_change(&self, from: i64, pred: impl Fn(&str, EventType) -> bool) {
        let wait = async {
            let mut stream = match self.store.watch(from).await {
                Ok(s) => s,
                Err(e) => {
                    warn!("{e:#}");
                    sleep(MAX_BACKOFF).await;
                    return;
                }
            };
            while let Ok(Some(resp)) = stream.message().await {
                if resp.canceled() || resp.compact_revision() > 0 {
                    return;
                }
                for ev in resp.events() {
                    if let Some(kv) = ev.kv() {
                        if pred(&String::from_utf8_lossy(kv.key()), ev.event_type()) {
                            return;
                        }
                    }
                }
            }
            sleep(Duration::from_secs(1)).await;
        };
        notify::bounded(Duration::from_secs(60), wait).await;
    }

    fn network(&self, config: &NetworkConfig) -> Network {
        Network {
            network: config.network,
            external: self.external.clone(),
        }
    }

    async fn run_network(&mut self, config: &NetworkConfig) -> Result<Exit> {
        let mut backend = match Backend::new(&config.backend, self.network(config)) {
            Ok(b) => b,
            Err(e) => {
                error!(
                    "invalid network config at {}: Backend: {e}",
                    self.store.config_key()
                );
                return Ok(Exit::BadConfig);
            }
        };
        self.ready.set_kept(backend.survives_restart());
        crate::metrics::get().backend(&backend, false);
        let hint = subnet_env::previous_subnet(&self.args.subnet_file);
        let own = self.acquire(config, &mut backend, hint).await?;
        let mut state = State {
            config: config.clone(),
            backend,
            peers: self.peer_set(config, &own),
            own,
            watch_from: 0,
            listed_at: 0,
            addrs_read: Instant::now(),
            last_outcome: None,
            pending: BTreeMap::new(),
            full_at: Instant::now(),
        };
        self.publish(&mut state, hint).await?;
        if !self.resync(&mut state).await {
            self.reacquire(&mut state).await?;
        }
        self.main_loop(state).await
    }

    /// Leases a subnet: ours if etcd has one for this PublicIP, else `hint` if free, else any free
    /// one. Losing a race to another host just means trying again with a fresh listing.
    async fn acquire(
        &mut self,
        config: &NetworkConfig,
        backend: &mut Backend,
        hint: Option<Ipv4Net>,
    ) -> Result<Lease> {
        let me = self.external.public_ip;
        let claims = retry("list leases", || self.store.claims(me)).await;
        let previous = claims.mine.first().map(Lease::to_backend);
        let backend_data = backend
            .prepare(previous.as_ref())
            .await
            .context("prepare the backend")?;
        let attrs = LeaseAttrs {
            public_ip: me,
            public_ipv6: None,
            backend_type: backend.type_name().to_string(),
            backend_data,
        };
        let ttl = self.args.subnet_lease_ttl;
        let mut claims = Some(claims);
        let mut full_logged = false;
        let mut misfits_logged = HashSet::new();
        let prefix = self.store.subnets_prefix();
        loop {
            let claims = match claims.take() {
                Some(c) => c,
                None => retry("list leases", || self.store.claims(me)).await,
            };
            self.warn_bad(&claims.bad);
            for l in policy::misfits(config, &claims.mine, me) {
                if misfits_logged.insert(l.subnet) {
                    let until = if l.is_reservation() {
                        "an operator removes it"
                    } else {
                        "it expires"
                    };
                    warn!(subnet = %l.subnet, public_ip = %me,
                          "not reusing this host's earlier lease: the network config wants /{} subnets in {}..{}; it stays taken until {until}",
                          config.subnet_len, config.subnet_min, config.subnet_max);
                }
            }
            let choice = policy::choose(config, &claims.mine, &claims.others, me, hint, |n| {
                fastrand::u64(0..n)
            });
            let taken = match choice {
                Ok(Choice::Ours(old)) => self.store.take_over(&old, &attrs, ttl).await,
                Ok(Choice::Free(subnet)) => self.store.create(subnet, &attrs, ttl).await,
                Err(full) => {
                    if !full_logged {
                        error!("{full}; waiting for a lease to expire");
                        notify::status(&full.to_string());
                        full_logged = true;
                    }
                    self.ready.set(false);
                    self.wait_for_change(claims.revision + 1, |k, t| {
                        k.starts_with(&prefix) && t == EventType::Delete
                    })
                    .await;
                    continue;
                }
            };
            match taken {
                Ok(Some(lease)) => {
                    let kind = if lease.is_reservation() {
                        "reservation"
                    } else {
                        "lease"
                    };
                    info!(subnet = %lease.subnet, public_ip = %me, "acquired {kind}");
                    crate::metrics::get().leased(config.network, &lease, backend.type_name(), ttl);
                    return Ok(lease);
                }
                Ok(None) => info!("lost a race for a subnet to another host; trying another"),
                Err(e) => {
                    warn!("{e:#}");
                    sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// Applies the own lease: backend configuration, subnet.env, daemon.json, readiness.
    async fn publish(&mut self, state: &mut State, previous: Option<Ipv4Net>) -> Result<()> {
        let own = state.own.to_backend();
        state
            .backend
            .configure(&own)
            .await
            .with_context(|| format!("configure the backend for {}", own.subnet))?;
        let env = SubnetEnv {
            network: state.config.network,
            subnet: state.own.subnet,
            mtu: state.backend.mtu(),
            ip_masq: self.args.ip_masq,
        };
        env.write(&self.args.subnet_file)
            .with_context(|| format!("write {}", self.args.subnet_file.display()))?;
        // Never fails: a daemon.json weftd cannot merge is reported (log, /readyz) and retried,
        // and must not cost the lease or the data path.
        if let Some(path) = self.args.daemon_json() {
            daemon_json::publish(path, &env.gateway(), env.mtu, &self.ready);
        }
        if let Some(old) = previous.filter(|p| *p != state.own.subnet) {
            warn!(old = %old, new = %state.own.subnet,
                  "this host's subnet changed: restart Docker (and pods) to pick up the new bip");
        }
        self.ready.set(true);
        let status = format!("leased {} on {}", state.own.subnet, state.config.network);
        if !self.notified {
            notify::ready(&status);
            self.notified = true;
        } else {
            notify::status(&status);
        }
        Ok(())
    }

    /// The network config changed: what this host held under the old one goes, so that nothing
    /// of it lingers beside the new one (flanneld leaves it all behind): the lease (revoked, not
    /// left to expire; a reservation is the operator's and stays), the data plane's routes and
    /// device (`flannel.<VNI>`, `flannel0`), and the old network's firewall rules. Failures are
    /// logged; the new network is set up either way.
    async fn leave_network(&mut self, state: State) {
        let old_rules = self.firewall(&state);
        let State {
            backend,
            own,
            config,
            ..
        } = state;
        info!(subnet = %own.subnet, network = %config.network, backend = backend.type_name(),
              "leaving the old network: lease, data plane and firewall rules");
        if !own.is_reservation() {
            self.store.revoke_lease(own.etcd_lease).await;
        }
        if let Err(e) = backend.remove().await {
            warn!("remove the old data plane: {e}");
        }
        if self.args.ip_masq || self.args.iptables_forward_rules {
            if let Err(e) = old_rules.remove().await {
                warn!("remove the old network's firewall rules: {e}");
            }
        }
    }

    /// Every await here ends on its own (etcd calls and pauses are bounded, see `notify`), and
    /// the firewall, whose commands may wait 30 s on the xtables lock, is synced beside the loop.
    /// So the loop comes round often, and that is what feeds systemd's watchdog.
    async fn main_loop(&mut self, mut state: State) -> Result<Exit> {
        let mut resync = interval(RESYNC);
        resync.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut idle = interval(notify::idle_tick().unwrap_or(RESYNC));
        idle.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let renew_every = renew_interval(
            self.args.subnet_lease_ttl,
            self.args.subnet_lease_renew_margin,
        );
        let mut renew_at = Instant::now() + renew_every;
        let mut renew_backoff = Backoff::new("renew this host's lease");
        let firewall = (self.args.ip_masq || self.args.iptables_forward_rules).then(|| {
            let every = Duration::from_secs(self.args.iptables_resync.max(1));
            FirewallSync::spawn(self.firewall(&state), every)
        });
        let mut stream: Option<WatchStream> = None;
        let mut rewatch_at = Instant::now();
        let mut watch_backoff = Backoff::new("etcd watch broken");
        // Breaks of an established watch since it last delivered an event.
        let mut stuck = 0;
        loop {
            notify::progress();
            if let Some(f) = &firewall {
                f.want(self.firewall(&state));
            }
            tokio::select! {
                _ = tokio::time::sleep_until(rewatch_at), if stream.is_none() => {
                    match self.store.watch(state.watch_from).await {
                        Ok(s) => {
                            if watch_backoff.succeeded() {
                                info!("etcd watch re-established");
                                crate::metrics::get().etcd_reconnected();
                            }
                            stream = Some(s);
                        }
                        Err(e) => {
                            rewatch_at = Instant::now() + watch_backoff.delay_after(&format!("{e:#}"));
                        }
                    }
                }
                msg = next_message(&mut stream) => match msg {
                    Ok(Some(resp)) if resp.canceled() || resp.compact_revision() > 0 => {
                        info!(compacted = resp.compact_revision(), "watch fell behind etcd compaction; listing again");
                        stream = None;
                        if !self.resync(&mut state).await {
                            self.reacquire(&mut state).await?;
                        }
                    }
                    Ok(Some(resp)) => {
                        if !resp.events().is_empty() {
                            stuck = 0;
                        }
                        if let Some(exit) = self.apply_events(&mut state, resp.events()).await? {
                            drop(firewall);
                            self.leave_network(state).await;
                            return Ok(exit);
                        }
                    }
                    Ok(None) | Err(_) => {
                        // A member that lost its leader cancels the watch ("no leader"): watch
                        // again, through whichever member answers.
                        let too_large = matches!(&msg, Err(e) if store::too_large(e));
                        let why = match msg {
                            Err(e) => e.to_string(),
                            _ => "stream ended".into(),
                        };
                        stream = None;
                        rewatch_at = Instant::now() + watch_backoff.delay_after(&why);
                        stuck += 1;
                        if too_large || stuck >= STUCK_BREAKS {
                            // Watching from the same revision would fail the same way: list
                            // instead, and watch from past the listing.
                            stuck = 0;
                            self.relist_stuck_watch(&mut state, &why).await?;
                        }
                    }
                },
                _ = tokio::time::sleep_until(renew_at), if !state.own.is_reservation() => {
                    let subnet = state.own.subnet;
                    renew_at = Instant::now() + match self.store.keep_alive(state.own.etcd_lease).await {
                        Ok(Renewal::Renewed) => {
                            crate::metrics::get().renewed(self.args.subnet_lease_ttl);
                            if renew_backoff.succeeded() {
                                info!(%subnet, "lease renewed again");
                            } else {
                                debug!(%subnet, "lease renewed");
                            }
                            renew_every
                        }
                        // Its keys went with it: the subnet may still be free, or taken.
                        Ok(Renewal::Expired) => {
                            crate::metrics::get().renewal_failed();
                            renew_backoff.succeeded();
                            warn!(%subnet, "lease expired; leasing again");
                            self.reacquire(&mut state).await?;
                            stream = None;
                            rewatch_at = Instant::now();
                            renew_every
                        }
                        Err(e) => {
                            crate::metrics::get().renewal_failed();
                            renew_backoff.delay_after(&format!("{subnet}: {e:#}")).min(renew_every)
                        }
                    };
                }
                _ = resync.tick() => self.reconcile(&mut state).await,
                ev = state.backend.event() => match ev {
                    Event::Drift => self.reconcile(&mut state).await,
                    Event::Failed(why) => {
                        error!("data plane failed: {why}; rebuilding it");
                        self.ready.set_failed(true);
                        self.rebuild(&mut state).await;
                        self.ready.set_failed(false);
                        info!("data plane rebuilt");
                    }
                },
                _ = idle.tick() => {}
            }
        }
    }

    /// The watch cannot get past `state.watch_from` (a response larger than weft receives, or
    /// breaks with nothing delivered): the desired state comes from a fresh listing instead,
    /// diffed against the peer set, and the watch goes on from past it. Until the listing is in,
    /// /readyz says why weftd is not following etcd.
    async fn relist_stuck_watch(&mut self, state: &mut State, why: &str) -> Result<()> {
        let why = format!(
            "the etcd watch cannot get past revision {}: {}",
            state.watch_from,
            Escaped(why)
        );
        warn!("{why}; listing again");
        self.ready.set_stalled(Some(why));
        if !self.resync(state).await {
            self.reacquire(state).await?;
        }
        self.ready.set_stalled(None);
        Ok(())
    }

    /// Folds watch events into the desired state, then reconciles once for the whole batch.
    async fn apply_events(
        &mut self,
        state: &mut State,
        events: &[etcd_client::Event],
    ) -> Result<Option<Exit>> {
        crate::metrics::get().watch_events(events.len());
        let config_key = self.store.config_key();
        let prefix = self.store.subnets_prefix();
        let mut changes = Vec::new();
        for ev in events {
            let Some(kv) = ev.kv() else { continue };
            // Not past it: the rest of this revision may come in the next fragment, and after a
            // break the watch starts again at its beginning (its events apply again harmlessly).
            state.watch_from = state.watch_from.max(kv.mod_revision());
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            // With -net-config-path the file is the config; etcd's key is not looked at.
            if key == config_key && self.args.net_config_path.is_none() {
                if ev.event_type() == EventType::Delete {
                    warn!("network config {key} was deleted; keeping the current one");
                    continue;
                }
                match NetworkConfig::parse(&String::from_utf8_lossy(kv.value())) {
                    Ok(c) if c == state.config => {}
                    Ok(c) => return Ok(Some(Exit::ConfigChanged(c))),
                    Err(e) => error!(
                        "invalid network config at {key}: {}; keeping the current one",
                        Escaped(&e.to_string())
                    ),
                }
                continue;
            }
            // Events up to the last listing are in it already (a stream can outlive a relisting).
            if !key.starts_with(&prefix) || kv.mod_revision() <= state.listed_at {
                continue;
            }
            changes.push(match ev.event_type() {
                EventType::Delete => {
                    self.rejections.forget(&key);
                    Change::Delete(key)
                }
                EventType::Put => Change::Put(self.store.decode(kv)),
            });
        }
        let own_key = self.store.lease_key(state.own.subnet);
        let own_touched = changes.iter().any(|c| c.key() == own_key);
        let large = changes.len() >= LARGE_BATCH;
        let mut batch = state.peers.batch();
        for c in changes {
            batch.apply(c);
        }
        let diff = batch.finish();
        self.log_diff(state.peers.len(), &diff);
        state.stage(&diff);
        if own_touched {
            if !self.own_still_held(state) {
                warn!(subnet = %state.own.subnet, "this host's lease was deleted or taken over; leasing again");
                // Relists and reconciles the whole set.
                return self.reacquire(state).await.map(|()| None);
            }
            // What peers are judged against may have changed with it: judged all again.
            state.full_at = Instant::now();
        }
        self.sync_kernel(state, false).await;
        if large {
            // Thousands of keys gone at once (junk deleted) leave their memory freed but held.
            release_freed_memory();
        }
        Ok(None)
    }

    /// Replaces a failed data plane with a new one of the same config and makes it match the
    /// desired state, retrying with backoff (and feeding the watchdog) until it works. The old
    /// one is stopped first: its TUN queues and sockets must be free for the new one.
    async fn rebuild(&mut self, state: &mut State) {
        let net = self.network(&state.config);
        let fresh = match Backend::new(&state.config.backend, net) {
            Ok(b) => b,
            // It was built from this config before; nothing else can be done but keep the old.
            Err(e) => return error!("rebuild the data plane: {e}"),
        };
        std::mem::replace(&mut state.backend, fresh)
            .shutdown()
            .await;
        crate::metrics::get().backend(&state.backend, true);
        let own = state.own.to_backend();
        let previous = Some(&own);
        let mut backoff = Backoff::new("rebuild the data plane");
        loop {
            let r = async {
                state.backend.prepare(previous).await?;
                state.backend.configure(&own).await
            };
            match r.await {
                Ok(()) => break,
                Err(e) => {
                    // Nothing retried soon will fix a lasting failure (a foreign flannel0, a
                    // missing capability): wait the longest pause between tries.
                    if !e.is_transient() {
                        backoff.lasting();
                    }
                    backoff.failed(&e).await
                }
            }
        }
        state.last_outcome = None;
        self.reconcile(state).await;
    }

    /// Re-leases after our key vanished (expiry, an operator's delete): the same subnet if free.
    async fn reacquire(&mut self, state: &mut State) -> Result<()> {
        crate::metrics::get().lease_lost();
        loop {
            let previous = state.own.subnet;
            state.own = self
                .acquire(&state.config, &mut state.backend, Some(previous))
                .await?;
            self.publish(state, Some(previous)).await?;
            if self.resync(state).await {
                return Ok(());
            }
        }
    }

    /// Lists everything again and makes the peer set that of the listing (start, compaction,
    /// a new lease). Returns whether this host's lease is still in etcd.
    async fn resync(&mut self, state: &mut State) -> bool {
        crate::metrics::get().resynced();
        let addrs = self.local_addrs().await;
        state.addrs_read = Instant::now();
        let own = self.own_view(&state.own);
        let mut batch = state.peers.batch();
        batch.set_own(own);
        if let Some(a) = addrs {
            batch.set_local_addrs(a);
        }
        // Each page of the listing goes into the peer set as it arrives: 10,000 leases are never
        // held twice (parsed and stored), which would leave the process that much larger.
        let mut backoff = Backoff::new("list leases");
        let revision = loop {
            batch.begin_listing();
            match self.store.list_records_paged(|r| batch.listed(r)).await {
                Ok(revision) => break revision,
                Err(e) => backoff.failed(&format!("{e:#}")).await,
            }
        };
        batch.end_listing();
        state.watch_from = revision + 1;
        state.listed_at = revision;
        let diff = batch.finish();
        self.log_diff(state.peers.len(), &diff);
        // At 10,000 peers a diff names 10,000: not kept through the pass below.
        drop(diff);
        let own_present = self.own_still_held(state);
        if !own_present {
            warn!(subnet = %state.own.subnet, "this host's lease is missing from etcd or no longer its own; leasing again");
        }
        info!(peers = state.peers.len(), revision, "lease listing loaded");
        // A new listing (start, compaction, a new lease) is checked against the whole kernel.
        state.full_at = Instant::now();
        self.sync_kernel(state, false).await;
        own_present
    }

    /// Whether this host's key still holds this host's lease (not deleted, taken over or
    /// overwritten), refreshing `state.own` (and what peers are judged against) from etcd's.
    fn own_still_held(&mut self, state: &mut State) -> bool {
        let key = self.store.lease_key(state.own.subnet);
        match state.peers.get(&key).map(|r| r.value) {
            Some(Ok(l)) if l.attrs.public_ip == self.external.public_ip => state.own = l,
            _ => return false,
        }
        let own = self.own_view(&state.own);
        if own != *state.peers.own() {
            let mut batch = state.peers.batch();
            batch.set_own(own);
            let diff = batch.finish();
            self.log_diff(state.peers.len(), &diff);
        }
        true
    }

    /// What judging peers needs of this host's lease.
    fn own_view(&self, own: &Lease) -> Own {
        Own {
            key: self.store.lease_key(own.subnet),
            subnet: own.subnet,
            vtep_mac: weft_backends::mac::vtep_mac(own.attrs.backend_data.as_ref()).ok(),
        }
    }

    /// An empty peer set for `config`, judged against `own` and the addresses known so far.
    fn peer_set(&self, config: &NetworkConfig, own: &Lease) -> PeerSet {
        let known = [self.external.public_ip, self.external.iface_addr].into();
        PeerSet::new(config.network, config.subnet_len, self.own_view(own), known)
    }

    /// Every IPv4 address of this host, the PublicIP included; `None` when netlink fails (the
    /// addresses known before stay in force).
    async fn local_addrs(&self) -> Option<HashSet<Ipv4Addr>> {
        match weft_backends::iface::local_ipv4_addrs().await {
            Ok(mut addrs) => {
                addrs.extend([self.external.public_ip, self.external.iface_addr]);
                Some(addrs)
            }
            Err(e) => {
                warn!("read this host's addresses: {e}; keeping the ones read before");
                None
            }
        }
    }

    /// Logs what a batch did to the peer set: a lease newly rejected at warn, once per key and
    /// reason; each peer added, changed or removed at info (debug in a batch of more than
    /// [`LOUD_BATCH`] changes); and a summary of the batch at info.
    fn log_diff(&mut self, peers: usize, diff: &Diff) {
        let loud = diff.peer_changes() <= LOUD_BATCH;
        for p in diff.added.iter().chain(&diff.changed) {
            peer_line(loud, "peer added or changed", p);
        }
        for p in &diff.removed {
            peer_line(loud, "peer removed", p);
        }
        crate::metrics::get().rejected(diff.rejected.iter().map(|r| &r.reason));
        self.rejections.say(diff.rejected.iter().map(|r| Rejected {
            key: &r.key,
            reason: r.reason.to_string(),
            holder: r.holder.as_deref(),
            unreadable: matches!(r.reason, Reason::Unreadable(_)),
        }));
        if diff.is_empty() {
            return;
        }
        // The summary stands for the per-peer lines when those went to debug.
        let (added, changed) = (diff.added.len(), diff.changed.len());
        let (removed, rejected) = (diff.removed.len(), diff.rejected.len());
        if loud {
            debug!(added, changed, removed, rejected, peers, "peer set updated");
        } else {
            info!(added, changed, removed, rejected, peers, "peer set updated");
        }
    }

    /// The periodic check (and the answer to drift): reads this host's addresses again now and
    /// then, and brings the kernel in line. When nothing changed and nothing drifted that costs
    /// no netlink request at all; the whole kernel is compared only when drift was seen, an
    /// earlier request failed, or every [`FULL_RESYNC`].
    async fn reconcile(&mut self, state: &mut State) {
        self.rejections.flush();
        // Addresses come and go without an event weft watches: read them again now and then.
        if state.addrs_read.elapsed() >= RESYNC / 2 {
            state.addrs_read = Instant::now();
            if let Some(addrs) = self.local_addrs().await {
                let mut batch = state.peers.batch();
                batch.set_local_addrs(addrs);
                let diff = batch.finish();
                self.log_diff(state.peers.len(), &diff);
                state.stage(&diff);
            }
        }
        self.sync_kernel(state, true).await;
    }

    /// Gives the backend what changed: the staged peer changes alone, applied with targeted
    /// requests; or the whole desired set to compare with the kernel when that is due (a new
    /// listing, every [`FULL_RESYNC`]) or, at a `check` (the periodic one, drift), when the
    /// backend cannot vouch for the kernel (drift seen, a request failed). So a failure costs one
    /// full pass per check at most, never one per event. A check with nothing staged tries again
    /// what earlier passes could not put in place.
    async fn sync_kernel(&mut self, state: &mut State, check: bool) {
        let due = Instant::now() >= state.full_at;
        if due || (check && state.backend.needs_reconcile()) {
            return self.full_pass(state).await;
        }
        if state.pending.is_empty() && !check {
            return;
        }
        let mut changes = PeerChanges::default();
        for (subnet, lease) in std::mem::take(&mut state.pending) {
            match lease {
                Some(l) => changes.upsert.push(l),
                None => changes.remove.push(subnet),
            }
        }
        let started = Instant::now();
        let result = state.backend.apply(&changes).await;
        count_pass(state, started.elapsed(), result.is_ok());
        if changes.is_empty() {
            // Only blocked routes were tried again (each logs when it goes in): a peer the
            // backend refused was not judged again, so success here says nothing of "all".
            if result.is_err() {
                self.log_outcome(state, result, state.peers.len());
            }
            return;
        }
        debug!(
            changes = changes.len(),
            took_us = started.elapsed().as_micros(),
            "peer changes applied"
        );
        self.log_outcome(state, result, state.peers.len());
    }

    /// Makes the kernel match the whole desired state: the backend dumps what it owns and
    /// changes the difference.
    async fn full_pass(&mut self, state: &mut State) {
        state.pending.clear();
        state.full_at = Instant::now() + FULL_RESYNC;
        let started = Instant::now();
        let n = state.peers.len();
        // Each peer's lease is made as the backend reads it, and dropped once planned.
        let result = state.backend.reconcile(state.peers.backend_peers()).await;
        count_pass(state, started.elapsed(), result.is_ok());
        info!(
            peers = n,
            took_ms = started.elapsed().as_millis(),
            "kernel compared with all peers"
        );
        self.log_outcome(state, result, n);
        release_freed_memory();
    }

    /// Logs a pass's outcome when it differs from the last one.
    fn log_outcome(&self, state: &mut State, result: Result<(), ErrorList>, peers: usize) {
        // A good pass is one outcome whatever the peer count: peers coming and going are
        // logged as such, not again as a new outcome each.
        let outcome = match result {
            Ok(()) => String::new(),
            Err(list) => format!("reconcile: {list}"),
        };
        if state.last_outcome.as_deref() != Some(outcome.as_str()) {
            if outcome.is_empty() {
                info!("kernel state matches all {peers} peers");
            } else {
                warn!("{outcome}");
            }
            state.last_outcome = Some(outcome);
        }
    }

    /// flannel's masquerade and forward rules for the current lease.
    fn firewall(&self, state: &State) -> Firewall {
        Firewall {
            network: state.config.network,
            subnet: state.own.subnet,
            masquerade: self.args.ip_masq,
            forward: self.args.iptables_forward_rules,
            fully_random: self.random_fully,
        }
    }

    fn warn_bad(&mut self, bad: &[BadLease]) {
        self.rejections.say(bad.iter().map(|b| Rejected {
            key: &b.key,
            reason: b.reason.clone(),
            holder: None,
            unreadable: true,
        }));
    }
}

/// A pass bringing the kernel in line, in the metrics, with the peers and kernel objects after it.
fn count_pass(state: &State, took: Duration, ok: bool) {
    let metrics = crate::metrics::get();
    metrics.reconciled(took, ok, state.backend.owned());
    metrics.peers_known(state.peers.count_by_type());
}

/// Hands back to the system the memory a large pass freed. glibc keeps freed heap for reuse, so
/// without this a process stays at its peak resident size for life, and a full pass over 10,000
/// peers (a listing, the desired set, kernel dumps) needs several times what weftd keeps.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes no pointer; it only walks the allocator's own free lists.
    unsafe {
        nix::libc::malloc_trim(0);
    }
}

/// One peer's line in the log, at info or (in a large batch) debug.
fn peer_line(loud: bool, what: &str, p: &Peer) {
    let (subnet, public_ip, key) = (p.subnet, p.public_ip, &p.key);
    if loud {
        info!(%subnet, %public_ip, %key, "{what}");
    } else {
        debug!(%subnet, %public_ip, %key, "{what}");
    }
}

/// The next watch response, or never while there is no stream.
async fn next_message(
    stream: &mut Option<WatchStream>,
) -> Result<Option<etcd_client::WatchResponse>, etcd_client::Error> {
    match stream {
        Some(s) => s.message().await,
        None => std::future::pending().await,
    }
}

/// Keeps flannel's firewall rules in place beside the agent loop, checking every `every` and at
/// once when the wanted rules change. Stops when dropped.
struct FirewallSync {
    want: tokio::sync::watch::Sender<Firewall>,
    task: tokio::task::JoinHandle<()>,
}

impl FirewallSync {
    fn spawn(first: Firewall, every: Duration) -> Self {
        let (want, mut wanted) = tokio::sync::watch::channel(first);
        let task = tokio::spawn(async move {
            let mut tick = interval(every);
            tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
            let mut last = "not synced yet".to_string();
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    changed = wanted.changed() => if changed.is_err() { return },
                }
                let firewall = wanted.borrow_and_update().clone();
                let msg = match firewall.sync().await {
                    Ok(written) => {
                        crate::metrics::get().firewall_synced(written);
                        String::new()
                    }
                    Err(e) => e.to_string(),
                };
                if msg != last {
                    if msg.is_empty() {
                        info!("firewall rules in place");
                    } else {
                        warn!("firewall rules: {msg}");
                    }
                    last = msg;
                }
            }
        });
        Self { want, task }
    }

    /// The rules wanted now (a new lease, a new network).
    fn want(&self, firewall: Firewall) {
        self.want.send_if_modified(|current| {
            let changed = *current != firewall;
            *current = firewall;
            changed
        });
    }
}

impl Drop for FirewallSync {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// When to renew: `margin` minutes before expiry as flannel does, or at a third of the TTL when
/// the margin does not fit inside it. Saturating: any margin and TTL give an interval.
pub fn renew_interval(ttl: Duration, margin_minutes: u64) -> Duration {
    let margin = Duration::from_secs(margin_minutes.saturating_mul(60));
    match ttl.checked_sub(margin) {
        Some(left) if !left.is_zero() => left,
        _ => ttl / 3,
    }
}

/// Retries an etcd call until it succeeds, backing off, logging each failure once per change.
/// Each try and each pause is bounded, so the watchdog stays fed while etcd is away.
async fn retry<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut backoff = Backoff::new(what);
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) => backoff.failed(&format!("{e:#}")).await,
        }
    }
}

/// Waits between retries of `what`, doubling up to [`MAX_BACKOFF`], and logs a failure only when
/// it differs from the one before (no line repeated in a loop).
struct Backoff<'a> {
    what: &'a str,
    delay: Duration,
    last: String,
}

impl<'a> Backoff<'a> {
    const FIRST: Duration = Duration::from_millis(250);

    fn new(what: &'a str) -> Self {
        Self {
            what,
            delay: Self::FIRST,
            last: String::new(),
        }
    }

    /// Logs a failure (unless it repeats the one before) and says how long to wait before the
    /// next try.
    fn delay_after(&mut self, e: &dyn std::fmt::Display) -> Duration {
        let msg = format!("{}: {e}", self.what);
        if msg != self.last {
            warn!("{msg}; retrying");
            self.last = msg;
        }
        let delay = self.delay;
        self.delay = (self.delay * 2).min(MAX_BACKOFF);
        delay
    }

    /// Logs a failure and waits before the next try.
    async fn failed(&mut self, e: &dyn std::fmt::Display) {
        let delay = self.delay_after(e);
        notify::pause(delay).await;
    }

    /// The failure will not pass by itself: wait the longest pause from now on.
    fn lasting(&mut self) {
        self.delay = MAX_BACKOFF;
    }

    /// A try worked: the next failure starts from the shortest wait. Whether tries had failed.
    fn succeeded(&mut self) -> bool {
        self.delay = Self::FIRST;
        !std::mem::take(&mut self.last).is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_happens_margin_before_expiry_or_at_a_third() {
        assert_eq!(
            renew_interval(Duration::from_secs(86400), 60),
            Duration::from_secs(82800)
        );
        assert_eq!(
            renew_interval(Duration::from_secs(6), 60),
            Duration::from_secs(2)
        );
        assert_eq!(
            renew_interval(Duration::from_secs(3600), 60),
            Duration::from_secs(1200),
            "a margin as long as the TTL does not fit"
        );
    }

    #[test]
    fn renewal_never_overflows_whatever_the_margin() {
        let ttl = Duration::from_secs(9_000_000_000);
        assert_eq!(renew_interval(ttl, u64::MAX), ttl / 3);
        assert_eq!(renew_interval(ttl, u64::MAX / 60 + 1), ttl / 3);
        assert_eq!(renew_interval(Duration::MAX, 0), Duration::MAX);
        assert_eq!(renew_interval(Duration::ZERO, 5), Duration::ZERO);
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_and_starts_over_after_a_success() {
        let mut b = Backoff::new("etcd watch broken");
        let waits: Vec<Duration> = (0..8).map(|_| b.delay_after(&"refused")).collect();
        assert_eq!(waits[0], Duration::from_millis(250));
        assert_eq!(waits[1], Duration::from_millis(500));
        assert_eq!(waits[5], Duration::from_secs(8));
        assert_eq!(waits[6], MAX_BACKOFF, "capped");
        assert_eq!(waits[7], MAX_BACKOFF);
        assert!(b.succeeded(), "there were failures to recover from");
        assert!(!b.succeeded(), "nothing failed since");
        assert_eq!(b.delay_after(&"refused"), Duration::from_millis(250));
    }
}
