//! udp backend: flannel's TUN device, wire format and peer checks, forwarding in weft's workers.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use weft_backends::udp::{DropReason, Stats};
use weft_backends::{Event, Lease};

use weft_lab::flannel::{self, checksum, udp_checksum};

use crate::harness::{enter, lab, must, others, root_or_skip, Host, Lab, Netns};

const DEV: &str = "flannel0";
const PORT: u16 = 8285;

fn udp() -> Value {
    json!({"Type": "udp"})
}

/// The workers' counters once they have settled: workers publish after each batch, so the
/// last packets of a test may still be on their way into the totals.
fn stats(h: &Host) -> Stats {
    let read = || {
        h.agent
            .with_backend(|b| Box::pin(async move { b.stats().expect("a udp backend").read() }))
    };
    let mut last = read();
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(50));
        let now = read();
        if now == last {
            break;
        }
        last = now;
    }
    last
}

/// Starts `f` on a thread inside `ns`, for servers and senders that run alongside the test.
fn spawn_in<T: Send + 'static>(
    ns: &Netns,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let name = ns.name.clone();
    std::thread::spawn(move || {
        enter(&name);
        f()
    })
}

/// A container's IPv4/UDP packet (source port 40000) with correct checksums.
fn ipv4_udp(src: Ipv4Addr, dst: Ipv4Addr, dport: u16, payload: &[u8]) -> Vec<u8> {
    flannel::ipv4_udp(src, dst, 40000, dport, payload)
}

type Datagrams = Vec<(Vec<u8>, SocketAddr)>;

/// Listens on `port` in `ns` (listening when this returns); the handle gives what arrived
/// (payload, source) within `limit`.
fn collect_udp(ns: &Netns, port: u16, limit: Duration) -> std::thread::JoinHandle<Datagrams> {
    let (ready_tx, ready) = mpsc::channel();
    let t = spawn_in(ns, move || {
        let sock = UdpSocket::bind(("0.0.0.0", port)).expect("bind listener");
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        let _ = ready_tx.send(());
        let end = Instant::now() + limit;
        let mut got = Vec::new();
        let mut buf = vec![0u8; 65536];
        while Instant::now() < end {
            if let Ok((n, from)) = sock.recv_from(&mut buf) {
                got.push((buf[..n].to_vec(), from));
            }
        }
        got
    });
    ready.recv().expect("listener ready");
    t
}

#[test]
fn three_hosts_on_the_classic_config_reach_each_other_through_flannel0() {
    if !root_or_skip("udp::three_hosts_on_the_classic_config_reach_each_other_through_flannel0") {
        return;
    }
    // `{"Network": …}` with no Backend at all means udp, as in flannel.
    let (lab, leases) = lab(3, json!({}));
    assert_eq!(leases[0].backend_type, "udp");
    assert_eq!(
        leases[0].backend_data, None,
        "flannel's udp publishes no BackendData"
    );
    lab.reconcile_all(&leases);

    let h1 = &lab.hosts[0];
    assert_eq!(h1.mtu(), 1472, "underlay 1500 − 28");
    let link = h1.ns.link(DEV).expect("flannel0 exists");
    assert_eq!(link["linkinfo"]["info_kind"], "tun", "{link}");
    let info = &link["linkinfo"]["info_data"];
    assert_eq!(info["type"], "tun", "{link}");
    assert_eq!(info["pi"], false, "{link}");
    assert_eq!(info["multi_queue"], true, "{link}");
    assert_eq!(info["persist"], true, "{link}");
    assert_eq!(link["mtu"], 1472);
    // Super-packets of at most 128 segments: what one worker read splits into.
    assert_eq!(link["gso_max_segs"], 128);
    assert!(
        link["flags"]
            .as_array()
            .is_some_and(|f| f.contains(&json!("UP"))),
        "{link}"
    );
    let addrs = h1.ns.ip_json(&format!("-4 addr show dev {DEV}"));
    let a = &addrs[0]["addr_info"];
    assert_eq!(
        (
            a[0]["local"].as_str(),
            a[0]["prefixlen"].as_u64(),
            a.as_array().map(Vec::len)
        ),
        (Some("10.244.1.0"), Some(32), Some(1))
    );
    // One owned route: the whole network into the device, no gateway, as flannel sets it.
    let routes = h1.ns.weft_routes();
    assert_eq!(routes.len(), 1, "{routes:?}");
    let r = &routes[0];
    assert_eq!(r["dst"], "10.244.0.0/16");
    assert_eq!(r["dev"], DEV);
    assert!(r.get("gateway").is_none(), "{r}");
    // Universe scope, as flannel's udp backend adds it (`ip -j` leaves the default out).
    assert!(r.get("scope").is_none(), "{r}");

    lab.assert_full_mesh();
    let s = stats(h1);
    assert_eq!(
        s.workers,
        std::thread::available_parallelism()
            .map_or(1, usize::from)
            .min(16)
    );
    assert!(
        s.counters.tx_packets > 0 && s.counters.rx_packets > 0,
        "{s:?}"
    );
    assert_eq!(s.counters.total_drops(), 0, "{s:?}");
}

