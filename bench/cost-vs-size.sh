#!/usr/bin/env bash
# Benchmark: how does the cost of one task grow with the repository's size, cold, from the warm pool,
# and by hand?
#
#   bench/cost-vs-size.sh [-n ROUNDS]
#
# For repositories of 1,000, 3,000, 10,000 and 50,000 files (AGENTBOX_BENCH_SIZES overrides the list),
# each with `[pool] size = 1` in its agentbox.toml, in one run, ROUNDS rounds (default 3) after one
# untimed warm-up of each side, alternating:
#   P  agentbox run <task> -- sh -c 'date +%s%N'              (takes the pool's ready slot)
#   C  agentbox run --no-pool <task> -- sh -c 'date +%s%N'    (cold: checkout, container, start)
#   N  git worktree add -b agentbox/<task> <wt> HEAD
#      docker run --rm -u uid:gid -v <wt>:<wt> -v <common dir>:<common dir> (config, hooks read-only)
#        -w <wt> IMAGE sh -c 'date +%s%N'
#      git worktree remove --force <wt>                           (the naive script)
# The command prints the clock when it starts, so each side yields two figures: its whole wall time and
# the time from its start to its command's start ("to command"; one clock: containers share the host's
# kernel). Before each timed side (untimed): the pool is back to one ready slot (the refill that P starts
# is done) and agentbox's background deletions are done, so that nothing else runs while a side is
# timed. agentbox's peak RSS comes from `/usr/bin/time -f %M`.
#
# Prints per-round figures on stderr; on stdout, per size, the medians of each side, the ratios and
# agentbox's peak RSS; then the issue's goals on 3,000 files (when measured): cold <= 0.8x naive,
# pooled <= 0.25x naive, pooled command running <= 150 ms after `agentbox run` starts; last,
#   ratio(cold/naive, files=F) = X.XX     and     ratio(pooled/naive, files=F) = X.XX     per size
#
# Environment: AGENTBOX, AGENTBOX_BENCH_IMAGE as for the other scripts (see bench/lib.sh);
#              AGENTBOX_BENCH_SIZES  the sizes, in files (default "1000 3000 10000 50000").
# Everything it creates is removed on exit.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
read -r -a sizes <<<"${AGENTBOX_BENCH_SIZES:-1000 3000 10000 50000}"

bench_parse_n 3 ROUNDS "$@"
rounds="$bench_n"
bench_locate_agentbox
[[ -x /usr/bin/time ]] || die "/usr/bin/time is missing (Debian's time package)"
bench_check_engine
bench_make_world
mkdir -p "$tmp/out"

toml='[pool]
size = 1'
[[ "$image" == "$bench_default_image" ]] || toml="image = \"$image\"
$toml"
command=(sh -c 'date +%s%N')

# --- the three sides (run in the repository's directory) -------------------------------------------
side_p() {
  /usr/bin/time -f %M -o "$tmp/out/$1.rss" \
    "$AGENTBOX" run --keep-branch --label "$label" "$1" -- "${command[@]}"
}

side_c() {
  /usr/bin/time -f %M -o "$tmp/out/$1.rss" \
    "$AGENTBOX" run --no-pool --keep-branch --label "$label" "$1" -- "${command[@]}"
}

side_n() {
  local wt="$wtroot/$1"
  git worktree add -q -b "agentbox/$1" "$wt" HEAD &&
    docker run --rm --label "$label" -u "$uidgid" \
      -v "$wt:$wt" -v "$common:$common" \
      -v "$common/config:$common/config:ro" -v "$common/hooks:$common/hooks:ro" \
      -w "$wt" "$image" "${command[@]}" &&
    git worktree remove --force "$wt"
}

# --- bookkeeping --------------------------------------------------------------------------------------
# settle: nothing of an earlier side still works in the background (untimed).
settle() { bench_wait_pool_ready 1; bench_wait_purged; }

