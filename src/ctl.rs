//! weftctl: the admin tool. Network config, lease listing, and mk-docker-opts.sh's output.

use std::io::Read;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use crate::config::NetworkConfig;
use crate::docker_opts::DockerOpts;
use crate::flags::EtcdArgs;
use crate::store::Store;
use crate::{fsutil, subnet_env};

#[derive(Debug, Parser)]
#[command(
    name = "weftctl",
    version,
    about = "Administer a weft (flannel-compatible) network in etcd"
)]
pub struct CtlArgs {
    #[command(flatten)]
    pub etcd: EtcdArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Read or write the network config (`<prefix>/config`).
    #[command(subcommand)]
    Config(ConfigCommand),
    /// List leases: subnet, public IP, backend, time left.
    Leases,
    /// Write Docker options from subnet.env, exactly as flannel's mk-docker-opts.sh does.
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
    /// not, e.g. when Docker must be restarted to pick up a new bip).
    Status(crate::status::StatusArgs),
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate a config (a file, or - for standard input) and store it.
    Set { file: String },
    /// Print the stored config.
    Get,
}

pub async fn run(args: CtlArgs) -> Result<()> {
    match args.command {
        Command::Status(status) => crate::status::run(&args.etcd, &status).await,
        Command::DockerOpts {
            env_file,
            out,
            individual,
            combined,
            key,
            no_ip_masq,
        } => {
            let text = fsutil::read_optional(&env_file)?.unwrap_or_default();
            let opts = DockerOpts {
                individual,
                combined,
                combined_key: key.clone(),
                no_ip_masq,
            };
            let rendered = opts.render(
                &subnet_env::parse_vars(&text),
                std::env::var(&key).ok().as_deref(),
            )?;
            if out.as_os_str() == "-" {
                print!("{rendered}");
            } else {
                fsutil::write_atomic(&out, rendered.as_bytes(), 0o644)?;
            }
            Ok(())
        }
        Command::Config(ConfigCommand::Set { file }) => {
            let text = if file == "-" {
                let mut s = String::new();
                std::io::stdin()
                    .read_to_string(&mut s)
                    .context("read standard input")?;
                s
            } else {
                std::fs::read_to_string(&file).with_context(|| format!("read {file}"))?
            };
            // The same check and wording as weftd's, before anything is written: a config weftd
            // would refuse never reaches etcd. (Only what depends on a host's underlay, udp's MTU
            // against its interface, is left to each weftd.)
            let key = format!("{}/config", args.etcd.prefix());
            let config = NetworkConfig::parse_at(&text, &key)?;
            let store = Store::connect(&args.etcd).await?;
            store.put_config(text.trim()).await?;
            println!(
                "network {} (/{} subnets {}..{}, backend {}) stored at {}",
                config.network,
                config.subnet_len,
                config.subnet_min,
                config.subnet_max,
                config.backend.type_name(),
                store.config_key()
            );
            Ok(())
        }
        Command::Config(ConfigCommand::Get) => {
            let store = Store::connect(&args.etcd).await?;
            match store.get_config().await?.0 {
                Some(text) => {
                    println!("{text}");
                    Ok(())
                }
                None => bail!("no network config at {}", store.config_key()),
            }
        }
        Command::Leases => {
            let store = Store::connect(&args.etcd).await?;
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
                    match store.time_to_live(l.etcd_lease).await? {
                        Some(secs) => format_secs(secs),
                        None => "expired".to_string(),
                    }
                };
                let backend = if l.attrs.backend_type.is_empty() {
                    "-".into()
                } else {
                    l.attrs.backend_type.clone()
                };
                rows.push([
                    l.subnet.to_string(),
                    l.attrs.public_ip.to_string(),
                    backend,
                    expires,
                ]);
            }
            print!("{}", table(&rows));
            for b in &listing.bad {
                eprintln!("unreadable lease {}: {}", b.key, b.reason);
            }
            Ok(())
        }
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

/// `86399` → `23h59m59s`, Go's duration style.
pub fn format_secs(secs: i64) -> String {
    let (h, m, s) = (secs / 3600, secs % 3600 / 60, secs % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m{s}s"),
        _ => format!("{h}h{m}m{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_print_like_go() {
        assert_eq!(format_secs(86399), "23h59m59s");
        assert_eq!(format_secs(61), "1m1s");
        assert_eq!(format_secs(5), "5s");
    }

    #[test]
    fn table_aligns_columns() {
        let rows = [
            ["A".to_string(), "BB".into(), "C".into(), "D".into()],
            ["aaa".to_string(), "b".into(), "cc".into(), "d".into()],
        ];
        assert_eq!(table(&rows), "A    BB  C   D\naaa  b   cc  d\n");
    }
}
