//! What weftd says about leases it skips (unreadable) or rejects (invalid, contended): each key
//! once per reason, a line each for the first [`LOUD`] of a [`WINDOW`], the rest at debug and
//! summed up in one line when the window ends. Anyone with etcd
//! credentials chooses how many such keys there are and what they hold, so the memory of what
//! was said is bounded (hashes, not keys, and at most [`REMEMBERED`] of them) and forgets a key
//! when it is deleted; every key and reason is printed escaped and clipped.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::time::Duration;

use tokio::time::Instant;

use tracing::{debug, warn};

use crate::escape::clip;

/// How many (key, reason) pairs are remembered as said. At the bound everything is forgotten,
/// so at worst a rejection is said again after this many others.
pub const REMEMBERED: usize = 16_384;
/// Rejections said at warn per [`WINDOW`]; the rest go to debug and into a summary line.
pub const LOUD: usize = 20;
pub const WINDOW: Duration = Duration::from_secs(10);
/// Longest key or reason printed whole.
const CLIP: usize = 256;

/// A lease not taken as a peer, to be said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected<'a> {
    pub key: &'a str,
    pub reason: String,
    /// The key that wins against it, for a contention.
    pub holder: Option<&'a str>,
    /// Unreadable (skipped) rather than read and refused.
    pub unreadable: bool,
}

impl Rejected<'_> {
    fn line(&self) -> String {
        let (key, reason) = (clip(self.key, CLIP), clip(&self.reason, CLIP));
        match (self.unreadable, self.holder) {
            (true, _) => format!("skipping unreadable lease {key}: {reason}"),
            (false, Some(h)) => format!("rejecting peer lease {key}: {reason} ({})", clip(h, CLIP)),
            (false, None) => format!("rejecting peer lease {key}: {reason}"),
        }
    }
}

/// Remembers what was said, by hash: a key of a megabyte costs what one of ten bytes does.
pub struct RejectionLog {
    /// Hash of the key → hash of the reason last said for it.
    said: HashMap<u64, u64>,
    /// Keyed per process, so nobody can choose keys that collide (a collision would only
    /// silence a line, but still).
    hasher: RandomState,
    window: Window,
}

/// The current window: when it began, what was said at warn in it, what only at debug.
struct Window {
    began: Instant,
    loud: usize,
    quiet: usize,
    quiet_unreadable: usize,
}

impl Default for RejectionLog {
    fn default() -> Self {
        Self {
            said: HashMap::new(),
            hasher: RandomState::new(),
            window: Window {
                began: Instant::now(),
                loud: 0,
                quiet: 0,
                quiet_unreadable: 0,
            },
        }
    }
}

