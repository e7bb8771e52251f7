"""Staging and committing: the capsule's write path [F-05].

``put`` compresses the payload and appends its BLOCK record past the committed end (no
fsync); ``commit`` appends one COMMIT record naming the new frames and blocks (after a
VECTORS record with the vectors ready by then [F-14]), then fsyncs once. The commit is
durable, and visible, when that fsync returns: many puts share one fsync (group commit)
and the cost does not depend on the file's size. What the commit sets off afterwards
(indexing, embedding, a checkpoint) is the capsule's business (``engine/capsule.py``).

Callers hold the state's lock.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import msgspec
import numpy as np

from . import codecs, upgrade
from . import format as fmt
from .appender import body_crc
from .errors import InvalidArgument, NotFound, StorageError
from .metadata import check_sizes, opt_str, tags_of, to_epoch
from .state import CapsuleState
from .vectors import as_vector, pack_vectors

MAX_PAYLOAD = 256 << 20


class Committed(msgspec.Struct, kw_only=True):
    """What one commit made durable, for the indexes and the embedding queue."""

    seq: int
    frames: list[fmt.FrameMeta]
    texts: dict[int, str]  # staged text by frame id (the lexical index need not read it back)
    vector_ids: list[int]
    vectors: np.ndarray | None


class Writer:
    """The staged frames of one writer and the commit that makes them durable."""

    def __init__(self, state: CapsuleState) -> None:
        self._s = state
        self.pending: list[fmt.FrameMeta] = []
        self._blocks: list[fmt.BlockRef] = []
        self._live: dict[str, int | None] = {}  # uri -> pending live id (None: removed)
        self._ended: set[int] = set()
        self._counts: dict[str, int] = {}  # codec tallies of staged blocks
        self._texts: dict[int, str] = {}  # staged text, for the lexical index

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
        """Stage a frame; returns its id (see ``Capsule.put``). Checks and compresses
        before taking the lock: the lock is held only to append the block."""
        s = self._s
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
            if s.vec is None:
                raise InvalidArgument("this capsule stores no vectors (created with model=None)")
            try:
                vec = as_vector(vector, s.vec["dim"])
            except ValueError as e:
                raise InvalidArgument(str(e)) from None
        fresh_dict = s.fresh_dict if len(payload) <= upgrade.FRESH_DICT_MAX else None
        codec, packed = codecs.encode(payload, s.opts.level, fresh_dict[1] if fresh_dict else None)
        dict_id = fresh_dict[0] if fresh_dict is not None and codec == codecs.ZSTD_DICT else 0
        body = fmt.BLOCK_HEADER.pack(codec, 0, 0, dict_id, len(payload)) + packed
        digest = hashlib.blake2b(payload, digest_size=16).digest()
        with s.lock:
            s.check_writable()
            record = s.app.seal(fmt.BLOCK, body, s.app.write_end)
            # No fsync: an uncommitted block is garbage until a COMMIT names it.
            offset = s.app.append(record)
            fid = s.table.next_id + len(self.pending)
            meta = fmt.FrameMeta(
                id=fid, seq=0, op=fmt.PUT, supersedes=self.live_id(uri) if uri else None,
                block=offset, start=0, length=len(payload), digest=digest, is_text=is_text,
                chunk=chunk, **meta_args,
            )
            self.pending.append(meta)
            self._blocks.append(fmt.BlockRef(offset, body_crc(record)))
            self._count_block(codec, len(payload), len(packed))
            if uri is not None:
                self._live[uri] = fid
            if meta.supersedes is not None:
                self._ended.add(meta.supersedes)
            if isinstance(data, str):
                self._texts[fid] = data
            if vec is not None:
                s.ready_vectors[fid] = vec
            return fid

    def _count_block(self, codec: int, raw: int, stored: int) -> None:
        name = codecs.NAMES[codec]
        for k, v in ((f"codec.{name}.blocks", 1), (f"codec.{name}.raw", raw), (f"codec.{name}.stored", stored)):
            self._counts[k] = self._counts.get(k, 0) + v

    def put_many(self, items: Iterable[Mapping[str, Any]]) -> list[int]:
        """``put`` each item (a dict with ``text`` or ``data`` plus put's keywords); all
        or nothing."""
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
        with self._s.lock:
            self._s.check_writable()
            keep, counts = len(self.pending), dict(self._counts)
            try:
                yield
            except BaseException:
                self._unstage(keep)
                self._counts = counts
                raise

    def _unstage(self, keep: int) -> None:
        """Drop the staged frames after the first ``keep`` (and their block bytes)."""
        dropped = self.pending[keep:]
        if not dropped:
            return
        app = self._s.app
        blocks = [m.block for m in dropped if m.block >= app.log_end]  # not committed blocks (rewind)
        if blocks:
            app.cut_tail(min(blocks))  # blocks are appended in order: cut from the first
            self._blocks = [b for b in self._blocks if b.offset < app.write_end]
        self.pending = self.pending[:keep]
        for m in dropped:
            self._texts.pop(m.id, None)
            self._s.ready_vectors.pop(m.id, None)
        # Rebuild the staged overlays from what remains.
        self._live.clear()
        self._ended.clear()
        for m in self.pending:
            if m.uri is not None:
                self._live[m.uri] = m.id if m.op == fmt.PUT else None
            if m.supersedes is not None:
                self._ended.add(m.supersedes)

    def remove(self, target: str | int) -> int:
        """Stage a tombstone for a live frame (by id) or a URI's live version; returns
        the tombstone's frame id."""
        with self._s.lock:
            self._s.check_writable()
            if isinstance(target, bool) or not isinstance(target, (int, str)):
                raise InvalidArgument("remove() takes a frame id or a URI")
            if isinstance(target, str):
                old = self.live_id(target)
                if old is None:
                    raise NotFound(f"no live frame at {target!r}")
            else:
                old = target
                if not self._is_live(old):
                    raise NotFound(f"frame {old} is not live")
            uri = self._meta(old).uri
            fid = self._s.table.next_id + len(self.pending)
            self.pending.append(fmt.FrameMeta(
                id=fid, seq=0, op=fmt.TOMBSTONE, uri=uri, title=None, kind=None, tags={},
                timestamp=time.time(), supersedes=old, block=-1, start=0, length=0,
                digest=b"", is_text=False,
            ))
            self._ended.add(old)
            if uri is not None:
                self._live[uri] = None
            return fid

    def stage_rewind(self, target: int, vectors_of: Callable[[list[int]], dict[int, np.ndarray]]) -> None:
        """Stage what makes commit ``target``'s state the head again (see
        ``Capsule.rewind``): tombstones for frames added since, and for frames changed or
        removed since, a new version with their content as of ``target``."""
        s = self._s
        t = s.table
        then = set(t.timeline(target, None, None, False))
        now = set(t.timeline(t.seq, None, None, False))
        by_uri = {t.frames[f].uri: f for f in now if t.frames[f].uri is not None}
        restore = sorted(f for f in then - now if not s.expired(f))  # expired stays gone
        restored_uris = {t.frames[r].uri for r in restore} - {None}
        for fid in sorted(now - then):
            if t.frames[fid].uri not in restored_uris:  # else the restored version ends it
                self.remove(fid)
        vectors = vectors_of(restore) if s.vec is not None else {}
        for fid in restore:
            old = t.frames[fid]
            new_id = t.next_id + len(self.pending)
            live = by_uri.get(old.uri) if old.uri is not None else None
            self.pending.append(msgspec.structs.replace(old, id=new_id, seq=0, supersedes=live))
            if old.uri is not None:
                self._live[old.uri] = new_id
            if live is not None:
                self._ended.add(live)
            if fid in vectors:
                s.ready_vectors[new_id] = vectors[fid]

    def commit(self, *, rewind_to: int | None = None, rules: dict[str, Any] | None = None) -> Committed | None:
        """Write the staged frames and ready vectors as one commit, durably (one fsync);
        ``None`` when there was nothing to commit. ``rewind_to`` and ``rules`` are recorded
        in the commit (a rewind's, a rule change's)."""
        s = self._s
        app, t = s.app, s.table
        if not self.pending and not s.ready_vectors and rewind_to is None and rules is None:
            return None
        seq = t.seq + 1
        last_time = t.commit_times[-1] if t.commits else 0.0
        for m in self.pending:
            m.seq = seq
        offset = app.write_end
        vec_raw, vec_ids, vec_rows = b"", [], None
        if s.ready_vectors:
            # Vectors ride in the commit: written before it, named by it [F-14].
            vec_ids = list(s.ready_vectors)
            vec_rows = np.stack([s.ready_vectors[i] for i in vec_ids])
            vec_raw = app.seal(fmt.VECTORS, fmt.pack(fmt.VectorsRecord(vec_ids, pack_vectors(vec_rows))), offset)
        vec_refs = [fmt.BlockRef(offset, body_crc(vec_raw))] if vec_raw else []
        rec = fmt.CommitRecord(seq, max(time.time(), last_time), s.last_commit, self.pending,
                               self._blocks, vec_refs, rewind_to, rules)
        commit_offset = offset + len(vec_raw)
        raw = app.seal_meta(fmt.COMMIT, rec, commit_offset)
        block_bytes = offset - app.log_end
        try:
            # The acknowledgement point: once this returns the commit survives a crash.
            app.append_durably(vec_raw + raw)
        except StorageError:
            self.rollback()
            raise
        t.apply(rec, commit_offset)
        s.count_commit(rec)
        s.add_counters({"bytes.commit": len(raw), "bytes.vectors": len(vec_raw), "bytes.block": block_bytes,
                        **self._counts})
        s.tail_frames += len(self.pending)
        s.track_expiry(self.pending)
        s.last_commit = commit_offset
        s.has_vec.extend(bytes(t.next_id - len(s.has_vec)))
        if vec_raw:
            s.vec_refs.append([offset, len(vec_ids)])
            for fid in vec_ids:
                s.has_vec[fid] = 1
        done = Committed(seq=seq, frames=self.pending, texts=self._texts, vector_ids=vec_ids, vectors=vec_rows)
        self._clear()
        s.ready_vectors = {}
        return done

    def rollback(self) -> None:
        """Discard every staged frame and its block bytes."""
        self._clear()
        self._s.app.rollback()

    def _clear(self) -> None:
        self.pending = []
        self._texts = {}
        self._blocks = []
        self._counts = {}
        self._live.clear()
        self._ended.clear()

    # -- pending-aware lookups -------------------------------------------------------------

    def live_id(self, uri: str) -> int | None:
        if uri in self._live:
            return self._live[uri]
        return self._s.table.live(uri)

    def _is_live(self, fid: int) -> bool:
        if fid in self._ended:
            return False
        t = self._s.table
        if 0 <= fid < t.next_id:
            return t.is_valid(fid)
        return any(m.id == fid and m.op == fmt.PUT for m in self.pending)

    def _meta(self, fid: int) -> fmt.FrameMeta:
        t = self._s.table
        return t.frames[fid] if fid < t.next_id else self.pending[fid - t.next_id]

