//! Simulated hosts for end-to-end tests: a "switch" network namespace with a bridge and etcd,
//! host namespaces on it running real weftd, and a "container" namespace behind `cni0` on each
//! host. Names carry a per-test prefix; everything is removed in Drop, also when a test fails.

use std::net::{Ipv4Addr, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::harness::{etcd_args, wait_for};

/// The switch's address: etcd listens here, and it stands for "outside the cluster network".
pub const SWITCH_IP: Ipv4Addr = Ipv4Addr::new(10, 199, 0, 1);
pub const PREFIX: &str = "/coreos.com/network";

/// Root is needed for namespaces. Outside CI a test without it is skipped, visibly; in CI it fails.
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test} needs root (network namespaces) and CI=true: run the suite as root");
    }
    eprintln!("SKIPPED {test}: needs root for network namespaces");
    false
}

/// Runs a command, panicking with its output if it fails.
pub fn run(args: &[&str]) -> Output {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("run {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs a command inside network namespace `ns`.
pub fn ns_run(ns: &str, args: &[&str]) -> Output {
    let mut all = vec!["ip", "netns", "exec", ns];
    all.extend_from_slice(args);
    run(&all)
}

/// Parsed `ip -j …` output in `ns`.
pub fn ip_json(ns: &str, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["ip", "-n", ns, "-j"];
    all.extend_from_slice(args);
    serde_json::from_slice(&run(&all).stdout).unwrap_or(serde_json::Value::Array(vec![]))
}

/// Runs `f` on a thread that has entered `ns`; sockets it creates live in that namespace.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    let file = std::fs::File::open(format!("/var/run/netns/{ns}")).expect("open netns");
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on this thread only, with a valid namespace fd held open.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {ns}");
            f()
        })
        .join()
        .expect("netns thread")
    })
}

/// Sends one UDP datagram from `from_ns` to `to` and returns the source address the receiver in
/// `to_ns` saw.
pub fn udp_source_seen(from_ns: &str, to_ns: &str, to: Ipv4Addr) -> Option<Ipv4Addr> {
    let rx = in_netns(to_ns, || UdpSocket::bind((to, 0)).expect("bind receiver"));
    rx.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
    let port = rx.local_addr().ok()?.port();
    let tx = in_netns(from_ns, || {
        UdpSocket::bind(("0.0.0.0", 0)).expect("bind sender")
    });
    for _ in 0..10 {
        tx.send_to(b"weft", (to, port)).ok()?;
        let mut buf = [0u8; 16];
        if let Ok((_, std::net::SocketAddr::V4(src))) = rx.recv_from(&mut buf) {
            return Some(*src.ip());
        }
    }
    None
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

pub struct Host {
    pub ns: String,
    pub container: String,
    pub addr: Ipv4Addr,
    pub dir: PathBuf,
    weftd: Option<Child>,
    log: PathBuf,
}

impl Host {
    pub fn subnet_env(&self) -> Option<String> {
        std::fs::read_to_string(self.dir.join("subnet.env")).ok()
    }

    pub fn env_var(&self, key: &str) -> Option<String> {
        let env = self.subnet_env()?;
        env.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")).map(str::to_string))
    }

    /// The lease, e.g. `10.244.5.0/24`, waiting for subnet.env.
    pub fn wait_subnet(&self) -> ipnet::Ipv4Net {
        wait_for(
            &format!("subnet.env of {}", self.ns),
            Duration::from_secs(30),
            || {
                self.assert_running();
                let gw: ipnet::Ipv4Net = self.env_var("FLANNEL_SUBNET")?.parse().ok()?;
                Some(gw.trunc())
            },
        )
    }

    /// The container's address: the second host address of the lease.
    pub fn container_ip(&self) -> Ipv4Addr {
        let s = self.wait_subnet();
        Ipv4Addr::from(u32::from(s.network()) + 2)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn assert_running(&self) {
        if let Some(c) = &self.weftd {
            let stat =
                std::fs::read_to_string(format!("/proc/{}/stat", c.id())).unwrap_or_default();
            assert!(
                !stat.is_empty() && !stat.contains(") Z "),
                "weftd in {} exited; log:\n{}",
                self.ns,
                self.log()
            );
        }
    }

    /// SIGTERM and wait: weftd's clean exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.weftd.take() {
            // SAFETY: a signal to our own child, by PID.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let status = wait_for("weftd to exit", Duration::from_secs(10), || {
                c.try_wait().ok().flatten()
            });
            assert!(status.success(), "weftd exit status {status}");
        }
    }

    /// SIGKILL: a crash; the lease stays until its TTL runs out.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.weftd.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub struct Topology {
    pub switch: String,
    pub hosts: Vec<Host>,
    etcd: Option<Child>,
    pub dir: TempDir,
}

