//! From the lease records of the store (`<prefix>/subnets/` in etcd) to the peers the data plane is given: a pure function of
//! everything stored there (no I/O), kept up to date incrementally. The watch (a batch of events)
//! and a fresh listing (start, compaction) go through the same code and end in the same set,
//! whatever order the events came in: a lease's fate depends only on what is stored now.
//!
//! Peers are keyed by record key. A stored lease is a peer when, on its own, it
//! - has a key in flannel's one spelling (`10.244.52.0-24`) and a readable value;
//! - is a subnet of exactly the network's SubnetLen, inside Network, not overlapping this host's;
//! - has a unicast PublicIP that is none of this host's addresses;
//! - publishes what its backend needs to be reached, and an identity that is not this host's
//!   (vxlan: a unicast, non-zero VtepMAC; see `weft_backends::DataPlane::identity`);
//!
//! and it wins each contention it is in: among the leases that pass the checks above, the oldest
//! (lowest rank, etcd's create revision, then key) holds a subnet and an identity. A loser stays stored and
//! becomes a peer as soon as the winner goes.
//!
//! Every operation returns a [`Diff`] of the accepted set plus the leases newly rejected, and costs
//! O(log n) per changed key: contention is looked up in indexes by subnet and by MAC, and only the
//! leases whose win or loss can change (old and new winners) are judged again. Changing this
//! host's own lease or addresses judges everything again (rare).
//!
//! Kept small, as it is held for weftd's life and a cluster may have 10,000 hosts: each key is
//! stored once and shared by the indexes, each lease in a compact form (its BackendData as JSON
//! text), and a diff names peers rather than copying their leases: about 0.5 KB a lease.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::hash::Hash;
use std::net::Ipv4Addr;
use std::sync::Arc;

use ipnet::Ipv4Net;
use weft_backends::iface::is_unicast_host;
use weft_backends::{BackendData, Identity, IdentityKind, KINDS};

pub use crate::lease::Change;
use crate::lease::{Hold, Lease, LeaseAttrs, Record, Unreadable};

/// This host's own lease, as far as judging peers needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Own {
    /// Its etcd key: never a peer, whatever it holds (whether it is still ours is the agent's
    /// question; see [`PeerSet::get`]).
    pub key: String,
    pub subnet: Ipv4Net,
    /// The identity it publishes (vxlan: its VTEP MAC), which no peer may use.
    pub identity: Option<Identity>,
}

/// Why a stored lease is not a peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Reason {
    #[error("{0}")]
    Unreadable(Unreadable),
    #[error("not inside the network {0}")]
    OutsideNetwork(Ipv4Net),
    #[error("a /{len} is not a subnet of this network (SubnetLen {want})")]
    WrongLength { len: u8, want: u8 },
    #[error("overlaps this host's subnet {0}")]
    OverlapsOwn(Ipv4Net),
    #[error("PublicIP {0} is not a unicast host address")]
    PublicIpNotUnicast(Ipv4Addr),
    #[error("PublicIP {0} is an address of this host")]
    PublicIpLocal(Ipv4Addr),
    /// The BackendData lacks what its backend needs: a usable identity of `kind` (a VtepMAC
    /// for vxlan).
    #[error("{reason}")]
    BadIdentity {
        kind: Option<&'static IdentityKind>,
        reason: String,
    },
    #[error("{0} is this host's")]
    IdentityOwn(Identity),
    #[error("subnet {0} is held by an older lease")]
    SubnetTaken(Ipv4Net),
    #[error("{0} is used by an older lease")]
    IdentityTaken(Identity),
}

/// What a stored lease currently is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// This host's key.
    Own,
    Accepted,
    Rejected(Reason),
}

/// A peer of a [`Diff`]: its key, and the subnet and PublicIP of its lease (the new one, or for a
/// removed peer the one last accepted). The whole lease of a peer in the set is
/// [`PeerSet::peer`].
#[derive(Debug, Clone, PartialEq)]
pub struct Peer {
    pub key: String,
    pub subnet: Ipv4Net,
    pub public_ip: Ipv4Addr,
}

/// A lease that became rejected, or rejected for another reason than before.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    pub key: String,
    pub reason: Reason,
    /// The key that wins against it (older lease, this host's), when the reason is a contention.
    pub holder: Option<String>,
}

