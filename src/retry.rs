//! Retrying what fails for a while (etcd away, a data plane that cannot be built yet): backing
//! off, each try and pause bounded, a failure logged once per change, never a line in a loop.

use std::time::Duration;

use anyhow::Result;
use tracing::warn;

use crate::notify;

/// Longest pause between retries.
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Retries a call until it succeeds, backing off, logging each failure once per change.
/// Each try and each pause is bounded, so the watchdog stays fed while etcd is away.
pub async fn retry<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut backoff = Backoff::new(what);
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) => backoff.failed(&format!("{e:#}")).await,
        }
    }
}

/// Waits between retries of `what`, doubling up to [`MAX_BACKOFF`], and logs a failure only when
/// it differs from the one before (no line repeated in a loop).
pub struct Backoff<'a> {
    what: &'a str,
    delay: Duration,
    last: String,
}

impl<'a> Backoff<'a> {
    const FIRST: Duration = Duration::from_millis(250);

    pub fn new(what: &'a str) -> Self {
        Self {
            what,
            delay: Self::FIRST,
            last: String::new(),
        }
    }

    /// Logs a failure (unless it repeats the one before) and says how long to wait before the
    /// next try.
    pub fn delay_after(&mut self, e: &dyn std::fmt::Display) -> Duration {
        let msg = format!("{}: {e}", self.what);
        if msg != self.last {
            warn!("{msg}; retrying");
            self.last = msg;
        }
        let delay = self.delay;
        self.delay = (self.delay * 2).min(MAX_BACKOFF);
        delay
    }

    /// Logs a failure and waits before the next try.
    pub async fn failed(&mut self, e: &dyn std::fmt::Display) {
        let delay = self.delay_after(e);
        notify::pause(delay).await;
    }

    /// The failure will not pass by itself: wait the longest pause from now on.
    pub fn lasting(&mut self) {
        self.delay = MAX_BACKOFF;
    }

    /// A try worked: the next failure starts from the shortest wait. Whether tries had failed.
    pub fn succeeded(&mut self) -> bool {
        self.delay = Self::FIRST;
        !std::mem::take(&mut self.last).is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_and_starts_over_after_a_success() {
        let mut b = Backoff::new("etcd watch broken");
        let waits: Vec<Duration> = (0..8).map(|_| b.delay_after(&"refused")).collect();
        assert_eq!(waits[0], Duration::from_millis(250));
        assert_eq!(waits[1], Duration::from_millis(500));
        assert_eq!(waits[5], Duration::from_secs(8));
        assert_eq!(waits[6], MAX_BACKOFF, "capped");
        assert_eq!(waits[7], MAX_BACKOFF);
        assert!(b.succeeded(), "there were failures to recover from");
        assert!(!b.succeeded(), "nothing failed since");
        assert_eq!(b.delay_after(&"refused"), Duration::from_millis(250));
    }
}
