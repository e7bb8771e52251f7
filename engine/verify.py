"""Offline integrity check (``verify``) and repair (``doctor``) of a capsule file.

``verify`` walks every record from the start of the log, independently of the
checkpoint: it checks every checksum, replays every commit into a fresh frame table
(which enforces the version invariants), decodes every payload against its digest, and
then checks that the checkpoint the header points at agrees with that replay.

A writer may be appending while ``verify`` reads (readers take no lock [F-13]), so it
checks one snapshot: the header as read first and the file up to the size read just
after it. The header names only bytes that were durable before it was written, so the
snapshot holds its checkpoint; whatever is appended later is not looked at.

``doctor`` fixes what can be fixed without guessing: it cuts a torn tail, and when a
header slot, the checkpoint or its segments are damaged it points the header back at the
genesis checkpoint and writes a fresh one from a full replay. Damage to committed
frames or payloads is reported, never papered over.
"""

from __future__ import annotations

from typing import Any

import msgspec

from . import format as fmt
from .capsule import open as open_capsule
from .errors import CorruptionError, EngineError, NotACapsule
from .fileio import OsFile
from .genesis import genesis, genesis_extra, unlock
from .log import LogCursor, later_proof, opened
from .reading import Dictionaries, load_checkpoint, read_payload
from .table import FrameTable

MAX_LISTED = 50  # errors listed in a report; the count is always exact


class Report(msgspec.Struct, kw_only=True):
    path: str
    ok: bool = True
    errors: list[str] = []
    warnings: list[str] = []
    repairs: list[str] = []
    error_count: int = 0
    facts: dict[str, int] = {}

    def error(self, text: str) -> None:
        self.ok = False
        self.error_count += 1
        if len(self.errors) < MAX_LISTED:
            self.errors.append(text)

    def to_dict(self) -> dict[str, object]:
        return msgspec.to_builtins(self)


class _Scan(msgspec.Struct):
    slots: bytes  # the header region as read first: the snapshot's header
    table: FrameTable
    end: int  # just past the last applied commit (or the live checkpoint after it)
    last_commit: int
    size: int
    damage: list[tuple[int, int]]  # [start, stop) byte ranges that hold no intact record
    stuck: list[tuple[int, int]]  # (offset, seq) of intact commits that could not apply
    checkpoints: list[tuple[int, bytes, dict[str, Any]]]  # (offset, capsule id, genesis extra) of intact ones
    derived: list[tuple[int, str]] = []  # damaged segment/checkpoint records (rebuildable)
    stuck_moves: list[int] = []  # offsets of intact RELOCATE records that could not apply
    locations: dict[int, set[tuple[int, int]]] = {}  # frame id -> every (block, start) it had
    torn: int = 0
    commits_end: int = fmt.LOG_START  # just past the last applied commit


def _next_record(cur: LogCursor, pos: int, size: int) -> int:
    """The offset of the next intact record at or after ``pos`` (``size`` if none)."""
    while pos < size:
        window = cur.file.pread(pos, min(1 << 20, size - pos))
        i = window.find(fmt.RECORD_SYNC)
        while i >= 0:
            if cur.record(pos + i) is not None:
                return pos + i
            i = window.find(fmt.RECORD_SYNC, i + 1)
        pos += max(len(window) - 1, 1)
    return size


