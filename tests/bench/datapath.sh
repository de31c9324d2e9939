#!/usr/bin/env bash
# Data-path benchmark: two simulated hosts (the lab of deploy/lib/topology.sh), measured with iperf3
# and ping in several modes in one run, so every ratio compares numbers taken on the same machine
# at the same time:
#
#   underlay      host to host over eth0/bridge, no weft (the baseline)
#   host-gw       container to container, weftd with the host-gw backend
#   vxlan         container to container, weftd with the vxlan backend
#   vxlan-manual  container to container over a flannel.1 made by hand with `ip link add … type
#                 vxlan` and flannel's settings (VNI 1, dstport 8472, local, nolearning, MTU −50),
#                 hand-written neighbour/FDB/route entries, no weftd: what weft's vxlan must match
#   vxlan-masq    (opt-in) as vxlan, but weftd also runs -ip-masq and its FORWARD rules, to show
#                 what the firewall rules cost
#
#   sudo bash tests/bench/datapath.sh [--duration SECS] [--rounds N] [--modes "m1 m2 …"]
#
# Each round runs every mode once, in a rotated order so that slow drift of the machine does not
# always hit the same mode; the table shows the median over rounds. Progress goes to stderr, the
# Markdown report to stdout. Timings are reported, never asserted.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# shellcheck source=deploy/lib/topology.sh
source "$REPO/deploy/lib/topology.sh"

DURATION=5
ROUNDS=3
MODES=(underlay host-gw host-gw-manual vxlan vxlan-manual)
PORT=5201

usage() {
  sed -n '2,22s/^# \{0,1\}//p' "$0"
  exit "${1:-0}"
}

while (($#)); do
  case $1 in
    --duration) DURATION=${2:?}; shift 2 ;;
    --rounds) ROUNDS=${2:?}; shift 2 ;;
    --modes) read -r -a MODES <<<"${2:?}"; shift 2 ;;
    -h | --help) usage 0 ;;
    *) printf 'unknown option %s\n\n' "$1" >&2; usage 2 ;;
  esac
done
[[ $DURATION =~ ^[0-9]+$ && $DURATION -ge 1 ]] || topo_die "--duration wants whole seconds"
[[ $ROUNDS =~ ^[0-9]+$ && $ROUNDS -ge 1 ]] || topo_die "--rounds wants a positive number"
for m in "${MODES[@]}"; do
  case $m in
    underlay | host-gw | host-gw-manual | vxlan | vxlan-manual | vxlan-masq) ;;
    *) topo_die "unknown mode $m" ;;
  esac
done

topo_require_root

# Packages: the project's set, plus what only the benchmark needs.
# shellcheck source=deploy/setup-debian.sh
source "$REPO/deploy/setup-debian.sh"
for tool in ethtool jq; do
  if ! command -v "$tool" >/dev/null; then
    topo_log "installing $tool"
    DEBIAN_FRONTEND=noninteractive topo_t 600 apt-get install -y -qq --no-install-recommends "$tool" >/dev/null
  fi
done
topo_find_bins "$REPO"

on_exit() {
  local rc=$?
  trap - EXIT INT TERM
  topo_restore_output
  topo_log "cleaning up"
  topo_cleanup
  case $rc in
    0) ;;
    130 | 143) echo "benchmark interrupted" >&2 ;;
    *) printf 'benchmark FAILED (exit %d)\n' "$rc" >&2 ;;
  esac
  exit "$rc"
}

topo_init wdb
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
topo_switch
topo_etcd

declare -A RES=()   # "<mode>,<metric>" -> space-separated values, one per round
SRC="" DST="" DST_IP="" SERVER_PID=""

# --- bringing each mode up and down -------------------------------------------------------------

