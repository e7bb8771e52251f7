"""The embedding queue: text frames waiting for their vector, and the thread that embeds them.

Committed text frames without a vector are queued newest first (what an agent most likely
asks about): each commit's frames go in front of the frames queued before, which all have
lower ids, so the queue is in descending id order and its oldest frames are at its end.
One background thread embeds them in batches through the capsule's ``Embedder``; the
vectors join the vector index at once (searchable) and wait in
``state.ready_vectors`` for the next commit, which writes them [F-14]. That commit is the
writer's: a program with one writer slot (the daemon) is told through ``hand_vectors_to``
and commits them itself; otherwise the thread commits them when no puts are staged.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from . import format as fmt
from .errors import CapsuleBroken, EngineError, StorageError
from .state import CapsuleState


class EmbeddingQueue:
    """Embeds one capsule's text frames in the background."""

    def __init__(self, state: CapsuleState, commit_if_idle: Callable[[], None]) -> None:
        """``commit_if_idle`` commits the ready vectors when no puts are staged (called
        with the lock held, when no writer took them)."""
        self._s = state
        self._commit_if_idle = commit_if_idle
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        self._queue: deque[int] = deque()
        self._inflight: list[int] = []  # ids of the batch being embedded
        self._sink: Callable[[], None] | None = None  # see hand_vectors_to
        self._embedded = 0
        self._seconds = 0.0
        self._errors = 0
        self.error: str | None = None
        self._counted: tuple[object, int, int] = (None, 0, 0)  # (table, frames counted, text frames among them)

    def queue_unembedded(self, first_id: int) -> None:
        """Queue text frames from ``first_id`` on that have no vector yet (lock held)."""
        s = self._s
        if s.embedder is None or s.vec is None or s.readonly:
            return
        fresh = [m.id for m in s.table.frames[first_id:] if m.op == fmt.PUT and m.is_text
                 and not (m.id < len(s.has_vec) and s.has_vec[m.id]) and m.id not in s.ready_vectors]
        self._queue.extendleft(fresh)  # newest first: what an agent most likely asks about
        if fresh and self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="memvidd-embed", daemon=True)
            self._thread.start()
        self._wake.set()

    def _loop(self) -> None:
        s = self._s
        embedder = s.embedder
        assert embedder is not None
        while True:
            self._wake.wait()
            with s.lock:
                if s.closed:
                    return
                batch: list[fmt.FrameMeta] = []
                while self._queue and len(batch) < s.opts.embed_batch:
                    fid = self._queue.popleft()
                    if not s.has_vec[fid] and fid not in s.ready_vectors:
                        batch.append(s.table.frames[fid])
                if not batch:
                    self._wake.clear()
                    continue
                self._inflight = [m.id for m in batch]
                view = s.views.pin()
            try:
                t0 = time.perf_counter()
                texts = [f"{m.title}\n{view.text(m)}" if m.title else view.text(m) for m in batch]
                vectors = embedder.embed(texts)
            except Exception as e:  # keep the capsule usable; the error shows in stats
                self.error = f"{type(e).__name__}: {e}"
                self._errors += 1
                return
            finally:
                s.views.unpin(view)
            with s.lock:
                if s.closed:
                    return
                self._embedded += len(batch)
                self._seconds += time.perf_counter() - t0
                for m, v in zip(batch, vectors, strict=True):
                    s.ready_vectors[m.id] = v
                self._inflight = []
                if s.indexes is not None:
                    s.indexes.add_vectors([m.id for m in batch], vectors)
                sink = self._sink
                if sink is None:
                    try:
                        self._commit_if_idle()
                    except (StorageError, CapsuleBroken) as e:
                        self.error = str(e)
            if sink is not None:
                sink()  # outside the lock: the writer it wakes takes it to commit

    def hand_vectors_to(self, ready: Callable[[], None] | None) -> None:
        """See ``Capsule.hand_vectors_to`` (lock held)."""
        self._sink = ready

    def waiting_below(self, end_id: int) -> int:
        """How many text frames with an id below ``end_id`` still wait for their vector,
        queued or being embedded (lock held). Looks only at the frames it counts: the
        queue's oldest are at its end. ``EngineError`` if some wait and embedding failed:
        they will not get one while the capsule stays open."""
        s = self._s
        n = sum(1 for fid in self._inflight if fid < end_id)
        for fid in reversed(self._queue):
            if fid >= end_id:
                break
            n += not s.has_vec[fid] and fid not in s.ready_vectors
        if n and self.error:
            raise EngineError(f"{n} frames will not be embedded: embedding failed: {self.error}")
        return n

    def wait(self, timeout: float | None) -> bool:
        """Block until every queued frame has its vector; False on timeout or error."""
        s = self._s
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with s.lock:
                done = not self._queue and not s.ready_vectors and not self._inflight
                busy = self._thread is not None and self._thread.is_alive()
            if done or self.error or not busy:
                return done and not self.error
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.01)

    def coverage(self) -> tuple[int, int]:
        """(text frames with a vector, text frames) without a walk over every frame: each
        frame is looked at once, as it comes (frames never change kind; lock held)."""
        s = self._s
        t = s.table
        table, upto, text = self._counted
        if table is not t or upto > t.next_id:  # a compaction's new table: count again
            upto = text = 0
        if upto < t.next_id:
            text += sum(1 for m in t.frames[upto:] if m.op == fmt.PUT and m.is_text)
        self._counted = (t, t.next_id, text)
        return s.has_vec.count(1) + len(s.ready_vectors), text

    def stop(self) -> None:
        """Wake the thread so it sees the capsule closed, and wait for it to end."""
        self._wake.set()
        if self._thread is not None:
            self._thread.join()

    def stats(self) -> dict[str, Any]:
        rate = self._embedded / self._seconds if self._seconds else None
        left = len(self._queue) + len(self._inflight)
        return {
            "queued": len(self._queue), "embedded": self._embedded, "errors": self._errors,
            "last_error": self.error,
            "frames_per_s": round(rate, 2) if rate else None,
            "embedder_loaded": self._s.embedder is not None,
            # What is queued now, at the rate measured so far: None while it cannot be
            # told (nothing embedded yet, or the embedding stopped on an error).
            "eta_s": 0 if not left else (max(0.1, round(left / rate, 1)) if rate and not self.error else None),
        }
