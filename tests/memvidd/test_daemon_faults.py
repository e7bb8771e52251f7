"""Fault injection against a real ``memvidd run``: hostile, broken and slow clients.

Every test pokes a real daemon process over real Unix sockets, then shows that the
daemon is still up, answers a fresh client, and still serves every put it acknowledged
before (``check_healthy``). Several of these found real bugs (a vanishing client took the
daemon down, invalid UTF-8 or a lone surrogate killed it, big commits dropped fast tail
readers); they are regression tests now.
"""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from daemon_util import ROOT, DaemonProc
from memvidd import protocol as p
from memvidd.client import Client
from memvidd.framing import PREFIX, TruncatedMessage, pack_message, recv_message

pytestmark = pytest.mark.timeout(120)

TIMEOUT = 30.0  # seconds, for every socket operation of these tests
REPLY_LIMIT = 1 << 28


# --- helpers --------------------------------------------------------------------------


class DaemonDied(AssertionError):
    """The daemon process is gone (or stopped answering) after a poke."""


class LimitedDaemon(DaemonProc):
    """A DaemonProc whose configuration also sets ``limits.max-connections`` and, given,
    ``limits.max-buffer-bytes``.

    (DaemonProc.write_config only takes max_put/max_frame/tail_buffer.)
    """

    def __init__(self, tmp: Path, *, max_connections: int = 1024, max_buffer: int | None = None, **kw: Any) -> None:
        self.extra = f"max-connections = {max_connections}\n"
        if max_buffer is not None:
            self.extra += f"max-buffer-bytes = {max_buffer}\n"
        super().__init__(tmp, **kw)

    def write_config(self, capsules: tuple[str, ...], **limits: int) -> None:
        super().write_config(capsules, **limits)
        text = self.config.read_text()
        assert "[limits]\n" in text
        self.config.write_text(text.replace("[limits]\n", "[limits]\n" + self.extra, 1))


