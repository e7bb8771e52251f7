"""Crash recovery: kill -9 a real writer process at random moments, many times.

A child process commits forever, each commit's content derived from its seq alone, and
prints each seq once ``commit`` has returned it (an acknowledged commit). The parent kills
it with SIGKILL after a random delay, so kills land in puts, in the fsync of a commit, and
inside checkpoints (the child's thresholds are small). After every kill the capsule must
hold every acknowledged commit (and at most the one commit in flight), byte-exact, with
dense frame ids and correct live versions, and ``verify`` must pass. Usually the parent's
writer open recovers the file; every fourth kill the next child recovers it and writes on.
A failure names ``CRASH_SEED``; set it in the environment to replay the same kill delays.
"""

from __future__ import annotations

import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import engine

ROOT = Path(__file__).resolve().parents[2]  # the repository
ITERATIONS = 25
MAX_DELAY = 0.3  # seconds between the child's first acknowledgement and the kill
WAIT = 30  # timeout of every wait on the child

# Shared by the child (written out as its script) and the parent (exec'd below): the
# content of commit ``s`` depends on ``s`` only.
ITEMS_SRC = '''
import random

N_URIS = 41


def commit_items(s):
    """The (uri, payload) items of commit ``s``, always the same for the same ``s``."""
    rng = random.Random(s)
    items = []
    for i in range(rng.randint(1, 30)):
        uri = None if rng.random() < 0.25 else f"u{rng.randrange(N_URIS)}"
        n = rng.randint(0, 4000)  # small: each run writes ~75 commits per kill window
        mode = rng.randrange(3)
        if mode == 0:  # incompressible: stored raw
            payload = rng.randbytes(n)
        elif mode == 1:  # compressible
            payload = (b"commit %d item %d " % (s, i) * (n // 10 + 1))[:n]
        else:  # mixed
            k = rng.randint(0, n)
            payload = rng.randbytes(k) + bytes([rng.randrange(256)]) * (n - k)
        items.append((uri, payload))
    return items
'''

CHILD_SRC = ITEMS_SRC + '''

import os
import sys

import engine

OPTIONS = dict(checkpoint_frames=40, checkpoint_bytes=200_000)


def main(path):
    try:
        cap = engine.open(path, **OPTIONS)
    except engine.NotFound:
        cap = engine.create(path, **OPTIONS)
    s = cap.seq
    while True:
        s += 1
        for uri, payload in commit_items(s):
            cap.put(payload, uri=uri)
        got = cap.commit()
        assert got == s, (got, s)
        sys.stdout.write(f"{s}\\n")
        sys.stdout.flush()


main(sys.argv[1])
'''

_ns: dict = {}
exec(ITEMS_SRC, _ns)
commit_items = _ns["commit_items"]
URIS = [f"u{i}" for i in range(_ns["N_URIS"])]


def _pump(stream, q: queue.Queue) -> None:
    for line in stream:
        q.put(line)
    q.put(None)  # EOF: the child is gone


def run_and_kill(script: Path, path: str, delay: float, stderr_path: Path, why: str) -> list[int]:
    """Start the writer, let it acknowledge a commit, SIGKILL it after ``delay`` seconds;
    return every seq it acknowledged."""
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=pythonpath)
    with open(stderr_path, "wb") as err:
        child = subprocess.Popen(
            [sys.executable, str(script), path], stdout=subprocess.PIPE, stderr=err,
            stdin=subprocess.DEVNULL, env=env, text=True,
        )
    lines: queue.Queue = queue.Queue()
    pump = threading.Thread(target=_pump, args=(child.stdout, lines), daemon=True)
    pump.start()
    out: list[str] = []
    try:
        try:
            first = lines.get(timeout=WAIT)
        except queue.Empty:
            first = None
        if first is None:
            child.kill()
            raise AssertionError(f"the writer acknowledged nothing {why}: {stderr_path.read_text()[-3000:]}")
        out.append(first)
        time.sleep(delay)  # the random moment of the kill, not a wait for an event
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=WAIT) == -signal.SIGKILL, f"{why}: {stderr_path.read_text()[-3000:]}"
        pump.join(timeout=WAIT)
        assert not pump.is_alive(), why
        while (line := lines.get_nowait()) is not None:
            out.append(line)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=WAIT)
        pump.join(timeout=WAIT)
        child.stdout.close()
    return [int(x) for x in out]


