"""One Markdown file per input document (digitize `--markdown DIR`, and `pagemill export`).

Users think in documents, the pipeline in pages: this turns the rows of a document (in page order,
whichever run wrote them) into `DIR/<input path relative to the input root>.md`, written atomically.
An image is written as soon as its row arrives; a local PDF as soon as its last selected page has a
row (its page count is read from the file); any other document (a PDF on S3 or in a Parquet table,
or one with pages from an earlier run) once the run has been through the listing, from the sink, so
pages written by earlier runs (resume) are part of it.
"""

from __future__ import annotations

import glob as _glob
import os
import posixpath
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

from connectors.redact import redact
from connectors.s3 import S3Options, s3_client, split_s3_url

_GLOB = set("*?[")
COLUMNS = ["source", "page", "status", "error", "text"]


def input_root(spec: str) -> str:
    """The folder or prefix that sources are named relative to: a folder itself, a glob's fixed part, a file's folder."""
    spec = spec.removeprefix("file://")
    if spec.startswith("s3://"):
        if _GLOB & set(spec):
            spec = spec[: min(spec.index(c) for c in _GLOB if c in spec)]
        if spec.endswith("/"):
            return spec
        return spec + "/" if "/" not in spec[len("s3://"):] else spec.rsplit("/", 1)[0] + "/"
    if _GLOB & set(spec):
        spec = os.path.dirname(spec[: min(spec.index(c) for c in _GLOB if c in spec)] + "x")
    path = os.path.abspath(spec)
    return path if os.path.isdir(path) else os.path.dirname(path)


def common_root(sources: Iterable[str]) -> str:
    """For an export without --input: the deepest folder/prefix holding every source."""
    srcs = list(sources)
    if not srcs:
        return ""
    parents = [s.rsplit("/", 1)[0] if "/" in s else "" for s in srcs]
    root = posixpath.commonpath(parents) if all(p.startswith("/") for p in parents) else os.path.commonprefix(parents)
    return root.rstrip("/") + "/" if root.startswith("s3://") else root


def relative_name(source: str, root: str) -> str:
    """`source` relative to `root`, made safe as a relative path (no `..`, no leading `/`, no scheme)."""
    r = root.rstrip("/")
    rel = source[len(r):] if r and source.startswith(r + "/") else source.split("://", 1)[-1]
    parts = [p if p not in ("", ".", "..") else "_" for p in rel.replace("\\", "/").strip("/").split("/")]
    return "/".join(parts) or "_"


def _comment(text: str) -> str:
    return text.replace("--", "- -").replace("\n", " ")


def render(rows: list[dict]) -> str:
    """A document's rows -> Markdown: pages in order, each under a separator naming its number."""
    rows = sorted(rows, key=lambda r: (r.get("page") is not None, r.get("page") or 0))
    pdf = any(r.get("page") is not None for r in rows)
    chunks = []
    for r in rows:
        body = (r.get("text") or "").strip() if r["status"] == "ok" else \
            f"<!-- error: {_comment(r.get('error') or 'failed')} -->"
        if pdf and r.get("page") is not None:
            sep = "" if not chunks else "\n\n---\n\n"
            chunks.append(f"{sep}<!-- page {r['page']} -->\n\n{body}")
        else:
            chunks.append(body)
    return "".join(chunks).rstrip() + "\n"


def local_pdf_pages(page_range: str | None, max_pdf_pages: int) -> Callable[[str], set[int] | None]:
    """source -> the pages the pipeline makes rows for, for a local PDF (None: unknown, wait for the end)."""
    from connectors.decode import DecodeLimits

    limits = DecodeLimits(page_range=page_range, max_pdf_pages=max_pdf_pages)

    def pages(source: str) -> set[int] | None:
        if not source.startswith("/") or not source.lower().endswith(".pdf"):
            return None
        try:
            import pypdfium2 as pdfium

            pdf = pdfium.PdfDocument(source)  # reads the cross-reference table, not the pages
            try:
                return set(limits.selected_pages(len(pdf))) or None
            finally:
                pdf.close()
        except Exception:  # noqa: BLE001 - unreadable here: the pipeline's error row says why
            return None

    return pages


