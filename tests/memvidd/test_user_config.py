"""One configuration, found by every command: discovery order, `memvidd init`, client
commands reaching the daemon of the user's config, reloads that apply watch lists and
limits, and watch directories that do not exist yet.

Every test runs in a temporary HOME (no XDG_CONFIG_HOME, MEMVIDD_CONFIG or MEMVIDD_SOCKET
from the environment): the real ~/.config is never read or written.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from daemon_util import ROOT, DaemonProc
from memvidd import config
from memvidd.client import Client

pytestmark = pytest.mark.timeout(90)

LEAKED = ("XDG_CONFIG_HOME", "MEMVIDD_CONFIG", "MEMVIDD_SOCKET")

USER_CONFIG = """
[daemon]
socket = "{dir}/q.sock"
events-socket = "{dir}/e.sock"
log-level = "debug"

[limits]
max-put-bytes = {max_put}

[embedding]
model = "none"

[cache]
result-bytes = {result_bytes}

[[capsule]]
name = "default"
path = "{dir}/default.mv2"
watch = {watch}

[[capsule]]
name = "work"
path = "{dir}/work.mv2"
watch = {work_watch}
"""


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A fresh HOME, for this process and the subprocesses it starts."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in LEAKED:
        monkeypatch.delenv(var, raising=False)
    return home


def user_file(home: Path) -> Path:
    return home / ".config" / "memvidd" / "config.toml"


def write_user_config(home: Path, tmp: Path, *, watch: Sequence[Path] = (), work_watch: Sequence[Path] = (),
                      max_put: int = 1 << 20, result_bytes: int = 1 << 20) -> Path:
    f = user_file(home)
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(USER_CONFIG.format(dir=tmp, watch=json.dumps([str(w) for w in watch]),
                                    work_watch=json.dumps([str(w) for w in work_watch]),
                                    max_put=max_put, result_bytes=result_bytes))
    return f


def cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """``memvidd ARGS`` in this process's environment (its temporary HOME)."""
    return subprocess.run([sys.executable, "-m", "memvidd", *args], capture_output=True, text=True, timeout=60,
                          cwd=cwd)


def user_daemon(tmp: Path) -> DaemonProc:
    """A daemon started as the systemd unit starts it (its ExecStart's arguments, without
    any --config), in the temporary HOME."""
    unit = (ROOT / "systemd" / "memvidd.service").read_text()
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    args = exec_start.split()[1:]
    assert args == ["run"], exec_start  # the unit relies on `run` finding the user's config
    d = DaemonProc(tmp)
    for var in LEAKED:
        d.env.pop(var, None)
    return d.start(args=args)


def until(cond: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
    return value


def found(socket: str, query: str, capsule: str | None = None) -> set[str]:
    with Client(socket) as c:
        return {h.uri or "" for h in c.find(query, mode="lex", capsule=capsule)}


# -- discovery -------------------------------------------------------------------------


def test_discovery_order_explicit_env_xdg_home_default(home, tmp_path, monkeypatch):
    assert config.locate() is None  # nothing there: the embedded default
    assert config.load(config.locate()).source == "<default config.toml>"
    in_home = user_file(home)
    in_home.parent.mkdir(parents=True)
    in_home.write_text('[[capsule]]\nname = "home"\npath = "h.mv2"\n')
    assert config.locate() == str(in_home)  # ~/.config: XDG_CONFIG_HOME's fallback
    assert config.load(config.locate(), client=True).default_capsule.name == "home"
    xdg = tmp_path / "xdg"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(xdg))
    assert config.locate() is None  # XDG_CONFIG_HOME set: ~/.config is not where it looks
    (xdg / "memvidd").mkdir(parents=True)
    (xdg / "memvidd" / "config.toml").write_text('[[capsule]]\nname = "xdg"\npath = "x.mv2"\n')
    assert config.locate() == str(xdg / "memvidd" / "config.toml")
    env = tmp_path / "env.toml"
    monkeypatch.setenv("MEMVIDD_CONFIG", str(env))
    assert config.locate() == str(env)  # named: used even before it exists...
    with pytest.raises(config.ConfigError, match=f"{env}: cannot read"):
        config.load(config.locate())  # ...so that a typo is an error, not the default
    explicit = tmp_path / "explicit.toml"
    assert config.locate(explicit) == str(explicit)  # --config beats them all


