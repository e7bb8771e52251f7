"""One capsule, served asynchronously: group commit, reads in threads, tail fan-out.

The engine is synchronous; the daemon calls it through this module, in ``trio.to_thread``
so the event loop never blocks on disk or CPU (the event loop itself touches only what
never waits: ``find_cached``, ``seq``, ``frame_count``):

- writes (staging puts, commits) go through a single writer slot, and are never
  abandoned on cancellation: a put that reached the engine is either committed or
  reported failed, never silently dropped;
- a put is acknowledged only when a commit that includes it has returned (fsync done).
  One committer task commits whatever was staged since the last commit, so puts that
  arrive together share one fsync (group commit);
- reads run in parallel with each other and with writes (the engine is thread-safe);
- after each commit, the new frames are pushed to tail subscribers through bounded
  channels; a subscriber whose channel is full is dropped, never waited for;
- codec upgrades run only when the capsule has been idle for a while, in small batches
  that give way to any staged put (the engine's ``upgrade_codecs``); so does compaction,
  when the bytes it would reclaim pass a share of the file. Compaction (requested or
  not) runs in a worker thread of its own, never in the writer slot: the engine locks the
  capsule only at its very end, so puts go on meanwhile. Upgrades and compactions never
  overlap (one maintenance slot).
- writes that commit on their own (rewind, rule changes) take their place in the write
  queue like puts: what was queued before them is committed first, what comes after
  them is staged after them;
- the writer slot is the only path that commits: the engine's embedding thread hands its
  vectors over (``Capsule.hand_vectors_to``) and rings the committer, which commits them
  with the next puts or, if none are queued, on their own.
- read your writes: ``searchable(seq)`` waits, woken by each commit and each batch of
  vectors (no polling), until a commit is searchable: by its words as soon as it is
  applied (the engine feeds a commit's frames to the lexical index as it applies it, and
  a search makes them visible first), by meaning once the text frames up to it have
  their vectors.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from collections.abc import Callable
from typing import Any, NoReturn

import trio
import trio.lowlevel

import engine

from .budget import OverBudget
from .sessions import Recorder

log = logging.getLogger("memvidd.service")


class NotSearchable(Exception):
    """A find's ``min_seq`` was not searchable in time (or, not ``retryable``, never will
    be while the daemon runs: embedding failed)."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class Subscriber:
    """A tail stream's queue of commits, bounded in count (the channel's buffer) and in
    bytes: ``hold(n)`` charges a queued batch to the subscriber's connection (the daemon's
    buffer budget, ``OverBudget`` when it does not fit), ``release(n)`` gives it back. A
    subscriber that falls behind either bound is dropped, and its queue given back at once:
    a reader that stopped reading holds at most the batch it is sending."""

    def __init__(self, send: trio.MemorySendChannel[Any], accept: Callable[[engine.Frame], bool],
                 hold: Callable[[int], None] | None = None, release: Callable[[int], None] | None = None) -> None:
        self.send = send
        self.accept = accept
        self._hold = hold or (lambda n: None)
        self.release = release or (lambda n: None)
        self.dropped: str | None = None  # why it was dropped
        self.queued = 0  # bytes of batches charged and queued, not yet taken by the stream

    def offer(self, batch: list[engine.Frame]) -> bool:
        """Queue ``batch``; False when it does not fit (the subscriber is dropped)."""
        size = batch_bytes(batch)
        try:
            self._hold(size)
        except OverBudget:
            return self._drop("over-budget")
        try:
            self.send.send_nowait((batch, size))
        except trio.WouldBlock:
            self.release(size)
            return self._drop("buffer-full")
        except BaseException:
            self.release(size)
            raise
        self.queued += size
        return True

    def taken(self, size: int) -> None:
        """The stream took a batch off the queue; it releases the bytes once sent."""
        self.queued -= size

    def _drop(self, reason: str) -> bool:
        self.dropped = reason
        self.release(self.queued)
        self.queued = 0
        return False


def batch_bytes(frames: list[engine.Frame]) -> int:
    """What a batch of frames costs to hold: payloads plus a little for each frame's metadata."""
    return sum(len(f.payload) + 256 for f in frames)


