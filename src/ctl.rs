//! weftctl: the admin tool. Network config, lease listing, mk-docker-opts.sh's output, and the
//! atomic file install the DaemonSet's init containers use. With -kube-subnet-mgr it reads the
//! Kubernetes API (Nodes: get and list only, never a write) and the net-conf.json file.

use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{CommandFactory, Parser, Subcommand};

use crate::config::NetworkConfig;
use crate::docker_opts::DockerOpts;
use crate::flags::{self, EtcdArgs, KubeArgs, KUBE_NET_CONFIG};
use crate::lease::format_secs;
use crate::registry::{Names, Registry};
use crate::status::{Kube, Store};
use crate::{escape, fsutil, subnet_env};

#[derive(Debug, Parser)]
#[command(
    name = "weftctl",
    version,
    about = "Administer a weft (flannel-compatible) network in etcd",
    // As weftd (and flanneld): a flag given twice takes its last value.
    args_override_self = true,
    after_help = "The etcd flags (or FLANNELD_ETCD_*) go before or after the subcommand. \
                  config, leases, status and doctor read them; docker-opts and install-file \
                  read none. With -kube-subnet-mgr (as weftd's) they read the Kubernetes API \
                  instead (-kubeconfig-file, or the pod's service account; this host's Node from \
                  --node or NODE_NAME) and the network config from -net-config-path. \
                  `weftctl help <subcommand>` says which flags each one reads."
)]
pub struct CtlArgs {
    #[command(flatten)]
    pub etcd: EtcdArgs,
    #[command(flatten)]
    pub kube: KubeArgs,
    /// With -kube-subnet-mgr: weftd's -net-config-path (default /etc/kube-flannel/net-conf.json).
    #[arg(
        long,
        global = true,
        env = "FLANNELD_NET_CONFIG_PATH",
        value_name = "FILE",
        help_heading = "Kubernetes"
    )]
    pub net_config_path: Option<PathBuf>,
    /// With -kube-subnet-mgr: this host's Node (weftd's pod has it as NODE_NAME).
    #[arg(
        long,
        global = true,
        env = "NODE_NAME",
        value_name = "NAME",
        help_heading = "Kubernetes"
    )]
    pub node: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

/// weftctl parses as weftd does ([`crate::flags::DaemonArgs::try_parse_args`]): flanneld's
/// spellings and `FLANNELD_*`, through the same normalising.
impl CtlArgs {
    /// Parses from the process's arguments and environment; on a bad flag prints why and exits.
    pub fn from_env() -> Self {
        flags::drop_empty_flanneld_env();
        let args = Self::try_parse_args(std::env::args_os()).unwrap_or_else(|e| e.exit());
        // The store finds this host's Node as weftd's does, from NODE_NAME: --node sets it, as
        // drop_empty_flanneld_env edits the environment, before any thread starts.
        if let Some(node) = args.node.as_deref().filter(|n| !n.is_empty()) {
            std::env::set_var("NODE_NAME", node);
        }
        args
    }

