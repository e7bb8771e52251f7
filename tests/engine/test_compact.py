"""Compaction, branches and rewind [F-17, F-18]: history survives every rewrite.

Each test records every as-of view before the operation and compares after it, byte for
byte; crash tests kill -9 a real process in the middle of a compaction.
"""

from __future__ import annotations

import os
import random
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import engine
from engine import codecs
from engine import compact as compact_mod
from engine import format as fmt
from workload import Workload, kill_after, snapshot

ROOT = Path(__file__).resolve().parents[2]  # the repository


def every_view(cap: engine.Capsule) -> list[dict[str, bytes]]:
    return [snapshot(cap, s) for s in range(cap.seq + 1)]


def frames_of(cap: engine.Capsule) -> list[tuple]:
    """Everything about every frame but where its bytes are stored."""
    out = []
    for fid in range(cap.stats()["frames"]):
        try:
            f = cap.get(fid)
        except engine.NotFound:  # tombstones
            out.append((fid, None))
            continue
        out.append((fid, f.uri, f.title, f.tags, f.timestamp, f.commit_seq, f.commit_time, f.valid_until, f.payload))
    return out


def build(path: str, seed: int = 1, commits: int = 60, **options) -> Workload:
    """A capsule with versions, tombstones, URI-less frames, checkpoints and an upgrade."""
    w = Workload(seed)
    with engine.create(path, model=None, checkpoint_frames=40, index_dir=tempfile.mkdtemp(), **options) as cap:
        for i in range(commits):
            ops = w.batch()
            w.stage(cap, ops)
            cap.commit()
            w.committed(ops)
            if i == commits // 2:
                cap.upgrade_codecs()  # some frames moved: their old blocks are dead
    return w


@pytest.mark.req("F-17")
def test_compaction_keeps_history_and_reclaims_dead_bytes(tmp_path):
    path = str(tmp_path / "c.mv2")
    build(path)
    with engine.open(path) as cap:
        views, frames = every_view(cap), frames_of(cap)
        dead = cap.stats()["bytes_by_kind"]["dead"]
        assert dead > 0
        report = cap.compact()
        assert report["bytes_after"] < report["bytes_before"] - dead // 2, report
        assert every_view(cap) == views
        assert frames_of(cap) == frames
        assert cap.stats()["bytes_by_kind"]["dead"] == 0
        assert os.path.getsize(path) == cap.stats()["file_bytes"]
        cap.put("after compaction", uri="new://1")
        cap.commit()
    assert not list(tmp_path.glob("*.compacting"))
    assert engine.verify(path).ok
    with engine.open(path) as cap:
        assert every_view(cap)[: len(views)] == views
        assert cap.get(uri="new://1").text == "after compaction"


def test_repeated_compactions_keep_no_old_frame_table(tmp_path):
    """A long-running daemon compacts again and again: with no reader on it, the frame
    table a switch replaced is closed at once (its spill file holds ~0.3 KB of disk a
    frame until closed)."""
    path = str(tmp_path / "c.mv2")
    frames_dir = os.path.join(os.environ["XDG_CACHE_HOME"], "memvidd", "frames")

    def spills() -> int:
        return sum(1 for fd in os.listdir("/proc/self/fd")
                   if os.path.exists(f"/proc/self/fd/{fd}") and os.readlink(f"/proc/self/fd/{fd}").startswith(frames_dir))

    build(path, commits=20)
    with engine.open(path) as cap:
        views = every_view(cap)
        for i in range(4):
            cap.put(f"edit {i}", uri="edited://1")
            cap.commit()
            cap.compact()
            assert spills() == 1  # no reader holds the old table: it is closed at once
        assert every_view(cap)[: len(views)] == views
    assert spills() == 0


