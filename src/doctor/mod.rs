//! `weftctl doctor`: the problems flannel users hit most, looked for on this host in one read-only
//! pass, each reported on one line with what to do.
//!
//! Gathering ([`gather::gather`]: subnet.env, daemon.json, etcd or the Kubernetes API, netlink,
//! ethtool, iptables-save and on a dual-stack network ip6tables-save, WireGuard's devices) is
//! kept apart from judging: every check is a pure function of the gathered [`Facts`], so each is
//! unit-tested on facts written by hand. The checks, in the order they print (etcd mode):
//!
//! | id | what |
//! |---|---|
//! | `etcd` | etcd reachable (TLS and credentials named as such), the network config readable |
//! | `subnet-env` | subnet.env present and matching the network and this host's lease |
//! | `lease` | this host's lease present, its own, and renewed in time |
//! | `leases` | no two leases with one PublicIP or one VtepMAC |
//! | `docker` | daemon.json and docker0 agreeing with the lease (`weftctl status`'s problems) |
//! | `mtu` | underlay vs FLANNEL_MTU vs the flannel device vs docker0/cni0 vs containers' veths |
//! | `checksum-offload` | flannel #1279: `tx-checksum-ip-generic` on where it breaks VXLAN |
//! | `device` | the flannel device present, up, with the lease's address |
//! | `peers` | each peer's route, neighbour and FDB entry as weft programs them, IPv6's too (vxlan: on flannel-v6.<VNI>); none stale |
//! | `wireguard` | weft's WireGuard: each peer in flannel-wg with its lease's key, and its handshakes; on a dual-stack network in separate mode each peer's IPv6 side in flannel-wg-v6 with its BackendV6Data key |
//! | `routes` | no route from anything else inside the cluster network |
//! | `forward` | the kernel forwards, and FORWARD lets pod traffic through (flannel #2116, #699): iptables', and ip6tables' for a dual-stack network's IPv6 side |
//! | `agents` | no second agent (flanneld) writing flannel's chains (ip6tables' too on a dual-stack network) |
//!
//! In Kubernetes mode (`-kube-subnet-mgr`, `kube.rs`) the lease is this host's Node's podCIDR
//! and the config a file: `kube` (the API reachable and allowing, the Node readable,
//! net-conf.json usable) replaces `etcd`, and `node` (a podCIDR, inside the network, the lease
//! published), `annotations` (what the Node publishes against the device, the underlay and the
//! config) and `network-unavailable` (the Node's condition) replace `lease`; the other checks
//! are the same.
//!
//! Output: `ok <id>`, `skip <id>: <why>`, or one `problem <id>: <what>; fix: <what to do>` per
//! finding (`warning <id>: …` for what may be intended), then `no problem found` or `<n>
//! problem(s) found` (with the warnings counted, if any). Exit status 1 on any problem.

pub mod facts;
mod firewall;
mod gather;
mod kernel;
mod kube;
mod lease;
mod mtu;
mod offload;
mod peers;
mod wireguard;

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::Args;

pub use facts::Facts;

use crate::escape::escape;
use crate::flags::{parse_lease_ttl, MAX_RENEW_MARGIN_MINUTES};
use crate::status::Store;

