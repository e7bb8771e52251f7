#!/usr/bin/env python3
"""Benchmark of memvidd's directory watcher, end to end, on a real daemon subprocess.

Run::

    cd /work/main && .venv/bin/python -m bench.watch_bench [--quick] [--out FILE] [-v]

Every measurement runs ``python -m memvidd run --config FILE`` with ``watch = [DIR]`` and
talks to it over its socket with ``memvidd.client.Client``, the way an agent would:

1. ``latency``: save-to-searchable latency of single-file edits (lexical, then with the
   embedding model: until the new chunk has its vector);
2. ``index``: initial index of the CPython stdlib source tree (lexical; a 1/4 tree for the
   peak-RSS comparison), restart with nothing changed, and the initial index with
   embeddings, compared with the model's own throughput on the same chunks.

Prints one JSON document (stdout, or ``--out FILE``) and a one-line summary on stderr.
See ``bench/README.md`` for what each figure means. All files (trees, capsules, sockets,
the model cache, daemon logs) live in one temporary directory removed at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import socket
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import (
    MB,
    arg_parser,
    dist,
    environment,
    loadavg,
    log,
    parse_args,
    percentile,
    result_head,
    stdlib_files,
    write_result,
)
from bench.daemon_process import Daemon, daemon_dirs
from memvidd.client import Client
from memvidd.ingest import file_uri

MODEL = "all-MiniLM-L6-v2"

FULL = dict(
    latency_files=50, vec_latency_files=50, lex_edits=200, vec_edits=50, warmup_edits=5,
    tree_max_files=None, embed_direct=500, embed_budget_s=25 * 60, embed_subset_files=300,
    flush_probe_commits=40, probe_chunks=64,
)
QUICK = dict(
    latency_files=20, vec_latency_files=4, lex_edits=30, vec_edits=6, warmup_edits=2,
    tree_max_files=80, embed_direct=24, embed_budget_s=20, embed_subset_files=6,
    flush_probe_commits=10, probe_chunks=16,
)
POLL_S = 0.002  # find polling interval in the latency test
EDIT_TIMEOUT_S = 15.0
EDIT_GAP_S = (0.05, 0.15)  # idle time between two edits (uniform)


# -- the daemon ----------------------------------------------------------------------------

CAPSULE = """
[[capsule]]
name = "bench"
path = "{dir}/bench.mv2"
watch = [{watch}]
"""


def watching(directory: Path, trees: list[Path], *, model: str = "none", cache: Path) -> Daemon:
    """A daemon with one capsule that watches ``trees``."""
    watch = ", ".join(json.dumps(str(t)) for t in trees)
    return Daemon(directory, CAPSULE.format(dir=directory, watch=watch), model=model, cache=cache)


def index_done(st: dict[str, Any]) -> bool:
    ix = st["indexer"]
    handled = ix["files_indexed"] + ix["files_skipped"] + ix["errors"]
    return ix["phase"] == "watching" and ix["queued"] == 0 and handled >= ix["files_to_index"]


def vectors_done(st: dict[str, Any]) -> bool:
    v = st["vectors"]
    return v["frames_with_vectors"] >= v["text_frames"] and v["embedding"]["queued"] == 0


def wait_until(c: Client, pred: Any, interval: float, timeout: float, what: str,
               on_poll: Any = None) -> tuple[dict[str, Any], int]:
    """Poll ``stats()`` until ``pred(stats)``; returns (the stats, polls)."""
    deadline = time.perf_counter() + timeout
    polls = 0
    while True:
        st = c.stats()
        polls += 1
        if on_poll is not None:
            on_poll(st)
        if pred(st):
            return st, polls
        if time.perf_counter() > deadline:
            raise TimeoutError(f"{what}: not done after {timeout} s: indexer={st.get('indexer')}")
        time.sleep(interval)


# -- corpus ----------------------------------------------------------------------------------


def copy_tree(root: Path, files: list[Path], dest: Path) -> dict[str, Any]:
    dest.mkdir(parents=True)
    total = 0
    for p in files:
        q = dest / p.relative_to(root)
        q.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(p, q)
        total += q.stat().st_size
    return {"files": len(files), "bytes": total, "mb": round(total / MB, 2)}


# -- 1. save-to-searchable latency ------------------------------------------------------------


def latency_files(root: Path, files: list[Path], n: int, dest: Path, rng: random.Random) -> list[Path]:
    """``n`` stdlib files of 2-40 KB, copied flat into ``dest``."""
    cands = [p for p in files if 2_000 <= p.stat().st_size <= 40_000]
    picked = rng.sample(cands, n)
    dest.mkdir(parents=True)
    out = []
    for i, p in enumerate(picked):
        q = dest / f"f{i:02d}_{p.name}"
        shutil.copy2(p, q)
        out.append(q)
    return out


class Tail(threading.Thread):
    """A ``tail`` subscriber on its own connection: when each edit's chunk was committed."""

    def __init__(self, sock: str) -> None:
        super().__init__(daemon=True, name="tail")
        self.client = Client(sock, timeout=None)
        self.seen: dict[str, float] = {}  # token -> perf_counter when its chunk arrived
        self.tokens: set[str] = set()
        self.lock = threading.Lock()

    def expect(self, token: str) -> None:
        with self.lock:
            self.tokens.add(token)

    def run(self) -> None:
        try:
            for fr in self.client.tail(kind="chunk"):
                now = time.perf_counter()
                text = fr.text or ""
                with self.lock:
                    for t in [t for t in self.tokens if t in text]:
                        self.tokens.discard(t)
                        self.seen[t] = now
        except OSError:
            pass

    def close(self) -> None:
        with contextlib.suppress(OSError):  # ends the tail stream that run() is blocked in
            self.client.sock.shutdown(socket.SHUT_RDWR)
        self.client.close()


