//! `wireguard`: on a wireguard host, every peer weftd should have is in flannel-wg with its
//! lease's key, and has shaken hands; on a dual-stack network in separate mode, every peer with
//! an IPv6 side is in flannel-wg-v6 too, with its BackendV6Data's key. Read as `wg show` reads
//! them: from the control socket weftd answers on for its userspace WireGuard, over generic
//! netlink for the kernel's.

use std::time::{Duration, SystemTime};

use weft_backends::Identity;

use super::facts::{device6_name, device_name, Facts, WgDevice};
use super::lease::held;
use super::peers::{ctx, desired_peers};
use super::{Finding, Outcome};
use crate::escape::Escaped;
use crate::lease::Lease;

/// WireGuard's REJECT_AFTER_TIME: a session older than this is dead, and a peer with traffic
/// would have shaken hands again (every 2 minutes) before.
const SESSION_LIFE: Duration = Duration::from_secs(180);

pub fn handshakes(f: &Facts) -> Outcome {
    handshakes_at(f, SystemTime::now())
}

fn handshakes_at(f: &Facts, now: SystemTime) -> Outcome {
    let c = match ctx(f) {
        Ok(c) => c,
        Err(o) => return o,
    };
    if c.backend != "wireguard" {
        return Outcome::skip(format!("the backend is {}", c.backend));
    }
    let read = |name: &str| c.k.wireguard.iter().find(|d| d.name == name);
    let dev = device_name(c.config).unwrap_or_default();
    let Some(main) = read(&dev) else {
        return Outcome::skip(format!("no usable {dev} (see `device`)"));
    };
    let Some(own) = held(f) else {
        return match unreadable(main) {
            Some(problem) => vec![problem].into(),
            None => Outcome::skip("needs this host's lease (see `lease`)"),
        };
    };
    let now = (now.duration_since(SystemTime::UNIX_EPOCH))
        .unwrap_or_default()
        .as_secs();
    let peers = desired_peers(f, &c, own);
    let keys = |identity: fn(&Lease) -> Option<Identity>| -> Vec<(&Lease, String)> {
        (peers.iter())
            .filter_map(|l| Some((l, key_hex(identity(l)?)?)))
            .collect()
    };
    let mut out = judge(main, &keys(Lease::identity), now);
    // Separate mode on a dual-stack network: the IPv6 subnets have a device of their own, where
    // a peer is when both hosts have an IPv6 side it can be dialled at.
    if let Some(dev6) = device6_name(c.config).filter(|_| own.ipv6_subnet.is_some()) {
        let wanted: Vec<_> = (keys(Lease::identity6).into_iter())
            .filter(|(l, _)| l.ipv6_subnet.is_some() && l.attrs.public_ipv6.is_some())
            .collect();
        match read(&dev6) {
            Some(d) => out.extend(judge(d, &wanted, now)),
            None if !wanted.is_empty() => out.push(Finding::new(
                format!(
                    "{dev6} does not exist or is no WireGuard device: the peers' IPv6 subnets \
                     are unreachable"
                ),
                "weftd creates it in separate mode (the default) on a dual-stack network: make \
                 sure weftd runs, and look at its log",
            )),
            None => {}
        }
    }
    out.into()
}

/// Why `d`'s peers could not be read, as a finding.
fn unreadable(d: &WgDevice) -> Option<Finding> {
    let e = d.peers.as_ref().err()?;
    Some(Finding::new(
        format!("{}'s peers cannot be read: {e}", d.name),
        "run doctor as root; for weft's userspace WireGuard make sure weftd runs (it answers on \
         the control socket), with the same WIREGUARD_SOCKET_DIR as weftctl",
    ))
}

/// Device `d` against the peers it must hold, each with the key it must hold it under, at `now`
/// (seconds since the epoch).
fn judge(d: &WgDevice, wanted: &[(&Lease, String)], now: u64) -> Vec<Finding> {
    let read = match &d.peers {
        Ok(read) => read,
        Err(_) => return unreadable(d).into_iter().collect(),
    };
    let dev = &d.name;
    let mut out = Vec::new();
    for (lease, hex) in wanted {
        let who = format!("peer {} ({})", lease.subnet, lease.attrs.public_ip);
        let Some(p) = read.iter().find(|p| p.public_key_hex == *hex) else {
            out.push(Finding::new(
                format!("{who}: {dev} has no WireGuard peer with its lease's key"),
                "weftd programs it at every reconcile (within 30 s): make sure weftd runs, and \
                 look for `reconcile:` errors in its log",
            ));
            continue;
        };
        let endpoint = Escaped(&p.endpoint);
        if p.last_handshake == 0 {
            out.push(Finding::warning(
                format!("{who}: no handshake yet on {dev} with {endpoint}"),
                "harmless if nothing was sent to it yet; if its pods are unreachable, UDP to \
                 its port may be blocked between the hosts, or it runs with another key than \
                 its lease names (a key file replaced without a restart)",
            ));
        } else if now.saturating_sub(p.last_handshake) > SESSION_LIFE.as_secs() {
            let ago = now.saturating_sub(p.last_handshake);
            out.push(Finding::warning(
                format!("{who}: last handshake on {dev} with {endpoint} {ago} s ago"),
                "harmless if nothing was sent to it since; if its pods are unreachable, \
                 handshakes are failing: UDP to its port blocked, or its key changed",
            ));
        }
    }
    out
}

