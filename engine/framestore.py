"""FrameStore: the metadata of every committed frame, kept off the Python heap.

As Python objects, frame metadata was most of a large capsule's memory: ~0.5 KB a frame
alive, and as much again lost to fragmentation between those long-lived objects (issue
5). Here each frame is kept msgpack-encoded in an unlinked spill file and decoded when
asked for (one ``pread``, ~3.5 us cold; recent frames stay decoded in a small cache).
Memory holds only fixed-width columns, 27 bytes a frame: where the encoding is; the
frame's commit and op, which validity checks read for every frame they consider; its
payload block, which prefetching looks at; and its kind (as a number), which kind
filters look at. Spilled pages are the kernel's page cache, not this process's memory.

Without a spill directory (or when writing the spill file fails, as on a full disk) the
encodings stay in memory: slower to grow, never wrong. The spill file is derived data,
rebuilt by every open; an encrypted capsule puts it in RAM-backed storage [F-19].

It is append-only except for ``replace`` (codec upgrades move payloads [F-16]), which
appends the new encoding and repoints the frame in one array store. Readers in other
threads see the old encoding or the new one.
"""

from __future__ import annotations

import os
import tempfile
from array import array
from collections.abc import Iterator, Sequence
from typing import overload

import msgspec

from .format import FrameMeta

LEN_BITS = 24  # an encoding's location is (offset << 24 | length), one array slot
BIG = (1 << LEN_BITS) - 1  # length field of an encoding too long for it (kept in _big)
FLUSH_BYTES = 1 << 20  # encodings gathered in memory before one write to the spill file
RUN_BYTES = 1 << 20  # adjacent encodings read with one pread when iterating
MANY_KINDS = 0xFFFF  # kind number of frames whose kind is not numbered
CACHE_FRAMES = 4096  # decoded frames kept for repeated reads (~2 MB)


