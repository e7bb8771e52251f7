#!/usr/bin/env python3
"""Benchmark of memvidd's daemon: find and put over the socket, against the engine in-process.

Run::

    cd /work/main && .venv/bin/python -m bench.daemon_bench [--quick] [--out FILE] [-v]

Builds, in-process with ``engine.create`` + ``put_many``, a 100k-chunk lexical capsule
(stdlib chunks, re-used with distinct URIs) and a 20k-chunk capsule with vectors (real
embeddings of a few thousand chunks, gaussian-noise copies for the rest, given with
``put(vector=...)``). Then, for each: the same queries through ``cap.find`` in-process
and through a real ``memvidd run`` subprocess with the sync ``Client`` (cold, cached),
put throughput with 1/8/32 producer threads, and the daemon's RSS with and without the
embedding model.

Prints one JSON document (stdout, or ``--out FILE``) and a one-line summary on stderr.
See ``bench/README.md``. Everything lives in one temporary directory removed at the end.
"""

from __future__ import annotations

import gc
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    NOISE_SIGMA,
    Corpus,
    arg_parser,
    dist,
    environment,
    frame_vectors,
    loadavg,
    log,
    make_queries,
    parse_args,
    ratio,
    result_head,
    write_result,
)
from bench.daemon_process import Daemon, daemon_dirs

MODEL = "all-MiniLM-L6-v2"
CHUNK_BYTES = 1024
BUILD_BATCH = 1000
EMBED_BATCH = 32

FULL = dict(lex_frames=100_000, vec_frames=20_000, real_chunks=2000, n_queries=200, cached_passes=3,
            put_seconds=8.0, put_threads=(1, 8, 32), floor_samples=2000)
QUICK = dict(lex_frames=10_000, vec_frames=3_000, real_chunks=48, n_queries=40, cached_passes=2,
             put_seconds=1.5, put_threads=(1, 8, 32), floor_samples=300)
GOALS = {"cached_socket_p50_ms": 0.3, "lex_socket_p50_ms": 1.0, "lex_socket_p99_ms": 5.0,
         "rss_lexical_mib": 250, "rss_model_mib": 700}


# -- building the capsules ----------------------------------------------------------------------


def build_lex(path: str, uris: list[str], texts: list[str], total: int) -> dict[str, Any]:
    import engine

    cap = engine.create(path, model=None)
    cap.find("warm up", k=1, mode="lex")  # indexes attached from the start, kept current per commit
    base = len(texts)
    t0 = time.perf_counter()
    done = 0
    last = t0
    while done < total:
        stop = min(done + BUILD_BATCH, total)
        items = []
        for f in range(done, stop):
            c, copy = f % base, f // base
            items.append({"text": texts[c], "uri": uris[c] if copy == 0 else f"{uris[c]}~{copy}"})
        cap.put_many(items)
        cap.commit()
        done = stop
        if time.perf_counter() - last > 30:
            last = time.perf_counter()
            log(f"  build lex: {done}/{total}")
    el = time.perf_counter() - t0
    st = cap.stats()
    cap.close()
    return {"frames": st["frames"], "batch": BUILD_BATCH, "elapsed_s": round(el, 2),
            "frames_per_s": round(st["frames"] / el, 1), "payload_raw_bytes": st["payload_raw_bytes"],
            "file_bytes": os.path.getsize(path)}


def build_vec(path: str, uris: list[str], texts: list[str], total: int, real: int,
              emb: Any) -> dict[str, Any]:
    """``total`` distinct chunks; ``real`` of them (evenly spread) embedded for real, every
    other frame gets the nearest real chunk's vector + noise (``frame_vectors``)."""
    import engine

    total = min(total, len(texts))
    real_idx = np.unique(np.linspace(0, total - 1, real).astype(np.int64))
    real_texts = [texts[i] for i in real_idx]
    emb.embed(real_texts[:8])  # warm-up
    t0 = time.perf_counter()
    vecs = np.concatenate([emb.embed(real_texts[i:i + EMBED_BATCH])
                           for i in range(0, len(real_texts), EMBED_BATCH)])
    embed_s = time.perf_counter() - t0
    rng = np.random.default_rng(42)
    frames = np.arange(total)
    exact = np.isin(frames, real_idx)
    v = frame_vectors(real_idx, vecs, frames, exact, rng)
    source = frame_vectors(real_idx, vecs, frames, np.ones(total, bool), rng)  # no noise: draws nothing
    noisy = ~exact
    cos = float(np.mean(np.sum(v[noisy] * source[noisy], axis=1))) if noisy.any() else 1.0

    cap = engine.create(path, model=MODEL, embedder=emb)
    cap.find("warm up", k=1, mode="lex")
    t1 = time.perf_counter()
    for s in range(0, total, BUILD_BATCH):
        e = min(s + BUILD_BATCH, total)
        cap.put_many([{"text": texts[i], "uri": uris[i], "vector": v[i]} for i in range(s, e)])
        cap.commit()
    el = time.perf_counter() - t1
    st = cap.stats()
    cap.close()
    return {"frames": st["frames"], "real_embedded": len(real_idx),
            "real_embedding": {"chunks": len(real_idx), "seconds": round(embed_s, 2),
                               "chunks_per_s": round(len(real_idx) / embed_s, 2), "batch": EMBED_BATCH,
                               "threads": 2},
            "noise_sigma": NOISE_SIGMA, "mean_cosine_to_source": round(cos, 4),
            "vectors": {k: st["vectors"][k] for k in ("model", "dim", "text_frames", "frames_with_vectors")},
            "build_elapsed_s": round(el, 2), "file_bytes": os.path.getsize(path)}


