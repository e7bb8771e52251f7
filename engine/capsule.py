"""The capsule: one open ``.mv2`` file, its writer protocol and its read API.

Write path [F-05]: ``put`` compresses the payload and appends its BLOCK record past the
committed end (no fsync); ``commit`` appends one COMMIT record naming the new frames and
blocks, then fsyncs once. The commit is durable, and visible, when that fsync returns:
many puts share one fsync (group commit) and the cost does not depend on the file's size.

Checkpoints [F-11] fold the tail into SEGMENT records (slices of the frame table) and a
CHECKPOINT record, then point the spare header slot at it, so opening reads a few
segments instead of the whole log. Segments merge in tiers of four, so every frame's
metadata is rewritten O(log N) times and a checkpoint costs O(frames since the last one),
amortised.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from . import codecs, crypto, retention, upgrade
from . import format as fmt
from .cache import LRUCache
from .compact import Rewriter, unnamed
from .embed import DEFAULT_MODEL, MODELS, Embedder, cache_root
from .errors import (
    Cancelled,
    CapsuleBroken,
    CapsuleClosed,
    CapsuleExists,
    CorruptionError,
    EngineError,
    InvalidArgument,
    NotFound,
    ReadOnlyError,
    StorageError,
)
from .fileio import CapsuleFile, OsFile, fsync_dir, link_unnamed
from .genesis import genesis, genesis_extra, new_header, unlock, vec_binding
from .lexical import SCHEMA_VERSION as LEX_SCHEMA
from .lexical import Filters
from .log import Replay, read_record, replay
from .metadata import (
    check_sizes,
    opt_str,
    tags_of,
    to_epoch,
)
from .reading import Dictionaries, View, Views, load_checkpoint, read_header, read_payload
from .search import MAX_K, MODES, Hit, Hits, Indexes, fingerprint, ram_root, rrf
from .table import FOREVER, FrameTable
from .vectors import as_vector, pack_vectors, unpack_vectors

MAX_PAYLOAD = 256 << 20
MUTABLE_LEX_FILES = {"meta.json", ".managed.json"}  # Tantivy rewrites these in place
LEX_COPY_MIN_FRAMES = 2048  # copy the lexical index into the capsule after this much growth
SMALL_VECTOR_RECORD = 64  # VECTORS records with fewer vectors are folded at checkpoints
REWARM_QUERIES = 8
REWARM_QUIET_S = 0.05  # re-warm caches once no commit came for this long
FANOUT = 4  # segments of one size tier merged together
# Segments are never merged past this many frames: a merge holds its frames in memory,
# so a bigger one would make a checkpoint's peak memory grow with the capsule.
MAX_SEGMENT_FRAMES = 16384
SPOOL_BYTES = 1 << 20  # a checkpoint writes its records out in pieces of about this size


class FrameInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A frame's metadata, as returned by ``timeline``."""

    id: int
    uri: str | None
    title: str | None
    kind: str | None
    tags: dict[str, str]
    timestamp: float
    commit_seq: int
    commit_time: float
    valid_until: int | None  # seq of the commit that superseded/removed it, if any
    superseded_by: int | None  # frame id of the newer version or tombstone
    supersedes: int | None
    parent: str | None
    chunk: int | None
    length: int
    is_text: bool


class Frame(FrameInfo, frozen=True, kw_only=True):
    """A frame with its payload, as returned by ``get``."""

    payload: bytes

    @property
    def text(self) -> str:
        return self.payload.decode("utf-8", errors="replace")


class Timeline(list[FrameInfo]):
    """A timeline page (a list of ``FrameInfo``) that also says how many frames in its
    range retention rules hid [F-24]."""

    expired = 0


