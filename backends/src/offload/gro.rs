//! Receive coalescing for TUN writes: consecutive packets of one flow become one super-packet
//! behind a virtio-net header, so the kernel takes up to 64 KB per write, as it does from a NIC
//! with GRO. TCP segments become a GSO TCPV4 (TCPV6) packet; UDP datagrams, where the TUN has USO
//! (Linux 6.2+), a GSO UDP_L4 packet that the kernel cuts back into the same datagrams where they are
//! delivered (or hands whole to a socket with UDP_GRO). One write per 64 datagrams instead of one
//! each is what makes a small-packet flood cheap.
//!
//! Not tun-rs's `send_multiple`: its TCP GRO copies every packet into a fresh `Vec` first
//! (tun-rs 2.8, `tcp_gro`), an allocation and an extra pass over the data per packet, and it
//! wants each packet in a buffer of its own, which costs another copy out of a UDP GRO run. Here
//! packets are read where recvmmsg put them and copied once, into the super-packet; a packet that
//! cannot be merged goes out as it lies, with writev. The rules are Linux's `tcp_gro_receive` and
//! `udp_gro_receive_segment` (and wireguard-go's): same addresses, ports, TOS, TTL and DF (IPv6:
//! traffic class, flow label, hop limit) (and for TCP ACK, window, header and options); for TCP
//! the next sequence number and only ACK (and PSH, which ends a super-packet); without DF,
//! consecutive IP IDs (segmentation numbers them from the first); a valid checksum; all packets
//! of one size but the last. IPv4 without options, IPv6 without extension headers. No allocation
//! after `new`.

/// The virtio-net header (struct virtio_net_hdr): flags, gso_type, hdr_len, gso_size,
/// csum_start, csum_offset, in the host's byte order (TUN's default for virtio 1.0 headers).
pub const HDR_LEN: usize = 10;

const F_NEEDS_CSUM: u8 = 1;
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;
const GSO_UDP_L4: u8 = 5;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
const ACK: u8 = 0x10;
const PSH: u8 = 0x08;
/// IPv4 header without options: the only kind merged.
const IP_LEN: usize = 20;
/// IPv6 header; with an extension header a packet is not merged.
const IP6_LEN: usize = 40;
const UDP_LEN: usize = 8;
const MAX_PACKET: usize = 65535;
/// Datagrams per UDP super-packet: Linux's UDP_GRO_CNT_MAX, what its own GRO builds.
const MAX_UDP_SEGMENTS: usize = 64;

#[derive(Clone, Copy, PartialEq)]
enum Proto {
    /// The sequence number the next segment must carry.
    Tcp {
        next_seq: u32,
    },
    Udp,
}

/// The flow a super-packet is being built for.
#[derive(Clone, Copy)]
struct Flow {
    proto: Proto,
    /// IP header length: [`IP_LEN`], or [`IP6_LEN`] for IPv6.
    ip_len: usize,
    /// IP + transport header length.
    hdr_len: usize,
    /// Payload bytes of each packet (all but the last).
    gso_size: usize,
    /// The IP ID the next packet must carry when DF is clear.
    next_id: u16,
    segments: usize,
    /// A shorter packet or PSH ended it.
    closed: bool,
}

/// Builds super-packets from packets offered one by one; see the module doc.
pub struct Coalescer {
    buf: Vec<u8>,
    flow: Option<Flow>,
    /// The TUN takes UDP GSO frames (TUN_F_USO4).
    udp: bool,
}

impl Coalescer {
    /// `udp`: merge UDP datagrams too (only where the TUN accepts USO).
    pub fn new(udp: bool) -> Self {
        Self {
            buf: Vec::with_capacity(MAX_PACKET),
            flow: None,
            udp,
        }
    }