def connect(path: str, timeout: float = TIMEOUT) -> socket.socket:
    """A connected AF_UNIX stream socket with ``timeout`` on every operation.

    The connect itself is blocking, bounded by SO_SNDTIMEO: a non-blocking AF_UNIX connect
    fails with EAGAIN when the listen backlog is momentarily full instead of waiting.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", int(timeout), 0))
        sock.connect(path)
        sock.settimeout(timeout)
    except BaseException:
        sock.close()
        raise
    return sock


def body(msg: Any) -> bytes:
    """A frame body: raw bytes as they are, a dict as msgpack, else a protocol struct."""
    if isinstance(msg, (bytes, bytearray)):
        return bytes(msg)
    if isinstance(msg, dict):
        return msgspec.msgpack.encode(msg)
    return p.encoder.encode(msg)


def send(sock: socket.socket, *msgs: Any) -> None:
    sock.sendall(b"".join(pack_message(body(m)) for m in msgs))


def try_send(sock: socket.socket, *msgs: Any) -> None:
    """Send, unless the daemon already closed the connection (its reply is still readable)."""
    try:
        send(sock, *msgs)
    except (BrokenPipeError, ConnectionResetError):
        pass


def recv(sock: socket.socket) -> Any:
    """The next reply, or None when the daemon closed the connection."""
    data = recv_message(sock, REPLY_LIMIT)
    return None if data is None else p.reply_decoder.decode(data)


def recv_until_closed(sock: socket.socket) -> list[Any]:
    """Every reply until the daemon closes the connection.

    A reset counts as closed: Linux reports ECONNRESET (after the queued data) when the
    daemon closes a connection with bytes of ours still unread.
    """
    out = []
    while True:
        try:
            reply = recv(sock)
        except ConnectionResetError:
            return out
        if reply is None:
            return out
        out.append(reply)


def call(sock: socket.socket, msg: Any) -> Any:
    send(sock, msg)
    reply = recv(sock)
    assert reply is not None, "the daemon closed the connection"
    return reply


def codes(replies: list[Any]) -> list[str]:
    return [r.code if isinstance(r, p.Error) else r.__struct_config__.tag for r in replies]


def get_many(sock: socket.socket, ids: list[int], chunk: int = 256) -> dict[int, p.FrameOut]:
    """Pipelined gets, a chunk at a time (the daemon's window and our buffers stay bounded)."""
    out: dict[int, p.FrameOut] = {}
    for start in range(0, len(ids), chunk):
        part = ids[start : start + chunk]
        send(sock, *(p.Get(id=i + 1, frame_id=fid) for i, fid in enumerate(part)))
        for i, fid in enumerate(part):
            reply = recv(sock)
            if reply is None:
                raise ConnectionError("the daemon closed the connection")
            assert reply.id == i + 1, reply
            assert isinstance(reply, p.GetReply), reply
            out[fid] = reply.frame
    return out


def log_tail(d: DaemonProc, n: int = 4000) -> str:
    return d.log.read_text(errors="replace")[-n:] if d.log.exists() else "(no log)"


def died(d: DaemonProc, why: str) -> DaemonDied:
    assert d.proc is not None
    try:
        rc: int | None = d.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        rc = None
    state = f"exited with status {rc}" if rc is not None else "still running but not answering"
    return DaemonDied(f"daemon {state} ({why}); log:\n{log_tail(d)}")


def exited(d: DaemonProc, grace: float = 10) -> bool:
    """Whether the daemon exits within ``grace`` seconds (it may be dying right now)."""
    assert d.proc is not None
    try:
        d.proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        return False
    return True


def check_healthy(d: DaemonProc, acked: dict[int, str], path: str | None = None) -> None:
    """The daemon runs, answers a new client, serves every acknowledged put, takes a new one,
    and has logged no traceback."""
    assert d.proc is not None
    if d.proc.poll() is not None:
        raise died(d, "found dead")
    try:
        with connect(path or d.socket) as sock:
            hello = call(sock, p.Hello(id=1, client="health-check"))
            assert isinstance(hello, p.HelloReply), hello
            frames = get_many(sock, sorted(acked))
            put = call(sock, p.Put(id=2, text="health probe", uri=f"health://{time.monotonic_ns()}"))
            assert isinstance(put, p.PutReply), put
            probe = call(sock, p.Get(id=3, frame_id=put.frame_ids[0]))
            assert isinstance(probe, p.GetReply) and probe.frame.text == "health probe"
    except (OSError, TruncatedMessage, AssertionError) as e:
        if not exited(d):
            raise  # a real failure of a running daemon
        raise died(d, f"health check: {type(e).__name__}: {e}") from e
    lost = {fid: text for fid, text in acked.items() if frames[fid].text != text}
    assert not lost, f"acknowledged puts lost or changed: {sorted(lost)[:20]}"
    assert "Traceback" not in d.log.read_text(errors="replace"), log_tail(d)


def seed(d: DaemonProc, n: int = 20, prefix: str = "seed") -> dict[int, str]:
    """``n`` acknowledged puts, as {frame id: text}."""
    with Client(d.socket) as c:
        texts = [f"{prefix} frame {i} {prefix}{i}" for i in range(n)]
        ids = c.put_many([{"text": t, "uri": f"{prefix}://{i}"} for i, t in enumerate(texts)])
    return dict(zip(ids, texts, strict=True))


def stats(sock: socket.socket) -> dict[str, Any]:
    reply = call(sock, p.Stats(id=99))
    assert isinstance(reply, p.StatsReply), reply
    return reply.stats


def poll_until(d: DaemonProc, done: Any, what: str, timeout: float = TIMEOUT) -> None:
    """Ask the daemon (``done(sock)``, on one connection) until it says yes; for states the
    daemon sends no event about. A daemon that dies meanwhile raises DaemonDied."""
    deadline = time.monotonic() + timeout
    try:
        while True:
            with connect(d.socket) as sock:
                hello = call(sock, p.Hello(id=1))
                if isinstance(hello, p.Error) and hello.code == p.UNAVAILABLE:
                    # at max-connections: the ones just closed are not reaped yet
                    assert time.monotonic() < deadline, f"refused while waiting until {what}: {hello}"
                    recv_until_closed(sock)
                    time.sleep(0.02)
                    continue
                while not done(sock):
                    assert time.monotonic() < deadline, f"timed out waiting until {what}"
                    time.sleep(0.02)
                return
    except (OSError, TruncatedMessage, AssertionError) as e:
        if not exited(d):
            raise
        raise died(d, f"waiting until {what}: {type(e).__name__}: {e}") from e


def settle(d: DaemonProc, connections: int = 1) -> None:
    """Wait until the daemon counts ``connections`` open agent connections (the polling
    one included), i.e. it is done with the ones the test closed."""
    poll_until(d, lambda sock: stats(sock)["daemon"]["connections"] == connections,
               f"{connections} connection(s) are open")


def vm_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def json_acks(path: str, payload: bytes) -> list[dict[str, Any]]:
    """Send JSON lines to the event socket, half-close, and read every ack line."""
    with connect(path) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return [json.loads(line) for line in data.splitlines()]


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProc]:
    d = DaemonProc(tmp_path)
    try:
        yield d.start()
    finally:
        d.close()


@pytest.fixture
def small(tmp_path: Path) -> Iterator[DaemonProc]:
    """max-put-bytes 4096: the event socket's line limit is 8192."""
    d = DaemonProc(tmp_path, max_put=4096)
    try:
        yield d.start()
    finally:
        d.close()


# --- 1. garbage ----------------------------------------------------------------------

_rng = random.Random(20240611)
GARBAGE_BODIES = {
    "opcode-c1": b"\xc1\xc1 never valid msgpack",
    "empty-body": b"",
    "random": _rng.randbytes(100),
    "not-a-map": msgspec.msgpack.encode([1, 2, 3]),
    "nil": msgspec.msgpack.encode(None),
    "no-op": msgspec.msgpack.encode({"id": 1, "query": "x"}),
    "op-not-str": msgspec.msgpack.encode({"op": 7}),
    "trailing-bytes": msgspec.msgpack.encode({"op": "hello"}) + b"\x00",
}


