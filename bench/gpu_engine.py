"""The engine's GPU check, in one call (after bench/gpu_check.py, which writes the real-size tiny checkpoint).

    python bench/gpu_engine.py --device cuda --checkpoint /tmp/pagemill-tiny-full \
        --fixtures .fixtures/tiny_mha-seed1 .fixtures/small_mla-seed1 --json $OUT/gpu_engine.json

0. One layer's decode attention at tiny's, small's and base's shapes (`bench/paged_decode_bench.py`): the paged
   kernel against gathering the blocks and SDPA, ms and GB/s, and whether they agree (a Triton kernel that does
   not compile on this device shows here first).
1. `model.bench` on the real-size checkpoint for the page and catalog workloads (bf16): items/s, prefill and
   decode tokens/s, vision tiles/s, peak memory, roofline fraction, and the one-at-a-time baseline in the same run;
   page again with decode attention gathering blocks (no paged kernel: the previous default), and reading the
   cache in place along strided runs, and page with every step eager (no CUDA graphs for the decode-only steps),
   with and without the paged kernel.
2. Per fixture case: the engine's bf16 greedy tokens against `model.generate`'s bf16 tokens and against the
   reference's float32 tokens (leading tokens that agree).
3. A profile of the engine's steps (page and catalog, `--profile-requests` requests, every step eager so the
   kernels show): the prefill phase, then 20 decode steps, each as a torch.profiler table sorted by device time,
   with wall ms per step.
4. Shared experts folded into the routed grouped product against their own MLP (`bench/moe_fold.py`): one MoE
   layer at tiny's, small's and base's shapes, 256 and 4,096 tokens, eager and as a CUDA graph.
5. The pipeline's model stage on the device without Ray: `Preprocess` then the `Generate` UDF's `__call__` on
   one packed batch of the bundled samples, constructed directly (needs pyyaml and pypdfium2 besides pydantic).
`--size mini` rehearses all of it on CPU in a minute. The last line printed is the JSON written to `--json`.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model import Engine, SamplingParams, load_pretrained  # noqa: E402
from model import bench as model_bench  # noqa: E402
from model.smoke import write_smoke_checkpoint  # noqa: E402

sys.path.insert(0, str(REPO / "bench"))
import moe_fold  # noqa: E402
import paged_decode_bench  # noqa: E402
from gpu_check import _agree, _free  # noqa: E402


def engine_vs_generate(fixture: Path, device: str, dtype: torch.dtype, n: int = 8) -> dict:
    from tests.test_model_golden import load_cases

    model, processor = load_pretrained(str(fixture), device=device, dtype=dtype)
    cases = load_cases(Path(str(fixture) + ".golden.npz"))
    preps = {c: processor.prepare(g["conversation"], g["images"]) for c, g in cases.items()}
    engine = Engine(model, processor, kv_cache_tokens=32768)
    got = engine.generate(list(preps.values()), SamplingParams(max_new_tokens=n, ignore_eos=True))
    out = {}
    for (case, prep), r in zip(preps.items(), got):
        ref = model.generate(processor.collate([prep]).to(device), max_new_tokens=n, eos_token_id=-1)[0].tolist()
        want = cases[case]["gen_tokens"].reshape(-1).tolist()
        out[case] = {"engine_vs_generate": _agree(r.tokens, ref), "engine_vs_reference_fp32": _agree(r.tokens, want),
                     "generate_vs_reference_fp32": _agree(ref, want), "of": n}
    del engine, model
    _free(device)
    return out


def profile_steps(checkpoint: Path | None, device: str, dtype: torch.dtype, workload: str, requests: int,
                  decode_steps: int = 20, loaded: tuple | None = None) -> dict:
    """Where a step's time goes: torch.profiler over the engine's prefill phase (admission, vision, prefill
    chunks mixed with decode) and then `decode_steps` pure decode steps, as tables sorted by device time
    (CPU time on CPU), with each phase's wall ms per step."""
    from torch.profiler import ProfilerActivity, profile

    model, processor = loaded or load_pretrained(str(checkpoint), device=device, dtype=dtype)
    preps = model_bench.synthetic_requests(processor, workload, requests)
    engine = Engine(model, processor, cuda_graphs=False)  # eager: a graph replay hides its kernels from the table
    params = SamplingParams(max_new_tokens=decode_steps + 8, ignore_eos=True)
    engine.generate(preps[:1], SamplingParams(max_new_tokens=2, ignore_eos=True))  # warm-up
    cuda = device.startswith("cuda")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    out = {"workload": workload, "requests": requests}
    for r in preps:
        engine.submit(r, params)
    for phase in ("prefill", "decode"):
        model_bench.sync(device)
        t0, steps = time.perf_counter(), 0
        with profile(activities=acts) as prof:
            while engine.has_work() and (steps < decode_steps if phase == "decode" else
                                         engine._queue or any(s.prefilling for s in engine._running)):
                engine.step()
                steps += 1
            model_bench.sync(device)
        wall = time.perf_counter() - t0
        try:
            table = prof.key_averages().table(sort_by=key, row_limit=30)
        except (AttributeError, KeyError, ValueError):  # older profilers name it cuda time
            table = prof.key_averages().table(sort_by=key.replace("device", "cuda"), row_limit=30)
        out[phase] = {"steps": steps, "wall_ms_per_step": round(wall / max(steps, 1) * 1000, 3), "table": table}
    while engine.has_work():
        engine.step()
    del engine, model
    _free(device)
    return out


