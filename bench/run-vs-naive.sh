#!/usr/bin/env bash
# Benchmark: what does agentbox cost over the script a user would write by hand?
#
#   bench/run-vs-naive.sh [-n N]
#
# Times `agentbox run <task> -- true` on the default image against the naive equivalent
#   git worktree add -b agentbox/<task> <wt> HEAD
#   docker run --rm -u uid:gid -v <wt>:<wt> -v <common dir>:<common dir> (config, hooks read-only) -w <wt> IMAGE true
#   git worktree remove --force <wt>          (the branch stays, as with agentbox)
# and against the same script with the container on a network where it reaches no other container
# (a bridge with inter-container traffic off, as agentbox's tasks get: the default bridge lets every
# container reach every other), in one run, alternating the three (A B C A B C ...), N iterations
# (default 15) after one untimed warm-up of each.
# Prints per-iteration times on stderr, and on stdout the median and mean of each side and, last,
#   ratio(agentbox/naive isolated, median) = X.XX
#   ratio(agentbox/naive, median) = X.XX
#
# Environment: AGENTBOX   the binary (default target/release/agentbox, or $CARGO_TARGET_DIR/release/agentbox;
#                         built with `cargo build --release` when missing)
#              AGENTBOX_BENCH_IMAGE  image for both sides (default agentbox/base:bookworm, which
#                         images/build-base.sh builds)
# Everything it creates (a throwaway repo, its worktrees, agentbox's state, containers labelled
# agentbox.bench=<run id>) is removed on exit.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

bench_parse_n 15 ITERATIONS "$@"
n="$bench_n"
bench_locate_agentbox
bench_check_engine

bench_make_world
repo="$tmp/repo"
bench_make_repo "$repo"
bench_naive_paths "$repo"
cd "$repo"

agentbox_args=()
[[ "$image" == "$bench_default_image" ]] || agentbox_args=(--image "$image")

# --- the two sides ------------------------------------------------------------------------------------
side_a() { # agentbox
  "$AGENTBOX" run --keep-branch --label "$label" "${agentbox_args[@]}" "$1" -- true
}

side_n() { # what a user writes by hand
  local wt="$wtroot/$1"
  git worktree add -q -b "agentbox/$1" "$wt" HEAD &&
    docker run --rm --label "$label" -u "$uidgid" "${network_args[@]}" \
      -v "$wt:$wt" -v "$common:$common" \
      -v "$common/config:$common/config:ro" -v "$common/hooks:$common/hooks:ro" \
      -w "$wt" "$image" true &&
    git worktree remove --force "$wt"
}

# Not labelled like the rest: the leftover checks would take it for a task's network.
isolated="agentbox-bench-isolated-$$"
docker network create -o com.docker.network.bridge.enable_icc=false "$isolated" >/dev/null
trap 'docker network rm "$isolated" >/dev/null 2>&1 || true; bench_cleanup' EXIT
side_i() { # the same, with the container as cut off from the others as agentbox's
  local -a network_args=(--network "$isolated")
  side_n "$@"
}
network_args=()

# check TASK: what both sides must leave behind (untimed): the branch, no worktree, no container.
check() { bench_check_task "$repo" "$1"; bench_check_leftovers "$1"; }

say "warm-up"
bench_time_side side_a bench-a-warmup
check bench-a-warmup
bench_time_side side_n bench-n-warmup
check bench-n-warmup
bench_time_side side_i bench-i-warmup
check bench-i-warmup

: >"$tmp/times"
for ((i = 1; i <= n; i++)); do
  bench_time_side side_a "bench-a-$i"
  a="$bench_ns"
  check "bench-a-$i"
  bench_time_side side_n "bench-n-$i"
  b="$bench_ns"
  check "bench-n-$i"
  bench_time_side side_i "bench-i-$i"
  c="$bench_ns"
  check "bench-i-$i"
  printf '%s %s %s\n' "$a" "$b" "$c" >>"$tmp/times"
  awk -v i="$i" -v n="$n" -v a="$a" -v b="$b" -v c="$c" \
    'BEGIN { printf "run-vs-naive: %2d/%d  agentbox %8.1f ms   naive %8.1f ms   naive isolated %8.1f ms\n", i, n, a / 1e6, b / 1e6, c / 1e6 }' >&2
done

# --- summary ------------------------------------------------------------------------------------------
echo "agentbox run <task> -- true  vs  git worktree add + docker run --rm + git worktree remove"
echo "image $image, engine $(bench_engine_version), $n iterations alternating (A B C A B C ...), 1 warm-up each"
bench_awk '
  { m++; a[m] = $1 / 1e6; b[m] = $2 / 1e6; c[m] = $3 / 1e6; sa += a[m]; sb += b[m]; sc += c[m] }
  END {
    ma = median(a, m); mb = median(b, m); mc = median(c, m)
    printf "agentbox:        median %8.1f ms   mean %8.1f ms\n", ma, sa / m
    printf "naive:           median %8.1f ms   mean %8.1f ms\n", mb, sb / m
    printf "naive isolated:  median %8.1f ms   mean %8.1f ms\n", mc, sc / m
    printf "overhead(agentbox-naive, median) = %.1f ms\n", ma - mb
    printf "ratio(agentbox/naive, mean) = %.2f\n", (sa / m) / (sb / m)
    printf "ratio(agentbox/naive isolated, median) = %.2f\n", ma / mc
    printf "ratio(agentbox/naive, median) = %.2f\n", ma / mb
  }' "$tmp/times"

bench_exit_on_problems
