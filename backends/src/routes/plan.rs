//! What a reconcile changes, judged without touching the kernel. A full pass feeds a [`Diff`] the
//! routes wanted, the kernel's nexthops (when routes are to name them) and, as the dump streams
//! in, the routes of the main table; its [`Plan`] says which routes and nexthops to put in place
//! with which flags, which to delete, which to leave to the route that holds their destination,
//! and which of flanneld's routes to adopt. Pure: the full pass sends the requests and records
//! what they did.

use std::collections::{HashMap, HashSet};

use ipnet::IpNet;
use rtnetlink::packet_core::{NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE};

use super::dump::Installed;
use super::owner::{Owner, RTPROT_BOOT};
use super::put::Put;
use super::spec::{Hop, RouteSpec};
use crate::nexthop::Nexthop;

/// A full pass being judged: the desired routes, the kernel's nexthops, and the routes of the
/// main table as [`Diff::see`] is given them. weft's own route that is exactly as wanted is only
/// noted (placed), not kept: with 10,000 peers in place, the pass holds no copy of the table.
/// Every other route is kept whole, to be judged, replaced or deleted.
pub(super) struct Diff<'a> {
    owner: Owner,
    desired: &'a [RouteSpec],
    /// Every nexthop, to read the routes that name one.
    nexthops: HashMap<u32, Nexthop>,
    /// This instance's nexthops, to keep or remove.
    ours_nh: HashSet<u32>,
    /// For each desired route, the hop it is to have.
    want: Vec<Hop>,
    /// Desired routes that stay classic because another's nexthop holds their id, with the id.
    taken_ids: Vec<(IpNet, u32)>,
    /// For each desired route, weft's route already in place exactly as wanted.
    placed: Vec<Option<Hop>>,
    /// The first desired route to each destination.
    wanted_at: HashMap<IpNet, usize>,
    /// weft's other routes.
    owned: Vec<Installed>,
    /// Routes weft does not own.
    foreign: Vec<Installed>,
}

impl<'a> Diff<'a> {
    /// `objects` is every nexthop of the kernel, when routes are to name them.
    pub(super) fn new(
        owner: Owner,
        desired: &'a [RouteSpec],
        objects: Option<Vec<Nexthop>>,
    ) -> Self {
        let with_nexthops = objects.is_some();
        let nexthops: HashMap<u32, Nexthop> = (objects.unwrap_or_default().into_iter())
            .map(|n| (n.id, n))
            .collect();
        let ours_nh: HashSet<u32> = (nexthops.values())
            .filter(|n| owner.owns_nexthop(n))
            .map(|n| n.id)
            .collect();
        let taken = |id: &u32| nexthops.contains_key(id) && !ours_nh.contains(id);
        let mut taken_ids = Vec::new();
        let want = (desired.iter())
            .map(|d| {
                let mut hop = Hop::of(d, with_nexthops);
                if let Some(id) = hop.nh.filter(taken) {
                    taken_ids.push((d.dst, id));
                    hop.nh = None;
                }
                hop
            })
            .collect();
        let mut wanted_at = HashMap::with_capacity(desired.len());
        for (i, want) in desired.iter().enumerate() {
            wanted_at.entry(want.dst).or_insert(i);
        }
        Self {
            owner,
            desired,
            nexthops,
            ours_nh,
            want,
            taken_ids,
            placed: vec![None; desired.len()],
            wanted_at,
            owned: Vec::new(),
            foreign: Vec::new(),
        }
    }

    /// The kernel's nexthops by id, to read the routes that name one ([`super::dump::parse`]).
    pub(super) fn nexthops(&self) -> &HashMap<u32, Nexthop> {
        &self.nexthops
    }

    /// The desired routes that name their gateway, not a nexthop, because the id of their
    /// nexthop is another's; with that id.
    pub(super) fn taken_ids(&self) -> &[(IpNet, u32)] {
        &self.taken_ids
    }

    /// Takes in one route of the main table.
    pub(super) fn see(&mut self, r: Installed) {
        if !self.owner.owns(&r) {
            self.foreign.push(r);
            return;
        }
        match self.wanted_at.get(&r.dst) {
            Some(&i)
                if self.placed[i].is_none()
                    && self.desired[i].forwards_like(&r)
                    && r.nh == self.want[i].nh =>
            {
                self.placed[i] = Some(self.want[i])
            }
            _ => self.owned.push(r),
        }
    }

