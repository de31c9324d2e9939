//! `weftctl status`: this host's view of its lease — subnet.env, the lease in etcd, Docker's
//! daemon.json and the docker0 bridge — and whether they agree. Gathering (files, etcd, netlink) is
//! kept apart from judging (`problems`), which is pure and unit-tested.
//!
//! In Kubernetes mode (`-kube-subnet-mgr`) the lease is this host's Node's podCIDR with flannel's
//! annotations, the config is the net-conf.json file, and the other Nodes are shown as weftd's
//! peer set judges them: peers, refused (with why), waiting for a podCIDR. Reading only: a get
//! and a list of Nodes.
//!
//! Exit status: 0 when everything present agrees with subnet.env; 1 when something disagrees or
//! cannot be read (each problem is printed), e.g. "Docker must be restarted to pick up bip X".

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use ipnet::Ipv4Net;
use serde_json::Value;

use crate::config::NetworkConfig;
use crate::escape::escape;
use crate::flags::{EtcdArgs, KubeArgs};
use crate::lease::{format_secs, Lease};
use crate::peers::{Own, PeerSet, Verdict};
use crate::registry::kube::inspect::{NodeList, OwnNode};
use crate::registry::kube::KubeStore;
use crate::registry::Registry;
use crate::{daemon_json, fsutil, subnet_env};

/// The lease store weftctl's global flags pick: etcd, or with -kube-subnet-mgr the Kubernetes
/// API, read only (the network config then comes from a file, as weftd's does).
#[derive(Debug, Clone, Copy)]
pub enum Store<'a> {
    Etcd(&'a EtcdArgs),
    Kube(Kube<'a>),
}

/// Kubernetes mode's flags.
#[derive(Debug, Clone, Copy)]
pub struct Kube<'a> {
    pub args: &'a KubeArgs,
    /// -net-config-path (kube-flannel's net-conf.json).
    pub net_config: &'a Path,
}

impl Kube<'_> {
    /// Connects to the API for this host's Node (`NODE_NAME`, or `POD_NAME` and
    /// `POD_NAMESPACE`; weftctl's `--node` sets `NODE_NAME`).
    pub async fn connect(&self) -> Result<KubeStore> {
        let set = |k: &str| std::env::var_os(k).is_some_and(|v| !v.is_empty());
        let named = set("NODE_NAME") || (set("POD_NAME") && set("POD_NAMESPACE"));
        if !named {
            bail!(
                "in kube mode weftctl needs this host's Node: give --node NAME, or set NODE_NAME \
                 (or POD_NAME and POD_NAMESPACE) as weftd's pod has them"
            );
        }
        KubeStore::connect(self.args, Some(self.net_config.to_path_buf())).await
    }

    /// Where the config is, for messages.
    pub fn config_path(&self) -> String {
        self.net_config.display().to_string()
    }

    /// The network config file's text: `Ok(None)` when there is none.
    pub fn config_text(&self) -> Result<Option<String>> {
        fsutil::read_optional(self.net_config)
            .with_context(|| format!("read the network config file {}", self.config_path()))
    }

    /// The network config, checked as weftd checks it; `Err` worded as weftd logs it.
    pub fn config(&self) -> Result<NetworkConfig, String> {
        let at = self.config_path();
        match self.config_text() {
            Ok(Some(text)) => NetworkConfig::parse_at(&text, &at).map_err(|e| e.to_string()),
            Ok(None) => Err(format!("no network config file {at}")),
            Err(e) => Err(format!("{e:#}")),
        }
    }

    /// This host's Node's name as the environment gives it, for messages before the API answers.
    pub fn node_hint() -> String {
        std::env::var("NODE_NAME").unwrap_or_default()
    }
}

/// `weftctl status`'s flags.
#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    /// subnet.env written by weftd.
    #[arg(
        short = 'f',
        long,
        env = "FLANNELD_SUBNET_FILE",
        default_value = "/run/flannel/subnet.env"
    )]
    pub subnet_file: PathBuf,
    /// Docker's daemon.json ("" skips it).
    #[arg(
        long,
        env = "FLANNELD_DOCKER_DAEMON_JSON",
        default_value = "/etc/docker/daemon.json"
    )]
    pub docker_daemon_json: String,
    /// Docker's bridge, whose address must be the lease's first address.
    #[arg(long, default_value = "docker0")]
    pub bridge: String,
    /// weftd's `-public-ip`, when it is not an address of this host (NAT): the lease must name
    /// it. Unset: the lease must name one of this host's addresses.
    #[arg(long, env = "FLANNELD_PUBLIC_IP")]
    pub public_ip: Option<Ipv4Addr>,
}

/// What subnet.env says.
#[derive(Debug, Clone, PartialEq)]
pub struct EnvView {
    pub network: String,
    /// FLANNEL_SUBNET: the gateway address with the lease's prefix length.
    pub subnet: Ipv4Net,
    /// FLANNEL_IPV6_NETWORK and FLANNEL_IPV6_SUBNET, on a dual-stack network.
    pub ipv6: Option<(String, String)>,
    pub mtu: Option<u32>,
    pub ip_masq: String,
}

