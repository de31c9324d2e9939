//! `wireguard`: flannel's encrypted data plane, in its format (issue 22). A device `flannel-wg`
//! holds the lease's network address /32 and one route for the whole network; each remote lease
//! is one WireGuard peer (endpoint PublicIP:Port, AllowedIPs its subnet, the PSK and keepalive
//! if set). A peer's identity is its public key: two leases with one key, the older wins.
//!
//! Files: `config.rs` (the options), `key.rs` (keys, the private key file), `data.rs` (the
//! lease's BackendData), `want.rs` (what it wants, pure).
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
use kernel::Found;
use want::WgPeer;
pub use want::DEVICE;

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
    key_file: std::path::PathBuf,
    /// The userspace data plane's control socket (`WIREGUARD_SOCKET_DIR`, else wg's place).
    socket: std::path::PathBuf,
    private: Option<key::PrivateKey>,
    own: Option<Lease>,
    conn: Conn,
    /// The data path, once chosen (at the first `configure`).
    path: Option<Path>,
    /// The WireGuard peer of each lease, as last set.
    peers: BTreeMap<Ipv4Net, WgPeer>,
    /// A full reconcile ran since the backend was built or its lease changed, and succeeded.
    synced: bool,
    /// The userspace data plane's counters, over every worker this backend started (zero on
    /// the kernel's WireGuard: `wg show` has its counters).
    stats: StatsCell,
    /// A userspace worker ran before the current one.
    started: bool,
}

/// Which WireGuard carries the traffic.
enum Path {
    /// The kernel's: `flannel-wg` (its index) configured over generic netlink.
    Kernel { index: u32, genl: genl::Genl },
    /// weft's own, on a TUN device.
    Userspace(userspace::Userspace),
}

impl DataPlane for Wireguard {
    const TYPE: &'static str = "wireguard";
    const SURVIVES_RESTART: &'static str =
        "flannel-wg with its address and route; kernel WireGuard keeps its peers and forwards \
         on, weft's userspace WireGuard (a persistent TUN device) drops packets until the next \
         weftd reopens it";
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

    fn device_names(&self) -> Vec<String> {
        vec![DEVICE.to_string()]
    }

    fn identity(backend_data: Option<&Value>) -> Result<Option<Identity>, String> {
        let d = data::read(backend_data)?;
        Ok(Some(Identity::new(&PUBLIC_KEY, &d.public_key)))
    }

    /// The route of the whole network into `flannel-wg`; the WireGuard peers live in the
    /// device (see [`want::want`]), the peers it refuses are reported.
    fn desired(
        config: &BackendConfig,
        host: &Host<'_>,
        peers: &[Lease],
    ) -> Result<Option<Desired>, Error> {
        let cfg = WgConfig::parse(config, host.net.external.mtu)?;
        let index = host
            .device
            .ok_or_else(|| Error::NoInterface(DEVICE.to_string()))?;
        let w = want::want(&cfg, host.net, host.own, Some(index), peers);
        Ok(Some(Desired {
            routes: w.route.map(|r| (None, r)).into_iter().collect(),
            refused: w.refused,
            ..Desired::default()
        }))
    }

    fn new(config: &BackendConfig, net: Network) -> Result<Self, Error> {
        let cfg = WgConfig::parse(config, net.external.mtu)?;
        Ok(Self {
            net,
            cfg,
            key_file: key::key_file(),
            socket: uapi::socket_path(DEVICE),
            private: None,
            own: None,
            conn: Conn::default(),
            path: None,
            peers: BTreeMap::new(),
            synced: false,
            stats: StatsCell::new(Self::TYPE),
            started: false,
        })
    }

