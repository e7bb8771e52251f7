"""memvidd.sdk, the memvid-shaped API: a script written for upstream's SDK runs with only
its import line changed, on a file and through a daemon, and prints what it printed with
the real ``memvid-sdk``; the choice of daemon or file; what is refused, and how."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from daemon_util import DaemonProc

import memvidd.sdk as memvid
from memvidd.client import Client

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
SCRIPT = (HERE / "upstream_script.py").read_text()
UPSTREAM_IMPORT = "import memvid_sdk\n"
OUR_IMPORT = "import memvidd.sdk as memvid_sdk\n"  # the one line a user changes


def run_script(tmp_path: Path, text: str, capsule: str, env: dict[str, str] | None = None) -> dict:
    script = tmp_path / f"script_{len(list(tmp_path.glob('script_*')))}.py"
    script.write_text(text)
    # memvid-sdk sends telemetry unless told not to, and ignores SIGTERM: run() kills with SIGKILL.
    env = {**os.environ, "MEMVID_TELEMETRY": "0", "PYTHONPATH": str(ROOT), **(env or {})}
    done = subprocess.run([sys.executable, str(script), capsule], capture_output=True, text=True, timeout=60,
                          env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def upstream_output(tmp_path_factory) -> dict:
    """What the script prints with the real memvid-sdk: proof that it is an upstream script."""
    if importlib.util.find_spec("memvid_sdk") is None:  # found, not imported: it runs in children only
        pytest.skip("memvid-sdk (the test extra) is not installed")
    tmp = tmp_path_factory.mktemp("upstream")
    return run_script(tmp, SCRIPT, str(tmp / "notes.mv2"))


def test_the_script_is_written_for_upstream():
    assert SCRIPT.count(UPSTREAM_IMPORT) == 1 and "memvidd" not in SCRIPT.split('"""')[2]


@pytest.mark.timeout(120)
def test_upstream_script_runs_on_a_file_with_only_its_import_changed(tmp_path, upstream_output):
    ours = run_script(tmp_path, SCRIPT.replace(UPSTREAM_IMPORT, OUR_IMPORT), str(tmp_path / "notes.mv2"),
                      env={"MEMVIDD_SOCKET": str(tmp_path / "no-daemon.sock")})
    assert ours == upstream_output
    assert ours["crème"] == [{"title": "Café notes", "has_snippet": True}]  # non-ASCII text and query


@pytest.mark.timeout(180)
def test_upstream_script_runs_through_the_daemon_serving_the_capsule(tmp_path, upstream_output):
    d = DaemonProc(tmp_path).start()
    try:
        capsule = str(tmp_path / "default.mv2")  # the daemon holds its writer lock
        ours = run_script(tmp_path, SCRIPT.replace(UPSTREAM_IMPORT, OUR_IMPORT), capsule,
                          env={"MEMVIDD_SOCKET": d.socket})
        assert ours == upstream_output
        with Client(d.socket) as c:  # the frames went into the capsule the daemon serves
            assert c.stats().live_frames == upstream_output["active_frames"]
            assert [h.title for h in c.find("Kubernetes")] == ["Doc 1"]
    finally:
        d.close()


@pytest.mark.timeout(120)
def test_use_goes_through_the_daemon_for_its_capsule_and_opens_other_files(tmp_path):
    d = DaemonProc(tmp_path).start()
    try:
        served_path = str(tmp_path / "default.mv2")
        with memvid.use("basic", served_path, socket=d.socket) as mem:
            assert mem.served_by == d.socket
            fid = mem.put(title="Via daemon", label="x", text="served put", tags=["t"])
            assert mem.frame(f"mv2://frames/{fid}")["title"] == "Via daemon"
        other = str(tmp_path / "other.mv2")
        with memvid.use("basic", other, mode="auto", socket=d.socket) as mem:
            assert mem.served_by is None  # not a capsule the daemon serves: the file itself
            mem.put(title="Direct", label="x", text="direct put")
        # Without asking that daemon, the file is locked: a clear error, nothing lost.
        with pytest.raises(memvid.LockedError, match="does not serve it"):
            memvid.use("basic", served_path, socket=str(tmp_path / "nobody.sock"))
        with Client(d.socket) as c:
            assert [h.title for h in c.find("served")] == ["Via daemon"]
    finally:
        d.close()
    with memvid.use("basic", other, read_only=True, socket=str(tmp_path / "nobody.sock")) as mem:
        assert [h["title"] for h in mem.find("direct")["hits"]] == ["Direct"]
        with pytest.raises(memvid.MemvidError):
            mem.put(title="x", label="y", text="read only")


