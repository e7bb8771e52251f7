"""A file's chunks, whatever it is: text chunked as it is, a document (PDF, DOCX, XLSX,
PPTX, HTML: ``chunker.DOCUMENTS``) first read by ``extract.py`` in a child process.

Why a child process, not a thread: a document comes from a tree another user may write
into, and its libraries are C (PDFium, libxml2) or build whole object trees (openpyxl).
In a child, a document that takes too long is stopped (the child is killed, whatever
loop it is in: a thread cannot be), one that takes too much memory fails alone (the
child's address space is capped), a crash of a library kills the child and not the
daemon, and two documents are read at once although PDFium allows one thread. Children
are kept between documents (importing openpyxl alone takes 0.43 s) and exit after
``extract.IDLE_S`` without work, or when the process that started them is gone.

Each chunk of a document carries where it is in its tags: ``page`` (PDF), ``slide``
(PPTX), ``sheet`` and ``rows`` (XLSX: every chunk starts with the sheet's header row, so
a row is never read without its column names). A chunk never crosses a page, a slide or
a sheet. A document that gives no text raises ``Unreadable`` with the reason a person
reads in the indexer's stats and log: encrypted, damaged, no text layer (a scan), larger
than its budget of bytes, characters, seconds or memory, its library missing.
"""

from __future__ import annotations

import atexit
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import msgspec

from . import extract
from .chunker import Chunk, ChunkTimeout, Document, chunk_document, file_kind, is_document
from .manifest import file_uri

__all__ = ["Limits", "Unreadable", "is_document", "put_items", "read_file"]

# Chunking time allowed per file: about 10x the worst linear case measured (~2.6 s/MB for
# a file of "#" lines), so that a loaded machine does not skip a file that is fine.
CHUNK_BUDGET_S = 2.0
CHUNK_BUDGET_S_PER_MB = 25.0
TITLE_MAX = 120


@dataclass(frozen=True)
class Limits:
    """What one document may cost (``[watcher]`` ``max-document-bytes``, ``document-budget-s``,
    ``document-memory-bytes``): its file's size, the time to extract its text, the address
    space of the child that does it, and the characters of text it may give."""

    max_bytes: int = 64 << 20
    seconds: float = 60.0
    memory_bytes: int = 1 << 30
    max_chars: int = 32 << 20

    def too_big(self, size: int) -> str | None:
        """Why a document of ``size`` bytes is not read at all, or None."""
        return f"larger than {self.max_bytes} bytes (watcher.max-document-bytes)" if size > self.max_bytes else None


DEFAULT_LIMITS = Limits()


class Unreadable(Exception):
    """A file yields no chunks although it has content; the message says why."""


def read_file(name: str, data: bytes, *, size: int = 1500, overlap: int = 150, budget_s: float | None = None,
              limits: Limits = DEFAULT_LIMITS) -> Document:
    """The chunks of the file called ``name`` holding ``data``. ``budget_s``: the time to
    chunk it (None: by its size); a document's extraction has ``limits``."""
    if budget_s is None:
        budget_s = CHUNK_BUDGET_S + CHUNK_BUDGET_S_PER_MB * len(data) / 1e6
    base = name.rsplit("/", 1)[-1]
    try:
        if not is_document(name):
            return chunk_document(name, data.decode("utf-8", errors="replace"), size=size, overlap=overlap,
                                  budget_s=budget_s)
        kind = file_kind(name)
        why = limits.too_big(len(data))
        if why is not None:
            raise Unreadable(why)
        reply = CHILDREN.extract(extract.Request(kind, data, limits.max_chars), limits)
        return _chunked(kind, base, reply, size, overlap, budget_s)
    except ChunkTimeout:
        raise Unreadable(f"took over {budget_s:.3g}s to chunk") from None


def _chunked(kind: str, base: str, reply: extract.Reply, size: int, overlap: int, budget_s: float) -> Document:
    """A document's sections as chunks, each tagged with where it is."""
    deadline = time.monotonic() + budget_s
    title = reply.title[:TITLE_MAX] or next(
        (ln.strip()[:TITLE_MAX] for s in reply.sections for ln in s.text.splitlines() if ln.strip()), base)
    chunks: list[Chunk] = []
    for s in reply.sections:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ChunkTimeout("chunking took longer than its budget")
        if s.header:
            chunks += _table_chunks(s, size)
            continue
        # A section's text as a markdown or a text file: headings make titles (DOCX, HTML).
        name = f"{base}.md" if s.markdown else f"{base}.txt"
        part = chunk_document(name, s.text, size=size, overlap=overlap, budget_s=left)
        for c in part.chunks:
            c.title = c.title if s.markdown and c.title != name else s.title or title  # name: no heading
            c.tags = dict(s.where)
        chunks += part.chunks
    return Document(kind, title, chunks)


