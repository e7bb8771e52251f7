#!/usr/bin/env python3
"""Benchmark of the ``memvidd`` command line against a running daemon: what one
``memvidd find`` costs, next to a bare ``python -c pass`` (the interpreter's own start).

Run::

    cd /work/main && .venv/bin/python bench/cli_bench.py [--runs N] [--out FILE]

Starts a real ``memvidd run`` (lexical only) on a temporary config, puts a few notes,
then times ``--runs`` runs each of ``python -c pass``, ``python -m memvidd find ...`` and,
if installed next to this Python, the ``memvidd`` entry point, interleaved round-robin
so that the machine's load drifts over all of them alike. Every command runs with this
checkout first on ``PYTHONPATH``, so it is this checkout's code that is measured, and
with a bytecode cache (``PYTHONPYCACHEPREFIX`` in the temporary directory, even where
``PYTHONDONTWRITEBYTECODE`` is set), as an installed ``memvidd`` has.

Prints one JSON document (stdout, or ``--out FILE``: p50/p90 of each, in ms, and the
ratios of the p50s to the bare interpreter's) and a one-line summary on stderr. The goal
(issue 12) is ``memvidd find`` at most 4x a bare ``python -c pass``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GOAL_RATIO = 4.0

CONFIG = """
[daemon]
socket = "{dir}/q.sock"
events-socket = "{dir}/e.sock"

[embedding]
model = "none"

[[capsule]]
name = "default"
path = "{dir}/default.mv2"
"""


def start_daemon(tmp: Path, env: dict[str, str], timeout: float = 60) -> subprocess.Popen[bytes]:
    """``memvidd run`` on a temporary config; returns once it notified READY=1 (as systemd)."""
    (tmp / "memvidd.toml").write_text(CONFIG.format(dir=tmp))
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp / "notify.sock"))
    notify.settimeout(timeout)
    argv = [sys.executable, "-m", "memvidd", "run", "--config", str(tmp / "memvidd.toml")]
    env = {**env, "NOTIFY_SOCKET": str(tmp / "notify.sock"), "XDG_RUNTIME_DIR": str(tmp)}
    with open(tmp / "daemon.log", "ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=log, cwd=REPO, env=env)
    try:
        while "READY=1" not in notify.recv(65536).decode().split("\n"):
            pass
    except TimeoutError:
        proc.kill()
        log_tail = (tmp / "daemon.log").read_text()[-3000:]
        raise SystemExit(f"the daemon did not start; log:\n{log_tail}") from None
    finally:
        notify.close()
    return proc


def timed(argv: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def summary(samples: list[float]) -> dict[str, float]:
    ms = sorted(s * 1e3 for s in samples)
    deciles = statistics.quantiles(ms, n=10, method="inclusive")
    return {"n": len(ms), "p50": round(statistics.median(ms), 2), "p90": round(deciles[8], 2),
            "min": round(ms[0], 2), "max": round(ms[-1], 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=30, help="runs of each command (default 30)")
    ap.add_argument("--out", help="write the JSON here instead of stdout")
    args = ap.parse_args()

    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    with tempfile.TemporaryDirectory(prefix="cli-bench-") as d:
        tmp = Path(d)
        env = {**os.environ, "PYTHONPATH": path, "PYTHONPYCACHEPREFIX": str(tmp / "pycache")}
        env.pop("MEMVIDD_SOCKET", None)
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        daemon = start_daemon(tmp, env)
        try:
            sock = str(tmp / "q.sock")
            for i in range(5):
                put = ["put", f"note {i}: the user likes dark mode", f"--uri=note://{i}", f"--socket={sock}"]
                subprocess.run([sys.executable, "-m", "memvidd", *put], env=env, check=True,
                               stdout=subprocess.DEVNULL)
            find = ["find", "dark mode", "--socket", sock]
            commands = {"python -c pass": [sys.executable, "-c", "pass"],
                        "python -m memvidd find": [sys.executable, "-m", "memvidd", *find]}
            entry = Path(sys.executable).with_name("memvidd")
            if entry.exists():
                commands["memvidd find"] = [str(entry), *find]
            which = [sys.executable, "-c", "import memvidd; print(memvidd.__file__)"]
            loaded = subprocess.run(which, env=env, check=True, capture_output=True, text=True).stdout.strip()
            for argv in commands.values():  # warm the page cache and the bytecode caches
                timed(argv, env)
            samples: dict[str, list[float]] = {name: [] for name in commands}
            for _ in range(args.runs):
                for name, argv in commands.items():
                    samples[name].append(timed(argv, env))
        finally:
            daemon.terminate()
            daemon.wait(timeout=30)

    results = {name: summary(s) for name, s in samples.items()}
    bare = results["python -c pass"]["p50"]
    ratios = {name: round(r["p50"] / bare, 2) for name, r in results.items() if name != "python -c pass"}
    out = {"memvidd": loaded, "runs": args.runs, "loadavg": os.getloadavg(), "ms": results,
           "p50_over_bare_python": ratios, "goal": GOAL_RATIO,
           "met": all(r <= GOAL_RATIO for r in ratios.values())}
    text = json.dumps(out, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    else:
        print(text)
    parts = [f"python -c pass p50 {bare} ms"]
    parts += [f"{name} p50 {results[name]['p50']} ms p90 {results[name]['p90']} ms (x{ratios[name]})"
              for name in ratios]
    parts.append(f"goal x{GOAL_RATIO}: {'met' if out['met'] else 'NOT met'}")
    print(" | ".join(parts), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
