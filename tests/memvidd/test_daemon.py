"""End to end: a real daemon process, real Unix sockets, the real clients and CLI."""

from __future__ import annotations

import inspect
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import aclosing

import msgspec
import pytest
import trio

import engine
from daemon_util import ROOT, DaemonProc
from memvidd import protocol as p
from memvidd.client import AsyncClient, Client, ConnectionLost, RemoteError
from memvidd.framing import pack_message, recv_message, send_message

pytestmark = pytest.mark.timeout(120)


def test_put_find_get_timeline_remove_over_the_socket(daemon):
    with Client(daemon.socket) as c:
        assert c.server.version == p.PROTOCOL_VERSION and "find" in c.server.features
        fid = c.put("the cat sat on the warm mat", uri="note://cat", tags={"animal": "cat"}, title="Cat")
        ids = c.put_many([{"text": "dogs chase balls", "uri": "note://dog"}, {"text": "birds sing", "uri": "note://bird"}])
        assert ids == [fid + 1, fid + 2]
        hits = c.find("mat", mode="lex")
        assert [h.uri for h in hits] == ["note://cat"] and hits[0].highlights
        assert c.get(uri="note://dog").text == "dogs chase balls"
        assert c.get(fid).tags == {"animal": "cat"}
        assert {e.uri for e in c.timeline()} == {"note://cat", "note://dog", "note://bird"}
        c.remove("note://bird")
        with pytest.raises(RemoteError) as info:
            c.get(uri="note://bird")
        assert info.value.code == p.NOT_FOUND and not info.value.retryable
        seq_before = c.get(uri="note://dog").commit_seq
        assert c.get(uri="note://bird", as_of=seq_before).text == "birds sing"  # time travel
        stats = c.stats()
        assert stats["live_frames"] == 2 and stats["daemon"]["acked_puts"] == 3
        assert [x.name for x in c.capsules()] == ["default"]
        assert c.flush() == stats["commit_seq"]
        assert c.verify().ok
        c.put(b"\x00\xffbinary", uri="blob://1")
        assert c.get(uri="blob://1").data == b"\x00\xffbinary"


def test_errors_are_typed_and_the_connection_goes_on(daemon):
    with Client(daemon.socket) as c:
        for call, code in [
            (lambda: c.get(12345), p.NOT_FOUND),
            (lambda: c.find("x", mode="fuzzy"), p.BAD_REQUEST),
            (lambda: c.find("x", capsule="nope"), p.NO_SUCH_CAPSULE),
            (lambda: c.put("x", capsule="../../etc/passwd"), p.NO_SUCH_CAPSULE),
            (lambda: c.put("x" * (2 << 20)), p.BAD_REQUEST),
            (lambda: c.timeline(limit=-1), p.BAD_REQUEST),
        ]:
            with pytest.raises(RemoteError) as info:
                call()
            assert info.value.code == code, (code, info.value)
        assert c.put("still fine") >= 0


def test_pipelined_puts_share_fsyncs_and_replies_keep_order(daemon):
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(30)
    sock.connect(daemon.socket)
    try:
        n = 200
        sock.sendall(b"".join(pack_message(p.encoder.encode(p.Put(id=i, text=f"pipelined {i}", uri=f"pipe://{i}"))) for i in range(1, n + 1))
                     + pack_message(p.encoder.encode(p.Find(id=n + 1, query="pipelined", k=1000, mode="lex"))))
        replies = [p.reply_decoder.decode(recv_message(sock, 1 << 24)) for _ in range(n + 1)]
    finally:
        sock.close()
    assert [r.id for r in replies] == list(range(1, n + 2))
    assert all(isinstance(r, p.PutReply) for r in replies[:-1])
    assert len(replies[-1].hits) == n  # the find saw every put sent before it (read your writes)
    with Client(daemon.socket) as c:
        commits = c.stats()["daemon"]["commits"]
    assert commits < n / 2, f"{commits} commits for {n} pipelined puts: no group commit"


def test_many_concurrent_producers_lose_nothing(daemon):
    errors = []

    def producer(k: int) -> None:
        try:
            with Client(daemon.socket) as c:
                for i in range(25):
                    c.put(f"producer {k} item {i}", uri=f"prod://{k}/{i}")
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=producer, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    with Client(daemon.socket) as c:
        s = c.stats()
        assert s["live_frames"] == 16 * 25
        assert s["daemon"]["commits"] < 16 * 25


