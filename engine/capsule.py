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

import datetime as _dt
import hashlib
import math
import os
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import msgspec

from . import codecs
from . import format as fmt
from .errors import (
    CapsuleBroken,
    CapsuleClosed,
    CorruptionError,
    InvalidArgument,
    NotFound,
    ReadOnlyError,
    StorageError,
)
from .fileio import CapsuleFile, OsFile
from .log import read_meta, read_record, replay
from .table import FOREVER, FrameTable

MAX_PAYLOAD = 256 << 20
FANOUT = 4  # segments of one size tier merged together


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


class Options(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    level: int = codecs.DEFAULT_LEVEL  # zstd level for fresh blocks
    checkpoint_bytes: int = 8 << 20  # checkpoint when the tail grows past this
    checkpoint_frames: int = 4096  # ... or holds this many frames
    close_checkpoint_frames: int = 256  # close() checkpoints only a tail at least this big


def _options(kw: Mapping[str, Any]) -> Options:
    try:
        return msgspec.convert(dict(kw), Options)
    except msgspec.ValidationError as e:
        raise InvalidArgument(f"bad capsule option: {e}") from None


def create(path: str | os.PathLike[str], *, file_factory: Any = None, **options: Any) -> Capsule:
    """Make a new, empty capsule at ``path``; ``CapsuleExists`` if anything is there."""
    path = os.fspath(path)
    opts = _options(options)
    capsule_id = uuid.uuid4().bytes
    created = time.time()
    ckpt_raw = genesis(capsule_id)
    header = fmt.Header(1, capsule_id, created, fmt.LOG_START, len(ckpt_raw))
    slot = fmt.encode_header(header)
    initial = slot + slot + ckpt_raw  # both slots valid from the start [F-02]
    f = (file_factory or OsFile.create)(path, initial)
    return Capsule(f, header, readonly=False, opts=opts)


def open(  # noqa: A001 - the public name the API promises
    path: str | os.PathLike[str],
    readonly: bool = False,
    *,
    file_factory: Any = None,
    **options: Any,
) -> Capsule:
    """Open an existing capsule. Writers lock it; readonly opens share it with a writer."""
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
        return Capsule(f, header, readonly=readonly, opts=opts)
    except BaseException:
        f.close()
        raise


def read_header(f: CapsuleFile) -> fmt.Header:
    """The newest intact header slot [F-02]."""
    raw = f.pread(0, fmt.LOG_START)
    if len(raw) < fmt.HEADER.size:
        raise CorruptionError("file is shorter than its header", offset=0)
    good = fmt.decode_slots(raw)
    if not good:
        raise CorruptionError("both header slots are damaged", offset=0)
    return max(good, key=lambda h: h.generation)


def load_checkpoint(f: CapsuleFile, header: fmt.Header) -> tuple[fmt.CheckpointRecord, FrameTable]:
    """The checkpoint the header points at, and the frame table its segments hold."""
    ck_off = header.checkpoint_offset
    ckpt = read_meta(f, ck_off, fmt.CHECKPOINT, fmt.CheckpointRecord)
    if ckpt.capsule_id != header.capsule_id:
        raise CorruptionError("checkpoint belongs to another capsule", offset=ck_off)
    table = FrameTable()
    for ref in ckpt.segments:
        seg = read_meta(f, ref.offset, fmt.SEGMENT, fmt.SegmentRecord)
        if seg.first_id != ref.first_id or len(seg.frames) != ref.count:
            raise CorruptionError("segment does not match its checkpoint entry", offset=ref.offset)
        table.load_segment(seg.frames, seg.commits, ref.offset)
    if table.seq != ckpt.seq or table.next_id != ckpt.next_id:
        raise CorruptionError("checkpoint segments do not add up", offset=ck_off)
    return ckpt, table


def read_payload(f: CapsuleFile, m: fmt.FrameMeta) -> bytes:
    """A frame's payload bytes, checked against its digest."""
    if m.block < 0:
        return b""
    _, body = read_record(f, m.block, fmt.BLOCK)
    codec, _, _, _, raw_len = fmt.BLOCK_HEADER.unpack_from(body)
    raw = codecs.decode(codec, body[fmt.BLOCK_HEADER.size :], raw_len, offset=m.block)
    payload = raw[m.start : m.start + m.length]
    if hashlib.blake2b(payload, digest_size=16).digest() != m.digest:
        raise CorruptionError(f"payload of frame {m.id} fails its digest", offset=m.block)
    return payload


def genesis(capsule_id: bytes) -> bytes:
    """The first record of every capsule: the empty checkpoint at LOG_START [F-02]."""
    return fmt.encode_record(fmt.CHECKPOINT, fmt.pack(fmt.CheckpointRecord(capsule_id, 0, 0, 0, [], {})))


def _timestamp(value: Any) -> float:
    if value is None:
        return time.time()
    if isinstance(value, _dt.datetime):
        if value.tzinfo is None:
            raise InvalidArgument("timestamp datetime must be timezone-aware")
        return value.timestamp()
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    raise InvalidArgument(f"timestamp must be epoch seconds or an aware datetime, not {value!r}")


def _opt_str(name: str, value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise InvalidArgument(f"{name} must be a string, not {type(value).__name__}")


def _tags(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise InvalidArgument("tags must be a mapping of str to str")
    return dict(value)


class Capsule:
    """An open capsule. Thread-safe: one writer at a time inside, reads in parallel."""

    def __init__(self, f: CapsuleFile, header: fmt.Header, *, readonly: bool, opts: Options) -> None:
        self._file = f
        self._header = header
        self.path = f.path
        self.readonly = readonly
        self._opts = opts
        self._lock = threading.RLock()
        self._closed = False
        self._broken: str | None = None
        self.capsule_id = header.capsule_id
        self._pending: list[fmt.FrameMeta] = []
        self._pending_blocks: list[fmt.BlockRef] = []
        self._pending_live: dict[str, int | None] = {}  # uri -> pending live id (None: removed)
        self._pending_ended: set[int] = set()
        self._pending_counts: dict[str, int] = {}  # codec tallies of staged blocks
        self._checkpoint_failures = 0
        self._load()

    # -- opening ----------------------------------------------------------------------

    def _load(self) -> None:
        ckpt, table = load_checkpoint(self._file, self._header)
        self._table = table
        self._ckpt = ckpt
        self._ckpt_end = self._header.checkpoint_offset + self._header.checkpoint_length
        self._counters: dict[str, int] = dict(ckpt.counters)
        self._log_end = self._ckpt_end
        self._last_commit = ckpt.last_commit
        self._tail_frames = 0
        self._torn_bytes = 0
        self._catch_up()
        if not self.readonly and self._torn_bytes:
            # A torn tail is what a crash leaves; cut it so new records never sit before
            # stale bytes that a later scan could misread [F-06].
            self._file.truncate(self._log_end)
            self._file.sync()
            self._torn_bytes = 0
        self._write_end = self._log_end

    def _catch_up(self) -> int:
        """Apply commits that follow ``_log_end``; returns how many there were."""
        size = self._file.size()
        counted: dict[str, int] = {}

        def apply(rec: fmt.CommitRecord, offset: int) -> None:
            self._table.apply(rec, offset)
            self._count_commit(rec)
            self._tail_frames += len(rec.frames)

        for attempt in range(3):
            try:
                r = replay(self._file, self._log_end, size, self._table.seq, self._last_commit, apply)
                break
            except CorruptionError:
                # A reader can catch a writer mid-append and see later bytes before
                # earlier ones; look again before calling it corruption.
                if not self.readonly or attempt == 2:
                    raise
                size = self._file.size()
        for kind, n in r.record_bytes.items():
            counted[f"bytes.{kind}"] = n
        self._add_counters(counted)
        self._log_end = r.end
        self._last_commit = r.last_commit
        self._torn_bytes = r.torn_bytes
        return r.commits

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
    ) -> int:
        """Stage a frame; returns its id. Durable and visible after the next ``commit``.

        A ``uri`` that already has a live frame gets a new version that supersedes it.
        """
        if isinstance(data, str):
            payload, is_text = data.encode("utf-8", errors="surrogateescape"), True
        elif isinstance(data, (bytes, bytearray, memoryview)):
            payload, is_text = bytes(data), False
        else:
            raise InvalidArgument(f"payload must be str or bytes, not {type(data).__name__}")
        if len(payload) > MAX_PAYLOAD:
            raise InvalidArgument(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
        uri = _opt_str("uri", uri)
        if uri == "":
            raise InvalidArgument("uri must not be empty")
        if chunk is not None and (not isinstance(chunk, int) or chunk < 0):
            raise InvalidArgument("chunk must be a non-negative int")
        meta_args = dict(
            uri=uri, title=_opt_str("title", title), kind=_opt_str("kind", kind),
            tags=_tags(tags), timestamp=_timestamp(timestamp), parent=_opt_str("parent", parent),
        )
        codec, packed = codecs.encode(payload, self._opts.level)
        body = fmt.BLOCK_HEADER.pack(codec, 0, 0, 0, len(payload)) + packed
        record = fmt.encode_record(fmt.BLOCK, body)
        digest = hashlib.blake2b(payload, digest_size=16).digest()
        with self._lock:
            self._check_writable()
            offset = self._write_end
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
            return fid

    def _count_block(self, codec: int, raw: int, stored: int) -> None:
        name = codecs.NAMES[codec]
        for k, v in ((f"codec.{name}.blocks", 1), (f"codec.{name}.raw", raw), (f"codec.{name}.stored", stored)):
            self._pending_counts[k] = self._pending_counts.get(k, 0) + v

    def put_many(self, items: Iterable[Mapping[str, Any]]) -> list[int]:
        """``put`` each item (a dict with ``text`` or ``data`` plus put's keywords)."""
        ids = []
        for item in items:
            item = dict(item)
            if "text" in item:
                data = item.pop("text")
            elif "data" in item:
                data = item.pop("data")
            else:
                raise InvalidArgument("each item needs a 'text' or 'data' key")
            ids.append(self.put(data, **item))
        return ids

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

    def commit(self) -> int:
        """Make every staged frame durable with one fsync; returns the commit sequence."""
        with self._lock:
            self._check_writable()
            if not self._pending:
                return self._table.seq
            seq = self._table.seq + 1
            last_time = self._table.commit_times[-1] if self._table.commits else 0.0
            for m in self._pending:
                m.seq = seq
            rec = fmt.CommitRecord(seq, max(time.time(), last_time), self._last_commit, self._pending, self._pending_blocks)
            raw = fmt.meta_record(fmt.COMMIT, rec)
            offset = self._write_end
            try:
                self._file.pwrite(offset, raw)
                # The acknowledgement point: once this returns the commit survives a crash.
                self._file.sync()
            except StorageError:
                self._rollback()
                raise
            self._table.apply(rec, offset)
            self._count_commit(rec)
            self._add_counters({
                "bytes.commit": len(raw),
                "bytes.block": offset - self._log_end,
                **self._pending_counts,
            })
            self._pending_counts = {}
            self._tail_frames += len(self._pending)
            self._last_commit = offset
            self._log_end = self._write_end = offset + len(raw)
            self._clear_pending()
            if (
                self._tail_frames >= self._opts.checkpoint_frames
                or self._log_end - self._ckpt_end >= self._opts.checkpoint_bytes
            ):
                try:
                    self._checkpoint()
                except StorageError:
                    # The commit is durable already; a checkpoint only speeds up opening,
                    # so its failure must not be reported as a failed commit. It is
                    # retried after the next commit and counted in stats.
                    self._checkpoint_failures += 1
            return seq

    def rollback(self) -> None:
        """Discard every staged, uncommitted frame."""
        with self._lock:
            self._check_writable()
            self._rollback()

    def _rollback(self) -> None:
        self._clear_pending()
        self._pending_counts = {}
        try:
            self._file.truncate(self._log_end)
        except StorageError as e:
            # Stale bytes past the end could be misread by a later scan: refuse to go on.
            self._broken = f"could not cut the tail after a failed write: {e}"
        self._write_end = self._log_end

    def _clear_pending(self) -> None:
        self._pending = []
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

    def _checkpoint(self) -> None:
        t = self._table
        segments = list(self._ckpt.segments)
        new = [(self._ckpt.next_id, t.next_id - self._ckpt.next_id)]
        # Merge tiers: the newest segment swallows smaller-tier predecessors, and four
        # segments of one tier become one of the next tier.
        pending = [(s.first_id, s.count) for s in segments] + new
        keep = len(segments)
        while True:
            if len(pending) >= 2 and _tier(pending[-1][1]) > _tier(pending[-2][1]):
                n = 2
            elif len(pending) >= FANOUT and len({_tier(c) for _, c in pending[-FANOUT:]}) == 1:
                n = FANOUT
            else:
                break
            first = pending[-n][0]
            pending[-n:] = [(first, sum(c for _, c in pending[-n:]))]
            keep = min(keep, len(pending) - 1)
        dead = sum(s.length for s in segments[keep:])
        out = bytearray()
        refs = list(segments[:keep])
        pos = self._log_end
        for first, count in pending[keep:]:
            frames = t.frames[first : first + count]
            commits = t.commits[frames[0].seq - 1 : frames[-1].seq] if frames else []
            raw = fmt.meta_record(fmt.SEGMENT, fmt.SegmentRecord(first, frames, commits))
            refs.append(fmt.SegmentRef(pos, len(raw), first, count))
            out += raw
            pos += len(raw)
        counters = dict(self._counters)
        counters["bytes.segment"] = counters.get("bytes.segment", 0) + len(out)
        counters["bytes.dead"] = counters.get("bytes.dead", 0) + dead
        counters["checkpoints"] = counters.get("checkpoints", 0) + 1
        ckpt = fmt.CheckpointRecord(self.capsule_id, t.seq, t.next_id, self._last_commit, refs, counters, self._ckpt.extra)
        # The checkpoint counts its own bytes: encode once to learn the size (the count
        # itself may change the size by a byte or two, which stats can live with).
        counters["bytes.checkpoint"] = counters.get("bytes.checkpoint", 0) + len(fmt.meta_record(fmt.CHECKPOINT, ckpt))
        ck_raw = fmt.meta_record(fmt.CHECKPOINT, ckpt)
        ck_off = pos
        out += ck_raw
        try:
            self._file.pwrite(self._log_end, bytes(out))
            # Order matters: the header may only point at bytes already on disk.
            self._file.sync()
            h = self._header
            header = fmt.Header(h.generation + 1, h.capsule_id, h.created, ck_off, len(ck_raw))
            slot = fmt.SLOT_OFFSETS[header.generation % 2]  # never overwrite the live slot
            self._file.pwrite(slot, fmt.encode_header(header))
            self._file.sync()
        except StorageError:
            # The old header still points at the old checkpoint; the new records are
            # harmless garbage past the end, cut here or at the next open.
            self._rollback()
            raise
        self._header = header
        self._ckpt = ckpt
        self._counters = counters
        self._log_end = self._write_end = self._ckpt_end = ck_off + len(ck_raw)
        self._tail_frames = 0

    # -- reading ----------------------------------------------------------------------

    def get(
        self, frame_id: int | None = None, *, uri: str | None = None, as_of: Any = None
    ) -> Frame:
        """A frame by id, or the version of ``uri`` visible at ``as_of`` (default: now)."""
        with self._lock:
            self._check_open()
            seq = self._resolve_as_of(as_of)
            t = self._table
            if (frame_id is None) == (uri is None):
                raise InvalidArgument("get() takes exactly one of frame_id or uri")
            if frame_id is not None:
                if isinstance(frame_id, bool) or not isinstance(frame_id, int):
                    raise InvalidArgument("frame_id must be an int")
                if not 0 <= frame_id < t.next_id or t.frames[frame_id].seq > seq:
                    raise NotFound(f"no frame {frame_id}" + (f" as of commit {seq}" if as_of is not None else ""))
                fid = frame_id
                if t.frames[fid].op == fmt.TOMBSTONE:
                    raise NotFound(f"frame {fid} is a tombstone")
            else:
                found = t.at_uri(uri, seq)  # type: ignore[arg-type]
                if found is None:
                    raise NotFound(f"nothing at {uri!r}" + (f" as of commit {seq}" if as_of is not None else ""))
                fid = found
            meta = t.frames[fid]
            info = self._info(meta)
        return Frame(**msgspec.structs.asdict(info), payload=read_payload(self._file, meta))

    def timeline(
        self,
        *,
        since: Any = None,
        until: Any = None,
        limit: int = 100,
        reverse: bool = False,
        as_of: Any = None,
    ) -> list[FrameInfo]:
        """Frames visible at ``as_of`` ordered by event time, oldest first (or newest)."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise InvalidArgument("limit must be a non-negative int")
        lo = None if since is None else _timestamp(since)
        hi = None if until is None else _timestamp(until)
        with self._lock:
            self._check_open()
            seq = self._resolve_as_of(as_of)
            out = []
            if limit:
                for fid in self._table.timeline(seq, lo, hi, reverse):
                    out.append(self._info(self._table.frames[fid]))
                    if len(out) >= limit:
                        break
            return out

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
                "superseded_frames": len(t.ended) - c.get("frames.tombstone", 0),
                "uris": len(t.versions),
                "live_uris": len(t.live),
                "pending_frames": len(self._pending),
                "file_bytes": self._log_end,
                "bytes_by_kind": {
                    "header": fmt.LOG_START,
                    **{k: c.get(f"bytes.{k}", 0) for k in ("block", "commit", "segment", "checkpoint")},
                    "dead": c.get("bytes.dead", 0),
                },
                "payload_raw_bytes": c.get("payload.raw", 0),
                "codecs": codec_stats,
                "checkpoints": c.get("checkpoints", 0),
                "checkpoint_failures": self._checkpoint_failures,
                "segments": len(self._ckpt.segments),
                "wal_bytes": self._log_end - self._ckpt_end,
                "wal_frames": self._tail_frames,
            }

    @property
    def seq(self) -> int:
        """The last committed sequence number (0 for an empty capsule)."""
        return self._table.seq

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
        return self._table.seq_at_time(_timestamp(as_of))

    def _info(self, m: fmt.FrameMeta) -> FrameInfo:
        t = self._table
        end = t.ended.get(m.id, FOREVER)
        return FrameInfo(
            id=m.id, uri=m.uri, title=m.title, kind=m.kind, tags=m.tags, timestamp=m.timestamp,
            commit_seq=m.seq, commit_time=t.commit_times[m.seq - 1],
            valid_until=None if end == FOREVER else end, superseded_by=t.ended_by.get(m.id),
            supersedes=m.supersedes, parent=m.parent, chunk=m.chunk, length=m.length,
            is_text=m.is_text,
        )

    # -- pending-aware lookups (writer only) ----------------------------------------------

    def _live_id(self, uri: str) -> int | None:
        if uri in self._pending_live:
            return self._pending_live[uri]
        return self._table.live.get(uri)

    def _is_live(self, fid: int) -> bool:
        if fid in self._pending_ended:
            return False
        t = self._table
        if 0 <= fid < t.next_id:
            return t.frames[fid].op == fmt.PUT and fid not in t.ended
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
            try:
                if not self.readonly and not self._broken:
                    self.commit()
                    if self._tail_frames >= self._opts.close_checkpoint_frames:
                        self._checkpoint()
            finally:
                self._closed = True
                self._file.close()

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


def _tier(count: int) -> int:
    return max(count, 1).bit_length() // 2  # tiers of four: floor(log4)