class WriteOp:
    """One request's writes, applied all or nothing, settled by the commit that holds them.

    ``items`` are puts, ``remove`` a frame id or URI to remove, ``fn`` any staging done
    with the capsule in the writer thread (its return value lands in ``result``).
    ``solo`` is a write that makes its own commit (``Capsule.rewind``, ``set_rules``:
    they refuse to run with anything staged): the ops queued before it are committed
    first, then it runs alone in the writer thread; its return value lands in ``result``
    and the capsule's head after it in ``seq``.
    """

    def __init__(self, items: list[dict[str, Any]] | None = None, remove: int | str | None = None,
                 fn: Callable[[engine.Capsule], Any] | None = None,
                 solo: Callable[[engine.Capsule], Any] | None = None) -> None:
        self.items = items
        self.remove = remove
        self.fn = fn
        self.solo = solo
        self.result: Any = None
        self.ids: list[int] = []
        self.seq = 0
        self.error: BaseException | None = None
        self.done = trio.Event()


class CapsuleService:
    def __init__(self, name: str, cap: engine.Capsule, *, interval_ms: int = 0, readers: int = 4,
                 passphrase: str | None = None) -> None:
        self.name = name
        self.cap = cap
        # An encrypted capsule's passphrase, kept for ``verify`` only (it reads the file
        # afresh); never logged, never sent.
        self._passphrase = passphrase
        self.interval = interval_ms / 1000
        self._writer = trio.CapacityLimiter(1)
        self._readers = trio.CapacityLimiter(readers)
        self._queue: list[WriteOp] = []  # submitted, not yet handed to the engine
        self._dirty = trio.Event()
        self._subscribers: list[Subscriber] = []
        self._seen_seq = cap.seq  # the last commit pushed to subscribers
        self.commits = 0
        self.acked_puts = 0
        # Agent sessions recording here: their events are queued as puts like any other.
        self.sessions = Recorder(self._record)
        self.indexer: Any = None  # the capsule's directory indexer, when it watches roots
        self.last_request = trio.current_time()  # reads and writes: what upgrades yield to
        self.upgrades = {"runs": 0, "moved": 0, "saved": 0, "busy": 0}
        self.compactions = {"runs": 0, "automatic": 0, "reclaimed": 0, "failures": 0}
        self._maintenance = trio.CapacityLimiter(1)  # codec upgrades and compactions, one at a time
        self._stopping = threading.Event()  # set on close: a compaction under way gives up
        # The writer slot is the only path that commits: vectors the engine embeds wait
        # for it (rung from the embedding thread) instead of being committed there.
        self._vectors_waiting = False
        self._progress = trio.Event()  # set (and replaced) by each commit and batch of vectors
        self._token = trio.lowlevel.current_trio_token()
        cap.hand_vectors_to(self._vectors_ready)

    # -- writes -----------------------------------------------------------------------

    async def _write(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._writer, abandon_on_cancel=False)

    def _record(self, items: list[dict[str, Any]]) -> None:
        """Queue a session's event; nobody waits for it (a failed commit fails the puts
        it shares a commit with, and they report it)."""
        self.submit(WriteOp(items))

    def submit(self, op: WriteOp) -> WriteOp:
        """Queue ``op`` (in arrival order); ``await op.done.wait()`` for its outcome."""
        self.last_request = trio.current_time()
        self._queue.append(op)
        self._dirty.set()
        return op

    def rewind(self, to: int | float) -> WriteOp:
        """A rewind of the capsule to ``to`` (a commit or a time), as a solo write. A capsule
        that watches directories has its indexer take its manifests from the rewound state
        in the same writer slot (no indexer write between the two), then scan its roots
        again: the files on disk win over the state the rewind brought back."""

        def solo(cap: engine.Capsule) -> int:
            seq = cap.rewind(to)
            if self.indexer is not None:
                self.indexer.rewound()
            return seq

        return WriteOp(solo=solo)

    async def put_many(self, items: list[dict[str, Any]]) -> tuple[list[int], int]:
        """Write ``items`` and wait until they are durable; returns (frame ids, commit seq)."""
        op = self.submit(WriteOp(items))
        await op.done.wait()
        if op.error is not None:
            raise op.error
        self.acked_puts += len(op.ids)
        return op.ids, op.seq

    async def flush(self) -> int:
        """Commit what is queued now; returns the commit sequence it is all in."""
        op = self.submit(WriteOp([]))
        await op.done.wait()
        return op.seq

    async def serve_committer(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> NoReturn:
        """Hand everything queued to the engine and commit it, again and again.

        Requests that arrive while a commit's fsync runs wait in the queue and go into the
        next commit together: one fsync per batch, however many clients sent it (group
        commit), and the event loop never waits for the disk.
        """
        task_status.started()
        while True:
            await self._dirty.wait()
            self._dirty = trio.Event()
            if self.interval:
                await trio.sleep(self.interval)  # gather more requests into this fsync
            await self.commit_queued()

    def _vectors_ready(self) -> None:
        """Called from the engine's embedding thread: have the committer commit them."""
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(self._wake_for_vectors)

    def _wake_for_vectors(self) -> None:
        self._vectors_waiting = True
        self._dirty.set()
        self._progressed()  # the vectors are searchable already: readers waiting for them go on

    def _progressed(self) -> None:
        self._progress.set()
        self._progress = trio.Event()

    async def commit_queued(self) -> None:
        batch, self._queue = self._queue, []
        vectors, self._vectors_waiting = self._vectors_waiting, False
        if not batch and not vectors:
            return

        def commit(group: list[WriteOp]) -> BaseException | None:
            try:
                seq = self.cap.commit()
            except Exception as e:  # noqa: BLE001 - the engine discarded the batch; say so
                for op in group:
                    if op.error is None:
                        op.error = e
                return e
            for op in group:
                op.seq = seq
            return None

        def apply() -> tuple[int, BaseException | None]:
            commits, failure = 0, None
            group: list[WriteOp] = []
            for op in batch:
                if op.solo is not None:
                    if group:  # what came before it is committed before it
                        failed = commit(group)
                        commits, failure, group = commits + (failed is None), failed or failure, []
                    try:
                        op.result = op.solo(self.cap)
                        op.seq = self.cap.seq
                        commits += 1
                    except Exception as e:  # noqa: BLE001 - a refused one fails alone
                        op.error = e
                    continue
                try:  # each op all or nothing; a refused one fails alone
                    with self.cap.atomic():
                        if op.remove is not None:
                            op.ids = [self.cap.remove(op.remove)]
                        elif op.items:
                            op.ids = self.cap.put_many(op.items)
                        if op.fn is not None:
                            op.result = op.fn(self.cap)
                except Exception as e:  # noqa: BLE001 - a refused or broken op fails alone
                    op.error = e
                group.append(op)
            if group or (vectors and not batch):  # vectors alone: a commit of their own
                failed = commit(group)
                commits, failure = commits + (failed is None), failed or failure
            return commits, failure

        commits, failure = await self._write(apply)
        for op in batch:
            op.done.set()
        self._progressed()
        self.commits += commits
        if failure is not None:
            log.error("commit failed capsule=%s error=%s", self.name, failure)
            if not commits:
                return
        try:
            await self._publish()
        except engine.EngineError:
            if failure is None:
                raise

    # -- maintenance: codec upgrades and compaction ---------------------------------------

    async def compact(self, *, codecs_only: bool = False, automatic: bool = False) -> dict[str, Any]:
        """Compact the capsule (or only upgrade its codecs) in a worker thread of the
        maintenance slot, never the writer slot; returns the engine's report, with the
        file's bytes before and after in both cases."""

        def run() -> dict[str, Any]:
            if not codecs_only:
                return self.cap.compact(cancel=self._stopping)
            before = self.cap.stats()["file_bytes"]
            report = self.cap.upgrade_codecs()
            return {"bytes_before": before, "bytes_after": self.cap.stats()["file_bytes"], **report}

        try:
            report = await trio.to_thread.run_sync(run, limiter=self._maintenance, abandon_on_cancel=False)
        except Exception:
            if not codecs_only:
                self.compactions["failures"] += 1
            raise
        if codecs_only:
            self.upgrades["runs"] += 1
            self.upgrades["moved"] += report["moved"]
            self.upgrades["saved"] += report["saved"]
            self.upgrades["busy"] += int(report["busy"])
            log.info("codec upgrade capsule=%s frames=%s saved=%s busy=%s", self.name,
                     report["moved"], report["saved"], report["busy"])
        else:
            self.compactions["runs"] += 1
            self.compactions["automatic"] += int(automatic)
            self.compactions["reclaimed"] += max(0, report["bytes_before"] - report["bytes_after"])
            log.info("compacted capsule=%s bytes_before=%s bytes_after=%s automatic=%s", self.name,
                     report["bytes_before"], report["bytes_after"], automatic)
        return report

    def reclaimable(self) -> dict[str, Any]:
        """What a compaction would reclaim now: dead bytes and the payloads of expired
        frames, and their share of the file (a sync read: call it in a thread)."""
        self.cap.timeline(limit=0)  # brings expiry up to date (time-based rules)
        s = self.cap.stats()
        dead = s["bytes_by_kind"]["dead"] + s["retention"]["expired_bytes"]
        return {"bytes": dead, "file_bytes": s["file_bytes"],
                "ratio": dead / s["file_bytes"] if s["file_bytes"] else 0.0}

    async def serve_maintenance(
        self, *, idle_s: float, cold_commits: int, upgrade: bool = True, compact_ratio: float = 0.0,
        batch: int = 256, recheck_s: float = 60.0,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> NoReturn:
        """Look after the capsule whenever no request came for ``idle_s``.

        First codec upgrades (``upgrade``), one batch at a time (a batch of 256 frames is
        ~0.1-0.3 s of CPU), re-checking idleness between batches. Then, when nothing is
        left to upgrade, compaction once the reclaimable bytes (dead, and the payloads of
        expired frames) exceed ``compact_ratio`` of the file (0: never). The ratio is
        re-checked after new commits, upgrades or compactions, and every ``recheck_s``
        (time-based expiry); a compaction that did not bring it under the threshold is
        not retried until something changes.
        """
        task_status.started()
        done_at_seq = -1  # upgrades found nothing left at this commit
        checked: tuple[int, int, int] | None = None  # what the last ratio check saw
        checked_at = -math.inf
        while True:
            quiet = trio.current_time() - self.last_request
            if quiet < idle_s:
                await trio.sleep(max(idle_s - quiet, idle_s / 4))
                continue
            if upgrade and self.cap.seq != done_at_seq:
                result = await trio.to_thread.run_sync(
                    lambda: self.cap.upgrade_codecs(max_frames=batch, batch_frames=batch, cold_commits=cold_commits),
                    limiter=self._maintenance, abandon_on_cancel=False)
                self.upgrades["runs"] += 1
                self.upgrades["moved"] += result["moved"]
                self.upgrades["saved"] += result["saved"]
                self.upgrades["busy"] += int(result["busy"])
                if result["moved"]:
                    log.info("codec upgrade capsule=%s frames=%s saved=%s remaining=%s", self.name,
                             result["moved"], result["saved"], result.get("remaining"))
                if not result["busy"] and not result.get("remaining"):
                    done_at_seq = self.cap.seq
                await trio.lowlevel.checkpoint()  # let requests that arrived meanwhile run first
                continue
            state = (self.cap.seq, self.upgrades["moved"], self.compactions["runs"])
            if compact_ratio > 0 and (state != checked or trio.current_time() - checked_at >= recheck_s):
                checked, checked_at = state, trio.current_time()
                found = await self.read_quietly(self.reclaimable)
                if found["ratio"] > compact_ratio:
                    log.info("compacting capsule=%s reclaimable=%s of %s bytes", self.name,
                             found["bytes"], found["file_bytes"])
                    try:
                        await self.compact(automatic=True)
                    except engine.EngineError as e:  # e.g. staged puts never quiet: later
                        log.warning("compaction failed capsule=%s error=%s", self.name, e)
                    checked = (self.cap.seq, self.upgrades["moved"], self.compactions["runs"])
                    await trio.lowlevel.checkpoint()
                    continue
            await trio.sleep(idle_s / 4)

    # -- reads ------------------------------------------------------------------------

    async def read(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self.last_request = trio.current_time()
        return await self.read_quietly(fn, *args, **kwargs)

    async def read_quietly(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """A read that does not count as activity (stats polling must not keep the
        capsule from ever being idle)."""
        return await trio.to_thread.run_sync(lambda: fn(*args, **kwargs), limiter=self._readers)

    async def searchable(self, seq: int, *, semantic: bool, wait_s: float) -> None:
        """Return once commit ``seq`` is searchable: applied (lexically), and with
        ``semantic`` once every text frame up to it has its vector. ``NotSearchable``
        after ``wait_s`` seconds, or at once if embedding failed."""
        waiting = 0
        with trio.move_on_after(wait_s):
            while True:
                progress = self._progress  # before looking: what happens meanwhile wakes us
                if self.cap.seq >= seq:
                    if not semantic or self.cap.model is None:  # (no vectors: nothing to wait for)
                        return
                    try:
                        waiting = await self.read_quietly(self.cap.unembedded, seq)
                    except (engine.CapsuleClosed, engine.CapsuleBroken):
                        raise
                    except engine.EngineError as e:
                        raise NotSearchable(f"commit {seq} cannot be searched by meaning: {e}",
                                            retryable=False) from None
                    if not waiting:
                        return
                await progress.wait()
        if self.cap.seq < seq:
            raise NotSearchable(f"commit {seq} was not made within {wait_s:g} s (the capsule is at commit "
                                f"{self.cap.seq}: is it a seq of this capsule?)")
        raise NotSearchable(f"{waiting} text frames up to commit {seq} still wait for their vectors after "
                            f"{wait_s:g} s (an embedding backlog); they are searchable lexically already: "
                            "retry, or find without semantic")

    async def verify(self) -> engine.Report:
        """Check the capsule file (an encrypted one with its passphrase)."""
        return await self.read(lambda: engine.verify(self.cap.path, passphrase=self._passphrase))

    # -- tail -------------------------------------------------------------------------

    def subscribe(self, buffer: int, accept: Callable[[engine.Frame], bool], *,
                  hold: Callable[[int], None] | None = None,
                  release: Callable[[int], None] | None = None) -> tuple[Subscriber, trio.MemoryReceiveChannel[Any]]:
        """A tail stream: batches of frames (one per commit, those ``accept`` takes) on the
        channel returned, at most ``buffer`` of them queued and, through ``hold``, no more
        bytes than the daemon's buffer budget allows; past either, the subscriber is
        dropped (``dropped``), never waited for."""
        send, receive = trio.open_memory_channel[Any](buffer)
        sub = Subscriber(send, accept, hold, release)
        self._subscribers.append(sub)
        return sub, receive

    def unsubscribe(self, sub: Subscriber) -> None:
        if sub in self._subscribers:
            self._subscribers.remove(sub)
        sub.send.close()

    async def _publish(self) -> None:
        if not self._subscribers:
            self._seen_seq = self.cap.seq
            return
        head = self.cap.seq
        frames: list[engine.Frame] = []
        while True:  # every frame of the commits since the last publish, in pages
            page = await self.read(self.cap.changes, self._seen_seq, after_id=frames[-1].id if frames else -1)
            if not page:
                break
            frames += page
        self._seen_seq = head
        for sub in list(self._subscribers):
            batch = [f for f in frames if sub.accept(f)]
            if not batch:
                continue
            try:
                # One item per commit, however many frames it holds. Never slow the
                # writer (or other subscribers) for one slow reader: drop it.
                if not sub.offer(batch):
                    log.warning("tail subscriber dropped capsule=%s reason=%s", self.name, sub.dropped)
                    self.unsubscribe(sub)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.unsubscribe(sub)

    # -- life cycle -------------------------------------------------------------------

    async def close(self) -> None:
        """Commit what is staged and close the capsule (callers shield this)."""
        await self.commit_queued()
        self._stopping.set()  # a long compaction must not hold up a stop: it is cancelled
        async with self._maintenance:  # a compaction or codec upgrade under way ends first
            await self._write(self.cap.close)
        for sub in list(self._subscribers):
            self.unsubscribe(sub)


def frame_filter(scope: str | None, kind: str | None, tags: dict[str, str] | None) -> Callable[[engine.Frame], bool]:
    def accept(f: engine.Frame) -> bool:
        if scope is not None and not (f.uri or "").startswith(scope):
            return False
        if kind is not None and f.kind != kind:
            return False
        return not tags or all(f.tags.get(k) == v for k, v in tags.items())

    return accept

