//! `wireguard`: flannel's encrypted data plane, in its format (issue 22). A device `flannel-wg`
//! holds the lease's network address /32 and one route for the whole network; each remote lease
//! is one WireGuard peer (endpoint PublicIP:Port, AllowedIPs its subnet, the PSK and keepalive
//! if set). A peer's identity is its public key: two leases with one key, the older wins.
//!
//! On a dual-stack network (issue 23), flannel's `Mode`: `separate` adds `flannel-wg-v6` on
//! ListenPortV6 for the IPv6 subnets, between PublicIPv6s, with the same key; `auto`, `ipv4` and
//! `ipv6` carry both families on `flannel-wg`. Each device is run by the kernel's WireGuard or
//! by its own userspace worker.
//!
//! Files: `config.rs` (the options, the devices), `key.rs` (keys, the private key file),
//! `data.rs` (the lease's BackendData), `want.rs` (what it wants, pure).
//!
//! The protocol crate, for the userspace data plane (a TUN device driven by weft's own worker
//! threads, as udp's): boringtun (Cloudflare, BSD-3-Clause, 0.7) rather than Mullvad's fork
//! gotatun (MPL-2.0, 0.10). Both are maintained and share the noise code, but
//! - boringtun's `Tunn::encapsulate`/`decapsulate` work on buffers the caller owns (`&[u8]` in,
//!   `&mut [u8]` out) and allocate nothing per packet once a session is up: exactly the shape
//!   udp's workers have (batches of packets in their own buffers, GSO/GRO around them);
//!   gotatun's `Tunn` takes and returns its own pooled `Packet` objects built for its tokio
//!   device, so our buffers would be copied in and out;
//! - with `default-features = false` boringtun is the noise protocol alone (ring, which the tree
//!   already builds, and the RustCrypto AEADs); gotatun needs Rust 1.95 (the workspace's floor is
//!   1.85), tokio and its device stack, and by default aws-lc-rs (a C build);
//! - its timers are one `update_timers` call per peer that we can tick from a thread off the hot
//!   path.
//!
//! Keys come from boringtun's re-export of x25519-dalek (`boringtun::x25519`).

mod config;
mod data;
mod genl;
mod kernel;
mod key;
pub mod uapi;
mod userspace;
mod want;

use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::path::PathBuf;

use ipnet::Ipv4Net;
use serde_json::Value;
use tracing::debug;

use crate::conn::Conn;
use crate::offload::stats::StatsCell;
use crate::plane::StatsSource;
use crate::routes;
use crate::watch::Watched;
use crate::{
    netlink, BackendConfig, DataPlane, Desired, Error, ErrorList, Event, Host, Identity,
    IdentityKind, Lease, Network, PeerChanges, Programmed,
};
pub use config::WgConfig;
use config::{DeviceSpec, Mode};
use kernel::Found;
use want::{Slots, WgPeer, WG};
pub use want::{DEVICE, DEVICE_V6};

// The datagram lookups, for the fuzz target in backends/fuzz; not an API.
#[doc(hidden)]
pub use userspace::fuzz_lookups;
// The userspace data plane, for the netns tests; not an API.
#[doc(hidden)]
pub use userspace::for_tests as userspace_for_tests;

/// Two peers with one public key would each take the other's traffic (the kernel moves a key's
/// AllowedIPs to whoever set them last): the older lease keeps it.
pub static PUBLIC_KEY: IdentityKind = IdentityKind {
    name: "PublicKey",
    len: 32,
    bad_label: "bad_public_key",
    own_label: "public_key_own",
    taken_label: "public_key_taken",
    show: |b, f| match <&key::Key>::try_from(b) {
        Ok(k) => f.write_str(&key::show(k)),
        Err(_) => write!(f, "{b:02x?}"),
    },
};

pub struct Wireguard {
    net: Network,
    cfg: WgConfig,
    /// Where the private key lives (`WIREGUARD_KEY_FILE`, else `/run/flannel/wgkey`).
    key_file: PathBuf,
    /// Where the userspace devices' control sockets live (`WIREGUARD_SOCKET_DIR`, else wg's
    /// place), `<device>.sock` each.
    socket_dir: PathBuf,
    private: Option<key::PrivateKey>,
    own: Option<Lease>,
    conn: Conn,
    /// The devices, by slot ([`WG`], and [`WG6`] in separate mode on a dual-stack network).
    devices: Vec<Device>,
    /// Each device's WireGuard peer of each lease, as last set.
    peers: Slots<BTreeMap<Ipv4Net, WgPeer>>,
    /// A full reconcile ran since the backend was built or its lease changed, and succeeded.
    synced: bool,
}

