#!/usr/bin/env python3
"""Search benchmark of memvidd's engine: retrieval quality on labelled sets, and speed.

Run::

    cd /work/main && .venv/bin/python -m bench.search_bench [--quick] [--out FILE] [-v]

1. Quality: the BEIR-layout sets under ``/work/shared/data`` (scifact, cranfield, cisi),
   one frame per document, vectors computed here with the engine's ``Embedder`` and passed
   to ``put``; every query with qrels runs in lex, vec and hybrid mode at k=10, against an
   SQLite FTS5 BM25 baseline. nDCG@10, Recall@10 and MRR@10; fusion experiments.
2. Speed: a ~100k-chunk capsule cut from the CPython stdlib (1 KB chunks), ``find``
   latency cold and cached in every mode, as-of vs latest, open time, bytes per raw byte,
   embedding throughput.

Prints one JSON document (stdout, or ``--out FILE``) and a one-line summary on stderr; the
quality table also goes to ``bench/results/quality.md``. See ``bench/README.md``.
All files live in one temporary directory that is removed at the end.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import math
import os
import re
import shutil
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

import engine
from bench.common import (
    NOISE_SIGMA,
    REPO,
    Corpus,
    arg_parser,
    dist,
    environment,
    frame_vectors,
    loadavg,
    log,
    make_queries,
    parse_args,
    percentile,
    ratio,
    result_head,
    write_result,
)
from engine import format as fmt
from engine.embed import MODELS, MODELS_DIR, Embedder
from engine.query import rrf

DATA = Path("/work/shared/data")
SETS = ("scifact", "cranfield", "cisi")
# nDCG@10 reference points from the data README (same machine class)
REFERENCE = {
    "scifact": {"tantivy_bm25": 0.684, "minilm_dense": 0.647},
    "cranfield": {"tantivy_bm25": 0.515, "minilm_dense": 0.514},
    "cisi": {"tantivy_bm25": 0.309, "minilm_dense": 0.418},
}
K = 10
DEPTHS = (20, 50, 100)  # candidates per list for the fusion experiments
ENGINE_DEPTH = 40  # what the engine's hybrid takes from each list at k=10: max(2k, 40)
EMBED_BATCH = 32  # texts per Embedder.embed call (it runs ONNX in batches of 8 inside)
INGEST_BATCH = 512
MAX_TOKENS = 256  # the model's truncation length
CHUNK_BYTES = 1024

FULL = dict(
    sets=SETS, set_queries=None, set_docs=None,
    speed_chunks=100_000, real_chunks=3000, tput_chunks=256, n_queries=200,
    build_batch=1000, open_runs=3,
)
QUICK = dict(
    sets=("cranfield",), set_queries=20, set_docs=250,
    speed_chunks=5000, real_chunks=96, tput_chunks=32, n_queries=60,
    build_batch=500, open_runs=2,
)
GOALS = {  # from the project brief; latencies in ms
    "lex_p50_ms": 1.0, "hybrid_cached_qvec_p50_ms": 2.0, "cache_hit_p50_ms": 0.1, "as_of_over_latest": 2.0,
}


def dir_bytes(path: str | Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):  # a file removed while we walk
                total += os.path.getsize(os.path.join(root, f))
    return total


# -- embedding helpers -----------------------------------------------------------------


class TokenCounter:
    """Tokens per text as the model sees them: the vendored tokenizer, truncated to 256."""

    def __init__(self) -> None:
        from tokenizers import Tokenizer

        spec = MODELS["all-MiniLM-L6-v2"]
        self.tok = Tokenizer.from_file(str(MODELS_DIR / spec.tokenizer / "tokenizer.json"))
        self.tok.enable_truncation(MAX_TOKENS)
        self.tok.no_padding()

    def counts(self, texts: list[str]) -> list[int]:
        return [len(e.ids) for e in self.tok.encode_batch(texts)]


def embed_timed(emb: Embedder, texts: list[str], what: str) -> tuple[np.ndarray, float]:
    """Embed in batches of EMBED_BATCH; returns (vectors, seconds spent inside embed)."""
    out = []
    spent = 0.0
    last = time.perf_counter()
    for i in range(0, len(texts), EMBED_BATCH):
        t0 = time.perf_counter()
        out.append(emb.embed(texts[i : i + EMBED_BATCH]))
        spent += time.perf_counter() - t0
        if time.perf_counter() - last > 30:
            last = time.perf_counter()
            log(f"  embedding {what}: {i + EMBED_BATCH}/{len(texts)} ({(i + EMBED_BATCH) / spent:.1f}/s)")
    vecs = np.concatenate(out) if out else np.zeros((0, emb.dim), dtype=np.float32)
    return vecs.astype(np.float32), spent


class EmbedCache:
    """Optional on-disk cache of document vectors (``--embed-cache``), for re-runs only."""

    def __init__(self, directory: str | None) -> None:
        self.dir = Path(directory) if directory else None
        if self.dir:
            self.dir.mkdir(parents=True, exist_ok=True)

    def _path(self, tag: str, texts: list[str]) -> Path | None:
        if self.dir is None:
            return None
        h = hashlib.sha1(MODELS["all-MiniLM-L6-v2"].sha256.encode())
        for t in texts:
            h.update(t.encode("utf-8", "replace"))
            h.update(b"\0")
        return self.dir / f"{tag}-{h.hexdigest()[:16]}.npy"

    def get(self, tag: str, texts: list[str]) -> np.ndarray | None:
        p = self._path(tag, texts)
        return np.load(p) if p is not None and p.exists() else None

    def put(self, tag: str, texts: list[str], vecs: np.ndarray) -> None:
        p = self._path(tag, texts)
        if p is not None:
            np.save(p, vecs)


def throughput(n: int, seconds: float, tokens: int) -> dict[str, Any]:
    return {
        "chunks": n, "seconds": round(seconds, 3),
        "per_s": round(n / seconds, 2) if seconds else None,
        "tokens": tokens, "tokens_per_s": round(tokens / seconds, 1) if seconds else None,
        "tokens_per_chunk": round(tokens / n, 1) if n else None,
    }


# -- 1. quality ------------------------------------------------------------------------


def load_set(name: str, max_queries: int | None, max_docs: int | None) -> dict[str, Any]:
    d = DATA / name
    corpus = [json.loads(line) for line in (d / "corpus.jsonl").open(encoding="utf-8")]
    queries = {q["_id"]: q["text"] for q in map(json.loads, (d / "queries.jsonl").open(encoding="utf-8"))}
    qrels: dict[str, dict[str, int]] = {}
    with (d / "qrels" / "test.tsv").open(encoding="utf-8") as f:
        for n, line in enumerate(f):
            parts = line.rstrip("\n").split("\t")
            if n == 0 and parts[0] == "query-id":
                continue
            qid, did, score = parts[0], parts[1], int(parts[2])
            if score > 0:
                qrels.setdefault(qid, {})[did] = score
    qids = [q for q in queries if q in qrels]  # queries with at least one relevant doc
    subset = None
    if max_queries is not None:
        qids = qids[:max_queries]
        need = {did for q in qids for did in qrels[q]}
        keep = [c for c in corpus if c["_id"] in need]
        rest = [c for c in corpus if c["_id"] not in need]
        corpus = keep + rest[: max(0, (max_docs or 0) - len(keep))]
        subset = {"queries": len(qids), "docs": len(corpus),
                  "note": "relevant docs of the first queries + filler"}
    return {"corpus": corpus, "queries": queries, "qrels": qrels, "qids": qids, "subset": subset}


def eval_run(ranked: dict[str, list[str]], qrels: dict[str, dict[str, int]],
             qids: list[str]) -> dict[str, float]:
    """nDCG@10 (linear gain = qrel score, as trec_eval), Recall@10, MRR@10, averaged."""
    nd, rc, mr = [], [], []
    for q in qids:
        rels = qrels[q]
        top = ranked.get(q, [])[:K]
        dcg = sum(rels.get(d, 0) / math.log2(i + 2) for i, d in enumerate(top))
        ideal = sorted(rels.values(), reverse=True)[:K]
        idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
        nd.append(dcg / idcg if idcg else 0.0)
        rc.append(sum(1 for d in top if d in rels) / len(rels))
        mr.append(next((1.0 / (i + 1) for i, d in enumerate(top) if d in rels), 0.0))
    n = len(qids) or 1
    return {"ndcg@10": round(sum(nd) / n, 4), "recall@10": round(sum(rc) / n, 4),
            "mrr@10": round(sum(mr) / n, 4)}


_WORD = re.compile(r"\w+", re.UNICODE)
_SYNTAX = re.compile(r'[:()"+\-\[\]{}^~*?!]|\b(AND|OR|NOT)\b')  # Tantivy query syntax in a query


def fts5_query(text: str) -> str:
    """The query's words, each quoted (no FTS5 syntax survives), OR-ed."""
    words = list(dict.fromkeys(w.lower() for w in _WORD.findall(text)))
    return " OR ".join('"' + w.replace('"', '""') + '"' for w in words)


