//! `checksum-offload`: flannel #1279 (and the fix flannel #1282 proposed, then only documented).
//! With `tx-checksum-ip-generic` on on `flannel.<VNI>`, VXLAN datagrams leave with a UDP checksum
//! the receiver drops ("UDP: bad checksum" in its kernel log) when
//! - the kernel predates 5.7 ("netfilter: nat: never update the UDP checksum when it's 0"):
//!   kube-proxy's masquerade rewrites the outer checksum (RHEL/CentOS 7 and 8 kernels);
//! - the underlay is VMware's vmxnet3, whose checksum offload mangles encapsulated UDP;
//! - the PublicIP is translated on the way (NAT), which rewrites the checksum too.
//!
//! Elsewhere the offload is harmless and faster, so it is only a problem where one of those holds.

use super::facts::{backend_flag, device_name, Facts, Kernel, Store};
use super::lease::held;
use super::{Finding, Outcome};

/// The first kernel with the netfilter fix.
const FIXED_IN: (u32, u32) = (5, 7);

/// Underlay drivers known to break VXLAN checksum offload.
const AFFECTED_DRIVERS: &[&str] = &["vmxnet3"];

/// `major.minor` of a kernel release such as `5.4.0-42-generic` or `3.10.0-1160.el7.x86_64`.
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

pub fn check(f: &Facts) -> Outcome {
    let Store::Read(c) = &f.store else {
        return Outcome::skip(format!("needs {}", f.store_name()));
    };
    let Ok(config) = &c.config else {
        return Outcome::skip("needs the network config");
    };
    if config.backend.type_name() != "vxlan" {
        return Outcome::skip(format!("the backend is {}", config.backend.type_name()));
    }
    let dev = device_name(config).unwrap_or_default();
    let Ok(k) = &f.kernel else {
        return Outcome::skip("needs netlink");
    };
    let on = match &k.tx_checksum {
        // The `device` check reports a missing device.
        None => return Outcome::skip(format!("no {dev}")),
        Some(Err(e)) => {
            return vec![Finding::new(
                format!("cannot read {dev}'s tx-checksum-ip-generic: {e}"),
                format!("look with `ethtool -k {dev}`"),
            )]
            .into()
        }
        Some(Ok(on)) => *on,
    };
    let option = backend_flag(config, "TxChecksumOffload");
    if !on {
        return Outcome::ok();
    }
    let turn_off = format!(
        "set \"TxChecksumOffload\": false in the network config's Backend (`weftctl config set`; \
         every weftd applies it within 30 s), or run `ethtool -K {dev} tx-checksum-ip-generic off`"
    );
    if option == Some(false) {
        return vec![Finding::new(
            format!(
                "the config says TxChecksumOffload false but {dev} has tx-checksum-ip-generic on"
            ),
            "weftd applies it at every reconcile: make sure it runs, and look at its log",
        )]
        .into();
    }
    let why = risks(f, k);
    if why.is_empty() {
        return Outcome::ok();
    }
    vec![Finding::new(
        format!(
            "{dev} has tx-checksum-ip-generic on and {}: peers drop its VXLAN packets as bad \
             checksums (flannel #1279)",
            why.join(", and ")
        ),
        turn_off,
    )]
    .into()
}

/// What makes checksum offload on the vxlan device break packets on this host.
fn risks(f: &Facts, k: &Kernel) -> Vec<String> {
    let mut why = Vec::new();
    if kernel_version(&f.kernel_release).is_some_and(|v| v < FIXED_IN) {
        why.push(format!(
            "kernel {} is older than {}.{}, whose NAT rewrites the VXLAN checksum (unless the \
             fix was backported)",
            f.kernel_release, FIXED_IN.0, FIXED_IN.1
        ));
    }
    if let Some(d) = k
        .underlay_driver
        .as_deref()
        .filter(|d| AFFECTED_DRIVERS.contains(d))
    {
        let name = f
            .external
            .as_ref()
            .map_or("the underlay", |e| e.name.as_str());
        why.push(format!("{name} is a {d} NIC"));
    }
    let public = held(f).map(|l| l.attrs.public_ip).or(f.public_ip_flag);
    if let Some(ip) = public.filter(|ip| {
        f.kernel
            .as_ref()
            .is_ok_and(|k| !k.local_addrs.is_empty() && !k.local_addrs.contains(ip))
    }) {
        why.push(format!(
            "the PublicIP {ip} is not an address of this host (NAT rewrites the checksum)"
        ));
    }
    why
}

#[cfg(test)]
mod tests {
    use super::super::testing::{self, kernel, problems_of};
    use super::*;

    #[test]
    fn kernel_versions_are_read_from_the_release() {
        assert_eq!(kernel_version("5.4.0-42-generic"), Some((5, 4)));
        assert_eq!(kernel_version("3.10.0-1160.el7.x86_64"), Some((3, 10)));
        assert_eq!(kernel_version("6.18.44-fc-v657"), Some((6, 18)));
        assert_eq!(kernel_version("garbage"), None);
    }

    #[test]
    fn the_offload_on_a_fixed_kernel_with_a_plain_nic_is_fine() {
        assert_eq!(problems_of(check(&testing::healthy())), vec![]);
    }

    #[test]
    fn an_old_kernel_a_vmxnet3_nic_or_nat_make_it_a_problem() {
        let mut f = testing::healthy();
        f.kernel_release = "4.18.0-348.el8.x86_64".into();
        let p = problems_of(check(&f));
        assert!(
            p[0].problem
                .contains("kernel 4.18.0-348.el8.x86_64 is older than 5.7"),
            "{p:?}"
        );
        assert!(p[0].fix.contains("\"TxChecksumOffload\": false"), "{p:?}");

        let mut f = testing::healthy();
        kernel(&mut f).underlay_driver = Some("vmxnet3".into());
        assert!(problems_of(check(&f))[0]
            .problem
            .contains("eth0 is a vmxnet3 NIC"));

        let mut f = testing::healthy();
        f.public_ip_flag = Some("203.0.113.7".parse().unwrap());
        testing::set_public_ip(&mut f, 0, "203.0.113.7");
        let p = problems_of(check(&f));
        assert!(
            p[0].problem
                .contains("the PublicIP 203.0.113.7 is not an address of this host"),
            "{p:?}"
        );

        // Turned off: nothing to say.
        kernel(&mut f).tx_checksum = Some(Ok(false));
        assert_eq!(problems_of(check(&f)), vec![]);
    }

    #[test]
    fn the_option_not_applied_is_a_problem_anywhere() {
        let mut f = testing::healthy();
        testing::set_config(
            &mut f,
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","TxChecksumOffload":false}}"#,
        );
        let p = problems_of(check(&f));
        assert!(
            p[0].problem
                .starts_with("the config says TxChecksumOffload false"),
            "{p:?}"
        );
    }

    #[test]
    fn other_backends_skip() {
        let mut f = testing::healthy();
        testing::set_config(
            &mut f,
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#,
        );
        assert_eq!(check(&f), Outcome::skip("the backend is host-gw"));
    }
}
