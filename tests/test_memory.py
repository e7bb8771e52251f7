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
