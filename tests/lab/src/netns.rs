//! Named network namespaces: unique per lab, removed in `Drop`.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Once;
use std::time::Duration;

use serde_json::{json, Value};

use crate::cmd::{self, must, sh};
use crate::json::{entries, parse};

/// Every name a lab gives the machine starts with this, then the test process's PID.
const TAG: &str = "wl";

/// A prefix no other lab (in this process or another) uses: `wl<pid>n<k>`.
pub fn unique_prefix() -> String {
    static SWEEP: Once = Once::new();
    SWEEP.call_once(sweep_stale);
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{TAG}{}n{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

/// Removes namespaces a killed test process left (its PID is gone): Drop never ran for them.
fn sweep_stale() {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for name in dir
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
    {
        let Some(rest) = name.strip_prefix(TAG) else {
            continue;
        };
        let pid: String = rest.chars().take_while(char::is_ascii_digit).collect();
        let ours = rest[pid.len()..].starts_with('n');
        if ours && !pid.is_empty() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = sh(&["ip", "netns", "del", &name]);
        }
    }
}

/// A named network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Creates `name` with loopback up.
    pub fn new(name: impl Into<String>) -> Self {
        let name = name.into();
        must(&["ip", "netns", "add", &name]);
        let ns = Self { name };
        ns.ip("link set lo up");
        ns
    }

    /// `ip -n <ns> <args>`, which must succeed; stdout.
    pub fn ip(&self, args: &str) -> String {
        let mut v = vec!["ip", "-n", &self.name];
        v.extend(args.split_whitespace());
        must(&v)
    }

    /// `ip -n <ns> <args>`, which may fail: (success, stdout, stderr).
    pub fn try_ip(&self, args: &str) -> (bool, String, String) {
        let mut v = vec!["ip", "-n", &self.name];
        v.extend(args.split_whitespace());
        sh(&v)
    }

    /// `ip -n <ns> -j <args>`, parsed.
    pub fn ip_json(&self, args: &str) -> Value {
        let mut v = vec!["ip", "-n", &self.name, "-j"];
        v.extend(args.split_whitespace());
        parse(&must(&v))
    }

    /// A command that runs `program` inside the namespace (`ip netns exec`), for callers that
    /// need their own stdio or a longer life than [`cmd::TIMEOUT`].
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Starts a long-lived program (a server) inside the namespace, output discarded; the caller
    /// ends it by the returned child's PID.
    pub fn spawn(&self, args: &[&str]) -> std::process::Child {
        self.command(args[0])
            .args(&args[1..])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {args:?} in {}: {e}", self.name))
    }

    /// Runs a program inside the namespace under a time limit: (success, stdout, stderr).
    pub fn exec(&self, args: &[&str]) -> (bool, String, String) {
        self.exec_for(args, cmd::TIMEOUT)
    }

    /// [`Netns::exec`] with its own time limit.
    pub fn exec_for(&self, args: &[&str], limit: Duration) -> (bool, String, String) {
        let out = cmd::output(self.command(args[0]).args(&args[1..]), limit);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Runs a program inside the namespace that must succeed; stdout.
    pub fn must(&self, args: &[&str]) -> String {
        let (ok, out, err) = self.exec(args);
        assert!(ok, "{args:?} in {} failed: {out}{err}", self.name);
        out
    }

    /// IPv4 routes of the main table, sorted by destination.
    pub fn routes_json(&self) -> Vec<Value> {
        let mut v = entries(self.ip_json("-4 route show table main"));
        v.sort_by_key(|r| r["dst"].to_string());
        v
    }

    /// IPv6 routes of the main table, sorted by destination (each up device's fe80::/64 included).
    pub fn routes6_json(&self) -> Vec<Value> {
        let mut v = entries(self.ip_json("-6 route show table main"));
        v.sort_by_key(|r| r["dst"].to_string());
        v
    }

    /// Routes weft owns (protocol 87), sorted by destination.
    pub fn weft_routes(&self) -> Vec<Value> {
        let mut v = self.routes_json();
        v.retain(|r| r["protocol"] == "87");
        v
    }

    /// The route to `dst` (e.g. "10.244.2.0/24"), if any.
    pub fn route(&self, dst: &str) -> Option<Value> {
        self.routes_json().into_iter().find(|r| r["dst"] == dst)
    }

    /// Every nexthop object (Linux 5.3+; none on older kernels), sorted by id.
    pub fn nexthops_json(&self) -> Vec<Value> {
        let (ok, out, _) = self.try_ip("-j nexthop show");
        if !ok {
            return Vec::new();
        }
        let mut v = entries(parse(&out));
        v.sort_by_key(|n| n["id"].as_u64());
        v
    }

    /// Permanent neighbours on `dev`, sorted by address.
    pub fn neighbours(&self, dev: &str) -> Vec<Value> {
        let mut v = entries(self.ip_json(&format!("neigh show dev {dev} nud permanent")));
        v.sort_by_key(|n| n["dst"].to_string());
        v
    }

    /// FDB entries of `dev` that point at a remote (`dst`), sorted by MAC.
    pub fn fdb(&self, dev: &str) -> Vec<Value> {
        let out = must(&["bridge", "-n", &self.name, "-j", "fdb", "show", "dev", dev]);
        let mut v = entries(parse(&out));
        v.retain(|e| e.get("dst").is_some());
        v.sort_by_key(|e| e["mac"].to_string());
        v
    }

    /// A device's details (`ip -d -j link show dev`), or None when it does not exist.
    pub fn link(&self, dev: &str) -> Option<Value> {
        let (ok, out, _) = self.try_ip(&format!("-d -j link show dev {dev}"));
        if !ok {
            return None;
        }
        entries(parse(&out)).into_iter().next()
    }

    /// Everything weft could have touched around `dev`, for before/after comparisons.
    pub fn kernel_dump(&self, dev: &str) -> Value {
        let mut link = self.link(dev).unwrap_or(Value::Null);
        // Counters and carrier state are not configuration.
        if let Some(o) = link.as_object_mut() {
            o.remove("operstate");
        }
        json!({
            "routes": self.routes_json(),
            "nexthops": self.nexthops_json(),
            "neigh": self.neighbours(dev),
            "fdb": self.fdb(dev),
            "link": link,
            "addr": self.ip_json(&format!("-4 addr show dev {dev}")),
        })
    }

    /// Runs `f` on a thread that has entered this namespace; sockets it makes live here.
    pub fn run_in<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let name = self.name.as_str();
        std::thread::scope(|s| {
            s.spawn(|| {
                enter(name);
                f()
            })
            .join()
            .expect("thread in namespace")
        })
    }

    /// `/run/netns/<name>`, for `nsenter --net=`.
    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = sh(&["ip", "netns", "del", &self.name]);
    }
}

/// Enters namespace `name` on the current thread (network namespaces are per thread).
pub fn enter(name: &str) {
    let f = File::open(format!("/run/netns/{name}")).expect("open netns");
    // SAFETY: setns on this thread only, with a namespace fd held open for the call.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {name}: {}", std::io::Error::last_os_error());
}
