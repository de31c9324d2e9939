//! The full pass: the kernel's routes read as the dump streams in, judged into a [`Plan`], and
//! the plan sent, in its order, with what each request did counted and logged.

use std::collections::{HashMap, HashSet};

use ipnet::IpNet;
use rtnetlink::packet_core::NLM_F_REPLACE;
use rtnetlink::Handle;
use tracing::{debug, info};

use super::dump::{describe, each_main, parse, Installed};
use super::owner::Owner;
use super::plan::{Diff, Plan, Removal};
use super::put::Put;
use super::send::{delete, delete_exact, delete_nexthops, put_all};
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
    pub(super) held: HashMap<IpNet, String>,
}

/// The full pass of [`super::reconcile_owned`] and [`super::RouteTable::reconcile`];
/// `objects` is every nexthop of the kernel, when routes are to name them.
pub(super) async fn reconcile_routes(
    handle: &Handle,
    batch: &Batch,
    objects: Option<Vec<Nexthop>>,
    owner: &Owner,
    desired: &[RouteSpec],
) -> FullPass {
    let mut diff = Diff::new(*owner, desired, objects);
    for &(dst, id) in diff.taken_ids() {
        debug!(%dst, id, "the nexthop id is another's: the route names its gateway");
    }
    // The IPv6 table only where this instance has IPv6 routes: a v4-only host pays nothing.
    let v6 = owner.network_v6.is_some() || desired.iter().any(|d| matches!(d.dst, IpNet::V6(_)));
    let read = each_main(handle, v6, |msg| {
        let r = parse(msg, diff.nexthops());
        diff.see(r);
    });
    if let Err(e) = read.await {
        return FullPass {
            errs: e.into(),
            placed: vec![None; desired.len()],
            held: HashMap::new(),
        };
    }
    let plan = diff.plan();
    let mut errs = ErrorList::default();
    let held = report_blocked(handle, &plan.blocked, &mut errs).await;
    debug!(
        missing = plan.puts.len(),
        extra = plan.remove.len() + plan.withdraw.len(),
        adopt = plan.adopt.len(),
        "route diff"
    );
    let Plan {
        mut placed,
        puts,
        adopt,
        withdraw,
        remove,
        nexthops,
        ..
    } = plan;
    let (added, replaced, failed) = put_missing(batch, puts, &mut placed, &mut errs).await;
    let adopted = delete_adopted(batch, &adopt, &failed, &mut errs).await;
    withdraw_blocked(batch, &withdraw, &mut errs).await;
    let removed = delete_owned(batch, &remove, &mut errs).await;
    // weft's nexthops no route names any more (never one another's route names).
    errs.0
        .extend(delete_nexthops(batch, &nexthops.unused(&placed)).await.0);
    if added + replaced + removed + adopted > 0 {
        info!(added, replaced, removed, adopted, "routes updated");
    }
    FullPass { errs, placed, held }
}

/// Reports each blocked route as a conflict with the route that holds its destination, as
/// `ip route` shows it; returns those descriptions by destination.
async fn report_blocked(
    handle: &Handle,
    blocked: &[(&RouteSpec, Installed)],
    errs: &mut ErrorList,
) -> HashMap<IpNet, String> {
    let mut held = HashMap::new();
    for (want, theirs) in blocked {
        let existing = describe(handle, theirs).await;
        held.insert(want.dst, existing.clone());
        errs.push(Error::RouteConflict {
            wanted: want.to_string(),
            existing,
        });
    }
    held
}

/// Puts the missing routes in place, noting each that is in `placed` (by its index); returns
/// how many were added and replaced, and the destinations that failed.
async fn put_missing(
    batch: &Batch,
    puts: Vec<(usize, Put<'_>)>,
    placed: &mut [Option<Hop>],
    errs: &mut ErrorList,
) -> (usize, usize, HashSet<IpNet>) {
    let (missing, mut puts): (Vec<usize>, Vec<Put>) = puts.into_iter().unzip();
    put_all(batch, &mut puts, errs).await;
    let mut failed = HashSet::new();
    let (mut added, mut replaced) = (0, 0);
    for (i, mut put) in missing.into_iter().zip(puts) {
        let want = put.want;
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
    (added, replaced, failed)
}

/// Deletes flanneld's routes weft adopted, where weft's copy is in; returns how many went.
async fn delete_adopted(
    batch: &Batch,
    adopt: &[Installed],
    failed: &HashSet<IpNet>,
    errs: &mut ErrorList,
) -> usize {
    // Only once weft's copy is in: traffic for the peer never lacks a route. An IPv6 one is
    // gone already: weft's copy replaced it.
    let (replaced, adopting): (Vec<&Installed>, Vec<&Installed>) = (adopt.iter())
        .filter(|r| !failed.contains(&r.dst))
        .partition(|r| matches!(r.dst, IpNet::V6(_)));
    for theirs in &replaced {
        debug!(dst = %theirs.dst, gateway = ?theirs.gateway, "flanneld's route adopted");
    }
    let results = batch.send(adopting.iter().map(|r| Some(delete(r)))).await;
    let mut adopted = replaced.len();
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
    adopted
}

/// Deletes weft's routes to destinations another route holds, exactly as they were placed.
async fn withdraw_blocked(batch: &Batch, withdraw: &[(&RouteSpec, Hop)], errs: &mut ErrorList) {
    let requests = (withdraw.iter()).map(|&(want, hop)| Some(delete_exact(want.dst, hop)));
    let results = batch.send(requests).await;
    for (&(want, _), r) in withdraw.iter().zip(results) {
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
}

/// Deletes weft's routes the plan removes; returns how many went because no peer wants them.
async fn delete_owned(
    batch: &Batch,
    remove: &[(Installed, Removal)],
    errs: &mut ErrorList,
) -> usize {
    let results = batch
        .send(remove.iter().map(|(r, _)| Some(delete(r))))
        .await;
    let mut removed = 0;
    for ((r, why), result) in remove.iter().zip(results) {
        match result {
            Ok(()) => match why {
                Removal::Yielded => {
                    info!(dst = %r.dst, gateway = ?r.gateway, "route withdrawn: another route holds its destination")
                }
                Removal::Variant => debug!(dst = %r.dst, "stale route variant removed"),
                Removal::Unwanted => {
                    removed += 1;
                    debug!(dst = %r.dst, gateway = ?r.gateway, "route removed");
                }
            },
            // Replacing may already have removed it (same dst and metric).
            Err(e) if is_gone(&e) => {}
            Err(source) => errs.push(Error::Netlink {
                context: format!("delete route {} via {:?}", r.dst, r.gateway),
                source,
            }),
        }
    }
    removed
}