/// One device and what runs it.
struct Device {
    spec: DeviceSpec,
    /// The data path, once chosen (at the first `configure`).
    path: Option<Path>,
    /// The userspace data plane's counters, over every worker this device started (zero on
    /// the kernel's WireGuard: `wg show` has its counters).
    stats: StatsCell,
    /// A userspace worker ran before the current one.
    started: bool,
    /// Its drift watch (one watch follows one device).
    watch: Conn,
}

/// Which WireGuard carries a device's traffic.
enum Path {
    /// The kernel's: the device (its index) configured over generic netlink.
    Kernel { index: u32, genl: genl::Genl },
    /// weft's own, on a TUN device.
    Userspace(userspace::Userspace),
}

impl Path {
    fn index(&self) -> u32 {
        match self {
            Path::Kernel { index, .. } => *index,
            Path::Userspace(u) => u.index,
        }
    }
}

impl DataPlane for Wireguard {
    const TYPE: &'static str = "wireguard";
    const SURVIVES_RESTART: &'static str =
        "flannel-wg (and flannel-wg-v6) with its addresses and routes; kernel WireGuard keeps \
         its peers and forwards on, weft's userspace WireGuard (a persistent TUN device) drops \
         packets until the next weftd reopens it";
    const DUAL_STACK: bool = true;
    // The kernel's WireGuard, or weft's userspace one on a TUN device.
    const DEVICE_KINDS: &'static [&'static str] = &["wireguard", "tun"];
    const MTU_OVERHEAD: u32 = config::OVERHEAD;
    const IDENTITY: Option<&'static IdentityKind> = Some(&PUBLIC_KEY);

    fn check(config: &BackendConfig, underlay_mtu: u32) -> Result<(), Error> {
        WgConfig::parse(config, underlay_mtu).map(drop)
    }

    fn device(_config: &BackendConfig) -> Option<String> {
        Some(DEVICE.to_string())
    }

    /// `flannel-wg-v6`, in separate mode.
    fn device6(config: &BackendConfig) -> Option<String> {
        let cfg = WgConfig::parse(config, u32::MAX).ok()?;
        (cfg.mode == Mode::Separate).then(|| DEVICE_V6.to_string())
    }

    fn device_names(&self) -> Vec<String> {
        let dual = self.net.network_v6.is_some();
        let specs = self.cfg.devices(dual);
        specs.iter().map(|d| d.name.to_string()).collect()
    }

    fn identity(backend_data: Option<&Value>) -> Result<Option<Identity>, String> {
        let d = data::read(backend_data)?;
        Ok(Some(Identity::new(&PUBLIC_KEY, &d.public_key)))
    }

    /// The routes of the networks into the devices; the WireGuard peers live in the devices
    /// (see [`want::want`]), the peers it refuses are reported.
    fn desired(
        config: &BackendConfig,
        host: &Host<'_>,
        peers: &[Lease],
    ) -> Result<Option<Desired>, Error> {
        let cfg = WgConfig::parse(config, host.net.external.mtu)?;
        let index = host
            .device
            .ok_or_else(|| Error::NoInterface(DEVICE.to_string()))?;
        let w = want::want(&cfg, host.net, host.own, [Some(index), host.device6], peers);
        Ok(Some(Desired {
            routes: w.routes.into_iter().map(|r| (None, r)).collect(),
            refused: w.refused,
            ..Desired::default()
        }))
    }

    fn new(config: &BackendConfig, net: Network) -> Result<Self, Error> {
        let cfg = WgConfig::parse(config, net.external.mtu)?;
        let devices = (cfg.devices(net.network_v6.is_some()).into_iter())
            .map(|spec| Device {
                spec,
                path: None,
                stats: StatsCell::new(Self::TYPE),
                started: false,
                watch: Conn::default(),
            })
            .collect();
        Ok(Self {
            net,
            cfg,
            key_file: key::key_file(),
            socket_dir: uapi::socket_dir(),
            private: None,
            own: None,
            conn: Conn::default(),
            devices,
            peers: Default::default(),
            synced: false,
        })
    }

    /// Reads (or makes) the private key, and publishes its public key and our port.
    async fn prepare(&mut self, _previous: Option<&Lease>) -> Result<Option<Value>, Error> {
        for d in &mut self.devices {
            d.watch.subscribe()?;
        }
        let (private, made) = key::load_or_create(&self.key_file)?;
        let public = key::public(&private);
        let public_shown = key::show(&public);
        if made {
            tracing::info!(file = %self.key_file.display(), public_key = %public_shown,
                           "made a WireGuard private key");
        } else {
            tracing::info!(file = %self.key_file.display(), public_key = %public_shown,
                           "using the WireGuard private key file");
        }
        self.private = Some(private);
        Ok(Some(data::publish(&public, self.cfg.listen_port)))
    }

    /// The same key, and the port of the device carrying IPv6.
    fn backend_v6_data(&self) -> Option<Value> {
        let public = key::public(self.private.as_ref()?);
        Some(data::publish(&public, self.cfg.port_v6()))
    }

    fn mtu(&self) -> u32 {
        self.cfg.device_mtu(self.net.external.mtu)
    }

    async fn configure(&mut self, own: &Lease) -> Result<(), Error> {
        // Which peers are acceptable depends on this host's lease (and its key).
        self.synced &= self.own.as_ref() == Some(own);
        self.own = Some(own.clone());
        let index = self.ensure_devices().await?;
        let errs = self.ensure_addresses_and_routes(index).await;
        self.settle().await;
        errs.into_first()
    }

    async fn reconcile<P: Borrow<Lease>>(
        &mut self,
        peers: impl IntoIterator<Item = P>,
    ) -> Result<(), ErrorList> {
        let Some(own) = self.own.clone() else {
            return Err(Error::Other(
                "wireguard: reconcile before this host's lease is configured".into(),
            )
            .into());
        };
        let index = self.ensure_devices().await?;
        let leases: Vec<Lease> = peers.into_iter().map(|p| p.borrow().clone()).collect();
        let w = want::want(&self.cfg, &self.net, &own, index, &leases);
        let mut errs = ErrorList::default();
        errs.0.extend(w.refused.into_iter().map(|(_, e)| e));
        let wanted: Slots<BTreeMap<Ipv4Net, WgPeer>> = w
            .peers
            .map(|peers| peers.into_iter().map(|p| (p.subnet, p)).collect());
        for (slot, wanted) in wanted.iter().enumerate() {
            if let Err(e) = self.set_all(slot, wanted) {
                errs.push(e);
            }
        }
        self.peers = wanted;
        errs.0
            .extend(self.ensure_addresses_and_routes(index).await.0);
        self.synced = errs.0.is_empty();
        self.settle().await;
        errs.into_result()
    }

    /// [`crate::Backend::apply`]: the peers in `changes` set or removed on the devices, one
    /// generic netlink batch each; routes do not change (one route covers each network).
    async fn apply(&mut self, changes: &PeerChanges) -> Result<(), ErrorList> {
        let Some(own) = self.own.clone() else {
            self.synced = false;
            return Err(Error::Other("wireguard: apply before the first reconcile".into()).into());
        };
        let (steps, refused) = want::changes(&self.cfg, &self.net, &own, &mut self.peers, changes);
        let mut errs = ErrorList(refused);
        for (slot, steps) in steps.iter().enumerate() {
            let Some(dev) = self.devices.get(slot) else {
                continue;
            };
            for k in &steps.remove {
                debug!(device = dev.spec.name, public_key = %key::show(k), "WireGuard peer removed");
            }
            let mut msgs: Vec<_> = steps.remove.iter().map(genl::removal).collect();
            msgs.extend(steps.set.iter().map(genl::peer));
            if !msgs.is_empty() {
                if let Err(e) = self.send(slot, msgs) {
                    self.synced = false;
                    errs.push(e);
                }
            }
        }
        errs.into_result()
    }

    fn needs_reconcile(&self) -> bool {
        !self.synced
    }

    /// Drift of a device, its address or route (a full reconcile repairs it), or a userspace
    /// worker gone (the agent rebuilds the backend).
    async fn event(&mut self) -> Event {
        let event = self.drift_or_failure().await;
        self.synced = false;
        event
    }

    fn programmed(&self) -> Programmed {
        let dual = self.net.network_v6.is_some();
        let routes = usize::from(self.devices.first().is_some_and(|d| d.path.is_some()));
        Programmed {
            routes: routes * (1 + usize::from(dual)),
            ..Programmed::default()
        }
    }

    fn stats(&self) -> Option<StatsSource> {
        Some(StatsCell::combined(
            self.devices.iter().map(|d| d.stats.clone()).collect(),
        ))
    }
}

