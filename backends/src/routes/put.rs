//! One route to put in place, and the requests that take it there: what a targeted change
//! sends for a route, judged from what weft had in place for its destination (a full pass judges
//! its puts in [`super::plan`]).

use rtnetlink::packet_core::{NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE};

use super::spec::{Hop, RouteSpec};

/// One route to put in place, and the requests that take it there.
pub(super) struct Put<'a> {
    pub(super) want: &'a RouteSpec,
    pub(super) hop: Hop,
    /// The nexthop request's flags, when the hop names a nexthop that must be added or replaced.
    pub(super) nh_flags: Option<u16>,
    /// The route request's flags; none when the route already names the right nexthop.
    pub(super) route_flags: Option<u16>,
    /// What weft had in place for this destination.
    pub(super) previous: Option<Hop>,
    /// Why the route is not in place, once sent (boxed: 10,000 puts are mostly successes).
    pub(super) failed: Option<Box<rtnetlink::Error>>,
}

impl<'a> Put<'a> {
    pub(super) fn new(want: &'a RouteSpec, hop: Hop) -> Self {
        Self {
            want,
            hop,
            nh_flags: None,
            route_flags: None,
            previous: None,
            failed: None,
        }
    }

    /// A route where weft has none: added exclusively, so a route someone else holds is never
    /// overwritten.
    pub(super) fn add(want: &'a RouteSpec, hop: Hop) -> Self {
        Self::new(want, hop)
            .nexthop(NLM_F_CREATE | NLM_F_EXCL)
            .route(NLM_F_CREATE | NLM_F_EXCL)
    }

    /// The requests taking weft's route to `want.dst` from `previous` (what weft has there, if
    /// anything) to `hop`; none when it is there already.
    pub(super) fn change(want: &'a RouteSpec, hop: Hop, previous: Option<Hop>) -> Option<Self> {
        match previous {
            Some(h) if h == hop => None,
            // Only the gateway changed: the route names the same nexthop.
            Some(h) if h.nh.is_some() && h.nh == hop.nh => Some(
                Self::new(want, hop)
                    .nexthop(NLM_F_CREATE | NLM_F_REPLACE)
                    .previous(h),
            ),
            Some(h) => Some(
                Self::new(want, hop)
                    .nexthop(NLM_F_CREATE | NLM_F_EXCL)
                    .route(NLM_F_CREATE | NLM_F_REPLACE)
                    .previous(h),
            ),
            None => Some(Self::add(want, hop)),
        }
    }

    /// Once sent: the hop in place, or why the route is not.
    pub(super) fn result(&mut self) -> Result<Hop, rtnetlink::Error> {
        match self.failed.take() {
            Some(e) => Err(*e),
            None => Ok(self.hop),
        }
    }

    /// Adds or replaces the hop's nexthop (if it names one) with `flags`.
    pub(super) fn nexthop(mut self, flags: u16) -> Self {
        if self.hop.nh.is_some() {
            self.nh_flags = Some(flags);
        }
        self
    }

    pub(super) fn route(mut self, flags: u16) -> Self {
        self.route_flags = Some(flags);
        self
    }

    fn previous(mut self, hop: Hop) -> Self {
        self.previous = Some(hop);
        self
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use ipnet::{IpNet, Ipv4Net};

    use super::*;

    const ADD: u16 = NLM_F_CREATE | NLM_F_EXCL;
    const REPLACE: u16 = NLM_F_CREATE | NLM_F_REPLACE;

    #[test]
    fn a_targeted_change_sends_only_what_differs() {
        let want = RouteSpec {
            gateway: Some(Ipv4Addr::new(192, 168, 1, 1).into()),
            ..RouteSpec::device("10.244.1.0/24".parse::<Ipv4Net>().expect("dst"), 2, "eth0")
        };
        let classic = Hop::classic(&want);
        let named = Hop::of(&want, true);
        let moved = Hop {
            gateway: Some(Ipv4Addr::new(192, 168, 1, 9).into()),
            ..named
        };
        let flags = |previous: Option<Hop>, hop: Hop| {
            Put::change(&want, hop, previous).map(|p| (p.nh_flags, p.route_flags, p.previous))
        };
        assert_eq!(flags(Some(named), named), None, "in place already");
        assert_eq!(
            flags(Some(named), moved),
            Some((Some(REPLACE), None, Some(named))),
            "a new gateway is the nexthop replaced, the route untouched"
        );
        assert_eq!(
            flags(Some(classic), named),
            Some((Some(ADD), Some(REPLACE), Some(classic)))
        );
        assert_eq!(
            flags(Some(named), classic),
            Some((None, Some(REPLACE), Some(named)))
        );
        assert_eq!(flags(None, named), Some((Some(ADD), Some(ADD), None)));
    }

    #[test]
    fn an_ipv6_gateway_change_replaces_the_classic_route() {
        let want = RouteSpec {
            gateway: Some("fd00:1::1".parse().expect("gateway")),
            ..RouteSpec::device("fd00:10::/64".parse::<IpNet>().expect("dst"), 2, "eth0")
        };
        // Where the kernel has nexthops too.
        let hop = Hop::of(&want, true);
        assert_eq!(hop, Hop::classic(&want));
        let before = Hop {
            gateway: Some("fd00:1::9".parse().expect("gateway")),
            ..hop
        };
        let put = Put::change(&want, hop, Some(before)).expect("a change");
        assert_eq!((put.nh_flags, put.route_flags), (None, Some(REPLACE)));
        assert!(Put::change(&want, hop, Some(hop)).is_none());
        let add = Put::change(&want, hop, None).expect("an add");
        assert_eq!((add.nh_flags, add.route_flags), (None, Some(ADD)));
    }
}
