"""memvidd import: capsules written by the real memvid-sdk (upstream memvid), read by our own
reader (memvidd/upstream_format.py: it sees what the SDK sees) and written into memvidd
capsules, new, existing, or served by a daemon; bad input is refused and loses nothing."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from daemon_util import DaemonProc

import engine
from memvidd import upstream_format as uf
from memvidd.client import Client
from memvidd.sdk import from_tags
from memvidd.upstream_import import BATCH_BYTES, batches, plan

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


@pytest.fixture(scope="module")
def upstream(tmp_path_factory) -> tuple[Path, dict]:
    """A capsule the real memvid-sdk wrote (20 frames: versions by uri, a deletion, a chunked
    long text, non-ASCII text), and what was put and what the SDK reads back."""
    if importlib.util.find_spec("memvid_sdk") is None:  # found, not imported: it runs in children only
        pytest.skip("memvid-sdk (the test extra) is not installed")
    tmp = tmp_path_factory.mktemp("upstream")
    path = tmp / "notes.mv2"
    # In a child: the SDK's threads stay out of this process, and run() kills it with
    # SIGKILL on a timeout (it ignores SIGTERM; it deadlocks past ~1,000 puts: this is 20).
    done = subprocess.run([sys.executable, str(HERE / "upstream_fixture.py"), str(path)], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "MEMVID_TELEMETRY": "0"}, cwd=tmp)
    assert done.returncode == 0, done.stderr[-3000:]
    return path, json.loads(done.stdout)


def memvidd(*args: str, env: dict[str, str] | None = None, no_sdk: Path | None = None) -> subprocess.CompletedProcess:
    path = [str(ROOT)] + ([str(no_sdk)] if no_sdk else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), **(env or {})}
    return subprocess.run([sys.executable, "-m", "memvidd", *args], capture_output=True, text=True, timeout=120,
                          env=env, cwd=ROOT)


def texts_put(truth: dict) -> dict[str, str]:
    """title -> text of every document the fixture put (titles are unique but "Plan")."""
    return {d["title"]: d["text"] for d in truth["notes"] + truth["batch"] if d["title"] != "Plan"}


def test_reader_sees_what_the_sdk_sees(upstream):
    path, truth = upstream
    cap = uf.read(path)
    docs = {f.id: f for f in cap.frames if f.role == uf.DOCUMENT}
    chunks = [f for f in cap.frames if f.role == uf.CHUNK]
    assert len(docs) == 17 and len(chunks) >= 2 and {c.parent_id for c in chunks} == {4}
    # The timeline: live documents, their ids, uris and times.
    live = sorted((f for f in docs.values() if f.status == uf.ACTIVE), key=lambda f: (f.timestamp, f.id))
    assert [(f.id, f.uri, f.timestamp) for f in live] == [
        (e["frame_id"], e["uri"], e["timestamp"]) for e in truth["timeline"]]
    assert docs[int(truth["removed"])].status == uf.DELETED
    # Each uri's frame: every field the SDK returns.
    for uri, seen in truth["frames"].items():
        ours = docs[seen["id"]]
        assert ours.uri == uri
        assert {k: getattr(ours, k) for k in ("title", "timestamp", "kind", "track", "tags", "labels")} == {
            k: seen[k] for k in ("title", "timestamp", "kind", "track", "tags", "labels")}
        assert ours.extra_metadata == seen["extra_metadata"]
    # The text: exactly what was put (chunks joined, upstream's appended lines cut off).
    by_title = {f.title: f for f in docs.values()}
    for title, text in texts_put(truth).items():
        assert uf.text(cap, by_title[title], [c for c in chunks if c.parent_id == by_title[title].id]) == text
    plans = [f for f in docs.values() if f.uri == "mv2://notes/plan"]
    assert [uf.text(cap, f) for f in plans] == [n["text"] for n in truth["notes"][:2]]
    for e in truth["timeline"]:  # upstream's preview starts with the text we read
        text = uf.text(cap, docs[e["frame_id"]], [c for c in chunks if c.parent_id == e["frame_id"]])
        assert e["preview"][: min(len(text), 120)] == text[:120]


@pytest.mark.timeout(180)
def test_import_into_a_new_capsule_without_the_sdk(upstream, tmp_path):
    path, truth = upstream
    src = tmp_path / "notes.mv2"
    shutil.copy(path, src)
    blocker = tmp_path / "blocked"  # the command must not need memvid-sdk at run time
    blocker.mkdir()
    (blocker / "memvid_sdk.py").write_text("raise ImportError('memvid_sdk must not be needed by memvidd import')\n")
    done = memvidd("import", str(src), "--json", env={"MEMVIDD_SOCKET": str(tmp_path / "none.sock")},
                   no_sdk=blocker)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["into"] == str(tmp_path / "notes.memvidd.mv2") and report["via"] == "file"
    assert (report["documents"], report["deleted"], report["versions_by_uri"]) == (17, 1, 1)
    assert report["chunks_joined"] >= 2
    with engine.open(report["into"], readonly=True) as cap:
        live_uris = {e["uri"] for e in truth["timeline"]}
        assert cap.stats()["live_frames"] == len(live_uris)  # one live version per uri
        for query, titles in truth["finds"].items():
            expect = ["Lighthouse log"] if query == "lighthouse" else titles  # upstream also lists its chunks
            assert sorted(h.title for h in cap.find(query, mode="lex")) == sorted(expect), query
        lighthouse = cap.get(uri="mv2://logs/lighthouse")
        assert lighthouse.text == texts_put(truth)["Lighthouse log"]
        plan_now = cap.get(uri="mv2://notes/plan")
        assert plan_now.text == truth["notes"][1]["text"]
        older = cap.get(plan_now.supersedes)
        assert older.text == truth["notes"][0]["text"] and older.valid_until is not None
        deleted = [f for f in cap.changes(0) if f.title == "Obsolete"]
        assert len(deleted) == 1 and deleted[0].valid_until is not None  # history keeps it
        upstream_plan = truth["frames"]["mv2://notes/plan"]
        assert from_tags(plan_now.tags) == {
            "tags": upstream_plan["tags"], "labels": upstream_plan["labels"], "track": None,
            "metadata": {"owner": "Ana", "priority": "1",  # JSON strings decoded, other JSON kept
                         "extractous_metadata": upstream_plan["extra_metadata"]["extractous_metadata"]}}
        dated = cap.get(uri=next(e["uri"] for e in truth["timeline"] if e["timestamp"] == 1700000000))
        assert (dated.timestamp, dated.kind, dated.tags["track"]) == (1700000000, "journal", "ship")
        assert [h.title for h in cap.find("Müller", mode="lex")] == ["Müller's Grüße"]


@pytest.mark.timeout(180)
def test_import_into_the_capsule_a_daemon_serves(upstream, tmp_path):
    path, truth = upstream
    d = DaemonProc(tmp_path).start()
    try:
        served = str(tmp_path / "default.mv2")
        with Client(d.socket) as c:
            c.put("a memory from before the import", uri="mine://before")
        done = memvidd("import", str(path), "--into", served, "--socket", d.socket, "--json")
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        assert report["via"] == d.socket and report["documents"] == 17
        with Client(d.socket) as c:
            assert [h.title for h in c.find("astrolabe")] == ["Dated"]
            assert [h.uri for h in c.find("before")] == ["mine://before"]  # nothing of ours lost
            assert c.stats().live_frames == len({e["uri"] for e in truth["timeline"]}) + 1
    finally:
        d.close()


def test_plan_folds_versions_and_removes_what_upstream_ended():
    """Superseded frames (memvid-cli's update; the SDK cannot write them) and deletions."""
    def frame(i: int, uri: str, status: int = uf.ACTIVE, **kw) -> uf.UpstreamFrame:
        fields = dict(id=i, timestamp=1000 + i, kind=None, track=None, uri=uri, title=f"t{i}", payload_offset=0,
                      payload_length=0, encoding=uf.PLAIN, search_text=f"text {i}\ntitle: t{i}", tags=[], labels=[],
                      extra_metadata={}, role=uf.DOCUMENT, parent_id=None, chunk_index=None, status=status,
                      supersedes=None, superseded_by=None)
        return uf.UpstreamFrame(**{**fields, **kw})

    frames = [frame(0, "u://a", uf.SUPERSEDED, superseded_by=1), frame(1, "u://a", supersedes=0),
              frame(2, "u://b", uf.SUPERSEDED, superseded_by=3), frame(3, "u://c", supersedes=2),
              frame(4, "u://d", uf.DELETED)]
    cap = uf.UpstreamCapsule(path="x", toc_version=0, generation=1, frames=frames, data=b"")
    planned = plan(cap)
    assert [i["text"] for i in planned.items] == [f"text {i}" for i in range(5)]
    assert planned.remove == [2, 4]  # u://a's first version is superseded by the put of u://a itself
    assert (planned.counts["superseded"], planned.counts["deleted"]) == (2, 1)


def test_bad_input_is_refused_and_loses_nothing(upstream, tmp_path):
    path, _ = upstream
    env = {"MEMVIDD_SOCKET": str(tmp_path / "none.sock")}
    text = tmp_path / "notes.txt"
    text.write_text("just text")
    cut = tmp_path / "cut.mv2"
    cut.write_bytes(path.read_bytes()[:-10])
    locked = tmp_path / "locked.mv2e"
    locked.write_bytes(b"MV2E" + bytes(8000))
    pending = tmp_path / "pending.mv2"  # a writer killed between a put and its commit
    data = bytearray(path.read_bytes())
    wal_offset, _, checkpoint_pos, wal_sequence = struct.unpack_from("<4Q", data, 16)
    struct.pack_into("<QI", data, wal_offset + checkpoint_pos, wal_sequence + 1, 16)
    pending.write_bytes(bytes(data))
    ours = tmp_path / "ours.mv2"
    engine.create(ours, model=None).close()
    for bad, message in [(text, "not a capsule written by upstream"), (cut, "no commit footer"),
                         (locked, "encrypted upstream capsule"), (pending, "never committed"),
                         (ours, "memvidd capsule already"), (tmp_path / "missing.mv2", "No such file")]:
        done = memvidd("import", str(bad), env=env)
        assert done.returncode == 1 and message in done.stderr, (bad, done.stderr)
        assert not (tmp_path / (bad.name.rsplit(".", 1)[0] + ".memvidd.mv2")).exists()
    # The default target exists: refused, and it is left as it was.
    src = tmp_path / "notes.mv2"
    shutil.copy(path, src)
    with engine.create(tmp_path / "notes.memvidd.mv2", model=None) as cap:
        cap.put("mine", uri="mine://keep")
        cap.commit()
    done = memvidd("import", str(src), env=env)
    assert done.returncode == 1 and "--into" in done.stderr
    with engine.open(tmp_path / "notes.memvidd.mv2", readonly=True) as cap:
        assert cap.stats()["frames"] == 1


def test_batches_stay_within_a_request():
    items = [{"text": "x" * (BATCH_BYTES // 3)} for _ in range(7)] + [{"data": b"y" * (BATCH_BYTES + 1)}]
    assert [len(b) for b in batches(items)] == [3, 3, 1, 1]
    assert [len(b) for b in batches([{"text": "z"}] * 2500)] == [1000, 1000, 500]
