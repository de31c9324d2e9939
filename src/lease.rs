//! Leases as weft works with them, whatever store holds them (see `registry`): a subnet, the
//! attributes its host published (flannel's lease JSON,
//! `{"PublicIP":"…","PublicIPv6":null,"BackendType":"…","BackendData":{…}}`), and how it is held.
//!
//! One lease, in the shapes it takes along the data flow: a [`Record`] as the store holds it
//! (key, rank, and a [`Lease`] or why there is none); the [`Lease`] (subnet, [`LeaseAttrs`],
//! [`Hold`]); in the peer set, a compact copy of it (`peers::compact`); and what the data plane
//! is given, `weft_backends::Lease` (subnet, PublicIP, backend type and data).

use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The JSON value of a lease key. Field order and omissions are flannel's (v0.28), so that
/// flanneld nodes read what weft writes and the other way round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaseAttrs {
    #[serde(rename = "PublicIP")]
    pub public_ip: Ipv4Addr,
    /// Where the host's IPv6 subnet is reached (flannel writes `null` when it has none: no
    /// omitempty).
    #[serde(rename = "PublicIPv6", default)]
    pub public_ipv6: Option<Ipv6Addr>,
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
    /// The backend's data for the IPv6 side (vxlan: the IPv6 device's VtepMAC).
    #[serde(
        rename = "BackendV6Data",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub backend_v6_data: Option<Value>,
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
        let public_ipv6 = match get("PublicIPv6") {
            Some(Value::String(s)) => Some(
                s.parse()
                    .map_err(|_| format!("PublicIPv6 {s:?} is not an IPv6 address"))?,
            ),
            Some(v) => return Err(format!("PublicIPv6: expected a string, found {v}")),
            None => None,
        };
        Ok(Self {
            public_ip,
            public_ipv6,
            backend_type,
            backend_data: get("BackendData").cloned(),
            backend_v6_data: get("BackendV6Data").cloned(),
        })
    }
}

/// Why a record of the store holds no usable lease.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unreadable {
    /// The key's name is not a subnet in flannel's one spelling (see
    /// `registry::etcd::parse_subnet_key`).
    #[error("key {0:?} is not a subnet like 10.244.52.0-24")]
    Key(String),
    /// The value is not a lease (see [`LeaseAttrs::parse`]).
    #[error("{0}")]
    Value(String),
    /// The key and its value are larger than weft receives from the store (no lease is).
    #[error("larger than the {} MiB weft reads: not read", .0 >> 20)]
    TooLarge(usize),
}

/// A record that holds no usable lease, with the reason as text: what allocation and weftctl
/// report.
#[derive(Debug, Clone, PartialEq)]
pub struct BadLease {
    pub key: String,
    pub reason: String,
}

/// One lease record of the store (an etcd key under `<prefix>/subnets/`), readable or not.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// The record's name in the store (the whole etcd key): a peer's identity.
    pub key: String,
    /// The lease's age: of two leases contending for one subnet or one VTEP MAC, the lower rank
    /// is the older and wins (etcd: the key's create revision; a put keeps it, a delete and a new
    /// put start a new one).
    pub rank: i64,
    pub value: Result<Lease, Unreadable>,
}

impl Record {
    /// A record whose value could not be received at all, being over `limit` bytes.
    pub fn too_large(key: String, limit: usize) -> Self {
        Self {
            key,
            rank: 0,
            value: Err(Unreadable::TooLarge(limit)),
        }
    }
}

/// One change of a lease record, as a watch reports it.
#[derive(Debug, Clone, PartialEq)]
// Transient, one per event and moved along: boxing would cost an allocation each.
#[allow(clippy::large_enum_variant)]
pub enum Change {
    Put(Record),
    Delete(String),
}

impl Change {
    /// The record's key.
    pub fn key(&self) -> &str {
        match self {
            Self::Put(r) => &r.key,
            Self::Delete(k) => k,
        }
    }
}

/// How a lease is held: whether it expires, and so whether it is renewed and given back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Hold {
    /// Until it expires unless renewed; the store's handle to renew or release it (an etcd
    /// lease ID, never 0). Non-zero, so a hold takes 8 bytes: the peer set keeps 10,000.
    Expiring(std::num::NonZeroI64),
    /// For good: an operator's reservation, never renewed, never released by weft.
    Reserved,
}

/// A lease as the store holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct Lease {
    pub subnet: Ipv4Net,
    /// The IPv6 subnet of a dual-stack lease (etcd: the key's `&fd00:10:0:5::-64` part).
    pub ipv6_subnet: Option<Ipv6Net>,
    pub attrs: LeaseAttrs,
    pub hold: Hold,
    /// The store's version of the record (etcd: its mod revision): a change made only if the
    /// record is still this one compares it.
    pub version: i64,
}

impl Lease {
    pub fn is_reservation(&self) -> bool {
        self.hold == Hold::Reserved
    }

    /// The identity its backend publishes in BackendData (vxlan: the VTEP MAC), which no other
    /// lease may use; `None` when its backend has none or the BackendData holds no usable one.
    pub fn identity(&self) -> Option<weft_backends::Identity> {
        let kind = weft_backends::kind(&self.attrs.backend_type)?;
        (kind.identity)(self.attrs.backend_data.as_ref()).ok()?
    }

