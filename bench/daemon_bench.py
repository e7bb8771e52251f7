#!/usr/bin/env python3
"""Benchmark of memvidd's daemon: find and put over the socket, against the engine in-process.

Run::

    cd /work/main && .venv/bin/python bench/daemon_bench.py [--quick] [--out FILE] [-v]

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

import argparse
import gc
import json
import keyword
import os
import platform
import random
import re
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np

MB = 1e6
MODEL = "all-MiniLM-L6-v2"
CHUNK_BYTES = 1024
NOISE_SIGMA = 0.015  # per-dimension noise on copied vectors (as bench/search_bench.py)
BUILD_BATCH = 1000
EMBED_BATCH = 32

FULL = dict(lex_frames=100_000, vec_frames=20_000, real_chunks=2000, n_queries=200, cached_passes=3,
            put_seconds=8.0, put_threads=(1, 8, 32), floor_samples=2000)
QUICK = dict(lex_frames=10_000, vec_frames=3_000, real_chunks=48, n_queries=40, cached_passes=2,
             put_seconds=1.5, put_threads=(1, 8, 32), floor_samples=300)
GOALS = {"cached_socket_p50_ms": 0.3, "lex_socket_p50_ms": 1.0, "lex_socket_p99_ms": 5.0,
         "rss_lexical_mib": 250, "rss_model_mib": 700}

from benchstats import dist, ratio, loadavg  # noqa: E402

VERBOSE = False


def log(msg: str) -> None:
    if VERBOSE:
        print(f"[daemon-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- statistics --------------------------------------------------------------------------










# -- corpus ------------------------------------------------------------------------------------


def stdlib_chunks() -> tuple[str, int, int, list[str], list[str]]:
    """~1 KB chunks of the stdlib's *.py (line boundaries; a longer line stands alone)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    uris: list[str] = []
    texts: list[str] = []
    nfiles = nbytes = 0
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).parts
        if "site-packages" in rel or "dist-packages" in rel or not p.is_file():
            continue
        try:
            data = p.read_bytes()
        except OSError:
            continue
        nfiles += 1
        nbytes += len(data)
        cur: list[bytes] = []
        size = n = 0
        for line in data.splitlines(keepends=True) + [None]:  # type: ignore[list-item]
            if cur and (line is None or size + len(line) > CHUNK_BYTES):
                # errors="replace": lone surrogates would break the lexical index
                texts.append(b"".join(cur).decode("utf-8", errors="replace"))
                uris.append(f"file://{p}#{n}")
                n += 1
                cur, size = [], 0
            if line is not None:
                cur.append(line)
                size += len(line)
    return str(root), nfiles, nbytes, uris, texts


def make_queries(texts: list[str], n: int, seed: int = 7) -> list[str]:
    """Distinct queries of 1-3 identifiers/words from random chunks (as search_bench)."""
    ident = re.compile(r"\b[A-Za-z_][A-Za-z0-9_]{3,}\b")
    stop = set(keyword.kwlist) | {"self", "None", "True", "False", "return", "import", "from", "def",
                                  "class", "else", "elif", "pass", "raise", "with", "args", "kwargs"}
    rng = random.Random(seed)
    out: list[str] = []
    seen: set[str] = set()
    tries = 0
    while len(out) < n and tries < 100 * n:
        tries += 1
        words = list(dict.fromkeys(w for w in ident.findall(texts[rng.randrange(len(texts))]) if w not in stop))
        if not words:
            continue
        q = " ".join(rng.sample(words, min(1 + len(out) % 3, len(words))))
        if q.lower() not in seen:
            seen.add(q.lower())
            out.append(q)
    return out


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
        if VERBOSE and time.perf_counter() - last > 30:
            last = time.perf_counter()
            log(f"  build lex: {done}/{total}")
    el = time.perf_counter() - t0
    st = cap.stats()
    cap.close()
    return {"frames": st["frames"], "batch": BUILD_BATCH, "elapsed_s": round(el, 2),
            "frames_per_s": round(st["frames"] / el, 1), "payload_raw_bytes": st["payload_raw_bytes"],
            "file_bytes": os.path.getsize(path)}


