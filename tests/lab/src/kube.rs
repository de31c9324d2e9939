//! A real kube-apiserver (Kubernetes v1.20.2, from `/work/shared/kube`, or any release binary named
//! by `KUBE_APISERVER`) with its own etcd, RBAC on and one static token per identity, for
//! weftd's Kubernetes mode.
//!
//! - [`require_kube`]`(test) -> Option<PathBuf>`: root, etcd, etcdctl, openssl, curl and the
//!   apiserver binary, or a visible skip (a failure under `CI=true`). The binary is
//!   `$KUBE_APISERVER`, else [`CACHE_BINARY`], unpacked there once from `kube-apiserver.gz` in
//!   [`shared_dir`] (`../shared/kube` beside the repository).
//! - [`KubeApi::start`]`(&Lab, users)`: etcd on the switch namespace's loopback (127.0.0.1:2379)
//!   and the apiserver bound to [`SWITCH_IP`] on a free port, so every simulated host reaches
//!   `https://10.199.0.1:PORT` ([`KubeApi::url`]). [`Lab::start_kube`] keeps one in the lab.
//!   [`KubeApi::start_loopback`]`(users)`: the same on 127.0.0.1 in this namespace, no lab.
//! - Trust: the apiserver makes its own serving certificate in `--cert-dir` (its SANs hold the
//!   bind/advertise address, checked at start); the CA that signed it is copied to
//!   [`KubeApi::ca_path`]. Clients verify TLS against it; nothing here skips verification.
//! - Identities: `--token-auth-file` with [`ADMIN`] (group `system:masters`) and one random token
//!   per name in `users` (no groups: RBAC grants them nothing until a test binds a role).
//!   [`KubeApi::token`], [`KubeApi::admin_token`], [`KubeApi::kubeconfig_for`] (a kubeconfig with
//!   `certificate-authority`, `server` and the user's token),
//!   [`KubeApi::service_account_token`] (a TokenRequest for a ServiceAccount).
//! - Admin helpers (curl as admin, from the apiserver's namespace, each call under a time limit):
//!   [`KubeApi::create_node`], [`KubeApi::node`], [`KubeApi::nodes`], [`KubeApi::patch_node`],
//!   [`KubeApi::patch_node_status`], [`KubeApi::set_pod_cidr`], [`KubeApi::delete_node`],
//!   [`KubeApi::create`] / [`KubeApi::create_all`] (YAML or JSON manifests, as admin),
//!   [`KubeApi::bind_cluster_role`], [`KubeApi::get`], [`KubeApi::watch`].
//! - Raw requests as anyone: [`KubeApi::as_user`] (from the apiserver's namespace) and
//!   [`KubeApi::as_user_from`] (from a host's namespace): `(HTTP status, body)`.
//! - Outages: [`KubeApi::stop`] / [`KubeApi::start_again`] (same flags, port, tokens, CA), and
//!   [`KubeApi::restart_forgetting_history`]: stop, compact etcd at its current revision, start:
//!   a client watching from an older resourceVersion then gets 410 Gone ("too old resource
//!   version", reason Expired).
//!
//! Everything started is killed by PID in `Drop` (also when a test panics) and the temp dirs go.
//! The apiserver uses ~300 MiB and takes ~4-8 s to `/readyz` on 2 cores.

use std::io::Read;
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tempfile::TempDir;

use crate::cmd::{self, tail};
use crate::etcd::Etcd;
use crate::netns::Netns;
use crate::skip::{require_tools, skip};
use crate::topology::{Lab, SWITCH_IP};
use crate::wait::free_port;

/// Where the shipped binary is unpacked once (what `start-apiserver.sh` uses too).
pub const CACHE_BINARY: &str = "/var/cache/kube-apiserver-1.20.2/kube-apiserver";

/// The user name of the admin token (group `system:masters`).
pub const ADMIN: &str = "admin";

/// How long one request to the apiserver may take.
const REQUEST: Duration = Duration::from_secs(20);

/// How long a start may take to `/readyz`.
const READY: Duration = Duration::from_secs(90);

/// `../shared/kube` beside the repository: `kube-apiserver.gz`, `start-apiserver.sh`.
pub fn shared_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/kube");
    dir.canonicalize().unwrap_or(dir)
}

