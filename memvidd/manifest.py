"""How a watched file is stored in a capsule, and where a search hit sits in its file.

A file is a ``file`` frame at ``file://<path>`` whose payload is its ``Manifest`` (binary
msgpack: size, mtime, content hash, and the digest, frame id, key and line range of each
chunk, in file order), and one ``chunk`` frame per chunk at ``file://<path>#<key>``
(``ingest.py`` writes them). A chunk whose text did not change keeps its frame when lines
are inserted above it, so its line numbers live in the manifest, which every change of
the file rewrites, not in the chunk frame: ``places`` reads them from the manifest of the
commit a search ran on, with the file's freshness (the manifest holds the size and mtime
it was indexed at: compared with the file on disk now). ``Known`` is a manifest as the
indexer keeps it in memory.
"""

from __future__ import annotations

import os
import sys
import urllib.parse
from array import array
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import msgspec

import engine

FILE_KIND = "file"
CHUNK_KIND = "chunk"


class Manifest(msgspec.Struct, array_like=True):
    """What the capsule knows of one file (the payload of its ``file`` frame)."""

    root: str
    size: int
    mtime_ns: int
    sha: bytes
    chunks: list[tuple[bytes, int]]  # in file order: (blake2b-128 of the chunk text, its frame id)
    # The fragment of each chunk's URI (``file://<path>#<key>``). Empty in manifests
    # written before chunks had keys: their URIs are ``#<position>``, and they stay valid.
    keys: list[str] = msgspec.field(default_factory=list)
    # Why the file has no chunks although it has text (too slow or failing to chunk), or
    # "". Older manifests lack it; older daemons ignore it (an extra array element).
    skipped: str = ""
    # Each chunk's lines in the file now, (first, last), 1-based: empty in manifests
    # written before lines were kept (their hits have no ``lines``). Older daemons ignore it.
    lines: list[tuple[int, int]] = msgspec.field(default_factory=list)

    def chunk_keys(self) -> list[str]:
        return self.keys if self.keys else [str(i) for i in range(len(self.chunks))]


manifest_decoder = msgspec.msgpack.Decoder(Manifest)


class Known:
    """A manifest as the indexer keeps it in memory: ~40 B a chunk (its digests as one
    bytes object, its frame ids as an array, its keys as one string) instead of ~250 B
    of tuples, so that memory does not grow with the tree by much more than a file's
    path. ``chunks`` and ``chunk_keys()`` unfold it for the one file being changed."""

    __slots__ = ("root", "size", "mtime_ns", "sha", "skipped", "_digests", "_fids", "_keys")

    def __init__(self, m: Manifest) -> None:
        self.root = sys.intern(m.root)  # one copy per tree, not per file
        self.size, self.mtime_ns, self.sha, self.skipped = m.size, m.mtime_ns, m.sha, m.skipped
        self._digests = b"".join(d for d, _ in m.chunks)
        self._fids = array("q", [fid for _, fid in m.chunks])
        self._keys = "\n".join(m.keys) if m.keys else None  # keys never hold a newline

    @property
    def chunks(self) -> list[tuple[bytes, int]]:
        d = self._digests
        return [(d[16 * i : 16 * i + 16], fid) for i, fid in enumerate(self._fids)]

    def chunk_keys(self) -> list[str]:
        if self._keys is None:  # written before chunks had keys: ``#<position>``
            return [str(i) for i in range(len(self._fids))]
        return self._keys.split("\n") if self._fids else []


def file_uri(path: str | Path) -> str:
    """``file://`` + the percent-encoded path bytes: any file name, even non-UTF-8, fits."""
    return "file://" + urllib.parse.quote(os.fsencode(str(path)), safe="/")


def uri_path(uri: str) -> str:
    return os.fsdecode(urllib.parse.unquote_to_bytes(uri[len("file://"):]))


def chunk_uri(uri: str, key: str) -> str:
    return f"{uri}#{key}"


def clean(text: str) -> str:
    """Metadata as valid Unicode: a non-UTF-8 file name (decoded with surrogateescape)
    shows its undecodable bytes as U+FFFD in titles."""
    return text.encode("utf-8", errors="surrogateescape").decode("utf-8", errors="replace")


def on_disk(path: str, m: Manifest) -> bool:
    """Whether the file at ``path`` is still as it was indexed (by size and mtime, as the
    watcher's own scan compares them). A file gone, or unreadable, is not."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    return (st.st_size, st.st_mtime_ns) == (m.size, m.mtime_ns)


def places(cap: engine.Capsule, hits: Iterable[Any], seq: int) -> dict[int, dict[str, Any]]:
    """frame id -> where each hit that is a chunk of a watched file is, as of commit ``seq``
    (the one the search ran on): ``path``, ``lines`` (first, last) when known, and its
    freshness, ``mtime`` (the file's, as indexed) and ``stale`` (the file on disk differs
    from it now: the watcher has not caught up, or the file is gone). One manifest read and
    one stat per file among the hits: call it in a thread.

    Lines are given only for a chunk version visible at ``seq`` (an ``all_versions`` hit
    of an older version has none: the manifest of ``seq`` describes the chunks of then).
    Nothing here fails a find: what cannot be read is left out.
    """
    by_file: dict[str, list[tuple[int, str, bool]]] = {}
    for h in hits:
        if h.kind != CHUNK_KIND or not h.uri or not h.uri.startswith("file://") or "#" not in h.uri:
            continue
        uri, _, key = h.uri.rpartition("#")  # '#' in a path is percent-encoded: the last one is ours
        current = h.commit_seq <= seq and (h.valid_until is None or h.valid_until > seq)
        by_file.setdefault(uri, []).append((h.frame_id, key, current))
    out: dict[int, dict[str, Any]] = {}
    for uri, found in by_file.items():
        path = uri_path(uri)
        try:
            m: Manifest | None = manifest_decoder.decode(cap.get(uri=uri, as_of=seq).payload)
        except (engine.EngineError, msgspec.DecodeError, msgspec.ValidationError):
            m = None  # not a watched file's chunk after all, or an unreadable manifest: the path only
        where: dict[str, tuple[int, int]] = {}
        fresh: dict[str, Any] = {}
        if m is not None:
            if len(m.lines) == len(m.chunks):
                where = dict(zip(m.chunk_keys(), m.lines, strict=False))
            fresh = {"mtime": m.mtime_ns / 1e9, "stale": not on_disk(path, m)}
        for fid, key, current in found:
            lines = where.get(key) if current else None
            out[fid] = {"path": clean(path), **fresh} | ({"lines": lines} if lines else {})
    return out
