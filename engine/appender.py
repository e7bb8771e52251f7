"""The appender: the only code that writes a capsule's bytes.

Every record is sealed (for an encrypted capsule) at the offset it is written to, and
appended past ``log_end``, the end of what is committed; ``durable`` is the acknowledgement
point [F-05]. Records written but not yet made durable are garbage to every reader until
a COMMIT (or a header) names them, so a failed write only has to cut them off [F-07].
Header slots alternate, so the live slot is never overwritten [F-02].
"""

from __future__ import annotations

from typing import Any

from . import format as fmt
from .errors import StorageError
from .fileio import CapsuleFile

SPOOL_BYTES = 1 << 20  # a spool writes its records out in pieces of about this size


class Appender:
    """Appends records to ``file`` and moves its header; ``log_end`` is where the
    committed log ends, ``write_end`` where the next record goes."""

    def __init__(self, file: CapsuleFile, header: fmt.Header, log_end: int) -> None:
        self.file = file
        self.header = header
        self.log_end = self.write_end = log_end
        self.broken: str | None = None  # set when stale bytes could not be cut off

    @property
    def staged_bytes(self) -> int:
        """Bytes written past the committed end (staged blocks)."""
        return self.write_end - self.log_end

    def seal(self, kind: int, body: bytes, offset: int) -> bytes:
        """A record to be written at ``offset`` (sealed there, for encrypted capsules)."""
        return fmt.encode_record(kind, body, sealer=self.file.sealer, offset=offset)

    def seal_meta(self, kind: int, obj: Any, offset: int) -> bytes:
        return fmt.meta_record(kind, obj, sealer=self.file.sealer, offset=offset)

    def append(self, raw: bytes | bytearray) -> int:
        """Write ``raw`` at ``write_end`` without an fsync; returns where it went."""
        at = self.write_end
        self.file.pwrite(at, raw)
        self.write_end += len(raw)
        return at

    def append_durably(self, raw: bytes) -> int:
        """``append`` then ``make_durable``; on failure nothing appended stays."""
        try:
            at = self.append(raw)
        except StorageError:
            self.rollback()
            raise
        self.make_durable()
        return at

    def make_durable(self, header: fmt.Header | None = None) -> None:
        """fsync what was appended, then point the spare header slot at ``header`` if
        given: from here on it survives a crash and is committed. On failure the appended
        bytes are cut off (the old header still points at the old checkpoint) and the
        error raised."""
        try:
            self.file.sync()  # order matters: a header may only name bytes on disk
            if header is not None:
                self.write_header(header)
        except StorageError:
            self.rollback()
            raise
        self.log_end = self.write_end

    def drop_torn_tail(self) -> None:
        """Cut what a crash left past the committed end, before anything new is written,
        so new records never sit before stale bytes a later scan could misread [F-06]."""
        self.file.truncate(self.log_end)
        self.file.sync()

    def rollback(self) -> None:
        """Drop every byte past the committed end."""
        self.cut_tail(self.log_end)

    def cut_tail(self, end: int) -> None:
        """Cut the file at ``end`` (past ``log_end``: staged blocks after it), durably."""
        self.write_end = end
        try:
            if self.file.size() > end:
                self.file.truncate(end)
                # Durably, before anything new is written: cut records that came back after
                # a crash would pass for proof that the write torn then was durable [F-07].
                self.file.sync()
        except StorageError as e:
            # Stale bytes past the end could be misread by a later scan: refuse to go on.
            self.broken = f"could not cut the tail after a failed write: {e}"

    def write_header(self, header: fmt.Header) -> None:
        """Write ``header`` to the spare slot, durably [F-02]."""
        slot = fmt.SLOT_OFFSETS[header.generation % 2]
        self.file.pwrite(slot, fmt.encode_header(header))
        self.file.sync()
        self.header = header

    def spool(self) -> Spool:
        return Spool(self)


class Spool:
    """Records appended in pieces of ``SPOOL_BYTES`` instead of gathered whole, so a big
    checkpoint's memory stays bounded. Nothing written here counts until a header or a
    commit names it."""

    def __init__(self, appender: Appender) -> None:
        self._appender, self._buf = appender, bytearray()

    @property
    def pos(self) -> int:
        """Where the next record goes."""
        return self._appender.write_end + len(self._buf)

    def write(self, raw: bytes) -> None:
        self._buf += raw
        if len(self._buf) >= SPOOL_BYTES:
            self.flush()

    def flush(self) -> None:
        if self._buf:
            self._appender.append(self._buf)  # replaced below, never changed after
            self._buf = bytearray()


def body_crc(raw: bytes) -> int:
    """The body CRC of the record ``raw`` just sealed (what a reference to it carries)."""
    head = fmt.decode_record_header(raw)
    assert head is not None
    return head.body_crc
