//! wireguard backend on a kernel without WireGuard: weft's userspace WireGuard on a TUN device
//! `flannel-wg`, two hosts reaching each other through it.

use std::path::PathBuf;

use serde_json::{json, Value};
use weft_backends::udp::{Counters, DropReason};
use weft_backends::wireguard_uapi as uapi;
use weft_backends::{Backend, Lease, PeerChanges, Stats};

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

/// What the userspace data plane on `h` reports, as the metrics read it.
fn stats(h: &Host) -> Stats {
    h.agent.with_backend(|b| {
        Box::pin(async move {
            assert!(
                matches!(b, Backend::Wireguard(_)),
                "not a wireguard backend"
            );
            b.stats()
                .expect("wireguard has a userspace data plane")
                .read()
        })
    })
}

/// One UDP datagram from `src` (any address: a raw socket writes the IP header) to `dst`:9, sent
/// from the calling thread's namespace.
fn send_spoofed(src: std::net::Ipv4Addr, dst: std::net::Ipv4Addr) {
    let mut pkt = vec![0x45, 0, 0, 32, 0, 0, 0x40, 0, 64, 17, 0, 0];
    pkt.extend(src.octets());
    pkt.extend(dst.octets());
    pkt.extend([0x30, 0x39, 0, 9, 0, 12, 0, 0]);
    pkt.extend(b"weft");
    // SAFETY: plain system calls on a socket this function owns; the pointers are to locals of
    // the sizes passed.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW);
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        let mut to: libc::sockaddr_in = std::mem::zeroed();
        to.sin_family = libc::AF_INET as u16;
        to.sin_addr.s_addr = u32::from_ne_bytes(dst.octets());
        let sent = libc::sendto(
            fd,
            pkt.as_ptr().cast(),
            pkt.len(),
            0,
            (&raw const to).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        );
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        assert_eq!(sent, pkt.len() as isize, "send the spoofed packet: {err}");
    }
}

/// A base64 key in hex, as the control socket writes keys.
fn hex_of(b64: &str) -> String {
    use base64::Engine as _;
    let key = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .expect("base64");
    key.iter().map(|b| format!("{b:02x}")).collect()
}

/// The userspace data plane's counters on `h`.
fn counters(h: &Host) -> Counters {
    stats(h).counters
}

