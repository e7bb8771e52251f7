"""Keeping caches warm in the background: the predictive half of cached recall.

Two guesses, both run on one background thread so they never delay the caller: after a
``get`` of a document's chunk, its next two chunks are read into the block cache (a reader
usually goes on); after commits, once writes pause, the most frequent recent queries are
run again so the next identical question is a result-cache hit.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from . import format as fmt
from .errors import EngineError
from .query import FindOptions, Query
from .state import CapsuleState
from .table import FrameTable

REWARM_QUERIES = 8
REWARM_QUIET_S = 0.05  # re-warm caches once no commit came for this long


class Warmer:
    """Prefetch and re-warming for one capsule."""

    def __init__(self, state: CapsuleState, query: Query) -> None:
        self._s = state
        self._query = query
        self._bg: ThreadPoolExecutor | None = None
        self._rewarm_pending = False

    def _background(self) -> ThreadPoolExecutor:
        if self._bg is None:
            self._bg = ThreadPoolExecutor(max_workers=1, thread_name_prefix="memvidd-bg")
        return self._bg

    def prefetch_next(self, m: fmt.FrameMeta, t: FrameTable) -> None:
        """Warm the block cache with the next chunks of the document just read (``t``:
        the pinned table ``m`` came from)."""
        s = self._s
        if m.parent is None or m.chunk is None or s.closed:
            return
        # Columns only, no frame read: this runs on every get.
        todo = []
        for c in (m.chunk + 1, m.chunk + 2):
            fid = t.child(m.parent, c)
            if fid is not None and (block := t.frames.block_of(fid)) >= 0 and not s.blocks.peek(block):
                todo.append(fid)
        if todo:
            self._background().submit(self._warm_blocks, todo)

    def _warm_blocks(self, ids: list[int]) -> None:
        try:
            with self._s.reading() as view:
                for fid in ids:
                    view.payload(view.table.frames[fid])
        except (EngineError, OSError, ValueError, IndexError):
            return  # a closed capsule or damage: the real read will report it

    def rewarm(self) -> None:
        """After commits, once writes pause, re-run the most frequent recent queries.
        Waiting for the pause matters: a re-run makes the lexical index searchable (a
        Tantivy commit, ~10 ms and more under load) and doing that after every write would
        tax a stream of puts."""
        ix = self._s.indexes
        if ix is None or not ix.recent or self._rewarm_pending or self._s.closed:
            return
        self._rewarm_pending = True
        self._background().submit(self._rewarm_run)

    def _rewarm_run(self) -> None:
        s = self._s
        while True:  # wait for a quiet moment: no commit for REWARM_QUIET_S
            seq = s.table.seq
            time.sleep(REWARM_QUIET_S)
            if s.closed:
                return
            if s.table.seq == seq:
                break
        ix = s.indexes
        self._rewarm_pending = False
        if ix is None:
            return
        keys = [key for key, _ in ix.recent.most_common(REWARM_QUERIES)]
        if len(ix.recent) > 4 * REWARM_QUERIES:  # forget the long tail
            ix.recent = type(ix.recent)(dict(ix.recent.most_common(REWARM_QUERIES)))
        for query, k, mode, fkey, as_of, snippet_chars, all_versions in keys:
            if s.closed or as_of is not None:
                continue  # as-of queries do not change with new commits
            scope, tags, kind, since, until = fkey
            try:
                self._query.find(query, FindOptions(k=k, mode=mode, scope=scope, tags=dict(tags), kind=kind,
                                                    since=since, until=until, snippet_chars=snippet_chars,
                                                    all_versions=all_versions))
            except EngineError:
                return

    def stop(self) -> None:
        """Wait for the background work to end (the capsule is closing)."""
        if self._bg is not None:
            self._bg.shutdown(wait=True)
            self._bg = None
