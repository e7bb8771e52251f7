"""Reading stored frames: ``get``, ``timeline``, ``changes``, and the types they return.

Every read resolves ``as_of`` to a commit and answers from the frame table as of that
commit [F-12]; expired frames are gone from every answer, even as of a time before they
expired [F-24]. Metadata is read under the lock; payloads through a pinned view, without
it [F-17].
"""

from __future__ import annotations

from typing import Any

import msgspec

from . import format as fmt
from .errors import InvalidArgument, NotFound
from .metadata import to_epoch
from .state import CapsuleState
from .table import FOREVER
from .warming import Warmer


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


class Frames:
    """The frame reads of one capsule."""

    def __init__(self, state: CapsuleState, warmer: Warmer) -> None:
        self._s = state
        self._warmer = warmer

    def get(self, frame_id: int | None = None, *, uri: str | None = None, as_of: Any = None) -> Frame:
        """See ``Capsule.get``."""
        s = self._s
        with s.lock:
            s.check_open()
            s.expire_due()
            seq = s.resolve_as_of(as_of)
            t = s.table
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
                assert uri is not None
                found = t.at_uri(uri, seq)
                if found is None:
                    raise NotFound(f"nothing at {uri!r}" + (f" as of commit {seq}" if as_of is not None else ""))
                fid = found
            if s.expired(fid):
                # Even as of a time before it expired: the rules say it is gone [F-24].
                raise NotFound(f"frame {fid} has expired under the capsule's retention rules")
            meta = t.frames[fid]
            info = self.info(meta)
            view = s.views.pin()
        try:
            payload = view.payload(meta)
            self._warmer.prefetch_next(meta, view.table)
        finally:
            s.views.unpin(view)
        return Frame(**msgspec.structs.asdict(info), payload=payload)

    def timeline(
        self, *, since: Any = None, until: Any = None, limit: int = 100, reverse: bool = False,
        as_of: Any = None, kind: str | None = None,
    ) -> Timeline:
        """See ``Capsule.timeline``."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise InvalidArgument("limit must be a non-negative int")
        lo = None if since is None else to_epoch(since)
        hi = None if until is None else to_epoch(until)
        s = self._s
        with s.lock:
            s.check_open()
            s.expire_due()
            seq = s.resolve_as_of(as_of)
            out = Timeline()
            if limit:
                frames = s.table.frames
                for fid in s.table.timeline(seq, lo, hi, reverse):
                    if kind is not None and frames.kind_of(fid) != kind:
                        continue
                    if s.expired(fid):
                        out.expired += 1
                        continue
                    out.append(self.info(frames[fid]))
                    if len(out) >= limit:
                        break
            return out

    def changes(self, since_seq: int, *, after_id: int = -1, limit: int = 10_000) -> list[Frame]:
        """See ``Capsule.changes``."""
        s = self._s
        with s.lock:
            s.check_open()
            t = s.table
            first = max(t.first_after(max(0, since_seq)), after_id + 1)
            s.expire_due()
            metas = [m for m in t.frames[first : first + limit] if m.op == fmt.PUT and not s.expired(m.id)]
            infos = [self.info(m) for m in metas]
            view = s.views.pin()
        try:
            return [Frame(**msgspec.structs.asdict(i), payload=view.payload(m))
                    for i, m in zip(infos, metas, strict=True)]
        finally:
            s.views.unpin(view)

    def info(self, m: fmt.FrameMeta) -> FrameInfo:
        t = self._s.table
        end = t.ended_at(m.id)
        return FrameInfo(
            id=m.id, uri=m.uri, title=m.title, kind=m.kind, tags=dict(m.tags), timestamp=m.timestamp,
            commit_seq=m.seq, commit_time=t.commit_times[m.seq - 1],
            valid_until=None if end == FOREVER else end, superseded_by=t.ended_by(m.id),
            supersedes=m.supersedes, parent=m.parent, chunk=m.chunk, length=m.length,
            is_text=m.is_text,
        )
