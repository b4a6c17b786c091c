#!/usr/bin/env bash
# One command from a fresh clone to a finished agentbox task: builds the default image if it is
# missing (images/build-base.sh, no registry needed), builds agentbox, makes a throwaway repository
# and runs a task in it that edits a file, commits, and leaves one more change uncommitted — which
# agentbox keeps as a snapshot commit on the task's branch. Everything it makes is under one temp
# directory, removed at the end (set KEEP_DEMO=1 to keep it).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"

bash "$here/images/build-base.sh"
cargo build --release --locked --manifest-path "$here/Cargo.toml" >&2
agentbox="$here/target/release/agentbox"

demo="$(mktemp -d "${TMPDIR:-/tmp}/agentbox-demo.XXXXXX")"
[[ "${KEEP_DEMO:-}" == 1 ]] || trap 'rm -rf "$demo"' EXIT
export XDG_STATE_HOME="$demo/state"
repo="$demo/project"
git init -q -b main "$repo"
git -C "$repo" -c user.name=demo -c user.email=demo@example.com commit -q --allow-empty -m "start"
cd "$repo"

echo "+ agentbox run hello -- sh -c '…'" >&2
"$agentbox" run hello -- sh -c '
  echo "hello from task $AGENTBOX_TASK on $(git branch --show-current)" > hello.txt
  git add hello.txt && git commit -qm "say hello" && echo "committed inside the container"
  echo "not committed by the task" > notes.txt'

echo "+ agentbox ls" >&2
"$agentbox" ls
echo "+ git log --oneline --stat agentbox/hello" >&2
git log --oneline --stat agentbox/hello
