"""Reading the text out of documents, one function per format, in a child process.

``documents.py`` runs this file as a script (``python -P extract.py MEMORY_BYTES``), keeps
it for the documents that follow, and kills it when one takes longer than its budget. It
imports nothing of memvidd (so it runs whatever the daemon's working directory and
``sys.path``), caps its own address space at ``MEMORY_BYTES`` and reads, on stdin, framed
``Request`` messages (a 4-byte big-endian length, then msgpack); it answers each on stdout
with a ``Reply``: the document's ``Section`` list, or why it has no text (``error``).

The libraries, each chosen by measurement (docs/ARCHITECTURE.md, "Documents"):

- PDF: pypdfium2 (PDFium, Chrome's PDF engine), a section per page with its number.
  PDFium does not run under more than one thread at a time: a child process each is
  what lets two documents be read at once.
- DOCX: python-docx, as markdown (headings by their style, tables as rows), in order.
- XLSX: openpyxl (read-only, cached values), a table per sheet: its first non-empty row
  is the header, each other row a line with its row number.
- PPTX: python-pptx, a section per slide (titles, text frames, tables, notes).
- HTML: BeautifulSoup (lxml) and markdownify: markdown, so headings make sections.
"""

from __future__ import annotations

import datetime as dt
import gc
import io
import logging
import os
import re
import resource
import select
import sys
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import msgspec

IDLE_S = 120.0  # a child with no work for this long exits (the parent starts another when needed)
OVER_MEMORY = "over the memory budget"  # a reply whose error starts so: the child exits after it
# OLE2 (compound file) signature: how an encrypted DOCX/XLSX/PPTX is stored (an
# ``EncryptionInfo`` stream beside the encrypted package), or a legacy .doc/.xls/.ppt.
OLE2 = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
ENCRYPTION_INFO = "EncryptionInfo".encode("utf-16-le")
# What PDFium puts in extracted text that is not text: \x02 marks a word hyphenated at
# a line end (the halves are joined), \r\n ends lines; other controls are dropped.
_PDF_CONTROLS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


class Request(msgspec.Struct, array_like=True):
    kind: str  # "pdf", "docx", "xlsx", "pptx", "html"
    data: bytes
    max_chars: int  # more text than this: the document is refused as too big


class Section(msgspec.Struct, array_like=True):
    """A part of a document that a chunk never crosses: a page, a slide, a sheet, or the
    whole text of a DOCX or HTML file."""

    text: str  # plain text, or markdown (``markdown``); "" for a table
    where: dict[str, str]  # where it is: {"page": "3"}, {"slide": "2"}, {"sheet": "Q1"}, {}
    title: str = ""
    markdown: bool = False
    header: str = ""  # a table: its header row, repeated atop each of its chunks...
    header_row: int = 0  # ...and that row's number
    rows: list[tuple[int, str]] = []  # a table: (row number, the row as one line), in order


class Reply(msgspec.Struct, array_like=True):
    sections: list[Section] = []
    title: str = ""  # the document's own title (PDF metadata, HTML <title>, DOCX core properties)
    error: str = ""  # why it has no text: the skip reason a person reads


class Unreadable(Exception):
    """The document has no text to give, and the message says why."""


class _Budget:
    """Counts the characters extracted; past ``max_chars`` the document is too big."""

    def __init__(self, max_chars: int) -> None:
        self.left = max_chars
        self.max_chars = max_chars

    def take(self, text: str) -> str:
        self.left -= len(text)
        if self.left < 0:
            raise Unreadable(f"more than {self.max_chars} characters of text")
        return text


# -- the formats -------------------------------------------------------------------------


