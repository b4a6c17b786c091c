#!/usr/bin/env bash
# Builds agentbox/devcontainer:latest, the image of devcontainer/devcontainer.json: agentbox's default
# image plus the agentbox binary.
#
#   devcontainer/build.sh                   build the release binary (cargo) and the image
#   devcontainer/build.sh --bin PATH        use that binary instead
#   devcontainer/build.sh --tag NAME        name the image otherwise
#   devcontainer/build.sh --label K=V       label the image (the tests remove theirs by label)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
tag=agentbox/devcontainer:latest
bin=""
labels=()
while (($#)); do
  case "$1" in
    --bin) bin="${2:?--bin needs a path}"; shift 2 ;;
    --tag) tag="${2:?--tag needs a name}"; shift 2 ;;
    --label) labels+=(--label "${2:?--label needs K=V}"); shift 2 ;;
    *) echo "devcontainer/build.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
base="${AGENTBOX_BASE_IMAGE:-agentbox/base:bookworm}"
docker image inspect "$base" >/dev/null 2>&1 || bash "$root/images/build-base.sh"
if [[ -z "$bin" ]]; then
  (cd "$root" && cargo build --release --locked --bin agentbox)
  bin="${CARGO_TARGET_DIR:-$root/target}/release/agentbox"
fi
[[ -x "$bin" ]] || { echo "devcontainer/build.sh: $bin is not an executable" >&2; exit 1; }
context="$(mktemp -d "${TMPDIR:-/tmp}/agentbox-devcontainer.XXXXXX")"
trap 'rm -rf "$context"' EXIT
cp "$here/Dockerfile" "$context/Dockerfile"
cp "$bin" "$context/agentbox"
docker build -q --build-arg "BASE=$base" "${labels[@]}" -t "$tag" "$context" >/dev/null
echo "$tag"
