//! From the keys under `<prefix>/subnets/` to the peers the data plane is given: a pure function of
//! everything stored there (no I/O), kept up to date incrementally. The watch (a batch of events)
//! and a fresh listing (start, compaction) go through the same code and end in the same set,
//! whatever order the events came in: a lease's fate depends only on what is stored now.
//!
//! Peers are keyed by etcd key. A stored lease is a peer when, on its own, it
//! - has a key in flannel's one spelling (`10.244.52.0-24`) and a readable value;
//! - is a subnet of exactly the network's SubnetLen, inside Network, not overlapping this host's;
//! - has a unicast PublicIP that is none of this host's addresses;
//! - (vxlan) publishes a unicast, non-zero VtepMAC that is not this host's;
//!
//! and it wins each contention it is in: among the leases that pass the checks above, the oldest
//! (lowest create revision, then key) holds a subnet and a VtepMAC. A loser stays stored and
//! becomes a peer as soon as the winner goes.
//!
//! Every operation returns a [`Diff`] of the accepted set plus the leases newly rejected, and costs
//! O(log n) per changed key: contention is looked up in indexes by subnet and by MAC, and only the
//! leases whose win or loss can change (old and new winners) are judged again. Changing this
//! host's own lease or addresses judges everything again (rare).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::hash::Hash;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use weft_backends::iface::is_unicast_host;
use weft_backends::mac::{vtep_mac, Mac, VtepMacError};

use crate::lease::{Lease, Record, Unreadable};

/// The BackendType whose leases must publish a VTEP MAC.
const VXLAN: &str = "vxlan";

/// This host's own lease, as far as judging peers needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Own {
    /// Its etcd key: never a peer, whatever it holds (whether it is still ours is the agent's
    /// question; see [`PeerSet::get`]).
    pub key: String,
    pub subnet: Ipv4Net,
    /// The VTEP MAC it publishes (vxlan), which no peer may use.
    pub vtep_mac: Option<Mac>,
}

/// One etcd event under `subnets/`.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Put(Record),
    Delete(String),
}

impl Change {
    /// The etcd key it is about.
    pub fn key(&self) -> &str {
        match self {
            Self::Put(r) => &r.key,
            Self::Delete(k) => k,
        }
    }
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
    #[error("{0}")]
    VtepMac(VtepMacError),
    #[error("VtepMAC {0} is this host's")]
    VtepMacOwn(Mac),
    #[error("subnet {0} is held by an older lease")]
    SubnetTaken(Ipv4Net),
    #[error("VtepMAC {0} is used by an older lease")]
    VtepMacTaken(Mac),
}

/// What a stored lease currently is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// This host's key.
    Own,
    Accepted,
    Rejected(Reason),
}

/// An accepted peer: its key and lease.
#[derive(Debug, Clone, PartialEq)]
pub struct Peer {
    pub key: String,
    pub lease: Lease,
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
    /// Accepted before and after, with other attributes (PublicIP, BackendData); the new lease.
    pub changed: Vec<Peer>,
    /// The lease as it was last accepted.
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
    entries: HashMap<String, Entry>,
    /// Contenders (leases passing every check of their own) by subnet and by VTEP MAC; the first
    /// of each set wins. Keys in one spelling of one length make a subnet's set hold one key at
    /// most today; flannel's dual-stack keys (`…-24&fc00::-64`) would give it more.
    subnets: HashMap<Ipv4Net, BTreeSet<Rank>>,
    macs: HashMap<Mac, BTreeSet<Rank>>,
    accepted: BTreeSet<String>,
}

/// Order in a contention: the oldest lease (lowest create revision), then the lowest key, wins.
type Rank = (i64, String);

#[derive(Debug, Clone)]
struct Entry {
    record: Record,
    standing: Standing,
    verdict: Verdict,
}

