"""Helpers shared by the pipeline/jobs tests (no tests here): input sets, a smoke checkpoint, reading rows back."""

from __future__ import annotations

import atexit
import io
import shutil
import json
import sqlite3
import tempfile
from functools import lru_cache
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from connectors.rows import plain_row
from pipeline.checkpoint import smoke_checkpoint as job_smoke_checkpoint

REPO = Path(__file__).resolve().parents[1]


@lru_cache(maxsize=1)
def smoke_checkpoint() -> Path:
    """One random mini checkpoint per test process, made as `--model smoke` makes it for users."""
    root = tempfile.mkdtemp(prefix="pagemill-smoke-")
    atexit.register(shutil.rmtree, root, True)
    return job_smoke_checkpoint(Path(root))


def image_bytes(i: int, fmt: str = "PNG", size: tuple[int, int] = (96, 64)) -> bytes:
    """A small image whose content (hence id) depends on i."""
    img = Image.new("RGB", size, ((37 * i) % 256, (91 * i) % 256, (53 * i + 80) % 256))
    ImageDraw.Draw(img).text((4, 4), f"item {i}", fill="white")
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def pdf_bytes(pages: int, tag: str = "doc") -> bytes:
    imgs = [Image.new("RGB", (120, 160), "white") for _ in range(pages)]
    for n, img in enumerate(imgs, 1):
        ImageDraw.Draw(img).text((8, 8), f"{tag} page {n}", fill="black")
    buf = io.BytesIO()
    imgs[0].save(buf, format="PDF", save_all=True, append_images=imgs[1:])
    return buf.getvalue()


def make_folder(root: Path, n_images: int = 2, pdf_pages: int = 3) -> int:
    """Images (one in a subfolder, one JPEG) and a multi-page PDF; returns the number of work items."""
    (root / "sub").mkdir(parents=True, exist_ok=True)
    for i in range(n_images):
        fmt, ext = ("JPEG", "jpg") if i % 2 else ("PNG", "png")
        (root / ("sub" if i == 0 else ".") / f"img{i}.{ext}").write_bytes(image_bytes(i, fmt))
    (root / "doc.pdf").write_bytes(pdf_bytes(pdf_pages))
    (root / "notes.txt").write_text("not an input")  # wrong extension: ignored by the listing
    return n_images + pdf_pages


def read_rows(output: str, table: str = "pagemill_rows") -> list[dict]:
    if output.startswith("sqlite:///"):
        conn = sqlite3.connect(output[len("sqlite:///"):])
        conn.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in conn.execute(f"SELECT * FROM {table}")]
        finally:
            conn.close()
    if output.startswith("postgresql://"):
        import psycopg
        from psycopg.rows import dict_row

        with psycopg.connect(output, row_factory=dict_row) as conn:
            # jsonb / timestamptz come back as Python objects; compare in the row-dict form
            return [plain_row(r) for r in conn.execute(f"SELECT * FROM {table}")]  # noqa: S608 - test-owned table
    # Parquet parts are append-only: a re-written id (retried error) lives on in an older part, and the
    # newest part (names sort by write time) supersedes it, as the sink's own done_ids reads it.
    latest: dict[str, dict] = {}
    for part in sorted(p for p in Path(output).glob("*.parquet") if not p.name.startswith((".", "_"))):
        for row in pq.read_table(part).to_pylist():
            latest[row["id"]] = plain_row(row)
    return list(latest.values())


def summary_of(path: Path) -> dict:
    return json.loads(path.read_text())
