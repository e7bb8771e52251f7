"""The agent socket: accepts connections and answers protocol requests (docs/protocol.md).

Per connection, requests are read in order and their replies sent in the same order, but
not one at a time: writes are *staged* in order as they are read, then wait for their
fsync in the background, so a client that pipelines puts gets them group-committed;
a read waits only for the writes sent before it on the same connection (read your
writes), and runs in parallel with everything else.

Resource handling: at most ``max_connections`` connections on each socket (``Door``); at
most ``PIPELINE`` requests in flight per connection (the reader stops reading when the
window is full, which is the backpressure a fast client feels); the bytes read from
clients and not answered yet, across all connections of both sockets, within one
``Budget`` (``limits.max-buffer-bytes``). Error handling: a request
that fails gets an ``error`` reply and the connection goes on; a message that cannot be
decoded, is too large or does not fit in the budget gets an ``error`` reply and closes that
connection only.

Engine objects become wire structs here (``frame_out``, ``HitOut.of``, the stats and
reports), and engine errors typed error replies (``error_reply``).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from contextlib import aclosing, contextmanager
from typing import Any, NoReturn

import msgspec
import trio

import engine

from . import protocol as p
from .budget import Budget, OverBudget, Share
from .config import ConfigError
from .framing import MessageReader, MessageTooLarge, TruncatedMessage, pack_message
from .manifest import CHUNK_KIND
from .peer import peer_uid
from .readiness import with_readiness
from .replies import find_reply
from .service import CapsuleService, NotSearchable, Subscriber, WriteOp, frame_filter

log = logging.getLogger("memvidd.server")
PIPELINE = 64


class Door:
    """Who gets in on one socket: peers of our own uid, at most ``limit`` at a time."""

    def __init__(self, limit: int, name: str) -> None:
        self.limit = limit
        self.name = name
        self.open = 0
        self.refused = 0

    def refusal(self, sock: socket.socket) -> tuple[str, bool] | None:
        """Why this new connection is turned away (and whether retrying helps), or ``None``."""
        uid = peer_uid(sock)
        if uid is not None and uid != os.getuid():
            log.warning("refused connection socket=%s peer_uid=%s", self.name, uid)
            self.refused += 1
            return "connections from other users are refused", False
        if self.open >= self.limit:
            self.refused += 1
            return f"too many connections (limit {self.limit})", True
        return None

    @contextmanager
    def inside(self) -> Iterator[None]:
        self.open += 1
        try:
            yield
        finally:
            self.open -= 1


def error_reply(req_id: int, e: BaseException) -> p.Error:
    """The typed reply for an exception: who is at fault, and whether retrying helps."""
    if isinstance(e, engine.InvalidArgument):
        return p.Error(id=req_id, code=p.BAD_REQUEST, message=str(e))
    if isinstance(e, engine.NotFound):
        return p.Error(id=req_id, code=p.NOT_FOUND, message=str(e))
    if isinstance(e, engine.StorageError):
        return p.Error(id=req_id, code=p.STORAGE, message=str(e), retryable=e.retryable)
    if isinstance(e, engine.CorruptionError):
        return p.Error(id=req_id, code=p.CORRUPT, message=str(e))
    if isinstance(e, (engine.CapsuleBroken, engine.CapsuleClosed, engine.CapsuleLocked)):
        return p.Error(id=req_id, code=p.UNAVAILABLE, message=str(e), retryable=True)
    if isinstance(e, NotSearchable):  # a find's min_seq, not searchable in time
        return p.Error(id=req_id, code=p.UNAVAILABLE, message=str(e), retryable=e.retryable)
    if isinstance(e, ConfigError):  # a reload of a configuration that cannot be used
        return p.Error(id=req_id, code=p.BAD_REQUEST, message=str(e))
    if isinstance(e, LookupError):
        return p.Error(id=req_id, code=p.NO_SUCH_CAPSULE, message=str(e.args[0] if e.args else e))
    log.exception("internal error", exc_info=e)
    return p.Error(id=req_id, code=p.INTERNAL, message=f"{type(e).__name__}: {e}")


def unaffordable(reply: Any, why: OverBudget) -> p.Error:
    """What a client gets instead of a reply the budget cannot hold (its replies unread)."""
    return p.Error(id=reply.id, code=p.UNAVAILABLE, message=str(why), retryable=why.retryable)


async def refuse(stream: trio.SocketStream, message: bytes) -> None:
    """Tell a connection turned away at the door why (if it listens within a second)."""
    with trio.move_on_after(1):
        await stream.send_all(message)


def frame_out(f: engine.Frame | engine.FrameInfo) -> p.FrameOut:
    payload = getattr(f, "payload", None)
    return p.FrameOut(
        id=f.id, uri=f.uri, title=f.title, kind=f.kind, tags=f.tags, timestamp=f.timestamp,
        commit_seq=f.commit_seq, commit_time=f.commit_time, valid_until=f.valid_until,
        superseded_by=f.superseded_by, supersedes=f.supersedes, length=f.length,
        text=payload.decode("utf-8", errors="replace") if payload is not None and f.is_text else None,
        data=payload if payload is not None and not f.is_text else None,
    )


def check(req: Any, max_put: int) -> None:
    """``bad_request`` for a request outside the protocol's bounds (``protocol.problem``)."""
    why = p.problem(req, max_put)
    if why is not None:
        raise engine.InvalidArgument(why)


