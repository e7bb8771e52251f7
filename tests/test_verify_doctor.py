"""verify and doctor, in Python and on the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import engine
from engine import format as fmt
from workload import Workload, snapshot


def build(path: str, commits: int = 20, **options) -> Workload:
    w = Workload(seed=7)
    with engine.create(path, **options) as cap:
        for _ in range(commits):
            ops = w.batch()
            w.stage(cap, ops)
            cap.commit()
            w.committed(ops)
    return w


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "memvidd", *args], capture_output=True, text=True, timeout=60)


def test_verify_passes_a_healthy_capsule_and_doctor_is_the_identity(path):
    build(path, checkpoint_frames=7)
    before = Path(path).read_bytes()
    report = engine.verify(path)
    assert report.ok and not report.warnings and report.facts["payloads_checked"] > 0
    assert engine.doctor(path).repairs == ["nothing to repair"]
    assert Path(path).read_bytes() == before  # a repair tool that changes a sound file is broken


def test_doctor_cuts_a_torn_tail(path):
    w = build(path, checkpoint_frames=10**6)
    with open(path, "ab") as f:
        f.write(fmt.encode_record(fmt.BLOCK, b"\x01\x00\x00\x00" + b"x" * 100)[:60])
    report = engine.verify(path)
    assert report.ok and "torn tail" in report.warnings[0]
    dry = engine.doctor(path, dry_run=True)
    assert "cut torn tail: 60 bytes" in dry.repairs[0] and os.path.getsize(path) % 1 == 0
    size = os.path.getsize(path)
    report = engine.doctor(path)
    assert os.path.getsize(path) == size - 60 and report.facts["verified_after"] == 1
    with engine.open(path) as cap:
        assert snapshot(cap) == w.states[-1]


@pytest.mark.req("F-11")
def test_doctor_rebuilds_a_damaged_segment(path):
    w = build(path, checkpoint_frames=5)
    with engine.open(path, readonly=True) as cap:
        seg = cap._ckpt.segments[0]
    with open(path, "r+b") as f:
        f.seek(seg.offset + fmt.RECORD_SIZE + 3)
        f.write(b"\xde\xad")
    with pytest.raises(engine.CorruptionError, match="segment"):
        engine.open(path)
    assert not engine.verify(path).ok
    report = engine.doctor(path)
    assert report.ok and any("rebuilt the checkpoint" in r for r in report.repairs), report
    with engine.open(path) as cap:
        assert snapshot(cap) == w.states[-1]
        assert snapshot(cap, 5) == w.states[5]
    assert engine.verify(path).ok


def test_cli_verify_and_doctor_exit_codes(path):
    build(path, checkpoint_frames=5)
    ok = cli("verify", path, "--json")
    assert ok.returncode == 0 and json.loads(ok.stdout)["ok"] is True
    with engine.open(path, readonly=True) as cap:
        seg = cap._ckpt.segments[0]
    with open(path, "r+b") as f:
        f.seek(seg.offset + fmt.RECORD_SIZE + 1)
        f.write(b"\x00\x00\x00")
    bad = cli("verify", path)
    assert bad.returncode == 1 and "DAMAGED" in bad.stdout
    dry = cli("doctor", path, "--dry-run")
    assert dry.returncode == 0 and "rebuilt the checkpoint" in dry.stdout
    assert cli("verify", path).returncode == 1  # dry run changed nothing
    assert cli("doctor", path).returncode == 0
    assert cli("verify", path).returncode == 0
    missing = cli("verify", path + ".nope")
    assert missing.returncode == 1 and "cannot open" in missing.stdout
