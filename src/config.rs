//! The cluster network config stored at `<prefix>/config`, with flannel's defaults and validation.
//! Keys are matched case-insensitively, as flannel's Go decoder does ("VNI" and "vni" both occur),
//! and when several spellings of one key occur the last one wins, as in Go.
//!
//! This is the one place a config is judged, backend options included: weftd waits on what it
//! refuses (rather than failing to build the backend again and again), and `weftctl config set`
//! refuses the same, with the same message.

use std::fmt;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};
use weft_backends::BackendConfig;

/// A problem with the network config, naming the key at fault.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{key}: {problem}")]
pub struct ConfigError {
    pub key: &'static str,
    pub problem: String,
}

fn err(key: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        key,
        problem: problem.into(),
    }
}

/// A refused config and where it is stored: the one wording weftd logs and weftctl prints.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid network config at {at}: {error}")]
pub struct InvalidConfig {
    /// The etcd key, `<prefix>/config`.
    pub at: String,
    pub error: ConfigError,
}

/// The shortest Network prefix accepted. flannel refuses only 0.0.0.0/0 (to its decoder the same as
/// no Network at all); weft also refuses anything wider than 10.0.0.0/8, the largest private
/// range: such a Network necessarily spans public addresses, and the FORWARD accept and masquerade
/// rules written for it would then cover a large part of the internet.
pub const MIN_NETWORK_PREFIX: u8 = 8;

/// A validated network config.
#[derive(Debug, Clone)]
pub struct NetworkConfig {
    pub network: Ipv4Net,
    pub subnet_len: u8,
    pub subnet_min: Ipv4Addr,
    pub subnet_max: Ipv4Addr,
    pub backend: BackendConfig,
}

impl PartialEq for NetworkConfig {
    fn eq(&self, o: &Self) -> bool {
        self.network == o.network
            && self.subnet_len == o.subnet_len
            && self.subnet_min == o.subnet_min
            && self.subnet_max == o.subnet_max
            && self.backend.as_map() == o.backend.as_map()
    }
}

/// JSON decoded the way Go's encoding/json fills a struct: in every object, keys that differ only
/// in ASCII case are one key, and the last occurrence wins (exact duplicates included, which
/// `serde_json::Value` would collapse keeping the first position). A `null` never overrides an
/// earlier value: Go leaves a field untouched on null. Hand-written because no crate decodes JSON
/// with Go's field matching.
struct GoJson(Value);

impl<'de> Deserialize<'de> for GoJson {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(GoJsonVisitor)
    }
}

struct GoJsonVisitor;

