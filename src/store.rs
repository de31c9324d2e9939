//! The etcd side of leases: flannel's keys under one prefix, nothing else. Policy (which subnet to
//! take) lives in `policy`; this module only reads and writes.

use std::net::Ipv4Addr;
use std::time::Duration;

use std::future::Future;

use anyhow::{anyhow, Context, Result};
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity, KeyValue,
    KvClient, PutOptions, TlsOptions, Txn, TxnOp, WatchClient, WatchOptions, WatchStream,
};
use ipnet::Ipv4Net;
use tracing::warn;

use crate::flags::EtcdArgs;
use crate::lease::{subnet_key, Lease, LeaseAttrs, Record};
use crate::notify;
use crate::policy::Claims;

/// A lease key or value that cannot be read: skipped, with the reason.
#[derive(Debug, Clone, PartialEq)]
pub struct BadLease {
    pub key: String,
    pub reason: String,
}

/// All leases at one etcd revision.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    pub leases: Vec<Lease>,
    pub bad: Vec<BadLease>,
    pub revision: i64,
    /// Every key as stored, readable or not, with its create revision: what the agent's peer set
    /// is built from (`leases` and `bad` are the same keys, split, for allocation and weftctl).
    pub records: Vec<Record>,
}

/// Most keys per request when listing leases: a page of flannel leases is ~200 KB on the wire.
const LIST_PAGE: i64 = 1000;

/// What a listing page aims to stay under. Any host with etcd credentials can store values of up
/// to etcd's request limit (1.5 MiB by default) under `subnets/`: the page size follows the bytes
/// the last page held, so a listing of junk is read in pages of a few MiB, never all at once.
const PAGE_BYTES: usize = 4 << 20;

/// The largest etcd response weft reads. gRPC's default (4 MiB) is less than four of etcd's
/// largest values, which would make a listing fail forever; flanneld's Go client takes 2 GiB.
/// Pages aim at [`PAGE_BYTES`] and watch revisions come in fragments of at most etcd's request
/// limit, so this bounds only what an etcd configured far beyond its defaults could send; such a
/// page is read again smaller, such a watch response makes weftd list again past it.
pub const MAX_MESSAGE: usize = 64 << 20;

/// The smallest key after every key starting with `prefix` (etcd's range end for a prefix).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return end;
        }
    }
    // Only 0xff bytes (or nothing): every key from the prefix on.
    vec![0]
}

/// Longest any single etcd call may take. The client's own timeout does not cover waiting for a
/// broken connection to come back, and a hung call must not stall the agent loop.
const RPC_TIMEOUT: Duration = Duration::from_secs(15);

/// Bounds an etcd call in time and names it in the error. The bound is declared to the watchdog
/// (`notify::bounded`): a call waiting on a stopped or unreachable etcd is slow, not hung.
async fn rpc<T, E>(
    what: impl FnOnce() -> String,
    fut: impl Future<Output = Result<T, E>>,
) -> Result<T>
where
    E: std::error::Error + Send + Sync + 'static,
{
    let r = notify::bounded(RPC_TIMEOUT, fut).await;
    crate::metrics::get().etcd_request::<T>(matches!(r, Some(Ok(_))));
    match r {
        Some(r) => r.with_context(what),
        None => Err(anyhow!("no answer within {RPC_TIMEOUT:?}")).with_context(what),
    }
}

/// What renewing a lease found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    /// Good for another full TTL.
    Renewed,
    /// etcd no longer has it (it expired, or was revoked): its keys are gone with it.
    Expired,
}

/// Whether a failed keep-alive means etcd does not know the lease. etcd answers a keep-alive for
/// an unknown lease with TTL 0, which etcd-client 0.21 reports as exactly this error; a gRPC
/// NotFound (`etcdserver: requested lease not found`) says the same.
fn lease_not_found(e: &etcd_client::Error) -> bool {
    /// gRPC's status code NOT_FOUND (tonic is not a direct dependency to name it by).
    const GRPC_NOT_FOUND: i32 = 5;
    match e {
        etcd_client::Error::LeaseKeepAliveError(m) => m == "lease not found",
        etcd_client::Error::GRpcStatus(s) => i32::from(s.code()) == GRPC_NOT_FOUND,
        _ => false,
    }
}

