"""``memvidd mcp``, driven as an agent's MCP client drives it: the SDK's own stdio client
spawns ``python -m memvidd mcp --socket ...`` and talks to it, against a real daemon."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import ClientSession, StdioServerParameters, stdio_client

import engine
from daemon_util import ROOT, DaemonProc

pytestmark = pytest.mark.timeout(120)
TOOLS = {"find", "put", "get", "timeline", "stats"}


@asynccontextmanager
async def session(socket: str, log: Path) -> AsyncIterator[ClientSession]:
    params = StdioServerParameters(command=sys.executable, args=["-m", "memvidd", "mcp", "--socket", socket],
                                   cwd=ROOT)
    with open(log, "a") as errlog:
        async with stdio_client(params, errlog=errlog) as (read, write), ClientSession(read, write) as s:
            await s.initialize()
            yield s


def run(main: Callable[[], Awaitable[None]], seconds: float = 90) -> None:
    async def bounded() -> None:
        with anyio.fail_after(seconds):
            await main()

    anyio.run(bounded)


async def call(s: ClientSession, tool: str, **args: Any) -> tuple[str, Any]:
    """A tool's text and structured content; an error result fails the test."""
    r = await s.call_tool(tool, args)
    assert not r.is_error, r.content
    return r.content[0].text, r.structured_content


async def error(s: ClientSession, tool: str, **args: Any) -> str:
    r = await s.call_tool(tool, args)
    assert r.is_error, r
    return r.content[0].text


def test_an_agent_lists_the_tools_stores_finds_and_reads(daemon, tmp_path):
    async def main() -> None:
        async with session(daemon.socket, tmp_path / "mcp.log") as s:
            tools = {t.name: t for t in (await s.list_tools()).tools}
            assert set(tools) == TOOLS
            find = tools["find"].input_schema
            assert find["required"] == ["query"] and set(find["properties"]) == {
                "query", "k", "mode", "scope", "tags", "kind", "since", "until", "as_of"}
            assert find["properties"]["mode"]["enum"] == ["auto", "lex", "vec", "hybrid"]
            assert set(tools["put"].input_schema["properties"]) == {"text", "uri", "title", "tags", "kind", "expires"}
            assert set(tools["get"].input_schema["properties"]) == {"uri", "frame_id", "as_of"}
            assert set(tools["timeline"].input_schema["properties"]) >= {"since", "until", "kind", "limit"}
            assert all(len(t.description or "") > 80 for t in tools.values())  # written for a model
            assert tools["find"].output_schema and tools["find"].annotations.read_only_hint

            text, put = await call(s, "put", text="The deploy key rotates every 90 days.", uri="note://ops/keys",
                                   title="Deploy keys", kind="decision", tags={"team": "ops"})
            assert f"frame #{put['frame_id']}" in text and put["seq"] >= 1
            text, found = await call(s, "find", query="how often does the deploy key rotate")
            assert text.startswith('1. note://ops/keys  "Deploy keys"  (') and "rotates every 90 days" in text
            (hit,) = found["hits"]
            assert hit["frame_id"] == put["frame_id"] and hit["where"] == "note://ops/keys" and hit["when"]
            assert found["seq"] >= put["seq"]

            text, frame = await call(s, "get", uri="note://ops/keys")
            assert "The deploy key rotates every 90 days." in text and frame["text"].startswith("The deploy key")
            await call(s, "put", text="Deploy keys now rotate monthly.", uri="note://ops/keys", kind="decision")
            text, _ = await call(s, "get", frame_id=put["frame_id"], as_of=put["seq"])  # as it was
            assert "every 90 days" in text
            await call(s, "put", text="Lunch is at noon.", kind="note")
            text, listed = await call(s, "timeline", kind="decision")
            assert [e["uri"] for e in listed["entries"]] == ["note://ops/keys"] and "note://ops/keys" in text
            text, listed = await call(s, "timeline", limit=2)
            assert len(listed["entries"]) == 2 and listed["entries"][0]["kind"] == "note"  # newest first
            _, recent = await call(s, "timeline", since="1 hour ago", until="in 1 minute")  # time in words
            assert len(recent["entries"]) == 2
            assert not (await call(s, "timeline", until="yesterday"))[1]["entries"]
            text, stats = await call(s, "stats")
            assert stats["memories"] == 2 and "2 memories" in text and "lexical only" in text

            # Bad arguments: refused by the schema, by this server, or by the daemon.
            assert "k" in await error(s, "find", query="keys", k=0)
            assert "mode" in await error(s, "find", query="keys", mode="fuzzy")
            assert "since: cannot read 'soon' as a time" in await error(s, "find", query="keys", since="soon")
            assert "exactly one of uri or frame_id" in await error(s, "get")
            assert "as_of commit 99 is outside 0.." in await error(s, "get", uri="note://ops/keys", as_of=99)
            assert "not_found" in await error(s, "get", uri="note://nothing")

            resources = {str(r.uri): r for r in (await s.list_resources()).resources}
            latest = f"memvidd://frame/{put['frame_id'] + 2}"  # the lunch note
            assert latest in resources and len(resources) == 2
            content = (await s.read_resource(latest)).contents[0]
            assert "Lunch is at noon." in content.text

    run(main)


def test_no_daemon_is_a_clear_tool_error_and_the_server_connects_once_one_runs(tmp_path):
    d = DaemonProc(tmp_path)

    async def main() -> None:
        async with session(d.socket, tmp_path / "mcp.log") as s:
            message = await error(s, "stats")
            assert f"no memvidd daemon is running at {d.socket}" in message and "memvidd run" in message
            assert (await s.list_resources()).resources == []  # no memories to list, no crash
            await anyio.to_thread.run_sync(d.start)
            await call(s, "put", text="stored once the daemon came up", uri="note://up")
            await anyio.to_thread.run_sync(d.stop)
            assert "no memvidd daemon is running" in await error(s, "find", query="daemon")
            await anyio.to_thread.run_sync(d.start)  # a new daemon: the old connection is dead
            await call(s, "put", text="stored after a restart", uri="note://again")
            _, found = await call(s, "find", query="stored", mode="lex")
            assert {h["uri"] for h in found["hits"]} == {"note://up", "note://again"}

    try:
        run(main)
    finally:
        d.close()


@pytest.mark.timeout(240)
def test_an_agent_finds_by_meaning_what_it_just_stored_with_the_real_model(tmp_path):
    """Read your writes through MCP: the find after a put waits for its vector, so a
    question sharing no word with the memory finds it at once."""
    d = DaemonProc(tmp_path)
    d.config.write_text(d.config.read_text().replace('model = "none"', f'model = "{engine.DEFAULT_MODEL}"'))

    async def main() -> None:
        async with session(d.socket, tmp_path / "mcp.log") as s:
            for i, text in enumerate(["The quarterly tax return is due on the fifteenth of April.",
                                      "Photosynthesis turns sunlight into chemical energy.",
                                      "The office cat is called Biscuit."]):
                await call(s, "put", text=text, uri=f"note://{i}")
                _, found = await call(s, "find", query=["when must I file my taxes", "how plants make food",
                                                        "name of the pet at work"][i], mode="vec", k=1)
                assert [h["uri"] for h in found["hits"]] == [f"note://{i}"], found

    try:
        d.start(timeout=120)
        run(main, 180)
    finally:
        d.close()
