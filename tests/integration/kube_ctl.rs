//! `weftctl status`, `doctor`, `leases` and `config` in Kubernetes mode, inside simulated hosts
//! whose weftd run with `-kube-subnet-mgr` against a real kube-apiserver with RBAC on. weftctl
//! runs as a user bound to a role that may only read Nodes (get, list, watch): it never writes.
//! Needs root and the apiserver (`../shared/kube`, or `KUBE_APISERVER`); skips visibly without.

use std::process::Output;
use std::time::Duration;

use serde_json::json;
use weft_lab::kube::require_kube;

use crate::harness::wait_for;
use crate::kube::{mac_of, node, pod_cidr, Cluster, P, VXLAN};

/// The user weftctl runs as, bound to [`READ_ONLY`] only.
const READER: &str = "nobody";

/// A ClusterRole that may read Nodes and nothing else.
const READ_ONLY: &str = r#"{"apiVersion":"rbac.authorization.k8s.io/v1","kind":"ClusterRole",
    "metadata":{"name":"weftctl-read-nodes"},
    "rules":[{"apiGroups":[""],"resources":["nodes"],"verbs":["get","list","watch"]}]}"#;

const T: Duration = Duration::from_secs(40);

/// What one weftctl run printed.
struct Run {
    ok: bool,
    out: String,
}

impl Run {
    fn from(o: Output) -> Self {
        Self {
            ok: o.status.success(),
            out: format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        }
    }

    /// The line starting with `prefix`.
    fn line(&self, prefix: &str) -> &str {
        (self.out.lines().find(|l| l.starts_with(prefix)))
            .unwrap_or_else(|| panic!("no line starting {prefix:?}:\n{}", self.out))
    }

    /// A `problem <id>:` line containing `needle`, or panics showing everything.
    fn assert_problem(&self, id: &str, needle: &str) {
        let prefix = format!("problem {id}: ");
        assert!(
            self.out
                .lines()
                .any(|l| l.starts_with(&prefix) && l.contains(needle)),
            "no `{prefix}` line with {needle:?}:\n{}",
            self.out
        );
    }
}

/// Binds the read-only role to [`READER`] and writes its kubeconfig into every host's dir.
fn reader(c: &Cluster) {
    let role = c.api.create(READ_ONLY);
    let name = role["metadata"]["name"].as_str().expect("role name");
    c.api.bind_cluster_role(READER, name);
    for h in &c.t.hosts {
        std::fs::create_dir_all(&h.dir).expect("dir");
        c.api
            .kubeconfig_for(READER, &h.dir.join("weftctl.kubeconfig"));
    }
}

/// `weftctl -kube-subnet-mgr … ARGS` inside host `i`, as [`READER`], with `NODE_NAME` set to
/// the host's Node unless `node_env` is false.
fn weftctl_env(c: &Cluster, i: usize, node_env: bool, args: &[&str]) -> Run {
    let h = &c.t.hosts[i];
    let mut cmd = h.ns.command(env!("CARGO_BIN_EXE_weftctl"));
    for (k, _) in std::env::vars() {
        if k.starts_with("FLANNELD_") || ["NODE_NAME", "POD_NAME", "POD_NAMESPACE"].contains(&&*k) {
            cmd.env_remove(k);
        }
    }
    if node_env {
        cmd.env("NODE_NAME", node(i));
    }
    cmd.arg("-kube-subnet-mgr")
        .arg(format!(
            "-kubeconfig-file={}",
            h.dir.join("weftctl.kubeconfig").display()
        ))
        .arg(format!("-net-config-path={}", c.config.display()))
        .args(args);
    Run::from(weft_lab::cmd::output(&mut cmd, Duration::from_secs(60)))
}

fn weftctl(c: &Cluster, i: usize, args: &[&str]) -> Run {
    weftctl_env(c, i, true, args)
}

/// `status` on host `i`, with weftd's files.
fn status(c: &Cluster, i: usize) -> Run {
    let dir = &c.t.hosts[i].dir;
    weftctl(
        c,
        i,
        &[
            "status",
            &format!("-subnet-file={}", dir.join("subnet.env").display()),
            &format!("--docker-daemon-json={}", dir.join("daemon.json").display()),
        ],
    )
}

