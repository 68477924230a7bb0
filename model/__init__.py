"""DeepSeek-VL2 in PyTorch: processor, model, loading. Knows nothing of Ray or storage."""
from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import CheckpointError, resolve_checkpoint
from .config import ConfigError, VL2Config, load_config
from .loading import load_model
from .model import DeepseekVL2
from .processor import BatchInputs, PreparedInput, Processor


def load_processor(spec: str | Path) -> Processor:
    """Tokenizer and tiling only (no weights): what CPU-side workers need."""
    return Processor.from_pretrained(resolve_checkpoint(str(spec)))


def load_pretrained(
    spec: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[DeepseekVL2, Processor]:
    """Local dir, s3:// or fsspec URL (cached once), or Hugging Face hub id -> (model, processor)."""
    local = resolve_checkpoint(str(spec))
    processor = Processor.from_pretrained(local)
    model = load_model(local, device=device, dtype=dtype)
    return model, processor


__all__ = [
    "load_pretrained",
    "load_processor",
    "resolve_checkpoint",
    "load_config",
    "DeepseekVL2",
    "Processor",
    "PreparedInput",
    "BatchInputs",
    "VL2Config",
    "CheckpointError",
    "ConfigError",
]
