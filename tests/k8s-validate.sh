#!/usr/bin/env bash
# Validates deploy/kubernetes/weft.yml offline: strictly against the Kubernetes schemas that
# PyPI's kubernetes-validate ships (oldest and newest it knows; unknown fields are errors), then
# the properties issue 10 asks of the DaemonSet. Run by the integration test
# `kubernetes::manifests_validate_strictly_offline` (tests/integration/kubernetes.rs).
#
# Usage: tests/k8s-validate.sh [--extract DIR]
#   --extract DIR  also write the ConfigMap's net-conf.json and cni-conf.json into DIR
# Environment: WEFT_K8S_VENV (the virtualenv to install into and reuse, default
# target/k8s-validate-venv).
#
# `kubectl apply --dry-run=client` is not run: it still asks an API server for discovery (and
# Debian's kubectl, kubernetes-client 1.20, does the same), so it cannot work offline.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
manifest="$repo/deploy/kubernetes/weft.yml"
venv=${WEFT_K8S_VENV:-${CARGO_TARGET_DIR:-$repo/target}/k8s-validate-venv}
extract=""
while (($#)); do
  case "$1" in
    --extract) extract=$2; shift 2 ;;
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

for k in 1.25.0 "$want"; do
  "$venv/bin/kubernetes-validate" --strict --quiet -k "$k" "$manifest"
done
echo "k8s-validate: $manifest is valid (strict) for Kubernetes 1.25 and ${want%.*}"

# What the issue asks of the manifests, beyond the schema. PyYAML came with kubernetes-validate.
"$venv/bin/python" - "$manifest" "$repo/config/cni-conflist.json" "$extract" <<'EOF'
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
print("k8s-validate: every property the issue lists is there")
EOF
