#!/usr/bin/env bash
# Benchmark: what does agentbox cost over the script a user would write by hand?
#
#   bench/run-vs-naive.sh [-n N]
#
# Times `agentbox run <task> -- true` on the default image against the naive equivalent
#   git worktree add -b agentbox/<task> <wt> HEAD
#   docker run --rm -u uid:gid -v <wt>:<wt> -v <common dir>:<common dir> (config, hooks read-only) -w <wt> IMAGE true
#   git worktree remove --force <wt>          (the branch stays, as with agentbox)
# in one run, alternating the two (A B A B ...), N iterations (default 15) after one untimed warm-up of each.
# Prints per-iteration times on stderr, and on stdout the median and mean of each side and, last,
#   ratio(agentbox/naive, median) = X.XX
#
# Environment: AGENTBOX   the binary (default target/release/agentbox, or $CARGO_TARGET_DIR/release/agentbox;
#                         built with `cargo build --release` when missing)
#              AGENTBOX_BENCH_IMAGE  image for both sides (default agentbox/base:bookworm, which
#                         images/build-base.sh builds)
# Everything it creates (a throwaway repo, its worktrees, agentbox's state, containers labelled
# agentbox.bench=<run id>) is removed on exit.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
default_image="agentbox/base:bookworm"
image="${AGENTBOX_BENCH_IMAGE:-$default_image}"

usage() { echo "usage: $0 [-n ITERATIONS]" >&2; exit 2; }
die() { echo "run-vs-naive: $*" >&2; exit 1; }

