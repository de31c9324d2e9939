//! weft-cni's network config (flannel's plugin's keys) and the delegate config rendered from it
//! and the node's lease.
//!
//! Keys are matched as flannel's Go decoder matches them: the exact name first, else ignoring
//! case ("subnetFile", "SubnetFile"). The delegate is refused when it holds `name` or `ipam` in
//! any case, since the delegate plugin would read either spelling and weft-cni sets both.

use std::net::IpAddr;
use std::path::PathBuf;

use ipnet::IpNet;
use serde_json::{json, Map, Value};

use super::error::{code, CniError};
use super::lease::NodeLease;
use super::version;

pub const DEFAULT_SUBNET_FILE: &str = "/run/flannel/subnet.env";
pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/weft";

/// The config a runtime hands weft-cni on stdin.
#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    /// One of [`version::SUPPORTED`].
    pub cni_version: &'static str,
    pub name: String,
    pub subnet_file: PathBuf,
    pub data_dir: PathBuf,
    /// The delegate's own keys (bridge options such as `hairpinMode`).
    pub delegate: Map<String, Value>,
    /// flannel's `ipam` key: extra host-local options and routes for the delegate's IPAM.
    pub ipam: Map<String, Value>,
    pub runtime_config: Option<Value>,
    pub prev_result: Option<Value>,
    /// The whole input, for keys only some commands read (GC's valid attachments).
    pub raw: Map<String, Value>,
}

/// `key` in `m`: the exact spelling first, else any spelling that differs only in case.
pub fn get_ci<'a>(m: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    m.get(key).or_else(|| {
        m.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v)
    })
}

fn invalid(msg: impl Into<String>) -> CniError {
    CniError::new(code::INVALID_CONFIG, msg)
}

/// A network name as the spec allows it: alphanumeric first, then alphanumerics, `_`, `.`, `-`.
pub fn valid_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

