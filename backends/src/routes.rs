//! Owned routes: the one route reconciler used by host-gw, vxlan (and its DirectRouting) and udp.
//!
//! Which routes an instance owns. Every route weft adds carries protocol [`RTPROT_WEFT`], but
//! several weftd instances may share a host (two flannel networks, each with its own etcd prefix),
//! so the protocol alone says "some weft", not "this weft". A route of the main table belongs to
//! this instance when it carries protocol 87 **and** either its destination lies inside this
//! instance's cluster network, or it leaves through this instance's own overlay device
//! (`flannel.<VNI>`, `flannel0`), see [`Owner`]. Two instances on one host must have disjoint
//! networks (an address cannot be routed into two overlays) and distinct devices, so no route is
//! owned by both; the device clause also lets an instance clean up its own routes into its device
//! after its network changed.
//!
//! Routes weft does not own are never replaced or deleted. A desired route whose destination is
//! already routed by someone else (typically the kernel's connected route of docker0 or cni0
//! when a peer's lease is the subnet of a local bridge) is not installed: it is reported as
//! [`Error::RouteConflict`] and looked at again at every reconcile, so weft's route appears once
//! the other one is gone. If weft's own route was there first, it is withdrawn: the destination
//! belongs to whoever else routes it, which on one host is the local bridge. New routes are
//! added with NLM_F_EXCL, so one that appears between the dump and the add is not overwritten.
//!
//! One exception keeps the switch from flanneld to weft seamless: a route exactly like the one
//! weft wants (same destination, gateway, device, on-link flag, metric 0, plain unicast) with
//! protocol `boot`, which is how flanneld writes its routes, is adopted: weft adds its own copy
//! ahead of it and deletes the old one. Forwarding never changes on the way; from then on the
//! route is weft's, and goes when the peer leaves, as it would have under flanneld.
//!
//! Where the kernel has nexthop objects (Linux 5.3+), a route through a gateway names one
//! (`10.244.3.0/24 nhid 183763712 proto 87`, which `ip route` also shows with its `via` and
//! `dev`): with thousands of peers, classic routes with distinct gateways cost the kernel time
//! quadratic in their number (see [`crate::nexthop`]). Each such route has a nexthop of its own,
//! protocol 87, whose id is the destination's network address ([`nexthop_id`]); a peer whose
//! gateway changes is one nexthop replaced, its route untouched. Ownership of nexthops follows
//! the routes' rule (protocol 87, and the id inside the network or the device this instance's).
//! A route keeps the classic form where its nexthop cannot be made (the id is another program's,
//! the kernel refuses it) and on kernels without nexthops; a full pass moves classic routes to
//! nexthops where it can. A route someone else makes naming one of weft's nexthops goes when
//! the kernel deletes that nexthop with weft's route.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::Ipv4Addr;
use std::sync::Arc;

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use rtnetlink::packet_core::{NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE};
use rtnetlink::packet_route::link::LinkAttribute;
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
    RouteType,
};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::{Handle, RouteMessageBuilder};
use tracing::{debug, info};

use crate::batch::{Batch, Request};
use crate::error::{errno, is_gone};
use crate::nexthop::{self, Nexthop, NexthopMessage};
use crate::{Error, ErrorList};

/// The route protocol number (`rtm_protocol`) marking routes weft created. `ip route` shows it as
/// `proto 87` (add `87 weft` to /etc/iproute2/rt_protos for a name). 87 is unassigned in the
/// kernel's and iproute2's lists; 0x57 is ASCII 'W'.
pub const RTPROT_WEFT: u8 = 0x57;

/// `RTPROT_BOOT`, the protocol of routes flanneld (Go netlink's default) and `ip route add` create.
const RTPROT_BOOT: u8 = 3;

/// Which weft routes one backend instance owns (see the module comment).
#[derive(Debug, Clone, Copy)]
pub struct Owner {
    /// The instance's cluster network: every route it creates leads into it.
    pub network: Ipv4Net,
    /// The instance's own overlay device, if it has one (host-gw has none: the underlay is shared).
    pub device: Option<u32>,
}

impl Owner {
    fn owns(&self, r: &Installed) -> bool {
        r.protocol == RTPROT_WEFT
            && (self.network.contains(&r.dst) || (r.oif.is_some() && r.oif == self.device))
    }

    /// The same rule for a nexthop, whose id is its route's destination address.
    fn owns_nexthop(&self, nh: &Nexthop) -> bool {
        nh.protocol == RTPROT_WEFT
            && (self.network.contains(&Ipv4Addr::from(nh.id))
                || (nh.oif.is_some() && nh.oif == self.device))
    }
}

/// The id of weft's nexthop for the route to `dst`: its network address as a number. Derived,
/// not allocated, so a restarted weftd finds its nexthops with no record of them, and no two of
/// an instance's routes share one. Another program's nexthop may hold the id (FRR's zebra
/// counts up from 1, far below any cluster network's addresses): that route stays classic.
pub fn nexthop_id(dst: Ipv4Net) -> Option<u32> {
    Some(u32::from(dst.network())).filter(|&id| id != 0)
}

