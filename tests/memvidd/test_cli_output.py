"""Output for people, JSON for programs, and honest state (issue 13), against real daemons:

- ``find`` shows ``path:first-last``, the title, a highlighted snippet and a relevance of
  0-100, and stops where hits fall far below the best; file hits carry ``path`` and
  ``lines`` on the wire, right even after lines were inserted above a chunk that kept its
  frame; ``--json`` keeps the daemon's list;
- ``stats`` is a short summary with one ``ready`` flag (``--json``: every figure); counters
  agree (``files_indexed <= files_to_index``) and no ETA is 0 while work remains;
- a find says how much of the text its semantic part covered;
- ``status`` prints a snapshot (or, on a terminal, live progress bars);
- ``--version``, a help text for every option, no per-save INFO lines.
"""

from __future__ import annotations

import argparse
import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon_util import ROOT, DaemonProc
from memvidd import cli
from memvidd.client import Client

pytestmark = pytest.mark.timeout(120)

CONFIG = """
[daemon]
socket = "{dir}/q.sock"
events-socket = "{dir}/e.sock"
log-level = "{log_level}"
shutdown-grace-s = 20

[embedding]
model = "{model}"
threads = 1

[watcher]
chunk-size = 200
chunk-overlap = 0

[[capsule]]
name = "default"
path = "{dir}/default.mv2"
watch = [{watch}]
"""


def daemon(tmp: Path, *, watch: Path | None = None, log_level: str = "info", model: str = "none") -> DaemonProc:
    run = tmp / "run"
    run.mkdir(exist_ok=True)
    d = DaemonProc(run)
    d.config.write_text(CONFIG.format(dir=run, log_level=log_level, model=model,
                                      watch=json.dumps(str(watch)) if watch else ""))
    return d.start()


def memvidd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "memvidd", *args], capture_output=True, text=True, timeout=60,
                          cwd=ROOT, env={**os.environ, **(env or {})})


def until(cond: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
    return value


def stats(d: DaemonProc) -> dict[str, Any]:
    with Client(d.socket) as c:
        return json.loads(json.dumps(c.stats(), default=lambda o: {k: getattr(o, k) for k in o.__struct_fields__}))


def find_json(d: DaemonProc, *args: str) -> dict[str, Any]:
    out = memvidd("find", "--socket", d.socket, "--json", *args)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


SECTION = "The {animal} section talks about the {animal} at some length, so that it is a chunk of its own.\n"
ANIMALS = ["aardvark", "badger", "capybara", "dingo", "echidna", "zebra"]


def notes_text(top: str = "") -> str:
    return top + "# Animals\n\n" + "".join(f"## {a.title()}\n\n{SECTION.format(animal=a)}\n" for a in ANIMALS)


def lines_of(path: Path, word: str) -> set[int]:
    return {i for i, line in enumerate(path.read_text().splitlines(), 1) if word in line}


@pytest.fixture
def watched(tmp_path: Path) -> Iterator[tuple[DaemonProc, Path]]:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "notes.md").write_text(notes_text())
    d = daemon(tmp_path, watch=tree)
    try:
        with Client(d.socket) as c:  # ("ready" is new: this fixture also serves the code from before it)
            until(lambda: c.find("zebra", mode="lex") and stats(d).get("ready", True), "the tree indexed")
        yield d, tree
    finally:
        d.close()


# -- find: places, titles, relevance, the cut -----------------------------------------------------


def test_file_hits_carry_path_and_lines_that_follow_inserted_lines(watched):
    d, tree = watched
    notes = tree / "notes.md"
    hit = find_json(d, "zebra", "--mode", "lex")["hits"][0]
    first, last = hit["lines"]
    assert hit["path"] == str(notes) and hit["uri"].startswith("file://")
    assert lines_of(notes, "zebra") <= set(range(first, last + 1)), (hit["lines"], notes.read_text())
    assert hit["title"] == "Animals / Zebra"
    seq = find_json(d, "zebra")["seq"]

    # Three lines above it: the zebra chunk keeps its frame (its text is unchanged), and its
    # lines move with it: they live in the file's manifest, which every change rewrites.
    notes.write_text(notes_text(top="Written before the animals.\nA second line.\n\n"))
    moved = until(lambda: (h := find_json(d, "zebra", "--mode", "lex")["hits"][0])["lines"] != [first, last] and h,
                  "the insertion indexed")
    assert moved["frame_id"] == hit["frame_id"], "an unchanged chunk was written again"
    assert moved["lines"] == [first + 3, last + 3]
    assert lines_of(notes, "zebra") <= set(range(first + 3, last + 4))
    # As of before the insertion, the same frame has the lines it had then.
    then = find_json(d, "zebra", "--mode", "lex", "--as-of", str(seq))["hits"][0]
    assert then["frame_id"] == hit["frame_id"] and then["lines"] == [first, last]
    # Read directly from the file (no daemon), the same conversion gives the same place.
    direct = memvidd("find", "zebra", "--capsule", str(d.dir / "default.mv2"), "--json")
    assert direct.returncode == 0, direct.stderr
    assert json.loads(direct.stdout)["hits"][0]["lines"] == [first + 3, last + 3]


