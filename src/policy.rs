//! Which subnets this host should hold, decided from a listing alone (no I/O), as flannel does:
//! this host's own lease first, then the subnets of the previous run, then random free ones.
//!
//! Own leases and reservations are adopted only when they fit the config (flannel's
//! `isSubnetConfigCompat`): exactly SubnetLen long, inside [SubnetMin, SubnetMax], and with an
//! IPv6 subnet that fits the same way exactly when the network is dual-stack. A subnet is free
//! only when nothing in etcd overlaps it, whatever its size or owner: leases that no longer fit,
//! reservations, and keys whose value cannot be read all count, so two hosts never route the same
//! addresses. Both families are chosen with the same arithmetic ([`Range`]).
//!
//! Better than flannel: when IPv6 is turned on (or off, or its range changes) under a host whose
//! IPv4 lease still fits, flanneld deletes the lease and takes new subnets; weft keeps the IPv4
//! subnet and moves it to a key with the new IPv6 part ([`Choice::Rekey`]), so the host's
//! containers keep their IPv4 addresses.

use std::net::Ipv4Addr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::config::{NetworkConfig, Range};
use crate::lease::{BadLease, Lease, Record};

#[derive(Debug, Clone, PartialEq)]
pub enum Choice {
    /// A lease (or reservation) that already carries this host's PublicIP and fits the config.
    Ours(Lease),
    /// This host's lease whose IPv4 subnet fits but whose IPv6 side does not: the same IPv4
    /// subnet under a new key with this IPv6 subnet (or none), replacing it.
    Rekey(Lease, Option<Ipv6Net>),
    /// Free subnets to create: IPv4, and IPv6 when the network is dual-stack.
    Free(Ipv4Net, Option<Ipv6Net>),
}

/// Every subnet of one family's range is taken.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("no free subnet in {network}: {leased} of {total} leased")]
pub struct NetworkFull {
    pub network: IpNet,
    pub leased: u128,
    pub total: u128,
}

/// The subnets of the previous run (subnet.env), preferred when free.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Hint {
    pub subnet: Option<Ipv4Net>,
    pub ipv6_subnet: Option<Ipv6Net>,
}

/// How one of this host's leases fits the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fit {
    Whole,
    /// Its IPv4 subnet fits, its IPv6 side does not, and it is not a reservation (an operator's
    /// key, which weft never moves).
    Rekey,
    No,
}

fn fit(config: &NetworkConfig, l: &Lease) -> Fit {
    match (config.allows(l.subnet), config.allows_v6(l.ipv6_subnet)) {
        (true, true) => Fit::Whole,
        (true, false) if !l.is_reservation() => Fit::Rekey,
        _ => Fit::No,
    }
}

/// This host's leases and reservations that the config no longer allows: not adopted, and still
/// counted as taken until they expire or an operator removes them.
pub fn misfits<'a>(
    config: &NetworkConfig,
    leases: &'a [Lease],
    public_ip: Ipv4Addr,
) -> Vec<&'a Lease> {
    leases
        .iter()
        .filter(|l| l.attrs.public_ip == public_ip && fit(config, l) == Fit::No)
        .collect()
}

