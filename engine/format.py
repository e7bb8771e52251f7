"""The capsule file format: byte layouts, versions and record codecs.

This module is the executable half of ``docs/format.md`` (rules ``[F-nn]`` there). It
owns every ``struct`` layout and every msgpack schema that reaches the disk, and nothing
else: no I/O, no policy.

File diagram (all integers little-endian)::

    0      4096     8192
    +------+--------+-------------------------------------------------------------+
    |slot A| slot B | record | record | ... | record |   (torn bytes = end)      |
    +------+--------+-------------------------------------------------------------+
     header (two slots,       the log: append-only, each record checksummed
     newest valid wins)

Record = 16-byte record header + body. Kinds: BLOCK (compressed payload bytes), COMMIT
(the frames of one transaction), SEGMENT (a checkpointed slice of the frame table),
CHECKPOINT (the list of segments a reader loads instead of replaying the log), VECTORS
and LEXFILE (search indexes), DICT (a trained compression dictionary) and RELOCATE
(frames whose payloads a codec upgrade moved to new blocks).
"""

from __future__ import annotations

import struct
import zlib
from typing import Any, Protocol

import msgspec

from . import codecs
from .errors import CorruptionError, FormatVersionError, NotACapsule

# -- versions [F-03] -----------------------------------------------------------------
MAGIC = b"MV2D\x00\r\n\x1a"
READ_VERSION = 4  # bump when an old reader could misread the file (see docs/format.md)
WRITE_VERSION = 4  # bump when an old writer could damage the file

# -- header [F-01, F-02] -------------------------------------------------------------
SLOT_SIZE = 4096
SLOT_OFFSETS = (0, SLOT_SIZE)
LOG_START = 2 * SLOT_SIZE
#   magic, read_version, write_version, generation, capsule_id, created,
#   checkpoint_offset, checkpoint_length, flags
HEADER = struct.Struct("<8sHHQ16sdQQQ")
HEADER_CRC = struct.Struct("<I")

# -- records [F-04 .. F-07] ----------------------------------------------------------
RECORD_SYNC = b"R\xd5"
#   sync, kind, flags, body_length, body_crc32, header_crc32 (of the first 12 bytes)
RECORD = struct.Struct("<2sBBIII")
RECORD_SIZE = RECORD.size
MAX_BODY = 1 << 30  # a record body above this is treated as damage, never allocated

BLOCK = 1
COMMIT = 2
SEGMENT = 3
CHECKPOINT = 4
VECTORS = 5
LEXFILE = 6
RELOCATE = 7
DICT = 8
KIND_NAMES = {
    BLOCK: "block", COMMIT: "commit", SEGMENT: "segment", CHECKPOINT: "checkpoint",
    VECTORS: "vectors", LEXFILE: "lexfile", RELOCATE: "relocate", DICT: "dict",
}
DERIVED = (SEGMENT, CHECKPOINT, LEXFILE)  # rebuildable from the commits; replay skips them
PAYLOAD = (BLOCK, VECTORS, DICT)  # named by a COMMIT or RELOCATE, intact only if they are
APPLIED = (COMMIT, RELOCATE)  # the records replay applies, in log order
CLOSING = (COMMIT, RELOCATE, CHECKPOINT)  # each ends a write; one fsync follows it [F-07]
FLAG_ZSTD = 1  # record flag: the (msgpack) body is one zstd frame [F-04]
COMPRESS_OVER = 512  # metadata bodies above this many bytes are compressed

# -- block body [F-08] ---------------------------------------------------------------
#   codec id, flags, reserved, dictionary id, raw length
BLOCK_HEADER = struct.Struct("<BBHII")
# -- dictionary body [F-16] -------------------------------------------------------------
#   dictionary id, then the zstd dictionary bytes
DICT_HEADER = struct.Struct("<I")

# -- frame ops ------------------------------------------------------------------------
PUT = 0
TOMBSTONE = 1
PURGED = -2  # FrameMeta.block of a frame whose payload compaction dropped (expired) [F-24]


HEADER_ENCRYPTED = 1  # header flag: record bodies are sealed; a key slot follows [F-19]
KEYSLOT_SIZE = 92  # engine/crypto.py documents its bytes


class Header(msgspec.Struct, frozen=True):
    """One decoded header slot."""

    generation: int
    capsule_id: bytes
    created: float
    checkpoint_offset: int
    checkpoint_length: int
    read_version: int = READ_VERSION
    write_version: int = WRITE_VERSION
    flags: int = 0
    keyslot: bytes = b""  # encrypted capsules: the wrapped data key [F-19]

    def next(self, checkpoint_offset: int | None = None, checkpoint_length: int | None = None, **kw: Any) -> Header:
        """The header for the other slot: generation + 1, everything else kept unless given."""
        return msgspec.structs.replace(
            self, generation=self.generation + 1,
            checkpoint_offset=self.checkpoint_offset if checkpoint_offset is None else checkpoint_offset,
            checkpoint_length=self.checkpoint_length if checkpoint_length is None else checkpoint_length, **kw)


