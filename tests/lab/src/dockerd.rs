//! A real dockerd (Debian's docker.io) for one simulated host or one systemd container, with its
//! own data root, exec root, pid file and socket in a temp dir. Started with `nsenter --net=` (not
//! `ip netns exec`, which remounts /sys and hides the cgroup mounts dockerd needs). Images come from
//! `docker import`: no registry is reachable. Drop removes the containers, stops dockerd (and the
//! containerd it started) by PID, unmounts what it left and removes the dir, also on failure.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::cmd::tail;
use crate::netns::Netns;
use crate::skip::require_tools;

/// The docker CLI that matches Debian's dockerd.
pub fn docker_cli() -> &'static str {
    if Path::new("/usr/bin/docker").exists() {
        "/usr/bin/docker"
    } else {
        "docker"
    }
}

/// Root, dockerd and what the busybox image is made from are needed: skip visibly outside CI,
/// fail under CI=true.
pub fn require_docker(test: &str) -> bool {
    require_tools(test, &["dockerd", "nsenter", "busybox", "tar"])
}

pub const BUSYBOX_IMAGE: &str = "weft-busybox:test";

pub struct Dockerd {
    child: Option<Child>,
    dir: TempDir,
    /// The API socket: `unix://` + this.
    pub sock: PathBuf,
    log: PathBuf,
}

impl Default for Dockerd {
    fn default() -> Self {
        Self::new()
    }
}

impl Dockerd {
    /// Makes the directories; nothing runs yet (the socket path is known before daemon.json is
    /// written, since daemon.json may name it under "hosts").
    pub fn new() -> Self {
        // Short path: containerd's socket lives under it and unix socket paths are short.
        let dir = tempfile::Builder::new()
            .prefix("wdk")
            .tempdir_in("/tmp")
            .expect("dockerd dir");
        let sock = dir.path().join("docker.sock");
        let log = dir.path().join("dockerd.log");
        Dockerd {
            child: None,
            dir,
            sock,
            log,
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn host_uri(&self) -> String {
        format!("unix://{}", self.sock.display())
    }

    /// Starts dockerd in network namespace `ns` with `--config-file config`. `host_flag`: pass
    /// `-H unix://…` (leave it out when daemon.json has "hosts": dockerd refuses both).
    pub fn start(&mut self, ns: &Netns, config: &Path, host_flag: bool, extra: &[String]) {
        assert!(self.child.is_none(), "dockerd already runs");
        let d = self.dir.path();
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("dockerd log");
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", ns.path()))
            .arg("dockerd")
            .arg("--data-root")
            .arg(d.join("data"))
            .arg("--exec-root")
            .arg(d.join("x"))
            .arg("--pidfile")
            .arg(d.join("dockerd.pid"))
            .arg("--config-file")
            .arg(config);
        if host_flag {
            cmd.arg("-H").arg(self.host_uri());
        }
        // nsenter execs dockerd (no --fork), so the child's PID is dockerd's.
        let child = cmd
            .args(extra)
            .stdin(Stdio::null())
            .stdout(logf.try_clone().expect("log"))
            .stderr(logf)
            .spawn()
            .expect("spawn nsenter dockerd");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                panic!("dockerd exited with {status}; log:\n{}", self.log());
            }
            if self.sock.exists() && self.docker(&["version"]).status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "dockerd did not answer in 60s; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs the docker CLI against this daemon, under a time limit.
    pub fn docker(&self, args: &[&str]) -> Output {
        Command::new("timeout")
            .args(["120", docker_cli(), "-H", &self.host_uri()])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run docker")
    }

    /// Runs the docker CLI, panicking with its output (and dockerd's log) on failure; stdout.
    pub fn docker_ok(&self, args: &[&str]) -> String {
        let out = self.docker(args);
        assert!(
            out.status.success(),
            "docker {args:?} failed: {}{}\ndockerd log (tail):\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            tail(&self.log(), 30)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Imports a busybox-static rootfs as BUSYBOX_IMAGE.
    pub fn import_busybox(&self) {
        let root = self.dir.path().join("busybox-root");
        let bin = root.join("bin");
        std::fs::create_dir_all(&bin).expect("rootfs");
        let busybox = std::env::var_os("PATH")
            .and_then(|p| {
                std::env::split_paths(&p)
                    .map(|d| d.join("busybox"))
                    .find(|b| b.is_file())
            })
            .expect("busybox on PATH");
        std::fs::copy(&busybox, bin.join("busybox")).expect("copy busybox");
        for applet in ["sh", "ping", "ip", "cat", "sleep", "ls"] {
            std::os::unix::fs::symlink("busybox", bin.join(applet)).expect("symlink");
        }
        let tar = self.dir.path().join("busybox.tar");
        crate::cmd::must(&[
            "tar",
            "-C",
            &root.display().to_string(),
            "-cf",
            &tar.display().to_string(),
            ".",
        ]);
        self.docker_ok(&["import", &tar.display().to_string(), BUSYBOX_IMAGE]);
    }

    /// Starts a busybox container that sleeps; returns its address on the default bridge.
    pub fn run_busybox(&self, name: &str) -> std::net::Ipv4Addr {
        self.docker_ok(&["run", "-d", "--name", name, BUSYBOX_IMAGE, "sleep", "600"]);
        let ip = self.docker_ok(&["inspect", "-f", "{{.NetworkSettings.IPAddress}}", name]);
        ip.parse()
            .unwrap_or_else(|_| panic!("container {name} has no address: {ip:?}"))
    }

    /// `cat FILE` inside a container.
    pub fn exec_cat(&self, name: &str, file: &str) -> String {
        self.docker_ok(&["exec", name, "cat", file])
    }

    /// Removes every container, stops dockerd (SIGTERM, then SIGKILL after 20 s) and the
    /// containerd it started.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let ids = self.docker(&["ps", "-aq"]);
        let ids = String::from_utf8_lossy(&ids.stdout).to_string();
        let ids: Vec<&str> = ids.split_whitespace().collect();
        if !ids.is_empty() {
            let mut args = vec!["rm", "-f"];
            args.extend(ids);
            let _ = self.docker(&args);
        }
        let containerd =
            std::fs::read_to_string(self.dir.path().join("x/containerd/containerd.pid"))
                .ok()
                .and_then(|p| p.trim().parse::<i32>().ok());
        // SAFETY: signals to processes we started, by PID.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if let Some(pid) = containerd {
            // It exits with dockerd; after a SIGKILL of dockerd it is stopped here. No panic: this
            // also runs in Drop.
            let alive = || {
                std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .map(|s| s.contains("(containerd)") && !s.contains(") Z "))
                    .unwrap_or(false)
            };
            let deadline = Instant::now() + Duration::from_secs(10);
            while alive() {
                let sig = if Instant::now() > deadline {
                    libc::SIGKILL
                } else {
                    libc::SIGTERM
                };
                // SAFETY: the containerd this dockerd started, by PID.
                unsafe { libc::kill(pid, sig) };
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        self.stop();
        // Overlay and netns mounts a killed dockerd may leave behind, deepest first.
        let root = self.dir.path().display().to_string();
        let mut mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
            .filter(|m| m.starts_with(&root))
            .collect();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mounts {
            let _ = Command::new("umount").args(["-l", &m]).output();
        }
    }
}
