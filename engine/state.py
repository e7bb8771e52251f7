"""What an open capsule knows, and how it learns it: opening and catching up.

``CapsuleState`` is the one object the capsule's parts share (``engine/capsule.py`` wires
them): the appender (file, header, where the log ends), the frame table and the view
readers pin, the last checkpoint, the counters stats report, the stored vectors' places,
the expiry set and the search indexes once opened. Its ``lock`` guards all of it: a part
changes the state only while holding it. ``load`` reads the state from the file (the
header's checkpoint, then the commits after it); ``catch_up`` applies commits another
writer made since (readonly opens) [F-08].
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from . import codecs, retention
from . import format as fmt
from .appender import Appender
from .cache import LRUCache
from .embed import Embedder, cache_root
from .errors import CapsuleBroken, CapsuleClosed, CorruptionError, InvalidArgument, ReadOnlyError
from .fileio import CapsuleFile
from .indexes import Indexes
from .log import Replay, read_record, replay
from .metadata import to_epoch
from .ramcopies import ram_root
from .reading import Dictionaries, View, Views, load_checkpoint
from .table import FrameTable
from .vectors import unpack_vectors


class Options(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A capsule's tuning, given as keywords to ``create`` and ``open``."""

    level: int = codecs.DEFAULT_LEVEL  # zstd level for fresh blocks
    checkpoint_bytes: int = 8 << 20  # checkpoint when the tail grows past this
    checkpoint_frames: int = 4096  # ... or holds this many frames
    close_checkpoint_frames: int = 256  # close() checkpoints only a tail at least this big
    index_dir: str | None = None  # where index working copies live (default: the user cache)
    result_cache_bytes: int = 16 << 20
    block_cache_bytes: int = 32 << 20
    embed_batch: int = 32  # frames per background embedding step