/// One desired route `dst via gateway dev <oif> [onlink]` in the main table, or `dst dev <oif>`
/// (a device route, as udp's route into flannel0) when there is no gateway.
#[derive(Debug, Clone)]
pub struct RouteSpec {
    pub dst: Ipv4Net,
    pub gateway: Option<Ipv4Addr>,
    pub oif: u32,
    /// Interface name, for messages only (shared: a pass may hold 10,000 routes).
    pub dev: Arc<str>,
    /// vxlan routes point at the peer's network address through the device, which no local
    /// prefix covers: the kernel must be told the gateway is on-link.
    pub onlink: bool,
}

impl RouteSpec {
    /// `dst dev <oif>`: everything for `dst` goes into the device, with no next hop.
    pub fn device(dst: Ipv4Net, oif: u32, dev: &str) -> Self {
        Self {
            dst,
            gateway: None,
            oif,
            dev: dev.into(),
            onlink: false,
        }
    }

    /// Whether `r` forwards exactly as this route would (whoever created it, in either form).
    fn forwards_like(&self, r: &Installed) -> bool {
        r.dst == self.dst
            && r.gateway == self.gateway
            && r.oif == Some(self.oif)
            && r.onlink == self.onlink
            && r.priority == 0
            && r.clean
    }
}

impl fmt::Display for RouteSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.gateway {
            Some(g) => write!(f, "{} via {g} dev {}", self.dst, self.dev)?,
            None => write!(f, "{} dev {}", self.dst, self.dev)?,
        }
        if self.onlink {
            f.write_str(" onlink")?;
        }
        Ok(())
    }
}

/// A route of the main table as the kernel reports it. A route naming a nexthop has that
/// nexthop's gateway, device and on-link flag here.
#[derive(Debug)]
struct Installed {
    dst: Ipv4Net,
    gateway: Option<Ipv4Addr>,
    oif: Option<u32>,
    onlink: bool,
    priority: u32,
    protocol: u8,
    /// The nexthop object the route names, if any.
    nh: Option<u32>,
    /// Plain unicast, universe scope, no TOS, one plain next hop: the only shape weft creates.
    clean: bool,
    msg: RouteMessage,
}

/// Makes the routes `owner` owns exactly `desired`, in the classic form: adds what is missing,
/// replaces its own routes that differ, deletes its own routes no peer wants, and leaves every
/// other route alone (a desired route whose destination another route holds is a
/// [`Error::RouteConflict`]). Every failure is collected, none stops the pass. For a few device
/// routes (udp's); peers' routes go through [`OwnedRoutes`].
pub async fn reconcile_owned(
    handle: &Handle,
    batch: &Batch,
    owner: &Owner,
    desired: &[RouteSpec],
) -> ErrorList {
    reconcile_routes(handle, batch, None, owner, desired)
        .await
        .errs
}

/// Where a route weft put in place sends its destination, and through which of weft's nexthop
/// objects, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Hop {
    gateway: Option<Ipv4Addr>,
    oif: u32,
    onlink: bool,
    nh: Option<u32>,
}

impl Hop {
    /// `r` in the classic form.
    fn classic(r: &RouteSpec) -> Self {
        Self {
            gateway: r.gateway,
            oif: r.oif,
            onlink: r.onlink,
            nh: None,
        }
    }

    /// `r` through its own nexthop where it has a gateway and `nexthops` (the kernel has them).
    fn of(r: &RouteSpec, nexthops: bool) -> Self {
        let nh = (nexthops && r.gateway.is_some())
            .then(|| nexthop_id(r.dst))
            .flatten();
        Self {
            nh,
            ..Self::classic(r)
        }
    }

    /// The nexthop object this hop names, as weft makes it.
    fn nexthop(&self) -> Option<Nexthop> {
        self.nh.map(|id| Nexthop {
            id,
            protocol: RTPROT_WEFT,
            oif: Some(self.oif),
            gateway: self.gateway,
            onlink: self.onlink,
            other: false,
        })
    }
}

/// Whether the kernel has nexthop objects, once a full pass found out.
#[derive(Default)]
enum Nexthops {
    #[default]
    Unknown,
    Absent,
    Present(nexthop::Handle),
}

/// The routes one backend instance has in the kernel, as its last full reconcile found and left
/// them and as the targeted changes since left them: what [`OwnedRoutes::apply`] works from
/// instead of dumping the routing table (10,000 peers are 10,000 routes).
#[derive(Default)]
pub struct OwnedRoutes {
    /// weft's routes, by destination.
    installed: HashMap<Ipv4Net, Hop>,
    /// Wanted but not in place: another route holds the destination (described as the last
    /// full reconcile saw it, if it did), or adding failed. Tried again by
    /// [`OwnedRoutes::retry`].
    blocked: HashMap<Ipv4Net, (RouteSpec, Option<String>)>,
    /// A targeted change met a state only a full reconcile can judge (a route nobody knew of at
    /// a destination: flanneld's to adopt, or another's to yield to), or failed halfway.
    stale: bool,
    nexthops: Nexthops,
}

