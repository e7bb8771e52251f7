#!/usr/bin/env python3
"""Benchmark of document extraction: pages per second on the real PDFs of this machine,
through what the daemon runs (``documents.read_file``: the extractor child, then the
chunker), and through PDFium alone in this process, for comparison; what each other
document gives (its skip reason).

Run::

    cd /work/main && .venv/bin/python -m bench.documents_bench [FILE ...] [--runs N] [--quick] [--out FILE]

With no FILE, every ``*.pdf`` over 20 KB under /usr/share/doc and the Python's
site-packages is measured. Each file is read ``--runs`` times by a warm child (the first
read of a run starts one, and pays for its imports: reported apart as ``first_s``).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import arg_parser, dist, environment, log, parse_args, result_head, write_result
from memvidd import documents

PACKAGES = ("pypdfium2", "python-docx", "openpyxl", "python-pptx", "beautifulsoup4", "markdownify")


def machine_pdfs() -> list[Path]:
    roots = [Path("/usr/share/doc"), Path(sys.prefix) / "lib"]
    found = {p for r in roots if r.is_dir() for p in r.rglob("*.pdf") if p.is_file() and p.stat().st_size > 20_000}
    return sorted(found)


def pdfium_pages(data: bytes) -> int:
    import pypdfium2 as pdfium

    doc = pdfium.PdfDocument(data)
    try:
        for i in range(len(doc)):
            page = doc[i]
            page.get_textpage().get_text_range()
            page.close()
        return len(doc)
    finally:
        doc.close()


def measure(path: Path, runs: int) -> dict[str, Any]:
    data = path.read_bytes()
    out: dict[str, Any] = {"path": str(path), "bytes": len(data)}
    documents.CHILDREN.close()  # the first read pays for a child's start, as after a daemon's start
    t0 = time.perf_counter()
    try:
        doc = documents.read_file(str(path), data)
    except documents.Unreadable as e:
        return {**out, "skipped": str(e)}
    out["first_s"] = round(time.perf_counter() - t0, 4)
    pages = {c.tags.get("page") for c in doc.chunks}
    out.update(pages_with_text=len(pages), chunks=len(doc.chunks), chars=sum(len(c.text) for c in doc.chunks))
    warm = []
    for _ in range(runs):
        t0 = time.perf_counter()
        documents.read_file(str(path), data)
        warm.append(time.perf_counter() - t0)
    direct = []
    for _ in range(runs):
        t0 = time.perf_counter()
        out["pages"] = pdfium_pages(data)
        direct.append(time.perf_counter() - t0)
    out["read_file"] = dist(warm)
    out["pdfium_only"] = dist(direct)
    out["pages_per_s"] = round(out["pages"] / (out["read_file"]["p50"] / 1e3), 1)
    out["pdfium_pages_per_s"] = round(out["pages"] / (out["pdfium_only"]["p50"] / 1e3), 1)
    return out


def main() -> int:
    ap = arg_parser(__doc__ or "", "3 runs per file instead of 10")
    ap.add_argument("files", nargs="*", metavar="FILE")
    ap.add_argument("--runs", type=int, default=10)
    args = parse_args(ap)
    runs = 3 if args.quick else args.runs
    files = [Path(f) for f in args.files] or machine_pdfs()
    result = {**result_head("documents", args.quick),
              "environment": environment(os.environ.get("TMPDIR", "/tmp"), packages=PACKAGES), "files": []}
    for path in files:
        log(f"{path}")
        result["files"].append(measure(path, runs))
    documents.CHILDREN.close()
    read = [f for f in result["files"] if "pages" in f]
    pages = sum(f["pages"] for f in read)
    result["pages"] = pages
    result["pages_per_s"] = round(pages / sum(f["read_file"]["p50"] / 1e3 for f in read), 1) if read else None
    result["skipped"] = {f["path"]: f["skipped"] for f in result["files"] if "skipped" in f}

    def summary(r: dict[str, Any]) -> str:
        each = "; ".join(f"{Path(f['path']).name}: {f['pages']} pages, {f['pages_per_s']} pages/s "
                         f"(PDFium alone {f['pdfium_pages_per_s']})" for f in read)
        return f"{len(read)} PDFs, {r['pages']} pages, {r['pages_per_s']} pages/s | {each} | skipped: {r['skipped']}"

    write_result(result, args.out, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
