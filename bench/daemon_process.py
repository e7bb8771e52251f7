"""The daemon under measurement: ``memvidd run`` in a subprocess, and the directories it runs in.

Shared by the daemon, watcher and command-line benchmarks, which talk to it over its socket as an agent
would. READY is awaited on our own NOTIFY_SOCKET, as systemd does.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.common import REPO

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


@contextmanager
def daemon_dirs(prefix: str, parent: str | None) -> Iterator[tuple[Path, str]]:
    """A temporary directory under ``parent`` (trees, capsules, sockets, logs; its ``cache``
    is XDG_CACHE_HOME: the model and the vector working copies) and a second one in /dev/shm
    for XDG_RUNTIME_DIR, where the engine keeps the lexical working copies (RAM-backed, as
    /run/user/UID is under systemd). Both variables are set for this process and so for
    every daemon it starts; both directories are removed at the end."""
    shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix=prefix, dir=parent) as tmp, \
            tempfile.TemporaryDirectory(prefix=prefix, dir=shm) as runtime:
        os.environ["XDG_CACHE_HOME"] = str(Path(tmp) / "cache")
        os.environ["XDG_RUNTIME_DIR"] = runtime
        yield Path(tmp), runtime


class Daemon:
    """``memvidd run`` on a config of ``capsules`` (TOML ``[[capsule]]`` tables) in ``directory``."""

    def __init__(self, directory: Path, capsules: str, *, model: str = "none", cache: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.dir = directory
        self.socket = str(directory / "q.sock")
        self.config = directory / "memvidd.toml"
        self.config.write_text(CONFIG.format(dir=directory, model=model, capsules=capsules))
        self.notify_path = str(directory / "notify.sock")
        self.log = directory / "daemon.log"
        self.env = {**os.environ, "XDG_CACHE_HOME": str(cache), "NOTIFY_SOCKET": self.notify_path}
        self.proc: subprocess.Popen[bytes] | None = None
        self.notify: socket.socket | None = None
        self.t_start = 0.0

    def start(self, timeout: float = 600) -> float:
        """Start it; returns seconds from spawn to READY=1."""
        if os.path.exists(self.notify_path):
            os.unlink(self.notify_path)  # a previous run of this daemon
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(self.notify_path)
        with open(self.log, "ab") as lf:
            self.t_start = time.perf_counter()
            cmd = [sys.executable, "-m", "memvidd", "run", "--config", str(self.config)]
            self.proc = subprocess.Popen(cmd, stdout=lf, stderr=lf, env=self.env, cwd=REPO)
        deadline = self.t_start + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited ({self.proc.returncode}); log:\n{self.tail_log()}")
            left = deadline - time.perf_counter()
            if left <= 0:
                raise TimeoutError(f"no READY=1 from the daemon; log:\n{self.tail_log()}")
            self.notify.settimeout(min(left, 0.2))
            try:
                data = self.notify.recv(65536).decode()
            except TimeoutError:
                continue
            if "READY=1" in data.split("\n"):
                return time.perf_counter() - self.t_start

    def since_start(self) -> float:
        return time.perf_counter() - self.t_start

    def tail_log(self, n: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def status(self) -> dict[str, float]:
        """VmRSS / VmHWM (MiB) of the daemon process, from /proc, and the RSS split into
        anonymous memory (heap), file pages mapped from the index files (reclaimable) and
        shared memory (working copies in /dev/shm)."""
        out: dict[str, float] = {}
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                    out[key.lower() + "_mib"] = round(int(line.split()[1]) / 1024, 1)
        return out

    def cpu_s(self) -> float:
        """user+system CPU seconds of the daemon so far (all threads)."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self, timeout: float = 300) -> float:
        """SIGTERM; returns seconds until it exited."""
        assert self.proc is not None
        t0 = time.perf_counter()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=timeout)
        took = time.perf_counter() - t0
        self._close_notify()
        if rc != 0:
            raise RuntimeError(f"daemon exited with {rc}; log:\n{self.tail_log()}")
        return took

    def kill(self) -> None:
        """Kill it if it still runs (a benchmark that failed half-way)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self._close_notify()

    def _close_notify(self) -> None:
        if self.notify is not None:
            self.notify.close()
            self.notify = None
