//! A userspace data plane's device (udp's `flannel0`, wireguard's `flannel-wg`): a persistent,
//! multi-queue TUN device (IFF_TUN|IFF_NO_PI, as flannel's, plus IFF_MULTI_QUEUE and, with
//! offloads, IFF_VNET_HDR).
//!
//! Persistent (TUNSETPERSIST) so that the device, its address and its route outlive weftd: while
//! no process has a queue open the kernel drops what is routed into it, and traffic resumes the
//! moment a new weftd attaches again. An existing device is reopened only if it is a TUN with
//! the same framing and multi-queue flag and nobody holds it; anything else is reported, never
//! deleted.
//!
//! tun-rs does the ioctls, the virtio-net header and the TSO/USO split and GRO coalescing. With
//! offloads the kernel hands over TCP super-packets of both families (TUN_F_TSO4|TSO6, and
//! USO4|USO6 where it has USO); tun-rs's split reads the IP version and fixes each segment's
//! IPv4 or IPv6 header and checksum. It
//! opens in the calling thread's network namespace (the queues are opened here, before the
//! workers start) and reopens an existing device by name; a mismatch comes back from TUNSETIFF as
//! a bare EINVAL, which is why the device is described through netlink first.

use futures::TryStreamExt;
use rtnetlink::packet_core::Nla;
use rtnetlink::packet_route::link::{
    AfSpecInet, AfSpecUnspec, InetDevConf, InfoData, InfoKind, InfoTun, LinkAttribute, LinkFlags,
    LinkInfo, LinkMessage,
};
use rtnetlink::{Handle, LinkUnspec};
use tracing::{debug, info, warn};
use tun_rs::{DeviceBuilder, SyncDevice};

use crate::error::errno;
use crate::Error;

// IFLA_TUN_* (linux/if_link.h) and IFF_* (linux/if_tun.h): the netlink crate leaves tun
// attributes raw.
const IFLA_TUN_TYPE: u16 = 3;
const IFLA_TUN_PI: u16 = 4;
const IFLA_TUN_MULTI_QUEUE: u16 = 7;
const IFLA_TUN_NUM_QUEUES: u16 = 8;
const IFF_TUN: u8 = 1;

/// What the kernel says about an existing link of the name.
#[derive(Debug, PartialEq, Eq)]
pub struct Existing {
    pub index: u32,
    pub mtu: Option<u32>,
    pub gso_max_segs: Option<u32>,
    pub up: bool,
    /// Why weft cannot attach to it, if it cannot.
    pub unusable: Option<String>,
}

/// The open device: one queue per worker.
pub struct Tun {
    pub queues: Vec<SyncDevice>,
    pub index: u32,
    /// Whether the queues carry a virtio-net header (TSO/GSO offloads on).
    pub vnet_hdr: bool,
    /// Whether the TUN also takes and gives UDP GSO frames (USO, Linux 6.2+).
    pub uso: bool,
}

/// Looks the device `name` up.
pub async fn find(handle: &Handle, name: &str) -> Result<Option<Existing>, Error> {
    let mut req = handle.link().get().match_name(name.to_string()).execute();
    match req.try_next().await {
        Ok(m) => Ok(m.map(|m| describe(&m))),
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
        Err(source) => Err(Error::Netlink {
            context: format!("look up {name}"),
            source,
        }),
    }
}

