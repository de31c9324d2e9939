#!/usr/bin/env bash
# Installs weft on this host as root: weftd and weftctl, weftd.service, the docker.service drop-in,
# /etc/sysconfig/weftd (only if absent; mode 0600, and an existing one is made 0600 too) and the
# examples; enables weftd.service.
#
#   sudo deploy/install.sh [--bin-dir DIR] [--prefix DIR] [--now] [--no-enable]
#   sudo deploy/install.sh --uninstall [--purge] [--prefix DIR]
#
#   --bin-dir DIR  where weftd and weftctl are (default: target/release, built with cargo if absent)
#   --prefix DIR   install prefix for binaries and examples (default /usr/local)
#   --now          also start weftd now (Docker is not restarted: do that once weftd is active)
#   --no-enable    install only, do not enable
#   --uninstall    stop and disable weftd; remove every file this script installed and any
#                  weftd.service.d drop-ins; keep /etc/sysconfig/weftd (unless --purge),
#                  subnet.env and daemon.json (Docker keeps its bip until daemon.json changes)
# Works without a running systemd too (in an image build): units are enabled offline.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PREFIX=/usr/local
BIN_DIR=""
NOW=0
ENABLE=1
UNINSTALL=0
PURGE=0
UNIT_DIR=/etc/systemd/system
DROPIN_DIR=$UNIT_DIR/docker.service.d
SYSCONFIG=/etc/sysconfig/weftd

usage() {
  sed -n '2,16s/^# \{0,1\}//p' "$0"
  exit "${1:-0}"
}

while (($#)); do
  case $1 in
    --bin-dir) BIN_DIR=${2:?--bin-dir needs a value}; shift 2 ;;
    --bin-dir=*) BIN_DIR=${1#*=}; shift ;;
    --prefix) PREFIX=${2:?--prefix needs a value}; shift 2 ;;
    --prefix=*) PREFIX=${1#*=}; shift ;;
    --now) NOW=1; shift ;;
    --no-enable) ENABLE=0; shift ;;
    --uninstall) UNINSTALL=1; shift ;;
    --purge) PURGE=1; shift ;;
    -h|--help) usage 0 ;;
    *) echo "install.sh: unknown argument $1" >&2; usage 2 >&2 ;;
  esac
done

if [ "$(id -u)" != 0 ]; then
  echo "install.sh: run as root" >&2
  exit 1
fi

# systemctl talks to a running systemd only when there is one; enable/disable work offline.
systemd_running() { [ -d /run/systemd/system ]; }

say() { echo "install.sh: $*"; }

uninstall() {
  if systemd_running; then
    systemctl disable --now weftd.service 2>/dev/null || true
  else
    systemctl disable weftd.service 2>/dev/null || true
  fi
  # weftd.service.d: drop-ins for a unit that no longer exists go with it.
  rm -rf "$UNIT_DIR/weftd.service" "$UNIT_DIR/weftd.service.d" "$DROPIN_DIR/10-weft.conf"
  rmdir "$DROPIN_DIR" 2>/dev/null || true
  rm -f "$PREFIX/bin/weftd" "$PREFIX/bin/weftctl" /run/flannel/docker
  rm -rf "$PREFIX/share/weft"
  if ((PURGE)); then
    rm -f "$SYSCONFIG"
  fi
  if systemd_running; then
    systemctl daemon-reload
    systemctl reset-failed weftd.service 2>/dev/null || true
  fi
  say "removed weftd.service, the docker.service drop-in and the binaries"
  if [ -e "$SYSCONFIG" ]; then
    say "kept $SYSCONFIG (--purge removes it)"
  fi
}

install_files() {
  if [ -z "$BIN_DIR" ]; then
    BIN_DIR=$REPO/target/release
    if [ ! -x "$BIN_DIR/weftd" ] || [ ! -x "$BIN_DIR/weftctl" ]; then
      command -v cargo >/dev/null 2>&1 || {
        echo "install.sh: no $BIN_DIR/weftd and no cargo: build first or pass --bin-dir" >&2
        exit 1
      }
      say "building release binaries"
      (cd "$REPO" && cargo build --release --locked --bins)
    fi
  fi
  for b in weftd weftctl; do
    [ -x "$BIN_DIR/$b" ] || { echo "install.sh: $BIN_DIR/$b is missing" >&2; exit 1; }
  done

  install -d -m 0755 "$PREFIX/bin" "$UNIT_DIR" "$DROPIN_DIR" /etc/sysconfig /etc/docker
  install -m 0755 "$BIN_DIR/weftd" "$PREFIX/bin/weftd"
  install -m 0755 "$BIN_DIR/weftctl" "$PREFIX/bin/weftctl"
  # The units name /usr/local/bin; another prefix is written into the installed copies.
  sed "s|/usr/local/|$PREFIX/|g" "$REPO/deploy/systemd/weftd.service" >"$UNIT_DIR/weftd.service"
  sed "s|/usr/local/|$PREFIX/|g" "$REPO/deploy/docker/10-weft.conf" >"$DROPIN_DIR/10-weft.conf"
  chmod 0644 "$UNIT_DIR/weftd.service" "$DROPIN_DIR/10-weft.conf"
  # $SYSCONFIG is where FLANNELD_ETCD_PASSWORD would go, so only its owner (root; systemd reads
  # EnvironmentFile= as root) may read it: a new one is created 0600, and an existing one that
  # group or others can read is tightened to 0600 whatever it holds now, since an editor keeps
  # the mode when a password is added later. Its owner and content stay as they are.
  if [ ! -e "$SYSCONFIG" ]; then
    install -m 0600 "$REPO/config/sysconfig/weftd" "$SYSCONFIG"
    say "installed $SYSCONFIG: point FLANNELD_ETCD_ENDPOINTS at your etcd"
  else
    mode=$(stat -L -c %a "$SYSCONFIG")
    chmod go= "$SYSCONFIG"
    if [ "$(stat -L -c %a "$SYSCONFIG")" != "$mode" ]; then
      say "made $SYSCONFIG readable by its owner only (was $mode): it may hold the etcd password"
    fi
  fi
  rm -rf "$PREFIX/share/weft/examples"
  install -d -m 0755 "$PREFIX/share/weft"
  cp -R "$REPO/config" "$PREFIX/share/weft/examples"

  if systemd_running; then
    systemctl daemon-reload
  fi
  if ((ENABLE)); then
    systemctl enable weftd.service
  fi
  if ((NOW)) && systemd_running; then
    systemctl start weftd.service
    say "weftd is active; restart Docker once to take the new bip: systemctl restart docker"
  fi
  say "installed weftd and weftctl in $PREFIX/bin, $UNIT_DIR/weftd.service, $DROPIN_DIR/10-weft.conf"
}

if ((UNINSTALL)); then
  uninstall
else
  install_files
fi