    /// What the pass must change, once every route is seen.
    pub(super) fn plan(self) -> Plan<'a> {
        let Self {
            desired,
            nexthops,
            ours_nh,
            want,
            mut placed,
            wanted_at,
            owned,
            foreign,
            ..
        } = self;
        let named_by_others = foreign.iter().filter_map(|r| r.nh).collect();
        // Indexes by destination: a pass costs O(routes), whatever the table's size.
        let mut foreign_at: HashMap<IpNet, Vec<Installed>> = HashMap::new();
        for r in foreign {
            foreign_at.entry(r.dst).or_default().push(r);
        }
        let owned_at: HashSet<IpNet> = owned.iter().map(|r| r.dst).collect();
        let (mut blocked, mut withdraw, mut puts) = (Vec::new(), Vec::new(), Vec::new());
        let mut adopting = Vec::new();
        for (i, d) in desired.iter().enumerate() {
            let flanneld = match foreign_at.get(&d.dst).map_or(&[][..], Vec::as_slice) {
                [] => false,
                [theirs] if theirs.protocol == RTPROT_BOOT && d.forwards_like(theirs) => {
                    adopting.push(d.dst);
                    true
                }
                [theirs, ..] => {
                    // Weft's own routes to this destination are not kept: they are withdrawn.
                    blocked.push((d, theirs.clone()));
                    withdraw.extend(placed[i].take().map(|hop| (d, hop)));
                    continue;
                }
            };
            if placed[i].is_none() {
                let there = if flanneld {
                    Holder::Flanneld
                } else if owned_at.contains(&d.dst) {
                    Holder::Weft
                } else {
                    Holder::Nobody
                };
                puts.push((i, put_missing(d, want[i], there, &nexthops)));
            }
        }
        let remove = (owned.into_iter())
            .map(|r| {
                let why = if foreign_at.contains_key(&r.dst) {
                    Removal::Yielded
                } else if wanted_at.contains_key(&r.dst) {
                    Removal::Variant
                } else {
                    Removal::Unwanted
                };
                (r, why)
            })
            .collect();
        // The one route there, by the match above; taken once if two desired routes share it.
        let adopt = (adopting.iter())
            .filter_map(|dst| foreign_at.remove(dst))
            .flatten()
            .collect();
        Plan {
            placed,
            blocked,
            puts,
            adopt,
            withdraw,
            remove,
            nexthops: NexthopUse {
                ours: ours_nh,
                named_by_others,
            },
        }
    }
}

/// Who routes a desired destination that is missing its route.
#[derive(Debug, Clone, Copy)]
enum Holder {
    Nobody,
    /// weft, but not as wanted.
    Weft,
    /// flanneld, exactly as wanted: weft adopts it.
    Flanneld,
}

/// The requests putting `want` in place through `hop`, given who routes its destination and the
/// kernel's `nexthops`.
fn put_missing<'a>(
    want: &'a RouteSpec,
    hop: Hop,
    there: Holder,
    nexthops: &HashMap<u32, Nexthop>,
) -> Put<'a> {
    // Replace only a route of our own. Adding next to flanneld's copy needs neither
    // flag: the kernel puts the new route ahead of it (they differ in protocol). IPv6 refuses a
    // second route with the same next hop whatever its protocol (EEXIST): there weft's copy
    // replaces flanneld's in place, as atomically.
    let flags = match there {
        Holder::Flanneld if matches!(want.dst, IpNet::V6(_)) => NLM_F_CREATE | NLM_F_REPLACE,
        Holder::Flanneld => NLM_F_CREATE,
        Holder::Weft => NLM_F_CREATE | NLM_F_REPLACE,
        Holder::Nobody => NLM_F_CREATE | NLM_F_EXCL,
    };
    let put = Put::new(want, hop).route(flags);
    match hop.nh.and_then(|id| nexthops.get(&id)) {
        // weft's own (another's id was ruled out by `Diff::new`): kept if it is right.
        Some(n) if Some(*n) == hop.nexthop() => put,
        Some(_) => put.nexthop(NLM_F_CREATE | NLM_F_REPLACE),
        None => put.nexthop(NLM_F_CREATE | NLM_F_EXCL),
    }
}

