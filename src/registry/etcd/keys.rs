//! flannel's etcd layout of leases: key `<prefix>/subnets/10.244.52.0-24` (dual-stack:
//! `10.244.52.0-24&fd00:10:244:34::-64`), value the lease JSON.

use ipnet::{Ipv4Net, Ipv6Net};

use crate::lease::{Hold, Lease, LeaseAttrs, Record, Unreadable};

/// The key name of a lease's subnets under `<prefix>/subnets/`: `10.244.52.0-24`, or
/// `10.244.52.0-24&fd00:10:244:34::-64` with an IPv6 subnet (flannel's `MakeSubnetKey`: the
/// address as Go prints it, which is RFC 5952's form, as Rust's is).
pub fn subnet_key(subnet: Ipv4Net, ipv6: Option<Ipv6Net>) -> String {
    let v4 = format!("{}-{}", subnet.addr(), subnet.prefix_len());
    match ipv6 {
        None => v4,
        Some(n) => format!("{v4}&{}-{}", n.addr(), n.prefix_len()),
    }
}

/// What a key names: the IPv4 subnet and, for a dual-stack lease, the IPv6 one.
pub type KeySubnets = (Ipv4Net, Option<Ipv6Net>);

/// Parses a key name exactly as [`subnet_key`] (and flannel) writes it: `10.244.52.0-24`, or
/// `10.244.52.0-24&fd00:10:244:34::-64`.
///
/// Anything else is refused, so that one lease has one key: another suffix (`-24&x`), a padded
/// or signed length (`-024`, `-+24`), leading zeros in the address, an IPv6 address not in its
/// canonical text (`fd00:0::`, upper case), or an address that is not the network's
/// (`10.1.2.3-24`). Other spellings would let a second key alias a real peer's subnet and
/// repoint or remove it.
pub fn parse_subnet_key(name: &str) -> Option<KeySubnets> {
    let (v4, v6) = match name.split_once('&') {
        Some((v4, v6)) => (v4, Some(v6)),
        None => (name, None),
    };
    let (addr, len) = v4.split_once('-')?;
    let net = Ipv4Net::new(addr.parse().ok()?, len.parse().ok()?).ok()?;
    let net6 = match v6 {
        None => None,
        Some(v6) => {
            let (addr, len) = v6.rsplit_once('-')?;
            let n = Ipv6Net::new(addr.parse().ok()?, len.parse().ok()?).ok()?;
            // Go prints IPv4-mapped addresses dotted (`10.0.0.0`): flannel never writes these.
            (n.trunc() == n && n.addr().to_ipv4_mapped().is_none()).then_some(n)?;
            Some(n)
        }
    };
    // Parsing is lenient about some spellings; only the one flannel writes round-trips.
    (net.trunc() == net && subnet_key(net, net6) == name).then_some((net, net6))
}

/// What a key under `subnets_prefix` names, if it names a lease in flannel's spelling.
pub fn subnet_of(key: &str, subnets_prefix: &str) -> Option<KeySubnets> {
    parse_subnet_key(key.strip_prefix(subnets_prefix)?)
}

/// Reads the etcd key `key` (under `subnets_prefix`) and its value as a lease, keeping what
/// cannot be read with the reason. `etcd_lease` 0 is a key without an etcd lease: a
/// reservation.
pub fn decode(
    key: String,
    subnets_prefix: &str,
    value: &[u8],
    create_revision: i64,
    mod_revision: i64,
    etcd_lease: i64,
) -> Record {
    let name = key.strip_prefix(subnets_prefix).unwrap_or(&key);
    let value = match parse_subnet_key(name) {
        None => Err(Unreadable::Key(name.to_string())),
        Some((subnet, ipv6_subnet)) => LeaseAttrs::parse(value)
            .map(|attrs| Lease {
                subnet,
                ipv6_subnet,
                attrs,
                hold: hold(etcd_lease),
                version: mod_revision,
            })
            .map_err(Unreadable::Value),
    };
    Record {
        key,
        rank: create_revision,
        value,
    }
}

