//! `/run/flannel/subnet.env`, in flannel's exact format: the flannel CNI plugin and
//! mk-docker-opts.sh users read it, and weftd reads it back at start as a hint.

use std::collections::BTreeMap;
use std::path::Path;

use std::net::Ipv6Addr;

use anyhow::Result;
use ipnet::{Ipv4Net, Ipv6Net};

use crate::fsutil;
use crate::policy::Hint;

#[derive(Debug, Clone, PartialEq)]
pub struct SubnetEnv {
    pub network: Ipv4Net,
    pub subnet: Ipv4Net,
    /// The IPv6 network and this host's IPv6 subnet, on a dual-stack network.
    pub ipv6: Option<(Ipv6Net, Ipv6Net)>,
    pub mtu: u32,
    pub ip_masq: bool,
}

/// The first address after a subnet's network address with its prefix length, as flannel writes
/// FLANNEL_IPV6_SUBNET (`fd00:10:0:5::1/64`): the bridge's IPv6 address.
pub fn gateway6(subnet: Ipv6Net) -> String {
    let first = Ipv6Addr::from(u128::from(subnet.network()).saturating_add(1));
    format!("{first}/{}", subnet.prefix_len())
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
        let ipv6 = self.ipv6.map_or(String::new(), |(network, subnet)| {
            format!(
                "FLANNEL_IPV6_NETWORK={network}\nFLANNEL_IPV6_SUBNET={}\n",
                gateway6(subnet)
            )
        });
        format!(
            "FLANNEL_NETWORK={}\nFLANNEL_SUBNET={}\n{ipv6}FLANNEL_MTU={}\nFLANNEL_IPMASQ={}\n",
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

/// The subnets a previous run wrote, where the file exists and names them.
pub fn previous_subnets(path: &Path) -> Hint {
    let Ok(Some(text)) = fsutil::read_optional(path) else {
        return Hint::default();
    };
    let vars = parse_vars(&text);
    Hint {
        subnet: (vars.get("FLANNEL_SUBNET"))
            .and_then(|v| v.parse::<Ipv4Net>().ok())
            .map(|n| n.trunc()),
        ipv6_subnet: (vars.get("FLANNEL_IPV6_SUBNET"))
            .and_then(|v| v.parse::<Ipv6Net>().ok())
            .map(|n| n.trunc()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_flannels_format() {
        let env = SubnetEnv {
            network: "10.244.0.0/16".parse().unwrap(),
            subnet: "10.244.52.0/24".parse().unwrap(),
            ipv6: None,
            mtu: 1450,
            ip_masq: false,
        };
        assert_eq!(
            env.render(),
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.52.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n"
        );
    }

    #[test]
    fn renders_flannels_dual_stack_format() {
        let env = SubnetEnv {
            network: "10.244.0.0/16".parse().unwrap(),
            subnet: "10.244.52.0/24".parse().unwrap(),
            ipv6: Some((
                "fc00::/48".parse().unwrap(),
                "fc00:0:0:3::/64".parse().unwrap(),
            )),
            mtu: 1450,
            ip_masq: false,
        };
        assert_eq!(
            env.render(),
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.52.1/24\n\
             FLANNEL_IPV6_NETWORK=fc00::/48\nFLANNEL_IPV6_SUBNET=fc00:0:0:3::1/64\n\
             FLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n"
        );
    }

    #[test]
    fn reads_back_the_previous_subnet() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/flannel/subnet.env");
        assert_eq!(previous_subnets(&path), Hint::default());
        let mut env = SubnetEnv {
            network: "10.5.0.0/16".parse().unwrap(),
            subnet: "10.5.7.0/24".parse().unwrap(),
            ipv6: None,
            mtu: 1500,
            ip_masq: true,
        };
        env.write(&path).unwrap();
        let hint = previous_subnets(&path);
        assert_eq!(hint.subnet, Some("10.5.7.0/24".parse().unwrap()));
        assert_eq!(hint.ipv6_subnet, None);
        env.ipv6 = Some((
            "fd00:5::/48".parse().unwrap(),
            "fd00:5:0:7::/64".parse().unwrap(),
        ));
        env.write(&path).unwrap();
        assert_eq!(
            previous_subnets(&path).ipv6_subnet,
            Some("fd00:5:0:7::/64".parse().unwrap())
        );
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
                v6 in prop::option::of((any::<u128>(), 8u8..=124)),
            ) {
                let network = Ipv4Net::new(net.into(), len).map_err(|e| TestCaseError::fail(e.to_string()))?.trunc();
                let subnet = Ipv4Net::new(network.addr(), len + extra).map_err(|e| TestCaseError::fail(e.to_string()))?;
                let ipv6 = v6.map(|(a, len)| {
                    let n6 = Ipv6Net::new(a.into(), len).expect("len <= 124").trunc();
                    (n6, Ipv6Net::new(n6.addr(), len + 2).expect("len + 2 <= 128"))
                });
                let env = SubnetEnv { network, subnet, ipv6, mtu, ip_masq };
                let vars = parse_vars(&env.render());
                prop_assert_eq!(&vars["FLANNEL_NETWORK"], &network.to_string());
                prop_assert_eq!(&vars["FLANNEL_SUBNET"], &env.gateway());
                prop_assert_eq!(&vars["FLANNEL_MTU"], &mtu.to_string());
                prop_assert_eq!(&vars["FLANNEL_IPMASQ"], &ip_masq.to_string());
                prop_assert_eq!(vars.get("FLANNEL_IPV6_SUBNET").cloned(), ipv6.map(|(_, s)| gateway6(s)));
            }
        }
    }
}
