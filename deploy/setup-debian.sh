#!/usr/bin/env bash
# Installs what weft needs to build, test and demo on a fresh Debian (bookworm or later), as root.
# Safe to run again: installs only what is missing.
set -euo pipefail

PACKAGES=(etcd-server etcd-client protobuf-compiler iproute2 iptables nftables iperf3
          iputils-ping bridge-utils ca-certificates curl gcc libc6-dev pkg-config
          docker.io busybox-static debootstrap systemd)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Debian's own cargo is too old for weft's dependencies: use rustup's stable toolchain.
if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
  export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: installing the Rust toolchain with rustup"
  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal -c rustfmt,clippy
  export PATH="$HOME/.cargo/bin:$PATH"
fi
command -v cargo-fmt >/dev/null 2>&1 || rustup component add rustfmt 2>/dev/null || true
command -v cargo-clippy >/dev/null 2>&1 || rustup component add clippy 2>/dev/null || true
