"""Files that another local user (or a bad day) puts in a watched directory: text that
makes a chunker or an ignore pattern backtrack (it must take time linear in its size, and
what still takes too long is skipped and remembered), and symlinks swapped in between
the checks of a path and its read (the read must never leave the root)."""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import pathspec
import pytest
from daemon_util import DaemonProc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_watcher import DAEMON_CONFIG, all_frames, hits, manifest, mkroot, until, watching, write

import engine
from memvidd import chunker, ingest
from memvidd.chunker import ChunkTimeout, chunk_document
from memvidd.client import Client
from memvidd.ingest import match_chunks
from memvidd.tree import Moved, Tree, spec

pytestmark = pytest.mark.timeout(120)

# Time allowed to chunk a file: 20 ms per KB (the worst linear case measured is ~2.6 ms
# per KB, a file of "#" lines) plus a second, so a loaded machine does not fail it; the
# super-linear cases this guards against took from 5 s to minutes on these inputs.
MS_PER_KB = 20.0


def chunk_seconds(name: str, text: str) -> float:
    t0 = time.perf_counter()
    chunk_document(name, text)
    return time.perf_counter() - t0


def within_budget(name: str, text: str) -> None:
    took, budget = chunk_seconds(name, text), 1.0 + MS_PER_KB * len(text) / 1000 / 1000
    assert took <= budget, f"{name}: {len(text) / 1000:.0f} KB chunked in {took:.2f}s (budget {budget:.2f}s)"


# -- chunking in linear time ---------------------------------------------------------------

ADVERSARIAL = {
    "a heading line of 2000 spaces": ("a.md", "# x" + " " * 2000 + "y"),
    "comment lines after blanks": ("a.py", "#\n\n" * 20000),
    "decorators after blanks": ("a.py", "@x\n\n" * 10000),
    "a long heading over many sub-headings": ("a.md", "# " + "a" * 400_000 + "\n" + "###### b\n" * 50000),
    "500 KB of one-character headings": ("a.md", "#\n" * 250_000),
    "modifiers before no keyword": ("a.ts", ("export " * 5000 + "x\n") * 20),
    "one 1 MB line": ("a.md", "x " * 500_000),
    "fences": ("a.md", "```\n" * 50000),
    "an unclosed front matter": ("a.md", "---\n" + "k: v\n" * 50000),
    "blank lines": ("a.py", "\n" * 500_000),
}


@pytest.mark.parametrize("case", ADVERSARIAL)
def test_adversarial_text_is_chunked_in_linear_time(case):
    within_budget(*ADVERSARIAL[case])


ATOMS = ["#", "# ", "###### ", "####### ", " ", " " * 300, "\t", "x", "\n", "\n\n", "@x", "def f():", "export ",
         "pub ", "    ", "```", "~~~", "---", "k: v", "//", "/*", "}", "\r\n", "\x0c", "\u2028", "\u3000", "é",
         "(", ")"]


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(head=st.sampled_from(["", "#", "# ", "###### ", "@x", "export ", "---", "```"]),
       body=st.lists(st.sampled_from(ATOMS), min_size=1, max_size=40).map("".join),
       name=st.sampled_from(["a.md", "a.py", "a.txt"]), one_line=st.booleans())
