"""Read your writes: a find with ``min_seq`` answers only once that commit is searchable,
lexically and (``semantic``) by meaning; the clients and the command line use it. A real
daemon, real sockets; the semantic test runs the real embedding model."""

from __future__ import annotations

import json
import select
import socket

import pytest
import trio

import engine
from daemon_util import DaemonProc
from memvidd import protocol as p
from memvidd.cli import main
from memvidd.client import AsyncClient, Client, RemoteError
from memvidd.framing import pack_message, recv_message

pytestmark = pytest.mark.timeout(120)


def test_a_find_with_min_seq_waits_for_that_commit(daemon):
    """A find naming a commit not made yet is answered once it is, with what it brought."""
    with Client(daemon.socket) as writer, socket.socket(socket.AF_UNIX) as reader:
        head = writer.flush()
        reader.connect(daemon.socket)
        reader.sendall(pack_message(p.encoder.encode(p.Find(id=7, query="zebra", mode="lex", min_seq=head + 1))))
        # The find waits: no reply while the commit it names is not made (an older daemon,
        # which ignores min_seq, answered at once, without the zebra).
        assert select.select([reader], [], [], 0.3)[0] == []
        assert writer.put_reply("a zebra crossed the road", uri="note://zebra").seq == head + 1
        reader.settimeout(30)
        reply = p.reply_decoder.decode(recv_message(reader, p.DEFAULT_MAX_FRAME))
    assert isinstance(reply, p.FindReply) and reply.id == 7 and [h.uri for h in reply.hits] == ["note://zebra"]
    assert reply.seq >= head + 1


def test_a_commit_not_made_in_time_is_a_retryable_error(daemon):
    with Client(daemon.socket) as c:
        seq = c.put_reply("the only note").seq
        assert "min_seq" in c.server.features
        with pytest.raises(RemoteError) as info:
            c.find("note", min_seq=seq + 5, wait_s=0.2)
        assert info.value.code == p.UNAVAILABLE and info.value.retryable
        assert f"commit {seq + 5} was not made within 0.2 s (the capsule is at commit {seq}" in info.value.message
        assert [h.commit_seq for h in c.find("note", min_seq=seq)] == [seq]  # the connection goes on
        for bad, why in (({"min_seq": -1}, "min_seq -1 is negative"), ({"min_seq": 1, "wait_s": 0}, "wait_s 0"),
                         ({"min_seq": 1, "wait_s": 61}, "wait_s 61 is not within")):
            with pytest.raises(RemoteError, match=why) as info:
                c.find("note", **bad)
            assert info.value.code == p.BAD_REQUEST
    # The daemon itself refuses them too (a client that does not check first).
    with socket.socket(socket.AF_UNIX) as raw:
        raw.connect(daemon.socket)
        raw.sendall(pack_message(p.encoder.encode({"op": "find", "id": 1, "query": "x", "min_seq": -3})))
        reply = p.reply_decoder.decode(recv_message(raw, p.DEFAULT_MAX_FRAME))
    assert isinstance(reply, p.Error) and reply.code == p.BAD_REQUEST and "min_seq -3" in reply.message


def test_the_clients_remember_their_writes(daemon):
    with Client(daemon.socket) as c:
        assert c.written == {}
        fid = c.put("first")
        ids = c.put_many([{"text": "second"}, {"text": "third"}])
        assert c.written[None] == c.get(ids[0]).commit_seq > c.get(fid).commit_seq
        c.remove(fid)
        assert c.written[None] == c.flush() == c.get(ids[0]).commit_seq + 1
        c.searchable()  # the last write, by meaning too: at once on a daemon without a model
        hits = c.find("third", wait=True)
        assert [h.frame_id for h in hits] == [ids[1]]


def test_the_command_line_waits_for_a_put(daemon, capsys):
    sock = ["--socket", daemon.socket]
    assert main(["put", "the heron waits by the river", "--wait", "--json", *sock]) == 0
    seq = json.loads(capsys.readouterr().out)["seq"]
    assert main(["find", "heron", "--min-seq", str(seq), "--json", *sock]) == 0
    assert [h["commit_seq"] for h in json.loads(capsys.readouterr().out)["hits"]] == [seq]
    assert main(["find", "river", "--wait", "--json", *sock]) == 0
    assert len(json.loads(capsys.readouterr().out)["hits"]) == 1


@pytest.mark.trio
async def test_the_async_client_reads_its_writes(tmp_path):
    d = DaemonProc(tmp_path)
    await trio.to_thread.run_sync(d.start)
    try:
        async with await AsyncClient.connect(d.socket) as c:
            reply = await c.put_reply("an async otter", uri="a://otter")
            assert c.written[None] == reply.seq
            await c.searchable(reply.seq)
            assert [h.uri for h in await c.find("otter", wait=True)] == ["a://otter"]
            assert (await c.find_reply("otter", min_seq=reply.seq)).seq >= reply.seq
    finally:
        await trio.to_thread.run_sync(d.close)


TEXTS = [f"{animal} {habit}" for animal in ("The otter", "A heron", "The badger", "An owl", "The fox", "A beaver")
         for habit in ("sleeps in a burrow by day", "hunts along the riverbank at dusk", "builds a dam of sticks",
                       "eats berries in late summer", "swims in cold water", "calls loudly at night",
                       "digs for worms after rain", "hides food for the winter")]


@pytest.mark.timeout(240)
def test_semantic_min_seq_waits_for_the_vectors_with_the_real_model(tmp_path):
    """Vectors are made in the background after the commit: a semantic find with min_seq
    answers only once every text frame up to it has one, so all of them are found by
    meaning (without the wait, a find right after the put found only the few embedded)."""
    d = DaemonProc(tmp_path)
    d.config.write_text(d.config.read_text().replace('model = "none"', f'model = "{engine.DEFAULT_MODEL}"'))
    try:
        d.start(timeout=120)
        with Client(d.socket) as c:
            c.put_many([{"text": t, "uri": f"animal://{i}"} for i, t in enumerate(TEXTS)])
            hits = c.find("which animal lives near water", mode="vec", k=len(TEXTS), wait=True)
            assert len(hits) == len(TEXTS)
            one = c.put_reply("The quarterly tax return is due on the fifteenth of April", uri="todo://taxes")
            with Client(d.socket) as other:  # another connection, told the commit
                found = other.find("when must I file my taxes", mode="vec", k=1, min_seq=one.seq, semantic=True)
            assert [h.uri for h in found] == ["todo://taxes"]
    finally:
        d.close()