def pdf(data: bytes, budget: _Budget) -> Reply:
    import pypdfium2 as pdfium

    try:
        doc = pdfium.PdfDocument(data)
    except pdfium.PdfiumError as e:
        if getattr(e, "err_code", None) == 4:  # FPDF_ERR_PASSWORD
            raise Unreadable("encrypted: needs a password") from None
        raise Unreadable(f"damaged PDF: {e}") from None
    try:
        pages = len(doc)
        sections = []
        for i in range(pages):
            page = doc[i]
            textpage = page.get_textpage()
            try:
                raw = textpage.get_text_range()
            finally:
                textpage.close()
                page.close()
            text = _PDF_CONTROLS.sub("", raw.replace("\x02", "").replace("\r\n", "\n").replace("\r", "\n"))
            if text.strip():
                sections.append(Section(budget.take(text), {"page": str(i + 1)}))
        title = (doc.get_metadata_dict().get("Title") or "").strip()
    finally:
        doc.close()
    if not sections:
        raise Unreadable(f"no text layer in its {pages} pages (a scan? memvidd does no OCR)" if pages
                         else "damaged PDF: no pages")
    return Reply(sections, title="" if title.lower() == "untitled" else title)  # reportlab's default


def _office(data: bytes, what: str) -> io.BytesIO:
    """``data`` as a file to open, or ``Unreadable`` if it is encrypted or no OOXML package."""
    if data.startswith(OLE2):
        if ENCRYPTION_INFO in data:
            raise Unreadable("encrypted: needs a password")
        raise Unreadable(f"not a {what} package (an older binary Office file renamed?)")
    if not zipfile.is_zipfile(io.BytesIO(data)):
        raise Unreadable(f"damaged {what}: not a zip package")
    return io.BytesIO(data)


def docx(data: bytes, budget: _Budget) -> Reply:
    import docx as python_docx
    from docx.table import Table

    doc = python_docx.Document(_office(data, "DOCX"))
    lines = []
    for block in doc.iter_inner_content():
        if isinstance(block, Table):
            for row in block.rows:
                cells = _dedup(c.text.strip() for c in row.cells)  # a merged cell repeats
                if any(cells):
                    lines.append(budget.take(" | ".join(cells)))
            lines.append("")
            continue
        text = block.text.strip()
        if not text:
            continue
        style = (block.style.name if block.style is not None else "") or ""
        level = 1 if style == "Title" else int(style[8:]) if re.fullmatch(r"Heading [1-6]", style) else 0
        prefix = "#" * level + " " if level else "- " if style.startswith("List") else ""
        lines.append(budget.take(prefix + text))
        lines.append("")
    title = (doc.core_properties.title or "").strip()
    return Reply([Section("\n".join(lines), {}, markdown=True)] if lines else [], title=title)


def _dedup(cells: Iterable[str]) -> list[str]:
    out: list[str] = []
    for c in cells:
        if not out or c != out[-1]:
            out.append(c)
    return out


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, dt.datetime):
        return value.isoformat(sep=" ").removesuffix(" 00:00:00")
    return str(value).replace("\n", " ").strip()


def xlsx(data: bytes, budget: _Budget) -> Reply:
    import openpyxl

    book = openpyxl.load_workbook(_office(data, "XLSX"), read_only=True, data_only=True)
    try:
        sections = []
        for sheet in book.worksheets:
            sheet.reset_dimensions()  # the stored size may be wrong (some writers say A1): read every row
            header: tuple[int, str] | None = None
            rows: list[tuple[int, str]] = []
            for number, values in enumerate(sheet.iter_rows(min_row=1, values_only=True), 1):
                cells = [_cell(v) for v in values]
                while cells and not cells[-1]:
                    cells.pop()
                if not cells:
                    continue
                line = budget.take(" | ".join(cells))
                if header is None:
                    header = (number, line)
                else:
                    rows.append((number, line))
            if header is not None:
                sections.append(Section("", {"sheet": sheet.title}, title=sheet.title, header=header[1],
                                        header_row=header[0], rows=rows))
        title = (book.properties.title or "").strip()
    finally:
        book.close()
    return Reply(sections, title=title)


def pptx(data: bytes, budget: _Budget) -> Reply:
    import pptx as python_pptx

    deck = python_pptx.Presentation(_office(data, "PPTX"))
    sections = []
    for number, slide in enumerate(deck.slides, 1):
        title_shape = slide.shapes.title
        title = title_shape.text_frame.text.strip() if title_shape is not None and title_shape.has_text_frame else ""
        parts = [t for t in _shape_texts(slide.shapes) if t]
        if slide.has_notes_slide and slide.notes_slide.notes_text_frame is not None:
            notes = slide.notes_slide.notes_text_frame.text.strip()
            if notes:
                parts.append(f"Notes: {notes}")
        text = "\n\n".join(parts)
        if text.strip():
            sections.append(Section(budget.take(text), {"slide": str(number)}, title=title))
    return Reply(sections, title=(deck.core_properties.title or "").strip())


