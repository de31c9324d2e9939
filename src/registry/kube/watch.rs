//! The Node watch as the agent sees it: batches of lease changes in the API's order, set up
//! again from the last resourceVersion seen (bookmarks keep it fresh) whenever the server ends
//! it, and word when that history is gone (410) so the agent lists again and diffs, as after
//! an etcd compaction.

use std::pin::Pin;
use std::time::Duration;

use futures::{Future, FutureExt, Stream, StreamExt};
use http::Request;
use kube::core::WatchEvent;
use serde_json::value::RawValue;
use tokio::time::Instant;
use tracing::{info, warn};

use super::{api_error, is_gone, node, KubeStore, Node};
use crate::escape::Escaped;
use crate::lease::Change;
use crate::registry::{Event, Update};
use crate::retry::Backoff;

/// How long the server keeps one watch open before ending it (it is then set up again). Short,
/// as a watch is cheap to set up again, and a connection whose server vanished without a word
/// is given up on soon after (the client's read timeout is this and half a minute).
pub(super) const WATCH_SECS: Duration = Duration::from_secs(60);
/// Events taken into one batch at most, when they arrive together.
const MAX_BATCH: usize = 1000;

type Events = Pin<Box<dyn Stream<Item = Result<WatchEvent<Box<RawValue>>, kube::Error>> + Send>>;
type Opening = Pin<Box<dyn Future<Output = Result<Events, kube::Error>> + Send>>;

pub struct KubeWatch {
    store: KubeStore,
    stream: Option<Events>,
    /// The watch request in flight, kept across `next` calls: a watch being set up when
    /// another branch of the agent's loop wins is not asked for again.
    opening: Option<Opening>,
    /// The resourceVersion to watch from: the listing's, then each event's and bookmark's.
    from: String,
    /// When the current watch was set up: one the server ends at once is backed off from.
    opened_at: Instant,
    rewatch_at: Instant,
    backoff: Backoff<'static>,
}

impl KubeWatch {
    pub fn new(store: KubeStore, listed_at: i64) -> Self {
        Self {
            store,
            stream: None,
            opening: None,
            from: listed_at.to_string(),
            opened_at: Instant::now(),
            rewatch_at: Instant::now(),
            backoff: Backoff::new("Kubernetes node watch broken"),
        }
    }

    pub fn listed(&mut self, at: i64) {
        self.from = at.to_string();
        self.restart();
    }

    pub fn restart(&mut self) {
        self.stream = None;
        self.opening = None;
        self.rewatch_at = Instant::now();
    }

    /// The watch request from `self.from`, bounded in time.
    fn open(&self) -> Opening {
        let path = format!(
            "/api/v1/nodes?watch=1&allowWatchBookmarks=true&timeoutSeconds={}&resourceVersion={}{}",
            WATCH_SECS.as_secs(),
            super::query(&self.from),
            self.store.selector()
        );
        let client = self.store.client.clone();
        Box::pin(async move {
            let req = Request::get(path)
                .body(Vec::new())
                .map_err(kube::Error::HttpError)?;
            let open = client.request_events::<Box<RawValue>>(req);
            match tokio::time::timeout(super::REQUEST_TIMEOUT, open).await {
                Ok(r) => r.map(|s| Box::pin(s) as Events),
                Err(_) => Err(kube::Error::Service(
                    "no answer to the watch request".into(),
                )),
            }
        })
    }

    /// Cancel-safe, as the agent's loop needs: a watch being set up when another branch wins is
    /// waited for again next time (the request stays in flight), and an event is taken whole or
    /// not at all.
    pub async fn next(&mut self) -> Update {
        loop {
            let Some(stream) = &mut self.stream else {
                tokio::time::sleep_until(self.rewatch_at).await;
                let opening = match &mut self.opening {
                    Some(o) => o,
                    None => self.opening.insert(self.open()),
                };
                let opened = opening.await;
                self.opening = None;
                match opened {
                    Ok(s) => {
                        if self.backoff.succeeded() {
                            info!("Kubernetes node watch re-established");
                        }
                        self.stream = Some(s);
                        self.opened_at = Instant::now();
                    }
                    Err(e) if is_gone(&e) => return self.gone(),
                    Err(e) => self.broken(&format!("{:#}", api_error(e))),
                }
                continue;
            };
            let Some(first) = stream.next().await else {
                // The server ended it (timeoutSeconds): go on from the last version seen, at
                // once unless it ended as soon as it began.
                if self.opened_at.elapsed() < Duration::from_secs(1) {
                    self.broken("the API server ended the watch at once");
                } else {
                    self.stream = None;
                    self.rewatch_at = Instant::now();
                }
                continue;
            };
            let mut events = Vec::new();
            let mut item = Some(first);
            while let Some(it) = item.take() {
                match it {
                    Ok(ev) => {
                        if let Some(update) = self.take(ev, &mut events) {
                            return update;
                        }
                    }
                    Err(e) => {
                        self.broken(&format!("{:#}", api_error(e)));
                        break;
                    }
                }
                if events.len() >= MAX_BATCH {
                    break;
                }
                // What has arrived already goes into the same batch.
                let Some(stream) = &mut self.stream else {
                    break;
                };
                item = stream.next().now_or_never().flatten();
            }
            return Update::Events(events);
        }
    }

    /// Folds one event in; an update to return at once when the watch cannot go on.
    fn take(&mut self, ev: WatchEvent<Box<RawValue>>, out: &mut Vec<Event>) -> Option<Update> {
        let (raw, deleted) = match ev {
            WatchEvent::Added(r) | WatchEvent::Modified(r) => (r, false),
            WatchEvent::Deleted(r) => (r, true),
            WatchEvent::Bookmark(b) => {
                self.from = b.metadata.resource_version;
                return None;
            }
            WatchEvent::Error(s) if s.code == 410 => return Some(self.gone()),
            WatchEvent::Error(s) => {
                self.broken(&format!("{} ({})", Escaped(&s.message), s.code));
                return None;
            }
        };
        let node: Node = match serde_json::from_str(raw.get()) {
            Ok(n) => n,
            Err(e) => {
                warn!("a node the API sent cannot be read: {e}; skipped");
                return None;
            }
        };
        if !node.metadata.resource_version.is_empty() {
            self.from.clone_from(&node.metadata.resource_version);
        }
        let name = node.metadata.name.clone();
        out.push(Event::Lease(
            match node::seen(&node, &self.store.annotations) {
                node::Seen::Lease(r) if !deleted => Change::Put(r),
                // Not (or no longer) a lease, or gone: the peer set forgets it if it knew it.
                _ => Change::Delete(name),
            },
        ));
        None
    }

    fn gone(&mut self) -> Update {
        info!("the Kubernetes node watch's history is gone (410); listing again");
        self.stream = None;
        Update::FellBehind
    }

    fn broken(&mut self, why: &str) {
        self.stream = None;
        self.rewatch_at = Instant::now() + self.backoff.delay_after(&why);
    }
}