impl OwnedRoutes {
    /// [`reconcile_owned`], with routes through gateways naming nexthops where the kernel has
    /// them, remembering what it left in place.
    pub async fn reconcile(
        &mut self,
        handle: &Handle,
        batch: &Batch,
        owner: &Owner,
        desired: &[RouteSpec],
    ) -> ErrorList {
        let objects = match self.list_nexthops().await {
            Ok(o) => o,
            Err(e) => {
                // Without knowing weft's nexthops, routes might be judged wrongly: nothing is
                // touched, and the next full pass tries again.
                self.stale = true;
                return e.into();
            }
        };
        let pass = reconcile_routes(handle, batch, objects, owner, desired).await;
        self.installed.clear();
        self.blocked.clear();
        let mut held = pass.held;
        for (want, hop) in desired.iter().zip(pass.placed) {
            match hop {
                Some(hop) => {
                    self.installed.insert(want.dst, hop);
                }
                None => {
                    let by = held.remove(&want.dst);
                    self.blocked.insert(want.dst, (want.clone(), by));
                }
            }
        }
        // A failed dump leaves nothing known: only another full pass can tell.
        self.stale = (pass.errs.0.iter())
            .any(|e| matches!(e, Error::Netlink { context, .. } if context == LIST_ROUTES));
        pass.errs
    }

    /// The kernel's nexthops; `None` on a kernel without nexthop objects (found out once, by
    /// the first dump).
    async fn list_nexthops(&mut self) -> Result<Option<Vec<Nexthop>>, Error> {
        let handle = match &self.nexthops {
            Nexthops::Absent => return Ok(None),
            Nexthops::Present(h) => h.clone(),
            Nexthops::Unknown => match nexthop::connect() {
                Ok(h) => h,
                Err(e) => {
                    info!(error = %e, "no nexthop objects: routes name their gateways");
                    self.nexthops = Nexthops::Absent;
                    return Ok(None);
                }
            },
        };
        match nexthop::dump(&handle).await {
            Ok(all) => {
                if matches!(self.nexthops, Nexthops::Unknown) {
                    debug!("routes through gateways name nexthop objects");
                }
                self.nexthops = Nexthops::Present(handle);
                Ok(Some(all))
            }
            // Linux < 5.3 answers EOPNOTSUPP. Whatever the reason, classic routes work.
            Err(e) if matches!(self.nexthops, Nexthops::Unknown) => {
                info!(error = %e, "no nexthop objects on this kernel: routes name their gateways");
                self.nexthops = Nexthops::Absent;
                Ok(None)
            }
            Err(e) => Err(Error::netlink(LIST_NEXTHOPS)(e)),
        }
    }

    /// Whether routes name nexthops.
    fn has_nexthops(&self) -> bool {
        matches!(self.nexthops, Nexthops::Present(_))
    }

    /// Removes the routes to `remove` and puts `upsert` in place, with one netlink request per
    /// route (or nexthop) and no dump: weft's own route to a destination is replaced (when only
    /// its gateway changed, its nexthop is), a new one added exclusively (so a route someone
    /// else holds is never overwritten: the destination is then blocked, and
    /// [`OwnedRoutes::stale`] asks for a full reconcile to judge it), and only weft's own
    /// route, matched exactly, is ever deleted.
    pub async fn apply(
        &mut self,
        batch: &Batch,
        remove: &[Ipv4Net],
        upsert: &[RouteSpec],
    ) -> ErrorList {
        let mut errs = ErrorList::default();
        let mut gone = Vec::new();
        for dst in remove {
            self.blocked.remove(dst);
            if let Some(hop) = self.installed.remove(dst) {
                gone.push((*dst, hop));
            }
        }
        let objects = self.has_nexthops();
        let mut puts = Vec::new();
        for want in upsert {
            let hop = Hop::of(want, objects);
            let held = (self.blocked.remove(&want.dst)).map(|(_, by)| by.unwrap_or_default());
            let put = match self.installed.get(&want.dst) {
                Some(h) if *h == hop => continue,
                // Only the gateway changed: the route names the same nexthop.
                Some(h) if h.nh.is_some() && h.nh == hop.nh => Put::new(want, hop)
                    .nexthop(NLM_F_CREATE | NLM_F_REPLACE)
                    .previous(*h),
                Some(h) => Put::new(want, hop)
                    .nexthop(NLM_F_CREATE | NLM_F_EXCL)
                    .route(NLM_F_CREATE | NLM_F_REPLACE)
                    .previous(*h),
                None => Put::new(want, hop)
                    .nexthop(NLM_F_CREATE | NLM_F_EXCL)
                    .route(NLM_F_CREATE | NLM_F_EXCL),
            };
            puts.push((put, held));
        }
        self.put(batch, puts, &mut errs).await;
        let requests = (gone.iter()).map(|(dst, hop)| Some(delete_exact(*dst, *hop)));
        let results = batch.send(requests).await;
        let mut unused = Vec::new();
        for ((dst, hop), r) in gone.iter().zip(results) {
            match r {
                Ok(()) => debug!(%dst, gateway = ?hop.gateway, "route removed"),
                Err(e) if is_gone(&e) => {}
                Err(source) => {
                    self.stale = true;
                    errs.push(Error::Netlink {
                        context: format!("delete route {dst} via {:?}", hop.gateway),
                        source,
                    });
                    continue;
                }
            }
            unused.extend(hop.nh);
        }
        // Only once no route of weft's names them (deleting a nexthop in use makes the kernel
        // walk every table for the routes naming it).
        errs.0.extend(delete_nexthops(batch, &unused).await.0);
        errs
    }

