"""Times as people write them: "yesterday", "last tuesday 17:00", "2 hours ago", an ISO
date, a commit number. One reading for every client: the CLI's ``--as-of``, ``--since``,
``--until``, ``--expires`` (and ``rewind``, ``branch``, ``rules``), the memvid-shaped
API (``sdk.py``) and the MCP tools, which call ``parse_when``.

``parse_when(text)`` reads, in this order:

- a plain integer, ``12``: commit 12 (an ``int``);
- ``@1700000000`` (decimals allowed): that Unix time;
- an ISO date or time (``2026-03-01``, ``2026-03-01 17:00``, ``2026-03-01T17:00+01:00``);
- anything else with dateparser, in English, relative to now: "yesterday" (24 hours ago,
  as git reads it: "yesterday 00:00" is the day's start), "last tuesday 17:00", "2 hours
  ago", "noon", "march 3"; a weekday or a date without a year is the last one past (the
  next one to come for an expiry).

A time without a zone is in the user's timezone (``TZ``, else the system's). Text that
none of these read is a ``WhenError`` naming it, never a silent "no filter".

The parsing is the clients': the wire keeps numbers (docs/protocol.md). dateparser costs
~0.1 s to import and ~0.1 s more to load its English data, so it is imported only for
text that the first three forms do not read: a command given numbers or ISO times starts
as fast as without it.
"""

from __future__ import annotations

import datetime as dt
import re
import time
from typing import Any, Literal

EXAMPLES = "'yesterday', 'last tuesday 17:00', '2 hours ago', '2026-03-01', @UNIX-TIME"
_INTEGER = re.compile(r"[0-9]+")


class WhenError(ValueError):
    """Text that is no time (or, where a time is needed, a commit number)."""


def parse_when(text: str, *, now: float | None = None, prefer: Literal["past", "future"] = "past") -> float | int:
    """Epoch seconds (a float) for a time, or an ``int`` commit sequence for a plain
    integer; ``now`` (epoch seconds) is what relative phrases count from."""
    s = text.strip()
    if _INTEGER.fullmatch(s):
        return int(s)
    if s.startswith("@"):
        try:
            return float(s[1:])
        except ValueError:
            raise WhenError(f"{text!r} is not a Unix time (@ and a number of seconds)") from None
    t: dt.datetime | None
    try:
        t = dt.datetime.fromisoformat(s)
    except ValueError:
        t = _words(s, now, prefer) if s else None
    if t is None:
        raise WhenError(f"cannot read {text!r} as a time (try {EXAMPLES} or a commit number)")
    return (t if t.tzinfo else t.astimezone()).timestamp()  # naive: the local time it says


def _words(s: str, now: float | None, prefer: str) -> dt.datetime | None:
    import dateparser  # here: ~0.2 s, paid only for words

    settings: dict[str, Any] = {"PREFER_DATES_FROM": prefer, "RETURN_AS_TIMEZONE_AWARE": True}
    if now is not None:
        settings["RELATIVE_BASE"] = dt.datetime.fromtimestamp(now)  # naive local, as dateparser counts
    # English only: with every language tried, a phrase that reads as none took 2.8 s.
    return dateparser.parse(s, languages=["en"], settings=settings)


def as_of(value: str | None) -> int | float | None:
    """``--as-of``: a commit (a plain integer) or a time."""
    return None if value is None else parse_when(value)


def since(value: str | None, option: str = "--since") -> float | None:
    """``--since`` / ``--until``: a time. A plain integer is refused: it would be a commit,
    and these filter by time (``--as-of N`` is the state at commit N)."""
    if value is None:
        return None
    t = parse_when(value)
    if isinstance(t, int):
        raise WhenError(f"{option} takes a time ({EXAMPLES}), not commit {t}: --as-of {t} is the state at "
                        f"commit {t}, @{t} the Unix time")
    return t


def expires(value: str | None, *, now: float | None = None) -> float | None:
    """``--expires``: seconds from now (a number), or a time to come ("tomorrow 9:00", "in
    2 hours", an ISO time, @UNIX-TIME)."""
    if value is None:
        return None
    base = time.time() if now is None else now
    try:
        return base + float(value)
    except ValueError:
        return float(parse_when(value, now=base, prefer="future"))
