"""A memvid-shaped Python API: a script written for upstream memvid's Python SDK (the
``memvid-sdk`` package, module ``memvid_sdk``) runs on memvidd after changing only its
import line::

    import memvidd.sdk as memvid_sdk          # was: import memvid_sdk
    from memvidd.sdk import create, use       # was: from memvid_sdk import create, use

    mv = create("notes.mv2")
    mv.put(title="Project Update", label="meeting", text="Discussed the Q4 roadmap.",
           tags=["q4"], metadata={"date": "2024-01-15"})
    for hit in mv.find("roadmap")["hits"]:
        print(hit["title"], hit["snippet"])
    mv.seal()

The names, argument names, defaults and return shapes are upstream's (memvid-sdk 2.0.160,
read from its code where its README differs: ``find`` defaults to ``k=10`` and
``snippet_chars=480``, ``use`` to ``mode="open"``; ``put`` returns the frame id as a
string). A handle works on a capsule file directly (the engine) or, when the configured
daemon serves that file, through the daemon (see ``sdk_backends``). Every write is
durable when it returns.

How upstream's fields live in a memvidd frame (whose tags are one str -> str map):
``title``, ``uri``, ``kind`` and ``timestamp`` are the frame's own; each of ``tags`` is a
key with the value ""; ``label`` is the key ``label``, further ``labels`` the keys
``label:NAME``; ``track`` the key ``track``; each ``metadata`` item a key with its value
(JSON for what is not a string). Hits, ``frame`` and ``timeline`` give them back as
upstream shapes them (``tags`` and ``labels`` lists, ``metadata`` a dict). A frame put
without a ``uri`` reads as ``mv2://frames/ID``, as upstream names it.

Differences a script may notice:

- ``create`` (and ``mode="create"``) refuses an existing file instead of overwriting it.
- A ``uri`` already live is superseded by the new put (memvidd keeps one live version per
  URI, history keeps the rest); upstream keeps both live.
- ``mode="sem"`` is memvidd's ``"vec"`` (its local model; ``"hybrid"`` fuses both), and
  ``"auto"`` is hybrid when the capsule has vectors and a model loaded, else lexical.
- No automatic tags, labels or dates are extracted from the text (``auto_tag``,
  ``extract_dates`` are accepted and ignored), nor are the text's chunks frames of their own.
- ``enable_embedding``, ``embedding_model``, ``vector_compression``, ``enable_vec``,
  ``enable_lex``, API keys, ``lock_timeout_ms`` are accepted and ignored: a capsule is
  bound to one local model at creation and a daemon embeds its text in the background.

Not honoured, each raising ``NotImplementedError`` that names the alternative:
``ask`` (an LLM answer; ``ask(..., context_only=True)`` works: the retrieved context),
``find`` with ``query_embedding``/``embedder``/``cursor``/``adaptive``/``min_relevancy``/
``max_k``/``as_of_frame``/``acl_context`` (use ``mode``, ``k``, ``as_of_ts``), ``put`` with
``search_text``, ``timeline`` with ``as_of_frame``, ``use`` with a ``kind`` other than
``"basic"`` (framework adapters), and the methods listed in ``NOT_HONOURED`` (tables,
memory cards, sessions, tickets, cloud binding, encryption by this API).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import time
import weakref
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from . import timewords
from .sdk_backends import (
    Backend,
    CapsuleExistsError,
    CorruptFileError,
    FileNotFoundError,
    FrameNotFoundError,
    LockedError,
    MemvidError,
    VecIndexDisabledError,
    open_backend,
    translated,
)

__all__ = ["CapsuleExistsError", "CorruptFileError", "FileNotFoundError", "FrameNotFoundError", "LockedError",
           "Memvid", "MemvidError", "NOT_HONOURED", "VecIndexDisabledError", "create", "from_tags", "to_tags",
           "use"]

MODES = {"lex": "lex", "sem": "vec", "auto": "auto", "vec": "vec", "hybrid": "hybrid"}
ENGINES = {"lex": "tantivy", "vec": "vec", "hybrid": "hybrid"}  # upstream names its lexical engine so
RESERVED = ("label", "track")  # tag keys that hold upstream fields, and "label:NAME"
LABEL_PREFIX = "label:"

# Upstream methods this API does not provide, and what to use instead.
NOT_HONOURED = {
    "put_file": "put(file=PATH, label=..., metadata=...)",
    "put_files": "put(file=PATH) for each file, or memvidd's watcher (watch = [...] in the config)",
    "correct": "put() the corrected statement under the same uri: it supersedes the old version",
    "correct_many": "put_many() the corrections, each under the uri it corrects",
    "commit_parallel": "nothing: every write is committed when it returns",
    "vec_search": "find(query, mode='sem')",
    "put_pdf_tables": "put(text=...) of the extracted tables",
    "list_tables": "find(..., scope=...) over frames you stored",
    "get_table": "frame(uri)",
    "memories": "find() and timeline(): memvidd extracts no memory cards",
    "memories_stats": "stats()",
    "memory_entities": "find()",
    "state": "frame(uri) for the current version of a memory",
    "enrich": "nothing: memvidd embeds text in the background and extracts no cards",
    "export_facts": "timeline() and frame(uri)",
    "add_memory_cards": "put() each card as a frame",
    "session_start": "find(..., as_of_ts=T) and timeline(as_of_ts=T): every commit is a state to return to",
    "session_end": "find(..., as_of_ts=T): every commit is a state to return to",
    "session_list": "timeline()",
    "session_replay": "find(..., as_of_ts=T) of each query again",
    "session_delete": "nothing: there is no session to delete",
    "session_checkpoint": "stats()['seq_no'] or the time: every commit is a state to return to",
    "apply_ticket": "nothing: memvidd has no capacity tiers",
    "sync_tickets": "nothing: memvidd has no capacity tiers",
    "current_ticket": "stats()",
    "get_capacity": "stats()['file_bytes'] (no capacity limit)",
    "get_memory_binding": "nothing: memvidd binds to no cloud memory",
    "unbind_memory": "nothing: memvidd binds to no cloud memory",
    "enable_lex": "nothing: the lexical index is always on",
    "enable_vec": "a capsule made with an embedding model (the default of create)",
    "rebuild_time_index": "`memvidd doctor --reindex FILE` (the time index is always current)",
    "verify": "`memvidd verify FILE`",
    "doctor": "`memvidd doctor FILE`",
}


def to_tags(tags: Iterable[str] | None = None, labels: Sequence[str] = (), metadata: Mapping[str, Any] | None = None,
            track: str | None = None) -> dict[str, str]:
    """Upstream's tags, labels, metadata and track as one memvidd tag map (see the module
    docstring); ``ValueError`` for a metadata key that would hide one of them."""
    out = {str(t): "" for t in tags or ()}
    if labels:
        out["label"] = labels[0]
        out.update((LABEL_PREFIX + x, "") for x in labels[1:])
    if track is not None:
        out["track"] = track
    for key, value in (metadata or {}).items():
        if key in RESERVED or key.startswith(LABEL_PREFIX):
            raise ValueError(f"metadata key {key!r} is reserved (it holds a label or the track)")
        out[key] = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return out


def from_tags(tags: Mapping[str, str]) -> dict[str, Any]:
    """A memvidd tag map as upstream's fields: ``tags``, ``labels``, ``track``, ``metadata``."""
    labels = [tags["label"]] if "label" in tags else []
    labels += [k[len(LABEL_PREFIX):] for k in tags if k.startswith(LABEL_PREFIX)]
    plain = {k: v for k, v in tags.items() if k not in RESERVED and not k.startswith(LABEL_PREFIX)}
    return {"tags": [k for k, v in plain.items() if v == ""], "labels": labels, "track": tags.get("track"),
            "metadata": {k: v for k, v in plain.items() if v != ""}}


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _uri(frame_id: int, uri: str | None) -> str:
    return uri if uri is not None else f"mv2://frames/{frame_id}"


