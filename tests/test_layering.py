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


MAX_MODULE_LINES = 800


def test_no_module_is_over_800_lines():
    """A module a reader can hold in mind: one concern each (issue 12)."""
    for pkg in ("engine", "memvidd"):
        for py in (ROOT / pkg).rglob("*.py"):
            lines = len(py.read_text().splitlines())
            assert lines <= MAX_MODULE_LINES, f"{pkg}/{py.name} has {lines} lines"


def _engine_graph() -> dict[str, set[str]]:
    """engine module -> the engine modules it imports (relative imports, wherever they
    are: a ``TYPE_CHECKING`` import is an edge too)."""
    graph: dict[str, set[str]] = {}
    for py in (ROOT / "engine").glob("*.py"):
        deps = graph.setdefault(py.stem, set())
        for node in ast.walk(ast.parse(py.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    deps.add(node.module.split(".")[0])
                else:  # from . import a, b
                    deps.update(a.name for a in node.names)
    return graph


def test_engine_modules_import_each_other_without_a_circle():
    graph = _engine_graph()
    assert "capsule" in graph["__init__"] and "state" in graph["capsule"]  # the walk sees imports
    done: set[str] = set()

    def visit(mod: str, path: list[str]) -> None:
        if mod in path:
            raise AssertionError("import circle: " + " -> ".join(path[path.index(mod):] + [mod]))
        if mod in done or mod not in graph:
            return
        for dep in sorted(graph[mod]):
            visit(dep, path + [mod])
        done.add(mod)

    for mod in sorted(graph):
        visit(mod, [])
