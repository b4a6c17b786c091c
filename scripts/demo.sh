#!/usr/bin/env bash
# One command from a fresh clone to a finished agentbox task: builds the default image if it is
# missing (images/build-base.sh, no registry needed), builds agentbox, makes a throwaway repository
# and runs a task in it that edits a file, commits, and leaves one more change uncommitted — which
# agentbox keeps as a snapshot commit on the task's branch.
#
#   bash scripts/demo.sh              run it; everything it makes is under one temp directory,
#                                     deleted at the end
#   KEEP_DEMO=1 bash scripts/demo.sh  keep that directory (the repository with the task's branch, and
#                                     agentbox's state) to look around; it prints where it is
#
# The first run takes minutes: building the image (debootstrap, needs root or passwordless sudo) and a
# release build of agentbox. Later runs reuse both and take seconds.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"

say() { printf 'demo: %s\n' "$*" >&2; }

say "the first run takes a few minutes: it builds the image agentbox/base:bookworm if it is missing, and a release build of agentbox"
bash "$here/images/build-base.sh"
cargo build --release --locked --manifest-path "$here/Cargo.toml" >&2
agentbox="$here/target/release/agentbox"

demo="$(mktemp -d "${TMPDIR:-/tmp}/agentbox-demo.XXXXXX")"
finish() {
  if [[ "${KEEP_DEMO:-}" == 1 ]]; then
    say "the demo is kept in $demo (KEEP_DEMO=1)"
    say "  its repository: cd $demo/project && git log --stat agentbox/hello"
    say "  agentbox's view of it: cd $demo/project && XDG_STATE_HOME=$demo/state $agentbox ls"
    say "  remove it with: rm -rf $demo"
  else
    say "the demo lived in $demo and is deleted now; run with KEEP_DEMO=1 to keep it"
    rm -rf "$demo"
  fi
}
trap finish EXIT
export XDG_STATE_HOME="$demo/state"
repo="$demo/project"
git init -q -b main "$repo"
git -C "$repo" -c user.name=demo -c user.email=demo@example.com commit -q --allow-empty -m "start"
cd "$repo"

echo "+ agentbox run hello -- sh -c '…'" >&2
# shellcheck disable=SC2016 # the task's shell expands these, inside the container
"$agentbox" run hello -- sh -c '
  echo "hello from task $AGENTBOX_TASK on $(git branch --show-current)" > hello.txt
  git add hello.txt && git commit -qm "say hello" && echo "committed inside the container"
  echo "not committed by the task" > notes.txt'

echo "+ agentbox ls" >&2
"$agentbox" ls
echo "+ git log --oneline --stat agentbox/hello" >&2
git log --oneline --stat agentbox/hello
