//! The node's lease as the CNI plugin sees it: subnet.env, read with flannel's plugin's rules
//! (FLANNEL_NETWORK may list several networks; IPv6 lines are optional; every file must give a
//! network, a subnet, the MTU and the masquerade flag).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

use ipnet::IpNet;

use super::error::{code, CniError};
use crate::subnet_env::parse_vars;

/// What subnet.env says about this node.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeLease {
    /// The cluster networks (FLANNEL_NETWORK, then FLANNEL_IPV6_NETWORK), each once.
    pub networks: Vec<IpNet>,
    /// This node's subnets (IPv4 first), host bits cleared.
    pub subnets: Vec<IpNet>,
    /// Each subnet's gateway, the bridge's address: FLANNEL_SUBNET's address part.
    pub gateways: Vec<IpAddr>,
    pub mtu: u32,
    /// Whether weftd masquerades (then the bridge must not).
    pub ip_masq: bool,
}

impl NodeLease {
    /// Reads `path`. A missing file is "try again later" (weftd has not leased yet); an
    /// unreadable or incomplete one is an invalid config. Both name the file.
    pub fn read(path: &Path) -> Result<Self, CniError> {
        let text = match std::fs::read(path) {
            Ok(b) => String::from_utf8_lossy(&b).into_owned(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(CniError::new(
                    code::TRY_AGAIN_LATER,
                    format!(
                        "{} does not exist: weftd has not leased a subnet on this node yet",
                        path.display()
                    ),
                ))
            }
            Err(e) => {
                return Err(CniError::new(
                    code::IO_FAILURE,
                    format!("read {}: {e}", path.display()),
                ))
            }
        };
        Self::from_vars(&parse_vars(&text))
            .map_err(|e| CniError::new(code::INVALID_CONFIG, format!("{}: {e}", path.display())))
    }

    /// The lease from parsed `KEY=value` pairs; the error says which key is wrong or missing.
    pub fn from_vars(vars: &BTreeMap<String, String>) -> Result<Self, String> {
        let nets = |key: &str| -> Result<Vec<IpNet>, String> {
            let mut out: Vec<IpNet> = Vec::new();
            for part in vars.get(key).map(String::as_str).unwrap_or("").split(',') {
                let part = part.trim();
                if part.is_empty() {
                    continue;
                }
                let net: IpNet = part.parse().map_err(|e| format!("{key}={part:?}: {e}"))?;
                if !out.contains(&net.trunc()) {
                    out.push(net.trunc());
                }
            }
            Ok(out)
        };
        let mut networks = nets("FLANNEL_NETWORK")?;
        networks.extend(nets("FLANNEL_IPV6_NETWORK")?);
        // One subnet per family: FLANNEL_SUBNET is the gateway with the lease's prefix length.
        let gateway = |key: &str| -> Result<Option<IpNet>, String> {
            match vars.get(key).map(|v| v.trim()).filter(|v| !v.is_empty()) {
                None => Ok(None),
                Some(v) => v.parse().map(Some).map_err(|e| format!("{key}={v:?}: {e}")),
            }
        };
        let given: Vec<IpNet> = [gateway("FLANNEL_SUBNET")?, gateway("FLANNEL_IPV6_SUBNET")?]
            .into_iter()
            .flatten()
            .collect();
        let subnets: Vec<IpNet> = given.iter().map(IpNet::trunc).collect();
        let gateways: Vec<IpAddr> = given.iter().map(IpNet::addr).collect();

        let mut missing = Vec::new();
        if networks.is_empty() {
            missing.push("FLANNEL_NETWORK (or FLANNEL_IPV6_NETWORK)");
        }
        if subnets.is_empty() {
            missing.push("FLANNEL_SUBNET (or FLANNEL_IPV6_SUBNET)");
        }
        let mtu = vars.get("FLANNEL_MTU");
        let ip_masq = vars.get("FLANNEL_IPMASQ");
        if mtu.is_none() {
            missing.push("FLANNEL_MTU");
        }
        if ip_masq.is_none() {
            missing.push("FLANNEL_IPMASQ");
        }
        if !missing.is_empty() {
            return Err(format!("missing {}", missing.join(", ")));
        }
        let mtu = mtu
            .and_then(|m| m.trim().parse::<u32>().ok())
            .filter(|m| *m > 0)
            .ok_or_else(|| format!("FLANNEL_MTU={:?} is not a positive number", mtu))?;
        let ip_masq = match ip_masq.map(|v| v.trim()) {
            Some("true") => true,
            Some("false") => false,
            other => {
                return Err(format!(
                    "FLANNEL_IPMASQ={other:?} is neither true nor false"
                ))
            }
        };
        for s in &subnets {
            if !networks.iter().any(|n| n.contains(s)) {
                return Err(format!("the subnet {s} is outside every network"));
            }
        }
        Ok(Self {
            networks,
            subnets,
            gateways,
            mtu,
            ip_masq,
        })
    }

