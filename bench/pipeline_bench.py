"""Pipeline overhead benchmark: the same N items through the Ray Data pipeline and through the model
actor's engine alone (items decoded and tiled beforehand), on this machine's CPUs with a mini smoke checkpoint.

    python bench/pipeline_bench.py [--items 200] [--max-new-tokens 8] [--repeats 3]
        [--ray-model-workers 2 --ray-model-threads 1] [--out bench/results-pipeline.json]

The pipeline decodes, tiles, generates, post-processes and writes every row to a SQLite sink; the
engine path times only `Engine.generate` over the prepared items (the pipeline's ceiling). Rates are
steady state, measured differentially: each path runs the first N/5 items and then all N items
(fresh sinks), and rate = (N - N/5) / (wall(N) - wall(N/5)); start-up (Ray, actors, model loading),
paid once per job, cancels out, and so does the burstiness of rows reaching the driver.
Target: pipeline/engine >= 0.85. On a small CPU box the CPU actor's decoding and tiling take cores
from the model actor, which the engine-alone path does not pay.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from connectors.sinks import open_sink  # noqa: E402
from pipeline.checkpoint import smoke_checkpoint  # noqa: E402
from pipeline.config import JobConfig  # noqa: E402
from pipeline.preprocess import Preprocess, source_options, unpack_arrays  # noqa: E402
from pipeline.source import iter_ref_blocks  # noqa: E402
from pipeline.summary import Tally  # noqa: E402


def make_items(root: Path, n: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        img = Image.new("RGB", (160, 120), tuple(int(v) for v in rng.integers(0, 256, 3)))
        ImageDraw.Draw(img).text((8, 8), f"bench item {i}", fill="white")
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        (root / f"item{i:04d}.png").write_bytes(buf.getvalue())


def steady_rate(landed: list[tuple[float, int]], n: int) -> float:
    """Items/s from when 10% of the rows had landed to the last row."""
    total = 0
    warm = None
    for t, k in landed:
        total += k
        if warm is None and total >= max(1, n // 10):
            warm = (t, total)
    t_end = landed[-1][0]
    return (total - warm[1]) / (t_end - warm[0]) if t_end > warm[0] else float("nan")


def run_ray(config: JobConfig, model_path: str) -> dict:
    import ray

    from pipeline.run import build_dataset

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    sink = open_sink(config.output)
    tally = Tally()
    landed: list[tuple[float, int]] = []
    t0 = time.perf_counter()
    try:
        for batch in build_dataset(config, model_path, frozenset()).iter_batches(batch_size=None, batch_format="numpy"):
            rows, _ = tally.add(batch)
            sink.write(rows)
            landed.append((time.perf_counter(), len(rows)))
    finally:
        sink.close()
        ray.shutdown()
    return {"wall_s": time.perf_counter() - t0, "ok": tally.ok, "failed": tally.failed,
            "steady_items_per_s": steady_rate(landed, tally.ok + tally.failed)}


def run_engine(config: JobConfig, model_path: str) -> dict:
    """The engine alone on the same items: every item decoded and tiled first (not timed), then all
    of them through one `Engine.generate` with the job's sampling parameters, as the model actor runs them."""
    import torch

    from model import Engine, SamplingParams, load_pretrained
    from pipeline.generate import engine_limits

    torch.set_num_threads(config.model_threads or 1)
    pre = Preprocess(config, model_path)
    model, processor = load_pretrained(model_path)
    preps = []
    for block in iter_ref_blocks(config.input, source_options(config), config.limit):
        refs = {k: np.array(block.column(k).to_pylist(), dtype=object) for k in block.column_names}
        for out in pre(refs):
            # uint8 tiles, as the model stage submits them (the engine normalizes them, inside the timed run)
            preps += [processor.unpack(unpack_arrays(b), pixels=True)
                      for b, st in zip(out["prep"], out["status"]) if st == "ok"]
    engine = Engine(model, processor, **engine_limits(config))
    # warm-up, not timed: 8 items, so that a decode-only step of 8 sequences (Engine.COMPILE_AT) compiles the
    # CPU decode step here; the pipeline's actors compile inside both of a pair's runs, which cancels out
    engine.generate(preps[:8], SamplingParams(max_new_tokens=8))
    t0 = time.perf_counter()
    results = engine.generate(preps, SamplingParams(max_new_tokens=config.max_new_tokens))
    return {"wall_s": time.perf_counter() - t0, "ok": sum(r.finish_reason != "error" for r in results),
            "failed": sum(r.finish_reason == "error" for r in results)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=200)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4, help="preprocessing and generate() batch size, both paths")
    p.add_argument("--model-threads", type=int, default=os.cpu_count() or 1,
                   help="torch threads for generation, the same in both paths")
    p.add_argument("--ray-model-workers", type=int, default=1,
                   help="model actors in the Ray path (each gets --ray-model-threads torch threads)")
    p.add_argument("--ray-model-threads", type=int, default=None,
                   help="torch threads per model actor in the Ray path (default: --model-threads)")
    p.add_argument("--repeats", type=int, default=3, help="runs per path; the median rate is reported")
    p.add_argument("--out", default=str(REPO / "bench" / "results-pipeline.json"))
    args = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="pagemill-bench-"))
    small = max(1, args.items // 5)
    make_items(work / "items", args.items)
    make_items(work / "small", small)  # the same first N/5 items (same seed)
    model_path = str(smoke_checkpoint())
    common = dict(model=model_path, max_new_tokens=args.max_new_tokens,
                  model_threads=args.model_threads, cpu_batch_size=args.batch_size, model_batch_size=args.batch_size)
    # Each path gets the layout that suits it: one process uses every core for generate(); the
    # pipeline may split the cores between several single-threaded model actors instead.
    cpus = os.cpu_count() or 1
    ray_threads = args.ray_model_threads or args.model_threads
    per_path = {
        "engine": common,
        "ray": {**common, "model_threads": ray_threads, "num_model_workers_min": args.ray_model_workers,
                "num_model_workers_max": args.ray_model_workers,
                "cpus_per_model_worker": max(0.1, (cpus - 1) / args.ray_model_workers)},
    }
    results: dict = {}
    runs: dict[str, list] = {"engine": [], "ray": []}
    for rep in range(args.repeats):  # alternate the paths so slow phases of the machine hit both
        for name, run in (("engine", run_engine), ("ray", run_ray)):
            cfg = per_path[name]
            r_small = run(JobConfig(input=str(work / "small"), output=f"sqlite:///{work}/{name}-{rep}-small.db", **cfg), model_path)
            r_full = run(JobConfig(input=str(work / "items"), output=f"sqlite:///{work}/{name}-{rep}.db", **cfg), model_path)
            assert r_small["ok"] == small and r_full["ok"] == args.items, f"{name}: not every item ok"
            rate = (args.items - small) / (r_full["wall_s"] - r_small["wall_s"])
            runs[name].append({"small": r_small, "full": r_full, "steady_items_per_s": rate})
            print(f"{name} run {rep + 1}: {rate:.2f} items/s", flush=True)
    results = {name: {"runs": r, "steady_items_per_s": statistics.median(x["steady_items_per_s"] for x in r)}
               for name, r in runs.items()}
    ratio = results["ray"]["steady_items_per_s"] / results["engine"]["steady_items_per_s"]
    report = {
        "items": args.items, "max_new_tokens": args.max_new_tokens, "model": "smoke tiny mini (random)",
        "model_threads": args.model_threads, "cpu_batch_size": args.batch_size, "model_batch_size": args.batch_size,
        "ray_model_workers": args.ray_model_workers, "ray_model_threads": ray_threads,
        "cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
        "method": "differential wall time: (N - N/5) / (wall(N) - wall(N/5)), median of --repeats alternating runs",
        "repeats": args.repeats, "ray_steady_items_per_s": round(results["ray"]["steady_items_per_s"], 2),
        "engine_steady_items_per_s": round(results["engine"]["steady_items_per_s"], 2),
        "ratio": round(ratio, 3), "target_ratio": 0.85, "meets_target": ratio >= 0.85,
        "details": results, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"steady state: ray pipeline {report['ray_steady_items_per_s']} items/s, engine alone "
          f"{report['engine_steady_items_per_s']} items/s, ratio {report['ratio']} (target >= 0.85)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
