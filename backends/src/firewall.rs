//! flannel's `-ip-masq` and forward rules, byte for byte: nat chain `FLANNEL-POSTRTG` jumped to from
//! `POSTROUTING`, filter chain `FLANNEL-FWD` jumped to from `FORWARD`, each rule commented
//! `flanneld masq` / `flanneld forward`; on a dual-stack network the same chains in ip6tables for
//! the IPv6 network (multicast there is ff00::/8).
//!
//! Why iptables-restore and not nftables: a node switching from flanneld to weft (or back) must
//! end up with one set of rules, not two. Using flannel's tables, chain names and jump rules means
//! each agent rewrites the other's rules in place.
//!
//! Which rules are this instance's. The chain names and comments are flannel's and so the same for
//! every agent on the host, including a second weftd or flanneld serving another network (its own
//! etcd prefix). A rule in a flannel chain belongs to this instance when it matches on this
//! instance's network (`-s <network>` or `-d <network>`, negated or not): every masquerade and
//! forward rule does, rules of an old subnet of the same network included, and networks of two
//! instances on one host are disjoint. The kube-proxy mark rule, which names no network, and the
//! jump rules are shared: kept first in the chain and exactly once, never deleted. Other rules in
//! the chains, and all other chains, are left alone.
//!
//! `sync` reads the rules back (`iptables-save`) and writes only when this instance's differ, so
//! running it every `-iptables-resync` seconds costs one read and keeps rule counters intact.
//! The write is one `iptables-restore --noflush` batch: it deletes this instance's rules and
//! appends the wanted ones in one transaction, so there is never a moment without masquerading,
//! and it touches no other instance's rule. (Declaring an existing chain in such a batch would
//! flush it, so an existing chain is not declared.) The commands run in the caller's network
//! namespace (no blocking-pool threads are involved).

use std::process::Stdio;
use std::time::Duration;

use ipnet::{Ipv4Net, Ipv6Net};
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
    /// The IPv6 network and this host's IPv6 lease, on a dual-stack network: ip6tables rules too.
    pub ipv6: Option<(Ipv6Net, Ipv6Net)>,
    /// `-ip-masq`: masquerade traffic leaving the cluster network.
    pub masquerade: bool,
    /// `-iptables-forward-rules`: accept forwarding to and from the cluster network.
    pub forward: bool,
    /// Use `--random-fully` on MASQUERADE (false with `-ip-masq-fully-random-disable`).
    pub fully_random: bool,
}

/// One flannel chain and the rule jumping to it.
struct Chain {
    /// ip6tables rather than iptables.
    v6: bool,
    table: &'static str,
    name: &'static str,
    parent: &'static str,
    comment: &'static str,
    /// `-s <network>` / `-d <network>`: what this instance's rules match on.
    network: String,
    /// Rules every instance wants at the top of the chain (they name no network), in
    /// `iptables-save` form without the leading `-A <chain> `.
    shared: Vec<String>,
    /// This instance's rules, in order, same form.
    owned: Vec<String>,
}

impl Chain {
    fn jump(&self) -> String {
        format!("-m comment --comment \"{}\" -j {}", self.comment, self.name)
    }