def put_item(item: p.PutItem | p.Put) -> dict[str, Any]:
    """A checked protocol put as engine ``put`` keywords."""
    out: dict[str, Any] = {"text": item.text} if item.text is not None else {"data": item.data}
    for key in ("uri", "title", "tags", "kind", "timestamp", "expires"):
        value = getattr(item, key)
        if value is not None:
            out[key] = value
    return out


VANISHED = (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError)


def connection_ended(e: BaseException) -> None:
    """What ends one connection must never end the server.

    A client that goes away mid-reply shows up as Broken/Closed errors, often wrapped in
    an ExceptionGroup by the connection's nursery: nothing it was promised is lost, so that
    is not even worth a warning. Anything else is a bug, logged with its traceback, but
    still confined to this connection. Cancellation (shutdown) goes on up.
    """
    if isinstance(e, BaseExceptionGroup):
        rest = e.split(VANISHED)[1]
        if rest is None:
            return
        e = rest
    if isinstance(e, VANISHED):
        return
    cancelled, other = (e.split(trio.Cancelled) if isinstance(e, BaseExceptionGroup)
                        else ((e, None) if isinstance(e, trio.Cancelled) else (None, e)))
    if other is not None:
        log.error("connection failed", exc_info=other)
    if cancelled is not None:
        raise cancelled


def ready(reply: Any) -> Callable[[], Awaitable[Any]]:
    """A reply that needs no work, for ``Connection.read``."""

    async def run() -> Any:
        return reply

    return run


async def requests(reader: MessageReader, conn: Connection) -> AsyncGenerator[p.Request, None]:
    """Decoded requests until the stream ends; a bad, oversized or over-budget message gets
    its error reply (after the replies already promised) and ends the connection. Each
    request's bytes stay held in the budget until its reply is ready."""
    while True:
        try:
            body = await reader.read()
        except MessageTooLarge as e:
            await final_error(conn, p.FRAME_TOO_LARGE, str(e))
            return
        except OverBudget as e:
            await final_error(conn, p.UNAVAILABLE, str(e), retryable=e.retryable)
            return
        except TruncatedMessage:
            return
        if body is None:
            return
        try:
            req = p.request_decoder.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as e:
            await final_error(conn, p.BAD_FRAME, f"cannot decode request: {e}")
            return
        except RecursionError:  # msgspec's guard against a hostile nesting depth
            await final_error(conn, p.BAD_FRAME, "cannot decode request: nested too deeply")
            return
        conn.held = reader.last
        yield req
        conn.settle()


async def final_error(conn: Connection, code: p.ErrorCode, message: str, *, retryable: bool = False) -> None:
    """Queue the error that ends a connection (after the replies already promised)."""
    slot = Slot()
    slot.set(conn.encode(p.Error(code=code, message=message, retryable=retryable)))
    await conn.slots_send.send(slot)


