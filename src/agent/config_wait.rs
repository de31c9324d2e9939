//! Waiting for a network config this host can run: from the store, or from a file.

use std::time::Duration;

use tokio::time::sleep;
use tracing::error;

use super::Agent;
use crate::config::{InvalidConfig, NetworkConfig};
use crate::escape::Escaped;
use crate::notify;
use crate::registry::Awaited;
use crate::retry::retry;

impl Agent {
    /// Reads the network config from the store until it holds one this host can run, watching
    /// it between tries. Everything that would stop the backend from being built is checked here
    /// (the backend options too, against this host's underlay), so a bad config is logged once
    /// and waited on, never retried in a loop.
    pub(super) async fn wait_for_config(&mut self) -> NetworkConfig {
        if let Some(path) = self.args.net_config_path.clone() {
            return self.wait_for_config_file(&path).await;
        }
        let key = self.registry.names().config();
        let mut last = String::new();
        loop {
            let (text, at) = retry("read the network config", || self.registry.get_config()).await;
            let checked = text.as_deref().map(|t| {
                let c = NetworkConfig::parse_at(t, &key)?;
                c.check_on_host(self.external.mtu)
                    .map_err(|error| InvalidConfig {
                        at: key.clone(),
                        error,
                    })?;
                Ok::<_, InvalidConfig>(c)
            });
            let problem = match checked {
                Some(Ok(c)) => return c,
                Some(Err(e)) => e.to_string(),
                None => format!("no network config at {key}; waiting for one"),
            };
            if problem != last {
                error!("{}", Escaped(&problem));
                notify::status(&problem);
                last = problem;
            }
            self.registry.wait_for(at, Awaited::Config).await;
        }
    }

    /// -net-config-path: the config comes from a file (as kube-flannel's net-conf.json does), read
    /// until it holds a valid one; the problem is logged once per distinct problem, and the file
    /// looked at again every few seconds (it may be a ConfigMap being mounted).
    pub(super) async fn wait_for_config_file(&self, path: &std::path::Path) -> NetworkConfig {
        let at = path.display().to_string();
        let mut last = String::new();
        loop {
            let problem = match crate::fsutil::read_optional(path) {
                Ok(Some(text)) => match NetworkConfig::parse_at(&text, &at).and_then(|c| {
                    c.check_on_host(self.external.mtu)
                        .map_err(|error| InvalidConfig {
                            at: at.clone(),
                            error,
                        })?;
                    Ok(c)
                }) {
                    Ok(c) => return c,
                    Err(e) => e.to_string(),
                },
                Ok(None) => format!("no network config file {at}; waiting for one"),
                Err(e) => format!("read the network config file {at}: {e:#}"),
            };
            if problem != last {
                error!("{}", Escaped(&problem));
                notify::status(&problem);
                last = problem;
            }
            let _ = notify::bounded(Duration::from_secs(10), sleep(Duration::from_secs(5))).await;
        }
    }
}
