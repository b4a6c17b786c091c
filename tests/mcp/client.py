"""An MCP conversation with `agentbox mcp`, driven by the official Python SDK (PyPI `mcp`): a
client agentbox's authors did not write. Run by tests/mcp.rs:

    python client.py <agentbox binary> <repository> <outside file> <tools image> -- <server args...>

It asserts as it goes and prints one JSON line at the end (`{"ok": true, ...}`) with what the Rust
side checks in the repository afterwards.
"""

import json
import os
import urllib.request
import sys
import time

import anyio
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

TOOLS = {
    "task_create", "task_list", "task_run", "task_logs", "file_read", "file_write", "file_edit",
    "file_list", "file_delete", "task_diff", "task_commit", "task_stop", "task_add_service",
}


def text_of(result):
    return "\n".join(c.text for c in result.content if getattr(c, "type", "") == "text")


async def call(session, tool, **arguments):
    """A call that must succeed; returns its structured content."""
    result = await session.call_tool(tool, arguments)
    assert not result.is_error, f"{tool} {arguments} failed: {text_of(result)}"
    assert text_of(result).strip(), f"{tool} returned no text"
    assert result.structured_content is not None, f"{tool} returned no structured content"
    return result.structured_content


async def refused(session, tool, needle, **arguments):
    """A call that must fail as a tool error whose text contains `needle`."""
    result = await session.call_tool(tool, arguments)
    text = text_of(result)
    assert result.is_error, f"{tool} {arguments} should have failed, gave: {text}"
    assert needle in text, f"{tool} {arguments}: {needle!r} not in {text!r}"
    return text


