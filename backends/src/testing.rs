//! Fixtures the backends' unit tests share.

use crate::{ExternalInterface, Network};

/// This host, 10.199.0.11 (and fd00:199::11 with `addr6`) on eth0 (index 2, MTU `mtu`), in the
/// network 10.60.0.0/16 (and fd00:60::/48 when `dual`).
pub fn network(dual: bool, addr6: bool, mtu: u32) -> Network {
    let addr6 = addr6.then(|| "fd00:199::11".parse().expect("addr"));
    Network {
        network: "10.60.0.0/16".parse().expect("net"),
        network_v6: dual.then(|| "fd00:60::/48".parse().expect("net")),
        external: ExternalInterface {
            name: "eth0".into(),
            index: 2,
            iface_addr: "10.199.0.11".parse().expect("addr"),
            public_ip: "10.199.0.11".parse().expect("addr"),
            iface_addr6: addr6,
            public_ipv6: addr6,
            mtu,
        },
    }
}
