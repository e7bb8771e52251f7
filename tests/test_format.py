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

GOLDEN = Path(__file__).parent / "golden"


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
def test_golden_capsule_keeps_opening(tmp_path):
    for mv2 in sorted(GOLDEN.glob("v*.mv2")):
        expected = json.loads(mv2.with_suffix(".json").read_text())
        copy = tmp_path / mv2.name
        shutil.copy(mv2, copy)
        assert engine.verify(str(copy)).ok
        with engine.open(str(copy)) as cap:
            assert cap.seq == len(expected) - 1
            for seq, state in expected.items():
                got = snapshot(cap, int(seq))
                assert {u: base64.b64encode(p).decode() for u, p in got.items()} == state, (mv2.name, seq)
            cap.put("a new frame on an old capsule", uri="new://1")
        with engine.open(str(copy), readonly=True) as cap:
            assert cap.get(uri="new://1").text == "a new frame on an old capsule"
