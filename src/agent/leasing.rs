//! This host's lease: taken (its own earlier lease first, then the previous run's subnet, then
//! any free one), published (backend, subnet.env, daemon.json, readiness), renewed, taken again
//! when lost, and given back when the network changes.

use std::time::Duration;

use anyhow::{Context, Result};
use tracing::{debug, error, info, warn};
use weft_backends::Backend;

use super::peer_sync::warn_bad;
use super::{Agent, State};
use crate::config::NetworkConfig;
use crate::lease::{Lease, LeaseAttrs};
use crate::policy::Hint;
use crate::registry::{Claiming, LeaseRequest, Renewal};
use crate::retry::Backoff;
use crate::subnet_env::SubnetEnv;
use crate::{daemon_json, notify};

impl Agent {
    /// Leases a subnet for this host (see [`Registry::claim`]), with its backend prepared for
    /// it first: the backend keeps what it can of the lease this host held before.
    pub(super) async fn acquire(
        &mut self,
        config: &NetworkConfig,
        backend: &mut Backend,
        hint: Hint,
    ) -> Result<Lease> {
        let me = self.external.public_ip;
        let claim = self.registry.begin_claim(me).await;
        let previous = claim.previous().map(Lease::to_backend);
        let backend_data = backend
            .prepare(previous.as_ref())
            .await
            .context("prepare the backend")?;
        // PublicIPv6 only on a dual-stack network, as flanneld (it publishes null otherwise).
        let public_ipv6 = config.ipv6.and(self.external.public_ipv6);
        if config.ipv6.is_some() && public_ipv6.is_none() {
            warn!(iface = %self.external.name,
                  "the network is dual-stack but this host has no global IPv6 address on its interface and no -public-ipv6: peers cannot reach its IPv6 subnet");
        }
        let attrs = LeaseAttrs {
            public_ip: me,
            public_ipv6,
            backend_type: backend.type_name().to_string(),
            backend_data,
            backend_v6_data: config.ipv6.and(backend.backend_v6_data()),
        };
        let ttl = self.args.subnet_lease_ttl;
        let req = LeaseRequest {
            config,
            attrs: &attrs,
            ttl,
            hint,
        };
        let (rejections, ready) = (&mut self.rejections, &self.ready);
        let mut said = String::new();
        let lease = self
            .registry
            .claim(claim, &req, &mut |p| match p {
                Claiming::Unreadable(bad) => warn_bad(rejections, bad),
                Claiming::Waiting(why) => {
                    ready.set(false);
                    ready.set_waiting(Some(why.to_string()));
                    if said != why {
                        error!("{why}");
                        notify::status(why);
                        said = why.to_string();
                    }
                }
            })
            .await;
        self.ready.set_waiting(None);
        let kind = match (&self.registry, lease.is_reservation()) {
            (crate::registry::Registry::Kube(_), _) => "node's podCIDR",
            (_, true) => "reservation",
            (_, false) => "lease",
        };
        match lease.ipv6_subnet {
            Some(v6) => info!(subnet = %lease.subnet, ipv6_subnet = %v6, public_ip = %me,
                              public_ipv6 = ?lease.attrs.public_ipv6.map(|a| a.to_string()),
                              "acquired {kind}"),
            None => info!(subnet = %lease.subnet, public_ip = %me, "acquired {kind}"),
        }
        let networks = (config.network, config.ipv6.map(|p| p.network));
        crate::metrics::get().leased(networks, &lease, backend.type_name(), ttl);
        Ok(lease)
    }

    /// Applies the own lease: backend configuration, subnet.env, daemon.json, readiness.
    pub(super) async fn publish(&mut self, state: &mut State, previous: Hint) -> Result<()> {
        let (previous, previous6) = (previous.subnet, previous.ipv6_subnet);
        let own = state.own.to_backend();
        state
            .backend
            .configure(&own)
            .await
            .with_context(|| format!("configure the backend for {}", own.subnet))?;
        let env = SubnetEnv {
            network: state.config.network,
            subnet: state.own.subnet,
            ipv6: (state.config.ipv6.map(|p| p.network)).zip(state.own.ipv6_subnet),
            mtu: state.backend.mtu(),
            ip_masq: self.args.ip_masq,
        };
        env.write(&self.args.subnet_file)
            .with_context(|| format!("write {}", self.args.subnet_file.display()))?;
        // Never fails: a daemon.json weftd cannot merge is reported (log, /readyz) and retried,
        // and must not cost the lease or the data path.
        if let Some(path) = self.args.daemon_json() {
            let net = daemon_json::DockerNet {
                bip: env.gateway(),
                mtu: env.mtu,
                ipv6: env.ipv6.map(|(_, subnet)| subnet),
            };
            daemon_json::publish(path, &net, &self.ready);
        }
        if let Some(old) = previous.filter(|p| *p != state.own.subnet) {
            warn!(old = %old, new = %state.own.subnet,
                  "this host's subnet changed: restart Docker (and pods) to pick up the new bip");
        }
        match (previous6, state.own.ipv6_subnet) {
            (Some(old), Some(new)) if old != new => {
                warn!(old = %old, new = %new,
                      "this host's IPv6 subnet changed: restart Docker (and pods) to pick up the new fixed-cidr-v6");
            }
            (Some(old), None) => {
                info!(old = %old, "this host leases no IPv6 subnet any more: the network is IPv4 only");
            }
            _ => {}
        }
        // Kubernetes: the Node's NetworkUnavailable condition cleared. Not fatal: the data path
        // works either way, and the next publish tries again.
        if let Err(e) = self.registry.data_plane_up().await {
            warn!("{e:#}");
        }
        self.ready.set(true);
        let status = format!("leased {} on {}", state.own.subnet, state.config.network);
        if !self.notified {
            notify::ready(&status);
            self.notified = true;
        } else {
            notify::status(&status);
        }
        Ok(())
    }

