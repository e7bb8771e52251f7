"""Every message of the agent protocol, in one place (spec: docs/protocol.md).

A frame is a 4-byte big-endian length and a msgpack body; every body is one of the
tagged structs below (the tag is the ``op`` field). Requests carry an ``id`` that their
reply echoes, so a client may pipeline. New optional fields may be added to any message;
unknown fields are ignored, so old clients keep working.
"""

from __future__ import annotations

from typing import Any, Union

import msgspec

PROTOCOL_VERSION = 2
MIN_PROTOCOL_VERSION = 1  # the oldest a server still serves: version 2 only added to 1
DEFAULT_MAX_FRAME = 16 << 20  # bytes of one frame body; checked before reading it
FEATURES = ("put", "put_many", "find", "get", "timeline", "remove", "stats", "tail",
            "capsules", "flush", "verify", "pipelining", "as_of",
            # version 2
            "expires", "compact", "rewind", "rules", "set_rules")

# Bounds on request fields (docs/protocol.md, "Limits"), in UTF-8 bytes: what a request
# brings to the engine, its caches and the replies stays small whatever a client sends.
# The engine's own limits on frame metadata (engine/capsule.py, docs/format.md [F-09];
# tests/test_limits.py keeps the two equal), checked here so that a client learns them
# before sending and the daemon answers bad_request before any work.
MAX_URI = 16 << 10  # put/get/remove uri, and a find/tail scope (a URI prefix)
MAX_TITLE = 4 << 10
MAX_NAME = 256  # kind, capsule, a tag key
MAX_TAG_VALUE = 4 << 10
MAX_TAGS = 256  # pairs in one tags map
MAX_SCOPE = MAX_URI
MAX_QUERY = 16384  # the engine searches the first 4096 characters anyway
MAX_SNIPPET_CHARS = 4096
MAX_TIMELINE = 10_000  # entries of one timeline reply
MAX_RULES = 65536  # set_rules rules, as msgpack
_STRINGS = {"uri": MAX_URI, "title": MAX_TITLE, "kind": MAX_NAME, "capsule": MAX_NAME, "scope": MAX_SCOPE,
            "query": MAX_QUERY}


def _snake(name: str) -> str:
    """The wire tag of a message class: ``PutMany`` -> ``put_many``."""
    return "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")


class Msg(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, tag_field="op", tag=_snake):
    pass


AsOf = Union[int, float, None]  # a commit sequence (int) or a Unix time (float)

# -- requests --------------------------------------------------------------------------


class Hello(Msg):
    id: int = 0
    version: int = PROTOCOL_VERSION
    client: str = ""


class PutItem(msgspec.Struct, frozen=True, kw_only=True):
    text: str | None = None
    data: bytes | None = None
    uri: str | None = None
    title: str | None = None
    tags: dict[str, str] | None = None
    kind: str | None = None
    timestamp: float | None = None
    expires: float | None = None  # Unix time when the frame leaves every query (v2)


class Put(Msg):
    id: int = 0
    capsule: str | None = None
    text: str | None = None
    data: bytes | None = None
    uri: str | None = None
    title: str | None = None
    tags: dict[str, str] | None = None
    kind: str | None = None
    timestamp: float | None = None
    expires: float | None = None  # Unix time when the frame leaves every query (v2)


class PutMany(Msg):
    id: int = 0
    capsule: str | None = None
    items: list[PutItem] = []


class Find(Msg):
    id: int = 0
    capsule: str | None = None
    query: str = ""
    k: int = 10
    mode: str = "auto"
    scope: str | None = None
    tags: dict[str, str] | None = None
    kind: str | None = None
    since: float | None = None
    until: float | None = None
    as_of: AsOf = None
    snippet_chars: int = 200
    all_versions: bool = False


class Get(Msg):
    id: int = 0
    capsule: str | None = None
    frame_id: int | None = None
    uri: str | None = None
    as_of: AsOf = None


class Timeline(Msg):
    id: int = 0
    capsule: str | None = None
    since: float | None = None
    until: float | None = None
    limit: int = 100
    reverse: bool = False
    as_of: AsOf = None


