#!/usr/bin/env python3
"""Benchmark of memvidd's storage engine (``engine/``) on the CPython standard library.

Run::

    cd /work/main && .venv/bin/python -m bench.engine_bench [--quick] [--out FILE]

Prints one JSON document (stdout, or ``--out FILE``) and a one-line summary on stderr.
See ``bench/README.md`` for what each figure means. Every latency is reported as
percentiles over many samples; every throughput is the median of several runs.
All files live in one temporary directory that is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import zstandard

import engine
from bench.common import (
    MB,
    REPO,
    Corpus,
    arg_parser,
    dist,
    environment,
    log,
    parse_args,
    percentile,
    ratio,
    result_head,
    write_result,
)

CHUNK_BYTES = 2048
INGEST_BATCH = 256
BUILD_BATCH = 4096
ZSTD_LEVEL = 3

FULL = dict(
    corpus_max_bytes=None, ingest_runs=3, small_frames=1_000, large_frames=100_000,
    commit_samples=200, commit_warmup=10, open_runs=5, get_samples=2_000,
    rss_points=(20_000, 100_000),
)
QUICK = dict(
    corpus_max_bytes=3_000_000, ingest_runs=3, small_frames=500, large_frames=10_000,
    commit_samples=50, commit_warmup=5, open_runs=5, get_samples=500,
    rss_points=(2_000, 10_000),
)
SLOW_INGEST_S = 45.0  # one ingest run longer than this: do not repeat it


# -- 2. ingest ------------------------------------------------------------------------


def ingest_once(corpus: Corpus, path: str) -> dict[str, Any]:
    batches = [corpus.items(0, i, min(i + INGEST_BATCH, len(corpus)))
               for i in range(0, len(corpus), INGEST_BATCH)]
    cap = engine.create(path)
    put_s = 0.0
    commits: list[float] = []
    t0 = time.perf_counter()
    for b in batches:
        a = time.perf_counter()
        cap.put_many(b)
        c = time.perf_counter()
        cap.commit()
        d = time.perf_counter()
        put_s += c - a
        commits.append(d - c)
    elapsed = time.perf_counter() - t0
    stats = cap.stats()
    t1 = time.perf_counter()
    cap.close()
    close_s = time.perf_counter() - t1
    return {"elapsed_s": elapsed, "put_s": put_s, "commit_s": sum(commits), "commits": commits,
            "close_s": close_s, "file_bytes": os.path.getsize(path), "stats": stats}


def zstd_once(raw: list[bytes]) -> tuple[float, int]:
    c = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    t0 = time.perf_counter()
    out = 0
    for b in raw:
        out += len(c.compress(b))
    return time.perf_counter() - t0, out


def bench_ingest(corpus: Corpus, tmp: str, runs: int) -> dict[str, Any]:
    raw_bytes = sum(len(b) for b in corpus.raw)
    results = []
    zstd_times = []
    zstd_out = 0
    for r in range(runs):
        log(f"ingest run {r + 1}/{runs}")
        path = os.path.join(tmp, f"ingest-{r}.mv2")
        res = ingest_once(corpus, path)
        os.unlink(path)
        results.append(res)
        zt, zstd_out = zstd_once(corpus.raw)  # interleaved, so drift hits both alike
        zstd_times.append(zt)
        if r == 0 and res["elapsed_s"] > SLOW_INGEST_S:
            log("ingest is slow: one run only")
            break
    el = statistics.median(x["elapsed_s"] for x in results)
    zt = statistics.median(zstd_times)
    mbps = raw_bytes / MB / el
    zmbps = raw_bytes / MB / zt
    last = results[-1]
    st = last["stats"]
    return {
        "runs": len(results), "batch_frames": INGEST_BATCH, "frames": len(corpus),
        "raw_bytes": raw_bytes,
        "elapsed_s": {"median": round(el, 4), "all": [round(x["elapsed_s"], 4) for x in results]},
        "mb_per_s": round(mbps, 2),
        "frames_per_s": round(len(corpus) / el, 1),
        "put_share": round(statistics.median(x["put_s"] / x["elapsed_s"] for x in results), 4),
        "commit_share": round(statistics.median(x["commit_s"] / x["elapsed_s"] for x in results), 4),
        "batch_commit": dist([c for x in results for c in x["commits"]], "ms"),
        "close_ms": round(statistics.median(x["close_s"] for x in results) * 1e3, 3),
        "capsule_bytes": last["file_bytes"],
        "capsule_over_raw": round(last["file_bytes"] / raw_bytes, 4),
        "bytes_by_kind": st["bytes_by_kind"], "codecs": st["codecs"],
        "checkpoints": st["checkpoints"], "segments": st["segments"],
        "zstd_baseline": {
            "level": ZSTD_LEVEL, "elapsed_s": round(zt, 4), "mb_per_s": round(zmbps, 2),
            "compressed_bytes": zstd_out, "compressed_over_raw": round(zstd_out / raw_bytes, 4),
        },
        "engine_over_zstd_throughput": ratio(mbps, zmbps, 4),
        "capsule_over_zstd_bytes": ratio(last["file_bytes"], zstd_out, 4),
    }


# -- 3. commit latency -------------------------------------------------------------------


def build_capsule(corpus: Corpus, path: str, frames: int, batch: int) -> dict[str, Any]:
    cap = engine.create(path)
    t0 = time.perf_counter()
    commits = []
    for items in corpus.frames(frames, batch):
        cap.put_many(items)
        a = time.perf_counter()
        cap.commit()
        commits.append(time.perf_counter() - a)
    el = time.perf_counter() - t0
    st = cap.stats()
    cap.close()
    return {"frames": st["frames"], "batch_frames": batch, "elapsed_s": round(el, 3),
            "frames_per_s": round(st["frames"] / el, 1),
            "mb_per_s": round(st["payload_raw_bytes"] / MB / el, 2),
            "batch_commit": dist(commits, "ms"), "checkpoints": st["checkpoints"],
            "file_bytes": os.path.getsize(path)}


class FsyncFloor:
    """The disk's floor: pwrite 2 KB + fdatasync on a scratch file in the same directory."""

    def __init__(self, path: str, append: bool) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        self.append = append
        self.pos = 0
        self.buf = os.urandom(CHUNK_BYTES)
        if not append:  # overwrite in place: blocks allocated and synced beforehand
            os.pwrite(self.fd, self.buf, 0)
            os.fsync(self.fd)

    def sample(self) -> float:
        t0 = time.perf_counter()
        os.pwrite(self.fd, self.buf, self.pos)
        os.fdatasync(self.fd)
        t = time.perf_counter() - t0
        if self.append:
            self.pos += len(self.buf)
        return t

    def close(self) -> None:
        os.close(self.fd)


