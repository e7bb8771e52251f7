"""Who is at the other end of a Unix socket: its uid, from the kernel (``SO_PEERCRED``).

Both ends check it: the daemon refuses clients of other users, and the clients refuse a
socket served by another user (someone else's daemon, or an impostor listening where
ours should be), before either sends anything.
"""

from __future__ import annotations

import os
import socket
import struct

_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class ForeignPeer(PermissionError):
    """The socket's other end runs as another user."""


def peer_uid(sock: socket.socket) -> int | None:
    """The peer's uid; ``None`` where the kernel cannot tell (not a Unix socket)."""
    try:
        _, uid, _ = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    except OSError:
        return None
    return uid


def check_server(sock: socket.socket, path: str) -> None:
    """Refuse (``ForeignPeer``) a daemon socket that another user serves."""
    uid, mine = peer_uid(sock), os.getuid()
    if uid is not None and uid != mine:
        raise ForeignPeer(f"{path} is served by uid {uid}, not by you (uid {mine}): refusing to use it")