def build_vec(path: str, uris: list[str], texts: list[str], total: int, real: int, emb: Any) -> dict[str, Any]:
    """``total`` distinct chunks; ``real`` of them (evenly spread) embedded for real, every
    other frame gets the nearest real chunk's vector + N(0, NOISE_SIGMA^2) noise, renormalised."""
    import engine

    total = min(total, len(texts))
    real_idx = np.unique(np.linspace(0, total - 1, real).astype(np.int64))
    real_texts = [texts[i] for i in real_idx]
    emb.embed(real_texts[:8])  # warm-up
    t0 = time.perf_counter()
    vecs = np.concatenate([emb.embed(real_texts[i:i + EMBED_BATCH]) for i in range(0, len(real_texts), EMBED_BATCH)])
    embed_s = time.perf_counter() - t0
    rng = np.random.default_rng(42)
    frames = np.arange(total)
    pos = np.searchsorted(real_idx, frames)
    lo = np.clip(pos - 1, 0, len(real_idx) - 1)
    hi = np.clip(pos, 0, len(real_idx) - 1)
    src = np.where(np.abs(real_idx[hi] - frames) <= np.abs(frames - real_idx[lo]), hi, lo)
    v = vecs[src].copy()
    noisy = real_idx[src] != frames
    v[noisy] += rng.normal(0.0, NOISE_SIGMA, size=(int(noisy.sum()), v.shape[1])).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    cos = float(np.mean(np.sum(v[noisy] * vecs[src][noisy], axis=1))) if noisy.any() else 1.0

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

CONFIG = """
[daemon]
socket = "{dir}/q.sock"
events-socket = "{dir}/e.sock"
log-level = "info"
shutdown-grace-s = 120

[embedding]
model = "{model}"

{capsules}
"""
CAPSULE = """
[[capsule]]
name = "{name}"
path = "{path}"
"""


class Daemon:
    """``memvidd run`` in a subprocess; READY awaited on our own NOTIFY_SOCKET."""

    def __init__(self, directory: Path, capsules: dict[str, str], *, model: str, cache: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.dir = directory
        self.socket = str(directory / "q.sock")
        self.config = directory / "memvidd.toml"
        caps = "".join(CAPSULE.format(name=n, path=p) for n, p in capsules.items())
        self.config.write_text(CONFIG.format(dir=directory, model=model, capsules=caps))
        self.notify_path = str(directory / "notify.sock")
        self.log = directory / "daemon.log"
        self.env = {**os.environ, "XDG_CACHE_HOME": str(cache), "NOTIFY_SOCKET": self.notify_path}
        self.proc: subprocess.Popen[bytes] | None = None
        self.notify: socket.socket | None = None

    def start(self, timeout: float = 600) -> float:
        if os.path.exists(self.notify_path):
            os.unlink(self.notify_path)  # a previous run of this daemon
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(self.notify_path)
        with open(self.log, "ab") as lf:
            t0 = time.perf_counter()
            self.proc = subprocess.Popen([sys.executable, "-m", "memvidd", "run", "--config", str(self.config)],
                                         stdout=lf, stderr=lf, env=self.env, cwd=REPO)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited ({self.proc.returncode}): {self.log.read_text()[-3000:]}")
            if time.perf_counter() - t0 > timeout:
                raise TimeoutError(f"no READY=1: {self.log.read_text()[-3000:]}")
            self.notify.settimeout(0.2)
            try:
                data = self.notify.recv(65536).decode()
            except TimeoutError:
                continue
            if "READY=1" in data.split("\n"):
                return time.perf_counter() - t0

    def status(self) -> dict[str, Any]:
        """VmRSS/VmHWM/RssAnon/RssFile (MiB) of the daemon, and the frames of each capsule."""
        from memvidd.client import Client

        assert self.proc is not None
        out: dict[str, Any] = {}
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                    out[key.lower() + "_mib"] = round(int(line.split()[1]) / 1024, 1)
        with Client(self.socket) as c:
            out["frames"] = {ci.name: ci.frames for ci in c.capsules()}
        return out

    def stop(self) -> float:
        assert self.proc is not None
        t0 = time.perf_counter()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=300)
        if self.notify is not None:
            self.notify.close()
            self.notify = None
        if rc != 0:
            raise RuntimeError(f"daemon exited with {rc}: {self.log.read_text()[-3000:]}")
        return time.perf_counter() - t0

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        if self.notify is not None:
            self.notify.close()
            self.notify = None


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


def producer(c: Any, uri_prefix: str, offset: int, capsule: str, payloads: list[str], barrier: threading.Barrier,
             stop_at: list[float], lat: list[float], errors: list[str]) -> None:
    """One producer thread: ``put`` on its own connection until ``stop_at[0]``."""
    j = 0
    barrier.wait()
    try:
        while time.perf_counter() < stop_at[0]:
            t0 = time.perf_counter()
            c.put(payloads[(offset + j) % len(payloads)], capsule=capsule, uri=f"{uri_prefix}{j}", kind="event")
            lat.append(time.perf_counter() - t0)
            j += 1
    except Exception as e:  # noqa: BLE001 - reported, not raised from a thread
        errors.append(repr(e))


