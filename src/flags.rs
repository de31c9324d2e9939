//! Command-line flags. weftd takes flanneld's flags as flanneld does: one or two dashes, `-flag=v`
//! or `-flag v`, and each from `FLANNELD_<FLAG>` in the environment.

use std::ffi::OsString;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::builder::BoolishValueParser;
use clap::error::ErrorKind;
use clap::parser::ValueSource;
use clap::{ArgAction, Args, CommandFactory, FromArgMatches, Parser};

/// Go's flag package takes `-name` as well as `--name`: rewrite the single-dash long form so clap
/// sees `--name`. Single-letter flags (`-f`, `-v`) and lone `-` are left alone.
pub fn normalize_args(args: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    let mut seen_double_dash = false;
    args.into_iter()
        .enumerate()
        .map(|(i, a)| {
            if i == 0 || seen_double_dash {
                return a;
            }
            let Some(s) = a.to_str() else { return a };
            if s == "--" {
                seen_double_dash = true;
                return a;
            }
            let name = s.strip_prefix('-').unwrap_or("");
            let bare = name.split('=').next().unwrap_or("");
            if !name.starts_with('-')
                && bare.len() > 1
                && bare.starts_with(|c: char| c.is_ascii_alphabetic())
            {
                OsString::from(format!("-{s}"))
            } else {
                a
            }
        })
        .collect()
}

/// flanneld ignores an empty `FLANNELD_*` variable; so do we, instead of parsing "" as a value
/// (an empty endpoint list, an empty prefix). Call before any thread starts.
pub fn drop_empty_flanneld_env() {
    let empty: Vec<_> = std::env::vars_os()
        .filter(|(k, v)| v.is_empty() && k.to_str().is_some_and(|k| k.starts_with("FLANNELD_")))
        .map(|(k, _)| k)
        .collect();
    for k in empty {
        std::env::remove_var(k);
    }
}

/// Parses a Go-style duration: `24h`, `90m`, `1h30m`, `45s`, `500ms`. Never panics: a value too
/// large for a `Duration` is an error like any other bad value.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not a duration (use e.g. 24h, 90m, 30s)");
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .ok_or_else(bad)?;
        let n: f64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let secs = match &rest[..unit_len] {
            "ms" => n / 1000.0,
            "s" => n,
            "m" => n * 60.0,
            "h" => n * 3600.0,
            _ => return Err(bad()),
        };
        total = Duration::try_from_secs_f64(secs)
            .ok()
            .and_then(|d| total.checked_add(d))
            .ok_or_else(|| format!("{s:?} is too long a duration"))?;
        rest = &rest[unit_len..];
    }
    Ok(total)
}

/// The shortest lease TTL: etcd's own minimum with its default timings (1.5 election timeouts,
/// rounded up to whole seconds). etcd silently raises a shorter TTL to it, and weftd renews at a
/// fraction of the TTL, so anything shorter would only make it hammer etcd with keep-alives.
pub const MIN_LEASE_TTL: Duration = Duration::from_secs(2);

/// The longest lease TTL: etcd refuses longer leases (`MaxLeaseTTL`, 9,000,000,000 s).
pub const MAX_LEASE_TTL: Duration = Duration::from_secs(9_000_000_000);

/// The largest renew margin: one that could still be shorter than the longest TTL. It keeps
/// `margin * 60` (seconds) far from overflowing.
pub const MAX_RENEW_MARGIN_MINUTES: u64 = MAX_LEASE_TTL.as_secs() / 60;

/// The longest pause between firewall checks: a day (rules deleted by hand stay missing at most
/// that long). Also keeps the interval far from overflowing a clock.
pub const MAX_IPTABLES_RESYNC_SECS: u64 = 86_400;

/// `--subnet-lease-ttl`: a duration etcd grants as it is, within [`MIN_LEASE_TTL`, `MAX_LEASE_TTL`].
pub fn parse_lease_ttl(s: &str) -> Result<Duration, String> {
    let ttl = parse_duration(s)?;
    if ttl < MIN_LEASE_TTL {
        return Err(format!(
            "{s:?} is shorter than {}s, etcd's minimum lease TTL",
            MIN_LEASE_TTL.as_secs()
        ));
    }
    if ttl > MAX_LEASE_TTL {
        return Err(format!(
            "{s:?} is longer than {}s, etcd's maximum lease TTL",
            MAX_LEASE_TTL.as_secs()
        ));
    }
    Ok(ttl)
}