#[derive(Clone)]
pub struct Store {
    /// For leases (grant, keep-alive, revoke): answers of a few bytes.
    client: Client,
    /// Keys and watches, which carry whatever other hosts stored: with [`MAX_MESSAGE`].
    kv: KvClient,
    watcher: WatchClient,
    prefix: String,
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

/// How many keys the next listing page asks for, after one of `keys` keys held `bytes` bytes
/// and asked for `limit`: about [`PAGE_BYTES`] worth at the rate just seen, growing back towards
/// [`LIST_PAGE`] (at most doubling) when pages are small. Never less than one key.
fn next_page_limit(limit: i64, keys: usize, bytes: usize) -> i64 {
    let keys = keys.max(1) as u128;
    let fits = (PAGE_BYTES as u128 * keys / bytes.max(1) as u128).min(LIST_PAGE as u128) as i64;
    fits.min(limit.saturating_mul(2)).clamp(1, LIST_PAGE)
}

impl Store {
    /// Connects to etcd with the TLS and auth settings of `args`.
    pub async fn connect(args: &EtcdArgs) -> Result<Self> {
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(Duration::from_secs(15))
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            // Every call (watches included) must reach a member that has a leader: a member cut
            // off from the others fails them with "no leader" (a watch is cancelled once it
            // loses its leader) instead of answering stale data or leaving a watch silent.
            .with_require_leader(true);
        if let (Some(user), Some(pass)) = (&args.etcd_username, args.password()?) {
            // etcd's auth tokens expire when idle (5 min by default); weftd idles for hours.
            opts = opts.with_user(user, pass).with_auto_token_refresh(true);
        }
        if args.etcd_cafile.is_some() || args.etcd_certfile.is_some() {
            let mut tls = TlsOptions::new();
            if let Some(ca) = &args.etcd_cafile {
                let pem = std::fs::read(ca).with_context(|| format!("read {}", ca.display()))?;
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            if let (Some(cert), Some(key)) = (&args.etcd_certfile, &args.etcd_keyfile) {
                let c = std::fs::read(cert).with_context(|| format!("read {}", cert.display()))?;
                let k = std::fs::read(key).with_context(|| format!("read {}", key.display()))?;
                tls = tls.identity(Identity::from_pem(c, k));
            }
            opts = opts.with_tls(tls);
        }
        let endpoints = &args.etcd_endpoints;
        let client = rpc(
            || format!("connect to etcd at {}", endpoints.join(",")),
            Client::connect(endpoints, Some(opts)),
        )
        .await?;
        Ok(Self {
            kv: client.kv_client().max_decoding_message_size(MAX_MESSAGE),
            watcher: client.watch_client().max_decoding_message_size(MAX_MESSAGE),
            client,
            prefix: args.prefix().to_string(),
        })
    }

    pub fn config_key(&self) -> String {
        format!("{}/config", self.prefix)
    }

    pub fn subnets_prefix(&self) -> String {
        format!("{}/subnets/", self.prefix)
    }

    pub fn lease_key(&self, subnet: Ipv4Net) -> String {
        format!("{}{}", self.subnets_prefix(), subnet_key(subnet))
    }

    /// The config text and the revision it was read at (`None` when the key is absent).
    pub async fn get_config(&self) -> Result<(Option<String>, i64)> {
        let key = self.config_key();
        let resp = rpc(
            || format!("get {key}"),
            self.kv.clone().get(key.as_str(), None),
        )
        .await?;
        let rev = resp.header().map_or(0, |h| h.revision());
        let text = resp
            .kvs()
            .first()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned());
        Ok((text, rev))
    }

    pub async fn put_config(&self, text: &str) -> Result<()> {
        let key = self.config_key();
        rpc(
            || format!("put {key}"),
            self.kv.clone().put(key.as_str(), text, None),
        )
        .await?;
        Ok(())
    }

