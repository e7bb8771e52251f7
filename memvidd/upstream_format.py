"""Reading capsules written by upstream memvid (memvid-core 2.x: the ``.mv2`` files of
``memvid-sdk`` and ``memvid-cli``), without its library: what ``memvidd import`` reads.

The layout, as memvid-core 2.0.140 writes it (the code, not its MV2_SPEC.md; see
shared/research/memvid_upstream.md, section 1.2 on):

- a 4,096-byte header: ``MV2\\0``, version u16 LE = 0x0201, then u64s: footer_offset,
  wal_offset, wal_size, wal_checkpoint_pos, wal_sequence (the WAL seq at the last commit);
- the embedded WAL (records: seq u64, len u32, 4 reserved, blake3 32, payload), payloads,
  index blobs (Tantivy files, vectors, time index: rebuilt by us, never read);
- at the end, the table of contents (TOC) and a 56-byte footer: ``MV2FOOT!``, toc_len u64,
  blake3(toc) 32, generation u64.

The TOC is bincode (serde, fixed-width little-endian integers, u64 lengths, u8 option tags,
u32 enum variants) of a ``Toc`` whose first fields are ``toc_version u64``, ``segments:
Vec<SegmentMeta>`` and ``frames: Vec<Frame>``; only those are decoded (the index
manifests after them are of no use here). A ``Frame`` has 30 fields (``FRAME_FIELDS``),
among them its status (active, superseded, deleted), ``supersedes``/``superseded_by``, the
parent of a chunk, the payload's place and encoding (plain or zstd), and ``search_text``:
what upstream indexes, the text followed by lines it adds (``title: ...``, ``uri: ...``,
``tags: ...``, ...). memvid-sdk 2.0.160 stores a short text only there (an empty payload);
a text of 2,400 characters or more is cut into chunk frames, whose payloads hold it.

Checksums are blake3, which the standard library lacks: they are not checked; the
structure is (every length and offset is bounded by the file, an unknown tag is an error).
Writes still in the WAL (a writer killed between a put and its commit) are detected and
refused: upstream's own reader would replay them first.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import msgspec

MAGIC = b"MV2\x00"
ENCRYPTED_MAGIC = b"MV2E"
SPEC_VERSION = 0x0201
HEADER_SIZE = 4096
FOOTER_MAGIC = b"MV2FOOT!"
FOOTER_SIZE = 56
WAL_RECORD_HEADER = 48

ACTIVE, SUPERSEDED, DELETED = 0, 1, 2  # FrameStatus
DOCUMENT, CHUNK, IMAGE = 0, 1, 2  # FrameRole
PLAIN, ZSTD = 0, 1  # CanonicalEncoding
MAX_PAYLOAD = 1 << 30  # a decompressed payload larger than this is refused

T = TypeVar("T")


class UpstreamFormatError(ValueError):
    """Not a capsule upstream memvid wrote, or one this reader cannot read; says which and why."""


class UpstreamFrame(msgspec.Struct, kw_only=True):
    """One frame of an upstream TOC: the fields an import uses (the others are skipped)."""

    id: int
    timestamp: int  # seconds
    kind: str | None
    track: str | None
    uri: str | None
    title: str | None
    payload_offset: int
    payload_length: int
    encoding: int  # PLAIN or ZSTD
    search_text: str | None
    tags: list[str]
    labels: list[str]
    extra_metadata: dict[str, str]  # values are JSON text, as upstream stores them
    role: int  # DOCUMENT, CHUNK, IMAGE
    parent_id: int | None
    chunk_index: int | None
    status: int  # ACTIVE, SUPERSEDED, DELETED
    supersedes: int | None
    superseded_by: int | None


class UpstreamCapsule(msgspec.Struct, kw_only=True):
    path: str
    toc_version: int
    generation: int
    frames: list[UpstreamFrame]
    data: bytes  # the whole file: payloads are read from it


class _Bincode:
    """serde's data model as bincode encodes it with fixed-width integers."""

    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.at = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.at + n > len(self.buf):
            raise UpstreamFormatError(f"the TOC ends inside a field at byte {self.at} (wanted {n} more)")
        out = self.buf[self.at : self.at + n]
        self.at += n
        return out

    def unpack(self, fmt: str) -> Any:
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))[0]

    def u8(self) -> int:
        return self.unpack("B")

    def u16(self) -> int:
        return self.unpack("H")

    def u32(self) -> int:
        return self.unpack("I")

    def u64(self) -> int:
        return self.unpack("Q")

    def i64(self) -> int:
        return self.unpack("q")

    def f32(self) -> float:
        return self.unpack("f")

    def f64(self) -> float:
        return self.unpack("d")

    def str(self) -> str:
        raw = self.take(self.u64())
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise UpstreamFormatError(f"a string of the TOC is not UTF-8 (byte {self.at})") from None

    def option(self, item: Callable[[], T]) -> T | None:
        tag = self.u8()
        if tag > 1:
            raise UpstreamFormatError(f"bad option tag {tag} at byte {self.at - 1} of the TOC")
        return item() if tag else None

    def seq(self, item: Callable[[], T]) -> list[T]:
        n = self.u64()
        if n > len(self.buf) - self.at:  # every item takes a byte at least
            raise UpstreamFormatError(f"a list of {n} items cannot fit in the TOC (byte {self.at})")
        return [item() for _ in range(n)]

    def variant(self, names: int) -> int:
        v = self.u32()
        if v >= names:
            raise UpstreamFormatError(f"unknown enum variant {v} at byte {self.at - 4} of the TOC")
        return v


