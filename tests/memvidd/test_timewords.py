"""Time in words: "yesterday", "last tuesday 17:00", "2 hours ago", ISO dates and commit
numbers, in the user's timezone, wherever a time is accepted (the CLI, the memvid-shaped
API, the MCP tools); text that is no time is an error naming it."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

import engine
import memvidd.sdk as memvid
from memvidd import cli, timewords
from memvidd.timewords import WhenError, parse_when

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
# Thursday 12 March 2026, 10:30 UTC: no daylight-saving change within a week before it,
# in Paris or in New York.
NOW = dt.datetime(2026, 3, 12, 10, 30, tzinfo=dt.UTC).timestamp()


def read_in(tz: str, *phrases: str) -> list[float | int]:
    """``parse_when`` of each phrase at ``NOW``, in a process whose timezone is ``tz``."""
    code = ("import json, sys; from memvidd.timewords import parse_when; "
            f"print(json.dumps([parse_when(p, now={NOW}) for p in sys.argv[1:]]))")
    out = subprocess.run([sys.executable, "-c", code, *phrases], cwd=ROOT, env={**os.environ, "TZ": tz},
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return json.loads(out)


def at(tz: str, *args: int) -> float:
    return dt.datetime(*args, tzinfo=ZoneInfo(tz)).timestamp()


@pytest.mark.parametrize("tz", ["Europe/Paris", "America/New_York"])
def test_words_are_read_in_the_users_timezone(tz):
    got = read_in(tz, "last tuesday 17:00", "yesterday", "2 hours ago", "yesterday 00:00", "2026-03-01",
                  "2026-03-01 09:15", "2026-03-01T09:15+00:00", "12", "@1700000000.5", "3 days ago")
    assert got == [
        at(tz, 2026, 3, 10, 17, 0),  # wall-clock 17:00 where the user is
        NOW - 86400,  # 24 hours ago, as git reads it
        NOW - 7200,
        at(tz, 2026, 3, 11, 0, 0),
        at(tz, 2026, 3, 1, 0, 0),
        at(tz, 2026, 3, 1, 9, 15),
        dt.datetime(2026, 3, 1, 9, 15, tzinfo=dt.UTC).timestamp(),
        12,  # a commit
        1700000000.5,
        NOW - 3 * 86400,
    ]
    assert isinstance(got[7], int) and all(isinstance(t, float) for i, t in enumerate(got) if i != 7)


def test_text_that_is_no_time_is_an_error_naming_it():
    for bad in ["garbage words", "yesterdy", "", "   ", "2026-13-45", "@soon"]:
        with pytest.raises(WhenError, match=repr(bad).replace("[", r"\[")):
            parse_when(bad, now=NOW)
    with pytest.raises(WhenError, match=r"--until takes a time .* not commit 12: --as-of 12"):
        timewords.since("12", "--until")
    assert timewords.since("2 hours ago") == pytest.approx(time.time() - 7200, abs=60)


def test_expiries_are_times_to_come():
    assert timewords.expires("3600", now=NOW) == NOW + 3600
    assert timewords.expires("in 2 days", now=NOW) == NOW + 2 * 86400
    tomorrow = timewords.expires("tomorrow 9:00", now=NOW)
    assert tomorrow is not None and NOW < tomorrow < NOW + 86400 + 3600 * 24
    assert timewords.expires("friday", now=NOW) > NOW, "a weekday alone is the next one"
    assert parse_when("friday", now=NOW) < NOW, "...but the last one where a past is asked"


def test_dateparser_is_imported_only_for_words():
    """The CLI's daemon commands stay fast: numbers and ISO times never load dateparser."""
    code = ("import sys; from memvidd import cli, timewords; "
            "timewords.as_of('12'); timewords.since('2026-03-01'); timewords.as_of('@5'); "
            "print('dateparser' in sys.modules, end=' '); timewords.since('yesterday'); "
            "print('dateparser' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         check=True).stdout
    assert out.split() == ["False", "True"]


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_the_cli_takes_words_for_every_time(tmp_path, capsys):
    path = tmp_path / "c.mv2"
    with engine.create(path, model=None) as cap:
        cap.put("an old note about lichen", uri="n://old", timestamp=time.time() - 3 * 86400)
        cap.put("a fresh note about moss", uri="n://new")
        cap.commit()
    code, out, err = run(capsys, "timeline", "--capsule", str(path), "--since", "yesterday", "--json")
    assert code == 0, err
    assert [e["uri"] for e in json.loads(out)] == ["n://new"]
    code, out, _ = run(capsys, "timeline", "--capsule", str(path), "--until", "2 days ago", "--json")
    assert [e["uri"] for e in json.loads(out)] == ["n://old"]
    code, out, _ = run(capsys, "find", "--capsule", str(path), "note", "--since", "last week",
                       "--until", "in 1 hour", "--as-of", "1", "--json")
    assert code == 0 and {h["uri"] for h in json.loads(out)["hits"]} == {"n://old", "n://new"}

    code, out, err = run(capsys, "find", "--capsule", str(path), "note", "--since", "the day before the thaw")
    assert code == 1 and "cannot read 'the day before the thaw' as a time" in err and out == ""
    code, _, err = run(capsys, "timeline", "--capsule", str(path), "--since", "1")
    assert code == 1 and "--since takes a time" in err
    code, _, err = run(capsys, "find", "--capsule", str(path), "note", "--as-of", "whenever")
    assert code == 1 and "'whenever'" in err


def test_the_memvid_shaped_api_takes_the_same_words(tmp_path):
    path = str(tmp_path / "m.mv2")
    mem = memvid.create(path, enable_vec=False)
    mem.put(title="t", label="l", text="a note about ferns")
    assert [e["preview"] for e in mem.timeline(since="1 hour ago")] == ["a note about ferns"]
    assert mem.timeline(until="yesterday") == []
    assert mem.find("ferns", as_of_ts="in 1 hour")["hits"], "a time as words"
    with pytest.raises(ValueError, match="cannot read 'soonish' as a time"):
        mem.find("ferns", as_of_ts="soonish")
    mem.seal()


def test_the_mcp_tools_take_the_same_words():
    mcp_server = pytest.importorskip("memvidd.mcp_server")
    assert mcp_server._time("2 hours ago", "since") == pytest.approx(time.time() - 7200, abs=60)
    assert mcp_server._as_of("12") == 12 and mcp_server._as_of(3) == 3
    assert mcp_server._expires("in 2 hours") == pytest.approx(time.time() + 7200, abs=60)
    with pytest.raises(mcp_server.ToolFailed, match="since: cannot read 'the thaw' as a time"):
        mcp_server._time("the thaw", "since")