@pytest.mark.parametrize("name", sorted(GARBAGE_BODIES))
@pytest.mark.parametrize("which", ["agent", "events"])
def test_valid_prefix_then_garbage_body_is_bad_frame(daemon, which, name):
    """(The event socket speaks the same frames when the first byte is not JSON-ish.)"""
    acked = seed(daemon)
    with connect(daemon.socket) as bystander:
        assert isinstance(call(bystander, p.Hello(id=1)), p.HelloReply)
        with connect(daemon.socket if which == "agent" else daemon.events) as sock:
            # a request before the garbage is still answered, the one after it never is
            send(sock, p.Hello(id=5), GARBAGE_BODIES[name], p.Hello(id=6))
            replies = recv_until_closed(sock)
        assert codes(replies) == ["hello_reply", p.BAD_FRAME], replies
        assert replies[0].id == 5 and not replies[1].retryable
        assert isinstance(call(bystander, p.Put(id=2, text="bystander")), p.PutReply)
    check_healthy(daemon, acked)


@pytest.mark.parametrize("seed_", range(3))
@pytest.mark.parametrize("kind", ["raw", "fitting-prefix", "short-body"])
def test_random_bytes_on_the_agent_socket(daemon, kind, seed_):
    """Random bytes, as they come (the prefix is mostly huge), after a prefix that fits
    them, or after one that asks for more than is sent before the client half-closes."""
    acked = seed(daemon)
    rng = random.Random(seed_)
    junk = rng.randbytes(rng.randrange(1, 4096))
    if kind == "fitting-prefix":
        junk = PREFIX.pack(len(junk)) + junk
    elif kind == "short-body":
        junk = PREFIX.pack(len(junk) + 100) + junk
    with connect(daemon.socket) as sock:
        sock.sendall(junk)
        sock.shutdown(socket.SHUT_WR)
        replies = recv_until_closed(sock)
    (length,) = PREFIX.unpack_from(junk.ljust(4, b"\0"))
    if length > 4 << 20:
        expected = [p.FRAME_TOO_LARGE]
    elif len(junk) < 4 or length > len(junk) - 4:
        expected = []  # the stream ended inside the frame
    else:
        expected = [p.BAD_FRAME]
    assert codes(replies) == expected, (length, len(junk), replies)
    check_healthy(daemon, acked)


def test_http_request_on_the_agent_socket_is_frame_too_large(daemon):
    """Someone points curl at the socket: "GET " read as a length is ~1.2 GB."""
    acked = seed(daemon)
    with connect(daemon.socket) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        replies = recv_until_closed(sock)
    assert codes(replies) == [p.FRAME_TOO_LARGE], replies
    check_healthy(daemon, acked)


def test_msgpack_string_that_is_not_utf8_is_bad_frame(daemon):
    acked = seed(daemon)
    # {"op": "put", "text": <str 0xff 0xfe>}: well-formed msgpack framing, invalid UTF-8
    bad = b"\x82\xa2op\xa3put\xa4text\xa2\xff\xfe"
    with connect(daemon.socket) as sock:
        send(sock, bad)
        replies = recv_until_closed(sock)
    check_healthy(daemon, acked)
    assert codes(replies) == [p.BAD_FRAME], replies


# --- 2. truncated frames -------------------------------------------------------------


@pytest.mark.parametrize("sent", [b"\x00\x00", pack_message(b"\x00" * 100)[:14]],
                         ids=["inside-prefix", "inside-body"])
def test_truncated_frame_then_close(daemon, sent):
    acked = seed(daemon)
    with connect(daemon.socket) as sock:
        sock.sendall(sent)
    settle(daemon)  # the daemon has seen the end of that stream
    check_healthy(daemon, acked)


def test_truncated_frame_half_closed(daemon):
    """The stream ends inside a frame while the client still reads: the daemon may say
    bad_frame (the spec does not say), and closes."""
    acked = seed(daemon)
    for path in (daemon.socket, daemon.events):
        with connect(path) as sock:
            sock.sendall(PREFIX.pack(100) + b"x" * 10)
            sock.shutdown(socket.SHUT_WR)
            replies = recv_until_closed(sock)
        assert set(codes(replies)) <= {p.BAD_FRAME}, (path, replies)
    check_healthy(daemon, acked)


# --- 3. huge length prefix -----------------------------------------------------------


@pytest.mark.parametrize("which", ["agent", "events"])
def test_4gib_length_prefix_is_refused_without_allocating(daemon, which):
    acked = seed(daemon)
    assert daemon.proc is not None
    before = vm_rss_kib(daemon.proc.pid)
    for _ in range(3):
        with connect(daemon.socket if which == "agent" else daemon.events) as sock:
            sock.sendall(b"\xff\xff\xff\xff")  # 4 GiB - 1: also a non-JSON first byte
            replies = recv_until_closed(sock)
        assert codes(replies) == [p.FRAME_TOO_LARGE], replies
    after = vm_rss_kib(daemon.proc.pid)
    assert after - before < 64 * 1024, f"RSS grew from {before} to {after} KiB"
    check_healthy(daemon, acked)


