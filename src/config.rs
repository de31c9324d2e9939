//! The cluster network config stored at `<prefix>/config`, with flannel's defaults and validation.
//! Keys are matched case-insensitively, as flannel's Go decoder does ("VNI" and "vni" both occur),
//! and when several spellings of one key occur the last one wins, as in Go.
//!
//! This is the one place a config is judged, backend options included: weftd waits on what it
//! refuses (rather than failing to build the backend again and again), and `weftctl config set`
//! refuses the same, with the same message.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
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

/// The shortest Network (and IPv6Network) prefix accepted. flannel refuses only 0.0.0.0/0 (to its
/// decoder the same as no Network at all); weft also refuses anything wider than 10.0.0.0/8, the
/// largest private range (for IPv6, fd00::/8, the unique-local one): such a network necessarily
/// spans public addresses, and the forward and masquerade rules written for it would then cover a
/// large part of the internet.
pub const MIN_NETWORK_PREFIX: u8 = 8;

/// A validated network config.
#[derive(Debug, Clone)]
pub struct NetworkConfig {
    pub network: Ipv4Net,
    pub subnet_len: u8,
    pub subnet_min: Ipv4Addr,
    pub subnet_max: Ipv4Addr,
    /// The IPv6 side, when `EnableIPv6` is true: every host then also leases an IPv6 subnet.
    pub ipv6: Option<Ipv6Pool>,
    pub backend: BackendConfig,
}

/// The IPv6 half of a dual-stack config: `IPv6Network`, `IPv6SubnetLen`, `IPv6SubnetMin`,
/// `IPv6SubnetMax`, with flannel's defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv6Pool {
    pub network: Ipv6Net,
    pub subnet_len: u8,
    pub subnet_min: Ipv6Addr,
    pub subnet_max: Ipv6Addr,
}

impl NetworkConfig {
    /// Whether `next` differs from this config in its IPv6 side alone (turned on, off, or
    /// another IPv6 network): the IPv4 lease and data plane can then stay.
    pub fn differs_only_in_ipv6(&self, next: &Self) -> bool {
        self.same_but_ipv6(next) && self.ipv6 != next.ipv6
    }

    /// Everything but the IPv6 side alike: the IPv4 network and its subnets, the backend.
    fn same_but_ipv6(&self, o: &Self) -> bool {
        self.network == o.network
            && self.subnet_len == o.subnet_len
            && self.subnet_min == o.subnet_min
            && self.subnet_max == o.subnet_max
            && self.backend.as_map() == o.backend.as_map()
    }
}

impl PartialEq for NetworkConfig {
    fn eq(&self, o: &Self) -> bool {
        self.same_but_ipv6(o) && self.ipv6 == o.ipv6
    }
}

/// The subnets one family's config hands out, [SubnetMin, SubnetMax] at SubnetLen, as numbers:
/// the same arithmetic serves IPv4 and IPv6 (whose ranges need all 128 bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    /// The family's address width: 32 or 128.
    pub bits: u8,
    pub subnet_len: u8,
    /// The first address of SubnetMin and of SubnetMax.
    pub min: u128,
    pub max: u128,
}

impl Range {
    /// Addresses per subnet, as a shift.
    pub fn shift(&self) -> u32 {
        u32::from(self.bits - self.subnet_len)
    }

    /// How many subnets the range holds (at least one).
    pub fn count(&self) -> u128 {
        ((self.max - self.min) >> self.shift()).saturating_add(1)
    }

    /// The first address of the `i`-th subnet (`i` below [`Range::count`]).
    pub fn nth(&self, i: u128) -> u128 {
        self.min + (i << self.shift())
    }

    /// The number of the subnet at first address `addr` inside the range.
    pub fn index_of(&self, addr: u128) -> u128 {
        addr.saturating_sub(self.min) >> self.shift()
    }

    /// The last address of the range (SubnetMax's last).
    pub fn last(&self) -> u128 {
        self.max | (low_bits(self.shift()))
    }