def bench_puts(d: Daemon, capsule: str, texts: list[str], levels: tuple[int, ...], seconds: float) -> dict[str, Any]:
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
                clients[i], f"bench://put/{n}/{i}/", i * 7919, capsule, payloads, barrier, stop_at, lat[i], errors))
                for i in range(n)]
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
        log(f"  puts x{n}: {out[f'threads_{n}']['puts_per_s']}/s, {out[f'threads_{n}']['commits_per_s']} commits/s")
    return out


# -- main -----------------------------------------------------------------------------------------


def environment(tmp_root: str) -> dict[str, Any]:
    def git(*a: str) -> str | None:
        try:
            return subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True,
                                  timeout=10, check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    def ver(mod: str) -> str | None:
        try:
            from importlib.metadata import version

            return version(mod)
        except Exception:
            return None

    status = git("status", "--porcelain", "--", "engine", "memvidd")
    return {
        "python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count(),
        "loadavg_start": loadavg(),
        "packages": {p: ver(p) for p in ("trio", "msgspec", "tantivy", "usearch", "fastembed", "onnxruntime")},
        "git_commit": git("rev-parse", "HEAD"), "code_dirty": None if status is None else bool(status),
        "tmp_dir": tmp_root,
    }


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
        parts.append(f"{lx['build']['frames'] // 1000}k lex socket p50 {s['first']['p50']:.3f} p99 {s['first']['p99']:.3f} "
                     f"ms (in-proc {i['first']['p50']:.3f}), cached {s['cached']['p50']:.3f} ms (in-proc "
                     f"{i['cached']['p50']:.3f}), floor {lx['find']['floor']['socket']['p50']:.0f} us (hello {lx['find']['floor']['socket_hello']['p50']:.0f})")
        for label, key in (("puts", "puts"), ("fresh", "puts_fresh_daemon")):
            p = lx[key]
            parts.append(f"{label} " + " ".join(f"x{v['threads']} {v['puts_per_s']:.0f}/s ({v['commits_per_s']:.0f} c/s)"
                                                for v in p.values()))
        parts.append(f"RSS lex {lx['rss']['after_queries']['vmhwm_mib']} MiB HWM @{lx['rss']['after_queries']['frames']['lex']} fr "
                     f"({lx['rss']['after_puts']['vmhwm_mib']} @{lx['rss']['after_puts']['frames']['lex']})")
    vx = r.get("vector")
    if vx:
        s = vx["find"]["socket"]
        parts.append(f"{vx['build']['frames'] // 1000}k vec p50 first/cached: "
                     + " ".join(f"{m} {s[m]['first']['p50']:.2f}/{s[m]['cached']['p50']:.3f}" for m in s) + " ms")
        parts.append(f"RSS +model {vx['rss']['after_queries']['vmhwm_mib']} MiB HWM")
    ml = r.get("model_lexical_rss")
    if ml:
        parts.append(f"model+lex {ml['after_queries']['vmhwm_mib']} MiB")
    parts.append(f"load {r['env']['loadavg_start'][0]}->{r['loadavg_end'][0]} | {r['elapsed_s']:.0f} s")
    return " | ".join(parts)