n=15
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
  target_dir="${CARGO_TARGET_DIR:-target}"
  [[ "$target_dir" == /* ]] || target_dir="$root/$target_dir"
  AGENTBOX="$target_dir/release/agentbox"
  if [[ ! -x "$AGENTBOX" ]]; then
    echo "run-vs-naive: building $AGENTBOX (cargo build --release)" >&2
    (cd "$root" && cargo build --release --locked --quiet)
  fi
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
repo="$tmp/repo"
# agentbox's default worktree root for $repo; the naive side uses the same place.
wtroot="$tmp/.agentbox-worktrees/repo"

cleanup() {
  local ids
  ids="$(docker ps -aq --filter "label=$label" 2>/dev/null || true)"
  if [[ -n "$ids" ]]; then
    # shellcheck disable=SC2086 # one id per word
    docker rm -f $ids >/dev/null 2>&1 || true
  fi
  if [[ -d "$repo/.git" ]]; then
    rm -rf "$wtroot"
    git -C "$repo" worktree prune || true
  fi
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

git init -q "$repo"
mkdir -p "$repo/src"
printf '# bench repo\n' >"$repo/README.md"
printf 'fn main() {\n    println!("hello");\n}\n' >"$repo/src/main.rs"
printf 'target/\n' >"$repo/.gitignore"
seq 1 200 >"$repo/numbers.txt"
git -C "$repo" add -A
git -C "$repo" commit -q -m "bench: initial commit"
common="$(git -C "$repo" rev-parse --path-format=absolute --git-common-dir)"
uidgid="$(id -u):$(id -g)"
cd "$repo"

agentbox_args=()
[[ "$image" == "$default_image" ]] || agentbox_args=(--image "$image")

# --- the two sides ------------------------------------------------------------------------------------
side_a() { # agentbox
  "$AGENTBOX" run --label "$label" "${agentbox_args[@]}" "$1" -- true
}

side_n() { # what a user writes by hand
  local wt="$wtroot/$1"
  git worktree add -q -b "agentbox/$1" "$wt" HEAD &&
    docker run --rm --label "$label" -u "$uidgid" \
      -v "$wt:$wt" -v "$common:$common" \
      -v "$common/config:$common/config:ro" -v "$common/hooks:$common/hooks:ro" \
      -w "$wt" "$image" true &&
    git worktree remove --force "$wt"
}

problems=0
problem() { echo "run-vs-naive: PROBLEM: $*" >&2; problems=$((problems + 1)); }

# time_side SIDE TASK: runs one side, prints the wall time in ns; aborts the benchmark when it fails.
time_side() {
  local side="$1" task="$2" t0 t1 rc=0
  t0="$(date +%s%N)"
  "$side" "$task" >"$tmp/$task.out" 2>&1 || rc=$?
  t1="$(date +%s%N)"
  if ((rc != 0)); then
    echo "run-vs-naive: $side $task failed (exit $rc):" >&2
    tail -n 20 "$tmp/$task.out" >&2
    exit 1
  fi
  echo $((t1 - t0))
}

# check TASK: what both sides must leave behind (untimed): the branch, no worktree, no container.
check() {
  local task="$1" c
  git rev-parse -q --verify "refs/heads/agentbox/$task" >/dev/null || problem "$task: branch agentbox/$task missing"
  [[ ! -e "$wtroot/$task" ]] || problem "$task: worktree $wtroot/$task still exists"
  ! git worktree list --porcelain | grep -qx "worktree $wtroot/$task" || problem "$task: git worktree list still shows it"
  c="$(docker ps -aq --filter "label=$label")"
  if [[ -n "$c" ]]; then
    problem "$task: container(s) left behind: $(echo "$c" | tr '\n' ' ')"
    # shellcheck disable=SC2086 # one id per word
    docker rm -f $c >/dev/null 2>&1 || true # so that the next check sees only its own
  fi
}

echo "run-vs-naive: warm-up" >&2
time_side side_a bench-a-warmup >/dev/null
check bench-a-warmup
time_side side_n bench-n-warmup >/dev/null
check bench-n-warmup

: >"$tmp/times"
for ((i = 1; i <= n; i++)); do
  a="$(time_side side_a "bench-a-$i")"
  check "bench-a-$i"
  b="$(time_side side_n "bench-n-$i")"
  check "bench-n-$i"
  printf '%s %s\n' "$a" "$b" >>"$tmp/times"
  awk -v i="$i" -v n="$n" -v a="$a" -v b="$b" \
    'BEGIN { printf "run-vs-naive: %2d/%d  agentbox %8.1f ms   naive %8.1f ms\n", i, n, a / 1e6, b / 1e6 }' >&2
done

# --- summary ------------------------------------------------------------------------------------------
engine="$(docker version -f '{{.Server.Version}}' 2>/dev/null || echo '?')"
echo "agentbox run <task> -- true  vs  git worktree add + docker run --rm + git worktree remove"
echo "image $image, engine $engine, $n iterations alternating (A B A B ...), 1 warm-up each"
awk '
  function median(v, m,   s, j, k, t) {
    for (j = 1; j <= m; j++) s[j] = v[j]
    for (j = 2; j <= m; j++) { t = s[j]; for (k = j - 1; k >= 1 && s[k] > t; k--) s[k + 1] = s[k]; s[k + 1] = t }
    return (m % 2) ? s[(m + 1) / 2] : (s[m / 2] + s[m / 2 + 1]) / 2
  }
  { m++; a[m] = $1 / 1e6; b[m] = $2 / 1e6; sa += a[m]; sb += b[m] }
  END {
    ma = median(a, m); mb = median(b, m)
    printf "agentbox: median %8.1f ms   mean %8.1f ms\n", ma, sa / m
    printf "naive:    median %8.1f ms   mean %8.1f ms\n", mb, sb / m
    printf "overhead(agentbox-naive, median) = %.1f ms\n", ma - mb
    printf "ratio(agentbox/naive, mean) = %.2f\n", (sa / m) / (sb / m)
    printf "ratio(agentbox/naive, median) = %.2f\n", ma / mb
  }' "$tmp/times"

if ((problems > 0)); then
  echo "run-vs-naive: $problems problem(s) seen, see above" >&2
  exit 1
fi