/// What one operation changed in the accepted set, each list in key order. A key is in at most
/// one of `added`, `changed` and `removed`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Diff {
    pub added: Vec<Peer>,
    /// Accepted before and after, with other attributes (PublicIP, BackendData).
    pub changed: Vec<Peer>,
    pub removed: Vec<Peer>,
    pub rejected: Vec<Rejection>,
}

impl Diff {
    /// Peers added, changed or removed.
    pub fn peer_changes(&self) -> usize {
        self.added.len() + self.changed.len() + self.removed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.peer_changes() == 0 && self.rejected.is_empty()
    }
}

/// Every lease stored under `subnets/`, and which of them are peers.
#[derive(Debug, Clone)]
pub struct PeerSet {
    network: Ipv4Net,
    subnet_len: u8,
    own: Own,
    local: HashSet<Ipv4Addr>,
    entries: HashMap<Key, Entry>,
    /// Contenders (leases passing every check of their own) by subnet and by VTEP MAC; the first
    /// of each wins. Keys in one spelling of one length make a subnet's contenders one key at
    /// most today; flannel's dual-stack keys (`…-24&fc00::-64`) would give it more.
    subnets: HashMap<Ipv4Net, Contenders>,
    identities: HashMap<Identity, Contenders>,
    accepted: BTreeSet<Key>,
    /// Accepted peers by BackendType (index into [`KNOWN_TYPES`], or [`OTHER_TYPE`]), kept as
    /// `accepted` changes so that the count costs nothing per event.
    by_type: [usize; KNOWN_TYPES.len() + 1],
}

/// An etcd key, stored once and shared by every index that names it.
type Key = Arc<str>;

/// Order in a contention: the oldest lease (lowest create revision), then the lowest key, wins.
type Rank = (i64, Key);

/// The contenders for one subnet or MAC, in rank order: nearly always exactly one, kept inline
/// (a B-tree would allocate a whole node for it, a vector a block).
#[derive(Debug, Clone)]
enum Contenders {
    One(Rank),
    Many(Vec<Rank>),
}

impl Contenders {
    fn ranks(&self) -> &[Rank] {
        match self {
            Self::One(r) => std::slice::from_ref(r),
            Self::Many(v) => v,
        }
    }

    fn first(&self) -> Option<&Rank> {
        self.ranks().first()
    }