/// `doctor` on host `i`, with weftd's files and `extra` flags.
fn doctor(c: &Cluster, i: usize, extra: &[&str]) -> Run {
    let dir = &c.t.hosts[i].dir;
    let files = [
        format!("-subnet-file={}", dir.join("subnet.env").display()),
        format!("--docker-daemon-json={}", dir.join("daemon.json").display()),
    ];
    let mut args = vec!["doctor", &files[0], &files[1]];
    args.extend(extra);
    weftctl(c, i, &args)
}

/// Waits until doctor finds nothing on host `i` (weftd converges within a reconcile).
fn settle(c: &Cluster, i: usize) -> Run {
    wait_for(&format!("doctor clean on host {i}"), T, || {
        let r = doctor(c, i, &[]);
        if r.ok {
            return Some(r);
        }
        std::thread::sleep(Duration::from_millis(500));
        None
    })
}

#[test]
fn status_and_doctor_in_kube_mode_show_the_node_and_its_peer_and_name_what_disagrees() {
    if require_kube(
        "status_and_doctor_in_kube_mode_show_the_node_and_its_peer_and_name_what_disagrees",
    )
    .is_none()
    {
        return;
    }
    let mut c = Cluster::new(2, VXLAN);
    reader(&c);
    c.start(0);
    c.start(1);
    for i in 0..2 {
        c.t.wire_container(i);
        c.wait_published(i);
    }
    c.t.assert_full_mesh(&[0, 1]);
    let (ip0, ip1) = (c.t.hosts[0].addr(), c.t.hosts[1].addr());

    // status: the lease from the Node, the peer, the config from net-conf.json.
    let st = wait_for("status consistent on host 0", T, || {
        let r = status(&c, 0);
        r.ok.then_some(r)
    });
    assert!(st.out.ends_with("status: consistent\n"), "{}", st.out);
    assert!(
        st.line("config:")
            .ends_with("net-conf.json: network 10.244.0.0/16 (/24 subnets), backend vxlan"),
        "{}",
        st.out
    );
    assert!(st.line("node:").ends_with(" node-0"), "{}", st.out);
    assert!(st.line("  podCIDR:").ends_with(&pod_cidr(0)), "{}", st.out);
    assert!(
        st.line("  annotations:")
            .contains(&format!("public-ip={ip0}")),
        "{}",
        st.out
    );
    assert!(
        st.line("  NetworkUnavailable:")
            .ends_with("False (FlannelIsUp)"),
        "{}",
        st.out
    );
    assert!(
        st.line("lease:").ends_with(&format!(
            "{} public-ip {ip0} backend vxlan, node node-0's podCIDR (no expiry)",
            pod_cidr(0)
        )),
        "{}",
        st.out
    );
    assert!(st.line("peers:").ends_with(" 1"), "{}", st.out);
    assert!(
        st.line("  peer:").ends_with(&format!(
            "node-1 {} public-ip {ip1} backend vxlan",
            pod_cidr(1)
        )),
        "{}",
        st.out
    );

    // leases, config get and set; --node instead of NODE_NAME.
    let l = weftctl_env(&c, 1, false, &["--node", &node(1), "leases"]);
    assert!(l.ok, "{}", l.out);
    assert!(l.out.starts_with("SUBNET"), "{}", l.out);
    assert!(l.out.contains("NODE"), "{}", l.out);
    for i in 0..2 {
        let row = l.line(&pod_cidr(i));
        assert!(
            row.contains(&c.t.hosts[i].addr().to_string()) && row.ends_with(&node(i)),
            "{}",
            l.out
        );
    }
    let g = weftctl(&c, 0, &["config", "get"]);
    assert!(g.ok && g.out.trim() == VXLAN, "{}", g.out);
    let s = weftctl(&c, 0, &["config", "set", "-"]);
    assert!(!s.ok, "{}", s.out);
    assert!(
        s.out
            .contains("in kube mode the network config is the file"),
        "{}",
        s.out
    );
    let none = weftctl_env(&c, 0, false, &["leases"]);
    assert!(
        !none.ok && none.out.contains("give --node NAME"),
        "{}",
        none.out
    );

    // doctor: a healthy node.
    for i in 0..2 {
        let d = settle(&c, i);
        assert!(d.out.ends_with("no problem found\n"), "{}", d.out);
        for id in [
            "kube",
            "subnet-env",
            "node",
            "annotations",
            "network-unavailable",
            "leases",
            "mtu",
            "device",
            "peers",
            "forward",
        ] {
            assert!(d.out.contains(&format!("ok {id}\n")), "{id}: {}", d.out);
        }
    }

    // NetworkUnavailable=True while weftd runs (it sets it once per start): a problem, or with
    // doctor told weftd runs with --set-node-network-unavailable=false, a warning.
    c.api.patch_node_status(
        &node(0),
        &json!({"status": {"conditions": [{
            "type": "NetworkUnavailable", "status": "True", "reason": "NoRouteCreated",
            "message": "set by the test",
        }]}}),
    );
    let d = doctor(&c, 0, &[]);
    assert!(!d.ok, "{}", d.out);
    d.assert_problem(
        "network-unavailable",
        "node node-0's NetworkUnavailable condition is True (NoRouteCreated)",
    );
    let d = doctor(&c, 0, &["--set-node-network-unavailable=false"]);
    assert!(d.ok, "only a warning: {}", d.out);
    assert!(
        d.line("warning network-unavailable: ")
            .contains("condition is True"),
        "{}",
        d.out
    );
    assert!(
        d.out.ends_with("no problem found (1 warning)\n"),
        "{}",
        d.out
    );

    // Annotations rewritten by hand while weftd is stopped (so it does not publish its own
    // again): the VtepMAC is not flannel.1's, the public-ip not this host's.
    c.t.hosts[0].stop();
    let mac0 = mac_of(&c, 0, "flannel.1");
    c.api.patch_node_status(
        &node(0),
        &json!({"metadata": {"annotations": {
            format!("{P}/backend-data"): r#"{"VNI":1,"VtepMAC":"02:00:00:00:00:01"}"#,
            format!("{P}/public-ip"): "10.199.0.250",
        }}}),
    );
    let d = doctor(&c, 0, &[]);
    assert!(!d.ok, "{}", d.out);
    d.assert_problem(
        "annotations",
        &format!(
            "node node-0's {P}/backend-data publishes VtepMAC 02:00:00:00:00:01 but flannel.1's MAC is {mac0}"
        ),
    );
    d.assert_problem(
        "annotations",
        &format!("node node-0's {P}/public-ip is 10.199.0.250 but this host's address on"),
    );
    let st = status(&c, 0);
    assert!(
        st.line("  annotations:").contains("public-ip=10.199.0.250"),
        "{}",
        st.out
    );
}

