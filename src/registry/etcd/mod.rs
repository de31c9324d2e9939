//! The etcd store: flannel's keys under one prefix (`<prefix>/config`, `<prefix>/subnets/…`),
//! nothing else. Which subnet to take is the caller's (`policy`); this module only reads,
//! writes and watches, every call bounded in time (`rpc`).

mod claim;
mod keys;
mod list;
mod rpc;
mod watch;

use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, Identity, KvClient, PutOptions,
    TlsOptions, Txn, TxnOp, WatchClient, WatchOptions, WatchStream,
};
use ipnet::{Ipv4Net, Ipv6Net};
use tracing::warn;

pub use keys::{decode, hold, parse_subnet_key, subnet_key, subnet_of, KeySubnets};
pub use rpc::MAX_MESSAGE;
pub use watch::EtcdWatch;

use super::{Awaited, Names, Position, Renewal};
use crate::flags::EtcdArgs;
use crate::lease::{Hold, Lease, LeaseAttrs};
use crate::notify;
use crate::retry::MAX_BACKOFF;
use rpc::{lease_not_found, rpc, RPC_TIMEOUT};

#[derive(Clone)]
pub struct EtcdStore {
    /// For leases (grant, keep-alive, revoke): answers of a few bytes.
    client: Client,
    /// Keys and watches, which carry whatever other hosts stored: with [`MAX_MESSAGE`].
    kv: KvClient,
    watcher: WatchClient,
    names: Names,
}

