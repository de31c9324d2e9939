#!/usr/bin/env bash
# Validates the Kubernetes manifests offline: deploy/kubernetes/weft.yml (etcd mode) and
# deploy/kubernetes/weft-kube.yml (kube mode, weftd --kube-subnet-mgr), each strictly against the
# Kubernetes schemas that PyPI's kubernetes-validate ships (oldest and newest it knows; unknown
# fields are errors), then the properties each must have beyond the schema. Run by the
# integration test `kubernetes::manifests_validate_strictly_offline_and_their_network_config_is_
# accepted` (tests/integration/kubernetes.rs).
#
# Usage: tests/k8s-validate.sh [--extract DIR] [--extract-kube DIR]
#   --extract DIR       also write weft.yml's ConfigMap net-conf.json and cni-conf.json into DIR
#   --extract-kube DIR  the same for weft-kube.yml's ConfigMap
# Environment: WEFT_K8S_VENV (the virtualenv to install into and reuse, default
# target/k8s-validate-venv).
#
# `kubectl apply --dry-run=client` is not run: it still asks an API server for discovery (and
# Debian's kubectl, kubernetes-client 1.20, does the same), so it cannot work offline.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
manifest="$repo/deploy/kubernetes/weft.yml"
kube_manifest="$repo/deploy/kubernetes/weft-kube.yml"
venv=${WEFT_K8S_VENV:-${CARGO_TARGET_DIR:-$repo/target}/k8s-validate-venv}
extract=""
extract_kube=""
while (($#)); do
  case "$1" in
    --extract) extract=$2; shift 2 ;;
    --extract-kube) extract_kube=$2; shift 2 ;;
    *) echo "k8s-validate.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

# Pinned: the schemas it bundles are part of what is tested.
want=1.37.0
if [[ ! -x $venv/bin/kubernetes-validate ]] ||
  [[ $("$venv/bin/pip" show kubernetes-validate 2>/dev/null | sed -n 's/^Version: //p') != "$want" ]]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "kubernetes-validate==$want"
fi

for m in "$manifest" "$kube_manifest"; do
  for k in 1.25.0 "$want"; do
    "$venv/bin/kubernetes-validate" --strict --quiet -k "$k" "$m"
  done
  echo "k8s-validate: $m is valid (strict) for Kubernetes 1.25 and ${want%.*}"
done

# Each manifest's properties, beyond the schema: both blocks run, and either failing fails the
# script. PyYAML came with kubernetes-validate.
rc=0

# weft.yml (etcd mode): what the issue asks of it.
"$venv/bin/python" - "$manifest" "$repo/config/cni-conflist.json" "$extract" <<'EOF' || rc=1
import json, os, sys
import yaml

manifest, conflist_file, extract = sys.argv[1:4]
docs = {d["kind"]: d for d in yaml.safe_load_all(open(manifest)) if d}
problems = []

def check(cond, what):
    if not cond:
        problems.append(what)

ns = docs["Namespace"]
check(ns["metadata"]["labels"].get("pod-security.kubernetes.io/enforce") == "privileged",
      "Namespace labelled pod-security.kubernetes.io/enforce: privileged")
check("ServiceAccount" in docs, "a ServiceAccount")
check("ClusterRole" not in docs and "Role" not in docs, "no RBAC in etcd mode")

cm = docs["ConfigMap"]["data"]
for key in ("net-conf.json", "cni-conf.json", "etcd_endpoints", "etcd_username",
            "etcd_password_file"):
    check(key in cm, f"ConfigMap key {key}")
net = json.loads(cm["net-conf.json"])
cni = json.loads(cm["cni-conf.json"])
weft, portmap = cni["plugins"]
check(weft["type"] == "weft-cni", "conflist: weft-cni first")
check(weft.get("delegate") == {"hairpinMode": True, "isDefaultGateway": True},
      "conflist: bridge delegate {hairpinMode, isDefaultGateway}")
check(portmap["type"] == "portmap", "conflist: then portmap")
if os.path.exists(conflist_file):
    check(json.load(open(conflist_file)) == cni,
          f"ConfigMap cni-conf.json equals {os.path.basename(conflist_file)}")
else:
    print(f"k8s-validate: no {conflist_file} yet: conflist not compared", file=sys.stderr)

ds = docs["DaemonSet"]
pod = ds["spec"]["template"]["spec"]
check(ds["spec"]["updateStrategy"] == {"type": "RollingUpdate",
                                       "rollingUpdate": {"maxUnavailable": 1}},
      "RollingUpdate, maxUnavailable 1")
