//! The udp options of the network config, with flannel's names and defaults.

use serde_json::Value;

use crate::{invalid_option as invalid, BackendConfig, Error};

/// flannel's udp port.
pub const DEFAULT_PORT: u16 = 8285;

/// udp's overhead on IPv4: outer IP 20 + UDP 8; the inner packet travels with no header.
pub const OVERHEAD: u32 = 28;

/// The smallest MTU IPv4 allows (RFC 791).
const MIN_MTU: u32 = 68;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpConfig {
    pub port: u16,
    /// flannel0's MTU: underlay MTU − 28, or lower if `MTU` says so.
    pub mtu: u32,
    /// TUN offloads (TSO/USO through IFF_VNET_HDR) and UDP GSO/GRO on the socket. weft's
    /// option: flannel has none. Off gives flannel's one-packet-per-system-call data path.
    pub offload: bool,
}

impl UdpConfig {
    /// Parses `Port`, `MTU` and `Offload` (keys in any case); `underlay_mtu` bounds the MTU.
    pub fn parse(c: &BackendConfig, underlay_mtu: u32) -> Result<Self, Error> {
        let port = match c.uint("Port", u64::from(u16::MAX))? {
            None | Some(0) => DEFAULT_PORT,
            Some(p) => p as u16,
        };
        let max_mtu = underlay_mtu.saturating_sub(OVERHEAD);
        let mtu = match c.uint("MTU", u64::from(u32::MAX))? {
            None | Some(0) => max_mtu,
            Some(m) => {
                let m = m as u32;
                if m > max_mtu {
                    return Err(invalid(
                        "MTU",
                        &format!(
                            "{m} does not fit the underlay: at most {max_mtu} (underlay MTU \
                             {underlay_mtu} − {OVERHEAD})"
                        ),
                    ));
                }
                m
            }
        };
        if mtu < MIN_MTU {
            return Err(invalid(
                "MTU",
                &format!("{mtu} is below IPv4's minimum of {MIN_MTU}"),
            ));
        }
        let offload = match c.get("Offload") {
            None | Some(Value::Null) => true,
            Some(v) => v
                .as_bool()
                .ok_or_else(|| invalid("Offload", &format!("want true or false, got {v}")))?,
        };
        Ok(Self { port, mtu, offload })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value, underlay: u32) -> Result<UdpConfig, Error> {
        let map = match v {
            Value::Object(m) => m,
            _ => Default::default(),
        };
        UdpConfig::parse(&BackendConfig::new(map), underlay)
    }

    #[test]
    fn defaults_match_flannel() {
        let c = parse(json!({"Type": "udp"}), 1500).expect("valid");
        assert_eq!(
            c,
            UdpConfig {
                port: 8285,
                mtu: 1472,
                offload: true
            }
        );
        // The classic config has no Backend object at all.
        assert_eq!(parse(json!({}), 9000).expect("valid").mtu, 8972);
    }

    #[test]
    fn keys_are_case_insensitive() {
        let c = parse(
            json!({"type": "udp", "port": 9285, "mtu": 1400, "offload": false}),
            1500,
        )
        .expect("valid");
        assert_eq!(
            c,
            UdpConfig {
                port: 9285,
                mtu: 1400,
                offload: false
            }
        );
    }

    #[test]
    fn port_zero_means_the_default() {
        assert_eq!(parse(json!({"Port": 0}), 1500).expect("valid").port, 8285);
    }

    #[test]
    fn mtu_may_only_lower_the_underlay_mtu_minus_28() {
        assert_eq!(parse(json!({"MTU": 1472}), 1500).expect("valid").mtu, 1472);
        assert_eq!(parse(json!({"MTU": 68}), 1500).expect("valid").mtu, 68);
        let e = parse(json!({"MTU": 1473}), 1500).expect_err("too big");
        assert!(e.to_string().contains("at most 1472"), "{e}");
    }

    #[test]
    fn rejects_bad_values() {
        for bad in [
            json!({"Port": "8285"}),
            json!({"Port": 70000}),
            json!({"Port": -1}),
            json!({"MTU": 67}),
            json!({"MTU": 1.5}),
            json!({"MTU": "1400"}),
            json!({"Offload": "no"}),
        ] {
            let e = parse(bad.clone(), 1500).expect_err("invalid");
            assert!(
                matches!(e, Error::InvalidOption { .. }),
                "{bad}: {e:?} is not InvalidOption"
            );
        }
        // An underlay too small to carry anything.
        assert!(parse(json!({}), 90).is_err());
    }
}