impl NetConf {
    /// Parses stdin. Never panics, whatever the bytes.
    pub fn parse(stdin: &[u8]) -> Result<Self, CniError> {
        let raw: Map<String, Value> = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(
                code::DECODE_FAILURE,
                format!("network config is not a JSON object: {e}"),
            )
        })?;
        let string = |key: &str| -> Result<Option<String>, CniError> {
            match get_ci(&raw, key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(v) => Err(invalid(format!("{key} must be a string, not {v}"))),
            }
        };
        let object = |key: &str| -> Result<Map<String, Value>, CniError> {
            match get_ci(&raw, key) {
                None | Some(Value::Null) => Ok(Map::new()),
                Some(Value::Object(m)) => Ok(m.clone()),
                Some(v) => Err(invalid(format!("{key} must be an object, not {v}"))),
            }
        };
        let cni_version = version::check_supported(string("cniVersion")?.as_deref())?;
        let name = string("name")?.unwrap_or_default();
        if !valid_name(&name) {
            return Err(invalid(format!("invalid network name {name:?}")));
        }
        let path = |key: &str, default: &str| -> Result<PathBuf, CniError> {
            Ok(PathBuf::from(
                string(key)?
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| default.to_string()),
            ))
        };
        Ok(Self {
            cni_version,
            name,
            subnet_file: path("subnetFile", DEFAULT_SUBNET_FILE)?,
            data_dir: path("dataDir", DEFAULT_DATA_DIR)?,
            delegate: object("delegate")?,
            ipam: object("ipam")?,
            runtime_config: get_ci(&raw, "runtimeConfig").cloned(),
            prev_result: get_ci(&raw, "prevResult").filter(|v| !v.is_null()).cloned(),
            raw,
        })
    }

    /// The delegate's plugin type (`bridge` unless the delegate says otherwise): a file name
    /// looked up on CNI_PATH.
    pub fn delegate_type(&self) -> Result<String, CniError> {
        match get_ci(&self.delegate, "type") {
            None => Ok("bridge".into()),
            Some(Value::String(t))
                if !t.is_empty() && !t.contains('/') && t != "." && t != ".." =>
            {
                Ok(t.clone())
            }
            Some(v) => Err(invalid(format!(
                "delegate.type must be a plugin file name, not {v}"
            ))),
        }
    }

    /// The config the delegate gets: the delegate's keys, defaults from the lease where the
    /// delegate sets none (mtu = FLANNEL_MTU, ipMasq = !FLANNEL_IPMASQ, isGateway for bridge),
    /// and an IPAM section whose ranges are the lease and whose routes are `ipam.routes` plus
    /// one per cluster network. `delegate_version` is the version to speak to the delegate.
    pub fn render_delegate(
        &self,
        lease: &NodeLease,
        delegate_version: &str,
    ) -> Result<Map<String, Value>, CniError> {
        for key in ["name", "ipam"] {
            if get_ci(&self.delegate, key).is_some() {
                return Err(invalid(format!(
                    "delegate must not have {key:?}: weft-cni sets it"
                )));
            }
        }
        let kind = self.delegate_type()?;
        let mut out = Map::new();
        out.insert("cniVersion".into(), json!(delegate_version));
        out.insert("name".into(), json!(self.name));
        out.insert("type".into(), json!(kind));
        // The version is the protocol's, not the delegate's to choose (flannel overwrites it too).
        for (k, v) in &self.delegate {
            if !k.eq_ignore_ascii_case("type") && !k.eq_ignore_ascii_case("cniVersion") {
                out.insert(k.clone(), v.clone());
            }
        }
        let mut default = |key: &str, value: Value| {
            if get_ci(&out, key).is_none() {
                out.insert(key.into(), value);
            }
        };
        default("mtu", json!(lease.mtu));
        default("ipMasq", json!(!lease.ip_masq));
        if kind == "bridge" {
            default("isGateway", json!(true));
        }
        if let Some(rc) = &self.runtime_config {
            out.insert("runtimeConfig".into(), rc.clone());
        }
        out.insert("ipam".into(), Value::Object(self.render_ipam(lease)?));
        Ok(out)
    }

    fn render_ipam(&self, lease: &NodeLease) -> Result<Map<String, Value>, CniError> {
        for key in ["ranges", "subnet"] {
            if get_ci(&self.ipam, key).is_some() {
                return Err(invalid(format!(
                    "ipam must not have {key:?}: the range is this node's lease (subnet.env)"
                )));
            }
        }
        let mut ipam = Map::new();
        ipam.insert("type".into(), json!("host-local"));
        for (k, v) in &self.ipam {
            if !k.eq_ignore_ascii_case("routes") {
                ipam.insert(k.clone(), v.clone());
            }
        }
        let ranges: Vec<Value> = lease
            .subnets
            .iter()
            .zip(&lease.gateways)
            .map(|(s, g)| json!([{"subnet": s.to_string(), "gateway": g.to_string()}]))
            .collect();
        ipam.insert("ranges".into(), Value::Array(ranges));

        let mut routes = match get_ci(&self.ipam, "routes") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(r)) => r.clone(),
            Some(v) => return Err(invalid(format!("ipam.routes must be a list, not {v}"))),
        };
        let mut have = Vec::new();
        for r in &routes {
            let dst = r
                .get("dst")
                .and_then(Value::as_str)
                .and_then(|d| d.parse::<IpNet>().ok())
                .ok_or_else(|| invalid(format!("ipam.routes: {r} has no valid \"dst\"")))?;
            have.push(dst.trunc());
        }
        // With the gateway spelled out: bridge's CHECK looks a route up by destination *and*
        // gateway, so a route without one in the result never matches the route in the pod.
        for n in &lease.networks {
            if !have.contains(n) {
                routes.push(match lease.gateway_for(n.addr()) {
                    Some(gw) => json!({"dst": n.to_string(), "gw": gw.to_string()}),
                    None => json!({"dst": n.to_string()}),
                });
            }
        }
        ipam.insert("routes".into(), Value::Array(routes));
        Ok(ipam)
    }

    /// GC's still-valid attachments, as (container id, interface name).
    pub fn valid_attachments(&self) -> Result<Vec<(String, String)>, CniError> {
        // Missing is not "none valid": reading it so would DEL every attachment.
        let list = match self.raw.get("cni.dev/valid-attachments") {
            None | Some(Value::Null) => {
                return Err(invalid("GC needs cni.dev/valid-attachments"));
            }
            Some(Value::Array(l)) => l,
            Some(v) => {
                return Err(invalid(format!(
                    "cni.dev/valid-attachments must be a list, not {v}"
                )))
            }
        };
        list.iter()
            .map(|a| {
                let field = |k: &str| a.get(k).and_then(Value::as_str).map(str::to_string);
                field("containerID")
                    .zip(field("ifname"))
                    .ok_or_else(|| invalid(format!("cni.dev/valid-attachments: bad entry {a}")))
            })
            .collect()
    }
}