    fn insert(&mut self, r: Rank) {
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
    fn remove(&mut self, r: &Rank) -> bool {
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

/// A stored key. Its verdict is not kept: it follows from its standing and the contention
/// indexes (`verdict_of`), and an accepted key is also in `accepted`.
#[derive(Debug, Clone)]
struct Entry {
    rank: i64,
    value: Result<Stored, Unreadable>,
    standing: Standing,
}

/// A lease as the set keeps it: the facts of [`Lease`] in a fifth of the bytes. BackendData is
/// kept as its JSON text (a parsed JSON map costs ~400 bytes) and parsed again when the lease is
/// asked for, which is when a peer changes or the kernel is compared in full.
#[derive(Debug, Clone, PartialEq)]
struct Stored {
    subnet: Ipv4Net,
    public_ip: Ipv4Addr,
    /// The BackendType as an index into [`KNOWN_TYPES`], or [`OTHER_TYPE`] (the name is then in
    /// `extra`).
    kind: u8,
    backend_data: Option<Box<str>>,
    /// What leases rarely have, out of line.
    extra: Option<Box<Extra>>,
    hold: Hold,
    version: i64,
}

#[derive(Debug, Clone, PartialEq)]
struct Extra {
    public_ipv6: Option<String>,
    /// A BackendType not in [`KNOWN_TYPES`].
    backend_type: Option<String>,
}

/// The BackendTypes stored without an allocation.
/// "" (flannel's udp writes none) and every type weft knows.
const KNOWN_TYPES: [&str; KINDS.len() + 1] = known_types();
const OTHER_TYPE: u8 = KNOWN_TYPES.len() as u8;

const fn known_types() -> [&'static str; KINDS.len() + 1] {
    let mut names = [""; KINDS.len() + 1];
    let mut i = 0;
    while i < KINDS.len() {
        names[i + 1] = KINDS[i].name;
        i += 1;
    }
    names
}

impl Stored {
    fn new(l: Lease) -> Self {
        let a = l.attrs;
        let known = KNOWN_TYPES.iter().position(|k| *k == a.backend_type);
        let other = known.is_none().then_some(a.backend_type);
        let extra = (a.public_ipv6.is_some() || other.is_some()).then(|| {
            Box::new(Extra {
                public_ipv6: a.public_ipv6,
                backend_type: other,
            })
        });
        Self {
            subnet: l.subnet,
            public_ip: a.public_ip,
            kind: known.map_or(OTHER_TYPE, |i| i as u8),
            // Serializing a JSON value cannot fail.
            backend_data: a.backend_data.map(|v| {
                serde_json::to_string(&v)
                    .unwrap_or_default()
                    .into_boxed_str()
            }),
            extra,
            hold: l.hold,
            version: l.version,
        }
    }

    fn backend_type(&self) -> &str {
        let other = self.extra.as_ref().and_then(|e| e.backend_type.as_deref());
        KNOWN_TYPES
            .get(usize::from(self.kind))
            .copied()
            .or(other)
            .unwrap_or_default()
    }

    fn lease(&self) -> Lease {
        Lease {
            subnet: self.subnet,
            attrs: LeaseAttrs {
                public_ip: self.public_ip,
                public_ipv6: self.extra.as_ref().and_then(|e| e.public_ipv6.clone()),
                backend_type: self.backend_type().to_owned(),
                // Text this set wrote from a JSON value: it parses.
                backend_data: (self.backend_data.as_deref())
                    .and_then(|t| serde_json::from_str(t).ok()),
            },
            hold: self.hold,
            version: self.version,
        }
    }

    /// What [`Lease::to_backend`] makes of [`Stored::lease`].
    fn backend_lease(&self) -> weft_backends::Lease {
        weft_backends::Lease {
            subnet: self.subnet,
            public_ip: self.public_ip,
            backend_type: self.backend_type().to_owned(),
            backend_data: (self.backend_data.as_deref()).map(BackendData::from_json),
        }
    }

    /// Whether another lease has the same attributes (what a data plane is given).
    fn same_attrs(&self, other: &Self) -> bool {
        (self.public_ip, self.kind, &self.backend_data, &self.extra)
            == (
                other.public_ip,
                other.kind,
                &other.backend_data,
                &other.extra,
            )
    }

    fn peer(&self, key: &str) -> Peer {
        Peer {
            key: key.to_string(),
            subnet: self.subnet,
            public_ip: self.public_ip,
        }
    }
}

/// What a lease amounts to on its own, before contention.
#[derive(Debug, Clone)]
enum Standing {
    Own,
    /// Boxed: most leases pass, and every entry has a standing.
    Rejected(Box<Reason>),
    Contender {
        subnet: Ipv4Net,
        identity: Option<Identity>,
    },
}

impl PeerSet {
    /// An empty set for `network` with subnets of `subnet_len`, judged against this host's lease
    /// and addresses (`local`: every IPv4 address of this host, its PublicIP included).
    pub fn new(network: Ipv4Net, subnet_len: u8, own: Own, local: HashSet<Ipv4Addr>) -> Self {
        Self {
            network,
            subnet_len,
            own,
            local,
            entries: HashMap::new(),
            subnets: HashMap::new(),
            identities: HashMap::new(),
            accepted: BTreeSet::new(),
            by_type: [0; KNOWN_TYPES.len() + 1],
        }
    }

    /// How many peers are accepted, by BackendType ("" is flannel's udp; "other" stands for
    /// every type weft does not know).
    pub fn count_by_type(&self) -> impl Iterator<Item = (&'static str, usize)> + '_ {
        (KNOWN_TYPES.iter().copied().chain(["other"])).zip(self.by_type)
    }

    /// Puts `key`, a lease of BackendType `kind`, in or out of the accepted set, keeping `by_type`
    /// in step.
    fn set_accepted(&mut self, key: &Key, kind: Option<u8>, accept: bool) {
        let changed = if accept {
            self.accepted.insert(key.clone())
        } else {
            self.accepted.remove(key)
        };
        if let (true, Some(k)) = (changed, kind) {
            let n = &mut self.by_type[usize::from(k).min(KNOWN_TYPES.len())];
            *n = if accept { *n + 1 } else { n.saturating_sub(1) };
        }
    }

    /// Starts several operations whose net effect is one [`Diff`] (a watch response, a relisting).
    pub fn batch(&mut self) -> Batch<'_> {
        Batch {
            set: self,
            before: Before::default(),
            listed: None,
        }
    }

    /// One watch event.
    pub fn apply(&mut self, change: Change) -> Diff {
        let mut b = self.batch();
        b.apply(change);
        b.finish()
    }

    /// Makes the stored leases exactly `records` (a fresh listing).
    pub fn replace_all(&mut self, records: impl IntoIterator<Item = Record>) -> Diff {
        let mut b = self.batch();
        b.replace_all(records);
        b.finish()
    }

    /// The accepted peers, in key order.
    pub fn peers(&self) -> impl Iterator<Item = (&str, Lease)> + '_ {
        (self.accepted.iter()).filter_map(|k| Some((&**k, self.readable(k)?.lease())))
    }

    /// The accepted peers as the data plane is given them, in key order: made straight from
    /// what is stored, without a [`Lease`] in between.
    pub fn backend_peers(&self) -> impl Iterator<Item = weft_backends::Lease> + '_ {
        (self.accepted.iter()).filter_map(|k| Some(self.readable(k)?.backend_lease()))
    }

    /// The accepted peer at `key` as the data plane is given it.
    pub fn backend_peer(&self, key: &str) -> Option<weft_backends::Lease> {
        Some(self.accepted_lease(key)?.backend_lease())
    }

    /// The lease of the accepted peer at `key`.
    pub fn peer(&self, key: &str) -> Option<Lease> {
        Some(self.accepted_lease(key)?.lease())
    }

    /// What is stored for the accepted peer at `key`.
    fn accepted_lease(&self, key: &str) -> Option<&Stored> {
        self.accepted.contains(key).then_some(())?;
        self.readable(key)
    }

    /// The readable lease stored at `key`, whatever its verdict.
    fn readable(&self, key: &str) -> Option<&Stored> {
        self.entries.get(key)?.value.as_ref().ok()
    }

    /// How many peers are accepted.
    pub fn len(&self) -> usize {
        self.accepted.len()
    }

    pub fn is_empty(&self) -> bool {
        self.accepted.is_empty()
    }

    /// What is stored at `key`, whatever its verdict.
    pub fn get(&self, key: &str) -> Option<Record> {
        let e = self.entries.get(key)?;
        Some(Record {
            key: key.to_string(),
            rank: e.rank,
            value: e.value.as_ref().map(Stored::lease).map_err(Clone::clone),
        })
    }

    pub fn verdict(&self, key: &str) -> Option<Verdict> {
        self.entries.get(key).map(|e| self.verdict_of(key, e))
    }

    /// How many keys are stored, peers or not.
    pub fn stored(&self) -> usize {
        self.entries.len()
    }

    pub fn own(&self) -> &Own {
        &self.own
    }

    /// Stores `new` at `key` (`None`: deletes it) and judges again every lease whose verdict
    /// that can change: `key` itself and the winners, before and after, of what it contends for.
    fn update(&mut self, key: &str, new: Option<Record>, before: &mut Before) {
        let new = new.map(|r| {
            let standing = self.stand(&r);
            (r.rank, r.value.map(Stored::new), standing)
        });
        match (&new, self.entries.get(key)) {
            (Some((rev, value, _)), Some(e)) if e.rank == *rev && e.value == *value => return,
            (None, None) => return,
            _ => {}
        }
        self.remember(key, before);
        // Whoever contends with `key`, before or after, may win or lose by this change: their
        // verdicts as they stand now, before the indexes move.
        let old_standing = self.entries.get(key).map(|e| e.standing.clone());
        for st in [old_standing.as_ref(), new.as_ref().map(|n| &n.2)] {
            if let Some(Standing::Contender { subnet, identity }) = st {
                self.remember_contenders(*subnet, *identity, before);
            }
        }
        // The key as already stored (and shared), or as `remember` kept it.
        let key: Key = match self.entries.get_key_value(key) {
            Some((k, _)) => k.clone(),
            None => before.key(key).unwrap_or_else(|| key.into()),
        };
        let mut recheck = vec![key.clone()];
        if let Some(old) = self.entries.remove(&key) {
            let kind = old.value.as_ref().ok().map(|v| v.kind);
            self.set_accepted(&key, kind, false);
            if let Standing::Contender { subnet, identity } = old.standing {
                let rank = (old.rank, key.clone());
                self.contend(subnet, identity, rank, false, &mut recheck);
            }
        }
        if let Some((rank, value, standing)) = new {
            if let Standing::Contender { subnet, identity } = standing {
                let rank = (rank, key.clone());
                self.contend(subnet, identity, rank, true, &mut recheck);
            }
            // Judged just below: `key` is in `recheck`.
            let entry = Entry {
                rank,
                value,
                standing,
            };
            self.entries.insert(key, entry);
        }
        for k in recheck {
            self.remember(&k, before);
            self.judge(&k);
        }
    }

    /// Records the verdict of `key` before this batch first touches it.
    fn remember(&self, key: &str, before: &mut Before) {
        if before.contains(key) {
            return;
        }
        let Some((key, e)) = self.entries.get_key_value(key) else {
            before.new.insert(Key::from(key));
            return;
        };
        let verdict = self.verdict_of(key, e);
        let accepted = (verdict == Verdict::Accepted)
            .then(|| e.value.as_ref().ok().cloned())
            .flatten();
        before.stored.insert(key.clone(), (verdict, accepted));
    }

    /// Records the verdicts of every contender for `subnet` and `identity`.
    fn remember_contenders(
        &self,
        subnet: Ipv4Net,
        identity: Option<Identity>,
        before: &mut Before,
    ) {
        let subnet = self.subnets.get(&subnet).map(Contenders::ranks);
        let id = identity.and_then(|i| self.identities.get(&i));
        for (_, k) in subnet
            .into_iter()
            .chain(id.map(Contenders::ranks))
            .flatten()
        {
            self.remember(k, before);
        }
    }

    /// Enters `rank` into (or withdraws it from) the contentions for `subnet` and `identity`,
    /// noting their winners before and after.
    fn contend(
        &mut self,
        subnet: Ipv4Net,
        identity: Option<Identity>,
        rank: Rank,
        enter: bool,
        recheck: &mut Vec<Key>,
    ) {
        contend(&mut self.subnets, subnet, &rank, enter, recheck);
        if let Some(i) = identity {
            contend(&mut self.identities, i, &rank, enter, recheck);
        }
    }

    /// The checks a lease passes or fails on its own.
    fn stand(&self, record: &Record) -> Standing {
        if record.key == self.own.key {
            return Standing::Own;
        }
        match self.check(record) {
            Ok((subnet, identity)) => Standing::Contender { subnet, identity },
            Err(reason) => Standing::Rejected(Box::new(reason)),
        }
    }

    fn check(&self, record: &Record) -> Result<(Ipv4Net, Option<Identity>), Reason> {
        let lease = record
            .value
            .as_ref()
            .map_err(|e| Reason::Unreadable(e.clone()))?;
        let subnet = lease.subnet;
        if !self.network.contains(&subnet) {
            return Err(Reason::OutsideNetwork(self.network));
        }
        if subnet.prefix_len() != self.subnet_len {
            return Err(Reason::WrongLength {
                len: subnet.prefix_len(),
                want: self.subnet_len,
            });
        }
        let own = self.own.subnet;
        if own.contains(&subnet) || subnet.contains(&own) {
            return Err(Reason::OverlapsOwn(own));
        }
        let ip = lease.attrs.public_ip;
        if !is_unicast_host(ip) {
            return Err(Reason::PublicIpNotUnicast(ip));
        }
        if self.local.contains(&ip) {
            return Err(Reason::PublicIpLocal(ip));
        }
        let Some(kind) = weft_backends::kind(&lease.attrs.backend_type) else {
            return Ok((subnet, None));
        };
        let identity = (kind.identity)(lease.attrs.backend_data.as_ref()).map_err(|reason| {
            Reason::BadIdentity {
                kind: kind.identity_kind,
                reason,
            }
        })?;
        if let Some(i) = identity.filter(|i| self.own.identity == Some(*i)) {
            return Err(Reason::IdentityOwn(i));
        }
        Ok((subnet, identity))
    }

    /// What `e`, stored at `key`, is: from its standing and the contentions it wins.
    fn verdict_of(&self, key: &str, e: &Entry) -> Verdict {
        match &e.standing {
            Standing::Own => Verdict::Own,
            Standing::Rejected(r) => Verdict::Rejected(Reason::clone(r)),
            Standing::Contender { subnet, identity } => {
                if !wins(&self.subnets, subnet, key) {
                    Verdict::Rejected(Reason::SubnetTaken(*subnet))
                } else if let Some(i) = identity.filter(|i| !wins(&self.identities, i, key)) {
                    Verdict::Rejected(Reason::IdentityTaken(i))
                } else {
                    Verdict::Accepted
                }
            }
        }
    }

    /// Puts `key` in or out of the accepted set, as its verdict now says.
    fn judge(&mut self, key: &str) {
        let Some((k, e)) = self.entries.get_key_value(key) else {
            return;
        };
        let accept = self.verdict_of(k, e) == Verdict::Accepted;
        let (k, kind) = (k.clone(), e.value.as_ref().ok().map(|v| v.kind));
        self.set_accepted(&k, kind, accept);
    }

    /// Who wins against a lease rejected for `reason`, if anyone.
    fn holder(&self, reason: &Reason) -> Option<String> {
        let first = |c: &Contenders| c.first().map(|r| r.1.to_string());
        match reason {
            Reason::SubnetTaken(s) => self.subnets.get(s).and_then(first),
            Reason::IdentityTaken(i) => self.identities.get(i).and_then(first),
            Reason::OverlapsOwn(_) | Reason::IdentityOwn(_) => Some(self.own.key.clone()),
            _ => None,
        }
    }
}

/// Verdict and accepted lease of each key before a batch touched it. The keys that had no entry
/// (at a start, every one of 10,000) are kept apart, as a set of the very keys the entries then
/// share: a map holding "nothing" for each would be most of the start's peak memory.
#[derive(Default)]
struct Before {
    stored: HashMap<Key, (Verdict, Option<Stored>)>,
    new: HashSet<Key>,
}

impl Before {
    fn contains(&self, key: &str) -> bool {
        self.stored.contains_key(key) || self.new.contains(key)
    }