#[test]
fn peers_removed_and_added_by_reconcile() {
    if !root_or_skip("udp::peers_removed_and_added_by_reconcile") {
        return;
    }
    let (lab, leases) = lab(3, udp());
    lab.reconcile_all(&leases);
    let (h1, h2, h3) = (&lab.hosts[0], &lab.hosts[1], &lab.hosts[2]);

    // Host 3 leaves host 1's view: nothing flows between them, in either direction.
    h1.reconcile(&[leases[1].clone()]).expect("reconcile");
    assert!(h1.reaches(h2));
    assert!(!h1.reaches(h3));
    assert!(!h3.reaches(h1));
    let s = stats(h1);
    assert!(s.counters.drop_count(DropReason::NoRoute) > 0, "{s:?}");
    assert!(
        s.counters.drop_count(DropReason::UnknownSender) > 0,
        "{s:?}"
    );
    // The route stays: it covers the whole network whoever is in it.
    assert_eq!(h1.ns.weft_routes().len(), 1);

    // And comes back.
    h1.reconcile(&others(&leases, 0)).expect("reconcile");
    lab.assert_full_mesh();
}

#[test]
fn second_reconcile_changes_nothing() {
    if !root_or_skip("udp::second_reconcile_changes_nothing") {
        return;
    }
    let (lab, leases) = lab(3, udp());
    lab.reconcile_all(&leases);
    let h1 = &lab.hosts[0];
    h1.reconcile(&others(&leases, 0)).expect("reconcile");

    h1.assert_reconcile_is_a_no_op(&others(&leases, 0), || h1.ns.kernel_dump(DEV));
}

#[test]
fn peers_of_other_types_garbage_and_flannel_udp_leases() {
    if !root_or_skip("udp::peers_of_other_types_garbage_and_flannel_udp_leases") {
        return;
    }
    let (lab, leases) = lab(2, udp());
    let peer = |n: u8, kind: &str| Lease {
        subnet: format!("10.244.{n}.0/24").parse().expect("subnet"),
        public_ip: format!("192.168.100.{n}").parse().expect("ip"),
        backend_type: kind.into(),
        backend_data: None,
        ipv6: None,
    };
    // Host 2 as flanneld writes its udp lease: no BackendType at all.
    let mut flannel = leases[1].clone();
    flannel.backend_type = String::new();
    let errs = lab.hosts[0]
        .reconcile(&[
            flannel,
            peer(7, "vxlan"),
            Lease {
                subnet: "10.99.0.0/24".parse().expect("subnet"),
                ..peer(8, "udp")
            },
            Lease {
                subnet: "10.244.2.0/25".parse().expect("subnet"),
                ..peer(9, "udp")
            },
        ])
        .expect_err("garbage reported");
    assert_eq!(errs.len(), 2, "{errs:?}");
    assert!(errs.iter().any(|e| e.contains("10.99.0.0/24")), "{errs:?}");
    assert!(errs.iter().any(|e| e.contains("overlaps")), "{errs:?}");
    lab.hosts[1]
        .reconcile(&others(&leases, 1))
        .expect("reconcile");
    assert!(lab.hosts[0].reaches(&lab.hosts[1]));
}

