"""Giving freed memory back to the operating system while the daemon works.

glibc keeps the memory that Python frees in its heaps for reuse. A daemon that indexes
a tree creates many short-lived objects (file texts, chunks, encoded blocks) between
long-lived ones (frame metadata), so its RSS grew by ~1.9 KB per indexed chunk where
~0.85 KB was alive. Calling ``malloc_trim(0)`` once a second while writes go on cut
that growth to ~1.5 KB, and the peak RSS on the CPython stdlib from 164.6 to 152.6 MiB
(medians of 3 runs each of ``bench/watch_bench.py --only index --no-embed``; the runs
are noisy, +-25%). Where glibc is not the allocator, this does nothing.
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


def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    trim = getattr(libc, "malloc_trim", None)
    return trim if callable(trim) else None


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