class Options(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    level: int = codecs.DEFAULT_LEVEL  # zstd level for fresh blocks
    checkpoint_bytes: int = 8 << 20  # checkpoint when the tail grows past this
    checkpoint_frames: int = 4096  # ... or holds this many frames
    close_checkpoint_frames: int = 256  # close() checkpoints only a tail at least this big
    index_dir: str | None = None  # where index working copies live (default: the user cache)
    result_cache_bytes: int = 16 << 20
    block_cache_bytes: int = 32 << 20
    embed_batch: int = 32  # frames per background embedding step


def _options(kw: Mapping[str, Any]) -> Options:
    try:
        return msgspec.convert(dict(kw), Options)
    except msgspec.ValidationError as e:
        raise InvalidArgument(f"bad capsule option: {e}") from None


def create(
    path: str | os.PathLike[str],
    *,
    model: str | None = DEFAULT_MODEL,
    embedder: Embedder | None = None,
    passphrase: str | bytes | None = None,
    kdf: crypto.KdfParams | None = None,
    file_factory: Any = None,
    **options: Any,
) -> Capsule:
    """Make a new, empty capsule at ``path``; ``CapsuleExists`` if anything is there.

    ``model`` binds the capsule to an embedding model (``None``: lexical search only);
    ``embedder`` is a loaded ``Embedder`` for that model, used to embed new text in the
    background and queries at search time. ``passphrase`` makes an encrypted capsule
    (``.mv2e`` by convention [F-19]); ``kdf`` overrides its Argon2id costs.
    """
    path = os.fspath(path)
    opts = _options(options)
    if model is not None and model not in MODELS:
        raise InvalidArgument(f"unknown model {model!r}; known: {sorted(MODELS)}")
    header, sealer, ckpt_raw = new_header(uuid.uuid4().bytes, {"vec": vec_binding(model)} if model else {},
                                          passphrase, kdf)
    slot = fmt.encode_header(header)
    initial = slot + slot + ckpt_raw  # both slots valid from the start [F-02]
    f = (file_factory or OsFile.create)(path, initial)
    f.sealer = sealer
    return Capsule(f, header, readonly=False, opts=opts, embedder=embedder)


def open(  # noqa: A001 - the public name the API promises
    path: str | os.PathLike[str],
    readonly: bool = False,
    *,
    embedder: Embedder | None = None,
    passphrase: str | bytes | None = None,
    file_factory: Any = None,
    **options: Any,
) -> Capsule:
    """Open an existing capsule. Writers lock it; readonly opens share it with a writer.
    Encrypted capsules need their ``passphrase``."""
    path = os.fspath(path)
    opts = _options(options)
    if not os.path.exists(path):
        raise NotFound(f"no capsule at {path}")
    f: CapsuleFile = (file_factory or OsFile.open)(path, readonly=readonly)
    try:
        if not readonly:
            f.lock()  # type: ignore[attr-defined]
        header = read_header(f)
        fmt.check_versions(header, readonly=readonly)
        unlock(f, header, passphrase)
        return Capsule(f, header, readonly=readonly, opts=opts, embedder=embedder)
    except BaseException:
        f.close()
        raise


class Capsule:
    """An open capsule. Thread-safe: one writer at a time inside, reads in parallel."""

    def __init__(
        self, f: CapsuleFile, header: fmt.Header, *, readonly: bool, opts: Options,
        embedder: Embedder | None = None,
    ) -> None:
        self._file = f
        self._header = header
        self.path = f.path
        # Compaction writes the file the path named at open: through a symlink, its
        # target, which must stay a symlink's target, not be replaced by a copy.
        self._real_path = os.path.realpath(f.path)
        self.readonly = readonly
        self._opts = opts
        self._lock = threading.RLock()
        self._closed = False
        self._broken: str | None = None
        self.capsule_id = header.capsule_id
        self.encrypted = bool(header.flags & fmt.HEADER_ENCRYPTED)
        self._pending: list[fmt.FrameMeta] = []
        self._pending_blocks: list[fmt.BlockRef] = []
        self._pending_live: dict[str, int | None] = {}  # uri -> pending live id (None: removed)
        self._pending_ended: set[int] = set()
        self._pending_counts: dict[str, int] = {}  # codec tallies of staged blocks
        self._checkpoint_failures = 0
        self._pending_texts: dict[int, str] = {}  # staged text, for the lexical index
        self._ready_vectors: dict[int, np.ndarray] = {}  # vectors not yet written
        self._vec_refs: list[list[int]] = []  # [offset, count] of every VECTORS record
        self._ckpt_vec_refs = 0  # how many of those the last checkpoint listed
        self._has_vec = bytearray()  # per frame id: 1 if it has a vector
        self._embedder = embedder
        self._indexes: Indexes | None = None
        self._blocks = LRUCache(opts.block_cache_bytes, size=len)
        self._bg: ThreadPoolExecutor | None = None  # prefetch and cache re-warming
        self._embed_thread: threading.Thread | None = None
        self._embed_wake = threading.Event()
        self._embed_queue: deque[int] = deque()
        self._embed_stats = {"embedded": 0, "seconds": 0.0, "errors": 0}
        self._embed_error: str | None = None
        self._vector_sink: Callable[[], None] | None = None  # see hand_vectors_to
        self._embedding_inflight = 0
        self._rewarm_pending = False
        self._upgrade_lock = threading.Lock()  # one codec upgrade (or compaction) at a time
        self._rewind_to: int | None = None  # set while a rewind's commit is written
        self._new_rules: dict[str, Any] | None = None  # set while a rule change is written
        self._expiry = retention.Expiry()
        self.clock = time.time  # what "now" is for expiry (tests move it)
        self._views = Views()  # what readers pin; compaction's switch replaces the current one
        self._table: FrameTable  # set by _load (and by each compaction's switch)
        try:
            self._load()
            if embedder is not None:
                self._embedder = None
                self.attach_embedder(embedder)
        except BaseException:
            if self._views.current is not None:
                self._views.current.table.close()  # its spill file; the caller closes the capsule file
            raise

    @property
    def model(self) -> str | None:
        """The embedding model this capsule is bound to (None: lexical search only)."""
        return self._vec["model"] if self._vec is not None else None

    def attach_embedder(self, embedder: Embedder) -> None:
        """Embed with ``embedder`` from now on: queries, and (writers) every text frame
        without a vector yet, in the background. Lets a caller learn ``model`` first
        without opening the capsule twice."""
        with self._lock:
            self._check_open()
            if self._embedder is not None:
                raise InvalidArgument("this capsule has an embedder already")
            if self._vec is not None and embedder.dim != self._vec["dim"]:
                raise InvalidArgument(f"embedder gives {embedder.dim} dims, capsule wants {self._vec['dim']}")
            self._embedder = embedder
            if self._vec is not None and not self.readonly:
                self._queue_unembedded(0)

    # -- the reader's view [F-17] ------------------------------------------------------

    @contextlib.contextmanager
    def _reading(self) -> Iterator[View]:
        """Pin the current view for a read that does not hold the capsule lock."""
        with self._lock:
            view = self._views.pin()
        try:
            yield view
        finally:
            self._views.unpin(view)

    def _spill_dir(self) -> str | None:
        """Where the frame table keeps frame metadata: the index directory (disk); for an
        encrypted capsule, RAM-backed storage or nowhere (memory) [F-19]."""
        if self.encrypted:
            ram = ram_root()
            return None if ram == cache_root() else str(ram / "frames")
        return str((Path(self._opts.index_dir) if self._opts.index_dir else cache_root()) / "frames")

    def _load(self) -> None:
        ckpt, table = load_checkpoint(self._file, self._header, self._spill_dir())
        self._table = table
        self._dicts = Dictionaries(self._file, table)
        # Fresh small puts use the newest dictionary [F-16]
        self._fresh_dict = (max(table.dicts), self._dicts(max(table.dicts))) if table.dicts else None
        self._views.replace(View(table, self._file, self._blocks, self._dicts))
        self._ckpt = ckpt
        self._ckpt_end = self._header.checkpoint_offset + self._header.checkpoint_length
        self._counters: dict[str, int] = dict(ckpt.counters)
        self._vec: dict[str, Any] | None = ckpt.extra.get("vec")
        if self._vec is not None:
            self._vec_refs = [list(r) for r in self._vec.get("records", [])]
            self._ckpt_vec_refs = len(self._vec_refs)
            self._has_vec = bytearray(self._vec.get("bitmap", b""))
        self._log_end = self._ckpt_end
        self._last_commit = ckpt.last_commit
        self._tail_frames = 0
        self._torn_bytes = 0
        self._expiry.reset(table, self._current_rules(), self.clock())
        self._expiry_rules_seq = table.rule_changes[-1][0] if table.rule_changes else 0
        self._catch_up()
        if not self.readonly and self._torn_bytes:
            # A torn tail is what a crash leaves; cut it so new records never sit before
            # stale bytes that a later scan could misread [F-06].
            self._file.truncate(self._log_end)
            self._file.sync()
            self._torn_bytes = 0
        self._write_end = self._log_end
        h = self._header
        if not self.readonly and (h.read_version, h.write_version) < (fmt.READ_VERSION, fmt.WRITE_VERSION):
            # This writer adds records an older reader would misread: say so first [F-03].
            self._write_header(h.next(read_version=fmt.READ_VERSION, write_version=fmt.WRITE_VERSION))

    def _catch_up(self) -> int:
        """Apply commits that follow ``_log_end``; returns how many there were."""
        size = self._file.size()
        commits = 0

        def apply(rec: fmt.CommitRecord, offset: int) -> None:
            self._table.apply(rec, offset)
            self._count_commit(rec)
            self._tail_frames += len(rec.frames)
            if self._indexes is not None:  # a reader refreshing after opening its indexes
                self._indexes.on_commit(self._table, rec.frames, {}, self._text_of)

        def relocate(rec: fmt.RelocateRecord, offset: int) -> None:
            self._table.relocate(rec, offset)
            self._add_counters(rec.counters)

        for attempt in range(3):
            try:
                r = replay(self._file, self._log_end, size, self._table.seq, self._last_commit,
                           self._table.upgraded_upto, apply, relocate)
                return commits + self._replayed(r)
            except CorruptionError as e:
                # What was applied before the damage is applied: take it in, so a look
                # again starts after it.
                if (done := getattr(e, "replayed", None)) is not None:
                    commits += self._replayed(done)
                # A reader can catch a writer mid-append and see later bytes before
                # earlier ones; look again before calling it corruption.
                if not self.readonly or attempt == 2:
                    raise
                size = self._file.size()
        raise AssertionError("unreachable")

    def _replayed(self, r: Replay) -> int:
        """Take in what ``replay`` applied: counters, vectors, where the log ends."""
        self._add_counters({f"bytes.{kind}": n for kind, n in r.record_bytes.items()})
        self._has_vec.extend(bytes(self._table.next_id - len(self._has_vec)))
        for offset in r.vectors:  # vectors committed after the checkpoint
            ids, vectors = self._read_vectors(offset)
            self._vec_refs.append([offset, len(ids)])
            for fid in ids:
                self._has_vec[fid] = 1
            if self._indexes is not None:
                self._indexes.add_vectors(ids, vectors)
        self._log_end = r.end
        self._last_commit = r.last_commit
        self._torn_bytes = r.torn_bytes
        if r.commits:
            self._track_expiry(self._table.frames[self._expiry._seen :])
        return r.commits

    # -- retention [F-24] ---------------------------------------------------------------

    def _current_rules(self) -> retention.Rules:
        t = self._table
        return retention.parse(t.rule_changes[-1][1]) if t.rule_changes else retention.Rules()

    def _track_expiry(self, frames: list[fmt.FrameMeta]) -> None:
        """Keep the expired set current after commits (a rule change starts it over)."""
        t = self._table
        last_change = t.rule_changes[-1][0] if t.rule_changes else 0
        if last_change != self._expiry_rules_seq:
            self._expiry_rules_seq = last_change
            fresh = self._expiry.reset(t, self._current_rules(), self.clock())
        else:
            fresh = self._expiry.add(t, frames, self.clock())
        self._forget(fresh)

    def _expire_due(self) -> None:
        """Expire what has come due by now (lock held): a heap peek when nothing is."""
        self._forget(self._expiry.due(self._table, self.clock()))

    def _forget(self, ids: list[int]) -> None:
        if ids and self._indexes is not None:
            self._indexes.forget(ids)

    def _expired(self, fid: int) -> bool:
        return fid in self._expiry.expired

    def set_rules(self, rules: Mapping[str, Any] | retention.Rules, *, force: bool = False) -> int:
        """Replace the capsule's retention rules (see ``engine/retention.py``), recorded as a
        commit; returns its seq. Rules that would expire every live frame need ``force``."""
        parsed = retention.parse(rules)
        with self._lock:
            self._check_writable()
            if self._pending:
                raise InvalidArgument("commit or roll back staged frames before changing rules")
            t = self._table
            trial = retention.Expiry()
            trial.reset(t, parsed, self.clock())
            live = set(t.timeline(t.seq, None, None, False))
            if live and live <= trial.expired and not force:
                raise InvalidArgument(f"these rules would expire all {len(live)} live frames; pass force=True "
                                      "if that is what you want")
            self._new_rules = retention.to_builtins(parsed)
            try:
                return self._commit()
            finally:
                self._new_rules = None

    def rules(self, *, as_of: Any = None) -> dict[str, Any]:
        """The retention rules in force at ``as_of`` (default: now)."""
        with self._lock:
            self._check_open()
            seq = self._resolve_as_of(as_of)
            current = [r for s, r in self._table.rule_changes if s <= seq]
            return retention.to_builtins(retention.parse(current[-1])) if current else {}

    def _count_commit(self, rec: fmt.CommitRecord) -> None:
        c = self._counters
        c["frames.put"] = c.get("frames.put", 0) + sum(f.op == fmt.PUT for f in rec.frames)
        c["frames.tombstone"] = c.get("frames.tombstone", 0) + sum(f.op == fmt.TOMBSTONE for f in rec.frames)
        c["payload.raw"] = c.get("payload.raw", 0) + sum(f.length for f in rec.frames)

    def _add_counters(self, extra: Mapping[str, int]) -> None:
        for k, v in extra.items():
            self._counters[k] = self._counters.get(k, 0) + v

    def refresh(self) -> int:
        """Readonly opens: pick up commits made since opening. Returns how many."""
        with self._lock:
            self._check_open()
            return self._catch_up()

    # -- writing ----------------------------------------------------------------------

    def put(
        self,
        data: str | bytes | bytearray | memoryview,
        *,
        uri: str | None = None,
        title: str | None = None,
        tags: Mapping[str, str] | None = None,
        kind: str | None = None,
        timestamp: float | _dt.datetime | None = None,
        parent: str | None = None,
        chunk: int | None = None,
        vector: Any = None,
        expires: float | _dt.datetime | _dt.timedelta | None = None,
    ) -> int:
        """Stage a frame; returns its id. Durable and visible after the next ``commit``.

        A ``uri`` that already has a live frame gets a new version that supersedes it.
        ``vector`` is the frame's embedding when the caller computed it already; text
        without one is embedded in the background when the capsule has an embedder.
        ``expires`` (a time, or a ``timedelta`` from now) is when the frame leaves every
        query for good [F-24].
        """
        if isinstance(data, str):
            try:  # surrogateescape: the undecodable bytes of os.fsdecode'd text round-trip
                payload, is_text = data.encode("utf-8", errors="surrogateescape"), True
            except UnicodeEncodeError as e:
                raise InvalidArgument(f"text is not valid Unicode (character {e.start})") from None
        elif isinstance(data, (bytes, bytearray, memoryview)):
            payload, is_text = bytes(data), False
        else:
            raise InvalidArgument(f"payload must be str or bytes, not {type(data).__name__}")
        if len(payload) > MAX_PAYLOAD:
            raise InvalidArgument(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
        uri = opt_str("uri", uri)
        if uri == "":
            raise InvalidArgument("uri must not be empty")
        if chunk is not None and (not isinstance(chunk, int) or chunk < 0):
            raise InvalidArgument("chunk must be a non-negative int")
        meta_args: dict[str, Any] = dict(
            uri=uri, title=opt_str("title", title), kind=opt_str("kind", kind),
            tags=tags_of(tags), timestamp=to_epoch(timestamp), parent=opt_str("parent", parent),
            expires=None if expires is None else (
                time.time() + expires.total_seconds() if isinstance(expires, _dt.timedelta) else to_epoch(expires)),
        )
        check_sizes(meta_args)
        vec = None
        if vector is not None:
            if self._vec is None:
                raise InvalidArgument("this capsule stores no vectors (created with model=None)")
            try:
                vec = as_vector(vector, self._vec["dim"])
            except ValueError as e:
                raise InvalidArgument(str(e)) from None
        fresh_dict = self._fresh_dict if len(payload) <= upgrade.FRESH_DICT_MAX else None
        codec, packed = codecs.encode(payload, self._opts.level, fresh_dict[1] if fresh_dict else None)
        dict_id = fresh_dict[0] if codec == codecs.ZSTD_DICT else 0  # type: ignore[index]
        body = fmt.BLOCK_HEADER.pack(codec, 0, 0, dict_id, len(payload)) + packed
        digest = hashlib.blake2b(payload, digest_size=16).digest()
        with self._lock:
            self._check_writable()
            offset = self._write_end
            record = self._record(fmt.BLOCK, body, offset)
            # No fsync: an uncommitted block is garbage until a COMMIT names it.
            self._file.pwrite(offset, record)
            self._write_end += len(record)
            fid = self._table.next_id + len(self._pending)
            meta = fmt.FrameMeta(
                id=fid, seq=0, op=fmt.PUT, supersedes=self._live_id(uri) if uri else None,
                block=offset, start=0, length=len(payload), digest=digest, is_text=is_text,
                chunk=chunk, **meta_args,
            )
            self._pending.append(meta)
            self._pending_blocks.append(fmt.BlockRef(offset, fmt.decode_record_header(record).body_crc))  # type: ignore[union-attr]
            self._count_block(codec, len(payload), len(packed))
            if uri is not None:
                self._pending_live[uri] = fid
            if meta.supersedes is not None:
                self._pending_ended.add(meta.supersedes)
            if is_text:
                self._pending_texts[fid] = data  # type: ignore[assignment]
            if vec is not None:
                self._ready_vectors[fid] = vec
            return fid

    def _count_block(self, codec: int, raw: int, stored: int) -> None:
        name = codecs.NAMES[codec]
        for k, v in ((f"codec.{name}.blocks", 1), (f"codec.{name}.raw", raw), (f"codec.{name}.stored", stored)):
            self._pending_counts[k] = self._pending_counts.get(k, 0) + v

    def put_many(self, items: Iterable[Mapping[str, Any]]) -> list[int]:
        """``put`` each item (a dict with ``text`` or ``data`` plus put's keywords).

        All or nothing: if one item is refused, none of this call's items stay staged.
        """
        with self.atomic():
            ids = []
            for item in items:
                item = dict(item)
                if "text" in item:
                    data = item.pop("text")
                elif "data" in item:
                    data = item.pop("data")
                else:
                    raise InvalidArgument("each item needs a 'text' or 'data' key")
                try:
                    ids.append(self.put(data, **item))
                except TypeError as e:  # an unknown key in the item
                    raise InvalidArgument(f"bad item: {e}") from None
            return ids

    @contextlib.contextmanager
    def atomic(self) -> Iterator[None]:
        """Stage several puts and removes as one: if the block raises, none stays staged."""
        with self._lock:
            self._check_writable()
            keep, counts = len(self._pending), dict(self._pending_counts)
            try:
                yield
            except BaseException:
                self._unstage(keep)
                self._pending_counts = counts
                raise

    def _unstage(self, keep: int) -> None:
        """Drop the staged frames after the first ``keep`` (and their block bytes)."""
        dropped = self._pending[keep:]
        if not dropped:
            return
        blocks = [m.block for m in dropped if m.block >= self._log_end]  # not committed blocks (rewind)
        if blocks:
            self._write_end = min(blocks)  # blocks are appended in order: cut from the first
            self._pending_blocks = [b for b in self._pending_blocks if b.offset < self._write_end]
            self._cut_tail(self._write_end)
        self._pending = self._pending[:keep]
        for m in dropped:
            self._pending_texts.pop(m.id, None)
            self._ready_vectors.pop(m.id, None)
        # Rebuild the staged overlays from what remains.
        self._pending_live.clear()
        self._pending_ended.clear()
        for m in self._pending:
            if m.uri is not None:
                self._pending_live[m.uri] = m.id if m.op == fmt.PUT else None
            if m.supersedes is not None:
                self._pending_ended.add(m.supersedes)

    def remove(self, target: str | int) -> int:
        """Stage a tombstone for a live frame (by id) or a URI's live version.

        History keeps the old versions; as-of views before the removal still show them.
        Returns the tombstone's frame id.
        """
        with self._lock:
            self._check_writable()
            if isinstance(target, bool) or not isinstance(target, (int, str)):
                raise InvalidArgument("remove() takes a frame id or a URI")
            if isinstance(target, str):
                old = self._live_id(target)
                if old is None:
                    raise NotFound(f"no live frame at {target!r}")
            else:
                old = target
                if not self._is_live(old):
                    raise NotFound(f"frame {old} is not live")
            uri = self._meta(old).uri
            fid = self._table.next_id + len(self._pending)
            self._pending.append(fmt.FrameMeta(
                id=fid, seq=0, op=fmt.TOMBSTONE, uri=uri, title=None, kind=None, tags={},
                timestamp=time.time(), supersedes=old, block=-1, start=0, length=0,
                digest=b"", is_text=False,
            ))
            self._pending_ended.add(old)
            if uri is not None:
                self._pending_live[uri] = None
            return fid

    def rewind(self, to: Any) -> int:
        """Make the state as of ``to`` (a commit seq or a time) the head again, with one
        new commit that records the rewind: frames added since are tombstoned, frames
        changed or removed since get a new version holding their content as of ``to``
        (same payload bytes, not copied). Nothing is destroyed: as-of views of the
        commits in between stay as they were. Returns the new commit's sequence."""
        with self._lock:
            self._check_writable()
            if self._pending:
                raise InvalidArgument("commit or roll back staged frames before a rewind")
            t = self._table
            target = self._resolve_as_of(to)
            then = set(t.timeline(target, None, None, False))
            now = set(t.timeline(t.seq, None, None, False))
            by_uri = {t.frames[f].uri: f for f in now if t.frames[f].uri is not None}
            restore = sorted(f for f in then - now if not self._expired(f))  # expired stays gone
            restored_uris = {t.frames[r].uri for r in restore} - {None}
            for fid in sorted(now - then):
                if t.frames[fid].uri not in restored_uris:  # else the restored version ends it
                    self.remove(fid)
            vectors = self.vectors(restore) if self._vec is not None else {}
            for fid in restore:
                old = t.frames[fid]
                new_id = t.next_id + len(self._pending)
                live = by_uri.get(old.uri) if old.uri is not None else None
                self._pending.append(msgspec.structs.replace(old, id=new_id, seq=0, supersedes=live))
                if old.uri is not None:
                    self._pending_live[old.uri] = new_id
                if live is not None:
                    self._pending_ended.add(live)
                if fid in vectors:
                    self._ready_vectors[new_id] = vectors[fid]
            self._rewind_to = target
            try:
                return self._commit()
            finally:
                self._rewind_to = None

    def commit(self) -> int:
        """Make every staged frame durable with one fsync; returns the commit sequence."""
        with self._lock:
            self._check_writable()
            return self._commit()

    def _commit(self) -> int:
        if not self._pending and not self._ready_vectors and self._rewind_to is None and self._new_rules is None:
            return self._table.seq
        seq = self._table.seq + 1
        last_time = self._table.commit_times[-1] if self._table.commits else 0.0
        for m in self._pending:
            m.seq = seq
        offset = self._write_end
        vec_raw, vec_ids, vec_rows = b"", [], None
        if self._ready_vectors:
            # Vectors ride in the commit: written before it, named by it [F-14].
            vec_ids = list(self._ready_vectors)
            vec_rows = np.stack([self._ready_vectors[i] for i in vec_ids])
            vec_raw = self._record(fmt.VECTORS, fmt.pack(fmt.VectorsRecord(vec_ids, pack_vectors(vec_rows))), offset)
        vec_refs = [fmt.BlockRef(offset, fmt.decode_record_header(vec_raw).body_crc)] if vec_raw else []  # type: ignore[union-attr]
        rec = fmt.CommitRecord(seq, max(time.time(), last_time), self._last_commit, self._pending,
                               self._pending_blocks, vec_refs, self._rewind_to, self._new_rules)
        raw = self._meta_record(fmt.COMMIT, rec, offset + len(vec_raw))
        try:
            self._file.pwrite(offset, vec_raw + raw)
            # The acknowledgement point: once this returns the commit survives a crash.
            self._file.sync()
        except StorageError:
            self._rollback()
            raise
        commit_offset = offset + len(vec_raw)
        self._table.apply(rec, commit_offset)
        self._count_commit(rec)
        self._add_counters({
            "bytes.commit": len(raw),
            "bytes.vectors": len(vec_raw),
            "bytes.block": offset - self._log_end,
            **self._pending_counts,
        })
        self._pending_counts = {}
        self._tail_frames += len(self._pending)
        self._track_expiry(self._pending)
        self._last_commit = commit_offset
        self._log_end = self._write_end = commit_offset + len(raw)
        self._has_vec.extend(bytes(self._table.next_id - len(self._has_vec)))
        if vec_raw:
            self._vec_refs.append([offset, len(vec_ids)])
            for fid in vec_ids:
                self._has_vec[fid] = 1
        frames, texts = self._pending, self._pending_texts
        self._clear_pending()
        self._ready_vectors = {}
        if self._indexes is not None:
            self._indexes.on_commit(self._table, frames, texts, self._text_of)
            if vec_rows is not None:
                self._indexes.add_vectors(vec_ids, vec_rows)
            self._rewarm()
        if self._embed_thread is not None or self._embedder is not None:
            self._queue_unembedded(frames[0].id if frames else self._table.next_id)
        if (
            self._tail_frames >= self._opts.checkpoint_frames
            or self._log_end - self._ckpt_end >= self._opts.checkpoint_bytes
        ):
            self._try_checkpoint()
        return seq

    def _try_checkpoint(self) -> None:
        """Checkpoint when the commits it covers are durable already: a checkpoint only
        speeds up opening, so its failure (a full disk) fails nothing else. It is tried
        again later (after the next commit; at the next open) and counted in stats."""
        try:
            self._checkpoint()
        except StorageError:
            self._checkpoint_failures += 1

    def rollback(self) -> None:
        """Discard every staged, uncommitted frame."""
        with self._lock:
            self._check_writable()
            self._rollback()

    def _rollback(self) -> None:
        self._clear_pending()
        self._pending_counts = {}
        self._cut_tail(self._log_end)
        self._write_end = self._log_end

    def _cut_tail(self, end: int) -> None:
        try:
            if self._file.size() > end:
                self._file.truncate(end)
                # Durably, before anything new is written: cut records that came back after
                # a crash would pass for proof that the write torn then was durable [F-07].
                self._file.sync()
        except StorageError as e:
            # Stale bytes past the end could be misread by a later scan: refuse to go on.
            self._broken = f"could not cut the tail after a failed write: {e}"

    def _clear_pending(self) -> None:
        self._pending = []
        self._pending_texts = {}
        self._pending_blocks = []
        self._pending_live.clear()
        self._pending_ended.clear()

    def checkpoint(self) -> None:
        """Fold the tail into segments now (``commit`` does this by itself when due)."""
        with self._lock:
            self._check_writable()
            if self._pending:
                raise InvalidArgument("commit or roll back staged frames before a checkpoint")
            if self._table.seq > self._ckpt.seq:
                self._checkpoint()

    def _checkpoint(self, *, lex: str = "due") -> None:
        """Fold the tail into segments and write a checkpoint. ``lex``: copy the lexical
        index when its growth makes it "due", "now", or "keep" the copy named so far."""
        t = self._table
        segments = list(self._ckpt.segments)
        # Each segment holds a run of frames and of the commits after its predecessor's.
        runs = [(s.first_id, s.count, self._last_seq(s)) for s in segments]
        runs.append((self._ckpt.next_id, t.next_id - self._ckpt.next_id, t.seq))
        keep = len(segments)
        while True:  # merge tiers (four of a tier make one; a bigger one absorbs a smaller)
            if len(runs) >= 2 and _tier(runs[-1][1]) > _tier(runs[-2][1]):
                n = 2
            elif len(runs) >= FANOUT and len({_tier(c) for _, c, _ in runs[-FANOUT:]}) == 1:
                n = FANOUT
            else:
                break
            if sum(c for _, c, _ in runs[-n:]) > MAX_SEGMENT_FRAMES:
                break
            runs[-n:] = [(runs[-n][0], sum(c for _, c, _ in runs[-n:]), runs[-1][2])]
            keep = min(keep, len(runs) - 1)
        dead = sum(s.length for s in segments[keep:])
        out = _Spool(self._file, self._log_end)
        try:
            refs = list(segments[:keep])
            for first, count, last_seq in runs[keep:]:
                first_seq = (self._last_seq(refs[-1]) if refs else 0) + 1
                seg = fmt.SegmentRecord(first, t.frames[first : first + count], t.commits[first_seq - 1 : last_seq])
                raw = self._meta_record(fmt.SEGMENT, seg, out.pos)
                refs.append(fmt.SegmentRef(out.pos, len(raw), first, count, last_seq))
                out.write(raw)
                del seg, raw
            extra = dict(self._ckpt.extra)
            if t.dicts or t.upgraded_upto:
                extra["codec"] = {"dicts": dict(t.dicts), "upto": t.upgraded_upto, "trained_at": t.dict_trained_at}
            start = out.pos
            self._checkpoint_vectors(extra, out)
            folded = out.pos - start
            if lex != "keep":
                dead += self._checkpoint_lexical(extra, out, force=lex == "now")
            pos = out.pos
        except BaseException:
            self._rollback()  # what was written is garbage past the end: cut it
            raise
        counters = dict(self._counters)
        counters["bytes.vectors"] = counters.get("bytes.vectors", 0) + folded
        counters["bytes.lexfile"] = counters.get("bytes.lexfile", 0) + pos - start - folded
        old_files = self._ckpt.extra.get("lex", {}).get("files", {}).values()
        kept = {tuple(v) for v in extra.get("lex", {}).get("files", {}).values()}
        overhead = fmt.RECORD_SIZE + (crypto.Sealer.OVERHEAD if self.encrypted else 0)
        dead += sum(length + overhead for offset, length in old_files if (offset, length) not in kept)
        counters["bytes.segment"] = counters.get("bytes.segment", 0) + sum(r.length for r in refs[keep:])
        counters["bytes.dead"] = counters.get("bytes.dead", 0) + dead
        counters["checkpoints"] = counters.get("checkpoints", 0) + 1
        ckpt = fmt.CheckpointRecord(self.capsule_id, t.seq, t.next_id, self._last_commit, refs, counters, extra)
        # The checkpoint counts its own bytes: encode once to learn the size (the count
        # itself may change the size by a byte or two, which stats can live with).
        size = len(self._meta_record(fmt.CHECKPOINT, ckpt, pos))
        counters["bytes.checkpoint"] = counters.get("bytes.checkpoint", 0) + size
        ck_raw = self._meta_record(fmt.CHECKPOINT, ckpt, pos)
        ck_off = pos
        try:
            out.write(ck_raw)
            out.flush()
            # Order matters: the header may only point at bytes already on disk.
            self._file.sync()
            self._write_header(self._header.next(ck_off, len(ck_raw)))
        except StorageError:
            # The old header still points at the old checkpoint; the new records are
            # harmless garbage past the end, cut here or at the next open.
            self._rollback()
            raise
        self._ckpt = ckpt
        self._counters = counters
        self._log_end = self._write_end = self._ckpt_end = ck_off + len(ck_raw)
        self._tail_frames = 0
        self._vec = extra.get("vec")
        self._vec_refs = [list(r) for r in self._vec.get("records", [])] if self._vec else []
        self._ckpt_vec_refs = len(self._vec_refs)
        if self._indexes is not None:
            self._indexes.save(t)

    def _record(self, kind: int, body: bytes, offset: int) -> bytes:
        """A record to be written at ``offset`` (sealed there, for encrypted capsules)."""
        return fmt.encode_record(kind, body, sealer=self._file.sealer, offset=offset)

    def _meta_record(self, kind: int, obj: Any, offset: int) -> bytes:
        return fmt.meta_record(kind, obj, sealer=self._file.sealer, offset=offset)

    def _write_header(self, header: fmt.Header) -> None:
        slot = fmt.SLOT_OFFSETS[header.generation % 2]  # never overwrite the live slot [F-02]
        self._file.pwrite(slot, fmt.encode_header(header))
        self._file.sync()
        self._header = header

    def _last_seq(self, ref: fmt.SegmentRef) -> int:
        if ref.last_seq >= 0:
            return ref.last_seq
        return self._table.frames[ref.first_id + ref.count - 1].seq  # read versions 1-2

    def _checkpoint_vectors(self, extra: dict[str, Any], out: _Spool) -> None:
        """List every VECTORS record in the checkpoint; the tail's small ones (one event, a
        few frames) are folded into one, so the list grows with data, not with commits.
        Big records stay where they are: rewriting them would double their bytes."""
        if self._vec is None:
            return
        refs = self._vec_refs[: self._ckpt_vec_refs]
        tail = self._vec_refs[self._ckpt_vec_refs :]
        small = [r for r in tail if r[1] < SMALL_VECTOR_RECORD]
        if len(small) > 1:
            ids: list[int] = []
            rows = []
            for offset, _ in small:
                i, v = self._read_vectors(offset)
                ids += i
                rows.append(v)
            folded = fmt.VectorsRecord(ids, pack_vectors(np.concatenate(rows)))
            raw = self._record(fmt.VECTORS, fmt.pack(folded), out.pos)
            tail = [r for r in tail if r[1] >= SMALL_VECTOR_RECORD] + [[out.pos, len(ids)]]
            out.write(raw)
        extra["vec"] = {**self._vec, "records": refs + tail, "bitmap": bytes(self._has_vec)}

    def _checkpoint_lexical(self, extra: dict[str, Any], out: _Spool, *, force: bool = False) -> int:
        """Copy the lexical index's new files into the capsule [F-15]; returns the bytes
        written for nothing (a copy abandoned half-way).

        Only when the index grew by a quarter since its last copy (or ``force``): Tantivy
        merges rewrite segments, and each copy leaves the replaced files dead in the log, so
        copying at every checkpoint would cost O(N log N) bytes. A restore catches up on
        the frames after the copy, which lexical indexing does quickly.
        """
        ix = self._indexes
        if ix is None or ix.lex is None or ix.readonly:
            return 0
        previous = extra.get("lex") if extra.get("lex", {}).get("schema") == LEX_SCHEMA else None
        covered = previous.get("frames", 0) if previous else 0
        grown = self._table.next_id - covered
        if not force and previous and grown < max(LEX_COPY_MIN_FRAMES, covered // 4):
            return 0
        stored = previous["files"] if previous else {}
        files: dict[str, list[int]] = {}
        start = out.pos
        try:
            for p in ix.lex_files():
                old = stored.get(p.name)
                if old is not None and old[1] == p.stat().st_size and p.name not in MUTABLE_LEX_FILES:
                    files[p.name] = old  # segment files never change once written
                    continue
                data = p.read_bytes()  # one file at a time: written out before the next
                files[p.name] = [out.pos, len(data)]
                out.write(self._record(fmt.LEXFILE, data, out.pos))
                del data
        except FileNotFoundError:
            # A Tantivy merge removed a file while we copied: keep the previous copy this
            # time (still valid; a restore catches up), try again at the next checkpoint.
            return out.pos - start
        extra["lex"] = {"seq": self._table.seq, "fingerprint": fingerprint(self._table, self._table.seq),
                        "files": files, "schema": LEX_SCHEMA, "frames": self._table.next_id}
        return 0

    # -- codec upgrades [F-16] --------------------------------------------------------

    def upgrade_codecs(
        self, *, max_frames: int | None = None, cold_commits: int = 0, level: int = upgrade.LEVEL,
        batch_frames: int = 1024,
    ) -> dict[str, Any]:
        """Re-encode committed payloads into grouped, better-compressed blocks (see
        ``engine/upgrade.py``), oldest first, in batches of ``batch_frames`` frames, each
        one RELOCATE record and one fsync. Frames of the last ``cold_commits`` commits
        are left alone. The capsule lock is held only to write each batch, so puts and
        queries go on meanwhile; a batch that finds staged puts stops the run (``busy``)
        instead of waiting: ingest comes first. Returns what was done."""
        self._check_writable()
        done: dict[str, Any] = {"frames": 0, "moved": 0, "blocks": 0, "saved": 0, "busy": False}
        if not self._upgrade_lock.acquire(blocking=False):
            return {**done, "busy": True}
        try:
            while max_frames is None or done["frames"] < max_frames:
                with self._lock:
                    self._check_writable()
                    t = self._table
                    start = t.upgraded_upto
                    end = min(t.first_after(max(0, t.seq - cold_commits)), start + batch_frames)
                    if max_frames is not None:
                        end = min(end, start + max_frames - done["frames"])
                    frames, f, dicts = t.frames[start:end], self._file, self._dicts
                    zdict = (max(t.dicts), dicts(max(t.dicts))) if t.dicts else None
                    # The data may drift from what the dictionary learnt: train a new one
                    # (a new id; old blocks keep theirs) each time the capsule grew 8x.
                    retrain = bool(t.dicts) and start >= upgrade.RETRAIN_GROWTH * max(
                        t.dict_trained_at, upgrade.DICT_MIN_SAMPLES)
                    next_dict = max(t.dicts, default=0) + 1
                if not frames:
                    break
                new_dict, encoded = self._encode_upgrade(f, dicts, frames, zdict, level, retrain=retrain,
                                                         next_dict=next_dict)
                with self._lock:
                    if self._pending or self._write_end != self._log_end or self._table.upgraded_upto != start:
                        done["busy"] = True
                        break
                    self._check_writable()
                    moved = self._write_upgrade(end, new_dict, encoded)
                done["frames"] += len(frames)
                done["moved"] += moved["upgrade.frames"]
                done["blocks"] += moved["upgrade.blocks"]
                done["saved"] += moved["upgrade.saved"]
            with self._lock:
                done["remaining"] = max(0, self._table.first_after(max(0, self._table.seq - cold_commits))
                                        - self._table.upgraded_upto)
            return done
        finally:
            self._upgrade_lock.release()

    def _encode_upgrade(
        self, f: CapsuleFile, dicts: Dictionaries, frames: list[fmt.FrameMeta],
        zdict: tuple[int, Any] | None, level: int, *, retrain: bool = False, next_dict: int = 1,
    ) -> tuple[tuple[int, bytes, Any] | None, list[upgrade.Encoded]]:
        """Read and re-encode one batch (no lock held: committed frames do not change).
        Trains a dictionary (id ``next_dict``) when there is none, or when ``retrain``."""
        groups, payloads = [], []
        for members in upgrade.plan(frames):
            g = upgrade.Group(members, {}, {}, {})
            data = []
            for m in members:
                if m.block not in g.old_blocks:
                    rh, body = read_record(f, m.block, fmt.BLOCK)
                    codec, _, _, _, raw_len = fmt.BLOCK_HEADER.unpack_from(body)
                    g.old_blocks[m.block] = fmt.RECORD_SIZE + rh.length
                    g.old_codecs[m.block] = codec
                    g.old_raw[m.block] = raw_len
                data.append(read_payload(f, m, None, dicts))
            groups.append(g)
            payloads.append(data)
        new_dict = None
        if zdict is None or retrain:
            samples = [p for data in payloads for p in data]
            if upgrade.wants_dictionary(samples) and (trained := upgrade.train(samples)) is not None:
                candidate = codecs.load_dict(trained)
                if upgrade.worth_keeping(candidate, samples, self._opts.level):
                    new_dict = (next_dict, trained, candidate)
                    zdict = (next_dict, candidate)
        encoded = [e for g, data in zip(groups, payloads, strict=True) if (e := upgrade.encode(g, data, zdict, level))]
        return new_dict, encoded

    def _write_upgrade(
        self, upto: int, new_dict: tuple[int, bytes, Any] | None, encoded: list[upgrade.Encoded],
    ) -> dict[str, int]:
        """Append the new blocks and the RELOCATE naming them, fsync, switch (lock held)."""
        pos = self._log_end
        out = bytearray()
        dict_refs, blocks, moves = [], [], []
        if new_dict is not None:
            raw = self._record(fmt.DICT, fmt.DICT_HEADER.pack(new_dict[0]) + new_dict[1], pos)
            dict_refs.append(fmt.DictRef(new_dict[0], pos, fmt.decode_record_header(raw).body_crc))  # type: ignore[union-attr]
            out += raw
        for e in encoded:
            at = pos + len(out)
            raw = self._record(fmt.BLOCK, e.body, at)
            blocks.append(fmt.BlockRef(at, fmt.decode_record_header(raw).body_crc))  # type: ignore[union-attr]
            start = 0
            for m in e.group.frames:
                moves.append(fmt.Move(m.id, at, start))
                start += m.length
            out += raw
        dict_bytes = blocks[0].offset - pos if blocks else len(out)
        deltas = upgrade.counters(encoded, dict_bytes)
        rec = fmt.RelocateRecord(self._table.seq, upto, moves, blocks, dict_refs, deltas)
        raw = self._meta_record(fmt.RELOCATE, rec, pos + len(out))
        try:
            self._file.pwrite(pos, bytes(out) + raw)
            self._file.sync()  # the switch point: before it the old blocks are in use
        except StorageError:
            self._rollback()
            raise
        self._table.relocate(rec, pos + len(out))
        if new_dict is not None:
            self._dicts._loaded[new_dict[0]] = new_dict[2]
            self._fresh_dict = (new_dict[0], new_dict[2])
        self._add_counters({**deltas, "bytes.block": len(out) - dict_bytes, "bytes.dict": dict_bytes,
                            "bytes.relocate": len(raw)})
        self._log_end = self._write_end = pos + len(out) + len(raw)
        return {k: deltas.get(k, 0) for k in ("upgrade.frames", "upgrade.blocks", "upgrade.saved")}

    def rekey(self, old: str | bytes, new: str | bytes, *, kdf: crypto.KdfParams | None = None) -> None:
        """Change an encrypted capsule's passphrase: a new key slot wrapping the same data
        key, written to both header slots; no record is re-encrypted [F-19]."""
        self._check_writable()
        if not self.encrypted:
            raise InvalidArgument(f"{self.path} is not encrypted (see memvidd encrypt)")
        slot = crypto.rekey(crypto.decode_keyslot(self._header.keyslot), old, new, self.capsule_id, params=kdf)
        with self._lock:
            self._check_writable()
            keyslot = crypto.encode_keyslot(slot)
            self._write_header(self._header.next(keyslot=keyslot))
            self._write_header(self._header.next())  # the other slot too: the old passphrase is gone

    # -- compaction and branches [F-17] ------------------------------------------------

    def compact(self, *, level: int = upgrade.LEVEL, cancel: threading.Event | None = None) -> dict[str, Any]:
        """Rewrite the capsule without its dead bytes, payloads upgraded, every frame,
        version and commit kept (see ``engine/compact.py``), and put the new file in
        place of the old atomically (rename, then directory fsync). Puts and queries go
        on while the bulk is copied; the capsule is locked only to copy the commits made
        meanwhile and to switch. Returns bytes before and after. Setting ``cancel`` stops
        the copy (``Cancelled``; the capsule is left as it was)."""
        self._check_writable()
        if not isinstance(self._file, OsFile):
            raise InvalidArgument("compaction needs a capsule on a real file")
        real = self._real_path
        directory = os.path.dirname(real)
        with self._upgrade_lock:
            before = self._log_end
            out = unnamed(directory)
            try:
                with self._lock:
                    self._check_writable()
                    out.keep_mode_of(self._file)
                    # The same capsule (id, key slot, data key): only the bytes change.
                    out.sealer = self._file.sealer
                    h = self._header
                    first = genesis(self.capsule_id, genesis_extra(self._ckpt.extra), out.sealer)
                    start = fmt.Header(1, h.capsule_id, h.created, fmt.LOG_START, len(first),
                                       flags=h.flags, keyslot=h.keyslot)
                    w = Rewriter(self, out, start, first)
                    w.copy_dicts()
                    snapshot = self._table.seq
                w.copy(snapshot, level=level, cancel=cancel)
                with self._quiet():
                    w.copy(self._table.seq, level=level)
                    lex = w.copy_lexfiles(self._ckpt.extra.get("lex"))
                    w.finish()
                    if not self._file.still_at(real):
                        raise StorageError("compact", real, OSError(
                            errno.ESTALE, "the capsule file was moved or replaced while open; not compacting"))
                    link_unnamed(out, real + ".compacting", replace=real)
                    fsync_dir(directory)
                    rewritten = out.size()
                    self._switch(out)
                    if lex is not None:  # the same commits, at new offsets
                        self._ckpt.extra["lex"] = {**lex, "fingerprint": fingerprint(self._table, lex["seq"])}
                    # Only what indexes the frames for a fast open: copying the lexical
                    # index is the next checkpoint's business, not a compaction's.
                    self._checkpoint(lex="keep")
            except BaseException:
                if out is not self._file:
                    out.close()
                raise
            return {"bytes_before": before, "bytes_after": self._log_end,
                    "checkpoint_bytes": self._log_end - rewritten, **w.stats}

    def branch(
        self, path: str | os.PathLike[str], *, as_of: Any = None, passphrase: str | bytes | None = None,
        kdf: crypto.KdfParams | None = None, level: int = upgrade.LEVEL, origin: bool = True,
    ) -> dict[str, Any]:
        """A new capsule at ``path`` holding this one's history up to ``as_of`` (default:
        now), frames and vectors, its search indexes built, and its origin recorded in
        ``stats()["origin"]``. ``CapsuleExists`` if anything is at ``path``.

        The branch is encrypted when ``passphrase`` is given, plain otherwise, whatever
        this capsule is: ``memvidd encrypt`` / ``decrypt`` are branches of the head with
        ``origin=False``."""
        path = os.fspath(path)
        if os.path.lexists(path):
            raise CapsuleExists(f"{path} already exists")
        with self._upgrade_lock:
            with self._lock:
                self._check_open()
                seq = self._resolve_as_of(as_of)
                extra = genesis_extra(self._ckpt.extra)
                if origin:
                    extra["origin"] = {
                        "capsule_id": uuid.UUID(bytes=self.capsule_id).hex, "path": os.path.abspath(self.path),
                        "seq": seq, "time": self._table.commit_times[seq - 1] if seq else self._header.created,
                    }
            header, sealer, first = new_header(uuid.uuid4().bytes, extra, passphrase, kdf)  # Argon2id: unlocked
            with self._lock:
                out = unnamed(os.path.dirname(os.path.abspath(path)))
                out.sealer = sealer
                w = Rewriter(self, out, header, first)
                w.limit(seq)
                w.copy_dicts()
            try:
                w.copy(seq, level=level)
                w.finish()
                link_unnamed(out, path)
                fsync_dir(os.path.dirname(os.path.abspath(path)))
            finally:
                out.close()
        with open(path, passphrase=passphrase, index_dir=self._opts.index_dir) as b:
            b.rebuild_indexes()
        return {"path": path, "seq": seq, **w.stats}

    @contextlib.contextmanager
    def _quiet(self, timeout: float = 30.0) -> Iterator[None]:
        """Hold the lock at a moment when nothing is staged (a writer thread may be
        between its puts and its commit: let it finish rather than switch under it)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                self._check_writable()
                if not self._pending:
                    yield
                    return
            if time.monotonic() > deadline:
                raise Cancelled("compaction gave up: staged puts were not committed within 30 s; "
                                "the capsule is unchanged")
            time.sleep(0.001)

    def _switch(self, f: OsFile) -> None:
        """Continue on the rewritten file ``f`` (lock held). Readers still using the old
        file finish on it through the view they pinned; it closes when they are done."""
        indexes = self._indexes
        f.path = self.path
        self._file = f
        self._header = read_header(f)
        self._indexes = None  # the same frames: keep them, but do not feed them the replay
        self._blocks = LRUCache(self._opts.block_cache_bytes, size=len)
        self._load()
        self._indexes = indexes
        if indexes is not None:
            indexes.blocks = self._blocks

    # -- reading ----------------------------------------------------------------------

    def get(
        self, frame_id: int | None = None, *, uri: str | None = None, as_of: Any = None
    ) -> Frame:
        """A frame by id, or the version of ``uri`` visible at ``as_of`` (default: now)."""
        with self._lock:
            self._check_open()
            self._expire_due()
            seq = self._resolve_as_of(as_of)
            t = self._table
            if (frame_id is None) == (uri is None):
                raise InvalidArgument("get() takes exactly one of frame_id or uri")
            if frame_id is not None:
                if isinstance(frame_id, bool) or not isinstance(frame_id, int):
                    raise InvalidArgument("frame_id must be an int")
                if not 0 <= frame_id < t.next_id or t.frames.seq_of(frame_id) > seq:
                    raise NotFound(f"no frame {frame_id}" + (f" as of commit {seq}" if as_of is not None else ""))
                fid = frame_id
                if t.frames.op_of(fid) == fmt.TOMBSTONE:
                    raise NotFound(f"frame {fid} is a tombstone")
            else:
                found = t.at_uri(uri, seq)  # type: ignore[arg-type]
                if found is None:
                    raise NotFound(f"nothing at {uri!r}" + (f" as of commit {seq}" if as_of is not None else ""))
                fid = found
            if self._expired(fid):
                # Even as of a time before it expired: the rules say it is gone [F-24].
                raise NotFound(f"frame {fid} has expired under the capsule's retention rules")
            meta = t.frames[fid]
            info = self._info(meta)
            view = self._views.pin()
        try:
            payload = view.payload(meta)
            self._prefetch_next(meta, view.table)
        finally:
            self._views.unpin(view)
        return Frame(**msgspec.structs.asdict(info), payload=payload)

    def timeline(
        self,
        *,
        since: Any = None,
        until: Any = None,
        limit: int = 100,
        reverse: bool = False,
        as_of: Any = None,
        kind: str | None = None,
    ) -> Timeline:
        """Frames visible at ``as_of`` ordered by event time, oldest first (or newest),
        of one ``kind`` if given. Expired frames are left out and counted in the result's
        ``expired``."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise InvalidArgument("limit must be a non-negative int")
        lo = None if since is None else to_epoch(since)
        hi = None if until is None else to_epoch(until)
        with self._lock:
            self._check_open()
            self._expire_due()
            seq = self._resolve_as_of(as_of)
            out = Timeline()
            if limit:
                frames = self._table.frames
                for fid in self._table.timeline(seq, lo, hi, reverse):
                    if kind is not None and frames.kind_of(fid) != kind:
                        continue
                    if self._expired(fid):
                        out.expired += 1
                        continue
                    out.append(self._info(frames[fid]))
                    if len(out) >= limit:
                        break
            return out

    def changes(self, since_seq: int, *, after_id: int = -1, limit: int = 10_000) -> list[Frame]:
        """Frames (puts, with payload) created by the commits after ``since_seq``, oldest
        first: what a subscriber that saw ``since_seq`` has not seen yet. Page through a
        large commit with ``after_id`` (the last id of the previous page)."""
        with self._lock:
            self._check_open()
            t = self._table
            first = max(t.first_after(max(0, since_seq)), after_id + 1)
            self._expire_due()
            metas = [m for m in t.frames[first : first + limit] if m.op == fmt.PUT and not self._expired(m.id)]
            infos = [self._info(m) for m in metas]
            view = self._views.pin()
        try:
            return [Frame(**msgspec.structs.asdict(i), payload=view.payload(m))
                    for i, m in zip(infos, metas, strict=True)]
        finally:
            self._views.unpin(view)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            self._check_open()
            t = self._table
            c = self._counters
            codec_stats = {}
            for name in codecs.NAMES.values():
                blocks = c.get(f"codec.{name}.blocks", 0)
                if blocks:
                    raw, stored = c.get(f"codec.{name}.raw", 0), c.get(f"codec.{name}.stored", 0)
                    codec_stats[name] = {"blocks": blocks, "raw_bytes": raw, "stored_bytes": stored,
                                         "ratio": round(stored / raw, 4) if raw else None}
            return {
                "path": self.path,
                "capsule_id": uuid.UUID(bytes=self.capsule_id).hex,
                "format": {"read_version": self._header.read_version, "write_version": self._header.write_version},
                "readonly": self.readonly,
                "commit_seq": t.seq,
                "frames": t.next_id,
                "live_frames": t.live_count,
                "tombstones": c.get("frames.tombstone", 0),
                "superseded_frames": t.ended_count - c.get("frames.tombstone", 0),
                "uris": t.uri_count,
                "live_uris": t.live_uris,
                "pending_frames": len(self._pending),
                "file_bytes": self._log_end,
                "bytes_by_kind": {
                    "header": fmt.LOG_START,
                    **{k: c.get(f"bytes.{k}", 0) for k in fmt.KIND_NAMES.values()},
                    "dead": c.get("bytes.dead", 0),
                },
                "payload_raw_bytes": c.get("payload.raw", 0),
                "codecs": codec_stats,
                "origin": self._ckpt.extra.get("origin"),
                "retention": {"rules": retention.to_builtins(self._expiry.rules),
                              "expired_frames": len(self._expiry.expired),
                              "expired_bytes": self._expiry.expired_bytes,
                              "next_expiry": self._expiry.next_deadline()},
                "rewinds": [{"seq": s, "to": to} for s, to in sorted(t.rewinds.items())[-10:]],
                "upgrades": {"frames": c.get("upgrade.frames", 0), "blocks": c.get("upgrade.blocks", 0),
                             "saved_bytes": c.get("upgrade.saved", 0), "considered": t.upgraded_upto,
                             "dictionaries": len(t.dicts)},
                "checkpoints": c.get("checkpoints", 0),
                "checkpoint_failures": self._checkpoint_failures,
                "segments": len(self._ckpt.segments),
                "wal_bytes": self._log_end - self._ckpt_end,
                "wal_frames": self._tail_frames,
                "vectors": self._vector_stats(),
                "search": self._indexes.stats() if self._indexes is not None else None,
                "block_cache": self._blocks.stats(),
            }

    def _vector_stats(self) -> dict[str, Any] | None:
        if self._vec is None:
            return None
        t = self._table
        text = sum(1 for m in t.frames if m.op == fmt.PUT and m.is_text)
        have = sum(self._has_vec) + len(self._ready_vectors)
        e = self._embed_stats
        return {
            "model": self._vec["model"], "dim": self._vec["dim"], "text_frames": text,
            "frames_with_vectors": have, "coverage": round(have / text, 4) if text else 1.0,
            "embedding": {
                "queued": len(self._embed_queue), "embedded": e["embedded"], "errors": e["errors"],
                "last_error": self._embed_error,
                "frames_per_s": round(e["embedded"] / e["seconds"], 2) if e["seconds"] else None,
                "embedder_loaded": self._embedder is not None,
            },
        }

    @property
    def seq(self) -> int:
        """The last committed sequence number (0 for an empty capsule). Lock-free: an
        event loop may read it while a writer holds the capsule across an fsync."""
        return self._table.seq

    @property
    def frame_count(self) -> int:
        """Frames committed (every version, tombstones included). Lock-free, like ``seq``."""
        return self._table.next_id

    def _resolve_as_of(self, as_of: Any) -> int:
        head = self._table.seq
        if as_of is None:
            return head
        if isinstance(as_of, bool):
            raise InvalidArgument("as_of must be a commit seq (int) or a timestamp")
        if isinstance(as_of, int):
            if not 0 <= as_of <= head:
                raise InvalidArgument(f"as_of commit {as_of} is outside 0..{head}")
            return as_of
        return self._table.seq_at_time(to_epoch(as_of))

    def _info(self, m: fmt.FrameMeta) -> FrameInfo:
        t = self._table
        end = t.ended_at(m.id)
        return FrameInfo(
            id=m.id, uri=m.uri, title=m.title, kind=m.kind, tags=dict(m.tags), timestamp=m.timestamp,
            commit_seq=m.seq, commit_time=t.commit_times[m.seq - 1],
            valid_until=None if end == FOREVER else end, superseded_by=t.ended_by(m.id),
            supersedes=m.supersedes, parent=m.parent, chunk=m.chunk, length=m.length,
            is_text=m.is_text,
        )

    # -- search -----------------------------------------------------------------------

    def find(
        self,
        query: str,
        *,
        k: int = 10,
        mode: str = "auto",
        scope: str | None = None,
        tags: Mapping[str, str] | None = None,
        kind: str | None = None,
        since: Any = None,
        until: Any = None,
        as_of: Any = None,
        snippet_chars: int = 200,
        all_versions: bool = False,
        cached_only: bool = False,
    ) -> Hits:
        """Search the frames visible at ``as_of`` (default: now); see ``engine/search.py``.

        ``mode``: "lex" (BM25), "vec" (embeddings), "hybrid" (both, fused) or "auto"
        (hybrid when the capsule has vectors and an embedder, else lex); the result's
        ``.mode`` says which ran. ``all_versions`` also returns superseded versions.
        ``cached_only``: answer only from the result cache, without waiting for any lock
        or doing any search; ``None`` when that is not possible (an event loop can ask
        this first and send the real search to a worker thread only on a miss).
        """
        if not isinstance(query, str):
            raise InvalidArgument("query must be a string")
        if mode not in MODES:
            raise InvalidArgument(f"mode must be one of {MODES}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise InvalidArgument("k must be a non-negative int")
        if isinstance(snippet_chars, bool) or not isinstance(snippet_chars, int) or snippet_chars < 0:
            raise InvalidArgument("snippet_chars must be a non-negative int")
        filters = Filters(
            scope=opt_str("scope", scope), tags=tags_of(tags), kind=opt_str("kind", kind),
            since=None if since is None else to_epoch(since), until=None if until is None else to_epoch(until),
        )
        warnings = []
        if k > MAX_K:
            warnings.append(f"k lowered from {k} to {MAX_K}")
            k = MAX_K
        if not self._lock.acquire(blocking=not cached_only):
            return None  # type: ignore[return-value]  # a writer holds the capsule: not cached
        try:
            self._check_open()
            if not cached_only:
                self._expire_due()
            seq = self._resolve_as_of(as_of)
            if cached_only and self._indexes is None:
                return None  # type: ignore[return-value]
            ix = self._open_indexes()
            generation = (self._table.seq, len(ix.vec) if ix.vec else 0, len(self._expiry.expired))
            view = None if cached_only else self._views.pin()
        finally:
            self._lock.release()
        try:
            used = self._resolve_mode(mode, ix)
            # Live queries are keyed by "now" (None) so re-warming can find them after a commit.
            key = (query, k, used, filters.key(), None if as_of is None else seq, snippet_chars, all_versions)
            hit = ix.results.get((key, generation))
            if hit is not None:
                ix.recent[key] += 1
                return Hits(list(hit), mode=used, seq=seq, warnings=hit.warnings, cached=True)
            if view is None:
                return None  # type: ignore[return-value]
            if not query.strip() or k == 0:
                return Hits([], mode=used, seq=seq, warnings=warnings + (["empty query"] if not query.strip() else []))
            hits = self._search(ix, view, query, k, used, filters, seq, snippet_chars, all_versions, warnings)
        finally:
            if view is not None:
                self._views.unpin(view)
        ix.results.put((key, generation), hits)
        ix.recent[key] += 1
        return hits

    def _resolve_mode(self, mode: str, ix: Indexes) -> str:
        has_vectors = ix.vec is not None and len(ix.vec) > 0
        if mode == "auto":
            return "hybrid" if has_vectors and self._embedder is not None else "lex"
        if mode in ("vec", "hybrid"):
            if self._vec is None:
                raise InvalidArgument(f"mode={mode!r}: this capsule stores no vectors (model=None)")
            if self._embedder is None:
                raise InvalidArgument(f"mode={mode!r} needs an embedder to embed the query")
        return mode

    def _search(
        self, ix: Indexes, view: View, query: str, k: int, mode: str, filters: Filters, seq: int,
        snippet_chars: int, all_versions: bool, warnings: list[str],
    ) -> Hits:
        """Run a query on ``ix`` and read its hits through ``view``: both taken under the
        lock by ``find`` (a compaction's switch replaces what ``self`` names meanwhile)."""
        t = view.table
        head = seq >= t.seq
        depth = k if mode != "hybrid" else max(2 * k, 40)  # fusion needs more than k from each list
        lex_hits: list[tuple[float, int]] = []
        parsed = None
        expired = self._expiry.expired
        hidden: set[int] = set()
        if mode in ("lex", "hybrid"):
            want = depth
            while True:  # expired frames are dropped here: ask for more until enough remain
                found, parsed, notes = ix.lexical(query, want, seq=seq, head=head, all_versions=all_versions,
                                                  filters=filters)
                lex_hits = [(score, f) for score, f in found if f not in expired]
                hidden.update(f for _, f in found if f in expired)
                if len(lex_hits) >= depth or len(found) < want or want >= MAX_K * 8:
                    break
                want *= 4
            warnings = warnings + notes
        vec_hits: list[tuple[float, int]] = []
        if mode in ("vec", "hybrid"):
            def accept(fid: int) -> bool:
                if fid >= t.next_id:
                    return False
                ok = t.frames.seq_of(fid) <= seq if all_versions else t.visible(fid, seq)
                if ok and fid in expired:
                    hidden.add(fid)
                    return False
                return ok and (not filters or filters.match(t.frames[fid]))

            vec_hits = ix.semantic(self._query_vector(ix, query), depth, accept)
        if hidden:
            warnings = warnings + [f"{len(hidden)} matching frames are hidden: expired under the retention rules"]
        if mode == "lex":
            ranked = lex_hits
        elif mode == "vec":
            ranked = vec_hits
        else:
            ranked = rrf([[f for _, f in lex_hits], [f for _, f in vec_hits]])
        lex_ids = {f for _, f in lex_hits}
        vec_ids = {f for _, f in vec_hits}
        hits = []
        make_snippet = None
        if ix.lex is not None and parsed is not None and snippet_chars and lex_ids:
            make_snippet = ix.lex.snippets(parsed, snippet_chars)
        for score, fid in ranked[:k]:
            m = t.frames[fid]
            text = view.text(m) if snippet_chars else ""
            if make_snippet is not None and fid in lex_ids:
                snippet, spans = make_snippet(text)
            else:
                snippet, spans = text[:snippet_chars], []
            end = t.ended_at(fid)
            hits.append(Hit(
                frame_id=fid, uri=m.uri, title=m.title, score=round(float(score), 6), snippet=snippet,
                highlights=spans, tags=dict(m.tags), kind=m.kind, timestamp=m.timestamp, commit_seq=m.seq,
                valid_until=None if end == FOREVER else end,
                sources=tuple(s for s, ids in (("lex", lex_ids), ("vec", vec_ids)) if fid in ids),
            ))
        return Hits(hits, mode=mode, seq=seq, warnings=warnings)

    def _query_vector(self, ix: Indexes, query: str) -> np.ndarray:
        assert self._embedder is not None
        v = ix.query_vectors.get(query)
        if v is None:
            v = self._embedder.embed([query[:4096]])[0]
            ix.query_vectors.put(query, v)
        return v

    def vectors(self, frame_ids: Iterable[int]) -> dict[int, np.ndarray]:
        """The stored embeddings of these frames, where they have one (to reuse a vector
        for identical text instead of embedding it again)."""
        frame_ids = list(frame_ids)
        with self._lock:
            self._check_open()
            ix = self._open_indexes()
            out = {fid: self._ready_vectors[fid] for fid in frame_ids if fid in self._ready_vectors}
            rest = [fid for fid in frame_ids if fid not in out and fid < len(self._has_vec) and self._has_vec[fid]]
            if rest and ix.vec is not None:
                for fid, v in zip(rest, ix.vec.get(rest), strict=True):
                    out[fid] = v
            return out

    def rebuild_indexes(self) -> dict[str, str]:
        """Rebuild the lexical index from the frames and the vector graph from the stored
        vectors, ignoring every working copy, then checkpoint them into the capsule."""
        with self._lock:
            self._check_writable()
            if self._pending:
                raise InvalidArgument("commit or roll back staged frames first")
            if self._indexes is not None:
                self._indexes.close(None)
                self._indexes = None
            self._ckpt.extra.pop("lex", None)
            ix = self._open_indexes(fresh=True)
            self._checkpoint(lex="now")
            return dict(ix.origin)

    def _open_indexes(self, *, fresh: bool = False) -> Indexes:
        """Attach the search indexes on first use (callers hold the lock)."""
        if self._indexes is None:
            dim = self._vec["dim"] if self._vec else None
            ix = Indexes(
                capsule_id=self.capsule_id, path=self.path, readonly=self.readonly, dim=dim,
                cache_dir=self._opts.index_dir, result_cache_bytes=self._opts.result_cache_bytes,
                block_cache_bytes=self._opts.block_cache_bytes, ephemeral=self.encrypted,
            )
            ix.blocks = self._blocks
            if fresh:
                ix.discard_working_copies()
            lex = self._ckpt.extra.get("lex")
            try:
                ix.attach(
                    self._table, self._text_of, lex, self._read_lexfile,
                    self._all_vectors, self._vectors_since,
                )
            except BaseException:
                ix.close(None)  # gives back its hold on the working copies
                raise
            for fid, v in self._ready_vectors.items():  # embedded, not yet committed
                ix.add_vectors([fid], v[None, :])
            self._indexes = ix
        return self._indexes

    def _text_of(self, m: fmt.FrameMeta) -> str:
        """``m``'s text through the current view (callers hold the lock)."""
        view = self._views.current
        assert view is not None
        return view.text(m)

    def _read_lexfile(self, offset: int, length: int) -> bytes:
        _, body = read_record(self._file, offset, fmt.LEXFILE)
        if len(body) != length:
            raise CorruptionError("lexical index file has the wrong length", offset=offset)
        return body

    def _read_vectors(self, offset: int) -> tuple[list[int], np.ndarray]:
        rh, body = read_record(self._file, offset, fmt.VECTORS)
        rec = fmt.meta_body(rh, body, fmt.VectorsRecord, offset=offset)
        assert self._vec is not None
        rows = unpack_vectors(rec.data, self._vec["dim"])
        if len(rows) != len(rec.ids):
            raise CorruptionError("vector count does not match ids", offset=offset)
        return rec.ids, rows

    def _all_vectors(self) -> tuple[list[int], np.ndarray]:
        return self._vectors_from(self._vec_refs)

    def _vectors_since(self, seq: int) -> tuple[list[int], np.ndarray]:
        """Vectors committed after commit ``seq`` (read from those commits' records)."""
        refs = []
        for c in self._table.commits[seq:]:
            rh, body = read_record(self._file, c.offset, fmt.COMMIT)
            rec = fmt.meta_body(rh, body, fmt.CommitRecord, offset=c.offset)
            refs += [[v.offset, 0] for v in rec.vectors]
        return self._vectors_from(refs)

    def _vectors_from(self, refs: list[list[int]]) -> tuple[list[int], np.ndarray]:
        dim = self._vec["dim"] if self._vec else 0
        ids: list[int] = []
        rows = [np.zeros((0, dim), dtype=np.float32)]
        for offset, _ in refs:
            i, v = self._read_vectors(offset)
            ids += i
            rows.append(v)
        return ids, np.concatenate(rows)

    # -- background work: embedding, prefetch, cache re-warming ------------------------

    def _queue_unembedded(self, first_id: int) -> None:
        """Queue text frames from ``first_id`` on that have no vector yet (newest first)."""
        if self._embedder is None or self._vec is None or self.readonly:
            return
        t = self._table
        fresh = [m.id for m in t.frames[first_id:] if m.op == fmt.PUT and m.is_text
                 and not (m.id < len(self._has_vec) and self._has_vec[m.id]) and m.id not in self._ready_vectors]
        self._embed_queue.extendleft(fresh)  # newest first: what an agent most likely asks about
        if fresh and self._embed_thread is None:
            self._embed_thread = threading.Thread(target=self._embed_loop, name="memvidd-embed", daemon=True)
            self._embed_thread.start()
        self._embed_wake.set()

    def _embed_loop(self) -> None:
        """Embed queued frames in batches; vectors land in the index at once, on disk at
        the next commit: right away when no puts are staged, unless they are handed to a
        writer (``hand_vectors_to``)."""
        assert self._embedder is not None
        while True:
            self._embed_wake.wait()
            with self._lock:
                if self._closed:
                    return
                batch: list[fmt.FrameMeta] = []
                while self._embed_queue and len(batch) < self._opts.embed_batch:
                    fid = self._embed_queue.popleft()
                    if not self._has_vec[fid] and fid not in self._ready_vectors:
                        batch.append(self._table.frames[fid])
                if not batch:
                    self._embed_wake.clear()
                    continue
                self._embedding_inflight = len(batch)
                view = self._views.pin()
            try:
                t0 = time.perf_counter()
                texts = [f"{m.title}\n{view.text(m)}" if m.title else view.text(m) for m in batch]
                vectors = self._embedder.embed(texts)
            except Exception as e:  # keep the capsule usable; the error shows in stats
                self._embed_error = f"{type(e).__name__}: {e}"
                self._embed_stats["errors"] += 1
                return
            finally:
                self._views.unpin(view)
            with self._lock:
                if self._closed:
                    return
                self._embed_stats["embedded"] += len(batch)
                self._embed_stats["seconds"] += time.perf_counter() - t0
                for m, v in zip(batch, vectors, strict=True):
                    self._ready_vectors[m.id] = v
                self._embedding_inflight = 0
                if self._indexes is not None:
                    self._indexes.add_vectors([m.id for m in batch], vectors)
                sink = self._vector_sink
                if sink is None and not self._pending and not self._broken:
                    try:
                        self._commit()
                    except (StorageError, CapsuleBroken) as e:
                        self._embed_error = str(e)
            if sink is not None:
                sink()  # outside the lock: the writer it wakes takes it to commit

    def hand_vectors_to(self, ready: Callable[[], None] | None) -> None:
        """Leave vectors to the writer: from now on the embedding thread commits none
        itself. Embedded vectors wait (searchable already) for the next commit, whoever
        makes it, and ``ready()`` is called from the embedding thread each time some are
        waiting, so that a program with one writer (the daemon) commits them in its own
        writer slot. ``None``: the embedding thread commits them itself again."""
        with self._lock:
            self._vector_sink = ready

    def wait_embedded(self, timeout: float | None = None) -> bool:
        """Block until every queued frame has its vector; False on timeout or error."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                done = not self._embed_queue and not self._ready_vectors and not self._embedding_inflight
                busy = self._embed_thread is not None and self._embed_thread.is_alive()
            if done or self._embed_error or not busy:
                return done and not self._embed_error
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.01)

    def _background(self) -> ThreadPoolExecutor:
        if self._bg is None:
            self._bg = ThreadPoolExecutor(max_workers=1, thread_name_prefix="memvidd-bg")
        return self._bg

    def _prefetch_next(self, m: fmt.FrameMeta, t: FrameTable) -> None:
        """Warm the block cache with the next chunks of the document just read (``t``:
        the pinned table ``m`` came from)."""
        if m.parent is None or m.chunk is None or self._closed:
            return
        # Columns only, no frame read: this runs on every get.
        todo = []
        for c in (m.chunk + 1, m.chunk + 2):
            fid = t.child(m.parent, c)
            if fid is not None and (block := t.frames.block_of(fid)) >= 0 and not self._blocks.peek(block):
                todo.append(fid)
        if todo:
            self._background().submit(self._warm_blocks, todo)

    def _warm_blocks(self, ids: list[int]) -> None:
        try:
            with self._reading() as view:
                for fid in ids:
                    view.payload(view.table.frames[fid])
        except (EngineError, OSError, ValueError, IndexError):
            return  # a closed capsule or damage: the real read will report it

    def _rewarm(self) -> None:
        """After commits, once writes pause, re-run the most frequent recent queries so
        the next identical question is a cache hit. Waiting for the pause matters: a
        re-run makes the lexical index searchable (a Tantivy commit, ~10 ms and more under
        load) and doing that after every write would tax a stream of puts."""
        ix = self._indexes
        if ix is None or not ix.recent or self._rewarm_pending:
            return
        self._rewarm_pending = True
        self._background().submit(self._rewarm_run)

    def _rewarm_run(self) -> None:
        while True:  # wait for a quiet moment: no commit for REWARM_QUIET_S
            seq = self._table.seq
            time.sleep(REWARM_QUIET_S)
            if self._closed:
                return
            if self._table.seq == seq:
                break
        ix = self._indexes
        self._rewarm_pending = False
        if ix is None:
            return
        keys = [key for key, _ in ix.recent.most_common(REWARM_QUERIES)]
        if len(ix.recent) > 4 * REWARM_QUERIES:  # forget the long tail
            ix.recent = type(ix.recent)(dict(ix.recent.most_common(REWARM_QUERIES)))
        for query, k, mode, fkey, as_of, snippet_chars, all_versions in keys:
            if self._closed or as_of is not None:
                continue  # as-of queries do not change with new commits
            scope, tags, kind, since, until = fkey
            try:
                self.find(query, k=k, mode=mode, scope=scope, tags=dict(tags), kind=kind, since=since,
                          until=until, snippet_chars=snippet_chars, all_versions=all_versions)
            except EngineError:
                return

    # -- pending-aware lookups (writer only) ----------------------------------------------

    def _live_id(self, uri: str) -> int | None:
        if uri in self._pending_live:
            return self._pending_live[uri]
        return self._table.live(uri)

    def _is_live(self, fid: int) -> bool:
        if fid in self._pending_ended:
            return False
        t = self._table
        if 0 <= fid < t.next_id:
            return t.is_valid(fid)
        return any(m.id == fid and m.op == fmt.PUT for m in self._pending)

    def _meta(self, fid: int) -> fmt.FrameMeta:
        t = self._table
        return t.frames[fid] if fid < t.next_id else self._pending[fid - t.next_id]

    # -- life cycle -------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise CapsuleClosed(f"{self.path} is closed")

    def _check_writable(self) -> None:
        self._check_open()
        if self.readonly:
            raise ReadOnlyError(f"{self.path} was opened readonly")
        if self._broken:
            raise CapsuleBroken(f"{self.path}: {self._broken}; reopen it")

    def close(self) -> None:
        """Commit staged frames, checkpoint a large tail, release the file and its lock."""
        with self._lock:
            if self._closed:
                return
            self._closed = True  # background threads see this and stop
            self._embed_wake.set()
        if self._embed_thread is not None:
            self._embed_thread.join()
        if self._bg is not None:
            self._bg.shutdown(wait=True)
        with self._lock:
            try:
                if not self.readonly and not self._broken:
                    self._commit()  # staged frames and vectors embedded so far
                    if self._tail_frames >= self._opts.close_checkpoint_frames:
                        self._try_checkpoint()
            finally:
                if self._indexes is not None:
                    self._indexes.close(None if self.readonly or self._broken else self._table)
                    self._indexes = None
                self._views.close()  # tables and files: the current view's is self._file

    def __enter__(self) -> Capsule:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is not None and not self._closed and not self.readonly and not self._broken:
            with self._lock:
                self._rollback()  # an exception means the batch is not wanted
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("readonly" if self.readonly else "writer")
        return f"<Capsule {self.path!r} seq={self._table.seq} frames={self._table.next_id} {state}>"


class _Spool:
    """The records of one checkpoint, written to the file as they come (in pieces of
    ``SPOOL_BYTES``) instead of gathered whole: its memory stays bounded however much it
    writes. Nothing written here counts until the header points at it."""

    def __init__(self, f: CapsuleFile, pos: int) -> None:
        self._file, self._at, self._buf = f, pos, bytearray()

    @property
    def pos(self) -> int:
        """Where the next record goes."""
        return self._at + len(self._buf)

    def write(self, raw: bytes) -> None:
        self._buf += raw
        if len(self._buf) >= SPOOL_BYTES:
            self.flush()

    def flush(self) -> None:
        if self._buf:
            self._file.pwrite(self._at, self._buf)  # replaced below, never changed after
            self._at += len(self._buf)
            self._buf = bytearray()


def _tier(count: int) -> int:
    return max(count, 1).bit_length() // 2  # tiers of four: floor(log4)
