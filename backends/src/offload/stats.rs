//! A userspace data plane's counters, readable from any thread (the metrics scrape) while the
//! backend is busy elsewhere, over the backend's whole life. Each worker publishes its totals into
//! its own slot and never takes a lock; when a set of workers stops (the device recreated, a
//! worker failed), its final totals move into `retired` under the lock readers take, so a read
//! never goes backwards.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use crate::plane::{Stats, StatsSource};
use crate::udp::codec::{Counters, SharedCounters};

/// What the running workers publish: one slot each (and one for each helper thread after them).
pub struct Slots {
    /// The workers' slots, then any helper thread's (counting, but not moving packets).
    counters: Box<[SharedCounters]>,
    workers: usize,
    /// TUN reads that failed for a reason other than "nothing to read" (malformed offload
    /// metadata); not packets, so not among the drop reasons.
    tun_read_errors: Box<[AtomicU64]>,
    /// Whether each worker's socket still uses UDP GSO.
    gso: Box<[AtomicBool]>,
}

impl Slots {
    pub fn new(workers: usize) -> Self {
        Self::with_helpers(workers, 0)
    }

    /// Slots for `workers`, then for `helpers` threads that count drops and packets of their
    /// own (wireguard's handshakes) at ids `workers..`.
    pub fn with_helpers(workers: usize, helpers: usize) -> Self {
        let n = workers + helpers;
        Self {
            counters: (0..n).map(|_| SharedCounters::default()).collect(),
            workers,
            tun_read_errors: (0..n).map(|_| AtomicU64::new(0)).collect(),
            gso: (0..workers).map(|_| AtomicBool::new(false)).collect(),
        }
    }

    pub fn workers(&self) -> usize {
        self.workers
    }

    /// Worker `id`'s totals so far.
    pub fn publish(&self, id: usize, counters: &Counters, tun_read_errors: u64, gso: bool) {
        if let Some(slot) = self.counters.get(id) {
            slot.publish(counters);
        }
        if let Some(slot) = self.tun_read_errors.get(id) {
            slot.store(tun_read_errors, Ordering::Relaxed);
        }
        if let Some(slot) = self.gso.get(id) {
            slot.store(gso, Ordering::Relaxed);
        }
    }

    /// Slot `id`'s own totals (a worker's, or past the workers a helper's): how the work spread.
    pub fn worker(&self, id: usize) -> Option<Counters> {
        let slot = self.counters.get(id)?;
        Some(SharedCounters::sum(std::iter::once(slot)))
    }

    /// The workers' totals.
    pub fn counters(&self) -> Counters {
        SharedCounters::sum(self.counters.iter())
    }

    fn tun_read_errors(&self) -> u64 {
        let errors = self.tun_read_errors.iter();
        errors.map(|c| c.load(Ordering::Relaxed)).sum()
    }
}

/// A running set of workers, and how they were set up.
pub struct Live {
    pub slots: Arc<Slots>,
    pub tun_offload: bool,
    pub tun_uso: bool,
    pub udp_gro: bool,
}

/// The counters of one backend's data plane (named `data_plane` in the metrics) over its life.
#[derive(Clone)]
pub struct StatsCell {
    data_plane: &'static str,
    state: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    live: Option<Live>,
    retired: Counters,
    retired_tun_read_errors: u64,
    restarts: u64,
}

