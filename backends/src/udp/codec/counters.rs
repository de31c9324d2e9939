//! Per-worker counters that cost no atomics per packet.

use std::sync::atomic::{AtomicU64, Ordering};

use super::drop_reason::DropReason;
use super::{icmp, Egress};

/// One worker's counters: plain integers it bumps per packet, and publishes now and then
/// (`SharedCounters::publish`, e.g. once per batch). Sum workers with `+=`.
///
/// Every packet lands in exactly one of tx, rx or `drops`; a packet answered with an ICMP error
/// is a drop (by its reason) and the answer is counted again in `icmp_sent`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Packets from the TUN sent to peers, and their bytes (inner packets, without UDP/IP).
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Datagrams from peers accepted for the TUN, and their bytes.
    pub rx_packets: u64,
    pub rx_bytes: u64,
    /// ICMP errors written back to the TUN.
    pub icmp_sent: u64,
    /// ICMP errors built but not sent because of the rate limit.
    pub icmp_rate_limited: u64,
    /// By `DropReason::index`.
    pub drops: [u64; DropReason::COUNT],
}

impl Counters {
    pub fn drop_count(&self, reason: DropReason) -> u64 {
        self.drops[reason.index()]
    }

    pub fn count_drop(&mut self, reason: DropReason) {
        self.drops[reason.index()] += 1;
    }

    /// Counts `egress`'s verdict on a packet of `len` bytes; `reply` is the buffer it was given
    /// (a `Reply` counts as a drop by the reason its ICMP error names). The caller counts
    /// `icmp_sent` or `icmp_rate_limited` itself.
    pub fn record_egress(&mut self, verdict: &Egress, len: usize, reply: &[u8]) {
        match verdict {
            Egress::Send(_) => {
                self.tx_packets += 1;
                self.tx_bytes += len as u64;
            }
            Egress::Reply(_) => self.count_drop(icmp::reason_of_reply(reply)),
            Egress::Drop(r) => self.count_drop(*r),
        }
    }

    /// Counts `ingress`'s verdict on a datagram of `len` bytes.
    pub fn record_ingress(&mut self, verdict: Result<(), DropReason>, len: usize) {
        match verdict {
            Ok(()) => {
                self.rx_packets += 1;
                self.rx_bytes += len as u64;
            }
            Err(r) => self.count_drop(r),
        }
    }

    pub fn total_drops(&self) -> u64 {
        self.drops.iter().sum()
    }

    fn fields(&self) -> impl Iterator<Item = u64> + '_ {
        [
            self.tx_packets,
            self.tx_bytes,
            self.rx_packets,
            self.rx_bytes,
            self.icmp_sent,
            self.icmp_rate_limited,
        ]
        .into_iter()
        .chain(self.drops)
    }

    fn fields_mut(&mut self) -> impl Iterator<Item = &mut u64> + '_ {
        [
            &mut self.tx_packets,
            &mut self.tx_bytes,
            &mut self.rx_packets,
            &mut self.rx_bytes,
            &mut self.icmp_sent,
            &mut self.icmp_rate_limited,
        ]
        .into_iter()
        .chain(self.drops.iter_mut())
    }
}

impl std::ops::AddAssign<&Counters> for Counters {
    fn add_assign(&mut self, other: &Counters) {
        for (a, b) in self.fields_mut().zip(other.fields()) {
            *a = a.wrapping_add(b);
        }
    }
}

const FIELDS: usize = 6 + DropReason::COUNT;

/// One worker's published counters: its slot, alone on its cache lines (128-byte aligned, as
/// crossbeam pads for adjacent-line prefetch) so workers never share a line. The worker is the
/// only writer and stores its running totals with Relaxed stores — no read-modify-write, no
/// fence; readers `load` each slot and sum. Each field is exact on its own; fields are not a
/// consistent snapshot of one instant, which metrics do not need.
#[repr(align(128))]
#[derive(Debug, Default)]
pub struct SharedCounters {
    fields: [AtomicU64; FIELDS],
}

impl SharedCounters {
    /// Publishes the worker's totals (call from that worker only).
    pub fn publish(&self, c: &Counters) {
        for (slot, v) in self.fields.iter().zip(c.fields()) {
            slot.store(v, Ordering::Relaxed);
        }
    }

    /// The totals last published.
    pub fn load(&self) -> Counters {
        let mut c = Counters::default();
        for (v, slot) in c.fields_mut().zip(&self.fields) {
            *v = slot.load(Ordering::Relaxed);
        }
        c
    }

    /// The sum over all workers' slots.
    pub fn sum<'a>(slots: impl IntoIterator<Item = &'a SharedCounters>) -> Counters {
        let mut total = Counters::default();
        for s in slots {
            total += &s.load();
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_its_own_index_and_name() {
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
        let mut names: Vec<_> = DropReason::ALL.iter().map(|r| r.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), DropReason::COUNT);
    }

    #[test]
    fn published_counters_of_all_workers_add_up() {
        let slots: Vec<SharedCounters> = (0..3).map(|_| SharedCounters::default()).collect();
        for (n, slot) in slots.iter().enumerate() {
            let mut c = Counters::default();
            for _ in 0..=n {
                c.record_ingress(Ok(()), 100);
                c.record_ingress(Err(DropReason::UnknownSender), 100);
                c.record_egress(&Egress::Drop(DropReason::NoRoute), 60, &[]);
            }
            c.icmp_sent += 1;
            slot.publish(&c);
        }
        let total = SharedCounters::sum(&slots);
        assert_eq!(total.rx_packets, 6);
        assert_eq!(total.rx_bytes, 600);
        assert_eq!(total.drop_count(DropReason::UnknownSender), 6);
        assert_eq!(total.drop_count(DropReason::NoRoute), 6);
        assert_eq!(total.icmp_sent, 3);
        assert_eq!(total.total_drops(), 12);
    }

    #[test]
    fn slots_of_two_workers_never_share_a_cache_line() {
        assert_eq!(std::mem::align_of::<SharedCounters>(), 128);
        assert_eq!(std::mem::size_of::<SharedCounters>() % 128, 0);
    }
}
