"""Codec upgrades: re-encoding cold payloads into better blocks, verified before use.

Fresh puts are written one frame per block at a fast zstd level, which keeps a commit
cheap but compresses small frames poorly (every block starts with an empty window).
An upgrade takes committed frames in id order, groups neighbours into blocks of up to
``GROUP_FRAMES`` frames / ``GROUP_BYTES`` bytes, and stores each group with the
smallest of: zstd at a high level, zstd with a dictionary trained on this capsule's own
payloads, or raw bytes. This module plans and encodes; ``Capsule.upgrade_codecs`` reads
payloads, writes the result (new BLOCKs, maybe a DICT, then one RELOCATE record, one
fsync) and switches the frame table [F-16]. Nothing here does I/O.

Safety: every group is decoded again and compared byte for byte, and every frame's
slice is checked against the frame's digest, before anything is written. A crash before
the RELOCATE record is durable leaves the old blocks in use; their bytes become dead
only once it is, and compaction reclaims them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import msgspec
import zstandard

from . import codecs
from . import format as fmt

GROUP_FRAMES = 32  # research/peers.md §3.5: 32 chunks per block reach ~3.7x on notes+code
GROUP_BYTES = 64 << 10  # bounds the bytes a random get decodes for one frame
LEVEL = 19  # upgrades run in the background: spend CPU for bytes
DICT_BYTES = 64 << 10
DICT_MIN_SAMPLES = 1000  # fewer frames: a dictionary costs more bytes than it can save
DICT_SAMPLES = 4000
DICT_MAX_MEAN = 4096  # dictionaries pay on small records; large ones carry their own context
FRESH_DICT_MAX = 4096  # fresh puts up to this size are compressed with the dictionary
DICT_MIN_GAIN = 0.15  # keep a dictionary that shrinks fresh small frames by at least this
RETRAIN_GROWTH = 8  # train a new dictionary each time the upgraded frames grew this much
MIN_SAVING = 0.03  # a group that would shrink by less than this stays where it is


class Group(msgspec.Struct):
    """Frames that will share one new block, with what they occupy today."""

    frames: list[fmt.FrameMeta]
    old_blocks: dict[int, int]  # old block offset -> its record bytes (on disk)
    old_codecs: dict[int, int]  # old block offset -> codec id
    old_raw: dict[int, int]  # old block offset -> its decoded length


class Encoded(msgspec.Struct):
    group: Group
    codec: int
    dict_id: int
    body: bytes  # BLOCK body: block header + stored bytes
    raw_length: int


def plan(frames: Sequence[fmt.FrameMeta]) -> list[list[fmt.FrameMeta]]:
    """Split frames (in id order) into groups of neighbours; frames without a payload
    (tombstones, empty puts) are skipped. A frame bigger than half a group is alone."""
    groups: list[list[fmt.FrameMeta]] = []
    cur: list[fmt.FrameMeta] = []
    size = 0
    for m in frames:
        if m.op != fmt.PUT or m.block < 0 or m.length == 0:
            continue
        if cur and (len(cur) >= GROUP_FRAMES or size + m.length > GROUP_BYTES or m.length > GROUP_BYTES // 2):
            groups.append(cur)
            cur, size = [], 0
        cur.append(m)
        size += m.length
    if cur:
        groups.append(cur)
    return groups


def wants_dictionary(samples: Sequence[bytes]) -> bool:
    return len(samples) >= DICT_MIN_SAMPLES and sum(map(len, samples)) / len(samples) <= DICT_MAX_MEAN


def train(samples: Sequence[bytes]) -> bytes | None:
    """A dictionary from a spread of samples, or ``None`` when zstd cannot build one."""
    step = max(1, len(samples) // DICT_SAMPLES)
    picked = [s for s in samples[::step] if s]
    size = min(DICT_BYTES, max(4096, sum(map(len, picked)) // 10))
    return codecs.train(picked, size)


def worth_keeping(zdict: zstandard.ZstdCompressionDict, samples: Sequence[bytes], level: int) -> bool:
    """Does the dictionary shrink small frames compressed alone (as fresh puts are) by
    ``DICT_MIN_GAIN``? Grouped blocks rarely need it; fresh small frames do."""
    small = [p for p in samples if len(p) <= FRESH_DICT_MAX][:2000]
    if not small:
        return False
    plain = sum(len(codecs.encode(p, level)[1]) for p in small)
    with_dict = sum(len(codecs.encode(p, level, zdict)[1]) for p in small)
    return with_dict <= (1 - DICT_MIN_GAIN) * plain


def encode(group: Group, payloads: list[bytes], zdict: tuple[int, zstandard.ZstdCompressionDict] | None,
           level: int = LEVEL) -> Encoded | None:
    """The group's new block, verified; ``None`` when it would not save ``MIN_SAVING``."""
    raw = b"".join(payloads)
    codec, stored = codecs.encode_best(raw, level, zdict[1] if zdict else None)
    dict_id = zdict[0] if zdict and codec == codecs.ZSTD_DICT else 0
    body = fmt.BLOCK_HEADER.pack(codec, 0, 0, dict_id, len(raw)) + stored
    if len(body) + fmt.RECORD_SIZE > (1 - MIN_SAVING) * sum(group.old_blocks.values()):
        return None
    # Decode what will be written and compare, before any byte reaches the file.
    back = codecs.decode(codec, stored, len(raw), zdict=zdict[1] if zdict and dict_id else None)
    if back != raw:
        raise AssertionError("codec upgrade: re-encoded block does not decode to its input")
    pos = 0
    for m in group.frames:
        if hashlib.blake2b(back[pos : pos + m.length], digest_size=16).digest() != m.digest:
            raise AssertionError(f"codec upgrade: frame {m.id} fails its digest after re-encoding")
        pos += m.length
    return Encoded(group, codec, dict_id, body, len(raw))


def counters(done: list[Encoded], dict_bytes: int) -> dict[str, int]:
    """Stats deltas for one upgrade: per-codec tallies move from old blocks to new."""
    out: dict[str, int] = {}

    def add(key: str, v: int) -> None:
        out[key] = out.get(key, 0) + v

    saved = -dict_bytes
    for e in done:
        g = e.group
        for off, rec_bytes in g.old_blocks.items():
            name = codecs.NAMES[g.old_codecs[off]]
            add(f"codec.{name}.blocks", -1)
            add(f"codec.{name}.raw", -g.old_raw[off])
            add(f"codec.{name}.stored", -(rec_bytes - fmt.RECORD_SIZE - fmt.BLOCK_HEADER.size))
            add("bytes.dead", rec_bytes)
            saved += rec_bytes
        name = codecs.NAMES[e.codec]
        add(f"codec.{name}.blocks", 1)
        add(f"codec.{name}.raw", e.raw_length)
        add(f"codec.{name}.stored", len(e.body) - fmt.BLOCK_HEADER.size)
        saved -= len(e.body) + fmt.RECORD_SIZE
        add("upgrade.frames", len(g.frames))
        add("upgrade.blocks", 1)
    add("upgrade.saved", saved)
    return out