impl StatsCell {
    pub fn new(data_plane: &'static str) -> Self {
        Self {
            data_plane,
            state: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The totals so far: the running workers' plus every earlier set's.
    pub fn read(&self) -> Stats {
        let st = self.lock();
        let mut stats = Stats {
            data_plane: self.data_plane,
            counters: st.retired.clone(),
            tun_read_errors: st.retired_tun_read_errors,
            worker_restarts: st.restarts,
            ..Stats::default()
        };
        if let Some(l) = &st.live {
            stats.counters += &l.slots.counters();
            stats.tun_read_errors += l.slots.tun_read_errors();
            stats.workers = l.slots.workers();
            stats.tun_offload = l.tun_offload;
            stats.tun_uso = l.tun_uso;
            stats.udp_gso = l.slots.gso.iter().all(|g| g.load(Ordering::Relaxed));
            stats.udp_gro = l.udp_gro;
        }
        stats
    }

    /// A handle for the metrics, valid for as long as anyone holds it.
    pub fn source(&self) -> StatsSource {
        let cell = self.clone();
        StatsSource::new(move || cell.read())
    }

    /// The cells of several devices of one data plane (wireguard's `flannel-wg` and
    /// `flannel-wg-v6`) read as one: counters and workers summed, an offload in use where every
    /// running device uses it.
    pub fn combined(cells: Vec<StatsCell>) -> StatsSource {
        StatsSource::new(move || {
            let mut all = cells.iter().map(StatsCell::read);
            let mut total = all.next().unwrap_or_default();
            for s in all {
                // A device with no worker running tells nothing of offloads.
                let flags = |s: &Stats| [s.tun_offload, s.tun_uso, s.udp_gso, s.udp_gro];
                let [a, b, c, d] = match (total.workers, s.workers) {
                    (0, _) => flags(&s),
                    (_, 0) => flags(&total),
                    _ => {
                        let (t, o) = (flags(&total), flags(&s));
                        [t[0] && o[0], t[1] && o[1], t[2] && o[2], t[3] && o[3]]
                    }
                };
                (
                    total.tun_offload,
                    total.tun_uso,
                    total.udp_gso,
                    total.udp_gro,
                ) = (a, b, c, d);
                total.counters += &s.counters;
                total.tun_read_errors += s.tun_read_errors;
                total.workers += s.workers;
                total.worker_restarts += s.worker_restarts;
            }
            total
        })
    }

    /// A set of workers runs; `restart`: one ran before it.
    pub fn start(&self, live: Live, restart: bool) {
        let mut st = self.lock();
        st.restarts += u64::from(restart);
        st.live = Some(live);
    }

    /// Folds the stopped (joined) workers' final totals into `retired`.
    pub fn stop(&self) {
        let mut st = self.lock();
        if let Some(l) = st.live.take() {
            st.retired += &l.slots.counters();
            st.retired_tun_read_errors += l.slots.tun_read_errors();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::udp::DropReason;

    fn live(workers: usize) -> (Arc<Slots>, Live) {
        let slots = Arc::new(Slots::new(workers));
        let live = Live {
            slots: slots.clone(),
            tun_offload: true,
            tun_uso: false,
            udp_gro: true,
        };
        (slots, live)
    }

    fn counted(rx_packets: u64, drops: u64) -> Counters {
        let mut c = Counters {
            rx_packets,
            ..Counters::default()
        };
        for _ in 0..drops {
            c.count_drop(DropReason::UnknownSender);
        }
        c
    }

    #[test]
    fn stats_add_up_workers_and_never_go_back_when_workers_restart() {
        let source = StatsCell::new("udp");
        let nothing = Stats {
            data_plane: "udp",
            ..Stats::default()
        };
        assert_eq!(source.read(), nothing, "nothing started yet");
        let (slots, first) = live(2);
        source.start(first, false);
        slots.publish(0, &counted(5, 1), 0, true);
        slots.publish(1, &counted(3, 0), 2, true);
        let running = source.read();
        assert_eq!(running.counters.rx_packets, 8);
        assert_eq!(running.counters.drop_count(DropReason::UnknownSender), 1);
        assert_eq!(running.tun_read_errors, 2);
        assert_eq!((running.workers, running.worker_restarts), (2, 0));
        assert!(running.tun_offload && running.udp_gro && !running.tun_uso && running.udp_gso);

        // Stopped: the totals stay, the workers are gone.
        source.stop();
        let stopped = source.read();
        assert_eq!(stopped.counters, running.counters);
        assert_eq!(stopped.workers, 0);

        // A new set starts from zero on its own; the sum goes on from where it was.
        let (slots, second) = live(1);
        source.start(second, true);
        slots.publish(0, &counted(2, 1), 0, false);
        let after = source.read();
        assert_eq!(after.counters.rx_packets, 10);
        assert_eq!(after.counters.drop_count(DropReason::UnknownSender), 2);
        assert_eq!((after.workers, after.worker_restarts), (1, 1));
        assert!(!after.udp_gso, "a worker whose kernel refused GSO says so");
        assert_eq!(
            source.source().read(),
            after,
            "the metrics' handle reads the same"
        );
    }
}
