//! Leases as flannel stores them: key `<prefix>/subnets/10.244.52.0-24`, value
//! `{"PublicIP":"…","PublicIPv6":null,"BackendType":"…","BackendData":{…}}`.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The JSON value of a lease key. Field order and omissions are flannel's (v0.28), so that
/// flanneld nodes read what weft writes and the other way round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaseAttrs {
    #[serde(rename = "PublicIP")]
    pub public_ip: Ipv4Addr,
    #[serde(rename = "PublicIPv6", default)]
    pub public_ipv6: Option<String>,
    #[serde(
        rename = "BackendType",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub backend_type: String,
    #[serde(
        rename = "BackendData",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub backend_data: Option<Value>,
}

impl LeaseAttrs {
    pub fn to_json(&self) -> String {
        // Serializing plain strings and JSON values cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Parses a lease value, case-insensitively like flannel's decoder.
    pub fn parse(text: &[u8]) -> Result<Self, String> {
        let v: Value = serde_json::from_slice(text).map_err(|e| format!("not valid JSON: {e}"))?;
        let Value::Object(obj) = v else {
            return Err("not a JSON object".into());
        };
        let get = |key: &str| {
            obj.iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(key))
                .map(|(_, v)| v)
                .filter(|v| !v.is_null())
        };
        let public_ip = match get("PublicIP") {
            Some(Value::String(s)) => s
                .parse()
                .map_err(|_| format!("PublicIP {s:?} is not an IPv4 address"))?,
            Some(v) => return Err(format!("PublicIP: expected a string, found {v}")),
            None => return Err("PublicIP is missing".into()),
        };
        let backend_type = match get("BackendType") {
            Some(Value::String(s)) => s.clone(),
            Some(v) => return Err(format!("BackendType: expected a string, found {v}")),
            None => String::new(),
        };
        Ok(Self {
            public_ip,
            public_ipv6: get("PublicIPv6").and_then(Value::as_str).map(str::to_owned),
            backend_type,
            backend_data: get("BackendData").cloned(),
        })
    }
}

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

/// Why a key under `subnets/` holds no usable lease.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unreadable {
    /// The key's name is not a subnet in flannel's one spelling (see [`parse_subnet_key`]).
    #[error("key {0:?} is not a subnet like 10.244.52.0-24")]
    Key(String),
    /// The value is not a lease (see [`LeaseAttrs::parse`]).
    #[error("{0}")]
    Value(String),
    /// The key and its value are larger than weft receives from etcd (no lease is).
    #[error("larger than the {} MiB weft reads: not read", .0 >> 20)]
    TooLarge(usize),
}

/// One key under `<prefix>/subnets/` as etcd stores it, readable or not.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// The whole etcd key.
    pub key: String,
    /// The revision at which the key was created: a lease's age. A put keeps it; a delete and a
    /// new put start a new one.
    pub create_revision: i64,
    pub value: Result<Lease, Unreadable>,
}

impl Record {
    /// Reads the etcd key `key` (under `subnets_prefix`) and its value as a lease, keeping what
    /// cannot be read with the reason.
    pub fn read(
        key: String,
        subnets_prefix: &str,
        value: &[u8],
        create_revision: i64,
        mod_revision: i64,
        etcd_lease: i64,
    ) -> Self {
        let name = key.strip_prefix(subnets_prefix).unwrap_or(&key);
        let value = match parse_subnet_key(name) {
            None => Err(Unreadable::Key(name.to_string())),
            Some(subnet) => LeaseAttrs::parse(value)
                .map(|attrs| Lease {
                    subnet,
                    attrs,
                    etcd_lease,
                    mod_revision,
                })
                .map_err(Unreadable::Value),
        };
        Self {
            key,
            create_revision,
            value,
        }
    }

    /// A key whose value could not be received at all, being over `limit` bytes.
    pub fn too_large(key: String, limit: usize) -> Self {
        Self {
            key,
            create_revision: 0,
            value: Err(Unreadable::TooLarge(limit)),
        }
    }
}

/// A lease read from etcd.
#[derive(Debug, Clone, PartialEq)]
pub struct Lease {
    pub subnet: Ipv4Net,
    pub attrs: LeaseAttrs,
    /// The etcd lease the key is attached to; 0 for a reservation, which never expires.
    pub etcd_lease: i64,
    pub mod_revision: i64,
}

impl Lease {
    pub fn is_reservation(&self) -> bool {
        self.etcd_lease == 0
    }

    /// What the data plane needs of it.
    pub fn to_backend(&self) -> weft_backends::Lease {
        weft_backends::Lease {
            subnet: self.subnet,
            public_ip: self.attrs.public_ip,
            backend_type: self.attrs.backend_type.clone(),
            backend_data: self.attrs.backend_data.as_ref().map(Into::into),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_is_byte_for_byte_flannels() {
        let a = LeaseAttrs {
            public_ip: "192.168.64.3".parse().unwrap(),
            public_ipv6: None,
            backend_type: "vxlan".into(),
            backend_data: Some(serde_json::json!({"VNI":1,"VtepMAC":"c6:2b:1e:55:0d:7a"})),
        };
        assert_eq!(
            a.to_json(),
            r#"{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:2b:1e:55:0d:7a"}}"#
        );
        assert_eq!(LeaseAttrs::parse(a.to_json().as_bytes()).unwrap(), a);

        let bare = LeaseAttrs {
            public_ip: "10.0.0.1".parse().unwrap(),
            public_ipv6: None,
            backend_type: String::new(),
            backend_data: None,
        };
        assert_eq!(
            bare.to_json(),
            r#"{"PublicIP":"10.0.0.1","PublicIPv6":null}"#
        );
    }

    #[test]
    fn parse_accepts_flannel_variants_and_rejects_garbage() {
        assert_eq!(
            LeaseAttrs::parse(br#"{"publicip":"10.0.0.1","backendtype":"udp"}"#)
                .unwrap()
                .backend_type,
            "udp"
        );
        for bad in [
            &b"nope"[..],
            b"[]",
            b"{}",
            br#"{"PublicIP":"300.1.1.1"}"#,
            br#"{"PublicIP":7}"#,
        ] {
            assert!(LeaseAttrs::parse(bad).is_err());
        }
    }

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

            /// Any bytes as a lease value: an error or a lease, never a panic; a lease written
            /// back parses to the same attributes.
            #[test]
            fn any_value_parses_or_is_refused(text in prop::collection::vec(any::<u8>(), 0..200)) {
                if let Ok(a) = LeaseAttrs::parse(&text) {
                    prop_assert_eq!(LeaseAttrs::parse(a.to_json().as_bytes()), Ok(a));
                }
            }

            /// JSON-shaped values with the lease's fields in any types.
            #[test]
            fn lease_shaped_json_parses_or_is_refused(
                ip in prop_oneof![Just("\"10.0.0.1\"".to_string()), "\"[0-9.]{0,16}\"", Just("7".to_string()), Just("null".to_string())],
                ty in prop_oneof![Just("\"vxlan\"".to_string()), Just("1".to_string()), Just("[]".to_string())],
                data in prop_oneof![Just("{\"VtepMAC\":\"aa:bb:cc:dd:ee:ff\"}".to_string()), Just("null".to_string()), "\"[a-z:]{0,20}\""],
            ) {
                let text = format!("{{\"PublicIP\":{ip},\"BackendType\":{ty},\"BackendData\":{data}}}");
                if let Ok(a) = LeaseAttrs::parse(text.as_bytes()) {
                    prop_assert_eq!(LeaseAttrs::parse(a.to_json().as_bytes()), Ok(a));
                }
            }
        }
    }
}
