"""Reading the log: records at known offsets, and the replay of the tail.

The tail is everything after the last checkpoint: the embedded write-ahead log. Replay
applies each COMMIT (and each RELOCATE of a codec upgrade) whose record and blocks are
intact, in order, and stops at the first
record that is torn, blank or garbage: that is the end of the log [F-06]. It then looks
past that point for a *later* intact commit; finding one means the damage is not a torn
tail but corruption in the middle of the log, which is reported, never skipped [F-07].
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from . import format as fmt
from .errors import CorruptionError
from .fileio import CapsuleFile

READ_AHEAD = 1 << 20


class LogCursor:
    """Sequential reads with a read-ahead window, so a scan is not one syscall a record."""

    def __init__(self, file: CapsuleFile, end: int) -> None:
        self.file = file
        self.end = end
        self._base = 0
        self._buf = b""

    def read(self, offset: int, n: int) -> bytes:
        n = max(0, min(n, self.end - offset))
        rel = offset - self._base
        if 0 <= rel and rel + n <= len(self._buf):
            return self._buf[rel : rel + n]
        if n > READ_AHEAD:
            return self.file.pread(offset, n)
        self._base = offset
        self._buf = self.file.pread(offset, min(READ_AHEAD, self.end - offset))
        return self._buf[:n]

    def record(self, offset: int) -> tuple[fmt.RecordHeader, bytes] | None:
        """The intact record at ``offset``, or ``None`` if anything about it is off."""
        rh = fmt.decode_record_header(self.read(offset, fmt.RECORD_SIZE))
        if rh is None or offset + fmt.RECORD_SIZE + rh.length > self.end:
            return None
        body = self.read(offset + fmt.RECORD_SIZE, rh.length)
        return (rh, body) if fmt.body_ok(rh, body) else None


def opened(file: CapsuleFile, offset: int, rh: fmt.RecordHeader, body: bytes) -> bytes:
    """The plain body of an intact record: sealed bodies of encrypted capsules are
    authenticated and decrypted here [F-19]; plain capsules' pass through."""
    sealer = getattr(file, "sealer", None)
    return sealer.open(offset, rh.kind, rh.flags, body) if sealer is not None and sealer.encrypted else body


def read_record(file: CapsuleFile, offset: int, kind: int) -> tuple[fmt.RecordHeader, bytes]:
    """A record the committed state points at, opened; damage here is corruption."""
    head = file.pread(offset, fmt.RECORD_SIZE)
    rh = fmt.decode_record_header(head)
    if rh is None or rh.kind != kind:
        raise CorruptionError(f"expected a {fmt.KIND_NAMES[kind]} record", offset=offset)
    body = file.pread(offset + fmt.RECORD_SIZE, rh.length)
    if not fmt.body_ok(rh, body):
        raise CorruptionError(f"{fmt.KIND_NAMES[kind]} record checksum mismatch", offset=offset)
    return rh, opened(file, offset, rh, body)


def read_meta(file: CapsuleFile, offset: int, kind: int, typ: type) -> Any:
    """The decoded msgpack body of the record at ``offset``."""
    rh, body = read_record(file, offset, kind)
    return fmt.meta_body(rh, body, typ, offset=offset)


class Replay(msgspec.Struct):
    """What a tail replay found."""

    end: int  # just after the last intact commit (or the start, if none)
    last_commit: int  # offset of that commit record, 0 if none was applied
    commits: int = 0
    torn_bytes: int = 0  # bytes after ``end`` up to the size of the file
    record_bytes: dict[str, int] = {}  # bytes of applied records, by kind
    vectors: list[int] = []  # offsets of the VECTORS records of the applied commits


