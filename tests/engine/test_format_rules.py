"""Every rule in docs/format.md has at least one test giving evidence for it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository


def test_every_format_rule_has_a_test():
    rules = set(re.findall(r"\*\*\[(F-\d+)\]\*\*", (ROOT / "docs/format.md").read_text()))
    assert len(rules) >= 15
    cited = set()
    for py in (ROOT / "tests").rglob("test_*.py"):
        cited |= set(re.findall(r'req\("(F-\d+)"\)', py.read_text()))
    assert not rules - cited, f"rules without a test: {sorted(rules - cited)}"
    assert not cited - rules, f"tests cite rules that do not exist: {sorted(cited - rules)}"
