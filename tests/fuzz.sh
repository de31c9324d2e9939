#!/usr/bin/env bash
# Runs every cargo-fuzz target (backends/fuzz: the udp codec's egress, ingress and peer table, the
# receive path's GRO coalescer and batch splitting, the nexthop message parser, and the userspace
# WireGuard worker's packet and datagram lookups) for a bounded time, starting from the corpus
# committed in the repo:
# `sudo bash tests/fuzz.sh [SECS]`
# (default 20 s per target; FUZZ_SECS also sets it). New inputs go to a temporary directory, so the
# committed corpus only changes when someone copies findings in. A crash fails the run and leaves
# the input in backends/fuzz/artifacts/<target>/. The parsers of the control plane (network config,
# lease keys and values, subnet.env, daemon.json) are covered by proptest properties in
# `cargo test` instead: they need no sanitizer build, and run on every test run.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-${FUZZ_SECS:-20}}
[[ $SECS =~ ^[0-9]+$ && $SECS -ge 1 ]] || { echo "seconds wanted, got $SECS" >&2; exit 2; }
export PATH="$HOME/.cargo/bin:$PATH"
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "==> installing cargo-fuzz from crates.io" >&2
  cargo install --locked cargo-fuzz
fi
# cargo-fuzz builds with -Zsanitizer=address; the stable toolchain allows it with this.
export RUSTC_BOOTSTRAP=1
work=$(mktemp -d /tmp/weft-fuzz.XXXXXX)
trap 'rm -rf "$work"' EXIT
cd backends/fuzz
mapfile -t targets < <(cargo fuzz list)
((${#targets[@]})) || { echo "no fuzz targets found" >&2; exit 1; }
for t in "${targets[@]}"; do
  mkdir -p "$work/$t" "corpus/$t"
  echo "==> fuzzing $t for ${SECS}s (corpus: $(find "corpus/$t" -type f 2>/dev/null | wc -l) inputs)" >&2
  rc=0
  cargo fuzz run "$t" "$work/$t" "corpus/$t" -- -max_total_time="$SECS" -print_final_stats=1 \
    >"$work/$t.log" 2>&1 || rc=$?
  grep -E "^(stat::number_of_executed_units|stat::new_units_added)" "$work/$t.log" || true
  if ((rc != 0)); then
    tail -40 "$work/$t.log" >&2
    echo "fuzz target $t failed (exit $rc); input in backends/fuzz/artifacts/$t/" >&2
    exit 1
  fi
done
echo "==> fuzzing done: ${targets[*]}" >&2
