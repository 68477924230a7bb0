"""pagemill as a Ray Data transform, in the style of `ray.data.llm` processors.

    processor = build_processor("digitize", model="deepseek-ai/deepseek-vl2-tiny", max_new_tokens=512)
    rows = processor(ray.data.read_binary_files("scans/", include_paths=True))   # lazy Dataset of rows
    rows.write_parquet("s3://bucket/pages/")                                     # any Ray writer

The input Dataset has a `path` column (local paths or s3:// URLs, read by the CPU actors), a
`bytes` column (image/PDF bytes, e.g. from `read_binary_files`), or both (then `path` names the row's
`source`). The output has the columns of `connectors.rows.OutputRow`, one row per image / PDF page.
Resume, sinks, Markdown and the contact sheet belong to `run_job`; here the user's Ray code owns I/O.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pyarrow as pa

from connectors.rows import arrow_table
from pipeline.config import JobConfig


def _to_refs(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """User columns -> the refs the Preprocess stage reads: source (name or URI), data (bytes or None), key."""
    n = len(next(iter(batch.values())))
    paths = batch.get("path")
    data = batch.get("bytes")
    if paths is None and data is None:
        raise ValueError("pagemill: the input Dataset needs a `path` column (paths/URLs) or a `bytes` column")
    source = np.array([str(p) for p in paths] if paths is not None else [f"row {i}" for i in range(n)], dtype=object)
    return {"source": source,
            "data": np.array([bytes(d) for d in data] if data is not None else [None] * n, dtype=object),
            "key": source.copy()}


def _to_rows(batch: dict[str, np.ndarray]) -> pa.Table:
    import json

    rows = [json.loads(r) for r, st in zip(batch["row"], batch["status"]) if st != "skipped"]
    return arrow_table(rows)


class Processor:
    """Dataset -> Dataset of pagemill rows; the model is resolved and checked once, on the driver."""

    def __init__(self, config: JobConfig) -> None:
        from pipeline.checkpoint import resolve_model
        from pipeline.preflight import check_model

        self.config = config
        self.model_path, self.smoke = resolve_model(config.model)
        check_model(self.model_path, config.model)

    def __call__(self, ds: Any) -> Any:
        from ray.data import TaskPoolStrategy

        from pipeline.postprocess import postprocess
        from pipeline.run import _model_stages

        c = self.config
        refs = ds.map_batches(_to_refs, batch_format="numpy", batch_size=c.cpu_batch_size, num_cpus=0)
        restarts = dict(max_restarts=c.max_actor_restarts, max_task_retries=c.max_actor_restarts)
        with warnings.catch_warnings():  # Ray 2.60 has no named parameter for restarts yet
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
            out = _model_stages(refs, c, self.model_path, frozenset(), restarts)
        out = out.map_batches(postprocess, fn_kwargs=dict(job=c.job, model=c.model, prompt=c.effective_prompt,
                                                          config_hash=c.config_hash()),
                              batch_size=c.model_batch_size, num_cpus=0,
                              compute=TaskPoolStrategy(size=c.num_model_workers_max), batch_format="numpy")
        return out.map_batches(_to_rows, batch_format="numpy", batch_size=None, num_cpus=0)


def build_processor(job: str = "digitize", *, model: str, **options: Any) -> Processor:
    """A processor for `job` with any JobConfig option (max_new_tokens, prompt, num_model_workers_max ...).

    `input`/`output` are not used: the Dataset is the input and the caller writes the result.
    """
    options.setdefault("contact_sheet", False)
    return Processor(JobConfig(job=job, model=model, input="(dataset)", output="(dataset)", **options))
