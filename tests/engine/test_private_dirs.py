"""Private runtime directories (issue 11, item 12).

With ``XDG_RUNTIME_DIR`` unset, memvidd falls back to ``/tmp/memvidd-$UID`` (sockets) and
``/dev/shm/memvidd-$UID`` (index working copies): world-writable parents, where another
user can make the directory first. Such a directory, or any one memvidd keeps things in
that others could write or that is not ours, is refused with a clear error, never used.
The fallback roots are module constants, pointed here at a sticky world-writable temp dir.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import engine
from daemon_util import ROOT
from engine import ramcopies
from memvidd import config


def mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


@pytest.fixture
def sticky(tmp_path):
    """A stand-in for /tmp and /dev/shm: world-writable with the sticky bit."""
    d = tmp_path / "sticky"
    d.mkdir()
    os.chmod(d, 0o1777)
    return d


def another_users(d: Path, monkeypatch) -> None:
    """Make ``d`` belong to someone else: chown it when we can (root), else pretend to
    be another user."""
    if os.geteuid() == 0:
        os.chown(d, 65534, 65534)
    else:
        uid = os.getuid()
        monkeypatch.setattr(os, "getuid", lambda: uid + 1)


def test_missing_directories_are_made_0700(tmp_path):
    top = tmp_path / "run"
    assert engine.private_dir(top / "memvidd" / "x", top=top) == top / "memvidd" / "x"
    for d in (top, top / "memvidd", top / "memvidd" / "x"):
        assert mode(d) == 0o700 and os.lstat(d).st_uid == os.getuid()


@pytest.mark.parametrize("where", ["top", "below"])
def test_a_world_writable_directory_is_refused(tmp_path, where):
    top = tmp_path / "run"
    (top / "memvidd").mkdir(parents=True, mode=0o700)
    os.chmod(top, 0o700)
    bad = top if where == "top" else top / "memvidd"
    os.chmod(bad, 0o777)
    with pytest.raises(engine.UnsafeDirectory, match=r"refusing .*mode 0777 \(others may write in it\)"):
        engine.private_dir(top / "memvidd" / "x", top=top)
    assert not (top / "memvidd" / "x").exists()  # nothing made in it


def test_a_symlink_in_place_of_the_directory_is_refused(tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    (tmp_path / "run").symlink_to(target)
    with pytest.raises(engine.UnsafeDirectory, match="symbolic link"):
        engine.private_dir(tmp_path / "run" / "memvidd", top=tmp_path / "run")
    assert not list(target.iterdir())


def test_a_directory_of_another_user_is_refused(tmp_path, monkeypatch):
    d = tmp_path / "run"
    d.mkdir(mode=0o700)
    another_users(d, monkeypatch)
    with pytest.raises(engine.UnsafeDirectory, match=r"owned by uid \d+, not by this user"):
        engine.private_dir(d)


def test_a_file_in_place_of_the_directory_is_refused(tmp_path):
    (tmp_path / "run").write_text("")
    with pytest.raises(engine.UnsafeDirectory, match="not a directory"):
        engine.private_dir(tmp_path / "run")


def test_our_directory_only_others_can_read_is_tightened(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    os.chmod(d, 0o755)  # as older versions left /dev/shm/memvidd-$UID
    engine.private_dir(d)
    assert mode(d) == 0o700


# -- the index working copies (engine) --------------------------------------------------


@pytest.fixture
def no_runtime_dir(monkeypatch, sticky):
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    monkeypatch.setattr(ramcopies, "SHM", str(sticky))
    return sticky / f"memvidd-{os.getuid()}"


def search_once(path: str) -> None:
    with engine.create(path, model=None) as cap:
        cap.put("some words", uri="n://1")
        cap.commit()
        cap.find("words", mode="lex")


def test_working_copies_go_to_a_private_shm_directory(path, no_runtime_dir):
    search_once(path)
    assert mode(no_runtime_dir) == 0o700 and (no_runtime_dir / "index").is_dir()


@pytest.mark.parametrize("attack", ["world-writable", "symlink", "another user"])
def test_a_neighbours_shm_directory_is_refused(path, no_runtime_dir, sticky, tmp_path, monkeypatch, attack):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chmod(theirs, 0o777)
    if attack == "world-writable":
        no_runtime_dir.mkdir()
        os.chmod(no_runtime_dir, 0o777)
        theirs = no_runtime_dir
    elif attack == "symlink":
        no_runtime_dir.symlink_to(theirs)
    else:
        uid = os.getuid()
        if os.geteuid() != 0:
            monkeypatch.setattr(os, "getuid", lambda: uid + 1)  # then our own dir is another user's
        theirs = sticky / f"memvidd-{os.getuid()}"
        theirs.mkdir(mode=0o700)
        if os.geteuid() == 0:
            os.chown(theirs, 65534, 65534)
    with pytest.raises(engine.UnsafeDirectory, match="refusing"):
        search_once(path)
    assert not [p for p in theirs.rglob("*")], "nothing was written where the neighbour can read it"


def test_a_group_writable_xdg_runtime_dir_is_refused(path, tmp_path, monkeypatch):
    runtime = tmp_path / "rt"
    runtime.mkdir()
    os.chmod(runtime, 0o770)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    with pytest.raises(engine.UnsafeDirectory, match="mode 0770"):
        search_once(path)
    assert not list(runtime.iterdir())


# -- the daemon's sockets (memvidd) -----------------------------------------------------


def test_the_socket_fallback_directory_is_checked(monkeypatch, sticky):
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    monkeypatch.setattr(config, "TMP", str(sticky))
    sock = config.expand(config.Daemon().socket)
    assert sock == f"{sticky}/memvidd-{os.getuid()}/memvidd/memvidd.sock"
    config.private_socket_dir(sock)  # made, both levels 0700
    assert mode(sticky / f"memvidd-{os.getuid()}") == 0o700 and mode(Path(sock).parent) == 0o700
    os.chmod(sticky / f"memvidd-{os.getuid()}", 0o777)  # as if a neighbour had made it first
    with pytest.raises(config.ConfigError, match=r"socket .*memvidd\.sock: refusing .*mode 0777"):
        config.private_socket_dir(sock)


def test_a_socket_configured_in_a_shared_directory_is_refused(sticky):
    with pytest.raises(config.ConfigError, match="others may write"):
        config.private_socket_dir(str(sticky / "memvidd.sock"))
    assert mode(sticky) == 0o1777  # and that directory was left as it was


@pytest.mark.timeout(60)
def test_the_daemon_refuses_to_start_in_an_unsafe_runtime_dir(tmp_path):
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    os.chmod(runtime, 0o777)
    cfg = tmp_path / "memvidd.toml"
    cfg.write_text(f'[embedding]\nmodel = "none"\n\n[[capsule]]\nname = "default"\npath = "{tmp_path}/c.mv2"\n')
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-m", "memvidd", "run", "--config", str(cfg)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=50)
    assert out.returncode == 2, out.stderr[-2000:]
    assert f"refusing {runtime}" in out.stderr and "others may write" in out.stderr, out.stderr[-2000:]
    assert not list(runtime.iterdir())  # no socket, no working copy
