//! The lease registry: where the network config and every host's lease live, behind one face.
//! The agent, weftctl and doctor work through [`Registry`] with weft's own types (`crate::lease`:
//! [`Lease`], [`Record`], [`Change`]); no type of a store's client library leaves its module.
//!
//! What a store provides:
//! - the network config as text, and a way to wait for it to change ([`Registry::get_config`],
//!   [`Registry::wait_for`]);
//! - every lease record at once, in one consistent snapshot, handed over one by one so that
//!   10,000 of them are never held twice ([`Registry::list_records`]), each with a rank that says
//!   which of two contending leases is older;
//! - this host's lease: claimed (`begin_claim` says what this host held before, so its backend
//!   can keep identities; `claim` returns once one is held: etcd allocates a free subnet as
//!   flanneld does, a store that assigns subnets itself hands over the assigned one), renewed,
//!   released, and its time left;
//! - a [`Watch`]: batches of changes in order, from just after a listing, and word when the watch
//!   cannot go on from where it is and a fresh listing must be diffed in instead ([`Update`]).
//!
//! Two stores: etcd (`etcd/`, flannel's keys and JSON; weft allocates subnets) and the
//! Kubernetes API (`kube/`, `-kube-subnet-mgr`: Nodes' podCIDRs and flannel's annotations).
//! Adding another means a module beside them implementing the same methods, a variant of
//! [`Registry`] and [`Watch`] dispatching to it, and the flag that picks it in
//! [`Registry::connect_daemon`]. What the agent does with the records (judging peers, the peer
//! set, reconciling the data plane, health, metrics) comes for free.

pub mod etcd;
pub mod kube;

use std::time::Duration;

use anyhow::Result;
use ipnet::{Ipv4Net, Ipv6Net};

use crate::config::NetworkConfig;
use crate::flags::{DaemonArgs, EtcdArgs};
use crate::lease::{BadLease, Change, Lease, LeaseAttrs, Record};
use crate::policy::{Claims, Hint};

/// A point in the store's history: what a listing was read at, where a watch goes on from.
/// Opaque outside the store that made it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position(i64);

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// What renewing a lease found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    /// Good for another full TTL.
    Renewed,
    /// The store no longer has it (it expired, or was revoked): its record is gone with it.
    Expired,
}

/// Claiming this host's lease, begun ([`Registry::begin_claim`]): what the store held for this
/// host before, and what the store read to find it.
pub struct Claim {
    public_ip: std::net::Ipv4Addr,
    previous: Option<Lease>,
    /// What the store read to find it, which the claim goes on from.
    read: ClaimRead,
}

/// What [`Registry::begin_claim`] read, by store.
enum ClaimRead {
    /// etcd: the listing, folded for allocation, until the claim has used it.
    Etcd(Option<(Claims, Position)>),
    /// Kubernetes: this host's Node.
    Kube(Box<kube::Node>),
}

impl Claim {
    /// The lease this host held before, if any: its backend keeps identities from it (vxlan's
    /// VTEP MAC).
    pub fn previous(&self) -> Option<&Lease> {
        self.previous.as_ref()
    }
}

/// The lease [`Registry::claim`] is to take.
#[derive(Debug, Clone, Copy)]
pub struct LeaseRequest<'a> {
    pub config: &'a NetworkConfig,
    /// What this host publishes: PublicIP, backend type and data.
    pub attrs: &'a LeaseAttrs,
    /// How long it lasts unless renewed.
    pub ttl: Duration,
    /// The subnets of the previous run (subnet.env), preferred when free.
    pub hint: Hint,
}

/// What claiming reports while it works, for the caller to log and show.
#[derive(Debug)]
pub enum Claiming<'a> {
    /// Records that cannot be read (each is for the caller to say once).
    Unreadable(&'a [BadLease]),
    /// No lease can be had yet, and why: the claim waits for one.
    Waiting(&'a str),
}

/// What [`Registry::wait_for`] waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Awaited {
    /// Any change of the network config.
    Config,
    /// A lease record deleted (a subnet may have come free).
    LeaseDeleted,
}

