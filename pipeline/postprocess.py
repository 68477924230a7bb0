"""CPU stage after the model: grounding -> pixel boxes, catalog validation, final OutputRow.

Each row leaves this stage as one JSON string already validated against `OutputRow`, so the
driver only parses and writes, and Arrow never has to guess types of all-null columns.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from connectors.redact import redact
from connectors.rows import OutputRow
from model.grounding import parse_grounding, strip_grounding

# Quoted spans are how the model reports text it reads off labels ("...", “...”, '...').
_QUOTED = re.compile(r"\"([^\"\n]{1,200})\"|“([^”\n]{1,200})”")


class CatalogItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label: str = Field(min_length=1, max_length=500)
    box: list[float] = Field(min_length=4, max_length=4)

    @field_validator("label")
    @classmethod
    def _strip(cls, v: str) -> str:
        v = v.strip()
        if not v:
            raise ValueError("empty label")
        return v


class CatalogRecord(BaseModel):
    """The catalog job's structure (stored as `items_json`): what a downstream consumer may rely on."""

    model_config = ConfigDict(extra="forbid")

    caption: str
    items: list[CatalogItem]
    label_text: list[str]


def catalog_record(raw_text: str, boxes: list[dict[str, Any]], width: int, height: int) -> CatalogRecord:
    """Boxes with a label become items (clamped to the image); quoted text becomes label text."""
    caption = strip_grounding(raw_text).strip()
    items = []
    for b in boxes:
        if not str(b.get("label", "")).strip():
            continue  # a box with no label is not an item
        x1, y1, x2, y2 = (float(v) for v in b["box"])
        items.append({"label": b["label"], "box": [min(max(x1, 0.0), width), min(max(y1, 0.0), height),
                                                   min(max(x2, 0.0), width), min(max(y2, 0.0), height)]})
    label_text = [a or b for a, b in _QUOTED.findall(caption)]
    return CatalogRecord.model_validate({"caption": caption, "items": items, "label_text": label_text})


def _opt(v: Any, none: Any) -> Any:
    return None if v == none else v


def postprocess(batch: dict[str, np.ndarray], *, job: str, model: str, prompt: str, config_hash: str) -> dict[str, np.ndarray]:
    """Model outputs -> validated OutputRow JSON (column `row`), plus `status` and `thumb` for the driver."""
    rows, status, thumbs = [], [], []
    for i in range(len(batch["id"])):
        st = str(batch["status"][i])
        if st == "skipped":
            rows.append("")
            status.append(st)
            thumbs.append(b"")
            continue
        row = _row(batch, i, job=job, model=model, prompt=prompt, config_hash=config_hash)
        rows.append(row.model_dump_json())
        status.append(row.status)
        thumbs.append(batch["thumb"][i] if row.status == "ok" and "thumb" in batch else b"")
    return {"row": np.array(rows, dtype=object), "status": np.array(status, dtype=object),
            "thumb": np.array(thumbs, dtype=object)}


def _row(batch: dict[str, np.ndarray], i: int, **static: Any) -> OutputRow:
    width, height = _opt(int(batch["width"][i]), 0), _opt(int(batch["height"][i]), 0)
    fields: dict[str, Any] = dict(
        id=str(batch["id"][i]),
        source=str(batch["source"][i]),
        page=_opt(int(batch["page"][i]), 0),
        width=width,
        height=height,
        status=str(batch["status"][i]),
        error=_opt(str(batch["error"][i]), "") and redact(batch["error"][i]),
        model=static["model"],
        model_revision=_opt(str(batch["model_revision"][i]), "") if "model_revision" in batch else None,
        prompt=static["prompt"],
        config_hash=static["config_hash"],
        job=static["job"],
        decode_ms=_opt(float(batch["decode_ms"][i]), -1.0),
        generate_ms=_opt(float(batch["generate_ms"][i]), -1.0) if "generate_ms" in batch else None,
        queue_ms=_opt(float(batch["queue_ms"][i]), -1.0) if "queue_ms" in batch else None,
        prefill_ms=_opt(float(batch["prefill_ms"][i]), -1.0) if "prefill_ms" in batch else None,
        prompt_tokens=_opt(int(batch["prompt_tokens"][i]), 0),
        generated_tokens=None,
        finish_reason="error" if str(batch["status"][i]) != "ok" else
        (str(batch["finish_reason"][i]) if "finish_reason" in batch else None),
    )
    if fields["status"] == "ok":
        raw = str(batch["text"][i])
        try:
            boxes = parse_grounding(raw, width or 0, height or 0)
            fields.update(
                text=strip_grounding(raw).strip(),
                boxes_json=json.dumps(boxes),
                generated_tokens=int(batch["generated_tokens"][i]),
            )
            if static["job"] == "catalog":
                fields["items_json"] = catalog_record(raw, boxes, width or 0, height or 0).model_dump_json()
        except (ValidationError, ValueError, TypeError, KeyError) as e:
            fields.update(status="error", error=redact(f"{fields['source']}: invalid model output: {e}"), text=raw,
                          boxes_json=None, items_json=None, finish_reason="error")
    return OutputRow.model_validate(fields)
