#!/usr/bin/env bash
# Benchmark: does a task's output reach agentbox's stdout at the engine's speed?
#
#   bench/output-vs-docker.sh [-n ROUNDS]
#
# A task printing 200 MB to stdout (`head -c 200000000 /dev/zero`), in one run, alternating, ROUNDS rounds
# (default 5) after one untimed warm-up of each:
#   A  agentbox run <task> -- sh -c 'head -c 200000000 /dev/zero'      | counter
#   D  docker run --rm IMAGE sh -c 'head -c 200000000 /dev/zero'       | counter
# The counter (perl) reads its stdin in 1 MiB blocks and notes the clock at the first byte and at the
# end: the throughput is the bytes over that span, so that the sides' start and teardown costs, which
# other benchmarks measure, do not count. Every byte must arrive (a short count is a problem).
# agentbox's peak RSS comes from `/usr/bin/time -f %M`.
#
# Prints per-round figures on stderr; on stdout the medians of each side (MB/s, and whole wall time)
# and agentbox's peak RSS, then, last,
#   ratio(agentbox/docker throughput, median) = X.XX      (the issue's goal: >= 0.9)
#
# Environment: AGENTBOX, AGENTBOX_BENCH_IMAGE as for the other scripts (see bench/lib.sh).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

bench_parse_n 5 ROUNDS "$@"
rounds="$bench_n"
bench_locate_agentbox
[[ -x /usr/bin/time ]] || die "/usr/bin/time is missing (Debian's time package)"
command -v perl >/dev/null || die "perl is missing"
bench_check_engine

bench_make_world
mkdir -p "$tmp/out"
repo="$tmp/repo"
bench_make_repo "$repo"
cd "$repo"

bytes=200000000
print=(sh -c "head -c $bytes /dev/zero")
image_args=()
[[ "$image" == "$bench_default_image" ]] || image_args=(--image "$image")

# count OUT: the counter; writes "bytes first_ns last_ns" to OUT.
count() {
  perl -MTime::HiRes=time -e '
    my ($n, $first) = (0, undef);
    while ((my $r = sysread(STDIN, my $buf, 1 << 20)) > 0) { $first //= time; $n += $r }
    my $last = time;
    printf "%d %.0f %.0f\n", $n, ($first // $last) * 1e9, $last * 1e9' >"$1"
}

side_a() {
  /usr/bin/time -f %M -o "$tmp/out/$1.rss" \
    "$AGENTBOX" run --label "$label" "${image_args[@]}" "$1" -- "${print[@]}" | count "$tmp/out/$1.count"
}

side_d() {
  docker run --rm --label "$label" "$image" "${print[@]}" | count "$tmp/out/$1.count"
}

# counted TASK: "bytes span_ns" of a side's run; a short count is a problem.
counted() {
  local got first last
  read -r got first last <"$tmp/out/$1.count"
  ((got == bytes)) || problem "$1: $got bytes arrived, not $bytes"
  echo "$got $((last - first))"
}

say "warm-up"
bench_time_side side_a warm-a
bench_time_side side_d warm-d
bench_wait_purged
bench_check_leftovers warm-up

: >"$tmp/times"
for ((i = 1; i <= rounds; i++)); do
  bench_time_side side_a "a-$i"
  a="$bench_ns"
  bench_wait_purged
  bench_time_side side_d "d-$i"
  d="$bench_ns"
  bench_check_leftovers "round $i"
  line="$a $(counted "a-$i") $d $(counted "d-$i") $(tail -n 1 "$tmp/out/a-$i.rss")"
  echo "$line" >>"$tmp/times"
  awk -v i="$i" -v n="$rounds" -v line="$line" 'BEGIN {
    split(line, v, " ")
    printf "output-vs-docker: %d/%d  agentbox %7.1f MB/s (%7.1f ms in all)   docker %7.1f MB/s (%7.1f ms in all)\n", i, n, v[2] / (v[3] / 1e3), v[1] / 1e6, v[5] / (v[6] / 1e3), v[4] / 1e6
  }' >&2
done

echo "200 MB on stdout into a pipe: agentbox run vs docker run --rm, throughput from the first byte to the end"
echo "image $image, engine $(bench_engine_version), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg); $rounds rounds alternating, 1 warm-up each"
bench_awk '
  { m++; wa[m] = $1 / 1e6; ta[m] = $2 / ($3 / 1e3); wd[m] = $4 / 1e6; td[m] = $5 / ($6 / 1e3); if ($7 > rss) rss = $7 }
  END {
    ma = median(ta, m); md = median(td, m)
    printf "agentbox: median %7.1f MB/s   whole run median %8.1f ms   peak RSS %.1f MiB\n", ma, median(wa, m), rss / 1024
    printf "docker:   median %7.1f MB/s   whole run median %8.1f ms\n", md, median(wd, m)
    printf "ratio(agentbox/docker throughput, median) = %.2f\n", ma / md
  }' "$tmp/times"

bench_exit_on_problems
