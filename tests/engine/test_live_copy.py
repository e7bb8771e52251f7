"""What the README says of backups: a plain copy of a capsule that a writer has open,
read once from start to end (as ``cp`` and ``rsync`` read), opens and holds every commit
made before the copy started. The writer meanwhile commits, checkpoints (rewriting the
header slots in place), upgrades codecs and compacts (a new file renamed over the old)."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest

import engine

pytestmark = pytest.mark.timeout(120)


def read_through(src: Path, dst: Path) -> None:
    """A byte copy in small sequential reads (cp may use copy_file_range: same order)."""
    with open(src, "rb") as i, open(dst, "wb") as o:
        while chunk := i.read(4096):
            o.write(chunk)


@pytest.mark.parametrize("copy", [read_through, shutil.copyfile], ids=["reads", "copyfile"])
def test_a_copy_of_a_live_capsule_opens_with_every_commit_made_before_it(tmp_path, copy):
    path = tmp_path / "live.mv2"
    stop = threading.Event()
    failures: list[BaseException] = []
    with engine.create(path, model=None, checkpoint_frames=16, index_dir=str(tmp_path / "ix")) as cap:
        cap.put("first", uri="n://0")
        cap.commit()

        done = [0]  # commits the writer made

        def write() -> None:
            try:
                i = 0
                while not stop.is_set():
                    i += 1
                    done[0] = i
                    cap.put(f"note {i} " + "words " * (i % 50), uri=f"n://{i % 40}")
                    cap.commit()  # a checkpoint (and a header write) every 16 frames
                    if i % 60 == 0:
                        cap.upgrade_codecs()
                    if i % 150 == 0:
                        cap.compact()
            except BaseException as e:  # noqa: BLE001 - reported by the test
                failures.append(e)

        writer = threading.Thread(target=write)
        writer.start()
        try:
            n = 0
            while done[0] < 600 or n < 25:  # through four compactions and many checkpoints
                n += 1
                assert n < 5000 and writer.is_alive(), (n, done, failures)
                before = cap.seq  # committed before the copy starts
                out = tmp_path / f"copy{n}.mv2"
                copy(path, out)
                with engine.open(out, readonly=True, index_dir=str(tmp_path / f"ix{n}")) as c:
                    assert c.seq >= before, f"copy {n}: commit {c.seq}, but {before} was durable before it"
                    assert c.get(uri="n://0").text is not None
                report = engine.verify(str(out))
                assert report.ok, (n, report.errors)
                out.unlink()
        finally:
            stop.set()
            writer.join(timeout=60)
    assert not failures, failures
