"""Which files under a watched root are documents: ignore rules, junk, links, binaries.

A file is indexed when it is under the root (symlinks that lead outside are never
followed), not inside a junk directory (``.git``, ``node_modules``, virtualenvs, build
output, caches), not ignored by a ``.gitignore`` on its way down from the root (nested
ones included, with git's semantics, via ``pathspec``), matches the include globs (if
any) and no exclude glob, is at most ``max_bytes`` long and is not binary. Each skip of
a file that looked like a candidate is logged once with its reason.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pathspec

log = logging.getLogger("memvidd.tree")

JUNK_DIRS = {
    ".git", ".hg", ".svn", ".jj", "node_modules", ".venv", "venv", "env", ".env", "__pycache__",
    ".mypy_cache", ".pytest_cache", ".ruff_cache", ".tox", ".nox", ".hypothesis", ".idea", ".vscode",
    "build", "dist", "target", ".next", ".cache", ".gradle", ".terraform", "site-packages", ".eggs",
}
JUNK_FILES = pathspec.GitIgnoreSpec.from_lines([
    "*.pyc", "*.pyo", "*.o", "*.so", "*.a", "*.dylib", "*.dll", "*.exe", "*.class", "*.jar",
    "*.swp", "*.swo", "*~", ".#*", "#*#", ".DS_Store", "*.lock", "*.mv2", "*.mv2e", "*.tmp",
    "*.png", "*.jpg", "*.jpeg", "*.gif", "*.webp", "*.ico", "*.pdf", "*.zip", "*.gz", "*.tar",
    "*.xz", "*.zst", "*.7z", "*.woff", "*.woff2", "*.ttf", "*.mp3", "*.mp4", "*.mov", "*.sqlite",
    "*.db", "*.bin", "*.onnx", "*.pt", "*.npy",
])


def is_binary(head: bytes) -> bool:
    """Like git: a NUL byte in the first 8 KB means binary."""
    return b"\0" in head[:8192]


class Tree:
    def __init__(self, root: str | Path, *, include: list[str] | None = None, exclude: list[str] | None = None,
                 max_bytes: int = 2 << 20) -> None:
        self.root = Path(root).resolve()
        self.include = pathspec.GitIgnoreSpec.from_lines(include) if include else None
        self.exclude = pathspec.GitIgnoreSpec.from_lines(exclude or [])
        self.max_bytes = max_bytes
        self._gitignores: dict[Path, pathspec.GitIgnoreSpec | None] = {}
        self._reported: set[str] = set()

    def _skip(self, path: Path, why: str) -> None:
        key = str(path)
        if key not in self._reported:  # one logged reason per file
            self._reported.add(key)
            log.info("skip path=%s reason=%s", path, why)

    def _gitignore(self, directory: Path) -> pathspec.GitIgnoreSpec | None:
        if directory not in self._gitignores:
            try:
                lines = (directory / ".gitignore").read_text(errors="replace").splitlines()
                self._gitignores[directory] = pathspec.GitIgnoreSpec.from_lines(lines)
            except OSError:
                self._gitignores[directory] = None
        return self._gitignores[directory]

    def forget_gitignore(self, directory: Path) -> None:
        """A .gitignore changed: read it again next time."""
        self._gitignores.pop(directory, None)

    def _ignored(self, rel: Path, is_dir: bool) -> bool:
        """Do the .gitignore files from the root down to ``rel``'s directory exclude it?
        As in git, a deeper file's verdict (an ignore or a ``!`` re-include) wins."""
        parts = rel.parts
        ignored = False
        for depth in range(len(parts)):
            directory = self.root.joinpath(*parts[:depth])
            spec = self._gitignore(directory)
            if spec is not None:
                sub = "/".join(parts[depth:]) + ("/" if is_dir else "")
                verdict = spec.check_file(sub).include
                if verdict is not None:
                    ignored = verdict
        return ignored

    def accepts(self, path: str | Path, *, log_skip: bool = True) -> bool:
        """Is ``path`` (absolute) a document of this root? Cheap checks first, no reads."""
        p = Path(path)
        try:
            rel = p.relative_to(self.root)
        except ValueError:
            return False
        if not rel.parts or any(part in JUNK_DIRS for part in rel.parts[:-1]):
            return False
        if JUNK_FILES.match_file(rel.name):
            return False
        posix = rel.as_posix()
        if self.include is not None and not self.include.match_file(posix):
            return False
        if self.exclude.match_file(posix):
            return False
        if any(self._ignored(Path(*rel.parts[: i + 1]), True) for i in range(len(rel.parts) - 1)):
            return False
        return not self._ignored(rel, False)

    def check_file(self, path: Path, st: os.stat_result) -> bool:
        """The checks that need a stat: regular file, inside the root, not too big."""
        if not stat.S_ISREG(st.st_mode):
            return False
        if st.st_size > self.max_bytes:
            self._skip(path, f"larger than {self.max_bytes} bytes")
            return False
        return True

    def inside(self, path: Path) -> bool:
        """Does ``path`` resolve (through any symlinks) to somewhere under the root?"""
        try:
            real = path.resolve(strict=True)
        except (OSError, RuntimeError):
            return False
        return real == self.root or self.root in real.parents

    def walk(self) -> Iterator[tuple[Path, os.stat_result]]:
        """Every document under the root with its stat, directory by directory."""
        # Symlinked directories inside the root are walked, but never into one of their own
        # ancestors (a link cycle would otherwise be walked until ELOOP).
        stack: list[tuple[Path, frozenset[tuple[int, int]]]] = [(self.root, frozenset())]
        while stack:
            directory, ancestors = stack.pop()
            try:
                st_dir = os.stat(directory)
            except OSError:
                continue
            here = (st_dir.st_dev, st_dir.st_ino)
            if here in ancestors:
                self._skip(directory, "symlink cycle")
                continue
            ancestors = ancestors | {here}
            try:
                entries = list(os.scandir(directory))
            except OSError as e:
                self._skip(directory, f"unreadable directory: {e.strerror}")
                continue
            for entry in sorted(entries, key=lambda e: e.name):
                path = Path(entry.path)
                try:
                    if entry.is_symlink() and not self.inside(path):
                        self._skip(path, "symlink leading outside the root")
                        continue
                    if entry.is_dir():
                        rel = path.relative_to(self.root)
                        if entry.name not in JUNK_DIRS and not self._ignored(rel, True) and \
                                not self.exclude.match_file(rel.as_posix() + "/"):
                            stack.append((path, ancestors))
                        continue
                    if not self.accepts(path):
                        continue
                    st = entry.stat()
                except OSError as e:
                    self._skip(path, f"cannot stat: {e.strerror}")
                    continue
                if self.check_file(path, st):
                    yield path, st
