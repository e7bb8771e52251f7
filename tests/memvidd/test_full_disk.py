"""A full disk (issue 11, item 6): a real tmpfs, filled to the last byte, under a real
daemon. It starts, serves reads, answers puts with ``storage`` errors, and stops cleanly;
nothing it had is lost."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

import engine
from daemon_util import DaemonProc
from memvidd.client import Client, RemoteError

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small tmpfs to fill (needs root)"),
]


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)], check=True, timeout=30)
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False, timeout=30)


def fill(directory: Path) -> None:
    """Write a filler file until the filesystem refuses another byte."""
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for size in (1 << 20, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError as e:
                assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)


def test_the_daemon_starts_and_serves_reads_on_a_full_disk(tmp_path, small_disk):
    path = small_disk / "default.mv2"
    # A tail big enough that closing the capsule would checkpoint it: the old start-up
    # probe (open, close, open again) wrote that checkpoint and died of ENOSPC.
    with engine.create(path, model=None, checkpoint_frames=1 << 20, checkpoint_bytes=1 << 30,
                       close_checkpoint_frames=1 << 20) as cap:
        for i in range(400):
            cap.put(f"kept note {i} about the full disk", uri=f"note://{i}")
            if i % 50 == 49:
                cap.commit()
    size = os.path.getsize(path)
    fill(small_disk)
    d = DaemonProc(tmp_path)
    d.config.write_text(d.config.read_text().replace(f'path = "{tmp_path}/default.mv2"', f'path = "{path}"'))
    try:
        d.start()
        with Client(d.socket, timeout=30) as c:
            hits = c.find("kept note 123", k=3, mode="lex")
            assert hits and hits[0].uri == "note://123"
            assert c.get(uri="note://7").text == "kept note 7 about the full disk"
            with pytest.raises(RemoteError) as e:
                c.put(os.urandom(300_000).hex(), uri="note://new")  # incompressible
            assert e.value.code == "storage"
            assert "ENOSPC" in str(e.value) or "space" in str(e.value)
            assert c.find("kept note 5", k=1, mode="lex")[0].uri == "note://5"  # still serving
        assert d.stop() == 0
    finally:
        d.close()
    log = d.log.read_text()
    assert "Traceback" not in log, log[-3000:]
    os.unlink(small_disk / "filler")
    assert os.path.getsize(path) >= size
    with engine.open(path) as cap:
        assert cap.get(uri="note://399").text == "kept note 399 about the full disk"
        assert engine.verify(str(path)).ok