def sanitize(text: str) -> str:
    """Experiment: the query as plain lower-case words (no Tantivy query syntax)."""
    return " ".join(w.lower() for w in _WORD.findall(text))


def fuse_weighted(lex: list[int], vec: list[int], w_vec: float, k: int = 60) -> list[int]:
    """Weighted RRF: 2(1-w)/(k+rank_lex) + 2w/(k+rank_vec) (w=0.5 is plain RRF)."""
    scores: dict[int, float] = {}
    for ranked, w in ((lex, 2 * (1 - w_vec)), (vec, 2 * w_vec)):
        for r, fid in enumerate(ranked, 1):
            scores[fid] = scores.get(fid, 0.0) + w / (k + r)
    return [fid for fid, _ in sorted(scores.items(), key=lambda x: (-x[1], x[0]))]


class OneFieldBM25:
    """Experiment: Tantivy BM25 with title and text in one en_stem field (the engine indexes
    them as two fields and sums their BM25 scores), queried with the same parser, OR."""

    def __init__(self, corpus: list[dict[str, Any]]) -> None:
        import tantivy

        sb = tantivy.SchemaBuilder()
        sb.add_text_field("did", stored=True, tokenizer_name="raw")
        sb.add_text_field("body", tokenizer_name="en_stem")
        self.index = tantivy.Index(sb.build())
        w = self.index.writer(heap_size=64_000_000, num_threads=1)
        for c in corpus:
            w.add_document(tantivy.Document(did=c["_id"], body=f"{c.get('title') or ''}\n{c['text']}"))
        w.commit()
        self.index.reload()
        self.searcher = self.index.searcher()

    def search(self, text: str, k: int) -> list[str]:
        try:
            q = self.index.parse_query(text, ["body"], conjunction_by_default=False)
        except ValueError:
            q, _ = self.index.parse_query_lenient(text, ["body"], conjunction_by_default=False)
        return [self.searcher.doc(a)["did"][0] for _, a in self.searcher.search(q, k).hits]


