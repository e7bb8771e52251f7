"""Codec upgrades [F-16]: grouped, re-encoded blocks that never lose or change a byte.

Every test compares what the capsule returns after an upgrade with what it returned
before, byte for byte and as of every commit; crash tests cut the power at every fsync
of an upgrade, and kill -9 a real process in the middle of one.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

import engine
from engine import codecs
from workload import kill_after, power_cut_at, snapshot

ROOT = Path(__file__).resolve().parents[2]  # the repository
STDLIB = Path(os.__file__).parent


def code_chunks(n: int) -> list[str]:
    """~2 KB chunks of real Python source, in file order."""
    out: list[str] = []
    for path in sorted(STDLIB.glob("*.py")):
        text = path.read_text(errors="replace")
        out += [text[i : i + 2048] for i in range(0, len(text), 2048)]
        if len(out) >= n:
            return out[:n]
    return out


def events(n: int, seed: int = 1) -> list[str]:
    """Small log-line events (~200 bytes), the kind a dictionary helps most."""
    rng = random.Random(seed)
    users = [f"user{i:03d}" for i in range(40)]
    paths = ["/api/v1/items", "/api/v1/search", "/login", "/static/app.js", "/api/v1/users/me"]
    return [
        f'2026-11-{rng.randint(1, 28):02d}T{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:00Z INFO http '
        f'method=GET path={rng.choice(paths)} status={rng.choice([200, 200, 200, 304, 404, 500])} '
        f'user={rng.choice(users)} duration_ms={rng.randint(1, 900)} request_id={rng.getrandbits(64):016x}'
        for _ in range(n)
    ]


def fill(path: str, texts: list[str], per_commit: int = 16, **options) -> dict[int, bytes]:
    with engine.create(path, model=None, **options) as cap:
        for i in range(0, len(texts), per_commit):
            for j, t in enumerate(texts[i : i + per_commit], start=i):
                cap.put(t, uri=f"doc{j % 97}" if j % 3 else None, title=f"t{j}")
            cap.commit()
        return {m.id: cap.get(m.id).payload for m in cap.timeline(limit=1 << 30, as_of=None)} | {
            i: cap.get(i).payload for i in range(cap.stats()["frames"])
        }


def every_view(cap: engine.Capsule) -> list[dict[str, bytes]]:
    return [snapshot(cap, s) for s in range(cap.seq + 1)]


@pytest.mark.req("F-16")
def test_upgrade_keeps_every_byte_and_every_view(tmp_path):
    path = str(tmp_path / "c.mv2")
    payloads = fill(path, code_chunks(600))
    with engine.open(path) as cap:
        views = every_view(cap)
        before = cap.stats()
        done = cap.upgrade_codecs()
        after = cap.stats()
        assert done["moved"] == 600 and done["remaining"] == 0 and done["saved"] > 0
        assert {i: cap.get(i).payload for i in payloads} == payloads
        assert every_view(cap) == views
        # Grouping 32 frames per block beats one frame per block at the fast level.
        assert after["codecs"]["zstd"]["ratio"] < 0.8 * before["codecs"]["zstd"]["ratio"]
        assert after["codecs"]["zstd"]["blocks"] < before["codecs"]["zstd"]["blocks"] / 10
        assert after["upgrades"]["saved_bytes"] == done["saved"]
        assert len(cap.find("def", mode="lex")) > 0  # search reads payloads through the new blocks
    assert engine.verify(path).ok
    for checkpoint in (False, True):  # replayed from the log, then loaded from segments
        with engine.open(path) as cap:
            assert {i: cap.get(i).payload for i in payloads} == payloads
            assert every_view(cap) == views
            assert cap.stats()["codecs"] == after["codecs"]
            if not checkpoint:
                cap.checkpoint()
    assert engine.verify(path).ok


@pytest.mark.req("F-16")
def test_small_events_get_grouped_and_a_trained_dictionary(tmp_path):
    path = str(tmp_path / "e.mv2")
    payloads = fill(path, events(3000), per_commit=100)
    with engine.open(path) as cap:
        before = cap.stats()["codecs"]
        cap.upgrade_codecs()
        after = cap.stats()
        assert {i: cap.get(i).payload for i in payloads} == payloads
        stored_before = sum(c["stored_bytes"] for c in before.values())
        stored_after = sum(c["stored_bytes"] for c in after["codecs"].values())
        assert stored_after < 0.4 * stored_before, (stored_before, stored_after)  # grouping
        assert after["upgrades"]["dictionaries"] == 1
        # Fresh small puts now use the dictionary: alone, they shrink too.
        new = events(500, seed=2)
        for t in new:
            cap.put(t)
        cap.commit()
        grouped = after["codecs"].get("zstd+dict", {"blocks": 0, "raw_bytes": 0, "stored_bytes": 0})
        now = cap.stats()["codecs"]["zstd+dict"]
        assert now["blocks"] - grouped["blocks"] == 500
        ratio = (now["stored_bytes"] - grouped["stored_bytes"]) / (now["raw_bytes"] - grouped["raw_bytes"])
        assert ratio < 0.6 * before["zstd"]["ratio"], (ratio, before)
        payloads.update({3000 + i: t.encode() for i, t in enumerate(new)})
    with engine.open(path, readonly=True) as cap:  # a fresh reader loads the dictionary
        assert {i: cap.get(i).payload for i in payloads} == payloads
    assert engine.verify(path).ok


def test_incompressible_payloads_stay_where_they_are(tmp_path):
    path = str(tmp_path / "r.mv2")
    rng = random.Random(7)
    with engine.create(path, model=None) as cap:
        for _ in range(100):
            cap.put(rng.randbytes(3000))
        cap.commit()
        done = cap.upgrade_codecs()
        assert done["moved"] == 0 and done["remaining"] == 0
        assert cap.stats()["codecs"]["raw"]["blocks"] == 100
        again = cap.upgrade_codecs()  # the watermark remembers: nothing is tried twice
        assert again["frames"] == 0


def test_cold_commits_and_batches(tmp_path):
    path = str(tmp_path / "b.mv2")
    fill(path, code_chunks(400), per_commit=10)
    with engine.open(path) as cap:
        done = cap.upgrade_codecs(cold_commits=10, max_frames=150, batch_frames=64)
        assert done["frames"] == 150 and done["remaining"] == 400 - 100 - 150
        rest = cap.upgrade_codecs(cold_commits=10)
        assert rest["frames"] == 150 and rest["remaining"] == 0
        hot = cap.timeline(limit=1 << 30)
        assert cap.stats()["codecs"]["zstd"]["blocks"] >= 100  # the last 10 commits untouched
        assert len(hot) > 0


def test_staged_puts_come_first(tmp_path):
    path = str(tmp_path / "s.mv2")
    fill(path, code_chunks(100))
    with engine.open(path) as cap:
        cap.put("staged, not committed")
        done = cap.upgrade_codecs()
        assert done["busy"] and done["moved"] == 0
        cap.commit()
        assert cap.upgrade_codecs()["moved"] == 101  # the staged one is committed now


def test_upgrade_runs_while_another_thread_writes_and_reads(tmp_path):
    import threading

    path = str(tmp_path / "t.mv2")
    texts = code_chunks(800)
    payloads = fill(path, texts[:400])
    with engine.open(path) as cap:
        stop = threading.Event()
        errors: list[BaseException] = []

        def reader() -> None:
            rng = random.Random(3)
            try:
                while not stop.is_set():
                    i = rng.randrange(400)
                    assert cap.get(i).payload == payloads[i]
            except BaseException as e:  # surfaces in the main thread below
                errors.append(e)

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        moved = 0
        for i in range(400, 800, 8):
            for j in range(i, i + 8):
                cap.put(texts[j])
            cap.commit()
            moved += cap.upgrade_codecs(batch_frames=50, max_frames=50)["moved"]
        moved += cap.upgrade_codecs()["moved"]
        stop.set()
        t.join(timeout=30)
        assert not errors, errors
        assert moved == 800
        assert [cap.get(i).payload.decode() for i in range(400, 800)] == texts[400:]
    assert engine.verify(path).ok


@pytest.mark.req("F-16")
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_power_cut_at_every_fsync_of_an_upgrade(tmp_path, seed):
    base = str(tmp_path / "base.mv2")
    payloads = fill(base, events(700, seed), per_commit=7)
    with engine.open(base, readonly=True) as cap:
        views = every_view(cap)
    original = Path(base).read_bytes()
    path = str(tmp_path / "c.mv2")
    k = 1
    while True:
        Path(path).write_bytes(original)

        def work(cap):
            cap.upgrade_codecs(batch_frames=128)
            cap.checkpoint()

        image = power_cut_at(path, k, seed, work)
        if image is None:
            break
        Path(path).write_bytes(image)
        with engine.open(path) as cap:
            assert {i: cap.get(i).payload for i in payloads} == payloads, f"sync {k}"
            assert every_view(cap) == views, f"sync {k}"
            cap.upgrade_codecs()  # an interrupted upgrade can always be finished
            assert {i: cap.get(i).payload for i in payloads} == payloads
        assert engine.verify(path).ok, f"sync {k}"
        k += 1
    assert k > 6  # six batches and a checkpoint: the loop really cut at each fsync


CHILD = """
import sys
sys.path.insert(0, {root!r})
import engine
cap = engine.open({path!r})
print("ready", flush=True)
while True:
    done = cap.upgrade_codecs(batch_frames=40)
    print("batch", done["moved"], flush=True)
    if not done["remaining"]:
        break
