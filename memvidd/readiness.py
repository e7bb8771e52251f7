"""Is a capsule ready, how far is its work, and when will it be done: read from its stats.

A capsule is *ready* when its watched directories are scanned, no file is queued or being
indexed, nothing is staged, and, when it stores vectors, every text frame has its vector
(until then semantic search sees only part of the text). The work has three stages a
person follows (``memvidd status``, ``memvidd stats``): scanning the directories, indexing
the files (lexical search finds a file once it is committed), embedding the text frames.

ETAs are estimates from rates measured lately (files per second over the last half
minute, frames embedded per second of embedding), and ``None`` while a rate cannot be
told yet: never 0 while work remains. Pure functions of ``protocol.CapsuleStats``: the
daemon fills ``ready`` and ``ready_in_s`` with them; ``memvidd stats --capsule`` too.
"""

from __future__ import annotations

import math
from typing import Any

import msgspec

from .protocol import CapsuleStats

BUSY_PHASES = ("starting", "scanning")  # the indexer's phases before its scan is done


class Stage(msgspec.Struct, frozen=True, kw_only=True):
    """One stage of a capsule's work, as a progress bar shows it."""

    name: str  # "scanning", "indexing" or "embedding"
    unit: str  # what is counted: "files" or "frames"
    done: int
    total: int | None  # None: not known yet (a scan counts as it goes)
    eta_s: float | None  # 0: finished; None: cannot be told (yet)
    note: str = ""  # why a stage stands still, or what to know about it


def _indexer(s: CapsuleStats) -> dict[str, Any] | None:
    return s.indexer if isinstance(s.indexer, dict) else None


def stages(s: CapsuleStats) -> list[Stage]:
    """The stages this capsule has: scanning and indexing if it watches directories,
    embedding if it stores vectors."""
    out = []
    ix = _indexer(s)
    if ix is not None:
        scanning = ix["phase"] in BUSY_PHASES
        missing = ", ".join(ix.get("missing", []))
        out.append(Stage(name="scanning", unit="files", done=ix["files_seen"],
                         total=None if scanning else ix["files_seen"], eta_s=None if scanning else 0,
                         note=f"missing (watched once it exists): {missing}" if missing else ""))
        out.append(Stage(name="indexing", unit="files", done=ix["files_indexed"], total=ix["files_to_index"],
                         eta_s=ix.get("eta_s"), note=f"{ix['errors']} errors (see the log)" if ix["errors"] else ""))
    vec = s.vectors
    if vec is not None:
        emb = vec.get("embedding") or {}
        done, total = vec["frames_with_vectors"], vec["text_frames"]
        rate = emb.get("frames_per_s")
        note = ""
        if emb.get("last_error"):
            note = f"stopped: {emb['last_error']}"
        elif not emb.get("embedder_loaded", True) and done < total:
            note = "no embedding model loaded here (the daemon embeds; see [embedding] in the config)"
        eta = 0.0 if done >= total else (max(0.1, round((total - done) / rate, 1)) if rate and not note else None)
        out.append(Stage(name="embedding", unit="frames", done=done, total=total, eta_s=eta, note=note))
    return out


def is_ready(s: CapsuleStats) -> bool:
    ix = _indexer(s)
    if ix is not None and (ix["phase"] in BUSY_PHASES or ix["files_indexed"] < ix["files_to_index"]):
        return False
    vec = s.vectors
    return s.pending_frames == 0 and (vec is None or vec["frames_with_vectors"] >= vec["text_frames"])


def ready_in(s: CapsuleStats) -> float | None:
    """Seconds until ``is_ready``, estimated; None while it cannot be told (a scan still
    counting, no rate measured yet, embedding stopped). The frames still to embed include
    those the files left to index will bring, at the chunks per file seen so far."""
    if is_ready(s):
        return 0.0
    by_name = {st.name: st for st in stages(s)}
    parts = [by_name[n].eta_s for n in ("scanning", "indexing") if n in by_name]
    ix, emb = _indexer(s), by_name.get("embedding")
    if emb is not None and emb.total is not None:
        files_left = ix["files_to_index"] - ix["files_indexed"] if ix is not None else 0
        coming = 0.0
        if files_left:
            per_file = ix["chunks_written"] / ix["files_indexed"] if ix and ix["files_indexed"] else None
            coming = files_left * per_file if per_file is not None else math.nan
        rate = (s.vectors or {}).get("embedding", {}).get("frames_per_s")
        left = emb.total - emb.done + coming
        parts.append(0.0 if left <= 0 else (left / rate if rate and not emb.note and not math.isnan(left) else None))
    if any(p is None for p in parts):
        return None
    eta = max([p for p in parts if p is not None] or [0.0])
    return max(0.1, round(eta, 1)) if eta > 0 else None  # not ready, yet no stage has work left: frames being staged


def with_readiness(s: CapsuleStats) -> CapsuleStats:
    return msgspec.structs.replace(s, ready=is_ready(s), ready_in_s=ready_in(s))


def partial_coverage(coverage: float) -> str:
    """The note of a find whose semantic part saw only ``coverage`` of the text."""
    return (f"semantic search covered {math.floor(coverage * 100)}% of the text: the rest is not embedded yet "
            "(memvidd status shows the progress)")