    /// Tries again the routes that could not be put in place (a destination another route held):
    /// one exclusive add each, nothing else.
    pub async fn retry(&mut self, batch: &Batch) -> ErrorList {
        let mut errs = ErrorList::default();
        let objects = self.has_nexthops();
        let blocked: Vec<(RouteSpec, Option<String>)> =
            self.blocked.drain().map(|(_, b)| b).collect();
        // Known to be held, by whatever a full pass saw there.
        let puts: Vec<_> = (blocked.iter())
            .map(|(w, by)| {
                let put = Put::new(w, Hop::of(w, objects))
                    .nexthop(NLM_F_CREATE | NLM_F_EXCL)
                    .route(NLM_F_CREATE | NLM_F_EXCL);
                (put, Some(by.clone().unwrap_or_default()))
            })
            .collect();
        self.put(batch, puts, &mut errs).await;
        errs
    }

    /// Puts routes in place, each with `held` when its destination was blocked, with what a
    /// full pass saw holding it ("" when none did).
    async fn put(
        &mut self,
        batch: &Batch,
        puts: Vec<(Put<'_>, Option<String>)>,
        errs: &mut ErrorList,
    ) {
        let (mut puts, helds): (Vec<_>, Vec<_>) = puts.into_iter().unzip();
        put_all(batch, &mut puts, errs).await;
        for (mut put, held) in puts.into_iter().zip(helds) {
            let want = put.want;
            match put.result() {
                Ok(hop) => {
                    if held.is_some() {
                        info!(route = %want, "route added on a later try");
                    } else {
                        debug!(route = %want, "route in place");
                    }
                    self.installed.insert(want.dst, hop);
                }
                Err(e) if errno(&e) == Some(libc::EEXIST) => {
                    // Not weft's (ours would be in `installed`): flanneld's to adopt or
                    // another's to yield to, which only a dump can tell. A conflict a full
                    // reconcile already judged stays one until that route goes.
                    self.stale |= held.is_none();
                    let by = held.filter(|b| !b.is_empty());
                    let existing = by.clone().unwrap_or_else(|| "another route".into());
                    self.blocked.insert(want.dst, (want.clone(), by));
                    errs.push(Error::RouteConflict {
                        wanted: want.to_string(),
                        existing,
                    });
                }
                Err(source) => {
                    // A failed replace leaves weft's old route in place, or none.
                    if put.previous.is_some() {
                        self.stale = true;
                        self.installed.remove(&want.dst);
                    }
                    let by = held.filter(|b| !b.is_empty());
                    self.blocked.insert(want.dst, (want.clone(), by));
                    errs.push(Error::Netlink {
                        context: format!("add route {want}"),
                        source,
                    });
                }
            }
        }
    }

    /// Whether only a full reconcile can tell what the kernel holds.
    pub fn stale(&self) -> bool {
        self.stale
    }

    /// Routes wanted: in place, or blocked.
    pub fn wanted(&self) -> usize {
        self.installed.len() + self.blocked.len()
    }
}

/// One route to put in place, and the requests that take it there.
struct Put<'a> {
    want: &'a RouteSpec,
    hop: Hop,
    /// The nexthop request's flags, when the hop names a nexthop that must be added or replaced.
    nh_flags: Option<u16>,
    /// The route request's flags; none when the route already names the right nexthop.
    route_flags: Option<u16>,
    /// What weft had in place for this destination.
    previous: Option<Hop>,
    /// Why the route is not in place, once sent (boxed: 10,000 puts are mostly successes).
    failed: Option<Box<rtnetlink::Error>>,
}

impl<'a> Put<'a> {
    fn new(want: &'a RouteSpec, hop: Hop) -> Self {
        Self {
            want,
            hop,
            nh_flags: None,
            route_flags: None,
            previous: None,
            failed: None,
        }
    }

    /// Once sent: the hop in place, or why the route is not.
    fn result(&mut self) -> Result<Hop, rtnetlink::Error> {
        match self.failed.take() {
            Some(e) => Err(*e),
            None => Ok(self.hop),
        }
    }

    /// Adds or replaces the hop's nexthop (if it names one) with `flags`.
    fn nexthop(mut self, flags: u16) -> Self {
        if self.hop.nh.is_some() {
            self.nh_flags = Some(flags);
        }
        self
    }

    fn route(mut self, flags: u16) -> Self {
        self.route_flags = Some(flags);
        self
    }

    fn previous(mut self, hop: Hop) -> Self {
        self.previous = Some(hop);
        self
    }
}