def _timestamp(value: int | float | str | None) -> float | None:
    """Upstream's ``timestamp``: seconds, or a date/time string (ISO 8601)."""
    if value is None or isinstance(value, int | float):
        return value
    t = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    return (t if t.tzinfo else t.astimezone()).timestamp()


def _when(value: int | float | str | None, what: str | None = None) -> int | float | None:
    """A time argument: a number is a Unix time (as upstream's); text is read by
    ``timewords`` ("yesterday", "2 hours ago", an ISO time; for ``as_of_ts`` a string of
    digits is a commit). ``ValueError`` names text that is no time."""
    if value is None or not isinstance(value, str):
        return None if value is None else float(value)
    return timewords.parse_when(value) if what is None else timewords.since(value, what)


def _refuse(what: str, alternative: str) -> NotImplementedError:
    return NotImplementedError(f"memvidd.sdk does not provide {what}; use {alternative}")


def _item(title: str | None, label: str | None, metadata: Mapping[str, Any] | None, *, text: str | None = None,
          file: str | None = None, uri: str | None = None, tags: Iterable[str] | None = None,
          labels: Iterable[str] | None = None, kind: str | None = None, track: str | None = None,
          search_text: str | None = None, timestamp: int | float | str | None = None,
          **_ignored: Any) -> dict[str, Any]:
    """One put, as upstream's ``put`` takes it, as a memvidd put item. ``_ignored``: the
    embedding and extraction switches (see the module docstring)."""
    if search_text is not None:
        raise _refuse("search_text (a separate indexed text)", "text= (memvidd indexes the text itself)")
    if (text is None) == (file is None):
        raise ValueError("put requires exactly one of text= or file=")
    data: str | bytes
    if file is not None:
        raw = Path(file).read_bytes()
        try:
            data = raw.decode("utf-8")
        except UnicodeDecodeError:
            data = raw  # stored as bytes: searchable by its metadata only
        title = title if title is not None else Path(file).stem
        label = label if label is not None else (Path(file).suffix.lstrip(".") or "file")
    else:
        data = text  # type: ignore[assignment]
    title = "Untitled" if title is None else title
    label = "text" if label is None else label
    all_labels = [label, *(x for x in labels or () if x != label)]
    item: dict[str, Any] = {"text" if isinstance(data, str) else "data": data, "title": title,
                            "tags": to_tags(tags, all_labels, metadata, track)}
    for key, value in (("uri", uri), ("kind", kind), ("timestamp", _timestamp(timestamp))):
        if value is not None:
            item[key] = value
    return item