    /// Takes one IP packet that the codec accepted. `write` gets each finished TUN frame as
    /// (virtio-net header, packet, how many packets it carries), in order.
    pub fn add(&mut self, pkt: &[u8], write: &mut impl FnMut(&[u8; HDR_LEN], &[u8], usize)) {
        let Some(seg) = Segment::parse(pkt, self.udp) else {
            self.flush(write);
            return write(&[0; HDR_LEN], pkt, 1);
        };
        if let Some(f) = &mut self.flow {
            if !f.closed
                && self.buf.len() + seg.payload.len() <= MAX_PACKET
                && seg.follows(f, &self.buf)
            {
                self.buf.extend_from_slice(seg.payload);
                if let Proto::Tcp { next_seq } = &mut f.proto {
                    *next_seq = next_seq.wrapping_add(seg.payload.len() as u32);
                }
                f.next_id = seg.id.wrapping_add(1);
                f.segments += 1;
                f.closed = seg.payload.len() < f.gso_size
                    || seg.push
                    || (f.proto == Proto::Udp && f.segments == MAX_UDP_SEGMENTS);
                if seg.push {
                    // PSH belongs on the super-packet's header: the receiver acts on it.
                    self.buf[f.ip_len + 13] |= PSH;
                }
                return;
            }
        }
        self.flush(write);
        if !seg.checksum_ok() {
            // The kernel will drop it; merged, its checksum would have been recomputed.
            return write(&[0; HDR_LEN], pkt, 1);
        }
        self.buf.clear();
        self.buf.extend_from_slice(pkt);
        let proto = match seg.proto {
            Proto::Tcp { next_seq: seq } => Proto::Tcp {
                next_seq: seq.wrapping_add(seg.payload.len() as u32),
            },
            Proto::Udp => Proto::Udp,
        };
        self.flow = Some(Flow {
            proto,
            ip_len: seg.ip_len,
            hdr_len: seg.hdr_len,
            gso_size: seg.payload.len(),
            next_id: seg.id.wrapping_add(1),
            segments: 1,
            closed: seg.push,
        });
    }

    /// Writes what is pending.
    pub fn flush(&mut self, write: &mut impl FnMut(&[u8; HDR_LEN], &[u8], usize)) {
        let Some(f) = self.flow.take() else {
            return;
        };
        if f.segments == 1 {
            return write(&[0; HDR_LEN], &self.buf, 1);
        }
        let total = self.buf.len();
        let ip_len = f.ip_len;
        let v6 = ip_len == IP6_LEN;
        if v6 {
            self.buf[4..6].copy_from_slice(&((total - IP6_LEN) as u16).to_be_bytes());
        } else {
            let ip = &mut self.buf[..IP_LEN];
            ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
            ip[10..12].copy_from_slice(&[0, 0]);
            let c = !fold(sum(ip));
            ip[10..12].copy_from_slice(&c.to_be_bytes());
        }
        let (proto, gso_type, csum_offset) = match (f.proto, v6) {
            (Proto::Tcp { .. }, false) => (PROTO_TCP, GSO_TCPV4, 16),
            (Proto::Tcp { .. }, true) => (PROTO_TCP, GSO_TCPV6, 16),
            (Proto::Udp, _) => (PROTO_UDP, GSO_UDP_L4, 6),
        };
        let l4_len = (total - ip_len) as u16;
        if f.proto == Proto::Udp {
            // The length of the whole; segmentation gives each datagram its own again.
            self.buf[ip_len + 4..ip_len + 6].copy_from_slice(&l4_len.to_be_bytes());
        }
        // NEEDS_CSUM: the checksum field holds the pseudo-header sum, the kernel adds the rest.
        let pseudo = fold(sum(addresses(&self.buf, ip_len)) + u64::from(proto) + u64::from(l4_len));
        let at = ip_len + csum_offset;
        self.buf[at..at + 2].copy_from_slice(&pseudo.to_be_bytes());
        let mut hdr = [0u8; HDR_LEN];
        hdr[0] = F_NEEDS_CSUM;
        hdr[1] = gso_type;
        hdr[2..4].copy_from_slice(&(f.hdr_len as u16).to_ne_bytes());
        hdr[4..6].copy_from_slice(&(f.gso_size as u16).to_ne_bytes());
        hdr[6..8].copy_from_slice(&(ip_len as u16).to_ne_bytes());
        hdr[8..10].copy_from_slice(&(csum_offset as u16).to_ne_bytes());
        write(&hdr, &self.buf, f.segments)
    }
}

/// The source and destination addresses of a packet whose IP header is `ip_len` long: what the
/// transport checksum's pseudo-header sums.
fn addresses(pkt: &[u8], ip_len: usize) -> &[u8] {
    if ip_len == IP6_LEN {
        &pkt[8..40]
    } else {
        &pkt[12..20]
    }
}

