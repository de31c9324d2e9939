#!/usr/bin/env bash
# The whole test suite, from a fresh Debian machine: `sudo bash tests/run-all.sh`.
# Privileged tests (network namespaces, netlink, iptables) need root; under CI=true they fail
# instead of skipping when they cannot run.
set -euo pipefail
cd "$(dirname "$0")/.."
source deploy/setup-debian.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --workspace --all-targets --locked
cargo test --workspace --locked --no-fail-fast
bash tests/fuzz.sh
