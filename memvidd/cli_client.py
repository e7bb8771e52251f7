"""``memvidd`` commands on a capsule's content: ``put``, ``find``, ``get``, ``timeline``,
``tail``, ``stats``, and its life: ``compact``, ``rewind``, ``rules``.

Each talks to a running daemon (``--socket``, else the configured one: ``cli_config``), or
with ``--capsule FILE`` works on the file directly, without a daemon: reads open it
read-only; writes need the file not to be held by a daemon. Talking to a daemon loads
only the client, the protocol and what the command prints; the engine (numpy, tantivy,
usearch, ...) is imported by ``--capsule``, when the command runs.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from . import cli_args, cli_output
from . import protocol as p
from .cli_config import connect
from .client import RemoteError

if TYPE_CHECKING:
    import engine


def _direct(args: argparse.Namespace, *, write: bool = False) -> engine.Capsule:
    """The ``--capsule FILE`` of a client command, opened (read-only unless ``write``)."""
    import engine

    embedder = engine.Embedder() if getattr(args, "mode", None) in ("vec", "hybrid") else None
    try:
        return cli_args.open_capsule(args.capsule, cli_args.passphrase(args), readonly=not write, embedder=embedder)
    except engine.CapsuleLocked as e:
        raise SystemExit(f"memvidd: {e}: a daemon holds it; talk to it with --socket") from None


def _frame_text(f: Any) -> str:
    text = getattr(f, "text", None)
    if text is None and getattr(f, "payload", None) is not None:
        text = f.payload.decode("utf-8", errors="replace") if f.is_text else f"<{len(f.payload)} bytes>"
    return text if text is not None else f"<{f.length} bytes>"


def cmd_put(args: argparse.Namespace) -> int:
    if args.events:
        from .cli_events import cmd_put_events

        return cmd_put_events(args)
    if args.file:
        raw = Path(args.file).read_bytes()
        data: str | bytes = raw  # as bytes, unless it is UTF-8 text
        with contextlib.suppress(UnicodeDecodeError):
            data = raw.decode("utf-8")
    elif args.text == "-":
        data = sys.stdin.read()
    elif args.text is not None:
        data = args.text
    else:
        raise SystemExit("memvidd: put needs TEXT, '-' for stdin, or --file")
    meta = {k: v for k, v in dict(uri=args.uri, title=args.title, kind=args.kind, tags=cli_args.tags(args.tag),
                                  expires=cli_args.expires(args.expires)).items() if v is not None}
    if args.file and _is_document(args.file):
        return _put_document(args, raw, meta)
    if args.capsule:
        with _writable(args) as cap:
            fid = cap.put(data, **meta)
            seq = cap.commit()
    else:
        with connect(args) as c:
            reply = c._call(c._put(data, capsule=args.name, **meta))
            fid, seq = reply.frame_ids[0], reply.seq
            if args.wait:  # read your writes: a `find` run after this one finds it, by meaning too
                c.searchable(seq, capsule=args.name)
    cli_args.emit(args, {"frame_id": fid, "seq": seq}, lambda: print(f"frame {fid} (commit {seq})"))
    return 0


def _writable(args: argparse.Namespace) -> engine.Capsule:
    """The ``--capsule FILE`` of a put, opened for writing; created if it does not exist."""
    if os.path.exists(args.capsule):
        return _direct(args, write=True)
    import engine

    return engine.create(args.capsule, model=None, passphrase=cli_args.passphrase(args))


def _is_document(name: str) -> bool:
    from .chunker import is_document  # here: a daemon command does not pay for the chunker's import

    return is_document(name)


def _put_document(args: argparse.Namespace, raw: bytes, meta: dict[str, Any]) -> int:
    """A PDF, office or HTML file: its text, a frame per chunk, each saying where it is."""
    from .documents import Unreadable, put_items

    try:
        items = put_items(args.file, raw, **meta)
    except Unreadable as e:
        raise SystemExit(f"memvidd: {args.file}: {e}") from None
    if args.capsule:
        with _writable(args) as cap:
            fids = cap.put_many(items)
            seq = cap.commit()
    else:
        fids, seq = [], 0
        with connect(args) as c:
            for i in range(0, len(items), 64):  # a message each, well under max-frame-bytes
                reply = c._call(c._put_many(items[i : i + 64], args.name))
                fids, seq = fids + reply.frame_ids, reply.seq
            if args.wait:
                c.searchable(seq, capsule=args.name)
    cli_args.emit(args, {"frame_id": fids[0], "frame_ids": fids, "seq": seq},
                  lambda: print(f"frames {fids[0]}-{fids[-1]} (commit {seq}): {len(fids)} chunks of {args.file}"))
    return 0


def cmd_find(args: argparse.Namespace) -> int:
    kw = dict(k=args.k, mode=args.mode, scope=args.scope, tags=cli_args.tags(args.tag), kind=args.kind,
              since=cli_args.when(args.since), until=cli_args.when(args.until, "--until"),
              as_of=cli_args.as_of(args.as_of))
    if args.capsule:
        from .replies import find_reply

        with _direct(args) as cap:
            if kw["mode"] == "auto" and cap.model is not None:
                kw["mode"] = "lex"  # no model loaded for a one-shot read: say --mode hybrid for it
            reply = find_reply(0, cap, None, args.query, kw)
    else:
        with connect(args) as c:
            if args.wait or args.min_seq is not None:  # read your writes (see --help)
                kw.update(min_seq=c.flush(capsule=args.name) if args.min_seq is None else args.min_seq,
                          semantic=args.mode != "lex")
            reply = c.find_reply(args.query, capsule=args.name, **kw)
    if args.json:  # the reply as it came, every hit (no cut), the empty fields too
        out = {k: v for k, v in msgspec.structs.asdict(reply).items() if k != "id"}
        print(msgspec.json.encode(out).decode())
        return 0
    cli_output.print_hits(reply.hits, reply.mode, show_all=args.all)
    cli_output.notes(reply.warnings)
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    if (args.id is None) == (args.uri is None):
        raise SystemExit("memvidd: get needs a frame ID or --uri")
    if args.capsule:
        with _direct(args) as cap:
            f = cap.get(args.id, uri=args.uri, as_of=cli_args.as_of(args.as_of))
            out = {**msgspec.to_builtins(msgspec.structs.replace(f, payload=b"")), "text": _frame_text(f)}
            out.pop("payload", None)
    else:
        with connect(args) as c:
            frame = c.get(args.id, uri=args.uri, as_of=cli_args.as_of(args.as_of), capsule=args.name)
            out = msgspec.to_builtins(frame)
    cli_args.emit(args, out, lambda: print(out.get("text") or f"<{out['length']} bytes>"))
    return 0


def cmd_timeline(args: argparse.Namespace) -> int:
    kw = dict(since=cli_args.when(args.since), until=cli_args.when(args.until, "--until"), limit=args.limit,
              reverse=args.reverse, as_of=cli_args.as_of(args.as_of))
    if args.capsule:
        with _direct(args) as cap:
            entries = cap.timeline(**kw)
            rows, expired = [msgspec.to_builtins(e) for e in entries], entries.expired
    else:
        with connect(args) as c:
            reply = c.timeline_reply(capsule=args.name, **kw)
            rows, expired = [msgspec.to_builtins(e) for e in reply.entries], reply.expired

    def human() -> None:
        for e in rows:
            when = dt.datetime.fromtimestamp(e["timestamp"]).isoformat(timespec="seconds")
            print(f"{when}  #{e['id']}  {e['uri'] or ''}  {e['title'] or ''}")
        if expired:
            print(f"({expired} expired frames hidden by the retention rules)")

    cli_args.emit(args, rows, human)
    return 0


def cmd_tail(args: argparse.Namespace) -> int:
    args.timeout = None
    with connect(args) as c:
        try:
            for f in c.tail(capsule=args.name, scope=args.scope, kind=args.kind, tags=cli_args.tags(args.tag)):
                if args.json:
                    print(msgspec.json.encode(f).decode(), flush=True)
                else:
                    print(f"#{f.id}  {f.uri or ''}  {(f.text or '')[:120]!r}", flush=True)
        except KeyboardInterrupt:
            pass
        except RemoteError as e:
            print(f"memvidd: {e}", file=sys.stderr)
            return 1
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from .readiness import with_readiness

    if args.capsule:
        with _direct(args) as cap:
            stats = with_readiness(msgspec.convert(cap.stats(), p.CapsuleStats))
    else:
        with connect(args) as c:
            stats = c.stats(capsule=args.name)
        if stats.ready is msgspec.UNSET:  # a daemon from before the flag
            stats = with_readiness(stats)
    cli_args.emit(args, stats, lambda: cli_output.print_stats(stats))
    return 0


# -- the capsule's life: compaction, rewind, retention ----------------------------------------


def cmd_compact(args: argparse.Namespace) -> int:
    report: dict[str, Any] | p.CompactReport  # read alike: a CompactReport reads as its map
    if args.capsule:
        with _direct(args, write=True) as cap:
            if args.codecs:
                before = cap.stats()["file_bytes"]
                done = cap.upgrade_codecs()
                report = {"bytes_before": before, "bytes_after": cap.stats()["file_bytes"], **done}
            else:
                report = cap.compact()
    else:
        with connect(args) as c:
            report = c.compact(codecs_only=args.codecs, capsule=args.name)

    def human() -> None:
        before, after = report["bytes_before"], report["bytes_after"]
        if args.codecs:
            print(f"codecs upgraded: {report['moved']} frames into {report['blocks']} blocks, "
                  f"{report['saved']} bytes saved (reclaimed by the next compaction); "
                  f"file {before} -> {after} bytes" + (" (stopped: puts were arriving)" if report.get("busy") else ""))
        else:
            ckpt = report.get("checkpoint_bytes")
            if after <= before:
                share = f"{before - after} bytes ({(before - after) / before:.0%}) reclaimed"
            else:  # nothing was dead: what grew is the checkpoint that makes opening fast
                share = (f"{after - before} bytes more: nothing was dead, and the new checkpoint "
                         f"({ckpt} bytes) indexes every frame so the capsule opens without replaying its log")
            print(f"compacted: {before} -> {after} bytes, {share}; "
                  f"{report.get('frames', '?')} frames, {report.get('commits', '?')} commits kept")

    cli_args.emit(args, report, human)
    return 0


def cmd_rewind(args: argparse.Namespace) -> int:
    to = cli_args.as_of(args.to)
    if args.capsule:
        with _direct(args, write=True) as cap:
            seq = cap.rewind(to)
    else:
        with connect(args) as c:
            seq = c.rewind(to, capsule=args.name)  # type: ignore[arg-type]
    cli_args.emit(args, {"seq": seq, "to": to}, lambda: print(f"rewound to {args.to}: the head is commit {seq}"))
    return 0


def cmd_rules(args: argparse.Namespace) -> int:
    if args.set is not None and args.as_of is not None:
        print("memvidd: rules --as-of shows past rules; it cannot be combined with --set", file=sys.stderr)
        return 2
    try:
        if args.set is not None:
            new = json.loads(args.set)
            if not isinstance(new, dict):
                raise SystemExit('memvidd: --set wants a JSON object, e.g. \'{"default": {"max_age_s": 86400}}\'')
            if args.capsule:
                with _direct(args, write=True) as cap:
                    seq = cap.set_rules(new, force=args.force)
                    rules = cap.rules()
            else:
                with connect(args) as c:
                    reply = c.set_rules(new, force=args.force, capsule=args.name)
                    rules, seq = reply.rules, reply.seq
        elif args.capsule:
            with _direct(args) as cap:
                seq, rules = cap.seq, cap.rules(as_of=cli_args.as_of(args.as_of))
        else:
            with connect(args) as c:
                reply = c.rules(as_of=cli_args.as_of(args.as_of), capsule=args.name)
                rules, seq = reply.rules, reply.seq
    except cli_args.errors(RemoteError, engine="InvalidArgument") as e:
        if "force" in str(e):
            print(f"memvidd: {e} (rules --set ... --force)", file=sys.stderr)
            return 1
        raise

    def human() -> None:
        print(json.dumps(rules, indent=2) if rules else "no retention rules")
        if args.set is not None:
            print(f"recorded by commit {seq}")

    cli_args.emit(args, {"rules": rules, "seq": seq}, human)
    return 0

