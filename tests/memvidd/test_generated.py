"""Generated and vendored data (lock files, minified bundles, source maps, tokenizer,
vocabulary and model files, large JSON/CSV/TSV) is passed over by default, listed in the
stats with its reason, documented, and indexed again with ``skip-generated = false``:
in a Tree, in an IngestPipeline watching a real directory, and in a real daemon through
its configuration and a reload."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest
from daemon_util import DaemonProc, watching_config
from test_watcher import FILE_KIND, live, mkroot, until, watching, write

from memvidd.client import Client
from memvidd.ingest import file_uri
from memvidd.tree import DATA_MAX_BYTES, GENERATED, Tree

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]

# One file of each kind, and the reason the stats give for it.
PASSED_OVER = {
    "package-lock.json": "lock file", "web/yarn.lock": "lock file", "poetry.lock": "lock file",
    "Cargo.lock": "lock file", "uv.lock": "lock file", "go.sum": "lock file", "pnpm-lock.yaml": "lock file",
    "static/app.min.js": "minified bundle", "static/site.min.css": "minified bundle",
    "static/app.js.map": "source map",
    "models/m/tokenizer.json": "tokenizer or vocabulary", "models/m/vocab.txt": "tokenizer or vocabulary",
    "models/m/merges.txt": "tokenizer or vocabulary",
    "models/m/model.onnx": "model weights", "models/m/model.safetensors": "model weights",
    "data/big.csv": "data over 32 KiB", "data/big.json": "data over 32 KiB", "data/big.tsv": "data over 32 KiB",
    "data/events.jsonl": "data over 32 KiB",
}
KEPT = ["notes/ideas.md", "src/app.js", "package.json", "data/small.csv", "settings.json", "vocabulary.md"]


def make_tree(root: Path) -> None:
    for rel in PASSED_OVER:
        big = rel.startswith("data/")
        write(root / rel, f"wombat {rel}\n" + ("1,2,3,4,5,6,7,8\n" * 2100 if big else "x = 1\n"))
    for rel in KEPT:
        write(root / rel, f"wombat {rel}\n" + ("a,b\n" * 100 if rel.endswith(".csv") else "keep me\n"))


def rel_docs(ix: Any, root: Path) -> set[str]:
    return {u[len(file_uri(root)) + 1:] for u in ix.docs}


# -- the rules -----------------------------------------------------------------------------


def test_a_tree_passes_over_generated_data_and_says_why(tmp_path):
    make_tree(tmp_path)
    tree = Tree(tmp_path)
    walked = {p.relative_to(tmp_path).as_posix() for p, _ in tree.walk()}
    assert walked == set(KEPT)
    assert tree.generated == {str(tmp_path / rel): why for rel, why in PASSED_OVER.items()}

    everything = Tree(tmp_path, skip_generated=False)
    assert {p.relative_to(tmp_path).as_posix() for p, _ in everything.walk()} == set(KEPT) | set(PASSED_OVER)
    assert everything.generated == {}


def test_data_files_are_passed_over_only_above_the_threshold(tmp_path):
    at, above = write(tmp_path / "at.csv", "x" * DATA_MAX_BYTES), write(tmp_path / "above.csv", "x" * (DATA_MAX_BYTES + 1))
    other = write(tmp_path / "above.md", "x" * (DATA_MAX_BYTES + 1))  # prose of any size is not data
    tree = Tree(tmp_path)
    assert tree.check_file(at, at.stat()) and tree.check_file(other, other.stat())
    assert not tree.check_file(above, above.stat())
    assert tree.generated == {str(above): "data over 32 KiB"}
    above.write_text("small now")
    assert tree.check_file(above, above.stat()) and tree.generated == {}, "a verdict is not kept past a change"


def test_the_user_exclude_and_gitignore_win_over_the_generated_list(tmp_path):
    """A file the user excluded is theirs to hide: it is not reported as generated."""
    write(tmp_path / ".gitignore", "ignored.lock\n")
    write(tmp_path / "ignored.lock", "x")
    write(tmp_path / "excluded.lock", "x")
    write(tmp_path / "reported.lock", "x")
    tree = Tree(tmp_path, exclude=["excluded.lock"])
    assert {p.name for p, _ in tree.walk()} == {".gitignore"}
    assert set(tree.generated) == {str(tmp_path / "reported.lock")}


def test_the_list_is_documented_in_config_toml_and_the_readme():
    config = (ROOT / "config.toml").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "skip-generated = true" in config
    assert re.search(r"skip-generated\s*=\s*false", readme)
    for doc, text in (("config.toml", config), ("README.md", readme)):
        for patterns in GENERATED.values():
            for pattern in patterns:
                assert pattern in text, f"{pattern} is not listed in {doc}"
        assert f"{DATA_MAX_BYTES >> 10} KiB" in text, doc
    assert (ROOT / "memvidd" / "default_config.toml").read_text() == config


# -- watching a directory ------------------------------------------------------------------


@pytest.mark.trio
async def test_the_pipeline_skips_generated_files_and_lists_them_in_the_stats(tmp_path):
    root = mkroot(tmp_path)
    make_tree(root)
    async with watching(tmp_path, root) as ix:
        await until(lambda: len(ix.docs) == len(KEPT), what="the kept files", ix=ix)
        assert rel_docs(ix, root) == set(KEPT)
        stats = ix.stats()
        assert stats["files_generated"] == len(PASSED_OVER)
        assert stats["skipped"] == {str(root / rel): f"generated: {why}" for rel, why in PASSED_OVER.items()}
        assert stats["errors"] == 0

        # Live: a lock file appears (listed, not indexed), then goes (no longer listed).
        lock = write(root / "sub" / "package-lock.json", '{"lockfileVersion": 3}\n')
        await until(lambda: str(lock) in ix.stats()["skipped"], what="the new lock file listed", ix=ix)
        lock.unlink()
        await until(lambda: str(lock) not in ix.stats()["skipped"], what="the lock file gone", ix=ix)
        # A small data file grows past the threshold: its frames go, and it is listed.
        small = root / "data" / "small.csv"
        small.write_text("a,b\n" * (DATA_MAX_BYTES // 4 + 1))
        await until(lambda: file_uri(small) not in ix.docs, what="the grown data file removed", ix=ix)
        assert ix.stats()["skipped"][str(small)] == "generated: data over 32 KiB"
        assert ix.stats()["files_generated"] == len(PASSED_OVER) + 1
        found = {(h.uri or "").split("#")[0] for h in ix.svc.cap.find("wombat", mode="lex", k=100)}
        assert found == {file_uri(root / rel) for rel in KEPT} - {file_uri(small)}, "search finds the kept files only"


@pytest.mark.trio
async def test_skip_generated_false_indexes_them_and_a_restart_with_the_default_drops_them(tmp_path):
    root = mkroot(tmp_path)
    make_tree(root)
    async with watching(tmp_path, Tree(root, skip_generated=False)) as ix:
        await until(lambda: len(ix.docs) == len(KEPT) + len(PASSED_OVER), what="every file", ix=ix)
        assert ix.stats()["files_generated"] == 0
    # Indexed before the default applied (an older daemon, or skip-generated = false):
    # the next scan with the default removes them.
    async with watching(tmp_path, root) as ix:
        await until(lambda: rel_docs(ix, root) == set(KEPT), what="the generated files removed", ix=ix)
        assert ix.stats()["files_generated"] == len(PASSED_OVER)
        cap = ix.svc.cap
        await until(lambda: {f.uri for f in live(cap) if f.kind == FILE_KIND}
                    == {file_uri(root / rel) for rel in KEPT}, what="their frames tombstoned", ix=ix)


# -- the configuration, in a real daemon ---------------------------------------------------


def indexer(d: DaemonProc) -> dict[str, Any]:
    with Client(d.socket) as c:
        return c.stats()["indexer"]


def wait_for(d: DaemonProc, cond: Any, what: str, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while not cond(s := indexer(d)):
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {s}"
        time.sleep(0.02)
    return s


def test_the_daemon_reads_skip_generated_from_its_config_and_a_reload_applies_it(tmp_path):
    tree = mkroot(tmp_path, "tree")
    make_tree(tree)
    run = tmp_path / "run"
    run.mkdir()
    d = DaemonProc(run)
    d.config.write_text(watching_config(run, tree, extra="skip-generated = false"))
    d.start()
    try:
        wait_for(d, lambda s: s["documents"] == len(KEPT) + len(PASSED_OVER) and s["phase"] == "watching",
                 "every file indexed")
        d.config.write_text(watching_config(run, tree))
        with Client(d.socket) as c:
            reply = c.reload()
        assert reply.applied == ["capsule default.skip-generated: false -> true"], reply
        s = wait_for(d, lambda s: s["documents"] == len(KEPT) and s["files_generated"] == len(PASSED_OVER),
                     "the generated files dropped")
        assert s["skipped"][str(tree / "package-lock.json")] == "generated: lock file"
        with Client(d.socket) as c:
            assert not [h for h in c.find("wombat", mode="lex", k=100) if "lock" in (h.uri or "")]
        assert d.stop() == 0
    finally:
        d.close()