impl Wireguard {
    /// What the userspace data plane has counted (packets, bytes, drops by reason) since it
    /// started, over its devices; `None` on the kernel's WireGuard (`wg show` has its counters).
    pub fn counters(&self) -> Option<crate::udp::Counters> {
        let mut all = self.devices.iter().filter_map(|d| match &d.path {
            Some(Path::Userspace(u)) => Some(u.counters()),
            _ => None,
        });
        let mut total = all.next()?;
        for c in all {
            total += &c;
        }
        Some(total)
    }

    /// Reads the private key from `path` rather than `WIREGUARD_KEY_FILE`'s or flannel's path
    /// (tests run several hosts in one process, each with its own key).
    pub fn set_key_file(&mut self, path: PathBuf) {
        self.key_file = path;
    }

    /// Answers `wg` in `dir` rather than `WIREGUARD_SOCKET_DIR` or wg's place (tests run
    /// several hosts in one process).
    pub fn set_socket_dir(&mut self, dir: PathBuf) {
        self.socket_dir = dir;
    }

    /// Resolves on drift of a device, its address or route, or a userspace worker gone. Cancel
    /// safe: the agent drops it whenever something else comes first.
    async fn drift_or_failure(&mut self) -> Event {
        loop {
            let owned: Vec<Watched> = (self.devices.iter())
                .map(|d| Watched {
                    device: Some(d.spec.name.to_string()),
                    index: d.path.as_ref().map(Path::index),
                })
                .collect();
            let drifted =
                (self.devices.iter_mut().zip(&owned)).map(|(d, w)| Box::pin(d.watch.drifted(w)));
            let drifted = futures::future::select_all(drifted);
            tokio::select! {
                _ = drifted => return Event::Drift,
                () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            }
            let gone = |d: &&Device| matches!(&d.path, Some(Path::Userspace(u)) if !u.alive());
            if let Some(d) = self.devices.iter().find(gone) {
                return Event::Failed(format!("a WireGuard worker of {} stopped", d.spec.name));
            }
        }
    }

