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
    prompt_tokens: int | None = None
    generated_tokens: int | None = None
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
            return (v if v.tzinfo else v.replace(tzinfo=timezone.utc)).astimezone(timezone.utc).isoformat()
        if isinstance(v, str):
            datetime.fromisoformat(v)  # raises ValueError for non-ISO text
            return v
        raise ValueError("created_at must be an ISO-8601 string or a datetime")


_ARROW_TYPES = {str: pa.string(), int: pa.int64(), float: pa.float64()}


def _arrow_field(name: str) -> pa.Field:
    ann = OutputRow.model_fields[name].annotation
    all_args = getattr(ann, "__args__", (ann,))
    args = [a for a in all_args if a is not type(None)]
    base = args[0] if args and args[0] in _ARROW_TYPES else str  # Literal[...] -> string
    return pa.field(name, _ARROW_TYPES[base], nullable=type(None) in all_args)


ROW_ARROW_SCHEMA: pa.Schema = pa.schema([_arrow_field(n) for n in OutputRow.model_fields])
ROW_FIELDS: tuple[str, ...] = tuple(OutputRow.model_fields)
