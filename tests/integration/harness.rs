//! Test harness: a real etcd on random loopback ports, real weftd/weftctl processes, and a TCP
//! proxy that can cut the agents off from etcd. Everything is killed and removed in Drop.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// Polls `f` until it returns `Some`, or panics with `what` after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

/// The flags of a one-member etcd cluster: name, data dir, client and peer URLs, quiet logs.
pub fn etcd_args(name: &str, data_dir: &Path, client_url: &str, peer_url: &str) -> Vec<String> {
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
        &format!("{name}={peer_url}"),
        "--log-level",
        "error",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect()
}

/// A private etcd server.
pub struct Etcd {
    child: Child,
    pub endpoint: String,
    pub port: u16,
    _dir: TempDir,
}

impl Etcd {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let peer = free_port();
        let client_url = format!("http://127.0.0.1:{port}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log = std::fs::File::create(dir.path().join("etcd.log")).expect("etcd log");
        let child = Command::new("etcd")
            .args(etcd_args(
                "weft-test",
                &dir.path().join("data"),
                &client_url,
                &peer_url,
            ))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start etcd (apt-get install etcd-server)");
        let etcd = Etcd {
            child,
            endpoint: client_url,
            port,
            _dir: dir,
        };
        wait_for("etcd to answer", Duration::from_secs(20), || {
            etcd.ctl(&["endpoint", "health"])
                .status
                .success()
                .then_some(())
        });
        etcd
    }