fn describe(m: &LinkMessage) -> Existing {
    let mut e = Existing {
        index: m.header.index,
        mtu: None,
        gso_max_segs: None,
        up: m.header.flags.contains(LinkFlags::Up),
        unusable: None,
    };
    let mut kind = None;
    let mut tun: Option<&[InfoTun]> = None;
    for a in &m.attributes {
        match a {
            LinkAttribute::Mtu(n) => e.mtu = Some(*n),
            LinkAttribute::GsoMaxSegs(n) => e.gso_max_segs = Some(*n),
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    match i {
                        LinkInfo::Kind(k) => kind = Some(k.clone()),
                        LinkInfo::Data(InfoData::Tun(d)) => tun = Some(d),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    e.unusable = match (kind, tun) {
        (Some(InfoKind::Tun), Some(attrs)) => tun_problem(attrs),
        (Some(InfoKind::Tun), None) => Some("is a TUN device the kernel did not describe".into()),
        (Some(k), _) => Some(format!("is a {k} device, not a TUN device")),
        (None, _) => Some("is a device of unknown kind, not a TUN device".into()),
    };
    e
}

/// Why a TUN device cannot be attached to as weft's device, if it cannot.
fn tun_problem(attrs: &[InfoTun]) -> Option<String> {
    let byte = |kind: u16| -> Option<u32> {
        attrs.iter().find(|a| a.kind() == kind).and_then(|a| {
            let mut buf = [0u8; 4];
            let n = a.value_len();
            let v = buf.get_mut(..n)?;
            a.emit_value(v);
            Some(match n {
                1 => u32::from(buf[0]),
                4 => u32::from_ne_bytes(buf),
                _ => return None,
            })
        })
    };
    if byte(IFLA_TUN_TYPE) != Some(u32::from(IFF_TUN)) {
        return Some("is a TAP device, not a TUN device".into());
    }
    if byte(IFLA_TUN_PI) != Some(0) {
        return Some("carries packet information (made without IFF_NO_PI)".into());
    }
    if byte(IFLA_TUN_MULTI_QUEUE) != Some(1) {
        return Some(
            "is a single-queue TUN device (flanneld's or `ip tuntap`'s); weft needs a multi-queue \
             one"
            .into(),
        );
    }
    match byte(IFLA_TUN_NUM_QUEUES) {
        Some(0) | None => None,
        Some(n) => Some(format!(
            "is held open by another process ({n} queues attached): is another weftd or flanneld \
             running?"
        )),
    }
}

/// Opens the device `name` (creating it if missing) with `queues` queues, persistent. With `offload`,
/// asks for TSO/USO; a kernel that refuses gets a device without them.
pub async fn open(handle: &Handle, name: &str, queues: usize, offload: bool) -> Result<Tun, Error> {
    if let Some(e) = find(handle, name).await? {
        if let Some(why) = e.unusable {
            return Err(Error::Other(format!(
                "{name} already exists and {why}; weft leaves it alone: remove it \
                 (`ip link del {name}`) or stop what owns it"
            )));
        }
        debug!(
            device = name,
            index = e.index,
            "reopening the existing device"
        );
    }
    let first = match open_queue(name, offload) {
        Ok(d) => d,
        Err(e) if offload => {
            warn!(device = name, error = %e, "the kernel refused TUN offloads; running without them");
            open_queue(name, false)?
        }
        Err(e) => return Err(e),
    };
    first
        .persist()
        .map_err(Error::io(format!("make {name} persistent")))?;
    let vnet_hdr = first.tcp_gso();
    let uso = first.udp_gso();
    let mut all = Vec::with_capacity(queues);
    for i in 1..queues.max(1) {
        let q = first
            .try_clone()
            .map_err(Error::io(format!("open queue {i} of {name}")))?;
        all.push(q);
    }
    all.insert(0, first);
    for q in &all {
        q.set_nonblocking(true)
            .map_err(Error::io(format!("make {name} non-blocking")))?;
    }
    let index = find(handle, name)
        .await?
        .map(|e| e.index)
        .ok_or_else(|| Error::Other(format!("{name} vanished right after it was opened")))?;
    info!(
        device = name,
        queues = all.len(),
        offload = vnet_hdr,
        uso,
        "TUN device open"
    );
    Ok(Tun {
        queues: all,
        index,
        vnet_hdr,
        uso,
    })
}

fn open_queue(name: &str, offload: bool) -> Result<SyncDevice, Error> {
    DeviceBuilder::new()
        .name(name)
        .multi_queue(true)
        .offload(offload)
        .packet_information(false)
        // Link state, MTU and address are set through netlink, like every other device weft owns.
        .inherit_enable_state()
        .build_sync()
        .map_err(Error::io(format!(
            "open TUN device {name} (multi-queue{})",
            if offload { ", offloads" } else { "" }
        )))
}

/// Sets the device's MTU and its largest super-packet (`max_segs` segments: the kernel splits
/// bigger ones before the TUN, so a read always fits the worker's slots), and brings it up,
/// touching only what differs.
pub async fn ensure_link(
    handle: &Handle,
    name: &str,
    mtu: u32,
    max_segs: u32,
) -> Result<u32, Error> {
    let e = find(handle, name)
        .await?
        .ok_or_else(|| Error::Other(format!("{name} does not exist")))?;
    let mut set = LinkUnspec::new_with_index(e.index);
    let mut changed = false;
    let mut extra = Vec::new();
    if e.gso_max_segs != Some(max_segs) {
        extra.push(LinkAttribute::GsoMaxSegs(max_segs));
        changed = true;
    }
    if e.mtu != Some(mtu) {
        set = set.mtu(mtu);
        changed = true;
    }
    if !e.up {
        set = set.up();
        changed = true;
    }
    if changed {
        let mut msg = set.build();
        msg.attributes.extend(extra);
        handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(Error::netlink(format!(
                "set {name} up with MTU {mtu}, GSO at most {max_segs} segments"
            )))?;
        debug!(device = name, mtu, "link set up");
    }
    Ok(e.index)
}

/// `accept_local` 1 on the device (udp's): the ICMP errors the codec writes back come from its own
/// address, and Linux drops them as martians otherwise. Safe because `ingress` never lets a peer's
/// packet in with a source in this host's lease. Set through netlink (RTM_SETLINK with
/// IFLA_AF_SPEC / AF_INET / IFLA_INET_CONF, what `ip link set … ` cannot do but the kernel takes),
/// not /proc/sys: it needs only CAP_NET_ADMIN, and works where /proc/sys is read-only, as in the
/// unprivileged container the DaemonSet runs weftd in.
pub async fn ensure_accept_local(handle: &Handle, name: &str, index: u32) -> Result<(), Error> {
    let ctx = || format!("set accept_local on {name}");
    let mut links = handle.link().get().match_index(index).execute();
    let now = links
        .try_next()
        .await
        .map_err(Error::netlink(ctx()))?
        .and_then(|m| accept_local_of(&m));
    if now == Some(1) {
        return Ok(());
    }
    let mut conf = InetDevConf::default();
    conf.accept_local = 1;
    let mut msg = LinkUnspec::new_with_index(index).build();
    msg.attributes
        .push(LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet(vec![
            AfSpecInet::DevConfRequest(conf),
        ])]));
    handle
        .link()
        .set(msg)
        .execute()
        .await
        .map_err(Error::netlink(ctx()))?;
    debug!(device = name, "accept_local set");
    Ok(())
}

fn accept_local_of(m: &LinkMessage) -> Option<i32> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::AfSpecUnspec(specs) => specs.iter().find_map(|s| match s {
            AfSpecUnspec::Inet(inet) => inet.iter().find_map(|i| match i {
                AfSpecInet::DevConf(c) => Some(c.accept_local),
                _ => None,
            }),
            _ => None,
        }),
        _ => None,
    })
}

