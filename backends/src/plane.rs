//! The contract every data plane implements ([`DataPlane`]), and what the control plane may
//! know of a backend type without building one ([`Kind`]). The backends are listed once, in
//! `lib.rs` (`backends!`); everything else (building one by name, the list of known types, their
//! devices, what a peer's BackendData must hold) follows from that list.
//!
//! A new backend is a directory (or file) with a type implementing [`DataPlane`], plus its line
//! in `backends!`. What it gets for free: config validation in weftctl and weftd, the agent's
//! full and targeted reconcile passes, drift and failure handling, the peer set's checks (a
//! peer's [`Identity`] unique among peers, the older lease winning), metrics by type, and
//! `weftctl doctor`'s checks of its device and of the kernel state it wants
//! ([`DataPlane::desired`], the same description its reconcile works from).

use std::borrow::Borrow;
use std::fmt;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::{Ipv4Net, Ipv6Net};
use serde_json::Value;

use crate::mac::Mac;
use crate::routes::RouteSpec;
use crate::udp::codec::Counters;
use crate::{BackendConfig, Error, ErrorList, Event, Lease, Network, PeerChanges, Programmed};

/// One data plane: told "this is my lease, these are my peers", it makes the kernel (or its
/// own userspace forwarding) agree. The defaults fit a backend with nothing of its own to do
/// there (alloc); a backend that programs anything implements `reconcile`, `apply` and
/// `needs_reconcile` together.
#[allow(async_fn_in_trait)] // called on concrete types only (through `Backend`), so Send is known
pub trait DataPlane: Sized + Send {
    /// `Type` in the network config, `BackendType` in leases.
    const TYPE: &'static str;

    /// What stays in the kernel when weftd exits, for its exit log line.
    const SURVIVES_RESTART: &'static str;

    /// Whether it programs anything for peers. One that does not (alloc) spares weftd following
    /// them: a lease store that can (the Kubernetes API) then watches only this host's lease.
    const PEERS: bool = true;

    /// Whether it carries IPv6 beside IPv4: a config with `EnableIPv6` needs one that does (as in
    /// flannel, udp never will).
    const DUAL_STACK: bool = false;

