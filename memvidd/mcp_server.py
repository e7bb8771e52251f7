"""``memvidd mcp``: the daemon's memory as an MCP server on stdin/stdout, for the agents
that speak the Model Context Protocol (coding agents, desktop assistants).

Built with the official MCP Python SDK (the ``mcp`` package, 2.x: ``MCPServer``), as a
thin client of a running daemon: each tool call is a request over the agent socket
(the blocking ``Client``, in a worker thread). It keeps no state but two things:

- the connection (``Link``), opened on first use and again whenever it was lost: a
  daemon that is not running is a tool error saying so, and the server goes on until
  one runs;
- the commit of its last ``put``: the next ``find`` passes it as ``min_seq`` (semantic
  unless lexical), so an agent finds what it just stored, by meaning too. Should the
  vectors lag (an embedding backlog), that find answers lexically and says so.

Tools, named ``find``, ``put``, ``get``, ``timeline`` and ``stats``, answer with compact
text a model reads well (for a hit: path:lines or URI, title, when, snippet) and the
same as structured content. A daemon error is a tool error carrying its message.
Resources: the latest memories, each at ``memvidd://frame/{id}``.
"""

# No ``from __future__ import annotations``: the SDK reads the tools' annotations (their
# JSON schemas) at run time, and those name pydantic and MCP types that are imported only
# when the server is built, so that the rest of the command line never loads them.
import argparse
import datetime as dt
import os
import select
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypedDict, TypeVar

import msgspec

from . import __version__, timewords
from . import protocol as p
from .client import Client, ConnectionLost, RemoteError

if TYPE_CHECKING:
    from mcp.server.mcpserver import MCPServer

T = TypeVar("T")
FIND_WAIT_S = 5.0  # how long a find waits for the vectors of the server's last put
RECENT = 20  # memories listed as resources
SNIPPET = 300  # characters of a hit's snippet


class ToolFailed(Exception):
    """A tool call that cannot be answered: its message is what the model reads."""


class Link:
    """The connection to the daemon: opened on use, reopened after it was lost, one
    request at a time. Remembers the commit of the last put not yet searched for."""

    def __init__(self, path: str, capsule: str | None, timeout: float = 30.0) -> None:
        self.path = path
        self.capsule = capsule
        self.timeout = timeout
        self.pending = 0  # commit of the last put that no find has waited for yet
        self._client: Client | None = None
        self._lock = threading.Lock()

    def call(self, fn: Callable[[Client], T], *, retry: bool = True) -> T:
        """``fn(client)``; a read (``retry``) is sent again once on a new connection if the
        old one broke under it. A write is not: it may have been stored. ``ToolFailed``
        (what the model reads) for the daemon's errors, and for ``fn``'s own."""
        with self._lock:
            for attempt in (1, 2):
                client = self._connected()
                try:
                    return fn(client)
                except RemoteError as e:
                    raise ToolFailed(f"memvidd: {e.message} ({e.code})") from None
                except (ConnectionLost, OSError) as e:
                    self.close()
                    if not retry:
                        raise ToolFailed(f"the connection to the memvidd daemon broke during this call ({e}): "
                                         "it may or may not have been stored; check with find or timeline") from None
                    if attempt == 2:
                        raise ToolFailed(f"the connection to the memvidd daemon broke: {e}") from None
            raise AssertionError("unreachable")

    def _connected(self) -> Client:
        if self._client is not None and _closed_by_peer(self._client.sock):
            self.close()  # the daemon went away (or restarted) since the last call
        if self._client is None:
            try:
                self._client = Client(self.path, timeout=self.timeout)
            except (OSError, ConnectionLost) as e:
                raise ToolFailed(
                    f"no memvidd daemon is running at {self.path} ({e.__class__.__name__}): start it with "
                    "`memvidd run` (or `systemctl --user start memvidd`); this tool works as soon as it is up"
                ) from None
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def _closed_by_peer(sock: socket.socket) -> bool:
    """Whether the daemon closed this connection (EOF waiting): then no request is sent
    on it, so a write is never lost to a connection that was already dead."""
    try:
        if not select.select([sock], [], [], 0)[0]:  # (a recv would wait out the socket's timeout)
            return False
        return sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


