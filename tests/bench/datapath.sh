#!/usr/bin/env bash
# Data-path benchmark: two simulated hosts (the lab of deploy/lib/topology.sh), measured with iperf3
# and ping in several modes in one run, so every ratio compares numbers taken on the same machine
# at the same time:
#
#   underlay       host to host over eth0/bridge, no tunnel (the baseline)
#   vxlan          container to container, weftd with the vxlan backend (the kernel's VXLAN)
#   vxlan-manual   container to container over a flannel.1 made by hand with `ip link add … type
#                  vxlan` and flannel's settings (VNI 1, dstport 8472, local, nolearning, MTU −50),
#                  hand-written neighbour/FDB/route entries, no weftd: what weft's vxlan must match
#   udp            container to container, weftd with the udp backend (userspace, TUN flannel0,
#                  UDP 8285), its offloads on (the default)
#   udp-nooffload  as udp with `"Offload": false`: one packet per system call, as flannel's udp
#   openvpn        container to container through OpenVPN 2.6 in peer-to-peer UDP TUN mode, no
#                  cipher and no auth, MTU as udp's: the fair stand-in for flannel's C udp backend
#   wireguard      (opt-in) container to container, weftd with the wireguard backend (issue 22): on
#                  this kernel (no WireGuard module) weft's userspace WireGuard on a TUN device
#                  flannel-wg, UDP 51820, MTU underlay − 80; each weftd keeps its key in its own
#                  WIREGUARD_KEY_FILE and its control socket in its own WIREGUARD_SOCKET_DIR
#                  under the lab's directory
#   wireguard-go   (opt-in) the same WireGuard set-up without weftd: Debian's wireguard-go on each
#                  host, configured with `wg` and `ip` exactly as flanneld configures flannel-wg
#                  (key from `wg genkey`, port 51820, one peer per other host with its subnet as
#                  allowed-ips, the lease's network address /32, MTU −80, the network's route with
#                  scope link): what weft's wireguard must beat
#   host-gw, host-gw-manual   (opt-in) weftd's host-gw, and the same routes written by hand
#   vxlan-masq     (opt-in) as vxlan, but weftd also runs -ip-masq and its FORWARD rules, to show
#                  what the firewall rules cost
#
# IPv6 (opt-in): the same tests with IPv6 inside and outside. The hosts' IPv6 underlay addresses
# are fd00:a:b:c::d beside a.b.c.d (deploy/lib/topology.sh); the weftd modes run a dual-stack
# network (IPv6Network TOPO_NETWORK6, fd00:244::/56, /64 leases) and each container gets its
# IPv6 lease's ::2, routed via cni0's ::1 (FLANNEL_IPV6_SUBNET); ping -6, iperf3 -6.
#
#   underlay6      host to host over the IPv6 underlay addresses, no tunnel
#   vxlan6         container to container over IPv6, weftd vxlan on the dual-stack network: the
#                  kernel's VXLAN over IPv6, flannel-v6.1 (VNI 1, port 8472); as flannel on a
#                  dual-stack network, MTU underlay − 70 (1430) on both devices and the containers
#   wireguard6     container to container over IPv6, weftd wireguard on the dual-stack network in
#                  Mode separate (the default): its second userspace device flannel-wg-v6, UDP
#                  51821 between the hosts' IPv6 underlay addresses
#
#   sudo bash tests/bench/datapath.sh [--duration SECS] [--rounds N] [--modes "m1 m2 …"]
#
# Per mode: iperf3 TCP with 1 and 4 streams; UDP with 64-byte datagrams at unlimited rate, and the
# highest rate that arrives with at most 1% loss; 200 pings 10 ms apart (average and 99th
# percentile); CPU seconds per GB during the TCP 1-stream test: of the path (iperf3 client and
# server, tunnel daemons, ksoftirqd), of the whole machine (/proc/stat), and of the tunnel daemons.
# Each round runs every mode once, in a rotated order so that slow drift of the machine does not
# always hit the same mode; the table shows the median over rounds. Progress goes to stderr, the
# Markdown report to stdout. Timings are reported, never asserted.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# shellcheck source=deploy/lib/topology.sh
source "$REPO/deploy/lib/topology.sh"

DURATION=5
ROUNDS=3
MODES=(underlay vxlan vxlan-manual udp udp-nooffload openvpn)
ALL_MODES=(underlay host-gw host-gw-manual vxlan vxlan-manual vxlan-masq udp udp-nooffload openvpn
  wireguard wireguard-go underlay6 vxlan6 wireguard6)
PORT=5201
PINGS=200

