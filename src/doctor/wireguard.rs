//! `wireguard`: on a wireguard host, every peer weftd should have is in flannel-wg with its
//! lease's key, and has shaken hands. Read as `wg show` reads them: from the control socket weftd
//! answers on for its userspace WireGuard, over generic netlink for the kernel's.

use std::time::{Duration, SystemTime};

use super::facts::Facts;
use super::lease::held;
use super::peers::{ctx, desired_peers};
use super::{Finding, Outcome};
use crate::escape::Escaped;

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
    let read = match &c.k.wireguard {
        None => return Outcome::skip("no usable flannel-wg (see `device`)"),
        Some(Err(e)) => {
            return vec![Finding::new(
                format!("flannel-wg's peers cannot be read: {e}"),
                "run doctor as root; for weft's userspace WireGuard make sure weftd runs (it \
                 answers on the control socket), with the same WIREGUARD_SOCKET_DIR as weftctl",
            )]
            .into()
        }
        Some(Ok(peers)) => peers,
    };
    let Some(own) = held(f) else {
        return Outcome::skip("needs this host's lease (see `lease`)");
    };
    let now_secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let mut out = Vec::new();
    for lease in desired_peers(f, &c, own) {
        let who = format!("peer {} ({})", lease.subnet, lease.attrs.public_ip);
        let Some(hex) = lease_key_hex(&lease) else {
            continue;
        };
        let Some(p) = read.iter().find(|p| p.public_key_hex == hex) else {
            out.push(Finding::new(
                format!("{who}: flannel-wg has no WireGuard peer with its lease's key"),
                "weftd programs it at every reconcile (within 30 s): make sure weftd runs, and \
                 look for `reconcile:` errors in its log",
            ));
            continue;
        };
        let endpoint = Escaped(&p.endpoint);
        if p.last_handshake == 0 {
            out.push(Finding::warning(
                format!("{who}: no handshake yet with {endpoint}"),
                "harmless if nothing was sent to it yet; if its pods are unreachable, UDP to \
                 its port may be blocked between the hosts, or it runs with another key than \
                 its lease names (a key file replaced without a restart)",
            ));
        } else if now_secs.saturating_sub(p.last_handshake) > SESSION_LIFE.as_secs() {
            let ago = now_secs.saturating_sub(p.last_handshake);
            out.push(Finding::warning(
                format!("{who}: last handshake with {endpoint} {ago} s ago"),
                "harmless if nothing was sent to it since; if its pods are unreachable, \
                 handshakes are failing: UDP to its port blocked, or its key changed",
            ));
        }
    }
    out.into()
}

/// The lease's public key in hex, as the control socket writes keys.
fn lease_key_hex(lease: &crate::lease::Lease) -> Option<String> {
    let kind = weft_backends::kind("wireguard")?.identity_kind?;
    let id = lease.identity()?;
    (id.kind().name == kind.name).then(|| id.value().iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::facts::WgPeer;
    use crate::doctor::testing::{self, kernel};

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
        k.wireguard = Some(Ok(peer.into_iter().collect()));
        f
    }

    fn peer_2(last_handshake: u64) -> WgPeer {
        WgPeer {
            public_key_hex: "02".repeat(32),
            endpoint: "10.199.0.12:51820".into(),
            last_handshake,
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
                "peer 10.244.2.0/24 (10.199.0.12): no handshake yet with 10.199.0.12:51820"
                    .to_string()
            )]
        );
        assert_eq!(
            at(&wireguard_host(Some(peer_2(NOW - 600)))),
            [(
                true,
                "peer 10.244.2.0/24 (10.199.0.12): last handshake with 10.199.0.12:51820 600 s ago"
                    .to_string()
            )]
        );
    }

    #[test]
    fn unreadable_peers_are_a_problem_and_no_device_a_skip() {
        let mut f = wireguard_host(None);
        kernel(&mut f).wireguard = Some(Err("/var/run/wireguard/flannel-wg.sock: refused".into()));
        let got = at(&f);
        assert!(!got[0].0 && got[0].1.contains("cannot be read"), "{got:?}");
        kernel(&mut f).wireguard = None;
        assert!(at(&f)[0].1.starts_with("skipped: no usable flannel-wg"));
        assert!(at(&testing::healthy())[0]
            .1
            .starts_with("skipped: the backend is vxlan"));
    }
}
