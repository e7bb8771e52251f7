"""Shared fixtures: a temp capsule path and a leak check on open files and threads."""

from __future__ import annotations

import os
import threading

import pytest


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "c.mv2")


def _open_files() -> set[tuple[str, str]]:
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:  # the fd of the listdir itself
            continue
        if target.startswith("/") and not target.startswith(("/dev/", "/proc/")):
            out.add((fd, target))
    return out


@pytest.fixture(autouse=True)
def no_leaks():
    """Every test must close what it opens: a leaked fd would also leak a capsule lock."""
    files, threads = _open_files(), _threads()
    yield
    leaked = _open_files() - files
    assert not leaked, f"leaked open files: {sorted(t for _, t in leaked)}"
    assert _threads() <= threads, f"leaked threads: {sorted(t.name for t in threading.enumerate())}"


def _threads() -> int:
    # trio keeps idle worker threads cached for reuse ("Trio thread N"): not a leak.
    return sum(1 for t in threading.enumerate() if not t.name.startswith("Trio thread"))


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Index working copies go to a per-test cache dir, never the user's ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path_factory.mktemp("runtime")))  # RAM-side copies


@pytest.fixture(scope="session")
def embedder(tmp_path_factory):
    """The real embedding model, loaded once per test session (~2 s)."""
    from engine.embed import Embedder

    return Embedder(threads=2, cache=tmp_path_factory.mktemp("model-cache"))