def test_compaction_keeps_vectors_and_search(tmp_path):
    path = str(tmp_path / "v.mv2")
    rng = np.random.default_rng(0)
    texts = [f"note {i} about {'apples' if i % 2 else 'pears'} and more words" for i in range(300)]
    vecs = rng.normal(size=(300, 384)).astype(np.float32)
    with engine.create(path, index_dir=str(tmp_path / "ix")) as cap:
        for i, (t, v) in enumerate(zip(texts, vecs)):
            cap.put(t, uri=f"n://{i}", vector=v)
            if i % 10 == 9:
                cap.commit()
        before = cap.vectors(range(300))
        hits = [h.frame_id for h in cap.find("apples", mode="lex", k=20)]
        cap.compact()
        after = cap.vectors(range(300))
        assert sorted(after) == sorted(before)
        assert all(np.array_equal(after[i], before[i]) for i in before)
        assert [h.frame_id for h in cap.find("apples", mode="lex", k=20)] == hits
    with engine.open(path, index_dir=str(tmp_path / "ix2")) as cap:  # no working copies
        assert [h.frame_id for h in cap.find("apples", mode="lex", k=20)] == hits
        assert cap.stats()["vectors"]["frames_with_vectors"] == 300


def test_compaction_while_another_thread_commits(tmp_path):
    path = str(tmp_path / "t.mv2")
    build(path, commits=40)
    with engine.open(path) as cap:
        views = every_view(cap)
        acked: list[tuple[int, str]] = []
        stop = threading.Event()
        errors: list[BaseException] = []

        def writer() -> None:
            try:
                i = 0
                while not stop.is_set():
                    cap.put(f"concurrent {i}", uri=f"w://{i % 7}")
                    cap.commit()
                    acked.append((i % 7, f"concurrent {i}"))
                    i += 1
            except BaseException as e:  # surfaces below
                errors.append(e)

        t = threading.Thread(target=writer, daemon=True)
        t.start()
        while len(acked) < 5:
            time.sleep(0.001)
        cap.compact()
        stop.set()
        t.join(timeout=30)
        assert not errors, errors
        assert every_view(cap)[: len(views)] == views
        latest = dict(acked)
        assert {k: cap.get(uri=f"w://{k}").text for k in latest} == latest
    assert engine.verify(path).ok


def test_failed_compaction_leaves_the_capsule_as_it_was(tmp_path, monkeypatch):
    path = str(tmp_path / "f.mv2")
    build(path, commits=30)
    original = Path(path).read_bytes()
    written = {"n": 0}
    real = engine.fileio.OsFile.pwrite

    def failing(self, offset, data):  # the disk fills up while the copy is written
        if self.path.endswith("(unnamed)"):
            written["n"] += 1
            if written["n"] >= 1:
                raise engine.StorageError("write", self.path, OSError(28, "No space left on device"))
        return real(self, offset, data)

    monkeypatch.setattr(engine.fileio.OsFile, "pwrite", failing)
    with engine.open(path) as cap:
        views = every_view(cap)
        with pytest.raises(engine.StorageError):
            cap.compact()
        assert every_view(cap) == views
        monkeypatch.setattr(engine.fileio.OsFile, "pwrite", real)
        cap.put("still writable", uri="x://1")
        cap.commit()
    assert Path(path).read_bytes()[: len(original)] == original
    assert not list(tmp_path.glob("*.compacting"))
    assert engine.verify(path).ok


CHILD = """
import sys
sys.path.insert(0, {root!r})
import engine
cap = engine.open({path!r})
print("ready", flush=True)
cap.compact()
print("done", flush=True)
cap.close()
"""


@pytest.mark.timeout(180)
def test_kill_9_during_compaction(tmp_path):
    path = str(tmp_path / "k.mv2")
    build(path, seed=3, commits=150)
    with engine.open(path, readonly=True) as cap:
        views, frames = every_view(cap), frames_of(cap)
    rng = random.Random(int(os.environ.get("CRASH_SEED", "11")))
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(root=str(ROOT), path=path))
    outcomes = set()
    for attempt in range(8):
        out = kill_after(str(script), rng.uniform(0, 0.6))
        outcomes.add("done" in out)
        with engine.open(path) as cap:  # the old file or the new one, never a mix
            assert every_view(cap) == views, f"attempt {attempt}"
            assert frames_of(cap) == frames
        assert engine.verify(path).ok
    with engine.open(path) as cap:  # a leftover .compacting file does not stop the next one
        cap.compact()
        assert every_view(cap) == views
    assert not list(tmp_path.glob("*.compacting"))


