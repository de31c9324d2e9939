//! weft-cni with the real CNI plugins (Debian's containernetworking-plugins: bridge, host-local,
//! portmap) on simulated hosts running weftd: a "pod" namespace per host gets an address from
//! its host's lease, pods reach each other across hosts, and the spec's rules for ADD, DEL and
//! CHECK hold. Needs root (namespaces) and the plugins in /usr/lib/cni.
//!
//! The config is `config/cni-conflist.json`, the one the Kubernetes manifests ship; a test only
//! points its files (subnet.env, weft-cni's and host-local's data) into the lab's temporary
//! directory and names the bridge after the lab, as libcni would hand it to each plugin.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::Ipv4Net;
use serde_json::{json, Value};
use weft_lab::json::entries;
use weft_lab::Netns;

use crate::harness::wait_for;
use crate::netns::{require_root, Host, Topology};

const CNI_PATH: &str = "/usr/lib/cni";
const CONFLIST: &str = include_str!("../../config/cni-conflist.json");
const VXLAN: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
const UDP: &str = r#"{"Network":"10.247.0.0/16","Backend":{"Type":"udp"}}"#;
const WEFT_CNI: &str = env!("CARGO_BIN_EXE_weft-cni");

/// Root and the plugins, or a visible skip (a failure under CI=true).
fn require_plugins(test: &str) -> bool {
    if !require_root(test) {
        return false;
    }
    let missing: Vec<&str> = ["bridge", "host-local", "portmap"]
        .into_iter()
        .filter(|p| !Path::new(CNI_PATH).join(p).is_file())
        .collect();
    if missing.is_empty() {
        return true;
    }
    let why = format!("needs {missing:?} in {CNI_PATH} (containernetworking-plugins; deploy/setup-debian.sh installs it)");
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{test} {why}, and CI=true"
    );
    // Straight to stderr: libtest would swallow eprintln! of a passing test.
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
    false
}

/// What one plugin run gave: exit success, stdout as JSON (Null when empty), stderr.
struct Run {
    ok: bool,
    out: Value,
    err: String,
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "ok={} out={} stderr={}", self.ok, self.out, self.err)
    }
}

/// A lab host as a CNI node: the conflist with this test's files and bridge.
struct Node<'a> {
    host: &'a Host,
    bridge: String,
}