def test_an_invalid_user_config_is_an_error_for_every_command(home, tmp_path):
    f = user_file(home)
    f.parent.mkdir(parents=True)
    f.write_text('[daemon]\nsokcet = "x"\n[[capsule]]\nname = "a"\npath = "a.mv2"\n')
    for argv in (["run"], ["find", "anything"], ["status"], ["reload"], ["branch", str(tmp_path / "b.mv2")],
                 ["verify"], ["stats"]):
        out = cli(*argv)
        assert out.returncode == 2, (argv, out.stdout, out.stderr)
        assert str(f) in out.stderr and "sokcet" in out.stderr, (argv, out.stderr)
    assert not (tmp_path / "b.mv2").exists()


# -- init ------------------------------------------------------------------------------


def test_init_writes_the_commented_default_0600_and_never_overwrites(home):
    out = cli("init")
    assert out.returncode == 0, out.stderr
    f = user_file(home)
    assert f.read_text() == config.default_text()
    assert stat.S_IMODE(f.stat().st_mode) == 0o600
    for d in (f.parent, f.parent.parent):  # ~/.config/memvidd and ~/.config, both made here
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    assert str(f) in out.stdout
    for step in ("watch = [", "memvidd run", "memvidd reload"):
        assert step in out.stdout, out.stdout
    assert config.load(config.locate()).source == str(f)  # what every command now reads
    f.write_text(f.read_text() + "# mine\n")
    again = cli("init")
    assert again.returncode == 1 and "exists" in again.stderr and str(f) in again.stderr
    assert f.read_text().endswith("# mine\n")


def test_init_writes_where_memvidd_config_points(home, tmp_path, monkeypatch):
    target = tmp_path / "elsewhere" / "memvidd.toml"
    monkeypatch.setenv("MEMVIDD_CONFIG", str(target))
    assert cli("init").returncode == 0
    assert target.read_text() == config.default_text() and not user_file(home).exists()


# -- client commands and the daemon of the user's config -------------------------------


def test_client_commands_without_options_reach_the_daemon_of_the_user_config(home, tmp_path):
    write_user_config(home, tmp_path)
    d = user_daemon(tmp_path)
    try:
        put = cli("put", "the okapi of the user config", "--uri", "note://okapi", "--json")
        assert put.returncode == 0, put.stderr
        hits = json.loads(cli("find", "okapi", "--mode", "lex", "--json").stdout)["hits"]
        assert [h["uri"] for h in hits] == ["note://okapi"]
        status = cli("status")
        assert str(tmp_path / "default.mv2") in status.stdout and "work" in status.stdout
        # branch and verify without --capsule: the capsule this daemon serves
        out = tmp_path / "branch.mv2"
        branched = cli("branch", str(out))
        assert branched.returncode == 0, branched.stderr
        got = cli("get", "--uri", "note://okapi", "--capsule", str(out))
        assert got.stdout.strip() == "the okapi of the user config"
        verified = cli("verify")
        assert verified.returncode == 0 and f"{tmp_path / 'default.mv2'}: ok" in verified.stdout
        # an explicit --config still wins (here: one whose socket has no daemon)
        other = tmp_path / "other.toml"
        other.write_text(f'[daemon]\nsocket = "{tmp_path}/none.sock"\n[[capsule]]\nname = "o"\npath = "o.mv2"\n')
        refused = cli("find", "okapi", "--config", str(other))
        assert refused.returncode == 1 and f"{tmp_path}/none.sock" in refused.stderr
    finally:
        d.close()


# -- reload ----------------------------------------------------------------------------


