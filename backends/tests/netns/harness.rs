//! A small lab of network namespaces: hosts on a shared L2 "switch", each with a container behind a
//! cni0-like bridge, and an agent thread per host that runs weft's backend inside the host's
//! namespace. Namespace names are unique per test (`wb<pid><n>…`); interface names live inside
//! private namespaces, so fixed names (eth0, cni0) are safe. Everything is removed on drop, also
//! when a test panics.

#![allow(dead_code)]

use std::fs::File;
use std::future::Future;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::pin::Pin;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use serde_json::{json, Value};
use weft_backends::{Backend, BackendConfig, InterfaceSelector, Lease, Network};

/// The cluster network of every lab.
pub const NETWORK: &str = "10.244.0.0/16";

/// Whether root-only tests can run. Not root: skipped loudly, or failed when CI=true.
pub fn root_or_skip(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test} needs root (network namespaces); CI=true, so this is a failure");
    }
    // Straight to the stream: libtest would swallow eprintln! of a passing test.
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {test}: needs root (network namespaces)"
    );
    false
}

/// Runs a command under a timeout; returns (success, stdout, stderr).
pub fn sh(args: &[&str]) -> (bool, String, String) {
    let child = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {args:?}: {e}"));
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(Ok(out)) => (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ),
        Ok(Err(e)) => panic!("wait {args:?}: {e}"),
        Err(_) => {
            // Only the child this function started.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            panic!("{args:?} timed out");
        }
    }
}

/// Runs a command that must succeed; returns its stdout.
pub fn must(args: &[&str]) -> String {
    let (ok, out, err) = sh(args);
    assert!(ok, "{args:?} failed: {err}");
    out
}

fn unique_prefix() -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "wb{}{}",
        std::process::id() % 10000,
        N.fetch_add(1, Ordering::SeqCst)
    )
}

/// A named network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: String) -> Self {
        must(&["ip", "netns", "add", &name]);
        let ns = Self { name };
        ns.ip("link set lo up");
        ns
    }

    /// `ip -n <ns> <args>`, which must succeed.
    pub fn ip(&self, args: &str) -> String {
        let mut v = vec!["ip", "-n", &self.name];
        v.extend(args.split_whitespace());
        must(&v)
    }

    /// `ip -n <ns> -j <args>`, parsed.
    pub fn ip_json(&self, args: &str) -> Value {
        let mut v = vec!["ip", "-n", &self.name, "-j"];
        v.extend(args.split_whitespace());
        parse_json(&must(&v))
    }

    /// Runs a program inside the namespace.
    pub fn exec(&self, args: &[&str]) -> (bool, String, String) {
        let mut v = vec!["ip", "netns", "exec", &self.name];
        v.extend(args);
        sh(&v)
    }

    /// Owned IPv4 routes of the main table (weft's protocol), sorted by destination.
    pub fn weft_routes(&self) -> Vec<Value> {
        let mut v = self.routes_json();
        v.retain(|r| r["protocol"] == "87");
        v
    }

    pub fn routes_json(&self) -> Vec<Value> {
        let mut v = as_vec(self.ip_json("route show table main"));
        v.sort_by_key(|r| r["dst"].to_string());
        v
    }

    /// The route to `dst` (e.g. "10.244.2.0/24"), if any.
    pub fn route(&self, dst: &str) -> Option<Value> {
        self.routes_json().into_iter().find(|r| r["dst"] == dst)
    }

    /// Permanent neighbours on `dev`.
    pub fn neighbours(&self, dev: &str) -> Vec<Value> {
        let mut v = as_vec(self.ip_json(&format!("neigh show dev {dev} nud permanent")));
        v.sort_by_key(|n| n["dst"].to_string());
        v
    }

    /// FDB entries of `dev` that point at a remote (`dst`).
    pub fn fdb(&self, dev: &str) -> Vec<Value> {
        let out = must(&["bridge", "-n", &self.name, "-j", "fdb", "show", "dev", dev]);
        let mut v = as_vec(parse_json(&out));
        v.retain(|e| e.get("dst").is_some());
        v.sort_by_key(|e| e["mac"].to_string());
        v
    }

    /// A device's details (`ip -d -j link show dev`), or None when it does not exist.
    pub fn link(&self, dev: &str) -> Option<Value> {
        let (ok, out, _) = sh(&[
            "ip", "-n", &self.name, "-d", "-j", "link", "show", "dev", dev,
        ]);
        if !ok {
            return None;
        }
        as_vec(parse_json(&out)).into_iter().next()
    }

    /// Everything weft could have touched, for before/after comparisons.
    pub fn kernel_dump(&self, dev: &str) -> Value {
        let mut link = self.link(dev).unwrap_or(Value::Null);
        // Counters and per-packet state are not configuration.
        if let Some(o) = link.as_object_mut() {
            o.remove("operstate");
        }
        json!({
            "routes": self.routes_json(),
            "neigh": self.neighbours(dev),
            "fdb": self.fdb(dev),
            "link": link,
            "addr": self.ip_json(&format!("-4 addr show dev {dev}")),
        })
    }

    /// Whether a UDP echo from this namespace to `ip` (inside `target`) comes back: both
    /// directions work. Used instead of ping, which the test machines may lack.
    pub fn reaches(&self, target: &Netns, ip: Ipv4Addr) -> bool {
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
        let client_ns = self.name.clone();
        std::thread::spawn(move || {
            enter(&client_ns);
            let sock = UdpSocket::bind("0.0.0.0:0").expect("bind");
            sock.set_read_timeout(Some(Duration::from_secs(1)))
                .expect("timeout");
            let mut buf = [0u8; 16];
            let mut ok = false;
            for _ in 0..3 {
                let _ = sock.send_to(b"echo", (ip, port));
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    if from.ip() == ip && &buf[..n] == b"echo" {
                        ok = true;
                        break;
                    }
                }
            }
            let _ = sock.send_to(b"bye", (ip, port));
            ok
        })
        .join()
        .expect("echo client")
    }

    fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = sh(&["ip", "netns", "del", &self.name]);
    }
}