def edit_file(path: Path, content: list[str], token: str, how: str, rng: random.Random, i: int) -> None:
    """Insert a comment line holding ``token`` at a random line, then save the file ``how``."""
    pos = rng.randrange(len(content) + 1)
    content.insert(pos, f"# edit {i}: {token}\n")
    data = "".join(content).encode("utf-8", errors="surrogateescape")
    if how == "write":
        with open(path, "wb") as f:  # truncate + write in place
            f.write(data)
    else:  # an editor's atomic save: write a temp file beside it, rename over
        tmp = path.with_name(f".{path.name}.{i}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)


def bench_latency(tmp: Path, cache: Path, root: Path, files: list[Path], cfg: dict[str, Any], *,
                  model: str, edits: int, rng: random.Random) -> dict[str, Any]:
    """Edits one file at a time; measures write -> first lexical find that returns the token
    (and, with a model, -> the new chunk's vector counted in stats)."""
    tag = "vec" if model != "none" else "lex"
    tree = tmp / f"lat-{tag}"
    n_files = cfg["vec_latency_files" if model != "none" else "latency_files"]
    paths = latency_files(root, files, n_files, tree, rng)
    contents = {p: p.read_text(errors="surrogateescape").splitlines(keepends=True) for p in paths}
    d = watching(tmp / f"d-lat-{tag}", [tree], model=model, cache=cache)
    res: dict[str, Any] = {"model": model, "files": len(paths),
                           "bytes": sum(p.stat().st_size for p in paths), "loadavg_start": loadavg()}
    try:
        res["ready_s"] = round(d.start(), 3)
        with Client(d.socket) as c:
            st, _ = wait_until(c, index_done, 0.05, 300, "latency tree index")
            if model != "none":
                st, _ = wait_until(c, vectors_done, 0.1, 600, "latency tree vectors")
            res["indexed_s"] = round(d.since_start(), 3)
            res["frames_before"] = st["frames"]
            tail = Tail(d.socket)
            tail.start()
            runid = "".join(rng.choice("abcdefghjkmnpqrstuvwxyz") for _ in range(4))
            written_before = st["indexer"]["chunks_written"]
            reused_before = st["indexer"]["vectors_reused"]
            samples: list[dict[str, Any]] = []
            failures = []
            total = cfg["warmup_edits"] + edits
            log(f"latency[{tag}]: {total} edits ({cfg['warmup_edits']} warm-up) on {len(paths)} files")
            for i in range(total):
                time.sleep(rng.uniform(*EDIT_GAP_S))
                p = rng.choice(paths)
                how = "write" if i % 2 == 0 else "rename"
                token = f"tok{runid}{i:05d}q"  # one term for the tokenizer, not changed by stemming
                prefix = file_uri(p) + "#"
                tail.expect(token)
                polls = 0
                t0 = time.perf_counter()
                edit_file(p, contents[p], token, how, rng, i)
                t_written = time.perf_counter()
                hit = None
                while True:
                    hits = c.find(token, mode="lex", k=5, snippet_chars=0)
                    polls += 1
                    hit = next((h for h in hits if (h.uri or "").startswith(prefix)), None)
                    now = time.perf_counter()
                    if hit is not None or now - t0 > EDIT_TIMEOUT_S:
                        break
                    time.sleep(POLL_S)
                t_lex = now
                s: dict[str, Any] = {"i": i, "how": how, "write_s": t_written - t0, "polls": polls}
                if hit is None:
                    failures.append({"i": i, "how": how, "file": p.name, "stage": "lex"})
                    continue
                s["lex_s"] = t_lex - t0
                if model != "none":
                    fid = hit.frame_id
                    vpolls = 0
                    while True:
                        st = c.stats()
                        vpolls += 1
                        now = time.perf_counter()
                        if (st["frames"] > fid and vectors_done(st)) or now - t0 > EDIT_TIMEOUT_S:
                            break
                        time.sleep(POLL_S)
                    if not (st["frames"] > fid and vectors_done(st)):
                        failures.append({"i": i, "how": how, "file": p.name, "stage": "vec"})
                        continue
                    s["vec_s"] = now - t0
                    s["stats_polls"] = vpolls
                    # not timed: the chunk's own text as a vec query should find it
                    chunk = c.get(fid)
                    vh = c.find(chunk.text or "", mode="vec", k=3, snippet_chars=0)
                    s["vec_verified"] = any(h.frame_id == fid for h in vh)
                after = c.stats()["indexer"]  # not timed: what this edit cost the indexer
                s["chunks_written"] = after["chunks_written"] - written_before
                s["vectors_reused"] = after["vectors_reused"] - reused_before
                written_before, reused_before = after["chunks_written"], after["vectors_reused"]
                with tail.lock:
                    seen = tail.seen.get(token)
                if seen is not None:
                    s["commit_seen_s"] = seen - t0
                if i >= cfg["warmup_edits"]:
                    samples.append(s)
            tail.close()
            st = c.stats()
            res["daemon_status"] = d.status()
            res["stats_after"] = {"frames": st["frames"], "commit_seq": st["commit_seq"],
                                  "indexer": {k: st["indexer"][k] for k in (
                                      "files_indexed", "chunks_written", "chunks_kept", "vectors_reused",
                                      "errors")}}
        res["stop_s"] = round(d.stop(), 3)
    finally:
        d.kill()
    res["edits"] = len(samples)
    res["warmup_edits"] = cfg["warmup_edits"]
    res["failures"] = failures
    res["poll_interval_ms"] = POLL_S * 1e3
    res["save_to_lex_searchable"] = dist([s["lex_s"] for s in samples])
    for how in ("write", "rename"):
        res[f"save_to_lex_searchable_{how}"] = dist([s["lex_s"] for s in samples if s["how"] == how])
    res["save_to_commit_seen_by_tail"] = dist([s["commit_seen_s"] for s in samples if "commit_seen_s" in s])
    res["commit_seen_to_lex_searchable"] = dist(
        [s["lex_s"] - s["commit_seen_s"] for s in samples if "commit_seen_s" in s])
    res["write_call"] = dist([s["write_s"] for s in samples])
    res["chunks_written_per_edit"] = spread([s["chunks_written"] for s in samples])
    res["new_texts_per_edit"] = {**spread([s["chunks_written"] - s["vectors_reused"] for s in samples]),
                                 "note": "chunks written whose text had no vector to reuse"}
    res["find_polls"] = {"p50": percentile(sorted(s["polls"] for s in samples), 50),
                         "max": max((s["polls"] for s in samples), default=0)}
    if model != "none":
        res["save_to_vector_covered"] = dist([s["vec_s"] for s in samples])
        res["lex_to_vector_covered"] = dist([s["vec_s"] - s["lex_s"] for s in samples])
        res["vec_query_finds_new_chunk_top3"] = sum(1 for s in samples if s.get("vec_verified"))
        res["save_to_vector_covered_one_new_text"] = dist(
            [s["vec_s"] for s in samples if s["chunks_written"] - s["vectors_reused"] == 1])
        res["slowest_vec_edits"] = sorted(({"vec_ms": round(s["vec_s"] * 1e3, 1),
                                            "lex_ms": round(s["lex_s"] * 1e3, 1),
                                            "chunks_written": s["chunks_written"],
                                            "vectors_reused": s["vectors_reused"], "how": s["how"]}
                                           for s in samples), key=lambda x: -x["vec_ms"])[:5]
    res["loadavg_end"] = loadavg()
    return res


def spread(counts: list[int]) -> dict[str, Any]:
    xs = sorted(counts)
    return {"p50": percentile(xs, 50), "p90": percentile(xs, 90), "max": max(xs, default=0)}


def lex_flush_probe(tmp: Path, latency_tree: list[Path] | None, commits: int) -> dict[str, Any]:
    """In-process, no daemon: what one small commit costs before a lexical find sees it.

    The engine feeds each commit to Tantivy but commits Tantivy lazily, in the first find
    after it (``LexIndex.flush``). Measured on a capsule with the engine's default working
    copies (``default_location``: the lexical one under $XDG_RUNTIME_DIR, here /dev/shm)
    and with ``index_dir`` on the temp disk (``disk_index_dir``): ``engine_commit`` (put of
    one small edit + capsule commit), ``first_find_after_commit`` (includes that Tantivy
    commit + reload), a ``second_find`` of another token (nothing left to flush); then
    Tantivy's ``writer.commit()`` alone on a disk directory and in memory."""
    import engine
    from engine.lexical import LexIndex

    d = tmp / "flush-probe"
    d.mkdir()
    out: dict[str, Any] = {"commits": commits}
    for label, opts in (("default_location", {}), ("disk_index_dir", {"index_dir": str(d / "ix")})):
        cap = engine.create(str(d / f"{label}.mv2"), model=None, **opts)
        try:
            cap.find("warm", k=1, mode="lex")
            seed = [p.read_text(errors="replace")[:1500] for p in (latency_tree or [])][:50]
            seed = seed or ["seed text"] * 50
            cap.put_many([{"text": t, "uri": f"probe://seed/{i}"} for i, t in enumerate(seed)])
            cap.commit()
            cap.find("warm", k=1, mode="lex")
            where = cap.stats()["search"]["lexical"]["working_copy"]
            commit_s, first_s, second_s = [], [], []
            for i in range(commits):
                cap.put(f"an edit with probe{i:05d}q and more text", uri=f"probe://doc/{i % 7}")
                t0 = time.perf_counter()
                cap.commit()
                t1 = time.perf_counter()
                h = cap.find(f"probe{i:05d}q", k=5, mode="lex", snippet_chars=0)
                t2 = time.perf_counter()
                cap.find(f"seed other{i}", k=5, mode="lex", snippet_chars=0)
                t3 = time.perf_counter()
                assert len(h) == 1, "the probe token was not found"
                commit_s.append(t1 - t0)
                first_s.append(t2 - t1)
                second_s.append(t3 - t2)
        finally:
            cap.close()
        out[label] = {"working_copy": where, "engine_commit": dist(commit_s),
                      "first_find_after_commit": dist(first_s), "second_find": dist(second_s)}
    # the Tantivy commit alone, on disk and in RAM (same documents)
    import engine.format as fmt

    def meta(fid: int) -> Any:
        return fmt.FrameMeta(id=fid, seq=1, op=fmt.PUT, supersedes=None, block=0, start=0, length=1,
                             digest=bytes(16), is_text=True, chunk=None, uri=f"probe://{fid}", title=None,
                             kind=None, tags={}, timestamp=0.0, parent=None)

    tv: dict[str, list[float]] = {"disk": [], "ram": []}
    for label, samples in tv.items():
        ix = LexIndex(d / "raw" if label == "disk" else None)
        for i in range(50):
            ix.add(meta(i), f"seed text {i} " * 40)
        ix.flush()
        for i in range(commits):
            ix.add(meta(1000 + i), f"probe{i}q")
            t0 = time.perf_counter()
            ix.writer.commit()
            samples.append(time.perf_counter() - t0)
            ix.index.reload()
            ix.dirty = False
        ix.close()
    shutil.rmtree(d, ignore_errors=True)
    return {**out, "tantivy_writer_commit_disk": dist(tv["disk"]),
            "tantivy_writer_commit_ram": dist(tv["ram"]),
            "loadavg": loadavg()}


# -- 2. initial index, restart, RSS ------------------------------------------------------------


def initial_index(d: Daemon, *, vectors: bool, timeout: float) -> dict[str, Any]:
    """Start ``d`` and wait until its tree is indexed (and, with ``vectors``, embedded)."""
    la0 = loadavg()
    ready = d.start()
    marks: dict[str, float] = {"ready_s": ready}
    trace: list[tuple[float, int, int]] = []  # (t, frames, frames_with_vectors) for the record

    def note(st: dict[str, Any]) -> None:
        v = st.get("vectors") or {}
        trace.append((round(d.since_start(), 2), st["frames"], v.get("frames_with_vectors", 0)))
        if "scan_done_s" not in marks and st["indexer"]["phase"] not in ("starting", "scanning"):
            marks["scan_done_s"] = d.since_start()

    with Client(d.socket) as c:
        st, polls = wait_until(c, index_done, 0.25 if not vectors else 0.5, timeout, "initial index", note)
        marks["watching_s"] = d.since_start()
        c.flush()
        marks["flushed_s"] = d.since_start()
        if vectors:
            st, p2 = wait_until(c, vectors_done, 0.5, timeout, "vector coverage", note)
            polls += p2
            marks["vectors_covered_s"] = d.since_start()
        t = time.perf_counter()
        st = c.stats()
        stats_ms = (time.perf_counter() - t) * 1e3
        cpu = d.cpu_s()
        status = d.status()
    ix = st["indexer"]
    el = marks["watching_s"]
    out: dict[str, Any] = {
        **{k: round(v, 3) for k, v in marks.items()},
        "files_seen": ix["files_seen"], "files_indexed": ix["files_indexed"],
        "files_skipped": ix["files_skipped"],
        "errors": ix["errors"], "mb_read": ix["mb_read"], "chunks_written": ix["chunks_written"],
        "scan_seconds": ix["scan_seconds"], "frames": st["frames"], "commits": st["daemon"]["commits"],
        "files_per_s_from_start": round(ix["files_indexed"] / el, 1),
        "mb_per_s_from_start": round(ix["bytes_read"] / MB / el, 3),
        "files_per_s_from_ready": round(ix["files_indexed"] / (el - ready), 1),
        "mb_per_s_from_ready": round(ix["bytes_read"] / MB / (el - ready), 3),
        "chunks_per_s_from_ready": round(ix["chunks_written"] / (el - ready), 1),
        "capsule_bytes": st["file_bytes"], "checkpoints": st["checkpoints"],
        "daemon_cpu_s": round(cpu, 2), "daemon_cpu_over_wall": round(cpu / d.since_start(), 3),
        **status, "stats_call_ms": round(stats_ms, 2), "stats_polls": polls,
        "loadavg_start": la0, "loadavg_end": loadavg(),
    }
    if vectors:
        v = st["vectors"]
        emb_el = marks["vectors_covered_s"] - ready
        out["vectors"] = {
            "text_frames": v["text_frames"], "frames_with_vectors": v["frames_with_vectors"],
            "engine_embedding": v["embedding"],
            "chunks_per_s_ready_to_covered": round(v["text_frames"] / emb_el, 2),
            "covered_after_lexical_s": round(marks["vectors_covered_s"] - marks["watching_s"], 3),
        }
    step = max(1, len(trace) // 40)
    out["trace_t_frames_vectors"] = trace[::step] + ([trace[-1]] if trace and (len(trace) - 1) % step else [])
    return out


def restart(d: Daemon) -> dict[str, Any]:
    """Stop (SIGTERM) and start again with nothing changed on disk."""
    stop_s = d.stop()
    la0 = loadavg()
    ready = d.start()
    with Client(d.socket) as c:
        connected = d.since_start()
        st, polls = wait_until(c, lambda s: s["indexer"]["phase"] == "watching" and index_done(s),
                               0.01, 120, "restart")
        watching = d.since_start()
    ix = st["indexer"]
    out = {
        "stop_s": round(stop_s, 3), "ready_s": round(ready, 3), "first_stats_s": round(connected, 3),
        "watching_s": round(watching, 3), "polls": polls,
        "bytes_read": ix["bytes_read"], "files_seen": ix["files_seen"],
        "files_unchanged": ix["files_unchanged"],
        "files_to_index": ix["files_to_index"], "files_indexed": ix["files_indexed"],
        "scan_seconds": ix["scan_seconds"], "documents": ix["documents"], "frames": st["frames"],
        "no_file_reread": ix["bytes_read"] == 0 and ix["files_to_index"] == 0,
        "goal_watching_under_2s": watching < 2.0, **d.status(), "loadavg_start": la0,
    }
    return out


def fetch_chunk_texts(c: Client, frames: int, n: int, rng: random.Random) -> list[str]:
    """``n`` random chunk frames, as the engine's embedder sees them (title, newline, text)."""
    out: list[str] = []
    tried: set[int] = set()
    while len(out) < n and len(tried) < frames:
        fid = rng.randrange(frames)
        if fid in tried:
            continue
        tried.add(fid)
        fr = c.get(fid)
        if fr.kind != "chunk" or fr.text is None:
            continue
        out.append(f"{fr.title}\n{fr.text}" if fr.title else fr.text)
    return out


def direct_embedding(texts: list[str], cache: Path) -> dict[str, Any]:
    """The model's own throughput: ``Embedder(threads=2, batch_size=8)`` on ``texts``."""
    os.environ["XDG_CACHE_HOME"] = str(cache)
    import engine

    t0 = time.perf_counter()
    emb = engine.Embedder(MODEL, threads=2, batch_size=8)
    load_s = time.perf_counter() - t0
    emb.embed(texts[:8])  # warm-up
    t0 = time.perf_counter()
    emb.embed(texts)
    el = time.perf_counter() - t0
    return {"chunks": len(texts), "threads": 2, "batch_size": 8, "seconds": round(el, 3),
            "chunks_per_s": round(len(texts) / el, 2), "model_load_s": round(load_s, 3),
            "chars_mean": round(statistics.fmean(len(t) for t in texts), 1), "loadavg": loadavg()}


def link_copies(src: Path, dest: Path, k: int) -> dict[str, Any]:
    """``k`` copies of the tree ``src`` side by side under ``dest`` (hard links: the
    indexer reads them as ``k`` times as many files)."""
    files = bytes_ = 0
    for i in range(k):
        for p in src.rglob("*"):
            if p.is_file():
                q = dest / f"copy{i}" / p.relative_to(src)
                q.parent.mkdir(parents=True, exist_ok=True)
                os.link(p, q)
                files += 1
                bytes_ += q.stat().st_size
    return {"copies": k, "files": files, "bytes": bytes_, "mb": round(bytes_ / MB, 2)}


def rss_point(tree: dict[str, Any], run: dict[str, Any]) -> dict[str, Any]:
    return {"mb": tree["mb"], "frames": run["frames"], "vmhwm_mib": run["vmhwm_mib"],
            "vmrss_mib": run["vmrss_mib"], "rssanon_mib": run.get("rssanon_mib"),
            "rssfile_mib": run.get("rssfile_mib")}


def growth(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """RSS from run ``a`` to the larger run ``b``: in MiB, and per 1k more frames."""
    per_1k = max(1, (b["frames"] - a["frames"]) / 1000)
    return {
        "anon_growth_kib_per_1k_frames": round((b["rssanon_mib"] - a["rssanon_mib"]) * 1024 / per_1k, 1)
        if b.get("rssanon_mib") is not None and a.get("rssanon_mib") is not None else None,
        "hwm_growth_mib": round(b["vmhwm_mib"] - a["vmhwm_mib"], 1),
        "hwm_growth_kib_per_1k_frames": round((b["vmhwm_mib"] - a["vmhwm_mib"]) * 1024 / per_1k, 1),
        "hwm_ratio": round(b["vmhwm_mib"] / a["vmhwm_mib"], 3),
    }


def bench_index(tmp: Path, cache: Path, root: Path, files: list[Path], cfg: dict[str, Any],
                rng: random.Random, embed_files: str, do_embed: bool, scale: int = 0) -> dict[str, Any]:
    res: dict[str, Any] = {}
    full = tmp / "tree-full"
    quarter_files = sorted(rng.sample(files, max(1, len(files) // 4)))
    log(f"copying {len(files)} files")
    res["tree_full"] = copy_tree(root, files, full)
    res["tree_quarter"] = copy_tree(root, quarter_files, tmp / "tree-quarter")

    log("lexical initial index: 1/4 tree")
    d = watching(tmp / "d-quarter", [tmp / "tree-quarter"], cache=cache)
    try:
        res["lexical_quarter"] = initial_index(d, vectors=False, timeout=1800)
        res["lexical_quarter"]["stop_s"] = round(d.stop(), 3)
    finally:
        d.kill()
    shutil.rmtree(tmp / "d-quarter")

    log("lexical initial index: full tree")
    d = watching(tmp / "d-full", [full], cache=cache)
    try:
        res["lexical_full"] = initial_index(d, vectors=False, timeout=3600)
        with Client(d.socket) as c:
            frames = c.stats()["frames"]
            probe = fetch_chunk_texts(c, frames, cfg["probe_chunks"], random.Random(5))
        log("restart with nothing changed")
        res["restart"] = restart(d)
        res["restart"]["stop_after_s"] = round(d.stop(), 3)
    finally:
        d.kill()
    shutil.rmtree(tmp / "d-full")
    if scale > 1:
        log(f"lexical initial index: {scale} copies of the full tree")
        res[f"tree_x{scale}"] = link_copies(full, tmp / f"tree-x{scale}", scale)
        d = watching(tmp / "d-scaled", [tmp / f"tree-x{scale}"], cache=cache)
        try:
            res[f"lexical_x{scale}"] = initial_index(d, vectors=False, timeout=3 * 3600)
            res[f"lexical_x{scale}"]["stop_s"] = round(d.stop(), 3)
        finally:
            d.kill()
        shutil.rmtree(tmp / "d-scaled")
        shutil.rmtree(tmp / f"tree-x{scale}")
    q = rss_point(res["tree_quarter"], res["lexical_quarter"])
    f = rss_point(res["tree_full"], res["lexical_full"])
    res["rss_vs_tree_size"] = {"quarter": q, "full": f, **growth(q, f),
                               "full_over_quarter_hwm": growth(q, f)["hwm_ratio"]}
    if scale > 1:
        x = rss_point(res[f"tree_x{scale}"], res[f"lexical_x{scale}"])
        res["rss_vs_tree_size"][f"x{scale}"] = x
        res["rss_vs_tree_size"][f"full_to_x{scale}"] = growth(f, x)
    if not do_embed:
        return res

    # Embedded run: full tree if the model would get through it within the budget.
    est = direct_embedding(probe, cache)
    chunks_full = res["lexical_full"]["chunks_written"]
    est_s = chunks_full / est["chunks_per_s"]
    if embed_files == "full" or (embed_files == "auto" and est_s <= cfg["embed_budget_s"]):
        tree, which = full, {"tree": "full", "files": res["tree_full"]["files"], "mb": res["tree_full"]["mb"]}
    else:
        n = cfg["embed_subset_files"] if embed_files == "auto" else int(embed_files)
        sub = sorted(random.Random(11).sample(files, min(n, len(files))))
        tree = tmp / "tree-subset"
        info = copy_tree(root, sub, tree)
        which = {"tree": "random subset", **info}
    res["embedding_plan"] = {
        "probe": {k: est[k] for k in ("chunks", "chunks_per_s", "model_load_s")},
        "full_tree_chunks": chunks_full, "estimated_full_tree_s": round(est_s, 1),
        "budget_s": cfg["embed_budget_s"], "choice": embed_files, **which,
    }
    log(f"initial index with embeddings: {which} (full tree estimated {est_s:.0f} s of embedding)")
    d = watching(tmp / "d-embed", [tree], model=MODEL, cache=cache)
    try:
        res["embedded"] = initial_index(d, vectors=True, timeout=4 * 3600)
        with Client(d.socket) as c:
            texts = fetch_chunk_texts(c, res["embedded"]["frames"], cfg["embed_direct"], random.Random(3))
        res["embedded"]["stop_s"] = round(d.stop(), 3)
    finally:
        d.kill()
    shutil.rmtree(tmp / "d-embed")
    log(f"direct embedding of {len(texts)} of its chunks")
    direct = direct_embedding(texts, cache)
    res["embedded"]["direct_model"] = direct
    res["embedded"]["daemon_over_direct_chunks_per_s"] = round(
        res["embedded"]["vectors"]["chunks_per_s_ready_to_covered"] / direct["chunks_per_s"], 3)
    return res


# -- main --------------------------------------------------------------------------------------


def goals(r: dict[str, Any]) -> dict[str, Any]:
    g: dict[str, Any] = {}
    lat = r.get("latency", {})
    if "lex" in lat:
        g["lex_save_to_searchable_p50_under_150ms"] = lat["lex"]["save_to_lex_searchable"]["p50"] < 150
    if "vec" in lat:
        g["vec_save_to_vector_p50_under_300ms"] = lat["vec"]["save_to_vector_covered"]["p50"] < 300
    ix = r.get("index", {})
    if "restart" in ix:
        g["restart_watching_under_2s"] = ix["restart"]["goal_watching_under_2s"]
        g["restart_reads_no_file"] = ix["restart"]["no_file_reread"]
    return g


def summary_line(r: dict[str, Any]) -> str:
    parts = []
    lat = r.get("latency", {})
    if "lex" in lat:
        s = lat["lex"]["save_to_lex_searchable"]
        parts.append(f"save->lex p50 {s['p50']:.0f} p90 {s['p90']:.0f} p99 {s['p99']:.0f} "
                     f"max {s['max']:.0f} ms (n={s['n']}, fail {len(lat['lex']['failures'])})")
    if "vec" in lat:
        s = lat["vec"]["save_to_vector_covered"]
        parts.append(f"save->vec p50 {s['p50']:.0f} p90 {s['p90']:.0f} max {s['max']:.0f} ms (n={s['n']})")
    ix = r.get("index", {})
    if "lexical_full" in ix:
        f = ix["lexical_full"]
        parts.append(f"index {ix['tree_full']['files']} files {ix['tree_full']['mb']} MB: "
                     f"{f['watching_s']:.1f} s {f['files_per_s_from_start']} files/s "
                     f"{f['mb_per_s_from_start']} MB/s")
    if "restart" in ix:
        rs = ix["restart"]
        parts.append(f"restart ready {rs['ready_s']:.2f} s watching {rs['watching_s']:.2f} s "
                     f"read {rs['bytes_read']} B")
    if "rss_vs_tree_size" in ix:
        q = ix["rss_vs_tree_size"]
        parts.append(f"HWM {q['quarter']['vmhwm_mib']} MiB @{q['quarter']['frames']} fr -> "
                     f"{q['full']['vmhwm_mib']} MiB @{q['full']['frames']} fr"
                     + "".join(f" -> {v['vmhwm_mib']} MiB @{v['frames']} fr" for k, v in q.items()
                               if k.startswith("x") and isinstance(v, dict)))
    if "embedded" in ix:
        e = ix["embedded"]
        plan = ix["embedding_plan"]
        parts.append(f"embedded {plan['tree']} {plan['files']} files: covered "
                     f"{e['vectors_covered_s']:.0f} s, {e['vectors']['chunks_per_s_ready_to_covered']} ch/s "
                     f"(model alone {e['direct_model']['chunks_per_s']}), HWM {e['vmhwm_mib']} MiB")
    parts.append(f"load {r['env']['loadavg_start'][0]}->{r['loadavg_end'][0]} | {r['elapsed_s']:.0f} s")
    return " | ".join(parts)


def main() -> None:
    ap = arg_parser(__doc__, quick="small sizes, for smoke tests (< 2 min)")
    ap.add_argument("--only", choices=("latency", "index"), default=None, help="run one part only")
    ap.add_argument("--no-embed", action="store_true", help="skip every run with the embedding model")
    ap.add_argument("--skip-tests", action="store_true",
                    help="leave the stdlib's test directories out of the tree")
    ap.add_argument("--edits", type=int, default=None, help="lexical latency edits (default 200)")
    ap.add_argument("--vec-edits", type=int, default=None, help="latency edits with embeddings (default 50)")
    ap.add_argument("--embed-files", default="auto",
                    help="tree of the embedded initial index: auto (full tree if estimated within "
                         "25 min, else a random 300 files), full, or a number of random files")
    ap.add_argument("--scale", type=int, default=0, metavar="K",
                    help="also index K hard-linked copies of the full tree (RSS against tree size)")
    ap.add_argument("--seed", type=int, default=20240611)
    args = parse_args(ap)
    cfg = dict(QUICK if args.quick else FULL)
    if args.edits is not None:
        cfg["lex_edits"] = args.edits
    if args.vec_edits is not None:
        cfg["vec_edits"] = args.vec_edits

    t_start = time.perf_counter()
    rng = random.Random(args.seed)
    root, files = stdlib_files(args.skip_tests)
    if cfg["tree_max_files"]:
        files = sorted(random.Random(args.seed).sample(files, cfg["tree_max_files"]))
    with daemon_dirs("memvidd-watch-bench-", args.tmpdir) as (tmp, runtime):
        cache = tmp / "cache"  # model directory and index working copies: removed with the rest
        packages = ("watchfiles", "trio", "tantivy", "usearch", "fastembed", "onnxruntime")
        result: dict[str, Any] = {
            **result_head("memvidd watcher", args.quick),
            "env": environment(str(tmp), packages=packages, runtime_dir=runtime),
            "corpus": {"source": str(root), "skip_tests": args.skip_tests, "files": len(files)},
        }
        if args.only in (None, "latency"):
            result["latency"] = {"lex": bench_latency(tmp, cache, root, files, cfg, model="none",
                                                      edits=cfg["lex_edits"], rng=rng)}
            log("in-process probe: commit -> lexical visibility")
            result["latency"]["lex_flush_probe"] = lex_flush_probe(tmp, None, cfg["flush_probe_commits"])
            if not args.no_embed:
                result["latency"]["vec"] = bench_latency(tmp, cache, root, files, cfg, model=MODEL,
                                                         edits=cfg["vec_edits"], rng=rng)
        if args.only in (None, "index"):
            result["index"] = bench_index(tmp, cache, root, files, cfg, rng, args.embed_files,
                                          not args.no_embed, args.scale)
        result["goals"] = goals(result)
        result["loadavg_end"] = loadavg()
        result["elapsed_s"] = round(time.perf_counter() - t_start, 1)

    write_result(result, args.out, summary_line)


if __name__ == "__main__":
    main()
