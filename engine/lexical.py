"""The lexical index: Tantivy BM25 over every version of every text frame.

Each frame is one Tantivy document carrying its validity interval (``seq`` created,
``end`` superseded or removed), so one index answers both "what is live" (``end`` is
FOREVER) and "what was visible as of S" (``seq <= S < end``) with filters evaluated
inside the index. When a frame is superseded its document is replaced by one carrying
the new ``end``; nothing else ever changes.

The index lives in a working directory (a derived cache, see ``engine/indexes.py``);
its files are copied into the capsule at checkpoints so a lost cache is restored, not
rebuilt.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tantivy
from tantivy import Document, FieldType, Occur, Query

from .format import FrameMeta
from .table import FOREVER

SCHEMA_VERSION = 3  # 2: title folded into the text field; 3: URI prefixes capped, URI blocks
MAX_QUERY_CHARS = 4096  # a longer query is cut here (and says so): BM25 gains nothing past it
# The title is indexed as the first line of the text, not as a field of its own: BM25 over
# separate title and body fields scored ~0.02 nDCG@10 worse on SciFact and Cranfield than
# one field (bench/search_bench.py), and one field matches the usual BM25 baselines.
TEXT_FIELDS = ["text"]
_BOUNDARY = re.compile(r"[/#:?]")
# URI scopes cost at most linear index space in the URI's length (one long URI once took
# a daemon to GBs: every prefix of it was a term). A scope ending at a boundary is one
# term of `uri_pfx`, which holds a URI's first PREFIXES boundary prefixes of at most
# PREFIX_CHARS characters: every scope of a normal URI, at the cost of one term lookup.
# Any other scope is matched exactly on `uri_blk`, the URI cut into BLOCK_CHARS-character
# blocks: a term per whole block of the scope, and a regex for its last, partial block
# (Tantivy refuses a regex of more than 1000 states, ~250 four-byte characters).
PREFIXES = 64
PREFIX_CHARS = 1024
BLOCK_CHARS = 128
# Characters Tantivy's query parser reads as syntax (field:, -exclusion, ranges, boosts,
# fuzziness, grouping). People and agents type questions, not queries: "what's C++?" must
# search for its words, not fail or exclude. Phrases in "double quotes" and the operators
# AND / OR / NOT keep their meaning.
_SYNTAX = re.compile(r'[+\-!(){}\[\]^~*?:\\/<>=|&`\']')


def plain_query(text: str) -> str:
    """``text`` with query syntax neutralised (see ``_SYNTAX``); unbalanced quotes dropped."""
    if text.count('"') % 2:
        text = text.replace('"', " ")
    return _SYNTAX.sub(" ", text)


def _schema() -> tantivy.Schema:
    sb = tantivy.SchemaBuilder()
    sb.add_integer_field("frame_id", stored=True, indexed=True, fast=True)
    sb.add_integer_field("seq", indexed=True, fast=True)
    sb.add_integer_field("end", indexed=True, fast=True)
    sb.add_float_field("ts", indexed=True, fast=True)
    sb.add_text_field("text", stored=False, tokenizer_name="en_stem")
    sb.add_text_field("uri_pfx", tokenizer_name="raw")  # the first prefixes ending at / # : ?
    sb.add_text_field("uri_blk", tokenizer_name="raw")  # "i:block i of the URI"
    sb.add_text_field("tags", tokenizer_name="raw")  # "key=value" terms
    sb.add_text_field("kind", tokenizer_name="raw")
    return sb.build()


def uri_prefixes(uri: str) -> list[str]:
    """The prefixes of ``uri`` that ``uri_pfx`` holds (see ``PREFIXES``)."""
    return [uri[: m.end()] for m in itertools.islice(_BOUNDARY.finditer(uri, 0, PREFIX_CHARS), PREFIXES)]


def uri_blocks(uri: str) -> list[str]:
    return [f"{i // BLOCK_CHARS}:{uri[i : i + BLOCK_CHARS]}" for i in range(0, len(uri), BLOCK_CHARS)]


def _scope_query(schema: tantivy.Schema, scope: str) -> Any:
    """The URIs starting with ``scope``, exactly (see ``PREFIXES``)."""
    if _BOUNDARY.match(scope[-1:]) and len(scope) <= PREFIX_CHARS and len(_BOUNDARY.findall(scope)) <= PREFIXES:
        return Query.term_query(schema, "uri_pfx", scope)  # one of the URI's indexed prefixes
    whole, rest = divmod(len(scope), BLOCK_CHARS)
    blocks = uri_blocks(scope)
    must = [Query.term_query(schema, "uri_blk", b) for b in blocks[:whole]]
    if rest:  # (?s): a URI may hold a newline, which a plain "." does not match
        must.append(Query.regex_query(schema, "uri_blk", re.escape(blocks[whole]) + "(?s:.*)"))
    return must[0] if len(must) == 1 else Query.boolean_query([(Occur.Must, q) for q in must])


class Filters:
    """Frame filters, expressed once for Tantivy and once for frames outside it."""

    def __init__(
        self,
        *,
        scope: str | None = None,
        tags: dict[str, str] | None = None,
        kind: str | None = None,
        since: float | None = None,
        until: float | None = None,
    ) -> None:
        self.scope, self.tags, self.kind, self.since, self.until = scope, tags or {}, kind, since, until

    def key(self) -> tuple[Any, ...]:
        return (self.scope, tuple(sorted(self.tags.items())), self.kind, self.since, self.until)

    def __bool__(self) -> bool:
        """Whether any filter is set (else every frame matches without being looked at)."""
        return self.key() != (None, (), None, None, None)

    def match(self, m: FrameMeta) -> bool:
        if self.scope is not None and not (m.uri or "").startswith(self.scope):
            return False
        if self.kind is not None and m.kind != self.kind:
            return False
        if any(m.tags.get(k) != v for k, v in self.tags.items()):
            return False
        if self.since is not None and m.timestamp < self.since:
            return False
        return self.until is None or m.timestamp <= self.until


class LexIndex:
    """One Tantivy index in ``directory`` (or in memory when ``None``)."""

    def __init__(self, directory: Path | None) -> None:
        self.schema = _schema()
        self.directory = directory
        if directory is None:
            self.index = tantivy.Index(self.schema)
        else:
            directory.mkdir(parents=True, exist_ok=True)
            self.index = tantivy.Index(self.schema, path=str(directory))
        self._writer: Any = None
        self.dirty = False

    # -- writing ----------------------------------------------------------------------

    @property
    def writer(self) -> Any:
        if self._writer is None:  # Tantivy allows one writer per directory: only when needed
            self._writer = self.index.writer(heap_size=64_000_000, num_threads=1)
        return self._writer

    def add(self, m: FrameMeta, text: str, end: int = FOREVER) -> None:
        # Text put with undecodable bytes (surrogateescape, e.g. from a non-UTF-8 file)
        # is indexed with U+FFFD in their place: Tantivy takes valid Unicode only.
        text = text.encode("utf-8", errors="surrogateescape").decode("utf-8", errors="replace")
        doc = Document(
            frame_id=m.id, seq=m.seq, end=end, ts=m.timestamp, text=f"{m.title}\n{text}" if m.title else text,
            uri_pfx=uri_prefixes(m.uri) if m.uri else [], uri_blk=uri_blocks(m.uri) if m.uri else [],
            tags=[f"{k}={v}" for k, v in m.tags.items()], kind=m.kind or "",
        )
        self.writer.add_document(doc)
        self.dirty = True

    def set_end(self, m: FrameMeta, text: str, end: int) -> None:
        """Record that frame ``m`` stopped being visible at commit ``end``."""
        self.writer.delete_documents_by_term("frame_id", m.id)
        self.add(m, text, end)

    def flush(self) -> None:
        """Make added documents searchable (a Tantivy commit: ~10 ms, so done lazily)."""
        if self.dirty:
            self.writer.commit()
            self.index.reload()
            self.dirty = False

    def files(self) -> list[Path]:
        """The files a copy of this index needs (lock files excluded)."""
        assert self.directory is not None
        return sorted(p for p in self.directory.iterdir() if p.is_file() and not p.name.endswith(".lock"))

    def close(self) -> None:
        self.flush()
        if self._writer is not None:
            # Merges still running would go on writing files after close.
            self._writer.wait_merging_threads()
        self._writer = None  # drops the writer lock

    # -- searching --------------------------------------------------------------------

    def parse(self, text: str, *, conjunction: bool) -> tuple[Any, list[str]]:
        try:
            q = self.index.parse_query(text, TEXT_FIELDS, conjunction_by_default=conjunction)
            return q, []
        except ValueError:
            q, errors = self.index.parse_query_lenient(text, TEXT_FIELDS, conjunction_by_default=conjunction)
            return q, [f"query syntax: {e}" for e in errors]

    def _filter_query(self, seq: int, head: bool, all_versions: bool, f: Filters) -> Any:
        s = self.schema
        must = [Query.range_query(s, "seq", FieldType.Integer, 0, seq)] if not head else []
        if not all_versions:
            if head:
                must.append(Query.term_query(s, "end", FOREVER))
            else:
                must.append(Query.range_query(s, "end", FieldType.Integer, seq + 1, FOREVER))
        if f.scope:  # "" is a prefix of everything, as in ``Filters.match``
            must.append(_scope_query(s, f.scope))
        for k, v in f.tags.items():
            must.append(Query.term_query(s, "tags", f"{k}={v}"))
        if f.kind is not None:
            must.append(Query.term_query(s, "kind", f.kind))
        if f.since is not None or f.until is not None:
            lo = f.since if f.since is not None else -1e300
            hi = f.until if f.until is not None else 1e300
            must.append(Query.range_query(s, "ts", FieldType.Float, lo, hi))
        if not must:
            return None
        # Filters must not change BM25 scores: wrap them with a constant score of 0.
        return Query.const_score_query(Query.boolean_query([(Occur.Must, q) for q in must]), 0.0)

    def search(
        self, text: str, k: int, *, seq: int, head: bool, all_versions: bool, filters: Filters
    ) -> tuple[list[tuple[float, int]], Any, list[str]]:
        """Top ``k`` (score, frame id): AND of the terms, OR when AND finds fewer than k."""
        warnings: list[str] = []
        if len(text) > MAX_QUERY_CHARS:
            text = text[:MAX_QUERY_CHARS]
            warnings.append(f"query cut to its first {MAX_QUERY_CHARS} characters")
        text = plain_query(text)
        fq = self._filter_query(seq, head, all_versions, filters)
        searcher = self.index.searcher()
        hits: list[tuple[float, int]] = []
        query = None
        for conjunction in (True, False):
            q, errors = self.parse(text, conjunction=conjunction)
            if conjunction:
                warnings += errors
            full = q if fq is None else Query.boolean_query([(Occur.Must, q), (Occur.Must, fq)])
            found = searcher.search(full, k, count=False).hits
            if found:
                ids = searcher.fast_field_values("frame_id", [a for _, a in found])
                hits = [(score, int(fid)) for (score, _), fid in zip(found, ids, strict=True)]  # type: ignore[arg-type]
            query = q
            if len(hits) >= k:
                break
        return hits, query, warnings

    def snippets(self, query: Any, max_chars: int) -> Callable[[str], tuple[str, list[tuple[int, int]]]]:
        """A function giving the best fragment of a text for ``query``, with highlight
        spans in characters (one generator per query: building it costs more than using it)."""
        gen = tantivy.SnippetGenerator.create(self.index.searcher(), query, self.schema, "text")
        gen.set_max_num_chars(max_chars)

        def snippet(text: str) -> tuple[str, list[tuple[int, int]]]:
            snip = gen.snippet_from_doc(Document(text=text))
            fragment = snip.fragment()
            if not fragment:
                return text[:max_chars], []
            raw = fragment.encode()
            # Tantivy reports byte offsets; Python callers index strings by character.
            spans = [(len(raw[: r.start].decode(errors="ignore")), len(raw[: r.end].decode(errors="ignore")))
                     for r in snip.highlighted()]
            return fragment, spans

        return snippet
