#!/usr/bin/env bash
# Build the services' container image (deploy/docker/Dockerfile) with Docker where it works,
# else with buildah; `make image` runs `deploy/docker/image.sh build`.
# Run `deploy/docker/image.sh --help` for the interface.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly SCRIPT_DIR
ROOT=$(cd "$SCRIPT_DIR/../.." && pwd)
readonly ROOT
PROG=image.sh

# The local stand-in for python:3.11-slim on machines without a registry: Debian bookworm
# with Debian's own python3.11 (same minor version, same glibc generation as the slim image).
readonly BASE_SUITE=bookworm
readonly BASE_NAME=localhost/field-alerts-base:bookworm-python3.11
# python3.11-venv (ensurepip, for the Dockerfile's `python -m venv`) depends on the virtual
# python3.11-distutils, which debootstrap cannot resolve: name its provider and that one's deps.
readonly BASE_PACKAGES=python3.11,python3.11-venv,python3-distutils,python3-lib2to3,python3,ca-certificates

usage() {
  cat <<EOF
Usage: deploy/docker/image.sh COMMAND

Commands:
  build       build deploy/docker/Dockerfile as \$IMAGE_NAME: with Docker when 'docker info'
              answers, else with buildah (chroot isolation: no daemon, no registry). With buildah and no IMAGE_PYTHON_BASE, the base image is made
              locally first (see 'base'), since no registry may be reachable.
  base        make the local base image ${BASE_NAME} in buildah's storage
              if it is missing: debootstrap of Debian ${BASE_SUITE} (minbase) with
              ${BASE_PACKAGES//,/ }, from the host's Debian mirror.
              Needs root and debootstrap. --refresh rebuilds it.
  tools       make sure 'build' can run (for 'make test'): without a working Docker or
              buildah, install buildah and debootstrap with apt-get when root; else say
              why the image tests will skip. Never fails.
  engine      print the engine 'build' would use (docker or buildah), or fail saying why
              neither works (exit 3: none is installed or usable; 1: a bad setting)
  env         print 'export NAME=value' lines: IMAGE_ENGINE, IMAGE_NAME and, for buildah,
              IMAGE_BUILDAH_ROOT, IMAGE_BUILDAH_RUNROOT and IMAGE_BUILDAH_DRIVER (what
              'buildah --root R --runroot RR --storage-driver D run' needs)
  -h, --help  this text

Environment (all optional):
  IMAGE_NAME          tag of the built image (default field-alerts:dev)
  IMAGE_ENGINE        docker or buildah (default: docker if 'docker info' works, else buildah)
  IMAGE_PYTHON_BASE   base image passed as the Dockerfile's PYTHON_IMAGE build argument
                      (default: the Dockerfile's python:3.11-slim with Docker, the local
                      ${BASE_NAME} with buildah)
  IMAGE_CACHE_DIR     buildah's storage and run dirs (default
                      \${XDG_CACHE_HOME:-\$HOME/.cache}/field-alerts/image), shared by every
                      clone of the user so a second build reuses the base and the layers
  IMAGE_STORAGE_DRIVER buildah's storage driver: overlay (default where root can mount an
                      overlay) or vfs
  IMAGE_DEBIAN_MIRROR mirror for debootstrap (default: the host's first deb.debian.org-style
                      entry, else http://deb.debian.org/debian)
EOF
}

say() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() {
  say "error: $*"
  exit 1
}

IMAGE_NAME=${IMAGE_NAME:-field-alerts:dev}

