#!/usr/bin/env bash
# Control-plane benchmark: N weftd agents start at once against one etcd (the lab of
# deploy/lib/topology.sh: etcd in the switch namespace, the agents in host 1's namespace).
# tests/bench/storm.py forks one waiting child per agent, then releases them all together: the
# clock starts at the release and times the exec storm, not the forking. Measures, for each N: the
# time from the release until every agent has started and until every agent holds a lease
# (subnet.env written), each agent's own time from its start to its lease, the etcd requests that
# took (etcd's own /metrics: gRPC calls started, per agent and by method), leases held twice (must
# be 0), time until a new peer lease reaches every agent (watch fan-out), and each agent's
# resident memory.
#
#   sudo bash tests/bench/control-plane.sh [--sizes "10 50 200"]
#
# The agents use the alloc backend on host 1's eth0 with distinct -public-ip values, no daemon.json
# and no firewall rules: only leasing and watching are measured. Nothing is asserted; progress goes
# to stderr and a Markdown table to stdout.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# shellcheck source=deploy/lib/topology.sh
source "$REPO/deploy/lib/topology.sh"

SIZES=(10 50 200)
while (($#)); do
  case $1 in
    --sizes) read -r -a SIZES <<<"${2:?}"; shift 2 ;;
    -h | --help) sed -n '2,13s/^# \{0,1\}//p' "$0"; exit 0 ;;
    *) echo "usage: $0 [--sizes \"10 50 200\"]" >&2; exit 2 ;;
  esac
done
for n in "${SIZES[@]}"; do
  # 250 public addresses per /24 below 10.255.0.0/16, and the agents' leases must fit in 10/8.
  [[ $n =~ ^[0-9]+$ && $n -ge 1 && $n -le 10000 ]] || topo_die "--sizes wants numbers from 1 to 10000"
done

topo_require_root
# shellcheck source=deploy/setup-debian.sh
source "$REPO/deploy/setup-debian.sh"
topo_find_bins "$REPO"
STORM_PY="$REPO/tests/bench/storm.py"

topo_init wcp
topo_bench_traps
topo_switch
topo_etcd --log-level error
topo_host 1
H1=$(topo_ns h1)