usage() {
  # The comment at the top of this file.
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
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
  [[ " ${ALL_MODES[*]} " == *" $m "* ]] || topo_die "unknown mode $m (modes: ${ALL_MODES[*]})"
  [[ $m != *6 ]] || topo_have_ipv6 || topo_die "mode $m needs IPv6, which this kernel does not have"
done

topo_require_root

# Packages: the project's set, plus what only the benchmark needs.
# shellcheck source=deploy/setup-debian.sh
source "$REPO/deploy/setup-debian.sh"
tools=(ethtool jq)
[[ " ${MODES[*]} " == *" openvpn "* ]] && tools+=(openvpn)
# Program and the Debian package that has it.
[[ " ${MODES[*]} " == *" wireguard-go "* ]] && tools+=(wireguard-go wg:wireguard-tools)
for tool in "${tools[@]}"; do
  if ! command -v "${tool%%:*}" >/dev/null; then
    topo_log "installing ${tool#*:}"
    DEBIAN_FRONTEND=noninteractive topo_t 600 apt-get install -y -qq --no-install-recommends "${tool#*:}" >/dev/null
  fi
done
topo_find_bins "$REPO"

topo_init wdb
topo_bench_traps
topo_switch
topo_etcd

declare -A RES=()   # "<mode>,<metric>" -> space-separated values, one per round
SRC="" DST="" DST_IP="" SERVER_PID=""
FAMILY=4            # of the current mode's traffic: 4, or 6 for the modes whose names end in 6
FAM=()              # ping's and iperf3's option for it: none for IPv4 (as before), -6 for IPv6
TUNNEL_PIDS=()      # the userspace tunnel daemons of the current mode (weftd udp/wireguard, openvpn, wireguard-go)
CLK_TCK=$(getconf CLK_TCK)

# --- bringing each mode up and down -------------------------------------------------------------

# The subnet.env a weftd would have written for lease 10.244.<n>.0/24: lets topo_wire_container
# treat the containers of the hand-made modes exactly as in the weftd modes.
fake_subnet_env() {
  local n=$1 mtu=$2
  mkdir -p "$TOPO_DIR/h$n"
  printf 'FLANNEL_NETWORK=%s\nFLANNEL_SUBNET=10.244.%d.1/24\nFLANNEL_MTU=%d\nFLANNEL_IPMASQ=false\n' \
    "$TOPO_NETWORK" "$n" "$mtu" >"$TOPO_DIR/h$n/subnet.env"
}

# flannel's vxlan set-up by hand, on hosts 1 and 2, with leases 10.244.<n>.0/24.
manual_vxlan() {
  local n m h mtu=1450
  for n in 1 2; do
    fake_subnet_env "$n" "$mtu"
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
  for n in 1 2; do fake_subnet_env "$n" 1500; done
  for n in 1 2; do
    m=$((3 - n))
    h=$(topo_ns "h$n")
    topo_t 10 ip -n "$h" route add "10.244.$m.0/24" via "$(topo_underlay_ip "$m")" dev eth0
    topo_wire_container "$n"
  done
}

# OpenVPN between hosts 1 and 2: peer-to-peer (no --secret, no TLS), UDP 1194 on the underlay, a
# TUN device tun0 with static addresses 10.8.0.<n>, and the peer's container subnet routed into it.
# No cipher and no auth, so no packet gets a header or a tag: the outer packet is the inner one
# plus IP and UDP, as with flannel's udp, and the TUN MTU is udp's (underlay − 28). Tuned as far as
# OpenVPN allows, so that ratios against it are not flattered: --fast-io (write UDP without
# waiting for poll, its own advice for Linux), socket buffers as deep as weft udp's (4 MiB; the
# 208 KiB default loses packets and halved its TCP rate here) and a TUN queue of 1000.
openvpn_p2p() {
  local n m h mtu=1472
  for n in 1 2; do
    fake_subnet_env "$n" "$mtu"
    m=$((3 - n))
    h=$(topo_ns "h$n")
    topo_spawn "$TOPO_DIR/h$n/openvpn.log" ip netns exec "$h" openvpn \
      --dev tun0 --dev-type tun --proto udp --disable-dco \
      --local "$(topo_underlay_ip "$n")" --lport 1194 --remote "$(topo_underlay_ip "$m")" --rport 1194 \
      --ifconfig "10.8.0.$n" "10.8.0.$m" --tun-mtu "$mtu" --mssfix 0 \
      --cipher none --auth none --fast-io --sndbuf 4194304 --rcvbuf 4194304 --txqueuelen 1000 \
      --verb 3
    TUNNEL_PIDS+=("$TOPO_SPAWNED")
  done
  for n in 1 2; do
    h=$(topo_ns "h$n")
    if ! topo_wait_until 20 "tun0 on host $n" tun0_up "$h"; then
      tail -20 "$TOPO_DIR/h$n/openvpn.log" >&2
      topo_die "openvpn on host $n did not bring tun0 up (log: $TOPO_DIR/h$n/openvpn.log)"
    fi
  done
  for n in 1 2; do
    m=$((3 - n))
    topo_t 10 ip -n "$(topo_ns "h$n")" route add "10.244.$m.0/24" dev tun0
    topo_wire_container "$n"
  done
}

tun0_up() {
  [[ $(topo_t 10 ip -n "$1" -j addr show dev tun0 2>/dev/null | jq -r '.[0].addr_info | length') -gt 0 ]]
}

# weftd with the wireguard backend on hosts 1 and 2, as topo_cluster_up starts the other weftd
# modes, except that each weftd gets a key file of its own in its host's directory: they all run
# on this one machine, and without WIREGUARD_KEY_FILE every one would take /run/flannel/wgkey
# (the machine's, shared, and left behind). wireguard routes the whole network into flannel-wg
# and keeps its peers inside the device (here weft's userspace WireGuard, which the kernel does
# not show), so wait for that route and let mode_up's ping with retries probe the rest. With an
# IPv6 network as argument the network is dual-stack: in Mode separate weftd also makes
# flannel-wg-v6 and routes the IPv6 network into it; the containers get IPv6 addresses too.
weftd_wireguard() {
  local net6=${1:-} n hosts=(1 2)
  for n in "${hosts[@]}"; do topo_host "$n"; done
  topo_set_config wireguard "$net6" >&2
  for n in "${hosts[@]}"; do
    WIREGUARD_KEY_FILE="$TOPO_DIR/h$n/wgkey" WIREGUARD_SOCKET_DIR="$TOPO_DIR/h$n" \
      topo_weftd "$n" -iptables-forward-rules=false
  done
  for n in "${hosts[@]}"; do
    topo_wait_subnet "$n" 60
    topo_wire_container "$n"
    [[ -z $net6 ]] || topo_wire_container6 "$n"
  done
  topo_wait_network_route 30 flannel-wg "${hosts[@]}"
  [[ -z $net6 ]] || topo_wait_routes6 30 flannel-wg-v6 "${hosts[@]}"
}

# weftd vxlan on hosts 1 and 2 on a dual-stack network (as topo_cluster_up, with IPv6): flannel.1
# and flannel-v6.1 on each, both families' containers wired, both families' routes waited for.
weftd_vxlan6() {
  local n hosts=(1 2)
  for n in "${hosts[@]}"; do topo_host "$n"; done
  topo_set_config vxlan "$TOPO_NETWORK6" >&2
  for n in "${hosts[@]}"; do topo_weftd "$n" -iptables-forward-rules=false; done
  for n in "${hosts[@]}"; do
    topo_wait_subnet "$n" 60
    topo_wire_container "$n"
    topo_wire_container6 "$n"
  done
  topo_wait_routes 30 "${hosts[@]}"
  topo_wait_routes6 30 flannel-v6.1 "${hosts[@]}"
}

# Debian's wireguard-go on hosts 1 and 2, set up by hand as flanneld sets up its flannel-wg (as
# backends/tests/netns/wireguard.rs drives it): a key from `wg genkey`, listen-port 51820, the
# lease's network address 10.244.<n>.0/32, MTU underlay − 80, link up, the whole network routed
# into the device with scope link, and one peer per other host (endpoint its underlay address
# :51820, allowed-ips its lease). wireguard-go's control socket is /var/run/wireguard/<device>.sock,
# one path for the whole machine, so two daemons both called flannel-wg would collide (and so
# would a stray one of another run): each runs in a mount namespace of its own with a private
# tmpfs on /run, and `wg` runs inside that namespace (nsenter -t PID). nsenter, unshare and sh
# all exec, so the spawned PID is wireguard-go's own; WG_PROCESS_FOREGROUND keeps it from
# daemonizing (and silences its banner).
WG_DEV=flannel-wg
WG_MTU=1420
wireguard_go_p2p() {
  local n m h pid pubs=()
  for n in 1 2; do
    fake_subnet_env "$n" "$WG_MTU"
    h=$(topo_ns "h$n")
    (umask 077 && topo_t 10 wg genkey >"$TOPO_DIR/h$n/wg.key")
    pubs[n]=$(topo_t 10 wg pubkey <"$TOPO_DIR/h$n/wg.key")
    # shellcheck disable=SC2016 # $0 is expanded by that sh
    topo_spawn "$TOPO_DIR/h$n/wireguard-go.log" env WG_PROCESS_FOREGROUND=1 LOG_LEVEL=error \
      nsenter --net="/run/netns/$h" unshare --mount --propagation private \
      sh -c 'mount -t tmpfs -o mode=0755,size=1m weft-wg /run && mkdir /run/wireguard && exec wireguard-go -f "$0"' \
      "$WG_DEV"
    TUNNEL_PIDS+=("$TOPO_SPAWNED")
  done
  for n in 1 2; do
    pid=${TUNNEL_PIDS[n - 1]}
    if ! topo_wait_until 20 "wireguard-go's $WG_DEV on host $n" wg_go_ready "$pid"; then
      tail -20 "$TOPO_DIR/h$n/wireguard-go.log" >&2
      topo_die "wireguard-go on host $n made no $WG_DEV (log: $TOPO_DIR/h$n/wireguard-go.log)"
    fi
  done
  for n in 1 2; do
    h=$(topo_ns "h$n")
    wg_go "$n" set "$WG_DEV" private-key "$TOPO_DIR/h$n/wg.key" listen-port 51820
    topo_t 10 ip -n "$h" addr add "10.244.$n.0/32" dev "$WG_DEV"
    topo_t 10 ip -n "$h" link set "$WG_DEV" mtu "$WG_MTU" up
    topo_t 10 ip -n "$h" route add "$TOPO_NETWORK" dev "$WG_DEV" scope link
  done
  for n in 1 2; do
    m=$((3 - n))
    wg_go "$n" set "$WG_DEV" peer "${pubs[m]}" endpoint "$(topo_underlay_ip "$m"):51820" \
      allowed-ips "10.244.$m.0/24"
    topo_wire_container "$n"
  done
}

# `wg ARGS…` for host N's wireguard-go: in its network and mount namespaces.
wg_go() {
  local n=$1; shift
  wg_go_isolated "${TUNNEL_PIDS[n - 1]}" || topo_die "host $n's wireguard-go is not in its own mount namespace"
  topo_t 10 nsenter -t "${TUNNEL_PIDS[n - 1]}" -m -n wg "$@"
}

# Whether `pid` has exec'd wireguard-go, i.e. is past the mount of its private /run. Until then
# nsenter -t would land in the machine's mount namespace, where `wg` would talk to (or, finding it
# dead, unlink) someone else's /var/run/wireguard/flannel-wg.sock.
wg_go_isolated() {
  [[ $(cat "/proc/$1/comm" 2>/dev/null) == wireguard-go &&
    $(readlink "/proc/$1/ns/mnt") != "$(readlink /proc/self/ns/mnt)" ]]
}

wg_go_ready() {
  topo_alive "$1" || return 1
  wg_go_isolated "$1" || return 1
  topo_t 10 nsenter -t "$1" -m -n wg show "$WG_DEV" >/dev/null 2>&1
}

mode_up() {
  local mode=$1 round=$2 n
  # A fresh etcd prefix per mode and round: no lease of an earlier mode is ever seen again.
  TOPO_ETCD_PREFIX="/weft-bench/$mode/$round"
  TUNNEL_PIDS=()
  FAMILY=4 FAM=()
  if [[ $mode == *6 ]]; then FAMILY=6 FAM=(-6); fi
  case $mode in
    underlay)
      topo_host 1; topo_host 2
      SRC=$(topo_ns h1); DST=$(topo_ns h2); DST_IP=$(topo_underlay_ip 2) ;;
    underlay6)
      topo_host 1; topo_host 2
      SRC=$(topo_ns h1); DST=$(topo_ns h2); DST_IP=$(topo_underlay_ip6 2) ;;
    host-gw | vxlan)
      # Only the data path under test: no firewall rules (vxlan-masq measures those).
      topo_cluster_up 2 "$mode" -iptables-forward-rules=false ;;
    vxlan-masq)
      topo_cluster_up 2 vxlan -ip-masq ;;
    udp)
      topo_cluster_up 2 udp -iptables-forward-rules=false ;;
    udp-nooffload)
      topo_cluster_up 2 '{"Type": "udp", "Offload": false}' -iptables-forward-rules=false ;;
    vxlan-manual)
      topo_host 1; topo_host 2
      manual_vxlan ;;
    host-gw-manual)
      topo_host 1; topo_host 2
      manual_host_gw ;;
    openvpn)
      topo_host 1; topo_host 2
      openvpn_p2p ;;
    wireguard)
      weftd_wireguard ;;
    vxlan6)
      weftd_vxlan6 ;;
    wireguard6)
      weftd_wireguard "$TOPO_NETWORK6" ;;
    wireguard-go)
      topo_host 1; topo_host 2
      wireguard_go_p2p ;;
  esac
  if [[ $mode == udp* || $mode == wireguard || $mode == wireguard6 ]]; then
    for n in 1 2; do TUNNEL_PIDS+=("$(topo_weftd_pid "$n")"); done
  fi
  if [[ $mode != underlay* ]]; then
    SRC=$(topo_ns c1); DST=$(topo_ns c2); DST_IP=$(topo_container_ip 2)
    ((FAMILY == 4)) || DST_IP=$(topo_container_ip6 2)
  fi
  topo_spawn "$TOPO_DIR/iperf3-$mode.log" ip netns exec "$DST" iperf3 -s -B "$DST_IP" -p "$PORT"
  SERVER_PID=$TOPO_SPAWNED
  if ! topo_wait_until 10 "the iperf3 server" iperf3_listening; then
    topo_die "iperf3 server not listening: $(cat "$TOPO_DIR/iperf3-$mode.log")"
  fi
  # Resolve neighbours and warm caches before anything is timed; a userspace tunnel may need a
  # moment after its device is up, so allow a few tries.
  if ! topo_wait_until 20 "$SRC to reach $DST_IP" \
    topo_run 5 ip netns exec "$SRC" ping "${FAM[@]}" -c 3 -i 0.1 -W 1 -q "$DST_IP" >/dev/null; then
    topo_die "$mode: $SRC cannot reach $DST_IP"
  fi
}

