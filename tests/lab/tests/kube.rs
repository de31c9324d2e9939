//! The lab's kube-apiserver: reachable from the simulated hosts with TLS verified, RBAC on for
//! each identity's own token, Nodes made and read back, and a restart that forgets the watch
//! history. Needs root and the apiserver binary (`KUBE_APISERVER` or ../shared/kube).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::json;
use weft_lab::kube::{require_kube, KubeApi};
use weft_lab::{wait_for, Lab};

/// One apiserver at a time: each wants ~300 MiB and a core to start.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

const ROLE: &str = "apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: weft-node
rules:
- apiGroups: [\"\"]
  resources: [nodes]
  verbs: [get, list, watch]
- apiGroups: [\"\"]
  resources: [nodes/status]
  verbs: [patch]
";

#[test]
fn hosts_reach_the_apiserver_with_their_own_tokens_rbac_decides_and_a_restart_forgets_history() {
    let test = "hosts_reach_the_apiserver_with_their_own_tokens_rbac_decides_and_a_restart_forgets_history";
    if require_kube(test).is_none() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let began = Instant::now();
    let mut lab = Lab::with_hosts(1, 1500);
    lab.start_kube(&["system:node:h0", "other"]);
    let kube = lab.kube();
    eprintln!("kube-apiserver ready in {:?}", kube.last_start());
    assert!(kube.url().starts_with("https://10.199.0.1:"));
    let h0 = &lab.hosts[0].ns;
    let me = "system:node:h0";

    // Authenticated (the token is known) but not authorized: RBAC is on.
    let (code, body) = kube.as_user_from(h0, me, "GET", "/api/v1/nodes", None);
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("system:node:h0"), "{body}");
    let (code, _) = kube.as_user_from(h0, "other", "GET", "/api/v1/nodes", None);
    assert_eq!(code, 403);
    // A wrong token is not anyone.
    let (ok, out, _) = h0.exec(&[
        "curl",
        "-sS",
        "-o/dev/null",
        "-w%{http_code}",
        "--cacert",
        kube.ca_path().to_str().expect("UTF-8 path"),
        "-H",
        "Authorization: Bearer nope",
        &format!("{}/api/v1/nodes", kube.url()),
    ]);
    assert!(ok);
    assert_eq!(out, "401");

    kube.create(ROLE);
    kube.bind_cluster_role(me, "weft-node");
    wait_for(
        "the binding to take effect",
        Duration::from_secs(10),
        || (kube.as_user_from(h0, me, "GET", "/api/v1/nodes", None).0 == 200).then_some(()),
    );
    // Only for that user, and only what the role grants.
    assert_eq!(
        kube.as_user_from(h0, "other", "GET", "/api/v1/nodes", None)
            .0,
        403
    );

    let ann = "flannel.alpha.coreos.com/backend-type";
    kube.create_node("h0", Some("10.244.3.0/24"), &[(ann, "vxlan")]);
    kube.create_node("h1", None, &[]);
    let (code, body) = kube.as_user_from(h0, me, "GET", "/api/v1/nodes/h0", None);
    assert_eq!(code, 200, "{body}");
    let n: serde_json::Value = serde_json::from_str(&body).expect("a Node");
    assert_eq!(n["spec"]["podCIDR"], "10.244.3.0/24");
    assert_eq!(n["spec"]["podCIDRs"], json!(["10.244.3.0/24"]));
    assert_eq!(n["metadata"]["annotations"][ann], "vxlan");
    assert!(kube.node("h1").expect("h1")["metadata"]["annotations"].is_null());
    assert!(kube.node("h9").is_none());
    assert_eq!(kube.nodes().len(), 2);

    // The status subresource is the node's to patch; the spec is not.
    let patch =
        r#"{"metadata":{"annotations":{"flannel.alpha.coreos.com/public-ip":"10.199.0.11"}}}"#;
    let (code, body) = kube.as_user_from(h0, me, "PATCH", "/api/v1/nodes/h0/status", Some(patch));
    assert_eq!(code, 200, "{body}");
    let (code, _) = kube.as_user_from(h0, me, "PATCH", "/api/v1/nodes/h0", Some(patch));
    assert_eq!(code, 403);
    assert_eq!(
        kube.node("h0").expect("h0")["metadata"]["annotations"]
            ["flannel.alpha.coreos.com/public-ip"],
        "10.199.0.11"
    );

    // Admin-side changes.
    kube.set_pod_cidr("h1", "10.244.4.0/24");
    assert_eq!(
        kube.node("h1").expect("h1")["spec"]["podCIDRs"],
        json!(["10.244.4.0/24"])
    );
    let n = kube.patch_node_status(
        "h1",
        &json!({"status": {"addresses": [{"type": "InternalIP", "address": "10.199.0.12"}]}}),
    );
    assert_eq!(n["status"]["addresses"][0]["address"], "10.199.0.12");
    kube.patch_node("h1", &json!({"metadata": {"labels": {"a": "b"}}}));
    assert_eq!(kube.node("h1").expect("h1")["metadata"]["labels"]["a"], "b");

    // A kubeconfig for the user: TLS against the CA, the user's token.
    let kc = lab.dir.path().join("kubeconfig");
    kube.kubeconfig_for(me, &kc);
    let text = std::fs::read_to_string(&kc).expect("kubeconfig");
    assert!(
        text.contains(&format!("server: \"{}\"", kube.url())),
        "{text}"
    );
    let ca_line = format!("certificate-authority: \"{}\"", kube.ca_path().display());
    assert!(text.contains(&ca_line), "{text}");
    assert!(
        text.contains(kube.token(me)) && !text.contains("insecure"),
        "{text}"
    );

    // A service account's token authenticates as that account.
    kube.create_all(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: kube-flannel\n---\n\
         apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: flannel\n  namespace: kube-flannel\n",
    );
    let sa = kube.service_account_token("kube-flannel", "flannel");
    let (ok, out, _) = h0.exec(&[
        "curl",
        "-sS",
        "--cacert",
        kube.ca_path().to_str().expect("UTF-8 path"),
        "-H",
        &format!("Authorization: Bearer {sa}"),
        &format!("{}/api/v1/nodes", kube.url()),
    ]);
    assert!(ok);
    assert!(
        out.contains("system:serviceaccount:kube-flannel:flannel"),
        "{out}"
    );

    // Watch history: a watch from before the restart is too old afterwards.
    let old = kube.get("/api/v1/nodes").expect("node list")["metadata"]["resourceVersion"]
        .as_str()
        .expect("resourceVersion")
        .to_string();
    let (code, events) = kube.watch(
        &format!("/api/v1/nodes?watch=1&resourceVersion={old}"),
        Duration::from_secs(1),
    );
    assert_eq!(code, 200);
    assert!(events.iter().all(|e| e["type"] != "ERROR"), "{events:?}");
    kube.patch_node("h0", &json!({"metadata": {"labels": {"moved": "on"}}}));
    kube.delete_node("h1");
    assert!(kube.node("h1").is_none());

    let t = Instant::now();
    lab.kube_mut().restart_forgetting_history();
    let (kube, h0) = (lab.kube(), &lab.hosts[0].ns);
    eprintln!(
        "restart_forgetting_history took {:?} (start {:?})",
        t.elapsed(),
        kube.last_start()
    );
    let (code, events) = kube.watch(
        &format!("/api/v1/nodes?watch=1&resourceVersion={old}"),
        Duration::from_secs(5),
    );
    let expired = |v: &serde_json::Value| v["code"] == 410 && v["reason"] == "Expired";
    let gone = match code {
        200 => events
            .iter()
            .any(|e| e["type"] == "ERROR" && expired(&e["object"])),
        410 => true,
        _ => false,
    };
    assert!(gone, "{code} {events:?}");
    // The same token, CA and port serve on, and the data is still there.
    let (code, body) = kube.as_user_from(h0, me, "GET", "/api/v1/nodes/h0", None);
    assert_eq!(code, 200, "{body}");
    let n: serde_json::Value = serde_json::from_str(&body).expect("a Node");
    assert_eq!(n["metadata"]["labels"]["moved"], "on");
    eprintln!("whole test {:?}", began.elapsed());
}

#[test]
fn a_loopback_apiserver_serves_this_namespace() {
    if require_kube("a_loopback_apiserver_serves_this_namespace").is_none() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let kube = KubeApi::start_loopback(&["alice"]);
    eprintln!("loopback kube-apiserver ready in {:?}", kube.last_start());
    assert!(kube.url().starts_with("https://127.0.0.1:"));
    assert_eq!(kube.as_user("alice", "GET", "/api/v1/nodes", None).0, 403);
    let (code, body) = kube.as_user("admin", "GET", "/api/v1/nodes", None);
    assert_eq!(code, 200, "{body}");
    kube.create_node("n", None, &[("k", "v")]);
    assert_eq!(kube.nodes().len(), 1);
    kube.delete_node("n");
    assert!(kube.nodes().is_empty());
}