/// `weftctl doctor`'s flags: weftd's own, so the same command line (or `FLANNELD_*`
/// environment) describes the host doctor looks at.
#[derive(Debug, Clone, Args)]
pub struct DoctorArgs {
    /// weftd's -subnet-file.
    #[arg(
        long,
        env = "FLANNELD_SUBNET_FILE",
        default_value = "/run/flannel/subnet.env"
    )]
    pub subnet_file: PathBuf,
    /// weftd's -iface: the underlay interface (name or IPv4 address); repeatable.
    #[arg(long, env = "FLANNELD_IFACE", value_delimiter = ',')]
    pub iface: Vec<String>,
    /// weftd's -iface-regex; repeatable.
    #[arg(long, env = "FLANNELD_IFACE_REGEX")]
    pub iface_regex: Vec<String>,
    /// weftd's -iface-can-reach.
    #[arg(long, env = "FLANNELD_IFACE_CAN_REACH")]
    pub iface_can_reach: Option<Ipv4Addr>,
    /// weftd's -public-ip (when it is not an address of this host, e.g. behind NAT).
    #[arg(long, env = "FLANNELD_PUBLIC_IP")]
    pub public_ip: Option<Ipv4Addr>,
    /// weftd's --docker-daemon-json ("" skips it).
    #[arg(
        long,
        env = "FLANNELD_DOCKER_DAEMON_JSON",
        default_value = "/etc/docker/daemon.json"
    )]
    pub docker_daemon_json: String,
    /// weftd's --subnet-lease-ttl: when the lease must have been renewed.
    #[arg(long, env = "FLANNELD_SUBNET_LEASE_TTL", default_value = "24h", value_parser = parse_lease_ttl)]
    pub subnet_lease_ttl: Duration,
    /// weftd's -subnet-lease-renew-margin (minutes).
    #[arg(long, env = "FLANNELD_SUBNET_LEASE_RENEW_MARGIN", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..=MAX_RENEW_MARGIN_MINUTES))]
    pub subnet_lease_renew_margin: u64,
}

/// One thing found wrong, and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub problem: String,
    pub fix: String,
    /// Only a warning: possibly intended (doctor cannot tell), not counted as a problem.
    pub warning: bool,
}

impl Finding {
    pub fn new(problem: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            problem: problem.into(),
            fix: fix.into(),
            warning: false,
        }
    }

    /// A finding that may be intended: printed as `warning`, exit status unchanged.
    pub fn warning(problem: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            warning: true,
            ..Self::new(problem, fix)
        }
    }
}

/// What one check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The check ran; no findings means nothing is wrong.
    Ran(Vec<Finding>),
    /// The check does not apply here, or what it needs is missing (another check says why).
    Skipped(String),
}

impl Outcome {
    pub fn ok() -> Self {
        Self::Ran(Vec::new())
    }

    pub fn skip(why: impl Into<String>) -> Self {
        Self::Skipped(why.into())
    }
}

impl From<Vec<Finding>> for Outcome {
    fn from(v: Vec<Finding>) -> Self {
        Self::Ran(v)
    }
}

type Check = fn(&Facts) -> Outcome;

/// Every check, by id, in the order they print.
const CHECKS: &[(&str, Check)] = &[
    ("etcd", lease::etcd),
    ("subnet-env", lease::subnet_env),
    ("lease", lease::own_lease),
    ("leases", lease::unique),
    ("docker", lease::docker),
    ("mtu", mtu::check),
    ("checksum-offload", offload::check),
    ("device", peers::device),
    ("peers", peers::peers),
    ("wireguard", wireguard::handshakes),
    ("routes", peers::foreign_routes),
    ("forward", firewall::forward),
    ("agents", firewall::agents),
];

/// Kubernetes mode's checks, by id, in the order they print.
const KUBE_CHECKS: &[(&str, Check)] = &[
    ("kube", kube::api),
    ("subnet-env", lease::subnet_env),
    ("node", kube::node),
    ("annotations", kube::annotations),
    ("network-unavailable", kube::network_unavailable),
    ("leases", lease::unique),
    ("docker", lease::docker),
    ("mtu", mtu::check),
    ("checksum-offload", offload::check),
    ("device", peers::device),
    ("peers", peers::peers),
    ("wireguard", wireguard::handshakes),
    ("routes", peers::foreign_routes),
    ("forward", firewall::forward),
    ("agents", firewall::agents),
];

/// The checks for `facts`' mode.
fn checks(facts: &Facts) -> &'static [(&'static str, Check)] {
    match facts.kube {
        Some(_) => KUBE_CHECKS,
        None => CHECKS,
    }
}

/// Every check's outcome, by id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report(pub Vec<(&'static str, Outcome)>);

impl Report {
    /// Runs every check of its mode on `facts`.
    pub fn new(facts: &Facts) -> Self {
        Self(
            checks(facts)
                .iter()
                .map(|(id, c)| (*id, c(facts)))
                .collect(),
        )
    }

