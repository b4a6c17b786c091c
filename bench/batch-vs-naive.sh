#!/usr/bin/env bash
# Benchmark: what does `agentbox batch` cost over the script a user would write by hand to run N tasks
# at once?
#
#   bench/batch-vs-naive.sh [-n ROUNDS]
#
# For N = 1, 4, 16 and 64 tasks (each task's command: `true`), in one run:
#   A  agentbox batch <file of N tasks> --parallel N
#   B  the same N tasks through the naive script, N-wide: `xargs -P N`, each item being
#        flock L git worktree add -b agentbox/<task> <wt> HEAD &&
#        docker run --rm -u uid:gid -v <wt>:<wt> -v <common dir>:<common dir> (config, hooks read-only)
#          -w <wt> IMAGE true &&
#        flock L git worktree remove --force <wt>  (the branch stays, as with agentbox)
#      The flock is what a user adds once git's own races have bitten them (without it, 16
#      `git worktree add`s at once lose a third of their tasks to "failed to read .../commondir",
#      and a side that skips its containers is not a fair yardstick); agentbox takes turns the same
#      way.
# alternating A and B for each N, ROUNDS rounds (default 3) after one untimed warm-up of each side,
# with fresh task names every time; before each batch (untimed) agentbox's background deletions of the
# one before are done, so that they do not load the machine while the next batch is timed. Measures the wall-clock time of each batch and the peak RSS of
# `agentbox batch` (`/usr/bin/time -f %M`, which reports the largest of the process and the children it
# waited for; Debian's `time` package is installed when /usr/bin/time is missing).
#
# agentbox's batches must all succeed (exit 0, every branch there, no worktree or container left):
# every shortfall is reported as a PROBLEM and, after the summary, the script exits 1. A naive item
# that fails anyway simply fails, as it would for a user. Failures are counted and reported per side
# instead of aborting; the naive side's leftovers are cleaned up (untimed) after each batch.
#
# Prints per-batch times on stderr; on stdout, per N, the median wall clock of each side, the ratio
# agentbox/naive of the medians, agentbox's peak RSS (max over rounds) and the failures of each side;
# then peak_rss_mib(N=...) per N and, last,
#   ratio(N=1) = X.XX   ...   ratio(N=64) = X.XX
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
sizes=(1 4 16 64)

bench_parse_n 3 ROUNDS "$@"
rounds="$bench_n"
bench_locate_agentbox

if [[ ! -x /usr/bin/time ]]; then
  say "/usr/bin/time is missing; installing Debian's time package"
  sudo=()
  ((EUID == 0)) || sudo=(sudo)
  "${sudo[@]}" apt-get install -y -qq time >/dev/null || die "cannot install the time package (apt-get install -y time)"
fi
[[ -x /usr/bin/time ]] || die "/usr/bin/time is missing"
command -v xargs >/dev/null || die "xargs is missing"
bench_check_engine

bench_make_world
mkdir -p "$tmp/files" "$tmp/out"
repo="$tmp/repo"
bench_make_repo "$repo"
bench_naive_paths "$repo"
cd "$repo"

# --- the two sides ------------------------------------------------------------------------------------
# side_a NAME N: `agentbox batch` of N tasks NAME-01..NAME-NN; peak RSS (KiB) into $tmp/out/NAME.rss.
side_a() {
  local name="$1" n="$2" file="$tmp/files/$1.toml" i
  : >"$file"
  for ((i = 1; i <= n; i++)); do
    printf '[[task]]\nname = "%s-%02d"\ncommand = ["true"]\n\n' "$name" "$i" >>"$file"
  done
  [[ "$image" == "$bench_default_image" ]] || sed -i "s|^command = |image = \"$image\"\ncommand = |" "$file"
  /usr/bin/time -f %M -o "$tmp/out/$name.rss" \
    "$AGENTBOX" batch --keep-branch --label "$label" --parallel "$n" "$file"
}

# naive_one TASK: what a user writes by hand for one task. Leaves $tmp/out/TASK.fail when it fails.
naive_one() {
  local task="$1" wt="$wtroot/$1"
  if ! {
    flock "$tmp/naive-worktrees.lock" git worktree add -q -b "agentbox/$task" "$wt" HEAD &&
      docker run --rm --label "$label" -u "$uidgid" \
        -v "$wt:$wt" -v "$common:$common" \
        -v "$common/config:$common/config:ro" -v "$common/hooks:$common/hooks:ro" \
        -w "$wt" "$image" true &&
      flock "$tmp/naive-worktrees.lock" git worktree remove --force "$wt"
  }; then
    : >"$tmp/out/$task.fail"
    return 1
  fi
}
export -f naive_one
export tmp wtroot label uidgid common image

# side_n NAME N: the N tasks NAME-01..NAME-NN through naive_one, N-wide.
side_n() {
  local name="$1" n="$2"
  # shellcheck disable=SC2016 # $1 is for the inner bash
  seq -f "$name-%02g" 1 "$n" | xargs -P "$n" -n 1 bash -c 'naive_one "$1"' naive_one
}

# --- bookkeeping --------------------------------------------------------------------------------------
bench_problems_where="on the agentbox side"

# time_batch SIDE NAME N: bench_time of one batch, logged to $tmp/out/NAME.log.
time_batch() { bench_time "$tmp/out/$2.log" "$@"; }

# check_a NAME N RC: agentbox's batch must have succeeded completely.
check_a() {
  local name="$1" n="$2" rc="$3" i
  if ((rc != 0)); then
    problem "agentbox batch $name (N=$n) exited $rc:"
    tail -n 30 "$tmp/out/$name.log" >&2
  fi
  for ((i = 1; i <= n; i++)); do
    bench_check_task "$repo" "$(printf '%s-%02d' "$name" "$i")"
  done
  bench_check_leftovers "$name"
}

