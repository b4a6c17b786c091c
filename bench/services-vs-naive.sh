#!/usr/bin/env bash
# Benchmark: what does agentbox cost for a task with a sidecar service, a setup step and a port, over
# the same containers started by hand?
#
#   bench/services-vs-naive.sh [-n N]
#
# Three sides, in one run, alternating (S H P S H P ...), N iterations (default 10) after one untimed
# warm-up of each:
#   S  agentbox run <task> -- true, in a repository whose agentbox.toml declares one service (`db`,
#      sleeping), one setup step (`true`) and one port (web = 8000)
#   H  the same by hand:
#        docker network create <net>
#        docker run -d --network <net> --network-alias db IMAGE sleep infinity
#        git worktree add -b agentbox/<task> <wt> HEAD
#        docker run --rm --network <net> -p 127.0.0.1:<port>:8000 -u uid:gid -v <wt>:<wt>
#          -v <common dir>:<common dir> (config, hooks read-only) -w <wt> IMAGE sh -c 'true && true'
#        docker rm -f <sidecar>; docker network rm <net>; git worktree remove --force <wt>
#   P  agentbox run <task> -- true in a repository without agentbox.toml (no service, setup or port)
# Prints per-iteration times on stderr, and on stdout the median and mean of each side, then
#   ratio(agentbox-with-services/by-hand, median) = X.XX
#   services+setup+port add to agentbox (median S - median P) = X ms
#
# Environment: AGENTBOX   the binary (default target/release/agentbox, built with
#                         `cargo build --release` first)
#              AGENTBOX_BENCH_IMAGE  image of the task and the service on every side (default
#                         agentbox/base:bookworm, which images/build-base.sh builds)
# Everything it creates (throwaway repos, their worktrees, agentbox's state, containers and networks
# labelled agentbox.bench=<run id>) is removed on exit.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
image="${AGENTBOX_BENCH_IMAGE:-agentbox/base:bookworm}"

usage() { echo "usage: $0 [-n ITERATIONS]" >&2; exit 2; }
die() { echo "services-vs-naive: $*" >&2; exit 1; }

n=10
while getopts ":n:h" opt; do
  case "$opt" in
    n) n="$OPTARG" ;;
    h) usage ;;
    *) usage ;;
  esac
