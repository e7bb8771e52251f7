"""engine/framestore.py and engine/keymap.py: frame metadata off the heap, lookups by hash,
and the frame table built on them (URI hash clashes included)."""

from __future__ import annotations

import os
import random
import threading
import tracemalloc

import pytest

import engine
from engine import framestore, table
from engine.format import PUT, TOMBSTONE, CommitRecord, FrameMeta
from engine.framestore import FrameStore
from engine.keymap import KeyMap
from engine.table import FrameTable


def meta(i: int, seq: int = 1, **kw) -> FrameMeta:
    args = dict(id=i, seq=seq, op=PUT, uri=f"file:///tree/dir{i % 97}/file{i}.py#k{i}", title=f"t{i}", kind="chunk",
                tags={"root": "tree", "type": "py"}, timestamp=1e9 + i, supersedes=None, block=i * 100,
                start=0, length=10, digest=i.to_bytes(16, "little"), is_text=True, parent=f"file:///p{i // 8}",
                chunk=i % 8)
    args.update(kw)
    return FrameMeta(**args)


@pytest.fixture
def small_flush(monkeypatch):
    monkeypatch.setattr(framestore, "FLUSH_BYTES", 4096)


def test_frames_read_back_from_the_spill_file_and_the_memory_tail(tmp_path, small_flush):
    s = FrameStore(str(tmp_path))
    try:
        frames = [meta(i, seq=1 + i // 10) for i in range(5000)]
        for f in frames:
            s.append(f)
        assert s._tail[0] > 0  # most of them went to the file
        assert len(s) == 5000 and s[0] == frames[0] and s[-1] == frames[-1] and s[4321] == frames[4321]
        assert list(s) == frames and s[100:2000] == frames[100:2000] and s[4990:] == frames[4990:]
        assert [s.seq_of(i) for i in range(5000)] == [f.seq for f in frames]
        assert all(s.op_of(i) == PUT for i in range(5000))
        with pytest.raises(IndexError):
            s[5000]
    finally:
        s.close()


def test_replace_repoints_one_frame_and_iteration_still_sees_every_frame(tmp_path, small_flush):
    s = FrameStore(str(tmp_path))
    try:
        frames = [meta(i) for i in range(3000)]
        for f in frames:
            s.append(f)
        for i in range(0, 3000, 7):  # a codec upgrade moves payloads: runs of adjacent encodings break
            frames[i] = meta(i, block=999_999, start=i)
            s.replace(frames[i])
        assert list(s) == frames and s[1000:1100] == frames[1000:1100] and s[7] == frames[7]
    finally:
        s.close()


def test_an_encoding_too_long_for_its_length_field_is_kept_whole(tmp_path):
    s = FrameStore(str(tmp_path))
    try:
        big = meta(1, tags={"blob": "x" * (framestore.BIG + 10)})
        s.append(meta(0))
        s.append(big)
        s.append(meta(2))
        assert s[1] == big and list(s) == [meta(0), big, meta(2)]
    finally:
        s.close()


def test_a_full_disk_keeps_frames_in_memory_until_the_spill_file_can_grow(tmp_path, small_flush):
    """ENOSPC from the kernel (/dev/full) on every spill write: nothing is lost, and the
    frames go to the file once writes succeed again."""
    s = FrameStore(str(tmp_path))
    try:
        for i in range(200):
            s.append(meta(i))
        spilled = s._tail[0]
        assert spilled > 0
        saved = os.dup(s._fd)
        full = os.open("/dev/full", os.O_WRONLY)
        os.dup2(full, s._fd)  # the spill file's descriptor now writes to a full device
        os.close(full)
        for i in range(200, 2000):
            s.append(meta(i))
        assert s._tail[0] == spilled and len(s._tail[1]) > 10 * 4096  # kept in memory
        os.dup2(saved, s._fd)  # space again: the file is back
        os.close(saved)
        assert [m.id for m in s[150:1999]] == list(range(150, 1999))  # readable throughout
        for i in range(2000, 4000):
            s.append(meta(i))
        assert s._tail[0] > spilled and len(s._tail[1]) < 2 * 4096  # it caught up
        assert list(s) == [meta(i) for i in range(4000)]
    finally:
        s.close()


def test_without_spill_space_frames_stay_in_memory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    for spill in (None, str(blocker / "spill")):
        s = FrameStore(spill)
        assert s._fd is None
        for i in range(3000):
            s.append(meta(i))
        assert list(s) == [meta(i) for i in range(3000)]
        s.close()


def test_readers_in_other_threads_never_see_a_torn_frame(tmp_path, small_flush):
    s = FrameStore(str(tmp_path))
    stop = threading.Event()
    errors: list[str] = []

    def read() -> None:
        rng = random.Random(1)
        while not stop.is_set():
            n = len(s)
            if n:
                i = rng.randrange(n)
                m = s[i]
                if m.id != i or m.block not in (i * 100, 7):
                    errors.append(f"frame {i} read as {m}")
                for f in s[max(0, n - 50) : n]:
                    if f.block not in (f.id * 100, 7):
                        errors.append(f"frame {f.id} torn")

    readers = [threading.Thread(target=read) for _ in range(2)]
    for r in readers:
        r.start()
    try:
        for i in range(20000):
            s.append(meta(i))
            if i % 3 == 0:
                s.replace(meta(i // 2, block=7))
    finally:
        stop.set()
        for r in readers:
            r.join(timeout=30)
        s.close()
    assert not errors, errors[:5]


def test_kinds_are_numbered_and_past_the_numbers_read_from_the_frame(tmp_path, monkeypatch):
    monkeypatch.setattr(framestore, "MANY_KINDS", 3)
    s = FrameStore(str(tmp_path))
    try:
        kinds = [None, "chunk", "file", "note", "chunk", "event", None]
        for i, k in enumerate(kinds):
            s.append(meta(i, kind=k))
        assert [s.kind_of(i) for i in range(len(kinds))] == kinds
    finally:
        s.close()


def test_keymap_matches_a_dict_through_merges():
    rng = random.Random(5)
    km, model = KeyMap(), {}
    for step in range(60000):
        k = rng.randrange(-(1 << 63), 1 << 63) if rng.random() < 0.7 else rng.choice(list(model) or [0])
        km.set(k, step)
        model[k] = step
        if step % 997 == 0:
            probe = rng.sample(list(model), min(50, len(model))) + [rng.randrange(1 << 62) for _ in range(20)]
            assert [km.get(p) for p in probe] == [model.get(p) for p in probe]
    assert all(km.get(k) == v for k, v in model.items())
    assert km.nbytes() >= 16 * (len(model) - 5000)  # the bulk is in the columns


class Log:
    """Commits for a FrameTable, with a dict model of what each URI's versions are."""

    def __init__(self) -> None:
        self.t = FrameTable()
        self.versions: dict[str, list[int]] = {}
        self.live: dict[str, int] = {}

    def commit(self, ops: list[tuple[str, str]]) -> None:
        seq, frames = self.t.seq + 1, []
        for op, uri in ops:
            fid = self.t.next_id + len(frames)
            old = self.live.pop(uri, None)
            frames.append(meta(fid, seq, uri=uri, op=PUT if op == "put" else TOMBSTONE, supersedes=old))
            self.versions.setdefault(uri, []).append(fid)
            if op == "put":
                self.live[uri] = fid
        self.t.apply(CommitRecord(seq, 1e9 + seq, 0, frames, []), 100 + seq)


@pytest.mark.parametrize("clashing", [False, True])
def test_uri_lookups_hold_even_when_every_hash_clashes(monkeypatch, clashing):
    if clashing:  # 64-bit keys never collide at this scale: force them to
        real = table.uri_key
        monkeypatch.setattr(table, "uri_key", lambda uri: (len(uri) % 3, real(uri)[1]))
    rng = random.Random(3)
    log = Log()
    try:
        uris = [f"mem://u{i}" for i in range(60)]
        history: list[dict[str, int]] = []
        for _ in range(80):
            ops = []
            for uri in rng.sample(uris, 5):
                ops.append(("rm", uri) if uri in log.live and rng.random() < 0.3 else ("put", uri))
            ops = [o for o in ops if o[0] == "put" or o[1] in log.live]
            log.commit(ops)
            history.append(dict(log.live))
        t = log.t
        for uri in uris:
            assert t.versions_of(uri) == log.versions.get(uri, [])
            assert t.live(uri) == log.live.get(uri)
            for seq in (1, 20, 41, 79):
                assert t.at_uri(uri, seq) == history[seq - 1].get(uri)
        assert t.uri_count == len(log.versions) and t.live_uris == len(log.live)
    finally:
        log.t.close()


def test_the_frame_table_costs_about_an_eighth_of_a_kilobyte_a_frame(tmp_path, monkeypatch):
    """The memory behind issue 5: Python-side bytes per frame (tracemalloc: exact, not
    RSS). Columns are ~115 B a frame; the rest is array slack and the fixed buffers
    (the spill tail, here 64 KiB, the decoded-frame cache, here 64 frames, and the maps'
    recent sets). It was ~540 B as objects."""
    monkeypatch.setattr(framestore, "FLUSH_BYTES", 1 << 16)
    monkeypatch.setattr(framestore, "CACHE_FRAMES", 64)  # a fixed ~2.5 MB by default: not per frame
    t = FrameTable(str(tmp_path))
    try:
        def commit(first: int, n: int) -> None:
            seq = t.seq + 1
            t.apply(CommitRecord(seq, 1e9 + seq, 0, [meta(i, seq) for i in range(first, first + n)], []), seq)

        commit(0, 5000)
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        n = 60000
        for first in range(5000, 5000 + n, 500):
            commit(first, 500)
        grown = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        print(f"{grown / n:.0f} B a frame")
        assert grown / n < 140, f"{grown / n:.0f} B a frame"
        last = meta(5000 + n - 1)
        assert t.live(last.uri) == last.id and t.child(last.parent, last.chunk) == last.id
    finally:
        t.close()


def test_a_capsule_keeps_no_spill_file_after_close(path):
    with engine.create(path) as cap:
        for i in range(50):
            cap.put(f"note {i}", uri=f"mem://{i}")
    cap = engine.open(path)
    assert any("(deleted)" in os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
               if os.path.exists(f"/proc/self/fd/{fd}"))
    cap.close()  # the autouse leak check fails the test if the spill file stays open


def test_an_encrypted_capsule_spills_its_frames_to_ram_backed_storage_only(path):
    """Frame metadata (URIs, titles, tags) is plaintext in the spill file: for an
    encrypted capsule it goes where its decrypted indexes go, never to the disk cache."""
    from engine.embed import cache_root
    from engine.ramcopies import ram_root

    def spill_of(cap) -> str:
        return os.readlink(f"/proc/self/fd/{cap._s.table.frames._fd}")  # noqa: SLF001

    with engine.create(path, model=None) as cap:
        cap.put("plain", uri="mem://a")
        assert spill_of(cap).startswith(str(cache_root()))
    with engine.create(path + "e", model=None, passphrase="pw", kdf=engine.KdfParams(memory_cost=1024, iterations=1)) as cap:
        cap.put("secret", uri="mem://secret")
        assert spill_of(cap).startswith(str(ram_root()))
