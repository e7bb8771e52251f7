"""``memvidd put --events``: JSON lines from stdin to the daemon's event socket.

The event socket (docs/protocol.md) takes one JSON object per line and acknowledges each
once it is durable. This is the way to feed it from a shell on a bare machine (no socat,
no socket path to spell out): the socket is the one of the configuration every command
finds (``cli_config``); stdin is sent as it comes while the acknowledgements are printed
as they arrive (one JSON line each), so a producer as long as a log never waits on them.
Exit status 1 when any line was refused.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import threading

from . import cli_config, config
from .peer import check_server


def events_socket(args: argparse.Namespace) -> str:
    return config.expand(cli_config.configured(args).daemon.events_socket)


def send_events(path: str, source: int) -> int:
    """Send what file descriptor ``source`` reads to the event socket at ``path``; print
    each acknowledgement.
    Returns the exit status: 0 if every event was stored, 1 if any was refused."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise SystemExit(f"memvidd: no daemon event socket at {path} (start one with `memvidd run`)") from None
        check_server(sock, path)
        failed: list[BaseException] = []

        def send() -> None:
            try:
                # A first newline: the daemon reads JSON lines whatever the first event
                # looks like (a blank line is no event).
                sock.sendall(b"\n")
                while chunk := os.read(source, 65536):  # what is there now: a live producer's lines go at once
                    sock.sendall(chunk)
            except OSError as e:  # the daemon hung up: its last lines say why
                failed.append(e)
            finally:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send, name="memvidd-events-send", daemon=True)
        sender.start()
        refused = 0
        with sock.makefile("rb") as acks:
            for line in acks:
                sys.stdout.write(line.decode("utf-8", errors="replace"))
                sys.stdout.flush()
                with contextlib.suppress(ValueError):
                    refused += not json.loads(line).get("ok", False)
        sender.join()
        if failed:
            print(f"memvidd: the daemon stopped reading: {failed[0]}", file=sys.stderr)
            return 1
        return 1 if refused else 0
    finally:
        sock.close()


def cmd_put_events(args: argparse.Namespace) -> int:
    if args.capsule or args.text is not None or args.file:
        raise SystemExit("memvidd: put --events reads JSON lines from stdin for the daemon's event socket; "
                         "it takes no TEXT, --file or --capsule")
    return send_events(events_socket(args), sys.stdin.fileno())
