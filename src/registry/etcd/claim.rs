//! Claiming this host's lease in etcd, as flanneld does: its own earlier lease first, then the
//! previous run's subnet, then a random free one (`policy`), created or taken over in a
//! transaction. Losing a race to another host means trying again with a fresh listing.

use std::collections::HashSet;
use std::net::Ipv4Addr;

use anyhow::Result;
use tracing::{info, warn};

use super::EtcdStore;
use crate::lease::Lease;
use crate::policy::{self, Choice, Claims};
use crate::registry::{Awaited, Claim, ClaimRead, Claiming, LeaseRequest, Position};
use crate::retry::{retry, Backoff};

impl EtcdStore {
    /// The leases as allocation needs them, and the point they were read at.
    async fn claims(&self, public_ip: Ipv4Addr) -> Result<(Claims, Position)> {
        let names = self.names();
        let mut claims = Claims::new(public_ip);
        let at = self
            .list_records_paged(|r| {
                let named = names.subnet_of(&r.key);
                claims.add(r, named)
            })
            .await?;
        Ok((claims, Position(at)))
    }

    pub async fn begin_claim(&self, public_ip: Ipv4Addr) -> Claim {
        let listing = retry("list leases", || self.claims(public_ip)).await;
        Claim {
            public_ip,
            previous: listing.0.mine.first().cloned(),
            read: ClaimRead::Etcd(Some(listing)),
        }
    }

    pub async fn claim(
        &self,
        mut claim: Claim,
        req: &LeaseRequest<'_>,
        progress: &mut dyn FnMut(Claiming<'_>),
    ) -> Lease {
        let (me, config) = (claim.public_ip, req.config);
        // Begun by another store (never): listed afresh.
        let mut listing = match std::mem::replace(&mut claim.read, ClaimRead::Etcd(None)) {
            ClaimRead::Etcd(l) => l,
            ClaimRead::Kube(_) => None,
        };
        let mut misfits_logged = HashSet::new();
        let mut backoff = Backoff::new("lease a subnet");
        loop {
            let (claims, at) = match listing.take() {
                Some(c) => c,
                None => retry("list leases", || self.claims(me)).await,
            };
            progress(Claiming::Unreadable(&claims.bad));
            for l in policy::misfits(config, &claims.mine, me) {
                if misfits_logged.insert((l.subnet, l.ipv6_subnet)) {
                    let until = if l.is_reservation() {
                        "an operator removes it"
                    } else {
                        "it expires"
                    };
                    warn!(subnet = %l.subnet, ipv6_subnet = ?l.ipv6_subnet.map(|n| n.to_string()),
                          public_ip = %me,
                          "not reusing this host's earlier lease: the network config wants {}; it stays taken until {until}",
                          config.wanted());
                }
            }
            let choice = policy::choose(config, &claims.mine, &claims.others, me, req.hint, |n| {
                fastrand::u128(0..n)
            });
            let taken = match choice {
                Ok(Choice::Ours(old)) => self.take_over(&old, req.attrs, req.ttl).await,
                Ok(Choice::Rekey(old, ipv6)) => {
                    info!(subnet = %old.subnet, from = ?old.ipv6_subnet.map(|n| n.to_string()),
                          to = ?ipv6.map(|n| n.to_string()),
                          "keeping this host's subnet under a new key: the network's IPv6 side changed");
                    self.rekey(&old, ipv6, req.attrs, req.ttl).await
                }
                Ok(Choice::Free(subnet, ipv6)) => {
                    self.create(subnet, ipv6, req.attrs, req.ttl).await
                }
                Err(full) => {
                    progress(Claiming::Waiting(&format!(
                        "{full}; waiting for a lease to expire"
                    )));
                    self.wait_for(at, Awaited::LeaseDeleted).await;
                    continue;
                }
            };
            match taken {
                Ok(Some(lease)) => return lease,
                Ok(None) => info!("lost a race for a subnet to another host; trying another"),
                Err(e) => backoff.failed(&format!("{e:#}")).await,
            }
        }
    }
}