impl<'a> Node<'a> {
    fn new(t: &'a Topology, i: usize) -> Self {
        // Unique per lab and at most 15 characters: "wl<pid>n<k>" becomes "cb<pid>n<k>".
        let bridge = format!("cb{}", &t.prefix[2..]);
        assert!(bridge.len() <= 15, "{bridge}");
        Self {
            host: &t.hosts[i],
            bridge,
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.host.dir.join("cni")
    }

    fn ipam_dir(&self) -> PathBuf {
        self.host.dir.join("ipam")
    }

    /// Each plugin's config as libcni hands it over: the list's name and version put in.
    fn plugins(&self) -> Vec<Value> {
        let list: Value = serde_json::from_str(CONFLIST).expect("config/cni-conflist.json");
        let plugins = list["plugins"].as_array().expect("plugins").clone();
        plugins
            .into_iter()
            .map(|mut p| {
                p["name"] = list["name"].clone();
                p["cniVersion"] = list["cniVersion"].clone();
                if p["type"] == "weft-cni" {
                    p["subnetFile"] = json!(self.host.dir.join("subnet.env"));
                    p["dataDir"] = json!(self.data_dir());
                    p["ipam"] = json!({"dataDir": self.ipam_dir()});
                    p["delegate"]["bridge"] = json!(self.bridge);
                }
                p
            })
            .collect()
    }

    /// weft-cni's config alone.
    fn conf(&self) -> Value {
        self.plugins().remove(0)
    }

    /// Runs a plugin of `conf["type"]` in the host's namespace, as a runtime there would.
    fn exec(&self, command: &str, id: &str, netns: &str, conf: &Value) -> Run {
        let kind = conf["type"].as_str().expect("type");
        let bin = if kind == "weft-cni" {
            WEFT_CNI.to_string()
        } else {
            format!("{CNI_PATH}/{kind}")
        };
        let mut cmd = self.host.ns.command(&bin);
        cmd.env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", id)
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", CNI_PATH);
        let input = conf.to_string();
        let out = weft_lab::cmd::output_with_input(
            &mut cmd,
            Some(input.as_bytes()),
            weft_lab::cmd::TIMEOUT,
        );
        let text = String::from_utf8_lossy(&out.stdout);
        Run {
            ok: out.status.success(),
            out: if text.trim().is_empty() {
                Value::Null
            } else {
                serde_json::from_str(&text)
                    .unwrap_or_else(|e| panic!("{kind} {command} printed no JSON ({e}): {text}"))
            },
            err: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// weft-cni alone, for `pod`.
    fn weft_cni(&self, command: &str, id: &str, pod: &Netns, conf: &Value) -> Run {
        self.exec(command, id, &netns_path(pod), conf)
    }

    /// ADD through the whole list, each plugin getting the previous one's result; the final
    /// result.
    fn add(&self, id: &str, pod: &Netns) -> Value {
        let mut prev: Option<Value> = None;
        for mut conf in self.plugins() {
            if let Some(p) = prev.take() {
                conf["prevResult"] = p;
            }
            let r = self.exec("ADD", id, &netns_path(pod), &conf);
            assert!(r.ok, "{} ADD: {r:?}", conf["type"]);
            prev = Some(r.out);
        }
        prev.expect("a result")
    }

    /// DEL through the list in reverse, with the ADD's final result.
    fn del(&self, id: &str, pod: &Netns, result: &Value) {
        for mut conf in self.plugins().into_iter().rev() {
            conf["prevResult"] = result.clone();
            let r = self.exec("DEL", id, &netns_path(pod), &conf);
            assert!(r.ok, "{} DEL: {r:?}", conf["type"]);
        }
    }

    /// CHECK through the list; the first failure.
    fn check(&self, id: &str, pod: &Netns, result: &Value) -> Result<(), Run> {
        for mut conf in self.plugins() {
            conf["prevResult"] = result.clone();
            let r = self.exec("CHECK", id, &netns_path(pod), &conf);
            if !r.ok {
                return Err(r);
            }
        }
        Ok(())
    }

    /// weft-cni's record of `id`.
    fn record(&self, id: &str) -> PathBuf {
        self.data_dir().join(format!("{id}:eth0"))
    }

    /// Whether host-local holds `ip` for this network.
    fn allocated(&self, ip: Ipv4Net) -> bool {
        self.ipam_dir()
            .join("cbr0")
            .join(ip.addr().to_string())
            .exists()
    }

    /// The host-side veth ports on the bridge.
    fn bridge_ports(&self) -> Vec<String> {
        let (ok, out, _) = self
            .host
            .ns
            .try_ip(&format!("-j link show master {}", self.bridge));
        if !ok {
            return Vec::new();
        }
        entries(weft_lab::json::parse(&out))
            .iter()
            .filter_map(|l| l["ifname"].as_str().map(String::from))
            .collect()
    }
}

fn netns_path(ns: &Netns) -> String {
    format!("/var/run/netns/{}", ns.name)
}

/// The pod's address from a result.
fn pod_ip(result: &Value) -> Ipv4Net {
    result["ips"][0]["address"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no IPv4 address in {result}"))
}

fn hosts(n: usize, config: &str, extra: &[&str]) -> Topology {
    let mut t = Topology::new(n, 1500);
    t.set_config(config);
    for i in 0..n {
        t.start(i, extra);
    }
    for i in 0..n {
        t.hosts[i].wait_subnet();
    }
    t
}

fn eth0(pod: &Netns) -> Option<Value> {
    pod.link("eth0")
}

/// ADD on every host, pods ping each other across hosts, CHECK passes, DEL cleans up.
fn pods_reach_each_other(t: &Topology, masq_by_bridge: bool) {
    let nodes: Vec<Node> = (0..t.hosts.len()).map(|i| Node::new(t, i)).collect();
    let mut results = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let h = &t.hosts[i];
        let result = n.add(&format!("pod{i}"), &h.container);
        assert_eq!(result["cniVersion"], "1.0.0", "{result}");
        let ip = pod_ip(&result);
        let lease = h.wait_subnet();
        assert!(lease.contains(&ip.addr()), "{ip} outside the lease {lease}");
        assert_eq!(ip.prefix_len(), lease.prefix_len());
        let gw = weft_lab::topology::gateway(lease).to_string();
        assert_eq!(result["ips"][0]["gateway"], json!(gw));

        let mtu: u64 = h
            .env_var("FLANNEL_MTU")
            .and_then(|m| m.parse().ok())
            .expect("FLANNEL_MTU");
        let link = eth0(&h.container).expect("the pod has eth0");
        assert_eq!(link["mtu"], json!(mtu), "the pod's MTU is FLANNEL_MTU");
        let routes = h.container.routes_json();
        let network = h.env_var("FLANNEL_NETWORK").expect("FLANNEL_NETWORK");
        assert!(
            routes
                .iter()
                .any(|r| r["dst"] == json!(network) && r["gateway"] == json!(gw)),
            "a route for the cluster network via the bridge: {routes:?}"
        );
        assert!(
            routes.iter().any(|r| r["dst"] == "default"),
            "isDefaultGateway: {routes:?}"
        );

        let record: Value =
            serde_json::from_slice(&std::fs::read(n.record(&format!("pod{i}"))).expect("record"))
                .expect("record JSON");
        assert_eq!(record["type"], "bridge");
        assert_eq!(record["bridge"], json!(n.bridge));
        assert_eq!(
            record["ipMasq"],
            json!(masq_by_bridge),
            "ipMasq = !FLANNEL_IPMASQ"
        );
        assert_eq!(
            record["ipam"]["ranges"],
            json!([[{"subnet": lease.to_string(), "gateway": gw}]])
        );
        assert!(n.allocated(ip), "host-local holds {ip}");
        results.push(result);
    }
    for a in 0..nodes.len() {
        for (b, result) in results.iter().enumerate() {
            if a != b {
                let to = pod_ip(result).addr();
                wait_for(
                    &format!("pod{a} to reach pod{b} at {to}"),
                    Duration::from_secs(20),
                    || t.hosts[a].ping(to).then_some(()),
                );
            }
        }
    }
    for (i, n) in nodes.iter().enumerate() {
        let pod = &t.hosts[i].container;
        let id = format!("pod{i}");
        n.check(&id, pod, &results[i])
            .expect("CHECK right after ADD passes");
        n.del(&id, pod, &results[i]);
        assert_eq!(eth0(pod), None, "DEL removes the pod's interface");
        assert!(
            n.bridge_ports().is_empty(),
            "and the host's veth: {:?}",
            n.bridge_ports()
        );
        assert!(!n.allocated(pod_ip(&results[i])), "DEL frees the address");
        assert!(!n.record(&id).exists(), "DEL removes the record");
    }
}

#[test]
fn vxlan_pods_get_their_hosts_lease_and_reach_each_other_then_del_frees_everything() {
    if !require_plugins(
        "vxlan_pods_get_their_hosts_lease_and_reach_each_other_then_del_frees_everything",
    ) {
        return;
    }
    // weftd does not masquerade (flannel's default): the bridge does.
    let t = hosts(2, VXLAN, &[]);
    pods_reach_each_other(&t, true);
}

#[test]
fn udp_pods_reach_each_other_through_flannel0() {
    if !require_plugins("udp_pods_reach_each_other_through_flannel0") {
        return;
    }
    // weftd masquerades (kube-flannel's --ip-masq): the bridge must not.
    let t = hosts(2, UDP, &["-ip-masq"]);
    pods_reach_each_other(&t, false);
}

#[test]
fn check_reports_a_pod_whose_address_was_removed_or_left_the_lease() {
    if !require_plugins("check_reports_a_pod_whose_address_was_removed_or_left_the_lease") {
        return;
    }
    let t = hosts(1, VXLAN, &[]);
    let n = Node::new(&t, 0);
    let pod = &t.hosts[0].container;
    let result = n.add("pod", pod);
    n.check("pod", pod, &result).expect("a healthy pod passes");

    // The node's lease changed under the pod (subnet.env names another subnet).
    let moved = t.hosts[0].dir.join("moved.env");
    let env = t.hosts[0].subnet_env().expect("subnet.env");
    let lease = t.hosts[0].wait_subnet();
    let other = Ipv4Net::new(
        std::net::Ipv4Addr::from(u32::from(lease.network()) ^ 0x0000_8000),
        24,
    )
    .expect("subnet");
    let gw = weft_lab::topology::gateway(other);
    std::fs::write(
        &moved,
        env.replace(
            &format!("FLANNEL_SUBNET={}/", weft_lab::topology::gateway(lease)),
            &format!("FLANNEL_SUBNET={gw}/"),
        ),
    )
    .expect("write");
    let mut conf = n.conf();
    conf["subnetFile"] = json!(moved);
    conf["prevResult"] = result.clone();
    let r = n.weft_cni("CHECK", "pod", pod, &conf);
    assert!(!r.ok, "{r:?}");
    assert_eq!(r.out["code"], 100, "{r:?}");
    let msg = r.out["msg"].as_str().unwrap_or("");
    assert!(
        msg.contains(&pod_ip(&result).addr().to_string()) && msg.contains("moved.env"),
        "{msg}"
    );

    // Someone removed the pod's address: the bridge's CHECK, delegated, says so.
    pod.ip(&format!("addr del {} dev eth0", pod_ip(&result)));
    let e = n
        .check("pod", pod, &result)
        .expect_err("CHECK of a pod without its address fails");
    assert!(e.out["code"].is_u64(), "a CNI error: {e:?}");
    assert!(
        e.out["msg"]
            .as_str()
            .unwrap_or("")
            .starts_with("bridge CHECK"),
        "{e:?}"
    );

    n.del("pod", pod, &result);
    assert!(!n.allocated(pod_ip(&result)));
}

#[test]
fn add_twice_del_twice_and_del_without_add_follow_the_spec() {
    if !require_plugins("add_twice_del_twice_and_del_without_add_follow_the_spec") {
        return;
    }
    let t = hosts(1, VXLAN, &[]);
    let n = Node::new(&t, 0);
    let pod = &t.hosts[0].container;
    let conf = n.conf();

    let r = n.weft_cni("DEL", "never-added", pod, &conf);
    assert!(
        r.ok && r.out.is_null(),
        "DEL without ADD succeeds silently: {r:?}"
    );

    let first = n.weft_cni("ADD", "pod", pod, &conf);
    assert!(first.ok, "{first:?}");
    let record = std::fs::read(n.record("pod")).expect("record");
    let again = n.weft_cni("ADD", "pod", pod, &conf);
    assert!(
        !again.ok,
        "a second ADD of the same attachment fails: {again:?}"
    );
    assert_eq!(again.out["code"], 101, "{again:?}");
    assert_eq!(
        std::fs::read(n.record("pod")).expect("record"),
        record,
        "the first ADD's record is kept"
    );
    assert!(eth0(pod).is_some(), "and its pod keeps its interface");
    assert!(n.allocated(pod_ip(&first.out)), "and its address");

    for _ in 0..2 {
        let r = n.weft_cni("DEL", "pod", pod, &conf);
        assert!(r.ok && r.out.is_null(), "DEL, twice: {r:?}");
        assert_eq!(eth0(pod), None);
        assert!(!n.allocated(pod_ip(&first.out)));
    }
    // Everything is gone: the same attachment can be added again.
    let r = n.weft_cni("ADD", "pod", pod, &conf);
    assert!(r.ok, "{r:?}");
    assert!(n.weft_cni("DEL", "pod", pod, &conf).ok);
}

#[test]
fn del_uses_the_record_when_subnet_env_is_gone_and_a_failed_add_leaves_none() {
    if !require_plugins("del_uses_the_record_when_subnet_env_is_gone_and_a_failed_add_leaves_none")
    {
        return;
    }
    let t = hosts(1, VXLAN, &[]);
    let n = Node::new(&t, 0);
    let pod = &t.hosts[0].container;

    let copy = t.hosts[0].dir.join("copy.env");
    std::fs::copy(t.hosts[0].dir.join("subnet.env"), &copy).expect("copy subnet.env");
    let mut conf = n.conf();
    conf["subnetFile"] = json!(copy);
    let r = n.weft_cni("ADD", "pod", pod, &conf);
    assert!(r.ok, "{r:?}");
    let ip = pod_ip(&r.out);
    let meta = std::fs::metadata(n.record("pod")).expect("record");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let dir = std::fs::metadata(n.data_dir()).expect("data dir");
    assert_eq!(dir.permissions().mode() & 0o777, 0o700);

    std::fs::remove_file(&copy).expect("remove");
    let r = n.weft_cni("DEL", "pod", pod, &conf);
    assert!(r.ok, "DEL needs only the record: {r:?}");
    assert_eq!(eth0(pod), None);
    assert!(!n.allocated(ip));

    // A netns that does not exist: the bridge fails, weft-cni undoes and keeps no record.
    let r = n.exec("ADD", "ghost", "/var/run/netns/weft-no-such-ns", &n.conf());
    assert!(!r.ok, "{r:?}");
    assert!(
        r.out["msg"]
            .as_str()
            .unwrap_or("")
            .starts_with("bridge ADD"),
        "{r:?}"
    );
    assert!(!n.record("ghost").exists(), "no record left behind");
    let held: Vec<_> = std::fs::read_dir(n.ipam_dir().join("cbr0"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name())
                .filter(|f| !f.to_string_lossy().starts_with("last_reserved") && f != "lock")
                .collect()
        })
        .unwrap_or_default();
    assert!(held.is_empty(), "no address held: {held:?}");
}

#[test]
fn a_1_1_0_config_gets_status_and_gc_with_plugins_that_stop_at_1_0_0() {
    if !require_plugins("a_1_1_0_config_gets_status_and_gc_with_plugins_that_stop_at_1_0_0") {
        return;
    }
    let t = hosts(1, VXLAN, &[]);
    let n = Node::new(&t, 0);
    let pod = &t.hosts[0].container;
    let mut conf = n.conf();
    conf["cniVersion"] = json!("1.1.0");

    let r = n.weft_cni("STATUS", "", pod, &conf);
    assert!(r.ok && r.out.is_null(), "{r:?}");

    let r = n.weft_cni("ADD", "pod", pod, &conf);
    assert!(r.ok, "{r:?}");
    assert_eq!(
        r.out["cniVersion"], "1.1.0",
        "answered in the config's version"
    );
    let ip = pod_ip(&r.out);
    let record: Value =
        serde_json::from_slice(&std::fs::read(n.record("pod")).expect("record")).expect("JSON");
    assert_eq!(
        record["cniVersion"], "1.0.0",
        "the delegate was spoken to in its newest version"
    );
    let mut check = conf.clone();
    check["prevResult"] = r.out.clone();
    let c = n.weft_cni("CHECK", "pod", pod, &check);
    assert!(c.ok, "{c:?}");

    // GC: the runtime no longer knows the pod; its address is freed, its record goes.
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "other", "ifname": "eth0"}]);
    let r = n.weft_cni("GC", "", pod, &gc);
    assert!(r.ok, "{r:?}");
    assert!(!n.allocated(ip));
    assert!(!n.record("pod").exists());
}

