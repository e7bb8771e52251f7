"""Every message of the agent protocol, in one place (spec: docs/protocol.md).

A message is a 4-byte big-endian length and a msgpack body (``framing.py``; the wire's
names, ``max_frame`` or ``frame_too_large``, call one a *frame*); every body is one of the
tagged structs below (the tag is the ``op`` field). Requests carry an ``id`` that their
reply echoes, so a client may pipeline. New optional fields may be added to any message;
unknown fields are ignored, so old clients keep working. Every reply, and every part of
one, is a struct: the fields a client can count on are the ones named here.

This module imports nothing of the engine (nor trio): the blocking client and the
command line's daemon commands load only it, ``framing`` and ``client``.
"""

from __future__ import annotations

from typing import Any, Final, Literal, get_args

import msgspec

PROTOCOL_VERSION = 2
MIN_PROTOCOL_VERSION = 1  # the oldest a server still serves: version 2 only added to 1
DEFAULT_MAX_FRAME = 16 << 20  # bytes of one message body (the wire's max_frame); checked before reading it
FEATURES = ("put", "put_many", "find", "get", "timeline", "remove", "stats", "tail",
            "capsules", "flush", "verify", "pipelining", "as_of",
            # version 2
            "expires", "compact", "rewind", "rules", "set_rules",
            # later additions within version 2 (optional: check ``features`` before sending)
            "reload", "min_seq", "timeline_kind", "session")

# Bounds on request fields (docs/protocol.md, "Limits"), in UTF-8 bytes: what a request
# brings to the engine, its caches and the replies stays small whatever a client sends.
# The engine's own limits on frame metadata (engine/metadata.py, docs/format.md [F-09];
# tests/engine/test_limits.py keeps the two equal), checked here so that a client learns them
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
DEFAULT_WAIT_S = 10.0  # how long a find with `min_seq` waits for that commit to be searchable
MAX_WAIT_S = 60.0
_STRINGS = {"uri": MAX_URI, "title": MAX_TITLE, "kind": MAX_NAME, "capsule": MAX_NAME, "scope": MAX_SCOPE,
            "query": MAX_QUERY}


def _snake(name: str) -> str:
    """The wire tag of a message class: ``PutMany`` -> ``put_many``."""
    return "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")


class Msg(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, tag_field="op", tag=_snake):
    pass


AsOf = int | float | None  # a commit sequence (int) or a Unix time (float)
Mode = Literal["auto", "lex", "vec", "hybrid"]  # how find ranks; "auto": hybrid if the capsule has vectors
ErrorCode = Literal["bad_frame", "frame_too_large", "bad_request", "not_found", "no_such_capsule",
                    "version_mismatch", "unavailable", "storage", "corrupt", "slow_consumer", "internal"]
MODES: Final = get_args(Mode)

# -- requests --------------------------------------------------------------------------


class Hello(Msg, frozen=True):
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


class Put(Msg, frozen=True):
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


class PutMany(Msg, frozen=True):
    id: int = 0
    capsule: str | None = None
    items: list[PutItem] = []


class Find(Msg, frozen=True):
    id: int = 0
    capsule: str | None = None
    query: str = ""
    k: int = 10
    # A `Mode`, checked by `problem` rather than by the decoder: a bad one is a
    # bad_request on a connection that goes on, not a bad_frame that closes it.
    mode: str = "auto"
    scope: str | None = None
    tags: dict[str, str] | None = None
    kind: str | None = None
    since: float | None = None
    until: float | None = None
    as_of: AsOf = None
    snippet_chars: int = 200
    all_versions: bool = False
    # Read your writes (added within version 2): answer only once commit `min_seq` (a
    # put's `seq`) is searchable, and with `semantic` once the text frames up to it have
    # their vectors too; at most `wait_s` seconds, then `unavailable` (retryable).
    min_seq: int | None = None
    semantic: bool = False
    wait_s: float = DEFAULT_WAIT_S


class Get(Msg, frozen=True):
    id: int = 0
    capsule: str | None = None
    frame_id: int | None = None
    uri: str | None = None
    as_of: AsOf = None