#[test]
fn status_and_doctor_in_kube_mode_name_a_node_without_podcidr() {
    if require_kube("status_and_doctor_in_kube_mode_name_a_node_without_podcidr").is_none() {
        return;
    }
    let mut c = Cluster::new(2, VXLAN);
    reader(&c);
    // Node 1 has no podCIDR: its weftd waits (and publishes nothing).
    c.api.delete_node(&node(1));
    c.api.create_node(&node(1), None, &[]);
    c.start(0);
    c.start(1);
    c.t.hosts[1].wait_log("has no podCIDR yet", T);

    let d = doctor(&c, 1, &[]);
    assert!(!d.ok, "{}", d.out);
    d.assert_problem(
        "node",
        "node node-1 has no podCIDR: the controller manager has not allocated one",
    );
    assert!(
        d.line("problem node: ")
            .contains("--allocate-node-cidrs=true"),
        "{}",
        d.out
    );
    assert!(d.out.contains("skip annotations: "), "{}", d.out);

    let st = status(&c, 1);
    assert!(!st.ok, "{}", st.out);
    assert!(
        st.line("  podCIDR:").ends_with("none (not allocated yet)"),
        "{}",
        st.out
    );
    assert!(
        st.out.contains(
            "problem: node node-1 has no podCIDR: the controller manager has not allocated one"
        ),
        "{}",
        st.out
    );

    // Host 0 is fine, and counts node 1 among the nodes that publish nothing.
    c.t.hosts[0].wait_subnet();
    c.wait_published(0);
    let st = wait_for("status consistent on host 0", T, || {
        let r = status(&c, 0);
        r.ok.then_some(r)
    });
    assert!(st.line("peers:").ends_with(" 0"), "{}", st.out);
    assert!(
        st.line("  other nodes:")
            .ends_with("1 without flannel's annotations"),
        "{}",
        st.out
    );
}
