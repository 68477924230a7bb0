"""Checks the driver makes before Ray starts, so that a wrong model, input or output costs one clear
line (`pagemill <job>: error: ...`, exit 1) instead of a Ray traceback minutes later."""

from __future__ import annotations

import logging
import uuid
from itertools import islice
from pathlib import Path

from connectors.errors import InputError, SinkError
from connectors.redact import redact
from pipeline.config import JobConfig


class PreflightError(RuntimeError):
    """The job cannot run; `str(e)` is one line naming the input, output or model and the reason."""


def check_model(model_path: str, shown: str) -> None:
    """Resolve the checkpoint and read its config and tokenizer (not the weights): what every actor will do."""
    try:
        from model import load_processor

        load_processor(model_path)
    except Exception as e:  # noqa: BLE001 - any failure here is the model's, said in one line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if shown not in msg and model_path not in msg:
            msg = f"{shown}: {msg}"
        raise PreflightError(redact(f"model {msg}" if not msg.startswith(("checkpoint", "model")) else msg)) from None


def check_input(config: JobConfig) -> None:
    """The source exists and lists at least one item (Parquet tables: at least one row)."""
    from connectors.sources import list_inputs
    from pipeline.preprocess import source_options

    quiet = logging.getLogger("connectors.sources")  # its "no inputs found" warning: said below, once
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        first = list(islice(list_inputs(config.input, options=source_options(config)), 1))
    except InputError as e:
        raise PreflightError(redact(str(e))) from None
    except Exception as e:  # noqa: BLE001
        raise PreflightError(redact(f"input {config.input}: cannot list: {type(e).__name__}: {e}")) from None
    finally:
        quiet.setLevel(level)
    if not first:
        raise PreflightError(redact(f"input {config.input}: no inputs found (nothing with an image/PDF extension, "
                                    "and no Parquet rows)"))


def check_output_owner(sink: object, config: JobConfig) -> None:
    """Refuse to mix rows of another job or config_hash into one output, unless --append says so."""
    if config.append:
        return
    from connectors.scan import counts

    mine = (config.job, config.config_hash())
    others = {k: n for k, n in counts(sink, ["job", "config_hash"]).items() if k != mine}
    if not others:
        return
    (job, chash), n = max(others.items(), key=lambda kv: kv[1])
    total = sum(others.values())
    more = f" (and {len(others) - 1} other job/config combination(s))" if len(others) > 1 else ""
    raise PreflightError(
        f"output {redact(config.output)} already holds {total} row(s) of another job or configuration: "
        f"{n} of job {job} with config_hash {chash}{more}; this run is job {config.job} with config_hash "
        f"{mine[1]}. Pass --append to add to it anyway, or write to a new output or --table")


def check_writable_dir(where: str, what: str, config: JobConfig) -> None:
    """A local directory we will create files in (created if missing), or an s3:// prefix (listed)."""
    if where.startswith("s3://"):
        from connectors.s3 import s3_client, split_s3_url
        from pipeline.run import s3_options

        bucket, _ = split_s3_url(where)
        try:
            s3_client(s3_options(config)).head_bucket(Bucket=bucket)
        except Exception as e:  # noqa: BLE001
            raise PreflightError(redact(f"{what} {where}: cannot reach bucket {bucket}: {e}")) from None
        return
    path = Path(where.removeprefix("file://"))
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".pagemill-probe-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise PreflightError(f"{what} {where}: not writable: {e.strerror or e}") from None


def check_output(sink: object, config: JobConfig) -> None:
    """The sink opened (so it is reachable); a local Parquet directory must also be writable."""
    out = config.output
    if "://" not in out or out.startswith("file://"):
        check_writable_dir(out, "output", config)
    try:
        check_output_owner(sink, config)
    except (SinkError, OSError) as e:
        raise PreflightError(redact(f"output {out}: cannot read it: {e}")) from None


def preflight_inputs(config: JobConfig, model_path: str) -> None:
    """Model and input, before the output is even opened (a typo in --model creates nothing)."""
    check_model(model_path, config.model)
    check_input(config)


def preflight_outputs(config: JobConfig, sink: object) -> None:
    """The opened output and the markdown folder: each failure is a PreflightError with one line."""
    check_output(sink, config)
    if config.markdown:
        check_writable_dir(config.markdown, "markdown folder", config)
