//! The agent loop. Data flows one way: store events → desired state (own lease + peers) → a
//! reconcile pass → the kernel. A watch event costs what it changes: the peers it touched are
//! handed to the backend as changes, applied with targeted requests. Every other path (start,
//! missed events, compaction, a lost lease, drift, a periodic check) ends in the same place: a
//! fresh desired state handed whole to the backend, which compares it with the kernel.
//!
//! Files along that flow: `config_wait` (a config this host can run), `leasing` (this host's
//! lease), `peer_sync` (records → peer set), `kernel_sync` (peer set → data plane),
//! `firewall_sync` (flannel's iptables rules, beside the loop); this file holds the loop.

mod config_wait;
mod firewall_sync;
mod kernel_sync;
mod leasing;
mod peer_sync;

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result};
use ipnet::Ipv4Net;
use tokio::time::{interval, Instant, MissedTickBehavior};
use tracing::{error, info, warn};
use weft_backends::firewall::Firewall;
use weft_backends::{Backend, Event, ExternalInterface, InterfaceSelector, Network};

use crate::config::NetworkConfig;
use crate::flags::DaemonArgs;
use crate::health::{self, Readiness};
use crate::lease::{Lease, LeaseAttrs};
use crate::notify;
use crate::peers::{Diff, PeerSet};
use crate::registry::{Position, Registry, Update, Watch};
use crate::rejection_log::RejectionLog;
use crate::retry::{retry, Backoff};
use crate::subnet_env;
use firewall_sync::FirewallSync;

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