def main() -> None:
    global VERBOSE
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, for smoke tests (< 2 min)")
    ap.add_argument("--out", metavar="FILE", help="write the JSON here instead of stdout")
    ap.add_argument("--tmpdir", metavar="DIR", default=None, help="parent of the temporary directory")
    ap.add_argument("--no-vec", action="store_true", help="skip the capsule with vectors and the model")
    ap.add_argument("--frames", type=int, default=None, help="frames of the lexical capsule (default 100000)")
    ap.add_argument("--queries", type=int, default=None, help="queries (default 200)")
    ap.add_argument("-v", "--verbose", action="store_true", help="progress on stderr")
    args = ap.parse_args()
    VERBOSE = args.verbose
    cfg = dict(QUICK if args.quick else FULL)
    if args.frames:
        cfg["lex_frames"] = args.frames
    if args.queries:
        cfg["n_queries"] = args.queries

    t_start = time.perf_counter()
    shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="memvidd-daemon-bench-", dir=args.tmpdir) as tmp_s, \
            tempfile.TemporaryDirectory(prefix="memvidd-daemon-bench-", dir=shm) as runtime:
        tmp = Path(tmp_s)
        cache = tmp / "cache"  # index working copies and the model directory, shared with the daemons
        os.environ["XDG_CACHE_HOME"] = str(cache)
        # the lexical working copies go under $XDG_RUNTIME_DIR (RAM-backed): ours, removed at the end
        os.environ["XDG_RUNTIME_DIR"] = runtime
        result: dict[str, Any] = {
            "benchmark": "memvidd daemon", "mode": "quick" if args.quick else "full",
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "env": {**environment(tmp_s), "runtime_dir": runtime},
        }
        root, nfiles, nbytes, uris, texts = stdlib_chunks()
        queries = make_queries(texts, cfg["n_queries"])
        result["corpus"] = {"source": root, "files": nfiles, "bytes": nbytes, "chunks": len(texts),
                            "chunk_bytes_max": CHUNK_BYTES, "queries": len(queries),
                            "query_examples": queries[:5]}
        lex_path = str(tmp / "lex.mv2")
        vec_path = str(tmp / "vec.mv2")

        from memvidd.client import Client

        # 1. the lexical capsule, a daemon without the model: finds and RSS at 100k frames
        log(f"building the {cfg['lex_frames']}-frame lexical capsule")
        lex: dict[str, Any] = {"build": build_lex(lex_path, uris, texts, cfg["lex_frames"])}
        d = Daemon(tmp / "d-lex", {"lex": lex_path}, model="none", cache=cache)
        try:
            lex["ready_s"] = round(d.start(), 3)
            lex["rss"] = {"ready": d.status()}
            lex["find"] = interleaved_finds(d, lex_path, "lex", queries, ("lex",), cfg)
            lex["rss"]["after_queries"] = d.status()
            lex["stop_s"] = round(d.stop(), 3)
        finally:
            d.kill()
        result["lexical"] = lex

        if not args.no_vec:
            import engine

            emb = engine.Embedder(MODEL, threads=2, batch_size=8)
            log(f"building the {cfg['vec_frames']}-frame capsule with vectors ({cfg['real_chunks']} real)")
            vec: dict[str, Any] = {"build": build_vec(vec_path, uris, texts, cfg["vec_frames"], cfg["real_chunks"], emb)}
            # 2. the model loaded, serving the vector capsule (and the lexical one, bound to no model)
            d = Daemon(tmp / "d-vec", {"vec": vec_path, "lex": lex_path}, model=MODEL, cache=cache)
            try:
                vec["ready_s"] = round(d.start(), 3)
                vec["rss"] = {"ready": d.status()}
                vec["find"] = interleaved_finds(d, vec_path, "vec", queries, ("lex", "hybrid", "vec"), cfg, emb)
                vec["rss"]["after_queries"] = d.status()
                vec["stop_s"] = round(d.stop(), 3)
            finally:
                d.kill()
            vec["rss"]["note"] = "one daemon with the model loaded serving both capsules (vec + the lexical one)"
            result["vector"] = vec
            del emb

            # 3. the model loaded, serving only the lexical capsule (still 100k frames): RSS comparable to 1.
            d = Daemon(tmp / "d-lex-model", {"lex": lex_path}, model=MODEL, cache=cache)
            try:
                ml: dict[str, Any] = {"ready_s": round(d.start(), 3)}
                ml["ready"] = d.status()
                with Client(d.socket) as c:
                    for q in queries:
                        c.find(q, mode="lex")
                ml["after_queries"] = d.status()
                d.stop()
            finally:
                d.kill()
            result["model_lexical_rss"] = ml

        # 4. put throughput, last (it adds frames): on the lexical daemon once it has served the
        # queries, then restarted (no find served: nothing to re-warm after each commit).
        d = Daemon(tmp / "d-lex", {"lex": lex_path}, model="none", cache=cache)
        try:
            d.start()
            with Client(d.socket) as c:
                for q in queries:
                    c.find(q, mode="lex")
            log("put throughput, after finds")
            lex["puts"] = bench_puts(d, "lex", texts, cfg["put_threads"], cfg["put_seconds"])
            lex["rss"]["after_puts"] = d.status()
            d.stop()
            log("put throughput, fresh daemon (no find served)")
            d.start()
            lex["puts_fresh_daemon"] = bench_puts(d, "lex", texts, cfg["put_threads"], cfg["put_seconds"])
            lex["rss"]["fresh_after_puts"] = d.status()
            d.stop()
        finally:
            d.kill()

        result["goals_ms_mib"] = GOALS
        result["goals"] = goals(result)
        result["loadavg_end"] = loadavg()
        result["elapsed_s"] = round(time.perf_counter() - t_start, 1)

    doc = json.dumps(result, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(doc + "\n")
    else:
        print(doc)
    print(summary_line(result), file=sys.stderr)


if __name__ == "__main__":
    main()
