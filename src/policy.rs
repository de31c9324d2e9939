//! Which subnet this host should hold, decided from a listing alone (no I/O), as flannel does:
//! this host's own lease first, then the subnet of the previous run, then a random free one.

use std::collections::HashSet;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::config::NetworkConfig;
use crate::lease::Lease;

#[derive(Debug, Clone, PartialEq)]
pub enum Choice {
    /// A lease (or reservation) that already carries this host's PublicIP.
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

/// Picks a subnet. `hint` is the subnet from the previous subnet.env; `rand` draws an index below
/// its argument.
pub fn choose(
    config: &NetworkConfig,
    leases: &[Lease],
    public_ip: Ipv4Addr,
    hint: Option<Ipv4Net>,
    rand: impl FnOnce(u64) -> u64,
) -> Result<Choice, NetworkFull> {
    // Reservations first: they pin a subnet to this host for good.
    let mut ours: Vec<&Lease> = leases
        .iter()
        .filter(|l| l.attrs.public_ip == public_ip && config.network.contains(&l.subnet))
        .collect();
    ours.sort_by_key(|l| !l.is_reservation());
    if let Some(l) = ours.first() {
        return Ok(Choice::Ours((*l).clone()));
    }

    let taken: HashSet<Ipv4Net> = leases.iter().map(|l| l.subnet).collect();
    if let Some(h) = hint {
        if config.allows(h) && !taken.contains(&h) {
            return Ok(Choice::Free(h));
        }
    }

    let total = config.subnet_count();
    let leased = taken.iter().filter(|s| config.allows(**s)).count() as u64;
    let full = || NetworkFull {
        network: config.network,
        leased,
        total,
    };
    if leased >= total {
        return Err(full());
    }
    // Start at a random subnet and walk forward: cheap even for huge ranges with few leases.
    let start = rand(total);
    (0..total)
        .map(|i| config.nth_subnet((start + i) % total))
        .find(|s| !taken.contains(s))
        .map(Choice::Free)
        .ok_or_else(full)
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
            etcd_lease,
            mod_revision: 1,
        }
    }

    const ME: &str = "192.168.1.5";

    #[test]
    fn own_lease_wins_and_a_reservation_beats_a_lease() {
        let c = cfg(r#"{"Network":"10.10.0.0/16"}"#);
        let leases = [lease("10.10.3.0/24", ME, 7), lease("10.10.9.0/24", ME, 0)];
        let pick = choose(&c, &leases, ME.parse().unwrap(), None, |_| 0).unwrap();
        assert_eq!(pick, Choice::Ours(leases[1].clone()));
    }

    #[test]
    fn previous_subnet_is_reused_when_free() {
        let c = cfg(r#"{"Network":"10.10.0.0/16"}"#);
        let hint = Some("10.10.42.0/24".parse().unwrap());
        let pick = choose(&c, &[], ME.parse().unwrap(), hint, |_| 0).unwrap();
        assert_eq!(pick, Choice::Free("10.10.42.0/24".parse().unwrap()));
        let taken = [lease("10.10.42.0/24", "192.168.1.6", 9)];
        let pick = choose(&c, &taken, ME.parse().unwrap(), hint, |_| 0).unwrap();
        assert_eq!(pick, Choice::Free("10.10.1.0/24".parse().unwrap()));
    }

    #[test]
    fn random_start_skips_taken_subnets_within_min_max() {
        let c =
            cfg(r#"{"Network":"10.10.0.0/16","SubnetMin":"10.10.5.0","SubnetMax":"10.10.7.0"}"#);
        let taken = [
            lease("10.10.6.0/24", "192.168.1.6", 9),
            lease("10.10.7.0/24", "192.168.1.7", 9),
        ];
        let pick = choose(&c, &taken, ME.parse().unwrap(), None, |n| n - 2).unwrap();
        assert_eq!(pick, Choice::Free("10.10.5.0/24".parse().unwrap()));
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
        let e = choose(&c, &taken, ME.parse().unwrap(), None, |_| 0).unwrap_err();
        assert_eq!(
            e.to_string(),
            "no free subnet in 10.10.0.0/22: 3 of 3 leased"
        );
    }
}
