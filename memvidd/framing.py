"""Length-prefixed messages over byte streams, for trio streams and blocking sockets.

One message on the wire is a 4-byte big-endian unsigned body length followed by the body
(the wire's own names call it a *frame*: ``max_frame``, ``frame_too_large``,
``limits.max-frame-bytes``, each bounding one message; a stored frame of a capsule is
another thing). The length is checked against the limit *before* the body is read, so a
bogus prefix (say 4 GiB) costs nothing and cannot exhaust memory. In the daemon, a reader
also takes each message's bytes from the shared budget (``budget.Share``) before reading
its body.

Trio is only named in annotations here: the blocking client imports this module without it.
"""

from __future__ import annotations

import socket
import struct
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import trio

    from .budget import Share

PREFIX = struct.Struct(">I")


class MessageTooLarge(Exception):
    def __init__(self, length: int, limit: int) -> None:
        super().__init__(f"message of {length} bytes exceeds the limit of {limit}")
        self.length = length
        self.limit = limit


class TruncatedMessage(Exception):
    """The peer closed the stream in the middle of a message."""


def pack_message(body: bytes) -> bytes:
    """``body`` with its length prefix, ready to send."""
    return PREFIX.pack(len(body)) + body


class MessageReader:
    """Reads whole messages from a trio stream, buffering what arrives early (pipelining).

    With a ``share`` (the daemon), the buffer and the message being read are covered by
    the budget (``OverBudget`` when they cannot be), and the message returned stays held
    there (``last`` bytes) until the connection says it is answered.
    """

    def __init__(self, stream: trio.abc.ReceiveStream, limit: int, share: Share | None = None) -> None:
        self.stream = stream
        self.limit = limit
        self.share = share
        self.last = 0  # bytes of the message last returned, handed on to the connection
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        """Bytes already received by someone else, to be read first."""
        self._buf += data

    async def _fill(self, n: int) -> bool:
        while len(self._buf) < n:
            chunk = await self.stream.receive_some(max(65536, n - len(self._buf)))
            if not chunk:
                return False
            self._buf += chunk
            if self.share is not None:
                self.share.cover(len(self._buf))
        return True

    async def read(self) -> bytes | None:
        """The next message body; ``None`` at a clean end of stream."""
        if self.share is not None:
            self.share.trim(len(self._buf))  # a whole message's cover beyond what came of it
        if not await self._fill(PREFIX.size):
            if self._buf:
                raise TruncatedMessage(f"stream ended inside a length prefix ({len(self._buf)} bytes)")
            return None
        (length,) = PREFIX.unpack_from(self._buf)
        if length > self.limit:
            raise MessageTooLarge(length, self.limit)
        if self.share is not None:
            self.share.cover(PREFIX.size + length)  # before the body costs anything
        if not await self._fill(PREFIX.size + length):
            short = PREFIX.size + length - len(self._buf)
            raise TruncatedMessage(f"stream ended {short} bytes short of a message")
        with memoryview(self._buf) as view:  # one copy of the body, not two
            body = bytes(view[PREFIX.size : PREFIX.size + length])
        del self._buf[: PREFIX.size + length]
        if self.share is not None:
            self.last = self.share.hand_on(PREFIX.size + length)
        return body


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    parts = []
    while n:
        chunk = sock.recv(min(n, 1 << 20))
        if not chunk:
            raise TruncatedMessage("connection closed in the middle of a message")
        parts.append(chunk)
        n -= len(chunk)
    return b"".join(parts)


def recv_message(sock: socket.socket, limit: int) -> bytes | None:
    """The next message body from a blocking socket; ``None`` at a clean end of stream."""
    first = sock.recv(PREFIX.size)
    if not first:
        return None
    head = first + (_recv_exact(sock, PREFIX.size - len(first)) if len(first) < PREFIX.size else b"")
    (length,) = PREFIX.unpack(head)
    if length > limit:
        raise MessageTooLarge(length, limit)
    return _recv_exact(sock, length)


def send_message(sock: socket.socket, body: bytes) -> None:
    sock.sendall(pack_message(body))
