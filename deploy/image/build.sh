#!/usr/bin/env bash
# Builds the tidewire image (tidewire:0.1.0) with podman, from a base image made on this machine.
#
# No container registry is needed: the base `localhost/tidewire-base:bookworm` is made with
# debootstrap from Debian's mirror (bookworm minbase + python3 3.11 + venv, `python` -> python3,
# trimmed like Debian's slim images), stands in for python:3.11-slim-bookworm, and is kept once made
# (delete it, or pass --rebuild-base, to make it again). Only pip, in the build's RUN steps, needs the
# network (PyPI); the build runs with --network host and the host's CA bundle mounted read-only, so
# pip trusts what the host trusts (nothing of it is written into the image).
#
#   deploy/image/build.sh                   make the base when missing, then build the image
#   deploy/image/build.sh --rebuild-base    make the base again first
#   deploy/image/build.sh --base-only       only make the base (when missing)
#   deploy/image/build.sh --print-run-flags the `podman run` flags this machine needs (one line)
#
# Environment: TIDEWIRE_IMAGE (tidewire:0.1.0), TIDEWIRE_BASE_IMAGE (localhost/tidewire-base:bookworm),
# DEBIAN_MIRROR / DEBIAN_SECURITY_MIRROR (default: what apt on this machine uses, else deb.debian.org).
#
# Machine quirks handled by --print-run-flags and the build (probed, not assumed): a hard open-files
# or process limit below podman's defaults (setrlimit `RLIMIT_NOFILE`: Operation not permitted) gets
# --ulimit flags within the limits; crun on a hybrid cgroup v1/v2 host ("cgroups in hybrid mode not
# supported") gets --runtime runc.
set -euo pipefail

IMAGE=${TIDEWIRE_IMAGE:-tidewire:0.1.0}
BASE_IMAGE=${TIDEWIRE_BASE_IMAGE:-localhost/tidewire-base:bookworm}
SUITE=bookworm
BASE_PACKAGES="python3 python3-venv ca-certificates netbase tzdata"
HOST_CA=/etc/ssl/certs/ca-certificates.crt
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

say() { printf 'build.sh: %s\n' "$*" >&2; }
die() { printf 'build.sh: error: %s\n' "$*" >&2; exit 1; }

mode=build
rebuild_base=0
for arg in "$@"; do
  case "$arg" in
    --rebuild-base) rebuild_base=1 ;;
    --base-only) mode=base ;;
    --print-run-flags) mode=flags ;;
    -h|--help) sed -n '2,23p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument: $arg (see --help)" ;;
  esac
done

command -v podman >/dev/null 2>&1 \
  || die "podman not found: install it with 'apt-get install -y podman' (Debian bookworm: podman 4.3, buildah 1.28; plus runc on a hybrid-cgroup host)"

# ---- the mirror apt on this machine uses ------------------------------------------------------------
apt_uri() {  # $1: a suite; prints the first URI apt uses for it (deb822 .sources or one-line lists)
  local suite=$1 f
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    awk -v s="$suite" '
      /^[[:space:]]*$/ { if (u != "" && hit) { print u; exit } u = ""; hit = 0; next }
      /^URIs:/ { u = $2 }
      /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == s) hit = 1 }
      END { if (u != "" && hit) print u }' "$f" | head -n1
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    awk -v s="$suite" '$1 == "deb" { i = 2; if ($2 ~ /^\[/) { while ($i !~ /\]$/) i++; i++ } if ($(i + 1) == s) { print $i; exit } }' "$f"
  done
}
MIRROR=${DEBIAN_MIRROR:-$(apt_uri "$SUITE" | head -n1)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-$(apt_uri "$SUITE-security" | head -n1)}
SECURITY_MIRROR=${SECURITY_MIRROR:-http://deb.debian.org/debian-security}

# ---- the local base image ---------------------------------------------------------------------------
make_base() {
  [ "$(id -u)" = 0 ] || die "making the base image needs root (debootstrap and chroot)"
  command -v debootstrap >/dev/null 2>&1 || die "debootstrap not found: apt-get install -y debootstrap"
  local work root started
  started=$(date +%s)
  work=$(mktemp -d "${TMPDIR:-/var/tmp}/tidewire-base.XXXXXX")
  root=$work/rootfs
  # shellcheck disable=SC2064  # expand now: the trap must clean this very folder
  trap "umount '$root/proc' 2>/dev/null || true; rm -rf '$work'" EXIT
  say "making $BASE_IMAGE: debootstrap --variant=minbase $SUITE from $MIRROR (log: $work/debootstrap.log)"
  if ! nice -n 10 debootstrap --variant=minbase "$SUITE" "$root" "$MIRROR" >"$work/debootstrap.log" 2>&1; then
    tail -n 20 "$work/debootstrap.log" >&2
    die "debootstrap failed (log above)"
  fi
  # Like Debian's slim images: no manuals, docs (copyrights kept) or translations, now and for later installs.
  cat >"$root/etc/dpkg/dpkg.cfg.d/tidewire-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/lintian/*
EOF
  if [ -d "$root/usr/share/doc" ]; then
    find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
    find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete
  fi
  rm -rf "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/lintian/*
  [ -d "$root/usr/share/locale" ] && find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} +
  cat >"$root/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb $SECURITY_MIRROR $SUITE-security main
EOF
  say "installing $BASE_PACKAGES in the chroot"
  mount -t proc proc "$root/proc"
  if ! DEBIAN_FRONTEND=noninteractive nice -n 10 chroot "$root" sh -c \
      "apt-get update -q && apt-get upgrade -y -q && apt-get install -y -q --no-install-recommends $BASE_PACKAGES" \
      >"$work/apt.log" 2>&1; then
    tail -n 20 "$work/apt.log" >&2
    die "apt-get in the chroot failed (log above)"
  fi
  umount "$root/proc"
  ln -sf /usr/bin/python3 "$root/usr/local/bin/python"  # the Dockerfile (like python:*-slim) calls `python`
  chroot "$root" sh -c 'apt-get clean; rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt/* /var/log/dpkg.log /var/log/bootstrap.log /tmp/* /root/.cache'
  : >"$root/etc/resolv.conf"  # podman provides its own; the host's is not part of the image
  echo tidewire >"$root/etc/hostname"
  local py
  py=$(chroot "$root" python --version 2>&1) || die "python does not run in the new root: $py"
  if podman image exists "$BASE_IMAGE"; then podman rmi "$BASE_IMAGE" >/dev/null; fi
  tar --numeric-owner -C "$root" -c . | podman import --quiet \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    --change "LABEL org.opencontainers.image.description=\"Debian $SUITE minbase + $py, made by deploy/image/build.sh\"" \
    - "$BASE_IMAGE" >/dev/null
  rm -rf "$work"
  trap - EXIT
  say "made $BASE_IMAGE ($py, $(podman image inspect --format '{{.Size}}' "$BASE_IMAGE" | awk '{printf "%.0f MB", $1 / 1e6}')) in $(($(date +%s) - started)) s"
}

