# shellcheck shell=bash
# A multi-host weft lab on one machine, built from network namespaces. The one shell lab: sourced by
# deploy/demo.sh, tests/bench/datapath.sh and tests/bench/control-plane.sh, so all use one topology:
#
#   <P>sw   "switch": bridge br0 (TOPO_UNDERLAY.1/24), etcd listening on that address
#   <P>hN   host N: eth0 on br0 (TOPO_UNDERLAY.(10+N)/24, default route via the switch so weftd's
#           interface selection picks eth0), bridge cni0, weftd
#   <P>cN   container N: eth0, its peer veth0 on hN's cni0
#
# The underlay is dual-stack when the kernel has IPv6: a.b.c.d/24 comes with fd00:a:b:c::d/64, the
# octets' decimal digits written as the groups (10.99.0.11 is fd00:10:99::11, the switch ::1),
# with the same default routes. tests/lab/src/topology.rs uses the same rule (underlay_ip6).
# A dual-stack network (topo_set_config with TOPO_NETWORK6) gives each container an IPv6 address
# too: topo_wire_container6, as the Rust lab's wire_container_dual.
#
# Every process, namespace and file it creates is recorded (arrays and $TOPO_DIR/{pids,netns}),
# and topo_cleanup removes exactly those: nothing outside the namespaces is touched or contacted.
# Every external command that could hang runs under a time limit and every wait is bounded; the
# daemons (topo_spawn) are the exception, and topo_cleanup stops them by PID.
# Callers set `set -euo pipefail`; the functions return non-zero with a message on failure.

TOPO_PREFIX=""          # namespace name prefix, unique per run
TOPO_DIR=""             # temp dir: logs, per-host subnet.env/daemon.json, etcd data, records
TOPO_BIN_DIR=""         # where weftd and weftctl are
TOPO_UNDERLAY="${TOPO_UNDERLAY:-10.99.0}"       # underlay /24, first three octets
TOPO_NETWORK="${TOPO_NETWORK:-10.244.0.0/16}"   # the flannel Network
TOPO_NETWORK6="${TOPO_NETWORK6:-fd00:244::/56}" # the IPv6Network of a dual-stack config (/64 leases)
TOPO_ETCD_PREFIX="${TOPO_ETCD_PREFIX:-/coreos.com/network}"
TOPO_ETCD=""            # etcd client URL, valid inside the namespaces
TOPO_PIDS=()            # processes we started, in start order
TOPO_NETNS=()           # namespaces we created, in creation order
TOPO_KEEP=0             # 1: topo_cleanup leaves everything in place

topo_log() { printf '==> %s\n' "$*" >&2; }
topo_warn() { printf 'warning: %s\n' "$*" >&2; }
topo_die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Runs a command that could hang under a time limit. --foreground keeps it in our process group,
# so Ctrl-C reaches it at once instead of after the limit.
topo_t() {
  local secs=$1; shift
  timeout --foreground -k 5 "$secs" "$@"
}

# Runs a command that takes a while (ping, iperf3) in the background and waits for it. A trapped
# Ctrl-C interrupts `wait` at once; a foreground program that catches SIGINT itself (ping, iperf3)
# would instead exit normally and bash would carry on with the next command.
TOPO_FG_PID=""
topo_run() {
  local secs=$1 rc=0; shift
  timeout -k 5 "$secs" "$@" 8>&- 9>&- &
  TOPO_FG_PID=$!
  wait "$TOPO_FG_PID" || rc=$?
  TOPO_FG_PID=""
  return "$rc"
}

# `ip netns exec` with a time limit.
topo_nsexec() {
  local ns=$1 secs=$2; shift 2
  topo_t "$secs" ip netns exec "$ns" "$@"
}

topo_restore_output() { exec 1>&8 2>&9; }

# Wall clock in milliseconds, without a fork (bash 5's EPOCHREALTIME).
topo_now_ms() {
  local t=${EPOCHREALTIME/[.,]/}
  printf '%d' "$((t / 1000))"
}

# Polls `cmd...` until it succeeds, every ${TOPO_POLL:-0.1} s, for at most `secs` seconds; then
# fails naming `what`.
topo_wait_until() {
  local secs=$1 what=$2 deadline
  shift 2
  deadline=$(($(topo_now_ms) + secs * 1000))
  until "$@"; do
    if (($(topo_now_ms) > deadline)); then
      topo_warn "timed out after ${secs}s waiting for $what"
      return 1
    fi
    sleep "${TOPO_POLL:-0.1}"
  done
}

topo_require_root() {
  [[ $(id -u) -eq 0 ]] || topo_die "must run as root (network namespaces): sudo bash $0"
}

# Chooses the prefix and creates the temp dir. Names stay short: wd + up to 5 pid digits + h1.
topo_init() {
  local tag=${1:-wd}
  TOPO_PREFIX="${tag}$(($$ % 100000))"
  TOPO_DIR=$(mktemp -d "/tmp/weft-${TOPO_PREFIX}.XXXXXX")
  # Keep the caller's stdout/stderr on fds 8/9: a trap can fire while a function's output is
  # redirected (bash redirects its own fds for `func >/dev/null`), and the exit handler calls
  # topo_restore_output so its messages are not lost.
  exec 8>&1 9>&2
  : >"$TOPO_DIR/pids"
  : >"$TOPO_DIR/netns"
  TOPO_ETCD="http://${TOPO_UNDERLAY}.1:2379"
  topo_log "lab prefix ${TOPO_PREFIX}, files in ${TOPO_DIR}"
}