#[test]
fn weftd_exit_keeps_flannel0_and_a_new_backend_resumes_traffic() {
    if !root_or_skip("udp::weftd_exit_keeps_flannel0_and_a_new_backend_resumes_traffic") {
        return;
    }
    let (lab, leases) = lab(2, udp());
    lab.reconcile_all(&leases);
    let (h1, h2) = (&lab.hosts[0], &lab.hosts[1]);
    assert!(h1.reaches(h2));
    let before = configured(&h1.ns);
    let survives = h1
        .agent
        .with_backend(|b| Box::pin(async move { b.survives_restart() }));
    assert!(survives.contains("flannel0"), "{survives}");

    let stream = EchoStream::start(&h1.container, &h2.container, h2.container_ip());
    std::thread::sleep(Duration::from_millis(300));
    let stopped = Instant::now();
    h1.stop();
    // weftd is gone: the device, its address and route stay (only its carrier drops).
    let link = h1.ns.link(DEV).expect("flannel0 outlives weftd");
    assert_eq!(link["linkinfo"]["info_data"]["persist"], true);
    assert_eq!(
        link["linkinfo"]["info_data"]["numqueues"], 0,
        "workers still attached"
    );
    assert_eq!(
        before,
        configured(&h1.ns),
        "address or route lost with weftd"
    );

    // The next weftd reopens it.
    h1.start(udp());
    assert_eq!(h1.prepare(Some(leases[0].clone())), None);
    h1.configure(&leases[0]);
    h1.reconcile(&others(&leases, 0)).expect("reconcile");
    let restarted = stopped.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let (sent, gap) = stream.stop();
    assert!(h1.reaches(h2));
    assert_eq!(before, configured(&h1.ns), "reopening changed the kernel");
    let _ = writeln!(
        std::io::stderr(),
        "udp restart: backend down and up again in {restarted:?}; {sent} echoes at 2 ms, longest \
         gap in replies {gap:?}"
    );
}

/// flannel0's configuration and the routes: what must survive weftd. Not the carrier, which
/// is off while no process holds a queue (the kernel then flags the route `linkdown`).
fn configured(ns: &Netns) -> Value {
    let mut link = ns.link(DEV).unwrap_or(Value::Null);
    let up = link["flags"]
        .as_array()
        .is_some_and(|f| f.contains(&json!("UP")));
    if let Some(o) = link.as_object_mut() {
        o.retain(|k, _| ["ifindex", "mtu", "linkinfo"].contains(&k.as_str()));
    }
    // Which process holds queues is not configuration.
    if let Some(o) = link["linkinfo"]["info_data"].as_object_mut() {
        o.remove("numqueues");
    }
    let mut routes = ns.routes_json();
    for r in &mut routes {
        if let Some(o) = r.as_object_mut() {
            o.remove("flags");
        }
    }
    let addrs = ns.ip_json(&format!("-4 addr show dev {DEV}"));
    json!({"link": link, "up": up, "routes": routes, "addr": addrs[0]["addr_info"]})
}

/// Echoes with sequence numbers every 2 ms from `from` to an echo server on `ip` in `to`,
/// recording when each reply came back.
struct EchoStream {
    stop: Arc<AtomicBool>,
    server: std::thread::JoinHandle<()>,
    client: std::thread::JoinHandle<(u32, Duration)>,
}