/// How to reach etcd; the same for weftd and weftctl. Global, so weftctl takes them before or
/// after its subcommand (weftd has none: there it changes nothing). The pairs (key and
/// certificate, user and password) are checked by [`EtcdArgs::check`] once the values given
/// before and after a subcommand are merged: clap's own `requires` judges each level alone. Their
/// own heading in `--help` keeps them apart from a subcommand's flags.
#[derive(Debug, Clone, Args)]
pub struct EtcdArgs {
    /// Comma-separated etcd endpoints.
    #[arg(
        long,
        global = true,
        help_heading = "etcd",
        env = "FLANNELD_ETCD_ENDPOINTS",
        value_delimiter = ',',
        // One flag, one list (flanneld's is a string): a repeated flag replaces it, last wins.
        action = ArgAction::Set,
        default_value = "http://127.0.0.1:4001,http://127.0.0.1:2379"
    )]
    pub etcd_endpoints: Vec<String>,
    /// The etcd prefix holding `config` and `subnets/`.
    #[arg(
        long,
        global = true,
        help_heading = "etcd",
        env = "FLANNELD_ETCD_PREFIX",
        default_value = "/coreos.com/network"
    )]
    pub etcd_prefix: String,
    /// TLS client key file (with -etcd-certfile: one without the other would silently connect
    /// without a client certificate).
    #[arg(
        long,
        global = true,
        help_heading = "etcd",
        env = "FLANNELD_ETCD_KEYFILE",
        value_name = "FILE"
    )]
    pub etcd_keyfile: Option<PathBuf>,
    /// TLS client certificate file (with -etcd-keyfile).
    #[arg(
        long,
        global = true,
        help_heading = "etcd",
        env = "FLANNELD_ETCD_CERTFILE",
        value_name = "FILE"
    )]
    pub etcd_certfile: Option<PathBuf>,
    /// TLS CA file.
    #[arg(
        long,
        global = true,
        help_heading = "etcd",
        env = "FLANNELD_ETCD_CAFILE",
        value_name = "FILE"
    )]
    pub etcd_cafile: Option<PathBuf>,
    /// etcd user name (with -etcd-password-file or -etcd-password: a user without a password
    /// would silently connect without authenticating).
    #[arg(
        long,
        global = true,
        help_heading = "etcd",
        env = "FLANNELD_ETCD_USERNAME"
    )]
    pub etcd_username: Option<String>,
    /// etcd password (with -etcd-username). Anyone on the host sees it in `ps`: prefer
    /// -etcd-password-file.
    #[arg(
        long,
        global = true,
        help_heading = "etcd",
        env = "FLANNELD_ETCD_PASSWORD",
        hide_env_values = true
    )]
    pub etcd_password: Option<String>,
    /// File holding the etcd password (with -etcd-username; not with -etcd-password): its
    /// content, less one trailing newline. Keeps the password out of `ps` and the environment.
    #[arg(
        long,
        global = true,
        help_heading = "etcd",
        env = "FLANNELD_ETCD_PASSWORD_FILE",
        value_name = "FILE"
    )]
    pub etcd_password_file: Option<PathBuf>,
}

impl EtcdArgs {
    /// The prefix without a trailing slash, so `{prefix}/config` is always one slash.
    pub fn prefix(&self) -> &str {
        self.etcd_prefix.trim_end_matches('/')
    }

