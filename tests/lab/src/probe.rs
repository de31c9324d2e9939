//! Traffic probes between namespaces. UDP rather than ping where the test only needs "it gets
//! through", so nothing depends on ICMP being allowed or ping being installed.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::netns::{enter, Netns};

/// Whether a UDP echo from `from` to `ip` (inside `target`) comes back: both directions work.
pub fn reaches(from: &Netns, target: &Netns, ip: Ipv4Addr) -> bool {
    let server_ns = target.name.clone();
    let (port_tx, port_rx) = mpsc::channel();
    std::thread::spawn(move || {
        enter(&server_ns);
        let sock = UdpSocket::bind("0.0.0.0:0").expect("bind");
        sock.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let _ = port_tx.send(sock.local_addr().expect("addr").port());
        let mut buf = [0u8; 16];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            if &buf[..n] == b"bye" {
                break;
            }
            let _ = sock.send_to(&buf[..n], from);
        }
    });
    let port = port_rx.recv().expect("echo server");
    from.run_in(|| {
        let sock = UdpSocket::bind("0.0.0.0:0").expect("bind");
        sock.set_read_timeout(Some(Duration::from_secs(1)))
            .expect("timeout");
        let mut buf = [0u8; 16];
        let mut ok = false;
        for _ in 0..3 {
            let _ = sock.send_to(b"echo", (ip, port));
            if let Ok((n, src)) = sock.recv_from(&mut buf) {
                if src.ip() == ip && &buf[..n] == b"echo" {
                    ok = true;
                    break;
                }
            }
        }
        let _ = sock.send_to(b"bye", (ip, port));
        ok
    })
}

/// Sends UDP from `from` to `ip` inside `to` and returns the source address the receiver saw
/// (masquerading shows here).
pub fn source_seen(from: &Netns, to: &Netns, ip: Ipv4Addr) -> Option<Ipv4Addr> {
    let rx = to.run_in(|| UdpSocket::bind((ip, 0)).expect("bind receiver"));
    rx.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
    let port = rx.local_addr().ok()?.port();
    let tx = from.run_in(|| UdpSocket::bind(("0.0.0.0", 0)).expect("bind sender"));
    for _ in 0..10 {
        tx.send_to(b"weft", (ip, port)).ok()?;
        let mut buf = [0u8; 16];
        if let Ok((_, SocketAddr::V4(src))) = rx.recv_from(&mut buf) {
            return Some(*src.ip());
        }
    }
    None
}

/// Waits for one UDP datagram on `port` inside a namespace (in a thread) and returns its source.
pub struct UdpProbe {
    rx: mpsc::Receiver<Option<SocketAddr>>,
}

impl UdpProbe {
    pub fn listen(ns: &Netns, port: u16) -> Self {
        let name = ns.name.clone();
        let (ready_tx, ready_rx) = mpsc::channel();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            enter(&name);
            let sock = UdpSocket::bind(("0.0.0.0", port)).expect("bind");
            sock.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            let _ = ready_tx.send(());
            let mut buf = [0u8; 64];
            let _ = tx.send(sock.recv_from(&mut buf).ok().map(|(_, from)| from));
        });
        ready_rx.recv().expect("listener ready");
        Self { rx }
    }

    /// The source address of the first datagram, if one arrived in time.
    pub fn source(self) -> Option<SocketAddr> {
        self.rx.recv_timeout(Duration::from_secs(10)).ok().flatten()
    }
}

/// Sends a few datagrams from inside `ns` to `to` (a few, in case the first waits for ARP).
pub fn udp_send(ns: &Netns, to: SocketAddr) {
    ns.run_in(|| {
        let sock = UdpSocket::bind("0.0.0.0:0").expect("bind");
        let start = Instant::now();
        for _ in 0..5 {
            let _ = sock.send_to(b"weft", to);
            std::thread::sleep(Duration::from_millis(100));
            if start.elapsed() > Duration::from_secs(2) {
                break;
            }
        }
    });
}
