#!/usr/bin/env python3
"""Benchmark of the ``memvidd`` command line against a running daemon: what one
``memvidd find`` costs, next to a bare ``python -c pass`` (the interpreter's own start).

Run::

    cd /work/main && .venv/bin/python -m bench.cli_bench [--runs N] [--quick] [--out FILE] [-v]

Starts a real ``memvidd run`` (lexical only) on a temporary config, puts a few notes,
then times ``--runs`` runs each of ``python -c pass``, ``python -m memvidd find ...`` and,
if installed next to this Python, the ``memvidd`` entry point, interleaved round-robin
so that the machine's load drifts over all of them alike. Every command runs with this
checkout first on ``PYTHONPATH``, so it is this checkout's code that is measured, and
with a bytecode cache (``PYTHONPYCACHEPREFIX`` in the temporary directory, even where
``PYTHONDONTWRITEBYTECODE`` is set), as an installed ``memvidd`` has.

Prints one JSON document (stdout, or ``--out FILE``: the percentiles of each, in ms, and
the ratios of the p50s to the bare interpreter's) and a one-line summary on stderr. The
goal (issue 12) is ``memvidd find`` at most 4x a bare ``python -c pass``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import REPO, arg_parser, dist, environment, loadavg, log, parse_args, ratio, result_head, write_result
from bench.daemon_process import Daemon, daemon_dirs

GOAL_RATIO = 4.0
BARE = "python -c pass"
RUNS = 30
QUICK_RUNS = 5

CAPSULE = """
[[capsule]]
name = "default"
path = "{dir}/default.mv2"
"""


def timed(argv: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def summary_line(r: dict[str, Any]) -> str:
    ms, ratios = r["ms"], r["p50_over_bare_python"]
    parts = [f"{BARE} p50 {ms[BARE]['p50']:.1f} ms"]
    parts += [f"{name} p50 {ms[name]['p50']:.1f} ms p90 {ms[name]['p90']:.1f} ms (x{ratios[name]})" for name in ratios]
    parts.append(f"goal x{r['goal']}: {'met' if r['met'] else 'NOT met'}")
    parts.append(f"load {r['env']['loadavg_start'][0]}->{r['loadavg_end'][0]} | {r['elapsed_s']:.0f} s")
    return " | ".join(parts)


def main() -> None:
    ap = arg_parser(__doc__, quick=f"{QUICK_RUNS} runs of each command, a smoke test (--runs overrides it)")
    ap.add_argument("--runs", type=int, default=None, metavar="N", help=f"runs of each command (default {RUNS})")
    args = parse_args(ap)
    runs = args.runs if args.runs is not None else QUICK_RUNS if args.quick else RUNS

    t_start = time.perf_counter()
    with daemon_dirs("memvidd-cli-bench-", args.tmpdir) as (tmp, runtime):
        path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env = {**os.environ, "PYTHONPATH": path, "PYTHONPYCACHEPREFIX": str(tmp / "pycache")}
        env.pop("MEMVIDD_SOCKET", None)
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        which = [sys.executable, "-c", "import memvidd; print(memvidd.__file__)"]
        loaded = subprocess.run(which, env=env, check=True, capture_output=True, text=True).stdout.strip()
        result: dict[str, Any] = {**result_head("memvidd command line", args.quick),
                                  "env": environment(str(tmp), runtime_dir=runtime), "memvidd": loaded, "runs": runs}

        d = Daemon(tmp / "daemon", CAPSULE.format(dir=tmp), cache=tmp / "cache")
        try:
            log("starting the daemon")
            d.start()
            for i in range(5):
                put = ["put", f"note {i}: the user likes dark mode", f"--uri=note://{i}", f"--socket={d.socket}"]
                subprocess.run([sys.executable, "-m", "memvidd", *put], env=env, check=True,
                               stdout=subprocess.DEVNULL)
            find = ["find", "dark mode", "--socket", d.socket]
            commands = {BARE: [sys.executable, "-c", "pass"],
                        "python -m memvidd find": [sys.executable, "-m", "memvidd", *find]}
            entry = Path(sys.executable).with_name("memvidd")
            if entry.exists():
                commands["memvidd find"] = [str(entry), *find]
            for argv in commands.values():  # warm the page cache and the bytecode caches
                timed(argv, env)
            samples: dict[str, list[float]] = {name: [] for name in commands}
            for n in range(runs):
                if n % 10 == 0:
                    log(f"run {n + 1}/{runs}")
                for name, argv in commands.items():
                    samples[name].append(timed(argv, env))
            d.stop()
        finally:
            d.kill()

    ms = {name: dist(s, "ms") for name, s in samples.items()}
    ratios = {name: ratio(r["p50"], ms[BARE]["p50"], 2) for name, r in ms.items() if name != BARE}
    result.update({"ms": ms, "p50_over_bare_python": ratios, "goal": GOAL_RATIO,
                   "met": all(r is not None and r <= GOAL_RATIO for r in ratios.values()),
                   "loadavg_end": loadavg(), "elapsed_s": round(time.perf_counter() - t_start, 1)})
    write_result(result, args.out, summary_line)


if __name__ == "__main__":
    main()