# -- arguments a model gives --------------------------------------------------------------


def _time(value: float | str | None, what: str) -> float | None:
    """A Unix time (number), or a time in words or ISO 8601 (``timewords``: local unless
    it has an offset)."""
    if value is None or isinstance(value, float | int):
        return None if value is None else float(value)
    try:
        return timewords.since(value, what)
    except timewords.WhenError as e:
        raise ToolFailed(f"{what}: {e}") from None


def _as_of(value: int | str | None) -> int | float | None:
    """A commit number (integer, or a string of digits) or a time (words or ISO 8601)."""
    if not isinstance(value, str):
        return value
    try:
        return timewords.parse_when(value)
    except timewords.WhenError as e:
        raise ToolFailed(f"as_of: {e}") from None


def _expires(value: float | str | None) -> float | None:
    """Seconds from now (number), or a time to come (words or ISO 8601)."""
    if value is None or isinstance(value, float | int):
        return None if value is None else time.time() + value
    try:
        return timewords.expires(value)
    except timewords.WhenError as e:
        raise ToolFailed(f"expires: {e}") from None


# -- results a model reads --------------------------------------------------------------


def when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts).astimezone().strftime("%Y-%m-%d %H:%M")


def where(hit: Any) -> str:
    """path:lines for a chunk of a file (path alone, or the URI, when that is all there is);
    for a document's chunk, then its page, slide or sheet and rows."""
    path = getattr(hit, "path", None)
    uri = hit.uri or ""
    if path is None and uri.startswith("file://"):
        path = os.fsdecode(urllib.parse.unquote_to_bytes(uri[len("file://"):].partition("#")[0]))
    lines = getattr(hit, "lines", None)
    if path and isinstance(lines, list | tuple) and len(lines) == 2:
        place = f"{path}:{lines[0]}-{lines[1]}"
    else:
        place = f"{path}:{lines}" if path and lines else (path or uri or f"frame #{hit.frame_id}")
    location = hit.location() if isinstance(hit, p.HitOut) else ""
    return f"{place} {location}" if location else place


def hit_text(rank: int, h: p.HitOut) -> str:
    """A hit in a few lines: where, title, when (a file's: its mtime as indexed), and STALE
    when the file has changed since it was indexed."""
    title = f"  \"{h.title}\"" if h.title else ""
    if isinstance(h.mtime, float):
        stamp = f"file of {when(h.mtime)}" + (", STALE: it changed on disk since it was indexed" if h.stale else "")
    else:
        stamp = when(h.timestamp)
    head = f"{rank}. {where(h)}{title}  ({stamp}, frame #{h.frame_id})"
    snippet = " ".join(h.snippet.split())
    return f"{head}\n   {snippet[:SNIPPET]}" if snippet else head


def hit_data(h: p.HitOut) -> dict[str, Any]:
    out: dict[str, Any] = msgspec.to_builtins(h)
    out["where"], out["when"] = where(h), when(h.timestamp)
    return out


def frame_text(f: p.FrameOut) -> str:
    head = " | ".join(x for x in (f.uri, f.title and f'"{f.title}"', f.kind and f"kind {f.kind}") if x)
    body = f.text if f.text is not None else f"<{f.length} bytes of binary data>"
    return f"{head or f'frame #{f.id}'}\n{when(f.timestamp)}, frame #{f.id}, commit {f.commit_seq}\n\n{body}"


def entry_line(e: p.FrameOut) -> str:
    kind = f"  [{e.kind}]" if e.kind else ""
    title = f"  \"{e.title}\"" if e.title else ""
    return f"{when(e.timestamp)}  #{e.id}  {e.uri or ''}{title}{kind}"


def stats_data(s: p.CapsuleStats) -> dict[str, Any]:
    vectors = s.vectors or {}
    indexer = s.get("indexer") or {}
    return {
        "memories": s.live_frames, "frames": s.frames, "commit_seq": s.commit_seq, "file_bytes": s.file_bytes,
        "semantic": {"model": vectors.get("model"), "coverage": vectors.get("coverage"),
                     "queued": (vectors.get("embedding") or {}).get("queued")} if vectors else None,
        "files": {k: indexer.get(k) for k in ("phase", "roots", "documents", "queued", "eta_s")} if indexer else None,
    }