impl EchoStream {
    fn start(from: &Netns, to: &Netns, ip: Ipv4Addr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready) = mpsc::channel();
        let s = stop.clone();
        let server = spawn_in(to, move || {
            let sock = UdpSocket::bind("0.0.0.0:7007").expect("bind echo");
            sock.set_read_timeout(Some(Duration::from_millis(100)))
                .expect("timeout");
            let _ = ready_tx.send(());
            let mut buf = [0u8; 16];
            while !s.load(Ordering::Relaxed) {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    let _ = sock.send_to(&buf[..n], from);
                }
            }
        });
        ready.recv().expect("echo server");
        let s = stop.clone();
        let client = spawn_in(from, move || {
            let sock = UdpSocket::bind("0.0.0.0:0").expect("bind");
            sock.set_nonblocking(true).expect("nonblocking");
            let start = Instant::now();
            let mut seq: u32 = 0;
            let mut last_reply = Instant::now();
            let mut gap = Duration::ZERO;
            let mut buf = [0u8; 16];
            while !s.load(Ordering::Relaxed) {
                let _ = sock.send_to(&seq.to_be_bytes(), (ip, 7007));
                seq += 1;
                std::thread::sleep(Duration::from_millis(2));
                while let Ok((n, _)) = sock.recv_from(&mut buf) {
                    if n == 4 {
                        gap = gap.max(last_reply.elapsed());
                        last_reply = Instant::now();
                    }
                }
                if start.elapsed() > Duration::from_secs(60) {
                    break;
                }
            }
            (seq, gap.max(last_reply.elapsed()))
        });
        Self {
            stop,
            server,
            client,
        }
    }

    /// Stops both ends; returns how many echoes were sent and the longest time without a reply.
    fn stop(self) -> (u32, Duration) {
        self.stop.store(true, Ordering::Relaxed);
        let r = self.client.join().expect("echo client");
        self.server.join().expect("echo server");
        r
    }
}

#[test]
fn bulk_tcp_arrives_intact_with_offloads_on_and_off() {
    if !root_or_skip("udp::bulk_tcp_arrives_intact_with_offloads_on_and_off") {
        return;
    }
    for offload in [true, false] {
        let (lab, leases) = lab(2, json!({"Type": "udp", "Offload": offload}));
        lab.reconcile_all(&leases);
        let (h1, h2) = (&lab.hosts[0], &lab.hosts[1]);
        let s = stats(h1);
        assert_eq!(s.tun_offload, offload, "{s:?}");
        assert_eq!(s.udp_gso, offload, "{s:?}");
        assert_eq!(s.udp_gro, offload, "{s:?}");

        const BYTES: u64 = 64 << 20;
        // Both ways at once: segmentation on one side's TUN reads, coalescing on the other's
        // writes, in each direction.
        let a = transfer(&h1.container, &h2.container, h2.container_ip(), BYTES);
        let b = transfer(&h2.container, &h1.container, h1.container_ip(), BYTES);
        let (sent_a, got_a) = a();
        let (sent_b, got_b) = b();
        assert_eq!(got_a, sent_a, "offload {offload}: c1 -> c2 corrupted");
        assert_eq!(got_b, sent_b, "offload {offload}: c2 -> c1 corrupted");
        let s = stats(h1);
        assert!(s.counters.tx_bytes > BYTES, "{s:?}");
        assert_eq!(s.counters.total_drops(), 0, "offload {offload}: {s:?}");
    }
}