# flannel's vxlan set-up by hand, on hosts 1 and 2, with leases 10.244.<n>.0/24. A fake subnet.env
# lets topo_wire_container treat the containers exactly as in the weftd modes.
manual_vxlan() {
  local n m h mtu=1450
  for n in 1 2; do
    mkdir -p "$TOPO_DIR/h$n"
    printf 'FLANNEL_NETWORK=%s\nFLANNEL_SUBNET=10.244.%d.1/24\nFLANNEL_MTU=%d\nFLANNEL_IPMASQ=false\n' \
      "$TOPO_NETWORK" "$n" "$mtu" >"$TOPO_DIR/h$n/subnet.env"
    h=$(topo_ns "h$n")
    topo_t 10 ip -n "$h" link add flannel.1 type vxlan id 1 dev eth0 local "$(topo_underlay_ip "$n")" \
      dstport 8472 nolearning
    topo_t 10 ip -n "$h" link set flannel.1 mtu "$mtu" address "02:00:0a:f4:00:0$n" up
    topo_t 10 ip -n "$h" addr add "10.244.$n.0/32" dev flannel.1
  done
  for n in 1 2; do
    m=$((3 - n))
    h=$(topo_ns "h$n")
    # flannel's order: neighbour, FDB entry, route.
    topo_t 10 ip -n "$h" neigh replace "10.244.$m.0" lladdr "02:00:0a:f4:00:0$m" dev flannel.1 nud permanent
    topo_t 10 bridge -n "$h" fdb append "02:00:0a:f4:00:0$m" dev flannel.1 dst "$(topo_underlay_ip "$m")" self permanent
    topo_t 10 ip -n "$h" route add "10.244.$m.0/24" via "10.244.$m.0" dev flannel.1 onlink
    topo_wire_container "$n"
  done
}

# host-gw by hand: the same containers and one plain route per peer, no weftd. weft's host-gw is
# held against this, since "underlay" is host to host and skips the container hops.
manual_host_gw() {
  local n m h
  for n in 1 2; do
    mkdir -p "$TOPO_DIR/h$n"
    printf 'FLANNEL_NETWORK=%s\nFLANNEL_SUBNET=10.244.%d.1/24\nFLANNEL_MTU=1500\nFLANNEL_IPMASQ=false\n' \
      "$TOPO_NETWORK" "$n" >"$TOPO_DIR/h$n/subnet.env"
  done
  for n in 1 2; do
    m=$((3 - n))
    h=$(topo_ns "h$n")
    topo_t 10 ip -n "$h" route add "10.244.$m.0/24" via "$(topo_underlay_ip "$m")" dev eth0
    topo_wire_container "$n"
  done
}

mode_up() {
  local mode=$1 round=$2
  # A fresh etcd prefix per mode and round: no lease of an earlier mode is ever seen again.
  TOPO_ETCD_PREFIX="/weft-bench/$mode/$round"
  case $mode in
    underlay)
      topo_host 1; topo_host 2
      SRC=$(topo_ns h1); DST=$(topo_ns h2); DST_IP=$(topo_underlay_ip 2) ;;
    host-gw | vxlan)
      # Only the data path under test: no firewall rules (vxlan-masq measures those).
      topo_cluster_up 2 "$mode" -iptables-forward-rules=false ;;
    vxlan-masq)
      topo_cluster_up 2 vxlan -ip-masq ;;
    vxlan-manual)
      topo_host 1; topo_host 2
      manual_vxlan ;;
    host-gw-manual)
      topo_host 1; topo_host 2
      manual_host_gw ;;
  esac
  if [[ $mode != underlay ]]; then
    SRC=$(topo_ns c1); DST=$(topo_ns c2); DST_IP=$(topo_container_ip 2)
  fi
  topo_spawn "$TOPO_DIR/iperf3-$mode.log" ip netns exec "$DST" iperf3 -s -B "$DST_IP" -p "$PORT"
  SERVER_PID=$TOPO_SPAWNED
  local i
  for ((i = 0; i < 100; i++)); do
    [[ -n $(topo_nsexec "$DST" 5 ss -Hltn "sport = :$PORT") ]] && break
    topo_alive "$SERVER_PID" || topo_die "iperf3 server exited: $(cat "$TOPO_DIR/iperf3-$mode.log")"
    sleep 0.1
  done
  # Resolve neighbours and warm caches before anything is timed.
  topo_run 20 ip netns exec "$SRC" ping -c 3 -i 0.1 -W 2 -q "$DST_IP" >/dev/null ||
    topo_die "$mode: $SRC cannot reach $DST_IP"
}

mode_down() {
  local n
  topo_stop_tracked "$SERVER_PID"
  for n in 1 2; do
    if [[ -f $TOPO_DIR/h$n/weftd.pid ]]; then
      topo_stop_tracked "$(topo_weftd_pid "$n")"
    fi
  done
  # weftd keeps kernel state on exit; deleting the namespaces removes it with everything else.
  topo_host_del 1
  topo_host_del 2
}

# --- measuring ----------------------------------------------------------------------------------

add() { RES["$1,$2"]="${RES["$1,$2"]:-} $3"; }