iperf3_listening() {
  topo_alive "$SERVER_PID" || topo_die "iperf3 server exited: $(cat "$TOPO_DIR"/iperf3-*.log)"
  [[ -n $(topo_nsexec "$DST" 5 ss -Hltn "sport = :$PORT") ]]
}

mode_down() {
  local pids=("$SERVER_PID") n
  for n in 1 2; do
    [[ -f $TOPO_DIR/h$n/weftd.pid ]] && pids+=("$(topo_weftd_pid "$n")")
  done
  if [[ $mode == openvpn || $mode == wireguard-go ]]; then
    pids+=("${TUNNEL_PIDS[@]}")
    # Their whole process trees (wireguard-go in the foreground has none; by PID, never by name).
    for n in "${TUNNEL_PIDS[@]}"; do
      mapfile -t -O "${#pids[@]}" pids < <(pgrep -P "$n" || true)
    done
  fi
  topo_stop_tracked "${pids[@]}"
  TUNNEL_PIDS=()
  # weftd keeps kernel state on exit (udp keeps flannel0, wireguard flannel-wg); deleting the
  # namespaces removes it with everything else. wireguard-go's TUN device and its mount namespace
  # went with its process.
  topo_host_del 1
  topo_host_del 2
}

# --- measuring ----------------------------------------------------------------------------------