# -- the daemon ----------------------------------------------------------------------------------

CAPSULE = """
[[capsule]]
name = "{name}"
path = "{path}"
"""


def serving(directory: Path, capsules: dict[str, str], *, model: str, cache: Path) -> Daemon:
    """A daemon serving the capsules ``{name: path}``."""
    tables = "".join(CAPSULE.format(name=n, path=p) for n, p in capsules.items())
    return Daemon(directory, tables, model=model, cache=cache)


def status(d: Daemon) -> dict[str, Any]:
    """The daemon's memory (``Daemon.status``, MiB) and the frames of each capsule it serves."""
    from memvidd.client import Client

    with Client(d.socket) as c:
        return {**d.status(), "frames": {ci.name: ci.frames for ci in c.capsules()}}


# -- find latency -------------------------------------------------------------------------------

# Passes, in this order, over the same queries (k and snippet_chars=200 as defaults):
#   first:  k=10, the first time each query is seen (result cache empty; vec/hybrid: embeds
#           the query unless an earlier mode already did in this process);
#   cached: k=10 again (result-cache hits), repeated `cached_passes` times;
#   repeat: k=9 (a result-cache miss, the search runs again; query vector and blocks warm).
# In-process and socket calls alternate query by query (which goes first alternates too),
# so a busy machine's drift hits both alike.


class InProcess:
    """The engine's find on a readonly open of the capsule the daemon serves, with the
    daemon's cache sizes (16 MiB results, 32 MiB blocks)."""

    def __init__(self, path: str, embedder: Any = None) -> None:
        import engine

        self.cap = engine.open(path, readonly=True, embedder=embedder,
                               result_cache_bytes=16 << 20, block_cache_bytes=32 << 20)
        self.cap.find("", k=0)  # attach the indexes, as the daemon does at start-up

    def find(self, q: str, **kw: Any) -> Any:
        return self.cap.find(q, **kw)

    def close(self) -> None:
        self.cap.close()


def count_hits(r: Any) -> int:
    return len(r.hits) if hasattr(r, "hits") else len(r)


