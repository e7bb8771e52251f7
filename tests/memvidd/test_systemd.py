"""memvidd.systemd against real sockets, and the unit files against systemd-analyze.

NOTIFY_SOCKET is a real AF_UNIX datagram socket (path and abstract); socket activation is
exercised in a child process that inherits real listening sockets on fds 3, 4, ... exactly
as systemd passes them.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
import trio

from memvidd import systemd

ROOT = Path(__file__).resolve().parents[2]  # the repository
UNITS = ("memvidd.service", "memvidd.socket", "memvidd-events.socket")
LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(autouse=True)
def no_systemd_env(monkeypatch):
    """Tests start outside systemd even if pytest itself runs under it."""
    for var in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", *LISTEN_VARS):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def short_dir():
    """A directory for socket paths short enough for sun_path (108 bytes), unlike tmp_path."""
    with tempfile.TemporaryDirectory(prefix="mvd-") as d:
        yield Path(d)


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request, short_dir, monkeypatch):
    """A bound datagram socket standing in for systemd, with NOTIFY_SOCKET pointing at it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        if request.param == "path":
            address = str(short_dir / "notify")
            sock.bind(address)
        else:
            address = f"@memvidd-test-{uuid.uuid4().hex}"
            sock.bind("\0" + address[1:])
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", address)
        yield sock


# --- notify ---------------------------------------------------------------------------


def test_notify_sends_one_newline_joined_datagram(notify_socket):
    assert systemd.notify("READY=1", "STATUS=serving 3 capsules")
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=serving 3 capsules"
    assert systemd.notify("STOPPING=1")
    assert notify_socket.recv(4096) == b"STOPPING=1"
    notify_socket.setblocking(False)
    with pytest.raises(BlockingIOError):  # exactly those two datagrams, nothing more
        notify_socket.recv(4096)


def test_notify_without_notify_socket_is_a_no_op():
    assert systemd.notify("READY=1") is False


@pytest.mark.parametrize("where", ["missing", "refused", "abstract-missing", "relative"])
def test_notify_to_nowhere_returns_false_and_logs(where, short_dir, monkeypatch, caplog):
    if where == "refused":  # the socket file exists but nobody listens any more
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as gone:
            gone.bind(str(short_dir / "gone"))
    address = {
        "missing": str(short_dir / "nowhere"),
        "refused": str(short_dir / "gone"),
        "abstract-missing": f"@memvidd-test-{uuid.uuid4().hex}",
        "relative": "notify.sock",
    }[where]
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    with caplog.at_level("DEBUG", logger="memvidd.systemd"):
        assert systemd.notify("READY=1") is False
    assert address in caplog.text


# --- watchdog -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("30000000", None, 15.0),
        ("30000000", "self", 15.0),
        ("1", None, 0.0000005),
        (None, None, None),
        (None, "self", None),
        ("30000000", "other", None),
        ("30000000", "garbage", None),
        ("garbage", None, None),
        ("", None, None),
        ("0", None, None),
        ("-5", None, None),
        ("1.5e6", None, None),
    ],
)
def test_watchdog_interval(usec, pid, expected, monkeypatch):
    if usec is not None:
        monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid is not None:
        pids = {"self": str(os.getpid()), "other": str(os.getpid() + 1)}
        monkeypatch.setenv("WATCHDOG_PID", pids.get(pid, pid))
    assert systemd.watchdog_interval() == expected


@pytest.mark.trio
async def test_serve_watchdog_pings_every_interval(notify_socket, autojump_clock):
    received: list[tuple[float, bytes]] = []
    with trio.socket.from_stdlib_socket(notify_socket.dup()) as sock:
        with trio.fail_after(60):  # virtual seconds: the autojump clock skips the sleeps
            async with trio.open_nursery() as nursery:
                await nursery.start(systemd.serve_watchdog, 10.0)
                while len(received) < 3:
                    data = await sock.recv(4096)
                    received.append((trio.current_time(), data))
                nursery.cancel_scope.cancel()
    assert [data for _, data in received] == [b"WATCHDOG=1"] * 3
    times = [t for t, _ in received]
    assert times[1] - times[0] == pytest.approx(10.0)
    assert times[2] - times[1] == pytest.approx(10.0)


