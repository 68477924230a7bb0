"""Pydantic models that also read like dicts: Ray batches and callers index them by field name."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class Record(BaseModel):
    def __getitem__(self, name: str) -> Any:
        return getattr(self, name)

    def get(self, name: str, default: Any = None) -> Any:
        return getattr(self, name, default)

    def keys(self) -> list[str]:
        return list(type(self).model_fields)
