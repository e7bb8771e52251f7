"""The frame table: the in-memory view of every committed frame and its validity.

It owns the version model [F-20 .. F-23]. A frame is valid from the commit that created
it until the commit that superseded or tombstoned it (``ended``), so "visible at commit
S" is ``frame.seq <= S < ended`` and an as-of view is a true historical state, not a
filter over what is live today. The table is derived data: it is rebuilt from COMMIT
records (or loaded from checkpoint segments) and never written as such.
"""

from __future__ import annotations

import bisect
from array import array
from collections.abc import Iterator
from typing import Any

from .errors import CorruptionError
import msgspec

from .format import PUT, TOMBSTONE, CommitInfo, CommitRecord, FrameMeta, RelocateRecord

FOREVER = 1 << 62  # "ended" of a frame that is still valid


class FrameTable:
    def __init__(self) -> None:
        self.frames: list[FrameMeta] = []  # index == frame id [F-20]
        self.commits: list[CommitInfo] = []  # index == seq - 1
        self.commit_times: list[float] = []  # non-decreasing [F-10]: bisectable
        self.ended: dict[int, int] = {}  # frame id -> seq that ended it
        self.ended_by: dict[int, int] = {}  # frame id -> frame id that ended it
        self.live: dict[str, int] = {}  # uri -> live frame id
        # uri -> every frame id, oldest first; a URI with one version (most of them) maps
        # to its id alone, not to a list of one (~100 B less per frame): see versions_of.
        self.versions: dict[str, int | list[int]] = {}
        # (timestamp, id) of PUT frames, sorted, as two columns (16 B a frame, not ~80)
        self.times = array("d")
        self.time_ids = array("q")
        self.live_count = 0
        self.children: dict[str, dict[int, int]] = {}  # parent -> chunk -> newest frame id
        self.dicts: dict[int, int] = {}  # compression dictionary id -> DICT record offset
        self.upgraded_upto = 0  # frames below this id were considered by codec upgrades
        self.dict_trained_at = 0  # upgraded_upto when the newest dictionary was written
        self.rewinds: dict[int, int] = {}  # commit seq -> the commit whose state it restored
        self.rule_changes: list[tuple[int, dict[str, Any]]] = []  # (seq, retention rules) [F-24]
        # Chunks of one document repeat its parent, title and tag set: one copy each in
        # memory instead of one per frame (~400 B/frame on a watched tree). Shared tag
        # dicts are never handed out: readers get copies (Capsule._info).
        self._strings: dict[str, str] = {}
        self._tagsets: dict[tuple[tuple[str, str], ...], dict[str, str]] = {}

    @property
    def seq(self) -> int:
        return len(self.commits)

    @property
    def next_id(self) -> int:
        return len(self.frames)

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
            self._add(f, offset)

    def relocate(self, rec: RelocateRecord, offset: int) -> None:
        """Point frames at the blocks a codec upgrade wrote [F-16]. Content is unchanged
        (the digest still guards every read), so validity and ids are untouched."""
        if rec.seq != self.seq:
            raise CorruptionError(f"relocation for commit {rec.seq} after commit {self.seq}", offset=offset)
        for d in rec.dicts:
            self.dicts[d.id] = d.offset
            self.dict_trained_at = rec.upto
        for mv in rec.moves:
            if not 0 <= mv.id < self.next_id or self.frames[mv.id].op != PUT or mv.block < 0:
                raise CorruptionError(f"relocation of invalid frame {mv.id}", offset=offset)
            # A new object, not a mutation: readers may hold the old one mid-read.
            self.frames[mv.id] = msgspec.structs.replace(self.frames[mv.id], block=mv.block, start=mv.start)
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

    def _share(self, f: FrameMeta) -> None:
        strings = self._strings
        if f.parent is not None:
            f.parent = strings.setdefault(f.parent, f.parent)
        if f.title is not None:
            f.title = strings.setdefault(f.title, f.title)
        if f.kind is not None:
            f.kind = strings.setdefault(f.kind, f.kind)
        f.tags = self._tagsets.setdefault(tuple(f.tags.items()), f.tags)

    def _add(self, f: FrameMeta, offset: int) -> None:
        if f.id != len(self.frames):
            raise CorruptionError(f"frame id {f.id} is not dense", offset=offset)
        self._share(f)
        if f.supersedes is not None:
            old = f.supersedes
            if (
                old >= f.id
                or old in self.ended
                or self.frames[old].op != PUT
                or self.frames[old].uri != f.uri
            ):
                raise CorruptionError(f"frame {f.id} supersedes invalid frame {old}", offset=offset)
            self.ended[old] = f.seq
            self.ended_by[old] = f.id
            self.live_count -= 1
            if self.live.get(f.uri) == old:  # type: ignore[arg-type]
                del self.live[f.uri]  # type: ignore[arg-type]
        elif f.uri is not None and f.uri in self.live:
            raise CorruptionError(f"frame {f.id} shadows live {f.uri!r}", offset=offset)
        self.frames.append(f)
        if f.op == TOMBSTONE:
            if f.supersedes is None:
                raise CorruptionError(f"tombstone {f.id} names no frame", offset=offset)
            self.ended[f.id] = f.seq  # a tombstone is never visible itself
        else:
            self.live_count += 1
            if f.uri is not None:
                self.live[f.uri] = f.id
            if not self.times or self.times[-1] <= f.timestamp:
                self.times.append(f.timestamp)
                self.time_ids.append(f.id)
            else:  # ids grow: among equal timestamps the new frame goes last
                pos = bisect.bisect_right(self.times, f.timestamp)
                self.times.insert(pos, f.timestamp)
                self.time_ids.insert(pos, f.id)
        if f.uri is not None:
            old_versions = self.versions.get(f.uri)
            if old_versions is None:
                self.versions[f.uri] = f.id
            elif isinstance(old_versions, int):
                self.versions[f.uri] = [old_versions, f.id]
            else:
                old_versions.append(f.id)
        if f.parent is not None and f.chunk is not None and f.op == PUT:
            self.children.setdefault(f.parent, {})[f.chunk] = f.id

    # -- reading ----------------------------------------------------------------------

    def visible(self, fid: int, seq: int) -> bool:
        f = self.frames[fid]
        return f.op == PUT and f.seq <= seq < self.ended.get(fid, FOREVER)

    def first_after(self, seq: int) -> int:
        """The id of the first frame created after commit ``seq``."""
        lo, hi = 0, self.next_id
        while lo < hi:  # frames are in commit order, so their seqs are sorted
            mid = (lo + hi) // 2
            if self.frames[mid].seq <= seq:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def seq_at_time(self, t: float) -> int:
        """The last commit made at or before ``t`` (0 when none)."""
        return bisect.bisect_right(self.commit_times, t)

    def versions_of(self, uri: str) -> list[int]:
        v = self.versions.get(uri)
        return [] if v is None else [v] if isinstance(v, int) else v

    def at_uri(self, uri: str, seq: int) -> int | None:
        if seq >= self.seq:
            return self.live.get(uri)
        for fid in reversed(self.versions_of(uri)):
            f = self.frames[fid]
            if f.seq <= seq:
                return fid if self.visible(fid, seq) else None
        return None

    def timeline(
        self, seq: int, since: float | None, until: float | None, reverse: bool
    ) -> Iterator[int]:
        """Ids of frames visible at ``seq`` with ``since <= timestamp <= until``, in time order."""
        lo = 0 if since is None else bisect.bisect_left(self.times, since)
        hi = len(self.times) if until is None else bisect.bisect_right(self.times, until)
        rng = range(hi - 1, lo - 1, -1) if reverse else range(lo, hi)
        head = seq >= self.seq
        for i in rng:
            fid = self.time_ids[i]
            if head:
                if fid not in self.ended:
                    yield fid
            elif self.visible(fid, seq):
                yield fid
