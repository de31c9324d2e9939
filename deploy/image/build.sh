#!/usr/bin/env bash
# Builds weft's container image with no registry access: FROM scratch, holding the release
# binaries (weftd, weftctl, weft-cni), exactly the shared libraries they load (found with ldd
# here, copied to the paths ldd names, dynamic loader included), Debian's
# iptables-restore/iptables-save (the variant this machine's alternatives select, resolved to its
# multi-call binary) with the xtables modules and their libraries, and a minimal nsswitch.conf.
#
# Why not fully static: the musl target is not installable here, and a static glibc cannot load
# NSS modules, so etcd endpoint names would stop resolving. Dynamic binaries plus their libraries
# keep glibc's resolver (its files and dns sources are built into libc.so.6 since glibc 2.34).
#
# No CA certificates: weft's etcd client trusts only the CA file it is given
# (FLANNELD_ETCD_CAFILE, from the Secret); it never reads the system store.
#
# Usage: deploy/image/build.sh [--docker-host URI] [--tag NAME] [--bin-dir DIR] [--keep-context DIR]
#   --docker-host   dockerd to build with (default: $DOCKER_HOST, else the CLI's default)
#   --tag           image name (default: weft:<version from Cargo.toml>)
#   --bin-dir       take the binaries from DIR instead of running `cargo build --release`
#   --keep-context  also copy the build context to DIR (to inspect what went in)
# Environment: DOCKER (the docker CLI, default `docker`).
# Prints the image's size last: `image NAME: N bytes (M MiB)`.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
docker_cli=${DOCKER:-docker}
docker_host=${DOCKER_HOST:-}
tag=""
bin_dir=""
keep=""

while (($#)); do
  case "$1" in
    --docker-host) docker_host=$2; shift 2 ;;
    --tag) tag=$2; shift 2 ;;
    --bin-dir) bin_dir=$2; shift 2 ;;
    --keep-context) keep=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "build.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

die() { echo "build.sh: $*" >&2; exit 1; }

if [[ -z $tag ]]; then
  version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$repo/Cargo.toml" | head -n1)
  tag="weft:${version:-dev}"
fi

if [[ -z $bin_dir ]]; then
  (cd "$repo" && cargo build --release --locked -p weft)
  bin_dir="${CARGO_TARGET_DIR:-$repo/target}/release"
fi

ctx=$(mktemp -d "${TMPDIR:-/tmp}/weft-image.XXXXXX")
trap 'rm -rf "$ctx"' EXIT
root="$ctx/rootfs"
mkdir -p "$root/usr/bin" "$root/usr/sbin" "$root/etc"

# ELF files whose libraries must come along.
elves=()

for b in weftd weftctl weft-cni; do
  src="$bin_dir/$b"
  [[ -x $src ]] || die "no $src (build it, or pass --bin-dir)"
  cp "$src" "$root/usr/bin/$b"
  # Debug builds carry ~100 MB of DWARF each; release builds have none. Symbols stay, for
  # readable panics.
  if command -v strip >/dev/null; then strip --strip-debug "$root/usr/bin/$b"; fi
  elves+=("$root/usr/bin/$b")
done

# iptables: weftd runs `iptables-save` and `iptables-restore` from PATH. Take the binary this
# machine's alternatives point at (bookworm: xtables-nft-multi) and name both commands after it;
# the multi-call binary picks its mode from argv[0].
multi=""
for cmd in iptables-restore iptables-save; do
  path=$(command -v "$cmd" || PATH=/usr/sbin:/sbin:$PATH command -v "$cmd") || die "no $cmd (apt-get install iptables)"
  real=$(readlink -f "$path")
  [[ -z $multi || $multi == "$real" ]] || die "$cmd resolves to $real, not $multi"
  multi=$real
done
cp "$multi" "$root/usr/sbin/"
for cmd in iptables iptables-restore iptables-save; do
  ln -sf "$(basename "$multi")" "$root/usr/sbin/$cmd"
done
elves+=("$multi")

# The xtables modules (libxt_*.so) are loaded with dlopen from libxtables' compiled-in directory,
# which ldd cannot see. All of them: iptables-save must print every rule of the tables weftd
# reads, the host's other agents' (kube-proxy, Docker) included, or weftd's comparison breaks.
libxtables=$(ldd "$multi" | awk '$1 ~ /^libxtables\.so/ {print $3}')
[[ -n $libxtables ]] || die "$multi does not link libxtables"
xtdir="$(dirname "$(readlink -f "$libxtables")")/xtables"
[[ -d $xtdir ]] || die "no xtables module directory $xtdir"
mkdir -p "$root$xtdir"
cp -a "$xtdir/." "$root$xtdir/"
for m in "$xtdir"/*.so; do
  [[ -L $m ]] || elves+=("$m")
done

# Shared libraries and the dynamic loader, each at the path ldd names (a symlink's target copied
# as a file there), so the loader's default search finds them without an ld.so.cache.
declare -A libs=()
for e in "${elves[@]}"; do
  out=$(ldd "$e" 2>&1) || die "ldd $e: $out"
  if grep -q "not found" <<<"$out"; then die "ldd $e: $out"; fi
  while read -r lib; do
    libs[$lib]=1
  done < <(awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' <<<"$out")
done
for lib in "${!libs[@]}"; do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done

# glibc reads nsswitch.conf for names (etcd endpoints may be host names) and for protocol and
# service names (iptables falls back to its built-in table when /etc/protocols is absent).
cat >"$root/etc/nsswitch.conf" <<'EOF'
hosts: files dns
networks: files
protocols: files
services: files
EOF

cp "$here/Dockerfile" "$ctx/Dockerfile"
if [[ -n $keep ]]; then
  mkdir -p "$keep"
  cp -a "$ctx/." "$keep/"
fi

host_args=()
[[ -n $docker_host ]] && host_args=(-H "$docker_host")
"$docker_cli" "${host_args[@]}" build -q -t "$tag" "$ctx" >/dev/null
size=$("$docker_cli" "${host_args[@]}" image inspect -f '{{.Size}}' "$tag")
echo "image $tag: $size bytes ($((size / 1024 / 1024)) MiB)"