    /// The store the flags pick.
    pub fn store(&self) -> Store<'_> {
        if self.kube.kube_subnet_mgr {
            Store::Kube(Kube {
                args: &self.kube,
                net_config: self
                    .net_config_path
                    .as_deref()
                    .unwrap_or(Path::new(KUBE_NET_CONFIG)),
            })
        } else {
            Store::Etcd(&self.etcd)
        }
    }

    /// Parses flanneld-style arguments (and `FLANNELD_*`), then checks the etcd flags against
    /// each other, on their values merged from before and after the subcommand.
    pub fn try_parse_args(args: impl IntoIterator<Item = OsString>) -> Result<Self, clap::Error> {
        let parsed = Self::try_parse_from(flags::normalize_args(args))?;
        parsed.etcd.check(&mut Self::command())?;
        Ok(parsed)
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Read or write the network config (`<prefix>/config`).
    #[command(
        subcommand,
        after_help = "Reads the etcd flags, before or after `config`, `set` or `get`. With \
                      -kube-subnet-mgr the config is -net-config-path's file: `get` prints it, \
                      `set` refuses."
    )]
    Config(ConfigCommand),
    /// List leases: subnet, public IP, backend, time left (kube mode: the node instead).
    #[command(after_help = "Reads the etcd flags, before or after `leases`; with \
                            -kube-subnet-mgr the Kubernetes flags (a list of Nodes).")]
    Leases,
    /// Write Docker options from subnet.env, exactly as flannel's mk-docker-opts.sh does (and, on
    /// a dual-stack lease, --ipv6 and --fixed-cidr-v6, which the script does not write).
    #[command(
        after_help = "Reads no etcd flag (they are accepted, and ignored): only the subnet.env of -f."
    )]
    DockerOpts {
        /// subnet.env to read.
        #[arg(short = 'f', default_value = "/run/flannel/subnet.env")]
        env_file: PathBuf,
        /// File to write ("-" for standard output).
        #[arg(short = 'd', default_value = "/run/docker_opts.env")]
        out: PathBuf,
        /// Output one variable per option.
        #[arg(short = 'i')]
        individual: bool,
        /// Output the combined variable.
        #[arg(short = 'c')]
        combined: bool,
        /// Name of the combined variable.
        #[arg(short = 'k', default_value = "DOCKER_OPTS")]
        key: String,
        /// Leave out --ip-masq.
        #[arg(short = 'm')]
        no_ip_masq: bool,
    },
    /// This host's lease, subnet.env, daemon.json and docker0, and whether they agree (exit 1 if
    /// not, e.g. when Docker must be restarted to pick up a new bip). Kube mode: this host's Node
    /// (podCIDR, annotations, NetworkUnavailable), net-conf.json, and the other Nodes as peers,
    /// refused (with why) or waiting for a podCIDR.
    #[command(
        after_help = "Reads the etcd flags (before or after `status`) and its own options above; \
                      with -kube-subnet-mgr the Kubernetes flags, --node (or NODE_NAME) and \
                      -net-config-path instead of the etcd ones."
    )]
    Status(crate::status::StatusArgs),
    /// Looks for the problems flannel users hit most on this host (MTU, checksum offload, peers'
    /// routes/neighbours/FDB, foreign routes, FORWARD drops, a second agent, subnet.env, Docker,
    /// etcd and the leases; kube mode: the Node's podCIDR, annotations and NetworkUnavailable
    /// condition): one line per finding with what to do; exit 1 on any. Read-only.
    #[command(
        after_help = "Reads the etcd flags (before or after `doctor`) and the weftd flags above: \
                      give it weftd's own command line or FLANNELD_* environment. With \
                      -kube-subnet-mgr it reads the Kubernetes flags, --node (or NODE_NAME) and \
                      -net-config-path instead of the etcd ones."
    )]
    Doctor(crate::doctor::DoctorArgs),
    /// Copy SRC to DST atomically (a temporary file in DST's directory, synced, then renamed) and
    /// give DST the octal MODE: what the DaemonSet's init containers use to install the CNI plugin
    /// and conflist, since the image has no shell, cp or mv.
    #[command(after_help = "Reads no etcd flag (they are accepted, and ignored).")]
    InstallFile {
        src: PathBuf,
        dst: PathBuf,
        /// Octal, e.g. 0755.
        #[arg(value_parser = parse_mode)]
        mode: u32,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate a config (a file, or - for standard input) and store it.
    #[command(after_help = "Reads the etcd flags, before or after `config` or `set`.")]
    Set {
        file: String,
        /// Store it only if no config exists yet; an existing one is kept (exit 0). Safe when
        /// every node runs it at once: one etcd transaction decides.
        #[arg(long)]
        if_absent: bool,
    },
    /// Print the stored config (kube mode: the -net-config-path file).
    #[command(after_help = "Reads the etcd flags, before or after `config` or `get`.")]
    Get,
}