/// The addresses a result lists (`ips[].address`), for CHECK. Entries that do not parse are
/// returned as errors rather than skipped: a CHECK must not pass on a result it cannot read.
pub fn result_addresses(result: &Value) -> Result<Vec<IpAddr>, CniError> {
    let ips = result
        .get("ips")
        .and_then(Value::as_array)
        .ok_or_else(|| invalid("prevResult has no \"ips\" list"))?;
    ips.iter()
        .map(|ip| {
            ip.get("address")
                .and_then(Value::as_str)
                .and_then(|a| a.parse::<IpNet>().ok())
                .map(|n| n.addr())
                .ok_or_else(|| invalid(format!("prevResult: bad address entry {ip}")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::subnet_env::parse_vars;

    fn lease(masq: bool) -> NodeLease {
        NodeLease::from_vars(&parse_vars(&format!(
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.52.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ={masq}\n"
        )))
        .unwrap()
    }

    fn conf(json: Value) -> Result<NetConf, CniError> {
        NetConf::parse(json.to_string().as_bytes())
    }

    /// The conflist's first plugin as libcni hands it over.
    fn kube_flannel_style() -> NetConf {
        conf(json!({
            "cniVersion": "1.0.0", "name": "cbr0", "type": "weft-cni",
            "delegate": {"hairpinMode": true, "isDefaultGateway": true}
        }))
        .unwrap()
    }

    #[test]
    fn defaults_are_flannels_paths_with_weft_s_data_dir() {
        let c = kube_flannel_style();
        assert_eq!(c.subnet_file, PathBuf::from("/run/flannel/subnet.env"));
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/cni/weft"));
        assert_eq!(c.cni_version, "1.0.0");
    }

    #[test]
    fn renders_bridge_with_host_local_over_the_lease() {
        let d = kube_flannel_style()
            .render_delegate(&lease(false), "1.0.0")
            .unwrap();
        assert_eq!(
            Value::Object(d),
            json!({
                "cniVersion": "1.0.0",
                "name": "cbr0",
                "type": "bridge",
                "hairpinMode": true,
                "isDefaultGateway": true,
                "mtu": 1450,
                "ipMasq": true,
                "isGateway": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": "10.244.52.0/24", "gateway": "10.244.52.1"}]],
                    "routes": [{"dst": "10.244.0.0/16", "gw": "10.244.52.1"}]
                }
            })
        );
    }

    #[test]
    fn ip_masq_is_the_inverse_of_flannel_ipmasq() {
        let d = kube_flannel_style()
            .render_delegate(&lease(true), "1.0.0")
            .unwrap();
        assert_eq!(d["ipMasq"], json!(false));
    }

    #[test]
    fn the_delegates_own_settings_win_and_other_types_get_no_is_gateway() {
        let c = conf(json!({
            "cniVersion": "0.3.1", "name": "n",
            "delegate": {"type": "ipvlan", "MTU": 1400, "ipMasq": false, "master": "eth0"}
        }))
        .unwrap();
        let d = c.render_delegate(&lease(false), "0.3.1").unwrap();
        assert_eq!(d["type"], "ipvlan");
        assert_eq!(d["MTU"], 1400);
        assert!(d.get("mtu").is_none(), "no second spelling of mtu");
        assert_eq!(d["ipMasq"], false);
        assert!(d.get("isGateway").is_none());
        assert_eq!(d["master"], "eth0");
    }

    #[test]
    fn top_level_ipam_adds_host_local_options_and_routes_before_the_networks() {
        let c = conf(json!({
            "cniVersion": "1.0.0", "name": "n",
            "ipam": {"dataDir": "/tmp/x", "routes": [{"dst": "192.168.0.0/16"}, {"dst": "10.244.0.0/16"}]}
        }))
        .unwrap();
        let d = c.render_delegate(&lease(false), "1.0.0").unwrap();
        assert_eq!(d["ipam"]["dataDir"], "/tmp/x");
        assert_eq!(
            d["ipam"]["routes"],
            json!([{"dst": "192.168.0.0/16"}, {"dst": "10.244.0.0/16"}]),
            "a network already routed is not added twice"
        );
    }

    #[test]
    fn dual_stack_gets_a_range_and_a_route_per_family() {
        let l = NodeLease::from_vars(&parse_vars(
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.52.1/24\n\
             FLANNEL_IPV6_NETWORK=fc00::/48\nFLANNEL_IPV6_SUBNET=fc00:0:0:3::1/64\n\
             FLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
        ))
        .unwrap();
        let d = kube_flannel_style().render_delegate(&l, "1.0.0").unwrap();
        assert_eq!(
            d["ipam"]["ranges"],
            json!([
                [{"subnet": "10.244.52.0/24", "gateway": "10.244.52.1"}],
                [{"subnet": "fc00:0:0:3::/64", "gateway": "fc00:0:0:3::1"}]
            ])
        );
        assert_eq!(
            d["ipam"]["routes"],
            json!([
                {"dst": "10.244.0.0/16", "gw": "10.244.52.1"},
                {"dst": "fc00::/48", "gw": "fc00:0:0:3::1"}
            ])
        );
    }

    #[test]
    fn runtime_config_is_passed_to_the_delegate() {
        let c = conf(json!({
            "cniVersion": "1.0.0", "name": "n",
            "runtimeConfig": {"bandwidth": {"ingressRate": 1}}
        }))
        .unwrap();
        let d = c.render_delegate(&lease(false), "1.0.0").unwrap();
        assert_eq!(d["runtimeConfig"], json!({"bandwidth": {"ingressRate": 1}}));
    }

    #[test]
    fn a_delegate_with_name_or_ipam_is_refused() {
        for (key, v) in [
            ("name", json!("x")),
            ("ipam", json!({})),
            ("IPAM", json!({})),
        ] {
            let c =
                conf(json!({"cniVersion": "1.0.0", "name": "n", "delegate": {key: v}})).unwrap();
            let e = c.render_delegate(&lease(false), "1.0.0").unwrap_err();
            assert_eq!(e.code, code::INVALID_CONFIG);
            assert!(e.msg.contains(&key.to_lowercase()), "{e:?}");
        }
    }

    #[test]
    fn the_delegate_speaks_the_negotiated_version_whatever_it_says() {
        let c =
            conf(json!({"cniVersion": "1.1.0", "name": "n", "delegate": {"cniVersion": "0.4.0"}}))
                .unwrap();
        let d = c.render_delegate(&lease(false), "1.0.0").unwrap();
        assert_eq!(d["cniVersion"], "1.0.0");
    }

    #[test]
    fn bad_shapes_are_invalid_config_errors() {
        let bad = [
            json!({"cniVersion": "1.0.0", "name": "n", "delegate": {"type": 5}}),
            json!({"cniVersion": "1.0.0", "name": "n", "delegate": {"type": "../sh"}}),
            json!({"cniVersion": "1.0.0", "name": "n", "ipam": {"ranges": []}}),
            json!({"cniVersion": "1.0.0", "name": "n", "ipam": {"routes": {}}}),
            json!({"cniVersion": "1.0.0", "name": "n", "ipam": {"routes": [{"gw": "1.2.3.4"}]}}),
        ];
        for b in bad {
            let e = conf(b.clone())
                .and_then(|c| c.render_delegate(&lease(false), "1.0.0"))
                .unwrap_err();
            assert_eq!(e.code, code::INVALID_CONFIG, "{b}: {e:?}");
        }
        for b in [
            json!({"cniVersion": "1.0.0", "name": "n", "delegate": []}),
            json!({"cniVersion": "1.0.0", "name": "n", "subnetFile": 1}),
            json!({"cniVersion": "1.0.0"}),
            json!({"cniVersion": "1.0.0", "name": "-x"}),
        ] {
            assert_eq!(
                conf(b.clone()).unwrap_err().code,
                code::INVALID_CONFIG,
                "{b}"
            );
        }
        assert_eq!(
            NetConf::parse(b"[1]").unwrap_err().code,
            code::DECODE_FAILURE
        );
        assert_eq!(NetConf::parse(b"{").unwrap_err().code, code::DECODE_FAILURE);
    }

    #[test]
    fn keys_match_case_insensitively_as_flannels_decoder_does() {
        let c = conf(json!({
            "CNIVersion": "0.4.0", "Name": "n", "SubnetFile": "/a", "datadir": "/b",
            "Delegate": {"hairpinMode": true}
        }))
        .unwrap();
        assert_eq!(c.cni_version, "0.4.0");
        assert_eq!(c.subnet_file, PathBuf::from("/a"));
        assert_eq!(c.data_dir, PathBuf::from("/b"));
        assert_eq!(c.delegate["hairpinMode"], true);
    }

    #[test]
    fn reads_gc_attachments_and_result_addresses() {
        let c = conf(json!({
            "cniVersion": "1.1.0", "name": "n",
            "cni.dev/valid-attachments": [{"containerID": "a", "ifname": "eth0"}]
        }))
        .unwrap();
        assert_eq!(
            c.valid_attachments().unwrap(),
            vec![("a".into(), "eth0".into())]
        );
        let none = conf(json!({"cniVersion": "1.1.0", "name": "n"})).unwrap();
        assert!(
            none.valid_attachments().is_err(),
            "a missing list must not mean none is valid"
        );
        let r = json!({"ips": [{"address": "10.244.52.2/24"}, {"address": "fc00::2/64"}]});
        assert_eq!(
            result_addresses(&r).unwrap(),
            vec![
                "10.244.52.2".parse::<IpAddr>().unwrap(),
                "fc00::2".parse().unwrap()
            ]
        );
        assert!(result_addresses(&json!({"ips": [{"address": "x"}]})).is_err());
        assert!(result_addresses(&json!({})).is_err());
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// JSON values shaped like configs: the keys weft-cni reads, in any case, with any
        /// value type, nested a little.
        fn value() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::from),
                any::<i64>().prop_map(Value::from),
                "[a-z0-9./:-]{0,12}".prop_map(Value::from),
                prop_oneof![
                    Just("1.0.0"),
                    Just("0.3.1"),
                    Just("1.1.0"),
                    Just("10.0.0.0/8")
                ]
                .prop_map(Value::from),
            ];
            let key = prop_oneof![
                Just("cniVersion"),
                Just("name"),
                Just("type"),
                Just("subnetFile"),
                Just("dataDir"),
                Just("delegate"),
                Just("ipam"),
                Just("routes"),
                Just("dst"),
                Just("ranges"),
                Just("NAME"),
                Just("IPAM"),
                Just("prevResult"),
                Just("ips"),
                Just("address"),
                Just("runtimeConfig"),
                Just("cni.dev/valid-attachments"),
                Just("containerID"),
                Just("ifname"),
            ];
            leaf.prop_recursive(3, 24, 6, move |inner| {
                prop_oneof![
                    proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                    proptest::collection::vec((key.clone(), inner), 0..6).prop_map(|kv| {
                        Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
                    }),
                ]
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            /// Whatever a runtime or a hand-edited conflist sends: parsing, rendering and
            /// reading results end in a value or a CNI error, never a panic.
            #[test]
            fn config_handling_never_panics(v in value(), masq in any::<bool>()) {
                if let Ok(c) = NetConf::parse(v.to_string().as_bytes()) {
                    let _ = c.render_delegate(&lease(masq), c.cni_version);
                    let _ = c.valid_attachments();
                    let _ = c.delegate_type();
                    if let Some(r) = &c.prev_result {
                        let _ = result_addresses(r);
                    }
                }
            }

            /// Arbitrary bytes on stdin are a decode or config error, never a panic.
            #[test]
            fn arbitrary_stdin_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
                let _ = NetConf::parse(&bytes);
            }
        }
    }
}
