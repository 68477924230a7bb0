"""The one output row schema shared by every sink (see docs/interfaces.md)."""

import math
from datetime import datetime, timezone
from typing import Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


def utc_now_iso() -> str:
    return datetime.now(timezone.utc).isoformat()


class OutputRow(BaseModel):
    """One page or image; nested structures are JSON strings so every sink stores them the same way."""

    model_config = ConfigDict(extra="forbid")

    id: str
    source: str
    page: int | None = None
    width: int | None = None
    height: int | None = None
    status: Literal["ok", "error"]
    error: str | None = None
    text: str | None = None
    boxes_json: str | None = None
    items_json: str | None = None
    model: str
    model_revision: str | None = None
    prompt: str
    config_hash: str
    job: Literal["digitize", "catalog"]
    decode_ms: float | None = None
    generate_ms: float | None = None
    # The model actor's engine: waiting for room in its batch, then admission to the first token (vision + prefill).
    queue_ms: float | None = None
    prefill_ms: float | None = None
    prompt_tokens: int | None = None
    generated_tokens: int | None = None
    # Why generation stopped: eos (the model finished), length (hit max_new_tokens), error (no output).
    finish_reason: Literal["eos", "length", "error"] | None = None
    created_at: str = Field(default_factory=lambda: utc_now_iso())

    @model_validator(mode="before")
    @classmethod
    def _nan_is_missing(cls, data: object) -> object:
        # Pandas-format Ray batches turn a missing page/timing into NaN; the row means None.
        if isinstance(data, dict):
            return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in data.items()}
        return data

    @field_validator("created_at", mode="before")
    @classmethod
    def _iso_utc(cls, v: object) -> str:
        # Empty means "now": callers rarely care, and resume ordering needs a value.
        if v is None or v == "":
            return utc_now_iso()
        if isinstance(v, datetime):
            return _iso(v)
        if isinstance(v, str):
            datetime.fromisoformat(v)  # raises ValueError for non-ISO text
            return v
        raise ValueError("created_at must be an ISO-8601 string or a datetime")


_ARROW_TYPES = {str: pa.string(), int: pa.int64(), float: pa.float64()}
# Stored typed so data tools need no parsing: a UTC timestamp (Parquet/Arrow; timestamptz in PostgreSQL).
TIMESTAMP_FIELDS = frozenset({"created_at"})
# JSON text in the row; jsonb in PostgreSQL.
JSON_FIELDS = frozenset({"boxes_json", "items_json"})


def _arrow_field(name: str) -> pa.Field:
    if name in TIMESTAMP_FIELDS:
        return pa.field(name, pa.timestamp("us", tz="UTC"), nullable=False)
    ann = OutputRow.model_fields[name].annotation
    all_args = getattr(ann, "__args__", (ann,))
    args = [a for a in all_args if a is not type(None)]
    base = args[0] if args and args[0] in _ARROW_TYPES else str  # Literal[...] -> string
    return pa.field(name, _ARROW_TYPES[base], nullable=type(None) in all_args)


ROW_ARROW_SCHEMA: pa.Schema = pa.schema([_arrow_field(n) for n in OutputRow.model_fields])
ROW_FIELDS: tuple[str, ...] = tuple(OutputRow.model_fields)


def arrow_table(rows: list[dict]) -> pa.Table:
    """Validated row dicts -> an Arrow table of ROW_ARROW_SCHEMA (ISO timestamps become real timestamps)."""
    conv = [{**r, **{k: datetime.fromisoformat(r[k]) for k in TIMESTAMP_FIELDS if isinstance(r.get(k), str)}}
            for r in rows]
    return pa.Table.from_pylist(conv, schema=ROW_ARROW_SCHEMA)


def plain_row(row: dict) -> dict:
    """A row read back from any sink in the row-dict form: JSON columns as text, timestamps as ISO strings."""
    import json

    out = dict(row)
    for k in TIMESTAMP_FIELDS:
        if isinstance(out.get(k), datetime):
            out[k] = _iso(out[k])
    for k in JSON_FIELDS:
        if out.get(k) is not None and not isinstance(out[k], str):
            out[k] = json.dumps(out[k])
    return out


def _iso(v: datetime) -> str:
    return (v if v.tzinfo else v.replace(tzinfo=timezone.utc)).astimezone(timezone.utc).isoformat()