/// `disable_ipv6` 1 on the device, before it goes up: its data plane is IPv4-only; without it the
/// kernel sends router solicitations and MLD reports into the device, only to be dropped. Only a
/// nicety, and netlink cannot set it: where /proc/sys is read-only (an unprivileged container)
/// or the kernel has no IPv6, it is left as it is.
pub fn ensure_ipv6_off(name: &str) {
    set_disable_ipv6(name, true);
}

/// `disable_ipv6` 0 on a device carrying IPv6: a persistent device an IPv4-only run left with
/// IPv6 off takes no IPv6 route. New devices have it from `default`, normally 0; where /proc/sys
/// is read-only it is left as it is (and the route's failure says why).
pub fn ensure_ipv6_on(name: &str) {
    set_disable_ipv6(name, false);
}

fn set_disable_ipv6(name: &str, off: bool) {
    let path = format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6");
    let Ok(now) = std::fs::read_to_string(&path) else {
        return;
    };
    let want = if off { "1" } else { "0" };
    if now.trim() != want {
        match std::fs::write(&path, want) {
            Ok(()) => debug!(path, want, "sysctl set"),
            Err(e) => debug!(path, error = %e, "cannot set disable_ipv6 on {name}; leaving it"),
        }
    }
}

/// Packet slots for one batch of TUN reads. A 64 KB super-packet of full-sized segments needs
/// 45 at MTU 1472; more slots let several small packets (ACKs) share one batch.
pub const SLOTS: usize = 256;
/// Slots one TUN read may fill: tun-rs fails a split that does not fit, so the device's
/// gso_max_segs is set to this (a sender with a tiny MSS gets its super-packets cut smaller).
pub const READ_SLOTS: usize = 128;

