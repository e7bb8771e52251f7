"""The one door between the engine and the operating system's files.

Every byte the engine reads or writes passes through a ``CapsuleFile``: positional
reads and writes, ``sync`` (fdatasync), ``truncate`` and ``size``. Tests substitute
wrappers (``engine.testing``) at this seam to inject EIO/ENOSPC or to simulate a crash
that drops unsynced writes; production uses ``OsFile``.

It also owns the writer lock, which lives on the capsule itself so that no sidecar file
is ever needed [F-13]:

- exclusion is an ``flock`` on the capsule's open file description: it cannot be
  released by another descriptor of the same process and it survives commits, because
  commits append to the same inode instead of replacing it;
- the holder's pid is published with a one-byte POSIX record lock far beyond any data,
  which ``F_GETLK`` reports to the loser. It is informational only.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import stat
import struct
from pathlib import Path
from typing import Any, Protocol

from .errors import CapsuleExists, CapsuleLocked, StorageError, UnsafeDirectory

CAPSULE_MODE = 0o600  # a capsule holds what its owner wrote: nobody else reads it
PID_LOCK_BYTE = 1 << 62  # POSIX locks may cover bytes past EOF; the file never gets there
_FLOCK = struct.Struct("@hhqqi4x")  # struct flock on Linux (x86-64 and aarch64)


class CapsuleFile(Protocol):
    path: str

    def pread(self, offset: int, n: int) -> bytes: ...
    def pwrite(self, offset: int, data: bytes | bytearray) -> None: ...
    sealer: Any  # how records are sealed (encrypted capsules), or None
    def sync(self) -> None: ...
    def truncate(self, size: int) -> None: ...
    def size(self) -> int: ...
    def close(self) -> None: ...


class OsFile:
    """A capsule file descriptor. Errors surface as ``StorageError`` naming the op."""

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self.fd = fd
        # How record bodies of this file are sealed (encrypted capsules set a
        # crypto.Sealer after unlocking); None: plain records.
        self.sealer: Any = None

    @classmethod
    def open(cls, path: str, *, readonly: bool) -> OsFile:
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
        return cls(path, os.open(path, flags))

    @classmethod
    def create(cls, path: str, initial: bytes) -> OsFile:
        """Create ``path`` holding ``initial``, atomically: it appears complete or not at all.

        The file is built unnamed (O_TMPFILE), locked, synced, and only then linked into
        the directory, so a crash never leaves a half-made capsule and no temporary name
        is ever visible beside it.
        """
        directory = os.path.dirname(os.path.abspath(path))
        if os.path.lexists(path):
            raise CapsuleExists(f"{path} already exists")
        try:
            fd = os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, CAPSULE_MODE)
            anonymous = True
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise StorageError("create", path, e) from e
            anonymous = False  # filesystem without O_TMPFILE: plain exclusive create
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, CAPSULE_MODE)
            except FileExistsError:
                raise CapsuleExists(f"{path} already exists") from None
        f = cls(path, fd)
        try:
            f.lock()
            f.pwrite(0, initial)
            f.sync()
            if anonymous:
                _link_anonymous(fd, path)
            fsync_dir(directory)  # the new name is durable, not only the bytes
        except BaseException:
            f.close()
            if not anonymous:
                os.unlink(path)
            raise
        return f

    def pread(self, offset: int, n: int) -> bytes:
        try:
            return os.pread(self.fd, n, offset)
        except OSError as e:
            raise StorageError("read", self.path, e) from e

    def pwrite(self, offset: int, data: bytes | bytearray) -> None:
        view = memoryview(data)
        try:
            while view:  # pwrite may be short on a nearly full disk
                done = os.pwrite(self.fd, view, offset)
                if done == 0:
                    raise OSError(errno.ENOSPC, "short write")
                view = view[done:]
                offset += done
        except OSError as e:
            raise StorageError("write", self.path, e) from e

    def sync(self) -> None:
        # fdatasync also flushes the file size, which is all the metadata a reader needs.
        try:
            os.fdatasync(self.fd)
        except OSError as e:
            raise StorageError("fsync", self.path, e) from e

    def truncate(self, size: int) -> None:
        try:
            os.ftruncate(self.fd, size)
        except OSError as e:
            raise StorageError("truncate", self.path, e) from e

    def size(self) -> int:
        try:
            return os.fstat(self.fd).st_size
        except OSError as e:
            raise StorageError("stat", self.path, e) from e

    def identity(self) -> tuple[int, int]:
        st = os.fstat(self.fd)
        return st.st_dev, st.st_ino

    def keep_mode_of(self, other: OsFile) -> None:
        """Give this file ``other``'s permission bits and, where allowed, its group and
        owner: a rewrite must not widen (or narrow) who may read a capsule."""
        try:
            st = os.fstat(other.fd)
            os.fchmod(self.fd, stat.S_IMODE(st.st_mode))
        except OSError as e:
            raise StorageError("chmod", self.path, e) from e
        with contextlib.suppress(PermissionError):
            os.fchown(self.fd, st.st_uid, st.st_gid)

    def still_at(self, path: str) -> bool:
        """Whether ``path`` still names this file (not moved, not replaced)."""
        try:
            st = os.lstat(path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self.identity()

    def lock(self) -> None:
        """Take the writer lock or raise ``CapsuleLocked`` naming the holder."""
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CapsuleLocked(self.path, self._holder_pid()) from None
        with contextlib.suppress(OSError):  # only the pid advertisement; exclusion is ours already
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, PID_LOCK_BYTE)

    def _holder_pid(self) -> int | None:
        probe = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, PID_LOCK_BYTE, 1, 0)
        try:
            l_type, _, _, _, pid = _FLOCK.unpack(fcntl.fcntl(self.fd, fcntl.F_GETLK, probe))
        except OSError:
            return None
        return pid if l_type != fcntl.F_UNLCK and pid > 0 else None

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)  # releases both locks


def link_unnamed(f: OsFile, path: str, *, replace: str | None = None) -> None:
    """Name the unnamed file ``f`` ``path``; with ``replace``, then rename it over that
    file (atomic: readers see the old file or the new one). The caller fsyncs the
    directory. A stale ``path`` left by a crash between the two steps is removed first."""
    if replace is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    _link_anonymous(f.fd, path)
    if replace is not None:
        try:
            os.rename(path, replace)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise StorageError("rename", replace, e) from e


def _link_anonymous(fd: int, path: str) -> None:
    """Give an O_TMPFILE file its name. CPython's os.link cannot: it calls link(2),
    which refuses /proc/self/fd magic links, so call linkat(2) with AT_SYMLINK_FOLLOW."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    src = f"/proc/self/fd/{fd}".encode()
    if _libc.linkat(_AT_FDCWD, src, _AT_FDCWD, os.fsencode(path), _AT_SYMLINK_FOLLOW) != 0:
        code = ctypes.get_errno()
        if code == errno.EEXIST:
            raise CapsuleExists(f"{path} already exists")
        raise StorageError("link", path, OSError(code, os.strerror(code)))


