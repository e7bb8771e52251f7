"""What the benchmarks share: statistics, the record of the run's environment, progress
logging, the command line and result scaffolding, and the stdlib corpus they measure on.

Every benchmark runs from the repository root as ``python -m bench.<name>``: ``bench`` is a
package, and the ``engine`` and ``memvidd`` imported are the ones of this checkout.
"""

from __future__ import annotations

import argparse
import json
import keyword
import logging
import math
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
MB = 1e6  # throughputs are in MB/s, 1 MB = 10**6 bytes

# -- statistics ------------------------------------------------------------------------------


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

    def r(v: float) -> float:
        return round(v, 4)

    return {
        "unit": unit, "n": len(xs), "p50": r(percentile(xs, 50)), "p90": r(percentile(xs, 90)),
        "p99": r(percentile(xs, 99)), "min": r(xs[0]), "max": r(xs[-1]), "mean": r(statistics.fmean(xs)),
    }


def ratio(a: float | None, b: float | None, nd: int = 3) -> float | None:
    return round(a / b, nd) if a is not None and b else None


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# -- the run's environment ---------------------------------------------------------------------


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def environment(tmp_root: str, *, packages: tuple[str, ...] = (),
                code: tuple[str, ...] = ("engine", "memvidd"), dirty_key: str = "code_dirty",
                **extra: Any) -> dict[str, Any]:
    """Where a run happened, so that two results can be told apart: Python, machine, load,
    the versions of ``packages``, the git commit, and under ``dirty_key`` whether the paths
    ``code`` had uncommitted changes (the commit alone then does not say what ran)."""
    status = _git("status", "--porcelain", "--", *code)
    env: dict[str, Any] = {
        "python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count(),
        "loadavg_start": loadavg(),
    }
    if packages:
        env["packages"] = {p: _version(p) for p in packages}
    env["git_commit"] = _git("rev-parse", "HEAD")
    env[dirty_key] = None if status is None else bool(status)
    return {**env, "tmp_dir": tmp_root, **extra}


# -- progress, command line, result --------------------------------------------------------------

_progress = logging.getLogger("bench")


def log(msg: str) -> None:
    """Progress on stderr, shown with ``-v``."""
    _progress.info(msg)


def arg_parser(doc: str, quick: str) -> argparse.ArgumentParser:
    """The options every benchmark has; ``quick`` is what ``--quick`` does (its help)."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help=quick)
    ap.add_argument("--out", metavar="FILE", help="write the JSON here instead of stdout")
    ap.add_argument("--tmpdir", metavar="DIR", default=None,
                    help="parent of the temporary directory (default: the system's)")
    ap.add_argument("-v", "--verbose", action="store_true", help="progress on stderr")
    return ap


def parse_args(ap: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse the command line; with ``-v``, ``log`` prints, prefixed by the benchmark's name."""
    args = ap.parse_args()
    if args.verbose:
        handler = logging.StreamHandler(sys.stderr)
        name = Path(sys.argv[0]).stem  # the benchmark's module, also under python -m
        handler.setFormatter(logging.Formatter(f"[{name} %(asctime)s] %(message)s", "%H:%M:%S"))
        _progress.addHandler(handler)
        _progress.setLevel(logging.INFO)
        _progress.propagate = False  # printed once, here, whatever the root logger has
    return args


