"""``memvidd`` commands on capsule files, with or without a daemon serving them: ``verify``,
``doctor``, ``branch`` (a new capsule of any past state; works while a daemon serves the
file), ``encrypt`` / ``decrypt`` / ``rekey`` (.mv2e capsules) and ``demo``.

A command that names no file works on the configured default capsule (``cli_config``).
The engine is imported when a command runs, never at import.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import cli_args, cli_config

if TYPE_CHECKING:
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
        checked = facts.get("payloads_checked", 0)
        print(f"  {facts['commits']} commits, {facts['frames']} frames, {checked} payloads checked")


def cmd_verify(args: argparse.Namespace) -> int:
    import engine

    path, passphrase = _source(args)
    report = engine.verify(path, passphrase=passphrase)
    _print_report(report, args.json)
    return 0 if report.ok else 1


def cmd_doctor(args: argparse.Namespace) -> int:
    import engine

    path, passphrase = _source(args)
    report = engine.doctor(path, dry_run=args.dry_run, reindex=args.reindex, passphrase=passphrase)
    _print_report(report, args.json)
    return 0 if report.ok else 1


def cmd_demo(args: argparse.Namespace) -> int:
    """Ingest the engine's own source files into a new capsule, then show history and
    time travel. An existing file is never discarded without ``--replace``."""
    import engine

    path = Path(args.capsule)
    if os.path.lexists(path):
        if not args.replace:
            raise SystemExit(f"{path} exists: the demo builds a new capsule. Choose another --capsule, "
                             "or pass --replace to discard it")
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



def _source(args: argparse.Namespace) -> tuple[str, str | None]:
    """The capsule file a file command works on (``--capsule``, else the configured
    default capsule) and its passphrase (the options, else the configured source)."""
    from . import config as config_mod

    passphrase = cli_args.passphrase(args)
    if args.capsule:
        return args.capsule, passphrase
    c = cli_config.configured(args).default_capsule
    if passphrase is None and c.passphrase_sources():
        import engine

        passphrase = engine.read_passphrase(**c.passphrase_sources())
    return config_mod.expand(c.path), passphrase


def _open_file(path: str, passphrase: str | None) -> engine.Capsule:
    """A read-only open (shared with a daemon serving the capsule)."""
    return cli_args.open_capsule(path, passphrase, readonly=True)



def _branch_report(args: argparse.Namespace, what: str, report: dict[str, Any]) -> None:
    cli_args.emit(args, report, lambda: print(f"{what} {report['path']}: as of commit {report['seq']}, "
                                      f"{report.get('frames', '?')} frames, {report.get('commits', '?')} commits"))


def cmd_branch(args: argparse.Namespace) -> int:
    path, passphrase = _source(args)
    new = cli_args.passphrase(args, "new_")
    with _open_file(path, passphrase) as cap:
        # A branch of an encrypted capsule stays encrypted (same passphrase unless a new
        # one is given): only `memvidd decrypt` writes plaintext.
        target = new if new is not None else (passphrase if cap.encrypted else None)
        report = cap.branch(args.out, as_of=cli_args.as_of(args.as_of), passphrase=target)
    _branch_report(args, "branch" + (" (encrypted)" if target is not None else ""), report)
    return 0


def _no_passphrase(what: str) -> int:
    print(f"memvidd: {what}: --passphrase-file PATH, --passphrase-env VAR or --passphrase-credential NAME",
          file=sys.stderr)
    return 2


def _convert(args: argparse.Namespace, *, read: str | None, write: str | None, what: str) -> int:
    """Copy ``args.input`` to ``args.output`` (a branch of its head, no origin) opened with
    passphrase ``read`` and written with ``write``: encrypt and decrypt."""
    import engine

    try:
        cap = engine.open(args.input, readonly=True, passphrase=read)
    except engine.InvalidArgument as e:
        if "encrypted" in str(e):  # "... is encrypted: ..." / "... is not encrypted: ..."
            state = "not encrypted" if read is not None else "encrypted already (memvidd rekey changes its passphrase)"
            raise SystemExit(f"memvidd: {args.input} is {state}") from None
        raise
    with cap:
        report = cap.branch(args.output, passphrase=write, origin=False)
    _branch_report(args, what, report)
    return 0


def cmd_encrypt(args: argparse.Namespace) -> int:
    given, new = cli_args.passphrase(args), cli_args.passphrase(args, "new_")
    if given is not None and new is not None:
        print("memvidd: encrypt takes one passphrase (the new capsule's): --passphrase-* or --new-passphrase-*",
              file=sys.stderr)
        return 2
    target = new if new is not None else given
    if target is None:
        return _no_passphrase("encrypt needs the new capsule's passphrase")
    return _convert(args, read=None, write=target, what="encrypted")


def cmd_decrypt(args: argparse.Namespace) -> int:
    passphrase = cli_args.passphrase(args)
    if passphrase is None:
        return _no_passphrase("decrypt needs the capsule's passphrase")
    return _convert(args, read=passphrase, write=None, what="decrypted")


def cmd_rekey(args: argparse.Namespace) -> int:
    old, new = cli_args.passphrase(args), cli_args.passphrase(args, "new_")
    if old is None or new is None:
        print("memvidd: rekey needs the current passphrase (--passphrase-*) and the new one "
              "(--new-passphrase-*)", file=sys.stderr)
        return 2
    import engine

    try:
        cap = engine.open(args.file, passphrase=old)
    except engine.CapsuleLocked as e:
        raise SystemExit(f"memvidd: {e}: a daemon holds it; stop it, rekey, then point its "
                         "passphrase-* setting at the new passphrase") from None
    with cap:
        cap.rekey(old, new)
    cli_args.emit(args, {"path": args.file, "rekeyed": True}, lambda: print(f"{args.file}: passphrase changed"))
    return 0

