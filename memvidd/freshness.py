"""How fresh a hit is: for a chunk of a watched file, the file's mtime as indexed and
whether the file on disk still matches it (``stale`` when not: the watcher has not caught
up with a change, or the file is gone).

Every hit says when it was indexed (``commit_time``, from the engine). A chunk of a file
(``file://<path>#<key>``, written by ``ingest.py``) does not carry its file's mtime: a
chunk whose text did not change keeps its frame across edits, so a copy in its tags would
go stale with it. The file's ``file`` frame does: its manifest holds the size and mtime it
was indexed at. A find reads the manifests of the files among its hits (as of the commit
it searched) and stats those files: a few small reads and stats per find.
"""

from __future__ import annotations

import os

import msgspec

import engine

from . import protocol as p
from .ingest import CHUNK_KIND, Manifest, uri_path

_manifest = msgspec.msgpack.Decoder(Manifest)


def indexed(cap: engine.Capsule, doc: str, seq: int) -> Manifest | None:
    """The manifest of file URI ``doc`` as of commit ``seq`` (None: not a file the
    watcher indexed then, or a manifest that cannot be read)."""
    try:
        frame = cap.get(uri=doc, as_of=seq)
        return _manifest.decode(frame.payload)
    except (engine.EngineError, msgspec.DecodeError, msgspec.ValidationError):
        return None  # freshness is told when known: a find never fails for want of it


def on_disk(path: str, m: Manifest) -> bool:
    """Whether the file at ``path`` is still as it was indexed (by size and mtime, as the
    watcher's own scan compares them). A file gone, or unreadable, is not."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    return (st.st_size, st.st_mtime_ns) == (m.size, m.mtime_ns)


def stamp(cap: engine.Capsule, hits: list[p.HitOut], seq: int) -> list[p.HitOut]:
    """``hits`` (of a find at commit ``seq``) with ``mtime`` and ``stale`` on the chunks of
    watched files (a sync read: call it in a thread)."""
    manifests: dict[str, Manifest | None] = {}
    fresh: dict[str, bool] = {}
    out = []
    for h in hits:
        if h.kind != CHUNK_KIND or not h.uri or not h.uri.startswith("file://"):
            out.append(h)
            continue
        doc = h.uri.partition("#")[0]  # a '#' in a path is percent-encoded (ingest.file_uri)
        if doc not in manifests:
            manifests[doc] = m = indexed(cap, doc, seq)
            if m is not None:
                fresh[doc] = on_disk(uri_path(doc), m)
        m = manifests[doc]
        out.append(h if m is None else msgspec.structs.replace(h, mtime=m.mtime_ns / 1e9, stale=not fresh[doc]))
    return out


def any_files(hits: list[p.HitOut]) -> bool:
    """Whether any hit is a chunk of a watched file (else ``stamp`` has nothing to do)."""
    return any(h.kind == CHUNK_KIND and h.uri and h.uri.startswith("file://") for h in hits)