/// Whether a kube-apiserver test can run: root, etcd, etcdctl, openssl, curl and the apiserver
/// binary, which is returned. Otherwise a visible skip naming `KUBE_APISERVER` (a failure under
/// `CI=true`).
pub fn require_kube(test: &str) -> Option<PathBuf> {
    if !require_tools(test, &["etcd", "etcdctl", "openssl", "curl"]) {
        return None;
    }
    match find_binary() {
        Ok(p) => Some(p),
        Err(why) => {
            skip(test, &why);
            None
        }
    }
}

/// The apiserver binary (unpacking it into [`CACHE_BINARY`] if needed); panics when there is
/// none (call [`require_kube`] first).
pub fn binary() -> PathBuf {
    find_binary().unwrap_or_else(|why| panic!("{why}"))
}

fn find_binary() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("KUBE_APISERVER") {
        let p = PathBuf::from(p);
        return if is_executable(&p) {
            Ok(p)
        } else {
            Err(format!(
                "needs a kube-apiserver, and KUBE_APISERVER={} is not an executable file",
                p.display()
            ))
        };
    }
    let cached = Path::new(CACHE_BINARY);
    if is_executable(cached) {
        return Ok(cached.into());
    }
    let gz = shared_dir().join("kube-apiserver.gz");
    if !gz.is_file() {
        return Err(format!(
            "needs a kube-apiserver: set KUBE_APISERVER to one (any official release binary \
             serves) or provide {}",
            gz.display()
        ));
    }
    unpack(&gz, cached)?;
    Ok(cached.into())
}