# check_leftovers WHAT: bench_check_leftovers, except for the containers of the pool's ready slot.
check_leftovers() {
  local ready c
  ready="$("$AGENTBOX" pool status --json | sed -n 's/.*"slot":"\([^"]*\)".*"state":"ready".*/\1/p')"
  c="$(docker ps -a --filter "label=$label" --format '{{.ID}} {{.Label "agentbox.pool"}}' |
    awk -v ready="$ready" 'BEGIN { split(ready, r, "\n"); for (i in r) keep[r[i]] = 1 } !($2 in keep) { print $1 }')"
  if [[ -n "$c" ]]; then
    problem "$1: container(s) left behind: $(echo "$c" | tr '\n' ' ')"
  fi
}

# time_side SIDE TASK FILES: times one side (bench_time_side), appends
#   FILES SIDE wall_ns to_command_ns rss_kib
# to $tmp/times and checks what it left (untimed); a side that does not print its start, or P started
# cold, is a problem.
time_side() {
  local side="$1" task="$2" files="$3" started rss=0
  bench_time_side "$side" "$task"
  started="$(grep -E '^[0-9]{19}$' "$tmp/$task.out" | head -n 1 || true)"
  [[ -n "$started" ]] || { problem "$task: the command's start time is missing"; started="$bench_t0"; }
  if [[ "$side" == side_p ]] && ! grep -q "sandbox comes from the pool" "$tmp/$task.out"; then
    problem "$task: started cold, not from the pool"
  fi
  [[ ! -f "$tmp/out/$task.rss" ]] || rss="$(tail -n 1 "$tmp/out/$task.rss")"
  printf '%s %s %s %s %s\n' "$files" "${side#side_}" "$bench_ns" "$((started - bench_t0))" "$rss" >>"$tmp/times"
  bench_check_task "$repo" "$task"
  # A finished task's stopped container goes with its background deletion.
  settle
  check_leftovers "$task"
}

: >"$tmp/times"
for files in "${sizes[@]}"; do
  repo="$tmp/repo-$files"
  say "making a repository of $files files"
  bench_make_sized_repo "$repo" "$files" "$toml"
  bench_naive_paths "$repo"
  cd "$repo"
  tracked="$(git ls-files | wc -l)"
  "$AGENTBOX" pool fill --label "$label" >"$tmp/out/fill-$files.log" 2>&1 || {
    tail -n 20 "$tmp/out/fill-$files.log" >&2
    die "agentbox pool fill failed"
  }
  say "$tracked files: warm-up"
  settle
  bench_time_side side_p "warm-p-$files"
  settle
  bench_time_side side_c "warm-c-$files"
  settle
  bench_time_side side_n "warm-n-$files"
  for ((r = 1; r <= rounds; r++)); do
    for side in p c n; do
      settle
      time_side "side_$side" "$side-$files-$r" "$files"
    done
    tail -n 3 "$tmp/times" | awk -v r="$r" -v R="$rounds" -v f="$tracked" '
      { w[$2] = $3 / 1e6; s[$2] = $4 / 1e6 }
      END { printf "cost-vs-size: %d files, round %d/%d  pooled %7.1f ms (command at %6.1f)   cold %7.1f ms (at %6.1f)   naive %7.1f ms (at %6.1f)\n", f, r, R, w["p"], s["p"], w["c"], s["c"], w["n"], s["n"] }' >&2
  done
  "$AGENTBOX" pool drain >/dev/null 2>&1 || problem "agentbox pool drain failed in the $files-file repository"
  bench_wait_purged
  cd "$tmp"
done

# --- summary ------------------------------------------------------------------------------------------
echo "agentbox run (pooled: [pool] size = 1; cold: --no-pool) vs git worktree add + docker run --rm + git worktree remove"
echo "command: sh -c 'date +%s%N'; image $image, engine $(bench_engine_version), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg); $rounds rounds alternating (P C N), 1 warm-up each"
bench_awk -v sizes="${sizes[*]}" '
  { f = $1; k = f SUBSEP $2; c[k]++; w[k, c[k]] = $3 / 1e6; s[k, c[k]] = $4 / 1e6; if ($5 > rss[k]) rss[k] = $5 }
  function med(f, side, which,   k, v, j) {
    k = f SUBSEP side
    for (j = 1; j <= c[k]; j++) v[j] = (which == "w") ? w[k, j] : s[k, j]
    return median(v, c[k])
  }
  END {
    n = split(sizes, size, " ")
    for (i = 1; i <= n; i++) {
      f = size[i]
      wp[f] = med(f, "p", "w"); wc[f] = med(f, "c", "w"); wn[f] = med(f, "n", "w")
      sp[f] = med(f, "p", "s"); sc[f] = med(f, "c", "s"); sn[f] = med(f, "n", "s")
      printf "files=%-6d pooled %8.1f ms   cold %8.1f ms   naive %8.1f ms   to command: pooled %7.1f, cold %7.1f, naive %7.1f ms   peak RSS: pooled %.1f, cold %.1f MiB\n", f, wp[f], wc[f], wn[f], sp[f], sc[f], sn[f], rss[f, "p"] / 1024, rss[f, "c"] / 1024
    }
    if (3000 in wn) {
      printf "goal cold <= 0.80x naive (3,000 files): %.2f, %s\n", wc[3000] / wn[3000], (wc[3000] / wn[3000] <= 0.8) ? "met" : "MISSED"
      printf "goal pooled <= 0.25x naive (3,000 files): %.2f, %s\n", wp[3000] / wn[3000], (wp[3000] / wn[3000] <= 0.25) ? "met" : "MISSED"
      printf "goal pooled command running <= 150 ms after agentbox run starts (3,000 files): %.1f ms, %s\n", sp[3000], (sp[3000] <= 150) ? "met" : "MISSED"
    }
    for (i = 1; i <= n; i++) {
      f = size[i]
      printf "ratio(cold/naive, files=%d) = %.2f\n", f, wc[f] / wn[f]
      printf "ratio(pooled/naive, files=%d) = %.2f\n", f, wp[f] / wn[f]
    }
  }' "$tmp/times"

bench_exit_on_problems