def _table_chunks(s: extract.Section, size: int) -> list[Chunk]:
    """A sheet's rows in chunks of about ``size`` characters, each starting with the header
    row and tagged with its rows' first and last numbers (a row longer than ``size`` is
    cut in pieces, each under the header, each tagged with that row)."""
    out: list[Chunk] = []
    group: list[tuple[int, str]] = []
    used = len(s.header) + 1

    def close() -> None:
        first, last = group[0][0], group[-1][0]
        text = "\n".join([s.header, *(line for _, line in group)]) + "\n"
        out.append(Chunk(text, s.title, first, last, {**s.where, "rows": f"{first}-{last}"}))

    room = max(size - len(s.header) - 2, size // 2)  # the header, the piece, two newlines
    for number, whole in s.rows:
        for at in range(0, len(whole), room):
            line = whole[at : at + room]
            if group and used + len(line) + 1 > size:
                close()
                group, used = [], len(s.header) + 1
            group.append((number, line))
            used += len(line) + 1
    if group:
        close()
    elif not out:  # a header and nothing under it: still searchable
        n = s.header_row
        out.append(Chunk(s.header + "\n", s.title, n, n, {**s.where, "rows": f"{n}-{n}"}))
    return out


# -- the child processes -----------------------------------------------------------------


class _Child:
    """One extractor process, used by one caller at a time."""

    def __init__(self, memory_bytes: int) -> None:
        self.memory_bytes = memory_bytes
        # -P: the script's directory (memvidd/) is not put on sys.path, where its modules
        # would hide standard ones of the same names.
        # A session of its own: a Ctrl-C meant for the daemon is not the child's (it ends
        # when the daemon's end of its stdin closes).
        self.proc = subprocess.Popen([sys.executable, "-P", extract.__file__, str(memory_bytes)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._in, self._out = self.proc.stdin.fileno(), self.proc.stdout.fileno()
        os.set_blocking(self._in, False)
        os.set_blocking(self._out, False)
        self.idle_since = time.monotonic()

    def ask(self, message: bytes, deadline: float) -> bytes | None:
        """Send one framed request, return the reply's body; None if the child died
        (after it is reaped). ``TimeoutError`` at ``deadline``."""
        out = memoryview(len(message).to_bytes(4, "big") + message)
        got = bytearray()
        need = 0
        with selectors.DefaultSelector() as sel:
            sel.register(self._in, selectors.EVENT_WRITE)
            sel.register(self._out, selectors.EVENT_READ)
            while not need or len(got) < need:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                for key, _ in sel.select(left):
                    try:
                        if key.fd == self._in:
                            out = out[os.write(self._in, out[:1 << 20]):]
                            if not out:
                                sel.unregister(self._in)
                            continue
                        chunk = os.read(self._out, 1 << 20)
                    except BrokenPipeError:
                        chunk = b""
                    if not chunk:
                        self.proc.wait()
                        return None
                    got += chunk
                    if not need and len(got) >= 4:
                        need = 4 + int.from_bytes(got[:4], "big")
        return bytes(got[4:need])

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()


class Children:
    """The extractor processes of this process: an idle one is reused, else one is
    started; one idle for ``IDLE_S`` is ended rather than reused (its own clock ends it
    at ``extract.IDLE_S``, and the two never race)."""

    IDLE_S = extract.IDLE_S / 2
    KEEP = 4  # idle children kept at most

    def __init__(self) -> None:
        self._idle: list[_Child] = []
        self._lock = threading.Lock()
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(extract.Reply)

    def extract(self, req: extract.Request, limits: Limits) -> extract.Reply:
        """The reply of a child to ``req`` within ``limits``; ``Unreadable`` if it has no text."""
        child = self._take(limits.memory_bytes)
        deadline = time.monotonic() + limits.seconds
        try:
            body = child.ask(self._encoder.encode(req), deadline)
        except TimeoutError:
            child.kill()
            raise Unreadable(f"took over {limits.seconds:g}s to extract (watcher.document-budget-s)") from None
        except BaseException:
            child.kill()
            raise
        if body is None:
            code = child.proc.returncode
            child.kill()
            how = signal.Signals(-code).name if code < 0 and -code in signal.valid_signals() else f"status {code}"
            raise Unreadable(f"its extractor died ({how}): over the memory budget of "
                             f"{limits.memory_bytes >> 20} MiB, or a damaged file")
        reply = self._decoder.decode(body)
        if reply.error.startswith(extract.OVER_MEMORY):
            child.kill()  # it is ending: never handed another document
        else:
            self._give(child)
        if reply.error:
            raise Unreadable(reply.error)
        return reply

    def _take(self, memory_bytes: int) -> _Child:
        now = time.monotonic()
        with self._lock:
            stale = [c for c in self._idle if now - c.idle_since > self.IDLE_S or c.memory_bytes != memory_bytes
                     or c.proc.poll() is not None]
            self._idle = [c for c in self._idle if c not in stale]
            child = self._idle.pop() if self._idle else None
        for c in stale:
            c.kill()
        return child if child is not None else _Child(memory_bytes)

    def _give(self, child: _Child) -> None:
        child.idle_since = time.monotonic()
        with self._lock:
            if len(self._idle) < self.KEEP:
                self._idle.append(child)
                return
        child.kill()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for c in idle:
            c.kill()


CHILDREN = Children()
atexit.register(CHILDREN.close)  # idle children end with this process, their pipes closed


def put_items(path: str, data: bytes, *, uri: str | None = None, title: str | None = None,
              tags: dict[str, str] | None = None, **meta: Any) -> list[dict[str, Any]]:
    """``memvidd put --file`` of a document: one frame per chunk, tagged with where it is,
    at ``<uri>#<n>`` (``uri``: the file's ``file://`` URI unless given). ``Unreadable`` if
    it has no text."""
    doc = read_file(path, data)
    if not doc.chunks:
        raise Unreadable("no text")
    uri = uri if uri is not None else file_uri(os.path.abspath(path))
    return [{"text": c.text, "uri": f"{uri}#{i}", "title": title or c.title,
             "tags": {**(tags or {}), "type": doc.kind, **c.tags}, **meta} for i, c in enumerate(doc.chunks)]