/// All lease records at one point, split for allocation and weftctl.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    pub leases: Vec<Lease>,
    pub bad: Vec<BadLease>,
    /// Every record as stored, readable or not (`leases` and `bad` are the same, split).
    pub records: Vec<Record>,
}

/// How the store names what it holds, for messages and to find a subnet's record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    /// etcd: `<prefix>` (`/coreos.com/network`); Kubernetes: the annotation prefix.
    prefix: String,
    /// Kubernetes: records are Nodes, by name; the config is a file.
    kube: Option<String>,
}

impl Names {
    /// The names of the store `args` point at.
    pub fn of(args: &EtcdArgs) -> Self {
        Self::etcd(args.prefix())
    }

    /// etcd's names under `prefix` (`/coreos.com/network`).
    pub fn etcd(prefix: &str) -> Self {
        Self {
            prefix: prefix.trim_end_matches('/').to_string(),
            kube: None,
        }
    }

    /// The Kubernetes API's: Nodes with `annotations`, the config in `config` (a file).
    pub fn kube(annotations: &kube::Annotations, config: Option<std::path::PathBuf>) -> Self {
        Self {
            prefix: annotations.prefix().to_string(),
            kube: Some(
                config.map_or_else(|| "-net-config-path".into(), |p| p.display().to_string()),
            ),
        }
    }

    /// Where the network config is stored.
    pub fn config(&self) -> String {
        match &self.kube {
            Some(file) => file.clone(),
            None => format!("{}/config", self.prefix),
        }
    }

    /// The record under which `subnet` is leased (Kubernetes: a Node, named by its podCIDR).
    pub fn lease(&self, subnet: Ipv4Net, ipv6: Option<Ipv6Net>) -> String {
        match &self.kube {
            Some(_) => format!("the node with podCIDR {subnet}"),
            None => format!("{}{}", self.subnets(), etcd::subnet_key(subnet, ipv6)),
        }
    }

    /// The subnets a record's key names, if it names any (a Node's name names none).
    pub fn subnet_of(&self, key: &str) -> Option<etcd::KeySubnets> {
        self.kube
            .is_none()
            .then(|| etcd::subnet_of(key, &self.subnets()))
            .flatten()
    }

    pub(crate) fn subnets(&self) -> String {
        format!("{}/subnets/", self.prefix)
    }

    pub(crate) fn watched(&self) -> String {
        format!("{}/", self.prefix)
    }
}

/// One change a watch reports, in the store's order.
#[derive(Debug, Clone, PartialEq)]
// Transient, one per event and moved along: boxing would cost an allocation each.
#[allow(clippy::large_enum_variant)]
pub enum Event {
    /// A lease record put or deleted.
    Lease(Change),
    /// The network config stored anew (`None`: deleted).
    Config(Option<String>),
}

/// What a [`Watch`] delivers next.
#[derive(Debug)]
pub enum Update {
    /// Changes since the last update, in order (possibly none: the watch only moved on).
    Events(Vec<Event>),
    /// The history the watch would go on from is gone (compacted): list again and diff.
    FellBehind,
    /// The watch cannot get past where it is (a change too large to receive, breaks with nothing
    /// delivered): list again and diff, and until that is done weftd is not following the
    /// store. Why, for readiness and the log.
    Stuck(String),
}

/// The store weftd keeps its lease in. See the module doc for what a store provides.
#[derive(Clone)]
pub enum Registry {
    /// Boxed: the etcd client is large, and a registry is made once.
    Etcd(Box<etcd::EtcdStore>),
    Kube(kube::KubeStore),
}

impl Registry {
    /// Connects to the etcd the flags name.
    pub async fn connect(args: &EtcdArgs) -> Result<Self> {
        etcd::EtcdStore::connect(args)
            .await
            .map(|s| Self::Etcd(Box::new(s)))
    }