/// What a lease amounts to on its own, before contention.
#[derive(Debug, Clone)]
enum Standing {
    Own,
    Rejected(Reason),
    Contender { subnet: Ipv4Net, mac: Option<Mac> },
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
            macs: HashMap::new(),
            accepted: BTreeSet::new(),
        }
    }

    /// Starts several operations whose net effect is one [`Diff`] (a watch response, a relisting).
    pub fn batch(&mut self) -> Batch<'_> {
        Batch {
            set: self,
            before: HashMap::new(),
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
    pub fn peers(&self) -> impl Iterator<Item = (&str, &Lease)> + '_ {
        self.accepted.iter().filter_map(|k| {
            let lease = self.entries.get(k)?.record.value.as_ref().ok()?;
            Some((k.as_str(), lease))
        })
    }

    /// How many peers are accepted.
    pub fn len(&self) -> usize {
        self.accepted.len()
    }

    pub fn is_empty(&self) -> bool {
        self.accepted.is_empty()
    }

    /// What is stored at `key`, whatever its verdict.
    pub fn get(&self, key: &str) -> Option<&Record> {
        self.entries.get(key).map(|e| &e.record)
    }

    pub fn verdict(&self, key: &str) -> Option<&Verdict> {
        self.entries.get(key).map(|e| &e.verdict)
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
        match (&new, self.entries.get(key)) {
            (Some(n), Some(e)) if e.record == *n => return,
            (None, None) => return,
            _ => {}
        }
        self.remember(key, before);
        let mut recheck = vec![key.to_string()];
        if let Some(old) = self.entries.remove(key) {
            self.accepted.remove(key);
            if let Standing::Contender { subnet, mac } = old.standing {
                let rank = (old.record.create_revision, key.to_string());
                self.contend(subnet, mac, rank, false, &mut recheck);
            }
        }
        if let Some(record) = new {
            let standing = self.stand(&record);
            if let Standing::Contender { subnet, mac } = standing {
                let rank = (record.create_revision, key.to_string());
                self.contend(subnet, mac, rank, true, &mut recheck);
            }
            let verdict = Verdict::Own; // judged just below: `key` is in `recheck`
            let entry = Entry {
                record,
                standing,
                verdict,
            };
            self.entries.insert(key.to_string(), entry);
        }
        for k in recheck {
            self.remember(&k, before);
            self.judge(&k);
        }
    }

    /// Records the verdict of `key` before this batch first touches it.
    fn remember(&self, key: &str, before: &mut Before) {
        if before.contains_key(key) {
            return;
        }
        let e = self.entries.get(key);
        let accepted = e
            .filter(|e| e.verdict == Verdict::Accepted)
            .and_then(|e| e.record.value.as_ref().ok().cloned());
        before.insert(key.to_string(), (e.map(|e| e.verdict.clone()), accepted));
    }

    /// Enters `rank` into (or withdraws it from) the contentions for `subnet` and `mac`, noting
    /// their winners before and after.
    fn contend(
        &mut self,
        subnet: Ipv4Net,
        mac: Option<Mac>,
        rank: Rank,
        enter: bool,
        recheck: &mut Vec<String>,
    ) {
        contend(&mut self.subnets, subnet, &rank, enter, recheck);
        if let Some(m) = mac {
            contend(&mut self.macs, m, &rank, enter, recheck);
        }
    }

    /// The checks a lease passes or fails on its own.
    fn stand(&self, record: &Record) -> Standing {
        if record.key == self.own.key {
            return Standing::Own;
        }
        match self.check(record) {
            Ok((subnet, mac)) => Standing::Contender { subnet, mac },
            Err(reason) => Standing::Rejected(reason),
        }
    }

    fn check(&self, record: &Record) -> Result<(Ipv4Net, Option<Mac>), Reason> {
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
        if lease.attrs.backend_type != VXLAN {
            return Ok((subnet, None));
        }
        let mac = vtep_mac(lease.attrs.backend_data.as_ref()).map_err(Reason::VtepMac)?;
        if self.own.vtep_mac == Some(mac) {
            return Err(Reason::VtepMacOwn(mac));
        }
        Ok((subnet, Some(mac)))
    }

    /// Sets the verdict of `key` from its standing and the contentions it wins.
    fn judge(&mut self, key: &str) {
        let Some(e) = self.entries.get(key) else {
            return;
        };
        let verdict = match &e.standing {
            Standing::Own => Verdict::Own,
            Standing::Rejected(r) => Verdict::Rejected(r.clone()),
            Standing::Contender { subnet, mac } => {
                if !wins(&self.subnets, subnet, key) {
                    Verdict::Rejected(Reason::SubnetTaken(*subnet))
                } else if let Some(m) = mac.filter(|m| !wins(&self.macs, m, key)) {
                    Verdict::Rejected(Reason::VtepMacTaken(m))
                } else {
                    Verdict::Accepted
                }
            }
        };
        if verdict == Verdict::Accepted {
            self.accepted.insert(key.to_string());
        } else {
            self.accepted.remove(key);
        }
        if let Some(e) = self.entries.get_mut(key) {
            e.verdict = verdict;
        }
    }

    /// Who wins against a lease rejected for `reason`, if anyone.
    fn holder(&self, reason: &Reason) -> Option<String> {
        let first = |s: &BTreeSet<Rank>| s.first().map(|r| r.1.clone());
        match reason {
            Reason::SubnetTaken(s) => self.subnets.get(s).and_then(first),
            Reason::VtepMacTaken(m) => self.macs.get(m).and_then(first),
            Reason::OverlapsOwn(_) | Reason::VtepMacOwn(_) => Some(self.own.key.clone()),
            _ => None,
        }
    }
}