/// Sends the nexthop requests, then the route requests, so a route names only a nexthop that
/// exists. A route whose nexthop the kernel refused (the id another program's, a device without
/// carrier) goes in the classic form instead. Nexthops the batch leaves unused (added for a
/// route that was refused, named by a route now classic) are deleted. Each put is left with the
/// hop now in place, or why its route is not ([`Put::result`]).
async fn put_all(batch: &Batch, puts: &mut [Put<'_>], errs: &mut ErrorList) {
    let requests = (puts.iter()).map(|p| match (p.nh_flags, p.hop.nexthop()) {
        (Some(flags), Some(n)) => Some((NexthopMessage::New(n), flags)),
        _ => None,
    });
    let nh_results = batch.send(requests).await;
    let mut fresh = HashSet::new();
    for (p, r) in puts.iter_mut().zip(nh_results) {
        let Some(flags) = p.nh_flags else { continue };
        match r {
            Ok(()) if flags & NLM_F_EXCL != 0 => fresh.extend(p.hop.nh),
            Ok(()) => {}
            Err(e) => {
                debug!(route = %p.want, error = %e, "nexthop refused: the route names its gateway");
                p.hop.nh = None;
                p.nh_flags = None;
                p.route_flags.get_or_insert(NLM_F_CREATE | NLM_F_REPLACE);
            }
        }
    }
    let requests =
        (puts.iter()).map(|p| (p.route_flags).map(|flags| (new_route(p.want.dst, p.hop), flags)));
    let results = batch.send(requests).await;
    let mut unused = Vec::new();
    for (p, r) in puts.iter_mut().zip(results) {
        match r {
            Ok(()) => unused.extend(
                p.previous
                    .and_then(|h| h.nh)
                    .filter(|&id| p.hop.nh != Some(id)),
            ),
            Err(e) => {
                unused.extend(p.hop.nh.filter(|id| fresh.contains(id)));
                p.failed = Some(Box::new(e));
            }
        }
    }
    errs.0.extend(delete_nexthops(batch, &unused).await.0);
}

/// Deletes weft's nexthops `ids`.
async fn delete_nexthops(batch: &Batch, ids: &[u32]) -> ErrorList {
    let mut errs = ErrorList::default();
    let requests = ids.iter().map(|&id| {
        let nh = Nexthop {
            id,
            ..Nexthop::default()
        };
        Some((NexthopMessage::Del(nh), 0))
    });
    for (id, r) in ids.iter().zip(batch.send(requests).await) {
        match r {
            Ok(()) => debug!(id, "nexthop removed"),
            Err(e) if is_gone(&e) => {}
            Err(source) => errs.push(Error::Netlink {
                context: format!("delete nexthop {id}"),
                source,
            }),
        }
    }
    errs
}

/// The context of a failed route dump, so a pass that could not read the table says so.
const LIST_ROUTES: &str = "list routes";
const LIST_NEXTHOPS: &str = "list nexthops";

/// What a full pass did: its errors, for each desired route the hop in place (if it is), and
/// what holds the destinations it yielded.
struct FullPass {
    errs: ErrorList,
    placed: Vec<Option<Hop>>,
    held: HashMap<Ipv4Net, String>,
}

/// The full pass of [`reconcile_owned`] and [`OwnedRoutes::reconcile`]; `objects` is every
/// nexthop of the kernel, when routes are to name them.
async fn reconcile_routes(
    handle: &Handle,
    batch: &Batch,
    objects: Option<Vec<Nexthop>>,
    owner: &Owner,
    desired: &[RouteSpec],
) -> FullPass {
    let mut errs = ErrorList::default();
    let with_nexthops = objects.is_some();
    let nexthops = objects.unwrap_or_default();
    // Every nexthop, to read the routes that name one; weft's own, to keep or remove.
    let nexthops: HashMap<u32, Nexthop> = nexthops.into_iter().map(|n| (n.id, n)).collect();
    let ours_nh: HashSet<u32> = (nexthops.values())
        .filter(|n| owner.owns_nexthop(n))
        .map(|n| n.id)
        .collect();
    let want: Vec<Hop> = (desired.iter())
        .map(|d| {
            let mut hop = Hop::of(d, with_nexthops);
            if let Some(id) = hop.nh.filter(|id| nexthops.contains_key(id) && !ours_nh.contains(id)) {
                debug!(dst = %d.dst, id, "the nexthop id is another's: the route names its gateway");
                hop.nh = None;
            }
            hop
        })
        .collect();
    let mut placed: Vec<Option<Hop>> = vec![None; desired.len()];
    let mut wanted_at: HashMap<Ipv4Net, usize> = HashMap::with_capacity(desired.len());
    for (i, want) in desired.iter().enumerate() {
        wanted_at.entry(want.dst).or_insert(i);
    }
    // The table is read as the dump streams in, and weft's own route that is exactly as wanted
    // is only noted (placed), not kept: with 10,000 peers in place, the pass holds no copy of
    // the table. Every other route is kept whole, to be judged, replaced or deleted.
    let mut owned = Vec::new();
    let mut foreign = Vec::new();
    let mut dump = handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute();
    loop {
        let msg = match dump.try_next().await {
            Ok(Some(m)) => m,
            Ok(None) => break,
            Err(e) => {
                errs.push(Error::netlink(LIST_ROUTES)(e));
                return FullPass {
                    errs,
                    placed: vec![None; desired.len()],
                    held: HashMap::new(),
                };
            }
        };
        if table(&msg) != u32::from(RouteHeader::RT_TABLE_MAIN) {
            continue;
        }
        let r = parse(msg, &nexthops);
        if !owner.owns(&r) {
            foreign.push(r);
            continue;
        }
        match wanted_at.get(&r.dst) {
            Some(&i)
                if placed[i].is_none() && desired[i].forwards_like(&r) && r.nh == want[i].nh =>
            {
                placed[i] = Some(want[i])
            }
            _ => owned.push(r),
        }
    }
    // Indexes by destination: a pass costs O(routes), whatever the table's size.
    let mut foreign_at: HashMap<Ipv4Net, Vec<&Installed>> = HashMap::new();
    for r in &foreign {
        foreign_at.entry(r.dst).or_default().push(r);
    }
    let owned_at: HashSet<Ipv4Net> = owned.iter().map(|r| r.dst).collect();
    let mut missing = Vec::new();
    let mut withdraw = Vec::new();
    let mut held = HashMap::new();
    let mut adopt: HashMap<Ipv4Net, &Installed> = HashMap::new();
    for (i, want) in desired.iter().enumerate() {
        match foreign_at.get(&want.dst).map_or(&[][..], Vec::as_slice) {
            [] => {}
            [theirs] if theirs.protocol == RTPROT_BOOT && want.forwards_like(theirs) => {
                adopt.insert(want.dst, theirs);
            }
            [theirs, ..] => {
                // Weft's own routes to this destination are not kept: they are withdrawn below.
                let existing = describe(handle, theirs).await;
                held.insert(want.dst, existing.clone());
                errs.push(Error::RouteConflict {
                    wanted: want.to_string(),
                    existing,
                });
                if let Some(hop) = placed[i].take() {
                    withdraw.push((i, hop));
                }
                continue;
            }
        }
        if placed[i].is_none() {
            missing.push(i);
        }
    }
    debug!(
        missing = missing.len(),
        extra = owned.len() + withdraw.len(),
        adopt = adopt.len(),
        "route diff"
    );
    let mut puts: Vec<Put> = (missing.iter())
        .map(|&i| {
            let dst = desired[i].dst;
            // Replace only a route of our own. Adding next to flanneld's copy needs neither
            // flag: the kernel puts the new route ahead of it (they differ in protocol).
            let flags = if adopt.contains_key(&dst) {
                NLM_F_CREATE
            } else if owned_at.contains(&dst) {
                NLM_F_CREATE | NLM_F_REPLACE
            } else {
                NLM_F_CREATE | NLM_F_EXCL
            };
            let put = Put::new(&desired[i], want[i]).route(flags);
            match want[i].nh.and_then(|id| nexthops.get(&id)) {
                // weft's own (another's id was ruled out above): kept if it is right.
                Some(n) if Some(*n) == want[i].nexthop() => put,
                Some(_) => put.nexthop(NLM_F_CREATE | NLM_F_REPLACE),
                None => put.nexthop(NLM_F_CREATE | NLM_F_EXCL),
            }
        })
        .collect();
    put_all(batch, &mut puts, &mut errs).await;
    let mut failed = HashSet::new();
    let (mut added, mut replaced) = (0, 0);
    for (&i, mut put) in missing.iter().zip(puts) {
        let want = &desired[i];
        match put.result() {
            Ok(hop) => {
                placed[i] = Some(hop);
                if put.route_flags.is_some_and(|f| f & NLM_F_REPLACE != 0) {
                    replaced += 1;
                    debug!(route = %want, "route replaced");
                } else {
                    added += 1;
                    debug!(route = %want, "route added");
                }
            }
            Err(source) => {
                failed.insert(want.dst);
                errs.push(Error::Netlink {
                    context: format!("add route {want}"),
                    source,
                })
            }
        }
    }
    // Only once weft's copy is in: traffic for the peer never lacks a route.
    let adopting: Vec<&Installed> = adopt
        .values()
        .copied()
        .filter(|r| !failed.contains(&r.dst))
        .collect();
    let results = batch.send(adopting.iter().map(|r| Some(delete(r)))).await;
    let mut adopted = 0;
    for (theirs, r) in adopting.iter().zip(results) {
        match r {
            Ok(()) => {
                adopted += 1;
                debug!(dst = %theirs.dst, gateway = ?theirs.gateway, "flanneld's route adopted");
            }
            Err(e) if is_gone(&e) => {}
            Err(source) => errs.push(Error::Netlink {
                context: format!(
                    "adopt route {} via {:?} (proto boot)",
                    theirs.dst, theirs.gateway
                ),
                source,
            }),
        }
    }
    let requests = (withdraw.iter()).map(|&(i, hop)| Some(delete_exact(desired[i].dst, hop)));
    let results = batch.send(requests).await;
    for (&(i, _), r) in withdraw.iter().zip(results) {
        let want = &desired[i];
        match r {
            Ok(()) => {
                info!(dst = %want.dst, gateway = ?want.gateway, "route withdrawn: another route holds its destination")
            }
            Err(e) if is_gone(&e) => {}
            Err(source) => errs.push(Error::Netlink {
                context: format!("delete route {want}"),
                source,
            }),
        }
    }
    let wanted: HashSet<Ipv4Net> = desired.iter().map(|d| d.dst).collect();
    let results = batch.send(owned.iter().map(|r| Some(delete(r)))).await;
    let mut removed = 0;
    for (r, result) in owned.iter().zip(results) {
        match result {
            Ok(()) if foreign_at.contains_key(&r.dst) => {
                info!(dst = %r.dst, gateway = ?r.gateway, "route withdrawn: another route holds its destination")
            }
            Ok(()) if wanted.contains(&r.dst) => {
                debug!(dst = %r.dst, "stale route variant removed")
            }
            Ok(()) => {
                removed += 1;
                debug!(dst = %r.dst, gateway = ?r.gateway, "route removed");
            }
            // Replacing may already have removed it (same dst and metric).
            Err(e) if is_gone(&e) => {}
            Err(source) => errs.push(Error::Netlink {
                context: format!("delete route {} via {:?}", r.dst, r.gateway),
                source,
            }),
        }
    }
    // weft's nexthops no route names any more (never one another's route names).
    let named: HashSet<u32> = (placed.iter().flatten().filter_map(|h| h.nh))
        .chain(foreign.iter().filter_map(|r| r.nh))
        .collect();
    let unused: Vec<u32> = (ours_nh.iter().copied())
        .filter(|id| !named.contains(id))
        .collect();
    errs.0.extend(delete_nexthops(batch, &unused).await.0);
    if added + replaced + removed + adopted > 0 {
        info!(added, replaced, removed, adopted, "routes updated");
    }
    FullPass { errs, placed, held }
}

/// A route request for `dst` through `hop`: naming its nexthop, or its gateway and device.
fn route_message(dst: Ipv4Net, hop: Hop) -> RouteMessage {
    let b = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(dst.network(), dst.prefix_len())
        .protocol(RouteProtocol::Other(RTPROT_WEFT));
    if let Some(id) = hop.nh {
        let mut msg = b.build();
        msg.attributes.push(RouteAttribute::NhId(id));
        return msg;
    }
    // A device route keeps universe scope, as flannel's udp backend creates it.
    let mut b = b.output_interface(hop.oif);
    if let Some(g) = hop.gateway {
        b = b.gateway(g);
    }
    if hop.onlink {
        b = b.onlink();
    }
    b.build()
}

/// The request adding (or, by `flags`, replacing) the route to `dst` through `hop`.
fn new_route(dst: Ipv4Net, hop: Hop) -> RouteNetlinkMessage {
    RouteNetlinkMessage::NewRoute(route_message(dst, hop))
}

/// The request deleting weft's route to `dst` exactly as it was added (protocol, and nexthop or
/// gateway and device): the kernel matches every field given, so no other route to `dst` can go
/// instead.
fn delete_exact(dst: Ipv4Net, hop: Hop) -> Request<RouteNetlinkMessage> {
    (RouteNetlinkMessage::DelRoute(route_message(dst, hop)), 0)
}

/// The request deleting the route `r` of a dump.
fn delete(r: &Installed) -> Request<RouteNetlinkMessage> {
    // Keep only what identifies the route; the dump's cache info and metrics are not for deletes.
    // The header stays, protocol included, so the kernel deletes this very route and not another
    // one to the same destination. A route naming a nexthop is matched by its id: given a
    // gateway or device too, the kernel would match none.
    let mut msg = r.msg.clone();
    msg.attributes.retain(|a| match a {
        RouteAttribute::Destination(_)
        | RouteAttribute::Priority(_)
        | RouteAttribute::Table(_)
        | RouteAttribute::NhId(_) => true,
        RouteAttribute::Gateway(_) | RouteAttribute::Oif(_) => r.nh.is_none(),
        _ => false,
    });
    (RouteNetlinkMessage::DelRoute(msg), 0)
}

/// `r` as `ip route` would print it, for a conflict message: which route holds the destination.
async fn describe(handle: &Handle, r: &Installed) -> String {
    let h = &r.msg.header;
    let mut s = String::new();
    if h.kind != RouteType::Unicast {
        s.push_str(&format!("{} ", lower(format!("{:?}", h.kind))));
    }
    s.push_str(&r.dst.to_string());
    if let Some(g) = r.gateway {
        s.push_str(&format!(" via {g}"));
    }
    if let Some(i) = r.oif {
        s.push_str(&format!(" dev {}", link_name(handle, i).await));
    }
    let proto = match h.protocol {
        RouteProtocol::Other(n) => n.to_string(),
        p => lower(format!("{p:?}")),
    };
    s.push_str(&format!(" proto {proto}"));
    if h.scope != RouteScope::Universe {
        s.push_str(&format!(" scope {}", lower(format!("{:?}", h.scope))));
    }
    if r.priority != 0 {
        s.push_str(&format!(" metric {}", r.priority));
    }
    s
}

fn lower(s: String) -> String {
    s.to_ascii_lowercase()
}

/// The name of interface `index`, or `#<index>` when it cannot be looked up.
async fn link_name(handle: &Handle, index: u32) -> String {
    let found = handle
        .link()
        .get()
        .match_index(index)
        .execute()
        .try_next()
        .await;
    found
        .ok()
        .flatten()
        .and_then(|m| {
            m.attributes.into_iter().find_map(|a| match a {
                LinkAttribute::IfName(n) => Some(n),
                _ => None,
            })
        })
        .unwrap_or_else(|| format!("#{index}"))
}

/// All IPv4 routes of the main table.
pub(crate) async fn list_main(handle: &Handle) -> Result<Vec<RouteMessage>, Error> {
    let req = RouteMessageBuilder::<Ipv4Addr>::new().build();
    let all: Vec<RouteMessage> = handle
        .route()
        .get(req)
        .execute()
        .try_collect()
        .await
        .map_err(Error::netlink(LIST_ROUTES))?;
    Ok(all
        .into_iter()
        .filter(|m| table(m) == u32::from(RouteHeader::RT_TABLE_MAIN))
        .collect())
}
fn table(m: &RouteMessage) -> u32 {
    m.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(m.header.table))
}

