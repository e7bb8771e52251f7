"""The capsule: one open ``.mv2`` file and its public API.

``Capsule`` is a facade: it wires the parts that each own one concern around one shared
state (``engine/state.py``, guarded by one lock) and says, in ``_commit``, what a commit
sets off. The parts:

- ``appender``: the only writer of bytes (seal, append, fsync, header slot, cut tail);
- ``staging``: puts, removes and the commit that makes them durable [F-05];
- ``checkpoint``: tiered checkpoints [F-11]; ``upgrader``: codec upgrades [F-16];
- ``compact``: compaction and branches [F-17]; ``frames``: get, timeline, changes;
- ``query``: find over the search indexes; ``warming``: prefetch and cache re-warming;
- ``embed_queue``: the background embedding of text frames [F-14].
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import msgspec
import numpy as np

from . import codecs, crypto, retention, upgrade
from . import format as fmt
from .checkpoint import Checkpointer
from .compact import Compactor
from .embed import DEFAULT_MODEL, MODELS, Embedder
from .embed_queue import EmbeddingQueue
from .errors import CapsuleExists, InvalidArgument, NotFound
from .fileio import CapsuleFile, OsFile
from .frames import Frame, FrameInfo, Frames, Timeline
from .genesis import new_header, unlock, vec_binding
from .query import FindOptions, Hits, Query
from .reading import read_header
from .staging import MAX_PAYLOAD, Writer
from .state import CapsuleState, Options
from .upgrader import Upgrader
from .warming import Warmer

__all__ = ["MAX_PAYLOAD", "Capsule", "Frame", "FrameInfo", "Options", "Timeline", "create", "open"]


def _options(kw: Mapping[str, Any]) -> Options:
    try:
        return msgspec.convert(dict(kw), Options)
    except msgspec.ValidationError as e:
        raise InvalidArgument(f"bad capsule option: {e}") from None


def create(
    path: str | os.PathLike[str],
    *,
    model: str | None = DEFAULT_MODEL,
    embedder: Embedder | None = None,
    passphrase: str | bytes | None = None,
    kdf: crypto.KdfParams | None = None,
    file_factory: Any = None,
    **options: Any,
) -> Capsule:
    """Make a new, empty capsule at ``path``; ``CapsuleExists`` if anything is there.

    ``model`` binds the capsule to an embedding model (``None``: lexical search only);
    ``embedder`` is a loaded ``Embedder`` for that model, used to embed new text in the
    background and queries at search time. ``passphrase`` makes an encrypted capsule
    (``.mv2e`` by convention [F-19]); ``kdf`` overrides its Argon2id costs.
    """
    path = os.fspath(path)
    opts = _options(options)
    if model is not None and model not in MODELS:
        raise InvalidArgument(f"unknown model {model!r}; known: {sorted(MODELS)}")
    binding = {"vec": vec_binding(model)} if model else {}
    header, sealer, ckpt_raw = new_header(uuid.uuid4().bytes, binding, passphrase, kdf)
    slot = fmt.encode_header(header)
    initial = slot + slot + ckpt_raw  # both slots valid from the start [F-02]
    f = (file_factory or OsFile.create)(path, initial)
    f.sealer = sealer
    return Capsule(f, header, readonly=False, opts=opts, embedder=embedder)


def open(  # noqa: A001 - the public name the API promises
    path: str | os.PathLike[str],
    readonly: bool = False,
    *,
    embedder: Embedder | None = None,
    passphrase: str | bytes | None = None,
    file_factory: Any = None,
    **options: Any,
) -> Capsule:
    """Open an existing capsule. Writers lock it; readonly opens share it with a writer.
    Encrypted capsules need their ``passphrase``."""
    path = os.fspath(path)
    opts = _options(options)
    if not os.path.exists(path):
        raise NotFound(f"no capsule at {path}")
    f: CapsuleFile = (file_factory or OsFile.open)(path, readonly=readonly)
    try:
        if not readonly:
            f.lock()  # type: ignore[attr-defined]
        header = read_header(f)
        fmt.check_versions(header, readonly=readonly)
        unlock(f, header, passphrase)
        return Capsule(f, header, readonly=readonly, opts=opts, embedder=embedder)
    except BaseException:
        f.close()
        raise


class Capsule:
    """An open capsule. Thread-safe: one writer at a time inside, reads in parallel."""

    def __init__(
        self, f: CapsuleFile, header: fmt.Header, *, readonly: bool, opts: Options,
        embedder: Embedder | None = None,
    ) -> None:
        s = self._s = CapsuleState(f, header, readonly=readonly, opts=opts)
        self.path = s.path
        self.readonly = readonly
        self.capsule_id = s.capsule_id
        self.encrypted = s.encrypted
        self._writer = Writer(s)
        self._checkpointer = Checkpointer(s)
        self._upgrader = Upgrader(s, self._writer)
        self._query = Query(s)
        self._warmer = Warmer(s, self._query)
        self._frames = Frames(s, self._warmer)
        self._embedding = EmbeddingQueue(s, self._commit_if_idle)
        self._compactor = Compactor(s, self._writer, self._upgrader, self._checkpointer)
        try:
            s.load()
            if embedder is not None:
                self.attach_embedder(embedder)
        except BaseException:
            if s.views.current is not None:
                s.views.current.table.close()  # its spill file; the caller closes the capsule file
            raise

    @property
    def clock(self) -> Callable[[], float]:
        """What "now" is for expiry (tests move it)."""
        return self._s.clock

    @clock.setter
    def clock(self, clock: Callable[[], float]) -> None:
        self._s.clock = clock

    @property
    def model(self) -> str | None:
        """The embedding model this capsule is bound to (None: lexical search only)."""
        return self._s.vec["model"] if self._s.vec is not None else None

    @property
    def seq(self) -> int:
        """The last committed sequence number (0 for an empty capsule). Lock-free: an
        event loop may read it while a writer holds the capsule across an fsync."""
        return self._s.table.seq

    @property
    def frame_count(self) -> int:
        """Frames committed (every version, tombstones included). Lock-free, like ``seq``."""
        return self._s.table.next_id

    def attach_embedder(self, embedder: Embedder) -> None:
        """Embed with ``embedder`` from now on: queries, and (writers) every text frame
        without a vector yet, in the background. Lets a caller learn ``model`` first
        without opening the capsule twice."""
        s = self._s
        with s.lock:
            s.check_open()
            if s.embedder is not None:
                raise InvalidArgument("this capsule has an embedder already")
            if s.vec is not None and embedder.dim != s.vec["dim"]:
                raise InvalidArgument(f"embedder gives {embedder.dim} dims, capsule wants {s.vec['dim']}")
            s.embedder = embedder
            self._embedding.queue_unembedded(0)

    # -- writing [F-05] -------------------------------------------------------------------

    def put(self, data: str | bytes | bytearray | memoryview, **meta: Any) -> int:
        """Stage a frame; returns its id. Durable and visible after the next ``commit``.

        Keywords: ``uri``, ``title``, ``tags`` (str -> str), ``kind``, ``timestamp`` (the
        event's time), ``parent`` and ``chunk`` (a chunk of a document), ``vector``, and
        ``expires``. A ``uri`` that already has a live frame gets a new version that
        supersedes it. ``vector`` is the frame's embedding when the caller computed it
        already; text without one is embedded in the background when the capsule has an
        embedder. ``expires`` (a time, or a ``timedelta`` from now) is when the frame
        leaves every query for good [F-24].
        """
        return self._writer.put(data, **meta)

    def put_many(self, items: Iterable[Mapping[str, Any]]) -> list[int]:
        """``put`` each item (a dict with ``text`` or ``data`` plus put's keywords).

        All or nothing: if one item is refused, none of this call's items stay staged.
        """
        return self._writer.put_many(items)

    def atomic(self) -> contextlib.AbstractContextManager[None]:
        """Stage several puts and removes as one: if the block raises, none stays staged."""
        return self._writer.atomic()

    def remove(self, target: str | int) -> int:
        """Stage a tombstone for a live frame (by id) or a URI's live version.

        History keeps the old versions; as-of views before the removal still show them.
        Returns the tombstone's frame id.
        """
        return self._writer.remove(target)

    def commit(self) -> int:
        """Make every staged frame durable with one fsync; returns the commit sequence."""
        with self._s.lock:
            self._s.check_writable()
            return self._commit()

    def rollback(self) -> None:
        """Discard every staged, uncommitted frame."""
        with self._s.lock:
            self._s.check_writable()
            self._writer.rollback()

    def rewind(self, to: Any) -> int:
        """Make the state as of ``to`` (a commit seq or a time) the head again, with one
        new commit that records the rewind: frames added since are tombstoned, frames
        changed or removed since get a new version holding their content as of ``to``
        (same payload bytes, not copied). Nothing is destroyed: as-of views of the
        commits in between stay as they were. Returns the new commit's sequence."""
        s = self._s
        with s.lock:
            self._check_idle_writer("a rewind")
            target = s.resolve_as_of(to)
            self._writer.stage_rewind(target, self._query.vectors)
            return self._commit(rewind_to=target)

    def set_rules(self, rules: Mapping[str, Any] | retention.Rules, *, force: bool = False) -> int:
        """Replace the capsule's retention rules (see ``engine/retention.py``), recorded as a
        commit; returns its seq. Rules that would expire every live frame need ``force``."""
        parsed = retention.parse(rules)
        s = self._s
        with s.lock:
            self._check_idle_writer("changing rules")
            t = s.table
            trial = retention.Expiry()
            trial.reset(t, parsed, s.clock())
            live = set(t.timeline(t.seq, None, None, False))
            if live and live <= trial.expired and not force:
                raise InvalidArgument(f"these rules would expire all {len(live)} live frames; pass force=True "
                                      "if that is what you want")
            return self._commit(rules=retention.to_builtins(parsed))

    def rules(self, *, as_of: Any = None) -> dict[str, Any]:
        """The retention rules in force at ``as_of`` (default: now)."""
        s = self._s
        with s.lock:
            s.check_open()
            seq = s.resolve_as_of(as_of)
            current = [r for at, r in s.table.rule_changes if at <= seq]
            return retention.to_builtins(retention.parse(current[-1])) if current else {}

    def _check_idle_writer(self, what: str) -> None:
        self._s.check_writable()
        if self._writer.pending:
            raise InvalidArgument(f"commit or roll back staged frames before {what}")

    def _commit(self, *, rewind_to: int | None = None, rules: dict[str, Any] | None = None) -> int:
        """Commit (lock held), then what a commit sets off: the indexes take the new
        frames and vectors, caches re-warm, new text is queued for embedding, and the
        tail is checkpointed once it has grown enough."""
        s = self._s
        done = self._writer.commit(rewind_to=rewind_to, rules=rules)
        if done is None:
            return s.table.seq
        if s.indexes is not None:
            s.indexes.on_commit(s.table, done.frames, done.texts, s.text_of)
            if done.vectors is not None:
                s.indexes.add_vectors(done.vector_ids, done.vectors)
            self._warmer.rewarm()
        self._embedding.queue_unembedded(done.frames[0].id if done.frames else s.table.next_id)
        if self._checkpointer.due():
            self._checkpointer.try_checkpoint()
        return done.seq

    def _commit_if_idle(self) -> None:
        """The embedding thread's commit of its vectors, when no writer took them."""
        if not self._writer.pending and not self._s.app.broken:
            self._commit()

    def hand_vectors_to(self, ready: Callable[[], None] | None) -> None:
        """Leave vectors to the writer: from now on the embedding thread commits none
        itself. Embedded vectors wait (searchable already) for the next commit, whoever
        makes it, and ``ready()`` is called from the embedding thread each time some are
        waiting, so that a program with one writer (the daemon) commits them in its own
        writer slot. ``None``: the embedding thread commits them itself again."""
        with self._s.lock:
            self._embedding.hand_vectors_to(ready)

    def wait_embedded(self, timeout: float | None = None) -> bool:
        """Block until every queued frame has its vector; False on timeout or error."""
        return self._embedding.wait(timeout)

    def unembedded(self, seq: int) -> int:
        """How many text frames committed up to ``seq`` still wait for their vector: 0 once
        "vec" and "hybrid" finds see every one of them (always 0 when this capsule embeds
        nothing: no model bound, or no embedder attached). What a reader that wants to
        find its own writes by meaning waits for; costs a lookup, not a scan.
        ``EngineError`` when some wait and embedding failed: they will not get one while
        the capsule stays open."""
        s = self._s
        with s.lock:
            s.check_open()
            return self._embedding.waiting_below(s.table.first_after(seq))

    # -- maintenance --------------------------------------------------------------------

    def checkpoint(self) -> None:
        """Fold the tail into segments now (``commit`` does this by itself when due) [F-11]."""
        s = self._s
        with s.lock:
            self._check_idle_writer("a checkpoint")
            if s.table.seq > s.ckpt.seq:
                self._checkpointer.checkpoint()

    def refresh(self) -> int:
        """Readonly opens: pick up commits made since opening. Returns how many."""
        with self._s.lock:
            self._s.check_open()
            return self._s.catch_up()

    def upgrade_codecs(
        self, *, max_frames: int | None = None, cold_commits: int = 0, level: int = upgrade.LEVEL,
        batch_frames: int = 1024,
    ) -> dict[str, Any]:
        """Re-encode committed payloads into grouped, better-compressed blocks (see
        ``engine/upgrader.py``), oldest first, in batches of ``batch_frames`` frames, each
        one RELOCATE record and one fsync. Frames of the last ``cold_commits`` commits
        are left alone. The capsule lock is held only to write each batch, so puts and
        queries go on meanwhile; a batch that finds staged puts stops the run (``busy``)
        instead of waiting: ingest comes first. Returns what was done."""
        return self._upgrader.run(max_frames=max_frames, cold_commits=cold_commits, level=level,
                                  batch_frames=batch_frames)

    def rekey(self, old: str | bytes, new: str | bytes, *, kdf: crypto.KdfParams | None = None) -> None:
        """Change an encrypted capsule's passphrase: a new key slot wrapping the same data
        key, written to both header slots; no record is re-encrypted [F-19]."""
        s = self._s
        s.check_writable()
        if not s.encrypted:
            raise InvalidArgument(f"{self.path} is not encrypted (see memvidd encrypt)")
        slot = crypto.rekey(crypto.decode_keyslot(s.header.keyslot), old, new, s.capsule_id, params=kdf)
        with s.lock:
            s.check_writable()
            s.app.write_header(s.header.next(keyslot=crypto.encode_keyslot(slot)))
            s.app.write_header(s.header.next())  # the other slot too: the old passphrase is gone

    def compact(self, *, level: int = upgrade.LEVEL, cancel: threading.Event | None = None) -> dict[str, Any]:
        """Rewrite the capsule without its dead bytes, payloads upgraded, every frame,
        version and commit kept (see ``engine/compact.py``), and put the new file in
        place of the old atomically (rename, then directory fsync). Puts and queries go
        on while the bulk is copied; the capsule is locked only to copy the commits made
        meanwhile and to switch. Returns bytes before and after. Setting ``cancel`` stops
        the copy (``Cancelled``; the capsule is left as it was)."""
        return self._compactor.compact(level=level, cancel=cancel)

    def branch(
        self, path: str | os.PathLike[str], *, as_of: Any = None, passphrase: str | bytes | None = None,
        kdf: crypto.KdfParams | None = None, level: int = upgrade.LEVEL, origin: bool = True,
    ) -> dict[str, Any]:
        """A new capsule at ``path`` holding this one's history up to ``as_of`` (default:
        now), frames and vectors, its search indexes built, and its origin recorded in
        ``stats()["origin"]``. ``CapsuleExists`` if anything is at ``path``.

        The branch is encrypted when ``passphrase`` is given, plain otherwise, whatever
        this capsule is: ``memvidd encrypt`` / ``decrypt`` are branches of the head with
        ``origin=False``."""
        path = os.fspath(path)
        if os.path.lexists(path):
            raise CapsuleExists(f"{path} already exists")
        done = self._compactor.branch(path, as_of=as_of, passphrase=passphrase, kdf=kdf, level=level,
                                      origin=origin)
        with open(path, passphrase=passphrase, index_dir=self._s.opts.index_dir) as b:
            b.rebuild_indexes()
        return done

    # -- reading ------------------------------------------------------------------------

    def get(self, frame_id: int | None = None, *, uri: str | None = None, as_of: Any = None) -> Frame:
        """A frame by id, or the version of ``uri`` visible at ``as_of`` (default: now)."""
        return self._frames.get(frame_id, uri=uri, as_of=as_of)

    def timeline(
        self, *, since: Any = None, until: Any = None, limit: int = 100, reverse: bool = False,
        as_of: Any = None, kind: str | None = None,
    ) -> Timeline:
        """Frames visible at ``as_of`` ordered by event time, oldest first (or newest),
        of one ``kind`` if given. Expired frames are left out and counted in the result's
        ``expired``."""
        return self._frames.timeline(since=since, until=until, limit=limit, reverse=reverse, as_of=as_of,
                                     kind=kind)

    def changes(self, since_seq: int, *, after_id: int = -1, limit: int = 10_000) -> list[Frame]:
        """Frames (puts, with payload) created by the commits after ``since_seq``, oldest
        first: what a subscriber that saw ``since_seq`` has not seen yet. Page through a
        large commit with ``after_id`` (the last id of the previous page)."""
        return self._frames.changes(since_seq, after_id=after_id, limit=limit)

    def find(self, query: str, **options: Any) -> Hits:
        """Search the frames visible at ``as_of`` (default: now); see ``engine/query.py``.

        Options (``FindOptions``): ``k`` hits (default 10); ``mode``: "lex" (BM25), "vec"
        (embeddings), "hybrid" (both, fused) or "auto" (hybrid when the capsule has
        vectors and an embedder, else lex; the result's ``.mode`` says which ran);
        filters ``scope`` (URI prefix), ``tags``, ``kind``, ``since``/``until`` (event
        time); ``as_of`` (a commit seq or a time); ``snippet_chars``; ``all_versions``
        (superseded versions too).
        """
        hits = self._query.find(query, FindOptions(**options))
        assert hits is not None
        return hits

    def find_cached(self, query: str, **options: Any) -> Hits | None:
        """``find``'s answer if the result cache holds it, else ``None``: never waits for
        the lock or searches (an event loop asks this first and sends the real search to
        a worker thread only on a miss)."""
        return self._query.find(query, FindOptions(**options), cached_only=True)

    def vectors(self, frame_ids: Iterable[int]) -> dict[int, np.ndarray]:
        """The stored embeddings of these frames, where they have one (to reuse a vector
        for identical text instead of embedding it again)."""
        return self._query.vectors(frame_ids)

    def rebuild_indexes(self) -> dict[str, str]:
        """Rebuild the lexical index from the frames and the vector graph from the stored
        vectors, ignoring every working copy, then checkpoint them into the capsule."""
        s = self._s
        with s.lock:
            self._check_idle_writer("rebuilding the indexes")
            self._query.close_indexes(save=False)
            s.ckpt.extra.pop("lex", None)
            ix = self._query.open_indexes(fresh=True)
            self._checkpointer.checkpoint(lex="now")
            return dict(ix.origin)

    def stats(self) -> dict[str, Any]:
        """Counts, sizes, codecs, retention, checkpoints, vectors and search state."""
        s = self._s
        with s.lock:
            s.check_open()
            t, c = s.table, s.counters
            codec_stats = {}
            for name in codecs.NAMES.values():
                blocks = c.get(f"codec.{name}.blocks", 0)
                if blocks:
                    raw, stored = c.get(f"codec.{name}.raw", 0), c.get(f"codec.{name}.stored", 0)
                    codec_stats[name] = {"blocks": blocks, "raw_bytes": raw, "stored_bytes": stored,
                                         "ratio": round(stored / raw, 4) if raw else None}
            return {
                "path": self.path,
                "capsule_id": uuid.UUID(bytes=s.capsule_id).hex,
                "format": {"read_version": s.header.read_version, "write_version": s.header.write_version},
                "readonly": self.readonly,
                "commit_seq": t.seq,
                "frames": t.next_id,
                "live_frames": t.live_count,
                "tombstones": c.get("frames.tombstone", 0),
                "superseded_frames": t.ended_count - c.get("frames.tombstone", 0),
                "uris": t.uri_count,
                "live_uris": t.live_uris,
                "pending_frames": len(self._writer.pending),
                "file_bytes": s.app.log_end,
                "bytes_by_kind": {
                    "header": fmt.LOG_START,
                    **{k: c.get(f"bytes.{k}", 0) for k in fmt.KIND_NAMES.values()},
                    "dead": c.get("bytes.dead", 0),
                },
                "payload_raw_bytes": c.get("payload.raw", 0),
                "codecs": codec_stats,
                "origin": s.ckpt.extra.get("origin"),
                "retention": {"rules": retention.to_builtins(s.expiry.rules),
                              "expired_frames": len(s.expiry.expired),
                              "expired_bytes": s.expiry.expired_bytes,
                              "next_expiry": s.expiry.next_deadline()},
                "rewinds": [{"seq": at, "to": to} for at, to in sorted(t.rewinds.items())[-10:]],
                "upgrades": {"frames": c.get("upgrade.frames", 0), "blocks": c.get("upgrade.blocks", 0),
                             "saved_bytes": c.get("upgrade.saved", 0), "considered": t.upgraded_upto,
                             "dictionaries": len(t.dicts)},
                "checkpoints": c.get("checkpoints", 0),
                "checkpoint_failures": s.checkpoint_failures,
                "segments": len(s.ckpt.segments),
                "wal_bytes": s.app.log_end - s.ckpt_end,
                "wal_frames": s.tail_frames,
                "vectors": self._vector_stats(),
                "search": s.indexes.stats() if s.indexes is not None else None,
                "block_cache": s.blocks.stats(),
            }

    def vector_coverage(self) -> float | None:
        """The share of text frames that have a vector (searchable by meaning), as in
        ``stats()["vectors"]["coverage"]`` but without its cost; None: no vectors here."""
        s = self._s
        with s.lock:
            if s.vec is None:
                return None
            return _share(*self._embedding.coverage())

    def _vector_stats(self) -> dict[str, Any] | None:
        s = self._s
        if s.vec is None:
            return None
        have, text = self._embedding.coverage()
        return {
            "model": s.vec["model"], "dim": s.vec["dim"], "text_frames": text,
            "frames_with_vectors": have, "coverage": _share(have, text),
            "embedding": self._embedding.stats(),
        }

    # -- life cycle -----------------------------------------------------------------------

    def close(self) -> None:
        """Commit staged frames, checkpoint a large tail, release the file and its lock."""
        s = self._s
        with s.lock:
            if s.closed:
                return
            s.closed = True  # background threads see this and stop
        self._embedding.stop()
        self._warmer.stop()
        with s.lock:
            try:
                if not self.readonly and not s.app.broken:
                    self._commit()  # staged frames and vectors embedded so far
                    if s.tail_frames >= s.opts.close_checkpoint_frames:
                        self._checkpointer.try_checkpoint()
            finally:
                self._query.close_indexes(save=not self.readonly and not s.app.broken)
                s.views.close()  # tables and files: the current view's is the capsule file

    def __enter__(self) -> Capsule:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        s = self._s
        if exc_type is not None and not s.closed and not self.readonly and not s.app.broken:
            with s.lock:
                self._writer.rollback()  # an exception means the batch is not wanted
        self.close()

    def __repr__(self) -> str:
        s = self._s
        state = "closed" if s.closed else ("readonly" if self.readonly else "writer")
        return f"<Capsule {self.path!r} seq={s.table.seq} frames={s.table.next_id} {state}>"


def _share(have: int, text: int) -> float:
    """``have / text`` to 4 decimals, rounded down: 1.0 only when every text frame has one."""
    return math.floor(have / text * 10_000) / 10_000 if text else 1.0
