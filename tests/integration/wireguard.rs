//! wireguard through weftd: flannel's encrypted data plane on simulated hosts. This kernel may have
//! no WireGuard, so weftd runs its userspace WireGuard on a TUN device `flannel-wg`. Needs root;
//! the interop test needs Debian's wireguard-go and wireguard-tools too.
//!
//! Every weftd gets a key file of its own (`WIREGUARD_KEY_FILE` in its host's directory): several
//! weftd on one machine would otherwise share `/run/flannel/wgkey`, and with it one key.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use weft_lab::flannel;
use weft_lab::json::rows;

use crate::harness::wait_for;
use crate::netns::{require_root, Host, Topology, PREFIX};

const WIREGUARD: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard"}}"#;
pub(crate) const DEV: &str = "flannel-wg";
const T: Duration = Duration::from_secs(30);

/// Host `i`'s private key file, in its own directory.
pub(crate) fn key_file(t: &Topology, i: usize) -> PathBuf {
    t.hosts[i].dir.join("wgkey")
}

/// Starts weftd on host `i` with its own key file and control sockets (`wg show`'s), both in
/// its host's directory, and `extra` flags.
pub(crate) fn start(t: &mut Topology, i: usize, extra: &[&str]) {
    let key = key_file(t, i).display().to_string();
    let sockets = t.hosts[i].dir.display().to_string();
    let env = [
        ("WIREGUARD_KEY_FILE", &*key),
        ("WIREGUARD_SOCKET_DIR", &*sockets),
    ];
    t.start_with(i, extra, &env);
}

/// `n` hosts running weftd with the wireguard config, their containers wired.
fn hosts(n: usize) -> Topology {
    let mut t = Topology::new(n, 1500);
    t.set_config(WIREGUARD);
    for i in 0..n {
        start(&mut t, i, &[]);
    }
    for i in 0..n {
        t.wire_container(i);
    }
    t
}

pub(crate) fn lease_json(t: &Topology, i: usize) -> serde_json::Value {
    let subnet = t.hosts[i].wait_subnet();
    let text = t
        .etcd()
        .get(&flannel::lease_key(PREFIX, subnet))
        .expect("lease");
    serde_json::from_str(&text).expect("lease JSON")
}

/// The lease's PublicKey, checked to be a WireGuard key in base64 (44 characters, 32 bytes).
pub(crate) fn public_key(lease: &serde_json::Value) -> String {
    key_in(lease, "BackendData")
}

/// The PublicKey in the lease's `field` (BackendData, BackendV6Data), checked as [`public_key`].
pub(crate) fn key_in(lease: &serde_json::Value, field: &str) -> String {
    let key = lease[field]["PublicKey"]
        .as_str()
        .unwrap_or_else(|| panic!("no {field} PublicKey: {lease}"))
        .to_string();
    let b64 = |c: char| c.is_ascii_alphanumeric() || c == '+' || c == '/';
    assert!(
        key.len() == 44 && key.ends_with('=') && key[..43].chars().all(b64),
        "not a base64 WireGuard key: {key:?}"
    );
    key
}

/// flannel-wg on host `i` as (mtu, addresses, owned routes "dst dev").
fn flannel_wg(t: &Topology, i: usize) -> (u64, Vec<String>, Vec<String>) {
    let (mtu, addrs) = wg_device(t, i, DEV);
    (mtu, addrs, wg_routes(t, i))
}

