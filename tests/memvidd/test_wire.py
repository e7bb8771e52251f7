"""The wire side of the daemon: a thin client, and typed replies that say what the engine says.

A blocking client and the daemon commands of the command line load neither the engine nor
trio (checked in fresh interpreters, against a real daemon); every reply part is a struct
whose fields are the engine's, so converting loses nothing and the map on the wire is the
one it was before it was typed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import typing

import msgspec
import pytest

import engine
from daemon_util import ROOT, DaemonProc
from engine.query import MODES
from memvidd import protocol as p

HEAVY = ("engine", "trio", "numpy", "tantivy", "usearch", "onnxruntime", "fastembed")


def loaded_after(script: str) -> dict[str, list[str]]:
    """Run ``script`` in a fresh interpreter; it calls ``heavy(step)`` after each step, and
    gets back, per step, which of ``HEAVY`` had been imported by then."""
    prelude = textwrap.dedent(f"""
        import json, sys
        HEAVY = {HEAVY!r}
        seen = {{}}
        def heavy(step):
            seen[step] = sorted(m for m in HEAVY if m in sys.modules)
    """)
    code = prelude + textwrap.dedent(script) + "\nprint(json.dumps(seen))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


def test_the_client_and_the_command_line_import_neither_the_engine_nor_trio():
    seen = loaded_after("""
        import memvidd
        heavy("import memvidd")
        import memvidd.client
        heavy("import memvidd.client")
        from memvidd import cli
        heavy("import memvidd.cli")
        try:
            cli.main(["find", "--help"])
        except SystemExit:
            pass
        heavy("memvidd find --help")
        try:
            cli.main(["find", "anything", "--socket", "/nonexistent/memvidd.sock"])
        except SystemExit:  # no daemon there: the error says so
            pass
        heavy("memvidd find (no daemon)")
        memvidd.client.default_socket()
        heavy("default_socket()")
        from memvidd.client import AsyncClient  # still importable from here, on first use
        heavy("from memvidd.client import AsyncClient")
    """)
    assert seen.pop("from memvidd.client import AsyncClient") == ["trio"]
    assert seen == {step: [] for step in seen}, seen


@pytest.mark.timeout(90)
def test_daemon_commands_import_neither_the_engine_nor_trio(tmp_path):
    d = DaemonProc(tmp_path).start()
    try:
        seen = loaded_after(f"""
            from memvidd.cli import main
            sock = ["--socket", {d.socket!r}]
            for argv in (["put", "the user prefers dark mode", "--uri", "pref://theme"],
                         ["find", "dark mode"], ["find", "dark", "--json"], ["get", "--uri", "pref://theme"],
                         ["timeline"], ["status"], ["stats"], ["rules"], ["compact", "--codecs"]):
                assert main([*argv, *sock]) == 0, argv
                heavy(argv[0])
        """)
    finally:
        d.close()
    assert seen == {step: [] for step in seen} and len(seen) == 8, seen


# -- typed replies -----------------------------------------------------------------------


def fields(struct: type[msgspec.Struct]) -> list[str]:
    return list(struct.__struct_fields__)


def over_the_wire(reply: p.Msg) -> typing.Any:
    """``reply`` as a client reads it."""
    return p.reply_decoder.decode(p.encoder.encode(reply))


def test_stats_reply_is_typed_and_carries_every_key_of_the_engine(path):
    with engine.create(path, model=None) as cap:
        cap.put("a note", uri="n://1")
        cap.commit()
        stats = cap.stats()
    assert [k for k in fields(p.CapsuleStats) if k not in ("ready", "ready_in_s", "daemon", "indexer")] == list(stats)
    got = over_the_wire(p.StatsReply(stats=msgspec.convert(stats, p.CapsuleStats))).stats
    assert isinstance(got, p.CapsuleStats) and msgspec.to_builtins(got) == msgspec.to_builtins(stats)
    # It reads like the map it was: stats["key"], get, in; unset parts are missing keys.
    assert got["frames"] == got.frames == 1 and got.get("indexer") is None and "indexer" not in got
    with pytest.raises(KeyError):
        got["daemon"]
    with pytest.raises(KeyError):
        got["no such key"]
    daemon = p.DaemonStats(connections=2, buffers={"bytes": 0, "peak": 9, "limit": 10, "refused": 0})
    got = over_the_wire(p.StatsReply(stats=msgspec.structs.replace(got, daemon=daemon))).stats
    assert got["daemon"]["connections"] == 2 and got.daemon.buffers["peak"] == 9


def test_compact_and_upgrade_reports_are_typed_and_keep_their_keys(path):
    with engine.create(path, model=None) as cap:
        for i in range(40):
            cap.put(f"note {i} " * 20, uri=f"n://{i % 5}")
            cap.commit()
        before = cap.stats()["file_bytes"]
        upgraded = {"bytes_before": before, **cap.upgrade_codecs(), "bytes_after": cap.stats()["file_bytes"]}
        compacted = cap.compact()
    for engine_report in (upgraded, compacted):
        assert set(engine_report) <= set(fields(p.CompactReport)), engine_report
        report = over_the_wire(p.CompactReply(report=msgspec.convert(engine_report, p.CompactReport))).report
        assert isinstance(report, p.CompactReport)
        assert msgspec.to_builtins(report) == engine_report  # the same map on the wire as before
        assert report["bytes_after"] == report.bytes_after == engine_report["bytes_after"]
    assert report.get("busy") is None and report.get("purged") == compacted["purged"]


def test_verify_report_is_the_engines_field_for_field(path):
    with engine.create(path, model=None) as cap:
        cap.put("a note")
        cap.commit()
    found = engine.verify(path)
    assert fields(p.VerifyReport) == fields(engine.Report)
    report = msgspec.convert(found, p.VerifyReport, from_attributes=True)
    got = over_the_wire(p.VerifyReply(ok=found.ok, report=report)).report
    assert msgspec.to_builtins(got) == found.to_dict() and got.ok and got["facts"]["frames"] == 1


def test_a_hit_changes_shape_in_one_place(path):
    # The engine's hit, field for field, then what the daemon adds for a chunk of a watched
    # file (where it is in the file, and the file's freshness) and for a document's chunk
    # (its page, slide, or sheet and rows): all optional.
    assert fields(p.HitOut) == [*fields(engine.Hit), "path", "lines", "mtime", "stale", "page", "slide", "sheet", "rows"]
    with engine.create(path, model=None) as cap:
        cap.put("the user prefers dark mode", uri="pref://theme", tags={"kind": "pref"})
        cap.commit()
        (hit,) = cap.find("dark mode", mode="lex")
    out = p.HitOut.of(hit)
    assert msgspec.json.encode(out) == msgspec.json.encode(hit)  # what find --json prints, either way
    assert out.sources == ["lex"]
    assert over_the_wire(p.FindReply(hits=[out], mode="lex")).hits == [out]
    placed = p.HitOut.of(hit, {"path": "/notes/theme.md", "lines": (3, 9)})
    assert over_the_wire(p.FindReply(hits=[placed], mode="lex")).hits[0].lines == (3, 9)
    # A document's chunk: its page from its tags, and no lines (they would count the lines
    # of the text extracted from the page, not of the file); the rest of its place stays.
    page = p.HitOut.of(msgspec.structs.replace(hit, tags={"page": "3"}),
                       {"path": "/docs/a.pdf", "lines": (1, 4), "mtime": 1.0, "stale": False})
    assert (page.page, page.lines, page.path, page.mtime, page.stale) == (3, None, "/docs/a.pdf", 1.0, False)
    assert over_the_wire(p.FindReply(hits=[page], mode="lex")).hits == [page]
    # A client from before the new fields reads the hit as it always did.
    old = msgspec.defstruct("OldHit", [(f, typing.Any) for f in fields(engine.Hit)])
    assert msgspec.msgpack.decode(p.encoder.encode(placed), type=old).uri == "pref://theme"


def test_modes_and_error_codes_are_closed_sets():
    assert p.MODES == MODES
    assert p.problem(p.Find(query="x", mode="fuzzy")) == "mode 'fuzzy' is not one of auto, lex, vec, hybrid"
    codes = typing.get_args(p.ErrorCode)
    constants = {v for k, v in vars(p).items() if k.isupper() and isinstance(v, str) and v in codes}
    assert constants == set(codes)  # a constant for each code, a code for each constant
    doc = (ROOT / "docs/protocol.md").read_text()
    assert all(f"| `{code}` |" in doc for code in codes), "codes documented"
    # A reply with a code outside the set is unreadable, as a message of another version.
    with pytest.raises(msgspec.ValidationError):
        p.reply_decoder.decode(p.encoder.encode({"op": "error", "code": "made_up"}))