def quality_set(name: str, cfg: dict[str, Any], emb: Embedder, tok: TokenCounter, tmp: str,
                cache: EmbedCache) -> dict[str, Any]:
    log(f"quality: {name}: loading")
    ds = load_set(name, cfg["set_queries"], cfg["set_docs"])
    corpus, queries, qrels, qids = ds["corpus"], ds["queries"], ds["qrels"], ds["qids"]
    # as the engine's embed loop
    etexts = [f"{c['title']}\n{c['text']}" if c.get("title") else c["text"] for c in corpus]
    out: dict[str, Any] = {"docs": len(corpus), "queries_evaluated": len(qids),
                           "qrels": sum(len(qrels[q]) for q in qids), "subset": ds["subset"]}

    # embedding, batched, through Embedder.embed
    vecs = cache.get(name, etexts)
    tokens = sum(tok.counts(etexts))
    if vecs is None:
        log(f"quality: {name}: embedding {len(etexts)} docs")
        vecs, secs = embed_timed(emb, etexts, name)
        cache.put(name, etexts, vecs)
        out["embedding"] = {**throughput(len(etexts), secs, tokens), "batch": EMBED_BATCH, "cached": False}
    else:
        out["embedding"] = {"chunks": len(etexts), "tokens": tokens, "cached": True, "per_s": None}

    # ingest
    path = os.path.join(tmp, f"q-{name}.mv2")
    ixdir = os.path.join(tmp, f"q-{name}-ix")
    cap = engine.create(path, embedder=emb, index_dir=ixdir)
    t0 = time.perf_counter()
    id_of: dict[int, str] = {}
    for i in range(0, len(corpus), INGEST_BATCH):
        items = [{"text": c["text"], "uri": f"beir://{name}/{c['_id']}", "title": c.get("title") or None,
                  "vector": vecs[i + j]} for j, c in enumerate(corpus[i : i + INGEST_BATCH])]
        for fid, c in zip(cap.put_many(items), corpus[i : i + INGEST_BATCH], strict=True):
            id_of[fid] = c["_id"]
        cap.commit()
    ingest_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    cap.find("warm up", k=1, mode="lex")  # attaches (builds) the indexes
    out["ingest"] = {"seconds": round(ingest_s, 3), "index_attach_s": round(time.perf_counter() - t0, 3)}

    # FTS5 baseline
    con = sqlite3.connect(":memory:")
    con.execute("CREATE VIRTUAL TABLE d USING fts5(did UNINDEXED, title, text, tokenize='porter unicode61')")
    t0 = time.perf_counter()
    con.executemany("INSERT INTO d VALUES (?, ?, ?)",
                    [(c["_id"], c.get("title") or "", c["text"]) for c in corpus])
    fts_build = time.perf_counter() - t0

    # experiment: Tantivy BM25 over ONE field (title + text), en_stem, same query parser, OR
    one = OneFieldBM25(corpus)
    fid_of = {did: fid for fid, did in id_of.items()}

    runs: dict[str, dict[str, list[str]]] = {m: {} for m in ("fts5", "lex", "vec", "hybrid")}
    lists: dict[str, dict[int, dict[str, list[int]]]] = {"lex": {}, "vec": {}, "lex_s": {}, "lex_1f": {}}
    lex_scores: dict[str, dict[int, float]] = {}
    lat: dict[str, list[float]] = {"fts5": [], "lex": [], "vec_incl_query_embed": [], "hybrid": []}
    warned: list[str] = []
    empty_lex = 0
    qvecs: dict[str, np.ndarray] = {}

    def ids(hits: Any) -> list[str]:
        return [h.uri.rsplit("/", 1)[1] for h in hits]

    log(f"quality: {name}: {len(qids)} queries")
    for q in qids:
        text = queries[q]
        a = time.perf_counter()
        match = fts5_query(text)
        sql = "SELECT did FROM d WHERE d MATCH ? ORDER BY bm25(d) LIMIT ?"
        rows = con.execute(sql, (match, K)).fetchall() if match else []
        b = time.perf_counter()
        runs["fts5"][q] = [r[0] for r in rows]
        lat["fts5"].append(b - a)
        for mode, key in (("lex", "lex"), ("vec", "vec_incl_query_embed"), ("hybrid", "hybrid")):
            a = time.perf_counter()
            hits = cap.find(text, k=K, mode=mode, snippet_chars=0)
            lat[key].append(time.perf_counter() - a)
            runs[mode][q] = ids(hits)
            if mode == "lex":
                if hits.warnings:
                    warned.append(text)
                if not hits:
                    empty_lex += 1
        qv = cap._s.indexes.query_vectors.get(text) if cap._s.indexes is not None else None  # read-only peek
        qvecs[q] = qv if qv is not None else emb.embed([text[:4096]])[0]
        for d in sorted(set(DEPTHS) | {ENGINE_DEPTH}):
            lh = cap.find(text, k=d, mode="lex", snippet_chars=0)
            vh = cap.find(text, k=d, mode="vec", snippet_chars=0)
            sh = cap.find(sanitize(text), k=d, mode="lex", snippet_chars=0) if sanitize(text) else []
            lists["lex"].setdefault(d, {})[q] = [h.frame_id for h in lh]
            lists["vec"].setdefault(d, {})[q] = [h.frame_id for h in vh]
            lists["lex_s"].setdefault(d, {})[q] = [h.frame_id for h in sh]
            if d == max(DEPTHS):
                lex_scores[q] = {h.frame_id: h.score for h in lh}
        sh = cap.find(sanitize(text), k=K, mode="lex", snippet_chars=0) if sanitize(text) else []
        lists["lex_s"].setdefault(K, {})[q] = [h.frame_id for h in sh]
        for d in (K, ENGINE_DEPTH):
            lists["lex_1f"].setdefault(d, {})[q] = [fid_of[x] for x in one.search(text, d)]
    cap.close()
    con.close()

    metrics = {m: eval_run(runs[m], qrels, qids) for m in runs}
    lx, vc, hy = metrics["lex"], metrics["vec"], metrics["hybrid"]
    out["metrics"] = metrics
    out["checks"] = {
        "hybrid_ndcg_ge_max_lex_vec": hy["ndcg@10"] >= max(lx["ndcg@10"], vc["ndcg@10"]),
        "hybrid_mrr_ge_lex_mrr": hy["mrr@10"] >= lx["mrr@10"],
        "hybrid_minus_best_single_ndcg": round(hy["ndcg@10"] - max(lx["ndcg@10"], vc["ndcg@10"]), 4),
        "hybrid_minus_lex_mrr": round(hy["mrr@10"] - lx["mrr@10"], 4),
    }
    out["reference_ndcg@10"] = REFERENCE[name]
    out["latency_per_query"] = {
        "note": "one run per query, result cache cold, snippet_chars=0; vec includes embedding the query, "
                "hybrid reuses the query vector vec cached",
        **{k: dist(v, "ms") for k, v in lat.items()},
    }
    out["fts5"] = {"build_s": round(fts_build, 3), "sqlite": sqlite3.sqlite_version,
                   "tokenizer": "porter unicode61", "ranking": "bm25() over (title, text), weights 1,1",
                   "query": "the query's \\w+ words, each double-quoted, joined with OR"}
    out["lex_query_parse"] = {
        "queries_with_warnings": len(warned), "examples": warned[:3],
        "queries_with_syntax_chars": sum(1 for q in qids if _SYNTAX.search(queries[q])),
        "queries_with_no_lex_hit": empty_lex,
    }
    out["experiments"] = experiments(qids, qrels, lists, lex_scores, qvecs, vecs, id_of, runs, metrics)
    return out


