"""The checked habits (pyproject.toml): ruff's rule set and mypy pass on the code they cover.
Run here so a change that breaks either fails the suite, like any other test."""

from __future__ import annotations

import subprocess
import sys

import pytest

from daemon_util import ROOT

pytestmark = pytest.mark.timeout(300)

CHECKED = ["engine"]  # memvidd joins once its findings are fixed (issue 12)


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=280)


def test_ruff_passes():
    r = run("ruff", "check", "--no-cache", *CHECKED)
    assert r.returncode == 0, r.stdout + r.stderr


def test_mypy_passes():
    r = run("mypy", "--cache-dir", "/dev/null", *CHECKED)
    assert r.returncode == 0, r.stdout + r.stderr