    /// Forgets the echoes of this backend's own changes, on every device's watch.
    async fn settle(&mut self) {
        for d in &mut self.devices {
            d.watch.settle().await;
        }
    }

    /// Finds or makes every device (the kernel's where it can) and gives it the private key
    /// and port; their indexes, by slot.
    async fn ensure_devices(&mut self) -> Result<Slots<Option<u32>>, Error> {
        let mut index: Slots<Option<u32>> = [None; 2];
        for (slot, found) in index.iter_mut().enumerate().take(self.devices.len()) {
            *found = Some(self.ensure_device(slot).await?);
        }
        Ok(index)
    }

    /// Finds or makes the device of `slot`; its index.
    async fn ensure_device(&mut self, slot: usize) -> Result<u32, Error> {
        let handle = self.conn.handle()?;
        let mtu = self.mtu();
        let private = (self.private.as_ref())
            .ok_or_else(|| Error::Other("wireguard: configure before prepare".into()))?;
        let Some(dev) = self.devices.get_mut(slot) else {
            return Err(Error::Other(format!("wireguard: no device in slot {slot}")));
        };
        let name = dev.spec.name;
        let found = kernel::ensure(&handle, name, mtu).await?;
        match (found, &mut dev.path) {
            (Found::Kernel(index), Some(Path::Kernel { index: known, .. })) if *known == index => {
                Ok(index)
            }
            (Found::Kernel(index), _) => {
                // A new device (or the first look): it holds no key and no peer of ours.
                let mut genl = genl::Genl::open()?;
                genl.send(vec![genl::set_device(name, private, dev.spec.port)])
                    .map_err(Error::io(format!("set {name}'s private key and port")))?;
                dev.path = Some(Path::Kernel { index, genl });
                self.synced = false;
                Ok(index)
            }
            (Found::Userspace(Some(index)), Some(Path::Userspace(u)))
                if u.index == index && u.alive() =>
            {
                Ok(index)
            }
            (Found::Userspace(_), _) => {
                // Stop a worker on a device that is gone before opening the new one.
                dev.path = None;
                dev.stats.stop();
                let socket = self.socket_dir.join(format!("{name}.sock"));
                let mut u =
                    userspace::Userspace::start(&handle, dev.spec, private, mtu, socket).await?;
                let index = u.index;
                u.set_peers(self.peers[slot].values().cloned().collect())?;
                dev.stats.start(u.live(), dev.started);
                dev.started = true;
                dev.path = Some(Path::Userspace(u));
                self.synced = false;
                Ok(index)
            }
        }
    }