class Memvid:
    """An open capsule, shaped like upstream's ``memvid_sdk.Memvid``; a context manager."""

    def __init__(self, backend: Backend, kind: str = "basic", *, socket: str | None = None) -> None:
        self._kind = kind
        self._path, self._readonly, self._socket = backend.path, backend.readonly, socket
        self._cell: list[Backend | None] = [backend]  # None: sealed, reopened by the next call
        # A handle a script never closes is closed when collected or at exit: its writes
        # are durable already, but the file's lock and index copies are released cleanly.
        self._close = weakref.finalize(self, _close_cell, self._cell)

    @property
    def _b(self) -> Backend:
        if self.closed:
            raise MemvidError(f"{self._path}: the handle is closed")
        b = self._cell[0]
        if b is None:  # sealed: upstream's handle stays usable after seal(), so this one does
            b = self._cell[0] = open_backend(self._path, mode="open", read_only=self._readonly, socket=self._socket)
        return b

    # -- upstream's surface ---------------------------------------------------------------

    @property
    def path(self) -> str:
        return self._path

    @property
    def closed(self) -> bool:
        return not self._close.alive

    @property
    def served_by(self) -> str | None:
        """memvidd's addition: the daemon socket this handle goes through (None: the file)."""
        return self._b.served_by

    def put(self, title: str | Mapping[str, Any] | None = None, label: str | None = None,
            metadata: Mapping[str, Any] | None = None, **kw: Any) -> str:
        """Store one document; returns its frame id (a string, as upstream's). Also takes
        upstream's older form, one dict of these fields."""
        if isinstance(title, Mapping):
            spec = dict(title)
            title, label, metadata = spec.pop("title", None), spec.pop("label", label), spec.pop("metadata", metadata)
            kw = {**spec, **kw}
        return self._write([_item(title, label, metadata, **kw)])[0]  # type: ignore[arg-type]

    def put_many(self, requests: Sequence[Mapping[str, Any]], *, embeddings: Any = None, embedder: Any = None,
                 embedding_identity: Any = None, opts: Mapping[str, Any] | None = None) -> list[str]:
        """Store several documents in one commit (all or none); returns their frame ids.
        Each request is a dict with ``title``, ``label`` and ``text`` (required, as
        upstream) and optionally ``uri``, ``metadata``, ``tags``, ``labels``, ``kind``,
        ``track``, ``timestamp``."""
        if embeddings is not None or embedder is not None:
            raise _refuse("put_many with caller's embeddings", "put_many(docs): the capsule's model embeds them")
        items = []
        for i, req in enumerate(requests):
            if not isinstance(req, Mapping):
                raise ValueError(f"Request {i} must be a dict, got {type(req)}")
            for field in ("title", "label", "text"):
                if field not in req:
                    raise ValueError(f"Request {i} missing required field '{field}'")
            spec = dict(req)
            items.append(_item(spec.pop("title"), spec.pop("label"), spec.pop("metadata", None), **spec))
        return self._write(items) if items else []

    def _write(self, items: list[dict[str, Any]]) -> list[str]:
        with translated():
            return [str(i) for i in self._b.put_many(items)]

    def remove(self, frame_id: int | str) -> int:
        """Remove a frame (history keeps it); returns the commit that recorded it."""
        with translated():
            return self._b.remove(int(frame_id))

    def find(self, query: str, *, k: int = 10, snippet_chars: int = 480, scope: str | None = None,
             cursor: str | None = None, mode: str | None = None, as_of_ts: int | float | str | None = None,
             **unsupported: Any) -> dict[str, Any]:
        """Search; returns upstream's result shape: ``{"query", "hits": [{"rank",
        "frame_id", "uri", "title", "text", "snippet", "score", "tags", "labels", ...}],
        "total_hits", "took_ms", "engine", "context"}``. ``as_of_ts``: search the capsule
        as it was then (a real snapshot: versions and removals since are undone): a Unix
        time, or a time in words or ISO ("yesterday 17:00": ``timewords``)."""
        if cursor is not None:
            raise _refuse("find with a cursor (pagination)", "a larger k")
        _no_extras("find", unsupported, {"query_embedding": "mode='sem' (the capsule's model embeds the query)",
                                         "query_embedding_model": "mode='sem'", "embedder": "mode='sem'",
                                         "adaptive": "k", "min_relevancy": "k", "max_k": "k",
                                         "adaptive_strategy": "k", "as_of_frame": "as_of_ts",
                                         "acl_context": "scope= (a URI prefix)", "acl_enforcement_mode": "scope="})
        our_mode = MODES.get(mode or "auto")
        if our_mode is None:
            raise ValueError(f"mode must be one of 'lex', 'sem' or 'auto', not {mode!r}")
        kw: dict[str, Any] = {"k": k, "mode": our_mode, "snippet_chars": snippet_chars, "scope": scope}
        if as_of_ts is not None:
            kw["as_of"] = _when(as_of_ts)
        t0 = time.perf_counter()
        with translated():
            found, used = self._b.find(query, **kw)
        hits = [self._hit(rank, h) for rank, h in enumerate(found, 1)]
        context = "\n\n".join(f"### [{h['rank']}] {h['uri']} — {h['title']}\n{h['snippet']}" for h in hits)
        return {"query": query, "hits": hits, "total_hits": len(hits), "context": context, "next_cursor": None,
                "engine": ENGINES.get(used, used), "took_ms": int((time.perf_counter() - t0) * 1000)}

    @staticmethod
    def _hit(rank: int, h: Any) -> dict[str, Any]:
        fields = from_tags(h.tags)
        return {"rank": rank, "frame_id": h.frame_id, "uri": _uri(h.frame_id, h.uri), "title": h.title,
                "text": h.snippet, "snippet": h.snippet, "score": h.score, "matches": len(h.highlights),
                "tags": fields["tags"], "labels": fields["labels"], "track": fields["track"],
                "metadata": fields["metadata"], "kind": h.kind, "created_at": _iso(h.timestamp),
                "content_dates": []}

    def ask(self, question: str, *, k: int = 6, mode: str = "auto", context_only: bool = False,
            **_: Any) -> dict[str, Any]:
        """Only ``context_only=True``: the retrieved context, no answer (memvidd calls no LLM)."""
        if not context_only:
            raise _refuse("ask (an LLM-written answer)",
                          "find(question) and your own model, or ask(question, context_only=True) for the context")
        found = self.find(question, k=k, mode=mode)
        return {"question": question, "answer": None, "context_only": True, "mode": mode,
                "context": found["context"], "context_fragments": [h["snippet"] for h in found["hits"]],
                "hits": found["hits"], "retriever": found["engine"],
                "sources": [{x: h[x] for x in ("frame_id", "uri", "title", "snippet", "score")} for h in found["hits"]],
                "stats": {"latency_ms": found["took_ms"], "retrieval_ms": found["took_ms"], "synthesis_ms": 0}}

    def timeline(self, *, limit: int = 100, since: int | float | str | None = None,
                 until: int | float | str | None = None,
                 reverse: bool = False, as_of_frame: int | None = None,
                 as_of_ts: int | float | str | None = None) -> list[dict[str, Any]]:
        """Live frames in time order: ``[{"frame_id", "timestamp", "preview", "uri",
        "child_frames"}]`` (``preview``: the first 120 characters, as upstream)."""
        if as_of_frame is not None:
            raise _refuse("timeline(as_of_frame=...)", "timeline(as_of_ts=...)")
        kw: dict[str, Any] = {"limit": limit, "reverse": reverse, "since": _when(since, "since"),
                              "until": _when(until, "until")}
        if as_of_ts is not None:
            kw["as_of"] = _when(as_of_ts)
        with translated():
            entries = self._b.timeline(**kw)
            out = []
            for f in entries:
                text = self._b.text(f.id)
                preview = text[:120] if isinstance(text, str) else ""
                out.append({"frame_id": f.id, "timestamp": int(f.timestamp), "preview": preview,
                            "uri": _uri(f.id, f.uri), "child_frames": []})
        return out

    def frame(self, uri: str) -> dict[str, Any]:
        """The live frame at ``uri``: upstream's fields (``payload_length`` is the text's
        length in bytes here; memvidd stores the text as the payload)."""
        with translated():
            f = self._latest(uri)
        fields = from_tags(f.tags)
        return {"id": f.id, "uri": _uri(f.id, f.uri), "title": f.title, "timestamp": int(f.timestamp),
                "kind": f.kind, "track": fields["track"], "tags": fields["tags"], "labels": fields["labels"],
                "payload_length": f.length,
                "extra_metadata": {k: _as_json(v) for k, v in fields["metadata"].items()}}

    def _latest(self, uri: str) -> Any:
        """The live frame at ``uri``; ``mv2://frames/ID`` also names a frame put without a uri."""
        try:
            return self._b.latest(uri)
        except Exception as e:
            m = re.fullmatch(r"mv2://frames/(\d+)", uri)
            if m is None:
                raise
            f = self._b.get(int(m[1]))
            if f.uri is not None or f.valid_until is not None:
                raise e from None
            return f

    def blob(self, uri: str) -> bytes:
        """The payload stored at ``uri`` (text as UTF-8)."""
        with translated():
            f = self._latest(uri)
            data = self._b.text(f.id)
        return data.encode("utf-8") if isinstance(data, str) else data

    def stats(self) -> dict[str, Any]:
        """Upstream's main counters (``frame_count``, ``active_frame_count``,
        ``size_bytes``, ...), plus memvidd's own stats under ``memvidd``."""
        with translated():
            s = self._b.stats()
        vectors = s.get("vectors") or {}
        return {"frame_count": s["frames"], "active_frame_count": s["live_frames"], "size_bytes": s["file_bytes"],
                "payload_bytes": s["payload_raw_bytes"], "seq_no": s["commit_seq"], "has_lex_index": True,
                "has_vec_index": bool(vectors), "has_time_index": True, "lex_enabled": True,
                "vec_enabled": bool(vectors), "vector_count": vectors.get("frames_with_vectors", 0),
                "tier": "local", "memvidd": dict(s)}

    def commit(self) -> None:
        """Nothing is left to commit: every write is durable when it returns."""
        with translated():
            self._b.flush()

    def seal(self) -> None:
        """Commit and release the file (another handle, or process, may open it now), as
        upstream's ``seal`` does; a later call on this handle opens the file again."""
        with translated():
            _close_cell(self._cell)

    def close(self) -> None:
        with translated():
            self._close()

    def __enter__(self) -> Memvid:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:
        if name in NOT_HONOURED:
            raise _refuse(f"{name}()", NOT_HONOURED[name])
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __repr__(self) -> str:
        via = f" via {self.served_by}" if self.served_by else ""
        return f"<memvidd.sdk.Memvid {self.path!r}{via}{' closed' if self.closed else ''}>"


