#!/usr/bin/env bash
# Benchmark: how long does `agentbox conflicts` take over many tasks, and what would a user's own
# loop of `git merge-tree` cost instead?
#
#   bench/conflicts.sh [-n ROUNDS]
#
# Sets up (untimed) a repository of 3,000 files (30 directories of 100 files of 40 lines) and 16
# finished tasks run with `agentbox batch`, each changing lines of a few files of its own, and pairs
# of them the same lines of one shared file (so some pairs conflict). Then, alternating, ROUNDS
# rounds (default 10) after one untimed warm-up of each:
#   A  agentbox conflicts           (120 pairs and 16 tasks against main, one `merge-tree --stdin`)
#   B  the loop a user would write: `git merge-tree --write-tree --name-only` once per pair and once
#      per task against main (136 processes)
# Both must find the same conflicting pairs (checked once, untimed). Then the same 16 tasks are run
# again, detached, and held running with uncommitted edits of their own, and `agentbox conflicts`
# is timed at their live state (each worktree staged into a tree first: the naive loop has no
# equivalent), ROUNDS rounds.
#
# Prints per-round times on stderr; on stdout the median and mean of each, and last:
#   branches_median_ms = X
#   naive_median_ms = X
#   live_median_ms = X
#
# Environment: AGENTBOX   the binary (default target/release/agentbox, or $CARGO_TARGET_DIR/release/agentbox;
#                         built with `cargo build --release` when missing)
#              AGENTBOX_BENCH_IMAGE  image of the tasks (default agentbox/base:bookworm)
# Everything it creates (a throwaway repo, its worktrees, agentbox's state, containers labelled
# agentbox.bench=<run id>) is removed on exit.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

bench_parse_n 10 ROUNDS "$@"
rounds="$bench_n"
tasks=16
bench_locate_agentbox
bench_check_engine

bench_make_world
repo="$tmp/repo"
bench_make_repo "$repo"
bench_naive_paths "$repo"
cd "$repo"

say "making 3,000 files"
for d in $(seq -w 1 30); do
  mkdir -p "src/d$d"
  for f in $(seq -w 1 100); do
    seq 1 40 | sed "s/^/d$d f$f line /" >"src/d$d/f$f.txt"
  done
done
git add -A
git commit -q -m "bench: 3,000 files"
files="$(git ls-files | wc -l)"

# Task i changes line 5 of two files of its own directory and adds one; tasks 2k-1 and 2k (k <= 4)
# also change line 7 of the same shared file differently: 4 conflicting pairs.
edits() {
  local i="$1" d
  d="$(printf '%02d' "$i")"
  local script="sed -i '5s/.*/changed by t$i/' src/d$d/f001.txt src/d$d/f002.txt && echo t$i > src/d$d/new.txt"
  if ((i <= 8)); then
    script+=" && sed -i '7s/.*/t$i was here/' src/d30/f$(printf '%03d' $(((i + 1) / 2))).txt"
  fi
  printf '%s' "$script"
}

say "running $tasks tasks (untimed)"
file="$tmp/tasks.toml"
: >"$file"
for ((i = 1; i <= tasks; i++)); do
  printf '[[task]]\nname = "t%02d"\ncommand = %s\n\n' "$i" "\"$(edits "$i" | sed 's/"/\\"/g') && git add -A && git commit -qm t$i\"" >>"$file"
  [[ "$image" == "$bench_default_image" ]] || printf 'image = "%s"\n\n' "$image" >>"$file"
done
"$AGENTBOX" batch --label "$label" --parallel 4 "$file" >"$tmp/batch.out" 2>&1 ||
  { tail -n 20 "$tmp/batch.out" >&2; die "the tasks failed"; }

# --- the two sides ------------------------------------------------------------------------------------
side_a() { "$AGENTBOX" conflicts; }

side_n() { # what a user writes by hand
  local i j a b
  for ((i = 1; i <= tasks; i++)); do
    a="agentbox/t$(printf '%02d' "$i")"
    for ((j = i + 1; j <= tasks; j++)); do
      b="agentbox/t$(printf '%02d' "$j")"
      git merge-tree --write-tree --name-only --no-messages "$a" "$b" >/dev/null || echo "$a $b"
    done
    git merge-tree --write-tree --name-only --no-messages main "$a" >/dev/null || echo "$a main"
  done
}

