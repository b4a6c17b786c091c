#!/usr/bin/env bash
# Builds agentbox-test/tools:latest, the image the integration tests use for servers (ports,
# sidecar services): agentbox's default image plus a static busybox (httpd, nc, wget). No registry
# is needed: the base is built locally by images/build-base.sh, busybox comes from Debian's
# busybox-static package.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
tag="agentbox-test/tools:latest"
base="${AGENTBOX_BASE_IMAGE:-agentbox/base:bookworm}"

if [[ "${1:-}" != "--force" ]] && docker image inspect "$tag" >/dev/null 2>&1; then
  exit 0
fi
docker image inspect "$base" >/dev/null 2>&1 || "$here/../build-base.sh"
if ! [ -x /bin/busybox ]; then
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq busybox-static >/dev/null
fi
context="$(mktemp -d "${TMPDIR:-/tmp}/agentbox-test-image.XXXXXX")"
trap 'rm -rf "$context"' EXIT
cp /bin/busybox "$context/busybox"
cat >"$context/Dockerfile" <<DOCKERFILE
FROM $base
COPY busybox /usr/local/bin/busybox
DOCKERFILE
docker build -q -t "$tag" "$context" >/dev/null
echo "built $tag" >&2
