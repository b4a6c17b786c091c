#!/usr/bin/env bash
# Benchmark: do 16 tasks that each copy a large untracked file into their worktree (`copy` in
# agentbox.toml) overlap, or does one task's copy hold up the others?
#
#   bench/copy-overlap.sh [-n ROUNDS]
#
# The checkout holds an ignored 200 MB file, `big.bin`; agentbox.toml says `copy = ["big.bin"]`. In one
# run, alternating, ROUNDS rounds (default 3) after one untimed warm-up of each:
#   A   agentbox batch of 16 tasks (`true`), --parallel 16
#   S   the same batch with --parallel 1: the tasks one after another (what no overlap would cost)
#   N   the naive script 16-wide (`xargs -P 16`), each item
#         flock L git worktree add -b agentbox/<task> <wt> HEAD && cp big.bin <wt>/ &&
#         docker run --rm (same mounts as bench/run-vs-naive.sh) IMAGE true &&
#         flock L git worktree remove --force <wt>
# Prints per-batch times on stderr; on stdout the medians, then
#   overlap(serial/parallel, agentbox) = X.XX     (how much the 16 tasks overlap: 1.00 is none)
#   ratio(agentbox/naive, median) = X.XX
#
# Environment: AGENTBOX, AGENTBOX_BENCH_IMAGE as for the other scripts (see bench/lib.sh).
# Everything it creates is removed on exit; it needs about 3.5 GB free under $TMPDIR while it runs.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

tasks=16
bench_parse_n 3 ROUNDS "$@"
rounds="$bench_n"
bench_locate_agentbox
command -v xargs >/dev/null || die "xargs is missing"
bench_check_engine

bench_make_world
mkdir -p "$tmp/files" "$tmp/out"
repo="$tmp/repo"
toml='copy = ["big.bin"]'
[[ "$image" == "$bench_default_image" ]] || toml+=$'\n'"image = \"$image\""
bench_make_repo "$repo" "$toml"
printf 'big.bin\n' >>"$repo/.gitignore"
git -C "$repo" commit -q -am "bench: ignore big.bin"
head -c 200000000 /dev/urandom >"$repo/big.bin"
bench_naive_paths "$repo"
cd "$repo"

# batch_file NAME: the task file of NAME-01..NAME-16.
batch_file() {
  local file="$tmp/files/$1.toml" i
  : >"$file"
  for ((i = 1; i <= tasks; i++)); do
    printf '[[task]]\nname = "%s-%02d"\ncommand = ["true"]\n\n' "$1" "$i" >>"$file"
  done
  echo "$file"
}

side_a() { "$AGENTBOX" batch --keep-branch --label "$label" --parallel "$tasks" "$(batch_file "$1")"; }
side_s() { "$AGENTBOX" batch --keep-branch --label "$label" --parallel 1 "$(batch_file "$1")"; }

naive_one() {
  local task="$1" wt="$wtroot/$1"
  flock "$tmp/naive-worktrees.lock" git worktree add -q -b "agentbox/$task" "$wt" HEAD &&
    cp big.bin "$wt/" &&
    docker run --rm --label "$label" -u "$uidgid" \
      -v "$wt:$wt" -v "$common:$common" \
      -v "$common/config:$common/config:ro" -v "$common/hooks:$common/hooks:ro" \
      -w "$wt" "$image" true &&
    flock "$tmp/naive-worktrees.lock" git worktree remove --force "$wt"
}
export -f naive_one
export tmp wtroot label uidgid common image
side_n() {
  # shellcheck disable=SC2016 # $1 is for the inner bash
  seq -f "$1-%02g" 1 "$tasks" | xargs -P "$tasks" -n 1 bash -c 'naive_one "$1"' naive_one
}

# check NAME: every task's branch is there, nothing is left (untimed). The background deletion of
# agentbox's worktrees may still run: wait for it first, so that it never overlaps the next timing.
check() {
  local i deadline=$((SECONDS + 300))
  while compgen -G "$wtroot/.agentbox-trash-*" >/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
  for ((i = 1; i <= tasks; i++)); do
    bench_check_task "$repo" "$(printf '%s-%02d' "$1" "$i")"
  done
  bench_check_leftovers "$1"
}

say "warm-up"
bench_time_side side_a warm-a
check warm-a
bench_time_side side_n warm-n
check warm-n

: >"$tmp/times"
for ((r = 1; r <= rounds; r++)); do
  bench_time_side side_a "a-$r"
  a="$bench_ns"
  check "a-$r"
  bench_time_side side_s "s-$r"
  s="$bench_ns"
  check "s-$r"
  bench_time_side side_n "n-$r"
  b="$bench_ns"
  check "n-$r"
  printf '%s %s %s\n' "$a" "$s" "$b" >>"$tmp/times"
  awk -v r="$r" -v R="$rounds" -v a="$a" -v s="$s" -v b="$b" \
    'BEGIN { printf "copy-overlap: %d/%d  agentbox --parallel 16 %8.1f ms   --parallel 1 %8.1f ms   naive 16-wide %8.1f ms\n", r, R, a / 1e6, s / 1e6, b / 1e6 }' >&2
done

echo "16 tasks each copying a 200 MB file into their worktree: agentbox batch --parallel 16 / --parallel 1 / the naive script 16-wide"
echo "image $image, engine $(bench_engine_version), $(nproc) cores; $rounds rounds alternating, 1 warm-up each"
bench_awk '
  { m++; a[m] = $1 / 1e6; s[m] = $2 / 1e6; b[m] = $3 / 1e6 }
  END {
    ma = median(a, m); ms = median(s, m); mb = median(b, m)
    printf "agentbox --parallel 16: median %8.1f ms\n", ma
    printf "agentbox --parallel 1:  median %8.1f ms\n", ms
    printf "naive 16-wide:          median %8.1f ms\n", mb
    printf "overlap(serial/parallel, agentbox) = %.2f\n", ms / ma
    printf "ratio(agentbox/naive, median) = %.2f\n", ma / mb
  }' "$tmp/times"

bench_exit_on_problems