/// This host's lease in etcd.
#[derive(Debug, Clone, PartialEq)]
pub enum LeaseView {
    /// `expires_in` is `None` for a reservation (no etcd lease).
    Found {
        public_ip: Ipv4Addr,
        backend: String,
        expires_in: Option<i64>,
    },
    Missing,
    /// Not looked up (no subnet.env) or etcd could not be read.
    Unknown(String),
}

/// Docker's daemon.json.
#[derive(Debug, Clone, PartialEq)]
pub enum DaemonJsonView {
    Skipped,
    Missing,
    Unreadable(String),
    /// Not a JSON object: weftd leaves it untouched (and says so on /readyz).
    Unparseable(String),
    Found {
        bip: Option<String>,
        mtu: Option<u64>,
    },
}

/// Docker's bridge.
#[derive(Debug, Clone, PartialEq)]
pub enum BridgeView {
    Absent,
    NoAddress,
    Addr(Ipv4Addr),
    Unknown(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct View {
    pub subnet_file: PathBuf,
    /// `Err`: why there is nothing to compare with.
    pub env: Result<EnvView, String>,
    pub lease: LeaseView,
    pub daemon_json_path: String,
    pub daemon_json: DaemonJsonView,
    pub bridge_name: String,
    pub bridge: BridgeView,
    /// Kubernetes mode: the Node, the config file and the other Nodes (the lease is judged
    /// from these, not from `lease`).
    pub kube: Option<KubeView>,
}

/// Kubernetes mode: this host's Node, the network config file and the other Nodes.
#[derive(Debug, Clone, PartialEq)]
pub struct KubeView {
    /// This host's Node's name (empty when it is not known: `own` says why).
    pub node: String,
    pub config_path: String,
    pub config: Result<NetworkConfig, String>,
    /// This host's Node, or why it cannot be read (the API unreachable or refusing included).
    pub own: Result<OwnNode, String>,
    /// The other Nodes, or why they cannot be listed.
    pub nodes: Result<NodesView, String>,
}

/// The other Nodes, as weftd's peer set judges them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodesView {
    /// Nodes that publish a lease, by name, in name order.
    pub leases: Vec<PeerView>,
    /// Why the leases were not judged (no config, or this node has no lease to judge against).
    pub unjudged: Option<String>,
    /// Nodes run by a flannel-compatible agent that have no podCIDR yet.
    pub waiting: Vec<String>,
    /// Nodes without flannel's annotations.
    pub others: usize,
}

/// Another Node's lease and its verdict.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerView {
    pub node: String,
    /// `Err`: its annotations cannot be read.
    pub lease: Result<Lease, String>,
    /// Why weftd refuses it as a peer (`None`: a peer, or not judged).
    pub refused: Option<String>,
}

/// Everything that disagrees with subnet.env, one sentence each. Empty: consistent.
pub fn problems(v: &View) -> Vec<String> {
    let mut out = match &v.kube {
        Some(k) => kube_problems(k, v),
        None => Vec::new(),
    };
    let env = match &v.env {
        Ok(env) => env,
        Err(e) => {
            out.push(e.clone());
            return out;
        }
    };
    let gw = env.subnet;
    match (&v.lease, &v.kube) {
        (_, Some(_)) | (LeaseView::Found { .. }, None) => {}
        (LeaseView::Missing, None) => out.push(format!(
            "etcd has no lease for {}: weftd is not running, or lost the lease and has not leased again",
            gw.trunc()
        )),
        (LeaseView::Unknown(e), None) => {
            out.push(format!("cannot read the lease from etcd: {e}"))
        }
    }
    match &v.daemon_json {
        DaemonJsonView::Found { bip, mtu } => {
            if let Some(bip) = bip.as_deref().filter(|b| *b != gw.to_string()) {
                out.push(format!(
                    "{} has bip {bip} but the lease needs {gw}: weftd has not rewritten it (is it running with this -docker-daemon-json?)",
                    v.daemon_json_path
                ));
            }
            if let (Some(have), Some(want)) = (mtu, env.mtu) {
                if *have != u64::from(want) {
                    out.push(format!(
                        "{} has mtu {have} but subnet.env says {want}",
                        v.daemon_json_path
                    ));
                }
            }
        }
        DaemonJsonView::Unreadable(e) => {
            out.push(format!("cannot read {}: {e}", v.daemon_json_path))
        }
        DaemonJsonView::Unparseable(e) => out.push(format!(
            "{} cannot be parsed ({e}): weftd leaves it untouched, so Docker's bip and mtu are not set; once it is fixed, weftd writes them within seconds",
            v.daemon_json_path
        )),
        DaemonJsonView::Skipped | DaemonJsonView::Missing => {}
    }
    match &v.bridge {
        BridgeView::Addr(a) if *a != gw.addr() => out.push(format!(
            "Docker must be restarted to pick up bip {gw} ({} has {a})",
            v.bridge_name
        )),
        BridgeView::Unknown(e) => out.push(format!("cannot read {}: {e}", v.bridge_name)),
        _ => {}
    }
    out
}