#[test]
fn a_burst_of_small_datagrams_arrives_intact_in_few_tun_writes() {
    if !root_or_skip("udp::a_burst_of_small_datagrams_arrives_intact_in_few_tun_writes") {
        return;
    }
    let (lab, leases) = lab(2, udp());
    lab.reconcile_all(&leases);
    let (h1, h2) = (&lab.hosts[0], &lab.hosts[1]);
    const COUNT: u32 = 3000;
    const PORT_IN: u16 = 7001;
    // A receive buffer deep enough for the whole burst: only the tunnel may lose datagrams.
    let (ready_tx, ready) = mpsc::channel();
    let receiver = spawn_in(&h2.container, move || {
        let sock = UdpSocket::bind(("0.0.0.0", PORT_IN)).expect("bind");
        nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::RcvBufForce, &(16 << 20))
            .expect("SO_RCVBUFFORCE");
        sock.set_read_timeout(Some(Duration::from_millis(500)))
            .expect("timeout");
        let _ = ready_tx.send(());
        let mut got = Vec::new();
        let mut buf = [0u8; 2048];
        while let Ok(n) = sock.recv(&mut buf) {
            got.push(buf[..n].to_vec());
        }
        got
    });
    ready.recv().expect("receiver ready");
    let counter = |h: &Host, dir: &str, what: &str| {
        let link = h.ns.ip_json(&format!("-s link show dev {DEV}"));
        link[0]["stats64"][dir][what]
            .as_u64()
            .expect("flannel0 counters")
    };
    let frames_before = counter(h2, "rx", "packets");
    let queue_drops_before = counter(h1, "tx", "dropped");
    let to = SocketAddr::V4(SocketAddrV4::new(h2.container_ip(), PORT_IN));
    let payload = |i: u32| -> Vec<u8> {
        let mut p = i.to_be_bytes().to_vec();
        p.extend((0..60).map(|k| (i as u8).wrapping_mul(31).wrapping_add(k)));
        p
    };
    spawn_in(&h1.container, move || {
        let sock = UdpSocket::bind("0.0.0.0:0").expect("bind");
        for i in 0..COUNT {
            // Back to back in bursts: the sender outruns the workers, which then batch.
            sock.send_to(&payload(i), to).expect("send");
            if i % 100 == 99 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    })
    .join()
    .expect("sender");
    let got = receiver.join().expect("receiver");
    let frames = counter(h2, "rx", "packets") - frames_before;
    // flannel0's queue overflowing on the sending host: the kernel's drop, before weft's reads.
    let queue_drops = counter(h1, "tx", "dropped") - queue_drops_before;
    let mut seen = vec![false; COUNT as usize];
    for d in &got {
        let i = u32::from_be_bytes(d[..4].try_into().expect("sequence number"));
        assert_eq!(d, &payload(i), "datagram {i} altered on the way");
        assert!(
            !std::mem::replace(&mut seen[i as usize], true),
            "datagram {i} twice"
        );
    }
    let s = stats(h2);
    assert_eq!(
        got.len() as u64 + s.counters.total_drops() + queue_drops,
        u64::from(COUNT),
        "every datagram arrived or is counted as dropped ({queue_drops} in flannel0's queue); {s:?}"
    );
    assert!(
        got.len() as u32 >= COUNT / 2,
        "{} of {COUNT} arrived; {s:?}",
        got.len()
    );
    if s.tun_uso {
        assert!(
            frames * 4 < got.len() as u64,
            "{} datagrams in {frames} TUN writes: not merged",
            got.len()
        );
    } else {
        eprintln!("note: this kernel's TUN takes no USO frames; datagrams are written one by one");
    }
}

/// Sends `bytes` pseudo-random bytes over TCP from `from` to `ip` in `to`; the returned closure
/// waits and gives (what was sent, what arrived) as (length, FNV-1a hash).
fn transfer(
    from: &Netns,
    to: &Netns,
    ip: Ipv4Addr,
    bytes: u64,
) -> impl FnOnce() -> ((u64, u64), (u64, u64)) {
    let (port_tx, port_rx) = mpsc::channel();
    let receiver = spawn_in(to, move || {
        let l = TcpListener::bind("0.0.0.0:0").expect("listen");
        let _ = port_tx.send(l.local_addr().expect("addr").port());
        let (mut s, _) = l.accept().expect("accept");
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let mut h = Fnv::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => h.feed(&buf[..n]),
                Err(e) => panic!("receive: {e} after {} bytes", h.len),
            }
        }
        (h.len, h.hash)
    });
    let port = port_rx.recv().expect("receiver port");
    let sender = spawn_in(from, move || {
        let mut s = TcpStream::connect_timeout(
            &SocketAddr::V4(SocketAddrV4::new(ip, port)),
            Duration::from_secs(5),
        )
        .expect("connect");
        s.set_write_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let mut h = Fnv::new();
        let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
        let mut buf = vec![0u8; 1 << 16];
        while h.len < bytes {
            for w in buf.chunks_exact_mut(8) {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                w.copy_from_slice(&rng.to_le_bytes());
            }
            s.write_all(&buf).expect("send");
            h.feed(&buf);
        }
        (h.len, h.hash)
    });
    move || {
        let sent = sender.join().expect("sender");
        let got = receiver.join().expect("receiver");
        (sent, got)
    }
}

