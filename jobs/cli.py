"""The jobs' shared command line: one flag per JobConfig field, generated so they cannot drift apart.

`--help` shows only the job's own options, grouped, with the effective defaults (the job's built-in
config file over the field defaults). `--config FILE` is layered over those built-in defaults.
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import SecretStr

from pipeline.config import ConfigError, JobConfig, load_config, read_yaml

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

GROUPS: dict[str, list[str]] = {
    "input": ["input", "limit", "page_range", "id_column", "bytes_column", "uri_column"],
    "output": ["output", "table", "summary_path", "markdown", "contact_sheet", "contact_sheet_max", "append",
               "retry_errors", "parquet_part_mb", "parquet_part_seconds"],
    "model": ["model", "model_revision", "device", "dtype", "prompt"],
    "generation": ["max_new_tokens", "temperature", "top_p", "repetition_penalty", "seed", "no_repeat_ngram_size",
                   "no_repeat_window"],
    "resources": ["ray_address", "cpu_batch_size", "model_batch_size", "num_cpu_workers", "cpus_per_cpu_worker",
                  "num_model_workers_min", "num_model_workers_max", "cpus_per_model_worker", "gpus_per_worker",
                  "model_threads", "max_actor_restarts", "batches_in_flight", "engine_max_seqs",
                  "engine_kv_cache_tokens", "engine_max_step_tokens", "engine_cuda_graphs", "engine_paged_attention",
                  "engine_compiled_decode", "expert_parallel_size", "vision_workers"],
    "limits": ["max_pixels", "max_bytes", "max_pdf_pages", "pdf_longest_side"],
    "storage credentials": ["s3_endpoint_url", "s3_region", "aws_access_key_id", "aws_secret_access_key",
                            "db_password_env"],
}
ONLY_FOR: dict[str, str] = {"markdown": "digitize"}  # options that make sense for one job only

EXAMPLES = {
    "digitize": [
        "pagemill digitize --input scans/ --output out/pages --model deepseek-ai/deepseek-vl2-tiny --markdown out/md",
        "pagemill digitize --input s3://bucket/pdfs/ --output postgresql://me@db/pages --model s3://models/dsvl2-tiny/ "
        "--page-range 1-3 --num-model-workers-max 4",
    ],
    "catalog": [
        "pagemill catalog --input photos/ --output out/catalog.db --model deepseek-ai/deepseek-vl2-small",
        "pagemill catalog --input photos/ --output s3://bucket/catalog/ --model smoke --limit 20 --contact-sheet-max 50",
    ],
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """(inner type, optional) for X | None annotations."""
    if get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return args[0], True
    return annotation, False


def job_fields(job: str) -> list[str]:
    return [n for n in JobConfig.model_fields if n != "job" and ONLY_FOR.get(n, job) == job]


def builtin_config(job: str) -> Path | None:
    path = CONFIGS / f"{job}.yaml"
    return path if path.is_file() else None


def effective_defaults(job: str) -> dict[str, Any]:
    """Field defaults with the job's built-in config file over them (what a run gets without flags)."""
    out = {n: f.default for n, f in JobConfig.model_fields.items() if not f.is_required()}
    out["prompt"] = None
    if (path := builtin_config(job)) is not None:
        out.update(read_yaml(path))
    if out.get("prompt") is None:
        from pipeline.config import DEFAULT_PROMPTS

        out["prompt"] = DEFAULT_PROMPTS[job]
    return out


def build_parser(job: str, prog: str | None = None) -> argparse.ArgumentParser:
    examples = "\n".join("  " + e for e in EXAMPLES[job])
    p = argparse.ArgumentParser(
        prog=prog or f"pagemill {job}",
        description=f"pagemill {job}: run DeepSeek-VL2 over images and PDF pages with Ray Data, one row per "
        "page/image. Defaults below are this job's built-in ones; --config FILE is layered over them and "
        "flags override both.",
        epilog=f"examples:\n{examples}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=None,
    )
    defaults = effective_defaults(job)
    fields = set(job_fields(job))
    grouped = {n for names in GROUPS.values() for n in names}
    missing = fields - grouped
    assert not missing, f"options without a --help group: {sorted(missing)}"
    general = p.add_argument_group("configuration")
    general.add_argument("--config", default=None, metavar="FILE",
                         help="YAML file with any of the options below (flat keys, same names with underscores), "
                         "layered over the built-in defaults")
    for group, names in GROUPS.items():
        g = p.add_argument_group(group)
        for name in names:
            if name in fields:
                _add(g, name, defaults)
    return p


def _add(group: Any, name: str, defaults: dict[str, Any]) -> None:
    field = JobConfig.model_fields[name]
    typ, _ = _base_type(field.annotation)
    help_text = (field.description or name).replace("%", "%%")
    if field.is_required():
        help_text += " [required]"
    elif typ is not SecretStr:
        help_text += f" [default: {defaults.get(name)!r}]".replace("%", "%%")
    kwargs: dict[str, Any] = {"dest": name, "help": help_text, "default": None}
    if typ is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif get_origin(typ) is Literal:
        kwargs["choices"] = list(get_args(typ))
    elif typ in (int, float):
        kwargs["type"] = typ
        kwargs["metavar"] = "N"
    else:
        kwargs["metavar"] = "VALUE"
    group.add_argument(_flag(name), **kwargs)


def parse_config(job: str, argv: list[str] | None = None) -> JobConfig:
    args = vars(build_parser(job).parse_args(argv))
    files = [p for p in (builtin_config(job), args.pop("config")) if p is not None]
    return load_config(files, args | {"job": job})


def main(job: str, argv: list[str] | None = None) -> int:
    from connectors.errors import InputError, SinkError
    from connectors.redact import redact

    try:
        config = parse_config(job, argv)
    except ConfigError as e:
        print(f"pagemill {job}: {e}", file=sys.stderr)
        return 2
    from pipeline.run import run_job

    try:
        run_job(config)
    except (InputError, SinkError, ValueError, RuntimeError, OSError) as e:
        print(f"pagemill {job}: error: {first_line(redact(e))}", file=sys.stderr)
        return 1
    return 0


def first_line(text: str) -> str:
    """Errors are one line: the first non-empty line of a message (tracebacks stay in Ray's logs)."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0] if lines else "failed"
