//! `weftctl docker-opts`: what mk-docker-opts.sh writes, byte for byte, from subnet.env.
//!
//! On a dual-stack lease weft adds what the script does not: flannel's mk-docker-opts.sh (its last
//! change in 2022) reads no FLANNEL_IPV6_* variable. subnet.env's FLANNEL_IPV6_SUBNET gives
//! `DOCKER_OPT_IPV6="--ipv6"` and `DOCKER_OPT_FIXED_CIDR_V6="--fixed-cidr-v6=<network>"`, the
//! same two keys weftd writes into daemon.json. One option per variable, as the script's `-i`
//! promises: a unit may pass `${DOCKER_OPT_…}` as one argument. Both join the combined variable in
//! the script's order (sorted by name); an IPv4-only subnet.env gives exactly the script's output.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use ipnet::Ipv6Net;

/// mk-docker-opts.sh's flags.
#[derive(Debug, Clone)]
pub struct DockerOpts {
    /// -i: one variable per option.
    pub individual: bool,
    /// -c: the combined variable.
    pub combined: bool,
    /// -k: the combined variable's name.
    pub combined_key: String,
    /// -m: leave out --ip-masq.
    pub no_ip_masq: bool,
}

impl DockerOpts {
    /// Renders the env file from subnet.env's variables. `existing` is the combined variable's value
    /// in the caller's environment, which the script prepends.
    pub fn render(
        &self,
        vars: &BTreeMap<String, String>,
        existing: Option<&str>,
    ) -> Result<String> {
        let (individual, combined) = if !self.individual && !self.combined {
            (true, true)
        } else {
            (self.individual, self.combined)
        };

        // Sorted by name, as the script's `set | grep` yields them.
        let mut opts: BTreeMap<&str, String> = BTreeMap::new();
        if let Some(s) = vars.get("FLANNEL_SUBNET").filter(|s| !s.is_empty()) {
            opts.insert("DOCKER_OPT_BIP", format!("--bip={s}"));
        }
        if let Some(m) = vars.get("FLANNEL_MTU").filter(|s| !s.is_empty()) {
            opts.insert("DOCKER_OPT_MTU", format!("--mtu={m}"));
        }
        if let Some(v6) = vars.get("FLANNEL_IPV6_SUBNET").filter(|s| !s.is_empty()) {
            // The bridge's address with its prefix (`fd00:60:0:5::1/64`); Docker wants the
            // network. A value that is no IPv6 subnet is refused, as a bad FLANNEL_IPMASQ is.
            let Ok(subnet) = v6.parse::<Ipv6Net>() else {
                bail!("Invalid value of FLANNEL_IPV6_SUBNET: {v6}");
            };
            opts.insert("DOCKER_OPT_IPV6", "--ipv6".to_string());
            opts.insert(
                "DOCKER_OPT_FIXED_CIDR_V6",
                format!("--fixed-cidr-v6={}", subnet.trunc()),
            );
        }
        if let Some(masq) = vars.get("FLANNEL_IPMASQ").filter(|s| !s.is_empty()) {
            if !self.no_ip_masq {
                // If the agent masquerades, Docker must not.
                let docker = match masq.as_str() {
                    "true" => "false",
                    "false" => "true",
                    other => bail!("Invalid value of FLANNEL_IPMASQ: {other}"),
                };
                opts.insert("DOCKER_OPT_IPMASQ", format!("--ip-masq={docker}"));
            }
        }

        let mut all = match existing.filter(|s| !s.is_empty()) {
            Some(e) => format!("{e} "),
            None => String::new(),
        };
        let mut out = String::new();
        for (name, value) in &opts {
            if individual {
                out.push_str(&format!("{name}=\"{value}\"\n"));
            }
            all.push(' ');
            all.push_str(value);
        }
        if combined {
            out.push_str(&format!("{}=\"{all}\"\n", self.combined_key));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::subnet_env::parse_vars;

    fn opts(i: bool, c: bool, m: bool) -> DockerOpts {
        DockerOpts {
            individual: i,
            combined: c,
            combined_key: "DOCKER_OPTS".into(),
            no_ip_masq: m,
        }
    }

    const ENV: &str = "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.74.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n";

    #[test]
    fn matches_mk_docker_opts_output() {
        let out = opts(false, false, false)
            .render(&parse_vars(ENV), None)
            .unwrap();
        assert_eq!(
            out,
            "DOCKER_OPT_BIP=\"--bip=10.1.74.1/24\"\nDOCKER_OPT_IPMASQ=\"--ip-masq=true\"\nDOCKER_OPT_MTU=\"--mtu=1472\"\nDOCKER_OPTS=\" --bip=10.1.74.1/24 --ip-masq=true --mtu=1472\"\n"
        );
    }

    #[test]
    fn flags_select_and_rename() {
        let vars = parse_vars(&ENV.replace("IPMASQ=false", "IPMASQ=true"));
        assert_eq!(
            opts(true, false, false).render(&vars, None).unwrap(),
            "DOCKER_OPT_BIP=\"--bip=10.1.74.1/24\"\nDOCKER_OPT_IPMASQ=\"--ip-masq=false\"\nDOCKER_OPT_MTU=\"--mtu=1472\"\n"
        );
        let mut o = opts(false, true, true);
        o.combined_key = "DOCKER_NETWORK_OPTIONS".into();
        assert_eq!(
            o.render(&vars, Some("--debug")).unwrap(),
            "DOCKER_NETWORK_OPTIONS=\"--debug  --bip=10.1.74.1/24 --mtu=1472\"\n"
        );
    }

    const DUAL: &str = "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.74.1/24\n\
                        FLANNEL_IPV6_NETWORK=fd00:60::/48\nFLANNEL_IPV6_SUBNET=fd00:60:0:4a::1/64\n\
                        FLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n";

    #[test]
    fn a_dual_stack_subnet_env_adds_ipv6_and_the_ipv6_network() {
        let out = opts(false, false, false)
            .render(&parse_vars(DUAL), None)
            .unwrap();
        assert_eq!(
            out,
            "DOCKER_OPT_BIP=\"--bip=10.1.74.1/24\"\n\
             DOCKER_OPT_FIXED_CIDR_V6=\"--fixed-cidr-v6=fd00:60:0:4a::/64\"\n\
             DOCKER_OPT_IPMASQ=\"--ip-masq=true\"\n\
             DOCKER_OPT_IPV6=\"--ipv6\"\n\
             DOCKER_OPT_MTU=\"--mtu=1472\"\n\
             DOCKER_OPTS=\" --bip=10.1.74.1/24 --fixed-cidr-v6=fd00:60:0:4a::/64 --ip-masq=true \
             --ipv6 --mtu=1472\"\n"
        );
        let c = opts(false, true, true)
            .render(&parse_vars(DUAL), None)
            .unwrap();
        assert_eq!(
            c,
            "DOCKER_OPTS=\" --bip=10.1.74.1/24 --fixed-cidr-v6=fd00:60:0:4a::/64 --ipv6 \
             --mtu=1472\"\n"
        );
    }

    #[test]
    fn an_ipv4_subnet_env_gives_no_ipv6_option() {
        for env in [ENV.to_string(), format!("{ENV}FLANNEL_IPV6_SUBNET=\n")] {
            let out = opts(false, false, false)
                .render(&parse_vars(&env), None)
                .unwrap();
            assert!(!out.contains("6"), "{out}");
        }
    }

    #[test]
    fn rejects_a_bad_ipv6_subnet() {
        for bad in ["10.1.74.1/24", "fd00:60:0:4a::1", "fd00::/129"] {
            let vars = parse_vars(&format!("{ENV}FLANNEL_IPV6_SUBNET={bad}\n"));
            let e = opts(false, false, false).render(&vars, None).unwrap_err();
            assert_eq!(
                e.to_string(),
                format!("Invalid value of FLANNEL_IPV6_SUBNET: {bad}")
            );
        }
    }

    #[test]
    fn rejects_a_bad_ipmasq() {
        let vars = parse_vars(&ENV.replace("IPMASQ=false", "IPMASQ=maybe"));
        let e = opts(false, false, false).render(&vars, None).unwrap_err();
        assert_eq!(e.to_string(), "Invalid value of FLANNEL_IPMASQ: maybe");
    }
}
