#!/usr/bin/env bash
# Installs what weft needs to build, test, demo and benchmark on a fresh Debian (bookworm or
# later), as root. Safe to run again: installs only what is missing. tests/fresh-machine.sh proves
# in CI that this list is complete, on a debootstrap --variant=minbase root.
set -euo pipefail

# A minbase root has only Essential and Priority: required packages (coreutils, util-linux for
# nsenter/setsid, mount, tar, sed, grep, findutils, mawk, apt). Everything else is listed here.
PACKAGES=(
  # Build: the C toolchain for the linker and ring; protoc and the well-known .proto files
  # (google/protobuf/*.proto) that etcd-client's build imports; curl and CAs for rustup.
  gcc libc6-dev protobuf-compiler libprotobuf-dev curl ca-certificates
  # The lab: ip/bridge/ss (ip netns), sysctl, ping, kmod so the kernel can load vxlan, veth,
  # bridge and netfilter modules on demand, flannel's iptables (nft and legacy alternatives),
  # etcd and etcdctl, openssl for the TLS test certificates, the CNI plugins (bridge, host-local,
  # portmap) weft-cni delegates to.
  iproute2 procps iputils-ping kmod iptables nftables etcd-server etcd-client openssl containernetworking-plugins
  # Docker tests: dockerd (its Depends bring containerd, runc and tini), busybox for the image,
  # and apparmor: bookworm's dockerd refuses to start containers when the kernel has AppArmor on
  # (Debian's default) and apparmor_parser is missing.
  docker.io apparmor busybox-static
  # systemd test and install.sh: a debootstrapped root, systemctl.
  debootstrap systemd
  # Benchmarks: iperf3, openvpn (the udp comparison), python3 (free ports), jq; ethtool (also the
  # vxlan checksum-offload and doctor tests).
  iperf3 openvpn python3 jq ethtool
  # tests/k8s-validate.sh: a virtualenv for PyPI's kubernetes-validate.
  python3-venv
  # The wireguard backend's tests: a WireGuard peer weft did not write (wireguard-go, wg).
  wireguard-go wireguard-tools
)

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
