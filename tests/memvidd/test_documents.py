"""Documents (PDF, DOCX, XLSX, PPTX, HTML): their text read in a child process within its
budgets, chunked with where each chunk is (page, slide, sheet and rows), the documents
that give no text skipped with a reason a person reads; in ``read_file``, in a real
daemon watching a folder of them, and in ``memvidd put --file``.

Every document is made here, by the library that writes its format (reportlab for PDFs).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import docx
import msgspec
import openpyxl
import pptx
import pytest
from daemon_util import DaemonProc
from test_watcher import mkroot, until, watching, write
from reportlab.lib import pdfencrypt
from reportlab.pdfgen import canvas

from memvidd import documents
from memvidd.client import Client
from memvidd.documents import Limits, Unreadable, read_file
from memvidd.ingest import file_uri
from memvidd.protocol import HitOut

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]


# -- documents, made here --------------------------------------------------------------------


def pdf(pages: list[str], *, password: str | None = None, pad: int = 0) -> bytes:
    """A PDF with a page per text (each line of it a line on the page); ``password``: the
    user password it is encrypted with; ``pad``: bytes of comment after its end."""
    buf = io.BytesIO()
    enc = pdfencrypt.StandardEncryption(password) if password is not None else None
    c = canvas.Canvas(buf, encrypt=enc)
    for text in pages:
        for i, line in enumerate(text.splitlines()):
            c.drawString(72, 760 - 14 * i, line)
        c.showPage()
    c.save()
    return buf.getvalue() + (b"\n%" + b"x" * pad + b"\n" if pad else b"")


def scanned_pdf() -> bytes:
    """Two pages of drawing and no text: what a scan without OCR looks like to a reader."""
    buf = io.BytesIO()
    c = canvas.Canvas(buf)
    for _ in range(2):
        c.rect(72, 72, 300, 500, fill=1)
        c.line(72, 600, 400, 700)
        c.showPage()
    c.save()
    return buf.getvalue()


def docx_file() -> bytes:
    d = docx.Document()
    d.core_properties.title = "Field notes"
    d.add_heading("Expedition", 1)
    d.add_paragraph("We saw a quokka near the ridge.")
    d.add_heading("Supplies", 2)
    table = d.add_table(rows=2, cols=2)
    table.cell(0, 0).text, table.cell(0, 1).text = "item", "count"
    table.cell(1, 0).text, table.cell(1, 1).text = "lanterns", "12"
    buf = io.BytesIO()
    d.save(buf)
    return buf.getvalue()


def xlsx_file(rows: int = 300) -> bytes:
    book = openpyxl.Workbook()
    sheet = book.active
    sheet.title = "Inventory"
    sheet.append(["region", "product", "units"])
    for i in range(2, rows + 2):
        sheet.append([f"region{i}", f"gadget{i}", i * 3])
    other = book.create_sheet("Notes")
    other.append(["topic"])
    other.append(["axolotl husbandry"])
    long = book.create_sheet("Long")
    long["A3"], long["B3"] = "key", "essay"  # the header need not be row 1
    long["A4"], long["B4"] = "k1", "tapir " * 1000
    lonely = book.create_sheet("Lonely")
    lonely["B2"] = "only a header: quetzal"
    buf = io.BytesIO()
    book.save(buf)
    return buf.getvalue()


def pptx_file() -> bytes:
    deck = pptx.Presentation()
    for title, body in [("Welcome", "opening remarks"), ("Roadmap", "the narwhal milestone ships in spring"),
                        ("Thanks", "questions")]:
        slide = deck.slides.add_slide(deck.slide_layouts[1])
        slide.shapes.title.text = title
        slide.placeholders[1].text = body
    buf = io.BytesIO()
    deck.save(buf)
    return buf.getvalue()


HTML = b"""<html><head><title>Garden log</title><style>p {color: red}</style>
<script>var secret = "never indexed";</script></head>
<body><h1>Garden</h1><p>The <b>kohlrabi</b> came up <a href="x">early</a>.</p>
<h2>Pests</h2><p>Aphids on the roses.</p></body></html>"""

PAGES = ["Quarterly report\nrevenue grew in the north", "Second page\nthe platypus project started",
         "Third page\nclosing words about wombats"]


def where(doc: documents.Document, word: str) -> list[dict[str, str]]:
    return [c.tags for c in doc.chunks if word in c.text]


# -- read_file ---------------------------------------------------------------------------------


def test_a_pdf_is_read_a_page_at_a_time_and_each_chunk_knows_its_page():
    doc = read_file("r/report.pdf", pdf(PAGES))
    assert doc.kind == "pdf" and doc.title == "Quarterly report"
    assert where(doc, "revenue") == [{"page": "1"}]
    assert where(doc, "platypus") == [{"page": "2"}]
    assert where(doc, "wombats") == [{"page": "3"}]


def test_a_sheet_is_a_table_whose_chunks_each_start_with_its_header():
    doc = read_file("inventory.xlsx", xlsx_file(300), size=400)
    inventory = [c for c in doc.chunks if c.tags["sheet"] == "Inventory"]
    assert len(inventory) > 5
    covered = []
    for c in inventory:
        lines = c.text.splitlines()
        assert lines[0] == "region | product | units", "every chunk repeats the header row"
        first, last = map(int, c.tags["rows"].split("-"))
        assert lines[1].startswith(f"region{first} |") and lines[-1].startswith(f"region{last} |")
        covered += range(first, last + 1)
    assert covered == list(range(2, 302)), "every row once, in order, with its own number"
    assert where(doc, "gadget150 ") == [{"sheet": "Inventory", "rows": next(c.tags["rows"] for c in inventory
                                                                            if "gadget150 " in c.text)}]
    assert where(doc, "axolotl") == [{"sheet": "Notes", "rows": "2-2"}]
    long = [c for c in doc.chunks if c.tags["sheet"] == "Long"]
    assert len(long) > 10 and all(c.tags["rows"] == "4-4" and c.text.startswith("key | essay\n") for c in long)
    assert max(len(c.text) for c in long) <= 400, "a long row is cut, each piece under the header"
    assert "".join(c.text.split("\n", 1)[1].rstrip("\n") for c in long) == "k1 | " + ("tapir " * 1000).strip()
    assert where(doc, "quetzal") == [{"sheet": "Lonely", "rows": "2-2"}]


def test_slides_docx_and_html_are_read_with_their_structure():
    deck = read_file("talk.pptx", pptx_file())
    assert where(deck, "narwhal") == [{"slide": "2"}]
    assert next(c.title for c in deck.chunks if "narwhal" in c.text) == "Roadmap"

    notes = read_file("notes.docx", docx_file())
    assert notes.title == "Field notes"
    text = "".join(c.text for c in notes.chunks)
    assert "# Expedition" in text and "quokka" in text and "lanterns | 12" in text
    assert next(c.title for c in notes.chunks if "lanterns" in c.text) == "Expedition", "headings make titles"

    page = read_file("log.html", HTML)
    assert page.title == "Garden log"
    text = "".join(c.text for c in page.chunks)
    assert "The kohlrabi came up early." in text and "## Pests" in text
    assert "secret" not in text and "color" not in text, "scripts and styles are no text"


def test_documents_without_text_say_why():
    reasons = {}
    for name, data, limits in [
        ("locked.pdf", pdf(["top secret"], password="hunter2"), None),
        ("broken.pdf", b"%PDF-1.7\n" + os.urandom(2000), None),
        ("scan.pdf", scanned_pdf(), None),
        ("huge.pdf", pdf(PAGES, pad=5000), Limits(max_bytes=4000)),
        ("wordy.pdf", pdf(PAGES), Limits(max_chars=40)),
        ("broken.docx", b"PK\x03\x04 not really a zip", None),
        ("old.xlsx", b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\0" * 600, None),
    ]:
        with pytest.raises(Unreadable) as e:
            read_file(name, data, **({"limits": limits} if limits else {}))
        reasons[name] = str(e.value)
    assert reasons["locked.pdf"] == "encrypted: needs a password"
    assert reasons["broken.pdf"].startswith("damaged PDF")
    assert reasons["scan.pdf"] == "no text layer in its 2 pages (a scan? memvidd does no OCR)"
    assert reasons["huge.pdf"] == "larger than 4000 bytes (watcher.max-document-bytes)"
    assert reasons["wordy.pdf"] == "more than 40 characters of text"
    assert reasons["broken.docx"] == "damaged DOCX: not a zip package"
    assert reasons["old.xlsx"].startswith("not a XLSX package")


def big_html(mb: int) -> bytes:
    return b"<html><body>" + b"<div><p>word <b>bold</b> text</p></div>\n" * (mb * 25_000) + b"</body></html>"


def test_a_document_over_its_time_or_memory_budget_is_stopped_and_the_next_one_is_read():
    slow = big_html(8)  # ~8 s to read on this machine: 16x the budget below
    t0 = time.monotonic()
    with pytest.raises(Unreadable, match=r"^took over 0.5s to extract \(watcher.document-budget-s\)$"):
        read_file("big.html", slow, limits=Limits(seconds=0.5))
    assert time.monotonic() - t0 < 5, "the child is killed at the deadline, not waited for"
    with pytest.raises(Unreadable, match="memory budget of 256 MiB"):
        read_file("big.html", slow, limits=Limits(seconds=100, memory_bytes=256 << 20))
    assert [c.text for c in read_file("small.html", b"<p>still here</p>").chunks] == ["still here"]


def test_children_are_reused_and_ended_when_idle():
    kids = documents.Children()
    first = kids._take(1 << 30)
    kids._give(first)
    assert kids._take(1 << 30) is first, "an idle child is reused (its imports are paid once)"
    kids._give(first)
    first.idle_since -= kids.IDLE_S + 1
    second = kids._take(1 << 30)
    assert second is not first and first.proc.returncode is not None, "one idle too long is ended, not used"
    second.kill()
    kids.close()


def test_a_child_ends_when_its_parent_is_gone(tmp_path):
    """The daemon killed with -9 leaves no extractor behind: the child sees its stdin close."""
    code = ("import sys; from memvidd.documents import CHILDREN, Limits, read_file; "
            "read_file('a.pdf', open(sys.argv[1], 'rb').read()); "
            "print(CHILDREN._idle[0].proc.pid, flush=True); sys.stdin.read()")
    (tmp_path / "a.pdf").write_bytes(pdf(PAGES))
    with subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "a.pdf")], cwd=ROOT,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE) as parent:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        parent.kill()
    deadline = time.monotonic() + 30
    while Path(f"/proc/{child}").exists() and "Z" not in Path(f"/proc/{child}/stat").read_text().split()[2]:
        assert time.monotonic() < deadline, "the extractor outlived its parent"
        time.sleep(0.05)


def test_a_hit_carries_its_documents_location_from_the_tags():
    base = dict(frame_id=1, uri="file:///r.pdf#k", title="t", score=1.0, snippet="s", highlights=[], kind="chunk",
                timestamp=0.0, commit_seq=1, valid_until=None, sources=["lex"])
    hit = HitOut.of({**base, "tags": {"page": "3", "type": "pdf"}})
    assert (hit.page, hit.location()) == (3, "p.3")
    hit = HitOut.of({**base, "tags": {"sheet": "Q1", "rows": "2-41"}})
    assert (hit.sheet, hit.rows, hit.location()) == ("Q1", (2, 41), "Q1 rows 2-41")
    assert HitOut.of({**base, "tags": {"slide": "2"}}).location() == "slide 2"
    odd = HitOut.of({**base, "tags": {"page": "three"}})  # a tag someone put: left a tag
    assert odd.page is msgspec.UNSET and odd.location() == "" and odd.tags == {"page": "three"}


# -- the indexer -----------------------------------------------------------------------------


@pytest.mark.trio
async def test_a_page_inserted_in_a_watched_pdf_moves_the_pages_of_the_text_after_it(tmp_path):
    """Where a chunk is belongs to what it is: the same paragraph on another page is a new
    chunk with the right page, and no chunk is left with its old one."""
    root = mkroot(tmp_path)
    report = write(root / "report.pdf", pdf(PAGES))
    async with watching(tmp_path, root) as ix:
        cap = ix.svc.cap

        def pages(word: str) -> list[str]:
            return sorted(h.tags.get("page", "") for h in cap.find(word, mode="lex", k=20)
                          if word in cap.get(h.frame_id).text)

        await until(lambda: pages("platypus") == ["2"], what="the report indexed", ix=ix)
        assert cap.get(uri=file_uri(report)).tags["type"] == "pdf"
        write(report, pdf(["A new first page about a pangolin", *PAGES]))
        await until(lambda: pages("pangolin") == ["1"], what="the new page", ix=ix)
        await until(lambda: pages("platypus") == ["3"], what="platypus on page 3 now", ix=ix)
        assert pages("wombats") == ["4"] and pages("revenue") == ["2"]
        assert ix.stats()["skipped"] == {} and ix.progress.errors == 0


# -- a real daemon watching a folder of documents ---------------------------------------------

CONFIG = """
[daemon]
socket = "{dir}/q.sock"
events-socket = "{dir}/e.sock"