fn parse_json(s: &str) -> Value {
    if s.trim().is_empty() {
        return Value::Array(vec![]);
    }
    serde_json::from_str(s).unwrap_or_else(|e| panic!("bad JSON from ip: {e}: {s}"))
}

fn as_vec(v: Value) -> Vec<Value> {
    match v {
        Value::Array(a) => a,
        other => vec![other],
    }
}

/// Enters `ns` on the current thread (network namespaces are per thread).
pub fn enter(ns: &str) {
    let f = File::open(format!("/run/netns/{ns}")).expect("open netns");
    nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
}

type Job = Box<dyn FnOnce(&tokio::runtime::Runtime, &mut Option<Backend>) + Send>;

/// A thread living in a host's namespace, with a current-thread runtime and a backend slot, so
/// one Backend can be driven across several test steps (and dropped to simulate a restart).
pub struct Agent {
    tx: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

pub type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + 'a>>;

impl Agent {
    pub fn spawn(ns: &Netns) -> Self {
        let name = ns.name.clone();
        let (tx, rx) = mpsc::channel::<Job>();
        let thread = std::thread::spawn(move || {
            enter(&name);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let mut backend = None;
            while let Ok(job) = rx.recv() {
                job(&rt, &mut backend);
            }
            rt.block_on(async move { drop(backend) });
        });
        Self {
            tx: Some(tx),
            thread: Some(thread),
        }
    }

    /// Runs an async block in the namespace and returns its result.
    pub fn run<T, F, Fut>(&self, f: F) -> T
    where
        T: Send + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T>,
    {
        self.job(move |rt, _| rt.block_on(f()))
    }

    /// Runs an async block with the backend (which must have been started).
    pub fn with_backend<T, F>(&self, f: F) -> T
    where
        T: Send + 'static,
        F: for<'a> FnOnce(&'a mut Backend) -> BoxFut<'a, T> + Send + 'static,
    {
        self.job(move |rt, slot| {
            let b = slot.as_mut().expect("backend not started");
            rt.block_on(f(b))
        })
    }