    /// `key` as this batch keeps it, to be shared rather than copied.
    fn key(&self, key: &str) -> Option<Key> {
        (self.new.get(key))
            .or_else(|| self.stored.get_key_value(key).map(|(k, _)| k))
            .cloned()
    }

    /// Each key, with its verdict and accepted lease (`None` for a new key).
    fn into_iter(self) -> impl Iterator<Item = (Key, Option<Verdict>, Option<Stored>)> {
        let stored = (self.stored.into_iter()).map(|(k, (v, l))| (k, Some(v), l));
        stored.chain(self.new.into_iter().map(|k| (k, None, None)))
    }
}

/// Operations on a [`PeerSet`] whose net effect is reported as one [`Diff`] by [`Batch::finish`].
#[must_use = "the diff comes from finish()"]
pub struct Batch<'a> {
    set: &'a mut PeerSet,
    before: Before,
    /// The keys of a listing under way ([`Batch::begin_listing`]).
    listed: Option<HashSet<Key>>,
}

impl Batch<'_> {
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

    /// Begins a listing given record by record as it is read ([`Batch::listed`]); at
    /// [`Batch::end_listing`] the stored leases are exactly the listed ones. Beginning again
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
    pub fn set_local_addrs(&mut self, local: HashSet<Ipv4Addr>) {
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

    /// The net change since the batch began.
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

/// Enters `rank` into (or withdraws it from) the contention for `what`, noting the winner before
/// and after: only their verdicts can change.
fn contend<K: Hash + Eq + Copy>(
    index: &mut HashMap<K, Contenders>,
    what: K,
    rank: &Rank,
    enter: bool,
    recheck: &mut Vec<Key>,
) {
    recheck.extend(
        index
            .get(&what)
            .and_then(Contenders::first)
            .map(|w| w.1.clone()),
    );
    if enter {
        match index.get_mut(&what) {
            Some(c) => c.insert(rank.clone()),
            None => {
                index.insert(what, Contenders::One(rank.clone()));
            }
        }
    } else if index.get_mut(&what).is_some_and(|c| c.remove(rank)) {
        index.remove(&what);
    }
    recheck.extend(
        index
            .get(&what)
            .and_then(Contenders::first)
            .map(|w| w.1.clone()),
    );
}

fn wins<K: Hash + Eq>(index: &HashMap<K, Contenders>, what: &K, key: &str) -> bool {
    index
        .get(what)
        .and_then(Contenders::first)
        .is_some_and(|w| &*w.1 == key)
}

#[cfg(test)]
mod tests;