@pytest.mark.req("F-17")
def test_branch_holds_the_past_and_nothing_after_it(tmp_path):
    path = str(tmp_path / "src.mv2")
    with engine.create(path, model=None, index_dir=str(tmp_path / "ix")) as cap:
        for i in range(200):
            cap.put(f"early note {i} alpha", uri=f"n://{i % 50}")
            if i % 20 == 19:
                cap.commit()
        mid = cap.seq
        view = snapshot(cap, mid)
        for i in range(200):
            cap.put(f"SECRET-LATER-{i} beta", uri=f"n://{i % 60}")
            if i % 20 == 19:
                cap.commit()
        cap.upgrade_codecs()  # groups by id: a block now holds frames from before and after `mid`
        assert len({cap._s.table.frames[i].block for i in (195, 205)}) == 1
        report = cap.branch(tmp_path / "b.mv2", as_of=mid)
        assert report["seq"] == mid
        with pytest.raises(engine.CapsuleExists):
            cap.branch(tmp_path / "b.mv2")
    with engine.open(path, readonly=True) as src:
        past = [snapshot(src, s) for s in range(mid + 1)]
        src_id = src.stats()["capsule_id"]
    with engine.open(tmp_path / "b.mv2", index_dir=str(tmp_path / "ix2")) as b:
        assert b.seq == mid and snapshot(b) == view
        assert every_view(b) == past
        origin = b.stats()["origin"]
        assert origin["seq"] == mid and origin["path"] == os.path.abspath(path)
        assert b.stats()["capsule_id"] != src_id
        assert len(b.find("alpha", mode="lex", k=5)) == 5 and len(b.find("beta", mode="lex")) == 0
        b.put("the branch goes its own way", uri="n://1")
        b.commit()
    assert engine.verify(str(tmp_path / "b.mv2")).ok
    assert b"SECRET-LATER" not in decoded_blocks(tmp_path / "b.mv2")
    with engine.open(path, readonly=True) as cap:  # the source is untouched
        assert cap.get(uri="n://1").text.startswith("SECRET-LATER")


def decoded_blocks(path: Path) -> bytes:
    """Every BLOCK record of a file, decoded: what the file really holds."""
    data = path.read_bytes()
    with engine.open(str(path), readonly=True) as cap:
        dicts = cap._s.dicts
    out = []
    pos = fmt.LOG_START
    while pos < len(data):
        rh = fmt.decode_record_header(data, pos)
        body = data[pos + fmt.RECORD_SIZE : pos + fmt.RECORD_SIZE + rh.length]
        if rh.kind == fmt.BLOCK:
            codec, _, _, dict_id, raw_len = fmt.BLOCK_HEADER.unpack_from(body)
            out.append(codecs.decode(codec, body[fmt.BLOCK_HEADER.size :], raw_len,
                                     zdict=dicts(dict_id) if dict_id else None))
        pos += fmt.RECORD_SIZE + rh.length
    return b"".join(out)


@pytest.mark.req("F-18")
def test_rewind_restores_the_past_and_keeps_what_came_after(tmp_path):
    path = str(tmp_path / "r.mv2")
    with engine.create(path, model=None) as cap:
        cap.put("a1", uri="a")
        cap.put("b1", uri="b")
        cap.put("loose 1")
        mid = cap.commit()
        view = snapshot(cap, mid)
        loose_then = {f.id for f in cap.timeline() if f.uri is None}
        cap.put("a2", uri="a")  # changed
        cap.remove("b")  # removed
        cap.put("c1", uri="c")  # added
        cap.remove(next(iter(loose_then)))  # a uri-less frame removed
        cap.put("loose 2")  # a uri-less frame added
        cap.commit()
        after = every_view(cap)
        seq = cap.rewind(mid)
        assert snapshot(cap) == view
        assert every_view(cap)[: len(after)] == after  # nothing rewound over is lost
        assert sorted(f.text for f in (cap.get(f.id) for f in cap.timeline())) == ["a1", "b1", "loose 1"]
        assert cap.stats()["rewinds"] == [{"seq": seq, "to": mid}]
        assert cap.get(uri="a", as_of=seq - 1).text == "a2"
        cap.checkpoint()
    with engine.open(path) as cap:  # the marker survives checkpoints and reopening
        assert snapshot(cap) == view and cap.stats()["rewinds"] == [{"seq": seq, "to": mid}]
        assert cap.rewind(seq - 1) == seq + 1  # rewinding a rewind: back to "after"
        assert snapshot(cap) == after[-1]
    assert engine.verify(path).ok


