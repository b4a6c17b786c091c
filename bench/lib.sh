# shellcheck shell=bash
# What the bench/*-vs-naive.sh scripts share, so that they measure the same way and each keeps only what
# it times and what it prints. Sourced right after `set -euo pipefail`:
#
#   # shellcheck source-path=SCRIPTDIR source=lib.sh
#   source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
#
# It defines image (AGENTBOX_BENCH_IMAGE or bench_default_image), problems, the functions below and,
# once called, AGENTBOX (bench_locate_agentbox), run_id, label, tmp (bench_make_world) and wtroot,
# common, uidgid (bench_naive_paths).

# Every message on stderr starts with the script's name, so that interleaved logs stay readable.
bench_name="$(basename "$0" .sh)"
bench_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bench_default_image="agentbox/base:bookworm"
image="${AGENTBOX_BENCH_IMAGE:-$bench_default_image}"
problems=0
bench_repos=()

say() { echo "$bench_name: $*" >&2; }
die() { say "$*"; exit 1; }

# problem: a shortfall (something left behind, a failed task) that should not stop the timing; counted,
# and bench_exit_on_problems fails the run at the end, after the numbers are printed.
problem() { say "PROBLEM: $*"; problems=$((problems + 1)); }

# bench_exit_on_problems: exit 1 when problem was called, so that a run whose sides did not do their job
# never passes for a good one. bench_problems_where, when set, says where they were seen.
bench_problems_where=""
bench_exit_on_problems() {
  if ((problems > 0)); then
    say "$problems problem(s) seen${bench_problems_where:+ $bench_problems_where}, see above"
    exit 1
  fi
}