/// WireGuard device `dev` on host `i` as (mtu, its global addresses of both families, sorted).
pub(crate) fn wg_device(t: &Topology, i: usize, dev: &str) -> (u64, Vec<String>) {
    let ns = &t.hosts[i].ns;
    let link = ns.link(dev).unwrap_or_else(|| panic!("{dev} exists"));
    let kind = link["linkinfo"]["info_kind"].as_str().unwrap_or("");
    assert!(
        kind == "tun" || kind == "wireguard",
        "{dev} is userspace WireGuard's TUN device or the kernel's: {link}"
    );
    let addrs = ns.ip_json(&format!("addr show dev {dev} scope global"));
    // `ip -j` leaves an entry without "local" for each address the scope filter drops (the
    // kernel's IPv6 link-local one).
    let mut addrs: Vec<String> = addrs[0]["addr_info"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| Some(format!("{}/{}", a["local"].as_str()?, a["prefixlen"])))
        .collect();
    addrs.sort();
    (link["mtu"].as_u64().unwrap_or(0), addrs)
}

/// weft's routes (protocol 87) on host `i`, IPv4's then IPv6's, as "dst dev".
pub(crate) fn wg_routes(t: &Topology, i: usize) -> Vec<String> {
    let ns = &t.hosts[i].ns;
    let mut routes = rows(&ns.ip_json("route show proto 87"), &["dst", "dev"]);
    routes.extend(rows(&ns.ip_json("-6 route show proto 87"), &["dst", "dev"]));
    routes
}

/// `wg show DEV dump` of weftd on host `h`, read from its control socket in the host's directory:
/// wg looks in /var/run/wireguard, so it gets the directory there in a mount namespace of its own
/// (the machine's is left alone). The device's line (private-key public-key listen-port fwmark),
/// then one per peer: public-key preshared-key endpoint allowed-ips latest-handshake rx tx
/// keepalive, tab-separated.
pub(crate) fn wg_show(h: &Host, dev: &str) -> String {
    h.ns.must(&[
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        "mount -t tmpfs -o size=1m weft-wg /run && mkdir /run/wireguard \
         && mount --bind \"$0\" /run/wireguard && exec wg show \"$1\" dump",
        &h.dir.display().to_string(),
        dev,
    ])
}

/// The fields of the peer `key`'s line in a [`wg_show`] dump, if it has that peer.
pub(crate) fn dump_peer(dump: &str, key: &str) -> Option<Vec<String>> {
    let line = dump.lines().skip(1).find(|l| l.starts_with(key))?;
    Some(line.split('\t').map(str::to_string).collect())
}

/// Kills a spawned process (a pinger) when the test ends, however it ends.
pub(crate) struct Reaped(Option<Child>);

impl Reaped {
    /// Waits for the process to end by itself; its output.
    fn finish(mut self) -> Output {
        self.0
            .take()
            .expect("running")
            .wait_with_output()
            .expect("wait")
    }

    /// Waits for a [`ping_series`] to end: its output, and each reply's (icmp_seq, timestamp).
    pub(crate) fn replies(self) -> (String, Vec<(u32, f64)>) {
        let out = self.finish();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let replies = text.lines().filter_map(reply).collect();
        (text, replies)
    }
}

/// `count` pings 20 ms apart, timestamped, from host `h`'s container to `to`, running on.
pub(crate) fn ping_series(h: &Host, to: IpAddr, count: u32) -> Reaped {
    let family = if to.is_ipv6() { "-6" } else { "-4" };
    let (count, to) = (count.to_string(), to.to_string());
    Reaped(Some(
        h.container
            .command("ping")
            .args([family, "-D", "-c", &count, "-i", "0.02", "-W", "1", &to])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("ping"),
    ))
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A `ping -D` reply's (icmp_seq, timestamp in seconds).
fn reply(line: &str) -> Option<(u32, f64)> {
    let stamp = line.strip_prefix('[')?.split(']').next()?.parse().ok()?;
    let seq = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("icmp_seq="))?
        .parse()
        .ok()?;
    line.contains(" bytes from ").then_some((seq, stamp))
}