/// How a key with this etcd lease ID is held: none (0) is a reservation.
pub fn hold(etcd_lease: i64) -> Hold {
    std::num::NonZeroI64::new(etcd_lease).map_or(Hold::Reserved, Hold::Expiring)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnet_keys_round_trip() {
        let n: Ipv4Net = "10.244.52.0/24".parse().unwrap();
        assert_eq!(subnet_key(n, None), "10.244.52.0-24");
        assert_eq!(parse_subnet_key("10.244.52.0-24"), Some((n, None)));
        assert_eq!(
            parse_subnet_key("0.0.0.0-0"),
            Some(("0.0.0.0/0".parse().unwrap(), None))
        );
        for bad in [
            "10.244.52.1-24",
            "garbage",
            "10.244.52.0-33",
            "10.244.52.0",
            "-24",
            "",
        ] {
            assert_eq!(parse_subnet_key(bad), None, "{bad}");
        }
    }

    #[test]
    fn dual_stack_keys_round_trip_in_flannels_spelling() {
        let n: Ipv4Net = "10.5.72.0/24".parse().unwrap();
        let n6: Ipv6Net = "fc00::/64".parse().unwrap();
        assert_eq!(subnet_key(n, Some(n6)), "10.5.72.0-24&fc00::-64");
        assert_eq!(
            parse_subnet_key("10.5.72.0-24&fc00::-64"),
            Some((n, Some(n6)))
        );
        let n6: Ipv6Net = "fd99:0:0:12::/64".parse().unwrap();
        assert_eq!(subnet_key(n, Some(n6)), "10.5.72.0-24&fd99:0:0:12::-64");
        for alias in [
            "10.5.72.0-24&",
            "10.5.72.0-24&fc00::",
            "10.5.72.0-24&fc00::-64&fc00::-64",
            "10.5.72.0-24&fc00:0::-64",
            "10.5.72.0-24&FC00::-64",
            "10.5.72.0-24&fc00::1-64",
            "10.5.72.0-24&fc00::-064",
            "10.5.72.0-24&fc00::-129",
            "10.5.72.0-24&fc00::/64",
            "10.5.72.0-24&10.0.0.0-8",
            "10.5.72.0-24&::ffff:10.0.0.0-104",
            "fc00::-64",
            "&fc00::-64",
        ] {
            assert_eq!(parse_subnet_key(alias), None, "{alias:?}");
        }
    }

    #[test]
    fn only_flannels_spelling_of_a_subnet_key_is_accepted_so_no_key_aliases_another() {
        for alias in [
            "10.244.52.0-24&x",
            "10.244.52.0-024",
            "10.244.52.0-+24",
            "10.244.52.0-24 ",
            " 10.244.52.0-24",
            "10.244.052.0-24",
            "010.244.52.0-24",
            "10.244.52.0-24-24",
            "10.244.52.0--24",
            "10.244.52.3-24",
            "10.244.52.0-24\0",
            "10.244.52.0-24/",
        ] {
            assert_eq!(parse_subnet_key(alias), None, "{alias:?}");
        }
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Any key name: no panic, and what is accepted is exactly flannel's spelling of a
            /// network, so no two names map to one subnet.
            #[test]
            fn a_key_is_accepted_only_in_the_one_spelling(name in "[0-9.+&a-fA-F: -]{0,40}") {
                if let Some((net, net6)) = parse_subnet_key(&name) {
                    prop_assert_eq!(subnet_key(net, net6), name);
                    prop_assert_eq!(net.trunc(), net);
                    prop_assert_eq!(net6.map(|n| n.trunc()), net6);
                }
            }

            /// Dual-stack-shaped names: the same.
            #[test]
            fn a_dual_stack_key_is_accepted_only_in_the_one_spelling(
                v4 in prop_oneof![Just("10.5.72.0-24".to_string()), "[0-9.]{7,15}-[0-9]{1,3}"],
                v6 in "[0-9a-fA-F:]{2,20}-[0-9+]{1,4}",
            ) {
                let name = format!("{v4}&{v6}");
                if let Some((net, net6)) = parse_subnet_key(&name) {
                    prop_assert_eq!(subnet_key(net, net6), name);
                }
            }

            /// Every subnet's own key reads back as that subnet.
            #[test]
            fn every_subnet_key_round_trips(addr in any::<u32>(), len in 0u8..=32) {
                let net = Ipv4Net::new(addr.into(), len).expect("len <= 32").trunc();
                prop_assert_eq!(parse_subnet_key(&subnet_key(net, None)), Some((net, None)));
            }

            /// And every dual-stack lease's.
            #[test]
            fn every_dual_stack_key_round_trips(addr in any::<u32>(), addr6 in any::<u128>(), len6 in 0u8..=128) {
                let net = Ipv4Net::new(addr.into(), 24).expect("24 <= 32").trunc();
                let net6 = Ipv6Net::new(addr6.into(), len6).expect("len6 <= 128").trunc();
                // IPv4-mapped space prints as flannel never writes it (Go prints it dotted).
                prop_assume!(!"::ffff:0:0/96".parse::<Ipv6Net>().unwrap().contains(&net6.network()));
                prop_assert_eq!(parse_subnet_key(&subnet_key(net, Some(net6))), Some((net, Some(net6))));
            }
        }
    }
}