impl Topology {
    /// A switch with etcd and `n` hosts (no weftd yet). `mtu` is the underlay MTU.
    pub fn new(n: usize, mtu: u32) -> Self {
        let id = format!(
            "wt{}x{}",
            std::process::id() % 100_000,
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let dir = tempfile::tempdir().expect("tmp");
        let switch = format!("{id}sw");
        let mut topo = Topology {
            switch: switch.clone(),
            hosts: Vec::new(),
            etcd: None,
            dir,
        };
        run(&["ip", "netns", "add", &switch]);
        let mtu_s = mtu.to_string();
        ns_run(&switch, &["ip", "link", "set", "lo", "up"]);
        ns_run(
            &switch,
            &["ip", "link", "add", "br0", "mtu", &mtu_s, "type", "bridge"],
        );
        ns_run(
            &switch,
            &[
                "ip",
                "addr",
                "add",
                &format!("{SWITCH_IP}/24"),
                "dev",
                "br0",
            ],
        );
        ns_run(&switch, &["ip", "link", "set", "br0", "up"]);
        for i in 0..n {
            let ns = format!("{id}h{i}");
            let container = format!("{id}c{i}");
            let addr = Ipv4Addr::new(10, 199, 0, 11 + i as u8);
            run(&["ip", "netns", "add", &ns]);
            run(&["ip", "netns", "add", &container]);
            let port = format!("p{i}");
            ns_run(
                &switch,
                &[
                    "ip", "link", "add", &port, "mtu", &mtu_s, "type", "veth", "peer", "name",
                    "eth0", "mtu", &mtu_s, "netns", &ns,
                ],
            );
            ns_run(
                &switch,
                &["ip", "link", "set", &port, "master", "br0", "up"],
            );
            ns_run(&ns, &["ip", "link", "set", "lo", "up"]);
            ns_run(
                &ns,
                &["ip", "addr", "add", &format!("{addr}/24"), "dev", "eth0"],
            );
            ns_run(&ns, &["ip", "link", "set", "eth0", "up"]);
            ns_run(
                &ns,
                &[
                    "ip",
                    "route",
                    "add",
                    "default",
                    "via",
                    &SWITCH_IP.to_string(),
                ],
            );
            ns_run(&ns, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
            ns_run(&container, &["ip", "link", "set", "lo", "up"]);
            let hdir = topo.dir.path().join(&ns);
            std::fs::create_dir_all(&hdir).expect("host dir");
            topo.hosts.push(Host {
                ns,
                container,
                addr,
                log: hdir.join("weftd.log"),
                dir: hdir,
                weftd: None,
            });
        }
        topo.start_etcd();
        topo
    }

    fn start_etcd(&mut self) {
        let url = format!("http://{SWITCH_IP}:2379");
        let peer = format!("http://{SWITCH_IP}:2380");
        let log = std::fs::File::create(self.dir.path().join("etcd.log")).expect("log");
        let child = Command::new("ip")
            .args(["netns", "exec", &self.switch, "etcd"])
            .args(etcd_args("sw", &self.dir.path().join("etcd"), &url, &peer))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start etcd");
        self.etcd = Some(child);
        wait_for(
            "etcd in the switch namespace",
            Duration::from_secs(20),
            || {
                self.etcdctl_try(&["endpoint", "health"])
                    .status
                    .success()
                    .then_some(())
            },
        );
    }

    fn etcdctl_try(&self, args: &[&str]) -> Output {
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.switch,
                "etcdctl",
                "--endpoints",
                &format!("http://{SWITCH_IP}:2379"),
            ])
            .args(args)
            .env("ETCDCTL_API", "3")
            .output()
            .expect("etcdctl")
    }

