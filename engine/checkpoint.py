"""Tiered checkpoints [F-11]: what makes opening a capsule cost O(segments), not O(log).

A checkpoint folds the tail into SEGMENT records (slices of the frame table) and a
CHECKPOINT record, then points the spare header slot at it, so opening reads a few
segments instead of the whole log. Segments merge in tiers of four, so every frame's
metadata is rewritten O(log N) times and a checkpoint costs O(frames since the last one),
amortised. A checkpoint also lists every VECTORS record (folding the tail's small ones)
and, when it has grown enough, copies the lexical index into the capsule [F-15].

Callers hold the state's lock, with nothing staged.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import crypto
from . import format as fmt
from .appender import Spool
from .errors import StorageError
from .indexes import fingerprint
from .lexical import SCHEMA_VERSION as LEX_SCHEMA
from .state import CapsuleState
from .vectors import pack_vectors

MUTABLE_LEX_FILES = {"meta.json", ".managed.json"}  # Tantivy rewrites these in place
LEX_COPY_MIN_FRAMES = 2048  # copy the lexical index into the capsule after this much growth
SMALL_VECTOR_RECORD = 64  # VECTORS records with fewer vectors are folded at checkpoints
FANOUT = 4  # segments of one size tier merged together
# Segments are never merged past this many frames: a merge holds its frames in memory,
# so a bigger one would make a checkpoint's peak memory grow with the capsule.
MAX_SEGMENT_FRAMES = 16384


class Checkpointer:
    """Writes the checkpoints of one capsule."""

    def __init__(self, state: CapsuleState) -> None:
        self._s = state

    def due(self) -> bool:
        """Has the tail grown past the options' size or frame count?"""
        s = self._s
        return (s.tail_frames >= s.opts.checkpoint_frames
                or s.app.log_end - s.ckpt_end >= s.opts.checkpoint_bytes)

    def try_checkpoint(self) -> None:
        """Checkpoint when the commits it covers are durable already: a checkpoint only
        speeds up opening, so its failure (a full disk) fails nothing else. It is tried
        again later (after the next commit; at the next open) and counted in stats."""
        try:
            self.checkpoint()
        except StorageError:
            self._s.checkpoint_failures += 1

    def checkpoint(self, *, lex: str = "due") -> None:
        """Fold the tail into segments and write a checkpoint. ``lex``: copy the lexical
        index when its growth makes it "due", "now", or "keep" the copy named so far."""
        s = self._s
        t, app = s.table, s.app
        segments = list(s.ckpt.segments)
        # Each segment holds a run of frames and of the commits after its predecessor's.
        runs = [(seg.first_id, seg.count, self._last_seq(seg)) for seg in segments]
        runs.append((s.ckpt.next_id, t.next_id - s.ckpt.next_id, t.seq))
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
        dead = sum(seg.length for seg in segments[keep:])
        out = app.spool()
        try:
            refs = list(segments[:keep])
            for first, count, last_seq in runs[keep:]:
                first_seq = (self._last_seq(refs[-1]) if refs else 0) + 1
                segment = fmt.SegmentRecord(first, t.frames[first : first + count], t.commits[first_seq - 1 : last_seq])
                raw = app.seal_meta(fmt.SEGMENT, segment, out.pos)
                refs.append(fmt.SegmentRef(out.pos, len(raw), first, count, last_seq))
                out.write(raw)
                del segment, raw
            extra = dict(s.ckpt.extra)
            if t.dicts or t.upgraded_upto:
                extra["codec"] = {"dicts": dict(t.dicts), "upto": t.upgraded_upto, "trained_at": t.dict_trained_at}
            start = out.pos
            self._vectors(extra, out)
            folded = out.pos - start
            if lex != "keep":
                dead += self._lexical(extra, out, force=lex == "now")
            pos = out.pos
        except BaseException:
            app.rollback()  # what was written is garbage past the end: cut it
            raise
        counters = dict(s.counters)
        counters["bytes.vectors"] = counters.get("bytes.vectors", 0) + folded
        counters["bytes.lexfile"] = counters.get("bytes.lexfile", 0) + pos - start - folded
        old_files = s.ckpt.extra.get("lex", {}).get("files", {}).values()
        kept = {tuple(v) for v in extra.get("lex", {}).get("files", {}).values()}
        overhead = fmt.RECORD_SIZE + (crypto.Sealer.OVERHEAD if s.encrypted else 0)
        dead += sum(length + overhead for offset, length in old_files if (offset, length) not in kept)
        counters["bytes.segment"] = counters.get("bytes.segment", 0) + sum(r.length for r in refs[keep:])
        counters["bytes.dead"] = counters.get("bytes.dead", 0) + dead
        counters["checkpoints"] = counters.get("checkpoints", 0) + 1
        ckpt = fmt.CheckpointRecord(s.capsule_id, t.seq, t.next_id, s.last_commit, refs, counters, extra)
        # The checkpoint counts its own bytes: encode once to learn the size (the count
        # itself may change the size by a byte or two, which stats can live with).
        size = len(app.seal_meta(fmt.CHECKPOINT, ckpt, pos))
        counters["bytes.checkpoint"] = counters.get("bytes.checkpoint", 0) + size
        ck_raw = app.seal_meta(fmt.CHECKPOINT, ckpt, pos)
        try:
            out.write(ck_raw)
            out.flush()
        except StorageError:
            app.rollback()
            raise
        # On failure the old header still points at the old checkpoint; the new records
        # are harmless garbage past the end, cut there or at the next open.
        app.make_durable(app.header.next(pos, len(ck_raw)))
        s.ckpt = ckpt
        s.counters = counters
        s.ckpt_end = app.log_end
        s.tail_frames = 0
        s.vec = extra.get("vec")
        s.vec_refs = [list(r) for r in s.vec.get("records", [])] if s.vec else []
        s.ckpt_vec_refs = len(s.vec_refs)
        if s.indexes is not None:
            s.indexes.save(t)

    def _last_seq(self, ref: fmt.SegmentRef) -> int:
        if ref.last_seq >= 0:
            return ref.last_seq
        return self._s.table.frames[ref.first_id + ref.count - 1].seq  # read versions 1-2

    def _vectors(self, extra: dict[str, Any], out: Spool) -> None:
        """List every VECTORS record in the checkpoint; the tail's small ones (one event, a
        few frames) are folded into one, so the list grows with data, not with commits.
        Big records stay where they are: rewriting them would double their bytes."""
        s = self._s
        if s.vec is None:
            return
        refs = s.vec_refs[: s.ckpt_vec_refs]
        tail = s.vec_refs[s.ckpt_vec_refs :]
        small = [r for r in tail if r[1] < SMALL_VECTOR_RECORD]
        if len(small) > 1:
            ids: list[int] = []
            rows = []
            for offset, _ in small:
                i, v = s.read_vectors(offset)
                ids += i
                rows.append(v)
            folded = fmt.VectorsRecord(ids, pack_vectors(np.concatenate(rows)))
            raw = s.app.seal(fmt.VECTORS, fmt.pack(folded), out.pos)
            tail = [r for r in tail if r[1] >= SMALL_VECTOR_RECORD] + [[out.pos, len(ids)]]
            out.write(raw)
        extra["vec"] = {**s.vec, "records": refs + tail, "bitmap": bytes(s.has_vec)}

    def _lexical(self, extra: dict[str, Any], out: Spool, *, force: bool = False) -> int:
        """Copy the lexical index's new files into the capsule [F-15]; returns the bytes
        written for nothing (a copy abandoned half-way).

        Only when the index grew by a quarter since its last copy (or ``force``): Tantivy
        merges rewrite segments, and each copy leaves the replaced files dead in the log, so
        copying at every checkpoint would cost O(N log N) bytes. A restore catches up on
        the frames after the copy, which lexical indexing does quickly.
        """
        s = self._s
        ix = s.indexes
        if ix is None or ix.lex is None or ix.readonly:
            return 0
        previous = extra.get("lex") if extra.get("lex", {}).get("schema") == LEX_SCHEMA else None
        covered = previous.get("frames", 0) if previous else 0
        grown = s.table.next_id - covered
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
                out.write(s.app.seal(fmt.LEXFILE, data, out.pos))
                del data
        except FileNotFoundError:
            # A Tantivy merge removed a file while we copied: keep the previous copy this
            # time (still valid; a restore catches up), try again at the next checkpoint.
            return out.pos - start
        extra["lex"] = {"seq": s.table.seq, "fingerprint": fingerprint(s.table, s.table.seq),
                        "files": files, "schema": LEX_SCHEMA, "frames": s.table.next_id}
        return 0


def _tier(count: int) -> int:
    return max(count, 1).bit_length() // 2  # tiers of four: floor(log4)
