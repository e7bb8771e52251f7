"""Keeping a capsule current with the directories it watches.

Pipeline (bounded trio channels between the stages, so a slow stage pushes back)::

    watcher thread ─┐
    start-up scan  ─┴─> paths ──> prepare (read, hash, chunk, diff; worker threads)
                                     └──> writes ──> CapsuleService (group commit)
                                                       └──> engine embedder thread

A file is a document: a ``file`` frame (binary msgpack manifest: size, mtime, content
hash, and the digest, frame id, key and lines of each chunk, in order: ``manifest.py``)
at ``file://<path>``, and one ``chunk`` frame per chunk at ``file://<path>#<key>``. Chunks are not numbered: a key
is made from the digest of the text the chunk first had (``match_chunks``), so a chunk
whose text did not change keeps its frame wherever it moved (an insertion near the top
writes the new chunk, not every chunk after it), an edited chunk gets a new version at
its key, and only chunks that really vanished get tombstones. The frame's ``chunk`` is
its position when written; the manifest holds the current order. Manifests from before
keys (``#<position>``) stay valid as they are. A chunk whose text already exists
anywhere keeps its vector (no second embedding). A deleted file's frames get
tombstones; a rename is a delete plus an add whose chunks reuse the old vectors.

Hostile files: a file is read only through ``Tree.open`` (no symlink swapped in after the
checks can lead the read out of the root). Chunking runs in a worker thread under a time
budget (``chunk_budget_s``); a document's text (PDF, office, HTML) is first extracted in a
child process within the tree's ``documents`` limits (``documents.py``). A file that
exceeds them, or that cannot be read or chunked (encrypted, damaged, scanned), is
skipped: its manifest has no chunks and says why (``skipped``), so that it is not chunked
again, even after a restart, until its content changes. Those files and their reasons are
listed in the stats.

Start-up: the watcher is started first, then every root is walked and compared with the
manifests by size and mtime (then content hash), so changes made while the daemon was
down are found without re-reading unchanged files, and none made during the scan is
missed. Partial saves: a file that some process has open for writing (an editor between
the writes of one save; ``being_written``, a few microseconds) is looked at again every
``WRITER_POLL_S`` until it is closed, for at most ``WRITER_WAIT_S``; a file is re-stat'ed
after it is read and read again if it moved under us; a file that becomes empty is
given a moment to be written before it counts.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import itertools
import logging
import os
import signal
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import msgspec
import trio
import watchfiles

import engine

from .chunker import Document, file_kind, is_document
from .documents import Unreadable, read_file
from .manifest import (
    CHUNK_KIND,
    FILE_KIND,
    Known,
    Manifest,
    chunk_uri,
    clean,
    file_uri,
    manifest_decoder,
    uri_path,
)
from .service import CapsuleService, WriteOp
from .tree import Moved, Tree, is_binary

log = logging.getLogger("memvidd.ingest")

EMPTY_SETTLE_S = 0.3  # how long an emptied file may stay empty before it counts
WRITER_POLL_S = 0.02  # how often a file that some process has open for writing is looked at again
WRITER_WAIT_S = 1.0  # ...for at most this long; then it is taken as it is (a log that stays open)
MAX_RETRIES = 5
SCAN = -2  # the `attempt` of a path queued by the start-up scan (size+mtime are trusted)
FINAL = -1  # the last attempt after retries: take the file as it is
SKIPPED_SHOWN = 50  # skipped files listed in the stats (the count has them all)
RATE_WINDOW_S = 30.0  # the indexing rate (and ETA) is measured over this much recent work


class DigestMap:
    """Chunk text digest -> a frame id holding that text, at 32 B an entry: two KeyMaps
    over the two halves of the 128-bit digest, so a hit is exact, not a 64-bit guess."""

    def __init__(self) -> None:
        self._fid = engine.KeyMap()  # first half -> frame id (-1: forgotten)
        self._rest = engine.KeyMap()  # first half -> second half

    def get(self, d: bytes) -> int | None:
        head, rest = engine.halves(d)
        fid = self._fid.get(head)
        return fid if fid is not None and fid >= 0 and self._rest.get(head) == rest else None

    def set(self, d: bytes, fid: int) -> None:
        head, rest = engine.halves(d)
        self._fid.set(head, fid)
        self._rest.set(head, rest)

    def forget(self, d: bytes, fid: int) -> None:
        """``d`` no longer leads to ``fid`` (that frame was never committed)."""
        if self.get(d) == fid:
            self._fid.set(engine.halves(d)[0], -1)


def digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", errors="surrogateescape"), digest_size=16).digest()


def match_chunks(old: list[tuple[bytes, str]], new: list[bytes]) -> tuple[list[tuple[str, int | None]], list[str]]:
    """How a file's new chunks (their digests, in order) take over its old ones
    ((digest, key) pairs, in order), so that as few frames as possible are written.

    Returns, for each new chunk, its key and the index of the old chunk it *is* (same
    text: kept as it is, wherever it moved) or None (to be written: at an old key when
    it replaces an old chunk that sits between the same kept neighbours, as an edited
    chunk does, so that the new text is a new version of that chunk; else at a fresh
    key made from its digest); and the keys of the old chunks that are gone.
    """
    free: dict[bytes, deque[int]] = {}
    for j, (d, _) in enumerate(old):
        free.setdefault(d, deque()).append(j)
    same: list[int | None] = []
    for d in new:
        q = free.get(d)
        same.append(q.popleft() if q else None)
    kept = {j for j in same if j is not None}
    # The chunks left over on either side, grouped by the kept chunk just before them.
    old_left: dict[int, deque[int]] = {}
    before = -1
    for j in range(len(old)):
        if j in kept:
            before = j
        else:
            old_left.setdefault(before, deque()).append(j)
    taken = {k for _, k in old}
    suffix: dict[str, int] = {}  # digest prefix -> the suffix of the last fresh key made from it
    out: list[tuple[str, int | None]] = []
    before = -1
    for i, d in enumerate(new):
        kept_at = same[i]
        if kept_at is not None:
            out.append((old[kept_at][1], kept_at))
            before = kept_at
            continue
        q = old_left.get(before)
        if q:
            out.append((old[q.popleft()][1], None))  # an edit of that chunk: a new version
            continue
        # Fresh keys of one digest go up from the last one made (those below are taken):
        # searched from ".0" each time, the keys of 8,000 equal chunks took 4.6 s.
        base = d[:8].hex()
        n = suffix.get(base, 0)
        key = f"{base}.{n}" if n else base
        while key in taken:
            n += 1
            key = f"{base}.{n}"
        suffix[base] = n
        taken.add(key)
        out.append((key, None))
    gone = [old[j][1] for q in old_left.values() for j in q]
    return out, gone


_F_SETLEASE = getattr(fcntl, "F_SETLEASE", None)  # Linux only


def being_written(fd: int) -> bool:
    """Has any process the file behind ``fd`` (open read-only) open for writing?

    A read lease cannot be taken on a file open for writing (EAGAIN), so taking one and
    dropping it at once tells, in a few microseconds, without scanning ``/proc``. False
    when it cannot be told: no leases here (not Linux, NFS, leases disabled) or not our
    file (leases need the owner or CAP_LEASE).
    """
    if _F_SETLEASE is None:
        return False
    try:
        # A writer opening the file in the microseconds the lease exists breaks it, and
        # the kernel tells the lease holder with SIGIO, which would kill the daemon: ask
        # for SIGURG instead, ignored by default.
        fcntl.fcntl(fd, fcntl.F_SETSIG, signal.SIGURG)
        fcntl.fcntl(fd, _F_SETLEASE, fcntl.F_RDLCK)
    except OSError as e:
        return e.errno == errno.EAGAIN
    with contextlib.suppress(OSError):  # closing the file drops it too
        fcntl.fcntl(fd, _F_SETLEASE, fcntl.F_UNLCK)
    return False


class Wait(float):
    """A delay to look at a path again after, without counting it as a retry."""


class Progress(msgspec.Struct):
    phase: str = "starting"  # starting, scanning, indexing, watching; missing (no root exists), idle (no root)
    files_seen: int = 0
    # Paths queued to be looked at (by a scan: new, changed or vanished since the manifests;
    # by the watcher: every change), and of them those done, whatever the outcome (written,
    # unchanged, skipped, deleted, failed): files_to_index - files_indexed are left to do.
    files_to_index: int = 0
    files_indexed: int = 0
    files_unchanged: int = 0
    files_skipped: int = 0
    files_deleted: int = 0
    chunks_written: int = 0
    chunks_kept: int = 0
    vectors_reused: int = 0
    bytes_read: int = 0
    errors: int = 0
    started: float = 0.0
    scan_seconds: float = 0.0


class IngestPipeline:
    def __init__(self, svc: CapsuleService, trees: list[Tree], *, chunk_size: int = 1500, overlap: int = 150,
                 debounce_ms: int = 20, step_ms: int = 5, workers: int = 2, queue: int = 256,
                 chunk_budget_s: float | None = None) -> None:
        self.svc = svc
        self.trees = trees
        self.chunk_size = chunk_size
        self.overlap = overlap
        self.debounce_ms = debounce_ms
        self.step_ms = step_ms
        self.workers = workers
        self.chunk_budget_s = chunk_budget_s  # None: by the file's size (documents.CHUNK_BUDGET_S...)
        self.docs: dict[str, Known] = {}  # file uri -> manifest (as committed or staged)
        self.skipped: dict[str, str] = {}  # file uri -> why it has no chunks (Known.skipped)
        self.by_digest = DigestMap()  # chunk text digest -> a frame id holding it
        self.lock = threading.Lock()  # docs/by_digest are touched by worker threads
        self.pending: set[str] = set()  # paths queued and not yet prepared
        self.again: set[str] = set()  # pending paths that changed again meanwhile
        self.writing: dict[str, float] = {}  # path -> when it was first seen open for writing
        self.paths_send, self.paths_recv = trio.open_memory_channel[tuple[str, int]](queue)
        self.progress = Progress(started=time.time())
        self._finished: deque[float] = deque(maxlen=1024)  # when the last files were done (monotonic)
        self._changed = trio.Event()  # the roots to watch, or the set of them that exists, changed
        self.missing: set[str] = set()  # roots that are not (yet) directories
        self.stop = threading.Event()

    # -- state ------------------------------------------------------------------------

    def load(self) -> None:
        """Read the manifests of every live file frame (start-up, or after a rewind; a
        worker thread). Built apart and put in place at once: the event loop may be
        reading ``docs`` meanwhile."""
        cap = self.svc.cap
        docs: dict[str, Known] = {}
        skipped: dict[str, str] = {}
        by_digest = DigestMap()
        for info in cap.timeline(limit=1 << 40, kind=FILE_KIND):  # not every chunk's too
            if info.uri is None:
                continue
            try:
                m = manifest_decoder.decode(cap.get(info.id).payload)
            except (msgspec.DecodeError, msgspec.ValidationError, engine.EngineError) as e:
                log.warning("unreadable manifest uri=%s: %s (the file will be re-indexed)", info.uri, e)
                continue
            docs[info.uri] = Known(m)
            if m.skipped:
                skipped[info.uri] = m.skipped
            for d, fid in m.chunks:
                by_digest.set(d, fid)
        self.docs, self.skipped, self.by_digest = docs, skipped, by_digest

    def rewound(self) -> None:
        """The capsule was rewound (called in the writer slot, right after the rewind's
        commit): the manifests are those of the state it brought back, and the roots are
        scanned again, so that the files as they are on disk win. Writes prepared before
        build on the reloaded manifests: each reads them when it is applied."""
        with self.lock:
            self.load()
        trio.from_thread.run_sync(self.rescan)

    def rescan(self) -> None:
        """Watch and scan every root again (the supervisor starts over)."""
        self._changed.set()

    def _set_doc(self, uri: str, known: Known | None) -> None:
        """``docs[uri] = known`` (None: forget it), and the list of skipped files with it."""
        if known is None:
            self.docs.pop(uri, None)
        else:
            self.docs[uri] = known
        if known is not None and known.skipped:
            self.skipped[uri] = known.skipped
        else:
            self.skipped.pop(uri, None)

    def tree_of(self, path: str) -> Tree | None:
        p = Path(path)
        return next((t for t in self.trees if t.root == p or t.root in p.parents), None)

    def left(self) -> int:
        """Files queued or being indexed: looked at, and their writes not yet committed."""
        return self.progress.files_to_index - self.progress.files_indexed

    def _done(self) -> None:
        """One queued path is done (whatever the outcome)."""
        self.progress.files_indexed += 1
        self._finished.append(time.monotonic())
        if self.progress.phase == "indexing" and not self.left():
            self.progress.phase = "watching"

    def rate(self, window_s: float = RATE_WINDOW_S) -> float | None:
        """Files done per second lately (over the last ``window_s`` of work, so that an idle
        hour does not dilute it); None while too few were done to tell."""
        now = time.monotonic()
        recent = [t for t in self._finished if now - t <= window_s]
        if len(recent) < 2 or recent[-1] <= recent[0]:
            return None
        return (len(recent) - 1) / (recent[-1] - recent[0])

    def stats(self) -> dict[str, Any]:
        s = msgspec.to_builtins(self.progress)
        generated = {path: why for t in self.trees for path, why in t.generated.copy().items()}
        elapsed = time.time() - self.progress.started
        done = self.progress.files_indexed + self.progress.files_unchanged
        left, queued, rate = self.left(), len(self.pending), self.rate()
        s.update(
            documents=len(self.docs), queued=queued,
            in_flight=max(0, left - queued),  # read, or written and not yet committed, or to be retried
            mb_read=round(self.progress.bytes_read / 1e6, 3),
            files_per_s=round(done / elapsed, 1) if elapsed > 0 else None,
            roots=[str(t.root) for t in self.trees],
            missing=sorted(self.missing),  # roots that are not directories: watched once they are
            # Copies first (one C call each, whole under the GIL): worker threads change them.
            skipped=dict(itertools.islice(itertools.chain(
                ((clean(uri_path(u)), why) for u, why in self.skipped.copy().items()),
                ((clean(path), f"generated: {why}") for path, why in generated.items())), SKIPPED_SHOWN)),
            files_unchunkable=len(self.skipped),
            files_generated=len(generated),  # passed over as generated data (tree.GENERATED)
        )
        # The files left at the recent rate (their embedding is the engine's: vectors.embedding);
        # None while it cannot be told yet.
        s["eta_s"] = 0 if not left else (max(0.1, round(left / rate, 1)) if rate else None)  # never 0 while left
        return s

    # -- the pipeline -------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Load, start watching, scan, then follow changes until cancelled."""
        await trio.to_thread.run_sync(self.load)
        writes_send, writes_recv = trio.open_memory_channel[tuple[str, WriteOp]](64)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            async with writes_send:
                for _ in range(self.workers):
                    nursery.start_soon(self._prepare_worker, self.paths_recv.clone(), writes_send.clone())
            nursery.start_soon(self._writer, writes_recv)
            await nursery.start(self._supervise)
            task_status.started()

    async def _supervise(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Watch the roots that exist, scan them, and start over when that set changes (a
        root that appears, or disappears and comes back, is watched and scanned again) or
        the roots themselves do (``retarget``)."""
        started = False
        while True:
            self._changed = trio.Event()  # made before the scan: a change during it is not lost
            trees = self.trees
            present = [t for t in trees if t.root.is_dir()]
            self._report_missing(trees, present)
            if not present:
                self.progress.phase = "missing" if trees else "idle"
                if not started:
                    task_status.started()
                    started = True
                await self._until_changed(trees, present)
                continue
            self.stop = threading.Event()
            async with trio.open_nursery() as nursery:
                await nursery.start(self._watch, present)  # watches in place before the scan
                if not started:
                    task_status.started()
                    started = True
                await self._scan_all(present)
                await self._until_changed(trees, present)
                self.stop.set()
                nursery.cancel_scope.cancel()

    async def _until_changed(self, trees: list[Tree], present: list[Tree]) -> None:
        """Until ``retarget``, the watcher seeing a root itself removed (it may be back at
        once, but the old watch died with the old directory), or a root appearing or
        going. That last one is looked for once a second: no event says that a directory
        was created where none was (watching the nearest existing parent instead would
        mean following each level of a ``mkdir -p`` as it appears, for roots that rarely
        come and go); a stat per root a second costs nothing."""
        while not self._changed.is_set() and [t for t in trees if t.root.is_dir()] == present:
            with trio.move_on_after(1.0):
                await self._changed.wait()

    def _report_missing(self, trees: list[Tree], present: list[Tree]) -> None:
        """Log each root that went missing (or came back) once; ``stats`` lists them."""
        missing = {str(t.root) for t in trees} - {str(t.root) for t in present}
        for root in sorted(missing - self.missing):
            log.warning("watch directory missing capsule=%s path=%s: not a directory (yet); it is watched "
                        "once it exists", self.svc.name, root)
        for root in sorted(self.missing - missing):
            if any(str(t.root) == root for t in trees):
                log.info("watch directory found capsule=%s path=%s", self.svc.name, root)
        self.missing = missing

    def retarget(self, trees: list[Tree], *, chunk_size: int, overlap: int, debounce_ms: int) -> None:
        """Watch ``trees`` from now on, with these settings (a reload): their roots are
        watched and scanned again, so that files newly included or excluded are indexed or
        removed. The files of a root no longer watched keep their frames as they are."""
        self.trees = trees
        self.chunk_size, self.overlap, self.debounce_ms = chunk_size, overlap, debounce_ms
        self.rescan()

    async def _scan_all(self, trees: list[Tree]) -> None:
        self.progress.phase = "scanning"
        t0 = time.monotonic()
        await trio.to_thread.run_sync(self._scan, trees)
        self.progress.scan_seconds = round(time.monotonic() - t0, 3)
        self.progress.phase = "indexing" if self.left() else "watching"
        log.info("scan done capsule=%s files=%s to_index=%s seconds=%s", self.svc.name,
                 self.progress.files_seen, self.progress.files_to_index, self.progress.scan_seconds)

    def _enqueue_from_thread(self, path: str, attempt: int = 0) -> None:
        if path not in self.pending:
            trio.from_thread.run(self._enqueue, path, attempt)

    async def _enqueue(self, path: str, attempt: int) -> None:
        if path in self.pending:  # on the event loop, so the count and the set agree
            return
        self.pending.add(path)
        self.progress.files_to_index += 1
        await self.paths_send.send((path, attempt))

    def _scan(self, trees: list[Tree]) -> None:
        """Walk ``trees``; queue what changed since the manifests, and what vanished."""
        seen: set[str] = set()
        for tree in trees:
            for path, st in tree.walk():
                uri = file_uri(path)
                seen.add(uri)
                self.progress.files_seen += 1
                m = self.docs.get(uri)
                if m is not None and m.size == st.st_size and m.mtime_ns == st.st_mtime_ns:
                    self.progress.files_unchanged += 1
                    continue
                self._enqueue_from_thread(str(path), SCAN)
        live_roots = {str(t.root) for t in trees}
        for uri, m in list(self.docs.items()):
            if uri not in seen and m.root in live_roots:
                self._enqueue_from_thread(uri_path(uri))  # vanished while we were away

    async def _prepare_worker(self, paths: trio.MemoryReceiveChannel[tuple[str, int]],
                              writes: trio.MemorySendChannel[tuple[str, WriteOp]]) -> None:
        async with paths, writes:
            async for path, attempt in paths:
                try:
                    outcome = await trio.to_thread.run_sync(self._prepare, path, attempt)
                except Exception:
                    self.progress.errors += 1
                    log.exception("cannot index path=%s", path)
                    self.pending.discard(path)
                    self._done()
                    continue
                if isinstance(outcome, Wait):  # a writer has it open: look again soon
                    self._later(path, attempt, outcome)
                    continue
                self.writing.pop(path, None)
                if isinstance(outcome, float):  # come back later (a save in progress)
                    if attempt < MAX_RETRIES:
                        self._later(path, max(attempt, 0) + 1, outcome)
                        continue
                    outcome = await trio.to_thread.run_sync(self._prepare, path, FINAL)
                self.pending.discard(path)
                if isinstance(outcome, WriteOp):  # the final attempt never asks to wait
                    await writes.send((path, outcome))  # done once committed
                else:
                    self._done()
                if path in self.again:
                    self.again.discard(path)
                    self._queue_now(path)

    def _later(self, path: str, attempt: int, delay: float) -> None:
        async def again() -> None:
            await trio.sleep(delay)
            await self.paths_send.send((path, attempt))

        self._nursery.start_soon(again)

    async def _writer(self, writes: trio.MemoryReceiveChannel[tuple[str, WriteOp]]) -> None:
        """Submit prepared writes; keep at most 64 outstanding (backpressure)."""
        limit = trio.Semaphore(64)
        async with trio.open_nursery() as nursery, writes:
            async for path, op in writes:
                await limit.acquire()
                self.svc.submit(op)

                async def settle(path: str = path, op: WriteOp = op) -> None:
                    try:
                        await op.done.wait()
                        if op.error is not None:
                            self.progress.errors += 1
                            log.error("index write failed path=%s: %s", path, op.error)
                            self._undo(file_uri(path), op)
                            self._later(path, 1, 1.0)  # still to do: not done yet
                        else:
                            self._done()
                    finally:
                        limit.release()

                nursery.start_soon(settle)

    def _undo(self, uri: str, op: WriteOp) -> None:
        """A write failed: what the indexer assumed it did is put back as the capsule has it.

        ``op.result`` is None when the op failed before it changed anything (the engine
        unstaged it); else the commit failed after ``apply`` had already recorded the file's
        new manifest (and digests) as ``(before, after, frame ids it wrote)``.
        """
        if op.result is None:
            return
        before, after, written = op.result
        with self.lock:
            if self.docs.get(uri) is after:
                self._set_doc(uri, before)
            else:  # a later write built on it meanwhile: forget the file, it is read again
                self._set_doc(uri, None)
            for d, fid in after.chunks if after is not None else []:  # never committed
                if fid in written:
                    self.by_digest.forget(d, fid)

    # -- one file -----------------------------------------------------------------------

    def _prepare(self, path: str, attempt: int) -> WriteOp | float | None:
        """What to write for ``path`` now: an op, nothing (None), or a delay to retry after
        (a ``Wait``: the same attempt again, while some process has the file open for
        writing, as an editor does between the writes of one save)."""
        uri = file_uri(path)
        tree = self.tree_of(path)
        if tree is None:  # under no watched root (any more: a reload): its frames stay as they are
            return None
        known = self.docs.get(uri)
        p = Path(path)
        try:
            st = p.stat() if tree.inside(p) else None
        except OSError:
            st = None
        if st is None or not tree.accepts(p) or not tree.check_file(p, st):
            # Decide at apply time, not now: an add of this file may be prepared and not
            # yet applied (self.docs would not show it), and ops apply in order.
            return self._delete(uri) if known is not None or tree.accepts(p, log_skip=False) else None
        if known is not None and known.size == st.st_size and known.mtime_ns == st.st_mtime_ns and attempt == SCAN:
            self.progress.files_unchanged += 1  # the scan trusts size+mtime; events check the hash
            return None
        if is_document(p.name) and (why := tree.documents.too_big(st.st_size)) is not None:  # not read
            return self._skip(uri, tree, p, st, b"", why, known)
        try:
            with tree.open(p, st) as f:  # the file vetted above, or Moved
                if attempt != FINAL and being_written(f.fileno()):
                    first = self.writing.setdefault(path, time.monotonic())
                    if time.monotonic() - first < WRITER_WAIT_S:
                        return Wait(WRITER_POLL_S)
                self.writing.pop(path, None)
                data = f.read(max(tree.max_bytes, tree.documents.max_bytes) + 1)
                after = os.fstat(f.fileno())
        except Moved:
            return 0.05 if attempt != FINAL else None  # replaced since the stat: vet it again
        except FileNotFoundError:
            return self._delete(uri)
        except OSError as e:
            self.progress.files_skipped += 1
            log.debug("skip path=%s reason=unreadable: %s", path, e.strerror)
            return None
        if (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns) or len(data) != after.st_size:
            return 0.05 if attempt != FINAL else None  # it changed while we read it: read it again
        if not data and (known is None or known.chunks) and 0 <= attempt < 2:
            return EMPTY_SETTLE_S  # just created, or truncate-then-write: give the writer a moment
        self.progress.bytes_read += len(data)
        if is_binary(data) and not is_document(p.name):
            self.progress.files_skipped += 1
            tree._skip(p, "binary")  # noqa: SLF001 - the tree owns the once-per-file log
            return self._delete(uri) if known is not None else None
        sha = hashlib.blake2b(data, digest_size=16).digest()
        if known is not None and known.sha == sha and known.size == st.st_size and known.mtime_ns == st.st_mtime_ns:
            self.progress.files_unchanged += 1
            return None
        if known is not None and known.skipped and known.sha == sha:  # touched, not changed
            return self._skip(uri, tree, p, st, sha, known.skipped, known)
        try:  # a document's text is extracted in a child process, within tree.documents' limits
            doc = read_file(path, data, size=self.chunk_size, overlap=self.overlap, budget_s=self.chunk_budget_s,
                            limits=tree.documents)
        except Unreadable as e:  # too slow to chunk; a document encrypted, damaged, scanned, too big...
            return self._skip(uri, tree, p, st, sha, str(e), known)
        except Exception as e:  # a chunker bug: skip this file (until it changes), not every start
            log.exception("cannot chunk path=%s", path)
            return self._skip(uri, tree, p, st, sha, f"cannot chunk: {type(e).__name__}: {e}"[:200], known)
        return self._update(uri, tree, st, sha, doc, known)

    def _skip(self, uri: str, tree: Tree, p: Path, st: os.stat_result, sha: bytes, why: str,
              known: Known | None) -> WriteOp:
        """A manifest without chunks that says ``why``: the file is known, not chunked again."""
        self.progress.files_skipped += 1
        tree._skip(p, why)  # noqa: SLF001 - the tree owns the once-per-file log
        return self._update(uri, tree, st, sha, Document(file_kind(p.name), p.name, []), known, skipped=why)

    def _delete(self, uri: str) -> WriteOp:
        def apply(cap: engine.Capsule) -> tuple[Known, None, set[int]] | None:
            with self.lock:
                m = self.docs.get(uri)
                if m is None:
                    return None
                for key in m.chunk_keys():
                    with contextlib.suppress(engine.NotFound):
                        cap.remove(chunk_uri(uri, key))
                with contextlib.suppress(engine.NotFound):
                    cap.remove(uri)
                self._set_doc(uri, None)  # digests stay in by_digest: a rename may reuse them
            self.progress.files_deleted += 1
            return m, None, set()

        return WriteOp(fn=apply)

    def _update(self, uri: str, tree: Tree, st: os.stat_result, sha: bytes, doc: Document,
                known: Known | None, *, skipped: str = "") -> WriteOp:
        title = clean(doc.title)
        tags = {clean(k): clean(v) for k, v in {**doc.tags, "root": tree.root.name, "type": doc.kind}.items()}
        chunks = [(digest(c.identity), c) for c in doc.chunks]

        def apply(cap: engine.Capsule) -> tuple[Known | None, Known, set[int]]:
            with self.lock:
                old = self.docs.get(uri)
                sources = [self.by_digest.get(d) for d, _ in chunks]
                reuse_ids = [fid for fid in sources if fid is not None]
            old_chunks = old.chunks if old is not None else []
            old_keys = old.chunk_keys() if old else []
            plan, gone = match_chunks(list(zip([d for d, _ in old_chunks], old_keys, strict=False)),
                                      [d for d, _ in chunks])
            vectors = cap.vectors(reuse_ids) if reuse_ids else {}
            out: list[tuple[bytes, int]] = []
            for key in gone:  # first: a fresh key never names a frame removed here
                with contextlib.suppress(engine.NotFound):
                    cap.remove(chunk_uri(uri, key))
            for i, ((d, c), (key, same)) in enumerate(zip(chunks, plan, strict=True)):
                if same is not None:
                    out.append(old_chunks[same])  # unchanged, maybe moved: no new version, no embedding
                    self.progress.chunks_kept += 1
                    continue
                source = sources[i]
                vector = vectors.get(source) if source is not None else None
                if vector is not None:
                    self.progress.vectors_reused += 1
                # ``chunk`` is the position when written; the manifest has the current order.
                fid = cap.put(c.text, uri=chunk_uri(uri, key), title=clean(c.title), kind=CHUNK_KIND,
                              tags={**tags, **c.tags},  # a document's chunk: where it is (page, sheet, rows)
                              parent=uri, chunk=i, vector=vector)
                out.append((d, fid))
                self.progress.chunks_written += 1
            manifest = Manifest(str(tree.root), st.st_size, st.st_mtime_ns, sha, out, [k for k, _ in plan],
                                skipped, [(c.start_line, c.end_line) for _, c in chunks])
            cap.put(msgspec.msgpack.encode(manifest), uri=uri, title=title, kind=FILE_KIND, tags=tags,
                    timestamp=st.st_mtime_ns / 1e9)
            known = Known(manifest)
            with self.lock:
                self._set_doc(uri, known)
                for d, fid in out:
                    self.by_digest.set(d, fid)
            written = {fid for _, fid in out} - {fid for _, fid in old_chunks}
            log.debug("indexed path=%s chunks=%s new=%s", uri_path(uri), len(out), len(written))
            return old, known, written

        return WriteOp(fn=apply)

    # -- watching -----------------------------------------------------------------------

    async def _watch(self, trees: list[Tree], *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Watch ``trees`` in a thread; report ready once the OS watches are in place."""
        roots = [str(t.root) for t in trees]
        stop = self.stop
        ready = trio.Event()
        token = trio.lowlevel.current_trio_token()

        def watch() -> None:
            restarts = 0
            while not stop.is_set():
                changes = watchfiles.watch(
                    *roots, debounce=self.debounce_ms, step=self.step_ms, rust_timeout=50,
                    yield_on_timeout=True, stop_event=stop, raise_interrupt=False,
                    ignore_permission_denied=True,
                )
                first = True
                try:
                    for batch in changes:
                        if first:  # the watches exist now: a scan cannot miss anything
                            first = False
                            trio.from_thread.run_sync(ready.set, trio_token=token)
                            if restarts:  # what happened while the watcher was down
                                trio.from_thread.run_sync(self._rescan_all, trees, trio_token=token)
                        for change, path in batch:
                            trio.from_thread.run_sync(self._on_change, change, path, trio_token=token)
                except RuntimeError as e:
                    # watchfiles gives up on a whole batch when one path in it is not
                    # UTF-8 ("Unable to decode path"): start it again and rescan, so one
                    # odd file name never ends the watching of a tree.
                    restarts += 1
                    log.warning("watcher restarted (%s) restarts=%s", e, restarts)
                    stop.wait(min(1.0, 0.05 * restarts))

        async def run_thread() -> None:
            try:
                await trio.to_thread.run_sync(watch, abandon_on_cancel=True)
            except Exception:
                log.exception("watcher stopped")

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_thread)
                await ready.wait()
                task_status.started()
                await trio.sleep_forever()
        finally:
            stop.set()  # the thread sees this within one step and ends (its inotify fd too)

    def _on_change(self, change: watchfiles.Change, path: str) -> None:
        p = Path(path)
        if any(t.root == p for t in self.trees):  # a root itself went or came: re-watch
            self._changed.set()
            return
        tree = self.tree_of(path)
        if tree is None:
            return
        if p.name == ".gitignore":
            tree.forget_gitignore(p.parent)
            self._nursery.start_soon(self._rescan, tree)  # newly ignored or un-ignored files
        if p.is_dir() and not p.is_symlink():
            self._nursery.start_soon(self._scan_dir, tree, p)  # moved or created with contents
            return
        if not p.exists():
            tree.forget(p)
            prefix = file_uri(p) + "/"  # a directory that went away takes its files with it
            for uri in [u for u in self.docs if u.startswith(prefix)]:
                self._queue_now(uri_path(uri))
        self._queue_now(path)

    def _queue_now(self, path: str) -> None:
        if path in self.pending:
            self.again.add(path)  # changed again while queued or being read: look once more
            return
        self.pending.add(path)
        self.progress.files_to_index += 1
        try:
            self.paths_send.send_nowait((path, 0))
        except trio.WouldBlock:
            self._nursery.start_soon(self.paths_send.send, (path, 0))

    def _rescan_all(self, trees: list[Tree]) -> None:
        for tree in trees:
            self._nursery.start_soon(self._rescan, tree)

    async def _rescan(self, tree: Tree) -> None:
        await trio.to_thread.run_sync(self._scan, [tree])

    async def _scan_dir(self, tree: Tree, directory: Path) -> None:
        # The sub-tree walks, ``tree`` judges: the checks by size come in ``_prepare``.
        sub = Tree(directory, include=None, exclude=None, max_bytes=tree.max_bytes, skip_generated=False)
        paths = await trio.to_thread.run_sync(lambda: [str(p) for p, _ in sub.walk() if tree.accepts(p)])
        for path in paths:
            self._queue_now(path)
