#!/usr/bin/env bash
# Benchmark: a task printing one 50 MB line without a newline, through `agentbox batch` (which splits
# output into lines for its prefixes, its `--json` events and its status line) against `agentbox run`
# (which passes the bytes through).
#
#   bench/long-line.sh [-n ROUNDS]
#
# In one run, alternating, ROUNDS rounds (default 5) after one untimed warm-up of each:
#   R   agentbox run <task> -- sh -c 'head -c 50000000 /dev/zero | tr "\0" x'        > /dev/null
#   B   agentbox batch <file with the same task>                                    > /dev/null
#   J   agentbox batch --json --log-lines <same file>                              > /dev/null
# each under /usr/bin/time for its peak RSS. Prints per-round figures on stderr; on stdout the medians
# and the peak RSS of each, then, last,
#   ratio(batch/run, median) = X.XX
#
# Environment: AGENTBOX, AGENTBOX_BENCH_IMAGE as for the other scripts (see bench/lib.sh).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

bench_parse_n 5 ROUNDS "$@"
rounds="$bench_n"
bench_locate_agentbox
[[ -x /usr/bin/time ]] || die "/usr/bin/time is missing (Debian's time package)"
bench_check_engine

bench_make_world
mkdir -p "$tmp/out"
repo="$tmp/repo"
bench_make_repo "$repo"
cd "$repo"

image_args=()
[[ "$image" == "$bench_default_image" ]] || image_args=(--image "$image")
line='head -c 50000000 /dev/zero | tr "\0" x'

side_r() {
  /usr/bin/time -f %M -o "$tmp/out/$1.rss" \
    "$AGENTBOX" run --label "$label" "${image_args[@]}" "$1" -- sh -c "$line" >/dev/null
}

task_file() {
  local file="$tmp/out/$1.toml"
  printf '[[task]]\nname = "%s"\ncommand = ["sh", "-c", %s]\n' "$1" "$(printf '%s' "$line" | sed 's/\\/\\\\/g; s/"/\\"/g; s/.*/"&"/')" >"$file"
  [[ "$image" == "$bench_default_image" ]] || printf 'image = "%s"\n' "$image" >>"$file"
  echo "$file"
}

side_b() {
  /usr/bin/time -f %M -o "$tmp/out/$1.rss" \
    "$AGENTBOX" batch --label "$label" "$(task_file "$1")" >/dev/null
}

side_j() {
  /usr/bin/time -f %M -o "$tmp/out/$1.rss" \
    "$AGENTBOX" batch --json --log-lines --label "$label" "$(task_file "$1")" >/dev/null
}

rss() { tail -n 1 "$tmp/out/$1.rss"; }

say "warm-up"
bench_time_side side_r warm-r
bench_time_side side_b warm-b
bench_time_side side_j warm-j
bench_check_leftovers warm-up

: >"$tmp/times"
for ((i = 1; i <= rounds; i++)); do
  bench_time_side side_r "r-$i"
  r="$bench_ns"
  bench_time_side side_b "b-$i"
  b="$bench_ns"
  bench_time_side side_j "j-$i"
  j="$bench_ns"
  bench_check_leftovers "round $i"
  printf '%s %s %s %s %s %s\n' "$r" "$b" "$j" "$(rss "r-$i")" "$(rss "b-$i")" "$(rss "j-$i")" >>"$tmp/times"
  awk -v i="$i" -v n="$rounds" -v r="$r" -v b="$b" -v j="$j" \
    'BEGIN { printf "long-line: %d/%d  run %8.1f ms   batch %8.1f ms   batch --json --log-lines %8.1f ms\n", i, n, r / 1e6, b / 1e6, j / 1e6 }' >&2
done

echo "one 50 MB line without a newline: agentbox run vs agentbox batch (and batch --json --log-lines)"
echo "image $image, engine $(bench_engine_version), $(nproc) cores; $rounds rounds alternating, 1 warm-up each"
bench_awk '
  { m++; r[m] = $1 / 1e6; b[m] = $2 / 1e6; j[m] = $3 / 1e6
    if ($4 > rr) rr = $4; if ($5 > rb) rb = $5; if ($6 > rj) rj = $6 }
  END {
    mr = median(r, m); mb = median(b, m); mj = median(j, m)
    printf "run:                      median %8.1f ms   peak RSS %6.1f MiB\n", mr, rr / 1024
    printf "batch:                    median %8.1f ms   peak RSS %6.1f MiB\n", mb, rb / 1024
    printf "batch --json --log-lines: median %8.1f ms   peak RSS %6.1f MiB\n", mj, rj / 1024
    printf "ratio(batch --json/run, median) = %.2f\n", mj / mr
    printf "ratio(batch/run, median) = %.2f\n", mb / mr
  }' "$tmp/times"

bench_exit_on_problems