    /// Stores the config only if the key does not exist, in one transaction (create revision 0 →
    /// put, else read it back), so any number of writers racing at once leave exactly one config.
    /// `Ok(None)`: ours was stored; `Ok(Some(text))`: the config that was already there, kept.
    pub async fn put_config_if_absent(&self, text: &str) -> Result<Option<String>> {
        let key = self.config_key();
        let txn = Txn::new()
            .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.as_str(), text, None)])
            .or_else([TxnOp::get(key.as_str(), None)]);
        let resp = rpc(
            || format!("create {key} if absent"),
            self.kv.clone().txn(txn),
        )
        .await?;
        if resp.succeeded() {
            return Ok(None);
        }
        let existing = resp.op_responses().into_iter().find_map(|op| match op {
            etcd_client::TxnOpResponse::Get(get) => get
                .kvs()
                .first()
                .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
            _ => None,
        });
        // The compare failed, so the key existed at that revision and the get in the same
        // transaction saw it; an empty answer would be an etcd bug, reported rather than assumed.
        existing
            .map(Some)
            .with_context(|| format!("{key} exists but its value was not returned"))
    }

    /// Every lease under `subnets/`, garbage set aside.
    pub async fn list(&self) -> Result<Listing> {
        let mut listing = Listing::default();
        listing.revision = self
            .list_records_paged(|record| {
                match &record.value {
                    Ok(l) => listing.leases.push(l.clone()),
                    Err(e) => listing.bad.push(BadLease {
                        key: record.key.clone(),
                        reason: e.to_string(),
                    }),
                }
                listing.records.push(record);
            })
            .await?;
        Ok(listing)
    }

    /// What choosing a subnet for `public_ip` needs of the leases, without holding them all.
    pub async fn claims(&self, public_ip: Ipv4Addr) -> Result<Claims> {
        let prefix = self.subnets_prefix();
        let mut claims = Claims::new(public_ip);
        claims.revision = self.list_records_paged(|r| claims.add(r, &prefix)).await?;
        Ok(claims)
    }

    /// Every key under `subnets/` as stored, handed to `each` in key order, and the revision
    /// they were read at. Read in pages, all at the revision of the first (one consistent
    /// snapshot), so that a caller folding each record into something smaller never holds all of
    /// a large listing at once. A page holds at most [`LIST_PAGE`] keys and aims at
    /// [`PAGE_BYTES`]; one too large to receive is asked for again smaller, and a single key too
    /// large to receive is handed on as unreadable, so no value anyone can store stops a listing.
    /// A failure midway (a member gone, the revision compacted meanwhile) fails the listing: the
    /// caller starts over.
    pub async fn list_records_paged(&self, mut each: impl FnMut(Record)) -> Result<i64> {
        let prefix = self.subnets_prefix();
        let end = prefix_end(prefix.as_bytes());
        let mut from = prefix.clone().into_bytes();
        let mut revision = 0;
        let mut limit = LIST_PAGE;
        loop {
            let mut opts = GetOptions::new().with_range(end.clone()).with_limit(limit);
            if revision > 0 {
                opts = opts.with_revision(revision);
            }
            let page = rpc(
                || format!("list {prefix}"),
                self.kv.clone().get(from.clone(), Some(opts)),
            )
            .await;
            let mut resp = match page {
                Ok(r) => r,
                Err(e) if e.downcast_ref().is_some_and(too_large) => {
                    if limit > 1 {
                        limit = (limit / 4).max(1);
                        continue;
                    }
                    // One value larger than weft reads: skipped by name, and the listing goes on.
                    let Some(key) = self.first_key(&from, &end, revision).await? else {
                        break;
                    };
                    each(Record::too_large(
                        String::from_utf8_lossy(&key).into_owned(),
                        MAX_MESSAGE,
                    ));
                    from = key;
                    from.push(0);
                    continue;
                }
                Err(e) => return Err(e),
            };
            if revision == 0 {
                revision = resp.header().map_or(0, |h| h.revision());
            }
            let more = resp.more();
            let kvs = resp.take_kvs();
            drop(resp);
            let Some(last) = kvs.last() else { break };
            // The next page starts just after the last key of this one.
            from = last.key().to_vec();
            from.push(0);
            let bytes = kvs.iter().map(|kv| kv.key().len() + kv.value().len()).sum();
            limit = next_page_limit(limit, kvs.len(), bytes);
            for kv in kvs {
                each(self.decode(&kv));
            }
            if !more {
                break;
            }
        }
        Ok(revision)
    }

    /// The first key in `from..end` at `revision` (0: now), without its value.
    async fn first_key(&self, from: &[u8], end: &[u8], revision: i64) -> Result<Option<Vec<u8>>> {
        let mut opts = GetOptions::new()
            .with_range(end.to_vec())
            .with_limit(1)
            .with_keys_only();
        if revision > 0 {
            opts = opts.with_revision(revision);
        }
        let mut resp = rpc(
            || "list a key too large to read".to_string(),
            self.kv.clone().get(from.to_vec(), Some(opts)),
        )
        .await?;
        Ok(resp
            .take_kvs()
            .into_iter()
            .next()
            .map(|kv| kv.key().to_vec()))
    }

    /// Reads one key/value of `subnets/` as a lease, keeping what cannot be read with the reason.
    /// A key that is not UTF-8 is read lossily: it is never a subnet key, so it stays unreadable.
    pub fn decode(&self, kv: &KeyValue) -> Record {
        Record::read(
            String::from_utf8_lossy(kv.key()).into_owned(),
            &self.subnets_prefix(),
            kv.value(),
            kv.create_revision(),
            kv.mod_revision(),
            kv.lease(),
        )
    }

    /// Creates `subnet` for us if nobody holds it. `Ok(None)`: someone else got there first.
    pub async fn create(
        &self,
        subnet: Ipv4Net,
        attrs: &LeaseAttrs,
        ttl: Duration,
    ) -> Result<Option<Lease>> {
        let key = self.lease_key(subnet);
        let id = self.grant(ttl).await?;
        let txn = Txn::new()
            .when([Compare::version(key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.as_str(),
                attrs.to_json(),
                Some(PutOptions::new().with_lease(id)),
            )]);
        let resp = rpc(|| format!("create {key}"), self.kv.clone().txn(txn)).await?;
        if !resp.succeeded() {
            self.revoke(id).await;
            return Ok(None);
        }
        Ok(Some(Lease {
            subnet,
            attrs: attrs.clone(),
            etcd_lease: id,
            mod_revision: resp.header().map_or(0, |h| h.revision()),
        }))
    }

    /// Takes over `old` (our own earlier lease) with fresh attributes: a new etcd lease, or none for
    /// a reservation, which stays one. `Ok(None)`: the key changed under us since it was read.
    pub async fn take_over(
        &self,
        old: &Lease,
        attrs: &LeaseAttrs,
        ttl: Duration,
    ) -> Result<Option<Lease>> {
        let key = self.lease_key(old.subnet);
        if old.is_reservation() && old.attrs == *attrs {
            return Ok(Some(old.clone()));
        }
        let id = if old.is_reservation() {
            0
        } else {
            self.grant(ttl).await?
        };
        let put_opts = (id != 0).then(|| PutOptions::new().with_lease(id));
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.as_str(),
                CompareOp::Equal,
                old.mod_revision,
            )])
            .and_then([TxnOp::put(key.as_str(), attrs.to_json(), put_opts)]);
        let resp = rpc(|| format!("update {key}"), self.kv.clone().txn(txn)).await?;
        if !resp.succeeded() {
            if id != 0 {
                self.revoke(id).await;
            }
            return Ok(None);
        }
        if !old.is_reservation() {
            // The key now lives on the new etcd lease; the old one holds nothing of ours.
            self.revoke(old.etcd_lease).await;
        }
        Ok(Some(Lease {
            subnet: old.subnet,
            attrs: attrs.clone(),
            etcd_lease: id,
            mod_revision: resp.header().map_or(0, |h| h.revision()),
        }))
    }

    /// Refreshes an etcd lease to its full TTL. Opening the keep-alive stream sends the first
    /// keep-alive and reads its answer, which is all one renewal needs.
    pub async fn keep_alive(&self, id: i64) -> Result<Renewal> {
        let open = notify::bounded(RPC_TIMEOUT, self.client.clone().lease_keep_alive(id)).await;
        crate::metrics::get().etcd_op("lease_keep_alive", matches!(open, Some(Ok(_))));
        match open {
            Some(Ok(_)) => Ok(Renewal::Renewed),
            Some(Err(e)) if lease_not_found(&e) => Ok(Renewal::Expired),
            Some(Err(e)) => Err(e).context("renew etcd lease"),
            None => Err(anyhow!("no answer within {RPC_TIMEOUT:?}")).context("renew etcd lease"),
        }
    }

    /// Seconds an etcd lease has left (`None`: expired or unknown).
    pub async fn time_to_live(&self, id: i64) -> Result<Option<i64>> {
        let resp = rpc(
            || "lease time-to-live".to_string(),
            self.client.clone().lease_time_to_live(id, None),
        )
        .await?;
        Ok((resp.ttl() > 0).then_some(resp.ttl()))
    }

    /// Watches everything under the prefix (config and subnets) from `revision`. A revision
    /// larger than etcd's request limit (a delete-range over thousands of keys) comes in
    /// fragments of at most that limit (etcd 3.4+), each a response of its own: so any revision
    /// can be received, but one may end in the next response.
    pub async fn watch(&self, revision: i64) -> Result<WatchStream> {
        let key = format!("{}/", self.prefix);
        rpc(
            || format!("watch {key}"),
            self.watcher.clone().watch(
                key.as_str(),
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(revision)
                        .with_fragment(),
                ),
            ),
        )
        .await
    }

    async fn grant(&self, ttl: Duration) -> Result<i64> {
        let secs = ttl.as_secs().max(1) as i64;
        let resp = rpc(
            || "grant etcd lease".to_string(),
            self.client.clone().lease_grant(secs, None),
        )
        .await?;
        Ok(resp.id())
    }

    /// Gives up a lease this host holds (its key goes with it), best effort.
    pub async fn revoke_lease(&self, id: i64) {
        self.revoke(id).await
    }

    /// Best effort: an unrevoked lease expires on its own.
    async fn revoke(&self, id: i64) {
        let mut client = self.client.clone();
        let revoke = rpc(
            || format!("revoke etcd lease {id}"),
            client.lease_revoke(id),
        );
        if let Err(e) = revoke.await {
            warn!("{e:#}; it will expire on its own");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_range_ends_just_after_the_prefix() {
        assert_eq!(
            prefix_end(b"/coreos.com/network/subnets/"),
            b"/coreos.com/network/subnets0"
        );
        assert_eq!(prefix_end(b"a\xff\xff"), b"b");
        assert_eq!(prefix_end(b"\xff"), [0]);
    }

    #[test]
    fn pages_follow_the_bytes_the_last_page_held() {
        // Flannel leases (~200 bytes): full pages.
        assert_eq!(next_page_limit(LIST_PAGE, 1000, 200_000), LIST_PAGE);
        // 1.4 MB values: three keys make a page.
        assert_eq!(next_page_limit(LIST_PAGE, 10, 14_000_000), 2);
        assert_eq!(next_page_limit(2, 2, 2_800_000), 2);
        // Small again: grows back, at most doubling.
        assert_eq!(next_page_limit(2, 2, 400), 4);
        assert_eq!(next_page_limit(600, 600, 1000), LIST_PAGE);
        // Whatever the input, a page asks for at least one key and at most LIST_PAGE.
        assert_eq!(next_page_limit(1, 1, usize::MAX), 1);
        assert_eq!(next_page_limit(LIST_PAGE, 0, 0), LIST_PAGE);
        assert_eq!(next_page_limit(i64::MAX, usize::MAX, 1), LIST_PAGE);
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
