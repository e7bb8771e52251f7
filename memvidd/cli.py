"""The ``memvidd`` command line: one function per subcommand, argparse wiring at the end.

Exit codes: 0 success, 1 the capsule is damaged or the operation failed, 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import engine


def _print_report(report: engine.Report, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
        return
    print(f"{report.path}: {'ok' if report.ok else 'DAMAGED'}")
    for title, lines in (("error", report.errors), ("warning", report.warnings), ("repair", report.repairs)):
        for line in lines:
            print(f"  {title}: {line}")
    if report.error_count > len(report.errors):
        print(f"  ... {report.error_count - len(report.errors)} more errors")
    facts = report.facts
    if "commits" in facts:
        print(f"  {facts['commits']} commits, {facts['frames']} frames, {facts.get('payloads_checked', 0)} payloads checked")


def cmd_verify(args: argparse.Namespace) -> int:
    report = engine.verify(args.file)
    _print_report(report, args.json)
    return 0 if report.ok else 1


def cmd_doctor(args: argparse.Namespace) -> int:
    report = engine.doctor(args.file, dry_run=args.dry_run, reindex=args.reindex)
    _print_report(report, args.json)
    return 0 if report.ok else 1


def cmd_demo(args: argparse.Namespace) -> int:
    """Until the daemon lands: ingest a few source files, then show history and time travel."""
    path = Path(args.capsule)
    if path.exists():
        path.unlink()
    src = sorted(Path(engine.__file__).parent.glob("*.py"))
    with engine.create(path) as cap:
        t0 = time.perf_counter()
        for f in src:
            text = f.read_text()
            cap.put_many(
                {"text": text[i : i + 2000], "uri": f"file://{f}#{i // 2000}", "title": f.name,
                 "tags": {"type": "py"}, "parent": f"file://{f}", "chunk": i // 2000}
                for i in range(0, len(text), 2000)
            )
        first = cap.commit()
        dt = time.perf_counter() - t0
        note = cap.put("memvidd demo: first note", uri="note://demo", kind="note")
        cap.commit()
        cap.put("memvidd demo: the note, edited", uri="note://demo", kind="note")
        last = cap.commit()
        stats = cap.stats()
    print(f"capsule {path}: {stats['frames']} frames, {stats['file_bytes']} bytes "
          f"({stats['payload_raw_bytes']} raw), ingest commit {first} took {dt * 1000:.1f} ms")
    with engine.open(path, readonly=True) as cap:
        print(f"now:          {cap.get(uri='note://demo').text!r}")
        print(f"as of {last - 1}:      {cap.get(uri='note://demo', as_of=last - 1).text!r}")
        print(f"frame {note} (v1): valid until commit {cap.get(note).valid_until}")
        for e in cap.timeline(limit=3, reverse=True):
            print(f"timeline: #{e.id} {e.uri} seq={e.commit_seq}")
    _print_report(engine.verify(str(path)), False)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="memvidd", description="Local memory capsules for AI agents.")
    sub = p.add_subparsers(dest="command", required=True)

    v = sub.add_parser("verify", help="check every checksum and invariant of a capsule file")
    v.add_argument("file")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_verify)

    d = sub.add_parser("doctor", help="repair a torn tail or a damaged checkpoint")
    d.add_argument("file")
    d.add_argument("--dry-run", action="store_true", help="report what would be done")
    d.add_argument("--reindex", action="store_true", help="also rebuild the search indexes from the frames")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_doctor)

    m = sub.add_parser("demo", help="build a small capsule and show history and time travel")
    m.add_argument("--capsule", default="demo.mv2")
    m.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result: Any = args.func(args)
    except engine.EngineError as e:
        print(f"memvidd: {e}", file=sys.stderr)
        return 1
    return int(result or 0)