def _segment_meta(b: _Bincode) -> None:
    """``SegmentMeta``: id, frame_range (u64, u64), primary_checksum, compression, offset, length."""
    b.take(8 + 16 + 32)
    b.variant(3)
    b.take(16)


def _doc_metadata(b: _Bincode) -> None:
    """``DocMetadata`` (mime, sizes, EXIF, audio, media manifest): skipped field by field."""
    b.option(b.str), b.option(b.u64), b.option(b.str), b.option(b.u32), b.option(b.u32)
    b.option(lambda: b.seq(b.str)), b.option(b.str)
    b.option(lambda: (b.option(b.str), b.option(b.str), b.option(b.str), b.option(b.str),
                      b.option(lambda: (b.f64(), b.f64()))))  # exif, gps
    b.option(lambda: (b.option(b.f32), b.option(b.u32), b.option(b.u8), b.option(b.u32), b.option(b.str),
                      b.seq(lambda: (b.f32(), b.f32(), b.option(b.str))),  # audio segments
                      b.seq(lambda: (b.str(), b.str()))))  # audio tags
    b.option(lambda: (b.str(), b.str(), b.u64(), b.option(b.str), b.option(b.u64), b.option(b.u32),
                      b.option(b.u32), b.option(b.str)))  # media manifest


def _frame(b: _Bincode) -> UpstreamFrame:
    """One ``Frame``, its 30 fields in declaration order (serde's order on the wire)."""
    fid, timestamp = b.u64(), b.i64()
    b.option(b.i64), b.option(lambda: b.variant(4))  # anchor_ts, anchor_source
    kind, track = b.option(b.str), b.option(b.str)
    payload_offset, payload_length = b.u64(), b.u64()
    b.take(32)  # blake3 of the stored payload
    uri, title = b.option(b.str), b.option(b.str)
    encoding = b.u32() & 0xFF  # upstream reads it so too (unknown: plain)
    b.option(b.u64)  # canonical_length
    b.option(lambda: _doc_metadata(b))
    search_text = b.option(b.str)
    tags, labels = b.seq(b.str), b.seq(b.str)
    extra = dict(b.seq(lambda: (b.str(), b.str())))
    b.seq(b.str)  # content_dates
    b.option(lambda: (b.u64(), b.seq(lambda: (b.u64(), b.u64()))))  # chunk_manifest
    role = b.variant(3)
    parent_id, chunk_index = b.option(b.u64), b.option(b.u32)
    b.option(b.u32)  # chunk_count
    status = b.variant(3)
    supersedes, superseded_by = b.option(b.u64), b.option(b.u64)
    b.option(lambda: b.take(32)), b.option(b.str)  # source_sha256, source_path
    b.variant(2)  # enrichment_state
    return UpstreamFrame(id=fid, timestamp=timestamp, kind=kind, track=track, uri=uri, title=title,
                         payload_offset=payload_offset, payload_length=payload_length, encoding=encoding,
                         search_text=search_text, tags=tags, labels=labels, extra_metadata=extra, role=role,
                         parent_id=parent_id, chunk_index=chunk_index, status=status, supersedes=supersedes,
                         superseded_by=superseded_by)


