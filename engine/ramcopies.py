"""Search index working copies in RAM-backed storage: where they live, which are in use,
and reclaiming the others.

RAM-backed storage (``$XDG_RUNTIME_DIR/memvidd``, else ``/dev/shm/memvidd-$UID``) is
memory: a copy left behind by a stopped or crashed process holds RAM until reboot. So
every copy directory has a ``lock`` file, ``flock``-ed (shared) by each process using
the copy; the kernel drops that lock when the process dies, however it dies. A pass of
``reclaim`` (when a capsule's indexes are opened and closed) removes what no process
holds: copies of capsules no longer at the path they were opened from, and the least
recently used others past a total of ``KEEP_BYTES``; copies of encrypted capsules and
readers' private copies are never reused, so they go as soon as they are not held.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import uuid
from pathlib import Path

from .embed import cache_root
from .fileio import private_dir

SHM = "/dev/shm"
KEEP_BYTES = 64 << 20  # unused shared copies kept (for a fast reopen) up to this total
# Under the RAM root: one directory per kind of copy (each copy a directory in it).
SHARED, PRIVATE, SEALED = "index", "private", "sealed"  # plain capsules'; readers' own; encrypted ones'
LOCK = "lock"
OWNER = "owner"  # the capsule path a shared copy belongs to
_TRASH = ".trash-"


def ram_root() -> Path:
    """Where RAM-backed working copies go: the user's runtime dir, else /dev/shm, else
    the cache dir (disk) when neither is there. Only a private directory is used
    (``fileio.private_dir``)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return private_dir(Path(runtime) / "memvidd", top=runtime)
    if os.path.isdir(SHM) and os.access(SHM, os.W_OK):
        return private_dir(Path(SHM) / f"memvidd-{os.getuid()}")
    return cache_root()


class Claim:
    """This process uses the working copy in ``directory`` (made if missing) until
    ``release``: a shared lock on its lock file, which ``reclaim`` cannot take."""

    def __init__(self, directory: Path, owner: str | None = None) -> None:
        self.directory = directory
        lock = directory / LOCK
        while True:
            try:
                directory.mkdir(mode=0o700, parents=True, exist_ok=True)
                fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except (FileExistsError, FileNotFoundError):
                continue  # a reclaim renamed the directory away meanwhile
            fcntl.flock(fd, fcntl.LOCK_SH)  # waits while a reclaim removes the copy
            try:
                same = os.stat(lock).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # reclaimed between open and lock: that copy is gone, make a new one
        self._fd: int | None = fd
        if owner is not None:
            (directory / OWNER).write_text(owner)

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                os.utime(fd)  # the lock file's mtime says when the copy was last used
            os.close(fd)


def reclaim_all(ram: Path) -> None:
    """``reclaim`` every kind of copy under RAM root ``ram``."""
    reclaim(ram / SHARED, KEEP_BYTES)
    reclaim(ram / PRIVATE)
    reclaim(ram / SEALED)


def usage(ram: Path) -> dict[str, int]:
    """How many copies there are under RAM root ``ram`` and the bytes they take."""
    copies = [d for kind in (SHARED, PRIVATE, SEALED) if (ram / kind).is_dir()
              for d in (ram / kind).iterdir() if d.is_dir()]
    return {"copies": len(copies), "bytes": sum(size(d) for d in copies), "keep_unused_bytes": KEEP_BYTES}


def reclaim(base: Path, keep_bytes: int = 0) -> None:
    """Remove the copies in ``base`` no process holds (see the module docstring)."""
    try:
        entries = [e for e in os.scandir(base) if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return
    kept: list[tuple[float, int, Path]] = []  # (last use, bytes, dir) of unused copies worth keeping
    locks = []
    try:
        for e in entries:
            d = Path(e.path)
            if e.name.startswith(_TRASH):
                shutil.rmtree(d, ignore_errors=True)  # a removal a crash interrupted
                continue
            fd = _take(d)
            if fd is None:
                continue  # in use
            locks.append(fd)
            owner = _read(d / OWNER)
            if keep_bytes and owner and os.path.exists(owner):
                kept.append((os.fstat(fd).st_mtime, size(d), d))
            else:  # never reused, or its capsule is gone from that path (moved, deleted)
                _remove(d)
        total = 0
        for _, n, d in sorted(kept, key=lambda k: -k[0]):  # the most recently used stay
            total += n
            if total > keep_bytes:
                _remove(d)
    finally:
        for fd in locks:
            if fd >= 0:
                os.close(fd)


def _take(d: Path) -> int | None:
    """An exclusive lock on copy ``d`` (-1: a copy of an older version, without a lock
    file), or None while a process holds it."""
    try:
        fd = os.open(d / LOCK, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return -1
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _remove(d: Path) -> None:
    """Rename, then delete (the caller holds the lock): a process claiming ``d`` meanwhile
    finds its lock file unlinked and makes a new copy instead of using a half-deleted one."""
    trash = d.with_name(f"{_TRASH}{uuid.uuid4().hex}")
    try:
        os.rename(d, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, ValueError):
        return None


def size(d: Path) -> int:
    """Bytes of storage the files under ``d`` take."""
    total = 0
    for root, _, files in os.walk(d):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total