struct Fnv {
    len: u64,
    hash: u64,
}

impl Fnv {
    fn new() -> Self {
        Self {
            len: 0,
            hash: 0xcbf2_9ce4_8422_2325,
        }
    }

    fn feed(&mut self, data: &[u8]) {
        for b in data {
            self.hash ^= u64::from(*b);
            self.hash = self.hash.wrapping_mul(0x0100_0000_01b3);
        }
        self.len += data.len() as u64;
    }
}

#[test]
fn forged_datagrams_are_dropped_and_counted() {
    if !root_or_skip("udp::forged_datagrams_are_dropped_and_counted") {
        return;
    }
    let (mut lab, leases) = lab(2, udp());
    lab.reconcile_all(&leases);
    let outsider = lab.add_outsider("192.168.100.99/24");
    let outsider_name = outsider.name.clone();
    let (h1, h2) = (&lab.hosts[0], &lab.hosts[1]);
    let c1 = h1.container_ip();
    let target = SocketAddrV4::new(h1.ip(), PORT);
    let listener = collect_udp(&h1.container, 9999, Duration::from_secs(2));

    let good = |src: Ipv4Addr, dst: Ipv4Addr| ipv4_udp(src, dst, 9999, b"forged");
    let mut ipv6 = good(Ipv4Addr::new(10, 244, 2, 2), c1);
    ipv6[0] = 0x60;
    let mut bad_checksum = good(Ipv4Addr::new(10, 244, 2, 2), c1);
    bad_checksum[10] ^= 0xff;
    let from_host2: Vec<(Vec<u8>, DropReason)> = vec![
        // An inner source outside host 2's lease (host 3's, or the outside world).
        (
            good(Ipv4Addr::new(10, 244, 3, 2), c1),
            DropReason::SourceNotInSenderLease,
        ),
        (
            good(Ipv4Addr::new(8, 8, 8, 8), c1),
            DropReason::SourceNotInSenderLease,
        ),
        // Not for this host's lease.
        (
            good(Ipv4Addr::new(10, 244, 2, 2), Ipv4Addr::new(10, 244, 3, 2)),
            DropReason::DestinationNotLocal,
        ),
        (
            good(Ipv4Addr::new(10, 244, 2, 2), c1)[..15].to_vec(),
            DropReason::Truncated,
        ),
        (
            good(Ipv4Addr::new(10, 244, 2, 2), c1)[..30].to_vec(),
            DropReason::BadLength,
        ),
        (ipv6, DropReason::NotIpv4),
        (bad_checksum, DropReason::BadChecksum),
        (Vec::new(), DropReason::Truncated),
    ];
    let before = stats(h1).counters;
    let expected: Vec<DropReason> = from_host2.iter().map(|(_, r)| *r).collect();
    h2.ns.run_in(move || {
        let sock = UdpSocket::bind("0.0.0.0:0").expect("bind");
        for (d, _) in &from_host2 {
            sock.send_to(d, target).expect("send");
        }
    });
    // A stranger on the underlay with a perfectly good packet.
    let stranger = good(Ipv4Addr::new(10, 244, 2, 2), c1);
    let name = outsider_name.clone();
    std::thread::spawn(move || {
        enter(&name);
        let sock = UdpSocket::bind(("0.0.0.0", PORT)).expect("bind");
        sock.send_to(&stranger, target).expect("send");
    })
    .join()
    .expect("outsider");

    let got = listener.join().expect("listener");
    assert!(got.is_empty(), "forged packets delivered: {got:?}");
    let after = stats(h1).counters;
    let mut want = before.clone();
    for r in expected {
        want.count_drop(r);
    }
    want.count_drop(DropReason::UnknownSender);
    for r in DropReason::ALL {
        assert_eq!(after.drop_count(r), want.drop_count(r), "{r}: {after:?}");
    }
    // Still working for real traffic.
    assert!(h1.reaches(h2));
}