def replay(
    file: CapsuleFile,
    start: int,
    size: int,
    seq: int,
    last_commit: int,
    apply: Callable[[fmt.CommitRecord, int], None],
    relocate: Callable[[fmt.RelocateRecord, int], None],
) -> Replay:
    """Apply every intact commit after ``start``; see the module docstring."""
    cur = LogCursor(file, size)
    result = Replay(end=start, last_commit=last_commit)
    blocks: dict[int, int] = {}  # offset -> body crc of intact blocks seen since `end`
    pending_bytes: dict[str, int] = {}
    pos = start
    while pos < size:
        rh = fmt.decode_record_header(cur.read(pos, fmt.RECORD_SIZE))
        if rh is None or pos + fmt.RECORD_SIZE + rh.length > size:
            break
        name = fmt.KIND_NAMES[rh.kind]
        rec_len = fmt.RECORD_SIZE + rh.length
        pending_bytes[name] = pending_bytes.get(name, 0) + rec_len
        if rh.kind in fmt.PAYLOAD or rh.kind in fmt.APPLIED:
            # Segments and checkpoints are derived data that replay never needs, so
            # their bodies are neither read nor required to be intact here.
            body = cur.read(pos + fmt.RECORD_SIZE, rh.length)
            if not fmt.body_ok(rh, body):
                if rh.kind in fmt.APPLIED:
                    break
                pos += rec_len  # a damaged block fails the commit that names it
                continue
        if rh.kind in fmt.PAYLOAD:
            blocks[pos] = rh.body_crc
        elif rh.kind == fmt.COMMIT:
            rec = fmt.meta_body(rh, opened(file, pos, rh, body), fmt.CommitRecord, offset=pos)
            if not _commit_intact(rec, blocks, seq, result.last_commit):
                break  # its blocks did not all land: a torn, unacknowledged commit
            apply(rec, pos)
            result.vectors.extend(v.offset for v in rec.vectors)
            seq = rec.seq
            result.commits += 1
            result.last_commit = pos
        elif rh.kind == fmt.RELOCATE:
            mv = fmt.meta_body(rh, opened(file, pos, rh, body), fmt.RelocateRecord, offset=pos)
            named = (*mv.blocks, *(fmt.BlockRef(d.offset, d.body_crc) for d in mv.dicts))
            if mv.seq != seq or not all(blocks.get(b.offset) == b.body_crc for b in named):
                break  # an upgrade cut short by a crash: the old blocks stay in use
            relocate(mv, pos)
        if rh.kind in fmt.APPLIED:
            result.end = pos + rec_len
            for k, v in pending_bytes.items():
                result.record_bytes[k] = result.record_bytes.get(k, 0) + v
            pending_bytes.clear()
            blocks.clear()
        pos += rec_len
    result.torn_bytes = size - result.end
    if pos < size and _later_commit(cur, pos + 1, size, seq):
        raise CorruptionError(
            f"damaged record after commit {seq}, but later commits exist", offset=pos
        )
    return result


def _commit_intact(rec: fmt.CommitRecord, blocks: dict[int, int], seq: int, prev: int) -> bool:
    if rec.seq != seq + 1 or rec.prev != prev:
        return False
    return all(blocks.get(b.offset) == b.body_crc for b in (*rec.blocks, *rec.vectors))


def _later_commit(cur: LogCursor, pos: int, size: int, seq: int) -> bool:
    """Is there an intact COMMIT, blocks included, numbered after ``seq`` past ``pos``?

    A crash can leave a commit record on disk whose blocks never landed; that commit
    was never acknowledged, so it is a torn tail, not evidence of corruption.
    """
    chunk = 1 << 20
    while pos < size:
        window = cur.file.pread(pos, min(chunk + fmt.RECORD_SIZE, size - pos))
        i = window.find(fmt.RECORD_SYNC)
        while 0 <= i < min(chunk, len(window)):
            found = cur.record(pos + i)
            if found is not None and found[0].kind == fmt.COMMIT:
                try:
                    rec = fmt.meta_body(found[0], opened(cur.file, pos + i, *found), fmt.CommitRecord, offset=pos + i)
                except CorruptionError:
                    rec = None
                if rec is not None and rec.seq > seq and all(
                    (b := cur.record(ref.offset)) is not None and b[0].body_crc == ref.body_crc
                    for ref in (*rec.blocks, *rec.vectors)
                ):
                    return True
            i = window.find(fmt.RECORD_SYNC, i + 1)
        pos += chunk
    return False