/// The report, one `name: value` line per source, then the verdict.
pub fn render(v: &View) -> String {
    let mut lines: Vec<(String, String)> = Vec::new();
    let mut line = |k: &str, val: String| lines.push((k.to_string(), val));
    line("subnet.env", v.subnet_file.display().to_string());
    if let Ok(env) = &v.env {
        line("  network", env.network.clone());
        line("  subnet", env.subnet.to_string());
        if let Some((network, subnet)) = &env.ipv6 {
            line("  ipv6 network", network.clone());
            line("  ipv6 subnet", subnet.clone());
        }
        line(
            "  mtu",
            env.mtu.map_or_else(|| "-".to_string(), |m| m.to_string()),
        );
        line("  ipmasq", env.ip_masq.clone());
    }
    if let Some(k) = &v.kube {
        kube_lines(k, &mut line);
    } else {
        line("lease", lease_line(v));
    }
    line(
        "daemon.json",
        match &v.daemon_json {
            DaemonJsonView::Skipped => "not checked".into(),
            DaemonJsonView::Missing => format!("{} (absent)", v.daemon_json_path),
            DaemonJsonView::Unreadable(_) => format!("{} (unreadable)", v.daemon_json_path),
            DaemonJsonView::Unparseable(_) => {
                format!("{} (cannot be parsed; left untouched)", v.daemon_json_path)
            }
            DaemonJsonView::Found { bip, mtu } => format!(
                "{}: bip {}, mtu {}",
                v.daemon_json_path,
                bip.as_deref()
                    .unwrap_or("- (not set: Docker gets its bip elsewhere)"),
                mtu.map_or_else(|| "-".to_string(), |m| m.to_string())
            ),
        },
    );
    line(
        &v.bridge_name,
        match &v.bridge {
            BridgeView::Absent => "absent (Docker has not run since boot)".into(),
            BridgeView::NoAddress => "no IPv4 address".into(),
            BridgeView::Addr(a) => a.to_string(),
            BridgeView::Unknown(_) => "unknown".into(),
        },
    );
    let width = lines.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 2;
    // Values hold what subnet.env, daemon.json and etcd say: escaped, so each is one line.
    let mut out: String = lines
        .iter()
        .map(|(k, val)| format!("{:<width$}{}\n", format!("{k}:"), escape(val)))
        .collect();
    let problems = problems(v);
    if problems.is_empty() {
        out.push_str("status: consistent\n");
    }
    for p in &problems {
        out.push_str(&format!("problem: {}\n", escape(p)));
    }
    out
}

/// The `lease` line in etcd mode.
fn lease_line(v: &View) -> String {
    match (&v.lease, &v.env) {
        (
            LeaseView::Found {
                public_ip,
                backend,
                expires_in,
            },
            Ok(env),
        ) => {
            let expiry = match expires_in {
                Some(s) => format!("expires in {}", format_secs(*s)),
                None => "reserved (no expiry)".into(),
            };
            let backend = if backend.is_empty() { "-" } else { backend };
            format!(
                "{} public-ip {public_ip} backend {backend}, {expiry}",
                env.subnet.trunc()
            )
        }
        (LeaseView::Missing, _) => "none in etcd".into(),
        (LeaseView::Unknown(_), _) | (_, Err(_)) => "unknown".into(),
    }
}

/// What disagrees in Kubernetes mode: the config file, this host's Node (its podCIDR, the lease
/// it publishes) against subnet.env, and whether the Nodes can be read.
fn kube_problems(k: &KubeView, v: &View) -> Vec<String> {
    let mut out = Vec::new();
    if let Err(e) = &k.config {
        out.push(format!("cannot use the network config: {e}"));
    }
    match &k.own {
        Err(e) if k.node.is_empty() => out.push(format!("cannot read this host's node: {e}")),
        Err(e) => out.push(format!("cannot read node {}: {e}", k.node)),
        Ok(own) => out.extend(own_node_problem(own, k, v)),
    }
    if let Err(e) = &k.nodes {
        // Said once when the API could not be read at all.
        if k.own.as_ref().err() != Some(e) {
            out.push(format!("cannot list the nodes: {e}"));
        }
    }
    out
}

/// What is wrong with this host's Node, the first thing found (the others follow from it).
fn own_node_problem(own: &OwnNode, k: &KubeView, v: &View) -> Option<String> {
    let n = &own.name;
    let subnet = match &own.pod_cidr {
        Ok(Some(s)) => *s,
        Ok(None) => {
            return Some(format!(
                "node {n} has no podCIDR: the controller manager has not allocated one \
                 (kube-controller-manager --allocate-node-cidrs), and weftd waits for it"
            ))
        }
        Err(e) => return Some(format!("node {n}: {e}")),
    };
    if let Ok(c) = &k.config {
        if !c.network.contains(&subnet) {
            return Some(format!(
                "node {n}'s podCIDR {subnet} is outside the network {} of {}: weftd waits for \
                 one inside it",
                c.network, k.config_path
            ));
        }
    }
    let lease = match &own.lease {
        Some(Ok(l)) => l,
        None => {
            return Some(format!(
                "node {n} publishes no lease (flannel's annotations): weftd is not running, or \
                 has not published it yet"
            ))
        }
        Some(Err(e)) => return Some(format!("node {n}'s lease cannot be read: {e}")),
    };
    match &v.env {
        Ok(env) if env.subnet.trunc() != lease.subnet => Some(format!(
            "{} says FLANNEL_SUBNET={} but node {n}'s podCIDR is {}: weftd has not rewritten it \
             (is it running with this -subnet-file?)",
            v.subnet_file.display(),
            env.subnet,
            lease.subnet
        )),
        _ => None,
    }
}

