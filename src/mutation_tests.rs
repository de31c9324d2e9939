//! Random corruptions of real inputs (daemon.json, network configs, lease values and keys): parsing
//! must never panic, and whatever daemon.json merge accepts it must merge correctly.

use serde_json::Value;

use crate::daemon_json;

const SEEDS: &[&str] = &[
    "{}",
    "{\"bip\":\"1.2.3.1/24\"}",
    "{\n  \"hosts\": [\"unix:///x\", \"tcp://[::1]:2375\"],\n  \"log-opts\": {\"a\": [1, {\"b\": \"}\"}]},\n  \"mtu\": 1500\n}\n",
    "{\"a\\\"b\": \"\\u00e9\\\\\", \"n\": -1.5e3, \"t\": true, \"z\": null, \"e\": [], \"o\": {}}",
];

fn mutate(rng: &mut fastrand::Rng, s: &str) -> Vec<u8> {
    let mut b = s.as_bytes().to_vec();
    for _ in 0..rng.usize(1..4) {
        let alphabet = b"{}[]\":,\\ \n0123456789abcdefnrtu-.e";
        match rng.u8(0..4) {
            0 if !b.is_empty() => {
                let i = rng.usize(0..b.len());
                b.remove(i);
            }
            1 => {
                let i = rng.usize(0..=b.len());
                b.insert(i, alphabet[rng.usize(0..alphabet.len())]);
            }
            2 if !b.is_empty() => {
                let i = rng.usize(0..b.len());
                b[i] = alphabet[rng.usize(0..alphabet.len())];
            }
            _ => b.truncate(rng.usize(0..=b.len())),
        }
    }
    b
}

#[test]
fn corrupted_files_are_refused_or_merged_correctly_never_panicking() {
    let mut rng = fastrand::Rng::with_seed(0x77656674);
    let mut accepted = 0;
    for i in 0..20_000 {
        let seed = SEEDS[i % SEEDS.len()];
        let bytes = mutate(&mut rng, seed);
        let Ok(text) = String::from_utf8(bytes) else {
            continue;
        };
        let Ok(Some((out, _))) = daemon_json::merge(&text, "10.9.8.1/24", 1450) else {
            continue;
        };
        accepted += 1;
        let before: Value = serde_json::from_str(if text.trim().is_empty() { "{}" } else { &text })
            .expect("accepted input is JSON");
        let after: Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("{text:?} -> {out:?}: {e}"));
        let after = after.as_object().expect("object");
        for k in before.as_object().expect("object").keys() {
            assert!(after.contains_key(k), "{k} lost: {text:?} -> {out:?}");
        }
        assert_eq!(after["bip"], "10.9.8.1/24", "{text:?} -> {out:?}");
        assert_eq!(after["mtu"], 1450, "{text:?} -> {out:?}");
    }
    assert!(
        accepted > 100,
        "the mutations must also produce valid files ({accepted})"
    );
}

#[test]
fn corrupted_configs_and_leases_never_panic() {
    let mut rng = fastrand::Rng::with_seed(7);
    let config = r#"{"Network":"10.244.0.0/16","SubnetLen":24,"SubnetMin":"10.244.1.0","SubnetMax":"10.244.255.0","Backend":{"Type":"vxlan","VNI":1}}"#;
    let lease = r#"{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:2b:1e:55:0d:7a"}}"#;
    // And their dual-stack forms.
    let config6 = r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:244::/48","IPv6SubnetLen":64,"IPv6SubnetMin":"fd00:244:0:1::","IPv6SubnetMax":"fd00:244:0:ff::","Backend":{"Type":"vxlan","VNI":1}}"#;
    let lease6 = r#"{"PublicIP":"192.168.64.3","PublicIPv6":"fd00:64::3","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:2b:1e:55:0d:7a"},"BackendV6Data":{"VNI":1,"VtepMAC":"c6:2b:1e:55:0d:7b"}}"#;
    for _ in 0..20_000 {
        for (config, lease, key) in [
            (config, lease, "10.244.52.0-24"),
            (config6, lease6, "10.244.52.0-24&fd00:244:0:34::-64"),
        ] {
            let c = mutate(&mut rng, config);
            let _ = crate::config::NetworkConfig::parse(&String::from_utf8_lossy(&c));
            let l = mutate(&mut rng, lease);
            let _ = crate::lease::LeaseAttrs::parse(&l);
            let k = mutate(&mut rng, key);
            let _ = crate::registry::etcd::parse_subnet_key(&String::from_utf8_lossy(&k));
        }
    }
}
