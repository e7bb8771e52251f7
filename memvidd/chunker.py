"""Cutting a file's text into chunks, by the shape of the file: pure functions, no I/O.

- Markdown: by headings (a chunk per section, its heading path as the chunk title);
  front matter (``---`` YAML-ish ``key: value`` lines) becomes tags.
- Source code: by top-level definitions (a line at column 0 that starts a def/class/fn/
  func/function/struct/impl/... or any unindented line after a blank one), falling back
  to line windows when a definition is too long.
- Plain text: by paragraphs.

Chunking takes time linear in the file's size, whatever the file holds: headings are
parsed by hand (a regex with nested optional whitespace backtracks cubically on a
``# x<3000 spaces>y`` line), no step rescans what an earlier step already looked at, and
titles are capped. A caller may still give a time budget (``budget_s``): past it,
``ChunkTimeout`` is raised, so a file that is too costly anyway is skipped, not waited for.

Every chunk stays under ``size`` characters (long blocks are cut into line windows with
``overlap`` characters repeated), and chunking is stable under local edits: an edit
changes the chunks it touches, not the ones after it, so unchanged chunks keep their
content hash and their embedding. Small neighbouring blocks share a chunk, and where
such a group ends is decided by the content of the blocks themselves (content-defined
anchors), never by a count from the top of the file.
"""

from __future__ import annotations

import hashlib
import math
import re
import time
from dataclasses import dataclass, field

MARKDOWN = {".md", ".markdown", ".mdx", ".rst"}
CODE = {
    ".py", ".pyi", ".rs", ".go", ".c", ".h", ".cc", ".cpp", ".hpp", ".java", ".kt", ".js", ".jsx",
    ".ts", ".tsx", ".rb", ".php", ".swift", ".scala", ".cs", ".sh", ".bash", ".zsh", ".lua", ".pl",
    ".sql", ".toml", ".yaml", ".yml", ".json", ".css", ".scss", ".xml", ".proto", ".el",
    ".ex", ".exs", ".erl", ".hs", ".ml", ".r", ".jl", ".dart", ".zig", ".nim", ".vue", ".svelte",
}
# Documents: their text is extracted first (``documents.py``), then chunked here.
DOCUMENTS = {".pdf": "pdf", ".docx": "docx", ".xlsx": "xlsx", ".xlsm": "xlsx", ".pptx": "pptx", ".html": "html",
             ".htm": "html", ".xhtml": "html"}
# The one regex here, matched once per unindented line: linear in the line's length, as
# each alternative of the repeated group starts with its own keyword (a failed match gives
# back each run of whitespace once, never re-splits it between iterations).
_DEF = re.compile(
    r"^(?:export\s+|pub(?:\(\w+\))?\s+|public\s+|private\s+|static\s+|async\s+|abstract\s+|final\s+)*"
    r"(?:def|class|fn|func|function|struct|enum|impl|trait|interface|type|module|object|"
    r"package|namespace|const|let|var|macro_rules!|template|@\w+)\b"
)
# Merging small chunks (_merge_small), as fractions of the merge limit (size // 2):
ANCHOR_SPACING = 1.0  # the mean distance between anchors (where a group must end)
MIN_FILL = 1 / 3  # a run cut for lack of room leaves its first group at least this full
SMALL = 0.25  # a chunk shorter than this joins the group before it, anchor or not, if it fits
TITLE_MAX = 120  # characters of a heading kept in a chunk title (a title is metadata, not text)
# Front matter becomes tags: within the capsule's limits on tags (docs/format.md [F-09],
# in bytes; a character is at most 4), so a careless file is indexed, not refused.
TAG_KEY_MAX = 64  # characters; a longer "key" is not a tag
TAG_VALUE_MAX = 1024  # characters kept of a value


class ChunkTimeout(Exception):
    """Chunking went on past its time budget."""