class Remove(Msg):
    id: int = 0
    capsule: str | None = None
    frame_id: int | None = None
    uri: str | None = None


class Stats(Msg):
    id: int = 0
    capsule: str | None = None


class Tail(Msg):
    """Subscribe: every frame committed from now on (matching the filters) is sent as a
    ``tail_event`` until the client closes the connection or is too slow."""

    id: int = 0
    capsule: str | None = None
    scope: str | None = None
    kind: str | None = None
    tags: dict[str, str] | None = None


class Capsules(Msg):
    id: int = 0


class Flush(Msg):
    id: int = 0
    capsule: str | None = None


class Verify(Msg):
    id: int = 0
    capsule: str | None = None


class Compact(Msg):
    """Rewrite the capsule without its dead bytes (or, ``codecs_only``, only upgrade the
    codecs of its payloads); the daemon keeps serving meanwhile (v2)."""

    id: int = 0
    capsule: str | None = None
    codecs_only: bool = False


class Rewind(Msg):
    """Make the state as of ``to`` the head again, with one new commit (v2)."""

    id: int = 0
    capsule: str | None = None
    to: AsOf = None  # required: a commit sequence (int) or a Unix time (float)


class SetRules(Msg):
    """Replace the capsule's retention rules, recorded as a commit (v2)."""

    id: int = 0
    capsule: str | None = None
    rules: dict[str, Any] = {}
    force: bool = False  # needed when the rules would expire every live frame


class Rules(Msg):
    """The retention rules in force at ``as_of`` (v2)."""

    id: int = 0
    capsule: str | None = None
    as_of: AsOf = None


Request = Union[Hello, Put, PutMany, Find, Get, Timeline, Remove, Stats, Tail, Capsules, Flush, Verify,
                Compact, Rewind, SetRules, Rules]

# -- replies ---------------------------------------------------------------------------


class FrameOut(msgspec.Struct, frozen=True, kw_only=True):
    """A frame on the wire (``text`` for text frames, ``data`` for bytes)."""

    id: int
    uri: str | None
    title: str | None
    kind: str | None
    tags: dict[str, str]
    timestamp: float
    commit_seq: int
    commit_time: float
    valid_until: int | None
    superseded_by: int | None
    supersedes: int | None
    length: int
    text: str | None = None
    data: bytes | None = None


class HitOut(msgspec.Struct, frozen=True, kw_only=True):
    frame_id: int
    uri: str | None
    title: str | None
    score: float
    snippet: str
    highlights: list[tuple[int, int]]
    tags: dict[str, str]
    kind: str | None
    timestamp: float
    commit_seq: int
    valid_until: int | None
    sources: list[str]


