//! `mtu`: the underlay carries FLANNEL_MTU plus the backend's overhead; the flannel device,
//! docker0/cni0 and the containers' veths use FLANNEL_MTU, no more. Too large an MTU anywhere on
//! the way shows up as connections that hang on the first full-size packet.

use weft_backends::{Backend, ExternalInterface, Network};

use super::facts::{device_name, Facts, Kernel, Link, Store};
use super::{Finding, Outcome};
use crate::config::NetworkConfig;

/// The bridges containers hang off: Docker's and the CNI bridge plugin's.
pub const BRIDGES: [&str; 2] = ["docker0", "cni0"];

/// Bytes a backend adds to each packet on the underlay.
fn overhead(backend: &str) -> u32 {
    weft_backends::kind(backend).map_or(0, |k| k.mtu_overhead)
}

pub fn check(f: &Facts) -> Outcome {
    let Ok(env) = &f.env else {
        return Outcome::skip("needs subnet.env");
    };
    let Ok(k) = &f.kernel else {
        return Outcome::skip("needs netlink");
    };
    let Some(mtu) = env.mtu else {
        return vec![Finding::new(
            format!("{} has no FLANNEL_MTU", f.subnet_file),
            "restart weftd: it writes FLANNEL_MTU",
        )]
        .into();
    };
    let config = match &f.store {
        Store::Read(c) => c.config.as_ref().ok(),
        Store::Failed { .. } => None,
    };
    let mut out = Vec::new();
    if let (Some(config), Ok(ext)) = (config, &f.external) {
        underlay(mtu, config, ext, &mut out);
    }
    if let Some(dev) = config.and_then(device_name) {
        match k.link(&dev) {
            // A missing device is the `device` check's.
            None => {}
            Some(l) if l.mtu != mtu => out.push(Finding::new(
                format!("{dev} has MTU {} but FLANNEL_MTU is {mtu}", l.mtu),
                "restart weftd: it sets the device's MTU (or `ip link set` it to FLANNEL_MTU)",
            )),
            Some(_) => {}
        }
    }
    bridges(k, mtu, &mut out);
    out.into()
}

/// FLANNEL_MTU against the underlay and what weftd would set now.
fn underlay(mtu: u32, config: &NetworkConfig, ext: &ExternalInterface, out: &mut Vec<Finding>) {
    let backend = config.backend.type_name();
    let over = overhead(&backend);
    let net = Network {
        network: config.network,
        network_v6: config.ipv6.map(|p| p.network),
        external: ext.clone(),
    };
    let want = Backend::new(&config.backend, net).map(|b| b.mtu());
    let restart = |want: &str| {
        format!(
            "restart weftd so FLANNEL_MTU becomes {want}, then restart Docker and the pods \
             (they keep the MTU they started with)"
        )
    };
    match want {
        _ if u64::from(mtu) + u64::from(over) > u64::from(ext.mtu) => {
            out.push(Finding::new(
                format!(
                    "FLANNEL_MTU {mtu} plus {backend}'s {over} bytes exceeds the underlay \
                     {}'s MTU {}: full-size packets between hosts are dropped",
                    ext.name, ext.mtu
                ),
                restart(&format!("{}", ext.mtu.saturating_sub(over))),
            ));
        }
        Ok(w) if w != mtu => out.push(Finding::new(
            format!(
                "FLANNEL_MTU is {mtu} but weftd would now set {w} (underlay {} MTU {}, \
                 {backend}): the underlay or the config changed since it was written",
                ext.name, ext.mtu
            ),
            restart(&w.to_string()),
        )),
        Ok(_) => {}
        Err(e) => out.push(Finding::new(
            format!("the backend config does not fit this host: {e}"),
            "fix the network config (`weftctl config set`)",
        )),
    }
}

