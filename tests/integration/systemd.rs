//! The real unit under a real systemd: a Debian bookworm rootfs (debootstrap, cached in
//! /var/cache/weft-test) imported into a test dockerd and booted with /sbin/init, without
//! --privileged (this VM refuses it). deploy/install.sh runs inside it with the built binaries;
//! etcd runs there too. Proves: install and enable, `systemd-analyze verify`, Type=notify
//! readiness (active only once subnet.env exists, Docker ordered after it), the packaged flanneld
//! variables and weft's own, the watchdog, the docker.service drop-in, and a clean uninstall.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use weft_lab::cmd::tail;
use weft_lab::dockerd::{docker_cli, require_docker, Dockerd};
use weft_lab::Netns;

use crate::harness::wait_for;

/// Bump to rebuild the cached rootfs (e.g. when the package list changes).
const ROOTFS_KEY: &str = "bookworm-minbase-systemd-1";
const CACHE_DIR: &str = "/var/cache/weft-test";
const ETCD: &str = "http://127.0.0.1:23790";
const PREFIX: &str = "/weft-test/network";

/// The tarball of a bookworm rootfs with systemd, built once per machine.
fn systemd_rootfs() -> PathBuf {
    let tar = Path::new(CACHE_DIR).join(format!("rootfs-{ROOTFS_KEY}.tar"));
    if tar.exists() {
        return tar;
    }
    std::fs::create_dir_all(CACHE_DIR).expect("cache dir");
    // Built beside the cache and renamed into place, so a concurrent or interrupted run never
    // leaves a half-written tarball under the final name.
    let work = tempfile::Builder::new()
        .prefix("build-")
        .tempdir_in(CACHE_DIR)
        .expect("build dir");
    let root = work.path().join("rootfs");
    let mirror = std::env::var("WEFT_DEBIAN_MIRROR")
        .unwrap_or_else(|_| "http://deb.debian.org/debian".into());
    eprintln!(
        "building {} with debootstrap from {mirror} (once per machine)",
        tar.display()
    );
    let out = Command::new("timeout")
        .args([
            "900",
            "debootstrap",
            "--variant=minbase",
            "--include=systemd,systemd-sysv",
            "bookworm",
        ])
        .arg(&root)
        .arg(&mirror)
        .output()
        .expect("run debootstrap");
    assert!(
        out.status.success(),
        "debootstrap from {mirror} failed (set WEFT_DEBIAN_MIRROR to another mirror): {}{}",
        tail(&String::from_utf8_lossy(&out.stdout), 20),
        String::from_utf8_lossy(&out.stderr)
    );
    // Downloaded packages are a third of the size and of no use in the image.
    let r = root.display().to_string();
    weft_lab::must(&[
        "sh",
        "-c",
        &format!("rm -rf {r}/var/cache/apt/archives/*.deb {r}/var/lib/apt/lists/*"),
    ]);
    let part = work.path().join("rootfs.tar");
    weft_lab::must(&[
        "tar",
        "--numeric-owner",
        "-C",
        &r,
        "-cf",
        &part.display().to_string(),
        ".",
    ]);
    std::fs::rename(&part, &tar).expect("move rootfs into the cache");
    tar
}

/// A booted systemd container on a private dockerd in a private network namespace.
struct SystemdHost {
    docker: Dockerd,
    ns: Netns,
    name: String,
}

