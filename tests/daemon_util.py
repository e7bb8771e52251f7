"""A real ``memvidd run`` in a subprocess, on temp sockets, for end-to-end tests.

Readiness is awaited the way systemd does it: the test owns a NOTIFY_SOCKET datagram
socket and waits for READY=1 (no polling, no fixed sleeps).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CONFIG = """
[daemon]
socket = "{dir}/q.sock"
events-socket = "{dir}/e.sock"
log-level = "debug"
shutdown-grace-s = 20

[limits]
max-put-bytes = {max_put}
max-frame-bytes = {max_frame}
tail-buffer = {tail_buffer}

[embedding]
model = "none"

{capsules}
"""

CAPSULE = """
[[capsule]]
name = "{name}"
path = "{dir}/{name}.mv2"
"""

WATCHING = """
[daemon]
socket = "{dir}/q.sock"
events-socket = "{dir}/e.sock"

[embedding]
model = "none"

[[capsule]]
name = "default"
path = "{dir}/default.mv2"
watch = [{watch}]
{extra}
"""


def watching_config(run: Path, *trees: Path, extra: str = "") -> str:
    """A lexical daemon's configuration whose default capsule (in ``run``) watches
    ``trees``; ``extra`` lines go into the capsule's table."""
    return WATCHING.format(dir=run, watch=", ".join(f'"{t}"' for t in trees), extra=extra)


class DaemonProc:
    def __init__(self, tmp: Path, *, capsules: tuple[str, ...] = ("default",), max_put: int = 1 << 20,
                 max_frame: int = 4 << 20, tail_buffer: int = 1024, env: dict[str, str] | None = None) -> None:
        self.dir = tmp
        self.socket = str(tmp / "q.sock")
        self.events = str(tmp / "e.sock")
        self.config = tmp / "memvidd.toml"
        self.write_config(capsules, max_put=max_put, max_frame=max_frame, tail_buffer=tail_buffer)
        (tmp / "runtime").mkdir(exist_ok=True)
        self.notify_path = str(tmp / "notify.sock")
        if os.path.exists(self.notify_path):
            os.unlink(self.notify_path)  # a previous daemon of the same test
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(self.notify_path)
        self.messages: list[str] = []
        self.env = {**os.environ, "NOTIFY_SOCKET": self.notify_path, "XDG_CACHE_HOME": str(tmp / "cache"),
                    "XDG_RUNTIME_DIR": str(tmp / "runtime"),
                    **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = tmp / "daemon.log"

    def write_config(self, capsules: tuple[str, ...], **limits: int) -> None:
        self.limits = limits or self.limits
        caps = "".join(CAPSULE.format(name=n, dir=self.dir) for n in capsules)
        self.config.write_text(CONFIG.format(dir=self.dir, capsules=caps, **self.limits))

    def start(self, timeout: float = 60, *, args: list[str] | None = None,
              command: list[str] | None = None) -> DaemonProc:
        """``memvidd`` (``command``, default ``python -m memvidd``) with ``args`` (default:
        ``run --config`` this daemon's config)."""
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [*(command or [sys.executable, "-m", "memvidd"]),
                 *(["run", "--config", str(self.config)] if args is None else args)],
                stdout=log, stderr=log, env=self.env, cwd=ROOT,
            )
        self.wait_for("READY=1", timeout)
        return self

    def wait_for(self, assignment: str, timeout: float = 30) -> list[str]:
        """Receive notify datagrams until one holds ``assignment``; returns all of its lines."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or (self.proc is not None and self.proc.poll() is not None and not self._pending()):
                raise TimeoutError(f"no {assignment} from the daemon; log:\n{self.log.read_text()[-3000:]}")
            self.notify.settimeout(min(left, 0.5))
            try:
                data = self.notify.recv(65536).decode()
            except TimeoutError:
                continue
            lines = data.split("\n")
            self.messages.extend(lines)
            if assignment in lines:
                return lines

    def _pending(self) -> bool:
        self.notify.setblocking(False)
        try:
            data = self.notify.recv(65536, socket.MSG_PEEK)
            return bool(data)
        except BlockingIOError:
            return False
        finally:
            self.notify.setblocking(True)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=30)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.notify.close()