def test_random_and_repeated_text_is_chunked_in_linear_time(head, body, name, one_line):
    """A random line (a line start that means something, then random pieces) repeated to
    32 KB, as lines or as one line: repetition is what makes backtracking explode."""
    unit = head + body
    if one_line:
        unit = unit.replace("\n", " ").replace("\r", " ").replace("\u2028", " ").replace("\x0c", " ")
    else:
        unit += "\n"
    within_budget(name, unit * (32_000 // len(unit) + 1))


OLD_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")  # the regex it replaces (cubic)


@settings(max_examples=2000, deadline=None)
@given(st.text(st.sampled_from("# x\t\n\r\x0b\x0c\x1c\x85\xa0\u2028\u3000"), max_size=14))
def test_headings_are_read_as_the_old_regex_read_them(text):
    for line in text.splitlines(keepends=True):
        m = OLD_HEADING.match(line)
        assert chunker._heading(line) == ((len(m.group(1)), m.group(2)) if m else None), repr(line)


def test_a_title_is_capped():
    doc = chunk_document("a.md", "# " + "t" * 5000 + "\n\n## sub\n\nbody\n")
    assert all(len(c.title) <= 2 * chunker.TITLE_MAX + 3 for c in doc.chunks)


def test_a_budget_stops_chunking():
    text = "#\n" * 1_000_000
    t0 = time.perf_counter()
    with pytest.raises(ChunkTimeout):
        chunk_document("a.md", text, budget_s=0.01)
    assert time.perf_counter() - t0 < 2.0  # the whole file takes seconds: it stopped early


# -- ignore patterns in linear time --------------------------------------------------------


@pytest.mark.timeout(60, method="thread")  # a backtracking regex does not see SIGALRM
@pytest.mark.parametrize("pattern, path", [
    ("*a" * 8 + "b", "a" * 60),  # pathspec's regex: 26 s
    ("a" + "/**/x" * 5 + "/y", "a" + "/x" * 200 + "/z"),  # 73 s
    ("**/" + "*x/**/" * 8 + "y", ("x" * 30 + "/") * 100 + "z"),
])
def test_a_hostile_gitignore_pattern_is_matched_in_linear_time(tmp_path, pattern, path):
    root = mkroot(tmp_path)
    (root / ".gitignore").write_text(pattern + "\n")
    tree = Tree(root)
    t0 = time.perf_counter()
    assert tree.accepts(root / path)
    assert time.perf_counter() - t0 < 1.0


@pytest.mark.timeout(60, method="thread")  # a blocked open() does not see SIGALRM
def test_a_broken_or_special_gitignore_neither_stops_nor_hangs_the_scan(tmp_path):
    root = mkroot(tmp_path)
    write(root / ".gitignore", "!\n*.log\n[z\n")  # git leaves out the lines that are no patterns
    write(root / "a.log", "ignored")
    write(root / "a.txt", "kept")
    (root / "fifo-dir").mkdir()
    os.mkfifo(root / "fifo-dir" / ".gitignore")
    write(root / "fifo-dir" / "b.txt", "kept")
    assert sorted(p.name for p, _ in Tree(root).walk()) == [".gitignore", "a.txt", "b.txt"]


def test_a_file_deep_down_is_vetted_in_time_linear_in_its_depth(tmp_path):
    root = mkroot(tmp_path)
    write(root / ".gitignore", "*.log\n")
    fd = os.open(root, os.O_RDONLY)
    for _ in range(600):  # 11 s when each directory on the way was asked apart (1,500: 172 s)
        os.mkdir("d", dir_fd=fd)
        fd, old = os.open("d", os.O_RDONLY, dir_fd=fd), fd
        os.close(old)
    os.close(os.open("f.txt", os.O_CREAT | os.O_WRONLY, dir_fd=fd))
    os.close(fd)
    t0 = time.perf_counter()
    assert Tree(root).accepts(root.joinpath(*["d"] * 600, "f.txt"))
    assert time.perf_counter() - t0 < 2.0


POSITIVE = st.sampled_from(["a", "b", "x", "*", "**", "/", "?", "[ab]", "!", "\\*", "/**/", "**/", "/**",
                            " "])
SEGMENTS = st.sampled_from(["a", "b", "x", "ab", "ba", "xa", "axb", "*", "bb", " "])


def verdict(make: Any, lines: list[str], path: str) -> Any:
    try:
        return make(lines).check_file(path).include
    except Exception as e:  # an invalid pattern: both refuse it
        return type(e).__name__


@settings(max_examples=800, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.lists(POSITIVE, min_size=1, max_size=8).map("".join), min_size=1, max_size=3),
       st.lists(st.lists(SEGMENTS, min_size=1, max_size=6).map("/".join), min_size=1, max_size=4))
def test_ignore_patterns_match_as_pathspec_matches_them(patterns, paths):
    for path in paths:
        assert verdict(spec, patterns, path) == verdict(pathspec.GitIgnoreSpec.from_lines, patterns, path)


def test_a_negated_bracket_never_matches_a_slash_as_in_git():
    # `git check-ignore` says no to both; pathspec says yes.
    assert not spec(["*[!a]*b"]).match_file("b/b")
    assert not spec(["a[!x]b"]).match_file("a/b")
    assert spec(["*[!a]*b"]).match_file("xcb")


def test_a_file_of_equal_chunks_gets_its_keys_in_linear_time():
    t0 = time.perf_counter()
    plan, gone = match_chunks([], [b"\1" * 16] * 8000)  # 4.6 s when each key was searched from .0
    assert time.perf_counter() - t0 < 0.5
    assert [k for k, _ in plan][:3] == ["0101010101010101", "0101010101010101.1", "0101010101010101.2"]
    assert len({k for k, _ in plan}) == 8000 and gone == []


# -- a file that still takes too long ------------------------------------------------------


@pytest.mark.trio
async def test_a_file_too_slow_to_chunk_is_skipped_until_it_changes_even_after_a_restart(tmp_path, caplog,
                                                                                         monkeypatch):
    caplog.set_level(logging.INFO, logger="memvidd")
    root = mkroot(tmp_path)
    slow = write(root / "slow.md", "#\n" * 1_000_000)  # seconds to chunk: over a 0.5 s budget
    ok = write(root / "ok.md", "# fine\n\nwombat\n")
    async with watching(tmp_path, root, chunk_budget_s=0.5) as ix:
        cap = ix.svc.cap
        await until(lambda: manifest(cap, slow) is not None and manifest(cap, ok) is not None, ix=ix)
        m = manifest(cap, slow)
        assert m.chunks == [] and m.skipped == "took over 0.5s to chunk"
        assert ix.stats()["skipped"] == {str(slow): "took over 0.5s to chunk"}
        assert ix.stats()["files_unchunkable"] == 1 and hits(cap, "wombat")
    messages = [r.getMessage() for r in caplog.records]
    assert any("slow.md" in m and "reason=took over 0.5s" in m for m in messages)

    chunked: list[str] = []

    def spy(name: str, text: str, **kw: Any) -> chunker.Document:
        chunked.append(name)
        return chunk_document(name, text, **kw)

    monkeypatch.setattr("memvidd.documents.chunk_document", spy)
    async with watching(tmp_path, root, chunk_budget_s=0.5) as ix:  # a restart: nothing is read again
        cap = ix.svc.cap
        await until(lambda: ix.progress.phase == "watching" and not ix.pending, ix=ix)
        assert chunked == [] and ix.progress.files_unchanged == 2
        assert ix.stats()["skipped"] == {str(slow): "took over 0.5s to chunk"}

        os.utime(slow, ns=(time.time_ns(), time.time_ns() + 10**9))  # touched, same content
        mtime = slow.stat().st_mtime_ns
        await until(lambda: manifest(cap, slow).mtime_ns == mtime, ix=ix)
        assert chunked == [] and manifest(cap, slow).skipped

        slow.write_text("# numbat\n\nnumbat facts\n")  # changed: chunked again
        await until(lambda: hits(cap, "numbat"), ix=ix)
        assert chunked == [str(slow)] and not manifest(cap, slow).skipped
        assert ix.stats()["skipped"] == {} and ix.progress.errors == 0


@pytest.mark.trio
async def test_a_file_the_chunker_fails_on_is_skipped_with_the_reason(tmp_path, monkeypatch):
    root = mkroot(tmp_path)
    bad = write(root / "bad.py", "def f():\n    pass\n")
    write(root / "ok.py", "def wombat():\n    pass\n")

    def failing(name: str, text: str, **kw: Any) -> chunker.Document:
        if name.endswith("bad.py"):
            raise RuntimeError("a chunker bug")
        return chunk_document(name, text, **kw)

    monkeypatch.setattr("memvidd.documents.chunk_document", failing)  # no real text fails today
    async with watching(tmp_path, root) as ix:
        cap = ix.svc.cap
        await until(lambda: manifest(cap, bad) is not None and hits(cap, "wombat"), ix=ix)
        assert manifest(cap, bad).skipped == "cannot chunk: RuntimeError: a chunker bug"
        assert ix.stats()["skipped"] == {str(bad): "cannot chunk: RuntimeError: a chunker bug"}
    async with watching(tmp_path, root) as ix:  # not tried again after a restart
        await until(lambda: ix.progress.phase == "watching" and not ix.pending, ix=ix)
        assert ix.progress.files_unchanged == 2
        assert ix.stats()["skipped"] == {str(bad): manifest(ix.svc.cap, bad).skipped}


@pytest.mark.timeout(180)
def test_a_daemon_watching_hostile_files_keeps_answering(tmp_path):
    tree = mkroot(tmp_path, "tree")
    write(tree / "heading.md", "# x" + " " * 3000 + "y\n")  # the report's file: minutes of one regex match
    write(tree / "decorators.py", "@x\n\n" * 20000)
    write(tree / "big.md", "#\n" * 250_000)  # a second of chunking, 2,000 equal chunks: calls come meanwhile
    write(tree / "ok.md", "# fine\n\nwombat\n")
    run = tmp_path / "run"
    run.mkdir()
    d = DaemonProc(run)
    d.config.write_text(DAEMON_CONFIG.format(dir=run, tree=tree))
    try:
        d.start()
        seen, worst = [], 0.0
        deadline = time.monotonic() + 120
        with Client(d.socket, timeout=10) as c:  # a call not answered in 10 s fails the test
            while True:
                t0 = time.monotonic()
                s = c.stats()["indexer"]
                worst = max(worst, time.monotonic() - t0)
                seen.append(s)
                if s["documents"] == 4 and s["queued"] == 0 and s["phase"] == "watching":
                    break
                assert time.monotonic() < deadline, s
                time.sleep(0.02)
            assert c.find("wombat", mode="lex")
        assert any(s["queued"] or s["phase"] != "watching" for s in seen[:-1]), "no call during the indexing"
        assert s["errors"] == 0
        print(f"{len(seen)} calls during the indexing, the slowest took {worst:.3f}s")
        assert d.stop() == 0
    finally:
        d.close()


# -- reading only the file that was vetted -------------------------------------------------

SECRET = "SECRET-TOKEN-for-the-thief"


def secret_file(tmp_path: Path) -> Path:
    outside = mkroot(tmp_path, "home")
    secret = write(outside / "inner.txt", SECRET + "\n")  # ~/.git-credentials
    secret.chmod(0o600)
    return secret


def stored_anywhere(cap: engine.Capsule, text: str) -> list[str]:
    """Every committed version (superseded ones too) whose payload holds ``text``."""
    return [f.uri or "" for f in all_frames(cap) if text.encode() in f.payload]


@pytest.mark.trio
@pytest.mark.parametrize("swapped", ["file", "directory"])
@pytest.mark.parametrize("race", ["before the stat", "between the stat and the open"])
async def test_a_symlink_swapped_in_after_the_checks_is_not_followed(tmp_path, monkeypatch, swapped, race):
    """The race is made certain: the swap happens in the indexer's own thread, right after
    the path is checked (``Tree.inside``: before its stat), or right after its stat is
    vetted (``Tree.check_file``: before the open), and then the original is put back as
    soon as the file is open, so that a stat after the read sees nothing amiss."""
    secret = secret_file(tmp_path)
    root = mkroot(tmp_path)
    target = write(root / "sub" / "inner.txt", "a harmless note\n")
    link_at, link_to = (target, secret) if swapped == "file" else (root / "sub", secret.parent)
    aside = tmp_path / "aside"
    armed: list[bool] = []
    swapped_in: list[bool] = []
    check = "inside" if race == "before the stat" else "check_file"
    real_check = getattr(Tree, check)

    def check_then_swap(self: Tree, path: Path, *args: Any) -> Any:
        ok = real_check(self, path, *args)
        if armed and Path(path) == target:
            armed.clear()
            os.rename(link_at, aside)
            os.symlink(link_to, link_at)
            swapped_in.append(True)
        return ok

    real_being_written = ingest.being_written

    def swap_back_once_open(fd: int) -> bool:
        if swapped_in and check == "check_file":
            swapped_in.clear()
            os.unlink(link_at)
            os.rename(aside, link_at)
        return real_being_written(fd)

    monkeypatch.setattr(Tree, check, check_then_swap)
    monkeypatch.setattr(ingest, "being_written", swap_back_once_open)
    async with watching(tmp_path, root) as ix:
        cap = ix.svc.cap
        await until(lambda: manifest(cap, target) is not None and not ix.pending, ix=ix)
        armed.append(True)
        # The event that has it read again; the thief makes it as long as the secret, so
        # that the size of what was read matches the stat.
        target.write_text("a harmless note, edited".ljust(len(SECRET)) + "\n")
        await until(lambda: not armed and not ix.pending and (manifest(cap, target) is None or
                                                              stored_anywhere(cap, SECRET)), ix=ix)
        assert stored_anywhere(cap, SECRET) == []
        assert manifest(cap, target) is None, "the path leads out of the root now: no document"


@pytest.mark.trio
async def test_symlinks_inside_the_root_are_still_followed(tmp_path):
    secret = secret_file(tmp_path)
    root = mkroot(tmp_path)
    write(root / "real" / "a.txt", "kiwi in a real file\n")
    os.symlink("real/a.txt", root / "rel.txt")
    os.symlink(root / "real" / "a.txt", root / "abs.txt")
    os.symlink("real", root / "dirlink")
    (root / "sub").mkdir()
    os.symlink("../dirlink/a.txt", root / "sub" / "up.txt")  # a link through a link, then ".."
    os.symlink("../../home/inner.txt", root / "sub" / "escape.txt")  # out of the root
    async with watching(tmp_path, root) as ix:
        cap = ix.svc.cap
        want = [root / "real" / "a.txt", root / "rel.txt", root / "abs.txt", root / "dirlink" / "a.txt",
                root / "sub" / "up.txt"]
        await until(lambda: all(manifest(cap, p) is not None for p in want) and not ix.pending, ix=ix)
        assert manifest(cap, root / "sub" / "escape.txt") is None and stored_anywhere(cap, SECRET) == []
        assert secret.exists()


def test_open_refuses_what_is_not_the_vetted_file(tmp_path):
    secret = secret_file(tmp_path)
    root = mkroot(tmp_path)
    tree = Tree(root)
    note = write(root / "note.txt", "note\n")
    vetted = note.stat()
    with tree.open(note, vetted) as f:
        assert f.read() == b"note\n"

    write(root / "new.txt", "new\n").replace(note)  # an editor's save by rename
    with pytest.raises(Moved):
        tree.open(note, vetted)

    note.unlink()
    os.mkfifo(note)  # a FIFO would block a plain open() until a writer comes
    with pytest.raises(Moved):
        tree.open(note, vetted)

    note.unlink()
    os.symlink(secret, note)
    with pytest.raises(Moved):
        tree.open(note, secret.stat())  # even when the stat was taken through the link

    os.symlink("../home", root / "up")
    with pytest.raises(Moved):
        tree.open(root / "up" / "inner.txt", secret.stat())

    loop = root / "loop"
    os.symlink("loop", loop)
    with pytest.raises(Moved):
        tree.open(loop, vetted)
    with pytest.raises(FileNotFoundError):
        tree.open(root / "gone.txt", vetted)


def test_open_follows_links_that_stay_inside(tmp_path):
    root = mkroot(tmp_path)
    tree = Tree(root)
    real = write(root / "d" / "e" / "f.txt", "deep\n")
    os.symlink("d/e", root / "de")
    os.symlink("../e/../../de/f.txt", root / "d" / "e" / "back.txt")
    os.symlink(str(root / "de"), root / "abs")
    for path in [root / "de" / "f.txt", root / "d" / "e" / "back.txt", root / "abs" / "f.txt"]:
        with tree.open(path, real.stat()) as f:
            assert f.read() == b"deep\n", path



def test_front_matter_past_the_capsules_tag_limits_is_clipped_not_refused(tmp_path):
    """Tags come from front matter: a huge value or key must not make the file unindexable
    (the capsule refuses tags past its limits)."""
    import engine
    from engine import metadata as capsule_limits
    from memvidd import chunker

    text = "---\ntitle: " + "\u00e9" * 50_000 + "\n" + "k" * 5000 + ": v\nok: yes\n---\n# Heading\n\nbody text\n"
    doc = chunker.chunk_document("notes.md", text)
    assert doc.tags["ok"] == "yes" and "k" * 5000 not in doc.tags
    assert len(doc.tags["title"]) == chunker.TAG_VALUE_MAX
    with engine.create(tmp_path / "t.mv2", model=None) as cap:
        cap.put(doc.chunks[0].text, uri="file:///notes.md#0", tags=doc.tags)  # within every limit
        cap.commit()
    assert all(len(v.encode()) <= capsule_limits.MAX_TAG_VALUE_BYTES for v in doc.tags.values())