def test_frame_of_exactly_max_frame_is_read(daemon):
    """The limit is inclusive; such a frame is read (and its put refused by max-put-bytes)."""
    acked = seed(daemon)
    with connect(daemon.socket) as sock:
        hello = call(sock, p.Hello(id=1))
        limit = hello.max_frame
        head = msgspec.msgpack.encode({"op": "put", "id": 2, "data": b""})[:-2]  # without bin8 0xc4 0x00
        payload_len = limit - len(head) - 5  # bin32: 0xc6 + 4-byte length
        frame = head + b"\xc6" + struct.pack(">I", payload_len) + b"\0" * payload_len
        assert len(frame) == limit
        send(sock, frame)
        reply = recv(sock)
        assert isinstance(reply, p.Error) and reply.code == p.BAD_REQUEST and reply.id == 2, reply
        assert isinstance(call(sock, p.Hello(id=3)), p.HelloReply)  # the connection goes on
        sock.sendall(PREFIX.pack(limit + 1))
        assert codes(recv_until_closed(sock)) == [p.FRAME_TOO_LARGE]
    check_healthy(daemon, acked)


# --- 4. unknown op, wrong field types ------------------------------------------------


@pytest.mark.parametrize("msg", [
    {"op": "nope", "id": 1},
    {"op": "find", "id": 1, "query": 5},
    {"op": "put", "id": 1, "text": ["x"]},
    {"op": "put_many", "id": 1, "items": [{"text": "ok"}, {"text": 1}]},
    {"op": "hello", "id": "one"},
    {"op": "get", "id": 1, "frame_id": "7"},
    {"op": "find", "id": 1, "query": "x", "tags": {"a": 1}},
], ids=["unknown-op", "find-query-int", "put-text-list", "put-many-item", "id-str", "get-frame-id-str",
        "tags-int"])
def test_unknown_op_and_wrong_types_close_only_that_connection(daemon, msg):
    acked = seed(daemon)
    with connect(daemon.socket) as bystander:
        assert isinstance(call(bystander, p.Hello(id=1)), p.HelloReply)
        with connect(daemon.socket) as sock:
            send(sock, msg)
            replies = recv_until_closed(sock)
        assert codes(replies) == [p.BAD_FRAME], replies
        assert not replies[0].retryable
        # the other connection was not touched
        put = call(bystander, p.Put(id=2, text="still here", uri="bystander://1"))
        assert isinstance(put, p.PutReply)
        acked[put.frame_ids[0]] = "still here"
        assert isinstance(call(bystander, p.Find(id=3, query="still", mode="lex")), p.FindReply)
    if msg["op"] == "put_many":  # nothing of a refused put_many is stored
        with Client(daemon.socket) as c:
            assert c.find("ok", mode="lex") == []
    check_healthy(daemon, acked)


# --- 5. idle and stalled clients -----------------------------------------------------


def test_idle_and_stalled_clients_do_not_block_others(daemon):
    acked = seed(daemon)
    idle = connect(daemon.socket)
    half_prefix = connect(daemon.socket)
    half_body = connect(daemon.socket)
    idle_events = connect(daemon.events)
    try:
        half_prefix.sendall(b"\x00\x00")
        stalled = pack_message(p.encoder.encode(p.Hello(id=77)))
        half_body.sendall(stalled[:7])
        with Client(daemon.socket) as c:
            for i in range(100):
                text = f"busy client frame {i} busy{i}"
                acked[c.put(text, uri=f"busy://{i}")] = text
            for i in range(100):
                assert [h.uri for h in c.find(f"busy{i}", mode="lex")] == [f"busy://{i}"]
            assert c.stats()["daemon"]["connections"] == 4  # 3 stalled + this one
        # nothing closed the stalled connections: they go on where they stopped
        half_body.sendall(stalled[7:])
        reply = recv(half_body)
        assert isinstance(reply, p.HelloReply) and reply.id == 77
        assert isinstance(call(idle, p.Hello(id=1)), p.HelloReply)
        idle_events.sendall(b'{"text": "late producer"}\n')
        with idle_events.makefile("rb") as f:
            ack = json.loads(f.readline())
        assert ack["ok"] and ack["line"] == 1
        acked[ack["id"]] = "late producer"
    finally:
        for s in (idle, half_prefix, half_body, idle_events):
            s.close()
    settle(daemon)
    check_healthy(daemon, acked)


# --- 6. clients that vanish ----------------------------------------------------------

