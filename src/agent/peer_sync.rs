//! From the store's records to the desired peer set: a fresh listing, or a batch of watch
//! events, folded into the peer set; what changed is staged for the data plane and logged.

use std::collections::HashSet;
use std::net::IpAddr;

use anyhow::Result;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use super::{release_freed_memory, Agent, Exit, State, LARGE_BATCH, LOUD_BATCH};
use crate::config::NetworkConfig;
use crate::escape::Escaped;
use crate::lease::{BadLease, Change, Lease};
use crate::peers::{Diff, Ipv6Scope, Own, Peer, PeerSet, Reason};
use crate::registry::Event;
use crate::rejection_log::{Rejected, RejectionLog};
use crate::retry::Backoff;

impl Agent {
    /// Folds a batch of watch events into the desired state, then reconciles once for the
    /// whole batch.
    pub(super) async fn apply_events(
        &mut self,
        state: &mut State,
        events: Vec<Event>,
    ) -> Result<Option<Exit>> {
        let mut changes = Vec::new();
        for ev in events {
            let change = match ev {
                Event::Lease(c) => c,
                // With -net-config-path the file is the config; the store's is not looked at.
                Event::Config(_) if self.args.net_config_path.is_some() => continue,
                Event::Config(None) => {
                    let key = self.registry.names().config();
                    warn!("network config {key} was deleted; keeping the current one");
                    continue;
                }
                Event::Config(Some(text)) => {
                    match NetworkConfig::parse(&text) {
                        Ok(c) if c == state.config => {}
                        Ok(c) => return Ok(Some(Exit::ConfigChanged(c))),
                        Err(e) => error!(
                            "invalid network config at {}: {}; keeping the current one",
                            self.registry.names().config(),
                            Escaped(&e.to_string())
                        ),
                    }
                    continue;
                }
            };
            if let Change::Delete(key) = &change {
                self.rejections.forget(key);
            }
            changes.push(change);
        }
        let own_key = self.registry.own_key(&state.own);
        let own_touched = changes.iter().any(|c| c.key() == own_key);
        let large = changes.len() >= LARGE_BATCH;
        let mut edit = state.peers.edit();
        for c in changes {
            edit.apply(c);
        }
        let diff = edit.finish();
        self.log_diff(state.peers.len(), &diff);
        state.stage(&diff);
        if own_touched {
            let before = state.own.clone();
            if !self.own_still_held(state) {
                warn!(subnet = %state.own.subnet, "this host's lease was deleted or taken over; leasing again");
                // Relists and reconciles the whole set.
                return self.reacquire(state).await.map(|()| None);
            }
            // What peers are judged against may have changed with it: judged all again. Only
            // then: a Node's status is written every few minutes with the lease unchanged.
            if state.own != before {
                state.full_at = Instant::now();
            }
        }
        self.sync_kernel(state, false).await;
        if large {
            // Thousands of keys gone at once (junk deleted) leave their memory freed but held.
            release_freed_memory();
        }
        Ok(None)
    }

    /// Lists everything again and makes the peer set that of the listing (start, compaction,
    /// a new lease). Returns whether this host's lease is still in the store.
    pub(super) async fn resync(&mut self, state: &mut State) -> bool {
        crate::metrics::get().resynced();
        let addrs = self.local_addrs().await;
        state.addrs_read = Instant::now();
        let own = self.own_view(&state.own);
        let mut edit = state.peers.edit();
        edit.set_own(own);
        if let Some(a) = addrs {
            edit.set_local_addrs(a);
        }
        // Each page of the listing goes into the peer set as it arrives: 10,000 leases are never
        // held twice (parsed and stored), which would leave the process that much larger.
        let mut backoff = Backoff::new("list leases");
        let at = loop {
            edit.begin_listing();
            match self.registry.list_records(|r| edit.listed(r)).await {
                Ok(at) => break at,
                Err(e) => backoff.failed(&format!("{e:#}")).await,
            }
        };
        edit.end_listing();
        state.watch.listed(at);
        let diff = edit.finish();
        self.log_diff(state.peers.len(), &diff);
        // At 10,000 peers a diff names 10,000: not kept through the pass below.
        drop(diff);
        let own_present = self.own_still_held(state);
        if !own_present {
            warn!(subnet = %state.own.subnet, "this host's lease is missing from the store or no longer its own; leasing again");
        }
        info!(peers = state.peers.len(), %at, "lease listing loaded");
        // A new listing (start, compaction, a new lease) is checked against the whole kernel.
        state.full_at = Instant::now();
        self.sync_kernel(state, false).await;
        own_present
    }

    /// Whether this host's key still holds this host's lease (not deleted, taken over or
    /// overwritten), refreshing `state.own` (and what peers are judged against) from the store's.
    pub(super) fn own_still_held(&mut self, state: &mut State) -> bool {
        let key = self.registry.own_key(&state.own);
        match state.peers.get(&key).map(|r| r.value) {
            Some(Ok(l)) if self.registry.still_ours(&l, &state.published) => state.own = l,
            _ => return false,
        }
        let own = self.own_view(&state.own);
        if own != *state.peers.own() {
            let mut edit = state.peers.edit();
            edit.set_own(own);
            let diff = edit.finish();
            self.log_diff(state.peers.len(), &diff);
        }
        true
    }

    /// What judging peers needs of this host's lease.
    pub(super) fn own_view(&self, own: &Lease) -> Own {
        Own {
            ipv6_subnet: own.ipv6_subnet,
            key: self.registry.own_key(own),
            subnet: own.subnet,
            identity: own.identity(),
            identity6: own.identity6(),
        }
    }

    /// An empty peer set for `config`, judged against `own` and the addresses known so far.
    pub(super) fn peer_set(&self, config: &NetworkConfig, own: &Lease) -> PeerSet {
        let e = &self.external;
        let known = [e.public_ip, e.iface_addr].map(IpAddr::V4).into_iter();
        let known = known.chain(
            [e.public_ipv6, e.iface_addr6]
                .into_iter()
                .flatten()
                .map(IpAddr::V6),
        );
        let scope = config.ipv6.map(|p| Ipv6Scope {
            network: p.network,
            subnet_len: p.subnet_len,
        });
        PeerSet::new(
            config.network,
            config.subnet_len,
            self.own_view(own),
            known.collect(),
        )
        .with_ipv6(scope)
    }

    /// Every address of this host, the PublicIPs included; `None` when netlink fails (the
    /// addresses known before stay in force).
    pub(super) async fn local_addrs(&self) -> Option<HashSet<IpAddr>> {
        match weft_backends::iface::local_addrs().await {
            Ok(mut addrs) => {
                let e = &self.external;
                addrs.extend([e.public_ip, e.iface_addr].map(IpAddr::V4));
                addrs.extend(e.public_ipv6.map(IpAddr::V6));
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
    pub(super) fn log_diff(&mut self, peers: usize, diff: &Diff) {
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
}

/// Says (once each) what records cannot be read.
pub(super) fn warn_bad(rejections: &mut RejectionLog, bad: &[BadLease]) {
    rejections.say(bad.iter().map(|b| Rejected {
        key: &b.key,
        reason: b.reason.clone(),
        holder: None,
        unreadable: true,
    }));
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
