"""Which files under a watched root are documents: ignore rules, junk, links, binaries.

A file is indexed when it is under the root (symlinks that lead outside are never
followed), not inside a junk directory (``.git``, ``node_modules``, virtualenvs, build
output, caches), not ignored by a ``.gitignore`` on its way down from the root (nested
ones included, with git's semantics, via ``pathspec``), matches the include globs (if
any) and no exclude glob, is at most ``max_bytes`` long and not binary (a document, PDF,
office or HTML, has its own limits, ``documents.Limits``, applied by the indexer), and, unless
``skip_generated`` is off, is not generated or vendored data (``GENERATED``: lock files,
minified bundles, source maps, tokenizer, vocabulary and model files, JSON/CSV/TSV data
over ``DATA_MAX_BYTES``). Each skip of a file that looked like a candidate is logged once
with its reason; the generated ones are also kept in ``Tree.generated`` for the stats.

The tree is not trusted: another local user may write into it. Ignore patterns are
matched in time linear in the path (``_LinearPattern``: a hostile ``.gitignore`` cannot
stall the scan), and a document is read only through ``Tree.open``, which walks from the
root without following a symlink out of it, even one swapped in after the file was vetted.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO, Literal

import pathspec
from pathspec.patterns.gitignore.spec import GitIgnoreSpecPattern

from .chunker import is_document
from .documents import DEFAULT_LIMITS, Limits

log = logging.getLogger("memvidd.tree")

JUNK_DIRS = {
    ".git", ".hg", ".svn", ".jj", "node_modules", ".venv", "venv", "env", ".env", "__pycache__",
    ".mypy_cache", ".pytest_cache", ".ruff_cache", ".tox", ".nox", ".hypothesis", ".idea", ".vscode",
    "build", "dist", "target", ".next", ".cache", ".gradle", ".terraform", "site-packages", ".eggs",
}
_STAR = "[^/]*"  # pathspec's regex for ``*`` in a segment
_STARSTAR = "(?:/.+)?"  # ...and for an inner ``/**/``


class _LinearPattern(GitIgnoreSpecPattern):
    """A gitignore pattern as pathspec has it, matched in time linear in the path.

    pathspec's regexes backtrack polynomially: with k ``*`` in a segment (or k inner
    ``**``), a path that does not match is tried in O(n^k) ways (``*a*a*a*a*a*a*a*b``
    takes 26 s on a 60-character name), and a ``.gitignore`` comes from the watched tree.
    As Python's ``fnmatch`` does, each piece between two wildcards is matched at its first
    place, in an atomic group: exact for globs, where a piece matched earlier only leaves
    more room to what follows (a piece between ``*`` has a fixed length; one between
    ``**`` is whole segments, so it must end at a ``/``).
    """

    @staticmethod
    def _translate_segment_glob(pattern: str, range_error: Literal["literal", "raise"]) -> str:
        regex = GitIgnoreSpecPattern._translate_segment_glob(pattern, range_error)
        pieces = [_no_slash(piece) for piece in regex.split(_STAR)]
        if len(pieces) < 3:  # one `*` at most: nothing to try again
            return _STAR.join(pieces)
        first, *middle, last = pieces
        return first + "".join(f"(?>[^/]*?{m})" for m in middle) + _STAR + last

    @classmethod
    def pattern_to_regex(cls, pattern: str) -> tuple[str | None, bool | None]:  # type: ignore[override]
        regex, include = super().pattern_to_regex(pattern)
        if regex is None:  # a blank line or a comment
            return regex, include
        parts = regex.split(_STARSTAR)
        if len(parts) < 3:
            return regex, include
        first, *middle, last = parts
        return first + "".join(f"(?>(?:/.+?)??{m}(?=/))" for m in middle) + _STARSTAR + last, include


def _no_slash(regex: str) -> str:
    """A segment's regex with ``(?!/)`` before each bracket expression: in git none
    matches a ``/`` (pathspec lets ``[!a]`` match one, and then a piece could end in the
    next segment)."""
    out, i = [], 0
    while i < len(regex):
        if regex[i] == "\\":  # an escaped character (pathspec escapes every literal)
            out.append(regex[i : i + 2])
            i += 2
        elif regex[i] == "[":  # up to the first "]" after a leading "^" and "]" (as pathspec reads it)
            j = i + 1 + (regex[i + 1 : i + 2] == "^")
            j = regex.index("]", j + (regex[j : j + 1] == "]")) + 1
            out.append("(?!/)" + regex[i:j])
            i = j
        else:
            out.append(regex[i])
            i += 1
    return "".join(out)


def spec(lines: Iterable[str], *, source: str | None = None) -> pathspec.GitIgnoreSpec:
    """Gitignore-style patterns, matched in linear time. In a ``source`` (a .gitignore in
    the tree), a line that is no valid pattern is left out, as git leaves it out; in the
    configuration it is an error."""
    patterns = []
    for line in lines:
        try:
            patterns.append(_LinearPattern(line))
        except (ValueError, re.error) as e:
            if source is None:
                raise
            log.info("skip pattern=%r in %s: %s", line, source, e)
    # The plain ``re`` backend: the atomic groups above are Python's (re2 has none).
    return pathspec.GitIgnoreSpec(patterns, backend="simple")


JUNK_FILES = spec([
    "*.pyc", "*.pyo", "*.o", "*.so", "*.a", "*.dylib", "*.dll", "*.exe", "*.class", "*.jar",
    "*.swp", "*.swo", "*~", ".#*", "#*#", ".DS_Store", "*.mv2", "*.mv2e", "*.tmp",
    "*.png", "*.jpg", "*.jpeg", "*.gif", "*.webp", "*.ico", "*.zip", "*.gz", "*.tar",
    "*.xz", "*.zst", "*.7z", "*.woff", "*.woff2", "*.ttf", "*.mp3", "*.mp4", "*.mov", "*.sqlite",
    "*.db", "*.bin",
])

# Generated and vendored data: text a tool wrote for a tool, which nobody searches their
# memory for, and which crowds out what they do (a vendored tokenizer.json was 45% of a
# small tree's chunks). Skipped by default, each file listed with its reason in the stats;
# ``skip-generated = false`` in a capsule's configuration indexes them like any text.
# config.toml and the README list the same (tests/memvidd/test_generated.py checks it).
GENERATED = {
    "lock file": ["*.lock", "package-lock.json", "npm-shrinkwrap.json", "pnpm-lock.yaml", "bun.lockb", "go.sum",
                  "packages.lock.json", "conda-lock.yml"],
    "minified bundle": ["*.min.js", "*.min.mjs", "*.min.css"],
    "source map": ["*.js.map", "*.mjs.map", "*.cjs.map", "*.css.map"],
    "tokenizer or vocabulary": ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                                "vocab.json", "merges.txt", "*.tiktoken", "spiece.model", "sentencepiece.bpe.model"],
    "model weights": ["*.onnx", "*.safetensors", "*.gguf", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.tflite", "*.npy",
                      "*.npz"],
}
_GENERATED = [(why, spec(patterns)) for why, patterns in GENERATED.items()]
# JSON, CSV and TSV over this size are data, not notes. People's own such files (a
# package.json, editor settings, a small table) stay far below it: the largest of this
# repository and its virtualenv is 21 KB (a test fixture); above it are SBOMs, test
# vectors, tokenizers and exports (32 KB to 8 MB). 32 KiB is ~22 chunks of 1500 chars.
DATA = spec(["*.json", "*.jsonl", "*.ndjson", "*.csv", "*.tsv"])
DATA_MAX_BYTES = 32 << 10


def generated(rel: str, size: int | None = None) -> str | None:
    """Why the file at ``rel`` (its path under a root, with ``/``) is generated or
    vendored data, or None; by its name, and with ``size`` by its size too."""
    for why, patterns in _GENERATED:
        if patterns.match_file(rel):
            return why
    if size is not None and size > DATA_MAX_BYTES and DATA.match_file(rel):
        return f"data over {DATA_MAX_BYTES >> 10} KiB"
    return None


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO swapped in must not block the open (it is then refused, not read).
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
MAX_LINKS = 40  # symlinks followed on one path, as the kernel allows


class Moved(Exception):
    """The path no longer leads to the file that was vetted: replaced, or a symlink
    leading out of the root was swapped in."""


def is_binary(head: bytes) -> bool:
    """Like git: a NUL byte in the first 8 KB means binary."""
    return b"\0" in head[:8192]


class Tree:
    def __init__(self, root: str | Path, *, include: list[str] | None = None, exclude: list[str] | None = None,
                 max_bytes: int = 2 << 20, skip_generated: bool = True, documents: Limits = DEFAULT_LIMITS) -> None:
        self.root = Path(root).resolve()
        self.include = spec(include) if include else None
        self.exclude = spec(exclude or [])
        self.max_bytes = max_bytes
        self.documents = documents  # PDFs, office files, HTML: their own size and extraction budget
        self.skip_generated = skip_generated
        # Files passed over as generated data -> why (``generated``), for the stats. Kept
        # current by the checks below, ``forget`` (a file gone) and each full ``walk``.
        self.generated: dict[str, str] = {}
        self._gitignores: dict[Path, pathspec.GitIgnoreSpec | None] = {}
        self._reported: set[str] = set()

    def _skip(self, path: Path, why: str) -> None:
        key = str(path)
        if key not in self._reported:  # one logged reason per file
            self._reported.add(key)
            log.info("skip path=%s reason=%s", path, why)

    def _gitignore(self, directory: Path) -> pathspec.GitIgnoreSpec | None:
        if directory not in self._gitignores:
            path = directory / ".gitignore"
            try:
                # O_NONBLOCK: a FIFO called .gitignore must not hang the scan (it is no file).
                with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as f:
                    if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                        raise OSError(errno.EINVAL, "not a regular file")
                    lines = f.read(self.max_bytes).decode(errors="replace").splitlines()
                self._gitignores[directory] = spec(lines, source=str(path))
            except OSError:
                self._gitignores[directory] = None
        return self._gitignores[directory]

    def _passed_over(self, path: Path, why: str | None, *, record: bool = True) -> bool:
        """Is ``path`` skipped as generated data (``why``)? Remembered for the stats
        (``record``), and logged once."""
        if not record:
            return why is not None and self.skip_generated
        key = str(path)
        if why is None or not self.skip_generated:
            self.generated.pop(key, None)
            return False
        self.generated[key] = why
        self._skip(path, f"generated: {why}")
        return True

    def forget(self, path: Path) -> None:
        """``path`` is gone (a file, or a directory with what was under it)."""
        key = str(path)
        self.generated.pop(key, None)
        below = key + os.sep
        for gone in [k for k in list(self.generated) if k.startswith(below)]:  # list(): one atomic copy
            del self.generated[gone]

    def forget_gitignore(self, directory: Path) -> None:
        """A .gitignore changed: read it again next time."""
        self._gitignores.pop(directory, None)

    def _ignored(self, rel: Path, is_dir: bool, *, parents: bool = False) -> bool:
        """Do the .gitignore files from the root down to ``rel``'s directory exclude it
        (with ``parents``: it or a directory on its way)? As in git, a deeper file's
        verdict (an ignore or a ``!`` re-include) wins. One pass down the path, so that a
        deep tree costs its depth times the .gitignore files on the way (each directory
        asked apart cost its depth cubed: 172 s for a file 1,500 directories deep)."""
        parts = rel.parts
        posix = "/".join(parts)
        specs: list[tuple[int, pathspec.GitIgnoreSpec]] = []  # (where its directory's part starts, spec)
        directory, start = self.root, 0
        for k, part in enumerate(parts):
            here = self._gitignore(directory)
            if here is not None:
                specs.append((start, here))
            end = start + len(part)
            if parents or k == len(parts) - 1:
                sub = posix[:end] + ("/" if is_dir or k < len(parts) - 1 else "")
                ignored = False
                for at, ignore in specs:
                    verdict = ignore.check_file(sub[at:]).include
                    if verdict is not None:
                        ignored = verdict
                if ignored or k == len(parts) - 1:
                    return ignored
            directory, start = directory / part, end + 1
        return False

    def accepts(self, path: str | Path, *, log_skip: bool = True) -> bool:
        """Is ``path`` (absolute) a document of this root? Cheap checks first, no reads.
        ``log_skip``: a file passed over as generated is logged and listed (it exists)."""
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
        if self._ignored(rel, False, parents=True):
            return False
        return not self._passed_over(p, generated(posix), record=log_skip)

    def check_file(self, path: Path, st: os.stat_result) -> bool:
        """The checks that need a stat: regular file, inside the root, not too big."""
        if not stat.S_ISREG(st.st_mode):
            return False
        if st.st_size > self.max_bytes and not is_document(path.name):  # a document's own limit: the indexer's
            self._skip(path, f"larger than {self.max_bytes} bytes")
            return False
        return not self._passed_over(path, generated(path.name, st.st_size))

    def inside(self, path: Path) -> bool:
        """Does ``path`` resolve (through any symlinks) to somewhere under the root?"""
        try:
            real = path.resolve(strict=True)
        except (OSError, RuntimeError):
            return False
        return real == self.root or self.root in real.parents

    def open(self, path: Path, vetted: os.stat_result) -> BinaryIO:
        """Open the document ``path`` for reading if it is still the regular file
        ``vetted`` (its stat when it was accepted), else raise ``Moved``.

        A check of the path and then an ``open()`` of it would follow a symlink swapped in
        between the two (to another user's ``~/.git-credentials``). So the path is walked
        from the root one component at a time, each opened with ``O_NOFOLLOW`` relative
        to its parent's descriptor; a symlink met on the way is followed by hand while it
        stays under the root (as ``walk`` follows links inside the root) and refused when
        it leads out. The descriptor opened is the one that is read.
        """
        try:
            fd = self._open_beneath(list(path.relative_to(self.root).parts))
        except ValueError:
            raise Moved(f"{path} is not under {self.root}") from None
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):  # a link cycle, a directory become a file
                raise Moved(f"{path}: {e.strerror}") from e
            raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != (vetted.st_dev, vetted.st_ino):
                raise Moved(f"{path} is no longer the file that was vetted")
            return os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise

    def _open_beneath(self, todo: list[str]) -> int:
        """A descriptor of the root's ``todo`` components, never out of the root."""
        todo.reverse()  # the next component last
        where: list[str] = []  # the real directories (no links) from the root to ``fd``
        fd = self._descend(where)
        links = 0
        try:
            while todo:
                name = todo.pop()
                if name in ("", "."):
                    continue
                if name == "..":  # the real parent, as the kernel has it: ``where`` has no links
                    if not where:
                        raise Moved("a symlink leads out of the root")
                    where.pop()
                    os.close(fd)
                    fd = -1
                    fd = self._descend(where)
                    continue
                try:
                    nxt = os.open(name, _DIR_FLAGS if todo else _FILE_FLAGS, dir_fd=fd)
                except OSError as e:
                    if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    try:
                        target = os.readlink(name, dir_fd=fd)
                    except OSError:
                        raise e from None  # not a link: a file where a directory was
                    links += 1
                    if links > MAX_LINKS:
                        raise OSError(errno.ELOOP, "too many levels of symbolic links") from None
                    if os.path.isabs(target):
                        try:
                            rel = Path(target).relative_to(self.root)
                        except ValueError:
                            raise Moved("a symlink leads out of the root") from None
                        where = []
                        os.close(fd)
                        fd = -1
                        fd = self._descend(where)
                        todo.extend(reversed(rel.parts))
                    else:
                        todo.extend(reversed(Path(target).parts))
                    continue
                os.close(fd)
                fd = nxt
                if todo:
                    where.append(name)
            return fd
        except BaseException:
            if fd >= 0:
                os.close(fd)
            raise

    def _descend(self, names: list[str]) -> int:
        """A descriptor of the directory ``names`` under the root, opened without links."""
        fd = os.open(self.root, _DIR_FLAGS)
        try:
            for name in names:
                nxt = os.open(name, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = nxt
        except BaseException:
            os.close(fd)
            raise
        return fd

    def walk(self) -> Iterator[tuple[Path, os.stat_result]]:
        """Every document under the root with its stat, directory by directory."""
        self.generated.clear()  # what is passed over now is found again
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
