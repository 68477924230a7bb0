"""The run summary: counted on the driver as rows stream past, printed and written beside the output."""

from __future__ import annotations

import json
import os
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from connectors.redact import redact
from pipeline.config import JobConfig

FIRST_ERRORS = 20  # how many failed items the summary names (id, source, error)


class ItemError(BaseModel):
    id: str
    source: str
    page: int | None = None
    error: str


class Summary(BaseModel):
    job: str
    input: str
    output: str
    model: str
    smoke_model: bool
    config_hash: str
    started_at: str
    ended_at: str
    items_ok: int
    items_failed: int
    items_skipped: int  # already in the output from an earlier run (resume)
    prior_done: int
    wall_s: float
    pages_per_s: float
    generated_tokens: int
    tokens_per_s: float
    finish_reasons: dict[str, int] = Field(default_factory=dict)  # eos / length / error, this run's rows
    first_errors: list[ItemError] = Field(default_factory=list)
    config: dict[str, Any] = Field(default_factory=dict)  # the effective configuration, credentials removed
    contact_sheet: str | None = None
    markdown: str | None = None
    markdown_documents: int = 0
    summary_path: str | None = None

    def write(self, path: Path) -> None:
        self.summary_path = str(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name("." + path.name + ".tmp")
        tmp.write_text(self.model_dump_json(indent=2) + "\n")
        os.replace(tmp, path)

    def render(self) -> str:
        lines = [
            f"pagemill {self.job}: {self.items_ok} ok, {self.items_failed} failed, {self.items_skipped} skipped (already done)"
            f" in {self.wall_s:.1f}s — {self.pages_per_s:.2f} pages/s, {self.tokens_per_s:.1f} tokens/s",
            f"  output: {self.output}",
        ]
        if self.finish_reasons.get("length"):
            lines.append(f"  {self.finish_reasons['length']} item(s) stopped at max_new_tokens (finish_reason = length)")
        for e in self.first_errors[:3]:
            lines.append(f"  error: {e.error} [id {e.id}]")
        if self.items_failed > 3:
            lines.append(f"  ... {self.items_failed - 3} more error(s): `pagemill inspect {self.output}` lists them")
        if self.markdown:
            lines.append(f"  markdown: {self.markdown_documents} document(s) written under {self.markdown}")
        if self.contact_sheet:
            lines.append(f"  contact sheet: {self.contact_sheet}")
        if self.summary_path:
            lines.append(f"  summary: {self.summary_path}")
        if self.smoke_model:
            lines.append("  NOTE: model 'smoke' = random mini checkpoint; the text and boxes above are random, not real OCR.")
        return "\n".join(lines)


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Tally:
    """Counts rows and turns the postprocess column of JSON rows back into dicts for the sink."""

    def __init__(self) -> None:
        self.ok = self.failed = self.skipped = self.tokens = 0
        self.finish: Counter[str] = Counter()
        self.errors: list[ItemError] = []

    @property
    def done(self) -> int:
        return self.ok + self.failed + self.skipped

    def add(self, batch: dict[str, np.ndarray]) -> tuple[list[dict[str, Any]], list[bytes]]:
        rows, thumbs = [], []
        for row_json, status, thumb in zip(batch["row"], batch["status"], batch["thumb"]):
            if status == "skipped":
                self.skipped += 1
                continue
            row = json.loads(row_json)
            rows.append(row)
            thumbs.append(thumb)
            if row.get("finish_reason"):
                self.finish[row["finish_reason"]] += 1
            if row["status"] == "ok":
                self.ok += 1
                self.tokens += row.get("generated_tokens") or 0
            else:
                self.failed += 1
                if len(self.errors) < FIRST_ERRORS:
                    self.errors.append(ItemError(id=row["id"], source=row["source"], page=row.get("page"),
                                                 error=row.get("error") or "error"))
        return rows, thumbs

    def summary(self, config: JobConfig, *, started_at: str, wall_s: float, smoke: bool, prior_done: int,
                contact_sheet: str | None, markdown_documents: int = 0) -> Summary:
        wall = max(wall_s, 1e-9)
        return Summary(
            job=config.job, input=redact(config.input), output=redact(config.output), model=redact(config.model),
            smoke_model=smoke, config_hash=config.config_hash(), started_at=started_at, ended_at=utc_now(),
            items_ok=self.ok, items_failed=self.failed,
            items_skipped=self.skipped, prior_done=prior_done, wall_s=round(wall_s, 3),
            pages_per_s=round((self.ok + self.failed) / wall, 3), generated_tokens=self.tokens,
            tokens_per_s=round(self.tokens / wall, 2), finish_reasons=dict(self.finish), first_errors=self.errors,
            config=config.public_dict(), contact_sheet=contact_sheet,
            markdown=redact(config.markdown) if config.markdown else None, markdown_documents=markdown_documents,
        )


def side_path(config: JobConfig, name: str, started_at: str | None = None) -> Path:
    """Where a file the run writes about its output goes (summary.json, contact_sheet.html).

    Next to the output when it is a local file or directory (`<db>.name`, `<dir>.name`: never inside a
    Parquet directory, which holds nothing but Parquet); otherwise (PostgreSQL, s3://) in pagemill's own
    runs folder (`$PAGEMILL_CACHE/runs/`, a summary per run, a contact sheet per output), never in the
    current directory.
    """
    if name == "summary.json" and config.summary_path:
        return Path(config.summary_path)
    out = config.output
    if out.startswith("sqlite:"):
        db = Path(out[len("sqlite:///"):]) if out.startswith("sqlite:///") else None  # sqlite:////abs -> /abs
        if db is not None and str(db) not in ("", ":memory:"):
            return db.with_name(db.name + "." + name)
    elif "://" not in out or out.startswith("file://"):
        d = Path(out.removeprefix("file://").rstrip("/") or "/")
        return d.with_name(d.name + "." + name)
    import hashlib

    from pipeline.checkpoint import cache_dir

    # One name per output (the contact sheet is rebuilt in place, keeping earlier thumbnails); a summary per run.
    which = hashlib.sha256(f"{redact(out)}|{config.table}".encode()).hexdigest()[:8]
    stamp = "" if name == "contact_sheet.html" else \
        "-" + (started_at or utc_now()).replace(":", "").replace("-", "").split("+")[0]
    return cache_dir() / "runs" / f"{config.job}-{config.table}-{which}{stamp}.{name}"