def test_reload_applies_watch_lists_and_limits_and_says_what_changed(home, tmp_path):
    old, new, work = tmp_path / "old", tmp_path / "new", tmp_path / "work"
    for directory in (old, new, work):
        directory.mkdir()
    (old / "a.txt").write_text("the aardvark lives in the old directory\n")
    (new / "b.txt").write_text("the bongo lives in the new directory\n")
    (work / "c.txt").write_text("the capybara lives in the work directory\n")
    f = write_user_config(home, tmp_path, watch=[old])
    d = user_daemon(tmp_path)
    try:
        until(lambda: found(d.socket, "aardvark"), "the old directory indexed")
        with Client(d.socket) as c:
            assert c.server.max_put == 1 << 20 and "reload" in c.server.features
        write_user_config(home, tmp_path, watch=[new], work_watch=[work], max_put=4096, result_bytes=2 << 20)
        out = cli("reload")
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert lines[0] == f"reloaded {f}"
        assert f"  capsule default.watch +{new} -{old}" in lines
        assert f"  capsule work.watch +{work}" in lines  # a capsule that watched nothing before
        assert "  limits.max-put-bytes: 1048576 -> 4096" in lines
        assert "  not applied: cache.result-bytes: 1048576 -> 2097152 (needs a restart)" in lines
        # the new directories are watched and indexed; the old one's frames stay
        until(lambda: found(d.socket, "bongo"), "the new directory indexed")
        until(lambda: found(d.socket, "capybara", capsule="work"), "the work directory indexed")
        (new / "later.txt").write_text("a bongo saved after the reload\n")
        until(lambda: len(found(d.socket, "bongo")) == 2, "a save in the new directory")
        assert found(d.socket, "aardvark")
        with Client(d.socket) as c:
            assert c.stats().indexer["roots"] == [str(new)]
            assert c.server.max_put == 4096  # the new limit, without a restart
        # a second reload of the same file changes nothing but still names what waits
        again = cli("reload", "--json")
        reply = json.loads(again.stdout)
        assert reply["applied"] == [] and reply["pending"] == ["cache.result-bytes: 1048576 -> 2097152 "
                                                               "(needs a restart)"]
        assert "reload: capsule default.watch" in d.log.read_text()
        # a broken file: a clear error, and the daemon goes on as it was
        f.write_text(f.read_text().replace("[limits]", "[limits]\nmax-put-bytez = 1"))
        assert cli("reload").returncode == 2  # the command itself cannot read it (which socket?)
        broken = cli("reload", "--socket", d.socket)  # the daemon cannot either
        assert broken.returncode == 1 and str(f) in broken.stderr and "max-put-bytez" in broken.stderr
        assert "running configuration is kept" in broken.stderr
        assert found(d.socket, "bongo")
    finally:
        d.close()


def test_sighup_applies_a_changed_watch_list(tmp_path):
    """The signal takes the same path as `memvidd reload` (here on an explicit --config)."""
    watched = tmp_path / "watched"
    watched.mkdir()
    (watched / "d.txt").write_text("the dugong arrives with the reload\n")
    d = DaemonProc(tmp_path).start()
    try:
        d.config.write_text(d.config.read_text().replace('.mv2"\n', f'.mv2"\nwatch = ["{watched}"]\n', 1))
        d.signal(signal.SIGHUP)
        d.wait_for("READY=1")
        until(lambda: found(d.socket, "dugong"), "the directory added by SIGHUP indexed")
        assert f"reload: capsule default.watch +{watched}" in d.log.read_text()
    finally:
        d.close()


# -- a watch directory that does not exist (yet) ---------------------------------------


def test_a_missing_watch_directory_is_reported_then_picked_up(home, tmp_path):
    later = tmp_path / "later" / "notes"  # its parent does not exist either
    write_user_config(home, tmp_path, watch=[later])
    d = user_daemon(tmp_path)
    try:
        with Client(d.socket) as c:
            indexer = c.stats().indexer
        assert indexer["phase"] == "missing" and indexer["missing"] == [str(later)], indexer
        log = d.log.read_text()
        assert "WARNING" in log and f"watch directory missing capsule=default path={later}" in log
        later.mkdir(parents=True)
        (later / "n.txt").write_text("the numbat turns up once its directory exists\n")
        until(lambda: found(d.socket, "numbat"), "the new directory picked up", timeout=30)
        with Client(d.socket) as c:
            indexer = c.stats().indexer
        assert indexer["missing"] == [] and indexer["phase"] in ("indexing", "watching"), indexer
        assert f"watch directory found capsule=default path={later}" in d.log.read_text()
    finally:
        d.close()