impl EtcdStore {
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
            || Client::connect(endpoints, Some(opts.clone())),
        )
        .await?;
        Ok(Self {
            kv: client.kv_client().max_decoding_message_size(MAX_MESSAGE),
            watcher: client.watch_client().max_decoding_message_size(MAX_MESSAGE),
            client,
            names: Names::of(args),
        })
    }

    pub fn names(&self) -> &Names {
        &self.names
    }

    /// The config text and the revision it was read at (`None` when the key is absent).
    pub async fn get_config(&self) -> Result<(Option<String>, Position)> {
        let key = self.names.config();
        let resp = rpc(
            || format!("get {key}"),
            || {
                let (mut kv, key) = (self.kv.clone(), key.as_str());
                async move { kv.get(key, None).await }
            },
        )
        .await?;
        let rev = resp.header().map_or(0, |h| h.revision());
        let text = resp
            .kvs()
            .first()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned());
        Ok((text, Position(rev)))
    }

    pub async fn put_config(&self, text: &str) -> Result<()> {
        let key = self.names.config();
        rpc(
            || format!("put {key}"),
            || {
                let (mut kv, key) = (self.kv.clone(), key.as_str());
                async move { kv.put(key, text, None).await }
            },
        )
        .await?;
        Ok(())
    }

    /// Stores the config only if the key does not exist, in one transaction (create revision 0 →
    /// put, else read it back), so any number of writers racing at once leave exactly one config.
    /// `Ok(None)`: ours was stored; `Ok(Some(text))`: the config that was already there, kept.
    pub async fn put_config_if_absent(&self, text: &str) -> Result<Option<String>> {
        let key = self.names.config();
        let txn = Txn::new()
            .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.as_str(), text, None)])
            .or_else([TxnOp::get(key.as_str(), None)]);
        let resp = rpc(|| format!("create {key} if absent"), || self.txn(&txn)).await?;
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

    /// Blocks until an event under the prefix after `after` is `what`, or a minute passes.
    pub async fn wait_for(&self, after: Position, what: Awaited) {
        let config = self.names.config();
        let subnets = self.names.subnets();
        let matches = |key: &str, kind: etcd_client::EventType| match what {
            Awaited::Config => key == config,
            Awaited::LeaseDeleted => {
                key.starts_with(&subnets) && kind == etcd_client::EventType::Delete
            }
        };
        let wait = async {
            let mut stream = match self.watch(after.0 + 1).await {
                Ok(s) => s,
                Err(e) => {
                    warn!("{e:#}");
                    tokio::time::sleep(MAX_BACKOFF).await;
                    return;
                }
            };
            while let Ok(Some(resp)) = stream.message().await {
                if resp.canceled() || resp.compact_revision() > 0 {
                    return;
                }
                for ev in resp.events() {
                    if let Some(kv) = ev.kv() {
                        if matches(&String::from_utf8_lossy(kv.key()), ev.event_type()) {
                            return;
                        }
                    }
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        };
        notify::bounded(Duration::from_secs(60), wait).await;
    }

    /// Creates a lease of `subnet` (and `ipv6`) for us if nobody holds it. `Ok(None)`: someone
    /// else got there first.
    async fn create(
        &self,
        subnet: Ipv4Net,
        ipv6: Option<Ipv6Net>,
        attrs: &LeaseAttrs,
        ttl: Duration,
    ) -> Result<Option<Lease>> {
        let key = self.names.lease(subnet, ipv6);
        let id = self.grant(ttl).await?;
        // No key of this IPv4 subnet at all, with or without an IPv6 part: two hosts racing for
        // one IPv4 subnet with different IPv6 ones would otherwise both win.
        let v4_keys = self.names.lease(subnet, None);
        let txn = Txn::new()
            .when([Compare::version(v4_keys.as_str(), CompareOp::Equal, 0).with_prefix()])
            .and_then([TxnOp::put(
                key.as_str(),
                attrs.to_json(),
                Some(PutOptions::new().with_lease(id)),
            )]);
        let resp = rpc(|| format!("create {key}"), || self.txn(&txn)).await?;
        if !resp.succeeded() {
            self.revoke(id).await;
            return Ok(None);
        }
        Ok(Some(Lease {
            subnet,
            ipv6_subnet: ipv6,
            attrs: attrs.clone(),
            hold: keys::hold(id),
            version: resp.header().map_or(0, |h| h.revision()),
        }))
    }

    /// Takes over `old` (our own earlier lease) with fresh attributes: a new etcd lease, or none for
    /// a reservation, which stays one. `Ok(None)`: the key changed under us since it was read.
    async fn take_over(
        &self,
        old: &Lease,
        attrs: &LeaseAttrs,
        ttl: Duration,
    ) -> Result<Option<Lease>> {
        let key = self.names.lease(old.subnet, old.ipv6_subnet);
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
                old.version,
            )])
            .and_then([TxnOp::put(key.as_str(), attrs.to_json(), put_opts)]);
        let resp = rpc(|| format!("update {key}"), || self.txn(&txn)).await?;
        if !resp.succeeded() {
            if id != 0 {
                self.revoke(id).await;
            }
            return Ok(None);
        }
        if let Hold::Expiring(old_id) = old.hold {
            // The key now lives on the new etcd lease; the old one holds nothing of ours.
            self.revoke(old_id.get()).await;
        }
        Ok(Some(Lease {
            subnet: old.subnet,
            ipv6_subnet: old.ipv6_subnet,
            attrs: attrs.clone(),
            hold: keys::hold(id),
            version: resp.header().map_or(0, |h| h.revision()),
        }))
    }

    /// Moves `old` (our own earlier lease, not a reservation) to the key of its IPv4 subnet with
    /// `ipv6`, in one transaction: the new key is created and the old one deleted only if the
    /// old one is unchanged and the new one absent. `Ok(None)`: either was not.
    async fn rekey(
        &self,
        old: &Lease,
        ipv6: Option<Ipv6Net>,
        attrs: &LeaseAttrs,
        ttl: Duration,
    ) -> Result<Option<Lease>> {
        let (from, to) = (
            self.names.lease(old.subnet, old.ipv6_subnet),
            self.names.lease(old.subnet, ipv6),
        );
        let id = self.grant(ttl).await?;
        let txn = Txn::new()
            .when([
                Compare::mod_revision(from.as_str(), CompareOp::Equal, old.version),
                Compare::version(to.as_str(), CompareOp::Equal, 0),
            ])
            .and_then([
                TxnOp::put(
                    to.as_str(),
                    attrs.to_json(),
                    Some(PutOptions::new().with_lease(id)),
                ),
                TxnOp::delete(from.as_str(), None),
            ]);
        let resp = rpc(|| format!("move {from} to {to}"), || self.txn(&txn)).await?;
        if !resp.succeeded() {
            self.revoke(id).await;
            return Ok(None);
        }
        if let Hold::Expiring(old_id) = old.hold {
            self.revoke(old_id.get()).await;
        }
        Ok(Some(Lease {
            subnet: old.subnet,
            ipv6_subnet: ipv6,
            attrs: attrs.clone(),
            hold: keys::hold(id),
            version: resp.header().map_or(0, |h| h.revision()),
        }))
    }

    /// Renews a lease: see [`EtcdStore::keep_alive`].
    pub async fn renew(&self, lease: &Lease) -> Result<Renewal> {
        match lease.hold {
            Hold::Expiring(id) => self.keep_alive(id.get()).await,
            Hold::Reserved => Ok(Renewal::Renewed),
        }
    }

    /// Refreshes an etcd lease to its full TTL. Opening the keep-alive stream sends the first
    /// keep-alive and reads its answer, which is all one renewal needs.
    pub async fn keep_alive(&self, id: i64) -> Result<Renewal> {
        let open = notify::bounded(
            RPC_TIMEOUT,
            rpc::sent(|| {
                let mut client = self.client.clone();
                async move { client.lease_keep_alive(id).await }
            }),
        )
        .await;
        crate::metrics::get().etcd_op("lease_keep_alive", matches!(open, Some(Ok(_))));
        match open {
            Some(Ok(_)) => Ok(Renewal::Renewed),
            Some(Err(e)) if lease_not_found(&e) => Ok(Renewal::Expired),
            Some(Err(e)) => Err(e).context("renew etcd lease"),
            None => Err(anyhow!("no answer within {RPC_TIMEOUT:?}")).context("renew etcd lease"),
        }
    }

    /// Seconds a lease has left (`None`: expired or unknown, or a reservation).
    pub async fn time_left(&self, lease: &Lease) -> Result<Option<i64>> {
        let Hold::Expiring(id) = lease.hold else {
            return Ok(None);
        };
        let id = id.get();
        let resp = rpc(
            || "lease time-to-live".to_string(),
            || {
                let mut client = self.client.clone();
                async move { client.lease_time_to_live(id, None).await }
            },
        )
        .await?;
        Ok((resp.ttl() > 0).then_some(resp.ttl()))
    }

    /// Watches everything under the prefix (config and subnets) from `revision`. A revision
    /// larger than etcd's request limit (a delete-range over thousands of keys) comes in
    /// fragments of at most that limit (etcd 3.4+), each a response of its own: so any revision
    /// can be received, but one may end in the next response.
    pub async fn watch(&self, revision: i64) -> Result<WatchStream> {
        let key = self.names.watched();
        rpc(
            || format!("watch {key}"),
            || {
                let (mut watcher, key) = (self.watcher.clone(), key.as_str());
                let opts = WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(revision)
                    .with_fragment();
                async move { watcher.watch(key, Some(opts)).await }
            },
        )
        .await
    }

    /// One try of a transaction (a [`rpc`] call).
    async fn txn(&self, txn: &Txn) -> Result<etcd_client::TxnResponse, etcd_client::Error> {
        self.kv.clone().txn(txn.clone()).await
    }

    async fn grant(&self, ttl: Duration) -> Result<i64> {
        let secs = ttl.as_secs().max(1) as i64;
        let resp = rpc(
            || "grant etcd lease".to_string(),
            || {
                let mut client = self.client.clone();
                async move { client.lease_grant(secs, None).await }
            },
        )
        .await?;
        Ok(resp.id())
    }

    /// Gives up a lease this host holds (its key goes with it), best effort. A reservation is
    /// the operator's: it stays.
    pub async fn release(&self, lease: &Lease) {
        if let Hold::Expiring(id) = lease.hold {
            self.revoke(id.get()).await
        }
    }

    /// Best effort: an unrevoked lease expires on its own.
    async fn revoke(&self, id: i64) {
        let revoke = rpc(
            || format!("revoke etcd lease {id}"),
            || {
                let mut client = self.client.clone();
                async move { client.lease_revoke(id).await }
            },
        );
        if let Err(e) = revoke.await {
            warn!("{e:#}; it will expire on its own");
        }
    }
}