class FrameStore(Sequence[FrameMeta]):
    def __init__(self, spill_dir: str | None = None) -> None:
        self._loc = array("Q")  # index == frame id
        self._seq = array("q")
        self._op = bytearray()
        self._block = array("q")  # where the payload is: what a prefetch warms, without a read
        self._kind = array("H")  # index into _kinds: kind filters read no frame
        self._kinds: dict[str | None, int] = {None: 0}
        self._kind_names: list[str | None] = [None]
        self._big: dict[int, bytes] = {}
        self._fd: int | None = None
        if spill_dir is not None:
            try:
                os.makedirs(spill_dir, mode=0o700, exist_ok=True)
                with tempfile.TemporaryFile(dir=spill_dir) as spill:
                    self._fd = os.dup(spill.fileno())
            except OSError:
                self._fd = None  # no spill space: memory it is
        # (file offset of its first byte, encodings not yet written): replaced, not
        # emptied, on a flush, so a reader holding it still finds its bytes.
        self._tail: tuple[int, bytearray] = (0, bytearray())
        self._flush_at = FLUSH_BYTES
        self._enc = msgspec.msgpack.Encoder()
        self._dec = msgspec.msgpack.Decoder(FrameMeta)
        # id -> (loc, frame): an entry counts only while loc is still the frame's, so a
        # reader that cached a frame just replaced never serves it again. A plain dict,
        # emptied when full: no lock for readers in several threads to queue on.
        self._cache: dict[int, tuple[int, FrameMeta]] = {}

    # -- writing ------------------------------------------------------------------------

    def append(self, f: FrameMeta, *, recent: bool = False) -> None:
        """Add the next frame; ``recent``: keep it decoded too (a frame just committed
        is likely read soon: superseded, searched, fetched)."""
        loc = self._put(f)
        self._loc.append(loc)
        self._seq.append(f.seq)
        self._op.append(f.op)
        self._block.append(f.block)
        k = self._kinds.get(f.kind)
        if k is None:
            k = len(self._kind_names)
            if k < MANY_KINDS:
                self._kinds[f.kind] = k
                self._kind_names.append(f.kind)
            else:
                k = MANY_KINDS  # past 65,534 distinct kinds, the frame itself says
        self._kind.append(k)
        if recent:
            self._remember(f.id, loc, f)

    def replace(self, f: FrameMeta) -> None:
        """The new metadata of frame ``f.id`` (same frame, payload moved)."""
        loc = self._put(f)
        self._loc[f.id] = loc
        self._block[f.id] = f.block
        self._remember(f.id, loc, f)

    def _put(self, f: FrameMeta) -> int:
        base, tail = self._tail
        offset = base + len(tail)
        self._enc.encode_into(f, tail, len(tail))
        n = base + len(tail) - offset
        if n >= BIG:
            self._big[f.id] = bytes(tail[offset - base :])
            del tail[offset - base :]
            n = BIG
        if len(tail) >= self._flush_at and self._fd is not None:
            self._flush()
        return offset << LEN_BITS | n

    def _flush(self) -> None:
        base, tail = self._tail
        try:
            written = 0
            while written < len(tail):
                written += os.pwrite(self._fd, memoryview(tail)[written:], base + written)  # type: ignore[arg-type]
        except OSError:
            # A full disk must not lose frames: keep them in memory, try again later.
            self._flush_at = 2 * len(tail)
            return
        self._tail = (base + len(tail), bytearray())
        self._flush_at = FLUSH_BYTES

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # -- reading ------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._loc)

    def seq_of(self, fid: int) -> int:
        return self._seq[fid]

    def op_of(self, fid: int) -> int:
        return self._op[fid]

    def block_of(self, fid: int) -> int:
        return self._block[fid]

    def kind_of(self, fid: int) -> str | None:
        k = self._kind[fid]
        return self[fid].kind if k == MANY_KINDS else self._kind_names[k]

    @overload
    def __getitem__(self, i: int) -> FrameMeta: ...
    @overload
    def __getitem__(self, i: slice) -> list[FrameMeta]: ...

    def __getitem__(self, i: int | slice) -> FrameMeta | list[FrameMeta]:
        if isinstance(i, slice):
            return list(self._run(*i.indices(len(self._loc))[:2]))
        if i < 0:
            i += len(self._loc)
        loc = self._loc[i]  # raises IndexError past the end, as a list does
        hit = self._cache.get(i)
        if hit is not None and hit[0] == loc:
            return hit[1]
        f = self._dec.decode(self._read(i, loc))
        self._remember(i, loc, f)
        return f

    def _remember(self, fid: int, loc: int, f: FrameMeta) -> None:
        if len(self._cache) >= CACHE_FRAMES:
            self._cache = {}  # replaced, not cleared: readers may be using the old one
        self._cache[fid] = (loc, f)

    def __iter__(self) -> Iterator[FrameMeta]:
        return self._run(0, len(self._loc))

    def _read(self, fid: int, loc: int) -> bytes | bytearray:
        offset, n = loc >> LEN_BITS, loc & BIG
        if n == BIG:
            return self._big[fid]
        base, tail = self._tail  # after `loc`: a newer tail always holds what loc names
        if offset >= base:
            return tail[offset - base : offset - base + n]
        return os.pread(self._fd, n, offset)  # type: ignore[arg-type]

    def _run(self, start: int, stop: int) -> Iterator[FrameMeta]:
        """Frames start..stop-1, reading adjacent spilled encodings with one pread."""
        dec, locs = self._dec, self._loc
        i = start
        while i < stop:
            loc = locs[i]
            offset, n = loc >> LEN_BITS, loc & BIG
            spilled = self._tail[0]  # bytes below this offset are in the file
            if n == BIG or offset + n > spilled:
                yield dec.decode(self._read(i, loc))
                i += 1
                continue
            run, end = [loc], offset + n  # extend the run while the next encoding follows on
            while i + len(run) < stop and end - offset < RUN_BYTES:
                nxt = locs[i + len(run)]  # read once: a replace() may repoint it meanwhile
                if nxt >> LEN_BITS != end or nxt & BIG == BIG or end + (nxt & BIG) > spilled:
                    break
                end += nxt & BIG
                run.append(nxt)
            buf = memoryview(os.pread(self._fd, end - offset, offset))  # type: ignore[arg-type]
            for loc in run:
                at = (loc >> LEN_BITS) - offset
                yield dec.decode(buf[at : at + (loc & BIG)])
            i += len(run)