    /// The network config changed: what this host held under the old one goes, so that nothing
    /// of it lingers beside the new one (flanneld leaves it all behind): the lease (revoked, not
    /// left to expire; a reservation is the operator's and stays), the data plane's routes and
    /// device (`flannel.<VNI>`, `flannel0`), and the old network's firewall rules. Failures are
    /// logged; the new network is set up either way.
    pub(super) async fn leave_network(&mut self, state: State) {
        let old_rules = self.firewall(&state);
        let State {
            backend,
            own,
            config,
            ..
        } = state;
        info!(subnet = %own.subnet, network = %config.network, backend = backend.type_name(),
              "leaving the old network: lease, data plane and firewall rules");
        self.registry.release(&own).await;
        if let Err(e) = backend.remove().await {
            warn!("remove the old data plane: {e}");
        }
        if self.args.ip_masq || self.args.iptables_forward_rules {
            if let Err(e) = old_rules.remove().await {
                warn!("remove the old network's firewall rules: {e}");
            }
        }
    }

    /// The network config changed in its IPv6 side alone (turned on, off, or onto another IPv6
    /// network): the lease stays, and the next acquire moves it to its new key in one
    /// transaction, keeping the IPv4 subnet; the data plane stays too, as across a restart, but
    /// for what only the old IPv6 side had (its device, its routes, its ip6tables rules). IPv4
    /// traffic never stops. Should the new backend not build, the old network is left whole.
    pub(super) async fn change_ipv6(&mut self, state: State, next: &NetworkConfig) {
        let next_backend = match Backend::new(&next.backend, self.network(next)) {
            Ok(b) => b,
            Err(_) => return self.leave_network(state).await,
        };
        let old_rules = self.firewall(&state);
        let old6 = state.config.ipv6.map(|p| p.network);
        let gone6 = old6.filter(|n| next.ipv6.map(|p| p.network) != Some(*n));
        info!(subnet = %state.own.subnet, ipv6_before = ?old6.map(|n| n.to_string()),
              ipv6_now = ?next.ipv6.map(|p| p.network.to_string()),
              "only the IPv6 side of the network changed: keeping the IPv4 lease and data plane");
        for e in state.backend.hand_over(&next_backend, gone6).await.0 {
            warn!("take down the old IPv6 side: {e}");
        }
        if gone6.is_some() && (self.args.ip_masq || self.args.iptables_forward_rules) {
            if let Err(e) = old_rules.remove_ipv6().await {
                warn!("remove the old IPv6 network's ip6tables rules: {e}");
            }
        }
    }

    /// Re-leases after our key vanished (expiry, an operator's delete): the same subnet if free.
    pub(super) async fn reacquire(&mut self, state: &mut State) -> Result<()> {
        crate::metrics::get().lease_lost();
        self.republish(state).await
    }

    /// Leases again with the backend's data as it is now: the same subnet if free (as it is
    /// when this host still holds it), its record rewritten.
    pub(super) async fn republish(&mut self, state: &mut State) -> Result<()> {
        loop {
            let previous = state.own.subnet;
            let hint = Hint {
                subnet: Some(previous),
                ipv6_subnet: state.own.ipv6_subnet,
            };
            state.own = self
                .acquire(&state.config, &mut state.backend, hint)
                .await?;
            state.published = state.own.attrs.clone();
            self.publish(state, hint).await?;
            if self.resync(state).await {
                return Ok(());
            }
        }
    }

    /// Renews this host's lease; when it is gone, leases again. Returns when to renew next.
    pub(super) async fn renew(
        &mut self,
        state: &mut State,
        backoff: &mut Backoff<'_>,
        every: Duration,
    ) -> Result<Duration> {
        let subnet = state.own.subnet;
        Ok(match self.registry.renew(&state.own).await {
            Ok(Renewal::Renewed) => {
                crate::metrics::get().renewed(self.args.subnet_lease_ttl);
                if backoff.succeeded() {
                    info!(%subnet, "lease renewed again");
                } else {
                    debug!(%subnet, "lease renewed");
                }
                every
            }
            // Its record went with it: the subnet may still be free, or taken.
            Ok(Renewal::Expired) => {
                crate::metrics::get().renewal_failed();
                backoff.succeeded();
                warn!(%subnet, "lease expired; leasing again");
                self.reacquire(state).await?;
                state.watch.restart();
                every
            }
            Err(e) => {
                crate::metrics::get().renewal_failed();
                backoff.delay_after(&format!("{subnet}: {e:#}")).min(every)
            }
        })
    }
}
