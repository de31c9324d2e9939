//! The full pass: the kernel's routes read as the dump streams in, compared with the desired
//! ones, and the differences sent.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use rtnetlink::packet_core::{NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE};
use rtnetlink::packet_route::route::RouteHeader;
use rtnetlink::{Handle, RouteMessageBuilder};
use tracing::{debug, info};

use super::dump::{describe, parse, table, Installed, LIST_ROUTES};
use super::owner::{Owner, RTPROT_BOOT};
use super::send::{delete, delete_exact, delete_nexthops, put_all, Put};
use super::spec::{Hop, RouteSpec};
use crate::batch::Batch;
use crate::error::is_gone;
use crate::nexthop::Nexthop;
use crate::{Error, ErrorList};

/// What a full pass did: its errors, for each desired route the hop in place (if it is), and
/// what holds the destinations it yielded.
pub(super) struct FullPass {
    pub(super) errs: ErrorList,
    pub(super) placed: Vec<Option<Hop>>,
    pub(super) held: HashMap<Ipv4Net, String>,
}

/// The full pass of [`super::reconcile_owned`] and [`super::OwnedRoutes::reconcile`]; `objects` is every
/// nexthop of the kernel, when routes are to name them.
pub(super) async fn reconcile_routes(
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
