//! A WireGuard node weft did not write: Debian's wireguard-go making `flannel-wg` (and, for a
//! dual-stack network in flannel's default separate mode, `flannel-wg-v6`), set up with `wg` and
//! `ip` exactly as flanneld sets up its devices (a private key, port 51820 (51821 for IPv6), the
//! lease's network address /32 (/128), MTU, the network routed into it with scope link, one peer
//! per lease).
//!
//! wireguard-go's control socket is `/var/run/wireguard/<device>.sock`: one path for the whole
//! machine, which other tests or a benchmark on it may be using. So it runs in a mount namespace
//! of its own with a private tmpfs on /run, and `wg` runs inside that namespace (`nsenter -t
//! PID -m -n`), and only once wireguard-go runs there: before, nsenter would land in the
//! machine's mount namespace, where `wg` may unlink someone else's dead socket.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::cmd;
use crate::netns::Netns;

/// The device flanneld's wireguard backend makes.
pub const DEV: &str = "flannel-wg";

/// The IPv6 device flanneld makes beside it on a dual-stack network (Mode `separate`).
pub const DEV6: &str = "flannel-wg-v6";

/// flannel's default ListenPort and ListenPortV6.
pub const PORT: u16 = 51820;
pub const PORT6: u16 = 51821;

/// The programs this needs (Debian's wireguard-go and wireguard-tools, util-linux).
pub const TOOLS: [&str; 4] = ["wireguard-go", "wg", "nsenter", "unshare"];

/// A new private key (`wg genkey`) in `dir/wireguard-go.key`: its path.
pub fn new_key(dir: &Path) -> PathBuf {
    let private = cmd::output(Command::new("wg").arg("genkey"), cmd::TIMEOUT);
    assert!(private.status.success(), "wg genkey");
    let key_file = dir.join("wireguard-go.key");
    std::fs::create_dir_all(dir).expect("key dir");
    std::fs::write(&key_file, &private.stdout).expect("key file");
    key_file
}

/// The public key (`wg pubkey`) of the private key in `key_file`, base64.
pub fn public_key(key_file: &Path) -> String {
    let private = std::fs::read(key_file).expect("key file");
    let public = cmd::output_with_input(
        Command::new("wg").arg("pubkey"),
        Some(&private),
        cmd::TIMEOUT,
    );
    assert!(public.status.success(), "wg pubkey");
    String::from_utf8_lossy(&public.stdout).trim().to_string()
}

/// A running wireguard-go with its device; killed (by its PID) when dropped.
pub struct WireguardGo {
    child: Child,
    pid: String,
    /// Its device's name.
    pub dev: &'static str,
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
        let key = new_key(dir);
        Self::device(ns, DEV, &key, (address.into(), port), mtu, network.into())
    }

    /// wireguard-go's `dev` in `ns` as flanneld leaves it: the private key in `key_file`, `port`,
    /// `address` as a host address (/32, /128), `mtu`, up, and `network` routed into it with scope
    /// link.
    pub fn device(
        ns: &Netns,
        dev: &'static str,
        key_file: &Path,
        (address, port): (IpAddr, u16),
        mtu: u32,
        network: IpNet,
    ) -> Self {
        let public_key = public_key(key_file);
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
                dev,
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
            dev,
            public_key,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(go.isolated() && ns.link(dev).is_some() && go.wg(&["show", dev]).0) {
            assert!(Instant::now() < deadline, "wireguard-go made no {dev}");
            std::thread::sleep(Duration::from_millis(50));
        }
        let key = key_file.display().to_string();
        go.must(&[
            "set",
            dev,
            "private-key",
            &key,
            "listen-port",
            &port.to_string(),
        ]);
        let host = IpNet::from(address).to_string();
        ns.must(&["ip", "addr", "add", &host, "dev", dev]);
        ns.must(&["ip", "link", "set", dev, "mtu", &mtu.to_string(), "up"]);
        let net = network.to_string();
        ns.must(&["ip", "route", "add", &net, "dev", dev, "scope", "link"]);
        go
    }

    /// A peer for a lease, as flanneld adds one: its key, PublicIP:Port (or [PublicIPv6]:Port),
    /// its subnet of this device's family.
    pub fn add_peer(&self, key: &str, endpoint: SocketAddr, subnet: impl Into<IpNet>) {
        let (endpoint, subnet) = (endpoint.to_string(), subnet.into().to_string());
        let args = ["set", self.dev, "peer", key, "endpoint", &endpoint];
        self.must(&[&args[..], &["allowed-ips", &subnet]].concat());
    }

    /// When it last completed a handshake with the peer `key` (seconds since the epoch; 0:
    /// never), if it has that peer.
    pub fn latest_handshake(&self, key: &str) -> Option<u64> {
        let shakes = self.must(&["show", self.dev, "latest-handshakes"]);
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

/// A flanneld wireguard node on a dual-stack network in Mode `separate` (flannel's default):
/// `flannel-wg` on [`PORT`] and `flannel-wg-v6` on [`PORT6`], one private key for both, each
/// device with its family's lease address, network route and peers.
pub struct DualStack {
    pub v4: WireguardGo,
    pub v6: WireguardGo,
}

impl DualStack {
    /// Both devices in `ns` (the key file in `dir`) for the lease (`subnet`, `subnet6`) of the
    /// networks (`network`, `network6`), MTU `mtu` on both.
    pub fn new(
        ns: &Netns,
        dir: &Path,
        (subnet, subnet6): (Ipv4Net, Ipv6Net),
        (network, network6): (Ipv4Net, Ipv6Net),
        mtu: u32,
    ) -> Self {
        let key = new_key(dir);
        let device = |dev, address: IpAddr, port, network: IpNet| {
            WireguardGo::device(ns, dev, &key, (address, port), mtu, network)
        };
        let v4 = device(DEV, subnet.network().into(), PORT, network.into());
        let v6 = device(DEV6, subnet6.network().into(), PORT6, network6.into());
        Self { v4, v6 }
    }

    /// The one public key both devices have.
    pub fn public_key(&self) -> &str {
        &self.v4.public_key
    }

    /// A dual-stack peer in separate mode, as flanneld adds one: on `flannel-wg` at
    /// `ip`:[`PORT`] for `subnet`, on `flannel-wg-v6` at `[ip6]`:[`PORT6`] for `subnet6`.
    pub fn add_peer(
        &self,
        key: &str,
        (ip, ip6): (Ipv4Addr, Ipv6Addr),
        (subnet, subnet6): (Ipv4Net, Ipv6Net),
    ) {
        self.v4.add_peer(key, (ip, PORT).into(), subnet);
        self.v6.add_peer(key, (ip6, PORT6).into(), subnet6);
    }
}
