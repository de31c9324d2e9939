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

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::Ipv4Addr;

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

use crate::{netlink, pipeline, Error, ErrorList};

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
}

/// One desired route `dst via gateway dev <oif> [onlink]` in the main table, or `dst dev <oif>`
/// (a device route, as udp's route into flannel0) when there is no gateway.
#[derive(Debug, Clone)]
pub struct RouteSpec {
    pub dst: Ipv4Net,
    pub gateway: Option<Ipv4Addr>,
    pub oif: u32,
    /// Interface name, for messages only.
    pub dev: String,
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
            dev: dev.to_string(),
            onlink: false,
        }
    }

    /// Whether `r` forwards exactly as this route would (whoever created it).
    fn same_as(&self, r: &Installed) -> bool {
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

/// A route of the main table as the kernel reports it.
#[derive(Debug)]
struct Installed {
    dst: Ipv4Net,
    gateway: Option<Ipv4Addr>,
    oif: Option<u32>,
    onlink: bool,
    priority: u32,
    protocol: u8,
    /// Plain unicast, universe scope, no TOS: the only shape weft creates.
    clean: bool,
    msg: RouteMessage,
}

/// Makes the routes `owner` owns exactly `desired`: adds what is missing, replaces its own
/// routes that differ, deletes its own routes no peer wants, and leaves every other route alone
/// (a desired route whose destination another route holds is a [`Error::RouteConflict`]).
/// Every failure is collected, none stops the pass.
pub async fn reconcile_owned(handle: &Handle, owner: &Owner, desired: &[RouteSpec]) -> ErrorList {
    reconcile_routes(handle, owner, desired).await.0
}

/// A route as [`OwnedRoutes`] remembers it: where its destination goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Hop {
    gateway: Option<Ipv4Addr>,
    oif: u32,
    onlink: bool,
}

impl Hop {
    fn of(r: &RouteSpec) -> Self {
        Self {
            gateway: r.gateway,
            oif: r.oif,
            onlink: r.onlink,
        }
    }
}

/// The routes one backend instance has in the kernel, as its last full reconcile found and left
/// them and as the targeted changes since left them: what [`OwnedRoutes::apply`] works from
/// instead of dumping the routing table (10,000 peers are 10,000 routes).
#[derive(Debug, Default)]
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
}

impl OwnedRoutes {
    /// [`reconcile_owned`], remembering what it left in place.
    pub async fn reconcile(
        &mut self,
        handle: &Handle,
        owner: &Owner,
        desired: &[RouteSpec],
    ) -> ErrorList {
        let (errs, placed, mut held) = reconcile_routes(handle, owner, desired).await;
        self.installed.clear();
        self.blocked.clear();
        for (want, ok) in desired.iter().zip(placed) {
            if ok {
                self.installed.insert(want.dst, Hop::of(want));
            } else {
                let by = held.remove(&want.dst);
                self.blocked.insert(want.dst, (want.clone(), by));
            }
        }
        // A failed dump leaves nothing known: only another full pass can tell.
        self.stale = errs
            .0
            .iter()
            .any(|e| matches!(e, Error::Netlink { context, .. } if context == LIST_ROUTES));
        errs
    }

    /// Removes the routes to `remove` and puts `upsert` in place, with one netlink request per
    /// route and no dump: weft's own route to a destination is replaced, a new one added
    /// exclusively (so a route someone else holds is never overwritten: the destination is
    /// then blocked, and [`OwnedRoutes::stale`] asks for a full reconcile to judge it), and only
    /// weft's own route, matched exactly, is ever deleted.
    pub async fn apply(
        &mut self,
        handle: &Handle,
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
        let mut puts = Vec::new();
        for want in upsert {
            let hop = Hop::of(want);
            let held = (self.blocked.remove(&want.dst)).map(|(_, by)| by.unwrap_or_default());
            match self.installed.get(&want.dst) {
                Some(h) if *h == hop => {}
                Some(_) => puts.push((want, NLM_F_CREATE | NLM_F_REPLACE, None)),
                None => puts.push((want, NLM_F_CREATE | NLM_F_EXCL, held)),
            }
        }
        self.put(handle, &puts, &mut errs).await;
        let results = pipeline::all(&gone, |(dst, hop)| delete_exact(handle, *dst, *hop)).await;
        for ((dst, hop), r) in gone.iter().zip(results) {
            match r {
                Ok(()) => debug!(%dst, gateway = ?hop.gateway, "route removed"),
                Err(e) if netlink::is_gone(&e) => {}
                Err(source) => {
                    self.stale = true;
                    errs.push(Error::Netlink {
                        context: format!("delete route {dst} via {:?}", hop.gateway),
                        source,
                    });
                }
            }
        }
        errs
    }

