"""Model stage: a Ray Data class UDF that loads the model once per actor and generates for a batch.

The batch arrives as packed numpy tensors (see preprocess); rows that are not `ok` pass through.
A failing batch is retried item by item so that one poisonous input costs one error row, not
the batch.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from connectors.redact import redact
from pipeline.config import JobConfig
from pipeline.preprocess import unpack_arrays

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Test hook: path of a marker file; the first model actor to find it missing creates it and dies,
# which exercises actor restart + batch retry (set on the driver; see run.py).
CRASH_ENV = "PAGEMILL_TEST_CRASH_MODEL_ONCE"


def pick_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but this model actor sees no GPU (set gpus_per_worker or device=auto)")
    if requested == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    if requested == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[requested]


def checkpoint_fingerprint(local_dir: str | os.PathLike) -> str:
    """A revision for checkpoints that have none: config + weight index + file sizes, cheap to compute."""
    root = Path(local_dir)
    h = hashlib.sha256()
    for p in sorted(root.iterdir()):
        if p.name == "config.json" or p.name.endswith(".index.json"):
            h.update(p.name.encode() + p.read_bytes())
        elif p.suffix in (".safetensors", ".bin"):
            h.update(f"{p.name}:{p.stat().st_size}".encode())
    return "sha256:" + h.hexdigest()[:16]


def trim_generated(ids: np.ndarray, eos_id: int, pad_id: int | None) -> list[int]:
    """Tokens up to (not including) the first eos; generate() pads finished rows with eos."""
    out: list[int] = []
    for t in ids.tolist():
        if t == eos_id:
            break
        if pad_id is not None and t == pad_id:
            continue
        out.append(int(t))
    return out


class Generate:
    """Ray Data class UDF; `__call__` is pure apart from the model's own state."""

    def __init__(self, config: JobConfig, model_path: str, crash_marker: str | None = None) -> None:
        from model import load_pretrained, resolve_checkpoint

        self.device = pick_device(config.device)
        if self.device.type == "cpu":
            torch.set_num_threads(config.model_threads or max(1, int(config.cpus_per_model_worker)))
        self.dtype = pick_dtype(config.dtype, self.device)
        self.model, self.processor = load_pretrained(model_path, device=str(self.device), dtype=self.dtype)
        self.revision = config.model_revision or checkpoint_fingerprint(resolve_checkpoint(model_path))
        self.gen_kwargs = dict(
            max_new_tokens=config.max_new_tokens,
            temperature=config.temperature,
            top_p=config.top_p,
            repetition_penalty=config.repetition_penalty,
            seed=config.seed,
        )
        self.crash_marker = crash_marker

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["id"])
        status = batch["status"].astype(object).copy()
        error = batch["error"].astype(object).copy()
        text = np.array([""] * n, dtype=object)
        gen_tokens = np.zeros(n, dtype=np.int64)
        gen_ms = np.full(n, -1.0)
        todo = [i for i in range(n) if status[i] == "ok"]
        if todo:
            self._maybe_crash()
            try:
                results = self._generate([batch["prep"][i] for i in todo])
            except Exception:  # noqa: BLE001 - isolate the failing item(s) below
                results = []
                for i in todo:
                    try:
                        results.extend(self._generate([batch["prep"][i]]))
                    except Exception as e:  # noqa: BLE001
                        results.append(e)
            for i, r in zip(todo, results):
                if isinstance(r, Exception):
                    status[i], error[i] = "error", redact(f"{batch['source'][i]}: generation failed: {type(r).__name__}: {r}")
                else:
                    text[i], gen_tokens[i], gen_ms[i] = r
        out = {k: v for k, v in batch.items() if k != "prep"}  # the tensors are spent; do not ship them on
        out.update(status=status, error=error, text=text, generated_tokens=gen_tokens, generate_ms=gen_ms,
                   model_revision=np.array([self.revision] * n, dtype=object))
        out["finish_reason"] = finish_reasons(status, gen_tokens, self.gen_kwargs["max_new_tokens"])
        return out

    def _generate(self, blobs: list[bytes]) -> list[tuple[str, int, float]]:

        preps = [self.processor.unpack(unpack_arrays(b)) for b in blobs]
        inputs = self.processor.collate(preps).to(self.device, dtype=self.dtype)
        t0 = time.perf_counter()
        with torch.inference_mode():
            tokens = self.model.generate(inputs, **self.gen_kwargs)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) * 1000.0  # the batch's wall time: what each of its items waited
        eos, pad = self.processor.eos_id, getattr(self.processor, "pad_id", None)
        out = []
        for row in tokens.cpu().numpy():
            ids = trim_generated(row, eos, pad if pad != eos else None)
            out.append((self.processor.decode(ids, skip_special_tokens=False), len(ids), ms))
        return out

    def _maybe_crash(self) -> None:
        marker = self.crash_marker
        if marker and not os.path.exists(marker):
            Path(marker).write_text(json.dumps({"pid": os.getpid()}))
            os._exit(1)


def finish_reasons(status: np.ndarray, generated: np.ndarray, max_new_tokens: int) -> np.ndarray:
    """Why each row stopped: error (no output), length (ran into max_new_tokens), else eos."""
    return np.array(["error" if st != "ok" else "length" if g >= max_new_tokens else "eos"
                     for st, g in zip(status, generated)], dtype=object)