class Timeline(Msg, frozen=True):
    id: int = 0
    capsule: str | None = None
    since: float | None = None
    until: float | None = None
    limit: int = 100
    reverse: bool = False
    as_of: AsOf = None
    kind: str | None = None  # only frames of this kind (added within version 2)


class Remove(Msg, frozen=True):
    id: int = 0
    capsule: str | None = None
    frame_id: int | None = None
    uri: str | None = None


class Stats(Msg, frozen=True):
    id: int = 0
    capsule: str | None = None


class Tail(Msg, frozen=True):
    """Subscribe: every frame committed from now on (matching the filters) is sent as a
    ``tail_event`` until the client closes the connection or is too slow."""

    id: int = 0
    capsule: str | None = None
    scope: str | None = None
    kind: str | None = None
    tags: dict[str, str] | None = None


class Capsules(Msg, frozen=True):
    id: int = 0


class Flush(Msg, frozen=True):
    id: int = 0
    capsule: str | None = None


class Verify(Msg, frozen=True):
    id: int = 0
    capsule: str | None = None


class Compact(Msg, frozen=True):
    """Rewrite the capsule without its dead bytes (or, ``codecs_only``, only upgrade the
    codecs of its payloads); the daemon keeps serving meanwhile (v2)."""

    id: int = 0
    capsule: str | None = None
    codecs_only: bool = False


class Rewind(Msg, frozen=True):
    """Make the state as of ``to`` the head again, with one new commit (v2)."""

    id: int = 0
    capsule: str | None = None
    to: AsOf = None  # required: a commit sequence (int) or a Unix time (float)


# Retention rules as a map (docs/protocol.md, "The capsule's life"): the engine's
# ``retention.parse`` is their one validator, so that bad rules are a bad_request with the
# reason (on a connection that goes on), not a bad_frame; replies carry them as stored.
RulesMap = dict[str, Any]


class SetRules(Msg, frozen=True):
    """Replace the capsule's retention rules, recorded as a commit (v2)."""

    id: int = 0
    capsule: str | None = None
    rules: RulesMap = {}
    force: bool = False  # needed when the rules would expire every live frame


class Rules(Msg, frozen=True):
    """The retention rules in force at ``as_of`` (v2)."""

    id: int = 0
    capsule: str | None = None
    as_of: AsOf = None


class Reload(Msg, frozen=True):
    """Re-read the daemon's configuration file and apply what changed (as SIGHUP does);
    feature ``reload``, added within version 2."""

    id: int = 0


class Session(Msg, frozen=True):
    """Start or stop recording an agent session on a capsule: while it records, the finds
    and puts of every connection are kept as ``memvidd.session`` frames, to replay later
    (memvidd/sessions.py); feature ``session``, added within version 2."""

    id: int = 0
    capsule: str | None = None
    name: str = ""
    action: Literal["start", "stop"] = "start"


Request = (Hello | Put | PutMany | Find | Get | Timeline | Remove | Stats | Tail | Capsules | Flush | Verify
           | Compact | Rewind | SetRules | Rules | Reload | Session)

# -- replies ---------------------------------------------------------------------------


class Record(msgspec.Struct, frozen=True, kw_only=True):
    """A part of a reply with a fixed shape. It still reads like the map it was before it
    was typed (``stats["frames"]``, ``report.get("busy")``), so code written against the
    map keeps working; a field left unset (not on the wire) reads as a missing key."""

    def __getitem__(self, key: str) -> Any:
        if key not in self.__struct_fields__ or (value := getattr(self, key)) is msgspec.UNSET:
            raise KeyError(key)
        return value

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def __contains__(self, key: str) -> bool:
        return self.get(key, msgspec.UNSET) is not msgspec.UNSET


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


