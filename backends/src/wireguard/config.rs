//! The wireguard options of the network config, with flannel's names and defaults
//! (flannel's `pkg/backend/wireguard`): `ListenPort`, `ListenPortV6`, `PSK`,
//! `PersistentKeepaliveInterval`, `MTU`, `Mode`; keys in any case, as Go's decoder matches them.

use serde_json::Value;

use super::key::{self, Key};
use crate::{invalid_option as invalid, BackendConfig, Error};

/// flannel's WireGuard port, and its IPv6 device's.
pub const DEFAULT_PORT: u16 = 51820;
pub const DEFAULT_PORT_V6: u16 = 51821;

/// WireGuard's overhead as flannel counts it (on IPv6, the worst case): outer IPv6 40 + UDP 8 +
/// WireGuard header 16 + authentication tag 16. Link MTU and FLANNEL_MTU are the MTU less this.
pub const OVERHEAD: u32 = 80;

/// The smallest MTU IPv4 allows (RFC 791), for the device.
const MIN_DEVICE_MTU: u32 = 68;

/// The largest `MTU`: the largest Linux gives a link.
const MAX_MTU: u64 = 65536;

/// `Mode`: how IPv6 travels on a dual-stack network. With IPv4 only, every mode makes the one
/// device `flannel-wg`, as in flannel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// One device per address family (flannel's default): `flannel-wg` on ListenPort between
    /// PublicIPs, `flannel-wg-v6` on ListenPortV6 between PublicIPv6s, one key for both.
    Separate,
    /// One device `flannel-wg` carrying both families, each peer reached at the address
    /// flannel's rule picks (its PublicIP unless both ends have public IPv6 and its IPv4 is
    /// private).
    Auto,
    /// One device, peers reached at their PublicIP.
    Ipv4,
    /// One device, peers reached at their PublicIPv6.
    Ipv6,
}

/// flannel's device names.
pub const DEVICE: &str = "flannel-wg";
pub const DEVICE_V6: &str = "flannel-wg-v6";

/// One WireGuard device the backend runs: its name, port and the families it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceSpec {
    pub name: &'static str,
    pub port: u16,
    /// It carries the IPv4 subnets (its peers' AllowedIPs, the network's route).
    pub v4: bool,
    /// It carries the IPv6 subnets.
    pub v6: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WgConfig {
    pub listen_port: u16,
    /// `ListenPortV6`: `flannel-wg-v6`'s port (separate mode on a dual-stack network).
    pub listen_port_v6: u16,
    /// `PSK`: one preshared key for every peer.
    pub psk: Option<Key>,
    /// `PersistentKeepaliveInterval` in seconds; 0 (off) is `None`.
    pub keepalive: Option<u16>,
    /// `MTU` as configured (the underlay's when 0 or absent); the device gets it less
    /// [`OVERHEAD`].
    pub mtu: Option<u32>,
    pub mode: Mode,
}