# Finds weftd and weftctl: $WEFT_BIN_DIR if set, else builds the repo's release binaries.
topo_find_bins() {
  local repo=$1
  if [[ -n ${WEFT_BIN_DIR:-} ]]; then
    TOPO_BIN_DIR=$WEFT_BIN_DIR
  else
    topo_log "building release binaries (cargo build --release)"
    (cd "$repo" && topo_t 3600 cargo build --release --locked -p weft) ||
      topo_die "cargo build failed"
    TOPO_BIN_DIR="${CARGO_TARGET_DIR:-$repo/target}/release"
  fi
  local b
  for b in weftd weftctl; do
    [[ -x $TOPO_BIN_DIR/$b ]] || topo_die "$TOPO_BIN_DIR/$b not found (WEFT_BIN_DIR=${WEFT_BIN_DIR:-unset})"
  done
}

topo_ns() { printf '%s%s' "$TOPO_PREFIX" "$1"; }

topo_ns_add() {
  local ns=$1
  topo_t 10 ip netns add "$ns"
  TOPO_NETNS+=("$ns")
  printf '%s\n' "$ns" >>"$TOPO_DIR/netns"
  topo_t 10 ip -n "$ns" link set lo up
}

# Starts `cmd...` in the background with output to $log; sets TOPO_SPAWNED to its PID.
# setsid (which does not fork here) keeps Ctrl-C away from daemons, so they stop only when
# topo_cleanup stops them, in order; `ip netns exec` execs too, so the PID is the daemon's own.
topo_spawn() {
  local log=$1; shift
  setsid "$@" >"$log" 2>&1 </dev/null 8>&- 9>&- &
  TOPO_SPAWNED=$!
  TOPO_PIDS+=("$TOPO_SPAWNED")
  printf '%s %s\n' "$TOPO_SPAWNED" "$*" >>"$TOPO_DIR/pids"
}

topo_alive() { kill -0 "$1" 2>/dev/null; }

# Stops one of our processes: SIGTERM, then SIGKILL after 5 s.
topo_stop_pid() {
  local pid=$1 i
  topo_alive "$pid" || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  for ((i = 0; i < 50; i++)); do
    topo_alive "$pid" || break
    sleep 0.1
  done
  if topo_alive "$pid"; then
    topo_warn "pid $pid ignored SIGTERM; killing it"
    kill -KILL "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
      topo_alive "$pid" || break
      sleep 0.1
    done
  fi
  # Only reaps: the process is gone (or stuck in the kernel, where waiting would not help).
  topo_alive "$pid" || wait "$pid" 2>/dev/null || true
}