iperf() {
  topo_run $((DURATION + 30)) ip netns exec "$SRC" iperf3 -c "$DST_IP" -p "$PORT" -t "$DURATION" -J "$@"
}

measure() {
  local mode=$1 j
  topo_log "$mode: TCP, 1 stream"
  j=$(iperf) || topo_die "$mode: iperf3 TCP failed: $(jq -r '.error // empty' <<<"$j")"
  add "$mode" tcp1 "$(jq '.end.sum_received.bits_per_second / 1e6' <<<"$j")"
  add "$mode" retr1 "$(jq '.end.sum_sent.retransmits // 0' <<<"$j")"
  topo_log "$mode: TCP, 4 streams"
  j=$(iperf -P 4) || topo_die "$mode: iperf3 TCP -P 4 failed: $(jq -r '.error // empty' <<<"$j")"
  add "$mode" tcp4 "$(jq '.end.sum_received.bits_per_second / 1e6' <<<"$j")"
  topo_log "$mode: UDP, 64-byte datagrams, unlimited rate"
  j=$(iperf -u -l 64 -b 0) || topo_die "$mode: iperf3 UDP failed: $(jq -r '.error // empty' <<<"$j")"
  # Datagrams that arrived, per second, and the share lost on the way (as the server saw it).
  add "$mode" udp_kpps "$(jq '(.end.sum.packets - .end.sum.lost_packets) / .end.sum.seconds / 1e3' <<<"$j")"
  add "$mode" udp_loss "$(jq '.end.sum.lost_percent' <<<"$j")"
  topo_log "$mode: ping latency"
  local out avg
  out=$(topo_run 30 ip netns exec "$SRC" ping -c 50 -i 0.02 -q "$DST_IP") || topo_die "$mode: ping failed"
  avg=$(sed -n 's|^rtt [^=]*= [0-9.]*/\([0-9.]*\)/.*|\1|p' <<<"$out")
  [[ -n $avg ]] || topo_die "$mode: no rtt in ping output: $out"
  add "$mode" lat_us "$(awk -v a="$avg" 'BEGIN { print a * 1000 }')"
}

# Device settings that decide performance: MTU and offloads of every device on the path, and the
# vxlan device's own attributes. Saved per mode (first round) for the comparison below.
snapshot() {
  local mode=$1 d="$TOPO_DIR/snap-$1" n dev ns
  [[ -d $d ]] && return 0
  mkdir -p "$d"
  for n in 1 2; do
    for dev in eth0 cni0 veth0 flannel.1; do
      ns=$(topo_ns "h$n")
      topo_t 10 ip -n "$ns" link show "$dev" >/dev/null 2>&1 || continue
      topo_t 10 ip -n "$ns" -o link show "$dev" | sed -n 's/.* mtu \([0-9]*\).*/\1/p' >"$d/h$n-$dev.mtu"
      topo_nsexec "$ns" 10 ethtool -k "$dev" >"$d/h$n-$dev.ethtool" 2>&1 || true
      if [[ $dev == flannel.1 ]]; then
        # Only configuration: drop the index, MAC and counters, which differ by construction.
        topo_t 10 ip -n "$ns" -d link show "$dev" |
          sed -E 's/^[0-9]+: //; s|link/ether [0-9a-f:]+ brd [0-9a-f:]+ ||; s/ +$//' >"$d/h$n-$dev.link"
      fi
    done
    ns=$(topo_ns "c$n")
    topo_t 10 ip -n "$ns" -o link show eth0 | sed -n 's/.* mtu \([0-9]*\).*/\1/p' >"$d/c$n-eth0.mtu"
    topo_nsexec "$ns" 10 ethtool -k eth0 >"$d/c$n-eth0.ethtool" 2>&1 || true
  done
}

