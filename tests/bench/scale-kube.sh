#!/usr/bin/env bash
# Control plane at scale in Kubernetes mode: scale.sh's lab and kernel watcher, with a real
# kube-apiserver (deploy/lib/topology.sh's topo_kube_apiserver: v1.20.2, its own etcd, RBAC on,
# a static token per identity, the audit log on) in place of etcd. One weftd -kube-subnet-mgr in a
# simulated host, as the identity `weft` bound only to deploy/kubernetes/weft-kube.yml's
# ClusterRole, its own Node (NODE_NAME) with a podCIDR; N other Nodes with podCIDRs in
# 10.0.0.0/8 and flannel's annotations, created by the admin before weftd starts (the prefill,
# timed but not part of the result). For each backend, weftd binary, N and node shape:
#
#   the list       the node list as weftd reads it (pages of 500), timed as weft's identity
#                  before weftd starts: its size and time bound the cold start
#   cold start     weftd started: READY=1, weftd's own listing (from the audit log), its
#                  "lease listing loaded" line, and every peer in the kernel
#   idle           RSS, threads and CPU over --idle seconds
#   heartbeats     kubelet-style status updates of the peers' Nodes (each Node every 5 minutes,
#                  as kubelets do when nothing changes) for --heartbeat-secs: events weftd must
#                  receive and not act on
#   churn          --changes changes (a peer's new VtepMAC or public-ip, patched on its Node's
#                  status as flanneld does), then --deletes Node deletes, then --adds new Nodes,
#                  at --rate per second; then --burst changes from 8 connections at once
#   split          each write's latency cut where the bench's own watch on the API (a second
#                  client, scale_kube.py apiwatch) got its event: the API's part (the write, etcd,
#                  the apiserver's fan-out) and weftd's
#   requests       every request weftd made, from the audit log, by phase: what it asks of the
#                  API per peer event (only its own Node's patches are expected)
#
# "In place" is read from the kernel as scale.sh does (scale.py's watcher); latency is from each
# Node write (the moment before it is sent) to the kernel state. Node shapes: "kubelet" Nodes
# carry what a kubelet registers (labels, addresses, conditions, 25 images, nodeInfo: ~10 KB each
# in the list, as real ones); "minimal" ones only the podCIDR and flannel's annotations.
#
#   sudo bash tests/bench/scale-kube.sh [--backends "vxlan host-gw"] [--sizes "5000"]
#        [--shapes kubelet] [--rate 20] [--changes 200] [--deletes 100] [--adds 100]
#        [--burst 500] [--idle 35] [--heartbeat-secs 30] [--conns 16]
#        [--bins "label=/path/to/release ..."] [--logs DIR]
#
# --bins, --logs and WEFT_BIN_DIR as scale.sh. Each case gets a fresh apiserver and etcd.
# Nothing is asserted; progress goes to stderr and Markdown tables to stdout.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# shellcheck source=deploy/lib/topology.sh
source "$REPO/deploy/lib/topology.sh"
SCALE_PY="$REPO/tests/bench/scale.py"
KUBE_PY="$REPO/tests/bench/scale_kube.py"
MANIFEST="$REPO/deploy/kubernetes/weft-kube.yml"

BACKENDS=(vxlan host-gw)
SIZES=(5000)
SHAPES=(kubelet)
RATE=20
CHANGES=200
DELETES=100
ADDS=100
BURST=500
IDLE=35
HEARTBEAT_SECS=30
CONNS=16
BINS=()
LOGS=""

usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
  exit "${1:-0}"
}

while (($#)); do
  case $1 in
    --backends) read -r -a BACKENDS <<<"${2:?}"; shift 2 ;;
    --sizes) read -r -a SIZES <<<"${2:?}"; shift 2 ;;
    --shapes) read -r -a SHAPES <<<"${2:?}"; shift 2 ;;
    --rate) RATE=${2:?}; shift 2 ;;
    --changes) CHANGES=${2:?}; shift 2 ;;
    --deletes) DELETES=${2:?}; shift 2 ;;
    --adds) ADDS=${2:?}; shift 2 ;;
    --burst) BURST=${2:?}; shift 2 ;;
    --idle) IDLE=${2:?}; shift 2 ;;
    --heartbeat-secs) HEARTBEAT_SECS=${2:?}; shift 2 ;;
    --conns) CONNS=${2:?}; shift 2 ;;
    --bins) read -r -a BINS <<<"${2:?}"; shift 2 ;;
    --logs) LOGS=${2:?}; mkdir -p "$LOGS"; shift 2 ;;
    -h | --help) usage 0 ;;
    *) printf 'unknown option %s\n\n' "$1" >&2; usage 2 ;;
  esac
done
for b in "${BACKENDS[@]}"; do
  [[ $b == vxlan || $b == host-gw || $b == udp ]] || topo_die "unknown backend $b (vxlan, host-gw, udp)"