impl SystemdHost {
    fn boot() -> Self {
        let tar = systemd_rootfs();
        let ns = Netns::new(format!("{}sy", weft_lab::netns::unique_prefix()));
        let mut host = SystemdHost {
            docker: Dockerd::new(),
            ns,
            name: "weft-systemd".into(),
        };
        let config = host.docker.dir().join("daemon.json");
        std::fs::write(&config, "{}\n").expect("daemon.json");
        host.docker.start(
            &host.ns,
            &config,
            true,
            &["--bridge=none".into(), "--iptables=false".into()],
        );
        let image = format!("weft-systemd:{ROOTFS_KEY}");
        host.docker
            .docker_ok(&["import", &tar.display().to_string(), &image]);
        let bin = |name: &str| {
            let p = match name {
                "weftd" => env!("CARGO_BIN_EXE_weftd"),
                _ => env!("CARGO_BIN_EXE_weftctl"),
            };
            format!("{p}:/weft-bin/{name}:ro")
        };
        let repo = format!("{}:/weft-src:ro", env!("CARGO_MANIFEST_DIR"));
        let etcd = which("etcd");
        let etcdctl = which("etcdctl");
        host.docker.docker_ok(&[
            "run",
            "-d",
            "--name",
            &host.name,
            "--network",
            "none",
            "--cap-add",
            "SYS_ADMIN",
            // For the udp backend: flannel0 is a TUN device, configured through netlink.
            "--cap-add",
            "NET_ADMIN",
            "--device",
            "/dev/net/tun",
            "--security-opt",
            "seccomp=unconfined",
            "--tmpfs",
            "/run",
            "--tmpfs",
            "/run/lock",
            "-v",
            "/sys/fs/cgroup:/sys/fs/cgroup:rw",
            "-e",
            "container=docker",
            "--stop-signal",
            "SIGRTMIN+3",
            "-v",
            &bin("weftd"),
            "-v",
            &bin("weftctl"),
            "-v",
            &repo,
            "-v",
            &format!("{etcd}:/usr/local/sbin/etcd:ro"),
            "-v",
            &format!("{etcdctl}:/usr/local/sbin/etcdctl:ro"),
            &image,
            "/sbin/init",
        ]);
        // Until systemd's bus is up, systemctl fails at once: poll, then let it wait for boot.
        let deadline = Instant::now() + Duration::from_secs(60);
        let state = loop {
            let out = host.exec(&["timeout", "60", "systemctl", "is-system-running", "--wait"]);
            let state = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if state == "running" || state == "degraded" || Instant::now() > deadline {
                break state;
            }
            std::thread::sleep(Duration::from_millis(300));
        };
        assert!(
            state == "running" || state == "degraded",
            "systemd did not boot: {state:?}; failed units and journal:\n{}",
            host.sh("systemctl --failed --no-legend; journalctl -b --no-pager | tail -40")
        );
        host
    }

    /// Runs a command in the container.
    fn exec(&self, args: &[&str]) -> Output {
        let mut all = vec!["exec", self.name.as_str()];
        all.extend_from_slice(args);
        self.docker.docker(&all)
    }

