"""Index working copies in RAM-backed storage are reclaimed (issue 11, item 15).

``/dev/shm/memvidd-$UID/index`` once held 89 copies (65 MB of RAM) left by stopped
daemons, tests and benchmarks. A copy is held by a shared ``flock`` while a process
uses it; what nobody holds is removed when indexes are opened or closed: copies of
capsules gone from their path, and the least recently used past ``KEEP_BYTES``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from daemon_util import ROOT

import engine
from engine import ramcopies
from engine.ramcopies import ram_root


def shared() -> Path:
    return ram_root() / ramcopies.SHARED


def copies(kind: str = ramcopies.SHARED) -> set[str]:
    d = ram_root() / kind
    return {p.name for p in d.iterdir()} if d.is_dir() else set()


def make(path: Path, **kw) -> str:
    """A capsule searched once (so it has a working copy), closed; returns its copy's name."""
    with engine.create(path, model=None, **kw) as cap:
        cap.put(f"words of {path.name}", uri=f"n://{path.name}")
        cap.commit()
        cap.find("words", mode="lex")
        return cap.capsule_id.hex()


def copy_of(capsule_hex: str, kind: str = ramcopies.SHARED) -> list[str]:
    return [n for n in copies(kind) if n.startswith(capsule_hex)]


# A process that opens a capsule, searches it, says so, then waits to be told to go.
HOLDER = textwrap.dedent("""
    import sys
    import engine
    cap = engine.open(sys.argv[1], readonly=sys.argv[2] == "ro", passphrase=sys.argv[3] or None)
    cap.find("words", mode="lex")
    print("ready", flush=True)
    sys.stdin.readline()
""")


def hold(path: Path, *, readonly: bool = False, passphrase: str = "") -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), "ro" if readonly else "rw", passphrase],
                            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    return proc


def kill(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)  # a crash: nothing cleaned up, the kernel drops the locks
    proc.wait(timeout=30)
    proc.stdin.close()  # type: ignore[union-attr]
    proc.stdout.close()  # type: ignore[union-attr]


def test_leftovers_of_older_versions_are_reclaimed_at_start(tmp_path):
    for i in range(5):  # what older versions left: a lex directory, no lock, no owner
        (shared() / f"{i:032x}-0123456789" / "lex").mkdir(parents=True)
        (shared() / f"{i:032x}-0123456789" / "lex" / "meta.json").write_text("{}")
    (shared() / ".trash-interrupted" / "lex").mkdir(parents=True)  # a removal a crash cut short
    mine = make(tmp_path / "a.mv2")
    assert copies() == set(copy_of(mine))


@pytest.mark.timeout(60)
def test_a_copy_in_use_by_another_process_is_never_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(ramcopies, "KEEP_BYTES", 0)  # keep nothing that is not in use
    capsule = make(tmp_path / "held.mv2")
    assert not copy_of(capsule)  # unused and over the cap: reclaimed on close
    holder = hold(tmp_path / "held.mv2")
    try:
        held = copy_of(capsule)
        assert held
        (tmp_path / "held.mv2").rename(tmp_path / "moved.mv2")  # even its capsule gone: still held
        make(tmp_path / "other.mv2")  # opens and closes indexes: two reclaims
        assert set(held) <= copies()
    finally:
        kill(holder)
    make(tmp_path / "third.mv2")
    assert not set(held) & copies(), "the dead holder's copy is reclaimed"


def test_the_copy_of_a_moved_or_deleted_capsule_is_reclaimed(tmp_path):
    a, b = make(tmp_path / "a.mv2"), make(tmp_path / "b.mv2")
    assert copy_of(a) and copy_of(b)  # unused, but kept for a fast reopen
    (tmp_path / "a.mv2").rename(tmp_path / "a2.mv2")
    (tmp_path / "b.mv2").unlink()
    c = make(tmp_path / "c.mv2")
    assert not copy_of(b) and copy_of(a) == [] and copy_of(c)
    with engine.open(tmp_path / "a2.mv2") as cap:  # the moved capsule gets a new copy
        assert [h.uri for h in cap.find("words", mode="lex")] == ["n://a.mv2"]
        assert cap.stats()["search"]["attach"]["origin"]["lex"] == "rebuilt"


def test_unused_copies_are_capped_least_recently_used_first(tmp_path, monkeypatch):
    ids = [make(tmp_path / f"{i}.mv2") for i in range(4)]
    one = ramcopies.size(shared() / copy_of(ids[0])[0])
    monkeypatch.setattr(ramcopies, "KEEP_BYTES", int(2.5 * one))  # room for two of them
    with engine.open(tmp_path / "0.mv2") as cap:  # used most recently of all
        cap.find("words", mode="lex")
    kept = {i for i, x in enumerate(ids) if copy_of(x)}
    assert kept == {0, 3}, kept


@pytest.mark.timeout(60)
def test_private_and_sealed_copies_of_a_crashed_process_are_reclaimed(tmp_path):
    make(tmp_path / "plain.mv2")
    writer = engine.open(tmp_path / "plain.mv2")
    try:
        writer.put("new words", uri="n://new")
        writer.commit()  # a reader opening now lags the shared copy: it builds a private one
        reader = hold(tmp_path / "plain.mv2", readonly=True)
        make(tmp_path / "s.mv2e", passphrase="pw")
        sealed = hold(tmp_path / "s.mv2e", passphrase="pw")
        assert copies(ramcopies.PRIVATE) and copies(ramcopies.SEALED)
        kill(reader)
        kill(sealed)
        assert copies(ramcopies.PRIVATE) and copies(ramcopies.SEALED)  # left by the crash
        writer.find("words", mode="lex")  # opening its indexes reclaims
        assert not copies(ramcopies.PRIVATE) and not copies(ramcopies.SEALED)
    finally:
        writer.close()


def test_stats_say_how_much_ram_the_copies_take(tmp_path):
    make(tmp_path / "a.mv2")
    with engine.open(tmp_path / "a.mv2") as cap:
        cap.find("words", mode="lex")
        ram = cap.stats()["search"]["ram_copies"]
    assert ram["dir"] == str(ram_root()) and ram["copies"] == 1
    assert ram["bytes"] == ramcopies.size(shared() / copies().pop()) > 0
    assert ram["keep_unused_bytes"] == ramcopies.KEEP_BYTES


@pytest.mark.timeout(30)
def test_a_claim_racing_a_reclaim_ends_with_a_live_copy(tmp_path):
    d = tmp_path / "copies" / "x"
    ramcopies.Claim(d, owner=str(tmp_path / "gone.mv2")).release()
    fd = ramcopies._take(d)  # a reclaim has locked the copy ...
    assert fd is not None and fd >= 0
    claimed: list[ramcopies.Claim] = []
    t = threading.Thread(target=lambda: claimed.append(ramcopies.Claim(d)))
    t.start()  # ... a claim waits for it (or comes after) ...
    ramcopies._remove(d)  # ... the reclaim removes it and lets go
    os.close(fd)
    t.join(timeout=20)
    claim = claimed[0]
    try:
        assert (d / ramcopies.LOCK).stat().st_ino == os.fstat(claim._fd).st_ino  # type: ignore[arg-type]
        ramcopies.reclaim(d.parent)
        assert d.is_dir(), "a held copy survives a reclaim"
    finally:
        claim.release()
    ramcopies.reclaim(d.parent)
    assert not d.exists()