    /// Checks the flags that only work together: a key with a certificate, a user with exactly
    /// one password. `cmd` formats the error as clap's own.
    pub fn check(&self, cmd: &mut clap::Command) -> Result<(), clap::Error> {
        let missing = |cmd: &mut clap::Command, given: &str, needed: &str, why: &str| {
            cmd.error(
                ErrorKind::MissingRequiredArgument,
                format!("{given} needs {needed}: {why}"),
            )
        };
        let no_cert = "one without the other would connect without a client certificate";
        match (&self.etcd_keyfile, &self.etcd_certfile) {
            (Some(_), None) => {
                return Err(missing(cmd, "--etcd-keyfile", "--etcd-certfile", no_cert))
            }
            (None, Some(_)) => {
                return Err(missing(cmd, "--etcd-certfile", "--etcd-keyfile", no_cert))
            }
            _ => {}
        }
        let no_auth = "a user name and a password go together, or etcd is reached without \
                       authenticating";
        match (
            self.etcd_username.is_some(),
            self.etcd_password.is_some(),
            self.etcd_password_file.is_some(),
        ) {
            (_, true, true) => Err(cmd.error(
                ErrorKind::ArgumentConflict,
                "--etcd-password (FLANNELD_ETCD_PASSWORD) and --etcd-password-file \
                 (FLANNELD_ETCD_PASSWORD_FILE) cannot be used together: give the password once",
            )),
            (true, false, false) => Err(missing(
                cmd,
                "--etcd-username",
                "--etcd-password-file (or --etcd-password)",
                no_auth,
            )),
            (false, true, false) => {
                Err(missing(cmd, "--etcd-password", "--etcd-username", no_auth))
            }
            (false, false, true) => Err(missing(
                cmd,
                "--etcd-password-file",
                "--etcd-username",
                no_auth,
            )),
            _ => Ok(()),
        }
    }

    /// The etcd password: -etcd-password's, or -etcd-password-file's content less one trailing
    /// newline (what `echo` and editors leave; `\r\n` too). Read at every call, so a replaced
    /// file (a rotated Kubernetes Secret) counts from the next connection. An unreadable or
    /// empty file is an error naming it: an empty password is never what was meant.
    pub fn password(&self) -> anyhow::Result<Option<String>> {
        if let Some(password) = &self.etcd_password {
            return Ok(Some(password.clone()));
        }
        let Some(path) = &self.etcd_password_file else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("read the etcd password file {}", path.display()))?;
        let password = match text.strip_suffix('\n') {
            Some(line) => line.strip_suffix('\r').unwrap_or(line),
            None => &text,
        };
        if password.is_empty() {
            bail!("the etcd password file {} is empty", path.display());
        }
        Ok(Some(password.to_string()))
    }
}

/// weftd: flanneld's flags, plus weft's own. A flag given twice takes the last value, as Go's
/// flag package does: packaged units put fixed flags before `$FLANNEL_OPTIONS`, which may repeat
/// one. (`args_override_self` covers every single-valued flag, booleans and `-v` included; the
/// lists, -iface and -iface-regex, keep accumulating as flanneld's do.)
/// The Kubernetes API as the lease store (flanneld's kube subnet manager).
/// Global, as [`EtcdArgs`] are, so weftctl takes them before or after its subcommand.
#[derive(Debug, Clone, Args)]
pub struct KubeArgs {
    /// Lease from the Kubernetes API instead of etcd: this node's spec.podCIDR, published with
    /// flannel's annotations on its Node (named by NODE_NAME, or POD_NAME and POD_NAMESPACE).
    #[arg(long, env = "FLANNELD_KUBE_SUBNET_MGR", num_args = 0..=1, require_equals = true,
          default_value = "false", default_missing_value = "true",
          value_parser = BoolishValueParser::new(), global = true, help_heading = "Kubernetes")]
    pub kube_subnet_mgr: bool,
    /// The API server's URL (default: the kubeconfig's, or the pod's KUBERNETES_SERVICE_HOST).
    #[arg(
        long,
        env = "FLANNELD_KUBE_API_URL",
        global = true,
        help_heading = "Kubernetes"
    )]
    pub kube_api_url: Option<String>,
    /// A kubeconfig to connect with (default: the pod's service account).
    #[arg(
        long,
        env = "FLANNELD_KUBECONFIG_FILE",
        global = true,
        help_heading = "Kubernetes"
    )]
    pub kubeconfig_file: Option<PathBuf>,
    /// The prefix of the annotations weft reads and writes on Nodes.
    #[arg(long, env = "FLANNELD_KUBE_ANNOTATION_PREFIX", global = true, help_heading = "Kubernetes",
          default_value = crate::registry::kube::DEFAULT_PREFIX, value_parser = parse_annotation_prefix)]
    pub kube_annotation_prefix: String,
    /// Mark the node's network available (NetworkUnavailable=False) once its data plane is up.
    #[arg(long, env = "FLANNELD_SET_NODE_NETWORK_UNAVAILABLE", num_args = 0..=1,
          require_equals = true, default_value = "true", default_missing_value = "true",
          value_parser = BoolishValueParser::new(), global = true, help_heading = "Kubernetes")]
    pub set_node_network_unavailable: bool,
}