def stats_text(d: dict[str, Any]) -> str:
    lines = [f"{d['memories']} memories ({d['frames']} frames with history), commit {d['commit_seq']}, "
             f"{d['file_bytes'] / 1e6:.1f} MB"]
    sem = d["semantic"]
    lines.append("semantic search: off (lexical only)" if sem is None else
                 f"semantic search: {sem['model']}, {100 * (sem['coverage'] or 0):.0f}% embedded"
                 + (f", {sem['queued']} waiting" if sem["queued"] else ""))
    if d["files"]:
        f = d["files"]
        lines.append(f"watched files: {f['documents']} indexed, {f['phase']}"
                     + (f", {f['queued']} queued (about {f['eta_s']} s left)" if f["queued"] else "")
                     + f"; roots {', '.join(f['roots'] or [])}")
    return "\n".join(lines)


class FindResult(TypedDict):
    query: str
    mode: str  # the mode used
    seq: int  # the commit searched
    hits: list[dict[str, Any]]  # the wire's hits, with `where` (path:lines or URI) and `when`
    warnings: list[str]


class PutResult(TypedDict):
    frame_id: int
    seq: int  # the commit that stored it
    uri: str | None


class TimelineResult(TypedDict):
    entries: list[dict[str, Any]]
    expired: int  # frames of the range that retention rules hide


# -- the server -----------------------------------------------------------------------------

INSTRUCTIONS = """\
memvidd is this user's long-term memory: notes, decisions, facts and preferences stored \
by agents, and the files of the directories it watches, kept current and versioned. \
Use `find` before answering anything that may depend on what was said, decided or \
written before; use `put` to keep what should be remembered later (a decision, a fact \
learned, a summary of work done). What you `put` is found by your next `find` at once."""

FIND_DOC = """\
Search memory by words and by meaning. Use it to recall what was stored before (notes, \
decisions, preferences, earlier work) and to find passages of the watched files. Returns \
the best matches, each with where it comes from (path:lines for a file, else its uri), \
title, when, and a snippet; `get` reads one in full. A hit marked STALE comes from a file \
that changed since it was indexed: read the file itself for its current text."""

PUT_DOC = """\
Store a memory for later: a fact, decision, preference, summary or note, as plain text. \
Give a stable `uri` (e.g. note://project/database-choice) to be able to update it: a put \
to the same uri makes a new version (the old one stays in history). The next `find` sees \
it at once."""

GET_DOC = """\
Read one memory in full, by the uri or the frame id that `find` or `timeline` showed; \
with `as_of`, as it was at a past commit or time."""

TIMELINE_DOC = """\
List memories in time order, newest first by default: what was stored or changed \
recently, or within a time window, optionally of one kind."""

STATS_DOC = """\
How much is stored, whether semantic search is on and caught up, and whether the watched \
files are indexed yet. Use it when results seem incomplete."""

Mode = Literal["auto", "lex", "vec", "hybrid"]