# --- the run ------------------------------------------------------------------------------------

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
nmodes=${#MODES[@]}
for ((r = 1; r <= ROUNDS; r++)); do
  for ((k = 0; k < nmodes; k++)); do
    mode=${MODES[(k + r - 1) % nmodes]}
    topo_log "round $r/$ROUNDS: $mode"
    mode_up "$mode" "$r"
    snapshot "$mode"
    measure "$mode"
    mode_down
  done
done

# --- the report ---------------------------------------------------------------------------------

median() { tr ' ' '\n' | sed '/^$/d' | sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) print "nan"; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
spread() { tr ' ' '\n' | sed '/^$/d' | sort -g | awk '{ v[NR] = $1 } END { printf "%.0f–%.0f", v[1], v[NR] }'; }
med() { median <<<"${RES["$1,$2"]:-}"; }
has() { [[ -n ${RES["$1,tcp1"]:-} ]]; }
fmt() { awk -v v="$1" -v f="$2" 'BEGIN { if (v == "nan") print "–"; else printf f, v }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "nan" || b == "nan" || b == 0) print "–"; else printf "%.0f%%", 100 * a / b }'; }

cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)
load_end=$(cut -d' ' -f1-3 /proc/loadavg)
echo "## Data-path benchmark"
echo
echo "\`sudo bash tests/bench/datapath.sh --duration $DURATION --rounds $ROUNDS --modes \"${MODES[*]}\"\`"
echo
echo "Machine: $(nproc) CPUs ($cpu), kernel $(uname -r), $(iperf3 --version | head -1 | cut -d' ' -f1-2);"
echo "hosts are network namespaces on one machine joined by veth pairs and a Linux bridge, so every"
echo "number is bounded by CPU, not by a wire. Median of $ROUNDS rounds (range in brackets); ratios are"
echo "of medians, against the underlay measured in the same run. Load average at start: $LOAD_START,"
echo "at the end: $load_end."
echo
echo "| mode | TCP 1 stream Mbit/s | TCP 4 streams Mbit/s | UDP 64 B kpps delivered | UDP loss % | ping avg µs | TCP1 / underlay | TCP4 / underlay | UDP pps / underlay | latency / underlay |"
echo "|---|---|---|---|---|---|---|---|---|---|"
for mode in underlay host-gw host-gw-manual vxlan vxlan-manual vxlan-masq; do
  has "$mode" || continue
  printf '| %s | %s (%s) | %s (%s) | %s (%s) | %s | %s | %s | %s | %s | %s |\n' "$mode" \
    "$(fmt "$(med "$mode" tcp1)" %.0f)" "$(spread <<<"${RES["$mode,tcp1"]}")" \
    "$(fmt "$(med "$mode" tcp4)" %.0f)" "$(spread <<<"${RES["$mode,tcp4"]}")" \
    "$(fmt "$(med "$mode" udp_kpps)" %.0f)" "$(spread <<<"${RES["$mode,udp_kpps"]}")" \
    "$(fmt "$(med "$mode" udp_loss)" %.1f)" \
    "$(fmt "$(med "$mode" lat_us)" %.0f)" \
    "$(ratio "$(med "$mode" tcp1)" "$(med underlay tcp1)")" \
    "$(ratio "$(med "$mode" tcp4)" "$(med underlay tcp4)")" \
    "$(ratio "$(med "$mode" udp_kpps)" "$(med underlay udp_kpps)")" \
    "$(ratio "$(med "$mode" lat_us)" "$(med underlay lat_us)")"
done
echo
if has host-gw && has host-gw-manual; then
  echo "weft's host-gw against hand-written routes: TCP1 $(ratio "$(med host-gw tcp1)" "$(med host-gw-manual tcp1)"),"\
    "TCP4 $(ratio "$(med host-gw tcp4)" "$(med host-gw-manual tcp4)"),"\
    "UDP pps $(ratio "$(med host-gw udp_kpps)" "$(med host-gw-manual udp_kpps)"),"\
    "latency $(ratio "$(med host-gw lat_us)" "$(med host-gw-manual lat_us)")."
fi
if has vxlan && has vxlan-manual; then
  echo "weft's vxlan against the hand-made device: TCP1 $(ratio "$(med vxlan tcp1)" "$(med vxlan-manual tcp1)"),"\
    "TCP4 $(ratio "$(med vxlan tcp4)" "$(med vxlan-manual tcp4)"),"\
    "UDP pps $(ratio "$(med vxlan udp_kpps)" "$(med vxlan-manual udp_kpps)"),"\
    "latency $(ratio "$(med vxlan lat_us)" "$(med vxlan-manual lat_us)") (goal: throughput ≥ 95%)."
fi
if has vxlan-masq && has vxlan; then
  echo "Firewall rules (-ip-masq + FORWARD rules) against none: TCP1 $(ratio "$(med vxlan-masq tcp1)" "$(med vxlan tcp1)"),"\
    "TCP4 $(ratio "$(med vxlan-masq tcp4)" "$(med vxlan tcp4)"), UDP pps $(ratio "$(med vxlan-masq udp_kpps)" "$(med vxlan udp_kpps)")."
