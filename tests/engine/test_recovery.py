"""Torn tails, truncation, bit flips and simulated power cuts [F-06, F-07].

The oracle everywhere: opening and reading a damaged capsule either yields exactly the
state after some commit (never a blend, never wrong bytes) or raises an ``EngineError``
saying the data is corrupt; never another exception, never a hang.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import engine
from engine import format as fmt
from engine import upgrade
from engine.fileio import OsFile
from engine.testing import CrashFile, SimulatedCrash, process_death
from workload import Workload, power_cut_at, snapshot


def build(path: str, seed: int, commits: int, **options) -> tuple[Workload, list[int]]:
    """A capsule with ``commits`` commits; returns the model and the log end after each."""
    w = Workload(seed)
    ends = [os.path.getsize(path) if os.path.exists(path) else 0]
    with engine.create(path, **options) as cap:
        ends = [os.path.getsize(path)]
        for _ in range(commits):
            ops = w.batch()
            w.stage(cap, ops)
            cap.commit()
            w.committed(ops)
            ends.append(os.path.getsize(path))
        cap.close()
    return w, ends


def record_offsets(path: str) -> list[int]:
    data = Path(path).read_bytes()
    pos, out = fmt.LOG_START, []
    while pos < len(data):
        rh = fmt.decode_record_header(data, pos)
        assert rh is not None
        out.append(pos)
        pos += fmt.RECORD_SIZE + rh.length
    return out + [len(data)]


def state_or_error(path: str) -> dict[str, bytes] | engine.EngineError:
    try:
        with engine.open(path) as cap:
            return snapshot(cap)
    except engine.EngineError as e:
        return e


@pytest.mark.req("F-06")
def test_truncation_at_every_record_boundary_recovers_the_last_commit(path, tmp_path):
    w, ends = build(path, seed=1, commits=12, checkpoint_frames=10**6, close_checkpoint_frames=10**6)
    copy = str(tmp_path / "cut.mv2")
    offsets = record_offsets(path)
    assert len(offsets) > 30
    for off in offsets[1:]:  # offsets[0] is the genesis checkpoint the header needs
        shutil.copy(path, copy)
        os.truncate(copy, off)
        expect = max(i for i, e in enumerate(ends) if e <= off)
        with engine.open(copy) as cap:
            assert cap.seq == expect, f"cut at {off}"
            assert snapshot(cap) == w.states[expect]
        assert os.path.getsize(copy) == ends[expect]  # the writer cut the torn tail
        os.unlink(copy)


@pytest.mark.req("F-06")
def test_truncation_at_random_bytes_of_the_tail(path, tmp_path):
    w, ends = build(path, seed=2, commits=10, checkpoint_frames=10**6, close_checkpoint_frames=10**6)
    rng = random.Random(2)
    copy = str(tmp_path / "cut.mv2")
    for off in sorted(rng.sample(range(ends[0] + 1, ends[-1]), 150)):
        shutil.copy(path, copy)
        os.truncate(copy, off)
        expect = max(i for i, e in enumerate(ends) if e <= off)
        with engine.open(copy, readonly=True) as cap:
            assert cap.seq == expect and snapshot(cap) == w.states[expect], f"cut at {off}"
        assert engine.verify(copy).ok, f"cut at {off}: a torn tail is not damage"
        os.unlink(copy)


@pytest.mark.req("F-07")
def test_bit_flips_give_a_commit_state_or_a_corruption_error(path, tmp_path):
    w, _ = build(path, seed=3, commits=15, checkpoint_frames=8)
    size = os.path.getsize(path)
    seed = 3
    rng = random.Random(seed)
    copy = str(tmp_path / "flip.mv2")
    outcomes = {"error": 0, "intact": 0, "prefix": 0}
    for _ in range(300):
        shutil.copy(path, copy)
        pos, bit = rng.randrange(size), rng.randrange(8)
        with open(copy, "r+b") as f:
            f.seek(pos)
            b = f.read(1)[0]
            f.seek(pos)
            f.write(bytes([b ^ (1 << bit)]))
        report = engine.verify(copy)  # first: a writer open would cut a damaged last commit
        got = state_or_error(copy)
        # Every byte is covered by a checksum, so verify notices every single flip.
        assert not report.ok or report.warnings, f"seed {seed}: flip at {pos} bit {bit} went unnoticed"
        if isinstance(got, engine.EngineError):
            outcomes["error"] += 1
        elif got == w.states[-1]:
            outcomes["intact"] += 1
        else:
            assert got in w.states, f"seed {seed}: flip at {pos} bit {bit} gave a state no commit had"
            outcomes["prefix"] += 1
        os.unlink(copy)
    assert outcomes["error"] and outcomes["intact"], outcomes


def test_damage_in_the_middle_of_the_log_is_corruption_not_a_torn_tail(path):
    _, ends = build(path, seed=4, commits=6, checkpoint_frames=10**6, close_checkpoint_frames=10**6)
    offsets = record_offsets(path)
    victim = next(o for o in offsets if ends[2] <= o < ends[3])  # a record of commit 3
    with open(path, "r+b") as f:
        f.seek(victim + fmt.RECORD_SIZE)
        f.write(b"\xff\xfe")
    with pytest.raises(engine.CorruptionError, match="not a torn tail"):
        engine.open(path)
    report = engine.verify(path)
    assert not report.ok and report.errors
    assert "nothing changed" in engine.doctor(path).repairs[0]
    with pytest.raises(engine.CorruptionError):  # doctor did not throw commits 4..6 away
        engine.open(path, readonly=True)


@pytest.mark.req("F-02")
def test_one_damaged_header_slot_falls_back_to_the_other(path):
    w, _ = build(path, seed=5, commits=8, checkpoint_frames=4)
    for slot in fmt.SLOT_OFFSETS:
        data = bytearray(Path(path).read_bytes())
        saved = data[slot : slot + 64]
        data[slot + 20 : slot + 28] = b"\x00" * 8
        Path(path).write_bytes(data)
        with engine.open(path, readonly=True) as cap:
            assert snapshot(cap) == w.states[-1]
        data[slot : slot + 64] = saved
        Path(path).write_bytes(data)


def test_both_header_slots_damaged_is_a_clear_error_and_doctor_repairs_it(path):
    w, _ = build(path, seed=6, commits=8, checkpoint_frames=4)
    with open(path, "r+b") as f:
        for slot in fmt.SLOT_OFFSETS:
            f.seek(slot + 20)
            f.write(b"\x55" * 8)
    with pytest.raises(engine.CorruptionError, match="header"):
        engine.open(path)
    report = engine.doctor(path)
    assert report.ok and any("rebuilt" in r for r in report.repairs), report
    with engine.open(path) as cap:
        assert snapshot(cap) == w.states[-1]
    assert engine.verify(path).ok


def test_a_foreign_file_is_not_a_capsule(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_bytes(b"just some text, not a capsule" * 400)
    with pytest.raises(engine.NotACapsule):
        engine.open(str(p))
    assert not engine.verify(str(p)).ok
    (tmp_path / "short").write_bytes(b"MV2")
    with pytest.raises(engine.EngineError):
        engine.open(str(tmp_path / "short"))


@pytest.mark.req("F-05")
@pytest.mark.parametrize("seed", range(4))
def test_power_cut_at_every_fsync(path, tmp_path, seed):
    """Crash at sync k, with unsynced writes kept/dropped/torn/garbled: the capsule opens
    at a commit at least as new as the last acknowledged one, exactly as committed."""
    engine.create(path).close()
    base = Path(path).read_bytes()
    k = 1
    while True:
        with open(path, "wb") as f:
            f.write(base)
        w = Workload(seed)
        acked = 0

        def work(cap):
            nonlocal acked
            for _ in range(10):
                ops = w.batch()
                w.stage(cap, ops)
                cap.commit()
                w.committed(ops)
                acked += 1

        image = power_cut_at(path, k, seed, work, checkpoint_frames=6)
        if image is None:
            break
        with open(path, "wb") as f:
            f.write(image)
        with engine.open(path) as cap:
            assert acked <= cap.seq <= acked + 1, f"seed {seed} sync {k}"
            assert snapshot(cap) == w.states[cap.seq] if cap.seq < len(w.states) else True
        assert engine.verify(path).ok, f"seed {seed} sync {k}"
        k += 1
    assert k > 10  # the loop really crashed at every sync of the workload


@pytest.mark.req("F-05")
def test_a_rolled_back_write_stays_cut_after_a_power_cut(tmp_path):
    """Rolled-back blocks are cut durably before the next write: were the cut lost in a
    power cut, intact records after a torn commit would pass for proof that it was
    durable [F-07], and a sound crashed capsule would not open."""
    outcomes = set()
    for seed in range(100):
        path = str(tmp_path / f"c{seed}.mv2")
        with engine.create(path, model=None) as cap:
            cap.put(b"first", uri="a")
            cap.commit()
        files: list[CrashFile] = []

        def factory(p: str, readonly: bool, seed: int = seed) -> CrashFile:
            files.append(CrashFile(OsFile.open(p, readonly=readonly), seed=seed))
            return files[-1]

        cap = engine.open(path, file_factory=factory)
        try:
            for i in range(4):
                cap.put(random.Random(i).randbytes(3000), uri=f"stale{i}")
            cap.rollback()
            cap.put(b"second", uri="b")
            files[-1].crash_at_sync = files[-1].syncs + 1  # the power fails in this commit
            with pytest.raises(SimulatedCrash):
                cap.commit()
        finally:
            process_death(cap)
        Path(path).write_bytes(files[-1].image)
        with engine.open(path, readonly=True) as cap:
            outcomes.add(cap.seq)
            assert snapshot(cap) in ({"a": b"first"}, {"a": b"first", "b": b"second"}), f"seed {seed}"
        assert engine.verify(path).ok, f"seed {seed}"
    assert outcomes == {1, 2}, outcomes


# -- damage to every record kind [F-06, F-07] --------------------------------------------

FAST_KDF = engine.KdfParams(memory_cost=64, iterations=1, lanes=1)  # tests only: real Argon2id, tiny costs
NO_AUTO_CHECKPOINT = {"checkpoint_frames": 10**6, "checkpoint_bytes": 1 << 40, "close_checkpoint_frames": 10**6}


def log_lines(n: int) -> list[str]:
    """Small, alike events: what a trained dictionary is made for."""
    rng = random.Random(9)
    return [f"2026-11-{rng.randint(1, 28):02d} INFO path=/api/v{rng.randint(1, 3)}/items "
            f"status={rng.choice([200, 304, 404])} user=user{rng.randrange(40):03d} ms={rng.randint(1, 900)}"
            for _ in range(n)]


def every_kind(path: str, passphrase: str | None) -> tuple[list[tuple[int, dict[str, bytes]]], int, bytes]:
    """A capsule whose log holds every record kind, written one fsynced write at a time.

    Returns, per write, the file size and the state after it; the index of the write
    whose checkpoint the header names; and the header as it was before the last write, a
    checkpoint: putting it back leaves the file as a crash between that checkpoint's
    fsync and its header update does, so the checkpoint lies in the replayed log.
    """
    rng = np.random.default_rng(1)
    writes: list[tuple[int, dict[str, bytes]]] = []
    with engine.create(path, passphrase=passphrase, kdf=FAST_KDF, **NO_AUTO_CHECKPOINT) as cap:

        def write(step: Callable[[], object]) -> None:
            step()
            writes.append((os.path.getsize(path), snapshot(cap)))

        for i, line in enumerate(log_lines(40)):
            cap.put(line, uri=f"log/{i}")
        cap.put("a first note", uri="n0", vector=rng.normal(size=384))
        write(cap.commit)  # BLOCK, VECTORS, COMMIT
        cap.put("a second note", uri="n1", vector=rng.normal(size=384))
        write(cap.commit)
        cap.find("note", mode="lex")  # from now on checkpoints copy the lexical index
        write(cap.checkpoint)  # SEGMENT, VECTORS (folded), LEXFILE, CHECKPOINT
        named = len(writes) - 1
        cap.put("the first note, again", uri="n0", vector=rng.normal(size=384))
        write(cap.commit)
        write(cap.upgrade_codecs)  # DICT, BLOCK, RELOCATE
        cap.put("a third note", uri="n2")
        cap.remove("n1")
        write(cap.commit)
        write(lambda: cap.rewind(2))  # a rewind COMMIT (restores a vector: VECTORS too)
        write(lambda: cap.set_rules({"default": {"max_age_s": 10**9}}))  # a rules COMMIT
        cap.put("the last note", uri="n3")
        write(cap.commit)
        write(cap.upgrade_codecs)  # a RELOCATE naming the last commit
        header = Path(path).read_bytes()[: fmt.LOG_START]
        write(cap.checkpoint)
    kinds = {fmt.KIND_NAMES[fmt.decode_record_header(Path(path).read_bytes(), o).kind] for o in record_offsets(path)[:-1]}
    assert kinds == set(fmt.KIND_NAMES.values()), kinds
    return writes, named, header


@pytest.mark.req("F-07")
def test_a_damaged_last_commit_is_an_error_when_a_codec_upgrade_follows_it(path):
    """A RELOCATE names the commit it follows: it proves that commit was durable, so
    damage to it is corruption, not a torn tail to cut (issue 11, item 4)."""
    with engine.create(path, model=None, **NO_AUTO_CHECKPOINT) as cap:
        for i in range(5):
            cap.put(f"note {i} " * 50, uri=f"u{i}")
            cap.commit()
        assert cap.upgrade_codecs()["blocks"]
        commit = cap._s.last_commit
    with open(path, "r+b") as f:
        f.seek(commit + fmt.RECORD_SIZE + 3)
        b = f.read(1)
        f.seek(commit + fmt.RECORD_SIZE + 3)
        f.write(bytes([b[0] ^ 1]))
    damaged = Path(path).read_bytes()
    report = engine.verify(path)
    assert not report.ok and "not a torn tail" in report.errors[0], report
    for readonly in (True, False):
        with pytest.raises(engine.CorruptionError, match="not a torn tail"):
            engine.open(path, readonly=readonly)
    assert "nothing changed" in engine.doctor(path).repairs[0]
    assert Path(path).read_bytes() == damaged  # the evidence is still there


def damage_points(path: str, writes: list[tuple[int, dict[str, bytes]]]) -> list[tuple[int, int, str, bool]]:
    """(byte, write, kind, in the header of the write's closing record): three bytes of
    each record (in its header, the first and the last of its body), for every record but
    the middle blocks of a write."""
    data = Path(path).read_bytes()
    ends = [e for e, _ in writes]
    offsets = record_offsets(path)
    points = []
    for n, off in enumerate(offsets[:-1]):
        rh = fmt.decode_record_header(data, off)
        w = next(i for i, e in enumerate(ends) if off < e)
        kinds = [fmt.decode_record_header(data, o).kind for o in offsets[max(0, n - 1) : n + 2] if o < len(data)]
        if kinds == [fmt.BLOCK] * 3:
            continue
        closing = offsets[n + 1] == ends[w]
        body = off + fmt.RECORD_SIZE
        points += [(off + 5, w, fmt.KIND_NAMES[rh.kind], closing), (body, w, fmt.KIND_NAMES[rh.kind], False),
                   (body + rh.length - 1, w, fmt.KIND_NAMES[rh.kind], False)]
    return points


def unfinished(path: str, start: int, end: int) -> int | None:
    """Where to cut the write ``[start, end)`` so that it lacks only its closing record
    (``None`` if that is all it has): what a crash before its fsync can leave."""
    cut = max(o for o in record_offsets(path) if o < end)
    return cut if cut > start else None


def outcome(path: str, passphrase: str | None, readonly: bool) -> dict[str, bytes] | engine.EngineError:
    try:
        with engine.open(path, readonly=readonly, passphrase=passphrase, **NO_AUTO_CHECKPOINT) as cap:
            return snapshot(cap)
    except engine.EngineError as e:
        return e


@pytest.mark.req("F-07")
@pytest.mark.timeout(120)
@pytest.mark.parametrize("passphrase", [None, "pw"], ids=["plain", "encrypted"])
def test_damage_to_any_record_is_an_error_unless_it_is_the_torn_last_write(path, tmp_path, monkeypatch, passphrase):
    """Flip a byte of each record of each kind, with the log cut after each write (and
    then again with the next write unfinished after it): the damage is a torn tail only in
    the last write, and then every reader, writer and ``verify`` sees exactly the state
    before that write; anywhere before it, later records prove the damaged one was
    durable, so readers and writers fail with ``CorruptionError`` (the writer cuts
    nothing) and ``verify`` reports it. Records the replay never reads (before the
    checkpoint the header names) may give the full state."""
    monkeypatch.setattr(upgrade, "DICT_MIN_SAMPLES", 30)  # a dictionary from 40 frames
    writes, named, header = every_kind(path, passphrase)
    full = Path(path).read_bytes()
    points = damage_points(path, writes)
    copy = str(tmp_path / "damaged.mv2")
    checked, failures = 0, []
    for last in range(named + 1, len(writes)):
        ends = [writes[last][0]]
        if last + 1 < len(writes):
            ends.append(unfinished(path, writes[last][0], writes[last + 1][0]))
        for end, torn in zip(ends, (last, last + 1)):
            if end is None:
                continue
            image = header + full[fmt.LOG_START : end]
            for b, w, kind, closing in points:
                if b >= end or (w < last - 1 and last < len(writes) - 1):
                    continue  # cut logs: damage the last two writes; the whole log: everywhere
                damaged = bytearray(image)
                damaged[b] ^= 0xFF
                Path(copy).write_bytes(damaged)
                # The damaged header of a write's closing record, before an unfinished write,
                # hides where one write ends: the file cannot tell it from a torn tail.
                unknowable = closing and w == torn - 1 == last
                try:
                    check_damage(copy, passphrase, damaged, writes, w, torn, writes[last][1], named, unknowable)
                except AssertionError as e:
                    failures.append(f"{kind} byte {b} of write {w}, writes {last} then {torn} torn: "
                                    f"{str(e).splitlines()[0]}")
                checked += 1
    assert not failures, f"{len(failures)} of {checked} damaged files:\n" + "\n".join(failures[:40])
    assert checked > 300, checked


def check_damage(path: str, passphrase: str | None, damaged: bytes, writes: list[tuple[int, dict[str, bytes]]],
                 w: int, torn: int, final: dict[str, bytes], named: int, unknowable: bool) -> None:
    """The oracle of the test above, for damage in write ``w`` when write ``torn`` is the
    last one in the file (unfinished or not) and ``final`` the state of the last complete write."""
    report = engine.verify(path, passphrase=passphrase)
    reader = outcome(path, passphrase, readonly=True)
    writer = outcome(path, passphrase, readonly=False)
    after = Path(path).read_bytes()
    if w == torn or (unknowable and not isinstance(reader, engine.CorruptionError)):
        # A torn tail: the last durable state, cut by the writer.
        assert reader == writes[w - 1][1], f"reader: {reader}"
        assert writer == writes[w - 1][1], f"writer: {writer}"
        assert len(after) == writes[w - 1][0], "the writer did not cut the torn tail"
        assert report.ok and report.warnings, f"verify: {report.errors}"
        return
    if w > named:  # in the replayed log: an error, always
        assert isinstance(reader, engine.CorruptionError), "reader: no CorruptionError"
        assert not report.ok, "verify: ok"
    else:
        assert isinstance(reader, engine.CorruptionError) or reader == final, "reader: an older state"
        assert not report.ok or report.warnings, "verify: unnoticed"
    assert type(writer) is type(reader), f"writer: {writer}"
    if isinstance(writer, engine.EngineError):
        assert after == damaged, "the writer changed a damaged file"
    else:  # all commits there: the writer may cut a torn write, nothing else
        assert after == damaged[: len(after)], "the writer changed a damaged file"


class HalfLandedFile(OsFile):
    """A reader's view of a file a writer is appending to: the bytes in ``blind`` read as
    zeros until they have been read ``misses`` times (the writer's pwrite landing while
    the reader's pread copies pages)."""

    blind: tuple[int, int] = (0, 0)
    misses = 0

    def pread(self, offset: int, n: int) -> bytes:
        data = super().pread(offset, n)
        lo, hi = self.blind
        if self.misses and offset < hi and offset + n > lo:
            HalfLandedFile.misses -= 1
            a, b = max(lo, offset) - offset, min(hi, offset + n) - offset
            data = data[:a] + bytes(b - a) + data[b:]
        return data


def test_a_reader_that_caught_a_write_half_landed_looks_again_after_what_it_applied(tmp_path):
    """A reader's catch-up applies commit 4, then sees commit 5 half landed with commit 6
    whole after it: that looks like damage proven by a later record. Looking again must
    start after commit 4, which is applied already (it started over from before it, found
    commit 4 a second time, and called the capsule corrupt three times in a row)."""
    path = str(tmp_path / "r.mv2")
    with engine.create(path, model=None) as w:
        for i in range(3):
            w.put(f"before {i}", uri=f"b://{i}")
            w.commit()
        r = engine.open(path, readonly=True, file_factory=HalfLandedFile.open)
        try:
            assert r.seq == 3
            offsets = []
            for i in range(3):
                w.put(f"after {i}", uri=f"a://{i}")
                w.commit()
                offsets.append(os.path.getsize(path))
            HalfLandedFile.blind, HalfLandedFile.misses = (offsets[0], offsets[1]), 1  # commit 5's bytes
            assert r.refresh() == 3
            assert r.seq == 6
            assert [r.get(uri=f"a://{i}").text for i in range(3)] == ["after 0", "after 1", "after 2"]
        finally:
            HalfLandedFile.misses = 0
            r.close()
