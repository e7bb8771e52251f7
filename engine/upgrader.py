"""Running codec upgrades on an open capsule [F-16].

``Upgrader.run`` takes committed frames oldest first, in batches: it reads and re-encodes
a batch without the lock (committed frames do not change), using ``engine/upgrade.py``'s
plan and encoders, then takes the lock to append the new blocks (and maybe a DICT) and
one RELOCATE record naming them, fsyncs, and switches the frame table to them. Ingest
comes first: a batch that finds puts staged gives up its turn instead of waiting.
Compaction re-encodes payloads with the same ``read_and_encode``.
"""

from __future__ import annotations

import threading
from typing import Any

from . import codecs, upgrade
from . import format as fmt
from .appender import body_crc
from .fileio import CapsuleFile
from .log import read_record
from .reading import Dictionaries, read_payload
from .staging import Writer
from .state import CapsuleState

NewDict = tuple[int, bytes, Any]  # id, trained bytes, loaded dictionary


def read_and_encode(
    f: CapsuleFile, dicts: Dictionaries, frames: list[fmt.FrameMeta], zdict: tuple[int, Any] | None,
    level: int, fresh_level: int, *, retrain: bool = False, next_dict: int = 1,
) -> tuple[NewDict | None, list[upgrade.Encoded]]:
    """Read ``frames``' payloads from ``f`` and re-encode them in groups (``upgrade.plan``).
    Trains a dictionary (id ``next_dict``) when there is none, or when ``retrain``; it is
    kept if it pays on fresh small puts at ``fresh_level``."""
    groups, payloads = [], []
    for members in upgrade.plan(frames):
        g = upgrade.Group(members, {}, {}, {})
        data = []
        for m in members:
            if m.block not in g.old_blocks:
                rh, body = read_record(f, m.block, fmt.BLOCK)
                codec, _, _, _, raw_len = fmt.BLOCK_HEADER.unpack_from(body)
                g.old_blocks[m.block] = fmt.RECORD_SIZE + rh.length
                g.old_codecs[m.block] = codec
                g.old_raw[m.block] = raw_len
            data.append(read_payload(f, m, None, dicts))
        groups.append(g)
        payloads.append(data)
    new_dict = None
    if zdict is None or retrain:
        samples = [p for data in payloads for p in data]
        if upgrade.wants_dictionary(samples) and (trained := upgrade.train(samples)) is not None:
            candidate = codecs.load_dict(trained)
            if upgrade.worth_keeping(candidate, samples, fresh_level):
                new_dict = (next_dict, trained, candidate)
                zdict = (next_dict, candidate)
    encoded = [e for g, data in zip(groups, payloads, strict=True) if (e := upgrade.encode(g, data, zdict, level))]
    return new_dict, encoded


class Upgrader:
    """Runs the codec upgrades of one capsule; ``lock`` also keeps compaction out."""

    def __init__(self, state: CapsuleState, writer: Writer) -> None:
        self._s = state
        self._writer = writer
        self.lock = threading.Lock()  # one codec upgrade (or compaction) at a time

    def run(
        self, *, max_frames: int | None, cold_commits: int, level: int, batch_frames: int,
    ) -> dict[str, Any]:
        """See ``Capsule.upgrade_codecs``."""
        s = self._s
        s.check_writable()
        done: dict[str, Any] = {"frames": 0, "moved": 0, "blocks": 0, "saved": 0, "busy": False}
        if not self.lock.acquire(blocking=False):
            return {**done, "busy": True}
        try:
            while max_frames is None or done["frames"] < max_frames:
                with s.lock:
                    s.check_writable()
                    t = s.table
                    start = t.upgraded_upto
                    end = min(t.first_after(max(0, t.seq - cold_commits)), start + batch_frames)
                    if max_frames is not None:
                        end = min(end, start + max_frames - done["frames"])
                    frames, f, dicts = t.frames[start:end], s.file, s.dicts
                    zdict = (max(t.dicts), dicts(max(t.dicts))) if t.dicts else None
                    # The data may drift from what the dictionary learnt: train a new one
                    # (a new id; old blocks keep theirs) each time the capsule grew 8x.
                    retrain = bool(t.dicts) and start >= upgrade.RETRAIN_GROWTH * max(
                        t.dict_trained_at, upgrade.DICT_MIN_SAMPLES)
                    next_dict = max(t.dicts, default=0) + 1
                if not frames:
                    break
                new_dict, encoded = read_and_encode(f, dicts, frames, zdict, level, s.opts.level,
                                                    retrain=retrain, next_dict=next_dict)
                with s.lock:
                    if self._writer.pending or s.app.staged_bytes or s.table.upgraded_upto != start:
                        done["busy"] = True
                        break
                    s.check_writable()
                    moved = self._write(end, new_dict, encoded)
                done["frames"] += len(frames)
                done["moved"] += moved["upgrade.frames"]
                done["blocks"] += moved["upgrade.blocks"]
                done["saved"] += moved["upgrade.saved"]
            with s.lock:
                done["remaining"] = max(0, s.table.first_after(max(0, s.table.seq - cold_commits))
                                        - s.table.upgraded_upto)
            return done
        finally:
            self.lock.release()

    def _write(self, upto: int, new_dict: NewDict | None, encoded: list[upgrade.Encoded]) -> dict[str, int]:
        """Append the new blocks and the RELOCATE naming them, fsync, switch (lock held)."""
        s = self._s
        app = s.app
        pos = app.write_end
        out = bytearray()
        dict_refs, blocks, moves = [], [], []
        if new_dict is not None:
            raw = app.seal(fmt.DICT, fmt.DICT_HEADER.pack(new_dict[0]) + new_dict[1], pos)
            dict_refs.append(fmt.DictRef(new_dict[0], pos, body_crc(raw)))
            out += raw
        for e in encoded:
            at = pos + len(out)
            raw = app.seal(fmt.BLOCK, e.body, at)
            blocks.append(fmt.BlockRef(at, body_crc(raw)))
            start = 0
            for m in e.group.frames:
                moves.append(fmt.Move(m.id, at, start))
                start += m.length
            out += raw
        dict_bytes = blocks[0].offset - pos if blocks else len(out)
        deltas = upgrade.counters(encoded, dict_bytes)
        rec = fmt.RelocateRecord(s.table.seq, upto, moves, blocks, dict_refs, deltas)
        raw = app.seal_meta(fmt.RELOCATE, rec, pos + len(out))
        app.append_durably(bytes(out) + raw)  # the switch point: before it the old blocks are in use
        s.table.relocate(rec, pos + len(out))
        if new_dict is not None:
            s.dicts.add(new_dict[0], new_dict[2])
            s.fresh_dict = (new_dict[0], new_dict[2])
        s.add_counters({**deltas, "bytes.block": len(out) - dict_bytes, "bytes.dict": dict_bytes,
                        "bytes.relocate": len(raw)})
        return {k: deltas.get(k, 0) for k in ("upgrade.frames", "upgrade.blocks", "upgrade.saved")}