def _vanish(d: DaemonProc, how: str) -> None:
    if how == "burst-of-gets":
        with Client(d.socket) as c:
            big = c.put("g" * 200_000, uri="vanish://big")
        with connect(d.socket) as sock:
            send(sock, *(p.Get(id=i, frame_id=big) for i in range(200)))
    elif how == "big-find":
        with Client(d.socket) as c:
            for start in range(0, 300, 50):
                c.put_many([{"text": f"needle {i} " + "hay " * 1000, "uri": f"hay://{i}"}
                            for i in range(start, start + 50)])
        with connect(d.socket) as sock:
            send(sock, p.Find(id=1, query="needle", k=300, mode="lex", snippet_chars=4000))
    elif how == "unread-hello":  # the reply arrived; the client closes without reading it
        with connect(d.socket) as sock:
            send(sock, p.Hello(id=1))
            sock.recv(1, socket.MSG_PEEK)
    elif how == "event-acks-unread":
        with connect(d.events) as sock:
            sock.sendall(b"".join(b'{"text": "fire and forget %d"}\n' % i for i in range(100)))

        def committed(sock: socket.socket) -> bool:
            return len(call(sock, p.Find(id=1, query="forget", k=1000, mode="lex")).hits) == 100

        poll_until(d, committed, "the events are committed")  # then their acks go to nobody
        return
    else:
        raise AssertionError(how)
    settle(d)


@pytest.mark.parametrize("how", ["burst-of-gets", "big-find", "unread-hello", "event-acks-unread"])
def test_client_vanishing_mid_reply(daemon, how):
    acked = seed(daemon, 50)
    _vanish(daemon, how)
    check_healthy(daemon, acked)


# --- 7. many connections, and the connection limit -----------------------------------


def test_a_thousand_concurrent_connections(daemon):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1100:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is too low for 1000 connections")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    acked = seed(daemon)
    n = 1000
    socks: list[socket.socket] = []
    try:
        for i in range(n):
            socks.append(connect(daemon.socket))
        for i, sock in enumerate(socks):
            send(sock, p.Hello(id=i, client=f"conn {i}"))
        for i, sock in enumerate(socks):
            reply = recv(sock)
            assert isinstance(reply, p.HelloReply) and reply.id == i, (i, reply)
        s = stats(socks[-1])["daemon"]
        assert s["connections"] == n and s["refused"] == 0, s
    finally:
        for sock in socks:
            sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    settle(daemon)
    check_healthy(daemon, acked)