    fn job<T: Send + 'static>(
        &self,
        f: impl FnOnce(&tokio::runtime::Runtime, &mut Option<Backend>) -> T + Send + 'static,
    ) -> T {
        let (rtx, rrx) = mpsc::channel();
        let job: Job = Box::new(move |rt, slot| {
            let _ = rtx.send(f(rt, slot));
        });
        self.tx
            .as_ref()
            .expect("agent running")
            .send(job)
            .expect("agent thread gone");
        rrx.recv().expect("agent job panicked")
    }

    /// Replaces the backend slot (None = stop, as weftd exiting).
    pub fn set_backend(&self, make: impl FnOnce() -> Option<Backend> + Send + 'static) {
        self.job(move |rt, slot| {
            let _guard = rt.enter();
            *slot = None;
            *slot = make();
        })
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A simulated host: namespace `h`, underlay `eth0` on the switch, `cni0` bridge with a container.
pub struct Host {
    pub n: u8,
    pub underlay: Ipv4Net,
    pub subnet: Ipv4Net,
    pub agent: Agent,
    pub ns: Netns,
    pub container: Netns,
}

impl Host {
    pub fn ip(&self) -> Ipv4Addr {
        self.underlay.addr()
    }

    pub fn container_ip(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.subnet.network()) + 2)
    }

    /// Whether this host's container and `other`'s container can talk (UDP echo).
    pub fn reaches(&self, other: &Host) -> bool {
        self.container
            .reaches(&other.container, other.container_ip())
    }

    /// Builds the backend `config` names, on eth0, as weftd would.
    pub fn start(&self, config: Value) {
        self.try_start(config).expect("backend");
    }

    pub fn try_start(&self, config: Value) -> Result<(), String> {
        let (tx, rx) = mpsc::channel();
        self.agent.job(move |rt, slot| {
            *slot = None;
            let r = rt.block_on(async {
                let sel = InterfaceSelector {
                    ifaces: vec!["eth0".into()],
                    ..Default::default()
                };
                let external = sel.select().await.map_err(|e| e.to_string())?;
                let net = Network {
                    network: NETWORK.parse().expect("network"),
                    external,
                };
                let map = match config {
                    Value::Object(m) => m,
                    _ => Default::default(),
                };
                Backend::new(&BackendConfig::new(map), net).map_err(|e| e.to_string())
            });
            match r {
                Ok(b) => {
                    *slot = Some(b);
                    let _ = tx.send(Ok(()));
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            }
        });
        rx.recv().expect("agent")
    }

    /// Drops the backend, as weftd exiting (kernel state stays).
    pub fn stop(&self) {
        self.agent.set_backend(|| None);
    }

    pub fn prepare(&self, previous: Option<Lease>) -> Option<Value> {
        self.agent
            .with_backend(move |b| {
                Box::pin(async move {
                    b.prepare(previous.as_ref())
                        .await
                        .map_err(|e| e.to_string())
                })
            })
            .expect("prepare")
    }

    pub fn configure(&self, lease: &Lease) {
        let lease = lease.clone();
        self.agent
            .with_backend(move |b| {
                Box::pin(async move { b.configure(&lease).await.map_err(|e| e.to_string()) })
            })
            .expect("configure");
    }

    /// Reconciles against `peers`; Err holds one message per failure.
    pub fn reconcile(&self, peers: &[Lease]) -> Result<(), Vec<String>> {
        let peers = peers.to_vec();
        self.agent.with_backend(move |b| {
            Box::pin(async move {
                b.reconcile(&peers)
                    .await
                    .map_err(|l| l.0.iter().map(ToString::to_string).collect())
            })
        })
    }

    /// Reconciles and returns the rtnetlink change notifications (route, neighbour, link,
    /// address) the kernel emitted meanwhile: a reconcile with nothing to do must cause none.
    pub fn reconcile_watching(&self, peers: &[Lease]) -> (Result<(), Vec<String>>, Vec<String>) {
        let peers = peers.to_vec();
        self.agent.with_backend(move |b| {
            Box::pin(async move {
                use rtnetlink::MulticastGroup as G;
                let groups = [G::Link, G::Ipv4Route, G::Ipv4Ifaddr, G::Neigh];
                let (conn, _h, mut events) =
                    rtnetlink::new_multicast_connection(&groups).expect("subscribe");
                let task = tokio::spawn(conn);
                let r = b
                    .reconcile(&peers)
                    .await
                    .map_err(|l| l.0.iter().map(ToString::to_string).collect());
                tokio::time::sleep(Duration::from_millis(300)).await;
                let mut seen = Vec::new();
                while let Ok((m, _)) = events.try_recv() {
                    let text = format!("{:?}", m.payload);
                    // IPv6 neighbour discovery runs by itself on every link; weft is IPv4-only.
                    if !text.contains("Inet6") {
                        seen.push(text);
                    }
                }
                task.abort();
                (r, seen)
            })
        })
    }

    pub fn mtu(&self) -> u32 {
        self.agent
            .with_backend(|b| Box::pin(async move { b.mtu() }))
    }

    /// The lease this host holds with `backend_type` and the data `prepare` returned.
    pub fn lease(&self, backend_type: &str, data: Option<Value>) -> Lease {
        Lease {
            subnet: self.subnet,
            public_ip: self.ip(),
            backend_type: backend_type.into(),
            backend_data: data,
        }
    }

    /// start + prepare + configure: the host is up and holds its lease.
    pub fn up(&self, config: Value) -> Lease {
        let kind = config["Type"].as_str().unwrap_or("udp").to_string();
        self.start(config);
        let data = self.prepare(None);
        let lease = self.lease(&kind, data);
        self.configure(&lease);
        lease
    }
}

