"""I/O errors (EIO, ENOSPC) injected at the Nth write/fsync/truncate [F-05].

For every N until the workload runs clean: the error reaches the caller as a
``StorageError`` (or ``CapsuleBroken`` once the engine cannot restore a clean tail), and
after reopening with the fault gone the capsule holds exactly the acknowledged commits
(plus, at most, the one commit whose outcome the error left undecided).
"""

from __future__ import annotations

import errno
import os
import shutil

import pytest

import engine
from engine.fileio import OsFile
from engine.testing import FaultyFile
from workload import Workload, snapshot


def run_with_fault(path: str, fail_at: int, code: int, persistent: bool) -> tuple[Workload, int, bool, bool]:
    w = Workload(seed=fail_at)
    files: list[FaultyFile] = []

    def factory(p, readonly):
        files.append(FaultyFile(OsFile.open(p, readonly=readonly), fail_at=fail_at, code=code, persistent=persistent))
        return files[-1]

    acked, undecided = 0, False
    cap = engine.open(path, file_factory=factory, checkpoint_frames=5)
    try:
        for _ in range(12):
            ops = w.batch()
            try:
                w.stage(cap, ops)
                cap.commit()
            except engine.StorageError as e:
                assert e.errno == code and e.retryable == (code == errno.ENOSPC)
                undecided = True
                try:
                    cap.rollback()
                except (engine.StorageError, engine.CapsuleBroken):
                    pass
                continue
            except engine.CapsuleBroken:
                continue
            w.committed(ops)
            undecided = False
            acked += 1
        files[-1].active = False
        try:
            cap.close()
        except (engine.StorageError, engine.CapsuleBroken):
            files[-1].close()
    finally:
        if files[-1].inner.fd >= 0:
            files[-1].close()
    return w, acked, undecided, files[-1].failed > 0


@pytest.mark.parametrize("code", [errno.EIO, errno.ENOSPC])
@pytest.mark.parametrize("persistent", [False, True], ids=["transient", "persistent"])
def test_io_error_at_every_operation_keeps_the_capsule_consistent(path, code, persistent):
    engine.create(path).close()
    n = 1
    while True:
        fresh = path + f".{n}"
        shutil.copy(path, fresh)
        w, acked, undecided, hit = run_with_fault(fresh, n, code, persistent)
        with engine.open(fresh) as cap:
            seq = cap.seq
            # Commits may have failed and been retried with new content, so compare the
            # state with the model of the acknowledged commits.
            assert seq >= acked, f"fail_at={n}: lost an acknowledged commit"
            if seq == acked:
                assert snapshot(cap) == w.states[acked], f"fail_at={n}"
            else:
                assert seq == acked + 1 and undecided, f"fail_at={n}: unexplained extra commit"
        report = engine.verify(fresh)
        assert report.ok, (n, report.errors)
        os.unlink(fresh)
        if not hit:
            break
        n += 1
    assert n > 20  # the loop really injected faults at many points
