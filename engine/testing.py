"""Fault-injecting capsule files for tests, plugged in at the ``CapsuleFile`` seam.

- ``FaultyFile`` fails the Nth write or fsync with a chosen errno, once (transient) or
  from then on (persistent), the way SQLite's test VFS injects I/O errors.
- ``CrashFile`` remembers what was written since the last fsync; ``crash()`` then
  rebuilds the file as a power cut could leave it: each unsynced write kept, dropped,
  torn at a sector boundary or garbled, chosen by a seeded RNG.

Use them through ``engine.open(path, file_factory=...)`` / ``engine.create(...)``;
``process_death`` then releases what the OS would if the process died there.
"""

from __future__ import annotations

import errno
import os
import random
from typing import Any

from .errors import StorageError
from .fileio import OsFile

SECTOR = 512


class _Wrapper:
    def __init__(self, inner: OsFile) -> None:
        self.inner = inner
        self.path = inner.path

    @property
    def sealer(self) -> object:
        return self.inner.sealer

    @sealer.setter
    def sealer(self, value: object) -> None:
        self.inner.sealer = value

    def pread(self, offset: int, n: int) -> bytes:
        return self.inner.pread(offset, n)

    def size(self) -> int:
        return self.inner.size()

    def lock(self) -> None:
        self.inner.lock()

    def close(self) -> None:
        self.inner.close()

    def pwrite(self, offset: int, data: bytes) -> None:
        self.inner.pwrite(offset, data)

    def sync(self) -> None:
        self.inner.sync()

    def truncate(self, size: int) -> None:
        self.inner.truncate(size)


class FaultyFile(_Wrapper):
    """Fails the ``fail_at``-th mutating operation (1-based) of the kinds in ``ops``."""

    def __init__(
        self,
        inner: OsFile,
        *,
        fail_at: int,
        code: int = errno.EIO,
        persistent: bool = False,
        ops: tuple[str, ...] = ("write", "fsync", "truncate"),
    ) -> None:
        super().__init__(inner)
        self.fail_at = fail_at
        self.code = code
        self.persistent = persistent
        self.ops = ops
        self.count = 0
        self.failed = 0
        self.active = True

    def _maybe_fail(self, op: str, partial: Any = None) -> None:
        if not self.active or op not in self.ops:
            return
        self.count += 1
        if self.count == self.fail_at or (self.persistent and self.count > self.fail_at):
            self.failed += 1
            if partial is not None:
                partial()  # a failing write may still have landed in part
            raise StorageError(op, self.path, OSError(self.code, os.strerror(self.code)))

    def pwrite(self, offset: int, data: bytes) -> None:
        half = data[: len(data) // 2]
        self._maybe_fail("write", lambda: self.inner.pwrite(offset, half))
        self.inner.pwrite(offset, data)

    def sync(self) -> None:
        self._maybe_fail("fsync")
        self.inner.sync()

    def truncate(self, size: int) -> None:
        self._maybe_fail("truncate")
        self.inner.truncate(size)


class SimulatedCrash(BaseException):
    """Raised in place of the fsync at which ``CrashFile`` cuts the power."""


class CrashFile(_Wrapper):
    """Tracks unsynced writes so ``crash()`` can apply a seeded power cut.

    With ``crash_at_sync=k`` the k-th ``sync`` does not happen: the post-crash image is
    stored in ``image`` and ``SimulatedCrash`` unwinds the caller.
    """

    def __init__(self, inner: OsFile, *, seed: int, crash_at_sync: int = 0) -> None:
        super().__init__(inner)
        self.crash_at_sync = crash_at_sync
        self.image: bytes | None = None
        self.rng = random.Random(seed)
        self.durable = bytearray(inner.pread(0, inner.size()))
        self.unsynced: list[tuple[int, bytes]] = []
        self.syncs = 0

    def pwrite(self, offset: int, data: bytes) -> None:
        self.inner.pwrite(offset, data)
        self.unsynced.append((offset, bytes(data)))

    def truncate(self, size: int) -> None:
        self.inner.truncate(size)
        self.unsynced.append((size, b""))  # (size, b"") marks a truncation

    def sync(self) -> None:
        if self.syncs + 1 == self.crash_at_sync:
            self.image = self.crash()
            raise SimulatedCrash(f"power cut at sync {self.crash_at_sync}")
        self.inner.sync()
        self.syncs += 1
        self.durable = bytearray(self.inner.pread(0, self.inner.size()))
        self.unsynced.clear()

    def crash(self) -> bytes:
        """The bytes a power cut could leave now; each unsynced write is fate-rolled."""
        image = bytearray(self.durable)
        for offset, data in self.unsynced:
            if not data:  # truncation: may or may not have reached the disk
                if self.rng.random() < 0.5:
                    del image[offset:]
                continue
            fate = self.rng.choice(("keep", "drop", "torn", "garble"))
            if fate == "drop":
                continue
            if fate == "torn":
                data = data[: self.rng.randrange(0, len(data) + 1, SECTOR) if len(data) > SECTOR else 0]
            elif fate == "garble":
                garbled = bytearray(data)
                start = self.rng.randrange(0, len(data), SECTOR) if len(data) > SECTOR else 0
                for i in range(start, min(len(data), start + SECTOR)):
                    garbled[i] = self.rng.randrange(256)
                data = bytes(garbled)
            if len(image) < offset:
                image.extend(bytes(offset - len(image)))  # a file may grow before data lands
            image[offset : offset + len(data)] = data
        return bytes(image)


def process_death(cap: Any) -> None:
    """Release what the kernel releases when a process dies (descriptors: the capsule
    file, the frame tables' spill files) and nothing a close would write."""
    cap._s.views.close()  # a test seam into the capsule