async def conversation(session, outside, tools_image):
    await session.initialize()
    listed = await session.list_tools()
    names = {tool.name for tool in listed.tools}
    assert TOOLS <= names, f"missing tools: {TOOLS - names}"
    for tool in listed.tools:
        assert tool.input_schema.get("type") == "object", tool

    # Two tasks made and driven at once.
    created = {}

    async def create(name):
        created[name] = await call(session, "task_create", name=name)

    async with anyio.create_task_group() as group:
        group.start_soon(create, "mcp-a")
        group.start_soon(create, "mcp-b")
    a = created["mcp-a"]
    assert a["branch"] == "agentbox/mcp-a" and a["state"] == "running", a
    assert a["long_lived"] is True, a
    again = await call(session, "task_create", name="mcp-a")
    assert again["container_id"] == a["container_id"], "asking again gives the running task"

    results = {}

    async def run(name, command):
        results[name] = await call(session, "task_run", task=name, command=command)

    started = time.monotonic()
    async with anyio.create_task_group() as group:
        group.start_soon(run, "mcp-a", "sleep 2; echo from-a $AGENTBOX_TASK")
        group.start_soon(run, "mcp-b", "sleep 2; echo from-b $AGENTBOX_TASK")
    both = time.monotonic() - started
    assert results["mcp-a"]["stdout"].strip() == "from-a mcp-a", results
    assert results["mcp-b"]["stdout"].strip() == "from-b mcp-b", results
    assert both < 3.9, f"the two runs took {both:.1f}s: one waited for the other"

    # Files: write, edit (which match), read a range, list.
    await call(session, "file_write", task="mcp-a", path="src/hello.txt", content="hello\nworld\nbye\n")
    edit = await call(session, "file_edit", task="mcp-a", path="src/hello.txt",
                      old_string="world", new_string="agentbox")
    assert edit["replacements"] == 1 and edit["lines"] == [2], edit
    await refused(session, "file_edit", "occurs 3 times", task="mcp-a", path="src/hello.txt",
                  old_string="e", new_string="E")
    await refused(session, "file_edit", "does not occur", task="mcp-a", path="src/hello.txt",
                  old_string="nowhere", new_string="x")
    read = await call(session, "file_read", task="mcp-a", path="src/hello.txt", start_line=2, end_line=2)
    assert read["content"] == "agentbox\n" and read["total_lines"] == 3, read
    listing = await call(session, "file_list", task="mcp-a", recursive=True)
    paths = {entry["path"]: entry["kind"] for entry in listing["entries"]}
    assert paths.get("src/hello.txt") == "file" and paths.get("src") == "dir", paths

    # Commands: git status sees the new file; a failing command's exit code comes back.
    status = await call(session, "task_run", task="mcp-a", command="git status --porcelain")
    assert status["exit_code"] == 0 and "?? src/" in status["stdout"], status
    failing = await call(session, "task_run", task="mcp-a", command="echo oops >&2; exit 3")
    assert failing["exit_code"] == 3 and failing["stderr"].strip() == "oops", failing
    logs = await call(session, "task_logs", task="mcp-a", run=failing["run"])
    assert "oops" in logs["log"], logs

    diff = await call(session, "task_diff", task="mcp-a")
    assert "+agentbox" in diff["diff"], diff
    commit = await call(session, "task_commit", task="mcp-a", message="add hello")
    assert len(commit["commit"]) == 40, commit
    await refused(session, "task_commit", "nothing to commit", task="mcp-a", message="again")
    await call(session, "file_write", task="mcp-a", path="notes.txt", content="uncommitted\n")

    # Path traversal: '..', absolute paths, symlinks the task planted (to a directory and to a file
    # outside the worktree) are all refused, for reading and for writing.
    await refused(session, "file_read", "leaves the task's worktree", task="mcp-a", path="../../../etc/passwd")
    await refused(session, "file_read", "is absolute", task="mcp-a", path="/etc/passwd")
    await refused(session, "file_write", "leaves the task's worktree", task="mcp-a", path="src/../../x", content="x")
    await refused(session, "file_read", "git dir", task="mcp-a", path=".git")
    plant = await call(session, "task_run", task="mcp-a",
                       command=f"ln -s / root-link && ln -s {outside} outside-link && mkdir -p d && ln -s {outside} d/deep")
    assert plant["exit_code"] == 0, plant
    for path in ["root-link/etc/passwd", "outside-link", "d/deep"]:
        await refused(session, "file_read", "symlink", task="mcp-a", path=path)
        await refused(session, "file_write", "symlink", task="mcp-a", path=path, content="pwned")
        await refused(session, "file_edit", "symlink", task="mcp-a", path=path, old_string="SECRET", new_string="x")
    await refused(session, "file_list", "symlink", task="mcp-a", path="root-link")
    await refused(session, "file_write", "symlink", task="mcp-a", path="root-link/tmp/pwned", content="x")
    # A symlink itself can go; what it points to stays.
    deleted = await call(session, "file_delete", task="mcp-a", path="outside-link")
    assert deleted["kind"] == "symlink", deleted
    await call(session, "file_delete", task="mcp-a", path="root-link")
    await call(session, "file_delete", task="mcp-a", path="d/deep")
    await call(session, "file_delete", task="mcp-a", path="d")

    # A long run is cancelled when the client gives up on it; its process is gone afterwards.
    with anyio.move_on_after(3):
        await session.call_tool("task_run", {"task": "mcp-b", "command": "sleep 300; echo never"})
        raise AssertionError("the long run should have been cancelled")
    gone = False
    for _ in range(100):
        left = await call(session, "task_run", task="mcp-b", command="ps -eo args | grep -c '^sleep 300' || true")
        if left["stdout"].strip() == "0":
            gone = True
            break
        await anyio.sleep(0.2)
    assert gone, "the cancelled command still runs"
    timed = await call(session, "task_run", task="mcp-b", command="sleep 30", timeout_secs=1)
    assert timed["timed_out"] is True and timed["exit_code"] != 0, timed

    # A background run: at once, then its log and exit code.
    background = await call(session, "task_run", task="mcp-b", command="echo in-background; exit 4", background=True)
    run = background["run"]
    for _ in range(200):
        logs = await call(session, "task_logs", task="mcp-b", run=run)
        if logs["status"] and logs["status"]["state"] == "exited":
            break
        await anyio.sleep(0.1)
    assert logs["status"]["exit_code"] == 4 and "in-background" in logs["log"], logs

    # A service for a task that had none: reachable from the task by name, published on 127.0.0.1.
    service = await call(session, "task_add_service", task="mcp-b", name="web", image=tools_image,
                         command=["echo hello-from-web > /tmp/index.html; exec busybox httpd -f -p 8080 -h /tmp"],
                         ports={"http": 8080})
    url = service["ports"]["http"]["url"]
    reached = False
    for _ in range(100):
        probe = await call(session, "task_run", task="mcp-b",
                           command="bash -c 'exec 3<>/dev/tcp/web/8080 && printf \"GET /index.html HTTP/1.0\\r\\n\\r\\n\" >&3 && cat <&3'")
        if "hello-from-web" in probe["stdout"]:
            reached = True
            break
        await anyio.sleep(0.1)
    assert reached, probe
    with urllib.request.urlopen(url + "/index.html", timeout=10) as response:
        assert b"hello-from-web" in response.read()

    # Errors in the CLI's words.
    await refused(session, "task_run", "no task named nope", task="nope", command="true")
    await refused(session, "task_create", "task name", name="Bad Name")

    tasks = await call(session, "task_list")
    assert {t["task"] for t in tasks["tasks"]} >= {"mcp-a", "mcp-b"}, tasks

    stopped = {}

    async def stop(name):
        stopped[name] = await call(session, "task_stop", task=name)

    async with anyio.create_task_group() as group:
        group.start_soon(stop, "mcp-a")
        group.start_soon(stop, "mcp-b")
    assert stopped["mcp-a"]["state"] == "exited" and stopped["mcp-a"]["snapshot_commit"], stopped
    await refused(session, "task_run", "is not running", task="mcp-a", command="true")
    await refused(session, "file_read", "has no worktree", task="mcp-a", path="notes.txt")
    return {"ok": True, "commit": commit["commit"], "snapshot": stopped["mcp-a"]["snapshot_commit"]}


async def main():
    separator = sys.argv.index("--")
    binary, repo, outside, tools_image = sys.argv[1:separator]
    # The SDK passes only a few variables on by default; the server gets the test's environment.
    params = StdioServerParameters(command=binary, args=sys.argv[separator + 1:], cwd=repo,
                                   env=dict(os.environ))
    with open(outside) as f:
        secret = f.read()
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as session:
            summary = await conversation(session, outside, tools_image)
    with open(outside) as f:
        assert f.read() == secret, "the file outside the worktree was changed"
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    anyio.run(main)