/// The bridges' ports (containers) and the bridges themselves, against FLANNEL_MTU.
fn bridges(k: &Kernel, mtu: u32, out: &mut Vec<Finding>) {
    for name in BRIDGES {
        let Some(bridge) = k.link(name) else { continue };
        let ports: Vec<&Link> = k.ports(bridge.index).collect();
        for p in ports.iter().filter(|p| p.mtu > mtu) {
            out.push(Finding::new(
                format!(
                    "{} (a container's interface on {name}) has MTU {}, above FLANNEL_MTU {mtu}: \
                     the container sends packets the overlay cannot carry",
                    p.name, p.mtu
                ),
                format!(
                    "recreate the container so it gets MTU {mtu} (Docker: daemon.json's mtu, \
                     applied when Docker restarts; CNI: delete the pod)"
                ),
            ));
        }
        // An empty bridge carries nothing, and takes its ports' MTU as they join.
        if !ports.is_empty() && bridge.mtu > mtu {
            out.push(Finding::new(
                format!("{name} has MTU {}, above FLANNEL_MTU {mtu}", bridge.mtu),
                format!("`ip link set {name} mtu {mtu}`, and give its containers that MTU too"),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{self, kernel, link, problems_of};
    use super::*;

    #[test]
    fn a_healthy_host_has_one_mtu_everywhere() {
        assert_eq!(problems_of(check(&testing::healthy())), vec![]);
    }

    #[test]
    fn an_underlay_shrunk_below_flannel_mtu_plus_overhead() {
        let mut f = testing::healthy();
        if let Ok(e) = &mut f.external {
            e.mtu = 1400;
        }
        let p = problems_of(check(&f));
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].problem.starts_with(
                "FLANNEL_MTU 1450 plus vxlan's 50 bytes exceeds the underlay eth0's MTU 1400"
            ),
            "{p:?}"
        );
        assert!(p[0].fix.contains("FLANNEL_MTU becomes 1350"), "{p:?}");
    }

    #[test]
    fn flannel_mtu_other_than_weftd_would_set() {
        let mut f = testing::healthy();
        testing::set_config(
            &mut f,
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","MTU":1400}}"#,
        );
        let p = problems_of(check(&f));
        assert!(
            p[0].problem
                .contains("FLANNEL_MTU is 1450 but weftd would now set 1400"),
            "{p:?}"
        );
    }

    #[test]
    fn the_device_bridge_and_veths_must_not_exceed_flannel_mtu() {
        let mut f = testing::healthy();
        let k = kernel(&mut f);
        k.links[2].mtu = 1500;
        k.links[3].mtu = 1500;
        k.links[4].mtu = 1500;
        let p = problems_of(check(&f));
        let texts: Vec<&str> = p.iter().map(|f| f.problem.as_str()).collect();
        assert_eq!(texts, [
            "flannel.1 has MTU 1500 but FLANNEL_MTU is 1450",
            "vc (a container's interface on cni0) has MTU 1500, above FLANNEL_MTU 1450: the container sends packets the overlay cannot carry",
            "cni0 has MTU 1500, above FLANNEL_MTU 1450",
        ]);
    }

    #[test]
    fn an_empty_docker0_at_1500_is_no_problem() {
        let mut f = testing::healthy();
        kernel(&mut f)
            .links
            .push(link(9, "docker0", "bridge", 1500, None, &["10.244.1.1/24"]));
        assert_eq!(problems_of(check(&f)), vec![]);
        kernel(&mut f)
            .links
            .push(link(10, "veth1", "veth", 1450, Some(9), &[]));
        assert_eq!(
            problems_of(check(&f)).len(),
            1,
            "with a container, docker0 counts"
        );
    }

    #[test]
    fn udp_and_host_gw_have_their_own_overheads() {
        let mut f = testing::healthy();
        testing::set_config(
            &mut f,
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#,
        );
        testing::env(&mut f).mtu = Some(1500);
        kernel(&mut f).links[3].mtu = 1500;
        kernel(&mut f).links[4].mtu = 1500;
        assert_eq!(problems_of(check(&f)), vec![]);
        testing::set_config(
            &mut f,
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"udp"}}"#,
        );
        let p = problems_of(check(&f));
        assert!(
            p[0].problem.contains("plus udp's 28 bytes exceeds"),
            "{p:?}"
        );
    }
}