/// A mergeable TCP segment or UDP datagram over IPv4 or IPv6.
struct Segment<'a> {
    pkt: &'a [u8],
    proto: Proto,
    /// [`IP_LEN`] or [`IP6_LEN`].
    ip_len: usize,
    hdr_len: usize,
    id: u16,
    /// TCP PSH: ends the super-packet.
    push: bool,
    payload: &'a [u8],
}

impl<'a> Segment<'a> {
    /// A packet that may be merged: IPv4 without options, not a fragment, or IPv6 without
    /// extension headers; a payload; TCP with flags ACK or ACK|PSH, or (with `udp`) UDP whose
    /// length field matches. The codec has checked version and lengths; this checks again.
    fn parse(pkt: &'a [u8], udp: bool) -> Option<Self> {
        let (ip_len, id, next) = match pkt.first()? >> 4 {
            4 => {
                let ip = pkt.get(..IP_LEN)?;
                if ip[0] != 0x45 || usize::from(u16::from_be_bytes([ip[2], ip[3]])) != pkt.len() {
                    return None;
                }
                // MF set or an offset: a fragment.
                if ip[6] & 0x3f != 0 || ip[7] != 0 {
                    return None;
                }
                (IP_LEN, u16::from_be_bytes([ip[4], ip[5]]), ip[9])
            }
            6 => {
                let ip = pkt.get(..IP6_LEN)?;
                if usize::from(u16::from_be_bytes([ip[4], ip[5]])) != pkt.len() - IP6_LEN {
                    return None;
                }
                // IPv6 has no ID: segments are told apart by what follows.
                (IP6_LEN, 0, ip[6])
            }
            _ => return None,
        };
        let (proto, hdr_len, push) = match next {
            PROTO_TCP => {
                let tcp = pkt.get(ip_len..ip_len + 20)?;
                let tcp_len = usize::from(tcp[12] >> 4) * 4;
                let flags = tcp[13];
                if tcp_len < 20 || (flags != ACK && flags != ACK | PSH) {
                    return None;
                }
                let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
                (
                    Proto::Tcp { next_seq: seq },
                    ip_len + tcp_len,
                    flags & PSH != 0,
                )
            }
            PROTO_UDP if udp => {
                let h = pkt.get(ip_len..ip_len + UDP_LEN)?;
                if usize::from(u16::from_be_bytes([h[4], h[5]])) != pkt.len() - ip_len {
                    return None;
                }
                (Proto::Udp, ip_len + UDP_LEN, false)
            }
            _ => return None,
        };
        let payload = pkt.get(hdr_len..).filter(|p| !p.is_empty())?;
        Some(Self {
            pkt,
            proto,
            ip_len,
            hdr_len,
            id,
            push,
            payload,
        })
    }

    /// Whether this packet continues the super-packet in `buf` (whose first packet set `f`).
    fn follows(&self, f: &Flow, buf: &[u8]) -> bool {
        let (Some(head), Some(pkt)) = (buf.get(..f.hdr_len), self.pkt.get(..f.hdr_len)) else {
            return false;
        };
        if self.ip_len != f.ip_len {
            return false;
        }
        let l4 = f.ip_len;
        let same_l4 = match (self.proto, f.proto) {
            // The segment's own sequence number is in `self.proto`.
            (Proto::Tcp { next_seq: seq }, Proto::Tcp { next_seq }) => {
                seq == next_seq
                    // Ports, ACK, data offset, window, urgent pointer, options; not sequence
                    // number, flags (parse allowed ACK, ACK|PSH) or checksum.
                    && pkt[l4..l4 + 4] == head[l4..l4 + 4]
                    && pkt[l4 + 8..l4 + 13] == head[l4 + 8..l4 + 13]
                    && pkt[l4 + 14..l4 + 16] == head[l4 + 14..l4 + 16]
                    && pkt[l4 + 18..] == head[l4 + 18..]
            }
            // Ports; not length or checksum.
            (Proto::Udp, Proto::Udp) => pkt[l4..l4 + 4] == head[l4..l4 + 4],
            _ => false,
        };
        let same_ip = if l4 == IP6_LEN {
            // Version, traffic class, flow label; next header, hop limit; addresses.
            pkt[0..4] == head[0..4] && pkt[6..40] == head[6..40]
        } else {
            let dont_fragment = pkt[6] & 0x40 != 0;
            (dont_fragment || self.id == f.next_id)
                // TOS, DF, TTL, protocol, addresses.
                && pkt[1] == head[1]
                && pkt[6] == head[6]
                && pkt[8..10] == head[8..10]
                && pkt[12..20] == head[12..20]
        };
        self.hdr_len == f.hdr_len
            && same_l4
            && same_ip
            && self.payload.len() <= f.gso_size
            && self.checksum_ok()
    }