/// Picks subnets. `leases` must include every lease of `public_ip`; `others` are the subnets of
/// every other key (other hosts' leases, keys whose value cannot be read), which may also be
/// given as leases; `hint` holds the subnets of the previous subnet.env; `rand` draws a number
/// below its argument.
pub fn choose(
    config: &NetworkConfig,
    leases: &[Lease],
    others: &Others,
    public_ip: Ipv4Addr,
    hint: Hint,
    mut rand: impl FnMut(u128) -> u128,
) -> Result<Choice, NetworkFull> {
    // Reservations first: they pin a subnet to this host for good; then leases that fit whole.
    let mut ours: Vec<(&Lease, Fit)> = leases
        .iter()
        .filter(|l| l.attrs.public_ip == public_ip)
        .map(|l| (l, fit(config, l)))
        .filter(|(_, f)| *f != Fit::No)
        .collect();
    ours.sort_by_key(|(l, f)| (*f != Fit::Whole, !l.is_reservation()));

    let v6 = |rand: &mut dyn FnMut(u128) -> u128, beside: Ipv4Net| {
        let Some(pool) = config.ipv6 else {
            return Ok(None);
        };
        let range = pool.range();
        let taken6 = leases
            .iter()
            .filter_map(|l| l.ipv6_subnet)
            .chain(others.ipv6.iter().copied())
            .map(|n| (u128::from(n.network()), u128::from(n.broadcast())));
        let slots = Slots::new(range, taken6);
        // The previous run's; else the one at the IPv4 subnet's place in its range (so
        // 10.244.5.0/24 goes with fd00:10:244:5::/64 where both ranges line up); else any.
        let preferred = [
            hint.ipv6_subnet
                .filter(|h| config.allows_v6(Some(*h)))
                .map(|h| slots.index(u128::from(h.addr()))),
            Some(
                config
                    .range()
                    .index_of(u128::from(u32::from(beside.addr()))),
            ),
        ];
        slots
            .pick(preferred, rand)
            .map(|i| Some(pool.subnet_at(range.nth(i))))
            .ok_or_else(|| slots.full(IpNet::V6(pool.network)))
    };

    if let Some((l, f)) = ours.first() {
        return match f {
            Fit::Whole => Ok(Choice::Ours((*l).clone())),
            _ => Ok(Choice::Rekey((*l).clone(), v6(&mut rand, l.subnet)?)),
        };
    }

    let taken4 = leases
        .iter()
        .map(|l| l.subnet)
        .chain(others.ipv4.iter().copied())
        .map(|n| {
            (
                u128::from(u32::from(n.network())),
                u128::from(u32::from(n.broadcast())),
            )
        });
    let slots = Slots::new(config.range(), taken4);
    let preferred = [
        hint.subnet
            .filter(|h| config.allows(*h))
            .map(|h| slots.index(u128::from(u32::from(h.addr())))),
        None,
    ];
    let i = slots
        .pick(preferred, &mut rand)
        .ok_or_else(|| slots.full(IpNet::V4(config.network)))?;
    let subnet = config.nth_subnet(i as u64);
    Ok(Choice::Free(subnet, v6(&mut rand, subnet)?))
}

/// The candidate subnets of one family's range, numbered from 0, and which of them are taken.
struct Slots {
    range: Range,
    /// Taken candidate numbers: sorted, disjoint, non-adjacent inclusive runs.
    taken: Vec<(u128, u128)>,
}

impl Slots {
    /// The candidates that any of `nets` (first and last address) overlaps, whatever its length
    /// or alignment.
    fn new(range: Range, nets: impl Iterator<Item = (u128, u128)>) -> Self {
        let (first, last, shift) = (range.min, range.last(), range.shift());
        let mut runs: Vec<(u128, u128)> = nets
            .filter_map(|(lo, hi)| {
                let (lo, hi) = (lo.max(first), hi.min(last));
                (lo <= hi).then(|| ((lo - first) >> shift, (hi - first) >> shift))
            })
            .collect();
        runs.sort_unstable();
        let mut taken: Vec<(u128, u128)> = Vec::with_capacity(runs.len());
        for (lo, hi) in runs {
            match taken.last_mut() {
                // Overlapping or adjacent: one run, so a run's end + 1 is always free.
                Some(last) if lo <= last.1.saturating_add(1) => last.1 = last.1.max(hi),
                _ => taken.push((lo, hi)),
            }
        }
        Self { range, taken }
    }

    fn index(&self, addr: u128) -> u128 {
        self.range.index_of(addr)
    }

    fn run_containing(&self, i: u128) -> Option<(u128, u128)> {
        let after = self.taken.partition_point(|(lo, _)| *lo <= i);
        after
            .checked_sub(1)
            .map(|k| self.taken[k])
            .filter(|(_, hi)| i <= *hi)
    }

