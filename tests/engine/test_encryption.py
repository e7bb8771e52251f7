"""Encrypted capsules [F-19]: queryable while open, opaque on disk, tamper-evident.

Real cryptography throughout (AES-256-GCM, Argon2id with small costs for speed; one test
uses the default costs). Plaintext checks look at every byte the capsule wrote: the file
itself, and the index working copies, which must not outlive the open capsule.
"""

from __future__ import annotations

import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

import engine
from engine import crypto
from engine import format as fmt
from engine.ramcopies import ram_root
from workload import Workload, power_cut_at, snapshot

FAST = engine.KdfParams(memory_cost=1024, iterations=1)  # tests only: real Argon2id, tiny costs
PASS = "correct horse battery staple"
MARK = "ZQXJ-PLAINTEXT-MARKER"


def make(path: str, *, passphrase: str | None = PASS, n: int = 60, **options) -> list[int]:
    rng = np.random.default_rng(1)
    with engine.create(path, passphrase=passphrase, kdf=FAST, **options) as cap:
        ids = []
        for i in range(n):
            ids.append(cap.put(f"{MARK} note {i}: apples and pears " * 20, uri=f"note://{MARK}/{i % 20}",
                               title=f"{MARK} title {i}", tags={"secret": MARK}, vector=rng.normal(size=384)))
            if i % 10 == 9:
                cap.commit()
        assert cap.encrypted == (passphrase is not None)
        cap.checkpoint()  # blocks are then checked when read (by the AEAD), not by replay
        return ids


def tree_bytes(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in root.rglob("*") if p.is_file()) if root.exists() else b""


@pytest.mark.req("F-19")
def test_encrypted_capsule_works_and_writes_no_plaintext(tmp_path):
    path = str(tmp_path / "c.mv2e")
    index_dir = tmp_path / "index"  # where a plain capsule would keep its working copies
    make(path, index_dir=str(index_dir))
    with engine.open(path, passphrase=PASS, index_dir=str(index_dir)) as cap:
        hits = cap.find("apples", mode="lex", k=5)
        assert len(hits) == 5 and MARK in hits[0].snippet
        assert cap.get(uri=f"note://{MARK}/3", as_of=2).text.startswith(f"{MARK} note 3")
        assert cap.vectors([0])[0].shape == (384,)
        sealed = Path(ram_root()) / "sealed"
        live = [d for d in sealed.iterdir() if d.name.startswith(cap.capsule_id.hex())]
        assert live, "an open encrypted capsule keeps its working copies in RAM-backed storage"
        cap.upgrade_codecs()  # dictionaries and relocations are sealed too
        cap.checkpoint()  # segments, checkpoint and lexical index copy, all sealed
    raw = Path(path).read_bytes()
    for needle in (MARK.encode(), b"apples and pears", b"note://", b"secret", b"title"):
        assert needle not in raw, needle
    assert MARK.encode() not in tree_bytes(index_dir)  # nothing decrypted reached the disk
    assert not [d for d in (Path(ram_root()) / "sealed").iterdir()
                if d.name.startswith(live[0].name.split("-")[0])], "working copies removed on close"
    report = engine.verify(path, passphrase=PASS)
    assert report.ok, report.errors
    with engine.open(path, passphrase=PASS, readonly=True) as cap:
        assert len(cap.find("apples", mode="lex", k=100)) == 20


def test_wrong_or_missing_passphrase_is_a_clear_error_not_corruption(tmp_path):
    path = str(tmp_path / "c.mv2e")
    make(path, n=10)
    with pytest.raises(engine.WrongPassphrase, match="wrong passphrase"):
        engine.open(path, passphrase="not it")
    with pytest.raises(engine.InvalidArgument, match="encrypted"):
        engine.open(path)
    assert not engine.verify(path).ok
    assert "passphrase" in engine.verify(path).errors[0]
    assert not engine.verify(path, passphrase="not it").ok
    plain = str(tmp_path / "p.mv2")
    make(plain, passphrase=None, n=10)
    with pytest.raises(engine.InvalidArgument, match="not encrypted"):
        engine.open(plain, passphrase=PASS)


