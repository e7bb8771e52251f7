"""A capsule's file as its owner expects it to be treated: created private, kept at its
mode and behind its symlink through every rewrite, never grown by a compaction, never
discarded by a command without an explicit flag (issue 11, items 7-10)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest

import engine
from memvidd import cli

pytestmark = pytest.mark.timeout(120)


def mode(path: str | Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def notes(path: str, n: int = 300, *, seed: int = 0, vectors: bool = True, **kw) -> None:
    """A capsule like a notes folder's: ``n`` notes committed ten at a time, with vectors
    (as the daemon's embedder commits them: small batches), the lexical index open."""
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(2000)]
    with engine.create(path, model=engine.DEFAULT_MODEL if vectors else None, **kw) as cap:
        cap.find("w1", mode="lex")
        for i in range(n):
            v = rng.normal(size=384).astype(np.float32) if vectors else None
            cap.put(" ".join(rng.choice(words, 120)) + f" note {i}", uri=f"note://{i}", title=f"note {i}", vector=v)
            if i % 10 == 9:
                cap.commit()


# -- item 10: capsules are private ------------------------------------------------------


def test_new_capsules_and_their_rewrites_are_private(tmp_path):
    """0600 on create; a branch, an encrypted and a decrypted copy too; a compaction keeps
    whatever mode the owner chose (0600 stays 0600, a deliberate 0640 stays 0640)."""
    path = str(tmp_path / "p.mv2")
    notes(path, 30, vectors=False)
    assert mode(path) == 0o600
    with engine.open(path) as cap:
        cap.compact()
    assert mode(path) == 0o600
    os.chmod(path, 0o640)
    with engine.open(path) as cap:
        cap.put("more", uri="note://more")
        cap.commit()
        cap.compact()
        cap.branch(tmp_path / "b.mv2")
        cap.branch(tmp_path / "e.mv2e", passphrase="pw", kdf=engine.KdfParams(memory_cost=64, iterations=1, lanes=1))
    assert mode(path) == 0o640
    assert mode(tmp_path / "b.mv2") == 0o600
    assert mode(tmp_path / "e.mv2e") == 0o600
    with engine.open(tmp_path / "e.mv2e", passphrase="pw") as enc:
        enc.branch(tmp_path / "d.mv2", origin=False)
    assert mode(tmp_path / "d.mv2") == 0o600


def test_the_daemon_creates_capsule_directories_private(tmp_path):
    from memvidd import daemon
    from memvidd.config import CapsuleConfig, Config, Embedding

    cfg = Config(embedding=Embedding(model="none"))
    c = CapsuleConfig(name="n", path=str(tmp_path / "new" / "deeper" / "n.mv2"))
    cap = daemon._open_capsule(c, cfg, None, None)
    cap.close()
    assert mode(tmp_path / "new") == 0o700
    assert mode(tmp_path / "new" / "deeper") == 0o700
    assert mode(c.path) == 0o600


# -- item 9: a capsule behind a symlink ----------------------------------------------------


def test_compaction_through_a_symlink_rewrites_the_target(tmp_path):
    real_dir = tmp_path / "store"
    real_dir.mkdir()
    target = str(real_dir / "real.mv2")
    notes(target, 40, vectors=False)
    link = tmp_path / "link.mv2"
    link.symlink_to(target)
    with engine.open(link) as cap:
        cap.put("edited", uri="note://3")
        cap.commit()
        cap.compact()
        cap.put("after the compaction", uri="note://after")
        cap.commit()
    assert link.is_symlink() and os.readlink(link) == target
    assert sorted(os.listdir(tmp_path)) == ["link.mv2", "store"]
    assert os.listdir(real_dir) == ["real.mv2"]
    with engine.open(target) as cap:  # the target holds everything, the symlink still leads to it
        assert cap.get(uri="note://3").text == "edited"
        assert cap.get(uri="note://after").text == "after the compaction"
    assert engine.verify(str(link)).ok