#[test]
fn two_weft_hosts_over_wireguard_reach_each_others_containers() {
    if !require_root("two_weft_hosts_over_wireguard_reach_each_others_containers") {
        return;
    }
    let t = hosts(2);
    t.assert_full_mesh(&[0, 1]);
    let mut keys = Vec::new();
    for i in 0..2 {
        let subnet = t.hosts[i].wait_subnet();
        let lease = lease_json(&t, i);
        assert_eq!(lease["BackendType"], "wireguard", "{lease}");
        assert_eq!(lease["BackendData"]["Port"], 51820, "{lease}");
        assert_eq!(
            lease["PublicIP"],
            t.hosts[i].addr().to_string(),
            "the underlay address: {lease}"
        );
        keys.push(public_key(&lease));
        assert_eq!(t.hosts[i].env_var("FLANNEL_MTU").as_deref(), Some("1420"));
        assert_eq!(
            flannel_wg(&t, i),
            (
                1420,
                vec![format!("{}/32", subnet.network())],
                vec![format!("10.244.0.0/16 {DEV}")]
            ),
            "flannel-wg: MTU underlay-80, the lease's network address, one route for the network"
        );
        // The key came from (and went to) this host's own file, private to root.
        let meta = std::fs::metadata(key_file(&t, i)).expect("WIREGUARD_KEY_FILE written");
        assert_eq!(meta.permissions().mode() & 0o777, 0o400, "key file mode");
    }
    assert_ne!(keys[0], keys[1], "a key per host");
    for i in 0..2 {
        t.hosts[i].assert_running();
    }
}

#[test]
fn a_restart_keeps_the_key_and_the_device_and_costs_only_the_gap() {
    if !require_root("a_restart_keeps_the_key_and_the_device_and_costs_only_the_gap") {
        return;
    }
    let mut t = hosts(2);
    t.assert_full_mesh(&[0, 1]);
    let index = |t: &Topology| t.hosts[0].ns.link(DEV).map(|l| l["ifindex"].clone());
    let before = index(&t);
    assert!(before.is_some(), "flannel-wg exists");
    let subnet = t.hosts[0].wait_subnet();
    let lease = lease_json(&t, 0);
    let key = public_key(&lease);
    let key_text = std::fs::read(key_file(&t, 0)).expect("key file");

    // 600 pings 20 ms apart (12 s), timestamped, from host 0's container while weftd on host 0
    // restarts.
    const COUNT: u32 = 600;
    let pinger = ping_series(&t.hosts[0], t.hosts[1].container_ip().into(), COUNT);
    std::thread::sleep(Duration::from_millis(500));
    let stopped = Instant::now();
    t.hosts[0].stop();
    assert_eq!(index(&t), before, "flannel-wg stays while no weftd runs");
    let logged = t.hosts[0].log().len();
    start(&mut t, 0, &[]);
    wait_for("weftd to take flannel-wg again", T, || {
        t.hosts[0].assert_running();
        let log = t.hosts[0].log();
        log.get(logged..)?
            .contains("kernel state matches all 1 peers")
            .then_some(())
    });
    let restart = stopped.elapsed();
    let (text, replies) = pinger.replies();
    let received = u32::try_from(replies.len()).expect("count");
    let lost = COUNT - received;
    // The longest silence between two answers: the outage as the container saw it.
    let outage = replies
        .windows(2)
        .map(|w| w[1].1 - w[0].1)
        .fold(0.0, f64::max);
    let _ = writeln!(
        std::io::stderr(),
        "wireguard restart: {lost} of {COUNT} pings (20 ms apart) lost; longest silence \
         {outage:.2} s; SIGTERM to peers programmed again took {restart:?}"
    );

    let after = lease_json(&t, 0);
    assert_eq!(t.hosts[0].wait_subnet(), subnet, "the same subnet");
    assert_eq!(public_key(&after), key, "the same public key: {after}");
    assert_eq!(after["BackendData"], lease["BackendData"]);
    assert_eq!(
        std::fs::read(key_file(&t, 0)).expect("key file"),
        key_text,
        "the key file is reused, not rewritten"
    );
    assert_eq!(
        index(&t),
        before,
        "the same flannel-wg is reopened, not recreated"
    );
    // Traffic resumed within the series: the last pings were answered.
    let last = replies.last().map_or(0, |r| r.0);
    assert!(
        last + 10 >= COUNT,
        "the last answered ping is icmp_seq={last} of {COUNT}:\n{text}"
    );
    // Every ping but those sent while no weftd ran, and during one handshake, got through.
    let gap = u32::try_from((restart.as_millis() + 2000) / 20).unwrap_or(u32::MAX) + 2;
    assert!(
        lost <= gap,
        "{lost} lost, more than the restart gap plus a handshake ({gap}) allows:\n{text}"
    );
    t.assert_full_mesh(&[0, 1]);
    t.hosts[1].assert_running();
}

