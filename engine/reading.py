"""Reading a capsule file: its header, its checkpoint, and frames' payloads through a
consistent view.

What readers hold is here: a ``View`` (a frame table and the file its locations point
into, with that file's block cache and dictionaries) and ``Views``, the current view and
the ones a compaction replaced that a reader still has pinned. Readers, ``verify`` and
compaction read through these; writing goes through ``engine/appender.py``.
"""

from __future__ import annotations

import hashlib
import threading
from typing import Any

from . import codecs
from . import format as fmt
from .cache import LRUCache
from .errors import CorruptionError
from .fileio import CapsuleFile
from .log import read_meta, read_record
from .table import FrameTable


def read_header(f: CapsuleFile) -> fmt.Header:
    """The newest intact header slot [F-02]."""
    raw = f.pread(0, fmt.LOG_START)
    if len(raw) < fmt.HEADER.size:
        raise CorruptionError("file is shorter than its header", offset=0)
    good = fmt.decode_slots(raw)
    if not good:
        raise CorruptionError("both header slots are damaged", offset=0)
    return max(good, key=lambda h: h.generation)


def load_checkpoint(
    f: CapsuleFile, header: fmt.Header, spill_dir: str | None = None
) -> tuple[fmt.CheckpointRecord, FrameTable]:
    """The checkpoint the header points at, and the frame table its segments hold
    (frame metadata spilled to ``spill_dir``, or kept in memory without one)."""
    ck_off = header.checkpoint_offset
    ckpt = read_meta(f, ck_off, fmt.CHECKPOINT, fmt.CheckpointRecord)
    if ckpt.capsule_id != header.capsule_id:
        raise CorruptionError("checkpoint belongs to another capsule", offset=ck_off)
    table = FrameTable(spill_dir)
    try:
        for ref in ckpt.segments:
            seg = read_meta(f, ref.offset, fmt.SEGMENT, fmt.SegmentRecord)
            if seg.first_id != ref.first_id or len(seg.frames) != ref.count:
                raise CorruptionError("segment does not match its checkpoint entry", offset=ref.offset)
            table.load_segment(seg.frames, seg.commits, ref.offset)
    except BaseException:
        table.close()
        raise
    upgrades = ckpt.extra.get("codec", {})
    table.dicts = {int(k): v for k, v in upgrades.get("dicts", {}).items()}
    table.upgraded_upto = upgrades.get("upto", 0)
    table.dict_trained_at = upgrades.get("trained_at", 0)
    if table.seq != ckpt.seq or table.next_id != ckpt.next_id:
        raise CorruptionError("checkpoint segments do not add up", offset=ck_off)
    return ckpt, table


class Dictionaries:
    """The compression dictionaries of one capsule file [F-16], loaded on first use."""

    def __init__(self, f: CapsuleFile, table: FrameTable) -> None:
        self._file = f
        self._table = table
        self._loaded: dict[int, Any] = {}

    def __call__(self, dict_id: int) -> Any:
        d = self._loaded.get(dict_id)
        if d is None:
            offset = self._table.dicts.get(dict_id)
            if offset is None:
                raise CorruptionError(f"a block names dictionary {dict_id}, which the capsule lacks")
            _, body = read_record(self._file, offset, fmt.DICT)
            (stored_id,) = fmt.DICT_HEADER.unpack_from(body)
            if stored_id != dict_id:
                raise CorruptionError(f"dictionary {dict_id} record holds id {stored_id}", offset=offset)
            d = self._loaded[dict_id] = codecs.load_dict(body[fmt.DICT_HEADER.size :], offset=offset)
        return d

    def add(self, dict_id: int, loaded: Any) -> None:
        """A dictionary just written (its record is in the table once relocated)."""
        self._loaded[dict_id] = loaded


def read_block(f: CapsuleFile, offset: int, dicts: Dictionaries | None = None) -> bytes:
    """The decoded bytes of the BLOCK record at ``offset``."""
    _, body = read_record(f, offset, fmt.BLOCK)
    codec, _, _, dict_id, raw_len = fmt.BLOCK_HEADER.unpack_from(body)
    zdict = dicts(dict_id) if dict_id and dicts is not None else None
    return codecs.decode(codec, body[fmt.BLOCK_HEADER.size :], raw_len, offset=offset, zdict=zdict)


def read_payload(
    f: CapsuleFile, m: fmt.FrameMeta, blocks: LRUCache | None = None, dicts: Dictionaries | None = None,
) -> bytes:
    """A frame's payload bytes, checked against its digest."""
    if m.block < 0:
        return b""
    raw = blocks.get(m.block) if blocks is not None else None
    if raw is None:
        raw = read_block(f, m.block, dicts)
        if blocks is not None:
            blocks.put(m.block, raw)
    payload = raw[m.start : m.start + m.length]
    if hashlib.blake2b(payload, digest_size=16).digest() != m.digest:
        raise CorruptionError(f"payload of frame {m.id} fails its digest", offset=m.block)
    return payload


class View:
    """One consistent way to read frames: a frame table and the file its locations
    point into, with that file's block cache and dictionaries.

    A compaction's switch makes a new file, a new table and new caches, and replaces the
    capsule's view with one assignment. A reader pins the view current when it starts
    (``Views.pin``) and reads every location through it, so a location from one
    file never meets the bytes of another, however the threads interleave. A replaced
    view stays open until its last reader lets go, then gives back its table's spill
    file and the old file's descriptor (and with it the old file's disk space)."""

    __slots__ = ("table", "file", "blocks", "dicts", "pins", "retired")

    def __init__(self, table: FrameTable, f: CapsuleFile, blocks: LRUCache, dicts: Dictionaries) -> None:
        self.table = table
        self.file = f
        self.blocks = blocks
        self.dicts = dicts
        self.pins = 0  # readers using it (guarded by Views' lock)
        self.retired = False  # a compaction replaced it: close when pins reach 0

    def payload(self, m: fmt.FrameMeta) -> bytes:
        return read_payload(self.file, m, self.blocks, self.dicts)

    def text(self, m: fmt.FrameMeta) -> str:
        return self.payload(m).decode("utf-8", errors="replace")

    def close(self) -> None:
        self.table.close()
        self.file.close()


class Views:
    """The current ``View`` and the replaced ones readers still hold. A reader pins the
    current view (under the capsule lock, so that it matches the table just read from)
    and unpins it when done; a compaction's switch replaces the current view, and a
    replaced one is closed as soon as no reader holds it."""

    def __init__(self) -> None:
        self.current: View | None = None
        self._retired: list[View] = []  # replaced, still pinned by a reader
        self._lock = threading.Lock()

    def pin(self) -> View:
        with self._lock:
            view = self.current
            assert view is not None
            view.pins += 1
        return view

    def unpin(self, view: View) -> None:
        with self._lock:
            view.pins -= 1
            last = view.retired and view.pins == 0
            if last:
                self._retired.remove(view)
        if last:
            view.close()

    def replace(self, view: View) -> None:
        """Make ``view`` current; close the old one now, or when its last reader is done."""
        with self._lock:
            old, self.current = self.current, view
            idle = old is None or old.pins == 0
            if old is not None:
                old.retired = True
                if not idle:
                    self._retired.append(old)
        if old is not None and idle:
            old.close()

    def close(self) -> None:
        """Close every view (the capsule is closing): a reader still on one fails."""
        with self._lock:
            views = [v for v in (self.current, *self._retired) if v is not None]
            self._retired = []
        for view in views:
            view.close()
