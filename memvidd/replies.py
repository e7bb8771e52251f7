"""The engine's search results as wire replies: the one conversion, for the daemon and for
``memvidd find --capsule`` alike (``frame_out`` and the stats stay in ``server.py``)."""

from __future__ import annotations

from typing import Any, cast

import engine

from . import protocol as p
from .manifest import CHUNK_KIND, places
from .readiness import partial_coverage


def find_reply(rid: int, cap: engine.Capsule, hits: engine.Hits | None, query: str = "",
               args: dict[str, Any] | None = None) -> p.FindReply:
    """The reply to a find: its hits (searched now if ``hits`` is None) with the places of
    file hits, and the vector coverage it searched (vec and hybrid)."""
    if hits is None:
        hits = cap.find(query, **(args or {}))
    warnings = hits.warnings
    coverage = cap.vector_coverage() if hits.mode in ("vec", "hybrid") else None
    if coverage is not None and coverage < 1:
        warnings = [*warnings, partial_coverage(coverage)]
    where = places(cap, hits, hits.seq) if any(h.kind == CHUNK_KIND for h in hits) else {}
    return p.FindReply(id=rid, hits=[p.HitOut.of(h, where.get(h.frame_id)) for h in hits],
                       mode=cast(p.Mode, hits.mode),  # one of MODES, "auto" resolved
                       seq=hits.seq, warnings=warnings, cached=hits.cached, coverage=coverage)