    /// Tries again the routes that could not be put in place (a destination another route held):
    /// one exclusive add each, nothing else.
    pub async fn retry(&mut self, handle: &Handle) -> ErrorList {
        let mut errs = ErrorList::default();
        let blocked: Vec<(RouteSpec, Option<String>)> =
            self.blocked.drain().map(|(_, b)| b).collect();
        // Known to be held, by whatever a full pass saw there.
        let puts: Vec<_> = (blocked.iter())
            .map(|(w, by)| {
                (
                    w,
                    NLM_F_CREATE | NLM_F_EXCL,
                    Some(by.clone().unwrap_or_default()),
                )
            })
            .collect();
        self.put(handle, &puts, &mut errs).await;
        errs
    }

    /// Adds or replaces routes, `(route, flags, held)`: `held` when the destination was
    /// blocked, with what a full pass saw holding it ("" when none did).
    async fn put(
        &mut self,
        handle: &Handle,
        puts: &[(&RouteSpec, u16, Option<String>)],
        errs: &mut ErrorList,
    ) {
        let results =
            pipeline::all(puts.iter(), |(want, flags, _)| add(handle, want, *flags)).await;
        for ((want, flags, held), r) in puts.iter().zip(results) {
            match r {
                Ok(()) => {
                    if held.is_some() {
                        info!(route = %want, "route added on a later try");
                    } else {
                        debug!(route = %want, "route in place");
                    }
                    self.installed.insert(want.dst, Hop::of(want));
                }
                Err(e) if netlink::errno(&e) == Some(libc::EEXIST) => {
                    // Not weft's (ours would be in `installed`): flanneld's to adopt or
                    // another's to yield to, which only a dump can tell. A conflict a full
                    // reconcile already judged stays one until that route goes.
                    self.stale |= held.is_none();
                    let by = held.clone().filter(|b| !b.is_empty());
                    let existing = by.clone().unwrap_or_else(|| "another route".into());
                    self.blocked.insert(want.dst, ((*want).clone(), by));
                    errs.push(Error::RouteConflict {
                        wanted: want.to_string(),
                        existing,
                    });
                }
                Err(source) => {
                    // A failed replace leaves weft's old route in place, or none.
                    if flags & NLM_F_REPLACE != 0 {
                        self.stale = true;
                        self.installed.remove(&want.dst);
                    }
                    let by = held.clone().filter(|b| !b.is_empty());
                    self.blocked.insert(want.dst, ((*want).clone(), by));
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

/// The context of a failed route dump, so a pass that could not read the table says so.
const LIST_ROUTES: &str = "list routes";

/// The full pass of [`reconcile_owned`]; also says, for each desired route, whether it is in
/// place afterwards.
async fn reconcile_routes(
    handle: &Handle,
    owner: &Owner,
    desired: &[RouteSpec],
) -> (ErrorList, Vec<bool>, HashMap<Ipv4Net, String>) {
    let mut errs = ErrorList::default();
    let mut placed = vec![false; desired.len()];
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
                return (errs, vec![false; desired.len()], HashMap::new());
            }
        };
        if table(&msg) != u32::from(RouteHeader::RT_TABLE_MAIN) {
            continue;
        }
        let r = parse(msg);
        if !owner.owns(&r) {
            foreign.push(r);
            continue;
        }
        match wanted_at.get(&r.dst) {
            Some(&i) if !placed[i] && desired[i].same_as(&r) => placed[i] = true,
            _ => owned.push(r),
        }
    }
    // Indexes by destination: a pass costs O(routes), whatever the table's size.
    let mut foreign_at: HashMap<Ipv4Net, Vec<&Installed>> = HashMap::new();
    for r in &foreign {
        foreign_at.entry(r.dst).or_default().push(r);
    }
    let mut owned_at: HashMap<Ipv4Net, Vec<usize>> = HashMap::new();
    for (i, r) in owned.iter().enumerate() {
        owned_at.entry(r.dst).or_default().push(i);
    }
    let mut missing = Vec::new();
    let mut withdraw = Vec::new();
    let mut held = HashMap::new();
    let mut adopt: HashMap<Ipv4Net, &Installed> = HashMap::new();
    for (i, want) in desired.iter().enumerate() {
        match foreign_at.get(&want.dst).map_or(&[][..], Vec::as_slice) {
            [] => {}
            [theirs] if theirs.protocol == RTPROT_BOOT && want.same_as(theirs) => {
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
                if std::mem::take(&mut placed[i]) {
                    withdraw.push(i);
                }
                continue;
            }
        }
        if !placed[i] {
            missing.push(i);
        }
    }
    debug!(
        missing = missing.len(),
        extra = owned.len() + withdraw.len(),
        adopt = adopt.len(),
        "route diff"
    );
    let ours_there = |dst: &Ipv4Net| owned_at.contains_key(dst);
    let adds: Vec<(usize, u16, bool)> = missing
        .iter()
        .map(|&i| {
            let dst = desired[i].dst;
            let ours = ours_there(&dst);
            // Replace only a route of our own. Adding next to flanneld's copy needs neither
            // flag: the kernel puts the new route ahead of it (they differ in protocol).
            let flags = if adopt.contains_key(&dst) {
                NLM_F_CREATE
            } else if ours {
                NLM_F_CREATE | NLM_F_REPLACE
            } else {
                NLM_F_CREATE | NLM_F_EXCL
            };
            (i, flags, ours && !adopt.contains_key(&dst))
        })
        .collect();
    let results = pipeline::all(adds.iter(), |(i, flags, _)| {
        add(handle, &desired[*i], *flags)
    })
    .await;
    let mut failed = HashSet::new();
    let (mut added, mut replaced) = (0, 0);
    for ((i, _, replacing), r) in adds.iter().zip(results) {
        let want = &desired[*i];
        match r {
            Ok(()) => {
                placed[*i] = true;
                if *replacing {
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
    let results = pipeline::all(adopting.iter(), |r| delete(handle, r)).await;
    let mut adopted = 0;
    for (theirs, r) in adopting.iter().zip(results) {
        match r {
            Ok(()) => {
                adopted += 1;
                debug!(dst = %theirs.dst, gateway = ?theirs.gateway, "flanneld's route adopted");
            }
            Err(e) if netlink::is_gone(&e) => {}
            Err(source) => errs.push(Error::Netlink {
                context: format!(
                    "adopt route {} via {:?} (proto boot)",
                    theirs.dst, theirs.gateway
                ),
                source,
            }),
        }
    }
    let results = pipeline::all(&withdraw, |&i| {
        delete_exact(handle, desired[i].dst, Hop::of(&desired[i]))
    })
    .await;
    for (&i, r) in withdraw.iter().zip(results) {
        let want = &desired[i];
        match r {
            Ok(()) => {
                info!(dst = %want.dst, gateway = ?want.gateway, "route withdrawn: another route holds its destination")
            }
            Err(e) if netlink::is_gone(&e) => {}
            Err(source) => errs.push(Error::Netlink {
                context: format!("delete route {want}"),
                source,
            }),
        }
    }
    let wanted: HashSet<Ipv4Net> = desired.iter().map(|d| d.dst).collect();
    let results = pipeline::all(&owned, |r| delete(handle, r)).await;
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
            Err(e) if netlink::is_gone(&e) => {}
            Err(source) => errs.push(Error::Netlink {
                context: format!("delete route {} via {:?}", r.dst, r.gateway),
                source,
            }),
        }
    }
    if added + replaced + removed + adopted > 0 {
        info!(added, replaced, removed, adopted, "routes updated");
    }
    (errs, placed, held)
}

/// Deletes weft's route to `dst` exactly as it was added (protocol, gateway, device): the
/// kernel matches every field given, so no other route to `dst` can go instead.
async fn delete_exact(handle: &Handle, dst: Ipv4Net, hop: Hop) -> Result<(), rtnetlink::Error> {
    let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(dst.network(), dst.prefix_len())
        .output_interface(hop.oif)
        .protocol(RouteProtocol::Other(RTPROT_WEFT));
    if let Some(g) = hop.gateway {
        b = b.gateway(g);
    }
    handle.route().del(b.build()).execute().await
}

async fn add(handle: &Handle, r: &RouteSpec, flags: u16) -> Result<(), rtnetlink::Error> {
    let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(r.dst.network(), r.dst.prefix_len())
        .output_interface(r.oif)
        .protocol(RouteProtocol::Other(RTPROT_WEFT));
    // A device route keeps universe scope, as flannel's udp backend creates it.
    if let Some(g) = r.gateway {
        b = b.gateway(g);
    }
    if r.onlink {
        b = b.onlink();
    }
    let msg = RouteNetlinkMessage::NewRoute(b.build());
    netlink::request(handle, msg, flags).await
}

async fn delete(handle: &Handle, r: &Installed) -> Result<(), rtnetlink::Error> {
    // Keep only what identifies the route; the dump's cache info and metrics are not for deletes.
    // The header stays, protocol included, so the kernel deletes this very route and not another
    // one to the same destination.
    let mut msg = r.msg.clone();
    msg.attributes.retain(|a| {
        matches!(
            a,
            RouteAttribute::Destination(_)
                | RouteAttribute::Gateway(_)
                | RouteAttribute::Oif(_)
                | RouteAttribute::Priority(_)
                | RouteAttribute::Table(_)
        )
    });
    handle.route().del(msg).execute().await
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

fn parse(msg: RouteMessage) -> Installed {
    let mut r = Installed {
        dst: dst(&msg),
        gateway: None,
        oif: None,
        onlink: msg.header.flags.contains(RouteFlags::Onlink),
        priority: 0,
        protocol: u8::from(msg.header.protocol),
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
            _ => {}
        }
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
