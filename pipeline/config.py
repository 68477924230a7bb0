"""The job configuration: one flat pydantic model, loaded from YAML and overridden by CLI flags.

Flat on purpose: every field is one CLI flag and one YAML key, so a typo in either is an error
that names the field instead of a silently ignored setting.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

JobName = Literal["digitize", "catalog"]

DEFAULT_PROMPTS: dict[str, str] = {
    "digitize": "<image>\n<|grounding|>Convert the document to markdown.",
    "catalog": "<image>\n<|grounding|>Describe the items in this photo and read any label text.",
}


class ConfigError(ValueError):
    """A bad configuration; the message names the offending field(s)."""


class JobConfig(BaseModel):
    """Everything a job run needs. Descriptions double as `--help` text."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # --- what to run on, where to write -----------------------------------------------------
    job: JobName = Field("digitize", description="Which job: digitize (document -> markdown) or catalog (photo -> items).")
    input: str = Field(..., description="Source: local folder (recursive), glob, s3://bucket/prefix, or a Parquet table (local or s3://) of image bytes or URIs.")
    output: str = Field(..., description="Sink: a directory (Parquet, local or s3://), sqlite:///path.db, or postgresql://... DSN.")
    table: str = Field("pagemill_rows", description="Table name for SQLite/PostgreSQL sinks (letters, digits, underscore).")
    summary_path: str | None = Field(None, description="Where to write the run summary JSON; default beside the output (Parquet dir: DIR.summary.json; SQLite: <db>.summary.json; PostgreSQL/s3://: $PAGEMILL_CACHE/runs/).")
    limit: int | None = Field(None, gt=0, description="Process at most this many inputs (files / Parquet rows) from the source listing.")

    # --- model ------------------------------------------------------------------------------
    model: str = Field(..., description="Checkpoint: local dir, s3:// URL, Hugging Face hub id, or 'smoke' (a random mini checkpoint; outputs are meaningless).")
    model_revision: str | None = Field(None, description="Recorded in every row; default: a fingerprint of the checkpoint's config and weight index.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Device for model actors; auto = cuda when the actor sees a GPU, else cpu.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="Model dtype; auto = bfloat16 on cuda, float32 on cpu.")
    prompt: str | None = Field(None, description="User prompt; must contain exactly one <image>. Default depends on the job.")
    max_new_tokens: int = Field(1024, gt=0, le=8192, description="Maximum generated tokens per item.")
    temperature: float = Field(0.0, ge=0.0, le=5.0, description="Sampling temperature; 0 = greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass (used when temperature > 0).")
    repetition_penalty: float = Field(1.0, gt=0.0, le=5.0, description="Repetition penalty (1.0 = none).")
    seed: int | None = Field(0, description="Sampling seed; each item samples with its own seed, made from this and its id, so its text does not depend on batching or resume. null for nondeterministic sampling.")
    no_repeat_ngram_size: int = Field(0, ge=0, le=200, description="Ban any token that would repeat an n-gram of this size within the last no_repeat_window generated tokens (DeepSeek-OCR uses 20-30 against loops on tables); 0 = off.")
    no_repeat_window: int = Field(0, ge=0, description="Window (generated tokens) of the n-gram guard; 0 = all generated tokens.")

    # --- Ray: batch and pool sizes ------------------------------------------------------------
    ray_address: str | None = Field(None, description="Ray cluster address ('auto' = the cluster `ray start` runs on this machine); default: RAY_ADDRESS (set by `ray job submit`), else a new local Ray.")
    cpu_batch_size: int = Field(4, gt=0, description="Inputs per preprocessing batch (CPU actors).")
    model_batch_size: int = Field(4, gt=0, description="Items per Ray Data batch sent to a model actor; its engine batches across all batches in flight.")
    num_cpu_workers: int = Field(1, gt=0, description="Preprocessing (decode, rasterize, tile) actors.")
    cpus_per_cpu_worker: float = Field(1.0, gt=0, description="CPUs reserved by each preprocessing actor.")
    num_model_workers_min: int = Field(1, gt=0, description="Minimum model actors.")
    num_model_workers_max: int = Field(1, gt=0, description="Maximum model actors (the pool autoscales between min and max).")
    cpus_per_model_worker: float = Field(1.0, gt=0, description="CPUs reserved by each model actor.")
    gpus_per_worker: float | None = Field(None, ge=0, description="GPUs per model actor; default 1 when the cluster has GPUs, else 0 (model on CPU).")
    model_threads: int | None = Field(None, gt=0, description="torch threads in a CPU model actor; default: its CPU reservation, at least 1.")
    batches_in_flight: int | None = Field(None, gt=0, description="Ray Data batches each model actor works on at once, all feeding its one engine; default: enough to keep the engine full (2 x engine_max_seqs / model_batch_size, at least 2).")
    engine_max_seqs: int | None = Field(None, gt=0, description="Sequences a model actor's engine decodes at once; default 256 on a GPU, 64 on CPU (also capped by the KV cache).")
    engine_kv_cache_tokens: int | None = Field(None, gt=0, description="KV cache size in tokens; default: planned from the GPU's free memory (CPU: an eighth of the available RAM, at most 1 GiB).")
    engine_max_step_tokens: int | None = Field(None, gt=0, description="Tokens per engine step (decode tokens + prefill chunks); default 8192 on a GPU, 2048 on CPU.")
    engine_cuda_graphs: bool | None = Field(None, description="Replay the engine's decode-only steps as CUDA graphs at bucketed batch sizes; default on when the model is on a GPU without expert parallelism (a capture that fails turns them off by itself). Off: every step runs eagerly.")
    engine_paged_attention: bool | None = Field(None, description="Decode attention through the paged Triton kernel, which reads each sequence's cached blocks in place; default on when the model is on a GPU and triton is present (a kernel that fails the engine's check at start turns it off by itself). Off: decode gathers the blocks and runs SDPA.")
    engine_compiled_decode: bool | None = Field(None, description="CPU: decode-only steps run as one torch.compile'd function (inductor C++), which fuses the step's many small operations; default on for CPU where it covers the model (MHA, at most 4 routed experts per chosen one: tiny and the test checkpoints) unless PAGEMILL_COMPILED_DECODE=0. The first such step compiles (~10-40 s on two cores; a failure logs and turns it off). Off: every step eager.")
    expert_parallel_size: int = Field(1, ge=1, description="Processes (GPUs) per model replica: the routed experts sharded over a group of this many rank actors in one STRICT_PACK placement group on one node, each with cpus_per_model_worker and gpus_per_worker; the Ray Data model actor leads the group and spreads its items over the ranks. 1 = one process per replica.")
    vision_workers: int = Field(0, ge=0, description="Actors running the vision tower and projector as their own stage, passing image embeddings (float32 on CPU) to the model actors; each with cpus_per_model_worker and gpus_per_worker. 0 = the vision tower runs inside the model actors.")
    max_actor_restarts: int = Field(3, ge=-1, description="Restarts of a crashed actor (its batch is retried on the replacement); -1 = unlimited.")

    # --- decode limits ------------------------------------------------------------------------
    max_pixels: int = Field(40_000_000, gt=0, description="Refuse images with more pixels than this (decompression bombs).")
    max_bytes: int = Field(256 * 1024 * 1024, gt=0, description="Refuse inputs larger than this many bytes.")
    max_pdf_pages: int = Field(1000, gt=0, description="Refuse PDFs with more pages than this.")
    pdf_longest_side: int = Field(1288, ge=64, le=8192, description="Rasterize PDF pages so that their longest side has this many pixels.")
    page_range: str | None = Field(None, description="PDF pages to process, 1-based, e.g. '1-3,7,10-'; default all.")

    # --- sources ------------------------------------------------------------------------------
    id_column: str | None = Field(None, description="Parquet sources: column whose value is stored as the row's source name.")
    bytes_column: str | None = Field(None, description="Parquet sources: column holding image/PDF bytes.")
    uri_column: str | None = Field(None, description="Parquet sources: column holding URIs/paths.")
    s3_endpoint_url: str | None = Field(None, description="S3 endpoint (MinIO, moto...); default AWS or AWS_ENDPOINT_URL.")
    s3_region: str | None = Field(None, description="S3 region; default from the AWS environment.")
    aws_access_key_id: SecretStr | None = Field(None, description="S3 access key id; prefer the standard AWS chain (env, profile, role).")
    aws_secret_access_key: SecretStr | None = Field(None, description="S3 secret key; prefer the standard AWS chain.")
    db_password_env: str | None = Field(None, description="PostgreSQL sinks: name of the environment variable holding the password (keeps it out of the DSN and the process list; PGPASSWORD, ~/.pgpass and service files work too).")

    # --- resume and outputs -------------------------------------------------------------------
    retry_errors: bool = Field(False, description="On resume, reprocess items whose stored row has status error.")
    contact_sheet: bool = Field(False, description="Write an HTML QA contact sheet of the whole output beside it (default: on for catalog, off for digitize).")
    contact_sheet_max: int = Field(500, ge=0, description="At most this many items on the contact sheet (errors first).")
    markdown: str | None = Field(None, description="digitize: write one Markdown file per input document under this directory (local or s3://), at <path relative to the input root>.md.")
    append: bool = Field(False, description="Write into an output that already holds rows of another job or config_hash (refused otherwise).")
    parquet_part_mb: float = Field(32.0, gt=0, description="Parquet outputs: buffer rows into part files of about this many MB (or parquet_part_seconds, whichever first).")
    parquet_part_seconds: float = Field(120.0, gt=0, description="Parquet outputs: write the buffered rows as a part after at most this many seconds.")

    @field_validator("table")
    @classmethod
    def _table_name(cls, v: str) -> str:
        import re

        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,62}", v):
            raise ValueError("must be letters, digits and underscores, starting with a letter or underscore")
        return v

    @field_validator("page_range")
    @classmethod
    def _page_range(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        from connectors.decode import parse_page_range

        parse_page_range(v)
        return v

    @field_validator("input", "output", "model")
    @classmethod
    def _non_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v.strip()

    @model_validator(mode="before")
    @classmethod
    def _contact_sheet_default(cls, data: Any) -> Any:
        # On for catalog (it is that job's QA page), off for digitize unless asked for.
        if isinstance(data, dict) and data.get("contact_sheet") is None:
            data = {**data, "contact_sheet": data.get("job", "digitize") == "catalog"}
        return data

    @model_validator(mode="after")
    def _check(self) -> "JobConfig":
        if self.num_model_workers_max < self.num_model_workers_min:
            raise ValueError("num_model_workers_max must be >= num_model_workers_min")
        if self.prompt is not None and self.prompt.count("<image>") != 1:
            raise ValueError("prompt must contain exactly one <image> placeholder")
        if self.markdown is not None and self.job != "digitize":
            raise ValueError("markdown is a digitize option")
        if self.engine_cuda_graphs and self.expert_parallel_size > 1:
            raise ValueError("engine_cuda_graphs cannot be used with expert_parallel_size > 1 (its steps hold collectives)")
        return self

    # ------------------------------------------------------------------------------------------

    @property
    def effective_prompt(self) -> str:
        return self.prompt if self.prompt is not None else DEFAULT_PROMPTS[self.job]

    def config_hash(self) -> str:
        """Hash of the fields that change what a row contains, so rows from different settings can be told apart."""
        keys = (
            "job", "model", "model_revision", "dtype", "max_new_tokens", "temperature", "top_p",
            "repetition_penalty", "seed", "pdf_longest_side", "max_pixels",
        )
        payload = {k: getattr(self, k) for k in keys} | {"prompt": self.effective_prompt}
        # options added later join the hash only when set, so earlier outputs keep their hash
        payload |= {k: getattr(self, k) for k in ("no_repeat_ngram_size", "no_repeat_window") if getattr(self, k)}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def public_dict(self) -> dict[str, Any]:
        """The config without secrets, with output/input redacted: safe for logs and summaries."""
        from connectors.redact import redact

        d = self.model_dump(mode="json", exclude={"aws_access_key_id", "aws_secret_access_key"})
        for k in ("input", "output", "model", "s3_endpoint_url", "ray_address"):
            if d.get(k):
                d[k] = redact(d[k])
        return d


def _describe(e: ValidationError, origin: str) -> str:
    lines = []
    for err in e.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(config)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown option (check the spelling; see --help)"
        elif err["type"] == "missing":
            msg = "required (set it in the config file or with a flag)"
        # never echo the input value: it may be a secret
        lines.append(f"  {field}: {msg}")
    return f"invalid configuration{origin}:\n" + "\n".join(lines)


def load_config(path: str | Path | list[str | Path] | None, overrides: dict[str, Any] | None = None) -> JobConfig:
    """YAML files (optional; later ones layered over earlier ones) + overrides (CLI flags; None values mean
    "not given") -> validated JobConfig."""
    data: dict[str, Any] = {}
    paths = [] if path is None else list(path) if isinstance(path, list) else [path]
    origin = f" (from {', '.join(map(str, paths))} and flags)" if paths else ""
    for path in paths:
        data.update(read_yaml(path))
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return JobConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_describe(e, origin)) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """One flat YAML config file as a dict; a missing, unreadable or non-mapping file is a ConfigError."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must be a mapping of option: value")
    return loaded