/// kube-flannel's place for the network config.
pub const KUBE_NET_CONFIG: &str = "/etc/kube-flannel/net-conf.json";

/// An annotation prefix the API accepts: a DNS subdomain (lower-case letters, digits, '-' and
/// '.', at most 253 characters).
fn parse_annotation_prefix(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    ok.then(|| s.to_string()).ok_or_else(|| {
        "not a DNS subdomain (lower-case letters, digits, '-' and '.'), as annotation prefixes must be"
            .to_string()
    })
}

#[derive(Debug, Clone, Parser)]
#[command(
    name = "weftd",
    disable_version_flag = true,
    args_override_self = true,
    about = "weft agent: leases a subnet for this host from etcd and routes between hosts"
)]
pub struct DaemonArgs {
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// Interface (name or IPv4 address) for inter-host traffic; repeatable, first match wins.
    #[arg(long, env = "FLANNELD_IFACE", value_delimiter = ',')]
    pub iface: Vec<String>,
    /// Regex matched against interface names and addresses; repeatable.
    #[arg(long, env = "FLANNELD_IFACE_REGEX")]
    pub iface_regex: Vec<String>,
    /// Use the interface (and source address) of the route to this address, when neither -iface
    /// nor -iface-regex is given.
    #[arg(long, env = "FLANNELD_IFACE_CAN_REACH")]
    pub iface_can_reach: Option<Ipv4Addr>,
    /// The address other hosts use to reach this one (default: the interface's address).
    #[arg(long, env = "FLANNELD_PUBLIC_IP")]
    pub public_ip: Option<Ipv4Addr>,
    /// Read the network config from this file instead of etcd's `<prefix>/config` (with
    /// -kube-subnet-mgr: always, by default /etc/kube-flannel/net-conf.json).
    #[arg(long, env = "FLANNELD_NET_CONFIG_PATH")]
    pub net_config_path: Option<PathBuf>,
    /// Where to write the lease's environment for CNI and Docker.
    #[arg(
        long,
        env = "FLANNELD_SUBNET_FILE",
        default_value = "/run/flannel/subnet.env"
    )]
    pub subnet_file: PathBuf,
    /// Renew the lease this many minutes before it expires. Given, it must be less than the TTL;
    /// by default (60) a TTL of an hour or less is renewed at a third of it.
    #[arg(long, env = "FLANNELD_SUBNET_LEASE_RENEW_MARGIN", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..=MAX_RENEW_MARGIN_MINUTES))]
    pub subnet_lease_renew_margin: u64,
    /// Lifetime of a lease in etcd, 2s or more (weft; flannel fixes it at 24h).
    #[arg(long, env = "FLANNELD_SUBNET_LEASE_TTL", default_value = "24h", value_parser = parse_lease_ttl)]
    pub subnet_lease_ttl: Duration,
    /// Masquerade traffic leaving the network.
    #[arg(long, env = "FLANNELD_IP_MASQ", num_args = 0..=1, require_equals = true,
          default_value = "false", default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub ip_masq: bool,
    /// Don't use --random-fully in the MASQUERADE rules.
    #[arg(long, env = "FLANNELD_IP_MASQ_FULLY_RANDOM_DISABLE", num_args = 0..=1, require_equals = true,
          default_value = "false", default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub ip_masq_fully_random_disable: bool,
    /// Seconds between checks of the firewall rules.
    #[arg(long, env = "FLANNELD_IPTABLES_RESYNC", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(..=MAX_IPTABLES_RESYNC_SECS))]
    pub iptables_resync: u64,
    /// Add FORWARD accept rules for the network.
    #[arg(long, env = "FLANNELD_IPTABLES_FORWARD_RULES", num_args = 0..=1, require_equals = true,
          default_value = "true", default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub iptables_forward_rules: bool,
    /// Address for /healthz and /readyz.
    #[arg(long, env = "FLANNELD_HEALTHZ_IP", default_value = "0.0.0.0")]
    pub healthz_ip: Ipv4Addr,
    /// Port for /healthz and /readyz (0: off).
    #[arg(long, env = "FLANNELD_HEALTHZ_PORT", default_value_t = 0)]
    pub healthz_port: u16,
    /// Docker's daemon.json to write `bip` and `mtu` into ("" turns it off).
    #[arg(
        long,
        env = "FLANNELD_DOCKER_DAEMON_JSON",
        default_value = "/etc/docker/daemon.json"
    )]
    pub docker_daemon_json: String,
    #[command(flatten)]
    pub kube: KubeArgs,
    /// The IPv6 address peers reach this host's IPv6 subnet at (dual-stack networks; default:
    /// the interface's first global IPv6 address).
    #[arg(long, env = "FLANNELD_PUBLIC_IPV6")]
    pub public_ipv6: Option<std::net::Ipv6Addr>,
    /// Log verbosity as flanneld's -v: 0-3 info, 4+ debug, 6+ trace.
    #[arg(short = 'v', long = "v", env = "FLANNELD_V", default_value_t = 0)]
    pub verbosity: u8,
    /// Print the version and exit.
    #[arg(long, num_args = 0..=1, require_equals = true, default_value = "false",
          default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub version: bool,
}