# tidy_n NAME N: counts the naive batch's failed items (prints the count) and removes what the failed
# ones left behind (worktrees, their metadata), so that the next batch starts clean. Untimed.
tidy_n() {
  local name="$1" n="$2" failed wt i ids
  failed="$(find "$tmp/out" -maxdepth 1 -name "$name-*.fail" | wc -l)"
  if ((failed > 0)); then
    say "naive $name: $failed of $n item(s) failed; first errors:"
    grep -v '^$' "$tmp/out/$name.log" | head -n 5 | sed 's/^/    /' >&2
  fi
  for ((i = 1; i <= n; i++)); do
    wt="$wtroot/$(printf '%s-%02d' "$name" "$i")"
    if [[ -e "$wt" ]]; then
      git worktree remove --force --force "$wt" >/dev/null 2>&1 || rm -rf "$wt"
    fi
  done
  git worktree prune
  # Only the naive side's containers: the network agentbox's tasks share stays, as it does for a
  # user between batches (removing it would charge every timed batch its creation).
  ids="$(docker ps -a --filter "label=$label" --format '{{.ID}} {{.Label "agentbox.repo"}}' 2>/dev/null |
    awk '$2 == "" { print $1 }' || true)"
  # shellcheck disable=SC2086 # one id per word
  [[ -z "$ids" ]] || docker rm -f $ids >/dev/null 2>&1 || true
  echo "$failed"
}

# --- the runs -----------------------------------------------------------------------------------------
say "warm-up"
time_batch side_a warm-a 1
check_a warm-a 1 "$bench_rc"
time_batch side_n warm-n 1
tidy_n warm-n 1 >/dev/null

# One line per batch: N side ns rc failed_items rss_kib
: >"$tmp/times"
for ((r = 1; r <= rounds; r++)); do
  for n in "${sizes[@]}"; do
    name="a-r$r-n$n"
    bench_wait_purged
    time_batch side_a "$name" "$n"
    ta="$bench_ns" rc="$bench_rc"
    check_a "$name" "$n" "$rc"
    rss="$(tail -n 1 "$tmp/out/$name.rss")"
    # Failed tasks: rows of batch's summary table (TASK EXIT DURATION COMMITS FILES BRANCH) whose
    # exit code is not 0.
    failed_a="$(awk -v re="^$name-[0-9]+\$" '$1 ~ re && NF == 6 && $2 ~ /^[0-9]+$/ && $6 ~ /^agentbox\// && $2 != "0" { f++ } END { print f + 0 }' "$tmp/out/$name.log")"
    ((rc == 0 || failed_a > 0)) || failed_a="$n"
    printf '%s a %s %s %s %s\n' "$n" "$ta" "$rc" "$failed_a" "$rss" >>"$tmp/times"

    name="n-r$r-n$n"
    bench_wait_purged
    time_batch side_n "$name" "$n"
    tn="$bench_ns" rc="$bench_rc"
    failed_n="$(tidy_n "$name" "$n")"
    printf '%s n %s %s %s 0\n' "$n" "$tn" "$rc" "$failed_n" >>"$tmp/times"

    awk -v r="$r" -v R="$rounds" -v n="$n" -v a="$ta" -v b="$tn" -v rss="$rss" -v fa="$failed_a" -v fn="$failed_n" \
      'BEGIN { printf "batch-vs-naive: round %d/%d N=%-2d  agentbox %8.1f ms (%5.1f MiB, %d failed)   naive %8.1f ms (%d failed)\n", r, R, n, a / 1e6, rss / 1024, fa, b / 1e6, fn }' >&2
  done
done

# --- summary ------------------------------------------------------------------------------------------
echo "agentbox batch (N tasks, --parallel N)  vs  N x (git worktree add + docker run --rm + git worktree remove) via xargs -P N"
echo "task command: true; image $image, engine $(bench_engine_version), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg); $rounds rounds alternating (A B per N), 1 warm-up each"
bench_awk -v sizes="${sizes[*]}" '
  $2 == "a" { n = $1; ca[n]++; a[n, ca[n]] = $3 / 1e6; if ($6 > rss[n]) rss[n] = $6; fa[n] += $5; if ($4 != 0) ba[n]++ }
  $2 == "n" { n = $1; cn[n]++; b[n, cn[n]] = $3 / 1e6; fn[n] += $5; if ($4 != 0) bn[n]++ }
  END {
    count = split(sizes, size, " ")
    for (i = 1; i <= count; i++) {
      n = size[i]
      delete va; delete vb
      for (j = 1; j <= ca[n]; j++) va[j] = a[n, j]
      for (j = 1; j <= cn[n]; j++) vb[j] = b[n, j]
      ma[n] = median(va, ca[n]); mb[n] = median(vb, cn[n])
      printf "N=%-2d  agentbox: median %8.1f ms   naive: median %8.1f ms   ratio %.2f   agentbox peak RSS %.1f MiB\n", n, ma[n], mb[n], ma[n] / mb[n], rss[n] / 1024
      printf "      failures: agentbox %d of %d batches, %d of %d tasks; naive %d of %d batches, %d of %d tasks\n", ba[n] + 0, ca[n], fa[n] + 0, n * ca[n], bn[n] + 0, cn[n], fn[n] + 0, n * cn[n]
    }
    for (i = 1; i <= count; i++) { n = size[i]; printf "peak_rss_mib(N=%d) = %.1f\n", n, rss[n] / 1024 }
    for (i = 1; i <= count; i++) { n = size[i]; printf "ratio(N=%d) = %.2f\n", n, ma[n] / mb[n] }
  }' "$tmp/times"

bench_exit_on_problems
