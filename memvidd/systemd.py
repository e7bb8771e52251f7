"""The systemd service protocol, in a few lines of socket code: no libsystemd.

This module owns everything memvidd says to or takes from systemd:

- ``notify()``: readiness/status/watchdog messages to ``$NOTIFY_SOCKET`` (sd_notify(3));
- ``watchdog_interval()`` and ``serve_watchdog()``: the ``WatchdogSec=`` keep-alive
  (sd_watchdog_enabled(3));
- ``listen_fds()``: sockets handed over by socket activation, ``$LISTEN_FDS`` and
  ``$LISTEN_FDNAMES`` (sd_listen_fds(3)).

Each of them is a harmless no-op when the daemon is not running under systemd (the
variables are unset), so the daemon calls them unconditionally. The unit files that set
these variables up live in ``systemd/`` at the repository root.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import NoReturn

import trio

log = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3  # the first passed fd: 0, 1 and 2 are stdio
NOTIFY_SEND_TIMEOUT = 1.0  # seconds; a full notify queue must not wedge the daemon
_LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def notify(*assignments: str) -> bool:
    """Send ``assignments`` (e.g. ``"READY=1"``, ``"STATUS=..."``) as one datagram.

    Returns True when the datagram was sent, False when ``$NOTIFY_SOCKET`` is unset or the
    send failed (logged at debug level: a missing or refused socket is never an error for
    the caller). An address starting with ``@`` is an abstract socket.
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        target = "\0" + address[1:]
    elif address.startswith("/"):
        target = address
    else:  # e.g. "vsock:CID:PORT" (systemd >= 254, VMs): not needed by a user daemon
        log.debug("NOTIFY_SOCKET=%r: unsupported address, not notifying", address)
        return False
    message = "\n".join(assignments).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.settimeout(NOTIFY_SEND_TIMEOUT)
            sock.sendto(message, target)
    except OSError as exc:  # ENOENT, ECONNREFUSED, EAGAIN/timeout, EMSGSIZE, ...
        log.debug("notify %r to NOTIFY_SOCKET=%r failed: %s", assignments, address, exc)
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``WatchdogSec=``), or None.

    None when ``$WATCHDOG_USEC`` is unset or not a positive integer, or when
    ``$WATCHDOG_PID`` is set and names another process (the watchdog is meant for a
    different process of the service).
    """
    pid = os.environ.get("WATCHDOG_PID")
    if pid is not None:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            log.debug("WATCHDOG_PID=%r is not a pid, ignoring the watchdog", pid)
            return None
    usec = os.environ.get("WATCHDOG_USEC")
    if usec is None:
        return None
    try:
        value = int(usec)
    except ValueError:
        log.debug("WATCHDOG_USEC=%r is not an integer, ignoring the watchdog", usec)
        return None
    if value <= 0:
        return None
    return value / 1_000_000 / 2


async def serve_watchdog(interval: float, *, task_status=trio.TASK_STATUS_IGNORED) -> NoReturn:
    """Send ``WATCHDOG=1`` now and then every ``interval`` seconds, until cancelled."""
    if not interval > 0:
        raise ValueError(f"watchdog interval must be positive, got {interval!r}")
    task_status.started()
    while True:
        notify("WATCHDOG=1")
        await trio.sleep(interval)


def listen_fds(*, unset_environment: bool = True) -> dict[str, list[socket.socket]]:
    """The sockets passed by socket activation, grouped by their ``FileDescriptorName=``.

    Active only when ``$LISTEN_PID`` is this process and ``$LISTEN_FDS`` is a positive
    count: fds 3 .. 3+n-1 are wrapped as ``socket.socket`` (family and type read from the
    fd) and made non-inheritable, so they do not leak into child processes. Names come
    from ``$LISTEN_FDNAMES`` (colon separated); a missing or empty name is ``"unknown"``,
    as in libsystemd. A passed fd that is not a socket (``ListenFIFO=`` and friends) is
    skipped with a warning. Returns ``{}`` when not activated.

    With ``unset_environment`` the three variables are removed in every case, as
    sd_listen_fds(3) does, so that they are not passed on to child processes, which
    would otherwise see a stale fd count.
    """
    pid, count, names = (os.environ.get(var) for var in _LISTEN_VARS)
    if unset_environment:
        for var in _LISTEN_VARS:
            os.environ.pop(var, None)
    if pid is None or count is None:
        return {}
    try:
        if int(pid) != os.getpid():
            return {}
        n = int(count)
    except ValueError:
        log.warning("ignoring socket activation: LISTEN_PID=%r LISTEN_FDS=%r", pid, count)
        return {}
    if n <= 0:
        return {}
    labels = names.split(":") if names else []
    if len(labels) > n:
        log.warning("LISTEN_FDNAMES has %d names for %d fds; extra names ignored", len(labels), n)
    out: dict[str, list[socket.socket]] = {}
    for i in range(n):
        fd = SD_LISTEN_FDS_START + i
        name = (labels[i] if i < len(labels) else "") or "unknown"
        try:
            os.set_inheritable(fd, False)
            sock = socket.socket(fileno=fd)
        except OSError as exc:  # ENOTSOCK: a FIFO or special file; EBADF: not passed at all
            log.warning("passed fd %d (%s) is not a usable socket: %s", fd, name, exc)
            continue
        out.setdefault(name, []).append(sock)
    return out