def bench_commit(corpus: Corpus, tmp: str, cfg: dict[str, Any]) -> tuple[dict[str, Any], str]:
    small_path = os.path.join(tmp, "small.mv2")
    large_path = os.path.join(tmp, "large.mv2")
    log(f"build {cfg['small_frames']}-frame capsule")
    small_build = build_capsule(corpus, small_path, cfg["small_frames"], INGEST_BATCH)
    log(f"build {cfg['large_frames']}-frame capsule")
    large_build = build_capsule(corpus, large_path, cfg["large_frames"], BUILD_BATCH)

    # ~2 KB payloads: the chunks that filled up to the target
    full = [i for i, b in enumerate(corpus.raw) if CHUNK_BYTES - 256 <= len(b) <= CHUNK_BYTES]
    payloads = [corpus.text(i) for i in (full or range(len(corpus)))[:512]]

    caps = {"small": engine.open(small_path), "large": engine.open(large_path)}
    before = {k: c.stats() for k, c in caps.items()}
    floors = {"append": FsyncFloor(os.path.join(tmp, "floor-append"), True),
              "overwrite": FsyncFloor(os.path.join(tmp, "floor-overwrite"), False)}
    lat: dict[str, list[float]] = {k: [] for k in caps}
    put_lat: dict[str, list[float]] = {k: [] for k in caps}
    floor_lat: dict[str, list[float]] = {k: [] for k in floors}
    n = cfg["commit_samples"]
    log(f"commit latency: {n} samples x (small, large, 2 floors), interleaved")
    for i in range(-cfg["commit_warmup"], n):
        text = payloads[i % len(payloads)]
        for k, cap in caps.items():
            t0 = time.perf_counter()
            cap.put(text, uri=f"bench://commit/{k}/{i}")
            t1 = time.perf_counter()
            cap.commit()
            t2 = time.perf_counter()
            if i >= 0:
                lat[k].append(t2 - t0)
                put_lat[k].append(t1 - t0)
        for k, fl in floors.items():
            t = fl.sample()
            if i >= 0:
                floor_lat[k].append(t)
    after = {k: c.stats() for k, c in caps.items()}
    for c in caps.values():
        c.close()
    for fl in floors.values():
        fl.close()

    out: dict[str, Any] = {"samples": n, "warmup": cfg["commit_warmup"],
                           "payload_bytes_p50": percentile(sorted(len(p.encode()) for p in payloads), 50)}
    for k in caps:
        out[k] = {
            "frames": before[k]["frames"],
            "latency": dist(lat[k], "ms"),
            "put_part": dist(put_lat[k], "ms"),
            "wal_frames_before": before[k]["wal_frames"],
            "checkpoints_during": after[k]["checkpoints"] - before[k]["checkpoints"],
        }
    out["large_over_small_p50"] = ratio(out["large"]["latency"]["p50"], out["small"]["latency"]["p50"])
    out["fsync_floor"] = {k: dist(v, "ms") for k, v in floor_lat.items()}
    fl50 = out["fsync_floor"]["append"]["p50"]
    out["small_over_floor_p50"] = ratio(out["small"]["latency"]["p50"], fl50)
    out["large_over_floor_p50"] = ratio(out["large"]["latency"]["p50"], fl50)
    builds = {"small": small_build, "large": large_build}
    os.unlink(small_path)
    for f in ("floor-append", "floor-overwrite"):
        os.unlink(os.path.join(tmp, f))
    return {"commit": out, "builds": builds}, large_path