fn dst(m: &RouteMessage) -> Ipv4Net {
    let addr = m
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Destination(RouteAddress::Inet(a)) => Some(*a),
            _ => None,
        })
        .unwrap_or(Ipv4Addr::UNSPECIFIED);
    Ipv4Net::new(addr, m.header.destination_prefix_length).unwrap_or_default()
}

/// Reads a route; one naming a nexthop of `nexthops` gets that nexthop's gateway, device and
/// on-link flag (the kernel reports them with the route only in `nexthop_compat_mode`).
fn parse(msg: RouteMessage, nexthops: &HashMap<u32, Nexthop>) -> Installed {
    let mut r = Installed {
        dst: dst(&msg),
        gateway: None,
        oif: None,
        onlink: msg.header.flags.contains(RouteFlags::Onlink),
        priority: 0,
        protocol: u8::from(msg.header.protocol),
        nh: None,
        clean: msg.header.kind == RouteType::Unicast
            && msg.header.scope == RouteScope::Universe
            && msg.header.tos == 0,
        msg: RouteMessage::default(),
    };
    for a in &msg.attributes {
        match a {
            RouteAttribute::Gateway(RouteAddress::Inet(g)) => r.gateway = Some(*g),
            RouteAttribute::Oif(i) => r.oif = Some(*i),
            RouteAttribute::Priority(p) => r.priority = *p,
            RouteAttribute::MultiPath(_) => r.clean = false,
            RouteAttribute::NhId(id) => r.nh = Some(*id),
            _ => {}
        }
    }
    if let Some(n) = r.nh.and_then(|id| nexthops.get(&id)) {
        r.gateway = n.gateway;
        r.oif = n.oif;
        r.onlink = n.onlink;
        r.clean &= !n.other;
    }
    r.msg = msg;
    r
}

