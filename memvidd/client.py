"""Clients of the agent socket: ``Client`` (blocking, here) and ``AsyncClient`` (trio,
in ``aclient``; ``from memvidd.client import AsyncClient`` loads it on first use).

Both have the same methods; each builds a request, sends it, and returns the reply's
useful part, typed by ``protocol`` (or raises ``RemoteError``). ``tail`` yields frames
until the connection is closed. Both refuse a socket that another user serves
(``ForeignPeer``) before sending anything, and refuse a request the daemon would refuse
for its size (from the limits it announced at hello) with the daemon's own error,
without sending it::

    with Client("/run/user/1000/memvidd/memvidd.sock") as c:
        c.put("the user prefers dark mode", uri="pref://theme", tags={"kind": "pref"})
        for hit in c.find("what theme does the user like", wait=True):
            print(hit.score, hit.uri, hit.snippet)

Read your writes: a client remembers the commit of its last write to each capsule
(``written``); ``find(..., wait=True)`` answers only once that commit is searchable, by
meaning too (its vectors are made in the background), and ``searchable()`` waits for it
alone. On one connection a find already sees the writes sent before it lexically; the
wait is what makes the vectors, and other connections' writes (``min_seq``), count too.

This module, ``protocol`` and ``framing`` import neither the engine nor trio: a blocking
client (and a ``memvidd find``) starts in the time of msgspec's import, not numpy's.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import msgspec

from . import protocol as p
from .framing import MessageTooLarge, TruncatedMessage, pack_message, recv_message
from .peer import ForeignPeer, check_server

if TYPE_CHECKING:
    from .aclient import AsyncClient

__all__ = ["AsyncClient", "Client", "ConnectionLost", "ForeignPeer", "RemoteError", "default_socket"]


class RemoteError(Exception):
    """The daemon answered with an error."""

    def __init__(self, err: p.Error) -> None:
        super().__init__(f"{err.code}: {err.message}")
        self.code: p.ErrorCode = err.code
        self.message = err.message
        self.retryable = err.retryable


class ConnectionLost(Exception):
    """The daemon closed the connection before replying (or sent what cannot be read: the
    connection is closed then, as nothing after it could be trusted)."""


UNREADABLE = (MessageTooLarge, TruncatedMessage, msgspec.DecodeError, msgspec.ValidationError)


def __getattr__(name: str) -> Any:
    """``AsyncClient`` on first use: importing it imports trio, which a blocking client
    (and every ``memvidd`` command) does without."""
    if name == "AsyncClient":
        from .aclient import AsyncClient

        return AsyncClient
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def default_socket() -> str:
    """``$MEMVIDD_SOCKET``, else the socket of the configuration every command finds
    (``$MEMVIDD_CONFIG``, the user's config.toml, the embedded default: ``config.locate``)."""
    env = os.environ.get("MEMVIDD_SOCKET")
    if env:
        return env
    from .config import default_socket as configured

    return configured()


class _Requests:
    """Request construction shared by both clients: each method returns (request, unwrap)."""

    def __init__(self, max_frame: int) -> None:
        self._ids = itertools.count(1)
        self.max_frame = max_frame  # of a reply this client reads
        self.server = p.HelloReply()  # the protocol's defaults until hello says more (max_put 0: unchecked)
        self.written: dict[str | None, int] = {}  # capsule (None: the default) -> commit of this client's last write

    def _id(self) -> int:
        return next(self._ids)

    def _wrote(self, capsule: str | None, reply: Any) -> Any:
        """Remember the commit of a write's ``reply`` (read your writes)."""
        self.written[capsule] = max(self.written.get(capsule, 0), reply.seq)
        return reply

    def _find(self, query: str, wait: bool, kw: dict[str, Any]) -> p.Find:
        """A find; ``wait``: once this client's last write to the capsule is searchable,
        by meaning too unless the mode is lexical."""
        if wait and kw.get("min_seq") is None:
            kw = {**kw, "min_seq": self.written.get(kw.get("capsule"), 0),
                  "semantic": kw.get("mode", "auto") != "lex"}
        return p.Find(id=self._id(), query=query, **kw)

    def _searchable(self, seq: int | None, semantic: bool, wait_s: float, capsule: str | None) -> p.Find:
        """A find of nothing that answers once commit ``seq`` (default: this client's last
        write to the capsule) is searchable."""
        seq = self.written.get(capsule, 0) if seq is None else seq
        return p.Find(id=self._id(), capsule=capsule, query="", k=0, min_seq=seq, semantic=semantic, wait_s=wait_s)

    def _message(self, req: Any) -> bytes:
        """``req`` as a message, unless the daemon would refuse it by the bounds of the
        protocol and the limits it announced at hello: then its error, raised here (a
        message over ``max_frame`` would also cost the connection)."""
        why = p.problem(req, self.server.max_put)
        if why is not None:
            raise RemoteError(p.Error(id=req.id, code=p.BAD_REQUEST, message=why))
        body = p.encoder.encode(req)
        if len(body) > self.server.max_frame:
            raise RemoteError(p.Error(id=req.id, code=p.FRAME_TOO_LARGE,
                                      message=str(MessageTooLarge(len(body), self.server.max_frame))))
        return pack_message(body)

    def _greeted(self, hello: p.HelloReply) -> p.HelloReply:
        self.server = hello
        self.max_frame = max(self.max_frame, hello.max_frame)  # the daemon's replies stay within it
        return hello

    def _put(self, text: str | bytes, **kw: Any) -> p.Put:
        if isinstance(text, bytes):
            return p.Put(id=self._id(), data=text, **kw)
        return p.Put(id=self._id(), text=text, **kw)

    def _put_many(self, items: list[dict[str, Any]], capsule: str | None) -> p.PutMany:
        return p.PutMany(id=self._id(), capsule=capsule, items=[p.PutItem(**i) for i in items])


def _decode(body: bytes) -> Any:
    """A reply, or its ``RemoteError``."""
    reply = p.reply_decoder.decode(body)
    if isinstance(reply, p.Error):
        raise RemoteError(reply)
    return reply


def _expected(reply: Any) -> Any:
    if reply is None:
        raise ConnectionLost("the daemon closed the connection")
    return reply


def _tailed(msg: Any) -> p.FrameOut | None:
    """The frame a message of a tail stream brings; ``RemoteError`` if the daemon ended it."""
    if isinstance(msg, p.TailEnd):
        raise RemoteError(p.Error(code=msg.reason, message="tail ended by the daemon", retryable=True))
    return msg.frame if isinstance(msg, p.TailEvent) else None


class Client(_Requests):
    """A blocking client over one connection. Not thread-safe: one per thread."""

    def __init__(self, path: str | None = None, *, timeout: float | None = 30.0,
                 max_frame: int = p.DEFAULT_MAX_FRAME) -> None:
        super().__init__(max_frame)
        self.path = path or default_socket()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(self.path)
            check_server(self.sock, self.path)
            self.hello()
        except BaseException:
            self.sock.close()
            raise

    def _send(self, req: Any) -> None:
        # If the daemon hung up, its last word (the error why) may still be there to read.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.sock.sendall(self._message(req))

    def _reply(self) -> Any:
        """The next message from the daemon; ``None`` when it closed the connection."""
        try:
            body = recv_message(self.sock, self.max_frame)
            return None if body is None else _decode(body)
        except ConnectionResetError:
            return None
        except UNREADABLE as e:
            self.close()
            raise ConnectionLost(f"unreadable reply from the daemon: {e}") from e

    def _call(self, req: Any) -> Any:
        self._send(req)
        return _expected(self._reply())

    def hello(self) -> p.HelloReply:
        return self._greeted(self._call(p.Hello(id=self._id(), client="memvidd.client")))

    def put(self, text: str | bytes, **kw: Any) -> int:
        return self.put_reply(text, **kw).frame_ids[0]

    def put_reply(self, text: str | bytes, **kw: Any) -> p.PutReply:
        """``put`` with the whole reply (``seq``: the commit that holds it)."""
        return self._wrote(kw.get("capsule"), self._call(self._put(text, **kw)))

    def put_many(self, items: list[dict[str, Any]], *, capsule: str | None = None) -> list[int]:
        return self._wrote(capsule, self._call(self._put_many(items, capsule))).frame_ids

    def find(self, query: str, *, wait: bool = False, **kw: Any) -> list[p.HitOut]:
        return self.find_reply(query, wait=wait, **kw).hits

    def find_reply(self, query: str, *, wait: bool = False, **kw: Any) -> p.FindReply:
        return self._call(self._find(query, wait, kw))

    def searchable(self, seq: int | None = None, *, semantic: bool = True, wait_s: float = p.DEFAULT_WAIT_S,
                   capsule: str | None = None) -> None:
        """Return once commit ``seq`` (default: this client's last write to ``capsule``) is
        searchable, by meaning too with ``semantic``; ``RemoteError`` (``unavailable``)
        after ``wait_s`` seconds."""
        self._call(self._searchable(seq, semantic, wait_s, capsule))

    def get(self, frame_id: int | None = None, **kw: Any) -> p.FrameOut:
        return self._call(p.Get(id=self._id(), frame_id=frame_id, **kw)).frame

    def timeline(self, **kw: Any) -> list[p.FrameOut]:
        return self._call(p.Timeline(id=self._id(), **kw)).entries

    def remove(self, target: int | str, *, capsule: str | None = None) -> int:
        key = {"frame_id": target} if isinstance(target, int) else {"uri": target}
        return self._wrote(capsule, self._call(p.Remove(id=self._id(), capsule=capsule, **key))).frame_id

    def stats(self, *, capsule: str | None = None) -> p.CapsuleStats:
        return self._call(p.Stats(id=self._id(), capsule=capsule)).stats

    def capsules(self) -> list[p.CapsuleInfo]:
        return self._call(p.Capsules(id=self._id())).capsules

    def flush(self, *, capsule: str | None = None) -> int:
        return self._call(p.Flush(id=self._id(), capsule=capsule)).seq

    def verify(self, *, capsule: str | None = None) -> p.VerifyReply:
        return self._call(p.Verify(id=self._id(), capsule=capsule))

    def timeline_reply(self, **kw: Any) -> p.TimelineReply:
        """``timeline`` with the whole reply (``expired``: frames retention hid)."""
        return self._call(p.Timeline(id=self._id(), **kw))

    def compact(self, *, codecs_only: bool = False, capsule: str | None = None) -> p.CompactReport:
        """Compact the capsule (or only upgrade its codecs); returns the report
        (``bytes_before``, ``bytes_after``, ...). May take long: mind the timeout."""
        return self._call(p.Compact(id=self._id(), capsule=capsule, codecs_only=codecs_only)).report

    def rewind(self, to: int | float, *, capsule: str | None = None) -> int:
        """Make the state as of ``to`` (commit or Unix time) the head again; returns the
        commit that recorded the rewind."""
        return self._call(p.Rewind(id=self._id(), capsule=capsule, to=to)).seq

    def set_rules(self, rules: p.RulesMap, *, force: bool = False,
                  capsule: str | None = None) -> p.RulesReply:
        return self._call(p.SetRules(id=self._id(), capsule=capsule, rules=rules, force=force))

    def rules(self, *, as_of: int | float | None = None, capsule: str | None = None) -> p.RulesReply:
        return self._call(p.Rules(id=self._id(), capsule=capsule, as_of=as_of))

    def session(self, name: str, action: str = "start", *, capsule: str | None = None) -> p.SessionReply:
        """Start or stop recording session ``name`` (``"session" in self.server.features``)."""
        return self._call(p.Session(id=self._id(), capsule=capsule, name=name, action=action))  # type: ignore[arg-type]

    def reload(self) -> p.ReloadReply:
        """Have the daemon re-read its configuration file and apply what changed; the
        reply lists the changes (``"reload" in self.server.features`` first: older
        daemons reload on SIGHUP only)."""
        return self._call(p.Reload(id=self._id()))

    def tail(self, **kw: Any) -> Iterator[p.FrameOut]:
        """Frames as they are committed, until the daemon ends the stream or the
        connection is closed. The connection is used up by this call."""
        self._send(p.Tail(id=self._id(), **kw))
        self.sock.settimeout(None)
        while True:
            msg = self._reply()
            if msg is None:
                return
            if (frame := _tailed(msg)) is not None:
                yield frame

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()
