#!/usr/bin/env bash
# Builds agentbox's default image, agentbox/base:bookworm, on a machine that reaches no container
# registry: debootstrap makes a Debian bookworm rootfs from the Debian package mirror, and the engine
# imports it as an image. Where a registry is reachable, `docker build -f images/base.Dockerfile .`
# gives an equivalent image.
#
#   images/build-base.sh            build the image unless it already exists
#   images/build-base.sh --force    rebuild it
#
# Needs root (debootstrap), debootstrap itself and a Docker engine.
set -euo pipefail

tag="${AGENTBOX_BASE_IMAGE:-agentbox/base:bookworm}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
packages="git,ca-certificates,coreutils,bash,procps,less"

if [[ "${1:-}" != "--force" ]] && docker image inspect "$tag" >/dev/null 2>&1; then
  echo "image $tag already exists (use --force to rebuild)" >&2
  exit 0
fi

if ! command -v debootstrap >/dev/null 2>&1; then
  echo "debootstrap is missing; installing it" >&2
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/agentbox-rootfs.XXXXXX")"
trap 'rm -rf "$work"' EXIT
rootfs="$work/rootfs"

echo "building $tag: debootstrap bookworm into $rootfs" >&2
debootstrap --variant=minbase --include="$packages" bookworm "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 || {
  tail -n 30 "$work/debootstrap.log" >&2
  echo "debootstrap failed; the full log was $work/debootstrap.log" >&2
  exit 1
}

# Trim what a task container never needs: package caches, docs, manuals, locales.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
  "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/*
find "$rootfs"/usr/share/locale -mindepth 1 -maxdepth 1 ! -name 'C.*' -exec rm -rf {} + 2>/dev/null || true

echo "importing $rootfs as $tag" >&2
tar --numeric-owner -C "$rootfs" -c . | docker import \
  --change 'CMD ["/bin/bash"]' \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'LABEL org.opencontainers.image.title=agentbox-base' \
  - "$tag" >/dev/null
echo "built $tag" >&2