class MarkdownWriter:
    """Writes documents as their rows complete them; `finish(sink)` writes the rest from the whole output.

    `expected(source)` gives a PDF's page numbers when they can be known up front; `prior` holds the
    sources that already had rows before this run (their documents need the sink's rows).
    """

    def __init__(self, dest: str, root: str, s3: S3Options | None = None, *,
                 expected: Callable[[str], set[int] | None] | None = None, prior: set[str] | None = None) -> None:
        self.dest = dest.rstrip("/")
        self.root = root
        self.s3 = s3
        self.expected = expected or (lambda source: None)
        self.prior = prior or set()
        self.touched: set[str] = set()  # documents with a row in this run, left for finish()
        self.written = 0
        self._written: set[str] = set()
        self._pending: dict[str, dict[int, dict]] = {}  # PDF -> page -> row, until every expected page is in
        self._expect: dict[str, set[int] | None] = {}
        self._client = None

    def add(self, rows: Iterable[dict]) -> None:
        for row in rows:
            src = row["source"]
            if row.get("page") is None:  # an image (or an input that failed as a whole): complete on its own
                self._write(src, [row])
                continue
            if src in self.prior or src in self.touched:
                self.touched.add(src)
                continue
            if src not in self._expect:
                self._expect[src] = self.expected(src)
            want = self._expect[src]
            if want is None:
                self.touched.add(src)
                continue
            pages = self._pending.setdefault(src, {})
            pages[row["page"]] = row
            if want <= set(pages):
                self._write(src, list(self._pending.pop(src).values()))

    def finish(self, sink: object, *, everything: bool = False) -> int:
        """Write every touched PDF and every document of the output that has no file yet (or all: export)."""
        from connectors.scan import iter_rows

        self.touched.update(self._pending)  # incomplete here (should not happen): the sink has the rest
        self._pending.clear()
        existing = set() if everything else self._existing()
        docs: dict[str, list[dict]] = defaultdict(list)
        for row in iter_rows(sink, COLUMNS):
            src = row["source"]
            if src in self._written:
                continue
            if everything or src in self.touched or self._key(src) not in existing:
                docs[src].append(row)
        for src, rows in docs.items():
            self._write(src, rows)
        return self.written

    # ------------------------------------------------------------------ storage

    def _key(self, source: str) -> str:
        return relative_name(source, self.root) + ".md"

    def _write(self, source: str, rows: list[dict]) -> None:
        key, text = self._key(source), render(rows)
        if self.dest.startswith("s3://"):
            bucket, prefix = split_s3_url(self.dest)
            self._s3().put_object(Bucket=bucket, Key=(prefix + "/" if prefix else "") + key, Body=text.encode(),
                                  ContentType="text/markdown; charset=utf-8")  # one PUT: atomic
        else:
            final = Path(self.dest) / key
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = final.with_name("." + final.name + ".tmp")
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, final)
        self._written.add(source)
        self.written += 1

    def _existing(self) -> set[str]:
        if self.dest.startswith("s3://"):
            bucket, prefix = split_s3_url(self.dest)
            prefix = prefix + "/" if prefix else ""
            keys = set()
            for page in self._s3().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                keys.update(o["Key"][len(prefix):] for o in page.get("Contents", []))
            return keys
        root = Path(self.dest)
        return {os.path.relpath(p, root) for p in _glob.glob(str(root / "**" / "*.md"), recursive=True)}

    def _s3(self):
        if self._client is None:
            self._client = s3_client(self.s3)
        return self._client

    def __repr__(self) -> str:
        return f"MarkdownWriter({redact(self.dest)!r})"


def export_markdown(sink: object, dest: str, root: str | None = None, s3: S3Options | None = None) -> int:
    """`pagemill export`: every document of an output as Markdown, without running the model."""
    from connectors.scan import iter_rows

    if root is None:
        root = common_root({r["source"] for r in iter_rows(sink, ["source"])})
    return MarkdownWriter(dest, root, s3).finish(sink, everything=True)