class HitOut(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A search result on the wire: the engine's ``Hit``, field for field, then what the
    daemon adds (within version 2; absent for other hits): where a chunk of a watched file
    sits in it and the file's freshness, where a document's chunk is in the document."""

    frame_id: int
    uri: str | None
    title: str | None
    score: float
    snippet: str
    highlights: list[tuple[int, int]]  # character spans in ``snippet``
    tags: dict[str, str]
    kind: str | None
    timestamp: float
    commit_seq: int
    commit_time: float | None = None  # when that commit was made: when it was indexed (None: an older server)
    valid_until: int | None
    sources: list[str]  # which ranked lists it came from: "lex", "vec"
    # Where a chunk of a watched file is (added within version 2; absent for other hits):
    # the file's path, the chunk's lines in it (first, last; 1-based) when known, the file's
    # mtime as indexed, and whether the file on disk differs from it now (changed or gone
    # since: the watcher has not caught up).
    path: str | None = None
    lines: tuple[int, int] | None = None
    mtime: float | msgspec.UnsetType = msgspec.UNSET
    stale: bool | msgspec.UnsetType = msgspec.UNSET
    # Where a document's chunk is (added within version 2; absent for other hits), read
    # from its tags (``documents.py`` puts them there):
    page: int | msgspec.UnsetType = msgspec.UNSET  # a PDF's page (1-based)
    slide: int | msgspec.UnsetType = msgspec.UNSET  # a PPTX's slide (1-based)
    sheet: str | msgspec.UnsetType = msgspec.UNSET  # an XLSX's sheet...
    rows: tuple[int, int] | msgspec.UnsetType = msgspec.UNSET  # ...the chunk's rows, first and last

    @classmethod
    def of(cls, hit: Any, place: dict[str, Any] | None = None) -> HitOut:
        """The wire hit of the engine's ``Hit`` (or of anything with its fields), with its
        ``place`` when it is a chunk of a watched file (``manifest.places``: path, lines,
        mtime, stale) and its location when it is a document's chunk (its frame's tags):
        the one place where a hit changes shape, for the daemon and ``memvidd find
        --capsule``. A document's chunk has no ``lines``: those would count the lines of
        the text extracted from its page, slide or sheet, not of the file."""
        out = msgspec.convert(hit, cls, from_attributes=True)
        where = _where(out.tags)
        if where and place:
            place = {k: v for k, v in place.items() if k != "lines"}
        added = {**(place or {}), **where}
        return msgspec.structs.replace(out, **added) if added else out

    def location(self) -> str:
        """Where the hit is in its document, for people: "p.3", "slide 2", "Q1 rows 2-41", or ""."""
        if isinstance(self.page, int):
            return f"p.{self.page}"
        if isinstance(self.slide, int):
            return f"slide {self.slide}"
        if isinstance(self.sheet, str):
            return f"{self.sheet} rows {self.rows[0]}-{self.rows[1]}" if isinstance(self.rows, tuple) else self.sheet
        return ""


def _where(tags: dict[str, str]) -> dict[str, Any]:
    """The location fields of a hit whose frame's tags hold them (a tag that does not read
    as one, which a put may have set to anything, is left a tag)."""
    out: dict[str, Any] = {}
    for key in ("page", "slide"):
        if tags.get(key, "").isdecimal():
            out[key] = int(tags[key])
    if "sheet" in tags:
        out["sheet"] = tags["sheet"]
        first, sep, last = tags.get("rows", "").partition("-")
        if sep and first.isdecimal() and last.isdecimal():
            out["rows"] = (int(first), int(last))
    return out


class CapsuleInfo(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    path: str
    default: bool
    frames: int
    commit_seq: int


class HelloReply(Msg, frozen=True):
    id: int = 0
    version: int = PROTOCOL_VERSION
    server: str = ""
    features: list[str] = []
    capsules: list[str] = []
    default_capsule: str = ""
    max_frame: int = DEFAULT_MAX_FRAME
    max_put: int = 0  # bytes of one payload (limits.max-put-bytes); 0: not announced (older servers)


class PutReply(Msg, frozen=True):
    id: int = 0
    frame_ids: list[int] = []
    seq: int = 0  # the commit that made them durable


class FindReply(Msg, frozen=True):
    id: int = 0
    hits: list[HitOut] = []
    mode: Mode = "auto"  # the mode used: "auto" resolves to "hybrid" or "lex"
    seq: int = 0
    warnings: list[str] = []
    cached: bool = False
    # vec and hybrid: the share of the text frames that had a vector when it searched
    # (1.0: all; below, a warning says the semantic part was partial). Added within version 2.
    coverage: float | None = None


class GetReply(Msg, frozen=True):
    id: int = 0
    frame: FrameOut | None = None


class TimelineReply(Msg, frozen=True):
    id: int = 0
    entries: list[FrameOut] = []
    expired: int = 0  # frames of the range that retention hid (v2)


class RemoveReply(Msg, frozen=True):
    id: int = 0
    frame_id: int = 0
    seq: int = 0


class DaemonStats(Record, frozen=True):
    """The daemon's own counters in ``stats``: connections and requests, the buffer budget,
    the maintenance runs of the capsule asked about."""

    connections: int = 0  # open on the agent socket
    requests: int = 0
    refused: int = 0  # connections turned away at the agent socket
    commits: int = 0
    acked_puts: int = 0
    event_connections: int = 0
    event_refused: int = 0
    buffers: dict[str, int] = {}  # bytes (held now), peak, limit, refused
    upgrades: dict[str, int] = {}  # codec upgrade runs: runs, moved, saved, busy
    compactions: dict[str, int] = {}  # runs, automatic, reclaimed, failures


class CapsuleStats(Record, frozen=True):
    """``stats``: the top level of the engine's ``Capsule.stats()`` (its sections, which grow
    with the engine, as maps), plus the daemon's counters and, when the capsule has a
    watcher, the indexer's. A key the engine adds needs a field here (a test checks).
    ``ready`` and ``ready_in_s`` sum it up (``readiness.py``; added within version 2)."""

    # Scanned, nothing queued, being indexed or staged, and every text frame with its vector.
    ready: bool | msgspec.UnsetType = msgspec.UNSET
    ready_in_s: float | None | msgspec.UnsetType = msgspec.UNSET  # estimated; None: cannot be told yet
    path: str = ""
    capsule_id: str = ""
    format: dict[str, int] = {}  # read_version, write_version
    readonly: bool = False
    commit_seq: int = 0
    frames: int = 0
    live_frames: int = 0
    tombstones: int = 0
    superseded_frames: int = 0
    uris: int = 0
    live_uris: int = 0
    pending_frames: int = 0
    file_bytes: int = 0
    bytes_by_kind: dict[str, int] = {}
    payload_raw_bytes: int = 0
    codecs: dict[str, dict[str, Any]] = {}
    origin: dict[str, Any] | None = None  # a branch's: the capsule and commit it was made from
    retention: dict[str, Any] = {}
    rewinds: list[dict[str, Any]] = []
    upgrades: dict[str, int] = {}
    checkpoints: int = 0
    checkpoint_failures: int = 0
    segments: int = 0
    wal_bytes: int = 0
    wal_frames: int = 0
    vectors: dict[str, Any] | None = None  # None: lexical only
    search: dict[str, Any] | None = None
    block_cache: dict[str, Any] = {}
    daemon: DaemonStats | msgspec.UnsetType = msgspec.UNSET  # always set by the daemon
    indexer: dict[str, Any] | msgspec.UnsetType = msgspec.UNSET  # only for a capsule that watches files


class StatsReply(Msg, frozen=True):
    id: int = 0
    stats: CapsuleStats = CapsuleStats()


class CapsulesReply(Msg, frozen=True):
    id: int = 0
    capsules: list[CapsuleInfo] = []


class FlushReply(Msg, frozen=True):
    id: int = 0
    seq: int = 0


class VerifyReport(Record, frozen=True):
    """What ``verify`` found: the engine's ``Report``, field for field."""

    path: str = ""
    ok: bool = True
    errors: list[str] = []  # the first 50; ``error_count`` is exact
    warnings: list[str] = []
    repairs: list[str] = []
    error_count: int = 0
    facts: dict[str, int] = {}  # commits, frames, payloads_checked, ...


