//! From the lease records of the store (`<prefix>/subnets/` in etcd) to the peers the data plane
//! is given: a pure function of everything stored there (no I/O), kept up to date incrementally.
//! The watch (a batch of events) and a fresh listing (start, compaction) go through the same code
//! ([`Edit`]) and end in the same set, whatever order the events came in: a lease's fate depends
//! only on what is stored now.
//!
//! Files: `compact.rs` (a lease as the set keeps it), `contention.rs` (who holds a subnet or an
//! identity), `edit.rs` (operations reported as one [`Diff`]).
//!
//! Peers are keyed by record key. A stored lease is a peer when, on its own, it
//! - has a key in flannel's one spelling (`10.244.52.0-24`, dual-stack `…-24&fd00:10:0:5::-64`)
//!   and a readable value;
//! - is a subnet of exactly the network's SubnetLen, inside Network, not overlapping this host's;
//! - has a unicast PublicIP that is none of this host's addresses;
//! - on a dual-stack network, if it has an IPv6 subnet: the same for it (IPv6SubnetLen, inside
//!   IPv6Network, not overlapping this host's) and for its PublicIPv6, if any (a lease without
//!   an IPv6 subnet is an IPv4-only peer; on an IPv4-only network its IPv6 side is ignored);
//! - publishes what its backend needs to be reached, and an identity that is not this host's
//!   (vxlan: a unicast, non-zero VtepMAC; see `weft_backends::DataPlane::identity`);
//!
//! and it wins each contention it is in: among the leases that pass the checks above, the oldest
//! (lowest rank, etcd's create revision, then key) holds a subnet (IPv4 or IPv6) and an identity. A loser stays
//! stored and becomes a peer as soon as the winner goes.
//!
//! Every operation returns a [`Diff`] of the accepted set plus the leases newly rejected, and costs
//! O(log n) per changed key: contention is looked up in indexes by subnet and by identity, and only the
//! leases whose win or loss can change (old and new winners) are judged again. Changing this
//! host's own lease or addresses judges everything again (rare).
//!
//! Kept small, as it is held for weftd's life and a cluster may have 10,000 hosts: each key is
//! stored once and shared by the indexes, each lease in a compact form (its BackendData as JSON
//! text), and a diff names peers rather than copying their leases: about 0.5 KB a lease.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use weft_backends::iface::{is_unicast_host, is_unicast_host6};
use weft_backends::{Identity, IdentityKind};

mod compact;
mod contention;
mod edit;

pub use crate::lease::Change;
use crate::lease::{Lease, Record, Unreadable};
use compact::{Compact, KNOWN_TYPES};
use contention::{contend, wins, Contenders, Key, Rank};
use edit::Before;
pub use edit::Edit;

/// This host's own lease, as far as judging peers needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Own {
    /// Its etcd key: never a peer, whatever it holds (whether it is still ours is the agent's
    /// question; see [`PeerSet::get`]).
    pub key: String,
    pub subnet: Ipv4Net,
    pub ipv6_subnet: Option<Ipv6Net>,
    /// The identity it publishes (vxlan: its VTEP MAC), which no peer may use.
    pub identity: Option<Identity>,
    /// The identity of its IPv6 side (vxlan: the IPv6 device's VTEP MAC, in BackendV6Data).
    pub identity6: Option<Identity>,
}

/// Why a stored lease is not a peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Reason {
    #[error("{0}")]
    Unreadable(Unreadable),
    #[error("not inside the network {0}")]
    OutsideNetwork(IpNet),
    #[error("a /{len} is not a subnet of this network ({}SubnetLen {want})", if *.v6 { "IPv6" } else { "" })]
    WrongLength { len: u8, want: u8, v6: bool },
    #[error("overlaps this host's subnet {0}")]
    OverlapsOwn(IpNet),
    #[error("{key} {ip} is not a unicast host address", key = public_ip_key(.0), ip = .0)]
    PublicIpNotUnicast(IpAddr),
    #[error("{key} {ip} is an address of this host", key = public_ip_key(.0), ip = .0)]
    PublicIpLocal(IpAddr),
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
    SubnetTaken(IpNet),
    #[error("{0} is used by an older lease")]
    IdentityTaken(Identity),
}