def result_head(benchmark: str, quick: bool) -> dict[str, Any]:
    """The first keys of every result: which benchmark, which sizes, when."""
    return {"benchmark": benchmark, "mode": "quick" if quick else "full",
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def write_result(result: dict[str, Any], out: str | None, summary: Callable[[dict[str, Any]], str]) -> None:
    """The JSON document to ``out`` (or stdout), then the one-line summary on stderr."""
    doc = json.dumps(result, indent=2, default=str)
    if out:
        Path(out).write_text(doc + "\n")
    else:
        print(doc)
    print(summary(result), file=sys.stderr)


# -- the corpus: the CPython standard library ------------------------------------------------------


def stdlib_files(skip_tests: bool = False) -> tuple[Path, list[Path]]:
    """The stdlib's ``*.py`` files of the Python running the benchmark (site-packages skipped)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).parts
        if "site-packages" in rel or "dist-packages" in rel:
            continue
        if skip_tests and any(part in ("test", "tests", "idle_test") for part in rel[:-1]):
            continue
        if p.is_file():
            files.append(p)
    return root, files


def chunk_lines(data: bytes, max_bytes: int) -> list[bytes]:
    """Cut on line boundaries into pieces of at most ``max_bytes`` (a longer line stands alone)."""
    out: list[bytes] = []
    cur: list[bytes] = []
    size = 0
    for line in data.splitlines(keepends=True):
        if cur and size + len(line) > max_bytes:
            out.append(b"".join(cur))
            cur, size = [], 0
        cur.append(line)
        size += len(line)
    if cur:
        out.append(b"".join(cur))
    return out


class Corpus:
    """The stdlib's ``*.py`` cut into chunks of at most ``chunk_bytes``, URIs ``file://<path>#<n>``.

    Files are read in order until ``max_bytes`` of them or ``max_chunks`` chunks (the file
    that crosses the mark is kept whole). The chunks stay bytes, decoded on use, which keeps
    the footprint small (the engine benchmark measures its own RSS)."""

    def __init__(self, max_bytes: int | None = None, *, chunk_bytes: int = 2048,
                 max_chunks: int | None = None) -> None:
        root, files = stdlib_files()
        self.root = root
        self.chunk_bytes = chunk_bytes
        self.uris: list[str] = []
        self.raw: list[bytes] = []
        self.files = 0
        self.bytes = 0
        for p in files:
            if max_bytes is not None and self.bytes >= max_bytes:
                break
            try:
                data = p.read_bytes()
            except OSError:
                continue
            self.files += 1
            self.bytes += len(data)
            for n, piece in enumerate(chunk_lines(data, chunk_bytes)):
                self.uris.append(f"file://{p}#{n}")
                self.raw.append(piece)
            if max_chunks is not None and len(self.raw) >= max_chunks:
                break

    def __len__(self) -> int:
        return len(self.raw)

    def text(self, i: int) -> str:
        # surrogateescape: the few non-UTF-8 test files round-trip to the same bytes
        return self.raw[i].decode("utf-8", errors="surrogateescape")

    def texts(self) -> list[str]:
        """Every chunk as text for the indexes: errors="replace", since the engine's lexical
        index refuses the lone surrogates that surrogateescape gives for non-UTF-8 bytes."""
        return [b.decode("utf-8", errors="replace") for b in self.raw]

    def items(self, copy: int, start: int, stop: int) -> list[dict[str, Any]]:
        """put_many items for chunks [start, stop) of copy number ``copy`` (distinct URIs)."""
        if copy == 0:
            return [{"text": self.text(i), "uri": self.uris[i]} for i in range(start, stop)]
        return [{"text": self.text(i), "uri": f"{self.uris[i]}~{copy}"} for i in range(start, stop)]

    def frames(self, n: int, batch: int, marks: tuple[int, ...] = ()) -> Iterator[list[dict[str, Any]]]:
        """Yield batches of put_many items until ``n`` frames, re-using the corpus with new URIs.

        A batch never straddles one of ``marks`` (frame counts the caller wants to stop at)."""
        done = 0
        copy = 0
        while done < n:
            pos = 0
            while pos < len(self) and done < n:
                limit = min([n] + [m for m in marks if m > done])
                stop = min(pos + batch, len(self), pos + (limit - done))
                yield self.items(copy, pos, stop)
                done += stop - pos
                pos = stop
            copy += 1

    def describe(self) -> dict[str, Any]:
        sizes = sorted(len(b) for b in self.raw)
        return {
            "source": str(self.root), "files": self.files, "file_bytes": self.bytes,
            "chunks": len(self), "chunk_bytes": sum(sizes),
            "chunk_size": {"target": self.chunk_bytes, "p50": percentile(sizes, 50),
                           "mean": round(statistics.fmean(sizes), 1), "max": sizes[-1]},
        }


def make_queries(texts: list[str], n: int, seed: int = 7) -> list[str]:
    """Distinct queries of 1-3 identifiers/words taken from random chunks."""
    ident = re.compile(r"\b[A-Za-z_][A-Za-z0-9_]{3,}\b")
    stop = set(keyword.kwlist) | {"self", "None", "True", "False", "return", "import", "from", "def",
                                  "class", "else", "elif", "pass", "raise", "with", "args", "kwargs"}
    rng = random.Random(seed)
    out: list[str] = []
    seen: set[str] = set()
    tries = 0
    while len(out) < n and tries < 100 * n:
        tries += 1
        text = texts[rng.randrange(len(texts))]
        words = list(dict.fromkeys(w for w in ident.findall(text) if w not in stop))
        if not words:
            continue
        q = " ".join(rng.sample(words, min(1 + len(out) % 3, len(words))))
        if q.lower() not in seen:
            seen.add(q.lower())
            out.append(q)
    return out


NOISE_SIGMA = 0.015  # per-dimension gaussian noise on copied vectors (cosine to source ~0.96)


def frame_vectors(real_idx: np.ndarray, real_vecs: np.ndarray, chunk_ids: np.ndarray, exact: np.ndarray,
                  rng: np.random.Generator) -> np.ndarray:
    """Vectors for frames of chunks ``chunk_ids`` when only the chunks ``real_idx`` (sorted)
    were embedded for real (``real_vecs``): the real vector where ``exact``, else the nearest
    (by position) real chunk's vector plus N(0, NOISE_SIGMA^2) noise, renormalised. Cheap
    vectors for latency at 100k frames; they say nothing about recall."""
    pos = np.searchsorted(real_idx, chunk_ids)
    lo = np.clip(pos - 1, 0, len(real_idx) - 1)
    hi = np.clip(pos, 0, len(real_idx) - 1)
    src = np.where(np.abs(real_idx[hi] - chunk_ids) <= np.abs(chunk_ids - real_idx[lo]), hi, lo)
    v = real_vecs[src].copy()
    noisy = ~exact
    v[noisy] += rng.normal(0.0, NOISE_SIGMA, size=(int(noisy.sum()), v.shape[1])).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v
