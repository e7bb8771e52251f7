"""Shared by the benchmarks: percentile summaries, ratios, load average.

The scripts run as ``python bench/<name>.py``, so this module is importable by name.
"""

from __future__ import annotations

import math
import os
import statistics
from typing import Any


def percentile(sorted_xs: list[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not sorted_xs:
        return math.nan
    k = (len(sorted_xs) - 1) * p / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (k - lo)


def dist(samples_s: list[float], unit: str = "ms") -> dict[str, Any]:
    """Percentile summary of durations given in seconds, reported in ``unit``."""
    scale = {"s": 1.0, "ms": 1e3, "us": 1e6}[unit]
    xs = sorted(x * scale for x in samples_s)
    if not xs:
        return {"unit": unit, "n": 0}
    r = lambda v: round(v, 4)  # noqa: E731
    return {
        "unit": unit, "n": len(xs), "p50": r(percentile(xs, 50)), "p90": r(percentile(xs, 90)),
        "p99": r(percentile(xs, 99)), "min": r(xs[0]), "max": r(xs[-1]), "mean": r(statistics.fmean(xs)),
    }


def ratio(a: float | None, b: float | None, nd: int = 3) -> float | None:
    return round(a / b, nd) if a is not None and b else None


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]