def encode_header(h: Header) -> bytes:
    fixed = HEADER.pack(
        MAGIC, h.read_version, h.write_version, h.generation, h.capsule_id, h.created,
        h.checkpoint_offset, h.checkpoint_length, h.flags,
    )
    if bool(h.flags & HEADER_ENCRYPTED) != bool(h.keyslot) or len(h.keyslot) not in (0, KEYSLOT_SIZE):
        raise ValueError("an encrypted header carries exactly one key slot")
    raw = fixed + HEADER_CRC.pack(zlib.crc32(fixed)) + h.keyslot
    return raw + bytes(SLOT_SIZE - len(raw))  # [F-02] reserved bytes are zero


def decode_header(raw: bytes) -> Header | None:
    """Decode one slot; ``None`` when the slot is torn, blank or garbage."""
    n = HEADER.size
    if len(raw) < n + HEADER_CRC.size:
        return None
    fields = HEADER.unpack_from(raw)
    if fields[0] != MAGIC:
        return None
    (crc,) = HEADER_CRC.unpack_from(raw, n)
    _, rv, wv, gen, cid, created, ck_off, ck_len, flags = fields
    tail = n + HEADER_CRC.size
    keyslot = bytes(raw[tail : tail + KEYSLOT_SIZE]) if flags & HEADER_ENCRYPTED else b""
    if crc != zlib.crc32(raw[:n]) or any(raw[tail + len(keyslot) : SLOT_SIZE]):
        return None  # torn, or reserved bytes not zero [F-02]
    return Header(gen, cid, created, ck_off, ck_len, rv, wv, flags, keyslot)


def decode_slots(raw: bytes) -> list[Header]:
    """The intact slots of a header region; ``NotACapsule`` when neither slot has our magic.

    One slot with a bad magic is a torn header write; both is a foreign file.
    """
    if not any(raw[o : o + len(MAGIC)] == MAGIC for o in SLOT_OFFSETS):
        raise NotACapsule("not a memvidd capsule (bad magic)")
    return [h for h in (decode_header(raw[o : o + SLOT_SIZE]) for o in SLOT_OFFSETS) if h is not None]


def check_versions(h: Header, *, readonly: bool) -> None:
    """[F-03] refuse files we could misread; refuse to write files we could damage."""
    if h.read_version > READ_VERSION:
        raise FormatVersionError(
            f"capsule needs reader version {h.read_version}; this engine reads {READ_VERSION}"
        )
    if not readonly and h.write_version > WRITE_VERSION:
        raise FormatVersionError(
            f"capsule needs writer version {h.write_version}; this engine writes "
            f"{WRITE_VERSION}: open it with readonly=True"
        )


class Sealing(Protocol):
    """Seals record bodies of an encrypted capsule (``engine/crypto.py``); ``None`` or a
    sealer whose ``encrypted`` is false leaves bodies as they are."""

    encrypted: bool

    def seal(self, offset: int, kind: int, flags: int, body: bytes) -> bytes: ...

    def open(self, offset: int, kind: int, flags: int, sealed: bytes) -> bytes: ...


def encode_record(kind: int, body: bytes, flags: int = 0, *, sealer: Sealing | None = None, offset: int = 0) -> bytes:
    """A record for file offset ``offset`` (which sealing binds it to [F-19])."""
    if sealer is not None and sealer.encrypted:
        body = sealer.seal(offset, kind, flags, body)
    if len(body) > MAX_BODY:
        raise ValueError(f"record body of {len(body)} bytes exceeds {MAX_BODY}")
    head = struct.pack("<2sBBII", RECORD_SYNC, kind, flags, len(body), zlib.crc32(body))
    return head + struct.pack("<I", zlib.crc32(head)) + body


class RecordHeader(msgspec.Struct, frozen=True):
    kind: int
    flags: int
    length: int
    body_crc: int


def decode_record_header(raw: bytes | memoryview, pos: int = 0) -> RecordHeader | None:
    """The record header at ``raw[pos:]``, or ``None`` if it is torn, blank or garbage."""
    if len(raw) - pos < RECORD_SIZE:
        return None
    sync, kind, flags, length, body_crc, head_crc = RECORD.unpack_from(raw, pos)
    if sync != RECORD_SYNC or head_crc != zlib.crc32(raw[pos : pos + 12]):
        return None
    if kind not in KIND_NAMES or length > MAX_BODY:
        return None
    return RecordHeader(kind, flags, length, body_crc)


def body_ok(rh: RecordHeader, body: bytes | memoryview) -> bool:
    return len(body) == rh.length and zlib.crc32(body) == rh.body_crc


# -- msgpack schemas [F-09 .. F-12] ----------------------------------------------------
# array_like keeps records compact; new fields may only be appended, with defaults, so
# older files keep decoding (msgspec fills missing trailing fields).


