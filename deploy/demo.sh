#!/usr/bin/env bash
# The real multi-host demo: three simulated hosts (network namespaces on a shared bridge), etcd,
# weftd on every host, a container behind each host's cni0, and pings between all containers.
#
#   sudo bash deploy/demo.sh [--backend vxlan|host-gw] [--keep]   # --keep: leave the lab running
#   sudo bash deploy/demo.sh --cleanup DIR      # remove a lab left by --keep
#
# Everything lives in namespaces named wd<pid>…; nothing listens on or sends to this machine's own
# addresses, and /run/flannel and /etc/docker are not touched (each host's files are in a temp
# dir). Everything is removed on exit, including on failure or Ctrl-C, unless --keep.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=deploy/lib/topology.sh
source "$REPO/deploy/lib/topology.sh"

HOSTS=3
BACKEND=vxlan
KEEP=0
CLEANUP_DIR=""

usage() {
  sed -n '2,10s/^# \{0,1\}//p' "$0"
  exit "${1:-0}"
}

while (($#)); do
  case $1 in
    --backend) BACKEND=${2:?--backend needs a value}; shift 2 ;;
    --backend=*) BACKEND=${1#*=}; shift ;;
    --keep) KEEP=1; shift ;;
    --cleanup) CLEANUP_DIR=${2:?--cleanup needs the lab directory}; shift 2 ;;
    -h | --help) usage 0 ;;
    *) printf 'unknown option %s\n\n' "$1" >&2; usage 2 ;;
  esac
done
case $BACKEND in
  vxlan | host-gw) ;;
  *) topo_die "--backend must be vxlan or host-gw, not $BACKEND" ;;
esac

topo_require_root
if [[ -n $CLEANUP_DIR ]]; then
  topo_cleanup_dir "$CLEANUP_DIR"
  echo "cleaned up $CLEANUP_DIR"
  exit 0
fi

section() { printf '\n=== %s ===\n' "$*"; }

on_exit() {
  local rc=$?
  trap - EXIT INT TERM
  topo_restore_output
  # Logs help after a failure, not after Ctrl-C (130) or SIGTERM (143).
  if ((rc != 0 && rc != 130 && rc != 143)) && [[ -n $TOPO_DIR && -d $TOPO_DIR ]]; then
    local f
    for f in "$TOPO_DIR"/h*/weftd.log "$TOPO_DIR"/etcd.log; do
      [[ -f $f ]] || continue
      printf '\n--- last lines of %s ---\n' "$f" >&2
      tail -15 "$f" >&2
    done
  fi
  if ((KEEP && rc != 130 && rc != 143)); then
    TOPO_KEEP=1
    section "left running (--keep)"
    echo "namespaces: ${TOPO_NETNS[*]}"
    echo "try:        ip netns exec $(topo_ns c1) ping $(topo_container_ip 2)"
    echo "            ip netns exec $(topo_ns sw) $TOPO_BIN_DIR/weftctl --etcd-endpoints $TOPO_ETCD leases"
    echo "logs:       $TOPO_DIR/h*/weftd.log"
    echo "clean up:   sudo bash $REPO/deploy/demo.sh --cleanup $TOPO_DIR"
  else
    topo_log "cleaning up"
    topo_cleanup
  fi
  case $rc in
    0) ;;
    130 | 143) echo "demo interrupted" >&2 ;;
    *) printf 'demo FAILED (exit %d)%s\n' "$rc" "$( ((KEEP)) || echo '; rerun with --keep to keep the lab and its logs')" >&2 ;;
  esac
  exit "$rc"
}

# Installs packages and Rust when missing (idempotent).
# shellcheck source=deploy/setup-debian.sh
source "$REPO/deploy/setup-debian.sh"
topo_find_bins "$REPO"

topo_init wd
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

topo_log "building the lab: switch, etcd, $HOSTS hosts with containers ($BACKEND)"
topo_switch
topo_etcd
# -ip-masq as in kube-flannel.yml; the firewall rules land in each host's own namespace.
topo_cluster_up "$HOSTS" "$BACKEND" -ip-masq

section "weftctl leases"
topo_ctl leases

for ((n = 1; n <= HOSTS; n++)); do
  section "host $n ($(topo_ns "h$n"), underlay $(topo_underlay_ip "$n")): subnet.env and daemon.json"
  cat "$TOPO_DIR/h$n/subnet.env"
  cat "$TOPO_DIR/h$n/daemon.json"
  echo
done

h1=$(topo_ns h1)
if [[ $BACKEND == vxlan ]]; then
  section "host 1: ip -d link show flannel.1"
  topo_t 10 ip -n "$h1" -d link show flannel.1
  section "host 1: bridge fdb show dev flannel.1"
  topo_t 10 bridge -n "$h1" fdb show dev flannel.1
  section "host 1: ip neigh show dev flannel.1"
  topo_t 10 ip -n "$h1" neigh show dev flannel.1
fi
section "host 1: ip route"
topo_t 10 ip -n "$h1" route

section "pings between containers"
ok=0
total=0
failed=()
for ((a = 1; a <= HOSTS; a++)); do
  for ((b = 1; b <= HOSTS; b++)); do
    ((a == b)) && continue
    total=$((total + 1))
    dst=$(topo_container_ip "$b")
    printf -- '--- container %d (%s) -> container %d (%s)\n' "$a" "$(topo_container_ip "$a")" "$b" "$dst"
    if topo_run 20 ip netns exec "$(topo_ns "c$a")" ping -c 3 -i 0.2 -W 2 "$dst"; then
      ok=$((ok + 1))
    else
      failed+=("c$a->c$b")
    fi
  done
done

echo
if ((ok == total)); then
  echo "demo OK: $ok/$total container pairs reachable ($BACKEND backend, $HOSTS hosts)"
else
  echo "demo FAILED: $ok/$total container pairs reachable; unreachable: ${failed[*]}"
  exit 1
fi
