//! flannel's `-ip-masq` and forward rules, byte for byte: nat chain `FLANNEL-POSTRTG` jumped to from
//! `POSTROUTING`, filter chain `FLANNEL-FWD` jumped to from `FORWARD`, each rule commented
//! `flanneld masq` / `flanneld forward`.
//!
//! Why iptables-restore and not nftables: a node switching from flanneld to weft (or back) must
//! end up with one set of rules, not two. Using flannel's tables, chain names and jump rules means
//! each agent rewrites the other's chains in place. The chains are declared in an
//! `iptables-restore --noflush` batch, which flushes and refills them in one transaction, so rules
//! for an old network or subnet disappear and there is never a moment without masquerading. Other
//! chains are never touched, except for adding (or de-duplicating) the single jump rule.
//!
//! `sync` first reads the rules back (`iptables-save`) and writes only when they differ, so
//! running it every `-iptables-resync` seconds costs one read and keeps rule counters intact.
//! The commands run in the caller's network namespace (no blocking-pool threads are involved).

use std::process::Stdio;
use std::time::Duration;

use ipnet::Ipv4Net;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;
use tracing::{debug, info};

use crate::Error;

/// kube-proxy's masquerade mark: traffic it marked is left to its own MASQUERADE rule.
const KUBE_PROXY_MARK: &str = "0x4000/0x4000";

/// How long an iptables command may take before it is abandoned (the xtables lock is waited on
/// for part of it).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// The rules one host needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Firewall {
    /// The cluster network (`Network` of the config).
    pub network: Ipv4Net,
    /// This host's lease.
    pub subnet: Ipv4Net,
    /// `-ip-masq`: masquerade traffic leaving the cluster network.
    pub masquerade: bool,
    /// `-iptables-forward-rules`: accept forwarding to and from the cluster network.
    pub forward: bool,
    /// Use `--random-fully` on MASQUERADE (false with `-ip-masq-fully-random-disable`).
    pub fully_random: bool,
}

/// One flannel chain and the rule jumping to it.
struct Chain {
    table: &'static str,
    name: &'static str,
    parent: &'static str,
    comment: &'static str,
    /// Rule bodies, in `iptables-save` form without the leading `-A <chain> `.
    rules: Vec<String>,
}

impl Chain {
    fn jump(&self) -> String {
        format!("-m comment --comment \"{}\" -j {}", self.comment, self.name)
    }

    /// The restore commands bringing `saved` (this table's `iptables-save` output) to this chain's
    /// rules, or `None` when it already is.
    fn plan(&self, saved: &str) -> Option<String> {
        let declared = saved
            .lines()
            .any(|l| l.strip_prefix(':').and_then(|l| l.split(' ').next()) == Some(self.name));
        let prefix = format!("-A {} ", self.name);
        let have: Vec<&str> = saved
            .lines()
            .filter_map(|l| l.strip_prefix(&prefix))
            .collect();
        let jump = format!("-A {} {}", self.parent, self.jump());
        let jumps = saved.lines().filter(|l| *l == jump).count();
        if declared && jumps == 1 && have == self.rules {
            return None;
        }
        debug!(chain = self.name, ?have, want = ?self.rules, jumps, "iptables differ");
        let mut out = format!("*{}\n:{} - [0:0]\n", self.table, self.name);
        for r in &self.rules {
            out.push_str(&format!("{prefix}{r}\n"));
        }
        if jumps == 0 {
            out.push_str(&jump);
            out.push('\n');
        }
        for _ in 1..jumps {
            out.push_str(&format!("-D {} {}\n", self.parent, self.jump()));
        }
        out.push_str("COMMIT\n");
        Some(out)
    }
}

impl Firewall {
    /// Makes the rules exactly flannel's for this network and subnet, restoring them if they
    /// were removed and replacing those of an old network/subnet. Returns whether anything was
    /// written.
    pub async fn sync(&self) -> Result<bool, Error> {
        let mut batch = String::new();
        for chain in self.chains() {
            let saved = run("iptables-save", &["-t", chain.table], None).await?;
            if let Some(p) = chain.plan(&saved) {
                batch.push_str(&p);
            }
        }
        if batch.is_empty() {
            return Ok(false);
        }
        run("iptables-restore", &["--noflush", "--wait=5"], Some(&batch)).await?;
        info!(network = %self.network, subnet = %self.subnet, "iptables rules written");
        Ok(true)
    }

