//! Every etcd call goes through here: bounded in time, counted, named in its error; and the
//! errors weft decides on, recognised.

use std::future::Future;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};

use crate::notify;

/// The largest etcd response weft reads. gRPC's default (4 MiB) is less than four of etcd's
/// largest values, which would make a listing fail forever; flanneld's Go client takes 2 GiB.
/// Pages aim at [`PAGE_BYTES`] and watch revisions come in fragments of at most etcd's request
/// limit, so this bounds only what an etcd configured far beyond its defaults could send; such a
/// page is read again smaller, such a watch response makes weftd list again past it.
pub const MAX_MESSAGE: usize = 64 << 20;

/// Longest any single etcd call may take. The client's own timeout does not cover waiting for a
/// broken connection to come back, and a hung call must not stall the agent loop.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(15);

/// Tries of a call refused at its connection ([`never_sent`]) before the refusal counts as its
/// failure. The client spreads calls over every endpoint at random, a stopped member's included
/// (tonic keeps reconnecting to it, and a member back up answers its first call with the
/// refusal it got while down): another try most likely goes to a member that answers, where
/// the caller's backoff would wait up to ten seconds for each unlucky pick. A refusal costs
/// microseconds; with one endpoint of two refusing, one call in 400 needed 7 tries.
pub const CONNECT_TRIES: usize = 16;

/// Bounds an etcd call in time and names it in the error. The bound is declared to the watchdog
/// (`notify::bounded`): a call waiting on a stopped or unreachable etcd is slow, not hung.
/// `call` makes the call; it is made again at once when a member refused it ([`sent`]).
pub async fn rpc<T, Fut>(what: impl FnOnce() -> String, call: impl FnMut() -> Fut) -> Result<T>
where
    Fut: Future<Output = Result<T, etcd_client::Error>>,
{
    let r = notify::bounded(RPC_TIMEOUT, sent(call)).await;
    crate::metrics::get().etcd_op(op_of(std::any::type_name::<T>()), matches!(r, Some(Ok(_))));
    match r {
        Some(r) => r.with_context(what),
        None => Err(anyhow!("no answer within {RPC_TIMEOUT:?}")).with_context(what),
    }
}

/// What `call` answers once a member took it: made again at once, [`CONNECT_TRIES`] times in
/// all, while it is refused at its connection. Unbounded in time: the caller bounds it.
pub async fn sent<T, Fut>(mut call: impl FnMut() -> Fut) -> Result<T, etcd_client::Error>
where
    Fut: Future<Output = Result<T, etcd_client::Error>>,
{
    let mut tries = 1;
    loop {
        match call().await {
            Err(e) if tries < CONNECT_TRIES && never_sent(&e) => tries += 1,
            r => return r,
        }
    }
}

/// Whether a call failed because its member refused the connection: etcd never saw it, so it may
/// be made again whatever it does (a transaction too). tonic reports UNAVAILABLE over the
/// connector's error, whose source is the refused connect(2); a connection that broke once made
/// fails otherwise (the call may have reached etcd).
pub fn never_sent(e: &etcd_client::Error) -> bool {
    /// gRPC's status code UNAVAILABLE (tonic is not a direct dependency to name it by).
    const UNAVAILABLE: i32 = 14;
    let etcd_client::Error::GRpcStatus(s) = e else {
        return false;
    };
    if i32::from(s.code()) != UNAVAILABLE {
        return false;
    }
    let mut source = std::error::Error::source(s);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return io.kind() == std::io::ErrorKind::ConnectionRefused;
        }
        source = err.source();
    }
    false
}

/// etcd calls by the response type [`rpc`] gets back (its label), matched on the type's
/// name so that a new call needs no change here (it counts as `other` until named).
const OPS: [(&str, &str); 8] = [
    ("::GetResponse", "get"),
    ("::PutResponse", "put"),
    ("::TxnResponse", "txn"),
    ("::LeaseGrantResponse", "lease_grant"),
    ("::LeaseRevokeResponse", "lease_revoke"),
    ("::LeaseTimeToLiveResponse", "lease_time_to_live"),
    ("::WatchStream", "watch"),
    ("::Client", "connect"),
];

/// The metrics label of an etcd call, from the type it returns (see [`OPS`]).
fn op_of(type_name: &str) -> &'static str {
    OPS.iter()
        .find(|(name, _)| type_name.contains(name))
        .map_or("other", |(_, op)| op)
}

/// Whether a failed keep-alive means etcd does not know the lease. etcd answers a keep-alive for
/// an unknown lease with TTL 0, which etcd-client 0.21 reports as exactly this error; a gRPC
/// NotFound (`etcdserver: requested lease not found`) says the same.
pub fn lease_not_found(e: &etcd_client::Error) -> bool {
    /// gRPC's status code NOT_FOUND (tonic is not a direct dependency to name it by).
    const GRPC_NOT_FOUND: i32 = 5;
    match e {
        etcd_client::Error::LeaseKeepAliveError(m) => m == "lease not found",
        etcd_client::Error::GRpcStatus(s) => i32::from(s.code()) == GRPC_NOT_FOUND,
        _ => false,
    }
}

