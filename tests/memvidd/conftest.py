"""Fixtures of the daemon tests: a real ``memvidd run`` (lexical) in the test's directory."""

from __future__ import annotations

import pytest

from daemon_util import DaemonProc


@pytest.fixture
def daemon(tmp_path):
    d = DaemonProc(tmp_path).start()
    yield d
    d.close()