[embedding]
model = "none"

[watcher]
max-document-bytes = 200000

[[capsule]]
name = "default"
path = "{dir}/default.mv2"
watch = ["{tree}"]
"""

GOOD = {"report.pdf": 3, "inventory.xlsx": 2, "talk.pptx": 3, "notes.docx": 1, "log.html": 1, "plain.md": 1}
BAD = {"locked.pdf": "encrypted: needs a password", "scan.pdf": "no text layer in its 2 pages",
       "broken.pdf": "damaged PDF", "huge.pdf": "larger than 200000 bytes"}


def make_folder(tree: Path) -> None:
    tree.mkdir()
    files = {"report.pdf": pdf(PAGES), "inventory.xlsx": xlsx_file(300), "talk.pptx": pptx_file(),
             "notes.docx": docx_file(), "log.html": HTML, "plain.md": b"# Plain\n\na note about capybaras\n",
             "locked.pdf": pdf(["top secret"], password="hunter2"), "scan.pdf": scanned_pdf(),
             "broken.pdf": b"%PDF-1.7\n" + os.urandom(4000), "huge.pdf": pdf(PAGES, pad=250_000)}
    for name, data in files.items():
        (tree / name).write_bytes(data)


def cli(d: DaemonProc, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "memvidd", *args, "--socket", d.socket], cwd=ROOT, text=True,
                          capture_output=True, timeout=60, env=d.env)


def find(d: DaemonProc, word: str) -> list[HitOut]:
    with Client(d.socket) as c:
        return c.find(word, mode="lex", k=20)


def test_a_daemon_watching_a_folder_of_documents_finds_them_with_their_locations(tmp_path):
    tree, run = tmp_path / "docs", tmp_path / "run"
    make_folder(tree)
    run.mkdir()
    d = DaemonProc(run)
    d.config.write_text(CONFIG.format(dir=run, tree=tree))
    d.start()
    try:
        deadline = time.monotonic() + 60
        while True:
            with Client(d.socket) as c:
                s: dict[str, Any] = c.stats()["indexer"]
            if s["documents"] == len(GOOD) + len(BAD) and s["phase"] == "watching":
                break
            assert time.monotonic() < deadline, f"not indexed: {s}"
            time.sleep(0.05)
        for name, why in BAD.items():
            assert s["skipped"][str(tree / name)].startswith(why), s["skipped"]
        assert set(s["skipped"]) == {str(tree / n) for n in BAD}, "every good document was read"
        log = d.log.read_text()
        assert f"skip path={tree / 'locked.pdf'} reason=encrypted: needs a password" in log

        (platypus,) = find(d, "platypus")
        assert platypus.page == 2 and platypus.uri.startswith(f"file://{tree}/report.pdf#")
        assert platypus.tags["type"] == "pdf"
        (narwhal,) = find(d, "narwhal")
        assert narwhal.slide == 2
        (gadget,) = find(d, "gadget150")
        first, last = gadget.rows
        assert gadget.sheet == "Inventory" and first <= 150 <= last
        assert [h.page for h in find(d, "capybaras")] == [msgspec.UNSET], "a text file's hit has no page"

        r = cli(d, "find", "platypus", "--mode", "lex", "--json")
        assert r.returncode == 0, r.stderr
        (hit,) = json.loads(r.stdout)["hits"]
        assert hit["page"] == 2 and "sheet" not in hit, "location fields only where they are"
        # The file's place (path, freshness), but its page instead of lines within the page's text.
        assert hit["path"] == str(tree / "report.pdf") and hit["stale"] is False and "lines" not in hit, hit
        r = cli(d, "find", "platypus", "--mode", "lex")
        assert f"{tree}/report.pdf p.2  " in r.stdout and ":1" not in r.stdout, r.stdout

        # put --file of a document: its chunks, with their pages.
        other = tmp_path / "memo.pdf"
        other.write_bytes(pdf(["memo first page", "memo mentions the okapi"]))
        r = cli(d, "put", "--file", str(other), "--tag", "source=mail", "--json")
        assert r.returncode == 0, r.stderr
        assert len(json.loads(r.stdout)["frame_ids"]) == 2
        (okapi,) = find(d, "okapi")
        assert okapi.page == 2 and okapi.tags["source"] == "mail" and okapi.uri.endswith("memo.pdf#1")
        r = cli(d, "find", "okapi", "--mode", "lex")
        assert f"{okapi.uri} p.2  " in r.stdout, r.stdout  # not a watched file: its URI, then its page
        r = cli(d, "put", "--file", str(tree / "locked.pdf"))
        assert r.returncode == 1 and "locked.pdf: encrypted: needs a password" in r.stderr
        assert d.stop() == 0
    finally:
        d.close()