add() { RES["$1,$2"]="${RES["$1,$2"]:-} $3"; }

# Busy CPU time of the whole machine so far, in ticks: user+nice+system+irq+softirq of /proc/stat
# (guest time is already inside user).
machine_busy() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8; exit }' /proc/stat; }

# utime+stime (all threads) of the given processes so far, in ticks; 0 for none.
procs_busy() {
  local p t=0 stat fields
  for p in "$@"; do
    stat=$(cat "/proc/$p/stat" 2>/dev/null) || continue
    # The fields after the command name (which may contain spaces), from field 3 (state) on.
    read -r -a fields <<<"${stat##*) }"
    t=$((t + fields[11] + fields[12]))
  done
  printf '%d' "$t"
}

# CPU time (user+sys, seconds) of the children this shell has reaped so far: bash's `times`,
# i.e. getrusage(RUSAGE_CHILDREN), which includes grandchildren their parents reaped. `times` must
# run in this shell, not in a $(…) subshell, whose counters start at zero: hence the file.
children_cpu() {
  times >"$TOPO_DIR/times"
  awk 'NR == 2 {
    n = split($0, f, " "); t = 0
    for (i = 1; i <= n; i++) { split(f[i], ms, /[ms]/); t += ms[1] * 60 + ms[2] }
    print t }' "$TOPO_DIR/times"
}

IPERF_OUT=""
iperf() {
  IPERF_OUT=$(topo_run $((DURATION + 30)) ip netns exec "$SRC" iperf3 "${FAM[@]}" -c "$DST_IP" -p "$PORT" \
    -t "$DURATION" -J "$@") || return 1
}

# UDP datagrams that reached the destination namespace's UDP layer so far: delivered to a socket
# (InDatagrams) or dropped there because its receive buffer was full (RcvbufErrors). IPv6 has
# its own counters, in /proc/net/snmp6.
udp_reached() {
  if ((FAMILY == 6)); then
    topo_t 10 ip netns exec "$DST" cat /proc/net/snmp6 |
      awk '$1 == "Udp6InDatagrams" { a = $2 } $1 == "Udp6RcvbufErrors" { b = $2 } END { print a + b }'
  else
    topo_t 10 ip netns exec "$DST" cat /proc/net/snmp |
      awk '$1 == "Udp:" && $2 ~ /^[0-9]+$/ { print $2 + $6 }'
  fi
}

# Whether 64-byte datagrams offered at `kpps` thousand per second for 2 s arrive with ≤ 1% loss,
# at ≥ 90% of that rate (iperf3 may not manage to send as fast as asked).
udp_holds() {
  iperf -u -l 64 -b $(($1 * 512000)) -t 2 ||
    topo_die "$mode: iperf3 UDP at $1 kpps failed: $(jq -r '.error // empty' <<<"$IPERF_OUT")"
  jq -e --argjson k "$1" '.end.sum.lost_percent <= 1 and
    (.end.sum.packets - .end.sum.lost_packets) / .end.sum.seconds >= 900 * $k' <<<"$IPERF_OUT" >/dev/null
}