/// The binary's own contract, without namespaces: the CNI error JSON on stdout, a non-zero exit.
#[test]
fn a_missing_subnet_env_is_a_cni_error_on_stdout_with_a_non_zero_exit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = json!({
        "cniVersion": "0.3.1", "name": "cbr0", "type": "weft-cni",
        "subnetFile": dir.path().join("subnet.env"), "dataDir": dir.path().join("data"),
    });
    let mut cmd = std::process::Command::new(WEFT_CNI);
    cmd.env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", "pod")
        .env("CNI_NETNS", "/var/run/netns/none")
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", CNI_PATH);
    let out = weft_lab::cmd::output_with_input(
        &mut cmd,
        Some(conf.to_string().as_bytes()),
        weft_lab::cmd::TIMEOUT,
    );
    assert!(!out.status.success());
    let err: Value = serde_json::from_slice(&out.stdout).expect("CNI error JSON on stdout");
    assert_eq!(err["code"], 11, "try again later: {err}");
    assert_eq!(err["cniVersion"], "0.3.1");
    let msg = err["msg"].as_str().unwrap_or("");
    assert!(
        msg.contains(&dir.path().join("subnet.env").display().to_string()),
        "{msg}"
    );

    let mut cmd = std::process::Command::new(WEFT_CNI);
    cmd.env("CNI_COMMAND", "VERSION");
    let out = weft_lab::cmd::output_with_input(
        &mut cmd,
        Some(br#"{"cniVersion":"1.0.0"}"#),
        weft_lab::cmd::TIMEOUT,
    );
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).expect("VERSION JSON");
    assert_eq!(v["cniVersion"], "1.0.0");
    assert_eq!(
        v["supportedVersions"],
        json!(["0.3.1", "0.4.0", "1.0.0", "1.1.0"])
    );
}