#[test]
fn flannel_datagrams_are_understood_and_weft_sends_single_ip_packets() {
    if !root_or_skip("udp::flannel_datagrams_are_understood_and_weft_sends_single_ip_packets") {
        return;
    }
    let (lab, leases) = lab(2, udp());
    lab.reconcile_all(&leases);
    let (h1, h2) = (&lab.hosts[0], &lab.hosts[1]);
    // Host 2 becomes a hand-made flannel node: weft stops there, freeing port 8285.
    h2.stop();
    let c1 = h1.container_ip();
    let c2 = h2.container_ip();
    let h1_ip = h1.ip();

    // flannel → weft: one raw IP packet in a datagram from port 8285 reaches the container.
    let listener = collect_udp(&h1.container, 9999, Duration::from_secs(2));
    let pkt = ipv4_udp(c2, c1, 9999, b"from flannel");
    h2.ns.run_in(move || {
        let sock = UdpSocket::bind(("0.0.0.0", PORT)).expect("bind 8285");
        sock.send_to(&pkt, (h1_ip, PORT)).expect("send");
    });
    let got = listener.join().expect("listener");
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].0, b"from flannel");
    assert_eq!(got[0].1, SocketAddr::V4(SocketAddrV4::new(c2, 40000)));

    // weft → flannel: every datagram is exactly one IPv4 packet with correct checksums, also
    // when the container sends a UDP GSO batch (split from one TUN super-packet).
    let capture = collect_udp(&h2.ns, PORT, Duration::from_secs(2));
    h1.container.run_in(move || {
        let sock = UdpSocket::bind("0.0.0.0:0").expect("bind");
        sock.send_to(b"single", (c2, 9999)).expect("send");
        nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::UdpGsoSegment, &1000)
            .expect("UDP_SEGMENT");
        sock.send_to(&[7u8; 8000], (c2, 9999))
            .expect("send GSO batch");
    });
    let got = capture.join().expect("capture");
    assert_eq!(got.len(), 9, "one datagram per packet: {:?}", got.len());
    for (d, from) in &got {
        assert_eq!(*from, SocketAddr::V4(SocketAddrV4::new(h1_ip, PORT)));
        assert_eq!(d[0], 0x45, "IPv4, no options");
        assert_eq!(
            usize::from(u16::from_be_bytes([d[2], d[3]])),
            d.len(),
            "one packet"
        );
        assert_eq!(checksum(&[&d[..20]]), 0, "IP header checksum");
        assert_eq!(&d[12..16], &c1.octets());
        assert_eq!(&d[16..20], &c2.octets());
        assert_eq!(d[9], 17);
        let stored = u16::from_be_bytes([d[26], d[27]]);
        assert_eq!(stored, udp_checksum(d), "UDP checksum");
        // 64 from the container, −1 forwarding into flannel0, −1 in weft as a router.
        assert_eq!(d[8], 62, "TTL");
    }
    let sizes: Vec<usize> = got.iter().map(|(d, _)| d.len() - 28).collect();
    assert_eq!(sizes[0], 6);
    assert_eq!(&sizes[1..], &[1000; 8]);
}

#[test]
fn no_peer_for_a_destination_answers_icmp_net_unreachable() {
    if !root_or_skip("udp::no_peer_for_a_destination_answers_icmp_net_unreachable") {
        return;
    }
    let (lab, leases) = lab(2, udp());
    lab.reconcile_all(&leases);
    let h1 = &lab.hosts[0];
    let err = h1.container.run_in(|| {
        let sock = UdpSocket::bind("0.0.0.0:0").expect("bind");
        sock.connect((Ipv4Addr::new(10, 244, 9, 9), 9))
            .expect("connect");
        // Net unreachable is a soft error: a UDP socket hears of it only with IP_RECVERR.
        nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::Ipv4RecvErr, &true)
            .expect("IP_RECVERR");
        sock.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let _ = sock.send(b"anyone?");
        sock.recv(&mut [0u8; 16]).map_err(|e| e.raw_os_error())
    });
    let s = stats(h1);
    assert_eq!(
        err,
        Err(Some(libc::ENETUNREACH)),
        "ICMP net unreachable came back: {s:?}"
    );
    assert_eq!(s.counters.icmp_sent, 1, "{s:?}");
    assert_eq!(s.counters.drop_count(DropReason::NoRoute), 1, "{s:?}");
}

