"""The ``memvidd`` command line: the argument parser, ``run``, and the dispatch to the
commands, which live by concern:

- ``cli_client.py``: a capsule's content (put, find, get, timeline, tail, stats) and life
  (compact, rewind, rules), through a running daemon or directly on ``--capsule FILE``;
- ``cli_status.py``: ``status``, what a daemon serves and how far its indexing is;
- ``cli_files.py``: commands on capsule files (verify, doctor, branch, encrypt, decrypt,
  rekey, demo);
- ``cli_config.py``: which configuration and daemon a command uses; ``init``, ``reload``;
- ``cli_output.py``: rendering for people; ``cli_args.py``: option values, ``--json``.

Client commands talk to a running daemon over ``--socket`` (default: the socket of
``--config``, ``$MEMVIDD_SOCKET``, then the configuration every command finds:
``cli_config.py``). Output is for people by default; ``--json`` prints the reply for
programs, unchanged.

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
import importlib
import sys
from typing import Any

import msgspec

from . import __version__
from .cli_args import errors
from .client import ConnectionLost, RemoteError
from .config import ConfigError
from .protocol import PROTOCOL_VERSION
from .timewords import EXAMPLES


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
TIME_HELP = f"a time in words or numbers: {EXAMPLES}"
AS_OF_HELP = f"a commit number, or {TIME_HELP}"
JSON_HELP = "print for programs: the reply as one line of JSON, every field, nothing cut"
FIND_EPILOG = """\
output: for each hit, its relevance (0-100: its score as a share of the best hit's), its
place (path:first-last for a chunk of a watched file, else the frame's URI), its title
(the enclosing heading, or the def/class it starts with) and its frame id, then a snippet
with the query's terms in bold (in [brackets] when the output is not a terminal, or with
NO_COLOR set). The list stops at the first hit below 50, less than half the best: in
hybrid mode, a hit found by only one of the two searches (words, meaning) where the best
was found by both. --all shows those too; -k bounds the list either way; --json prints
the daemon's reply unchanged (every hit, raw scores, path and lines).
Notes (a partial semantic search, a lowered -k) go to stderr."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="memvidd", description="Local memory capsules for AI agents.")
    p.add_argument("--version", action="version", version=f"memvidd {__version__} (protocol {PROTOCOL_VERSION})",
                   help="print the version and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("run", help="run the daemon in the foreground")
    r.add_argument("--config", help=CONFIG_HELP)
    r.add_argument("--capsule", help="path of the default capsule (overrides the config)")
    r.add_argument("--socket", help="agent socket path (overrides the config)")
    r.add_argument("--events-socket", help="event socket path (overrides the config)")
    r.add_argument("--watch", action="append", metavar="DIR", help="watch DIR into the default capsule (repeatable)")
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
            y.add_argument("--new-passphrase-env", metavar="VAR",
                           help="read the new one from this environment variable")
            y.add_argument("--new-passphrase-file", metavar="PATH", help="read the new one from this file (mode 0600)")
            y.add_argument("--new-passphrase-credential", metavar="NAME",
                           help="read the new one from this systemd credential")

    def client_cmd(name: str, help: str, func: str, *, direct: bool = True, **kw: Any) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help, description=help[:1].upper() + help[1:] + ".", **kw)
        c.add_argument("--socket", help="daemon socket (default: that of --config, $MEMVIDD_SOCKET, then the config's)")
        c.add_argument("--config", help=CONFIG_HELP)
        c.add_argument("--name", help="capsule name in the daemon (default: its default capsule)")
        if direct:
            c.add_argument("--capsule", metavar="FILE", help="use this capsule file directly, without a daemon")
            passphrase_options(c, what="the --capsule FILE")
        c.add_argument("--json", action="store_true", help=JSON_HELP)
        c.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                       help="how long to wait for the daemon's reply (default: 30)")
        c.set_defaults(func=func)
        return c

    c = client_cmd("status", "is a daemon running, what does it serve, and how far is its indexing",
                   "cli_status.cmd_status", direct=False)
    c.add_argument("--once", action="store_true",
                   help="print one snapshot and exit (the default when the output is not a terminal)")
    c.add_argument("--interval", type=float, default=0.5, metavar="SECONDS",
                   help="how often the live view asks the daemon (default: 0.5)")
    c = client_cmd("put", "store a text (argument, '-' for stdin, or --file)", "cli_client.cmd_put")
    c.add_argument("text", nargs="?", help="the text to store ('-': read it from stdin)")
    c.add_argument("--file", help="store this file's content (as text if it is UTF-8, else as bytes); "
                   "a PDF, DOCX, XLSX, PPTX or HTML file: its text, a frame per chunk, each saying where it is")
    c.add_argument("--uri", help="the frame's URI: a put to a URI that has a frame makes a new version of it")
    c.add_argument("--title", help="the frame's title")
    c.add_argument("--kind", help="the frame's kind (e.g. note, log), which find --kind filters on")
    c.add_argument("--tag", action="append", metavar="KEY=VALUE", help="a tag of the frame (repeatable)")
    c.add_argument("--expires", metavar="WHEN", help="leave every query then: seconds from now, "
                   "or a time to come ('tomorrow 9:00', 'in 2 hours', ISO, @unix-time)")
    c.add_argument("--events", action="store_true", help="send JSON lines from stdin to the event socket")
    c.add_argument("--wait", action="store_true", help="return once the put is searchable, by meaning too")
    c = client_cmd("find", "search (lexical, semantic or hybrid)", "cli_client.cmd_find", epilog=FIND_EPILOG,
                   formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("query", help="what to look for: words, a phrase in \"quotes\", or a question")
    c.add_argument("-k", type=int, default=10, metavar="N", help="at most N hits (default: 10)")
    c.add_argument("--all", action="store_true", help="show every hit up to -k, also those far below the best")
    c.add_argument("--mode", default="auto", choices=["auto", "lex", "vec", "hybrid"],
                   help="lex: words; vec: meaning (the embedding model); hybrid: both, fused; "
                        "auto (default): hybrid when the capsule has vectors and a model is loaded, else lex")
    c.add_argument("--scope", metavar="PREFIX", help="only frames whose URI starts with PREFIX (e.g. file:///home/me/notes/)")
    c.add_argument("--tag", action="append", metavar="KEY=VALUE",
                   help="only frames with this tag (repeatable: every one must match)")
    c.add_argument("--kind", help="only frames of this kind (chunk: parts of watched files; note, ...)")
    c.add_argument("--since", metavar="WHEN", help=f"only frames whose event time is at or after WHEN: {TIME_HELP}")
    c.add_argument("--until", metavar="WHEN", help=f"only frames whose event time is at or before WHEN: {TIME_HELP}")
    c.add_argument("--as-of", metavar="WHEN", help=f"search the capsule as it was then: {AS_OF_HELP}")
    c.add_argument("--wait", action="store_true", help="first wait until every write made so far is searchable")
    c.add_argument("--min-seq", type=int, metavar="SEQ", help="first wait until commit SEQ (a put's) is searchable")
    c = client_cmd("get", "one frame, by id or --uri", "cli_client.cmd_get")
    c.add_argument("id", nargs="?", type=int, help="the frame id (as find and timeline show it)")
    c.add_argument("--uri", help="the live frame of this URI instead (the version as of --as-of)")
    c.add_argument("--as-of", metavar="WHEN", help=f"the version visible then: {AS_OF_HELP}")
    c = client_cmd("timeline", "frames in time order", "cli_client.cmd_timeline")
    c.add_argument("--limit", type=int, default=20, metavar="N", help="at most N frames (default: 20)")
    c.add_argument("--reverse", action="store_true", help="newest first")
    c.add_argument("--since", metavar="WHEN", help=f"from this time on: {TIME_HELP}")
    c.add_argument("--until", metavar="WHEN", help=f"up to this time: {TIME_HELP}")
    c.add_argument("--as-of", metavar="WHEN", help=f"the frames as the capsule had them then: {AS_OF_HELP}")
    c = client_cmd("tail", "print frames as they are committed", "cli_client.cmd_tail", direct=False)
    c.add_argument("--scope", metavar="PREFIX", help="only frames whose URI starts with PREFIX")
    c.add_argument("--kind", help="only frames of this kind")
    c.add_argument("--tag", action="append", metavar="KEY=VALUE", help="only frames with this tag (repeatable)")
    client_cmd("stats", "a capsule's summary: size, frames, indexing, vectors, ready or not (--json: every figure)",
               "cli_client.cmd_stats")
    client_cmd("reload", "have the daemon re-read its configuration and apply what changed",
               "cli_config.cmd_reload", direct=False)
    c = client_cmd("session", "record an agent session: every find and put on the capsule, to replay later",
                   "cli_session.cmd_session", direct=False)
    c.add_argument("action", choices=["start", "stop"], help="start or stop recording")
    c.add_argument("session_name", metavar="NAME", help="the session's name (no '/')")
    c = client_cmd("replay", "run a recorded session's finds again and show what changed", "cli_session.cmd_replay",
                   direct=False)
    c.add_argument("session_name", metavar="NAME", help="the session to replay")
    c.add_argument("--as-of", metavar="WHEN", help=f"against the capsule as it was then (default: now): {AS_OF_HELP}")
    c.add_argument("--mode", choices=["auto", "lex", "vec", "hybrid"], help="rank this way instead of as recorded")
    c.add_argument("-k", type=int, metavar="N", help="ask for N hits instead of as recorded")
    i = sub.add_parser("init", help="write the commented default configuration where every command finds it")
    i.add_argument("--config", help="where (default: $MEMVIDD_CONFIG, then $XDG_CONFIG_HOME/memvidd/config.toml)")
    i.set_defaults(func="cli_config.cmd_init")
    c = client_cmd("compact", "rewrite the capsule without its dead bytes (the daemon keeps serving)",
                   "cli_client.cmd_compact")
    c.add_argument("--codecs", action="store_true", help="only upgrade payload codecs (the next compaction reclaims)")
    c.set_defaults(timeout=None)  # as long as it takes
    c = client_cmd("rewind", "make a past state the head again (history kept)", "cli_client.cmd_rewind")
    c.add_argument("to", metavar="TO", help=AS_OF_HELP)
    c = client_cmd("rules", "show or set the retention rules", "cli_client.cmd_rules")
    c.add_argument("--set", metavar="JSON",
                   help="new rules, e.g. "
                        '\'{"default": {"max_age_s": 2592000}, "tags": {"kind=log": {"max_versions": 3}}}\'')
    c.add_argument("--force", action="store_true", help="allow rules that expire every live frame")
    c.add_argument("--as-of", metavar="WHEN", help=f"the rules in force then: {AS_OF_HELP}")

    b = sub.add_parser("branch", help="a new capsule holding the state as of a commit or time (origin recorded)")
    b.add_argument("out", metavar="OUT", help="the new capsule file (must not exist)")
    b.add_argument("--as-of", metavar="WHEN", help=f"{AS_OF_HELP} (default: now)")
    b.add_argument("--capsule", metavar="FILE", help="the capsule to branch (default: the configured default capsule)")
    b.add_argument("--config", help=CONFIG_HELP)
    passphrase_options(b, new=True, what="the capsule branched")
    b.add_argument("--json", action="store_true", help=JSON_HELP)
    b.set_defaults(func="cli_files.cmd_branch")

    e = sub.add_parser("encrypt", help="an encrypted copy (.mv2e) of a plain capsule")
    e.add_argument("input", metavar="IN", help="the plain capsule (left as it is)")
    e.add_argument("output", metavar="OUT", help="the encrypted copy to write (must not exist)")
    passphrase_options(e, new=True, what="OUT (either option group)")
    e.add_argument("--json", action="store_true", help=JSON_HELP)
    e.set_defaults(func="cli_files.cmd_encrypt")

    e = sub.add_parser("decrypt", help="a plain copy of an encrypted capsule")
    e.add_argument("input", metavar="IN", help="the encrypted capsule (left as it is)")
    e.add_argument("output", metavar="OUT", help="the plain copy to write (must not exist)")
    passphrase_options(e, what="IN")
    e.add_argument("--json", action="store_true", help=JSON_HELP)
    e.set_defaults(func="cli_files.cmd_decrypt")

    e = sub.add_parser("rekey", help="change an encrypted capsule's passphrase (no data re-encrypted)")
    e.add_argument("file", metavar="FILE", help="the encrypted capsule (not served by a running daemon)")
    passphrase_options(e, new=True, what="FILE (the current one)")
    e.add_argument("--json", action="store_true", help=JSON_HELP)
    e.set_defaults(func="cli_files.cmd_rekey")

    v = sub.add_parser("verify", help="check every checksum and invariant of a capsule file")
    v.add_argument("capsule", nargs="?", metavar="FILE", help="default: the configured default capsule")
    v.add_argument("--config", help=CONFIG_HELP)
    passphrase_options(v)
    v.add_argument("--json", action="store_true", help=JSON_HELP)
    v.set_defaults(func="cli_files.cmd_verify")

    d = sub.add_parser("doctor", help="repair a torn tail or a damaged checkpoint")
    d.add_argument("capsule", nargs="?", metavar="FILE", help="default: the configured default capsule")
    d.add_argument("--config", help=CONFIG_HELP)
    d.add_argument("--dry-run", action="store_true", help="report what would be done")
    d.add_argument("--reindex", action="store_true", help="also rebuild the search indexes from the frames")
    passphrase_options(d)
    d.add_argument("--json", action="store_true", help=JSON_HELP)
    d.set_defaults(func="cli_files.cmd_doctor")

    m = sub.add_parser("mcp", help="serve the daemon's memory to an MCP client (an agent) on stdin/stdout")
    m.add_argument("--socket", help="daemon socket (default: that of --config, $MEMVIDD_SOCKET, then the config's)")
    m.add_argument("--config", help=CONFIG_HELP)
    m.add_argument("--name", help="capsule name in the daemon (default: its default capsule)")
    m.set_defaults(func="mcp_server.cmd_mcp")  # (the MCP SDK is imported only when the command runs)

    m = sub.add_parser("demo", help="build a small capsule and show history and time travel")
    m.add_argument("--capsule", default="demo.mv2", help="where to build it (default: demo.mv2)")
    m.add_argument("--replace", action="store_true", help="discard an existing file at --capsule")
    m.set_defaults(func="cli_files.cmd_demo")

    c = sub.add_parser("import", help="import a capsule written by upstream memvid (memvid-sdk, memvid-cli)")
    c.add_argument("file", metavar="FILE.mv2", help="the upstream capsule (read only)")
    c.add_argument("--into", metavar="CAPSULE",
                   help="the memvidd capsule to write (default: a new FILE.memvidd.mv2); through the daemon "
                        "when the configured daemon serves it")
    c.add_argument("--socket", help="the daemon to ask first (default: $MEMVIDD_SOCKET, then the config's)")
    c.add_argument("--json", action="store_true", help="machine-readable report")
    c.set_defaults(func="upstream_import.cmd_import")
    return p


def command(func: Any) -> Any:
    """A command's function: ``"module.function"`` is imported when it runs, so that a
    command loads only its own module (a find starts faster without the others)."""
    if not isinstance(func, str):
        return func
    module, _, name = func.rpartition(".")
    return getattr(importlib.import_module(f"{__package__}.{module}"), name)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result: Any = command(args.func)(args)
    except ConfigError as e:  # names the file and the problem
        print(f"memvidd: {e}", file=sys.stderr)
        return 2
    except errors(RemoteError, ConnectionLost, ValueError, OSError) as e:  # e.g. a daemon stopped mid-way
        print(f"memvidd: {e}", file=sys.stderr)
        return 1
    return int(result or 0)
