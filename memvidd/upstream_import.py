"""``memvidd import FILE.mv2 [--into CAPSULE]``: the documents of a capsule upstream memvid
wrote, read by ``upstream_format`` (no upstream library needed), written into a memvidd
capsule, whose engine builds its indexes as it commits them.

Where they go: by default a new capsule beside the input (``notes.mv2`` ->
``notes.memvidd.mv2``; never over an existing file). ``--into CAPSULE`` names another: a new
file, or an existing capsule, which is written through the daemon when the configured
daemon serves it (it holds the capsule's writer lock) and opened directly otherwise, as
``memvidd.sdk`` chooses (``sdk_backends``). The documents are put in commits of up to
``BATCH_BYTES`` of text (a request the daemon takes whole), in upstream's order; the frames
upstream deleted or superseded are removed afterwards, so history has them.

How an upstream frame becomes a memvidd frame: one per document (the chunk frames of a
long text are joined back into their document's text); its uri, title, kind and timestamp
are kept; its tags, labels, track and metadata become tags as ``memvidd.sdk`` maps them
(``sdk.to_tags``; metadata values, JSON upstream, decoded when they are strings). Frames
upstream keeps live under the same uri become versions of it here (the later supersedes
the earlier: memvidd keeps one live version per uri); a deleted frame, or a superseded one
no later frame replaces under its uri, is put and then removed. Tags beyond memvidd's
limits (256 per frame, keys of 256 bytes, values of 4 KiB; upstream adds many of its own)
are dropped and counted. Embeddings are not imported: a capsule bound to a model gets
its vectors from the daemon that serves it.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator
from typing import Any

import msgspec

from . import protocol as p
from . import upstream_format as uf

NEW_SUFFIX = ".memvidd.mv2"
BATCH_BYTES = 4 << 20  # of payload per put_many: well within a daemon's default max-frame-bytes (16 MiB)
BATCH_ITEMS = 1000


class Planned(msgspec.Struct, kw_only=True):
    """What the import will write: put items in upstream's order, which of them to remove
    afterwards (their indexes), and what it counted."""

    items: list[dict[str, Any]]
    remove: list[int]
    counts: dict[str, int]


def documents(cap: uf.UpstreamCapsule) -> Iterator[tuple[uf.UpstreamFrame, str | bytes]]:
    """Each document frame (oldest first) with its content; chunks fold into their parent."""
    chunks: dict[int, list[uf.UpstreamFrame]] = {}
    for f in cap.frames:
        if f.role == uf.CHUNK and f.parent_id is not None:
            chunks.setdefault(f.parent_id, []).append(f)
    for f in cap.frames:
        if f.role == uf.DOCUMENT:
            yield f, uf.text(cap, f, chunks.get(f.id, ()))


def _metadata(extra: dict[str, str]) -> dict[str, str]:
    """Upstream's ``extra_metadata`` (JSON text) as tag values: JSON strings decoded, the
    rest kept as JSON; a key that ``to_tags`` reserves gets a ``metadata.`` prefix."""
    from .sdk import LABEL_PREFIX, RESERVED

    out = {}
    for key, raw in extra.items():
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        name = f"metadata.{key}" if key in RESERVED or key.startswith(LABEL_PREFIX) else key
        out[name] = value if isinstance(value, str) else raw
    return out


def size(text: str) -> int:
    """UTF-8 bytes, as memvidd's limits count them."""
    return len(text.encode("utf-8", errors="surrogatepass"))


def _fit(tags: dict[str, str]) -> tuple[dict[str, str], int]:
    """``tags`` within memvidd's limits: oversized pairs dropped, then bare tags (value "")
    from the last until at most ``MAX_TAGS`` remain. Returns them and how many were dropped."""
    kept = {k: v for k, v in tags.items() if size(k) <= p.MAX_NAME and size(v) <= p.MAX_TAG_VALUE}
    bare = [k for k, v in kept.items() if v == ""]
    while len(kept) > p.MAX_TAGS and bare:
        del kept[bare.pop()]
    while len(kept) > p.MAX_TAGS:
        kept.popitem()
    return kept, len(tags) - len(kept)