class _Deadline:
    """The end of a ``chunk_document`` call's budget, checked once per line or chunk."""

    __slots__ = ("at",)

    def __init__(self, budget_s: float | None) -> None:
        self.at = math.inf if budget_s is None else time.monotonic() + budget_s

    def check(self) -> None:
        if time.monotonic() > self.at:
            raise ChunkTimeout("chunking took longer than its budget")


@dataclass
class Chunk:
    text: str
    title: str
    start_line: int  # 1-based, inclusive
    end_line: int
    # Where a document's chunk is: {"page": "3"}, {"slide": "2"}, {"sheet": "Q1", "rows": "2-41"}.
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def identity(self) -> str:
        """What makes two chunks the same: the text and, in a document, where it is (a
        paragraph that moved to another page is another chunk, with the right page)."""
        return self.text + "".join(f"\0{k}={v}" for k, v in self.tags.items())


@dataclass
class Document:
    kind: str  # "markdown", "code", "text", or a document's format ("pdf", "docx", ...: DOCUMENTS)
    title: str
    chunks: list[Chunk]
    tags: dict[str, str] = field(default_factory=dict)


def file_kind(name: str) -> str:
    dot = name.rfind(".")
    ext = name[dot:].lower() if dot > 0 else ""
    if ext in DOCUMENTS:
        return DOCUMENTS[ext]
    if ext in MARKDOWN:
        return "markdown"
    if ext in CODE:
        return "code"
    return "text"


def is_document(name: str) -> bool:
    """Is a file called ``name`` a document, whose text is extracted before it is chunked?"""
    return file_kind(name) in DOCUMENTS.values()