/// A public key in hex, as the control socket writes keys; `None` for another kind of identity.
fn key_hex(id: Identity) -> Option<String> {
    let kind = weft_backends::kind("wireguard")?.identity_kind?;
    (id.kind().name == kind.name).then(|| id.value().iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::facts::WgPeer;
    use crate::doctor::testing::{self, kernel};
    use serde_json::json;

    /// The keys [n; 32] in base64, for the leases of 10.244.n.0/24.
    const KEYS: [&str; 2] = [
        "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=",
        "AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=",
    ];
    const NOW: u64 = 1_800_000_000;

    /// The healthy host, on wireguard: flannel-wg (weft's TUN) with peer 10.244.2.0/24.
    fn wireguard_host(peer: Option<WgPeer>) -> Facts {
        let mut f = testing::healthy();
        testing::set_config(
            &mut f,
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard"}}"#,
        );
        for (r, key) in testing::cluster(&mut f).records.iter_mut().zip(KEYS) {
            if let Ok(l) = &mut r.value {
                l.attrs.backend_type = "wireguard".into();
                l.attrs.backend_data = Some(serde_json::json!({"PublicKey": key, "Port": 51820}));
            }
        }
        let k = kernel(&mut f);
        k.links[2] = testing::link(3, "flannel-wg", "tun", 1420, None, &["10.244.1.0/32"]);
        k.wireguard = vec![device("flannel-wg", Ok(peer.into_iter().collect()))];
        f
    }

    fn device(name: &str, peers: Result<Vec<WgPeer>, String>) -> WgDevice {
        WgDevice {
            name: name.into(),
            peers,
        }
    }

    fn peer_2(last_handshake: u64) -> WgPeer {
        WgPeer {
            public_key_hex: "02".repeat(32),
            endpoint: "10.199.0.12:51820".into(),
            last_handshake,
        }
    }

    /// The wireguard host on a dual-stack network in `mode`: each lease with an IPv6 side whose
    /// BackendV6Data has its key and ListenPortV6; flannel-wg-v6 (a TUN, index 6) holding `peer6`
    /// when separate mode has it.
    fn dual_stack_host(mode: &str, peer6: Option<WgPeer>) -> Facts {
        let mut f = wireguard_host(Some(peer_2(NOW - 30)));
        testing::set_config(
            &mut f,
            &format!(
                r#"{{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:244::/48","Backend":{{"Type":"wireguard","Mode":"{mode}"}}}}"#
            ),
        );
        testing::with_ipv6(&mut f);
        for (r, key) in testing::cluster(&mut f).records.iter_mut().zip(KEYS) {
            if let Ok(l) = &mut r.value {
                l.attrs.backend_v6_data = Some(json!({"PublicKey": key, "Port": 51821}));
            }
        }
        let k = kernel(&mut f);
        k.links
            .push(testing::link(6, "flannel-wg-v6", "tun", 1420, None, &[]));
        if mode == "separate" {
            let peers = peer6.into_iter().collect();
            k.wireguard.push(device("flannel-wg-v6", Ok(peers)));
        }
        f
    }

    fn peer6_2(last_handshake: u64) -> WgPeer {
        WgPeer {
            endpoint: "[fd00:199::12]:51821".into(),
            ..peer_2(last_handshake)
        }
    }

    fn texts(o: Outcome) -> Vec<(bool, String)> {
        match o {
            Outcome::Ran(v) => v.into_iter().map(|f| (f.warning, f.problem)).collect(),
            Outcome::Skipped(why) => vec![(true, format!("skipped: {why}"))],
        }
    }

    fn at(f: &Facts) -> Vec<(bool, String)> {
        texts(handshakes_at(
            f,
            SystemTime::UNIX_EPOCH + Duration::from_secs(NOW),
        ))
    }

    #[test]
    fn a_peer_that_shook_hands_lately_is_fine() {
        assert_eq!(at(&wireguard_host(Some(peer_2(NOW - 30)))), []);
    }

    #[test]
    fn a_peer_missing_never_met_or_long_silent_is_named() {
        assert_eq!(
            at(&wireguard_host(None)),
            [(
                false,
                "peer 10.244.2.0/24 (10.199.0.12): flannel-wg has no WireGuard peer with its lease's key"
                    .to_string()
            )]
        );
        assert_eq!(
            at(&wireguard_host(Some(peer_2(0)))),
            [(
                true,
                "peer 10.244.2.0/24 (10.199.0.12): no handshake yet on flannel-wg with 10.199.0.12:51820"
                    .to_string()
            )]
        );
        assert_eq!(
            at(&wireguard_host(Some(peer_2(NOW - 600)))),
            [(
                true,
                "peer 10.244.2.0/24 (10.199.0.12): last handshake on flannel-wg with 10.199.0.12:51820 600 s ago"
                    .to_string()
            )]
        );
    }

    #[test]
    fn unreadable_peers_are_a_problem_and_no_device_a_skip() {
        let mut f = wireguard_host(None);
        kernel(&mut f).wireguard = vec![device(
            "flannel-wg",
            Err("/var/run/wireguard/flannel-wg.sock: refused".into()),
        )];
        let got = at(&f);
        assert!(!got[0].0 && got[0].1.contains("cannot be read"), "{got:?}");
        kernel(&mut f).wireguard.clear();
        assert!(at(&f)[0].1.starts_with("skipped: no usable flannel-wg"));
        assert!(at(&testing::healthy())[0]
            .1
            .starts_with("skipped: the backend is vxlan"));
    }

    #[test]
    fn a_dual_stack_peer_in_flannel_wg_v6_with_its_ipv6_key_is_fine() {
        assert_eq!(
            at(&dual_stack_host("separate", Some(peer6_2(NOW - 30)))),
            []
        );
    }

    #[test]
    fn a_dual_stack_peer_missing_from_flannel_wg_v6_or_silent_there_is_named() {
        assert_eq!(
            at(&dual_stack_host("separate", None)),
            [(
                false,
                "peer 10.244.2.0/24 (10.199.0.12): flannel-wg-v6 has no WireGuard peer with its lease's key"
                    .to_string()
            )]
        );
        assert_eq!(
            at(&dual_stack_host("separate", Some(peer6_2(0)))),
            [(
                true,
                "peer 10.244.2.0/24 (10.199.0.12): no handshake yet on flannel-wg-v6 with [fd00:199::12]:51821"
                    .to_string()
            )]
        );
    }

    #[test]
    fn flannel_wg_v6_holds_the_key_of_backend_v6_data_not_of_backend_data() {
        let mut f = dual_stack_host("separate", Some(peer6_2(NOW - 30)));
        // The peer's IPv6 side under another key (a key file replaced on one side only).
        let other = "AwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwM=";
        if let Ok(l) = &mut testing::cluster(&mut f).records[1].value {
            l.attrs.backend_v6_data = Some(json!({"PublicKey": other, "Port": 51821}));
        }
        let got = at(&f);
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(got[0]
            .1
            .ends_with("flannel-wg-v6 has no WireGuard peer with its lease's key"));
    }

    #[test]
    fn a_missing_or_unreadable_flannel_wg_v6_is_named() {
        let mut f = dual_stack_host("separate", None);
        kernel(&mut f).wireguard.pop();
        let got = at(&f);
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(
            got[0]
                .1
                .starts_with("flannel-wg-v6 does not exist or is no WireGuard device"),
            "{got:?}"
        );
        kernel(&mut f).wireguard.push(device(
            "flannel-wg-v6",
            Err("/var/run/wireguard/flannel-wg-v6.sock: refused".into()),
        ));
        assert_eq!(
            at(&f),
            [(
                false,
                "flannel-wg-v6's peers cannot be read: /var/run/wireguard/flannel-wg-v6.sock: refused"
                    .to_string()
            )]
        );
    }

    #[test]
    fn one_device_modes_and_ipv4_peers_need_nothing_of_flannel_wg_v6() {
        // auto, ipv4, ipv6: flannel-wg carries both families, flannel-wg-v6 is not read.
        for mode in ["auto", "ipv4", "ipv6"] {
            assert_eq!(at(&dual_stack_host(mode, None)), [], "{mode}");
        }
        // A peer without an IPv6 side is flannel-wg's alone.
        let mut f = dual_stack_host("separate", None);
        if let Ok(l) = &mut testing::cluster(&mut f).records[1].value {
            l.attrs.backend_v6_data = None;
        }
        assert_eq!(at(&f), []);
    }
}
