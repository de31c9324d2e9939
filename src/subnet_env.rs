//! `/run/flannel/subnet.env`, in flannel's exact format: the flannel CNI plugin and
//! mk-docker-opts.sh users read it, and weftd reads it back at start as a hint.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Result;
use ipnet::Ipv4Net;

use crate::fsutil;

#[derive(Debug, Clone, PartialEq)]
pub struct SubnetEnv {
    pub network: Ipv4Net,
    pub subnet: Ipv4Net,
    pub mtu: u32,
    pub ip_masq: bool,
}

impl SubnetEnv {
    /// FLANNEL_SUBNET: the lease's first host address with the lease's prefix length.
    pub fn gateway(&self) -> String {
        format!(
            "{}/{}",
            weft_backends::gateway_address(self.subnet),
            self.subnet.prefix_len()
        )
    }

    pub fn render(&self) -> String {
        format!(
            "FLANNEL_NETWORK={}\nFLANNEL_SUBNET={}\nFLANNEL_MTU={}\nFLANNEL_IPMASQ={}\n",
            self.network,
            self.gateway(),
            self.mtu,
            self.ip_masq
        )
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        fsutil::write_atomic(path, self.render().as_bytes(), 0o644)
    }
}

/// Parses `KEY=value` lines as a shell would source them (quotes stripped, comments skipped).
pub fn parse_vars(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.strip_prefix("export ").unwrap_or(l).split_once('='))
        .map(|(k, v)| {
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                .unwrap_or(v);
            (k.trim().to_string(), v.to_string())
        })
        .collect()
}

/// The subnet a previous run wrote, if the file exists and names one.
pub fn previous_subnet(path: &Path) -> Option<Ipv4Net> {
    let text = fsutil::read_optional(path).ok()??;
    let vars = parse_vars(&text);
    let gw: Ipv4Net = vars.get("FLANNEL_SUBNET")?.parse().ok()?;
    Some(gw.trunc())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_flannels_format() {
        let env = SubnetEnv {
            network: "10.244.0.0/16".parse().unwrap(),
            subnet: "10.244.52.0/24".parse().unwrap(),
            mtu: 1450,
            ip_masq: false,
        };
        assert_eq!(
            env.render(),
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.52.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n"
        );
    }

    #[test]
    fn reads_back_the_previous_subnet() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/flannel/subnet.env");
        assert_eq!(previous_subnet(&path), None);
        let env = SubnetEnv {
            network: "10.5.0.0/16".parse().unwrap(),
            subnet: "10.5.7.0/24".parse().unwrap(),
            mtu: 1500,
            ip_masq: true,
        };
        env.write(&path).unwrap();
        assert_eq!(previous_subnet(&path), Some("10.5.7.0/24".parse().unwrap()));
        let mode = std::fs::metadata(&path).unwrap().permissions();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(mode.mode() & 0o777, 0o644);
    }

    #[test]
    fn parses_shell_style_vars() {
        let v = parse_vars("# c\nA=1\nexport B=\"two\"\nC='3'\n\n");
        assert_eq!(v["A"], "1");
        assert_eq!(v["B"], "two");
        assert_eq!(v["C"], "3");
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn line() -> impl Strategy<Value = String> {
            prop_oneof![
                "(export )?[A-Z_]{1,12}=[\"']?[^\n]{0,20}[\"']?",
                "[#= \t'\"a-z]{0,10}",
                any::<String>(),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            /// Whatever is on disk (a truncated write, another tool's file, binary junk read
            /// lossily): parsing never panics, and every key it returns is a trimmed, non-empty
            /// line prefix without '='.
            #[test]
            fn parse_vars_never_panics(lines in proptest::collection::vec(line(), 0..8), crlf in any::<bool>()) {
                let text = lines.join(if crlf { "\r\n" } else { "\n" });
                for (k, _) in parse_vars(&text) {
                    prop_assert!(!k.contains('='), "{:?}", k);
                    prop_assert_eq!(k.trim(), k.as_str());
                }
            }

            /// What weftd writes reads back as itself.
            #[test]
            fn rendered_files_parse_back(
                net in any::<u32>(),
                len in 8u8..=28,
                extra in 2u8..=4,
                mtu in any::<u32>(),
                ip_masq in any::<bool>(),
            ) {
                let network = Ipv4Net::new(net.into(), len).map_err(|e| TestCaseError::fail(e.to_string()))?.trunc();
                let subnet = Ipv4Net::new(network.addr(), len + extra).map_err(|e| TestCaseError::fail(e.to_string()))?;
                let env = SubnetEnv { network, subnet, mtu, ip_masq };
                let vars = parse_vars(&env.render());
                prop_assert_eq!(&vars["FLANNEL_NETWORK"], &network.to_string());
                prop_assert_eq!(&vars["FLANNEL_SUBNET"], &env.gateway());
                prop_assert_eq!(&vars["FLANNEL_MTU"], &mtu.to_string());
                prop_assert_eq!(&vars["FLANNEL_IPMASQ"], &ip_masq.to_string());
            }
        }
    }
}
