#!/usr/bin/env python3
"""Benchmark of codec upgrades and compaction (issue 6) on real data.

Run::

    cd /work/main && .venv/bin/python -m bench.codec_bench [--quick] [--out FILE]

Three parts, each with its baselines measured in the same run on the same bytes:

1. ``stdlib``: the CPython standard library in 2 KB chunks. Stored/raw of fresh puts
   (zstd-3 per frame), after ``upgrade_codecs()``, and plain zstandard on the same chunks:
   per chunk at level 3 and 19, per chunk with a trained dictionary, groups of 32 chunks
   at level 19, and the whole corpus as one stream (the best case). Random ``get`` p50
   with a cold block cache, before and after.
2. ``events``: ~200-byte events (log lines and chat turns made from the SciFact corpus).
   The same figures, plus fresh puts after the upgrade trained a dictionary.
3. ``days``: a capsule of stdlib chunks where 1% of the chunks change every day for 30
   simulated days: file bytes per day, then after compaction (all history kept), and
   after compaction under ``max_versions=2``.
4. ``encryption``: the same stdlib chunks in a plain and in an encrypted capsule, side by
   side: ingest MB/s, cold ``get`` p50, lexical ``find`` p50, file bytes, and the time to
   open (the Argon2id derivation at its default costs included).

Prints one JSON document and a one-line summary on stderr.
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import zstandard

import engine
from bench.common import Corpus, arg_parser, dist, loadavg, log, parse_args, ratio, result_head, write_result

SCIFACT = Path("/work/shared/data/scifact/corpus.jsonl")
FULL = dict(corpus_max_bytes=None, events=100_000, get_samples=2000, days=30, day_corpus_bytes=8_000_000)
QUICK = dict(corpus_max_bytes=2_000_000, events=10_000, get_samples=300, days=30, day_corpus_bytes=1_000_000)


# -- baselines: zstandard alone on the same payloads ----------------------------------


def baselines(payloads: list[bytes]) -> dict[str, Any]:
    raw = sum(map(len, payloads))
    z3 = zstandard.ZstdCompressor(level=3)
    z19 = zstandard.ZstdCompressor(level=19)
    rng = random.Random(0)
    sample = rng.sample(payloads, min(len(payloads), 4000))
    zdict = zstandard.train_dictionary(64 << 10, sample)
    zd3 = zstandard.ZstdCompressor(level=3, dict_data=zdict)
    groups = [b"".join(payloads[i : i + 32]) for i in range(0, len(payloads), 32)]
    out = {
        "per_frame_zstd3": sum(len(z3.compress(p)) for p in payloads) / raw,
        "per_frame_zstd19": sum(len(z19.compress(p)) for p in payloads) / raw,
        "per_frame_zstd3_dict64k":
            (sum(len(zd3.compress(p)) for p in payloads) + len(zdict.as_bytes())) / raw,
        "groups32_zstd19": sum(len(z19.compress(g)) for g in groups) / raw,
        "one_stream_zstd19":
            len(zstandard.ZstdCompressor(level=19, threads=-1).compress(b"".join(payloads))) / raw,
    }
    return {k: round(v, 4) for k, v in out.items()}


# -- capsule side ---------------------------------------------------------------------


def stored_over_raw(stats: dict[str, Any]) -> float:
    c = stats["codecs"]
    return round(sum(x["stored_bytes"] for x in c.values()) / sum(x["raw_bytes"] for x in c.values()), 4)


def cold_gets(cap: engine.Capsule, ids: list[int]) -> dict[str, Any]:
    times = []
    for fid in ids:
        cap._s.blocks.clear()  # a cold block cache: the cost of decoding the frame's block
        t0 = time.perf_counter()
        cap.get(fid)
        times.append(time.perf_counter() - t0)
    return dist(times, "us")


def upgrade_run(path: str, payloads: list[bytes], gets: int, *, texts: bool,
                batch: int = 256) -> dict[str, Any]:
    with engine.create(path, model=None, checkpoint_frames=1 << 30) as cap:
        t0 = time.perf_counter()
        for i in range(0, len(payloads), batch):
            cap.put_many({"text" if texts else "data": p.decode("utf-8", "surrogateescape") if texts else p}
                         for p in payloads[i : i + batch])
            cap.commit()
        ingest_s = time.perf_counter() - t0
        before = cap.stats()
        ids = random.Random(1).sample(range(len(payloads)), min(gets, len(payloads)))
        get_before = cold_gets(cap, ids)
        log(f"upgrade {len(payloads)} frames")
        t0 = time.perf_counter()
        done = cap.upgrade_codecs()
        up_s = time.perf_counter() - t0
        after = cap.stats()
        get_after = cold_gets(cap, ids)
        check = random.Random(2).sample(range(len(payloads)), min(500, len(payloads)))
        assert all(cap.get(i).payload == payloads[i] for i in check), "payload changed by the upgrade"
        raw = sum(map(len, payloads))
        return {
            "frames": len(payloads), "raw_bytes": raw, "ingest_mb_per_s": round(raw / ingest_s / 1e6, 1),
            "stored_over_raw_before": stored_over_raw(before),
            "stored_over_raw_after": stored_over_raw(after),
            "improvement": ratio(stored_over_raw(before), stored_over_raw(after), 2),
            "file_bytes_before": before["file_bytes"], "file_bytes_after": after["file_bytes"],
            "dead_bytes_after": after["bytes_by_kind"]["dead"],
            "codecs_after": after["codecs"], "upgrade": {**done, "seconds": round(up_s, 2),
                                                         "mb_per_s": round(raw / up_s / 1e6, 2)},
            "dictionaries": after["upgrades"]["dictionaries"],
            "get_cold_before": get_before, "get_cold_after": get_after,
            "get_p50_ratio_after_over_before": ratio(get_after["p50"], get_before["p50"], 2),
        }


def fresh_after_dict(path: str, more: list[bytes]) -> dict[str, Any] | None:
    """Ratio of fresh single-frame puts once the capsule has a dictionary."""
    with engine.open(path) as cap:
        if not cap.stats()["upgrades"]["dictionaries"]:
            return None
        before = dict(cap.stats()["codecs"])
        for p in more:
            cap.put(p.decode())
            cap.commit()
        after = cap.stats()["codecs"]

    def total(c: dict[str, Any], key: str) -> int:
        return sum(x[key] for x in c.values())

    raw = total(after, "raw_bytes") - total(before, "raw_bytes")
    stored = total(after, "stored_bytes") - total(before, "stored_bytes")
    return {"frames": len(more), "stored_over_raw": round(stored / raw, 4)}


def make_events(n: int, seed: int = 0) -> list[bytes]:
    """Log lines and chat turns of ~100-300 bytes."""
    rng = random.Random(seed)
    sentences: list[str] = []
    if SCIFACT.exists():
        with SCIFACT.open() as f:
            for line in f:
                text = json.loads(line).get("text", "")
                sentences += [s.strip() for s in text.split(". ") if 40 < len(s) < 220]
                if len(sentences) > 50_000:
                    break
    services = ["api", "auth", "search", "billing", "worker", "gateway"]
    paths = ["/v1/items", "/v1/search", "/login", "/v1/users/me", "/v1/orders", "/healthz"]
    out = []
    for i in range(n):
        if sentences and rng.random() < 0.5:
            role = rng.choice(["user", "assistant"])
            text = rng.choice(sentences)
            out.append(f'{{"t": {1_790_000_000 + i}, "role": "{role}", "text": "{text}"}}'.encode())
        else:
            out.append(
                f"2026-11-{rng.randint(1, 28):02d}T{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:"
                f"{rng.randint(0, 59):02d}.{rng.randint(0, 999):03d}Z "
                f"{rng.choice(['INFO', 'INFO', 'WARN', 'ERROR'])} "
                f"{rng.choice(services)} method={rng.choice(['GET', 'POST'])} path={rng.choice(paths)} "
                f"status={rng.choice([200, 200, 201, 304, 404, 500])} duration_ms={rng.randint(1, 2000)} "
                f"request_id={rng.getrandbits(64):016x} user=u{rng.randint(1, 500)}".encode())
    return out


# -- 30 days of edits -----------------------------------------------------------------


def days_run(tmp: str, corpus: Corpus, days: int) -> dict[str, Any]:
    path = f"{tmp}/days.mv2"
    rng = random.Random(3)
    texts = [corpus.text(i) for i in range(len(corpus))]
    with engine.create(path, model=None) as cap:
        for i in range(0, len(texts), 256):
            batch = range(i, min(i + 256, len(texts)))
            cap.put_many({"text": texts[j], "uri": corpus.uris[j]} for j in batch)
            cap.commit()
        sizes = [cap.stats()["file_bytes"]]
        live_raw = sum(len(t.encode("utf-8", "surrogateescape")) for t in texts)
        changed = max(1, len(texts) // 100)
        for day in range(1, days + 1):
            for j in rng.sample(range(len(texts)), changed):
                texts[j] = texts[j] + f"\n# edited on day {day}\n"
                cap.put(texts[j], uri=corpus.uris[j])
            cap.commit()
            sizes.append(cap.stats()["file_bytes"])
        st = cap.stats()
        t0 = time.perf_counter()
        kept = cap.compact()
        compact_s = time.perf_counter() - t0
        after_all = cap.stats()
        cap.set_rules({"default": {"max_versions": 2}})
        pruned = cap.compact()
        after_pruned = cap.stats()
    assert engine.verify(path).ok
    return {
        "chunks": len(texts), "changed_per_day": changed, "days": days, "live_raw_bytes": live_raw,
        "history_raw_bytes": st["payload_raw_bytes"],
        "file_bytes_by_day": sizes[:: max(1, days // 10)] + [sizes[-1]],
        "file_bytes_day0": sizes[0], "file_bytes_day_last": sizes[-1],
        "growth_over_days": ratio(sizes[-1], sizes[0], 3),
        "dead_bytes_before_compaction": st["bytes_by_kind"]["dead"],
        "compact_all_history": {**kept, "seconds": round(compact_s, 2),
                                "reclaimed_bytes": kept["bytes_before"] - kept["bytes_after"],
                                "file_over_live_raw": round(after_all["file_bytes"] / live_raw, 4)},
        "compact_max_versions_2": {
            **pruned, "reclaimed_bytes": pruned["bytes_before"] - pruned["bytes_after"],
            "file_over_live_raw": round(after_pruned["file_bytes"] / live_raw, 4),
            "expired_frames": after_pruned["retention"]["expired_frames"]},
    }


def encryption_run(tmp: str, corpus: Corpus, gets: int) -> dict[str, Any]:
    texts = [corpus.text(i) for i in range(len(corpus))]
    rng = random.Random(4)
    ids = rng.sample(range(len(texts)), min(gets, len(texts)))
    words = [w for t in rng.sample(texts, 200) for w in t.split() if w.isalpha() and len(w) > 4][:400]
    queries = [" ".join(rng.sample(words, 2)) for _ in range(200)]
    out: dict[str, Any] = {}
    for name, passphrase in (("plain", None), ("encrypted", "bench passphrase")):
        path = f"{tmp}/{name}.mv2"
        with engine.create(path, model=None, passphrase=passphrase, index_dir=f"{tmp}/ix-{name}") as cap:
            t0 = time.perf_counter()
            for i in range(0, len(texts), 256):
                batch = enumerate(texts[i : i + 256], start=i)
                cap.put_many({"text": t, "uri": corpus.uris[j]} for j, t in batch)
                cap.commit()
            ingest = time.perf_counter() - t0
        t0 = time.perf_counter()
        cap = engine.open(path, passphrase=passphrase, index_dir=f"{tmp}/ix-{name}")
        open_s = time.perf_counter() - t0
        with cap:
            cap.find("warmup", mode="lex")  # builds the lexical index once
            finds = []
            for q in queries:
                t0 = time.perf_counter()
                cap.find(q, mode="lex", k=10)
                finds.append(time.perf_counter() - t0)
            out[name] = {"ingest_mb_per_s": round(sum(map(len, corpus.raw)) / ingest / 1e6, 1),
                         "open_s": round(open_s, 3), "get_cold": cold_gets(cap, ids), "find_lex": dist(finds),
                         "file_bytes": cap.stats()["file_bytes"]}
    p, e = out["plain"], out["encrypted"]
    out["ratios"] = {"ingest": ratio(e["ingest_mb_per_s"], p["ingest_mb_per_s"]),
                     "get_p50": ratio(e["get_cold"]["p50"], p["get_cold"]["p50"]),
                     "find_p50": ratio(e["find_lex"]["p50"], p["find_lex"]["p50"]),
                     "file_bytes": ratio(e["file_bytes"], p["file_bytes"])}
    return out


def summary_line(r: dict[str, Any]) -> str:
    s, e, d, enc = r["stdlib"], r["events"], r["days"], r["encryption"]
    sb = s["baselines"]
    return (
        f"stdlib stored/raw {s['stored_over_raw_before']} -> {s['stored_over_raw_after']} "
        f"(zstd3/chunk {sb['per_frame_zstd3']}, dict {sb['per_frame_zstd3_dict64k']}, "
        f"g32 {sb['groups32_zstd19']}, stream {sb['one_stream_zstd19']}) "
        f"get p50 {s['get_cold_before']['p50']:.0f} -> {s['get_cold_after']['p50']:.0f} us | "
        f"events {e['stored_over_raw_before']} -> {e['stored_over_raw_after']} "
        f"(dict/rec {e['baselines']['per_frame_zstd3_dict64k']}, g32 {e['baselines']['groups32_zstd19']}; "
        f"fresh+dict {e['fresh_after_dict']['stored_over_raw'] if e['fresh_after_dict'] else '-'}) "
        f"get p50 {e['get_cold_before']['p50']:.0f} -> {e['get_cold_after']['p50']:.0f} us | "
        f"30 days x{d['growth_over_days']} ({d['file_bytes_day0']} -> {d['file_bytes_day_last']} B), "
        f"compact -> {d['compact_all_history']['bytes_after']} B (keeps history), "
        f"max_versions=2 -> {d['compact_max_versions_2']['bytes_after']} B | "
        f"encrypted/plain ingest x{enc['ratios']['ingest']} get x{enc['ratios']['get_p50']} "
        f"find x{enc['ratios']['find_p50']} bytes x{enc['ratios']['file_bytes']} "
        f"open {enc['encrypted']['open_s']} s | "
        f"load {r['loadavg_start']}->{r['loadavg_end']} | {r['elapsed_s']:.0f} s"
    )


def main() -> None:
    args = parse_args(arg_parser(__doc__, quick="small sizes (about a minute)"))
    cfg = QUICK if args.quick else FULL
    t_start = time.perf_counter()
    result: dict[str, Any] = {**result_head("memvidd codecs and compaction", args.quick),
                              "loadavg_start": loadavg()}
    with tempfile.TemporaryDirectory(prefix="memvidd-codec-", dir=args.tmpdir) as tmp:
        log("stdlib corpus")
        corpus = Corpus(cfg["corpus_max_bytes"])
        payloads = list(corpus.raw)
        result["stdlib"] = {"baselines": baselines(payloads),
                            **upgrade_run(f"{tmp}/stdlib.mv2", payloads, cfg["get_samples"], texts=True)}
        log("events")
        events = make_events(cfg["events"])
        result["events"] = {
            "baselines": baselines(events), "mean_bytes": round(sum(map(len, events)) / len(events), 1),
            **upgrade_run(f"{tmp}/events.mv2", events, cfg["get_samples"], texts=True, batch=64),
            "fresh_after_dict": fresh_after_dict(f"{tmp}/events.mv2", make_events(2000, seed=9)),
        }
        log("30 days")
        day_corpus = Corpus(cfg["day_corpus_bytes"])
        result["days"] = days_run(tmp, day_corpus, cfg["days"])
        log("encryption")
        result["encryption"] = encryption_run(tmp, day_corpus, cfg["get_samples"])
    result["loadavg_end"] = loadavg()
    result["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    write_result(result, args.out, summary_line)


if __name__ == "__main__":
    main()
