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
ZSTD_DICT = 2  # zstd with a dictionary trained on the capsule's own data [F-16]
NAMES = {RAW: "raw", ZSTD: "zstd", ZSTD_DICT: "zstd+dict"}

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


def _decompressor(zdict: zstandard.ZstdCompressionDict | None = None) -> zstandard.ZstdDecompressor:
    cache = getattr(_local, "decompressors", None)
    if cache is None:
        cache = _local.decompressors = {}
    key = id(zdict)  # the dictionary object is kept alive by the value
    entry = cache.get(key)
    if entry is None or entry[0] is not zdict:
        if len(cache) > 8:
            cache.clear()
        entry = cache[key] = (zdict, zstandard.ZstdDecompressor(dict_data=zdict))
    return entry[1]


def _dict_compressor(level: int, zdict: zstandard.ZstdCompressionDict) -> zstandard.ZstdCompressor:
    cache = getattr(_local, "dict_compressors", None)
    if cache is None:
        cache = _local.dict_compressors = {}
    key = (id(zdict), level)
    entry = cache.get(key)
    if entry is None or entry[0] is not zdict:
        if len(cache) > 8:
            cache.clear()
        entry = cache[key] = (zdict, zstandard.ZstdCompressor(
            level=level, dict_data=zdict, write_content_size=True, write_dict_id=False))
    return entry[1]


def encode(
    raw: bytes, level: int = DEFAULT_LEVEL, zdict: zstandard.ZstdCompressionDict | None = None,
) -> tuple[int, bytes]:
    """Pick the codec for a fresh block: zstd (with ``zdict`` when given), or raw when
    compression does not pay."""
    if zdict is not None:
        packed, codec = _dict_compressor(level, zdict).compress(raw), ZSTD_DICT
    else:
        packed, codec = _compressor(level).compress(raw), ZSTD
    if len(packed) >= len(raw):
        return RAW, raw
    return codec, packed


def encode_best(raw: bytes, level: int, zdict: zstandard.ZstdCompressionDict | None) -> tuple[int, bytes]:
    """The smallest of raw, zstd at ``level`` and (given one) zstd with ``zdict``.

    Used by upgrades, which can afford to try both: a dictionary wins on small records
    and can lose on large mixed blocks.
    """
    codec, best = encode(raw, level)
    if zdict is not None:
        with_dict = encode(raw, level, zdict)
        if len(with_dict[1]) < len(best):
            codec, best = with_dict
    return codec, best


def train(samples: list[bytes], size: int) -> bytes | None:
    """A zstd dictionary of at most ``size`` bytes trained on ``samples``; ``None`` when
    zstd cannot build one (too few samples, or samples too alike)."""
    try:
        buffers: list[bytes | bytearray | memoryview] = list(samples)
        return zstandard.train_dictionary(size, buffers).as_bytes()
    except zstandard.ZstdError:
        return None


def load_dict(data: bytes, *, offset: int | None = None) -> zstandard.ZstdCompressionDict:
    try:
        d = zstandard.ZstdCompressionDict(data, dict_type=zstandard.DICT_TYPE_FULLDICT)
        d.precompute_compress(level=DEFAULT_LEVEL)  # checks the bytes are a dictionary
    except zstandard.ZstdError as e:
        raise CorruptionError(f"stored dictionary does not load: {e}", offset=offset) from None
    return d


def decode(
    codec: int, data: bytes, raw_length: int, *, offset: int | None = None,
    zdict: zstandard.ZstdCompressionDict | None = None,
) -> bytes:
    if codec == RAW:
        out = data
    elif codec in (ZSTD, ZSTD_DICT):
        if codec == ZSTD_DICT and zdict is None:
            raise CorruptionError("block names a dictionary the capsule does not have", offset=offset)
        try:
            out = _decompressor(zdict if codec == ZSTD_DICT else None).decompress(
                data, max_output_size=raw_length)
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