    fn count(&self) -> u128 {
        self.taken.iter().map(|(lo, hi)| hi - lo + 1).sum()
    }

    /// The first of `preferred` that is a free candidate; else, from a random start, walking
    /// forward past taken runs (cheap even for huge ranges), wrapping around once.
    fn pick(
        &self,
        preferred: [Option<u128>; 2],
        rand: &mut dyn FnMut(u128) -> u128,
    ) -> Option<u128> {
        let total = self.range.count();
        if let Some(i) = preferred
            .into_iter()
            .flatten()
            .find(|i| *i < total && self.run_containing(*i).is_none())
        {
            return Some(i);
        }
        let mut i = rand(total).min(total - 1);
        // Runs are non-adjacent, so at most one jump before the end and one after wrapping.
        for _ in 0..3 {
            match self.run_containing(i) {
                None => return Some(i),
                Some((_, hi)) if hi + 1 < total => i = hi + 1,
                Some(_) => i = 0,
            }
        }
        None
    }

    fn full(&self, network: IpNet) -> NetworkFull {
        NetworkFull {
            network,
            leased: self.count(),
            total: self.range.count(),
        }
    }
}

/// The subnets of every key but this host's: they are taken.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Others {
    pub ipv4: Vec<Ipv4Net>,
    pub ipv6: Vec<Ipv6Net>,
}

/// What choosing a subnet needs of a listing, folded from it key by key, so that a listing of
/// 10,000 leases is never held whole: this host's leases, every other key's subnets, and the keys
/// that cannot be read.
#[derive(Debug)]
pub struct Claims {
    public_ip: Ipv4Addr,
    /// Leases carrying this host's PublicIP.
    pub mine: Vec<Lease>,
    /// The subnets of every other key whose name is a subnet: other hosts' leases, and keys whose
    /// value cannot be read (they still block creating that key, and may be routed by hosts that
    /// read them differently).
    pub others: Others,
    pub bad: Vec<BadLease>,
}

impl Claims {
    pub fn new(public_ip: Ipv4Addr) -> Self {
        Self {
            public_ip,
            mine: Vec::new(),
            others: Others::default(),
            bad: Vec::new(),
        }
    }