def build(link: Link) -> "MCPServer[Any]":
    """The MCP server, its tools and resources forwarding to the daemon over ``link``."""
    import anyio.to_thread
    from mcp.server.mcpserver import MCPServer
    from mcp.server.mcpserver.exceptions import ResourceError, ToolError
    from mcp.types import CallToolResult, Resource, TextContent, ToolAnnotations
    from pydantic import Field

    async def run(fn: Callable[[Client], T], *, retry: bool = True) -> T:
        try:
            return await anyio.to_thread.run_sync(lambda: link.call(fn, retry=retry))
        except ToolFailed as e:
            raise ToolError(str(e)) from None

    def result(text: str, data: Any) -> CallToolResult:
        return CallToolResult(content=[TextContent(type="text", text=text)], structured_content=data)

    class Server(MCPServer[Any]):
        async def list_resources(self) -> list[Resource]:
            """The static resources, and the latest memories (none while no daemon runs)."""
            try:
                entries = await anyio.to_thread.run_sync(lambda: link.call(
                    lambda c: c.timeline(limit=RECENT, reverse=True, capsule=link.capsule)))
            except ToolFailed:
                entries = []
            return [*await super().list_resources(), *(
                Resource(uri=f"memvidd://frame/{e.id}", name=e.title or e.uri or f"frame {e.id}",
                         description=f"{e.uri or 'memory'} stored {when(e.timestamp)}"
                                     + (f" ({e.kind})" if e.kind else ""),
                         mime_type="text/plain")
                for e in entries)]

    server = Server("memvidd", version=__version__, instructions=INSTRUCTIONS)
    reading = ToolAnnotations(read_only_hint=True, open_world_hint=False)

    @server.resource("memvidd://frame/{frame_id}", name="memory", mime_type="text/plain",
                     description="One memory (a frame of the capsule) by its id, in full")
    async def frame(frame_id: str) -> str:
        if not frame_id.isdigit():
            raise ResourceError(f"not a frame id: {frame_id!r}")
        try:
            f = await anyio.to_thread.run_sync(lambda: link.call(
                lambda c: c.get(int(frame_id), capsule=link.capsule)))
        except ToolFailed as e:
            raise ResourceError(str(e)) from None
        return frame_text(f)

    @server.tool(name="find", description=FIND_DOC, annotations=reading)
    async def find(
        query: Annotated[str, Field(min_length=1, description="What to look for, in plain words or as a question")],
        k: Annotated[int, Field(ge=1, le=50, description="How many results")] = 8,
        mode: Annotated[Mode, Field(description=(
            "auto (default: by words and meaning together), lex (exact words, names, identifiers), "
            "vec (meaning only), hybrid"))] = "auto",
        scope: Annotated[str | None, Field(description=(
            "Only memories whose uri starts with this, e.g. note://project/ or file:///home/me/notes/"))] = None,
        tags: Annotated[dict[str, str] | None, Field(description="Only memories with all these tags")] = None,
        kind: Annotated[str | None, Field(description="Only memories of this kind (e.g. note, chunk)")] = None,
        since: Annotated[float | str | None, Field(description=(
            "Only memories from this time on: words ('yesterday', 'last tuesday 17:00', '2 hours ago'), "
            "ISO 8601 (2025-01-31, 2025-01-31T14:00) or Unix seconds"))] = None,
        until: Annotated[float | str | None, Field(description="Only memories up to this time (as since)")] = None,
        as_of: Annotated[int | str | None, Field(description=(
            "Search memory as it was then: a commit number, or a time (as since)"))] = None,
    ) -> Annotated[CallToolResult, FindResult]:
        def ask(c: Client) -> tuple[p.FindReply, list[str]]:
            kw: dict[str, Any] = dict(k=k, mode=mode, scope=scope, tags=tags, kind=kind, since=_time(since, "since"),
                                      until=_time(until, "until"), as_of=_as_of(as_of), capsule=link.capsule,
                                      snippet_chars=SNIPPET)
            seq, notes = link.pending, []
            if seq:  # read your writes: this server's last put, by meaning too
                kw.update(min_seq=seq, semantic=mode != "lex", wait_s=FIND_WAIT_S)
            try:
                reply = c.find_reply(query, **kw)
            except RemoteError as e:
                if not (kw.get("semantic") and e.code == p.UNAVAILABLE and e.retryable):
                    raise
                notes.append(f"semantic results may miss recent memories: {e.message}")
                reply = c.find_reply(query, **{**kw, "semantic": False})
            link.pending = 0
            return reply, notes

        reply, notes = await run(ask)
        lines = [hit_text(i, h) for i, h in enumerate(reply.hits, 1)] or [f"no memories match {query!r}"]
        lines += [f"note: {w}" for w in [*reply.warnings, *notes]]
        data = FindResult(query=query, mode=reply.mode, seq=reply.seq, hits=[hit_data(h) for h in reply.hits],
                          warnings=[*reply.warnings, *notes])
        return result("\n".join(lines), data)

    @server.tool(name="put", description=PUT_DOC,
                 annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=False,
                                             open_world_hint=False))
    async def put(
        text: Annotated[str, Field(min_length=1, description="The memory itself, as plain text")],
        uri: Annotated[str | None, Field(description=(
            "A stable name to update it later, e.g. note://project/database-choice"))] = None,
        title: Annotated[str | None, Field(description="A short title")] = None,
        tags: Annotated[dict[str, str] | None, Field(description='Labels to filter by, e.g. {"project": "x"}')] = None,
        kind: Annotated[str | None, Field(description="What sort of memory: note, decision, preference, ...")] = None,
        expires: Annotated[float | str | None, Field(description=(
            "Forget it then: seconds from now, or a time: words ('tomorrow 9:00', 'in 2 days') or "
            "ISO 8601 (default: never)"))] = None,
    ) -> Annotated[CallToolResult, PutResult]:
        def store(c: Client) -> p.PutReply:
            kw = {k: v for k, v in dict(uri=uri, title=title, tags=tags, kind=kind, expires=_expires(expires)).items()
                  if v is not None}
            reply = c.put_reply(text, capsule=link.capsule, **kw)
            link.pending = max(link.pending, reply.seq)
            return reply

        reply = await run(store, retry=False)
        fid = reply.frame_ids[0]
        named = f" at {uri}" if uri else ""
        return result(f"stored as frame #{fid}{named} (commit {reply.seq}); find sees it now",
                      PutResult(frame_id=fid, seq=reply.seq, uri=uri))

    @server.tool(name="get", description=GET_DOC, annotations=reading)
    async def get(
        uri: Annotated[str | None, Field(description="The memory's uri")] = None,
        frame_id: Annotated[int | None, Field(ge=0, description="Or its frame id (#N in find and timeline)")] = None,
        as_of: Annotated[int | str | None, Field(description=(
            "As it was then: a commit number, or a time: words ('yesterday 17:00') or ISO 8601"))] = None,
    ) -> CallToolResult:
        if (uri is None) == (frame_id is None):
            raise ToolError("get needs exactly one of uri or frame_id")
        f = await run(lambda c: c.get(frame_id, uri=uri, as_of=_as_of(as_of), capsule=link.capsule))
        return result(frame_text(f), msgspec.to_builtins(f))

    @server.tool(name="timeline", description=TIMELINE_DOC, annotations=reading)
    async def timeline(
        since: Annotated[float | str | None, Field(description=(
            "From this time on: words ('yesterday', 'last tuesday 17:00', '2 hours ago'), "
            "ISO 8601 (2025-01-31, 2025-01-31T14:00) or Unix seconds"))] = None,
        until: Annotated[float | str | None, Field(description="Up to this time (as since)")] = None,
        kind: Annotated[str | None, Field(description="Only memories of this kind")] = None,
        limit: Annotated[int, Field(ge=1, le=500, description="How many")] = 20,
        newest_first: Annotated[bool, Field(description="Newest first (default), else oldest first")] = True,
    ) -> Annotated[CallToolResult, TimelineResult]:
        reply = await run(lambda c: c.timeline_reply(since=_time(since, "since"), until=_time(until, "until"),
                                                     kind=kind, limit=limit, reverse=newest_first,
                                                     capsule=link.capsule))
        lines = [entry_line(e) for e in reply.entries] or ["no memories in that range"]
        if reply.expired:
            lines.append(f"({reply.expired} more expired under the retention rules)")
        return result("\n".join(lines), TimelineResult(entries=msgspec.to_builtins(reply.entries),
                                                       expired=reply.expired))

    @server.tool(name="stats", description=STATS_DOC, annotations=reading)
    async def stats() -> CallToolResult:
        data = stats_data(await run(lambda c: c.stats(capsule=link.capsule)))
        return result(stats_text(data), data)

    return server


def cmd_mcp(args: argparse.Namespace) -> int:
    from .cli_config import socket_of

    link = Link(socket_of(args), args.name)
    try:
        build(link).run("stdio")
    finally:
        link.close()
    return 0
