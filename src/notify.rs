//! systemd notifications: READY=1 once, STATUS= on changes, WATCHDOG=1 while the agent is live.
//! All are no-ops when NOTIFY_SOCKET is unset.
//!
//! The watchdog is fed by a thread of its own, every WatchdogSec/4, but only while the agent's loop
//! is live: it made [`progress`] within the last WatchdogSec/2, or it is awaiting a call that is
//! [`bounded`] in time and still within its bound. A bounded call is cancelled when it overruns,
//! so a slow etcd call (a stopped member, a dead connection) can take as long as it is allowed to
//! without starving the watchdog; a loop wedged outside any bounded call (a hung kernel call, a
//! deadlock) stops the pings within WatchdogSec/2, and systemd restarts weftd. Only the agent
//! (the first to declare anything: weftd's root future) counts; other tasks' calls are ignored.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Once, OnceLock};
use std::time::{Duration, Instant};

use sd_notify::NotifyState;
use tracing::{debug, info, warn};

fn send(state: &[NotifyState]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(state) {
        debug!(error = %e, "sd_notify failed");
    }
}

pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// The loop made progress just now: it stays live for WatchdogSec/2.
pub fn progress() {
    if let Some(l) = agents_liveness() {
        l.progress_at(Instant::now());
    }
}

/// Awaits `f` for at most `limit` (`None`: it ran out), the agent counting as live meanwhile.
/// The one way a slow call may keep the watchdog fed: only because it is sure to end.
pub async fn bounded<T>(limit: Duration, f: impl Future<Output = T>) -> Option<T> {
    // Restores the bound of an enclosing call also when `f` is cancelled.
    struct Exit(Option<(&'static Liveness, u64)>);
    impl Drop for Exit {
        fn drop(&mut self) {
            if let Some((l, outer)) = self.0 {
                l.exit_at(outer, Instant::now());
            }
        }
    }
    let _exit = Exit(agents_liveness().map(|l| (l, l.enter_at(limit, Instant::now()))));
    tokio::time::timeout(limit, f).await.ok()
}

/// Sleeps for `d`, live meanwhile (a pause between retries is progress).
pub async fn pause(d: Duration) {
    bounded(
        d.saturating_add(Duration::from_secs(1)),
        tokio::time::sleep(d),
    )
    .await;
}

/// How often the agent's loop must come round when idle: well inside the liveness window.
pub fn idle_tick() -> Option<Duration> {
    liveness().map(|l| l.window / 2)
}

/// Who declares progress or a bound: a task, or (outside any task) a thread. weftd runs the agent
/// as the runtime's root future, which is no task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Caller {
    Task(tokio::task::Id),
    Thread(std::thread::ThreadId),
}

impl Caller {
    fn current() -> Self {
        tokio::task::try_id().map_or_else(|| Self::Thread(std::thread::current().id()), Self::Task)
    }
}

/// When the agent counts as live. Times are milliseconds since `base`.
#[derive(Debug)]
struct Liveness {
    base: Instant,
    /// WatchdogSec/2: how long progress keeps the agent live.
    window: Duration,
    /// Live until then.
    until: AtomicU64,
    /// The agent: the first to declare anything. Another task's etcd calls (say, a metrics
    /// reader) must neither keep a wedged agent "live" nor undo the agent's bounds.
    owner: OnceLock<Caller>,
}

impl Liveness {
    fn new(watchdog: Duration, now: Instant) -> Self {
        let l = Self {
            base: now,
            window: watchdog / 2,
            until: AtomicU64::new(0),
            owner: OnceLock::new(),
        };
        l.progress_at(now);
        l
    }

    fn ms(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.base).as_millis()).unwrap_or(u64::MAX)
    }

    fn after(&self, now: Instant, d: Duration) -> u64 {
        self.ms(now)
            .saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    fn progress_at(&self, now: Instant) {
        self.until
            .fetch_max(self.after(now, self.window), Ordering::Relaxed);
    }

    /// A call bounded by `limit` starts: live until it must have ended, and a window more.
    /// Returns the bound before, for [`Liveness::exit_at`].
    fn enter_at(&self, limit: Duration, now: Instant) -> u64 {
        let outer = self.until.load(Ordering::Relaxed);
        let mine = self.after(now, limit.saturating_add(self.window));
        self.until.store(outer.max(mine), Ordering::Relaxed);
        outer
    }

    /// The call ended (that is progress): back to the enclosing call's bound, if it is later.
    fn exit_at(&self, outer: u64, now: Instant) {
        let fresh = self.after(now, self.window);
        self.until.store(outer.max(fresh), Ordering::Relaxed);
    }

    fn live_at(&self, now: Instant) -> bool {
        self.ms(now) < self.until.load(Ordering::Relaxed)
    }

    /// Whether `c` is the agent (the first caller ever).
    fn speaks_for_the_agent(&self, c: Caller) -> bool {
        *self.owner.get_or_init(|| c) == c
    }
}