def _scan(f: OsFile, report: Report) -> _Scan:
    """Replay the whole log of the snapshot: the header first, then the size (see the
    module docstring)."""
    slots = f.pread(0, fmt.LOG_START)
    size = f.size()
    cur = LogCursor(f, size)
    s = _Scan(slots, FrameTable(), fmt.LOG_START, 0, size, [], [], [], [])
    blocks: dict[int, int] = {}
    counts: dict[str, int] = {}
    pos = fmt.LOG_START
    while pos < size:
        found = cur.record(pos)
        if found is None:
            rh = fmt.decode_record_header(cur.read(pos, fmt.RECORD_SIZE))
            stop = pos + fmt.RECORD_SIZE + rh.length if rh else 0
            if rh and rh.kind in fmt.DERIVED and stop <= size:
                # Derived data: doctor can rebuild it from the commits.
                s.derived.append((pos, fmt.KIND_NAMES[rh.kind]))
                pos = stop
                continue
            nxt = _next_record(cur, pos + 1, size)
            s.damage.append((pos, nxt))
            pos = nxt
            continue
        rh, body = found
        name = fmt.KIND_NAMES[rh.kind]
        counts[f"records.{name}"] = counts.get(f"records.{name}", 0) + 1
        counts[f"bytes.{name}"] = counts.get(f"bytes.{name}", 0) + fmt.RECORD_SIZE + rh.length
        if rh.kind in fmt.PAYLOAD:
            blocks[pos] = rh.body_crc
        elif rh.kind == fmt.CHECKPOINT:
            try:
                ck = fmt.meta_body(rh, opened(f, pos, rh, body), fmt.CheckpointRecord, offset=pos)
                s.checkpoints.append((pos, ck.capsule_id, genesis_extra(ck.extra)))
            except CorruptionError as e:
                report.error(str(e))
        elif rh.kind == fmt.COMMIT:
            try:
                rec = fmt.meta_body(rh, opened(f, pos, rh, body), fmt.CommitRecord, offset=pos)
            except CorruptionError as e:
                report.error(str(e))
                rec = None
            if rec is not None:
                intact = (
                    rec.seq == s.table.seq + 1
                    and rec.prev == s.last_commit
                    and all(blocks.get(b.offset) == b.body_crc for b in rec.named())
                )
                if intact:
                    try:
                        s.table.apply(rec, pos)
                        s.last_commit = pos
                        s.end = s.commits_end = pos + fmt.RECORD_SIZE + rh.length
                        blocks.clear()
                    except CorruptionError as e:
                        report.error(str(e))
                        s.stuck.append((pos, rec.seq))
                else:
                    s.stuck.append((pos, rec.seq))
        elif rh.kind == fmt.RELOCATE:
            _relocate(s, f, pos, rh, body, blocks, report)
        pos += fmt.RECORD_SIZE + rh.length
    report.facts.update(counts)
    return s


def _relocate(s: _Scan, f: OsFile, pos: int, rh: fmt.RecordHeader, body: bytes, blocks: dict[int, int],
              report: Report) -> None:
    """Apply a codec upgrade's moves [F-16]; one that cannot apply is a torn upgrade
    when it is the last thing in the log, damage otherwise (decided like commits)."""
    try:
        mv = fmt.meta_body(rh, opened(f, pos, rh, body), fmt.RelocateRecord, offset=pos)
    except CorruptionError as e:
        report.error(str(e))
        return
    if mv.seq != s.table.seq or not all(blocks.get(b.offset) == b.body_crc for b in mv.named()):
        s.stuck_moves.append(pos)
        return
    for m in mv.moves:
        if m.id < s.table.next_id:
            old = s.table.frames[m.id]
            s.locations.setdefault(m.id, set()).update({(old.block, old.start), (m.block, m.start)})
    try:
        s.table.relocate(mv, pos)
    except CorruptionError as e:
        report.error(str(e))
        return
    s.end = s.commits_end = pos + fmt.RECORD_SIZE + rh.length
    blocks.clear()


def _classify(s: _Scan, f: OsFile, report: Report) -> None:
    """Damage after the last applied commit is a torn tail, unless a record past it proves
    the damaged one was durable: the test replay makes ([F-07], ``later_proof``)."""
    header = _newest(s.slots)
    if header is not None:
        # A checkpoint written after the last commit is part of the log, not its tail.
        ck_end = header.checkpoint_offset + header.checkpoint_length
        if ck_end <= s.size:
            s.end = max(s.end, ck_end)
    problems = (*(start for start, _ in s.damage), *(off for off, _ in s.stuck), *s.stuck_moves)
    tail = [off for off in problems if off >= s.end]
    proof = later_proof(LogCursor(f, s.size), min(tail), s.table.seq, s.table.upgraded_upto) if tail else None
    if proof is not None:
        report.error(f"{proof[1]} at offset {proof[0]} was written after the damage listed next had been "
                     "made durable: this is not a torn tail")
    for start, stop in s.damage:
        if start < s.end or proof:
            report.error(f"damaged bytes {start}..{stop} (after commit {s.table.seq})")
    for off, seq in s.stuck:
        if off < s.end or proof:
            report.error(f"commit {seq} at offset {off} cannot be applied")
    for off in s.stuck_moves:
        if off < s.end or proof:
            report.error(f"codec upgrade at offset {off} cannot be applied")
    for off, kind in s.derived:
        if off < s.end:
            report.warnings.append(f"damaged {kind} record at offset {off} (derived data)")
    s.torn = s.size - s.end
    if s.torn and not proof:
        report.warnings.append(
            f"torn tail: {s.torn} bytes after commit {s.table.seq} (a crash leaves these; "
            "the next writer open or `doctor` cuts them)"
        )