/// The lease JSON's name for a public address of this family.
fn public_ip_key(a: &IpAddr) -> &'static str {
    if a.is_ipv4() {
        "PublicIP"
    } else {
        "PublicIPv6"
    }
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
    /// Every address of this host, both families.
    local: HashSet<IpAddr>,
    /// The IPv6 side of a dual-stack network.
    ipv6: Option<Ipv6Scope>,
    entries: HashMap<Key, Entry>,
    /// Contenders (leases passing every check of their own) by subnet, IPv4 and IPv6, and by
    /// identity; the first of each wins. A subnet has several contenders when keys differ only
    /// in their IPv6 part (`10.5.72.0-24` and `10.5.72.0-24&fc00::-64`) or in their IPv4 part.
    subnets: HashMap<IpNet, Contenders>,
    identities: HashMap<Identity, Contenders>,
    /// The same for identities of IPv6 sides (another device: the same MAC on one host's
    /// IPv4 device and another's IPv6 device is no clash).
    identities6: HashMap<Identity, Contenders>,
    accepted: BTreeSet<Key>,
    /// Accepted peers by BackendType (index into [`KNOWN_TYPES`], or [`OTHER_TYPE`]), kept as
    /// `accepted` changes so that the count costs nothing per event.
    by_type: [usize; KNOWN_TYPES.len() + 1],
}

/// The IPv6 side of the network leases are judged against.
#[derive(Debug, Clone)]
pub struct Ipv6Scope {
    pub network: Ipv6Net,
    pub subnet_len: u8,
}

/// A stored key. Its verdict is not kept: it follows from its standing and the contention
/// indexes (`verdict_of`), and an accepted key is also in `accepted`.
#[derive(Debug, Clone)]
struct Entry {
    rank: i64,
    value: Result<Compact, Unreadable>,
    standing: Standing,
}

/// What a lease amounts to on its own, before contention.
#[derive(Debug, Clone)]
enum Standing {
    Own,
    /// Boxed: most leases pass, and every entry has a standing.
    Rejected(Box<Reason>),
    /// Its subnet is the lease's (the entry's value is then readable).
    Contender {
        identity: Option<Identity>,
        identity6: Option<Identity>,
    },
}

// One per stored lease: its two identities, inline.
const _: () = assert!(std::mem::size_of::<Standing>() == 32);

/// What a contender contends for: its subnets (the IPv6 one on a dual-stack network) and its
/// identity.
#[derive(Debug, Clone, Copy)]
struct Claimed<'a> {
    subnet: Ipv4Net,
    subnet6: Option<Ipv6Net>,
    identity: Option<&'a Identity>,
    identity6: Option<&'a Identity>,
}

impl Claimed<'_> {
    fn subnets(&self) -> impl Iterator<Item = IpNet> {
        [Some(IpNet::V4(self.subnet)), self.subnet6.map(IpNet::V6)]
            .into_iter()
            .flatten()
    }
}

/// What `value`, standing as `standing`, contends for; `dual`: whether the network is
/// dual-stack (else IPv6 subnets are not judged, and contend for nothing).
fn contention<'a>(
    value: &'a Result<Compact, Unreadable>,
    standing: &'a Standing,
    dual: bool,
) -> Option<Claimed<'a>> {
    match (value, standing) {
        (
            Ok(v),
            Standing::Contender {
                identity,
                identity6,
            },
        ) => Some(Claimed {
            subnet: v.subnet,
            subnet6: v.ipv6_subnet().filter(|_| dual),
            identity: identity.as_ref(),
            identity6: identity6.as_ref().filter(|_| dual),
        }),
        _ => None,
    }
}

impl PeerSet {
    /// An empty set for `network` with subnets of `subnet_len`, judged against this host's lease
    /// and addresses (`local`: every address of this host, its PublicIP included).
    pub fn new(network: Ipv4Net, subnet_len: u8, own: Own, local: HashSet<IpAddr>) -> Self {
        Self {
            network,
            subnet_len,
            own,
            local,
            ipv6: None,
            entries: HashMap::new(),
            subnets: HashMap::new(),
            identities: HashMap::new(),
            identities6: HashMap::new(),
            accepted: BTreeSet::new(),
            by_type: [0; KNOWN_TYPES.len() + 1],
        }
    }

