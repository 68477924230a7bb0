"""The engine issue's GPU run, in one device call: most telling part first, each part only if it fits a deadline.

    python3 bench/gpu_engine.py --device cuda --fixtures .fixtures/tiny_mha-seed1 .fixtures/small_mla-seed1 \
        --json $OUT/gpu_engine.json --deadline-s 500 [--parts NAME ...]

Real-size models are built in memory on the device (`model.smoke.random_pretrained`: the official keys and
shapes through the normal loading checks, random weights; nothing written or read), one variant at a time,
shared by the parts that use it. Parts, in the default order:
  kernel_canary        the paged decode kernel alone at tiny's and small's shapes, in a subprocess: a kernel that
                       faults would poison this process's CUDA context and lose every part after it; if the
                       subprocess fails, the engine parts run with `--paged-attention off` (recorded)
  tiny_page            model.bench page (256 requests): the default engine (CUDA graphs for decode-only steps,
                       the paged decode kernel), with the one-at-a-time baseline (1 request) in the same run
  tiny_catalog         model.bench catalog (512 requests), with its baseline
  bf16_fixtures        per reference fixture case: greedy bf16 tokens of generate (and fp32, and fp32 on bf16-rounded
                       weights) against the reference's fp32 tokens, with the logit gap where they part; and the
                       engine's bf16 tokens against generate's (bench/gpu_check.fixture_agreement, engine_vs_generate)
  small_page           small (MLA, absorbed decode) page, 256 requests, with its baseline
  paged_decode         one layer's decode attention alone: the paged kernel against gather + SDPA, tiny's, small's
                       and base's shapes, 64 and 256 sequences (bench/paged_decode_bench)
  base_page            base page, 128 requests, no baseline
  tiny_page_gathered   A/B: decode attention gathering blocks + SDPA (no paged kernel)
  tiny_page_no_graphs  A/B: every step eager
  profile_page         torch.profiler tables (device time) of the engine's prefill phase and 20 decode steps, eager
  moe_fold             shared experts folded into the routed grouped product against their own MLP (bench/moe_fold)
  tiny_page_in_place   A/B: decode reading the cache along strided runs
  tiny_page_gathered_no_graphs, profile_catalog, small_catalog
  pipeline_stage       the pipeline's model stage on the device without Ray (Preprocess, then Generate.__call__ on
                       the bundled samples) on a mini checkpoint written here: it runs, rows are ok
A part starts only when the time so far plus its estimate (ESTIMATE_S) fits `--deadline-s`; the JSON is rewritten
after every part, so a time-out keeps what was measured. The last line printed is a one-line summary of the
figures the issue's targets name. `--size mini` rehearses all of it on CPU (tests/test_model_bench.py).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
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
from model.smoke import random_pretrained, write_smoke_checkpoint  # noqa: E402

sys.path.insert(0, str(REPO / "bench"))
import gpu_check  # noqa: E402
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


# seconds each part is expected to take on the H200, in the default order (a part is skipped when it would pass
# the deadline); the builds of a variant (a few seconds: random draws on the device) fall in its first part
ESTIMATE_S = {"kernel_canary": 40, "tiny_page": 100, "tiny_catalog": 45, "bf16_fixtures": 40, "small_page": 120,
              "paged_decode": 40, "base_page": 90, "tiny_page_gathered": 50, "tiny_page_no_graphs": 60,
              "profile_page": 30, "moe_fold": 30, "tiny_page_in_place": 50, "tiny_page_gathered_no_graphs": 60,
              "profile_catalog": 25, "small_catalog": 60, "pipeline_stage": 30}


class Models:
    """One variant on the device at a time: asking for another drops the one held."""

    def __init__(self, device: str, dtype: torch.dtype, size: str) -> None:
        self.device, self.dtype, self.size, self.name, self.loaded, self.build_s = device, dtype, size, None, None, {}

    def drop(self) -> None:
        self.loaded = self.name = None
        _free(self.device)

    def get(self, variant: str) -> tuple:
        if self.name != variant:
            self.drop()
            t0 = time.perf_counter()
            self.loaded = random_pretrained(variant, self.size, device=self.device, dtype=self.dtype)
            model_bench.sync(self.device)
            self.build_s[variant] = round(time.perf_counter() - t0, 2)
            self.name = variant
        return self.loaded


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", choices=["mini", "full"], default="full", help="mini: a quick rehearsal on CPU")
    ap.add_argument("--fixtures", type=Path, nargs="*", default=[])
    ap.add_argument("--parts", nargs="*", default=list(ESTIMATE_S), choices=list(ESTIMATE_S))
    ap.add_argument("--deadline-s", type=float, default=480.0)
    ap.add_argument("--page-requests", type=int, default=256)
    ap.add_argument("--catalog-requests", type=int, default=512)
    ap.add_argument("--base-requests", type=int, default=128)
    ap.add_argument("--max-new-tokens", type=int, default=None, help="override the workloads' 700/150 (rehearsal)")
    ap.add_argument("--profile-requests", type=int, default=64)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    cuda = args.device.startswith("cuda")
    dtype = torch.bfloat16 if cuda or args.size == "full" else torch.float32
    result: dict = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "device": args.device,
                    "device_name": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
                    "dtype": str(dtype).split(".")[1], "elapsed_s": {}, "skipped": []}
    models = Models(args.device, dtype, args.size)
    extra = ["--max-new-tokens", str(args.max_new_tokens)] if args.max_new_tokens else []

    paged_off: list[str] = []  # set by the canary when the kernel fails alone

    def canary() -> dict:
        cmd = [sys.executable, str(REPO / "bench" / "paged_decode_bench.py"), "--device", args.device, "--size",
               args.size, "--variants", "tiny", "small", "--batch", "8", "--repeats", "2"]
        try:
            run = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
            rc, out, err = run.returncode, run.stdout, run.stderr
        except subprocess.TimeoutExpired as e:
            rc, out, err = "timeout", str(e.stdout or ""), str(e.stderr or "")
        lines = out.strip().splitlines()
        got = json.loads(lines[-1]) if rc == 0 and lines and lines[-1].startswith("{") else None
        ok = got is not None and not any(isinstance(v, dict) and "error" in v for v in got.values())
        if not ok:
            paged_off[:] = ["--paged-attention", "off"]
        return {"ok": ok, "rc": rc, "result": got, "stderr_tail": err[-2000:],
                "engine_parts_paged_attention": "auto" if ok else "off"}

    def bench(variant: str, workload: str, n: int, *flags: str) -> dict:
        if paged_off and "--paged-attention" not in flags:
            flags = (*flags, *paged_off)
        return model_bench.main(["--checkpoint", f"random:{variant}-{args.size}", "--device", args.device,
                                 "--dtype", result["dtype"], "--workload", workload, "--requests", str(n),
                                 "--baseline-requests", "1", "--skip-static", *flags, *extra],
                                loaded=models.get(variant))

    def fixtures() -> dict:
        out: dict = {}
        for f in args.fixtures:
            out[f.name] = {"generate": gpu_check.fixture_agreement(f, args.device),
                           "engine": engine_vs_generate(f, args.device, dtype)}
        agree = [row["bfloat16_agree"] for f in out.values() for row in f["generate"].values()]
        same = [c["engine_vs_generate"] == c["of"] for f in out.values() for c in f["engine"].values()]
        out["bf16_cases_agreeing_8"] = f"{sum(a >= 8 for a in agree)}/{len(agree)}"
        out["engine_equal_generate_bf16"] = f"{sum(same)}/{len(same)}"
        return out

    def profile(workload: str) -> dict:
        return profile_steps(None, args.device, dtype, workload, args.profile_requests, loaded=models.get("tiny"))

    def stage() -> dict:
        models.drop()  # the stage loads its own model, from a mini checkpoint written here (a check, not a speed)
        ckpt = Path(tempfile.mkdtemp(prefix="pagemill-stage-")) / "tiny-mini"
        write_smoke_checkpoint(ckpt, "tiny", size="mini", seed=0)
        return pipeline_stage(ckpt, args.device)

    small = ["--batch", "2", "4", "--repeats", "2"] if args.size == "mini" else []
    parts = {
        "kernel_canary": canary,
        "paged_decode": lambda: ({"skipped": "the kernel canary failed: not run in this process"} if paged_off else
                                 paged_decode_bench.main(["--device", args.device, "--size", args.size, *small])),
        "tiny_page": lambda: bench("tiny", "page", args.page_requests),
        "tiny_catalog": lambda: bench("tiny", "catalog", args.catalog_requests),
        "bf16_fixtures": fixtures,
        "small_page": lambda: bench("small", "page", args.page_requests),
        "base_page": lambda: bench("base", "page", args.base_requests, "--skip-baseline"),
        "tiny_page_gathered": lambda: bench("tiny", "page", args.page_requests, "--paged-attention", "off",
                                            "--skip-baseline"),
        "tiny_page_no_graphs": lambda: bench("tiny", "page", args.page_requests, "--cuda-graphs", "off",
                                             "--skip-baseline"),
        "profile_page": lambda: profile("page"),
        "moe_fold": lambda: moe_fold.main(["--device", args.device, "--size", args.size]),
        "tiny_page_in_place": lambda: bench("tiny", "page", args.page_requests, "--in-place-decode", "on",
                                            "--skip-baseline"),
        "tiny_page_gathered_no_graphs": lambda: bench("tiny", "page", args.page_requests, "--paged-attention", "off",
                                                      "--cuda-graphs", "off", "--skip-baseline"),
        "profile_catalog": lambda: profile("catalog"),
        "small_catalog": lambda: bench("small", "catalog", args.catalog_requests, "--skip-baseline"),
        "pipeline_stage": stage,
    }
    for name in args.parts:
        elapsed = time.perf_counter() - t_start
        if elapsed + ESTIMATE_S[name] > args.deadline_s:
            result["skipped"].append(name)
            print(f"{name}: skipped at {elapsed:.0f}s (deadline {args.deadline_s:.0f}s)", flush=True)
            continue
        print(f"{name} ... ({elapsed:.0f}s)", flush=True)
        t0 = time.perf_counter()
        try:
            result[name] = parts[name]()
        except Exception as e:  # noqa: BLE001 - record and go on: one failing part must not lose the others
            result[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
            print(result[name]["traceback"], flush=True)
        result["elapsed_s"][name] = round(time.perf_counter() - t0, 1)
        result["build_s"] = models.build_s
        _free(args.device)
        if args.json:  # after every part, so a time-out still leaves the figures so far
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=1) + "\n")
    result["total_s"] = round(time.perf_counter() - t_start, 1)
    print(json.dumps(summary(result)), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return result


def summary(result: dict) -> dict:
    """The figures the issue's targets name, one line (the device tool returns the output's tail)."""
    out = {"total_s": result.get("total_s"), "skipped": result["skipped"], "elapsed_s": result["elapsed_s"]}
    for name, r in result.items():
        if not isinstance(r, dict):
            continue
        if "error" in r:
            out[name] = r["error"][:300]
        elif "items_per_s" in r:
            out[name] = {k: r.get(k) for k in ("items_per_s", "baseline_items_per_s", "speedup", "roofline_fraction",
                                               "roofline_items_per_s", "decode_tokens_per_s", "peak_gb", "steps")}
            out[name]["graphs"] = {k: r["cuda_graphs"].get(k) for k in ("on", "fallback", "cuda_graph_replays")}
            out[name]["paged"] = r["paged_attention"]
        elif name == "bf16_fixtures":
            out[name] = {k: r.get(k) for k in ("bf16_cases_agreeing_8", "engine_equal_generate_bf16")}
        elif name == "kernel_canary":
            out[name] = {k: r.get(k) for k in ("ok", "rc")}
        elif name == "pipeline_stage":
            out[name] = {k: r.get(k) for k in ("items", "status", "wall_s", "device")}
    return out


if __name__ == "__main__":
    main()
