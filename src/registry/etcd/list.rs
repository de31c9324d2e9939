//! Reading every lease record in pages, at one revision, whatever other hosts stored.

use anyhow::Result;
use etcd_client::GetOptions;

use super::keys::decode;
use super::rpc::{rpc, too_large, MAX_MESSAGE};
use super::EtcdStore;
use crate::lease::Record;

/// Most keys per request when listing leases: a page of flannel leases is ~200 KB on the wire.
const LIST_PAGE: i64 = 1000;

/// What a listing page aims to stay under. Any host with etcd credentials can store values of up
/// to etcd's request limit (1.5 MiB by default) under `subnets/`: the page size follows the bytes
/// the last page held, so a listing of junk is read in pages of a few MiB, never all at once.
const PAGE_BYTES: usize = 4 << 20;

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

/// How many keys the next listing page asks for, after one of `keys` keys held `bytes` bytes
/// and asked for `limit`: about [`PAGE_BYTES`] worth at the rate just seen, growing back towards
/// [`LIST_PAGE`] (at most doubling) when pages are small. Never less than one key.
fn next_page_limit(limit: i64, keys: usize, bytes: usize) -> i64 {
    let keys = keys.max(1) as u128;
    let fits = (PAGE_BYTES as u128 * keys / bytes.max(1) as u128).min(LIST_PAGE as u128) as i64;
    fits.min(limit.saturating_mul(2)).clamp(1, LIST_PAGE)
}

impl EtcdStore {
    /// Every key under `subnets/` as stored, handed to `each` in key order, and the revision
    /// they were read at. Read in pages, all at the revision of the first (one consistent
    /// snapshot), so that a caller folding each record into something smaller never holds all of
    /// a large listing at once. A page holds at most [`LIST_PAGE`] keys and aims at
    /// [`PAGE_BYTES`]; one too large to receive is asked for again smaller, and a single key too
    /// large to receive is handed on as unreadable, so no value anyone can store stops a listing.
    /// A failure midway (a member gone, the revision compacted meanwhile) fails the listing: the
    /// caller starts over.
    pub async fn list_records_paged(&self, mut each: impl FnMut(Record)) -> Result<i64> {
        let prefix = self.names.subnets();
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
                || {
                    let (mut kv, key, opts) = (self.kv.clone(), from.clone(), opts.clone());
                    async move { kv.get(key, Some(opts)).await }
                },
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
            || {
                let (mut kv, opts) = (self.kv.clone(), opts.clone());
                async move { kv.get(from, Some(opts)).await }
            },
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
    pub fn decode(&self, kv: &etcd_client::KeyValue) -> Record {
        decode(
            String::from_utf8_lossy(kv.key()).into_owned(),
            &self.names.subnets(),
            kv.value(),
            kv.create_revision(),
            kv.mod_revision(),
            kv.lease(),
        )
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
}