fn is_executable(p: &Path) -> bool {
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// gunzip into a temp name beside `to`, then rename: a concurrent test sees all or nothing.
fn unpack(gz: &Path, to: &Path) -> Result<(), String> {
    let dir = to.parent().expect("cache dir");
    std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let tmp = dir.join(format!(".kube-apiserver.{}.tmp", std::process::id()));
    let out = cmd::output(
        Command::new("sh")
            .args(["-c", "gunzip -c \"$1\" > \"$2\"", "sh"])
            .arg(gz)
            .arg(&tmp),
        Duration::from_secs(120),
    );
    let done = out.status.success()
        && std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).is_ok()
        && std::fs::rename(&tmp, to).is_ok();
    if !done {
        let _ = std::fs::remove_file(&tmp);
        return Err(format!(
            "could not unpack {} into {}: {}",
            gz.display(),
            to.display(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

/// 32 hex digits from /dev/urandom.
fn random_token() -> String {
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .expect("read /dev/urandom");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A kube-apiserver with its own etcd.
pub struct KubeApi {
    child: Option<Child>,
    /// The full command line (with `ip netns exec NS` in front when in a namespace).
    argv: Vec<String>,
    /// The namespace the apiserver and etcd run in (None: this one).
    ns: Option<String>,
    /// The address it is bound to and advertises.
    pub addr: Ipv4Addr,
    pub port: u16,
    /// (user, token), the admin first.
    tokens: Vec<(String, String)>,
    ca: PathBuf,
    log: PathBuf,
    last_start: Duration,
    /// Dropped after the apiserver is killed (Drop), before the dir.
    pub etcd: Etcd,
    dir: TempDir,
}

impl KubeApi {
    /// An apiserver in `lab`'s switch namespace bound to [`SWITCH_IP`], reachable from every
    /// host, with a token for [`ADMIN`] and for each of `users`. Its etcd listens on the switch's
    /// 127.0.0.1:2379 (one per lab).
    pub fn start(lab: &Lab, users: &[&str]) -> Self {
        Self::launch(Some(&lab.switch), SWITCH_IP, users)
    }

    /// The same on 127.0.0.1 in this process's namespace, etcd on free loopback ports.
    pub fn start_loopback(users: &[&str]) -> Self {
        Self::launch(None, Ipv4Addr::LOCALHOST, users)
    }

    fn launch(ns: Option<&Netns>, addr: Ipv4Addr, users: &[&str]) -> Self {
        let bin = binary();
        let dir = tempfile::Builder::new()
            .prefix("weft-kube-")
            .tempdir()
            .expect("kube dir");
        let d = dir.path();
        let etcd = match ns {
            Some(ns) => Etcd::start_in(ns, &[Ipv4Addr::LOCALHOST]),
            None => Etcd::start(),
        };

        let mut tokens = vec![(ADMIN.to_string(), random_token())];
        let mut csv = format!("{},{ADMIN},{ADMIN},system:masters\n", tokens[0].1);
        for u in users {
            assert!(
                !u.is_empty() && !u.contains([',', '"', '\n']) && *u != ADMIN,
                "user name {u:?}: not empty, no comma, quote or newline, not {ADMIN:?}"
            );
            let t = random_token();
            csv.push_str(&format!("{t},{u},{u}\n"));
            tokens.push((u.to_string(), t));
        }
        std::fs::write(d.join("tokens.csv"), csv).expect("tokens.csv");

        let (sa_key, sa_pub) = (d.join("sa.key"), d.join("sa.pub"));
        for args in [
            vec!["genrsa", "-out", path_str(&sa_key), "2048"],
            vec![
                "rsa",
                "-in",
                path_str(&sa_key),
                "-pubout",
                "-out",
                path_str(&sa_pub),
            ],
        ] {
            let out = cmd::output(Command::new("openssl").args(&args), cmd::TIMEOUT);
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::fs::create_dir_all(d.join("certs")).expect("cert dir");

        let port = free_port();
        let mut argv: Vec<String> = Vec::new();
        if let Some(ns) = ns {
            argv.extend(["ip", "netns", "exec", &ns.name].map(String::from));
        }
        argv.push(bin.display().to_string());
        let a = addr.to_string();
        let flags: [(&str, String); 16] = [
            ("--etcd-servers", etcd.endpoint.clone()),
            // 1.20 keeps a Node's second podCIDR (dual-stack) only with the gate on.
            ("--feature-gates", "IPv6DualStack=true".into()),
            ("--bind-address", a.clone()),
            ("--advertise-address", a),
            ("--secure-port", port.to_string()),
            ("--insecure-port", "0".into()),
            ("--cert-dir", d.join("certs").display().to_string()),
            ("--service-cluster-ip-range", "10.0.0.0/24".into()),
            (
                "--service-account-issuer",
                "https://kubernetes.default.svc.cluster.local".into(),
            ),
            ("--service-account-key-file", sa_pub.display().to_string()),
            (
                "--service-account-signing-key-file",
                sa_key.display().to_string(),
            ),
            (
                "--token-auth-file",
                d.join("tokens.csv").display().to_string(),
            ),
            ("--authorization-mode", "RBAC".into()),
            ("--disable-admission-plugins", "ServiceAccount".into()),
            ("--endpoint-reconciler-type", "none".into()),
            ("--profiling", "false".into()),
        ];
        // `--flag=value`: boolean flags take no separate value.
        argv.extend(flags.iter().map(|(k, v)| format!("{k}={v}")));

        let mut api = KubeApi {
            child: None,
            argv,
            ns: ns.map(|n| n.name.clone()),
            addr,
            port,
            tokens,
            ca: d.join("ca.crt"),
            log: d.join("apiserver.log"),
            last_start: Duration::ZERO,
            etcd,
            dir,
        };
        api.start_again();
        api
    }

    /// `https://ADDR:PORT`.
    pub fn url(&self) -> String {
        format!("https://{}:{}", self.addr, self.port)
    }

    /// The CA that signed the apiserver's serving certificate: what clients trust.
    pub fn ca_path(&self) -> &Path {
        &self.ca
    }

    /// The apiserver's own dir (tokens.csv, certs/, apiserver.log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `user`'s bearer token ([`ADMIN`] included); panics for a user it was not started with.
    pub fn token(&self, user: &str) -> &str {
        self.tokens
            .iter()
            .find(|(u, _)| u == user)
            .map(|(_, t)| t.as_str())
            .unwrap_or_else(|| panic!("the apiserver has no token for {user:?}"))
    }

    pub fn admin_token(&self) -> &str {
        &self.tokens[0].1
    }

    /// How long the last (re)start took until `/readyz` said ok.
    pub fn last_start(&self) -> Duration {
        self.last_start
    }

    /// The apiserver's output, every start appended.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Writes a kubeconfig for `user`'s token ([`ADMIN`] included) to `path`: `server` is
    /// [`KubeApi::url`], `certificate-authority` is [`KubeApi::ca_path`].
    pub fn kubeconfig_for(&self, user: &str, path: &Path) {
        // JSON strings are YAML double-quoted scalars: names with ':' are safe.
        let q = |s: &str| Value::String(s.into()).to_string();
        let text = format!(
            "apiVersion: v1\n\
             kind: Config\n\
             clusters:\n\
             - name: lab\n  cluster:\n    server: {}\n    certificate-authority: {}\n\
             users:\n\
             - name: {}\n  user:\n    token: {}\n\
             contexts:\n\
             - name: lab\n  context:\n    cluster: lab\n    user: {}\n\
             current-context: lab\n",
            q(&self.url()),
            q(path_str(&self.ca)),
            q(user),
            q(self.token(user)),
            q(user),
        );
        std::fs::write(path, text)
            .unwrap_or_else(|e| panic!("write kubeconfig {}: {e}", path.display()));
    }

    /// (Re)starts a stopped apiserver with the same flags, port, tokens and certificate, and
    /// waits for `/readyz`.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "the apiserver already runs");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("apiserver log");
        let began = Instant::now();
        // `ip netns exec` execs the program (no fork): the child's PID is the apiserver's.
        let child = Command::new(&self.argv[0])
            .args(&self.argv[1..])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {:?}: {e}", self.argv));
        self.child = Some(child);
        let deadline = began + READY;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                panic!(
                    "kube-apiserver exited with {status}; log:\n{}",
                    tail(&self.log(), 40)
                );
            }
            if self.ca.exists() || self.take_ca() {
                let (code, body) = self.request(
                    self.ns.as_deref(),
                    self.admin_token(),
                    "GET",
                    "/readyz",
                    None,
                    Duration::from_secs(2),
                );
                if code == 200 && body.trim() == "ok" {
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "kube-apiserver not ready in {READY:?}; log:\n{}",
                tail(&self.log(), 40)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        self.last_start = began.elapsed();
    }

    /// Once the apiserver has written its self-made certificate (the cert file, then the key),
    /// copies its CA (the bundle's last certificate) to `ca.crt` and checks that the serving
    /// certificate names the bound address.
    fn take_ca(&self) -> bool {
        let certs = self.dir.path().join("certs");
        let (crt, key) = (certs.join("apiserver.crt"), certs.join("apiserver.key"));
        if !key.exists() {
            return false;
        }
        let Ok(bundle) = std::fs::read_to_string(&crt) else {
            return false;
        };
        let begin = "-----BEGIN CERTIFICATE-----";
        let Some(last) = bundle.rfind(begin) else {
            return false;
        };
        let out = cmd::output(
            Command::new("openssl").args(["x509", "-noout", "-text", "-in", path_str(&crt)]),
            cmd::TIMEOUT,
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains(&format!("IP Address:{}", self.addr)),
            "the apiserver's serving certificate does not name {}:\n{text}",
            self.addr
        );
        std::fs::write(&self.ca, &bundle[last..]).expect("write ca.crt");
        true
    }

    /// Stops the apiserver (SIGTERM by PID, SIGKILL after 10 s); etcd keeps running. Clients
    /// see connections closed and refused until [`KubeApi::start_again`].
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = libc::pid_t::try_from(child.id()).expect("pid");
        // SAFETY: a signal to the child this lab started, by its PID (not yet reaped: it is ours).
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Restarts the apiserver so that the watch history clients hold is gone: stop, compact etcd
    /// at its current revision, start with the same flags. A watch or an exact list from an
    /// older resourceVersion then gets 410 Gone (reason Expired, "too old resource version").
    pub fn restart_forgetting_history(&mut self) {
        self.stop();
        self.etcd.compact();
        self.start_again();
    }

    /// A raw request with `token`, from namespace `from` (None: this one): (HTTP status, body);
    /// status 0 when no HTTP answer came (the body is then curl's error). A request still
    /// streaming after `limit` (a watch) is cut then, with what came so far.
    fn request(
        &self,
        from: Option<&str>,
        token: &str,
        method: &str,
        path: &str,
        body: Option<&str>,
        limit: Duration,
    ) -> (u16, String) {
        let mut c = match from {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "curl"]);
                c
            }
            None => Command::new("curl"),
        };
        c.args(["-sS", "--connect-timeout", "2", "--max-time"])
            .arg(format!("{:.1}", limit.as_secs_f64()))
            .arg("--cacert")
            .arg(&self.ca)
            .arg("-H")
            .arg(format!("Authorization: Bearer {token}"))
            .args(["-H", "Accept: application/json", "-X", method])
            .args(["-w", "\n%{http_code}"]);
        if let Some(b) = body {
            c.arg("-H")
                .arg(format!("Content-Type: {}", content_type(method, b)))
                .args(["--data-binary", "@-"]);
        }
        c.arg(format!("{}{path}", self.url()));
        let out = cmd::output_with_input(
            &mut c,
            body.map(str::as_bytes),
            limit + Duration::from_secs(10),
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        match code.trim().parse::<u16>() {
            Ok(code) if code != 0 => (code, body.to_string()),
            _ => (0, String::from_utf8_lossy(&out.stderr).into_owned()),
        }
    }

    /// A request as `user` ([`ADMIN`] included) from the apiserver's namespace: (HTTP status,
    /// body). A body is sent as a strategic-merge patch for PATCH, else as JSON when it starts
    /// with `{`, else as YAML.
    pub fn as_user(
        &self,
        user: &str,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> (u16, String) {
        self.request(
            self.ns.as_deref(),
            self.token(user),
            method,
            path,
            body,
            REQUEST,
        )
    }

    /// [`KubeApi::as_user`] from inside `ns` (a simulated host), TLS verified against
    /// [`KubeApi::ca_path`].
    pub fn as_user_from(
        &self,
        ns: &Netns,
        user: &str,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> (u16, String) {
        self.request(
            Some(&ns.name),
            self.token(user),
            method,
            path,
            body,
            REQUEST,
        )
    }

    /// An admin request that must answer 2xx; its JSON body.
    fn admin_ok(&self, method: &str, path: &str, body: Option<&str>) -> Value {
        let (code, text) = self.as_user(ADMIN, method, path, body);
        assert!(
            (200..300).contains(&code),
            "{method} {path} as admin: {code} {text}"
        );
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {text}"))
    }

    /// GET `path` as admin: the object, or None on 404.
    pub fn get(&self, path: &str) -> Option<Value> {
        let (code, text) = self.as_user(ADMIN, "GET", path, None);
        if code == 404 {
            return None;
        }
        assert_eq!(code, 200, "GET {path} as admin: {text}");
        Some(serde_json::from_str(&text).expect("JSON"))
    }

    /// Watches `path` (with `?watch=1&…`) as admin for `limit`: (HTTP status, the events that
    /// came). A watch the apiserver refuses early answers 410 itself, or 200 with one ERROR event
    /// whose object is a Status with code 410.
    pub fn watch(&self, path: &str, limit: Duration) -> (u16, Vec<Value>) {
        let (code, text) = self.request(
            self.ns.as_deref(),
            self.admin_token(),
            "GET",
            path,
            None,
            limit,
        );
        let events = if code == 200 {
            // One JSON object per event (curl's cut may leave the last one incomplete).
            serde_json::Deserializer::from_str(&text)
                .into_iter::<Value>()
                .map_while(Result::ok)
                .collect()
        } else {
            serde_json::from_str(&text).into_iter().collect()
        };
        (code, events)
    }

    /// Creates Node `name` as admin; `pod_cidr` sets spec.podCIDR and spec.podCIDRs (a
    /// dual-stack node: "v4,v6"). The created Node.
    pub fn create_node(
        &self,
        name: &str,
        pod_cidr: Option<&str>,
        annotations: &[(&str, &str)],
    ) -> Value {
        let mut node = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}});
        if !annotations.is_empty() {
            node["metadata"]["annotations"] = annotations
                .iter()
                .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
                .collect::<serde_json::Map<_, _>>()
                .into();
        }
        // "a,b": a dual-stack node, podCIDR the first and podCIDRs both, as the controller
        // manager assigns them.
        if let Some(c) = pod_cidr {
            let all: Vec<&str> = c.split(',').collect();
            node["spec"] = json!({"podCIDR": all[0], "podCIDRs": all});
        }
        self.admin_ok("POST", "/api/v1/nodes", Some(&node.to_string()))
    }

    pub fn node(&self, name: &str) -> Option<Value> {
        self.get(&format!("/api/v1/nodes/{name}"))
    }

    pub fn nodes(&self) -> Vec<Value> {
        let list = self.get("/api/v1/nodes").expect("node list");
        list["items"].as_array().cloned().unwrap_or_default()
    }

    /// A strategic-merge patch of Node `name` as admin; the Node after.
    pub fn patch_node(&self, name: &str, patch: &Value) -> Value {
        let path = format!("/api/v1/nodes/{name}");
        self.admin_ok("PATCH", &path, Some(&patch.to_string()))
    }

    /// A strategic-merge patch of Node `name`'s status subresource as admin; the Node after.
    pub fn patch_node_status(&self, name: &str, patch: &Value) -> Value {
        let path = format!("/api/v1/nodes/{name}/status");
        self.admin_ok("PATCH", &path, Some(&patch.to_string()))
    }

    /// Sets spec.podCIDR and spec.podCIDRs (once: Kubernetes refuses to change them later).
    pub fn set_pod_cidr(&self, name: &str, cidr: &str) -> Value {
        self.patch_node(
            name,
            &json!({"spec": {"podCIDR": cidr, "podCIDRs": [cidr]}}),
        )
    }

    pub fn delete_node(&self, name: &str) {
        self.admin_ok("DELETE", &format!("/api/v1/nodes/{name}"), None);
    }

    /// POSTs one manifest (YAML or JSON) as admin to its kind's collection; the created object.
    /// Knows the core and RBAC kinds (Namespace, ServiceAccount, ClusterRole, ClusterRoleBinding,
    /// Role, RoleBinding, ConfigMap, Secret, Node, …) and guesses the rest's plural.
    pub fn create(&self, doc: &str) -> Value {
        let path = manifest_path(doc).unwrap_or_else(|e| panic!("{e}:\n{doc}"));
        self.admin_ok("POST", &path, Some(doc))
    }

    /// [`KubeApi::create`] for every document of a multi-document YAML, in order.
    pub fn create_all(&self, yaml: &str) -> Vec<Value> {
        split_documents(yaml)
            .into_iter()
            .map(|d| self.create(&d))
            .collect()
    }

    /// Binds ClusterRole `role` to User `user` (ClusterRoleBinding `lab:ROLE:USER`).
    pub fn bind_cluster_role(&self, user: &str, role: &str) -> Value {
        let binding = json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": format!("lab:{role}:{user}")},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
        });
        self.create(&binding.to_string())
    }

    /// A fresh token (TokenRequest, one hour) for ServiceAccount `namespace/name`, which must
    /// exist: it authenticates as `system:serviceaccount:NAMESPACE:NAME`.
    pub fn service_account_token(&self, namespace: &str, name: &str) -> String {
        let req = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                         "spec": {"expirationSeconds": 3600}});
        let path = format!("/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token");
        let v = self.admin_ok("POST", &path, Some(&req.to_string()));
        v["status"]["token"]
            .as_str()
            .unwrap_or_else(|| panic!("no token in {v}"))
            .to_string()
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

fn content_type(method: &str, body: &str) -> &'static str {
    let b = body.trim_start();
    if method.eq_ignore_ascii_case("PATCH") {
        "application/strategic-merge-patch+json"
    } else if b.starts_with('{') || b.starts_with('[') {
        "application/json"
    } else {
        "application/yaml"
    }
}

/// The documents of a multi-document YAML (`---` lines between), empty ones left out.
pub fn split_documents(yaml: &str) -> Vec<String> {
    let mut docs = vec![String::new()];
    for line in yaml.lines() {
        if line.trim_end() == "---" || line.starts_with("--- ") {
            docs.push(String::new());
        } else {
            let d = docs.last_mut().expect("one document");
            d.push_str(line);
            d.push('\n');
        }
    }
    docs.retain(|d| {
        d.lines()
            .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
    });
    docs
}

/// Kinds that live outside namespaces.
const CLUSTER_SCOPED: &[&str] = &[
    "Namespace",
    "Node",
    "PersistentVolume",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "StorageClass",
    "PriorityClass",
    "PodSecurityPolicy",
    "RuntimeClass",
    "IngressClass",
    "CSIDriver",
    "CSINode",
    "APIService",
    "CertificateSigningRequest",
    "MutatingWebhookConfiguration",
    "ValidatingWebhookConfiguration",
];

/// The collection a manifest is POSTed to: from its apiVersion, kind and metadata.namespace
/// (JSON, or YAML with those as plain block-style keys).
pub fn manifest_path(doc: &str) -> Result<String, String> {
    let (api_version, kind, namespace) = if doc.trim_start().starts_with('{') {
        let v: Value = serde_json::from_str(doc).map_err(|e| format!("bad JSON manifest: {e}"))?;
        let s = |v: &Value| v.as_str().map(String::from);
        (
            s(&v["apiVersion"]),
            s(&v["kind"]),
            s(&v["metadata"]["namespace"]),
        )
    } else {
        yaml_head(doc)
    };
    let api_version = api_version.ok_or("manifest without apiVersion")?;
    let kind = kind.ok_or("manifest without kind")?;
    let base = if api_version.contains('/') {
        format!("/apis/{api_version}")
    } else {
        format!("/api/{api_version}")
    };
    let plural = plural(&kind);
    Ok(if CLUSTER_SCOPED.contains(&kind.as_str()) {
        format!("{base}/{plural}")
    } else {
        let ns = namespace.unwrap_or_else(|| "default".into());
        format!("{base}/namespaces/{ns}/{plural}")
    })
}

/// apiVersion, kind and metadata.namespace of a block-style YAML document.
fn yaml_head(doc: &str) -> (Option<String>, Option<String>, Option<String>) {
    let value = |s: &str| {
        let s = s.split(" #").next().unwrap_or("").trim();
        s.trim_matches(|c| c == '"' || c == '\'').to_string()
    };
    let (mut api_version, mut kind, mut namespace) = (None, None, None);
    let mut in_metadata = false;
    let mut meta_indent = None;
    for line in doc.lines() {
        let t = line.trim_start();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let indent = line.len() - t.len();
        if indent == 0 {
            in_metadata = t.trim_end() == "metadata:";
            meta_indent = None;
            if let Some(v) = t.strip_prefix("apiVersion:") {
                api_version = Some(value(v));
            } else if let Some(v) = t.strip_prefix("kind:") {
                kind = Some(value(v));
            }
        } else if in_metadata {
            let first = *meta_indent.get_or_insert(indent);
            if indent == first {
                if let Some(v) = t.strip_prefix("namespace:") {
                    namespace = Some(value(v));
                }
            }
        }
    }
    (api_version, kind, namespace)
}

/// The resource name of a kind: lower case, plural.
fn plural(kind: &str) -> String {
    let k = kind.to_ascii_lowercase();
    if k == "endpoints" {
        k
    } else if let Some(stem) = k
        .strip_suffix('y')
        .filter(|s| !s.ends_with(['a', 'e', 'o']))
    {
        format!("{stem}ies")
    } else if k.ends_with('s') || k.ends_with("sh") || k.ends_with("ch") || k.ends_with('x') {
        format!("{k}es")
    } else {
        format!("{k}s")
    }
}

#[cfg(test)]
mod tests {
    use super::{content_type, manifest_path, plural, split_documents};

    #[test]
    fn manifests_go_to_their_kinds_collection() {
        let cr = "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata:\n  \
                  name: weft\nrules: []\n";
        assert_eq!(
            manifest_path(cr).expect("a path"),
            "/apis/rbac.authorization.k8s.io/v1/clusterroles"
        );
        let sa = "# the agent's identity\nkind: ServiceAccount\napiVersion: v1\nmetadata:\n  \
                  name: weft\n  labels:\n    namespace: not-this\n  namespace: \"kube-flannel\"\n";
        assert_eq!(
            manifest_path(sa).expect("a path"),
            "/api/v1/namespaces/kube-flannel/serviceaccounts"
        );
        let ns = r#"{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x"}}"#;
        assert_eq!(manifest_path(ns).expect("a path"), "/api/v1/namespaces");
        let ds = "apiVersion: apps/v1\nkind: DaemonSet\nmetadata:\n  name: d\n";
        assert_eq!(
            manifest_path(ds).expect("a path"),
            "/apis/apps/v1/namespaces/default/daemonsets"
        );
        assert!(manifest_path("kind: Node\n").is_err());
    }

    #[test]
    fn plurals_and_content_types() {
        assert_eq!(plural("NetworkPolicy"), "networkpolicies");
        assert_eq!(plural("Ingress"), "ingresses");
        assert_eq!(plural("Gateway"), "gateways");
        assert_eq!(plural("Endpoints"), "endpoints");
        assert_eq!(plural("ClusterRoleBinding"), "clusterrolebindings");
        assert_eq!(
            content_type("PATCH", "{}"),
            "application/strategic-merge-patch+json"
        );
        assert_eq!(content_type("POST", " {\"a\":1}"), "application/json");
        assert_eq!(content_type("POST", "kind: Node"), "application/yaml");
    }

    #[test]
    fn multi_document_yaml_splits_on_separator_lines() {
        let y = "---\n# only a comment\n---\nkind: A\n---\nkind: B\n--- \n\n";
        assert_eq!(split_documents(y), vec!["kind: A\n", "kind: B\n"]);
    }
}