def pipeline_stage(checkpoint: Path, device: str) -> dict:
    """Preprocess + Generate.__call__ on the samples, on `device`, no Ray."""
    from pipeline.config import JobConfig
    from pipeline.generate import Generate
    from pipeline.preprocess import Preprocess, source_options
    from pipeline.source import iter_ref_blocks

    out_dir = tempfile.mkdtemp(prefix="pagemill-gpu-")
    config = JobConfig(input=str(REPO / "samples"), output=f"sqlite:///{out_dir}/rows.db", model=str(checkpoint),
                       device=device, max_new_tokens=64, cpu_batch_size=8, model_batch_size=8)
    pre = Preprocess(config, str(checkpoint))
    parts: dict[str, list] = {}
    for block in iter_ref_blocks(config.input, source_options(config), None):
        refs = {k: np.array(block.column(k).to_pylist(), dtype=object) for k in block.column_names}
        for b in pre(refs):
            for k, v in b.items():
                parts.setdefault(k, []).append(v)
    batch = {k: np.concatenate(v) for k, v in parts.items()}
    t0 = time.perf_counter()
    gen = Generate(config, str(checkpoint))
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = asyncio.run(gen(batch))
    wall = time.perf_counter() - t0
    gen.engine.close()
    return {"items": len(res["id"]), "status": [str(s) for s in res["status"]],
            "finish_reason": [str(f) for f in res["finish_reason"]],
            "generated_tokens": [int(t) for t in res["generated_tokens"]],
            "errors": [str(e) for e in res["error"] if str(e)], "load_s": round(load_s, 2), "wall_s": round(wall, 3),
            "device": str(gen.device), "dtype": str(gen.dtype)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--checkpoint", type=Path, default=Path("/tmp/pagemill-tiny-full"))
    ap.add_argument("--size", choices=["mini", "full"], default="full", help="mini: a quick rehearsal on CPU")
    ap.add_argument("--fixtures", type=Path, nargs="*", default=[])
    ap.add_argument("--page-requests", type=int, default=256)
    ap.add_argument("--catalog-requests", type=int, default=512)
    ap.add_argument("--max-new-tokens", type=int, default=None, help="override the workloads' 700/150 (rehearsal)")
    ap.add_argument("--profile-requests", type=int, default=64, help="requests in the profiled steps")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    dtype = torch.bfloat16 if args.device.startswith("cuda") or args.size == "full" else torch.float32
    result: dict = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "device": args.device,
                    "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                    "torch": torch.__version__}
    if not (args.checkpoint / "config.json").exists():
        t0 = time.perf_counter()
        write_smoke_checkpoint(args.checkpoint, "tiny", size=args.size, seed=0, dtype="bfloat16")
        result["write_checkpoint_s"] = round(time.perf_counter() - t0, 1)

    def step(name, fn):
        print(f"{name} ...", flush=True)
        try:
            result[name] = fn()
        except Exception as e:  # noqa: BLE001 - record and go on: one failing part must not lose the others
            result[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        _free(args.device)
        if args.json:  # written after every part, so a time-out still leaves the figures so far
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=1) + "\n")

    extra = ["--max-new-tokens", str(args.max_new_tokens)] if args.max_new_tokens else []

    def bench(workload: str, n: int, *flags: str) -> dict:
        return model_bench.main(["--checkpoint", str(args.checkpoint), "--device", args.device, "--dtype",
                                 str(dtype).split(".")[1], "--workload", workload, "--requests", str(n),
                                 "--baseline-requests", "1", "--skip-static", *flags, *extra])

    # most telling first (a time-out keeps what ran): the kernel alone, the default (decode-only steps as CUDA
    # graphs, attention through the paged kernel), the same gathering blocks (the previous default) and reading
    # the pool along evenly spaced runs, catalog, the engine's tokens against generate's, then page eager
    small = ["--batch", "2", "4", "--repeats", "2"] if args.size == "mini" else []  # the interpreter is slow
    step("paged_decode", lambda: paged_decode_bench.main(["--device", args.device, "--size", args.size, *small]))
    step("tiny_page", lambda: bench("page", args.page_requests))
    step("tiny_page_gathered", lambda: bench("page", args.page_requests, "--paged-attention", "off"))
    step("tiny_page_in_place", lambda: bench("page", args.page_requests, "--in-place-decode", "on"))
    step("tiny_catalog", lambda: bench("catalog", args.catalog_requests))
    for fixture in args.fixtures:
        step(f"engine_vs_generate_{fixture.name}", lambda f=fixture: engine_vs_generate(f, args.device, dtype))
    step("tiny_page_no_graphs", lambda: bench("page", args.page_requests, "--cuda-graphs", "off"))
    step("tiny_page_gathered_no_graphs", lambda: bench("page", args.page_requests, "--paged-attention", "off",
                                                       "--cuda-graphs", "off"))
    step("moe_fold", lambda: moe_fold.main(["--device", args.device, "--size", args.size]))
    for workload, n in (("page", args.profile_requests), ("catalog", args.profile_requests)):
        step(f"profile_{workload}", lambda w=workload, n=n: profile_steps(args.checkpoint, args.device, dtype, w, n))
    step("pipeline_stage", lambda: pipeline_stage(args.checkpoint, args.device))
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