    /// The kinds of link its device may be (`ip -d link`: "vxlan", "tun"; wireguard's is the
    /// kernel's "wireguard" or weft's userspace "tun"); none without a device.
    const DEVICE_KINDS: &'static [&'static str] = &[];

    /// Bytes it adds to each packet on the underlay: containers get the underlay's MTU less
    /// this (unless the config sets the MTU).
    const MTU_OVERHEAD: u32 = 0;

    /// The value of a peer's BackendData no two peers may share, if the backend has one.
    const IDENTITY: Option<&'static IdentityKind> = None;

    /// Checks the backend options exactly as [`DataPlane::new`] does, without building anything.
    /// `underlay_mtu` is this host's underlay MTU, or the largest possible one where no host is
    /// known (weftctl).
    fn check(config: &BackendConfig, underlay_mtu: u32) -> Result<(), Error> {
        let _ = (config, underlay_mtu);
        Ok(())
    }

    /// Its IPv6 device under `config` on a dual-stack network (vxlan's `flannel-v6.<VNI>`), if
    /// it has one of its own.
    fn device6(config: &BackendConfig) -> Option<String> {
        let _ = config;
        None
    }

    /// The device it runs on under `config` (`flannel.<VNI>`, `flannel0`), if any.
    fn device(config: &BackendConfig) -> Option<String> {
        let _ = config;
        None
    }

    /// The peer's [`Identity`] from its BackendData, or why the BackendData makes it no peer.
    /// `None` when the backend has no identity ([`DataPlane::IDENTITY`]).
    fn identity(backend_data: Option<&Value>) -> Result<Option<Identity>, String> {
        let _ = backend_data;
        Ok(None)
    }

    /// What it wants in the kernel for `peers` on `host` under `config` (validated): the pure
    /// description its reconcile works from, which `weftctl doctor` compares the kernel with.
    /// `None`: it programs nothing for peers (alloc).
    fn desired(
        config: &BackendConfig,
        host: &Host<'_>,
        peers: &[Lease],
    ) -> Result<Option<Desired>, Error> {
        let _ = (config, host, peers);
        Ok(None)
    }

    /// Builds it from the config; fails on invalid options. Nothing is changed yet.
    fn new(config: &BackendConfig, net: Network) -> Result<Self, Error>;

    /// Prepares what must exist before this host's lease is written (vxlan: the device and its
    /// VTEP MAC) and returns the `BackendData` to publish. `previous` is this host's earlier
    /// lease, if any, so stable identities (the VTEP MAC) can be kept.
    async fn prepare(&mut self, previous: Option<&Lease>) -> Result<Option<Value>, Error> {
        let _ = previous;
        Ok(None)
    }

    /// The `BackendV6Data` to publish beside [`DataPlane::prepare`]'s BackendData, on a
    /// dual-stack network (vxlan: the IPv6 device's VTEP MAC); asked right after `prepare`.
    fn backend_v6_data(&self) -> Option<Value> {
        None
    }

    /// The MTU containers must use (FLANNEL_MTU).
    fn mtu(&self) -> u32;

    /// Configures host state that depends on this host's own lease (device address, local
    /// routes). Called once the lease is held, and again whenever it changes.
    async fn configure(&mut self, own: &Lease) -> Result<(), Error> {
        let _ = own;
        Ok(())
    }

    /// Makes the kernel match exactly `peers`: adds what is missing, fixes what differs,
    /// removes what this backend owns that no peer wants. One bad peer does not stop the
    /// others: every failure is reported together. `peers` is read once, in order, and no
    /// lease is kept: 10,000 of them need not be held at once.
    async fn reconcile<P: Borrow<Lease>>(
        &mut self,
        peers: impl IntoIterator<Item = P>,
    ) -> Result<(), ErrorList> {
        drop(peers.into_iter());
        Ok(())
    }

    /// Applies a change of the peer set with one targeted request per object concerned,
    /// without reading the kernel's tables (see `Backend::apply`).
    async fn apply(&mut self, changes: &PeerChanges) -> Result<(), ErrorList> {
        let _ = changes;
        Ok(())
    }

    /// Whether only a full [`DataPlane::reconcile`] can bring the kernel in line.
    fn needs_reconcile(&self) -> bool {
        false
    }

    /// Resolves at the next thing the agent must act on (drift, a failed data plane); never,
    /// for a backend with nothing to watch. Cancel-safe.
    async fn event(&mut self) -> Event {
        std::future::pending().await
    }

    /// Stops what runs in weftd itself (threads) before weftd exits or the backend is rebuilt.
    async fn shutdown(self) {}

    /// The devices it runs on (vxlan on a dual-stack network: two): what `Backend::remove`
    /// deletes.
    fn device_names(&self) -> Vec<String> {
        Vec::new()
    }

    /// What the last reconcile put or kept in the kernel.
    fn programmed(&self) -> Programmed {
        Programmed::default()
    }

    /// Counters of a userspace data path, readable from another thread.
    fn stats(&self) -> Option<StatsSource> {
        None
    }
}

/// [`DataPlane::desired`] of one backend type.
pub type DesiredFn = fn(&BackendConfig, &Host<'_>, &[Lease]) -> Result<Option<Desired>, Error>;

/// What the control plane knows of a backend type without building one.
#[derive(Debug, Clone, Copy)]
pub struct Kind {
    pub name: &'static str,
    pub dual_stack: bool,
    pub survives_restart: &'static str,
    pub device_kinds: &'static [&'static str],
    pub mtu_overhead: u32,
    pub identity_kind: Option<&'static IdentityKind>,
    pub check: fn(&BackendConfig, u32) -> Result<(), Error>,
    pub device: fn(&BackendConfig) -> Option<String>,
    pub device6: fn(&BackendConfig) -> Option<String>,
    pub identity: fn(Option<&Value>) -> Result<Option<Identity>, String>,
    pub desired: DesiredFn,
}

impl Kind {
    pub const fn of<T: DataPlane>() -> Self {
        Self {
            name: T::TYPE,
            dual_stack: T::DUAL_STACK,
            survives_restart: T::SURVIVES_RESTART,
            device_kinds: T::DEVICE_KINDS,
            mtu_overhead: T::MTU_OVERHEAD,
            identity_kind: T::IDENTITY,
            check: T::check,
            device: T::device,
            device6: T::device6,
            identity: T::identity,
            desired: T::desired,
        }
    }
}