/// What a full pass changes, in the order it sends it: the missing routes put in place; then
/// flanneld's copies of the ones weft adopts deleted, weft's routes withdrawn from destinations
/// another route holds, and weft's other routes deleted; last, weft's nexthops no route names.
pub(super) struct Plan<'a> {
    /// For each desired route, weft's route already exactly as wanted, which stays.
    pub(super) placed: Vec<Option<Hop>>,
    /// Desired routes whose destination a route weft does not own holds, with the first such
    /// route: not put in place, but reported as a conflict.
    pub(super) blocked: Vec<(&'a RouteSpec, Installed)>,
    /// The desired routes to put in place (by their index), with the requests.
    pub(super) puts: Vec<(usize, Put<'a>)>,
    /// flanneld's routes weft adopts, one a destination: deleted once weft's copy is in (an
    /// IPv6 one is already gone then: weft's copy replaced it).
    pub(super) adopt: Vec<Installed>,
    /// weft's routes, exactly as placed, to destinations another route holds.
    pub(super) withdraw: Vec<(&'a RouteSpec, Hop)>,
    /// weft's other routes, which all go, and why.
    pub(super) remove: Vec<(Installed, Removal)>,
    pub(super) nexthops: NexthopUse,
}

/// Why a full pass deletes one of weft's routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Removal {
    /// Another route holds its destination: the destination is left to it.
    Yielded,
    /// Its destination is wanted, but not this way: the route put in place replaces it.
    Variant,
    /// No desired route has its destination.
    Unwanted,
}

/// weft's nexthops, and the nexthops routes weft does not own name: which of weft's a full pass
/// deletes.
pub(super) struct NexthopUse {
    ours: HashSet<u32>,
    named_by_others: HashSet<u32>,
}

impl NexthopUse {
    /// weft's nexthops no route names with `placed` in place (never one another's route names).
    pub(super) fn unused(&self, placed: &[Option<Hop>]) -> Vec<u32> {
        let named: HashSet<u32> = placed.iter().flatten().filter_map(|h| h.nh).collect();
        (self.ours.iter().copied())
            .filter(|id| !named.contains(id) && !self.named_by_others.contains(id))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::routes::owner::{nexthop_id, RTPROT_WEFT};

    const ADD: u16 = NLM_F_CREATE | NLM_F_EXCL;
    const REPLACE: u16 = NLM_F_CREATE | NLM_F_REPLACE;
    /// The kernel's own routes (`proto kernel`): connected networks.
    const RTPROT_KERNEL: u8 = 2;
    /// An administrator's (`ip route add ... proto static`).
    const RTPROT_STATIC: u8 = 4;
    /// FRR's zebra, which makes nexthops of its own.
    const RTPROT_ZEBRA: u8 = 11;

    fn net(s: &str) -> IpNet {
        s.parse().expect("net")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    fn host_gw() -> Owner {
        Owner {
            network: "10.244.0.0/16".parse().expect("net"),
            network_v6: None,
            device: None,
        }
    }

    /// host-gw with an IPv6 network beside its IPv4 one.
    fn dual_stack() -> Owner {
        Owner {
            network_v6: Some("fd00:10::/48".parse().expect("net")),
            ..host_gw()
        }
    }

    /// `dst via gateway dev eth0`, as host-gw wants a peer's route.
    fn via(dst: &str, gateway: &str) -> RouteSpec {
        RouteSpec {
            gateway: Some(ip(gateway)),
            ..RouteSpec::device(net(dst), 2, "eth0")
        }
    }

    /// `dst via gateway dev eth0 proto <protocol>` in the kernel.
    fn route(dst: &str, gateway: &str, protocol: u8) -> Installed {
        Installed::plain(dst, Some(gateway), 2, protocol)
    }

    /// weft's nexthop for `want`, as weft makes it.
    fn nexthop_of(want: &RouteSpec) -> Nexthop {
        Hop::of(want, true)
            .nexthop()
            .expect("a route through a gateway")
    }

    /// Two peers' routes, as host-gw wants them.
    fn peers() -> [RouteSpec; 2] {
        [
            via("10.244.1.0/24", "192.168.1.1"),
            via("10.244.2.0/24", "192.168.1.2"),
        ]
    }

    /// The plan of a host-gw instance for `desired`, given the kernel's nexthops and routes.
    fn plan(
        desired: &[RouteSpec],
        nexthops: Option<Vec<Nexthop>>,
        routes: Vec<Installed>,
    ) -> Plan<'_> {
        plan_of(host_gw(), desired, nexthops, routes)
    }

    fn plan_of(
        owner: Owner,
        desired: &[RouteSpec],
        nexthops: Option<Vec<Nexthop>>,
        routes: Vec<Installed>,
    ) -> Plan<'_> {
        let mut diff = Diff::new(owner, desired, nexthops);
        for r in routes {
            diff.see(r);
        }
        diff.plan()
    }

    /// Each put as (destination, nexthop request's flags, route request's flags).
    fn puts(p: &Plan) -> Vec<(IpNet, Option<u16>, Option<u16>)> {
        (p.puts.iter())
            .map(|(_, put)| (put.want.dst, put.nh_flags, put.route_flags))
            .collect()
    }

    fn removed(p: &Plan) -> Vec<(IpNet, Option<IpAddr>, Removal)> {
        (p.remove.iter())
            .map(|(r, why)| (r.dst, r.gateway, *why))
            .collect()
    }

    #[test]
    fn weft_routes_as_wanted_stay_and_missing_ones_are_added_exclusively() {
        let desired = peers();
        let p = plan(
            &desired,
            None,
            vec![route("10.244.1.0/24", "192.168.1.1", RTPROT_WEFT)],
        );
        assert_eq!(p.placed, [Some(Hop::classic(&desired[0])), None]);
        assert_eq!(puts(&p), [(net("10.244.2.0/24"), None, Some(ADD))]);
        assert_eq!(p.puts[0].0, 1, "the put knows its desired route");
        assert!(p.remove.is_empty() && p.adopt.is_empty());
        assert!(p.blocked.is_empty() && p.withdraw.is_empty());
    }

    #[test]
    fn a_weft_route_not_as_wanted_is_replaced_and_one_no_peer_wants_is_deleted() {
        let desired = [via("10.244.1.0/24", "192.168.1.1")];
        let p = plan(
            &desired,
            None,
            vec![
                route("10.244.1.0/24", "192.168.1.9", RTPROT_WEFT),
                route("10.244.7.0/24", "192.168.1.7", RTPROT_WEFT),
            ],
        );
        assert_eq!(puts(&p), [(net("10.244.1.0/24"), None, Some(REPLACE))]);
        assert_eq!(
            removed(&p),
            [
                (
                    net("10.244.1.0/24"),
                    Some(ip("192.168.1.9")),
                    Removal::Variant
                ),
                (
                    net("10.244.7.0/24"),
                    Some(ip("192.168.1.7")),
                    Removal::Unwanted
                ),
            ]
        );
    }

    #[test]
    fn a_destination_another_route_holds_is_left_to_it_and_weft_withdraws_from_it() {
        let desired = peers();
        // A local bridge's connected route, and an administrator's; weft was there first.
        let bridge = Installed::plain("10.244.1.0/24", None, 5, RTPROT_KERNEL);
        let p = plan(
            &desired,
            None,
            vec![
                route("10.244.1.0/24", "192.168.1.1", RTPROT_WEFT),
                bridge,
                route("10.244.2.0/24", "192.168.1.2", RTPROT_STATIC),
                route("10.244.2.0/24", "192.168.1.9", RTPROT_WEFT),
            ],
        );
        let blocked: Vec<_> = (p.blocked.iter())
            .map(|(want, theirs)| (want.dst, theirs.protocol))
            .collect();
        assert_eq!(
            blocked,
            [
                (net("10.244.1.0/24"), RTPROT_KERNEL),
                (net("10.244.2.0/24"), RTPROT_STATIC),
            ]
        );
        assert!(
            p.puts.is_empty(),
            "nothing is added next to another's route"
        );
        // weft's route as wanted goes exactly as it was placed; its other route goes too.
        let withdrawn: Vec<_> = p.withdraw.iter().map(|(w, hop)| (w.dst, *hop)).collect();
        assert_eq!(
            withdrawn,
            [(net("10.244.1.0/24"), Hop::classic(&desired[0]))]
        );
        assert_eq!(p.placed, [None, None]);
        assert_eq!(
            removed(&p),
            [(
                net("10.244.2.0/24"),
                Some(ip("192.168.1.9")),
                Removal::Yielded
            )]
        );
    }

    #[test]
    fn a_link_scope_route_is_in_place_only_in_link_scope_and_flanneds_is_adopted() {
        let desired = [RouteSpec::link(net("10.244.0.0/16"), 7, "flannel-wg")];
        let mut link = Installed::plain("10.244.0.0/16", None, 7, RTPROT_WEFT);
        link.scope_link = true;
        let p = plan(&desired, None, vec![link.clone()]);
        assert!(puts(&p).is_empty(), "in place: {:?}", puts(&p));
        assert!(p.remove.is_empty());

        // The same route in universe scope (an older weft's) is replaced.
        let universe = Installed::plain("10.244.0.0/16", None, 7, RTPROT_WEFT);
        let p = plan(&desired, None, vec![universe]);
        assert_eq!(puts(&p), [(net("10.244.0.0/16"), None, Some(REPLACE))]);

        // flanneld's, as it makes it (proto boot, scope link), is adopted.
        link.protocol = RTPROT_BOOT;
        let p = plan(&desired, None, vec![link]);
        assert_eq!(p.adopt.len(), 1);
        assert!(p.blocked.is_empty());
    }

    #[test]
    fn flanneld_routes_as_wanted_are_adopted_and_its_others_are_conflicts() {
        let desired = peers();
        let p = plan(
            &desired,
            None,
            vec![
                route("10.244.1.0/24", "192.168.1.1", RTPROT_BOOT),
                route("10.244.2.0/24", "192.168.1.9", RTPROT_BOOT),
            ],
        );
        // Added next to flanneld's copy (ahead of it: they differ in protocol), which then goes.
        assert_eq!(puts(&p), [(net("10.244.1.0/24"), None, Some(NLM_F_CREATE))]);
        let adopted: Vec<_> = p.adopt.iter().map(|r| (r.dst, r.gateway)).collect();
        assert_eq!(adopted, [(net("10.244.1.0/24"), Some(ip("192.168.1.1")))]);
        assert_eq!(p.blocked.len(), 1);
        assert_eq!(p.blocked[0].0.dst, net("10.244.2.0/24"));
        assert!(p.remove.is_empty() && p.withdraw.is_empty());
    }

    #[test]
    fn with_nexthop_objects_a_route_through_a_gateway_names_its_own_and_a_device_route_none() {
        let desired = [
            via("10.244.1.0/24", "192.168.1.1"),
            RouteSpec::device(net("10.244.0.0/16"), 7, "flannel0"),
        ];
        let p = plan(&desired, Some(Vec::new()), Vec::new());
        assert_eq!(
            puts(&p),
            [
                (net("10.244.1.0/24"), Some(ADD), Some(ADD)),
                (net("10.244.0.0/16"), None, Some(ADD)),
            ]
        );
        assert_eq!(p.puts[0].1.hop.nh, nexthop_id(net("10.244.1.0/24")));
        assert_eq!(p.puts[1].1.hop.nh, None);

        let classic = plan(&desired, None, Vec::new());
        assert!(classic.puts.iter().all(|(_, put)| put.hop.nh.is_none()));
    }

    #[test]
    fn a_nexthop_id_another_program_holds_leaves_the_route_classic() {
        let desired = [via("10.244.1.0/24", "192.168.1.1")];
        let id = nexthop_id(desired[0].dst).expect("id");
        let zebras = Nexthop {
            protocol: RTPROT_ZEBRA,
            ..nexthop_of(&desired[0])
        };
        let diff = Diff::new(host_gw(), &desired, Some(vec![zebras]));
        assert_eq!(diff.taken_ids(), [(desired[0].dst, id)]);
        let p = diff.plan();
        assert_eq!(puts(&p), [(desired[0].dst, None, Some(ADD))]);
        assert_eq!(p.puts[0].1.hop.nh, None);
        assert!(p.nexthops.unused(&p.placed).is_empty(), "never deleted");
    }

    #[test]
    fn weft_nexthops_as_wanted_are_kept_and_ones_that_differ_replaced() {
        let desired = peers();
        let moved = Nexthop {
            gateway: Some("192.168.1.9".parse().expect("ip")),
            ..nexthop_of(&desired[1])
        };
        let nexthops = vec![nexthop_of(&desired[0]), moved];
        let p = plan(&desired, Some(nexthops), Vec::new());
        assert_eq!(
            puts(&p),
            [
                (desired[0].dst, None, Some(ADD)),
                (desired[1].dst, Some(REPLACE), Some(ADD)),
            ]
        );
    }

    #[test]
    fn a_classic_weft_route_moves_to_its_nexthop_and_one_naming_it_stays() {
        let desired = peers();
        let mut named = route("10.244.2.0/24", "192.168.1.2", RTPROT_WEFT);
        named.nh = nexthop_id(desired[1].dst);
        let p = plan(
            &desired,
            Some(vec![nexthop_of(&desired[1])]),
            vec![route("10.244.1.0/24", "192.168.1.1", RTPROT_WEFT), named],
        );
        assert_eq!(puts(&p), [(desired[0].dst, Some(ADD), Some(REPLACE))]);
        assert_eq!(
            removed(&p),
            [(desired[0].dst, Some(ip("192.168.1.1")), Removal::Variant)]
        );
        assert_eq!(p.placed[1], Some(Hop::of(&desired[1], true)));
    }

    #[test]
    fn only_weft_nexthops_no_route_names_are_unused() {
        let desired = [via("10.244.1.0/24", "192.168.1.1")];
        let placed_nh = nexthop_of(&desired[0]);
        let idle = nexthop_of(&via("10.244.2.0/24", "192.168.1.2"));
        let borrowed = nexthop_of(&via("10.244.3.0/24", "192.168.1.3"));
        let anothers = Nexthop {
            protocol: RTPROT_ZEBRA,
            ..nexthop_of(&via("10.244.4.0/24", "192.168.1.4"))
        };
        let mut theirs = route("10.9.0.0/16", "192.168.1.3", RTPROT_STATIC);
        theirs.nh = Some(borrowed.id);
        let mut ours = route("10.244.1.0/24", "192.168.1.1", RTPROT_WEFT);
        ours.nh = Some(placed_nh.id);
        let p = plan(
            &desired,
            Some(vec![placed_nh, idle, borrowed, anothers]),
            vec![ours, theirs],
        );
        assert_eq!(p.nexthops.unused(&p.placed), [idle.id]);
    }

    /// Two peers' IPv6 routes, as dual-stack host-gw wants them.
    fn peers_v6() -> [RouteSpec; 2] {
        [
            via("fd00:10:0:1::/64", "fd00:1::1"),
            via("fd00:10:0:2::/64", "fd00:1::2"),
        ]
    }

    #[test]
    fn an_own_ipv6_route_as_wanted_stays_one_that_differs_is_replaced_and_an_unwanted_one_goes() {
        let desired = peers_v6();
        let p = plan_of(
            dual_stack(),
            &desired,
            None,
            vec![
                route("fd00:10:0:1::/64", "fd00:1::1", RTPROT_WEFT),
                route("fd00:10:0:2::/64", "fd00:1::9", RTPROT_WEFT),
                route("fd00:10:0:7::/64", "fd00:1::7", RTPROT_WEFT),
            ],
        );
        // The kernel's IPv6 metric (1024) is the plain one: in place.
        assert_eq!(p.placed, [Some(Hop::classic(&desired[0])), None]);
        assert_eq!(puts(&p), [(net("fd00:10:0:2::/64"), None, Some(REPLACE))]);
        assert_eq!(
            removed(&p),
            [
                (
                    net("fd00:10:0:2::/64"),
                    Some(ip("fd00:1::9")),
                    Removal::Variant
                ),
                (
                    net("fd00:10:0:7::/64"),
                    Some(ip("fd00:1::7")),
                    Removal::Unwanted
                ),
            ]
        );
        assert!(p.blocked.is_empty() && p.adopt.is_empty());
    }

    #[test]
    fn an_ipv6_route_at_another_metric_is_not_in_place() {
        let desired = [via("fd00:10:0:1::/64", "fd00:1::1")];
        let mut preferred = route("fd00:10:0:1::/64", "fd00:1::1", RTPROT_WEFT);
        preferred.priority = 100;
        let p = plan_of(dual_stack(), &desired, None, vec![preferred]);
        assert_eq!(p.placed, [None]);
        assert_eq!(puts(&p), [(desired[0].dst, None, Some(REPLACE))]);
    }

    #[test]
    fn another_routes_ipv6_destination_is_a_conflict_and_the_kernels_own_routes_stay() {
        let desired = peers_v6();
        // The connected prefix of a local interface, which a peer's lease overlaps.
        let mut connected = Installed::plain("fd00:10:0:2::/64", None, 5, RTPROT_KERNEL);
        connected.priority = 256;
        let mut link_local = Installed::plain("fe80::/64", None, 2, RTPROT_KERNEL);
        link_local.priority = 256;
        // Another weftd's, into its own IPv6 network.
        let theirs = route("fd00:99:0:2::/64", "fd00:1::2", RTPROT_WEFT);
        let p = plan_of(
            dual_stack(),
            &desired,
            None,
            vec![
                link_local,
                route("fd00:10:0:1::/64", "fd00:1::1", RTPROT_WEFT),
                connected,
                theirs,
            ],
        );
        let blocked: Vec<_> = (p.blocked.iter())
            .map(|(want, theirs)| (want.dst, theirs.protocol, theirs.oif))
            .collect();
        assert_eq!(blocked, [(net("fd00:10:0:2::/64"), RTPROT_KERNEL, Some(5))]);
        assert!(p.puts.is_empty(), "{:?}", puts(&p));
        assert!(p.remove.is_empty(), "{:?}", removed(&p));
        assert!(p.adopt.is_empty() && p.withdraw.is_empty());
        assert_eq!(p.placed, [Some(Hop::classic(&desired[0])), None]);
    }

    #[test]
    fn weft_yields_an_ipv6_destination_another_route_took() {
        let desired = [via("fd00:10:0:1::/64", "fd00:1::1")];
        let mut static_route = route("fd00:10:0:1::/64", "fd00:1::5", RTPROT_STATIC);
        static_route.priority = 512;
        let p = plan_of(
            dual_stack(),
            &desired,
            None,
            vec![
                route("fd00:10:0:1::/64", "fd00:1::1", RTPROT_WEFT),
                static_route,
            ],
        );
        assert_eq!(p.blocked.len(), 1);
        let withdrawn: Vec<_> = p.withdraw.iter().map(|(w, hop)| (w.dst, *hop)).collect();
        assert_eq!(withdrawn, [(desired[0].dst, Hop::classic(&desired[0]))]);
        assert!(p.puts.is_empty());
    }

    #[test]
    fn flanneld_ipv6_route_as_wanted_is_adopted_by_replacing_it() {
        let desired = peers_v6();
        let p = plan_of(
            dual_stack(),
            &desired,
            None,
            vec![
                route("fd00:10:0:1::/64", "fd00:1::1", RTPROT_BOOT),
                route("fd00:10:0:2::/64", "fd00:1::9", RTPROT_BOOT),
            ],
        );
        // IPv6 would refuse a copy beside it (same next hop): weft's replaces it.
        assert_eq!(puts(&p), [(net("fd00:10:0:1::/64"), None, Some(REPLACE))]);
        let adopted: Vec<_> = p.adopt.iter().map(|r| (r.dst, r.gateway)).collect();
        assert_eq!(adopted, [(net("fd00:10:0:1::/64"), Some(ip("fd00:1::1")))]);
        assert_eq!(p.blocked.len(), 1);
        assert_eq!(p.blocked[0].0.dst, net("fd00:10:0:2::/64"));
    }

    #[test]
    fn ipv6_routes_stay_classic_where_ipv4_ones_name_nexthops() {
        let desired = [
            via("10.244.1.0/24", "192.168.1.1"),
            via("fd00:10:0:1::/64", "fd00:1::1"),
        ];
        let p = plan_of(dual_stack(), &desired, Some(Vec::new()), Vec::new());
        assert_eq!(
            puts(&p),
            [
                (desired[0].dst, Some(ADD), Some(ADD)),
                (desired[1].dst, None, Some(ADD)),
            ]
        );
        assert_eq!(p.puts[1].1.hop.nh, None);
        assert!(p.nexthops.unused(&p.placed).is_empty());
    }

    #[test]
    fn an_ipv6_link_route_is_in_place_in_the_universe_scope_the_kernel_reports() {
        let desired = [RouteSpec::link(net("fd00:10::/48"), 7, "flannel-wg")];
        let p = plan_of(
            dual_stack(),
            &desired,
            None,
            vec![Installed::plain("fd00:10::/48", None, 7, RTPROT_WEFT)],
        );
        assert!(puts(&p).is_empty(), "{:?}", puts(&p));
        assert!(p.remove.is_empty());
    }
}
