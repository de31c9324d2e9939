//! Kubernetes mode (`-kube-subnet-mgr`) against a real kube-apiserver with RBAC on: simulated
//! hosts whose weftd each hold a token bound only to the ClusterRole weft ships, leases from
//! the Nodes' podCIDRs, flannel's annotations, and pods pinging across. Needs root and the
//! apiserver (`../shared/kube`, or `KUBE_APISERVER`); skips visibly without them.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};
use weft_lab::flannel;
use weft_lab::kube::{require_kube, KubeApi};

use crate::harness::wait_for;
use crate::netns::Topology;

const T: Duration = Duration::from_secs(40);
pub(crate) const P: &str = "flannel.alpha.coreos.com";
/// The ClusterRole the kube-mode manifest ships.
const MANIFEST: &str = include_str!("../../deploy/kubernetes/weft-kube.yml");

/// A lab whose hosts are Nodes of a real API server.
pub(crate) struct Cluster {
    pub t: Topology,
    pub api: KubeApi,
    pub config: PathBuf,
    pub role: String,
}

pub(crate) fn node(i: usize) -> String {
    format!("node-{i}")
}

pub(crate) fn pod_cidr(i: usize) -> String {
    format!("10.244.{}.0/24", i + 1)
}

impl Cluster {
    /// `n` hosts, each a Node with a podCIDR (10.244.<i+1>.0/24) and a user `node-i` bound to
    /// weft's shipped ClusterRole; the network config `net_conf` as net-conf.json. No weftd yet.
    pub fn new(n: usize, net_conf: &str) -> Self {
        Self::with_pod_cidrs(n, net_conf, pod_cidr)
    }

    /// [`Cluster::new`] with Node `i`'s podCIDRs `cidrs(i)` ("v4" or dual-stack "v4,v6").
    pub fn with_pod_cidrs(n: usize, net_conf: &str, cidrs: impl Fn(usize) -> String) -> Self {
        let t = Topology::new(n, 1500);
        let users: Vec<String> = (0..n).map(node).collect();
        let names: Vec<&str> = users.iter().map(String::as_str).collect();
        let api = KubeApi::start(&t.lab, &[&names[..], &["nobody"]].concat());
        let role = api.create(cluster_role(MANIFEST));
        let role_name = role["metadata"]["name"]
            .as_str()
            .expect("role name")
            .to_string();
        for u in &names {
            api.bind_cluster_role(u, &role_name);
        }
        for i in 0..n {
            api.create_node(&node(i), Some(&cidrs(i)), &[]);
        }
        let config = t.lab.dir.path().join("net-conf.json");
        std::fs::write(&config, net_conf).expect("net-conf.json");
        Cluster {
            t,
            api,
            config,
            role: role_name,
        }
    }

    /// weftd on host `i` in kube mode, as `user` (its own Node's name unless a test says).
    pub fn start_as(&mut self, i: usize, user: &str) {
        self.start_extra(i, user, &[]);
    }

    pub fn start_extra(&mut self, i: usize, user: &str, extra: &[&str]) {
        let kubeconfig = self.t.hosts[i].dir.join("kubeconfig");
        std::fs::create_dir_all(&self.t.hosts[i].dir).expect("dir");
        self.api.kubeconfig_for(user, &kubeconfig);
        let args = [
            "-kube-subnet-mgr".to_string(),
            format!("-kubeconfig-file={}", kubeconfig.display()),
            format!("-net-config-path={}", self.config.display()),
        ];
        let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
        args.extend(extra);
        // wireguard's key file and control socket: each host its own (one machine runs all).
        let dir = self.t.hosts[i].dir.display().to_string();
        let key = format!("{dir}/wgkey");
        let env = [
            ("NODE_NAME", &*node(i)),
            ("WIREGUARD_KEY_FILE", &*key),
            ("WIREGUARD_SOCKET_DIR", &*dir),
        ];
        self.t.start_with(i, &args, &env);
    }

    pub fn start(&mut self, i: usize) {
        self.start_as(i, &node(i));
    }

    pub fn annotations(&self, i: usize) -> Value {
        let n = self.api.node(&node(i)).expect("node");
        n["metadata"]["annotations"].clone()
    }

    /// Waits until Node `i` carries weft's annotations; returns them.
    pub fn wait_published(&self, i: usize) -> Value {
        wait_for(&format!("{}'s annotations", node(i)), T, || {
            self.t.hosts[i].assert_running();
            let a = self.annotations(i);
            (a[format!("{P}/kube-subnet-manager")] == "true").then_some(a)
        })
    }
}

