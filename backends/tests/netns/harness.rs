//! The data-plane suite's view of the shared lab (`weft-lab`): each simulated host gets an agent
//! thread living in its namespace that drives weft's backend directly, as weftd would, with the
//! host's lease fixed at 10.244.<n>.0/24 and its container wired behind cni0 from the start.

#![allow(dead_code)]

use std::future::Future;
use std::net::Ipv4Addr;
use std::pin::Pin;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use ipnet::Ipv4Net;
use serde_json::Value;
use weft_backends::{
    Backend, BackendConfig, ErrorList, InterfaceSelector, Lease, Network, PeerChanges,
};
pub use weft_lab::netns::enter;
pub use weft_lab::probe::{udp_send, UdpProbe};
#[allow(unused_imports)]
pub use weft_lab::{must, sh, Netns};

/// The cluster network of every lab.
pub const NETWORK: &str = "10.244.0.0/16";

/// Whether root-only tests can run. Not root: skipped loudly, or failed when CI=true.
pub fn root_or_skip(test: &str) -> bool {
    weft_lab::require_root(test)
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

    /// Builds the backend `config` names for cluster network `network` on eth0, as weftd would
    /// (a second agent in one namespace stands for a second weftd serving another network).
    pub fn start_backend(&self, network: &str, config: Value) -> Result<(), String> {
        let network: Ipv4Net = network.parse().map_err(|e| format!("{network}: {e}"))?;
        self.job(move |rt, slot| {
            *slot = None;
            let b = rt.block_on(async {
                let sel = InterfaceSelector {
                    ifaces: vec!["eth0".into()],
                    ..Default::default()
                };
                let external = sel.select().await.map_err(|e| e.to_string())?;
                let map = match config {
                    Value::Object(m) => m,
                    _ => Default::default(),
                };
                Backend::new(
                    &BackendConfig::new(map),
                    Network {
                        network,
                        network_v6: None,
                        external,
                    },
                )
                .map_err(|e| e.to_string())
            })?;
            *slot = Some(b);
            Ok(())
        })
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

/// A simulated host of the lab with its backend agent and its fixed lease subnet.
pub struct Host {
    pub n: u8,
    pub subnet: Ipv4Net,
    /// Before `lab`: the backend is dropped inside the namespace before the namespace goes.
    pub agent: Agent,
    pub lab: weft_lab::Host,
}

weft_lab::extends!(Host => lab: weft_lab::Host);

impl Host {
    pub fn ip(&self) -> Ipv4Addr {
        self.addr()
    }

    pub fn container_ip(&self) -> Ipv4Addr {
        weft_lab::topology::container_ip(self.subnet)
    }

    /// Whether this host's container and `other`'s container can talk (UDP echo).
    pub fn reaches(&self, other: &Host) -> bool {
        weft_lab::probe::reaches(&self.container, &other.container, other.container_ip())
    }

    /// Builds the backend `config` names, on eth0, as weftd would.
    pub fn start(&self, config: Value) {
        self.try_start(config).expect("backend");
    }

    pub fn try_start(&self, config: Value) -> Result<(), String> {
        self.agent.start_backend(NETWORK, config)
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
            Box::pin(async move { b.reconcile(&peers).await.map_err(messages) })
        })
    }

    /// Applies a change of the peer set (targeted requests, no dump); Err: one message per
    /// failure.
    pub fn apply(&self, changes: &PeerChanges) -> Result<(), Vec<String>> {
        let changes = changes.clone();
        self.agent.with_backend(move |b| {
            Box::pin(async move { b.apply(&changes).await.map_err(messages) })
        })
    }

    /// Whether the backend says only a full reconcile can bring the kernel in line.
    pub fn needs_reconcile(&self) -> bool {
        self.agent
            .with_backend(|b| Box::pin(async move { b.needs_reconcile() }))
    }

    /// Reconciles and returns the rtnetlink change notifications (route, neighbour, link,
    /// address) the kernel emitted meanwhile: a reconcile with nothing to do must cause none.
    pub fn reconcile_watching(&self, peers: &[Lease]) -> (Result<(), Vec<String>>, Vec<String>) {
        let peers = peers.to_vec();
        self.watching(move |b| Box::pin(async move { b.reconcile(&peers).await.map_err(messages) }))
    }

    /// Applies changes and returns the change notifications the kernel emitted meanwhile.
    pub fn apply_watching(&self, changes: &PeerChanges) -> (Result<(), Vec<String>>, Vec<String>) {
        let changes = changes.clone();
        self.watching(move |b| Box::pin(async move { b.apply(&changes).await.map_err(messages) }))
    }

    /// Runs `f` with the backend and returns, with its result, the rtnetlink change
    /// notifications the kernel emitted meanwhile (IPv4 only).
    fn watching<T: Send + 'static>(
        &self,
        f: impl for<'a> FnOnce(&'a mut Backend) -> BoxFut<'a, T> + Send + 'static,
    ) -> (T, Vec<String>) {
        self.agent.with_backend(move |b| {
            Box::pin(async move {
                use rtnetlink::MulticastGroup as G;
                let groups = [G::Link, G::Ipv4Route, G::Ipv4Ifaddr, G::Neigh];
                let (conn, _h, mut events) =
                    rtnetlink::new_multicast_connection(&groups).expect("subscribe");
                let task = tokio::spawn(conn);
                let r = f(b).await;
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

    /// A reconcile against the same `peers` again changes nothing: `snapshot` (a kernel dump)
    /// reads the same before and after, and the kernel emits no change notification.
    pub fn assert_reconcile_is_a_no_op(&self, peers: &[Lease], snapshot: impl Fn() -> Value) {
        let before = snapshot();
        let (result, events) = self.reconcile_watching(peers);
        result.expect("reconcile");
        assert_eq!(before, snapshot());
        assert!(
            events.is_empty(),
            "second reconcile changed the kernel: {events:#?}"
        );
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
            backend_data: data.map(Into::into),
            ipv6: None,
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

/// The shared lab plus this suite's hosts (which shadow the lab's own `hosts`).
pub struct Lab {
    pub hosts: Vec<Host>,
    pub lab: weft_lab::Lab,
}

weft_lab::extends!(Lab => lab: weft_lab::Lab);

impl Lab {
    /// Tells every host that all the others are its peers.
    pub fn reconcile_all(&self, leases: &[Lease]) {
        for (i, h) in self.hosts.iter().enumerate() {
            h.reconcile(&others(leases, i)).expect("reconcile");
        }
    }

    /// Every host's container reaches every other's.
    pub fn assert_full_mesh(&self) {
        for a in &self.hosts {
            for b in &self.hosts {
                if a.n != b.n {
                    assert!(a.reaches(b), "c{} -> c{}", a.n, b.n);
                }
            }
        }
    }

    pub fn new() -> Self {
        Self {
            hosts: Vec::new(),
            lab: weft_lab::Lab::new(),
        }
    }

    /// Adds host `n` (subnet 10.244.n.0/24) with underlay address `underlay` (CIDR) and MTU.
    pub fn add_host(&mut self, n: u8, underlay: &str, mtu: u32) -> &Host {
        let lab = self.lab.new_host(underlay, mtu);
        let subnet: Ipv4Net = format!("10.244.{n}.0/24").parse().expect("subnet");
        lab.wire_container(subnet, None);
        let agent = Agent::spawn(&lab.ns);
        self.hosts.push(Host {
            n,
            subnet,
            agent,
            lab,
        });
        self.hosts.last().expect("just pushed")
    }
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

/// One message per failure of a pass, for assertions.
pub fn messages(l: ErrorList) -> Vec<String> {
    l.0.iter().map(ToString::to_string).collect()
}
