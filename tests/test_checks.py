"""The checked habits (pyproject.toml): ruff's rule set and mypy pass on the code they cover.
Run here so a change that breaks either fails the suite, like any other test."""

from __future__ import annotations

import subprocess
import sys

import pytest

from daemon_util import ROOT

pytestmark = pytest.mark.timeout(300)

LINTED = ["engine", "memvidd", "bench"]
TYPED = ["engine", "memvidd"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=280)


def test_ruff_passes():
    r = run("ruff", "check", "--no-cache", *LINTED)
    assert r.returncode == 0, r.stdout + r.stderr


def test_mypy_passes():
    r = run("mypy", "--cache-dir", "/dev/null", *TYPED)
    assert r.returncode == 0, r.stdout + r.stderr