def test_rewind_to_a_time_and_to_the_empty_capsule(tmp_path):
    path = str(tmp_path / "t.mv2")
    with engine.create(path, model=None) as cap:
        cap.put("one", uri="u")
        first = cap.commit()
        t = cap.get(uri="u").commit_time
        cap.put("two", uri="u")
        cap.commit()
        cap.rewind(t)
        assert cap.get(uri="u").text == "one" and cap.stats()["rewinds"][-1]["to"] == first
        cap.rewind(0)
        assert snapshot(cap) == {}
        with pytest.raises(engine.InvalidArgument):
            cap.rewind(cap.seq + 5)
        cap.put("staged")
        with pytest.raises(engine.InvalidArgument):
            cap.rewind(1)


def test_a_cancelled_compaction_changes_nothing(tmp_path, monkeypatch):
    path = str(tmp_path / "x.mv2")
    build(path, commits=120)
    before = Path(path).read_bytes()
    cancel = threading.Event()
    with engine.open(path) as cap:
        views = every_view(cap)
        real = compact_mod.read_and_encode

        def slow_then_cancel(*a, **kw):  # the stop request arrives while the copy runs
            cancel.set()
            return real(*a, **kw)

        monkeypatch.setattr(compact_mod, "read_and_encode", slow_then_cancel)
        with pytest.raises(engine.Cancelled):
            cap.compact(cancel=cancel)
        monkeypatch.undo()
        assert every_view(cap) == views
    assert Path(path).read_bytes() == before
    assert not list(tmp_path.glob("*.compacting"))


def test_readers_during_the_switch_never_see_an_error(tmp_path):
    """get and find in other threads while compaction copies and switches files: every
    read returns the right bytes (a read that raced the switch is retried on the new file)."""
    path = str(tmp_path / "r.mv2")
    texts = {}
    with engine.create(path, model=None, index_dir=str(tmp_path / "ix")) as cap:
        for i in range(2000):
            texts[cap.put(f"reader note {i} " + "z" * (i % 500), uri=f"r://{i}")] = f"reader note {i} " + "z" * (i % 500)
            if i % 100 == 99:
                cap.commit()
        cap.find("note", mode="lex")
        stop = threading.Event()
        errors: list[BaseException] = []
        reads = [0]

        def reader(seed: int) -> None:
            rng = random.Random(seed)
            try:
                while not stop.is_set():
                    fid = rng.randrange(2000)
                    assert cap.get(fid).text == texts[fid]
                    hits = cap.find(f"note {fid}", mode="lex", k=3)
                    assert all(cap.get(h.frame_id).text == texts[h.frame_id] for h in hits)
                    reads[0] += 1
            except BaseException as e:  # surfaces below
                errors.append(e)

        threads = [threading.Thread(target=reader, args=(s,), daemon=True) for s in range(3)]
        for t in threads:
            t.start()
        for _ in range(3):
            cap.compact()
        stop.set()
        for t in threads:
            t.join(timeout=30)
        assert not errors, errors[0]
        assert reads[0] > 0
    # The race itself, made certain: a frame's location from before the switch (a fresh
    # block, regrouped by the compaction) read after it, through the view it came from.
    with engine.create(str(tmp_path / "s.mv2"), model=None) as cap:
        ids = [cap.put(f"frame {i} " * 50) for i in range(100)]
        cap.commit()
        with cap._s.reading() as view:
            old = [view.table.frames[i] for i in (ids[5], ids[70])]
            cap.compact()
            assert old[0].block != cap._s.table.frames[ids[5]].block
            assert [view.text(m) for m in old] == ["frame 5 " * 50, "frame 70 " * 50]