impl RejectionLog {
    /// Says the rejections not said before (for that key and reason): at warn while the window
    /// has room, else at debug, summed up by [`RejectionLog::flush`]. Returns how many were new.
    pub fn say<'a>(&mut self, rejected: impl IntoIterator<Item = Rejected<'a>>) -> usize {
        self.say_at(Instant::now(), rejected)
    }

    fn say_at<'a>(
        &mut self,
        now: Instant,
        rejected: impl IntoIterator<Item = Rejected<'a>>,
    ) -> usize {
        self.flush_at(now);
        let mut new = 0;
        for r in rejected {
            let (k, v) = (self.hasher.hash_one(r.key), self.hasher.hash_one(&r.reason));
            if self.said.get(&k) == Some(&v) {
                continue;
            }
            if self.said.len() >= REMEMBERED {
                self.said.clear();
            }
            self.said.insert(k, v);
            new += 1;
            let w = &mut self.window;
            if w.loud < LOUD {
                w.loud += 1;
                warn!("{}", r.line());
            } else {
                w.quiet += 1;
                w.quiet_unreadable += usize::from(r.unreadable);
                debug!("{}", r.line());
            }
        }
        new
    }

    /// Ends the window if it is over: says how many went unsaid in it (at most one line per
    /// [`WINDOW`]). Called by every [`RejectionLog::say`], and now and then by the agent so a
    /// last summary is not held back while nothing new comes.
    pub fn flush(&mut self) {
        self.flush_at(Instant::now());
    }

    /// Returns whether a summary was said.
    fn flush_at(&mut self, now: Instant) -> bool {
        let w = &mut self.window;
        if now.duration_since(w.began) < WINDOW {
            return false;
        }
        let said = w.quiet > 0;
        if said {
            warn!(
                skipped = w.quiet_unreadable,
                rejected = w.quiet - w.quiet_unreadable,
                "{} more leases skipped or rejected in {}s (each at debug level)",
                w.quiet,
                now.duration_since(w.began).as_secs()
            );
        }
        *w = Window {
            began: now,
            loud: 0,
            quiet: 0,
            quiet_unreadable: 0,
        };
        said
    }

    /// The key was deleted: should it come back, what is wrong with it is said again.
    pub fn forget(&mut self, key: &str) {
        self.said.remove(&self.hasher.hash_one(key));
    }

    /// How many keys are remembered.
    pub fn len(&self) -> usize {
        self.said.len()
    }

    pub fn is_empty(&self) -> bool {
        self.said.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn junk(key: &str) -> Rejected<'_> {
        Rejected {
            key,
            reason: "not JSON".into(),
            holder: None,
            unreadable: true,
        }
    }

    #[test]
    fn each_key_is_said_once_per_reason() {
        let mut log = RejectionLog::default();
        assert_eq!(log.say([junk("a"), junk("b")]), 2);
        assert_eq!(log.say([junk("a")]), 0, "said already");
        let mut changed = junk("a");
        changed.reason = "another reason".into();
        assert_eq!(log.say([changed]), 1, "a new reason is news");
    }

    #[test]
    fn a_deleted_key_is_forgotten_and_said_again_when_it_returns() {
        let mut log = RejectionLog::default();
        log.say([junk("a"), junk("b")]);
        log.forget("a");
        assert_eq!(log.len(), 1);
        assert_eq!(log.say([junk("a")]), 1);
    }

    #[test]
    fn memory_is_bounded_whatever_the_number_of_keys() {
        let mut log = RejectionLog::default();
        let keys: Vec<String> = (0..REMEMBERED * 3).map(|i| format!("k{i}")).collect();
        for chunk in keys.chunks(1000) {
            log.say(chunk.iter().map(|k| junk(k)));
            assert!(log.len() <= REMEMBERED);
        }
    }

    #[test]
    fn a_flood_is_said_a_few_lines_then_summed_up_once_per_window() {
        let mut log = RejectionLog::default();
        let t0 = log.window.began;
        let keys: Vec<String> = (0..3000).map(|i| format!("junk-{i}")).collect();
        // One key per watch response, as junk put key by key arrives.
        for k in &keys[..1500] {
            log.say_at(t0, [junk(k)]);
        }
        assert_eq!((log.window.loud, log.window.quiet), (LOUD, 1500 - LOUD));
        assert!(!log.flush_at(t0 + WINDOW / 2), "the window is not over");
        assert!(log.flush_at(t0 + WINDOW), "one summary for the rest");
        assert_eq!((log.window.loud, log.window.quiet), (0, 0));
        assert!(!log.flush_at(t0 + WINDOW * 3), "nothing unsaid: no line");
        log.say_at(t0 + WINDOW * 3, [junk(&keys[1500])]);
        assert_eq!(log.window.loud, 1, "a new window says lines again");
    }

    #[test]
    fn lines_are_one_line_each_however_hostile_the_key() {
        let key = format!(
            "/k/subnets/x\n2026-12-07T00:00:00Z INFO forged\u{1b}[2J{}",
            "y".repeat(5000)
        );
        let line = junk(&key).line();
        assert!(!line.contains('\n') && !line.contains('\u{1b}'), "{line}");
        assert!(line.len() < 400, "clipped: {} bytes", line.len());
        assert!(
            line.contains("x\\n2026") && line.ends_with("bytes): not JSON"),
            "{line}"
        );
    }
}
