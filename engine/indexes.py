"""The search indexes of a capsule: the two indexes, their working copies and caches.

``Indexes`` keeps the lexical (Tantivy) and semantic (USearch) indexes of one open
capsule current and answers their lookups for ``engine/query.py``, which runs ``find``.
Both are derived data:

- their working copies live in a cache directory keyed by the capsule id and path, with
  a ``state.json`` recording which commit each one covers and that commit's fingerprint,
  so a copy from another history is never trusted; the lexical one in RAM-backed
  storage, held and reclaimed as ``engine/ramcopies.py`` says;
- the lexical index's files are also copied into the capsule at checkpoints, so a lost
  working copy is restored, not rebuilt; vectors are stored in the capsule as they are
  committed and the graph is rebuilt from them when its working copy is missing;
- on open, each index is caught up with the commits made after the point it covers.

Ranking here: BM25 (AND of the terms, OR when AND finds fewer than k) and cosine over
the HNSW graph; fusing the two is the query's business.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from hashlib import sha1
from pathlib import Path
from typing import Any

import numpy as np

from . import ramcopies
from .cache import LRUCache
from .embed import cache_root
from .errors import InvalidArgument
from .format import PUT, FrameMeta
from .lexical import SCHEMA_VERSION, Filters, LexIndex
from .ramcopies import Claim, ram_root
from .table import FrameTable
from .vectors import VecIndex

_serial = itertools.count()


def fingerprint(table: FrameTable, seq: int) -> list[Any]:
    """Identifies commit ``seq`` of this very history (not just its number)."""
    if seq == 0:
        return [0]
    c = table.commits[seq - 1]
    return [seq, c.offset, c.time]


class Indexes:
    def __init__(
        self,
        *,
        capsule_id: bytes,
        path: str,
        readonly: bool,
        dim: int | None,
        cache_dir: str | None,
        result_cache_bytes: int,
        block_cache_bytes: int,
        ephemeral: bool = False,
    ) -> None:
        self.readonly = readonly
        self.dim = dim
        self.ephemeral = ephemeral
        key = f"{capsule_id.hex()}-{sha1(os.path.realpath(path).encode()).hexdigest()[:10]}"
        self.root = Path(cache_dir) if cache_dir else cache_root() / "index"
        self._ram = ram_root()
        self._in_ram = in_ram = self._ram != cache_root()
        # Readers' private copies: in RAM-backed storage, beside (not among) shared ones.
        self._private_root = self._ram / ramcopies.PRIVATE if in_ram and (ephemeral or not cache_dir) \
            else Path(cache_dir or self.root) / "tmp"
        if ephemeral:
            # Encrypted capsules [F-19]: their decrypted index files live in RAM-backed
            # storage only, only while open (this process's own copy, removed on close;
            # copies left by a killed process are removed by the next reclaim).
            if not in_ram:
                raise InvalidArgument("an encrypted capsule needs RAM-backed storage for its search "
                                      "indexes ($XDG_RUNTIME_DIR or /dev/shm); found neither")
            cache_dir = str(self._ram / ramcopies.SEALED)
            self.root = Path(cache_dir)
            key = f"{key}-{os.getpid()}-{next(_serial)}"
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.home = self.root / key  # the shared working copies of this capsule
        # The lexical copy goes to RAM-backed storage by default: Tantivy fsyncs every
        # file at each commit, which made a fresh save wait ~130 ms (p50, busy disk) to be
        # searchable against ~4 ms in RAM; losing it on reboot costs a restore from the
        # capsule's own copy, not a rebuild. The vector graph stays on disk: rebuilding
        # it is the expensive one.
        self.ram_root = Path(cache_dir) if cache_dir else self._ram / ramcopies.SHARED
        self.ram_root.mkdir(mode=0o700, parents=True, exist_ok=True)  # index files show content
        self.lex_home = self.ram_root / key
        # Held while open, so that no reclaim removes it; a shared copy names its capsule,
        # so that one whose capsule moved away is reclaimed.
        self._claim = Claim(self.lex_home, None if ephemeral else os.path.realpath(path))
        self._private: Path | None = None  # a reader's own copy, when the shared one lags
        self._private_claim: Claim | None = None
        self._stored_lex: tuple[dict[str, Any] | None, Callable[[int, int], bytes]] = (None, lambda o, n: b"")
        self.lex: LexIndex | None = None
        self.vec: VecIndex | None = None
        self.lex_seq = 0  # commit the lexical index covers
        self.vec_seq = 0
        self.lock = threading.RLock()  # guards index mutation against concurrent searches
        self.results = LRUCache(result_cache_bytes, size=lambda h: 512 + 400 * len(h))
        self.query_vectors = LRUCache(8 << 20, size=lambda v: 2000)
        self.blocks = LRUCache(block_cache_bytes, size=len)
        self.recent: Counter[tuple[Any, ...]] = Counter()
        self.timings: dict[str, float] = {}
        self.origin: dict[str, str] = {}  # per index: "working-copy", "capsule" or "rebuilt"
        self._reclaim()

    # -- working copies ---------------------------------------------------------------

    def _reclaim(self) -> None:
        if self._in_ram:  # (else there is no RAM-backed storage, and nothing of ours there)
            ramcopies.reclaim_all(self._ram)

    def _state(self) -> dict[str, Any]:
        try:
            return json.loads((self.home / "state.json").read_text())
        except (OSError, ValueError):
            return {}

    def discard_working_copies(self) -> None:
        for d in (self.home, self.lex_home):  # all but the lock and owner files: still held
            for p in d.iterdir() if d.is_dir() else ():
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                elif p.name not in (ramcopies.LOCK, ramcopies.OWNER):
                    p.unlink(missing_ok=True)

    def _write_state(self, table: FrameTable) -> None:
        if self.readonly:
            return
        state = {
            "schema": SCHEMA_VERSION,
            "lex": {"seq": self.lex_seq, "fingerprint": fingerprint(table, self.lex_seq)},
            "vec": {"seq": self.vec_seq, "fingerprint": fingerprint(table, self.vec_seq), "dim": self.dim},
        }
        self.home.mkdir(parents=True, exist_ok=True)
        tmp = self.home / "state.json.tmp"
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.home / "state.json")

    @staticmethod
    def _trusted(entry: dict[str, Any], table: FrameTable) -> int | None:
        """The seq a working copy covers, if it belongs to this history."""
        seq = entry.get("seq")
        if not isinstance(seq, int) or not 0 <= seq <= table.seq:
            return None
        return seq if entry.get("fingerprint") == fingerprint(table, seq) else None

    def attach(
        self,
        table: FrameTable,
        text_of: Callable[[FrameMeta], str],
        lex_files: dict[str, Any] | None,
        read_file: Callable[[int, int], bytes],
        all_vectors: Callable[[], tuple[list[int], np.ndarray]],
        vectors_since: Callable[[int], tuple[list[int], np.ndarray]],
    ) -> None:
        """Open or restore both working copies and catch them up with the capsule."""
        t0 = time.perf_counter()
        state = self._state()
        if state.get("schema") != SCHEMA_VERSION:
            state = {}
        self._attach_lex(table, text_of, state.get("lex", {}), lex_files, read_file)
        t1 = time.perf_counter()
        if self.dim:
            self._attach_vec(table, state.get("vec", {}), all_vectors, vectors_since)
        self.timings = {"lex_attach_s": round(t1 - t0, 4), "vec_attach_s": round(time.perf_counter() - t1, 4)}
        self._write_state(table)

    def _attach_lex(
        self,
        table: FrameTable,
        text_of: Callable[[FrameMeta], str],
        entry: dict[str, Any],
        lex_files: dict[str, Any] | None,
        read_file: Callable[[int, int], bytes],
    ) -> None:
        shared = self.lex_home / "lex"
        seq = self._trusted(entry, table) if shared.is_dir() else None
        stored = lex_files if lex_files and lex_files.get("schema") == SCHEMA_VERSION \
            and self._trusted(lex_files, table) is not None else None
        if stored is not None and (seq is None or stored["seq"] > seq):
            seq = None  # the capsule's own copy is newer than the cache: restore it
        self._stored_lex = (stored, read_file)
        if self.readonly and seq != table.seq:
            # Readers never write the shared copy (a writer may own it, and copying it
            # while Tantivy merges would race): build a private one from the capsule.
            target = self._new_private()
            seq = None
        else:
            target = shared
        self.origin["lex"] = "working-copy"
        if seq is None:
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
            seq = 0
            self.origin["lex"] = "rebuilt"
            if stored is not None:
                for name, (offset, length) in stored["files"].items():
                    (target / name).write_bytes(read_file(offset, length))
                seq = stored["seq"]
                self.origin["lex"] = "capsule"
        self.lex = LexIndex(target)
        self.lex_seq = seq
        self._catch_up_lex(table, text_of)

    def _new_private(self) -> Path:
        """A new private copy's directory, held (the index goes in its ``lex``)."""
        self._private_root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._private = Path(tempfile.mkdtemp(prefix="lex-", dir=self._private_root))
        self._private_claim = Claim(self._private)
        return self._private / "lex"

    def _catch_up_lex(self, table: FrameTable, text_of: Callable[[FrameMeta], str]) -> None:
        lex, since = self.lex, self.lex_seq
        assert lex is not None
        if since >= table.seq:
            return
        start = table.first_after(since)
        for m in table.frames[start:]:
            if m.op == PUT and m.is_text:
                lex.add(m, text_of(m), table.ended_at(m.id))
            if m.supersedes is not None:  # an older frame that ended after `since`
                old = table.frames[m.supersedes]
                if old.seq <= since and old.op == PUT and old.is_text:
                    lex.set_end(old, text_of(old), m.seq)
        self.lex_seq = table.seq

    def _attach_vec(
        self,
        table: FrameTable,
        entry: dict[str, Any],
        all_vectors: Callable[[], tuple[list[int], np.ndarray]],
        vectors_since: Callable[[int], tuple[list[int], np.ndarray]],
    ) -> None:
        assert self.dim
        path = self.home / "vec.usearch"
        seq = self._trusted(entry, table) if entry.get("dim") == self.dim else None
        vec = VecIndex.load(path, self.dim) if seq is not None and path.exists() else None
        if vec is None:
            vec = VecIndex(self.dim)
            ids, vectors = all_vectors()
            self.origin["vec"] = "rebuilt"
        else:
            ids, vectors = vectors_since(seq)  # type: ignore[arg-type]
            self.origin["vec"] = "working-copy"
        vec.add(ids, vectors)
        self.vec = vec
        self.vec_seq = table.seq

    # -- keeping current --------------------------------------------------------------

    def on_commit(self, table: FrameTable, frames: list[FrameMeta], texts: dict[int, str],
                  text_of: Callable[[FrameMeta], str]) -> None:
        if self.lex is None:
            return
        if self.readonly and self._private is None:
            self._go_private(table, text_of)
            self._catch_up_lex(table, text_of)  # covers `frames` too
            return
        lex = self.lex
        with self.lock:
            for m in frames:
                if m.op == PUT and m.is_text:
                    lex.add(m, texts[m.id] if m.id in texts else text_of(m), table.ended_at(m.id))
                if m.supersedes is not None:
                    old = table.frames[m.supersedes]
                    if old.op == PUT and old.is_text:
                        lex.set_end(old, text_of(old), m.seq)
            self.lex_seq = table.seq
            self.vec_seq = table.seq

    def _go_private(self, table: FrameTable, text_of: Callable[[FrameMeta], str]) -> None:
        """A reader's index must change: leave the shared copy, which it may not write,
        for a private one restored from the capsule and caught up."""
        target = self._new_private()
        target.mkdir()
        stored, read_file = self._stored_lex
        self.lex_seq = 0
        if stored is not None:
            for name, (offset, length) in stored["files"].items():
                (target / name).write_bytes(read_file(offset, length))
            self.lex_seq = stored["seq"]
        self.lex = LexIndex(target)

    def add_vectors(self, ids: list[int], vectors: np.ndarray) -> None:
        if self.vec is not None:
            with self.lock:
                self.vec.add(ids, vectors)

    def forget(self, ids: list[int]) -> None:
        """Frames expired: cached results may hold them. (They stay in the indexes, which
        queries filter, so that a query can say how many results expiry hid [F-24].)"""
        self.results.clear()

    def flush(self) -> None:
        if self.lex is not None and self.lex.dirty:
            with self.lock:
                self.lex.flush()

    def lex_files(self) -> list[Path]:
        assert self.lex is not None
        self.flush()
        return self.lex.files()

    def save(self, table: FrameTable) -> None:
        """Persist both working copies (at checkpoints and on close)."""
        if self.readonly:
            return
        self.flush()
        if self.vec is not None and self.vec.dirty:
            with self.lock:
                self.vec.save(self.home / "vec.usearch")
        self._write_state(table)

    def close(self, table: FrameTable | None) -> None:
        try:
            if table is not None and not self.readonly:
                self.save(table)
            if self.lex is not None:
                self.lex.close()
                self.lex = None
            if self._private is not None:
                shutil.rmtree(self._private, ignore_errors=True)
                self._private = None
            if self.ephemeral:
                self.discard_working_copies()
        finally:
            for claim in (self._claim, self._private_claim):
                if claim is not None:
                    claim.release()
        self._reclaim()

    # -- querying ---------------------------------------------------------------------

    def lexical(self, query: str, k: int, *, seq: int, head: bool, all_versions: bool,
                filters: Filters) -> tuple[list[tuple[float, int]], Any, list[str]]:
        assert self.lex is not None
        self.flush()
        return self.lex.search(query, k, seq=seq, head=head, all_versions=all_versions, filters=filters)

    def semantic(self, qvec: np.ndarray, k: int, accept: Callable[[int], bool]) -> list[tuple[float, int]]:
        if self.vec is None:
            return []
        with self.lock:
            return self.vec.search(qvec, k, accept)

    def stats(self) -> dict[str, Any]:
        return {
            "lexical": {"working_copy": str(self.lex.directory) if self.lex else None, "covers_seq": self.lex_seq},
            # All working copies in RAM-backed storage (this process's and others'): memory.
            "ram_copies": {"dir": str(self._ram), **ramcopies.usage(self._ram)} if self._in_ram else None,
            "semantic": {"vectors": len(self.vec) if self.vec else 0, "dim": self.dim},
            "caches": {
                "results": self.results.stats(),
                "query_vectors": self.query_vectors.stats(),
                "blocks": self.blocks.stats(),
            },
            "attach": {**self.timings, "origin": self.origin},
        }

