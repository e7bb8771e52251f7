"""Retention rules and expiry: which frames a capsule's rules say are gone, and since when.

Rules live in the capsule itself, as commits (``CommitRecord.rules`` [F-24]), so a copy of
the file carries them and every change is part of the history. A frame expires when:

- its own ``expires`` time has passed (``put(..., expires=...)``);
- it is older (by event time) than the ``max_age_s`` of the capsule or of one of its tags
  (``"key=value"``; the strictest applicable rule wins);
- its URI has ``max_versions`` newer versions (the live one counts);
- or the capsule is over its ``budget_bytes`` of payload: the oldest frames go first.

An expired frame is gone from every query, *including as-of views of times before it
expired*: retention is about what the capsule may still disclose, not about when. Queries
say how many results expiry hid. Expiry follows the rules in force (relaxing them shows
again what they no longer expire) until compaction drops expired payloads for good (the
frame keeps its id and place in history, marked purged). ``Expiry`` keeps the expired set
current incrementally: a heap of time deadlines, per-URI version counts and a budget
cursor, so a query pays one heap peek when nothing is due.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable
from typing import Any

import msgspec

from . import format as fmt
from .errors import InvalidArgument
from .table import FrameTable

PURGED = fmt.PURGED

class Rule(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    max_age_s: float | None = None
    max_versions: int | None = None


class Rules(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """A capsule's retention rules; ``tags`` maps ``"key=value"`` to a rule for the
    frames carrying that tag (on top of ``default``: the strictest limit applies)."""

    default: Rule = Rule()
    tags: dict[str, Rule] = {}
    budget_bytes: int | None = None

    def limits(self, tags: dict[str, str]) -> tuple[float | None, int | None]:
        """(max age, max versions) for a frame with these tags."""
        rules = [self.default] + [r for key, r in self.tags.items() if _tag_matches(key, tags)]
        ages = [r.max_age_s for r in rules if r.max_age_s is not None]
        versions = [r.max_versions for r in rules if r.max_versions is not None]
        return (min(ages) if ages else None), (min(versions) if versions else None)

    def is_empty(self) -> bool:
        return self == Rules()


def _tag_matches(key: str, tags: dict[str, str]) -> bool:
    k, _, v = key.partition("=")
    return tags.get(k) == v


def parse(obj: Any) -> Rules:
    """Rules from a mapping (as given by a caller or stored in a commit); clear errors."""
    try:
        rules = msgspec.convert(obj, Rules) if not isinstance(obj, Rules) else obj
    except msgspec.ValidationError as e:
        raise InvalidArgument(f"bad retention rules: {e}") from None
    for where, r in [("default", rules.default), *((f"tags[{k!r}]", r) for k, r in rules.tags.items())]:
        if r.max_age_s is not None and not (math.isfinite(r.max_age_s) and r.max_age_s > 0):
            raise InvalidArgument(f"retention rule {where}: max_age_s must be a positive number of seconds")
        if r.max_versions is not None and r.max_versions < 1:
            raise InvalidArgument(f"retention rule {where}: max_versions must be at least 1")
    for key in rules.tags:
        if "=" not in key or key.startswith("="):
            raise InvalidArgument(f"retention tag rule {key!r} must be written key=value")
    if rules.budget_bytes is not None and rules.budget_bytes < 0:
        raise InvalidArgument("retention budget_bytes must not be negative")
    return rules


def to_builtins(rules: Rules) -> dict[str, Any]:
    return msgspec.to_builtins(rules)


class Expiry:
    """The expired frame ids of one capsule under its current rules."""

    def __init__(self) -> None:
        self.rules = Rules()
        self.expired: set[int] = set()
        self.expired_bytes = 0
        self._deadlines: list[tuple[float, int]] = []  # heap of (time, frame id)
        self._kept_bytes = 0  # payload bytes of PUT frames not expired
        self._cursor = 0  # budget: frames below this id were considered
        self._seen = 0  # frames below this id have been added
        self._puts: dict[str, list[int]] = {}  # uri -> its PUT frames, oldest first
        self._cut: dict[str, int] = {}  # uri -> how many of those max_versions expired
        self._no_rules = True  # no rules: only frames' own expiry times matter

    def reset(self, table: FrameTable, rules: Rules, now: float) -> list[int]:
        """Start over under ``rules`` (open, rule change); returns every expired id."""
        self.__init__()  # type: ignore[misc]
        self.rules = rules
        self._no_rules = rules.is_empty()
        if self._no_rules:  # every open pays this: touch only the frames that matter
            self.expired.update(table.purged)
            self._deadlines = [(when, fid) for fid, when in table.expiring.items() if fid not in self.expired]
            heapq.heapify(self._deadlines)
            self._seen = table.next_id
            self.due(table, now)
            return sorted(self.expired)
        self.add(table, table.frames, now)
        return sorted(self.expired)

    def add(self, table: FrameTable, frames: Iterable[fmt.FrameMeta], now: float) -> list[int]:
        """Take new frames into account; returns the ids that expired because of them."""
        fresh: list[int] = []
        for m in frames:
            if m.id < self._seen:
                continue
            self._seen = m.id + 1
            if m.op != fmt.PUT:
                continue
            if m.block == PURGED:
                self._expire(m, fresh)
                continue
            if self._no_rules:  # the common case, and every open pays this loop: keep it lean
                if m.expires is not None:
                    heapq.heappush(self._deadlines, (m.expires, m.id))
                continue
            self._kept_bytes += m.length
            age, versions = self.rules.limits(m.tags)
            deadline = min(t for t in (m.expires, None if age is None else m.timestamp + age) if t is not None) \
                if m.expires is not None or age is not None else None
            if deadline is not None:
                heapq.heappush(self._deadlines, (deadline, m.id))
            if m.uri is not None and versions is not None:  # no such rule: no bookkeeping
                puts = self._puts.setdefault(m.uri, [])
                puts.append(m.id)
                cut = self._cut.get(m.uri, 0)
                while len(puts) - cut > versions:
                    self._expire(table.frames[puts[cut]], fresh)
                    cut += 1
                self._cut[m.uri] = cut
        return fresh + self.due(table, now)

    def due(self, table: FrameTable, now: float) -> list[int]:
        """Frames whose time came, and budget overflow; returns the newly expired ids."""
        fresh: list[int] = []
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            _, fid = heapq.heappop(heap)
            self._expire(table.frames[fid], fresh)
        budget = self.rules.budget_bytes
        if budget is not None:
            while self._kept_bytes > budget and self._cursor < self._seen:
                m = table.frames[self._cursor]
                self._cursor += 1
                if m.op == fmt.PUT:
                    self._expire(m, fresh)
        return fresh

    @property
    def seen(self) -> int:
        """Frames below this id have been considered."""
        return self._seen

    def next_deadline(self) -> float | None:
        return self._deadlines[0][0] if self._deadlines else None

    def _expire(self, m: fmt.FrameMeta, fresh: list[int]) -> None:
        if m.id in self.expired:
            return
        self.expired.add(m.id)
        fresh.append(m.id)
        if m.block != PURGED:
            self._kept_bytes -= m.length
            self.expired_bytes += m.length
