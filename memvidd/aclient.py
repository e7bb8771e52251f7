"""The trio client of the agent socket: ``AsyncClient``, ``Client``'s methods as coroutines
(``async with AsyncClient() as c`` as ``with Client() as c``).

Apart from ``client`` so that a blocking client never imports trio; requests, replies
and errors are built and read by the code the two share there.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import trio

from . import protocol as p
from .client import UNREADABLE, ConnectionLost, _decode, _expected, _Requests, _tailed, default_socket
from .framing import MessageReader
from .peer import check_server

__all__ = ["AsyncClient"]


class AsyncClient(_Requests):
    """``Client``'s methods as coroutines, for trio, over one connection::

        async with AsyncClient() as c:          # connects on entry, as Client() does
            await c.put("the user prefers dark mode", uri="pref://theme")

    ``path`` defaults to the socket every command finds (``default_socket``);
    ``await AsyncClient.connect(path)`` connects at once. Bound waits with trio's own
    ``trio.fail_after`` (``Client``'s ``timeout``)."""

    reader: MessageReader  # made by ``open``, with the stream

    def __init__(self, path: str | None = None, *, max_frame: int = p.DEFAULT_MAX_FRAME) -> None:
        super().__init__(max_frame)
        self.path = path or default_socket()
        self._stream: trio.SocketStream | None = None
        self.lock = trio.Lock()

    @classmethod
    async def connect(cls, path: str | None = None) -> AsyncClient:
        return await cls(path).open()

    async def open(self) -> AsyncClient:
        """Connect, check who serves the socket, and say hello."""
        stream = await trio.open_unix_socket(self.path)
        try:
            check_server(stream.socket, self.path)  # type: ignore[arg-type]
            self._stream = stream
            self.reader = MessageReader(stream, self.max_frame)
            await self.hello()
        except BaseException:
            self._stream = None
            await trio.aclose_forcefully(stream)
            raise
        return self

    @property
    def stream(self) -> trio.SocketStream:
        if self._stream is None:
            raise ConnectionLost("not connected: use `async with AsyncClient() as c` or `await AsyncClient.connect()`")
        return self._stream

    async def _send(self, req: Any) -> None:
        message = self._message(req)
        # If the daemon hung up, its last word (the error why) may still be there to read.
        with contextlib.suppress(trio.BrokenResourceError):
            await self.stream.send_all(message)

    async def _reply(self) -> Any:
        """The next message from the daemon; ``None`` when it closed the connection."""
        try:
            body = await self.reader.read()
            return None if body is None else _decode(body)
        except trio.BrokenResourceError:
            return None
        except UNREADABLE as e:
            await trio.aclose_forcefully(self.stream)
            raise ConnectionLost(f"unreadable reply from the daemon: {e}") from e

    async def _call(self, req: Any) -> Any:
        async with self.lock:
            await self._send(req)
            return _expected(await self._reply())

    async def hello(self) -> p.HelloReply:
        hello = self._greeted(await self._call(p.Hello(id=self._id(), client="memvidd.client/async")))
        self.reader.limit = self.max_frame
        return hello

    async def put(self, text: str | bytes, **kw: Any) -> int:
        return (await self.put_reply(text, **kw)).frame_ids[0]

    async def put_reply(self, text: str | bytes, **kw: Any) -> p.PutReply:
        return self._wrote(kw.get("capsule"), await self._call(self._put(text, **kw)))

    async def put_many(self, items: list[dict[str, Any]], *, capsule: str | None = None) -> list[int]:
        return self._wrote(capsule, await self._call(self._put_many(items, capsule))).frame_ids

    async def find(self, query: str, *, wait: bool = False, **kw: Any) -> list[p.HitOut]:
        return (await self.find_reply(query, wait=wait, **kw)).hits

    async def find_reply(self, query: str, *, wait: bool = False, **kw: Any) -> p.FindReply:
        return await self._call(self._find(query, wait, kw))

    async def searchable(self, seq: int | None = None, *, semantic: bool = True,
                         wait_s: float = p.DEFAULT_WAIT_S, capsule: str | None = None) -> None:
        await self._call(self._searchable(seq, semantic, wait_s, capsule))

    async def get(self, frame_id: int | None = None, **kw: Any) -> p.FrameOut:
        return (await self._call(p.Get(id=self._id(), frame_id=frame_id, **kw))).frame

    async def timeline(self, **kw: Any) -> list[p.FrameOut]:
        return (await self._call(p.Timeline(id=self._id(), **kw))).entries

    async def remove(self, target: int | str, *, capsule: str | None = None) -> int:
        key = {"frame_id": target} if isinstance(target, int) else {"uri": target}
        return self._wrote(capsule, await self._call(p.Remove(id=self._id(), capsule=capsule, **key))).frame_id

    async def stats(self, *, capsule: str | None = None) -> p.CapsuleStats:
        return (await self._call(p.Stats(id=self._id(), capsule=capsule))).stats

    async def capsules(self) -> list[p.CapsuleInfo]:
        return (await self._call(p.Capsules(id=self._id()))).capsules

    async def flush(self, *, capsule: str | None = None) -> int:
        return (await self._call(p.Flush(id=self._id(), capsule=capsule))).seq

    async def verify(self, *, capsule: str | None = None) -> p.VerifyReply:
        return await self._call(p.Verify(id=self._id(), capsule=capsule))

    async def timeline_reply(self, **kw: Any) -> p.TimelineReply:
        return await self._call(p.Timeline(id=self._id(), **kw))

    async def compact(self, *, codecs_only: bool = False, capsule: str | None = None) -> p.CompactReport:
        return (await self._call(p.Compact(id=self._id(), capsule=capsule, codecs_only=codecs_only))).report

    async def rewind(self, to: int | float, *, capsule: str | None = None) -> int:
        return (await self._call(p.Rewind(id=self._id(), capsule=capsule, to=to))).seq

    async def set_rules(self, rules: p.RulesMap, *, force: bool = False,
                        capsule: str | None = None) -> p.RulesReply:
        return await self._call(p.SetRules(id=self._id(), capsule=capsule, rules=rules, force=force))

    async def rules(self, *, as_of: int | float | None = None, capsule: str | None = None) -> p.RulesReply:
        return await self._call(p.Rules(id=self._id(), capsule=capsule, as_of=as_of))

    async def reload(self) -> p.ReloadReply:
        return await self._call(p.Reload(id=self._id()))

    async def session(self, name: str, action: str = "start", *, capsule: str | None = None) -> p.SessionReply:
        return await self._call(p.Session(id=self._id(), capsule=capsule, name=name, action=action))  # type: ignore[arg-type]

    async def tail(self, **kw: Any) -> AsyncIterator[p.FrameOut]:
        await self._send(p.Tail(id=self._id(), **kw))
        while True:
            msg = await self._reply()
            if msg is None:
                return
            if (frame := _tailed(msg)) is not None:
                yield frame

    async def aclose(self) -> None:
        if self._stream is not None:
            await self._stream.aclose()

    async def __aenter__(self) -> AsyncClient:
        if self._stream is None:
            await self.open()
        return self

    async def __aexit__(self, *_: Any) -> None:
        await self.aclose()
