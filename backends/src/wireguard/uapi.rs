//! WireGuard's control socket for weft's userspace data plane, so that `wg show flannel-wg` (and
//! `flannel-wg-v6`) works as it does with the kernel's WireGuard or wireguard-go, and `weftctl
//! doctor` reads the peers' handshakes from it. Read-only: weft owns the devices' configuration
//! (it comes from the leases), so `set` is refused with EPERM.
//!
//! The socket is `/var/run/wireguard/<device>.sock` (wireguard-tools looks there), 0600.
//! That path is one for the whole machine, whatever the network namespace: where several weftd
//! run on one machine (tests), `WIREGUARD_SOCKET_DIR` gives each a directory of its own. A socket
//! file someone still answers on (wireguard-go, another weftd) is left alone and weft goes
//! without one; a dead one (a weftd that was killed) is replaced.
//!
//! The protocol (wireguard.com/xplatform): a request is `get=1\n\n` or `set=1\n…\n\n`; the answer
//! is `key=value` lines ending with `errno=N` and an empty line. Keys are in hex.

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use ipnet::IpNet;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use tracing::{debug, info, warn};

use super::key::Key;
/// The devices a socket may be for.
pub use super::want::{DEVICE, DEVICE_V6};
use crate::Error;

/// Where the socket lives unless `WIREGUARD_SOCKET_DIR` says otherwise: wireguard-tools' place.
pub const DEFAULT_DIR: &str = "/var/run/wireguard";

/// The longest request read (a `get` is 7 bytes; a `set` weft refuses anyway).
const MAX_REQUEST: u64 = 4096;

/// How long one client may take to send its request or read the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(1);

/// The device as `get` reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Device {
    pub private_key: Key,
    pub listen_port: u16,
    pub peers: Vec<Peer>,
}

/// One peer as `get` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub public_key: Key,
    pub psk: Option<Key>,
    pub endpoint: SocketAddr,
    /// Its AllowedIPs: an IPv4 subnet, an IPv6 one, or both.
    pub allowed_ips: Vec<IpNet>,
    pub keepalive: Option<u16>,
    /// When a handshake last completed; `None`: never.
    pub last_handshake: Option<SystemTime>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// Where the sockets live: `WIREGUARD_SOCKET_DIR`, else [`DEFAULT_DIR`].
pub fn socket_dir() -> PathBuf {
    std::env::var_os("WIREGUARD_SOCKET_DIR")
        .filter(|d| !d.is_empty())
        .map_or_else(|| PathBuf::from(DEFAULT_DIR), PathBuf::from)
}

/// `device`'s socket: [`socket_dir`] / `<device>.sock`.
pub fn socket_path(device: &str) -> PathBuf {
    socket_dir().join(format!("{device}.sock"))
}

fn hex(key: &Key) -> String {
    key.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// The answer to `get=1`.
pub fn get_answer(d: &Device) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "private_key={}", hex(&d.private_key));
    let _ = writeln!(s, "listen_port={}", d.listen_port);
    for p in &d.peers {
        let _ = writeln!(s, "public_key={}", hex(&p.public_key));
        if let Some(psk) = &p.psk {
            let _ = writeln!(s, "preshared_key={}", hex(psk));
        }
        let _ = writeln!(s, "protocol_version=1");
        let _ = writeln!(s, "endpoint={}", p.endpoint);
        let since = p
            .last_handshake
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .unwrap_or_default();
        let _ = writeln!(s, "last_handshake_time_sec={}", since.as_secs());
        let _ = writeln!(s, "last_handshake_time_nsec={}", since.subsec_nanos());
        let _ = writeln!(s, "tx_bytes={}", p.tx_bytes);
        let _ = writeln!(s, "rx_bytes={}", p.rx_bytes);
        let _ = writeln!(
            s,
            "persistent_keepalive_interval={}",
            p.keepalive.unwrap_or(0)
        );
        // An IPv6 endpoint prints as `[addr]:port`, which wg reads.
        for net in &p.allowed_ips {
            let _ = writeln!(s, "allowed_ip={net}");
        }
    }
    s.push_str("errno=0\n\n");
    s
}

