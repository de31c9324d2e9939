//! Ethernet addresses as flannel writes them in leases (`"VtepMAC":"aa:bb:cc:dd:ee:ff"`).

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// A 48-bit Ethernet address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// A locally administered unicast MAC derived only from `public_ip` and `vni`, so a host that
    /// lost both its device and its lease still comes back with the VTEP MAC its peers know.
    pub fn stable(public_ip: Ipv4Addr, vni: u32) -> Self {
        Self::derived(b"weft-vtep", &public_ip.octets(), vni)
    }

    /// [`Mac::stable`] for an IPv6 device: from its address and `vni`, with another seed, so
    /// that a host's two devices' MACs differ.
    pub fn stable6(ip: Ipv6Addr, vni: u32) -> Self {
        Self::derived(b"weft-vtep6", &ip.octets(), vni)
    }

    /// FNV-1a of `seed`, `addr` and `vni`, spelled out here because std's hasher may change
    /// between Rust releases.
    fn derived(seed: &[u8], addr: &[u8], vni: u32) -> Self {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in seed.iter().chain(addr).chain(vni.to_be_bytes().iter()) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        let b = h.to_be_bytes();
        // Clear the multicast bit, set the locally-administered bit.
        Self([(b[0] & 0xfe) | 0x02, b[1], b[2], b[3], b[4], b[5]])
    }

    /// Whether peers can use this as a VTEP address: neither all-zero nor multicast.
    pub fn is_unicast(&self) -> bool {
        self.0 != [0; 6] && self.0[0] & 0x01 == 0
    }

    /// From a netlink link-layer address attribute, if it is six bytes long.
    pub fn from_slice(b: &[u8]) -> Option<Self> {
        <[u8; 6]>::try_from(b).ok().map(Self)
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// Why a vxlan lease's `BackendData` names no VTEP address a peer can send to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VtepMacError {
    #[error("BackendData has no VtepMAC")]
    Missing,
    #[error("VtepMAC: {0}")]
    Invalid(#[from] ParseMacError),
    #[error("VtepMAC {0} is not a unicast address")]
    NotUnicast(Mac),
}

/// The `VtepMAC` a vxlan lease publishes in its `BackendData`, if it is a usable (unicast,
/// non-zero) VTEP address: an FDB entry to a multicast or zero MAC would flood or blackhole.
pub fn vtep_mac(backend_data: Option<&serde_json::Value>) -> Result<Mac, VtepMacError> {
    let text = backend_data
        .and_then(|d| d.get("VtepMAC"))
        .and_then(serde_json::Value::as_str)
        .ok_or(VtepMacError::Missing)?;
    let mac: Mac = text.parse()?;
    if !mac.is_unicast() {
        return Err(VtepMacError::NotUnicast(mac));
    }
    Ok(mac)
}

/// The text was not six colon-separated hex octets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid MAC address {0:?}")]
pub struct ParseMacError(String);

impl FromStr for Mac {
    type Err = ParseMacError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseMacError(s.to_string());
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for o in &mut out {
            let p = parts.next().ok_or_else(err)?;
            if p.len() != 2 {
                return Err(err());
            }
            *o = u8::from_str_radix(p, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(Self(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_flannel_form() {
        let m: Mac = "C6:2b:1e:55:0d:7a".parse().expect("valid");
        assert_eq!(m.to_string(), "c6:2b:1e:55:0d:7a");
        for bad in [
            "",
            "c6:2b:1e:55:0d",
            "c6:2b:1e:55:0d:7a:00",
            "c6:2b:1e:55:0d:7",
            "zz:2b:1e:55:0d:7a",
        ] {
            assert!(bad.parse::<Mac>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_vtep_mac_must_be_present_parseable_unicast_and_non_zero() {
        use serde_json::json;
        let ok = json!({"VNI": 1, "VtepMAC": "c6:2b:1e:55:0d:7a"});
        assert_eq!(
            vtep_mac(Some(&ok)).map(|m| m.to_string()),
            Ok("c6:2b:1e:55:0d:7a".into())
        );
        assert_eq!(vtep_mac(None), Err(VtepMacError::Missing));
        assert_eq!(
            vtep_mac(Some(&json!({"VtepMAC": 7}))),
            Err(VtepMacError::Missing)
        );
        assert!(matches!(
            vtep_mac(Some(&json!({"VtepMAC": "c6:2b"}))),
            Err(VtepMacError::Invalid(_))
        ));
        for bad in [
            "00:00:00:00:00:00",
            "ff:ff:ff:ff:ff:ff",
            "01:00:5e:00:00:01",
        ] {
            assert!(
                matches!(
                    vtep_mac(Some(&json!({ "VtepMAC": bad }))),
                    Err(VtepMacError::NotUnicast(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn stable_mac_is_local_unicast_and_deterministic() {
        let ip = Ipv4Addr::new(192, 168, 64, 3);
        let a = Mac::stable(ip, 1);
        assert_eq!(a, Mac::stable(ip, 1));
        assert_ne!(a, Mac::stable(ip, 2));
        assert_ne!(a, Mac::stable(Ipv4Addr::new(192, 168, 64, 4), 1));
        assert!(a.is_unicast());
        assert_eq!(a.0[0] & 0x03, 0x02);
    }
}