done
shift $((OPTIND - 1))
(($# == 0)) || usage
[[ "$n" =~ ^[1-9][0-9]*$ ]] || die "-n wants a positive number, got '$n'"

if [[ -z "${AGENTBOX:-}" ]]; then
  AGENTBOX="$root/target/release/agentbox"
  echo "services-vs-naive: building $AGENTBOX (cargo build --release)" >&2
  (cd "$root" && cargo build --release --quiet)
fi
[[ -x "$AGENTBOX" ]] || die "agentbox binary not found or not executable: $AGENTBOX"
AGENTBOX="$(cd "$(dirname "$AGENTBOX")" && pwd)/$(basename "$AGENTBOX")"

docker info >/dev/null 2>&1 || die "no Docker engine answers (docker info failed)"
docker image inspect "$image" >/dev/null 2>&1 || die "image $image is missing; build it with images/build-base.sh"

# --- a throwaway world --------------------------------------------------------------------------------
run_id="$(date +%s)-$$"
label="agentbox.bench=$run_id"
tmp="$(mktemp -d "${TMPDIR:-/tmp}/agentbox-bench.XXXXXX")"
tmp="$(cd "$tmp" && pwd -P)"
svc_repo="$tmp/svc"     # with agentbox.toml: sides S and H
plain_repo="$tmp/plain" # without: side P
svc_wtroot="$tmp/.agentbox-worktrees/svc"
plain_wtroot="$tmp/.agentbox-worktrees/plain"
# Host ports: agentbox hands out from port_range, the by-hand side uses one fixed port next to it.
port_range="31500-31509"
naive_port=31510

cleanup() {
  local ids nets
  ids="$(docker ps -aq --filter "label=$label" 2>/dev/null || true)"
  if [[ -n "$ids" ]]; then
    # shellcheck disable=SC2086 # one id per word
    docker rm -f $ids >/dev/null 2>&1 || true
  fi
  nets="$(docker network ls -q --filter "label=$label" 2>/dev/null || true)"
  if [[ -n "$nets" ]]; then
    # shellcheck disable=SC2086 # one id per word
    docker network rm $nets >/dev/null 2>&1 || true
  fi
  for r in "$svc_repo" "$plain_repo"; do
    if [[ -d "$r/.git" ]]; then
      rm -rf "$tmp/.agentbox-worktrees/$(basename "$r")"
      git -C "$r" worktree prune || true
    fi
  done
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

export XDG_STATE_HOME="$tmp/state"
export GIT_CONFIG_GLOBAL="$tmp/gitconfig"
export GIT_CONFIG_NOSYSTEM=1
mkdir -p "$XDG_STATE_HOME"
git config --file "$GIT_CONFIG_GLOBAL" user.name "agentbox bench"
git config --file "$GIT_CONFIG_GLOBAL" user.email "bench@agentbox.invalid"
git config --file "$GIT_CONFIG_GLOBAL" init.defaultBranch main

make_repo() { # make_repo DIR: the same small project as bench/run-vs-naive.sh
  git init -q "$1"
  mkdir -p "$1/src"
  printf '# bench repo\n' >"$1/README.md"
  printf 'fn main() {\n    println!("hello");\n}\n' >"$1/src/main.rs"
  printf 'target/\n' >"$1/.gitignore"
  seq 1 200 >"$1/numbers.txt"
}
make_repo "$svc_repo"
cat >"$svc_repo/agentbox.toml" <<TOML
image = "$image"
setup = ["true"]
port_range = "$port_range"

[ports]
web = 8000

[services.db]
image = "$image"
command = ["sleep", "infinity"]
TOML
git -C "$svc_repo" add -A
git -C "$svc_repo" commit -q -m "bench: initial commit"
make_repo "$plain_repo"
git -C "$plain_repo" add -A
git -C "$plain_repo" commit -q -m "bench: initial commit"
common="$(git -C "$svc_repo" rev-parse --path-format=absolute --git-common-dir)"
uidgid="$(id -u):$(id -g)"

# --- the three sides ----------------------------------------------------------------------------------
side_s() { # agentbox, with a service, a setup step and a port
  (cd "$svc_repo" && "$AGENTBOX" run --label "$label" "$1" -- true)
}

side_h() { # what a user writes by hand for the same
  local wt="$svc_wtroot/$1" net="bench-$run_id-$1" rc=0
  (
    cd "$svc_repo" &&
      docker network create --label "$label" "$net" >/dev/null &&
      docker run -d --name "$net-db" --label "$label" --network "$net" --network-alias db \
        "$image" sleep infinity >/dev/null &&
      git worktree add -q -b "agentbox/$1" "$wt" HEAD &&
      docker run --rm --label "$label" --network "$net" -p "127.0.0.1:$naive_port:8000" \
        -u "$uidgid" -v "$wt:$wt" -v "$common:$common" \
        -v "$common/config:$common/config:ro" -v "$common/hooks:$common/hooks:ro" \
        -w "$wt" "$image" sh -c 'true && true'
  ) || rc=$?
  # The teardown runs whatever happened above.
  docker rm -f "$net-db" >/dev/null 2>&1 || rc=1
  docker network rm "$net" >/dev/null 2>&1 || rc=1
  git -C "$svc_repo" worktree remove --force "$wt" || rc=1
  return "$rc"
}

side_p() { # agentbox, plain
  (cd "$plain_repo" && "$AGENTBOX" run --label "$label" "$1" -- true)
}

problems=0
problem() { echo "services-vs-naive: PROBLEM: $*" >&2; problems=$((problems + 1)); }

# time_side SIDE TASK: runs one side, prints the wall time in ns; aborts the benchmark when it fails.
time_side() {
  local side="$1" task="$2" t0 t1 rc=0
  t0="$(date +%s%N)"
  "$side" "$task" >"$tmp/$task.out" 2>&1 || rc=$?
  t1="$(date +%s%N)"
  if ((rc != 0)); then
    echo "services-vs-naive: $side $task failed (exit $rc):" >&2
    tail -n 20 "$tmp/$task.out" >&2
    exit 1
  fi
  echo $((t1 - t0))
}

# check REPO WTROOT TASK: what every side must leave behind (untimed): the branch; no worktree,
# container or network.
check() {
  local repo="$1" wtroot="$2" task="$3" c
  git -C "$repo" rev-parse -q --verify "refs/heads/agentbox/$task" >/dev/null || problem "$task: branch agentbox/$task missing"
  [[ ! -e "$wtroot/$task" ]] || problem "$task: worktree $wtroot/$task still exists"
  c="$(docker ps -aq --filter "label=$label")"
  if [[ -n "$c" ]]; then
    problem "$task: container(s) left behind: $(echo "$c" | tr '\n' ' ')"
    # shellcheck disable=SC2086 # one id per word
    docker rm -f $c >/dev/null 2>&1 || true # so that the next check sees only its own
  fi
  c="$(docker network ls -q --filter "label=$label")"
  if [[ -n "$c" ]]; then
    problem "$task: network(s) left behind: $(echo "$c" | tr '\n' ' ')"
    # shellcheck disable=SC2086 # one id per word
    docker network rm $c >/dev/null 2>&1 || true
  fi
}

echo "services-vs-naive: warm-up" >&2
time_side side_s svc-warmup >/dev/null
check "$svc_repo" "$svc_wtroot" svc-warmup
time_side side_h hand-warmup >/dev/null
check "$svc_repo" "$svc_wtroot" hand-warmup
time_side side_p plain-warmup >/dev/null
check "$plain_repo" "$plain_wtroot" plain-warmup

: >"$tmp/times"
for ((i = 1; i <= n; i++)); do
  s="$(time_side side_s "svc-$i")"
  check "$svc_repo" "$svc_wtroot" "svc-$i"
  h="$(time_side side_h "hand-$i")"
  check "$svc_repo" "$svc_wtroot" "hand-$i"
  p="$(time_side side_p "plain-$i")"
  check "$plain_repo" "$plain_wtroot" "plain-$i"
  printf '%s %s %s\n' "$s" "$h" "$p" >>"$tmp/times"
  awk -v i="$i" -v n="$n" -v s="$s" -v h="$h" -v p="$p" \
    'BEGIN { printf "services-vs-naive: %2d/%d  agentbox+services %8.1f ms   by hand %8.1f ms   agentbox plain %8.1f ms\n", i, n, s / 1e6, h / 1e6, p / 1e6 }' >&2
done

# --- summary ------------------------------------------------------------------------------------------
engine="$(docker version -f '{{.Server.Version}}' 2>/dev/null || echo '?')"
echo "agentbox run (1 service, 1 setup step, 1 port) -- true  vs  the same by hand  vs  agentbox run -- true"
echo "image $image, engine $engine, $n iterations alternating (S H P S H P ...), 1 warm-up each"
awk '
  function median(v, m,   s, j, k, t) {
    for (j = 1; j <= m; j++) s[j] = v[j]
    for (j = 2; j <= m; j++) { t = s[j]; for (k = j - 1; k >= 1 && s[k] > t; k--) s[k + 1] = s[k]; s[k + 1] = t }
    return (m % 2) ? s[(m + 1) / 2] : (s[m / 2] + s[m / 2 + 1]) / 2
  }
  { m++; s[m] = $1 / 1e6; h[m] = $2 / 1e6; p[m] = $3 / 1e6; ss += s[m]; sh += h[m]; sp += p[m] }
  END {
    ms = median(s, m); mh = median(h, m); mp = median(p, m)
    printf "agentbox+services: median %8.1f ms   mean %8.1f ms\n", ms, ss / m
    printf "by hand:           median %8.1f ms   mean %8.1f ms\n", mh, sh / m
    printf "agentbox plain:    median %8.1f ms   mean %8.1f ms\n", mp, sp / m
    printf "overhead(agentbox+services - by hand, median) = %.1f ms\n", ms - mh
    printf "ratio(agentbox-with-services/by-hand, mean) = %.2f\n", (ss / m) / (sh / m)
    printf "ratio(agentbox-with-services/by-hand, median) = %.2f\n", ms / mh
    printf "services+setup+port add to agentbox (median with - median without) = %.1f ms\n", ms - mp
  }' "$tmp/times"

if ((problems > 0)); then
  echo "services-vs-naive: $problems problem(s) seen, see above" >&2
  exit 1
fi