@pytest.mark.trio
async def test_async_client_has_the_same_methods(tmp_path):
    d = DaemonProc(tmp_path)
    await trio.to_thread.run_sync(d.start)
    try:
        async with await AsyncClient.connect(d.socket) as c:
            fid = await c.put("async hello", uri="a://1")
            assert (await c.get(fid)).text == "async hello"
            assert [h.uri for h in await c.find("hello", mode="lex")] == ["a://1"]
            assert len(await c.timeline()) == 1
            await c.remove("a://1")
            assert (await c.stats())["live_frames"] == 0
            assert [x.name for x in await c.capsules()] == ["default"]

            async def tail_one() -> p.FrameOut:
                async with await AsyncClient.connect(d.socket) as t, aclosing(t.tail(scope="tail://")) as events:
                    async for frame in events:
                        return frame
                raise AssertionError("tail ended")

            async with trio.open_nursery() as nursery:
                got: list[p.FrameOut] = []

                async def run() -> None:
                    got.append(await tail_one())

                nursery.start_soon(run)
                await trio.sleep(0.2)  # let the subscription register before the put
                await c.put("ignored: other scope", uri="other://1")
                await c.put("streamed", uri="tail://1")
            assert got[0].uri == "tail://1" and got[0].text == "streamed"
    finally:
        await trio.to_thread.run_sync(d.close)


def public(cls: type) -> set[str]:
    return {name for name in dir(cls) if not name.startswith("_")}


def test_the_two_clients_have_the_same_methods():
    """What the README promises: ``AsyncClient`` has ``Client``'s methods (as coroutines),
    apart from how each connects and closes."""
    sync_only, async_only = {"close"}, {"aclose", "connect", "open", "stream"}
    assert public(Client) - sync_only == public(AsyncClient) - async_only
    for name in public(Client) - sync_only - {"tail"}:  # tail: an async generator
        assert inspect.iscoroutinefunction(getattr(AsyncClient, name)), name


@pytest.mark.trio
async def test_async_client_connects_like_client(tmp_path, monkeypatch):
    """``async with AsyncClient() as c``, no arguments: the socket every command finds."""
    d = DaemonProc(tmp_path)
    await trio.to_thread.run_sync(d.start)
    try:
        monkeypatch.setenv("MEMVIDD_SOCKET", d.socket)
        async with AsyncClient() as c:
            await c.put("found without a path", uri="a://2")
            assert [h.uri for h in (await c.find_reply("without", mode="lex")).hits] == ["a://2"]
        with pytest.raises(ConnectionLost, match="not connected"):
            await AsyncClient().stats()
    finally:
        await trio.to_thread.run_sync(d.close)


def test_event_socket_json_lines_and_errors(daemon):
    lines = [
        json.dumps({"text": "user asked about the weather", "uri": "chat://1", "tags": {"role": "user"}}),
        "not json at all",
        json.dumps({"txt": "typo"}),
        json.dumps(["a", "list"]),
        json.dumps({"text": "second event", "timestamp": 1700000000}),
        json.dumps({"text": "an expired event", "expires": 1700000000}),
        json.dumps({"text": "bad expiry", "expires": "tomorrow"}),
    ]
    payload = ("\n".join(lines) + "\n").encode() + b"\xff\xfe invalid utf-8\n" + json.dumps({"text": "after the bad bytes"}).encode() + b"\n"
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(30)
    sock.connect(daemon.events)
    sock.sendall(payload)
    sock.shutdown(socket.SHUT_WR)
    acks = [json.loads(x) for x in sock.makefile().read().splitlines()]
    sock.close()
    assert [a["ok"] for a in acks] == [True, False, False, False, True, True, False, False, True]
    assert [a["line"] for a in acks] == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert "UTF-8" in acks[7]["error"] and "unknown keys" in acks[2]["error"] and "expires" in acks[6]["error"]
    with Client(daemon.socket) as c:
        assert c.get(acks[0]["id"]).tags == {"role": "user"}
        assert c.get(acks[4]["id"]).timestamp == 1700000000
        with pytest.raises(RemoteError, match="expired"):
            c.get(acks[5]["id"])
        assert c.get(acks[8]["id"]).text == "after the bad bytes"


