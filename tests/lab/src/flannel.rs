//! A flannel node built by hand, exactly as flanneld would leave it: the reference weft must
//! interoperate with. Lease values are flannel's bytes; kernel state is made with `ip`/`bridge`
//! the way flannel's backends program it (see ../shared/reference/flannel-compat.md).

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};

use crate::netns::Netns;

/// The etcd key of a lease: `<prefix>/subnets/10.244.52.0-24`.
pub fn lease_key(prefix: &str, subnet: Ipv4Net) -> String {
    format!(
        "{prefix}/subnets/{}-{}",
        subnet.network(),
        subnet.prefix_len()
    )
}

/// flanneld's vxlan lease value (VNI 1).
pub fn vxlan_lease(public_ip: Ipv4Addr, vtep_mac: &str) -> String {
    format!(
        r#"{{"PublicIP":"{public_ip}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{vtep_mac}"}}}}"#
    )
}

/// flanneld's udp lease value: its udp backend writes only PublicIP (no BackendType).
pub fn udp_lease(public_ip: Ipv4Addr) -> String {
    format!(r#"{{"PublicIP":"{public_ip}"}}"#)
}

/// flannel's `flannel.1` on `eth0`: VNI 1, port 8472, no learning, the lease's network
/// address/32, MTU `mtu`, VTEP MAC `mac`.
pub fn vxlan_device(ns: &Netns, local: Ipv4Addr, mac: &str, subnet: Ipv4Net, mtu: u32) {
    ns.ip(&format!(
        "link add flannel.1 type vxlan id 1 local {local} dev eth0 dstport 8472 nolearning"
    ));
    ns.ip(&format!("link set flannel.1 address {mac} mtu {mtu} up"));
    ns.ip(&format!("addr add {}/32 dev flannel.1", subnet.network()));
}

/// What flannel's vxlan programs for one peer, in its order: permanent neighbour (peer network
/// address → VTEP MAC), FDB entry (MAC → PublicIP), onlink route to the peer subnet.
pub fn vxlan_peer(ns: &Netns, subnet: Ipv4Net, mac: &str, public_ip: Ipv4Addr) {
    let route = format!(
        "route add {subnet} via {} dev flannel.1 onlink",
        subnet.network()
    );
    vxlan_entries(
        ns,
        "",
        "flannel.1",
        subnet.network().into(),
        mac,
        public_ip.into(),
        &route,
    );
}

/// [`vxlan_peer`]'s neighbour and FDB entry on `dev` (`family`: "" or "-6 "), then `route`.
fn vxlan_entries(
    ns: &Netns,
    family: &str,
    dev: &str,
    net: std::net::IpAddr,
    mac: &str,
    public_ip: std::net::IpAddr,
    route: &str,
) {
    ns.ip(&format!(
        "{family}neigh replace {net} lladdr {mac} dev {dev} nud permanent"
    ));
    crate::cmd::must(&[
        "bridge",
        "-n",
        &ns.name,
        "fdb",
        "append",
        mac,
        "dev",
        dev,
        "dst",
        &public_ip.to_string(),
    ]);
    ns.ip(route);
}

/// The etcd key of a dual-stack lease: `<prefix>/subnets/10.244.52.0-24&fd00:244:0:34::-64`.
pub fn lease_key_dual(prefix: &str, subnet: Ipv4Net, subnet6: Ipv6Net) -> String {
    format!(
        "{}&{}-{}",
        lease_key(prefix, subnet),
        subnet6.network(),
        subnet6.prefix_len()
    )
}

/// flanneld's dual-stack vxlan lease value (VNI 1): its PublicIPv6, and the IPv6 device's VTEP
/// MAC in BackendV6Data, in flannel's field order.
pub fn vxlan_lease_dual(
    public_ip: Ipv4Addr,
    vtep_mac: &str,
    public_ip6: Ipv6Addr,
    vtep_mac6: &str,
) -> String {
    format!(
        r#"{{"PublicIP":"{public_ip}","PublicIPv6":"{public_ip6}","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{vtep_mac}"}},"BackendV6Data":{{"VNI":1,"VtepMAC":"{vtep_mac6}"}}}}"#
    )
}

/// flannel's `flannel-v6.1` on `eth0`: VNI 1, port 8472, no learning, the IPv6 underlay address
/// as local, accept_ra 0, the IPv6 lease's network address/128 (added as flanneld adds it, with
/// duplicate detection), VTEP MAC `mac`. flanneld asks for the IPv4 device's MTU (`mtu`) when it
/// creates the device, which the kernel cuts to what IPv6 leaves room for (underlay − 70).
pub fn vxlan_device6(ns: &Netns, local: Ipv6Addr, mac: &str, subnet: Ipv6Net, mtu: u32) {
    ns.ip(&format!(
        "link add flannel-v6.1 mtu {mtu} address {mac} type vxlan id 1 local {local} dev eth0 \
         dstport 8472 nolearning"
    ));
    ns.must(&["sysctl", "-qw", "net/ipv6/conf/flannel-v6.1/accept_ra=0"]);
    ns.ip("link set flannel-v6.1 up");
    ns.ip(&format!(
        "-6 addr add {}/128 dev flannel-v6.1",
        subnet.network()
    ));
}

/// What flannel's vxlan programs for one peer's IPv6 side, in its order: permanent neighbour
/// (peer IPv6 network address → its IPv6 VTEP MAC), FDB entry (MAC → PublicIPv6), onlink route
/// to the peer's IPv6 subnet, all on `flannel-v6.1`.
pub fn vxlan_peer6(ns: &Netns, subnet: Ipv6Net, mac: &str, public_ip: Ipv6Addr) {
    let net = subnet.network();
    let route = format!("-6 route replace {subnet} via {net} dev flannel-v6.1 onlink");
    vxlan_entries(
        ns,
        "-6 ",
        "flannel-v6.1",
        net.into(),
        mac,
        public_ip.into(),
        &route,
    );
}

/// flanneld's wireguard lease value: its public key and ListenPort (flannel's default, 51820).
pub fn wireguard_lease(public_ip: Ipv4Addr, public_key: &str) -> String {
    let port = crate::wireguard_go::PORT;
    format!(
        r#"{{"PublicIP":"{public_ip}","PublicIPv6":null,"BackendType":"wireguard","BackendData":{{"PublicKey":"{public_key}","Port":{port}}}}}"#
    )
}

/// flanneld's dual-stack wireguard lease value in Mode `separate`: its PublicIPv6, and in
/// BackendV6Data the same public key (both devices have one private key) with ListenPortV6
/// (flannel's default, 51821).
pub fn wireguard_lease_dual(public_ip: Ipv4Addr, public_ip6: Ipv6Addr, public_key: &str) -> String {
    let (port, port6) = (crate::wireguard_go::PORT, crate::wireguard_go::PORT6);
    format!(
        r#"{{"PublicIP":"{public_ip}","PublicIPv6":"{public_ip6}","BackendType":"wireguard","BackendData":{{"PublicKey":"{public_key}","Port":{port}}},"BackendV6Data":{{"PublicKey":"{public_key}","Port":{port6}}}}}"#
    )
}

/// One IPv4/UDP packet with correct checksums: what flannel's udp backend puts, alone and with no
/// header of its own, into each datagram to port 8285.
pub fn ipv4_udp(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let total = 28 + payload.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[6] = 0x40; // DF
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let c = checksum(&[&p[..20]]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p[20..22].copy_from_slice(&sport.to_be_bytes());
    p[22..24].copy_from_slice(&dport.to_be_bytes());
    p[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p[28..].copy_from_slice(payload);
    let c = udp_checksum(&p);
    p[26..28].copy_from_slice(&c.to_be_bytes());
    p
}

/// The UDP checksum an IPv4/UDP packet (no IP options) should carry, whatever its checksum field
/// holds now: to build packets and to check the ones weft sends.
pub fn udp_checksum(p: &[u8]) -> u16 {
    let udp_len = (p.len() - 20) as u16;
    let mut pseudo = [0u8; 12];
    pseudo[..8].copy_from_slice(&p[12..20]);
    pseudo[9] = 17;
    pseudo[10..12].copy_from_slice(&udp_len.to_be_bytes());
    let mut head = [0u8; 8];
    head[..6].copy_from_slice(&p[20..26]);
    match checksum(&[&pseudo, &head, &p[28..]]) {
        0 => 0xffff,
        c => c,
    }
}

/// The Internet checksum over the concatenation of `parts` (each of even length but the last).
pub fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum = 0u32;
    for part in parts {
        let mut chunks = part.chunks_exact(2);
        for c in &mut chunks {
            sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
        }
        if let [last] = chunks.remainder() {
            sum += u32::from(*last) << 8;
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_built_packet_checksums_to_zero_in_both_headers() {
        let (s, d) = (Ipv4Addr::new(10, 244, 1, 2), Ipv4Addr::new(10, 244, 2, 2));
        let p = ipv4_udp(s, d, 1000, 2000, b"hello");
        assert_eq!(checksum(&[&p[..20]]), 0);
        assert_eq!(udp_checksum(&p), u16::from_be_bytes([p[26], p[27]]));
        let mut pseudo = [0u8; 12];
        pseudo[..4].copy_from_slice(&s.octets());
        pseudo[4..8].copy_from_slice(&d.octets());
        pseudo[9] = 17;
        pseudo[10..12].copy_from_slice(&13u16.to_be_bytes());
        assert_eq!(checksum(&[&pseudo, &p[20..]]), 0);
    }

    #[test]
    fn lease_values_are_flannels_bytes() {
        let ip = Ipv4Addr::new(192, 168, 64, 3);
        assert_eq!(
            vxlan_lease(ip, "c6:2b:1e:55:0d:7a"),
            r#"{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:2b:1e:55:0d:7a"}}"#
        );
        assert_eq!(udp_lease(ip), r#"{"PublicIP":"192.168.64.3"}"#);
        let key = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=";
        assert_eq!(
            wireguard_lease(ip, key),
            r#"{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"wireguard","BackendData":{"PublicKey":"HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=","Port":51820}}"#
        );
        let ip6 = "fd00:192:168:64::3".parse().expect("v6");
        assert_eq!(
            wireguard_lease_dual(ip, ip6, key),
            r#"{"PublicIP":"192.168.64.3","PublicIPv6":"fd00:192:168:64::3","BackendType":"wireguard","BackendData":{"PublicKey":"HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=","Port":51820},"BackendV6Data":{"PublicKey":"HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=","Port":51821}}"#
        );
        let subnet = "10.244.52.0/24".parse().expect("net");
        assert_eq!(
            lease_key("/coreos.com/network", subnet),
            "/coreos.com/network/subnets/10.244.52.0-24"
        );
    }
}