def admitted(d: DaemonProc, refusals: list[p.Error]) -> socket.socket:
    """A connection the daemon admits (hello answered); the refusals met on the way (the
    daemon reaps closed connections asynchronously) are appended to ``refusals``."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        sock = connect(d.socket)
        reply = call(sock, p.Hello(id=1))
        if isinstance(reply, p.HelloReply):
            return sock
        refusals.append(reply)
        sock.close()
        assert reply.code == p.UNAVAILABLE and time.monotonic() < deadline, reply
        time.sleep(0.02)


def test_connection_over_max_connections_is_unavailable(tmp_path):
    d = LimitedDaemon(tmp_path, max_connections=5)
    socks: list[socket.socket] = []
    try:
        d.start()
        acked = seed(d)
        refusals: list[p.Error] = []
        for _ in range(5):
            socks.append(admitted(d, refusals))
        for _ in range(2):
            with connect(d.socket) as extra:
                try_send(extra, p.Hello(id=9))
                replies = recv_until_closed(extra)
            assert codes(replies) == [p.UNAVAILABLE], replies
            assert replies[0].retryable and "too many connections" in replies[0].message
        s = stats(socks[0])["daemon"]
        assert s["connections"] == 5 and s["refused"] == 2 + len(refusals), s
        # the admitted ones are unaffected
        for i, sock in enumerate(socks):
            assert isinstance(call(sock, p.Put(id=i, text=f"admitted {i}")), p.PutReply)
        # a freed slot is reused
        socks.pop().close()
        deadline = time.monotonic() + TIMEOUT
        while stats(socks[0])["daemon"]["connections"] != 4:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        before = len(refusals)
        socks.append(admitted(d, refusals))
        assert len(refusals) == before  # the count said the slot was free
        for sock in socks:
            sock.close()
        socks.clear()
        settle(d)
        check_healthy(d, acked)
    finally:
        for sock in socks:
            sock.close()
        d.close()


# --- 8. puts over max-put-bytes ------------------------------------------------------


def test_put_over_max_put_bytes_is_refused_and_nothing_is_stored(small):
    acked = seed(small)
    with connect(small.socket) as sock:
        ok = call(sock, p.Put(id=1, text="a" * 4096, uri="size://exact"))
        assert isinstance(ok, p.PutReply)
        acked[ok.frame_ids[0]] = "a" * 4096
        for i, msg in enumerate([
            p.Put(id=2, text="a" * 4097),
            p.Put(id=3, text="\u00e9" * 2049),  # 2049 chars, 4098 bytes: the limit is in bytes
            p.Put(id=4, data=b"\0" * 4097),
            p.PutMany(id=5, items=[p.PutItem(text="toolarge alpha"), p.PutItem(text="toolarge beta"),
                                   p.PutItem(text="x" * 5000)]),
        ]):
            reply = call(sock, msg)
            assert isinstance(reply, p.Error) and reply.code == p.BAD_REQUEST and reply.id == msg.id, reply
            assert "exceeds" in reply.message and not reply.retryable
        # the connection goes on, and nothing of the refused requests was stored
        after = call(sock, p.Put(id=6, text="after the refusals toolarge"))
        assert isinstance(after, p.PutReply)
        acked[after.frame_ids[0]] = "after the refusals toolarge"
        hits = call(sock, p.Find(id=7, query="toolarge", mode="lex", k=100)).hits
        assert [h.frame_id for h in hits] == after.frame_ids
        assert stats(sock)["live_frames"] == len(acked)
    check_healthy(small, acked)


def test_put_many_refused_by_the_engine_fails_alone_in_its_group_commit(small):
    """An item the daemon cannot pre-check (a NaN timestamp) is refused at commit time: the
    whole put_many is dropped, the writes staged around it in the same commit are not."""
    acked = seed(small)
    with connect(small.socket) as sock:
        send(sock,
             p.Put(id=1, text="grouped before", uri="group://before"),
             p.PutMany(id=2, items=[p.PutItem(text="grouped doomed", uri="group://doomed"),
                                    p.PutItem(text="grouped nan", timestamp=float("nan"))]),
             p.Put(id=3, text="grouped after", uri="group://after"))
        replies = [recv(sock) for _ in range(3)]
        assert codes(replies) == ["put_reply", p.BAD_REQUEST, "put_reply"], replies
        acked[replies[0].frame_ids[0]] = "grouped before"
        acked[replies[2].frame_ids[0]] = "grouped after"
        hits = call(sock, p.Find(id=4, query="grouped", mode="lex", k=100)).hits
        assert sorted(h.uri for h in hits) == ["group://after", "group://before"]
        assert isinstance(call(sock, p.Get(id=5, uri="group://doomed")), p.Error)
    check_healthy(small, acked)


# --- 9. the event socket: bad bytes and long lines -----------------------------------


def test_event_socket_bad_utf8_and_over_long_lines(small):
    acked = seed(small)
    limit = 4096 + 4096
    good = [json.dumps({"text": f"good event {i}", "uri": f"ev://{i}"}).encode() for i in range(6)]
    lines = [
        good[0],
        b'{"text": "' + b"L" * (limit + 10) + b'"}',  # longer than the line limit
        good[1],
        b'{"text": "caf\xe9 latin-1"}',  # not UTF-8
        b'{"text": "\xc0\xaf overlong encoding"}',
        b'{"text": "\xed\xa0\x80 encoded surrogate"}',
        good[2],
        b'{"text": "' + b"m" * 5000 + b'"}',  # within the line limit, over max-put-bytes
        good[3],
        b"z" * (1 << 20),  # a megabyte without a newline for a long while
        good[4],
        b'{"text": "truncated \xe2\x82"}',
        good[5],  # the last line has no newline: still an event
    ]
    acks = json_acks(small.events, b"\n".join(lines))
    assert [a["line"] for a in acks] == list(range(1, len(lines) + 1)), acks
    assert [a["ok"] for a in acks] == [line in good for line in lines], acks
    errors = [a["error"] for a in acks if not a["ok"]]
    # read in one go, the first is refused for its payload, else for its length
    assert "longer than" in errors[0] or "exceeds" in errors[0]
    assert "longer than" in errors[5]
    assert all("UTF-8" in e for e in errors[1:4] + errors[6:]), errors
    assert "exceeds" in errors[4]
    for i, a in enumerate(a for a in acks if a["ok"]):
        acked[a["id"]] = f"good event {i}"
    check_healthy(small, acked)


def test_event_line_over_the_limit_is_refused_even_when_read_at_once(small):
    acked = seed(small)
    limit = 4096 + 4096
    padded = b'{"text": "padded"' + b" " * (limit + 100) + b"}"  # small payload, long line
    acks = json_acks(small.events, padded + b'\n{"text": "after the long line"}\n')
    assert [a["ok"] for a in acks] == [False, True], acks
    acked[acks[1]["id"]] = "after the long line"
    check_healthy(small, acked)


@pytest.mark.parametrize("field", ["text", "uri", "tags"])
def test_event_with_a_lone_surrogate_is_an_error_line(daemon, field):
    acked = seed(daemon)
    event = {"text": "surrogate \\ud800 text"} if field == "text" else \
        {"text": "ok", "uri": "u://\\ud800"} if field == "uri" else {"text": "ok", "tags": {"k": "\\udfff"}}
    line = json.dumps(event).replace("\\\\u", "\\u").encode()
    acks = json_acks(daemon.events, line + b"\n" + b'{"text": "after the surrogate"}\n')
    check_healthy(daemon, acked)
    assert [a["ok"] for a in acks] == [False, True], acks


# --- 10. slow tail consumers ---------------------------------------------------------


def subscribe(sock: socket.socket, **filters: Any) -> None:
    """Send ``tail`` and wait for the reply to a request pipelined after it: the daemon
    registers the subscription when it dispatches the tail, before that reply."""
    send(sock, p.Tail(id=1, **filters), p.Hello(id=2))
    while True:
        msg = recv(sock)
        assert msg is not None and not isinstance(msg, (p.Error, p.TailEnd)), msg
        if isinstance(msg, p.HelloReply):
            return


def write_in_batches(path: str, n: int, batch: int, scope: str) -> tuple[dict[int, str], float]:
    texts = [f"{scope} event {i} " + "x" * 1000 for i in range(n)]
    acked: dict[int, str] = {}
    started = time.monotonic()
    with Client(path) as c:
        for start in range(0, n, batch):
            part = texts[start : start + batch]
            ids = c.put_many([{"text": t, "uri": f"{scope}://{start + j}"} for j, t in enumerate(part)])
            acked.update(zip(ids, part, strict=True))
    return acked, time.monotonic() - started


class TailReader(threading.Thread):
    """Reads a tail stream as fast as it comes, until ``n`` events or the stream ends."""

    def __init__(self, sock: socket.socket, n: int) -> None:
        super().__init__(name="fast-tail-reader")
        self.sock, self.n = sock, n
        self.frames: list[p.FrameOut] = []
        self.end: Any = None

    def run(self) -> None:
        try:
            while len(self.frames) < self.n:
                msg = recv(self.sock)
                if not isinstance(msg, p.TailEvent):
                    self.end = msg
                    return
                self.frames.append(msg.frame)
        except Exception as e:  # reported by the test
            self.end = e


def test_slow_tail_consumer_is_dropped_and_never_slows_writers(tmp_path):
    """tail-buffer 8 (commits a subscriber may lag behind); the writer commits 2 frames at a
    time, so the stuck reader falls 8 commits behind quickly."""
    n, batch = 3000, 2
    d = DaemonProc(tmp_path, tail_buffer=8)
    stuck = fast = None
    try:
        d.start()
        acked, baseline = write_in_batches(d.socket, n, batch, "base")
        stuck, fast = connect(d.socket), connect(d.socket)
        subscribe(stuck, scope="slow://")
        subscribe(fast, scope="slow://")
        reader = TailReader(fast, n)
        reader.start()
        try:
            written, elapsed = write_in_batches(d.socket, n, batch, "slow")
        finally:
            reader.join(timeout=TIMEOUT)
        assert not reader.is_alive()
        acked |= written
        assert elapsed < 5 * baseline + 2, \
            f"writer took {elapsed:.2f}s with a stuck subscriber, {baseline:.2f}s without"
        # the fast subscriber got every frame, in commit order
        assert reader.end is None, reader.end
        assert [f.id for f in reader.frames] == sorted(written)
        assert all(f.text == written[f.id] for f in reader.frames)
        # the stuck one: some events (a prefix of the frames), then tail_end slow_consumer
        events: list[p.FrameOut] = []
        while isinstance(msg := recv(stuck), p.TailEvent):
            events.append(msg.frame)
        assert isinstance(msg, p.TailEnd) and msg.reason == p.SLOW_CONSUMER and msg.id == 1, msg
        assert 0 < len(events) < n
        assert [f.id for f in events] == sorted(written)[: len(events)]
        # its connection goes on (only the subscription ended)
        assert isinstance(call(stuck, p.Hello(id=3)), p.HelloReply)
        assert "tail subscriber dropped" in d.log.read_text()
        for sock in (stuck, fast):
            sock.close()
        stuck = fast = None
        settle(d)
        check_healthy(d, acked)
    finally:
        for sock in (stuck, fast):
            if sock is not None:
                sock.close()
        d.close()


def test_fast_tail_consumer_survives_a_put_many_larger_than_the_tail_buffer(tmp_path):
    d = DaemonProc(tmp_path, tail_buffer=8)
    fast = None
    try:
        d.start()
        fast = connect(d.socket)
        subscribe(fast)
        with Client(d.socket) as c:
            ids = c.put_many([{"text": f"burst {i}"} for i in range(20)])
        reader = TailReader(fast, len(ids))
        reader.run()  # in this thread: every event is already on its way
        fast.close()
        fast = None
        settle(d)
        check_healthy(d, {i: f"burst {k}" for k, i in enumerate(ids)})
        assert reader.end is None, f"after {len(reader.frames)} of {len(ids)} events: {reader.end}"
        assert [f.id for f in reader.frames] == ids
    finally:
        if fast is not None:
            fast.close()
        d.close()


# --- 11. peer uid --------------------------------------------------------------------


def _as_nobody(paths: dict[str, str]) -> dict[str, Any]:
    """Fork; the child becomes uid/gid 65534 and talks to each socket; its report."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        try:
            os.close(r)
            report: dict[str, Any] = {}
            try:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
                report["uid"] = os.getuid()
                with connect(paths["agent"], 10) as sock:
                    try_send(sock, p.Hello(id=1))
                    report["agent"] = [msgspec.to_builtins(m) for m in recv_until_closed(sock)]
                with connect(paths["events"], 10) as sock:  # refused before it says anything
                    data = b""
                    while chunk := sock.recv(65536):
                        data += chunk
                    report["events"] = data.decode()
            except BaseException as e:
                report["error"] = f"{type(e).__name__}: {e}"
            os.write(w, json.dumps(report).encode())
        finally:
            os._exit(0)
    os.close(w)
    try:
        with os.fdopen(r, "rb") as f:
            data = f.read()
    finally:
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return json.loads(data)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to another uid")
def test_connections_from_other_users_are_refused():
    with tempfile.TemporaryDirectory(prefix="mvd-uid-") as tmp:  # /tmp/pytest-of-root is 0700
        d = DaemonProc(Path(tmp))
        try:
            d.start()
            acked = seed(d)
            os.chmod(tmp, 0o755)  # what a careless admin might do: the uid check still holds
            os.chmod(d.socket, 0o666)
            os.chmod(d.events, 0o666)
            report = _as_nobody({"agent": d.socket, "events": d.events})
            assert report.get("uid") == 65534 and "error" not in report, report
            (err,) = report["agent"]
            assert err["op"] == "error" and err["code"] == p.UNAVAILABLE, err
            assert "other users" in err["message"], err
            events = [json.loads(line) for line in report["events"].splitlines()]
            assert len(events) == 1 and events[0]["ok"] is False, events
            assert "other users" in events[0]["error"], events
            log = d.log.read_text().splitlines()
            refusals = [line for line in log if "refused" in line and "65534" in line]
            assert refusals, log_tail(d)
            with Client(d.socket) as c:
                assert c.stats()["daemon"]["refused"] == 1
                assert c.find("another user", mode="lex") == []
            check_healthy(d, acked)
        finally:
            d.close()


