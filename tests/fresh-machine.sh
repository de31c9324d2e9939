#!/usr/bin/env bash
# Proves that deploy/setup-debian.sh does all the set-up a fresh Debian machine needs: in a
# minimal bookworm root (debootstrap --variant=minbase, cached as a tarball per machine), it runs
# the project's set-up, checks that every command the tests, demo and benchmarks use is there,
# and builds the workspace (`cargo build --release --locked --workspace`). CI runs it every time.
#
#   sudo bash tests/fresh-machine.sh [--setup FILE]
#
#   --setup FILE   run FILE as deploy/setup-debian.sh instead of HEAD's (to try an uncommitted
#                  change, or to show that an incomplete package list fails)
#
# The source is `git archive HEAD`: uncommitted changes are not in it, so they cannot make the
# check pass (in CI's fresh clone HEAD is the work tree anyway). Only what stands for the network
# comes from this machine: its resolver, its CA bundle (CARGO_HTTP_CAINFO, SSL_CERT_FILE, apt's
# CAInfo), and its Rust toolchain mounted read-only, since rustup cannot be downloaded here.
# Debian packages and crates come in through the set-up and cargo, into the root's own apt cache
# and CARGO_HOME. A policy-rc.d in the root keeps package scripts from starting services.
#
# Everything runs in a private mount namespace, and an EXIT trap kills (by PID) any process whose
# root is the fresh root, unmounts in reverse order and removes the work dir, also on failure.
#
# Environment: WEFT_DEBIAN_MIRROR (default http://deb.debian.org/debian), WEFT_CACHE_DIR
# (default /var/cache/weft), TMPDIR (the root and its build, ~3.5 GB at most; default /var/tmp).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SUITE=bookworm
ROOTFS_KEY="$SUITE-minbase-1"   # bump to rebuild every machine's cached root
CACHE_DIR=${WEFT_CACHE_DIR:-/var/cache/weft}
MIRROR=${WEFT_DEBIAN_MIRROR:-http://deb.debian.org/debian}
BUILD_CMD="cargo build --release --locked --workspace"

# Commands the build, tests, demo and benchmarks run (cargo and rustc come from the lent
# toolchain). Packages are set-up's business; this checks the result, by command.
COMMANDS=(
  cc protoc curl                                    # build, rustup fallback
  ip bridge ss sysctl ping modprobe nsenter setsid timeout umount tar
  iptables iptables-save iptables-restore nft       # firewall rules and their tests
  etcd etcdctl openssl                              # lab etcd, TLS test certificates
  dockerd docker containerd runc tini busybox apparmor_parser   # Docker tests
  debootstrap systemctl install                     # systemd test, install.sh
  iperf3 openvpn python3 jq ethtool                 # benchmarks
  wireguard-go wg                                   # the wireguard backend's interop test
)

ARGS=("$@")
SETUP_FILE=""
while (($#)); do
  case $1 in
    --setup) SETUP_FILE=${2:?--setup needs a file}; shift 2 ;;
    --setup=*) SETUP_FILE=${1#*=}; shift ;;
    -h | --help) sed -n '2,24s/^# \{0,1\}//p' "$0"; exit 0 ;;
    *) echo "fresh-machine: unknown option $1" >&2; exit 2 ;;
  esac
done

say() { printf 'fresh-machine: %s\n' "$*" >&2; }
die() { say "FAILED: $*"; exit 1; }

if [[ $(id -u) -ne 0 ]]; then
  [[ ${CI:-} == true ]] && die "needs root (chroot, mounts) and CI=true: run it as root"
  say "SKIPPED: needs root (chroot, mounts)"
  exit 0
fi
if [[ -n $SETUP_FILE ]]; then
  [[ -f $SETUP_FILE ]] || die "--setup $SETUP_FILE: no such file"
  SETUP_FILE=$(realpath "$SETUP_FILE")
fi

# Mounts made here (and by debootstrap) live and die with this namespace, whatever happens to
# this script; the EXIT trap still unmounts them one by one.
if [[ -z ${WEFT_FRESH_MACHINE_NS:-} ]]; then
  export WEFT_FRESH_MACHINE_NS=1
  exec unshare --mount --propagation private -- bash "$0" "${ARGS[@]}"
fi

# Phase timings, printed at exit.
START=$SECONDS
PHASE=""
PHASE_START=0
TIMINGS=()
phase() {
  phase_end
  PHASE=$1
  PHASE_START=$SECONDS
  say "== $PHASE"
}
phase_end() {
  [[ -n $PHASE ]] && TIMINGS+=("$PHASE $((SECONDS - PHASE_START)) s")
  PHASE=""
}

RUNNING=""      # the timeout(1) of the command running now; it passes signals on
WORK=""         # the fresh root and the logs
ROOT=""
BUILD_DIR=""    # a cached root being built