cache_dir() {
  if [[ -n ${IMAGE_CACHE_DIR:-} ]]; then
    printf '%s\n' "$IMAGE_CACHE_DIR"
    return
  fi
  local base=${XDG_CACHE_HOME:-}
  if [[ $base != /* ]]; then
    [[ -n ${HOME:-} ]] || die "neither XDG_CACHE_HOME nor HOME is set; set IMAGE_CACHE_DIR"
    base=$HOME/.cache
  fi
  printf '%s/field-alerts/image\n' "${base%/}"
}

CACHE_DIR=$(cache_dir)
readonly CACHE_DIR

# Can this process mount a kernel overlay in the cache dir? (Needs root, and a filesystem
# the kernel accepts as an overlay upper dir: not inside most unprivileged containers.)
overlay_works() {
  [[ $(id -u) == 0 ]] && grep -qw overlay /proc/filesystems || return 1
  mkdir -p "$CACHE_DIR"
  local t rc=0
  t=$(mktemp -d "$CACHE_DIR/overlay-probe.XXXXXX")
  mkdir "$t/l" "$t/u" "$t/w" "$t/m"
  if mount -t overlay overlay -o "lowerdir=$t/l,upperdir=$t/u,workdir=$t/w" "$t/m" 2>/dev/null; then
    umount "$t/m"
  else
    rc=1
  fi
  rm -rf -- "$t"
  return $rc
}

# overlay where it mounts: a layer costs its changes only. vfs elsewhere: works on any
# filesystem without privileges, but every step of a build copies the whole root filesystem,
# which makes even a fully cached build take minutes on a slow disk.
storage_driver() {
  case ${IMAGE_STORAGE_DRIVER:-} in
    overlay | vfs) printf '%s\n' "$IMAGE_STORAGE_DRIVER" ;;
    '') if overlay_works; then echo overlay; else echo vfs; fi ;;
    *) die "IMAGE_STORAGE_DRIVER must be overlay or vfs, not '$IMAGE_STORAGE_DRIVER'" ;;
  esac
}

DRIVER=
BUILDAH=()
init_buildah() { # sets DRIVER and BUILDAH (the probe mounts: only when buildah is used)
  [[ -z $DRIVER ]] || return 0
  DRIVER=$(storage_driver)
  # One storage per driver: containers/storage refuses a root made by another driver.
  BUILDAH=(buildah --root "$CACHE_DIR/storage-$DRIVER" --runroot "$CACHE_DIR/run-$DRIVER"
    --storage-driver "$DRIVER")
}

docker_works() { command -v docker >/dev/null && docker info >/dev/null 2>&1; }

engine() {
  case ${IMAGE_ENGINE:-} in
    docker | buildah)
      printf '%s\n' "$IMAGE_ENGINE"
      return
      ;;
    '') ;;
    *) die "IMAGE_ENGINE must be docker or buildah, not '$IMAGE_ENGINE'" ;;
  esac
  if docker_works; then
    echo docker
  elif command -v buildah >/dev/null; then
    echo buildah
  elif command -v docker >/dev/null; then
    say "error: 'docker info' fails (is the daemon running, may this user use it?) and" \
      "buildah is not installed"
    exit 3
  else
    say "error: neither docker nor buildah is installed (Debian/Ubuntu: apt-get install buildah)"
    exit 3
  fi
}

mirror() {
  if [[ -n ${IMAGE_DEBIAN_MIRROR:-} ]]; then
    printf '%s\n' "$IMAGE_DEBIAN_MIRROR"
    return
  fi
  # The host's own mirror (deb822 or one-line sources), which is reachable where the host's
  # apt works; the security and updates suites live elsewhere, so skip them.
  local m
  m=$(grep -rhoE '(URIs:|^deb)[[:space:]]+https?://[^[:space:]]+/debian/?([[:space:]]|$)' \
    /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null |
    awk '{print $2; exit}' || true)
  printf '%s\n' "${m:-http://deb.debian.org/debian}"
}

# Remove a debootstrap work dir: a failed debootstrap can leave /proc or /sys mounted in it,
# so unmount what is there first and never cross into another filesystem.
remove_work() {
  local work=$1 m
  [[ -e $work ]] || return 0
  while read -r m; do
    umount -l -- "$m" 2>/dev/null || true
  done < <(awk -v w="$work/" 'index($2, w) == 1 {print $2}' /proc/self/mounts | sort -r)
  rm -rf --one-file-system -- "$work"
}

base_exists() { "${BUILDAH[@]}" inspect --type image "$BASE_NAME" >/dev/null 2>&1; }

commit_base() { # commit_base CONTAINER ROOTFS: the root filesystem as $BASE_NAME
  local ctr=$1 rootfs=$2 mnt
  mnt=$("${BUILDAH[@]}" mount "$ctr") &&
    tar -C "$rootfs" -cf - . | tar -C "$mnt" -xpf - &&
    "${BUILDAH[@]}" umount "$ctr" >/dev/null &&
    "${BUILDAH[@]}" config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
      --env LANG=C.UTF-8 --cmd '["python"]' "$ctr" &&
    "${BUILDAH[@]}" commit --quiet --rm "$ctr" "$BASE_NAME" >/dev/null
}

make_base() {
  local refresh=${1:-}
  init_buildah
  mkdir -p "$CACHE_DIR"
  # One builder at a time per cache dir: two clones running `make image` at once would
  # otherwise both debootstrap.
  exec 9>"$CACHE_DIR/base.lock"
  flock 9
  if [[ $refresh != --refresh ]] && base_exists; then
    return 0
  fi
  [[ $(id -u) == 0 ]] || die "making the base needs root (debootstrap); or set IMAGE_PYTHON_BASE"
  command -v debootstrap >/dev/null ||
    die "making the base needs debootstrap (apt-get install debootstrap); or set IMAGE_PYTHON_BASE"
  local work=$CACHE_DIR/base.work rootfs started=$SECONDS
  remove_work "$work"
  mkdir -p -- "$work"
  rootfs=$work/rootfs
  say "debootstrap ${BASE_SUITE} (minbase + ${BASE_PACKAGES}) from $(mirror)"
  if ! debootstrap --variant=minbase --include="$BASE_PACKAGES" \
    "$BASE_SUITE" "$rootfs" "$(mirror)" >"$work/debootstrap.log" 2>&1; then
    tail -n 30 "$work/debootstrap.log" >&2
    die "debootstrap failed (log: $work/debootstrap.log)"
  fi
  # What a slim image leaves out: package caches and indexes, documentation; and the host's
  # resolv.conf and hostname that debootstrap copies in (a runtime provides its own). The
  # Dockerfile calls `python`, as in the python:3.11-slim image.
  rm -rf -- "$rootfs"/var/cache/apt/* "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/*.log \
    "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
    "$rootfs"/etc/resolv.conf "$rootfs"/etc/hostname
  ln -sf /usr/bin/python3.11 "$rootfs/usr/local/bin/python"
  # Trust what the host trusts: where a TLS-inspecting proxy sits between this machine and
  # PyPI, its CA is in the host's bundle only, and the build's pip step would be refused.
  # The base is made on this machine for this machine; a registry base is not touched.
  if [[ -s /etc/ssl/certs/ca-certificates.crt ]]; then
    cp -- /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
  fi
  local ctr
  ctr=$("${BUILDAH[@]}" from scratch)
  if ! commit_base "$ctr" "$rootfs"; then
    "${BUILDAH[@]}" rm "$ctr" >/dev/null 2>&1 || true
    die "importing the debootstrapped root filesystem into buildah failed"
  fi
  remove_work "$work"
  say "made $BASE_NAME in $((SECONDS - started)) s"
}

build() {
  local eng started=$SECONDS
  eng=$(engine)
  cd "$ROOT"
  case $eng in
    docker)
      # BuildKit reads deploy/docker/Dockerfile.dockerignore by itself.
      local args=()
      [[ -z ${IMAGE_PYTHON_BASE:-} ]] || args+=(--build-arg "PYTHON_IMAGE=$IMAGE_PYTHON_BASE")
      DOCKER_BUILDKIT=1 docker build -f deploy/docker/Dockerfile "${args[@]}" -t "$IMAGE_NAME" .
      ;;
    buildah)
      init_buildah
      local base=${IMAGE_PYTHON_BASE:-}
      if [[ -z $base ]]; then
        make_base
        base=$BASE_NAME
      fi
      mkdir -p "$CACHE_DIR"
      # --layers: reuse the dependency layer while pyproject.toml and constraints.txt are
      # unchanged (buildah's default builds every step again). --pull=missing: use the base
      # from the local storage, fetch only a base that is not there (IMAGE_PYTHON_BASE).
      # chroot isolation: no runtime, no network namespace (the pip step reaches PyPI
      # through the host's network), works inside containers and VMs alike.
      "${BUILDAH[@]}" bud --isolation chroot --layers --pull=missing \
        --ignorefile deploy/docker/Dockerfile.dockerignore \
        --build-arg "PYTHON_IMAGE=$base" \
        -f deploy/docker/Dockerfile -t "$IMAGE_NAME" .
      ;;
  esac
  say "built $IMAGE_NAME with $eng in $((SECONDS - started)) s"
}

tools() {
  if docker_works || { command -v buildah >/dev/null && command -v debootstrap >/dev/null; }; then
    return 0
  fi
  if [[ -n ${IMAGE_PYTHON_BASE:-} ]] && command -v buildah >/dev/null; then
    return 0
  fi
  local missing=()
  command -v buildah >/dev/null || missing+=(buildah)
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  if [[ $(id -u) != 0 ]] || ! command -v apt-get >/dev/null; then
    say "the image tests will skip: no working docker, and ${missing[*]} missing;" \
      "installing needs root and apt-get (apt-get install ${missing[*]})"
    return 0
  fi
  say "installing ${missing[*]} for the image tests (apt-get)"
  # A stale or missing package index is common on fresh machines: refresh it first.
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    --no-install-recommends "${missing[@]}"; } >&2; then
    say "the image tests will skip: apt-get install ${missing[*]} failed"
  fi
  return 0
}

print_env() {
  local eng
  eng=$(engine)
  printf 'export IMAGE_ENGINE=%q\n' "$eng"
  printf 'export IMAGE_NAME=%q\n' "$IMAGE_NAME"
  if [[ $eng == buildah ]]; then
    init_buildah
    printf 'export IMAGE_BUILDAH_ROOT=%q\n' "$CACHE_DIR/storage-$DRIVER"
    printf 'export IMAGE_BUILDAH_RUNROOT=%q\n' "$CACHE_DIR/run-$DRIVER"
    printf 'export IMAGE_BUILDAH_DRIVER=%q\n' "$DRIVER"
  fi
}

main() {
  case ${1:-} in
    build) build ;;
    base) make_base "${2:-}" ;;
    tools) tools ;;
    engine) engine ;;
    env) print_env ;;
    -h | --help | help) usage ;;
    '')
      usage >&2
      exit 2
      ;;
    *) die "unknown command '$1' (see --help)" ;;
  esac
}

main "$@"
