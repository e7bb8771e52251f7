"""The event socket: producers push observations, one per line of JSON (or as protocol
frames), and get one acknowledgement per event once it is durable.

    $ echo '{"text": "user asked about X", "tags": {"role": "user"}}' | socat - UNIX-CONNECT:$sock
    {"ok":true,"id":42,"seq":17}

A connection whose first byte is ``{``, ``[`` or whitespace speaks JSON lines; anything
else is read as length-prefixed msgpack ``put``/``put_many`` messages and answered with
protocol replies. Events on one connection are staged in order and acknowledged in order;
a bad line gets an error line (``{"ok":false,"line":N,"error":...}``) and the stream goes
on; nothing after a bad line is lost.
"""

from __future__ import annotations

import json
import logging
from contextlib import aclosing
import os
from typing import Any, NoReturn

import msgspec
import trio

import engine

from . import protocol as p
from .framing import FrameReader, pack
from .service import WriteOp
from .server import Connection, QueryServer, connection_ended, error_reply, peer_uid, put_item, ready, requests

log = logging.getLogger("memvidd.events")
EVENT_KEYS = {"text", "uri", "title", "tags", "kind", "timestamp", "expires", "capsule"}
_ack = msgspec.json.Encoder()


class LineTooLong(Exception):
    pass


class LineReader:
    def __init__(self, stream: trio.abc.ReceiveStream, limit: int, initial: bytes = b"") -> None:
        self.stream = stream
        self.limit = limit
        self.buf = bytearray(initial)

    async def read(self) -> bytes | None:
        """The next line (without its newline); ``None`` at the end of the stream."""
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                line = bytes(self.buf[:i])
                del self.buf[: i + 1]
                if len(line) > self.limit:
                    raise LineTooLong(f"line longer than {self.limit} bytes")
                return line
            if len(self.buf) > self.limit:
                await self._skip_line()
                raise LineTooLong(f"line longer than {self.limit} bytes")
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                if self.buf:
                    line, self.buf = bytes(self.buf), bytearray()
                    return line
                return None
            self.buf += chunk

    async def _skip_line(self) -> None:
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                del self.buf[: i + 1]
                return
            self.buf.clear()
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
    def __init__(self, queries: QueryServer) -> None:
        self.q = queries  # capsules, limits, and the protocol handling for msgpack producers
        self.events = 0
        self.bad_events = 0

    async def serve(self, listeners: list[trio.SocketListener], *,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> NoReturn:
        await trio.serve_listeners(self.handle, listeners, task_status=task_status)  # type: ignore[arg-type]
        raise AssertionError("serve_listeners returned")

    async def handle(self, stream: trio.SocketStream) -> None:
        try:
            uid = peer_uid(stream.socket)  # type: ignore[arg-type]
            if uid is not None and uid != os.getuid():
                await stream.send_all(b'{"ok":false,"error":"connections from other users are refused"}\n')
                return
            first = await stream.receive_some(65536)
            if not first:
                return
            if first[:1] in b"{[ \t\r\n":
                await self._json_lines(stream, first)
            else:
                await self._frames(stream, first)
        except BaseException as e:  # noqa: BLE001 - the producer left, or a bug: never the server's end
            connection_ended(e)
        finally:
            await trio.aclose_forcefully(stream)

    async def _json_lines(self, stream: trio.SocketStream, first: bytes) -> None:
        reader = LineReader(stream, self.q.max_put + 4096, first)
        async with trio.open_nursery() as nursery:
            conn = Connection(stream, nursery)
            nursery.start_soon(conn.serve_replies, lambda ack: _ack.encode(ack) + b"\n")
            n = 0
            try:
                while True:
                    n += 1
                    try:
                        line = await reader.read()
                    except LineTooLong as e:
                        await self._bad(conn, n, str(e))
                        continue
                    if line is None:
                        break
                    if not line.strip():
                        n -= 1
                        continue
                    await self._event(conn, n, line)
            finally:
                conn.slots_send.close()

    async def _bad(self, conn: Connection, n: int, why: str) -> None:
        self.bad_events += 1
        await conn.read(ready({"ok": False, "line": n, "error": why}), lambda e: None)

    async def _event(self, conn: Connection, n: int, line: bytes) -> None:
        try:
            obj = parse_event(line)
            svc = self.q.service(obj.pop("capsule", None))
            item = put_item(msgspec.convert(obj, p.PutItem), self.q.max_put)
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

    async def _frames(self, stream: trio.SocketStream, first: bytes) -> None:
        """Length-prefixed msgpack producers: the query protocol, limited to puts."""
        reader = FrameReader(stream, self.q.max_frame)
        reader.feed(first)  # what was peeked to choose the format
        async with trio.open_nursery() as nursery:
            conn = Connection(stream, nursery)
            nursery.start_soon(conn.serve_replies, lambda m: pack(p.encoder.encode(m)))
            try:
                async with aclosing(requests(reader, conn)) as incoming:
                    async for req in incoming:
                        if not isinstance(req, (p.Put, p.PutMany, p.Hello)):
                            await conn.read(ready(p.Error(
                                id=req.id, code=p.BAD_REQUEST, message="the event socket accepts put and put_many only")),
                                lambda e: None)
                            continue
                        self.events += 1
                        await self.q.dispatch(req, conn)
            finally:
                conn.slots_send.close()
