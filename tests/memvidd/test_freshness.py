"""Freshness on every hit: when it was indexed, and for a chunk of a watched file, the
file's mtime as indexed and ``stale`` once the file on disk differs (a real daemon
watching a real directory; the watch is then dropped by a reload, so that the file can
change without the watcher catching up). An agent sees the same through ``memvidd mcp``."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import anyio
import msgspec
import pytest
from mcp import ClientSession, StdioServerParameters, stdio_client

from daemon_util import ROOT, DaemonProc, watching_config
from memvidd.client import Client

pytestmark = pytest.mark.timeout(120)


def found(c: Client, query: str, deadline: float) -> list:
    """The hits of ``query`` once there are some (the watcher indexes in the background
    and sends no event: looked for again every 50 ms)."""
    while not (hits := c.find(query, mode="lex")):
        assert time.monotonic() < deadline, f"{query!r} never indexed"
        time.sleep(0.05)
    return hits


async def mcp_find(socket: str, query: str, log: Path) -> tuple[str, dict]:
    """What an agent reads of a find through ``memvidd mcp``: text and structured content."""
    params = StdioServerParameters(command=sys.executable, args=["-m", "memvidd", "mcp", "--socket", socket],
                                   cwd=ROOT)
    with anyio.fail_after(60), open(log, "a") as errlog:
        async with stdio_client(params, errlog=errlog) as (read, write), ClientSession(read, write) as s:
            await s.initialize()
            r = await s.call_tool("find", {"query": query, "mode": "lex"})
    assert not r.is_error, r.content
    return r.content[0].text, r.structured_content


def test_file_hits_say_when_they_were_indexed_and_whether_the_file_changed_since(tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    note = tree / "lighthouse.md"
    note.write_text("# Log\n\nThe lighthouse keeper writes down every storm.\n")
    run = tmp_path / "run"
    run.mkdir()
    d = DaemonProc(run)
    d.config.write_text(watching_config(run, tree))
    try:
        d.start()
        with Client(d.socket) as c:
            c.put("the keeper's own note about storms", uri="note://keeper")
            (hit,) = found(c, "lighthouse", time.monotonic() + 60)
            st = os.stat(note)
            assert hit.kind == "chunk" and hit.uri.startswith(f"file://{note}#")
            assert hit.mtime == st.st_mtime_ns / 1e9 and hit.stale is False
            assert hit.commit_time is not None and abs(hit.commit_time - time.time()) < 60
            (plain,) = c.find("keeper", mode="lex", scope="note://")  # not a file: when indexed, nothing more
            assert plain.uri == "note://keeper" and plain.commit_time is not None
            assert "mtime" not in msgspec.to_builtins(plain) and "stale" not in msgspec.to_builtins(plain)

            d.config.write_text(watching_config(run))  # nobody watches the file now
            assert any("watch" in line for line in c.reload().applied)
            os.utime(note, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # changed on disk
            (hit,) = c.find("lighthouse", mode="lex")
            assert hit.stale is True and hit.mtime == st.st_mtime_ns / 1e9  # the mtime as indexed
            text, data = anyio.run(mcp_find, d.socket, "lighthouse", tmp_path / "mcp.log")
            assert text.startswith(f"1. {note}:1-3  ") and "STALE: it changed on disk since it was indexed" in text
            assert data["hits"][0]["stale"] is True and data["hits"][0]["mtime"] == hit.mtime
            note.unlink()  # gone: stale too
            (hit,) = c.find("lighthouse", mode="lex")
            assert hit.stale is True
    finally:
        d.close()