def _as_json(value: str) -> str:
    """A metadata value as upstream's ``extra_metadata`` holds it: JSON text (a string
    stored as such is quoted; what was stored as JSON already stays)."""
    try:
        if not isinstance(json.loads(value), str):
            return value
    except ValueError:
        pass
    return json.dumps(value, ensure_ascii=False)


def _close_cell(cell: list[Backend | None]) -> None:
    b, cell[0] = cell[0], None
    if b is not None:
        b.close()


def _no_extras(what: str, given: Mapping[str, Any], alternatives: Mapping[str, str]) -> None:
    for name, value in given.items():
        if name not in alternatives:
            raise TypeError(f"{what}() got an unexpected keyword argument {name!r}")
        if value is not None and not (name == "acl_enforcement_mode" and value == "audit"):
            raise _refuse(f"{what}({name}=...)", alternatives[name])


def use(kind: str, filename: str | os.PathLike[str], apikey: Any = None, *, mode: str = "open",
        read_only: bool = False, socket: str | None = None, **_ignored: Any) -> Memvid:
    """Open (``mode="open"``), create (``"create"``) or either (``"auto"``) a capsule.
    ``kind``: only ``"basic"`` (upstream's framework adapters are not provided).
    ``socket``: memvidd's addition, the daemon to ask first (default: the configured one).
    Upstream's other keywords (``enable_vec``, ``lock_timeout_ms``, API keys, ...) are
    accepted and ignored."""
    if kind != "basic":
        raise _refuse(f"the {kind!r} adapter", "use('basic', ...) and wrap find()/put() in your framework's tool")
    with translated():
        backend = open_backend(os.fspath(filename), mode=mode, read_only=read_only, socket=socket)
    return Memvid(backend, kind, socket=socket)


def create(filename: str | os.PathLike[str], *, kind: str = "basic", socket: str | None = None,
           **_ignored: Any) -> Memvid:
    """A new capsule at ``filename`` (an error if anything is there: memvidd never
    overwrites a capsule, where upstream would)."""
    return use(kind, filename, mode="create", socket=socket)