class FrameMeta(msgspec.Struct, array_like=True, gc=False):
    """Everything about a frame except its payload bytes. Immutable once committed."""

    id: int
    seq: int  # commit sequence that created it
    op: int  # PUT or TOMBSTONE
    uri: str | None
    title: str | None
    kind: str | None
    tags: dict[str, str]
    timestamp: float  # event time, seconds since the epoch
    supersedes: int | None  # the frame this one ends (same URI), if any
    block: int  # offset of the BLOCK record holding the payload; -1 for none
    start: int  # payload offset inside the decompressed block
    length: int  # payload length in bytes
    digest: bytes  # blake2b-128 of the payload
    is_text: bool
    parent: str | None = None  # owning document, for chunks
    chunk: int | None = None  # chunk number inside the parent document
    expires: float | None = None  # retention: gone from queries after this time [F-24]


class BlockRef(msgspec.Struct, array_like=True, gc=False):
    offset: int
    body_crc: int


class CommitRecord(msgspec.Struct, array_like=True, gc=False):
    seq: int
    time: float  # commit time, seconds since the epoch, non-decreasing
    prev: int  # offset of the previous COMMIT record, 0 for the first
    frames: list[FrameMeta]
    blocks: list[BlockRef]
    vectors: list[BlockRef] = []  # VECTORS records of this commit (read version 3)
    rewind: int | None = None  # this commit restores the state as of that commit (version 4)
    rules: dict[str, Any] | None = None  # new retention rules from this commit on [F-24]

    def named(self) -> tuple[BlockRef, ...]:
        """The records this commit needs intact [F-07]."""
        return (*self.blocks, *self.vectors)


class VectorsRecord(msgspec.Struct, array_like=True):
    """Embeddings of frames: ``ids[i]`` owns row i of ``data`` (little-endian float16)."""

    ids: list[int]
    data: bytes


class Move(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """Frame ``id``'s payload now lives at ``start`` in the BLOCK record at ``block``."""

    id: int
    block: int
    start: int


class DictRef(msgspec.Struct, array_like=True, frozen=True, gc=False):
    id: int
    offset: int
    body_crc: int


class RelocateRecord(msgspec.Struct, array_like=True):
    """A codec upgrade [F-16]: frames moved to new blocks, atomically, between commits."""

    seq: int  # the commit it follows; it changes no frame's content or validity
    upto: int  # frames below this id have been considered for an upgrade
    moves: list[Move]
    blocks: list[BlockRef]
    dicts: list[DictRef]  # dictionaries written for (and before) this record
    counters: dict[str, int]  # stats deltas (per-codec bytes, bytes saved, dead bytes)

    def named(self) -> tuple[BlockRef, ...]:
        """The records this upgrade needs intact, like a commit's blocks [F-16]."""
        return (*self.blocks, *(BlockRef(d.offset, d.body_crc) for d in self.dicts))


class CommitInfo(msgspec.Struct, array_like=True, gc=False):
    seq: int
    time: float
    offset: int
    rewind: int | None = None  # see CommitRecord.rewind
    rules: dict[str, Any] | None = None  # see CommitRecord.rules


class SegmentRecord(msgspec.Struct, array_like=True):
    first_id: int
    frames: list[FrameMeta]
    commits: list[CommitInfo]


class SegmentRef(msgspec.Struct, array_like=True, frozen=True):
    offset: int
    length: int  # whole record, header included
    first_id: int
    count: int
    last_seq: int = -1  # last commit it holds (-1 in versions 1-2: its last frame's seq)


class CheckpointRecord(msgspec.Struct, array_like=True):
    capsule_id: bytes
    seq: int
    next_id: int
    last_commit: int  # offset of the last COMMIT record covered
    segments: list[SegmentRef]
    counters: dict[str, int]
    extra: dict[str, Any] = {}  # room for index segments and codec dictionaries


_enc = msgspec.msgpack.Encoder()
_decoders: dict[type, msgspec.msgpack.Decoder] = {}


def pack(obj: Any) -> bytes:
    return _enc.encode(obj)


def meta_record(kind: int, obj: Any, *, sealer: Sealing | None = None, offset: int = 0) -> bytes:
    """A record holding a msgpack body, compressed when that pays [F-04]."""
    body = _enc.encode(obj)
    if len(body) > COMPRESS_OVER or kind == SEGMENT:
        return encode_record(kind, codecs.compress_meta(body), FLAG_ZSTD, sealer=sealer, offset=offset)
    return encode_record(kind, body, sealer=sealer, offset=offset)


def meta_body(rh: RecordHeader, body: bytes, typ: type, *, offset: int) -> Any:
    """Decode the body of a record written by ``meta_record``."""
    if rh.flags & FLAG_ZSTD or rh.kind == SEGMENT:  # read version 1 compressed segments unflagged
        body = codecs.decompress_meta(body, offset=offset)
    return unpack(body, typ, offset=offset)


def unpack(data: bytes | memoryview, typ: type, *, offset: int | None = None) -> Any:
    dec = _decoders.get(typ)
    if dec is None:
        dec = _decoders[typ] = msgspec.msgpack.Decoder(typ)
    try:
        return dec.decode(data)
    except (msgspec.DecodeError, ValueError) as e:
        # The checksum matched, so this is not a torn write: the data is wrong.
        raise CorruptionError(f"undecodable {typ.__name__}: {e}", offset=offset) from None