pub async fn run(args: CtlArgs) -> Result<()> {
    let store = args.store();
    match &args.command {
        Command::Status(status) => crate::status::run(store, status).await,
        Command::Doctor(doctor) => crate::doctor::run(store, doctor).await,
        Command::DockerOpts {
            env_file,
            out,
            individual,
            combined,
            key,
            no_ip_masq,
        } => {
            let opts = DockerOpts {
                individual: *individual,
                combined: *combined,
                combined_key: key.clone(),
                no_ip_masq: *no_ip_masq,
            };
            docker_opts(env_file, out, &opts)
        }
        Command::Config(ConfigCommand::Set { file, if_absent }) => match store {
            Store::Etcd(etcd) => config_set(etcd, file, *if_absent).await,
            Store::Kube(k) => bail!(
                "in kube mode the network config is the file {} (kube-flannel's ConfigMap \
                 net-conf.json): change it there; weftctl writes nothing to the Kubernetes API",
                k.config_path()
            ),
        },
        Command::InstallFile { src, dst, mode } => crate::install::install_file(src, dst, *mode),
        Command::Config(ConfigCommand::Get) => match store {
            Store::Etcd(etcd) => config_get(etcd).await,
            Store::Kube(k) => kube_config_get(&k),
        },
        Command::Leases => match store {
            Store::Etcd(etcd) => leases(etcd).await,
            Store::Kube(k) => kube_leases(&k).await,
        },
    }
}

/// `docker-opts`: subnet.env as Docker's options, on standard output or into a file.
fn docker_opts(env_file: &Path, out: &Path, opts: &DockerOpts) -> Result<()> {
    let text = fsutil::read_optional(env_file)?.unwrap_or_default();
    let rendered = opts.render(
        &subnet_env::parse_vars(&text),
        std::env::var(&opts.combined_key).ok().as_deref(),
    )?;
    if out.as_os_str() == "-" {
        print!("{rendered}");
    } else {
        fsutil::write_atomic(out, rendered.as_bytes(), 0o644)?;
    }
    Ok(())
}

/// `config set`: checked as weftd checks it, then stored (or kept, with `--if-absent`).
async fn config_set(etcd: &EtcdArgs, file: &str, if_absent: bool) -> Result<()> {
    let text = if file == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("read standard input")?;
        s
    } else {
        std::fs::read_to_string(file).with_context(|| format!("read {file}"))?
    };
    // The same check and wording as weftd's, before anything is written: a config weftd
    // would refuse never reaches etcd. (Only what depends on a host's underlay, udp's MTU
    // against its interface, is left to each weftd.)
    let key = Names::of(etcd).config();
    let config = NetworkConfig::parse_at(&text, &key)?;
    let store = Registry::connect(etcd).await?;
    let text = text.trim();
    if if_absent {
        if let Some(existing) = store.put_config_if_absent(text).await? {
            println!(
                "network config at {} exists: kept it, nothing written (--if-absent)",
                store.names().config()
            );
            if let Some(note) = compare_configs(&existing, text, &key) {
                eprintln!("weftctl: warning: {note}");
            }
            return Ok(());
        }
    } else {
        store.put_config(text).await?;
    }
    let ipv6 = config.ipv6.map_or_else(String::new, |p| {
        format!(
            " and IPv6 network {} (/{} subnets {}..{})",
            p.network, p.subnet_len, p.subnet_min, p.subnet_max
        )
    });
    println!(
        "network {} (/{} subnets {}..{}){ipv6}, backend {}, stored at {}",
        config.network,
        config.subnet_len,
        config.subnet_min,
        config.subnet_max,
        config.backend.type_name(),
        store.names().config()
    );
    Ok(())
}

/// `config get`: the stored config, as stored.
async fn config_get(etcd: &EtcdArgs) -> Result<()> {
    let store = Registry::connect(etcd).await?;
    match store.get_config().await?.0 {
        // Printed as stored, for `weftctl config get > net.json`: its newlines are the
        // JSON's own; only what a terminal would obey is escaped.
        Some(text) => {
            println!("{}", escape::escape_terminal(&text));
            Ok(())
        }
        None => bail!("no network config at {}", store.names().config()),
    }
}