def test_fields_round_trip_and_versions_by_uri(tmp_path):
    path = str(tmp_path / "c.mv2")
    with memvid.create(path, socket=str(tmp_path / "none.sock")) as mem:
        first = mem.put(title="T", label="main", labels=["extra"], text="version one alpha", uri="mv2://n/1",
                        tags=["a", "b"], metadata={"n": 3, "s": "x"}, kind="note", track="tr", timestamp=1700000000)
        second = mem.put({"title": "T2", "label": "main", "text": "version two alpha", "uri": "mv2://n/1"})
        frame = mem.frame("mv2://n/1")
        assert frame["id"] == int(second) and frame["title"] == "T2"  # the same uri: a new version
        hit = mem.find("alpha", as_of_ts=1e12)["hits"][0]
        assert hit["frame_id"] == int(second)
        old = mem.find("one", mode="lex")["hits"]
        assert old == []  # superseded versions leave search, as upstream's frame(uri) would
        mem.remove(second)
        assert mem.timeline() == []
        with pytest.raises(memvid.FrameNotFoundError):
            mem.frame("mv2://n/1")
    assert memvid.from_tags(memvid.to_tags(["a", "b"], ["main", "extra"], {"n": 3, "s": "x"}, "tr")) == {
        "tags": ["a", "b"], "labels": ["main", "extra"], "track": "tr", "metadata": {"n": "3", "s": "x"}}
    assert first == "0"
    with pytest.raises(ValueError, match="reserved"):
        memvid.to_tags(metadata={"label": "x"})


def test_create_never_replaces_a_capsule_with_frames(tmp_path):
    path = str(tmp_path / "c.mv2")
    sock = str(tmp_path / "none.sock")
    with memvid.create(path, socket=sock) as mem:
        mem.put(title="Keep", label="x", text="precious")
    with pytest.raises(memvid.CapsuleExistsError, match="never replaces"):
        memvid.create(path, socket=sock)
    with pytest.raises(memvid.FileNotFoundError):
        memvid.use("basic", str(tmp_path / "missing.mv2"), socket=sock)
    with memvid.use("basic", path, socket=sock) as mem:
        assert [h["title"] for h in mem.find("precious")["hits"]] == ["Keep"]
        mem.seal()  # as upstream's: the file is released, the handle stays usable
        with memvid.use("basic", path, socket=sock) as other:
            other.put(title="Other", label="x", text="another handle wrote this")
        mem.put(title="Later", label="x", text="written after seal")
        assert sorted(h["title"] for h in mem.find("handle OR seal")["hits"]) == ["Later", "Other"]
    assert mem.closed


def test_what_is_not_honoured_says_what_to_use(tmp_path):
    with memvid.create(str(tmp_path / "c.mv2"), socket=str(tmp_path / "none.sock")) as mem:
        mem.put(title="Doc", label="x", text="the answer is in the context")
        refused = [
            (lambda: mem.ask("what is it?"), "context_only=True"),
            (lambda: mem.find("x", query_embedding=[0.1]), "mode='sem'"),
            (lambda: mem.find("x", as_of_frame=1), "as_of_ts"),
            (lambda: mem.timeline(as_of_frame=1), "as_of_ts"),
            (lambda: mem.put(title="t", label="l", text="x", search_text="y"), "text="),
            (lambda: mem.put_pdf_tables("a.pdf"), "put\\(text="),
            (lambda: mem.session_start("s"), "as_of_ts"),
        ]
        for call, alternative in refused:
            with pytest.raises(NotImplementedError, match=alternative):
                call()
        context = mem.ask("answer context", context_only=True)
        assert context["answer"] is None and "the answer is in the context" in context["context"]
        with pytest.raises(TypeError, match="unexpected keyword"):
            mem.find("x", nonsense=1)
    with pytest.raises(NotImplementedError, match="use\\('basic'"):
        memvid.use("langchain", str(tmp_path / "c.mv2"))
