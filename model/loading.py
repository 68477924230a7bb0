"""Weight loading: checkpoint names -> our parameters, streamed tensor by tensor.

The model is built on the meta device, given empty storage in the target device and dtype, then
filled one checkpoint tensor at a time, so no full float32 copy ever sits in host memory.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from .checkpoint import CheckpointError, CheckpointReader, resolve_checkpoint
from .config import load_config
from .expert_parallel import ExpertParallelMoE, shard_experts
from .model import DeepseekVL2
from .processor import Processor

# Present in the official checkpoints but never used at inference (the ViT's attention-pool head).
UNUSED = re.compile(r"^vision\.(attn_pool|head|fc_norm)\.")
_EXPERTS = re.compile(r"^(.*\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$")
# Kept in float32 whatever the model dtype: the router's bias is added to float32 scores.
FLOAT32_PARAMS = re.compile(r"\.e_score_correction_bias$")


class Reader(Protocol):
    def keys(self) -> list[str]: ...
    def shape(self, key: str) -> tuple[int, ...]: ...
    def get(self, key: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor: ...


@dataclass(frozen=True)
class Slot:
    """Where one checkpoint tensor goes: a parameter, or one expert's slice of a stacked one."""

    param: str
    index: int | None
    shape: tuple[int, ...]


def checkpoint_slots(model: nn.Module) -> dict[str, Slot]:
    """The official checkpoint key for every tensor the model needs (an expert-parallel rank: its own experts)."""
    first = _first_experts(model)
    slots: dict[str, Slot] = {}
    for name, p in model.named_parameters():
        m = _EXPERTS.match(name)
        if m:
            base = first.get(m.group(1), 0)
            for e in range(p.shape[0]):
                slots[f"{m.group(1)}.{base + e}.{m.group(2)}.weight"] = Slot(name, e, tuple(p.shape[1:]))
        else:
            slots[name] = Slot(name, None, tuple(p.shape))
    return slots


def _first_experts(model: nn.Module) -> dict[str, int]:
    return {f"{n}.experts": m.first for n, m in model.named_modules() if isinstance(m, ExpertParallelMoE)}


def _other_ranks_experts(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Checkpoint keys (and shapes) of the routed experts other expert-parallel ranks own: checked in the
    header like our own, so every rank finds the same problems, but never read here."""
    keys = {}
    for n, m in model.named_modules():
        if isinstance(m, ExpertParallelMoE):
            own = range(m.first, m.first + m.experts.gate_proj.shape[0])
            for w in ("gate_proj", "up_proj", "down_proj"):
                shape = tuple(getattr(m.experts, w).shape[1:])
                keys.update((f"{n}.experts.{e}.{w}.weight", shape) for e in range(m.num_experts) if e not in own)
    return keys


def _names(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(sorted(keys)[:limit])
    return shown + (f" … and {len(keys) - limit} more" if len(keys) > limit else "")


def load_weights(model: nn.Module, reader: Reader, device: torch.device, where: str = "checkpoint") -> None:
    """Fill every parameter from `reader`; missing, unexpected or mis-shaped keys are an error
    that names them, raised before any tensor is read."""
    slots = checkpoint_slots(model)
    expected = {**{k: s.shape for k, s in slots.items()}, **_other_ranks_experts(model)}
    present = set(reader.keys())
    missing = [k for k in expected if k not in present]
    unexpected = [k for k in present if k not in expected and not UNUSED.match(k)]
    misshaped = [
        f"{k} {tuple(reader.shape(k))} (expected {shape})"
        for k, shape in expected.items()
        if k in present and tuple(reader.shape(k)) != shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_names(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped keys: {_names(misshaped)}")
    if problems:
        raise CheckpointError(f"{where}: weights do not match the config: " + "; ".join(problems))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, slot in slots.items():
            target = params[slot.param]
            t = reader.get(key, device=device, dtype=target.dtype)
            (target[slot.index] if slot.index is not None else target).copy_(t)


def build_empty(cfg, device: torch.device, dtype: torch.dtype, expert_parallel: bool = False) -> DeepseekVL2:
    """Model with uninitialised storage already in the target device and dtype; with `expert_parallel`,
    storage for this rank's routed experts only."""
    with torch.device("meta"):
        model = DeepseekVL2(cfg)
    if expert_parallel:
        shard_experts(model, device)
    model = model.to(dtype)
    for name, p in model.named_parameters():
        if FLOAT32_PARAMS.search(name):
            p.data = p.data.float()
    return model.to_empty(device=device)


def load_model(
    local_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
    expert_parallel: bool = False,
) -> DeepseekVL2:
    local_dir = Path(local_dir)
    cfg = load_config(local_dir)
    device = torch.device(device)
    model = build_empty(cfg, device, dtype, expert_parallel)
    with CheckpointReader(local_dir) as reader:
        load_weights(model, reader, device, str(local_dir))
    return model.eval()


def load_processor(spec: str | Path) -> Processor:
    """Tokenizer and tiling only (no weights): what CPU-side workers need."""
    return Processor.from_pretrained(resolve_checkpoint(str(spec)))


def load_pretrained(
    spec: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
    expert_parallel: bool = False,
) -> tuple[DeepseekVL2, Processor]:
    """Local dir, s3:// or fsspec URL (cached once), or Hugging Face hub id -> (model, processor).

    `expert_parallel`: inside an initialized process group, load only this rank's share of the routed
    experts (see model.expert_parallel); the model's forward and generate are then collective."""
    local = resolve_checkpoint(str(spec))
    processor = Processor.from_pretrained(local)
    return load_model(local, device=device, dtype=dtype, expert_parallel=expert_parallel), processor


__all__ = ["load_pretrained", "load_processor", "load_model", "load_weights", "checkpoint_slots", "build_empty", "resolve_checkpoint", "CheckpointError"]