# --- 12. systemd, end to end ---------------------------------------------------------


@pytest.fixture
def no_systemd_env(monkeypatch):
    for var in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_PID", "LISTEN_FDS",
                "LISTEN_FDNAMES"):
        monkeypatch.delenv(var, raising=False)


def test_notify_ready_status_watchdog_and_stopping(tmp_path, no_systemd_env):
    d = DaemonProc(tmp_path, env={"WATCHDOG_USEC": "200000"})
    try:
        d.start()
        assert any(m.startswith("STATUS=") and "0 frames" in m for m in d.messages), d.messages
        while d.messages.count("WATCHDOG=1") < 3:  # every 0.1 s
            d.wait_for("WATCHDOG=1", 10)
        acked = seed(d, 3)
        d.signal(signal.SIGHUP)  # a reload reports READY=1 with fresh counts
        lines = d.wait_for("READY=1")
        assert any(m.startswith("STATUS=") and "3 frames" in m for m in lines), lines
        assert "RELOADING=1" in d.messages, d.messages
        check_healthy(d, acked)
        assert d.stop() == 0
        if "STOPPING=1" not in d.messages:
            d.wait_for("STOPPING=1", 10)
        pings = d.messages.count("WATCHDOG=1")
        assert d.messages.index("STOPPING=1") > d.messages.index("READY=1")
        assert pings >= 3 and not os.path.exists(d.socket) and not os.path.exists(d.events)
    finally:
        d.close()