    /// Whether the subnet at `addr`/`len` is one the range hands out.
    pub fn allows(&self, addr: u128, len: u8) -> bool {
        len == self.subnet_len
            && addr & low_bits(self.shift()) == 0
            && (self.min..=self.max).contains(&addr)
    }
}

/// A mask of the `n` low bits.
fn low_bits(n: u32) -> u128 {
    1u128.checked_shl(n).map_or(u128::MAX, |b| b - 1)
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

/// What differs between the families' keys and limits; the rules are one.
struct Family {
    name: &'static str,
    bits: u8,
    network: &'static str,
    subnet_len: &'static str,
    subnet_min: &'static str,
    subnet_max: &'static str,
    /// The longest network prefix: room for four subnets of four addresses.
    max_prefix: u8,
    /// The default SubnetLen for networks up to `roomy` long; longer ones get prefix + 2.
    roomy: u8,
    default_len: u8,
}

const V4: Family = Family {
    name: "IPv4",
    bits: 32,
    network: "Network",
    subnet_len: "SubnetLen",
    subnet_min: "SubnetMin",
    subnet_max: "SubnetMax",
    max_prefix: 28,
    roomy: 22,
    default_len: 24,
};

const V6: Family = Family {
    name: "IPv6",
    bits: 128,
    network: "IPv6Network",
    subnet_len: "IPv6SubnetLen",
    subnet_min: "IPv6SubnetMin",
    subnet_max: "IPv6SubnetMax",
    max_prefix: 124,
    roomy: 62,
    default_len: 64,
};

fn to_bits(a: IpAddr) -> u128 {
    match a {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

fn from_bits(fam: &Family, n: u128) -> IpAddr {
    if fam.bits == 32 {
        IpAddr::V4(Ipv4Addr::from(n as u32))
    } else {
        IpAddr::V6(Ipv6Addr::from(n))
    }
}

impl Family {
    fn of(&self, a: IpAddr) -> bool {
        a.is_ipv4() == (self.bits == 32)
    }

    /// Parses one address of this family.
    fn addr(
        &self,
        obj: &Map<String, Value>,
        key: &'static str,
    ) -> Result<Option<IpAddr>, ConfigError> {
        let Some(s) = string_field(obj, key)? else {
            return Ok(None);
        };
        match s.parse::<IpAddr>() {
            Ok(a) if self.of(a) => Ok(Some(a)),
            _ => Err(err(key, format!("{s:?} is not an {} address", self.name))),
        }
    }
}

/// The network (masked, as Go's ParseCIDR does and so flannel), SubnetLen and range of one
/// family, validated alike for both.
fn parse_family(obj: &Map<String, Value>, fam: &Family) -> Result<(IpNet, Range), ConfigError> {
    let key = fam.network;
    let text = string_field(obj, key)?.ok_or_else(|| {
        let e = if fam.bits == 32 {
            "\"10.244.0.0/16\""
        } else {
            "\"fd00:10:244::/56\""
        };
        err(key, format!("missing (e.g. {e})"))
    })?;
    let network: IpNet = match text.parse::<IpNet>() {
        Ok(n) if fam.of(n.addr()) => n.trunc(),
        _ => return Err(err(key, format!("{text:?} is not an {} CIDR", fam.name))),
    };
    let prefix = network.prefix_len();
    if prefix < MIN_NETWORK_PREFIX {
        return Err(err(
            key,
            format!(
                "{network} is too large: the prefix must be /{MIN_NETWORK_PREFIX} or longer \
                 (a wider network spans public addresses, and the forward and masquerade \
                 rules would cover them)"
            ),
        ));
    }
    if prefix > fam.max_prefix {
        return Err(err(
            key,
            format!(
                "{network} is too small: the prefix must be /{} or shorter",
                fam.max_prefix
            ),
        ));
    }
    if let IpNet::V6(n) = network {
        check_v6_network(n)?;
    }

    let subnet_len = match field(obj, fam.subnet_len) {
        None if prefix <= fam.roomy => fam.default_len,
        None => prefix + 2,
        Some(v) => {
            let n = v
                .as_u64()
                .ok_or_else(|| err(fam.subnet_len, format!("expected a number, found {v}")))?;
            if n > u64::from(fam.max_prefix + 2) {
                return Err(err(
                    fam.subnet_len,
                    format!("{n} is more than {}", fam.max_prefix + 2),
                ));
            }
            n as u8
        }
    };
    if subnet_len < prefix + 2 {
        return Err(err(
            fam.subnet_len,
            format!(
                "{subnet_len} leaves room for fewer than 4 subnets in {network} \
                 (it must be at least {})",
                prefix + 2
            ),
        ));
    }

    let shift = u32::from(fam.bits - subnet_len);
    let first = to_bits(network.network());
    let last = to_bits(network.broadcast()) & !low_bits(shift);
    let min = fam
        .addr(obj, fam.subnet_min)?
        .map_or(first + (1 << shift), to_bits);
    let max = fam.addr(obj, fam.subnet_max)?.map_or(last, to_bits);
    for (key, n) in [(fam.subnet_min, min), (fam.subnet_max, max)] {
        let addr = from_bits(fam, n);
        if !network.contains(&addr) {
            return Err(err(
                key,
                format!("{addr} is not inside {} {network}", fam.network),
            ));
        }
        if n & low_bits(shift) != 0 {
            return Err(err(
                key,
                format!(
                    "{addr} is not on a /{subnet_len} boundary ({})",
                    fam.subnet_len
                ),
            ));
        }
    }
    if min > max {
        return Err(err(
            fam.subnet_min,
            format!(
                "{} is above {} {}",
                from_bits(fam, min),
                fam.subnet_max,
                from_bits(fam, max)
            ),
        ));
    }
    let range = Range {
        bits: fam.bits,
        subnet_len,
        min,
        max,
    };
    Ok((network, range))
}

/// An IPv6Network must be one pods can be addressed from: not multicast, link-local, loopback,
/// IPv4-mapped or -compatible space (whose text form would not even round-trip in flannel's keys).
fn check_v6_network(n: Ipv6Net) -> Result<(), ConfigError> {
    let special: [(&str, &str); 4] = [
        ("ff00::/8", "multicast"),
        ("fe80::/10", "link-local"),
        ("::ffff:0:0/96", "IPv4-mapped"),
        ("::/96", "IPv4-compatible or loopback"),
    ];
    for (space, what) in special {
        let space: Ipv6Net = space.parse().unwrap_or_default();
        if space.contains(&n.network()) || n.contains(&space.network()) {
            return Err(err(
                "IPv6Network",
                format!("{n} overlaps {what} space ({space})"),
            ));
        }
    }
    Ok(())
}

/// An IPv4 address from its number in a [`Range`].
fn v4(n: u128) -> Ipv4Addr {
    Ipv4Addr::from(n as u32)
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
            return Err(err(
                "EnableIPv4",
                "IPv6-only networks are not supported (flannel leases them only from \
                 Kubernetes; weft not yet)",
            ));
        }
        let enable_ipv6 = match field(&obj, "EnableIPv6") {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(v) => {
                return Err(err(
                    "EnableIPv6",
                    format!("expected true or false, found {v}"),
                ))
            }
        };

        // parse_family gives a network of the family asked for.
        let (IpNet::V4(network), r4) = parse_family(&obj, &V4)? else {
            return Err(err("Network", "not an IPv4 CIDR"));
        };
        let backend = parse_backend(&obj)?;
        if enable_ipv6 {
            check_dual_stack(&backend)?;
        }
        let ipv6 = if enable_ipv6 {
            let (IpNet::V6(network), r6) = parse_family(&obj, &V6)? else {
                return Err(err("IPv6Network", "not an IPv6 CIDR"));
            };
            Some(Ipv6Pool {
                network,
                subnet_len: r6.subnet_len,
                subnet_min: Ipv6Addr::from(r6.min),
                subnet_max: Ipv6Addr::from(r6.max),
            })
        } else {
            None
        };

        Ok(Self {
            network,
            subnet_len: r4.subnet_len,
            subnet_min: v4(r4.min),
            subnet_max: v4(r4.max),
            ipv6,
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

    /// The IPv4 subnets handed out, as numbers.
    pub fn range(&self) -> Range {
        Range {
            bits: 32,
            subnet_len: self.subnet_len,
            min: u128::from(u32::from(self.subnet_min)),
            max: u128::from(u32::from(self.subnet_max)),
        }
    }

    /// How many subnets [SubnetMin, SubnetMax] holds.
    pub fn subnet_count(&self) -> u64 {
        self.range().count() as u64
    }

    /// The `i`-th subnet of [SubnetMin, SubnetMax].
    pub fn nth_subnet(&self, i: u64) -> Ipv4Net {
        let addr = v4(self.range().nth(u128::from(i)));
        // In range by construction: i < subnet_count().
        Ipv4Net::new(addr, self.subnet_len).unwrap_or(self.network)
    }

    /// Whether `subnet` is one this config hands out.
    pub fn allows(&self, subnet: Ipv4Net) -> bool {
        (self.range()).allows(u128::from(u32::from(subnet.addr())), subnet.prefix_len())
    }

    /// What a lease must hold under this config, for messages: "/24 subnets in
    /// 10.10.1.0..10.10.255.0" and the IPv6 side's, or that it has none.
    pub fn wanted(&self) -> String {
        let v4 = format!(
            "/{} subnets in {}..{}",
            self.subnet_len, self.subnet_min, self.subnet_max
        );
        match self.ipv6 {
            None => format!("{v4} and no IPv6 subnet"),
            Some(p) => format!(
                "{v4} with /{} IPv6 subnets in {}..{}",
                p.subnet_len, p.subnet_min, p.subnet_max
            ),
        }
    }

    /// Whether `subnet` is the IPv6 half a lease must have under this config: one the IPv6 side
    /// hands out, or none when the network is IPv4 only.
    pub fn allows_v6(&self, subnet: Option<Ipv6Net>) -> bool {
        match (self.ipv6, subnet) {
            (None, None) => true,
            (Some(p), Some(s)) => p.range().allows(u128::from(s.addr()), s.prefix_len()),
            _ => false,
        }
    }
}

impl Ipv6Pool {
    /// The IPv6 subnets handed out, as numbers.
    pub fn range(&self) -> Range {
        Range {
            bits: 128,
            subnet_len: self.subnet_len,
            min: u128::from(self.subnet_min),
            max: u128::from(self.subnet_max),
        }
    }

    /// The subnet at the first address `addr` (a number of [`Ipv6Pool::range`]).
    pub fn subnet_at(&self, addr: u128) -> Ipv6Net {
        Ipv6Net::new(Ipv6Addr::from(addr), self.subnet_len).unwrap_or(self.network)
    }
}

/// A dual-stack config needs a backend that carries IPv6.
fn check_dual_stack(backend: &BackendConfig) -> Result<(), ConfigError> {
    let name = backend.type_name();
    match weft_backends::kind(&name) {
        Some(k) if !k.dual_stack => Err(err(
            "EnableIPv6",
            format!("the {name} backend carries IPv4 only"),
        )),
        _ => Ok(()),
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

    fn dual(extra: &str) -> Result<NetworkConfig, ConfigError> {
        parse(&format!(
            r#"{{"Network":"10.244.0.0/16","EnableIPv6":true,"Backend":{{"Type":"alloc"}}{extra}}}"#
        ))
    }

    #[test]
    fn the_ipv6_side_has_flannels_defaults() {
        let c = dual(r#","IPv6Network":"fd00:10:244::/56""#).unwrap();
        let v6 = c.ipv6.expect("dual-stack");
        assert_eq!(v6.network.to_string(), "fd00:10:244::/56");
        assert_eq!(v6.subnet_len, 64, "/64 for networks of /62 or wider");
        assert_eq!(
            v6.subnet_min.to_string(),
            "fd00:10:244:1::",
            "the first is skipped"
        );
        assert_eq!(v6.subnet_max.to_string(), "fd00:10:244:ff::");
        assert_eq!(v6.range().count(), 255);
        assert_eq!(c.subnet_len, 24, "the IPv4 side is unchanged");

        let small = dual(r#","IPv6Network":"fd00::100/120""#)
            .unwrap()
            .ipv6
            .unwrap();
        assert_eq!(small.subnet_len, 122, "prefix + 2 past /62");
        assert_eq!(small.subnet_min.to_string(), "fd00::140");
        assert_eq!(small.subnet_max.to_string(), "fd00::1c0");

        let keys = dual(
            r#","ipv6network":"fd00:1::/48","IPV6SUBNETLEN":80,"ipv6SubnetMin":"fd00:1:0:5::","IPv6SubnetMax":"fd00:1:0:9::""#,
        )
        .unwrap()
        .ipv6
        .unwrap();
        assert_eq!(keys.subnet_len, 80, "keys are case-insensitive");
        assert_eq!(keys.range().count(), (4 << 16) + 1);
    }

    #[test]
    fn ipv6_is_off_unless_enabled_and_then_needs_a_network() {
        let c = parse(r#"{"Network":"10.244.0.0/16","IPv6Network":"not even an address"}"#)
            .expect("IPv6 keys are ignored while EnableIPv6 is not true, as in flannel");
        assert_eq!(c.ipv6, None);
        assert!(c.allows_v6(None));
        assert!(!c.allows_v6(Some("fd00::/64".parse().unwrap())));
        assert_eq!(dual("").unwrap_err().key, "IPv6Network");
    }

    #[test]
    fn ipv6_errors_name_the_key() {
        let cases = [
            (r#","IPv6Network":"10.1.0.0/16""#, "IPv6Network"),
            (r#","IPv6Network":"fd00::/7""#, "IPv6Network"),
            (r#","IPv6Network":"fd00::/125""#, "IPv6Network"),
            (r#","IPv6Network":"ff05::/16""#, "IPv6Network"),
            (r#","IPv6Network":"fe80::/64""#, "IPv6Network"),
            (r#","IPv6Network":"::ffff:10.0.0.0/104""#, "IPv6Network"),
            (r#","IPv6Network":"::/8""#, "IPv6Network"),
            (
                r#","IPv6Network":"fd00::/48","IPv6SubnetLen":127"#,
                "IPv6SubnetLen",
            ),
            (
                r#","IPv6Network":"fd00::/48","IPv6SubnetLen":49"#,
                "IPv6SubnetLen",
            ),
            (
                r#","IPv6Network":"fd00::/48","IPv6SubnetLen":"64""#,
                "IPv6SubnetLen",
            ),
            (
                r#","IPv6Network":"fd00::/48","IPv6SubnetMin":"fd01::""#,
                "IPv6SubnetMin",
            ),
            (
                r#","IPv6Network":"fd00::/48","IPv6SubnetMin":"10.0.0.0""#,
                "IPv6SubnetMin",
            ),
            (
                r#","IPv6Network":"fd00::/48","IPv6SubnetMax":"fd00:0:0:3::1""#,
                "IPv6SubnetMax",
            ),
            (
                r#","IPv6Network":"fd00::/48","IPv6SubnetMin":"fd00:0:0:9::","IPv6SubnetMax":"fd00:0:0:3::""#,
                "IPv6SubnetMin",
            ),
        ];
        for (extra, key) in cases {
            let e = dual(extra).expect_err(extra);
            assert_eq!(e.key, key, "{extra}: {e}");
        }
        let e = parse(r#"{"Network":"10.0.0.0/16","EnableIPv6":"yes"}"#).unwrap_err();
        assert_eq!(e.key, "EnableIPv6");
    }

    #[test]
    fn a_change_of_the_ipv6_side_alone_is_told_apart() {
        let c = |s: &str| parse(s).expect("valid");
        let v4 = c(r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}"#);
        let dual = c(
            r#"{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:5::/48","Backend":{"Type":"vxlan"}}"#,
        );
        let other6 = c(
            r#"{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:6::/48","Backend":{"Type":"vxlan"}}"#,
        );
        assert!(v4.differs_only_in_ipv6(&dual) && dual.differs_only_in_ipv6(&v4));
        assert!(dual.differs_only_in_ipv6(&other6));
        assert!(!dual.differs_only_in_ipv6(&dual), "no change at all");
        for not_alone in [
            r#"{"Network":"10.6.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:5::/48","Backend":{"Type":"vxlan"}}"#,
            r#"{"Network":"10.5.0.0/16","SubnetLen":25,"Backend":{"Type":"vxlan"}}"#,
            r#"{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:5::/48","Backend":{"Type":"vxlan","VNI":2}}"#,
            r#"{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:5::/48","Backend":{"Type":"host-gw"}}"#,
        ] {
            assert!(!v4.differs_only_in_ipv6(&c(not_alone)), "{not_alone}");
        }
    }

    #[test]
    fn a_backend_that_carries_only_ipv4_refuses_dual_stack() {
        for backend in [r#""#, r#","Backend":{"Type":"udp"}"#] {
            let text = format!(
                r#"{{"Network":"10.0.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/48"{backend}}}"#
            );
            let e = parse(&text).expect_err(&text);
            assert_eq!(
                e.to_string(),
                "EnableIPv6: the udp backend carries IPv4 only"
            );
        }
        let e = parse(r#"{"Network":"10.0.0.0/16","EnableIPv4":false}"#).unwrap_err();
        assert_eq!(e.key, "EnableIPv4");
    }

    #[test]
    fn the_widest_ipv6_ranges_compute_without_overflow() {
        let v6 = dual(r#","IPv6Network":"fd00::/8","IPv6SubnetLen":126"#)
            .unwrap()
            .ipv6
            .unwrap();
        let r = v6.range();
        assert_eq!(r.count(), (1u128 << 118) - 1);
        assert_eq!(
            v6.subnet_at(r.nth(r.count() - 1)).to_string(),
            "fdff:ffff:ffff:ffff:ffff:ffff:ffff:fffc/126"
        );
        assert_eq!(
            r.last(),
            u128::from(
                "fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
                    .parse::<Ipv6Addr>()
                    .unwrap()
            )
        );
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn value() -> impl Strategy<Value = String> {
            prop_oneof![
                Just("\"10.244.0.0/16\"".to_string()),
                Just("\"fd00:10::/48\"".to_string()),
                Just("\"fd00:10:0:7::\"".to_string()),
                "\"fd00:[0-9a-f:]{0,12}/[0-9]{1,3}\"",
                Just("64".to_string()),
                Just("{\"type\":\"alloc\"}".to_string()),
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
                Just("EnableIPv6".to_string()),
                Just("IPv6Network".to_string()),
                Just("IPv6SubnetLen".to_string()),
                Just("IPv6SubnetMin".to_string()),
                Just("IPv6SubnetMax".to_string()),
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
                    if let Some(v6) = c.ipv6 {
                        let r = v6.range();
                        prop_assert!(r.count() >= 1);
                        for i in [0, r.count() - 1] {
                            let s = v6.subnet_at(r.nth(i));
                            prop_assert!(v6.network.contains(&s), "{} in {}", s, v6.network);
                            prop_assert!(c.allows_v6(Some(s)));
                        }
                    }
                }
            }
        }
    }
}