/// `leases`: every lease, by subnet, with its time left; unreadable ones on standard error.
async fn leases(etcd: &EtcdArgs) -> Result<()> {
    let store = Registry::connect(etcd).await?;
    let mut listing = store.list().await?;
    // etcd orders keys as text (10.244.157.0 before 10.244.80.0); people read addresses.
    listing.leases.sort_by_key(|l| l.subnet);
    let mut rows = vec![[
        "SUBNET".to_string(),
        "PUBLIC-IP".into(),
        "BACKEND".into(),
        "EXPIRES-IN".into(),
    ]];
    for l in &listing.leases {
        let expires = if l.is_reservation() {
            "reserved".to_string()
        } else {
            match store.time_left(l).await? {
                Some(secs) => format_secs(secs),
                None => "expired".to_string(),
            }
        };
        // Whatever another host wrote: escaped, so it is one cell of one row.
        let backend = backend_cell(&l.attrs.backend_type);
        rows.push([subnet_cell(l), public_ip_cell(l), backend, expires]);
    }
    print!("{}", table(&rows));
    for b in &listing.bad {
        eprintln!(
            "unreadable lease {}: {}",
            escape::clip(&b.key, 256),
            escape::clip(&b.reason, 256)
        );
    }
    Ok(())
}

/// `config get` in kube mode: the network config file, as it is.
fn kube_config_get(k: &Kube<'_>) -> Result<()> {
    match k.config_text()? {
        Some(text) => {
            println!("{}", escape::escape_terminal(text.trim_end()));
            Ok(())
        }
        None => bail!(
            "no network config file {} (in kube mode the config is -net-config-path's file, \
             kube-flannel's net-conf.json)",
            k.config_path()
        ),
    }
}

/// `leases` in kube mode: every Node that publishes a lease (its podCIDR and flannel's
/// annotations), by subnet; unreadable ones and nodes waiting for a podCIDR on standard error.
async fn kube_leases(k: &Kube<'_>) -> Result<()> {
    let store = k.connect().await?;
    let list = store.list_nodes().await?;
    let mut leases: Vec<(&crate::lease::Lease, &str)> = (list.records.iter())
        .filter_map(|r| Some((r.value.as_ref().ok()?, r.key.as_str())))
        .collect();
    leases.sort_by_key(|(l, _)| l.subnet);
    let mut rows = vec![[
        "SUBNET".to_string(),
        "PUBLIC-IP".into(),
        "BACKEND".into(),
        "NODE".into(),
    ]];
    for (l, node) in leases {
        rows.push([
            subnet_cell(l),
            public_ip_cell(l),
            backend_cell(&l.attrs.backend_type),
            escape::clip(node, 253).into_owned(),
        ]);
    }
    print!("{}", table(&rows));
    for r in &list.records {
        if let Err(e) = &r.value {
            eprintln!(
                "unreadable lease on node {}: {}",
                escape::clip(&r.key, 256),
                escape::clip(&e.to_string(), 256)
            );
        }
    }
    for w in &list.waiting {
        eprintln!("node {}: no podCIDR yet", escape::clip(w, 256));
    }
    Ok(())
}

/// A lease's subnets as one table cell: `10.244.5.0/24`, dual-stack
/// `10.244.5.0/24,fd00:10:244:5::/64` (as Kubernetes writes podCIDRs).
fn subnet_cell(l: &crate::lease::Lease) -> String {
    match l.ipv6_subnet {
        Some(v6) => format!("{},{v6}", l.subnet),
        None => l.subnet.to_string(),
    }
}

/// A lease's public addresses as one table cell: PublicIP, and PublicIPv6 if it has one.
fn public_ip_cell(l: &crate::lease::Lease) -> String {
    match l.attrs.public_ipv6 {
        Some(v6) => format!("{},{v6}", l.attrs.public_ip),
        None => l.attrs.public_ip.to_string(),
    }
}

/// A lease's backend type as one table cell (whatever another host wrote: escaped).
fn backend_cell(backend_type: &str) -> String {
    if backend_type.is_empty() {
        "-".into()
    } else {
        escape::clip(backend_type, 64).into_owned()
    }
}