    /// Removes the peers the device of `slot` holds that `wanted` does not, and sets every
    /// wanted one.
    fn set_all(&mut self, slot: usize, wanted: &BTreeMap<Ipv4Net, WgPeer>) -> Result<(), Error> {
        let Some(dev) = self.devices.get_mut(slot) else {
            return Ok(());
        };
        let name = dev.spec.name;
        let genl = match &mut dev.path {
            Some(Path::Kernel { genl, .. }) => genl,
            Some(Path::Userspace(u)) => return u.set_peers(wanted.values().cloned().collect()),
            None => return Err(Error::Other(format!("wireguard: no {name} yet"))),
        };
        let held = genl
            .peers(name)
            .map_err(Error::io(format!("read {name}'s peers")))?;
        let keep: std::collections::HashSet<&key::Key> =
            wanted.values().map(|p| &p.public_key).collect();
        let mut msgs: Vec<_> = (held.iter().filter(|k| !keep.contains(k)))
            .map(genl::removal)
            .collect();
        msgs.extend(wanted.values().map(genl::peer));
        if msgs.is_empty() {
            return Ok(());
        }
        genl.send(genl::set_peers(name, msgs))
            .map_err(Error::io(format!("set {name}'s peers")))
    }

    /// Sets the peers `msgs` change on the device of `slot` (the kernel), or its whole list
    /// again (userspace).
    fn send(
        &mut self,
        slot: usize,
        msgs: Vec<netlink_packet_wireguard::WireguardPeer>,
    ) -> Result<(), Error> {
        let Some(dev) = self.devices.get_mut(slot) else {
            return Ok(());
        };
        let name = dev.spec.name;
        match &mut dev.path {
            Some(Path::Kernel { genl, .. }) => genl
                .send(genl::set_peers(name, msgs))
                .map_err(Error::io(format!("set {name}'s peers"))),
            Some(Path::Userspace(u)) => u.set_peers(self.peers[slot].values().cloned().collect()),
            None => Err(Error::Other(format!("wireguard: no {name} yet"))),
        }
    }