_libc: ctypes.CDLL | None = None
_AT_FDCWD = -100
_AT_SYMLINK_FOLLOW = 0x400


def fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def private_dir(path: str | os.PathLike[str], top: str | os.PathLike[str] | None = None) -> Path:
    """``path``, a directory only this user can use, and so is each one from ``top``
    (default: ``path`` itself) down to it; missing ones are made 0700.

    memvidd keeps there what no one else may read or replace (decrypted index copies,
    sockets), and its fallbacks sit in world-writable /tmp and /dev/shm, where another
    user could have made the directory first. Each one must be a real directory (not a
    symlink) owned by this user that no one else can write in (else ``UnsafeDirectory``);
    one only others' read bits open (as older versions left them) is tightened to 0700.
    """
    path, top = Path(path), Path(top if top is not None else path)
    d = top
    for name in ("", *path.relative_to(top).parts):
        d = d / name
        try:
            os.mkdir(d, 0o700)  # O_EXCL-like: made here, or checked below like any other
        except FileExistsError:
            pass
        except OSError as e:
            raise StorageError("mkdir", str(d), e) from e
        _check_private(d)
    return path


def _check_private(d: Path) -> None:
    try:
        st = os.lstat(d)
    except OSError as e:
        raise StorageError("stat", str(d), e) from e
    uid = os.getuid()
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeDirectory(str(d), "is a symbolic link")
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeDirectory(str(d), "is not a directory")
    if st.st_uid != uid:
        raise UnsafeDirectory(str(d), f"is owned by uid {st.st_uid}, not by this user (uid {uid})")
    if st.st_mode & 0o022:
        raise UnsafeDirectory(str(d), f"has mode {stat.S_IMODE(st.st_mode):04o} (others may write in it)")
    if st.st_mode & 0o077:
        os.chmod(d, 0o700)  # ours, and no one else could write in it: nothing there is theirs