ensure_base() {
  if [ "$rebuild_base" = 1 ] || ! podman image exists "$BASE_IMAGE"; then
    make_base
  else
    say "base $BASE_IMAGE exists: kept (--rebuild-base makes it again)"
  fi
}

# ---- what podman needs on this machine (probed on the base image) ----------------------------------
run_flags() {
  local nofile nproc out="" candidates c
  nofile=$(ulimit -Hn)
  nproc=$(ulimit -Hu)
  [ "$nofile" = unlimited ] && nofile=1048576
  # podman (rootful) runs its runtime with at most 32768 processes: asking for more fails.
  if [ "$nproc" = unlimited ] || [ "$nproc" -gt 32768 ]; then nproc=32768; fi
  local ul="--ulimit nofile=$nofile:$nofile --ulimit nproc=$nproc:$nproc"
  candidates=("" "$ul" "--runtime runc" "--runtime runc $ul")
  for c in "${candidates[@]}"; do
    # shellcheck disable=SC2086  # word splitting intended
    if out=$(podman run --rm $c --network host "$BASE_IMAGE" true 2>&1); then
      echo "$c"
      return 0
    fi
  done
  die "podman cannot start a container here; last error (with '${candidates[-1]}'): $out"
}

if [ "$mode" = flags ]; then
  podman image exists "$BASE_IMAGE" || die "$BASE_IMAGE does not exist yet: run deploy/image/build.sh first"
  run_flags
  exit 0
fi

ensure_base
[ "$mode" = base ] && exit 0

flags=$(run_flags)
say "podman flags for this machine: ${flags:-(none)}"
volumes=()
if [ -r "$HOST_CA" ]; then volumes=(-v "$HOST_CA:/etc/ssl/certs/ca-certificates.crt:ro"); fi

log=$(mktemp "${TMPDIR:-/tmp}/tidewire-image-build.XXXXXX.log")
say "building $IMAGE from $REPO_ROOT (FROM $BASE_IMAGE; log: $log)"
started=$(date +%s)
previous=$(podman image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)
# shellcheck disable=SC2086  # $flags: word splitting intended
if ! nice -n 10 podman build $flags --network host "${volumes[@]}" \
    --build-arg "PYTHON_IMAGE=$BASE_IMAGE" -t "$IMAGE" "$REPO_ROOT" >"$log" 2>&1; then
  tail -n 30 "$log" >&2
  die "podman build failed (log above, whole log in $log)"
fi
rm -f "$log"
current=$(podman image inspect --format '{{.Id}}' "$IMAGE")
if [ -n "$previous" ] && [ "$previous" != "$current" ]; then  # the image this build replaced, now untagged
  podman rmi "$previous" >/dev/null 2>&1 && say "removed the previous $IMAGE (${previous:0:12})" || true
fi
size=$(podman image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1 / 1e6}')
say "built $IMAGE ($size) in $(($(date +%s) - started)) s"
say "run it: podman run --rm --network host $flags -e TIDEWIRE_NATS_URL=... $IMAGE [python -m orchestrator|tool_workers]"