class VerifyReply(Msg, frozen=True):
    id: int = 0
    ok: bool = True
    report: VerifyReport = VerifyReport()


class CompactReport(Record, frozen=True, omit_defaults=True):
    """What a compaction or (``codecs_only``) a codec upgrade did; the fields of the other
    kind of run are left out (None)."""

    bytes_before: int  # file bytes
    bytes_after: int
    frames: int | None = None  # copied (compaction) or considered (upgrade)
    # a compaction
    checkpoint_bytes: int | None = None  # of bytes_after: the checkpoint written at the end
    commits: int | None = None
    blocks_copied: int | None = None
    blocks_encoded: int | None = None
    purged: int | None = None  # expired payloads dropped
    # a codec upgrade
    moved: int | None = None  # frames re-encoded
    blocks: int | None = None
    saved: int | None = None  # bytes the next compaction reclaims
    busy: bool | None = None  # stopped to let puts in
    remaining: int | None = None


class CompactReply(Msg, frozen=True):
    id: int = 0
    report: CompactReport = CompactReport(bytes_before=0, bytes_after=0)


class RewindReply(Msg, frozen=True):
    id: int = 0
    seq: int = 0  # the commit that recorded the rewind


class RulesReply(Msg, frozen=True):
    id: int = 0
    rules: RulesMap = {}
    seq: int = 0  # set_rules: the commit that recorded them; rules: the head when read


