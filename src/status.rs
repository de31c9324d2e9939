//! `weftctl status`: this host's view of its lease — subnet.env, the lease in etcd, Docker's
//! daemon.json and the docker0 bridge — and whether they agree. Gathering (files, etcd, netlink) is
//! kept apart from judging (`problems`), which is pure and unit-tested.
//!
//! Exit status: 0 when everything present agrees with subnet.env; 1 when something disagrees or
//! cannot be read (each problem is printed), e.g. "Docker must be restarted to pick up bip X".

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use ipnet::Ipv4Net;
use serde_json::Value;

use crate::escape::escape;
use crate::flags::EtcdArgs;
use crate::lease::format_secs;
use crate::registry::Registry;
use crate::{daemon_json, fsutil, subnet_env};

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
}

/// Everything that disagrees with subnet.env, one sentence each. Empty: consistent.
pub fn problems(v: &View) -> Vec<String> {
    let env = match &v.env {
        Ok(env) => env,
        Err(e) => return vec![e.clone()],
    };
    let gw = env.subnet;
    let mut out = Vec::new();
    match &v.lease {
        LeaseView::Found { .. } => {}
        LeaseView::Missing => out.push(format!(
            "etcd has no lease for {}: weftd is not running, or lost the lease and has not leased again",
            gw.trunc()
        )),
        LeaseView::Unknown(e) => out.push(format!("cannot read the lease from etcd: {e}")),
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
        line(
            "  mtu",
            env.mtu.map_or_else(|| "-".to_string(), |m| m.to_string()),
        );
        line("  ipmasq", env.ip_masq.clone());
    }
    line(
        "lease",
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
        },
    );
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
        let key = store.names().lease(subnet);
        let Some(Ok(lease)) = listing
            .records
            .into_iter()
            .find(|r| r.key == key)
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
pub async fn run(etcd: &EtcdArgs, args: &StatusArgs) -> Result<()> {
    let env = read_env(&args.subnet_file);
    let lease = match &env {
        Ok(e) => read_lease(etcd, e.subnet.trunc(), args.public_ip).await,
        Err(_) => LeaseView::Unknown("no subnet to look up".into()),
    };
    let view = View {
        subnet_file: args.subnet_file.clone(),
        env,
        lease,
        daemon_json_path: args.docker_daemon_json.clone(),
        daemon_json: read_daemon_json(&args.docker_daemon_json),
        bridge_name: args.bridge.clone(),
        bridge: read_bridge(&args.bridge).await,
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
}