/// `subnet public-ip … backend …`.
fn describe_lease(l: &Lease) -> String {
    let backend = if l.attrs.backend_type.is_empty() {
        "-"
    } else {
        &l.attrs.backend_type
    };
    format!(
        "{} public-ip {} backend {backend}",
        l.subnet, l.attrs.public_ip
    )
}

/// The lines of Kubernetes mode: the config file, this host's Node, its lease, the other Nodes.
fn kube_lines(k: &KubeView, line: &mut impl FnMut(&str, String)) {
    line(
        "config",
        match &k.config {
            Ok(c) => format!(
                "{}: network {} (/{} subnets), backend {}",
                k.config_path,
                c.network,
                c.subnet_len,
                c.backend.type_name()
            ),
            Err(_) => format!("{} (unusable)", k.config_path),
        },
    );
    line(
        "node",
        if k.node.is_empty() {
            "unknown".into()
        } else {
            k.node.clone()
        },
    );
    let own = k.own.as_ref().ok();
    if let Some(own) = own {
        line(
            "  podCIDR",
            match &own.pod_cidr {
                Ok(Some(s)) => s.to_string(),
                Ok(None) => "none (not allocated yet)".into(),
                Err(e) => format!("unusable: {e}"),
            },
        );
        line(
            "  annotations",
            if own.annotations.is_empty() {
                "none of flannel's".into()
            } else {
                (own.annotations.iter())
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            },
        );
        line(
            "  NetworkUnavailable",
            match &own.network_unavailable {
                None => "not set".into(),
                Some(c) => match &c.reason {
                    Some(r) => format!("{} ({r})", c.status),
                    None => c.status.clone(),
                },
            },
        );
    }
    line(
        "lease",
        match own.map(|o| &o.lease) {
            Some(Some(Ok(l))) => format!(
                "{}, node {}'s podCIDR (no expiry)",
                describe_lease(l),
                k.node
            ),
            Some(Some(Err(_))) => "unreadable".into(),
            Some(None) => "none published on the node".into(),
            None => "unknown".into(),
        },
    );
    let nodes = match &k.nodes {
        Ok(n) => n,
        Err(_) => {
            line("peers", "unknown".into());
            return;
        }
    };
    let peers = nodes
        .leases
        .iter()
        .filter(|p| p.refused.is_none() && p.lease.is_ok());
    line(
        "peers",
        match &nodes.unjudged {
            None => format!("{}", peers.count()),
            Some(why) => format!("not judged ({why})"),
        },
    );
    // Unjudged, a lease is only listed.
    let accepted = if nodes.unjudged.is_some() {
        "  lease"
    } else {
        "  peer"
    };
    for p in &nodes.leases {
        match (&p.lease, &p.refused) {
            (Ok(l), None) => line(accepted, format!("{} {}", p.node, describe_lease(l))),
            (Ok(l), Some(why)) => line(
                "  refused",
                format!("{} {}: {why}", p.node, describe_lease(l)),
            ),
            (Err(e), _) => line("  refused", format!("{}: {e}", p.node)),
        }
    }
    for w in &nodes.waiting {
        line("  waiting", format!("{w}: no podCIDR yet"));
    }
    if nodes.others > 0 {
        line(
            "  other nodes",
            format!("{} without flannel's annotations", nodes.others),
        );
    }
}

/// The other Nodes' leases judged as weftd's peer set judges them against this host's lease
/// (`own`, published on Node `node`) and addresses (`local`).
pub fn judge_nodes(
    list: NodeList,
    node: &str,
    own: Option<&Lease>,
    config: Option<&NetworkConfig>,
    local: HashSet<IpAddr>,
) -> NodesView {
    let mut out = NodesView {
        waiting: list.waiting,
        others: list.others,
        ..Default::default()
    };
    let mut records: Vec<_> = (list.records.into_iter())
        .filter(|r| r.key != node)
        .collect();
    records.sort_by(|a, b| a.key.cmp(&b.key));
    let set = match (own, config) {
        (Some(own), Some(config)) => {
            let own = Own {
                ipv6_subnet: own.ipv6_subnet,
                key: node.to_string(),
                subnet: own.subnet,
                identity: own.identity(),
                identity6: own.identity6(),
            };
            let mut set = PeerSet::new(config.network, config.subnet_len, own, local);
            set.replace_all(records.iter().cloned());
            Some(set)
        }
        (None, _) => {
            out.unjudged = Some("this node publishes no lease".into());
            None
        }
        (_, None) => {
            out.unjudged = Some("no usable network config".into());
            None
        }
    };
    out.leases = records
        .into_iter()
        .map(|r| {
            let refused = match set.as_ref().and_then(|s| s.verdict(&r.key)) {
                Some(Verdict::Rejected(why)) => Some(why.to_string()),
                _ => None,
            };
            PeerView {
                node: r.key,
                lease: r.value.map_err(|e| e.to_string()),
                refused,
            }
        })
        .collect();
    out
}