/// `wg show` (wireguard-tools, unchanged) reads weft's userspace device from its control socket
/// as it reads the kernel's, and `weftctl doctor` finds every peer there, shaken hands with.
#[test]
fn wg_show_and_doctor_read_the_userspace_device() {
    let name = "wg_show_and_doctor_read_the_userspace_device";
    if !require_root(name) || !weft_lab::require_tools(name, &["wg", "unshare"]) {
        return;
    }
    let t = hosts(2);
    t.assert_full_mesh(&[0, 1]);
    let h = &t.hosts[0];
    let peer_key = public_key(&lease_json(&t, 1));
    let peer_subnet = t.hosts[1].wait_subnet();
    let own_key = public_key(&lease_json(&t, 0));
    // The device's view (a peer's latest handshake, at [4]) is refreshed every second.
    let (dump, peer) = wait_for("wg show to see the handshake with host 1", T, || {
        let dump = wg_show(h, DEV);
        let peer = dump_peer(&dump, &peer_key)?;
        (peer.get(4).is_some_and(|h| h != "0")).then_some((dump, peer))
    });
    let own = dump.lines().next().expect("the device line");
    assert!(own.contains(&format!("\t{own_key}\t51820\t")), "{dump}");
    assert_eq!(peer[2], format!("{}:51820", t.hosts[1].addr()), "{dump}");
    assert_eq!(peer[3], peer_subnet.to_string(), "{dump}");
    assert_ne!(peer[5], "0", "bytes received: {dump}");

    let out = weft_lab::cmd::output(
        h.ns.command(env!("CARGO_BIN_EXE_weftctl"))
            .env("WIREGUARD_SOCKET_DIR", &h.dir)
            .arg(format!("-etcd-endpoints={}", t.etcd().endpoint))
            .arg(format!("-etcd-prefix={PREFIX}"))
            .arg("doctor")
            .arg(format!(
                "-subnet-file={}",
                h.dir.join("subnet.env").display()
            ))
            .arg(format!(
                "--docker-daemon-json={}",
                h.dir.join("daemon.json").display()
            )),
        Duration::from_secs(60),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("ok wireguard\n"), "{text}");
    assert!(text.contains("ok device\n"), "{text}");
}

/// The operator removes a host's key file (a key thought leaked) and restarts weftd: a new key is
/// made, published in the lease at once (the same subnet, taken over), and the peers follow it.
#[test]
fn a_new_key_is_published_at_once_and_peers_follow_it() {
    if !require_root("a_new_key_is_published_at_once_and_peers_follow_it") {
        return;
    }
    let mut t = hosts(2);
    t.assert_full_mesh(&[0, 1]);
    let subnet = t.hosts[0].wait_subnet();
    let old = public_key(&lease_json(&t, 0));

    t.hosts[0].stop();
    std::fs::remove_file(key_file(&t, 0)).expect("remove the key file");
    start(&mut t, 0, &[]);
    let new = wait_for("the new key in host 0's lease", T, || {
        t.hosts[0].assert_running();
        let key = public_key(&lease_json(&t, 0));
        (key != old).then_some(key)
    });
    assert_eq!(t.hosts[0].wait_subnet(), subnet, "the same subnet");
    let written = std::fs::read_to_string(key_file(&t, 0)).expect("a new key file");
    assert_eq!(written.trim().len(), 44, "a key in base64: {written:?}");
    assert!(
        t.hosts[0].log().contains(&new),
        "weftd names the key it made"
    );
    // Host 1 learns the new key from the lease and hands it to its WireGuard: traffic flows
    // both ways again.
    wait_for("host 1 to reach host 0 with its new key", T, || {
        t.ping(1, t.hosts[0].container_ip()).then_some(())
    });
    t.assert_full_mesh(&[0, 1]);
    t.hosts[1].assert_running();
}

