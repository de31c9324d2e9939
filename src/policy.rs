//! Which subnet this host should hold, decided from a listing alone (no I/O), as flannel does:
//! this host's own lease first, then the subnet of the previous run, then a random free one.
//!
//! Own leases and reservations are adopted only when they fit the config (flannel's
//! `isSubnetConfigCompat`): exactly SubnetLen long, inside [SubnetMin, SubnetMax]. A subnet is free
//! only when nothing in etcd overlaps it, whatever its size or owner: leases that no longer fit,
//! reservations, and keys whose value cannot be read all count, so two hosts never route the same
//! addresses.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::config::NetworkConfig;
use crate::lease::{BadLease, Lease, Record};

#[derive(Debug, Clone, PartialEq)]
pub enum Choice {
    /// A lease (or reservation) that already carries this host's PublicIP and fits the config.
    Ours(Lease),
    /// A free subnet to create.
    Free(Ipv4Net),
}

/// Every subnet of the range is taken.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("no free subnet in {network}: {leased} of {total} leased")]
pub struct NetworkFull {
    pub network: Ipv4Net,
    pub leased: u64,
    pub total: u64,
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
        .filter(|l| l.attrs.public_ip == public_ip && !config.allows(l.subnet))
        .collect()
}

/// Picks a subnet. `leases` must include every lease of `public_ip`; `others` are the subnets of
/// every other key (other hosts' leases, keys whose value cannot be read), which may also be
/// given as leases; `hint` is the subnet from the previous subnet.env; `rand` draws an index
/// below its argument.
pub fn choose(
    config: &NetworkConfig,
    leases: &[Lease],
    others: &[Ipv4Net],
    public_ip: Ipv4Addr,
    hint: Option<Ipv4Net>,
    rand: impl FnOnce(u64) -> u64,
) -> Result<Choice, NetworkFull> {
    // Reservations first: they pin a subnet to this host for good.
    let mut ours: Vec<&Lease> = leases
        .iter()
        .filter(|l| l.attrs.public_ip == public_ip && config.allows(l.subnet))
        .collect();
    ours.sort_by_key(|l| !l.is_reservation());
    if let Some(l) = ours.first() {
        return Ok(Choice::Ours((*l).clone()));
    }

    let slots = Slots::new(config);
    let taken = slots.taken(
        leases
            .iter()
            .map(|l| l.subnet)
            .chain(others.iter().copied()),
    );
    if let Some(h) = hint {
        if config.allows(h) && !taken.contains(slots.index(h)) {
            return Ok(Choice::Free(h));
        }
    }

    let full = || NetworkFull {
        network: config.network,
        leased: taken.count(),
        total: slots.total,
    };
    // Start at a random subnet and walk forward past taken runs: cheap even for huge ranges.
    let start = rand(slots.total).min(slots.total - 1);
    taken
        .first_free_from(start, slots.total)
        .map(|i| Choice::Free(config.nth_subnet(i)))
        .ok_or_else(full)
}

/// The candidate subnets of a config, [SubnetMin, SubnetMax], numbered from 0.
struct Slots {
    /// Addresses per subnet.
    step: u64,
    /// The first address of the range.
    first: u64,
    /// The last address of the range (that of SubnetMax's broadcast).
    last: u64,
    total: u64,
}

impl Slots {
    fn new(config: &NetworkConfig) -> Self {
        let step = 1u64 << (32 - config.subnet_len);
        let first = u64::from(u32::from(config.subnet_min));
        let last = u64::from(u32::from(config.subnet_max)) + step - 1;
        Self {
            step,
            first,
            last,
            total: config.subnet_count(),
        }
    }

    /// The number of a subnet the config allows.
    fn index(&self, subnet: Ipv4Net) -> u64 {
        (u64::from(u32::from(subnet.network())) - self.first) / self.step
    }

    /// The candidates that any of `nets` overlaps, whatever its length or alignment.
    fn taken(&self, nets: impl Iterator<Item = Ipv4Net>) -> Taken {
        let mut runs: Vec<(u64, u64)> = nets
            .filter_map(|n| {
                let lo = u64::from(u32::from(n.network())).max(self.first);
                let hi = u64::from(u32::from(n.broadcast())).min(self.last);
                (lo <= hi).then(|| ((lo - self.first) / self.step, (hi - self.first) / self.step))
            })
            .collect();
        runs.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(runs.len());
        for (lo, hi) in runs {
            match merged.last_mut() {
                // Overlapping or adjacent: one run, so a run's end + 1 is always free.
                Some(last) if lo <= last.1 + 1 => last.1 = last.1.max(hi),
                _ => merged.push((lo, hi)),
            }
        }
        Taken(merged)
    }
}

