"""The command line's side of the configuration: which file a command reads, which daemon
it talks to, and the commands that manage the file (``init``, ``reload``).

Every command finds the configuration the same way (``config.locate``): ``--config``, else
``$MEMVIDD_CONFIG``, else the user's ``$XDG_CONFIG_HOME/memvidd/config.toml``
(``~/.config/...``), else the embedded default. A client command talks to ``--socket``,
else to the socket of ``--config``, else ``$MEMVIDD_SOCKET``, else to the socket of the
configuration found: the one a daemon started without options serves. A file that exists
and cannot be used is an error naming it and the problem, never a fallback to the default.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import msgspec

from . import config
from .client import Client, default_socket


def configured(args: argparse.Namespace) -> config.Config:
    """The configuration a command uses, checked as a client reads it (``config.load``)."""
    return config.load(config.locate(getattr(args, "config", None)), client=True)


def socket_of(args: argparse.Namespace) -> str:
    if args.socket:
        return str(args.socket)
    if getattr(args, "config", None) is not None:  # an explicit --config beats $MEMVIDD_SOCKET
        return config.expand(configured(args).daemon.socket)
    return default_socket()


def connect(args: argparse.Namespace) -> Client:
    path = socket_of(args)
    try:
        return Client(path, timeout=args.timeout)
    except (FileNotFoundError, ConnectionRefusedError):
        raise SystemExit(f"memvidd: no daemon listening at {path} (start one with `memvidd run`, "
                         "or use --capsule FILE to work on a capsule directly)") from None


def cmd_init(args: argparse.Namespace) -> int:
    """Write the commented default configuration where every command will find it."""
    # Where `locate` looks first, short of an existing file: writing the user's file
    # while $MEMVIDD_CONFIG names another would leave it unread.
    path = Path(args.config or os.environ.get(config.ENV) or config.user_path())
    config.private_dirs(path.parent)
    try:
        # O_EXCL: never over an existing file (or a link), even one made a moment ago.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        print(f"memvidd: {path} exists; not overwriting it (edit it, or remove it first to start "
              "again from the default)", file=sys.stderr)
        return 1
    with os.fdopen(fd, "w") as f:
        os.fchmod(fd, 0o600)  # whatever the umask: capsule paths and passphrase sources are private
        f.write(config.default_text())
    print(f"wrote the default configuration to {path}\n"
          "next:\n"
          f"  watch a directory: in {path}, under [[capsule]], set  watch = [\"~/notes\"]\n"
          "  start the daemon:  memvidd run   (it finds this file; or the systemd user service, "
          "systemd/memvidd.service)\n"
          "  after each edit:   memvidd reload   (the running daemon applies the changes)")
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    """Have the running daemon re-read its configuration; print what changed."""
    with connect(args) as c:
        if "reload" not in c.server.features:
            raise SystemExit(f"memvidd: the daemon at {c.path} ({c.server.server}) reloads on SIGHUP only: "
                             "kill -HUP its pid, or systemctl --user reload memvidd")
        reply = c.reload()
    if args.json:  # every field, empty lists too (the wire leaves them out)
        print(msgspec.json.encode({k: v for k, v in msgspec.structs.asdict(reply).items() if k != "id"}).decode())
    else:
        print(f"reloaded {reply.source}" + ("" if reply.applied or reply.pending or reply.errors
                                             else ": nothing changed"))
        for line in reply.applied:
            print(f"  {line}")
        for line in reply.pending:
            print(f"  not applied: {line}")
        for line in reply.errors:
            print(f"  failed: {line}")
    return 1 if reply.errors else 0
