"""`task_add_service` of `agentbox mcp` for tasks the CLI started with limits, and with no network.
Run by tests/mcp.rs, which started the tasks and inspects the containers afterwards:

    python services.py <agentbox binary> <repository> <tools image> -- <server args...>

Prints one JSON line at the end (`{"ok": true}`).
"""

import json
import os
import sys

import anyio
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

from client import call, refused


async def conversation(session, tools_image):
    await session.initialize()
    service = {"name": "db", "image": tools_image, "command": ["exec sleep 1000"]}
    added = await call(session, "task_add_service", task="limited", **service)
    assert added["service"] == "db", added
    await refused(session, "task_add_service", "has no network", task="offline", **service)
    return {"ok": True}


async def main():
    separator = sys.argv.index("--")
    binary, repo, tools_image = sys.argv[1:separator]
    params = StdioServerParameters(command=binary, args=sys.argv[separator + 1:], cwd=repo,
                                   env=dict(os.environ))
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as session:
            summary = await conversation(session, tools_image)
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    anyio.run(main)
