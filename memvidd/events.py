"""The event socket: producers push observations, one per line of JSON (or as protocol
messages), and get one acknowledgement per event once it is durable.

    $ echo '{"text": "user asked about X", "tags": {"role": "user"}}' | socat - UNIX-CONNECT:$sock
    {"ok":true,"line":1,"id":42,"seq":17}

A connection whose first byte is ``{``, ``[`` or whitespace speaks JSON lines; anything
else is read as length-prefixed msgpack ``put``/``put_many`` messages and answered with
protocol replies. Events on one connection are staged in order and acknowledged in order;
a bad line gets an error line (``{"ok":false,"line":N,"error":...}``) and the stream goes
on; nothing after a bad line is lost.

Resource handling: at most ``max_connections`` connections (a refused one gets one error
line); lines and messages are held in the daemon's shared budget of client bytes, and a
line that does not fit gets a retryable error line and is skipped without being kept.
"""

from __future__ import annotations

import json
import logging
from contextlib import aclosing
from typing import Any, NoReturn

import msgspec
import trio

import engine

from . import protocol as p
from .budget import OverBudget, Share
from .framing import MessageReader
from .server import (
    AgentServer,
    Connection,
    check,
    connection_ended,
    error_reply,
    put_item,
    ready,
    refuse,
    requests,
    unaffordable,
)
from .service import WriteOp

log = logging.getLogger("memvidd.events")
EVENT_KEYS = {"text", "uri", "title", "tags", "kind", "timestamp", "expires", "capsule"}
_ack = msgspec.json.Encoder()


class LineTooLong(Exception):
    pass


class LineReader:
    """Lines from a stream, each at most ``limit`` bytes. The buffer is covered by the
    connection's ``share`` of the budget as it grows; a line returned stays held there
    (``last`` bytes) until its acknowledgement is ready. A line too long or over the
    budget raises at once (so that its error line is sent at once), and the next ``read``
    first drops the rest of it, up to its newline, without keeping it."""

    def __init__(self, stream: trio.abc.ReceiveStream, limit: int, share: Share, initial: bytes = b"") -> None:
        self.stream = stream
        self.limit = limit
        self.share = share
        self.buf = bytearray(initial)
        self.last = 0
        self._scanned = 0  # no newline before this offset of buf: each byte is searched once
        self._skipping = False  # the rest of a refused line is still to be dropped

    async def read(self) -> bytes | None:
        """The next line (without its newline); ``None`` at the end of the stream."""
        if self._skipping:
            await self._skip_line()
        self.share.trim(len(self.buf))
        while True:
            try:
                self.share.cover(len(self.buf))  # what came in is kept only if the budget allows
            except OverBudget:
                self._refuse_line()
                raise
            i = self.buf.find(b"\n", self._scanned)
            if i >= 0:
                return self._take(i, i + 1)
            self._scanned = len(self.buf)
            if len(self.buf) > self.limit:
                self._refuse_line()
                raise LineTooLong(f"line longer than {self.limit} bytes")
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                return self._take(len(self.buf), len(self.buf)) if self.buf else None
            self.buf += chunk

    def _take(self, end: int, used: int) -> bytes:
        line = bytes(self.buf[:end])
        del self.buf[:used]
        self._scanned = 0
        if len(line) > self.limit:
            self.share.trim(len(self.buf))
            raise LineTooLong(f"line longer than {self.limit} bytes")
        self.last = self.share.hand_on(used)
        return line

    def _refuse_line(self) -> None:
        """Drop what is buffered of the current line; what is not here yet goes next time."""
        i = self.buf.find(b"\n")
        if i >= 0:
            del self.buf[: i + 1]
        else:
            self.buf.clear()
            self._skipping = True
        self.share.trim(len(self.buf))
        self._scanned = 0

    async def _skip_line(self) -> None:
        self._skipping = False
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                del self.buf[: i + 1]
                return
            self.buf.clear()
            self.share.trim(0)
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                return
            self.buf += chunk


