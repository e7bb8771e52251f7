"""Rewriting a capsule's history into a new file: compaction and branches.

``Rewriter`` replays a capsule's commits, in order, into a fresh file that no one else
sees yet (``O_TMPFILE``): the same frames (ids, versions, validity, event and commit
times) and the same stored vectors, but payloads regrouped into upgraded blocks (frames
that a codec upgrade already moved keep their block, copied as it is) and none of the
dead bytes: superseded segments and checkpoints, old copies of the lexical index,
blocks an upgrade replaced. The new file holds only COMMIT, BLOCK, VECTORS, DICT,
RELOCATE and LEXFILE records, so it is valid by the same rules as any capsule [F-17];
commits name no blocks there, because the file is complete and synced before it gets a
name.

A rewrite must never be bigger than what it replaces, so it writes each thing once in
its final shape: the vectors of a window of commits go into one VECTORS record (small
records would be folded again by the next checkpoint, doubling their bytes), and the
lexical index copy that the source's checkpoint names is carried over as it is (a fresh
copy of the working index may be larger, and a capsule without one must rebuild it).

``Compactor`` drives it for ``Capsule.compact`` (the rewrite replaces the file, while
puts and queries go on) and ``Capsule.branch`` (the rewrite is a new capsule).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import os
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import msgspec

from . import codecs, crypto
from . import format as fmt
from .appender import Appender
from .cache import LRUCache
from .checkpoint import Checkpointer
from .errors import Cancelled, CapsuleExists, InvalidArgument, StorageError
from .fileio import CAPSULE_MODE, OsFile, fsync_dir, link_unnamed
from .genesis import genesis, genesis_extra, new_header
from .indexes import fingerprint
from .log import read_meta, read_record
from .reading import read_header
from .retention import PURGED
from .staging import Writer
from .state import CapsuleState
from .upgrader import Upgrader, read_and_encode

FLUSH_BYTES = 4 << 20
WINDOW_FRAMES = 1024  # frames re-encoded per step (bounds memory, not the result)


class Rewriter:
    """Writes commits ``1..n`` of ``src`` into ``out``; call ``copy`` for consecutive
    ranges, then ``finish``. ``out`` is an unnamed, locked file (``unnamed``). It reads
    the source's frame table as it grows: commits made meanwhile can be copied next."""

    def __init__(self, src: CapsuleState, out: OsFile, header: fmt.Header, genesis: bytes) -> None:
        """``header`` and ``genesis`` start the new file (``genesis.new_header``), and
        ``out.sealer`` seals its records when it is to be encrypted."""
        self.src = src
        self.out = out
        self.sealer = out.sealer
        slot = fmt.encode_header(header)
        self.pos = fmt.LOG_START
        self.buf = bytearray(slot + slot)
        self._append(genesis)
        self.seq = 0
        self.next_id = 0
        self.last_commit = 0
        self.blocks: dict[int, int] = {}  # source block offset -> offset here
        self.dicts: dict[int, Any] = {}  # dictionary id -> loaded dictionary
        self.stats = {"frames": 0, "commits": 0, "blocks_copied": 0, "blocks_encoded": 0, "purged": 0}
        c = src.counters
        self.counters = {k: c.get(k, 0) for k in ("upgrade.frames", "upgrade.blocks", "upgrade.saved")}
        self.last_user: dict[int, int] | None = None  # block -> last frame in it (branches)
        self.tainted: set[int] = set()
        self._vec_ids: list[int] = []  # vectors of the window's commits, written with its last
        self._vec_rows: list[bytes] = []

    def _put(self, kind: int, body: bytes) -> int:
        """Append a record (sealed at its offset when encrypted); returns the offset and
        leaves its body CRC in ``last_crc``."""
        raw = fmt.encode_record(kind, body, sealer=self.sealer, offset=self.pos)
        self.last_crc = fmt.decode_record_header(raw).body_crc  # type: ignore[union-attr]
        return self._append(raw)

    def _put_meta(self, kind: int, obj: Any) -> int:
        return self._append(fmt.meta_record(kind, obj, sealer=self.sealer, offset=self.pos))

    def _append(self, raw: bytes) -> int:
        at = self.pos
        self.buf += raw
        self.pos += len(raw)
        if len(self.buf) >= FLUSH_BYTES:
            self.flush()
        return at

    def flush(self) -> None:
        if self.buf:
            self.out.pwrite(self.pos - len(self.buf), bytes(self.buf))
            self.buf = bytearray()

    def copy_dicts(self) -> None:
        """Carry the source's dictionaries over, named by a RELOCATE at commit 0."""
        t = self.src.table
        refs = []
        for dict_id, offset in sorted(t.dicts.items()):
            _, body = read_record(self.src.file, offset, fmt.DICT)
            refs.append(self._dict_record(dict_id, body))
            self.dicts[dict_id] = self.src.dicts(dict_id)
        if refs:
            self._relocate([], refs, upto=0)

    def _dict_record(self, dict_id: int, body: bytes) -> fmt.DictRef:
        at = self._put(fmt.DICT, body)
        return fmt.DictRef(dict_id, at, self.last_crc)

    def _relocate(self, moves: list[fmt.Move], dicts: list[fmt.DictRef], *, upto: int,
                  counters: dict[str, int] | None = None) -> None:
        rec = fmt.RelocateRecord(self.seq, upto, moves, [], dicts, counters or {})
        self._put_meta(fmt.RELOCATE, rec)

    def limit(self, last_seq: int) -> None:
        """This copy stops at commit ``last_seq`` (a branch): an upgraded block that also
        holds later frames is re-encoded, so no later content reaches the copy."""
        self.last_user = {}
        for m in self.src.table.frames:
            if m.block >= 0:
                self.last_user[m.block] = m.id
        self.end_id = self.src.table.first_after(last_seq)

    def _count(self, codec: int, raw: int, stored: int) -> None:
        name = codecs.NAMES[codec]
        for k, v in (("blocks", 1), ("raw", raw), ("stored", stored)):
            self.counters[f"codec.{name}.{k}"] = self.counters.get(f"codec.{name}.{k}", 0) + v

    def copy(self, last_seq: int, *, level: int, cancel: threading.Event | None = None) -> None:
        """Copy the source's commits after ``self.seq`` up to ``last_seq``; ``Cancelled``
        as soon as ``cancel`` is set (checked between windows of ~1,000 frames)."""
        t = self.src.table
        # Blocks that hold an expired frame are re-encoded without it, never copied.
        self.tainted = {t.frames[f].block for f in list(self.src.expiry.expired) if t.frames[f].block >= 0}
        while self.seq < last_seq:
            # A window of whole commits, about WINDOW_FRAMES frames.
            _check(cancel)
            hi = self.seq + 1
            while hi < last_seq and t.first_after(hi) - self.next_id < WINDOW_FRAMES:
                hi += 1
            end_id = t.first_after(hi)
            frames = t.frames[self.next_id : end_id]
            where = self._payloads(frames, level)
            for s in range(self.seq + 1, hi + 1):
                self._commit(s, where, last=s == hi)
        _check(cancel)

    def _payloads(self, frames: list[fmt.FrameMeta], level: int) -> dict[int, tuple[int, int]]:
        """Write the blocks of ``frames``; returns frame id -> (block offset, start) here."""
        src = self.src
        upto = src.table.upgraded_upto
        lu = self.last_user
        expired = src.expiry.expired
        frames = [m for m in frames if m.id not in expired]  # their payloads are dropped [F-24]
        fresh = [m for m in frames if m.id >= upto or m.block in self.tainted
                 or (lu is not None and lu.get(m.block, -1) >= self.end_id)]
        zdict = (max(self.dicts), self.dicts[max(self.dicts)]) if self.dicts else None
        new_dict, encoded = read_and_encode(src.file, src.dicts, fresh, zdict, level, src.opts.level,
                                            next_dict=max(self.dicts, default=0) + 1)
        if new_dict is not None:
            dict_id = new_dict[0]
            ref = self._dict_record(dict_id, fmt.DICT_HEADER.pack(dict_id) + new_dict[1])
            self.dicts[dict_id] = new_dict[2]
            self._relocate([], [ref], upto=self.next_id)
        where: dict[int, tuple[int, int]] = {}
        for e in encoded:
            at = self._put(fmt.BLOCK, e.body)
            self._count(e.codec, e.raw_length, len(e.body) - fmt.BLOCK_HEADER.size)
            self.counters["upgrade.frames"] += len(e.group.frames)
            self.counters["upgrade.blocks"] += 1
            self.counters["upgrade.saved"] += sum(e.group.old_blocks.values()) - len(e.body) - fmt.RECORD_SIZE
            start = 0
            for m in e.group.frames:
                where[m.id] = (at, start)
                start += m.length
            self.stats["blocks_encoded"] += 1
        for m in frames:
            if m.block < 0 or m.id in where:
                continue
            copied = self.blocks.get(m.block)
            if copied is None:  # a block already upgraded, or one not worth re-encoding
                _, body = read_record(src.file, m.block, fmt.BLOCK)
                copied = self.blocks[m.block] = self._put(fmt.BLOCK, body)
                codec, _, _, _, raw_len = fmt.BLOCK_HEADER.unpack_from(body)
                self._count(codec, raw_len, len(body) - fmt.BLOCK_HEADER.size)
                self.stats["blocks_copied"] += 1
            where[m.id] = (copied, m.start)
        return where

    def _commit(self, seq: int, where: dict[int, tuple[int, int]], *, last: bool) -> None:
        """Copy commit ``seq``; its vectors wait for the window's ``last`` commit."""
        src = self.src
        info = src.table.commits[seq - 1]
        rec = read_meta(src.file, info.offset, fmt.COMMIT, fmt.CommitRecord)
        expired = src.expiry.expired
        frames = []
        for m in src.table.frames[self.next_id : src.table.first_after(seq)]:
            if m.id in expired and m.op == fmt.PUT:
                # Purged: the frame keeps its id and place in history, not its content.
                frames.append(msgspec.structs.replace(m, block=PURGED, start=0, length=0, digest=b"",
                                                      title=None, tags={}))
                self.stats["purged"] += 1
                continue
            block, start = where.get(m.id, (-1, 0))
            frames.append(msgspec.structs.replace(m, block=block, start=start))
        for ref in rec.vectors:
            rh, body = read_record(src.file, ref.offset, fmt.VECTORS)
            stored = fmt.meta_body(rh, body, fmt.VectorsRecord, offset=ref.offset)
            if stored.ids:
                width = len(stored.data) // len(stored.ids)
                for n, fid in enumerate(stored.ids):
                    if fid not in expired:
                        self._vec_ids.append(fid)
                        self._vec_rows.append(stored.data[n * width : (n + 1) * width])
        vectors = []
        if last and self._vec_ids:
            at = self._put(fmt.VECTORS, fmt.pack(fmt.VectorsRecord(self._vec_ids, b"".join(self._vec_rows))))
            vectors.append(fmt.BlockRef(at, self.last_crc))
            self._vec_ids, self._vec_rows = [], []
        if not frames and not vectors and rec.rewind is None and rec.rules is None:
            vectors = self._keep_commit()
        out = fmt.CommitRecord(seq, info.time, self.last_commit, frames, [], vectors, rec.rewind, rec.rules)
        self.last_commit = self._put_meta(fmt.COMMIT, out)
        self.seq = seq
        self.next_id += len(frames)
        self.stats["frames"] += len(frames)
        self.stats["commits"] += 1

    def _keep_commit(self) -> list[fmt.BlockRef]:
        """A commit that only carried vectors of frames now purged would be empty, which
        the format forbids [F-10]: it keeps its place in history with an empty VECTORS."""
        at = self._put(fmt.VECTORS, fmt.pack(fmt.VectorsRecord([], b"")))
        return [fmt.BlockRef(at, self.last_crc)]

    def copy_lexfiles(self, stored: dict[str, Any] | None) -> dict[str, Any] | None:
        """Carry the source checkpoint's copy of the lexical index over (``stored``: its
        ``extra["lex"]``); returns the same entry with the offsets here."""
        if not stored:
            return None
        files = {}
        for name, (offset, length) in stored["files"].items():
            _, body = read_record(self.src.file, offset, fmt.LEXFILE)
            files[name] = [self._put(fmt.LEXFILE, body), length]
        return {**stored, "files": files}

    def finish(self) -> int:
        """Mark every frame as considered by upgrades, flush and fsync; returns the size."""
        self._relocate([], [], upto=self.next_id, counters=self.counters)  # stats travel with the data
        self.flush()
        self.out.sync()
        return self.pos


