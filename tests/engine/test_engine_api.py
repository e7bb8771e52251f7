"""The engine's public API: versions, tombstones, as-of views, timeline, locking, errors."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import threading
import time

import pytest

import engine


def test_create_refuses_an_existing_file(path):
    engine.create(path).close()
    with pytest.raises(engine.CapsuleExists):
        engine.create(path)
    open(path + ".other", "w").close()
    with pytest.raises(engine.CapsuleExists):
        engine.create(path + ".other")


def test_put_commit_get_roundtrip_text_and_bytes(path):
    with engine.create(path) as cap:
        a = cap.put("héllo wörld ✓", uri="mem://a", title="A", tags={"k": "v"}, kind="note", timestamp=100.5)
        b = cap.put(b"\x00\xff binary")
        assert (a, b) == (0, 1)
        with pytest.raises(engine.NotFound):
            cap.get(a)  # staged frames are not visible before commit
        assert cap.commit() == 1
        f = cap.get(a)
        assert (f.text, f.uri, f.title, f.tags, f.kind, f.timestamp) == ("héllo wörld ✓", "mem://a", "A", {"k": "v"}, "note", 100.5)
        assert f.is_text and f.commit_seq == 1 and f.valid_until is None
        g = cap.get(b)
        assert g.payload == b"\x00\xff binary" and not g.is_text


@pytest.mark.req("F-21")
def test_new_version_supersedes_and_history_stays(path):
    with engine.create(path) as cap:
        v1 = cap.put("one", uri="doc")
        s1 = cap.commit()
        v2 = cap.put("two", uri="doc")
        s2 = cap.commit()
        assert cap.get(uri="doc").text == "two"
        old = cap.get(v1)
        assert old.text == "one" and old.valid_until == s2 and old.superseded_by == v2
        assert cap.get(v2).supersedes == v1
        assert cap.get(uri="doc", as_of=s1).text == "one"
        assert cap.stats()["live_frames"] == 1


@pytest.mark.req("F-22")
def test_remove_writes_a_tombstone_and_as_of_sees_the_past(path):
    with engine.create(path) as cap:
        fid = cap.put("keep me in history", uri="x")
        s1 = cap.commit()
        tomb = cap.remove("x")
        s2 = cap.commit()
        with pytest.raises(engine.NotFound):
            cap.get(uri="x")
        with pytest.raises(engine.NotFound):
            cap.get(tomb)
        assert cap.get(uri="x", as_of=s1).text == "keep me in history"
        assert cap.get(fid).valid_until == s2
        assert [e.id for e in cap.timeline(as_of=s1)] == [fid]
        assert cap.timeline() == []
        with pytest.raises(engine.NotFound):
            cap.remove("x")  # already gone
        with pytest.raises(engine.NotFound):
            cap.remove(fid)


def test_remove_by_frame_id_without_uri(path):
    with engine.create(path) as cap:
        fid = cap.put("anonymous")
        cap.commit()
        cap.remove(fid)
        cap.commit()
        assert cap.timeline() == []
        assert cap.get(fid).text == "anonymous"  # by id, history is still readable


def test_versions_within_one_batch_chain_correctly(path):
    with engine.create(path) as cap:
        a = cap.put("a1", uri="u")
        b = cap.put("a2", uri="u")
        cap.remove("u")
        c = cap.put("a3", uri="u")
        seq = cap.commit()
        assert cap.get(uri="u").id == c
        assert cap.get(a).superseded_by == b
        assert cap.get(b).valid_until == seq
    with engine.open(path) as cap:
        assert cap.get(uri="u").text == "a3"


@pytest.mark.req("F-23")
def test_as_of_by_timestamp_uses_commit_time(path):
    with engine.create(path) as cap:
        cap.put("v1", uri="t")
        cap.commit()
        between = time.time()
        time.sleep(0.01)  # commit times must differ for a timestamp to fall between them
        cap.put("v2", uri="t")
        cap.commit()
        assert cap.get(uri="t", as_of=between).text == "v1"
        assert cap.get(uri="t", as_of=dt.datetime.now(dt.timezone.utc)).text == "v2"
        with pytest.raises(engine.NotFound):
            cap.get(uri="t", as_of=0.0)  # before the first commit: nothing existed
        assert cap.timeline(as_of=0) == []


def test_as_of_bad_values_are_clear_errors(path):
    with engine.create(path) as cap:
        cap.put("x", uri="a")
        cap.commit()
        for bad in (5, -1, True, "yesterday", float("nan"), dt.datetime(2020, 1, 1)):
            with pytest.raises(engine.InvalidArgument):
                cap.get(uri="a", as_of=bad)


def test_timeline_orders_filters_limits_and_reverses(path):
    with engine.create(path) as cap:
        ids = [cap.put(f"e{i}", timestamp=1000 + (i * 7) % 10) for i in range(10)]
        cap.commit()
        got = cap.timeline(limit=100)
        assert [e.timestamp for e in got] == sorted(e.timestamp for e in got)
        assert len(got) == 10 and set(e.id for e in got) == set(ids)
        assert [e.id for e in cap.timeline(reverse=True, limit=3)] == [e.id for e in got[::-1][:3]]
        window = cap.timeline(since=1002, until=1005)
        assert {e.timestamp for e in window} == {1002, 1003, 1004, 1005}
        assert cap.timeline(limit=0) == []
        with pytest.raises(engine.InvalidArgument):
            cap.timeline(limit=-1)
        notes = [cap.put(f"n{i}", kind="note", timestamp=1003.5) for i in range(2)]
        cap.commit()
        assert [e.id for e in cap.timeline(kind="note")] == notes
        assert len(cap.timeline(kind="other")) == 0 and len(cap.timeline()) == 12


def test_put_many_is_one_commit(path):
    with engine.create(path) as cap:
        ids = cap.put_many([{"text": f"t{i}", "uri": f"u{i}"} for i in range(50)] + [{"data": b"raw"}])
        assert cap.commit() == 1
        assert len(ids) == 51 and cap.get(ids[-1]).payload == b"raw"
        with pytest.raises(engine.InvalidArgument):
            cap.put_many([{"uri": "no payload"}])


@pytest.mark.parametrize(
    "kwargs",
    [dict(uri=""), dict(uri=5), dict(tags={"a": 1}), dict(tags=["x"]), dict(title=b"t"),
     dict(timestamp="now"), dict(timestamp=float("inf")), dict(chunk=-1)],
)
def test_put_rejects_bad_arguments_and_stages_nothing(path, kwargs):
    with engine.create(path) as cap:
        with pytest.raises(engine.InvalidArgument):
            cap.put("x", **kwargs)
        with pytest.raises(engine.InvalidArgument):
            cap.put(12345)  # type: ignore[arg-type]
        assert cap.commit() == 0 and cap.stats()["frames"] == 0


def test_get_argument_errors(path):
    with engine.create(path) as cap:
        with pytest.raises(engine.InvalidArgument):
            cap.get()
        with pytest.raises(engine.InvalidArgument):
            cap.get(0, uri="x")
        with pytest.raises(engine.NotFound):
            cap.get(99)


def test_readonly_shares_the_file_with_a_writer_and_refreshes(path):
    w = engine.create(path)
    try:
        w.put("first", uri="a")
        w.commit()
        r = engine.open(path, readonly=True)
        try:
            assert r.get(uri="a").text == "first"
            w.put("second", uri="a")
            w.put("staged only", uri="b")
            assert r.refresh() == 0  # nothing committed yet: staged blocks stay invisible
            w.commit()
            assert r.refresh() == 1
            assert r.get(uri="a").text == "second" and r.get(uri="b").text == "staged only"
            with pytest.raises(engine.ReadOnlyError):
                r.put("nope")
        finally:
            r.close()
    finally:
        w.close()


@pytest.mark.req("F-13")
def test_second_writer_gets_locked_by_pid(path):
    engine.create(path).close()
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import engine,sys; c=engine.open(sys.argv[1]); print('locked', flush=True); sys.stdin.read()", path],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(engine.CapsuleLocked) as info:
            engine.open(path)
        assert info.value.pid == holder.pid
        assert f"locked by pid {holder.pid}" in str(info.value)
        with engine.open(path, readonly=True) as r:  # readers are never blocked
            assert r.seq == 0
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
        holder.stdout.close()
    with engine.open(path) as cap:  # the lock went away with its holder
        cap.put("mine")


def test_lock_survives_commits_and_checkpoints(path):
    with engine.create(path, checkpoint_frames=2) as cap:
        for i in range(6):
            cap.put(f"x{i}")
            cap.commit()
        assert cap.stats()["checkpoints"] >= 2
        with pytest.raises(engine.CapsuleLocked):
            engine.open(path)


@pytest.mark.req("F-13")
def test_no_sidecar_files_ever(path, tmp_path):
    with engine.create(path, checkpoint_frames=3) as cap:
        for i in range(10):
            cap.put(f"x{i}", uri=f"u{i % 3}")
            cap.commit()
            assert os.listdir(tmp_path) == ["c.mv2"]
        with engine.open(path, readonly=True):
            assert os.listdir(tmp_path) == ["c.mv2"]
    engine.doctor(path)
    assert os.listdir(tmp_path) == ["c.mv2"]


def test_close_commits_and_exception_rolls_back(path):
    cap = engine.create(path)
    cap.put("kept", uri="k")
    cap.close()
    with pytest.raises(RuntimeError):
        with engine.open(path) as cap:
            cap.put("discarded", uri="d")
            raise RuntimeError("boom")
    with engine.open(path) as cap:
        assert cap.get(uri="k").text == "kept"
        with pytest.raises(engine.NotFound):
            cap.get(uri="d")
        cap.close()
        with pytest.raises(engine.CapsuleClosed):
            cap.get(0)


@pytest.mark.req("F-20")
def test_rollback_discards_staged_frames_and_their_bytes(path):
    with engine.create(path) as cap:
        cap.put("a", uri="a")
        cap.commit()
        size = os.path.getsize(path)
        cap.put("b" * 5000, uri="b")
        cap.rollback()
        assert os.path.getsize(path) == size
        assert cap.put("c", uri="c") == 1  # ids are reused: only committed ids are dense
        cap.commit()
        assert cap.get(uri="c").id == 1


@pytest.mark.req("F-11")
def test_checkpoints_merge_segments_and_reopen_matches(path):
    with engine.create(path, checkpoint_frames=5) as cap:
        for i in range(400):
            cap.put(f"frame {i}", uri=f"u{i % 37}", tags={"i": str(i)})
            if i % 3 == 2:
                cap.commit()
        cap.commit()
        stats = cap.stats()
        before = [cap.get(uri=f"u{j}").text for j in range(37)]
        history = [(e.id, e.valid_until) for e in cap.timeline(as_of=50, limit=1000)]
    assert stats["checkpoints"] > 20
    assert stats["segments"] <= 12  # tiers of four keep the count logarithmic
    with engine.open(path) as cap:
        assert [cap.get(uri=f"u{j}").text for j in range(37)] == before
        assert [(e.id, e.valid_until) for e in cap.timeline(as_of=50, limit=1000)] == history
    assert engine.verify(path).ok


def test_segments_stop_merging_at_their_size_cap(path, monkeypatch):
    """A merge holds its frames in memory: capped, a checkpoint's memory stays bounded
    however big the capsule grows (issue 5), and segments grow in number instead."""
    from engine import appender, checkpoint

    monkeypatch.setattr(checkpoint, "MAX_SEGMENT_FRAMES", 40)
    monkeypatch.setattr(appender, "SPOOL_BYTES", 256)  # and the records go out in many writes
    with engine.create(path, checkpoint_frames=5) as cap:
        for i in range(400):
            cap.put(f"frame {i}", uri=f"u{i % 37}")
            if i % 3 == 2:
                cap.commit()
        cap.commit()
        sizes = [s.count for s in cap._s.ckpt.segments]  # noqa: SLF001 - the policy under test
        before = [cap.get(uri=f"u{j}").text for j in range(37)]
    assert max(sizes) <= 40 and 390 < sum(sizes) <= 400 and len(sizes) >= 10  # the rest: the tail
    with engine.open(path) as cap:
        assert [cap.get(uri=f"u{j}").text for j in range(37)] == before
    assert engine.verify(path).ok


def test_stats_reports_sizes_codecs_and_counts(path):
    with engine.create(path) as cap:
        cap.put("compressible " * 1000, uri="a")
        cap.put(os.urandom(4000), uri="b")
        cap.commit()
        cap.remove("a")
        cap.commit()
        s = cap.stats()
    assert s["frames"] == 3 and s["live_frames"] == 1 and s["tombstones"] == 1
    assert s["codecs"]["zstd"]["blocks"] == 1 and s["codecs"]["zstd"]["ratio"] < 0.1
    assert s["codecs"]["raw"]["blocks"] == 1  # random bytes are stored raw
    assert s["commit_seq"] == 2 and s["file_bytes"] == os.path.getsize(path)
    assert s["bytes_by_kind"]["block"] > 4000


def test_unknown_option_is_rejected(path):
    with pytest.raises(engine.InvalidArgument):
        engine.create(path, levle=3)
    assert not os.path.exists(path)


def test_put_many_is_all_or_nothing(path):
    with engine.create(path) as cap:
        cap.put("staged before", uri="a")
        size_before = os.path.getsize(path)
        with pytest.raises(engine.InvalidArgument):
            cap.put_many([{"text": "ok", "uri": "b"}, {"text": "bad", "tags": {"x": 1}}])
        with pytest.raises(engine.InvalidArgument):
            cap.put_many([{"text": "ok", "uri": "c"}, {"text": "typo", "titel": "t"}])
        assert os.path.getsize(path) == size_before
        cap.put("after", uri="b")
        cap.commit()
        assert {e.uri for e in cap.timeline()} == {"a", "b"}
        assert cap.get(uri="b").text == "after" and cap.get(uri="b").supersedes is None


@pytest.mark.timeout(30)
def test_counts_an_event_loop_reads_never_wait_for_the_writer(tmp_path):
    """``seq`` and ``frame_count`` answer while another thread holds the capsule (a writer
    across an fsync or a checkpoint): the daemon's event loop reads them for its status."""
    with engine.create(tmp_path / "c.mv2", model=None) as cap:
        cap.put("one")
        cap.commit()
        held, release = threading.Event(), threading.Event()

        def writer() -> None:
            with cap._s.lock:
                held.set()
                release.wait(20)

        t = threading.Thread(target=writer, daemon=True)
        t.start()
        assert held.wait(10)
        try:
            assert (cap.seq, cap.frame_count) == (1, 1)
            assert cap._s.lock.acquire(timeout=0.05) is False  # stats() would have waited here
        finally:
            release.set()
            t.join(10)
        assert cap.stats()["frames"] == 1