/// weft-cni run alone (no namespace, no plugins) with `command` and `conf`.
fn weft_cni_alone(command: &str, conf: &Value) -> std::process::Output {
    let mut cmd = std::process::Command::new(WEFT_CNI);
    cmd.env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", "pod")
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/nonexistent");
    weft_lab::cmd::output_with_input(
        &mut cmd,
        Some(conf.to_string().as_bytes()),
        weft_lab::cmd::TIMEOUT,
    )
}

#[test]
fn gc_leaves_files_that_are_not_this_networks_records_in_place_and_says_so() {
    use std::os::unix::fs::DirBuilderExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&data)
        .expect("dataDir");
    let other_network = json!({"cniVersion": "1.0.0", "name": "other", "type": "bridge",
                               "ipam": {"type": "host-local"}})
    .to_string();
    let files = [
        ("garbage:eth0", "not a record"),
        ("theirs:eth0", other_network.as_str()),
        ("notes.txt", "someone else's"),
    ];
    for (name, text) in files {
        std::fs::write(data.join(name), text).expect("write");
    }
    let conf = json!({
        "cniVersion": "1.1.0", "name": "cbr0", "type": "weft-cni",
        "subnetFile": dir.path().join("subnet.env"), "dataDir": data,
        "cni.dev/valid-attachments": [],
    });
    let out = weft_cni_alone("GC", &conf);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{}\n{stderr}",
        String::from_utf8_lossy(&out.stdout)
    );
    for (name, text) in files {
        assert_eq!(
            std::fs::read_to_string(data.join(name)).expect("still there"),
            text
        );
        assert!(stderr.contains(name), "a log line names {name}: {stderr}");
    }
}

