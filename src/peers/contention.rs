//! Who holds a subnet or an identity: the contenders for each, oldest first.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Arc;

/// An etcd key, stored once and shared by every index that names it.
pub(super) type Key = Arc<str>;

/// Order in a contention: the oldest lease (lowest create revision), then the lowest key, wins.
pub(super) type Rank = (i64, Key);

/// The contenders for one subnet or MAC, in rank order: nearly always exactly one, kept inline
/// (a B-tree would allocate a whole node for it, a vector a block).
#[derive(Debug, Clone)]
pub(super) enum Contenders {
    One(Rank),
    Many(Vec<Rank>),
}

impl Contenders {
    pub(super) fn ranks(&self) -> &[Rank] {
        match self {
            Self::One(r) => std::slice::from_ref(r),
            Self::Many(v) => v,
        }
    }

    pub(super) fn first(&self) -> Option<&Rank> {
        self.ranks().first()
    }

    pub(super) fn insert(&mut self, r: Rank) {
        match self {
            Self::One(o) if *o == r => {}
            Self::One(o) => {
                let mut v = vec![o.clone(), r];
                v.sort();
                *self = Self::Many(v);
            }
            Self::Many(v) => {
                if let Err(i) = v.binary_search(&r) {
                    v.insert(i, r);
                }
            }
        }
    }

    /// Withdraws `r`; whether none is left.
    pub(super) fn remove(&mut self, r: &Rank) -> bool {
        match self {
            Self::One(o) => o == r,
            Self::Many(v) => {
                if let Ok(i) = v.binary_search(r) {
                    v.remove(i);
                }
                match v.as_slice() {
                    [] => true,
                    [one] => {
                        *self = Self::One(one.clone());
                        false
                    }
                    _ => false,
                }
            }
        }
    }
}

/// Enters `rank` into (or withdraws it from) the contention for `what`, noting the winner before
/// and after: only their verdicts can change.
pub(super) fn contend<K: Hash + Eq + Clone>(
    index: &mut HashMap<K, Contenders>,
    what: &K,
    rank: &Rank,
    enter: bool,
    recheck: &mut Vec<Key>,
) {
    recheck.extend(
        index
            .get(what)
            .and_then(Contenders::first)
            .map(|w| w.1.clone()),
    );
    if enter {
        match index.get_mut(what) {
            Some(c) => c.insert(rank.clone()),
            None => {
                index.insert(what.clone(), Contenders::One(rank.clone()));
            }
        }
    } else if index.get_mut(what).is_some_and(|c| c.remove(rank)) {
        index.remove(what);
    }
    recheck.extend(
        index
            .get(what)
            .and_then(Contenders::first)
            .map(|w| w.1.clone()),
    );
}

pub(super) fn wins<K: Hash + Eq>(index: &HashMap<K, Contenders>, what: &K, key: &str) -> bool {
    index
        .get(what)
        .and_then(Contenders::first)
        .is_some_and(|w| &*w.1 == key)
}
