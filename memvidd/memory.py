"""How the daemon keeps its heap from growing with what it has indexed.

glibc's malloc serves blocks over 128 KiB with mmap, and gives them back on free, until
one such block is freed: from then on it raises that threshold (up to 32 MiB) and serves
big blocks from its heaps, where each freed one leaves a hole the next, larger one does
not fit. An indexing daemon allocates exactly such a series: whole files read, growing
frame-table columns, encoded batches. Measured in-process while indexing the CPython
stdlib (43.6k chunks; malloc's own counters): memory in use stayed at ~40 MB while the
free-but-kept part of the heaps grew 29 -> 55 MB, and RssAnon ~1.4 KB per chunk.
``fix_mmap_threshold`` pins the threshold at its default, so big blocks always go back
to the system: RssAnon then grew ~0.5 KB per chunk, most of it mmap churn.

``serve_trim`` also calls ``malloc_trim(0)`` once a second while writes go on, which
returns whole free pages inside the heaps. Where glibc is not the allocator, both do
nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from collections.abc import Callable
from typing import NoReturn

import trio

log = logging.getLogger("memvidd.memory")
TRIM_EVERY_S = 1.0


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def _malloc_trim() -> Callable[[int], int] | None:
    trim = getattr(_libc(), "malloc_trim", None)
    return trim if callable(trim) else None


M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)
MMAP_THRESHOLD = 128 * 1024  # glibc's default, kept fixed


def fix_mmap_threshold() -> bool:
    """Serve blocks over 128 KiB with mmap for good (setting it turns off glibc's
    dynamic threshold). Returns whether the allocator took it."""
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None)
    return bool(callable(mallopt) and mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))


async def serve_trim(activity: Callable[[], int], *,
                     task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> NoReturn:
    """Trim once a second, only when ``activity()`` (a counter of commits) moved since
    the last trim: an idle daemon does nothing. Runs in a worker thread (it takes the
    allocator's locks and walks its heaps: milliseconds)."""
    trim = _malloc_trim()
    task_status.started()
    last = activity()
    while True:
        await trio.sleep(TRIM_EVERY_S)
        now = activity()
        if trim is not None and now != last:
            last = now
            await trio.to_thread.run_sync(trim, 0)
