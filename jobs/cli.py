"""The jobs' shared command line: one flag per JobConfig field, generated so they cannot drift apart."""

from __future__ import annotations

import argparse
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import SecretStr

from pipeline.config import ConfigError, JobConfig, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """(inner type, optional) for X | None annotations."""
    if get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return args[0], True
    return annotation, False


def build_parser(job: str) -> argparse.ArgumentParser:
    default_config = CONFIGS / f"{job}.yaml"
    p = argparse.ArgumentParser(
        prog=f"python -m jobs.{job}",
        description=f"pagemill {job}: run DeepSeek-VL2 over images and PDF pages with Ray Data, one row per page/image. "
        "Options come from --config (YAML), then these flags override them.",
        argument_default=None,
    )
    p.add_argument("--config", default=str(default_config) if default_config.is_file() else None,
                   help="YAML file with any of the options below (flat keys, same names with underscores)")
    for name, field in JobConfig.model_fields.items():
        if name == "job":
            continue
        typ, _ = _base_type(field.annotation)
        help_text = field.description or name
        if not field.is_required():
            help_text += f" [built-in default: {field.default!r}]" if typ is not SecretStr else ""
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
        p.add_argument(_flag(name), **kwargs)
    return p


def parse_config(job: str, argv: list[str] | None = None) -> JobConfig:
    args = vars(build_parser(job).parse_args(argv))
    path = args.pop("config")
    return load_config(path, args | {"job": job})


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
    except (InputError, SinkError, ValueError, RuntimeError) as e:
        print(f"pagemill {job}: error: {redact(e)}", file=sys.stderr)
        return 1
    return 0