    /// Connects to the store weftd's flags pick: the Kubernetes API with -kube-subnet-mgr, else
    /// etcd.
    pub async fn connect_daemon(args: &DaemonArgs) -> Result<Self> {
        if args.kube.kube_subnet_mgr {
            let store = kube::KubeStore::connect(&args.kube, args.net_config_path.clone()).await?;
            return Ok(Self::Kube(store));
        }
        Self::connect(&args.etcd).await
    }

    pub fn names(&self) -> &Names {
        match self {
            Self::Etcd(s) => s.names(),
            Self::Kube(s) => s.names(),
        }
    }

    /// Whether the backend programs peers (see `DataPlane::PEERS`); when it does not, a store
    /// that can (Kubernetes) lists and watches this host's record only. etcd lists them all
    /// either way (its claim needs them).
    pub fn follow_peers(&mut self, peers: bool) {
        if let Self::Kube(s) = self {
            s.follow_peers(peers);
        }
    }

    /// The record that holds `own`, this host's lease: etcd its subnet's key, Kubernetes this
    /// host's Node.
    pub fn own_key(&self, own: &Lease) -> String {
        match self {
            Self::Etcd(s) => s.names().lease(own.subnet, own.ipv6_subnet),
            Self::Kube(s) => s.node().to_string(),
        }
    }

    /// Whether `stored`, found in this host's record, is still what this host published there
    /// (`published`). etcd: the same PublicIP (another host writing the key takes it over);
    /// Kubernetes: the same attributes (the Node is this host's by name, and annotations changed
    /// by hand are written again).
    pub fn still_ours(&self, stored: &Lease, published: &LeaseAttrs) -> bool {
        match self {
            Self::Etcd(_) => stored.attrs.public_ip == published.public_ip,
            Self::Kube(_) => stored.attrs == *published,
        }
    }

    /// This host's lease is published and its data plane up: Kubernetes marks the Node's
    /// network available (NetworkUnavailable=False, as flanneld does), if asked to.
    pub async fn data_plane_up(&self) -> Result<()> {
        match self {
            Self::Etcd(_) => Ok(()),
            Self::Kube(s) => s.data_plane_up().await,
        }
    }

    /// The config text (`None`: there is none) and the point it was read at.
    pub async fn get_config(&self) -> Result<(Option<String>, Position)> {
        match self {
            Self::Etcd(s) => s.get_config().await,
            Self::Kube(s) => s.get_config().await,
        }
    }

    pub async fn put_config(&self, text: &str) -> Result<()> {
        match self {
            Self::Etcd(s) => s.put_config(text).await,
            Self::Kube(s) => s.put_config(text).await,
        }
    }

    /// Stores the config only if there is none, atomically: any number of writers racing leave
    /// exactly one. `Ok(None)`: ours was stored; `Ok(Some(text))`: the one already there, kept.
    pub async fn put_config_if_absent(&self, text: &str) -> Result<Option<String>> {
        match self {
            Self::Etcd(s) => s.put_config_if_absent(text).await,
            Self::Kube(s) => s.put_config_if_absent(text).await,
        }
    }

    /// Blocks until `what` happens after `after`, or a minute passes (the caller looks again
    /// either way); a failure waits a little and returns.
    pub async fn wait_for(&self, after: Position, what: Awaited) {
        match self {
            Self::Etcd(s) => s.wait_for(after, what).await,
            Self::Kube(s) => s.wait_for(after, what).await,
        }
    }

    /// Every lease record, handed to `each` one by one, all from one consistent snapshot, and
    /// the point it was read at. A failure midway fails the listing: the caller starts over.
    pub async fn list_records(&self, each: impl FnMut(Record)) -> Result<Position> {
        match self {
            Self::Etcd(s) => s.list_records_paged(each).await.map(Position),
            Self::Kube(s) => s.list_records_paged(each).await.map(Position),
        }
    }