    /// Whether rule body `rule` (no `-A <chain>`) belongs to this instance: it matches on its
    /// network as source or destination.
    fn is_owned(&self, rule: &str) -> bool {
        let words: Vec<&str> = rule.split_whitespace().collect();
        words
            .windows(2)
            .any(|w| (w[0] == "-s" || w[0] == "-d") && w[1] == self.network)
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
        let mine: Vec<&str> = have.iter().copied().filter(|r| self.is_owned(r)).collect();
        let shared_first =
            have.len() >= self.shared.len() && have.iter().zip(&self.shared).all(|(h, s)| h == s);
        let jump = format!("-A {} {}", self.parent, self.jump());
        let jumps = saved.lines().filter(|l| *l == jump).count();
        if declared && jumps == 1 && shared_first && mine == self.owned {
            return None;
        }
        debug!(chain = self.name, ?mine, want = ?self.owned, shared_first, jumps, "iptables differ");
        let mut out = format!("*{}\n", self.table);
        if declared {
            for r in &mine {
                out.push_str(&format!("-D {} {r}\n", self.name));
            }
            if !shared_first {
                for r in self.shared.iter().rev() {
                    out.push_str(&format!("-I {} 1 {r}\n", self.name));
                }
            }
        } else {
            out.push_str(&format!(":{} - [0:0]\n", self.name));
            for r in &self.shared {
                out.push_str(&format!("{prefix}{r}\n"));
            }
        }
        for r in &self.owned {
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

    /// The restore commands deleting this instance's rules from `saved`, if it has any.
    fn plan_removal(&self, saved: &str) -> Option<String> {
        let prefix = format!("-A {} ", self.name);
        let mut out = format!("*{}\n", self.table);
        let mut any = false;
        for r in saved
            .lines()
            .filter_map(|l| l.strip_prefix(&prefix))
            .filter(|r| self.is_owned(r))
        {
            out.push_str(&format!("-D {} {r}\n", self.name));
            any = true;
        }
        out.push_str("COMMIT\n");
        any.then_some(out)
    }
}

impl Firewall {
    /// Makes this network's rules exactly flannel's for this network and subnet, restoring them
    /// if they were removed and replacing those of an old subnet; rules of other networks stay.
    /// Returns whether anything was written.
    pub async fn sync(&self) -> Result<bool, Error> {
        let written = apply(&self.chains(), Chain::plan).await?;
        if written {
            info!(network = %self.network, subnet = %self.subnet, "iptables rules written");
        }
        Ok(written)
    }

    /// Deletes this network's rules from both chains (whatever `masquerade` and `forward` say),
    /// leaving the chains, their jumps and the shared kube-proxy rule to other agents: for when
    /// this instance's network is replaced by another. Returns whether anything was deleted.
    pub async fn remove(&self) -> Result<bool, Error> {
        let mut chains = vec![self.masq_chain(false), self.forward_chain(false)];
        if self.ipv6.is_some() {
            chains.extend([self.masq_chain(true), self.forward_chain(true)]);
        }
        let removed = apply(&chains, Chain::plan_removal).await?;
        if removed {
            info!(network = %self.network, "iptables rules of the network removed");
        }
        Ok(removed)
    }

    /// Deletes this network's IPv6 rules alone (ip6tables'), for when its IPv6 side is turned
    /// off or moves to another network while IPv4's stay. Returns whether anything was deleted.
    pub async fn remove_ipv6(&self) -> Result<bool, Error> {
        let Some((network6, _)) = self.ipv6 else {
            return Ok(false);
        };
        let chains = [self.masq_chain(true), self.forward_chain(true)];
        let removed = apply(&chains, Chain::plan_removal).await?;
        if removed {
            info!(network = %network6, "ip6tables rules of the IPv6 network removed");
        }
        Ok(removed)
    }

    fn chains(&self) -> Vec<Chain> {
        let mut v = Vec::new();
        for v6 in [false, true]
            .into_iter()
            .filter(|v6| !v6 || self.ipv6.is_some())
        {
            if self.masquerade {
                v.push(self.masq_chain(v6));
            }
            if self.forward {
                v.push(self.forward_chain(v6));
            }
        }
        v
    }

    /// The network and subnet of one family, as rules name them (`ip6tables-save` prints IPv6
    /// networks as Rust does: compressed, lower case).
    fn nets(&self, v6: bool) -> (String, String) {
        match self.ipv6.filter(|_| v6) {
            Some((net, sub)) => (net.to_string(), sub.to_string()),
            None => (self.network.to_string(), self.subnet.to_string()),
        }
    }

    fn masq_chain(&self, v6: bool) -> Chain {
        let (net, sub) = self.nets(v6);
        let multicast = if v6 { "ff00::/8" } else { "224.0.0.0/4" };
        let c = "-m comment --comment \"flanneld masq\"";
        let masq = if self.fully_random {
            "-j MASQUERADE --random-fully"
        } else {
            "-j MASQUERADE"
        };
        Chain {
            v6,
            table: "nat",
            name: "FLANNEL-POSTRTG",
            parent: "POSTROUTING",
            comment: "flanneld masq",
            network: net.clone(),
            shared: vec![format!("-m mark --mark {KUBE_PROXY_MARK} {c} -j RETURN")],
            owned: vec![
                format!("-s {sub} -d {net} {c} -j RETURN"),
                format!("-s {net} -d {sub} {c} -j RETURN"),
                format!("! -s {net} -d {sub} {c} -j RETURN"),
                format!("-s {net} ! -d {multicast} {c} {masq}"),
                format!("! -s {net} -d {net} {c} {masq}"),
            ],
        }
    }

    fn forward_chain(&self, v6: bool) -> Chain {
        let (net, _) = self.nets(v6);
        let c = "-m comment --comment \"flanneld forward\"";
        Chain {
            v6,
            table: "filter",
            name: "FLANNEL-FWD",
            parent: "FORWARD",
            comment: "flanneld forward",
            network: net.clone(),
            shared: Vec::new(),
            owned: vec![
                format!("-s {net} {c} -j ACCEPT"),
                format!("-d {net} {c} -j ACCEPT"),
            ],
        }
    }
}

/// Whether this host's iptables takes `--random-fully` on MASQUERADE (iptables 1.6.2+; flanneld
/// asks go-iptables, which compares version numbers): a MASQUERADE rule with it, in a chain that
/// is never committed, is parsed with `iptables-restore --test`. Anything but a clean parse means
/// no: masquerading without the flag still works, with a rule iptables does not refuse.
pub async fn supports_random_fully() -> bool {
    probe_random_fully("iptables-restore").await
}

async fn probe_random_fully(prog: &str) -> bool {
    let batch = "*nat\n:WEFT-PROBE - [0:0]\n-A WEFT-PROBE -j MASQUERADE --random-fully\nCOMMIT\n";
    match run(prog, &["--test", "--noflush", "--wait=5"], Some(batch)).await {
        Ok(_) => true,
        Err(e) => {
            debug!(error = %e, "iptables-restore refused --random-fully");
            false
        }
    }
}

/// Reads each chain's table, and writes what `plan` says in one batch. Whether anything was written.
/// One batch per family (iptables, ip6tables).
async fn apply(chains: &[Chain], plan: fn(&Chain, &str) -> Option<String>) -> Result<bool, Error> {
    let mut written = false;
    for (v6, save, restore) in [
        (false, "iptables-save", "iptables-restore"),
        (true, "ip6tables-save", "ip6tables-restore"),
    ] {
        let mut batch = String::new();
        for chain in chains.iter().filter(|c| c.v6 == v6) {
            let saved = run(save, &["-t", chain.table], None).await?;
            if let Some(p) = plan(chain, &saved) {
                batch.push_str(&p);
            }
        }
        if !batch.is_empty() {
            run(restore, &["--noflush", "--wait=5"], Some(&batch)).await?;
            written = true;
        }
    }
    Ok(written)
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

    /// A stand-in iptables-restore that takes any batch without --random-fully, as a pre-1.6.2
    /// iptables would.
    fn old_iptables(dir: &std::path::Path) -> String {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join("iptables-restore");
        std::fs::write(
            &p,
            "#!/bin/sh\nif grep -q -- --random-fully; then echo 'unknown option \"--random-fully\"' >&2; exit 2; fi\n",
        )
        .expect("write");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        p.to_string_lossy().into_owned()
    }

    #[tokio::test]
    async fn random_fully_is_used_only_where_iptables_takes_it() {
        let dir = std::env::temp_dir().join(format!("weft-probe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let refused = probe_random_fully(&old_iptables(&dir)).await;
        let _ = std::fs::remove_dir_all(&dir);
        assert!(!refused);
        assert!(!probe_random_fully("/nonexistent/iptables-restore").await);
    }

    fn fw() -> Firewall {
        Firewall {
            network: "10.244.0.0/16".parse().expect("net"),
            subnet: "10.244.1.0/24".parse().expect("subnet"),
            ipv6: None,
            masquerade: true,
            forward: true,
            fully_random: true,
        }
    }

    #[test]
    fn writes_flannels_rules_into_an_empty_table() {
        let plan = fw()
            .masq_chain(false)
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
    fn a_dual_stack_host_writes_the_same_rules_in_ip6tables_for_the_ipv6_network() {
        let dual = Firewall {
            ipv6: Some((
                "fd00:244::/48".parse().expect("net"),
                "fd00:244:0:1::/64".parse().expect("subnet"),
            )),
            ..fw()
        };
        let chains = dual.chains();
        assert_eq!(
            chains.iter().map(|c| (c.v6, c.name)).collect::<Vec<_>>(),
            [
                (false, "FLANNEL-POSTRTG"),
                (false, "FLANNEL-FWD"),
                (true, "FLANNEL-POSTRTG"),
                (true, "FLANNEL-FWD")
            ]
        );
        let plan = dual
            .masq_chain(true)
            .plan("*nat\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n");
        let want = "*nat\n:FLANNEL-POSTRTG - [0:0]\n\
-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment \"flanneld masq\" -j RETURN\n\
-A FLANNEL-POSTRTG -s fd00:244:0:1::/64 -d fd00:244::/48 -m comment --comment \"flanneld masq\" -j RETURN\n\
-A FLANNEL-POSTRTG -s fd00:244::/48 -d fd00:244:0:1::/64 -m comment --comment \"flanneld masq\" -j RETURN\n\
-A FLANNEL-POSTRTG ! -s fd00:244::/48 -d fd00:244:0:1::/64 -m comment --comment \"flanneld masq\" -j RETURN\n\
-A FLANNEL-POSTRTG -s fd00:244::/48 ! -d ff00::/8 -m comment --comment \"flanneld masq\" -j MASQUERADE --random-fully\n\
-A FLANNEL-POSTRTG ! -s fd00:244::/48 -d fd00:244::/48 -m comment --comment \"flanneld masq\" -j MASQUERADE --random-fully\n\
-A POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG\n\
COMMIT\n";
        assert_eq!(plan.as_deref(), Some(want));
        let fwd = dual.forward_chain(true);
        assert_eq!(
            fwd.owned,
            [
                "-s fd00:244::/48 -m comment --comment \"flanneld forward\" -j ACCEPT",
                "-d fd00:244::/48 -m comment --comment \"flanneld forward\" -j ACCEPT"
            ]
        );
        assert_eq!(
            fw().chains().iter().filter(|c| c.v6).count(),
            0,
            "IPv4 only"
        );
    }

    #[test]
    fn nothing_to_do_when_rules_match_and_duplicate_jumps_are_removed() {
        let chain = fw().forward_chain(false);
        let mut saved = String::from("*filter\n:FORWARD ACCEPT [0:0]\n:FLANNEL-FWD - [0:0]\n");
        saved.push_str("-A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD\n");
        for r in &chain.owned {
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

    /// `iptables-save -t nat` with both chains' rules of `fws`, in that order.
    fn saved_nat(fws: &[Firewall]) -> String {
        let mut saved = String::from("*nat\n:POSTROUTING ACCEPT [0:0]\n:FLANNEL-POSTRTG - [0:0]\n");
        saved
            .push_str("-A POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG\n");
        let shared = &fws[0].masq_chain(false).shared;
        for r in shared {
            saved.push_str(&format!("-A FLANNEL-POSTRTG {r}\n"));
        }
        for fw in fws {
            for r in &fw.masq_chain(false).owned {
                saved.push_str(&format!("-A FLANNEL-POSTRTG {r}\n"));
            }
        }
        saved.push_str("COMMIT\n");
        saved
    }

    fn other_network() -> Firewall {
        Firewall {
            network: "10.245.0.0/16".parse().expect("net"),
            subnet: "10.245.3.0/24".parse().expect("subnet"),
            ..fw()
        }
    }

    #[test]
    fn another_networks_rules_in_the_same_chain_are_neither_ours_nor_in_the_way() {
        let saved = saved_nat(&[other_network(), fw()]);
        assert_eq!(fw().masq_chain(false).plan(&saved), None);
        assert_eq!(other_network().masq_chain(false).plan(&saved), None);
    }

    #[test]
    fn a_new_subnet_replaces_only_this_networks_rules() {
        let saved = saved_nat(&[fw(), other_network()]);
        let moved = Firewall {
            subnet: "10.244.7.0/24".parse().expect("subnet"),
            ..fw()
        };
        let plan = moved
            .masq_chain(false)
            .plan(&saved)
            .expect("subnet changed");
        for r in &fw().masq_chain(false).owned {
            assert!(
                plan.contains(&format!("-D FLANNEL-POSTRTG {r}\n")),
                "{plan}"
            );
        }
        for r in &moved.masq_chain(false).owned {
            assert!(
                plan.contains(&format!("-A FLANNEL-POSTRTG {r}\n")),
                "{plan}"
            );
        }
        assert!(
            !plan.contains("10.245."),
            "touches the other network: {plan}"
        );
        assert!(
            !plan.contains(":FLANNEL-POSTRTG"),
            "would flush the chain: {plan}"
        );
        assert!(!plan.contains("-A POSTROUTING") && !plan.contains("-D POSTROUTING"));
    }

    #[test]
    fn a_missing_shared_rule_goes_back_to_the_top_and_is_never_deleted() {
        let saved = saved_nat(&[fw()]).replace("-A FLANNEL-POSTRTG -m mark", "-A OTHER -m mark");
        let plan = fw()
            .masq_chain(false)
            .plan(&saved)
            .expect("mark rule missing");
        assert!(plan.contains(
            "-I FLANNEL-POSTRTG 1 -m mark --mark 0x4000/0x4000 -m comment --comment \"flanneld masq\" -j RETURN\n"
        ), "{plan}");
        let removal = fw()
            .masq_chain(false)
            .plan_removal(&saved_nat(&[fw(), other_network()]));
        let removal = removal.expect("rules to remove");
        assert_eq!(
            removal.matches("-D FLANNEL-POSTRTG").count(),
            5,
            "{removal}"
        );
        assert!(
            !removal.contains("--mark") && !removal.contains("10.245."),
            "{removal}"
        );
        assert_eq!(
            other_network()
                .forward_chain(false)
                .plan_removal(&saved_nat(&[fw()])),
            None
        );
    }
}