/// Verdict and accepted lease of each key before a batch touched it.
type Before = HashMap<String, (Option<Verdict>, Option<Lease>)>;

/// Operations on a [`PeerSet`] whose net effect is reported as one [`Diff`] by [`Batch::finish`].
#[must_use = "the diff comes from finish()"]
pub struct Batch<'a> {
    set: &'a mut PeerSet,
    before: Before,
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
        let records: Vec<Record> = records.into_iter().collect();
        let listed: HashSet<&str> = records.iter().map(|r| r.key.as_str()).collect();
        let gone: Vec<String> = (self.set.entries.keys())
            .filter(|k| !listed.contains(k.as_str()))
            .cloned()
            .collect();
        for key in gone {
            self.set.update(&key, None, &mut self.before);
        }
        for r in records {
            self.apply(Change::Put(r));
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
        set.macs.clear();
        set.accepted.clear();
        for (key, e) in entries {
            set.update(&key, Some(e.record), &mut self.before);
        }
    }

    /// The net change since the batch began.
    pub fn finish(self) -> Diff {
        let set = &*self.set;
        let mut d = Diff::default();
        for (key, (was, old)) in self.before {
            let e = set.entries.get(&key);
            let new = e
                .filter(|e| e.verdict == Verdict::Accepted)
                .and_then(|e| e.record.value.as_ref().ok());
            match (old, new) {
                (Some(old), Some(new)) if old.attrs != new.attrs => d.changed.push(Peer {
                    key: key.clone(),
                    lease: new.clone(),
                }),
                (Some(old), None) => d.removed.push(Peer {
                    key: key.clone(),
                    lease: old,
                }),
                (None, Some(new)) => d.added.push(Peer {
                    key: key.clone(),
                    lease: new.clone(),
                }),
                _ => {}
            }
            if let Some(now @ Verdict::Rejected(reason)) = e.map(|e| &e.verdict) {
                if was.as_ref() != Some(now) {
                    d.rejected.push(Rejection {
                        holder: set.holder(reason),
                        reason: reason.clone(),
                        key,
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
    index: &mut HashMap<K, BTreeSet<Rank>>,
    what: K,
    rank: &Rank,
    enter: bool,
    recheck: &mut Vec<String>,
) {
    let set = index.entry(what).or_default();
    recheck.extend(set.first().map(|w| w.1.clone()));
    if enter {
        set.insert(rank.clone());
    } else {
        set.remove(rank);
    }
    match set.first() {
        Some(w) => recheck.push(w.1.clone()),
        None => {
            index.remove(&what);
        }
    }
}

fn wins<K: Hash + Eq>(index: &HashMap<K, BTreeSet<Rank>>, what: &K, key: &str) -> bool {
    index
        .get(what)
        .and_then(BTreeSet::first)
        .is_some_and(|w| w.1 == key)
}

#[cfg(test)]
mod tests;