/// The ClusterRole document of a manifest, as the API server takes it (YAML).
fn cluster_role(manifest: &str) -> &str {
    manifest
        .split("\n---")
        .find(|d| d.lines().any(|l| l == "kind: ClusterRole"))
        .expect("a ClusterRole in the manifest")
}

/// A Node's annotations as flanneld writes them.
pub(crate) fn flanneld_annotations(kind: &str, data: &str, ip: &str) -> Vec<(String, String)> {
    [
        ("backend-data", data),
        ("backend-type", kind),
        ("kube-subnet-manager", "true"),
        ("public-ip", ip),
    ]
    .iter()
    .map(|(k, v)| (format!("{P}/{k}"), v.to_string()))
    .collect()
}

/// [`flanneld_annotations`] as a patch of a Node.
fn annotation_patch(a: &[(String, String)]) -> Value {
    let map: serde_json::Map<String, Value> = a
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    json!({"metadata": {"annotations": map}})
}

/// Pairs as `create_node` takes them.
fn pairs(a: &[(String, String)]) -> Vec<(&str, &str)> {
    a.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

pub(crate) const VXLAN: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;

pub(crate) fn mac_of(c: &Cluster, i: usize, dev: &str) -> String {
    let link = c.t.hosts[i].ns.link(dev).expect("device");
    link["address"].as_str().expect("mac").to_string()
}

#[test]
fn three_kube_nodes_lease_their_podcidrs_publish_flannels_annotations_and_pods_ping() {
    if require_kube(
        "three_kube_nodes_lease_their_podcidrs_publish_flannels_annotations_and_pods_ping",
    )
    .is_none()
    {
        return;
    }
    let mut c = Cluster::new(3, VXLAN);
    for i in 0..3 {
        c.start(i);
    }
    for i in 0..3 {
        assert_eq!(
            c.t.hosts[i].wait_subnet().to_string(),
            pod_cidr(i),
            "the lease is the podCIDR"
        );
        c.t.wire_container(i);
    }
    c.t.assert_full_mesh(&[0, 1, 2]);
    for i in 0..3 {
        let a = c.wait_published(i);
        let mac = mac_of(&c, i, "flannel.1");
        // flanneld's exact bytes: compact JSON in Go field order, every value a string.
        assert_eq!(
            a[format!("{P}/backend-data")],
            format!(r#"{{"VNI":1,"VtepMAC":"{mac}"}}"#)
        );
        assert_eq!(a[format!("{P}/backend-type")], "vxlan");
        assert_eq!(a[format!("{P}/kube-subnet-manager")], "true");
        assert_eq!(a[format!("{P}/public-ip")], c.t.hosts[i].addr().to_string());
        let n = c.api.node(&node(i)).expect("node");
        let cond = n["status"]["conditions"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["type"] == "NetworkUnavailable"))
            .cloned()
            .expect("NetworkUnavailable condition");
        assert_eq!(
            (cond["status"].as_str(), cond["reason"].as_str()),
            (Some("False"), Some("FlannelIsUp"))
        );
    }
}

#[test]
fn host_gw_and_udp_in_kube_mode_carry_pods_between_two_nodes() {
    if require_kube("host_gw_and_udp_in_kube_mode_carry_pods_between_two_nodes").is_none() {
        return;
    }
    for (backend, data) in [("host-gw", "null"), ("udp", "null")] {
        let conf = format!(r#"{{"Network":"10.244.0.0/16","Backend":{{"Type":"{backend}"}}}}"#);
        let mut c = Cluster::new(2, &conf);
        c.start(0);
        c.start(1);
        for i in 0..2 {
            c.t.wire_container(i);
        }
        c.t.assert_full_mesh(&[0, 1]);
        let a = c.wait_published(0);
        assert_eq!(a[format!("{P}/backend-type")], backend);
        assert_eq!(a[format!("{P}/backend-data")], data, "{backend}");
    }
}

#[test]
fn wireguard_in_kube_mode_publishes_its_key_in_flannels_format_and_carries_pods() {
    if require_kube("wireguard_in_kube_mode_publishes_its_key_in_flannels_format_and_carries_pods")
        .is_none()
    {
        return;
    }
    let conf = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard"}}"#;
    let mut c = Cluster::new(2, conf);
    c.start(0);
    c.start(1);
    for i in 0..2 {
        c.t.wire_container(i);
    }
    c.t.assert_full_mesh(&[0, 1]);
    let keys: Vec<String> = (0..2)
        .map(|i| {
            let a = c.wait_published(i);
            assert_eq!(a[format!("{P}/backend-type")], "wireguard");
            // flanneld's bytes: {"PublicKey":"<base64>","Port":51820}.
            let data = a[format!("{P}/backend-data")].as_str().expect("a string");
            let key = data
                .strip_prefix(r#"{"PublicKey":""#)
                .and_then(|r| r.strip_suffix(r#"","Port":51820}"#))
                .unwrap_or_else(|| panic!("not flannel's wireguard data: {data}"));
            assert_eq!(key.len(), 44, "{data}");
            key.to_string()
        })
        .collect();
    assert_ne!(keys[0], keys[1], "a key per node");
}

#[test]
fn nodes_come_late_leave_and_are_rewritten_by_hand_and_weft_converges() {
    if require_kube("nodes_come_late_leave_and_are_rewritten_by_hand_and_weft_converges").is_none()
    {
        return;
    }
    let mut c = Cluster::new(3, VXLAN);
    // Node 2 has no podCIDR yet: its weftd waits, says why once, and is not ready.
    c.api.delete_node(&node(2));
    c.api.create_node(&node(2), None, &[]);
    c.start(0);
    c.start(1);
    c.start_extra(2, &node(2), &["-healthz-port=9911"]);
    c.t.hosts[2].wait_log("has no podCIDR yet", T);
    assert!(c.t.hosts[2].subnet_env().is_none());
    let readyz = || {
        let (_, out, _) =
            c.t.hosts[2]
                .ns
                .exec(&["curl", "-s", "-i", "http://127.0.0.1:9911/readyz"]);
        out
    };
    let r = readyz();
    assert!(r.starts_with("HTTP/1.1 503"), "{r}");
    assert!(r.contains("has no podCIDR yet"), "/readyz says why: {r}");
    c.api.set_pod_cidr(&node(2), &pod_cidr(2));
    for i in 0..3 {
        c.t.wire_container(i);
    }
    c.t.assert_full_mesh(&[0, 1, 2]);
    assert!(
        readyz().starts_with("HTTP/1.1 200"),
        "ready once leased and up"
    );
    let said = c.t.hosts[2].log().matches("has no podCIDR yet").count();
    assert!(
        said <= 2,
        "the wait is said once, not in a loop: {said} lines"
    );

    // Node 1's annotation rewritten by hand: its weftd publishes its own again.
    let mac1 = mac_of(&c, 1, "flannel.1");
    c.api.patch_node(
        &node(1),
        &json!({"metadata": {"annotations": {
            format!("{P}/backend-data"): r#"{"VNI":1,"VtepMAC":"02:00:00:00:00:01"}"#,
        }}}),
    );
    wait_for("node-1's own VtepMAC back", T, || {
        let a = c.annotations(1);
        (a[format!("{P}/backend-data")] == format!(r#"{{"VNI":1,"VtepMAC":"{mac1}"}}"#))
            .then_some(())
    });
    c.t.assert_full_mesh(&[0, 1, 2]);

    // Node 2 deleted from the API: a peer leaving; the others drop its route.
    c.t.hosts[2].kill();
    c.api.delete_node(&node(2));
    for i in 0..2 {
        wait_for("node-2's route gone", T, || {
            c.t.hosts[i].ns.route(&pod_cidr(2)).is_none().then_some(())
        });
    }
    c.t.assert_full_mesh(&[0, 1]);
}

#[test]
fn an_api_server_restarted_without_its_watch_history_is_listed_again_and_nothing_is_lost() {
    if require_kube(
        "an_api_server_restarted_without_its_watch_history_is_listed_again_and_nothing_is_lost",
    )
    .is_none()
    {
        return;
    }
    let mut c = Cluster::new(3, VXLAN);
    c.start(0);
    c.start(1);
    c.t.wire_container(0);
    c.t.wire_container(1);
    c.t.assert_full_mesh(&[0, 1]);
    // weftd 0 is cut off (frozen) while the server restarts, node 1 leaves, and the server
    // restarts again with its history compacted: weftd 0 comes back to a watch position that
    // is gone (410), and must list again to learn of node 1's leaving.
    c.t.hosts[0].freeze(true);
    c.api.stop();
    c.t.hosts[1].kill();
    c.api.start_again();
    c.api.delete_node(&node(1));
    c.api.restart_forgetting_history();
    c.t.hosts[0].freeze(false);
    c.start(2);
    c.t.wire_container(2);
    c.t.assert_full_mesh(&[0, 2]);
    wait_for("node-1's route gone from host 0", T, || {
        c.t.hosts[0].ns.route(&pod_cidr(1)).is_none().then_some(())
    });
    c.t.hosts[0].wait_log("history is gone (410); listing again", T);
    c.t.hosts[0].assert_running();
}

#[test]
fn dual_stack_nodes_lease_both_podcidrs_publish_flannels_ipv6_annotations_and_pods_ping() {
    let name =
        "dual_stack_nodes_lease_both_podcidrs_publish_flannels_ipv6_annotations_and_pods_ping";
    let Some(c) = dual_stack_cluster(name, "host-gw") else {
        return;
    };
    let a = c.wait_published(0);
    assert_eq!(
        a[format!("{P}/backend-v6-data")],
        "null",
        "host-gw's, as flanneld writes it"
    );
    let route = c.t.hosts[0]
        .ns
        .must(&["ip", "-6", "route", "show", "fd00:244:0:2::/64"]);
    assert!(route.contains(&format!("via {NODE1_V6}")), "{route}");
}

#[test]
fn wireguard_dual_stack_nodes_publish_their_ipv6_key_and_port_and_pods_ping() {
    let name = "wireguard_dual_stack_nodes_publish_their_ipv6_key_and_port_and_pods_ping";
    let Some(c) = dual_stack_cluster(name, "wireguard") else {
        return;
    };
    for i in 0..2 {
        let a = c.wait_published(i);
        let data: serde_json::Value =
            serde_json::from_str(a[format!("{P}/backend-data")].as_str().expect("a string"))
                .expect("JSON");
        let key = data["PublicKey"].as_str().expect("a key");
        // flanneld's separate mode: one key, flannel-wg-v6's port.
        assert_eq!(
            a[format!("{P}/backend-v6-data")],
            format!(r#"{{"PublicKey":"{key}","Port":51821}}"#)
        );
    }
}

/// node 1's PublicIPv6: a second address on its underlay, given as `node-public-ipv6`.
const NODE1_V6: &str = "fd00:10:199::77";

/// Two dual-stack Nodes of `backend` (podCIDRs 10.244.x.0/24 and fd00:244:0:x::/64), node 1
/// annotated with `node-public-ipv6` [`NODE1_V6`], which weftd takes as -public-ipv6 (as
/// flanneld does): both lease both podCIDRs, publish their PublicIPv6s, and their pods ping each
/// other over both families. `None` (a visible skip) without the apiserver or IPv6.
fn dual_stack_cluster(name: &str, backend: &str) -> Option<Cluster> {
    if require_kube(name).is_none() || !weft_lab::require_ipv6(name) {
        return None;
    }
    let conf = format!(
        r#"{{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:244::/48","Backend":{{"Type":"{backend}"}}}}"#
    );
    let mut c = Cluster::with_pod_cidrs(2, &conf, |i| {
        format!("{},fd00:244:0:{}::/64", pod_cidr(i), i + 1)
    });
    c.t.hosts[1]
        .ns
        .ip(&format!("-6 addr add {NODE1_V6}/64 dev eth0 nodad"));
    c.api.patch_node(
        &node(1),
        &json!({"metadata": {"annotations": {format!("{P}/node-public-ipv6"): NODE1_V6}}}),
    );
    c.start(0);
    c.start(1);
    for i in 0..2 {
        c.t.wire_container_dual(i);
        assert_eq!(
            c.t.hosts[i].wait_subnet6().to_string(),
            format!("fd00:244:0:{}::/64", i + 1),
            "the Node's IPv6 podCIDR"
        );
    }
    c.t.assert_full_mesh(&[0, 1]);
    c.t.assert_full_mesh6(&[0, 1]);
    assert_eq!(
        c.wait_published(0)[format!("{P}/public-ipv6")],
        c.t.hosts[0].addr6().to_string()
    );
    assert_eq!(c.wait_published(1)[format!("{P}/public-ipv6")], NODE1_V6);
    Some(c)
}

#[test]
fn a_flannel_kube_node_built_by_hand_and_a_weft_node_reach_each_other() {
    if require_kube("a_flannel_kube_node_built_by_hand_and_a_weft_node_reach_each_other").is_none()
    {
        return;
    }
    let mut c = Cluster::new(2, VXLAN);
    c.start(0);
    c.t.wire_container(0);
    let weft_subnet = c.t.hosts[0].wait_subnet();
    let weft_mac = mac_of(&c, 0, "flannel.1");
    // Node 1 is "flanneld": annotations as it writes them, its device, FDB and routes by hand.
    let flannel_mac = "c6:2b:1e:55:0d:7a";
    let h1 = &c.t.hosts[1];
    let subnet: ipnet::Ipv4Net = pod_cidr(1).parse().expect("cidr");
    let data = format!(r#"{{"VNI":1,"VtepMAC":"{flannel_mac}"}}"#);
    let a = flanneld_annotations("vxlan", &data, &h1.addr().to_string());
    c.api.patch_node_status(&node(1), &annotation_patch(&a));
    flannel::vxlan_device(&h1.ns, h1.addr(), flannel_mac, subnet, 1450);
    flannel::vxlan_peer(&h1.ns, weft_subnet, &weft_mac, c.t.hosts[0].addr());
    h1.wire_container(subnet, Some(1450));
    let flannel_pod = weft_lab::topology::container_ip(subnet);
    wait_for("weft pod to reach the flannel node's pod", T, || {
        c.t.ping(0, flannel_pod).then_some(())
    });
    assert!(c.t.ping(1, c.t.hosts[0].container_ip()), "and back");
}

#[test]
fn a_token_without_weft_s_role_gets_one_clear_error_naming_what_is_missing() {
    if require_kube("a_token_without_weft_s_role_gets_one_clear_error_naming_what_is_missing")
        .is_none()
    {
        return;
    }
    let mut c = Cluster::new(1, VXLAN);
    c.start_as(0, "nobody");
    c.t.hosts[0].wait_log("forbidden", T);
    std::thread::sleep(Duration::from_secs(5));
    c.t.hosts[0].assert_running();
    let log = c.t.hosts[0].log();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("forbidden")).collect();
    assert_eq!(lines.len(), 1, "said once, not in a loop:\n{log}");
    assert!(
        lines[0].contains("cannot get resource \\\"nodes\\\"")
            || lines[0].contains(r#"cannot get resource "nodes""#),
        "names the verb and the resource: {}",
        lines[0]
    );
    // With the role bound, the same weftd goes on by itself.
    c.api.bind_cluster_role("nobody", &c.role);
    c.t.hosts[0].wait_subnet();
}

#[test]
fn the_alloc_backend_follows_only_its_own_node() {
    if require_kube("the_alloc_backend_follows_only_its_own_node").is_none() {
        return;
    }
    let mut c = Cluster::new(
        2,
        r#"{"Network":"10.244.0.0/16","Backend":{"Type":"alloc"}}"#,
    );
    // Node 1 is a peer any other backend would follow.
    let a = flanneld_annotations("host-gw", "null", &c.t.hosts[1].addr().to_string());
    c.api.patch_node_status(&node(1), &annotation_patch(&a));
    c.start(0);
    assert_eq!(c.t.hosts[0].wait_subnet().to_string(), pod_cidr(0));
    c.t.hosts[0].wait_log("lease listing loaded", T);
    let log = c.t.hosts[0].log();
    let line = log
        .lines()
        .find(|l| l.contains("lease listing loaded"))
        .expect("the listing line");
    assert!(line.contains("peers=0"), "node 1 not even listed: {line}");
    assert_eq!(c.wait_published(0)[format!("{P}/backend-type")], "alloc");
}

#[test]
fn in_a_pod_it_uses_the_service_account_and_reads_its_renewed_token_again() {
    if require_kube("in_a_pod_it_uses_the_service_account_and_reads_its_renewed_token_again")
        .is_none()
    {
        return;
    }
    // As in a pod: KUBERNETES_SERVICE_HOST/PORT and the service account's files, whose token is
    // renewed in place (bound tokens expire). It first holds a token that may do nothing.
    let mut c = Cluster::new(1, VXLAN);
    let sa = c.t.hosts[0].dir.join("serviceaccount");
    std::fs::create_dir_all(&sa).expect("dir");
    std::fs::write(sa.join("token"), c.api.token("nobody")).expect("token");
    std::fs::copy(c.api.ca_path(), sa.join("ca.crt")).expect("ca.crt");
    std::fs::write(sa.join("namespace"), "kube-weft").expect("namespace");
    let (host, port) = (c.api.addr.to_string(), c.api.port.to_string());
    let net_conf = format!("-net-config-path={}", c.config.display());
    c.t.start_spec(0, |spec| {
        spec.args = vec!["-kube-subnet-mgr".into(), net_conf];
        spec.env = vec![
            ("NODE_NAME".into(), node(0)),
            ("KUBERNETES_SERVICE_HOST".into(), host),
            ("KUBERNETES_SERVICE_PORT".into(), port),
        ];
        spec.service_account = Some(sa.clone());
    });
    c.t.hosts[0].wait_log("forbidden", T);
    std::fs::write(sa.join("token"), c.api.token(&node(0))).expect("renew the token");
    // The client reads the file again at least once a minute.
    wait_for(
        "the lease, with the renewed token",
        Duration::from_secs(90),
        || {
            c.t.hosts[0].assert_running();
            c.t.hosts[0].subnet_env()
        },
    );
    assert_eq!(
        c.wait_published(0)[format!("{P}/kube-subnet-manager")],
        "true"
    );
}

#[test]
fn hostile_nodes_are_refused_one_line_each_and_nothing_else_is_lost() {
    if require_kube("hostile_nodes_are_refused_one_line_each_and_nothing_else_is_lost").is_none() {
        return;
    }
    let mut c = Cluster::new(2, VXLAN);
    c.start(0);
    c.start(1);
    for i in 0..2 {
        c.t.wire_container(i);
    }
    c.t.assert_full_mesh(&[0, 1]);
    let mac0 = mac_of(&c, 0, "flannel.1");
    let ann = |ip: &str, data: &str| flanneld_annotations("vxlan", data, ip);
    let peer = |mac: &str| format!(r#"{{"VNI":1,"VtepMAC":"{mac}"}}"#);
    let evil = [
        // Garbage with a terminal escape in it, and BackendData that is no JSON.
        (
            "evil-garbage",
            "10.244.9.0/24",
            ann("10.199.0.99\u{1b}[2J", "{"),
        ),
        // Node 1's podCIDR, newer: the older Node keeps it.
        (
            "evil-same-cidr",
            "10.244.2.0/24",
            ann("10.199.0.98", &peer("02:00:00:00:00:98")),
        ),
        // Node 0's VTEP MAC: its own identity.
        (
            "evil-own-mac",
            "10.244.10.0/24",
            ann("10.199.0.97", &peer(&mac0)),
        ),
        // Outside the network.
        (
            "evil-outside",
            "10.99.0.0/24",
            ann("10.199.0.96", &peer("02:00:00:00:00:96")),
        ),
        // No annotations at all (flanneld v0.22 crashed on it) and a podCIDR: no peer at all.
        ("bare", "10.244.11.0/24", vec![]),
    ];
    // A Node's age is its creationTimestamp, to the second (a tie goes to the lower name):
    // these come a second after the real ones.
    std::thread::sleep(Duration::from_millis(1100));
    for (name, cidr, a) in &evil {
        c.api.create_node(name, Some(cidr), &pairs(a));
    }
    for name in [
        "evil-garbage",
        "evil-same-cidr",
        "evil-own-mac",
        "evil-outside",
    ] {
        c.t.hosts[0].wait_log(name, T);
    }
    // A moment for any repeat to show, then: one line each, nothing programmed for them, and
    // the real peer untouched.
    std::thread::sleep(Duration::from_secs(3));
    c.t.hosts[0].assert_running();
    let log = c.t.hosts[0].log();
    for name in [
        "evil-garbage",
        "evil-same-cidr",
        "evil-own-mac",
        "evil-outside",
    ] {
        let lines = log
            .lines()
            .filter(|l| l.contains(" WARN ") && l.contains(name))
            .count();
        assert_eq!(lines, 1, "{name}: one line:\n{log}");
    }
    assert!(!log.contains('\u{1b}'), "the escape is escaped");
    for cidr in [
        "10.244.9.0/24",
        "10.244.10.0/24",
        "10.99.0.0/24",
        "10.244.11.0/24",
    ] {
        assert!(c.t.hosts[0].ns.route(cidr).is_none(), "{cidr} programmed");
    }
    c.t.assert_full_mesh(&[0, 1]);
}

#[test]
fn an_operators_public_ip_annotations_are_what_the_node_publishes() {
    if require_kube("an_operators_public_ip_annotations_are_what_the_node_publishes").is_none() {
        return;
    }
    let mut c = Cluster::new(
        2,
        r#"{"Network":"10.244.0.0/16","Backend":{"Type":"alloc"}}"#,
    );
    // node-public-ip is taken as -public-ip, as flanneld does; public-ip-overwrite (a node
    // behind NAT) wins over whatever was detected.
    c.api.patch_node(
        &node(0),
        &json!({"metadata": {"annotations": {format!("{P}/node-public-ip"): "10.199.0.77"}}}),
    );
    c.api.patch_node(
        &node(1),
        &json!({"metadata": {"annotations": {format!("{P}/public-ip-overwrite"): "203.0.113.9"}}}),
    );
    c.start(0);
    c.start(1);
    assert_eq!(c.wait_published(0)[format!("{P}/public-ip")], "10.199.0.77");
    assert_eq!(c.wait_published(1)[format!("{P}/public-ip")], "203.0.113.9");
    // Published once, and left alone: weftd takes its own annotation for its own.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(c.annotations(1)[format!("{P}/public-ip")], "203.0.113.9");
    c.t.hosts[1].assert_running();
}

#[test]
fn a_listing_of_more_nodes_than_one_page_is_read_whole() {
    if require_kube("a_listing_of_more_nodes_than_one_page_is_read_whole").is_none() {
        return;
    }
    // weftd lists 100 Nodes a page: 520 peers take six pages and five continue tokens.
    let mut c = Cluster::new(1, r#"{"Network":"10.0.0.0/8","Backend":{"Type":"vxlan"}}"#);
    for k in 0..520u32 {
        let ip = format!("172.16.{}.{}", k / 250, k % 250 + 1);
        let mac = format!("02:00:00:00:{:02x}:{:02x}", k >> 8, k & 0xff);
        let a = flanneld_annotations("vxlan", &format!(r#"{{"VNI":1,"VtepMAC":"{mac}"}}"#), &ip);
        let cidr = format!("10.{}.{}.0/24", 1 + k / 256, k % 256);
        c.api
            .create_node(&format!("peer-{k}"), Some(&cidr), &pairs(&a));
    }
    c.start(0);
    c.t.hosts[0].wait_log("lease listing loaded", T);
    let log = c.t.hosts[0].log();
    let line = log
        .lines()
        .find(|l| l.contains("lease listing loaded"))
        .expect("the listing line");
    assert!(line.contains("peers=520 "), "every page read: {line}");
}

#[test]
fn without_node_name_the_node_is_found_from_the_pods_own_object() {
    if require_kube("without_node_name_the_node_is_found_from_the_pods_own_object").is_none() {
        return;
    }
    // flanneld's fallback: POD_NAME and POD_NAMESPACE name the pod, whose spec.nodeName is the
    // node. That needs pods get besides the shipped role (which has none: its NODE_NAME comes
    // from the downward API).
    let mut c = Cluster::new(1, VXLAN);
    c.api.create(
        r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"weft-abcde","namespace":"default"},
            "spec":{"nodeName":"node-0","containers":[{"name":"weftd","image":"weft"}]}}"#,
    );
    c.api.create(
        r#"{"apiVersion":"rbac.authorization.k8s.io/v1","kind":"ClusterRole",
            "metadata":{"name":"pods-get"},
            "rules":[{"apiGroups":[""],"resources":["pods"],"verbs":["get"]}]}"#,
    );
    c.api.bind_cluster_role(&node(0), "pods-get");
    let kubeconfig = c.t.hosts[0].dir.join("kubeconfig");
    std::fs::create_dir_all(&c.t.hosts[0].dir).expect("dir");
    c.api.kubeconfig_for(&node(0), &kubeconfig);
    let args = [
        "-kube-subnet-mgr".to_string(),
        format!("-kubeconfig-file={}", kubeconfig.display()),
        format!("-net-config-path={}", c.config.display()),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    c.t.start_with(
        0,
        &args,
        &[("POD_NAME", "weft-abcde"), ("POD_NAMESPACE", "default")],
    );
    assert_eq!(c.t.hosts[0].wait_subnet().to_string(), pod_cidr(0));
    assert_eq!(
        c.wait_published(0)[format!("{P}/kube-subnet-manager")],
        "true"
    );
}