    fn chains(&self) -> Vec<Chain> {
        let mut v = Vec::new();
        if self.masquerade {
            v.push(self.masq_chain());
        }
        if self.forward {
            v.push(self.forward_chain());
        }
        v
    }

    fn masq_chain(&self) -> Chain {
        let (net, sub) = (self.network, self.subnet);
        let c = "-m comment --comment \"flanneld masq\"";
        let masq = if self.fully_random {
            "-j MASQUERADE --random-fully"
        } else {
            "-j MASQUERADE"
        };
        Chain {
            table: "nat",
            name: "FLANNEL-POSTRTG",
            parent: "POSTROUTING",
            comment: "flanneld masq",
            rules: vec![
                format!("-m mark --mark {KUBE_PROXY_MARK} {c} -j RETURN"),
                format!("-s {sub} -d {net} {c} -j RETURN"),
                format!("-s {net} -d {sub} {c} -j RETURN"),
                format!("! -s {net} -d {sub} {c} -j RETURN"),
                format!("-s {net} ! -d 224.0.0.0/4 {c} {masq}"),
                format!("! -s {net} -d {net} {c} {masq}"),
            ],
        }
    }

    fn forward_chain(&self) -> Chain {
        let net = self.network;
        let c = "-m comment --comment \"flanneld forward\"";
        Chain {
            table: "filter",
            name: "FLANNEL-FWD",
            parent: "FORWARD",
            comment: "flanneld forward",
            rules: vec![
                format!("-s {net} {c} -j ACCEPT"),
                format!("-d {net} {c} -j ACCEPT"),
            ],
        }
    }
}

/// Runs `prog args`, feeding `stdin`, and returns its stdout; fails with its stderr.
async fn run(prog: &str, args: &[&str], stdin: Option<&str>) -> Result<String, Error> {
    let context = format!("{prog} {}", args.join(" "));
    let mut child = Command::new(prog)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(Error::io(context.clone()))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .await
            .map_err(Error::io(context.clone()))?;
        // Dropping the pipe closes it: the program sees end of input.
    }
    let out = tokio::time::timeout(COMMAND_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| Error::Firewall {
            context: context.clone(),
            reason: format!("no answer within {COMMAND_TIMEOUT:?}"),
        })?
        .map_err(Error::io(context.clone()))?;
    if !out.status.success() {
        return Err(Error::Firewall {
            context,
            reason: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fw() -> Firewall {
        Firewall {
            network: "10.244.0.0/16".parse().expect("net"),
            subnet: "10.244.1.0/24".parse().expect("subnet"),
            masquerade: true,
            forward: true,
            fully_random: true,
        }
    }

    #[test]
    fn writes_flannels_rules_into_an_empty_table() {
        let plan = fw()
            .masq_chain()
            .plan("*nat\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n");
        let want = "*nat\n:FLANNEL-POSTRTG - [0:0]\n\
-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment \"flanneld masq\" -j RETURN\n\
-A FLANNEL-POSTRTG -s 10.244.1.0/24 -d 10.244.0.0/16 -m comment --comment \"flanneld masq\" -j RETURN\n\
-A FLANNEL-POSTRTG -s 10.244.0.0/16 -d 10.244.1.0/24 -m comment --comment \"flanneld masq\" -j RETURN\n\
-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.1.0/24 -m comment --comment \"flanneld masq\" -j RETURN\n\
-A FLANNEL-POSTRTG -s 10.244.0.0/16 ! -d 224.0.0.0/4 -m comment --comment \"flanneld masq\" -j MASQUERADE --random-fully\n\
-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.0.0/16 -m comment --comment \"flanneld masq\" -j MASQUERADE --random-fully\n\
-A POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG\n\
COMMIT\n";
        assert_eq!(plan.as_deref(), Some(want));
    }

    #[test]
    fn nothing_to_do_when_rules_match_and_duplicate_jumps_are_removed() {
        let chain = fw().forward_chain();
        let mut saved = String::from("*filter\n:FORWARD ACCEPT [0:0]\n:FLANNEL-FWD - [0:0]\n");
        saved.push_str("-A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD\n");
        for r in &chain.rules {
            saved.push_str(&format!("-A FLANNEL-FWD {r}\n"));
        }
        assert_eq!(chain.plan(&saved), None);
        saved.push_str("-A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD\n");
        let plan = chain.plan(&saved).expect("duplicate jump");
        assert!(
            plan.contains("-D FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD\n")
        );
        assert!(!plan.contains("-A FORWARD"));
    }
}