class Slot:
    """One reply-to-be, kept in request order, as the bytes to send (``None``: nothing).

    ``held`` is what the slot holds of the budget: its request's bytes until the reply is
    ready, then the reply's until it is sent (a read's; a write's acknowledgement is small).
    """

    def __init__(self, share: Share | None = None, held: int = 0) -> None:
        self.done = trio.Event()
        self.data: bytes | None = None
        self.share = share
        self.held = held

    def release(self) -> None:
        if self.share is not None:
            self.share.answered(self.held)
        self.held = 0

    def set(self, data: bytes | None, held: int = 0) -> None:
        self.release()
        self.data, self.held = data, held
        self.done.set()


class Connection:
    """The ordered request/reply pipeline of one connection (shared with the event socket).

    ``encode`` makes a reply's bytes. With ``refuse``, a read's reply is held in the budget
    until it is sent, and one the budget cannot hold is replaced by ``refuse(reply, why)``:
    a client that asks and does not read its replies cannot pile them up in the daemon.
    """

    def __init__(self, stream: trio.abc.Stream, nursery: trio.Nursery, encode: Callable[[Any], bytes],
                 share: Share | None = None, refuse: Callable[[Any, OverBudget], Any] | None = None) -> None:
        self.stream = stream
        self.nursery = nursery
        self.encode = encode
        self.share = share
        self.refuse = refuse
        self.held = 0  # budget bytes of the request being dispatched, for its slot
        self.send_lock = trio.Lock()
        self.slots_send, self.slots_recv = trio.open_memory_channel[Slot](PIPELINE)
        self.last_write = trio.Event()  # done when the last write queued here is settled
        self.last_write.set()

    def _slot(self) -> Slot:
        slot, self.held = Slot(self.share, self.held), 0
        return slot

    def settle(self) -> None:
        """The request just dispatched made no reply slot (``tail``): give its bytes back."""
        if self.share is not None and self.held:
            self.share.answered(self.held)
        self.held = 0

    async def send_raw(self, data: bytes) -> None:
        async with self.send_lock:
            await self.stream.send_all(data)

    async def send(self, msg: Any) -> None:
        await self.send_raw(pack_message(p.encoder.encode(msg)))

    async def serve_replies(self) -> None:
        """Send replies in request order, each as soon as it and those before it are ready.

        If the peer is gone, the replies are dropped but the requests it sent are still
        read and carried out: a producer that writes its events and hangs up without
        reading the acknowledgements loses none of them.
        """
        gone = False
        async for slot in self.slots_recv:
            await slot.done.wait()
            if slot.data is not None and not gone:
                try:
                    await self.send_raw(slot.data)
                except VANISHED:
                    gone = True
            slot.release()

    def _answer(self, slot: Slot, reply: Any, *, afford: bool) -> None:
        """Fill ``slot`` with ``reply``; ``afford``: hold it in the budget until it is sent."""
        if reply is None:
            slot.set(None)
            return
        slot.release()  # the request's bytes first: its reply may need them
        data, held = self.encode(reply), 0
        if afford and self.share is not None and self.refuse is not None:
            try:
                self.share.hold(len(data))
                held = len(data)
            except OverBudget as e:
                data = self.encode(self.refuse(reply, e))
        slot.set(data, held)

    async def write(self, op: WriteOp, svc: CapsuleService, reply: Callable[[WriteOp], Any],
                    on_error: Callable[[BaseException], Any]) -> None:
        """Queue a write now (in request order); reply when its commit is done."""
        slot = self._slot()
        await self.slots_send.send(slot)
        svc.submit(op)
        self.last_write = op.done

        async def complete() -> None:
            await op.done.wait()
            self._answer(slot, on_error(op.error) if op.error is not None else reply(op), afford=False)

        self.nursery.start_soon(complete)

    async def read(self, run: Callable[[], Awaitable[Any]], on_error: Callable[[BaseException], Any]) -> None:
        """Run a read after the writes sent before it are durable; reply in order."""
        slot = self._slot()
        await self.slots_send.send(slot)
        after = self.last_write

        async def complete() -> None:
            await after.wait()
            try:
                reply = await run()
            except Exception as e:
                reply = on_error(e)
            self._answer(slot, reply, afford=True)

        self.nursery.start_soon(complete)


