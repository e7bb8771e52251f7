"""The engine's error vocabulary.

Every error says who is at fault and whether retrying can help:

- the *caller* asked for something impossible (``InvalidArgument``, ``NotFound``,
  ``CapsuleExists``, ``ReadOnlyError``, ``CapsuleClosed``);
- the *data* on disk is damaged or too new (``CorruptionError``, ``FormatVersionError``,
  ``NotACapsule``);
- the *environment* failed (``StorageError``: disk full, I/O error; ``CapsuleLocked``).

``retryable`` is true only where the same call may succeed later without a code change.
"""

from __future__ import annotations

import errno as _errno


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""

    retryable = False
    hint = ""

    def __str__(self) -> str:
        text = super().__str__()
        return f"{text} (hint: {self.hint})" if self.hint else text


class InvalidArgument(EngineError, ValueError):
    """The caller passed a value the engine cannot accept."""


class WrongPassphrase(InvalidArgument):
    """The passphrase does not open this capsule's key slot (the wrapped key's tag failed).

    Not corruption: the key slot passed its CRC, so the bytes are as written.
    """

    hint = "check the passphrase source (env, file or credential)"


class Cancelled(EngineError):
    """The caller asked a long operation (compaction) to stop; nothing was changed."""


class NotFound(EngineError, KeyError):
    """No frame matches the given id, URI or point in time."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return Exception.__str__(self)


class CapsuleExists(EngineError, FileExistsError):
    """``create`` was asked to make a capsule where a file already exists."""


class CapsuleClosed(EngineError):
    """The capsule was used after ``close()``."""


class ReadOnlyError(EngineError):
    """A write was attempted on a capsule opened read-only."""


class CapsuleLocked(EngineError):
    """Another writer holds the capsule; readonly opens still work."""

    retryable = True

    def __init__(self, path: str, pid: int | None) -> None:
        self.path = path
        self.pid = pid
        who = f"pid {pid}" if pid else "another writer (pid unknown)"
        super().__init__(f"{path} is locked by {who}")
        self.hint = "stop that writer, or open with readonly=True"


class NotACapsule(EngineError):
    """The file is not a memvidd capsule at all (wrong magic)."""


class FormatVersionError(EngineError):
    """The file was written by a newer engine than this one."""


class CorruptionError(EngineError):
    """Committed data failed a checksum or an invariant.

    ``offset`` is the byte position of the damage when known. ``engine.doctor`` can
    repair some of these (a damaged checkpoint, a torn tail); ``engine.verify`` reports
    all of them.
    """

    def __init__(self, message: str, *, offset: int | None = None) -> None:
        self.offset = offset
        where = f" at offset {offset}" if offset is not None else ""
        super().__init__(f"capsule corrupt{where}: {message}")
        self.hint = "run `memvidd verify FILE`, then `memvidd doctor FILE`"


class StorageError(EngineError, OSError):
    """The operating system refused a read, write or fsync.

    The capsule on disk is left at its last committed state. After a failed commit the
    uncommitted puts of that batch are discarded: put them again.
    """

    def __init__(self, op: str, path: str, cause: OSError) -> None:
        self.op = op
        self.cause = cause
        code = cause.errno
        self.retryable = code in (_errno.ENOSPC, _errno.EDQUOT, _errno.EINTR, _errno.EAGAIN)
        name = _errno.errorcode.get(code, str(code)) if code is not None else "?"
        OSError.__init__(self, code, f"{op} failed on {path}: [{name}] {cause.strerror or cause}")
        if code in (_errno.ENOSPC, _errno.EDQUOT):
            self.hint = "free disk space, then put the batch again"

    def __str__(self) -> str:
        text = self.strerror or ""
        return f"{text} (hint: {self.hint})" if self.hint else text


class UnsafeDirectory(StorageError):
    """A directory memvidd keeps private things in (index copies, sockets) could be read or
    changed by another user: it is refused, never used."""

    def __init__(self, path: str, reason: str) -> None:
        self.op, self.cause, self.retryable = "use", PermissionError(_errno.EPERM, reason), False
        OSError.__init__(self, _errno.EPERM, f"refusing {path}: it {reason}, so another user could read or "
                                             "replace what memvidd keeps there")
        self.hint = "remove it, or set XDG_RUNTIME_DIR to a directory of your own (mode 0700)"


class CapsuleBroken(EngineError):
    """A write failed and the engine could not restore a clean tail; reopen the capsule."""