# `seconds` of CPU per GB of `bytes`.
per_gb() {
  awk -v t="$1" -v b="$2" 'BEGIN { if (b <= 0) print "nan"; else print t / (b / 1e9) }'
}
ticks() { awk -v t="$1" -v hz="$CLK_TCK" 'BEGIN { print t / hz }'; }

measure() {
  local mode=$1 j m0 m1 p0 p1 c0 c1 t0 t1 bytes softirqd path_s
  # Background: what the rest of the machine burns while we stand still, for the CPU figures.
  m0=$(machine_busy); sleep 1; m1=$(machine_busy)
  add "$mode" bg_cores "$(ticks $((m1 - m0)))"

  topo_log "$mode: TCP, 1 stream"
  # Everything on the path: the iperf3 client (a child of this shell), the server, the tunnel
  # daemons, and the kernel's softirq threads (with tick-based accounting, softirq work done on
  # top of a task is charged to that task).
  mapfile -t softirqd < <(pgrep '^ksoftirqd/' || true)
  children_cpu >"$TOPO_DIR/c0"
  m0=$(machine_busy)
  p0=$(procs_busy "$SERVER_PID" "${TUNNEL_PIDS[@]}" "${softirqd[@]}")
  t0=$(procs_busy "${TUNNEL_PIDS[@]}")
  iperf || topo_die "$mode: iperf3 TCP failed: $(jq -r '.error // empty' <<<"$IPERF_OUT")"
  m1=$(machine_busy)
  children_cpu >"$TOPO_DIR/c1"
  c0=$(cat "$TOPO_DIR/c0"); c1=$(cat "$TOPO_DIR/c1")
  p1=$(procs_busy "$SERVER_PID" "${TUNNEL_PIDS[@]}" "${softirqd[@]}")
  t1=$(procs_busy "${TUNNEL_PIDS[@]}")
  j=$IPERF_OUT
  bytes=$(jq '.end.sum_received.bytes' <<<"$j")
  add "$mode" tcp1 "$(jq '.end.sum_received.bits_per_second / 1e6' <<<"$j")"
  add "$mode" retr1 "$(jq '.end.sum_sent.retransmits // 0' <<<"$j")"
  add "$mode" cpu_gb "$(per_gb "$(ticks $((m1 - m0)))" "$bytes")"
  path_s=$(awk -v c0="$c0" -v c1="$c1" -v p=$((p1 - p0)) -v hz="$CLK_TCK" 'BEGIN { print c1 - c0 + p / hz }')
  add "$mode" path_cpu_gb "$(per_gb "$path_s" "$bytes")"
  if ((${#TUNNEL_PIDS[@]})); then
    add "$mode" tun_cpu_gb "$(per_gb "$(ticks $((t1 - t0)))" "$bytes")"
  fi

  topo_log "$mode: TCP, 4 streams"
  iperf -P 4 || topo_die "$mode: iperf3 TCP -P 4 failed: $(jq -r '.error // empty' <<<"$IPERF_OUT")"
  add "$mode" tcp4 "$(jq '.end.sum_received.bits_per_second / 1e6' <<<"$IPERF_OUT")"

  topo_log "$mode: UDP, 64-byte datagrams, unlimited rate"
  local s0 s1
  s0=$(udp_reached)
  iperf -u -l 64 -b 0 || topo_die "$mode: iperf3 UDP failed: $(jq -r '.error // empty' <<<"$IPERF_OUT")"
  s1=$(udp_reached)
  # Datagrams that arrived, per second, and the share lost on the way (as the server saw it).
  j=$IPERF_OUT
  add "$mode" udp_kpps "$(jq '(.end.sum.packets - .end.sum.lost_packets) / .end.sum.seconds / 1e3' <<<"$j")"
  add "$mode" udp_loss "$(jq '.end.sum.lost_percent' <<<"$j")"
  # What the tunnel handed to the receiving host's UDP layer, whether or not iperf3 then kept up
  # reading it (on 2 cores the server competes with the sender and the tunnel for CPU).
  add "$mode" udp_reached_kpps "$(jq -n --argjson a "$s0" --argjson b "$s1" --argjson t "$(jq '.end.sum.seconds' <<<"$j")" '($b - $a) / $t / 1e3')"

  # At unlimited rate the sender takes a whole core from the tunnel it feeds, so also: the highest
  # offered rate that arrives whole (a doubling ladder from 20 kpps, then three halving steps
  # between the last rate that held and the first that did not).
  topo_log "$mode: UDP, 64-byte datagrams, highest rate with ≤ 1% loss"
  local ok=0 bad=0 kpps=20 mid
  while ((kpps <= 1280)); do
    if udp_holds "$kpps"; then ok=$kpps; kpps=$((kpps * 2)); else bad=$kpps; break; fi
  done
  for _ in 1 2 3; do
    ((bad && bad - ok > 2)) || break
    mid=$(((ok + bad) / 2))
    if udp_holds "$mid"; then ok=$mid; else bad=$mid; fi
  done
  add "$mode" udp_ok_kpps "$ok"

  topo_log "$mode: ping latency ($PINGS pings, 10 ms apart)"
  local out rtts n
  out=$(topo_run 60 ip netns exec "$SRC" ping "${FAM[@]}" -c "$PINGS" -i 0.01 -W 1 "$DST_IP") || true
  rtts=$(sed -n 's/.* time=\([0-9.]*\) ms.*/\1/p' <<<"$out" | sort -g)
  n=$(grep -c . <<<"$rtts") || true
  ((n >= PINGS / 2)) || topo_die "$mode: only $n of $PINGS pings answered"
  add "$mode" ping_lost "$((PINGS - n))"
  add "$mode" lat_us "$(awk '{ s += $1 } END { print s / NR * 1000 }' <<<"$rtts")"
  # Nearest rank: the smallest RTT that at least 99% of the answers do not exceed.
  add "$mode" lat99_us "$(sed -n "$(((n * 99 + 99) / 100))p" <<<"$rtts" | awk '{ print $1 * 1000 }')"
}

# Device settings that decide performance: MTU and offloads of every device on the path, and the
# vxlan device's own attributes. Saved per mode (first round) for the comparison below.
DEVICES=(eth0 cni0 veth0 flannel.1 flannel0 tun0 flannel-wg flannel-v6.1 flannel-wg-v6)
snapshot() {
  local mode=$1 d="$TOPO_DIR/snap-$1" n dev ns
  [[ -d $d ]] && return 0
  mkdir -p "$d"
  for n in 1 2; do
    for dev in "${DEVICES[@]}"; do
      ns=$(topo_ns "h$n")
      topo_t 10 ip -n "$ns" link show "$dev" >/dev/null 2>&1 || continue
      topo_t 10 ip -n "$ns" -o link show "$dev" | sed -n 's/.* mtu \([0-9]*\).*/\1/p' >"$d/h$n-$dev.mtu"
      topo_nsexec "$ns" 10 ethtool -k "$dev" >"$d/h$n-$dev.ethtool" 2>&1 || true
      if [[ $dev == flannel.1 || $dev == flannel-v6.1 ]]; then
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
spread() { tr ' ' '\n' | sed '/^$/d' | sort -g | awk -v f="$1" '{ v[NR] = $1 } END { if (NR) printf "(" f "–" f ")", v[1], v[NR] }'; }
med() { median <<<"${RES["$1,$2"]:-}"; }
has() { [[ -n ${RES["$1,tcp1"]:-} ]]; }
fmt() { awk -v v="$1" -v f="$2" 'BEGIN { if (v == "nan") print "–"; else printf f, v }'; }
# a / b as a factor ("0.52×", "7.1×").
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "nan" || b == "nan" || b == 0) print "–"; else if (a / b >= 10) printf "%.0f×", a / b; else printf "%.2g×", a / b }'; }
# Median with the range over rounds in brackets.
cell() { printf '%s %s' "$(fmt "$(med "$1" "$2")" "$3")" "$(spread "$3" <<<"${RES["$1,$2"]:-}")"; }

present=()
for mode in "${ALL_MODES[@]}"; do has "$mode" && present+=("$mode"); done

cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)
load_end=$(cut -d' ' -f1-3 /proc/loadavg)
bg=$(for mode in "${present[@]}"; do printf '%s ' "${RES["$mode,bg_cores"]}"; done | median)
echo "## Data-path benchmark"
echo
echo "\`sudo bash tests/bench/datapath.sh --duration $DURATION --rounds $ROUNDS --modes \"${MODES[*]}\"\`"
echo
echo "Machine: $(nproc) CPUs ($cpu), kernel $(uname -r), $(iperf3 --version | head -1 | cut -d' ' -f1-2)$(
  [[ " ${present[*]} " == *" openvpn "* ]] && printf ', %s' "$(openvpn --version | head -1 | cut -d' ' -f1-2)"
  [[ " ${present[*]} " == *" wireguard-go "* ]] && printf ', %s' "$(wireguard-go --version | head -1)")."
