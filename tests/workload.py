"""A seeded workload of puts and removes with a model of every committed state."""

from __future__ import annotations

import random
from typing import Any

import engine

Op = tuple[str, str, bytes]  # ("put" | "remove", uri, payload)


class Workload:
    def __init__(self, seed: int, uris: int = 8) -> None:
        self.rng = random.Random(seed)
        self.uris = [f"u{i}" for i in range(uris)]
        self.states: list[dict[str, bytes]] = [{}]  # states[seq] = live uri -> payload

    def batch(self) -> list[Op]:
        live = dict(self.states[-1])
        ops: list[Op] = []
        for _ in range(self.rng.randint(1, 6)):
            uri = self.rng.choice(self.uris)
            if uri in live and self.rng.random() < 0.2:
                ops.append(("remove", uri, b""))
                del live[uri]
            else:
                n = self.rng.randint(0, 3000)
                data = self.rng.randbytes(n) if self.rng.random() < 0.3 else (uri.encode() * (n // 2 + 1))[:n]
                ops.append(("put", uri, data))
                live[uri] = data
        return ops

    @staticmethod
    def stage(cap: engine.Capsule, ops: list[Op]) -> None:
        for kind, uri, data in ops:
            if kind == "put":
                cap.put(data, uri=uri)
            else:
                cap.remove(uri)

    def committed(self, ops: list[Op]) -> None:
        live = dict(self.states[-1])
        for kind, uri, data in ops:
            if kind == "put":
                live[uri] = data
            else:
                del live[uri]
        self.states.append(live)


def snapshot(cap: engine.Capsule, as_of: int | None = None) -> dict[str, bytes]:
    """Every visible frame's payload by URI, read through the public API."""
    return {e.uri: cap.get(e.id).payload for e in cap.timeline(as_of=as_of, limit=1 << 30)}


def kill_after(script: str, delay: float, timeout: float = 30) -> str:
    """Run ``script`` in a fresh Python; once it prints ``ready``, wait ``delay`` seconds
    and SIGKILL it. Returns what it printed (``done`` if it finished first)."""
    import signal
    import subprocess
    import sys
    import time

    child = subprocess.Popen([sys.executable, script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        time.sleep(delay)  # a random moment inside the work
        child.send_signal(signal.SIGKILL)
        return child.communicate(timeout=timeout)[0]
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=timeout)


def power_cut_at(path: str, k: int, seed: int, work: Any, **open_kw: Any) -> bytes | None:
    """Open ``path`` through a ``CrashFile`` that cuts the power at its ``k``-th fsync,
    run ``work(cap)`` and close. Returns what the disk would hold after the cut, or
    ``None`` when the work finished with fewer than ``k`` fsyncs."""
    from engine.fileio import OsFile
    from engine.testing import CrashFile, SimulatedCrash, process_death

    files: list[CrashFile] = []

    def factory(p: str, readonly: bool) -> CrashFile:
        files.append(CrashFile(OsFile.open(p, readonly=readonly), seed=seed * 1000 + k, crash_at_sync=k))
        return files[-1]

    cap = engine.open(path, file_factory=factory, **open_kw)
    try:
        work(cap)
        cap.close()
        return None
    except SimulatedCrash:
        return files[-1].image
    finally:
        process_death(cap)  # idempotent after a close