impl WgConfig {
    /// Parses the options; `underlay_mtu` is the MTU used when the config sets none.
    pub fn parse(c: &BackendConfig, underlay_mtu: u32) -> Result<Self, Error> {
        let port = |key: &str, default: u16| -> Result<u16, Error> {
            Ok(match c.uint(key, u64::from(u16::MAX))? {
                None | Some(0) => default,
                Some(p) => p as u16,
            })
        };
        let listen_port = port("ListenPort", DEFAULT_PORT)?;
        let listen_port_v6 = port("ListenPortV6", DEFAULT_PORT_V6)?;
        let psk = match c.get("PSK") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.is_empty() => None,
            Some(Value::String(s)) => Some(key::parse(s).map_err(|why| {
                invalid(
                    "PSK",
                    &format!("{why} (want 32 bytes in base64, as `wg genpsk` writes them)"),
                )
            })?),
            Some(v) => {
                return Err(invalid(
                    "PSK",
                    &format!("want a key in base64 (`wg genpsk`), got {v}"),
                ))
            }
        };
        let keepalive = c
            .uint("PersistentKeepaliveInterval", u64::from(u16::MAX))?
            .filter(|s| *s != 0)
            .map(|s| s as u16);
        let mtu = c
            .uint("MTU", MAX_MTU)?
            .filter(|m| *m != 0)
            .map(|m| m as u32);
        let base = mtu.unwrap_or(underlay_mtu);
        if base < MIN_DEVICE_MTU + OVERHEAD {
            let what = if mtu.is_some() {
                "MTU"
            } else {
                "the underlay's MTU"
            };
            return Err(invalid(
                "MTU",
                &format!(
                    "{what} {base} leaves no room: the device gets the MTU less {OVERHEAD}, and \
                     needs at least {MIN_DEVICE_MTU} (so at least {})",
                    MIN_DEVICE_MTU + OVERHEAD
                ),
            ));
        }
        let mode = match c.get("Mode") {
            None | Some(Value::Null) => Mode::Separate,
            Some(Value::String(s)) => match s.as_str() {
                "separate" | "" => Mode::Separate,
                "auto" => Mode::Auto,
                "ipv4" => Mode::Ipv4,
                "ipv6" => Mode::Ipv6,
                other => {
                    return Err(invalid(
                        "Mode",
                        &format!(
                            "unknown mode {other:?} (flannel's are separate, auto, ipv4, ipv6)"
                        ),
                    ))
                }
            },
            Some(v) => return Err(invalid("Mode", &format!("want a string, got {v}"))),
        };
        Ok(Self {
            listen_port,
            listen_port_v6,
            psk,
            keepalive,
            mtu,
            mode,
        })
    }

    /// The device's MTU, and FLANNEL_MTU: the configured (or underlay's) MTU less 80.
    pub fn device_mtu(&self, underlay_mtu: u32) -> u32 {
        self.mtu.unwrap_or(underlay_mtu).saturating_sub(OVERHEAD)
    }

    /// The devices it runs, `dual` on a dual-stack network: `flannel-wg` alone for IPv4, or
    /// carrying both families in a one-device mode; in separate mode with IPv6, `flannel-wg-v6`
    /// beside it.
    pub fn devices(&self, dual: bool) -> Vec<DeviceSpec> {
        let v4 = DeviceSpec {
            name: DEVICE,
            port: self.listen_port,
            v4: true,
            v6: dual && self.mode != Mode::Separate,
        };
        let mut all = vec![v4];
        if dual && self.mode == Mode::Separate {
            all.push(DeviceSpec {
                name: DEVICE_V6,
                port: self.listen_port_v6,
                v4: false,
                v6: true,
            });
        }
        all
    }

    /// The port published in `BackendV6Data`: the one the device carrying IPv6 listens on.
    /// flannel writes ListenPortV6 in every mode, though in a one-device mode nothing listens
    /// there (its peers then dial a closed port over IPv6); weft writes the true one.
    pub fn port_v6(&self) -> u16 {
        match self.mode {
            Mode::Separate => self.listen_port_v6,
            Mode::Auto | Mode::Ipv4 | Mode::Ipv6 => self.listen_port,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn parse(v: Value, underlay: u32) -> Result<WgConfig, Error> {
        let map = match v {
            Value::Object(m) => m,
            _ => Default::default(),
        };
        WgConfig::parse(&BackendConfig::new(map), underlay)
    }

    const PSK: &str = "GJ1t8pV1dPq0i8p9tF2P0BqX4V7q5x9jH0f8dG1s2aY=";

    #[test]
    fn defaults_match_flannel() {
        let c = parse(json!({"Type": "wireguard"}), 1500).expect("valid");
        assert_eq!(
            c,
            WgConfig {
                listen_port: 51820,
                listen_port_v6: 51821,
                psk: None,
                keepalive: None,
                mtu: None,
                mode: Mode::Separate,
            }
        );
        assert_eq!(c.device_mtu(1500), 1420);
        assert_eq!(c.device_mtu(9000), 8920);
    }

    #[test]
    fn keys_are_case_insensitive() {
        let c = parse(
            json!({"type": "wireguard", "listenport": 51999, "psk": PSK,
                   "persistentKeepaliveInterval": 25, "mtu": 1400, "MODE": "separate"}),
            1500,
        )
        .expect("valid");
        assert_eq!(c.listen_port, 51999);
        assert_eq!(c.psk.map(|k| key::show(&k)), Some(PSK.to_string()));
        assert_eq!(c.keepalive, Some(25));
        assert_eq!(c.mtu, Some(1400));
        assert_eq!(c.device_mtu(1500), 1320, "the configured MTU less 80");
    }

    #[test]
    fn zero_and_empty_mean_the_default() {
        let c = parse(
            json!({"ListenPort": 0, "PSK": "", "PersistentKeepaliveInterval": 0, "MTU": 0}),
            1500,
        )
        .expect("valid");
        assert_eq!(
            (c.listen_port, c.psk, c.keepalive, c.mtu),
            (51820, None, None, None)
        );
    }

    #[test]
    fn every_mode_is_one_device_for_ipv4_and_separate_adds_flannel_wg_v6() {
        let spec = |name, port, v4, v6| DeviceSpec { name, port, v4, v6 };
        for (m, mode) in [
            ("separate", Mode::Separate),
            ("auto", Mode::Auto),
            ("ipv4", Mode::Ipv4),
            ("ipv6", Mode::Ipv6),
        ] {
            let c = parse(json!({"Mode": m, "ListenPort": 5, "ListenPortV6": 6}), 1500)
                .expect("valid");
            assert_eq!(c.mode, mode);
            assert_eq!(c.devices(false), [spec(DEVICE, 5, true, false)], "{m}");
        }
        let c = parse(json!({"ListenPort": 5, "ListenPortV6": 6}), 1500).expect("valid");
        assert_eq!(
            c.devices(true),
            [spec(DEVICE, 5, true, false), spec(DEVICE_V6, 6, false, true)]
        );
        assert_eq!(c.port_v6(), 6);
        for m in ["auto", "ipv4", "ipv6"] {
            let c = parse(json!({"Mode": m, "ListenPort": 5, "ListenPortV6": 6}), 1500)
                .expect("valid");
            assert_eq!(c.devices(true), [spec(DEVICE, 5, true, true)], "{m}");
            assert_eq!(c.port_v6(), 5, "{m}: the port the one device listens on");
        }
        let e = parse(json!({"Mode": "mesh"}), 1500).expect_err("unknown");
        assert!(e.to_string().contains("unknown mode \"mesh\""), "{e}");
    }

    #[test]
    fn a_psk_must_be_32_bytes_of_base64() {
        for bad in [
            json!({"PSK": "not base64!"}),
            json!({"PSK": "AAAA"}),
            json!({"PSK": "GJ1t8pV1dPq0i8p9tF2P0BqX4V7q5x9jH0f8dG1s2aY"}),
            json!({"PSK": 7}),
        ] {
            let e = parse(bad.clone(), 1500).expect_err("invalid");
            assert!(e.to_string().contains("option PSK"), "{bad}: {e}");
        }
    }

    #[test]
    fn rejects_bad_values() {
        for bad in [
            json!({"ListenPort": 70000}),
            json!({"ListenPort": "51820"}),
            json!({"ListenPortV6": -1}),
            json!({"PersistentKeepaliveInterval": 65536}),
            json!({"PersistentKeepaliveInterval": 2.5}),
            json!({"MTU": 147}),
            json!({"MTU": 70000}),
            json!({"Mode": 1}),
        ] {
            let e = parse(bad.clone(), 1500).expect_err("invalid");
            assert!(
                matches!(e, Error::InvalidOption { .. }),
                "{bad}: {e:?} is not InvalidOption"
            );
        }
        assert!(parse(json!({"MTU": 148}), 1500).is_ok());
        let e = parse(json!({}), 140).expect_err("underlay too small");
        assert!(e.to_string().contains("the underlay's MTU 140"), "{e}");
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            (0u64..100_000).prop_map(|n| json!(n)),
            any::<f64>().prop_map(|f| json!(f)),
            "[a-zA-Z0-9+/=]{0,50}".prop_map(Value::String),
            Just(json!(PSK)),
            prop_oneof![Just("separate"), Just("auto"), Just("ipv6"), Just("")]
                .prop_map(|s| json!(s)),
        ];
        leaf.prop_recursive(2, 8, 4, |inner| {
            prop::collection::vec(inner, 0..4).prop_map(Value::Array)
        })
    }

    proptest! {
        /// Any value under any of its keys: an answer, never a panic; and what is accepted
        /// leaves the device at least IPv4's minimum MTU.
        #[test]
        fn any_options_parse_or_are_refused(
            values in prop::collection::vec(json_value(), 6),
            underlay in 0u32..70_000,
        ) {
            let keys = ["ListenPort", "listenportv6", "PSK", "PersistentKeepaliveInterval",
                        "mtu", "Mode"];
            let map = keys.iter().map(|k| k.to_string()).zip(values).collect();
            if let Ok(c) = WgConfig::parse(&BackendConfig::new(map), underlay) {
                prop_assert!(c.device_mtu(underlay) >= MIN_DEVICE_MTU);
                prop_assert!(c.listen_port != 0);
            }
        }
    }
}