echo "Hosts are network namespaces on one machine joined by veth pairs and a Linux bridge, so every"
echo "number is bounded by CPU, not by a wire. Median of $ROUNDS rounds (range in brackets). Load"
echo "average at start: $LOAD_START, at the end: $load_end; CPU busy outside the benchmark, measured"
echo "for 1 s before each mode's tests: median $(fmt "$bg" %.2f) cores. net.core.rmem_max/wmem_max:"
echo "$(cat /proc/sys/net/core/rmem_max)/$(cat /proc/sys/net/core/wmem_max) (they cap OpenVPN's socket buffers; weftd forces its own)."
if [[ " ${present[*]} " == *"6 "* ]]; then
  echo "IPv6 modes (…6): underlay $(topo_underlay6)::/64 (hosts $(topo_underlay_ip6 1) and $(topo_underlay_ip6 2)),"
  echo "dual-stack network $TOPO_NETWORK + $TOPO_NETWORK6, each container at its IPv6 lease's ::2."
fi
echo
echo "| mode | TCP 1 stream Mbit/s | TCP 4 streams Mbit/s | UDP 64 B kpps delivered | UDP loss % | UDP 64 B kpps reaching the host | UDP 64 B kpps at ≤ 1% loss | ping avg µs | ping p99 µs | CPU s/GB (path) | CPU s/GB (machine) | CPU s/GB (tunnel daemons) |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|"
for mode in "${present[@]}"; do
  tun="–"
  [[ -n ${RES["$mode,tun_cpu_gb"]:-} ]] && tun=$(cell "$mode" tun_cpu_gb %.2f)
  printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "$mode" \
    "$(cell "$mode" tcp1 %.0f)" "$(cell "$mode" tcp4 %.0f)" "$(cell "$mode" udp_kpps %.0f)" \
    "$(fmt "$(med "$mode" udp_loss)" %.1f)" "$(cell "$mode" udp_reached_kpps %.0f)" "$(cell "$mode" udp_ok_kpps %.0f)" \
    "$(cell "$mode" lat_us %.0f)" "$(cell "$mode" lat99_us %.0f)" \
    "$(cell "$mode" path_cpu_gb %.2f)" "$(cell "$mode" cpu_gb %.2f)" "$tun"
done