@pytest.mark.trio
async def test_serve_watchdog_without_systemd_just_sleeps(autojump_clock):
    with trio.move_on_after(100):
        await systemd.serve_watchdog(1.0)  # NOTIFY_SOCKET unset: nothing to send, no error


@pytest.mark.trio
@pytest.mark.parametrize("interval", [0, -1.0, float("nan")])
async def test_serve_watchdog_rejects_a_bad_interval(interval):
    with pytest.raises(ValueError, match="positive"):
        await systemd.serve_watchdog(interval)


# --- socket activation ----------------------------------------------------------------

CHILD = """
import json, os, socket, sys
from memvidd import systemd
before = os.environ["LISTEN_PID"] == str(os.getpid())
got = systemd.listen_fds()
report = {
    "listen_pid_was_mine": before,
    "env_left": sorted(k for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES") if k in os.environ),
    "sockets": {
        name: [
            {"fd": s.fileno(), "family": s.family.name, "type": s.type.name,
             "inheritable": os.get_inheritable(s.fileno()), "address": s.getsockname()}
            for s in socks
        ]
        for name, socks in got.items()
    },
}
print(json.dumps(report), flush=True)
conn, _ = got["query"][0].accept()
with conn:
    conn.sendall(b"accepted by %d" % os.getpid())
for socks in got.values():
    for s in socks:
        s.close()
"""


# A stand-in for the service manager: moves the passed sockets onto fds 3, 4, ... (out of
# the way first, so no target is clobbered), sets LISTEN_PID to its own pid and execs the
# child, which thus inherits them across exec exactly as under systemd.
MANAGER = """
import fcntl, os, sys
fds = [int(fd) for fd in sys.argv[1].split(",")]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]
for fd in fds:
    os.close(fd)
for target, fd in enumerate(high, start=3):
    os.dup2(fd, target)  # inheritable, as systemd passes them
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())  # exec keeps the pid
os.execv(sys.executable, [sys.executable, "-c", sys.argv[2]])
"""


