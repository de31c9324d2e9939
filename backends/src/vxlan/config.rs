//! The vxlan options of the network config, with flannel's names and defaults.

use serde_json::Value;

use crate::{invalid_option as invalid, BackendConfig, Error};

/// Linux's default vxlan UDP port, which flannel relies on by not setting one.
pub const KERNEL_DEFAULT_PORT: u16 = 8472;

/// vxlan's overhead on IPv4: outer IP 20 + UDP 8 + VXLAN 8 + inner Ethernet 14.
pub const OVERHEAD: u32 = 50;

/// vxlan's overhead on IPv6: the outer IPv6 header is 40 bytes, 20 more than IPv4's.
pub const OVERHEAD6: u32 = 70;

/// The smallest MTU the kernel gives a vxlan device (ETH_MIN_MTU, IPv4's minimum).
const MIN_MTU: u32 = 68;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanConfig {
    pub vni: u32,
    /// 0 = the kernel's default (8472).
    pub port: u16,
    pub gbp: bool,
    pub learning: bool,
    pub direct_routing: bool,
    /// 0 = underlay MTU − 50.
    pub mtu: u32,
    /// `TxChecksumOffload` (weft): the device's `tx-checksum-ip-generic`, kept so at every
    /// reconcile. `false` is the fix for flannel #1279, which flannel only documents. Absent:
    /// left as the kernel (or an operator's `ethtool -K`) has it.
    pub tx_checksum_offload: Option<bool>,
}

impl VxlanConfig {
    pub fn parse(c: &BackendConfig) -> Result<Self, Error> {
        let cfg = Self {
            vni: uint(c, "VNI", 1, 0x00ff_ffff)? as u32,
            port: uint(c, "Port", 0, u64::from(u16::MAX))? as u16,
            gbp: boolean(c, "GBP")?,
            learning: boolean(c, "Learning")?,
            direct_routing: boolean(c, "DirectRouting")?,
            mtu: uint(c, "MTU", 0, 65535)? as u32,
            tx_checksum_offload: optional_boolean(c, "TxChecksumOffload")?,
        };
        // The kernel refuses a vxlan device below Ethernet's minimum MTU, which would only show
        // up when the device is created; 0 means the default.
        if cfg.mtu != 0 && cfg.mtu < MIN_MTU {
            return Err(invalid(
                "MTU",
                &format!(
                    "{} is below the minimum of {MIN_MTU} (0 means the default)",
                    cfg.mtu
                ),
            ));
        }
        if cfg.device_name().len() > 15 {
            return Err(invalid(
                "VNI",
                "device name flannel.<VNI> would exceed 15 characters",
            ));
        }
        Ok(cfg)
    }

    /// flannel's device name, `flannel.<VNI>`.
    pub fn device_name(&self) -> String {
        format!("flannel.{}", self.vni)
    }

    /// flannel's IPv6 device name, `flannel-v6.<VNI>`: longer, so VNIs above 9999 cannot have
    /// one (Linux names are at most 15 characters).
    pub fn device_name6(&self) -> String {
        format!("flannel-v6.{}", self.vni)
    }

    /// The MTU of `flannel.<VNI>` on its own: the config's, else the underlay's less IPv4's
    /// overhead.
    pub fn mtu4(&self, underlay_mtu: u32) -> u32 {
        if self.mtu != 0 {
            self.mtu
        } else {
            underlay_mtu.saturating_sub(OVERHEAD)
        }
    }

    /// The MTU of `flannel-v6.<VNI>`: IPv6's outer header costs 20 bytes more than IPv4's, so
    /// 20 less than [`VxlanConfig::mtu4`], whether that comes from the config or the underlay.
    pub fn mtu6(&self, underlay_mtu: u32) -> u32 {
        if self.mtu != 0 {
            self.mtu.saturating_sub(OVERHEAD6 - OVERHEAD)
        } else {
            underlay_mtu.saturating_sub(OVERHEAD6)
        }
    }

    /// The UDP port the device really uses.
    pub fn effective_port(&self) -> u16 {
        if self.port == 0 {
            KERNEL_DEFAULT_PORT
        } else {
            self.port
        }
    }
}

fn uint(c: &BackendConfig, key: &str, default: u64, max: u64) -> Result<u64, Error> {
    Ok(c.uint(key, max)?.unwrap_or(default))
}

fn boolean(c: &BackendConfig, key: &str) -> Result<bool, Error> {
    Ok(optional_boolean(c, key)?.unwrap_or(false))
}

fn optional_boolean(c: &BackendConfig, key: &str) -> Result<Option<bool>, Error> {
    match c.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_bool()
            .map(Some)
            .ok_or_else(|| invalid(key, &format!("want true or false, got {v}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(v: Value) -> BackendConfig {
        match v {
            Value::Object(m) => BackendConfig::new(m),
            _ => BackendConfig::default(),
        }
    }

    #[test]
    fn defaults_match_flannel() {
        let c = VxlanConfig::parse(&cfg(serde_json::json!({"Type": "vxlan"}))).expect("valid");
        assert_eq!(
            c,
            VxlanConfig {
                vni: 1,
                port: 0,
                gbp: false,
                learning: false,
                direct_routing: false,
                mtu: 0,
                tx_checksum_offload: None,
            }
        );
        assert_eq!(c.device_name(), "flannel.1");
        assert_eq!(c.device_name6(), "flannel-v6.1");
        assert_eq!(c.effective_port(), 8472);
    }

    #[test]
    fn the_ipv6_device_carries_20_bytes_less_than_the_ipv4_one() {
        let c = VxlanConfig::parse(&cfg(serde_json::json!({}))).expect("valid");
        assert_eq!((c.mtu4(1500), c.mtu6(1500)), (1450, 1430));
        assert_eq!((c.mtu4(9000), c.mtu6(9000)), (8950, 8930));
        let set = VxlanConfig::parse(&cfg(serde_json::json!({"MTU": 1400}))).expect("valid");
        assert_eq!((set.mtu4(9000), set.mtu6(9000)), (1400, 1380));
    }

    #[test]
    fn keys_are_case_insensitive() {
        let c = VxlanConfig::parse(&cfg(serde_json::json!(
            {"type": "vxlan", "vni": 4096, "port": 4789, "directrouting": true, "Mtu": 1400}
        )))
        .expect("valid");
        assert_eq!(
            (c.vni, c.port, c.direct_routing, c.mtu),
            (4096, 4789, true, 1400)
        );
    }

    #[test]
    fn tx_checksum_offload_is_left_alone_unless_given() {
        let parse = |v| {
            VxlanConfig::parse(&cfg(v))
                .expect("valid")
                .tx_checksum_offload
        };
        assert_eq!(parse(serde_json::json!({})), None);
        assert_eq!(
            parse(serde_json::json!({"TxChecksumOffload": false})),
            Some(false)
        );
        assert_eq!(
            parse(serde_json::json!({"txchecksumoffload": true})),
            Some(true)
        );
    }

    #[test]
    fn rejects_bad_values() {
        for bad in [
            serde_json::json!({"VNI": "1"}),
            serde_json::json!({"VNI": 16777216}),
            serde_json::json!({"Port": 70000}),
            serde_json::json!({"DirectRouting": "yes"}),
            serde_json::json!({"VNI": -1}),
            serde_json::json!({"MTU": 67}),
            serde_json::json!({"TxChecksumOffload": "off"}),
        ] {
            assert!(VxlanConfig::parse(&cfg(bad.clone())).is_err(), "{bad}");
        }
    }
}