/// Reads Kubernetes mode's view: the config file, this host's Node, and the other Nodes judged
/// against it. Reading only (a get and a list of Nodes).
pub async fn read_kube(k: &Kube<'_>, public_ip: Option<Ipv4Addr>) -> KubeView {
    let config = k.config();
    let mut view = KubeView {
        node: Kube::node_hint(),
        config_path: k.config_path(),
        config: config.clone(),
        own: Err(String::new()),
        nodes: Err(String::new()),
    };
    let store = match k.connect().await {
        Ok(s) => s,
        Err(e) => {
            let e = format!("{e:#}");
            view.own = Err(e.clone());
            view.nodes = Err(e);
            return view;
        }
    };
    view.node = store.node().to_string();
    view.own = store.own_node().await.map_err(|e| format!("{e:#}"));
    view.nodes = match store.list_nodes().await {
        Ok(list) => {
            let own = view
                .own
                .as_ref()
                .ok()
                .and_then(|o| o.lease.as_ref()?.as_ref().ok());
            let mut local = weft_backends::iface::local_addrs()
                .await
                .unwrap_or_default();
            local.extend(public_ip.map(IpAddr::V4));
            Ok(judge_nodes(
                list,
                &view.node,
                own,
                config.as_ref().ok(),
                local,
            ))
        }
        Err(e) => Err(format!("{e:#}")),
    };
    view
}

/// Reads subnet.env: `Err` says why it cannot be used.
pub fn read_env(path: &Path) -> Result<EnvView, String> {
    let text = match fsutil::read_optional(path) {
        Ok(Some(t)) => t,
        Ok(None) => {
            return Err(format!(
                "no {}: weftd has not leased a subnet (is it running?)",
                path.display()
            ))
        }
        Err(e) => return Err(format!("{e:#}")),
    };
    let vars = subnet_env::parse_vars(&text);
    let subnet = vars
        .get("FLANNEL_SUBNET")
        .and_then(|s| s.parse::<Ipv4Net>().ok())
        .ok_or_else(|| format!("{} has no valid FLANNEL_SUBNET", path.display()))?;
    Ok(EnvView {
        network: vars.get("FLANNEL_NETWORK").cloned().unwrap_or_default(),
        subnet,
        ipv6: vars
            .get("FLANNEL_IPV6_NETWORK")
            .cloned()
            .zip(vars.get("FLANNEL_IPV6_SUBNET").cloned()),
        mtu: vars.get("FLANNEL_MTU").and_then(|m| m.parse().ok()),
        ip_masq: vars.get("FLANNEL_IPMASQ").cloned().unwrap_or_default(),
    })
}

/// Reads `bip` and `mtu` from daemon.json.
pub fn read_daemon_json(path: &str) -> DaemonJsonView {
    if path.is_empty() {
        return DaemonJsonView::Skipped;
    }
    let text = match fsutil::read_optional(Path::new(path)) {
        Ok(Some(t)) => t,
        Ok(None) => return DaemonJsonView::Missing,
        Err(e) => return DaemonJsonView::Unreadable(format!("{e:#}")),
    };
    // The same reading as weftd's (a BOM skipped, blank is empty), so both say the same.
    match daemon_json::parse(&text) {
        Ok(o) => DaemonJsonView::Found {
            bip: o.get("bip").and_then(Value::as_str).map(str::to_string),
            mtu: o.get("mtu").and_then(Value::as_u64),
        },
        Err(e) => DaemonJsonView::Unparseable(format!("{e:#}")),
    }
}

/// The bridge's first IPv4 address, through netlink in this network namespace.
pub async fn read_bridge(name: &str) -> BridgeView {
    let selector = weft_backends::InterfaceSelector {
        ifaces: vec![name.to_string()],
        ..Default::default()
    };
    match selector.select().await {
        Ok(link) => BridgeView::Addr(link.iface_addr),
        Err(weft_backends::Error::NoInterface(_)) => BridgeView::Absent,
        Err(weft_backends::Error::NoAddress { .. }) => BridgeView::NoAddress,
        Err(e) => BridgeView::Unknown(e.to_string()),
    }
}

/// Finds this host's lease for `subnet` in etcd: the record under exactly `subnet`'s key whose
/// PublicIP is this host's (`public_ip`, or else any IPv4 address of this host). A lease for the
/// subnet that names another PublicIP is another host's: this one has none.
pub async fn read_lease(
    etcd: &EtcdArgs,
    subnet: Ipv4Net,
    public_ip: Option<Ipv4Addr>,
) -> LeaseView {
    let found = async {
        let store = Registry::connect(etcd).await?;
        let listing = store.list().await?;
        // Under its IPv4 subnet's key, with or without an IPv6 part.
        let names = store.names();
        let Some(Ok(lease)) = (listing.records.into_iter())
            .find(|r| names.subnet_of(&r.key).is_some_and(|(s, _)| s == subnet))
            .map(|r| r.value)
        else {
            return Ok::<_, anyhow::Error>(LeaseView::Missing);
        };
        let mine = match public_ip {
            Some(ip) => lease.attrs.public_ip == ip,
            None => weft_backends::iface::local_ipv4_addrs()
                .await
                .context("read this host's addresses")?
                .contains(&lease.attrs.public_ip),
        };
        if !mine {
            return Ok(LeaseView::Missing);
        }
        let expires_in = if lease.is_reservation() {
            None
        } else {
            match store.time_left(&lease).await? {
                Some(s) => Some(s),
                None => return Ok(LeaseView::Missing),
            }
        };
        Ok(LeaseView::Found {
            public_ip: lease.attrs.public_ip,
            backend: lease.attrs.backend_type,
            expires_in,
        })
    };
    match found.await {
        Ok(v) => v,
        Err(e) => LeaseView::Unknown(format!("{e:#}")),
    }
}

