"""Pure units of the directory indexer: how files are cut into chunks (memvidd/chunker.py),
how new chunks take over the frames of old ones (memvidd/ingest.match_chunks) and which
files under a root are documents (memvidd/tree.py). No watcher, no capsule."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from memvidd.chunker import chunk_document, file_kind
from memvidd.ingest import digest, match_chunks
from memvidd.tree import Tree, is_binary

pytestmark = pytest.mark.timeout(120)


# -- chunker -----------------------------------------------------------------------------


def defs(n: int, *, lines: int = 8, edit: dict[int, str] | None = None) -> str:
    """``n`` top-level python functions of ``lines`` body lines; ``edit`` replaces a body."""
    out = ["import os\nimport sys\n\n\n"]
    for i in range(n):
        body = (edit or {}).get(i) or "".join(f"    x{j} = compute_{i}_{j}(alpha, beta)\n" for j in range(lines))
        out.append(f"def func_{i}(alpha, beta):\n{body}    return x0\n\n\n")
    return "".join(out)


def test_file_kind_by_extension():
    assert file_kind("a/README.md") == "markdown" and file_kind("x.RST") == "markdown"
    assert file_kind("main.py") == "code" and file_kind("lib.rs") == "code" and file_kind("c.json") == "code"
    assert file_kind("notes.txt") == "text" and file_kind("Makefile") == "text" and file_kind(".bashrc") == "text"


def test_markdown_is_cut_by_headings_with_front_matter_as_tags():
    text = (
        "---\n"
        "title: Design notes\n"
        "tags: 'storage'\n"
        "author: \"ada\"\n"
        "---\n"
        "Intro paragraph before any heading.\n\n"
        "# Storage\n\nThe log is append only.\n\n"
        "## Checkpoints\n\nWritten every 8 MB.\n\n"
        "```sh\n# not a heading, a shell comment\necho hi\n```\n\n"
        "## Recovery\n\nReplay the tail.\n\n"
        "# Search\n\nBM25 and vectors.\n"
    )
    doc = chunk_document("docs/design.md", text, size=1500, overlap=150)
    assert doc.kind == "markdown"
    assert doc.tags == {"title": "Design notes", "tags": "storage", "author": "ada"}
    # Tiny neighbouring sections are merged into one chunk (up to size // 2): use a small
    # size to see the sections themselves.
    doc = chunk_document("docs/design.md", text, size=100, overlap=10)
    titles = [c.title for c in doc.chunks]
    assert titles[0] == "Storage"  # the intro has no heading: it takes the document title
    assert "Storage / Checkpoints" in titles and "Storage / Recovery" in titles and "Search" in titles
    assert not any("not a heading" in t for t in titles), "a # line inside a code fence is no heading"
    fenced = next(c for c in doc.chunks if "echo hi" in c.text)
    assert fenced.title == "Storage / Checkpoints"
    assert all("title: Design notes" not in c.text for c in doc.chunks), "front matter is not body text"
    assert doc.title == "Storage"
    assert "".join(c.text for c in doc.chunks) == text.split("---\n", 2)[2]


def test_markdown_without_closing_fence_has_no_front_matter():
    doc = chunk_document("a.md", "---\nkey: value\n\n# Heading\n\nbody\n")
    assert doc.tags == {}
    assert "key: value" in doc.chunks[0].text


BODY = "".join(f"    v{j} = step_{j}(data)\n" for j in range(14))  # 331 characters with its def line


def test_code_is_cut_by_top_level_definitions():
    text = (
        "import os\n\n\n"
        "def a(data):\n" + BODY + "\n\n"
        "class C:\n    def method(self, data):\n" + BODY + "\n"
        "    def other(self):\n        pass\n\n\n"
        "fn rust_style() {\n" + BODY + "}\n"
    )
    doc = chunk_document("pkg/mod.py", text, size=500, overlap=50)
    assert doc.kind == "code" and doc.title == "mod.py"
    firsts = [c.text.splitlines()[0] for c in doc.chunks]
    assert firsts == ["import os", "def a(data):", "class C:", "fn rust_style() {"]
    assert "def other(self)" in doc.chunks[2].text, "an indented def is not top level"
    assert [c.title for c in doc.chunks] == ["mod.py: import os", "mod.py: def a(data):", "mod.py: class C:",
                                            "mod.py: fn rust_style() {"]
    assert (doc.chunks[1].start_line, doc.chunks[1].end_line) == (4, 20)  # 1-based, inclusive
    assert "".join(c.text for c in doc.chunks) == text


def test_comments_and_decorators_stay_with_their_definition():
    text = "def a(data):\n" + BODY + "\n\n# explains b\n@decorator\ndef b(data):\n" + BODY
    doc = chunk_document("m.py", text, size=500, overlap=50)
    assert [c.text.splitlines()[0] for c in doc.chunks] == ["def a(data):", "# explains b"]
    assert "def b(data):" in doc.chunks[1].text


def test_small_blocks_are_merged_up_to_half_the_size():
    text = defs(30)
    doc = chunk_document("m.py", text, size=1500, overlap=150)
    assert all(len(c.text) <= 750 for c in doc.chunks)
    assert len(doc.chunks) < 30, "tiny definitions share a chunk"
    assert "".join(c.text for c in doc.chunks) == text


def test_plain_text_is_cut_by_paragraphs():
    paras = [f"Paragraph {i} says something about topic {i}.\nIt has a second line." for i in range(5)]
    text = "\n\n".join(paras) + "\n"
    doc = chunk_document("notes.txt", text, size=200, overlap=10)  # 63-char paragraphs: no merge
    assert doc.kind == "text" and doc.title == "Paragraph 0 says something about topic 0."
    assert [c.text.rstrip("\n") for c in doc.chunks] == paras
    assert all(c.title == doc.title for c in doc.chunks)


def test_long_block_is_cut_in_line_windows_with_overlap():
    lines = [f"line {i:03d} " + "w" * 40 + "\n" for i in range(100)]  # 50 chars each
    text = "".join(lines)  # one 5000-character paragraph
    size, overlap = 500, 120
    doc = chunk_document("big.txt", text, size=size, overlap=overlap)
    assert len(doc.chunks) > 10
    assert all(len(c.text) <= size for c in doc.chunks)
    for a, b in zip(doc.chunks, doc.chunks[1:]):
        assert b.start_line <= a.end_line, "consecutive windows overlap"
        shared = "".join(lines[b.start_line - 1 : a.end_line])
        assert 0 < len(shared) <= overlap
        assert a.text.endswith(shared) and b.text.startswith(shared)
    covered = set()
    for c in doc.chunks:
        covered.update(range(c.start_line, c.end_line + 1))
        assert c.text == "".join(lines[c.start_line - 1 : c.end_line])
    assert covered == set(range(1, 101))


def test_one_enormous_line_is_cut_by_characters():
    text = "".join(f"{i:05d}" for i in range(1000))  # 5000 characters, no newline
    size, overlap = 700, 100
    doc = chunk_document("blob.txt", text, size=size, overlap=overlap)
    assert all(len(c.text) <= size for c in doc.chunks)
    assert all(c.text == text[k * (size - overlap): k * (size - overlap) + size] for k, c in enumerate(doc.chunks))
    assert doc.chunks[-1].text.endswith(text[-50:])


def test_overlap_not_smaller_than_size_still_chunks():
    doc = chunk_document("blob.txt", "y" * 1000, size=200, overlap=200)
    assert doc.chunks and all(len(c.text) <= 200 for c in doc.chunks)


def test_whitespace_only_and_empty_files_have_no_chunks():
    assert chunk_document("e.txt", "").chunks == []
    assert chunk_document("e.py", "\n\n   \n").chunks == []
    assert chunk_document("e.md", "---\na: b\n---\n\n").chunks == []


def test_editing_one_definition_changes_one_chunk():
    size = 1500
    before = chunk_document("m.py", defs(30), size=size).chunks
    # the same length: the merge pattern of small definitions is unchanged
    edited = "".join(f"    x{j} = compute_7_{j}(alpha, gamma)\n" for j in range(8))
    after = chunk_document("m.py", defs(30, edit={7: edited}), size=size).chunks
    assert len(after) == len(before)
    changed = [i for i, (a, b) in enumerate(zip(before, after)) if a.text != b.text]
    assert len(changed) == 1 and "gamma" in after[changed[0]].text
    # definitions too big to be merged: growing one of them changes only its own chunk
    big_before = chunk_document("m.py", defs(20, lines=25), size=size).chunks
    grown = "".join(f"    x{j} = compute_3_{j}(alpha, beta)\n" for j in range(30))
    big_after = chunk_document("m.py", defs(20, lines=25, edit={3: grown}), size=size).chunks
    old = {c.text for c in big_before}
    assert len(big_after) == len(big_before)
    assert sum(c.text not in old for c in big_after) == 1


def new_chunks(before: list, after: list) -> list:
    old = {c.text for c in before}
    return [c for c in after if c.text not in old]


def test_shrinking_one_small_definition_keeps_the_other_chunks():
    before = chunk_document("m.py", defs(30), size=1500).chunks
    short = "    x0 = 1\n"
    after = chunk_document("m.py", defs(30, edit={2: short}), size=1500).chunks
    new = new_chunks(before, after)
    assert len(new) <= 2, f"{len(new)} of {len(after)} chunks changed for an edit of one definition"


def test_a_definition_inserted_at_the_top_changes_at_most_two_chunks():
    text = defs(30)
    before = chunk_document("m.py", text, size=1500).chunks
    head = "import os\nimport sys\n\n\n"
    inserted = "def inserted(alpha, beta):\n" + "".join(f"    y{j} = other_{j}(alpha)\n" for j in range(5)) + "\n\n"
    after = chunk_document("m.py", head + inserted + text[len(head):], size=1500).chunks
    new = new_chunks(before, after)
    assert any("def inserted" in c.text for c in new)
    assert len(new) <= 2, f"{len(new)} of {len(after)} chunks changed for one inserted definition"
    assert len(new_chunks(after, before)) <= 2, "more than two chunk texts vanished"


def test_any_one_small_definition_edit_changes_few_chunks():
    """Shrink, grow, delete, rename or duplicate any one of 30 small definitions: the chunks of the
    others stay as they were, beyond at most a neighbour or two, wherever the edit is.
    (Packing greedily from the top of the file changes up to 16 chunks here.)"""
    size = 1500
    before = chunk_document("m.py", defs(30), size=size).chunks
    blocks = defs(30).split("\n\n\n")
    changed = []
    for where in range(30):
        grown = "".join(f"    x{j} = compute_{where}_{j}(alpha, beta)\n" for j in range(12))
        variants = {
            "shrink": defs(30, edit={where: "    x0 = 1\n"}),
            "grow": defs(30, edit={where: grown}),
            "delete": "\n\n\n".join(blocks[: where + 1] + blocks[where + 2:]),
            "rename": defs(30).replace(f"def func_{where}(", f"def func_{where}_renamed(", 1),
            "duplicate": "\n\n\n".join(blocks[: where + 2] + [blocks[where + 1].replace(f"func_{where}(", "copy(")]
                                          + blocks[where + 2:]),
        }
        for what, text in variants.items():
            after = chunk_document("m.py", text, size=size).chunks
            assert "".join(c.text for c in after) == text
            n = max(len(new_chunks(before, after)), len(new_chunks(after, before)))  # new ones, vanished ones
            changed.append((n, where, what))
    assert max(changed)[0] <= 3, max(changed)
    assert sum(n > 2 for n, _, _ in changed) <= len(changed) // 20, [c for c in changed if c[0] > 2]


def test_merging_is_content_defined_not_counted_from_the_top():
    """The groups of a run of small blocks do not depend on what precedes the run."""
    tail = "".join(f"CONST_{i} = {i} * {i}  # a small block\n\n" for i in range(60))
    base = chunk_document("c.py", "import os\n\n" + tail, size=400).chunks
    for head in ("import os\nimport re\n\n", "x = 1\n\n" * 7, "def f():\n    return 1\n\n\n"):
        other = chunk_document("c.py", head + tail, size=400).chunks
        assert len(new_chunks(base, other)) <= 2, head
        assert all(len(c.text) <= 200 for c in other)
    assert len(base) < 60 / 3, "small blocks are still merged"


def test_chunk_texts_are_stable_for_unchanged_text():
    text = defs(10) + "\n" + "# trailing comment\n"
    assert chunk_document("m.py", text) == chunk_document("m.py", text)


# -- chunk identity (memvidd/ingest.match_chunks) -----------------------------------------


def d(name: str) -> bytes:
    return digest(name)


def plan(old: list[tuple[str, str]], new: list[str]) -> tuple[list[tuple[str, int | None]], list[str]]:
    """match_chunks over chunk texts named by strings: old (text, key) pairs, new texts."""
    return match_chunks([(d(t), k) for t, k in old], [d(t) for t in new])


def test_unchanged_and_moved_chunks_keep_their_keys():
    old = [("a", "ka"), ("b", "kb"), ("c", "kc")]
    assert plan(old, ["a", "b", "c"]) == ([("ka", 0), ("kb", 1), ("kc", 2)], [])
    assert plan(old, ["c", "a", "b"]) == ([("kc", 2), ("ka", 0), ("kb", 1)], []), "a move writes nothing"


def test_an_inserted_chunk_gets_a_fresh_key_and_nothing_else_changes():
    old = [("a", "ka"), ("b", "kb")]
    out, gone = plan(old, ["new", "a", "b"])
    assert out == [(d("new")[:8].hex(), None), ("ka", 0), ("kb", 1)] and gone == []


def test_an_edited_chunk_is_a_new_version_of_its_key():
    old = [("a", "ka"), ("b", "kb"), ("c", "kc")]
    assert plan(old, ["a", "b2", "c"]) == ([("ka", 0), ("kb", None), ("kc", 2)], [])
    # two chunks regrouped into one: the first's key carries it, the second is gone
    assert plan(old, ["a", "b+c"]) == ([("ka", 0), ("kb", None)], ["kc"])
    assert plan(old, ["a", "c"]) == ([("ka", 0), ("kc", 2)], ["kb"]), "a deleted chunk is gone"


def test_duplicate_texts_and_colliding_keys_stay_unique():
    old = [("x", "kx"), ("y", "ky"), ("x", "kx.1")]
    assert plan(old, ["x", "x", "x"]) == ([("kx", 0), ("kx.1", 2), (d("x")[:8].hex(), None)], ["ky"])
    assert plan(old, ["x"]) == ([("kx", 0)], ["ky", "kx.1"])
    # a fresh key that happens to equal a key in use gets a suffix
    taken = d("fresh")[:8].hex()
    out, gone = plan([("a", taken)], ["a", "fresh"])
    assert out == [(taken, 0), (f"{taken}.1", None)] and gone == []


def test_positional_keys_of_old_manifests_are_kept_as_they_are():
    old = [("a", "0"), ("b", "1"), ("c", "2")]
    out, gone = plan(old, ["new", "a", "b", "c2"])
    assert out == [(d("new")[:8].hex(), None), ("0", 0), ("1", 1), ("2", None)] and gone == []


# -- tree ----------------------------------------------------------------------------------


def make(root: Path, files: dict[str, str | bytes]) -> None:
    for rel, content in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content)


def walked(tree: Tree) -> set[str]:
    return {p.relative_to(tree.root).as_posix() for p, _ in tree.walk()}


def test_gitignore_negation_and_dir_only_rules(tmp_path):
    make(tmp_path, {
        ".gitignore": "*.log\n!keep.log\nlogs/\n/top.txt\n",
        "a.log": "x", "keep.log": "x", "sub/b.log": "x", "sub/keep.log": "x",
        "logs/inside.txt": "x",  # a directory called logs: ignored
        "sub/logs": "x",  # a file called logs: a dir-only rule does not match it
        "top.txt": "x", "sub/top.txt": "x",  # anchored: only the root one
        "plain.txt": "x",
    })
    tree = Tree(tmp_path)
    assert walked(tree) == {".gitignore", "keep.log", "sub/keep.log", "sub/logs", "sub/top.txt", "plain.txt"}
    assert not tree.accepts(tmp_path / "logs" / "inside.txt")
    assert tree.accepts(tmp_path / "sub" / "logs")
    assert not tree.accepts(tmp_path / "a.log") and tree.accepts(tmp_path / "keep.log")


def test_nested_gitignore_rules_are_relative_to_their_directory(tmp_path):
    make(tmp_path, {
        "sub/.gitignore": "local.txt\n/anchored.txt\ncache/\n",
        "local.txt": "x", "anchored.txt": "x",  # outside sub: the rules do not apply
        "sub/local.txt": "x", "sub/anchored.txt": "x", "sub/cache/c.txt": "x",
        "sub/deep/local.txt": "x", "sub/deep/anchored.txt": "x", "sub/deep/cache/c.txt": "x",
        "sub/keep.txt": "x",
    })
    tree = Tree(tmp_path)
    assert walked(tree) == {"local.txt", "anchored.txt", "sub/.gitignore", "sub/deep/anchored.txt", "sub/keep.txt"}


def test_forget_gitignore_rereads_it(tmp_path):
    make(tmp_path, {"a.txt": "x", "b.txt": "x"})
    tree = Tree(tmp_path)
    assert tree.accepts(tmp_path / "a.txt")
    (tmp_path / ".gitignore").write_text("a.txt\n")
    assert tree.accepts(tmp_path / "a.txt"), "cached until told"
    tree.forget_gitignore(tmp_path)
    assert not tree.accepts(tmp_path / "a.txt") and tree.accepts(tmp_path / "b.txt")


def test_nested_gitignore_negation_overrides_the_parent(tmp_path):
    make(tmp_path, {".gitignore": "*.txt\n", "sub/.gitignore": "!keep.txt\n",
                    "sub/keep.txt": "x", "sub/other.txt": "x", "a.txt": "x"})
    # git check-ignore: sub/keep.txt is not ignored, sub/other.txt and a.txt are
    assert walked(Tree(tmp_path)) == {".gitignore", "sub/.gitignore", "sub/keep.txt"}


def test_junk_dirs_and_files_are_skipped(tmp_path):
    make(tmp_path, {
        ".git/config": "x", "node_modules/pkg/index.js": "x", ".venv/lib/site.py": "x",
        "a/__pycache__/m.cpython-311.pyc": b"x", "a/build/out.txt": "x", "x.pyc": b"x", "y.swp": "x",
        "img.png": b"x", "ok/main.py": "x", "ok/.hidden_is_fine": "x",
    })
    tree = Tree(tmp_path)
    assert walked(tree) == {"ok/main.py", "ok/.hidden_is_fine"}
    assert not tree.accepts(tmp_path / "node_modules" / "pkg" / "index.js")
    assert not tree.accepts(tmp_path / "y.swp")


def test_include_and_exclude_globs(tmp_path):
    make(tmp_path, {"README.md": "x", "docs/guide.md": "x", "docs/img.txt": "x", "src/main.py": "x",
                    "drafts/wip.md": "x", "notes.secret.md": "x"})
    tree = Tree(tmp_path, include=["*.md", "src/"], exclude=["drafts/", "*.secret.md"])
    assert walked(tree) == {"README.md", "docs/guide.md", "src/main.py"}


def test_symlinks_leading_outside_are_not_followed(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    make(outside, {"o.txt": "x", "d/o2.txt": "x"})
    make(root, {"in.txt": "x", "real/r.txt": "x"})
    os.symlink(outside, root / "dirlink")
    os.symlink(outside / "o.txt", root / "filelink.txt")
    os.symlink(root / "real", root / "innerlink")  # inside the root: followed
    tree = Tree(root)
    assert walked(tree) == {"in.txt", "real/r.txt", "innerlink/r.txt"}
    assert not tree.inside(root / "dirlink" / "o.txt") and tree.inside(root / "innerlink" / "r.txt")


def test_a_symlink_cycle_inside_the_root_is_walked_once(tmp_path):
    make(tmp_path, {"a/x.txt": "x"})
    os.symlink(tmp_path / "a", tmp_path / "a" / "loop")
    paths = walked(Tree(tmp_path))
    assert len(paths) <= 2, f"{len(paths)} paths, e.g. {sorted(paths, key=len)[-1]}"


def test_max_bytes_and_binary(tmp_path, caplog):
    caplog.set_level("INFO", logger="memvidd.tree")
    make(tmp_path, {"small.txt": "x" * 100, "big.txt": "x" * 101})
    tree = Tree(tmp_path, max_bytes=100)
    assert walked(tree) == {"small.txt"}
    list(tree.walk())
    assert sum("big.txt" in r.getMessage() and "larger than 100" in r.getMessage() for r in caplog.records) == 1
    assert is_binary(b"abc\0def") and not is_binary("héllo".encode()) and not is_binary(b"")
    assert not is_binary(b"x" * 8192 + b"\0"), "only the first 8 KB are looked at"