done
for s in "${SHAPES[@]}"; do
  [[ $s == kubelet || $s == minimal ]] || topo_die "unknown node shape $s (kubelet, minimal)"
done
for n in "${SIZES[@]}"; do
  # Peers 1..N plus the adds stay below this host's own subnet index (65535).
  [[ $n =~ ^[0-9]+$ && $n -ge 1 && $n -le 50000 ]] || topo_die "--sizes wants numbers from 1 to 50000"
done
for v in "$RATE" "$CHANGES" "$DELETES" "$ADDS" "$BURST" "$IDLE" "$CONNS"; do
  [[ $v =~ ^[0-9]+$ && $v -ge 1 ]] || topo_die "--rate, --changes, --deletes, --adds, --burst, --idle and --conns want whole numbers"
done
[[ $HEARTBEAT_SECS =~ ^[0-9]+$ ]] || topo_die "--heartbeat-secs wants a whole number (0: none)"

topo_require_root
# shellcheck source=deploy/setup-debian.sh
source "$REPO/deploy/setup-debian.sh"
if ((${#BINS[@]} == 0)); then
  topo_find_bins "$REPO"
  BINS=("weft=$TOPO_BIN_DIR")
fi
for spec in "${BINS[@]}"; do
  [[ $spec == *=* && -x ${spec#*=}/weftd ]] || topo_die "--bins wants label=dir with weftd in dir (got $spec)"
done
topo_kube_binary >/dev/null

# The flannel network is 10.0.0.0/8: the underlay must lie outside it.
TOPO_UNDERLAY=192.168.77
topo_init wsk
topo_bench_traps
topo_switch
RESULTS="$TOPO_DIR/results.jsonl"
: >"$RESULTS"
KUBE_USER=weft

marker_up() { [[ -s $1 ]]; }

# One case: weftd of `label` in `dir`, `backend`, `n` peer Nodes of `shape`. Appends a JSON line
# to $RESULTS.
run_case() {
  local label=$1 dir=$2 backend=$3 n=$4 shape=$5 run=$6
  local d="$TOPO_DIR/run$run" h1 t0 weftd watcher apiwatch driver api
  mkdir -p "$d"
  topo_log "$label: $backend with $n $shape nodes"
  topo_host 1
  h1=$(topo_ns h1)
  if [[ $backend == host-gw ]]; then
    # host-gw needs every public-ip on a directly connected network.
    topo_t 10 ip -n "$h1" addr add 172.31.255.254/12 dev eth0
  else
    topo_t 10 ip -n "$h1" route add 172.16.0.0/12 via "${TOPO_UNDERLAY}.1"
    topo_t 10 ip netns exec "$h1" sysctl -qw net.ipv4.icmp_msgs_per_sec=1000000 \
      net.ipv4.icmp_msgs_burst=100000
  fi

  # A fresh apiserver: RBAC, weft's identity, the audit log of every request weft makes.
  cat >"$d/audit-policy.yaml" <<EOF
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
- level: Metadata
  users: ["$KUBE_USER"]
- level: None
EOF
  topo_log "starting the kube-apiserver"
  topo_kube_apiserver "$d/kube" "$KUBE_USER" --audit-policy-file="$d/audit-policy.yaml" \
    --audit-log-path="$d/audit.log" --audit-log-maxsize=0
  api=$TOPO_KUBE_URL
  topo_kube_bind_manifest_role "$MANIFEST" "$KUBE_USER" >/dev/null
  topo_kubeconfig "$KUBE_USER" "$d/kubeconfig"
  printf '{"Network":"10.0.0.0/8","SubnetLen":24,"Backend":{"Type":"%s"}}\n' "$backend" \
    >"$d/net-conf.json"

  topo_log "creating $n Nodes (prefill, not measured)"
  topo_nsexec "$h1" 3600 python3 "$KUBE_PY" prefill --api "$api" --ca "$TOPO_KUBE_CA" \
    --token-file "$TOPO_KUBE_DIR/token.admin" --backend "$backend" --n "$n" --shape "$shape" \
    --conns "$CONNS" --own-ip "$(topo_underlay_ip 1)" --out "$d/prefill.json"
  topo_log "prefill: $(jq -r '"\(.secs) s, \(.per_sec) nodes/s"' "$d/prefill.json")"
  topo_nsexec "$h1" 600 python3 "$KUBE_PY" list --api "$api" --ca "$TOPO_KUBE_CA" \
    --token-file "$TOPO_KUBE_DIR/token.$KUBE_USER" --out "$d/list.json"
  topo_log "the list: $(jq -r '"\(.items) nodes, \(.bytes) bytes, \(.ms) ms"' "$d/list.json")"

  topo_spawn "$d/watch.log" ip netns exec "$h1" python3 "$SCALE_PY" watch \
    --out "$d/events" --notify "$d/notify.sock" --marker "$d/marker"
  watcher=$TOPO_SPAWNED
  topo_wait_until 20 "the netlink watcher" marker_up "$d/marker"
  # The bench's own watch on the API: when each write's event leaves the apiserver.
  topo_spawn "$d/apiwatch.log" ip netns exec "$h1" python3 "$KUBE_PY" apiwatch --api "$api" \
    --ca "$TOPO_KUBE_CA" --token-file "$TOPO_KUBE_DIR/token.admin" --out "$d/apiwatch" \
    --marker "$d/apiwatch.marker"
  apiwatch=$TOPO_SPAWNED
  topo_wait_until 20 "the bench's API watch" marker_up "$d/apiwatch.marker"

  topo_spawn "$d/driver.log" ip netns exec "$h1" python3 "$KUBE_PY" drive --api "$api" \
    --ca "$TOPO_KUBE_CA" --token-file "$TOPO_KUBE_DIR/token.admin" --backend "$backend" \
    --n "$n" --shape "$shape" --events "$d/events" --out "$d/result.json" \
    --start-file "$d/start" --audit "$d/audit.log" --user "$KUBE_USER" \
    --weftd-log "$d/weftd.log" --prefill-file "$d/prefill.json" --list-file "$d/list.json" \
    --apiwatch "$d/apiwatch" \
    --idle "$IDLE" --rate "$RATE" --changes "$CHANGES" --deletes "$DELETES" --adds "$ADDS" \
    --burst "$BURST" --heartbeat-secs "$HEARTBEAT_SECS"
  driver=$TOPO_SPAWNED
  t0=$EPOCHREALTIME
  topo_spawn "$d/weftd.log" ip netns exec "$h1" env NOTIFY_SOCKET="$d/notify.sock" \
    NODE_NAME=bench-self ${WEFT_LOG:+"WEFT_LOG=$WEFT_LOG"} "$dir/weftd" -kube-subnet-mgr \
    -kubeconfig-file="$d/kubeconfig" -net-config-path="$d/net-conf.json" -iface=eth0 \
    -subnet-file="$d/subnet.env" --docker-daemon-json= -iptables-forward-rules=false
  weftd=$TOPO_SPAWNED
  printf '%s %s\n' "$t0" "$weftd" >"$d/start.tmp"
  mv "$d/start.tmp" "$d/start"
  # Bounded: the driver gives up on its own (3 minutes per phase at most).
  if ! wait "$driver"; then
    tail -5 "$d/driver.log" >&2
    topo_die "the driver failed (weftd log: $d/weftd.log)"
  fi
  topo_alive "$weftd" || topo_die "weftd exited during the run (log: $d/weftd.log)"
  local lines warns full
  lines=$(wc -l <"$d/weftd.log")
  warns=$(grep -c -E ' (WARN|ERROR) ' "$d/weftd.log" || true)
  full=$(grep -c 'kernel compared with all peers' "$d/weftd.log" || true)
  jq -c --arg lbl "$label" --argjson lines "$lines" --argjson warns "$warns" \
    --argjson full "$full" \
    '. + {"label": $lbl, "log_lines": $lines, "log_warnings": $warns, "full_passes": $full}' \
    "$d/result.json" >>"$RESULTS"
  topo_stop_tracked "$weftd" "$watcher" "$apiwatch" "$driver"
  if [[ -n $LOGS ]]; then
    cp "$d/weftd.log" "$LOGS/$run-$label-$backend-$n-$shape.log"
    cp "$d/audit.log" "$LOGS/$run-$label-$backend-$n-$shape.audit.log"
    cp "$d/result.json" "$LOGS/$run-$label-$backend-$n-$shape.json"
  fi
  topo_kube_stop
  topo_host_del 1
  # The apiserver's etcd data and the audit log of this case: not kept for the next.
  rm -rf "$d/kube" "$d/events" "$d/audit.log"
}

run=0
for backend in "${BACKENDS[@]}"; do
  for n in "${SIZES[@]}"; do
    for shape in "${SHAPES[@]}"; do
      for spec in "${BINS[@]}"; do
        run=$((run + 1))
        run_case "${spec%%=*}" "${spec#*=}" "$backend" "$n" "$shape" "$run"
      done
    done
  done
done

echo "## Control plane at scale, Kubernetes mode"
echo
echo "\`sudo bash tests/bench/scale-kube.sh --backends \"${BACKENDS[*]}\" --sizes \"${SIZES[*]}\" --shapes \"${SHAPES[*]}\" --rate $RATE --changes $CHANGES --deletes $DELETES --adds $ADDS --burst $BURST --idle $IDLE --heartbeat-secs $HEARTBEAT_SECS\`"
echo
echo "Machine: $(nproc) CPUs, $(uname -r), kube-apiserver $("$(topo_kube_binary)" --version 2>/dev/null | awk '{print $2}') with $(etcd --version | head -1)."
echo
python3 "$KUBE_PY" report "$RESULTS"
