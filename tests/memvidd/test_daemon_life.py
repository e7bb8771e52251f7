"""The capsule's life over the socket (protocol version 2): compaction, codec upgrades,
rewind, retention rules and expiry, encrypted capsules, and version 1 clients.

A real ``memvidd run`` in a subprocess (``daemon_util.DaemonProc``), real sockets.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

import engine
from daemon_util import CONFIG, ROOT, DaemonProc
from memvidd import config
from memvidd import protocol as p
from memvidd.client import Client, RemoteError
from memvidd.framing import pack_message, recv_message, send_message

pytestmark = pytest.mark.timeout(180)

CAPSULE = """
[[capsule]]
name = "{name}"
path = "{path}"
{extra}

[capsule.engine]
upgrade-codecs = {upgrade}
upgrade-idle-ms = {idle_ms}
upgrade-cold-commits = 0
compact-dead-ratio = {ratio}
"""

PASSPHRASE = "correct horse battery staple"


def life_config(tmp: Path, *, name: str = "default", path: Path | None = None, extra: str = "",
                upgrade: bool = False, idle_ms: int = 3_600_000, ratio: float = 0.0) -> str:
    capsule = CAPSULE.format(name=name, path=path or tmp / f"{name}.mv2", extra=extra,
                             upgrade=str(upgrade).lower(), idle_ms=idle_ms, ratio=ratio)
    return CONFIG.format(dir=tmp, max_put=1 << 20, max_frame=4 << 20, tail_buffer=1024, capsules=capsule)


def life_daemon(tmp: Path, **kw: Any) -> DaemonProc:
    """A daemon on ``life_config`` (no background upgrades or compactions unless asked)."""
    d = DaemonProc(tmp)
    d.config.write_text(life_config(tmp, **kw))
    return d


def run_daemon(cfg: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """A daemon expected to refuse to start."""
    return subprocess.run([sys.executable, "-m", "memvidd", "run", "--config", str(cfg)], capture_output=True,
                          text=True, timeout=60, cwd=ROOT, env={**os.environ, **(env or {})})


def key_file(path: Path, passphrase: str = PASSPHRASE) -> Path:
    path.write_text(passphrase + "\n")
    path.chmod(0o600)
    return path


def every_frame(c: Client) -> dict[int, str | bytes | None]:
    """Every frame id -> its text or data (None: a tombstone or gone)."""
    out: dict[int, str | bytes | None] = {}
    for fid in range(c.stats()["frames"]):
        try:
            f = c.get(fid)
        except RemoteError as e:
            assert e.code == p.NOT_FOUND
            out[fid] = None
        else:
            out[fid] = f.text if f.text is not None else f.data
    return out


BASE = random.Random(1).randbytes(16_000)


def fill(c: Client, commits: int = 40) -> None:
    """Commits of two ~16 KB binary frames (incompressible alone, nearly identical to each
    other: a codec upgrade groups them and leaves their old blocks dead) and a note."""
    for i in range(commits):
        c.put_many([{"data": b"%d-%d:" % (i, j) + BASE, "uri": f"blob://{i}/{j}"} for j in range(2)]
                   + [{"text": f"note {i}: the service answered request {i} in {i % 7} ms", "uri": f"log://{i}"}])


def code_of(call: Any) -> str:
    with pytest.raises(RemoteError) as info:
        call()
    return info.value.code


def raw_connection(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(30)
    sock.connect(path)
    return sock


def call(sock: socket.socket, msg: Any) -> Any:
    send_message(sock, p.encoder.encode(msg))
    return p.reply_decoder.decode(recv_message(sock, 1 << 24))


# -- compaction and codec upgrades --------------------------------------------------------


def test_compact_keeps_every_frame_and_reclaims_what_an_upgrade_left(tmp_path):
    d = life_daemon(tmp_path).start()
    try:
        with Client(d.socket, timeout=120) as c:
            fill(c)
            c.put("note 0, edited", uri="log://0")
            c.remove("log://1")
            first_seq = c.get(uri="log://2").commit_seq
            before = every_frame(c)

            up = c.compact(codecs_only=True)
            assert up["moved"] > 0 and up["blocks"] > 0 and up["saved"] > 0, up
            assert up["bytes_after"] > up["bytes_before"]  # new blocks appended; old ones now dead
            stats = c.stats()
            dead = stats["bytes_by_kind"]["dead"]
            assert dead > 0 and stats["daemon"]["upgrades"]["moved"] == up["moved"]
            assert every_frame(c) == before

            report = c.compact()
            assert report["bytes_after"] < report["bytes_before"] - dead // 2, (report, dead)
            assert report["frames"] == len(before)
            assert every_frame(c) == before
            assert c.stats()["bytes_by_kind"]["dead"] == 0

            # Puts go on while it compacts: every acknowledged one is there afterwards.
            acked: list[tuple[int, str]] = []
            stop = threading.Event()

            def writer() -> None:
                with Client(d.socket) as w:
                    i = 0
                    while not stop.is_set():
                        acked.append((w.put(f"during compaction {i}", uri=f"during://{i}"), f"during compaction {i}"))
                        i += 1

            t = threading.Thread(target=writer)
            t.start()
            try:
                while not acked and t.is_alive():
                    time.sleep(0.001)
                c.compact()
            finally:
                stop.set()
                t.join(timeout=60)
            assert acked
            for fid, text in acked:
                assert c.get(fid).text == text
            assert every_frame(c) | before == every_frame(c)  # every frame of before, unchanged
            assert c.get(uri="log://0", as_of=first_seq).text.startswith("note 0: ")  # history kept
            after = c.stats()
            assert after["daemon"]["compactions"]["runs"] == 2 and after["daemon"]["compactions"]["automatic"] == 0
            assert os.path.getsize(tmp_path / "default.mv2") == after["file_bytes"]
            assert c.verify().ok
            assert c.put("after compaction", uri="after://1") >= 0
        assert d.stop() == 0
    finally:
        d.close()
    assert not list(tmp_path.glob("*.compacting"))
    assert engine.verify(str(tmp_path / "default.mv2")).ok


def test_idle_daemon_upgrades_then_compacts_by_itself(tmp_path):
    d = life_daemon(tmp_path, upgrade=True, idle_ms=50, ratio=0.05).start()
    try:
        with Client(d.socket) as c:
            fill(c, 30)
            before = every_frame(c)
            deadline = time.monotonic() + 90
            while True:  # stats polling does not count as activity
                s = c.stats()
                if s["daemon"]["compactions"]["automatic"]:
                    break
                assert time.monotonic() < deadline, s["daemon"]
                time.sleep(0.05)
            assert s["daemon"]["upgrades"]["moved"] > 0
            assert every_frame(c) == before
            assert c.verify().ok
    finally:
        d.close()
    assert "compacted capsule=default" in d.log.read_text()


# -- rewind ------------------------------------------------------------------------------


def test_rewind_restores_the_past_and_a_tail_subscriber_sees_its_frames(tmp_path):
    d = life_daemon(tmp_path).start()
    tail = raw_connection(d.socket)
    try:
        with Client(d.socket) as c:
            c.put("first draft", uri="doc://a")
            c.put("kept", uri="doc://b")
            then = c.flush()
            c.put("second draft", uri="doc://a")
            c.remove("doc://b")
            c.put("added later", uri="doc://c")

            send_message(tail, p.encoder.encode(p.Tail(id=1, scope="doc://")))
            # A reply to a later request on the same connection: the subscription is in place.
            assert isinstance(call(tail, p.Flush(id=2)), p.FlushReply)

            seq = c.rewind(then)
            assert seq == c.flush()
            assert c.get(uri="doc://a").text == "first draft"
            assert c.get(uri="doc://b").text == "kept"
            assert code_of(lambda: c.get(uri="doc://c")) == p.NOT_FOUND
            assert c.get(uri="doc://a", as_of=seq - 1).text == "second draft"  # history kept
            assert c.get(uri="doc://c", as_of=seq - 1).text == "added later"
            assert {h.uri for h in c.find("draft", mode="lex")} == {"doc://a"}
            assert c.stats()["rewinds"][-1] == {"seq": seq, "to": then}

            seen: dict[str, tuple[str, int]] = {}
            while len(seen) < 2:
                msg = p.reply_decoder.decode(recv_message(tail, 1 << 24))
                assert isinstance(msg, p.TailEvent), msg
                seen[msg.frame.uri] = (msg.frame.text, msg.frame.commit_seq)
            assert seen == {"doc://a": ("first draft", seq), "doc://b": ("kept", seq)}

            assert code_of(lambda: c.rewind(10_000)) == p.BAD_REQUEST
            assert code_of(lambda: c._call(p.Rewind(id=99))) == p.BAD_REQUEST  # `to` is required
    finally:
        tail.close()
        d.close()


def test_rewind_takes_its_place_among_pipelined_writes(tmp_path):
    d = life_daemon(tmp_path).start()
    sock = raw_connection(d.socket)
    try:
        with Client(d.socket) as c:
            c.put("base", uri="x://base")
            base = c.flush()
        msgs = [p.Put(id=1, text="before the rewind", uri="x://1"), p.Rewind(id=2, to=base),
                p.Put(id=3, text="after the rewind", uri="x://2"), p.Get(id=4, uri="x://2")]
        sock.sendall(b"".join(pack_message(p.encoder.encode(m)) for m in msgs))
        replies = [p.reply_decoder.decode(recv_message(sock, 1 << 24)) for _ in msgs]
        assert [type(r) for r in replies] == [p.PutReply, p.RewindReply, p.PutReply, p.GetReply], replies
        assert replies[0].seq < replies[1].seq < replies[2].seq
        assert replies[3].frame.text == "after the rewind"
        with Client(d.socket) as c:
            assert code_of(lambda: c.get(uri="x://1")) == p.NOT_FOUND  # rewound over
            assert c.get(uri="x://base").text == "base"
    finally:
        sock.close()
        d.close()


# -- retention rules and expiry ----------------------------------------------------------


def test_rules_round_trip_force_and_expired_frames_are_hidden(tmp_path):
    d = life_daemon(tmp_path).start()
    try:
        with Client(d.socket) as c:
            now = time.time()
            old = c.put("an old log note", uri="n://old", timestamp=now - 7200, tags={"kind": "log"})
            c.put("a fresh log note", uri="n://fresh", tags={"kind": "log"})
            c.put("a note to keep", uri="n://keep")
            assert c.rules().rules == {}

            r = c.set_rules({"tags": {"kind=log": {"max_age_s": 3600}}})
            assert r.rules == {"tags": {"kind=log": {"max_age_s": 3600.0}}} and r.seq == c.flush()
            assert c.rules().rules == r.rules
            assert c.rules(as_of=r.seq - 1).rules == {}
            assert c.stats()["retention"]["rules"] == r.rules

            # Gone from every query, even as of a time before the rule change.
            assert code_of(lambda: c.get(old)) == p.NOT_FOUND
            assert code_of(lambda: c.get(uri="n://old", as_of=r.seq - 1)) == p.NOT_FOUND
            found = c.find_reply("note", mode="lex")
            assert {h.uri for h in found.hits} == {"n://fresh", "n://keep"}
            assert any("expired" in w for w in found.warnings), found.warnings
            tl = c.timeline_reply()
            assert {e.uri for e in tl.entries} == {"n://fresh", "n://keep"} and tl.expired == 1

            # Rules that would expire everything need force.
            with pytest.raises(RemoteError) as info:
                c.set_rules({"budget_bytes": 0})
            assert info.value.code == p.BAD_REQUEST and "force" in info.value.message
            assert c.rules().rules == r.rules
            assert code_of(lambda: c.set_rules({"default": {"max_age_s": -1}})) == p.BAD_REQUEST
            assert code_of(lambda: c.set_rules({"no_such_rule": 1})) == p.BAD_REQUEST
            forced = c.set_rules({"budget_bytes": 0}, force=True)
            assert forced.rules == {"budget_bytes": 0} and c.timeline_reply().expired == 3
            assert c.find("note", mode="lex") == []
            assert c.set_rules({}).rules == {} and c.rules().rules == {}
    finally:
        d.close()


def test_put_expires_hides_frames_at_their_time_and_compaction_reclaims_them(tmp_path):
    d = life_daemon(tmp_path).start()
    try:
        with Client(d.socket) as c:
            keep = c.put("a note to keep", uri="t://keep")
            gone = c.put("expired on arrival", uri="t://gone", expires=time.time() - 1)
            soon_at = time.time() + 1.0
            soon, big = c.put_many([
                {"text": "expires in a second", "uri": "t://soon", "expires": soon_at},
                {"data": os.urandom(200_000), "uri": "t://big", "expires": time.time() - 1},
            ])
            assert c.get(soon).text == "expires in a second"
            assert code_of(lambda: c.get(gone)) == p.NOT_FOUND
            assert code_of(lambda: c.get(big)) == p.NOT_FOUND
            assert c.timeline_reply().expired == 2
            deadline = time.monotonic() + 30
            while time.time() < soon_at or any(e.id == soon for e in c.timeline()):
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert code_of(lambda: c.get(soon)) == p.NOT_FOUND
            tl = c.timeline_reply()
            assert [e.id for e in tl.entries] == [keep] and tl.expired == 3
            assert c.stats()["retention"]["expired_bytes"] >= 200_000
            report = c.compact()
            assert report["bytes_after"] < report["bytes_before"] - 150_000, report
            assert c.get(keep).text == "a note to keep"
            assert c.timeline_reply().expired == 3
            assert c.verify().ok
    finally:
        d.close()


# -- protocol versions -------------------------------------------------------------------


class OldTimelineReply(msgspec.Struct, tag="timeline_reply", tag_field="op"):
    """``timeline_reply`` as a version 1 client knows it (no ``expired``)."""

    id: int = 0
    entries: list[dict[str, Any]] = []


def test_a_version_1_client_still_works(tmp_path):
    d = life_daemon(tmp_path).start()
    sock = raw_connection(d.socket)
    try:
        hello = call(sock, p.Hello(id=1, version=1, client="old"))
        assert isinstance(hello, p.HelloReply) and hello.version == 1 and "find" in hello.features
        put = call(sock, p.Put(id=2, text="spoken in version 1", uri="v1://1"))
        assert isinstance(put, p.PutReply) and put.id == 2
        found = call(sock, p.Find(id=3, query="version", mode="lex"))
        assert [h.uri for h in found.hits] == ["v1://1"]
        send_message(sock, p.encoder.encode(p.Timeline(id=4)))
        old = msgspec.msgpack.decode(recv_message(sock, 1 << 24), type=OldTimelineReply)  # new fields ignored
        assert [e["uri"] for e in old.entries] == ["v1://1"]
        for version in (0, p.PROTOCOL_VERSION + 1):
            err = call(sock, p.Hello(id=5, version=version))
            assert isinstance(err, p.Error) and err.code == p.VERSION and str(version) in err.message
        with Client(d.socket) as c:  # the current client speaks version 2
            assert c.server.version == p.PROTOCOL_VERSION == 2
            assert {"compact", "rewind", "rules", "set_rules", "expires"} <= set(c.server.features)
    finally:
        sock.close()
        d.close()


# -- encrypted capsules ------------------------------------------------------------------


def test_encrypted_capsule_configured_with_a_passphrase_file_is_served(tmp_path):
    key = key_file(tmp_path / "secret.key")
    path = tmp_path / "secret.mv2e"
    d = life_daemon(tmp_path, name="secret", path=path, extra=f'passphrase-file = "{key}"').start()
    try:
        with Client(d.socket) as c:
            fid = c.put("the launch code is swordfish", uri="s://code", tags={"level": "top"})
            c.put("lunch is at noon", uri="s://lunch")
            assert [h.uri for h in c.find("swordfish", mode="lex")] == ["s://code"]
            assert c.get(fid).text == "the launch code is swordfish"
            assert c.get(uri="s://lunch").text == "lunch is at noon"
            v = c.verify()
            assert v.ok, v.report
            assert c.compact()["bytes_after"] > 0  # compaction keeps it encrypted (checked below)
            assert c.find("swordfish", mode="lex")[0].frame_id == fid
        assert d.stop() == 0
        d.close()
        raw = path.read_bytes()
        assert b"swordfish" not in raw and b"launch" not in raw
        with engine.open(path, readonly=True, passphrase=PASSPHRASE) as cap:
            assert cap.encrypted and cap.get(fid).text == "the launch code is swordfish"
        assert engine.verify(str(path), passphrase=PASSPHRASE).ok
        d = life_daemon(tmp_path, name="secret", path=path, extra=f'passphrase-file = "{key}"').start()
        with Client(d.socket) as c:  # and it opens again
            assert c.get(fid).text == "the launch code is swordfish"
    finally:
        d.close()
    assert PASSPHRASE not in d.log.read_text()


def test_encrypted_capsule_with_passphrase_env_and_credential(tmp_path):
    path = tmp_path / "vault.mv2e"
    engine.create(path, model=None, passphrase=PASSPHRASE).close()
    d = life_daemon(tmp_path, name="vault", path=path, extra='passphrase-env = "VAULT_KEY"')
    d.env["VAULT_KEY"] = PASSPHRASE
    d.start()
    try:
        with Client(d.socket) as c:
            c.put("from the environment", uri="v://1")
    finally:
        d.close()
    creds = tmp_path / "creds"
    creds.mkdir()
    key_file(creds / "vault-key")
    d = life_daemon(tmp_path, name="vault", path=path, extra='passphrase-credential = "vault-key"')
    d.env["CREDENTIALS_DIRECTORY"] = str(creds)
    d.start()
    try:
        with Client(d.socket) as c:
            assert c.get(uri="v://1").text == "from the environment"
    finally:
        d.close()


def test_wrong_or_missing_passphrase_stops_the_daemon_naming_the_capsule(tmp_path):
    path = tmp_path / "vault.mv2e"
    engine.create(path, model=None, passphrase=PASSPHRASE).close()
    cfg = tmp_path / "memvidd.toml"

    key = key_file(tmp_path / "wrong.key", "not the passphrase")
    cfg.write_text(life_config(tmp_path, name="vault", path=path, extra=f'passphrase-file = "{key}"'))
    out = run_daemon(cfg)
    assert out.returncode == 2, out.stderr
    assert "'vault'" in out.stderr and "wrong passphrase" in out.stderr
    assert "not the passphrase" not in out.stderr and "Traceback" not in out.stderr

    cfg.write_text(life_config(tmp_path, name="vault", path=path))  # no passphrase source
    out = run_daemon(cfg)
    assert out.returncode == 2 and "'vault'" in out.stderr and "encrypted" in out.stderr, out.stderr

    cfg.write_text(life_config(tmp_path, name="vault", path=path, extra=f'passphrase-file = "{tmp_path}/nope.key"'))
    out = run_daemon(cfg)
    assert out.returncode == 2 and "'vault'" in out.stderr and "passphrase-file" in out.stderr, out.stderr

    cfg.write_text(life_config(tmp_path, name="vault", path=path, extra='passphrase-env = "UNSET_VAULT_KEY"'))
    out = run_daemon(cfg, env={"UNSET_VAULT_KEY": ""})
    assert out.returncode == 2 and "passphrase-env" in out.stderr, out.stderr

    plain = tmp_path / "plain.mv2"
    engine.create(plain, model=None).close()
    key = key_file(tmp_path / "right.key")
    cfg.write_text(life_config(tmp_path, name="plain", path=plain, extra=f'passphrase-file = "{key}"'))
    out = run_daemon(cfg)
    assert out.returncode == 2 and "'plain'" in out.stderr and "not encrypted" in out.stderr, out.stderr
    assert not (tmp_path / "q.sock").exists()


def test_two_passphrase_sources_are_a_config_error_naming_the_keys(tmp_path):
    cfg = tmp_path / "memvidd.toml"
    cfg.write_text(life_config(tmp_path, name="vault", extra='passphrase-env = "A"\npassphrase-file = "/k"'))
    with pytest.raises(config.ConfigError) as info:
        config.load(cfg)
    message = str(info.value)
    assert message.startswith(str(cfg)) and "passphrase-env" in message and "passphrase-file" in message
    assert "$.capsule[0].passphrase-file" in message
    out = run_daemon(cfg)
    assert out.returncode == 2 and "passphrase-env and passphrase-file" in out.stderr, out.stderr
    cfg.write_text(life_config(tmp_path, extra='passphrase-credential = ""'))
    with pytest.raises(config.ConfigError, match="passphrase-credential must not be empty"):
        config.load(cfg)
    cfg.write_text(life_config(tmp_path, ratio=1.5))
    with pytest.raises(config.ConfigError, match="compact-dead-ratio"):
        config.load(cfg)