def experiments(qids: list[str], qrels: dict[str, dict[str, int]], lists: dict[str, Any],
                lex_scores: dict[str, dict[int, float]], qvecs: dict[str, np.ndarray], docvecs: np.ndarray,
                id_of: dict[int, str], runs: dict[str, dict[str, list[str]]],
                metrics: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Fusion variants computed here from the engine's own lex/vec lists (the engine is unchanged)."""
    fid_row = {fid: i for i, fid in enumerate(sorted(id_of))}  # frame ids are in ingest order
    docs = docvecs.astype(np.float32)

    def as_docs(fids: list[int]) -> list[str]:
        return [id_of[f] for f in fids]

    def cos(q: str, fids: list[int]) -> np.ndarray:
        return docs[[fid_row[f] for f in fids]] @ qvecs[q]

    def fused(a: list[int], b: list[int]) -> list[str]:
        return as_docs([f for _, f in rrf([a, b])])

    variants: dict[str, dict[str, list[str]]] = {}
    L, V, S = lists["lex"], lists["vec"], lists["lex_s"]
    replica = "engine_hybrid_replica(rrf60,d40)"
    variants[replica] = {q: fused(L[ENGINE_DEPTH][q], V[ENGINE_DEPTH][q]) for q in qids}
    for d in DEPTHS:
        variants[f"rrf60_d{d}"] = {q: fused(L[d][q], V[d][q]) for q in qids}
    for w in (0.3, 0.4, 0.6, 0.7):
        variants[f"wrrf_d50_wvec{w}"] = {q: as_docs(fuse_weighted(L[50][q], V[50][q], w)) for q in qids}

    def by_cosine(q: str, cand: list[int]) -> list[str]:
        s = cos(q, cand) if cand else np.zeros(0)
        return as_docs([cand[i] for i in np.argsort(-s, kind="stable")])

    for d in DEPTHS:
        variants[f"cosine_rerank_lex_d{d}"] = {q: by_cosine(q, L[d][q]) for q in qids}
    variants["cosine_rescore_union_d100"] = {q: by_cosine(q, list(dict.fromkeys(L[100][q] + V[100][q])))
                                             for q in qids}
    for a in (0.3, 0.5, 0.7, 0.8):
        out = {}
        for q in qids:
            cand = list(dict.fromkeys(L[100][q] + V[100][q]))
            if not cand:
                out[q] = []
                continue
            bm = lex_scores[q]
            top = max(bm.values()) if bm else 1.0
            bm_norm = np.array([bm.get(f, 0.0) / top if top else 0.0 for f in cand])
            s = a * cos(q, cand) + (1 - a) * bm_norm
            out[q] = as_docs([cand[i] for i in np.argsort(-s, kind="stable")])
        variants[f"convex_d100_a{a}(a*cos+(1-a)*bm25/max)"] = out
    variants["lex_top10_of_k100(OR-ranking)"] = {q: as_docs(L[100][q]) for q in qids}
    variants["lex_sanitized_query"] = {q: as_docs(S[K][q]) for q in qids}
    variants["rrf60_d50_sanitized_lex"] = {q: fused(S[50][q], V[50][q]) for q in qids}
    one = lists["lex_1f"]
    variants["lex_tantivy_one_field(title+text)"] = {q: as_docs(one[K][q]) for q in qids}
    variants["rrf60_d40_one_field_lex"] = {q: fused(one[ENGINE_DEPTH][q], V[ENGINE_DEPTH][q]) for q in qids}
    # exact dense: brute-force float32 cosine over every document (no HNSW, no f16)
    order = sorted(id_of)
    variants["vec_exact_f32_bruteforce"] = {
        q: [id_of[order[i]] for i in np.argsort(-(docs @ qvecs[q]), kind="stable")[:K]] for q in qids}

    res: dict[str, Any] = {}
    lx, vc = metrics["lex"], metrics["vec"]
    best_single = max(lx["ndcg@10"], vc["ndcg@10"])
    for name, run in variants.items():
        m = eval_run(run, qrels, qids)
        m["beats_best_single_ndcg"] = m["ndcg@10"] >= best_single
        m["mrr_ge_lex"] = m["mrr@10"] >= lx["mrr@10"]
        res[name] = m
    same = sum(1 for q in qids if variants[replica][q][:K] == runs["hybrid"][q][:K])
    res["_replica_agreement"] = round(same / (len(qids) or 1), 4)
    return res


def quality_tables(sets: dict[str, Any]) -> str:
    lines = ["| set | method | nDCG@10 | R@10 | MRR@10 | reference nDCG@10 |", "|---|---|---|---|---|---|"]
    for name, r in sets.items():
        ref = r["reference_ndcg@10"]
        for m in ("fts5", "lex", "vec", "hybrid"):
            x = r["metrics"][m]
            rv = {"fts5": f"BM25 {ref['tantivy_bm25']}", "lex": f"BM25 {ref['tantivy_bm25']}",
                  "vec": f"dense {ref['minilm_dense']}", "hybrid": f"> {max(ref.values())}"}[m]
            lines.append(f"| {name} | {m} | {x['ndcg@10']:.4f} | {x['recall@10']:.4f} | {x['mrr@10']:.4f} "
                         f"| {rv} |")
    lines += ["", "| set | hybrid nDCG@10 >= max(lex, vec) | hybrid MRR >= lex MRR |", "|---|---|---|"]
    for name, r in sets.items():
        c = r["checks"]
        lines.append(f"| {name} | {'yes' if c['hybrid_ndcg_ge_max_lex_vec'] else 'NO'} "
                     f"({c['hybrid_minus_best_single_ndcg']:+.4f}) | "
                     f"{'yes' if c['hybrid_mrr_ge_lex_mrr'] else 'NO'} ({c['hybrid_minus_lex_mrr']:+.4f}) |")
    names = [n for n in next(iter(sets.values()))["experiments"] if not n.startswith("_")] if sets else []
    lines += ["", ("Experiments (computed outside the engine from its lex/vec lists; not engine behaviour; "
                   "tuned on the test queries, so the best row is optimistic). Cell: nDCG@10 / MRR@10, "
                   "`*` = nDCG@10 >= max(lex, vec) and MRR >= lex."), "",
              "| variant | " + " | ".join(sets) + " |", "|---|" + "---|" * len(sets)]
    for n in names:
        cells = []
        for r in sets.values():
            e = r["experiments"][n]
            star = "*" if e["beats_best_single_ndcg"] and e["mrr_ge_lex"] else ""
            cells.append(f"{e['ndcg@10']:.4f} / {e['mrr@10']:.4f}{star}")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def winners(sets: dict[str, Any]) -> dict[str, Any]:
    """Per set, the best experiment by nDCG@10; and the variants that win on every set."""
    per_set = {}
    all_sets: set[str] | None = None
    for name, r in sets.items():
        ex = {n: e for n, e in r["experiments"].items() if not n.startswith("_")}
        fusion = {n: e for n, e in ex.items() if not n.startswith(("lex_", "vec_"))}
        best = max(fusion, key=lambda n: fusion[n]["ndcg@10"])
        ok = {n for n, e in fusion.items() if e["beats_best_single_ndcg"] and e["mrr_ge_lex"]}
        per_set[name] = {"best_fusion": best, "ndcg@10": fusion[best]["ndcg@10"],
                         "mrr@10": fusion[best]["mrr@10"], "winning_variants": sorted(ok)}
        all_sets = ok if all_sets is None else all_sets & ok
    return {"per_set": per_set, "win_on_every_set": sorted(all_sets or [])}


def bench_quality(cfg: dict[str, Any], emb: Embedder, tok: TokenCounter, tmp: str,
                  cache: EmbedCache) -> dict[str, Any]:
    sets = {}
    for name in cfg["sets"]:
        sets[name] = quality_set(name, cfg, emb, tok, tmp, cache)
    table = quality_tables(sets)
    emb_all = [s["embedding"] for s in sets.values() if not s["embedding"].get("cached")]
    secs = sum(e["seconds"] for e in emb_all)
    return {
        "k": K, "modes": ["fts5", "lex", "vec", "hybrid"],
        "definitions": {
            "ndcg@10": "sum_{i<=10} gain_i / log2(i+1) over the ideal ordering of the query's qrels; "
                       "gain = qrel score (linear, as trec_eval)",
            "recall@10": "relevant docs in the top 10 / relevant docs (score > 0)",
            "mrr@10": "1 / rank of the first relevant doc in the top 10, else 0",
            "queries": "every query with at least one qrel of score > 0",
        },
        "vectors": "Embedder(threads=2).embed on title + '\\n' + text (as the engine's background embedder), "
                   f"batches of {EMBED_BATCH}, passed to put(vector=...)",
        "embedding_overall": throughput(sum(e["chunks"] for e in emb_all), secs,
                                        sum(e["tokens"] for e in emb_all)) if emb_all else None,
        "sets": sets, "experiment_winners": winners(sets), "table_markdown": table,
    }


# -- 2. speed ----------------------------------------------------------------------------


def lex_files(cap: Any) -> dict[str, Any]:
    """The lexical index files the capsule's last checkpoint lists: name -> (offset, bytes).
    Internal state, read only."""
    return cap._s.ckpt.extra.get("lex", {}).get("files", {})


def record_breakdown(path: str) -> dict[str, Any]:
    """Bytes of every record in the file by kind (a scan of the record headers), and how
    many of the VECTORS/LEXFILE bytes the final checkpoint still references."""
    cap = engine.open(path, readonly=True)
    try:
        lex_refs = {int(o) for o, _ in lex_files(cap).values()}
        vec_refs = {int(o) for o, _ in cap._s.vec_refs}
    finally:
        cap.close()
    kinds: dict[str, dict[str, int]] = {}
    live = {"vectors": 0, "lexfile": 0}
    with open(path, "rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        off = fmt.LOG_START
        while off < size:
            rh = fmt.decode_record_header(os.pread(fd, fmt.RECORD_SIZE, off))
            if rh is None:
                break
            n = fmt.RECORD_SIZE + rh.length
            k = kinds.setdefault(fmt.KIND_NAMES[rh.kind].lower(), {"records": 0, "bytes": 0})
            k["records"] += 1
            k["bytes"] += n
            if rh.kind == fmt.VECTORS and off in vec_refs:
                live["vectors"] += n
            elif rh.kind == fmt.LEXFILE and off in lex_refs:
                live["lexfile"] += n
            off += n
    return {"by_kind": kinds, "referenced_by_last_checkpoint": live, "scanned_to": off, "file_bytes": size,
            "header_bytes": fmt.LOG_START}


def build_speed_capsule(path: str, ixdir: str | None, uris: list[str], texts: list[str], total: int,
                        batch: int, vectors: Any, emb: Embedder | None) -> dict[str, Any]:
    """Ingest ``total`` frames (the chunks, then copies with URIs suffixed ~<copy>), indexes
    attached from the start so they are kept current commit by commit as in normal use."""
    model_kw: dict[str, Any] = {} if vectors is not None else {"model": None}
    cap = engine.create(path, embedder=emb, index_dir=ixdir, **model_kw)
    cap.find("warm up", k=1, mode="lex")  # attach the (empty) indexes now
    base = len(texts)
    seqs: list[tuple[int, int]] = []  # (frames so far, seq)
    commits: list[float] = []
    t0 = time.perf_counter()
    done = 0
    last = time.perf_counter()
    while done < total:
        stop = min(done + batch, total)
        frames = np.arange(done, stop)
        chunk_ids = frames % base
        vecs = vectors(frames, chunk_ids) if vectors is not None else None
        items = []
        for j, (f, c) in enumerate(zip(frames.tolist(), chunk_ids.tolist(), strict=True)):
            copy = f // base
            it: dict[str, Any] = {"text": texts[c], "uri": uris[c] if copy == 0 else f"{uris[c]}~{copy}"}
            if vecs is not None:
                it["vector"] = vecs[j]
            items.append(it)
        cap.put_many(items)
        a = time.perf_counter()
        seq = cap.commit()
        commits.append(time.perf_counter() - a)
        done = stop
        seqs.append((done, seq))
        if time.perf_counter() - last > 30:
            last = time.perf_counter()
            log(f"  build {os.path.basename(path)}: {done}/{total}")
    elapsed = time.perf_counter() - t0
    st = cap.stats()
    extra = {"vectors_bytes": cap._s.counters.get("bytes.vectors", 0),  # internal counters, read only
             "lexfile_bytes_live": sum(n for _, n in lex_files(cap).values())}
    t1 = time.perf_counter()
    cap.close()
    close_s = time.perf_counter() - t1
    return {"frames": st["frames"], "commits": st["commit_seq"], "batch": batch,
            "elapsed_s": round(elapsed, 2), "frames_per_s": round(st["frames"] / elapsed, 1),
            "close_s": round(close_s, 3),
            "commit_latency": dist(commits, "ms"), "stats": st, "extra": extra, "seqs": seqs}


def timed_pass(cap: Any, queries: list[str], mode: str, **kw: Any) -> tuple[list[float], int, int]:
    """One find per query; returns (latencies s, how many were result-cache hits, total hits)."""
    gc.collect()
    lat = []
    cached = 0
    nhits = 0
    for q in queries:
        t0 = time.perf_counter()
        h = cap.find(q, mode=mode, **kw)
        lat.append(time.perf_counter() - t0)
        cached += bool(h.cached)
        nhits += len(h)
    return lat, cached, nhits


def bench_latency(cap: Any, queries: list[str], mid_seq: int) -> dict[str, Any]:
    ix = cap._s.indexes
    res: dict[str, Any] = {"queries": len(queries), "k": K, "snippet_chars": 200,
                           "note": "find() with defaults (k=10, snippet_chars=200). 'first': first run of "
                                   "each query (vec embeds the query; hybrid runs after vec, so its query "
                                   "vector is already cached). 'cold': result cache cleared "
                                   "(cap._s.indexes.results.clear()), query vector cached. 'cached': the same "
                                   "queries again, result-cache hits."}
    for mode in ("lex", "vec", "hybrid"):
        first, c0, _ = timed_pass(cap, queries, mode)
        ix.results.clear()
        cold, c1, n1 = timed_pass(cap, queries, mode)
        hit, c2, _ = timed_pass(cap, queries, mode)
        res[mode] = {"first": dist(first), "cold": dist(cold), "cached": dist(hit, "us"),
                     "cache_hits": {"first": c0, "cold": c1, "cached": c2},
                     "mean_hits": round(n1 / len(queries), 2)}
    ix.results.clear()
    lat, _, _ = timed_pass(cap, queries, "lex", snippet_chars=0)
    res["lex"]["cold_no_snippets"] = dist(lat)
    ix.results.clear()
    lat, _, _ = timed_pass(cap, queries, "hybrid", snippet_chars=0)
    res["hybrid"]["cold_no_snippets"] = dist(lat)
    # as-of a commit in the middle vs latest (both result-cache cold, query vectors cached)
    asof: dict[str, Any] = {"as_of_seq": mid_seq, "head_seq": cap.seq}
    for mode in ("lex", "vec", "hybrid"):
        ix.results.clear()
        latest, _, _ = timed_pass(cap, queries, mode)
        ix.results.clear()
        past, cached, npast = timed_pass(cap, queries, mode, as_of=mid_seq)
        dl, dp = dist(latest), dist(past)
        asof[mode] = {"latest": dl, "as_of": dp, "p50_ratio": ratio(dp["p50"], dl["p50"]),
                      "p99_ratio": ratio(dp["p99"], dl["p99"]),
                      "mean_hits_as_of": round(npast / len(queries), 2), "as_of_cache_hits": cached}
    res["as_of"] = asof
    return res


def bench_open(path: str, ixdir: str, emb: Embedder, runs: int, q: str) -> dict[str, Any]:
    res: dict[str, Any] = {"note": "open = engine.open(); first_find = the first find(mode='lex'), which "
                                   "attaches the indexes; total = both"}
    for label, wipe in (("working_copies_present", False), ("index_dir_deleted", True)):
        rows = []
        for _ in range(runs):
            if wipe:
                shutil.rmtree(ixdir, ignore_errors=True)
            gc.collect()
            t0 = time.perf_counter()
            cap = engine.open(path, embedder=emb, index_dir=ixdir)
            t1 = time.perf_counter()
            cap.find(q, k=K, mode="lex")
            t2 = time.perf_counter()
            att = cap.stats()["search"]["attach"]
            cap.close()
            t3 = time.perf_counter()
            rows.append({"open_ms": (t1 - t0) * 1e3, "first_find_ms": (t2 - t1) * 1e3,
                         "total_ms": (t2 - t0) * 1e3, "close_ms": (t3 - t2) * 1e3, "attach": att})
        timings = ("open_ms", "first_find_ms", "total_ms", "close_ms")
        res[label] = {
            **{k: round(statistics.median(r[k] for r in rows), 2) for k in timings},
            "runs": len(rows), "attach_last": rows[-1]["attach"],
            "origins": sorted({json.dumps(r["attach"].get("origin"), sort_keys=True) for r in rows}),
        }
    return res


def bench_speed(cfg: dict[str, Any], emb2: Embedder, tok: TokenCounter, tmp: str,
                cache: EmbedCache) -> dict[str, Any]:
    total = cfg["speed_chunks"]
    log("speed: loading stdlib chunks")
    corpus = Corpus(chunk_bytes=CHUNK_BYTES, max_chunks=None if total >= 40_000 else total)
    uris, texts = corpus.uris, corpus.texts()
    base = len(texts)
    sizes = sorted(len(t.encode()) for t in texts)
    out: dict[str, Any] = {"corpus": {
        "source": str(corpus.root), "files": corpus.files, "chunks": base, "chunk_bytes": sum(sizes),
        "chunk_target": CHUNK_BYTES,
        "chunk_size_p50": percentile(sizes, 50), "frames": total, "copies": math.ceil(total / base),
        "uris": "file://<path>#<n>, copies suffixed ~<copy>",
    }}

    # embedding throughput at 1 KB chunks: threads=1 vs threads=2, interleaved batch by batch
    full = [i for i, t in enumerate(texts) if len(t.encode()) >= CHUNK_BYTES - 128]
    step = max(1, len(full) // cfg["tput_chunks"])
    sample = full[::step][: cfg["tput_chunks"]]
    stexts = [texts[i] for i in sample]
    stoks = tok.counts(stexts)
    log(f"speed: embedding throughput, {len(sample)} chunks x threads 1 and 2")
    emb1 = Embedder(threads=1)
    emb1.embed(stexts[:2])
    emb2.embed(stexts[:2])
    t1 = t2 = 0.0
    for i in range(0, len(stexts), EMBED_BATCH):
        b = stexts[i : i + EMBED_BATCH]
        a = time.perf_counter()
        emb1.embed(b)
        m = time.perf_counter()
        emb2.embed(b)
        t2 += time.perf_counter() - m
        t1 += m - a
    del emb1
    ntok = sum(stoks)
    out["embedding_throughput"] = {
        "chunk_bytes_min": CHUNK_BYTES - 128, "batch": EMBED_BATCH, "max_tokens": MAX_TOKENS,
        "truncated_share": round(sum(1 for n in stoks if n >= MAX_TOKENS) / len(stoks), 3),
        "threads_1": throughput(len(stexts), t1, ntok), "threads_2": throughput(len(stexts), t2, ntok),
        "speedup_2_over_1": ratio(t1, t2), "note": "batches alternate between the two embedders",
    }

    # real vectors for a few thousand chunks spread evenly over the corpus
    R = min(cfg["real_chunks"], base)
    real_idx = np.unique(np.linspace(0, base - 1, R).astype(np.int64))
    rtexts = [texts[i] for i in real_idx.tolist()]
    real_vecs = cache.get("stdlib", rtexts)
    rtok = sum(tok.counts(rtexts))
    if real_vecs is None:
        log(f"speed: embedding {len(rtexts)} real chunks")
        real_vecs, secs = embed_timed(emb2, rtexts, "stdlib")
        cache.put("stdlib", rtexts, real_vecs)
        emb_real = {**throughput(len(rtexts), secs, rtok), "threads": 2, "cached": False}
    else:
        emb_real = {"chunks": len(rtexts), "tokens": rtok, "cached": True}
    rng = np.random.default_rng(12345)
    exact_set = np.zeros(base, dtype=bool)
    exact_set[real_idx] = True

    def vectors(frames: np.ndarray, chunk_ids: np.ndarray) -> np.ndarray:
        return frame_vectors(real_idx, real_vecs, chunk_ids, exact_set[chunk_ids] & (frames < base), rng)

    probe = np.arange(min(base, 2000))
    pv = vectors(probe, probe)
    src = frame_vectors(real_idx, real_vecs, probe, np.ones(len(probe), bool), rng)
    noisy = ~exact_set[probe]
    out["vectors"] = {
        "real_embedded_chunks": len(real_idx), "real_embedding": emb_real,
        "synthetic": f"every other frame: the vector of the nearest (by position) really embedded chunk + "
                     f"N(0, {NOISE_SIGMA}^2) per dimension, renormalised; copies of really embedded chunks "
                     "get noise too. The vector index therefore holds clusters of near-duplicates.",
        "mean_cosine_to_source":
            round(float(np.mean(np.sum(pv[noisy] * src[noisy], axis=1))), 4) if noisy.any() else None,
    }

    # the 100k capsule with vectors, and the same without (model=None) for size
    path = os.path.join(tmp, "speed.mv2")
    ixdir = os.path.join(tmp, "speed-ix")
    log(f"speed: building {total}-frame capsule with vectors")
    build = build_speed_capsule(path, ixdir, uris, texts, total, cfg["build_batch"], vectors, emb2)
    path0 = os.path.join(tmp, "speed-novec.mv2")
    ixdir0 = os.path.join(tmp, "speed-novec-ix")
    log(f"speed: building {total}-frame capsule without vectors")
    build0 = build_speed_capsule(path0, ixdir0, uris, texts, total, cfg["build_batch"], None, None)
    raw = build["stats"]["payload_raw_bytes"]
    size, size0 = os.path.getsize(path), os.path.getsize(path0)
    rec, rec0 = record_breakdown(path), record_breakdown(path0)
    out["builds"] = {
        "with_vectors": {k: v for k, v in build.items() if k not in ("stats", "seqs")},
        "without_vectors": {k: v for k, v in build0.items() if k not in ("stats", "seqs")},
    }
    ixb = dir_bytes(ixdir)
    out["size"] = {
        "raw_payload_bytes": raw,
        "capsule_bytes_with_vectors": size, "capsule_over_raw_with_vectors": ratio(size, raw, 4),
        "capsule_bytes_without_vectors": size0, "capsule_over_raw_without_vectors": ratio(size0, raw, 4),
        "vectors_over_raw": ratio(size - size0, raw, 4),
        "records_with_vectors": rec, "records_without_vectors": rec0,
        "index_working_copies_bytes": ixb, "index_working_copies_over_raw": ratio(ixb, raw, 4),
        "note": "file size / raw payload bytes after close(); both capsules had their indexes attached "
                "during the build (as in use), so checkpoints copied the lexical index files in. "
                "records_*: a scan of every record header; referenced_by_last_checkpoint = the VECTORS / "
                "LEXFILE bytes the final checkpoint still lists (the rest are superseded copies)",
    }
    os.unlink(path0)
    shutil.rmtree(ixdir0, ignore_errors=True)

    seqs = build["seqs"]
    mid_seq = next(s for n, s in seqs if n >= total // 2)
    queries = make_queries(texts, cfg["n_queries"])
    log("speed: open times")
    out["open"] = bench_open(path, ixdir, emb2, cfg["open_runs"], queries[0])
    log(f"speed: latency, {len(queries)} queries")
    cap = engine.open(path, embedder=emb2, index_dir=ixdir)
    cap.find("warm up", k=1, mode="lex")
    lat = bench_latency(cap, queries, mid_seq)
    lat["as_of"]["frames_visible_at_as_of"] = next(n for n, s in seqs if s == mid_seq)
    lat["query_examples"] = queries[:6]
    out["latency"] = lat
    out["capsule_stats_search"] = cap.stats()["search"]
    cap.close()
    os.unlink(path)
    shutil.rmtree(ixdir, ignore_errors=True)

    L = lat
    modes = ("lex", "vec", "hybrid")
    hyb_cold = L["hybrid"]["cold"]["p50"]
    out["goals"] = {
        "lex_p50_ms": {"goal": GOALS["lex_p50_ms"], "value": L["lex"]["cold"]["p50"],
                       "met": L["lex"]["cold"]["p50"] <= GOALS["lex_p50_ms"]},
        "hybrid_cached_qvec_p50_ms": {"goal": GOALS["hybrid_cached_qvec_p50_ms"], "value": hyb_cold,
                                      "met": hyb_cold <= GOALS["hybrid_cached_qvec_p50_ms"]},
        "cache_hit_p50_ms": {"goal": GOALS["cache_hit_p50_ms"],
                             "value": {m: round(L[m]["cached"]["p50"] / 1e3, 4) for m in modes},
                             "met": all(L[m]["cached"]["p50"] / 1e3 <= GOALS["cache_hit_p50_ms"]
                                        for m in modes)},
        "as_of_over_latest_p50": {"goal": GOALS["as_of_over_latest"],
                                  "value": {m: L["as_of"][m]["p50_ratio"] for m in modes},
                                  "met": all((L["as_of"][m]["p50_ratio"] or 0) <= GOALS["as_of_over_latest"]
                                             for m in modes)},
    }
    return out


# -- main ----------------------------------------------------------------------------------


def summary_line(r: dict[str, Any]) -> str:
    parts = []
    q = r.get("quality")
    if q:
        for name, s in q["sets"].items():
            m = s["metrics"]
            parts.append(f"{name} nDCG@10 fts5 {m['fts5']['ndcg@10']:.3f} lex {m['lex']['ndcg@10']:.3f} "
                         f"vec {m['vec']['ndcg@10']:.3f} hyb {m['hybrid']['ndcg@10']:.3f}"
                         f"{'' if s['checks']['hybrid_ndcg_ge_max_lex_vec'] else ' (hyb<best)'}")
    s = r.get("speed")
    if s:
        L, op, size, emb = s["latency"], s["open"], s["size"], s["embedding_throughput"]
        parts.append(
            f"{s['corpus']['frames'] // 1000}k: p50 lex {L['lex']['cold']['p50']:.2f} "
            f"vec {L['vec']['cold']['p50']:.2f} hyb {L['hybrid']['cold']['p50']:.2f} ms, "
            f"hit {L['hybrid']['cached']['p50']:.0f} us, as-of x{L['as_of']['hybrid']['p50_ratio']} | "
            f"open {op['working_copies_present']['total_ms']:.0f} ms "
            f"(no ix {op['index_dir_deleted']['total_ms']:.0f}) | "
            f"cap/raw {size['capsule_over_raw_with_vectors']} "
            f"({size['capsule_over_raw_without_vectors']} w/o vec) | "
            f"embed {emb['threads_1']['per_s']}/{emb['threads_2']['per_s']} ch/s t1/t2")
    parts.append(f"{r['elapsed_s']:.0f} s")
    return " | ".join(parts)


def main() -> None:
    ap = arg_parser(__doc__, quick="tiny sizes, for smoke tests (<2 min)")
    ap.add_argument("--md", metavar="FILE", default=None,
                    help="quality table file (default bench/results/quality.md, "
                         "quality-quick.md with --quick)")
    ap.add_argument("--only", choices=("quality", "speed"), default=None, help="run one part only")
    ap.add_argument("--sets", default=None, help="comma-separated BEIR sets (default: all three)")
    ap.add_argument("--frames", type=int, default=None, help="frames in the speed capsule (default 100000)")
    ap.add_argument("--real-chunks", type=int, default=None, help="chunks embedded for real (default 3000)")
    ap.add_argument("--queries", type=int, default=None, help="speed queries (default 200)")
    ap.add_argument("--embed-cache", metavar="DIR", default=None,
                    help="reuse document vectors from DIR across runs (skips, and does not report, "
                         "embedding throughput)")
    args = parse_args(ap)

    cfg = dict(QUICK if args.quick else FULL)
    if args.sets:
        cfg["sets"] = tuple(s.strip() for s in args.sets.split(",") if s.strip())
    for opt, key in ((args.frames, "speed_chunks"), (args.real_chunks, "real_chunks"),
                     (args.queries, "n_queries")):
        if opt is not None:
            cfg[key] = opt
    t_start = time.perf_counter()
    cache = EmbedCache(args.embed_cache)
    with tempfile.TemporaryDirectory(prefix="memvidd-search-bench-", dir=args.tmpdir) as tmp:
        packages = ("tantivy", "usearch", "fastembed", "onnxruntime", "tokenizers", "numpy")
        env = environment(tmp, packages=packages, code=("engine",), dirty_key="engine_dirty",
                          sqlite=sqlite3.sqlite_version, engine_write_version=engine.WRITE_VERSION)
        result: dict[str, Any] = {
            **result_head("memvidd search", args.quick), "env": env,
            "config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
        }
        log("loading the embedder (threads=2)")
        emb = Embedder(threads=2)
        tok = TokenCounter()
        if args.only in (None, "quality"):
            result["quality"] = bench_quality(cfg, emb, tok, tmp, cache)
        if args.only in (None, "speed"):
            result["speed"] = bench_speed(cfg, emb, tok, tmp, cache)
        result["env"]["loadavg_end"] = loadavg()
        result["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        result["tmp_leftovers_before_cleanup"] = sorted(os.listdir(tmp))

    if "quality" in result:
        default_md = REPO / "bench" / "results" / ("quality-quick.md" if args.quick else "quality.md")
        md = Path(args.md) if args.md else default_md
        md.parent.mkdir(parents=True, exist_ok=True)
        dirty = " + uncommitted engine changes" if result["env"]["engine_dirty"] else ""
        head = (f"# memvidd search quality ({result['mode']} run, {result['started']}, "
                f"commit {(result['env']['git_commit'] or '?')[:10]}{dirty})\n\n")
        md.write_text(head + result["quality"]["table_markdown"])
        result["quality"]["table_file"] = str(md)
    write_result(result, args.out, summary_line)


if __name__ == "__main__":
    main()
