"""``memvidd status``: is a daemon running, what does it serve, and how far is its work."""

from __future__ import annotations

import argparse

import msgspec

from .cli_args import emit
from .cli_config import connect


def cmd_status(args: argparse.Namespace) -> int:
    with connect(args) as c:
        caps = c.capsules()
        out = {"socket": c.path, "server": c.server.server, "protocol": c.server.version,
               "capsules": [msgspec.to_builtins(x) for x in caps]}

        def human() -> None:
            print(f"{c.server.server} at {c.path} (protocol {c.server.version})")
            for x in caps:
                default = " (default)" if x.default else ""
                print(f"  {x.name}{default}: {x.frames} frames, commit {x.commit_seq}, {x.path}")

        emit(args, out, human)
    return 0