/// One worker's batch of TUN reads: super-packets split by tun-rs into MTU-sized IP packets side
/// by side in `tx`, one slot of `stride` (= MTU) bytes each, `sizes` their lengths. Full-sized
/// segments therefore already lie back to back. Allocated once.
pub struct Reads {
    /// A read as it came: the super-packet with its virtio-net header.
    raw: Vec<u8>,
    pub tx: Vec<u8>,
    pub stride: usize,
    pub sizes: Vec<usize>,
}

impl Reads {
    pub fn new(stride: usize) -> Self {
        Self {
            raw: vec![0; tun_rs::VIRTIO_NET_HDR_LEN + 65535],
            tx: vec![0; SLOTS * stride],
            stride,
            sizes: vec![0; SLOTS],
        }
    }

    /// Reads from `tun` while a whole read still fits: how many packets. Small packets (a
    /// flood, TCP ACKs) then share one batch; a super-packet fills much of one by itself, but
    /// the next may be waiting. A read whose offload metadata cannot be split is counted in
    /// `errors`; Err: the queue is gone.
    pub fn fill(&mut self, tun: &SyncDevice, errors: &mut u64) -> Result<usize, String> {
        let stride = self.stride;
        let mut filled = 0;
        while SLOTS - filled >= READ_SLOTS {
            let area = self.tx.get_mut(filled * stride..).unwrap_or_default();
            let mut chunks = area.chunks_exact_mut(stride);
            let mut slots: [&mut [u8]; READ_SLOTS] =
                std::array::from_fn(|_| chunks.next().unwrap_or_default());
            let sizes = &mut self.sizes[filled..filled + READ_SLOTS];
            match tun.recv_multiple(&mut self.raw, &mut slots, sizes, 0) {
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if is_gone(&e) => return Err(format!("read from the TUN: {e}")),
                // The packet was consumed but could not be split: its offload metadata was bad.
                Err(_) => *errors += 1,
            }
        }
        Ok(filled)
    }

    /// Packet `i` of the batch.
    pub fn packet(&self, i: usize) -> &[u8] {
        let at = i * self.stride;
        let len = self.sizes.get(i).copied().unwrap_or(0).min(self.stride);
        self.tx.get(at..at + len).unwrap_or_default()
    }
}

/// Writes a receive batch's frames to a TUN queue (a packet, or a super-packet behind its
/// virtio-net header), noting failures rather than stopping at them; [`Writer::finish`] settles
/// them once the batch is done. Given several queues, each frame goes through the one its flow
/// hashes to ([`super::flow`]), which is then the queue its flow's replies leave by.
pub struct Writer<'a> {
    queues: &'a [SyncDevice],
    vnet: bool,
    /// Packets whose frames could not be written.
    lost: u64,
    /// The queue is gone: the data plane cannot go on.
    gone: Option<String>,
}