# Processes whose root directory is $1 or below: whatever the chroot started.
procs_in() {
  local dir=$1 p root
  for p in /proc/[0-9]*; do
    root=$(readlink "$p/root" 2>/dev/null) || continue
    [[ $root == "$dir" || $root == "$dir"/* ]] && printf '%s\n' "${p#/proc/}"
  done
  return 0
}

# Mount points at or below $1, in reverse mount order.
mounts_under() {
  local dir=$1
  awk -v d="$dir" '$5 == d || index($5, d "/") == 1 { print $5 }' /proc/self/mountinfo | tac
}

# Kills what runs in $1 (by PID), unmounts everything under it, removes it. Non-zero (and the
# directory kept) if anything could not be unmounted.
teardown() {
  local - dir=$1 pid m i left
  set +e
  [[ -n $dir && -d $dir ]] || return 0
  for pid in $(procs_in "$dir"); do
    say "stopping pid $pid left in the fresh root: $(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)"
    kill -TERM "$pid" 2>/dev/null
  done
  for ((i = 0; i < 50; i++)); do
    [[ -z $(procs_in "$dir") ]] && break
    sleep 0.1
  done
  for pid in $(procs_in "$dir"); do kill -KILL "$pid" 2>/dev/null; done
  for m in $(mounts_under "$dir"); do
    umount "$m" 2>/dev/null || umount -l "$m" || say "could not unmount $m"
  done
  left=$(mounts_under "$dir")
  if [[ -n $left ]]; then
    say "still mounted, so $dir is kept: $left"
    return 1
  fi
  rm -rf --one-file-system "$dir"
}

# Stops the command run_limited is waiting for (debootstrap runs outside the root).
stop_running() {
  local i
  [[ -n $RUNNING ]] || return 0
  kill -TERM "$RUNNING" 2>/dev/null
  for ((i = 0; i < 100; i++)); do
    kill -0 "$RUNNING" 2>/dev/null || break
    sleep 0.1
  done
  # timeout(1) leads its own process group: that is the command and all its children.
  kill -KILL -- "-$RUNNING" 2>/dev/null
  wait "$RUNNING" 2>/dev/null
  RUNNING=""
}

on_exit() {
  local rc=$?
  trap - EXIT INT TERM
  set +e
  phase_end
  stop_running
  teardown "$WORK" || rc=1
  teardown "$BUILD_DIR" || rc=1
  TIMINGS+=("total $((SECONDS - START)) s")
  say "timings: $(printf '%s, ' "${TIMINGS[@]}" | sed 's/, $//')"
  if ((rc == 130 || rc == 143)); then
    say "interrupted"
  elif ((rc == 0)); then
    say "OK: deploy/setup-debian.sh sets up a fresh $SUITE root that builds the workspace"
  fi
  exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Runs `cmd...` under a time limit with its output to `log`, in the background so that a signal
# reaches the trap at once. Only the command is redirected: a trap that fires during `wait` must
# not inherit the log as its stderr.
run_limited() {
  local secs=$1 log=$2 rc=0; shift 2
  timeout -k 10 "$secs" "$@" >"$log" 2>&1 &
  RUNNING=$!
  wait "$RUNNING" || rc=$?
  RUNNING=""
  return "$rc"
}

# Runs a bash script as root in the fresh root with a clean environment; output to log $1.
in_root() {
  local log=$1 secs=$2 script=$3
  run_limited "$secs" "$log" chroot "$ROOT" /usr/bin/env -i \
    HOME=/root LANG=C.UTF-8 TERM=dumb DEBIAN_FRONTEND=noninteractive \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/opt/rust/bin \
    SSL_CERT_FILE=/opt/weft-network/ca.crt CARGO_HTTP_CAINFO=/opt/weft-network/ca.crt \
    CARGO_HOME=/root/.cargo CARGO_TERM_COLOR=never \
    /bin/bash -euo pipefail -c "$script"
}

fail_with_log() {
  local log=$1; shift
  say "FAILED: $*"
  say "last lines of $(basename "$log"):"
  tail -n 40 "$log" | sed 's/^/    /' >&2
  exit 1
}

# What stands for the network, and the source.
export PATH="$HOME/.cargo/bin:$PATH"
SYSROOT=$(rustc --print sysroot 2>/dev/null) || SYSROOT=""
[[ -n $SYSROOT && -x $SYSROOT/bin/cargo ]] ||
  die "no Rust toolchain on this machine to lend the fresh root (rustc --print sysroot)"
HOST_CA=${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}
[[ -s $HOST_CA ]] || die "no CA bundle at $HOST_CA (set SSL_CERT_FILE)"
HEAD=$(git -C "$REPO" rev-parse --verify HEAD) || die "$REPO is not a git checkout with a HEAD"
if [[ -n $(git -C "$REPO" status --porcelain --untracked-files=no) ]]; then
  say "note: uncommitted changes in $REPO are not part of this check (it builds HEAD)"
fi
if ! command -v debootstrap >/dev/null; then
  say "installing debootstrap (this check needs it before any set-up has run)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
fi

phase "minbase root"
TARBALL="$CACHE_DIR/rootfs-$ROOTFS_KEY.tar"
if [[ -f $TARBALL ]]; then
  say "cached: $TARBALL"
else
  mkdir -p "$CACHE_DIR"
  # Built beside the cache and renamed into place: a concurrent or interrupted run never leaves a
  # half-written tarball under the final name.
  BUILD_DIR=$(mktemp -d "$CACHE_DIR/build-XXXXXX")
  say "building $TARBALL with debootstrap from $MIRROR (once per machine)"
  run_limited 900 "$BUILD_DIR/debootstrap.log" \
    debootstrap --variant=minbase "$SUITE" "$BUILD_DIR/root" "$MIRROR" ||
    fail_with_log "$BUILD_DIR/debootstrap.log" "debootstrap from $MIRROR (set WEFT_DEBIAN_MIRROR to another mirror)"
  # The machine's own: a fresh machine has no downloaded packages, and lists come from set-up.
  rm -rf "$BUILD_DIR"/root/var/cache/apt/archives/*.deb "$BUILD_DIR"/root/var/lib/apt/lists/* \
    "$BUILD_DIR/root/etc/resolv.conf"
  tar --numeric-owner -C "$BUILD_DIR/root" -cf "$BUILD_DIR/rootfs.tar" .
  mv "$BUILD_DIR/rootfs.tar" "$TARBALL"
  teardown "$BUILD_DIR"
  BUILD_DIR=""
fi

phase "unpack and mount"
WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/weft-fresh.XXXXXX")
ROOT=$WORK/root
mkdir "$ROOT" "$WORK/logs"
tar --numeric-owner -xpf "$TARBALL" -C "$ROOT"
cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf"
install -D -m 0644 "$HOST_CA" "$ROOT/opt/weft-network/ca.crt"
printf 'Acquire::https::CAInfo "/opt/weft-network/ca.crt";\n' >"$ROOT/etc/apt/apt.conf.d/00weft-network"
printf '#!/bin/sh\n# fresh-machine.sh: no services in a chroot.\nexit 101\n' >"$ROOT/usr/sbin/policy-rc.d"
chmod 0755 "$ROOT/usr/sbin/policy-rc.d"
mkdir -p "$ROOT/src/weft" "$ROOT/opt/rust"
git -C "$REPO" archive --format=tar "$HEAD" | tar -x -C "$ROOT/src/weft"
if [[ -n $SETUP_FILE ]]; then
  say "set-up: $SETUP_FILE instead of HEAD's deploy/setup-debian.sh"
  install -m 0755 "$SETUP_FILE" "$ROOT/src/weft/deploy/setup-debian.sh"
fi
mount -t proc proc "$ROOT/proc"
mount -t sysfs sysfs "$ROOT/sys"
mount --bind /dev "$ROOT/dev"
mount --bind /dev/pts "$ROOT/dev/pts"
mount --bind "$SYSROOT" "$ROOT/opt/rust"
mount -o remount,bind,ro "$ROOT/opt/rust"
say "source: HEAD ${HEAD:0:12}; toolchain: $("$SYSROOT/bin/rustc" --version) (read-only)"

phase "set-up"
in_root "$WORK/logs/setup.log" 1800 "cd /src/weft && bash deploy/setup-debian.sh" ||
  fail_with_log "$WORK/logs/setup.log" "deploy/setup-debian.sh failed in a fresh $SUITE root"
grep '^setup:' "$WORK/logs/setup.log" | sed 's/^/    /' >&2 || true

# Both checks run even if the first fails, so one run names everything that is missing.
FAILED=()
phase "commands"
in_root "$WORK/logs/commands.log" 60 "for c in ${COMMANDS[*]}; do command -v \$c >/dev/null || echo \$c; done
  [ -s /etc/ssl/certs/ca-certificates.crt ] || echo /etc/ssl/certs/ca-certificates.crt" ||
  fail_with_log "$WORK/logs/commands.log" "could not run the command check in the fresh root"
missing=$(paste -sd' ' "$WORK/logs/commands.log")
if [[ -n $missing ]]; then
  say "missing after set-up: $missing"
  FAILED+=("commands the tests, demo or benchmarks use are missing after set-up: $missing")
fi

phase "build"
if in_root "$WORK/logs/build.log" 3600 "cd /src/weft && $BUILD_CMD"; then
  tail -n 1 "$WORK/logs/build.log" | sed 's/^/    /' >&2
else
  say "$BUILD_CMD failed; last lines of build.log:"
  tail -n 40 "$WORK/logs/build.log" | sed 's/^/    /' >&2
  FAILED+=("$BUILD_CMD after set-up")
fi
phase_end

if ((${#FAILED[@]})); then
  for f in "${FAILED[@]}"; do say "FAILED: $f"; done
  die "deploy/setup-debian.sh is incomplete for a fresh $SUITE machine"
fi