# Fine-grained polling: the timings below are only as precise as the poll interval.
export TOPO_POLL=0.02
WORK=""
N=0
LAUNCHER=""
agents=()
# Counted without a fork: the agents are busy on the same two cores.
all_leased() {
  local f=("$WORK"/a*/subnet.env)
  [[ -e ${f[0]} && ${#f[@]} -eq $N ]]
}
released() {
  [[ -s $WORK/released ]] && return 0
  topo_alive "$LAUNCHER" || topo_die "storm.py exited before releasing the agents (log: $WORK/storm.log)"
  return 1
}
# The agents storm.py started go into the lab's records (their PIDs, stopped on exit), ahead of
# storm.py itself: cleanup stops the newest first, and storm.py passes its SIGTERM on to all its
# agents at once, so the agents are stopped together rather than one by one.
track_agents() {
  local pid _d
  [[ ${TOPO_PIDS[-1]} == "$LAUNCHER" ]] || topo_die "storm.py is not the lab's newest process"
  unset 'TOPO_PIDS[-1]'
  while read -r pid _d; do
    agents+=("$pid")
    TOPO_PIDS+=("$pid")
    printf '%s %s (started by storm.py)\n' "$pid" "$TOPO_BIN_DIR/weftd" >>"$TOPO_DIR/pids"
  done <"$WORK/pids"
  TOPO_PIDS+=("$LAUNCHER")
  ((${#agents[@]} == N)) || topo_die "storm.py started ${#agents[@]} agents, not $N"
}
all_saw() { [[ $(grep -l "subnet=10.254.254.0/24" "$WORK"/a*/log 2>/dev/null | wc -l) -eq $N ]]; }
kib_to_mib() { printf '%d.%d' "$(($1 / 1024))" "$(($1 % 1024 * 10 / 1024))"; }
# gRPC calls etcd has started so far, one "method count" line per method (streams count once).
etcd_calls() {
  topo_nsexec "$(topo_ns sw)" 10 curl -sf "$TOPO_ETCD/metrics" |
    awk -F'[{},"= ]+' '/^grpc_server_started_total/ {
      for (i = 2; i < NF; i++) if ($i == "grpc_method") m = $(i + 1)
      n[m] += $NF } END { for (m in n) print m, n[m] }' | sort
}
# Calls per agent between two etcd_calls outputs: "total | method count …" (methods by name).
calls_per_agent() {
  awk -v n="$3" 'NR == FNR { a[$1] = $2; next }
    { d = $2 - a[$1]; if (d > 0) { t += d; s = s sprintf(" %s %.1f", $1, d / n) } }
    END { printf "%.1f |%s\n", t / n, s }' "$1" "$2"
}

rows=()
for N in "${SIZES[@]}"; do
  topo_log "$N agents"
  # A fresh etcd prefix per size: no lease of a smaller run is ever seen again.
  TOPO_ETCD_PREFIX="/bench/$N"
  WORK="$TOPO_DIR/n$N"
  echo '{"Network":"10.0.0.0/8","SubnetLen":24,"Backend":{"Type":"alloc"}}' | topo_ctl config set - >/dev/null
  agents=()
  # Everything each agent needs, before any starts: its directory and its command line
  # (NUL-separated, for storm.py).
  dirs=()
  for ((i = 1; i <= N; i++)); do dirs+=("$WORK/a$i"); done
  mkdir -p "${dirs[@]}"
  for ((i = 1; i <= N; i++)); do
    d="$WORK/a$i"
    printf '%s\0' "$TOPO_BIN_DIR/weftd" \
      -etcd-endpoints="$TOPO_ETCD" -etcd-prefix="$TOPO_ETCD_PREFIX" -iface=eth0 \
      -public-ip="10.255.$((i / 250)).$((i % 250 + 1))" -subnet-file="$d/subnet.env" \
      --docker-daemon-json= -iptables-forward-rules=false >"$d/argv"
  done
  etcd_calls >"$WORK.calls0"
  # One `ip netns exec` for all: storm.py and every agent it starts are in host 1's namespace.
  topo_spawn "$WORK/storm.log" ip netns exec "$H1" env WEFT_LOG="warn,weft=info" \
    python3 "$STORM_PY" --pids "$WORK/pids" --released "$WORK/released" "${dirs[@]}"
  LAUNCHER=$TOPO_SPAWNED
  topo_wait_until 60 "storm.py to release $N agents (log: $WORK/storm.log)" released
  track_agents
  topo_wait_until 120 "$N leases (logs: $WORK/a*/log)" all_leased
  etcd_calls >"$WORK.calls1"
  calls=$(calls_per_agent "$WORK.calls0" "$WORK.calls1" "$N")
  # From the files: the release (storm.py), each agent's start (its own clock just before its
  # exec) and lease (its subnet.env's mtime). The waits above only poll for the end.
  read -r release <"$WORK/released"
  mapfile -t leased < <(stat -c %.3Y "${dirs[@]/%//subnet.env}")
  spawned_ms=0 leased_ms=0 own=()
  for ((i = 0; i < N; i++)); do
    read -r s <"${dirs[i]}/started"
    l=${leased[i]/./}
    ((s - release > spawned_ms)) && spawned_ms=$((s - release))
    ((l - release > leased_ms)) && leased_ms=$((l - release))
    own+=("$((l - s))")
  done
  # Each agent on its own: from its start to its subnet.env (median and slowest).
  mapfile -t own < <(printf '%s\n' "${own[@]}" | sort -n)
  own_med=${own[(N + 1) / 2 - 1]}
  own_max=${own[-1]}
  # Each agent's subnet, from its own subnet.env: a subnet named twice is a duplicate.
  dups=$(cat "$WORK"/a*/subnet.env | sed -n 's/^FLANNEL_SUBNET=//p' | sort | uniq -d | wc -l)

  # Fan-out: one new peer lease, until every agent has logged it.
  sleep 1
  start=$(topo_now_ms)
  topo_etcdctl 10 put "$TOPO_ETCD_PREFIX/subnets/10.254.254.0-24" \
    '{"PublicIP":"192.0.2.1","PublicIPv6":null,"BackendType":"alloc"}' >/dev/null
  topo_wait_until 120 "the new peer on $N agents" all_saw
  fanout_ms=$(($(topo_now_ms) - start))

  rss=""
  for p in "${agents[@]}"; do
    topo_alive "$p" || topo_die "an agent (pid $p) exited early; logs: $WORK/a*/log"
    rss+="$(awk '/^VmRSS/ {print $2}' "/proc/$p/status")"$'\n'
  done
  rss=$(sed '/^$/d' <<<"$rss" | sort -n)
  rss_med=$(sed -n "$(((N + 1) / 2))p" <<<"$rss")
  rss_max=$(tail -1 <<<"$rss")
  rows+=("| $N | $spawned_ms | $leased_ms | $own_med / $own_max | ${calls%% |*} | $dups | $fanout_ms | $(kib_to_mib "$rss_med") | $(kib_to_mib "$rss_max") | ${calls#*| } |")
  topo_log "$N agents: all leased after $leased_ms ms, new peer seen by all after $fanout_ms ms"
  topo_stop_tracked "${agents[@]}" "$LAUNCHER"
done

echo "## Control-plane benchmark"
echo
echo "\`sudo bash tests/bench/control-plane.sh --sizes \"${SIZES[*]}\"\`"
echo
echo "Machine: $(nproc) CPUs, $(uname -r), $(etcd --version | head -1); weftd $(stat -c %s "$TOPO_BIN_DIR/weftd") bytes (release)."
echo "All agents and etcd share the machine's cores, so large N measures CPU contention too."
echo
echo "| agents | all started (ms) | all leased (ms) | each agent: start to lease, median / max (ms) | etcd calls per agent | duplicates | new peer seen by all (ms) | RSS median (MiB) | RSS max (MiB) | calls per agent by method |"
echo "|---|---|---|---|---|---|---|---|---|---|"
printf '%s\n' "${rows[@]}"
