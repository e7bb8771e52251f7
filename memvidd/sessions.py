"""Agent sessions: an agent's finds and puts recorded in the capsule, and replayed.

``memvidd session start NAME`` has the daemon record, until ``session stop NAME``, every
find it answers and every put it acknowledges on that capsule, from any connection (an
agent's MCP server, its scripts): the query, its arguments, the commit it ran at and its
hits; the frames a put made and the commit that holds them. Each event is a frame of its
own (kind ``memvidd.session``, tag ``session=NAME``, URI
``session://NAME/<started>/<n>``) whose payload is msgpack bytes: bytes are never indexed
or embedded, so a session never turns up in a search. Recording is in the daemon's
memory: a restart ends every session (what was recorded stays).

``replay`` runs a session's finds again, against another state (``as_of``) or with other
settings (mode, k), and says per query what diverged: hits gained, lost, and moved. A hit
is known by its URI (a file's chunk keeps its URI across versions), or by its frame id
when it has none.

Nothing here imports the engine or trio: the daemon hands the recorder its way to write.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Literal

import msgspec

from . import protocol as p

SESSION_KIND = "memvidd.session"
REPLAYED = ("k", "mode", "scope", "tags", "kind", "since", "until", "as_of", "snippet_chars", "all_versions")


class Event(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One recorded event (the payload of a session frame)."""

    op: Literal["start", "stop", "find", "put"]
    time: float
    seq: int = 0  # find: the commit it searched; put: the commit that holds its frames
    query: str | None = None
    args: dict[str, Any] = {}  # find's arguments as sent (REPLAYED keys)
    mode: str | None = None  # the mode that ran
    hits: list[tuple[int, str | None, float]] = []  # (frame id, uri, score), in rank order
    frame_ids: list[int] = []  # put: the frames it made
    uris: list[str | None] = []


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(Event).decode


