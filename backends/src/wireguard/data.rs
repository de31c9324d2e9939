//! A wireguard lease's BackendData: `{"PublicKey":"<base64>","Port":51820}`, as flannel writes
//! it (Go's field order, compact), and what weft reads of a peer's.

use serde_json::{json, Value};

use super::key::{self, Key};

/// What this host publishes.
pub fn publish(public_key: &Key, port: u16) -> Value {
    // Key names and order exactly as flannel writes them (serde_json keeps insertion order).
    json!({"PublicKey": key::show(public_key), "Port": port})
}

/// What a peer publishes: its public key, and its port (`None`: dial our own ListenPort, as
/// flannel before v0.26.6 wrote no port, and a port of 0 means the same).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerData {
    pub public_key: Key,
    pub port: Option<u16>,
}

impl PeerData {
    /// The port to dial: the peer's, else our own ListenPort.
    pub fn port_or(&self, listen_port: u16) -> u16 {
        self.port.unwrap_or(listen_port)
    }
}

/// A peer's BackendData, or the one reason it makes no wireguard peer.
pub fn read(data: Option<&Value>) -> Result<PeerData, String> {
    let data = data.ok_or("no BackendData")?;
    let public_key = match data.get("PublicKey") {
        None | Some(Value::Null) => return Err("BackendData has no PublicKey".into()),
        Some(Value::String(s)) => {
            key::parse(s).map_err(|why| format!("BackendData PublicKey {s:?}: {why}"))?
        }
        Some(v) => return Err(format!("BackendData PublicKey {v} is not a base64 key")),
    };
    if public_key == [0; 32] {
        return Err("BackendData PublicKey is all zeros".into());
    }
    let port = match data.get("Port") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64() {
            Some(0) => None,
            Some(p) if p <= u64::from(u16::MAX) => Some(p as u16),
            _ => return Err(format!("BackendData Port {v} is not a port number")),
        },
    };
    Ok(PeerData { public_key, port })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const KEY: &str = "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=";

    #[test]
    fn published_exactly_as_flannel_writes_it() {
        let k = key::parse(KEY).expect("key");
        assert_eq!(
            publish(&k, 51820).to_string(),
            r#"{"PublicKey":"hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=","Port":51820}"#
        );
    }

    #[test]
    fn a_peer_without_a_port_is_dialled_on_our_listen_port() {
        let k = key::parse(KEY).expect("key");
        for v in [
            json!({"PublicKey": KEY}),
            json!({"PublicKey": KEY, "Port": 0}),
            json!({"PublicKey": KEY, "Port": null}),
        ] {
            let d = read(Some(&v)).expect("peer");
            assert_eq!(
                d,
                PeerData {
                    public_key: k,
                    port: None
                },
                "{v}"
            );
            assert_eq!(d.port_or(51999), 51999);
        }
        let d = read(Some(&json!({"PublicKey": KEY, "Port": 51821}))).expect("peer");
        assert_eq!(d.port_or(51999), 51821);
    }

    #[test]
    fn a_bad_key_or_port_is_one_clear_reason() {
        let cases = [
            (None, "no BackendData"),
            (Some(json!({"Port": 51820})), "BackendData has no PublicKey"),
            (
                Some(json!({"PublicKey": null})),
                "BackendData has no PublicKey",
            ),
            (
                Some(json!({"PublicKey": "k="})),
                "BackendData PublicKey \"k=\"",
            ),
            (Some(json!({"PublicKey": "AAAA"})), "3 bytes, not the 32"),
            (Some(json!({"PublicKey": 5})), "is not a base64 key"),
            (
                Some(json!({"PublicKey": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="})),
                "all zeros",
            ),
            (Some(json!({"PublicKey": KEY, "Port": 70000})), "Port 70000"),
            (
                Some(json!({"PublicKey": KEY, "Port": "51820"})),
                "not a port",
            ),
        ];
        for (v, want) in cases {
            let e = read(v.as_ref()).expect_err("refused");
            assert!(e.contains(want), "{v:?}: {e}");
        }
    }

    proptest! {
        /// What weft publishes, weft reads back.
        #[test]
        fn what_is_published_reads_back(k in any::<[u8; 32]>(), port in 1u16..) {
            prop_assume!(k != [0; 32]);
            let d = read(Some(&publish(&k, port))).expect("readable");
            prop_assert_eq!(d, PeerData { public_key: k, port: Some(port) });
        }

        /// Any BackendData: a peer or a reason, never a panic.
        #[test]
        fn any_backend_data_is_judged(key in "\\PC{0,50}", port in any::<i64>()) {
            let _ = read(Some(&json!({"PublicKey": key, "Port": port})));
        }
    }
}