class CapsuleState:
    """The shared state of one open capsule; see the module docstring."""

    def __init__(self, f: CapsuleFile, header: fmt.Header, *, readonly: bool, opts: Options) -> None:
        self.path = f.path
        # Compaction writes the file the path named at open: through a symlink, its
        # target, which must stay a symlink's target, not be replaced by a copy.
        self.real_path = os.path.realpath(f.path)
        self.readonly = readonly
        self.opts = opts
        self.lock = threading.RLock()
        self.closed = False
        self.capsule_id = header.capsule_id
        self.encrypted = bool(header.flags & fmt.HEADER_ENCRYPTED)
        self.clock = time.time  # what "now" is for expiry (tests move it)
        self.app = Appender(f, header, 0)
        self.views = Views()  # what readers pin; compaction's switch replaces the current one
        self.blocks = LRUCache(opts.block_cache_bytes, size=len)
        self.table: FrameTable  # set by load (and by each compaction's switch)
        self.dicts: Dictionaries
        self.fresh_dict: tuple[int, Any] | None = None  # the dictionary fresh small puts use [F-16]
        self.ckpt: fmt.CheckpointRecord
        self.ckpt_end = 0
        self.counters: dict[str, int] = {}
        self.tail_frames = 0  # frames committed since the last checkpoint
        self.last_commit = 0  # offset of the last COMMIT record
        self.torn_bytes = 0
        self.checkpoint_failures = 0
        self.vec: dict[str, Any] | None = None  # the vector binding: model, dim, records, bitmap
        self.vec_refs: list[list[int]] = []  # [offset, count] of every VECTORS record
        self.ckpt_vec_refs = 0  # how many of those the last checkpoint listed
        self.has_vec = bytearray()  # per frame id: 1 if it has a stored vector
        self.ready_vectors: dict[int, np.ndarray] = {}  # vectors not yet written
        self.expiry = retention.Expiry()
        self.expiry_rules_seq = 0
        self.indexes: Indexes | None = None
        self.embedder: Embedder | None = None

    @property
    def file(self) -> CapsuleFile:
        return self.app.file

    @property
    def header(self) -> fmt.Header:
        return self.app.header

    # -- checks -------------------------------------------------------------------------

    def check_open(self) -> None:
        if self.closed:
            raise CapsuleClosed(f"{self.path} is closed")

    def check_writable(self) -> None:
        self.check_open()
        if self.readonly:
            raise ReadOnlyError(f"{self.path} was opened readonly")
        if self.app.broken:
            raise CapsuleBroken(f"{self.path}: {self.app.broken}; reopen it")

    # -- the reader's view [F-17] ------------------------------------------------------

    @contextlib.contextmanager
    def reading(self) -> Iterator[View]:
        """Pin the current view for a read that does not hold the lock."""
        with self.lock:
            view = self.views.pin()
        try:
            yield view
        finally:
            self.views.unpin(view)

    def text_of(self, m: fmt.FrameMeta) -> str:
        """``m``'s text through the current view (callers hold the lock)."""
        view = self.views.current
        assert view is not None
        return view.text(m)

    def resolve_as_of(self, as_of: Any) -> int:
        """The commit seq ``as_of`` names: a seq, a time, or None for the head."""
        head = self.table.seq
        if as_of is None:
            return head
        if isinstance(as_of, bool):
            raise InvalidArgument("as_of must be a commit seq (int) or a timestamp")
        if isinstance(as_of, int):
            if not 0 <= as_of <= head:
                raise InvalidArgument(f"as_of commit {as_of} is outside 0..{head}")
            return as_of
        return self.table.seq_at_time(to_epoch(as_of))

    # -- opening and catching up [F-08] ------------------------------------------------

    def spill_dir(self) -> str | None:
        """Where the frame table keeps frame metadata: the index directory (disk); for an
        encrypted capsule, RAM-backed storage or nowhere (memory) [F-19]."""
        if self.encrypted:
            ram = ram_root()
            return None if ram == cache_root() else str(ram / "frames")
        return str((Path(self.opts.index_dir) if self.opts.index_dir else cache_root()) / "frames")

    def load(self) -> None:
        """Read the state from the file: the header's checkpoint, then the commits after."""
        app = self.app
        ckpt, table = load_checkpoint(app.file, app.header, self.spill_dir())
        self.table = table
        self.dicts = Dictionaries(app.file, table)
        self.fresh_dict = (max(table.dicts), self.dicts(max(table.dicts))) if table.dicts else None
        self.views.replace(View(table, app.file, self.blocks, self.dicts))
        self.ckpt = ckpt
        self.ckpt_end = app.header.checkpoint_offset + app.header.checkpoint_length
        self.counters = dict(ckpt.counters)
        self.vec = ckpt.extra.get("vec")
        if self.vec is not None:
            self.vec_refs = [list(r) for r in self.vec.get("records", [])]
            self.ckpt_vec_refs = len(self.vec_refs)
            self.has_vec = bytearray(self.vec.get("bitmap", b""))
        app.log_end = app.write_end = self.ckpt_end
        self.last_commit = ckpt.last_commit
        self.tail_frames = 0
        self.torn_bytes = 0
        self.expiry.reset(table, self.current_rules(), self.clock())
        self.expiry_rules_seq = table.rule_changes[-1][0] if table.rule_changes else 0
        self.catch_up()
        if not self.readonly and self.torn_bytes:
            app.drop_torn_tail()  # what a crash leaves [F-06]
            self.torn_bytes = 0
        h = app.header
        if not self.readonly and (h.read_version, h.write_version) < (fmt.READ_VERSION, fmt.WRITE_VERSION):
            # This writer adds records an older reader would misread: say so first [F-03].
            app.write_header(h.next(read_version=fmt.READ_VERSION, write_version=fmt.WRITE_VERSION))

    def catch_up(self) -> int:
        """Apply commits that follow the log's end; returns how many there were."""
        size = self.file.size()
        commits = 0

        def apply(rec: fmt.CommitRecord, offset: int) -> None:
            self.table.apply(rec, offset)
            self.count_commit(rec)
            self.tail_frames += len(rec.frames)
            if self.indexes is not None:  # a reader refreshing after opening its indexes
                self.indexes.on_commit(self.table, rec.frames, {}, self.text_of)

        def relocate(rec: fmt.RelocateRecord, offset: int) -> None:
            self.table.relocate(rec, offset)
            self.add_counters(rec.counters)

        for attempt in range(3):
            try:
                r = replay(self.file, self.app.log_end, size, self.table.seq, self.last_commit,
                           self.table.upgraded_upto, apply, relocate)
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
                size = self.file.size()
        raise AssertionError("unreachable")

    def _replayed(self, r: Replay) -> int:
        """Take in what ``replay`` applied: counters, vectors, where the log ends."""
        self.add_counters({f"bytes.{kind}": n for kind, n in r.record_bytes.items()})
        self.has_vec.extend(bytes(self.table.next_id - len(self.has_vec)))
        for offset in r.vectors:  # vectors committed after the checkpoint
            ids, vectors = self.read_vectors(offset)
            self.vec_refs.append([offset, len(ids)])
            for fid in ids:
                self.has_vec[fid] = 1
            if self.indexes is not None:
                self.indexes.add_vectors(ids, vectors)
        self.app.log_end = self.app.write_end = r.end
        self.last_commit = r.last_commit
        self.torn_bytes = r.torn_bytes
        if r.commits:
            self.track_expiry(self.table.frames[self.expiry.seen :])
        return r.commits

    def read_vectors(self, offset: int) -> tuple[list[int], np.ndarray]:
        """The ids and rows of the VECTORS record at ``offset``."""
        rh, body = read_record(self.file, offset, fmt.VECTORS)
        rec = fmt.meta_body(rh, body, fmt.VectorsRecord, offset=offset)
        assert self.vec is not None
        rows = unpack_vectors(rec.data, self.vec["dim"])
        if len(rows) != len(rec.ids):
            raise CorruptionError("vector count does not match ids", offset=offset)
        return rec.ids, rows

    # -- counters ------------------------------------------------------------------------

    def count_commit(self, rec: fmt.CommitRecord) -> None:
        c = self.counters
        c["frames.put"] = c.get("frames.put", 0) + sum(f.op == fmt.PUT for f in rec.frames)
        c["frames.tombstone"] = c.get("frames.tombstone", 0) + sum(f.op == fmt.TOMBSTONE for f in rec.frames)
        c["payload.raw"] = c.get("payload.raw", 0) + sum(f.length for f in rec.frames)

    def add_counters(self, extra: Mapping[str, int]) -> None:
        for k, v in extra.items():
            self.counters[k] = self.counters.get(k, 0) + v

    # -- retention [F-24] ---------------------------------------------------------------

    def current_rules(self) -> retention.Rules:
        t = self.table
        return retention.parse(t.rule_changes[-1][1]) if t.rule_changes else retention.Rules()

    def track_expiry(self, frames: list[fmt.FrameMeta]) -> None:
        """Keep the expired set current after commits (a rule change starts it over)."""
        t = self.table
        last_change = t.rule_changes[-1][0] if t.rule_changes else 0
        if last_change != self.expiry_rules_seq:
            self.expiry_rules_seq = last_change
            fresh = self.expiry.reset(t, self.current_rules(), self.clock())
        else:
            fresh = self.expiry.add(t, frames, self.clock())
        self._forget(fresh)

    def expire_due(self) -> None:
        """Expire what has come due by now (lock held): a heap peek when nothing is."""
        self._forget(self.expiry.due(self.table, self.clock()))

    def _forget(self, ids: list[int]) -> None:
        if ids and self.indexes is not None:
            self.indexes.forget(ids)

    def expired(self, fid: int) -> bool:
        return fid in self.expiry.expired