class CapsuleInfo(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    path: str
    default: bool
    frames: int
    commit_seq: int


class HelloReply(Msg):
    id: int = 0
    version: int = PROTOCOL_VERSION
    server: str = ""
    features: list[str] = []
    capsules: list[str] = []
    default_capsule: str = ""
    max_frame: int = DEFAULT_MAX_FRAME
    max_put: int = 0  # bytes of one payload (limits.max-put-bytes); 0: not announced (older servers)


class PutReply(Msg):
    id: int = 0
    frame_ids: list[int] = []
    seq: int = 0  # the commit that made them durable


class FindReply(Msg):
    id: int = 0
    hits: list[HitOut] = []
    mode: str = ""
    seq: int = 0
    warnings: list[str] = []
    cached: bool = False


class GetReply(Msg):
    id: int = 0
    frame: FrameOut | None = None


class TimelineReply(Msg):
    id: int = 0
    entries: list[FrameOut] = []
    expired: int = 0  # frames of the range that retention hid (v2)


class RemoveReply(Msg):
    id: int = 0
    frame_id: int = 0
    seq: int = 0


class StatsReply(Msg):
    id: int = 0
    stats: dict[str, Any] = {}


class CapsulesReply(Msg):
    id: int = 0
    capsules: list[CapsuleInfo] = []


class FlushReply(Msg):
    id: int = 0
    seq: int = 0


class VerifyReply(Msg):
    id: int = 0
    ok: bool = True
    report: dict[str, Any] = {}


class CompactReply(Msg):
    id: int = 0
    report: dict[str, Any] = {}


class RewindReply(Msg):
    id: int = 0
    seq: int = 0  # the commit that recorded the rewind


class RulesReply(Msg):
    id: int = 0
    rules: dict[str, Any] = {}
    seq: int = 0  # set_rules: the commit that recorded them; rules: the head when read


class TailEvent(Msg):
    id: int = 0  # the id of the Tail request
    frame: FrameOut | None = None


class TailEnd(Msg):
    id: int = 0
    reason: str = ""


class Error(Msg):
    id: int = 0
    code: str = "internal"
    message: str = ""
    retryable: bool = False


Reply = Union[HelloReply, PutReply, FindReply, GetReply, TimelineReply, RemoveReply, StatsReply,
              CapsulesReply, FlushReply, VerifyReply, CompactReply, RewindReply, RulesReply,
              TailEvent, TailEnd, Error]

# Error codes (docs/protocol.md lists when each is sent).
BAD_FRAME = "bad_frame"  # undecodable body, unknown op, wrong field types
FRAME_TOO_LARGE = "frame_too_large"
BAD_REQUEST = "bad_request"  # well-formed but invalid arguments
NOT_FOUND = "not_found"
NO_SUCH_CAPSULE = "no_such_capsule"
VERSION = "version_mismatch"  # hello with a version outside MIN_PROTOCOL_VERSION..PROTOCOL_VERSION
UNAVAILABLE = "unavailable"  # shutting down, capsule locked: retry later
STORAGE = "storage"  # disk full, I/O error
CORRUPT = "corrupt"
SLOW_CONSUMER = "slow_consumer"
INTERNAL = "internal"

request_decoder = msgspec.msgpack.Decoder(Request)
reply_decoder = msgspec.msgpack.Decoder(Reply)
encoder = msgspec.msgpack.Encoder()


def _size(text: str) -> int:
    return len(text.encode("utf-8", errors="surrogatepass"))  # a lone surrogate is the engine's to refuse


def problem(req: Any, max_put: int = 0) -> str | None:
    """What puts a request (or a ``PutItem``) outside the bounds above and ``max_put`` (the
    payload limit; 0: unchecked), or ``None``. The daemon answers it with ``bad_request``;
    the clients raise the same error without sending the request."""
    for name, limit in _STRINGS.items():
        value = getattr(req, name, None)
        if isinstance(value, str) and _size(value) > limit:
            return f"{name} of {_size(value)} bytes exceeds the limit of {limit}"
    tags = getattr(req, "tags", None)
    if tags:
        if len(tags) > MAX_TAGS:
            return f"{len(tags)} tags exceed the limit of {MAX_TAGS}"
        for key, value in tags.items():
            if _size(key) > MAX_NAME or _size(value) > MAX_TAG_VALUE:
                return f"tag {key[:40]!r} exceeds the limits of {MAX_NAME} bytes (key) and {MAX_TAG_VALUE} (value)"
    match req:
        case Put() | PutItem():
            if (req.text is None) == (req.data is None):
                return "a put needs exactly one of text or data"
            size = len(req.data) if req.data is not None else _size(req.text)  # type: ignore[arg-type]
            if max_put and size > max_put:
                return f"payload of {size} bytes exceeds the limit of {max_put}"
        case PutMany():
            for i, item in enumerate(req.items):
                why = problem(item, max_put)
                if why is not None:
                    return f"item {i}: {why}"
        case Find() if req.snippet_chars > MAX_SNIPPET_CHARS:
            return f"snippet_chars {req.snippet_chars} exceeds the limit of {MAX_SNIPPET_CHARS}"
        case Timeline() if req.limit > MAX_TIMELINE:
            return f"limit {req.limit} exceeds the limit of {MAX_TIMELINE} (page with since/until)"
        case SetRules():
            try:
                size = len(encoder.encode(req.rules))
            except RecursionError:  # a client's own hostile nesting
                return "rules nested too deeply"
            if size > MAX_RULES:
                return f"rules of {size} bytes exceed the limit of {MAX_RULES}"
    return None
