"""DeepSeek-VL2 in PyTorch: processor, model, loading. Knows nothing of Ray or storage.

Names are imported lazily, so that `model.grounding` (pure Python) costs CPU-side workers no
torch import.
"""
from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "load_pretrained": ".loading",
    "load_processor": ".loading",
    "resolve_checkpoint": ".checkpoint",
    "CheckpointError": ".checkpoint",
    "load_config": ".config",
    "ConfigError": ".config",
    "VL2Config": ".config",
    "DeepseekVL2": ".model",
    "Processor": ".processor",
    "PreparedInput": ".processor",
    "BatchInputs": ".processor",
    "Engine": ".engine",
    "Result": ".engine",
    "SamplingParams": ".sampling",
}
__all__ = list(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name], __name__), name)