def chunk_document(name: str, text: str, *, size: int = 1500, overlap: int = 150,
                   budget_s: float | None = None) -> Document:
    """The chunks of a file called ``name`` (a path or file name) holding ``text``.
    Raises ``ChunkTimeout`` if that takes more than ``budget_s`` seconds."""
    deadline = _Deadline(budget_s)
    kind = file_kind(name)
    overlap = min(overlap, size // 2)  # an overlap as big as a chunk would never advance
    base = name.rsplit("/", 1)[-1]
    lines = text.splitlines(keepends=True)
    tags: dict[str, str] = {}
    if kind == "markdown":
        body_start, tags = _front_matter(lines)
        sections = _markdown_sections(lines, body_start, deadline)
        title = next((t for t, _, _ in sections if t), base)
        chunks = [c for t, a, b in sections
                  for c in _windows(lines, a, b, t or title, size, overlap, deadline)]
    elif kind == "code":
        blocks = _code_blocks(lines, deadline)
        title = base
        chunks = [c for a, b in blocks
                  for c in _windows(lines, a, b, _block_title(lines[a], base), size, overlap, deadline)]
    else:
        title = next((ln.strip() for ln in lines if ln.strip()), base)[:TITLE_MAX]
        chunks = [c for a, b in _paragraphs(lines, deadline)
                  for c in _windows(lines, a, b, title, size, overlap, deadline)]
    return Document(kind, title, _merge_small(chunks, size, kind, deadline), tags)


def _front_matter(lines: list[str]) -> tuple[int, dict[str, str]]:
    if not lines or lines[0].strip() != "---":
        return 0, {}
    tags: dict[str, str] = {}
    for i in range(1, min(len(lines), 200)):
        line = lines[i].strip()
        if line in ("---", "..."):
            return i + 1, tags
        key, sep, value = line.partition(":")
        if sep and 0 < len(key.strip()) <= TAG_KEY_MAX and not key.startswith((" ", "#")):
            tags[key.strip()] = value.strip().strip("\"'")[:TAG_VALUE_MAX]
    return 0, {}  # no closing fence: not front matter


def _heading(line: str) -> tuple[int, str] | None:
    """(level, text) of an ATX heading (``## Title ##``), else None: ``#{1,6}``, then
    whitespace, the text, and optional closing ``#``s, in one pass over the line."""
    level = len(line) - len(line.lstrip("#"))
    if not 1 <= level <= 6 or level == len(line) or not line[level].isspace():
        return None
    return level, line[level:].strip().rstrip("#").rstrip()


def _markdown_sections(lines: list[str], start: int, deadline: _Deadline) -> list[tuple[str, int, int]]:
    """(heading path, first line index, end index) per section; fenced code is opaque."""
    out: list[tuple[str, int, int]] = []
    path: list[str] = []
    begin, title, fence = start, "", False
    for i in range(start, len(lines)):
        deadline.check()
        s = lines[i]
        if s.lstrip().startswith(("```", "~~~")):
            fence = not fence
        h = None if fence else _heading(s)
        if h:
            if i > begin and any(x.strip() for x in lines[begin:i]):
                out.append((title, begin, i))
            level, text = h
            path = path[: level - 1] + [text[:TITLE_MAX]]  # capped: a path joined per heading
            title, begin = " / ".join(path), i
    if any(x.strip() for x in lines[begin:]):
        out.append((title, begin, len(lines)))
    return out


def _code_blocks(lines: list[str], deadline: _Deadline) -> list[tuple[int, int]]:
    """Top-level definitions: a new block starts at an unindented definition line, or at
    an unindented line that follows a blank line (comments and decorators stay attached)."""
    starts = [0]
    preamble = 0  # lines[starts[-1]:preamble] are all preamble (each line looked at once)
    for i in range(1, len(lines)):
        deadline.check()
        s = lines[i]
        if not s.strip() or s[0] in " \t}])":
            continue
        prev_blank = not lines[i - 1].strip()
        if _DEF.match(s) or prev_blank:
            while preamble < i and _is_preamble(lines[preamble]):
                preamble += 1
            if preamble == i:
                continue  # the block so far is only comments/decorators: they belong to this def
            # Attach the comments/decorators right above it to this block.
            j = i
            while j - 1 > starts[-1] and lines[j - 1].strip() and _is_preamble(lines[j - 1]):
                j -= 1
            if j > starts[-1]:
                starts.append(j)
                preamble = j
    return [(a, b) for a, b in zip(starts, [*starts[1:], len(lines)], strict=True)
            if any(x.strip() for x in lines[a:b])]


PREAMBLE_MARKS = ("#", "//", "@", "/*", "*", "--", ";")  # comment and decorator starts


def _is_preamble(line: str) -> bool:
    """An unindented comment or decorator line, or a blank one."""
    return not line.strip() or (line[0] not in " \t" and line.lstrip().startswith(PREAMBLE_MARKS))


def _block_title(first: str, base: str) -> str:
    head = first.strip()
    return f"{base}: {head[:80]}" if head else base


def _paragraphs(lines: list[str], deadline: _Deadline) -> list[tuple[int, int]]:
    out, begin = [], None
    for i, s in enumerate(lines):
        deadline.check()
        if s.strip():
            if begin is None:
                begin = i
        elif begin is not None:
            out.append((begin, i))
            begin = None
    if begin is not None:
        out.append((begin, len(lines)))
    return out


def _windows(lines: list[str], a: int, b: int, title: str, size: int, overlap: int,
             deadline: _Deadline) -> list[Chunk]:
    """Lines a..b as one chunk, or as line windows of at most ``size`` characters."""
    text = "".join(lines[a:b])
    if len(text) <= size:
        return [Chunk(text, title, a + 1, b)]
    out, i = [], a
    while i < b:
        deadline.check()
        n, j = 0, i
        while j < b and (n + len(lines[j]) <= size or j == i):
            n += len(lines[j])
            j += 1
        piece = "".join(lines[i:j])
        if len(piece) > size:  # one enormous line: cut it by characters
            for k in range(0, len(piece), size - overlap):
                out.append(Chunk(piece[k : k + size], title, i + 1, i + 1))
        else:
            out.append(Chunk(piece, title, i + 1, j))
        if j >= b:
            break
        back, m = 0, j  # step back over up to `overlap` characters of whole lines
        while m - 1 > i and back + len(lines[m - 1]) <= overlap:
            m -= 1
            back += len(lines[m])
        i = m
    return out


def _merge_small(chunks: list[Chunk], size: int, kind: str, deadline: _Deadline) -> list[Chunk]:
    """Join runs of tiny neighbouring chunks (imports, one-line constants) up to ``size``/2:
    a chunk should carry enough text to be worth an embedding.

    Where a group ends is decided by the content of the blocks around the cut, never by
    a count from the top of the file, so that an edit moves group boundaries only near
    itself:

    - a group ends after an *anchor*: a block whose score (``_score``: a hash of its first
      significant line, weighted by its length) is high, about one every ``ANCHOR_SPACING``
      limits of text;
    - a run without an anchor that does not fit is cut after its highest-scoring block
      that leaves the group at least ``MIN_FILL`` full (not after the last block that
      fits, which would shift every later cut of the run);
    - a chunk shorter than ``SMALL`` of the limit that could share a chunk with neither
      neighbour otherwise (a trailing ``if __name__ == "__main__":``) joins the group
      before it even after an anchor.

    An edit that keeps a block's first line and length moves no boundary. On the CPython
    stdlib, more than 2 chunks change for about 0.2% of single-definition edits (packing
    greedily from the top: 1-3%), for a mean chunk size 4% smaller.
    """
    limit = size // 2
    scores = [_score(c.text, kind) for c in chunks]
    anchor = [len(c.text) >= limit or sc >= ANCHOR_SPACING * limit for c, sc in zip(chunks, scores, strict=True)]
    out: list[Chunk] = []
    closing = False  # out[-1] ended at an anchor
    i, n = 0, len(chunks)
    while i < n:
        deadline.check()
        c = chunks[i]
        if closing and _fits(out[-1], c, limit - len(out[-1].text)) and len(c.text) < SMALL * limit and (
                i + 1 == n or not _fits(c, chunks[i + 1], limit - len(c.text))):
            out[-1] = _joined([out[-1], c])  # a stray small chunk: not left alone
            i += 1
            continue
        j, total = i + 1, len(c.text)  # the group is chunks[i:j]
        while not anchor[j - 1] and j < n and _fits(chunks[j - 1], chunks[j], limit - total):
            total += len(chunks[j].text)
            j += 1
        closing = anchor[j - 1]
        if not closing and j < n and j - i > 1 and _fits(chunks[j - 1], chunks[j], limit):
            # The run goes on past the limit: cut where the content says, not at the end.
            best, filled = -1.0, 0
            for m in range(i, j):
                filled += len(chunks[m].text)
                if filled >= MIN_FILL * limit and scores[m] > best:
                    best, cut = scores[m], m + 1
            if best >= 0:
                j = cut
        out.append(_joined(chunks[i:j]))
        i = j
    return out


def _fits(a: Chunk, b: Chunk, room: int) -> bool:
    """Can ``b`` follow ``a`` (its neighbour, no gap between) in ``room`` characters?"""
    return a.end_line + 1 >= b.start_line and len(b.text) <= room


def _joined(group: list[Chunk]) -> Chunk:
    if len(group) == 1:
        return group[0]
    return Chunk("".join(c.text for c in group), group[0].title, group[0].start_line, group[-1].end_line)


def _score(text: str, kind: str) -> float:
    """How strongly a block ends a group: its length over a pseudo-random number in (0, 1]
    drawn from its first significant line (a definition's signature, a heading, a
    paragraph's first line), so that editing a body hardly changes it. A block scoring
    over ``ANCHOR_SPACING * limit`` is an anchor: as likely as it is long, so anchors fall
    about every ``ANCHOR_SPACING * limit`` characters and runs of tiny blocks still fill
    their chunks."""
    key = _anchor_key(text, kind).encode("utf-8", "surrogateescape")
    h = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big")
    return len(text) * 2.0**64 / (h + 1)


def _anchor_key(text: str, kind: str) -> str:
    first = ""
    for line in text.splitlines():
        s = line.strip()
        if not s:
            continue
        if not first:
            first = s
        if kind != "code" or not _is_preamble(line):
            return s
    return first