/// Whether a failed call was refused for its size: gRPC's own receive limit (tonic answers
/// OUT_OF_RANGE "decoded message length too large") or a server that would not send that much
/// (RESOURCE_EXHAUSTED "trying to send message larger than max").
pub fn too_large(e: &etcd_client::Error) -> bool {
    /// gRPC status codes (tonic is not a direct dependency to name them by).
    const RESOURCE_EXHAUSTED: i32 = 8;
    const OUT_OF_RANGE: i32 = 11;
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            let code = i32::from(s.code());
            let msg = s.message();
            (code == OUT_OF_RANGE || code == RESOURCE_EXHAUSTED)
                && (msg.contains("too large") || msg.contains("larger than max"))
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etcd_calls_are_named_by_what_they_return() {
        use std::any::type_name;
        assert_eq!(op_of(type_name::<etcd_client::GetResponse>()), "get");
        assert_eq!(op_of(type_name::<etcd_client::PutResponse>()), "put");
        assert_eq!(op_of(type_name::<etcd_client::TxnResponse>()), "txn");
        assert_eq!(
            op_of(type_name::<etcd_client::LeaseGrantResponse>()),
            "lease_grant"
        );
        assert_eq!(
            op_of(type_name::<etcd_client::LeaseRevokeResponse>()),
            "lease_revoke"
        );
        assert_eq!(
            op_of(type_name::<etcd_client::LeaseTimeToLiveResponse>()),
            "lease_time_to_live"
        );
        assert_eq!(op_of(type_name::<etcd_client::WatchStream>()), "watch");
        assert_eq!(op_of(type_name::<etcd_client::Client>()), "connect");
        assert_eq!(op_of(type_name::<String>()), "other");
    }

    #[test]
    fn only_a_size_refusal_counts_as_too_large() {
        let received = etcd_client::Error::GRpcStatus(tonic_status(
            11,
            "Error, decoded message length too large: found 5600823 bytes, the limit is: 4194304 bytes",
        ));
        assert!(too_large(&received));
        let sent = etcd_client::Error::GRpcStatus(tonic_status(
            8,
            "grpc: trying to send message larger than max (70000000 vs. 67108864)",
        ));
        assert!(too_large(&sent));
        let compacted = etcd_client::Error::GRpcStatus(tonic_status(
            11,
            "etcdserver: mvcc: required revision has been compacted",
        ));
        assert!(!too_large(&compacted));
        assert!(!too_large(&etcd_client::Error::InvalidArgs(
            "too large".into()
        )));
    }

    /// A call refused at its connection, as etcd-client reports it: tonic's UNAVAILABLE over
    /// the connector's error over connect(2)'s.
    fn refused() -> etcd_client::Error {
        let io = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let connect = tonic::ConnectError(Box::new(io));
        etcd_client::Error::GRpcStatus(tonic::Status::from_error(Box::new(connect)))
    }

    #[test]
    fn only_a_refused_connection_counts_as_never_sent() {
        assert!(never_sent(&refused()), "{}", refused());
        // The connection was made, then broke: the call may have reached etcd.
        let io = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        let broken = etcd_client::Error::GRpcStatus(tonic::Status::from_error(Box::new(io)));
        assert!(!never_sent(&broken), "{broken}");
        let no_leader = etcd_client::Error::GRpcStatus(tonic_status(14, "etcdserver: no leader"));
        assert!(!never_sent(&no_leader));
        assert!(!never_sent(&etcd_client::Error::InvalidArgs("x".into())));
    }

    #[tokio::test]
    async fn a_call_to_a_port_nobody_listens_on_counts_as_never_sent() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let endpoint = format!("http://127.0.0.1:{port}");
        let mut client = etcd_client::Client::connect([endpoint], None)
            .await
            .expect("the client connects lazily");
        let e = client.get("k", None).await.expect_err("nobody listens");
        assert!(never_sent(&e), "{e}: {e:?}");
    }

    /// `sent` of a call refused at its connection the first `refusals` times, then answered
    /// (or refused for good); how many tries were made.
    async fn tries_until_sent(refusals: usize) -> (Result<u32, etcd_client::Error>, usize) {
        let mut tries = 0;
        let r = sent(|| {
            tries += 1;
            let refused_now = tries <= refusals;
            async move {
                if refused_now {
                    Err(refused())
                } else {
                    Ok(7)
                }
            }
        })
        .await;
        (r, tries)
    }

    #[tokio::test]
    async fn a_call_a_member_refused_is_made_again_at_once() {
        let (r, tries) = tries_until_sent(2).await;
        assert_eq!(r.ok(), Some(7), "another try reached a member that answers");
        assert_eq!(tries, 3);
        let (r, tries) = tries_until_sent(0).await;
        assert_eq!((r.ok(), tries), (Some(7), 1));
    }

    #[tokio::test]
    async fn a_call_refused_every_time_fails_after_a_few_tries() {
        let (r, tries) = tries_until_sent(usize::MAX).await;
        assert!(r.is_err_and(|e| never_sent(&e)));
        assert_eq!(tries, CONNECT_TRIES, "then the caller's backoff");
    }

    #[tokio::test]
    async fn a_call_that_failed_in_etcd_is_not_made_again() {
        let mut tries = 0;
        let r: Result<u32, _> = sent(|| {
            tries += 1;
            async {
                Err(etcd_client::Error::GRpcStatus(tonic_status(
                    14,
                    "etcdserver: no leader",
                )))
            }
        })
        .await;
        assert!(r.is_err());
        assert_eq!(tries, 1);
    }

    /// A gRPC status as etcd-client reports it.
    fn tonic_status(code: i32, msg: &str) -> tonic::Status {
        tonic::Status::new(code.into(), msg)
    }

    #[test]
    fn only_an_unknown_lease_counts_as_expired() {
        let not_found = etcd_client::Error::LeaseKeepAliveError("lease not found".into());
        assert!(lease_not_found(&not_found));
        let closed = etcd_client::Error::LeaseKeepAliveError("channel closed".into());
        assert!(!lease_not_found(&closed), "a broken stream is transient");
        let other = etcd_client::Error::InvalidArgs("x".into());
        assert!(!lease_not_found(&other));
    }
}
