"""The file tools of `agentbox mcp` against a worktree a hostile task prepared: symlinks to a
directory outside (absolute, relative, dangling), git dirs, FIFOs, a tree of many directories. Run
by tests/mcp.rs:

    python hostile.py <agentbox binary> <repository> <outside dir> -- <server args...>

The server runs with a low limit on open files (as a machine's usual 1024, scaled down). Prints
one JSON line at the end (`{"ok": true, ...}`); tests/mcp.rs checks the outside dir afterwards.
"""

import json
import os
import resource
import sys

import anyio
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

from client import call, refused

TASK = "hostile"
# Low enough that a listing holding a descriptor per directory runs out; enough for the server.
OPEN_FILES = 256
WIDE = 400


async def conversation(session, outside):
    await session.initialize()
    created = await call(session, "task_create", name=TASK)
    worktree = created["worktree"]
    with open(os.path.join(worktree, ".git")) as f:
        dotgit = f.read()
    secret = os.path.join(outside, "outside-secret.txt")
    inner = os.path.join(outside, "deeper", "outside-inner.txt")
    # From inside the task: links to the host's directory (the container cannot see it, but a host
    # that followed them would), a relative one up to the host's root, a dangling one where the host
    # would create a file, FIFOs, a nested repository's git dir, and a wide tree.
    plant = await call(session, "task_run", task=TASK, command=" && ".join([
        "mkdir -p tree/sub nested/.git",
        "echo inside > tree/sub/mine.txt",
        f"ln -s {outside} tree/out-dir",
        f"ln -s {secret} tree/out-file",
        f"ln -s {outside} top-dir",
        "ln -s ../../../../../../../../../.. tree/up",
        f"ln -s {outside}/made-by-host dangling",
        "mkfifo fifo tree/fifo",
        "printf '[core]\\n' > nested/.git/config",
        f"mkdir wide && cd wide && seq 1 {WIDE} | xargs mkdir && echo deep > {WIDE}/last.txt",
    ]))
    assert plant["exit_code"] == 0, plant

    # A recursive listing shows a symlink as one and never enters it, nor a git dir.
    for base in [None, "tree"]:
        arguments = {"task": TASK, "recursive": True}
        if base:
            arguments["path"] = base
        listing = await call(session, "file_list", **arguments)
        assert listing["truncated"] is False, listing["truncated"]
        entries = {entry["path"]: entry for entry in listing["entries"]}
        assert entries["tree/sub/mine.txt"]["kind"] == "file", entries
        assert entries["tree/out-dir"]["kind"] == "symlink", entries["tree/out-dir"]
        assert entries["tree/out-dir"]["target"] == outside, entries["tree/out-dir"]
        assert entries["tree/up"]["kind"] == "symlink", entries["tree/up"]
        assert entries["tree/fifo"]["kind"] == "other", entries["tree/fifo"]
        leaked = [p for p in entries
                  if p.startswith(("tree/out-dir/", "top-dir/", "tree/up/", "nested/.git/"))
                  or "outside-" in p]
        assert not leaked, f"listed outside the worktree or in a git dir: {leaked}"
        if base is None:
            assert entries[f"wide/{WIDE}/last.txt"]["kind"] == "file", "the whole wide tree"
            assert entries["top-dir"]["kind"] == "symlink", entries["top-dir"]
    for path in ["top-dir", "tree/out-dir/deeper", "tree/up/etc"]:
        await refused(session, "file_list", "symlink", task=TASK, path=path, recursive=True)

    # Through a link to outside, to a file or to a directory on the way, or a dangling one: nothing
    # is read, written or edited.
    through = ["tree/out-file", "tree/out-dir/outside-secret.txt", "top-dir/outside-secret.txt",
               "top-dir/deeper/outside-inner.txt", "tree/up" + secret, "dangling",
               "top-dir/new-file.txt"]
    for path in through:
        if path != "top-dir/new-file.txt":
            await refused(session, "file_read", "symlink", task=TASK, path=path)
            await refused(session, "file_edit", "symlink", task=TASK, path=path,
                          old_string="SECRET", new_string="pwned")
        await refused(session, "file_write", "symlink", task=TASK, path=path, content="pwned")

    # file_delete takes the link at most, never what it points to or anything through it.
    for path in ["top-dir/outside-secret.txt", "tree/out-dir/deeper/outside-inner.txt",
                 "tree/up" + secret]:
        await refused(session, "file_delete", "symlink", task=TASK, path=path)
    for path in ["tree/out-dir", "tree/out-file", "dangling", "tree/up"]:
        deleted = await call(session, "file_delete", task=TASK, path=path)
        assert deleted["kind"] == "symlink", deleted
    assert os.path.isfile(secret) and os.path.isfile(inner), "a target went"

    # The worktree's .git and every git dir are git's own.
    for path in [".git", ".git/config", ".git/hooks/pre-commit", "nested/.git/config",
                 "nested/.git/hooks/post-checkout", ".GIT/config", "tree/.git"]:
        await refused(session, "file_write", "git dir", task=TASK, path=path,
                      content="[core]\n\tfsmonitor = touch /tmp/agentbox-pwned\n")
        await refused(session, "file_edit", "git dir", task=TASK, path=path,
                      old_string="[core]", new_string="[core]\n\tfsmonitor = x")
        await refused(session, "file_delete", "git dir", task=TASK, path=path)
        await refused(session, "file_read", "git dir", task=TASK, path=path)
    await refused(session, "file_list", "git dir", task=TASK, path="nested/.git")
    with open(os.path.join(worktree, ".git")) as f:
        assert f.read() == dotgit, "the worktree's .git changed"
    with open(os.path.join(worktree, "nested/.git/config")) as f:
        assert f.read() == "[core]\n", "the nested git dir changed"

    # A FIFO is no regular file: refused at once, never waited on.
    with anyio.fail_after(30):
        for path in ["fifo", "tree/fifo"]:
            await refused(session, "file_read", "not a regular file", task=TASK, path=path)
            await refused(session, "file_edit", "not a regular file", task=TASK, path=path,
                          old_string="a", new_string="b")
            await refused(session, "file_write", "not a regular file", task=TASK, path=path,
                          content="x")

    stopped = await call(session, "task_stop", task=TASK)
    assert stopped["state"] == "exited", stopped
    return {"ok": True}


async def main():
    separator = sys.argv.index("--")
    binary, repo, outside = sys.argv[1:separator]
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (OPEN_FILES, hard))
    params = StdioServerParameters(command=binary, args=sys.argv[separator + 1:], cwd=repo,
                                   env=dict(os.environ))
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as session:
            summary = await conversation(session, outside)
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    anyio.run(main)
