//! flannel's masquerade and forward rules kept in place beside the agent loop, whose commands
//! may wait 30 s on the xtables lock: the loop itself never waits on them.

use std::time::Duration;

use tokio::time::{interval, MissedTickBehavior};
use tracing::{info, warn};
use weft_backends::firewall::Firewall;

/// Keeps flannel's firewall rules in place beside the agent loop, checking every `every` and at
/// once when the wanted rules change. Stops when dropped.
pub(super) struct FirewallSync {
    want: tokio::sync::watch::Sender<Firewall>,
    task: tokio::task::JoinHandle<()>,
}

impl FirewallSync {
    pub(super) fn spawn(first: Firewall, every: Duration) -> Self {
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
    pub(super) fn want(&self, firewall: Firewall) {
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
