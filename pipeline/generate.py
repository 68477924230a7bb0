"""Model stage: a Ray Data async class UDF; one continuous-batching engine per actor.

Ray Data keeps several batches in flight per actor (`batches_in_flight`); each `__call__`
submits its items to the actor's engine and awaits them, so the engine decodes the sequences of
all those batches together and refills a finished sequence's place at once, while Ray Data's
batches stay small and rows keep streaming to the sink. Rows that are not `ok` pass through.
With `expert_parallel_size: N` the actor holds no model itself: it leads a group of N rank actors
(pipeline/ep_group.py) and spreads its items over their engines.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
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
# Test hook: the same for the last rank of an expert-parallel group, dying on its first item (ep_group.py).
CRASH_RANK_ENV = "PAGEMILL_TEST_CRASH_EP_RANK_ONCE"


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


def item_seed(seed: int | None, item_id: str) -> int | None:
    """Each item's own sampling seed: reproducible whatever batch or run the item lands in."""
    if seed is None:
        return None
    return int(hashlib.sha256(f"{seed}:{item_id}".encode()).hexdigest()[:15], 16)


def engine_limits(config: JobConfig) -> dict:
    return {k: v for k, v in dict(max_seqs=config.engine_max_seqs, kv_cache_tokens=config.engine_kv_cache_tokens,
                                  max_step_tokens=config.engine_max_step_tokens,
                                  cuda_graphs=config.engine_cuda_graphs,
                                  paged_attention=config.engine_paged_attention,
                                  compiled_decode=config.engine_compiled_decode).items() if v is not None}


def batches_in_flight(config: JobConfig, gpu: bool) -> int:
    if config.batches_in_flight is not None:
        return config.batches_in_flight
    seqs = config.engine_max_seqs or (256 if gpu else 64)
    return max(2, math.ceil(2 * seqs / config.model_batch_size))


class Generate:
    """Ray Data class UDF. `__call__` is a coroutine, so Ray runs several on one actor at once."""

    def __init__(self, config: JobConfig, model_path: str, crash_marker: str | None = None,
                 rank_gpus: float = 0.0, rank_crash_marker: str | None = None, run_tag: str = "") -> None:
        from model import Engine, SamplingParams, load_pretrained, load_processor, resolve_checkpoint

        self.group = self.engine = None
        if config.expert_parallel_size > 1:
            from pipeline.ep_group import Group

            self.processor = load_processor(model_path)
            self.group = Group(config, model_path, rank_gpus, rank_crash_marker, tag=run_tag)
        else:
            self.device = pick_device(config.device)
            if self.device.type == "cpu":
                torch.set_num_threads(config.model_threads or max(1, int(config.cpus_per_model_worker)))
            self.dtype = pick_dtype(config.dtype, self.device)
            self.model, self.processor = load_pretrained(model_path, device=str(self.device), dtype=self.dtype)
            self.engine = Engine(self.model, self.processor, **engine_limits(config)).start()
        self.revision = config.model_revision or checkpoint_fingerprint(resolve_checkpoint(model_path))
        self.params = SamplingParams(
            max_new_tokens=config.max_new_tokens, temperature=config.temperature, top_p=config.top_p,
            repetition_penalty=config.repetition_penalty, no_repeat_ngram_size=config.no_repeat_ngram_size,
            no_repeat_window=config.no_repeat_window)
        self.seed = config.seed
        self.crash_marker = crash_marker

    async def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["id"])
        status = batch["status"].astype(object).copy()
        error = batch["error"].astype(object).copy()
        text = np.array([""] * n, dtype=object)
        gen_tokens = np.zeros(n, dtype=np.int64)
        gen_ms, queue_ms, prefill_ms = np.full(n, -1.0), np.full(n, -1.0), np.full(n, -1.0)
        finish = np.array(["error" if status[i] == "error" else "" for i in range(n)], dtype=object)
        todo = [i for i in range(n) if status[i] == "ok"]
        if todo:
            self._maybe_crash()
            results = await asyncio.gather(*(self._one(batch, i) for i in todo))
            for i, r in zip(todo, results):
                finish[i] = r.finish_reason
                if r.finish_reason == "error":
                    status[i], error[i] = "error", redact(f"{batch['source'][i]}: {r.error}")
                else:
                    text[i] = self.processor.decode(r.tokens, skip_special_tokens=False)
                    gen_tokens[i], gen_ms[i] = len(r.tokens), r.total_ms
                    queue_ms[i], prefill_ms[i] = r.queue_ms, r.prefill_ms
        out = {k: v for k, v in batch.items() if k != "prep"}  # the tensors are spent; do not ship them on
        out.update(status=status, error=error, text=text, generated_tokens=gen_tokens, generate_ms=gen_ms,
                   queue_ms=queue_ms, prefill_ms=prefill_ms, finish_reason=finish,
                   model_revision=np.array([self.revision] * n, dtype=object))
        return out

    async def _one(self, batch: dict[str, np.ndarray], i: int):
        from model import Result

        try:
            params = self.params.model_copy(update={"seed": item_seed(self.seed, str(batch["id"][i]))})
            if self.group is not None:
                return await self.group.run(batch["prep"][i], params)
            arrays = unpack_arrays(batch["prep"][i])
            rows = arrays.pop("image_rows", None)  # from a vision worker (pipeline/vision.py)
            prep = self.processor.unpack(arrays, pixels=True)  # the engine normalizes them on its device
            rows = torch.from_numpy(np.array(rows)) if rows is not None else None
            return await asyncio.wrap_future(self.engine.submit(prep, params, rows))
        except Exception as e:  # noqa: BLE001 - one bad item is one error row
            return Result([], "error", f"generation failed: {type(e).__name__}: {e}")

    def _maybe_crash(self) -> None:
        marker = self.crash_marker
        if marker and not os.path.exists(marker):
            Path(marker).write_text(json.dumps({"pid": os.getpid()}))
            os._exit(1)