    /// Runs etcdctl against this server.
    pub fn ctl(&self, args: &[&str]) -> Output {
        Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &self.endpoint, "--command-timeout=5s"])
            .args(args)
            .output()
            .expect("run etcdctl")
    }

    pub fn put(&self, key: &str, value: &str) {
        let out = self.ctl(&["put", key, value]);
        assert!(
            out.status.success(),
            "etcdctl put {key}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Puts with a fresh etcd lease of `ttl` seconds, as an agent would.
    pub fn put_leased(&self, key: &str, value: &str, ttl: u64) {
        let out = self.ctl(&["lease", "grant", &ttl.to_string()]);
        let text = String::from_utf8_lossy(&out.stdout);
        let id = text.split_whitespace().nth(1).expect("lease id");
        let out = self.ctl(&["put", "--lease", id, key, value]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
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
            let s = s.as_str().unwrap_or("");
            String::from_utf8(base64_decode(s)).expect("utf8")
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
        assert!(self.ctl(&["del", key]).status.success());
    }

    pub fn revision(&self) -> i64 {
        let out = self.ctl(&["get", "/", "-w", "json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        v["header"]["revision"].as_i64().expect("revision")
    }

    pub fn compact(&self) {
        let rev = self.revision();
        let out = self.ctl(&["compact", &rev.to_string(), "--physical"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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

/// One weftd process with its own files.
pub struct Weftd {
    child: Option<Child>,
    pub dir: PathBuf,
    log: PathBuf,
}

/// How to start a weftd.
pub struct WeftdSpec {
    pub endpoint: String,
    pub prefix: String,
    pub public_ip: Ipv4Addr,
    pub dir: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// `-iface` value; loopback by default so no root is needed for the alloc backend.
    pub iface: String,
    /// Pass the settings as FLANNELD_* variables instead of flags.
    pub via_env: bool,
}

impl WeftdSpec {
    pub fn new(etcd: &Etcd, prefix: &str, public_ip: Ipv4Addr, dir: &Path) -> Self {
        Self::new_raw(&etcd.endpoint, prefix, public_ip, dir)
    }

    /// For an etcd the harness did not start (TLS, proxies).
    pub fn new_raw(endpoint: &str, prefix: &str, public_ip: Ipv4Addr, dir: &Path) -> Self {
        WeftdSpec {
            endpoint: endpoint.to_string(),
            prefix: prefix.into(),
            public_ip,
            dir: dir.to_path_buf(),
            args: Vec::new(),
            env: Vec::new(),
            iface: "127.0.0.1".into(),
            via_env: false,
        }
    }

    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
    }

    pub fn env(mut self, k: &str, v: impl Into<String>) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }

    pub fn start(self) -> Weftd {
        std::fs::create_dir_all(&self.dir).expect("agent dir");
        let log = self
            .dir
            .join(format!("weftd-{}.log", Instant::now().elapsed().as_nanos()));
        let logf = std::fs::File::create(&log).expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_weftd"));
        for (k, _) in std::env::vars() {
            if k.starts_with("FLANNELD_") || k == "NOTIFY_SOCKET" {
                cmd.env_remove(k);
            }
        }
        let settings = [
            ("etcd-endpoints", self.endpoint.clone()),
            ("etcd-prefix", self.prefix.clone()),
            ("iface", self.iface.clone()),
            ("public-ip", self.public_ip.to_string()),
            (
                "subnet-file",
                self.dir.join("subnet.env").display().to_string(),
            ),
            (
                "docker-daemon-json",
                self.dir.join("daemon.json").display().to_string(),
            ),
        ];
        for (name, value) in settings {
            if self.via_env {
                cmd.env(
                    format!("FLANNELD_{}", name.to_uppercase().replace('-', "_")),
                    value,
                );
            } else {
                cmd.arg(format!("-{name}={value}"));
            }
        }
        // These agents share the test machine's network namespace: keep its firewall untouched,
        // even under -ip-masq, by shadowing the iptables commands with ones that refuse.
        let shim = self.dir.join("no-firewall");
        std::fs::create_dir_all(&shim).expect("shim dir");
        for tool in ["iptables-save", "iptables-restore"] {
            let path = shim.join(tool);
            std::fs::write(
                &path,
                "#!/bin/sh\necho \"iptables is disabled in this test\" >&2\nexit 1\n",
            )
            .expect("write shim");
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        let path = format!(
            "{}:{}",
            shim.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        cmd.env("PATH", path)
            .arg("-iptables-forward-rules=false")
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("WEFT_LOG", "warn,weft=debug,weft_backends=debug")
            .stdout(Stdio::null())
            .stderr(logf);
        let child = cmd.spawn().expect("spawn weftd");
        Weftd {
            child: Some(child),
            dir: self.dir,
            log,
        }
    }
}

impl Weftd {
    pub fn subnet_env_path(&self) -> PathBuf {
        self.dir.join("subnet.env")
    }

    pub fn daemon_json_path(&self) -> PathBuf {
        self.dir.join("daemon.json")
    }

    pub fn subnet_env(&self) -> Option<String> {
        std::fs::read_to_string(self.subnet_env_path()).ok()
    }

    /// FLANNEL_SUBNET's network, e.g. `10.50.3.0/24`, once subnet.env exists.
    pub fn wait_subnet(&self, timeout: Duration) -> String {
        wait_for("subnet.env", timeout, || {
            self.assert_running();
            let env = self.subnet_env()?;
            let line = env.lines().find(|l| l.starts_with("FLANNEL_SUBNET="))?;
            let gw: ipnet::Ipv4Net = line.trim_start_matches("FLANNEL_SUBNET=").parse().ok()?;
            Some(gw.trunc().to_string())
        })
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn wait_log(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.log().contains(needle) {
            if Instant::now() > deadline {
                panic!(
                    "timed out after {timeout:?} waiting for {needle:?} in the weftd log:\n{}",
                    self.log()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn assert_running(&self) {
        if let Some(c) = &self.child {
            let pid = c.id();
            let alive = Path::new(&format!("/proc/{pid}")).exists()
                && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .unwrap_or_default()
                    .contains(") Z ");
            assert!(alive, "weftd exited unexpectedly; log:\n{}", self.log());
        }
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("running");
        let status = wait_for("weftd to exit", timeout, || child.try_wait().ok().flatten());
        self.child = None;
        status
    }

    /// SIGTERM, and the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let pid = self.child.as_ref().expect("running").id();
        // SAFETY: plain signal to a child we own, by PID.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        self.wait_exit(Duration::from_secs(10))
    }

    /// SIGKILL: no chance to clean up, as in a crash or power loss.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Weftd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs weftctl against `etcd` and returns its output.
pub fn weftctl(etcd: &Etcd, prefix: &str, args: &[&str], stdin: Option<&str>) -> Output {
    let ep = format!("-etcd-endpoints={}", etcd.endpoint);
    let pf = format!("-etcd-prefix={prefix}");
    let mut all = vec![ep.as_str(), pf.as_str()];
    all.extend_from_slice(args);
    weftctl_with(&all, stdin)
}

/// Runs weftctl with exactly `args`.
pub fn weftctl_with(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_weftctl"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn weftctl");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write stdin");
    }
    drop(child.stdin.take());
    child.wait_with_output().expect("weftctl output")
}

/// A TCP proxy in front of etcd whose link can be cut and restored.
pub struct Proxy {
    pub port: u16,
    cut: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    pub fn start(target: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("addr").port();
        let cut = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (c2, s2, k2) = (cut.clone(), stop.clone(), conns.clone());
        thread::spawn(move || {
            while !s2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) if c2.load(Ordering::Relaxed) => drop(client),
                    Ok((client, _)) => {
                        let _ = client.set_nonblocking(false);
                        let Ok(server) =
                            TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], target)))
                        else {
                            continue;
                        };
                        if let (Ok(a), Ok(b)) = (client.try_clone(), server.try_clone()) {
                            k2.lock().expect("lock").extend([a, b]);
                        }
                        pipe(
                            client.try_clone().expect("clone"),
                            server.try_clone().expect("clone"),
                        );
                        pipe(server, client);
                    }
                    Err(_) => thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Proxy {
            port,
            cut,
            conns,
            stop,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Drops every open connection and refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::Relaxed);
        for c in self.conns.lock().expect("lock").drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }

    pub fn restore(&self) {
        self.cut.store(false, Ordering::Relaxed);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.cut();
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    thread::spawn(move || {
        let mut buf = [0u8; 16384];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 || to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Both);
    });
}
