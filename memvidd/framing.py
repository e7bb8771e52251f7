"""Length-prefixed frames over byte streams, for trio streams and blocking sockets.

A frame is a 4-byte big-endian unsigned body length followed by the body. The length is
checked against the limit *before* the body is read, so a bogus prefix (say 4 GiB) costs
nothing and cannot exhaust memory. In the daemon, a reader also takes each frame's bytes
from the shared budget (``budget.Share``) before reading its body.
"""

from __future__ import annotations

import socket
import struct

import trio

from .budget import Share

PREFIX = struct.Struct(">I")


class FrameTooLarge(Exception):
    def __init__(self, length: int, limit: int) -> None:
        super().__init__(f"frame of {length} bytes exceeds the limit of {limit}")
        self.length = length
        self.limit = limit


class TruncatedFrame(Exception):
    """The peer closed the stream in the middle of a frame."""


def pack(body: bytes) -> bytes:
    return PREFIX.pack(len(body)) + body


class FrameReader:
    """Reads whole frames from a trio stream, buffering what arrives early (pipelining).

    With a ``share`` (the daemon), the buffer and the frame being read are covered by the
    budget (``OverBudget`` when they cannot be), and the frame returned stays held there
    (``last`` bytes) until the connection says it is answered.
    """

    def __init__(self, stream: trio.abc.ReceiveStream, limit: int, share: Share | None = None) -> None:
        self.stream = stream
        self.limit = limit
        self.share = share
        self.last = 0  # bytes of the frame last returned, handed on to the connection
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
        """The next frame body; ``None`` at a clean end of stream."""
        if self.share is not None:
            self.share.trim(len(self._buf))  # a whole frame's cover beyond what came of it
        if not await self._fill(PREFIX.size):
            if self._buf:
                raise TruncatedFrame(f"stream ended inside a length prefix ({len(self._buf)} bytes)")
            return None
        (length,) = PREFIX.unpack_from(self._buf)
        if length > self.limit:
            raise FrameTooLarge(length, self.limit)
        if self.share is not None:
            self.share.cover(PREFIX.size + length)  # before the body costs anything
        if not await self._fill(PREFIX.size + length):
            raise TruncatedFrame(f"stream ended {PREFIX.size + length - len(self._buf)} bytes short of a frame")
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
            raise TruncatedFrame("connection closed in the middle of a frame")
        parts.append(chunk)
        n -= len(chunk)
    return b"".join(parts)


def recv_frame(sock: socket.socket, limit: int) -> bytes | None:
    """The next frame body from a blocking socket; ``None`` at a clean end of stream."""
    first = sock.recv(PREFIX.size)
    if not first:
        return None
    head = first + (_recv_exact(sock, PREFIX.size - len(first)) if len(first) < PREFIX.size else b"")
    (length,) = PREFIX.unpack(head)
    if length > limit:
        raise FrameTooLarge(length, limit)
    return _recv_exact(sock, length)


def send_frame(sock: socket.socket, body: bytes) -> None:
    sock.sendall(pack(body))