fi
echo
echo "TCP retransmits (1 stream, per round):"
for mode in underlay host-gw host-gw-manual vxlan vxlan-manual vxlan-masq; do
  has "$mode" && echo "- $mode:${RES["$mode,retr1"]}"
done
echo
echo "Every round (Mbit/s, Mbit/s, kpps, µs):"
echo
echo '```'
for mode in underlay host-gw host-gw-manual vxlan vxlan-manual vxlan-masq; do
  has "$mode" || continue
  printf '%-13s tcp1:%s | tcp4:%s | udp:%s | lat:%s\n' "$mode" \
    "$(for v in ${RES["$mode,tcp1"]}; do printf ' %.0f' "$v"; done)" \
    "$(for v in ${RES["$mode,tcp4"]}; do printf ' %.0f' "$v"; done)" \
    "$(for v in ${RES["$mode,udp_kpps"]}; do printf ' %.0f' "$v"; done)" \
    "$(for v in ${RES["$mode,lat_us"]}; do printf ' %.0f' "$v"; done)"
done
echo '```'

echo
echo "### Devices: MTU and offloads (host 1 and its container)"
echo
echo "MTUs: underlay eth0, the host's veth0 and cni0, the container's eth0, flannel.1."
echo
echo '```'
for mode in "${MODES[@]}"; do
  d="$TOPO_DIR/snap-$mode"
  line=""
  for b in h1-eth0 h1-veth0 h1-cni0 c1-eth0 h1-flannel.1; do
    [[ -f $d/$b.mtu ]] && line+=" ${b/c1-eth0/container-eth0}=$(cat "$d/$b.mtu")"
  done
  printf '%-13s%s\n' "$mode" "${line//h1-/}"
done
echo
# The offloads that matter for forwarding and tunnelling; a device shown once is the same in
# every mode.
keys='^(tx-checksumming|scatter-gather|tcp-segmentation-offload|generic-segmentation-offload|generic-receive-offload|tx-udp_tnl-segmentation|tx-udp_tnl-csum-segmentation|rx-udp-gro-forwarding|rx-gro-list):'
brief() { grep -E "$keys" "$1" | sed -E 's/ \[fixed\]//; s/-offload//; s/-segmentation/-seg/; s/: /=/' | tr '\n' ' '; }
for b in h1-eth0 h1-veth0 h1-cni0 c1-eth0 h1-flannel.1; do
  first="" differs=0
  for mode in "${MODES[@]}"; do
    f="$TOPO_DIR/snap-$mode/$b.ethtool"
    [[ -f $f ]] || continue
    if [[ -z $first ]]; then first=$f; elif ! cmp -s "$first" "$f"; then differs=1; fi
  done
  [[ -n $first ]] || continue
  if ((differs)); then
    for mode in "${MODES[@]}"; do
      f="$TOPO_DIR/snap-$mode/$b.ethtool"
      [[ -f $f ]] && printf '%-16s %-13s %s\n' "${b/c1-eth0/container-eth0}" "$mode" "$(brief "$f")"
    done
  else
    printf '%-16s %-13s %s\n' "${b/c1-eth0/container-eth0}" "(all modes)" "$(brief "$first")"
  fi
done
echo '```'

if [[ -d $TOPO_DIR/snap-vxlan && -d $TOPO_DIR/snap-vxlan-manual ]]; then
  echo
  echo "### weft's flannel.1 against the hand-made one"
  echo
  same=1
  for f in h1-flannel.1.link h1-flannel.1.ethtool h1-flannel.1.mtu h1-eth0.ethtool c1-eth0.ethtool c1-eth0.mtu; do
    if ! diff -q "$TOPO_DIR/snap-vxlan/$f" "$TOPO_DIR/snap-vxlan-manual/$f" >/dev/null 2>&1; then
      same=0
      echo "Differs: $f (weft first, hand-made second)"
      echo '```'
      diff "$TOPO_DIR/snap-vxlan/$f" "$TOPO_DIR/snap-vxlan-manual/$f" || true
      echo '```'
    fi
  done
  ((same)) && echo "Identical: \`ip -d link\` (without index and MAC), MTU and every \`ethtool -k\` feature of flannel.1, and the container's eth0."
  echo
  echo "weft's device: \`$(tr -s ' \n' ' ' <"$TOPO_DIR/snap-vxlan/h1-flannel.1.link")\`"
fi