    pub fn etcdctl(&self, args: &[&str]) -> String {
        let out = self.etcdctl_try(args);
        assert!(
            out.status.success(),
            "etcdctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn set_config(&self, json: &str) {
        self.etcdctl(&["put", &format!("{PREFIX}/config"), json]);
    }

    /// Starts weftd on host `i` with extra flags.
    pub fn start(&mut self, i: usize, extra: &[&str]) {
        let h = &mut self.hosts[i];
        assert!(h.weftd.is_none(), "weftd already runs on {}", h.ns);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&h.log)
            .expect("log");
        let child = Command::new("ip")
            .args(["netns", "exec", &h.ns, env!("CARGO_BIN_EXE_weftd")])
            .arg(format!("-etcd-endpoints=http://{SWITCH_IP}:2379"))
            .arg(format!(
                "-subnet-file={}",
                h.dir.join("subnet.env").display()
            ))
            .arg(format!(
                "--docker-daemon-json={}",
                h.dir.join("daemon.json").display()
            ))
            .args(extra)
            .env("WEFT_LOG", "warn,weft=debug,weft_backends=debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn weftd");
        h.weftd = Some(child);
    }

    /// Gives host `i`'s container an address in the lease behind `cni0`, as Docker or the CNI
    /// bridge plugin would, with the MTU from subnet.env.
    pub fn wire_container(&self, i: usize) {
        let h = &self.hosts[i];
        let subnet = h.wait_subnet();
        let gw = Ipv4Addr::from(u32::from(subnet.network()) + 1);
        let mtu = h.env_var("FLANNEL_MTU").expect("FLANNEL_MTU");
        let (ns, c) = (h.ns.as_str(), h.container.as_str());
        let _ = Command::new("ip")
            .args(["-n", ns, "link", "del", "cni0"])
            .output();
        ns_run(
            ns,
            &["ip", "link", "add", "cni0", "mtu", &mtu, "type", "bridge"],
        );
        ns_run(
            ns,
            &[
                "ip",
                "addr",
                "add",
                &format!("{gw}/{}", subnet.prefix_len()),
                "dev",
                "cni0",
            ],
        );
        ns_run(ns, &["ip", "link", "set", "cni0", "up"]);
        let _ = Command::new("ip")
            .args(["-n", c, "link", "del", "eth0"])
            .output();
        ns_run(
            ns,
            &[
                "ip", "link", "add", "vc", "mtu", &mtu, "type", "veth", "peer", "name", "eth0",
                "mtu", &mtu, "netns", c,
            ],
        );
        ns_run(ns, &["ip", "link", "set", "vc", "master", "cni0", "up"]);
        ns_run(
            c,
            &[
                "ip",
                "addr",
                "add",
                &format!("{}/{}", h.container_ip(), subnet.prefix_len()),
                "dev",
                "eth0",
            ],
        );
        ns_run(c, &["ip", "link", "set", "eth0", "up"]);
        ns_run(
            c,
            &["ip", "route", "add", "default", "via", &gw.to_string()],
        );
    }

    /// Whether one ping from host `from`'s container reaches `to`.
    pub fn ping(&self, from: usize, to: Ipv4Addr) -> bool {
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.hosts[from].container,
                "ping",
                "-c1",
                "-W1",
                &to.to_string(),
            ])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    }

    /// Waits until every listed container reaches every other one.
    pub fn assert_full_mesh(&self, hosts: &[usize]) {
        for &a in hosts {
            for &b in hosts {
                if a != b {
                    let to = self.hosts[b].container_ip();
                    let deadline = Instant::now() + Duration::from_secs(20);
                    while !self.ping(a, to) {
                        assert!(
                            Instant::now() < deadline,
                            "container of {} cannot reach {to} ({}); log of {}:\n{}",
                            self.hosts[a].ns,
                            self.hosts[b].ns,
                            self.hosts[a].ns,
                            self.hosts[a].log()
                        );
                    }
                }
            }
        }
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for h in &mut self.hosts {
            h.kill();
        }
        if let Some(mut c) = self.etcd.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for h in &self.hosts {
            let _ = Command::new("ip")
                .args(["netns", "del", &h.container])
                .output();
            let _ = Command::new("ip").args(["netns", "del", &h.ns]).output();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.switch])
            .output();
    }
}
