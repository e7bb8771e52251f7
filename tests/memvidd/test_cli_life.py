"""The capsule's life on the command line: encrypt / decrypt / rekey, branch, compact,
rewind, rules and ``put --expires``; directly on files (``cli.main`` in process) and
against a real daemon (``memvidd`` subprocesses)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

import engine
from daemon_util import ROOT, DaemonProc
from memvidd import cli

pytestmark = pytest.mark.timeout(180)

PASSPHRASE = "correct horse battery staple"


def key_file(path: Path, passphrase: str = PASSPHRASE) -> str:
    path.write_text(passphrase + "\n")
    path.chmod(0o600)
    return str(path)


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``memvidd ARGS`` in process: (exit code, stdout, stderr), as the interpreter would
    report a ``SystemExit("message")``."""
    try:
        code = cli.main(list(args))
    except SystemExit as e:
        if not isinstance(e.code, str):
            raise
        print(e.code, file=sys.stderr)
        code = 1
    out = capsys.readouterr()
    return code, out.out, out.err


def run_json(capsys: pytest.CaptureFixture[str], *args: str) -> object:
    code, out, err = run(capsys, *args, "--json")
    assert code == 0, err
    return json.loads(out)


def notes(path: Path, n: int = 3) -> list[int]:
    """A plain capsule with ``n`` notes, one commit each, and an edit of the first."""
    with engine.create(path, model=None) as cap:
        for i in range(n):
            cap.put(f"note {i} about the garden", uri=f"n://{i}")
            cap.commit()
        cap.put("note 0, edited", uri="n://0")
        cap.commit()
        return [cap.seq]


def texts(path: Path, passphrase: str | None = None, as_of: int | None = None) -> dict[str, str]:
    with engine.open(path, readonly=True, passphrase=passphrase) as cap:
        return {e.uri: cap.get(e.id).text for e in cap.timeline(as_of=as_of)}


def test_encrypt_decrypt_round_trip_with_passphrase_files(tmp_path, capsys):
    plain, sealed, back = tmp_path / "a.mv2", tmp_path / "a.mv2e", tmp_path / "back.mv2"
    notes(plain)
    key = key_file(tmp_path / "key")
    code, out, err = run(capsys, "encrypt", str(plain), str(sealed), "--passphrase-file", key)
    assert code == 0 and "encrypted" in out, err
    assert b"garden" not in sealed.read_bytes()
    assert texts(sealed, PASSPHRASE) == texts(plain)
    with engine.open(sealed, readonly=True, passphrase=PASSPHRASE) as cap:
        assert cap.encrypted and cap.stats()["origin"] is None  # a conversion, not a branch

    # Reading it needs the passphrase: none is a hint, a wrong one a clear error.
    code, _, err = run(capsys, "find", "--capsule", str(sealed), "garden")
    assert code == 1 and "encrypted" in err and "--passphrase-file" in err
    wrong = key_file(tmp_path / "wrong", "not it")
    code, _, err = run(capsys, "get", "--capsule", str(sealed), "--uri", "n://1", "--passphrase-file", wrong)
    assert code == 1 and "passphrase" in err and "not it" not in err
    hits = run_json(capsys, "find", "--capsule", str(sealed), "garden", "--passphrase-file", key)
    assert {h["uri"] for h in hits["hits"]} == {"n://1", "n://2"}
    assert run(capsys, "verify", str(sealed), "--passphrase-file", key)[0] == 0
    assert run(capsys, "verify", str(sealed), "--passphrase-file", wrong)[0] == 1

    code, out, err = run(capsys, "decrypt", str(sealed), str(back), "--passphrase-file", key)
    assert code == 0 and "decrypted" in out, err
    assert texts(back) == texts(plain)
    with engine.open(back, readonly=True) as cap:
        assert not cap.encrypted
    assert engine.verify(str(back)).ok

    # Bad uses: no passphrase, a capsule already in the wanted form, an existing output.
    assert run(capsys, "encrypt", str(plain), str(tmp_path / "x.mv2e"))[0] == 2
    code, _, err = run(capsys, "encrypt", str(sealed), str(tmp_path / "y.mv2e"), "--passphrase-file", key)
    assert code == 1 and "encrypted already" in err
    code, _, err = run(capsys, "decrypt", str(plain), str(tmp_path / "z.mv2"), "--passphrase-file", key)
    assert code == 1 and "not encrypted" in err
    code, _, err = run(capsys, "decrypt", str(sealed), str(back), "--passphrase-file", key)
    assert code == 1 and "exists" in err
    with pytest.raises(SystemExit) as info:  # never a literal passphrase argument
        cli.main(["encrypt", str(plain), str(tmp_path / "w.mv2e"), "--passphrase", PASSPHRASE])
    assert info.value.code == 2
    capsys.readouterr()