    /// The gateway of `ip`'s family, if this node has a subnet of that family.
    pub fn gateway_for(&self, ip: IpAddr) -> Option<IpAddr> {
        self.gateways
            .iter()
            .copied()
            .find(|g| g.is_ipv4() == ip.is_ipv4())
    }

    /// Whether `ip` is inside one of this node's subnets.
    pub fn holds(&self, ip: IpAddr) -> bool {
        self.subnets.iter().any(|s| s.contains(&ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(text: &str) -> Result<NodeLease, String> {
        NodeLease::from_vars(&parse_vars(text))
    }

    const WEFTD: &str = "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.52.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n";

    #[test]
    fn reads_what_weftd_writes_with_the_subnets_host_bits_cleared() {
        let l = lease(WEFTD).unwrap();
        assert_eq!(l.networks, vec!["10.244.0.0/16".parse::<IpNet>().unwrap()]);
        assert_eq!(l.subnets, vec!["10.244.52.0/24".parse::<IpNet>().unwrap()]);
        assert_eq!(l.gateways, vec!["10.244.52.1".parse::<IpAddr>().unwrap()]);
        assert_eq!((l.mtu, l.ip_masq), (1450, true));
        assert!(l.holds("10.244.52.7".parse().unwrap()));
        assert!(!l.holds("10.244.53.7".parse().unwrap()));
    }

    #[test]
    fn reads_flannels_dual_stack_and_multi_network_lines() {
        let l = lease(
            "FLANNEL_NETWORK=10.244.0.0/16,10.245.0.0/16,10.244.0.0/16\n\
             FLANNEL_SUBNET=10.244.52.1/24\n\
             FLANNEL_IPV6_NETWORK=fc00::/48\n\
             FLANNEL_IPV6_SUBNET=fc00:0:0:3::1/64\n\
             FLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n",
        )
        .unwrap();
        let n: Vec<String> = l.networks.iter().map(|n| n.to_string()).collect();
        assert_eq!(n, ["10.244.0.0/16", "10.245.0.0/16", "fc00::/48"]);
        let s: Vec<String> = l.subnets.iter().map(|n| n.to_string()).collect();
        assert_eq!(s, ["10.244.52.0/24", "fc00:0:0:3::/64"]);
        let v6: IpAddr = "fc00::1".parse().unwrap();
        assert_eq!(l.gateway_for(v6), Some("fc00:0:0:3::1".parse().unwrap()));
        assert!(!l.ip_masq);
    }

    #[test]
    fn names_every_missing_key() {
        let e = lease("FLANNEL_MTU=1450\n").unwrap_err();
        for key in ["FLANNEL_NETWORK", "FLANNEL_SUBNET", "FLANNEL_IPMASQ"] {
            assert!(e.contains(key), "{e}");
        }
        assert!(!e.contains("FLANNEL_MTU"), "{e}");
    }

    #[test]
    fn refuses_bad_values_naming_the_key() {
        let cases = [
            ("FLANNEL_MTU=1450", "FLANNEL_MTU=abc", "FLANNEL_MTU"),
            ("FLANNEL_MTU=1450", "FLANNEL_MTU=0", "FLANNEL_MTU"),
            (
                "FLANNEL_IPMASQ=true",
                "FLANNEL_IPMASQ=yes",
                "FLANNEL_IPMASQ",
            ),
            (
                "FLANNEL_SUBNET=10.244.52.1/24",
                "FLANNEL_SUBNET=10.9.0.1/24",
                "outside",
            ),
            (
                "FLANNEL_NETWORK=10.244.0.0/16",
                "FLANNEL_NETWORK=10.244.0.0",
                "FLANNEL_NETWORK",
            ),
        ];
        for (good, bad, want) in cases {
            let e = lease(&WEFTD.replace(good, bad)).unwrap_err();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }

    #[test]
    fn a_missing_file_is_try_again_later_and_an_incomplete_one_invalid_both_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("subnet.env");
        let e = NodeLease::read(&path).unwrap_err();
        assert_eq!(e.code, code::TRY_AGAIN_LATER);
        assert!(e.msg.contains(&path.display().to_string()), "{e:?}");

        std::fs::write(&path, "FLANNEL_NETWORK=10.244.0.0/16\n").unwrap();
        let e = NodeLease::read(&path).unwrap_err();
        assert_eq!(e.code, code::INVALID_CONFIG);
        assert!(e.msg.contains(&path.display().to_string()), "{e:?}");
        assert!(e.msg.contains("FLANNEL_SUBNET"), "{e:?}");

        std::fs::write(&path, WEFTD).unwrap();
        assert_eq!(NodeLease::read(&path).unwrap().mtu, 1450);
    }
}
