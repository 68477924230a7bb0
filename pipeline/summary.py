"""The run summary: counted on the driver as rows stream past, printed and written beside the output."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from connectors.redact import redact
from pipeline.config import JobConfig


class Summary(BaseModel):
    job: str
    input: str
    output: str
    model: str
    smoke_model: bool
    config_hash: str
    items_ok: int
    items_failed: int
    items_skipped: int  # already in the output from an earlier run (resume)
    prior_done: int
    wall_s: float
    pages_per_s: float
    generated_tokens: int
    tokens_per_s: float
    contact_sheet: str | None = None
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
        if self.contact_sheet:
            lines.append(f"  contact sheet: {self.contact_sheet}")
        if self.summary_path:
            lines.append(f"  summary: {self.summary_path}")
        if self.smoke_model:
            lines.append("  NOTE: model 'smoke' = random mini checkpoint; the text and boxes above are random, not real OCR.")
        return "\n".join(lines)


class Tally:
    """Counts rows and turns the postprocess column of JSON rows back into dicts for the sink."""

    def __init__(self) -> None:
        self.ok = self.failed = self.skipped = self.tokens = 0

    def add(self, batch: dict[str, np.ndarray]) -> tuple[list[dict[str, Any]], list[bytes]]:
        rows, thumbs = [], []
        for row_json, status, thumb in zip(batch["row"], batch["status"], batch["thumb"]):
            if status == "skipped":
                self.skipped += 1
                continue
            row = json.loads(row_json)
            rows.append(row)
            thumbs.append(thumb)
            if row["status"] == "ok":
                self.ok += 1
                self.tokens += row.get("generated_tokens") or 0
            else:
                self.failed += 1
        return rows, thumbs

    def summary(self, config: JobConfig, *, wall_s: float, smoke: bool, prior_done: int,
                contact_sheet: str | None) -> Summary:
        wall = max(wall_s, 1e-9)
        return Summary(
            job=config.job, input=redact(config.input), output=redact(config.output), model=redact(config.model),
            smoke_model=smoke, config_hash=config.config_hash(), items_ok=self.ok, items_failed=self.failed,
            items_skipped=self.skipped, prior_done=prior_done, wall_s=round(wall_s, 3),
            pages_per_s=round((self.ok + self.failed) / wall, 3), generated_tokens=self.tokens,
            tokens_per_s=round(self.tokens / wall, 2), contact_sheet=contact_sheet,
        )


def side_path(config: JobConfig, name: str) -> Path:
    """A file "beside the output": `_name` inside a local Parquet dir, `<db>.name` next to SQLite, else in the cwd."""
    if name == "summary.json" and config.summary_path:
        return Path(config.summary_path)
    out = config.output
    if out.startswith("sqlite:"):
        db = Path(out[len("sqlite:///"):]) if out.startswith("sqlite:///") else None  # sqlite:////abs -> /abs
        if db is None or str(db) in ("", ":memory:"):
            return Path.cwd() / f"{config.table}.{name}"
        return db.with_name(db.name + "." + name)
    if "://" not in out or out.startswith("file://"):
        # "_" prefix: Parquet readers (Arrow, Spark, our sink) skip it, so the directory stays a clean dataset
        return Path(out.removeprefix("file://")) / ("_" + name)
    return Path.cwd() / f"{config.table}.{name}"