def parse_event(line: bytes) -> dict[str, Any]:
    """One JSON line as a put; ``engine.InvalidArgument`` says what is wrong with it."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise engine.InvalidArgument(f"not UTF-8 at byte {e.start}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise engine.InvalidArgument(f"not JSON: {e.msg} at column {e.colno}") from None
    except RecursionError:  # the json module's guard against a hostile nesting depth
        raise engine.InvalidArgument("not an event: nested too deeply") from None
    if not isinstance(obj, dict):
        raise engine.InvalidArgument("an event must be a JSON object")
    unknown = set(obj) - EVENT_KEYS
    if unknown:
        raise engine.InvalidArgument(f"unknown keys {sorted(unknown)}; allowed: {sorted(EVENT_KEYS)}")
    if not isinstance(obj.get("text"), str):
        raise engine.InvalidArgument('"text" (a string) is required')
    for key in ("timestamp", "expires"):
        t = obj.get(key)
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float))):
            raise engine.InvalidArgument(f'"{key}" must be Unix seconds')
    return obj


class EventServer:
    def __init__(self, queries: AgentServer) -> None:
        self.q = queries  # capsules, limits, and the protocol handling for msgpack producers
        self.events = 0
        self.bad_events = 0

    async def serve(self, listeners: list[trio.SocketListener], *,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> NoReturn:
        await trio.serve_listeners(self.handle, listeners, task_status=task_status)  # type: ignore[arg-type]
        raise AssertionError("serve_listeners returned")

    async def handle(self, stream: trio.SocketStream) -> None:
        try:
            refusal = self.q.events.refusal(stream.socket)  # type: ignore[arg-type]
            if refusal is not None:  # said before the producer's format is known: as a JSON line
                why, retryable = refusal
                await refuse(stream, _ack.encode({"ok": False, "error": why, "code": p.UNAVAILABLE,
                                                  "retryable": retryable}) + b"\n")
                return
            share = Share(self.q.budget)
            try:
                with self.q.events.inside():
                    first = await stream.receive_some(65536)
                    if not first:
                        return
                    if first[:1] in b"{[ \t\r\n":
                        await self._json_lines(stream, first, share)
                    else:
                        await self._messages(stream, first, share)
            finally:
                share.close()
        except BaseException as e:  # noqa: BLE001 - the producer left, or a bug: never the server's end
            connection_ended(e)
        finally:
            await trio.aclose_forcefully(stream)

    async def _json_lines(self, stream: trio.SocketStream, first: bytes, share: Share) -> None:
        reader = LineReader(stream, self.q.max_put + 4096, share, first)
        async with trio.open_nursery() as nursery:
            conn = Connection(stream, nursery, lambda ack: _ack.encode(ack) + b"\n", share)  # small acks
            nursery.start_soon(conn.serve_replies)
            n = 0
            try:
                while True:
                    n += 1
                    try:
                        line = await reader.read()
                    except LineTooLong as e:
                        await self._bad(conn, n, str(e))
                        continue
                    except OverBudget as e:
                        await self._bad(conn, n, str(e), code=p.UNAVAILABLE, retryable=e.retryable)
                        continue
                    if line is None:
                        break
                    conn.held = reader.last  # until its acknowledgement is ready
                    if not line.strip():
                        n -= 1
                        conn.settle()
                        continue
                    await self._event(conn, n, line)
            finally:
                conn.slots_send.close()

    async def _bad(self, conn: Connection, n: int, why: str, code: str = p.BAD_REQUEST,
                   retryable: bool = False) -> None:
        self.bad_events += 1
        await conn.read(ready({"ok": False, "line": n, "error": why, "code": code, "retryable": retryable}),
                        lambda e: None)

    async def _event(self, conn: Connection, n: int, line: bytes) -> None:
        try:
            obj = parse_event(line)
            svc = self.q.service(obj.pop("capsule", None))
            req = msgspec.convert(obj, p.PutItem)
            check(req, self.q.max_put)
            item = put_item(req)
        except (engine.InvalidArgument, LookupError, msgspec.ValidationError) as e:
            await self._bad(conn, n, str(e.args[0] if isinstance(e, LookupError) else e))
            return

        def acked(op: WriteOp) -> dict[str, Any]:
            self.events += 1
            svc.acked_puts += 1
            return {"ok": True, "line": n, "id": op.ids[0], "seq": op.seq}

        def failed(e: BaseException) -> dict[str, Any]:
            err = error_reply(0, e)
            return {"ok": False, "line": n, "error": err.message, "code": err.code, "retryable": err.retryable}

        await conn.write(WriteOp([item]), svc, acked, failed)

    async def _messages(self, stream: trio.SocketStream, first: bytes, share: Share) -> None:
        """Length-prefixed msgpack producers: the query protocol, limited to puts."""
        reader = MessageReader(stream, self.q.max_frame, share)
        reader.feed(first)  # what was peeked to choose the format
        async with trio.open_nursery() as nursery:
            conn = Connection(stream, nursery, self.q.reply_message, share, unaffordable)
            nursery.start_soon(conn.serve_replies)
            try:
                async with aclosing(requests(reader, conn)) as incoming:
                    async for req in incoming:
                        if not isinstance(req, (p.Put, p.PutMany, p.Hello)):
                            await conn.read(ready(p.Error(
                                id=req.id, code=p.BAD_REQUEST,
                                message="the event socket accepts put and put_many only")),
                                lambda e: None)
                            continue
                        self.events += 1
                        await self.q.dispatch(req, conn)
            finally:
                conn.slots_send.close()