class Compactor:
    """Compaction and branches of one open capsule."""

    def __init__(self, state: CapsuleState, writer: Writer, upgrader: Upgrader, checkpointer: Checkpointer) -> None:
        self._s = state
        self._writer = writer
        self._upgrader = upgrader
        self._checkpointer = checkpointer

    def compact(self, *, level: int, cancel: threading.Event | None) -> dict[str, Any]:
        """See ``Capsule.compact``."""
        s = self._s
        s.check_writable()
        if not isinstance(s.file, OsFile):
            raise InvalidArgument("compaction needs a capsule on a real file")
        real = s.real_path
        directory = os.path.dirname(real)
        with self._upgrader.lock:
            before = s.app.log_end
            out = unnamed(directory)
            try:
                with s.lock:
                    s.check_writable()
                    src = s.file
                    assert isinstance(src, OsFile)
                    out.keep_mode_of(src)
                    # The same capsule (id, key slot, data key): only the bytes change.
                    out.sealer = src.sealer
                    h = s.header
                    first = genesis(s.capsule_id, genesis_extra(s.ckpt.extra), out.sealer)
                    start = fmt.Header(1, h.capsule_id, h.created, fmt.LOG_START, len(first),
                                       flags=h.flags, keyslot=h.keyslot)
                    w = Rewriter(s, out, start, first)
                    w.copy_dicts()
                    snapshot = s.table.seq
                w.copy(snapshot, level=level, cancel=cancel)
                with self._quiet():
                    w.copy(s.table.seq, level=level)
                    lex = w.copy_lexfiles(s.ckpt.extra.get("lex"))
                    w.finish()
                    if not src.still_at(real):
                        raise StorageError("compact", real, OSError(
                            errno.ESTALE, "the capsule file was moved or replaced while open; not compacting"))
                    link_unnamed(out, real + ".compacting", replace=real)
                    fsync_dir(directory)
                    rewritten = out.size()
                    self._switch(out)
                    if lex is not None:  # the same commits, at new offsets
                        s.ckpt.extra["lex"] = {**lex, "fingerprint": fingerprint(s.table, lex["seq"])}
                    # Only what indexes the frames for a fast open: copying the lexical
                    # index is the next checkpoint's business, not a compaction's.
                    self._checkpointer.checkpoint(lex="keep")
            except BaseException:
                if out is not s.file:
                    out.close()
                raise
            return {"bytes_before": before, "bytes_after": s.app.log_end,
                    "checkpoint_bytes": s.app.log_end - rewritten, **w.stats}

    def branch(
        self, path: str, *, as_of: Any, passphrase: str | bytes | None, kdf: crypto.KdfParams | None,
        level: int, origin: bool,
    ) -> dict[str, Any]:
        """Write the branch file (see ``Capsule.branch``); its indexes are the caller's."""
        s = self._s
        if os.path.lexists(path):
            raise CapsuleExists(f"{path} already exists")
        with self._upgrader.lock:
            with s.lock:
                s.check_open()
                seq = s.resolve_as_of(as_of)
                if as_of is not None and seq == 0:  # a branch of nothing: surely not what was meant
                    raise InvalidArgument(_before_first_commit(as_of, s.table.commit_times[:1]))
                extra = genesis_extra(s.ckpt.extra)
                if origin:
                    extra["origin"] = {
                        "capsule_id": uuid.UUID(bytes=s.capsule_id).hex, "path": os.path.abspath(s.path),
                        "seq": seq, "time": s.table.commit_times[seq - 1] if seq else s.header.created,
                    }
            header, sealer, first = new_header(uuid.uuid4().bytes, extra, passphrase, kdf)  # Argon2id: unlocked
            with s.lock:
                out = unnamed(os.path.dirname(os.path.abspath(path)))
                out.sealer = sealer
                w = Rewriter(s, out, header, first)
                w.limit(seq)
                w.copy_dicts()
            try:
                w.copy(seq, level=level)
                w.finish()
                link_unnamed(out, path)
                fsync_dir(os.path.dirname(os.path.abspath(path)))
            finally:
                out.close()
        return {"path": path, "seq": seq, **w.stats}

    @contextlib.contextmanager
    def _quiet(self, timeout: float = 30.0) -> Iterator[None]:
        """Hold the lock at a moment when nothing is staged (a writer thread may be
        between its puts and its commit: let it finish rather than switch under it)."""
        s = self._s
        deadline = time.monotonic() + timeout
        while True:
            with s.lock:
                s.check_writable()
                if not self._writer.pending:
                    yield
                    return
            if time.monotonic() > deadline:
                raise Cancelled("compaction gave up: staged puts were not committed within 30 s; "
                                "the capsule is unchanged")
            time.sleep(0.001)

    def _switch(self, f: OsFile) -> None:
        """Continue on the rewritten file ``f`` (lock held). Readers still using the old
        file finish on it through the view they pinned; it closes when they are done."""
        s = self._s
        indexes = s.indexes
        f.path = s.path
        s.app = Appender(f, read_header(f), 0)
        s.indexes = None  # the same frames: keep them, but do not feed them the replay
        s.blocks = LRUCache(s.opts.block_cache_bytes, size=len)
        s.load()
        s.indexes = indexes
        if indexes is not None:
            indexes.blocks = s.blocks


def _check(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("compaction cancelled; the capsule is unchanged")


def unnamed(directory: str) -> OsFile:
    """A new, locked file in ``directory`` with no name yet (see ``OsFile.create``)."""
    try:
        fd = os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, CAPSULE_MODE)
    except OSError as e:
        raise StorageError("create", directory, e) from e
    f = OsFile(os.path.join(directory, "(unnamed)"), fd)
    f.lock()
    return f


def _before_first_commit(as_of: Any, first: list[float]) -> str:
    """Why a branch as of ``as_of`` (which names the state before commit 1) is refused."""
    if not first:
        return "the capsule has no commits yet: a branch as of any point would hold nothing"
    when = datetime.datetime.fromtimestamp(first[0]).astimezone().isoformat(timespec="seconds")
    what = "commit 0 is the empty state before the first one (commits are numbered from 1)" \
        if isinstance(as_of, int) else "that time is before the first commit"
    return f"as_of: {what}; a branch of it would hold nothing. The first commit is 1, made {when}"
