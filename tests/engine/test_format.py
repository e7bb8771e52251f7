"""The on-disk format: fixed layouts, version gating, and golden capsules [F-01 .. F-08]."""

from __future__ import annotations

import base64
import json
import shutil
import struct
import zlib
from pathlib import Path

import pytest

import engine
from engine import format as fmt
from workload import snapshot

GOLDEN = Path(__file__).resolve().parents[1] / "golden"


@pytest.mark.req("F-01")
def test_header_layout_is_stable():
    h = fmt.Header(7, bytes(range(16)), 1.5, 8192, 40)
    raw = fmt.encode_header(h)
    assert len(raw) == fmt.SLOT_SIZE and fmt.HEADER.size == 68
    assert raw[:8] == b"MV2D\x00\r\n\x1a"
    assert struct.unpack_from("<HHQ", raw, 8) == (fmt.READ_VERSION, fmt.WRITE_VERSION, 7)
    assert raw[20:36] == bytes(range(16))
    assert struct.unpack_from("<dQQQ", raw, 36) == (1.5, 8192, 40, 0)
    assert struct.unpack_from("<I", raw, 68)[0] == zlib.crc32(raw[:68])
    assert not any(raw[72:])
    assert fmt.decode_header(raw) == h


@pytest.mark.req("F-02")
def test_header_slot_with_nonzero_reserved_bytes_is_damaged():
    raw = bytearray(fmt.encode_header(fmt.Header(1, bytes(16), 0.0, 8192, 40)))
    raw[4000] = 1
    assert fmt.decode_header(bytes(raw)) is None


@pytest.mark.req("F-04")
def test_record_layout_is_stable():
    raw = fmt.encode_record(fmt.COMMIT, b"body")
    assert raw[:2] == b"R\xd5" and raw[2] == fmt.COMMIT and raw[3] == 0
    assert struct.unpack_from("<II", raw, 4) == (4, zlib.crc32(b"body"))
    assert struct.unpack_from("<I", raw, 12)[0] == zlib.crc32(raw[:12])
    assert raw[16:] == b"body"
    rh = fmt.decode_record_header(raw)
    assert rh == fmt.RecordHeader(fmt.COMMIT, 0, 4, zlib.crc32(b"body"))
    assert fmt.decode_record_header(raw[:15]) is None  # torn
    assert fmt.decode_record_header(b"\x00" * 16) is None  # blank


def _set_versions(path: str, read: int, write: int) -> None:
    data = bytearray(Path(path).read_bytes())
    for off in fmt.SLOT_OFFSETS:
        h = fmt.decode_header(bytes(data[off : off + fmt.SLOT_SIZE]))
        if h is not None:
            h2 = fmt.Header(h.generation, h.capsule_id, h.created, h.checkpoint_offset,
                            h.checkpoint_length, read, write, h.flags)
            data[off : off + fmt.SLOT_SIZE] = fmt.encode_header(h2)
    Path(path).write_bytes(data)


@pytest.mark.req("F-03")
def test_newer_read_version_is_refused(path):
    with engine.create(path) as cap:
        cap.put("x")
    _set_versions(path, fmt.READ_VERSION + 1, fmt.WRITE_VERSION + 1)
    with pytest.raises(engine.FormatVersionError, match="reader version"):
        engine.open(path, readonly=True)


@pytest.mark.req("F-03")
def test_newer_write_version_opens_readonly_only(path):
    with engine.create(path) as cap:
        cap.put("x", uri="a")
    _set_versions(path, fmt.READ_VERSION, fmt.WRITE_VERSION + 1)
    with pytest.raises(engine.FormatVersionError, match="readonly"):
        engine.open(path)
    with engine.open(path, readonly=True) as cap:
        assert cap.get(uri="a").text == "x"


@pytest.mark.req("F-08")
def test_unknown_codec_is_a_clear_error(path):
    with engine.create(path) as cap:
        fid = cap.put("payload " * 50)
    data = bytearray(Path(path).read_bytes())
    pos = fmt.LOG_START
    while True:  # find the block record and give it codec 99, with a valid checksum
        rh = fmt.decode_record_header(data, pos)
        if rh.kind == fmt.BLOCK:
            body = bytearray(data[pos + 16 : pos + 16 + rh.length])
            body[0] = 99
            data[pos : pos + 16 + rh.length] = fmt.encode_record(fmt.BLOCK, bytes(body))
            break
        pos += 16 + rh.length
    Path(path).write_bytes(data)
    with engine.open(path, readonly=True) as cap:
        with pytest.raises(engine.EngineError):
            cap.get(fid)


