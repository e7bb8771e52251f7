"""What the command line's option values mean (times, tags, passphrases), and how a command
prints for programs (``--json``): shared by every ``memvidd`` subcommand.

Loads neither the engine nor trio: a command that talks to a daemon stays light.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

import msgspec

from . import timewords

if TYPE_CHECKING:
    import engine


def errors(*known: type[Exception], engine: str = "EngineError") -> tuple[type[Exception], ...]:
    """``known``, and the engine's exception class ``engine`` if a command has imported the
    engine (if none has, none of its exceptions can have been raised). For an ``except``
    clause, which evaluates it when an exception is raised, after the command ran."""
    loaded = sys.modules.get("engine")
    return (*known, getattr(loaded, engine)) if loaded is not None else known


PASSPHRASE_SOURCES = ("env", "file", "credential")


def passphrase(args: argparse.Namespace, prefix: str = "") -> str | None:
    """The passphrase from the ``--{prefix}passphrase-*`` option given (None: none)."""
    sources = {k: v for k in PASSPHRASE_SOURCES
               if (v := getattr(args, f"{prefix}passphrase_{k}", None)) is not None}
    if not sources:
        return None
    import engine

    return engine.read_passphrase(**sources)


def open_capsule(path: str, passphrase: str | None, **options: Any) -> engine.Capsule:
    """``engine.open`` for a command: an encrypted capsule opened without a passphrase is
    an error that says how to give one."""
    import engine

    try:
        return engine.open(path, passphrase=passphrase, **options)
    except engine.WrongPassphrase:
        raise
    except engine.InvalidArgument as e:
        if passphrase is None and "encrypted" in str(e):
            raise SystemExit(f"memvidd: {e} (--passphrase-file PATH, --passphrase-env VAR or "
                             "--passphrase-credential NAME)") from None
        raise


def emit(args: argparse.Namespace, obj: Any, human: Any) -> None:
    """Print ``obj`` as one line of JSON with ``--json``; else call ``human()``."""
    if args.json:
        print(msgspec.json.encode(msgspec.to_builtins(obj)).decode())
    else:
        human()


def as_of(value: str | None) -> int | float | None:
    """``--as-of 12`` is commit 12; "yesterday", "2 hours ago", ``@1700000000`` or an ISO
    time is a point in time (``timewords``)."""
    return timewords.as_of(value)


def when(value: str | None, option: str = "--since") -> float | None:
    """``--since`` / ``--until``: a time in words or numbers; a bare integer is refused
    (it would read as a commit: ``--as-of N``), naming ``option``."""
    return timewords.since(value, option)


def tags(pairs: list[str] | None) -> dict[str, str] | None:
    if not pairs:
        return None
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"memvidd: --tag wants key=value, got {pair!r}")
        out[key] = value
    return out


def expires(value: str | None) -> float | None:
    """``--expires 3600`` is an hour from now; "tomorrow 9:00", ``@1700000000`` or an ISO
    time is a time."""
    return timewords.expires(value)
