"""The frame table: every committed frame, its validity, and the lookups over them.

It owns the version model [F-20 .. F-23]. A frame is valid from the commit that created
it until the commit that superseded or tombstoned it (``ended``), so "visible at commit
S" is ``frame.seq <= S < ended`` and an as-of view is a true historical state, not a
filter over what is live today. The table is derived data: it is rebuilt from COMMIT
records (or loaded from checkpoint segments) and never written as such.
"""

from __future__ import annotations

import bisect
import hashlib
from array import array
from collections.abc import Iterator
from typing import Any

import msgspec

from .errors import CorruptionError
from .format import PURGED, PUT, TOMBSTONE, CommitInfo, CommitRecord, FrameMeta, RelocateRecord
from .framestore import FrameStore
from .keymap import KeyMap, halves

FOREVER = 1 << 62  # "ended" of a frame that is still valid


def uri_key(uri: str) -> tuple[int, int]:
    """A URI's 128-bit digest as (key in the lookup map, check kept per frame): a lookup
    needs no frame read, and is as exact as the payload digests (blake2b-128)."""
    return halves(hashlib.blake2b(uri.encode("utf-8", "surrogatepass"), digest_size=16).digest())


class FrameTable:
    """Frames and commits, with the lookups the engine needs. Per frame, memory holds only
    fixed-width columns (~125 B a frame in all): the metadata itself is in a FrameStore,
    and lookups by URI go through a 128-bit digest, half key and half check."""

    def __init__(self, spill_dir: str | None = None) -> None:
        self.frames = FrameStore(spill_dir)  # index == frame id [F-20]
        self.commits: list[CommitInfo] = []  # index == seq - 1
        self.commit_times: list[float] = []  # non-decreasing [F-10]: bisectable
        self._ended = array("q")  # frame id -> seq that ended it, FOREVER while valid
        self._ended_by = array("q")  # frame id -> frame id that ended it, -1 while valid
        self._previous = array("q")  # frame id -> the previous frame of its URI, -1 for none
        self._uri_check = array("q")  # frame id -> the check half of its URI's digest
        self._heads = KeyMap()  # uri_key()[0] -> the newest frame of that URI (see _find)
        self._clashes: dict[str, int] = {}  # uri -> newest frame, for URIs whose key is taken
        self._children = KeyMap()  # hash((parent, chunk)) -> newest frame (a prefetch hint)
        # (timestamp, id) of PUT frames, sorted, as two columns (16 B a frame, not ~80)
        self.times = array("d")
        self.time_ids = array("q")
        self.live_count = 0  # PUT frames still valid
        self.ended_count = 0  # frames ended by a later frame, tombstones included
        self.uri_count = 0  # distinct URIs ever used
        self.live_uris = 0  # URIs with a valid frame
        self.expiring: dict[int, float] = {}  # frame id -> its own expiry time [F-24]
        self.purged: list[int] = []  # ids of frames whose payload compaction purged [F-24]
        self.dicts: dict[int, int] = {}  # compression dictionary id -> DICT record offset
        self.upgraded_upto = 0  # frames below this id were considered by codec upgrades
        self.dict_trained_at = 0  # upgraded_upto when the newest dictionary was written
        self.rewinds: dict[int, int] = {}  # commit seq -> the commit whose state it restored
        self.rule_changes: list[tuple[int, dict[str, Any]]] = []  # (seq, retention rules) [F-24]

    @property
    def seq(self) -> int:
        return len(self.commits)

    @property
    def next_id(self) -> int:
        return len(self.frames)

    def close(self) -> None:
        self.frames.close()

    # -- building ---------------------------------------------------------------------

    def apply(self, rec: CommitRecord, offset: int) -> None:
        """Add one commit, checking every invariant a valid log keeps [F-10, F-21]."""
        if rec.seq != self.seq + 1:
            raise CorruptionError(f"commit seq {rec.seq} follows {self.seq}", offset=offset)
        if self.commits and rec.time < self.commits[-1].time:
            raise CorruptionError("commit time went backwards", offset=offset)
        if not rec.frames and not rec.vectors and rec.rewind is None and rec.rules is None:
            raise CorruptionError("empty commit", offset=offset)
        for i, f in enumerate(rec.frames):
            if f.id != self.next_id + i or f.seq != rec.seq:
                raise CorruptionError(f"frame {f.id} out of order in commit {rec.seq}", offset=offset)
        if rec.rewind is not None:
            if not 0 <= rec.rewind < rec.seq:
                raise CorruptionError(f"commit {rec.seq} rewinds to commit {rec.rewind}", offset=offset)
            self.rewinds[rec.seq] = rec.rewind
        if rec.rules is not None:
            self.rule_changes.append((rec.seq, rec.rules))
        self.commits.append(CommitInfo(rec.seq, rec.time, offset, rec.rewind, rec.rules))
        self.commit_times.append(rec.time)
        for f in rec.frames:
            self._add(f, offset, recent=True)

    def relocate(self, rec: RelocateRecord, offset: int) -> None:
        """Point frames at the blocks a codec upgrade wrote [F-16]. Content is unchanged
        (the digest still guards every read), so validity and ids are untouched."""
        if rec.seq != self.seq:
            raise CorruptionError(f"relocation for commit {rec.seq} after commit {self.seq}", offset=offset)
        for d in rec.dicts:
            self.dicts[d.id] = d.offset
            self.dict_trained_at = rec.upto
        for mv in rec.moves:
            if not 0 <= mv.id < self.next_id or self.frames.op_of(mv.id) != PUT or mv.block < 0:
                raise CorruptionError(f"relocation of invalid frame {mv.id}", offset=offset)
            self.frames.replace(msgspec.structs.replace(self.frames[mv.id], block=mv.block, start=mv.start))
        self.upgraded_upto = max(self.upgraded_upto, min(rec.upto, self.next_id))

    def load_segment(self, frames: list[FrameMeta], commits: list[CommitInfo], offset: int) -> None:
        if frames and frames[0].id != self.next_id:
            raise CorruptionError(f"segment starts at frame {frames[0].id}", offset=offset)
        if commits and commits[0].seq != self.seq + 1:
            raise CorruptionError(f"segment starts at commit {commits[0].seq}", offset=offset)
        self.commits.extend(commits)
        self.commit_times.extend(c.time for c in commits)
        self.rewinds.update((c.seq, c.rewind) for c in commits if c.rewind is not None)
        self.rule_changes.extend((c.seq, c.rules) for c in commits if c.rules is not None)
        for f in frames:
            if f.seq > self.seq:
                raise CorruptionError(f"frame {f.id} names future commit {f.seq}", offset=offset)
            self._add(f, offset)

    def _add(self, f: FrameMeta, offset: int, *, recent: bool = False) -> None:
        if f.id != len(self.frames):
            raise CorruptionError(f"frame id {f.id} is not dense", offset=offset)
        (key, check), head, clash = self._find(f.uri) if f.uri is not None else ((0, 0), None, False)
        if f.supersedes is not None:
            old = f.supersedes
            # The frame it ends: a valid PUT, the newest of the same URI (or also URI-less).
            same_uri = head == old if f.uri is not None else old < f.id and self.frames[old].uri is None
            if old >= f.id or not same_uri or self._ended[old] != FOREVER or self.frames.op_of(old) != PUT:
                raise CorruptionError(f"frame {f.id} supersedes invalid frame {old}", offset=offset)
            self._ended[old] = f.seq
            self._ended_by[old] = f.id
            self.ended_count += 1
            self.live_count -= 1
            if f.op == TOMBSTONE and f.uri is not None:
                self.live_uris -= 1
        elif head is not None and self.is_valid(head):
            raise CorruptionError(f"frame {f.id} shadows live {f.uri!r}", offset=offset)
        elif f.uri is not None:
            self.live_uris += f.op == PUT
        self.frames.append(f, recent=recent)
        self._previous.append(-1 if head is None else head)
        self._uri_check.append(check)
        self._ended_by.append(-1)
        if f.op == TOMBSTONE:
            if f.supersedes is None:
                raise CorruptionError(f"tombstone {f.id} names no frame", offset=offset)
            self._ended.append(f.seq)  # a tombstone is never visible itself
            self.ended_count += 1
        else:
            self._ended.append(FOREVER)
            self.live_count += 1
            if not self.times or self.times[-1] <= f.timestamp:
                self.times.append(f.timestamp)
                self.time_ids.append(f.id)
            else:  # ids grow: among equal timestamps the new frame goes last
                pos = bisect.bisect_right(self.times, f.timestamp)
                self.times.insert(pos, f.timestamp)
                self.time_ids.insert(pos, f.id)
            if f.expires is not None:
                self.expiring[f.id] = f.expires
            if f.block == PURGED:
                self.purged.append(f.id)
            if f.parent is not None and f.chunk is not None:
                self._children.set(hash((f.parent, f.chunk)), f.id)
        if f.uri is not None:
            if head is None:
                self.uri_count += 1
            if clash:  # another URI has this key: this one is looked up exactly
                self._clashes[f.uri] = f.id
            else:
                self._heads.set(key, f.id)

    def _find(self, uri: str) -> tuple[tuple[int, int], int | None, bool]:
        """``uri``'s digest, its newest frame (whatever its op or validity) or None, and
        whether it is kept apart (its key leads to another URI's frames: a clash)."""
        if uri in self._clashes:
            return (0, 0), self._clashes[uri], True
        key, check = uri_key(uri)
        fid = self._heads.get(key)
        if fid is None:
            return (key, check), None, False
        same = self._uri_check[fid] == check
        return (key, check), fid if same else None, not same

    def _head(self, uri: str) -> int | None:
        return self._find(uri)[1]

    # -- reading ---------------------------------------------------------------------

    def ended_at(self, fid: int) -> int:
        """The commit that ended frame ``fid``, FOREVER while it is valid."""
        return self._ended[fid]

    def ended_by(self, fid: int) -> int | None:
        by = self._ended_by[fid]
        return None if by < 0 else by

    def is_valid(self, fid: int) -> bool:
        """A PUT frame not ended (the head state)."""
        return self._ended[fid] == FOREVER and self.frames.op_of(fid) == PUT

    def visible(self, fid: int, seq: int) -> bool:
        return self.frames.op_of(fid) == PUT and self.frames.seq_of(fid) <= seq < self._ended[fid]

    def live(self, uri: str) -> int | None:
        """The valid frame of ``uri`` now, if any."""
        head = self._head(uri)
        return head if head is not None and self.is_valid(head) else None

    def child(self, parent: str, chunk: int) -> int | None:
        """The newest PUT frame of chunk ``chunk`` of ``parent``: a hint for prefetching,
        not checked against the frame (a 64-bit hash clash would name another one)."""
        return self._children.get(hash((parent, chunk)))

    def first_after(self, seq: int) -> int:
        """The id of the first frame created after commit ``seq``."""
        lo, hi = 0, self.next_id
        seqs = self.frames.seq_of
        while lo < hi:  # frames are in commit order, so their seqs are sorted
            mid = (lo + hi) // 2
            if seqs(mid) <= seq:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def seq_at_time(self, t: float) -> int:
        """The last commit made at or before ``t`` (0 when none)."""
        return bisect.bisect_right(self.commit_times, t)

    def versions_of(self, uri: str) -> list[int]:
        """Every frame of ``uri``, oldest first."""
        out = []
        fid = self._head(uri)
        while fid is not None and fid >= 0:
            out.append(fid)
            fid = self._previous[fid]
        out.reverse()
        return out

    def at_uri(self, uri: str, seq: int) -> int | None:
        if seq >= self.seq:
            return self.live(uri)
        fid = self._head(uri)
        while fid is not None and fid >= 0:
            if self.frames.seq_of(fid) <= seq:
                return fid if self.visible(fid, seq) else None
            fid = self._previous[fid]
        return None

    def timeline(
        self, seq: int, since: float | None, until: float | None, reverse: bool
    ) -> Iterator[int]:
        """Ids of frames visible at ``seq`` with ``since <= timestamp <= until``, in time order."""
        lo = 0 if since is None else bisect.bisect_left(self.times, since)
        hi = len(self.times) if until is None else bisect.bisect_right(self.times, until)
        rng = range(hi - 1, lo - 1, -1) if reverse else range(lo, hi)
        head = seq >= self.seq
        ended = self._ended
        for i in rng:
            fid = self.time_ids[i]
            if head:
                if ended[fid] == FOREVER:
                    yield fid
            elif self.visible(fid, seq):
                yield fid
