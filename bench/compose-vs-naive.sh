#!/usr/bin/env bash
# Benchmark: a devcontainer.json compose task (an app service and a database-like service with a
# healthcheck, a named volume, `network_mode: service:db`) against the same containers started by
# hand with `docker run`s.
#
#   bench/compose-vs-naive.sh [-n N]
#
# Two sides, in one run, alternating (C H C H ...), N iterations (default 8) after one untimed warm-up
# of each:
#   C  agentbox run <task> -- true, in a repository whose .devcontainer/ holds the compose form
#   H  the same by hand:
#        docker network create <net>; docker volume create <vol>
#        docker run -d --network <net> -v <vol>:/data --health-cmd 'test -s /data/state' ... db
#        until docker inspect says healthy: sleep 0.1
#        git worktree add -b agentbox/<task> <wt> HEAD
#        docker run --rm --network container:<db> -u uid:gid -v <wt>:<wt> -v <common dir>:<common dir>
#          (config, hooks read-only) -v <wt>:/workspaces/<task> -w /workspaces/<task> IMAGE true
#        docker rm -f <db>; docker volume rm <vol>; docker network rm <net>; git worktree remove <wt>
# Both sides use one image for the app (agentbox builds its Dockerfile once, in the warm-up) and the
# database (busybox httpd from the test image, which images/test/build.sh builds). Prints
# per-iteration times on stderr, and on stdout the median and mean of each side and, last,
#   ratio(agentbox-compose/by-hand, median) = X.XX
#
# Environment: AGENTBOX   the binary (default target/release/agentbox; built when missing)
#              AGENTBOX_BENCH_IMAGE  the database's and the app's base image (default
#                         agentbox-test/tools:latest)
# Everything it creates is labelled agentbox.bench=<run id> and removed on exit.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

AGENTBOX_BENCH_IMAGE="${AGENTBOX_BENCH_IMAGE:-agentbox-test/tools:latest}"
bench_parse_n 8 ITERATIONS "$@"
n="$bench_n"
bench_locate_agentbox
bench_check_engine
image="$AGENTBOX_BENCH_IMAGE"
docker image inspect "$image" >/dev/null 2>&1 || bash "$(dirname "${BASH_SOURCE[0]}")/../images/test/build.sh"

bench_make_world
repo="$tmp/compose"
bench_make_repo "$repo"
mkdir -p "$repo/.devcontainer"
printf 'FROM %s\n' "$image" >"$repo/.devcontainer/Dockerfile"
cat >"$repo/.devcontainer/devcontainer.json" <<'JSON'
{
  "dockerComposeFile": "docker-compose.yml",
  "service": "app",
  "workspaceFolder": "/workspaces/${localWorkspaceFolderBasename}"
}
JSON
cat >"$repo/.devcontainer/docker-compose.yml" <<YAML
services:
  app:
    build: { context: .., dockerfile: .devcontainer/Dockerfile }
    volumes: ["../..:/workspaces"]
    network_mode: service:db
    depends_on: { db: { condition: service_healthy } }
  db:
    image: $image
    volumes: ["data:/data"]
    command: ["sh", "-c", "hostname > /data/state; exec busybox httpd -f -p 5432 -h /data"]
    healthcheck: { test: ["CMD-SHELL", "test -s /data/state"], interval: 100ms, timeout: 1s, retries: 50 }
volumes:
  data:
YAML
git -C "$repo" add -A
git -C "$repo" commit -q -m "bench: the compose form"
bench_naive_paths "$repo"

side_c() {
  (cd "$repo" && "$AGENTBOX" run --keep-branch --label "$label" "$1" -- true)
}

side_h() {
  local wt="$wtroot/$1" net="bench-$run_id-$1" rc=0
  (
    cd "$repo" &&
      docker network create --label "$label" "$net" >/dev/null &&
      docker volume create --label "$label" "$net-data" >/dev/null &&
      docker run -d --name "$net-db" --label "$label" --network "$net" --network-alias db \
        -v "$net-data:/data" --health-cmd 'test -s /data/state' --health-interval 100ms \
        --health-timeout 1s --health-retries 50 \
        "$image" sh -c 'hostname > /data/state; exec busybox httpd -f -p 5432 -h /data' >/dev/null &&
      until [[ "$(docker inspect -f '{{.State.Health.Status}}' "$net-db")" == healthy ]]; do sleep 0.1; done &&
      git worktree add -q -b "agentbox/$1" "$wt" HEAD &&
      docker run --rm --label "$label" --network "container:$net-db" \
        -u "$uidgid" -v "$wt:$wt" -v "$common:$common" \
        -v "$common/config:$common/config:ro" -v "$common/hooks:$common/hooks:ro" \
        -v "$wt:/workspaces/$1" -w "/workspaces/$1" "$image" true
  ) || rc=$?
  docker rm -f "$net-db" >/dev/null 2>&1 || rc=1
  docker volume rm "$net-data" >/dev/null 2>&1 || rc=1
  docker network rm "$net" >/dev/null 2>&1 || rc=1
  git -C "$repo" worktree remove --force "$wt" || rc=1
  return "$rc"
}

check() {
  bench_check_task "$repo" "$1"
  bench_check_leftovers "$1"
  local v
  v="$(docker volume ls -q --filter "label=$label")"
  [[ -z "$v" ]] || problem "$1: volume(s) left behind: $(echo "$v" | tr '\n' ' ')"
}

say "warm-up (agentbox builds the app's image here, once)"
bench_time_side side_c compose-warmup
check compose-warmup
bench_time_side side_h hand-warmup
check hand-warmup

: >"$tmp/times"
for ((i = 1; i <= n; i++)); do
  bench_time_side side_c "compose-$i"
  c="$bench_ns"
  check "compose-$i"
  bench_time_side side_h "hand-$i"
  h="$bench_ns"
  check "hand-$i"
  printf '%s %s\n' "$c" "$h" >>"$tmp/times"
  awk -v i="$i" -v n="$n" -v c="$c" -v h="$h" \
    'BEGIN { printf "compose-vs-naive: %2d/%d  agentbox %8.1f ms   by hand %8.1f ms\n", i, n, c / 1e6, h / 1e6 }' >&2
done

echo "agentbox run (devcontainer compose: app + db with healthcheck, volume, network_mode service:db) -- true  vs  the same by hand"
echo "image $image, engine $(bench_engine_version), $n iterations alternating (C H C H ...), 1 warm-up each"
bench_awk '
  { m++; c[m] = $1 / 1e6; h[m] = $2 / 1e6; sc += c[m]; sh += h[m] }
  END {
    mc = median(c, m); mh = median(h, m)
    printf "agentbox compose: median %8.1f ms   mean %8.1f ms\n", mc, sc / m
    printf "by hand:          median %8.1f ms   mean %8.1f ms\n", mh, sh / m
    printf "ratio(agentbox-compose/by-hand, mean) = %.2f\n", (sc / m) / (sh / m)
    printf "ratio(agentbox-compose/by-hand, median) = %.2f\n", mc / mh
  }' "$tmp/times"

bench_exit_on_problems