/// Runs weftd until the future is dropped (on a signal; dropping stops the data plane's workers,
/// and the kernel state it leaves is in `health.kept()`). Returns only on fatal errors.
pub async fn run(args: DaemonArgs, ready: Readiness) -> Result<()> {
    let regexes = args
        .iface_regex
        .iter()
        .map(|r| regex::Regex::new(r).with_context(|| format!("-iface-regex {r:?}")))
        .collect::<Result<_>>()?;
    if args.healthz_port != 0 {
        health::serve((args.healthz_ip, args.healthz_port).into(), ready.clone()).await?;
    }
    let store = if args.kube.kube_subnet_mgr {
        "connect to the Kubernetes API"
    } else {
        "connect to etcd"
    };
    let registry = retry(store, || Registry::connect_daemon(&args)).await;
    // flanneld in kube mode takes `<prefix>/node-public-ip` and `node-public-ipv6` on its Node
    // as -public-ip and -public-ipv6 (here the flags, when given, win).
    let (public_ip, public_ipv6) = match &registry {
        Registry::Kube(k) if args.public_ip.is_none() || args.public_ipv6.is_none() => {
            let (v4, v6) = k.node_public_ips().await;
            (args.public_ip.or(v4), args.public_ipv6.or(v6))
        }
        _ => (args.public_ip, args.public_ipv6),
    };
    let selector = InterfaceSelector {
        ifaces: args.iface.clone(),
        can_reach: args.iface_can_reach,
        regexes,
        public_ip,
        public_ipv6,
    };
    let external = selector.select().await.context("choose the interface")?;
    info!(iface = %external.name, addr = %external.iface_addr, public_ip = %external.public_ip,
          public_ipv6 = ?external.public_ipv6.map(|a| a.to_string()), mtu = external.mtu,
          "using interface");

    // Probed once, as flanneld does: an iptables older than 1.6.2 refuses the flag.
    let random_fully = args.ip_masq
        && !args.ip_masq_fully_random_disable
        && weft_backends::firewall::supports_random_fully().await;
    if args.ip_masq && !args.ip_masq_fully_random_disable && !random_fully {
        warn!("iptables does not support --random-fully; masquerading without it");
    }
    let mut agent = Agent {
        args,
        registry,
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
    registry: Registry,
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
    /// What this host published in its lease record (the store's copy may be changed by others).
    published: LeaseAttrs,
    /// Every lease record of the store, and the peers accepted from them.
    peers: PeerSet,
    /// Changes of the records after the last listing.
    watch: Watch,
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
    pub(super) fn stage(&mut self, diff: &Diff) {
        // Removals first: a lease that moved to another key in one batch (its IPv6 side added
        // or dropped, one transaction) is one key removed and one added for the same subnet,
        // and the peer stays.
        for p in &diff.removed {
            self.pending.insert(p.subnet, None);
        }
        for p in diff.added.iter().chain(&diff.changed) {
            let lease = self.peers.backend_peer(&p.key);
            self.pending.insert(p.subnet, lease);
        }
    }
}

impl Agent {
    fn network(&self, config: &NetworkConfig) -> Network {
        Network {
            network: config.network,
            network_v6: config.ipv6.map(|p| p.network),
            external: self.external.clone(),
        }
    }

    async fn run_network(&mut self, config: &NetworkConfig) -> Result<Exit> {
        let mut backend = match Backend::new(&config.backend, self.network(config)) {
            Ok(b) => b,
            Err(e) => {
                error!(
                    "invalid network config at {}: Backend: {e}",
                    self.registry.names().config()
                );
                return Ok(Exit::BadConfig);
            }
        };
        self.ready.set_kept(backend.survives_restart());
        self.registry.follow_peers(backend.follows_peers());
        crate::metrics::get().backend(&backend, false);
        let hint = subnet_env::previous_subnets(&self.args.subnet_file);
        let own = self.acquire(config, &mut backend, hint).await?;
        let mut state = State {
            config: config.clone(),
            backend,
            peers: self.peer_set(config, &own),
            published: own.attrs.clone(),
            own,
            watch: self.registry.watch(Position::default()),
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

    /// Every await here ends on its own (etcd calls and pauses are bounded, see `notify`), and
    /// the firewall, whose commands may wait 30 s on the xtables lock, is synced beside the loop.
    /// So the loop comes round often, and that is what feeds systemd's watchdog.
    async fn main_loop(&mut self, mut state: State) -> Result<Exit> {
        let mut resync = interval(RESYNC);
        resync.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut idle = interval(notify::idle_tick().unwrap_or(RESYNC));
        idle.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let renew_every = crate::lease::renew_interval(
            self.args.subnet_lease_ttl,
            self.args.subnet_lease_renew_margin,
        );
        let mut renew_at = Instant::now() + renew_every;
        let mut renew_backoff = Backoff::new("renew this host's lease");
        let firewall = (self.args.ip_masq || self.args.iptables_forward_rules).then(|| {
            let every = Duration::from_secs(self.args.iptables_resync.max(1));
            FirewallSync::spawn(self.firewall(&state), every)
        });
        loop {
            notify::progress();
            if let Some(f) = &firewall {
                f.want(self.firewall(&state));
            }
            tokio::select! {
                update = state.watch.next() => match update {
                    Update::Events(events) => {
                        if let Some(exit) = self.apply_events(&mut state, events).await? {
                            drop(firewall);
                            match &exit {
                                Exit::ConfigChanged(next)
                                    if state.config.differs_only_in_ipv6(next) =>
                                {
                                    self.change_ipv6(state, next).await;
                                }
                                _ => self.leave_network(state).await,
                            }
                            return Ok(exit);
                        }
                    }
                    Update::FellBehind => {
                        if !self.resync(&mut state).await {
                            self.reacquire(&mut state).await?;
                        }
                    }
                    Update::Stuck(why) => self.relist_stuck_watch(&mut state, why).await?,
                },
                _ = tokio::time::sleep_until(renew_at), if !state.own.is_reservation() => {
                    let next = self.renew(&mut state, &mut renew_backoff, renew_every).await?;
                    renew_at = Instant::now() + next;
                }
                _ = resync.tick() => self.reconcile(&mut state).await,
                ev = state.backend.event() => match ev {
                    Event::Drift => self.reconcile(&mut state).await,
                    Event::Failed(why) => {
                        error!("data plane failed: {why}; rebuilding it");
                        self.ready.set_failed(true);
                        let changed = self.rebuild(&mut state).await;
                        self.ready.set_failed(false);
                        info!("data plane rebuilt");
                        if changed {
                            info!("its BackendData changed (a new key file?): publishing it");
                            self.republish(&mut state).await?;
                        }
                    }
                },
                _ = idle.tick() => {}
            }
        }
    }

    /// The watch cannot get past where it is (a response larger than weft receives, or breaks
    /// with nothing delivered): the desired state comes from a fresh listing instead, diffed
    /// against the peer set, and the watch goes on from past it. Until the listing is in,
    /// /readyz says why weftd is not following the store.
    async fn relist_stuck_watch(&mut self, state: &mut State, why: String) -> Result<()> {
        warn!("{why}; listing again");
        self.ready.set_stalled(Some(why));
        if !self.resync(state).await {
            self.reacquire(state).await?;
        }
        self.ready.set_stalled(None);
        Ok(())
    }

    /// flannel's masquerade and forward rules for the current lease.
    fn firewall(&self, state: &State) -> Firewall {
        Firewall {
            network: state.config.network,
            subnet: state.own.subnet,
            ipv6: (state.config.ipv6.map(|p| p.network)).zip(state.own.ipv6_subnet),
            masquerade: self.args.ip_masq,
            forward: self.args.iptables_forward_rules,
            fully_random: self.random_fully,
        }
    }
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