/// The liveness, if systemd asked for a watchdog and the caller is the agent.
fn agents_liveness() -> Option<&'static Liveness> {
    liveness().filter(|l| l.speaks_for_the_agent(Caller::current()))
}

/// The agent's liveness when systemd asked for a watchdog; starts the thread feeding it on first
/// use. A thread of its own, not a task: a send to a notify socket nobody reads blocks, and must
/// not take a runtime worker with it.
fn liveness() -> Option<&'static Liveness> {
    static LIVENESS: OnceLock<Option<(Liveness, Duration)>> = OnceLock::new();
    static FEEDER: Once = Once::new();
    let (l, watchdog) = LIVENESS
        .get_or_init(|| {
            sd_notify::watchdog_enabled()
                .filter(|d| !d.is_zero())
                .map(|d| (Liveness::new(d, Instant::now()), d))
        })
        .as_ref()?;
    let every = *watchdog / 4;
    FEEDER.call_once(|| {
        let started = std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || feed(l, every));
        if let Err(e) = started {
            warn!("cannot start feeding systemd's watchdog: {e}");
        }
    });
    Some(l)
}

/// Sends WATCHDOG=1 every `every` while the agent is live; says once when it stops.
fn feed(l: &Liveness, every: Duration) {
    let mut starving = false;
    loop {
        std::thread::sleep(every);
        let live = l.live_at(Instant::now());
        if live {
            send(&[NotifyState::Watchdog]);
        }
        if starving == live {
            if live {
                info!("the agent loop is making progress again; feeding the watchdog");
            } else {
                warn!(
                    "the agent loop made no progress for {:?}; not feeding the watchdog",
                    l.window
                );
            }
        }
        starving = !live;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WATCHDOG: Duration = Duration::from_secs(30);

    fn at(l: &Liveness, secs: u64) -> Instant {
        l.base + Duration::from_secs(secs)
    }

    #[test]
    fn progress_keeps_the_agent_live_for_half_the_watchdog() {
        let l = Liveness::new(WATCHDOG, Instant::now());
        assert!(l.live_at(at(&l, 14)));
        assert!(!l.live_at(at(&l, 15)), "no progress for WatchdogSec/2");
        l.progress_at(at(&l, 20));
        assert!(l.live_at(at(&l, 34)));
        assert!(!l.live_at(at(&l, 35)));
    }

    #[test]
    fn a_bounded_call_keeps_the_agent_live_until_its_bound_runs_out() {
        let l = Liveness::new(WATCHDOG, Instant::now());
        // A 45 s call (three 15 s etcd calls) starting at 10 s.
        let outer = l.enter_at(Duration::from_secs(45), at(&l, 10));
        assert!(l.live_at(at(&l, 69)), "inside the bound and a window after");
        assert!(!l.live_at(at(&l, 70)), "a call past its bound is a hang");
        // It ended at 50 s: back to an ordinary window from then.
        l.exit_at(outer, at(&l, 50));
        assert!(l.live_at(at(&l, 64)));
        assert!(!l.live_at(at(&l, 65)));
    }

    #[test]
    fn an_inner_call_ending_does_not_shorten_the_enclosing_bound() {
        let l = Liveness::new(WATCHDOG, Instant::now());
        let outer = l.enter_at(Duration::from_secs(60), at(&l, 0));
        let inner = l.enter_at(Duration::from_secs(5), at(&l, 1));
        l.exit_at(inner, at(&l, 2));
        assert!(
            l.live_at(at(&l, 74)),
            "the outer wait is still within its bound"
        );
        l.exit_at(outer, at(&l, 3));
        assert!(!l.live_at(at(&l, 18)));
    }

    #[test]
    fn only_the_first_caller_speaks_for_the_agent() {
        let l = Liveness::new(WATCHDOG, Instant::now());
        let agent = Caller::Thread(std::thread::current().id());
        let other = std::thread::spawn(|| Caller::Thread(std::thread::current().id()))
            .join()
            .expect("thread");
        assert!(l.speaks_for_the_agent(agent));
        assert!(!l.speaks_for_the_agent(other));
        assert!(l.speaks_for_the_agent(agent));
    }

    #[test]
    fn nothing_is_live_before_the_base_or_after_a_long_stall() {
        let now = Instant::now();
        let l = Liveness::new(Duration::from_millis(400), now);
        assert!(l.live_at(now + Duration::from_millis(199)));
        assert!(!l.live_at(now + Duration::from_millis(200)));
        assert!(!l.live_at(now + Duration::from_secs(1_000_000)));
    }
}
