"""Model-based test: the engine against an in-memory model of versions, tombstones and as-of.

A Hypothesis state machine drives one writer capsule through puts (text and bytes, with and
without a URI), removes (by URI and by frame id), commits, rollbacks, checkpoints, reopens,
readonly opens and a long-lived refreshing reader, with tiny checkpoint thresholds so that
checkpoints and segment merges happen all the time. The model keeps the whole committed
history (for every commit seq: the live version of each URI and the live anonymous frames)
and every committed frame, and after each step the capsule must agree with it: at the head,
at seq 0 and at a random earlier seq, by URI, by frame id and through ``timeline``.
"""

from __future__ import annotations

import os
import random
import tempfile
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

import engine

URIS = ["u0", "u1", "u2", "u3", "u4"]

uris = st.sampled_from([*URIS, None])
texts = st.one_of(
    st.text(alphabet="aé✓😀 \x00\n字", max_size=30),
    st.text(max_size=30),  # any code point except surrogates
)
blobs = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda b, n: b * n, st.binary(min_size=1, max_size=8), st.integers(1, 600)),  # compressible
)


@dataclass
class MFrame:
    """A committed (or staged) frame as the model sees it."""

    id: int
    payload: bytes | None  # None: tombstone
    uri: str | None
    is_text: bool
    supersedes: int | None
    seq: int = 0  # commit seq, 0 while staged
    valid_until: int | None = None
    superseded_by: int | None = None


@dataclass
class Snapshot:
    """What is visible at one commit seq."""

    uris: dict[str, int] = field(default_factory=dict)  # uri -> live frame id
    anon: frozenset[int] = frozenset()  # live frames without a uri

    def visible(self) -> set[int]:
        return set(self.uris.values()) | set(self.anon)


class CapsuleMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.TemporaryDirectory()
        self.path = f"{self.tmp.name}/m.mv2"
        self.cap: engine.Capsule | None = None
        self.reader: engine.Capsule | None = None
        self.reader_seq = 0  # the commit seq the reader saw at its last refresh
        self.history = [Snapshot()]  # index == commit seq
        self.frames: list[MFrame] = []  # index == frame id, committed only
        self.staged: list[MFrame] = []
        self.stage_uris: dict[str, int] = {}
        self.stage_anon: set[int] = set()
        self.rng = random.Random(0)

    # -- life cycle ---------------------------------------------------------------------

    @initialize(
        ckpt_frames=st.sampled_from([2, 3, 3, 5]),
        ckpt_bytes=st.sampled_from([8 << 20, 2000]),
        close_ckpt=st.sampled_from([256, 1]),
        seed=st.integers(0, 2**32 - 1),
    )
    def create(self, ckpt_frames: int, ckpt_bytes: int, close_ckpt: int, seed: int) -> None:
        self.opts = dict(checkpoint_frames=ckpt_frames, checkpoint_bytes=ckpt_bytes,
                         close_checkpoint_frames=close_ckpt)
        self.rng = random.Random(seed)
        self.cap = engine.create(self.path, **self.opts)

    def teardown(self) -> None:
        try:
            for c in (self.cap, self.reader):
                if c is not None:
                    c.close()
        finally:
            self.tmp.cleanup()

    # -- model helpers --------------------------------------------------------------------

    @property
    def head(self) -> int:
        return len(self.history) - 1

    @property
    def next_id(self) -> int:
        return len(self.frames) + len(self.staged)

    def _reset_stage(self) -> None:
        self.staged = []
        self.stage_uris = dict(self.history[-1].uris)
        self.stage_anon = set(self.history[-1].anon)

    def _stage_live(self) -> set[int]:
        return set(self.stage_uris.values()) | self.stage_anon

    def _model_commit(self) -> int:
        """What ``commit`` (or ``close``) does to the model; returns the expected seq."""
        if not self.staged:
            return self.head
        seq = self.head + 1
        for m in self.staged:
            m.seq = seq
            self.frames.append(m)
            if m.supersedes is not None:
                old = self.frames[m.supersedes]
                old.valid_until, old.superseded_by = seq, m.id
            if m.payload is None:
                m.valid_until = seq  # a tombstone is never visible itself
        self.history.append(Snapshot(dict(self.stage_uris), frozenset(self.stage_anon)))
        self._reset_stage()
        return seq

    def _stage(self, m: MFrame) -> None:
        if m.supersedes is not None:
            self.stage_anon.discard(m.supersedes)
        if m.payload is None:  # tombstone
            if m.uri is not None:
                del self.stage_uris[m.uri]
        elif m.uri is None:
            self.stage_anon.add(m.id)
        else:
            self.stage_uris[m.uri] = m.id
        self.staged.append(m)

    # -- writing rules ----------------------------------------------------------------------

    def _put(self, data: str | bytes, uri: str | None) -> None:
        payload = data.encode() if isinstance(data, str) else data
        want = MFrame(self.next_id, payload, uri, isinstance(data, str),
                      self.stage_uris.get(uri) if uri is not None else None)
        assert self.cap.put(data, uri=uri) == want.id
        self._stage(want)

    @rule(uri=uris, text=texts, then_commit=st.booleans())
    def put_text(self, uri: str | None, text: str, then_commit: bool) -> None:
        self._put(text, uri)
        if then_commit:
            self.commit()

    @rule(uri=uris, data=blobs, then_commit=st.booleans())
    def put_bytes(self, uri: str | None, data: bytes, then_commit: bool) -> None:
        self._put(data, uri)
        if then_commit:
            self.commit()

    @rule(items=st.lists(st.tuples(uris, st.one_of(texts, blobs)), min_size=1, max_size=6))
    def put_batch_and_commit(self, items: list[tuple[str | None, str | bytes]]) -> None:
        for uri, data in items:
            self._put(data, uri)
        self.commit()

    @rule(data=st.data())
    def remove_uri(self, data: st.DataObject) -> None:
        uri = data.draw(st.sampled_from(URIS), label="uri")
        if uri not in self.stage_uris:
            with pytest.raises(engine.NotFound):
                self.cap.remove(uri)
            return
        old = self.stage_uris[uri]
        assert self.cap.remove(uri) == self.next_id
        self._stage(MFrame(self.next_id, None, uri, False, old))

    @precondition(lambda self: self._stage_live())
    @rule(data=st.data())
    def remove_frame(self, data: st.DataObject) -> None:
        fid = data.draw(st.sampled_from(sorted(self._stage_live())), label="frame id")
        uri = self._meta(fid).uri
        assert self.cap.remove(fid) == self.next_id
        self._stage(MFrame(self.next_id, None, uri, False, fid))

    @rule(data=st.data())
    def remove_dead_frame(self, data: st.DataObject) -> None:
        """Tombstones, superseded frames and unknown ids cannot be removed; nothing is staged."""
        dead = sorted(set(range(self.next_id + 2)) - self._stage_live())
        fid = data.draw(st.sampled_from(dead), label="dead frame id")
        with pytest.raises(engine.NotFound):
            self.cap.remove(fid)

    def _meta(self, fid: int) -> MFrame:
        return self.frames[fid] if fid < len(self.frames) else self.staged[fid - len(self.frames)]

    @rule()
    def commit(self) -> None:
        want = self._model_commit()
        assert self.cap.commit() == want

    @rule()
    def rollback(self) -> None:
        self.cap.rollback()
        self._reset_stage()

    @rule()
    def checkpoint(self) -> None:
        if self.staged:
            with pytest.raises(engine.InvalidArgument):
                self.cap.checkpoint()
        else:
            self.cap.checkpoint()
            assert self.cap.stats()["wal_frames"] == 0

    @rule()
    def reopen(self) -> None:
        self.cap.close()  # close() commits what is staged
        self._model_commit()
        self.cap = engine.open(self.path, **self.opts)

    # -- readers ----------------------------------------------------------------------------

    @rule()
    def readonly_open(self) -> None:
        with engine.open(self.path, readonly=True) as r:
            self._check_capsule(r)

    @rule()
    def open_or_close_reader(self) -> None:
        """A long-lived reader, opened at some commit and refreshed across later ones."""
        if self.reader is None:
            self.reader = engine.open(self.path, readonly=True)
            self.reader_seq = self.head
        else:
            self.reader.close()
            self.reader = None

    @precondition(lambda self: self.reader is not None)
    @rule()
    def refresh_reader(self) -> None:
        assert self.reader.refresh() == self.head - self.reader_seq
        self.reader_seq = self.head
        self._check_capsule(self.reader)

    # -- checks -------------------------------------------------------------------------------

    def _check_seq(self, cap: engine.Capsule, seq: int, as_of: int | None) -> None:
        snap = self.history[seq]
        for uri in URIS:
            if uri in snap.uris:
                f = cap.get(uri=uri, as_of=as_of)
                m = self.frames[snap.uris[uri]]
                assert (f.id, f.payload, f.uri) == (m.id, m.payload, m.uri), (uri, seq)
            else:
                with pytest.raises(engine.NotFound):
                    cap.get(uri=uri, as_of=as_of)
        line = cap.timeline(as_of=as_of, limit=10_000)
        ids = [e.id for e in line]
        assert sorted(ids) == sorted(snap.visible()), f"timeline as of {seq}"
        assert [(e.timestamp, e.id) for e in line] == sorted((e.timestamp, e.id) for e in line)
        # by id, a frame exists as of the commit that made it
        for fid in self.rng.sample(range(len(self.frames)), min(5, len(self.frames))):
            m = self.frames[fid]
            if m.seq > seq or m.payload is None:
                with pytest.raises(engine.NotFound):
                    cap.get(fid, as_of=as_of)
            else:
                assert cap.get(fid, as_of=as_of).payload == m.payload

    def _check_frames(self, cap: engine.Capsule) -> None:
        for m in self.frames:
            if m.payload is None:
                with pytest.raises(engine.NotFound):
                    cap.get(m.id)
                continue
            f = cap.get(m.id)
            assert f.payload == m.payload, f"payload of frame {m.id}"
            got = (f.id, f.uri, f.is_text, f.commit_seq, f.supersedes, f.valid_until, f.superseded_by)
            assert got == (m.id, m.uri, m.is_text, m.seq, m.supersedes, m.valid_until, m.superseded_by)
            if m.is_text:
                assert f.text == m.payload.decode()
        for fid in (len(self.frames), len(self.frames) + 1):  # staged ids are not visible
            with pytest.raises(engine.NotFound):
                cap.get(fid)

    def _check_capsule(self, cap: engine.Capsule) -> None:
        """``cap`` shows exactly the committed state, now and at earlier commits."""
        assert cap.seq == self.head
        self._check_seq(cap, self.head, None)
        self._check_seq(cap, self.head, self.head)
        self._check_seq(cap, 0, 0)
        earlier = self.rng.randrange(self.head + 1)
        self._check_seq(cap, earlier, earlier)
        self._check_frames(cap)
        s = cap.stats()
        head = self.history[-1]
        assert s["commit_seq"] == self.head
        assert s["frames"] == len(self.frames)
        assert s["live_frames"] == len(head.visible())
        assert s["live_uris"] == len(head.uris)
        assert s["tombstones"] == sum(m.payload is None for m in self.frames)
        ended_puts = sum(m.payload is not None and m.valid_until is not None for m in self.frames)
        assert s["superseded_frames"] == ended_puts
        assert s["uris"] == len({m.uri for m in self.frames} - {None})
        assert s["pending_frames"] == (0 if cap.readonly else len(self.staged))

    @rule()
    def verify_file(self) -> None:
        """The offline check agrees, even with a writer open and frames staged."""
        report = engine.verify(self.path)
        assert report.ok, report.errors
        assert (report.facts["commits"], report.facts["frames"]) == (self.head, len(self.frames))

    @invariant()
    def writer_matches_model(self) -> None:
        self._check_capsule(self.cap)
        if not self.staged:  # rollback and commit leave no stray bytes past the log
            assert os.path.getsize(self.path) == self.cap.stats()["file_bytes"]


CapsuleMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.mark.req("F-11")
@pytest.mark.req("F-20")
@pytest.mark.req("F-21")
@pytest.mark.req("F-22")
@pytest.mark.req("F-23")
class TestCapsuleModel(CapsuleMachine.TestCase):
    pass