impl<'de> Visitor<'de> for GoJsonVisitor {
    type Value = GoJson;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("JSON")
    }
    fn visit_bool<E>(self, v: bool) -> Result<GoJson, E> {
        Ok(GoJson(Value::Bool(v)))
    }
    fn visit_i64<E>(self, v: i64) -> Result<GoJson, E> {
        Ok(GoJson(Value::from(v)))
    }
    fn visit_u64<E>(self, v: u64) -> Result<GoJson, E> {
        Ok(GoJson(Value::from(v)))
    }
    fn visit_f64<E>(self, v: f64) -> Result<GoJson, E> {
        Ok(GoJson(Value::from(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<GoJson, E> {
        Ok(GoJson(Value::String(v.to_owned())))
    }
    fn visit_string<E>(self, v: String) -> Result<GoJson, E> {
        Ok(GoJson(Value::String(v)))
    }
    fn visit_unit<E>(self) -> Result<GoJson, E> {
        Ok(GoJson(Value::Null))
    }
    fn visit_none<E>(self) -> Result<GoJson, E> {
        Ok(GoJson(Value::Null))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<GoJson, A::Error> {
        let mut items = Vec::new();
        while let Some(GoJson(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(GoJson(Value::Array(items)))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<GoJson, A::Error> {
        let mut obj = Map::new();
        while let Some((k, GoJson(v))) = map.next_entry::<String, GoJson>()? {
            let earlier = obj.keys().find(|e| e.eq_ignore_ascii_case(&k)).cloned();
            if let Some(e) = earlier {
                if v.is_null() {
                    continue;
                }
                obj.shift_remove(&e);
            }
            obj.insert(k, v);
        }
        Ok(GoJson(Value::Object(obj)))
    }
}

/// The value of `key` in an object folded by [`GoJson`] (one spelling per key), `null` as absent.
fn field<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(key))
        .map(|(_, v)| v)
        .filter(|v| !v.is_null())
}

fn string_field<'a>(
    obj: &'a Map<String, Value>,
    key: &'static str,
) -> Result<Option<&'a str>, ConfigError> {
    match field(obj, key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(v) => Err(err(key, format!("expected a string, found {v}"))),
    }
}

fn addr_field(
    obj: &Map<String, Value>,
    key: &'static str,
) -> Result<Option<Ipv4Addr>, ConfigError> {
    string_field(obj, key)?
        .map(|s| {
            s.parse()
                .map_err(|_| err(key, format!("{s:?} is not an IPv4 address")))
        })
        .transpose()
}

/// `Network`: an IPv4 CIDR of /8 to /28, host bits masked as Go's ParseCIDR does.
fn parse_network(obj: &Map<String, Value>) -> Result<Ipv4Net, ConfigError> {
    let network = string_field(obj, "Network")?
        .ok_or_else(|| err("Network", "missing (e.g. \"10.244.0.0/16\")"))?;
    let network: Ipv4Net = network
        .parse()
        .map_err(|_| err("Network", format!("{network:?} is not an IPv4 CIDR")))?;
    // Go's ParseCIDR masks host bits; so does flannel, so we do too.
    let network = network.trunc();
    if network.prefix_len() < MIN_NETWORK_PREFIX {
        return Err(err(
            "Network",
            format!(
                "{network} is too large: the prefix must be /{MIN_NETWORK_PREFIX} or longer \
                 (a wider network spans public addresses, and the forward and masquerade \
                 rules would cover them)"
            ),
        ));
    }
    if network.prefix_len() > 28 {
        return Err(err(
            "Network",
            format!("{network} is too small: the prefix must be /28 or shorter"),
        ));
    }
    Ok(network)
}

/// `SubnetLen`: flannel's default (/24, or 2 more than a network of /23 or longer), leaving
/// room for at least four subnets.
fn parse_subnet_len(obj: &Map<String, Value>, network: Ipv4Net) -> Result<u8, ConfigError> {
    let subnet_len = match field(obj, "SubnetLen") {
        None => {
            if network.prefix_len() <= 22 {
                24
            } else {
                network.prefix_len() + 2
            }
        }
        Some(v) => {
            let n = v
                .as_u64()
                .ok_or_else(|| err("SubnetLen", format!("expected a number, found {v}")))?;
            if n > 30 {
                return Err(err("SubnetLen", format!("{n} is more than 30")));
            }
            n as u8
        }
    };
    if subnet_len < network.prefix_len() + 2 {
        return Err(err(
            "SubnetLen",
            format!(
                "{subnet_len} leaves room for fewer than 4 subnets in {network} \
                 (it must be at least {})",
                network.prefix_len() + 2
            ),
        ));
    }
    Ok(subnet_len)
}

/// `SubnetMin` and `SubnetMax`: inside the network, on a subnet boundary, in order; by default
/// every subnet but the first.
fn parse_range(
    obj: &Map<String, Value>,
    network: Ipv4Net,
    subnet_len: u8,
) -> Result<(Ipv4Addr, Ipv4Addr), ConfigError> {
    let step = 1u32 << (32 - subnet_len);
    let first = u32::from(network.network());
    let last = u32::from(network.broadcast()) - (step - 1);
    let subnet_min = addr_field(obj, "SubnetMin")?.unwrap_or(Ipv4Addr::from(first + step));
    let subnet_max = addr_field(obj, "SubnetMax")?.unwrap_or(Ipv4Addr::from(last));
    for (key, addr) in [("SubnetMin", subnet_min), ("SubnetMax", subnet_max)] {
        if !network.contains(&addr) {
            return Err(err(key, format!("{addr} is not inside Network {network}")));
        }
        if u32::from(addr) % step != 0 {
            return Err(err(
                key,
                format!("{addr} is not on a /{subnet_len} boundary (SubnetLen)"),
            ));
        }
    }
    if subnet_min > subnet_max {
        return Err(err(
            "SubnetMin",
            format!("{subnet_min} is above SubnetMax {subnet_max}"),
        ));
    }
    Ok((subnet_min, subnet_max))
}

/// `Backend`: an object whose `Type` (if any) is a string, with options the backend accepts.
fn parse_backend(obj: &Map<String, Value>) -> Result<BackendConfig, ConfigError> {
    let backend = match field(obj, "Backend") {
        None => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(v) => return Err(err("Backend", format!("expected an object, found {v}"))),
    };
    if let Some(t) = field(&backend, "Type") {
        if !t.is_string() {
            return Err(err(
                "Backend",
                format!("Type: expected a string, found {t}"),
            ));
        }
    }

    let backend = BackendConfig::new(backend);
    weft_backends::validate(&backend, None).map_err(|e| err("Backend", e.to_string()))?;
    Ok(backend)
}

impl NetworkConfig {
    /// Parses and validates the JSON text of `<prefix>/config`.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let GoJson(value) = serde_json::from_str(text)
            .map_err(|e| err("config", format!("not valid JSON: {e}")))?;
        let Value::Object(obj) = value else {
            return Err(err("config", "expected a JSON object"));
        };

        if field(&obj, "EnableIPv4").and_then(Value::as_bool) == Some(false) {
            return Err(err("EnableIPv4", "IPv6-only networks are not supported"));
        }
        if field(&obj, "EnableIPv6").and_then(Value::as_bool) == Some(true) {
            return Err(err(
                "EnableIPv6",
                "dual-stack networks are not supported yet",
            ));
        }

        let network = parse_network(&obj)?;
        let subnet_len = parse_subnet_len(&obj, network)?;
        let (subnet_min, subnet_max) = parse_range(&obj, network, subnet_len)?;
        let backend = parse_backend(&obj)?;

        Ok(Self {
            network,
            subnet_len,
            subnet_min,
            subnet_max,
            backend,
        })
    }

    /// [`parse`](Self::parse), with the error worded as weftd logs it and weftctl prints it.
    pub fn parse_at(text: &str, key: &str) -> Result<Self, InvalidConfig> {
        Self::parse(text).map_err(|error| InvalidConfig {
            at: key.to_string(),
            error,
        })
    }

    /// What only this host can judge: the backend options against its underlay MTU (udp's `MTU`
    /// must fit inside it). After this, building the backend cannot fail on the config.
    pub fn check_on_host(&self, underlay_mtu: u32) -> Result<(), ConfigError> {
        weft_backends::validate(&self.backend, Some(underlay_mtu))
            .map_err(|e| err("Backend", e.to_string()))
    }

    /// How many subnets [SubnetMin, SubnetMax] holds.
    pub fn subnet_count(&self) -> u64 {
        let step = 1u64 << (32 - self.subnet_len);
        (u64::from(u32::from(self.subnet_max)) - u64::from(u32::from(self.subnet_min))) / step + 1
    }

    /// The `i`-th subnet of [SubnetMin, SubnetMax].
    pub fn nth_subnet(&self, i: u64) -> Ipv4Net {
        let step = 1u64 << (32 - self.subnet_len);
        let addr = u64::from(u32::from(self.subnet_min)) + i * step;
        // In range by construction: i < subnet_count().
        Ipv4Net::new(Ipv4Addr::from(addr as u32), self.subnet_len).unwrap_or(self.network)
    }

    /// Whether `subnet` is one this config hands out.
    pub fn allows(&self, subnet: Ipv4Net) -> bool {
        subnet.prefix_len() == self.subnet_len
            && subnet.network() == subnet.addr()
            && subnet.addr() >= self.subnet_min
            && subnet.addr() <= self.subnet_max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<NetworkConfig, ConfigError> {
        NetworkConfig::parse(s)
    }

    #[test]
    fn defaults_follow_flannel() {
        let c = parse(r#"{"Network":"10.244.0.0/16"}"#).unwrap();
        assert_eq!(c.subnet_len, 24);
        assert_eq!(c.subnet_min, "10.244.1.0".parse::<Ipv4Addr>().unwrap());
        assert_eq!(c.subnet_max, "10.244.255.0".parse::<Ipv4Addr>().unwrap());
        assert_eq!(c.backend.type_name(), "udp");
        assert_eq!(c.subnet_count(), 255);

        let small = parse(r#"{"Network":"10.10.0.0/26"}"#).unwrap();
        assert_eq!(small.subnet_len, 28);
        assert_eq!(small.subnet_min, "10.10.0.16".parse::<Ipv4Addr>().unwrap());
        assert_eq!(small.subnet_max, "10.10.0.48".parse::<Ipv4Addr>().unwrap());
    }

    #[test]
    fn keys_are_case_insensitive() {
        let c =
            parse(r#"{"network":"10.1.0.0/16","subnetlen":26,"backend":{"type":"vxlan","vni":4}}"#)
                .unwrap();
        assert_eq!(c.subnet_len, 26);
        assert_eq!(c.backend.type_name(), "vxlan");
        assert_eq!(c.backend.get("VNI"), Some(&Value::from(4)));
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("{", "config"),
            ("[]", "config"),
            (r#"{}"#, "Network"),
            (r#"{"Network":"banana"}"#, "Network"),
            (r#"{"Network":"10.0.0.0/29"}"#, "Network"),
            (r#"{"Network":"10.0.0.0/16","SubnetLen":31}"#, "SubnetLen"),
            (r#"{"Network":"10.0.0.0/16","SubnetLen":17}"#, "SubnetLen"),
            (r#"{"Network":"10.0.0.0/16","SubnetLen":"24"}"#, "SubnetLen"),
            (
                r#"{"Network":"10.0.0.0/16","SubnetMin":"10.1.0.0"}"#,
                "SubnetMin",
            ),
            (
                r#"{"Network":"10.0.0.0/16","SubnetMax":"10.0.3.7"}"#,
                "SubnetMax",
            ),
            (
                r#"{"Network":"10.0.0.0/16","SubnetMin":"10.0.9.0","SubnetMax":"10.0.3.0"}"#,
                "SubnetMin",
            ),
            (r#"{"Network":"10.0.0.0/16","Backend":"vxlan"}"#, "Backend"),
            (
                r#"{"Network":"10.0.0.0/16","EnableIPv6":true}"#,
                "EnableIPv6",
            ),
        ];
        for (text, key) in cases {
            let e = parse(text).expect_err(text);
            assert_eq!(e.key, key, "{text}: {e}");
        }
    }

    #[test]
    fn extreme_networks_compute_without_overflow() {
        let widest = parse(r#"{"Network":"10.0.0.0/8"}"#).unwrap();
        assert_eq!(widest.subnet_count(), (1 << 16) - 1);
        assert_eq!(
            widest.nth_subnet((1 << 16) - 2).to_string(),
            "10.255.255.0/24"
        );
        let top = parse(r#"{"Network":"255.255.255.240/28"}"#).unwrap();
        assert_eq!(top.subnet_len, 30);
        assert_eq!(top.subnet_count(), 3);
        assert_eq!(top.nth_subnet(2).to_string(), "255.255.255.252/30");
        let many = parse(r#"{"Network":"10.0.0.0/8","SubnetLen":30}"#).unwrap();
        assert_eq!(many.subnet_count(), (1 << 22) - 1);
    }

    #[test]
    fn a_network_wider_than_a_slash_8_is_refused() {
        for wide in ["0.0.0.0/0", "10.1.2.3/0", "0.0.0.0/1", "10.0.0.0/7"] {
            let e = parse(&format!(r#"{{"Network":"{wide}"}}"#)).expect_err(wide);
            assert_eq!(e.key, "Network", "{wide}: {e}");
            assert!(e.problem.contains("too large"), "{wide}: {e}");
        }
        assert!(parse(r#"{"Network":"10.0.0.0/8"}"#).is_ok());
    }

    #[test]
    fn backend_options_are_validated_with_the_rest() {
        let e = parse(r#"{"Network":"10.5.0.0/16","Backend":{"VNI":99999999,"Type":"vxlan"}}"#)
            .expect_err("VNI out of range");
        assert_eq!(e.key, "Backend");
        assert_eq!(
            e.to_string(),
            "Backend: invalid backend option VNI: want an integer from 0 to 16777215, got 99999999"
        );
        for bad in [
            r#"{"Network":"10.5.0.0/16","Backend":{"Type":"warp-drive"}}"#,
            r#"{"Network":"10.5.0.0/16","Backend":{"Type":"udp","Port":70000}}"#,
            r#"{"Network":"10.5.0.0/16","Backend":{"Type":"udp","MTU":67}}"#,
            r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan","DirectRouting":"yes"}}"#,
            r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan","MTU":20}}"#,
        ] {
            assert_eq!(parse(bad).expect_err(bad).key, "Backend", "{bad}");
        }
    }

    #[test]
    fn what_depends_on_the_underlay_is_checked_on_the_host() {
        let c = parse(r#"{"Network":"10.5.0.0/16","Backend":{"Type":"udp","MTU":8972}}"#)
            .expect("valid on some host");
        assert_eq!(c.check_on_host(9000), Ok(()));
        let e = c.check_on_host(1500).expect_err("too big for 1500");
        assert_eq!(e.key, "Backend");
        assert!(e.problem.contains("at most 1472"), "{e}");
    }

    #[test]
    fn weftd_and_weftctl_word_a_refusal_alike() {
        let e = NetworkConfig::parse_at(r#"{"Network":"10.0.0.0/16","SubnetLen":31}"#, "/p/config")
            .expect_err("invalid");
        assert_eq!(
            e.to_string(),
            "invalid network config at /p/config: SubnetLen: 31 is more than 30"
        );
    }

    #[test]
    fn the_last_spelling_of_a_key_wins_as_in_go() {
        let c = parse(r#"{"Network":"10.1.0.0/16","network":"10.2.0.0/16"}"#).unwrap();
        assert_eq!(c.network.to_string(), "10.2.0.0/16");
        // Exact duplicates too, wherever the other spellings stand.
        let c =
            parse(r#"{"Network":"10.1.0.0/16","NETWORK":"10.2.0.0/16","Network":"10.3.0.0/16"}"#)
                .unwrap();
        assert_eq!(c.network.to_string(), "10.3.0.0/16");
        // Inside Backend as well: the last VNI is the one validated and used.
        let c =
            parse(r#"{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan","VNI":99999999,"vni":7}}"#)
                .unwrap();
        assert_eq!(c.backend.get("VNI"), Some(&Value::from(7)));
        assert_eq!(c.backend.as_map().len(), 2, "one spelling per key");
        let e =
            parse(r#"{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan","vni":7,"VNI":99999999}}"#)
                .expect_err("the last VNI is out of range");
        assert_eq!(e.key, "Backend");
        // And a whole Backend object given twice.
        let c = parse(
            r#"{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan"},"backend":{"Type":"host-gw"}}"#,
        )
        .unwrap();
        assert_eq!(c.backend.type_name(), "host-gw");
    }

    #[test]
    fn deeply_nested_json_is_refused_without_exhausting_the_stack() {
        let deep = format!(
            r#"{{"Network":"10.1.0.0/16","Backend":{}{}}}"#,
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        assert_eq!(parse(&deep).expect_err("too deep").key, "config");
    }

    #[test]
    fn a_null_leaves_an_earlier_value_as_go_does() {
        let c = parse(r#"{"Network":"10.1.0.0/16","network":null,"SubnetLen":null}"#).unwrap();
        assert_eq!(c.network.to_string(), "10.1.0.0/16");
        assert_eq!(c.subnet_len, 24);
    }

    #[test]
    fn subnets_enumerate_min_to_max() {
        let c = parse(r#"{"Network":"10.10.0.0/22","SubnetLen":24}"#).unwrap();
        let all: Vec<String> = (0..c.subnet_count())
            .map(|i| c.nth_subnet(i).to_string())
            .collect();
        assert_eq!(all, ["10.10.1.0/24", "10.10.2.0/24", "10.10.3.0/24"]);
        assert!(c.allows("10.10.2.0/24".parse().unwrap()));
        assert!(!c.allows("10.10.0.0/24".parse().unwrap()));
        assert!(!c.allows("10.10.2.0/25".parse().unwrap()));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn value() -> impl Strategy<Value = String> {
            prop_oneof![
                Just("\"10.244.0.0/16\"".to_string()),
                "\"[0-9./]{0,20}\"",
                Just("24".to_string()),
                "-?[0-9]{1,12}",
                Just("null".to_string()),
                Just("true".to_string()),
                Just("{\"Type\":\"vxlan\",\"VNI\":99999999}".to_string()),
                Just("{\"Type\":\"udp\",\"MTU\":10}".to_string()),
                Just("{\"type\":\"host-gw\"}".to_string()),
                Just("[]".to_string()),
            ]
        }

        fn key() -> impl Strategy<Value = String> {
            prop_oneof![
                Just("Network".to_string()),
                Just("network".to_string()),
                Just("SubnetLen".to_string()),
                Just("SubnetMin".to_string()),
                Just("SubnetMax".to_string()),
                Just("Backend".to_string()),
                Just("BACKEND".to_string()),
                "[A-Za-z]{1,10}",
            ]
        }

        proptest! {
            /// Any text: a config or an error naming a key, never a panic.
            #[test]
            fn any_text_parses_or_is_refused(text in "\\PC{0,80}") {
                let _ = NetworkConfig::parse(&text);
            }

            /// Config-shaped objects with any members in any types and repeats: what is accepted
            /// is consistent (its subnets lie inside the network, at SubnetLen).
            #[test]
            fn accepted_configs_are_consistent(
                members in prop::collection::vec((key(), value()), 0..8)
            ) {
                let body: Vec<String> =
                    members.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
                let text = format!("{{{}}}", body.join(","));
                if let Ok(c) = NetworkConfig::parse(&text) {
                    prop_assert!(c.subnet_count() >= 1);
                    let first = c.nth_subnet(0);
                    prop_assert!(c.network.contains(&first));
                    prop_assert!(c.allows(first));
                }
            }
        }
    }
}