def _shape_texts(shapes: Any) -> Iterator[str]:
    from pptx.shapes.group import GroupShape

    for shape in shapes:
        if isinstance(shape, GroupShape):
            yield from _shape_texts(shape.shapes)
        elif getattr(shape, "has_table", False) and shape.has_table:
            yield "\n".join(" | ".join(_dedup(c.text.strip() for c in row.cells)) for row in shape.table.rows)
        elif shape.has_text_frame:
            yield shape.text_frame.text.strip()


def html(data: bytes, budget: _Budget) -> Reply:
    from bs4 import BeautifulSoup
    from markdownify import MarkdownConverter

    soup = BeautifulSoup(data, "lxml")
    title = soup.title.get_text().strip() if soup.title is not None else ""
    for tag in soup(["script", "style", "noscript", "template", "head"]):
        tag.decompose()
    # Links and emphasis as their text: snippets without markup.
    text = MarkdownConverter(heading_style="ATX", strip=["a", "img", "b", "strong", "i", "em"]).convert_soup(soup)
    text = re.sub(r"\n{3,}", "\n\n", text).strip()
    return Reply([Section(budget.take(text), {}, markdown=True)] if text else [], title=title)


FORMATS: dict[str, Callable[[bytes, _Budget], Reply]] = {
    "pdf": pdf, "docx": docx, "xlsx": xlsx, "pptx": pptx, "html": html,
}
LIBRARIES = {"pdf": "pypdfium2", "docx": "python-docx", "xlsx": "openpyxl", "pptx": "python-pptx",
             "html": "beautifulsoup4, lxml and markdownify"}


def extract(req: Request, memory_bytes: int = 0) -> Reply:
    """The text of one document, or the reason it has none (never an exception)."""
    what = req.kind.upper()
    try:
        return FORMATS[req.kind](req.data, _Budget(req.max_chars))
    except Unreadable as e:
        return Reply(error=str(e))
    except MemoryError:
        return Reply(error=f"{OVER_MEMORY} of {memory_bytes >> 20} MiB")
    except ImportError as e:
        return Reply(error=f"cannot read {what}: {e.name or LIBRARIES[req.kind]} is not installed "
                           f"(memvidd needs {LIBRARIES[req.kind]})")
    except RecursionError:
        return Reply(error=f"damaged {what}: nested too deeply")
    except Exception as e:  # a library's own error on a broken file: say which
        return Reply(error=f"damaged {what}: {type(e).__name__}: {e}"[:300])


# -- the child process -------------------------------------------------------------------


def _read_exact(fd: int, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = os.read(fd, min(n - len(buf), 1 << 20))
        if not chunk:
            return None  # the parent is gone
        buf += chunk
    return bytes(buf)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def main(argv: list[str]) -> int:
    memory_bytes = int(argv[1]) if len(argv) > 1 else 0
    if memory_bytes:
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    warnings.simplefilter("ignore")  # libraries' remarks on odd files are no news for the daemon's log
    logging.disable(logging.CRITICAL)
    # No cycle collection while a document is read: with a tree of millions of objects
    # (BeautifulSoup's) it ran again and again, and reading took time superlinear in the
    # size (2 MB of HTML: 4.2 s, against 1.8 s without). One collection after each.
    gc.disable()
    decoder, encoder = msgspec.msgpack.Decoder(Request), msgspec.msgpack.Encoder()
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    while True:
        ready, _, _ = select.select([stdin], [], [], IDLE_S)
        if not ready:
            return 0
        head = _read_exact(stdin, 4)
        body = _read_exact(stdin, int.from_bytes(head, "big")) if head is not None else None
        if body is None:
            return 0
        reply = extract(decoder.decode(body), memory_bytes)
        out = encoder.encode(reply)
        _write_all(stdout, len(out).to_bytes(4, "big") + out)
        if reply.error.startswith(OVER_MEMORY):
            return 0  # its heap may be in pieces: the next document gets a fresh child
        del reply, out, body
        gc.collect()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