    /// Whether the transport checksum (over the pseudo-header and the packet) is right. A UDP
    /// datagram over IPv4 sent without one (0) is fine: merged, it gets one.
    fn checksum_ok(&self) -> bool {
        let l4 = &self.pkt[self.ip_len..];
        let proto = match self.proto {
            Proto::Tcp { .. } => PROTO_TCP,
            Proto::Udp if l4[6..8] == [0, 0] && self.ip_len == IP_LEN => return true,
            Proto::Udp => PROTO_UDP,
        };
        let s =
            sum(addresses(self.pkt, self.ip_len)) + u64::from(proto) + l4.len() as u64 + sum(l4);
        fold(s) == 0xffff
    }
}

/// The ones' complement sum of `data` as big-endian 16-bit words (RFC 1071), folded to 16 bits
/// and widened so callers can add more. Summed in the host's byte order, eight bytes at a time
/// (the compiler vectorizes this), and swapped once at the end: the sum does not depend on the
/// byte order it is taken in (RFC 1071 2.B).
fn sum(data: &[u8]) -> u64 {
    let mut acc: u64 = 0;
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        let v = u64::from_ne_bytes(w);
        acc += (v & 0xffff_ffff) + (v >> 32);
    }
    // The tail, zero-padded (an odd last byte is the high byte of a zero-padded word).
    let mut w = [0u8; 8];
    let tail = chunks.remainder();
    w[..tail.len()].copy_from_slice(tail);
    let v = u64::from_ne_bytes(w);
    acc += (v & 0xffff_ffff) + (v >> 32);
    u64::from(u16::from_be(fold(acc)))
}

fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A TCP/IPv4 segment with correct checksums: 10.244.2.2:5000 → 10.244.1.2:80, ACK 7,
    /// window 512, a timestamp option, `flags` (ACK by default) and `payload`.
    fn segment(seq: u32, payload: &[u8]) -> Vec<u8> {
        build(seq, ACK, 64, payload)
    }

    fn build(seq: u32, flags: u8, ttl: u8, payload: &[u8]) -> Vec<u8> {
        let opts = [1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2];
        let total = IP_LEN + 20 + opts.len() + payload.len();
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[4..6].copy_from_slice(&(seq as u16).to_be_bytes());
        p[6] = 0x40;
        p[8] = ttl;
        p[9] = PROTO_TCP;
        p[12..16].copy_from_slice(&[10, 244, 2, 2]);
        p[16..20].copy_from_slice(&[10, 244, 1, 2]);
        let c = !fold(sum(&p[..IP_LEN]));
        p[10..12].copy_from_slice(&c.to_be_bytes());
        let t = &mut p[IP_LEN..];
        t[0..2].copy_from_slice(&5000u16.to_be_bytes());
        t[2..4].copy_from_slice(&80u16.to_be_bytes());
        t[4..8].copy_from_slice(&seq.to_be_bytes());
        t[8..12].copy_from_slice(&7u32.to_be_bytes());
        t[12] = 8 << 4;
        t[13] = flags;
        t[14..16].copy_from_slice(&512u16.to_be_bytes());
        t[20..32].copy_from_slice(&opts);
        t[32..].copy_from_slice(payload);
        let c = !tcp_sum(&p);
        p[IP_LEN + 16..IP_LEN + 18].copy_from_slice(&c.to_be_bytes());
        p
    }

    fn tcp_sum(p: &[u8]) -> u16 {
        let tcp = &p[IP_LEN..];
        fold(sum(&p[12..20]) + u64::from(PROTO_TCP) + tcp.len() as u64 + sum(tcp))
    }

    /// Feeds `pkts` and returns the frames written: (header, packet, packet count).
    fn run(pkts: &[Vec<u8>]) -> Vec<([u8; HDR_LEN], Vec<u8>, usize)> {
        let mut c = Coalescer::new(true);
        let mut out = Vec::new();
        let mut w = |h: &[u8; HDR_LEN], p: &[u8], n: usize| out.push((*h, p.to_vec(), n));
        for p in pkts {
            c.add(p, &mut w);
        }
        c.flush(&mut w);
        out
    }

    fn u16_at(h: &[u8; HDR_LEN], at: usize) -> u16 {
        u16::from_ne_bytes([h[at], h[at + 1]])
    }

    #[test]
    fn consecutive_segments_become_one_super_packet_the_kernel_can_split() {
        let (a, b, c) = ([1u8; 1000], [2u8; 1000], [3u8; 400]);
        let out = run(&[
            segment(100, &a),
            segment(1100, &b),
            build(2100, ACK | PSH, 64, &c),
        ]);
        assert_eq!(out.len(), 1);
        let (h, p, n) = &out[0];
        assert_eq!(*n, 3);
        assert_eq!((h[0], h[1]), (F_NEEDS_CSUM, GSO_TCPV4));
        assert_eq!(u16_at(h, 2), 52, "hdr_len: IP 20 + TCP 32");
        assert_eq!(u16_at(h, 4), 1000, "gso_size");
        assert_eq!(
            (u16_at(h, 6), u16_at(h, 8)),
            (20, 16),
            "csum_start, csum_offset"
        );
        assert_eq!(p.len(), 52 + 2400);
        assert_eq!(usize::from(u16::from_be_bytes([p[2], p[3]])), p.len());
        assert_eq!(fold(sum(&p[..IP_LEN])), 0xffff, "IP header checksum");
        assert_eq!(&p[52..1052], &a);
        assert_eq!(&p[2052..], &c);
        assert_eq!(p[IP_LEN + 13], ACK | PSH, "PSH of the last segment");
        assert_eq!(
            &p[IP_LEN + 4..IP_LEN + 8],
            &100u32.to_be_bytes(),
            "first seq"
        );
        // The checksum field holds the pseudo-header sum, which the kernel completes.
        let pseudo = fold(sum(&p[12..20]) + u64::from(PROTO_TCP) + (p.len() - IP_LEN) as u64);
        assert_eq!(&p[IP_LEN + 16..IP_LEN + 18], &pseudo.to_be_bytes());
    }

    #[test]
    fn what_cannot_be_merged_goes_out_alone_and_in_order() {
        let ok = segment(100, &[1; 1000]);
        let mut bad_sum = segment(1100, &[2; 1000]);
        bad_sum[60] ^= 1;
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("a gap in the sequence", segment(1200, &[2; 1000])),
            ("a bigger segment", segment(1100, &[2; 1001])),
            ("other flags", build(1100, ACK | 0x01, 64, &[2; 1000])),
            ("another TTL", build(1100, ACK, 63, &[2; 1000])),
            ("a bad checksum", bad_sum),
            ("no payload", segment(1100, &[])),
        ];
        for (what, second) in cases {
            let out = run(&[ok.clone(), second.clone()]);
            assert_eq!(out.len(), 2, "{what}");
            assert_eq!(
                (out[0].0, &out[0].1, out[0].2),
                ([0; HDR_LEN], &ok, 1),
                "{what}"
            );
            assert_eq!(
                (out[1].0, &out[1].1, out[1].2),
                ([0; HDR_LEN], &second, 1),
                "{what}"
            );
        }
    }

    #[test]
    fn a_short_or_pushed_segment_ends_the_super_packet() {
        let out = run(&[
            segment(0, &[1; 1000]),
            segment(1000, &[1; 10]),
            segment(1010, &[1; 10]),
        ]);
        assert_eq!(out.iter().map(|o| o.2).collect::<Vec<_>>(), [2, 1]);
        let out = run(&[
            build(0, ACK | PSH, 64, &[1; 1000]),
            segment(1000, &[1; 1000]),
        ]);
        assert_eq!(out.iter().map(|o| o.2).collect::<Vec<_>>(), [1, 1]);
    }

    #[test]
    fn a_super_packet_stops_at_64_kb() {
        let pkts: Vec<Vec<u8>> = (0..70).map(|i| segment(i * 1400, &[9; 1400])).collect();
        let out = run(&pkts);
        assert!(out.iter().all(|o| o.1.len() <= MAX_PACKET));
        assert_eq!(out.iter().map(|o| o.2).sum::<usize>(), 70);
        assert_eq!(out[0].2, (MAX_PACKET - 52) / 1400);
    }

    #[test]
    fn the_checksum_sum_matches_the_textbook_one() {
        // RFC 1071's example, and every length around the eight-byte steps.
        assert_eq!(
            sum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
            0xddf2
        );
        let data: Vec<u8> = (0..=255u8)
            .cycle()
            .take(3000)
            .map(|b| b.wrapping_mul(7))
            .collect();
        for n in 0..40 {
            let d = &data[..n];
            let mut slow: u64 = 0;
            for w in d.chunks(2) {
                slow += u64::from(w[0]) << 8 | w.get(1).copied().map_or(0, u64::from);
            }
            assert_eq!(sum(d), u64::from(fold(slow)), "{n} bytes");
        }
        assert_eq!(
            fold(sum(&data)),
            fold(sum(&data[..1000]) + sum(&data[1000..]))
        );
    }

    /// A UDP/IPv4 datagram with correct checksums: 10.244.2.2:5000 → 10.244.1.2:5201, IP ID
    /// `id`, DF as given.
    fn datagram(id: u16, df: bool, payload: &[u8]) -> Vec<u8> {
        let total = IP_LEN + UDP_LEN + payload.len();
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[4..6].copy_from_slice(&id.to_be_bytes());
        p[6] = if df { 0x40 } else { 0 };
        p[8] = 64;
        p[9] = PROTO_UDP;
        p[12..16].copy_from_slice(&[10, 244, 2, 2]);
        p[16..20].copy_from_slice(&[10, 244, 1, 2]);
        let c = !fold(sum(&p[..IP_LEN]));
        p[10..12].copy_from_slice(&c.to_be_bytes());
        p[20..22].copy_from_slice(&5000u16.to_be_bytes());
        p[22..24].copy_from_slice(&5201u16.to_be_bytes());
        p[24..26].copy_from_slice(&((UDP_LEN + payload.len()) as u16).to_be_bytes());
        p[28..].copy_from_slice(payload);
        let udp = &p[IP_LEN..];
        let c = !fold(sum(&p[12..20]) + u64::from(PROTO_UDP) + udp.len() as u64 + sum(udp));
        p[26..28].copy_from_slice(&c.to_be_bytes());
        p
    }

    fn run_with(udp: bool, pkts: &[Vec<u8>]) -> Vec<([u8; HDR_LEN], Vec<u8>, usize)> {
        let mut c = Coalescer::new(udp);
        let mut out = Vec::new();
        let mut w = |h: &[u8; HDR_LEN], p: &[u8], n: usize| out.push((*h, p.to_vec(), n));
        for p in pkts {
            c.add(p, &mut w);
        }
        c.flush(&mut w);
        out
    }

    #[test]
    fn datagrams_of_one_flow_become_one_udp_super_packet() {
        let pkts = [
            datagram(7, true, &[1; 64]),
            datagram(99, true, &[2; 64]),
            datagram(3, true, &[3; 20]),
        ];
        let out = run_with(true, &pkts);
        assert_eq!(out.len(), 1);
        let (h, p, n) = &out[0];
        assert_eq!(*n, 3);
        assert_eq!((h[0], h[1]), (F_NEEDS_CSUM, GSO_UDP_L4));
        assert_eq!(u16_at(h, 2), 28, "hdr_len: IP 20 + UDP 8");
        assert_eq!(u16_at(h, 4), 64, "gso_size: payload bytes per datagram");
        assert_eq!(
            (u16_at(h, 6), u16_at(h, 8)),
            (20, 6),
            "csum_start, csum_offset"
        );
        assert_eq!(p.len(), 28 + 148);
        assert_eq!(usize::from(u16::from_be_bytes([p[2], p[3]])), p.len());
        assert_eq!(fold(sum(&p[..IP_LEN])), 0xffff, "IP header checksum");
        assert_eq!(
            usize::from(u16::from_be_bytes([p[24], p[25]])),
            p.len() - IP_LEN
        );
        assert_eq!(&p[28..92], &[1; 64]);
        assert_eq!(&p[156..], &[3; 20]);
        let pseudo = fold(sum(&p[12..20]) + u64::from(PROTO_UDP) + (p.len() - IP_LEN) as u64);
        assert_eq!(&p[26..28], &pseudo.to_be_bytes());
    }

    #[test]
    fn datagrams_stay_apart_without_uso_or_when_they_differ() {
        let a = datagram(1, true, &[1; 64]);
        assert_eq!(run_with(false, &[a.clone(), a.clone()]).len(), 2, "no USO");
        let mut other_port = datagram(2, true, &[1; 64]);
        other_port[23] = 1;
        let mut bad_sum = datagram(2, true, &[1; 64]);
        bad_sum[40] ^= 1;
        let mut bad_len = datagram(2, true, &[1; 64]);
        bad_len[25] -= 1;
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("another port", other_port),
            ("a bigger datagram", datagram(2, true, &[1; 65])),
            ("a bad checksum", bad_sum),
            ("a UDP length that is not the packet's", bad_len),
            (
                "no DF and a gap in the IP IDs",
                datagram(5, false, &[1; 64]),
            ),
        ];
        for (what, second) in cases {
            // The same DF as the second, so that only the difference named can keep them apart.
            let first = datagram(1, second[6] & 0x40 != 0, &[1; 64]);
            let out = run_with(true, &[first.clone(), second.clone()]);
            assert_eq!(out.len(), 2, "{what}");
            assert_eq!((out[1].0, &out[1].1), ([0; HDR_LEN], &second), "{what}");
        }
        let first = datagram(1, false, &[1; 64]);
        let out = run_with(true, &[first, datagram(2, false, &[1; 64])]);
        assert_eq!(out.len(), 1, "no DF but consecutive IDs: merged");
    }

    #[test]
    fn a_udp_super_packet_holds_at_most_64_datagrams() {
        let pkts: Vec<Vec<u8>> = (0..150).map(|i| datagram(i, true, &[9; 64])).collect();
        let out = run_with(true, &pkts);
        assert_eq!(out.iter().map(|o| o.2).collect::<Vec<_>>(), [64, 64, 22]);
    }

    #[test]
    fn a_tcp_segment_ends_a_udp_super_packet_and_order_is_kept() {
        let out = run_with(
            true,
            &[
                datagram(1, true, &[1; 64]),
                datagram(2, true, &[1; 64]),
                segment(0, &[5; 100]),
                datagram(3, true, &[1; 64]),
            ],
        );
        assert_eq!(out.iter().map(|o| o.2).collect::<Vec<_>>(), [2, 1, 1]);
        assert_eq!(out[1].1[9], PROTO_TCP);
    }

    #[test]
    fn garbage_passes_through_without_panic() {
        for p in [
            vec![],
            vec![0x45],
            vec![0x45; 40],
            vec![0x60; 80],
            vec![0xff; 200],
        ] {
            let out = run(std::slice::from_ref(&p));
            assert_eq!(out, vec![([0; HDR_LEN], p, 1)]);
        }
    }

    /// An IPv6 TCP segment (ACK, `seq`) or UDP datagram of one flow, fd00::1 → fd00::2, hop
    /// limit `hops`, with a correct checksum.
    fn ipv6_with(proto: u8, seq: u32, hops: u8, payload: &[u8]) -> Vec<u8> {
        let l4 = if proto == PROTO_TCP { 20 } else { UDP_LEN };
        let mut p = vec![0u8; IP6_LEN + l4];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&((l4 + payload.len()) as u16).to_be_bytes());
        p[6] = proto;
        p[7] = hops;
        p[8..10].copy_from_slice(&[0xfd, 0]);
        p[23] = 1;
        p[24..26].copy_from_slice(&[0xfd, 0]);
        p[39] = 2;
        p[40..42].copy_from_slice(&5000u16.to_be_bytes());
        p[42..44].copy_from_slice(&80u16.to_be_bytes());
        let csum_at = if proto == PROTO_TCP {
            p[44..48].copy_from_slice(&seq.to_be_bytes());
            p[52] = 5 << 4;
            p[53] = ACK;
            IP6_LEN + 16
        } else {
            p[44..46].copy_from_slice(&((UDP_LEN + payload.len()) as u16).to_be_bytes());
            IP6_LEN + 6
        };
        p.extend_from_slice(payload);
        let l4 = &p[IP6_LEN..];
        let c = !fold(sum(&p[8..40]) + u64::from(proto) + l4.len() as u64 + sum(l4));
        p[csum_at..csum_at + 2].copy_from_slice(&c.to_be_bytes());
        p
    }

    fn ipv6(proto: u8, seq: u32, payload: &[u8]) -> Vec<u8> {
        ipv6_with(proto, seq, 64, payload)
    }

    #[test]
    fn consecutive_ipv6_segments_become_one_tcpv6_super_packet() {
        let (a, b, c) = ([1u8; 1000], [2u8; 1000], [3u8; 300]);
        let out = run(&[
            ipv6(PROTO_TCP, 100, &a),
            ipv6(PROTO_TCP, 1100, &b),
            ipv6(PROTO_TCP, 2100, &c),
        ]);
        assert_eq!(out.len(), 1, "one frame");
        let (h, p, n) = &out[0];
        assert_eq!(*n, 3);
        assert_eq!((h[0], h[1]), (F_NEEDS_CSUM, GSO_TCPV6));
        assert_eq!(u16_at(h, 2), 60, "hdr_len: IPv6 40 + TCP 20");
        assert_eq!(u16_at(h, 4), 1000, "gso_size");
        assert_eq!(
            (u16_at(h, 6), u16_at(h, 8)),
            (40, 16),
            "csum_start, csum_offset"
        );
        assert_eq!(p.len(), 60 + 2300);
        assert_eq!(
            usize::from(u16::from_be_bytes([p[4], p[5]])),
            p.len() - IP6_LEN,
            "payload length"
        );
        assert_eq!(&p[60..1060], &a);
        assert_eq!(&p[2060..], &c);
        let pseudo = fold(sum(&p[8..40]) + u64::from(PROTO_TCP) + (p.len() - IP6_LEN) as u64);
        assert_eq!(&p[IP6_LEN + 16..IP6_LEN + 18], &pseudo.to_be_bytes());
    }

    #[test]
    fn ipv6_datagrams_of_one_flow_become_one_udp_super_packet() {
        let pkts: Vec<Vec<u8>> = (0..3).map(|_| ipv6(PROTO_UDP, 0, &[5; 500])).collect();
        let out = run_with(true, &pkts);
        assert_eq!(out.len(), 1);
        let (h, p, n) = &out[0];
        assert_eq!((h[1], *n), (GSO_UDP_L4, 3));
        assert_eq!((u16_at(h, 2), u16_at(h, 6)), (48, 40));
        assert_eq!(usize::from(u16::from_be_bytes([p[44], p[45]])), 8 + 1500);
        assert_eq!(run_with(false, &pkts).len(), 3, "without USO: one by one");
    }

    #[test]
    fn ipv6_segments_that_differ_or_follow_ipv4_go_out_alone_and_in_order() {
        let first = ipv6(PROTO_TCP, 100, &[1; 1000]);
        let mut label = ipv6(PROTO_TCP, 1100, &[2; 1000]);
        label[3] = 7; // another flow label (not part of the checksum)
        let mut bad_sum = ipv6(PROTO_TCP, 1100, &[2; 1000]);
        bad_sum[100] ^= 1;
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("a gap in the sequence", ipv6(PROTO_TCP, 1200, &[2; 1000])),
            (
                "another hop limit",
                ipv6_with(PROTO_TCP, 1100, 63, &[2; 1000]),
            ),
            ("another flow label", label),
            ("a bad checksum", bad_sum),
            ("an IPv4 segment", segment(1100, &[2; 1000])),
        ];
        for (what, second) in cases {
            let out = run(&[first.clone(), second.clone()]);
            assert_eq!(out.len(), 2, "{what}");
            assert_eq!(
                (out[0].0, &out[0].1, out[0].2),
                ([0; HDR_LEN], &first, 1),
                "{what}"
            );
            assert_eq!(
                (out[1].0, &out[1].1, out[1].2),
                ([0; HDR_LEN], &second, 1),
                "{what}"
            );
        }
    }
}