# bench_parse_n DEFAULT WORD "$@": the scripts' one option, -n, into bench_n (DEFAULT without it); WORD
# names it in the usage line. Anything else is a usage error (exit 2).
bench_parse_n() {
  local word="$2" opt OPTIND=1 OPTARG
  bench_n="$1"
  shift 2
  while getopts ":n:h" opt; do
    case "$opt" in
      n) bench_n="$OPTARG" ;;
      *) bench_usage "$word" ;;
    esac
  done
  shift $((OPTIND - 1))
  (($# == 0)) || bench_usage "$word"
  [[ "$bench_n" =~ ^[1-9][0-9]*$ ]] || die "-n wants a positive number, got '$bench_n'"
}
bench_usage() { echo "usage: $0 [-n $1]" >&2; exit 2; }

# bench_locate_agentbox: AGENTBOX as an absolute path (the scripts cd into their repos). By default the
# release build of this checkout ($CARGO_TARGET_DIR honoured), built only when it is missing: a run
# measures the binary that is there and never rebuilds from sources someone is halfway through editing.
bench_locate_agentbox() {
  local target_dir
  if [[ -z "${AGENTBOX:-}" ]]; then
    target_dir="${CARGO_TARGET_DIR:-target}"
    [[ "$target_dir" == /* ]] || target_dir="$bench_root/$target_dir"
    AGENTBOX="$target_dir/release/agentbox"
    if [[ ! -x "$AGENTBOX" ]]; then
      say "building $AGENTBOX (cargo build --release)"
      (cd "$bench_root" && cargo build --release --locked --quiet)
    fi
  fi
  [[ -x "$AGENTBOX" ]] || die "agentbox binary not found or not executable: $AGENTBOX"
  AGENTBOX="$(cd "$(dirname "$AGENTBOX")" && pwd)/$(basename "$AGENTBOX")"
}

# bench_check_engine: fail before anything is created when there is no engine or no image (a pull in the
# middle of the timing would swamp it).
bench_check_engine() {
  docker info >/dev/null 2>&1 || die "no Docker engine answers (docker info failed)"
  docker image inspect "$image" >/dev/null 2>&1 || die "image $image is missing; build it with images/build-base.sh"
}

# bench_engine_version: for the summary's header; numbers from different engines do not compare.
bench_engine_version() { docker version -f '{{.Server.Version}}' 2>/dev/null || echo '?'; }

# bench_make_world: a throwaway world, removed on exit (also on Ctrl-C or TERM), so that the benchmark
# neither reads nor leaves anything of the user's: the directory tmp for the repos, their worktrees and
# the logs; agentbox's state (XDG_STATE_HOME) and git's global config inside it; and label, which every
# container and network of the run carries, so that the cleanup removes those and only those.
bench_make_world() {
  run_id="$(date +%s)-$$"
  label="agentbox.bench=$run_id"
  tmp="$(mktemp -d "${TMPDIR:-/tmp}/agentbox-bench.XXXXXX")"
  tmp="$(cd "$tmp" && pwd -P)"
  trap bench_cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM

  export XDG_STATE_HOME="$tmp/state"
  export GIT_CONFIG_GLOBAL="$tmp/gitconfig"
  export GIT_CONFIG_NOSYSTEM=1
  mkdir -p "$XDG_STATE_HOME"
  git config --file "$GIT_CONFIG_GLOBAL" user.name "agentbox bench"
  git config --file "$GIT_CONFIG_GLOBAL" user.email "bench@agentbox.invalid"
  git config --file "$GIT_CONFIG_GLOBAL" init.defaultBranch main
}

# bench_make_repo DIR [AGENTBOX_TOML]: a small committed project at DIR, with agentbox.toml holding
# AGENTBOX_TOML when given; the same project in every benchmark, so that their numbers compare.
bench_make_repo() {
  bench_repos+=("$1")
  git init -q "$1"
  mkdir -p "$1/src"
  printf '# bench repo\n' >"$1/README.md"
  printf 'fn main() {\n    println!("hello");\n}\n' >"$1/src/main.rs"
  printf 'target/\n' >"$1/.gitignore"
  seq 1 200 >"$1/numbers.txt"
  if (($# > 1)); then
    printf '%s\n' "$2" >"$1/agentbox.toml"
  fi
  git -C "$1" add -A
  git -C "$1" commit -q -m "bench: initial commit"
}

# bench_wtroot DIR: agentbox's default worktree root for the repository at DIR.
bench_wtroot() { echo "${1%/*}/.agentbox-worktrees/${1##*/}"; }

# bench_naive_paths REPO: what a naive side needs to do by hand what agentbox does for REPO: wtroot
# (agentbox's worktree root, so that both sides write to the same place), common (REPO's git common dir,
# which a worktree's container must mount to commit) and uidgid (the user the container runs as).
# shellcheck disable=SC2034 # read by the scripts
bench_naive_paths() {
  wtroot="$(bench_wtroot "$1")"
  common="$(git -C "$1" rev-parse --path-format=absolute --git-common-dir)"
  uidgid="$(id -u):$(id -g)"
}

# bench_remove_labelled: removes the run's containers, then its networks and volumes (which those may
# hold) and the images its tasks built, quietly.
bench_remove_labelled() {
  local ids
  ids="$(docker ps -aq --filter "label=$label" 2>/dev/null || true)"
  if [[ -n "$ids" ]]; then
    # shellcheck disable=SC2086 # one id per word
    docker rm -f $ids >/dev/null 2>&1 || true
  fi
  ids="$(docker network ls -q --filter "label=$label" 2>/dev/null || true)"
  if [[ -n "$ids" ]]; then
    # shellcheck disable=SC2086 # one id per word
    docker network rm $ids >/dev/null 2>&1 || true
  fi
  ids="$(docker volume ls -q --filter "label=$label" 2>/dev/null || true)"
  if [[ -n "$ids" ]]; then
    # shellcheck disable=SC2086 # one id per word
    docker volume rm $ids >/dev/null 2>&1 || true
  fi
  # Images agentbox built for a devcontainer carry the labels of the task that built them.
  ids="$(docker images -q --filter "label=$label" 2>/dev/null || true)"
  if [[ -n "$ids" ]]; then
    # shellcheck disable=SC2086 # one id per word
    docker rmi -f $ids >/dev/null 2>&1 || true
  fi
}

# bench_cleanup: the EXIT trap: whatever the run created, however far it got.
bench_cleanup() {
  local r
  bench_remove_labelled
  for r in "${bench_repos[@]}"; do
    if [[ -d "$r/.git" ]]; then
      rm -rf "$(bench_wtroot "$r")"
      git -C "$r" worktree prune || true
    fi
  done
  rm -rf "$tmp"
}

# bench_time LOG CMD [ARG...]: runs CMD with its output into LOG; its wall time in ns into bench_ns, the
# clock (ns since the epoch) when it started into bench_t0 and its exit code into bench_rc. Only CMD
# stands between the two readings of the clock.
bench_time() {
  local log="$1" t1
  shift
  bench_rc=0
  bench_t0="$(date +%s%N)"
  "$@" >"$log" 2>&1 || bench_rc=$?
  t1="$(date +%s%N)"
  # shellcheck disable=SC2034 # read by the scripts
  bench_ns=$((t1 - bench_t0))
}

# bench_time_side SIDE TASK: bench_time of `SIDE TASK`, logged to $tmp/TASK.out; a failed side aborts the
# benchmark (exit 1, after the log's last lines), since its time would mean nothing.
bench_time_side() {
  bench_time "$tmp/$2.out" "$@"
  if ((bench_rc != 0)); then
    say "$1 $2 failed (exit $bench_rc):"
    tail -n 20 "$tmp/$2.out" >&2
    exit 1
  fi
}

# bench_check_task REPO TASK: what every side must leave of a task (untimed): the branch agentbox/TASK,
# and no worktree, neither its directory nor git's record of it.
bench_check_task() {
  local repo="$1" task="$2" wt
  wt="$(bench_wtroot "$repo")/$task"
  git -C "$repo" rev-parse -q --verify "refs/heads/agentbox/$task" >/dev/null || problem "$task: branch agentbox/$task missing"
  [[ ! -e "$wt" ]] || problem "$task: worktree $wt still exists"
  ! git -C "$repo" worktree list --porcelain | grep -qx "worktree $wt" || problem "$task: git worktree list still shows it"
}

# bench_check_leftovers WHAT: no side may leave a container or network behind (untimed), once agentbox's
# background deletions (which remove a finished task's stopped container) are done; each one left is a
# problem of WHAT and is removed, so that the next check sees only its own.
bench_check_leftovers() {
  local c
  bench_wait_purged
  c="$(docker ps -aq --filter "label=$label")"
  if [[ -n "$c" ]]; then
    problem "$1: container(s) left behind: $(echo "$c" | tr '\n' ' ')"
    # shellcheck disable=SC2086 # one id per word
    docker rm -f $c >/dev/null 2>&1 || true
  fi
  # The network a repository's tasks without services share (containers on it cannot reach each
  # other) outlives its tasks by design; `agentbox gc` removes it, and so does the exit trap.
  c="$(docker network ls --filter "label=$label" --format '{{.ID}} {{.Name}}' | awk '$2 !~ /--isolated-[0-9a-f]+$/ { print $1 }')"
  if [[ -n "$c" ]]; then
    problem "$1: network(s) left behind: $(echo "$c" | tr '\n' ' ')"
    # shellcheck disable=SC2086 # one id per word
    docker network rm $c >/dev/null 2>&1 || true
  fi
}

# bench_awk [-v VAR=VALUE]... PROGRAM [FILE...]: awk with median(V, M) defined, the median of V[1..M]
# (insertion sort: M is a few dozen at most), so that every summary computes it the same way.
bench_awk() {
  local vars=() program
  while [[ "$1" == -v ]]; do
    vars+=(-v "$2")
    shift 2
  done
  program="$1"
  shift
  awk "${vars[@]}" '
  function median(v, m,   s, j, k, t) {
    for (j = 1; j <= m; j++) s[j] = v[j]
    for (j = 2; j <= m; j++) { t = s[j]; for (k = j - 1; k >= 1 && s[k] > t; k--) s[k + 1] = s[k]; s[k + 1] = t }
    return (m % 2) ? s[(m + 1) / 2] : (s[m / 2] + s[m / 2 + 1]) / 2
  }'"$program" "$@"
}

# bench_make_files DIR COUNT: COUNT small files of distinct contents under DIR, 100 to a directory
# (d00001/f000 ...), the shape of a real source tree rather than one huge directory.
bench_make_files() {
  local dir="$1" count="$2" d=0 left="$2" now
  while ((left > 0)); do
    now=$((left < 100 ? left : 100))
    d=$((d + 1))
    mkdir -p "$dir/$(printf 'd%05d' "$d")"
    seq "$(((d - 1) * 100 + 1))" "$(((d - 1) * 100 + now))" | split -l 1 -a 3 -d - "$dir/$(printf 'd%05d' "$d")/f"
    left=$((left - now))
  done
}

# bench_make_sized_repo DIR FILES [AGENTBOX_TOML]: bench_make_repo's project with files added until it
# tracks about FILES files, in one more commit.
bench_make_sized_repo() {
  bench_make_repo "$1" "${@:3}"
  local extra=$(($2 - $(git -C "$1" ls-files | wc -l)))
  if ((extra > 0)); then
    bench_make_files "$1/tree" "$extra"
    git -C "$1" add -A
    git -C "$1" commit -q -m "bench: $2 files"
  fi
}

# bench_wait_purged: waits (untimed, at most 10 minutes) until agentbox's background deletions are
# done — no trash manifest left in the world's state dir — so that one side's deletion does not load
# the disk while the next side is timed. A deletion that never finishes is a problem.
bench_wait_purged() {
  local i
  for ((i = 0; i < 6000; i++)); do
    compgen -G "$XDG_STATE_HOME/agentbox/*/trash/*.json" >/dev/null || return 0
    sleep 0.1
  done
  problem "background deletion not finished after 10 minutes: $(echo "$XDG_STATE_HOME"/agentbox/*/trash/*.json)"
}

# bench_wait_pool_ready N: waits (untimed, at most 10 minutes) until the pool of the repository in the
# current directory has N ready slots and none being made, so that a pooled side finds its slot and
# no refill runs while anything is timed.
bench_wait_pool_ready() {
  local i status
  for ((i = 0; i < 3000; i++)); do
    status="$("$AGENTBOX" pool status --json 2>/dev/null || true)"
    if (($(grep -c '"state":"ready"' <<<"$status") >= $1)) && ! grep -q '"state":"creating"' <<<"$status"; then
      return 0
    fi
    sleep 0.2
  done
  problem "the pool did not get $1 ready slot(s) in 10 minutes: $status"
}
