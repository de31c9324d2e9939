//! A lease as the peer set keeps it: compact, for 10,000 of them held for weftd's life.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};
use weft_backends::{BackendData, LeaseV6, KINDS};

use super::Peer;
use crate::lease::{Hold, Lease, LeaseAttrs};

/// A lease as the set keeps it: the facts of [`Lease`] in a fifth of the bytes. BackendData is
/// kept as its JSON text (a parsed JSON map costs ~400 bytes) and parsed again when the lease is
/// asked for, which is when a peer changes or the kernel is compared in full.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Compact {
    pub(super) subnet: Ipv4Net,
    pub(super) public_ip: Ipv4Addr,
    /// The BackendType as an index into [`KNOWN_TYPES`], or [`OTHER_TYPE`] (the name is then in
    /// `extra`).
    pub(super) kind: u8,
    pub(super) backend_data: Option<Box<str>>,
    /// What leases rarely have, out of line.
    pub(super) extra: Option<Box<Extra>>,
    pub(super) hold: Hold,
    pub(super) version: i64,
}

/// What leases rarely have (every lease, on a dual-stack network: one allocation each there).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Extra {
    pub(super) ipv6_subnet: Option<Ipv6Net>,
    pub(super) public_ipv6: Option<Ipv6Addr>,
    pub(super) backend_v6_data: Option<Box<str>>,
    /// A BackendType not in [`KNOWN_TYPES`].
    pub(super) backend_type: Option<String>,
}

/// The BackendTypes stored without an allocation.
/// "" (flannel's udp writes none) and every type weft knows.
pub(super) const KNOWN_TYPES: [&str; KINDS.len() + 1] = known_types();
pub(super) const OTHER_TYPE: u8 = KNOWN_TYPES.len() as u8;

pub(super) const fn known_types() -> [&'static str; KINDS.len() + 1] {
    let mut names = [""; KINDS.len() + 1];
    let mut i = 0;
    while i < KINDS.len() {
        names[i + 1] = KINDS[i].name;
        i += 1;
    }
    names
}

impl Compact {
    pub(super) fn new(l: Lease) -> Self {
        let a = l.attrs;
        let known = KNOWN_TYPES.iter().position(|k| *k == a.backend_type);
        let other = known.is_none().then_some(a.backend_type);
        let v6 = l.ipv6_subnet.is_some() || a.public_ipv6.is_some() || a.backend_v6_data.is_some();
        let extra = (v6 || other.is_some()).then(|| {
            Box::new(Extra {
                ipv6_subnet: l.ipv6_subnet,
                public_ipv6: a.public_ipv6,
                backend_v6_data: a.backend_v6_data.as_ref().map(json_text),
                backend_type: other,
            })
        });
        Self {
            subnet: l.subnet,
            public_ip: a.public_ip,
            kind: known.map_or(OTHER_TYPE, |i| i as u8),
            backend_data: a.backend_data.as_ref().map(json_text),
            extra,
            hold: l.hold,
            version: l.version,
        }
    }

    pub(super) fn backend_type(&self) -> &str {
        let other = self.extra.as_ref().and_then(|e| e.backend_type.as_deref());
        KNOWN_TYPES
            .get(usize::from(self.kind))
            .copied()
            .or(other)
            .unwrap_or_default()
    }

    pub(super) fn ipv6_subnet(&self) -> Option<Ipv6Net> {
        self.extra.as_ref().and_then(|e| e.ipv6_subnet)
    }

    pub(super) fn lease(&self) -> Lease {
        let e = self.extra.as_deref();
        // Text this set wrote from a JSON value: it parses.
        let value = |t: Option<&str>| t.and_then(|t| serde_json::from_str(t).ok());
        Lease {
            subnet: self.subnet,
            ipv6_subnet: self.ipv6_subnet(),
            attrs: LeaseAttrs {
                public_ip: self.public_ip,
                public_ipv6: e.and_then(|e| e.public_ipv6),
                backend_type: self.backend_type().to_owned(),
                backend_data: value(self.backend_data.as_deref()),
                backend_v6_data: value(e.and_then(|e| e.backend_v6_data.as_deref())),
            },
            hold: self.hold,
            version: self.version,
        }
    }

    /// What [`Lease::to_backend`] makes of [`Compact::lease`].
    pub(super) fn backend_lease(&self) -> weft_backends::Lease {
        weft_backends::Lease {
            subnet: self.subnet,
            public_ip: self.public_ip,
            backend_type: self.backend_type().to_owned(),
            backend_data: (self.backend_data.as_deref()).map(BackendData::from_json),
            ipv6: self.extra.as_deref().and_then(|e| {
                Some(LeaseV6 {
                    subnet: e.ipv6_subnet?,
                    public_ip: e.public_ipv6,
                    backend_data: e.backend_v6_data.as_deref().map(BackendData::from_json),
                })
            }),
        }
    }

    /// Whether another lease has the same attributes (what a data plane is given).
    pub(super) fn same_attrs(&self, other: &Self) -> bool {
        (self.public_ip, self.kind, &self.backend_data, &self.extra)
            == (
                other.public_ip,
                other.kind,
                &other.backend_data,
                &other.extra,
            )
    }

    pub(super) fn peer(&self, key: &str) -> Peer {
        Peer {
            key: key.to_string(),
            subnet: self.subnet,
            public_ip: self.public_ip,
        }
    }
}

/// A JSON value as compact text. Serializing a JSON value cannot fail.
fn json_text(v: &serde_json::Value) -> Box<str> {
    serde_json::to_string(v)
        .unwrap_or_default()
        .into_boxed_str()
}
