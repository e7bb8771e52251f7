"""Payload codecs: the registry that maps a block's codec id to its encoder and decoder.

A block records the codec that wrote it [F-08], so blocks written by different codecs
coexist in one capsule and a background task can re-encode cold blocks later (stronger
levels, trained dictionaries) without touching anything else. Ids are stable forever;
a reader that meets an id it does not know refuses with a clear error.
"""

from __future__ import annotations

import threading

import zstandard

from .errors import CorruptionError, FormatVersionError

RAW = 0
ZSTD = 1
NAMES = {RAW: "raw", ZSTD: "zstd"}

DEFAULT_LEVEL = 3  # fast enough for ingest (>200 MB/s here); upgrades come later

_local = threading.local()  # zstandard contexts are not thread-safe


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache = getattr(_local, "compressors", None)
    if cache is None:
        cache = _local.compressors = {}
    c = cache.get(level)
    if c is None:
        c = cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "decompressor", None)
    if d is None:
        d = _local.decompressor = zstandard.ZstdDecompressor()
    return d


def encode(raw: bytes, level: int = DEFAULT_LEVEL) -> tuple[int, bytes]:
    """Pick the codec for a fresh block: zstd, or raw when compression does not pay."""
    packed = _compressor(level).compress(raw)
    if len(packed) >= len(raw):
        return RAW, raw
    return ZSTD, packed


def decode(codec: int, data: bytes, raw_length: int, *, offset: int | None = None) -> bytes:
    if codec == RAW:
        out = data
    elif codec == ZSTD:
        try:
            out = _decompressor().decompress(data, max_output_size=raw_length)
        except zstandard.ZstdError as e:
            raise CorruptionError(f"zstd block does not decode: {e}", offset=offset) from None
    else:
        raise FormatVersionError(f"block at offset {offset} uses codec {codec}, unknown here")
    if len(out) != raw_length:
        raise CorruptionError(
            f"block decodes to {len(out)} bytes, header says {raw_length}", offset=offset
        )
    return out


def compress_meta(raw: bytes) -> bytes:
    """Metadata records (segments) are always zstd: msgpack frame tables shrink ~4x."""
    return _compressor(DEFAULT_LEVEL).compress(raw)


def decompress_meta(data: bytes, *, offset: int) -> bytes:
    try:
        return _decompressor().decompress(data)
    except zstandard.ZstdError as e:
        raise CorruptionError(f"metadata does not decompress: {e}", offset=offset) from None