def test_find_for_people_place_title_relevance_snippet(watched):
    d, tree = watched
    out = memvidd("find", "zebra", "--socket", d.socket)
    assert out.returncode == 0, out.stderr
    head, snippet = out.stdout.splitlines()[:2]
    hit = find_json(d, "zebra")["hits"][0]
    first, last = hit["lines"]
    assert re.fullmatch(rf"100  {re.escape(str(tree / 'notes.md'))}:{first}-{last}  Animals / Zebra  #\d+", head), head
    assert "[zebra]" in snippet and "\n" not in snippet and "\x1b" not in out.stdout  # not a terminal: no escapes
    # Run from the tree's directory, the path is relative to it.
    rel = subprocess.run([sys.executable, "-m", "memvidd", "find", "zebra", "--socket", d.socket], capture_output=True,
                         text=True, timeout=60, cwd=tree, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert rel.stdout.startswith(f"100  notes.md:{first}-{last}  "), rel.stdout + rel.stderr


def test_find_stops_far_below_the_best_and_json_keeps_every_hit(tmp_path):
    d = daemon(tmp_path)
    try:
        with Client(d.socket) as c:
            c.put("the zebra and the giraffe, zebra next to giraffe", uri="note://both")
            for i in range(4):
                c.put(f"note {i}: a long note that mentions a giraffe once among many other words " * 3,
                      uri=f"note://{i}")
        out = memvidd("find", "zebra giraffe", "--socket", d.socket)
        lines = out.stdout.splitlines()
        assert lines[0].startswith("100  note://both  "), out.stdout
        assert lines[-1] == "(4 more below 50% of the best hit's relevance: --all shows them)", out.stdout
        assert len(lines) == 3, out.stdout  # the hit, its snippet, the cut
        every = memvidd("find", "zebra giraffe", "--socket", d.socket, "--all").stdout.splitlines()
        scores = [int(line.split()[0]) for line in every[::2]]
        assert len(scores) == 5 and scores[0] == 100 and all(0 <= s < 50 for s in scores[1:]), every
        raw = find_json(d, "zebra giraffe")
        raw_scores = [h["score"] for h in raw["hits"]]
        assert len(raw_scores) == 5 and raw_scores[1] / raw_scores[0] < 0.5, raw_scores  # the engine's own scores
        assert memvidd("find", "zebra giraffe", "--socket", d.socket, "-k", "1").stdout.count("note://") == 1
    finally:
        d.close()


def test_find_on_a_terminal_sets_matches_in_bold_colour(watched):
    d, _ = watched
    out = in_a_terminal(["find", "zebra", "--socket", d.socket])
    assert "\x1b[1;31mzebra\x1b[0m" in out and "[zebra]" not in out
    plain = in_a_terminal(["find", "zebra", "--socket", d.socket], env={"NO_COLOR": "1"})
    assert "\x1b" not in plain and "[zebra]" in plain


# -- honest state ---------------------------------------------------------------------------------


def small_tree(tmp_path: Path, n: int) -> Path:
    tree = tmp_path / "tree"
    for i in range(n):
        (tree / f"d{i % 6}").mkdir(parents=True, exist_ok=True)
        (tree / f"d{i % 6}" / f"f{i:03d}.txt").write_text(f"file {i} holds the word uniq{i}x\n" * 20)
    return tree


def test_ready_means_every_file_is_searchable(tmp_path):
    n = 120
    d = daemon(tmp_path, watch=small_tree(tmp_path, n))
    try:
        until(lambda: stats(d)["ready"], "ready")
        with Client(d.socket) as c:
            assert all(c.find(f"uniq{i}x", mode="lex") for i in range(n))
        s = stats(d)
        ix = s["indexer"]
        assert (ix["files_to_index"], ix["files_indexed"], ix["queued"], ix["in_flight"]) == (n, n, 0, 0), ix
        assert s["ready"] is True and s["ready_in_s"] == 0 and ix["eta_s"] == 0
    finally:
        d.close()


def test_counters_agree_and_no_eta_is_0_while_files_are_left(tmp_path):
    n = 120
    tree = small_tree(tmp_path, n)
    d = daemon(tmp_path, watch=tree)

    def check(s: dict[str, Any]) -> dict[str, Any]:
        ix = s["indexer"]
        assert ix["files_indexed"] <= ix["files_to_index"], ix
        left = ix["files_to_index"] - ix["files_indexed"]
        assert (ix["eta_s"] == 0) == (left == 0), ix
        assert s.get("ready_in_s") != 0 or s.get("ready"), s
        return ix

    try:
        with Client(d.socket) as c:
            while not all(c.find(f"uniq{i}x", mode="lex") for i in (0, n - 1)) or check(stats(d))["queued"]:
                check(stats(d))
            # Edits after the scan count as files to index too: done never passes queued.
            for i in range(10):
                (tree / "d0" / f"f{i * 6:03d}.txt").write_text(f"edited {i}: now it says newword{i}q\n")
            while not all(c.find(f"newword{i}q", mode="lex") for i in range(10)):
                check(stats(d))
            ix = until(lambda: (ix := check(stats(d)))["files_indexed"] >= n + 10 and not ix["queued"] and ix,
                       "the edits counted")
        assert ix["files_to_index"] == ix["files_indexed"], ix
    finally:
        d.close()


@pytest.mark.timeout(240)
def test_while_embedding_nothing_says_done_and_find_says_its_coverage(tmp_path):
    """With the real model: 1500 notes take a while to embed (one thread). Meanwhile the
    stats are not ready, no ETA is 0, and a hybrid find says which share it covered."""
    d = daemon(tmp_path, model="all-MiniLM-L6-v2")
    try:
        with Client(d.socket) as c:
            c.put_many([{"text": f"note {i} about the heron and the kingfisher by the river"} for i in range(1500)])
            s = c.stats()
            vec = s.vectors
            assert vec is not None and vec["frames_with_vectors"] < vec["text_frames"] == 1500
            assert s.ready is False and s.ready_in_s != 0, (s.ready, s.ready_in_s)
            assert vec["embedding"]["eta_s"] != 0, vec["embedding"]
            found = find_json(d, "heron", "--mode", "hybrid")
            assert 0 <= found["coverage"] < 1, found["coverage"]
            assert any("semantic search covered" in w for w in found["warnings"]), found["warnings"]
            assert "coverage" not in find_json(d, "heron", "--mode", "lex") or \
                find_json(d, "heron", "--mode", "lex")["coverage"] is None
        out = memvidd("find", "heron", "--socket", d.socket)  # auto: hybrid, with the model loaded
        assert out.returncode == 0, out.stderr
        notes = [line for line in out.stderr.splitlines() if "semantic search covered" in line]
        assert len(notes) == 1 and re.search(r"covered \d+% of the text", notes[0]), out.stderr
        snap = memvidd("status", "--socket", d.socket, "--once").stdout
        assert re.search(r"embedding\s+[\d,]+/1,500 frames", snap) and "ready       no" in snap, snap
        summary = memvidd("stats", "--socket", d.socket).stdout
        assert re.search(r"embedding\s+[\d,]+/1,500 frames", summary) and "ready       no" in summary, summary
    finally:
        d.close()


def test_stats_is_a_short_summary_and_json_has_everything(watched):
    d, tree = watched
    out = memvidd("stats", "--socket", d.socket)
    lines = out.stdout.splitlines()
    assert out.returncode == 0 and len(lines) <= 14, out.stdout
    keys = [line.split()[0] for line in lines]
    assert keys[0] == "capsule" and {"frames", "size", "watching", "indexing", "ready"} <= set(keys), out.stdout
    assert lines[-1] == "ready       yes" and "lexical search only" in out.stdout
    assert f"{tree}: 1 files" in out.stdout
    full = json.loads(memvidd("stats", "--socket", d.socket, "--json").stdout)
    assert full["ready"] is True and full["ready_in_s"] == 0 and "block_cache" in full and "indexer" in full
    # Directly on the file too (no daemon needed to read it).
    direct = memvidd("stats", "--capsule", str(d.dir / "default.mv2"))
    assert direct.returncode == 0 and direct.stdout.splitlines()[-1] == "ready       yes", direct.stdout


def test_status_once_and_json(watched):
    d, tree = watched
    snap = memvidd("status", "--socket", d.socket)  # not a terminal: one snapshot
    assert snap.returncode == 0, snap.stderr
    assert re.search(r"scanning\s+done: 1 files", snap.stdout) and re.search(r"indexing\s+done: 1 files", snap.stdout)
    assert "ready       yes" in snap.stdout and str(d.dir / "default.mv2") in snap.stdout
    assert memvidd("status", "--socket", d.socket, "--once").stdout == snap.stdout
    js = json.loads(memvidd("status", "--socket", d.socket, "--json").stdout)
    cap = js["capsules"][0]
    assert cap["ready"] is True and [s["name"] for s in cap["stages"]] == ["scanning", "indexing"]


def test_status_on_a_terminal_draws_bars_and_ends_when_ready(watched):
    pytest.importorskip("rich")
    d, _ = watched
    out = in_a_terminal(["status", "--socket", d.socket])
    assert "━" in out and "indexing" in out and "default ready: yes" in out, out


# -- the command line itself ----------------------------------------------------------------------


def test_version():
    out = memvidd("--version")
    assert out.returncode == 0 and re.fullmatch(r"memvidd \d+\.\d+\.\d+ \(protocol \d+\)\n", out.stdout), out


def test_every_option_of_every_command_has_a_help_text():
    def walk(parser: argparse.ArgumentParser, path: str) -> Iterator[tuple[str, argparse.Action]]:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(sub, f"{path} {name}")
            elif not isinstance(action, argparse._HelpAction):
                yield path, action

    undescribed = [f"{path} {'/'.join(a.option_strings) or a.dest}" for path, a in walk(cli.build_parser(), "memvidd")
                   if not a.help or a.help == argparse.SUPPRESS]
    assert not undescribed, undescribed
    text = memvidd("find", "--help").stdout
    for option in ("-k N", "--tag KEY=VALUE", "--kind KIND", "--since WHEN", "--until WHEN", "--mode", "--as-of WHEN",
                   "--scope PREFIX", "--all"):
        line = next((ln for ln in text.splitlines() if ln.strip().startswith(option)), None)
        assert line is not None and len(line.strip()) > len(option) + 5, (option, text)


def test_saves_are_logged_at_debug_level_only(tmp_path):
    def save_and_search(d: DaemonProc, tree: Path, word: str) -> str:
        (tree / "a.txt").write_text(f"the word is {word}\n")
        with Client(d.socket) as c:
            until(lambda: c.find(word, mode="lex"), "the save indexed")
        return d.log.read_text()

    tree = tmp_path / "tree"
    tree.mkdir()
    d = daemon(tmp_path, watch=tree, log_level="info")
    try:
        log = save_and_search(d, tree, "quokka")
    finally:
        d.close()
    assert "watchfiles" not in log and "indexed path=" not in log, log  # watchfiles' "1 change detected"
    (tmp_path / "again").mkdir()
    d = daemon(tmp_path / "again", watch=tree, log_level="debug")
    try:
        log = save_and_search(d, tree, "wombat")
    finally:
        d.close()
    assert re.search(r"DEBUG watchfiles\.main \d+ changes? detected", log), log
    assert f"indexed path={tree / 'a.txt'}" in log


# -- helpers --------------------------------------------------------------------------------------


def in_a_terminal(args: list[str], env: dict[str, str] | None = None, timeout: float = 60) -> str:
    """``memvidd ARGS`` with a pseudo-terminal as its stdout: what a person sees."""
    master, slave = pty.openpty()
    full = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    full.update({"TERM": "xterm-256color", "COLUMNS": "120", **(env or {})})
    proc = subprocess.Popen([sys.executable, "-m", "memvidd", *args], stdout=slave, stderr=slave,
                            stdin=subprocess.DEVNULL, cwd=ROOT, env=full)
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the other side is closed
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        assert proc.wait(timeout=10) == 0, b"".join(chunks).decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return b"".join(chunks).decode(errors="replace")