class AgentServer:
    """The agent socket's server: every request of the protocol, reads and writes, for
    every configured capsule; the event socket hands its msgpack producers to it too."""

    def __init__(self, services: dict[str, CapsuleService], default: str, *, max_frame: int,
                 max_put: int, max_connections: int, tail_buffer: int, version: str,
                 max_buffer: int = 256 << 20,
                 reload: Callable[[], Awaitable[p.ReloadReply]] | None = None) -> None:
        self.services = services
        self.default = default
        self.max_frame = max_frame
        self.max_put = max_put
        self.tail_buffer = tail_buffer
        self.version = version
        self.door = Door(max_connections, "agent")
        self.events = Door(max_connections, "events")  # the event socket's own count
        self.budget = Budget(max_buffer)  # shared with the event socket
        self.served = 0
        self.reload = reload  # the daemon's: re-read the configuration, apply what changed

    def service(self, name: str | None) -> CapsuleService:
        svc = self.services.get(name or self.default)
        if svc is None:
            raise LookupError(f"no capsule named {name!r}; configured: {sorted(self.services)}")
        return svc

    async def serve(self, listeners: list[trio.SocketListener], *,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> NoReturn:
        await trio.serve_listeners(self.handle, listeners, task_status=task_status)  # type: ignore[arg-type]
        raise AssertionError("serve_listeners returned")

    async def handle(self, stream: trio.SocketStream) -> None:
        try:
            refusal = self.door.refusal(stream.socket)  # type: ignore[arg-type]
            if refusal is not None:
                why, retryable = refusal
                await refuse(stream, pack_message(p.encoder.encode(p.Error(code=p.UNAVAILABLE, message=why,
                                                                            retryable=retryable))))
                return
            share = Share(self.budget)
            try:
                with self.door.inside():
                    await self._serve_connection(stream, share)
            finally:
                share.close()
        except BaseException as e:  # noqa: BLE001 - sorted out by `connection_ended`
            connection_ended(e)
        finally:
            await trio.aclose_forcefully(stream)

    def reply_message(self, msg: Any) -> bytes:
        """A reply as a message; one larger than ``max_frame`` (which the client may not be
        able to read) becomes a ``bad_request`` error instead."""
        body = p.encoder.encode(msg)
        if len(body) > self.max_frame:
            body = p.encoder.encode(p.Error(id=getattr(msg, "id", 0), code=p.BAD_REQUEST, message=(
                f"the reply of {len(body)} bytes exceeds max_frame ({self.max_frame}): ask for less "
                "(a lower limit, k or snippet_chars)")))
        return pack_message(body)

    async def _serve_connection(self, stream: trio.SocketStream, share: Share) -> None:
        reader = MessageReader(stream, self.max_frame, share)
        async with trio.open_nursery() as nursery:
            conn = Connection(stream, nursery, self.reply_message, share, unaffordable)

            async def replies_then_stop() -> None:
                await conn.serve_replies()
                nursery.cancel_scope.cancel()  # all replies sent: end tail streams too

            nursery.start_soon(replies_then_stop)
            try:
                async with aclosing(requests(reader, conn)) as incoming:
                    async for req in incoming:
                        self.served += 1
                        await self.dispatch(req, conn)
            finally:
                conn.slots_send.close()  # replies already promised are still sent

    async def dispatch(self, req: p.Request, conn: Connection) -> None:  # noqa: C901 - one match
        rid = req.id

        def fail(e: BaseException) -> p.Error:
            return error_reply(rid, e)

        try:
            check(req, self.max_put)
            match req:
                case p.Hello():
                    reply: p.HelloReply | p.Error = p.HelloReply(
                        id=rid, server=self.version,
                        features=[f for f in p.FEATURES if f != "reload" or self.reload is not None],
                        capsules=list(self.services), default_capsule=self.default, max_frame=self.max_frame,
                        max_put=self.max_put,
                    )
                    if not p.MIN_PROTOCOL_VERSION <= req.version <= p.PROTOCOL_VERSION:
                        reply = p.Error(id=rid, code=p.VERSION, message=(
                            f"client speaks protocol {req.version}, server "
                            f"{p.MIN_PROTOCOL_VERSION}..{p.PROTOCOL_VERSION}"))
                    elif req.version < p.PROTOCOL_VERSION:  # the version this connection speaks
                        reply = msgspec.structs.replace(reply, version=req.version)
                    await conn.read(ready(reply), fail)
                case p.Put() | p.PutMany():
                    svc = self.service(req.capsule)
                    items = [put_item(req)] if isinstance(req, p.Put) else [put_item(i) for i in req.items]

                    def put_reply(op: WriteOp) -> p.PutReply:
                        svc.acked_puts += len(op.ids)
                        svc.sessions.put(op.ids, [i.get("uri") for i in items], op.seq)
                        return p.PutReply(id=rid, frame_ids=op.ids, seq=op.seq)

                    await conn.write(WriteOp(items), svc, put_reply, fail)
                case p.Remove():
                    svc = self.service(req.capsule)
                    if (req.frame_id is None) == (req.uri is None):
                        raise engine.InvalidArgument("remove needs exactly one of frame_id or uri")
                    target: int | str = req.frame_id if req.frame_id is not None else req.uri  # type: ignore[assignment]
                    await conn.write(WriteOp(remove=target), svc,
                                     lambda op: p.RemoveReply(id=rid, frame_id=op.ids[0], seq=op.seq), fail)
                case p.Find():
                    svc = self.service(req.capsule)

                    args: dict[str, Any] = dict(
                        k=req.k, mode=req.mode, scope=req.scope, tags=req.tags, kind=req.kind,
                        since=req.since, until=req.until, as_of=req.as_of, snippet_chars=req.snippet_chars,
                        all_versions=req.all_versions)

                    async def find() -> p.FindReply:
                        reply = await answer()
                        svc.sessions.found(req, reply)
                        return reply

                    async def answer() -> p.FindReply:
                        if req.min_seq is not None:  # read your writes
                            await svc.searchable(req.min_seq, semantic=req.semantic, wait_s=req.wait_s)
                        # A cache hit costs microseconds: answer it here rather than pay a
                        # thread hop (~0.1 ms) for it, unless it needs the capsule again
                        # (file hits' places and freshness, vector coverage).
                        hits = svc.cap.find_cached(req.query, **args)
                        if hits is not None and hits.mode == "lex" and not any(h.kind == CHUNK_KIND for h in hits):
                            return find_reply(rid, svc.cap, hits)
                        return await svc.read(find_reply, rid, svc.cap, hits, req.query, args)

                    await conn.read(find, fail)
                case p.Get():
                    svc = self.service(req.capsule)

                    async def get() -> p.GetReply:
                        f = await svc.read(svc.cap.get, req.frame_id, uri=req.uri, as_of=req.as_of)
                        return p.GetReply(id=rid, frame=frame_out(f))

                    await conn.read(get, fail)
                case p.Timeline():
                    svc = self.service(req.capsule)

                    async def timeline() -> p.TimelineReply:
                        entries = await svc.read(svc.cap.timeline, since=req.since, until=req.until,
                                                 limit=req.limit, reverse=req.reverse, as_of=req.as_of,
                                                 kind=req.kind)
                        return p.TimelineReply(id=rid, entries=[frame_out(e) for e in entries],
                                               expired=getattr(entries, "expired", 0))

                    await conn.read(timeline, fail)
                case p.Stats():
                    svc = self.service(req.capsule)

                    async def stats() -> p.StatsReply:
                        s = msgspec.convert(await svc.read_quietly(svc.cap.stats), p.CapsuleStats)
                        daemon = p.DaemonStats(
                            connections=self.door.open, requests=self.served, refused=self.door.refused,
                            commits=svc.commits, acked_puts=svc.acked_puts,
                            event_connections=self.events.open, event_refused=self.events.refused,
                            buffers=self.budget.stats(),
                            upgrades=dict(svc.upgrades), compactions=dict(svc.compactions))
                        indexer = svc.indexer.stats() if svc.indexer is not None else msgspec.UNSET
                        s = msgspec.structs.replace(s, daemon=daemon, indexer=indexer)
                        return p.StatsReply(id=rid, stats=with_readiness(s))

                    await conn.read(stats, fail)
                case p.Capsules():
                    async def capsules() -> p.CapsulesReply:
                        out = []
                        for name, svc in self.services.items():
                            out.append(p.CapsuleInfo(
                                name=name, path=svc.cap.path, default=name == self.default,
                                frames=svc.cap.frame_count, commit_seq=svc.cap.seq))
                        return p.CapsulesReply(id=rid, capsules=out)

                    await conn.read(capsules, fail)
                case p.Flush():
                    svc = self.service(req.capsule)

                    async def flush() -> p.FlushReply:
                        return p.FlushReply(id=rid, seq=await svc.flush())

                    await conn.read(flush, fail)
                case p.Verify():
                    svc = self.service(req.capsule)

                    async def verify() -> p.VerifyReply:
                        report = msgspec.convert(await svc.verify(), p.VerifyReport, from_attributes=True)
                        return p.VerifyReply(id=rid, ok=report.ok, report=report)

                    await conn.read(verify, fail)
                case p.Compact():
                    svc = self.service(req.capsule)
                    codecs_only = req.codecs_only

                    async def compact() -> p.CompactReply:
                        svc.last_request = trio.current_time()
                        report = await svc.compact(codecs_only=codecs_only)
                        return p.CompactReply(id=rid, report=msgspec.convert(report, p.CompactReport))

                    await conn.read(compact, fail)
                case p.Rewind():
                    svc = self.service(req.capsule)
                    to = req.to
                    if to is None:
                        raise engine.InvalidArgument(
                            "rewind needs `to`: a commit (int) or a Unix time (float)")
                    await conn.write(svc.rewind(to), svc,
                                     lambda op: p.RewindReply(id=rid, seq=op.seq), fail)
                case p.SetRules():
                    svc = self.service(req.capsule)
                    new_rules, force = req.rules, req.force

                    def set_rules(cap: engine.Capsule) -> dict[str, Any]:
                        cap.set_rules(new_rules, force=force)
                        return cap.rules()

                    await conn.write(WriteOp(solo=set_rules), svc,
                                     lambda op: p.RulesReply(id=rid, rules=op.result, seq=op.seq), fail)
                case p.Rules():
                    svc = self.service(req.capsule)
                    as_of = req.as_of

                    async def rules() -> p.RulesReply:
                        seq = svc.cap.seq
                        return p.RulesReply(id=rid, rules=await svc.read(svc.cap.rules, as_of=as_of), seq=seq)

                    await conn.read(rules, fail)
                case p.Session():
                    svc = self.service(req.capsule)

                    async def session() -> p.SessionReply:
                        try:
                            n = svc.sessions.start(req.name) if req.action == "start" else svc.sessions.stop(req.name)
                        except ValueError as e:
                            raise engine.InvalidArgument(str(e)) from None
                        except KeyError as e:
                            raise engine.NotFound(e.args[0]) from None
                        return p.SessionReply(id=rid, name=req.name, events=n, active=svc.sessions.active)

                    await conn.read(session, fail)
                case p.Reload():
                    reloader = self.reload
                    if reloader is None:
                        raise engine.InvalidArgument("this server has no configuration to reload")

                    async def reload() -> p.ReloadReply:
                        return msgspec.structs.replace(await reloader(), id=rid)

                    await conn.read(reload, fail)
                case p.Tail():
                    svc = self.service(req.capsule)
                    # Subscribed before the next request is read: a reply to any later
                    # request on this connection means the subscription is in place.
                    share = conn.share
                    sub, events = svc.subscribe(self.tail_buffer, frame_filter(req.scope, req.kind, req.tags),
                                                hold=share.hold_queued if share else None,
                                                release=share.answered if share else None)
                    conn.nursery.start_soon(self._tail, svc, req, conn, sub, events)
        except Exception as e:  # refused before anything was staged: answer in order
            await conn.read(ready(error_reply(rid, e)), fail)

    async def _tail(self, svc: CapsuleService, req: p.Tail, conn: Connection, sub: Subscriber,
                    events: trio.MemoryReceiveChannel[Any]) -> None:
        try:
            async with events:
                async for batch, size in events:
                    if sub.dropped:
                        break  # its queue was given back when it was dropped
                    sub.taken(size)
                    try:
                        for frame in batch:
                            await conn.send(p.TailEvent(id=req.id, frame=frame_out(frame)))
                    finally:
                        sub.release(size)
            if sub.dropped:
                await conn.send(p.TailEnd(id=req.id, reason=p.SLOW_CONSUMER))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            svc.unsubscribe(sub)