# Ratios of medians against a reference mode measured in the same run. Throughput: higher is
# better; latency and CPU per GB: lower is better. One row: `mode` against `ref`, as `label`.
ratio_row() {
  local label=$1 mode=$2 ref=$3
  printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "$label" \
    "$(ratio "$(med "$mode" tcp1)" "$(med "$ref" tcp1)")" \
    "$(ratio "$(med "$mode" tcp4)" "$(med "$ref" tcp4)")" \
    "$(ratio "$(med "$mode" udp_kpps)" "$(med "$ref" udp_kpps)")" \
    "$(ratio "$(med "$mode" udp_reached_kpps)" "$(med "$ref" udp_reached_kpps)")" \
    "$(ratio "$(med "$mode" udp_ok_kpps)" "$(med "$ref" udp_ok_kpps)")" \
    "$(ratio "$(med "$mode" lat_us)" "$(med "$ref" lat_us)")" \
    "$(ratio "$(med "$mode" lat99_us)" "$(med "$ref" lat99_us)")" \
    "$(ratio "$(med "$mode" path_cpu_gb)" "$(med "$ref" path_cpu_gb)")"
}
RATIO_HEAD="| mode | TCP 1 stream | TCP 4 streams | UDP 64 B pps | UDP 64 B pps reaching the host | UDP 64 B pps at ≤ 1% loss | ping avg | ping p99 | CPU s/GB (path) |
|---|---|---|---|---|---|---|---|---|"

# One table: every mode against `ref`.
ratio_table() {
  local ref=$1 what=$2 mode
  has "$ref" || return 0
  echo
  echo "Against $what (\`$ref\`), same run:"
  echo
  echo "$RATIO_HEAD"
  for mode in "${present[@]}"; do
    [[ $mode == "$ref" ]] && continue
    ratio_row "$mode" "$mode" "$ref"
  done
}
VXLAN_REF=vxlan
has vxlan || VXLAN_REF=vxlan-manual
ratio_table "$VXLAN_REF" "kernel VXLAN"
ratio_table openvpn "OpenVPN"
ratio_table wireguard-go "Debian's wireguard-go"
ratio_table underlay "the underlay (host to host, no tunnel)"
ratio_table underlay6 "the IPv6 underlay (host to host, no tunnel)"

# Each IPv6 mode against its IPv4 twin, same run.
pairs=()
for mode in underlay6 vxlan6 wireguard6; do
  has "$mode" && has "${mode%6}" && pairs+=("$mode")
