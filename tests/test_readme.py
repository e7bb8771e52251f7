"""The README's commands are the ones CI runs."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command():
    ci_command = (ROOT / ".ci/run").read_text().strip().splitlines()[-1]
    readme = (ROOT / "README.md").read_text()
    test_section = readme.split("Test:", 1)[1]
    assert ci_command in test_section.split("```")[1]