def test_rekey_changes_the_passphrase(tmp_path, capsys, monkeypatch):
    sealed = tmp_path / "r.mv2e"
    with engine.create(sealed, model=None, passphrase=PASSPHRASE) as cap:
        cap.put("a sealed note", uri="r://1")
        cap.commit()
    old = key_file(tmp_path / "old")
    monkeypatch.setenv("NEW_KEY", "a brand new passphrase")
    assert run(capsys, "rekey", str(sealed), "--passphrase-file", old)[0] == 2  # no new one
    code, out, err = run(capsys, "rekey", str(sealed), "--passphrase-file", old, "--new-passphrase-env", "NEW_KEY")
    assert code == 0 and "passphrase changed" in out, err
    with pytest.raises(engine.WrongPassphrase):
        engine.open(sealed, readonly=True, passphrase=PASSPHRASE)
    assert texts(sealed, "a brand new passphrase") == {"r://1": "a sealed note"}
    code, _, err = run(capsys, "rekey", str(sealed), "--passphrase-file", old, "--new-passphrase-file", old)
    assert code == 1 and "passphrase" in err  # the old one does not open it any more
    creds = tmp_path / "creds"
    creds.mkdir()
    key_file(creds / "memvidd-key", "a credential passphrase")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert run(capsys, "rekey", str(sealed), "--passphrase-env", "NEW_KEY",
               "--new-passphrase-credential", "memvidd-key")[0] == 0
    assert texts(sealed, "a credential passphrase") == {"r://1": "a sealed note"}


def test_branch_as_of_a_commit_records_its_origin(tmp_path, capsys):
    src, out = tmp_path / "src.mv2", tmp_path / "b.mv2"
    notes(src)  # commits 1..3 add n://0..2, commit 4 edits n://0
    report = run_json(capsys, "branch", str(out), "--capsule", str(src), "--as-of", "2")
    assert report["seq"] == 2
    assert texts(out) == {"n://0": "note 0 about the garden", "n://1": "note 1 about the garden"}
    with engine.open(out, readonly=True) as cap:
        origin = cap.stats()["origin"]
        assert origin["seq"] == 2 and origin["path"] == str(src) and cap.seq == 2
        assert [h.uri for h in cap.find("garden", mode="lex")]  # indexes built
    code, _, err = run(capsys, "branch", str(out), "--capsule", str(src))
    assert code == 1 and "exists" in err

    # A branch of an encrypted capsule stays encrypted, with its passphrase or a new one.
    sealed = tmp_path / "src.mv2e"
    key = key_file(tmp_path / "key")
    assert run(capsys, "encrypt", str(src), str(sealed), "--passphrase-file", key)[0] == 0
    assert run(capsys, "branch", str(tmp_path / "b1.mv2e"), "--capsule", str(sealed), "--passphrase-file", key,
               "--as-of", "3")[0] == 0
    assert texts(tmp_path / "b1.mv2e", PASSPHRASE)["n://0"] == "note 0 about the garden"
    new = key_file(tmp_path / "new", "another passphrase")
    assert run(capsys, "branch", str(tmp_path / "b2.mv2e"), "--capsule", str(sealed), "--passphrase-file", key,
               "--new-passphrase-file", new)[0] == 0
    assert texts(tmp_path / "b2.mv2e", "another passphrase")["n://0"] == "note 0, edited"

    # Without --capsule: the configured default capsule (and its passphrase source).
    cfg = tmp_path / "memvidd.toml"
    cfg.write_text(f'[[capsule]]\nname = "main"\npath = "{sealed}"\npassphrase-file = "{key}"\n')
    assert run(capsys, "branch", str(tmp_path / "b3.mv2e"), "--config", str(cfg), "--as-of", "1")[0] == 0
    assert texts(tmp_path / "b3.mv2e", PASSPHRASE) == {"n://0": "note 0 about the garden"}


