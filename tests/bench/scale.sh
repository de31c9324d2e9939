#!/usr/bin/env bash
# Control plane at scale: one real weftd in a simulated host (the lab of deploy/lib/topology.sh),
# with N other nodes' leases in etcd, written by a driver as those nodes would (flannel's keys and
# JSON, network 10.0.0.0/8 in /24s). For each backend, N, family and weftd binary:
#
#   cold start     N leases stored, weftd started: time to READY=1 (a notify socket) and until
#                  every peer is in place
#   idle           RSS, threads and CPU over --idle seconds (more than one 30 s resync)
#   steady churn   adds, changes and deletes in turn at --rate per second for --churn-secs
#   bursts         --burst adds, then changes, then deletes: once as one etcd transaction each,
#                  once as separate puts from 8 connections at once
#
# "In place" is read from the kernel through rtnetlink in the host's namespace, timestamped on
# arrival by a watcher process of its own: vxlan a peer's route, neighbour and FDB entry on
# flannel.1; host-gw its route on eth0; udp (peers in userspace) a probe datagram into the peer's
# subnet leaving eth0 for the peer's PublicIP, or ICMP unreachable once it is gone (cold start: 200
# peers sampled). Latency is from each etcd write (the moment before it is sent) to the kernel
# state: p50, p99, max, and for a burst the last peer after the last write. A change is a new VTEP
# MAC (vxlan) or PublicIP.
#
# --families "4 dual" (default 4) runs each case also dual-stack: EnableIPv6 with IPv6Network
# fd00::/48 in /64s (peer i holds 10.0.i.0/24 and fd00:0:0:i::/64), each peer a PublicIPv6 in the
# lab's IPv6 underlay /64 and, for vxlan, BackendV6Data with a MAC of its own. A dual peer is in
# place once both families' objects are: host-gw also its IPv6 route on eth0; vxlan also the IPv6
# route, neighbour and FDB entry (IPv6 remote) on flannel-v6.1. A change changes both PublicIPs or
# both MACs. udp carries IPv4 only: its dual case is skipped, as is any whose config weftctl
# refuses. The tables name each row's family, and a last one sets dual beside IPv4 for each case
# run both ways: cold start, one change (from the churn), RSS.
#
#   sudo bash tests/bench/scale.sh [--backends "vxlan host-gw udp"] [--sizes "0 1000 10000"]
#        [--families "4 dual"] [--rate 100] [--churn-secs 10] [--burst 500] [--idle 35]
#        [--bins "before=/path/to/release after=/path/to/release"] [--logs DIR]
#
# --bins runs each case with each binary directory (weftd, weftctl), one after the other, so a
# before/after comparison is measured in one run; without it the repo's release build is used.
# --logs keeps each run's weftd log in DIR (the lab's own files go at the end).
# Nothing is asserted; progress goes to stderr and Markdown tables to stdout.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# shellcheck source=deploy/lib/topology.sh
source "$REPO/deploy/lib/topology.sh"
SCALE_PY="$REPO/tests/bench/scale.py"

BACKENDS=(vxlan host-gw udp)
SIZES=(0 1000 10000)
FAMILIES=(4)
RATE=100
CHURN=10
BURST=500
IDLE=35
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
    --families) read -r -a FAMILIES <<<"${2:?}"; shift 2 ;;
    --rate) RATE=${2:?}; shift 2 ;;
    --churn-secs) CHURN=${2:?}; shift 2 ;;
    --burst) BURST=${2:?}; shift 2 ;;
    --idle) IDLE=${2:?}; shift 2 ;;
    --bins) read -r -a BINS <<<"${2:?}"; shift 2 ;;
    --logs) LOGS=${2:?}; mkdir -p "$LOGS"; shift 2 ;;
    -h | --help) usage 0 ;;
    *) printf 'unknown option %s\n\n' "$1" >&2; usage 2 ;;
  esac
done
for b in "${BACKENDS[@]}"; do
  [[ $b == vxlan || $b == host-gw || $b == udp ]] || topo_die "unknown backend $b (vxlan, host-gw, udp)"