# Stops some of our processes together (SIGTERM to all, then SIGKILL to those left after 5 s) and
# forgets them, so cleanup never signals a reused PID.
topo_stop_tracked() {
  local pids=("$@") p i left keep=()
  declare -A gone=()
  for p in "${pids[@]}"; do
    gone[$p]=1
    topo_alive "$p" && kill -TERM "$p" 2>/dev/null
  done
  for ((i = 0; i < 50; i++)); do
    left=()
    for p in "${pids[@]}"; do topo_alive "$p" && left+=("$p"); done
    ((${#left[@]})) || break
    sleep 0.1
  done
  for p in "${pids[@]}"; do topo_stop_pid "$p"; done
  for p in "${TOPO_PIDS[@]}"; do
    [[ -n ${gone[$p]:-} ]] || keep+=("$p")
  done
  TOPO_PIDS=("${keep[@]}")
  awk 'NR == FNR { gone[$1] = 1; next } !($1 in gone)' <(printf '%s\n' "${pids[@]}") \
    "$TOPO_DIR/pids" >"$TOPO_DIR/pids.new"
  mv "$TOPO_DIR/pids.new" "$TOPO_DIR/pids"
}

# Whether the kernel has IPv6 (not booted with ipv6.disable=1); without it the lab is IPv4 only.
topo_have_ipv6() { [[ -d /proc/sys/net/ipv6 ]]; }

# IPv6 on in namespace NS, for devices there now and made later; extra sysctl settings may follow
# (a host's forwarding).
topo_ipv6_on() {
  local ns=$1; shift
  topo_have_ipv6 || return 0
  topo_nsexec "$ns" 10 sysctl -qw net.ipv6.conf.all.disable_ipv6=0 \
    net.ipv6.conf.default.disable_ipv6=0 "$@"
}

# The IPv6 underlay's /64 as its leading groups, from TOPO_UNDERLAY when it is asked for (a caller
# may set TOPO_UNDERLAY after sourcing this): 10.99.0 gives fd00:10:99. Trailing zero groups are
# left off, so "$(topo_underlay6)::N" is the canonical text `ip` prints (fd00:10:99::11).
topo_underlay6() {
  local p="fd00:${TOPO_UNDERLAY//./:}"
  while [[ $p == *:0 ]]; do p=${p%:0}; done
  printf '%s' "$p"
}

topo_switch_ip6() { printf '%s::1' "$(topo_underlay6)"; }

topo_switch() {
  local sw
  sw=$(topo_ns sw)
  topo_ns_add "$sw"
  topo_ipv6_on "$sw"
  topo_t 10 ip -n "$sw" link add br0 type bridge
  topo_t 10 ip -n "$sw" addr add "${TOPO_UNDERLAY}.1/24" dev br0
  if topo_have_ipv6; then
    # nodad: usable at once, not tentative for a second.
    topo_t 10 ip -n "$sw" addr add "$(topo_switch_ip6)/64" dev br0 nodad
  fi
  topo_t 10 ip -n "$sw" link set br0 up
}

# Host N and its container. The container is wired later (topo_wire_container), once the host's
# lease says which addresses it gets.
topo_host() {
  local n=$1 mtu=${2:-1500} h c sw
  h=$(topo_ns "h$n"); c=$(topo_ns "c$n"); sw=$(topo_ns sw)
  topo_ns_add "$h"
  topo_ns_add "$c"
  topo_ipv6_on "$h" net.ipv6.conf.all.forwarding=1
  topo_ipv6_on "$c"
  topo_t 10 ip -n "$h" link add eth0 mtu "$mtu" type veth peer name "h$n" netns "$sw"
  topo_t 10 ip -n "$sw" link set "h$n" mtu "$mtu" master br0 up
  topo_t 10 ip -n "$h" addr add "$(topo_underlay_ip "$n")/24" dev eth0
  if topo_have_ipv6; then
    topo_t 10 ip -n "$h" addr add "$(topo_underlay_ip6 "$n")/64" dev eth0 nodad
  fi
  topo_t 10 ip -n "$h" link set eth0 up
  topo_t 10 ip -n "$h" route add default via "${TOPO_UNDERLAY}.1"
  if topo_have_ipv6; then
    topo_t 10 ip -n "$h" -6 route add default via "$(topo_switch_ip6)"
  fi
  topo_nsexec "$h" 10 sysctl -qw net.ipv4.ip_forward=1
  topo_t 10 ip -n "$h" link add cni0 type bridge
  topo_t 10 ip -n "$h" link set cni0 up
  topo_t 10 ip -n "$h" link add veth0 type veth peer name eth0 netns "$c"
  topo_t 10 ip -n "$h" link set veth0 master cni0 up
  topo_t 10 ip -n "$c" link set eth0 up
}

topo_underlay_ip() { printf '%s.%d' "$TOPO_UNDERLAY" "$((10 + $1))"; }

# Host N's IPv6 underlay address: fd00:10:99::11 beside 10.99.0.11.
topo_underlay_ip6() { printf '%s::%d' "$(topo_underlay6)" "$((10 + $1))"; }

# Deletes host N and its container (their processes must be stopped first).
topo_host_del() {
  local n=$1 ns keep=()
  # Namespaces are torn down asynchronously by the kernel: delete the veth pairs now, so a host of
  # the same number can be built again right away (its switch port would still exist otherwise).
  topo_t 10 ip -n "$(topo_ns sw)" link del "h$n" 2>/dev/null || true
  topo_t 10 ip -n "$(topo_ns "h$n")" link del veth0 2>/dev/null || true
  for ns in "$(topo_ns "c$n")" "$(topo_ns "h$n")"; do
    topo_t 10 ip netns del "$ns" 2>/dev/null || topo_warn "could not delete namespace $ns"
  done
  for ns in "${TOPO_NETNS[@]}"; do
    [[ $ns == "$(topo_ns "c$n")" || $ns == "$(topo_ns "h$n")" ]] || keep+=("$ns")
  done
  TOPO_NETNS=("${keep[@]}")
  printf '%s\n' "${TOPO_NETNS[@]}" >"$TOPO_DIR/netns"
  rm -rf "${TOPO_DIR:?}/h$n"
}

# etcd inside the switch namespace, on the switch's address (and the namespace's own loopback for
# peers); data in the temp dir. Extra args go to etcd (e.g. --log-level warn).
# shellcheck disable=SC2120 # the arguments are optional
topo_etcd() {
  local sw
  sw=$(topo_ns sw)
  mkdir -p "$TOPO_DIR/etcd"
  command -v etcd >/dev/null || topo_die "etcd not installed (apt-get install etcd-server)"
  topo_spawn "$TOPO_DIR/etcd.log" ip netns exec "$sw" etcd \
    --name weft-lab --data-dir "$TOPO_DIR/etcd/data" \
    --listen-client-urls "$TOPO_ETCD" --advertise-client-urls "$TOPO_ETCD" \
    --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
    --initial-cluster weft-lab=http://127.0.0.1:2380 "$@"
  TOPO_ETCD_PID=$TOPO_SPAWNED
  if ! TOPO_POLL=0.2 topo_wait_until 20 "etcd to become healthy" topo_etcd_healthy; then
    tail -20 "$TOPO_DIR/etcd.log" >&2
    topo_die "etcd did not become healthy in 20 s (log: $TOPO_DIR/etcd.log)"
  fi
}

topo_etcd_healthy() {
  topo_alive "$TOPO_ETCD_PID" || { tail -20 "$TOPO_DIR/etcd.log" >&2; topo_die "etcd exited"; }
  topo_etcdctl 5 endpoint health >/dev/null 2>&1
}

# etcdctl (v3 API) against the lab's etcd, from the switch namespace, under a limit of `secs`.
topo_etcdctl() {
  local secs=$1; shift
  ETCDCTL_API=3 topo_nsexec "$(topo_ns sw)" "$secs" etcdctl --endpoints "$TOPO_ETCD" "$@"
}

# weftctl against the lab's etcd, run from the switch namespace (the only route to etcd).
topo_ctl() {
  topo_nsexec "$(topo_ns sw)" 30 "$TOPO_BIN_DIR/weftctl" \
    --etcd-endpoints "$TOPO_ETCD" --etcd-prefix "$TOPO_ETCD_PREFIX" "$@"
}

# Stores a network config for `backend`: a type name (vxlan, host-gw, udp, …) or a whole Backend
# object in JSON (`{"Type": "udp", …}`) for backend options. An IPv6 network as the second
# argument (e.g. "$TOPO_NETWORK6") makes the network dual-stack: EnableIPv6 and IPv6Network.
topo_set_config() {
  local backend=$1 net6=${2:-} v6=""
  [[ $backend == "{"* ]] || backend=$(printf '{"Type": "%s"}' "$backend")
  if [[ -n $net6 ]]; then
    v6=$(printf '"EnableIPv6": true, "IPv6Network": "%s", ' "$net6")
  fi
  printf '{"Network": "%s", %s"Backend": %s}\n' "$TOPO_NETWORK" "$v6" "$backend" | topo_ctl config set -
}

# A real kube-apiserver (v1.20.2 from ../shared/kube beside the repository, or $KUBE_APISERVER)
# with its own etcd, in the switch namespace, started as tests/lab/src/kube.rs starts it: the same
# flags, RBAC on, one static token per identity (`admin` in system:masters; the others in no
# group, so RBAC grants them nothing until a role is bound), bound to the switch's address so
# every host reaches https://TOPO_UNDERLAY.1:6443. It makes its own serving certificate; the CA
# that signed it goes to $TOPO_KUBE_CA, and every client here verifies TLS against it.
#   topo_kube_apiserver DIR "user ..." [more apiserver flags, e.g. --audit-log-path=...]
# DIR holds tokens.csv, token.USER (each identity's token), certs/, ca.crt, the logs and etcd's
# data. Its etcd listens on the switch's loopback (TOPO_KUBE_ETCD), apart from topo_etcd's ports.
# The apiserver takes ~5-10 s to /readyz on 2 cores and ~300 MiB; topo_kube_stop ends both.
TOPO_KUBE_URL=""
TOPO_KUBE_DIR=""
TOPO_KUBE_CA=""
TOPO_KUBE_PID=""
TOPO_KUBE_ETCD_PID=""
TOPO_KUBE_PORT=6443
TOPO_KUBE_ETCD="http://127.0.0.1:2479"
TOPO_KUBE_ETCD_PEER="http://127.0.0.1:2480"
TOPO_LIB_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# The apiserver binary: $KUBE_APISERVER, else the cached one, unpacked there once from
# ../shared/kube/kube-apiserver.gz (the path tests/lab/src/kube.rs and start-apiserver.sh use).
topo_kube_binary() {
  local cache=/var/cache/kube-apiserver-1.20.2/kube-apiserver gz tmp
  if [[ -n ${KUBE_APISERVER:-} ]]; then
    [[ -x $KUBE_APISERVER ]] || topo_die "KUBE_APISERVER=$KUBE_APISERVER is not an executable file"
    printf '%s' "$KUBE_APISERVER"
    return
  fi
  if [[ ! -x $cache ]]; then
    gz="$TOPO_LIB_DIR/../../../shared/kube/kube-apiserver.gz"
    [[ -f $gz ]] || topo_die "needs a kube-apiserver: set KUBE_APISERVER to one (any official release binary serves) or provide $gz"
    mkdir -p "${cache%/*}"
    tmp="${cache%/*}/.kube-apiserver.$$.tmp"
    if ! { topo_t 120 gunzip -c "$gz" >"$tmp" && chmod 0755 "$tmp" && mv "$tmp" "$cache"; }; then
      rm -f "$tmp"
      topo_die "could not unpack $gz into $cache"
    fi
  fi
  printf '%s' "$cache"
}

topo_kube_apiserver() {
  local dir=$1 users=$2; shift 2
  local sw bin u t ip
  sw=$(topo_ns sw)
  ip="${TOPO_UNDERLAY}.1"
  for t in etcd etcdctl openssl curl jq; do
    command -v "$t" >/dev/null || topo_die "$t not installed (deploy/setup-debian.sh)"
  done
  bin=$(topo_kube_binary)
  mkdir -p "$dir/certs" "$dir/etcd"
  TOPO_KUBE_DIR=$dir
  TOPO_KUBE_URL="https://$ip:$TOPO_KUBE_PORT"
  TOPO_KUBE_CA="$dir/ca.crt"
  (
    umask 077
    : >"$dir/tokens.csv"
    for u in admin $users; do
      [[ $u =~ ^[a-z0-9][a-z0-9:._-]*$ ]] || topo_die "user name $u: lower case, digits, ':._-'"
      t=$(topo_t 10 openssl rand -hex 16)
      printf '%s' "$t" >"$dir/token.$u"
      if [[ $u == admin ]]; then
        printf '%s,admin,admin,system:masters\n' "$t" >>"$dir/tokens.csv"
      else
        printf '%s,%s,%s\n' "$t" "$u" "$u" >>"$dir/tokens.csv"
      fi
    done
  )
  topo_t 30 openssl genrsa -out "$dir/sa.key" 2048 2>/dev/null
  topo_t 30 openssl rsa -in "$dir/sa.key" -pubout -out "$dir/sa.pub" 2>/dev/null
  topo_spawn "$dir/etcd.log" ip netns exec "$sw" etcd --name kube --data-dir "$dir/etcd/data" \
    --listen-client-urls "$TOPO_KUBE_ETCD" --advertise-client-urls "$TOPO_KUBE_ETCD" \
    --listen-peer-urls "$TOPO_KUBE_ETCD_PEER" --initial-advertise-peer-urls "$TOPO_KUBE_ETCD_PEER" \
    --initial-cluster "kube=$TOPO_KUBE_ETCD_PEER" --log-level error
  TOPO_KUBE_ETCD_PID=$TOPO_SPAWNED
  if ! TOPO_POLL=0.2 topo_wait_until 20 "the apiserver's etcd" topo_kube_etcd_healthy; then
    tail -20 "$dir/etcd.log" >&2
    topo_die "the apiserver's etcd did not become healthy in 20 s (log: $dir/etcd.log)"
  fi
  topo_spawn "$dir/apiserver.log" ip netns exec "$sw" "$bin" \
    --etcd-servers="$TOPO_KUBE_ETCD" --bind-address="$ip" --advertise-address="$ip" \
    --secure-port="$TOPO_KUBE_PORT" --insecure-port=0 --cert-dir="$dir/certs" \
    --service-cluster-ip-range=10.0.0.0/24 \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="$dir/sa.pub" --service-account-signing-key-file="$dir/sa.key" \
    --token-auth-file="$dir/tokens.csv" --authorization-mode=RBAC \
    --disable-admission-plugins=ServiceAccount --endpoint-reconciler-type=none \
    --profiling=false "$@"
  TOPO_KUBE_PID=$TOPO_SPAWNED
  if ! TOPO_POLL=0.2 topo_wait_until 90 "the kube-apiserver's /readyz" topo_kube_ready; then
    tail -40 "$dir/apiserver.log" >&2
    topo_die "the kube-apiserver was not ready in 90 s (log: $dir/apiserver.log)"
  fi
}

topo_kube_etcd_healthy() {
  topo_alive "$TOPO_KUBE_ETCD_PID" || { tail -20 "$TOPO_KUBE_DIR/etcd.log" >&2; topo_die "the apiserver's etcd exited"; }
  ETCDCTL_API=3 topo_nsexec "$(topo_ns sw)" 5 etcdctl --endpoints "$TOPO_KUBE_ETCD" \
    endpoint health >/dev/null 2>&1
}

# Once the apiserver has written its certificate (the cert, then the key), the CA that signed it
# (the bundle's last certificate) is copied to $TOPO_KUBE_CA, after checking that the serving
# certificate names the bound address; then /readyz must say ok, over verified TLS.
topo_kube_ready() {
  local certs=$TOPO_KUBE_DIR/certs
  topo_alive "$TOPO_KUBE_PID" || { tail -40 "$TOPO_KUBE_DIR/apiserver.log" >&2; topo_die "the kube-apiserver exited"; }
  if [[ ! -s $TOPO_KUBE_CA ]]; then
    [[ -s $certs/apiserver.key ]] && grep -q -- '-----END CERTIFICATE-----' "$certs/apiserver.crt" 2>/dev/null ||
      return 1
    topo_t 10 openssl x509 -noout -text -in "$certs/apiserver.crt" | grep -q "IP Address:${TOPO_UNDERLAY}\.1\b" ||
      topo_die "the apiserver's serving certificate does not name ${TOPO_UNDERLAY}.1"
    awk '/-----BEGIN CERTIFICATE-----/ { buf = "" } { buf = buf $0 "\n" } END { printf "%s", buf }' \
      "$certs/apiserver.crt" >"$TOPO_KUBE_CA.tmp"
    mv "$TOPO_KUBE_CA.tmp" "$TOPO_KUBE_CA"
  fi
  [[ $(topo_kube admin GET /readyz 2>/dev/null) == ok ]]
}

# One request to the apiserver as USER (admin included), from the switch namespace, TLS verified:
# prints the body; fails, saying the status and the body, unless the answer is 2xx. A body (the
# fourth argument; "-" reads stdin) goes as a strategic-merge patch for PATCH, else as JSON when it
# starts with { or [, else as YAML (the apiserver takes application/yaml).
topo_kube() {
  local user=$1 method=$2 path=$3 body=${4-} ct out code
  local args=(-sS --connect-timeout 2 --max-time 20 --cacert "$TOPO_KUBE_CA"
    -H "Authorization: Bearer $(<"$TOPO_KUBE_DIR/token.$user")" -H "Accept: application/json"
    -X "$method" -w '\n%{http_code}')
  [[ $body == - ]] && body=$(cat)
  if [[ -n $body ]]; then
    if [[ $method == PATCH ]]; then
      ct=application/strategic-merge-patch+json
    elif [[ $body =~ ^[[:space:]]*[\{\[] ]]; then
      ct=application/json
    else
      ct=application/yaml
    fi
    args+=(-H "Content-Type: $ct" --data-binary @-)
  fi
  out=$(printf '%s' "$body" | topo_nsexec "$(topo_ns sw)" 30 curl "${args[@]}" "$TOPO_KUBE_URL$path") || {
    topo_warn "$method $path as $user: no answer"
    return 1
  }
  code=${out##*$'\n'}
  out=${out%$'\n'*}
  if [[ $code != 2[0-9][0-9] ]]; then
    topo_warn "$method $path as $user: HTTP $code ${out:0:500}"
    return 1
  fi
  printf '%s\n' "$out"
}

# The first document of a multi-document YAML file whose top-level kind is KIND.
topo_yaml_doc() {
  awk -v want="kind: $2" '
    function flush() { if (hit) { printf "%s", doc; found = 1; exit } doc = ""; hit = 0 }
    /^---[[:space:]]*$/ { flush(); next }
    { doc = doc $0 "\n"; if ($0 == want) hit = 1 }
    END { if (!found) flush() }' "$1"
}

# Creates the ClusterRole of a manifest (e.g. deploy/kubernetes/weft-kube.yml), POSTed as the YAML
# it is, and binds it to USER (ClusterRoleBinding lab:ROLE:USER); prints the role's name.
topo_kube_bind_manifest_role() {
  local manifest=$1 user=$2 doc role
  doc=$(topo_yaml_doc "$manifest" ClusterRole)
  [[ -n $doc ]] || topo_die "no ClusterRole in $manifest"
  role=$(topo_kube admin POST /apis/rbac.authorization.k8s.io/v1/clusterroles "$doc" | jq -r .metadata.name) ||
    topo_die "could not create the ClusterRole of $manifest"
  printf '{"apiVersion":"rbac.authorization.k8s.io/v1","kind":"ClusterRoleBinding","metadata":{"name":"lab:%s:%s"},"roleRef":{"apiGroup":"rbac.authorization.k8s.io","kind":"ClusterRole","name":"%s"},"subjects":[{"apiGroup":"rbac.authorization.k8s.io","kind":"User","name":"%s"}]}' \
    "$role" "$user" "$role" "$user" |
    topo_kube admin POST /apis/rbac.authorization.k8s.io/v1/clusterrolebindings - >/dev/null ||
    topo_die "could not bind ClusterRole $role to $user"
  printf '%s' "$role"
}

# A kubeconfig for USER's token at PATH: the apiserver's URL and CA.
topo_kubeconfig() {
  local user=$1 path=$2
  (
    umask 077
    cat >"$path" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: lab
  cluster:
    server: "$TOPO_KUBE_URL"
    certificate-authority: "$TOPO_KUBE_CA"
users:
- name: "$user"
  user:
    token: "$(<"$TOPO_KUBE_DIR/token.$user")"
contexts:
- name: lab
  context:
    cluster: lab
    user: "$user"
current-context: lab
EOF
  )
}

# Stops the apiserver and its etcd (by PID) and forgets them.
topo_kube_stop() {
  topo_stop_tracked "$TOPO_KUBE_PID" "$TOPO_KUBE_ETCD_PID"
  TOPO_KUBE_PID=""
  TOPO_KUBE_ETCD_PID=""
}

# Starts weftd in host N; extra flags are passed through. Files go to $TOPO_DIR/hN/.
topo_weftd() {
  local n=$1; shift
  local d="$TOPO_DIR/h$n"
  mkdir -p "$d"
  topo_spawn "$d/weftd.log" ip netns exec "$(topo_ns "h$n")" "$TOPO_BIN_DIR/weftd" \
    -etcd-endpoints="$TOPO_ETCD" -etcd-prefix="$TOPO_ETCD_PREFIX" \
    -subnet-file="$d/subnet.env" --docker-daemon-json="$d/daemon.json" "$@"
  printf '%s\n' "$TOPO_SPAWNED" >"$d/weftd.pid"
}

topo_weftd_pid() { cat "$TOPO_DIR/h$1/weftd.pid"; }

# Waits until host N's weftd has written subnet.env (its lease and backend are up).
topo_wait_subnet() {
  local n=$1 secs=${2:-30} d pid i
  d="$TOPO_DIR/h$n"
  pid=$(topo_weftd_pid "$n")
  for ((i = 0; i < secs * 10; i++)); do
    [[ -s $d/subnet.env ]] && return 0
    if ! topo_alive "$pid"; then
      tail -20 "$d/weftd.log" >&2
      topo_die "weftd on host $n exited before writing subnet.env (log: $d/weftd.log)"
    fi
    sleep 0.1
  done
  tail -20 "$d/weftd.log" >&2
  topo_die "host $n: no subnet.env after ${secs}s (log: $d/weftd.log)"
}

# One variable of host N's subnet.env (parsed, not sourced: it is data).
topo_env() {
  local n=$1 var=$2 v
  v=$(sed -n "s/^${var}=//p" "$TOPO_DIR/h$n/subnet.env")
  [[ -n $v ]] || topo_die "host $n: $var missing from subnet.env"
  printf '%s' "$v"
}

topo_ip2int() {
  local a b c d
  IFS=. read -r a b c d <<<"$1"
  printf '%d' "$(((a << 24) | (b << 16) | (c << 8) | d))"
}

topo_int2ip() {
  local i=$1
  printf '%d.%d.%d.%d' $(((i >> 24) & 255)) $(((i >> 16) & 255)) $(((i >> 8) & 255)) $((i & 255))
}

# "10.244.52.1/24" -> "10.244.52.0/24"
topo_cidr_network() {
  local ip=${1%/*} len=${1#*/} mask
  mask=$(((0xffffffff << (32 - len)) & 0xffffffff))
  printf '%s/%s' "$(topo_int2ip $(($(topo_ip2int "$ip") & mask)))" "$len"
}

# Host N's lease, e.g. 10.244.52.0/24.
topo_subnet() { topo_cidr_network "$(topo_env "$1" FLANNEL_SUBNET)"; }

topo_container_ip() { cat "$TOPO_DIR/h$1/container_ip"; }

# Does what the flannel CNI plugin's bridge delegate does: cni0 gets FLANNEL_SUBNET, the container
# the next address, MTU FLANNEL_MTU on both veth ends, default route via cni0.
topo_wire_container() {
  local n=$1 h c gw len mtu cip
  h=$(topo_ns "h$n"); c=$(topo_ns "c$n")
  gw=$(topo_env "$n" FLANNEL_SUBNET)
  mtu=$(topo_env "$n" FLANNEL_MTU)
  len=${gw#*/}; gw=${gw%/*}
  cip=$(topo_int2ip $(($(topo_ip2int "$gw") + 1)))
  topo_t 10 ip -n "$h" addr replace "$gw/$len" dev cni0
  topo_t 10 ip -n "$h" link set veth0 mtu "$mtu"
  topo_t 10 ip -n "$c" link set eth0 mtu "$mtu"
  topo_t 10 ip -n "$c" addr replace "$cip/$len" dev eth0
  topo_t 10 ip -n "$c" route replace default via "$gw"
  printf '%s\n' "$cip" >"$TOPO_DIR/h$n/container_ip"
}

topo_container_ip6() { cat "$TOPO_DIR/h$1/container_ip6"; }

# The IPv6 address after ADDR, whose last group must be below ffff (true of a lease's gateway,
# its network address + 1): fd00:244:0:5::1 gives fd00:244:0:5::2.
topo_ip6_next() {
  local a=$1 last
  last=${a##*:}
  if ! [[ $last =~ ^[0-9a-fA-F]{1,4}$ ]] || ((16#$last == 0xffff)); then
    topo_die "no address after $a here"
  fi
  printf '%s:%x' "${a%:*}" "$((16#$last + 1))"
}

# The IPv6 half of the bridge delegate's work on a dual-stack lease, as tests/lab/src/topology.rs's
# wire_container_dual: cni0 gets FLANNEL_IPV6_SUBNET (the lease's ::1), the container the next
# address (::2), both without DAD (usable at once), and a default route via cni0's address. Call
# it after topo_wire_container, which sets the MTU of both veth ends.
topo_wire_container6() {
  local n=$1 h c gw len cip
  h=$(topo_ns "h$n"); c=$(topo_ns "c$n")
  topo_have_ipv6 || topo_die "the kernel has no IPv6 (booted with ipv6.disable=1?)"
  gw=$(topo_env "$n" FLANNEL_IPV6_SUBNET)
  len=${gw#*/}; gw=${gw%/*}
  cip=$(topo_ip6_next "$gw")
  topo_t 10 ip -n "$h" addr replace "$gw/$len" dev cni0 nodad
  topo_t 10 ip -n "$c" addr replace "$cip/$len" dev eth0 nodad
  topo_t 10 ip -n "$c" -6 route replace default via "$gw"
  printf '%s\n' "$cip" >"$TOPO_DIR/h$n/container_ip6"
}

# Waits until every listed host sends to every other listed host's container IPv6 address (see
# topo_wire_container6) through `dev` (flannel-v6.1's per-peer route, or flannel-wg-v6's route for
# the whole IPv6 network): until then the default route would take it to the switch.
topo_wait_routes6() {
  local secs=$1 dev=$2; shift 2
  local n m to
  for n in "$@"; do
    for m in "$@"; do
      [[ $n == "$m" ]] && continue
      to=$(topo_container_ip6 "$m")
      topo_wait_until "$secs" "host $n's route to $to through $dev" topo_routes_via "$n" "$to" "$dev" ||
        topo_die "host $n: no route to $to through $dev (log: $TOPO_DIR/h$n/weftd.log)"
    done
  done
}

# Whether host N routes address TO through device DEV.
topo_routes_via() {
  [[ " $(topo_t 10 ip -n "$(topo_ns "h$1")" -o route get "$2" 2>/dev/null) " == *" dev $3 "* ]]
}

# Waits until every listed host has a route to every other listed host's subnet (the hosts have
# seen each other's leases), so the first packets are not lost to a race with the watch.
topo_wait_routes() {
  local secs=$1; shift
  local hosts=("$@") n m missing i
  for ((i = 0; i < secs * 10; i++)); do
    missing=""
    for n in "${hosts[@]}"; do
      for m in "${hosts[@]}"; do
        [[ $n == "$m" ]] && continue
        if [[ -z $(topo_t 10 ip -n "$(topo_ns "h$n")" route show exact "$(topo_subnet "$m")") ]]; then
          missing+=" h$n->h$m"
        fi
      done
    done
    [[ -z $missing ]] && return 0
    sleep 0.1
  done
  topo_die "routes still missing after ${secs}s:$missing (logs: $TOPO_DIR/h*/weftd.log)"
}

# Builds hosts 1..count (switch and etcd must be up) with the given backend (as topo_set_config),
# starts weftd everywhere, waits for every lease and wires the containers. Extra args go to weftd.
topo_cluster_up() {
  local count=$1 backend=$2; shift 2
  local n hosts=()
  for ((n = 1; n <= count; n++)); do
    topo_host "$n"
    hosts+=("$n")
  done
  topo_set_config "$backend" >&2
  for n in "${hosts[@]}"; do topo_weftd "$n" "$@"; done
  for n in "${hosts[@]}"; do
    topo_wait_subnet "$n" 60
    topo_wire_container "$n"
  done
  if [[ $(topo_backend_type "$backend") == udp ]]; then
    # udp routes the whole network into flannel0 and keeps its peers in userspace: the kernel
    # shows no per-peer state to wait for, so callers probe with traffic (a ping with retries).
    topo_wait_network_route 30 flannel0 "${hosts[@]}"
  else
    topo_wait_routes 30 "${hosts[@]}"
  fi
}

# The backend type of a topo_set_config argument: the name itself, or the object's "Type".
topo_backend_type() {
  if [[ $1 == "{"* ]]; then
    sed -nE 's/.*"[Tt]ype"[[:space:]]*:[[:space:]]*"([^"]*)".*/\1/p' <<<"$1"
  else
    printf '%s' "$1"
  fi
}

# Waits until every listed host routes the whole network into `dev`.
topo_wait_network_route() {
  local secs=$1 dev=$2; shift 2
  local n
  for n in "$@"; do
    topo_wait_until "$secs" "host $n's route for $TOPO_NETWORK into $dev" topo_has_route "$n" "$dev" ||
      topo_die "host $n: no route for $TOPO_NETWORK into $dev (log: $TOPO_DIR/h$n/weftd.log)"
  done
}

topo_has_route() {
  [[ -n $(topo_t 10 ip -n "$(topo_ns "h$1")" route show exact "$TOPO_NETWORK" dev "$2" 2>/dev/null) ]]
}

# Removes everything this run created: our processes, our namespaces, the temp dir.
topo_cleanup() {
  local i pid ns
  set +e
  if ((TOPO_KEEP)); then
    return 0
  fi
  [[ -n $TOPO_FG_PID ]] && topo_stop_pid "$TOPO_FG_PID"
  for ((i = ${#TOPO_PIDS[@]} - 1; i >= 0; i--)); do
    topo_stop_pid "${TOPO_PIDS[i]}"
  done
  # Containers and hosts before the switch; a namespace only disappears once empty anyway.
  for ((i = ${#TOPO_NETNS[@]} - 1; i >= 0; i--)); do
    ns=${TOPO_NETNS[i]}
    if [[ -e /run/netns/$ns ]]; then
      timeout 10 ip netns del "$ns" || topo_warn "could not delete namespace $ns"
    fi
  done
  if [[ -n $TOPO_DIR && -d $TOPO_DIR ]]; then
    rm -rf "${TOPO_DIR:?}"
  fi
  TOPO_PIDS=(); TOPO_NETNS=()
}

# Cleans up a lab left running with --keep, from its records. A PID is only signalled if it still
# runs one of the programs the lab started (the number could have been reused).
topo_cleanup_dir() {
  local dir=$1 pid ns
  [[ -f $dir/pids && -f $dir/netns ]] || topo_die "$dir is not a weft lab directory"
  TOPO_DIR=$dir
  while read -r pid _; do
    [[ -n $pid ]] || continue
    if [[ -r /proc/$pid/cmdline ]] && tr '\0' ' ' </proc/"$pid"/cmdline | grep -qE '(weftd|etcd|iperf3|openvpn)'; then
      TOPO_PIDS+=("$pid")
    fi
  done <"$dir/pids"
  while read -r ns; do
    [[ -n $ns ]] && TOPO_NETNS+=("$ns")
  done <"$dir/netns"
  # They are not our children any more: wait by polling, not with `wait`.
  topo_cleanup
}

# The benchmarks' exit: output restored, everything removed, and how the run ended said once,
# also on failure or Ctrl-C.
topo_bench_on_exit() {
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

topo_bench_traps() {
  trap topo_bench_on_exit EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
}
