"""find(): lexical, semantic and hybrid retrieval, filters, as-of search, persistence of
the indexes, caches, and bad input. The semantic tests run the real embedding model."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

import engine
from engine import format as fmt

DOCS = {
    "doc://python/gc": "Python reclaims memory with reference counting and a cyclic garbage collector.",
    "doc://python/gil": "The global interpreter lock lets one thread run Python bytecode at a time.",
    "doc://rust/borrow": "Rust's borrow checker enforces ownership rules at compile time, so no collector is needed.",
    "doc://cooking/bread": "Knead the dough for ten minutes, then let the bread rise in a warm place.",
    "doc://cooking/soup": "Simmer onions and carrots slowly; season the soup with salt at the end.",
    "note://1": "Remember to buy flour and yeast for baking bread on Sunday.",
}


def fill(cap: engine.Capsule) -> int:
    for i, (uri, text) in enumerate(DOCS.items()):
        cap.put(text, uri=uri, title=uri.rsplit("/", 1)[-1], kind="note" if uri.startswith("note") else "doc",
                tags={"topic": uri.split("/")[2] if uri.startswith("doc") else "todo"}, timestamp=1000 + i)
    return cap.commit()


def uris(hits) -> list[str]:
    return [h.uri for h in hits]


def test_lexical_search_stems_ranks_and_highlights(path):
    with engine.create(path, model=None) as cap:
        fill(cap)
        hits = cap.find("collectors", mode="lex")
        assert hits.mode == "lex" and set(uris(hits)) == {"doc://python/gc", "doc://rust/borrow"}
        h = hits[0]
        assert h.sources == ("lex",) and h.score > 0 and h.commit_seq == 1 and h.valid_until is None
        start, end = h.highlights[0]
        assert h.snippet[start:end].lower().startswith("collect")


def test_implicit_and_with_or_fallback(path):
    with engine.create(path, model=None) as cap:
        fill(cap)
        # AND finds the one document with both words; with k=1 that is enough.
        assert uris(cap.find("bread flour", mode="lex", k=1)) == ["note://1"]
        # With k=3 AND finds too few, so OR adds the documents with either word.
        both = cap.find("bread flour", mode="lex", k=3)
        assert uris(both)[0] == "note://1" and "doc://cooking/bread" in uris(both)


def test_phrase_query(path):
    with engine.create(path, model=None) as cap:
        fill(cap)
        assert uris(cap.find('"garbage collector"', mode="lex")) == ["doc://python/gc"]
        assert cap.find('"collector garbage"', mode="lex", k=1) == []


def test_filters_apply_inside_the_index(path):
    with engine.create(path, model=None) as cap:
        fill(cap)
        assert uris(cap.find("bread", mode="lex", scope="doc://cooking/")) == ["doc://cooking/bread"]
        assert uris(cap.find("bread", mode="lex", scope="note://")) == ["note://1"]
        assert uris(cap.find("bread", mode="lex", scope="doc://cook")) == ["doc://cooking/bread"]  # mid-segment prefix
        assert uris(cap.find("bread", mode="lex", kind="note")) == ["note://1"]
        assert uris(cap.find("python", mode="lex", tags={"topic": "python"}, k=5)) == ["doc://python/gc", "doc://python/gil"] or \
            set(uris(cap.find("python", mode="lex", tags={"topic": "python"}, k=5))) == {"doc://python/gc", "doc://python/gil"}
        assert uris(cap.find("bread", mode="lex", since=1004, until=1005)) == ["note://1"]
        # a filter that excludes the best match still returns k results from the rest
        assert uris(cap.find("bread OR soup OR dough", mode="lex", kind="doc", k=2)) and all(
            h.kind == "doc" for h in cap.find("bread OR soup", mode="lex", kind="doc"))


@pytest.mark.req("F-23")
def test_as_of_search_sees_superseded_and_deleted_versions(path):
    with engine.create(path, model=None) as cap:
        s1 = fill(cap)
        cap.put("The GIL was made optional in free-threaded builds.", uri="doc://python/gil")
        cap.remove("doc://cooking/soup")
        s2 = cap.commit()
        cap.put("A brand new note about interpreter threads", uri="note://2")
        cap.commit()
        now = cap.find("interpreter", mode="lex")
        assert {h.uri for h in now} == {"note://2"}  # the old GIL text is superseded
        then = cap.find("interpreter", mode="lex", as_of=s1)
        assert uris(then) == ["doc://python/gil"] and then[0].valid_until == s2
        assert cap.find("soup", mode="lex") == []
        assert uris(cap.find("soup", mode="lex", as_of=s1)) == ["doc://cooking/soup"]
        assert uris(cap.find("threads", mode="lex", as_of=s2)) == ["doc://python/gil"]  # not note://2 yet
        versions = cap.find("thread OR threads OR GIL", mode="lex", all_versions=True, k=10)
        assert sorted(h.commit_seq for h in versions if h.uri == "doc://python/gil") == [s1, s2]
        assert cap.find("bread", mode="lex", as_of=0) == []  # before the first commit


def test_index_follows_every_commit_and_reopen(path):
    with engine.create(path, model=None, checkpoint_frames=3) as cap:
        for i in range(20):
            cap.put(f"version {i} of the changelog mentions kiwi{i}", uri="doc://changelog")
            cap.commit()
            hits = cap.find(f"kiwi{i}", mode="lex")
            assert [h.frame_id for h in hits] == [cap.get(uri="doc://changelog").id]
    with engine.open(path) as cap:
        assert uris(cap.find("kiwi19", mode="lex")) == ["doc://changelog"]
        assert cap.find("kiwi3", mode="lex") == []
        assert uris(cap.find("kiwi3", mode="lex", as_of=4)) == ["doc://changelog"]


@pytest.mark.req("F-15")
def test_lexical_index_is_stored_in_the_capsule_and_restored_not_rebuilt(path, tmp_path):
    index_dir = tmp_path / "idx"
    with engine.create(path, model=None, index_dir=str(index_dir)) as cap:
        fill(cap)
        cap.find("bread", mode="lex")  # attach: from now on checkpoints carry index files
        cap.put("one more frame after the index was attached", uri="doc://late")
        cap.commit()
        cap.checkpoint()
    kinds = _kinds(path)
    assert kinds.get("lexfile", 0) >= 3
    with engine.open(path, index_dir=str(index_dir)) as cap:
        assert uris(cap.find("flour", mode="lex")) == ["note://1"]
        assert cap.stats()["search"]["attach"]["origin"]["lex"] == "working-copy"
    shutil.rmtree(index_dir)  # the cache is lost: restore from the capsule
    with engine.open(path, index_dir=str(index_dir)) as cap:
        assert uris(cap.find("attached", mode="lex")) == ["doc://late"]
        assert cap.stats()["search"]["attach"]["origin"]["lex"] == "capsule"
    assert engine.verify(path).ok


def test_a_working_copy_from_another_history_is_not_trusted(path, tmp_path):
    index_dir = str(tmp_path / "idx")
    with engine.create(path, model=None, index_dir=index_dir) as cap:
        fill(cap)
        cap.find("bread", mode="lex")
    backup = tmp_path / "backup.mv2"
    shutil.copy(path, backup)
    with engine.open(path, index_dir=index_dir) as cap:
        cap.put("a secret only the newer history has", uri="doc://secret")
        cap.commit()
        assert cap.find("secret", mode="lex")
    shutil.copy(backup, path)  # the user restores an older copy of the file
    with engine.open(path, index_dir=index_dir) as cap:
        assert cap.find("secret", mode="lex") == []
        cap.put("a different second commit", uri="doc://other")  # same seq, other history
        cap.commit()
    with engine.open(path, index_dir=index_dir) as cap:
        assert cap.find("secret", mode="lex") == [] and uris(cap.find("different", mode="lex")) == ["doc://other"]


def test_readonly_search_alongside_a_writer(path, tmp_path):
    index_dir = str(tmp_path / "idx")
    with engine.create(path, model=None, index_dir=index_dir) as w:
        fill(w)
        w.find("bread", mode="lex")
        with engine.open(path, readonly=True, index_dir=index_dir) as r:
            assert uris(r.find("flour", mode="lex")) == ["note://1"]
            w.put("fresh words: zucchini", uri="doc://fresh")
            w.commit()
            assert r.find("zucchini", mode="lex") == []
            r.refresh()
            assert uris(r.find("zucchini", mode="lex")) == ["doc://fresh"]
        assert uris(w.find("zucchini", mode="lex")) == ["doc://fresh"]


def test_result_cache_hits_and_invalidates_on_commit(path):
    with engine.create(path, model=None) as cap:
        fill(cap)
        first = cap.find("bread", mode="lex")
        again = cap.find("bread", mode="lex")
        assert not first.cached and again.cached and uris(first) == uris(again)
        cap.put("bread again", uri="doc://more-bread")
        cap.commit()
        after = cap.find("bread", mode="lex")
        assert not after.cached or "doc://more-bread" in uris(after)  # re-warmed or recomputed
        assert "doc://more-bread" in uris(after)
        stats = cap.stats()["search"]["caches"]
        assert stats["results"]["hits"] >= 1 and stats["results"]["bytes"] > 0


def test_prefetch_warms_the_next_chunks(path):
    with engine.create(path, model=None) as cap:
        ids = [cap.put(f"chunk {i} " * 200, uri=f"file:///doc.md#{i}", parent="file:///doc.md", chunk=i) for i in range(5)]
        cap.commit()
        cap.get(ids[0])
        cap._warmer.stop()  # let the prefetch finish before looking
        hits_before = cap.stats()["block_cache"]["hits"]
        cap.get(ids[1])
        cap.get(ids[2])
        assert cap.stats()["block_cache"]["hits"] == hits_before + 2


@pytest.mark.parametrize("query", ["", "   ", '"unbalanced', "AND AND", "field:", "text:", "(a", "日本語のテキスト", "🙂🙃", "x" * 100_000])
def test_bad_queries_never_crash(path, query):
    with engine.create(path, model=None) as cap:
        fill(cap)
        hits = cap.find(query, mode="lex")
        assert isinstance(hits, list)
        if not query.strip():
            assert hits == [] and "empty query" in hits.warnings


def test_k_limits_and_argument_errors(path):
    with engine.create(path, model=None) as cap:
        fill(cap)
        assert cap.find("bread", mode="lex", k=0) == []
        big = cap.find("bread OR soup OR python", mode="lex", k=10_000)
        assert 0 < len(big) <= len(DOCS) and any("k lowered" in w for w in big.warnings)
        for bad in (dict(k=-1), dict(mode="fuzzy"), dict(k="3"), dict(tags={"a": 1}), dict(as_of=99)):
            with pytest.raises(engine.InvalidArgument):
                cap.find("bread", **bad)
        with pytest.raises(engine.InvalidArgument, match="no vectors"):
            cap.find("bread", mode="vec")
        assert cap.find("bread").mode == "lex"  # auto without vectors is lexical


def _kinds(path: str) -> dict[str, int]:
    data = Path(path).read_bytes()
    pos, out = fmt.LOG_START, {}
    while pos < len(data):
        rh = fmt.decode_record_header(data, pos)
        name = fmt.KIND_NAMES[rh.kind]
        out[name] = out.get(name, 0) + 1
        pos += fmt.RECORD_SIZE + rh.length
    return out


# -- semantic and hybrid, with the real model ----------------------------------------------


def test_semantic_search_finds_meaning_not_words(path, embedder):
    with engine.create(path, embedder=embedder) as cap:
        fill(cap)
        assert cap.wait_embedded(timeout=60)
        hits = cap.find("how does a language free unused memory", mode="vec", k=2)
        assert hits.mode == "vec" and hits[0].uri == "doc://python/gc" and hits[0].sources == ("vec",)
        assert 0 < hits[0].score <= 1
        auto = cap.find("baking ingredients shopping", k=3)
        assert auto.mode == "hybrid" and auto[0].uri == "note://1"
        assert cap.stats()["vectors"]["coverage"] == 1.0


@pytest.mark.req("F-14")
def test_vectors_are_committed_and_survive_reopen(path, embedder, tmp_path):
    index_dir = str(tmp_path / "idx")
    with engine.create(path, embedder=embedder, index_dir=index_dir) as cap:
        fill(cap)
        assert cap.wait_embedded(timeout=60)
    assert _kinds(path)["vectors"] >= 1
    shutil.rmtree(index_dir, ignore_errors=True)  # the graph is rebuilt from the capsule's vectors
    with engine.open(path, embedder=embedder, index_dir=index_dir) as cap:
        stats = cap.stats()["vectors"]
        assert stats["frames_with_vectors"] == len(DOCS) and stats["embedding"]["embedded"] == 0
        assert cap.find("garbage collection", mode="vec", k=1)[0].uri == "doc://python/gc"
        assert cap.stats()["search"]["attach"]["origin"]["vec"] == "rebuilt"
    with engine.open(path, embedder=embedder, index_dir=index_dir) as cap:
        cap.find("x", mode="vec")
        assert cap.stats()["search"]["attach"]["origin"]["vec"] == "working-copy"
    assert engine.verify(path).ok


def test_caller_supplied_vectors_and_as_of_semantic(path, embedder):
    with engine.create(path) as cap:  # no embedder: vectors come with the puts
        v_old, v_new = embedder.embed(["cats purr", "dogs bark"])
        cap.put("cats purr", uri="doc://pet", vector=v_old)
        s1 = cap.commit()
        cap.put("dogs bark", uri="doc://pet", vector=v_new)
        cap.commit()
        with pytest.raises(engine.InvalidArgument):
            cap.put("bad", vector=[1.0, 2.0])
        with pytest.raises(engine.InvalidArgument):
            cap.put("bad", vector=np.zeros(384))
    with engine.open(path, embedder=embedder) as cap:
        assert [h.frame_id for h in cap.find("kitten", mode="vec", k=1)] == [1]  # only the live version
        old = cap.find("kitten", mode="vec", k=1, as_of=s1)
        assert [h.frame_id for h in old] == [0] and old[0].valid_until == 2


def test_vectors_are_searchable_before_they_are_durable(path, embedder):
    with engine.create(path, embedder=embedder, embed_batch=64) as cap:
        cap.put("photosynthesis converts light into chemical energy", uri="doc://bio")
        cap.commit()
        assert cap.find("photosynthesis", mode="lex")  # lexical at once, whatever the embedder does
        assert cap.wait_embedded(timeout=60)
        assert cap.find("how plants make energy from sunlight", mode="vec", k=1)[0].uri == "doc://bio"


@pytest.mark.timeout(90)
def test_vectors_handed_to_the_writer_wait_for_its_commit(path, embedder):
    """With a writer to hand them to (the daemon's writer slot), the embedding thread
    commits no vectors: they are searchable at once, rung for, and durable with the
    writer's next commit."""
    rung = threading.Event()
    with engine.create(path, embedder=embedder) as cap:
        cap.hand_vectors_to(rung.set)
        cap.put("photosynthesis converts light into chemical energy", uri="doc://bio")
        seq = cap.commit()
        assert rung.wait(60)
        assert cap.find("how plants make energy from sunlight", mode="vec", k=1)[0].uri == "doc://bio"
        assert cap.seq == seq  # the embedding thread committed nothing
        assert "vectors" not in _kinds(path)
        assert cap.commit() == seq + 1  # the writer's commit carries them
        assert _kinds(path)["vectors"] == 1


class GatedEmbedder:
    """The real model behind a gate: embedding waits until the test opens it (or fails,
    if told to), so that what waits for a vector can be seen waiting."""

    def __init__(self, real: engine.Embedder, *, fail: bool = False) -> None:
        self.real, self.model, self.dim, self.fail = real, real.model, real.dim, fail
        self.gate = threading.Event()

    def embed(self, texts: list[str]) -> np.ndarray:
        assert self.gate.wait(60)
        if self.fail:
            raise RuntimeError("the model crashed")
        return self.real.embed(texts)


@pytest.mark.timeout(90)
def test_unembedded_counts_what_a_semantic_reader_waits_for(path, embedder, tmp_path):
    gated = GatedEmbedder(embedder)
    with engine.create(path, embedder=gated) as cap:
        assert cap.unembedded(cap.seq) == 0
        cap.put("photosynthesis converts light into chemical energy", uri="doc://bio")
        s1 = cap.commit()
        cap.put_many([{"text": "rivers carve canyons", "uri": "doc://geo"}, {"data": b"\x00\x01", "uri": "blob://1"},
                      {"text": "stars fuse hydrogen", "uri": "doc://astro"}])
        s2 = cap.commit()
        # Waiting: the first frame (being embedded or queued), then the two text frames of
        # the second commit (not the binary one); nothing at or before commit 0.
        assert (cap.unembedded(0), cap.unembedded(s1), cap.unembedded(s2)) == (0, 1, 3)
        gated.gate.set()
        assert cap.wait_embedded(timeout=60)
        assert cap.unembedded(s2) == 0
        assert cap.find("how do canyons form", mode="vec", k=1)[0].uri == "doc://geo"
    with engine.create(tmp_path / "lex.mv2", model=None) as cap:  # embeds nothing: nothing to wait for
        cap.put("plain words")
        assert cap.unembedded(cap.commit()) == 0
    failing = GatedEmbedder(embedder, fail=True)
    with engine.create(tmp_path / "failing.mv2", embedder=failing) as cap:
        cap.put("a text that will never get its vector")
        seq = cap.commit()
        failing.gate.set()
        assert not cap.wait_embedded(timeout=60)
        with pytest.raises(engine.EngineError, match="embedding failed: RuntimeError: the model crashed"):
            cap.unembedded(seq)


def test_doctor_reindex_rebuilds_both_indexes_from_the_capsule(path, embedder, tmp_path):
    with engine.create(path, embedder=embedder) as cap:
        fill(cap)
        assert cap.wait_embedded(timeout=60)
        cap.find("bread", mode="lex")
    report = engine.doctor(path, reindex=True)
    assert report.ok and "rebuilt the search indexes from 6 frames" in report.repairs[-1], report
    assert report.facts["verified_after"] == 1
    with engine.open(path, embedder=embedder) as cap:
        assert uris(cap.find("flour", mode="lex")) == ["note://1"]
        assert cap.find("memory reclaiming", mode="vec", k=1)[0].uri == "doc://python/gc"
        assert cap.stats()["search"]["attach"]["origin"] == {"lex": "working-copy", "vec": "working-copy"}


def test_cached_only_answers_hits_and_declines_misses(path):
    with engine.create(path, model=None) as cap:
        fill(cap)
        assert cap.find_cached("bread", mode="lex") is None  # indexes not open yet
        first = cap.find("bread", mode="lex")
        hit = cap.find_cached("bread", mode="lex")
        assert hit is not None and hit.cached and [h.frame_id for h in hit] == [h.frame_id for h in first]
        assert cap.find_cached("flour", mode="lex") is None  # a miss does no search


def test_text_with_undecodable_bytes_is_indexed(path):
    with engine.create(path, model=None) as cap:
        fill(cap)
        cap.find("bread", mode="lex")  # indexes attached: the commit below updates them
        cap.put("caf\udce9 latte surrogate", uri="doc://odd")  # os.fsdecode-style text
        seq = cap.commit()
        assert cap.seq == seq and uris(cap.find("latte", mode="lex")) == ["doc://odd"]
        assert cap.get(uri="doc://odd").payload == b"caf\xe9 latte surrogate"
