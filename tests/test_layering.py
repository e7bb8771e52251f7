"""engine never imports trio or memvidd; memvidd uses only engine's public names."""

from __future__ import annotations

import ast
from pathlib import Path

import engine

ROOT = Path(__file__).resolve().parent.parent


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            out.append((node.module or "", [a.name for a in node.names]))
    return out


def test_engine_imports_neither_trio_nor_memvidd():
    for py in (ROOT / "engine").rglob("*.py"):
        for mod, _ in _imports(py):
            assert mod.split(".")[0] not in {"trio", "memvidd", "watchfiles"}, f"{py.name} imports {mod}"


def test_memvidd_uses_only_the_public_engine_api():
    public = set(engine.__all__)
    for py in (ROOT / "memvidd").rglob("*.py"):
        for mod, names in _imports(py):
            if mod == "engine":
                assert set(names) <= public, f"{py.name} imports private {set(names) - public}"
            else:
                assert not mod.startswith("engine."), f"{py.name} imports {mod}"
