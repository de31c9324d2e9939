//! Test harness: real weftd/weftctl processes (on this machine's loopback, or inside a lab host's
//! namespace), and a TCP proxy that can cut the agents off from etcd. etcd and the simulated hosts
//! come from the shared lab crate (`weft-lab`). Everything is killed and removed in Drop.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::AtomicU32;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

pub use weft_lab::etcd::etcd_args;
pub use weft_lab::wait::{free_port, wait_for};
pub use weft_lab::Etcd;

/// One weftd process with its own files.
pub struct Weftd {
    child: Option<Child>,
    pub dir: PathBuf,
    log: PathBuf,
    /// Whether it runs on a lab host, whose lab prints the logs in its directory when a test
    /// fails (`weft_lab::logs`); one on this machine prints its own.
    on_lab_host: bool,
}

/// How to start a weftd.
pub struct WeftdSpec {
    pub endpoint: String,
    pub prefix: String,
    pub public_ip: Ipv4Addr,
    pub dir: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// `-iface` value; loopback by default so no root is needed for the alloc backend. None:
    /// weftd chooses (the default route's interface).
    pub iface: Option<String>,
    /// `-public-ip`; None: the interface's address.
    pub public_ip_flag: bool,
    /// Pass the settings as FLANNELD_* variables instead of flags.
    pub via_env: bool,
    /// Run inside this network namespace (a simulated host) with its real firewall; None: on
    /// this machine, with iptables shadowed so its firewall is never touched.
    pub netns: Option<String>,
    /// Append the log here; None: a new file in `dir`.
    pub log: Option<PathBuf>,
    /// Run as in a pod: this directory (token, ca.crt, namespace) seen at
    /// /var/run/secrets/kubernetes.io/serviceaccount, in a mount namespace of weftd's own over
    /// an empty /run (nothing of the machine's is changed). Needs `netns`.
    pub service_account: Option<PathBuf>,
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
            iface: Some("127.0.0.1".into()),
            public_ip_flag: true,
            via_env: false,
            netns: None,
            log: None,
            service_account: None,
        }
    }

    /// weftd on a simulated host: in its namespace, interface and address of weftd's own choice,
    /// its firewall real, one log across restarts.
    pub fn on_host(endpoint: &str, prefix: &str, ns: &str, dir: &Path) -> Self {
        let mut spec = Self::new_raw(endpoint, prefix, Ipv4Addr::UNSPECIFIED, dir);
        spec.iface = None;
        spec.public_ip_flag = false;
        spec.netns = Some(ns.to_string());
        spec.log = Some(dir.join("weftd.log"));
        spec
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
        static STARTS: AtomicU32 = AtomicU32::new(0);
        let log = self.log.clone().unwrap_or_else(|| {
            let n = STARTS.fetch_add(1, Ordering::Relaxed);
            self.dir.join(format!("weftd-{n}.log"))
        });
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        let mut cmd = match (&self.netns, &self.service_account) {
            (Some(ns), Some(sa)) => {
                let sa_path = "/run/secrets/kubernetes.io/serviceaccount";
                let script = format!(
                    "mount -t tmpfs tmpfs /run && mkdir -p {sa_path} && \
                     mount --bind \"$1\" {sa_path} && shift && exec \"$@\""
                );
                let mut c = Command::new("ip");
                c.args([
                    "netns",
                    "exec",
                    ns,
                    "unshare",
                    "-m",
                    "--propagation",
                    "private",
                ]);
                c.args(["sh", "-c", &script, "sh"]);
                c.arg(sa).arg(env!("CARGO_BIN_EXE_weftd"));
                c
            }
            (Some(ns), None) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_weftd")]);
                c
            }
            (None, _) => Command::new(env!("CARGO_BIN_EXE_weftd")),
        };
        for (k, _) in std::env::vars() {
            if k.starts_with("FLANNELD_") || k == "NOTIFY_SOCKET" {
                cmd.env_remove(k);
            }
        }
        let mut settings = vec![
            ("etcd-endpoints", self.endpoint.clone()),
            ("etcd-prefix", self.prefix.clone()),
            (
                "subnet-file",
                self.dir.join("subnet.env").display().to_string(),
            ),
            (
                "docker-daemon-json",
                self.dir.join("daemon.json").display().to_string(),
            ),
        ];
        if let Some(iface) = &self.iface {
            settings.push(("iface", iface.clone()));
        }
        if self.public_ip_flag {
            settings.push(("public-ip", self.public_ip.to_string()));
        }
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
        if self.netns.is_none() {
            // These agents share the test machine's network namespace: keep its firewall
            // untouched, even under -ip-masq, by shadowing the iptables commands with ones that
            // refuse.
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
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
                    .expect("chmod");
            }
            let path = format!(
                "{}:{}",
                shim.display(),
                std::env::var("PATH").unwrap_or_default()
            );
            cmd.env("PATH", path).arg("-iptables-forward-rules=false");
        }
        cmd.args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("WEFT_LOG", "warn,weft=debug,weft_backends=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf);
        let child = cmd.spawn().expect("spawn weftd");
        Weftd {
            child: Some(child),
            dir: self.dir,
            log,
            on_lab_host: self.netns.is_some(),
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

    /// Freezes (`true`) or thaws the process, by its PID: as a long partition looks to it.
    pub fn freeze(&self, frozen: bool) {
        if let Some(c) = &self.child {
            let sig = if frozen { "-STOP" } else { "-CONT" };
            let ok = Command::new("kill")
                .args([sig, &c.id().to_string()])
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "kill {sig} weftd");
        }
    }
}

impl Drop for Weftd {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() && !self.on_lab_host {
            weft_lab::logs::print_tail(&self.dir, &self.log);
        }
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
    weft_lab::cmd::output_with_input(
        Command::new(env!("CARGO_BIN_EXE_weftctl")).args(args),
        stdin.map(str::as_bytes),
        Duration::from_secs(60),
    )
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