check(pod.get("hostNetwork") is True, "hostNetwork")
check(pod.get("priorityClassName") == "system-node-critical", "system-node-critical")
tol = pod["tolerations"]
check({"operator": "Exists", "effect": "NoSchedule"} in tol, "tolerates NoSchedule")
check({"operator": "Exists", "effect": "NoExecute"} in tol, "tolerates NoExecute")
check({"key": "CriticalAddonsOnly", "operator": "Exists"} in tol, "tolerates CriticalAddonsOnly")
terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
check({"key": "kubernetes.io/os", "operator": "In", "values": ["linux"]}
      in terms["nodeSelectorTerms"][0]["matchExpressions"], "nodeAffinity kubernetes.io/os=linux")

inits = {c["name"]: c for c in pod["initContainers"]}
cmds = [c["command"] for c in inits.values()]
check(any(c[1:] == ["config", "set", "--if-absent", "/etc/weft/cfg/net-conf.json"] for c in cmds),
      "an init container runs weftctl config set --if-absent")
check(any(c[1] == "install-file" and c[3] == "/opt/cni/bin/weft-cni" for c in cmds),
      "an init container installs weft-cni into /opt/cni/bin (install-file: atomic)")
check(any(c[1] == "install-file" and c[3].startswith("/etc/cni/net.d/")
          and c[3].endswith(".conflist") for c in cmds),
      "an init container installs the conflist into /etc/cni/net.d (install-file: atomic)")

main = pod["containers"][0]
sec = main["securityContext"]
check(sec.get("privileged") is False, "not privileged")
check(sorted(sec["capabilities"].get("add", [])) == ["NET_ADMIN", "NET_RAW"],
      "capabilities NET_ADMIN and NET_RAW")
check(main["resources"]["requests"] == {"cpu": "100m", "memory": "50Mi"}, "requests 100m/50Mi")
check(main["livenessProbe"]["httpGet"]["path"] == "/healthz", "liveness /healthz")
check(main["readinessProbe"]["httpGet"]["path"] == "/readyz", "readiness /readyz")
port = main["readinessProbe"]["httpGet"]["port"]
check(f"-healthz-port={port}" in main["args"], "the probes' port is weftd's health port")
ann = ds["spec"]["template"]["metadata"]["annotations"]
check(ann.get("prometheus.io/port") == str(port) and ann.get("prometheus.io/path") == "/metrics",
      "Prometheus scrape annotations on the health port")
envs = {e["name"] for e in main["env"]}
for v in ("FLANNELD_ETCD_ENDPOINTS", "FLANNELD_ETCD_CAFILE", "FLANNELD_ETCD_CERTFILE",
          "FLANNELD_ETCD_KEYFILE", "FLANNELD_ETCD_USERNAME", "FLANNELD_ETCD_PASSWORD_FILE"):
    check(v in envs, f"env {v}")
check("FLANNELD_ETCD_PASSWORD" not in envs, "no password in the environment (a file instead)")
check(cm.get("etcd_username") == "" and cm.get("etcd_password_file") == "",
      "etcd authentication off by default (empty etcd_username, etcd_password_file)")

vols = {v["name"]: v for v in pod["volumes"]}
hostpaths = {v["hostPath"]["path"]: v["hostPath"].get("type") for v in vols.values() if "hostPath" in v}
for path, kind in (("/run/flannel", None), ("/opt/cni/bin", None), ("/etc/cni/net.d", None),
                   ("/run/xtables.lock", "FileOrCreate"), ("/dev/net/tun", "CharDevice")):
    check(path in hostpaths and (kind is None or hostpaths[path] == kind),
          f"hostPath {path}" + (f" ({kind})" if kind else ""))
secrets = {v["secret"]["secretName"]: (name, v["secret"])
           for name, v in vols.items() if "secret" in v}
for secret, what in (("weft-etcd-tls", "etcd TLS"), ("weft-etcd-auth", "etcd password")):
    s = secrets.get(secret, (None, {}))[1]
    check(s.get("defaultMode") == 0o400 and s.get("optional") is True,
          f"{what} Secret {secret} mounted 0400, optional")
check(len(secrets) == 2, "no other Secret")
mounted = {m["mountPath"] for m in main["volumeMounts"]}
for path in ("/run/flannel", "/run/xtables.lock", "/dev/net/tun"):
    check(path in mounted, f"weftd mounts {path}")
auth_volume = secrets.get("weft-etcd-auth", ("",))[0]
for c in [main] + [c for c in inits.values() if c.get("env")]:
    check(any(m["name"] == auth_volume for m in c.get("volumeMounts", [])),
          f"{c['name']} (reads etcd) mounts the etcd password Secret")