def test_compaction_refuses_when_the_path_no_longer_names_the_open_file(tmp_path):
    """Moved or replaced while open: renaming the rewrite over the path would destroy
    whatever is there now, so compaction refuses and changes nothing."""
    path = tmp_path / "c.mv2"
    notes(str(path), 20, vectors=False)
    with engine.open(path) as cap:
        os.rename(path, tmp_path / "moved.mv2")
        path.write_bytes(b"someone else's file")
        with pytest.raises(engine.StorageError, match="moved or replaced"):
            cap.compact()
        assert cap.get(uri="note://3").text.endswith("note 3")
    assert path.read_bytes() == b"someone else's file"
    assert not (tmp_path / "c.mv2.compacting").exists()


# -- item 8: compaction never grows the file ----------------------------------------------------


def test_compaction_does_not_grow_a_capsule_with_vectors(tmp_path):
    """300 notes with vectors committed in small batches, upgraded codecs, the lexical
    index copied: compacting used to write every vector twice (the small records copied,
    then folded again by the checkpoint after the switch) and a fresh, larger copy of the
    lexical index. Now the file shrinks, and a second compaction changes nothing."""
    path = str(tmp_path / "v.mv2")
    notes(path, index_dir=str(tmp_path / "ix"))
    with engine.open(path, index_dir=str(tmp_path / "ix")) as cap:
        cap.find("w7", mode="lex")
        cap.upgrade_codecs(cold_commits=0)
        kinds = cap.stats()["bytes_by_kind"]
        report = cap.compact()
        after = cap.stats()["bytes_by_kind"]
        assert report["bytes_after"] <= report["bytes_before"]
        assert report["bytes_after"] == os.path.getsize(path)
        assert after["vectors"] <= 300 * 384 * 2 * 1.05  # each vector once (f16)
        assert after["lexfile"] <= kinds["lexfile"]
        assert after["dead"] == 0
        again = cap.compact()
        assert again["bytes_after"] <= again["bytes_before"] * 1.01
        assert len(cap.vectors(range(300))) == 300
        hits = [h.frame_id for h in cap.find("w11 w12", mode="lex", k=10)]
    with engine.open(path, index_dir=str(tmp_path / "fresh")) as cap:  # no working copies
        assert [h.frame_id for h in cap.find("w11 w12", mode="lex", k=10)] == hits
        assert cap.stats()["search"]["attach"]["origin"]["lex"] == "capsule"  # the carried copy restored


def test_compaction_of_a_capsule_without_dead_bytes_adds_at_most_its_checkpoint(tmp_path, capsys):
    """A capsule never checkpointed has nothing dead; compaction then writes the segments
    that index its frames for a fast open, a few percent at most. The command says what
    it did instead of calling the growth 'nothing to reclaim'."""
    path = str(tmp_path / "n.mv2")
    with engine.create(path, model=None, checkpoint_frames=10_000, close_checkpoint_frames=10_000) as cap:
        for i in range(200):
            cap.put(f"note {i} " * 30, uri=f"n://{i}")
            cap.commit()
    size = os.path.getsize(path)
    assert cli.main(["compact", "--capsule", path, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["bytes_before"] == size and report["bytes_after"] == os.path.getsize(path)
    assert report["bytes_after"] <= size * 1.05
    assert 0 < report["checkpoint_bytes"] < report["bytes_after"]
    assert cli.main(["compact", "--capsule", path]) == 0
    out = capsys.readouterr().out
    assert "nothing to reclaim" not in out
    assert out.startswith(f"compacted: {report['bytes_after']} -> ")


# -- item 7: no command discards a capsule without an explicit flag --------------------------


def test_demo_never_discards_an_existing_capsule(tmp_path, capsys):
    path = str(tmp_path / "mine.mv2")
    notes(path, 30, vectors=False)
    with engine.open(path) as cap:
        seq = cap.seq
    with pytest.raises(SystemExit, match="--replace"):
        cli.main(["demo", "--capsule", path])
    with engine.open(path) as cap:
        assert cap.seq == seq and cap.get(uri="note://29").text.endswith("note 29")
    assert cli.main(["demo", "--capsule", path, "--replace"]) == 0
    assert f"capsule {path}" in capsys.readouterr().out
    with engine.open(path) as cap:
        assert cap.get(uri="note://demo").text == "memvidd demo: the note, edited"
