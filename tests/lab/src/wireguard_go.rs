//! A WireGuard node weft did not write: Debian's wireguard-go making `flannel-wg`, set up with
//! `wg` and `ip` exactly as flanneld sets up its device (a private key, port 51820, the lease's
//! network address /32, MTU, the network routed into it with scope link, one peer per lease).
//!
//! wireguard-go's control socket is `/var/run/wireguard/<device>.sock`: one path for the whole
//! machine, which other tests or a benchmark on it may be using. So it runs in a mount namespace
//! of its own with a private tmpfs on /run, and `wg` runs inside that namespace (`nsenter -t
//! PID -m -n`), and only once wireguard-go runs there: before, nsenter would land in the
//! machine's mount namespace, where `wg` may unlink someone else's dead socket.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;

use crate::cmd;
use crate::netns::Netns;

/// The device flanneld's wireguard backend makes.
pub const DEV: &str = "flannel-wg";

/// The programs this needs (Debian's wireguard-go and wireguard-tools, util-linux).
pub const TOOLS: [&str; 4] = ["wireguard-go", "wg", "nsenter", "unshare"];

/// A running wireguard-go with its `flannel-wg`; killed (by its PID) when dropped.
pub struct WireguardGo {
    child: Child,
    pid: String,
    /// Its public key, base64, as a flannel lease carries it.
    pub public_key: String,
}

impl WireguardGo {
    /// wireguard-go's `flannel-wg` in `ns`, as flanneld leaves it: a new key (its file in
    /// `dir`), `port`, `address`/32, `mtu`, up, and `network` routed into it with scope link.
    pub fn flannel_wg(
        ns: &Netns,
        dir: &Path,
        (address, port): (Ipv4Addr, u16),
        mtu: u32,
        network: Ipv4Net,
    ) -> Self {
        let private = cmd::output(Command::new("wg").arg("genkey"), cmd::TIMEOUT);
        assert!(private.status.success(), "wg genkey");
        let public = cmd::output_with_input(
            Command::new("wg").arg("pubkey"),
            Some(&private.stdout),
            cmd::TIMEOUT,
        );
        assert!(public.status.success(), "wg pubkey");
        let key_file = dir.join("wireguard-go.key");
        std::fs::create_dir_all(dir).expect("key dir");
        std::fs::write(&key_file, &private.stdout).expect("key file");
        let child = ns
            .command("unshare")
            .args([
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                "mount -t tmpfs -o mode=0755,size=1m weft-wg /run && mkdir /run/wireguard \
                 && exec wireguard-go -f \"$0\"",
                DEV,
            ])
            .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start wireguard-go");
        let go = Self {
            pid: child.id().to_string(),
            child,
            public_key: String::from_utf8_lossy(&public.stdout).trim().to_string(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(go.isolated() && ns.link(DEV).is_some() && go.wg(&["show", DEV]).0) {
            assert!(Instant::now() < deadline, "wireguard-go made no {DEV}");
            std::thread::sleep(Duration::from_millis(50));
        }
        let key = key_file.display().to_string();
        go.must(&[
            "set",
            DEV,
            "private-key",
            &key,
            "listen-port",
            &port.to_string(),
        ]);
        ns.must(&["ip", "addr", "add", &format!("{address}/32"), "dev", DEV]);
        ns.must(&["ip", "link", "set", DEV, "mtu", &mtu.to_string(), "up"]);
        let net = network.to_string();
        ns.must(&["ip", "route", "add", &net, "dev", DEV, "scope", "link"]);
        go
    }

    /// A peer for a lease, as flanneld adds one: its key, PublicIP:Port, its subnet.
    pub fn add_peer(&self, key: &str, endpoint: SocketAddr, subnet: Ipv4Net) {
        let (endpoint, subnet) = (endpoint.to_string(), subnet.to_string());
        let args = ["set", DEV, "peer", key, "endpoint", &endpoint];
        self.must(&[&args[..], &["allowed-ips", &subnet]].concat());
    }

    /// When it last completed a handshake with the peer `key` (seconds since the epoch; 0:
    /// never), if it has that peer.
    pub fn latest_handshake(&self, key: &str) -> Option<u64> {
        let shakes = self.must(&["show", DEV, "latest-handshakes"]);
        shakes
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key}\t")))
            .and_then(|t| t.trim().parse().ok())
    }

    /// `wg ARGS` in wireguard-go's namespaces: (success, stdout, stderr).
    pub fn wg(&self, args: &[&str]) -> (bool, String, String) {
        if !self.isolated() {
            return (
                false,
                String::new(),
                "not (yet) in its own mount namespace".into(),
            );
        }
        let mut all = vec!["nsenter", "-t", &self.pid, "-m", "-n", "wg"];
        all.extend_from_slice(args);
        cmd::sh(&all)
    }

    /// `wg ARGS` that must succeed; stdout.
    pub fn must(&self, args: &[&str]) -> String {
        let (ok, out, err) = self.wg(args);
        assert!(ok, "wg {args:?}: {out}{err}");
        out
    }

    /// Whether the spawned process is wireguard-go by now, in a mount namespace not ours.
    fn isolated(&self) -> bool {
        let comm = std::fs::read_to_string(format!("/proc/{}/comm", self.pid)).unwrap_or_default();
        let mnt = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/mnt")).ok();
        comm.trim() == "wireguard-go" && mnt(&self.pid).is_some() && mnt(&self.pid) != mnt("self")
    }
}

impl Drop for WireguardGo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