/// A WireGuard peer weft did not write: Debian's wireguard-go with `wg` on a host with no weftd,
/// configured by hand as flanneld configures its device, its lease in etcd in flannel's bytes.
#[test]
fn a_hand_made_wireguard_go_peer_with_a_flannel_lease_in_etcd() {
    let name = "a_hand_made_wireguard_go_peer_with_a_flannel_lease_in_etcd";
    if !weft_lab::require_tools(name, &weft_lab::wireguard_go::TOOLS) {
        return;
    }
    let mut t = Topology::new(2, 1500);
    t.set_config(WIREGUARD);

    // Host 1 as flanneld leaves it (wireguard-go's flannel-wg, its key, port 51820, the lease's
    // network address /32, MTU 1420, the network routed into it with scope link), and its lease
    // as flanneld writes it, with a TTL (flanneld's is 24 h), before weftd starts: weft leases
    // around it.
    let go_subnet: ipnet::Ipv4Net = "10.244.200.0/24".parse().expect("subnet");
    let h1 = &t.hosts[1];
    let go = weft_lab::WireguardGo::flannel_wg(
        &h1.ns,
        &h1.dir,
        (go_subnet.network(), 51820),
        1420,
        "10.244.0.0/16".parse().expect("net"),
    );
    let go_ip = h1.addr();
    let value = flannel::wireguard_lease(go_ip, &go.public_key);
    t.etcd()
        .put_leased(&flannel::lease_key(PREFIX, go_subnet), &value, 24 * 3600);
    let h1 = &t.hosts[1];
    h1.wire_container(go_subnet, Some(1420));

    // weftd on host 0, then flanneld's peer for its lease on host 1.
    start(&mut t, 0, &[]);
    t.wire_container(0);
    let weft_subnet = t.hosts[0].wait_subnet();
    assert_ne!(weft_subnet, go_subnet, "weft leases around flannel's lease");
    let weft_key = public_key(&lease_json(&t, 0));
    let weft_ip = t.hosts[0].addr();
    go.add_peer(&weft_key, (weft_ip, 51820).into(), weft_subnet);

    let go_container = weft_lab::topology::container_ip(go_subnet);
    let weft_container = t.hosts[0].container_ip();
    let started = Instant::now();
    wait_for("weft's container to reach wireguard-go's", T, || {
        t.hosts[0].assert_running();
        t.ping(0, go_container).then_some(())
    });
    let first = started.elapsed();
    assert!(
        t.ping(1, weft_container),
        "wireguard-go's container → weft's"
    );
    assert!(
        t.ping(1, Ipv4Addr::from(u32::from(weft_subnet.network()) + 1)),
        "wireguard-go's container → weft host's cni0"
    );
    let _ = writeln!(
        std::io::stderr(),
        "wireguard-go interop: first ping through after {first:?}"
    );
    let shake = go.latest_handshake(&weft_key);
    assert!(
        shake.is_some_and(|t| t > 0),
        "a handshake with weft's key: {shake:?}"
    );
    assert_eq!(
        flannel_wg(&t, 0).2,
        vec![format!("10.244.0.0/16 {DEV}")],
        "one route for the network on weft's host"
    );
    t.hosts[0].assert_running();
    drop(go);
}