/// Taken candidate numbers: sorted, disjoint, non-adjacent inclusive runs.
struct Taken(Vec<(u64, u64)>);

impl Taken {
    fn run_containing(&self, i: u64) -> Option<(u64, u64)> {
        let after = self.0.partition_point(|(lo, _)| *lo <= i);
        after
            .checked_sub(1)
            .map(|k| self.0[k])
            .filter(|(_, hi)| i <= *hi)
    }

    fn contains(&self, i: u64) -> bool {
        self.run_containing(i).is_some()
    }

    fn count(&self) -> u64 {
        self.0.iter().map(|(lo, hi)| hi - lo + 1).sum()
    }

    /// The first free number at or after `start`, wrapping around once at `total`.
    fn first_free_from(&self, start: u64, total: u64) -> Option<u64> {
        let mut i = start;
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
}

/// What choosing a subnet needs of a listing, folded from it key by key, so that a listing of
/// 10,000 leases is never held whole: this host's leases, every other key's subnet, and the keys
/// that cannot be read.
#[derive(Debug)]
pub struct Claims {
    public_ip: Ipv4Addr,
    /// Leases carrying this host's PublicIP.
    pub mine: Vec<Lease>,
    /// The subnets of every other key whose name is a subnet: other hosts' leases, and keys whose
    /// value cannot be read (they still block creating that key, and may be routed by hosts that
    /// read them differently).
    pub others: Vec<Ipv4Net>,
    pub bad: Vec<BadLease>,
}

impl Claims {
    pub fn new(public_ip: Ipv4Addr) -> Self {
        Self {
            public_ip,
            mine: Vec::new(),
            others: Vec::new(),
            bad: Vec::new(),
        }
    }

    /// Takes in one record; `named` is the subnet its key names, if any (an unreadable record
    /// still blocks creating that key).
    pub fn add(&mut self, record: Record, named: Option<Ipv4Net>) {
        match record.value {
            Ok(l) if l.attrs.public_ip == self.public_ip => self.mine.push(l),
            Ok(l) => self.others.push(l.subnet),
            Err(e) => {
                self.others.extend(named);
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
            attrs: LeaseAttrs {
                public_ip: ip.parse().unwrap(),
                public_ipv6: None,
                backend_type: String::new(),
                backend_data: None,
            },
            hold: crate::registry::etcd::hold(etcd_lease),
            version: 1,
        }
    }

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    const ME: &str = "192.168.1.5";
    const OTHER: &str = "192.168.1.6";

    fn pick(
        c: &NetworkConfig,
        leases: &[Lease],
        hint: Option<&str>,
    ) -> Result<Choice, NetworkFull> {
        choose(c, leases, &[], ME.parse().unwrap(), hint.map(net), |_| 0)
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
            Choice::Free(net("10.10.42.0/24"))
        );
        let taken = [lease("10.10.42.0/24", OTHER, 9)];
        assert_eq!(
            pick(&c, &taken, hint).unwrap(),
            Choice::Free(net("10.10.1.0/24"))
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
        let pick = choose(&c, &taken, &[], ME.parse().unwrap(), None, |n| n - 2).unwrap();
        assert_eq!(pick, Choice::Free(net("10.10.5.0/24")));
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
        let Ok(Choice::Free(s)) = pick(&c, &leases, Some("10.10.0.128/25")) else {
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
            claims.others,
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
            Choice::Free(net("10.10.5.0/24"))
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
            Choice::Free(net("10.10.1.0/24"))
        );
    }

    #[test]
    fn keys_with_unreadable_values_count_as_taken() {
        let c = cfg(r#"{"Network":"10.10.0.0/22"}"#);
        let unreadable = [net("10.10.1.0/24"), net("10.10.2.0/24")];
        let pick = choose(
            &c,
            &[],
            &unreadable,
            ME.parse().unwrap(),
            Some(net("10.10.1.0/24")),
            |_| 0,
        );
        assert_eq!(pick.unwrap(), Choice::Free(net("10.10.3.0/24")));
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
        let pick = choose(&c, &taken, &[], ME.parse().unwrap(), None, |n| n - 1).unwrap();
        assert_eq!(pick, Choice::Free(net("10.10.1.0/24")));
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
                u64,
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
                (Just(c), leases, unreadable, hint, any::<u64>())
            })
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
                match choose(&c, &leases, &unreadable, me, hint, |n| seed % n) {
                    Ok(Choice::Free(s)) => {
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
                        prop_assert_eq!(full.total, c.subnet_count());
                        let free = (0..c.subnet_count()).filter(|i| !overlaps(c.nth_subnet(*i))).count();
                        prop_assert_eq!(free, 0, "said full with free subnets");
                        prop_assert_eq!(full.leased, full.total);
                    }
                }
            }
        }
    }
}