/// Where this host stands, for a backend's [`DataPlane::desired`].
#[derive(Debug, Clone, Copy)]
pub struct Host<'a> {
    pub net: &'a Network,
    pub own: &'a Lease,
    /// The index of the backend's device, when it exists.
    pub device: Option<u32>,
    /// The index of its IPv6 device (vxlan's `flannel-v6.<VNI>`), when it exists.
    pub device6: Option<u32>,
    /// The underlay's directly connected networks (host-gw; vxlan with DirectRouting).
    pub connected: &'a [Ipv4Net],
    /// Its directly connected IPv6 networks (host-gw on a dual-stack network).
    pub connected6: &'a [Ipv6Net],
}

/// The kernel state a backend wants for a lease and its peers.
#[derive(Debug, Default)]
pub struct Desired {
    /// Routes, each with the peer subnet it is for (`None`: the network's own, udp's).
    pub routes: Vec<(Option<Ipv4Net>, RouteSpec)>,
    /// Permanent neighbours (vxlan: a peer's network address → its VTEP MAC), by peer subnet,
    /// each on the device of its address's family: an IPv4 one on the device, an IPv6 one on
    /// the IPv6 device ([`DataPlane::device6`]).
    pub neighbours: Vec<(Ipv4Net, IpAddr, Mac)>,
    /// FDB entries (vxlan: a VTEP MAC → the peer's PublicIP or PublicIPv6), by peer subnet, on
    /// the device of the remote's family as for `neighbours`.
    pub fdb: Vec<(Ipv4Net, Mac, IpAddr)>,
    /// Peers it programs nothing for, and why.
    pub refused: Vec<(Ipv4Net, Error)>,
}

/// A kind of value in peers' BackendData that must be unique among peers: vxlan's VtepMAC (two
/// peers behind one MAC would each get the other's traffic), WireGuard's public key.
#[derive(Debug)]
pub struct IdentityKind {
    /// Its name in BackendData and in messages: "VtepMAC".
    pub name: &'static str,
    /// Its length in bytes (at most 32).
    pub len: usize,
    /// Metrics labels of the peer set's rejections: BackendData without a usable one, one that
    /// is this host's, one an older lease holds.
    pub bad_label: &'static str,
    pub own_label: &'static str,
    pub taken_label: &'static str,
    /// Writes a value as BackendData spells it.
    pub show: fn(&[u8], &mut fmt::Formatter<'_>) -> fmt::Result,
}

/// One kind per name: compared by it.
impl PartialEq for IdentityKind {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}

impl Eq for IdentityKind {}

/// The longest identity value (a WireGuard key).
const MAX_IDENTITY: usize = 32;

/// Values up to this long (a MAC) are kept inline.
const INLINE: usize = 14;

/// One peer's identity: its kind and value. 16 bytes, as the peer set keeps one per lease and
/// indexes them all: the kind by its backend's place in `backends!`, a short value (a MAC)
/// inline and zero-padded, a longer one (a key) in one shared allocation.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Identity(Repr);

// The peer set's memory at 10,000 peers depends on it.
const _: () = assert!(std::mem::size_of::<Option<Identity>>() == 16);

#[derive(Clone, PartialEq, Eq, Hash)]
enum Repr {
    Inline {
        kind: u8,
        bytes: [u8; INLINE],
    },
    Shared {
        kind: u8,
        bytes: Arc<[u8; MAX_IDENTITY]>,
    },
}

/// The kind of an identity whose backend is not listed (never made by weft's backends).
static UNLISTED: IdentityKind = IdentityKind {
    name: "identity",
    len: MAX_IDENTITY,
    bad_label: "bad_identity",
    own_label: "identity_own",
    taken_label: "identity_taken",
    show: |b, f| write!(f, "{b:02x?}"),
};

impl Identity {
    /// `value` is cut at the kind's length.
    pub fn new(kind: &'static IdentityKind, value: &[u8]) -> Self {
        let index = crate::KINDS
            .iter()
            .position(|k| k.identity_kind == Some(kind))
            .map_or(u8::MAX, |i| i as u8);
        let len = value.len().min(kind.len).min(MAX_IDENTITY);
        // By the kind's length, not the value's: one kind, one representation.
        if kind.len <= INLINE {
            let mut bytes = [0; INLINE];
            bytes[..len].copy_from_slice(&value[..len]);
            Self(Repr::Inline { kind: index, bytes })
        } else {
            let mut bytes = [0; MAX_IDENTITY];
            bytes[..len].copy_from_slice(&value[..len]);
            Self(Repr::Shared {
                kind: index,
                bytes: Arc::new(bytes),
            })
        }
    }