/// start with its own key file, prepare, configure: the host is up and holds its lease.
fn up(h: &Host, key: PathBuf, config: Value) -> Lease {
    h.start(config);
    h.agent.with_backend(move |b| {
        Box::pin(async move {
            match b {
                Backend::Wireguard(w) => {
                    // Each host its own control socket: they all run in this one process.
                    if let Some(dir) = key.parent() {
                        w.set_socket_dir(dir.to_path_buf());
                    }
                    w.set_key_file(key);
                }
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
    assert_eq!(routes[0]["scope"], "link", "as flannel's: {routes:?}");

    lab.assert_full_mesh();
    let h2 = &lab.hosts[1];
    // wg show's view, from the control socket (refreshed every second): host 2, shaken hands.
    let socket = keys[0].with_file_name("flannel-wg.sock");
    let key2 = data[1]["PublicKey"].as_str().expect("key").to_string();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let text = uapi::query(&socket, std::time::Duration::from_secs(2)).expect("get=1");
        let peers = uapi::parse_get(&text).expect("an answer");
        assert_eq!(peers.len(), 1, "{text}");
        assert_eq!(peers[0].0, hex_of(&key2), "{text}");
        assert_eq!(peers[0].1, "192.168.100.2:51820", "{text}");
        if peers[0].2 > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no handshake shown: {text}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let c = counters(h1);
    assert!(c.tx_packets > 0 && c.rx_packets > 0, "{c:?}");
    assert_eq!(c.total_drops(), 0, "{c:?}");

    // Datagrams no peer's session authenticates are dropped and counted.
    weft_lab::probe::udp_send(&h2.ns, "192.168.100.1:51820".parse().expect("addr"));
    std::thread::sleep(std::time::Duration::from_millis(300));
    let c = counters(h1);
    assert_eq!(c.drop_count(DropReason::UnknownSender), 5, "{c:?}");
    assert!(h2.reaches(h1), "and do no harm");

    // A packet host 2 seals whose source lies outside host 2's lease (spoofed there): opened on
    // host 1, and dropped for what its sender may send.
    h2.ns
        .run_in(|| send_spoofed("10.244.9.9".parse().expect("ip"), h1.container_ip()));
    std::thread::sleep(std::time::Duration::from_millis(300));
    let c = counters(h1);
    assert_eq!(c.drop_count(DropReason::SourceNotInSenderLease), 1, "{c:?}");

    // A peer leaving: its traffic stops.
    h1.reconcile(&[]).expect("reconcile");
    assert!(!h1.reaches(h2), "a removed peer is no longer reached");
    h1.reconcile(&others(&leases, 0)).expect("reconcile");
    assert!(h1.reaches(h2), "and is again once back");

    // The same through targeted changes (apply), as lease events bring them.
    let gone = PeerChanges {
        upsert: vec![],
        remove: vec![h2.subnet],
    };
    h1.apply(&gone).expect("apply");
    assert!(!h1.reaches(h2), "removed by apply");
    let back = PeerChanges {
        upsert: vec![leases[1].clone()],
        remove: vec![],
    };
    h1.apply(&back).expect("apply");
    assert!(h1.reaches(h2), "added by apply");

    // weftd restarting: the key file gives the same public key, flannel-wg is reopened.
    h1.stop();
    let again = up(h1, keys[0].clone(), wireguard());
    assert_eq!(again, leases[0], "the same lease, the same key");
    h1.reconcile(&others(&leases, 0)).expect("reconcile");
    lab.assert_full_mesh();
}

/// A WireGuard peer weft did not write: Debian's wireguard-go with `wg`, configured by hand as
/// flanneld configures its device, and weft's userspace WireGuard reach each other.
#[test]
fn weft_and_a_hand_made_wireguard_go_peer_reach_each_other() {
    if !root_or_skip("wireguard::weft_and_a_hand_made_wireguard_go_peer_reach_each_other") {
        return;
    }
    if !weft_lab::require_tools(
        "wireguard::weft_and_a_hand_made_wireguard_go_peer_reach_each_other",
        &weft_lab::wireguard_go::TOOLS,
    ) {
        return;
    }
    let mut lab = Lab::new();
    for i in 1..=2 {
        lab.add_host(i, &format!("192.168.100.{i}/24"), 1500);
    }
    let (h1, h2) = (&lab.hosts[0], &lab.hosts[1]);
    let weft = up(h1, key_file("interop", h1), wireguard());
    let weft_data: Value =
        serde_json::from_str(weft.backend_data.as_ref().expect("data").as_str()).expect("JSON");
    let weft_key = weft_data["PublicKey"].as_str().expect("key").to_string();

    // Host 2 as flanneld leaves it: flannel-wg, its key, port 51820, the lease's network
    // address /32, the network's route with scope link, one peer per lease.
    let key_dir = key_file("interop", h2);
    let go = weft_lab::WireguardGo::flannel_wg(
        &h2.ns,
        key_dir.parent().expect("dir"),
        (h2.subnet.network(), 51820),
        1420,
        "10.244.0.0/16".parse().expect("net"),
    );
    go.add_peer(
        &weft_key,
        "192.168.100.1:51820".parse().expect("endpoint"),
        h1.subnet,
    );

    // Its lease, as flanneld writes it.
    let flannel = Lease {
        subnet: h2.subnet,
        public_ip: h2.ip(),
        backend_type: "wireguard".into(),
        backend_data: Some(json!({"PublicKey": go.public_key, "Port": 51820}).into()),
        ipv6: None,
    };
    h1.reconcile(&[flannel]).expect("reconcile");
    assert!(h1.reaches(h2), "weft → wireguard-go");
    assert!(h2.reaches(h1), "wireguard-go → weft");
    let shake = go.latest_handshake(&weft_key);
    assert!(
        shake.is_some_and(|t| t > 0),
        "a handshake with weft's key: {shake:?}"
    );
}

/// `bytes` pseudo-random bytes over TCP from `from`'s container to `to`'s at `ip` (its IPv4 or
/// IPv6 address): (sent, received), each as (length, FNV-1a hash).
pub(crate) fn transfer(
    from: &Host,
    to: &Host,
    ip: std::net::IpAddr,
    bytes: u64,
) -> ((u64, u64), (u64, u64)) {
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::time::Duration;
    fn fnv(state: &mut (u64, u64), data: &[u8]) {
        for b in data {
            state.1 = (state.1 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
        state.0 += data.len() as u64;
    }
    const FNV: (u64, u64) = (0, 0xcbf2_9ce4_8422_2325);
    let (port_tx, port_rx) = std::sync::mpsc::channel();
    let to_ns = to.container.name.clone();
    let receiver = std::thread::spawn(move || {
        crate::harness::enter(&to_ns);
        let any = if ip.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" };
        let l = TcpListener::bind(any).expect("listen");
        let _ = port_tx.send(l.local_addr().expect("addr").port());
        let (mut s, _) = l.accept().expect("accept");
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let (mut got, mut buf) = (FNV, vec![0u8; 1 << 16]);
        loop {
            match s.read(&mut buf) {
                Ok(0) => break got,
                Ok(n) => fnv(&mut got, &buf[..n]),
                Err(e) => panic!("receive: {e} after {} bytes", got.0),
            }
        }
    });
    let port = port_rx.recv().expect("receiver port");
    let from_ns = from.container.name.clone();
    let sender = std::thread::spawn(move || {
        crate::harness::enter(&from_ns);
        let at = SocketAddr::new(ip, port);
        let mut s = TcpStream::connect_timeout(&at, Duration::from_secs(5)).expect("connect");
        s.set_write_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let (mut sent, mut rng, mut buf) = (FNV, 0x9e37_79b9_7f4a_7c15_u64, vec![0u8; 1 << 16]);
        while sent.0 < bytes {
            for w in buf.chunks_exact_mut(8) {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                w.copy_from_slice(&rng.to_le_bytes());
            }
            s.write_all(&buf).expect("send");
            fnv(&mut sent, &buf);
        }
        sent
    });
    (
        sender.join().expect("sender"),
        receiver.join().expect("receiver"),
    )
}

#[test]
fn bulk_tcp_arrives_intact_through_userspace_wireguard() {
    if !root_or_skip("wireguard::bulk_tcp_arrives_intact_through_userspace_wireguard") {
        return;
    }
    let mut lab = Lab::new();
    for i in 1..=2 {
        lab.add_host(i, &format!("192.168.100.{i}/24"), 1500);
    }
    let leases: Vec<Lease> = (lab.hosts.iter())
        .map(|h| up(h, key_file("bulk", h), wireguard()))
        .collect();
    lab.reconcile_all(&leases);
    let (h1, h2) = (&lab.hosts[0], &lab.hosts[1]);
    // Full-size segments (MTU 1420) each way, so each encrypted datagram is 1420 + 32 + 28.
    let s = stats(h1);
    assert_eq!(s.data_plane, "wireguard");
    // One worker per core, each with its TUN queue and socket.
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    assert_eq!(s.workers, cores.min(16), "{s:?}");
    // Segmentation offloads on the TUN, GSO and GRO on the socket: batches, not packets.
    assert!(s.tun_offload && s.udp_gso && s.udp_gro, "{s:?}");
    let (sent, got) = transfer(h1, h2, h2.container_ip().into(), 8 << 20);
    assert_eq!(got, sent, "c1 -> c2 corrupted");
    let (sent, got) = transfer(h2, h1, h1.container_ip().into(), 8 << 20);
    assert_eq!(got, sent, "c2 -> c1 corrupted");
    let s = stats(h1);
    assert!(
        s.counters.tx_bytes > 8 << 20 && s.counters.rx_bytes > 8 << 20,
        "{s:?}"
    );
    assert_eq!(s.counters.total_drops(), 0, "{s:?}");
    assert_eq!(s.tun_read_errors, 0, "{s:?}");

    // On the wire between the hosts: WireGuard datagrams to port 51820, and no inner packet in
    // clear.
    const MARKER: &[u8] = b"weft-wireguard-plaintext-marker";
    let capture = capture_eth0(h2, std::time::Duration::from_millis(1500));
    let to = std::net::SocketAddr::from((h2.container_ip(), 9));
    h1.container.run_in(|| {
        let sock = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind");
        for _ in 0..5 {
            let _ = sock.send_to(MARKER, to);
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    });
    let frames = capture.join().expect("capture");
    let to_51820 = |f: &&Vec<u8>| {
        f.len() > 42 && f[12..14] == [8, 0] && f[23] == 17 && f[36..38] == 51820u16.to_be_bytes()
    };
    assert!(
        frames.iter().filter(to_51820).count() >= 5,
        "{} frames, too few to port 51820",
        frames.len()
    );
    assert!(
        !frames
            .iter()
            .any(|f| f.windows(MARKER.len()).any(|w| w == MARKER)),
        "an inner packet crossed the underlay in clear"
    );

    // One of those small data messages (type 4) to host 2, replayed as it was, then with a
    // counter it has not seen (so its tag no longer fits): dropped, each for its reason.
    let to_h2 = |f: &&Vec<u8>| to_51820(f) && f[30..34] == [192, 168, 100, 2] && f[42] == 4;
    let msg = (frames.iter().filter(to_h2))
        .map(|f| f[42..].to_vec())
        .find(|m| m.len() < 200)
        .expect("a small data message to host 2");
    let mut forged = msg.clone();
    let counter = u64::from_le_bytes(forged[8..16].try_into().expect("8 bytes"));
    forged[8..16].copy_from_slice(&(counter + 1_000_000).to_le_bytes());
    let before = counters(h2);
    h1.ns.run_in(|| {
        let sock = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind");
        let h2_port = std::net::SocketAddr::from(([192, 168, 100, 2], 51820));
        sock.send_to(&msg, h2_port).expect("replay");
        sock.send_to(&forged, h2_port).expect("forged");
    });
    std::thread::sleep(std::time::Duration::from_millis(300));
    let after = counters(h2);
    let grew = |r: DropReason| after.drop_count(r) - before.drop_count(r);
    assert_eq!(grew(DropReason::Replayed), 1, "{after:?}");
    assert_eq!(grew(DropReason::BadAuthentication), 1, "{after:?}");
    assert!(h1.reaches(h2), "and the session goes on");
}

/// The frames `h`'s eth0 sees (both ways) for `limit`, captured with an AF_PACKET socket
/// (capturing when this returns).
fn capture_eth0(h: &Host, limit: std::time::Duration) -> std::thread::JoinHandle<Vec<Vec<u8>>> {
    let ns = h.ns.name.clone();
    let (ready_tx, ready) = std::sync::mpsc::channel();
    let t = std::thread::spawn(move || {
        crate::harness::enter(&ns);
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain system calls on a socket this thread owns; every pointer is to a local
        // of the size passed.
        unsafe {
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto));
            assert!(
                fd >= 0,
                "AF_PACKET socket: {}",
                std::io::Error::last_os_error()
            );
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = proto;
            sll.sll_ifindex = libc::if_nametoindex(c"eth0".as_ptr()) as i32;
            let bound = libc::bind(
                fd,
                (&raw const sll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            assert_eq!(
                bound,
                0,
                "bind to eth0: {}",
                std::io::Error::last_os_error()
            );
            let tv = libc::timeval {
                tv_sec: 0,
                tv_usec: 100_000,
            };
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            );
            let _ = ready_tx.send(());
            let end = std::time::Instant::now() + limit;
            let mut frames = Vec::new();
            let mut buf = vec![0u8; 65536];
            while std::time::Instant::now() < end {
                let n = libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0);
                if n > 0 {
                    frames.push(buf[..n as usize].to_vec());
                }
            }
            libc::close(fd);
            frames
        }
    });
    ready.recv().expect("capture ready");
    t
}

/// A peer whose PublicIP changes (its lease rewritten) is dialled at the new address, its
/// session kept (same key).
#[test]
fn a_peer_changing_its_public_ip_is_reached_at_the_new_one() {
    if !root_or_skip("wireguard::a_peer_changing_its_public_ip_is_reached_at_the_new_one") {
        return;
    }
    let mut lab = Lab::new();
    for i in 1..=2 {
        lab.add_host(i, &format!("192.168.100.{i}/24"), 1500);
    }
    let mut leases: Vec<Lease> = (lab.hosts.iter())
        .map(|h| up(h, key_file("moved", h), wireguard()))
        .collect();
    lab.reconcile_all(&leases);
    lab.assert_full_mesh();
    let (h1, h2) = (&lab.hosts[0], &lab.hosts[1]);
    // (Deleting a primary address takes its secondaries along: the old one goes first.)
    h2.ns
        .must(&["ip", "addr", "del", "192.168.100.2/24", "dev", "eth0"]);
    h2.ns
        .must(&["ip", "addr", "add", "192.168.100.12/24", "dev", "eth0"]);
    leases[1].public_ip = "192.168.100.12".parse().expect("ip");
    let moved = PeerChanges {
        upsert: vec![leases[1].clone()],
        remove: vec![],
    };
    h1.apply(&moved).expect("apply");
    assert!(h1.reaches(h2), "c1 -> c2 at the new address");
    assert!(h2.reaches(h1), "c2 -> c1 from the new address");
    // A full pass agrees.
    h1.reconcile(&others(&leases, 0)).expect("reconcile");
    assert!(h1.reaches(h2));
}

#[test]
fn three_hosts_make_a_full_mesh() {
    if !root_or_skip("wireguard::three_hosts_make_a_full_mesh") {
        return;
    }
    let mut lab = Lab::new();
    for i in 1..=3 {
        lab.add_host(i, &format!("192.168.100.{i}/24"), 1500);
    }
    let leases: Vec<Lease> = (lab.hosts.iter())
        .map(|h| up(h, key_file("three", h), wireguard()))
        .collect();
    lab.reconcile_all(&leases);
    lab.assert_full_mesh();
    // A second pass with the same peers keeps every session: still a mesh, no drop counted.
    lab.reconcile_all(&leases);
    lab.assert_full_mesh();
    for h in &lab.hosts {
        let c = counters(h);
        assert_eq!(c.total_drops(), 0, "host {}: {c:?}", h.n);
    }
}

/// A flood of handshake initiations from a key no lease names (each with a valid MAC1: anyone
/// can make one from the public key in a lease) is answered with cookies past 100 a second, so
/// that weft spends no Diffie-Hellman on the rest; each is counted.
#[test]
fn a_flood_of_handshakes_is_answered_with_cookies() {
    use boringtun::noise::{Tunn, TunnResult};
    use boringtun::x25519::{PublicKey, StaticSecret};
    if !root_or_skip("wireguard::a_flood_of_handshakes_is_answered_with_cookies") {
        return;
    }
    let mut lab = Lab::new();
    for i in 1..=2 {
        lab.add_host(i, &format!("192.168.100.{i}/24"), 1500);
    }
    let (h1, h2) = (&lab.hosts[0], &lab.hosts[1]);
    let lease = up(h1, key_file("flood", h1), wireguard());
    let data: Value =
        serde_json::from_str(lease.backend_data.as_ref().expect("data").as_str()).expect("JSON");
    let key = {
        use base64::Engine as _;
        let b64 = data["PublicKey"].as_str().expect("key");
        let k = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .expect("base64");
        <[u8; 32]>::try_from(k).expect("32 bytes")
    };
    const SENT: u32 = 300;
    let cookies = h2.ns.run_in(|| {
        let sock = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind");
        sock.set_read_timeout(Some(std::time::Duration::from_millis(500)))
            .expect("timeout");
        let stranger = StaticSecret::from([9; 32]);
        let mut buf = [0u8; 256];
        for i in 0..SENT {
            let mut t = Tunn::new(stranger.clone(), PublicKey::from(key), None, None, i, None);
            if let TunnResult::WriteToNetwork(b) = t.format_handshake_initiation(&mut buf, false) {
                sock.send_to(b, "192.168.100.1:51820").expect("send");
            }
        }
        let mut cookies = 0u32;
        while let Ok(n) = sock.recv(&mut buf) {
            // A cookie reply: message type 3.
            if n == 64 && buf[0] == 3 {
                cookies += 1;
            }
        }
        cookies
    });
    std::thread::sleep(std::time::Duration::from_millis(300));
    let c = counters(h1);
    let (deferred, unknown) = (
        c.drop_count(DropReason::UnderLoad),
        c.drop_count(DropReason::UnknownSender),
    );
    assert!(cookies > 0, "no cookie came back: {c:?}");
    assert_eq!(deferred, u64::from(cookies), "each cookie counted: {c:?}");
    assert_eq!(
        deferred + unknown,
        u64::from(SENT),
        "every one counted once: {c:?}"
    );
    assert!(unknown <= 200, "at most 100 a second looked at: {c:?}");
}