def test_put_events_sends_stdin_to_the_event_socket_of_the_config(daemon):
    """``memvidd put --events``: the bare-machine way to feed the event socket (no socat,
    no socket path): every acknowledgement printed, exit 1 if any line was refused."""

    def put_events(stdin: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MEMVIDD_")}
        return subprocess.run([sys.executable, "-m", "memvidd", "put", "--events", "--config", str(daemon.config)],
                              input=stdin, capture_output=True, text=True, cwd=ROOT, env=env, timeout=30)

    good = put_events('{"text": "build passed", "tags": {"ci": "yes"}}\n\n{"text": "deploy done"}\n')
    assert good.returncode == 0, good.stderr
    acks = [json.loads(x) for x in good.stdout.splitlines()]
    assert [(a["ok"], a["line"]) for a in acks] == [(True, 1), (True, 2)]
    with Client(daemon.socket) as c:
        assert c.get(acks[0]["id"]).tags == {"ci": "yes"} and c.get(acks[1]["id"]).text == "deploy done"

    # A first line that is not JSON is an error line too, not a msgpack frame, and the
    # lines after it are stored.
    bad = put_events('build passed\n{"text": "after it"}\n')
    assert bad.returncode == 1
    assert [json.loads(x)["ok"] for x in bad.stdout.splitlines()] == [False, True]

    refused = subprocess.run([sys.executable, "-m", "memvidd", "put", "--events", "text"], capture_output=True,
                             text=True, cwd=ROOT, timeout=30)
    assert refused.returncode == 1 and "reads JSON lines from stdin" in refused.stderr


def test_event_socket_accepts_msgpack_frames(daemon):
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(30)
    sock.connect(daemon.events)
    try:
        send_message(sock, p.encoder.encode(p.Put(id=7, text="framed event", uri="ev://framed")))
        reply = p.reply_decoder.decode(recv_message(sock, 1 << 20))
        assert isinstance(reply, p.PutReply) and reply.id == 7
        send_message(sock, p.encoder.encode(p.Find(id=8, query="framed")))
        refused = p.reply_decoder.decode(recv_message(sock, 1 << 20))
        assert isinstance(refused, p.Error) and refused.code == p.BAD_REQUEST
    finally:
        sock.close()


def test_sigterm_commits_and_exits_zero_and_data_survives(tmp_path):
    d = DaemonProc(tmp_path).start()
    try:
        with Client(d.socket) as c:
            ids = [c.put(f"survivor {i}", uri=f"s://{i}") for i in range(20)]
        assert d.stop() == 0
        assert "STOPPING=1" in d.messages or "STOPPING=1" in d.wait_for("STOPPING=1", 5)
        assert not os.path.exists(d.socket)
        with engine.open(str(tmp_path / "default.mv2"), readonly=True) as cap:
            assert [cap.get(i).text for i in ids] == [f"survivor {i}" for i in range(20)]
    finally:
        d.close()


def test_kill_9_loses_no_acknowledged_put(tmp_path):
    d = DaemonProc(tmp_path).start()
    acked: list[tuple[int, str]] = []
    stop = threading.Event()

    def writer() -> None:
        try:
            with Client(d.socket) as c:
                i = 0
                while not stop.is_set():
                    acked.append((c.put(f"acked {i}", uri=f"k://{i}"), f"acked {i}"))
                    i += 1
        except (OSError, RemoteError, Exception):
            pass  # the daemon died under us: only what was acknowledged counts

    t = threading.Thread(target=writer)
    t.start()
    while len(acked) < 50 and t.is_alive():
        threading.Event().wait(0.01)
    d.kill()
    stop.set()
    t.join(timeout=30)
    d.close()
    d2 = DaemonProc(tmp_path)
    d2.start()
    try:
        with Client(d2.socket) as c:
            for fid, text in acked:
                assert c.get(fid).text == text
    finally:
        d2.close()


def test_sighup_adds_and_removes_capsules(tmp_path):
    d = DaemonProc(tmp_path).start()
    try:
        d.write_config(("default", "work"))
        d.signal(signal.SIGHUP)
        d.wait_for("READY=1")
        with Client(d.socket) as c:
            assert sorted(x.name for x in c.capsules()) == ["default", "work"]
            c.put("work note", capsule="work")
            assert c.find("note", capsule="work", mode="lex")[0].uri is None
        d.write_config(("default",))
        d.signal(signal.SIGHUP)
        d.wait_for("READY=1")
        with Client(d.socket) as c:
            assert [x.name for x in c.capsules()] == ["default"]
    finally:
        d.close()


def test_bad_config_is_a_clear_error_and_no_start(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[daemon]\nsokcet = "x"\n[[capsule]]\nname = "a"\npath = "a.mv2"\n')
    out = subprocess.run([sys.executable, "-m", "memvidd", "run", "--config", str(cfg)], capture_output=True,
                         text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 2
    assert str(cfg) in out.stderr and "sokcet" in out.stderr


def test_cli_against_the_daemon_and_directly(daemon, tmp_path):
    def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "memvidd", *args], capture_output=True, text=True,
                              timeout=60, input=stdin, cwd=ROOT)

    put = cli("put", "--socket", daemon.socket, "--json", "-", "--uri", "cli://1", "--tag", "a=b", stdin="from stdin")
    assert put.returncode == 0, put.stderr
    fid = json.loads(put.stdout)["frame_id"]
    found = cli("find", "--socket", daemon.socket, "--json", "stdin")
    assert json.loads(found.stdout)["hits"][0]["frame_id"] == fid
    assert cli("get", "--socket", daemon.socket, str(fid)).stdout.strip() == "from stdin"
    status = cli("status", "--socket", daemon.socket, "--json")
    assert json.loads(status.stdout)["capsules"][0]["frames"] == 1
    # Direct mode: a daemon holds the capsule, so writing directly is refused...
    held = cli("put", "--capsule", str(tmp_path / "default.mv2"), "nope")
    assert held.returncode != 0 and "daemon holds it" in held.stderr
    # ...but reading it directly works alongside the daemon.
    direct = cli("find", "--capsule", str(tmp_path / "default.mv2"), "--json", "stdin")
    assert json.loads(direct.stdout)["hits"][0]["frame_id"] == fid
    missing = cli("status", "--socket", str(tmp_path / "nobody.sock"))
    assert missing.returncode == 1 and "no daemon" in missing.stderr
    other = tmp_path / "solo.mv2"
    assert cli("put", "--capsule", str(other), "standalone").returncode == 0
    assert json.loads(cli("stats", "--capsule", str(other), "--json").stdout)["frames"] == 1


def test_wire_messages_roundtrip_and_ignore_unknown_fields():
    msg = p.Find(id=3, query="q", as_of=1.5, tags={"a": "b"})
    assert p.request_decoder.decode(p.encoder.encode(msg)) == msg
    newer = msgspec.msgpack.encode({"op": "find", "id": 1, "query": "q", "a_future_field": [1, 2]})
    assert p.request_decoder.decode(newer).query == "q"


@pytest.mark.timeout(180)
def test_vectors_are_committed_by_the_writer_slot_with_the_real_model(tmp_path):
    """With the embedding model loaded, a put becomes semantically searchable and its
    vector durable, and the commit that stores the vector is the daemon's own (its writer
    slot is the only path that commits: the engine's embedding thread hands vectors over)."""
    d = DaemonProc(tmp_path)
    d.config.write_text(d.config.read_text().replace('model = "none"', f'model = "{engine.DEFAULT_MODEL}"'))
    try:
        d.start(timeout=120)
        with Client(d.socket) as c:
            c.put("photosynthesis converts light into chemical energy", uri="doc://bio")
            commits = c.stats()["daemon"]["commits"]

            deadline = time.monotonic() + 120
            while not ((s := c.stats())["vectors"]["frames_with_vectors"] == 1 and s["daemon"]["commits"] > commits):
                assert time.monotonic() < deadline, f"no vector committed by the daemon: {s['daemon']}"
                time.sleep(0.05)  # the daemon sends no event when a vector lands
            hits = c.find("how plants make energy from sunlight", mode="vec", k=1)
            assert hits and hits[0].uri == "doc://bio"
        assert d.stop() == 0
    finally:
        d.close()
    with engine.open(tmp_path / "default.mv2") as cap:  # durable: in the file, not only in memory
        assert cap.stats()["vectors"]["frames_with_vectors"] == 1