def records(path: str) -> list[tuple[int, fmt.RecordHeader]]:
    data = Path(path).read_bytes()
    out, pos = [], fmt.LOG_START
    while pos < len(data):
        rh = fmt.decode_record_header(data, pos)
        out.append((pos, rh))
        pos += fmt.RECORD_SIZE + rh.length
    return out


def rewrite_body(data: bytearray, pos: int, body: bytes) -> None:
    """Replace a record's body and fix both CRCs: only authentication can notice."""
    rh = fmt.decode_record_header(bytes(data), pos)
    assert len(body) == rh.length
    head = struct.pack("<2sBBII", fmt.RECORD_SYNC, rh.kind, rh.flags, rh.length, zlib.crc32(body))
    data[pos : pos + fmt.RECORD_SIZE + rh.length] = head + struct.pack("<I", zlib.crc32(head)) + body


def block_frames(path: str) -> dict[int, int]:
    with engine.open(path, passphrase=PASS, readonly=True) as cap:
        return {m.block: m.id for m in cap._s.table.frames if m.block >= 0}


@pytest.mark.req("F-19")
def test_tampering_moving_and_splicing_are_detected(tmp_path):
    path = str(tmp_path / "c.mv2e")
    make(path, n=30)
    blocks = block_frames(path)
    recs = [(p, rh) for p, rh in records(path) if rh.kind == fmt.BLOCK and p in blocks]
    original = bytearray(Path(path).read_bytes())

    def reading(data: bytearray, fid: int) -> Exception | None:
        Path(path).write_bytes(bytes(data))
        try:
            with engine.open(path, passphrase=PASS, readonly=True) as cap:
                cap.get(fid)
        except engine.CorruptionError as e:
            return e
        return None

    # 1. a changed byte, CRCs fixed
    pos, rh = recs[3]
    data = bytearray(original)
    body = bytearray(data[pos + fmt.RECORD_SIZE : pos + fmt.RECORD_SIZE + rh.length])
    body[20] ^= 1
    rewrite_body(data, pos, bytes(body))
    assert "authentication failed" in str(reading(data, blocks[pos]))
    # 2. a record moved to another offset (two same-size blocks swapped)
    same = [(p, r) for p, r in recs if r.length == recs[5][1].length]
    (a, ra), (b, rb) = same[0], same[1]
    data = bytearray(original)
    body_a = bytes(data[a + fmt.RECORD_SIZE : a + fmt.RECORD_SIZE + ra.length])
    body_b = bytes(data[b + fmt.RECORD_SIZE : b + fmt.RECORD_SIZE + rb.length])
    rewrite_body(data, a, body_b)
    rewrite_body(data, b, body_a)
    assert "authentication failed" in str(reading(data, blocks[a]))
    # 3. a record spliced in from another capsule with the same passphrase and layout
    other = str(tmp_path / "other.mv2e")
    make(other, n=30)
    foreign = Path(other).read_bytes()
    data = bytearray(original)
    pos, rh = recs[7]
    frh = fmt.decode_record_header(foreign, pos)
    assert frh is not None and frh.length == rh.length
    rewrite_body(data, pos, foreign[pos + fmt.RECORD_SIZE : pos + fmt.RECORD_SIZE + rh.length])
    assert "authentication failed" in str(reading(data, blocks[pos]))
    # 4. a tampered COMMIT: verify finds it anywhere; in the tail, the open stops on it
    Path(path).write_bytes(bytes(original))
    with engine.open(path, passphrase=PASS) as cap:
        for i in range(2):
            cap.put(f"tail {i}", uri="tail://x")
            cap.commit()
    commits = [(p, r) for p, r in records(path) if r.kind == fmt.COMMIT]
    data = bytearray(Path(path).read_bytes())
    pos, rh = commits[-2]
    body = bytearray(data[pos + fmt.RECORD_SIZE : pos + fmt.RECORD_SIZE + rh.length])
    body[-1] ^= 0x80
    rewrite_body(data, pos, bytes(body))
    Path(path).write_bytes(bytes(data))
    with pytest.raises(engine.CorruptionError, match="authentication failed"):
        engine.open(path, passphrase=PASS, readonly=True)
    report = engine.verify(path, passphrase=PASS)
    assert not report.ok and any("authentication failed" in e for e in report.errors), report.errors


