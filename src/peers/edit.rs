//! Several operations on a [`PeerSet`] reported as one [`Diff`].

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use super::compact::Compact;
use super::contention::Key;
use super::{Change, Diff, Own, PeerSet, Rejection, Verdict};
use crate::lease::Record;

/// Verdict and accepted lease of each key before an edit touched it. The keys that had no entry
/// (at a start, every one of 10,000) are kept apart, as a set of the very keys the entries then
/// share: a map holding "nothing" for each would be most of the start's peak memory.
#[derive(Default)]
pub(super) struct Before {
    pub(super) stored: HashMap<Key, (Verdict, Option<Compact>)>,
    pub(super) new: HashSet<Key>,
}

impl Before {
    pub(super) fn contains(&self, key: &str) -> bool {
        self.stored.contains_key(key) || self.new.contains(key)
    }

    /// `key` as this edit keeps it, to be shared rather than copied.
    pub(super) fn key(&self, key: &str) -> Option<Key> {
        (self.new.get(key))
            .or_else(|| self.stored.get_key_value(key).map(|(k, _)| k))
            .cloned()
    }

    /// Each key, with its verdict and accepted lease (`None` for a new key).
    pub(super) fn into_iter(self) -> impl Iterator<Item = (Key, Option<Verdict>, Option<Compact>)> {
        let stored = (self.stored.into_iter()).map(|(k, (v, l))| (k, Some(v), l));
        stored.chain(self.new.into_iter().map(|k| (k, None, None)))
    }
}

/// Operations on a [`PeerSet`] whose net effect is reported as one [`Diff`] by [`Edit::finish`].
#[must_use = "the diff comes from finish()"]
pub struct Edit<'a> {
    pub(super) set: &'a mut PeerSet,
    pub(super) before: Before,
    /// The keys of a listing under way ([`Edit::begin_listing`]).
    pub(super) listed: Option<HashSet<Key>>,
}

impl Edit<'_> {
    pub fn apply(&mut self, change: Change) {
        match change {
            Change::Put(r) => {
                let key = r.key.clone();
                self.set.update(&key, Some(r), &mut self.before);
            }
            Change::Delete(key) => self.set.update(&key, None, &mut self.before),
        }
    }

    /// Makes the stored leases exactly `records`: keys not among them are deleted.
    pub fn replace_all(&mut self, records: impl IntoIterator<Item = Record>) {
        self.begin_listing();
        for r in records {
            self.listed(r);
        }
        self.end_listing();
    }

    /// Begins a listing given record by record as it is read ([`Edit::listed`]); at
    /// [`Edit::end_listing`] the stored leases are exactly the listed ones. Beginning again
    /// forgets what was listed so far (a listing that failed midway and starts over).
    pub fn begin_listing(&mut self) {
        self.listed = Some(HashSet::new());
    }

    /// One record of the listing begun.
    pub fn listed(&mut self, r: Record) {
        let key = r.key.clone();
        self.apply(Change::Put(r));
        let stored = self.set.entries.get_key_value(key.as_str());
        if let (Some(listed), Some((k, _))) = (&mut self.listed, stored) {
            listed.insert(k.clone());
        }
    }

    /// Ends the listing: every key it did not name is deleted.
    pub fn end_listing(&mut self) {
        let Some(listed) = self.listed.take() else {
            return;
        };
        let gone: Vec<Key> = (self.set.entries.keys())
            .filter(|k| !listed.contains(*k))
            .cloned()
            .collect();
        drop(listed);
        for key in gone {
            self.set.update(&key, None, &mut self.before);
        }
    }

    /// This host's lease changed (re-leased, or its VTEP MAC): everything is judged again.
    pub fn set_own(&mut self, own: Own) {
        if own != self.set.own {
            self.set.own = own;
            self.judge_all();
        }
    }

    /// This host's addresses changed: everything is judged again.
    pub fn set_local_addrs(&mut self, local: HashSet<IpAddr>) {
        if local != self.set.local {
            tracing::debug!(
                before = ?self.set.local,
                now = ?local,
                "this host's addresses changed: every lease is judged again"
            );
            self.set.local = local;
            self.judge_all();
        }
    }

    fn judge_all(&mut self) {
        let set = &mut *self.set;
        for key in set.entries.keys() {
            set.remember(key, &mut self.before);
        }
        let entries = std::mem::take(&mut set.entries);
        set.subnets.clear();
        set.identities.clear();
        set.identities6.clear();
        set.accepted.clear();
        set.by_type = Default::default();
        for (key, e) in entries {
            let record = Record {
                key: key.to_string(),
                rank: e.rank,
                value: e.value.map(|v| v.lease()),
            };
            set.update(&key, Some(record), &mut self.before);
        }
    }

    /// The net change since the edit began.
    pub fn finish(self) -> Diff {
        let set = &*self.set;
        let mut d = Diff::default();
        for (key, was, old) in self.before.into_iter() {
            let e = set.entries.get(&key);
            let now = e.map(|e| set.verdict_of(&key, e));
            let new = e
                .filter(|_| now == Some(Verdict::Accepted))
                .and_then(|e| e.value.as_ref().ok());
            match (old, new) {
                (Some(old), Some(new)) if !old.same_attrs(new) => d.changed.push(new.peer(&key)),
                (Some(old), None) => d.removed.push(old.peer(&key)),
                (None, Some(new)) => d.added.push(new.peer(&key)),
                _ => {}
            }
            if let Some(Verdict::Rejected(reason)) = &now {
                if was != now {
                    d.rejected.push(Rejection {
                        holder: set.holder(reason),
                        reason: reason.clone(),
                        key: key.to_string(),
                    });
                }
            }
        }
        d.added.sort_by(|a, b| a.key.cmp(&b.key));
        d.changed.sort_by(|a, b| a.key.cmp(&b.key));
        d.removed.sort_by(|a, b| a.key.cmp(&b.key));
        d.rejected.sort_by(|a, b| a.key.cmp(&b.key));
        d
    }
}
