"""The ``memvidd`` command line: one function per subcommand, argparse wiring at the end.

Client commands (status, put, find, get, timeline, tail, stats, reload) talk to a running
daemon over ``--socket`` (default: the socket of ``--config``, ``$MEMVIDD_SOCKET``, then the
configuration every command finds: ``cli_config.py``). With
``--capsule FILE`` they work on the file directly, without a daemon: reads open it
read-only; ``put`` writes it unless a daemon holds it.

Capsule life commands: ``compact`` and ``rewind`` (daemon or ``--capsule FILE``), ``rules``
(retention), ``branch`` (a new capsule of any past state, from the file: works while a
daemon serves it), ``encrypt`` / ``decrypt`` / ``rekey`` (.mv2e capsules).

Passphrases are never arguments: ``--passphrase-env VAR``, ``--passphrase-file PATH`` or
``--passphrase-credential NAME`` (a systemd credential) name where to read one, and
``--new-passphrase-*`` the same for a new passphrase (rekey, an encrypted branch).

Exit codes: 0 success, 1 the capsule is damaged or the operation failed (no daemon,
not found, wrong passphrase, ...), 2 bad usage.

A command talking to a daemon loads only the client, the protocol and what it prints; the
engine (numpy, tantivy, usearch, ...) is imported by the commands that work on a file,
when they run: a ``memvidd find`` then starts about as fast as Python itself.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from . import cli_config, cli_events, timewords
from . import protocol as p
from .cli_config import connect as _client
from .client import RemoteError
from .config import ConfigError
from .upstream_import import register as register_import

if TYPE_CHECKING:
    import engine


def _errors(*known: type[Exception], engine: str = "EngineError") -> tuple[type[Exception], ...]:
    """``known``, and the engine's exception class ``engine`` if a command has imported the
    engine (if none has, none of its exceptions can have been raised). For an ``except``
    clause, which evaluates it when an exception is raised, after the command ran."""
    loaded = sys.modules.get("engine")
    return (*known, getattr(loaded, engine)) if loaded is not None else known


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


PASSPHRASE_SOURCES = ("env", "file", "credential")


def _passphrase(args: argparse.Namespace, prefix: str = "") -> str | None:
    """The passphrase from the ``--{prefix}passphrase-*`` option given (None: none)."""
    sources = {k: v for k in PASSPHRASE_SOURCES
               if (v := getattr(args, f"{prefix}passphrase_{k}", None)) is not None}
    if not sources:
        return None
    import engine

    return engine.read_passphrase(**sources)


def _encrypted_hint(e: engine.InvalidArgument) -> SystemExit:
    return SystemExit(f"memvidd: {e} (--passphrase-file PATH, --passphrase-env VAR or --passphrase-credential NAME)")


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



# -- client commands -------------------------------------------------------------------


def _emit(args: argparse.Namespace, obj: Any, human: Any) -> None:
    if args.json:
        print(msgspec.json.encode(msgspec.to_builtins(obj)).decode())
    else:
        human()


def _as_of(value: str | None) -> int | float | None:
    """``--as-of 12`` is commit 12; "yesterday", "2 hours ago", @1700000000 or an ISO
    time is a point in time (``timewords``)."""
    return timewords.as_of(value)


def _time(value: str | None, option: str = "--since") -> float | None:
    return timewords.since(value, option)


def _tags(pairs: list[str] | None) -> dict[str, str] | None:
    if not pairs:
        return None
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"memvidd: --tag wants key=value, got {pair!r}")
        out[key] = value
    return out


def _direct(args: argparse.Namespace, *, write: bool = False) -> engine.Capsule:
    """The ``--capsule FILE`` of a client command, opened (read-only unless ``write``)."""
    import engine

    embedder = engine.Embedder() if getattr(args, "mode", None) in ("vec", "hybrid") else None
    passphrase = _passphrase(args)
    try:
        return engine.open(args.capsule, readonly=not write, embedder=embedder, passphrase=passphrase)
    except engine.CapsuleLocked as e:
        raise SystemExit(f"memvidd: {e}: a daemon holds it; talk to it with --socket") from None
    except engine.WrongPassphrase:
        raise
    except engine.InvalidArgument as e:
        if passphrase is None and "encrypted" in str(e):
            raise _encrypted_hint(e) from None
        raise


def _new_capsule(args: argparse.Namespace) -> engine.Capsule:
    import engine

    return engine.create(args.capsule, model=None, passphrase=_passphrase(args))


def _expires(value: str | None) -> float | None:
    """``--expires 3600`` is an hour from now; "tomorrow 9:00", @1700000000 or an ISO time is a time."""
    return timewords.expires(value)


def _frame_text(f: Any) -> str:
    text = getattr(f, "text", None)
    if text is None and getattr(f, "payload", None) is not None:
        text = f.payload.decode("utf-8", errors="replace") if f.is_text else f"<{len(f.payload)} bytes>"
    return text if text is not None else f"<{f.length} bytes>"


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as c:
        caps = c.capsules()
        out = {"socket": c.path, "server": c.server.server, "protocol": c.server.version,
               "capsules": [msgspec.to_builtins(x) for x in caps]}

        def human() -> None:
            print(f"{c.server.server} at {c.path} (protocol {c.server.version})")
            for x in caps:
                default = " (default)" if x.default else ""
                print(f"  {x.name}{default}: {x.frames} frames, commit {x.commit_seq}, {x.path}")

        _emit(args, out, human)
    return 0


def cmd_put(args: argparse.Namespace) -> int:
    if args.events:
        return cli_events.cmd_put_events(args)
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
    meta = {k: v for k, v in dict(uri=args.uri, title=args.title, kind=args.kind, tags=_tags(args.tag),
                                  expires=_expires(args.expires)).items() if v is not None}
    if args.file and _is_document(args.file):
        return _put_document(args, raw, meta)
    if args.capsule:
        with _direct(args, write=True) if os.path.exists(args.capsule) else _new_capsule(args) as cap:
            fid = cap.put(data, **meta)
            seq = cap.commit()
    else:
        with _client(args) as c:
            reply = c._call(c._put(data, capsule=args.name, **meta))
            fid, seq = reply.frame_ids[0], reply.seq
            if args.wait:  # read your writes: a `find` run after this one finds it, by meaning too
                c.searchable(seq, capsule=args.name)
    _emit(args, {"frame_id": fid, "seq": seq}, lambda: print(f"frame {fid} (commit {seq})"))
    return 0


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
        with _direct(args, write=True) if os.path.exists(args.capsule) else _new_capsule(args) as cap:
            fids = cap.put_many(items)
            seq = cap.commit()
    else:
        fids, seq = [], 0
        with _client(args) as c:
            for i in range(0, len(items), 64):  # a message each, well under max-frame-bytes
                reply = c._call(c._put_many(items[i : i + 64], args.name))
                fids, seq = fids + reply.frame_ids, reply.seq
            if args.wait:
                c.searchable(seq, capsule=args.name)
    _emit(args, {"frame_id": fids[0], "frame_ids": fids, "seq": seq},
          lambda: print(f"frames {fids[0]}-{fids[-1]} (commit {seq}): {len(fids)} chunks of {args.file}"))
    return 0


def cmd_find(args: argparse.Namespace) -> int:
    kw = dict(k=args.k, mode=args.mode, scope=args.scope, tags=_tags(args.tag), kind=args.kind,
              since=_time(args.since), until=_time(args.until, "--until"), as_of=_as_of(args.as_of))
    if args.capsule:
        with _direct(args) as cap:
            if kw["mode"] == "auto" and cap.stats()["vectors"] is not None:
                kw["mode"] = "lex"  # no model loaded for a one-shot read: say --mode hybrid for it
            found = cap.find(args.query, **kw)
            hits, mode = [p.HitOut.of(h) for h in found], found.mode
    else:
        with _client(args) as c:
            if args.wait or args.min_seq is not None:  # read your writes (see --help)
                kw.update(min_seq=c.flush(capsule=args.name) if args.min_seq is None else args.min_seq,
                          semantic=args.mode != "lex")
            reply = c.find_reply(args.query, capsule=args.name, **kw)
            hits, mode = reply.hits, reply.mode

    def human() -> None:
        if not hits:
            print(f"no results ({mode})")
        for h in hits:
            where = f" {h.location()}" if h.location() else ""  # a document's page, slide, sheet and rows
            print(f"{h.score:.4f}  #{h.frame_id}  {h.uri or ''}{where}  [{'+'.join(h.sources)}]")
            if h.snippet:
                print("    " + h.snippet.replace("\n", " ")[:200])

    _emit(args, {"mode": mode, "hits": hits}, human)
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    if (args.id is None) == (args.uri is None):
        raise SystemExit("memvidd: get needs a frame ID or --uri")
    if args.capsule:
        with _direct(args) as cap:
            f = cap.get(args.id, uri=args.uri, as_of=_as_of(args.as_of))
            out = {**msgspec.to_builtins(msgspec.structs.replace(f, payload=b"")), "text": _frame_text(f)}
            out.pop("payload", None)
    else:
        with _client(args) as c:
            frame = c.get(args.id, uri=args.uri, as_of=_as_of(args.as_of), capsule=args.name)
            out = msgspec.to_builtins(frame)
    _emit(args, out, lambda: print(out.get("text") or f"<{out['length']} bytes>"))
    return 0


def cmd_timeline(args: argparse.Namespace) -> int:
    kw = dict(since=_time(args.since), until=_time(args.until, "--until"), limit=args.limit, reverse=args.reverse,
              as_of=_as_of(args.as_of))
    if args.capsule:
        with _direct(args) as cap:
            entries = cap.timeline(**kw)
            rows, expired = [msgspec.to_builtins(e) for e in entries], entries.expired
    else:
        with _client(args) as c:
            reply = c.timeline_reply(capsule=args.name, **kw)
            rows, expired = [msgspec.to_builtins(e) for e in reply.entries], reply.expired

    def human() -> None:
        for e in rows:
            when = dt.datetime.fromtimestamp(e["timestamp"]).isoformat(timespec="seconds")
            print(f"{when}  #{e['id']}  {e['uri'] or ''}  {e['title'] or ''}")
        if expired:
            print(f"({expired} expired frames hidden by the retention rules)")

    _emit(args, rows, human)
    return 0


def cmd_tail(args: argparse.Namespace) -> int:
    args.timeout = None
    with _client(args) as c:
        try:
            for f in c.tail(capsule=args.name, scope=args.scope, kind=args.kind, tags=_tags(args.tag)):
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
    stats: dict[str, Any] | p.CapsuleStats
    if args.capsule:
        with _direct(args) as cap:
            stats = cap.stats()
    else:
        with _client(args) as c:
            stats = c.stats(capsule=args.name)
    _emit(args, stats, lambda: print(json.dumps(msgspec.to_builtins(stats), indent=2, default=str)))
    return 0


# -- the capsule's life: compaction, rewind, retention, branches, encryption ------------


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
        with _client(args) as c:
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

    _emit(args, report, human)
    return 0


def cmd_rewind(args: argparse.Namespace) -> int:
    to = _as_of(args.to)
    if args.capsule:
        with _direct(args, write=True) as cap:
            seq = cap.rewind(to)
    else:
        with _client(args) as c:
            seq = c.rewind(to, capsule=args.name)  # type: ignore[arg-type]
    _emit(args, {"seq": seq, "to": to}, lambda: print(f"rewound to {args.to}: the head is commit {seq}"))
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
                with _client(args) as c:
                    reply = c.set_rules(new, force=args.force, capsule=args.name)
                    rules, seq = reply.rules, reply.seq
        elif args.capsule:
            with _direct(args) as cap:
                seq, rules = cap.seq, cap.rules(as_of=_as_of(args.as_of))
        else:
            with _client(args) as c:
                reply = c.rules(as_of=_as_of(args.as_of), capsule=args.name)
                rules, seq = reply.rules, reply.seq
    except _errors(RemoteError, engine="InvalidArgument") as e:
        if "force" in str(e):
            print(f"memvidd: {e} (rules --set ... --force)", file=sys.stderr)
            return 1
        raise

    def human() -> None:
        print(json.dumps(rules, indent=2) if rules else "no retention rules")
        if args.set is not None:
            print(f"recorded by commit {seq}")

    _emit(args, {"rules": rules, "seq": seq}, human)
    return 0


def _source(args: argparse.Namespace) -> tuple[str, str | None]:
    """The capsule file a file command works on (``--capsule``, else the configured
    default capsule) and its passphrase (the options, else the configured source)."""
    from . import config as config_mod

    passphrase = _passphrase(args)
    if args.capsule:
        return args.capsule, passphrase
    c = cli_config.configured(args).default_capsule
    if passphrase is None and c.passphrase_sources():
        import engine

        passphrase = engine.read_passphrase(**c.passphrase_sources())
    return config_mod.expand(c.path), passphrase


def _open_file(path: str, passphrase: str | None) -> engine.Capsule:
    """A read-only open (shared with a daemon serving the capsule)."""
    import engine

    try:
        return engine.open(path, readonly=True, passphrase=passphrase)
    except engine.WrongPassphrase:
        raise
    except engine.InvalidArgument as e:
        if passphrase is None and "encrypted" in str(e):
            raise _encrypted_hint(e) from None
        raise


def _branch_report(args: argparse.Namespace, what: str, report: dict[str, Any]) -> None:
    _emit(args, report, lambda: print(f"{what} {report['path']}: as of commit {report['seq']}, "
                                      f"{report.get('frames', '?')} frames, {report.get('commits', '?')} commits"))


def cmd_branch(args: argparse.Namespace) -> int:
    path, passphrase = _source(args)
    new = _passphrase(args, "new_")
    with _open_file(path, passphrase) as cap:
        # A branch of an encrypted capsule stays encrypted (same passphrase unless a new
        # one is given): only `memvidd decrypt` writes plaintext.
        target = new if new is not None else (passphrase if cap.encrypted else None)
        report = cap.branch(args.out, as_of=_as_of(args.as_of), passphrase=target)
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
    given, new = _passphrase(args), _passphrase(args, "new_")
    if given is not None and new is not None:
        print("memvidd: encrypt takes one passphrase (the new capsule's): --passphrase-* or --new-passphrase-*",
              file=sys.stderr)
        return 2
    target = new if new is not None else given
    if target is None:
        return _no_passphrase("encrypt needs the new capsule's passphrase")
    return _convert(args, read=None, write=target, what="encrypted")


def cmd_decrypt(args: argparse.Namespace) -> int:
    passphrase = _passphrase(args)
    if passphrase is None:
        return _no_passphrase("decrypt needs the capsule's passphrase")
    return _convert(args, read=passphrase, write=None, what="decrypted")


def cmd_rekey(args: argparse.Namespace) -> int:
    old, new = _passphrase(args), _passphrase(args, "new_")
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
    _emit(args, {"path": args.file, "rekeyed": True}, lambda: print(f"{args.file}: passphrase changed"))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from . import config as config_mod
    from .daemon import run

    def configure() -> config_mod.Config:
        """The configuration found now (a reload looks again: a file `memvidd init` wrote
        since the start is read), with the command line's options over it."""
        cfg = config_mod.load(config_mod.locate(args.config))
        daemon = cfg.daemon
        if args.socket:
            daemon = msgspec.structs.replace(daemon, socket=args.socket)
        if args.events_socket:
            daemon = msgspec.structs.replace(daemon, events_socket=args.events_socket)
        capsules = list(cfg.capsule)
        if args.capsule:
            capsules[0] = msgspec.structs.replace(capsules[0], path=args.capsule)
        if args.watch:
            capsules[0] = msgspec.structs.replace(capsules[0], watch=[*capsules[0].watch, *args.watch])
        embedding = cfg.embedding if not args.no_embed else msgspec.structs.replace(cfg.embedding, model="none")
        return msgspec.structs.replace(cfg, daemon=daemon, capsule=capsules, embedding=embedding)

    return run(configure(), configure)