@pytest.mark.req("F-03")
@pytest.mark.parametrize("mv2", sorted(GOLDEN.glob("v*.mv2*")), ids=lambda p: p.name)
def test_golden_capsule_keeps_opening(tmp_path, mv2):
    passphrase = "golden capsule" if mv2.suffix == ".mv2e" else None  # tests/golden/make_golden.py
    expected = json.loads(mv2.with_suffix(".json").read_text())
    copy = tmp_path / mv2.name
    shutil.copy(mv2, copy)
    assert engine.verify(str(copy), passphrase=passphrase).ok
    with engine.open(str(copy), passphrase=passphrase) as cap:
        assert cap.seq == len(expected) - 1
        for seq, state in expected.items():
            got = snapshot(cap, int(seq))
            assert {u: base64.b64encode(p).decode() for u, p in got.items()} == state, (mv2.name, seq)
        cap.put("a new frame on an old capsule", uri="new://1")
    with engine.open(str(copy), readonly=True, passphrase=passphrase) as cap:
        assert cap.get(uri="new://1").text == "a new frame on an old capsule"


@pytest.mark.req("F-09")
def test_frame_schema_is_a_positional_array():
    meta = fmt.FrameMeta(3, 2, fmt.PUT, "u", "t", "k", {"a": "b"}, 1.5, None, 8192, 0, 5, b"d", True)
    assert msgspec_decode(fmt.pack(meta)) == [3, 2, 0, "u", "t", "k", {"a": "b"}, 1.5, None, 8192, 0, 5, b"d", True, None, None, None]
    # an older body without the trailing optional fields still decodes
    short = fmt.pack([3, 2, 0, "u", "t", "k", {}, 1.5, None, 8192, 0, 5, b"d", True])
    assert fmt.unpack(short, fmt.FrameMeta).parent is None


def msgspec_decode(raw: bytes):
    import msgspec

    return msgspec.msgpack.decode(raw)


def _records(path: str):
    data = Path(path).read_bytes()
    pos = fmt.LOG_START
    while pos < len(data):
        rh = fmt.decode_record_header(data, pos)
        yield pos, rh, data[pos + 16 : pos + 16 + rh.length]
        pos += 16 + rh.length


def _meta(rh, body, typ):
    return fmt.meta_body(rh, body, typ, offset=0)


@pytest.mark.req("F-10")
@pytest.mark.req("F-12")
@pytest.mark.req("F-20")
def test_commit_chain_and_checkpoints_on_disk(path):
    with engine.create(path, checkpoint_frames=4) as cap:
        for i in range(20):
            cap.put(f"x{i}", uri=f"u{i % 3}")
            if i % 2:
                cap.commit()
    prev, seq, next_id, last_time = 0, 0, 0, 0.0
    checkpoints = []
    for pos, rh, body in _records(path):
        if rh.kind == fmt.COMMIT:
            rec = _meta(rh, body, fmt.CommitRecord)
            assert (rec.seq, rec.prev) == (seq + 1, prev) and rec.time >= last_time
            assert [f.id for f in rec.frames] == list(range(next_id, next_id + len(rec.frames)))
            assert {f.seq for f in rec.frames} == {rec.seq}
            assert all(b.offset < pos for b in rec.blocks)
            prev, seq, next_id, last_time = pos, rec.seq, next_id + len(rec.frames), rec.time
        elif rh.kind == fmt.CHECKPOINT:
            checkpoints.append(_meta(rh, body, fmt.CheckpointRecord))
    assert seq == 10 and next_id == 20
    last = checkpoints[-1]
    assert (last.seq, last.next_id) == (10, 20)
    assert sum(s.count for s in last.segments) == 20
    assert [s.first_id for s in last.segments] == sorted(s.first_id for s in last.segments)


@pytest.mark.req("F-03")
def test_writing_to_an_old_capsule_raises_its_versions(tmp_path):
    copy = tmp_path / "v1.mv2"
    shutil.copy(GOLDEN / "v1.mv2", copy)
    with engine.open(str(copy)) as cap:
        cap.put("new", uri="n")
    h = max(fmt.decode_slots(copy.read_bytes()[: fmt.LOG_START]), key=lambda h: h.generation)
    assert (h.read_version, h.write_version) == (fmt.READ_VERSION, fmt.WRITE_VERSION)
