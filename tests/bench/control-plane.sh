#!/usr/bin/env bash
# Control-plane benchmark: N weftd agents start at once against one etcd on loopback.
# Measures, for each N: time until every agent holds a lease (subnet.env written), time until a
# new peer lease reaches every agent (watch fan-out), and each agent's resident memory.
#
#   sudo bash tests/bench/control-plane.sh [--sizes "10 50 200"]
#
# The agents use the alloc backend on loopback with distinct -public-ip values, no daemon.json and
# no firewall rules: only leasing and watching are measured. Nothing is asserted; it prints a table.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
SIZES=(10 50 200)
while (($#)); do
  case $1 in
    --sizes) read -r -a SIZES <<<"${2:?}"; shift 2 ;;
    *) echo "usage: $0 [--sizes \"10 50 200\"]" >&2; exit 2 ;;
  esac
done

source "$REPO/deploy/setup-debian.sh"
export PATH="$HOME/.cargo/bin:$PATH"
if [[ -z ${WEFT_BIN_DIR:-} ]]; then
  (cd "$REPO" && cargo build --release -q)
  WEFT_BIN_DIR="${CARGO_TARGET_DIR:-$REPO/target}/release"
fi
WEFTD=$WEFT_BIN_DIR/weftd
WEFTCTL=$WEFT_BIN_DIR/weftctl

WORK=$(mktemp -d /tmp/weft-cpbench.XXXXXX)
PIDS=()
cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
now_ms() { date +%s%3N; }

# Polls the check function $2 until it succeeds, at most 120 s; $1 names it in the error.
wait_until() {
  local what=$1 check=$2 deadline=$(($(now_ms) + 120000))
  until $check; do
    if (($(now_ms) > deadline)); then echo "timed out waiting for $what" >&2; return 1; fi
    sleep 0.02
  done
}

PORT=$(free_port)
PEER=$(free_port)
EP="http://127.0.0.1:$PORT"
etcd --name bench --data-dir "$WORK/etcd" --listen-client-urls "$EP" --advertise-client-urls "$EP" \
  --listen-peer-urls "http://127.0.0.1:$PEER" --initial-advertise-peer-urls "http://127.0.0.1:$PEER" \
  --initial-cluster "bench=http://127.0.0.1:$PEER" --log-level error >"$WORK/etcd.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do ETCDCTL_API=3 etcdctl --endpoints "$EP" endpoint health >/dev/null 2>&1 && break; sleep 0.1; done

rows=()
for n in "${SIZES[@]}"; do
  prefix="/bench/$n"
  echo '{"Network":"10.0.0.0/8","SubnetLen":24,"Backend":{"Type":"alloc"}}' |
    "$WEFTCTL" -etcd-endpoints="$EP" -etcd-prefix="$prefix" config set - >/dev/null
  agents=()
  start=$(now_ms)
  for i in $(seq "$n"); do
    d="$WORK/$n/a$i"
    mkdir -p "$d"
    WEFT_LOG="warn,weft=info" "$WEFTD" -etcd-endpoints="$EP" -etcd-prefix="$prefix" -iface=127.0.0.1 \
      -public-ip="10.255.$((i / 250)).$((i % 250 + 1))" -subnet-file="$d/subnet.env" \
      --docker-daemon-json= -iptables-forward-rules=false 2>"$d/log" &
    agents+=($!)
    PIDS+=($!)
  done
  all_leased() { [[ $(find "$WORK/$n" -name subnet.env | wc -l) -eq $n ]]; }
  wait_until "$n leases" all_leased
  leased_ms=$(($(now_ms) - start))

  # Fan-out: one new peer lease, until every agent has logged it.
  sleep 1
  start=$(now_ms)
  ETCDCTL_API=3 etcdctl --endpoints "$EP" put "$prefix/subnets/10.254.254.0-24" \
    '{"PublicIP":"192.0.2.1","PublicIPv6":null,"BackendType":"alloc"}' >/dev/null
  all_saw() { [[ $(grep -l "subnet=10.254.254.0/24" "$WORK/$n"/a*/log 2>/dev/null | wc -l) -eq $n ]]; }
  wait_until "the new peer on $n agents" all_saw
  fanout_ms=$(($(now_ms) - start))

  rss=$(for p in "${agents[@]}"; do awk '/VmRSS/ {print $2}' "/proc/$p/status"; done | sort -n)
  rss_med=$(sed -n "$(((n + 1) / 2))p" <<<"$rss")
  rss_max=$(tail -1 <<<"$rss")
  rows+=("| $n | $leased_ms | $fanout_ms | $((rss_med / 1024)).$((rss_med % 1024 * 10 / 1024)) | $((rss_max / 1024)).$((rss_max % 1024 * 10 / 1024)) |")
  for p in "${agents[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${agents[@]}"; do wait "$p" 2>/dev/null || true; done
done

echo "## Control-plane benchmark"
echo
echo "\`sudo bash tests/bench/control-plane.sh --sizes \"${SIZES[*]}\"\`"
echo
echo "Machine: $(nproc) CPUs, $(uname -r), $(etcd --version | head -1); weftd $(stat -c %s "$WEFTD") bytes (release)."
echo "All agents and etcd share the machine's cores, so large N measures CPU contention too."
echo
echo "| agents | all leased (ms) | new peer seen by all (ms) | RSS median (MiB) | RSS max (MiB) |"
echo "|---|---|---|---|---|"
printf '%s\n' "${rows[@]}"