CONFIG_HELP = ("configuration file (default: $MEMVIDD_CONFIG, then $XDG_CONFIG_HOME/memvidd/config.toml "
               "if it exists, then the embedded default)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="memvidd", description="Local memory capsules for AI agents.")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run the daemon in the foreground")
    r.add_argument("--config", help=CONFIG_HELP)
    r.add_argument("--capsule", help="path of the default capsule (overrides the config)")
    r.add_argument("--socket", help="agent socket path")
    r.add_argument("--events-socket", help="event socket path")
    r.add_argument("--watch", action="append", metavar="DIR", help="watch DIR into the default capsule")
    r.add_argument("--no-embed", action="store_true", help="lexical search only (no model loaded)")
    r.set_defaults(func=cmd_run)

    def passphrase_options(c: argparse.ArgumentParser, *, new: bool = False, what: str = "the capsule") -> None:
        g = c.add_argument_group(f"passphrase of {what} (encrypted capsules; never a literal argument)")
        x = g.add_mutually_exclusive_group()
        x.add_argument("--passphrase-env", metavar="VAR", help="read it from this environment variable")
        x.add_argument("--passphrase-file", metavar="PATH", help="read it from this file (mode 0600)")
        x.add_argument("--passphrase-credential", metavar="NAME", help="read it from this systemd credential")
        if new:
            n = c.add_argument_group("the new passphrase")
            y = n.add_mutually_exclusive_group()
            y.add_argument("--new-passphrase-env", metavar="VAR")
            y.add_argument("--new-passphrase-file", metavar="PATH")
            y.add_argument("--new-passphrase-credential", metavar="NAME")

    def client_cmd(name: str, help: str, func: Any, *, direct: bool = True) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help)
        c.add_argument("--socket", help="daemon socket (default: that of --config, $MEMVIDD_SOCKET, then the config's)")
        c.add_argument("--config", help=CONFIG_HELP)
        c.add_argument("--name", help="capsule name in the daemon (default: its default capsule)")
        if direct:
            c.add_argument("--capsule", metavar="FILE", help="use this capsule file directly, without a daemon")
            passphrase_options(c, what="the --capsule FILE")
        c.add_argument("--json", action="store_true", help="machine-readable output")
        c.add_argument("--timeout", type=float, default=30.0, help=argparse.SUPPRESS)
        c.set_defaults(func=func)
        return c

    client_cmd("status", "is a daemon running, and what does it serve", cmd_status, direct=False)
    c = client_cmd("put", "store a text (argument, '-' for stdin, or --file)", cmd_put)
    c.add_argument("text", nargs="?")
    c.add_argument("--file", help="a file as it is; a PDF, DOCX, XLSX, PPTX or HTML file: its text, a frame per chunk")
    c.add_argument("--uri")
    c.add_argument("--title")
    c.add_argument("--kind")
    c.add_argument("--tag", action="append", metavar="KEY=VALUE")
    c.add_argument("--expires", metavar="WHEN", help="leave every query then: seconds from now, @unix-time or ISO time")
    c.add_argument("--events", action="store_true", help="send JSON lines from stdin to the event socket")
    c.add_argument("--wait", action="store_true", help="return once the put is searchable, by meaning too")
    c = client_cmd("find", "search (lexical, semantic or hybrid)", cmd_find)
    c.add_argument("query")
    c.add_argument("-k", type=int, default=10)
    c.add_argument("--mode", default="auto", choices=["auto", "lex", "vec", "hybrid"])
    c.add_argument("--scope", help="URI prefix")
    c.add_argument("--tag", action="append", metavar="KEY=VALUE")
    c.add_argument("--kind")
    c.add_argument("--since", help=f"a time: {timewords.EXAMPLES}")
    c.add_argument("--until", help="a time, as --since")
    c.add_argument("--as-of", help="a commit number, or a time as --since")
    c.add_argument("--wait", action="store_true", help="first wait until every write made so far is searchable")
    c.add_argument("--min-seq", type=int, metavar="SEQ", help="first wait until commit SEQ (a put's) is searchable")
    c = client_cmd("get", "one frame, by id or --uri", cmd_get)
    c.add_argument("id", nargs="?", type=int)
    c.add_argument("--uri")
    c.add_argument("--as-of")
    c = client_cmd("timeline", "frames in time order", cmd_timeline)
    c.add_argument("--limit", type=int, default=20)
    c.add_argument("--reverse", action="store_true")
    c.add_argument("--since")
    c.add_argument("--until")
    c.add_argument("--as-of")
    c = client_cmd("tail", "print frames as they are committed", cmd_tail, direct=False)
    c.add_argument("--scope")
    c.add_argument("--kind")
    c.add_argument("--tag", action="append", metavar="KEY=VALUE")
    client_cmd("stats", "capsule statistics", cmd_stats)
    client_cmd("reload", "have the daemon re-read its configuration and apply what changed",
               cli_config.cmd_reload, direct=False)
    i = sub.add_parser("init", help="write the commented default configuration where every command finds it")
    i.add_argument("--config", help="where (default: $MEMVIDD_CONFIG, then $XDG_CONFIG_HOME/memvidd/config.toml)")
    i.set_defaults(func=cli_config.cmd_init)
    c = client_cmd("compact", "rewrite the capsule without its dead bytes (the daemon keeps serving)", cmd_compact)
    c.add_argument("--codecs", action="store_true", help="only upgrade payload codecs (the next compaction reclaims)")
    c.set_defaults(timeout=None)  # as long as it takes
    c = client_cmd("rewind", "make a past state the head again (history kept)", cmd_rewind)
    c.add_argument("to", metavar="TO", help="commit number, @unix-time or ISO time")
    c = client_cmd("rules", "show or set the retention rules", cmd_rules)
    c.add_argument("--set", metavar="JSON",
                   help="new rules, e.g. "
                        '\'{"default": {"max_age_s": 2592000}, "tags": {"kind=log": {"max_versions": 3}}}\'')
    c.add_argument("--force", action="store_true", help="allow rules that expire every live frame")
    c.add_argument("--as-of", help="the rules in force then: commit number, @unix-time or ISO time")

    b = sub.add_parser("branch", help="a new capsule holding the state as of a commit or time (origin recorded)")
    b.add_argument("out", metavar="OUT", help="the new capsule file (must not exist)")
    b.add_argument("--as-of", help="commit number, @unix-time or ISO time (default: now)")
    b.add_argument("--capsule", metavar="FILE", help="the capsule to branch (default: the configured default capsule)")
    b.add_argument("--config", help=CONFIG_HELP)
    passphrase_options(b, new=True, what="the capsule branched")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_branch)

    e = sub.add_parser("encrypt", help="an encrypted copy (.mv2e) of a plain capsule")
    e.add_argument("input", metavar="IN")
    e.add_argument("output", metavar="OUT")
    passphrase_options(e, new=True, what="OUT (either option group)")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_encrypt)

    e = sub.add_parser("decrypt", help="a plain copy of an encrypted capsule")
    e.add_argument("input", metavar="IN")
    e.add_argument("output", metavar="OUT")
    passphrase_options(e, what="IN")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_decrypt)

    e = sub.add_parser("rekey", help="change an encrypted capsule's passphrase (no data re-encrypted)")
    e.add_argument("file")
    passphrase_options(e, new=True, what="FILE (the current one)")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_rekey)

    v = sub.add_parser("verify", help="check every checksum and invariant of a capsule file")
    v.add_argument("capsule", nargs="?", metavar="FILE", help="default: the configured default capsule")
    v.add_argument("--config", help=CONFIG_HELP)
    passphrase_options(v)
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_verify)

    d = sub.add_parser("doctor", help="repair a torn tail or a damaged checkpoint")
    d.add_argument("capsule", nargs="?", metavar="FILE", help="default: the configured default capsule")
    d.add_argument("--config", help=CONFIG_HELP)
    d.add_argument("--dry-run", action="store_true", help="report what would be done")
    d.add_argument("--reindex", action="store_true", help="also rebuild the search indexes from the frames")
    passphrase_options(d)
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_doctor)

    from .mcp_server import add_command  # (the MCP SDK is imported only when the command runs)

    add_command(sub, CONFIG_HELP)
    m = sub.add_parser("demo", help="build a small capsule and show history and time travel")
    m.add_argument("--capsule", default="demo.mv2", help="where to build it (default: demo.mv2)")
    m.add_argument("--replace", action="store_true", help="discard an existing file at --capsule")
    m.set_defaults(func=cmd_demo)
    register_import(sub)  # memvidd import FILE.mv2: a capsule upstream memvid wrote
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result: Any = args.func(args)
    except ConfigError as e:  # names the file and the problem
        print(f"memvidd: {e}", file=sys.stderr)
        return 2
    except _errors(RemoteError, ValueError, OSError) as e:
        print(f"memvidd: {e}", file=sys.stderr)
        return 1
    return int(result or 0)
