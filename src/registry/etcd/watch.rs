//! The etcd watch as the agent sees it: batches of changes under the prefix, in revision order,
//! set up again whenever it breaks; and word when it cannot go on from where it is, so the
//! agent lists again instead of watching from a revision that fails every time.

use etcd_client::{EventType, WatchResponse, WatchStream};
use tokio::time::Instant;
use tracing::info;

use super::EtcdStore;
use crate::escape::Escaped;
use crate::lease::Change;
use crate::registry::{Event, Update};
use crate::retry::Backoff;

/// Breaks of an established watch with no event received in between after which the watch
/// stops going on from the revision it is stuck at (a break that says the response was too large
/// to receive stops it at once).
const STUCK_BREAKS: u32 = 2;

pub struct EtcdWatch {
    store: EtcdStore,
    stream: Option<WatchStream>,
    /// Next revision to watch from.
    from: i64,
    /// The revision of the last full listing: events up to it are in it already.
    listed_at: i64,
    /// When to set the watch up again, while there is none.
    rewatch_at: Instant,
    backoff: Backoff<'static>,
    /// Breaks of an established watch since it last delivered an event.
    stuck: u32,
}

impl EtcdWatch {
    pub fn new(store: EtcdStore, listed_at: i64) -> Self {
        Self {
            store,
            stream: None,
            from: listed_at + 1,
            listed_at,
            rewatch_at: Instant::now(),
            backoff: Backoff::new("etcd watch broken"),
            stuck: 0,
        }
    }

    pub fn listed(&mut self, revision: i64) {
        self.from = revision + 1;
        self.listed_at = revision;
    }

    pub fn restart(&mut self) {
        self.stream = None;
        self.rewatch_at = Instant::now();
    }

    /// Every await here is cancel-safe: a watch being set up when another branch of the
    /// agent's loop wins is set up again next time, and a response is taken whole or not at all.
    pub async fn next(&mut self) -> Update {
        loop {
            let Some(stream) = &mut self.stream else {
                tokio::time::sleep_until(self.rewatch_at).await;
                match self.store.watch(self.from).await {
                    Ok(s) => {
                        if self.backoff.succeeded() {
                            info!("etcd watch re-established");
                            crate::metrics::get().etcd_reconnected();
                        }
                        self.stream = Some(s);
                    }
                    Err(e) => self.broken(&format!("{e:#}")),
                }
                continue;
            };
            let msg = stream.message().await;
            match msg {
                Ok(Some(resp)) if resp.canceled() || resp.compact_revision() > 0 => {
                    info!(
                        compacted = resp.compact_revision(),
                        "watch fell behind etcd compaction; listing again"
                    );
                    self.stream = None;
                    return Update::FellBehind;
                }
                Ok(Some(resp)) => {
                    if !resp.events().is_empty() {
                        self.stuck = 0;
                    }
                    return Update::Events(self.events(&resp));
                }
                Ok(None) | Err(_) => {
                    // A member that lost its leader cancels the watch ("no leader"): watch
                    // again, through whichever member answers.
                    let too_large = matches!(&msg, Err(e) if super::rpc::too_large(e));
                    let why = match msg {
                        Err(e) => e.to_string(),
                        _ => "stream ended".into(),
                    };
                    self.broken(&why);
                    self.stuck += 1;
                    if too_large || self.stuck >= STUCK_BREAKS {
                        // Watching from the same revision would fail the same way: the agent
                        // lists instead, and the watch goes on from past the listing.
                        self.stuck = 0;
                        return Update::Stuck(format!(
                            "the etcd watch cannot get past revision {}: {}",
                            self.from,
                            Escaped(&why)
                        ));
                    }
                }
            }
        }
    }

    /// The watch is gone: set it up again after a pause, logging the failure once per change.
    fn broken(&mut self, why: &str) {
        self.stream = None;
        self.rewatch_at = Instant::now() + self.backoff.delay_after(&why);
    }

    /// The changes a response carries that the agent has not seen: the config, and lease keys
    /// changed after the last listing (a stream can outlive a relisting).
    fn events(&mut self, resp: &WatchResponse) -> Vec<Event> {
        crate::metrics::get().watch_events(resp.events().len());
        let names = self.store.names();
        let config = names.config();
        let subnets = names.subnets();
        let mut events = Vec::new();
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            // Not past it: the rest of this revision may come in the next fragment, and after a
            // break the watch starts again at its beginning (its events apply again harmlessly).
            self.from = self.from.max(kv.mod_revision());
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            let deleted = ev.event_type() == EventType::Delete;
            if key == config {
                let text = (!deleted).then(|| String::from_utf8_lossy(kv.value()).into_owned());
                events.push(Event::Config(text));
            } else if key.starts_with(&subnets) && kv.mod_revision() > self.listed_at {
                events.push(Event::Lease(if deleted {
                    Change::Delete(key)
                } else {
                    Change::Put(self.store.decode(kv))
                }));
            }
        }
        events
    }
}