    /// Takes in one record; `named` is what its key names, if anything (an unreadable record
    /// still blocks creating that key).
    pub fn add(&mut self, record: Record, named: Option<(Ipv4Net, Option<Ipv6Net>)>) {
        let mut take = |v4, v6: Option<Ipv6Net>| {
            self.others.ipv4.push(v4);
            self.others.ipv6.extend(v6);
        };
        match record.value {
            Ok(l) if l.attrs.public_ip == self.public_ip => self.mine.push(l),
            Ok(l) => take(l.subnet, l.ipv6_subnet),
            Err(e) => {
                if let Some((v4, v6)) = named {
                    take(v4, v6);
                }
                self.bad.push(BadLease {
                    key: record.key,
                    reason: e.to_string(),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::LeaseAttrs;

    fn cfg(text: &str) -> NetworkConfig {
        NetworkConfig::parse(text).unwrap()
    }

    fn lease(subnet: &str, ip: &str, etcd_lease: i64) -> Lease {
        Lease {
            subnet: subnet.parse().unwrap(),
            ipv6_subnet: None,
            attrs: LeaseAttrs {
                public_ip: ip.parse().unwrap(),
                public_ipv6: None,
                backend_type: String::new(),
                backend_data: None,
                backend_v6_data: None,
            },
            hold: crate::registry::etcd::hold(etcd_lease),
            version: 1,
        }
    }

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    const ME: &str = "192.168.1.5";

    fn me() -> Ipv4Addr {
        ME.parse().unwrap()
    }
    const OTHER: &str = "192.168.1.6";

    fn pick(
        c: &NetworkConfig,
        leases: &[Lease],
        hint: Option<&str>,
    ) -> Result<Choice, NetworkFull> {
        let hint = Hint {
            subnet: hint.map(net),
            ipv6_subnet: None,
        };
        choose(
            c,
            leases,
            &Others::default(),
            ME.parse().unwrap(),
            hint,
            |_| 0,
        )
    }

    #[test]
    fn own_lease_wins_and_a_reservation_beats_a_lease() {
        let c = cfg(r#"{"Network":"10.10.0.0/16"}"#);
        let leases = [lease("10.10.3.0/24", ME, 7), lease("10.10.9.0/24", ME, 0)];
        assert_eq!(
            pick(&c, &leases, None).unwrap(),
            Choice::Ours(leases[1].clone())
        );
    }

    #[test]
    fn previous_subnet_is_reused_when_free() {
        let c = cfg(r#"{"Network":"10.10.0.0/16"}"#);
        let hint = Some("10.10.42.0/24");
        assert_eq!(
            pick(&c, &[], hint).unwrap(),
            Choice::Free(net("10.10.42.0/24"), None)
        );
        let taken = [lease("10.10.42.0/24", OTHER, 9)];
        assert_eq!(
            pick(&c, &taken, hint).unwrap(),
            Choice::Free(net("10.10.1.0/24"), None)
        );
    }

    #[test]
    fn random_start_skips_taken_subnets_within_min_max() {
        let c =
            cfg(r#"{"Network":"10.10.0.0/16","SubnetMin":"10.10.5.0","SubnetMax":"10.10.7.0"}"#);
        let taken = [
            lease("10.10.6.0/24", OTHER, 9),
            lease("10.10.7.0/24", "192.168.1.7", 9),
        ];
        let pick = choose(&c, &taken, &Others::default(), me(), Hint::default(), |n| {
            n - 2
        })
        .unwrap();
        assert_eq!(pick, Choice::Free(net("10.10.5.0/24"), None));
    }

    #[test]
    fn a_full_network_says_so() {
        let c = cfg(r#"{"Network":"10.10.0.0/22"}"#);
        let taken: Vec<Lease> = (1..=3)
            .map(|i| {
                lease(
                    &format!("10.10.{i}.0/24"),
                    &format!("192.168.1.{}", 10 + i),
                    5,
                )
            })
            .collect();
        let e = pick(&c, &taken, None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "no free subnet in 10.10.0.0/22: 3 of 3 leased"
        );
    }

    #[test]
    fn an_own_lease_of_another_length_is_not_adopted_and_stays_taken() {
        // SubnetLen went from 24 to 25: the old /24 would overlap /25s handed to other hosts.
        let c = cfg(r#"{"Network":"10.10.0.0/16","SubnetLen":25}"#);
        let leases = [lease("10.10.0.0/24", ME, 7)];
        assert_eq!(misfits(&c, &leases, ME.parse().unwrap()).len(), 1);
        let Ok(Choice::Free(s, None)) = pick(&c, &leases, Some("10.10.0.128/25")) else {
            panic!("expected a free subnet");
        };
        assert_eq!(s.prefix_len(), 25);
        assert!(!s.contains(&net("10.10.0.0/24").network()) && !net("10.10.0.0/24").contains(&s));
        assert_eq!(s, net("10.10.1.0/25"), "the first /25 past the old /24");
    }

    #[test]
    fn a_listing_folds_into_this_hosts_leases_and_every_other_keys_subnet() {
        let prefix = "/coreos.com/network/subnets/";
        let record = |name: &str, value: &str| {
            crate::registry::etcd::decode(
                format!("{prefix}{name}"),
                prefix,
                value.as_bytes(),
                1,
                1,
                7,
            )
        };
        let mut claims = Claims::new(ME.parse().unwrap());
        let mut add = |r: Record| {
            let named = crate::registry::etcd::subnet_of(&r.key, prefix);
            claims.add(r, named)
        };
        add(record("10.10.1.0-24", &format!(r#"{{"PublicIP":"{ME}"}}"#)));
        add(record("10.10.2.0-24", r#"{"PublicIP":"192.0.2.9"}"#));
        add(record("10.10.3.0-24", "not json"));
        add(record("garbage", r#"{"PublicIP":"192.0.2.8"}"#));
        let mine: Vec<Ipv4Net> = claims.mine.iter().map(|l| l.subnet).collect();
        assert_eq!(mine, [net("10.10.1.0/24")]);
        assert_eq!(
            claims.others.ipv4,
            [net("10.10.2.0/24"), net("10.10.3.0/24")],
            "an unreadable value still takes its key's subnet"
        );
        let bad: Vec<&str> = claims.bad.iter().map(|b| b.key.as_str()).collect();
        assert_eq!(
            bad,
            [
                "/coreos.com/network/subnets/10.10.3.0-24",
                "/coreos.com/network/subnets/garbage"
            ]
        );
    }

    #[test]
    fn an_own_lease_outside_min_max_is_not_adopted() {
        let c =
            cfg(r#"{"Network":"10.10.0.0/16","SubnetMin":"10.10.5.0","SubnetMax":"10.10.7.0"}"#);
        let leases = [lease("10.10.9.0/24", ME, 7), lease("10.10.4.0/24", ME, 0)];
        assert_eq!(misfits(&c, &leases, ME.parse().unwrap()).len(), 2);
        assert_eq!(
            pick(&c, &leases, None).unwrap(),
            Choice::Free(net("10.10.5.0/24"), None)
        );
    }

    #[test]
    fn a_planted_reservation_for_the_whole_network_is_neither_adopted_nor_overlapped() {
        let c = cfg(r#"{"Network":"10.244.0.0/16"}"#);
        let planted = [lease("10.244.0.0/16", ME, 0)];
        let e = pick(&c, &planted, Some("10.244.7.0/24")).unwrap_err();
        assert_eq!(e.leased, e.total, "it overlaps every subnet: {e}");
        assert_eq!(e.total, 255);
    }

    #[test]
    fn any_overlapping_lease_counts_as_taken_not_only_an_equal_one() {
        let c = cfg(r#"{"Network":"10.10.0.0/22"}"#);
        // A /25 in the first candidate, and a /23 over the other two.
        let garbage = [
            lease("10.10.1.128/25", OTHER, 3),
            lease("10.10.2.0/23", OTHER, 3),
        ];
        let e = pick(&c, &garbage, Some("10.10.1.0/24")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "no free subnet in 10.10.0.0/22: 3 of 3 leased"
        );
        // A lease wider than the whole network, from outside it.
        let wide = [lease("10.0.0.0/8", OTHER, 3)];
        assert!(pick(&c, &wide, None).is_err());
        // Leases outside the range take nothing.
        let outside = [
            lease("10.10.0.0/24", OTHER, 3),
            lease("10.11.0.0/16", OTHER, 3),
        ];
        assert_eq!(
            pick(&c, &outside, None).unwrap(),
            Choice::Free(net("10.10.1.0/24"), None)
        );
    }

    #[test]
    fn keys_with_unreadable_values_count_as_taken() {
        let c = cfg(r#"{"Network":"10.10.0.0/22"}"#);
        let unreadable = Others {
            ipv4: vec![net("10.10.1.0/24"), net("10.10.2.0/24")],
            ipv6: vec![],
        };
        let hint = Hint {
            subnet: Some(net("10.10.1.0/24")),
            ipv6_subnet: None,
        };
        let pick = choose(&c, &[], &unreadable, me(), hint, |_| 0);
        assert_eq!(pick.unwrap(), Choice::Free(net("10.10.3.0/24"), None));
    }

    #[test]
    fn a_fitting_own_lease_is_kept_beside_an_overlapping_misfit_of_another_host() {
        // The misfit is no valid peer and cannot take this host's lease away from it.
        let c = cfg(r#"{"Network":"10.10.0.0/16"}"#);
        let leases = [
            lease("10.10.0.0/16", OTHER, 0),
            lease("10.10.4.0/24", ME, 7),
        ];
        assert_eq!(
            pick(&c, &leases, None).unwrap(),
            Choice::Ours(leases[1].clone())
        );
    }

    #[test]
    fn the_walk_wraps_around_past_the_end() {
        let c = cfg(r#"{"Network":"10.10.0.0/22"}"#);
        let taken = [
            lease("10.10.3.0/24", OTHER, 3),
            lease("10.10.2.0/24", OTHER, 3),
        ];
        let pick = choose(&c, &taken, &Others::default(), me(), Hint::default(), |n| {
            n - 1
        })
        .unwrap();
        assert_eq!(pick, Choice::Free(net("10.10.1.0/24"), None));
    }

    const DUAL: &str = r#"{"Network":"10.10.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10::/48","Backend":{"Type":"alloc"}}"#;

    fn dual_lease(subnet: &str, subnet6: &str, ip: &str, etcd_lease: i64) -> Lease {
        Lease {
            ipv6_subnet: Some(subnet6.parse().unwrap()),
            ..lease(subnet, ip, etcd_lease)
        }
    }

    fn net6(s: &str) -> Ipv6Net {
        s.parse().unwrap()
    }

    #[test]
    fn a_dual_stack_host_takes_the_ipv6_subnet_at_its_ipv4_subnets_place() {
        let c = cfg(DUAL);
        assert_eq!(
            pick(&c, &[], Some("10.10.42.0/24")).unwrap(),
            Choice::Free(net("10.10.42.0/24"), Some(net6("fd00:10:0:2a::/64"))),
            "10.10.42.0/24 is the 42nd of its range, fd00:10:0:2a::/64 of its own"
        );
        // That one taken: any free one (here the walk from 0).
        let taken = [dual_lease("10.10.9.0/24", "fd00:10:0:2a::/64", OTHER, 3)];
        assert_eq!(
            pick(&c, &taken, Some("10.10.42.0/24")).unwrap(),
            Choice::Free(net("10.10.42.0/24"), Some(net6("fd00:10:0:1::/64")))
        );
        // The previous run's IPv6 subnet comes first when free.
        let hint = Hint {
            subnet: Some(net("10.10.42.0/24")),
            ipv6_subnet: Some(net6("fd00:10:0:77::/64")),
        };
        assert_eq!(
            choose(&c, &[], &Others::default(), me(), hint, |_| 0).unwrap(),
            Choice::Free(net("10.10.42.0/24"), Some(net6("fd00:10:0:77::/64")))
        );
    }

    #[test]
    fn an_own_lease_keeps_its_ipv4_subnet_when_ipv6_is_turned_on_or_off() {
        let c = cfg(DUAL);
        let v4_only = [lease("10.10.3.0/24", ME, 7)];
        assert_eq!(
            pick(&c, &v4_only, None).unwrap(),
            Choice::Rekey(v4_only[0].clone(), Some(net6("fd00:10:0:3::/64")))
        );
        assert!(misfits(&c, &v4_only, me()).is_empty());

        let v4 = cfg(r#"{"Network":"10.10.0.0/16"}"#);
        let dual = [dual_lease("10.10.3.0/24", "fd00:10:0:3::/64", ME, 7)];
        assert_eq!(
            pick(&v4, &dual, None).unwrap(),
            Choice::Rekey(dual[0].clone(), None)
        );
        assert_eq!(
            pick(&c, &dual, None).unwrap(),
            Choice::Ours(dual[0].clone())
        );

        // An IPv6 subnet outside the range is moved too.
        let outside = [dual_lease("10.10.3.0/24", "fd00:99:0:3::/64", ME, 7)];
        assert!(matches!(pick(&c, &outside, None), Ok(Choice::Rekey(..))));
    }

    #[test]
    fn a_reservation_is_never_moved_to_another_key() {
        let c = cfg(DUAL);
        let reserved = [lease("10.10.3.0/24", ME, 0)];
        assert_eq!(
            misfits(&c, &reserved, me()).len(),
            1,
            "said to the operator"
        );
        assert_eq!(
            pick(&c, &reserved, None).unwrap(),
            Choice::Free(net("10.10.1.0/24"), Some(net6("fd00:10:0:1::/64")))
        );
    }

    #[test]
    fn a_full_ipv6_range_says_so() {
        let c = cfg(
            r#"{"Network":"10.10.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10::/62","Backend":{"Type":"alloc"}}"#,
        );
        let taken: Vec<Lease> = (1..=3)
            .map(|i| {
                dual_lease(
                    &format!("10.10.{i}.0/24"),
                    &format!("fd00:10:0:{i}::/64"),
                    OTHER,
                    3,
                )
            })
            .collect();
        assert_eq!(
            pick(&c, &taken, None).unwrap_err().to_string(),
            "no free subnet in fd00:10::/62: 3 of 3 leased"
        );
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// A valid config small enough to check by enumeration: up to 1,023 candidates.
        fn config() -> impl Strategy<Value = NetworkConfig> {
            (any::<u32>(), 8u8..=28)
                .prop_flat_map(|(addr, prefix)| {
                    let lens = (prefix + 2)..=(prefix + 10).min(30);
                    (Just(addr), Just(prefix), lens, any::<u32>(), any::<u32>())
                })
                .prop_filter_map("valid", |(addr, prefix, len, a, b)| {
                    let network = Ipv4Net::new(Ipv4Addr::from(addr), prefix).ok()?.trunc();
                    let step = 1u32 << (32 - len);
                    let count = 1u32 << (len - prefix);
                    let base = u32::from(network.network());
                    let (i, j) = (a % count, b % count);
                    let (min, max) = (base + i.min(j) * step, base + i.max(j) * step);
                    let text = format!(
                        r#"{{"Network":"{network}","SubnetLen":{len},"SubnetMin":"{}","SubnetMax":"{}"}}"#,
                        Ipv4Addr::from(min),
                        Ipv4Addr::from(max)
                    );
                    NetworkConfig::parse(&text).ok()
                })
        }

        /// Any subnet near the network, of any length: garbage included.
        fn near(network: Ipv4Net) -> impl Strategy<Value = Ipv4Net> {
            let base = u32::from(network.network());
            let span = 2u64 << (32 - network.prefix_len());
            (0..span, 0u8..=32).prop_map(move |(off, len)| {
                let addr = base
                    .wrapping_add(off as u32)
                    .wrapping_sub((span / 4) as u32);
                Ipv4Net::new(Ipv4Addr::from(addr), len).map_or(network, |n| n.trunc())
            })
        }

        fn case() -> impl Strategy<
            Value = (
                NetworkConfig,
                Vec<Lease>,
                Vec<Ipv4Net>,
                Option<Ipv4Net>,
                u128,
            ),
        > {
            config().prop_flat_map(|c| {
                let ips = prop::sample::select(vec![ME, OTHER, "192.168.1.7"]);
                let leases = prop::collection::vec((near(c.network), ips, 0i64..3), 0..40)
                    .prop_map(|v| {
                        v.into_iter()
                            .map(|(subnet, ip, id)| Lease {
                                subnet,
                                ..lease("0.0.0.0/32", ip, id)
                            })
                            .collect::<Vec<_>>()
                    });
                let unreadable = prop::collection::vec(near(c.network), 0..5);
                let hint = prop::option::of(near(c.network));
                (Just(c), leases, unreadable, hint, any::<u128>())
            })
        }

        /// IPv6 subnets near fd00:10::/56 of any length, garbage included.
        fn near6() -> impl Strategy<Value = Ipv6Net> {
            (0u128..(1 << 74), 40u8..=128).prop_map(|(off, len)| {
                let base = u128::from("fd00:10::".parse::<std::net::Ipv6Addr>().unwrap());
                Ipv6Net::new((base + off - (1 << 70)).into(), len)
                    .map_or(Ipv6Net::default(), |n| n.trunc())
            })
        }

        proptest! {
            #[test]
            fn never_hands_out_a_taken_ipv6_subnet_or_one_outside_its_range(
                taken in prop::collection::vec((near6(), any::<bool>()), 0..30),
                hint in prop::option::of(near6()),
                len in 58u8..=66,
                seed in any::<u128>(),
            ) {
                let c = cfg(&format!(
                    r#"{{"Network":"10.10.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10::/56","IPv6SubnetLen":{len},"Backend":{{"Type":"alloc"}}}}"#
                ));
                let (as_leases, unreadable): (Vec<_>, Vec<_>) = taken.iter().partition(|(_, l)| *l);
                let leases: Vec<Lease> = as_leases.iter().enumerate()
                    .map(|(i, (n, _))| Lease { ipv6_subnet: Some(*n), ..lease(&format!("10.10.{}.0/24", 100 + i), OTHER, 3) })
                    .collect();
                let others = Others { ipv4: vec![], ipv6: unreadable.iter().map(|(n, _)| *n).collect() };
                let overlaps = |s: Ipv6Net| taken.iter().any(|(t, _)| t.contains(&s.network()) || s.contains(&t.network()));
                let hint = Hint { subnet: None, ipv6_subnet: hint };
                match choose(&c, &leases, &others, me(), hint, |n| seed % n) {
                    Ok(Choice::Free(_, Some(s))) => {
                        prop_assert!(c.allows_v6(Some(s)), "{s} outside the range");
                        prop_assert!(!overlaps(s), "{s} overlaps a lease");
                    }
                    Ok(other) => prop_assert!(false, "{other:?}"),
                    Err(full) => prop_assert_eq!(full.leased, full.total),
                }
            }
        }

        proptest! {
            #[test]
            fn never_hands_out_a_taken_subnet_or_one_outside_min_max(
                (c, leases, unreadable, hint, seed) in case()
            ) {
                let me: Ipv4Addr = ME.parse().unwrap();
                let overlaps = |s: Ipv4Net| {
                    leases.iter().map(|l| l.subnet).chain(unreadable.iter().copied())
                        .any(|t| t.contains(&s.network()) || s.contains(&t.network()))
                };
                let others = Others { ipv4: unreadable.clone(), ipv6: vec![] };
                let hint = Hint { subnet: hint, ipv6_subnet: None };
                match choose(&c, &leases, &others, me, hint, |n| seed % n) {
                    Ok(Choice::Rekey(..)) => prop_assert!(false, "no IPv6 side to rekey for"),
                    Ok(Choice::Free(s, s6)) => {
                        prop_assert_eq!(s6, None);
                        prop_assert!(c.allows(s), "{s} outside the range");
                        prop_assert!(!overlaps(s), "{s} overlaps a lease");
                        prop_assert!(misfits(&c, &leases, me).len()
                            == leases.iter().filter(|l| l.attrs.public_ip == me).count(),
                            "a fitting own lease was passed over");
                    }
                    Ok(Choice::Ours(l)) => {
                        prop_assert!(leases.contains(&l));
                        prop_assert_eq!(l.attrs.public_ip, me);
                        prop_assert!(c.allows(l.subnet), "{} adopted but does not fit", l.subnet);
                    }
                    Err(full) => {
                        prop_assert_eq!(full.total, u128::from(c.subnet_count()));
                        let free = (0..c.subnet_count()).filter(|i| !overlaps(c.nth_subnet(*i))).count();
                        prop_assert_eq!(free, 0, "said full with free subnets");
                        prop_assert_eq!(full.leased, full.total);
                    }
                }
            }
        }
    }
}