/// Gathers the view, prints the report, and fails when anything disagrees.
pub async fn run(store: Store<'_>, args: &StatusArgs) -> Result<()> {
    let env = read_env(&args.subnet_file);
    let (lease, kube) = match (store, &env) {
        (Store::Kube(k), _) => {
            let view = read_kube(&k, args.public_ip).await;
            let lease = match view.own.as_ref().map(|o| &o.lease) {
                Ok(Some(Ok(l))) => LeaseView::Found {
                    public_ip: l.attrs.public_ip,
                    backend: l.attrs.backend_type.clone(),
                    expires_in: None,
                },
                Ok(_) => LeaseView::Missing,
                Err(e) => LeaseView::Unknown(e.clone()),
            };
            (lease, Some(view))
        }
        (Store::Etcd(etcd), Ok(e)) => (
            read_lease(etcd, e.subnet.trunc(), args.public_ip).await,
            None,
        ),
        (Store::Etcd(_), Err(_)) => (LeaseView::Unknown("no subnet to look up".into()), None),
    };
    let view = View {
        subnet_file: args.subnet_file.clone(),
        env,
        lease,
        daemon_json_path: args.docker_daemon_json.clone(),
        daemon_json: read_daemon_json(&args.docker_daemon_json),
        bridge_name: args.bridge.clone(),
        bridge: read_bridge(&args.bridge).await,
        kube,
    };
    print!("{}", render(&view));
    let problems = problems(&view);
    match problems.len() {
        0 => Ok(()),
        1 => bail!("{}", problems[0]),
        n => bail!("{n} problems (see above)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn consistent() -> View {
        View {
            subnet_file: "/run/flannel/subnet.env".into(),
            env: Ok(EnvView {
                network: "172.20.0.0/16".into(),
                subnet: "172.20.59.1/24".parse().unwrap(),
                ipv6: None,
                mtu: Some(1472),
                ip_masq: "false".into(),
            }),
            lease: LeaseView::Found {
                public_ip: "192.168.64.3".parse().unwrap(),
                backend: "vxlan".into(),
                expires_in: Some(86399),
            },
            daemon_json_path: "/etc/docker/daemon.json".into(),
            daemon_json: DaemonJsonView::Found {
                bip: Some("172.20.59.1/24".into()),
                mtu: Some(1472),
            },
            bridge_name: "docker0".into(),
            bridge: BridgeView::Addr("172.20.59.1".parse().unwrap()),
            kube: None,
        }
    }

    #[test]
    fn everything_agreeing_is_consistent() {
        let v = consistent();
        assert_eq!(problems(&v), Vec::<String>::new());
        let text = render(&v);
        assert!(text.ends_with("status: consistent\n"), "{text}");
        assert!(text.contains(
            "lease:       172.20.59.0/24 public-ip 192.168.64.3 backend vxlan, expires in 23h59m59s\n"
        ), "{text}");
        assert!(text.contains("docker0:     172.20.59.1\n"), "{text}");
    }

    #[test]
    fn a_stale_docker0_means_docker_must_be_restarted() {
        let mut v = consistent();
        v.bridge = BridgeView::Addr("10.1.74.1".parse().unwrap());
        assert_eq!(
            problems(&v),
            ["Docker must be restarted to pick up bip 172.20.59.1/24 (docker0 has 10.1.74.1)"]
        );
        assert!(render(&v).contains("problem: Docker must be restarted"));
    }

    #[test]
    fn no_docker_yet_or_no_bip_in_daemon_json_is_not_a_problem() {
        let mut v = consistent();
        v.bridge = BridgeView::Absent;
        v.daemon_json = DaemonJsonView::Found {
            bip: None,
            mtu: None,
        };
        assert!(problems(&v).is_empty());
        v.daemon_json = DaemonJsonView::Missing;
        assert!(problems(&v).is_empty());
    }

    #[test]
    fn daemon_json_disagreeing_with_the_lease_is_reported() {
        let mut v = consistent();
        v.daemon_json = DaemonJsonView::Found {
            bip: Some("172.17.0.1/16".into()),
            mtu: Some(1500),
        };
        let p = problems(&v);
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].contains("has bip 172.17.0.1/16 but the lease needs 172.20.59.1/24"));
        assert!(p[1].contains("has mtu 1500 but subnet.env says 1472"));
    }

    #[test]
    fn an_unparseable_daemon_json_is_reported_as_left_untouched() {
        let mut v = consistent();
        v.daemon_json =
            DaemonJsonView::Unparseable("not valid JSON: expected value at line 1 column 9".into());
        assert_eq!(
            problems(&v),
            ["/etc/docker/daemon.json cannot be parsed (not valid JSON: expected value at line 1 column 9): weftd leaves it untouched, so Docker's bip and mtu are not set; once it is fixed, weftd writes them within seconds"]
        );
        assert!(render(&v)
            .contains("daemon.json: /etc/docker/daemon.json (cannot be parsed; left untouched)\n"));
    }

    #[test]
    fn a_missing_lease_or_subnet_env_is_reported() {
        let mut v = consistent();
        v.lease = LeaseView::Missing;
        assert!(problems(&v)[0].starts_with("etcd has no lease for 172.20.59.0/24"));
        v.env = Err("no /run/flannel/subnet.env: weftd has not leased a subnet".into());
        assert_eq!(problems(&v).len(), 1);
        assert!(render(&v).contains("problem: no /run/flannel/subnet.env"));
    }

    #[test]
    fn reads_subnet_env_and_daemon_json() {
        let dir = tempfile::tempdir().unwrap();
        let env = dir.path().join("subnet.env");
        assert!(read_env(&env).unwrap_err().contains("has not leased"));
        std::fs::write(
            &env,
            "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.7.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
        )
        .unwrap();
        let e = read_env(&env).unwrap();
        assert_eq!(e.subnet.to_string(), "10.5.7.1/24");
        assert_eq!(e.mtu, Some(1450));
        assert_eq!(e.ipv6, None);
        std::fs::write(
            &env,
            "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.7.1/24\nFLANNEL_IPV6_NETWORK=fd00:5::/48\nFLANNEL_IPV6_SUBNET=fd00:5:0:7::1/64\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
        )
        .unwrap();
        let dual = read_env(&env).unwrap();
        assert_eq!(
            dual.ipv6,
            Some(("fd00:5::/48".into(), "fd00:5:0:7::1/64".into()))
        );
        let json = dir.path().join("daemon.json");
        let json_s = json.display().to_string();
        assert_eq!(read_daemon_json(&json_s), DaemonJsonView::Missing);
        std::fs::write(&json, r#"{"debug":true,"bip":"10.5.7.1/24","mtu":1450}"#).unwrap();
        assert_eq!(
            read_daemon_json(&json_s),
            DaemonJsonView::Found {
                bip: Some("10.5.7.1/24".into()),
                mtu: Some(1450)
            }
        );
        std::fs::write(&json, "\u{feff}{\"bip\":\"10.5.7.1/24\"}").unwrap();
        assert_eq!(
            read_daemon_json(&json_s),
            DaemonJsonView::Found {
                bip: Some("10.5.7.1/24".into()),
                mtu: None
            },
            "a BOM is skipped as Docker and weftd skip it"
        );
        std::fs::write(&json, "{ broken").unwrap();
        assert!(matches!(
            read_daemon_json(&json_s),
            DaemonJsonView::Unparseable(e) if e.contains("not valid JSON")
        ));
        assert_eq!(read_daemon_json(""), DaemonJsonView::Skipped);
    }

    const P: &str = "flannel.alpha.coreos.com";

    /// A Node published by weft: `name`, podCIDR `cidr`, PublicIP `ip`, VtepMAC `mac`.
    fn node_json(name: &str, cidr: &str, ip: &str, mac: &str) -> crate::registry::kube::Node {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "annotations": {
                format!("{P}/backend-data"): format!(r#"{{"VNI":1,"VtepMAC":"{mac}"}}"#),
                format!("{P}/backend-type"): "vxlan",
                format!("{P}/kube-subnet-manager"): "true",
                format!("{P}/public-ip"): ip,
            }},
            "spec": {"podCIDR": cidr},
            "status": {"conditions": [
                {"type": "NetworkUnavailable", "status": "False", "reason": "FlannelIsUp"}]},
        }))
        .unwrap()
    }

    /// `consistent()` in Kubernetes mode: node-0 (this host, 172.20.59.0/24) and its peer
    /// node-1, a node-2 refused (its PublicIP is this host's), a node-3 without flannel's
    /// annotations.
    fn kube_consistent() -> View {
        use crate::registry::kube::inspect::{own_node, NodeList};
        use crate::registry::kube::Annotations;
        let names = Annotations::new(P);
        let own = own_node(
            &node_json(
                "node-0",
                "172.20.59.0/24",
                "192.168.64.3",
                "0e:00:00:00:00:01",
            ),
            &names,
        );
        let config = NetworkConfig::parse(r#"{"Network":"172.20.0.0/16"}"#).unwrap();
        let mut list = NodeList::default();
        for n in [
            node_json(
                "node-1",
                "172.20.60.0/24",
                "192.168.64.4",
                "0e:00:00:00:00:02",
            ),
            node_json(
                "node-0",
                "172.20.59.0/24",
                "192.168.64.3",
                "0e:00:00:00:00:01",
            ),
            node_json(
                "node-2",
                "172.20.61.0/24",
                "192.168.64.3",
                "0e:00:00:00:00:03",
            ),
            serde_json::from_str(r#"{"metadata":{"name":"node-3"}}"#).unwrap(),
        ] {
            list.add(&n, &names);
        }
        let own_lease = own.lease.clone().unwrap().unwrap();
        let local = ["192.168.64.3".parse().unwrap()].into_iter().collect();
        let nodes = judge_nodes(list, "node-0", Some(&own_lease), Some(&config), local);
        let mut v = consistent();
        v.lease = LeaseView::Found {
            public_ip: own_lease.attrs.public_ip,
            backend: "vxlan".into(),
            expires_in: None,
        };
        v.kube = Some(KubeView {
            node: "node-0".into(),
            config_path: "/etc/kube-flannel/net-conf.json".into(),
            config: Ok(config),
            own: Ok(own),
            nodes: Ok(nodes),
        });
        v
    }

    fn kube(v: &mut View) -> &mut KubeView {
        v.kube.as_mut().unwrap()
    }

    fn own(v: &mut View) -> &mut OwnNode {
        kube(v).own.as_mut().unwrap()
    }

    #[test]
    fn kube_mode_shows_the_node_its_lease_the_peers_and_the_refused() {
        let v = kube_consistent();
        assert_eq!(problems(&v), Vec::<String>::new());
        let text = render(&v);
        for want in [
            "config:               /etc/kube-flannel/net-conf.json: network 172.20.0.0/16 (/24 subnets), backend udp\n",
            "node:                 node-0\n",
            "  podCIDR:            172.20.59.0/24\n",
            "  annotations:        backend-data={\"VNI\":1,\"VtepMAC\":\"0e:00:00:00:00:01\"} backend-type=vxlan kube-subnet-manager=true public-ip=192.168.64.3\n",
            "  NetworkUnavailable: False (FlannelIsUp)\n",
            "lease:                172.20.59.0/24 public-ip 192.168.64.3 backend vxlan, node node-0's podCIDR (no expiry)\n",
            "peers:                1\n",
            "  peer:               node-1 172.20.60.0/24 public-ip 192.168.64.4 backend vxlan\n",
            "  refused:            node-2 172.20.61.0/24 public-ip 192.168.64.3 backend vxlan: PublicIP 192.168.64.3 is an address of this host\n",
            "  other nodes:        1 without flannel's annotations\n",
        ] {
            assert!(text.contains(want), "{want:?} in:\n{text}");
        }
        assert!(
            !text.contains("node-0 172"),
            "this host is no peer:\n{text}"
        );
        assert!(text.ends_with("status: consistent\n"), "{text}");
    }

    #[test]
    fn kube_mode_names_a_node_without_podcidr_or_lease_and_a_stale_subnet_env() {
        let mut v = kube_consistent();
        own(&mut v).pod_cidr = Ok(None);
        own(&mut v).lease = None;
        assert_eq!(problems(&v), ["node node-0 has no podCIDR: the controller manager has not allocated one (kube-controller-manager --allocate-node-cidrs), and weftd waits for it"]);
        assert!(render(&v).contains("  podCIDR:            none (not allocated yet)\n"));

        let mut v = kube_consistent();
        own(&mut v).lease = None;
        assert!(problems(&v)[0].starts_with("node node-0 publishes no lease"));
        assert!(render(&v).contains("lease:                none published on the node\n"));

        let mut v = kube_consistent();
        v.env.as_mut().unwrap().subnet = "172.20.9.1/24".parse().unwrap();
        assert_eq!(problems(&v)[0], "/run/flannel/subnet.env says FLANNEL_SUBNET=172.20.9.1/24 but node node-0's podCIDR is 172.20.59.0/24: weftd has not rewritten it (is it running with this -subnet-file?)");

        let mut v = kube_consistent();
        own(&mut v).pod_cidr = Ok(Some("10.9.0.0/24".parse().unwrap()));
        assert!(
            problems(&v)[0].contains("podCIDR 10.9.0.0/24 is outside the network 172.20.0.0/16"),
            "{:?}",
            problems(&v)
        );
    }

    #[test]
    fn kube_mode_says_once_that_the_api_cannot_be_read() {
        let mut v = kube_consistent();
        let e = "GET /api/v1/nodes/node-0: connection refused".to_string();
        kube(&mut v).own = Err(e.clone());
        kube(&mut v).nodes = Err(e);
        kube(&mut v).config = Err("no network config file /etc/kube-flannel/net-conf.json".into());
        assert_eq!(
            problems(&v),
            [
                "cannot use the network config: no network config file /etc/kube-flannel/net-conf.json",
                "cannot read node node-0: GET /api/v1/nodes/node-0: connection refused",
            ]
        );
        let text = render(&v);
        assert!(text.contains("\nlease:       unknown\n"), "{text}");
        assert!(text.contains("\npeers:       unknown\n"), "{text}");
    }

    #[test]
    fn leases_are_listed_unjudged_without_a_lease_of_this_nodes() {
        use crate::registry::kube::inspect::NodeList;
        use crate::registry::kube::Annotations;
        let mut list = NodeList::default();
        list.add(
            &node_json(
                "node-1",
                "172.20.60.0/24",
                "192.168.64.4",
                "0e:00:00:00:00:02",
            ),
            &Annotations::new(P),
        );
        let nodes = judge_nodes(list, "node-0", None, None, HashSet::new());
        assert_eq!(
            nodes.unjudged.as_deref(),
            Some("this node publishes no lease")
        );
        assert_eq!(nodes.leases.len(), 1);
        assert_eq!(nodes.leases[0].refused, None);
        let mut v = kube_consistent();
        kube(&mut v).nodes = Ok(nodes);
        let text = render(&v);
        assert!(
            text.contains("peers:                not judged (this node publishes no lease)\n  lease:              node-1 172.20.60.0/24"),
            "{text}"
        );
    }
}