    /// Reads (or makes) the private key, and publishes its public key and our port.
    async fn prepare(&mut self, _previous: Option<&Lease>) -> Result<Option<Value>, Error> {
        self.conn.subscribe()?;
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

    fn mtu(&self) -> u32 {
        self.cfg.device_mtu(self.net.external.mtu)
    }

    async fn configure(&mut self, own: &Lease) -> Result<(), Error> {
        // Which peers are acceptable depends on this host's lease (and its key).
        self.synced &= self.own.as_ref() == Some(own);
        self.own = Some(own.clone());
        let index = self.ensure_device().await?;
        let errs = self.ensure_address_and_route(index).await;
        self.conn.settle().await;
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
        let index = self.ensure_device().await?;
        let leases: Vec<Lease> = peers.into_iter().map(|p| p.borrow().clone()).collect();
        let w = want::want(&self.cfg, &self.net, &own, Some(index), &leases);
        let mut errs = ErrorList::default();
        errs.0.extend(w.refused.into_iter().map(|(_, e)| e));
        let wanted: BTreeMap<Ipv4Net, WgPeer> =
            w.peers.into_iter().map(|p| (p.subnet, p)).collect();
        if let Err(e) = self.set_all(&wanted) {
            errs.push(e);
        }
        self.peers = wanted;
        errs.0.extend(self.ensure_address_and_route(index).await.0);
        self.synced = errs.0.is_empty();
        self.conn.settle().await;
        errs.into_result()
    }

    /// [`crate::Backend::apply`]: the peers in `changes` set or removed on the device, one
    /// generic netlink batch; routes do not change (one route covers the network).
    async fn apply(&mut self, changes: &PeerChanges) -> Result<(), ErrorList> {
        let Some(own) = self.own.clone() else {
            self.synced = false;
            return Err(Error::Other("wireguard: apply before the first reconcile".into()).into());
        };
        let steps = want::changes(&self.cfg, &self.net, &own, &mut self.peers, changes);
        let mut errs = ErrorList(steps.refused);
        for k in &steps.remove {
            debug!(public_key = %key::show(k), "WireGuard peer removed");
        }
        let mut msgs: Vec<_> = steps.remove.iter().map(genl::removal).collect();
        msgs.extend(steps.set.iter().map(genl::peer));
        if !msgs.is_empty() {
            if let Err(e) = self.send(msgs) {
                self.synced = false;
                errs.push(e);
            }
        }
        errs.into_result()
    }

    fn needs_reconcile(&self) -> bool {
        !self.synced
    }

    /// Drift of flannel-wg, its address or route (a full reconcile repairs it), or the
    /// userspace worker gone (the agent rebuilds the backend).
    async fn event(&mut self) -> Event {
        let index = match &self.path {
            Some(Path::Kernel { index, .. }) => Some(*index),
            Some(Path::Userspace(u)) => Some(u.index),
            None => None,
        };
        let owned = Watched {
            device: Some(DEVICE.to_string()),
            index,
        };
        let worker_gone = async {
            loop {
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                if matches!(&self.path, Some(Path::Userspace(u)) if !u.alive()) {
                    return;
                }
            }
        };
        let event = tokio::select! {
            () = self.conn.drifted(&owned) => Event::Drift,
            () = worker_gone => Event::Failed("the WireGuard worker stopped".into()),
        };
        self.synced = false;
        event
    }

    fn programmed(&self) -> Programmed {
        Programmed {
            routes: usize::from(self.path.is_some()),
            ..Programmed::default()
        }
    }

    fn stats(&self) -> Option<StatsSource> {
        Some(self.stats.source())
    }
}

impl Wireguard {
    /// What the userspace data plane has counted (packets, bytes, drops by reason) since it
    /// started; `None` on the kernel's WireGuard (`wg show` has its counters).
    pub fn counters(&self) -> Option<crate::udp::Counters> {
        match &self.path {
            Some(Path::Userspace(u)) => Some(u.counters()),
            _ => None,
        }
    }

    /// Reads the private key from `path` rather than `WIREGUARD_KEY_FILE`'s or flannel's path
    /// (tests run several hosts in one process, each with its own key).
    pub fn set_key_file(&mut self, path: std::path::PathBuf) {
        self.key_file = path;
    }

    /// Answers `wg` at `path` rather than `WIREGUARD_SOCKET_DIR`'s or wg's place (tests run
    /// several hosts in one process).
    pub fn set_socket_path(&mut self, path: std::path::PathBuf) {
        self.socket = path;
    }