def test_compact_rewind_rules_and_expires_on_a_file(tmp_path, capsys):
    path = tmp_path / "c.mv2"
    base = random.Random(2).randbytes(16_000)
    with engine.create(path, model=None) as cap:
        for i in range(20):
            cap.put_many([{"data": b"%d-%d:" % (i, j) + base, "uri": f"blob://{i}/{j}"} for j in range(2)])
            cap.commit()
        cap.put("a note", uri="n://1")
        cap.commit()
        frames = {f: cap.get(f).payload for f in range(cap.stats()["frames"])}

    up = run_json(capsys, "compact", "--capsule", str(path), "--codecs")
    assert up["moved"] == len(frames) and up["saved"] > 0
    code, out, err = run(capsys, "compact", "--capsule", str(path))
    assert code == 0 and "compacted:" in out and "reclaimed" in out, err
    before, after = (int(x) for x in out.split("compacted: ")[1].split(" bytes")[0].split(" -> "))
    assert after < before / 2 and path.stat().st_size == after
    with engine.open(path, readonly=True) as cap:
        assert {f: cap.get(f).payload for f in frames} == frames
    assert engine.verify(str(path)).ok

    head = run_json(capsys, "put", "--capsule", str(path), "an update", "--uri", "n://1")["seq"]
    assert run_json(capsys, "rewind", "--capsule", str(path), str(head - 1))["seq"] == head + 1
    assert run(capsys, "get", "--capsule", str(path), "--uri", "n://1")[1].strip() == "a note"

    gone = run_json(capsys, "put", "--capsule", str(path), "already gone", "--expires", "-1")["frame_id"]
    soon = time.time() + 3600
    later = run_json(capsys, "put", "--capsule", str(path), "gone in an hour", "--expires",
                     time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(soon)))["frame_id"]
    code, _, err = run(capsys, "get", "--capsule", str(path), str(gone))
    assert code == 1 and "expired" in err
    assert run(capsys, "get", "--capsule", str(path), str(later))[1].strip() == "gone in an hour"
    code, out, _ = run(capsys, "timeline", "--capsule", str(path), "--limit", "100")
    assert "1 expired frames hidden" in out

    assert run_json(capsys, "rules", "--capsule", str(path)) == {"rules": {}, "seq": head + 3}
    code, _, err = run(capsys, "rules", "--capsule", str(path), "--set", '{"budget_bytes": 0}')
    assert code == 1 and "--force" in err
    ok = run_json(capsys, "rules", "--capsule", str(path), "--set", '{"default": {"max_versions": 1}}')
    assert ok == {"rules": {"default": {"max_versions": 1}}, "seq": head + 4}
    assert run_json(capsys, "rules", "--capsule", str(path), "--as-of", str(head))["rules"] == {}
    assert run(capsys, "rules", "--capsule", str(path), "--set", "{}", "--as-of", "1")[0] == 2
    assert run(capsys, "rules", "--capsule", str(path), "--set", "[1]")[0] == 1
    assert run(capsys, "rules", "--capsule", str(path), "--set", "not json")[0] == 1
    forced = run_json(capsys, "rules", "--capsule", str(path), "--set", '{"budget_bytes": 0}', "--force")
    assert forced["rules"] == {"budget_bytes": 0}
    assert run_json(capsys, "timeline", "--capsule", str(path)) == []


def test_life_commands_against_a_daemon(tmp_path):
    d = DaemonProc(tmp_path).start()

    def cli_run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "memvidd", *args], capture_output=True, text=True,
                              timeout=60, cwd=ROOT)

    def ok(*args: str) -> object:
        out = cli_run(*args, "--socket", d.socket, "--json")
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    try:
        first = ok("put", "the first version", "--uri", "d://1")
        ok("put", "the second version", "--uri", "d://1")
        ok("put", "expired on arrival", "--uri", "d://gone", "--expires", "-5")
        assert ok("get", "--uri", "d://1")["text"] == "the second version"
        gone = cli_run("get", "--socket", d.socket, "--uri", "d://gone")
        assert gone.returncode == 1 and "expired" in gone.stderr
        assert "1 expired frames hidden" in cli_run("timeline", "--socket", d.socket).stdout

        rewound = ok("rewind", str(first["seq"]))
        assert ok("get", "--uri", "d://1")["text"] == "the first version"

        assert ok("rules") == {"rules": {}, "seq": rewound["seq"]}
        refused = cli_run("rules", "--socket", d.socket, "--set", '{"budget_bytes": 0}')
        assert refused.returncode == 1 and "--force" in refused.stderr
        rules = ok("rules", "--set", '{"tags": {"kind=log": {"max_age_s": 60}}}')
        assert rules["rules"] == {"tags": {"kind=log": {"max_age_s": 60.0}}}
        assert ok("rules", "--as-of", str(rules["seq"] - 1))["rules"] == {}

        up = ok("compact", "--codecs")
        assert up["moved"] >= 3
        human = cli_run("compact", "--socket", d.socket)
        assert human.returncode == 0 and "compacted:" in human.stdout and " -> " in human.stdout, human.stderr

        # The file itself: a daemon holds it, so writing directly is refused, but a
        # branch only reads it.
        held = cli_run("compact", "--capsule", str(tmp_path / "default.mv2"))
        assert held.returncode == 1 and "daemon holds it" in held.stderr
        branch = cli_run("branch", str(tmp_path / "copy.mv2"), "--capsule", str(tmp_path / "default.mv2"),
                         "--as-of", str(first["seq"]), "--json")
        assert branch.returncode == 0, branch.stderr
        assert texts(tmp_path / "copy.mv2") == {"d://1": "the first version"}
    finally:
        d.close()


def test_an_encrypted_capsule_without_a_passphrase_says_how_to_give_one(tmp_path):
    """Both kinds of command that open a file (a client command's --capsule, verify) say
    which options give the passphrase; a wrong passphrase stays the engine's error."""
    path = str(tmp_path / "secret.mv2e")
    with engine.create(path, model=None, passphrase="pw", kdf=engine.KdfParams(memory_cost=1024, iterations=1)) as c:
        c.put("hidden")
    hint = "(--passphrase-file PATH, --passphrase-env VAR or --passphrase-credential NAME)"
    for argv in (["find", "hidden", "--mode", "lex", "--capsule", path], ["branch", str(tmp_path / "b.mv2"),
                                                                          "--capsule", path]):
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        assert "encrypted" in str(info.value) and hint in str(info.value), argv
    key = tmp_path / "wrong.key"
    key.write_text("not it\n")
    key.chmod(0o600)
    assert cli.main(["find", "hidden", "--mode", "lex", "--capsule", path, "--passphrase-file", str(key)]) == 1