# -- 4. open / 6. get ---------------------------------------------------------------------


def bench_open(path: str, runs: int) -> dict[str, Any]:
    res: dict[str, Any] = {}
    for mode, ro in (("writer", False), ("readonly", True)):
        opens, closes = [], []
        for _ in range(runs):
            t0 = time.perf_counter()
            cap = engine.open(path, readonly=ro)
            t1 = time.perf_counter()
            cap.close()
            t2 = time.perf_counter()
            opens.append(t1 - t0)
            closes.append(t2 - t0)
        res[mode] = {"open": dist(opens, "ms"), "open_close": dist(closes, "ms")}
    cap = engine.open(path, readonly=True)
    st = cap.stats()
    cap.close()
    res["capsule"] = {k: st[k] for k in ("frames", "commit_seq", "file_bytes", "segments",
                                         "wal_frames", "wal_bytes", "checkpoints")}
    return res


def bench_get(path: str, samples: int, corpus: Corpus) -> dict[str, Any]:
    cap = engine.open(path, readonly=True)
    n = cap.stats()["frames"]
    rng = random.Random(20240611)
    ids = [rng.randrange(n) for _ in range(samples)]
    # correctness spot check: frame 0 holds the corpus' first chunk
    assert cap.get(0).payload == corpus.raw[0], "frame 0 does not round-trip"
    lat = []
    total = 0
    for fid in ids:
        t0 = time.perf_counter()
        fr = cap.get(fid)
        lat.append(time.perf_counter() - t0)
        total += len(fr.payload)
    cap.close()
    return {"frames": n, "samples": samples, "page_cache": "warm (file just written)",
            "latency": dist(lat, "us"), "payload_bytes_mean": round(total / samples, 1)}


# -- 5. peak RSS (child process) ------------------------------------------------------------


