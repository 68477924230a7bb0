"""`run_job`: compose the stages into one streaming Ray Data pipeline and feed the sink.

source refs -> Preprocess (CPU actors) -> Generate (model actors) -> postprocess (tasks)
-> the driver iterates blocks as they finish and writes them. Nothing materializes the dataset;
the sink sees rows within one batch of their generation, which is what makes resume cheap.
"""

from __future__ import annotations

import os
import time
import warnings
from typing import Any

from connectors.redact import redact
from connectors.s3 import S3Options
from connectors.sinks import open_sink
from pipeline.checkpoint import resolve_model
from pipeline.config import JobConfig
from pipeline.contact_sheet import ContactSheet
from pipeline.generate import CRASH_ENV, CRASH_RANK_ENV, Generate, batches_in_flight
from pipeline.postprocess import postprocess
from pipeline.preprocess import Preprocess, source_options
from pipeline.summary import Summary, Tally, side_path


def s3_options(config: JobConfig) -> S3Options:
    return S3Options(endpoint_url=config.s3_endpoint_url, region=config.s3_region,
                     aws_access_key_id=config.aws_access_key_id, aws_secret_access_key=config.aws_secret_access_key)


def _init_ray(config: JobConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    if config.ray_address or os.environ.get("RAY_ADDRESS"):  # `ray job submit` sets RAY_ADDRESS
        ray.init(address=config.ray_address)
    else:
        # "local", not None: None would silently join whatever `ray start` last ran on this machine
        # (or hang on its stale address); --ray-address auto opts into that.
        ray.init(address="local", include_dashboard=False)


def _gpus_per_worker(config: JobConfig) -> float:
    import ray

    if config.gpus_per_worker is not None:
        return config.gpus_per_worker
    if config.device == "cpu":
        return 0.0
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def build_dataset(config: JobConfig, model_path: str, done: frozenset[str]) -> Any:
    """The lazy Ray Data plan; nothing runs until the driver iterates it."""
    import ray
    from ray.data import TaskPoolStrategy

    from pipeline.source import InputsDatasource

    # One row per block. Ray Data merges small outputs into blocks of up to 128 MiB and a task emits a
    # block only when it is full or the task ends, so result rows (a few hundred bytes) would reach the
    # sink in late bursts; and size-based splits of blocks of tiles make model batches ragged. With
    # row-sized blocks every stage bundles exactly its batch size, and rows stream to the sink.
    # A crashed actor (OOM, node loss, segfault) is replaced and its in-flight batch retried on the new one.
    restarts = dict(max_restarts=config.max_actor_restarts, max_task_retries=config.max_actor_restarts)
    # Ray Data merges small blocks up to its target block size (128 MiB): for a listing of paths that
    # is a million refs in one block, i.e. one preprocessing task for the whole job and no parallelism
    # across CPU actors. The read alone is planned with a 1 MiB target (thousands of paths, or a few
    # MB of Parquet image bytes, per task); later stages keep the default, because per-task overhead
    # dominates small batches (measured: 3x slower with one-batch blocks on a 2-core machine).
    ctx = ray.data.DataContext.get_current()
    default_block = ctx.target_max_block_size
    ctx.target_max_block_size = 1024 * 1024
    try:
        ds = ray.data.read_datasource(InputsDatasource(config.input, source_options(config), config.limit),
                                      override_num_blocks=1, num_cpus=0)
    finally:
        ctx.target_max_block_size = default_block
    with warnings.catch_warnings():  # Ray 2.60 has no named parameter for restarts yet
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        ds = _model_stages(ds, config, model_path, done, restarts)
    # Light work; zero CPUs so it never waits behind actors that hold every core of a small machine.
    return ds.map_batches(
        postprocess,
        fn_kwargs=dict(job=config.job, model=config.model, prompt=config.effective_prompt,
                       config_hash=config.config_hash()),
        # Explicit, or Ray bundles these tiny blocks up to 1 MiB and rows would reach the sink in bursts.
        batch_size=config.model_batch_size,
        num_cpus=0,
        # Bounded so a few long-lived workers do it; unbounded 0-CPU tasks each spawn a fresh process.
        compute=TaskPoolStrategy(size=config.num_model_workers_max),
        batch_format="numpy",
    )


def _model_stages(ds: Any, config: JobConfig, model_path: str, done: frozenset[str], restarts: dict) -> Any:
    from ray.data import ActorPoolStrategy

    ds = ds.map_batches(
        Preprocess,
        fn_constructor_kwargs=dict(config=config, model_path=model_path, done_ids=done),
        batch_size=config.cpu_batch_size,
        compute=ActorPoolStrategy(size=config.num_cpu_workers),
        num_cpus=config.cpus_per_cpu_worker,
        batch_format="numpy",
        **restarts,
    )
    gpus = _gpus_per_worker(config)
    if config.vision_workers:
        from pipeline.vision import EncodeImages

        ds = ds.map_batches(
            EncodeImages,
            fn_constructor_kwargs=dict(config=config, model_path=model_path),
            batch_size=config.model_batch_size,
            compute=ActorPoolStrategy(size=config.vision_workers),
            num_gpus=gpus,
            num_cpus=config.cpus_per_model_worker,
            batch_format="numpy",
            **restarts,
        )
    # Several batches in flight per actor, all feeding the actor's one engine (Generate is async).
    in_flight = batches_in_flight(config, gpu=gpus > 0)
    # Expert parallelism: the Ray Data actor only leads its group of rank actors, which hold the
    # replica's CPUs and GPUs in their own placement group (pipeline/ep_group.py).
    ep = config.expert_parallel_size > 1
    ds = ds.map_batches(
        Generate,
        fn_constructor_kwargs=dict(config=config, model_path=model_path, crash_marker=os.environ.get(CRASH_ENV),
                                   rank_gpus=gpus, rank_crash_marker=os.environ.get(CRASH_RANK_ENV)),
        batch_size=config.model_batch_size,
        compute=ActorPoolStrategy(min_size=config.num_model_workers_min, max_size=config.num_model_workers_max,
                                  max_tasks_in_flight_per_actor=in_flight, max_concurrent_calls_per_actor=in_flight),
        num_gpus=0 if ep else gpus,
        num_cpus=0 if ep else config.cpus_per_model_worker,
        batch_format="numpy",
        **restarts,
    )
    return ds


def run_job(config: JobConfig, *, quiet: bool = False) -> Summary:
    """Run one job to completion; returns (and writes beside the output) its summary."""
    import ray

    model_path, smoke = resolve_model(config.model)
    sink = open_sink(config.output, table=config.table, s3=s3_options(config))
    sheet = None
    try:
        done = frozenset(sink.done_ids(include_errors=not config.retry_errors))
        _init_ray(config)
        ds = build_dataset(config, model_path, done)
        if config.job == "catalog" and config.contact_sheet:
            sheet = ContactSheet(side_path(config, "contact_sheet.html"), config.contact_sheet_max)
        tally = Tally()
        t0 = time.perf_counter()
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                rows, thumbs = tally.add(batch)
                if rows:
                    sink.write(rows)
                if sheet is not None:
                    for row, thumb in zip(rows, thumbs):
                        sheet.add(row, thumb)
        except ray.exceptions.RayTaskError as e:
            raise _unwrap(e) from None
        # Parquet: drop rows that this run's parts supersede (e.g. retried errors), one row per id.
        # Only after a complete run; a killed run's leftovers are dropped by the next run's compact.
        sink.compact()
        summary = tally.summary(config, wall_s=time.perf_counter() - t0, smoke=smoke,
                                prior_done=len(done), contact_sheet=str(sheet.path) if sheet else None)
    finally:
        if sheet is not None:
            sheet.close()
        sink.close()
    summary.write(side_path(config, "summary.json"))
    if not quiet:
        print(summary.render(), flush=True)
    return summary


def _unwrap(e: Exception) -> Exception:
    """A bad source raises InputError inside the read task; show the user that, not a Ray traceback."""
    from connectors.errors import InputError

    cause = getattr(e, "cause", None)
    if isinstance(cause, InputError):
        return InputError(str(cause))
    return RuntimeError(redact(f"pipeline failed: {type(cause or e).__name__}: {cause or e}"))