/// What `weftctl doctor` needs of a `get=1` answer: each peer's public key (hex), endpoint and
/// last handshake (seconds since the epoch; 0: never). Anything else is skipped; an answer
/// without `errno=0` is an error.
pub fn parse_get(text: &str) -> Result<Vec<(String, String, u64)>, String> {
    let mut peers: Vec<(String, String, u64)> = Vec::new();
    let mut errno = None;
    for line in text.lines() {
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        match (k, peers.last_mut()) {
            ("public_key", _) => peers.push((v.to_string(), String::new(), 0)),
            ("endpoint", Some(p)) => p.1 = v.to_string(),
            ("last_handshake_time_sec", Some(p)) => {
                p.2 = v
                    .parse()
                    .map_err(|_| format!("last_handshake_time_sec={v:?} is not a number"))?;
            }
            ("errno", _) => errno = Some(v.to_string()),
            _ => {}
        }
    }
    match errno.as_deref() {
        Some("0") => Ok(peers),
        Some(e) => Err(format!("the device answered errno={e}")),
        None => Err("the answer ended before its errno line".into()),
    }
}

/// The kernel WireGuard device `device`'s peers as [`parse_get`] gives them, over generic
/// netlink (what `wg show` does for a kernel device).
pub fn kernel_peers(device: &str) -> Result<Vec<(String, String, u64)>, String> {
    let mut genl = super::genl::Genl::open().map_err(|e| e.to_string())?;
    let peers = genl
        .peer_states(device)
        .map_err(|e| format!("read {device} over netlink: {e}"))?;
    Ok(peers
        .into_iter()
        .map(|(key, endpoint, shake)| {
            let endpoint = endpoint.map(|e| e.to_string()).unwrap_or_default();
            (hex(&key), endpoint, shake)
        })
        .collect())
}

/// Asks the socket at `path` for the device (`wg show`'s request), within `limit`.
pub fn query(path: &std::path::Path, limit: Duration) -> io::Result<String> {
    let mut s = UnixStream::connect(path)?;
    s.set_read_timeout(Some(limit))?;
    s.set_write_timeout(Some(limit))?;
    s.write_all(b"get=1\n\n")?;
    let mut text = String::new();
    s.take(16 << 20).read_to_string(&mut text)?;
    Ok(text)
}

/// The socket, answered from its own thread.
pub struct Server {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    wake: UnixStream,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Listens at `path` ([`socket_path`]) for the device `name`, answering from `device`.
    /// `None` (said once) where another process answers there, or the socket cannot be made:
    /// the data plane works without it.
    pub fn start(path: PathBuf, name: &str, device: Arc<Mutex<Device>>) -> Option<Self> {
        let shown = path.display().to_string();
        let served = Self::bind(&path).and_then(|l| Self::serve(path, name, l, device));
        served
            .map_err(|e| {
                warn!(path = %shown, "no WireGuard control socket (`wg show` will not see {name}): {e}");
            })
            .ok()
    }