cap.close()
print("done", flush=True)
"""


@pytest.mark.timeout(120)
def test_kill_9_during_upgrades(tmp_path):
    path = str(tmp_path / "k.mv2")
    payloads = fill(path, code_chunks(500) + events(500), per_commit=25)
    with engine.open(path, readonly=True) as cap:
        views = every_view(cap)
    rng = random.Random(int(os.environ.get("CRASH_SEED", "5")))
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(root=str(ROOT), path=path))
    finished = False
    for attempt in range(12):
        out = kill_after(str(script), rng.uniform(0, 0.4))
        finished = finished or "done" in out
        with engine.open(path) as cap:
            assert {i: cap.get(i).payload for i in payloads} == payloads, f"attempt {attempt}"
            assert every_view(cap) == views
        assert engine.verify(path).ok
        if finished:
            break
    with engine.open(path) as cap:
        cap.upgrade_codecs()
        assert cap.stats()["upgrades"]["frames"] == 1000


@pytest.mark.parametrize("later_commit", [False, True])
def test_damaged_dictionary(tmp_path, later_commit):
    """The last upgrade's damaged DICT is a torn upgrade: the old blocks stay in use and
    nothing is lost. With a commit after it, it is corruption, reported, never skipped."""
    path = str(tmp_path / "d.mv2")
    payloads = fill(path, events(1000), per_commit=50)
    with engine.open(path) as cap:
        cap.upgrade_codecs()
        offset = cap._s.table.dicts[1]
        if later_commit:
            cap.put("after the upgrade")
            cap.commit()
    raw = bytearray(Path(path).read_bytes())
    raw[offset + 40] ^= 0xFF  # inside the DICT record's body
    Path(path).write_bytes(bytes(raw))
    report = engine.verify(path)
    if later_commit:
        assert not report.ok
        with pytest.raises(engine.CorruptionError):
            engine.open(path, readonly=True)
    else:
        assert report.ok and any("torn tail" in w for w in report.warnings)
        with engine.open(path) as cap:
            assert {i: cap.get(i).payload for i in payloads} == payloads
            assert "zstd+dict" not in cap.stats()["codecs"]


def test_unknown_dictionary_codec_needs_its_dictionary():
    with pytest.raises(engine.CorruptionError, match="dictionary"):
        codecs.decode(codecs.ZSTD_DICT, b"\x28\xb5\x2f\xfd", 4)


def test_a_new_dictionary_as_the_capsule_grows(tmp_path):
    path = str(tmp_path / "g.mv2")
    fill(path, events(1500), per_commit=100)
    with engine.open(path) as cap:
        cap.upgrade_codecs()
        first = cap._s.table.dict_trained_at
        assert cap.stats()["upgrades"]["dictionaries"] == 1 and first > 0
        more = events(8 * first, seed=5)
        for i in range(0, len(more), 200):
            for t in more[i : i + 200]:
                cap.put(t)
            cap.commit()
        cap.upgrade_codecs()
        assert cap.stats()["upgrades"]["dictionaries"] == 2
        assert {i: cap.get(i).payload.decode() for i in range(1500, 1510)} == dict(zip(range(1500, 1510), more))
    with engine.open(path, readonly=True) as cap:  # both dictionaries load, old blocks keep theirs
        assert cap.get(0).payload.decode() == events(1500)[0]
        assert cap.get(1500 + len(more) - 1).payload.decode() == more[-1]
    assert engine.verify(path).ok