    /// Every finding, warnings too, as `(id, finding)`.
    fn findings(&self) -> impl Iterator<Item = (&'static str, &Finding)> + '_ {
        self.0.iter().flat_map(|(id, o)| match o {
            Outcome::Ran(v) => v.iter().map(|f| (*id, f)).collect::<Vec<_>>(),
            Outcome::Skipped(_) => Vec::new(),
        })
    }

    /// The problems found, as `(id, finding)`.
    pub fn problems(&self) -> impl Iterator<Item = (&'static str, &Finding)> + '_ {
        self.findings().filter(|(_, f)| !f.warning)
    }

    /// The warnings, as `(id, finding)`.
    pub fn warnings(&self) -> impl Iterator<Item = (&'static str, &Finding)> + '_ {
        self.findings().filter(|(_, f)| f.warning)
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        for (id, o) in &self.0 {
            match o {
                Outcome::Skipped(why) => {
                    let _ = writeln!(out, "skip {id}: {}", escape(&why.replace('\n', " ")));
                }
                Outcome::Ran(v) if v.is_empty() => {
                    let _ = writeln!(out, "ok {id}");
                }
                Outcome::Ran(v) => {
                    for f in v {
                        // One line per finding, whatever the texts hold: they quote etcd,
                        // files and the kernel, so whatever a terminal would obey is escaped.
                        let kind = if f.warning { "warning" } else { "problem" };
                        let line = format!("{kind} {id}: {}; fix: {}", f.problem, f.fix);
                        let _ = writeln!(out, "{}", escape(&line.replace('\n', " ")));
                    }
                }
            }
        }
        let warnings = match self.warnings().count() {
            0 => String::new(),
            1 => " (1 warning)".into(),
            n => format!(" ({n} warnings)"),
        };
        let _ = match self.problems().count() {
            0 => writeln!(out, "no problem found{warnings}"),
            1 => writeln!(out, "1 problem found{warnings}"),
            n => writeln!(out, "{n} problems found{warnings}"),
        };
        out
    }
}

/// Gathers the facts, prints the report, and fails when anything is wrong.
pub async fn run(store: Store<'_>, args: &DoctorArgs) -> Result<()> {
    let facts = gather::gather(store, args).await?;
    let report = Report::new(&facts);
    print!("{}", report.render());
    match report.problems().count() {
        0 => Ok(()),
        1 => bail!("1 problem found"),
        n => bail!("{n} problems found"),
    }
}

#[cfg(test)]
pub(crate) mod testing;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_healthy_host_reports_every_check_ok_and_no_problem() {
        let report = Report::new(&testing::healthy());
        let text = report.render();
        assert_eq!(report.problems().count(), 0, "{text}");
        for (id, _) in CHECKS {
            // wireguard's check is for wireguard hosts; this one runs vxlan.
            let ok = match *id {
                "wireguard" => "skip wireguard: the backend is vxlan\n".to_string(),
                _ => format!("ok {id}\n"),
            };
            assert!(text.contains(&ok), "{id}: {text}");
        }
        assert!(text.ends_with("\nno problem found\n"), "{text}");
    }

    #[test]
    fn a_healthy_dual_stack_host_reports_no_problem() {
        let report = Report::new(&testing::dual_stack());
        let text = report.render();
        assert!(text.ends_with("\nno problem found\n"), "{text}");
        for id in ["subnet-env", "peers", "routes", "forward"] {
            assert!(text.contains(&format!("ok {id}\n")), "{id}: {text}");
        }
    }

    #[test]
    fn what_a_finding_quotes_cannot_rewrite_the_terminal() {
        let report = Report(vec![(
            "peers",
            Outcome::Ran(vec![Finding::new("backend \u{1b}[2Jvxlan\r", "c")]),
        )]);
        assert!(report
            .render()
            .starts_with("problem peers: backend \\u{1b}[2Jvxlan\\r; fix: c\n"));
    }

    #[test]
    fn each_finding_is_one_greppable_line() {
        let report = Report(vec![
            ("mtu", Outcome::Ran(vec![Finding::new("a\nb", "c")])),
            ("device", Outcome::skip("no device")),
            ("peers", Outcome::ok()),
        ]);
        assert_eq!(
            report.render(),
            "problem mtu: a b; fix: c\nskip device: no device\nok peers\n1 problem found\n"
        );
    }
}
