//! wireguard backend on a kernel without WireGuard: weft's userspace WireGuard on a TUN device
//! `flannel-wg`, two hosts reaching each other through it.

use std::path::PathBuf;

use serde_json::{json, Value};
use weft_backends::{Backend, Lease};

use crate::harness::{others, root_or_skip, Host, Lab};

const DEV: &str = "flannel-wg";

fn wireguard() -> Value {
    json!({"Type": "wireguard", "PersistentKeepaliveInterval": 25})
}

/// A key file of its own for each host (hosts share this process and its environment).
fn key_file(lab: &str, h: &Host) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("weft-wg-{lab}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(dir.join(format!("h{}", h.n)));
    dir.join(format!("h{}/wgkey", h.n))
}

/// start with its own key file, prepare, configure: the host is up and holds its lease.
fn up(h: &Host, key: PathBuf, config: Value) -> Lease {
    h.start(config);
    h.agent.with_backend(move |b| {
        Box::pin(async move {
            match b {
                Backend::Wireguard(w) => w.set_key_file(key),
                _ => panic!("not a wireguard backend"),
            }
        })
    });
    let data = h.prepare(None);
    let lease = h.lease("wireguard", data);
    h.configure(&lease);
    lease
}

#[test]
fn two_hosts_reach_each_other_through_userspace_wireguard() {
    if !root_or_skip("wireguard::two_hosts_reach_each_other_through_userspace_wireguard") {
        return;
    }
    let mut lab = Lab::new();
    for i in 1..=2 {
        lab.add_host(i, &format!("192.168.100.{i}/24"), 1500);
    }
    let keys: Vec<PathBuf> = lab.hosts.iter().map(|h| key_file("two", h)).collect();
    let leases: Vec<Lease> = (lab.hosts.iter().zip(&keys))
        .map(|(h, k)| up(h, k.clone(), wireguard()))
        .collect();
    let data: Vec<Value> = (leases.iter())
        .map(|l| {
            let d = l.backend_data.as_ref().expect("BackendData");
            serde_json::from_str(d.as_str()).expect("JSON")
        })
        .collect();
    assert_eq!(data[0]["Port"], 51820);
    assert_ne!(data[0]["PublicKey"], data[1]["PublicKey"], "a key per host");
    lab.reconcile_all(&leases);

    let h1 = &lab.hosts[0];
    assert_eq!(h1.mtu(), 1420, "underlay 1500 − 80");
    let link = h1.ns.link(DEV).expect("flannel-wg exists");
    // This kernel has no WireGuard: the userspace data plane's TUN device.
    assert_eq!(link["linkinfo"]["info_kind"], "tun", "{link}");
    assert_eq!(link["mtu"], 1420, "{link}");
    let routes = h1.ns.weft_routes();
    assert_eq!(routes.len(), 1, "{routes:?}");
    assert_eq!(routes[0]["dst"], "10.244.0.0/16");
    assert_eq!(routes[0]["dev"], DEV);

    lab.assert_full_mesh();

    // A peer leaving: its traffic stops.
    let h2 = &lab.hosts[1];
    h1.reconcile(&[]).expect("reconcile");
    assert!(!h1.reaches(h2), "a removed peer is no longer reached");
    h1.reconcile(&others(&leases, 0)).expect("reconcile");
    assert!(h1.reaches(h2), "and is again once back");

    // weftd restarting: the key file gives the same public key, flannel-wg is reopened.
    h1.stop();
    let again = up(h1, keys[0].clone(), wireguard());
    assert_eq!(again, leases[0], "the same lease, the same key");
    h1.reconcile(&others(&leases, 0)).expect("reconcile");
    lab.assert_full_mesh();
}
