"""``memvidd status``: is a daemon running, what does it serve, and how far is its work.

On a terminal it is a live view: a progress bar for each stage of each capsule (scanning
the watched directories, indexing the files, embedding the text), with the daemon's own
ETAs (rates it measured, not guesses of this short-lived client), until every capsule is
ready or Ctrl-C. ``--once``, a pipe or ``--json``: one snapshot, printed, and exit. The
live view draws with ``rich``, imported only then (it costs more to import than the rest of
the command).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import msgspec

from . import protocol as p
from .cli_args import emit
from .cli_config import connect
from .cli_output import duration, ready_text, stage_text
from .client import Client
from .readiness import Stage, stages, with_readiness

Snapshot = list[tuple[p.CapsuleInfo, p.CapsuleStats]]


def snapshot(c: Client) -> Snapshot:
    out = []
    for info in c.capsules():
        s = c.stats(capsule=info.name)
        out.append((info, s if s.ready is not msgspec.UNSET else with_readiness(s)))  # an older daemon: ours
    return out


def header(c: Client) -> str:
    return f"{c.server.server} at {c.path} (protocol {c.server.version})"


def capsule_line(info: p.CapsuleInfo) -> str:
    default = " (default)" if info.default else ""
    return f"  {info.name}{default}: {info.frames:,} frames, commit {info.commit_seq}, {info.path}"


def print_snapshot(c: Client, snap: Snapshot) -> None:
    print(header(c))
    for info, s in snap:
        print(capsule_line(info))
        for st in stages(s):
            print(f"    {st.name:<11} {stage_text(st)}")
        print(f"    {'ready':<11} {ready_text(s)}")


def as_json(c: Client, snap: Snapshot) -> dict[str, Any]:
    return {"socket": c.path, "server": c.server.server, "protocol": c.server.version,
            "capsules": [{**msgspec.to_builtins(info), "ready": s.ready, "ready_in_s": s.ready_in_s,
                          "stages": msgspec.to_builtins(stages(s))} for info, s in snap]}


def cmd_status(args: argparse.Namespace) -> int:
    with connect(args) as c:
        snap = snapshot(c)
        if args.json or args.once or not sys.stdout.isatty():
            emit(args, as_json(c, snap), lambda: print_snapshot(c, snap))
            return 0
        try:
            return live(c, snap, args.interval)
        except KeyboardInterrupt:
            return 0


def live(c: Client, snap: Snapshot, interval: float) -> int:
    """Redraw the stages every ``interval`` seconds until every capsule is ready."""
    try:
        from rich.console import Group
        from rich.live import Live
        from rich.progress import BarColumn, Progress, TaskID, TextColumn
        from rich.text import Text
    except ImportError:
        print("memvidd: the live view needs the 'rich' package (a dependency of memvidd); a snapshot:",
              file=sys.stderr)
        print_snapshot(c, snap)
        return 0
    bars = Progress(TextColumn("    {task.description}"), BarColumn(bar_width=30), TextColumn("{task.fields[count]}"),
                    TextColumn("{task.fields[eta]}"), auto_refresh=False)
    tasks: dict[tuple[str, str], TaskID] = {}

    def eta(st: Stage) -> str:
        if st.note:
            return st.note
        if st.eta_s == 0:
            return "done"
        return f"~{duration(st.eta_s)} left" if st.eta_s is not None else duration(None)

    def view(snap: Snapshot) -> Group:
        lines: list[Any] = [Text(header(c))]
        for info, s in snap:
            for st in stages(s):
                key = (info.name, st.name)
                count = f"{st.done:,}/{st.total:,} {st.unit}" if st.total is not None else f"{st.done:,} {st.unit}"
                if key not in tasks:  # total None: a bar that pulses (a scan counting as it goes)
                    tasks[key] = bars.add_task(f"{info.name} {st.name:<10}", total=None, count="", eta="")
                # (update, not add_task, marks a bar finished: drawn as such)
                bars.update(tasks[key], total=st.total, completed=st.done, count=count, eta=eta(st))
        lines.append(bars)
        lines += [Text(f"  {info.name} ready: {ready_text(s)}") for info, s in snap]
        return Group(*lines)

    with Live(view(snap), refresh_per_second=4) as screen:
        while not all(s.ready is True for _, s in snap):
            time.sleep(interval)
            snap = snapshot(c)
            screen.update(view(snap), refresh=True)
    return 0
