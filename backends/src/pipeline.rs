//! Many netlink requests in flight on one socket at once. The kernel handles a socket's requests
//! in order and acknowledges each; sending the next before the last answer is back hides the
//! round trips (through the kernel and the connection task), which is most of what programming
//! thousands of peers costs when each request waits for its answer.

use std::future::Future;

use futures::StreamExt;

/// Requests in flight at once: enough to keep the socket busy; their answers (small acks, or an
/// error quoting a request of ~100 bytes) stay far below a netlink socket's receive buffer.
pub const IN_FLIGHT: usize = 64;

/// Runs `f` on every item, up to [`IN_FLIGHT`] at once; the results in the items' order.
pub async fn all<I, F, Fut>(items: I, f: F) -> Vec<Fut::Output>
where
    I: IntoIterator,
    F: FnMut(I::Item) -> Fut,
    Fut: Future,
{
    futures::stream::iter(items)
        .map(f)
        .buffered(IN_FLIGHT)
        .collect()
        .await
}
