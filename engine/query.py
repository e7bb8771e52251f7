"""Query execution: ``find`` over a capsule's search indexes.

The indexes (``engine/indexes.py``: a Tantivy index and a vector graph, kept in working
copies outside the capsule) are attached on first use and fed by every commit. A query
takes, under the lock, the indexes and a pinned view of the frames; then it runs without
the lock: BM25, the vector graph, or both fused by reciprocal rank (hybrid), with
as-of, version, filter and expiry rules applied, and reads its snippets through that view
(a compaction may switch files meanwhile [F-17]). Results are cached by query and
generation (commit seq, vector count, expired count), so a repeated question after no
change is a dictionary lookup.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import msgspec
import numpy as np

from . import format as fmt
from .errors import CorruptionError, InvalidArgument
from .indexes import Indexes
from .lexical import Filters
from .log import read_record
from .metadata import opt_str, tags_of, to_epoch
from .reading import View
from .state import CapsuleState
from .table import FOREVER

RRF_K = 60
MODES = ("auto", "lex", "vec", "hybrid")
MAX_K = 1000


class Hit(msgspec.Struct, frozen=True, kw_only=True):
    frame_id: int
    uri: str | None
    title: str | None
    score: float
    snippet: str
    highlights: list[tuple[int, int]]  # character spans in ``snippet``
    tags: dict[str, str]
    kind: str | None
    timestamp: float
    commit_seq: int  # the version: the commit that created this frame
    commit_time: float  # when that commit was made: when this version became searchable
    valid_until: int | None  # the commit that superseded or removed it, if any
    sources: tuple[str, ...]  # which lists it came from: "lex", "vec"


class Hits(list[Hit]):
    """A ranked list of ``Hit`` that also says how it was made."""

    def __init__(self, hits: list[Hit], *, mode: str, seq: int, warnings: list[str], cached: bool = False) -> None:
        super().__init__(hits)
        self.mode = mode  # the mode actually used ("auto" resolves to "hybrid" or "lex")
        self.seq = seq  # the commit the results describe
        self.warnings = warnings
        self.cached = cached


class FindOptions(msgspec.Struct, kw_only=True, frozen=True):
    """How to search; the keywords of ``Capsule.find``."""

    k: int = 10  # hits wanted (at most MAX_K)
    mode: str = "auto"  # "lex", "vec", "hybrid" or "auto"
    scope: str | None = None  # URI prefix
    tags: Mapping[str, str] | None = None  # every one must match
    kind: str | None = None
    since: Any = None  # event time bounds
    until: Any = None
    as_of: Any = None  # a commit seq or a time: search that state (default: now)
    snippet_chars: int = 200
    all_versions: bool = False  # superseded versions too


class Query:
    """Runs the queries of one capsule and owns its search indexes once attached."""

    def __init__(self, state: CapsuleState) -> None:
        self._s = state

    def find(self, query: str, o: FindOptions, *, cached_only: bool = False) -> Hits | None:
        """Search the frames visible at ``o.as_of`` (see ``Capsule.find``). ``cached_only``:
        answer only from the result cache, without waiting for the lock or searching;
        ``None`` when that is not possible."""
        s = self._s
        if not isinstance(query, str):
            raise InvalidArgument("query must be a string")
        if o.mode not in MODES:
            raise InvalidArgument(f"mode must be one of {MODES}")
        k, mode, snippet_chars, all_versions, as_of = o.k, o.mode, o.snippet_chars, o.all_versions, o.as_of
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise InvalidArgument("k must be a non-negative int")
        if isinstance(snippet_chars, bool) or not isinstance(snippet_chars, int) or snippet_chars < 0:
            raise InvalidArgument("snippet_chars must be a non-negative int")
        filters = Filters(
            scope=opt_str("scope", o.scope), tags=tags_of(o.tags), kind=opt_str("kind", o.kind),
            since=None if o.since is None else to_epoch(o.since), until=None if o.until is None else to_epoch(o.until),
        )
        warnings = []
        if k > MAX_K:
            warnings.append(f"k lowered from {k} to {MAX_K}")
            k = MAX_K
        if not s.lock.acquire(blocking=not cached_only):
            return None  # a writer holds the capsule: not cached
        try:
            s.check_open()
            if not cached_only:
                s.expire_due()
            seq = s.resolve_as_of(as_of)
            if cached_only and s.indexes is None:
                return None
            ix = self.open_indexes()
            generation = (s.table.seq, len(ix.vec) if ix.vec else 0, len(s.expiry.expired))
            view = None if cached_only else s.views.pin()
        finally:
            s.lock.release()
        try:
            used = self.resolve_mode(mode, ix)
            # Live queries are keyed by "now" (None) so re-warming can find them after a commit.
            key = (query, k, used, filters.key(), None if as_of is None else seq, snippet_chars, all_versions)
            hit = ix.results.get((key, generation))
            if hit is not None:
                ix.recent[key] += 1
                return Hits(list(hit), mode=used, seq=seq, warnings=hit.warnings, cached=True)
            if view is None:
                return None
            if not query.strip() or k == 0:
                return Hits([], mode=used, seq=seq, warnings=warnings + (["empty query"] if not query.strip() else []))
            hits = self._search(ix, view, query, k, used, filters, seq, snippet_chars, all_versions, warnings)
        finally:
            if view is not None:
                s.views.unpin(view)
        ix.results.put((key, generation), hits)
        ix.recent[key] += 1
        return hits

    def resolve_mode(self, mode: str, ix: Indexes) -> str:
        """The mode that runs for ``mode`` ("auto": hybrid when vectors can be searched)."""
        s = self._s
        has_vectors = ix.vec is not None and len(ix.vec) > 0
        if mode == "auto":
            return "hybrid" if has_vectors and s.embedder is not None else "lex"
        if mode in ("vec", "hybrid"):
            if s.vec is None:
                raise InvalidArgument(f"mode={mode!r}: this capsule stores no vectors (model=None)")
            if s.embedder is None:
                raise InvalidArgument(f"mode={mode!r} needs an embedder to embed the query")
        return mode

    def _search(
        self, ix: Indexes, view: View, query: str, k: int, mode: str, filters: Filters, seq: int,
        snippet_chars: int, all_versions: bool, warnings: list[str],
    ) -> Hits:
        """Run a query on ``ix`` and read its hits through ``view``: both taken under the
        lock by ``_find`` (a compaction's switch replaces what the state names meanwhile)."""
        t = view.table
        head = seq >= t.seq
        depth = k if mode != "hybrid" else max(2 * k, 40)  # fusion needs more than k from each list
        lex_hits: list[tuple[float, int]] = []
        parsed = None
        expired = self._s.expiry.expired
        hidden: set[int] = set()
        if mode in ("lex", "hybrid"):
            want = depth
            while True:  # expired frames are dropped here: ask for more until enough remain
                found, parsed, notes = ix.lexical(query, want, seq=seq, head=head, all_versions=all_versions,
                                                  filters=filters)
                lex_hits = [(score, f) for score, f in found if f not in expired]
                hidden.update(f for _, f in found if f in expired)
                if len(lex_hits) >= depth or len(found) < want or want >= MAX_K * 8:
                    break
                want *= 4
            warnings = warnings + notes
        vec_hits: list[tuple[float, int]] = []
        if mode in ("vec", "hybrid"):
            def accept(fid: int) -> bool:
                if fid >= t.next_id:
                    return False
                ok = t.frames.seq_of(fid) <= seq if all_versions else t.visible(fid, seq)
                if ok and fid in expired:
                    hidden.add(fid)
                    return False
                return ok and (not filters or filters.match(t.frames[fid]))

            vec_hits = ix.semantic(self._query_vector(ix, query), depth, accept)
        if hidden:
            warnings = warnings + [f"{len(hidden)} matching frames are hidden: expired under the retention rules"]
        if mode == "lex":
            ranked = lex_hits
        elif mode == "vec":
            ranked = vec_hits
        else:
            ranked = rrf([[f for _, f in lex_hits], [f for _, f in vec_hits]])
        lex_ids = {f for _, f in lex_hits}
        vec_ids = {f for _, f in vec_hits}
        hits = []
        make_snippet = None
        if ix.lex is not None and parsed is not None and snippet_chars and lex_ids:
            make_snippet = ix.lex.snippets(parsed, snippet_chars)
        for score, fid in ranked[:k]:
            m = t.frames[fid]
            text = view.text(m) if snippet_chars else ""
            if make_snippet is not None and fid in lex_ids:
                snippet, spans = make_snippet(text)
            else:
                snippet, spans = text[:snippet_chars], []
            end = t.ended_at(fid)
            hits.append(Hit(
                frame_id=fid, uri=m.uri, title=m.title, score=round(float(score), 6), snippet=snippet,
                highlights=spans, tags=dict(m.tags), kind=m.kind, timestamp=m.timestamp, commit_seq=m.seq,
                commit_time=t.commit_times[m.seq - 1], valid_until=None if end == FOREVER else end,
                sources=tuple(s for s, ids in (("lex", lex_ids), ("vec", vec_ids)) if fid in ids),
            ))
        return Hits(hits, mode=mode, seq=seq, warnings=warnings)

    def _query_vector(self, ix: Indexes, query: str) -> np.ndarray:
        embedder = self._s.embedder
        assert embedder is not None
        v = ix.query_vectors.get(query)
        if v is None:
            v = embedder.embed([query[:4096]])[0]
            ix.query_vectors.put(query, v)
        return v

    def vectors(self, frame_ids: Iterable[int]) -> dict[int, np.ndarray]:
        """See ``Capsule.vectors``."""
        s = self._s
        frame_ids = list(frame_ids)
        with s.lock:
            s.check_open()
            ix = self.open_indexes()
            out = {fid: s.ready_vectors[fid] for fid in frame_ids if fid in s.ready_vectors}
            rest = [fid for fid in frame_ids if fid not in out and fid < len(s.has_vec) and s.has_vec[fid]]
            if rest and ix.vec is not None:
                for fid, v in zip(rest, ix.vec.get(rest), strict=True):
                    out[fid] = v
            return out

    # -- the indexes ------------------------------------------------------------------

    def open_indexes(self, *, fresh: bool = False) -> Indexes:
        """Attach the search indexes on first use (lock held); ``fresh``: rebuilt from
        the frames, every working copy ignored."""
        s = self._s
        if s.indexes is None:
            dim = s.vec["dim"] if s.vec else None
            ix = Indexes(
                capsule_id=s.capsule_id, path=s.path, readonly=s.readonly, dim=dim,
                cache_dir=s.opts.index_dir, result_cache_bytes=s.opts.result_cache_bytes,
                block_cache_bytes=s.opts.block_cache_bytes, ephemeral=s.encrypted,
            )
            ix.blocks = s.blocks
            if fresh:
                ix.discard_working_copies()
            lex = s.ckpt.extra.get("lex")
            try:
                ix.attach(s.table, s.text_of, lex, self._read_lexfile, self._all_vectors, self._vectors_since)
            except BaseException:
                ix.close(None)  # gives back its hold on the working copies
                raise
            for fid, v in s.ready_vectors.items():  # embedded, not yet committed
                ix.add_vectors([fid], v[None, :])
            s.indexes = ix
        return s.indexes

    def close_indexes(self, save: bool) -> None:
        """Detach the indexes, saving their working copies first when ``save`` (lock held)."""
        s = self._s
        if s.indexes is not None:
            s.indexes.close(s.table if save else None)
            s.indexes = None

    def _read_lexfile(self, offset: int, length: int) -> bytes:
        _, body = read_record(self._s.file, offset, fmt.LEXFILE)
        if len(body) != length:
            raise CorruptionError("lexical index file has the wrong length", offset=offset)
        return body

    def _all_vectors(self) -> tuple[list[int], np.ndarray]:
        return self._vectors_from(self._s.vec_refs)

    def _vectors_since(self, seq: int) -> tuple[list[int], np.ndarray]:
        """Vectors committed after commit ``seq`` (read from those commits' records)."""
        s = self._s
        refs = []
        for c in s.table.commits[seq:]:
            rh, body = read_record(s.file, c.offset, fmt.COMMIT)
            rec = fmt.meta_body(rh, body, fmt.CommitRecord, offset=c.offset)
            refs += [[v.offset, 0] for v in rec.vectors]
        return self._vectors_from(refs)

    def _vectors_from(self, refs: list[list[int]]) -> tuple[list[int], np.ndarray]:
        s = self._s
        dim = s.vec["dim"] if s.vec else 0
        ids: list[int] = []
        rows = [np.zeros((0, dim), dtype=np.float32)]
        for offset, _ in refs:
            i, v = s.read_vectors(offset)
            ids += i
            rows.append(v)
        return ids, np.concatenate(rows)


def rrf(lists: list[list[int]], k: int = RRF_K) -> list[tuple[float, int]]:
    """Reciprocal-rank fusion: sum of 1/(k + rank) over the lists an id appears in."""
    scores: dict[int, float] = {}
    for ranked in lists:
        for rank, fid in enumerate(ranked, 1):
            scores[fid] = scores.get(fid, 0.0) + 1.0 / (k + rank)
    return sorted(((s, fid) for fid, s in scores.items()), key=lambda x: (-x[0], x[1]))