ACTIVATE = """
import fcntl, os, sys
fds = [int(fd) for fd in sys.argv[1].split(",")]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]
for fd in fds:
    os.close(fd)
for target, fd in enumerate(high, start=3):
    os.dup2(fd, target)  # inheritable, as systemd passes them
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())  # exec keeps the pid
os.execv(sys.executable, [sys.executable, "-m", "memvidd", *sys.argv[2:]])
"""


def test_socket_activation_serves_on_the_inherited_sockets(tmp_path, no_systemd_env):
    d = DaemonProc(tmp_path)  # its config names q.sock and e.sock: they must not appear
    inherited = {"query": str(tmp_path / "act-q.sock"), "events": str(tmp_path / "act-e.sock")}
    listeners = []
    try:
        for path in inherited.values():
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listeners.append(s)
            s.bind(path)
            s.listen(64)
        fds = [s.fileno() for s in listeners]
        with open(d.log, "ab") as log:
            d.proc = subprocess.Popen(
                [sys.executable, "-c", ACTIVATE, ",".join(map(str, fds)), "run", "--config", str(d.config)],
                env={**d.env, "LISTEN_FDS": "2", "LISTEN_FDNAMES": "query:events"},
                pass_fds=fds, stdout=log, stderr=log, cwd=ROOT,
            )
        for s in listeners:  # the daemon holds its own copies now, as under systemd
            s.close()
        d.wait_for("READY=1", 60)
        with Client(inherited["query"]) as c:
            assert c.server.version == p.PROTOCOL_VERSION
            fid = c.put("activated", uri="act://1")
        acks = json_acks(inherited["events"], b'{"text": "activated event"}\n')
        assert acks[0]["ok"], acks
        assert not os.path.exists(d.socket) and not os.path.exists(d.events)
        check_healthy(d, {fid: "activated", acks[0]["id"]: "activated event"}, inherited["query"])
        assert d.stop() == 0
        # the sockets belong to the service manager: the daemon leaves them in place
        assert all(os.path.exists(path) for path in inherited.values())
    finally:
        for s in listeners:
            s.close()
        d.close()