class ReloadReply(Msg, frozen=True):
    """What a reload did, one line a person reads for each change."""

    id: int = 0
    source: str = ""  # the configuration file read ("<default config.toml>": the embedded one)
    applied: list[str] = []  # changes in force now
    pending: list[str] = []  # changes read but applied only by a restart (the sockets, the model, ...)
    errors: list[str] = []  # changes that failed (e.g. a capsule that cannot be opened)


class SessionReply(Msg, frozen=True):
    id: int = 0
    name: str = ""
    events: int = 0  # stop: the finds and puts the session recorded
    active: list[str] = []  # the sessions recording on this capsule now


class TailEvent(Msg, frozen=True):
    id: int = 0  # the id of the Tail request
    frame: FrameOut | None = None


class TailEnd(Msg, frozen=True, kw_only=True):
    id: int = 0
    reason: ErrorCode  # slow_consumer


class Error(Msg, frozen=True):
    id: int = 0
    code: ErrorCode = "internal"
    message: str = ""
    retryable: bool = False


Reply = (HelloReply | PutReply | FindReply | GetReply | TimelineReply | RemoveReply | StatsReply
         | CapsulesReply | FlushReply | VerifyReply | CompactReply | RewindReply | RulesReply | ReloadReply
         | SessionReply | TailEvent | TailEnd | Error)

# Error codes (docs/protocol.md lists when each is sent).
BAD_FRAME: Final = "bad_frame"  # undecodable body, unknown op, wrong field types
FRAME_TOO_LARGE: Final = "frame_too_large"  # a message over max_frame
BAD_REQUEST: Final = "bad_request"  # well-formed but invalid arguments
NOT_FOUND: Final = "not_found"
NO_SUCH_CAPSULE: Final = "no_such_capsule"
VERSION: Final = "version_mismatch"  # hello with a version outside MIN_PROTOCOL_VERSION..PROTOCOL_VERSION
UNAVAILABLE: Final = "unavailable"  # shutting down, capsule locked: retry later
STORAGE: Final = "storage"  # disk full, I/O error
CORRUPT: Final = "corrupt"
SLOW_CONSUMER: Final = "slow_consumer"
INTERNAL: Final = "internal"

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
                return (f"tag {key[:40]!r} exceeds the limits of {MAX_NAME} bytes (key) "
                        f"and {MAX_TAG_VALUE} (value)")
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
        case Find() if req.mode not in MODES:
            return f"mode {req.mode[:40]!r} is not one of {', '.join(MODES)}"
        case Find() if req.snippet_chars > MAX_SNIPPET_CHARS:
            return f"snippet_chars {req.snippet_chars} exceeds the limit of {MAX_SNIPPET_CHARS}"
        case Find() if req.min_seq is not None and req.min_seq < 0:
            return f"min_seq {req.min_seq} is negative (a commit sequence: a put's seq)"
        case Find() if not 0 < req.wait_s <= MAX_WAIT_S:
            return f"wait_s {req.wait_s:g} is not within 0 < wait_s <= {MAX_WAIT_S:g}"
        case Session() if not req.name or _size(req.name) > MAX_NAME or "/" in req.name:
            return f"a session name is 1 to {MAX_NAME} bytes without '/'"
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