    /// Every lease record, readable ones and the others apart.
    pub async fn list(&self) -> Result<Listing> {
        let mut listing = Listing::default();
        self.list_records(|record| {
            match &record.value {
                Ok(l) => listing.leases.push(l.clone()),
                Err(e) => listing.bad.push(BadLease {
                    key: record.key.clone(),
                    reason: e.to_string(),
                }),
            }
            listing.records.push(record);
        })
        .await?;
        Ok(listing)
    }

    /// Begins claiming this host's lease (`public_ip`): reads what the store held for it before,
    /// retrying until the store answers.
    pub async fn begin_claim(&self, public_ip: std::net::Ipv4Addr) -> Claim {
        match self {
            Self::Etcd(s) => s.begin_claim(public_ip).await,
            Self::Kube(s) => s.begin_claim(public_ip).await,
        }
    }

    /// Claims this host's lease as `req` asks and returns it once held; while none can be had
    /// (the network full) it waits, saying so through `progress`.
    pub async fn claim(
        &self,
        claim: Claim,
        req: &LeaseRequest<'_>,
        progress: &mut dyn FnMut(Claiming<'_>),
    ) -> Lease {
        match self {
            Self::Etcd(s) => s.claim(claim, req, progress).await,
            Self::Kube(s) => s.claim(claim, req, progress).await,
        }
    }

    /// Renews a lease to its full TTL (a reservation needs none: `Renewed`).
    pub async fn renew(&self, lease: &Lease) -> Result<Renewal> {
        match self {
            Self::Etcd(s) => s.renew(lease).await,
            Self::Kube(s) => s.renew(lease).await,
        }
    }

    /// Gives up a lease this host holds (its record goes with it), best effort; a reservation
    /// is the operator's and stays.
    pub async fn release(&self, lease: &Lease) {
        match self {
            Self::Etcd(s) => s.release(lease).await,
            Self::Kube(s) => s.release(lease).await,
        }
    }

    /// Seconds a lease has left (`None`: expired or unknown; a reservation: `None` as well,
    /// callers ask [`Lease::is_reservation`] first).
    pub async fn time_left(&self, lease: &Lease) -> Result<Option<i64>> {
        match self {
            Self::Etcd(s) => s.time_left(lease).await,
            Self::Kube(s) => s.time_left(lease).await,
        }
    }

    /// A watch of the config and every lease record from just after `listed` (a listing's
    /// point): changes up to it are in that listing already.
    pub fn watch(&self, listed: Position) -> Watch {
        match self {
            Self::Etcd(s) => Watch::Etcd(Box::new(etcd::EtcdWatch::new((**s).clone(), listed.0))),
            Self::Kube(s) => Watch::Kube(Box::new(kube::KubeWatch::new(s.clone(), listed.0))),
        }
    }
}

/// Changes of the config and the lease records as they happen. See [`Watch::next`].
pub enum Watch {
    /// Boxed, each: they hold a clone of their store.
    Etcd(Box<etcd::EtcdWatch>),
    Kube(Box<kube::KubeWatch>),
}

impl Watch {
    /// The next update. Cancel-safe: the agent polls it in a `select!` loop; a watch that
    /// breaks is set up again inside, backing off, and says so in the log.
    pub async fn next(&mut self) -> Update {
        match self {
            Self::Etcd(w) => w.next().await,
            Self::Kube(w) => w.next().await,
        }
    }

    /// A new listing was read at `at` and its records are in the caller's state: changes up to
    /// it are skipped, and once the watch is set up again it goes on from there.
    pub fn listed(&mut self, at: Position) {
        match self {
            Self::Etcd(w) => w.listed(at.0),
            Self::Kube(w) => w.listed(at.0),
        }
    }

    /// Sets the watch up again now, from just after the last listing (this host's lease was
    /// lost and taken again: the old watch may have missed what happened meanwhile).
    pub fn restart(&mut self) {
        match self {
            Self::Etcd(w) => w.restart(),
            Self::Kube(w) => w.restart(),
        }
    }
}