    /// The identity of its IPv6 side, in BackendV6Data (vxlan: the IPv6 device's VTEP MAC).
    pub fn identity6(&self) -> Option<weft_backends::Identity> {
        let kind = weft_backends::kind(&self.attrs.backend_type)?;
        (kind.identity)(self.attrs.backend_v6_data.as_ref()?.into()).ok()?
    }

    /// What the data plane needs of it.
    pub fn to_backend(&self) -> weft_backends::Lease {
        weft_backends::Lease {
            subnet: self.subnet,
            public_ip: self.attrs.public_ip,
            backend_type: self.attrs.backend_type.clone(),
            backend_data: self.attrs.backend_data.as_ref().map(Into::into),
            ipv6: self.ipv6_subnet.map(|subnet| weft_backends::LeaseV6 {
                subnet,
                public_ip: self.attrs.public_ipv6,
                backend_data: self.attrs.backend_v6_data.as_ref().map(Into::into),
            }),
        }
    }
}

/// When to renew: `margin` minutes before expiry as flannel does, or at a third of the TTL when
/// the margin does not fit inside it. Saturating: any margin and TTL give an interval.
pub fn renew_interval(ttl: Duration, margin_minutes: u64) -> Duration {
    let margin = Duration::from_secs(margin_minutes.saturating_mul(60));
    match ttl.checked_sub(margin) {
        Some(left) if !left.is_zero() => left,
        _ => ttl / 3,
    }
}

/// `86399` → `23h59m59s`, Go's duration style.
pub fn format_secs(secs: i64) -> String {
    let (h, m, s) = (secs / 3600, secs % 3600 / 60, secs % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m{s}s"),
        _ => format!("{h}h{m}m{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_happens_margin_before_expiry_or_at_a_third() {
        assert_eq!(
            renew_interval(Duration::from_secs(86400), 60),
            Duration::from_secs(82800)
        );
        assert_eq!(
            renew_interval(Duration::from_secs(6), 60),
            Duration::from_secs(2)
        );
        assert_eq!(
            renew_interval(Duration::from_secs(3600), 60),
            Duration::from_secs(1200),
            "a margin as long as the TTL does not fit"
        );
    }

    #[test]
    fn renewal_never_overflows_whatever_the_margin() {
        let ttl = Duration::from_secs(9_000_000_000);
        assert_eq!(renew_interval(ttl, u64::MAX), ttl / 3);
        assert_eq!(renew_interval(ttl, u64::MAX / 60 + 1), ttl / 3);
        assert_eq!(renew_interval(Duration::MAX, 0), Duration::MAX);
        assert_eq!(renew_interval(Duration::ZERO, 5), Duration::ZERO);
    }

    #[test]
    fn durations_print_like_go() {
        assert_eq!(format_secs(86399), "23h59m59s");
        assert_eq!(format_secs(61), "1m1s");
        assert_eq!(format_secs(5), "5s");
    }

    #[test]
    fn json_is_byte_for_byte_flannels() {
        let a = LeaseAttrs {
            public_ip: "192.168.64.3".parse().unwrap(),
            public_ipv6: None,
            backend_type: "vxlan".into(),
            backend_data: Some(serde_json::json!({"VNI":1,"VtepMAC":"c6:2b:1e:55:0d:7a"})),
            backend_v6_data: None,
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
            backend_v6_data: None,
        };
        assert_eq!(
            bare.to_json(),
            r#"{"PublicIP":"10.0.0.1","PublicIPv6":null}"#
        );
    }

    #[test]
    fn a_dual_stack_lease_is_byte_for_byte_flannels() {
        let text = r#"{"PublicIP":"192.168.64.3","PublicIPv6":"fd00:64::3","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:2b:1e:55:0d:7a"},"BackendV6Data":{"VNI":1,"VtepMAC":"c6:2b:1e:55:0d:7b"}}"#;
        let a = LeaseAttrs::parse(text.as_bytes()).unwrap();
        assert_eq!(a.public_ipv6, Some("fd00:64::3".parse().unwrap()));
        assert_eq!(
            a.backend_v6_data,
            Some(serde_json::json!({"VNI":1,"VtepMAC":"c6:2b:1e:55:0d:7b"}))
        );
        assert_eq!(a.to_json(), text);
        for bad in [
            &br#"{"PublicIP":"10.0.0.1","PublicIPv6":"10.0.0.2"}"#[..],
            br#"{"PublicIP":"10.0.0.1","PublicIPv6":"fd00::1/64"}"#,
            br#"{"PublicIP":"10.0.0.1","PublicIPv6":6}"#,
        ] {
            let e = LeaseAttrs::parse(bad).expect_err("not an IPv6 address");
            assert!(e.contains("PublicIPv6"), "{e}");
        }
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

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
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
                ip6 in prop_oneof![Just("\"fd00::1\"".to_string()), "\"[0-9a-f:.]{0,16}\"", Just("null".to_string()), Just("[]".to_string())],
            ) {
                let text = format!("{{\"PublicIP\":{ip},\"PublicIPv6\":{ip6},\"BackendType\":{ty},\"BackendData\":{data},\"BackendV6Data\":{data}}}");
                if let Ok(a) = LeaseAttrs::parse(text.as_bytes()) {
                    prop_assert_eq!(LeaseAttrs::parse(a.to_json().as_bytes()), Ok(a));
                }
            }
        }
    }
}