class Recorder:
    """The sessions recording on one capsule (daemon side). ``write`` queues puts (the
    engine's ``put`` keywords) to the capsule without waiting for them."""

    def __init__(self, write: Callable[[list[dict[str, Any]]], None]) -> None:
        self._write = write
        self._active: dict[str, tuple[int, int]] = {}  # name -> (started, events so far)

    @property
    def active(self) -> list[str]:
        return sorted(self._active)

    def start(self, name: str) -> int:
        if name in self._active:
            raise ValueError(f"session {name!r} is recording already")
        self._active[name] = (time.time_ns() // 1_000_000, 0)
        self._record_to(name, Event(op="start", time=time.time()))
        return 0

    def stop(self, name: str) -> int:
        """Stop recording ``name``; returns how many finds and puts it recorded."""
        if name not in self._active:
            raise KeyError(f"no session {name!r} is recording (active: {', '.join(self.active) or 'none'})")
        self._record_to(name, Event(op="stop", time=time.time()))
        _, n = self._active.pop(name)
        return n - 2  # its start and stop

    def found(self, req: p.Find, reply: p.FindReply) -> None:
        if self._active:
            args = {key: getattr(req, key) for key in REPLAYED}
            self._record(Event(op="find", time=time.time(), seq=reply.seq, query=req.query, args=args,
                               mode=reply.mode, hits=[(h.frame_id, h.uri, h.score) for h in reply.hits]))

    def put(self, frame_ids: list[int], uris: list[str | None], seq: int) -> None:
        if self._active:
            self._record(Event(op="put", time=time.time(), seq=seq, frame_ids=frame_ids, uris=uris))

    def _record(self, event: Event) -> None:
        for name in list(self._active):
            self._record_to(name, event)

    def _record_to(self, name: str, event: Event) -> None:
        started, n = self._active[name]
        self._active[name] = (started, n + 1)
        self._write([{"data": _encode(event), "uri": f"session://{name}/{started}/{n:06d}", "kind": SESSION_KIND,
                      "tags": {"session": name}, "timestamp": event.time}])


# -- replay (client side) -------------------------------------------------------------------


class Divergence(msgspec.Struct, kw_only=True):
    """How one recorded find compares with its replay."""

    query: str
    recorded_seq: int
    replayed_seq: int
    recorded_mode: str | None
    replayed_mode: str
    same: bool
    hits: int  # in the replay
    gained: list[str] = []  # hits only the replay has
    lost: list[str] = []  # hits only the recording has
    moved: list[tuple[str, int, int]] = []  # (hit, rank then, rank now), ranks from 1


class Replay(msgspec.Struct, kw_only=True):
    session: str
    finds: int
    puts: int
    changed: int
    started: float | None
    ended: float | None
    queries: list[Divergence]


def events(client: Any, name: str, capsule: str | None = None) -> list[Event]:
    """The recorded events of session ``name``, oldest first (``client``: a ``Client``)."""
    client.flush(capsule=capsule)  # the daemon queues events without waiting: read them once written
    frames: dict[int, p.FrameOut] = {}
    since = None
    while True:  # every frame of the kind, a page at a time
        page = client.timeline_reply(kind=SESSION_KIND, limit=p.MAX_TIMELINE, since=since, capsule=capsule).entries
        frames.update((f.id, f) for f in page if f.tags.get("session") == name)
        if len(page) < p.MAX_TIMELINE:
            break
        since = page[-1].timestamp
    out = []
    for f in frames.values():
        data = client.get(f.id, capsule=capsule).data
        if data is not None:
            out.append(_decode(data))
    return sorted(out, key=lambda e: e.time)


def key(frame_id: int, uri: str | None) -> str:
    return uri if uri is not None else f"#{frame_id}"


def ranks(hits: list[tuple[str, float]]) -> dict[str, int]:
    """Each hit's rank, from 1, equal for equal scores ("1224"): hits that tie may come
    back in either order from one search to the next, which is no change."""
    out: dict[str, int] = {}
    rank, previous = 0, None
    for i, (k, score) in enumerate(hits, 1):
        if score != previous:
            rank, previous = i, score
        out.setdefault(k, rank)
    return out


def compare(event: Event, reply: p.FindReply) -> Divergence:
    then = ranks([(key(fid, uri), score) for fid, uri, score in event.hits])
    now = ranks([(key(h.frame_id, h.uri), h.score) for h in reply.hits])
    moved = [(k, then[k], r) for k, r in now.items() if k in then and then[k] != r]
    return Divergence(
        query=event.query or "", recorded_seq=event.seq, replayed_seq=reply.seq, recorded_mode=event.mode,
        replayed_mode=reply.mode, same=then == now, hits=len(now),
        gained=[k for k in now if k not in then], lost=[k for k in then if k not in now], moved=moved)


def replay(client: Any, name: str, *, capsule: str | None = None, **overrides: Any) -> Replay:
    """Run session ``name``'s finds again with ``overrides`` (``as_of``, ``mode``, ``k``:
    those given replace what was recorded; ``as_of`` None means now)."""
    recorded = events(client, name, capsule)
    finds = [e for e in recorded if e.op == "find"]
    if not recorded:
        raise LookupError(f"no session {name!r} is recorded in this capsule")
    queries = []
    for e in finds:
        # What was not asked for then (no as_of: the head) is asked of the head now.
        args = {k: v for k, v in e.args.items() if k in REPLAYED and v is not None}
        args.update({k: v for k, v in overrides.items() if v is not None})
        queries.append(compare(e, client.find_reply(e.query or "", capsule=capsule, **args)))
    marks = [e.time for e in recorded if e.op in ("start", "stop")]
    return Replay(session=name, finds=len(finds), puts=sum(e.op == "put" for e in recorded),
                  changed=sum(not q.same for q in queries), started=min(marks, default=None),
                  ended=max(marks, default=None) if any(e.op == "stop" for e in recorded) else None,
                  queries=queries)