def interleaved_finds(d: Daemon, path: str, capsule: str, queries: list[str], modes: tuple[str, ...],
                      cfg: dict[str, Any], embedder: Any = None) -> dict[str, Any]:
    from memvidd.client import Client

    log(f"find, in-process and over the socket: {capsule} {modes}")
    ip = InProcess(path, embedder)
    res: dict[str, Any] = {"queries": len(queries), "inprocess": {}, "socket": {}}
    try:
        with Client(d.socket) as c:
            sides = {"inprocess": ip.find,
                     "socket": lambda q, **kw: c.find_reply(q, capsule=capsule, **kw)}

            def one(mode: str, k: int) -> dict[str, tuple[list[float], int, int]]:
                gc.collect()
                lat: dict[str, list[float]] = {s: [] for s in sides}
                cached = {s: 0 for s in sides}
                hits = {s: 0 for s in sides}
                for i, q in enumerate(queries):
                    for side in (("inprocess", "socket") if i % 2 == 0 else ("socket", "inprocess")):
                        t0 = time.perf_counter()
                        r = sides[side](q, k=k, mode=mode)
                        lat[side].append(time.perf_counter() - t0)
                        cached[side] += bool(r.cached)
                        hits[side] += count_hits(r)
                return {s: (lat[s], cached[s], hits[s]) for s in sides}

            for mode in modes:
                for s in sides:
                    res[s][mode] = {}
                first = one(mode, 10)
                for s, (lat, cached, hits) in first.items():
                    res[s][mode]["first"] = {**dist(lat), "cache_hits": cached,
                                             "hits_per_query": round(hits / len(queries), 2)}
                acc: dict[str, list[float]] = {s: [] for s in sides}
                n_cached = {s: 0 for s in sides}
                for _ in range(cfg["cached_passes"]):
                    for s, (lat, cached, _h) in one(mode, 10).items():
                        acc[s] += lat
                        n_cached[s] += cached
                for s in sides:
                    res[s][mode]["cached"] = {**dist(acc[s]), "cache_hits": n_cached[s]}
                for s, (lat, cached, _h) in one(mode, 9).items():
                    res[s][mode]["repeat"] = {**dist(lat), "cache_hits": cached}

            # the floor: no search at all (find of "" returns before it), and hello (no thread hop)
            fl: dict[str, list[float]] = {"inprocess": [], "socket": [], "socket_hello": []}
            for _ in range(cfg["floor_samples"]):
                for side, fn in (("inprocess", lambda: ip.find("", k=0)),
                                 ("socket", lambda: c.find_reply("", k=0, capsule=capsule)),
                                 ("socket_hello", c.hello)):
                    t0 = time.perf_counter()
                    fn()
                    fl[side].append(time.perf_counter() - t0)
            res["floor"] = {k: dist(v, "us") for k, v in fl.items()}
            res["attach"] = {"inprocess": ip.cap.stats()["search"]["attach"],
                             "daemon": c.stats(capsule=capsule)["search"]["attach"]}
    finally:
        ip.close()
    res["overhead"] = compare(res["inprocess"], res["socket"])
    return res


