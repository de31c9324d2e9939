//! Watched routes: the one route reconciler used by host-gw, vxlan (and its DirectRouting) and udp.
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
//!
//! IPv6 routes are handled beside IPv4 ones, by the same rules, with the differences IPv6
//! brings: its table is read only for an instance with IPv6 routes ([`Owner::network_v6`], or
//! one wanted); its routes keep the classic form (no nexthop objects); flanneld's route is
//! adopted by replacing it, as IPv6 refuses a second route with the same next hop; and a route
//! the kernel shows with several next hops is not weft's (IPv6 merges another's route added
//! beside weft's into it).
//!
//! Files: `owner` (what is weft's, and which instance's), `spec` (the routes wanted), `dump`
//! (reading the main table), `plan` (a full pass judged: pure), `put` (a route's requests, and a
//! targeted change's), `send` (the requests sent in batches), `full_pass` (dump, plan, send and
//! count); here, [`RouteTable`]: what is in place, for targeted changes between full passes.
//!
//! [`RTPROT_WEFT`]: owner::RTPROT_WEFT
//! [`nexthop_id`]: owner::nexthop_id

mod dump;
mod full_pass;
pub(crate) mod owner;
mod plan;
mod put;
mod send;
mod spec;

use std::collections::HashMap;

use ipnet::IpNet;
use rtnetlink::Handle;
use tracing::{debug, info};

pub use dump::table as route_table;
pub(crate) use dump::{connected_networks, connected_networks_v6, list_main};
pub use owner::Owner;
pub use spec::RouteSpec;

use crate::batch::Batch;
use crate::error::{errno, is_gone};
use crate::nexthop::{self, Nexthop};
use crate::{Error, ErrorList};
use dump::LIST_ROUTES;
use full_pass::reconcile_routes;
use put::Put;
use send::{delete_exact, delete_nexthops, put_all};
use spec::Hop;

/// Makes the routes `owner` owns exactly `desired`, in the classic form: adds what is missing,
/// replaces its own routes that differ, deletes its own routes no peer wants, and leaves every
/// other route alone (a desired route whose destination another route holds is a
/// [`Error::RouteConflict`]). Every failure is collected, none stops the pass. For a few device
/// routes (udp's); peers' routes go through [`RouteTable`].
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

/// Whether the kernel has nexthop objects, once a full pass found out.
#[derive(Default)]
enum Nexthops {
    #[default]
    Unknown,
    Absent,
    Present(nexthop::Handle),
}

/// The routes one backend instance has in the kernel, as its last full reconcile found and left
/// them and as the targeted changes since left them: what [`RouteTable::apply`] works from
/// instead of dumping the routing table (10,000 peers are 10,000 routes).
#[derive(Default)]
pub struct RouteTable {
    /// weft's routes, by destination.
    installed: HashMap<IpNet, Hop>,
    /// Wanted but not in place: another route holds the destination (described as the last
    /// full reconcile saw it, if it did), or adding failed. Tried again by
    /// [`RouteTable::retry`].
    blocked: HashMap<IpNet, (RouteSpec, Option<String>)>,
    /// A targeted change met a state only a full reconcile can judge (a route nobody knew of at
    /// a destination: flanneld's to adopt, or another's to yield to), or failed halfway.
    stale: bool,
    nexthops: Nexthops,
}

impl RouteTable {
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
    /// [`RouteTable::stale`] asks for a full reconcile to judge it), and only weft's own
    /// route, matched exactly, is ever deleted.
    pub async fn apply(
        &mut self,
        batch: &Batch,
        remove: &[impl Into<IpNet> + Copy],
        upsert: &[RouteSpec],
    ) -> ErrorList {
        let mut errs = ErrorList::default();
        let mut gone = Vec::new();
        for &dst in remove {
            let dst = dst.into();
            self.blocked.remove(&dst);
            if let Some(hop) = self.installed.remove(&dst) {
                gone.push((dst, hop));
            }
        }
        let objects = self.has_nexthops();
        let mut puts = Vec::new();
        for want in upsert {
            let hop = Hop::of(want, objects);
            let held = (self.blocked.remove(&want.dst)).map(|(_, by)| by.unwrap_or_default());
            if let Some(put) = Put::change(want, hop, self.installed.get(&want.dst).copied()) {
                puts.push((put, held));
            }
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
                let put = Put::add(w, Hop::of(w, objects));
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

const LIST_NEXTHOPS: &str = "list nexthops";