def test_truncated_encrypted_capsule(tmp_path):
    path = str(tmp_path / "c.mv2e")
    make(path, n=30)
    with engine.open(path, passphrase=PASS) as cap:
        for i in range(3):
            cap.put(f"tail {i}", uri=f"tail://{i}")
            cap.commit()
        views = [snapshot(cap, s) for s in range(cap.seq + 1)]
    commits = [p for p, r in records(path) if r.kind == fmt.COMMIT]
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: commits[-1] + 5])  # the last commit torn
    with engine.open(path, passphrase=PASS) as cap:
        assert cap.seq == len(views) - 2 and snapshot(cap) == views[-2]
    assert engine.verify(path, passphrase=PASS).ok
    Path(path).write_bytes(data[:5000])  # inside the header: nothing to open
    with pytest.raises(engine.EngineError):
        engine.open(path, passphrase=PASS)


@pytest.mark.req("F-19")
def test_rekey_changes_only_the_key_slot(tmp_path):
    path = str(tmp_path / "c.mv2e")
    make(path, n=20)
    before = Path(path).read_bytes()
    with engine.open(path, passphrase=PASS) as cap:
        cap.rekey(PASS, "new passphrase", kdf=FAST)
        with pytest.raises(engine.WrongPassphrase):
            cap.rekey(PASS, "again")  # the old one no longer opens the key slot
    after = Path(path).read_bytes()
    assert after[fmt.LOG_START : len(before)] == before[fmt.LOG_START:]  # no record rewritten
    with pytest.raises(engine.WrongPassphrase):
        engine.open(path, passphrase=PASS)
    with engine.open(path, passphrase="new passphrase") as cap:
        assert cap.get(uri=f"note://{MARK}/5").text.startswith(MARK)
    for slot in fmt.SLOT_OFFSETS:  # both slots hold the new key slot
        h = fmt.decode_header(after[slot : slot + fmt.SLOT_SIZE])
        with pytest.raises(engine.WrongPassphrase):
            crypto.unlock(crypto.decode_keyslot(h.keyslot), PASS, h.capsule_id)


def test_encrypt_and_decrypt_round_trip(tmp_path):
    plain = str(tmp_path / "p.mv2")
    make(plain, passphrase=None, n=40)
    with engine.open(plain) as cap:
        views = [snapshot(cap, s) for s in range(cap.seq + 1)]
        cap.branch(tmp_path / "p.mv2e", passphrase=PASS, kdf=FAST, origin=False)
    assert MARK.encode() not in (tmp_path / "p.mv2e").read_bytes()
    with engine.open(tmp_path / "p.mv2e", passphrase=PASS) as enc:
        assert [snapshot(enc, s) for s in range(enc.seq + 1)] == views
        assert enc.stats()["origin"] is None
        enc.compact()  # compaction keeps it encrypted, same key
        assert [snapshot(enc, s) for s in range(enc.seq + 1)] == views
        enc.branch(tmp_path / "back.mv2", origin=False)
    assert MARK.encode() not in (tmp_path / "p.mv2e").read_bytes()
    with engine.open(tmp_path / "back.mv2") as back:
        assert [snapshot(back, s) for s in range(back.seq + 1)] == views
        assert not back.encrypted


