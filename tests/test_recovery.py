"""Torn tails, truncation, bit flips and simulated power cuts [F-06, F-07].

The oracle everywhere: opening and reading a damaged capsule either yields exactly the
state after some commit (never a blend, never wrong bytes) or raises an ``EngineError``
saying the data is corrupt; never another exception, never a hang.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import pytest

import engine
from engine import format as fmt
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
    with pytest.raises(engine.CorruptionError, match="later commits exist"):
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