def read(path: str | os.PathLike[str]) -> UpstreamCapsule:
    """The frames of the upstream capsule at ``path``, as of its last commit."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] == ENCRYPTED_MAGIC:
        raise UpstreamFormatError(f"{path} is an encrypted upstream capsule (.mv2e): unlock it with upstream's "
                                  "`memvid unlock` first")
    if data[:4] == b"MV2D":
        raise UpstreamFormatError(f"{path} is a memvidd capsule already: use it as it is (memvidd branch copies it)")
    if len(data) < HEADER_SIZE + FOOTER_SIZE or data[:4] != MAGIC:
        raise UpstreamFormatError(f"{path} is not a capsule written by upstream memvid (no MV2 header)")
    version = struct.unpack_from("<H", data, 4)[0]
    if version != SPEC_VERSION:
        raise UpstreamFormatError(f"{path}: upstream format version {version:#06x}; this reader knows "
                                  f"{SPEC_VERSION:#06x} (memvid-core 2.x)")
    footer_offset, wal_offset, wal_size, _, wal_sequence = struct.unpack_from("<5Q", data, 8)
    footer = data[-FOOTER_SIZE:]
    if footer[:8] != FOOTER_MAGIC:
        raise UpstreamFormatError(f"{path} has no commit footer at its end (damaged, or cut while being "
                                  "written): upstream's `memvid doctor` repairs it")
    toc_len, generation = struct.unpack_from("<Q", footer, 8)[0], struct.unpack_from("<Q", footer, 48)[0]
    toc_start = len(data) - FOOTER_SIZE - toc_len
    if toc_start < HEADER_SIZE or toc_start != footer_offset:
        raise UpstreamFormatError(f"{path}: its footer ({toc_len} TOC bytes) and header (TOC at {footer_offset}) "
                                  "disagree: upstream's `memvid doctor` repairs it")
    pending = _pending_wal(data, wal_offset, wal_size, wal_sequence)
    if pending:
        raise UpstreamFormatError(f"{path} has {pending} writes in its WAL that were never committed (a writer "
                                  "stopped between a put and its commit): open it once with upstream memvid "
                                  "(memvid_sdk.use('basic', PATH).seal()), then import it")
    b = _Bincode(data[toc_start : len(data) - FOOTER_SIZE])
    toc_version = b.u64()
    b.seq(lambda: _segment_meta(b))
    frames = b.seq(lambda: _frame(b))
    for i, fr in enumerate(frames):
        if fr.id != i:  # ids are dense indexes into the frame list
            raise UpstreamFormatError(f"{path}: frame {i} of the TOC says it is frame {fr.id} "
                                      f"(toc_version {toc_version}: not a layout this reader knows)")
        if fr.payload_length and fr.payload_offset + fr.payload_length > toc_start:
            raise UpstreamFormatError(f"{path}: the payload of frame {i} lies outside the file's data")
    return UpstreamCapsule(path=path, toc_version=toc_version, generation=generation, frames=frames, data=data)


def _pending_wal(data: bytes, offset: int, size: int, committed: int) -> int:
    """WAL records written after the last commit (seq above the header's ``wal_sequence``)."""
    if offset < HEADER_SIZE or offset + size > len(data):
        raise UpstreamFormatError("the header's WAL region lies outside the file")
    pending, at = 0, 0
    while at + WAL_RECORD_HEADER <= size:
        head = data[offset + at : offset + at + WAL_RECORD_HEADER]
        if head == bytes(WAL_RECORD_HEADER):  # the sentinel after the last record
            break
        seq, length = struct.unpack_from("<QI", head)
        if length == 0 or at + WAL_RECORD_HEADER + length > size:
            break
        pending += seq > committed
        at += WAL_RECORD_HEADER + length
    return pending


def payload(cap: UpstreamCapsule, frame: UpstreamFrame) -> bytes:
    """The frame's stored payload, decompressed."""
    raw = cap.data[frame.payload_offset : frame.payload_offset + frame.payload_length]
    if frame.encoding != ZSTD or not raw:
        return raw
    import zstandard

    try:
        return zstandard.ZstdDecompressor().decompress(raw, max_output_size=MAX_PAYLOAD)
    except zstandard.ZstdError as e:
        raise UpstreamFormatError(f"{cap.path}: the payload of frame {frame.id} is not valid zstd: {e}") from None


def text(cap: UpstreamCapsule, frame: UpstreamFrame, chunks: Sequence[UpstreamFrame] = ()) -> str | bytes:
    """A document's content: its chunks' payloads joined (a long text), else its payload
    (UTF-8 text, or bytes), else its ``search_text`` less the lines upstream appended."""
    if chunks:
        return "".join(payload(cap, c).decode("utf-8", errors="replace")
                       for c in sorted(chunks, key=lambda c: c.chunk_index or 0))
    if frame.payload_length:
        raw = payload(cap, frame)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw
    return strip_augmentation(frame)


def strip_augmentation(frame: UpstreamFrame) -> str:
    """``search_text`` without what upstream appends to the text it indexes: lines
    ``title: T``, then ``uri: U``, ``track: K``, ``tags: ...``, ``labels: ...`` and one per
    metadata item, each there only when the frame has it. The cut is at the last place
    where the first of those lines the frame has begins a tail of ``key: value`` lines."""
    st = frame.search_text or ""
    markers = [f"\ntitle: {frame.title}" if frame.title else None, f"\nuri: {frame.uri}" if frame.uri else None,
               f"\ntrack: {frame.track}" if frame.track else None, "\ntags: " if frame.tags else None,
               "\nlabels: " if frame.labels else None, *(f"\n{k}: " for k in frame.extra_metadata)]
    for marker in filter(None, markers):
        at = st.rfind(marker)
        while at >= 0:
            if all(": " in line for line in st[at + 1 :].split("\n")):
                return st[:at]
            at = st.rfind(marker, 0, at)
    return st
