//! Debian's etcd as a private server: one member on random loopback ports, or a cluster of one or
//! more members inside a lab's switch namespace. Members are killed by PID in `Drop`.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::cmd;
use crate::netns::Netns;
use crate::wait::{free_port, wait_for};

/// The flags of one member of a static cluster (`cluster` is etcd's `--initial-cluster`).
pub fn member_args(
    name: &str,
    data_dir: &Path,
    client_url: &str,
    peer_url: &str,
    cluster: &str,
) -> Vec<String> {
    [
        "--name",
        name,
        "--data-dir",
        &data_dir.display().to_string(),
        "--listen-client-urls",
        client_url,
        "--advertise-client-urls",
        client_url,
        "--listen-peer-urls",
        peer_url,
        "--initial-advertise-peer-urls",
        peer_url,
        "--initial-cluster",
        cluster,
        // Info, not less: leader elections and members lost are what a failed test's printed
        // log (crate::logs) has to show.
        "--log-level",
        "info",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect()
}

/// The flags of a one-member cluster.
pub fn etcd_args(name: &str, data_dir: &Path, client_url: &str, peer_url: &str) -> Vec<String> {
    member_args(
        name,
        data_dir,
        client_url,
        peer_url,
        &format!("{name}={peer_url}"),
    )
}

struct Member {
    child: Option<Child>,
    cmd: Vec<String>,
}

/// A private etcd.
pub struct Etcd {
    members: Vec<Member>,
    /// Client URLs, comma-separated, as `-etcd-endpoints` takes them.
    pub endpoint: String,
    /// The first member's client port.
    pub port: u16,
    /// The namespace etcdctl must run in (None: this one).
    ns: Option<String>,
    dir: TempDir,
}

impl Etcd {
    /// One member on random loopback ports; no root needed.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// One member on random loopback ports, with etcd flags of the test's own (limits).
    pub fn start_with(extra: &[&str]) -> Self {
        let port = free_port();
        let client = format!("http://127.0.0.1:{port}");
        let peer = format!("http://127.0.0.1:{}", free_port());
        let mut etcd = Self::prepare(None, vec![("weft-test".into(), client, peer)], port);
        etcd.members[0]
            .cmd
            .extend(extra.iter().map(|a| a.to_string()));
        etcd.start_all();
        etcd
    }

    /// A cluster with one member per address in `ips` (which must be on `ns`'s interfaces),
    /// clients on port 2379.
    pub fn start_in(ns: &Netns, ips: &[Ipv4Addr]) -> Self {
        let members = ips
            .iter()
            .enumerate()
            .map(|(i, ip)| {
                (
                    format!("m{i}"),
                    format!("http://{ip}:2379"),
                    format!("http://{ip}:2380"),
                )
            })
            .collect();
        Self::launch(Some(ns.name.clone()), members, 2379)
    }

    fn launch(ns: Option<String>, spec: Vec<(String, String, String)>, port: u16) -> Self {
        let mut etcd = Self::prepare(ns, spec, port);
        etcd.start_all();
        etcd
    }

    /// The members' command lines, none started yet.
    fn prepare(ns: Option<String>, spec: Vec<(String, String, String)>, port: u16) -> Self {
        let dir = tempfile::tempdir().expect("etcd dir");
        let cluster = spec
            .iter()
            .map(|(n, _, p)| format!("{n}={p}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut etcd = Etcd {
            members: Vec::new(),
            endpoint: spec
                .iter()
                .map(|(_, c, _)| c.as_str())
                .collect::<Vec<_>>()
                .join(","),
            port,
            ns,
            dir,
        };
        for (name, client, peer) in &spec {
            let mut argv = Vec::new();
            if let Some(ns) = &etcd.ns {
                argv.extend(["ip".to_string(), "netns".into(), "exec".into(), ns.clone()]);
            }
            argv.push("etcd".into());
            argv.extend(member_args(
                name,
                &etcd.dir.path().join(name),
                client,
                peer,
                &cluster,
            ));
            etcd.members.push(Member {
                child: None,
                cmd: argv,
            });
        }
        etcd
    }

    fn start_all(&mut self) {
        for i in 0..self.members.len() {
            self.start_member(i);
        }
        wait_for("etcd to answer", Duration::from_secs(30), || {
            self.ctl(&["endpoint", "health"])
                .status
                .success()
                .then_some(())
        });
    }

    /// (Re)starts member `i` with its data dir as it was: an outage ends.
    pub fn start_member(&mut self, i: usize) {
        let m = &mut self.members[i];
        assert!(m.child.is_none(), "etcd member {i} already runs");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("etcd{i}.log")))
            .expect("etcd log");
        let child = Command::new(&m.cmd[0])
            .args(&m.cmd[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start etcd (apt-get install etcd-server)");
        m.child = Some(child);
    }

    /// Kills member `i` (SIGKILL, by PID): a crashed or partitioned member.
    pub fn kill_member(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops member `i` (SIGSTOP, by PID): it keeps its connections open but answers nothing, as
    /// a hung or overloaded server does. [`Etcd::resume_member`] ends it.
    pub fn pause_member(&self, i: usize) {
        self.signal_member(i, libc::SIGSTOP);
    }

    /// Lets a paused member run on (SIGCONT).
    pub fn resume_member(&self, i: usize) {
        self.signal_member(i, libc::SIGCONT);
    }

    fn signal_member(&self, i: usize, sig: libc::c_int) {
        let c = self.members[i].child.as_ref().expect("etcd member runs");
        let pid = libc::pid_t::try_from(c.id()).expect("pid");
        // SAFETY: a signal to a child this lab started, by its PID (not yet reaped: it is ours).
        let rc = unsafe { libc::kill(pid, sig) };
        assert_eq!(rc, 0, "signal {sig} to etcd member {i}");
    }

    /// The client URL of member `i` alone.
    pub fn member_endpoint(&self, i: usize) -> &str {
        self.endpoint.split(',').nth(i).expect("member index")
    }

    /// How many watchers member `i` serves now (its `etcd_debugging_mvcc_watcher_total`): a
    /// client's watch lives on the one member it talks to. None when the member does not answer.
    pub fn watchers(&self, i: usize) -> Option<u64> {
        let addr = self
            .member_endpoint(i)
            .trim_start_matches("http://")
            .to_string();
        let scrape = move || -> Option<String> {
            use std::io::{Read, Write};
            let sa = addr.parse().ok()?;
            let mut s = std::net::TcpStream::connect_timeout(&sa, Duration::from_secs(2)).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
            s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").ok()?;
            let mut text = String::new();
            s.read_to_string(&mut text).ok()?;
            Some(text)
        };
        let text = match &self.ns {
            Some(ns) => {
                let ns = ns.clone();
                std::thread::spawn(move || {
                    crate::netns::enter(&ns);
                    scrape()
                })
                .join()
                .ok()
                .flatten()
            }
            None => scrape(),
        }?;
        text.lines()
            .find_map(|l| l.strip_prefix("etcd_debugging_mvcc_watcher_total "))
            .and_then(|v| v.trim().parse().ok())
    }

    /// Runs etcdctl against the cluster (in its namespace), under a time limit.
    pub fn ctl(&self, args: &[&str]) -> Output {
        let mut c = match &self.ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "etcdctl"]);
                c
            }
            None => Command::new("etcdctl"),
        };
        c.env("ETCDCTL_API", "3")
            .args(["--endpoints", &self.endpoint, "--command-timeout=5s"])
            .args(args);
        cmd::output(&mut c, Duration::from_secs(20))
    }

    /// etcdctl that must succeed; stdout.
    pub fn ctl_ok(&self, args: &[&str]) -> String {
        let out = self.ctl(args);
        assert!(
            out.status.success(),
            "etcdctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn put(&self, key: &str, value: &str) {
        self.ctl_ok(&["put", key, value]);
    }

    /// Grants an etcd lease of `ttl` seconds; its id.
    pub fn grant(&self, ttl: u64) -> String {
        let text = self.ctl_ok(&["lease", "grant", &ttl.to_string()]);
        text.split_whitespace()
            .nth(1)
            .expect("lease id in etcdctl output")
            .to_string()
    }

    /// Puts with a fresh etcd lease of `ttl` seconds, as an agent would.
    pub fn put_leased(&self, key: &str, value: &str, ttl: u64) {
        let id = self.grant(ttl);
        self.ctl_ok(&["put", "--lease", &id, key, value]);
    }

    pub fn get(&self, key: &str) -> Option<String> {
        let out = self.ctl(&["get", "--print-value-only", key]);
        let v = String::from_utf8_lossy(&out.stdout).trim_end().to_string();
        (!v.is_empty()).then_some(v)
    }

    /// `(key, value, lease id)` of everything under `prefix`.
    pub fn list(&self, prefix: &str) -> Vec<(String, String, i64)> {
        let out = self.ctl(&["get", "--prefix", prefix, "-w", "json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("etcdctl json");
        let b64 = |s: &serde_json::Value| {
            String::from_utf8(base64_decode(s.as_str().unwrap_or(""))).expect("utf8")
        };
        v["kvs"]
            .as_array()
            .map(|kvs| {
                kvs.iter()
                    .map(|kv| {
                        (
                            b64(&kv["key"]),
                            b64(&kv["value"]),
                            kv["lease"].as_i64().unwrap_or(0),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn del(&self, key: &str) {
        self.ctl_ok(&["del", key]);
    }

    pub fn revision(&self) -> i64 {
        let out = self.ctl(&["get", "/", "-w", "json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        v["header"]["revision"].as_i64().expect("revision")
    }

    pub fn compact(&self) {
        let rev = self.revision();
        self.ctl_ok(&["compact", &rev.to_string(), "--physical"]);
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill_member(i);
        }
        crate::logs::print_if_panicking(self.dir.path(), 1);
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    const T: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes().filter(|c| *c != b'=') {
        let Some(v) = T.iter().position(|t| *t == c) else {
            continue;
        };
        acc = (acc << 6) | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}