    /// Finds or makes `flannel-wg` (the kernel's where it can) and gives it the private key
    /// and port; its index.
    async fn ensure_device(&mut self) -> Result<u32, Error> {
        let handle = self.conn.handle()?;
        let found = kernel::ensure(&handle, self.mtu()).await?;
        match (found, &mut self.path) {
            (Found::Kernel(index), Some(Path::Kernel { index: known, .. })) if *known == index => {
                Ok(index)
            }
            (Found::Kernel(index), _) => {
                // A new device (or the first look): it holds no key and no peer of ours.
                let mut genl = genl::Genl::open()?;
                let private = self
                    .private
                    .as_ref()
                    .ok_or_else(|| Error::Other("wireguard: configure before prepare".into()))?;
                genl.send(vec![genl::set_device(
                    DEVICE,
                    private,
                    self.cfg.listen_port,
                )])
                .map_err(Error::io(format!("set {DEVICE}'s private key and port")))?;
                self.path = Some(Path::Kernel { index, genl });
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
                self.path = None;
                self.stats.stop();
                let handle = self.conn.handle()?;
                let private = self
                    .private
                    .as_ref()
                    .ok_or_else(|| Error::Other("wireguard: configure before prepare".into()))?;
                // flannel-wg for IPv4 alone until the device slots come (the lead's rewrite).
                let spec = config::DeviceSpec {
                    name: DEVICE,
                    port: self.cfg.listen_port,
                    v4: true,
                    v6: false,
                };
                let mut u = userspace::Userspace::start(
                    &handle,
                    spec,
                    private,
                    self.mtu(),
                    self.socket.clone(),
                )
                .await?;
                let index = u.index;
                u.set_peers(self.peers.values().cloned().collect())?;
                self.stats.start(u.live(), self.started);
                self.started = true;
                self.path = Some(Path::Userspace(u));
                self.synced = false;
                Ok(index)
            }
        }
    }

    /// Removes the peers the device holds that `wanted` does not, and sets every wanted one.
    fn set_all(&mut self, wanted: &BTreeMap<Ipv4Net, WgPeer>) -> Result<(), Error> {
        let genl = match &mut self.path {
            Some(Path::Kernel { genl, .. }) => genl,
            Some(Path::Userspace(u)) => return u.set_peers(wanted.values().cloned().collect()),
            None => return Err(Error::Other("wireguard: no device yet".into())),
        };
        let held = genl
            .peers(DEVICE)
            .map_err(Error::io(format!("read {DEVICE}'s peers")))?;
        let keep: std::collections::HashSet<&key::Key> =
            wanted.values().map(|p| &p.public_key).collect();
        let mut msgs: Vec<_> = (held.iter().filter(|k| !keep.contains(k)))
            .map(genl::removal)
            .collect();
        msgs.extend(wanted.values().map(genl::peer));
        if msgs.is_empty() {
            return Ok(());
        }
        genl.send(genl::set_peers(DEVICE, msgs))
            .map_err(Error::io(format!("set {DEVICE}'s peers")))
    }

    /// Sets the peers `msgs` change (the kernel), or the whole list again (userspace).
    fn send(&mut self, msgs: Vec<netlink_packet_wireguard::WireguardPeer>) -> Result<(), Error> {
        match &mut self.path {
            Some(Path::Kernel { genl, .. }) => genl
                .send(genl::set_peers(DEVICE, msgs))
                .map_err(Error::io(format!("set {DEVICE}'s peers"))),
            Some(Path::Userspace(u)) => u.set_peers(self.peers.values().cloned().collect()),
            None => Err(Error::Other("wireguard: no device yet".into())),
        }
    }

    /// The lease's network address /32 on the device, and the network's route through it.
    async fn ensure_address_and_route(&mut self, index: u32) -> ErrorList {
        let (handle, batch) = match (self.conn.handle(), self.conn.batch()) {
            (Ok(h), Ok(b)) => (h, b),
            (Err(e), _) | (_, Err(e)) => return e.into(),
        };
        let mut errs = ErrorList::default();
        if let Some(own) = &self.own {
            if let Err(e) =
                netlink::ensure_address(&handle, index, DEVICE, own.subnet.network()).await
            {
                errs.push(e);
            }
        }
        let want = [routes::RouteSpec::link(self.net.network, index, DEVICE)];
        let owner = routes::Owner {
            network: self.net.network,
            network_v6: None,
            device: Some(index),
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