    pub fn kind(&self) -> &'static IdentityKind {
        let (Repr::Inline { kind, .. } | Repr::Shared { kind, .. }) = &self.0;
        (crate::KINDS.get(usize::from(*kind)))
            .and_then(|k| k.identity_kind)
            .unwrap_or(&UNLISTED)
    }

    pub fn value(&self) -> &[u8] {
        let bytes: &[u8] = match &self.0 {
            Repr::Inline { bytes, .. } => bytes,
            Repr::Shared { bytes, .. } => &bytes[..],
        };
        &bytes[..self.kind().len.min(bytes.len())]
    }
}

/// "VtepMAC aa:bb:cc:dd:ee:ff".
impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ", self.kind().name)?;
        (self.kind().show)(self.value(), f)
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Identity({self})")
    }
}

/// What a userspace data path (udp, wireguard's userspace one) has done so far, summed over its
/// workers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Which: the backend type, which names its metrics (`weft_udp_…`, `weft_wireguard_…`).
    pub data_plane: &'static str,
    /// Packets and bytes each way, drops by reason, ICMP errors sent.
    pub counters: Counters,
    /// TUN reads whose offload metadata could not be split (not packets the codec saw).
    pub tun_read_errors: u64,
    pub workers: usize,
    /// TUN offloads (virtio-net header: TSO/USO super-packets, GRO writes) in use.
    pub tun_offload: bool,
    /// UDP datagrams merged for TUN writes too (the TUN takes USO frames, Linux 6.2+).
    pub tun_uso: bool,
    /// UDP GSO still in use on every socket (the kernel may have refused it).
    pub udp_gso: bool,
    pub udp_gro: bool,
    /// Times the workers were stopped and started again (flannel0 recreated, a worker gone).
    pub worker_restarts: u64,
}

/// Reads a userspace data path's [`Stats`] from any thread (the metrics scrape) while the
/// backend is busy elsewhere.
#[derive(Clone)]
pub struct StatsSource(Arc<dyn Fn() -> Stats + Send + Sync>);

impl StatsSource {
    pub fn new(read: impl Fn() -> Stats + Send + Sync + 'static) -> Self {
        Self(Arc::new(read))
    }

    /// The totals so far.
    pub fn read(&self) -> Stats {
        (self.0)()
    }
}

impl fmt::Debug for StatsSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StatsSource")
    }
}

#[cfg(test)]
mod tests {
    use std::collections::hash_map::DefaultHasher;
    use std::hash::Hasher;

    use super::*;

    static KEY: IdentityKind = IdentityKind {
        name: "PublicKey",
        len: 32,
        bad_label: "bad_key",
        own_label: "key_own",
        taken_label: "key_taken",
        show: |b, f| write!(f, "{}", b.len()),
    };

    fn hash(i: &Identity) -> u64 {
        let mut h = DefaultHasher::new();
        i.hash(&mut h);
        h.finish()
    }

    #[test]
    fn a_long_identity_is_compared_and_hashed_by_its_value_not_its_allocation() {
        let value: Vec<u8> = (1..=32).collect();
        let (a, b) = (Identity::new(&KEY, &value), Identity::new(&KEY, &value));
        assert_eq!(a.value(), &value[..]);
        assert_eq!(a, b);
        assert_eq!(hash(&a), hash(&b));
        let mut other = value.clone();
        other[31] ^= 1;
        assert_ne!(a, Identity::new(&KEY, &other));
    }

    #[test]
    fn a_short_identity_keeps_exactly_its_kinds_length() {
        let mac = &crate::vxlan::VTEP_MAC;
        let i = Identity::new(mac, &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(i.value(), &[1, 2, 3, 4, 5, 6]);
        assert_eq!(i.kind(), mac);
    }
}
