"""Hostile and careless clients against a real ``memvidd run``: connection caps on both
sockets, the shared budget of client bytes (measured as the daemon's RSS), bounded request
fields, and the clients' own checks (limits learnt at hello, the server's uid).

Every daemon test ends with ``check_healthy``: the daemon still runs, serves every put it
acknowledged, and has logged no traceback.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
from daemon_util import ROOT, DaemonProc
from test_daemon_faults import (
    TIMEOUT,
    LimitedDaemon,
    call,
    check_healthy,
    codes,
    connect,
    log_tail,
    recv,
    recv_until_closed,
    seed,
    stats,
    vm_rss_kib,
)

from memvidd import protocol as p
from memvidd.client import AsyncClient, Client, ForeignPeer, RemoteError
from memvidd.framing import PREFIX, MessageTooLarge, pack_message, recv_message

pytestmark = pytest.mark.timeout(120)
MiB = 1 << 20


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProc]:
    d = DaemonProc(tmp_path, max_put=MiB, max_frame=4 * MiB)
    try:
        yield d.start()
    finally:
        d.close()


STATS_FRAME = len(pack_message(p.encoder.encode(p.Stats(id=99))))


def daemon_stats(d: DaemonProc) -> dict[str, Any]:
    """The daemon's own counters; ``buffers.bytes`` without the stats request itself (which is
    held in the budget until it is answered)."""
    with connect(d.socket) as sock:
        s = stats(sock)["daemon"]
    s["buffers"]["bytes"] -= STATS_FRAME
    return s


def wait_until(d: DaemonProc, done: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
    """The daemon's stats, once ``done`` says yes (for states the daemon sends no event about)."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        s = daemon_stats(d)
        if done(s):
            return s
        assert d.proc is not None and d.proc.poll() is None, log_tail(d)
        assert time.monotonic() < deadline, f"timed out waiting until {what}: {s}"
        time.sleep(0.02)


def given_back(d: DaemonProc, socks: list[socket.socket], acked: dict[int, str]) -> None:
    """Close ``socks`` (emptying the list): the budget they held returns whole, and the
    daemon serves on."""
    for sock in socks:
        sock.close()
    socks.clear()
    wait_until(d, lambda s: s["buffers"]["bytes"] == 0, "the budget is given back")
    check_healthy(d, acked)


def read_line(sock: socket.socket) -> dict[str, Any]:
    """One JSON line, read a byte at a time so that the next one stays in the socket."""
    data = b""
    while not data.endswith(b"\n"):
        byte = sock.recv(1)
        assert byte, f"closed after {data!r}"
        data += byte
    return json.loads(data)


# --- item 13: connection caps and the budget of client bytes --------------------------


def test_max_connections_holds_on_the_event_socket(tmp_path):
    """Each socket admits max-connections; one more gets a clear, retryable refusal in its
    own format (a protocol error on the agent socket, a JSON line on the event socket)."""
    d = LimitedDaemon(tmp_path, max_connections=3)
    socks: list[socket.socket] = []
    try:
        d.start()
        acked = seed(d)
        socks = [connect(d.events) for _ in range(3)]
        wait_until(d, lambda s: s["event_connections"] == 3, "3 event connections are open")
        for _ in range(2):
            with connect(d.events) as extra:
                refusal = read_line(extra)
                assert extra.recv(1) == b""  # and closed
            assert refusal == {"ok": False, "error": "too many connections (limit 3)", "code": p.UNAVAILABLE,
                               "retryable": True}, refusal
        # the agent socket has its own count: three producers do not lock agents out
        agents = [connect(d.socket) for _ in range(2)]
        for i, sock in enumerate(agents):
            assert isinstance(call(sock, p.Hello(id=i)), p.HelloReply)
        s = stats(agents[0])["daemon"]
        assert s["event_connections"] == 3 and s["event_refused"] == 2 and s["refused"] == 0, s
        # the admitted producers are served, and a freed slot is reused
        socks[0].sendall(b'{"text": "admitted producer"}\n')
        ack = read_line(socks[0])
        assert ack["ok"], ack
        acked[ack["id"]] = "admitted producer"
        socks.pop(0).close()
        wait_until(d, lambda s: s["event_connections"] == 2, "a slot is free")
        with connect(d.events) as again:
            again.sendall(b'{"text": "in the freed slot"}\n')
            ack = read_line(again)
        assert ack["ok"], ack
        acked[ack["id"]] = "in the freed slot"
        for sock in agents:
            sock.close()
        check_healthy(d, acked)
    finally:
        for sock in socks:
            sock.close()
        d.close()