if problems:
    for p in problems:
        print(f"k8s-validate: missing: {p}", file=sys.stderr)
    sys.exit(1)
if extract:
    os.makedirs(extract, exist_ok=True)
    for key in ("net-conf.json", "cni-conf.json"):
        with open(os.path.join(extract, key), "w") as f:
            f.write(cm[key])
print(f"k8s-validate: {os.path.basename(manifest)}: every property the issue lists is there")
EOF

# weft-kube.yml (kube mode, like kube-flannel.yml): RBAC for exactly what weftd --kube-subnet-mgr
# does, NODE_NAME from the downward API, net-conf.json from the ConfigMap at --net-config-path,
# and nothing of etcd.
"$venv/bin/python" - "$kube_manifest" "$repo/config/cni-conflist.json" "$manifest" \
  "$extract_kube" <<'EOF' || rc=1
import ipaddress, json, os, sys
import yaml

manifest, conflist_file, etcd_manifest, extract = sys.argv[1:5]
name = os.path.basename(manifest)
problems = []

def check(cond, what):
    if not cond:
        problems.append(what)

def fail(what):
    print(f"k8s-validate: {name}: not as required: {what}", file=sys.stderr)
    sys.exit(1)

by_kind = {}
for d in yaml.safe_load_all(open(manifest)):
    if d:
        by_kind.setdefault(d["kind"], []).append(d)
kinds = ["Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap",
         "DaemonSet"]
if sorted(by_kind) != sorted(kinds) or any(len(v) != 1 for v in by_kind.values()):
    fail(f"exactly one each of {', '.join(kinds)}, nothing else (it has "
         + ", ".join(f"{len(v)} {k}" for k, v in sorted(by_kind.items())) + ")")
docs = {k: v[0] for k, v in by_kind.items()}
etcd_docs = {d["kind"]: d for d in yaml.safe_load_all(open(etcd_manifest)) if d}

ns = docs["Namespace"]
ns_name = ns["metadata"]["name"]
check(ns["metadata"].get("labels", {}).get("pod-security.kubernetes.io/enforce") == "privileged",
      "Namespace labelled pod-security.kubernetes.io/enforce: privileged")
for kind in ("ServiceAccount", "ConfigMap", "DaemonSet"):
    check(docs[kind]["metadata"].get("namespace") == ns_name, f"{kind} in namespace {ns_name}")
# One or the other: the same names as weft.yml, so applying both can never run two weftd's.
for kind in ("Namespace", "DaemonSet"):
    check(docs[kind]["metadata"]["name"] == etcd_docs[kind]["metadata"]["name"],
          f"{kind} named as in weft.yml ({etcd_docs[kind]['metadata']['name']})")

# RBAC: exactly nodes get/list/watch and nodes/status patch, compared as sets of
# (apiGroup, resource, verb); anything else (pods, a wildcard, nonResourceURLs) fails.
role = docs["ClusterRole"]
check("aggregationRule" not in role, "ClusterRole without aggregationRule")
granted = set()
for rule in role.get("rules") or []:
    extra = sorted(set(rule) - {"apiGroups", "resources", "verbs"})
    check(not extra, f"ClusterRole rules of apiGroups/resources/verbs only (a rule has {extra})")
    granted |= {(g, r, v) for g in rule.get("apiGroups", []) for r in rule.get("resources", [])
                for v in rule.get("verbs", [])}
want = {("", "nodes", v) for v in ("get", "list", "watch")} | {("", "nodes/status", "patch")}
check(granted == want,
      "ClusterRole grants exactly nodes get/list/watch and nodes/status patch "
      f"(extra: {sorted(granted - want)}, lacking: {sorted(want - granted)})")

sa = docs["ServiceAccount"]
sa_name = sa["metadata"]["name"]
check(sa.get("automountServiceAccountToken") is not False,
      "ServiceAccount does not turn off its token (weftd authenticates with it)")
binding = docs["ClusterRoleBinding"]
check(binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                             "name": role["metadata"]["name"]},
      f"ClusterRoleBinding refers to the ClusterRole {role['metadata']['name']}")
check(binding.get("subjects") == [{"kind": "ServiceAccount", "name": sa_name,
                                   "namespace": ns_name}],
      f"ClusterRoleBinding binds it to ServiceAccount {ns_name}/{sa_name}, and to nothing else")

cm_doc = docs["ConfigMap"]
cm_name = cm_doc["metadata"]["name"]
cm = cm_doc.get("data", {})
check(sorted(cm) == ["cni-conf.json", "net-conf.json"] and "binaryData" not in cm_doc,
      f"ConfigMap keys net-conf.json and cni-conf.json only (has {sorted(cm)})")