/// A switch namespace with a bridge, hosts plugged into it, and outsiders (non-cluster machines).
pub struct Lab {
    pub prefix: String,
    pub hosts: Vec<Host>,
    pub outsiders: Vec<Netns>,
    pub switch: Netns,
}

impl Lab {
    pub fn new() -> Self {
        let prefix = unique_prefix();
        let switch = Netns::new(format!("{prefix}sw"));
        switch.ip("link add br0 type bridge");
        switch.ip("link set br0 up");
        Self {
            prefix,
            hosts: Vec::new(),
            outsiders: Vec::new(),
            switch,
        }
    }

    /// Adds host `n` (subnet 10.244.n.0/24) with underlay address `underlay` (CIDR) and MTU.
    pub fn add_host(&mut self, n: u8, underlay: &str, mtu: u32) -> &Host {
        let ns = Netns::new(format!("{}h{n}", self.prefix));
        let container = Netns::new(format!("{}c{n}", self.prefix));
        self.plug(&ns, &format!("p{n}"), underlay, mtu);
        ns.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        let subnet: Ipv4Net = format!("10.244.{n}.0/24").parse().expect("subnet");
        let gw = Ipv4Addr::from(u32::from(subnet.network()) + 1);
        ns.ip("link add cni0 type bridge");
        ns.ip(&format!("addr add {gw}/24 dev cni0"));
        ns.ip("link set cni0 up");
        ns.ip(&format!(
            "link add veth0 type veth peer name eth0 netns {}",
            container.name
        ));
        ns.ip("link set veth0 master cni0 up");
        container.ip(&format!("addr add 10.244.{n}.2/24 dev eth0"));
        container.ip("link set eth0 up");
        container.ip(&format!("route add default via {gw}"));
        let agent = Agent::spawn(&ns);
        self.hosts.push(Host {
            n,
            underlay: underlay.parse().expect("underlay"),
            subnet,
            agent,
            ns,
            container,
        });
        self.hosts.last().expect("just pushed")
    }

    /// A machine outside the cluster on the switch, with address `addr` (CIDR) on eth0.
    pub fn add_outsider(&mut self, addr: &str) -> &Netns {
        let k = self.outsiders.len();
        let ns = Netns::new(format!("{}o{k}", self.prefix));
        self.plug(&ns, &format!("o{k}"), addr, 1500);
        self.outsiders.push(ns);
        self.outsiders.last().expect("just pushed")
    }

    fn plug(&self, ns: &Netns, port: &str, addr: &str, mtu: u32) {
        ns.ip(&format!(
            "link add eth0 mtu {mtu} type veth peer name {port} netns {}",
            self.switch.name
        ));
        self.switch
            .ip(&format!("link set {port} mtu {mtu} master br0 up"));
        ns.ip(&format!("addr add {addr} dev eth0"));
        ns.ip("link set eth0 up");
    }
}

/// Waits for one UDP datagram on `port` inside `ns` (in a thread) and returns its source.
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
    let name = ns.name.clone();
    std::thread::spawn(move || {
        enter(&name);
        let sock = UdpSocket::bind("0.0.0.0:0").expect("bind");
        let start = Instant::now();
        for _ in 0..5 {
            let _ = sock.send_to(b"weft", to);
            std::thread::sleep(Duration::from_millis(100));
            if start.elapsed() > Duration::from_secs(2) {
                break;
            }
        }
    })
    .join()
    .expect("sender");
}

/// `n` hosts on one L2 segment (192.168.100.0/24), each up with `config` and holding its lease.
pub fn lab(n: u8, config: Value) -> (Lab, Vec<Lease>) {
    let mut lab = Lab::new();
    for i in 1..=n {
        lab.add_host(i, &format!("192.168.100.{i}/24"), 1500);
    }
    let leases = lab.hosts.iter().map(|h| h.up(config.clone())).collect();
    (lab, leases)
}

/// Every lease but host `me`'s: what `me` is told its peers are.
pub fn others(leases: &[Lease], me: usize) -> Vec<Lease> {
    leases
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != me)
        .map(|(_, l)| l.clone())
        .collect()
}
