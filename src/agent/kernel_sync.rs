//! From the desired peer set to the kernel (or the userspace data plane): staged changes applied
//! with targeted requests, a full comparison when one is due, the outcome logged only when it
//! changes; and a failed data plane rebuilt.

use std::time::Duration;

use tokio::time::Instant;
use tracing::{debug, error, info, warn};
use weft_backends::{Backend, ErrorList, PeerChanges};

use super::{release_freed_memory, Agent, State, FULL_RESYNC, RESYNC};
use crate::retry::Backoff;

impl Agent {
    /// Replaces a failed data plane with a new one of the same config and makes it match the
    /// desired state, retrying with backoff (and feeding the watchdog) until it works. The old
    /// one is stopped first: its TUN queues and sockets must be free for the new one. Returns
    /// whether the new one publishes other data than this host's lease holds (wireguard's key
    /// file replaced meanwhile): then the lease must be published again, or peers would keep
    /// dialling a key this host no longer has.
    pub(super) async fn rebuild(&mut self, state: &mut State) -> bool {
        let net = self.network(&state.config);
        let fresh = match Backend::new(&state.config.backend, net) {
            Ok(b) => b,
            // It was built from this config before; nothing else can be done but keep the old.
            Err(e) => {
                error!("rebuild the data plane: {e}");
                return false;
            }
        };
        std::mem::replace(&mut state.backend, fresh)
            .shutdown()
            .await;
        crate::metrics::get().backend(&state.backend, true);
        let own = state.own.to_backend();
        let previous = Some(&own);
        let mut backoff = Backoff::new("rebuild the data plane");
        let data = loop {
            let r = async {
                let data = state.backend.prepare(previous).await?;
                state.backend.configure(&own).await.map(|()| data)
            };
            match r.await {
                Ok(data) => break data,
                Err(e) => {
                    // Nothing retried soon will fix a lasting failure (a foreign flannel0, a
                    // missing capability): wait the longest pause between tries.
                    if !e.is_transient() {
                        backoff.lasting();
                    }
                    backoff.failed(&e).await
                }
            }
        };
        state.last_outcome = None;
        self.reconcile(state).await;
        // Either side's data (vxlan: a new device, a new VTEP MAC) changed: the lease tells.
        let data6 = state.config.ipv6.and(state.backend.backend_v6_data());
        data != state.published.backend_data || data6 != state.published.backend_v6_data
    }

    /// The periodic check (and the answer to drift): reads this host's addresses again now and
    /// then, and brings the kernel in line. When nothing changed and nothing drifted that costs
    /// no netlink request at all; the whole kernel is compared only when drift was seen, an
    /// earlier request failed, or every [`FULL_RESYNC`].
    pub(super) async fn reconcile(&mut self, state: &mut State) {
        self.rejections.flush();
        // Addresses come and go without an event weft watches: read them again now and then.
        if state.addrs_read.elapsed() >= RESYNC / 2 {
            state.addrs_read = Instant::now();
            if let Some(addrs) = self.local_addrs().await {
                let mut edit = state.peers.edit();
                edit.set_local_addrs(addrs);
                let diff = edit.finish();
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
    pub(super) async fn sync_kernel(&mut self, state: &mut State, check: bool) {
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
    pub(super) async fn full_pass(&mut self, state: &mut State) {
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
    pub(super) fn log_outcome(
        &self,
        state: &mut State,
        result: Result<(), ErrorList>,
        peers: usize,
    ) {
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
}

/// A pass bringing the kernel in line, in the metrics, with the peers and kernel objects after it.
fn count_pass(state: &State, took: Duration, ok: bool) {
    let metrics = crate::metrics::get();
    metrics.reconciled(took, ok, state.backend.programmed());
    metrics.peers_known(state.peers.count_by_type());
}