impl<'a> Writer<'a> {
    /// `vnet`: the queues take a virtio-net header before each frame.
    pub fn new(queues: &'a [SyncDevice], vnet: bool) -> Self {
        Self {
            queues,
            vnet,
            lost: 0,
            gone: None,
        }
    }

    /// One frame carrying `n` packets.
    pub fn write(&mut self, hdr: &[u8; crate::offload::gro::HDR_LEN], pkt: &[u8], n: usize) {
        let queue = super::flow::queue_of(pkt, self.queues.len());
        let Some(tun) = self.queues.get(queue) else {
            self.gone = Some("no TUN queue to write to".into());
            return;
        };
        let r = if self.vnet {
            let frame = [std::io::IoSlice::new(hdr), std::io::IoSlice::new(pkt)];
            tun.send_vectored(&frame)
        } else {
            tun.send(pkt)
        };
        match r {
            Ok(_) => {}
            Err(e) if is_gone(&e) => self.gone = Some(format!("write to the TUN: {e}")),
            Err(_) => self.lost += n as u64,
        }
    }

    /// The batch is written: packets counted as received that were not are drops. Err: the
    /// queue is gone.
    pub fn finish(self, c: &mut crate::udp::codec::Counters) -> Result<(), String> {
        if let Some(why) = self.gone {
            return Err(why);
        }
        c.rx_packets = c.rx_packets.saturating_sub(self.lost);
        for _ in 0..self.lost {
            c.count_drop(crate::udp::codec::DropReason::TunWriteFailed);
        }
        Ok(())
    }
}

/// The TUN queue is detached: the device was deleted or its queue disabled.
pub fn is_gone(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EBADFD | libc::EBADF | libc::ENODEV | libc::ENXIO)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtnetlink::packet_core::DefaultNla;

    fn attrs(kv: &[(u16, &[u8])]) -> Vec<InfoTun> {
        kv.iter()
            .map(|(k, v)| InfoTun::Other(DefaultNla::new(*k, v.to_vec())))
            .collect()
    }

    #[test]
    fn a_free_multi_queue_tun_is_usable() {
        let a = attrs(&[
            (IFLA_TUN_TYPE, &[1]),
            (IFLA_TUN_PI, &[0]),
            (IFLA_TUN_MULTI_QUEUE, &[1]),
            (IFLA_TUN_NUM_QUEUES, &0u32.to_ne_bytes()),
        ]);
        assert_eq!(tun_problem(&a), None);
    }

    #[test]
    fn other_tun_devices_are_reported() {
        type Attrs<'a> = &'a [(u16, &'a [u8])];
        let cases: [(Attrs, &str); 4] = [
            (&[(IFLA_TUN_TYPE, &[2])], "TAP"),
            (
                &[(IFLA_TUN_TYPE, &[1]), (IFLA_TUN_PI, &[1])],
                "packet information",
            ),
            (
                &[
                    (IFLA_TUN_TYPE, &[1]),
                    (IFLA_TUN_PI, &[0]),
                    (IFLA_TUN_MULTI_QUEUE, &[0]),
                ],
                "single-queue",
            ),
            (
                &[
                    (IFLA_TUN_TYPE, &[1]),
                    (IFLA_TUN_PI, &[0]),
                    (IFLA_TUN_MULTI_QUEUE, &[1]),
                    (IFLA_TUN_NUM_QUEUES, &2u32.to_ne_bytes()),
                ],
                "2 queues attached",
            ),
        ];
        for (a, want) in cases {
            let why = tun_problem(&attrs(a)).expect("unusable");
            assert!(why.contains(want), "{why} lacks {want}");
        }
    }
}