done
if ((${#pairs[@]})); then
  echo
  echo "IPv6 against IPv4 (each \`…6\` mode against the same mode over IPv4), same run:"
  echo
  echo "$RATIO_HEAD"
  for mode in "${pairs[@]}"; do
    ratio_row "$mode / ${mode%6}" "$mode" "${mode%6}"
  done
fi

# The goals of issue 8, for weft's udp with offloads.
goal() {
  local what=$1 expr=$2
  if awk "BEGIN { exit !($expr) }"; then echo "- $what: **met**"; else echo "- $what: **missed**"; fi
}
if has udp; then
  u1=$(med udp tcp1) up=$(med udp udp_kpps) ul=$(med udp lat_us)
  echo
  echo "Goals for \`udp\` (issue 8):"
  echo
  if has "$VXLAN_REF"; then
    v1=$(med "$VXLAN_REF" tcp1) vl=$(med "$VXLAN_REF" lat_us)
    goal "TCP 1 stream ≥ 50% of kernel VXLAN ($(ratio "$u1" "$v1"))" "$u1 >= 0.5 * $v1"
    goal "stretch: TCP 1 stream ≥ 80% of kernel VXLAN" "$u1 >= 0.8 * $v1"
    goal "ping avg within 2× of kernel VXLAN's ($(ratio "$ul" "$vl"))" "$ul <= 2 * $vl"
  fi
  if has openvpn; then
    o1=$(med openvpn tcp1) op=$(med openvpn udp_kpps) uo=$(med udp udp_ok_kpps) oo=$(med openvpn udp_ok_kpps)
    goal "TCP 1 stream ≥ 10× OpenVPN ($(ratio "$u1" "$o1"))" "$u1 >= 10 * $o1"
    goal "UDP 64 B packet rate ≥ 2× OpenVPN, delivered at unlimited rate ($(ratio "$up" "$op"))" "$up >= 2 * $op"
    ur=$(med udp udp_reached_kpps) or=$(med openvpn udp_reached_kpps)
    goal "UDP 64 B packet rate ≥ 2× OpenVPN, reaching the receiving host at unlimited rate ($(ratio "$ur" "$or"))" "$ur >= 2 * $or"
    goal "UDP 64 B packet rate ≥ 2× OpenVPN, at ≤ 1% loss ($(ratio "$uo" "$oo"))" "$uo >= 2 * $oo"
  fi
fi

# The goals of issue 22, for weft's wireguard (here its userspace data path) against the same
# WireGuard set-up in Debian's wireguard-go.
if has wireguard && has wireguard-go; then
  w1=$(med wireguard tcp1) g1=$(med wireguard-go tcp1)
  echo
  echo "Goals for \`wireguard\` (issue 22):"
  echo
  goal "TCP 1 stream ≥ 5× wireguard-go ($(ratio "$w1" "$g1"))" "$w1 >= 5 * $g1"
  if has vxlan; then
    v1=$(med vxlan tcp1)
    goal "TCP 1 stream ≥ 0.4× weft's kernel VXLAN (\`vxlan\`) ($(ratio "$w1" "$v1"))" "$w1 >= 0.4 * $v1"
  fi
  wp=$(med wireguard udp_kpps) gp=$(med wireguard-go udp_kpps)
  goal "UDP 64 B packet rate ≥ 2× wireguard-go, delivered at unlimited rate ($(ratio "$wp" "$gp"))" "$wp >= 2 * $gp"
  wr=$(med wireguard udp_reached_kpps) gr=$(med wireguard-go udp_reached_kpps)
  goal "UDP 64 B packet rate ≥ 2× wireguard-go, reaching the receiving host at unlimited rate ($(ratio "$wr" "$gr"))" "$wr >= 2 * $gr"
  wo=$(med wireguard udp_ok_kpps) go=$(med wireguard-go udp_ok_kpps)
  goal "UDP 64 B packet rate ≥ 2× wireguard-go, at ≤ 1% loss ($(ratio "$wo" "$go"))" "$wo >= 2 * $go"
  echo "- CPU s/GB during TCP 1 stream (reported, no goal): path $(fmt "$(med wireguard path_cpu_gb)" %.2f) against" \
    "$(fmt "$(med wireguard-go path_cpu_gb)" %.2f) ($(ratio "$(med wireguard path_cpu_gb)" "$(med wireguard-go path_cpu_gb)")), tunnel daemons" \
    "$(fmt "$(med wireguard tun_cpu_gb)" %.2f) against $(fmt "$(med wireguard-go tun_cpu_gb)" %.2f)" \
    "($(ratio "$(med wireguard tun_cpu_gb)" "$(med wireguard-go tun_cpu_gb)"))"
fi

if has host-gw && has host-gw-manual; then
  echo
  echo "weft's host-gw against hand-written routes: TCP1 $(ratio "$(med host-gw tcp1)" "$(med host-gw-manual tcp1)"),"\
    "TCP4 $(ratio "$(med host-gw tcp4)" "$(med host-gw-manual tcp4)"),"\
    "UDP pps $(ratio "$(med host-gw udp_kpps)" "$(med host-gw-manual udp_kpps)"),"\
    "latency $(ratio "$(med host-gw lat_us)" "$(med host-gw-manual lat_us)")."
fi
if has vxlan && has vxlan-manual; then
  echo
  echo "weft's vxlan against the hand-made device: TCP1 $(ratio "$(med vxlan tcp1)" "$(med vxlan-manual tcp1)"),"\
    "TCP4 $(ratio "$(med vxlan tcp4)" "$(med vxlan-manual tcp4)"),"\
    "UDP pps $(ratio "$(med vxlan udp_kpps)" "$(med vxlan-manual udp_kpps)"),"\
    "latency $(ratio "$(med vxlan lat_us)" "$(med vxlan-manual lat_us)") (goal: throughput ≥ 0.95×)."
fi
if has vxlan-masq && has vxlan; then
  echo
  echo "Firewall rules (-ip-masq + FORWARD rules) against none: TCP1 $(ratio "$(med vxlan-masq tcp1)" "$(med vxlan tcp1)"),"\
    "TCP4 $(ratio "$(med vxlan-masq tcp4)" "$(med vxlan tcp4)"), UDP pps $(ratio "$(med vxlan-masq udp_kpps)" "$(med vxlan udp_kpps)")."
fi
echo
echo "TCP retransmits (1 stream, per round); pings unanswered (of $PINGS, per round):"
echo
for mode in "${present[@]}"; do
  echo "- $mode: retransmits${RES["$mode,retr1"]}; unanswered${RES["$mode,ping_lost"]}"
done
echo
echo "Every round (TCP Mbit/s, UDP kpps delivered at unlimited rate and at ≤ 1% loss, ping avg µs, CPU s/GB of the path):"
echo
echo '```'
for mode in "${present[@]}"; do
  printf '%-14s tcp1:%s | tcp4:%s | udp:%s | udp≤1%%:%s | lat:%s | cpu:%s\n' "$mode" \
    "$(for v in ${RES["$mode,tcp1"]}; do printf ' %.0f' "$v"; done)" \
    "$(for v in ${RES["$mode,tcp4"]}; do printf ' %.0f' "$v"; done)" \
    "$(for v in ${RES["$mode,udp_kpps"]}; do printf ' %.0f' "$v"; done)" \
    "$(for v in ${RES["$mode,udp_ok_kpps"]}; do printf ' %.0f' "$v"; done)" \
    "$(for v in ${RES["$mode,lat_us"]}; do printf ' %.0f' "$v"; done)" \
    "$(for v in ${RES["$mode,path_cpu_gb"]}; do printf ' %.2f' "$v"; done)"
done
echo '```'

echo
echo "### Devices: MTU and offloads (host 1 and its container)"
echo
echo "MTUs: underlay eth0, the host's veth0 and cni0, the container's eth0, the tunnel device."
echo
echo '```'
for mode in "${present[@]}"; do
  d="$TOPO_DIR/snap-$mode"
  line=""
  for b in h1-eth0 h1-veth0 h1-cni0 c1-eth0 h1-flannel.1 h1-flannel0 h1-tun0 h1-flannel-wg h1-flannel-v6.1 h1-flannel-wg-v6; do
    [[ -f $d/$b.mtu ]] && line+=" ${b/c1-eth0/container-eth0}=$(cat "$d/$b.mtu")"
  done
  printf '%-14s%s\n' "$mode" "${line//h1-/}"
done
echo
# The offloads that matter for forwarding and tunnelling; a device shown once is the same in
# every mode.
keys='^(tx-checksumming|scatter-gather|tcp-segmentation-offload|generic-segmentation-offload|generic-receive-offload|tx-udp_tnl-segmentation|tx-udp_tnl-csum-segmentation|tx-udp-segmentation|rx-udp-gro-forwarding|rx-gro-list):'
brief() { grep -E "$keys" "$1" | sed -E 's/ \[fixed\]//; s/-offload//; s/-segmentation/-seg/; s/: /=/' | tr '\n' ' '; }
for b in h1-eth0 h1-veth0 h1-cni0 c1-eth0 h1-flannel.1 h1-flannel0 h1-tun0 h1-flannel-wg h1-flannel-v6.1 h1-flannel-wg-v6; do
  first="" differs=0
  for mode in "${present[@]}"; do
    f="$TOPO_DIR/snap-$mode/$b.ethtool"
    [[ -f $f ]] || continue
    if [[ -z $first ]]; then first=$f; elif ! cmp -s "$first" "$f"; then differs=1; fi
  done
  [[ -n $first ]] || continue
  if ((differs)); then
    for mode in "${present[@]}"; do
      f="$TOPO_DIR/snap-$mode/$b.ethtool"
      [[ -f $f ]] && printf '%-16s %-14s %s\n' "${b/c1-eth0/container-eth0}" "$mode" "$(brief "$f")"
    done
  else
    printf '%-16s %-14s %s\n' "${b/c1-eth0/container-eth0}" "(all modes)" "$(brief "$first")"
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