#[test]
fn a_data_dir_others_can_read_is_refused_and_stays_0755() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    std::fs::create_dir(&data).expect("dataDir");
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let mut conf = json!({
        "cniVersion": "1.1.0", "name": "cbr0", "type": "weft-cni",
        "subnetFile": dir.path().join("subnet.env"), "dataDir": data,
    });
    for command in ["DEL", "GC"] {
        if command == "GC" {
            conf["cni.dev/valid-attachments"] = json!([]);
        }
        let out = weft_cni_alone(command, &conf);
        assert!(!out.status.success(), "{command}");
        let err: Value = serde_json::from_slice(&out.stdout).expect("CNI error JSON");
        assert_eq!(err["code"], 7, "{command}: {err}");
        let msg = err["msg"].as_str().unwrap_or("");
        assert!(
            msg.contains(&data.display().to_string()) && msg.contains("0755"),
            "{command}: {msg}"
        );
    }
    let mode = std::fs::metadata(&data).expect("stat").permissions().mode();
    assert_eq!(mode & 0o7777, 0o755, "left as the operator made it");
}

#[test]
fn dual_stack_pods_get_an_address_of_each_family_and_reach_each_other_over_both() {
    let name = "dual_stack_pods_get_an_address_of_each_family_and_reach_each_other_over_both";
    if !require_plugins(name) || !weft_lab::require_ipv6(name) {
        return;
    }
    let t = hosts(
        2,
        r#"{"Network":"10.248.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:248::/48","Backend":{"Type":"host-gw"}}"#,
        &[],
    );
    let nodes: Vec<Node> = (0..2).map(|i| Node::new(&t, i)).collect();
    let mut results = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let h = &t.hosts[i];
        let result = n.add(&format!("pod{i}"), &h.container);
        let ips = result["ips"].as_array().expect("ips");
        assert_eq!(ips.len(), 2, "one address per family: {result}");
        let v6: ipnet::Ipv6Net = ips[1]["address"]
            .as_str()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no IPv6 address in {result}"));
        let lease6 = h.wait_subnet6();
        assert!(
            lease6.contains(&v6.addr()),
            "{v6} outside the IPv6 lease {lease6}"
        );
        let gw6 = weft_lab::topology::gateway6(lease6).to_string();
        assert_eq!(ips[1]["gateway"], json!(gw6));
        let routes6: Vec<Value> = weft_lab::json::entries(h.container.ip_json("-6 route show"));
        let network6 = h
            .env_var("FLANNEL_IPV6_NETWORK")
            .expect("FLANNEL_IPV6_NETWORK");
        assert!(
            routes6
                .iter()
                .any(|r| r["dst"] == json!(network6) && r["gateway"] == json!(gw6)),
            "a route for the IPv6 cluster network via the bridge: {routes6:?}"
        );
        results.push((result, v6));
    }
    for a in 0..2 {
        for (b, (result, v6)) in results.iter().enumerate().filter(|(b, _)| *b != a) {
            let (to4, to6) = (pod_ip(result).addr(), v6.addr());
            wait_for(
                &format!("pod{a} to reach pod{b} at {to4}"),
                Duration::from_secs(20),
                || t.hosts[a].ping(to4).then_some(()),
            );
            wait_for(
                &format!("pod{a} to reach pod{b} at {to6}"),
                Duration::from_secs(20),
                || t.hosts[a].ping6(to6).then_some(()),
            );
        }
    }
    for (i, n) in nodes.iter().enumerate() {
        let (pod, id) = (&t.hosts[i].container, format!("pod{i}"));
        n.check(&id, pod, &results[i].0)
            .expect("CHECK of both addresses passes");
        n.del(&id, pod, &results[i].0);
        assert!(
            !n.allocated(pod_ip(&results[i].0)),
            "DEL frees the IPv4 address"
        );
        let v6_file = n
            .ipam_dir()
            .join("cbr0")
            .join(results[i].1.addr().to_string());
        assert!(!v6_file.exists(), "and the IPv6 one");
    }
}