def rss_now_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def maxrss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def hwm_kib() -> int | None:
    """VmHWM: the peak RSS of this address space (unlike ru_maxrss, not inherited over exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_point(frames: int) -> dict[str, Any]:
    hwm = hwm_kib()
    return {"frames": frames, "max_rss_mib": round(maxrss_kib() / 1024, 1),
            "vm_hwm_mib": None if hwm is None else round(hwm / 1024, 1),
            "rss_mib": round(rss_now_kib() / 1024, 1)}


def rss_child(directory: str, quick: bool) -> None:
    cfg = QUICK if quick else FULL
    corpus = Corpus(cfg["corpus_max_bytes"], chunk_bytes=CHUNK_BYTES)
    points = sorted(cfg["rss_points"])
    out: dict[str, Any] = {"baseline": rss_point(0), "points": []}
    cap = engine.create(os.path.join(directory, "rss.mv2"))
    done = 0
    t0 = time.perf_counter()
    for items in corpus.frames(points[-1], INGEST_BATCH, tuple(points)):
        cap.put_many(items)
        cap.commit()
        before = done
        done += len(items)
        for p in points:
            if before < p <= done:
                out["points"].append({**rss_point(done), "elapsed_s": round(time.perf_counter() - t0, 2)})
    cap.close()
    print(json.dumps(out))


def bench_rss(tmp: str, quick: bool) -> dict[str, Any]:
    d = os.path.join(tmp, "rss")
    os.mkdir(d)
    cmd = [sys.executable, "-m", "bench.engine_bench", "--_rss-child", d]
    if quick:
        cmd.append("--quick")
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=REPO)
    for f in os.listdir(d):
        os.unlink(os.path.join(d, f))
    os.rmdir(d)
    if proc.returncode != 0:
        raise RuntimeError(f"RSS child failed ({proc.returncode}):\n{proc.stderr}")
    res = json.loads(proc.stdout)
    a, b = res["points"][0], res["points"][-1]
    res["max_rss_growth_mib"] = round(b["max_rss_mib"] - a["max_rss_mib"], 1)
    res["max_rss_growth_kib_per_1k_frames"] = round(
        (b["max_rss_mib"] - a["max_rss_mib"]) * 1024 / ((b["frames"] - a["frames"]) / 1000), 1)
    res["max_rss_over_baseline_mib"] = [round(p["max_rss_mib"] - res["baseline"]["max_rss_mib"], 1)
                                        for p in res["points"]]
    res["note"] = ("one capsule, put_many+commit in batches of 256; the child holds the corpus "
                   "in memory (baseline is after loading it). The child runs first, while this "
                   "process is small: Linux carries ru_maxrss over exec from the forking parent")
    return res


# -- main ------------------------------------------------------------------------------------


def summary_line(r: dict[str, Any]) -> str:
    ing, com, op, get, rss = r["ingest"], r["commit"], r["open"], r["get"], r["rss"]
    a, b = rss["points"][0], rss["points"][-1]
    return (
        f"ingest {ing['mb_per_s']} MB/s {ing['frames_per_s']:.0f} fr/s "
        f"(zstd-3 {ing['zstd_baseline']['mb_per_s']} MB/s, x{ing['engine_over_zstd_throughput']}), "
        f"capsule/raw {ing['capsule_over_raw']} | commit p50 {com['small']['latency']['p50']} ms "
        f"@{com['small']['frames']} / {com['large']['latency']['p50']} ms @{com['large']['frames']} "
        f"(x{com['large_over_small_p50']}; fsync floor {com['fsync_floor']['append']['p50']} ms) | "
        f"open {op['writer']['open']['p50']:.1f} ms (ro {op['readonly']['open']['p50']:.1f}) | "
        f"get p50 {get['latency']['p50']:.0f} us p99 {get['latency']['p99']:.0f} us | "
        f"maxRSS {a['max_rss_mib']} MiB @{a['frames']} -> {b['max_rss_mib']} MiB @{b['frames']} "
        f"(+{rss['max_rss_growth_mib']}) | {r['elapsed_s']:.0f} s"
    )


def main() -> None:
    ap = arg_parser(__doc__, quick="small sizes, for smoke tests (<30 s)")
    ap.add_argument("--runs", type=int, default=None, metavar="N",
                    help="ingest runs to take the median of (default 3)")
    ap.add_argument("--_rss-child", dest="rss_child", metavar="DIR", help=argparse.SUPPRESS)
    args = parse_args(ap)

    if args.rss_child:
        rss_child(args.rss_child, args.quick)
        return

    cfg = dict(QUICK if args.quick else FULL)
    if args.runs is not None:
        cfg["ingest_runs"] = max(1, args.runs)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="memvidd-bench-", dir=args.tmpdir) as tmp:
        env = environment(tmp, code=("engine",), dirty_key="engine_dirty",
                          implementation=platform.python_implementation(), zstandard=zstandard.__version__,
                          engine_write_version=engine.WRITE_VERSION)
        result: dict[str, Any] = {**result_head("memvidd engine", args.quick), "env": env}
        # First, while this process is still small (see bench_rss's note).
        log("peak RSS (child process)")
        rss = bench_rss(tmp, args.quick)
        log("loading corpus")
        corpus = Corpus(cfg["corpus_max_bytes"], chunk_bytes=CHUNK_BYTES)
        result["corpus"] = corpus.describe()
        result["ingest"] = bench_ingest(corpus, tmp, cfg["ingest_runs"])
        commit, large_path = bench_commit(corpus, tmp, cfg)
        result.update(commit)
        log("open")
        result["open"] = bench_open(large_path, cfg["open_runs"])
        log("get")
        result["get"] = bench_get(large_path, cfg["get_samples"], corpus)
        os.unlink(large_path)
        result["rss"] = rss
        result["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        leftovers = os.listdir(tmp)
    result["tmp_leftovers_before_cleanup"] = leftovers
    write_result(result, args.out, summary_line)


if __name__ == "__main__":
    main()
