"""Read your writes: how long from a put until a find that waits for it (``min_seq``)
returns it, lexically and by meaning, against a real daemon with the real model.

The lexical figure is taken twice: on a daemon without the model, and on one with it
(where each put is also embedded in the background, on the same cores). Each run puts one
new text (its own words, its own URI) on one connection and, as soon as
the put is acknowledged, asks on a second connection (another agent, or the MCP server
after a reconnect) for it with ``min_seq`` set to the put's commit: ``mode="lex"`` for the
lexical figure, ``mode="vec", semantic=True`` for the semantic one (the find waits for the
put's vector, embedded in the background). Every find must return the put first. For
comparison, the same semantic find without ``min_seq`` right after a put: how often it
misses the put (what the wait is for).

Run from the repository root: ``python -m bench.rw_bench [-v] [--quick] [--out FILE]``.
"""

from __future__ import annotations

import time
from typing import Any

from bench.common import arg_parser, dist, environment, log, parse_args, result_head, write_result
from bench.daemon_process import Daemon, daemon_dirs

CAPSULE = """
[[capsule]]
name = "default"
path = "{path}"
"""
MODEL = "all-MiniLM-L6-v2"
WARMUP = 5
ANIMALS = ["otter", "heron", "badger", "owl", "fox", "beaver", "lynx", "marten", "stoat", "vole"]
PLACES = ["by the old mill", "under the bridge", "near the weir", "in the reed bed", "on the far bank"]


def text(i: int) -> str:
    """A note of its own for run ``i`` (a word no other run has, for the lexical find)."""
    return (f"Field note {i}: the {ANIMALS[i % len(ANIMALS)]} was seen {PLACES[i % len(PLACES)]} "
            f"at dawn, marked zq{i}x in the log.")


def runs(writer: Any, reader: Any, n: int, *, semantic: bool, wait: bool, start: int) -> dict[str, Any]:
    """``n`` put -> find rounds; returns the timings and how many finds missed the put."""
    put_s, find_s, total_s, missed = [], [], [], 0
    for i in range(start, start + n):
        t0 = time.perf_counter()
        reply = writer.put_reply(text(i), uri=f"note://run/{i}")
        t1 = time.perf_counter()
        kw: dict[str, Any] = {"min_seq": reply.seq, "semantic": semantic} if wait else {}
        if semantic:
            hits = reader.find(text(i), mode="vec", k=1, **kw)
        else:
            hits = reader.find(f"zq{i}x", mode="lex", k=1, **kw)
        t2 = time.perf_counter()
        if not hits or hits[0].uri != f"note://run/{i}":
            missed += 1
        put_s.append(t1 - t0)
        find_s.append(t2 - t1)
        total_s.append(t2 - t0)
    return {"runs": n, "missed": missed, "put_to_found": dist(total_s), "put": dist(put_s),
            "find": dist(find_s)}


def main() -> None:
    ap = arg_parser(__doc__ or "", "10 runs of each instead of 50")
    ap.add_argument("--runs", type=int, default=None, help="rounds of each kind (default 50; --quick 10)")
    args = parse_args(ap)
    n = args.runs or (10 if args.quick else 50)
    t_start = time.perf_counter()
    with daemon_dirs("memvidd-rw-bench-", args.tmpdir) as (tmp, runtime):
        result: dict[str, Any] = {**result_head("memvidd read your writes", args.quick),
                                  "env": environment(str(tmp), packages=("fastembed", "onnxruntime", "tantivy"),
                                                     runtime_dir=runtime),
                                  "model": MODEL, "runs": n}
        from memvidd.client import Client

        # A daemon without the model (lexical search only), then one with it, where each
        # put is also embedded in the background while the lexical finds run.
        phases = (("none", "lexical_only_daemon", (("lexical", False, True), ("lexical_no_wait", False, False))),
                  (MODEL, "model_daemon", (("lexical", False, True), ("semantic", True, True),
                                           ("semantic_no_wait", True, False))))
        for model, phase, kinds in phases:
            d = Daemon(tmp / phase, CAPSULE.format(path=tmp / f"{phase}.mv2"), model=model, cache=tmp / "cache")
            try:
                out: dict[str, Any] = {"ready_s": round(d.start(), 3)}
                with Client(d.socket) as writer, Client(d.socket) as reader:
                    log(f"{phase}: warming up")
                    runs(writer, reader, WARMUP, semantic=model != "none", wait=True, start=0)
                    start = WARMUP
                    for name, semantic, wait in kinds:
                        log(f"{phase}: {name}, {n} runs")
                        out[name] = runs(writer, reader, n, semantic=semantic, wait=wait, start=start)
                        start += n
                        assert not wait or out[name]["missed"] == 0, out[name]
                d.stop()
            finally:
                d.kill()
            result[phase] = out
    result["elapsed_s"] = round(time.perf_counter() - t_start, 1)

    def summary(r: dict[str, Any]) -> str:
        lex, m = r["lexical_only_daemon"]["lexical"], r["model_daemon"]
        return (f"put->found p50: lexical {lex['put_to_found']['p50']:.2f} ms (put {lex['put']['p50']:.2f}) "
                f"| model loaded: lexical {m['lexical']['put_to_found']['p50']:.2f} ms, semantic "
                f"{m['semantic']['put_to_found']['p50']:.2f} ms (p90 {m['semantic']['put_to_found']['p90']:.2f}), "
                f"semantic without min_seq missed {m['semantic_no_wait']['missed']}/{n} | load "
                f"{r['env']['loadavg_start'][0]} | {r['elapsed_s']} s")

    write_result(result, args.out, summary)


if __name__ == "__main__":
    main()