try:
    net = json.loads(cm.get("net-conf.json", ""))
    ipaddress.IPv4Network(net["Network"])
    check(isinstance(net.get("Backend", {}).get("Type"), str), "net-conf.json: Backend.Type")
except (ValueError, KeyError, TypeError) as e:
    problems.append(f"ConfigMap net-conf.json parses, with an IPv4 Network ({e!r})")
try:
    cni = json.loads(cm.get("cni-conf.json", ""))
except ValueError as e:
    cni = None
    problems.append(f"ConfigMap cni-conf.json parses ({e})")
if os.path.exists(conflist_file):
    check(json.load(open(conflist_file)) == cni,
          f"ConfigMap cni-conf.json equals {os.path.basename(conflist_file)}")
else:
    print(f"k8s-validate: no {conflist_file} yet: conflist not compared", file=sys.stderr)
check(json.loads(etcd_docs["ConfigMap"]["data"]["cni-conf.json"]) == cni,
      "ConfigMap cni-conf.json equals weft.yml's")

ds = docs["DaemonSet"]
pod = ds["spec"]["template"]["spec"]
etcd_pod = etcd_docs["DaemonSet"]["spec"]["template"]["spec"]
check(ds["spec"].get("updateStrategy") == {"type": "RollingUpdate",
                                           "rollingUpdate": {"maxUnavailable": 1}},
      "RollingUpdate, maxUnavailable 1")
check(pod.get("hostNetwork") is True, "hostNetwork")
check(pod.get("priorityClassName") == "system-node-critical", "system-node-critical")
check(pod.get("serviceAccountName") == sa_name, f"the pod runs as ServiceAccount {sa_name}")
check(pod.get("automountServiceAccountToken") is True,
      "the pod mounts the account's token (automountServiceAccountToken: true)")
tol = pod.get("tolerations", [])
check({"operator": "Exists", "effect": "NoSchedule"} in tol, "tolerates NoSchedule")
check({"operator": "Exists", "effect": "NoExecute"} in tol, "tolerates NoExecute")
check({"key": "CriticalAddonsOnly", "operator": "Exists"} in tol, "tolerates CriticalAddonsOnly")
check(pod.get("affinity") == etcd_pod["affinity"], "nodeAffinity as weft.yml's (linux)")

vols = {v["name"]: v for v in pod.get("volumes", [])}

def configmap_key_at(c, path):
    """The key of the ConfigMap that container c sees as the file at path, or None."""
    for m in c.get("volumeMounts", []):
        src = vols.get(m["name"], {}).get("configMap")
        if not src or src.get("name") != cm_name:
            continue
        at = m["mountPath"].rstrip("/")
        if "subPath" in m:
            if at != path:
                continue
            rel = m["subPath"]
        elif path.startswith(at + "/"):
            rel = path[len(at) + 1:]
        else:
            continue
        if src.get("items") is None:
            return rel if rel in cm else None
        return next((i["key"] for i in src["items"] if i["path"] == rel), None)
    return None

def host_path_at(c, path):
    """The host's path that container c sees at path through a hostPath volume, or None."""
    for m in c.get("volumeMounts", []):
        hp = vols.get(m["name"], {}).get("hostPath")
        at = m["mountPath"].rstrip("/")
        if hp and "subPath" not in m and (path == at or path.startswith(at + "/")):
            return hp["path"].rstrip("/") + path[len(at):]
    return None

def flags(args):
    """weftd's flags, Go style: -name or --name, -name=value; a lone word is a separate value."""
    out = {}
    for a in args:
        check(a.startswith("-"), f"weftd's flags in -name=value form (not {a!r} apart)")
        key, eq, val = a.lstrip("-").partition("=")
        out[key] = val if eq else True
    return out

containers = pod.get("containers", [])
check(len(containers) == 1, "one container, weftd")
main = containers[0]
check(main.get("command") in (None, ["/usr/bin/weftd"]),
      "the container runs weftd (the image's entrypoint)")
f = flags(main.get("args", []))
for flag in ("kube-subnet-mgr", "ip-masq"):
    check(f.get(flag) in (True, "true"), f"weftd --{flag}")
net_config_path = f.get("net-config-path")
check(isinstance(net_config_path, str) and net_config_path.startswith("/"),
      "weftd --net-config-path=<absolute path>")
if isinstance(net_config_path, str):
    check(configmap_key_at(main, net_config_path) == "net-conf.json",
          f"the ConfigMap's net-conf.json mounted at --net-config-path ({net_config_path})")