def compare(inproc: dict[str, Any], sock: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for mode in sock:
        out[mode] = {}
        for p in ("first", "cached", "repeat"):
            a, b = sock[mode][p], inproc[mode][p]
            out[mode][p] = {"socket_over_inprocess_p50": ratio(a["p50"], b["p50"]),
                            "socket_minus_inprocess_p50_ms": round(a["p50"] - b["p50"], 4)}
    return out


# -- put throughput -------------------------------------------------------------------------------


def producer(c: Any, uri_prefix: str, offset: int, capsule: str, payloads: list[str],
             barrier: threading.Barrier, stop_at: list[float], lat: list[float], errors: list[str]) -> None:
    """One producer thread: ``put`` on its own connection until ``stop_at[0]``."""
    j = 0
    barrier.wait()
    try:
        while time.perf_counter() < stop_at[0]:
            t0 = time.perf_counter()
            text = payloads[(offset + j) % len(payloads)]
            c.put(text, capsule=capsule, uri=f"{uri_prefix}{j}", kind="event")
            lat.append(time.perf_counter() - t0)
            j += 1
    except Exception as e:  # noqa: BLE001 - reported, not raised from a thread
        errors.append(repr(e))


def bench_puts(d: Daemon, capsule: str, texts: list[str], levels: tuple[int, ...],
               seconds: float) -> dict[str, Any]:
    from memvidd.client import Client

    out: dict[str, Any] = {}
    payloads = [t[:300] for t in texts[:2000]]
    for n in levels:
        clients = [Client(d.socket) for _ in range(n)]
        with Client(d.socket) as admin:
            before = admin.stats(capsule=capsule)
            barrier = threading.Barrier(n + 1)
            stop_at = [0.0]
            lat: list[list[float]] = [[] for _ in range(n)]
            errors: list[str] = []

            threads = [threading.Thread(target=producer, args=(
                clients[i], f"bench://put/{n}/{i}/", i * 7919, capsule, payloads, barrier, stop_at, lat[i],
                errors)) for i in range(n)]
            for t in threads:
                t.start()
            t0 = time.perf_counter()
            stop_at[0] = t0 + seconds
            barrier.wait()
            for t in threads:
                t.join()
            el = time.perf_counter() - t0
            after = admin.stats(capsule=capsule)
        for c in clients:
            c.close()
        puts = sum(len(x) for x in lat)
        commits = after["daemon"]["commits"] - before["daemon"]["commits"]
        acked = after["daemon"]["acked_puts"] - before["daemon"]["acked_puts"]
        out[f"threads_{n}"] = {
            "threads": n, "seconds": round(el, 3), "puts": puts, "acked_puts_delta": acked,
            "commits": commits, "puts_per_s": round(puts / el, 1), "commits_per_s": round(commits / el, 1),
            "puts_per_commit": round(puts / commits, 2) if commits else None,
            "put_latency": dist([x for xs in lat for x in xs]), "errors": errors[:5],
            "checkpoints_during": after["checkpoints"] - before["checkpoints"], "loadavg": loadavg(),
        }
        level = out[f"threads_{n}"]
        log(f"  puts x{n}: {level['puts_per_s']}/s, {level['commits_per_s']} commits/s")
    return out


# -- main -----------------------------------------------------------------------------------------


def goals(r: dict[str, Any]) -> dict[str, Any]:
    g: dict[str, Any] = {}
    f = r.get("lexical", {}).get("find")
    if f:
        s = f["socket"]["lex"]
        g["lex_socket_first_p50_under_1ms"] = s["first"]["p50"] < GOALS["lex_socket_p50_ms"]
        g["lex_socket_first_p99_under_5ms"] = s["first"]["p99"] < GOALS["lex_socket_p99_ms"]
        g["cached_socket_p50_under_0.3ms"] = s["cached"]["p50"] < GOALS["cached_socket_p50_ms"]
    rl = r.get("lexical", {}).get("rss")
    if rl:  # peak so far with the 100k frames served and queried (the puts add frames after)
        g["rss_lexical_100k_under_250MiB"] = rl["after_queries"]["vmhwm_mib"] < GOALS["rss_lexical_mib"]
    rm = r.get("vector", {}).get("rss")
    if rm:
        g["rss_with_model_under_700MiB"] = rm["after_queries"]["vmhwm_mib"] < GOALS["rss_model_mib"]
    rml = r.get("model_lexical_rss")
    if rml:
        g["rss_model_plus_lex100k_under_700MiB"] = rml["after_queries"]["vmhwm_mib"] < GOALS["rss_model_mib"]
    return g


def summary_line(r: dict[str, Any]) -> str:
    parts = []
    lx = r.get("lexical")
    if lx:
        s, i = lx["find"]["socket"]["lex"], lx["find"]["inprocess"]["lex"]
        floor = lx["find"]["floor"]
        parts.append(f"{lx['build']['frames'] // 1000}k lex socket p50 {s['first']['p50']:.3f} "
                     f"p99 {s['first']['p99']:.3f} ms (in-proc {i['first']['p50']:.3f}), "
                     f"cached {s['cached']['p50']:.3f} ms (in-proc {i['cached']['p50']:.3f}), "
                     f"floor {floor['socket']['p50']:.0f} us (hello {floor['socket_hello']['p50']:.0f})")
        for label, key in (("puts", "puts"), ("fresh", "puts_fresh_daemon")):
            parts.append(f"{label} " + " ".join(f"x{v['threads']} {v['puts_per_s']:.0f}/s "
                                                f"({v['commits_per_s']:.0f} c/s)" for v in lx[key].values()))
        rq, rp = lx["rss"]["after_queries"], lx["rss"]["after_puts"]
        parts.append(f"RSS lex {rq['vmhwm_mib']} MiB HWM @{rq['frames']['lex']} fr "
                     f"({rp['vmhwm_mib']} @{rp['frames']['lex']})")
    vx = r.get("vector")
    if vx:
        s = vx["find"]["socket"]
        parts.append(f"{vx['build']['frames'] // 1000}k vec p50 first/cached: "
                     + " ".join(f"{m} {s[m]['first']['p50']:.2f}/{s[m]['cached']['p50']:.3f}" for m in s)
                     + " ms")
        parts.append(f"RSS +model {vx['rss']['after_queries']['vmhwm_mib']} MiB HWM")
    ml = r.get("model_lexical_rss")
    if ml:
        parts.append(f"model+lex {ml['after_queries']['vmhwm_mib']} MiB")
    parts.append(f"load {r['env']['loadavg_start'][0]}->{r['loadavg_end'][0]} | {r['elapsed_s']:.0f} s")
    return " | ".join(parts)


def main() -> None:
    ap = arg_parser(__doc__, quick="small sizes, for smoke tests (< 2 min)")
    ap.add_argument("--no-vec", action="store_true", help="skip the capsule with vectors and the model")
    ap.add_argument("--frames", type=int, default=None, help="frames of the lexical capsule (default 100000)")
    ap.add_argument("--queries", type=int, default=None, help="queries (default 200)")
    args = parse_args(ap)
    cfg = dict(QUICK if args.quick else FULL)
    if args.frames:
        cfg["lex_frames"] = args.frames
    if args.queries:
        cfg["n_queries"] = args.queries

    t_start = time.perf_counter()
    with daemon_dirs("memvidd-daemon-bench-", args.tmpdir) as (tmp, runtime):
        cache = tmp / "cache"  # index working copies and the model directory, shared with the daemons
        packages = ("trio", "msgspec", "tantivy", "usearch", "fastembed", "onnxruntime")
        env = environment(str(tmp), packages=packages, runtime_dir=runtime)
        result: dict[str, Any] = {**result_head("memvidd daemon", args.quick), "env": env}
        corpus = Corpus(chunk_bytes=CHUNK_BYTES)
        uris, texts = corpus.uris, corpus.texts()
        queries = make_queries(texts, cfg["n_queries"])
        result["corpus"] = {"source": str(corpus.root), "files": corpus.files, "bytes": corpus.bytes,
                            "chunks": len(texts), "chunk_bytes_max": CHUNK_BYTES, "queries": len(queries),
                            "query_examples": queries[:5]}
        lex_path = str(tmp / "lex.mv2")
        vec_path = str(tmp / "vec.mv2")

        from memvidd.client import Client

        # 1. the lexical capsule, a daemon without the model: finds and RSS at 100k frames
        log(f"building the {cfg['lex_frames']}-frame lexical capsule")
        lex: dict[str, Any] = {"build": build_lex(lex_path, uris, texts, cfg["lex_frames"])}
        d = serving(tmp / "d-lex", {"lex": lex_path}, model="none", cache=cache)
        try:
            lex["ready_s"] = round(d.start(), 3)
            lex["rss"] = {"ready": status(d)}
            lex["find"] = interleaved_finds(d, lex_path, "lex", queries, ("lex",), cfg)
            lex["rss"]["after_queries"] = status(d)
            lex["stop_s"] = round(d.stop(), 3)
        finally:
            d.kill()
        result["lexical"] = lex

        if not args.no_vec:
            import engine

            emb = engine.Embedder(MODEL, threads=2, batch_size=8)
            log(f"building the {cfg['vec_frames']}-frame capsule with vectors ({cfg['real_chunks']} real)")
            build = build_vec(vec_path, uris, texts, cfg["vec_frames"], cfg["real_chunks"], emb)
            vec: dict[str, Any] = {"build": build}
            # 2. the model loaded, serving the vector capsule (and the lexical one, bound to no model)
            d = serving(tmp / "d-vec", {"vec": vec_path, "lex": lex_path}, model=MODEL, cache=cache)
            try:
                vec["ready_s"] = round(d.start(), 3)
                vec["rss"] = {"ready": status(d)}
                modes = ("lex", "hybrid", "vec")
                vec["find"] = interleaved_finds(d, vec_path, "vec", queries, modes, cfg, emb)
                vec["rss"]["after_queries"] = status(d)
                vec["stop_s"] = round(d.stop(), 3)
            finally:
                d.kill()
            vec["rss"]["note"] = ("one daemon with the model loaded serving both capsules "
                                  "(vec + the lexical one)")
            result["vector"] = vec
            del emb

            # 3. the model loaded, serving only the lexical capsule (still 100k frames): RSS comparable to 1.
            d = serving(tmp / "d-lex-model", {"lex": lex_path}, model=MODEL, cache=cache)
            try:
                ml: dict[str, Any] = {"ready_s": round(d.start(), 3)}
                ml["ready"] = status(d)
                with Client(d.socket) as c:
                    for q in queries:
                        c.find(q, mode="lex")
                ml["after_queries"] = status(d)
                d.stop()
            finally:
                d.kill()
            result["model_lexical_rss"] = ml

        # 4. put throughput, last (it adds frames): on the lexical daemon once it has served the
        # queries, then restarted (no find served: nothing to re-warm after each commit).
        d = serving(tmp / "d-lex", {"lex": lex_path}, model="none", cache=cache)
        try:
            d.start()
            with Client(d.socket) as c:
                for q in queries:
                    c.find(q, mode="lex")
            log("put throughput, after finds")
            lex["puts"] = bench_puts(d, "lex", texts, cfg["put_threads"], cfg["put_seconds"])
            lex["rss"]["after_puts"] = status(d)
            d.stop()
            log("put throughput, fresh daemon (no find served)")
            d.start()
            lex["puts_fresh_daemon"] = bench_puts(d, "lex", texts, cfg["put_threads"], cfg["put_seconds"])
            lex["rss"]["fresh_after_puts"] = status(d)
            d.stop()
        finally:
            d.kill()

        result["goals_ms_mib"] = GOALS
        result["goals"] = goals(result)
        result["loadavg_end"] = loadavg()
        result["elapsed_s"] = round(time.perf_counter() - t_start, 1)

    write_result(result, args.out, summary_line)


if __name__ == "__main__":
    main()