    /// The lease's addresses on the devices (IPv4's network address /32 on `flannel-wg`, IPv6's
    /// /128 on the device carrying IPv6, as flannel's `Configure`/`ConfigureV6`), and the
    /// networks' routes through them.
    async fn ensure_addresses_and_routes(&mut self, index: Slots<Option<u32>>) -> ErrorList {
        let (handle, batch) = match (self.conn.handle(), self.conn.batch()) {
            (Ok(h), Ok(b)) => (h, b),
            (Err(e), _) | (_, Err(e)) => return e.into(),
        };
        let mut errs = ErrorList::default();
        if let Some(own) = &self.own {
            for (dev, index) in self.devices.iter().zip(index) {
                let Some(index) = index else { continue };
                let name = dev.spec.name;
                if dev.spec.v4 {
                    let addr = own.subnet.network();
                    if let Err(e) = netlink::ensure_address(&handle, index, name, addr).await {
                        errs.push(e);
                    }
                }
                if let (true, Some(v6)) = (dev.spec.v6, &own.ipv6) {
                    let addr = Some(v6.subnet.network());
                    if let Err(e) = netlink::ensure_address6(&handle, index, name, addr).await {
                        errs.push(e);
                    }
                }
            }
        }
        let want = want::routes(&self.cfg, &self.net, index);
        let owner = routes::Owner {
            network: self.net.network,
            network_v6: self.net.network_v6,
            device: index[WG],
        };
        errs.0.extend(
            routes::reconcile_owned(&handle, &batch, &owner, &want)
                .await
                .0,
        );
        errs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_peers_identity_is_its_public_key() {
        let kind = crate::kind("wireguard").expect("listed");
        assert_eq!(kind.mtu_overhead, 80);
        assert_eq!(kind.device_kinds, ["wireguard", "tun"]);
        let cfg = |v: Value| match v {
            Value::Object(m) => BackendConfig::new(m),
            _ => BackendConfig::default(),
        };
        assert_eq!(
            (kind.device)(&cfg(json!({"Type": "wireguard"}))).as_deref(),
            Some("flannel-wg")
        );
        let data = json!({"PublicKey": "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=", "Port": 1});
        let id = (kind.identity)(Some(&data))
            .expect("a key")
            .expect("has one");
        assert_eq!(
            id.to_string(),
            "PublicKey hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo="
        );
        // Another port, same key: the same identity.
        let moved = json!({"PublicKey": "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo="});
        assert_eq!((kind.identity)(Some(&moved)), Ok(Some(id)));
        assert_eq!(
            (kind.identity)(Some(&json!({"Port": 51820}))),
            Err("BackendData has no PublicKey".into())
        );
        assert_eq!((kind.identity)(None), Err("no BackendData".into()));
    }

    #[test]
    fn flannel_mtu_is_the_underlay_or_configured_mtu_less_80() {
        let net = |mtu| Network {
            network: "10.244.0.0/16".parse().expect("net"),
            network_v6: None,
            external: crate::ExternalInterface {
                name: "eth0".into(),
                index: 2,
                iface_addr: "192.168.1.2".parse().expect("addr"),
                public_ip: "192.168.1.2".parse().expect("addr"),
                iface_addr6: None,
                public_ipv6: None,
                mtu,
            },
        };
        let b = |v: Value, mtu| {
            let Value::Object(m) = v else {
                panic!("object")
            };
            Wireguard::new(&BackendConfig::new(m), net(mtu)).expect("valid")
        };
        assert_eq!(b(json!({}), 1500).mtu(), 1420);
        assert_eq!(b(json!({"MTU": 1400}), 1500).mtu(), 1320);
        assert_eq!(b(json!({}), 9000).mtu(), 8920);
    }

    #[test]
    fn an_event_wait_cut_short_leaves_the_backend_synced() {
        // The agent waits for events beside the lease watch and drops the wait whenever a lease
        // changes first: that alone must not cost a full reconcile.
        let Value::Object(m) = json!({"Type": "wireguard"}) else {
            panic!("object")
        };
        let net = crate::testing::network(true, true, 1500);
        let mut b = Wireguard::new(&BackendConfig::new(m), net).expect("valid");
        assert_eq!(b.device_names(), ["flannel-wg", "flannel-wg-v6"]);
        b.synced = true;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let waited = tokio::time::timeout(std::time::Duration::from_millis(50), b.event());
            assert!(waited.await.is_err(), "no event in 50 ms");
        });
        assert!(!b.needs_reconcile());
    }

    #[test]
    fn prepare_publishes_the_key_files_public_key_and_the_listen_port() {
        let dir = std::env::temp_dir().join(format!("weft-wg-prepare-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("wgkey");
        std::fs::write(&file, "dwdtCnMYpX08FsFyUbJmRd9ML4frwJkqsXf7pR25LCo=\n").expect("key");
        let Value::Object(m) = json!({"Type": "wireguard", "ListenPort": 51999}) else {
            panic!("object")
        };
        let mut b = Wireguard::new(
            &BackendConfig::new(m),
            Network {
                network: "10.244.0.0/16".parse().expect("net"),
                network_v6: None,
                external: crate::ExternalInterface {
                    name: "eth0".into(),
                    index: 2,
                    iface_addr: "192.168.1.2".parse().expect("addr"),
                    public_ip: "192.168.1.2".parse().expect("addr"),
                    mtu: 1500,
                    iface_addr6: None,
                    public_ipv6: None,
                },
            },
        )
        .expect("valid");
        b.key_file = file;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let published = rt.block_on(b.prepare(None)).expect("prepared");
        assert_eq!(
            published.map(|v| v.to_string()).as_deref(),
            Some(r#"{"PublicKey":"hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=","Port":51999}"#)
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
