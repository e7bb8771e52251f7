"""memvidd/memory.py: freed memory goes back to the OS after writes, never when idle."""

from __future__ import annotations

import threading

import pytest
import trio

from memvidd import memory


def test_glibc_malloc_trim_is_found_here():
    assert memory._malloc_trim() is not None  # the machines this ships to run glibc


@pytest.mark.trio
async def test_trims_only_after_activity(monkeypatch):
    monkeypatch.setattr(memory, "TRIM_EVERY_S", 0.01)
    calls: list[int] = []
    trimmed = threading.Event()

    def trim(pad: int) -> int:  # runs in a worker thread, like the real one
        calls.append(pad)
        trimmed.set()
        return 1

    monkeypatch.setattr(memory, "_malloc_trim", lambda: trim)
    commits = [0]
    with trio.fail_after(30):
        async with trio.open_nursery() as n:
            await n.start(memory.serve_trim, lambda: commits[0])
            # A negative needs some time to pass: ten periods with no activity, no trim.
            await trio.sleep(10 * memory.TRIM_EVERY_S)
            assert calls == []
            commits[0] += 3
            assert await trio.to_thread.run_sync(trimmed.wait, 20)
            assert calls == [0]
            n.cancel_scope.cancel()


MMAP_PROBE = r"""
import ctypes, sys
from memvidd import memory

class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
if sys.argv[1] == "fixed":
    assert memory.fix_mmap_threshold()
big = bytearray(4 << 20)  # served by mmap; freeing it is what raises glibc's dynamic threshold
del big
before = libc.mallinfo2().hblkhd
block = bytearray(512 << 10)  # after that: mmap only if the threshold stayed fixed
print(libc.mallinfo2().hblkhd - before >= 512 << 10)
"""


@pytest.mark.parametrize("mode,mmapped", [("fixed", "True"), ("default", "False")])
def test_a_fixed_mmap_threshold_keeps_big_blocks_out_of_the_heap(mode, mmapped):
    """The glibc behaviour memory.fix_mmap_threshold is there for, and its cure, in a
    fresh process (this one's heap has a history)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", MMAP_PROBE, mode], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == mmapped
