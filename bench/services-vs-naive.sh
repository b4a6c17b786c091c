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
# Environment: AGENTBOX   the binary (default target/release/agentbox, or $CARGO_TARGET_DIR/release/agentbox;
#                         built with `cargo build --release` when missing)
#              AGENTBOX_BENCH_IMAGE  image of the task and the service on every side (default
#                         agentbox/base:bookworm, which images/build-base.sh builds)
# Everything it creates (throwaway repos, their worktrees, agentbox's state, containers and networks
# labelled agentbox.bench=<run id>) is removed on exit.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

bench_parse_n 10 ITERATIONS "$@"
n="$bench_n"
bench_locate_agentbox
bench_check_engine

bench_make_world
svc_repo="$tmp/svc"     # with agentbox.toml: sides S and H
plain_repo="$tmp/plain" # without: side P
# Host ports: agentbox hands out from port_range, the by-hand side uses one fixed port next to it.
port_range="31500-31509"
naive_port=31510
svc_toml="$(
  cat <<TOML
image = "$image"
setup = ["true"]
port_range = "$port_range"

[ports]
web = 8000

[services.db]
image = "$image"
command = ["sleep", "infinity"]
TOML
)"
bench_make_repo "$svc_repo" "$svc_toml"
bench_make_repo "$plain_repo"
bench_naive_paths "$svc_repo"

# --- the three sides ----------------------------------------------------------------------------------
side_s() { # agentbox, with a service, a setup step and a port
  (cd "$svc_repo" && "$AGENTBOX" run --keep-branch --label "$label" "$1" -- true)
}

side_h() { # what a user writes by hand for the same
  local wt="$wtroot/$1" net="bench-$run_id-$1" rc=0
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
  (cd "$plain_repo" && "$AGENTBOX" run --keep-branch --label "$label" "$1" -- true)
}

# check REPO TASK: what every side must leave behind (untimed): the branch; no worktree, container or
# network.
check() { bench_check_task "$1" "$2"; bench_check_leftovers "$2"; }

say "warm-up"
bench_time_side side_s svc-warmup
check "$svc_repo" svc-warmup
bench_time_side side_h hand-warmup
check "$svc_repo" hand-warmup
bench_time_side side_p plain-warmup
check "$plain_repo" plain-warmup

: >"$tmp/times"
for ((i = 1; i <= n; i++)); do
  bench_time_side side_s "svc-$i"
  s="$bench_ns"
  check "$svc_repo" "svc-$i"
  bench_time_side side_h "hand-$i"
  h="$bench_ns"
  check "$svc_repo" "hand-$i"
  bench_time_side side_p "plain-$i"
  p="$bench_ns"
  check "$plain_repo" "plain-$i"
  printf '%s %s %s\n' "$s" "$h" "$p" >>"$tmp/times"
  awk -v i="$i" -v n="$n" -v s="$s" -v h="$h" -v p="$p" \
    'BEGIN { printf "services-vs-naive: %2d/%d  agentbox+services %8.1f ms   by hand %8.1f ms   agentbox plain %8.1f ms\n", i, n, s / 1e6, h / 1e6, p / 1e6 }' >&2
done

# --- summary ------------------------------------------------------------------------------------------
echo "agentbox run (1 service, 1 setup step, 1 port) -- true  vs  the same by hand  vs  agentbox run -- true"
echo "image $image, engine $(bench_engine_version), $n iterations alternating (S H P S H P ...), 1 warm-up each"
bench_awk '
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

bench_exit_on_problems