def _unlocked(f: OsFile, passphrase: str | bytes | None, report: Report) -> bool:
    """Give an encrypted capsule's file its sealer; False (reported) when that fails."""
    header = _newest_header(f)
    if header is None or not header.flags & fmt.HEADER_ENCRYPTED:
        return True
    if passphrase is None:
        report.error("the capsule is encrypted: checking it needs its passphrase")
        return False
    try:
        unlock(f, header, passphrase)
    except EngineError as e:
        report.error(str(e))
        return False
    return True


def _check_payloads(f: OsFile, table: FrameTable, report: Report) -> None:
    checked = 0
    dicts = Dictionaries(f, table)
    for m in table.frames:
        if m.op != fmt.PUT:
            continue
        try:
            read_payload(f, m, None, dicts)
            checked += 1
        except EngineError as e:
            report.error(f"frame {m.id}: {e}")
    report.facts["payloads_checked"] = checked


def _check_header_and_checkpoint(f: OsFile, s: _Scan, report: Report) -> bool:
    """Are the header slots and the checkpoint intact and true to the log? Reports why not."""
    raw = s.slots
    slots = []
    for i, off in enumerate(fmt.SLOT_OFFSETS):
        h = fmt.decode_header(raw[off : off + fmt.SLOT_SIZE])
        if h is None:
            # A slot that changed since is one a live writer was writing, not damage.
            if f.pread(off, fmt.SLOT_SIZE) == raw[off : off + fmt.SLOT_SIZE]:
                report.warnings.append(f"header slot {'AB'[i]} is damaged (the other slot is used)")
        else:
            slots.append(h)
    if not slots:
        report.error("both header slots are damaged")
        return False
    header = max(slots, key=lambda h: h.generation)
    try:
        ckpt, ck_table = load_checkpoint(f, header)
    except CorruptionError as e:
        report.error(f"checkpoint: {e}")
        return False
    n, q = ck_table.next_id, ck_table.seq
    # A checkpoint taken before a codec upgrade names the frames' earlier blocks [F-16].
    frames = [
        _at(f, s.table.frames[f.id]) if (f.block, f.start) in s.locations.get(f.id, ()) else f
        for f in ck_table.frames
    ]
    if frames != s.table.frames[:n] or ck_table.commits != s.table.commits[:q]:
        report.error("checkpoint segments disagree with the log")
        return False
    report.facts["checkpoint_seq"] = ckpt.seq
    return True


def _at(f: fmt.FrameMeta, where: fmt.FrameMeta) -> fmt.FrameMeta:
    return msgspec.structs.replace(f, block=where.block, start=where.start)


def verify(path: str, *, passphrase: str | bytes | None = None) -> Report:
    """Check every checksum and invariant of the capsule at ``path``; never writes.
    An encrypted capsule needs its ``passphrase`` (every record is authenticated too)."""
    report = Report(path=str(path))
    try:
        f = OsFile.open(str(path), readonly=True)
    except OSError as e:
        report.error(f"cannot open: {e}")
        return report
    try:
        if f.size() < fmt.LOG_START:
            report.error("file is shorter than its header")
            return report
        fmt.decode_slots(f.pread(0, fmt.LOG_START))  # raises NotACapsule on foreign files
        if not _unlocked(f, passphrase, report):
            return report
        s = _scan(f, report)
        _classify(s, f, report)
        _check_header_and_checkpoint(f, s, report)
        _check_payloads(f, s.table, report)
        report.facts.update(commits=s.table.seq, frames=s.table.next_id, file_bytes=s.size, torn_bytes=s.torn)
    except NotACapsule as e:
        report.error(str(e))
    except EngineError as e:
        report.error(f"verify stopped: {e}")
    finally:
        f.close()
    return report


