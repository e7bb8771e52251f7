"""``memvidd session start|stop NAME`` and ``memvidd replay NAME``: recording an agent's
session and running its finds again (memvidd/sessions.py)."""

from __future__ import annotations

import argparse
import datetime as dt
import sys

from . import cli_args, sessions
from .cli_config import connect


def cmd_session(args: argparse.Namespace) -> int:
    with connect(args) as c:
        if "session" not in c.server.features:
            raise SystemExit(f"memvidd: the daemon at {c.path} ({c.server.server}) does not record sessions")
        reply = c.session(args.session_name, args.action, capsule=args.name)

    def human() -> None:
        if args.action == "start":
            print(f"recording session {reply.name}: every find and put on this capsule, until "
                  f"`memvidd session stop {reply.name}`")
        else:
            print(f"session {reply.name} stopped: {reply.events} finds and puts recorded "
                  f"(`memvidd replay {reply.name}` runs its finds again)")

    cli_args.emit(args, reply, human)
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    with connect(args) as c:
        try:
            report = sessions.replay(c, args.session_name, capsule=args.name, as_of=cli_args.as_of(args.as_of),
                                     mode=args.mode, k=args.k)
        except LookupError as e:
            print(f"memvidd: {e.args[0]}", file=sys.stderr)
            return 1

    def human() -> None:
        span = ""
        if report.started is not None:
            span = f", recorded {dt.datetime.fromtimestamp(report.started).isoformat(timespec='seconds')}"
        print(f"session {report.session}: {report.finds} finds, {report.puts} puts{span}; "
              f"{report.changed} of {report.finds} finds answer differently now")
        for q in report.queries:
            where = f"commit {q.recorded_seq} -> {q.replayed_seq}"
            if q.recorded_mode != q.replayed_mode:
                where += f", {q.recorded_mode} -> {q.replayed_mode}"
            if q.same:
                print(f"  =  {q.query!r}: the same {q.hits} hits ({where})")
                continue
            print(f"  != {q.query!r} ({where}): {len(q.gained)} gained, {len(q.lost)} lost, {len(q.moved)} moved")
            for hit in q.gained:
                print(f"       + {hit}")
            for hit in q.lost:
                print(f"       - {hit}")
            for hit, then, now in q.moved:
                print(f"       ~ {hit}: rank {then} -> {now}")

    cli_args.emit(args, report, human)
    return 0