#[test]
fn mtu_is_underlay_minus_28_or_lower_as_configured() {
    if !root_or_skip("udp::mtu_is_underlay_minus_28_or_lower_as_configured") {
        return;
    }
    let mut lab = Lab::new();
    lab.add_host(1, "192.168.100.1/24", 9000);
    let h = &lab.hosts[0];
    h.up(udp());
    assert_eq!(h.mtu(), 8972);
    assert_eq!(h.ns.link(DEV).expect("device")["mtu"], 8972);

    h.up(json!({"Type": "udp", "MTU": 1400}));
    assert_eq!(h.mtu(), 1400);
    assert_eq!(h.ns.link(DEV).expect("device")["mtu"], 1400);

    let e = h
        .try_start(json!({"Type": "udp", "MTU": 8973}))
        .expect_err("above underlay − 28");
    assert!(e.contains("MTU") && e.contains("8972"), "{e}");
}

#[test]
fn a_flannel0_of_another_kind_is_reported_not_clobbered() {
    if !root_or_skip("udp::a_flannel0_of_another_kind_is_reported_not_clobbered") {
        return;
    }
    let mut lab = Lab::new();
    let h = lab.add_host(1, "192.168.100.1/24", 1500);
    let lease = h.lease("udp", None);
    let attempt = |h: &Host| {
        h.start(udp());
        let lease = lease.clone();
        h.agent.with_backend(move |b| {
            Box::pin(async move { b.configure(&lease).await.map_err(|e| e.to_string()) })
        })
    };
    for (make, want) in [
        ("link add flannel0 type bridge", "not a TUN device"),
        ("tuntap add flannel0 mode tun", "single-queue"),
        ("tuntap add flannel0 mode tap multi_queue", "TAP"),
    ] {
        h.ns.ip(make);
        let e = attempt(h).expect_err(make);
        assert!(e.contains(want) && e.contains("flannel0"), "{make}: {e}");
        assert!(h.ns.link(DEV).is_some(), "{make}: deleted");
        h.stop();
        h.ns.ip(&format!("link del {DEV}"));
    }
    // A free one weft made earlier (persistent, multi-queue) is simply reopened.
    attempt(h).expect("fresh");
    h.stop();
    attempt(h).expect("reopened");
}

#[test]
fn drift_of_flannel0_is_reported_and_repaired() {
    if !root_or_skip("udp::drift_of_flannel0_is_reported_and_repaired") {
        return;
    }
    let (lab, leases) = lab(2, udp());
    lab.reconcile_all(&leases);
    let h1 = &lab.hosts[0];
    for change in [
        "link set flannel0 down",
        "route del 10.244.0.0/16 dev flannel0",
        "addr flush dev flannel0",
        "link del flannel0",
    ] {
        let ns = h1.ns.name.clone();
        let event = h1.agent.with_backend(move |b| {
            Box::pin(async move {
                let mut args = vec!["ip", "-n", ns.as_str()];
                args.extend(change.split_whitespace());
                must(&args);
                tokio::time::timeout(Duration::from_secs(5), b.event())
                    .await
                    .ok()
            })
        });
        // A deleted device takes the workers' queues with it: either report will do.
        match event {
            Some(Event::Drift) => {}
            Some(Event::Failed(why)) if change.contains("del flannel0") => {
                assert!(why.contains("TUN"), "{why}")
            }
            other => panic!("{change}: {other:?}"),
        }
        h1.reconcile(&others(&leases, 0))
            .expect("reconcile repairs");
        assert!(h1.reaches(&lab.hosts[1]), "after {change}");
        assert_eq!(h1.ns.weft_routes().len(), 1, "after {change}");
    }
}