    /// Runs `sh -c script` in the container; stdout and stderr together, whatever the status.
    fn sh(&self, script: &str) -> String {
        let out = self.exec(&["sh", "-c", script]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// Runs `sh -c script`, panicking with its output and weftd's journal on failure; stdout.
    fn sh_ok(&self, script: &str) -> String {
        let out = self.exec(&["sh", "-c", script]);
        assert!(
            out.status.success(),
            "{script:?} failed in the systemd container: {}{}\njournal of weftd:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.journal()
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn write(&self, path: &str, contents: &str) {
        let out = Command::new("timeout")
            .args(["60", docker_cli(), "-H", &self.docker.host_uri()])
            .args(["exec", "-i", &self.name, "sh", "-c"])
            .arg(format!("mkdir -p \"$(dirname {path})\" && cat > {path}"))
            .stdin(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin
                    .take()
                    .expect("stdin")
                    .write_all(contents.as_bytes())?;
                c.wait_with_output()
            })
            .expect("docker exec");
        assert!(out.status.success(), "write {path}");
    }

    fn journal(&self) -> String {
        tail(
            &self.sh("journalctl -u weftd -u docker --no-pager -o cat"),
            40,
        )
    }

    fn prop(&self, unit: &str, prop: &str) -> String {
        self.sh_ok(&format!("systemctl show -p {prop} --value {unit}"))
    }

    fn active(&self, unit: &str) -> String {
        self.sh(&format!("systemctl is-active {unit}"))
            .trim()
            .to_string()
    }

    fn wait_active(&self, unit: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.active(unit) != "active" {
            assert!(
                Instant::now() < deadline,
                "{unit} not active after 30s ({}); journal:\n{}",
                self.active(unit),
                self.journal()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn etcdctl(&self, args: &str) -> String {
        self.sh_ok(&format!("ETCDCTL_API=3 etcdctl --endpoints={ETCD} {args}"))
    }
}

impl Drop for SystemdHost {
    fn drop(&mut self) {
        // The namespace goes with `ns`, after dockerd is stopped.
        self.docker.stop();
    }
}

fn which(tool: &str) -> String {
    let p = weft_lab::must(&["sh", "-c", &format!("command -v {tool}")])
        .trim()
        .to_string();
    std::fs::canonicalize(&p)
        .map(|p| p.display().to_string())
        .unwrap_or(p)
}

/// Stands in for Docker: records the environment the drop-in gave it, and sleeps.
const FAKE_DOCKER: &str = "[Unit]
Description=Docker stand-in for the weft test
[Service]
ExecStart=/bin/sh -c 'env > /run/fake-docker.env; exec sleep infinity'
[Install]
WantedBy=multi-user.target
";

#[test]
fn systemd_unit_installs_notifies_orders_docker_honours_sysconfig_and_uninstalls() {
    if !require_docker(
        "systemd_unit_installs_notifies_orders_docker_honours_sysconfig_and_uninstalls",
    ) {
        return;
    }
    let h = SystemdHost::boot();

    // Install from the repo with the built binaries; the unit is enabled.
    h.sh_ok("/weft-src/deploy/install.sh --bin-dir /weft-bin");
    assert_eq!(h.sh_ok("systemctl is-enabled weftd.service"), "enabled");
    h.sh_ok("test -x /usr/local/bin/weftd && test -x /usr/local/bin/weftctl");
    h.sh_ok("test -f /etc/systemd/system/docker.service.d/10-weft.conf");
    h.sh_ok(
        "test -f /etc/sysconfig/weftd && test -f /usr/local/share/weft/examples/network/vxlan.json",
    );
    // It is where FLANNELD_ETCD_PASSWORD goes: only root reads it.
    assert_eq!(h.sh_ok("stat -c %a /etc/sysconfig/weftd"), "600");
    h.write("/etc/systemd/system/docker.service", FAKE_DOCKER);
    h.sh_ok("systemctl daemon-reload");

    let verify = h.exec(&[
        "systemd-analyze",
        "verify",
        "/etc/systemd/system/weftd.service",
        "/etc/systemd/system/docker.service",
    ]);
    let verify_out = format!(
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    assert!(
        verify.status.success(),
        "systemd-analyze verify:\n{verify_out}"
    );
    assert!(
        !verify_out.contains("weft"),
        "systemd-analyze verify complains about weft's units:\n{verify_out}"
    );
    let after = h.prop("docker.service", "After");
    assert!(after.contains("weftd.service"), "docker After={after}");

    // A packaged flanneld's settings only: etcd on a non-default port and prefix, options.
    h.sh_ok("rm /etc/sysconfig/weftd");
    h.write(
        "/etc/sysconfig/flanneld",
        &format!(
            "FLANNEL_ETCD_ENDPOINTS=\"{ETCD}\"\nFLANNEL_ETCD_PREFIX=\"{PREFIX}\"\nFLANNEL_OPTIONS=\"-iface=lo -public-ip=10.1.2.3 -iptables-forward-rules=false\"\n"
        ),
    );
    // The watchdog at 2 s, so a few seconds prove weftd keeps it fed.
    h.write(
        "/etc/systemd/system/weftd.service.d/50-test.conf",
        "[Service]\nWatchdogSec=2s\n",
    );
    h.sh_ok("systemctl daemon-reload");
    h.sh_ok(&format!(
        "systemd-run --unit=test-etcd /usr/local/sbin/etcd --data-dir /var/lib/weft-test-etcd \
         --listen-client-urls {ETCD} --advertise-client-urls {ETCD} \
         --listen-peer-urls http://127.0.0.1:23800 --initial-advertise-peer-urls http://127.0.0.1:23800 \
         --initial-cluster default=http://127.0.0.1:23800"
    ));
    wait_for("etcd in the container", Duration::from_secs(20), || {
        h.exec(&[
            "sh",
            "-c",
            &format!("ETCDCTL_API=3 etcdctl --endpoints={ETCD} endpoint health"),
        ])
        .status
        .success()
        .then_some(())
    });

    // Docker's start pulls weftd in and waits: no network config yet, so weftd is not READY.
    h.sh_ok("systemctl start --no-block docker.service");
    wait_for(
        "weftd waiting for a config",
        Duration::from_secs(20),
        || {
            h.prop("weftd.service", "StatusText")
                .contains("no network config")
                .then_some(())
        },
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(h.active("weftd.service"), "activating");
    assert_ne!(h.active("docker.service"), "active");
    h.sh_ok("test ! -e /run/flannel/subnet.env && test ! -e /run/fake-docker.env");

    h.etcdctl(&format!(
        "put {PREFIX}/config '{{\"Network\":\"10.72.0.0/16\",\"SubnetMin\":\"10.72.5.0\",\"SubnetMax\":\"10.72.6.0\",\"Backend\":{{\"Type\":\"alloc\"}}}}'"
    ));
    h.wait_active("weftd.service");
    // Active means READY=1 arrived, which weftd sends after both files are written.
    let env = h.sh_ok("cat /run/flannel/subnet.env");
    assert!(env.contains("FLANNEL_NETWORK=10.72.0.0/16"), "{env}");
    let bip = env
        .lines()
        .find_map(|l| l.strip_prefix("FLANNEL_SUBNET="))
        .expect("FLANNEL_SUBNET")
        .to_string();
    let json = h.sh_ok("cat /etc/docker/daemon.json");
    assert!(json.contains(&format!("\"bip\": \"{bip}\"")), "{json}");
    let lease = h.etcdctl(&format!(
        "get --prefix {PREFIX}/subnets/ --print-value-only"
    ));
    assert!(lease.contains("\"PublicIP\":\"10.1.2.3\""), "{lease}");

    // Docker started after weftd, with the DOCKER_OPTS-route variables from the drop-in.
    h.wait_active("docker.service");
    let docker_env = h.sh_ok("cat /run/fake-docker.env");
    assert!(
        docker_env.contains(&format!(
            "DOCKER_NETWORK_OPTIONS= --bip={bip} --ip-masq=true --mtu="
        )),
        "{docker_env}"
    );
    assert!(
        docker_env.contains(&format!("DOCKER_OPT_BIP=--bip={bip}")),
        "{docker_env}"
    );

    // The watchdog (2 s here) is fed: no restart, same process, still active.
    let pid = h.prop("weftd.service", "MainPID");
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(h.active("weftd.service"), "active", "{}", h.journal());
    assert_eq!(h.prop("weftd.service", "MainPID"), pid);
    assert_eq!(h.prop("weftd.service", "NRestarts"), "0");
    assert_eq!(h.prop("weftd.service", "WatchdogUSec"), "2s");
    assert!(h.prop("weftd.service", "StatusText").starts_with("leased "));

    // weft's own /etc/sysconfig/weftd with FLANNELD_* variables; the flanneld file's variables
    // now empty, which must not become empty flags. Restarting weftd leaves Docker alone.
    let docker_pid = h.prop("docker.service", "MainPID");
    h.write(
        "/etc/sysconfig/flanneld",
        "FLANNEL_ETCD_ENDPOINTS=\"\"\nFLANNEL_ETCD_PREFIX=\"\"\nFLANNEL_OPTIONS=\"\"\n",
    );
    h.write(
        "/etc/sysconfig/weftd",
        &format!(
            "FLANNELD_ETCD_ENDPOINTS={ETCD}\nFLANNELD_ETCD_PREFIX={PREFIX}\nFLANNELD_IFACE=lo\nFLANNELD_PUBLIC_IP=10.1.2.4\nWEFTD_OPTS=\"-iptables-forward-rules=false -subnet-lease-renew-margin=5\"\n"
        ),
    );
    h.sh_ok("systemctl restart weftd.service");
    assert_eq!(h.active("weftd.service"), "active");
    let leases = h.etcdctl(&format!(
        "get --prefix {PREFIX}/subnets/ --print-value-only"
    ));
    assert!(leases.contains("\"PublicIP\":\"10.1.2.4\""), "{leases}");
    assert_eq!(
        h.prop("docker.service", "MainPID"),
        docker_pid,
        "Docker was restarted"
    );
    // A different subnet (the old one is still leased to 10.1.2.3): said loudly, Docker untouched.
    let journal = h.sh_ok("journalctl -u weftd --no-pager -o cat");
    assert!(
        journal.contains("this host's subnet changed: restart Docker"),
        "{journal}"
    );
    let status = h.sh(&format!(
        "weftctl -etcd-endpoints={ETCD} -etcd-prefix={PREFIX} status --public-ip=10.1.2.4; echo exit=$?"
    ));
    assert!(
        status.contains("status: consistent") && status.contains("exit=0"),
        "{status}"
    );

    // The classic flannel set-up: the flanneld sysconfig names etcd, and the network config has
    // no Backend at all, which means udp. weftd becomes active with flannel0 up.
    h.sh_ok("rm /etc/sysconfig/weftd");
    h.write(
        "/etc/sysconfig/flanneld",
        &format!(
            "FLANNEL_ETCD_ENDPOINTS=\"{ETCD}\"\nFLANNEL_ETCD_PREFIX=\"{PREFIX}\"\nFLANNEL_OPTIONS=\"-iface=lo -public-ip=10.1.2.5 -iptables-forward-rules=false\"\n"
        ),
    );
    h.etcdctl(&format!(
        "put {PREFIX}/config '{{\"Network\":\"10.73.0.0/16\"}}'"
    ));
    h.sh_ok("systemctl restart weftd.service");
    assert_eq!(h.active("weftd.service"), "active", "{}", h.journal());
    let env = h.sh_ok("cat /run/flannel/subnet.env");
    assert!(env.contains("FLANNEL_NETWORK=10.73.0.0/16"), "{env}");
    h.sh_ok("test -d /sys/class/net/flannel0");
    let lease = h.etcdctl(&format!(
        "get --prefix {PREFIX}/subnets/10.73 --print-value-only"
    ));
    assert!(lease.contains("\"BackendType\":\"udp\""), "{lease}");

    // Installing again over a /etc/sysconfig/weftd that anyone may read (written by hand, a
    // password added since) makes it root's alone, its content and owner as they were.
    let settings = "FLANNELD_ETCD_USERNAME=weft\nFLANNELD_ETCD_PASSWORD=s3cret\n";
    h.write("/etc/sysconfig/weftd", settings);
    h.sh_ok("chmod 0644 /etc/sysconfig/weftd");
    let reinstall = h.sh_ok("/weft-src/deploy/install.sh --bin-dir /weft-bin --no-enable");
    assert!(
        reinstall.contains("made /etc/sysconfig/weftd readable by its owner only (was 644)"),
        "{reinstall}"
    );
    assert_eq!(h.sh_ok("stat -c '%a %U' /etc/sysconfig/weftd"), "600 root");
    assert_eq!(h.sh_ok("cat /etc/sysconfig/weftd"), settings.trim_end());

    // Uninstall: weftd stopped, and no unit, drop-in or binary left.
    h.sh_ok("/weft-src/deploy/install.sh --uninstall");
    assert_ne!(h.active("weftd.service"), "active");
    let left = h.sh("systemctl list-unit-files --no-legend 'weft*'; \
         find /etc/systemd /usr/local/bin /usr/local/share -name '*weft*'");
    assert_eq!(left.trim(), "", "left behind after uninstall");
    let load = h.prop("weftd.service", "LoadState");
    assert_eq!(load, "not-found");
}