def test_header_slot_known_answer():
    """The header slot of an encrypted capsule, byte for byte [F-01, F-19]."""
    keyslot = bytes(range(92))
    h = fmt.Header(7, bytes(range(16)), 1_700_000_000.5, 8192, 300, 4, 4, fmt.HEADER_ENCRYPTED, keyslot)
    raw = fmt.encode_header(h)
    fixed = raw[:68]
    assert fixed.hex() == (
        "4d563244000d0a1a" "0400" "0400" "0700000000000000" "000102030405060708090a0b0c0d0e0f"
        "00002040fc54d941" "0020000000000000" "2c01000000000000" "0100000000000000"
    )
    assert raw[68:72] == struct.pack("<I", zlib.crc32(fixed))
    assert raw[72:164] == keyslot and not any(raw[164:])
    assert fmt.decode_header(raw) == h
    # A key slot on a plain header, or none on an encrypted one, is refused.
    with pytest.raises(ValueError):
        fmt.encode_header(fmt.Header(1, bytes(16), 0.0, 8192, 1, flags=fmt.HEADER_ENCRYPTED))
    # Reserved bytes after the key slot must be zero, like every reserved byte [F-02].
    assert fmt.decode_header(raw[:200] + b"\x01" + raw[201:]) is None


@pytest.mark.parametrize("seed", [1, 2])
def test_power_cut_at_every_fsync_of_an_encrypted_capsule(tmp_path, seed):
    path = str(tmp_path / "c.mv2e")
    engine.create(path, model=None, passphrase=PASS, kdf=FAST).close()
    base = Path(path).read_bytes()
    w = Workload(seed)
    k = 1
    while True:
        Path(path).write_bytes(base)
        w = Workload(seed)
        acked, ops = 0, []

        def work(cap):
            nonlocal acked, ops
            for _ in range(8):
                ops = w.batch()
                w.stage(cap, ops)
                cap.commit()
                w.committed(ops)
                acked += 1

        image = power_cut_at(path, k, seed, work, passphrase=PASS, checkpoint_frames=6)
        if image is None:
            break
        Path(path).write_bytes(image)
        with engine.open(path, passphrase=PASS) as cap:
            assert acked <= cap.seq <= acked + 1, f"sync {k}"
            if cap.seq > acked:  # the commit in flight made it: its outcome was undecided
                w.committed(ops)
            assert snapshot(cap) == w.states[cap.seq]
        assert engine.verify(path, passphrase=PASS).ok, f"sync {k}"
        k += 1
    assert k > 8


def test_default_kdf_costs_open_in_well_under_a_second(tmp_path):
    path = str(tmp_path / "d.mv2e")
    engine.create(path, model=None, passphrase=PASS).close()  # 64 MiB, 3 passes
    slot = crypto.decode_keyslot(fmt.decode_header(Path(path).read_bytes()[: fmt.SLOT_SIZE]).keyslot)
    assert slot.kdf.memory_cost == 64 * 1024 and slot.kdf.iterations == 3
    with engine.open(path, passphrase=PASS) as cap:
        assert cap.encrypted


def test_no_stale_plaintext_after_a_killed_process(tmp_path):
    """Working copies left by a process that died are removed by the next open."""
    path = str(tmp_path / "c.mv2e")
    make(path, n=10)
    sealed = Path(ram_root()) / "sealed"
    with engine.open(path, passphrase=PASS) as cap:
        cap.find("apples", mode="lex")
        mine = [d for d in sealed.iterdir() if d.name.startswith(cap.capsule_id.hex())]
        assert len(mine) == 1
        ghost = sealed / mine[0].name.replace(f"-{os.getpid()}-", "-999999999-")
        shutil.copytree(mine[0], ghost)  # what a killed process (pid gone) would leave
    with engine.open(path, passphrase=PASS) as cap:
        cap.find("apples", mode="lex")
        assert not ghost.exists()
