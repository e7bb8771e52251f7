"""Rendering for people: search hits, a capsule's summary, the stages of its work.

Programs read ``--json``; everything here may change shape. On a terminal, matched terms
and places are set off with ANSI bold and colour (hand-written: a find must start fast,
and a terminal library costs more to import than the whole command); elsewhere (a pipe,
a file, ``NO_COLOR``, ``TERM=dumb``) the output has no escape codes, and matched terms are
in ``[brackets]`` so that they stay visible in a pager or a log.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence
from typing import IO, TYPE_CHECKING, Any

from .protocol import CapsuleStats, HitOut

if TYPE_CHECKING:
    from .readiness import Stage

# A find's list stops at the first hit whose relevance is below this: it scores less than
# half the best hit (in hybrid mode, found by only one of the two searches where the best
# was found by both).
CUT = 50
_SPACE = re.compile(r"\s+")


class Style:
    """How to set text off: ANSI codes on a terminal, plain text elsewhere."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        stream = stream or sys.stdout
        env = os.environ
        self.ansi = stream.isatty() and not env.get("NO_COLOR") and env.get("TERM") != "dumb"

    def _sgr(self, code: str, text: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.ansi and text else text

    def match(self, text: str) -> str:
        return self._sgr("1;31", text) if self.ansi else f"[{text}]"

    def place(self, text: str) -> str:
        return self._sgr("35", text)

    def bold(self, text: str) -> str:
        return self._sgr("1", text)

    def dim(self, text: str) -> str:
        return self._sgr("2", text)


# -- find -------------------------------------------------------------------------------------


def relevance(hits: Sequence[HitOut]) -> list[int]:
    """Each hit's score as 0-100 of the best hit's (whatever the mode's own scale: BM25,
    cosine similarity, or rank fusion, whose raw scores mean nothing to a reader)."""
    best = max((h.score for h in hits), default=0.0)
    if best <= 0:
        return [100] * len(hits)
    return [max(0, min(100, round(100 * h.score / best))) for h in hits]


def kept(scores: list[int], show_all: bool = False) -> int:
    """How many hits to show: up to the first one below ``CUT`` (at least the best)."""
    if show_all:
        return len(scores)
    return next((max(i, 1) for i, r in enumerate(scores) if r < CUT), len(scores))


def place(h: HitOut) -> str:
    """``path:first-last`` for a file's chunk (the path relative to the current directory
    when it is below it), the URI for another frame, ``#id`` for a frame without one; for a
    document's chunk, its page, slide, or sheet and rows instead of lines (``path p.3``)."""
    where = h.location()
    if h.path is None:
        base = h.uri or f"#{h.frame_id}"
        return f"{base} {where}" if where else base
    path = h.path
    cwd = os.getcwd().rstrip("/") + "/"
    if path.startswith(cwd):
        path = path[len(cwd):]
    if where:
        return f"{path} {where}"
    if h.lines is None:
        return path
    first, last = h.lines
    return f"{path}:{first}" if first == last else f"{path}:{first}-{last}"


def snippet(h: HitOut, style: Style) -> str:
    """The snippet on one line, its matched terms set off."""
    text, out, at = h.snippet, [], 0
    for start, end in sorted(h.highlights):
        if start < at or end <= start:
            continue  # overlapping or empty spans: the first one wins
        out += [text[at:start], style.match(text[start:end])]
        at = end
    out.append(text[at:])
    return _SPACE.sub(" ", "".join(out)).strip()


def print_hits(hits: Sequence[HitOut], mode: str, *, show_all: bool = False, out: IO[str] | None = None) -> None:
    out = out or sys.stdout
    style = Style(out)
    if not hits:
        print(f"no results ({mode})", file=out)
        return
    scores = relevance(hits)
    n = kept(scores, show_all)
    for h, score in zip(hits[:n], scores, strict=False):
        title = h.title or ""
        if h.path is not None:  # code chunks are titled "name.py: def f(...)", shown after the path
            base = os.path.basename(h.path)
            title = "" if title == base else title.removeprefix(f"{base}: ")
        where = place(h)
        head = f"{score:>3}  {style.place(where)}" + (f"  {style.bold(title)}" if title else "")
        frame_id = "" if where == f"#{h.frame_id}" else "  " + style.dim(f"#{h.frame_id}")  # not twice
        stale = "  " + style.bold("(the file changed on disk since it was indexed)") if h.stale is True else ""
        print(f"{head}{frame_id}{stale}", file=out)
        if h.snippet:
            print("     " + snippet(h, style), file=out)
    if n < len(hits):
        print(style.dim(f"({len(hits) - n} more below {CUT}% of the best hit's relevance: --all shows them)"),
              file=out)


def notes(warnings: Sequence[str]) -> None:
    """What a reply warns of, once each, where a person sees it and a pipe does not get it."""
    for w in dict.fromkeys(warnings):
        print(f"note: {w}", file=sys.stderr)


# -- stats and progress -----------------------------------------------------------------------


def size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def duration(s: float | None) -> str:
    if s is None:
        return "time left unknown yet"
    s = max(0, round(s))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def stage_text(st: Stage) -> str:
    """One stage, as a line: ``indexing    120/412 files (29%), ~35 s left``."""
    if st.total is None:
        text = f"{st.done:,} {st.unit} so far"
    elif st.eta_s == 0 and st.done >= st.total:
        text = f"done: {st.total:,} {st.unit}"
    else:
        share = f" ({st.done / st.total:.0%})" if st.total else ""
        left = f", ~{duration(st.eta_s)} left" if st.eta_s is not None else f", {duration(None)}"
        text = f"{st.done:,}/{st.total:,} {st.unit}{share}" + ("" if st.note else left)
    return f"{text}; {st.note}" if st.note else text


def ready_text(s: CapsuleStats) -> str:
    if s.ready is True:
        return "yes"
    eta = s.ready_in_s if isinstance(s.ready_in_s, (int, float)) else None
    return f"no: about {duration(eta)} left" if eta is not None else f"no: {duration(None)}"


def print_stats(s: CapsuleStats, out: IO[str] | None = None) -> None:
    """A capsule in about a dozen lines (``stats --json`` has every figure)."""
    from .readiness import stages  # here: a find does not need it

    out = out or sys.stdout
    rows: list[tuple[str, str]] = [("capsule", f"{s.path} (commit {s.commit_seq})")]
    history = [f"{s.superseded_frames:,} older versions" if s.superseded_frames else "",
               f"{s.tombstones:,} removals" if s.tombstones else ""]
    kept_too = " and ".join(h for h in history if h)
    rows.append(("frames", f"{s.live_frames:,} live" + (f"; {kept_too} kept in history" if kept_too else "")))
    dead = s.bytes_by_kind.get("dead", 0)
    disk = f"{size(s.file_bytes)} on disk, {size(s.payload_raw_bytes)} of content before compression"
    if s.file_bytes and dead / s.file_bytes >= 0.1:
        disk += f"; {dead / s.file_bytes:.0%} reclaimable (memvidd compact)"
    rows.append(("size", disk))
    if s.origin:
        rows.append(("branch of", f"{s.origin.get('path', '?')} as of commit {s.origin.get('seq', '?')}"))
    ix: dict[str, Any] | None = s.indexer if isinstance(s.indexer, dict) else None
    if ix is not None:
        watched = ", ".join(ix.get("roots", [])) or "nothing"
        extra = [f"{ix['files_skipped']:,} skipped" if ix.get("files_skipped") else "",
                 f"{ix['files_generated']:,} generated passed over" if ix.get("files_generated") else "",
                 f"{len(ix['missing'])} missing" if ix.get("missing") else ""]
        rows.append(("watching", f"{watched}: {ix.get('documents', 0):,} files"
                     + (f" ({', '.join(e for e in extra if e)})" if any(extra) else "")))
    for st in stages(s):
        rows.append((st.name, stage_text(st)))
    if s.vectors is None:
        rows.append(("vectors", "none: lexical search only (the capsule has no embedding model)"))
    if (s.retention or {}).get("rules"):
        rows.append(("retention", f"rules set (memvidd rules shows them); "
                                  f"{s.retention.get('expired_frames', 0):,} frames expired"))
    rows.append(("ready", ready_text(s)))
    for key, value in rows:
        print(f"{key:<11} {value}", file=out)
