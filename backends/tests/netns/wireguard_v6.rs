//! wireguard on a dual-stack network, weft's userspace data plane driven directly (the backend
//! builds its devices on it): `flannel-wg-v6` carrying the IPv6 subnets alone between the hosts'
//! IPv6 addresses (flannel's separate mode), and one `flannel-wg` carrying both families over
//! either underlay (its one-device modes). The routes into the devices are made here, as the
//! backend makes them.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ipnet::Ipv6Net;
use weft_backends::offload::stats::StatsCell;
use weft_backends::udp::{Counters, DropReason};
use weft_backends::wireguard_uapi as uapi;
use weft_backends::wireguard_userspace::{
    public, DeviceSpec, PrivateKey, Userspace, WgPeer, DEVICE, DEVICE_V6,
};
use weft_backends::Stats;

use crate::harness::{Host, Lab, NETWORK};
use crate::wireguard::transfer;

const NETWORK6: &str = "fd00:244::/48";
const MTU: u32 = 1420;

/// Root and the kernel's IPv6, or a visible skip (a failure under CI=true).
fn ipv6_or_skip(test: &str) -> bool {
    weft_lab::require_ipv6(&format!("wireguard_v6::{test}"))
}

/// Host `n`'s IPv6 lease: fd00:244:0:<n>::/64.
fn subnet6(n: u8) -> Ipv6Net {
    format!("fd00:244:0:{n:x}::/64").parse().expect("subnet")
}

/// One host's running device, its key and where `wg show` asks it.
struct Node {
    /// Declared first: the worker stops before the rest goes.
    u: Userspace,
    key: PrivateKey,
    socket: PathBuf,
    stats: StatsCell,
}

impl Node {
    /// `spec`'s device on `h` (MTU 1420, a fresh key), its control socket in `dir`.
    fn start(h: &Host, spec: DeviceSpec, dir: &std::path::Path) -> Self {
        let key = PrivateKey::generate().expect("a key");
        let socket = dir.join(format!("h{}-{}.sock", h.n, spec.name));
        let (k, path) = (key.clone(), socket.clone());
        let u = h.agent.run(move || async move {
            let (conn, handle, _) = rtnetlink::new_connection().expect("netlink");
            let task = tokio::spawn(conn);
            let u = Userspace::start(&handle, spec, &k, MTU, path).await;
            task.abort();
            u.expect("userspace WireGuard")
        });
        let stats = StatsCell::new("wireguard");
        stats.start(u.live(), false);
        Self {
            u,
            key,
            socket,
            stats,
        }
    }

    fn stats(&self) -> Stats {
        self.stats.read()
    }