    fn bind(path: &std::path::Path) -> Result<UnixListener, Error> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(Error::io(format!("make {}", dir.display())))?;
        }
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(Error::Other(format!(
                    "{} exists and is not a socket; weft leaves it alone",
                    path.display()
                )));
            }
            match UnixStream::connect(path) {
                Ok(_) => {
                    return Err(Error::Other(format!(
                        "another process answers on {} (wireguard-go, another weftd?)",
                        path.display()
                    )))
                }
                // Nobody listens: a socket left by a weftd that did not stop cleanly.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    std::fs::remove_file(path)
                        .map_err(Error::io(format!("remove the dead {}", path.display())))?;
                }
                Err(e) => {
                    return Err(Error::Other(format!(
                        "{} cannot be checked: {e}",
                        path.display()
                    )))
                }
            }
        }
        let listener =
            UnixListener::bind(path).map_err(Error::io(format!("bind {}", path.display())))?;
        // Private to root, as the kernel's interface is: the answer holds the private key.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(Error::io(format!("make {} private", path.display())))?;
        Ok(listener)
    }

    fn serve(
        path: PathBuf,
        name: &str,
        listener: UnixListener,
        device: Arc<Mutex<Device>>,
    ) -> Result<Self, Error> {
        listener
            .set_nonblocking(true)
            .map_err(Error::io("make the control socket non-blocking"))?;
        let (wake, woken) = UnixStream::pair().map_err(Error::io("make a wake-up pair"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name(thread_name(name, "-uapi"))
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    let mut fds = [
                        PollFd::new(listener.as_fd(), PollFlags::POLLIN),
                        PollFd::new(woken.as_fd(), PollFlags::POLLIN),
                    ];
                    if poll(&mut fds, PollTimeout::NONE).is_err() {
                        continue;
                    }
                    while let Ok((client, _)) = listener.accept() {
                        if let Err(e) = answer(client, &device) {
                            debug!(error = %e, "WireGuard control socket: a client went away");
                        }
                    }
                }
            })
            .map_err(Error::io("start the control socket's thread"))?;
        info!(path = %path.display(), "WireGuard control socket (`wg show {name}`)");
        Ok(Self {
            path,
            stop,
            wake,
            thread: Some(thread),
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.wake.write(&[1]);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A thread's name for device `name`: `weft-wg`, `weft-wg-v6` and `suffix` (Linux keeps 15
/// bytes of it).
pub(super) fn thread_name(name: &str, suffix: &str) -> String {
    let short = name.strip_prefix("flannel-").unwrap_or(name);
    format!("weft-{short}{suffix}")
}

/// One client: its request, then the answer.
fn answer(mut client: UnixStream, device: &Mutex<Device>) -> io::Result<()> {
    client.set_nonblocking(false)?;
    client.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    client.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let mut request = Vec::new();
    let mut byte = [0u8; 1];
    // Up to the empty line that ends a request.
    let mut reader = (&client).take(MAX_REQUEST);
    while !request.ends_with(b"\n\n") && reader.read(&mut byte)? == 1 {
        request.push(byte[0]);
    }
    let reply = if request.starts_with(b"get=1\n") {
        let d = device
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        get_answer(&d)
    } else {
        // set=1 (weft owns the configuration) or anything else.
        "errno=1\n\n".to_string()
    };
    client.write_all(reply.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> Device {
        Device {
            private_key: [1; 32],
            listen_port: 51820,
            peers: vec![Peer {
                public_key: [0xab; 32],
                psk: None,
                endpoint: "192.168.1.2:51820".parse().expect("endpoint"),
                allowed_ips: vec!["10.244.2.0/24".parse().expect("net")],
                keepalive: Some(25),
                last_handshake: Some(SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 5)),
                rx_bytes: 10,
                tx_bytes: 20,
            }],
        }
    }

    #[test]
    fn get_answers_as_wireguard_tools_read_it_and_doctor_reads_it_back() {
        let text = get_answer(&device());
        assert!(text.starts_with(&format!(
            "private_key={}\nlisten_port=51820\n",
            "01".repeat(32)
        )));
        for line in [
            &format!("public_key={}", "ab".repeat(32)),
            "endpoint=192.168.1.2:51820",
            "last_handshake_time_sec=1700000000",
            "last_handshake_time_nsec=5",
            "persistent_keepalive_interval=25",
            "allowed_ip=10.244.2.0/24",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in {text}");
        }
        assert!(text.ends_with("errno=0\n\n"), "{text}");
        assert_eq!(
            parse_get(&text),
            Ok(vec![(
                "ab".repeat(32),
                "192.168.1.2:51820".into(),
                1_700_000_000
            )])
        );
    }

    /// A peer of a device carrying both families, reached over IPv6: `wg` takes the endpoint
    /// in brackets and one `allowed_ip` line per subnet.
    fn device_v6() -> Device {
        let mut d = device();
        d.listen_port = 51821;
        let p = &mut d.peers[0];
        p.endpoint = "[fd00:192:168:100::2]:51821".parse().expect("endpoint");
        p.allowed_ips = vec![
            "10.244.2.0/24".parse().expect("net"),
            "fd00:244:0:2::/64".parse().expect("net"),
        ];
        d
    }

    #[test]
    fn an_ipv6_endpoint_is_bracketed_and_each_allowed_ip_has_its_line() {
        let text = get_answer(&device_v6());
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines.contains(&"endpoint=[fd00:192:168:100::2]:51821"),
            "{text}"
        );
        let allowed: Vec<&str> = (lines.iter().copied())
            .filter(|l| l.starts_with("allowed_ip="))
            .collect();
        assert_eq!(
            allowed,
            ["allowed_ip=10.244.2.0/24", "allowed_ip=fd00:244:0:2::/64"],
            "{text}"
        );
        assert_eq!(
            parse_get(&text),
            Ok(vec![(
                "ab".repeat(32),
                "[fd00:192:168:100::2]:51821".into(),
                1_700_000_000
            )])
        );
    }

    /// wireguard-tools itself reads the answer: `wg show` over the socket, as an operator would.
    /// wg looks only at /var/run/wireguard, which is the machine's: it runs in a mount namespace
    /// of its own where a bind mount puts the test's directory there.
    #[test]
    fn wg_show_reads_an_ipv6_endpoint_and_both_allowed_ips() {
        const TEST: &str = "uapi::wg_show_reads_an_ipv6_endpoint_and_both_allowed_ips";
        if !weft_lab::require_tools(TEST, &["wg", "unshare"]) {
            return;
        }
        let dir = std::env::temp_dir().join(format!("weft-uapi6-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("weft-test6.sock");
        let listener = Server::bind(&path).expect("bind");
        let device = Arc::new(Mutex::new(device_v6()));
        let server = Server::serve(path, "weft-test6", listener, device).expect("serve");
        let out = std::process::Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(
                "mount -t tmpfs -o size=1m weft-uapi /run && mkdir /run/wireguard \
                 && mount --bind \"$0\" /run/wireguard && exec wg show weft-test6 dump",
            )
            .arg(&dir)
            .env("WG_HIDE_KEYS", "never")
            .output()
            .expect("run wg");
        drop(server);
        let _ = std::fs::remove_dir_all(&dir);
        let text = String::from_utf8_lossy(&out.stdout);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{text} {err}");
        // dump: the device's line, then per peer: key, psk, endpoint, allowed ips, handshake, …
        let line = text.lines().nth(1).expect("a peer line");
        let peer: Vec<&str> = line.split('\t').collect();
        assert_eq!(peer[0], BASE64_AB, "{text}");
        assert_eq!(peer[2], "[fd00:192:168:100::2]:51821", "{text}");
        assert_eq!(peer[3], "10.244.2.0/24,fd00:244:0:2::/64", "{text}");
        assert_eq!(peer[4], "1700000000", "{text}");
    }

    /// [0xab; 32] in base64, as wg prints keys.
    const BASE64_AB: &str = "q6urq6urq6urq6urq6urq6urq6urq6urq6urq6urq6s=";

    #[test]
    fn the_socket_lives_in_its_directory_under_the_device_name() {
        let dir = socket_dir();
        assert_eq!(socket_path(DEVICE), dir.join("flannel-wg.sock"));
        assert_eq!(socket_path(DEVICE_V6), dir.join("flannel-wg-v6.sock"));
        assert_eq!(thread_name(DEVICE, ""), "weft-wg");
        assert_eq!(thread_name(DEVICE_V6, "-uapi"), "weft-wg-v6-uapi");
        assert!(
            thread_name(DEVICE_V6, "-uapi").len() <= 15,
            "Linux keeps 15 bytes"
        );
    }

    #[test]
    fn a_failed_or_cut_answer_is_an_error() {
        assert!(parse_get("errno=1\n\n").is_err());
        assert!(parse_get("public_key=00\nlast_handshake_time_sec=1\n").is_err());
        assert!(parse_get("public_key=00\nlast_handshake_time_sec=x\nerrno=0\n").is_err());
    }

    #[test]
    fn the_socket_answers_get_refuses_set_and_goes_with_the_server() {
        let dir = std::env::temp_dir().join(format!("weft-uapi-{}", std::process::id()));
        let path = dir.join(format!("{DEVICE}.sock"));
        // A dead socket from an earlier run is replaced.
        std::fs::create_dir_all(&dir).expect("dir");
        drop(UnixListener::bind(&path).expect("a dead socket"));
        let listener = Server::bind(&path).expect("bind over the dead one");
        let server = Server::serve(
            path.clone(),
            DEVICE,
            listener,
            Arc::new(Mutex::new(device())),
        )
        .expect("serve");
        let got = query(&path, Duration::from_secs(5)).expect("get");
        assert_eq!(got, get_answer(&device()));
        let mut s = UnixStream::connect(&path).expect("connect");
        s.write_all(b"set=1\nlisten_port=1\n\n").expect("set");
        let mut reply = String::new();
        s.read_to_string(&mut reply).expect("reply");
        assert_eq!(reply, "errno=1\n\n");
        // One that answers is never taken over.
        assert!(Server::bind(&path).is_err());
        drop(server);
        assert!(!path.exists(), "removed with the server");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