    /// Judges IPv6 subnets too, against this IPv6 side of the network.
    pub fn with_ipv6(mut self, scope: Option<Ipv6Scope>) -> Self {
        self.ipv6 = scope;
        self
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
    pub fn edit(&mut self) -> Edit<'_> {
        Edit {
            set: self,
            before: Before::default(),
            listed: None,
        }
    }

    /// One watch event.
    pub fn apply(&mut self, change: Change) -> Diff {
        let mut b = self.edit();
        b.apply(change);
        b.finish()
    }

    /// Makes the stored leases exactly `records` (a fresh listing).
    pub fn replace_all(&mut self, records: impl IntoIterator<Item = Record>) -> Diff {
        let mut b = self.edit();
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
    fn accepted_lease(&self, key: &str) -> Option<&Compact> {
        self.accepted.contains(key).then_some(())?;
        self.readable(key)
    }

    /// The readable lease stored at `key`, whatever its verdict.
    fn readable(&self, key: &str) -> Option<&Compact> {
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
            value: e.value.as_ref().map(Compact::lease).map_err(Clone::clone),
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
            (r.rank, r.value.map(Compact::new), standing)
        });
        match (&new, self.entries.get(key)) {
            (Some((rev, value, _)), Some(e)) if e.rank == *rev && e.value == *value => return,
            (None, None) => return,
            _ => {}
        }
        self.remember(key, before);
        // Whoever contends with `key`, before or after, may win or lose by this change: their
        // verdicts as they stand now, before the indexes move.
        let dual = self.ipv6.is_some();
        let old = self
            .entries
            .get(key)
            .map(|e| contention(&e.value, &e.standing, dual));
        let new_one = new.as_ref().map(|(_, v, st)| contention(v, st, dual));
        for c in [old, new_one].into_iter().flatten().flatten() {
            self.remember_contenders(c, before);
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
            if let Some(c) = contention(&old.value, &old.standing, dual) {
                let rank = (old.rank, key.clone());
                self.contend(c, rank, false, &mut recheck);
            }
        }
        if let Some((rank, value, standing)) = new {
            if let Some(c) = contention(&value, &standing, dual) {
                let rank = (rank, key.clone());
                self.contend(c, rank, true, &mut recheck);
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

    /// Records the verdict of `key` before this edit first touches it.
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

    /// Records the verdicts of every contender for what `c` claims.
    fn remember_contenders(&self, c: Claimed<'_>, before: &mut Before) {
        let subnets = c.subnets().filter_map(|s| self.subnets.get(&s));
        let id = c.identity.and_then(|i| self.identities.get(i));
        let id6 = c.identity6.and_then(|i| self.identities6.get(i));
        for (_, k) in subnets.chain(id).chain(id6).flat_map(Contenders::ranks) {
            self.remember(k, before);
        }
    }

    /// Enters `rank` into (or withdraws it from) the contentions for what `c` claims, noting
    /// their winners before and after.
    fn contend(&mut self, c: Claimed<'_>, rank: Rank, enter: bool, recheck: &mut Vec<Key>) {
        for s in c.subnets() {
            contend(&mut self.subnets, &s, &rank, enter, recheck);
        }
        if let Some(i) = c.identity {
            contend(&mut self.identities, i, &rank, enter, recheck);
        }
        if let Some(i) = c.identity6 {
            contend(&mut self.identities6, i, &rank, enter, recheck);
        }
    }

    /// The checks a lease passes or fails on its own.
    fn stand(&self, record: &Record) -> Standing {
        if record.key == self.own.key {
            return Standing::Own;
        }
        match self.check(record) {
            Ok((identity, identity6)) => Standing::Contender {
                identity,
                identity6,
            },
            Err(reason) => Standing::Rejected(Box::new(reason)),
        }
    }

    /// The checks of [`PeerSet::stand`]; the lease's identities, of its IPv4 and IPv6 sides.
    fn check(&self, record: &Record) -> Result<(Option<Identity>, Option<Identity>), Reason> {
        let lease = record
            .value
            .as_ref()
            .map_err(|e| Reason::Unreadable(e.clone()))?;
        let subnet = lease.subnet;
        if !self.network.contains(&subnet) {
            return Err(Reason::OutsideNetwork(self.network.into()));
        }
        if subnet.prefix_len() != self.subnet_len {
            return Err(Reason::WrongLength {
                len: subnet.prefix_len(),
                want: self.subnet_len,
                v6: false,
            });
        }
        let own = self.own.subnet;
        if own.contains(&subnet) || subnet.contains(&own) {
            return Err(Reason::OverlapsOwn(own.into()));
        }
        let ip = lease.attrs.public_ip;
        if !is_unicast_host(ip) {
            return Err(Reason::PublicIpNotUnicast(ip.into()));
        }
        if self.local.contains(&ip.into()) {
            return Err(Reason::PublicIpLocal(ip.into()));
        }
        if let (Some(scope), Some(subnet)) = (&self.ipv6, lease.ipv6_subnet) {
            self.check_v6(scope, subnet, lease.attrs.public_ipv6)?;
        }
        let Some(kind) = weft_backends::kind(&lease.attrs.backend_type) else {
            return Ok((None, None));
        };
        let bad = |reason| Reason::BadIdentity {
            kind: kind.identity_kind,
            reason,
        };
        let identity = (kind.identity)(lease.attrs.backend_data.as_ref()).map_err(bad)?;
        // The IPv6 side's, where it has BackendV6Data on a dual-stack network (without, its
        // IPv6 side is a subnet only: unreachable through a device, but no bad lease).
        let identity6 = match (&self.ipv6, &lease.attrs.backend_v6_data) {
            (Some(_), Some(data)) => {
                (kind.identity)(Some(data)).map_err(|e| bad(format!("BackendV6Data: {e}")))?
            }
            _ => None,
        };
        for (i, own) in [
            (&identity, &self.own.identity),
            (&identity6, &self.own.identity6),
        ] {
            if let Some(i) = i.as_ref().filter(|i| own.as_ref() == Some(*i)) {
                return Err(Reason::IdentityOwn(i.clone()));
            }
        }
        Ok((identity, identity6))
    }

    /// The IPv6 side's rules, as [`PeerSet::check`]'s for IPv4.
    fn check_v6(
        &self,
        scope: &Ipv6Scope,
        subnet: Ipv6Net,
        public_ip: Option<Ipv6Addr>,
    ) -> Result<(), Reason> {
        if !scope.network.contains(&subnet) {
            return Err(Reason::OutsideNetwork(scope.network.into()));
        }
        if subnet.prefix_len() != scope.subnet_len {
            return Err(Reason::WrongLength {
                len: subnet.prefix_len(),
                want: scope.subnet_len,
                v6: true,
            });
        }
        if let Some(own) = self.own.ipv6_subnet {
            if own.contains(&subnet) || subnet.contains(&own) {
                return Err(Reason::OverlapsOwn(own.into()));
            }
        }
        if let Some(ip) = public_ip {
            if !is_unicast_host6(ip) {
                return Err(Reason::PublicIpNotUnicast(ip.into()));
            }
            if self.local.contains(&ip.into()) {
                return Err(Reason::PublicIpLocal(ip.into()));
            }
        }
        Ok(())
    }

    /// What `e`, stored at `key`, is: from its standing and the contentions it wins.
    fn verdict_of(&self, key: &str, e: &Entry) -> Verdict {
        match &e.standing {
            Standing::Own => Verdict::Own,
            Standing::Rejected(r) => Verdict::Rejected(Reason::clone(r)),
            Standing::Contender { .. } => {
                let dual = self.ipv6.is_some();
                let Some(c) = contention(&e.value, &e.standing, dual) else {
                    return Verdict::Accepted;
                };
                if let Some(s) = c.subnets().find(|s| !wins(&self.subnets, s, key)) {
                    Verdict::Rejected(Reason::SubnetTaken(s))
                } else if let Some(i) = c.identity.filter(|i| !wins(&self.identities, *i, key)) {
                    Verdict::Rejected(Reason::IdentityTaken(i.clone()))
                } else if let Some(i) = c.identity6.filter(|i| !wins(&self.identities6, *i, key)) {
                    Verdict::Rejected(Reason::IdentityTaken(i.clone()))
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
            Reason::IdentityTaken(i) => (self.identities.get(i))
                .or_else(|| self.identities6.get(i))
                .and_then(first),
            Reason::OverlapsOwn(_) | Reason::IdentityOwn(_) => Some(self.own.key.clone()),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests;