    /// `get=1` on its control socket, until a handshake shows (5 s at most).
    fn shown_after_handshake(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let text = uapi::query(&self.socket, Duration::from_secs(2)).expect("get=1");
            let peers = uapi::parse_get(&text).expect("an answer");
            if peers.iter().all(|p| p.2 > 0) {
                return text;
            }
            assert!(Instant::now() < deadline, "no handshake shown: {text}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Host `peer` (its device `node`) as a peer: its key, dialled at `endpoint`, its subnets of the
/// families asked for.
fn wg_peer(peer: &Host, node: &Node, endpoint: SocketAddr, v4: bool, v6: bool) -> WgPeer {
    WgPeer {
        subnet: peer.subnet,
        public_key: public(&node.key),
        endpoint,
        allowed_ip: v4.then_some(peer.subnet),
        allowed_ip6: v6.then(|| subnet6(peer.n)),
        psk: None,
        keepalive: None,
    }
}

/// Whether `from`'s container reaches `to`'s at `ip` (a few pings: the first waits for the
/// handshake).
fn pings(from: &Host, ip: IpAddr) -> bool {
    (0..5).any(|_| match ip {
        IpAddr::V4(a) => from.ping(a),
        IpAddr::V6(a) => from.ping6(a),
    })
}

/// Two hosts on 192.168.100.0/24 and fd00:192:168:100::/64, containers wired for both families
/// with MTU 1420, each running `spec`'s device (its control socket in the returned directory);
/// `None` (a visible skip) without IPv6.
fn dual_lab(test: &str, tag: &str, spec: DeviceSpec) -> Option<(Lab, PathBuf, Vec<Node>)> {
    if !ipv6_or_skip(test) {
        return None;
    }
    let mut lab = Lab::new();
    for i in 1..=2 {
        lab.add_host(i, &format!("192.168.100.{i}/24"), 1500);
    }
    for h in &lab.hosts {
        h.wire_container_dual(h.subnet, subnet6(h.n), Some(MTU));
    }
    let dir = std::env::temp_dir().join(format!("weft-wg6-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let nodes = lab
        .hosts
        .iter()
        .map(|h| Node::start(h, spec, &dir))
        .collect();
    Some((lab, dir, nodes))
}

/// [`dual_lab`] with one `flannel-wg` carrying both families (port 51820), and both networks
/// routed into it on each host.
fn one_device_lab(test: &str, tag: &str) -> Option<(Lab, PathBuf, Vec<Node>)> {
    let spec = DeviceSpec {
        name: DEVICE,
        port: 51820,
        v4: true,
        v6: true,
    };
    let (lab, dir, nodes) = dual_lab(test, tag, spec)?;
    for h in &lab.hosts {
        h.ns.ip(&format!("route add {NETWORK} dev {DEVICE}"));
        h.ns.ip(&format!("-6 route add {NETWORK6} dev {DEVICE}"));
    }
    Some((lab, dir, nodes))
}

/// Each of [`one_device_lab`]'s two devices given the other as its one peer, with both its
/// subnets, dialled at `ats[i]`:51820 (host `i`'s address).
fn point_at_each_other(lab: &Lab, nodes: &mut [Node], ats: [IpAddr; 2]) {
    let peers: Vec<WgPeer> = (0..2)
        .map(|i| {
            let at = SocketAddr::new(ats[1 - i], 51820);
            wg_peer(&lab.hosts[1 - i], &nodes[1 - i], at, true, true)
        })
        .collect();
    for (node, p) in nodes.iter_mut().zip(peers) {
        node.u.set_peers(vec![p]).expect("peers");
    }
}

/// Waits (5 s at most) until no packet has moved through `nodes` for half a second.
fn quiet(nodes: &[Node]) {
    let moved = || -> u64 {
        let c = nodes.iter().map(|n| n.stats().counters);
        c.map(|c| c.tx_packets + c.rx_packets).sum()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut last = moved();
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        let now = moved();
        if now == last {
            return;
        }
        last = now;
    }
}

fn ip6(h: &Host) -> IpAddr {
    weft_lab::topology::container_ip6(subnet6(h.n)).into()
}

fn ip4(h: &Host) -> IpAddr {
    h.container_ip().into()
}

/// Nothing dropped but the kernel's own MLD reports into the device when IPv6 comes up there
/// (to ff02::16, a few in its first seconds): no peer takes them, as with the kernel's
/// WireGuard.
fn assert_no_drops(c: Counters) {
    let no_route = c.drop_count(DropReason::NoRoute);
    assert!(no_route <= 4, "{c:?}");
    assert_eq!(c.total_drops() - no_route, 0, "{c:?}");
}

/// The value of each `key=` line of a `get=1` answer.
fn lines<'a>(text: &'a str, key: &str) -> Vec<&'a str> {
    let prefix = format!("{key}=");
    text.lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .collect()
}

#[test]
fn flannel_wg_v6_carries_the_ipv6_subnets_between_the_hosts_ipv6_addresses() {
    const TEST: &str = "flannel_wg_v6_carries_the_ipv6_subnets_between_the_hosts_ipv6_addresses";
    let spec = DeviceSpec {
        name: DEVICE_V6,
        port: 51821,
        v4: false,
        v6: true,
    };
    let Some((lab, dir, mut nodes)) = dual_lab(TEST, "sep", spec) else {
        return;
    };
    let (h1, h2) = (&lab.hosts[0], &lab.hosts[1]);
    for (i, h) in lab.hosts.iter().enumerate() {
        let link = h.ns.link(DEVICE_V6).expect("flannel-wg-v6 exists");
        assert_eq!(link["linkinfo"]["info_kind"], "tun", "{link}");
        assert_eq!(link["mtu"], MTU, "{link}");
        let sysctl = format!("net.ipv6.conf.{DEVICE_V6}.disable_ipv6");
        assert_eq!(h.ns.must(&["sysctl", "-n", &sysctl]).trim(), "0", "IPv6 on");
        h.ns.ip(&format!("-6 route add {NETWORK6} dev {DEVICE_V6}"));
        let other = &lab.hosts[1 - i];
        let at = SocketAddr::new(other.addr6().into(), 51821);
        let p = wg_peer(other, &nodes[1 - i], at, false, true);
        nodes[i].u.set_peers(vec![p]).expect("peers");
    }

    assert!(pings(h1, ip6(h2)), "c1 -> c2 over IPv6");
    assert!(pings(h2, ip6(h1)), "c2 -> c1 over IPv6");
    let text = nodes[0].shown_after_handshake();
    assert_eq!(lines(&text, "listen_port"), ["51821"], "{text}");
    assert_eq!(
        lines(&text, "endpoint"),
        ["[fd00:192:168:100::2]:51821"],
        "{text}"
    );
    assert_eq!(lines(&text, "allowed_ip"), ["fd00:244:0:2::/64"], "{text}");

    // Bulk TCP: the TUN hands over IPv6 super-packets (TSO6), split for sealing; what arrives is
    // written packet by packet.
    let (sent, got) = transfer(h1, h2, ip6(h2), 4 << 20);
    assert_eq!(got, sent, "c1 -> c2 corrupted");
    let (sent, got) = transfer(h2, h1, ip6(h1), 4 << 20);
    assert_eq!(got, sent, "c2 -> c1 corrupted");
    let s = nodes[0].stats();
    assert!(s.tun_offload && s.udp_gso && s.udp_gro, "{s:?}");
    assert_eq!(s.tun_read_errors, 0, "every IPv6 super-packet split: {s:?}");
    let c = s.counters;
    assert!(c.tx_bytes > 4 << 20 && c.rx_bytes > 4 << 20, "{c:?}");
    assert_no_drops(c);

    // The socket is IPv6 only: an IPv4 datagram to its port never reaches the worker.
    for to in ["192.168.100.1:51821", "[fd00:192:168:100::1]:51821"] {
        let to: SocketAddr = to.parse().expect("addr");
        h2.ns.run_in(|| {
            let any = if to.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" };
            let sock = std::net::UdpSocket::bind(any).expect("bind");
            for _ in 0..5 {
                let _ = sock.send_to(b"weft", to);
            }
        });
    }
    std::thread::sleep(Duration::from_millis(300));
    let c = nodes[0].stats().counters;
    assert_eq!(
        c.drop_count(DropReason::UnknownSender),
        5,
        "IPv6 ones alone: {c:?}"
    );
    drop(nodes);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn one_flannel_wg_carries_both_families_over_an_ipv4_or_an_ipv6_underlay() {
    const TEST: &str = "one_flannel_wg_carries_both_families_over_an_ipv4_or_an_ipv6_underlay";
    let Some((lab, dir, mut nodes)) = one_device_lab(TEST, "one") else {
        return;
    };
    let (h1, h2) = (&lab.hosts[0], &lab.hosts[1]);
    for h in &lab.hosts {
        // AF_INET6 sockets on 51820 take both families.
        let udp6 = h.ns.must(&["cat", "/proc/net/udp6"]);
        assert!(udp6.contains(&format!(":{:04X} ", 51820)), "{udp6}");
    }
    let mesh = |what: &str| {
        for (a, b) in [(h1, h2), (h2, h1)] {
            assert!(pings(a, ip4(b)), "c{} -> c{} IPv4, {what}", a.n, b.n);
            assert!(pings(a, ip6(b)), "c{} -> c{} IPv6, {what}", a.n, b.n);
        }
    };

    // Peers at their IPv4 addresses (v4-mapped on the socket, plain everywhere else).
    point_at_each_other(&lab, &mut nodes, [h1.ip().into(), h2.ip().into()]);
    mesh("over IPv4");
    let text = nodes[0].shown_after_handshake();
    assert_eq!(lines(&text, "endpoint"), ["192.168.100.2:51820"], "{text}");
    let both = ["10.244.2.0/24", "fd00:244:0:2::/64"];
    assert_eq!(lines(&text, "allowed_ip"), both, "{text}");
    let (sent, got) = transfer(h1, h2, ip4(h2), 2 << 20);
    assert_eq!(got, sent, "IPv4 bulk over the IPv4 underlay corrupted");

    // Then at their IPv6 addresses, the IPv4 underlay gone: both families over IPv6 alone.
    // Once the bulk's last segments have crossed (nothing then is sent into the underlay as it
    // goes), the underlay goes first: a datagram still on its way from an old address when the
    // new one is set would move the endpoint back (a peer follows where it speaks from).
    quiet(&nodes);
    for h in &lab.hosts {
        h.ns.ip(&format!("addr del {} dev eth0", h.underlay));
    }
    point_at_each_other(&lab, &mut nodes, [h1.addr6().into(), h2.addr6().into()]);
    mesh("over IPv6");
    let text = nodes[0].shown_after_handshake();
    assert_eq!(
        lines(&text, "endpoint"),
        ["[fd00:192:168:100::2]:51820"],
        "{text}"
    );
    let text = nodes[1].shown_after_handshake();
    assert_eq!(
        lines(&text, "endpoint"),
        ["[fd00:192:168:100::1]:51820"],
        "{text}"
    );
    let (sent, got) = transfer(h2, h1, ip6(h1), 2 << 20);
    assert_eq!(got, sent, "IPv6 bulk over the IPv6 underlay corrupted");
    for n in &nodes {
        let c = n.stats().counters;
        assert!(c.tx_packets > 0 && c.rx_packets > 0, "{c:?}");
        assert_no_drops(c);
    }
    drop(nodes);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn flows_to_one_peer_spread_over_the_workers_which_share_its_session() {
    const TEST: &str = "flows_to_one_peer_spread_over_the_workers_which_share_its_session";
    let Some((lab, dir, mut nodes)) = one_device_lab(TEST, "flows") else {
        return;
    };
    let (h1, h2) = (&lab.hosts[0], &lab.hosts[1]);
    point_at_each_other(&lab, &mut nodes, [h1.ip().into(), h2.ip().into()]);
    assert!(pings(h1, ip4(h2)), "c1 -> c2");
    // Host 1 started the handshake; the control thread, not a worker, took the answer and sent
    // what waited for the session (it counts in the slot after the workers').
    let live = nodes[0].u.live();
    let control = live
        .slots
        .worker(live.slots.workers())
        .expect("the control slot");
    assert!(control.tx_packets >= 1, "{control:?}");

    // 16 TCP flows at once, half of each family, all to one peer: its datagrams arrive at one
    // worker (one socket per peer address), which writes each flow through the TUN queue the
    // flow hashes to, so the flows' data leaves through all the queues and every worker seals
    // some of it with the peer's one session.
    std::thread::scope(|scope| {
        let flows: Vec<_> = (0..16)
            .map(|i| {
                let ip = if i % 2 == 0 { ip4(h2) } else { ip6(h2) };
                scope.spawn(move || transfer(h1, h2, ip, 1 << 20))
            })
            .collect();
        for f in flows {
            let (sent, got) = f.join().expect("a flow");
            assert_eq!(got, sent, "a flow corrupted");
        }
    });

    let workers = live.slots.workers();
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    assert_eq!(workers, cores.min(16), "one worker per core");
    let sealing: Vec<u64> = (0..workers)
        .map(|id| live.slots.worker(id).expect("a slot").tx_packets)
        .collect();
    // Each worker's fair share is a 1/workers; two flows of 16 on a worker is 1/8, which a
    // fifth of its fair share (1/10 with two) still counts. All but one flow on one queue is a
    // 1 in 2,000 chance.
    let total: u64 = sealing.iter().sum();
    let busy = (sealing.iter())
        .filter(|n| **n * 5 * workers as u64 >= total)
        .count();
    assert!(
        workers == 1 || busy >= 2,
        "the flows were not spread: {sealing:?}"
    );
    assert_no_drops(nodes[0].stats().counters);
    assert_no_drops(nodes[1].stats().counters);
    drop(nodes);
    let _ = std::fs::remove_dir_all(&dir);
}