def plan(cap: uf.UpstreamCapsule) -> Planned:
    """The puts and removes that bring ``cap``'s documents into a memvidd capsule."""
    from .sdk import to_tags

    items: list[dict[str, Any]] = []
    upstream: list[uf.UpstreamFrame] = []
    counts = {"upstream_frames": len(cap.frames), "documents": 0, "chunks_joined": 0, "skipped_images": 0,
              "deleted": 0, "superseded": 0, "versions_by_uri": 0, "tags_dropped": 0}
    for f, content in documents(cap):
        tags, dropped = _fit(to_tags(f.tags, f.labels, _metadata(f.extra_metadata), f.track))
        item: dict[str, Any] = {"text" if isinstance(content, str) else "data": content, "tags": tags,
                                "timestamp": float(f.timestamp)}
        for key in ("uri", "title", "kind"):
            if getattr(f, key) is not None:
                item[key] = getattr(f, key)
        if "title" in item and size(item["title"]) > p.MAX_TITLE:
            raise uf.UpstreamFormatError(f"frame {f.id}: a title of {size(item['title'])} bytes (memvidd's "
                                         f"limit is {p.MAX_TITLE})")
        items.append(item)
        upstream.append(f)
        counts["tags_dropped"] += dropped
    counts["documents"] = len(items)
    counts["chunks_joined"] = sum(1 for f in cap.frames if f.role == uf.CHUNK)
    counts["skipped_images"] = sum(1 for f in cap.frames if f.role == uf.IMAGE)
    # A later put under the same uri supersedes an earlier one here; anything upstream no
    # longer has live and that no later put replaces is removed after the puts.
    last_at = {f.uri: i for i, f in enumerate(upstream) if f.uri is not None}
    remove = []
    for i, f in enumerate(upstream):
        replaced = f.uri is not None and last_at[f.uri] > i
        if f.status == uf.ACTIVE and replaced:
            counts["versions_by_uri"] += 1
        elif f.status != uf.ACTIVE:
            counts["deleted" if f.status == uf.DELETED else "superseded"] += 1
            if not replaced:
                remove.append(i)
    return Planned(items=items, remove=remove, counts=counts)


def default_target(source: str) -> str:
    stem = source[:-4] if source.endswith(".mv2") else source
    return stem + NEW_SUFFIX


def batches(items: list[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    """``items`` in runs of at most ``BATCH_ITEMS`` and (but for one larger item) ``BATCH_BYTES``."""
    batch: list[dict[str, Any]] = []
    held = 0
    for item in items:
        content = item.get("text") or item.get("data") or b""
        n = size(content) if isinstance(content, str) else len(content)
        if batch and (held + n > BATCH_BYTES or len(batch) >= BATCH_ITEMS):
            yield batch
            batch, held = [], 0
        batch.append(item)
        held += n
    if batch:
        yield batch


def run(source: str, into: str | None = None, *, socket: str | None = None) -> dict[str, Any]:
    """Import the upstream capsule ``source``; returns the report."""
    from .sdk_backends import CapsuleExistsError, open_backend, translated

    cap = uf.read(source)
    planned = plan(cap)
    target = into or default_target(source)
    if into is None and os.path.lexists(target):
        raise CapsuleExistsError(f"{target} exists: name another capsule with --into, or --into {target} "
                                 "to add these documents to it")
    with translated():
        backend = open_backend(target, mode="auto" if into else "create", read_only=False, socket=socket)
        try:
            ids = [fid for batch in batches(planned.items) for fid in backend.put_many(batch)]
            seq = None
            for i in planned.remove:
                seq = backend.remove(ids[i])
            via, path = backend.served_by, backend.path
        finally:
            backend.close()
    return {"source": source, "into": path, "via": via or "file", "frame_ids": [ids[0], ids[-1]] if ids else [],
            "last_commit": seq, **planned.counts}


def cmd_import(args: argparse.Namespace) -> int:
    from .sdk_backends import MemvidError

    try:
        report = run(args.file, args.into, socket=args.socket)
    except MemvidError as e:
        raise SystemExit(f"memvidd: {e}") from None
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"imported {report['documents']} documents of {report['source']} ({report['upstream_frames']} upstream "
          f"frames) into {report['into']}" + (f" through the daemon at {report['via']}" if report["via"] != "file"
                                               else ""))
    notes = [f"{report[k]} {what}" for k, what in (
        ("chunks_joined", "chunk frames joined into their documents"),
        ("versions_by_uri", "frames became earlier versions of a later frame with the same uri"),
        ("deleted", "deleted frames imported, then removed (history keeps them)"),
        ("superseded", "superseded frames imported, then replaced or removed (history keeps them)"),
        ("tags_dropped", "tags dropped (over memvidd's limits)"),
        ("skipped_images", "extracted-image frames skipped")) if report[k]]
    for line in notes:
        print(f"  {line}")
    return 0