def doctor(path: str, *, dry_run: bool = False, reindex: bool = False,
           passphrase: str | bytes | None = None) -> Report:
    """Repair what can be repaired (see the module docstring); report what was done.

    ``reindex`` also rebuilds both search indexes from the frames and stored vectors.
    """
    path = str(path)
    report = _repair(path, dry_run, passphrase)
    if reindex and report.ok:
        if dry_run:
            report.repairs.append("would rebuild the search indexes")
        else:
            with open_capsule(path, passphrase=passphrase) as cap:
                origin = cap.rebuild_indexes()
                frames = cap.stats()["frames"]
            report.repairs.append(f"rebuilt the search indexes from {frames} frames ({origin})")
            report.facts["verified_after"] = int(verify(path, passphrase=passphrase).ok)
    return report


def _repair(path: str, dry_run: bool, passphrase: str | bytes | None) -> Report:
    report = Report(path=path)
    f = OsFile.open(path, readonly=dry_run)
    try:
        if not dry_run:
            f.lock()
        fmt.decode_slots(f.pread(0, fmt.LOG_START))
        if not _unlocked(f, passphrase, report):
            return report
        s = _scan(f, report)
        _classify(s, f, report)
        if not report.ok:
            report.repairs.append("nothing changed: committed data is damaged (see errors)")
            return report
        header_ok = _check_header_and_checkpoint(f, s, report)
        if header_ok and not s.torn:
            report.repairs.append("nothing to repair")
            return report
        report.ok = True  # the problems found so far are the ones doctor repairs
        report.errors.clear()
        report.error_count = 0
        keep = s.end  # includes the checkpoint when it is intact (see _classify)
        if not header_ok:
            keep = s.commits_end
        if s.size > keep:
            report.repairs.append(f"cut torn tail: {s.size - keep} bytes after commit {s.table.seq}")
            if not dry_run:
                f.truncate(keep)
                f.sync()
        if not header_ok:
            report.repairs.append(
                f"rebuilt the checkpoint from a full replay of {s.table.seq} commits"
            )
            if not dry_run:
                _reset_to_genesis(f, s)
        if dry_run:
            return report
    finally:
        f.close()
    if not header_ok:
        with open_capsule(path, passphrase=passphrase) as cap:  # replays the whole log from genesis
            cap.checkpoint()
    report.facts["verified_after"] = int(verify(path, passphrase=passphrase).ok)
    return report


def _newest_header(f: OsFile) -> fmt.Header | None:
    return _newest(f.pread(0, fmt.LOG_START))


def _newest(raw: bytes) -> fmt.Header | None:
    return max(fmt.decode_slots(raw), key=lambda h: h.generation, default=None)


def _reset_to_genesis(f: OsFile, s: _Scan) -> None:
    """Point both header slots at the genesis checkpoint, rewriting it if it is damaged."""
    h = _newest_header(f)
    header_flags, keyslot = 0, b""
    if h is not None:
        capsule_id, created, gen = h.capsule_id, h.created, h.generation
        header_flags, keyslot = h.flags, h.keyslot  # an encrypted capsule's key slot lives on
    elif s.checkpoints:
        capsule_id, created, gen = s.checkpoints[0][1], 0.0, 0
    else:
        raise CorruptionError("no header and no checkpoint left to learn the capsule id from")
    extra = s.checkpoints[0][2] if s.checkpoints else {}
    first = genesis(capsule_id, extra, f.sealer)
    if not s.checkpoints or s.checkpoints[0][0] != fmt.LOG_START:
        # The genesis record is damaged; its bytes are determined by the capsule id and
        # model, so it can be written again in place, at the same length.
        f.pwrite(fmt.LOG_START, first)
    f.sync()
    for i in (1, 2):  # one slot at a time, synced, so one is always intact
        h = fmt.Header(gen + i, capsule_id, created, fmt.LOG_START, len(first),
                       flags=header_flags, keyslot=keyslot)
        f.pwrite(fmt.SLOT_OFFSETS[h.generation % 2], fmt.encode_header(h))
        f.sync()
