#!/usr/bin/env bash
# Benchmark: how long does the user wait for the teardown of a task that left 50,000 ignored files
# (a node_modules/)?
#
#   bench/teardown-ignored.sh [-n ROUNDS]
#
# The task's command makes node_modules/ (ignored by the repository's .gitignore) with 500 directories
# of 100 files, writes one tracked file, and prints the clock as its last act. In one run, alternating,
# ROUNDS rounds (default 3) after one untimed warm-up of each:
#   A  agentbox run <task> -- sh -c '<that>'
#   N  git worktree add -b agentbox/<task> <wt> HEAD
#      docker run --rm -u uid:gid (the same mounts as agentbox's) -w <wt> IMAGE sh -c '<that>'
#      git worktree remove --force <wt>                       (timed on its own, too)
# The teardown part of each is the time from the command's last act to the side's return: for
# agentbox, its whole teardown (the snapshot commit, the worktree moved aside; the deletion goes on in
# the background, and how long that took is shown, untimed); for the naive script, `docker run --rm`
# removing its container and `git worktree remove --force` deleting the files.
#
# Prints per-round figures on stderr; on stdout the medians, then, last,
#   ratio(agentbox/naive teardown, median) = X.XX
# (the issue's goal: agentbox's teardown part <= 300 ms).
#
# Environment: AGENTBOX, AGENTBOX_BENCH_IMAGE as for the other scripts (see bench/lib.sh).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

bench_parse_n 3 ROUNDS "$@"
rounds="$bench_n"
bench_locate_agentbox
bench_check_engine

bench_make_world
repo="$tmp/repo"
bench_make_repo "$repo"
printf 'node_modules/\n' >>"$repo/.gitignore"
git -C "$repo" commit -q -am "bench: node_modules/ is ignored"
bench_naive_paths "$repo"
cd "$repo"

script='mkdir node_modules && cd node_modules &&
for d in $(seq 1 500); do mkdir "$d" && (cd "$d" && seq 1 100 | xargs touch); done &&
cd .. && echo work > work.txt && date +%s%N'
image_args=()
[[ "$image" == "$bench_default_image" ]] || image_args=(--image "$image")

side_a() {
  "$AGENTBOX" run --label "$label" "${image_args[@]}" "$1" -- sh -c "$script"
}

# side_n TASK: the naive script; the time `git worktree remove --force` took, in ns, into
# $tmp/TASK.remove.
side_n() {
  local wt="$wtroot/$1" t0 t1
  git worktree add -q -b "agentbox/$1" "$wt" HEAD &&
    docker run --rm --label "$label" -u "$uidgid" \
      -v "$wt:$wt" -v "$common:$common" \
      -v "$common/config:$common/config:ro" -v "$common/hooks:$common/hooks:ro" \
      -w "$wt" "$image" sh -c "$script" || return
  t0="$(date +%s%N)"
  git worktree remove --force "$wt" || return
  t1="$(date +%s%N)"
  echo "$((t1 - t0))" >"$tmp/$1.remove"
}

# ended TASK: when the side's command printed its last act (ns since the epoch).
ended() {
  local at
  at="$(grep -E '^[0-9]{19}$' "$tmp/$1.out" | tail -n 1 || true)"
  [[ -n "$at" ]] || die "$1: the command's end time is missing; its output:$(tail -n 5 "$tmp/$1.out")"
  echo "$at"
}

# purged: waits for agentbox's background deletion; how long it went on after the run returned (ms).
purged() {
  local returned="$1" t
  bench_wait_purged
  t="$(date +%s%N)"
  echo "$(((t - returned) / 1000000))"
}

check() { bench_check_task "$repo" "$1"; bench_check_leftovers "$1"; }

say "warm-up"
bench_time_side side_a warm-a
purged "$((bench_t0 + bench_ns))" >/dev/null
check warm-a
bench_time_side side_n warm-n
check warm-n
[[ "$(git show agentbox/warm-a:work.txt)" == work ]] || problem "warm-a: the tracked file is not on its branch"

: >"$tmp/times"
for ((i = 1; i <= rounds; i++)); do
  bench_time_side side_a "a-$i"
  a_whole="$bench_ns" a_down=$((bench_t0 + bench_ns - $(ended "a-$i")))
  a_purge="$(purged "$((bench_t0 + bench_ns))")"
  check "a-$i"
  bench_time_side side_n "n-$i"
  n_whole="$bench_ns" n_down=$((bench_t0 + bench_ns - $(ended "n-$i")))
  n_remove="$(cat "$tmp/n-$i.remove")"
  check "n-$i"
  echo "$a_whole $a_down $a_purge $n_whole $n_down $n_remove" >>"$tmp/times"
  awk -v i="$i" -v n="$rounds" -v aw="$a_whole" -v ad="$a_down" -v ap="$a_purge" -v nw="$n_whole" -v nd="$n_down" -v nr="$n_remove" 'BEGIN {
    printf "teardown-ignored: %d/%d  agentbox: teardown %6.1f ms of %7.1f (deletion done %d ms later)   naive: teardown %7.1f ms of %7.1f (git worktree remove %7.1f)\n", i, n, ad / 1e6, aw / 1e6, ap, nd / 1e6, nw / 1e6, nr / 1e6
  }' >&2
done

echo "a task leaving 50,000 ignored files (node_modules/): from the command's end to the return, agentbox run vs the naive script"
echo "image $image, engine $(bench_engine_version), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg); $rounds rounds alternating, 1 warm-up each"
bench_awk '
  { m++; aw[m] = $1 / 1e6; ad[m] = $2 / 1e6; ap[m] = $3; nw[m] = $4 / 1e6; nd[m] = $5 / 1e6; nr[m] = $6 / 1e6 }
  END {
    mad = median(ad, m); mnd = median(nd, m)
    printf "agentbox: teardown part median %7.1f ms   whole run median %8.1f ms   background deletion done %d ms after the return (median)\n", mad, median(aw, m), median(ap, m)
    printf "naive:    teardown part median %7.1f ms   whole run median %8.1f ms   of which git worktree remove --force %7.1f ms\n", mnd, median(nw, m), median(nr, m)
    printf "goal agentbox teardown part <= 300 ms: %.1f ms, %s\n", mad, (mad <= 300) ? "met" : "MISSED"
    printf "ratio(agentbox teardown/git worktree remove --force, median) = %.2f\n", mad / median(nr, m)
    printf "ratio(agentbox/naive teardown, median) = %.2f\n", mad / mnd
  }' "$tmp/times"

bench_exit_on_problems
