"""`run_job`: compose the stages into one streaming Ray Data pipeline and feed the sink.

source refs -> Preprocess (CPU actors) -> Generate (model actors) -> postprocess (tasks)
-> the driver iterates blocks as they finish and writes them. Nothing materializes the dataset;
the sink sees rows within one batch of their generation, which is what makes resume cheap.
"""

from __future__ import annotations

import logging
import os
import re
import time
import uuid
import warnings
from typing import Any

from connectors.redact import redact
from connectors.s3 import S3Options
from connectors.sinks import open_sink
from pipeline.checkpoint import resolve_model
from pipeline.config import JobConfig
from pipeline.generate import CRASH_ENV, CRASH_RANK_ENV, Generate, batches_in_flight
from pipeline.outputs import RunOutputs
from pipeline.postprocess import postprocess
from pipeline.preflight import preflight_inputs, preflight_outputs
from pipeline.preprocess import Preprocess, source_options
from pipeline.progress import quiet_ray_data, quiet_ray_init
from pipeline.resume import DoneSet, load_done_set
from pipeline.summary import Summary, Tally, side_path, utc_now


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


def build_dataset(config: JobConfig, model_path: str, done: DoneSet | frozenset[str], run_tag: str = "") -> Any:
    """The lazy Ray Data plan; nothing runs until the driver iterates it. `run_tag` names this run's
    expert-parallel placement groups (see `pipeline.ep_group.remove_groups`)."""
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
        ds = _model_stages(ds, config, model_path, done, restarts, run_tag)
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


def _model_stages(ds: Any, config: JobConfig, model_path: str, done: DoneSet | frozenset[str], restarts: dict,
                  run_tag: str = "") -> Any:
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
                                   rank_gpus=gpus, rank_crash_marker=os.environ.get(CRASH_RANK_ENV), run_tag=run_tag),
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

    started_at = utc_now()
    model_path, smoke = resolve_model(config.model)
    preflight_inputs(config, model_path)  # before Ray starts: a bad model/input/output is one clear line
    sink = open_sink(config.output, table=config.table, s3=s3_options(config), password_env=config.db_password_env,
                     part_bytes=int(config.parquet_part_mb * 1024 * 1024), part_seconds=config.parquet_part_seconds)
    outputs = None
    run_tag = ""
    try:
        preflight_outputs(config, sink)
        with quiet_ray_init():
            _init_ray(config)
        quiet_ray_data()
        done = load_done_set(sink, include_errors=not config.retry_errors)  # compact; shared once via Ray
        run_tag = uuid.uuid4().hex[:12]
        ds = build_dataset(config, model_path, done, run_tag)
        outputs = RunOutputs(config, sink, started_at=started_at, smoke=smoke, listing=_listing(config))
        tally = Tally()
        t0 = time.perf_counter()
        _hide_actor_death_tracebacks()
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                rows, thumbs = tally.add(batch)
                if rows:
                    sink.write(rows)
                outputs.add(rows, thumbs, tally)
        except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as e:
            raise _unwrap(e, config) from None
        # Parquet: drop rows that this run's parts supersede (e.g. retried errors), one row per id.
        # Only after a complete run; a killed run's leftovers are dropped by the next run's compact.
        sink.compact()
        sheet, docs = outputs.finish(sink, tally)
        summary = tally.summary(config, started_at=started_at, wall_s=time.perf_counter() - t0, smoke=smoke,
                                prior_done=len(done), contact_sheet=sheet, markdown_documents=docs)
    finally:
        if run_tag and config.expert_parallel_size > 1 and ray.is_initialized():
            from pipeline.ep_group import remove_groups

            remove_groups(run_tag)  # this run's groups hold CPUs/GPUs until the driver exits otherwise
        if outputs is not None:
            outputs.close()
        sink.close()
    summary.write(side_path(config, "summary.json", started_at))
    if not quiet:
        print(summary.render(), flush=True)
    return summary


def _listing(config: JobConfig) -> Any:
    from connectors.sources import list_inputs

    return list_inputs(config.input, options=source_options(config))


def _unwrap(e: Exception, config: JobConfig | None = None) -> Exception:
    """What the user should read instead of a Ray traceback: the bad source, or which actor died how often."""
    import ray

    from connectors.errors import InputError

    if isinstance(e, ray.exceptions.RayActorError):
        return RuntimeError(_actor_death(e, config.max_actor_restarts if config else None))
    cause = getattr(e, "cause", None)
    if isinstance(cause, InputError):
        return InputError(str(cause))
    return RuntimeError(redact(f"pipeline failed: {type(cause or e).__name__}: {cause or e}"))


class _HideActorDeath(logging.Filter):
    """Ray Data logs an actor's death with its full traceback before raising it; we print one line instead.

    `hide` is Ray Data's own switch: its console handler drops the record, its log file still gets it.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        import ray

        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, ray.exceptions.RayActorError):
            record.hide = True
        return True


def _hide_actor_death_tracebacks() -> None:
    logger = logging.getLogger("ray.data._internal.execution.streaming_executor_state")
    if not any(isinstance(f, _HideActorDeath) for f in logger.filters):
        logger.addFilter(_HideActorDeath())


def _actor_death(e: Exception, restarts: int | None) -> str:
    """One line from Ray's multi-line ActorDiedError: which stage's actor, how often it died, and why."""
    text = str(e)
    fields = dict(re.findall(r"^\s*(class_name|pid): (.+)$", text, flags=re.MULTILINE))
    cls = fields.get("class_name", "an actor")
    stage = "a model actor" if "Generate" in cls else "a CPU (preprocessing) actor" if "Preprocess" in cls else "an actor"
    reason = re.search(r"Worker exit detail: (.+?)(?:\.|$)", text, flags=re.MULTILINE)
    why = reason.group(1) if reason else text.strip().splitlines()[0]
    n = restarts + 1 if restarts is not None and restarts >= 0 else None
    times = f"{n} time{'s' if n != 1 else ''}" if n else "repeatedly"
    return redact(f"{stage} died more often than max_actor_restarts ({restarts}) allows: {cls}"
                  f"{' pid ' + fields['pid'] if 'pid' in fields else ''} died {times} (last: {why}); "
                  "the rows already written are kept, a re-run resumes after them")