/// What an operator should know when `--if-absent` kept `existing` instead of `given`: that they
/// differ (compared as JSON, so layout does not count), and whether the kept one is even valid.
/// `None`: the same config.
fn compare_configs(existing: &str, given: &str, key: &str) -> Option<String> {
    let as_json = |t: &str| serde_json::from_str::<serde_json::Value>(t).ok();
    let same = match (as_json(existing), as_json(given)) {
        (Some(a), Some(b)) => a == b,
        _ => existing.trim() == given.trim(),
    };
    if same {
        return None;
    }
    let mut note = format!(
        "the existing config differs from the one given; kept: {}",
        escape::escape(existing.trim())
    );
    if let Err(e) = NetworkConfig::parse_at(existing, key) {
        let e = e.to_string();
        note.push_str(&format!(
            " ({}: weftd waits until it is fixed)",
            escape::escape(&e)
        ));
    }
    Some(note)
}

/// `0755`, `755` or `0o755` → 0o755; only permission, set-id and sticky bits.
fn parse_mode(s: &str) -> Result<u32, String> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    match u32::from_str_radix(digits, 8) {
        Ok(m) if m <= 0o7777 => Ok(m),
        _ => Err(format!("{s:?} is not an octal file mode (e.g. 0755)")),
    }
}

fn table(rows: &[[String; 4]]) -> String {
    let mut widths = [0usize; 4];
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> CtlArgs {
        let argv = std::iter::once("weftctl").chain(args.iter().copied());
        CtlArgs::try_parse_args(argv.map(OsString::from)).expect("parses")
    }

    #[test]
    fn the_kube_flags_go_before_or_after_the_subcommand_and_pick_the_api() {
        let before = parse(&["-kube-subnet-mgr", "-kubeconfig-file=/k", "status"]);
        let after = parse(&[
            "status",
            "--kube-subnet-mgr",
            "--kubeconfig-file",
            "/k",
            "--node",
            "n1",
        ]);
        for a in [&before, &after] {
            let Store::Kube(k) = a.store() else {
                panic!("etcd picked: {a:?}")
            };
            assert_eq!(
                k.net_config,
                Path::new(KUBE_NET_CONFIG),
                "kube-flannel's place"
            );
            assert_eq!(k.args.kubeconfig_file.as_deref(), Some(Path::new("/k")));
            assert!(k.args.set_node_network_unavailable);
        }
        assert_eq!(after.node.as_deref(), Some("n1"));
        let a = parse(&[
            "doctor",
            "-kube-subnet-mgr=true",
            "-net-config-path=/etc/n.json",
            "-kube-annotation-prefix=example.com",
            "--set-node-network-unavailable=false",
        ]);
        let Store::Kube(k) = a.store() else {
            panic!("etcd picked")
        };
        assert_eq!(k.net_config, Path::new("/etc/n.json"));
        assert_eq!(k.args.kube_annotation_prefix, "example.com");
        assert!(!k.args.set_node_network_unavailable);
        assert!(matches!(parse(&["leases"]).store(), Store::Etcd(_)));
        assert!(matches!(
            parse(&["-kube-subnet-mgr=false", "leases"]).store(),
            Store::Etcd(_)
        ));
    }

    #[test]
    fn table_aligns_columns() {
        let rows = [
            ["A".to_string(), "BB".into(), "C".into(), "D".into()],
            ["aaa".to_string(), "b".into(), "cc".into(), "d".into()],
        ];
        assert_eq!(table(&rows), "A    BB  C   D\naaa  b   cc  d\n");
    }

    #[test]
    fn modes_are_octal() {
        assert_eq!(parse_mode("0755"), Ok(0o755));
        assert_eq!(parse_mode("644"), Ok(0o644));
        assert_eq!(parse_mode("0o600"), Ok(0o600));
        assert!(parse_mode("0789").is_err());
        assert!(parse_mode("17777").is_err());
        assert!(parse_mode("").is_err());
    }

    #[test]
    fn a_kept_config_is_compared_as_json_and_judged() {
        let key = "/coreos.com/network/config";
        let a = r#"{"Network":"10.244.0.0/16"}"#;
        assert_eq!(
            compare_configs(a, "{ \"Network\": \"10.244.0.0/16\" }\n", key),
            None
        );
        let note = compare_configs(a, r#"{"Network":"10.9.0.0/16"}"#, key).expect("differs");
        assert!(note.contains("differs") && note.contains(a), "{note}");
        let note = compare_configs("{oops", a, key).expect("differs");
        assert!(note.contains("not valid JSON"), "{note}");
    }
}
