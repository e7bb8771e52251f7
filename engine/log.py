"""Reading the log: records at known offsets, and the replay of the tail.

The tail is everything after the last checkpoint: the embedded write-ahead log. Replay
applies each COMMIT (and each RELOCATE of a codec upgrade) whose record and blocks are
intact, in order, and stops at the first
record that is torn, blank or garbage: that is the end of the log [F-06]. It then looks
past that point for an intact record that could only have been written once the damaged
one was durable (``later_proof``); finding one means the damage is not a torn tail but
corruption in the middle of the log, which is reported, never skipped [F-07].
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
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
        if rel >= 0 and rel + n <= len(self._buf):
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
    upto: int,
    apply: Callable[[fmt.CommitRecord, int], None],
    relocate: Callable[[fmt.RelocateRecord, int], None],
) -> Replay:
    """Apply every intact commit after ``start``; see the module docstring. Damage that
    a later record proves was not a torn tail raises ``CorruptionError`` whose
    ``replayed`` is what was applied before it (the caller's state has moved that far)."""
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
            if mv.seq != seq or not all(blocks.get(b.offset) == b.body_crc for b in mv.named()):
                break  # an upgrade cut short by a crash: the old blocks stay in use
            relocate(mv, pos)
            upto = max(upto, mv.upto)  # at least the table's (which caps it at its frame count)
        if rh.kind in fmt.APPLIED:
            result.end = pos + rec_len
            for k, v in pending_bytes.items():
                result.record_bytes[k] = result.record_bytes.get(k, 0) + v
            pending_bytes.clear()
            blocks.clear()
        pos += rec_len
    result.torn_bytes = size - result.end
    if pos < size and (proof := later_proof(cur, pos, seq, upto)) is not None:
        err = CorruptionError(
            f"damaged record after commit {seq}; {proof[1]} at offset {proof[0]} was written after "
            "it had been made durable, so this is not a torn tail", offset=pos,
        )
        err.replayed = result  # type: ignore[attr-defined]
        raise err
    return result


def _commit_intact(rec: fmt.CommitRecord, blocks: dict[int, int], seq: int, prev: int) -> bool:
    if rec.seq != seq + 1 or rec.prev != prev:
        return False
    return all(blocks.get(b.offset) == b.body_crc for b in rec.named())


SCAN = 1 << 20  # bytes searched for a record header at a time, past damage


def later_proof(cur: LogCursor, pos: int, seq: int, upto: int) -> tuple[int, str] | None:
    """``(offset, what)`` of an intact record that proves the damaged record at ``pos``
    was durable, or ``None``: the damage is a torn tail [F-07]. ``seq`` is the last commit
    before the damage and ``upto`` the codec upgrades' watermark there.

    Each write (a commit, a codec upgrade, a checkpoint) ends with its closing record and
    one fsync, and the next write starts only once that fsync returned, so a crash can
    tear the last write only. Proof is therefore any intact record after the closing
    record of the damaged write (the first record at or after ``pos`` whose header says it
    closes one), or one naming what the log before the damage lacks (``_names_later``).
    """
    closed = False  # past the damaged write's closing record?
    at = pos
    while (found := _next_header(cur, at)) is not None:
        q, rh = found
        stop = q + fmt.RECORD_SIZE + rh.length
        if stop > cur.end:
            return None  # claims the rest of the file: the torn record itself
        if q > pos and fmt.body_ok(rh, body := cur.read(q + fmt.RECORD_SIZE, rh.length)):
            if closed:
                return q, f"a {fmt.KIND_NAMES[rh.kind]} record"
            if (what := _names_later(cur, q, rh, body, seq, upto)) is not None:
                return q, what
        closed = closed or rh.kind in fmt.CLOSING
        at = stop
    return None


def _next_header(cur: LogCursor, pos: int) -> tuple[int, fmt.RecordHeader] | None:
    """The first intact record header at or after ``pos``, searched byte by byte past damage."""
    if (rh := fmt.decode_record_header(cur.read(pos, fmt.RECORD_SIZE))) is not None:
        return pos, rh
    pos += 1
    while pos < cur.end:
        window = cur.file.pread(pos, min(SCAN + fmt.RECORD_SIZE, cur.end - pos))
        i = window.find(fmt.RECORD_SYNC)
        while 0 <= i < SCAN:
            if (rh := fmt.decode_record_header(window, i)) is not None:
                return pos + i, rh
            i = window.find(fmt.RECORD_SYNC, i + 1)
        pos += SCAN
    return None


def _names_later(cur: LogCursor, q: int, rh: fmt.RecordHeader, body: bytes, seq: int, upto: int) -> str | None:
    """What the intact record at ``q`` proves was durable past commit ``seq`` (and codec
    upgrades up to frame ``upto``), if anything: a later commit, or an upgrade whose
    records are all intact (it began after the damaged write had ended)."""
    try:
        plain = opened(cur.file, q, rh, body)
        if rh.kind == fmt.COMMIT:
            c = fmt.meta_body(rh, plain, fmt.CommitRecord, offset=q)
            if c.seq > seq + 1 or (c.seq == seq + 1 and _intact(cur, c.named())):
                return f"commit {c.seq}"
        elif rh.kind == fmt.RELOCATE:
            m = fmt.meta_body(rh, plain, fmt.RelocateRecord, offset=q)
            if m.seq > seq or (m.seq == seq and _intact(cur, m.named())):
                return f"a codec upgrade after commit {m.seq}"
        elif rh.kind == fmt.CHECKPOINT:
            k = fmt.meta_body(rh, plain, fmt.CheckpointRecord, offset=q)
            if k.seq > seq or k.extra.get("codec", {}).get("upto", 0) > upto:
                return f"a checkpoint of commit {k.seq}"
        elif rh.kind == fmt.SEGMENT:
            g = fmt.meta_body(rh, plain, fmt.SegmentRecord, offset=q)
            if g.commits and g.commits[-1].seq > seq:
                return f"a segment of commit {g.commits[-1].seq}"
    except CorruptionError:
        pass  # fails authentication or does not decode: proves nothing
    return None


def _intact(cur: LogCursor, refs: Iterable[fmt.BlockRef]) -> bool:
    """Are all the records a COMMIT or RELOCATE names intact, with the CRCs it names?"""
    return all((r := cur.record(ref.offset)) is not None and r[0].body_crc == ref.body_crc for ref in refs)
