"""``Capsule.vector_coverage``: the share of text frames with a vector, as ``stats()`` has it,
without its walk over every frame (a find reply carries it: issue 13)."""

from __future__ import annotations

import numpy as np

import engine
from engine.framestore import FrameStore

UNIT = np.ones(384, dtype=np.float32) / np.sqrt(384)


def test_coverage_agrees_with_stats_through_commits_compaction_and_reopen(path):
    with engine.create(path, model="all-MiniLM-L6-v2") as cap:  # bound to a model, no embedder: nothing embeds
        assert cap.vector_coverage() == 1.0  # no text yet: nothing is missing
        for i in range(10):
            cap.put(f"text {i}", uri=f"n://{i}", vector=UNIT if i < 4 else None)
        cap.put(b"\x00binary", uri="b://1")  # not text: not counted
        cap.commit()
        assert cap.vector_coverage() == 0.4 == cap.stats()["vectors"]["coverage"]
        cap.put("text 0, edited", uri="n://0", vector=UNIT)  # a new version: 5 of 11 text frames
        cap.remove("n://9")
        cap.commit()
        assert cap.vector_coverage() == 0.4545 == cap.stats()["vectors"]["coverage"]
        cap.compact()  # a new frame table: counted again, the same
        assert cap.vector_coverage() == 0.4545
    with engine.open(path, readonly=True) as cap:
        assert cap.vector_coverage() == 0.4545
    with engine.create(path + "2", model=None) as cap:
        assert cap.vector_coverage() is None  # lexical only


def test_coverage_looks_at_each_frame_once(path, monkeypatch):
    read: list[int] = []
    original = FrameStore.__getitem__

    def counting(self, i):  # type: ignore[no-untyped-def]
        out = original(self, i)
        read.append(len(out) if isinstance(i, slice) else 1)
        return out

    with engine.create(path, model="all-MiniLM-L6-v2") as cap:
        for i in range(500):
            cap.put(f"text {i}", uri=f"n://{i}")
        cap.commit()
        monkeypatch.setattr(FrameStore, "__getitem__", counting)
        assert cap.vector_coverage() == 0.0 and sum(read) == 500
        read.clear()
        assert cap.vector_coverage() == 0.0 and sum(read) == 0, "the same frames read again"
        cap.put("one more", uri="n://more", vector=UNIT)
        cap.commit()
        read.clear()
        assert cap.vector_coverage() == 0.0019 and sum(read) == 1  # 1/501, rounded down