@pytest.mark.timeout(60)
def test_a_search_that_starts_inside_the_switch_reads_one_file(tmp_path, monkeypatch):
    """The race that made readers fail at random, made certain: a search past the capsule
    lock looks up its hits while the switch has loaded the new frame table but the
    capsule still names the old file's caches (the switch is reading a dictionary). It
    must read locations and bytes from the same file."""
    from engine import state as state_mod

    with engine.create(str(tmp_path / "w.mv2"), model=None, index_dir=str(tmp_path / "ix")) as cap:
        for i in range(300):
            cap.put(f"window note {i} " * 20, uri=f"w://{i}")
        cap.commit()
        cap.upgrade_codecs(cold_commits=0)  # trains a dictionary: the switch reads it back
        cap.find("note", mode="lex")
        in_window, searched = threading.Event(), threading.Event()
        result: list[object] = []

        real_resolve = cap._query.resolve_mode

        def late_resolve(mode, ix):  # the reader, past the lock, waits for the switch's window
            assert in_window.wait(20)
            return real_resolve(mode, ix)

        class SlowDictionaries(state_mod.Dictionaries):
            def __init__(self, *a, **kw):
                super().__init__(*a, **kw)
                if not in_window.is_set():
                    in_window.set()
                    assert searched.wait(20)

        def reader() -> None:
            try:
                result.append([(h.frame_id, h.snippet) for h in cap.find("window note 123", mode="lex", k=3)])
            except BaseException as e:
                result.append(e)
            searched.set()

        monkeypatch.setattr(cap._query, "resolve_mode", late_resolve)
        t = threading.Thread(target=reader, daemon=True)
        t.start()
        monkeypatch.setattr(state_mod, "Dictionaries", SlowDictionaries)
        cap.compact()
        t.join(20)
        assert searched.is_set()
        assert not isinstance(result[0], BaseException), result[0]
        assert result[0] and all("window note" in snippet for _, snippet in result[0])


def test_a_pinned_view_outlives_compactions_then_gives_its_file_back(tmp_path):
    """A reader slow enough to span several compactions still reads its own file; each
    replaced file (and frame table) is closed when its last reader is done, so a
    long-running daemon does not keep the disk space of files it compacted away."""
    path = str(tmp_path / "p.mv2")

    def old_files() -> int:  # open descriptors of capsule files no longer in the directory
        n = 0
        for fd in os.listdir("/proc/self/fd"):
            try:
                if os.readlink(f"/proc/self/fd/{fd}").startswith(str(tmp_path)):
                    n += os.stat(f"/proc/self/fd/{fd}").st_nlink == 0
            except OSError:
                pass  # the descriptor of listdir itself
        return n

    with engine.create(path, model=None) as cap:
        ids = [cap.put(f"pinned {i} " * 40, uri=f"p://{i}") for i in range(200)]
        cap.commit()
        with cap._s.reading() as view:
            before = view.table.frames[ids[7]]
            for i in range(3):
                cap.put(f"edit {i}", uri="p://7")
                cap.commit()
                cap.compact()
            assert old_files() == 1  # only the file the reader still holds
            assert view.text(before) == "pinned 7 " * 40
        assert old_files() == 0
        assert cap.get(ids[8]).text == "pinned 8 " * 40
        # Every way a read ends gives its pin back: a cache hit, a bad argument, an error.
        cap.find("pinned", mode="lex")
        assert cap.find("pinned", mode="lex").cached
        with pytest.raises(engine.InvalidArgument):
            cap.find("pinned", mode="vec")
        with pytest.raises(engine.NotFound):
            cap.get(uri="p://nothing")
        cap.changes(0)
        cap.timeline()
        assert cap._s.views.current.pins == 0
