#!/usr/bin/env bash
# Builds agentbox-test/tools:latest, the image the integration tests use for servers (ports,
# sidecar services): agentbox's default image plus a static busybox (httpd, nc, wget). No registry
# is needed: the base is built locally by images/build-base.sh, busybox comes from Debian's
# busybox-static package.
#
#   images/test/build.sh            build the image unless it already exists (then exit 0 at once)
#   images/test/build.sh --force    rebuild it
#
# Like images/build-base.sh: checks first that the Docker engine answers, and one build runs at a time
# (a second one waits and then finds the image there). AGENTBOX_BASE_IMAGE replaces the base's name,
# AGENTBOX_TOOLS_IMAGE this image's.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# docker_check, as_root_setup, lock_builds, log and die (`shellcheck -x` follows this source).
# shellcheck source-path=SCRIPTDIR source=../build-base.sh
source "$here/../build-base.sh"
prog=images/test/build.sh

tag="${AGENTBOX_TOOLS_IMAGE:-agentbox-test/tools:latest}"
base="${AGENTBOX_BASE_IMAGE:-agentbox/base:bookworm}"
force=false
case "${1:-}" in
  "") ;;
  --force) force=true ;;
  *) die "unknown argument $1" "usage: $prog [--force]" ;;
esac

docker_check
old_id="$(docker image inspect -f '{{.Id}}' "$tag" 2>/dev/null || true)"
if [[ -n "$old_id" ]] && ! $force; then
  exit 0
fi

# Its own lock, not build-base's: build-base.sh, run below, takes that one.
lock_builds agentbox-build-test-tools
# Another run may have built the image while this one waited: then there is nothing left to do.
now_id="$(docker image inspect -f '{{.Id}}' "$tag" 2>/dev/null || true)"
if [[ -n "$now_id" && "$now_id" != "$old_id" ]]; then
  log "image $tag was built by another run while this one waited"
  exit 0
fi

docker image inspect "$base" >/dev/null 2>&1 || bash "$here/../build-base.sh"
if ! [ -x /bin/busybox ]; then
  as_root_setup "installing busybox-static"
  "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq </dev/null
  "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq busybox-static </dev/null >/dev/null
fi
context="$(mktemp -d "${TMPDIR:-/tmp}/agentbox-test-image.XXXXXX")"
trap 'rm -rf "$context"; flock -u "$lock_fd"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
cp /bin/busybox "$context/busybox"
cat >"$context/Dockerfile" <<DOCKERFILE
FROM $base
COPY busybox /usr/local/bin/busybox
DOCKERFILE
docker build -q -t "$tag" "$context" >/dev/null
# A rebuild would leave the previous image behind, nameless.
new_id="$(docker image inspect -f '{{.Id}}' "$tag")"
if [[ -n "$old_id" && "$old_id" != "$new_id" ]] && ! docker image rm "$old_id" >/dev/null 2>&1; then
  log "the previous $tag (${old_id#sha256:}) is still in use (a container or another name); left in place"
fi
log "built $tag"
