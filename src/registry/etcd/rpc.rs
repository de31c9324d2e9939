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

/// Bounds an etcd call in time and names it in the error. The bound is declared to the watchdog
/// (`notify::bounded`): a call waiting on a stopped or unreachable etcd is slow, not hung.
pub async fn rpc<T, E>(
    what: impl FnOnce() -> String,
    fut: impl Future<Output = Result<T, E>>,
) -> Result<T>
where
    E: std::error::Error + Send + Sync + 'static,
{
    let r = notify::bounded(RPC_TIMEOUT, fut).await;
    crate::metrics::get().etcd_op(op_of(std::any::type_name::<T>()), matches!(r, Some(Ok(_))));
    match r {
        Some(r) => r.with_context(what),
        None => Err(anyhow!("no answer within {RPC_TIMEOUT:?}")).with_context(what),
    }
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