check(not [k for k in f if "etcd" in k], "no etcd flag")

env = {e["name"]: e for e in main.get("env", [])}
check(env.get("NODE_NAME", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
      == "spec.nodeName", "env NODE_NAME from fieldRef spec.nodeName")
everyone = containers + pod.get("initContainers", [])
for c in everyone:
    check(not [e for e in c.get("env", []) if "ETCD" in e["name"].upper()],
          f"{c['name']}: no etcd variable")
    check("envFrom" not in c, f"{c['name']}: no envFrom")
check(not [v for v in vols.values() if "secret" in v or "projected" in v],
      "no Secret volume (no etcd TLS or password)")
check("etcd" not in json.dumps([ds, cm]).lower(),
      "no mention of etcd in the DaemonSet or ConfigMap")

sec = main.get("securityContext", {})
check(sec.get("privileged") is False, "not privileged")
check(sec.get("allowPrivilegeEscalation") is False, "no privilege escalation")
caps = sec.get("capabilities", {})
check(sorted(caps.get("add", [])) == ["NET_ADMIN", "NET_RAW"] and caps.get("drop") == ["ALL"],
      "capabilities NET_ADMIN and NET_RAW only (drop ALL)")
for c in pod.get("initContainers", []):
    s = c.get("securityContext", {})
    check(s.get("privileged") is False and not s.get("capabilities", {}).get("add"),
          f"{c['name']}: not privileged, no capability")
check(main.get("resources", {}).get("requests") == {"cpu": "100m", "memory": "50Mi"},
      "requests 100m/50Mi")
live = main.get("livenessProbe", {}).get("httpGet", {})
ready = main.get("readinessProbe", {}).get("httpGet", {})
check(live.get("path") == "/healthz", "liveness /healthz")
check(ready.get("path") == "/readyz", "readiness /readyz")
port = f.get("healthz-port")
check(port not in (None, True, "0") and str(live.get("port")) == port == str(ready.get("port")),
      "the probes' port is weftd's --healthz-port")
ann = ds["spec"]["template"]["metadata"].get("annotations", {})
check(ann.get("prometheus.io/port") == port and ann.get("prometheus.io/path") == "/metrics",
      "Prometheus scrape annotations on the health port")

# The CNI install steps: weft.yml's, unchanged; they read the ConfigMap and write the host's dirs.
etcd_installs = [c for c in etcd_pod["initContainers"] if c["command"][1:2] == ["install-file"]]
inits = pod.get("initContainers", [])
check(inits == etcd_installs,
      "init containers: weft.yml's install-file ones ("
      + ", ".join(c["name"] for c in etcd_installs) + "), the same, and no other")
cmds = {c["command"][3]: c for c in inits if c["command"][1:2] == ["install-file"]}
plugin = cmds.get("/opt/cni/bin/weft-cni")
check(plugin is not None
      and host_path_at(plugin, "/opt/cni/bin/weft-cni") == "/opt/cni/bin/weft-cni",
      "an init container installs weft-cni into the host's /opt/cni/bin")
confs = [(d, c) for d, c in cmds.items()
         if d.startswith("/etc/cni/net.d/") and d.endswith(".conflist")]
check(len(confs) == 1 and host_path_at(confs[0][1], confs[0][0]) == confs[0][0]
      and configmap_key_at(confs[0][1], confs[0][1]["command"][2]) == "cni-conf.json",
      "an init container installs the ConfigMap's cni-conf.json into the host's /etc/cni/net.d")

hostpaths = {v["hostPath"]["path"]: v["hostPath"].get("type")
             for v in vols.values() if "hostPath" in v}
for path, kind in (("/run/xtables.lock", "FileOrCreate"), ("/dev/net/tun", "CharDevice")):
    check(hostpaths.get(path) == kind, f"hostPath {path} ({kind})")
for path in ("/run/flannel/subnet.env", "/run/xtables.lock", "/dev/net/tun"):
    check(host_path_at(main, path) == path, f"weftd sees the host's {path}")

if problems:
    for p in problems:
        print(f"k8s-validate: {name}: not as required: {p}", file=sys.stderr)
    sys.exit(1)
if extract:
    os.makedirs(extract, exist_ok=True)
    for key in ("net-conf.json", "cni-conf.json"):
        with open(os.path.join(extract, key), "w") as out:
            out.write(cm[key])
print(f"k8s-validate: {name}: RBAC, NODE_NAME, net-conf.json, no etcd: as required")
EOF

exit "$rc"
