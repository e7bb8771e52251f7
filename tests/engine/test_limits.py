"""Frame metadata limits, and URI scopes indexed at linear cost (issue 11, item 3).

A put whose URI had 30,000 slashes once took a daemon to 2.6 GB: every prefix of the URI
was an index term. Metadata past the documented limits is now refused before anything
is written, and a capsule that already holds such a frame opens and indexes in bounded
memory, with scope search still exact at any depth.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

import engine
from daemon_util import ROOT, DaemonProc
from engine import metadata
from engine import lexical
from memvidd import protocol as p
from memvidd.client import Client, RemoteError

DEEP = "x:" + "a/" * 30_000  # 60 KB, 30,000 boundaries: the URI from the issue

TOO_BIG = {
    "uri": {"uri": "u:" + "é" * 8192},  # counted in UTF-8 bytes, not characters
    "parent": {"parent": "p:" + "x" * (16 << 10)},
    "title": {"title": "t" * ((4 << 10) + 1)},
    "kind": {"kind": "k" * 257},
    "tag key": {"tags": {"k" * 257: "v"}},
    "tag value": {"tags": {"k": "v" * ((4 << 10) + 1)}},
    "tag count": {"tags": {f"k{i}": "v" for i in range(257)}},
}


@pytest.mark.req("F-09")
@pytest.mark.parametrize("field", TOO_BIG)
def test_metadata_past_a_limit_is_refused_before_anything_is_written(path, field):
    with engine.create(path, model=None) as cap:
        cap.put("kept", uri="u:kept")
        cap.commit()
        size = os.path.getsize(path)
        with pytest.raises(engine.InvalidArgument, match="exceeds? the limit"):
            cap.put("refused", **TOO_BIG[field])
        assert os.path.getsize(path) == size  # not even the payload block was written
        cap.put("after", uri="u:after")
        cap.commit()
        assert [e.uri for e in cap.timeline()] == ["u:kept", "u:after"]


def test_metadata_at_the_limits_is_accepted(path):
    with engine.create(path, model=None) as cap:
        fid = cap.put("fits", uri="u:" + "x" * ((16 << 10) - 2), title="t" * (4 << 10), kind="k" * 256,
                      tags={f"{i:0256d}": "v" * (4 << 10) for i in range(256)})
        cap.commit()
        assert len(cap.get(fid).tags) == 256
        assert [h.frame_id for h in cap.find("fits", mode="lex", scope="u:xxx")] == [fid]


def _uris() -> list[str]:
    deep = "d:/" + "".join(f"s{i}/" for i in range(300))  # 300 levels, ~1.5 KB
    return [
        "note://a/b", "note://a/bc", "note://a/b/c#1", "note://ab", "file:///home/u/x.py#k1",
        deep, deep + "leaf", deep[:700] + "other/x", "é:/" + "ü" * 200 + "/z",
        "nl:/line\nbreak/x", "q:/a?b=c:d#e", "x" * 300,
    ]


def _scopes(uris: list[str]) -> list[str]:
    out = {""}
    for u in uris:
        for n in {1, 2, 5, 9, 10, 11, 127, 128, 129, 255, 256, 700, 1023, 1024, 1025, 1500, len(u) - 1, len(u)}:
            out.add(u[:n])
        out.update(u[: i + 1] for i, ch in enumerate(u) if ch in "/#:?")  # every boundary prefix
    return sorted(out)


def test_scope_search_is_exact_at_any_depth(path):
    uris = _uris()
    with engine.create(path, model=None) as cap:
        ids = {cap.put(f"common word {i}", uri=u): u for i, u in enumerate(uris)}
        cap.commit()
        for scope in _scopes(uris):
            found = {h.frame_id for h in cap.find("common", k=100, mode="lex", scope=scope)}
            assert found == {f for f, u in ids.items() if u.startswith(scope)}, scope[:80]


def test_uri_prefixes_are_bounded():
    prefixes = lexical.uri_prefixes(DEEP)
    assert len(prefixes) == lexical.PREFIXES and all(len(x) <= lexical.PREFIX_CHARS for x in prefixes)
    assert sum(map(len, lexical.uri_blocks(DEEP))) < 2 * len(DEEP)  # linear, not quadratic
    # A normal URI keeps every prefix it had: its scope queries are the single term lookup.
    assert lexical.uri_prefixes("file:///home/u/x.py#k1") == [
        "file:", "file:/", "file://", "file:///", "file:///home/", "file:///home/u/", "file:///home/u/x.py#"]


OPEN_AND_SEARCH = textwrap.dedent("""
    import sys
    import engine
    with engine.open(sys.argv[1]) as cap:
        whole = [h.uri for h in cap.find("needle", k=5, mode="lex")]
        deep = [h.uri for h in cap.find("needle", k=5, mode="lex", scope=sys.argv[2])]
    assert sorted(whole) == sorted([sys.argv[3], "x:a/b"]), whole
    assert deep == [sys.argv[3]], deep
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the (big) pytest parent
    hwm = next(ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:"))
    print(int(hwm.split()[1]) // 1024)
""")


@pytest.mark.timeout(120)
def test_a_capsule_with_a_huge_uri_opens_and_indexes_in_bounded_memory(path, monkeypatch):
    # Written the way the old code could: past today's limit.
    monkeypatch.setattr(metadata, "MAX_URI_BYTES", 1 << 30)
    with engine.create(path, model=None) as cap:
        cap.put("the needle", uri=DEEP)
        cap.put("another needle", uri="x:a/b")
        cap.commit()
    scope = DEEP[: len(DEEP) // 2 + 1]  # deep, and not ending at a boundary
    out = subprocess.run([sys.executable, "-c", OPEN_AND_SEARCH, path, scope, DEEP], cwd=ROOT,
                         capture_output=True, text=True, timeout=100)
    assert out.returncode == 0, out.stderr[-3000:]
    peak_mib = int(out.stdout)
    # ~70 MiB measured (2.6 GiB before: every prefix of the URI was a term).
    assert peak_mib < 400, peak_mib


@pytest.mark.timeout(120)
def test_the_daemon_answers_bad_request_to_a_uri_past_the_limit(tmp_path):
    d = DaemonProc(tmp_path).start()
    try:
        with Client(d.socket) as c:
            with pytest.raises(RemoteError) as info:
                c.put("x", uri=DEEP)
            assert info.value.code == p.BAD_REQUEST and "limit" in str(info.value)
            with pytest.raises(RemoteError) as info:
                c.put_many([{"text": "ok", "uri": "ok:1"}, {"text": "x", "tags": {"k": "v" * 5000}}])
            assert info.value.code == p.BAD_REQUEST
            assert c.put("still fine", uri="ok:2") >= 0
            assert [e.uri for e in c.timeline()] == ["ok:2"]
    finally:
        d.close()


def test_the_protocol_checks_the_engines_own_limits():
    """The daemon refuses at the protocol what the engine would refuse, with the same
    numbers: one set of limits, whichever door a frame comes through."""
    from engine import metadata
    from memvidd import protocol

    assert protocol.MAX_URI == metadata.MAX_URI_BYTES
    assert protocol.MAX_TITLE == metadata.MAX_TITLE_BYTES
    assert protocol.MAX_NAME == metadata.MAX_KIND_BYTES == metadata.MAX_TAG_KEY_BYTES
    assert protocol.MAX_TAG_VALUE == metadata.MAX_TAG_VALUE_BYTES
    assert protocol.MAX_TAGS == metadata.MAX_TAGS