impl DaemonArgs {
    /// Parses from the process's arguments and environment; on a bad flag prints why and exits.
    pub fn from_env() -> Self {
        drop_empty_flanneld_env();
        Self::try_parse_args(std::env::args_os()).unwrap_or_else(|e| e.exit())
    }

    /// Parses flanneld-style arguments (and `FLANNELD_*`), then checks the flags against each
    /// other.
    pub fn try_parse_args(args: impl IntoIterator<Item = OsString>) -> Result<Self, clap::Error> {
        let matches = Self::command().try_get_matches_from(normalize_args(args))?;
        let mut parsed = Self::from_arg_matches(&matches)?;
        parsed.etcd.check(&mut Self::command())?;
        if parsed.kube.kube_subnet_mgr && parsed.net_config_path.is_none() {
            parsed.net_config_path = Some(PathBuf::from(KUBE_NET_CONFIG));
        }
        // weftd retries etcd forever: a password file it cannot use would only show up as
        // endless failed connections, so it stops here instead, naming the file.
        if let Err(e) = parsed.etcd.password() {
            return Err(Self::command().error(ErrorKind::ValueValidation, format!("{e:#}")));
        }
        let margin_given = !matches!(
            matches.value_source("subnet_lease_renew_margin"),
            None | Some(ValueSource::DefaultValue)
        );
        let margin = Duration::from_secs(parsed.subnet_lease_renew_margin * 60);
        if margin_given && margin >= parsed.subnet_lease_ttl {
            return Err(Self::command().error(
                ErrorKind::ArgumentConflict,
                format!(
                    "--subnet-lease-renew-margin={} (minutes) must be less than \
                     --subnet-lease-ttl ({}s): the lease would be renewed before it was granted",
                    parsed.subnet_lease_renew_margin,
                    parsed.subnet_lease_ttl.as_secs()
                ),
            ));
        }
        Ok(parsed)
    }

    /// `None` when daemon.json handling is turned off.
    pub fn daemon_json(&self) -> Option<&std::path::Path> {
        (!self.docker_daemon_json.is_empty())
            .then(|| std::path::Path::new(&self.docker_daemon_json))
    }
}

#[cfg(test)]
mod tests;