BUDGET = 32 * MiB
LARGE = 8 * MiB  # one unfinished message per connection
HOSTILE = 24  # connections: 192 MiB of messages against a 32 MiB budget


def _send_unfinished(sock: socket.socket, data: bytes, outcome: list[str]) -> None:
    try:
        sock.sendall(data)
        outcome.append("sent")
    except (BrokenPipeError, ConnectionResetError):
        outcome.append("refused")  # the daemon refused it and hung up; its error is readable


def _flood(path: str, message: bytes) -> tuple[list[socket.socket], list[str]]:
    """``HOSTILE`` connections, each sending ``message`` (unfinished) at the same time."""
    socks = [connect(path) for _ in range(HOSTILE)]
    outcomes: list[list[str]] = [[] for _ in socks]
    threads = [threading.Thread(target=_send_unfinished, args=(s, message, o), daemon=True)
               for s, o in zip(socks, outcomes, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
        assert not t.is_alive(), "a sender is stuck: the daemon neither read nor refused its message"
    return socks, [o[0] for o in outcomes]


@pytest.mark.parametrize("which", ["agent", "events"])
def test_unfinished_large_messages_stay_within_the_buffer_budget(tmp_path, which, capsys):
    """Connections that each send most of a large message and stop: the daemon holds at most
    max-buffer-bytes of them, refuses the rest with a clear retryable error, and its RSS grows
    by about the budget, not by the messages (before the budget: +212 MiB for the frames,
    +197 MiB for the lines)."""
    d = LimitedDaemon(tmp_path, max_buffer=BUDGET, max_put=LARGE, max_frame=2 * LARGE)
    socks: list[socket.socket] = []
    try:
        d.start()
        acked = seed(d)
        before = daemon_stats(d)["buffers"]
        assert before["bytes"] == 0 and before["limit"] == BUDGET, before
        rss_before = vm_rss_kib(d.proc.pid)  # type: ignore[union-attr]
        if which == "agent":  # a frame announcing LARGE bytes, one byte short
            size = PREFIX.size + LARGE
            socks, outcomes = _flood(d.socket, PREFIX.pack(LARGE) + b"\0" * (LARGE - 1))
            # a frame is covered whole as soon as its prefix is read: the count is final now
            held = daemon_stats(d)["buffers"]
            refused = outcomes.count("refused")
        else:  # a JSON line without its end
            line = b'{"text": "' + b"a" * LARGE
            size = len(line)
            socks, outcomes = _flood(d.events, line)
            # lines are covered as they arrive: wait until each connection holds its whole
            # line or was refused (and holds nothing)
            held = wait_until(d, lambda s: s["buffers"]["bytes"] == size * (
                HOSTILE - (s["buffers"]["refused"] - before["refused"])), "every line is held or refused")["buffers"]
            refused = held["refused"] - before["refused"]
        rss_held = vm_rss_kib(d.proc.pid)  # type: ignore[union-attr]
        admitted = HOSTILE - refused
        with capsys.disabled():
            print(f"\n[{which}] {HOSTILE} x {LARGE >> 20} MiB unfinished, budget {BUDGET >> 20} MiB: "
                  f"{admitted} held, {refused} refused; daemon RSS {rss_before >> 10} -> {rss_held >> 10} MiB "
                  f"(+{(rss_held - rss_before) >> 10} MiB), buffers {held}")
        assert admitted >= 1 and refused >= 1, (admitted, refused)
        assert held["bytes"] == admitted * size <= BUDGET and held["peak"] <= BUDGET, held
        # 24 x 8 MiB arrived; what stays is the budget (plus allocator slack), not 192 MiB
        assert (rss_held - rss_before) << 10 < 3 * BUDGET, (rss_before, rss_held)
        # every refused connection was told why, retryable
        told = 0
        for sock, outcome in zip(socks, outcomes, strict=True):
            if which == "agent" and outcome == "refused":
                replies = recv_until_closed(sock)
                assert codes(replies) == [p.UNAVAILABLE] and replies[0].retryable, replies
                assert "max-buffer-bytes" in replies[0].message, replies
                told += 1
        if which == "events":
            waiting = list(socks)
            deadline = time.monotonic() + TIMEOUT
            while told < refused:
                assert time.monotonic() < deadline, f"{told} of {refused} refusals arrived"
                ready, _, _ = select.select(waiting, [], [], TIMEOUT)
                for sock in ready:
                    ack = read_line(sock)
                    assert ack["ok"] is False and ack["code"] == p.UNAVAILABLE and ack["retryable"], ack
                    assert "max-buffer-bytes" in ack["error"], ack
                    waiting.remove(sock)
                    told += 1
        assert told == refused
        # the held ones give everything back when they go, and the daemon serves on
        given_back(d, socks, acked)
    finally:
        for sock in socks:
            sock.close()
        d.close()


def test_a_put_that_cannot_get_budget_now_is_a_retryable_error_for_the_client(tmp_path):
    """A client whose put does not fit in what others hold gets the daemon's reason as a
    RemoteError (not a BrokenPipeError), and the same put goes through once they are gone."""
    d = LimitedDaemon(tmp_path, max_buffer=2 * MiB, max_put=3 * MiB, max_frame=4 * MiB)
    try:
        d.start()
        acked = seed(d)
        with connect(d.socket) as holder:
            holder.sendall(PREFIX.pack(MiB + MiB // 2) + b"\0" * 1000)  # holds 1.5 MiB, unfinished
            wait_until(d, lambda s: s["buffers"]["bytes"] >= MiB + MiB // 2, "the holder holds its frame")
            with pytest.raises(RemoteError) as e, Client(d.socket) as c:
                c.put("b" * MiB, uri="budget://later")
            assert e.value.code == p.UNAVAILABLE and e.value.retryable and "retry later" in e.value.message, e.value
        wait_until(d, lambda s: s["buffers"]["bytes"] == 0, "the holder is gone")
        with Client(d.socket) as c:
            fid = c.put("b" * MiB, uri="budget://later")
            acked[fid] = "b" * MiB
            # a frame larger than the whole budget can never fit: said so, not retryable
            with pytest.raises(RemoteError) as e:
                c.put("c" * (2 * MiB + 1))
            assert e.value.code == p.UNAVAILABLE and not e.value.retryable and "never" in e.value.message
        check_healthy(d, acked)
    finally:
        d.close()


def test_unread_replies_stay_within_the_buffer_budget(tmp_path, capsys):
    """Clients that pipeline gets of a large frame and never read the replies: the replies
    waiting to be sent are held in the budget too; beyond it, a get is answered with a
    short retryable error instead (before: RSS grew by every reply, +261 MiB here)."""
    budget, conns, gets = 16 * MiB, 4, 64
    d = LimitedDaemon(tmp_path, max_buffer=budget, max_put=MiB, max_frame=4 * MiB)
    socks: list[socket.socket] = []
    try:
        d.start()
        acked = seed(d)
        with Client(d.socket) as c:
            fid = c.put("r" * MiB)  # text: each reply decodes its own copy
        acked[fid] = "r" * MiB
        with connect(d.socket) as sock:
            send_get = pack_message(p.encoder.encode(p.Get(id=1, frame_id=fid)))
            sock.sendall(send_get)
            size = PREFIX.size + len(recv_frame_body(sock))  # one reply, as it is held
        before = daemon_stats(d)["buffers"]
        rss_before = vm_rss_kib(d.proc.pid)  # type: ignore[union-attr]
        socks = [connect(d.socket) for _ in range(conns)]
        for sock in socks:
            # ids 1..64: replies of one size (an id 0 would be left out of its reply)
            sock.sendall(b"".join(pack_message(p.encoder.encode(p.Get(id=i, frame_id=fid))) for i in range(1, gets + 1)))
        # every get ends up held (its whole reply) or refused
        held = wait_until(d, lambda s: s["buffers"]["bytes"] == size * (
            conns * gets - (s["buffers"]["refused"] - before["refused"])), "every reply is held or refused")["buffers"]
        rss_held = vm_rss_kib(d.proc.pid)  # type: ignore[union-attr]
        with capsys.disabled():
            print(f"\n{conns} x {gets} unread gets of a 1 MiB frame, budget {budget >> 20} MiB: daemon RSS "
                  f"{rss_before >> 10} -> {rss_held >> 10} MiB (+{(rss_held - rss_before) >> 10} MiB), buffers {held}")
        assert held["bytes"] <= budget and held["peak"] <= budget, held
        assert (rss_held - rss_before) << 10 < 3 * budget, (rss_before, rss_held)
        kinds = set()
        for sock in socks:
            for i in range(1, gets + 1):
                reply = recv(sock)
                assert reply.id == i, reply
                if isinstance(reply, p.GetReply):
                    assert reply.frame.text == "r" * MiB
                    kinds.add("frame")
                else:
                    assert reply.code == p.UNAVAILABLE and reply.retryable and "retry later" in reply.message, reply
                    kinds.add("refused")
        assert kinds == {"frame", "refused"}
        given_back(d, socks, acked)
    finally:
        for sock in socks:
            sock.close()
        d.close()


def test_tail_streams_never_read_stay_within_the_buffer_budget(tmp_path, capsys):
    """Tail subscribers that never read while 1 MiB puts go on: the commits queued for
    them are charged to the budget; past it a subscriber is dropped and its queue given
    back at once, so puts keep their room. Before, every subscriber could queue up to
    tail-buffer (1024) commits of any size (+150 MiB of RSS here)."""
    budget, subs, puts = 16 * MiB, 4, 150
    d = LimitedDaemon(tmp_path, max_buffer=budget, max_put=MiB, max_frame=4 * MiB)
    socks: list[socket.socket] = []
    try:
        d.start()
        socks = [connect(d.socket) for _ in range(subs)]
        for sock in socks:
            sock.sendall(pack_message(p.encoder.encode(p.Tail(id=1))) + pack_message(p.encoder.encode(p.Stats(id=2))))
            assert recv(sock).id == 2  # answered after the subscription is in place
        rss_before = vm_rss_kib(d.proc.pid)  # type: ignore[union-attr]
        acked = {}
        with Client(d.socket) as c:
            for i in range(puts):
                text = os.urandom(450_000).hex()
                acked[c.put(text, uri=f"big://{i}")] = text
        after = daemon_stats(d)
        rss_after = vm_rss_kib(d.proc.pid)  # type: ignore[union-attr]
        with capsys.disabled():
            print(f"\n{subs} tail streams never read, {puts} puts of 0.9 MB, budget {budget >> 20} MiB: daemon RSS "
                  f"{rss_before >> 10} -> {rss_after >> 10} MiB (+{(rss_after - rss_before) >> 10} MiB), "
                  f"buffers {after['buffers']}")
        assert after["buffers"]["peak"] <= budget
        assert after["buffers"]["refused"] >= subs  # each stream was dropped once over budget
        assert (rss_after - rss_before) << 10 < 3 * budget, (rss_before, rss_after)
        ends = []
        for sock in socks:  # a stream read at last: what it held, then the reason it ended
            while isinstance(reply := recv(sock), p.TailEvent):
                pass
            ends.append(reply)
        assert all(isinstance(e, p.TailEnd) and e.reason == p.SLOW_CONSUMER for e in ends), ends
        for sock in socks:
            sock.close()
        check_healthy(d, {fid: acked[fid] for fid in list(acked)[-3:]})
    finally:
        for sock in socks:
            sock.close()
        d.close()


def recv_frame_body(sock: socket.socket) -> bytes:
    body = recv_message(sock, 1 << 30)
    assert body is not None
    return body


def test_pipelined_puts_give_their_budget_back(daemon):
    """The budget covers requests until they are answered (a put: durable); after a burst of
    pipelined puts is answered, all of it is given back."""
    acked = seed(daemon)
    with connect(daemon.socket) as sock:
        texts = [f"pipelined {i} " + "p" * 50_000 for i in range(40)]
        sock.sendall(b"".join(pack_message(p.encoder.encode(p.Put(id=i, text=t))) for i, t in enumerate(texts)))
        replies = [recv(sock) for _ in texts]
        assert codes(replies) == ["put_reply"] * len(texts), replies
        acked.update({r.frame_ids[0]: t for r, t in zip(replies, texts, strict=True)})
        s = stats(sock)["daemon"]["buffers"]
        assert s["peak"] >= 50_000 and s["bytes"] == STATS_FRAME, s  # only the stats request itself
    check_healthy(daemon, acked)


# --- item 14: hostile request bodies ----------------------------------------------------


def nested(depth: int) -> bytes:
    """msgpack of {"a": {"a": ... {} ...}}, ``depth`` maps deep (msgspec cannot encode it)."""
    return b"\x81\xa1a" * depth + b"\x80"


def test_deeply_nested_msgpack_is_bad_frame(daemon):
    acked = seed(daemon)
    body = b"\x83\xa2op\xa9set_rules\xa2id\x07\xa5rules" + nested(100_000)
    for path in (daemon.socket, daemon.events):
        with connect(path) as sock:
            sock.sendall(pack_message(body))
            replies = recv_until_closed(sock)
        assert codes(replies) == [p.BAD_FRAME] and "nested too deeply" in replies[0].message, replies
    # and a JSON event nested as deep is an error line; the stream goes on
    with connect(daemon.events) as sock:
        sock.sendall(b'{"text": "x", "tags": ' + b"[" * 100_000 + b"]" * 100_000 + b'}\n{"text": "after nesting"}\n')
        bad, good = read_line(sock), read_line(sock)
    assert bad["ok"] is False and "nested too deeply" in bad["error"], bad
    assert good["ok"], good
    acked[good["id"]] = "after nesting"
    check_healthy(daemon, acked)


BIG = "x" * MiB
OUT_OF_BOUNDS = {
    "find-scope-1MB": p.Find(query="seed", scope=BIG),
    "find-scope-past-the-limit": p.Find(query="seed", scope="u://" + "\u00e9" * (p.MAX_SCOPE // 2)),  # bytes, not chars
    "find-query": p.Find(query="seed " * 4000),
    "find-snippet-chars": p.Find(query="seed", snippet_chars=10**9),
    "find-tags": p.Find(query="seed", tags={f"k{i}": "v" for i in range(p.MAX_TAGS + 1)}),
    "find-kind": p.Find(query="seed", kind=BIG),
    "tail-scope": p.Tail(scope=BIG),
    "put-uri": p.Put(text="t", uri="u://" + "a" * p.MAX_URI),
    "put-title": p.Put(text="t", title=BIG),
    "put-tag-value": p.Put(text="t", tags={"k": BIG}),
    "put-tag-key": p.Put(text="t", tags={"k" * 300: "v"}),
    "put-many-item": p.PutMany(items=[p.PutItem(text="fine"), p.PutItem(text="t", kind=BIG)]),
    "get-uri": p.Get(uri=BIG),
    "remove-uri": p.Remove(uri=BIG),
    "timeline-limit": p.Timeline(limit=10**12),
    "capsule-name": p.Stats(capsule=BIG),
    "set-rules-size": p.SetRules(rules={"tags": {f"k{i}=v": {"max_age_s": 1e9} for i in range(5000)}}),
}


@pytest.mark.parametrize("name", sorted(OUT_OF_BOUNDS))
def test_request_fields_out_of_bounds_are_bad_request(daemon, name):
    """Each field that reaches the engine, its caches or a reply is bounded (docs/protocol.md,
    Limits): beyond, a bad_request naming the field; the connection goes on, nothing stored."""
    acked = seed(daemon)
    msg = msgspec.structs.replace(OUT_OF_BOUNDS[name], id=5)
    with connect(daemon.socket) as sock:
        reply = call(sock, msg)
        assert isinstance(reply, p.Error) and reply.code == p.BAD_REQUEST and reply.id == 5, reply
        assert "exceed" in reply.message and not reply.retryable, reply
        after = call(sock, p.Stats(id=6))
        assert after.stats["live_frames"] == len(acked), after  # nothing of it was stored
    check_healthy(daemon, acked)


def test_bounds_at_their_limits_are_served(daemon):
    """The limits are usable: a scope of 512 bytes of 2-byte characters (Tantivy's regex
    fails near 1000), a URI of 4096 bytes, 64 tags."""
    acked = seed(daemon)
    uri = "u://" + "\u00e9" * 2046  # 4096 bytes
    tags = {f"k{i}": "v" * 100 for i in range(p.MAX_TAGS)}
    with Client(daemon.socket) as c:
        fid = c.put("at the limits", uri=uri, tags=tags, kind="k" * p.MAX_NAME, title="t" * p.MAX_TITLE)
        acked[fid] = "at the limits"
        hits = c.find("limits", mode="lex", scope=uri[: len("u://") + 254])  # 4 + 508 bytes
        assert [h.frame_id for h in hits] == [fid]
        assert [h.frame_id for h in c.find("limits", mode="lex", scope="u://", tags=tags)] == [fid]
        assert len(c.timeline(limit=p.MAX_TIMELINE)) == len(acked)
    check_healthy(daemon, acked)


def test_event_lines_with_fields_out_of_bounds_are_error_lines(daemon):
    acked = seed(daemon)
    with connect(daemon.events) as sock:
        sock.sendall(json.dumps({"text": "t", "uri": "u://" + "a" * p.MAX_URI}).encode() + b"\n"
                     + json.dumps({"text": "t", "tags": {f"k{i}": "v" for i in range(p.MAX_TAGS + 1)}}).encode() + b"\n"
                     + b'{"text": "within bounds"}\n')
        acks = [read_line(sock) for _ in range(3)]
    assert [a["ok"] for a in acks] == [False, False, True], acks
    assert f"uri of {p.MAX_URI + 4} bytes exceeds" in acks[0]["error"], acks
    assert f"{p.MAX_TAGS + 1} tags exceed" in acks[1]["error"], acks
    acked[acks[2]["id"]] = "within bounds"
    check_healthy(daemon, acked)


def test_reply_larger_than_max_frame_is_an_error_not_an_unreadable_frame(tmp_path):
    """max-put-bytes above max-frame-bytes (an admin's choice): an event can store a frame
    whose get reply would be larger than any client reads; it is answered bad_request."""
    d = DaemonProc(tmp_path, max_put=2 * MiB, max_frame=MiB)
    try:
        d.start()
        acked = seed(d)
        big = "g" * (MiB + MiB // 2)
        with connect(d.events) as sock:
            sock.sendall(json.dumps({"text": big, "uri": "big://one"}).encode() + b"\n")
            ack = read_line(sock)
        assert ack["ok"], ack
        acked_big = ack["id"]
        with Client(d.socket) as c:
            with pytest.raises(RemoteError) as e:
                c.get(acked_big)
            assert e.value.code == p.BAD_REQUEST and "exceeds max_frame" in e.value.message, e.value
            assert c.get(uri="seed://0").text == acked[min(acked)]  # the connection goes on
        check_healthy(d, acked)
    finally:
        d.close()


# --- item 14, client half: the limits learnt at hello -----------------------------------


def daemon_says(d: DaemonProc, msg: Any) -> p.Error:
    """The daemon's own answer to ``msg``, over a raw socket (no client-side check)."""
    with connect(d.socket) as sock:
        reply = call(sock, msg)
    assert isinstance(reply, p.Error), reply
    return reply


def test_sync_client_refuses_what_the_daemon_would_refuse(daemon):
    acked = seed(daemon)
    over = "o" * (MiB + 1)  # over max-put-bytes (1 MiB), under max-frame-bytes (4 MiB)
    daemon_error = daemon_says(daemon, p.Put(id=1, text=over))
    with Client(daemon.socket) as c:
        assert c.server.max_put == MiB and c.server.max_frame == 4 * MiB
        for huge in (over, "o" * (5 * MiB)):  # the second one, over max-frame too, was a BrokenPipeError
            with pytest.raises(RemoteError) as e:
                c.put(huge)
            assert (e.value.code, e.value.retryable) == (p.BAD_REQUEST, False)
        with pytest.raises(RemoteError) as e:
            c.put(over)
        assert (e.value.code, e.value.message) == (daemon_error.code, daemon_error.message)
        # items each within max-put, together over max-frame: the daemon's frame_too_large
        items = [{"text": "i" * (MiB - 100)} for _ in range(5)]
        with pytest.raises(RemoteError) as e:
            c.put_many(items)
        frame = int(e.value.message.split()[2])
        assert e.value.code == p.FRAME_TOO_LARGE and frame > 5 * (MiB - 100), e.value
        assert e.value.message == str(MessageTooLarge(frame, 4 * MiB)), e.value  # the daemon's words
        with pytest.raises(RemoteError) as e:
            c.find("x", scope="s" * (p.MAX_SCOPE + 1))
        assert e.value.code == p.BAD_REQUEST and "scope" in e.value.message
        fid = c.put("still connected")  # nothing was sent: the connection is fine
        acked[fid] = "still connected"
        assert c.stats()["daemon"]["requests"] >= 2
    check_healthy(daemon, acked)


def test_async_client_refuses_what_the_daemon_would_refuse(daemon):
    acked = seed(daemon)
    daemon_error = daemon_says(daemon, p.Put(id=1, text="o" * (MiB + 1)))

    async def main() -> int:
        with trio.fail_after(TIMEOUT):
            c = await AsyncClient.connect(daemon.socket)
        async with c:
            assert c.server.max_put == MiB
            for huge in ("o" * (MiB + 1), "o" * (5 * MiB)):  # the second one was a BrokenResourceError
                with pytest.raises(RemoteError) as e:
                    await c.put(huge)
                assert e.value.code == p.BAD_REQUEST and f"payload of {len(huge)} bytes" in e.value.message
            assert e.value.message.replace(str(5 * MiB), str(MiB + 1)) == daemon_error.message
            with pytest.raises(RemoteError) as e:
                await c.put_many([{"text": "i" * (MiB - 100)} for _ in range(5)])
            assert e.value.code == p.FRAME_TOO_LARGE
            return await c.put("async still connected")

    fid = trio.run(main)
    acked[fid] = "async still connected"
    check_healthy(daemon, acked)


def test_cli_put_over_max_put_is_a_clear_error(daemon, tmp_path):
    big = tmp_path / "big.txt"
    big.write_text("c" * (5 * MiB))  # over max-put-bytes and over max-frame-bytes
    r = subprocess.run([sys.executable, "-m", "memvidd", "put", "--socket", daemon.socket, "--file", str(big)],
                       check=False, capture_output=True, text=True, cwd=ROOT, timeout=TIMEOUT)
    assert r.returncode == 1, r
    assert r.stderr.strip() == f"memvidd: bad_request: payload of {5 * MiB} bytes exceeds the limit of {MiB}", r.stderr
    check_healthy(daemon, {})


# --- item 12, client half: the server's uid ----------------------------------------------


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """A plain Unix socket standing where a daemon's would be (it never answers)."""
    path = str(tmp_path / "impostor.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as srv:
        srv.bind(path)
        srv.listen(4)
        srv.settimeout(TIMEOUT)
        yield path, srv


def accepted_and_silent(srv: socket.socket) -> None:
    """The client connected, sent nothing, and hung up."""
    conn, _ = srv.accept()
    with conn:
        conn.settimeout(TIMEOUT)
        assert conn.recv(65536) == b""


@pytest.fixture
def another_user(monkeypatch):
    """The tests run as one uid: the client is made to believe it is another one, so that
    the socket's (real) owner is a stranger to it."""
    stranger = os.getuid() + 4242
    monkeypatch.setattr(os, "getuid", lambda: stranger)
    return stranger


def test_sync_client_refuses_a_socket_of_another_uid_before_sending(listener, another_user):
    path, srv = listener
    real = os.geteuid()
    with pytest.raises(ForeignPeer) as e:
        Client(path, timeout=TIMEOUT)
    assert isinstance(e.value, PermissionError)
    assert f"served by uid {real}, not by you (uid {another_user})" in str(e.value), e.value
    accepted_and_silent(srv)


def test_async_client_refuses_a_socket_of_another_uid_before_sending(listener, another_user):
    path, srv = listener

    async def main() -> None:
        with trio.fail_after(TIMEOUT):
            await AsyncClient.connect(path)

    with pytest.raises(ForeignPeer, match="not by you"):
        trio.run(main)
    accepted_and_silent(srv)


def test_clients_accept_their_own_users_daemon(daemon):
    with Client(daemon.socket) as c:
        assert c.stats()["daemon"]["connections"] == 1
