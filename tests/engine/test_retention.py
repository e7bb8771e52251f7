"""Retention rules and expiry [F-24]: gone from every query at once, as-of views included,
and gone from the file after compaction.

Time is the capsule's ``clock``, moved by the tests: no test waits for expiry to happen.
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import pytest

import engine
from engine import codecs
from engine import format as fmt
from workload import snapshot

HOUR = 3600.0


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def cap(tmp_path):
    c = engine.create(tmp_path / "r.mv2", model=None, index_dir=str(tmp_path / "ix"))
    c.clock = Clock()
    yield c
    c.close()


@pytest.mark.req("F-24")
def test_ttl_on_a_frame(cap):
    keep = cap.put("a note that stays", uri="n://keep")
    brief = cap.put("a note that goes soon", uri="n://brief", expires=dt.timedelta(hours=1))
    cap.commit()
    assert {f.id for f in cap.timeline()} == {keep, brief}
    assert len(cap.find("note", mode="lex")) == 2
    cap.clock.now += 2 * HOUR
    assert [f.id for f in cap.timeline()] == [keep]
    with pytest.raises(engine.NotFound, match="expired"):
        cap.get(brief)
    with pytest.raises(engine.NotFound, match="expired"):
        cap.get(uri="n://brief", as_of=1)  # as of a time before it expired: still gone
    hits = cap.find("note", mode="lex")
    assert [h.frame_id for h in hits] == [keep] and any("expired" in w for w in hits.warnings)
    assert cap.timeline(as_of=1).expired == 1
    assert cap.stats()["retention"]["expired_frames"] == 1


@pytest.mark.req("F-24")
def test_max_age_per_tag_and_for_the_capsule(cap):
    now = cap.clock.now
    chat = cap.put("old chat turn", tags={"kind": "chat"}, timestamp=now - 3 * HOUR)
    note = cap.put("old note", tags={"kind": "note"}, timestamp=now - 3 * HOUR)
    new_chat = cap.put("new chat turn", tags={"kind": "chat"}, timestamp=now)
    cap.commit()
    cap.set_rules({"tags": {"kind=chat": {"max_age_s": 2 * HOUR}}})
    assert {f.id for f in cap.timeline()} == {note, new_chat}
    cap.set_rules({"default": {"max_age_s": 10 * HOUR}, "tags": {"kind=chat": {"max_age_s": 2 * HOUR}}})
    cap.clock.now += 8 * HOUR  # note is 11 h old now, new_chat 8 h
    assert {f.id for f in cap.timeline()} == set()
    assert chat in cap._s.expiry.expired


@pytest.mark.req("F-24")
def test_max_versions(cap):
    for i in range(5):
        cap.put(f"version {i}", uri="doc://a")
        cap.commit()
    cap.set_rules({"default": {"max_versions": 2}})
    assert cap.get(uri="doc://a").text == "version 4"
    assert cap.get(uri="doc://a", as_of=4).text == "version 3"
    with pytest.raises(engine.NotFound, match="expired"):
        cap.get(uri="doc://a", as_of=2)
    hits = cap.find("version", mode="lex", all_versions=True)
    assert sorted(h.snippet for h in hits) == ["version 3", "version 4"]
    cap.put("version 5", uri="doc://a")
    cap.commit()  # a new version pushes the oldest kept one out at once
    assert sorted(h.snippet for h in cap.find("version", mode="lex", all_versions=True)) == ["version 4", "version 5"]


def test_budget_drops_the_oldest_first(cap):
    ids = [cap.put("x" * 1000, uri=f"u://{i}") for i in range(10)]
    cap.commit()
    cap.set_rules({"budget_bytes": 4500})
    assert [f.id for f in cap.timeline()] == ids[-4:]
    cap.put("y" * 1000, uri="u://new")
    cap.commit()
    assert len(cap.timeline()) == 4 and ids[6] in cap._s.expiry.expired


def test_rules_are_history_and_travel_with_the_file(tmp_path, cap):
    cap.put("one")
    cap.commit()
    first = cap.set_rules({"default": {"max_versions": 3}})
    second = cap.set_rules({"default": {"max_versions": 2}, "budget_bytes": 10**9})
    assert cap.rules(as_of=first) == {"default": {"max_versions": 3}}
    assert cap.rules() == {"default": {"max_versions": 2}, "budget_bytes": 10**9}
    assert cap.rules(as_of=first - 1) == {}
    cap.checkpoint()
    path = cap.path
    cap.close()
    with engine.open(path) as again:
        assert again.rules() == {"default": {"max_versions": 2}, "budget_bytes": 10**9}
        assert again.rules(as_of=first) == {"default": {"max_versions": 3}}
        again.branch(tmp_path / "b.mv2")
    with engine.open(tmp_path / "b.mv2") as b:
        assert b.rules() == {"default": {"max_versions": 2}, "budget_bytes": 10**9} and b.seq == second
    assert engine.verify(path).ok


def test_a_rule_that_would_delete_everything_needs_force(cap):
    for i in range(3):
        cap.put(f"n{i}", timestamp=cap.clock.now - 5 * HOUR)
    cap.commit()
    with pytest.raises(engine.InvalidArgument, match="force"):
        cap.set_rules({"default": {"max_age_s": HOUR}})
    assert len(cap.timeline()) == 3 and cap.rules() == {}
    with pytest.raises(engine.InvalidArgument, match="force"):
        cap.set_rules({"budget_bytes": 0})
    cap.set_rules({"default": {"max_age_s": HOUR}}, force=True)
    assert len(cap.timeline()) == 0


@pytest.mark.parametrize("bad", [
    {"default": {"max_age_s": -1}}, {"default": {"max_versions": 0}}, {"tags": {"chat": {"max_age_s": 5}}},
    {"budget_bytes": -5}, {"default": {"ttl": 5}}, {"unknown": 1}, {"default": {"max_age_s": float("nan")}},
])
def test_bad_rules_are_refused(cap, bad):
    with pytest.raises(engine.InvalidArgument, match="retention"):
        cap.set_rules(bad)


def test_search_finds_enough_live_results_when_most_matches_expired(cap):
    for i in range(300):
        cap.put(f"apple pie recipe {i}", uri=f"r://{i}", expires=cap.clock.now + (HOUR if i % 10 else 10 * HOUR))
    cap.commit()
    cap.find("apple", mode="lex")  # indexes attached before anything expired
    cap.clock.now += 2 * HOUR  # 270 of 300 expire
    hits = cap.find("apple pie", mode="lex", k=20)
    assert len(hits) == 20 and all(h.frame_id % 10 == 0 for h in hits)


@pytest.mark.req("F-24")
@pytest.mark.parametrize("upgraded", [False, True], ids=["fresh-blocks", "grouped-blocks"])
def test_compaction_reclaims_expired_bytes_for_good(tmp_path, cap, upgraded):
    keep, gone = [], []
    for i in range(20):  # interleaved: grouped blocks hold kept and expiring frames together
        keep.append(cap.put(f"kept note {i} " + "k" * 3000, uri=f"k://{i}"))
        gone.append(cap.put(f"SECRET-EXPIRED {i} " + "s" * 3000, uri=f"s://{i}", tags={"kind": "chat"},
                            timestamp=cap.clock.now - 5 * HOUR))
    cap.commit()
    if upgraded:
        cap.upgrade_codecs()
    cap.set_rules({"tags": {"kind=chat": {"max_age_s": HOUR}}})
    views = [snapshot(cap, s) for s in range(cap.seq + 1)]
    report = cap.compact()
    assert report["purged"] == 20 and report["bytes_after"] < report["bytes_before"]
    assert [snapshot(cap, s) for s in range(cap.seq + 1)] == views
    cap.set_rules({})  # relaxing the rules does not bring purged content back
    with pytest.raises(engine.NotFound, match="expired"):
        cap.get(gone[0])
    assert cap.get(keep[0]).text.startswith("kept note 0")
    data = Path(cap.path).read_bytes()
    pos, plain = fmt.LOG_START, []
    while pos < len(data):  # what the file really holds, every block decoded
        rh = fmt.decode_record_header(data, pos)
        body = data[pos + fmt.RECORD_SIZE : pos + fmt.RECORD_SIZE + rh.length]
        if rh.kind == fmt.BLOCK:
            codec, _, _, dict_id, raw_len = fmt.BLOCK_HEADER.unpack_from(body)
            plain.append(codecs.decode(codec, body[fmt.BLOCK_HEADER.size :], raw_len,
                                       zdict=cap._s.dicts(dict_id) if dict_id else None))
        pos += fmt.RECORD_SIZE + rh.length
    assert b"SECRET-EXPIRED" not in b"".join(plain) and b"kept note 5" in b"".join(plain)
    assert engine.verify(cap.path).ok


def test_readers_see_expiry_too(tmp_path, cap):
    cap.put("short lived", uri="x://1", expires=cap.clock.now + HOUR)
    cap.commit()
    with engine.open(cap.path, readonly=True) as reader:
        reader.clock = cap.clock
        assert reader.get(uri="x://1").text == "short lived"
        cap.clock.now += 2 * HOUR
        with pytest.raises(engine.NotFound, match="expired"):
            reader.get(uri="x://1")
        assert len(reader.find("short", mode="lex")) == 0


def test_rewind_does_not_resurrect_expired_frames(cap):
    cap.put("brief", uri="b://1", expires=cap.clock.now + HOUR)
    cap.put("lasting", uri="l://1")
    first = cap.commit()
    cap.remove("b://1")
    cap.remove("l://1")
    cap.commit()
    cap.clock.now += 2 * HOUR
    cap.rewind(first)
    assert [f.uri for f in cap.timeline()] == ["l://1"]
