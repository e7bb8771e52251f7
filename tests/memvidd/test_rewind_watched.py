"""Rewind and branch on a capsule that watches a directory: a real daemon watching a real
temp directory. After a rewind the files on disk win again, without a restart; a branch
as of a point before the first commit is an error, not an empty file."""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

import pytest
from daemon_util import ROOT, DaemonProc, watching_config
from test_watcher import mkroot, write

import engine
from memvidd.client import Client
from memvidd.ingest import file_uri

pytestmark = pytest.mark.timeout(120)


def found(c: Client, word: str) -> set[str]:
    """The files whose chunks hold ``word``."""
    return {(h.uri or "").split("#")[0] for h in c.find(word, mode="lex", k=50) if h.kind == "chunk"}


def settle(c: Client, cond: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {c.stats()['indexer']}"
        time.sleep(0.02)


@pytest.fixture
def watched(tmp_path):
    tree = mkroot(tmp_path, "tree")
    run = tmp_path / "run"
    run.mkdir()
    d = DaemonProc(run)
    d.config.write_text(watching_config(run, tree))
    yield d, tree
    d.close()


def test_after_a_rewind_the_files_on_disk_win_without_a_restart(watched):
    d, tree = watched
    a = write(tree / "a.md", "# A\n\nalpha wombat\n")
    b = write(tree / "b.md", "# B\n\nbeta original\n")
    d.start()
    with Client(d.socket) as c:
        settle(c, lambda: found(c, "wombat") == {file_uri(a)} and found(c, "original") == {file_uri(b)},
               "the first scan")
        before = c.capsules()[0].commit_seq

        # What changes on disk after that commit: a deleted, c added, b edited.
        a.unlink()
        cfile = write(tree / "c.md", "# C\n\ngamma quokka\n")
        b.write_text("# B\n\nbeta edited numbat\n")
        settle(c, lambda: not found(c, "wombat") and found(c, "quokka") == {file_uri(cfile)}
               and found(c, "numbat") == {file_uri(b)} and not found(c, "original"), "the changes indexed")

        c.rewind(before)  # the capsule is as it was: a back, c gone, b original
        # ... and the indexer reconciles with the disk at once: the disk wins.
        settle(c, lambda: found(c, "quokka") == {file_uri(cfile)} and found(c, "numbat") == {file_uri(b)}
               and not found(c, "wombat") and not found(c, "original"), "the disk to win after the rewind")
        # The rewound state itself stays reachable.
        assert found_as_of(c, "wombat", before) == {file_uri(a)}

        # And it keeps watching: a change after the rewind is indexed as usual.
        write(tree / "d.md", "# D\n\ndelta okapi\n")
        settle(c, lambda: found(c, "okapi") == {file_uri(tree / "d.md")}, "a file added after the rewind")
        stats = c.stats()["indexer"]
        assert stats["documents"] == 3 and stats["errors"] == 0, stats
    assert d.stop() == 0


def found_as_of(c: Client, word: str, seq: int) -> set[str]:
    return {(h.uri or "").split("#")[0] for h in c.find(word, mode="lex", k=50, as_of=seq) if h.kind == "chunk"}


def memvidd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "memvidd", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


def test_a_branch_before_the_first_commit_is_an_error_not_an_empty_file(tmp_path):
    src = tmp_path / "src.mv2"
    with engine.create(src, model=None) as cap:
        cap.put("the first note", uri="n://1")
        first = cap.commit()
    for as_of in ("0", "2000-01-01T00:00", "@1"):
        out = tmp_path / "b.mv2"
        r = memvidd("branch", str(out), "--capsule", str(src), "--as-of", as_of)
        assert r.returncode == 1, (as_of, r)
        assert "before the first" in r.stderr and "first commit is 1" in r.stderr, r.stderr
        assert not out.exists(), "no file is left behind"
    r = memvidd("branch", str(tmp_path / "b.mv2"), "--capsule", str(src), "--as-of", str(first))
    assert r.returncode == 0, r.stderr
    with engine.open(tmp_path / "b.mv2", readonly=True) as b:
        assert b.get(uri="n://1").text == "the first note"


def test_the_engine_refuses_a_branch_of_nothing_but_copies_an_empty_capsule(tmp_path):
    with engine.create(tmp_path / "empty.mv2", model=None) as cap:
        with pytest.raises(engine.InvalidArgument, match="no commits yet"):
            cap.branch(tmp_path / "b0.mv2", as_of=0)
        cap.branch(tmp_path / "copy.mv2")  # the head of an empty capsule: `memvidd encrypt` does this
        cap.put("x")
        cap.commit()
        with pytest.raises(engine.InvalidArgument, match="numbered from 1"):
            cap.branch(tmp_path / "b1.mv2", as_of=0)
    assert not (tmp_path / "b0.mv2").exists() and not (tmp_path / "b1.mv2").exists()
    with engine.open(tmp_path / "copy.mv2", readonly=True) as copy:
        assert copy.seq == 0
