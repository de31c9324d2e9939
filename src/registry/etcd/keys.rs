//! flannel's etcd layout of leases: key `<prefix>/subnets/10.244.52.0-24`, value the lease JSON.

use ipnet::Ipv4Net;

use crate::lease::{Hold, Lease, LeaseAttrs, Record, Unreadable};

/// The key name of a subnet under `<prefix>/subnets/`: `10.244.52.0-24`.
pub fn subnet_key(subnet: Ipv4Net) -> String {
    format!("{}-{}", subnet.addr(), subnet.prefix_len())
}

/// Parses a key name exactly as [`subnet_key`] (and flannel) writes it: `10.244.52.0-24`.
///
/// Anything else is refused, so that one subnet has one key: a suffix (`-24&x`, also flannel's
/// dual-stack `&fc00::-64`, which weft does not lease), a padded or signed length (`-024`, `-+24`),
/// leading zeros in the address, or an address that is not the network's (`10.1.2.3-24`). Other
/// spellings would let a second key alias a real peer's subnet and repoint or remove it.
pub fn parse_subnet_key(name: &str) -> Option<Ipv4Net> {
    let (addr, len) = name.split_once('-')?;
    let net = Ipv4Net::new(addr.parse().ok()?, len.parse().ok()?).ok()?;
    // Parsing is lenient about some spellings; only the one flannel writes round-trips.
    (net.trunc() == net && subnet_key(net) == name).then_some(net)
}

/// The subnet a key under `subnets_prefix` names, if it names one in flannel's spelling.
pub fn subnet_of(key: &str, subnets_prefix: &str) -> Option<Ipv4Net> {
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
        Some(subnet) => LeaseAttrs::parse(value)
            .map(|attrs| Lease {
                subnet,
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
        assert_eq!(subnet_key(n), "10.244.52.0-24");
        assert_eq!(parse_subnet_key("10.244.52.0-24"), Some(n));
        assert_eq!(
            parse_subnet_key("0.0.0.0-0"),
            Some("0.0.0.0/0".parse().unwrap())
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
    fn only_flannels_spelling_of_a_subnet_key_is_accepted_so_no_key_aliases_another() {
        for alias in [
            "10.244.52.0-24&x",
            "10.244.52.0-24&fc00::-64",
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
            fn a_key_is_accepted_only_in_the_one_spelling(name in "[0-9.+&a-f: -]{0,24}") {
                if let Some(net) = parse_subnet_key(&name) {
                    prop_assert_eq!(subnet_key(net), name);
                    prop_assert_eq!(net.trunc(), net);
                }
            }

            /// Every subnet's own key reads back as that subnet.
            #[test]
            fn every_subnet_key_round_trips(addr in any::<u32>(), len in 0u8..=32) {
                let net = Ipv4Net::new(addr.into(), len).expect("len <= 32").trunc();
                prop_assert_eq!(parse_subnet_key(&subnet_key(net)), Some(net));
            }
        }
    }
}