/// The networks directly reachable through interface `oif`: the scope-link routes of the main
/// table on it (the kernel's prefix routes of its addresses, plus any added by hand). A gateway
/// outside all of them would be rejected by the kernel, so host-gw and DirectRouting check first.
pub async fn connected_networks(handle: &Handle, oif: u32) -> Result<Vec<Ipv4Net>, Error> {
    let connected = |m: RouteMessage| async move {
        let h = &m.header;
        let link = h.scope == RouteScope::Link && h.kind == RouteType::Unicast;
        if !link || h.destination_prefix_length == 0 {
            return Ok(None);
        }
        if table(&m) != u32::from(RouteHeader::RT_TABLE_MAIN) {
            return Ok(None);
        }
        let mut oif_ok = false;
        for a in &m.attributes {
            match a {
                RouteAttribute::Gateway(_) | RouteAttribute::MultiPath(_) => return Ok(None),
                RouteAttribute::Oif(i) => oif_ok = *i == oif,
                _ => {}
            }
        }
        Ok(oif_ok.then(|| dst(&m)))
    };
    // Filtered as the dump streams in: the table may hold 10,000 peer routes.
    handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute()
        .try_filter_map(connected)
        .try_collect()
        .await
        .map_err(Error::netlink(LIST_ROUTES))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(dst: &str, protocol: u8, oif: u32) -> Installed {
        Installed {
            dst: dst.parse().expect("dst"),
            gateway: None,
            oif: Some(oif),
            onlink: false,
            priority: 0,
            protocol,
            nh: None,
            clean: true,
            msg: RouteMessage::default(),
        }
    }

    #[test]
    fn an_instance_owns_weft_routes_into_its_network_or_through_its_device() {
        let vxlan = Owner {
            network: "10.244.0.0/16".parse().expect("net"),
            device: Some(7),
        };
        let host_gw = Owner {
            device: None,
            ..vxlan
        };
        for owner in [vxlan, host_gw] {
            assert!(owner.owns(&route("10.244.3.0/24", RTPROT_WEFT, 2)));
            assert!(owner.owns(&route("10.244.0.0/16", RTPROT_WEFT, 2)));
            // Another weftd's network on the same host.
            assert!(!owner.owns(&route("10.245.3.0/24", RTPROT_WEFT, 2)));
            // Not weft's: the kernel's connected route, flanneld's or an administrator's.
            assert!(!owner.owns(&route("10.244.3.0/24", 2, 2)));
            assert!(!owner.owns(&route("10.244.3.0/24", RTPROT_BOOT, 7)));
        }
        // Left in its own device by this instance under an earlier network.
        assert!(vxlan.owns(&route("10.9.3.0/24", RTPROT_WEFT, 7)));
        assert!(!host_gw.owns(&route("10.9.3.0/24", RTPROT_WEFT, 7)));
    }
}