# Both sides find the same 4 conflicting pairs.
found_a="$(side_a 2>/dev/null | grep -c '<->' || true)"
found_n="$(side_n | grep -c . || true)"
[[ "$found_a" == 4 ]] || problem "agentbox conflicts found $found_a conflicting pairs, not 4"
[[ "$found_n" == 4 ]] || problem "the naive loop found $found_n conflicting pairs, not 4"

say "warm-up"
bench_time_side side_a warmup-a
bench_time_side side_n warmup-n
: >"$tmp/times"
for ((r = 1; r <= rounds; r++)); do
  bench_time_side side_a "a-$r"
  a="$bench_ns"
  bench_time_side side_n "n-$r"
  b="$bench_ns"
  printf '%s %s\n' "$a" "$b" >>"$tmp/times"
  awk -v r="$r" -v n="$rounds" -v a="$a" -v b="$b" \
    'BEGIN { printf "conflicts: %2d/%d  agentbox %8.1f ms   naive %8.1f ms\n", r, n, a / 1e6, b / 1e6 }' >&2
done

# --- live state -----------------------------------------------------------------------------------
say "running the $tasks tasks again, held with uncommitted edits (untimed)"
for ((i = 1; i <= tasks; i++)); do
  t="t$(printf '%02d' "$i")"
  "$AGENTBOX" run -d --label "$label" "$t" -- sh -c \
    "echo live >> src/d$(printf '%02d' "$i")/f003.txt; while [ ! -e .bench-release ]; do sleep 0.2; done; rm -f .bench-release" \
    >"$tmp/run-$t.out" 2>&1 || { tail -n 20 "$tmp/run-$t.out" >&2; die "task $t did not start"; }
done
live_a() { "$AGENTBOX" conflicts; }
live_count="$("$AGENTBOX" conflicts --json | tail -n 1 | grep -o '"at":"live"' | wc -l)"
[[ "$live_count" == "$tasks" ]] || problem "only $live_count of $tasks tasks were compared at their live state"
bench_time_side live_a live-warmup
: >"$tmp/live"
for ((r = 1; r <= rounds; r++)); do
  bench_time_side live_a "live-$r"
  printf '%s\n' "$bench_ns" >>"$tmp/live"
  awk -v r="$r" -v n="$rounds" -v a="$bench_ns" \
    'BEGIN { printf "conflicts (live): %2d/%d  agentbox %8.1f ms\n", r, n, a / 1e6 }' >&2
done
for ((i = 1; i <= tasks; i++)); do
  t="t$(printf '%02d' "$i")"
  touch "$(bench_wtroot "$repo")/$t/.bench-release"
done
for ((i = 1; i <= tasks; i++)); do
  "$AGENTBOX" wait "t$(printf '%02d' "$i")" >/dev/null 2>&1 || true
done

# --- summary ------------------------------------------------------------------------------------------
echo "agentbox conflicts  vs  a loop of git merge-tree per pair"
echo "$files files, $tasks tasks: $((tasks * (tasks - 1) / 2)) pairs and $tasks against main; $(nproc) cores; git $(git version | cut -d' ' -f3)"
echo "$rounds rounds alternating (A B A B ...), 1 warm-up each"
bench_awk '
  { m++; a[m] = $1 / 1e6; b[m] = $2 / 1e6; sa += a[m]; sb += b[m] }
  END {
    printf "branches: agentbox median %7.1f ms   mean %7.1f ms\n", median(a, m), sa / m
    printf "branches: naive    median %7.1f ms   mean %7.1f ms\n", median(b, m), sb / m
    printf "branches_median_ms = %.0f\n", median(a, m)
    printf "naive_median_ms = %.0f\n", median(b, m)
  }' "$tmp/times"
bench_awk '
  { m++; a[m] = $1 / 1e6; sa += a[m] }
  END {
    printf "live: agentbox median %7.1f ms   mean %7.1f ms\n", median(a, m), sa / m
    printf "live_median_ms = %.0f\n", median(a, m)
  }' "$tmp/live"

bench_exit_on_problems
