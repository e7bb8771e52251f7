"""Configuration: the documented default is the embedded one; bad files are clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from memvidd import config

ROOT = Path(__file__).resolve().parents[2]  # the repository


def test_embedded_default_is_the_documented_config_toml():
    assert (ROOT / "memvidd/default_config.toml").read_text() == (ROOT / "config.toml").read_text()
    cfg = config.load()
    assert cfg.default_capsule.name == "default" and cfg.embedding.model == "all-MiniLM-L6-v2"
    assert config.load(ROOT / "config.toml") == config.parse((ROOT / "config.toml").read_text(), str(ROOT / "config.toml"))


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ('[daemon]\nsokcet = "x"\n', ["sokcet", "$.daemon"]),
        ("[limits]\nmax-frame-bytes = 10\n", ["max-frame-bytes", ">= 1024"]),
        ('[durability]\npolicy = "sometimes"\n', ["policy"]),
        ('[embedding]\nmodel = "gpt-9"\n', ["embedding.model", "gpt-9"]),
        ("[[capsule]]\nname = 1\npath = 'x'\n", ["capsule[0].name"]),
        ("not toml ===", ["not valid TOML"]),
        ("[daemon]\n", ["at least one [[capsule]]"]),
        ("[[capsule]]\nname='a'\npath='x'\n[[capsule]]\nname='a'\npath='y'\n", ["unique"]),
    ],
)
def test_bad_configs_name_the_file_and_the_key(tmp_path, text, names):
    f = tmp_path / "memvidd.toml"
    capsule = "" if "capsule" in text or text == "[daemon]\n" or "TOML" in names[0] else "[[capsule]]\nname='a'\npath='x'\n"
    f.write_text(text + "\n" + capsule if "===" not in text else text)
    with pytest.raises(config.ConfigError) as info:
        config.load(f)
    message = str(info.value)
    assert message.startswith(str(f))
    for name in names:
        assert name in message, message


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(config.ConfigError, match="cannot read"):
        config.load(tmp_path / "nope.toml")


def test_expand_uses_xdg_fallbacks(monkeypatch):
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", "/data")
    assert config.expand("$XDG_RUNTIME_DIR/memvidd/x.sock").startswith("/tmp/memvidd-")
    assert config.expand("${XDG_DATA_HOME}/m.mv2") == "/data/m.mv2"