class Expected:
    """What commits 1..seq must have left, derived from ``commit_items`` alone."""

    def __init__(self) -> None:
        self.seq = 0
        self.starts = [0, 0]  # starts[s]: the first frame id of commit s; starts[seq + 1]: next id
        self.frames: list[tuple[str | None, int | None]] = []  # id -> (uri, supersedes)
        self.ended: dict[int, tuple[int, int]] = {}  # id -> (seq, id) that superseded it
        self.live: dict[str, int] = {}
        self.anon = 0

    def advance(self, upto: int) -> None:
        for s in range(self.seq + 1, upto + 1):
            for uri, _ in commit_items(s):
                fid = len(self.frames)
                old = self.live.get(uri) if uri is not None else None
                self.frames.append((uri, old))
                if uri is None:
                    self.anon += 1
                else:
                    if old is not None:
                        self.ended[old] = (s, fid)
                    self.live[uri] = fid
            self.starts.append(len(self.frames))
        self.seq = max(self.seq, upto)

    def check_commit(self, cap: engine.Capsule, s: int, why: str) -> None:
        """Every frame of commit ``s``: payload byte-exact, metadata as the model says."""
        for i, (uri, payload) in enumerate(commit_items(s)):
            fid = self.starts[s] + i
            f = cap.get(fid)
            until, by = self.ended.get(fid, (None, None))
            want = (uri, s, self.frames[fid][1], until, by, False, len(payload))
            got = (f.uri, f.commit_seq, f.supersedes, f.valid_until, f.superseded_by, f.is_text, f.length)
            assert got == want, f"frame {fid} of commit {s} {why}"
            assert f.payload == payload, f"payload of frame {fid} (commit {s}) {why}"

    def check_state(self, cap: engine.Capsule, why: str) -> None:
        """Dense ids, the live version of every URI, and the totals."""
        assert cap.seq == self.seq, why
        n = len(self.frames)
        with pytest.raises(engine.NotFound):
            cap.get(n)  # nothing past the last commit
        for uri in URIS:
            if uri in self.live:
                assert cap.get(uri=uri).id == self.live[uri], f"{uri} {why}"
            else:
                with pytest.raises(engine.NotFound):
                    cap.get(uri=uri)
        stats = cap.stats()
        got = (stats["commit_seq"], stats["frames"], stats["live_frames"], stats["live_uris"])
        assert got == (self.seq, n, len(self.live) + self.anon, len(self.live)), why


def check(model: Expected, cap: engine.Capsule, before: int, rng: random.Random, why: str) -> None:
    """After a kill: the model's state, every commit since ``before`` (the seq the child
    started from, whose commit it found on opening) byte-exact, and a sample of older ones."""
    model.advance(cap.seq)
    model.check_state(cap, why)
    for s in range(max(1, before), cap.seq + 1):
        model.check_commit(cap, s, why)
    for s in rng.sample(range(1, max(1, before)), min(20, max(0, before - 1))):
        model.check_commit(cap, s, why)


@pytest.mark.crash
@pytest.mark.timeout(120)
@pytest.mark.req("F-05")
@pytest.mark.req("F-06")
def test_kill_9_writer_loses_no_acknowledged_commit(tmp_path):
    seed = int(os.environ.get("CRASH_SEED", random.randrange(2**32)))
    rng = random.Random(seed)
    script = tmp_path / "writer.py"
    script.write_text(CHILD_SRC)
    path = str(tmp_path / "crash.mv2")
    model = Expected()
    durable = 0  # the capsule's seq after the last kill: where the next child resumes
    for i in range(ITERATIONS):
        delay = rng.uniform(0, MAX_DELAY)
        # Mostly the parent recovers the file (a writer open cuts the torn tail) before the
        # next child; every fourth time the next child recovers it itself and writes on.
        child_recovers = i % 4 == 3
        why = f"(iteration {i}, delay {delay:.3f}s, CRASH_SEED={seed})"
        got = run_and_kill(script, path, delay, tmp_path / f"stderr{i}.txt", why)
        assert got == list(range(durable + 1, durable + 1 + len(got))), (got, why)
        acked = got[-1]

        # A reader sees the crashed file as it is, torn tail and all, and changes nothing.
        # At most the one commit in flight at the kill may have landed unacknowledged.
        size = os.path.getsize(path)
        with engine.open(path, readonly=True) as r:
            assert r.seq in (acked, acked + 1), (r.seq, acked, why)
            seen = r.seq
            if child_recovers:
                check(model, r, durable, rng, why)
                checkpoints = r.stats()["checkpoints"]
        assert os.path.getsize(path) == size, why

        if not child_recovers:
            with engine.open(path) as cap:
                assert cap.seq == seen, why
                check(model, cap, durable, rng, why)
                checkpoints = cap.stats()["checkpoints"]
        durable = seen
        report = engine.verify(path)  # every checksum and payload digest, log vs checkpoint
        assert report.ok, (report.errors, why)
        torn = [w for w in report.warnings if w.startswith("torn tail")]
        assert report.warnings == torn and (child_recovers or not torn), (report.warnings, why)

    assert checkpoints > 0, seed
    with engine.open(path) as cap:
        for s in range(1, cap.seq + 1):
            model.check_commit(cap, s, f"(final check, CRASH_SEED={seed})")