done
for n in "${SIZES[@]}"; do
  # Subnet indexes 1..N plus churn must stay inside 10.0.0.0/8's 65,535 /24s.
  [[ $n =~ ^[0-9]+$ && $n -le 50000 ]] || topo_die "--sizes wants numbers from 0 to 50000"
done
for f in "${FAMILIES[@]}"; do
  [[ $f == 4 || $f == dual ]] || topo_die "unknown family $f (4, dual)"
  [[ $f == 4 ]] || topo_have_ipv6 || topo_die "--families dual needs a kernel with IPv6"
done
for v in "$RATE" "$CHURN" "$BURST" "$IDLE"; do
  [[ $v =~ ^[0-9]+$ && $v -ge 1 ]] || topo_die "--rate, --churn-secs, --burst and --idle want whole numbers"
done

topo_require_root
# shellcheck source=deploy/setup-debian.sh
source "$REPO/deploy/setup-debian.sh"
if ((${#BINS[@]} == 0)); then
  topo_find_bins "$REPO"
  BINS=("weft=$TOPO_BIN_DIR")
fi
for spec in "${BINS[@]}"; do
  [[ $spec == *=* && -x ${spec#*=}/weftd && -x ${spec#*=}/weftctl ]] ||
    topo_die "--bins wants label=dir with weftd and weftctl in dir (got $spec)"
done

# The flannel network is 10.0.0.0/8: the underlay must lie outside it.
TOPO_UNDERLAY=192.168.77
topo_init wsc
topo_bench_traps
topo_switch
# One transaction may carry a whole burst (etcd's default is 128 operations).
topo_etcd --log-level error --max-txn-ops 2000
RESULTS="$TOPO_DIR/results.jsonl"
: >"$RESULTS"

marker_up() { [[ -s $1 ]]; }

# A case not run, with the reason, as a row of the tables.
skip_case() {
  local label=$1 backend=$2 n=$3 family=$4 why=$5
  topo_log "$label: $backend $family with $n peers skipped: $why"
  jq -nc --arg lbl "$label" --arg backend "$backend" --argjson n "$n" --arg family "$family" \
    --arg why "$why" \
    '{"label": $lbl, "backend": $backend, "n": $n, "family": $family, "skipped": $why}' \
    >>"$RESULTS"
}

# One case: binaries of `label` in `dir`, `backend`, `n` peers, `family` (4 or dual). Appends a
# JSON line to $RESULTS.
run_case() {
  local label=$1 dir=$2 backend=$3 n=$4 family=$5 run=$6
  local d="$TOPO_DIR/run$run" h1 t0 weftd watcher driver config out dual="" v6=()
  mkdir -p "$d"
  TOPO_ETCD_PREFIX="/bench/$run"
  TOPO_BIN_DIR=$dir
  if [[ $family == dual ]]; then
    if [[ $backend == udp ]]; then
      skip_case "$label" "$backend" "$n" "$family" "udp carries IPv4 only"
      return
    fi
    # IPv6 index i lines up with IPv4 index i (16 bits each), as weftd's own lease does.
    dual='"EnableIPv6":true,"IPv6Network":"fd00::/48","IPv6SubnetLen":64,'
    # The peers' PublicIPv6 lie in the underlay's /64: connected, as host-gw needs.
    v6=(--underlay6 "$(topo_underlay6)::/64")
  fi
  config=$(printf '{"Network":"10.0.0.0/8","SubnetLen":24,%s"Backend":{"Type":"%s"}}' "$dual" \
    "$backend")
  # weftctl refuses what weftd would (a backend not yet dual-stack): skipped, not waited for.
  if ! out=$(topo_ctl config set - <<<"$config" 2>&1); then
    [[ $family == dual ]] || topo_die "weftctl config set: $out"
    out=${out##*$'\n'}
    skip_case "$label" "$backend" "$n" "$family" "weftctl refused the config: ${out#*/config: }"
    return
  fi
  topo_log "$label: $backend $family with $n peers"
  topo_host 1
  h1=$(topo_ns h1)
  if [[ $backend == host-gw ]]; then
    # host-gw needs every PublicIP on a directly connected network.
    topo_t 10 ip -n "$h1" addr add 172.31.255.254/12 dev eth0
  else
    # The switch drops what it is sent: udp's probes are seen leaving eth0.
    topo_t 10 ip -n "$h1" route add 172.16.0.0/12 via "${TOPO_UNDERLAY}.1"
    # udp answers a probe into a subnet no peer holds with ICMP unreachable, at the kernel's
    # ICMP error rate of this namespace: by default 1,000 a second would bound how fast 500
    # deletes can be seen. Raised here, so that the probes measure weftd, not the limit.
    topo_t 10 ip netns exec "$h1" sysctl -qw net.ipv4.icmp_msgs_per_sec=1000000 \
      net.ipv4.icmp_msgs_burst=100000
  fi
  topo_nsexec "$h1" 300 python3 "$SCALE_PY" prefill --etcd "$TOPO_ETCD" \
    --prefix "$TOPO_ETCD_PREFIX" --backend "$backend" --n "$n" "${v6[@]}"

  topo_spawn "$d/watch.log" ip netns exec "$h1" python3 "$SCALE_PY" watch \
    --out "$d/events" --notify "$d/notify.sock" --marker "$d/marker"
  watcher=$TOPO_SPAWNED
  topo_wait_until 20 "the netlink watcher" marker_up "$d/marker"

  # The driver first (it waits for weftd's start file), so it watches from weftd's first moment.
  topo_spawn "$d/driver.log" ip netns exec "$h1" python3 "$SCALE_PY" drive --etcd "$TOPO_ETCD" \
    --prefix "$TOPO_ETCD_PREFIX" --backend "$backend" --n "$n" "${v6[@]}" --events "$d/events" \
    --out "$d/result.json" \
    --start-file "$d/start" --subnet-file "$d/subnet.env" --idle "$IDLE" --rate "$RATE" \
    --churn-secs "$CHURN" --burst "$BURST"
  driver=$TOPO_SPAWNED
  t0=$EPOCHREALTIME
  topo_spawn "$d/weftd.log" ip netns exec "$h1" env NOTIFY_SOCKET="$d/notify.sock" \
    ${WEFT_LOG:+"WEFT_LOG=$WEFT_LOG"} "$dir/weftd" -etcd-endpoints="$TOPO_ETCD" \
    -etcd-prefix="$TOPO_ETCD_PREFIX" -iface=eth0 -subnet-file="$d/subnet.env" \
    --docker-daemon-json= -iptables-forward-rules=false
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
  # Full passes (dump and compare everything); weftd before issue 11 did one per event, unlogged.
  full=$(grep -c 'kernel compared with all peers' "$d/weftd.log" || true)
  jq -c --arg lbl "$label" --argjson lines "$lines" --argjson warns "$warns" \
    --argjson full "$full" \
    '. + {"label": $lbl, "log_lines": $lines, "log_warnings": $warns, "full_passes": $full}' \
    "$d/result.json" >>"$RESULTS"
  topo_stop_tracked "$weftd" "$watcher" "$driver"
  [[ -z $LOGS ]] || cp "$d/weftd.log" "$LOGS/$run-$label-$backend-$family-$n.log"
  topo_host_del 1
}

run=0
for backend in "${BACKENDS[@]}"; do
  for n in "${SIZES[@]}"; do
    # Families inside: v4 and dual of one backend and size end up side by side.
    for family in "${FAMILIES[@]}"; do
      for spec in "${BINS[@]}"; do
        run=$((run + 1))
        run_case "${spec%%=*}" "${spec#*=}" "$backend" "$n" "$family" "$run"
      done
    done
  done
done

echo "## Control plane at scale"
echo
echo "\`sudo bash tests/bench/scale.sh --backends \"${BACKENDS[*]}\" --sizes \"${SIZES[*]}\" --families \"${FAMILIES[*]}\" --rate $RATE --churn-secs $CHURN --burst $BURST --idle $IDLE\`"
echo
echo "Machine: $(nproc) CPUs, $(uname -r), $(etcd --version | head -1)."
echo
python3 "$SCALE_PY" report "$RESULTS"
