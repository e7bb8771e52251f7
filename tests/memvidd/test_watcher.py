"""The directory indexer end to end: a real watcher (inotify, via watchfiles) on real temp
directories feeding a real capsule, in process under pytest-trio; and one real daemon
killed -9 during its initial scan.

Every wait is a condition polled under a deadline (``until``), never a bare sleep.
Known bugs are pinned by ``xfail(strict=True)`` tests that say what goes wrong.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
from daemon_util import DaemonProc

import engine
from memvidd.chunker import chunk_document
from memvidd.client import Client
from memvidd.ingest import (
    CHUNK_KIND,
    FILE_KIND,
    DigestMap,
    IngestPipeline,
    Known,
    Manifest,
    being_written,
    chunk_uri,
    digest,
    file_uri,
    uri_path,
)
from memvidd.service import CapsuleService
from memvidd.tree import Tree

pytestmark = pytest.mark.timeout(120)

WATCH_THREAD = "watch from"  # the name trio gives the thread that runs watchfiles


# -- harness -------------------------------------------------------------------------------


def watch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(WATCH_THREAD)]


async def until(cond: Callable[[], Any], timeout: float = 10.0, what: str = "", ix: IngestPipeline | None = None) -> Any:
    """Poll ``cond`` every 20 ms until it is truthy; fail after ``timeout`` seconds."""
    deadline = trio.current_time() + timeout
    while True:
        value = cond()
        if value:
            return value
        if trio.current_time() >= deadline:
            state = f"\nindexer: {ix.stats()}" if ix is not None else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what or cond}{state}")
        await trio.sleep(0.02)


def open_capsule(tmp_path: Path) -> engine.Capsule:
    path = tmp_path / "c.mv2"
    if path.exists():
        return engine.open(path, index_dir=str(tmp_path / "index"))
    return engine.create(path, model=None, index_dir=str(tmp_path / "index"))


@asynccontextmanager
async def watching(tmp_path: Path, *roots: Path | Tree, **options: Any) -> AsyncIterator[IngestPipeline]:
    """A capsule (created, or reopened if the test made one before), its service with the
    committer running, and an IngestPipeline watching ``roots`` that has done its initial scan;
    everything stopped and closed on exit."""
    cap = open_capsule(tmp_path)
    svc = CapsuleService("test", cap)
    trees = [r if isinstance(r, Tree) else Tree(r) for r in roots]
    ix = IngestPipeline(svc, trees, debounce_ms=20, **options)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(svc.serve_committer)
            await nursery.start(ix.run)
            try:
                # start from a known state: the initial scan is over
                await until(lambda: ix.progress.phase in ("indexing", "watching"), what="the initial scan", ix=ix)
                yield ix
            finally:
                # Work around test_cancelling_the_indexer_stops_its_watcher_thread:
                # cancelling run() abandons the watcher thread without stopping it.
                ix.stop.set()
                nursery.cancel_scope.cancel()
    finally:
        ix.stop.set()
        with trio.move_on_after(10):
            while watch_threads():
                await trio.sleep(0.01)
        try:
            cap.close()
        except UnicodeEncodeError:
            pass  # test_non_utf8_file_name_of_a_code_file: the staged frame cannot commit (the file is closed)
        await index_threads_gone()


def native_threads(*prefixes: str) -> list[str]:
    out = []
    for tid in os.listdir("/proc/self/task"):
        try:
            name = Path(f"/proc/self/task/{tid}/comm").read_text().strip()
        except OSError:
            continue
        if name.startswith(prefixes):
            out.append(name)
    return out


async def index_threads_gone() -> None:
    """Capsule.close() drops its Tantivy writer without waiting for the merge threads,
    which go on creating and opening segment files for up to a second: wait for them
    (bounded), so that the fd leak check sees only real leaks."""
    with trio.move_on_after(10):
        while native_threads("merge_thread", "segment_updater", "thrd-tantivy", "thread-tantivy"):
            await trio.sleep(0.01)


def mkroot(tmp_path: Path, name: str = "root") -> Path:
    root = (tmp_path / name).resolve()
    root.mkdir(parents=True, exist_ok=True)
    return root


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def uri(path: Path | bytes | str) -> str:
    return file_uri(os.fsdecode(path))


def manifest(cap: engine.Capsule, path: Path | bytes, **kw: Any) -> Manifest | None:
    try:
        frame = cap.get(uri=uri(path), **kw)
    except engine.NotFound:
        return None
    assert frame.kind == FILE_KIND and not frame.is_text
    return msgspec.msgpack.decode(frame.payload, type=Manifest)


def chunk_at(cap: engine.Capsule, path: Path | bytes, i: int = 0, **kw: Any) -> str:
    """The URI of the ``i``-th chunk of a file, by its manifest (as of ``kw``)."""
    m = manifest(cap, path, **kw)
    assert m is not None, f"no manifest for {path!r}"
    return chunk_uri(uri(path), m.chunk_keys()[i])


def live_chunks(cap: engine.Capsule, path: Path | bytes) -> list[str] | None:
    """The live chunk texts of a file, in order (None: no live file frame)."""
    m = manifest(cap, path)
    if m is None:
        return None
    out = []
    for (_, fid), key in zip(m.chunks, m.chunk_keys()):
        try:
            frame = cap.get(uri=chunk_uri(uri(path), key))
        except engine.NotFound:
            return None
        if frame.id != fid:
            return None  # the manifest and its chunk disagree (a write in between)
        out.append(frame.text)
    return out


def expected_chunks(path: Path | bytes, data: str | bytes, size: int = 1500, overlap: int = 150) -> list[str]:
    text = data.decode("utf-8", errors="replace") if isinstance(data, bytes) else data
    return [c.text for c in chunk_document(os.fsdecode(path), text, size=size, overlap=overlap).chunks]


def indexed_as(cap: engine.Capsule, path: Path | bytes, data: str | bytes) -> bool:
    return live_chunks(cap, path) == expected_chunks(path, data)


def hits(cap: engine.Capsule, word: str, **kw: Any) -> set[str]:
    """The chunks that contain ``word``, each as ``<file uri>#<its position in the file>``
    (by the file's manifest as of the same commit; a chunk no manifest lists keeps its URI)."""
    out = set()
    for h in cap.find(word, mode="lex", k=200, **kw):
        parent = (h.uri or "").rsplit("#", 1)[0]
        try:
            m = msgspec.msgpack.decode(cap.get(uri=parent, as_of=kw.get("as_of")).payload, type=Manifest)
            out.add(f"{parent}#{[fid for _, fid in m.chunks].index(h.frame_id)}")
        except (engine.NotFound, ValueError):
            out.add(h.uri or "")
    return out


def all_frames(cap: engine.Capsule) -> list[engine.Frame]:
    """Every committed put, superseded ones included (tombstones left out)."""
    out = []
    for fid in range(cap.stats()["frames"]):
        try:
            out.append(cap.get(fid))
        except engine.NotFound:
            pass
    return out


def versions(cap: engine.Capsule, u: str) -> list[engine.Frame]:
    return [f for f in all_frames(cap) if f.uri == u]


def live(cap: engine.Capsule) -> list[engine.FrameInfo]:
    return cap.timeline(limit=1 << 40)


def assert_matches_tree(cap: engine.Capsule, trees: list[Tree], size: int = 1500, overlap: int = 150) -> None:
    """The live frames are exactly the documents of ``trees``: one file frame per file with
    the file's size and hash, and exactly its chunks (no duplicates, no strays)."""
    expected = {file_uri(p): p for t in trees for p, _ in t.walk()}
    frames = live(cap)
    files = {f.uri: f for f in frames if f.kind == FILE_KIND}
    assert sorted(files) == sorted(expected)
    chunks: dict[str, list[engine.FrameInfo]] = {}
    for f in frames:
        if f.kind == CHUNK_KIND:
            chunks.setdefault(f.parent or "", []).append(f)
    assert set(chunks) <= set(files), f"chunks of no live file: {sorted(set(chunks) - set(files))[:5]}"
    assert len(frames) == len(files) + sum(len(v) for v in chunks.values()), "a live frame of another kind"
    for u, p in expected.items():
        data = p.read_bytes()
        m = msgspec.msgpack.decode(cap.get(uri=u).payload, type=Manifest)
        assert m.sha == hashlib.blake2b(data, digest_size=16).digest(), u
        assert m.size == len(data)
        mine = {f.id: f for f in chunks.get(u, [])}
        assert sorted(mine) == sorted(fid for _, fid in m.chunks), f"{u}: live chunk frames != the manifest's"
        keys = m.chunk_keys()
        assert len(set(keys)) == len(keys) == len(m.chunks), f"{u}: keys {keys}"
        assert [mine[fid].uri for _, fid in m.chunks] == [chunk_uri(u, k) for k in keys]
        texts = expected_chunks(p, data, size, overlap)
        assert [cap.get(fid).text for _, fid in m.chunks] == texts, u
        assert [d for d, _ in m.chunks] == [digest(t) for t in texts], u


def defs(n: int, edit: dict[int, str] | None = None) -> str:
    out = ["import os\nimport sys\n\n\n"]
    for i in range(n):
        body = (edit or {}).get(i) or "".join(f"    x{j} = compute_{i}_{j}(alpha, beta)\n" for j in range(8))
        out.append(f"def func_{i}(alpha, beta):\n{body}    return x0\n\n\n")
    return "".join(out)


# -- the basics ----------------------------------------------------------------------------


@pytest.mark.trio
async def test_create_modify_rename_move_delete(tmp_path):
    root = mkroot(tmp_path)
    write(root / "anchor.txt", "a steady anchor document\n")
    async with watching(tmp_path, root) as ix:
        cap = ix.svc.cap
        await until(lambda: hits(cap, "anchor") == {uri(root / "anchor.txt") + "#0"}, what="start-up scan", ix=ix)

        a = write(root / "a.txt", "the first quokka version\n")
        await until(lambda: hits(cap, "quokka") == {uri(a) + "#0"}, what="created file", ix=ix)
        chunk = cap.get(uri=chunk_at(cap, a))
        assert (chunk.kind, chunk.parent, chunk.chunk, chunk.text) == (CHUNK_KIND, uri(a), 0, "the first quokka version\n")
        assert chunk.tags == {"root": "root", "type": "text"} and chunk.title == "the first quokka version"
        m1 = manifest(cap, a)
        assert m1 is not None and m1.root == str(root) and m1.size == 25 and len(m1.chunks) == 1
        seq1 = cap.seq

        write(a, "the second narwhal version, longer\n")
        await until(lambda: hits(cap, "narwhal") == {uri(a) + "#0"}, what="modified file", ix=ix)
        assert hits(cap, "quokka") == set(), "the old text is gone from live search"
        assert hits(cap, "quokka", as_of=seq1) == {uri(a) + "#0"}, "...but visible as of the earlier commit"
        assert manifest(cap, a, as_of=seq1) == m1
        assert cap.get(uri=chunk_at(cap, a, as_of=seq1), as_of=seq1).text == "the first quokka version\n"
        seq2 = cap.seq

        b = root / "b.txt"
        a0 = chunk_at(cap, a)
        os.rename(a, b)
        await until(lambda: manifest(cap, a) is None and hits(cap, "narwhal") == {uri(b) + "#0"}, what="rename", ix=ix)
        for gone in (uri(a), a0):
            with pytest.raises(engine.NotFound):
                cap.get(uri=gone)
            assert cap.get(uri=gone, as_of=seq2).commit_seq <= seq2
        assert ix.progress.vectors_reused == 0  # (no vectors in a model=None capsule)

        c = root / "sub" / "deeper" / "c.txt"
        c.parent.mkdir(parents=True)
        os.rename(b, c)
        await until(lambda: hits(cap, "narwhal") == {uri(c) + "#0"} and manifest(cap, b) is None,
                    what="move into a new subdirectory", ix=ix)
        seq3 = cap.seq

        c0 = chunk_at(cap, c)
        os.unlink(c)
        await until(lambda: manifest(cap, c) is None, what="delete", ix=ix)
        with pytest.raises(engine.NotFound):
            cap.get(uri=c0)
        assert hits(cap, "narwhal") == set()
        assert hits(cap, "narwhal", as_of=seq3) == {uri(c) + "#0"}
        tombstones = cap.stats()["tombstones"]
        assert tombstones == 6  # a, a#0, b, b#0, c, c#0
        assert ix.progress.errors == 0 and ix.progress.files_deleted == 3
        assert_matches_tree(cap, [Tree(root)])


@pytest.mark.trio
async def test_a_one_line_edit_of_a_large_file_writes_one_chunk(tmp_path):
    root = mkroot(tmp_path)
    path = write(root / "big.py", defs(30))
    async with watching(tmp_path, root) as ix:
        cap = ix.svc.cap
        await until(lambda: indexed_as(cap, path, defs(30)), what="initial index", ix=ix)
        before = manifest(cap, path)
        assert before is not None
        n = len(before.chunks)
        assert n >= 10, "a multi-chunk file"
        written, kept = ix.progress.chunks_written, ix.progress.chunks_kept

        line = "    x3 = compute_17_3(alpha, beta)\n"
        assert path.read_text().count(line) == 1
        edited = path.read_text().replace(line, "    x3 = compute_17_3(zzyzx, beta)\n")  # same length
        path.write_text(edited)
        await until(lambda: indexed_as(cap, path, edited), what="the edit", ix=ix)

        assert ix.progress.chunks_written - written == 1
        assert ix.progress.chunks_kept - kept == n - 1
        after = manifest(cap, path)
        assert after is not None
        changed = [i for i in range(n) if after.chunks[i] != before.chunks[i]]
        assert len(changed) == 1, "only the edited chunk has a new frame"
        assert hits(cap, "zzyzx") == {f"{uri(path)}#{changed[0]}"}
        assert after.chunk_keys() == before.chunk_keys(), "the edited chunk is a new version of the same chunk"
        assert len(versions(cap, chunk_at(cap, path, changed[0]))) == 2
        assert sum(len(versions(cap, chunk_at(cap, path, i))) for i in range(n)) == n + 1


# -- chunk identity ------------------------------------------------------------------------------


def written_since(cap: engine.Capsule, seq: int, path: Path) -> tuple[int, int]:
    """(chunk frames, file frames) put for ``path`` by the commits after ``seq``."""
    frames = cap.changes(seq, limit=1 << 30)
    return (sum(f.parent == uri(path) and f.kind == CHUNK_KIND for f in frames),
            sum(f.uri == uri(path) for f in frames))


def vanished(before: str, after: str, path: Path) -> int:
    """How many chunk texts of ``before`` are not in ``after`` (as a multiset)."""
    left = Counter(expected_chunks(path, after))
    n = 0
    for t in expected_chunks(path, before):
        if left[t] > 0:
            left[t] -= 1
        else:
            n += 1
    return n


def kept_frames(before: Manifest, after: Manifest) -> tuple[int, int]:
    """(chunks whose text is in both manifests, those of them that kept their frame)."""
    old = {d: fid for d, fid in before.chunks}
    common = [(d, fid) for d, fid in after.chunks if d in old]
    return len(common), sum(old[d] == fid for d, fid in common)


PARAS = "".join(f"Paragraph {i} is about the aardvark number {i}.\nIt has a second line, {i}.\n\n" for i in range(40))


@pytest.mark.trio
@pytest.mark.parametrize("name, before, after", [
    ("notes.txt", PARAS, "A new first paragraph: a pangolin.\n\n" + PARAS),
    ("mod.py", defs(30), defs(30).replace("import sys\n\n\n", "import sys\n\n\ndef inserted(alpha):\n"
                                          + "".join(f"    y{j} = pangolin_{j}(alpha)\n" for j in range(6)) + "\n\n", 1)),
    ("mod.py", defs(30), defs(30) + "def appended(alpha):\n    return pangolin(alpha)\n"),
], ids=["paragraph-at-top", "def-at-top", "def-at-end"])
async def test_an_insertion_writes_only_the_new_chunks(tmp_path, name, before, after):
    """Chunks are not numbered: a chunk whose text did not change keeps its frame wherever
    it moved (no new version), so an insertion near the top writes the new chunk (and at
    most a neighbour whose grouping changed), not every chunk after it."""
    root = mkroot(tmp_path)
    path = write(root / name, before)
    async with watching(tmp_path, root) as ix:
        cap = ix.svc.cap
        await until(lambda: indexed_as(cap, path, before), what="initial index", ix=ix)
        m0, seq, tombstones = manifest(cap, path), cap.seq, cap.stats()["tombstones"]
        assert m0 is not None and len(m0.chunks) >= 15
        path.write_text(after)
        await until(lambda: indexed_as(cap, path, after) and hits(cap, "pangolin"), what="the insertion", ix=ix)
        await until(lambda: not ix.pending and not ix.svc._queue, ix=ix)
        chunk_puts, file_puts = written_since(cap, seq, path)
        removed = cap.stats()["tombstones"] - tombstones
        print(f"{name}: {len(m0.chunks)} chunks; wrote {chunk_puts} chunk frames, {removed} tombstones")
        assert file_puts == 1
        assert 1 <= chunk_puts <= 2, f"{chunk_puts} chunk frames written for one insertion"
        assert removed <= vanished(before, after, path), "a tombstone for a chunk whose text is still there"
        m1 = manifest(cap, path)
        assert m1 is not None
        common, kept = kept_frames(m0, m1)
        assert kept == common >= len(m0.chunks) - 2, "an unchanged chunk got a new frame"
        assert ix.progress.errors == 0
        assert_matches_tree(cap, [Tree(root)])


@pytest.mark.trio
async def test_moving_a_definition_keeps_its_frame(tmp_path):
    root = mkroot(tmp_path)
    blocks = defs(30).split("\n\n\n")
    moved = blocks[:5] + blocks[6:-1] + [blocks[5], ""]  # func_4 cut and pasted at the end
    before, after = defs(30), "\n\n\n".join(moved)
    assert sorted(before) == sorted(after) and "def func_4(" in blocks[5]
    path = write(root / "mod.py", before)
    async with watching(tmp_path, root) as ix:
        cap = ix.svc.cap
        await until(lambda: indexed_as(cap, path, before), ix=ix)
        m0, seq = manifest(cap, path), cap.seq
        path.write_text(after)
        await until(lambda: indexed_as(cap, path, after), ix=ix)
        chunk_puts, _ = written_since(cap, seq, path)
        m1 = manifest(cap, path)
        common, kept = kept_frames(m0, m1)
        assert kept == common and chunk_puts <= 4, f"{chunk_puts} chunk frames written for a move"
        assert_matches_tree(cap, [Tree(root)])


@pytest.mark.trio
async def test_a_failed_commit_is_written_again_without_stray_chunks(tmp_path):
    """The engine discards a batch whose commit fails: the indexer puts back what it knew
    of the file, so the retry is a diff against what the capsule really has."""
    root = mkroot(tmp_path)
    path = write(root / "notes.txt", PARAS)
    async with watching(tmp_path, root) as ix:
        cap = ix.svc.cap
        await until(lambda: indexed_as(cap, path, PARAS), ix=ix)
        m0 = manifest(cap, path)
        commit, failed = cap.commit, []

        def failing_commit() -> int:
            if not failed:
                failed.append(cap.seq)
                cap.rollback()  # what the engine does when its write or fsync fails
                raise engine.StorageError("fsync", "c.mv2", OSError(errno.ENOSPC, "No space left on device"))
            return commit()

        cap.commit = failing_commit  # type: ignore[method-assign]
        edited = PARAS.replace("aardvark number 7.", "aardvark number 7, now an okapi.")
        path.write_text(edited)
        await until(lambda: failed, what="the failing commit", ix=ix)
        await until(lambda: indexed_as(cap, path, edited), timeout=10, what="the retry", ix=ix)
        assert ix.progress.errors == 1
        assert_matches_tree(cap, [Tree(root)])  # no stray chunk frame
        m1 = manifest(cap, path)
        assert m1.chunk_keys() == m0.chunk_keys(), "the edited chunk is a new version of its URI"
        assert written_since(cap, failed[0], path) == (1, 1)


def write_positional(cap: engine.Capsule, root: Path, path: Path) -> None:
    """Index ``path`` the way the indexer did before chunks had keys: chunk frames at
    ``<file uri>#<position>`` and a five-field manifest (no ``keys``)."""
    data = path.read_bytes()
    st = path.stat()
    doc = chunk_document(str(path), data.decode())
    tags = {"root": root.name, "type": doc.kind}
    ids = [cap.put(c.text, uri=f"{uri(path)}#{i}", title=c.title, kind=CHUNK_KIND, tags=tags, parent=uri(path),
                   chunk=i) for i, c in enumerate(doc.chunks)]
    old = [str(root), st.st_size, st.st_mtime_ns, hashlib.blake2b(data, digest_size=16).digest(),
           [(digest(c.text), fid) for c, fid in zip(doc.chunks, ids)]]
    cap.put(msgspec.msgpack.encode(old), uri=uri(path), title=doc.title, kind=FILE_KIND, tags=tags,
            timestamp=st.st_mtime_ns / 1e9)


@pytest.mark.trio
async def test_a_capsule_with_positional_chunk_uris_is_reconciled_and_updated(tmp_path):
    """Capsules written before chunks had keys (``#0``, ``#1``, ...) keep working: nothing
    is re-read at start-up, and an edit keeps the old frames of the unchanged chunks."""
    root = mkroot(tmp_path)
    notes = write(root / "notes.txt", PARAS)
    mod = write(root / "mod.py", defs(30))
    same = write(root / "same.md", "# Same\n\nan unchanged quagga\n")
    gone = write(root / "gone.txt", "a quagga deleted while the indexer was down\n")
    cap = open_capsule(tmp_path)
    for p in (notes, mod, same, gone):
        write_positional(cap, root, p)
    cap.commit()
    cap.close()
    gone.unlink()

    async with watching(tmp_path, root) as ix:
        cap = ix.svc.cap
        await until(lambda: ix.progress.phase == "watching" and not ix.pending and ix.progress.files_deleted == 1, ix=ix)
        assert (ix.progress.files_unchanged, ix.progress.bytes_read) == (3, 0), "an unchanged file was re-read"
        assert_matches_tree(cap, [Tree(root)])
        assert chunk_at(cap, mod, 3) == uri(mod) + "#3"

        seq = cap.seq
        text = "A new first paragraph: a pangolin.\n\n" + PARAS
        notes.write_text(text)
        await until(lambda: indexed_as(cap, notes, text), ix=ix)
        assert written_since(cap, seq, notes) == (1, 1)
        assert chunk_at(cap, notes, 1) == uri(notes) + "#0", "the old first chunk kept its frame and URI"

        line = "    x3 = compute_17_3(alpha, beta)\n"
        edited = defs(30).replace(line, "    x3 = compute_17_3(zzyzx, beta)\n")
        mod.write_text(edited)
        await until(lambda: indexed_as(cap, mod, edited), ix=ix)
        [(i, u)] = [(i, chunk_at(cap, mod, i)) for i in range(len(manifest(cap, mod).chunks))
                    if "zzyzx" in cap.get(uri=chunk_at(cap, mod, i)).text]
        assert u == f"{uri(mod)}#{i}" and len(versions(cap, u)) == 2, "an edited chunk is a new version of its URI"
        assert_matches_tree(cap, [Tree(root)])

        mod.unlink()
        await until(lambda: manifest(cap, mod) is None, ix=ix)
        await until(lambda: not ix.pending and not ix.svc._queue, ix=ix)
        assert_matches_tree(cap, [Tree(root)])

    async with watching(tmp_path, root) as ix:  # the mixed manifests load and match
        await until(lambda: ix.progress.phase == "watching" and not ix.pending, ix=ix)
        assert ix.progress.files_unchanged == 2 and ix.progress.bytes_read == 0
        assert_matches_tree(ix.svc.cap, [Tree(root)])


# -- editor save patterns ----------------------------------------------------------------------


def check_versions(cap: engine.Capsule, path: Path, allowed: list[str]) -> list[engine.Frame]:
    """Every committed version of the file's chunks is one of the complete ``allowed``
    texts (never empty, never partial); every file frame version has chunks."""
    chunk_versions = versions(cap, chunk_at(cap, path))
    assert chunk_versions
    for v in chunk_versions:
        assert v.text in allowed, f"a partial or empty version was committed: {v.text!r}"
    for v in versions(cap, uri(path)):
        assert msgspec.msgpack.decode(v.payload, type=Manifest).chunks, "an empty version was committed"
    return chunk_versions


def content(tag: str) -> str:
    return f"{tag} header line of the document\n" + "".join(f"{tag} body line {i}\n" for i in range(20))


@pytest.mark.trio
async def test_save_by_atomic_replace_is_one_new_version(tmp_path):
    root = mkroot(tmp_path)
    path = write(root / "doc.txt", content("alpha"))
    async with watching(tmp_path, root) as ix:
        cap = ix.svc.cap
        await until(lambda: indexed_as(cap, path, content("alpha")), ix=ix)

        def save(text: str, tmp_name: str) -> None:
            tmp = root / tmp_name
            with open(tmp, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)

        save(content("bravo"), ".doc.txt.tmp")  # a junk name: never a document
        await until(lambda: indexed_as(cap, path, content("bravo")), ix=ix)
        save(content("charlie"), "tmp_x8q2wd")  # mkstemp style: a document name, gone at once
        await until(lambda: indexed_as(cap, path, content("charlie")), ix=ix)

        chunks = check_versions(cap, path, [content(t) for t in ("alpha", "bravo", "charlie")])
        assert [v.text for v in chunks] == [content("alpha"), content("bravo"), content("charlie")]
        assert len(versions(cap, uri(path))) == 3, "one new version per save"
        assert {f.uri for f in all_frames(cap)} == {uri(path), chunk_at(cap, path)}, "a temp file was indexed"
        assert_matches_tree(cap, [Tree(root)])


@pytest.mark.trio
async def test_truncate_then_write_never_commits_an_empty_version(tmp_path):
    root = mkroot(tmp_path)
    path = write(root / "doc.txt", content("alpha"))
    async with watching(tmp_path, root) as ix:
        cap = ix.svc.cap
        await until(lambda: indexed_as(cap, path, content("alpha")), ix=ix)
        with open(path, "w") as f:  # truncated: the file is empty for a while
            f.flush()
            os.fsync(f.fileno())
            await trio.sleep(0.1)  # the writer is slow (part of the scenario, not a wait)
            f.write(content("bravo"))
        await until(lambda: indexed_as(cap, path, content("bravo")), ix=ix)
        chunks = check_versions(cap, path, [content("alpha"), content("bravo")])
        assert len(chunks) == 2


@pytest.mark.trio
async def test_truncate_then_write_in_two_flushes_never_commits_a_partial_version(tmp_path):
    root = mkroot(tmp_path)
    path = write(root / "doc.txt", content("alpha"))
    async with watching(tmp_path, root) as ix:
        cap = ix.svc.cap
        await until(lambda: indexed_as(cap, path, content("alpha")), ix=ix)
        saves = [content(t) for t in ("bravo", "charlie", "delta")]
        for text in saves:
            with open(path, "w") as f:
                f.write(text[: len(text) // 2])
                f.flush()
                await trio.sleep(0.1)  # the writer's gap between its two writes (the scenario)
                f.write(text[len(text) // 2:])
            await until(lambda text=text: indexed_as(cap, path, text), ix=ix)
        check_versions(cap, path, [content("alpha"), *saves])



def test_the_compact_in_memory_manifest_unfolds_to_the_manifest():
    chunks = [(digest(f"chunk {i}"), 100 + i) for i in range(5)]
    keyed = Manifest("/tree", 10, 20, b"s" * 16, chunks, ["a1", "b2", "c3", "d4", "e5"])
    k = Known(keyed)
    assert (k.root, k.size, k.mtime_ns, k.sha) == ("/tree", 10, 20, b"s" * 16)
    assert k.chunks == chunks and k.chunk_keys() == keyed.keys
    legacy = Known(Manifest("/tree", 1, 2, b"", chunks))  # before chunk keys: positions
    assert legacy.chunk_keys() == ["0", "1", "2", "3", "4"]
    empty = Known(Manifest("/tree", 0, 2, b"", [], []))
    assert empty.chunks == [] and empty.chunk_keys() == []


def test_digest_map_hits_only_the_whole_digest_and_forgets():
    m = DigestMap()
    d = digest("some text")
    m.set(d, 7)
    assert m.get(d) == 7
    assert m.get(d[:8] + bytes(8)) is None  # same first half: not the same text
    m.forget(d, 8)  # another frame's id: nothing to forget
    assert m.get(d) == 7
    m.forget(d, 7)
    assert m.get(d) is None


def test_being_written_tells_whether_a_writer_has_the_file_open(tmp_path):
    path = write(tmp_path / "f.txt", "x\n")

    def check() -> bool:
        with open(path, "rb") as f:
            return being_written(f.fileno())

    assert not check()
    for mode in ("a", "r+", "w"):
        with open(path, mode):
            assert check(), mode
        assert not check(), mode
    with open(path):  # a reader is no writer
        assert not check()


def test_a_writer_opening_the_file_during_the_check_does_not_kill_the_process(tmp_path):
    """While the lease of ``being_written`` exists (microseconds), a writer's open breaks
    it and the kernel signals the holder: with SIGIO, the default, that kills the process."""
    code = (
        "import os, sys, threading, time\n"
        "from memvidd.ingest import being_written\n"
        "p = sys.argv[1]\n"
        "end = time.monotonic() + 1.0\n"
        "def writer():\n"
        "    while time.monotonic() < end:\n"
        "        os.close(os.open(p, os.O_WRONLY))\n"
        "t = threading.Thread(target=writer)\n"
        "t.start()\n"
        "n = 0\n"
        "while time.monotonic() < end:\n"
        "    fd = os.open(p, os.O_RDONLY)\n"
        "    n += being_written(fd)\n"
        "    os.close(fd)\n"
        "t.join()\n"
        "print(n)\n"
    )
    path = write(tmp_path / "f.txt", "x\n")
    r = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60,
                       cwd=Path(__file__).resolve().parents[2], check=False)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert int(r.stdout) > 0, "the writer was never seen"


@pytest.mark.trio
async def test_a_file_kept_open_by_its_writer_is_indexed_anyway(tmp_path):
    """A log that stays open for writing is not waited for forever (WRITER_WAIT_S)."""
    root = mkroot(tmp_path)
    path = root / "app.log.txt"
    async with watching(tmp_path, root) as ix:
        cap = ix.svc.cap
        with path.open("w") as f:
            f.write("a first line from the gerbil daemon\n")
            f.flush()
            await until(lambda: str(path) in ix.writing, what="the writer seen", ix=ix)
            await until(lambda: hits(cap, "gerbil"), timeout=10, what="indexed while still open", ix=ix)
            f.write("a second gerbil line\n")
        await until(lambda: indexed_as(cap, path, path.read_text()), ix=ix)
        assert not ix.writing


@pytest.mark.trio
async def test_a_burst_of_20_saves_ends_with_the_last_one(tmp_path):
    root = mkroot(tmp_path)
    path = write(root / "doc.txt", content("v00"))
    async with watching(tmp_path, root) as ix:
        cap = ix.svc.cap
        await until(lambda: indexed_as(cap, path, content("v00")), ix=ix)
        texts = [content(f"v{i:02d}") + "x" * i for i in range(21)]  # distinct sizes (see the racy-stat xfail)
        for i in range(1, 21):
            if i % 2:
                path.write_text(texts[i])  # truncate + write
            else:
                tmp = root / "doc.txt.tmp"
                tmp.write_text(texts[i])
                os.replace(tmp, path)
            await trio.sleep(0.005)  # the editor's pace (the scenario, not a wait)
        await until(lambda: indexed_as(cap, path, texts[20]), what="the last save", ix=ix)
        chunks = check_versions(cap, path, texts)
        assert chunks[-1].text == texts[20]
        order = [texts.index(v.text) for v in chunks]
        assert order == sorted(order), f"versions went back in time: {order}"
        assert ix.progress.errors == 0


# -- which files are documents ------------------------------------------------------------------

TREE_FILES = {
    ".gitignore": "*.log\n!keep.log\nsecret/\n",
    "notes.txt": "visible wombat notes\n",
    "keep.log": "visible wombat kept log\n",
    "debug.log": "hidden wombat log\n",
    "secret/s.txt": "hidden wombat secret\n",
    "sub/.gitignore": "local.txt\n/anchored.txt\n",
    "sub/local.txt": "hidden wombat local\n",
    "sub/anchored.txt": "hidden wombat anchored\n",
    "sub/deep/anchored.txt": "visible wombat deep anchored\n",
    "sub/deep/local.txt": "hidden wombat deep local\n",
    ".git/config": "hidden wombat git\n",
    "node_modules/pkg/index.js": "hidden wombat node\n",
    ".venv/lib/site.py": "hidden wombat venv\n",
    "docs/guide.md": "# Guide\n\nvisible wombat guide\n",
    "docs/drafts/wip.md": "# WIP\n\nhidden wombat draft\n",
    "docs/plan.secret.md": "# Plan\n\nhidden wombat plan\n",
    "src/app.py": "def visible():\n    return 'wombat app'\n",
    "src/skip.sh": "echo hidden wombat shell\n",
}
VISIBLE = {"notes.txt", "keep.log", "sub/deep/anchored.txt", "docs/guide.md", "src/app.py"}


def wombat_tree(root: Path) -> Tree:
    return Tree(root, include=["*.txt", "*.log", "*.md", "*.py"], exclude=["drafts/", "*.secret.md"])


def wombat_docs(cap: engine.Capsule, root: Path) -> set[str]:
    return {uri_path(u.split("#")[0])[len(str(root)) + 1:] for u in hits(cap, "wombat")}


@pytest.mark.trio
async def test_ignore_rules_junk_dirs_and_globs_at_start_up(tmp_path):
    root = mkroot(tmp_path)
    for rel, text in TREE_FILES.items():
        write(root / rel, text)
    async with watching(tmp_path, wombat_tree(root)) as ix:
        cap = ix.svc.cap
        await until(lambda: ix.progress.phase == "watching" and not ix.pending and len(ix.docs) == len(VISIBLE), ix=ix)
        assert wombat_docs(cap, root) == VISIBLE
        assert ix.progress.files_seen == len(VISIBLE)
        assert_matches_tree(cap, [wombat_tree(root)])


@pytest.mark.trio
async def test_ignore_rules_junk_dirs_and_globs_for_live_changes(tmp_path):
    root = mkroot(tmp_path)
    write(root / ".gitignore", TREE_FILES[".gitignore"])
    write(root / "sub" / ".gitignore", TREE_FILES["sub/.gitignore"])
    async with watching(tmp_path, wombat_tree(root)) as ix:
        cap = ix.svc.cap
        for rel, text in TREE_FILES.items():
            if not rel.endswith(".gitignore"):
                write(root / rel, text)
        sentinel = write(root / "zz_last.txt", "sentinel\n")
        await until(lambda: hits(cap, "sentinel") and not ix.pending, ix=ix)
        await until(lambda: wombat_docs(cap, root) == VISIBLE, what=f"exactly {VISIBLE}", ix=ix)
        for rel in TREE_FILES:
            if rel not in VISIBLE:
                write(root / rel, TREE_FILES[rel] + "changed\n")
        sentinel.write_text("sentinel again\n")
        await until(lambda: hits(cap, "again") and not ix.pending, ix=ix)
        assert wombat_docs(cap, root) == VISIBLE
        assert_matches_tree(cap, [wombat_tree(root)])


@pytest.mark.trio
async def test_editing_a_gitignore_applies_to_files_already_there(tmp_path):
    root = mkroot(tmp_path)
    write(root / ".gitignore", "b.txt\n")
    write(root / "a.txt", "alpha wombat\n")
    write(root / "b.txt", "bravo wombat\n")
    async with watching(tmp_path, root) as ix:
        cap = ix.svc.cap
        await until(lambda: wombat_docs(cap, root) == {"a.txt"}, ix=ix)
        (root / ".gitignore").write_text("a.txt\n")
        await until(lambda: wombat_docs(cap, root) == {"b.txt"}, timeout=2,
                    what="BUG: the .gitignore edit is not applied", ix=ix)


@pytest.mark.trio
async def test_symlinks_leading_outside_the_root_are_not_followed(tmp_path):
    root, outside = mkroot(tmp_path), mkroot(tmp_path, "outside")
    write(outside / "o.txt", "outside platypus\n")
    write(outside / "d" / "o2.txt", "outside platypus deeper\n")
    write(root / "inside.txt", "inside platypus\n")
    os.symlink(outside, root / "dirlink")
    os.symlink(outside / "o.txt", root / "filelink.txt")
    async with watching(tmp_path, root) as ix:
        cap = ix.svc.cap
        await until(lambda: hits(cap, "platypus") and ix.progress.phase == "watching", ix=ix)
        write(outside / "new.txt", "outside platypus created later\n")
        (outside / "o.txt").write_text("outside platypus changed\n")
        os.symlink(outside / "d", root / "dirlink2")
        write(root / "later.txt", "inside platypus later\n")
        await until(lambda: hits(cap, "later") and not ix.pending, ix=ix)
        assert hits(cap, "platypus") == {uri(root / "inside.txt") + "#0", uri(root / "later.txt") + "#0"}
        assert_matches_tree(cap, [Tree(root)])


@pytest.mark.trio
async def test_binary_and_oversized_files_are_skipped_and_logged_once(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="memvidd")
    root = mkroot(tmp_path)
    write(root / "blob.dat", b"head\0tail" * 10)
    write(root / "big.txt", "echidna " * 200)
    write(root / "ok.txt", "echidna fine\n")
    flip = write(root / "flip.txt", "echidna text for now\n")
    async with watching(tmp_path, Tree(root, max_bytes=1000)) as ix:
        cap = ix.svc.cap
        await until(lambda: hits(cap, "echidna") == {uri(root / "ok.txt") + "#0", uri(flip) + "#0"}, ix=ix)
        skipped = ix.progress.files_skipped
        for i in range(3):  # more changes: still skipped, still one log line each
            write(root / "blob.dat", b"head\0tail" * (11 + i))
            write(root / "big.txt", "echidna " * (201 + i))
            await until(lambda i=i: ix.progress.files_skipped >= skipped + i + 1, ix=ix)
        flip.write_bytes(b"now\0binary")
        await until(lambda: manifest(cap, flip) is None, what="a file that turned binary is removed", ix=ix)
        write(root / "blob.dat", "echidna turned into text\n")
        await until(lambda: uri(root / "blob.dat") + "#0" in hits(cap, "echidna"), what="binary turned text", ix=ix)
        assert hits(cap, "echidna") == {uri(root / "ok.txt") + "#0", uri(root / "blob.dat") + "#0"}
        messages = [r.getMessage() for r in caplog.records if r.name == "memvidd.tree"]
        assert sum("blob.dat" in m and "reason=binary" in m for m in messages) == 1, messages
        assert sum("big.txt" in m and "larger than 1000 bytes" in m for m in messages) == 1, messages
        assert sum("flip.txt" in m and "reason=binary" in m for m in messages) == 1, messages
        assert ix.progress.errors == 0


# -- start-up reconciliation ------------------------------------------------------------------


@pytest.mark.trio
async def test_restart_processes_exactly_what_changed_while_stopped(tmp_path):
    root = mkroot(tmp_path)
    n = 40
    files = {root / f"d{i % 4}" / f"f{i:02d}.md": f"# File {i}\n\nbody of file {i} mentions kiwi{i}\n" for i in range(n)}
    for p, text in files.items():
        write(p, text)
    async with watching(tmp_path, root) as ix:
        await until(lambda: len(ix.docs) == n and not ix.pending and ix.progress.files_indexed == n, ix=ix)
        assert ix.progress.files_to_index == n and ix.progress.bytes_read == sum(len(t) for t in files.values())

    # While stopped: edit one, add one, delete one, rename one.
    edited, deleted, renamed = root / "d1" / "f05.md", root / "d2" / "f06.md", root / "d3" / "f07.md"
    added, renamed_to = root / "d0" / "new.md", root / "d0" / "f07-renamed.md"
    edited.write_text("# File 5\n\nrewritten while the indexer was down: mango\n")
    write(added, "# New\n\nadded while down: papaya\n")
    deleted.unlink()
    os.rename(renamed, renamed_to)

    async with watching(tmp_path, root) as ix:
        cap = ix.svc.cap
        await until(lambda: ix.progress.phase == "watching" and not ix.pending and ix.progress.files_indexed == 5
                    and ix.progress.files_deleted == 2, ix=ix)
        p = ix.progress
        # Queued: the edited, added and renamed files, and the two that vanished (deleted, renamed away).
        assert (p.files_seen, p.files_to_index, p.files_indexed, p.files_deleted) == (n, 5, 5, 2)
        assert p.files_unchanged == n - 3, "every other file is recognised by size and mtime"
        assert p.bytes_read == sum(x.stat().st_size for x in (edited, added, renamed_to)), "no unchanged file was read"
        assert p.errors == 0 and len(ix.docs) == n
        assert hits(cap, "mango") == {uri(edited) + "#0"} and hits(cap, "papaya") == {uri(added) + "#0"}
        assert hits(cap, "kiwi7") == {uri(renamed_to) + "#0"} and hits(cap, "kiwi6") == set()
        assert_matches_tree(cap, [Tree(root)])


# -- faults --------------------------------------------------------------------------------


@pytest.mark.trio
async def test_an_unreadable_file_is_skipped_and_indexed_once_readable(tmp_path, caplog):
    if os.geteuid() == 0:
        pytest.skip("root reads a chmod 000 file anyway (see the create-and-delete test)")
    caplog.set_level(logging.INFO, logger="memvidd")
    root = mkroot(tmp_path)
    locked = write(root / "locked.txt", "locked dugong\n")
    locked.chmod(0)
    write(root / "open.txt", "open dugong\n")
    try:
        async with watching(tmp_path, root) as ix:
            cap = ix.svc.cap
            await until(lambda: hits(cap, "dugong") == {uri(root / "open.txt") + "#0"} and not ix.pending, ix=ix)
            assert ix.progress.files_skipped == 1 and ix.progress.errors == 0
            assert any("locked.txt" in r.getMessage() and "unreadable" in r.getMessage() for r in caplog.records)
            locked.chmod(0o644)
            await until(lambda: uri(locked) + "#0" in hits(cap, "dugong"), ix=ix)
    finally:
        locked.chmod(0o644)


@pytest.mark.trio
async def test_files_created_and_deleted_at_once_leave_nothing(tmp_path):
    root = mkroot(tmp_path)
    async with watching(tmp_path, root) as ix:
        cap = ix.svc.cap
        for i in range(50):  # gone before the indexer gets to read them
            p = write(root / f"brief{i}.txt", f"ephemeral gecko {i}\n")
            p.unlink()
        write(root / "stays.txt", "a gecko that stays\n")
        await until(lambda: hits(cap, "gecko") == {uri(root / "stays.txt") + "#0"} and not ix.pending, ix=ix)
        assert ix.progress.errors == 0
        assert_matches_tree(cap, [Tree(root)])


@pytest.mark.trio
async def test_special_files_are_not_documents_and_do_not_block(tmp_path):
    root = mkroot(tmp_path)
    os.mkfifo(root / "early.txt")  # opening a FIFO for reading would block
    write(root / "ok.txt", "an ordinary okapi\n")
    async with watching(tmp_path, root) as ix:
        cap = ix.svc.cap
        await until(lambda: hits(cap, "okapi") and not ix.pending, ix=ix)
        os.mkfifo(root / "late.txt")
        write(root / "later.txt", "a later okapi\n")
        await until(lambda: uri(root / "later.txt") + "#0" in hits(cap, "okapi") and not ix.pending, ix=ix)
        assert {f.uri for f in live(cap) if f.kind == FILE_KIND} == {uri(root / "ok.txt"), uri(root / "later.txt")}
        assert ix.progress.errors == 0


@pytest.mark.trio
async def test_a_renamed_directory_rehomes_all_its_files(tmp_path):
    root = mkroot(tmp_path)
    for i in range(20):
        write(root / "old" / f"s{i % 3}" / f"f{i}.txt", f"ibis number {i}\n")
    write(root / "other.txt", "an ibis elsewhere\n")
    async with watching(tmp_path, root) as ix:
        cap = ix.svc.cap
        await until(lambda: len(hits(cap, "ibis")) == 21, ix=ix)
        os.rename(root / "old", root / "new")
        want = {uri(root / "new" / f"s{i % 3}" / f"f{i}.txt") + "#0" for i in range(20)} | {uri(root / "other.txt") + "#0"}
        await until(lambda: hits(cap, "ibis") == want, what="all files re-homed", ix=ix)
        assert ix.progress.files_deleted == 20 and ix.progress.errors == 0
        assert_matches_tree(cap, [Tree(root)])
        # the renamed directory is still watched
        (root / "new" / "s0" / "f0.txt").write_text("ibis number 0 edited: heron\n")
        write(root / "new" / "s1" / "added.txt", "a heron arrives\n")
        await until(lambda: hits(cap, "heron") == {uri(root / "new" / "s0" / "f0.txt") + "#0",
                                                   uri(root / "new" / "s1" / "added.txt") + "#0"}, ix=ix)
        assert_matches_tree(cap, [Tree(root)])
        # moved out of the root: its files are removed; moved in from outside: indexed
        outside = mkroot(tmp_path, "outside")
        os.rename(root / "new" / "s2", outside / "s2")
        write(outside / "incoming" / "x" / "in.txt", "an incoming ibis\n")
        os.rename(outside / "incoming", root / "incoming")
        want = {uri(root / "new" / f"s{i % 3}" / f"f{i}.txt") + "#0" for i in range(20) if i % 3 != 2} | {
            uri(root / "other.txt") + "#0", uri(root / "incoming" / "x" / "in.txt") + "#0"}
        await until(lambda: hits(cap, "ibis") == want, what="moved out and in", ix=ix)
        assert_matches_tree(cap, [Tree(root)])


@pytest.mark.trio
async def test_a_root_that_disappears_and_comes_back_is_rescanned(tmp_path):
    root = mkroot(tmp_path)
    write(root / "a.txt", "first life of the tapir\n")
    write(root / "d" / "b.txt", "another tapir\n")
    async with watching(tmp_path, root) as ix:
        cap = ix.svc.cap
        await until(lambda: len(hits(cap, "tapir")) == 2, ix=ix)
        stop = ix.stop
        shutil.rmtree(root)
        await until(lambda: not hits(cap, "tapir"), what="the root's files removed", ix=ix)
        await until(stop.is_set, timeout=5, what="the indexer noticing the root is gone", ix=ix)
        root.mkdir()
        write(root / "a.txt", "second life of the tapir\n")
        write(root / "c.txt", "a new tapir\n")
        await until(lambda: hits(cap, "tapir") == {uri(root / "a.txt") + "#0", uri(root / "c.txt") + "#0"},
                    timeout=10, what="the root rescanned", ix=ix)
        write(root / "d.txt", "a tapir seen by the new watch\n")
        await until(lambda: uri(root / "d.txt") + "#0" in hits(cap, "tapir"), ix=ix)
        assert_matches_tree(cap, [Tree(root)])


@pytest.mark.trio
async def test_a_root_replaced_at_once_is_watched_again(tmp_path):
    root = mkroot(tmp_path)
    write(root / "a.txt", "old tapir\n")
    async with watching(tmp_path, root) as ix:
        cap = ix.svc.cap
        await until(lambda: hits(cap, "tapir"), ix=ix)
        shutil.rmtree(root)
        root.mkdir()
        write(root / "b.txt", "new tapir\n")
        # (b.txt may be found: the late 'root deleted' event sees a directory and scans it)
        await until(lambda: hits(cap, "tapir") == {uri(root / "b.txt") + "#0"}, timeout=3, ix=ix)
        write(root / "c.txt", "a tapir created in the new root\n")
        await until(lambda: uri(root / "c.txt") + "#0" in hits(cap, "tapir"), timeout=2,
                    what="BUG: the new root is not watched", ix=ix)


@pytest.mark.trio
async def test_ten_thousand_small_files_at_once(tmp_path):
    root = mkroot(tmp_path)
    n = 10_000

    def create() -> None:
        for d in range(10):
            (root / f"batch{d}").mkdir()
        for i in range(n):
            (root / f"batch{i % 10}" / f"n{i:05d}.txt").write_text(f"small file {i} token{i}\n")

    async with watching(tmp_path, root) as ix:
        cap = ix.svc.cap
        t0 = time.monotonic()
        await trio.to_thread.run_sync(create)
        await until(lambda: len(ix.docs) == n and not ix.pending, timeout=90, what=f"{n} documents", ix=ix)
        await until(lambda: cap.stats()["live_frames"] == 2 * n, timeout=10, ix=ix)
        elapsed = time.monotonic() - t0
        stats = cap.stats()
        assert stats["live_uris"] == 2 * n and stats["pending_frames"] == 0
        assert ix.progress.errors == 0
        for i in (0, 4321, n - 1):
            assert hits(cap, f"token{i}") == {uri(root / f"batch{i % 10}" / f"n{i:05d}.txt") + "#0"}
        files = [f for f in live(cap) if f.kind == FILE_KIND]
        assert len(files) == n and len({f.uri for f in files}) == n
        print(f"10k files indexed in {elapsed:.1f}s ({n / elapsed:.0f} files/s)")


@pytest.mark.trio
async def test_non_utf8_file_names_and_contents(tmp_path):
    root = mkroot(tmp_path)
    broot = os.fsencode(root)
    name = os.path.join(broot, b"caf\xe9.txt")
    with open(name, "wb") as f:
        f.write(b"du caf\xe9 au lait: marmot\n")
    write(root / "latin1.txt", "Gr\u00fc\u00dfe aus K\u00f6ln, marmot\n".encode("latin-1"))
    async with watching(tmp_path, root) as ix:
        cap = ix.svc.cap
        await until(lambda: len(hits(cap, "marmot")) == 2 and not ix.pending, ix=ix)
        u = uri(name)
        assert u == "file://" + str(root) + "/caf%E9.txt", "non-UTF-8 bytes are percent-encoded"
        assert u.isascii() and uri_path(u) == os.fsdecode(name)
        assert hits(cap, "marmot") == {u + "#0", uri(root / "latin1.txt") + "#0"}
        assert cap.get(uri=chunk_at(cap, name)).text == "du caf\ufffd au lait: marmot\n"
        assert cap.get(uri=chunk_at(cap, root / "latin1.txt")).text == "Gr\ufffd\ufffde aus K\ufffdln, marmot\n"
        assert manifest(cap, name).sha == hashlib.blake2b(b"du caf\xe9 au lait: marmot\n", digest_size=16).digest()
        assert ix.progress.errors == 0
        # (the watcher is dead by now: test_a_non_utf8_file_name_does_not_stop_the_watcher)


@pytest.mark.trio
async def test_a_non_utf8_file_name_does_not_stop_the_watcher(tmp_path):
    root = mkroot(tmp_path)
    name = os.path.join(os.fsencode(root), b"caf\xe9.txt")
    with open(name, "wb") as f:
        f.write(b"a marmot with a latin-1 name\n")
    async with watching(tmp_path, root) as ix:
        cap = ix.svc.cap
        await until(lambda: hits(cap, "marmot") == {uri(name) + "#0"}, ix=ix)
        write(root / "later.txt", "a later marmot\n")
        await until(lambda: uri(root / "later.txt") + "#0" in hits(cap, "marmot"), timeout=2,
                    what="BUG: a later change is not seen (the watcher died)", ix=ix)


@pytest.mark.trio
async def test_a_non_utf8_file_name_created_while_watching(tmp_path):
    root = mkroot(tmp_path)
    async with watching(tmp_path, root) as ix:
        cap = ix.svc.cap
        name = os.path.join(os.fsencode(root), b"caf\xe9.txt")
        with open(name, "wb") as f:
            f.write(b"a marmot with a latin-1 name\n")
        await until(lambda: hits(cap, "marmot") == {uri(name) + "#0"}, timeout=2,
                    what="BUG: the file is not indexed (the watcher died)", ix=ix)
        os.unlink(name)
        write(root / "plain.txt", "an ordinary marmot\n")
        await until(lambda: hits(cap, "marmot") == {uri(root / "plain.txt") + "#0"}, timeout=2, ix=ix)


@pytest.mark.trio
async def test_non_utf8_file_name_of_a_code_file(tmp_path):
    root = mkroot(tmp_path)
    name = os.path.join(os.fsencode(root), b"caf\xe9.py")
    with open(name, "wb") as f:
        f.write(b"def marmot():\n    return 1\n")
    async with watching(tmp_path, root) as ix:
        cap = ix.svc.cap
        await until(lambda: hits(cap, "marmot") == {uri(name) + "#0"}, timeout=2,
                    what="BUG: the file is never indexed (its titles are refused)", ix=ix)


def grow(path: Path, seconds: float = 0.5) -> None:
    """Append lines to ``path`` for ``seconds``: a log being written while it is read."""
    end = time.monotonic() + seconds
    i = 0
    with open(path, "a") as f:
        while time.monotonic() < end:
            f.write(f"appended line {i} " + "y" * 200 + "\n")
            f.flush()
            i += 1
            time.sleep(0.001)
        f.write("the final line: capybara\n")


@pytest.mark.trio
async def test_a_file_that_grows_while_it_is_read(tmp_path):
    root = mkroot(tmp_path)
    path = write(root / "growing.txt", "start of the log\n")
    async with watching(tmp_path, root) as ix:
        cap = ix.svc.cap
        await until(lambda: hits(cap, "start"), ix=ix)
        await trio.to_thread.run_sync(grow, path)
        final = path.read_bytes()
        # Every committed version is a state the file really had (a prefix of its final
        # content), with the chunks of that state: never a torn read.
        # The growth is indexed (possibly after the writer closed the file: a file open
        # for writing is waited for), as at least one version after the first.
        await until(lambda: len(versions(cap, uri(path))) >= 2, what="a version after the growth", ix=ix)
        await until(lambda: not ix.pending and not ix.svc._queue, ix=ix)
        file_versions = versions(cap, uri(path))
        for v in file_versions:
            m = msgspec.msgpack.decode(v.payload, type=Manifest)
            prefix = final[: m.size]
            assert m.sha == hashlib.blake2b(prefix, digest_size=16).digest(), "a torn read was committed"
            assert [cap.get(fid).text for _, fid in m.chunks] == expected_chunks(path, prefix)
        # Once the writer is done, a last append is indexed (without this nudge the final
        # content can be lost: test_a_change_during_the_read_of_the_previous_one_is_not_lost).
        with open(path, "a") as f:
            f.write("one more line after the burst\n")
        final = path.read_bytes()
        await until(lambda: indexed_as(cap, path, final), what="the final content", ix=ix)
        assert ix.progress.errors == 0
        assert_matches_tree(cap, [Tree(root)])


@pytest.mark.trio
async def test_a_file_that_grows_while_it_is_read_ends_with_its_final_content(tmp_path):
    root = mkroot(tmp_path)
    path = write(root / "growing.txt", "start of the log\n")
    async with watching(tmp_path, root) as ix:
        cap = ix.svc.cap
        await until(lambda: hits(cap, "start"), ix=ix)
        await trio.to_thread.run_sync(grow, path)
        final = path.read_bytes()
        await until(lambda: indexed_as(cap, path, final), timeout=5, what="the final content", ix=ix)


# -- races and the life cycle (known bugs) -------------------------------------------------------


@pytest.mark.trio
async def test_cancelling_the_indexer_stops_its_watcher_thread(tmp_path):
    root = mkroot(tmp_path)
    cap = open_capsule(tmp_path)
    svc = CapsuleService("test", cap)
    ix = IngestPipeline(svc, [Tree(root)], debounce_ms=20)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(svc.serve_committer)
            await nursery.start(ix.run)
            assert len(watch_threads()) == 1
            nursery.cancel_scope.cancel()  # what the daemon does when a capsule is removed (SIGHUP)
        await until(lambda: not watch_threads(), timeout=2, what="BUG: the watcher thread to end")
    finally:
        ix.stop.set()  # clean up for the leak check
        with trio.move_on_after(5):
            while watch_threads():
                await trio.sleep(0.01)
        cap.close()
        await index_threads_gone()


@pytest.mark.trio
async def test_a_change_during_the_read_of_the_previous_one_is_not_lost(tmp_path):
    root = mkroot(tmp_path)
    path = write(root / "doc.txt", "version one: walrus\n")
    async with watching(tmp_path, root) as ix:
        cap = ix.svc.cap
        await until(lambda: hits(cap, "walrus"), ix=ix)
        reading, release = threading.Event(), threading.Event()
        events: list[str] = []
        prepare, on_change = ix._prepare, ix._on_change

        def slow_prepare(p: str, attempt: int) -> Any:
            out = prepare(p, attempt)
            if p == str(path) and not release.is_set():
                reading.set()
                release.wait(10)  # a slow read: the file changes again meanwhile
            return out

        def record(change: Any, p: str) -> None:
            events.append(p)
            on_change(change, p)

        ix._prepare, ix._on_change = slow_prepare, record  # type: ignore[method-assign]
        try:
            path.write_text("version two: seal\n")
            await until(reading.is_set, ix=ix)
            events.clear()
            path.write_text("version three: otter\n")
            await until(lambda: str(path) in events, what="the watcher reporting the third version", ix=ix)
        finally:
            release.set()
        await until(lambda: indexed_as(cap, path, "version three: otter\n"), timeout=2,
                    what="BUG: the third version is not indexed", ix=ix)


@pytest.mark.trio
async def test_a_same_size_rewrite_within_one_timestamp_tick_is_indexed(tmp_path):
    root = mkroot(tmp_path)
    path = write(root / "doc.txt", "version A: lemur\n")
    async with watching(tmp_path, root) as ix:
        cap = ix.svc.cap
        await until(lambda: hits(cap, "lemur"), ix=ix)
        st = path.stat()
        tmp = write(root / "doc.txt.tmp", "version B: loris\n")  # the same size...
        os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))  # ...and the same mtime (one tick)
        os.replace(tmp, path)
        await until(lambda: hits(cap, "loris"), timeout=2, what="BUG: the rewrite is not indexed", ix=ix)


@pytest.mark.trio
async def test_a_delete_racing_the_commit_of_the_add_leaves_no_ghost(tmp_path):
    root = mkroot(tmp_path)
    async with watching(tmp_path, root) as ix:
        cap, svc = ix.svc.cap, ix.svc
        gate = trio.Event()
        commit = svc.commit_queued

        async def gated() -> None:
            await gate.wait()  # a slow fsync
            await commit()

        events: list[str] = []
        on_change = ix._on_change

        def record(change: Any, p: str) -> None:
            events.append(p)
            on_change(change, p)

        ix._on_change = record  # type: ignore[method-assign]
        svc.commit_queued = gated  # type: ignore[method-assign]
        ghost = write(root / "ghost.txt", "a short-lived tarsier\n")
        await until(lambda: svc._queue, what="the add prepared and submitted", ix=ix)
        await until(lambda: not ix.pending, ix=ix)
        queued = len(svc._queue)
        events.clear()
        ghost.unlink()
        after = write(root / "after.txt", "a later tarsier\n")
        await until(lambda: str(ghost) in events and str(after) in events and not ix.pending
                    and len(svc._queue) > queued, what="the delete seen and prepared, the later file submitted", ix=ix)
        gate.set()
        await until(lambda: hits(cap, "later"), ix=ix)
        await until(lambda: hits(cap, "tarsier") == {uri(root / "after.txt") + "#0"}, timeout=2,
                    what="BUG: the deleted file is still live", ix=ix)


# -- the daemon, killed during its initial scan ---------------------------------------------------

DAEMON_CONFIG = """
[daemon]
socket = "{dir}/q.sock"
events-socket = "{dir}/e.sock"
log-level = "info"
shutdown-grace-s = 20

[embedding]
model = "none"

[[capsule]]
name = "default"
path = "{dir}/default.mv2"
watch = ["{tree}"]
"""


def test_daemon_killed_during_the_initial_scan_resumes(tmp_path):
    tree = mkroot(tmp_path, "tree")
    n = 3000
    para = "".join(f"Paragraph {k} of a note about the jackal and the dunes.\n\n" for k in range(30))
    for i in range(n):
        write(tree / f"dir{i % 30:02d}" / f"note{i:04d}.md", f"# Note {i}\n\nunique{i}\n\n{para}")
    run = tmp_path / "run"
    run.mkdir()

    def start() -> DaemonProc:
        d = DaemonProc(run)
        d.config.write_text(DAEMON_CONFIG.format(dir=run, tree=tree))
        return d.start()

    def indexer_stats(d: DaemonProc) -> dict[str, Any]:
        with Client(d.socket) as c:
            return c.stats()["indexer"]

    d = start()
    try:
        deadline = time.monotonic() + 60
        while (s := indexer_stats(d))["files_indexed"] < 200:
            assert time.monotonic() < deadline, s
            time.sleep(0.005)
        d.kill()
    finally:
        d.close()
    assert s["files_indexed"] < n, "killed too late: the initial scan had finished"

    with engine.open(run / "default.mv2", readonly=True) as cap:
        survived = sum(1 for f in live(cap) if f.kind == FILE_KIND)
    assert 0 < survived < n
    print(f"killed at files_indexed={s['files_indexed']}, {survived} files committed")

    d = start()
    try:
        deadline = time.monotonic() + 90
        while True:
            s = indexer_stats(d)
            if s["documents"] == n and s["queued"] == 0 and s["phase"] == "watching":
                break
            assert time.monotonic() < deadline, s
            time.sleep(0.05)
        assert s["files_unchanged"] == survived and s["files_to_index"] == n - survived, "it resumes"
        assert s["errors"] == 0
        assert d.stop() == 0
    finally:
        d.close()

    with engine.open(run / "default.mv2", readonly=True) as cap:
        frames = live(cap)
        per_file = Counter(f.parent for f in frames if f.kind == CHUNK_KIND)
        files = [f for f in frames if f.kind == FILE_KIND]
        assert len(files) == n and len({f.uri for f in files}) == n, "one live version per file"
        for f in files:
            m = msgspec.msgpack.decode(cap.get(f.id).payload, type=Manifest)
            assert per_file[f.uri] == len(m.chunks), f"{f.uri}: {per_file[f.uri]} live chunks, manifest has {len(m.chunks)}"
        assert sum(per_file.values()) == len(frames) - n
        chunk_uris = [f.uri for f in frames if f.kind == CHUNK_KIND]
        assert len(chunk_uris) == len(set(chunk_uris)), "duplicate chunk frames"
        assert_matches_tree(cap, [Tree(tree)])