def _activate(socks: list[socket.socket], env: dict[str, str]) -> subprocess.Popen:
    """Start CHILD with ``socks`` on fds 3, 4, ... and LISTEN_PID set to its own pid."""
    fds = [s.fileno() for s in socks]
    child_env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_", "WATCHDOG_"))}
    child_env |= env | {"PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", MANAGER, ",".join(map(str, fds)), CHILD],
        env=child_env,
        pass_fds=fds,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _listening(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen()
    return sock


def _run_activated(socks: list[socket.socket], env: dict[str, str], query: Path) -> tuple[dict, bytes, int]:
    """Activate CHILD, connect to its 'query' socket; its report, what it sent, its pid."""
    proc = _activate(socks, env)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(10)
            client.connect(str(query))  # queued on the listening socket the child inherited
            reply = b""
            while chunk := client.recv(4096):
                reply += chunk
        out, err = proc.communicate(timeout=10)
    except BaseException:
        proc.kill()
        _, err = proc.communicate()
        print(f"child stderr:\n{err.decode()}")  # shown by pytest with the failure
        raise
    assert proc.returncode == 0, err.decode()
    return json.loads(out), reply, proc.pid


def test_listen_fds_in_a_socket_activated_child(short_dir):
    query_path, events_path = short_dir / "memvidd.sock", short_dir / "events.sock"
    with _listening(query_path) as query, _listening(events_path) as events:
        report, reply, pid = _run_activated(
            [query, events], {"LISTEN_FDS": "2", "LISTEN_FDNAMES": "query:events"}, query_path
        )
    assert report["listen_pid_was_mine"]
    assert report["env_left"] == []
    unix_stream = {"family": "AF_UNIX", "type": "SOCK_STREAM", "inheritable": False}
    assert report["sockets"] == {
        "query": [{"fd": 3, **unix_stream, "address": str(query_path)}],
        "events": [{"fd": 4, **unix_stream, "address": str(events_path)}],
    }
    assert reply == b"accepted by %d" % pid


def test_listen_fds_detects_the_type_and_names_missing_names_unknown(short_dir):
    query_path = short_dir / "memvidd.sock"
    with (
        _listening(query_path) as query,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as dgram,
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unbound,
    ):
        dgram.bind(str(short_dir / "dgram.sock"))
        report, reply, pid = _run_activated(
            [query, dgram, unbound], {"LISTEN_FDS": "3", "LISTEN_FDNAMES": "query"}, query_path
        )
    assert report["env_left"] == []
    assert sorted(report["sockets"]) == ["query", "unknown"]
    unknown = [(s["fd"], s["type"]) for s in report["sockets"]["unknown"]]
    assert unknown == [(4, "SOCK_DGRAM"), (5, "SOCK_STREAM")]
    assert reply == b"accepted by %d" % pid


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"LISTEN_PID": "other", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "query:events"},
        {"LISTEN_PID": "self", "LISTEN_FDS": "0"},
        {"LISTEN_PID": "self", "LISTEN_FDS": "two"},
        {"LISTEN_FDS": "2"},
    ],
    ids=["unset", "another-process", "zero-fds", "garbage-count", "no-pid"],
)
@pytest.mark.parametrize("unset", [True, False])
def test_listen_fds_not_activated(env, unset, monkeypatch):
    pids = {"self": str(os.getpid()), "other": str(os.getpid() + 1)}
    for var, value in env.items():
        monkeypatch.setenv(var, pids.get(value, value))
    before = {var: os.environ.get(var) for var in LISTEN_VARS}
    assert systemd.listen_fds(unset_environment=unset) == {}
    after = {var: os.environ.get(var) for var in before}
    assert after == ({var: None for var in before} if unset else before)


# --- unit files -----------------------------------------------------------------------


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze not on PATH (apt-get install systemd)"
)
def test_units_pass_systemd_analyze_verify(tmp_path, short_dir):
    """--user mode, as installed: %h is a scratch home holding a stand-in memvidd entry point.

    verify exits 0 even on unknown keys and unparsable values (it only warns), so any
    output at all fails the test.
    """
    home, runtime = tmp_path / "home", short_dir / "run"
    (home / ".local" / "bin").mkdir(parents=True)
    runtime.mkdir(mode=0o700)
    stub = home / ".local" / "bin" / "memvidd"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("XDG_")}
    env |= {"HOME": str(home), "XDG_RUNTIME_DIR": str(runtime)}
    result = subprocess.run(
        ["systemd-analyze", "verify", "--user", *UNITS],
        cwd=ROOT / "systemd",
        env=env,
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""


def test_units_agree_with_the_code_and_the_default_config():
    """The names listen_fds() is looked up by, and the socket paths of the default config."""
    text = {unit: (ROOT / "systemd" / unit).read_text() for unit in UNITS}
    assert "FileDescriptorName=query\n" in text["memvidd.socket"]
    assert "FileDescriptorName=events\n" in text["memvidd-events.socket"]
    assert "ListenStream=%t/memvidd/memvidd.sock\n" in text["memvidd.socket"]
    assert "ListenStream=%t/memvidd/events.sock\n" in text["memvidd-events.socket"]
    default = (ROOT / "memvidd" / "default_config.toml").read_text()
    assert 'socket = "$XDG_RUNTIME_DIR/memvidd/memvidd.sock"' in default
    assert 'events-socket = "$XDG_RUNTIME_DIR/memvidd/events.sock"' in default
    service = text["memvidd.service"]
    for line in ("Type=notify", "NotifyAccess=main", "WatchdogSec=30"):
        assert line + "\n" in service
    for line in ("Sockets=memvidd.socket memvidd-events.socket", "ExecStart=%h/.local/bin/memvidd run"):
        assert line + "\n" in service
