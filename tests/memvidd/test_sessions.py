"""Agent sessions: a real daemon records the finds and puts of every connection while a
session runs, keeps them as frames no search returns, and ``replay`` runs the finds again
against another state or with other settings, reporting what diverged."""

from __future__ import annotations

import json

import pytest

from daemon_util import DaemonProc
from memvidd import protocol as p
from memvidd import sessions
from memvidd.cli import main
from memvidd.client import Client, RemoteError

pytestmark = pytest.mark.timeout(120)


def cli(daemon: DaemonProc, *argv: str) -> list[str]:
    return [*argv, "--socket", daemon.socket]


def test_a_session_records_finds_and_puts_of_every_connection(daemon, capsys):
    with Client(daemon.socket) as agent, Client(daemon.socket) as other:
        agent.put("before the session: a heron", uri="note://heron")
        assert "session" in agent.server.features
        assert main(cli(daemon, "session", "start", "s1")) == 0
        assert "recording session s1" in capsys.readouterr().out
        agent.put("a kingfisher by the river", uri="note://kingfisher")
        first = agent.find_reply("kingfisher river", mode="lex")
        other.find_reply("heron", mode="lex", k=3)  # another connection: recorded too
        assert main(cli(daemon, "session", "stop", "s1")) == 0
        assert "3 finds and puts recorded" in capsys.readouterr().out  # a put and two finds
        agent.find_reply("after the session", mode="lex")  # not recorded
        recorded = sessions.events(agent, "s1")
        assert [e.op for e in recorded] == ["start", "put", "find", "find", "stop"]
        put, find = recorded[1], recorded[2]
        assert put.uris == ["note://kingfisher"] and put.seq >= 1
        assert (find.query, find.seq, find.mode, find.args["mode"]) == ("kingfisher river", first.seq, "lex", "lex")
        assert [(fid, uri) for fid, uri, _ in find.hits] == [(h.frame_id, h.uri) for h in first.hits]
        assert recorded[3].args["k"] == 3
        # The session's own frames are bytes: no search ever returns them.
        for mode in ("lex", "auto"):
            assert all(h.kind != sessions.SESSION_KIND for h in agent.find("kingfisher river heron", mode=mode))


def test_replay_reports_hits_gained_lost_and_moved(daemon, capsys):
    with Client(daemon.socket) as c:
        c.put("the red fox jumps", uri="note://fox")
        c.put("a red kite circles", uri="note://kite")
        c.session("walk", "start")
        before = c.find_reply("red", mode="lex")
        c.find_reply("circles", mode="lex")
        c.session("walk", "stop")
        assert {h.uri for h in before.hits} == {"note://fox", "note://kite"}
        # Nothing changed yet: every find answers the same.
        same = sessions.replay(c, "walk")
        assert (same.finds, same.changed) == (2, 0) and all(q.same for q in same.queries)
        then = c.flush()
        c.remove("note://fox")
        c.put("red red red: a red panda", uri="note://panda")
        c.flush()
        report = sessions.replay(c, "walk")
        red = report.queries[0]
        assert (red.query, red.same) == ("red", False)
        assert red.lost == ["note://fox"] and red.gained == ["note://panda"]
        assert report.changed == 1 and report.queries[1].same
        # Against the state the session saw: the same answers again.
        assert sessions.replay(c, "walk", as_of=then).changed == 0
        # Other settings: with k=1 the replay keeps the best hit of the two it had.
        narrow = sessions.replay(c, "walk", k=1, as_of=then).queries[0]
        assert narrow.hits == 1 and len(narrow.lost) == 1 and not narrow.gained
    assert main(cli(daemon, "replay", "walk")) == 0
    out = capsys.readouterr().out
    assert "1 of 2 finds answer differently now" in out and "+ note://panda" in out and "- note://fox" in out
    assert main(cli(daemon, "replay", "walk", "--as-of", str(then), "--json")) == 0
    report_json = json.loads(capsys.readouterr().out)
    assert report_json["changed"] == 0 and report_json["finds"] == 2


def test_bad_session_requests_are_clear_errors(daemon, capsys):
    with Client(daemon.socket) as c:
        c.session("twice", "start")
        with pytest.raises(RemoteError, match="recording already") as info:
            c.session("twice", "start")
        assert info.value.code == p.BAD_REQUEST
        with pytest.raises(RemoteError, match="no session 'never' is recording") as info:
            c.session("never", "stop")
        assert info.value.code == p.NOT_FOUND
        for bad in ("", "a/b", "x" * 300):
            with pytest.raises(RemoteError, match="session name") as info:
                c.session(bad, "start")
            assert info.value.code == p.BAD_REQUEST
        assert c.session("twice", "stop").active == []
    assert main(cli(daemon, "replay", "nothing-recorded")) == 1
    assert "no session 'nothing-recorded' is recorded" in capsys.readouterr().err


def test_hits_that_tie_may_swap_places_without_a_move():
    """Equal scores come back in either order from one search to the next (an as-of
    search walks other segments): a replay counts that as no change; a real move is one."""
    event = sessions.Event(op="find", time=0.0, seq=3, query="red", mode="lex",
                           hits=[(1, "note://fox", 0.5), (2, "note://kite", 0.5), (3, "note://hat", 0.2)])

    def reply(*hits: tuple[int, str, float]) -> p.FindReply:
        return p.FindReply(seq=4, mode="lex", hits=[
            p.HitOut(frame_id=fid, uri=uri, title=None, score=score, snippet="", highlights=[], tags={}, kind=None,
                     timestamp=0.0, commit_seq=1, valid_until=None, sources=["lex"], commit_time=0.0)
            for fid, uri, score in hits])

    swapped = sessions.compare(event, reply((2, "note://kite", 0.5), (1, "note://fox", 0.5), (3, "note://hat", 0.2)))
    assert swapped.same and not swapped.moved
    moved = sessions.compare(event, reply((3, "note://hat", 0.9), (1, "note://fox", 0.5), (2, "note://kite", 0.5)))
    assert not moved.same and moved.moved == [("note://hat", 3, 1), ("note://fox", 1, 2), ("note://kite", 1, 2)]
    assert sessions.ranks([("a", 1.0), ("b", 1.0), ("c", 0.5), ("d", 0.5), ("e", 0.1)]) == {
        "a": 1, "b": 1, "c": 3, "d": 3, "e": 5}
